"""``ssm-bench --positions``: soft-argmax forward and forward+backward against the copy
floor and kornia, side by side in one run.

Workloads are keypoint heads (float32 NCHW heatmaps): ``(64, 32, 64, 64)`` and
``(16, 64, 128, 128)`` (``--shape`` gives another). Operations and their bytes:

- ``forward``: ``ssm.soft_argmax(x)``, reads x, writes (N, C, 2) keypoints;
  kornia: ``spatial_soft_argmax2d(x)``.
- ``fwd+bwd``: ``ssm.soft_argmax_grad(x, dk)``, the fused pass (recomputes the softmax and
  the keypoints, reads x once, writes dx once); kornia: its forward and
  ``backward(dk)`` through autograd (what a training step runs).

Method: the implementations' calls are interleaved (one call of each per round, the
order rotating), so that a shared machine's noise falls on all alike; each reports the
median over the rounds. Inputs rotate over sets covering 64 MiB or more (cold caches).
Floors, from ssm-bench's own (``peers``; at the same thread count, in the same rounds),
scaled to the operation's bytes (``floor_ms * op_bytes / floor_bytes``): the forward's
is the read floor (every byte of x read once), the forward+backward's the streaming
copy (x read, dx written with the kernels' non-temporal stores); ``x copy`` is against
``np.copyto`` of x split over the threads.
"""
from __future__ import annotations

import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .peers import copy_call, read_call, stream_call
from .timing import LoadMeter, QuietWait

WORKLOADS = {
    "keypoints-64": (64, 32, 64, 64),
    "keypoints-128": (16, 64, 128, 128),
}
OPS = ("forward", "fwd+bwd")
ROTATE_BYTES = 64 << 20
SEED = 20261130


class Sets:
    """Rotating input and output sets of one workload."""

    def __init__(self, shape, dtype=np.float32):
        rng = np.random.default_rng(SEED)
        self.shape = tuple(shape)
        x = (2.0 * rng.standard_normal(self.shape)).astype(dtype)
        n = max(1, min(8, -(-ROTATE_BYTES // (2 * x.nbytes))))
        self.x = [x] + [(x + np.float32(0.01 * i)).astype(dtype) for i in range(1, n)]
        N, C = self.shape[:2]
        self.dk = [rng.standard_normal((N, C, len(self.shape) - 2)).astype(dtype)
                   for _ in range(n)]
        self.kp = [np.empty((N, C, len(self.shape) - 2), dtype) for _ in range(n)]
        self.out = [np.empty_like(x) for _ in range(n)]

    @property
    def n(self):
        return len(self.x)

    def op_bytes(self, op):
        x, kp = self.x[0].nbytes, self.kp[0].nbytes
        return x + kp if op == "forward" else 2 * x + kp


def ssm_calls(ssm, sets, threads):
    def forward(i):
        return ssm.soft_argmax(sets.x[i], out=sets.kp[i], threads=threads)

    def fwd_bwd(i):
        return ssm.soft_argmax_grad(sets.x[i], sets.dk[i], out=sets.out[i], threads=threads)
    return {"forward": forward, "fwd+bwd": fwd_bwd}


def kornia_calls(torch, subpix, sets, threads):
    xs = [torch.from_numpy(x) for x in sets.x]
    dks = [torch.from_numpy(d) for d in sets.dk]

    def forward(i):
        torch.set_num_threads(threads)
        with torch.no_grad():
            return subpix.spatial_soft_argmax2d(xs[i])

    def fwd_bwd(i):
        torch.set_num_threads(threads)
        leaf = xs[i].detach().requires_grad_()
        subpix.spatial_soft_argmax2d(leaf).backward(dks[i])
        return leaf.grad
    return {"forward": forward, "fwd+bwd": fwd_bwd}


def import_kornia():
    """(torch, kornia.geometry.subpix, note): None and a note where not importable."""
    try:
        import torch
        from kornia.geometry import subpix
    except Exception as exc:  # not installed, or a broken install
        return None, None, f"kornia skipped: not importable ({type(exc).__name__}: {exc})"
    import kornia
    return torch, subpix, f"kornia {kornia.__version__}, torch {torch.__version__}"


def check_agreement(ssm, torch, subpix, sets):
    """Max |ssm - kornia| of the keypoints and of dx on set 0 (float32), or None."""
    if torch is None:
        return None
    x, dk = sets.x[0], sets.dk[0]
    kp = ssm.soft_argmax(x)
    leaf = torch.from_numpy(x).requires_grad_()
    kk = subpix.spatial_soft_argmax2d(leaf)
    kk.backward(torch.from_numpy(dk))
    dx = ssm.soft_argmax_grad(x, dk)
    return (float(np.abs(kp - kk.detach().numpy()).max()),
            float(np.abs(dx - leaf.grad.numpy()).max()))


def interleaved(calls, n_sets, rounds, budget):
    """{name: [ns per call]}: one call of each per round (the order rotating), after a
    warm-up over every set, for ``rounds`` rounds or until ``budget`` seconds."""
    names = list(calls)
    for name in names:
        for i in range(max(2, n_sets)):
            calls[name](i % n_sets)
    times = {name: [] for name in names}
    deadline = time.perf_counter() + budget
    r = 0
    while r < rounds or (time.perf_counter() < deadline and r < 10 * rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            t0 = time.perf_counter_ns()
            result = calls[name](r % n_sets)
            t1 = time.perf_counter_ns()
            del result
            times[name].append(t1 - t0)
        r += 1
    return times


def run(ssm, shapes, threads_list, rounds=15, budget=2.0, with_kornia=True, out=print,
        max_wait=0.0):
    """Measure and print; returns the rows as dicts. ``max_wait``: seconds (over the run)
    to wait for a quiet machine before each thread count (``--max-wait``)."""
    wait = QuietWait(max_wait)
    torch, subpix, note = import_kornia() if with_kornia else (None, None, "kornia: off")
    rows = []
    with ThreadPoolExecutor(max(threads_list)) as pool:
        for name, shape in shapes:
            sets = Sets(shape)
            kt = torch if len(shape) == 4 else None  # kornia's are 2-D
            agree = check_agreement(ssm, kt, subpix, sets)
            out(f"soft-argmax {name} {'x'.join(map(str, shape))} float32 NCHW, "
                f"{sets.x[0].nbytes / 1e6:.1f} MB per x, {sets.n} rotating sets"
                + ("" if agree is None else
                   f"; |ssm - kornia| keypoints {agree[0]:.1e}, dx {agree[1]:.1e}"))
            for k in threads_list:
                calls = {("copy", "copy"): copy_call(sets, k, pool),
                         ("stream", "floor"): stream_call(sets, k),
                         ("read", "floor"): read_call(sets, k)}
                for op, fn in ssm_calls(ssm, sets, k).items():
                    calls[(op, "ssm")] = fn
                if kt is not None:
                    for op, fn in kornia_calls(torch, subpix, sets, k).items():
                        calls[(op, "kornia")] = fn
                wait()
                meter = LoadMeter()
                times = interleaved(calls, sets.n, rounds, budget)
                other = meter.stop()
                med = {key: statistics.median(v) / 1e6 for key, v in times.items()}
                x_bytes = sets.x[0].nbytes
                copy_ms = med[("copy", "copy")]
                floors = {"forward": (med[("read", "floor")], x_bytes, "read"),
                          "fwd+bwd": (med[("stream", "floor")], 2 * x_bytes, "stream")}
                for op in OPS:
                    f_ms, f_bytes, f_name = floors[op]
                    floor = f_ms * sets.op_bytes(op) / f_bytes
                    copy_floor = copy_ms * sets.op_bytes(op) / (2 * x_bytes)
                    s = med[(op, "ssm")]
                    kor = med.get((op, "kornia"))
                    row = {"workload": name, "shape": list(shape), "op": op, "threads": k,
                           "ssm_ms": s, "floor": f_name, "floor_ms": floor,
                           "x_floor": s / floor, "copy_floor_ms": copy_floor,
                           "x_copy": s / copy_floor, "kornia_ms": kor,
                           "kornia_x_ssm": None if kor is None else kor / s,
                           "rounds": len(times[(op, "ssm")]), "other_cores": other}
                    rows.append(row)
                    out(f"  {op:<8} {k}T  ssm {s:8.2f} ms  {f_name} floor {floor:6.2f} ms "
                        f"x{s / floor:5.2f}  np.copyto {copy_floor:6.2f} ms x{s / copy_floor:5.2f}"
                        + ("" if kor is None else
                           f"  kornia {kor:8.2f} ms = {kor / s:5.1f} x ssm")
                        + f"  ({row['rounds']} rounds"
                        + ("" if other is None else f", other processes {other:.2f} cores")
                        + ")")
    out(note)
    return rows


def main_positions(ssm, args):
    """The ``--positions`` run of ``ssm-bench``."""
    shapes = (list(WORKLOADS.items()) if args.shape is None
              else [("shape", tuple(args.shape))])
    rows = run(ssm, shapes, args.threads, rounds=max(args.min_reps, 15),
               budget=max(args.budget, 0.5) * 2.5, with_kornia=not args.no_torch,
               out=lambda line: print(line, flush=True), max_wait=args.max_wait)
    if args.json:
        import json
        with open(args.json, "w") as f:
            json.dump({"positions": rows}, f, indent=1)
    return 0
