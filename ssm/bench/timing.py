"""Timing: the repetition loop (a CPU clock and a CUDA-events clock), the foreign-load
meter, the measured rows and the sweep over a plan of rows."""
from __future__ import annotations

import gc
import os
import statistics
import sys
import time
from dataclasses import dataclass, field

WARMUP = 2                       # warm-up calls, at least one per input set
MAX_REPS = 200
DEFAULT_BUDGET_S = 0.8           # seconds of timed calls per row
DEFAULT_MIN_REPS = 7
BUSY_CORES = 0.15                # foreign load above this flags a row
MIN_LOAD_WINDOW_S = 0.1          # /proc/stat ticks at 100 Hz: shorter windows say nothing


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


def _warm_up(fn, n_sets):
    for i in range(max(WARMUP, n_sets)):
        fn(i % n_sets)


def _more(times, min_reps, deadline):
    """Another timed call? At least ``min_reps``, then until the deadline or MAX_REPS."""
    return len(times) < min_reps or (len(times) < MAX_REPS and time.perf_counter() < deadline)


def time_cpu(fn, n_sets, budget, min_reps):
    """Per-call times (ns) of ``fn(i)`` over rotating sets, and the foreign load meanwhile."""
    _warm_up(fn, n_sets)
    times = []
    gc.disable()
    try:
        meter = LoadMeter()
        deadline = time.perf_counter() + budget
        i = 0
        while _more(times, min_reps, deadline):
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


def time_cuda_with(events):
    """A timer like time_cpu, for GPU work, from ``events() -> (start, stop, elapsed_ms)``."""
    def timer(fn, n_sets, budget, min_reps):
        _warm_up(fn, n_sets)
        start, stop, elapsed_ms = events()
        stop.record()
        stop.synchronize()
        times, deadline, i = [], time.perf_counter() + budget, 0
        while _more(times, min_reps, deadline):
            start.record()
            result = fn(i % n_sets)
            stop.record()
            stop.synchronize()
            del result
            times.append(int(elapsed_ms(start, stop) * 1e6))
            i += 1
        return times, None
    return timer


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


def run_plan(plan, pb, args, timer_for, wait=lambda: None):
    """Time every row of the plan; ``timer_for(impl)`` gives the timer of that row.

    A plan is a list of (op, impl, threads, make), ``make()`` returning the ``fn(i)`` to
    time on set ``i``; threads is None on the GPU.
    """
    progress = Progress(len(plan), not args.quiet)
    rows = []
    for op, impl, k, make in plan:
        progress.step(f"{op} {impl} {k if k else 'gpu'}{'T' if k else ''}")
        wait()
        times, other = timer_for(impl)(make(), pb.n_sets, args.budget, args.min_reps)
        rows.append(Row(op, impl, k, pb.op_bytes(op), times, other))
    progress.close()
    return rows
