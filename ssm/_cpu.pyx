# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""CPU backend of ssm: OpenMP threads over the C tile kernels of _kernels.h.

Design
------
- Python (ssm/_api.py) has validated and normalised everything and hands over one
  ``ssm._problem.Problem``: arrays C-contiguous, of the right dtype and shape, outputs
  allocated, the shape given as (outer, C, inner). Nothing here checks; nothing here
  raises except MemoryError for the per-thread scratch (and OSError when threads cannot
  start). The tuning is this backend's: tile size and streamed stores (below).
- One entry point per pass: ``run`` (every kernel that walks the logits) and
  ``stats`` (the label pre-pass: normaliser and first bad label). Each is a
  ``prange`` over tiles with the GIL released and a per-thread scratch block
  malloc'ed inside the parallel region. ``run_with_stats`` is both in one pass, for
  a loss pass whose outputs are the call's own (the loss alone, the forward without
  ``out=``: nothing the caller sees needs the labels checked first; ``run_checked``):
  each tile's labels are counted and checked as the tile is staged (ssm_tile_stats), so
  the labels come from DRAM once and one team is woken instead of two. ``run_loss`` and
  ``run_checked`` also reduce the loss (``loss_value``), as the GPU backend's do.
- Scheduling is dynamic, in chunks of about 1/16 of a thread's share of tiles:
  long enough runs of adjacent tiles for the prefetchers, and when another
  process takes a core from one thread the others take over its chunks instead of
  waiting for it at the barrier (static: VOC fused, 2 threads beside a busy
  process, 17.7-46.7 ms; dynamic: 13.0-15.6 ms; the same when idle).
- Determinism: every tile writes its float64 partial sum into its own slot;
  slots are added in tile order after the parallel region. The tile partition
  depends on the shape only, so sums are bit-identical for any thread count.
- Threads arrive as ``(count, adaptive)`` (ssm/_threads.py). A team larger than the
  calling thread has had is first shown to start (_threads.h): libgomp would end the
  process where thread creation fails; here the call raises OSError. With
  ``adaptive`` (``threads=None``), a call whose threads finished far apart (another
  process held a core) makes the next calls use only the threads that were on time,
  for a while (``_learn``): a team waits at its end for its slowest thread, and a
  thread that has lost its core comes back only when the scheduler gives it one.
"""
cimport numpy as cnp
cimport openmp
from cython.parallel cimport parallel, prange
from libc.stdlib cimport free, malloc
from libc.string cimport memset

import math
import os

import numpy as np

from ._problem import Problem
from ._rounding import round_once

cnp.import_array()

cdef extern from "_threads.h" nogil:
    int ssm_team_can_start(int n, size_t stack_bytes, int *err, int *grew)

# kernel selectors: the values of ssm._codes.Op (kernel_codes() and a test tie them)
cdef enum:
    OP_SOFTMAX = 0
    OP_LOG_SOFTMAX = 1
    OP_SOFTMAX_BWD = 2
    OP_SSWL_FWD = 3
    OP_SSWL_FWD_BWD = 4
    OP_SSWL_BWD = 5


def omp_max_threads():
    """OpenMP's default team size for the calling thread (honours OMP_NUM_THREADS)."""
    return openmp.omp_get_max_threads()


def compiler():
    """The C compiler the extension was built with."""
    return ssm_compiler().decode()


def build_flags():
    """The compile and link flags setup.py built the extension with."""
    return ssm_build_flags().decode()


def simd_path():
    """The code path the loader picked for this CPU (target_clones)."""
    return ssm_simd_path().decode()


cdef inline const void *_ptr(object a):
    if a is None:
        return NULL
    return cnp.PyArray_DATA(<cnp.ndarray>a)


# kernel families (KERNELS below)
cdef enum:
    K_FLOAT = 0
    K_DOUBLE = 1
    K_FLOAT16 = 2
    K_BFLOAT16 = 3


cdef inline double _half_tile(const ssm_problem *P, int op, bint bf16, Py_ssize_t t,
                              void *buf) noexcept nogil:
    if op == OP_SOFTMAX or op == OP_LOG_SOFTMAX:
        if bf16:
            return ssm_softmax_fwd_tile_b(P, t, buf, op == OP_LOG_SOFTMAX)
        return ssm_softmax_fwd_tile_h(P, t, buf, op == OP_LOG_SOFTMAX)
    if op == OP_SOFTMAX_BWD:
        return ssm_softmax_bwd_tile_b(P, t, buf) if bf16 else ssm_softmax_bwd_tile_h(P, t, buf)
    if op == OP_SSWL_BWD:
        return ssm_sswl_bwd_tile_b(P, t, buf) if bf16 else ssm_sswl_bwd_tile_h(P, t, buf)
    if bf16:
        return ssm_sswl_tile_b(P, t, buf, op == OP_SSWL_FWD_BWD)
    return ssm_sswl_tile_h(P, t, buf, op == OP_SSWL_FWD_BWD)


cdef inline double _tile(const ssm_problem *P, int op, int kind, Py_ssize_t t,
                         void *buf) noexcept nogil:
    cdef bint dbl = kind == K_DOUBLE
    if kind >= K_FLOAT16:
        return _half_tile(P, op, kind == K_BFLOAT16, t, buf)
    if op == OP_SOFTMAX or op == OP_LOG_SOFTMAX:
        if dbl:
            return ssm_softmax_fwd_tile_d(P, t, buf, op == OP_LOG_SOFTMAX)
        return ssm_softmax_fwd_tile_f(P, t, buf, op == OP_LOG_SOFTMAX)
    if op == OP_SOFTMAX_BWD:
        return ssm_softmax_bwd_tile_d(P, t, buf) if dbl else ssm_softmax_bwd_tile_f(P, t, buf)
    if op == OP_SSWL_BWD:
        return ssm_sswl_bwd_tile_d(P, t, buf) if dbl else ssm_sswl_bwd_tile_f(P, t, buf)
    if dbl:
        return ssm_sswl_pass_tile_d(P, t, buf, op == OP_SSWL_FWD_BWD)
    return ssm_sswl_pass_tile_f(P, t, buf, op == OP_SSWL_FWD_BWD)


# Fewer threads than asked for on small problems: each thread gets at least this many
# elements (about 10 us of work), and at least one tile. Waking a team and meeting at
# its barrier costs microseconds when idle, and milliseconds when another process
# holds a core. Results do not depend on it (the tile partition is fixed).
cdef Py_ssize_t MIN_ELEMENTS_PER_THREAD = 32768


cdef inline int _team_size(int n_threads, Py_ssize_t ntiles, Py_ssize_t elements) noexcept nogil:
    cdef Py_ssize_t most = elements // MIN_ELEMENTS_PER_THREAD
    if most > ntiles:
        most = ntiles
    if most < 1:
        most = 1
    return <int>most if most < n_threads else n_threads


cdef inline Py_ssize_t _chunk(Py_ssize_t ntiles, int n_threads) noexcept nogil:
    cdef Py_ssize_t chunk = ntiles // (16 * n_threads)
    return chunk if chunk > 1 else 1


def _openmp_stack_bytes(env=os.environ):
    """The stack size libgomp gives its threads: OMP_STACKSIZE (or GOMP_STACKSIZE), a
    number with an optional B, K, M or G suffix (K when none); 0 for the default."""
    text = (env.get("OMP_STACKSIZE") or env.get("GOMP_STACKSIZE") or "").strip().upper()
    if not text:
        return 0
    unit = {"B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1])
    try:
        return int(text[:-1] if unit else text) * (unit or 1024)
    except ValueError:
        return 0  # libgomp ignores a malformed value too


cdef size_t STACK_BYTES = _openmp_stack_bytes()


cdef int _start_team(int team) except -1:
    """Raise OSError (not a libgomp abort) if this thread cannot start a team of `team`."""
    global _settle, _largest_team
    cdef int err = 0, ok, grew = 0
    with nogil:
        ok = ssm_team_can_start(team, STACK_BYTES, &err, &grew)
    if grew and team > _largest_team:  # new threads; not a team coming back after a cap
        _largest_team = team
        _settle = SETTLE_CALLS
    if ok < team:
        raise OSError(err, f"threads: could not start {team} threads ({os.strerror(err)}); "
                           f"{ok} could start in this process: pass threads={ok} or fewer")
    return 0


# Foreign load, for calls with threads=None. A call is late when a thread finished its
# share more than LATE_SHARE of the call's time (and at least LATE_MIN seconds) after the
# first one did (it had lost its core), or when the call returned that long after the
# last thread finished (the caller, asleep at the closing barrier, had lost its core).
# Two such calls in a row (one alone may be a page fault or an interrupt; sustained load
# gives two at once), or one while threads are already left out, and the next calls
# leave out as many threads as were late (one when the caller was), for _hold seconds;
# _hold doubles each time a full-size call is late and halves each time one is not
# (HOLD_MIN to HOLD_MAX): under steady load about one call a second tries the full team,
# and a lucky one does not bring back frequent tries. When idle, a team's threads finish
# within one chunk (1/16 of a share) of each other and the caller wakes within
# microseconds. Races between Python threads on these variables only shift
# the next call's team size.
cdef double LATE_SHARE = 0.25
cdef double LATE_MIN = 200e-6
cdef double HOLD_MIN = 0.02
cdef double HOLD_MAX = 1.0
# A team larger than any before is late for reasons of its own (threads starting, their
# first scratch allocations): the next SETTLE_CALLS passes after it are not learnt from
# (without this, a new process's first call left a thread out for 20 ms).
cdef int SETTLE_CALLS = 3
cdef int _settle = 0
cdef int _largest_team = 1
cdef double _busy_until = -1.0  # omp_get_wtime() until which threads are left out
cdef double _hold = HOLD_MIN
cdef int _busy_drop = 0         # how many
cdef int _late_calls = 0        # full-size late calls in a row


cdef inline int _plan(int team, bint adaptive) noexcept nogil:
    """The team a call runs with: smaller while foreign load was seen recently."""
    if adaptive and _busy_drop > 0 and team > 1 and openmp.omp_get_wtime() < _busy_until:
        return team - _busy_drop if team > _busy_drop else 1
    return team


cdef void _learn(int team, bint capped, const double *ends, double t0,
                 double t1) noexcept nogil:
    """Update the rule from a call whose `team` threads finished at ``ends[i]``."""
    global _busy_until, _hold, _busy_drop, _late_calls
    cdef double first = ends[0], last = ends[0], slack
    cdef int i, late = 0
    for i in range(1, team):
        first = ends[i] if ends[i] < first else first
        last = ends[i] if ends[i] > last else last
    slack = LATE_MIN if LATE_MIN > LATE_SHARE * (t1 - t0) else LATE_SHARE * (t1 - t0)
    for i in range(team):
        if ends[i] > first + slack:
            late += 1
    if late == 0 and t1 > last + slack:
        late = 1
    if late and not capped:
        _late_calls += 1
        if _late_calls < 2:
            return
    if late:
        _busy_drop = late + (_busy_drop if capped else 0)  # a smaller team late too: fewer
        _busy_until = t1 + _hold
        if not capped:
            _hold = 2 * _hold if 2 * _hold < HOLD_MAX else HOLD_MAX
    elif not capped:
        _hold = _hold / 2 if _hold / 2 > HOLD_MIN else HOLD_MIN
        _busy_drop = 0
        _late_calls = 0


# The foreign-load rule from Python, for tests.

def busy_state():
    """(threads left out, seconds that still holds, hold)."""
    return _busy_drop, _busy_until - openmp.omp_get_wtime(), _hold


def reset_busy_state():
    global _busy_until, _hold, _busy_drop, _settle, _late_calls
    _busy_until, _hold, _busy_drop, _settle, _late_calls = -1.0, HOLD_MIN, 0, 0, 0


def plan(int team, bint adaptive):
    return _plan(team, adaptive)


def learn(int team, bint capped, ends, double t0, double t1):
    """Feed one call's thread end times (omp_get_wtime() seconds) to the rule."""
    cdef double[::1] e = np.ascontiguousarray(ends, dtype=np.float64)
    assert e.shape[0] == team
    _learn(team, capped, &e[0], t0, t1)


def wtime():
    return openmp.omp_get_wtime()


cdef inline size_t _scratch_bytes(const ssm_problem *P, int kind) noexcept nogil:
    if kind >= K_FLOAT16:
        return ssm_half_scratch_bytes(P)
    return ssm_scratch_bytes(P, 8 if kind == K_DOUBLE else 4)


cdef int _run_tiles(const ssm_problem *P, int op, int kind, int n_threads, bint capped,
                    bint adaptive, double *partial) noexcept nogil:
    """Run `op` over every tile; returns 1 if a thread could not get its scratch."""
    global _settle
    cdef Py_ssize_t ntiles = ssm_num_tiles(P), t
    cdef size_t nbytes = _scratch_bytes(P, kind)
    cdef char *buf = NULL
    cdef int failed = 0, tid
    cdef int *failed_p = &failed
    cdef Py_ssize_t chunk = _chunk(ntiles, n_threads)
    cdef double *ends = NULL
    cdef double t0 = 0.0
    cdef int started = 0  # the team OpenMP gave (OMP_THREAD_LIMIT, nesting: maybe fewer)
    cdef int *started_p = &started
    if adaptive and n_threads > 1:
        ends = <double *>malloc(n_threads * sizeof(double))
        t0 = openmp.omp_get_wtime()
    with parallel(num_threads=n_threads):
        tid = openmp.omp_get_thread_num()
        if tid == 0:
            started_p[0] = openmp.omp_get_num_threads()
        buf = <char *>malloc(nbytes)
        if buf == NULL:
            failed_p[0] = 1
        for t in prange(ntiles, schedule="dynamic", chunksize=chunk):
            if buf != NULL:
                partial[t] = _tile(P, op, kind, t, buf)
        if ends != NULL:  # the loop has no barrier (nowait): each thread's own end
            ends[tid] = openmp.omp_get_wtime()
        free(buf)
    if ends != NULL:
        if _settle > 0:
            _settle -= 1
        elif started > 1:
            _learn(started, capped, ends, t0, openmp.omp_get_wtime())
        free(ends)
    return failed


cdef int _team(threads, Py_ssize_t ntiles, Py_ssize_t elements, bint *capped) except -1:
    """The team of one parallel pass, from ``(count, adaptive)``, shown to start."""
    cdef int n, team
    n, adaptive = threads
    n = _team_size(n, ntiles, elements)
    team = _plan(n, adaptive)
    capped[0] = team < n
    _start_team(team)
    return team


# ---- tuning: how this backend cuts a problem up --------------------------------------

# Pixels per tile: a tile's C rows of logits take about TILE_BYTES, so the tile stays
# in L1/L2 across the kernel's sweeps. At most 1024 pixels, a multiple of 16 when >= 16.
cdef Py_ssize_t TILE_BYTES = 64 * 1024
# ... but with strided channels (NCHW) at least MIN_TILE pixels, or else the most of 64,
# 32 and 16 whose tile takes at most WIDE_TILE_BYTES (such tiles live in L2 or L3): over
# 128 float32 classes the 64 KiB rule read each class row a line or a few at a time,
# every row a DRAM stream of its own, far from the memory's speed. Under 16 pixels (rows
# layouts too) the sweeps over pixels have no whole vector. Zen 3, 1 thread, float32, ns
# a logit, fused / loss alone, the 64 KiB rule's tiles -> 128 pixels (3000 classes: 64):
# 1x3000x64x64 (5 pixels) 24 / 3.3 -> 1.3 / 0.89; 2x1000x64x64 (16) 2.4 / 1.7 -> 1.0 /
# 0.76; 4x300x64x64 (48) 0.96 / 0.65 -> 0.86 / 0.57; 4x150x128x128 (96) 0.97 / 0.62 ->
# 0.91 / 0.58 (256 pixels: 0.90 / 0.65); benchmarks/many_classes.py. MIN_TILE is a
# Python global, read at each call as STREAM_BYTES is; 16 gives the 64 KiB rule's tiles,
# widened to 16 pixels.
cdef Py_ssize_t WIDE_TILE_BYTES = 1024 * 1024
MIN_TILE = 128
# Outputs of at least this many bytes are written with non-temporal stores: they would
# not stay in the caches anyway. VOC fused, 2 threads: 6.60 -> 6.38 ms; ADE
# 6.96 -> 6.26 ms; a 1.4 MB output: 0.23 -> 0.27 ms, hence the threshold. (A Python
# global, read at each call, so that tests can lower it.)
STREAM_BYTES = 8 * 1024 * 1024


# Streamed outputs whose rows do not start on a 16-byte boundary (see
# _rows_start_aligned) are written with plain stores instead, unless this is True: for
# the tests of the streamed rows' edges, which no call reaches otherwise.
STREAM_UNALIGNED_ROWS = False


def _rows_start_aligned(Py_ssize_t inner, Py_ssize_t tile, outputs):
    """Whether every row segment the tiles of these outputs stream starts on a 16-byte
    boundary (each array 16-byte aligned and, with strided channels, inner > 1, its
    channel rows a multiple of 16 bytes long), and on a 64-byte one where a tile's rows
    are under 256 bytes (`tile` pixels: over 4096 float32 classes, or small images).
    Otherwise every tile row begins and ends inside a line that is part streamed, part
    stored plainly, and each such line costs a read and an eviction, which short rows
    pay on most of their lines.
    Zen 3, 1 thread, float32, fused loss+grad, ns a logit streamed / plain:
    8x21x255x255 1.26 / 0.90 (2 threads: 0.65 / 0.48); 4x150x127x127 3.65 / 0.91;
    2x1000x64x64 in tiles of 16 pixels (64-byte rows; now 128) 3.5 / 3.2 into an array
    16 bytes off a line, 2.56 / 3.2 into one on a line; 8x21x256x256 0.90 / 0.93 (0.49 /
    0.53)."""
    cdef Py_ssize_t align
    for a in outputs:
        if a is None:
            continue
        align = 64 if inner > 1 and tile * a.itemsize < 256 else 16
        if <size_t>_ptr(a) % align or (inner > 1 and (inner * a.itemsize) % align):
            return False
        if inner > 1 and (tile * a.itemsize) % align:  # (tile == inner: checked above)
            return False
    return True


def _streamed(Py_ssize_t nbytes, Py_ssize_t inner, Py_ssize_t tile, outputs):
    """Whether a pass over `nbytes` of logits in tiles of `tile` pixels writes `outputs`
    (None where absent) with non-temporal stores."""
    return nbytes >= STREAM_BYTES and (STREAM_UNALIGNED_ROWS
                                       or _rows_start_aligned(inner, tile, outputs))


def tile_size(Py_ssize_t C, Py_ssize_t inner, Py_ssize_t itemsize):
    """Pixels per tile (see TILE_BYTES); never more than an image's pixel count."""
    return _tile_size(C, inner, itemsize, _min_tile())


cdef Py_ssize_t _min_tile() except -1:
    """MIN_TILE, checked: a power of two from 16 to 1024."""
    m = MIN_TILE
    if type(m) is not int or not 16 <= m <= 1024 or m & (m - 1):
        raise ValueError(f"ssm._cpu.MIN_TILE: expected a power of two from 16 to 1024, "
                         f"got {m!r}")
    return m


cdef inline Py_ssize_t _tile_size(Py_ssize_t C, Py_ssize_t inner, Py_ssize_t itemsize,
                                  Py_ssize_t min_tile) noexcept nogil:
    cdef Py_ssize_t t = TILE_BYTES // (C * itemsize)
    cdef Py_ssize_t wide = min_tile
    t = 1 if t < 1 else 1024 if t > 1024 else t
    if t >= 16:
        t = t // 16 * 16
    if inner <= 1:  # rows: a tile is contiguous; only whole vectors matter
        wide = 16
    while wide >= 16 and t < wide:
        if wide * C * itemsize <= WIDE_TILE_BYTES:
            t = wide
            break
        wide //= 2
    if inner > 1 and t > inner:
        t = inner
    return t


# The kernel family of each float dtype this backend takes, by dtype name (bfloat16 is
# ml_dtypes', imported only by callers that use it); the dtype table is
# ssm._validation.FLOAT_DTYPES["cpu"]; tests/test_contract.py checks the two agree.
# Half types run the float32 kernels on converted tiles (ssm/_half.h).
KERNELS = {"float32": K_FLOAT, "float64": K_DOUBLE, "float16": K_FLOAT16,
           "bfloat16": K_BFLOAT16}
# ... and by dtype, filled from KERNELS on first sight of each: a dtype's name costs
# microseconds (NumPy works it out each time), a tenth of a small call.
cdef dict _KERNELS_BY_DTYPE = {}


cdef int _kernel(dtype) except -1:
    """The kernel family of an accepted float dtype."""
    kind = _KERNELS_BY_DTYPE.get(dtype)
    if kind is None:
        kind = _KERNELS_BY_DTYPE[dtype] = KERNELS[dtype.name]
    return kind


def half_isa(level=None):
    """How the half drivers convert, for tests: 2 (the default) float16 by F16C where
    the CPU has it and the direct tiles by their AVX-512 functions where it has AVX-512
    BW, else their AVX2 ones; 1 the AVX2 ones only; 0 the compiler-vectorised scalar
    loops (as bfloat16 elsewhere always is). Sets it if ``level`` is given (between
    calls: no kernel may be running), and returns the previous level."""
    global ssm_half_isa
    cdef int old = ssm_half_isa
    if level is not None:
        if level not in (0, 1, 2):
            raise ValueError(f"level: expected 0, 1 or 2, got {level!r}")
        ssm_half_isa = level
    return old


cdef int _switch(on) except -1:
    """A test switch's new setting (two_classes, exp_sweep_v3): 1 or 0 from True or False."""
    if on is not True and on is not False:
        raise TypeError(f"on: expected True or False, got {on!r}")
    return 1 if on else 0


def two_classes(on=None):
    """Whether the loss passes over sparse labels of two classes run each pixel's sweeps
    in one loop (the default, True) or the general sweeps (False), for tests: the two
    give the same bits. Sets it if ``on`` is given (between calls: no kernel may be
    running), and returns the previous setting."""
    global ssm_two_classes
    cdef bint old = ssm_two_classes != 0
    if on is not None:
        ssm_two_classes = _switch(on)
    return old


def float_exp_table():
    """Whether the float32 (and half) kernels take exp from the x86-64-v4 clone's table
    (ssm/_expf_table.h); the one-loop path of two classes then leaves float to the
    general sweeps, so that every float exp is that one."""
    return ssm_float_exp_table() != 0


def exp_sweep_v3(on=None):
    """Whether the float32 (and half) sums of exp of the x86-64-v3 (AVX2) clone run its
    hand-written sweep (ssm/_expf_avx2.h; the default, True) or gcc's loop (False), for
    tests: the two give the same bits. Sets it if ``on`` is given (between calls: no
    kernel may be running), and returns the previous setting. Without effect where
    another clone runs (float_exp_sweep_v3 says which)."""
    global ssm_exp_sweep_v3
    cdef bint old = ssm_exp_sweep_v3 != 0
    if on is not None:
        ssm_exp_sweep_v3 = _switch(on)
    return old


def float_exp_sweep_v3():
    """Whether the float32 (and half) sums of exp run the x86-64-v3 clone's hand-written
    sweep (ssm/_expf_avx2.h) now: that clone runs, and exp_sweep_v3 is on."""
    return ssm_float_exp_sweep_v3() != 0


def two_class_tiles():
    """How many tiles the one-loop path of two classes has run in this process (for
    tests: a comparison of the two paths must see it taken)."""
    return ssm_two_class_tiles


def half_convert(src, bint bf16, bint software=False):
    """The kernels' conversions, for tests: a C-contiguous uint16 array of float16 (or, with
    ``bf16``, bfloat16) bits -> float32, or a float32 array -> uint16 bits; by the software
    versions, or (``software=False``) by the path the kernels take on this CPU (F16C, or
    not with half_isa(0))."""
    if src.dtype not in (np.uint16, np.float32) or not src.flags.c_contiguous:
        raise TypeError("src: expected a C-contiguous uint16 or float32 array")
    narrow = src.dtype == np.float32
    dst = np.empty(src.shape, np.uint16 if narrow else np.float32)
    ssm_half_convert(bf16, narrow, software, _ptr(src), <void *>_ptr(dst), src.size)
    return dst


def _widen(problem):
    """A half problem's per-pixel and small float inputs as float32 (ssm/_half.h reads
    them so; the logits, soft targets and outputs stay in the half type)."""
    f32 = np.float32
    return problem._replace(**{
        name: np.ascontiguousarray(getattr(problem, name), f32)
        for name in ("weights", "class_weights", "lens", "d_loss_map")
        if getattr(problem, name) is not None})


def kernel_codes():
    """The C values of the op selectors, target kinds and loss kinds, for
    tests/test_contract.py."""
    ops = dict(SOFTMAX=OP_SOFTMAX, LOG_SOFTMAX=OP_LOG_SOFTMAX, SOFTMAX_BWD=OP_SOFTMAX_BWD,
               SSWL_FWD=OP_SSWL_FWD, SSWL_FWD_BWD=OP_SSWL_FWD_BWD, SSWL_BWD=OP_SSWL_BWD)
    targets = dict(NONE=SSM_NO_TARGET, U8=SSM_U8, I32=SSM_I32, I64=SSM_I64, SOFT=SSM_SOFT)
    losses = dict(CROSS_ENTROPY=SSM_CROSS_ENTROPY, KL=SSM_KL)
    return ops, targets, losses


# Problem's fields by position, from its own field list: _fill reads the tuple directly
# (17 attribute lookups cost about a microsecond per call).
cdef Py_ssize_t F_GEOM, F_X, F_DPROB, F_TARGET, F_KIND, F_WEIGHTS, F_CLASS_WEIGHTS, F_LENS
cdef Py_ssize_t F_SMOOTHING, F_IGNORE_INDEX, F_LOSS, F_OUT, F_LOSS_CAP, F_D_LOSS
cdef Py_ssize_t F_D_LOSS_MAP, F_DIVISOR, F_PROB_OUT, F_LOSS_MAP
(F_GEOM, F_X, F_DPROB, F_TARGET, F_KIND, F_WEIGHTS, F_CLASS_WEIGHTS, F_LENS, F_SMOOTHING,
 F_IGNORE_INDEX, F_LOSS, F_OUT, F_LOSS_CAP, F_D_LOSS, F_D_LOSS_MAP, F_DIVISOR, F_PROB_OUT,
 F_LOSS_MAP) = [Problem._fields.index(name) for name in (
    "geom", "x", "dprob", "target", "kind", "weights", "class_weights", "lens", "smoothing",
    "ignore_index", "loss", "out", "loss_cap", "d_loss", "d_loss_map", "divisor", "prob_out",
    "loss_map")]


cdef int _fill(ssm_problem *P, object problem_obj) except -1:
    """The C problem of a validated ssm._problem.Problem (arrays by pointer)."""
    if not isinstance(problem_obj, Problem):  # (Cython's tuple type test wants a plain tuple)
        raise TypeError(f"problem: expected an ssm._problem.Problem, got {type(problem_obj)}")
    cdef tuple problem = <tuple>problem_obj
    cdef double d_loss = problem[F_D_LOSS], divisor = problem[F_DIVISOR]
    g = problem[F_GEOM]
    x = problem[F_X]
    memset(P, 0, sizeof(ssm_problem))
    P.outer, P.C, P.inner = g.outer, g.C, g.inner
    # half tiles are worked on in float32: sized as float32 ones
    P.tile = _tile_size(P.C, P.inner, x.itemsize if x.itemsize > 2 else 4, _min_tile())
    P.x, P.x2, P.target = _ptr(x), _ptr(problem[F_DPROB]), _ptr(problem[F_TARGET])
    P.target_kind, P.ignore_index = problem[F_KIND], problem[F_IGNORE_INDEX]
    P.w, P.cw = _ptr(problem[F_WEIGHTS]), _ptr(problem[F_CLASS_WEIGHTS])
    P.lens = _ptr(problem[F_LENS])
    P.smoothing, P.loss_cap = problem[F_SMOOTHING], problem[F_LOSS_CAP]
    P.loss = problem[F_LOSS]
    P.d_loss_map = _ptr(problem[F_D_LOSS_MAP])
    P.grad_scale = d_loss / divisor if divisor != 0 else 0.0
    P.out, P.out2 = <void *>_ptr(problem[F_OUT]), <void *>_ptr(problem[F_PROB_OUT])
    P.loss_map = <void *>_ptr(problem[F_LOSS_MAP])
    P.stream = _streamed(x.nbytes, P.inner, P.tile, (problem[F_OUT], problem[F_PROB_OUT]))
    return 0


def label_terms(problem):
    """The KL divergence's term of each label ``y`` with a lens or smoothing:
    ``sum_c cw_c t_c log t_c`` (``0 log 0 = 0``) with ``t = (1 - e) lens[y] + e / C`` (or
    the smoothed one-hot), a C-contiguous float64 array of C values: the kernels take
    ``w_p`` times the entry of the pixel's label, in place of a log per element."""
    C, e = problem.geom.C, problem.smoothing
    cw = (np.ones(C) if problem.class_weights is None
          else np.asarray(problem.class_weights, np.float64))
    if problem.lens is not None:
        t = (1.0 - e) * np.asarray(problem.lens, np.float64) + e / C
        return np.ascontiguousarray((cw * t * np.log(np.where(t > 0, t, 1.0))).sum(axis=1))
    # smoothing alone: t is e/C off the label, 1 - e + e/C at it (O(C), no C x C table)
    lo, hi = e / C, 1.0 - e + e / C
    tlogt_lo = lo * math.log(lo) if lo > 0 else 0.0
    tlogt_hi = hi * math.log(hi) if hi > 0 else 0.0
    return np.ascontiguousarray(cw * (tlogt_hi - tlogt_lo) + float((cw * tlogt_lo).sum()))


def run(int op, problem, threads):
    """Run kernel pass `op` (an ssm._codes.Op) over `problem` (an ssm._problem.Problem);
    return the float64 loss sum (0.0 for the passes without a loss).

    `threads` is ``(count, adaptive)`` from ssm._threads.resolve. Outputs larger than
    STREAM_BYTES are written with non-temporal stores.
    """
    return _run(op, problem, threads, False)[0]


def run_loss(int op, problem, threads, divisor):
    """The loss pass `op` (SSWL_FWD or SSWL_FWD_BWD) and its reduced loss: ``loss_value(
    run(op, problem, threads), divisor, x.dtype)``, or None with ``divisor=None`` (reduction
    "none"). The GPU backend's run_loss does the same in one final launch.
    """
    total = _run(op, problem, threads, False)[0]
    return None if divisor is None else loss_value(total, divisor, problem.x.dtype)


def run_checked(int op, problem, threads, divisor):
    """Loss pass `op` (SSWL_FWD or SSWL_FWD_BWD) with the label pre-pass in it: (the reduced
    loss, or None with ``divisor=None``; the lowest flat index of a bad label or -1).
    `divisor`: a number, or "mean" for the pass's normaliser. A bad label's pixel is NaN:
    the caller raises after the pass. The GPU backend's run_checked has the same contract.
    """
    total, norm, bad = _run(op, problem, threads, True)
    if divisor is None:
        return None, bad
    return loss_value(total, norm if isinstance(divisor, str) else divisor,
                      problem.x.dtype), bad


def run_with_stats(int op, problem, threads):
    """``run`` and ``stats`` in one pass: (loss sum, sum of n_p, lowest flat index of a bad
    label or -1), each as those give it, bit for bit. `op`: SSWL_FWD or SSWL_FWD_BWD, the
    passes that stage labels. The pass runs whatever the labels (a bad one's pixel loss
    is NaN): for the loss alone, whose caller raises after it.
    """
    if op != OP_SSWL_FWD and op != OP_SSWL_FWD_BWD:
        raise ValueError(f"op: expected SSWL_FWD or SSWL_FWD_BWD, got {op}")
    return _run(op, problem, threads, True)


cdef char *_per_tile(Py_ssize_t ntiles, size_t nbytes) except NULL:
    """`nbytes` for each of `ntiles` tiles, for the caller to free: the tiles' results
    (a NumPy array and its memoryview cost about a microsecond each, a tenth of a small
    call)."""
    cdef char *mem = <char *>malloc(<size_t>ntiles * nbytes)
    if mem == NULL:
        raise MemoryError(f"ssm: could not allocate {ntiles * nbytes} bytes of tile results")
    return mem


cdef tuple _run(int op, problem, threads, bint with_stats):
    cdef ssm_problem P
    cdef int kind
    cdef Py_ssize_t t, ntiles, bad = -1
    cdef double total = 0.0, norm = 0.0
    cdef double *partial
    cdef char *mem
    cdef int failed = 0, team
    cdef bint capped, adaptive = threads[1]
    cdef double[::1] table
    _fill(&P, problem)
    kind = _kernel(problem.x.dtype)
    if kind >= K_FLOAT16:
        problem = _widen(problem)
        _fill(&P, problem)
    ntiles = ssm_num_tiles(&P)
    if ntiles == 0:
        return 0.0, 0.0, -1
    # per tile: its loss sum and, with stats, its pre-pass share (ssm_tile_stats)
    mem = _per_tile(ntiles, 2 * sizeof(double) + sizeof(Py_ssize_t) if with_stats
                    else sizeof(double))
    try:
        partial = <double *>mem
        if with_stats:
            P.norms = partial + ntiles
            P.bads = <Py_ssize_t *>(partial + 2 * ntiles)
        if ((op == OP_SSWL_FWD or op == OP_SSWL_FWD_BWD) and P.loss == SSM_KL
                and P.target_kind != SSM_SOFT and (P.lens != NULL or P.smoothing != 0.0)):
            table = label_terms(problem)
            P.label_terms = &table[0]
        team = _team(threads, ntiles, P.outer * P.C * P.inner, &capped)
        with nogil:
            failed = _run_tiles(&P, op, kind, team, capped, adaptive, partial)
            if not failed:
                for t in range(ntiles):
                    total += partial[t]
                if with_stats:
                    norm = _tiles_stats(P.norms, P.bads, ntiles, &bad)
    finally:
        free(mem)
    if failed:
        raise MemoryError(f"ssm: could not allocate {_scratch_bytes(&P, kind)} "
                          "bytes of per-thread scratch")
    return total, norm, bad


def stats(problem, threads):
    """Label pre-pass: (sum of n_p as float64, lowest flat index of a bad label or -1).

    Reads the problem's target, kind, weights, class_weights and ignore_index.
    """
    cdef ssm_problem P
    cdef bint dbl
    cdef int kind
    cdef Py_ssize_t t, ntiles, chunk, bad = -1
    cdef int n_threads
    cdef bint capped
    cdef double norm = 0.0
    cdef double *partial
    cdef Py_ssize_t *bads
    cdef char *mem
    _fill(&P, problem)
    kind = _kernel(problem.x.dtype)
    if kind >= K_FLOAT16:  # reads labels and float32 weights: the float pre-pass
        problem = _widen(problem)
        _fill(&P, problem)
    dbl = kind == K_DOUBLE
    P.x = P.x2 = P.lens = P.d_loss_map = NULL  # the pre-pass reads labels and weights only
    P.out = P.out2 = P.loss_map = NULL
    ntiles = ssm_num_tiles(&P)
    if ntiles == 0:
        return 0.0, -1
    mem = _per_tile(ntiles, sizeof(double) + sizeof(Py_ssize_t))
    try:
        partial = <double *>mem
        bads = <Py_ssize_t *>(partial + ntiles)
        # the team of the call's main pass (its elements, not the labels'): one team size
        # per call, so libgomp does not end and recreate threads between the passes
        n_threads = _team(threads, ntiles, P.outer * P.C * P.inner, &capped)
        chunk = _chunk(ntiles, n_threads)
        with nogil:
            for t in prange(ntiles, schedule="dynamic", chunksize=chunk, num_threads=n_threads):
                if dbl:
                    ssm_sswl_stats_d(&P, t, &partial[t], &bads[t])
                else:
                    ssm_sswl_stats_f(&P, t, &partial[t], &bads[t])
            norm = _tiles_stats(partial, bads, ntiles, &bad)
    finally:
        free(mem)
    return norm, bad


cdef inline double _tiles_stats(const double *norms, const Py_ssize_t *bads, Py_ssize_t ntiles,
                                Py_ssize_t *bad) noexcept nogil:
    """The tiles' pre-pass results as one: the sum of their normalisers, in tile order
    (the same bits whatever the threads), and into bad the lowest bad index, or -1."""
    cdef double norm = 0.0
    cdef Py_ssize_t t
    bad[0] = -1
    for t in range(ntiles):
        norm += norms[t]
        if bad[0] < 0 and bads[t] >= 0:
            bad[0] = bads[t]
    return norm


def loss_value(double total, double divisor, dtype):
    """``total / divisor`` (0 when the divisor is 0) as a 0-d array of ``dtype``, rounded
    once (ssm/_rounding.py; the GPU's ``from_double`` alike)."""
    return round_once(total / divisor if divisor != 0 else 0.0, dtype)


# ---- the memory floors of ssm-bench (ssm/_floors.h) ----------------------------------------

cdef extern from "_floors.h" nogil:
    void ssm_floor_stream(char *dst, const char *src, size_t n)
    unsigned long long ssm_floor_read(const char *src, size_t n)

cdef Py_ssize_t FLOOR_CHUNK = 1 << 20  # bytes per scheduled chunk (a multiple of 64)


def _floor_bytes(a, name):
    if not (isinstance(a, np.ndarray) and a.flags.c_contiguous):
        raise TypeError(f"{name}: expected a C-contiguous NumPy array")
    return a.nbytes


def floor_stream(dst, src, int threads):
    """Copy ``src`` into ``dst`` (C-contiguous NumPy arrays of equal byte size) with the
    kernels' non-temporal stores, on ``threads`` threads: the write floor of ssm-bench."""
    cdef Py_ssize_t n = _floor_bytes(src, "src"), chunks, c, lo, hi
    if _floor_bytes(dst, "dst") != n or not dst.flags.writeable:
        raise ValueError("dst: expected a writeable array of src's size in bytes")
    cdef char *d = <char *>cnp.PyArray_DATA(<cnp.ndarray>dst)
    cdef const char *s = <const char *>cnp.PyArray_DATA(<cnp.ndarray>src)
    chunks = (n + FLOOR_CHUNK - 1) // FLOOR_CHUNK
    _start_team(threads)
    with nogil:
        for c in prange(chunks, schedule="static", num_threads=threads):
            lo = c * FLOOR_CHUNK
            hi = lo + FLOOR_CHUNK if lo + FLOOR_CHUNK < n else n
            ssm_floor_stream(d + lo, s + lo, <size_t>(hi - lo))


def floor_read(src, int threads):
    """Read every byte of ``src`` (a C-contiguous NumPy array) on ``threads`` threads and
    return the wrapping sum of its 64-bit words: the read floor of ssm-bench."""
    cdef Py_ssize_t n = _floor_bytes(src, "src"), chunks, c, lo, hi
    cdef const char *s = <const char *>cnp.PyArray_DATA(<cnp.ndarray>src)
    cdef unsigned long long total = 0
    chunks = (n + FLOOR_CHUNK - 1) // FLOOR_CHUNK
    _start_team(threads)
    with nogil:
        for c in prange(chunks, schedule="static", num_threads=threads):
            lo = c * FLOOR_CHUNK
            hi = lo + FLOOR_CHUNK if lo + FLOOR_CHUNK < n else n
            total += ssm_floor_read(s + lo, <size_t>(hi - lo))
    return total


# ---- softmax over positions (ssm/_positions.h) ---------------------------------------

# Rows (maps) per tile for contiguous rows, or channels per tile for strided ones: a tile
# holds about POS_TILE_BYTES of x (at least one row); its scratch stays in L2.
cdef Py_ssize_t POS_TILE_BYTES = 64 * 1024


# The positions passes stream a large output row by row from a scratch row (the float
# gradient of 2-D keypoints in L1-sized chunks of one), so rows of more than this go out
# with plain stores: the scratch row and its source no longer stay in L2. Zen 3,
# plain / streamed time, spatial_softmax and its gradient at 1 thread (and 2): maps of
# 2048 x 2048 (16 MiB rows) 0.70, 0.67 (0.64, 0.65); 1024 x 1024 0.97, 0.92 (0.88,
# 0.87); 512 x 512 0.99, 0.98 (0.88, 0.92); 256 x 256 1.03, 1.00 (0.95, 1.05); 64 x 48
# 1.11, 1.14 (1.02, 1.05). The chunked keypoint gradient: 0.96-1.13, within 3% of 1 from
# 1 MiB rows on, so it follows the same rule.
# benchmarks/positions_rows.py. (A Python global, read at each call.)
POS_STREAM_ROW_BYTES = 512 * 1024


# Contiguous rows of at least this many bytes (in the kernels' float type) that are not
# streamed keep their row in the output row itself instead of a scratch row: the exp row
# of spatial_softmax and of the 2-D soft-argmax's probabilities and gradient, the dy row
# of spatial_softmax_grad. A scratch row that large is not reused from the cache anyway,
# and each call's fresh one is faulted in page by page (above glibc's mmap threshold).
# Zen 3, in place / scratch, alternating (benchmarks/results/2026-12-02-...-session17/
# positions_in_place.txt): 2048 x 2048 maps 0.23-0.29, 1024 x 1024 0.74-0.90, 512 x 512
# 0.83-0.91, 256 x 256 0.94-0.98. (A Python global, read at each call; tests set it to
# 0 and to a huge value to compare the two: the same bits.)
POS_IN_PLACE_ROW_BYTES = 256 * 1024


# Strided rows (channels last) whose tile of gathered rows would take more than this many
# bytes in the kernels' float type are not gathered whole: each sweep of the row goes
# over the tile chunk by chunk (ssm_pos_tile_chunks, the same bits), in tiles of up to 64
# channels (_pos_chunked_tile), so a thread's scratch is a few chunks whatever the map's
# size. Gathered whole, a 1024 x 1024 x 16 map took 192 MB of scratch per thread, faulted
# in at every call, and its one tile kept one thread busy: spatial_softmax 129 ms, 41 ms
# chunk by chunk (1 thread; 31 ms at 2). Where the gathered tile stays in the cache,
# gathering is 0-18% faster for spatial_softmax and its gradient, 0-13% slower for
# soft_argmax (maps of 32 x 32 to 256 x 256, 16 and 64 channels, 1 and 2 threads, Zen 3),
# so below this size only a problem of fewer tiles than threads is swept chunk by chunk
# (its tiles can be cut finer: 0.55-0.74x at 2 threads, one 180 x 180 or 256 x 256 map).
# (A Python global, read at each call; tests set it to 0, and to a huge value with one
# thread, to compare the two: the same bits.)
POS_GATHER_BYTES = 4 << 20


def _pos_chunked(Py_ssize_t tile_bytes, Py_ssize_t tiles, int threads):
    """Whether strided rows whose gathered tile takes `tile_bytes` (`tiles` of them) are
    swept chunk by chunk on `threads` threads."""
    return tile_bytes > POS_GATHER_BYTES or (
        tiles < threads and tile_bytes > min(POS_GATHER_BYTES, POS_TILE_BYTES * 4))


def _pos_chunked_tile(Py_ssize_t outer, Py_ssize_t inner, int threads):
    """Channels per tile of strided rows swept chunk by chunk: all of a position's
    channels, up to 64 (whole lines of each position, read once a sweep), halved (in
    multiples of 8, then down to 1) while there are fewer tiles than threads: each tile
    then reads every line for part of it, but the threads share the work (one 2048 x
    2048 map of 4 channels, 2 threads: 0.79-0.84x the time in tiles of 2 than of 4). The
    bits do not depend on it: a row is the same sums whatever tile holds it."""
    cdef Py_ssize_t t = inner if inner < 64 else 64
    while t > 1 and outer * ((inner + t - 1) // t) < threads:
        t = (t + 1) // 2 if t <= 8 else (t // 2 + 7) // 8 * 8
    return t


def _pos_streamed(out, Py_ssize_t row_bytes):
    """Whether a positions pass writes `out` (or None) with non-temporal stores, its maps
    `row_bytes` long in the kernels' float type (float32 for the half types)."""
    return (out is not None and out.nbytes >= STREAM_BYTES
            and row_bytes <= POS_STREAM_ROW_BYTES)


def positions_tile(Py_ssize_t L, Py_ssize_t inner, Py_ssize_t itemsize):
    """Rows (inner == 1) or channels (inner > 1) per tile of a positions pass."""
    cdef Py_ssize_t t = POS_TILE_BYTES // (L * itemsize)
    t = 1 if t < 1 else t
    if inner > 1:
        t = 16 if t < 16 and inner >= 16 else t  # whole cache lines of channels
        t = inner if t > inner else t
    return t


def positions_codes():
    """The C values of the positions passes, for tests/test_contract.py."""
    return dict(SOFTMAX=SSM_POS_SOFTMAX, SOFTMAX_BWD=SSM_POS_SOFTMAX_BWD,
                EXPECT=SSM_POS_EXPECT, EXPECT_BWD=SSM_POS_EXPECT_BWD)


def positions(int op, problem, threads):
    """Run positions pass `op` (an ssm._codes.PosOp) over `problem` (an
    ssm._problem.PositionsProblem). `threads` is ``(count, adaptive)``.

    Each thread takes tiles in a fixed partition (whole rows), so results do not depend
    on the thread count.
    """
    cdef ssm_pos_problem P
    cdef bint capped
    cdef int kind
    cdef Py_ssize_t ntiles, t, chunk
    cdef int team, failed = 0
    cdef int *failed_p = &failed
    cdef size_t nbytes
    cdef char *buf = NULL
    cdef int half
    cdef Py_ssize_t rsize
    cdef double[::1] temp = problem.temperature
    g = problem.geom
    x = problem.x
    kind = _kernel(x.dtype)
    memset(&P, 0, sizeof(ssm_pos_problem))
    P.outer, P.L, P.inner, P.C = g.outer, g.L, g.inner, g.C
    P.D = 0 if problem.grid is None else problem.grid.shape[0]
    # half maps are computed as float32 ones, in tiles of the float32 size
    P.tile = positions_tile(g.L, g.inner, 4 if kind >= K_FLOAT16 else x.itemsize)
    P.from_prob = problem.from_prob
    P.x, P.x2, P.grid = _ptr(x), _ptr(problem.dprob), _ptr(problem.grid)
    P.temp = &temp[0]
    P.dkp = _ptr(problem.d_keypoints)
    P.out, P.kp = <void *>_ptr(problem.out), <void *>_ptr(problem.keypoints)
    P.var = <void *>_ptr(problem.variance)
    P.dtemp = <double *>_ptr(problem.d_temperature)
    P.stream = _pos_streamed(problem.out, g.L * (8 if kind == K_DOUBLE else 4))
    P.in_place = g.L * (8 if kind == K_DOUBLE else 4) >= POS_IN_PLACE_ROW_BYTES
    P.grid_w = problem.grid_w
    rsize = 8 if kind == K_DOUBLE else 4
    P.chunked = g.inner > 1 and _pos_chunked(P.tile * g.L * rsize, ssm_pos_num_tiles(&P),
                                             threads[0])
    if P.chunked:
        P.tile = _pos_chunked_tile(g.outer, g.inner, threads[0])
    half = 0 if kind < K_FLOAT16 else (2 if kind == K_BFLOAT16 else 1)
    ntiles = ssm_pos_num_tiles(&P)
    if ntiles == 0:
        return None
    team = _team(threads, ntiles, P.outer * P.L * P.inner, &capped)
    chunk = _chunk(ntiles, team)
    if P.chunked:
        nbytes = ssm_pos_chunks_scratch_bytes(&P, op, rsize)
    elif kind >= K_FLOAT16:
        nbytes = ssm_pos_half_scratch_bytes(&P)
    else:
        nbytes = ssm_pos_scratch_bytes(&P, 8 if kind == K_DOUBLE else 4)
    with nogil, parallel(num_threads=team):
        buf = <char *>malloc(nbytes)
        if buf == NULL:
            failed_p[0] = 1
        for t in prange(ntiles, schedule="dynamic", chunksize=chunk):
            if buf != NULL:
                if P.chunked:
                    if kind == K_DOUBLE:
                        ssm_pos_tile_chunks_d(&P, op, t, buf, 0)
                    else:
                        ssm_pos_tile_chunks_float(&P, op, t, buf, half)
                elif kind == K_DOUBLE:
                    ssm_pos_tile_d(&P, op, t, buf)
                elif kind == K_FLOAT:
                    ssm_pos_tile_float(&P, op, t, buf)
                else:
                    ssm_pos_tile_half(&P, op, t, buf, kind == K_BFLOAT16)
        free(buf)
    if failed:
        raise MemoryError(f"ssm: could not allocate {nbytes} bytes of per-thread scratch")
    return None
