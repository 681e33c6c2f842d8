"""float32 against bfloat16 and float16 logits: the fused loss+gradient and the loss alone,
and softmax over positions (soft-argmax keypoints, and their fused gradient).

    python benchmarks/half_speed.py --rounds 5 --threads 1,2
    python benchmarks/half_speed.py --shapes pose --ops soft_argmax,soft_argmax_grad

Shapes VOC-like (2, 21, 512, 512) and ADE-like (4, 150, 128, 128), NCHW, int64 labels
with 5% ignored, ``out=`` given; pose-like heatmaps (32, 17, 128, 96) for the positions
ops (soft_argmax: the keypoints alone; soft_argmax_grad: dx given d_keypoints). Each
(shape, op, threads, dtype) case runs in its own fresh process per round, the order of
the dtypes rotating between rounds; a process times ``--calls`` calls after two warm-up
calls, cycling over three inputs (and three outputs) so that no call finds its arrays in
the caches, and reports the median. The table gives the median over rounds and the ratio
float32 / dtype (above 1: faster than float32).
"""
import argparse
import json
import statistics
import subprocess
import sys
import time

import numpy as np

SHAPES = {"voc": (2, 21, 512, 512), "ade": (4, 150, 128, 128), "pose": (32, 17, 128, 96)}
DTYPES = ("float32", "bfloat16", "float16")


def one(shape, op, threads, dtype, calls):
    """Time one case in this process; print {"median": seconds}."""
    import ssm
    if dtype == "bfloat16":
        import ml_dtypes
        dt = ml_dtypes.bfloat16
    else:
        dt = np.dtype(dtype)
    rng = np.random.default_rng(0)
    shp = SHAPES[shape]
    xs, ys, outs = [], [], []
    for _ in range(3):
        xs.append((2 * rng.standard_normal(shp)).astype(np.float32).astype(dt))
        y = rng.integers(0, shp[1], shp[:1] + shp[2:])
        y[rng.random(y.shape) < 0.05] = -1
        ys.append(y)
        outs.append(np.empty(shp, dt))
    dks = [rng.standard_normal(shp[:2] + (2,)).astype(dt) for _ in range(3)]
    if op == "soft_argmax":
        def call(k):
            ssm.soft_argmax(xs[k], threads=threads)
    elif op == "soft_argmax_grad":
        def call(k):
            ssm.soft_argmax_grad(xs[k], dks[k], out=outs[k], threads=threads)
    elif op == "fused":
        def call(k):
            ssm.spatial_softmax_with_loss_and_grad(xs[k], ys[k], out=outs[k], threads=threads)
    else:
        def call(k):
            ssm.cross_entropy(xs[k], ys[k], threads=threads)
    for k in range(2):
        call(k)
    times = []
    for i in range(calls):
        t0 = time.perf_counter()
        call(i % 3)
        times.append(time.perf_counter() - t0)
    print(json.dumps({"median": statistics.median(times)}))


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5,
                    help="fresh processes per case, dtypes rotating (default 5)")
    ap.add_argument("--calls", type=int, default=15,
                    help="timed calls per process, after two warm-up calls (default 15)")
    ap.add_argument("--threads", default="1,2", help="thread counts (default 1,2)")
    ap.add_argument("--shapes", default="voc,ade", help="voc, ade, pose (default voc,ade)")
    ap.add_argument("--ops", default="fused,loss",
                    help="fused, loss, soft_argmax, soft_argmax_grad (default fused,loss)")
    ap.add_argument("--one", nargs=4, metavar=("SHAPE", "OP", "THREADS", "DTYPE"),
                    help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        one(a.one[0], a.one[1], int(a.one[2]), a.one[3], a.calls)
        return
    cases = [(s, o, int(t)) for s in a.shapes.split(",") for o in a.ops.split(",")
             for t in a.threads.split(",")]
    res = {(c, d): [] for c in cases for d in DTYPES}
    for r in range(a.rounds):
        for c in cases:
            order = DTYPES[r % 3:] + DTYPES[:r % 3]
            for d in order:
                out = subprocess.run([sys.executable, __file__, "--calls", str(a.calls),
                                      "--one", c[0], c[1], str(c[2]), d],
                                     capture_output=True, text=True, check=True)
                res[c, d].append(json.loads(out.stdout.splitlines()[-1])["median"])
    print(f"{'shape':5} {'op':6} {'thr':>3} " + " ".join(f"{d + ' ms':>12}" for d in DTYPES)
          + "   f32/bf16  f32/f16")
    for c in cases:
        med = {d: statistics.median(res[c, d]) for d in DTYPES}
        print(f"{c[0]:5} {c[1]:6} {c[2]:3d} "
              + " ".join(f"{med[d] * 1e3:12.2f}" for d in DTYPES)
              + f"   {med['float32'] / med['bfloat16']:8.2f} {med['float32'] / med['float16']:8.2f}")


if __name__ == "__main__":
    main()
