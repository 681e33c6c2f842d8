"""The cost of a call on small inputs: each public CPU function on a few small logits
shapes, beside PyTorch's eager equivalent where it has one (``torch.nn.functional``, CPU,
one thread both). On the smallest shape the time is almost all the call's own: argument
checks, dispatch, the kernel's setup and the 0-d result.

    python benchmarks/call_overhead.py                  # this checkout's ssm
    PYTHONPATH=/tmp/old python benchmarks/call_overhead.py --no-torch   # another build

The table gives the median time of a call in microseconds (of --rounds rounds of --calls
calls, the functions taking turns) and, with PyTorch, ssm / torch (below 1: ssm is
faster). float32 logits, int64 labels (none ignored), ``threads=1``.
"""
import argparse
import statistics
import time

import numpy as np

import ssm

SHAPES = ((1, 21, 4, 4), (1, 21, 32, 64), (1, 21, 64, 128))


def _ssm_calls(x, y, out):
    return {
        "cross_entropy": lambda: ssm.cross_entropy(x, y, threads=1),
        "sswl (prob, loss)": lambda: ssm.spatial_softmax_with_loss(x, y, threads=1),
        "sswl_and_grad": lambda: ssm.spatial_softmax_with_loss_and_grad(x, y, threads=1),
        "sswl_and_grad out=": lambda: ssm.spatial_softmax_with_loss_and_grad(
            x, y, out=out, threads=1),
        "softmax": lambda: ssm.softmax(x, threads=1),
        "log_softmax": lambda: ssm.log_softmax(x, threads=1),
    }


def _torch_calls(x, y):
    import torch
    import torch.nn.functional as F
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)
    gx = tx.clone().requires_grad_()

    def fused():
        gx.grad = None
        F.cross_entropy(gx, ty).backward()
        return gx.grad

    return {
        "cross_entropy": lambda: F.cross_entropy(tx, ty),
        "sswl (prob, loss)": lambda: (torch.softmax(tx, 1), F.cross_entropy(tx, ty)),
        "sswl_and_grad": fused,
        "softmax": lambda: torch.softmax(tx, 1),
        "log_softmax": lambda: torch.log_softmax(tx, 1),
    }


def _time(calls, rounds, n):
    """Median microseconds a call of each, the calls taking turns round by round."""
    times = {name: [] for name in calls}
    for f in calls.values():  # warm up
        for _ in range(max(1, n // 10)):
            f()
    for _ in range(rounds):
        for name, f in calls.items():
            t = time.perf_counter()
            for _ in range(n):
                f()
            times[name].append((time.perf_counter() - t) / n * 1e6)
    return {name: statistics.median(v) for name, v in times.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=2000, help="calls a round on the smallest "
                    "shape (fewer on larger ones, about the same time)")
    ap.add_argument("--no-torch", action="store_true")
    a = ap.parse_args(argv)
    if not a.no_torch:
        import torch  # before any timing: every row runs with its OpenMP runtime loaded
        torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    print(f"ssm {ssm.__version__} from {ssm.__file__}")
    print(f"{'shape':17s} {'call':20s} {'ssm us':>8s} {'torch us':>9s} {'ssm/torch':>10s}")
    for shape in SHAPES:
        x = rng.standard_normal(shape).astype(np.float32)
        y = rng.integers(0, shape[1], (shape[0],) + shape[2:])
        n = max(20, a.calls * 336 // x.size)
        mine = _time(_ssm_calls(x, y, np.empty_like(x)), a.rounds, n)
        theirs = {} if a.no_torch else _time(_torch_calls(x, y), a.rounds, n)
        for name, us in mine.items():
            t = theirs.get(name)
            tail = f" {t:9.1f} {us / t:10.2f}" if t else f" {'-':>9s} {'-':>10s}"
            print(f"{str(shape):17s} {name:20s} {us:8.1f}" + tail, flush=True)


if __name__ == "__main__":
    main()
