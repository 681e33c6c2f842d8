"""One ssm op on a VOC-like float32 tile set, for instruction counts under callgrind.

    valgrind --tool=callgrind --toggle-collect='ssm_*_tile_f*' \\
        python benchmarks/callgrind_ops.py fused nchw
    callgrind_annotate callgrind.out.<pid>

ops: softmax, log_softmax, fused (loss+grad), forward (loss+prob), loss (the loss alone),
kl_soft (fused, loss="kl" with soft targets: a log per element);
layouts: nchw (strided channels) or nhwc (rows); an optional fourth argument, the
logits' dtype: float32 (default), float16 or bfloat16 (count the half drivers with
--toggle-collect='ssm_*_tile_[hb]*'). Shape (1, 21, 256, 256), int64 labels
with 5% ignored (as ssm.bench), one thread, streamed stores forced on (as for the
full-size workloads). Valgrind has no AVX-512: the AVX2 clone (or a build forced with
SSM_FORCE_CLONE) is what runs. Instructions per element = Ir / 1376256.
"""
import sys

import numpy as np

import ssm
from ssm import _cpu

op, layout = sys.argv[1], sys.argv[2]
C = int(sys.argv[3]) if len(sys.argv) > 3 else 21
dtype = sys.argv[4] if len(sys.argv) > 4 else "float32"
if dtype == "bfloat16":
    import ml_dtypes
    dtype = ml_dtypes.bfloat16
rng = np.random.default_rng(0)
x = (2 * rng.standard_normal((1, C, 256, 256))).astype(np.float32).astype(dtype)
y = rng.integers(0, C, (1, 256, 256))
y[rng.random(y.shape) < 0.05] = -1
kw = {}
if layout == "nhwc":
    x = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    kw = dict(layout="NHWC")
out = np.empty_like(x)
_cpu.STREAM_BYTES = 0
if op == "softmax":
    ssm.softmax(x, out=out, threads=1, **kw)
elif op == "log_softmax":
    ssm.log_softmax(x, out=out, threads=1, **kw)
elif op == "kl_soft":
    t = rng.random(x.shape).astype(x.dtype) ** 3
    t /= t.sum(axis=-1 if layout == "nhwc" else 1, keepdims=True)
    ssm.spatial_softmax_with_loss_and_grad(x, t, out=out, threads=1, loss="kl", **kw)
elif op == "fused":
    ssm.spatial_softmax_with_loss_and_grad(x, y, out=out, threads=1, **kw)
elif op == "forward":
    ssm.spatial_softmax_with_loss(x, y, out=out, threads=1, **kw)
elif op == "loss":
    ssm.cross_entropy(x, y, threads=1, **kw)
else:
    raise SystemExit(f"unknown op {op!r}")
