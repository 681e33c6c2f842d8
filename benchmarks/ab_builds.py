"""A/B of ssm builds in alternating processes: which build is faster, on a shared machine.

Each build is a folder holding an ``ssm`` package with its extension built in place
(``git worktree add /tmp/base REV && cd /tmp/base && python setup.py build_ext --inplace``),
or ``installed`` for the ssm this Python imports. Per case and round, every build runs in
its own fresh process (order reversed every other round, so that neither always goes
first), times ``--calls`` calls after three warm-up calls and reports their median; the
table gives the median over rounds of those medians and the ratio to the first build.

    python benchmarks/ab_builds.py --builds /tmp/base,installed --cases fused:1,fused:2

Cases are ``op:threads`` with op one of fused, softmax, log_softmax, forward, loss, smooth,
backward (the gradient from probabilities; the logits stand in for them), on the VOC-like
workload (8x21x256x256 float32, int64 labels), ``out=`` given. Words after the op, in any
order: ``_ade``, ``_city`` or ``_two`` takes the ADE-like (4x150x128x128),
Cityscapes-like (2x19x512x1024) or binary (8x2x512x512) workload instead, ``_nhwc`` lays
the logits out as NHWC, and ``_bf16`` or ``_f16`` makes them bfloat16 or float16
(``fused_ade_nhwc:2``, ``fused_bf16:1``).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np


# workloads other than VOC-like, by a word of the case's op, as ssm.bench has them
WORKLOADS = {"ade": (4, 150, 128, 128), "city": (2, 19, 512, 1024), "two": (8, 2, 512, 512)}


def one(op, threads, calls):
    """Time one case in this process; print {"median": seconds}."""
    import ssm
    rng = np.random.default_rng(0)
    words = op.split("_")  # fused_ade_nhwc_bf16: the op, then its words in any order
    shape = next((WORKLOADS[w] for w in words if w in WORKLOADS), (8, 21, 256, 256))
    layout = "NHWC" if "nhwc" in words else "NCHW"
    half = next((w for w in words if w in ("bf16", "f16")), None)
    op = "_".join(w for w in words if w not in WORKLOADS and w not in ("nhwc", "bf16", "f16"))
    C = shape[1]
    if layout == "NHWC":
        shape = (shape[0], *shape[2:], C)
    x = (2 * rng.standard_normal(shape)).astype(np.float32)
    y = rng.integers(0, C, shape[:1] + shape[2:] if layout == "NCHW" else shape[:-1])
    if half == "bf16":  # half-width logits: fused_bf16, loss_f16, ...
        import ml_dtypes
        x = x.astype(ml_dtypes.bfloat16)
    elif half == "f16":
        x = x.astype(np.float16)
    out = np.empty_like(x)
    kw = dict(threads=threads, layout=layout)
    calls_of = {
        "fused": lambda: ssm.spatial_softmax_with_loss_and_grad(x, y, out=out, **kw),
        "smooth": lambda: ssm.spatial_softmax_with_loss_and_grad(x, y, out=out,
                                                                 label_smoothing=0.1, **kw),
        "forward": lambda: ssm.spatial_softmax_with_loss(x, y, out=out, **kw),
        "loss": lambda: ssm.cross_entropy(x, y, **kw),
        "backward": lambda: ssm.spatial_softmax_with_loss_grad(x, y, out=out, **kw),
        "softmax": lambda: ssm.softmax(x, out=out, **kw),
        "log_softmax": lambda: ssm.log_softmax(x, out=out, **kw),
    }
    f = calls_of[op]
    for _ in range(3):
        f()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    print(json.dumps({"median": float(np.median(times))}))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--builds", required=True, help="comma-separated folders, or 'installed'")
    p.add_argument("--cases", default="fused:1,fused:2", help="comma-separated op:threads")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--calls", type=int, default=15)
    p.add_argument("--one", nargs=2, metavar=("OP", "THREADS"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        return one(a.one[0], int(a.one[1]), a.calls)
    builds = [b.strip() for b in a.builds.split(",") if b.strip()]
    envs = {}
    for b in builds:
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)
        if b != "installed":
            env["PYTHONPATH"] = os.path.abspath(b)
        envs[b] = env
    here = os.path.abspath(__file__)
    for case in a.cases.split(","):
        op, threads = case.split(":")
        medians = {b: [] for b in builds}
        for r in range(a.rounds):
            for b in (builds if r % 2 == 0 else builds[::-1]):
                out = subprocess.run([sys.executable, here, "--builds", b, "--calls", str(a.calls),
                                      "--one", op, threads], env=envs[b], cwd="/",
                                     capture_output=True, text=True)
                if out.returncode != 0:
                    last = (out.stderr.strip().splitlines() or ["?"])[-1]
                    raise SystemExit(f"{b}: case {case} failed: {last}")
                medians[b].append(json.loads(out.stdout.strip().splitlines()[-1])["median"])
        first = statistics.median(medians[builds[0]])
        print(f"{op:11s} T={threads}  " + "  ".join(
            f"{os.path.basename(b.rstrip('/')) or b} {statistics.median(v) * 1e3:7.2f} ms "
            f"({statistics.median(v) / first:5.3f})" for b, v in medians.items()), flush=True)


if __name__ == "__main__":
    main()
