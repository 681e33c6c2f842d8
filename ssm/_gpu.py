"""GPU backend of ssm: the CUDA kernels of ssm/cuda/*.cu, loaded as CuPy RawModules.

One backend, two drivers: everything here (launch configuration, argument packing, module
and instantiation names, final passes, no host synchronisation) runs unchanged on CuPy and
on the simulator, ssm.testing.cudasim. The driver is the array module of the arrays
(``_validation.array_module``: ``cupy``, or ``cudasim`` for simulated arrays, which offers
the same ``RawModule``, ``cuda.Device``, ``empty``, ``zeros``, ``full`` and ``asarray``):
only allocation, compilation, launch and reading back differ.

Design
------
- Python (ssm/_api.py) has validated and normalised everything: arrays are C-contiguous
  device arrays of one library on one device, of the right dtype and shape, outputs
  allocated, and the shape is given as (outer, C, inner). Nothing here checks; nothing here raises.
- The same entry points as the CPU backend (ssm/_cpu.pyx): ``run`` (every kernel that
  walks the logits) and ``stats`` (the label pre-pass), plus ``loss_value`` (the reduced
  loss as a 0-d array of the logits' dtype). ``tile``, ``n_threads`` and ``stream`` are
  CPU notions, accepted and ignored.
- Modules: ``RawModule`` objects memoised per (driver, .cu file, dtypes, device), compiled by
  NVRTC on first use (and cached on disk by CuPy), with the C++ template instantiations
  named by ``name_expressions``, generated from the dtype tables of ssm/_validation.py
  (the simulator compiles the same text and names with the host compiler).
  A module holds one dtype combination's kernels (``module_names``): a first call
  compiles a handful of kernels, not all 46. common.cuh is inlined into the source
  text, so CuPy's cache keys on all of it.
- Launches: on the device that holds ``x`` and on that device's current CuPy stream;
  launch sizes are chosen in ``launch_config`` only, from the shape only, so per-block
  partial sums and their fixed-order final pass give the same bits run to run.
- No host synchronisation: sums, the "mean" normaliser, the gradient scale and the first
  bad label index stay on the device; the caller reads the bad index to the host only
  when it validates labels.
"""
from __future__ import annotations

import functools
import math
from importlib import resources

import numpy as np

from . import _validation as V

# kernel selectors; must match the values in ssm/_cpu.pyx
SOFTMAX = 0
LOG_SOFTMAX = 1
SOFTMAX_BWD = 2
SSWL_FWD = 3
SSWL_FWD_BWD = 4
SSWL_BWD = 5

BLOCK = 256      # threads per block; must match SSM_BLOCK in ssm/cuda/common.cuh
WARP = 32        # threads per row in the contiguous-rows shape (kernel argument `group`)
MAX_GRID = 4096  # most blocks per launch (grid-stride loops beyond): ~4 waves on an H100
SMALL_ROW = 4    # rows of at most this many classes get a thread each, not a warp
OPTIONS = ("--std=c++17",)
# What CuPy adds to OPTIONS when it compiles (besides -arch): float denormals flush to
# zero in the kernels, so results below FLT_MIN (1.2e-38) are 0 where the CPU's are not.
CUPY_ADDED_OPTIONS = ("-ftz=true",)
CUDA_FILES = ("softmax.cu", "sswl.cu")

# C++ spelling of each dtype the kernels are instantiated for (ssm_half: common.cuh).
FLOAT_CTYPES = {np.dtype(np.float16): "ssm_half", np.dtype(np.float32): "float",
                np.dtype(np.float64): "double"}
LABEL_CTYPES = {np.dtype(np.uint8): "unsigned char", np.dtype(np.int32): "int",
                np.dtype(np.int64): "long long"}

_NULL = np.uint64(0)  # a null device pointer, passed by value (8 bytes)


# ---- sources and names ------------------------------------------------------------


def source(filename: str) -> str:
    """The text of ssm/cuda/<filename> with ``#include "common.cuh"`` inlined."""
    folder = resources.files("ssm").joinpath("cuda")
    text = folder.joinpath(filename).read_text()
    common = folder.joinpath("common.cuh").read_text()
    return text.replace('#include "common.cuh"', common, 1)


def _float_ctypes():
    return [FLOAT_CTYPES[d] for d in V.FLOAT_DTYPES["cuda"]]


def _target_ctypes(float_ctype):
    """Label types, then the float type itself (soft targets)."""
    return [LABEL_CTYPES[d] for d in V.LABEL_KINDS] + [float_ctype]


def module_names(filename: str, float_ctype=None, target_ctype=None) -> tuple:
    """The instantiations of one module: what one launch may need, compiled together.

    softmax.cu: one module per float type. sswl.cu: one per (float type, target type)
    with the label pre-pass, loss and gradient kernels; and one (no types given) with
    the final passes. A first call compiles a few kernels (about a second), not all.
    """
    if filename == "softmax.cu":
        return (f"softmax_fwd<{float_ctype}>", f"softmax_bwd<{float_ctype}>")
    if filename == "sswl.cu" and float_ctype is None:
        reduce_types = _float_ctypes() + ["double"]
        return tuple(f"reduce_partials<{t}>" for t in dict.fromkeys(reduce_types)) \
            + ("reduce_first_bad",)
    if filename == "sswl.cu":
        t, lab = float_ctype, target_ctype
        return (f"sswl_stats<{t}, {lab}>", f"sswl_fwd<{t}, {lab}>", f"sswl_bwd<{t}, {lab}>")
    raise ValueError(f"filename: {filename!r} is not one of {', '.join(CUDA_FILES)}")


def _module_keys(filename: str):
    if filename == "softmax.cu":
        return [(t, None) for t in _float_ctypes()]
    return [(None, None)] + [(t, lab) for t in _float_ctypes() for lab in _target_ctypes(t)]


def name_expressions(filename: str) -> list:
    """Every instantiation of ssm/cuda/<filename> that ``run``/``stats`` may launch, in all
    of its modules (generated from the dtype tables of ssm/_validation.py)."""
    names = []
    for key in _module_keys(filename):
        names += module_names(filename, *key)
    return names


# ---- modules ----------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _module(xp, filename: str, float_ctype, target_ctype, device_id: int):
    """One RawModule of driver `xp` for one device (compiled on its first launch)."""
    with xp.cuda.Device(device_id):
        return xp.RawModule(code=source(filename), options=OPTIONS,
                            name_expressions=module_names(filename, float_ctype, target_ctype))


@functools.lru_cache(maxsize=None)
def _function(xp, filename: str, float_ctype, target_ctype, name: str, device_id: int):
    with xp.cuda.Device(device_id):
        return _module(xp, filename, float_ctype, target_ctype, device_id).get_function(name)


def _launch(xp, module, name, grid, args, device_id):
    """Launch kernel `name` of `module` (filename, float type, target type) with `grid`
    blocks of BLOCK threads on the current stream."""
    _function(xp, *module, name, device_id)((grid,), (BLOCK,), args)


def _final_sum(xp, partials, n, div, div_ptr, out, device_id):
    """out[()] = sum(partials[:n]) / divisor (0 when it is 0): the fixed-order final pass."""
    t = FLOAT_CTYPES[out.dtype]
    _launch(xp, _FINAL, f"reduce_partials<{t}>", 1, (partials, np.int64(n), div, div_ptr, out),
            device_id)


_FINAL = ("sswl.cu", None, None)


def launch_config(n_pixels: int, C: int, inner: int, *, logits: bool = True):
    """(group, blocks) for a problem: the only place launch sizes are chosen.

    ``group`` threads own a pixel. Strided channels (inner > 1) and short rows: a thread
    per pixel (1); longer contiguous rows: a warp per row (WARP). The label pre-pass
    reads no logits (``logits=False``): a thread per pixel. Blocks of BLOCK threads;
    the grid depends only on the shape.
    """
    group = WARP if logits and inner == 1 and C > SMALL_ROW else 1
    per_block = BLOCK // group
    blocks = -(-n_pixels // per_block)
    return group, max(1, min(blocks, MAX_GRID))


# ---- argument helpers ---------------------------------------------------------------------


def _p(a):
    """A kernel pointer argument: the array, or a null pointer for None."""
    return _NULL if a is None else a


def _scalar_or_ptr(v, default):
    """(value by value, device pointer) for a number or a 0-d float64 device array."""
    if v is None:
        return np.float64(default), _NULL
    if isinstance(v, (int, float, np.generic)):
        return np.float64(v), _NULL
    return np.float64(default), v


def _target_ctype(target, target_kind, float_ctype):
    return float_ctype if target_kind == V.SOFT_KIND else LABEL_CTYPES[target.dtype]


@functools.lru_cache(maxsize=64)
def _small_on_device(xp, data: bytes, dtype: str, shape: tuple, device_id: int):
    with xp.cuda.Device(device_id):
        return xp.asarray(np.frombuffer(data, dtype=dtype).reshape(shape))


def small_array(xp, a, device_id: int):
    """A small host parameter array (class weights, lens) on the device.

    Memoised by value: the host-to-device copy (which waits for the stream) happens the
    first time a given array is used, never again. Device arrays are returned as they are.
    """
    if a is None or not isinstance(a, np.ndarray):
        return a
    return _small_on_device(xp, a.tobytes(), a.dtype.str, a.shape, device_id)


# ---- entry points ---------------------------------------------------------------------------


def run(op, x, out, outer, C, inner, tile, n_threads, *, x2=None, target=None,
        target_kind=0, ignore_index=-1, w=None, cw=None, lens=None, smoothing=0.0,
        loss_cap=math.inf, g=None, g_scale=1.0, g_norm=None, out2=None, loss_map=None,
        stream=False):
    """Run kernel `op` over the (outer, C, inner) problem on x's device and current stream.

    Same arguments as ``ssm._cpu.run`` (device arrays in place of NumPy ones; ``tile``,
    ``n_threads`` and ``stream`` are ignored), plus ``g_norm``: the gradient scale is
    ``g_scale / g_norm`` (0 when ``g_norm`` is 0), where ``g_scale`` and ``g_norm`` may each
    be a number or a 0-d float64 device array (d_loss and the "mean" normaliser need
    never come to the host). Returns the loss sum as a 0-d float64 device array for
    SSWL_FWD and SSWL_FWD_BWD, 0.0 for the other ops (as the CPU backend).
    """
    xp = V.array_module(x)
    with x.device:
        dev = x.device.id
        n_pixels = outer * inner
        has_loss = op in (SSWL_FWD, SSWL_FWD_BWD)
        if n_pixels == 0:
            return xp.zeros((), np.float64) if has_loss else 0.0
        group, grid = launch_config(n_pixels, C, inner)
        t = FLOAT_CTYPES[x.dtype]
        shape = (np.int64(outer), np.int32(C), np.int64(inner), np.int32(group))
        if op in (SOFTMAX, LOG_SOFTMAX):
            _launch(xp, ("softmax.cu", t, None), f"softmax_fwd<{t}>", grid,
                    (x, out, *shape, np.int32(op == LOG_SOFTMAX)), dev)
            return 0.0
        if op == SOFTMAX_BWD:
            _launch(xp, ("softmax.cu", t, None), f"softmax_bwd<{t}>", grid, (x, x2, out, *shape),
                    dev)
            return 0.0

        lab = _target_ctype(target, target_kind, t)
        module = ("sswl.cu", t, lab)
        g_val, g_ptr = _scalar_or_ptr(g_scale, 1.0)
        div_val, div_ptr = _scalar_or_ptr(g_norm, 1.0)
        common = (x, target, _p(w), _p(small_array(xp, cw, dev)), _p(small_array(xp, lens, dev)),
                  _p(g),
                  *shape, np.int64(ignore_index), np.float64(smoothing))
        grad = (g_val, g_ptr, div_val, div_ptr)
        if op == SSWL_BWD:
            _launch(xp, module, f"sswl_bwd<{t}, {lab}>", grid, (*common, *grad, out), dev)
            return 0.0
        partials = xp.empty(grid, np.float64)
        _launch(xp, module, f"sswl_fwd<{t}, {lab}>", grid,
                (*common, np.float64(loss_cap), np.int32(op == SSWL_FWD_BWD), *grad, out,
                 _p(out2), _p(loss_map), partials), dev)
        total = xp.empty((), np.float64)
        _final_sum(xp, partials, grid, np.float64(1.0), _NULL, total, dev)
        return total


def stats(x, target, target_kind, ignore_index, w, cw, outer, C, inner, tile, n_threads):
    """Label pre-pass on x's device: (sum of n_p, lowest flat index of a bad label or -1).

    Both are 0-d device arrays (float64, int64); nothing is read to the host. Reading the
    index (``int(bad)``) is the one synchronisation, for the caller to do when validating.
    """
    xp = V.array_module(x)
    with x.device:
        dev = x.device.id
        n_pixels = outer * inner
        if n_pixels == 0:
            return xp.zeros((), np.float64), xp.full((), -1, np.int64)
        _, grid = launch_config(n_pixels, C, inner, logits=False)
        t = FLOAT_CTYPES[x.dtype]
        lab = _target_ctype(target, target_kind, t)
        norm_partials = xp.empty(grid, np.float64)
        bad_partials = xp.empty(grid, np.int64)
        _launch(xp, ("sswl.cu", t, lab), f"sswl_stats<{t}, {lab}>", grid,
                (target, _p(w), _p(small_array(xp, cw, dev)), np.int64(n_pixels), np.int32(C),
                 np.int64(ignore_index), norm_partials, bad_partials), dev)
        norm = xp.empty((), np.float64)
        bad = xp.empty((), np.int64)
        _final_sum(xp, norm_partials, grid, np.float64(1.0), _NULL, norm, dev)
        _launch(xp, _FINAL, "reduce_first_bad", 1, (bad_partials, np.int64(grid), bad), dev)
        return norm, bad


def loss_value(total, divisor, dtype):
    """``total / divisor`` (0 when the divisor is 0) as a 0-d device array of ``dtype``.

    ``total`` is ``run``'s 0-d float64 sum; ``divisor`` a number or a 0-d float64 device
    array (the "mean" normaliser from ``stats``). One tiny kernel, no synchronisation:
    the same rule and the same single rounding as the CPU path's
    ``np.asarray(total / divisor if divisor != 0 else 0.0, dtype)``.
    """
    xp = V.array_module(total)
    with total.device:
        out = xp.empty((), dtype)
        div_val, div_ptr = _scalar_or_ptr(divisor, 1.0)
        _final_sum(xp, total, 1, div_val, div_ptr, out, total.device.id)
        return out
