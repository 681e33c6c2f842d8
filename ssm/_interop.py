"""Arrays of other libraries in and out of the public functions, through DLPack.

Every public function of ``_api`` is wrapped by :func:`accepts_dlpack`. An argument
that is not a NumPy or CuPy array but implements ``__dlpack__`` (a torch tensor, a JAX
array, anything following the array API standard) is imported without a copy before
the function sees it: ``np.from_dlpack`` for host memory, ``cupy.from_dlpack`` for a
CUDA device (a TypeError where CuPy is not importable). The function then validates and
computes as for NumPy or CuPy input, so a strided or read-only foreign array is copied
once, as a NumPy one is. Its array results are handed back in the library of the call's
first argument (``x``, ``prob`` or ``logits``), again through DLPack without a copy:
``torch.from_dlpack`` for a torch tensor, ``from_dlpack`` of the argument's
``__array_namespace__()`` for an array-API array (JAX), else the NumPy or CuPy array
itself. An ``out=`` buffer comes back as the object the caller passed.

Nothing here imports torch or JAX: a foreign array is recognised by its methods and its
library's module is looked up in ``sys.modules`` (it must be loaded, as its array exists).
Calls whose arguments are all NumPy, CuPy, numbers or lists pay one scan of the
arguments and nothing else.
"""
from __future__ import annotations

import ctypes
import functools
import inspect
import sys

import numpy as np

from . import _validation as V

# DLPack device types (dlpack.h): the CPU, CUDA pinned host memory;
# CUDA, CUDA managed memory.
_HOST, _CUDA = (1, 3), (2, 13)
_DEVICE_NAMES = {1: "CPU", 2: "CUDA", 3: "CUDA host", 4: "OpenCL", 7: "Vulkan", 8: "Metal",
                 9: "VPI", 10: "ROCm", 11: "ROCm host", 13: "CUDA managed", 14: "oneAPI"}
# Libraries whose arrays the functions take natively (ssm: the simulated device arrays
# of ssm.testing, which the backend picks itself).
_NATIVE = ("numpy", "cupy", "ssm")
# Small parameter arrays that may live on either device whatever the logits' device.
_ANY_DEVICE = ("class_weights", "lens")


def is_foreign(a) -> bool:
    """True for an array of another library that implements ``__dlpack__``."""
    t = type(a)
    if t is np.ndarray or a is None or t in (int, float, list, tuple, str) \
            or isinstance(a, np.ndarray):  # a subclass from any module is NumPy's too
        return False
    return hasattr(t, "__dlpack__") and t.__module__.partition(".")[0] not in _NATIVE


def dlpack_device(a):
    """``(device type, id)`` from ``__dlpack_device__``, or None where it is missing or fails."""
    try:
        dev = a.__dlpack_device__()
        return int(dev[0]), int(dev[1])
    except Exception:
        return None


def _device_words(dev) -> str:
    return f"DLPack device type {dev[0]} ({_DEVICE_NAMES.get(dev[0], 'unknown')}), id {dev[1]}"


def _is_bfloat16(a) -> bool:
    """A foreign array of bfloat16 (torch.bfloat16, JAX's ml_dtypes.bfloat16), by its dtype's
    name: NumPy cannot import DLPack's kDLBfloat."""
    return str(getattr(a, "dtype", "")).rpartition(".")[2] == "bfloat16"


# DLPack's DLManagedTensor (legacy capsule "dltensor"): DLTensor first; its dtype's type
# code is the byte after data (8), device (8) and ndim (4). DLManagedTensorVersioned
# ("dltensor_versioned", DLPack 1.0): the version (8), manager_ctx (8), deleter (8) and
# flags (8, read-only among them) come first, then the DLTensor.
_DLTENSOR_DTYPE_CODE = 20
_VERSIONED_DLTENSOR = 32
_KDLUINT, _KDLBFLOAT = 1, 4
_capsule_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_pointer.restype = ctypes.c_void_p
_capsule_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]


class _Bits16:
    """A bfloat16 DLPack export relabelled uint16 (same bits, same memory), for NumPy.

    A versioned capsule where the exporter gives one (it says whether the memory may be
    written: NumPy imports a legacy capsule read-only, so that a torch.bfloat16 tensor
    could not be an ``out=`` buffer), else a legacy one."""

    def __init__(self, a):
        self._device = a.__dlpack_device__()
        try:
            self._capsule = a.__dlpack__(max_version=(1, 0))  # consumed once
        except TypeError:  # an exporter older than DLPack 1.0's keyword
            self._capsule = a.__dlpack__()
        name = b"dltensor"
        offset = _DLTENSOR_DTYPE_CODE
        if ctypes.pythonapi.PyCapsule_IsValid(ctypes.py_object(self._capsule),
                                              b"dltensor_versioned"):
            name, offset = b"dltensor_versioned", _VERSIONED_DLTENSOR + _DLTENSOR_DTYPE_CODE
        code = _capsule_pointer(self._capsule, name) + offset
        if ctypes.c_uint8.from_address(code).value != _KDLBFLOAT:
            raise TypeError("the exporter did not describe its array as kDLBfloat")
        ctypes.c_uint8.from_address(code).value = _KDLUINT

    def __dlpack__(self, **kwargs):
        return self._capsule

    def __dlpack_device__(self):
        return self._device


def _bfloat16_host(a):
    """A host bfloat16 array of another library as ml_dtypes.bfloat16, without a copy."""
    bf16 = V.bfloat16()
    if bf16 is None:
        raise TypeError("bfloat16 arrays need ml_dtypes (pip install ml_dtypes)")
    return np.from_dlpack(_Bits16(a)).view(bf16)


def _bfloat16_back(like, convert, r):
    """A bfloat16 NumPy result in ``like``'s library: its bits through DLPack as uint16,
    reinterpreted there (torch: a view; JAX: bitcast_convert_type)."""
    t = convert(r.view(np.uint16))
    module = type(like).__module__.partition(".")[0]
    if module == "torch":
        return t.view(sys.modules["torch"].bfloat16)
    if module.startswith("jax") and "jax" in sys.modules:
        jax = sys.modules["jax"]
        return jax.lax.bitcast_convert_type(t, jax.numpy.bfloat16)
    return r


def to_native(a, name: str):
    """A foreign array as a NumPy array (host) or a CuPy array (CUDA), sharing its memory."""
    dev = dlpack_device(a)
    what = V.type_name(a)
    if dev is not None and dev[0] in _CUDA:
        try:
            import cupy
        except ImportError:
            raise TypeError(f"{name}: a {what} on a CUDA device ({_device_words(dev)}) needs "
                            "CuPy for ssm's GPU path, and CuPy is not importable; install "
                            "ssm[cuda12] or ssm[cuda13], or pass an array in host memory") from None
        convert = cupy.from_dlpack
    elif dev is None or dev[0] in _HOST:
        convert = np.from_dlpack
    else:
        raise TypeError(f"{name}: a {what} on {_device_words(dev)} is not supported; expected "
                        "an array in host memory (CPU) or on a CUDA device")
    if convert is np.from_dlpack and _is_bfloat16(a):
        convert = _bfloat16_host
    a = _resolved(a, name, what)
    try:
        return convert(a)
    except Exception as exc:  # BufferError, RuntimeError, TypeError: the exporter's words
        hint = ""
        if getattr(a, "requires_grad", False):
            hint = (f"; pass {name}.detach(), or use ssm.torch.cross_entropy to differentiate "
                    "through ssm")
        raise TypeError(f"{name}: a {what} could not be imported through DLPack "
                        f"({type(exc).__name__}: {exc}){hint}") from exc


def _resolved(a, name: str, what: str):
    """A torch tensor whose negation or conjugation is a lazy bit (``x.conj().imag``:
    ``is_neg()``) with it applied: DLPack hands over the memory without the bit, so the
    values would be read un-negated. Not for ``out``: writes would land un-negated."""
    for bit, resolve in (("is_neg", "resolve_neg"), ("is_conj", "resolve_conj")):
        test = getattr(a, bit, None)
        if callable(test) and test():
            if name == "out":
                raise TypeError(f"out: a {what} with its {bit[3:]} bit set (a lazy view, such "
                                f"as x.conj().imag) cannot be written through; pass a tensor "
                                f"without it (out.{resolve}() is a copy)")
            a = getattr(a, resolve)()
    return a


def _from_dlpack_of(like):
    """The function that turns a NumPy or CuPy result into an array of ``like``'s library
    (without a copy where that library can), or None to return the result as it is."""
    module = type(like).__module__.partition(".")[0]
    if module == "torch" and "torch" in sys.modules:
        return sys.modules["torch"].from_dlpack
    namespace = getattr(like, "__array_namespace__", None)
    if namespace is not None:
        try:
            return namespace().from_dlpack
        except Exception:  # a namespace without from_dlpack: NumPy or CuPy it is
            return None
    return None


def _is_native_array(a) -> bool:
    return isinstance(a, np.ndarray) or V.is_device_array(a)


def _on_gpu(a) -> bool:
    if V.is_device_array(a):
        return True
    if is_foreign(a):
        dev = dlpack_device(a)
        return dev is not None and dev[0] in _CUDA
    return False


def _check_one_device(named):
    """TypeError when host and CUDA arrays meet in one call (foreign ones included)."""
    arrays = [(n, a) for n, a in named
              if n not in _ANY_DEVICE and (is_foreign(a) or _is_native_array(a))]
    gpu = [(n, a) for n, a in arrays if _on_gpu(a)]
    host = [(n, a) for n, a in arrays if not _on_gpu(a)]
    if gpu and host:
        (hn, ha), (gn, ga) = host[0], gpu[0]
        raise TypeError(f"{hn}: a {V.type_name(ha)} in host memory cannot be mixed with {gn}, "
                        f"a {V.type_name(ga)} on a CUDA device; pass arrays on one device")


def _call(func, named, first, out=None):
    """``func(native)`` with the foreign values of ``named`` ((name, value) pairs) imported,
    its results (an array, or a tuple or list of them) handed back in ``first``'s library
    and the native ``out`` buffer as the caller's object."""
    _check_one_device(named)
    native = {n: (to_native(a, n) if is_foreign(a) else a) for n, a in named}
    result = func(native)
    convert = _from_dlpack_of(first) if is_foreign(first) else None

    def back(r):
        if out is not None and r is native.get("out"):
            return out  # the caller's buffer, as the caller passed it
        if convert is not None and _is_native_array(r):
            if isinstance(r, np.ndarray) and r.dtype.name == "bfloat16":
                return _bfloat16_back(first, convert, r)
            return convert(r)
        return r

    if isinstance(result, (tuple, list)):
        return type(result)(back(r) for r in result)
    return back(result)


def accepts_dlpack(func):
    """Wrap a public function: foreign arguments in through DLPack, results out in the
    first argument's library (see the module docstring)."""
    names = list(inspect.signature(func).parameters)

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        if not any(map(is_foreign, args)) and not any(map(is_foreign, kwargs.values())):
            return func(*args, **kwargs)
        positional = names[:len(args)]
        return _call(lambda native: func(*(native[n] for n in positional),
                                         **{n: native[n] for n in kwargs}),
                     list(zip(positional, args)) + list(kwargs.items()),
                     args[0] if args else kwargs.get(names[0]), kwargs.get("out"))

    return wrapper


def call_on_list(func, items, names):
    """``func(list)`` for a list of arguments named ``names`` (``ssm.ops.run``'s inputs),
    foreign ones imported, the list of results handed back in the first item's library."""
    if not any(map(is_foreign, items)):
        return func(list(items))
    named = list(zip(names, items))
    return _call(lambda native: func([native[n] for n, _ in named]), named, items[0])
