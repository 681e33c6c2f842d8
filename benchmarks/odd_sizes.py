"""Images whose class rows do not start on a 16-byte boundary (odd widths and heights,
as DeepLab's 513 x 513 crops): their large outputs streamed with non-temporal stores, as
before 2026-12-01, against plain stores, what ssm does now (ssm._cpu._rows_start_aligned).

    python benchmarks/odd_sizes.py --threads 1,2 --reps 11

For each shape, op and thread count the two ways take turns call by call in one process
(``_cpu.STREAM_UNALIGNED_ROWS`` True streams them as before); the table gives each one's
median time and the ratio plain / streamed (below 1: plain stores are faster). The first
shape's rows are aligned: both ways stream it, a control. float32 NCHW, int64 labels,
``out=`` allocated by ssm (on a 64-byte boundary).
"""
import argparse

import numpy as np

import ssm
from ssm import _cpu

from _turns import loss_op, take_turns

SHAPES = {
    "voc-256": (8, 21, 256, 256),  # aligned rows: the control
    "voc-255": (8, 21, 255, 255),
    "deeplab-513": (4, 21, 513, 513),
    "ade-127": (4, 150, 127, 127),
    "cityscapes-769": (2, 19, 769, 769),
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--reps", type=int, default=11)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--ops", default="fused,forward,softmax")
    a = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    print(f"{'shape':16s} {'op':8s} thr  streamed ms   plain ms  plain/streamed")
    for name in a.shapes.split(","):
        shape = SHAPES[name]
        x = (2 * rng.standard_normal(shape)).astype(np.float32)
        y = rng.integers(0, shape[1], shape[:1] + shape[2:])
        out = ssm.softmax(x)  # an ssm-allocated output
        for op in a.ops.split(","):
            for threads in (int(t) for t in a.threads.split(",")):
                modes = [lambda old=old: setattr(_cpu, "STREAM_UNALIGNED_ROWS", old)
                         for old in (True, False)]
                s, p = (1e3 * m for m in take_turns(loss_op(op, x, y, out, threads), modes,
                                                    a.reps))
                _cpu.STREAM_UNALIGNED_ROWS = False
                print(f"{name:16s} {op:8s} {threads:3d} {s:11.2f} {p:10.2f} {p / s:15.3f}",
                      flush=True)


if __name__ == "__main__":
    main()
