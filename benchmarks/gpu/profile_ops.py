"""One call of each op on the VOC-like workload (float32 NCHW and NHWC), for a profiler:
benchmarks/gpu/device_check.sh runs it under Nsight Compute (ncu) to record, per kernel,
the speed-of-light, memory and occupancy figures that say where the GPU time goes.
``--dry-run``: the same calls on the CUDA simulator where installed, else NumPy."""
import argparse
import sys

import numpy as np

import ssm

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from sanitize_subset import device  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args(argv)
    asarray, name = device(args.dry_run)
    shape = (8, 21, 256, 256) if not args.dry_run else (2, 21, 16, 16)
    rng = np.random.default_rng(0)
    x = (2 * rng.standard_normal(shape)).astype(np.float32)
    y = rng.integers(0, shape[1], (shape[0],) + shape[2:])
    for layout in ("NCHW", "NHWC"):
        xl = x if layout == "NCHW" else np.ascontiguousarray(np.moveaxis(x, 1, -1))
        xd, yd = asarray(xl), asarray(y)
        prob = ssm.softmax(xd, layout=layout)
        ssm.spatial_softmax_with_loss(xd, yd, layout=layout, validate=False)
        ssm.spatial_softmax_with_loss_grad(prob, yd, layout=layout, validate=False)
        ssm.spatial_softmax_with_loss_and_grad(xd, yd, layout=layout, validate=False)
    print(f"profile_ops: 8 calls on {name}, shape {shape}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
