"""Simulated device arrays: ``ndarray``, a small CuPy-like array over simulated memory.

An ndarray is an allocation (``_memory.Allocation``) plus a NumPy view of its bytes; views
(slicing, reshape) share the allocation, as CuPy's do. Element-wise operations, reductions
and copies run on that memory and return new device arrays ("device-side" work, no host
synchronisation); reading values to the host (``get``, ``float``, ``int``, ``bool``,
``item``, ``tolist``) is a host synchronisation. As with CuPy, implicit conversion to NumPy
(``numpy.asarray(d)``) is a TypeError, and so is mixing with NumPy arrays in operators.
"""
from __future__ import annotations

import numbers
import operator

import numpy as np

from . import _device
from ._memory import Allocation


class _Pointer:
    __slots__ = ("ptr",)

    def __init__(self, ptr):
        self.ptr = ptr


def _empty(shape, dtype, device_id=None) -> "ndarray":
    dtype = np.dtype(dtype)
    shape = (shape,) if isinstance(shape, numbers.Integral) else tuple(int(s) for s in shape)
    device_id = _device.get_device_id() if device_id is None else device_id
    alloc = Allocation(int(np.prod(shape, dtype=np.int64)) * dtype.itemsize, device_id)
    return ndarray._wrap(alloc.view(dtype, shape), alloc)


def _operand(other, op):
    if isinstance(other, ndarray):
        return other._h
    if isinstance(other, (numbers.Number, np.generic)):
        return other
    raise TypeError(f"unsupported operand type for {op}: a {type(other).__name__} cannot be "
                    f"combined with a cudasim.ndarray (move it to the device with "
                    f"ssm.testing.cudasim.asarray)")


def _binary(op, name, reflected=False):
    def method(self, other):
        o = _operand(other, name)
        return _from_host_result(op(o, self._h) if reflected else op(self._h, o), self)
    method.__name__ = name
    return method


def _unary(op, name):
    def method(self):
        return _from_host_result(op(self._h), self)
    method.__name__ = name
    return method


def _from_host_result(result, like) -> "ndarray":
    """A new device array holding a NumPy result computed from device memory."""
    result = np.asarray(result)
    out = _empty(result.shape, result.dtype, like.device.id)
    out._h[...] = result
    return out


class ndarray:
    """A simulated device array (see the module docstring)."""

    __slots__ = ("_h", "_alloc")
    __array_priority__ = 100.0

    @classmethod
    def _wrap(cls, view, alloc):
        a = object.__new__(cls)
        a._h, a._alloc = view, alloc
        return a

    def __init__(self, shape, dtype=float):
        tmp = _empty(shape, dtype)
        self._h, self._alloc = tmp._h, tmp._alloc

    # -- attributes -------------------------------------------------------------------
    shape = property(lambda self: self._h.shape)
    dtype = property(lambda self: self._h.dtype)
    strides = property(lambda self: self._h.strides)
    ndim = property(lambda self: self._h.ndim)
    size = property(lambda self: self._h.size)
    itemsize = property(lambda self: self._h.itemsize)
    nbytes = property(lambda self: self._h.nbytes)
    flags = property(lambda self: self._h.flags)
    T = property(lambda self: ndarray._wrap(self._h.T, self._alloc))

    @property
    def device(self):
        return _device.Device(self._alloc.device)

    @property
    def data(self):
        """``.data.ptr``: the address of the first element, as CuPy's MemoryPointer."""
        return _Pointer(self._h.ctypes.data if self._alloc.nbytes else self._alloc.ptr)

    @property
    def __ssm_cudasim_interface__(self):
        return {"shape": self.shape, "typestr": self.dtype.str, "strides": self.strides,
                "data": (self.data.ptr, not self._h.flags.writeable), "version": 1}

    def __len__(self):
        return len(self._h)

    def __repr__(self):
        _device.host_sync("repr()")
        return f"cudasim.{np.array_repr(self._h)}"

    # -- to the host (synchronisations) ------------------------------------------------
    def get(self) -> np.ndarray:
        _device.host_sync("ndarray.get()")
        return self._h.copy()

    def item(self):
        _device.host_sync("ndarray.item()")
        return self._h.item()

    def tolist(self):
        _device.host_sync("ndarray.tolist()")
        return self._h.tolist()

    def __float__(self):
        _device.host_sync("float()")
        return float(self._h)

    def __int__(self):
        _device.host_sync("int()")
        return int(self._h)

    def __index__(self):
        _device.host_sync("operator.index()")
        return operator.index(self._h)

    def __bool__(self):
        _device.host_sync("bool()")
        return bool(self._h)

    def __array__(self, dtype=None, copy=None):
        raise TypeError("Implicit conversion to a NumPy array is not allowed for a "
                        "cudasim.ndarray; use .get() or ssm.testing.cudasim.asnumpy()")

    # -- views and copies ----------------------------------------------------------------
    def __getitem__(self, key):
        if isinstance(key, ndarray):
            key = key._h
        r = self._h[key]
        if isinstance(r, np.ndarray) and np.may_share_memory(r, self._h):
            return ndarray._wrap(r, self._alloc)
        return _from_host_result(r, self)

    def __setitem__(self, key, value):
        if isinstance(key, ndarray):
            key = key._h
        self._h[key] = _operand(value, "assignment")

    def reshape(self, *shape, order="C"):
        shape = shape[0] if len(shape) == 1 and not isinstance(shape[0], numbers.Integral) \
            else shape
        r = self._h.reshape(shape, order=order)
        return ndarray._wrap(r, self._alloc) if np.may_share_memory(r, self._h) or r.size == 0 \
            else _from_host_result(r, self)

    def ravel(self):
        return self.reshape(-1)

    def copy(self, order="C"):
        return _from_host_result(self._h.copy(order=order), self)

    def astype(self, dtype, copy=True):
        if not copy and np.dtype(dtype) == self.dtype:
            return self
        return _from_host_result(self._h.astype(dtype), self)

    def fill(self, value):
        self._h.fill(value)

    # -- reductions ------------------------------------------------------------------------
    def _reduce(name):
        def method(self, *args, **kwargs):
            return _from_host_result(getattr(self._h, name)(*args, **kwargs), self)
        method.__name__ = name
        return method

    all = _reduce("all")
    any = _reduce("any")
    max = _reduce("max")
    min = _reduce("min")
    sum = _reduce("sum")
    mean = _reduce("mean")
    argmax = _reduce("argmax")
    argmin = _reduce("argmin")
    del _reduce

    # -- operators ---------------------------------------------------------------------------
    __add__ = _binary(operator.add, "__add__")
    __radd__ = _binary(operator.add, "__radd__", True)
    __sub__ = _binary(operator.sub, "__sub__")
    __rsub__ = _binary(operator.sub, "__rsub__", True)
    __mul__ = _binary(operator.mul, "__mul__")
    __rmul__ = _binary(operator.mul, "__rmul__", True)
    __truediv__ = _binary(operator.truediv, "__truediv__")
    __rtruediv__ = _binary(operator.truediv, "__rtruediv__", True)
    __pow__ = _binary(operator.pow, "__pow__")
    __eq__ = _binary(operator.eq, "__eq__")
    __ne__ = _binary(operator.ne, "__ne__")
    __lt__ = _binary(operator.lt, "__lt__")
    __le__ = _binary(operator.le, "__le__")
    __gt__ = _binary(operator.gt, "__gt__")
    __ge__ = _binary(operator.ge, "__ge__")
    __and__ = _binary(operator.and_, "__and__")
    __or__ = _binary(operator.or_, "__or__")
    __neg__ = _unary(operator.neg, "__neg__")
    __abs__ = _unary(operator.abs, "__abs__")
    __invert__ = _unary(operator.invert, "__invert__")
    __hash__ = None
