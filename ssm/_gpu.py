"""GPU backend of ssm: the CUDA kernels of ssm/cuda/*.cu, loaded as CuPy RawModules.

One backend, two drivers: everything here (launch configuration, argument packing, module
and instantiation names, final passes, no host synchronisation) runs unchanged on CuPy and
on the simulator, ssm.testing.cudasim. The driver is the array module of the arrays
(``_validation.array_module``: ``cupy``, or ``cudasim`` for simulated arrays, which offers
the same ``RawModule``, ``cuda.Device``, ``empty``, ``zeros``, ``full`` and ``asarray``):
only allocation, compilation, launch and reading back differ.

Design
------
- Python (ssm/_api.py) has validated and normalised everything and hands over one
  ``ssm._problem.Problem``: arrays C-contiguous device arrays of one library on one device,
  of the right dtype and shape, outputs allocated, the shape given as (outer, C, inner).
  Nothing here checks; nothing here raises.
- The same entry points as the CPU backend (ssm/_cpu.pyx): ``run(op, problem, threads)``
  (every kernel that walks the logits), ``run_loss`` (a loss pass and its reduced loss),
  ``run_checked`` (a loss pass with the label pre-pass in it where it can be) and
  ``stats(problem, threads)`` (the label pre-pass), plus ``loss_value`` (a reduced loss as
  a 0-d array of the logits' dtype), and ``positions(op, problem, threads)`` for softmax
  over positions (positions.cu, an ``ssm._problem.PositionsProblem``). ``threads`` is a
  CPU notion, accepted and ignored.
- Arguments: one builder per kernel (``softmax_fwd_args`` ...), each beside the kernel
  signature it mirrors; tests/test_contract.py checks them against the .cu text.
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
from importlib import resources

import numpy as np

from . import _validation as V
from ._codes import LOSS_OPS, Op, PosOp, Target

BLOCK = 256      # threads per block; must match SSM_BLOCK in ssm/cuda/common.cuh
WARP = 32        # threads per row in the contiguous-rows shape (kernel argument `group`)
MAX_GRID = 4096  # most blocks per launch (grid-stride loops beyond): ~4 waves on an H100
SMALL_ROW = 4    # rows of at most this many classes get a thread each, not a warp
OPTIONS = ("--std=c++17",)
# What CuPy adds to OPTIONS when it compiles (besides -arch): float denormals flush to
# zero in the kernels, so results below FLT_MIN (1.2e-38) are 0 where the CPU's are not.
CUPY_ADDED_OPTIONS = ("-ftz=true",)
CUDA_FILES = ("softmax.cu", "sswl.cu", "positions.cu")

# C++ spelling of each dtype the kernels are instantiated for, by dtype name (bfloat16 is
# ml_dtypes'; ssm_half and ssm_bf16: common.cuh).
FLOAT_CTYPES = {"float16": "ssm_half", "bfloat16": "ssm_bf16", "float32": "float",
                "float64": "double"}
_CTYPES_BY_DTYPE = {}  # FLOAT_CTYPES by dtype, filled on first sight of each (see _ctype)


def _ctype(dtype) -> str:
    """FLOAT_CTYPES' entry for a float dtype (a dtype's name costs microseconds a call)."""
    t = _CTYPES_BY_DTYPE.get(dtype)
    if t is None:
        t = _CTYPES_BY_DTYPE[dtype] = FLOAT_CTYPES[dtype.name]
    return t


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
    return [FLOAT_CTYPES[d.name] for d in V.FLOAT_DTYPES["cuda"]]


def _target_ctypes(float_ctype):
    """Label types, then the float type itself (soft targets)."""
    return [LABEL_CTYPES[d] for d in V.LABEL_KINDS] + [float_ctype]


def module_names(filename: str, float_ctype=None, target_ctype=None) -> tuple:
    """The instantiations of one module: what one launch may need, compiled together.

    softmax.cu and positions.cu: one module per float type. sswl.cu: one per (float type,
    target type) with the label pre-pass, loss and gradient kernels; and one (no types
    given) with the final passes. A first call compiles a few kernels (about a second), not all.
    """
    if filename == "softmax.cu":
        return (f"softmax_fwd<{float_ctype}>", f"softmax_bwd<{float_ctype}>")
    if filename == "positions.cu":
        t = float_ctype
        return (f"pos_softmax_fwd<{t}>", f"pos_softmax_bwd<{t}>", f"pos_expect<{t}>")
    if filename == "sswl.cu" and float_ctype is None:
        reduce_types = _float_ctypes() + ["double"]
        return tuple(f"reduce_partials<{t}>" for t in dict.fromkeys(reduce_types)) \
            + ("reduce_stats",) + tuple(f"reduce_loss_stats<{t}>" for t in _float_ctypes())
    if filename == "sswl.cu":
        t, lab = float_ctype, target_ctype
        return (f"sswl_stats<{t}, {lab}>", f"sswl_fwd<{t}, {lab}>", f"sswl_bwd<{t}, {lab}>")
    raise ValueError(f"filename: {filename!r} is not one of {', '.join(CUDA_FILES)}")


def _module_keys(filename: str):
    if filename in ("softmax.cu", "positions.cu"):
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


def _final_sum(xp, partials, n, divisor, out, device_id):
    """out[()] = sum(partials[:n]) / divisor (0 when it is 0): the fixed-order final pass.
    ``divisor``: a number or a 0-d float64 device array."""
    t = _ctype(out.dtype)
    _launch(xp, _FINAL, f"reduce_partials<{t}>", 1,
            reduce_partials_args(partials, n, divisor, out), device_id)


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


def _scalar_or_ptr(v):
    """(value by value, device pointer) for a number or a 0-d float64 device array."""
    if isinstance(v, (int, float, np.generic)):
        return np.float64(v), _NULL
    return np.float64(1.0), v


def _target_ctype(problem, float_ctype):
    if problem.kind == Target.SOFT:
        return float_ctype
    return LABEL_CTYPES[problem.target.dtype]


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


# ---- one argument builder per kernel ----------------------------------------------------------
# Each returns the kernel's arguments in the order of its signature in ssm/cuda/, quoted
# above it (T: the float type, L: the target type). tests/test_contract.py parses the .cu
# signatures and checks every builder's arity, scalar types and pointer dtypes against
# them: CuPy passes whatever it is given, by position, and does not check.


def _shape(problem, group):
    g = problem.geom
    return (np.int64(g.outer), np.int32(g.C), np.int64(g.inner), np.int32(group))


# softmax_fwd(const T* x, T* out, long long outer, int C, long long inner, int group,
#             int logspace)
def softmax_fwd_args(problem, group, logspace):
    return (problem.x, problem.out, *_shape(problem, group), np.int32(logspace))


# softmax_bwd(const T* prob, const T* dprob, T* out, long long outer, int C, long long inner,
#             int group)
def softmax_bwd_args(problem, group):
    return (problem.x, problem.dprob, problem.out, *_shape(problem, group))


# sswl_stats(const L* target, const T* w, const T* cw, long long npix, int C,
#            long long ignore_index, double* norm_partials, long long* bad_partials)
def sswl_stats_args(problem, cw, norm_partials, bad_partials):
    g = problem.geom
    return (problem.target, _p(problem.weights), _p(cw), np.int64(g.outer * g.inner),
            np.int32(g.C), np.int64(problem.ignore_index), norm_partials, bad_partials)


def _loss_inputs(problem, group, cw, lens):
    """The parameters sswl_fwd and sswl_bwd share, from the logits to the smoothing."""
    return (problem.x, problem.target, _p(problem.weights), _p(cw), _p(lens),
            _p(problem.d_loss_map), *_shape(problem, group), np.int64(problem.ignore_index),
            np.float64(problem.smoothing))


def _grad_scale(problem):
    """(d_loss, d_loss_ptr, divisor, divisor_ptr): see grad_scale in sswl.cu."""
    return (*_scalar_or_ptr(problem.d_loss), *_scalar_or_ptr(problem.divisor))


# sswl_fwd(const T* x, const L* target, const T* w, const T* cw, const T* lens,
#          const T* d_loss_map, long long outer, int C, long long inner, int group,
#          long long ignore_index, double smoothing, double loss_cap, int want_grad,
#          int loss, double d_loss, const double* d_loss_ptr, double divisor,
#          const double* divisor_ptr, T* out, T* out2, T* loss_map, double* partials,
#          double* norm_partials, long long* bad_partials)
def sswl_fwd_args(problem, group, cw, lens, want_grad, partials, norm_partials=None,
                  bad_partials=None):
    return (*_loss_inputs(problem, group, cw, lens), np.float64(problem.loss_cap),
            np.int32(want_grad), np.int32(problem.loss), *_grad_scale(problem),
            _p(problem.out), _p(problem.prob_out), _p(problem.loss_map), _p(partials),
            _p(norm_partials), _p(bad_partials))


# sswl_bwd(const T* prob, const L* target, const T* w, const T* cw, const T* lens,
#          const T* d_loss_map, long long outer, int C, long long inner, int group,
#          long long ignore_index, double smoothing, double d_loss, const double* d_loss_ptr,
#          double divisor, const double* divisor_ptr, T* out)
def sswl_bwd_args(problem, group, cw, lens):
    return (*_loss_inputs(problem, group, cw, lens), *_grad_scale(problem), problem.out)


# reduce_partials(const double* partials, long long n, double div, const double* div_ptr,
#                 T* out)
def reduce_partials_args(partials, n, divisor, out):
    return (partials, np.int64(n), *_scalar_or_ptr(divisor), out)


# reduce_loss_stats(const double* loss_partials, const double* norm_partials,
#                   const long long* bad_partials, long long n, int use_norm, double div,
#                   const double* div_ptr, T* out, long long* bad)
def reduce_loss_stats_args(loss_partials, norm_partials, bad_partials, n, divisor, out, bad):
    use_norm = isinstance(divisor, str)  # "mean"
    return (_p(loss_partials), norm_partials, bad_partials, np.int64(n), np.int32(use_norm),
            *_scalar_or_ptr(1.0 if use_norm or divisor is None else divisor), _p(out), bad)


# reduce_stats(const double* norm_partials, const long long* bad_partials, long long n,
#              double* norm, long long* bad)
def reduce_stats_args(norm_partials, bad_partials, n, norm, bad):
    return (norm_partials, bad_partials, np.int64(n), norm, bad)


# Softmax over positions (positions.cu): `problem` is an ssm._problem.PositionsProblem.

def _pos_shape(problem, group):
    g = problem.geom
    return (np.int64(g.outer), np.int32(g.L), np.int64(g.inner), np.int32(g.C),
            np.int32(group))


# pos_softmax_fwd(const T* x, const double* temp, T* out, long long outer, int L,
#                 long long inner, int C, int group)
def pos_softmax_fwd_args(problem, group):
    return (problem.x, problem.temperature, problem.out, *_pos_shape(problem, group))


# pos_softmax_bwd(const T* prob, const T* dprob, const double* temp, T* out, double* dtemp,
#                 long long outer, int L, long long inner, int C, int group)
def pos_softmax_bwd_args(problem, group):
    return (problem.x, problem.dprob, problem.temperature, problem.out,
            _p(problem.d_temperature), *_pos_shape(problem, group))


# pos_expect(const T* x, const double* grid, const double* temp, const T* dkp, T* out,
#            T* kp, T* var, double* dtemp, long long outer, int L, long long inner, int C,
#            int D, int s0, int s1, int group, int from_prob, int want_grad)
def pos_expect_args(problem, group, want_grad):
    g = problem.geom
    sizes = problem.grid_sizes  # per-axis tables of a built-in grid: (s0, s1, ...), D <= 3
    D = problem.grid.shape[0] if sizes is None else len(sizes)
    s0, s1 = (0, 0) if sizes is None else (tuple(sizes) + (1,))[:2]
    return (problem.x, problem.grid, problem.temperature, _p(problem.d_keypoints),
            _p(problem.out), _p(problem.keypoints), _p(problem.variance),
            _p(problem.d_temperature), np.int64(g.outer), np.int32(g.L), np.int64(g.inner),
            np.int32(g.C), np.int32(D), np.int32(s0), np.int32(s1), np.int32(group),
            np.int32(problem.from_prob), np.int32(want_grad))


# kernel name -> its builder (for the test)
ARGUMENT_BUILDERS = {
    "softmax_fwd": softmax_fwd_args, "softmax_bwd": softmax_bwd_args,
    "sswl_stats": sswl_stats_args, "sswl_fwd": sswl_fwd_args, "sswl_bwd": sswl_bwd_args,
    "reduce_partials": reduce_partials_args, "reduce_stats": reduce_stats_args,
    "reduce_loss_stats": reduce_loss_stats_args,
    "pos_softmax_fwd": pos_softmax_fwd_args, "pos_softmax_bwd": pos_softmax_bwd_args,
    "pos_expect": pos_expect_args,
}


# ---- entry points ---------------------------------------------------------------------------


def run(op, problem, threads=None):
    """Run kernel pass `op` (an ssm._codes.Op) over `problem` (an ssm._problem.Problem) on
    x's device and current stream.

    ``threads`` is a CPU notion, accepted and ignored. ``problem.d_loss`` and
    ``problem.divisor`` may each be a number or a 0-d float64 device array (d_loss and the
    "mean" normaliser need never come to the host). Returns the loss sum as a 0-d float64
    device array for SSWL_FWD and SSWL_FWD_BWD, 0.0 for the other ops (as the CPU backend).
    """
    x = problem.x
    xp = V.array_module(x)
    g = problem.geom
    with x.device:
        dev = x.device.id
        n_pixels = g.outer * g.inner
        if n_pixels == 0:
            return xp.zeros((), np.float64) if op in LOSS_OPS else 0.0
        group, grid = launch_config(n_pixels, g.C, g.inner)
        t = _ctype(x.dtype)
        if op in (Op.SOFTMAX, Op.LOG_SOFTMAX):
            _launch(xp, ("softmax.cu", t, None), f"softmax_fwd<{t}>", grid,
                    softmax_fwd_args(problem, group, op == Op.LOG_SOFTMAX), dev)
            return 0.0
        if op == Op.SOFTMAX_BWD:
            _launch(xp, ("softmax.cu", t, None), f"softmax_bwd<{t}>", grid,
                    softmax_bwd_args(problem, group), dev)
            return 0.0

        if op == Op.SSWL_BWD:
            lab = _target_ctype(problem, t)
            _launch(xp, ("sswl.cu", t, lab), f"sswl_bwd<{t}, {lab}>", grid,
                    sswl_bwd_args(problem, group, small_array(xp, problem.class_weights, dev),
                                  small_array(xp, problem.lens, dev)), dev)
            return 0.0
        total = xp.empty((), np.float64)
        _loss_pass(xp, op, problem, group, grid, dev, 1.0, total)
        return total


def _launch_loss_pass(xp, op, problem, group, grid, dev, partials, norm_partials=None,
                      bad_partials=None):
    """Launch sswl_fwd for the loss pass `op` (SSWL_FWD, SSWL_FWD_BWD) on x's device, with
    its per-block loss sums in `partials` and the label pre-pass's in `norm_partials` and
    `bad_partials` (each None for none)."""
    t = _ctype(problem.x.dtype)
    lab = _target_ctype(problem, t)
    _launch(xp, ("sswl.cu", t, lab), f"sswl_fwd<{t}, {lab}>", grid,
            sswl_fwd_args(problem, group, small_array(xp, problem.class_weights, dev),
                          small_array(xp, problem.lens, dev), op == Op.SSWL_FWD_BWD,
                          partials, norm_partials, bad_partials), dev)


def _loss_pass(xp, op, problem, group, grid, dev, divisor, out):
    """Launch the loss pass `op`, then (if `out`) the final pass: out[()] = its loss sum /
    divisor, rounded once to out's dtype."""
    partials = xp.empty(grid, np.float64) if out is not None else None
    _launch_loss_pass(xp, op, problem, group, grid, dev, partials)
    if out is not None:
        _final_sum(xp, partials, grid, divisor, out, dev)


def run_loss(op, problem, threads=None, divisor=None):
    """The loss pass `op` (SSWL_FWD or SSWL_FWD_BWD) and its reduced loss: the loss sum /
    `divisor` (a number or a 0-d float64 device array; 0 when it is 0) as a 0-d array of
    x's dtype, from one final launch; with ``divisor=None`` (reduction "none") no sums at
    all, and None. The same bits as ``loss_value(run(op, problem), divisor, dtype)``, with
    one launch fewer: that sum divided by 1 is the sum itself.
    """
    x = problem.x
    xp = V.array_module(x)
    g = problem.geom
    with x.device:
        dev = x.device.id
        value = None if divisor is None else xp.empty((), x.dtype)
        n_pixels = g.outer * g.inner
        if n_pixels == 0:
            if value is not None:
                _final_sum(xp, xp.zeros(1, np.float64), 1, divisor, value, dev)
            return value
        group, grid = launch_config(n_pixels, g.C, g.inner)
        _loss_pass(xp, op, problem, group, grid, dev, divisor, value)
        return value


def stats(problem, threads=None):
    """Label pre-pass on x's device: (sum of n_p, lowest flat index of a bad label or -1).

    Both are 0-d device arrays (float64, int64); nothing is read to the host. Reading the
    index (``int(bad)``) is the one synchronisation, for the caller to do when validating.
    """
    x = problem.x
    xp = V.array_module(x)
    g = problem.geom
    with x.device:
        dev = x.device.id
        n_pixels = g.outer * g.inner
        if n_pixels == 0:
            return xp.zeros((), np.float64), xp.full((), -1, np.int64)
        _, grid = launch_config(n_pixels, g.C, g.inner, logits=False)
        t = _ctype(x.dtype)
        lab = _target_ctype(problem, t)
        norm_partials = xp.empty(grid, np.float64)
        bad_partials = xp.empty(grid, np.int64)
        cw = small_array(xp, problem.class_weights, dev)
        _launch(xp, ("sswl.cu", t, lab), f"sswl_stats<{t}, {lab}>", grid,
                sswl_stats_args(problem, cw, norm_partials, bad_partials), dev)
        norm = xp.empty((), np.float64)
        bad = xp.empty((), np.int64)
        _launch(xp, _FINAL, "reduce_stats", 1,
                reduce_stats_args(norm_partials, bad_partials, grid, norm, bad), dev)
        return norm, bad


def run_checked(op, problem, threads=None, divisor=None):
    """Loss pass `op` (SSWL_FWD, SSWL_FWD_BWD) with the label pre-pass: (the reduced loss
    as a 0-d array of x's dtype, or None; the lowest flat index of a bad label or -1, a
    0-d int64 device array). `divisor`: a number, "mean" (the normaliser) or None (no loss
    sums: reduction "none"). A bad label's pixel is NaN, never an index: the caller raises
    after the pass. The same bits as ``stats`` then ``run_loss`` (its normaliser for
    "mean").

    Where a thread owns a pixel (group 1: strided channels, rows of a few classes) the
    pre-pass rides in the loss pass, whose walk is then sswl_stats' on the same grid (the
    same partials), and one final launch reduces the three sums: two launches in all.
    Elsewhere sswl_stats goes first (its walk differs, and so would the normaliser's bits
    from every other call's).
    """
    x = problem.x
    xp = V.array_module(x)
    g = problem.geom
    n_pixels = g.outer * g.inner
    group, grid = launch_config(max(n_pixels, 1), g.C, g.inner)
    if n_pixels == 0 or group != 1:
        norm, bad = stats(problem, threads)
        return run_loss(op, problem, threads, norm if isinstance(divisor, str) else divisor), bad
    with x.device:
        dev = x.device.id
        partials = xp.empty(grid, np.float64) if divisor is not None else None
        norm_partials = xp.empty(grid, np.float64)
        bad_partials = xp.empty(grid, np.int64)
        _launch_loss_pass(xp, op, problem, group, grid, dev, partials, norm_partials,
                          bad_partials)
        value = xp.empty((), x.dtype) if divisor is not None else None
        bad = xp.empty((), np.int64)
        _launch(xp, _FINAL, f"reduce_loss_stats<{_ctype(x.dtype)}>", 1,
                reduce_loss_stats_args(partials, norm_partials, bad_partials, grid, divisor,
                                       value, bad), dev)
        return value, bad


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
        _final_sum(xp, total, 1, divisor, out, total.device.id)
        return out


@functools.lru_cache(maxsize=32)
def _grid_on_device(xp, data: bytes, shape: tuple, device_id: int):
    with xp.cuda.Device(device_id):
        return xp.asarray(np.frombuffer(data, dtype=np.float64).reshape(shape))


def device_grid(xp, grid, device_id: int):
    """A float64 coordinate table on the device (a caller's (D, L) grid, or the per-axis
    tables of a built-in one), memoised by value (the built-in tables are themselves
    memoised, so a call copies nothing after the first)."""
    return _grid_on_device(xp, grid.tobytes(), grid.shape, device_id)


def positions(op, problem, threads=None):
    """Run positions pass `op` (an ssm._codes.PosOp) over `problem` (an
    ssm._problem.PositionsProblem) on x's device and current stream. ``threads`` is
    accepted and ignored."""
    x = problem.x
    xp = V.array_module(x)
    g = problem.geom
    with x.device:
        dev = x.device.id
        if g.rows == 0:
            return None
        group, grid = launch_config(g.rows, g.L, g.inner)
        t = _ctype(x.dtype)
        module = ("positions.cu", t, None)
        if op == PosOp.SOFTMAX:
            _launch(xp, module, f"pos_softmax_fwd<{t}>", grid,
                    pos_softmax_fwd_args(problem, group), dev)
        elif op == PosOp.SOFTMAX_BWD:
            _launch(xp, module, f"pos_softmax_bwd<{t}>", grid,
                    pos_softmax_bwd_args(problem, group), dev)
        else:
            _launch(xp, module, f"pos_expect<{t}>", grid,
                    pos_expect_args(problem, group, op == PosOp.EXPECT_BWD), dev)
        return None
