"""Argument checks and the dtype tables of ssm: the single source of truth.

Every public function validates here, once, before any kernel runs; the kernels
trust what they are given (except label bounds, which they never use as an index
unchecked). Messages name the argument first, then the value, then what was
expected: ``"reduction: 'avg' is not one of 'mean', 'sum', 'batch', 'none'"``.
``TypeError`` is for types and dtypes, ``ValueError`` for shapes, values, options,
``out=`` buffers and labels.
"""
from __future__ import annotations

import math
import numbers
import operator
import sys
from collections.abc import Mapping
from typing import NamedTuple

import numpy as np

from ._codes import LABEL_KINDS, LOSSES, Target  # LABEL_KINDS: the integer label dtypes


def bfloat16():
    """``ml_dtypes.bfloat16`` as a NumPy dtype, or None where ml_dtypes is not installed."""
    try:
        import ml_dtypes
    except ImportError:
        return None
    return np.dtype(ml_dtypes.bfloat16)


class _FloatDtypes(Mapping):
    """The float dtypes of each device: NumPy's, then bfloat16 where ml_dtypes is installed.
    bfloat16 needs ml_dtypes imported (70 ms), so the table is built on first use, and
    ``accepts`` answers NumPy's own dtypes without building it: ``import ssm`` and calls on
    float32 never import ml_dtypes (a bfloat16 array means it is imported already)."""

    def __init__(self, native, with_bfloat16):
        self._native = {device: tuple(np.dtype(d) for d in ds) for device, ds in native.items()}
        self._with_bfloat16 = with_bfloat16
        self._table = None

    def _built(self) -> dict:
        if self._table is None:
            bf16 = bfloat16()
            self._table = {device: ds + ((bf16,) if bf16 is not None
                                         and device in self._with_bfloat16 else ())
                           for device, ds in self._native.items()}
        return self._table

    def __getitem__(self, device):
        return self._built()[device]

    def __iter__(self):
        return iter(self._native)

    def __len__(self):
        return len(self._native)

    def accepts(self, dtype, device: str) -> bool:
        return dtype in self._native[device] or (dtype.name == "bfloat16" and dtype in self[device])


# Float dtypes of logits (and of soft targets, weights, class weights, lenses, d_loss maps).
# Half types (float16, bfloat16) are stored as such and computed in float32.
FLOAT_DTYPES = _FloatDtypes({
    "cpu": (np.float16, np.float32, np.float64),
    "cuda": (np.float16, np.float32, np.float64),
}, with_bfloat16=("cpu", "cuda"))
HALF_DTYPE_NAMES = ("float16", "bfloat16")


def is_float(dtype) -> bool:
    """A floating-point dtype: NumPy's (kind 'f') or ml_dtypes' bfloat16 (kind 'V')."""
    return dtype.kind == "f" or dtype.name == "bfloat16"


def is_real(dtype) -> bool:
    """An integer or floating-point dtype, not bool: what a number parameter may be."""
    return dtype.kind in "iu" or is_float(dtype)


LAYOUTS = ("NCHW", "NHWC")
COORDINATES = ("normalized", "pixels")  # soft_argmax's coordinate grids
REDUCTIONS = ("mean", "sum", "batch", "none")
LENS_ROW_TOLERANCE = 1e-4


def _quote(values):
    return ", ".join(repr(v) for v in values)


def _dtype_names(dtypes):
    return ", ".join(str(d) for d in dtypes)


def type_name(obj):
    t = type(obj)
    return t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


def _is_simulated(a) -> bool:
    return hasattr(type(a), "__ssm_cudasim_interface__")


def is_device_array(a) -> bool:
    """True for a GPU array: a cupy.ndarray, or a simulated one (ssm.testing.cudasim.ndarray,
    which runs the same GPU backend), without importing either library."""
    t = type(a)
    if t is np.ndarray or a is None or t is float or t is int:  # the common cases, first:
        return False                                            # this runs many times a call
    return (t.__module__.startswith("cupy") and hasattr(a, "__cuda_array_interface__")) \
        or _is_simulated(a)


# NumPy arrays of at least this many bytes that ssm allocates for an output start on a
# 64-byte boundary (see empty_like).
ALIGNED_BYTES = 1 << 20


def empty_like(x):
    """The array module's empty_like(x); for a C-contiguous NumPy array of at least
    ALIGNED_BYTES, one whose data starts on a 64-byte (cache line) boundary. NumPy's
    large arrays start 16 bytes past one, so every row of a tile that the kernels stream
    out (non-temporal stores, whole lines at a time) began and ended in a line shared
    with the next tile, written in two parts: ADE-like fused (96-pixel tile rows) took
    1.23x (1 thread) and 1.17x (2 threads) the time into an aligned output, VOC-like
    up to 1.08x (benchmarks/out_alignment.py, 2026-12-01, Zen 4)."""
    xp = array_module(x)
    if xp is not np or type(x) is not np.ndarray or not x.flags.c_contiguous \
            or x.nbytes < ALIGNED_BYTES:
        return xp.empty_like(x)
    buf = np.empty(x.nbytes + 64, np.uint8)
    start = -buf.ctypes.data % 64
    return buf[start:start + x.nbytes].view(x.dtype).reshape(x.shape)


def array_module(a):
    """The array's library: cupy for a cupy.ndarray, ssm.testing.cudasim (CuPy's interface,
    simulated) for a simulated array, else numpy."""
    if type(a) is np.ndarray:
        return np
    if _is_simulated(a):
        from .testing import cudasim
        return cudasim
    if is_device_array(a):
        import cupy
        return cupy
    return np


def device_of(a) -> str:
    return "cuda" if is_device_array(a) else "cpu"


# How to express what a mask means, per argument; a masked array is never accepted.
_MASK_HINTS = {
    "target": "for labels, pass target.filled(ignore_index) to ignore the masked pixels",
    "T": "for labels, pass T.filled(-1) to ignore the masked pixels",
    "weights": "pass weights.filled(0) to give the masked pixels no weight",
    "W": "pass W.filled(0) to give the masked pixels no weight",
    "d_loss": "pass d_loss.filled(0) to give the masked pixels no gradient",
}


def is_masked_array(a) -> bool:
    """True for a numpy.ma.MaskedArray (none can exist until numpy.ma is imported)."""
    ma = sys.modules.get("numpy.ma")
    return ma is not None and isinstance(a, ma.MaskedArray)


def masked_error(name: str) -> TypeError:
    hint = _MASK_HINTS.get(name, "to leave pixels out of the loss, give them ignore_index "
                                 "labels or zero weights")
    return TypeError(f"{name}: a masked array (numpy.ma.MaskedArray) is not accepted: its mask "
                     f"would be ignored; {hint}, or np.asarray({name}) to drop the mask")


def _conversion_hint(a, name: str) -> str:
    """How to turn an array ssm does not take into one it does. (Objects with __dlpack__
    never get here: ssm/_interop.py imports them, or says why it cannot.)"""
    if hasattr(a, "__cuda_array_interface__"):
        return f" Convert it first: cupy.asarray({name})"
    if hasattr(a, "__array__"):
        return f" Convert it first: np.asarray({name})"
    return ""


def as_array(a, name: str):
    """The array itself (NumPy, CuPy or simulated), or a NumPy array from a nested sequence or a
    number; TypeError otherwise (masked arrays included: their mask would be lost)."""
    if isinstance(a, np.ndarray) or is_device_array(a):
        if is_masked_array(a):
            raise masked_error(name)
        if type(a) is np.ndarray and not a.dtype.isnative:
            return a.astype(a.dtype.newbyteorder("="))  # the kernels read native numbers
        return a
    if isinstance(a, (list, tuple, numbers.Number, np.generic)) and not isinstance(a, bool):
        return _from_sequence(a, name)
    hint = _conversion_hint(a, name)
    raise TypeError(f"{name}: expected a NumPy array, a number or a nested list or tuple of "
                    f"numbers (CPU), a CuPy array (GPU), or an array of another library "
                    f"with __dlpack__; got {type_name(a)}"
                    + (f".{hint}" if hint else ""))


def _from_sequence(a, name: str) -> np.ndarray:
    """np.asarray of a number or a nested list or tuple; a ragged nesting is a ValueError
    that names the argument (NumPy's own names none)."""
    try:
        return np.asarray(a)
    except ValueError as exc:
        raise ValueError(f"{name}: a nested list or tuple must have an array's shape (every "
                         f"list at one depth the same length); got a ragged one ({exc})") from None


def sequence_as(a, dtype, name: str):
    """A nested list or tuple of real numbers as an array of `dtype` (the logits'): Python's
    numbers have no dtype of their own to differ from it. Anything else as it is."""
    if isinstance(a, (list, tuple)):
        arr = _from_sequence(a, name)
        if is_real(arr.dtype):
            return arr.astype(dtype)
    return a


def contiguous(a, dtype=None):
    """`a` as a C-contiguous, aligned array for the kernels (a copy only where needed).
    A NumPy view at an odd byte offset is contiguous but not aligned to its dtype;
    the C kernels may not read such a pointer, so it is copied too."""
    if type(a) is np.ndarray:
        flags = a.flags
        if flags.c_contiguous and flags.aligned and (dtype is None or a.dtype == dtype):
            return a  # the common case, without np.require's cost (4 us of a 40 us call)
    elif array_module(a) is not np:
        return array_module(a).ascontiguousarray(a, dtype=dtype)
    return np.require(a, dtype=dtype, requirements=("C", "A", "E"))  # E: a base ndarray


def check_choice(value, name: str, choices) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name}: {value!r} is not one of {_quote(choices)}")
    return value


def check_loss(loss):
    """The ``loss=`` option as its ssm._codes.Loss code."""
    return LOSSES[check_choice(loss, "loss", tuple(LOSSES))]


def check_float_dtype(a, name: str, table=FLOAT_DTYPES) -> None:
    """`a`'s dtype must be a float dtype its device computes in (per ``table``)."""
    device = device_of(a)
    ok = table.accepts(a.dtype, device) if table is FLOAT_DTYPES else a.dtype in table[device]
    if not ok:
        where = "the CPU" if device == "cpu" else "a GPU"
        raise TypeError(f"{name}: dtype {a.dtype} is not supported on {where}; "
                        f"expected one of {_dtype_names(table[device])}")


def check_float_array(a, name: str, table=FLOAT_DTYPES):
    a = as_array(a, name)
    check_float_dtype(a, name, table)
    return contiguous(a)


class Geometry(NamedTuple):
    """A logits shape seen as (outer, C, inner), plus the per-pixel shape (N, *spatial).
    How a backend cuts it up (tiles, blocks) is the backend's own business."""

    shape: tuple
    N: int
    C: int
    pixel_shape: tuple
    outer: int
    inner: int

    @property
    def n_pixels(self) -> int:
        return self.outer * self.inner


def geometry(a: np.ndarray, name: str, layout: str) -> Geometry:
    shape = tuple(a.shape)
    if a.ndim < 2:
        raise ValueError(f"{name}: shape {shape} has {a.ndim} dimension(s); expected at least 2, "
                         f"(N, C, *spatial) for NCHW or (N, *spatial, C) for NHWC")
    if layout == "NCHW":
        N, C, spatial = shape[0], shape[1], shape[2:]
        outer, inner = N, math.prod(spatial)
    else:
        N, C, spatial = shape[0], shape[-1], shape[1:-1]
        outer, inner = N * math.prod(spatial), 1
    if C == 0:
        raise ValueError(f"{name}: shape {shape} has an empty class axis; expected C >= 1")
    if C >= 2**31:
        raise ValueError(f"{name}: {C} classes; at most 2**31 - 1 are supported")
    return Geometry(shape, N, C, (N, *spatial), outer, inner)


def check_same(a: np.ndarray, name: str, ref: np.ndarray, ref_name: str) -> np.ndarray:
    """`a` must have exactly ref's shape and dtype (softmax_grad's dprob)."""
    a = check_float_array(sequence_as(a, ref.dtype, name), name)
    if a.dtype != ref.dtype:
        raise TypeError(f"{name}: dtype {a.dtype} differs from {ref_name}'s {ref.dtype}")
    if a.shape != ref.shape:
        raise ValueError(f"{name}: shape {a.shape} differs from {ref_name}'s {ref.shape}")
    return a


def _target_kinds(geom: Geometry, logits: np.ndarray) -> str:
    return (f"expected integer labels ({_dtype_names(LABEL_KINDS)}) of shape {geom.pixel_shape}, "
            f"or soft targets of the logits' shape {geom.shape} and dtype {logits.dtype}")


def check_target(target, geom: Geometry, logits: np.ndarray, logits_name: str):
    """Return (target array, kernel kind): integer labels or a soft target map."""
    t = as_array(target, "target")
    if t.dtype in LABEL_KINDS and t.shape == geom.pixel_shape:  # the common case: no message
        return contiguous(t), LABEL_KINDS[t.dtype]
    if isinstance(target, (list, tuple)) and is_float(t.dtype) and t.shape == geom.shape:
        t = t.astype(logits.dtype)  # soft targets as nested lists: the logits' dtype
    kinds = _target_kinds(geom, logits)
    if is_float(t.dtype):
        if t.shape == geom.shape:
            if t.dtype != logits.dtype:
                raise TypeError(f"target: soft targets of dtype {t.dtype} differ from "
                                f"{logits_name}'s dtype {logits.dtype}; {kinds}")
            return contiguous(t), Target.SOFT
        if t.shape == geom.pixel_shape:
            raise TypeError(f"target: a {t.dtype} array of shape {t.shape} has the labels' "
                            f"shape, but labels must be integers (target.astype(np.int64)); "
                            f"{kinds}")
        raise ValueError(f"target: a {t.dtype} array of shape {t.shape} is neither labels nor "
                         f"soft targets; {kinds}")
    if t.dtype not in LABEL_KINDS:
        raise TypeError(f"target: dtype {t.dtype} is not supported; {kinds}")
    if t.shape != geom.pixel_shape:
        raise ValueError(f"target: {t.dtype} labels of shape {t.shape} do not match "
                         f"{logits_name} {geom.shape}; {kinds}")
    return contiguous(t), LABEL_KINDS[t.dtype]


def check_weights(weights, geom: Geometry, dtype: np.dtype):
    if weights is None:
        return None
    w = as_array(sequence_as(weights, dtype, "weights"), "weights")
    if w.dtype != dtype:
        raise TypeError(f"weights: dtype {w.dtype} differs from the logits' {dtype}")
    if w.shape != geom.pixel_shape:
        raise ValueError(f"weights: shape {w.shape} does not match the logits; "
                         f"expected {geom.pixel_shape}")
    return contiguous(w)


def _small_float(value, name: str, shape: tuple) -> np.ndarray:
    """A small parameter array (class weights, lens): any real array-like, on the host in
    float64 (a device one is copied over once; the GPU backend keeps a device copy)."""
    a = as_array(value, name)
    if is_device_array(a):
        a = a.get()
    if not is_real(a.dtype):
        raise TypeError(f"{name}: dtype {a.dtype} is not a real number type")
    if a.shape != shape:
        raise ValueError(f"{name}: shape {a.shape} does not match the {shape[0]} classes; "
                         f"expected {shape}")
    return np.asarray(a, dtype=np.float64)


def check_class_weights(class_weights, C: int, dtype: np.dtype):
    if class_weights is None:
        return None
    return contiguous(_small_float(class_weights, "class_weights", (C,)), dtype)


def check_lens(lens, C: int, dtype: np.dtype, kind: int):
    if lens is None:
        return None
    if kind == Target.SOFT:
        raise ValueError("lens: a confusion lens maps integer labels; it cannot be used with "
                         "soft targets (fold it into the target map instead)")
    lens = _small_float(lens, "lens", (C, C))  # checked in float64, then cast
    bad = ~(np.isfinite(lens) & (lens >= 0))
    if bad.any():
        i, j = (int(k) for k in np.unravel_index(np.argmax(bad), bad.shape))
        raise ValueError(f"lens: entry [{i}, {j}] is {float(lens[i, j])!r}; expected finite "
                         f"entries >= 0 (rows are distributions)")
    rows = lens.sum(axis=1, dtype=np.float64)
    worst = int(np.argmax(np.abs(rows - 1.0)))
    if abs(rows[worst] - 1.0) > LENS_ROW_TOLERANCE:
        raise ValueError(f"lens: row {worst} sums to {rows[worst]:.6g}; expected every row to "
                         f"sum to 1 (within {LENS_ROW_TOLERANCE})")
    return contiguous(lens, dtype)


def check_smoothing(label_smoothing) -> float:
    if type(label_smoothing) is float and 0.0 <= label_smoothing <= 1.0:
        return label_smoothing  # the common case, without the ABC checks below
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, numbers.Real):
        raise TypeError(f"label_smoothing: expected a number in [0, 1], "
                        f"got {type_name(label_smoothing)}")
    e = float(label_smoothing)
    if not 0.0 <= e <= 1.0:
        raise ValueError(f"label_smoothing: {label_smoothing!r} is outside [0, 1]")
    return e


def check_ignore_index(ignore_index) -> int:
    if type(ignore_index) is int and -(2**63) <= ignore_index < 2**63:
        return ignore_index  # the common case, without the ABC checks below
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index: expected an int, got {ignore_index!r}")
    i = int(ignore_index)
    if not -(2**63) <= i < 2**63:
        raise ValueError(f"ignore_index: {i} does not fit in 64 bits")
    return i


def check_flag(value, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: expected True or False, got {value!r}")
    return bool(value)


def check_d_loss(d_loss, reduction: str, geom: Geometry, dtype: np.dtype):
    """Return (scalar, map or None): a number for any reduction, an (N, *spatial) map for 'none'.

    A size-1 CuPy array stays on its device as a 0-d float64 array (reading it would
    synchronise)."""
    if isinstance(d_loss, numbers.Real) and not isinstance(d_loss, bool):
        return float(d_loss), None
    d = as_array(d_loss, "d_loss")
    if not is_real(d.dtype):
        raise TypeError(f"d_loss: dtype {d.dtype} is not a real number type")
    xp = array_module(d)
    if reduction == "none" and d.shape == geom.pixel_shape:
        return 1.0, contiguous(d, dtype)
    if d.size == 1:
        if xp is not np:
            return d.reshape(()).astype(np.float64), None
        return float(d.reshape(())), None
    if reduction != "none":
        raise ValueError(f"d_loss: an array of shape {d.shape} needs reduction='none'; with "
                         f"reduction={reduction!r} the loss is a scalar, so d_loss must be one")
    raise ValueError(f"d_loss: shape {d.shape} does not match the loss map; "
                     f"expected {geom.pixel_shape} or a scalar")


def check_out(out, name: str, shape: tuple, dtype: np.dtype, inputs=()):
    """A caller's output buffer: exact shape and dtype, C-contiguous, writeable, and sharing
    no memory with any of ``inputs``, the call's (name, array) pairs (None entries skipped)."""
    if out is None:
        return None
    if not isinstance(out, np.ndarray) and not is_device_array(out):
        raise TypeError(f"{name}: expected a NumPy array (CPU), a CuPy array (GPU), or a "
                        f"writeable array of another library with __dlpack__; "
                        f"got {type_name(out)}")
    if is_masked_array(out):
        raise masked_error(name)
    if out.dtype != dtype:
        raise ValueError(f"{name}: dtype {out.dtype} does not match; expected {dtype}")
    if out.shape != shape:
        raise ValueError(f"{name}: shape {out.shape} does not match; expected {shape}")
    if not out.flags.c_contiguous:
        raise ValueError(f"{name}: the buffer is not C-contiguous; expected a C-contiguous array")
    if not getattr(out.flags, "aligned", True):  # CuPy arrays are always aligned
        raise ValueError(f"{name}: the buffer is not aligned to its dtype (address "
                         f"{out.__array_interface__['data'][0]:#x} is not a multiple of "
                         f"{out.itemsize}); expected an aligned array, as numpy.empty gives")
    if not getattr(out.flags, "writeable", True):
        raise ValueError(f"{name}: the buffer is read-only")
    xp = array_module(out)
    for input_name, a in inputs:
        # an input of another library (class weights and lenses stay NumPy copies on the
        # GPU) cannot alias out=; CuPy's may_share_memory takes CuPy arrays only
        if a is not None and array_module(a) is xp and xp.may_share_memory(out, a):
            raise ValueError(f"{name}: the buffer overlaps {input_name}; expected memory "
                             f"separate from every input")
    return out


def bad_label_error(target: np.ndarray, flat_index: int, C: int, ignore_index: int) -> ValueError:
    index = tuple(int(i) for i in np.unravel_index(flat_index, target.shape))
    return label_error(int(target.reshape(-1)[flat_index]), index, C, ignore_index)


def label_error(value: int, index: tuple, C: int, ignore_index: int) -> ValueError:
    """The bad-label error for a label and its index (ssm.dask: the index in the whole
    array, from a chunk's)."""
    return ValueError(f"target: label {value} at index {index} is outside [0, {C}) and is not "
                      f"ignore_index ({ignore_index})")


# ---- the Caffe2 operator surface (ssm.ops) ----------------------------------------
# Checks on shapes and dtypes alone, so that ops.infer (which has no arrays) and ops.run
# raise the same errors for the same inputs.

# Every float dtype some device accepts: what ops.infer can be asked about.
def any_float_dtypes() -> tuple:
    return tuple(sorted(set().union(*FLOAT_DTYPES.values()), key=lambda d: (d.itemsize, d.name)))
CAFFE2_ORDERS = ("NCHW", "nchw")  # Caffe2's StringToStorageOrder; only NCHW is implemented


def _float_dtypes_by_device():
    cpu = FLOAT_DTYPES["cpu"]
    return ", ".join(f"{d}" if d in cpu else f"{d} (GPU only)" for d in any_float_dtypes())


def as_dtype(dtype, name: str) -> np.dtype:
    try:
        return np.dtype(dtype)
    except TypeError:
        raise TypeError(f"{name}: {dtype!r} is not a dtype") from None


def as_shape(shape, name: str) -> tuple:
    try:
        dims = tuple(operator.index(d) for d in shape)
    except TypeError:
        raise TypeError(f"{name}: {shape!r} is not a shape; expected a sequence of ints") from None
    if any(d < 0 for d in dims):
        raise ValueError(f"{name}: shape {dims} has a negative dimension")
    return dims


def check_any_float_dtype(dtype: np.dtype, name: str) -> None:
    if dtype not in any_float_dtypes():
        raise TypeError(f"{name}: dtype {dtype} is not supported; expected one of "
                        f"{_float_dtypes_by_device()}")


def check_ndim(shape: tuple, name: str, ndim: int, expected: str) -> None:
    if len(shape) != ndim:
        raise ValueError(f"{name}: shape {shape} is not {ndim}-D; expected {expected}")


def check_shape_matches(shape: tuple, name: str, expected: tuple, ref_name: str,
                        ref_shape: tuple) -> None:
    if tuple(shape) != tuple(expected):
        raise ValueError(f"{name}: shape {tuple(shape)} does not match {ref_name}'s "
                         f"{tuple(ref_shape)}; expected {tuple(expected)}")


def check_dtype_matches(dtype: np.dtype, name: str, ref_dtype: np.dtype, ref_name: str) -> None:
    if dtype != ref_dtype:
        raise TypeError(f"{name}: dtype {dtype} differs from {ref_name}'s {ref_dtype}; "
                        f"expected {ref_dtype}")


def check_caffe2_labels_dtype(dtype: np.dtype, name: str) -> None:
    if dtype != np.int32:
        raise TypeError(f"{name}: dtype {dtype} is not supported; expected int32 labels "
                        f"(Caffe2's; -1 is ignored)")


def check_caffe2_classes(shape: tuple, name: str) -> None:
    if shape[1] == 0:
        raise ValueError(f"{name}: shape {shape} has an empty class axis; expected C >= 1")


def check_caffe2_grad_output(shape: tuple, dtype: np.dtype, name: str) -> None:
    """The gradient of the loss: Caffe2 reads the first element of a float tensor."""
    if not is_float(dtype):
        raise TypeError(f"{name}: dtype {dtype} is not a float dtype; expected the gradient "
                        f"of the loss, a float array whose first element is used")
    if math.prod(shape) < 1:
        raise ValueError(f"{name}: shape {shape} is empty; expected at least one element "
                         f"(Caffe2 reads the first)")


def check_scale(value, name: str = "scale") -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a number >= 0, got {type_name(value)}")
    s = float(value)
    if not (math.isfinite(s) and s >= 0):
        raise ValueError(f"{name}: {value!r} is not a finite number >= 0; Caffe2 requires "
                         f"scale >= 0")
    return s


def check_order(value, name: str = "order") -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name}: expected a string, got {type_name(value)}")
    if value not in CAFFE2_ORDERS:
        raise ValueError(f"{name}: {value!r} is not supported; expected 'NCHW' (Caffe2's "
                         f"operator implements only NCHW)")
    return "NCHW"


# ---- softmax over positions (ssm/_positions.py) ----------------------------------

class PositionsGeometry(NamedTuple):
    """Maps of positions (softmax over positions, ssm/_positions.py): ``x`` of shape
    ``(N, C, *spatial)`` or ``(N, *spatial, C)`` seen as (outer, L, inner), L the positions
    of one map; row ``o * inner + i`` is the map (n, c) = (row // C, row % C)."""

    shape: tuple
    N: int
    C: int
    spatial: tuple
    outer: int
    L: int
    inner: int

    @property
    def rows(self) -> int:
        return self.outer * self.inner


def positions_geometry(a, name: str, layout: str) -> PositionsGeometry:
    """``a``'s shape as (outer, L, inner): NCHW (N*C, L, 1), NHWC (N, L, C)."""
    shape = tuple(a.shape)
    if a.ndim < 3:
        raise ValueError(f"{name}: shape {shape} has {a.ndim} dimension(s); expected at least 3, "
                         f"(N, C, *spatial) for NCHW or (N, *spatial, C) for NHWC")
    if layout == "NCHW":
        N, C, spatial = shape[0], shape[1], shape[2:]
    else:
        N, C, spatial = shape[0], shape[-1], shape[1:-1]
    L = math.prod(spatial)
    if L == 0:
        raise ValueError(f"{name}: shape {shape} has no positions (spatial shape {spatial}); "
                         f"expected at least one per map")
    if L >= 2**31:
        raise ValueError(f"{name}: {L} positions per map; at most 2**31 - 1 are supported")
    if C >= 2**31:  # as the class axis (and the (C,) temperatures need no allocation first)
        raise ValueError(f"{name}: {C} channels; at most 2**31 - 1 are supported")
    if layout == "NCHW":
        return PositionsGeometry(shape, N, C, spatial, N * C, L, 1)
    return PositionsGeometry(shape, N, C, spatial, N, L, C)


def check_temperature(temperature, C: int, dtype=np.float64):
    """(the (C,) float64 temperatures, whether one number was given). A temperature is a
    positive finite number, or an array of C of them (one per channel), whose inverse is
    finite in the type the kernels compute ``dtype`` maps in (float64 for float64,
    float32 for the others): the kernels scale by 1/T, and an infinite one would make the
    map's largest value 0 * inf, NaN."""
    if isinstance(temperature, numbers.Real) and not isinstance(temperature, (bool, np.bool_)):
        t = np.full(C, float(temperature))
        scalar = True
    else:
        a = as_array(temperature, "temperature")
        if is_device_array(a):
            a = a.get()
        if not is_real(a.dtype):
            raise TypeError(f"temperature: dtype {a.dtype} is not a real number type")
        scalar = a.ndim == 0
        if not scalar and a.shape != (C,):
            raise ValueError(f"temperature: shape {a.shape} does not match the {C} channels; "
                             f"expected a number or shape ({C},)")
        t = np.broadcast_to(np.asarray(a, np.float64), (C,)).copy()
    bad = ~(np.isfinite(t) & (t > 0))
    if bad.any():
        v = t[np.argmax(bad)]
        raise ValueError(f"temperature: {float(v)!r} is not a positive finite number; "
                         f"expected temperature > 0")
    compute = np.float64 if np.dtype(dtype) == np.float64 else np.float32
    # 1/T is taken in float64: its largest finite value, or the smallest normal float64
    # (1/DBL_MAX is subnormal, and 1 over it rounds to inf)
    lowest = max(1.0 / float(np.finfo(compute).max), float(np.finfo(np.float64).tiny))
    if (t < lowest).any():
        v = t[np.argmax(t < lowest)]
        raise ValueError(f"temperature: {float(v)!r} is too small for {np.dtype(dtype)} maps, "
                         f"whose kernels scale by 1/T in {np.dtype(compute)}; expected "
                         f"temperature >= {lowest!r}")
    return t, scalar


def check_grid(grid, spatial: tuple) -> np.ndarray:
    """A caller's coordinate grid ``(*spatial, D)`` (kornia's meshgrid layout, without its
    batch axis) as a (D, L) float64 host array."""
    a = as_array(grid, "grid")
    if is_device_array(a):
        a = a.get()
    if not is_real(a.dtype):
        raise TypeError(f"grid: dtype {a.dtype} is not a real number type")
    if a.ndim != len(spatial) + 1 or tuple(a.shape[:-1]) != spatial or a.shape[-1] == 0:
        raise ValueError(f"grid: shape {a.shape} does not match the spatial shape {spatial}; "
                         f"expected {(*spatial, 'D')} with D >= 1")
    return np.ascontiguousarray(np.asarray(a, np.float64).reshape(-1, a.shape[-1]).T)


def check_d_keypoints(dk, geom, x):
    """soft_argmax_grad's upstream gradient: (N, C, ndim) of x's dtype."""
    dk = check_float_array(sequence_as(dk, x.dtype, "d_keypoints"), "d_keypoints")
    if dk.dtype != x.dtype:
        raise TypeError(f"d_keypoints: dtype {dk.dtype} differs from x's {x.dtype}")
    expected = (geom.N, geom.C, len(geom.spatial))
    if dk.shape != expected:
        raise ValueError(f"d_keypoints: shape {dk.shape} does not match; expected {expected}, "
                         f"(N, C, ndim) of x")
    return dk
