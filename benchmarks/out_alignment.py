"""The fused pass into an output on a 64-byte boundary against one 16 bytes past it
(where NumPy's large arrays start): how much the streamed rows' partial lines cost.

    python benchmarks/out_alignment.py --threads 1,2 --reps 21

VOC-like (8, 21, 256, 256), ADE-like (4, 150, 128, 128), Cityscapes-like
(2, 19, 512, 1024), float32 NCHW, int64 labels; ``out=`` given. In one process the two
outputs take turns, call by call; the table gives each one's median and the ratio
aligned / offset (below 1: the aligned output is faster). The outputs ssm allocates
itself start on a 64-byte boundary (``ssm._validation.empty_like``).
"""
import argparse
import time

import numpy as np

import ssm

SHAPES = {"voc": (8, 21, 256, 256), "ade": (4, 150, 128, 128), "cityscapes": (2, 19, 512, 1024)}


def at_offset(shape, dtype, offset):
    """An empty array whose data start `offset` bytes past a 64-byte boundary."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    buf = np.empty(nbytes + 128, np.uint8)
    start = -buf.ctypes.data % 64 + offset
    return buf[start:start + nbytes].view(dtype).reshape(shape)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", default="1,2")
    p.add_argument("--reps", type=int, default=21)
    a = p.parse_args()
    rng = np.random.default_rng(0)
    print(f"{'workload':11s} thr  aligned ms  16 off ms  aligned/off")
    for name, shape in SHAPES.items():
        x = 2 * rng.standard_normal(shape, dtype=np.float32)
        y = rng.integers(0, shape[1], (shape[0],) + shape[2:])
        outs = {off: at_offset(shape, np.float32, off) for off in (0, 16)}
        for threads in map(int, a.threads.split(",")):
            times = {0: [], 16: []}
            for _ in range(2):
                for off in outs:
                    ssm.spatial_softmax_with_loss_and_grad(x, y, out=outs[off], threads=threads)
            for _ in range(a.reps):
                for off in outs:
                    t0 = time.perf_counter()
                    ssm.spatial_softmax_with_loss_and_grad(x, y, out=outs[off], threads=threads)
                    times[off].append(time.perf_counter() - t0)
            m = {off: 1e3 * float(np.median(t)) for off, t in times.items()}
            print(f"{name:11s} {threads:3d} {m[0]:11.2f} {m[16]:10.2f} {m[0] / m[16]:12.3f}")


if __name__ == "__main__":
    main()
