"""What power-of-two images cost: the fused pass and the loss alone on a workload's shape
against the same shape a few columns wider, whose class rows are not 64 KiB apart.

    python benchmarks/row_stride.py --threads 1,2 --reps 15

Channel c of an NCHW image starts c * H * W * 4 bytes into it. For 128 x 128 and every
larger power-of-two image that is a multiple of 64 KiB, so a tile's C rows at one pixel
fall in one set of a cache indexed by address bits below 16: L1 always (bits 6-11), and
L2 (bits 6-15 on Zen 3's 512 KiB, 8 ways) where NumPy's large arrays sit on 2 MiB pages,
as Linux gives them with transparent huge pages on `madvise` (NumPy asks). With C well
over the ways, the rows of a tile evict each other before the second sweep reads them.
The wider shapes (8 columns more) shift each row 4-16 KiB further in L2's sets, so that
the rows spread there; their strides are still multiples of 4 KiB, so in L1 both alias
alike: the difference is L2's. The table gives nanoseconds per element (each shape's median time over
its element count) and the ratio power-of-two / wider (above 1: the power-of-two image
costs more per element). The two shapes take turns call by call in one process;
"ade-hot" is one ADE-like image, which stays in L3 (32 MiB): the cost is in the caches,
not in DRAM. float32, int64 labels, ``out=`` aligned (as ssm allocates).
"""
import argparse
import time

import numpy as np

import ssm
from ssm import _validation as V

# name: (power-of-two shape, wider shape)
PAIRS = {
    "voc": ((8, 21, 256, 256), (8, 21, 256, 264)),
    "ade": ((4, 150, 128, 128), (4, 150, 128, 136)),
    "ade-hot": ((1, 150, 128, 128), (1, 150, 128, 136)),
    "cityscapes": ((2, 19, 512, 1024), (2, 19, 512, 1032)),
}


def problem(rng, shape):
    x = 2 * rng.standard_normal(shape, dtype=np.float32)
    y = rng.integers(0, shape[1], (shape[0],) + shape[2:])
    y[rng.random(y.shape) < 0.05] = -1
    return x, y, V.empty_like(x)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", default="1,2")
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--workloads", default=",".join(PAIRS))
    a = p.parse_args()
    rng = np.random.default_rng(0)
    ops = {
        "fused": lambda x, y, o, t: ssm.spatial_softmax_with_loss_and_grad(x, y, out=o, threads=t),
        "loss": lambda x, y, o, t: ssm.cross_entropy(x, y, threads=t),
    }
    print(f"{'workload':11s} {'op':6s} thr  pow2 ns/el  wider ns/el  pow2/wider")
    for name in a.workloads.split(","):
        probs = [problem(rng, s) for s in PAIRS[name]]
        for op, f in ops.items():
            for threads in map(int, a.threads.split(",")):
                times = [[], []]
                for _ in range(2):
                    for x, y, o in probs:
                        f(x, y, o, threads)
                for _ in range(a.reps):
                    for k, (x, y, o) in enumerate(probs):
                        t0 = time.perf_counter()
                        f(x, y, o, threads)
                        times[k].append(time.perf_counter() - t0)
                ns = [1e9 * float(np.median(t)) / probs[k][0].size for k, t in enumerate(times)]
                print(f"{name:11s} {op:6s} {threads:3d} {ns[0]:11.3f} {ns[1]:12.3f}"
                      f" {ns[0] / ns[1]:11.3f}", flush=True)


if __name__ == "__main__":
    main()
