"""Softmax over positions on maps of every size: each output row streamed (non-temporal
stores, from a scratch row or in chunks of one) against plain stores, call by call in
one process. ssm streams outputs of STREAM_BYTES and more, but not rows over
POS_STREAM_ROW_BYTES (ssm._cpu), whose scratch row leaves the caches.

    python benchmarks/positions_rows.py --threads 1 --reps 9

The table gives ns an element each way and the ratio plain / streamed (below 1: plain
stores are faster). float32 NCHW maps; soft_argmax_grad is the fused keypoint gradient,
which streams its rows in L1-sized chunks.
"""
import argparse

import numpy as np

import ssm
from ssm import _cpu

from _turns import take_turns

SHAPES = [(64, 17, 64, 48), (256, 1, 256, 256), (64, 1, 512, 512), (16, 1, 1024, 1024),
          (4, 1, 2048, 2048)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", default="1")
    ap.add_argument("--reps", type=int, default=9)
    a = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    stream_bytes, row_bytes = _cpu.STREAM_BYTES, _cpu.POS_STREAM_ROW_BYTES

    def mode(streamed):
        _cpu.STREAM_BYTES = stream_bytes if streamed else 1 << 62
        _cpu.POS_STREAM_ROW_BYTES = 1 << 62 if streamed else row_bytes

    print(f"{'shape':16s} {'row KiB':>8s} thr {'op':17s} streamed  plain  plain/streamed")
    for shape in SHAPES:
        x = rng.standard_normal(shape).astype(np.float32)
        out = ssm.spatial_softmax(x)
        out2 = out.copy()
        d = rng.standard_normal(shape[:2] + (2,)).astype(np.float32)
        for threads in (int(t) for t in a.threads.split(",")):
            ops = [("spatial_softmax", lambda: ssm.spatial_softmax(x, out=out, threads=threads)),
                   ("softmax_grad", lambda: ssm.spatial_softmax_grad(out, x, out=out2,
                                                                     threads=threads)),
                   ("soft_argmax_grad", lambda: ssm.soft_argmax_grad(x, d, threads=threads))]
            for name, fn in ops:
                s, p = (1e9 * t / x.size
                        for t in take_turns(fn, [lambda: mode(True), lambda: mode(False)],
                                            a.reps, warmup=1))
                _cpu.STREAM_BYTES, _cpu.POS_STREAM_ROW_BYTES = stream_bytes, row_bytes
                print(f"{'x'.join(map(str, shape)):16s} {shape[2] * shape[3] * 4 >> 10:8d} "
                      f"{threads:3d} {name:17s} {s:8.3f} {p:6.3f} {p / s:15.3f}", flush=True)


if __name__ == "__main__":
    main()
