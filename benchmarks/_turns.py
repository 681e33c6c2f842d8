"""Two ways of running one call, timed in turns in one process: the helper of
odd_sizes.py, many_classes.py, positions_rows.py and two_classes.py (imported from beside
them)."""
import time

import numpy as np

import ssm


def take_turns(fn, modes, reps, warmup=2):
    """Median seconds of ``fn()`` under each of ``modes`` (callables that set a mode up),
    the modes taking turns call by call, in reversed order every other round, after
    ``warmup`` untimed rounds. Returns the medians in the order of ``modes``."""
    times = [[] for _ in modes]
    for rep in range(warmup + reps):
        order = range(len(modes)) if rep % 2 else reversed(range(len(modes)))
        for k in order:
            modes[k]()
            t0 = time.perf_counter()
            fn()
            if rep >= warmup:
                times[k].append(time.perf_counter() - t0)
    return [float(np.median(t)) for t in times]


def loss_op(op, x, y, out, threads, layout="NCHW"):
    """A call of one of the class-axis ops by name: fused, forward, loss or softmax."""
    kw = dict(threads=threads, layout=layout)
    if op == "fused":
        return lambda: ssm.spatial_softmax_with_loss_and_grad(x, y, out=out, **kw)
    if op == "forward":
        return lambda: ssm.spatial_softmax_with_loss(x, y, out=out, **kw)
    if op == "loss":
        return lambda: ssm.cross_entropy(x, y, **kw)
    if op == "softmax":
        return lambda: ssm.softmax(x, out=out, **kw)
    raise ValueError(f"op: expected fused, forward, loss or softmax, got {op!r}")
