"""Thread-scaling benchmark of ssm against the memory floor and its peers.

``python -m ssm.bench`` times the four operations of ssm (softmax, loss forward,
loss backward, fused loss+grad) at 1, 2, 4, ... threads up to the core count, and,
in the same run and at the same thread count, a copy of the same bytes (the
floor), PyTorch, a vectorised NumPy reference and scikit-learn. ``--help`` lists
the options; benchmarks/README.md explains how to read the tables.

Method
------
Data
    logits ``2 * N(0, 1)`` in the chosen float dtype; labels i.i.d. uniform in
    ``[0, C)`` with 5% set to the ignore label (-1; 255 for uint8). i.i.d. labels
    are the worst case for the label gather.
Cold caches
    Inputs and outputs rotate over several sets, enough for the sets to exceed
    64 MiB (twice this machine's L3) when a set is smaller, so that no call
    starts with its data in cache. Tiny shapes stay cache-resident; say so.
Timing
    ``perf_counter_ns`` around each call, the garbage collector off. Warm-up
    calls first (at least one per input set), then at least ``--min-reps``
    repetitions, and more until ``--budget`` seconds (at most ``MAX_REPS``).
    Tables show the median, the min-max range, and the IQR goes to the JSON.
    Values a call returns are released after the clock stops.
Bytes model (X = logits bytes, L = label bytes), what must cross the memory bus
    softmax (X -> P) 2X; loss forward (X, y -> P, loss) 2X+L; loss backward
    (P, y -> dX) 2X+L; fused (X, y -> loss, dX) 2X+L. GB/s = model bytes / median.
Floor
    ``np.copyto`` of a logits-sized buffer into a preallocated one (2X bytes
    read+written); at k threads the flat buffer is cut into k chunks copied from a
    thread pool (NumPy releases the GIL). An op's floor is that copy time scaled
    to the op's bytes; "x floor" = op median / floor.
Peers, same data, same thread count
    ssm with ``out=`` (no page faults) and ``threads=k``; PyTorch
    (``torch.set_num_threads(k)``; ``softmax``, ``cross_entropy`` forward, its
    backward through ``autograd.grad`` and forward+backward) on ``from_numpy``
    views; NumPy (vectorised, one thread only); scikit-learn
    ``HalfMultinomialLoss.loss_gradient`` (``n_threads=k``) on NHWC data made
    outside the clock, ignored pixels given weight 0. Every loss and gradient is
    checked once against ssm's, outside timing.
Noise
    Each row records the CPU time other processes used while it ran ("other", in
    cores: busy time from /proc/stat minus this process's CPU time, over the wall
    time). Rows with other > ``BUSY_CORES`` are flagged ``!``, rows whose
    (max - min) / median exceeds ``WIDE_SPREAD`` are flagged ``~``.
Traffic (``--device cudasim``)
    No timing: the three workloads, scaled down (N <= 2, spatial dims / 16), in both
    layouts, run on the CUDA simulator (ssm.testing.cudasim) built to count memory
    traffic. Per op: the sector efficiency of the kernel that walks the logits and of
    all of the op's launches (useful bytes / bytes in the 32-byte sectors a GPU would
    move, per warp-wide request), and the sectors' bytes against the op's byte model.
GPU (``--device cuda``)
    CuPy arrays, CUDA events around each call on the current stream, rotating sets
    above twice the device's L2; a device-to-device copy of the same bytes is the
    floor; PyTorch CUDA on the same memory through DLPack where installed.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

# ---- constant tables ---------------------------------------------------------------

# The standard workloads (float32 logits, int64 labels, 5% ignored); benchmarks/ uses these.
WORKLOADS = {
    "voc": ("VOC-like", (8, 21, 256, 256)),
    "ade": ("ADE20K-like", (4, 150, 128, 128)),
    "cityscapes": ("Cityscapes-like", (2, 19, 512, 1024)),
}
DEFAULT_WORKLOAD = "voc"

# Operations: title, and the model bytes as multiples of (X, L).
OPS = {
    "softmax": ("softmax (X -> P)", 2, 0),
    "forward": ("loss forward (X, y -> P, loss)", 2, 1),
    "backward": ("loss backward (P, y -> dX)", 2, 1),
    "fused": ("fused loss+grad (X, y -> loss, dX)", 2, 1),
}
COPY_OP = "copy"
IMPLS = ("ssm", "torch", "numpy", "sklearn")
IGNORE_FRACTION = 0.05
SEED = 20261123

ROTATE_BYTES = 64 << 20          # input sets rotate until they cover this many bytes
MAX_SETS = 8
WARMUP = 2                       # warm-up calls, at least one per input set
MAX_REPS = 200
DEFAULT_BUDGET_S = 0.8           # seconds of timed calls per row
DEFAULT_MIN_REPS = 7
BUSY_CORES = 0.15                # foreign load above this flags a row
MIN_LOAD_WINDOW_S = 0.1          # /proc/stat ticks at 100 Hz: shorter windows say nothing
WIDE_SPREAD = 0.5                # (max - min) / median above this flags a row
NOISY_ROWS = 0.25                # warn when more than this fraction of rows is flagged ~
LOSS_RTOL = 1e-5                 # agreement of each implementation's loss with ssm's
GRAD_RTOL = 1e-4                 # ... and of its gradient, relative to max |dX|


# ---- measurement -------------------------------------------------------------------


class LoadMeter:
    """CPU time used by other processes while a row runs, in cores (None off Linux)."""

    def __init__(self):
        self._tck = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._start = self._sample()

    @staticmethod
    def _busy_jiffies():
        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        # user nice system idle iowait irq softirq steal (guest time is inside user)
        return sum(fields[:8]) - fields[3] - fields[4]

    def _sample(self):
        t = os.times()
        return time.perf_counter(), self._busy_jiffies(), t.user + t.system

    def stop(self):
        (w0, b0, s0), (w1, b1, s1) = self._start, self._sample()
        if b0 is None or b1 is None or w1 - w0 < MIN_LOAD_WINDOW_S:
            return None
        return max(0.0, ((b1 - b0) / self._tck - (s1 - s0)) / (w1 - w0))


@dataclass
class Row:
    """One measured line: an implementation of an op at a thread count."""

    op: str
    impl: str
    threads: int | None                     # None on the GPU
    nbytes: int
    times_ns: list = field(default_factory=list)
    other_cores: float | None = None

    @property
    def median_ms(self):
        return statistics.median(self.times_ns) / 1e6

    @property
    def min_ms(self):
        return min(self.times_ns) / 1e6

    @property
    def max_ms(self):
        return max(self.times_ns) / 1e6

    def quartiles_ms(self):
        if len(self.times_ns) < 2:
            return self.median_ms, self.median_ms
        q = statistics.quantiles(self.times_ns, n=4)
        return q[0] / 1e6, q[2] / 1e6

    @property
    def spread(self):
        return (self.max_ms - self.min_ms) / self.median_ms if self.median_ms > 0 else 0.0


def time_cpu(fn, n_sets, budget, min_reps):
    """Per-call times (ns) of ``fn(i)`` over rotating sets, and the foreign load meanwhile."""
    for i in range(max(WARMUP, n_sets)):
        fn(i % n_sets)
    times = []
    gc.disable()
    try:
        meter = LoadMeter()
        deadline = time.perf_counter() + budget
        i = 0
        while len(times) < min_reps or (len(times) < MAX_REPS and time.perf_counter() < deadline):
            t0 = time.perf_counter_ns()
            result = fn(i % n_sets)
            t1 = time.perf_counter_ns()
            del result                      # a peer's fresh output is freed off the clock
            times.append(t1 - t0)
            i += 1
        other = meter.stop()
    finally:
        gc.enable()
    return times, other


def probe_load(seconds=0.25):
    """Foreign load (cores) while this process sleeps briefly."""
    meter = LoadMeter()
    time.sleep(seconds)
    return meter.stop()


class QuietWait:
    """Before a row, wait (up to ``budget`` seconds over the whole run) for a quiet machine."""

    def __init__(self, budget):
        self.left, self.waited = budget, 0.0

    def __call__(self):
        while self.left > 0:
            t0 = time.perf_counter()
            load = probe_load(MIN_LOAD_WINDOW_S)
            if load is None or load <= BUSY_CORES:
                return
            spent = time.perf_counter() - t0
            self.left -= spent
            self.waited += spent


# ---- inputs --------------------------------------------------------------------------


@dataclass
class Problem:
    """The benchmark's shape, dtypes and rotating input/output sets."""

    name: str
    shape: tuple
    dtype: np.dtype
    label_dtype: np.dtype
    ignore_index: int
    x: list                 # logits per set
    y: list                 # labels per set
    prob: list              # softmax(x) per set: the backward's input
    out: list               # preallocated output per set (P or dX)
    rotate_bytes: int = ROTATE_BYTES    # the sets cover this much when they are small

    @property
    def n_sets(self):
        return len(self.x)

    @property
    def x_bytes(self):
        return self.x[0].nbytes

    @property
    def label_bytes(self):
        return self.y[0].nbytes

    def op_bytes(self, op):
        if op == COPY_OP:
            return 2 * self.x_bytes
        _, kx, kl = OPS[op]
        return kx * self.x_bytes + kl * self.label_bytes


def n_sets_for(set_bytes):
    return max(2, min(MAX_SETS, math.ceil(ROTATE_BYTES / max(set_bytes, 1))))


def make_labels(rng, shape, C, label_dtype, ignore_index):
    y = rng.integers(0, C, size=shape, dtype=np.int64)
    y[rng.random(shape) < IGNORE_FRACTION] = ignore_index
    return y.astype(label_dtype)


def make_problem(name, shape, dtype, label_dtype, ssm):
    """Random logits and labels, their softmax, and empty outputs, for every set."""
    dtype, label_dtype = np.dtype(dtype), np.dtype(label_dtype)
    ignore_index = 255 if label_dtype == np.uint8 else -1
    rng = np.random.default_rng(SEED)
    C, pix = shape[1], (shape[0],) + tuple(shape[2:])
    n = n_sets_for(math.prod(shape) * dtype.itemsize)
    xs, ys, ps, outs = [], [], [], []
    for _ in range(n):
        x = rng.standard_normal(shape, dtype=dtype)
        x *= 2
        xs.append(x)
        ys.append(make_labels(rng, pix, C, label_dtype, ignore_index))
        ps.append(ssm.softmax(x))
        outs.append(np.empty_like(x))
    for o in outs:
        o.fill(0)                            # fault the output pages in now
    return Problem(name, tuple(shape), dtype, label_dtype, ignore_index, xs, ys, ps, outs)


# ---- the implementations: each maker returns fn(i) for one call on set i --------------


def ssm_calls(ssm, pb, threads):
    def softmax(i):
        return ssm.softmax(pb.x[i], out=pb.out[i], threads=threads)

    def forward(i):
        return ssm.spatial_softmax_with_loss(pb.x[i], pb.y[i], ignore_index=pb.ignore_index,
                                             out=pb.out[i], threads=threads)

    def backward(i):
        return ssm.spatial_softmax_with_loss_grad(pb.prob[i], pb.y[i],
                                                  ignore_index=pb.ignore_index,
                                                  out=pb.out[i], threads=threads)

    def fused(i):
        return ssm.spatial_softmax_with_loss_and_grad(pb.x[i], pb.y[i],
                                                      ignore_index=pb.ignore_index,
                                                      out=pb.out[i], threads=threads)

    return {"softmax": softmax, "forward": forward, "backward": backward, "fused": fused}


def copy_call(pb, threads, pool):
    """np.copyto of X into the output buffer, split in ``threads`` chunks."""
    if threads == 1:
        return lambda i: np.copyto(pb.out[i], pb.x[i])
    chunks = [(np.array_split(d.reshape(-1), threads), np.array_split(s.reshape(-1), threads))
              for d, s in zip(pb.out, pb.x)]

    def call(i):
        dst, src = chunks[i]
        futures = [pool.submit(np.copyto, d, s) for d, s in zip(dst[1:], src[1:])]
        np.copyto(dst[0], src[0])            # the calling thread copies the first chunk
        for f in futures:
            f.result()

    return call


def numpy_softmax(x, out):
    """Softmax over axis 1 into ``out``; returns the row max and the sum of exponentials."""
    m = x.max(axis=1, keepdims=True)
    np.subtract(x, m, out=out)
    np.exp(out, out=out)
    s = out.sum(axis=1, keepdims=True)
    out /= s
    return m, s


def numpy_loss(x, y, m, s, ignore_index):
    """Mean cross-entropy from the softmax's max and sum: log s + m - x_y, in float64."""
    valid = y != ignore_index
    yc = np.where(valid, y, 0).astype(np.intp)[:, None]
    xy = np.take_along_axis(x, yc, axis=1)[:, 0]
    pix = np.log(s[:, 0], dtype=np.float64) + m[:, 0] - xy
    count = np.count_nonzero(valid)
    return pix[valid].sum() / count if count else 0.0


def numpy_grad_inplace(p, y, ignore_index):
    """Turn softmax P into the mean loss's gradient in place: (P - onehot(y)) * valid / count."""
    valid = y != ignore_index
    count = np.count_nonzero(valid)
    w = (valid / count if count else np.zeros(valid.shape)).astype(p.dtype)
    yc = np.where(valid, y, 0).astype(np.intp)[:, None]
    p *= w[:, None]
    np.put_along_axis(p, yc, np.take_along_axis(p, yc, axis=1) - w[:, None], axis=1)
    return p


def numpy_calls(pb):
    def softmax(i):
        numpy_softmax(pb.x[i], pb.out[i])

    def forward(i):
        m, s = numpy_softmax(pb.x[i], pb.out[i])
        return numpy_loss(pb.x[i], pb.y[i], m, s, pb.ignore_index)

    def backward(i):
        np.copyto(pb.out[i], pb.prob[i])
        return numpy_grad_inplace(pb.out[i], pb.y[i], pb.ignore_index)

    def fused(i):
        m, s = numpy_softmax(pb.x[i], pb.out[i])
        loss = numpy_loss(pb.x[i], pb.y[i], m, s, pb.ignore_index)
        numpy_grad_inplace(pb.out[i], pb.y[i], pb.ignore_index)
        return loss

    return {"softmax": softmax, "forward": forward, "backward": backward, "fused": fused}


def torch_calls(torch, pb):
    """PyTorch on zero-copy views of the same arrays (int64 labels made off the clock)."""
    F = torch.nn.functional
    xs = [torch.from_numpy(x) for x in pb.x]
    ys = [torch.from_numpy(y.astype(np.int64)) for y in pb.y]
    ig = pb.ignore_index
    leaves = [torch.from_numpy(x).requires_grad_() for x in pb.x]
    graphs = []

    def softmax(i):
        return torch.softmax(xs[i], 1)

    def forward(i):
        return F.cross_entropy(xs[i], ys[i], ignore_index=ig)

    def backward(i):
        if not graphs:                       # one forward per set, built on first use
            graphs.extend(F.cross_entropy(v, t, ignore_index=ig) for v, t in zip(leaves, ys))
        return torch.autograd.grad(graphs[i], leaves[i], retain_graph=True)[0]

    def fused(i):
        loss = F.cross_entropy(leaves[i], ys[i], ignore_index=ig)
        return loss, torch.autograd.grad(loss, leaves[i])[0]

    return {"softmax": softmax, "forward": forward, "backward": backward, "fused": fused}


class SklearnFused:
    """HalfMultinomialLoss.loss_gradient on NHWC rows; ignored pixels weigh 0, others 1/count."""

    def __init__(self, loss_cls, pb):
        C = pb.shape[1]
        self.loss = loss_cls(n_classes=C)
        self.raw, self.y, self.w, self.lo, self.go = [], [], [], [], []
        for x, y in zip(pb.x, pb.y):
            valid = y != pb.ignore_index
            count = max(np.count_nonzero(valid), 1)
            self.raw.append(np.ascontiguousarray(np.moveaxis(x, 1, -1)).reshape(-1, C))
            self.y.append(np.where(valid, y, 0).astype(pb.dtype).reshape(-1))
            self.w.append((valid / count).astype(pb.dtype).reshape(-1))
            self.lo.append(np.empty(self.y[-1].shape, pb.dtype))
            self.go.append(np.empty_like(self.raw[-1]))

    def call(self, threads):
        def fused(i):
            self.loss.loss_gradient(self.y[i], self.raw[i], sample_weight=self.w[i],
                                    loss_out=self.lo[i], gradient_out=self.go[i],
                                    n_threads=threads)
            return self.lo[i].sum(dtype=np.float64)
        return fused

    def grad_nchw(self, i, shape):
        g = self.go[i].reshape((shape[0],) + tuple(shape[2:]) + (shape[1],))
        return np.moveaxis(g, -1, 1)


# ---- optional libraries ---------------------------------------------------------------


def import_peers(with_torch, with_sklearn):
    """(torch module or None, HalfMultinomialLoss or None, notes on what was skipped)."""
    torch = loss_cls = None
    notes = []
    if with_torch:
        try:
            import torch
        except ImportError as e:
            notes.append(f"PyTorch skipped: not importable ({e}).")
    if with_sklearn:
        try:
            from sklearn._loss.loss import HalfMultinomialLoss as loss_cls
        except ImportError as e:
            notes.append(f"scikit-learn skipped: not importable ({e}).")
    return torch, loss_cls, notes


# ---- correctness check (once, off the clock) -----------------------------------------


def check_agreement(ssm, pb, torch, sk):
    """Each implementation's loss and gradient on set 0 against ssm's; returns check records."""
    x, y, ig = pb.x[0], pb.y[0], pb.ignore_index
    loss, dx = ssm.spatial_softmax_with_loss_and_grad(x, y, ignore_index=ig, threads=1)
    ref_loss, gmax = float(loss), float(np.abs(dx).max()) or 1.0
    found = {"ssm forward": (float(ssm.spatial_softmax_with_loss(x, y, ignore_index=ig)[1]),
                             None)}
    p = np.empty_like(x)
    m, s = numpy_softmax(x, p)
    nl = numpy_loss(x, y, m, s, ig)
    found["numpy"] = (float(nl), numpy_grad_inplace(p, y, ig))
    if torch is not None:
        leaf = torch.from_numpy(x.copy()).requires_grad_()
        tl = torch.nn.functional.cross_entropy(leaf, torch.from_numpy(y.astype(np.int64)),
                                               ignore_index=ig)
        found["torch"] = (tl.item(), torch.autograd.grad(tl, leaf)[0].numpy())
    if sk is not None:
        found["sklearn"] = (float(sk.call(1)(0)), sk.grad_nchw(0, pb.shape))
    checks = []
    for impl, (value, grad) in found.items():
        rel = abs(value - ref_loss) / max(abs(ref_loss), 1e-30)
        gerr = None if grad is None else float(np.abs(grad - dx).max()) / gmax
        ok = rel <= LOSS_RTOL and (gerr is None or gerr <= GRAD_RTOL)
        checks.append({"impl": impl, "loss": value, "ssm_loss": ref_loss, "loss_rel_err": rel,
                       "grad_err_rel_max": gerr, "ok": ok})
    return checks


# ---- the sweep ---------------------------------------------------------------------------


class Progress:
    """One line per row on stderr (overwritten in place on a terminal)."""

    def __init__(self, total, enabled):
        self.total, self.done, self.enabled = total, 0, enabled
        self.tty = enabled and sys.stderr.isatty()

    def step(self, label):
        self.done += 1
        if self.enabled:
            end = "" if self.tty else "\n"
            print(f"\r[{self.done:2d}/{self.total}] {label:<40}", end=end, file=sys.stderr,
                  flush=True)

    def close(self):
        if self.tty:
            print("\r" + " " * 60 + "\r", end="", file=sys.stderr, flush=True)


def _once(make):
    """A memoised ``make()``."""
    cache = []

    def get():
        if not cache:
            cache.append(make())
        return cache[0]
    return get


def torch_row(torch, calls, threads, op):
    torch.set_num_threads(threads)
    return calls()[op]


def plan_cpu(ssm, pb, threads_list, ops, torch, sk, pool):
    """The rows to time, in order: per thread count copy, ssm, torch, sklearn; NumPy at 1.

    Each row is (op, impl, threads, make), ``make()`` returning the ``fn(i)`` to time.
    """
    plan = []
    tcalls = _once(lambda: torch_calls(torch, pb))
    for k in threads_list:
        plan.append((COPY_OP, "copy", k, lambda k=k: copy_call(pb, k, pool)))
        plan += [(op, "ssm", k, lambda op=op, k=k: ssm_calls(ssm, pb, k)[op]) for op in ops]
        if torch is not None:
            plan += [(op, "torch", k, lambda op=op, k=k: torch_row(torch, tcalls, k, op))
                     for op in ops]
        if sk is not None and "fused" in ops:
            plan.append(("fused", "sklearn", k, lambda k=k: sk.call(k)))
        if k == threads_list[0]:         # NumPy does not thread: one row per op, at 1
            plan += [(op, "numpy", 1, lambda op=op: numpy_calls(pb)[op]) for op in ops]
    return plan


def run_plan(plan, pb, args, timer_for, wait=lambda: None):
    """Time every row of the plan; ``timer_for(impl)`` gives the timer of that row."""
    progress = Progress(len(plan), not args.quiet)
    rows = []
    for op, impl, k, make in plan:
        progress.step(f"{op} {impl} {k if k else 'gpu'}{'T' if k else ''}")
        wait()
        times, other = timer_for(impl)(make(), pb.n_sets, args.budget, args.min_reps)
        rows.append(Row(op, impl, k, pb.op_bytes(op), times, other))
    progress.close()
    return rows


# ---- derived figures and the tables ---------------------------------------------------------


def derive(rows):
    """Per row: GB/s, floor, x floor, speedup and efficiency (vs its own lowest thread
    count) and the peer's time over ssm's at the same thread count."""
    copies = {r.threads: r for r in rows if r.op == COPY_OP}
    base = {}
    for r in rows:
        key = (r.op, r.impl)
        if key not in base or (r.threads or 0) < (base[key].threads or 0):
            base[key] = r
    ssm_at = {(r.op, r.threads): r for r in rows if r.impl == "ssm"}
    out = []
    for r in rows:
        d = {"op": r.op, "impl": r.impl, "threads": r.threads, "bytes": r.nbytes,
             "reps": len(r.times_ns), "median_ms": r.median_ms, "min_ms": r.min_ms,
             "max_ms": r.max_ms, "iqr_ms": list(r.quartiles_ms()),
             "gbps": r.nbytes / r.median_ms / 1e6, "other_cores": r.other_cores,
             "spread": r.spread, "times_ms": [t / 1e6 for t in r.times_ns]}
        cp = copies.get(r.threads)
        d["floor_ms"] = cp.median_ms * r.nbytes / cp.nbytes if cp else None
        d["x_floor"] = r.median_ms / d["floor_ms"] if cp else None
        b = base[(r.op, r.impl)]
        d["speedup"] = b.median_ms / r.median_ms
        d["efficiency"] = (d["speedup"] * (b.threads / r.threads)
                           if r.threads and b.threads else None)
        s = ssm_at.get((r.op, r.threads))
        d["vs_ssm"] = r.median_ms / s.median_ms if s and r.impl != "ssm" else None
        d["flags"] = flags_of(r)
        out.append(d)
    return out


def flags_of(r):
    f = ""
    if r.other_cores is not None and r.other_cores > BUSY_CORES:
        f += "!"
    if r.spread > WIDE_SPREAD:
        f += "~"
    return f


def _fmt(v, spec, width):
    return f"{'-':>{width}}" if v is None else f"{v:{width}{spec}}"


def _mb(n):
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _ms(v):
    """Milliseconds with about three significant digits."""
    if v is None:
        return "-"
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}" if v >= 10 else f"{v:.2f}" if v >= 1 \
        else f"{v:.3g}"


HEADER = (f"{'impl':<8} {'thr':>3} {'median ms':>10} {'min-max ms':>17} {'GB/s':>6} "
          f"{'floor ms':>8} {'x floor':>7} {'speedup':>7} {'eff':>5} {'x ssm':>6} "
          f"{'other':>5}")


def format_row(d):
    thr = "gpu" if d["threads"] is None else str(d["threads"])
    eff = "-" if d["efficiency"] is None else f"{100 * d['efficiency']:.0f}%"
    rng = f"{_ms(d['min_ms'])}-{_ms(d['max_ms'])}"
    return (f"{d['impl']:<8} {thr:>3} {_ms(d['median_ms']):>10} {rng:>17} {d['gbps']:6.1f} "
            f"{_ms(d['floor_ms']):>8} {_fmt(d['x_floor'], '.1f', 7)} "
            f"{d['speedup']:7.2f} {eff:>5} {_fmt(d['vs_ssm'], '.1f', 6)} "
            f"{_fmt(d['other_cores'], '.2f', 5)} {d['flags']}").rstrip()


def format_tables(derived, pb, device="cpu"):
    lines = []
    X, L = pb.x_bytes, pb.label_bytes
    how = "device-to-device copy" if device == "cuda" else "np.copyto"
    titled = {COPY_OP: (f"copy floor ({how} into a preallocated buffer)", 2, 0)}
    titled.update(OPS)
    for op, (title, kx, kl) in titled.items():
        ds = [d for d in derived if d["op"] == op]
        if not ds:
            continue
        model = f"{kx}X" + (f"+{kl if kl > 1 else ''}L" if kl else "")
        lines += ["", f"{title}: {model} = {_mb(kx * X + kl * L)}", HEADER]
        order = {name: n for n, name in enumerate(("copy",) + IMPLS)}
        ds.sort(key=lambda d: (order.get(d["impl"], 99), d["threads"] or 0))
        lines += [format_row(d) for d in ds]
    return lines


def describe_problem(pb, args):
    label = f"{pb.name} " if pb.name else ""
    cold = pb.n_sets * pb.x_bytes >= pb.rotate_bytes
    cache = "" if cold else " (small: data stays in cache)"
    return (f"ssm.bench: {label}{'x'.join(map(str, pb.shape))} {pb.dtype} logits, "
            f"{pb.label_dtype} labels ({IGNORE_FRACTION:.0%} = {pb.ignore_index}), "
            f"X = {_mb(pb.x_bytes)}, L = {_mb(pb.label_bytes)}; {pb.n_sets} rotating sets"
            f"{cache}; budget {args.budget:g} s/row, >= {args.min_reps} reps, median")


def summary_lines(derived, checks, notes, loads):
    lines = [""]
    busy = [d for d in derived if "!" in d["flags"]]
    wide = [d for d in derived if "~" in d["flags"]]
    before, during = loads.get("before"), loads.get("during")
    if before is not None and during is not None:
        lines.append(f"Foreign load: {before:.2f} cores before the run, {during:.2f} during it "
                     f"(rows shorter than {MIN_LOAD_WINDOW_S} s show none of their own).")
    counts = (f"{len(busy)} of {len(derived)} rows ran while other processes used more than "
              f"{BUSY_CORES} cores (!), {len(wide)} had a min-max range wider than "
              f"{WIDE_SPREAD:.0%} of the median (~)")
    if busy or len(wide) > NOISY_ROWS * len(derived) or (during or 0) > BUSY_CORES:
        lines.append(f"WARNING: the machine was noisy: {counts}. Compare ratios within this "
                     "run (x floor, x ssm), not absolute times across runs.")
    elif wide:
        lines.append(f"Mostly quiet: {counts}; medians are robust to those outliers.")
    for c in checks:
        if not c["ok"]:
            lines.append(f"WARNING: {c['impl']} disagrees with ssm: loss {c['loss']:.8g} vs "
                         f"{c['ssm_loss']:.8g} (rel {c['loss_rel_err']:.1e}), gradient "
                         f"max err {_fmt(c['grad_err_rel_max'], '.1e', 0)} of max|dX|.")
    if checks and all(c["ok"] for c in checks):
        worst = max(c["loss_rel_err"] for c in checks)
        lines.append(f"Checked once: every loss agrees with ssm's (worst rel {worst:.1e}) and "
                     f"every gradient to {GRAD_RTOL:g} of max|dX|.")
    lines += notes
    lines.append("Columns: floor = copy time at the same threads scaled to the op's bytes; "
                 "x floor = median / floor; speedup and eff vs the same impl's lowest thread "
                 "count; x ssm = time / ssm's time at the same threads; other = foreign "
                 "load in cores.")
    return lines


# ---- machine and versions ------------------------------------------------------------------


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_bytes():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def usable_cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def machine_info():
    return {"cpu": _cpu_model(), "cores": usable_cores(), "logical_cpus": os.cpu_count(),
            "memory_bytes": _memory_bytes(), "platform": platform.platform(),
            "hostname": platform.node()}


def machine_slug():
    """A short directory-friendly name such as "amd-epyc-2c"."""
    words = "".join(ch if ch.isalnum() else " " for ch in _cpu_model().lower()).split()
    words = [w for w in words if w not in {"processor", "cpu", "r", "tm", "with", "core"}]
    return "-".join(words[:4] + [f"{usable_cores()}c"])


def versions():
    v = {"python": platform.python_version(), "numpy": np.__version__}
    for name in ("ssm", "torch", "sklearn", "matplotlib", "cupy", "threadpoolctl"):
        mod = sys.modules.get(name)
        if mod is not None:
            v[name] = getattr(mod, "__version__", "?")
    try:
        from threadpoolctl import threadpool_info
        v["threadpools"] = [{k: i.get(k) for k in ("internal_api", "filepath", "version",
                                                   "num_threads")} for i in threadpool_info()]
    except ImportError:
        pass
    return v


# ---- outputs: JSON and the plot ---------------------------------------------------------------


def write_json(path, report):
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
        f.write("\n")


def plot(path, derived, title):
    """Two panels: thread scaling of each ssm op (ideal line), and ssm vs peers at max threads."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("ssm.bench: --plot needs matplotlib (pip install matplotlib)") from None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5.2))
    _plot_scaling(ax1, derived)
    _plot_peers(ax2, derived)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_scaling(ax, derived):
    threads = sorted({d["threads"] for d in derived if d["threads"]})
    for op in (COPY_OP,) + tuple(OPS):
        ds = sorted((d for d in derived if d["op"] == op and d["impl"] in ("ssm", "copy")),
                    key=lambda d: d["threads"] or 0)
        if ds and ds[0]["threads"]:
            style = dict(ls="--", color="gray") if op == COPY_OP else dict(marker="o")
            ax.plot([d["threads"] for d in ds], [d["speedup"] for d in ds],
                    label="copy (floor)" if op == COPY_OP else f"ssm {op}", **style)
    if not threads:
        ax.text(0.5, 0.5, "one device: no thread scaling", ha="center", transform=ax.transAxes)
        ax.set_axis_off()
        return
    ax.plot(threads, [t / threads[0] for t in threads], ":", color="black", label="ideal")
    ax.set_xscale("log", base=2)
    ax.set_xticks(threads, [str(t) for t in threads])
    ax.set_xlabel("threads")
    ax.set_ylabel("speedup (median, vs lowest thread count)")
    ax.set_title("Thread scaling")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _plot_peers(ax, derived):
    from matplotlib import ticker
    ops = [op for op in OPS if any(d["op"] == op for d in derived)]
    top = max((d["threads"] or 0) for d in derived)
    pick = {}
    for d in derived:
        if d["op"] in OPS and (d["threads"] or 0) in (top, 1 if d["impl"] == "numpy" else top):
            pick[(d["op"], d["impl"])] = d
    impls = [i for i in IMPLS if any((op, i) in pick for op in ops)]
    width = 0.8 / max(len(impls), 1)
    for j, impl in enumerate(impls):
        xs = [n + (j - (len(impls) - 1) / 2) * width for n, op in enumerate(ops)
              if (op, impl) in pick]
        ys = [pick[(op, impl)]["median_ms"] for op in ops if (op, impl) in pick]
        label = f"{impl} (1 thread)" if impl == "numpy" and top != 1 else impl
        bars = ax.bar(xs, ys, width, label=label)
        ax.bar_label(bars, fmt="%.3g", fontsize=7)
    floors = [(n, pick[(op, "ssm")]["floor_ms"]) for n, op in enumerate(ops)
              if (op, "ssm") in pick and pick[(op, "ssm")]["floor_ms"]]
    for n, f in floors:
        ax.hlines(f, n - 0.45, n + 0.45, colors="black", linestyles="--",
                  label="copy floor (same bytes)" if n == floors[0][0] else None)
    ax.set_xticks(range(len(ops)), ops)
    ax.set_yscale("log")
    lowest = min([f for _, f in floors] + [d["median_ms"] for d in pick.values()], default=1)
    ax.set_ylim(bottom=lowest / 1.6)
    plain = ticker.FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.tick_params(axis="y", which="minor", labelsize=7)
    ax.set_ylabel("median ms (log scale, lower is better)")
    ax.set_title(f"ssm vs peers at {top} thread{'s' if top != 1 else ''}" if top
                 else "ssm vs peers on the GPU")
    ax.grid(axis="y", alpha=0.3, which="both")
    ax.legend(fontsize=8)


# ---- CPU and GPU drivers ------------------------------------------------------------------------


def default_threads():
    n = usable_cores()
    ts = [1 << i for i in range(n.bit_length()) if (1 << i) <= n]
    return ts + ([n] if ts[-1] != n else [])


def run_cpu(ssm, args, name, shape):
    pb = make_problem(name, shape, args.dtype, args.labels, ssm)
    torch, loss_cls, notes = import_peers(not args.no_torch, not args.no_sklearn)
    sk = SklearnFused(loss_cls, pb) if loss_cls is not None and "fused" in args.ops else None
    if sk is not None:
        notes.append("sklearn: HalfMultinomialLoss.loss_gradient on NHWC rows transposed off "
                     "the clock (an NCHW user also pays two transposes); fused only.")
    notes.append("numpy: vectorised reference, one thread only (NumPy ufuncs do not thread).")
    if torch is not None:
        notes.append("torch: softmax, cross_entropy forward, backward via autograd.grad, "
                     "forward+backward; outputs are fresh tensors (torch has no out=), "
                     "freed off the clock.")
    checks = check_agreement(ssm, pb, torch, sk)
    loads = {"before": probe_load()}
    print(describe_problem(pb, args), flush=True)
    wait = QuietWait(args.max_wait)
    meter = LoadMeter()
    with ThreadPoolExecutor(max(args.threads)) as pool:
        plan = plan_cpu(ssm, pb, args.threads, args.ops, torch, sk, pool)
        rows = run_plan(plan, pb, args, lambda impl: time_cpu, wait)
    loads["during"] = meter.stop()
    if args.max_wait > 0:
        notes.append(f"Waited {wait.waited:.1f} s (of --max-wait {args.max_wait:g}) for "
                     f"other processes to drop below {BUSY_CORES} cores before rows.")
    return pb, rows, checks, notes, loads


def cuda_modules():
    """(cupy, torch-with-CUDA or None); SystemExit with a clear message without a device."""
    try:
        import cupy
        if cupy.cuda.runtime.getDeviceCount() < 1:
            raise RuntimeError("no CUDA device visible")
    except Exception as e:  # ImportError, CUDARuntimeError, RuntimeError
        raise SystemExit(f"ssm.bench: --device cuda needs CuPy and a CUDA device ({e}). "
                         "Install cupy-cuda12x (pip install 'ssm[cuda12]') on a GPU machine, "
                         "or run with --device cpu.") from None
    try:
        import torch
        torch = torch if torch.cuda.is_available() else None
    except ImportError:
        torch = None
    return cupy, torch


def time_cuda_with(events):
    """A timer like time_cpu, for GPU work, from ``events() -> (start, stop, elapsed_ms)``."""
    def timer(fn, n_sets, budget, min_reps):
        for i in range(max(WARMUP, n_sets)):
            fn(i % n_sets)
        start, stop, elapsed_ms = events()
        stop.record()
        stop.synchronize()
        times, deadline, i = [], time.perf_counter() + budget, 0
        while len(times) < min_reps or (len(times) < MAX_REPS and time.perf_counter() < deadline):
            start.record()
            result = fn(i % n_sets)
            stop.record()
            stop.synchronize()
            del result
            times.append(int(elapsed_ms(start, stop) * 1e6))
            i += 1
        return times, None
    return timer


def make_gpu_problem(cupy, name, shape, args):
    """The CPU problem's data, moved to the GPU, with sets covering twice the device's L2."""
    dtype, label_dtype = np.dtype(args.dtype), np.dtype(args.labels)
    ignore_index = 255 if label_dtype == np.uint8 else -1
    l2 = cupy.cuda.Device().attributes.get("L2CacheSize", 50 << 20)
    x_bytes = math.prod(shape) * dtype.itemsize
    n = max(2, min(MAX_SETS, math.ceil(2 * l2 / x_bytes)))
    rng = np.random.default_rng(SEED)
    pix = (shape[0],) + tuple(shape[2:])
    xs = [cupy.asarray((2 * rng.standard_normal(shape)).astype(dtype)) for _ in range(n)]
    ys = [cupy.asarray(make_labels(rng, pix, shape[1], label_dtype, ignore_index))
          for _ in range(n)]
    ps = [cupy.exp(x - x.max(axis=1, keepdims=True)) for x in xs]
    ps = [p / p.sum(axis=1, keepdims=True) for p in ps]
    outs = [cupy.zeros_like(x) for x in xs]
    return Problem(name, tuple(shape), dtype, label_dtype, ignore_index, xs, ys, ps, outs,
                   rotate_bytes=2 * l2)


def plan_gpu(cupy, ssm, torch, pb, ops, validate):
    plan = [(COPY_OP, "copy", None, lambda: (lambda i: cupy.copyto(pb.out[i], pb.x[i])))]
    calls = ssm_calls(ssm, pb, None)
    if not validate:
        calls.update(gpu_ssm_unvalidated(ssm, pb))
    plan += [(op, "ssm", None, lambda op=op: calls[op]) for op in ops]
    if torch is not None:
        tpb = Problem(pb.name, pb.shape, pb.dtype, pb.label_dtype, pb.ignore_index,
                      [torch.from_dlpack(x) for x in pb.x],
                      [torch.from_dlpack(y.astype(cupy.int64)) for y in pb.y], [], [])
        tcalls = torch_gpu_calls(torch, tpb)
        plan += [(op, "torch", None, lambda op=op: tcalls[op]) for op in ops]
    return plan


def gpu_ssm_unvalidated(ssm, pb):
    """The loss calls with validate=False: no device-to-host read per call."""
    kw = dict(ignore_index=pb.ignore_index, validate=False)
    return {
        "forward": lambda i: ssm.spatial_softmax_with_loss(pb.x[i], pb.y[i], out=pb.out[i], **kw),
        "backward": lambda i: ssm.spatial_softmax_with_loss_grad(pb.prob[i], pb.y[i],
                                                                 out=pb.out[i], **kw),
        "fused": lambda i: ssm.spatial_softmax_with_loss_and_grad(pb.x[i], pb.y[i],
                                                                  out=pb.out[i], **kw),
    }


def torch_gpu_calls(torch, tpb):
    F = torch.nn.functional
    ig = tpb.ignore_index
    leaves = [x.detach().requires_grad_() for x in tpb.x]
    graphs = []

    def backward(i):
        if not graphs:
            graphs.extend(F.cross_entropy(v, t, ignore_index=ig) for v, t in zip(leaves, tpb.y))
        return torch.autograd.grad(graphs[i], leaves[i], retain_graph=True)[0]

    def fused(i):
        loss = F.cross_entropy(leaves[i], tpb.y[i], ignore_index=ig)
        return loss, torch.autograd.grad(loss, leaves[i])[0]

    return {"softmax": lambda i: torch.softmax(tpb.x[i], 1),
            "forward": lambda i: F.cross_entropy(tpb.x[i], tpb.y[i], ignore_index=ig),
            "backward": backward, "fused": fused}


def run_gpu(ssm, args, name, shape):
    cupy, torch = cuda_modules()
    pb = make_gpu_problem(cupy, name, shape, args)
    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    notes = [f"GPU: {props['name'].decode()}; CUDA events on the current stream; floor = "
             "device-to-device copy of the same bytes."]
    if torch is None:
        notes.append("PyTorch CUDA skipped: torch with CUDA not importable.")
    checks = check_gpu(ssm, torch, pb)

    def cupy_events():
        return cupy.cuda.Event(), cupy.cuda.Event(), cupy.cuda.get_elapsed_time

    def torch_events():
        start, stop = (torch.cuda.Event(enable_timing=True) for _ in range(2))
        return start, stop, lambda a, b: a.elapsed_time(b)

    timers = {"torch": time_cuda_with(torch_events), "other": time_cuda_with(cupy_events)}
    print(describe_problem(pb, args), flush=True)
    plan = plan_gpu(cupy, ssm, torch, pb, args.ops, not args.no_validate)
    rows = run_plan(plan, pb, args, lambda impl: timers.get(impl, timers["other"]))
    return pb, rows, checks, notes, {}


def check_gpu(ssm, torch, pb):
    """ssm's fused loss on the GPU against torch's (once, off the clock)."""
    try:
        loss, _ = ssm.spatial_softmax_with_loss_and_grad(pb.x[0], pb.y[0],
                                                         ignore_index=pb.ignore_index)
    except NotImplementedError as e:
        raise SystemExit(f"ssm.bench: this ssm build cannot run on the GPU ({e})") from None
    if torch is None:
        return []
    tl = torch.nn.functional.cross_entropy(torch.from_dlpack(pb.x[0]),
                                           torch.from_dlpack(pb.y[0].astype("int64")),
                                           ignore_index=pb.ignore_index).item()
    ref = float(loss)
    rel = abs(tl - ref) / max(abs(ref), 1e-30)
    return [{"impl": "torch", "loss": tl, "ssm_loss": ref, "loss_rel_err": rel,
             "grad_err_rel_max": None, "ok": rel <= LOSS_RTOL}]


# ---- command line ------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m ssm.bench",
        description="Thread-scaling benchmark of ssm (softmax, loss forward, loss backward, "
                    "fused loss+grad) against a copy of the same bytes and against PyTorch, "
                    "NumPy and scikit-learn, all in one run.",
        epilog="Workloads: " + "; ".join(f"{k}: {v[0]} {'x'.join(map(str, v[1]))}"
                                         for k, v in WORKLOADS.items()))
    p.add_argument("--workload", choices=sorted(WORKLOADS), default=None,
                   help=f"a standard workload (default: {DEFAULT_WORKLOAD} unless --shape)")
    p.add_argument("--shape", type=int, nargs="+", metavar="DIM",
                   help="logits shape N C [spatial...], e.g. --shape 8 21 256 256")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                   help="logits dtype (default float32)")
    p.add_argument("--labels", choices=("int64", "int32", "uint8"), default="int64",
                   help="label dtype (default int64; uint8 ignores label 255)")
    p.add_argument("--threads", type=_thread_list, default=None,
                   help="comma-separated thread counts (default: 1, 2, 4, ... up to the "
                        f"usable cores, here {','.join(map(str, default_threads()))})")
    p.add_argument("--ops", type=_op_list, default=tuple(OPS),
                   help=f"comma-separated subset of {','.join(OPS)} (default: all)")
    p.add_argument("--device", choices=("cpu", "cuda", "cudasim"), default="cpu",
                   help="cpu (NumPy arrays), cuda (CuPy arrays, CUDA events) or cudasim "
                        "(the memory-traffic table of the CUDA kernels, simulated)")
    p.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S,
                   help=f"seconds of timed calls per row (default {DEFAULT_BUDGET_S})")
    p.add_argument("--min-reps", type=int, default=DEFAULT_MIN_REPS,
                   help=f"at least this many timed calls per row (default {DEFAULT_MIN_REPS})")
    p.add_argument("--max-wait", type=float, default=0.0, metavar="SECONDS",
                   help="before each row, wait (up to SECONDS over the whole run) until "
                        f"other processes use < {BUSY_CORES} cores (default 0: no wait)")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch rows")
    p.add_argument("--no-sklearn", action="store_true", help="skip the scikit-learn rows")
    p.add_argument("--no-validate", action="store_true",
                   help="GPU only: call ssm with validate=False (no device-to-host read)")
    p.add_argument("--json", metavar="FILE", help="write every figure, the machine and the "
                                                  "library versions to FILE")
    p.add_argument("--plot", metavar="FILE.png", help="thread scaling and ssm vs peers "
                                                      "(needs matplotlib)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = p.parse_args(argv)
    if args.shape is not None and args.workload is not None:
        p.error("give --workload or --shape, not both")
    if args.shape is not None and (len(args.shape) < 2 or min(args.shape) < 1):
        p.error("--shape: expected N C [spatial...] with every extent >= 1")
    if args.budget < 0 or args.min_reps < 1 or args.max_wait < 0:
        p.error("--budget and --max-wait must be >= 0 and --min-reps >= 1")
    if args.threads is None:
        args.threads = default_threads()
    return args


def _thread_list(text):
    try:
        ts = sorted({int(t) for t in text.split(",") if t.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list like 1,2,4") from None
    if not ts or ts[0] < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: thread counts must be >= 1")
    return ts


def _op_list(text):
    ops = tuple(o.strip() for o in text.split(",") if o.strip())
    bad = [o for o in ops if o not in OPS]
    if bad or not ops:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a subset of {','.join(OPS)}")
    return tuple(op for op in OPS if op in ops)


def workload_of(args):
    if args.shape is not None:
        return "", tuple(args.shape)
    name, shape = WORKLOADS[args.workload or DEFAULT_WORKLOAD]
    return name, shape


TRAFFIC_SCALE = 16  # spatial dims divided by this for --device cudasim


def traffic_lines(ssm, dtype=np.float32):
    """The --device cudasim table: per workload (scaled down), layout and op, the sector
    efficiency of the logits kernel and of all launches, and traffic against the model."""
    from ssm.testing import cudasim

    rng = np.random.default_rng(SEED)
    lines = ["ssm.bench: memory traffic of the CUDA kernels on the simulator "
             f"({np.dtype(dtype)}, int64 labels; sectors of 32 bytes per warp-wide request)",
             "(traffic counts every request: re-reads of a pixel's logits, which L1/L2 serve "
             "on a GPU, included)",
             f"{'workload':32s} {'layout':6s} {'op':9s} {'kernel':27s} {'kernel eff':>10s} "
             f"{'all eff':>8s} {'traffic/model':>13s}"]
    for key, (title, (N, C, *spatial)) in WORKLOADS.items():
        N, spatial = min(N, 2), [max(1, d // TRAFFIC_SCALE) for d in spatial]
        x = (2.0 * rng.standard_normal((N, C, *spatial))).astype(dtype)
        y = rng.integers(0, C, (N, *spatial))
        for layout in ("NCHW", "NHWC"):
            xl = x if layout == "NCHW" else np.ascontiguousarray(np.moveaxis(x, 1, -1))
            xd, yd = cudasim.asarray(xl), cudasim.asarray(y)
            prob = ssm.softmax(xd, layout=layout)
            calls = {"softmax": lambda: ssm.softmax(xd, layout=layout),
                     "forward": lambda: ssm.spatial_softmax_with_loss(
                         xd, yd, layout=layout, validate=False),
                     "backward": lambda: ssm.spatial_softmax_with_loss_grad(
                         prob, yd, layout=layout, validate=False),
                     "fused": lambda: ssm.spatial_softmax_with_loss_and_grad(
                         xd, yd, layout=layout, validate=False)}
            for op, call in calls.items():
                with cudasim.traffic() as log:
                    call()
                main = max(log, key=lambda r: r.sector_bytes)
                useful = sum(r.useful_bytes for r in log)
                moved = sum(r.sector_bytes for r in log)
                _, kx, kl = OPS[op]
                model = kx * x.nbytes + kl * y.nbytes
                lines.append(f"{title + ' ' + str((N, C, *spatial)):32s} {layout:6s} {op:9s} "
                             f"{main.name:27s} {main.sector_efficiency:10.1%} "
                             f"{useful / moved:8.1%} {moved / model:13.2f}")
    return lines


def main(argv=None):
    args = parse_args(argv)
    import ssm
    if args.device == "cudasim":
        for line in traffic_lines(ssm, np.dtype(args.dtype)):
            print(line)
        return 0
    t0 = time.perf_counter()
    name, shape = workload_of(args)
    runner = run_gpu if args.device == "cuda" else run_cpu
    pb, rows, checks, notes, loads = runner(ssm, args, name, shape)
    derived = derive(rows)
    for line in format_tables(derived, pb, args.device) + summary_lines(derived, checks, notes,
                                                                         loads):
        print(line)
    wall = time.perf_counter() - t0
    print(f"Wall time {wall:.1f} s.")
    title = describe_problem(pb, args).removeprefix("ssm.bench: ")
    if args.json:
        argv = sys.argv[1:] if argv is None else list(argv)
        write_json(args.json, build_report(args, argv, pb, derived, checks, notes, loads, wall))
    if args.plot:
        plot(args.plot, derived, title)
    return 0


def build_report(args, argv, pb, derived, checks, notes, loads, wall):
    return {
        "tool": "ssm.bench", "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "argv": argv, "device": args.device,
        "workload": {"name": pb.name, "shape": list(pb.shape), "dtype": str(pb.dtype),
                     "labels": str(pb.label_dtype), "ignore_index": pb.ignore_index,
                     "ignore_fraction": IGNORE_FRACTION, "n_sets": pb.n_sets,
                     "x_bytes": pb.x_bytes, "label_bytes": pb.label_bytes,
                     "op_bytes": {op: pb.op_bytes(op) for op in (COPY_OP,) + tuple(OPS)}},
        "method": {"budget_s": args.budget, "max_wait_s": args.max_wait,
                   "min_reps": args.min_reps, "max_reps": MAX_REPS,
                   "warmup": max(WARMUP, pb.n_sets), "threads": args.threads,
                   "busy_cores": BUSY_CORES, "wide_spread": WIDE_SPREAD, "seed": SEED},
        "machine": machine_info(), "versions": versions(),
        "foreign_load_cores": loads, "rows": derived, "checks": checks,
        "notes": notes, "wall_s": wall,
    }


if __name__ == "__main__":
    sys.exit(main())
