"""``ssm-bench --busy``: ssm's default threads against one thread, quiet and beside a load.

Users run ssm beside data loaders and other processes. This mode times the fused
loss+grad on sizes from small to VOC-like, calling with ``threads=None`` (the default)
and ``threads=1`` alternately, first on the machine as it is ("quiet") and then while
one spinning process per usable core runs ("busy"; each spinner ends by itself after
the phase's time, and is killed when the phase ends). The claim measured: the default
is never much slower than one thread (median and p90), busy or not.
"""
from __future__ import annotations

import subprocess
import sys
import time

import numpy as np

from .. import _cpu

SHAPES = ((2, 21, 64, 64), (4, 21, 128, 128), (8, 21, 128, 128), (8, 21, 256, 256))
MIN_CALLS = 30           # timed calls per (shape, phase, threads), at least
PHASE_LIMIT_S = 120.0    # the spinners end by themselves after this long
SPIN = "import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end:\n    pass\n"


class Load:
    """One spinning Python process per core, for at most ``seconds``."""

    def __init__(self, cores: int, seconds: float):
        self.procs = [subprocess.Popen([sys.executable, "-c", SPIN.format(seconds=seconds)])
                      for _ in range(cores)]
        if self.procs:
            time.sleep(0.2)  # let them start spinning

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            p.kill()
        for p in self.procs:
            p.wait()


def _time_pair(ssm, x, y, out, budget, progress):
    """threads=1 and threads=None calls in ABBA order (a scheduler's rhythm would favour
    one of them in plain alternation); their times in seconds."""
    times = {1: [], None: []}
    for threads in times:  # warm-up, and the first team started outside the clock
        ssm.spatial_softmax_with_loss_and_grad(x, y, threads=threads, out=out)
    end = time.perf_counter() + budget
    while min(len(v) for v in times.values()) < MIN_CALLS or time.perf_counter() < end:
        for threads in (1, None, None, 1):
            t0 = time.perf_counter_ns()
            ssm.spatial_softmax_with_loss_and_grad(x, y, threads=threads, out=out)
            times[threads].append((time.perf_counter_ns() - t0) * 1e-9)
        progress()
    return times


def _stats(v):
    return float(np.median(v)), float(np.percentile(v, 90))


def run_busy(ssm, cores: int, budget: float, shapes=SHAPES, quiet=False):
    """Time every shape quiet then busy; returns the rows (dicts) and printable lines."""
    rng = np.random.default_rng(20261130)
    problems = []
    for shape in shapes:
        x = (2 * rng.standard_normal(shape)).astype(np.float32)
        y = rng.integers(0, shape[1], (shape[0],) + shape[2:])
        problems.append((shape, x, y, np.empty_like(x)))
    rows = []

    def progress():
        if not quiet:
            print(".", end="", file=sys.stderr, flush=True)

    for phase in ("quiet", "busy"):
        if not quiet:
            print(f"ssm.bench --busy: {phase} phase", end="", file=sys.stderr, flush=True)
        seconds = min(PHASE_LIMIT_S, 10 + 4 * budget * len(problems))
        load = Load(cores if phase == "busy" else 0, seconds)
        with load:
            for shape, x, y, out in problems:
                times = _time_pair(ssm, x, y, out, budget, progress)
                (m1, p1), (md, pd) = _stats(times[1]), _stats(times[None])
                rows.append({"phase": phase, "shape": list(shape), "calls": len(times[1]),
                             "t1_median_s": m1, "t1_p90_s": p1,
                             "default_median_s": md, "default_p90_s": pd,
                             "ratio_median": md / m1, "ratio_p90": pd / p1})
        if not quiet:
            print(file=sys.stderr)
    lines = [f"Busy machine: fused loss+grad, float32 NCHW, int64 labels; threads=None (the "
             f"default, up to {ssm.get_num_threads()}) vs threads=1, in ABBA order; "
             f"busy = {cores} spinning processes (one per usable core).",
             f"{'shape':<18} {'phase':<6} {'T1 median':>10} {'T1 p90':>8} {'default median':>15} "
             f"{'p90':>8} {'default/T1':>11} {'p90 ratio':>10}"]
    for r in rows:
        lines.append(f"{'x'.join(map(str, r['shape'])):<18} {r['phase']:<6} "
                     f"{r['t1_median_s'] * 1e3:>8.3f}ms {r['t1_p90_s'] * 1e3:>6.2f}ms "
                     f"{r['default_median_s'] * 1e3:>13.3f}ms {r['default_p90_s'] * 1e3:>6.2f}ms "
                     f"{r['ratio_median']:>11.2f} {r['ratio_p90']:>10.2f}")
    worst = max(rows, key=lambda r: r["ratio_median"])
    lines.append(f"Worst median ratio default/T1: {worst['ratio_median']:.2f} "
                 f"({'x'.join(map(str, worst['shape']))}, {worst['phase']}); below 1 the "
                 f"default is faster. OpenMP wait policy: {_cpu.wait_policy}.")
    return rows, lines
