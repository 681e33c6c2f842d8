"""Many classes: tiles of at least 128 pixels (ssm._cpu.MIN_TILE) against the 64 KiB rule's
narrower ones (MIN_TILE = 16), which read each class row a few lines at a time.

    python benchmarks/many_classes.py --threads 1,2 --reps 9

A tile holds about 64 KiB of logits, so with more than 128 classes its rows were under
512 bytes (1000 classes: 16 pixels, one 64-byte line a row). For each shape, op and
thread count the two tile widths take turns call by call in one process; the table gives
each one's median time, ns a logit, and the ratio wide / narrow (below 1: the wide tiles
are faster). float32 NCHW, int64 labels, ``out=`` allocated by ssm (on a 64-byte line).
"""
import argparse

import numpy as np

import ssm
from ssm import _cpu

from _turns import loss_op, take_turns

SHAPES = {
    "ade-150": (4, 150, 128, 128),
    "300": (4, 300, 64, 64),
    "1000": (2, 1000, 64, 64),
    "1000-60": (2, 1000, 60, 60),
    "2000": (1, 2000, 64, 64),
    "3000": (1, 3000, 64, 64),
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--ops", default="fused,loss,softmax")
    ap.add_argument("--narrow", type=int, default=16, help="MIN_TILE of the baseline")
    a = ap.parse_args(argv)
    wide = _cpu.MIN_TILE
    rng = np.random.default_rng(0)
    print(f"{'shape':9s} {'op':8s} thr  tiles  narrow ns  wide ns  wide/narrow")
    for name in a.shapes.split(","):
        shape = SHAPES[name]
        x = (2 * rng.standard_normal(shape)).astype(np.float32)
        y = rng.integers(0, shape[1], shape[:1] + shape[2:])
        out = ssm.softmax(x)
        inner = int(np.prod(shape[2:]))
        tiles = []
        for m in (a.narrow, wide):
            _cpu.MIN_TILE = m
            tiles.append(_cpu.tile_size(shape[1], inner, 4))
        for op in a.ops.split(","):
            for threads in (int(t) for t in a.threads.split(",")):
                modes = [lambda m=m: setattr(_cpu, "MIN_TILE", m) for m in (a.narrow, wide)]
                n, w = (1e9 * t / x.size for t in take_turns(loss_op(op, x, y, out, threads),
                                                           modes, a.reps))
                _cpu.MIN_TILE = wide
                print(f"{name:9s} {op:8s} {threads:3d} {tiles[0]:3d}>{tiles[1]:<3d} {n:9.3f} "
                      f"{w:8.3f} {w / n:12.3f}", flush=True)


if __name__ == "__main__":
    main()
