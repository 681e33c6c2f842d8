"""Two classes (binary segmentation): each pixel's sweeps in one loop (ssm_sswl_tile_two,
what ssm does since 2026-12-01) against the general sweeps over class rows, call by call
in one process (``ssm._cpu.two_classes``). Three or more classes run the general sweeps
either way (a one-loop version for 3 and 4 classes was even and up to 7% slower).

    python benchmarks/two_classes.py --threads 1,2 --reps 11

The table gives each way's median time, in ns a logit, and the ratio one-loop / general
(below 1: the one loop is faster). float32, 8 images of about 11 M logits in all
(VOC-like bytes), ``out=`` given; int64 labels, uint8 masks, and NHWC logits (the one
loop reads their pixel pairs in place, where the general sweeps transpose them).
"""
import argparse

import numpy as np

import ssm
from ssm import _cpu

from _turns import loss_op, take_turns

CASES = {  # name: (label dtype, layout)
    "c2-int64": (np.int64, "NCHW"),
    "c2-uint8": (np.uint8, "NCHW"),
    "c2-int64-nhwc": (np.int64, "NHWC"),
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--reps", type=int, default=11)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--ops", default="fused,forward,loss")
    a = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    print(f"{'case':13s} {'shape':18s} {'op':8s} thr  general ns  one-loop ns  one-loop/general")
    for name in a.cases.split(","):
        label_dtype, layout = CASES[name]
        side = int((11_000_000 / 16) ** 0.5) // 16 * 16
        shape = (8, 2, side, side) if layout == "NCHW" else (8, side, side, 2)
        x = (2 * rng.standard_normal(shape)).astype(np.float32)
        y = rng.integers(0, 2, (8, side, side)).astype(label_dtype)
        out = np.empty_like(x)
        for op in a.ops.split(","):
            for threads in (int(t) for t in a.threads.split(",")):
                modes = [lambda on=on: _cpu.two_classes(on) for on in (False, True)]
                g, f = (1e9 * m / x.size for m in take_turns(
                    loss_op(op, x, y, out, threads, layout=layout), modes, a.reps))
                _cpu.two_classes(True)
                print(f"{name:13s} {str(shape):18s} {op:8s} {threads:3d} {g:11.2f} {f:12.2f}"
                      f" {f / g:17.3f}", flush=True)


if __name__ == "__main__":
    main()
