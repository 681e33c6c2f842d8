"""Every GPU kernel of ssm once per dtype, layout and target kind, on small shapes: the
program benchmarks/gpu/device_check.sh runs under compute-sanitizer (memcheck,
racecheck, initcheck, synccheck), where a whole test suite would take too long.

Shapes are small but not round (tiles, warps and blocks end part-way), with ignored
pixels, and rows of 1, few and many classes (the kernels pick a thread, a warp or a
block per row from C). ``--dry-run`` runs the same calls on the CUDA simulator when it
is installed, else on NumPy arrays (the CPU path), to check the program itself.
"""
import argparse
import itertools
import sys

import numpy as np

import ssm


def device(dry_run):
    """(asarray, name): how arrays reach the device under test."""
    if not dry_run:
        import cupy
        return cupy.asarray, "cuda"
    try:
        from ssm.testing import cudasim
        return cudasim.asarray, "cudasim"
    except ImportError:
        return np.asarray, "cpu (no CUDA simulator installed)"


SHAPES = [((3, 5, 7, 9), "NCHW"), ((3, 7, 9, 5), "NHWC"), ((37, 1), "NCHW"),
          ((5, 70, 13), "NCHW"), ((13, 300), "NCHW")]


def calls(asarray, dtypes, labels=("u8", "i64", "soft")):
    rng = np.random.default_rng(7)
    for dtype, (shape, layout), label in itertools.product(dtypes, SHAPES, labels):
        C = shape[1] if layout == "NCHW" else shape[-1]
        pix = (shape[0],) + (shape[2:] if layout == "NCHW" else shape[1:-1])
        x = asarray((3 * rng.standard_normal(shape)).astype(dtype))
        if label == "soft":
            t = rng.random(shape) + 0.01
            t /= t.sum(axis=1 if layout == "NCHW" else -1, keepdims=True)
            y = asarray(t.astype(dtype))
        else:
            lab = rng.integers(0, C, pix)
            lab[rng.random(pix) < 0.2] = 255 if label == "u8" else -1
            y = asarray(lab.astype(np.uint8 if label == "u8" else np.int64))
        ign = 255 if label == "u8" else -1
        w = asarray(rng.random(pix).astype(dtype))
        kw = dict(layout=layout) if label == "soft" else dict(layout=layout, ignore_index=ign)
        yield lambda: ssm.softmax(x, layout=layout)
        yield lambda: ssm.log_softmax(x, layout=layout)
        yield lambda: ssm.softmax_grad(ssm.softmax(x, layout=layout), x, layout=layout)
        for reduction, validate in (("mean", True), ("none", False), ("sum", True)):
            d = asarray(rng.random(pix).astype(dtype)) if reduction == "none" else 1.0
            opts = dict(kw, reduction=reduction, validate=validate,
                        label_smoothing=0.1 if label != "soft" else 0.0)
            yield lambda o=opts: ssm.spatial_softmax_with_loss(x, y, w, **o)
            yield lambda o=opts, d=d: ssm.spatial_softmax_with_loss_and_grad(x, y, w, d, **o)
            yield lambda o=opts, d=d: ssm.spatial_softmax_with_loss_grad(
                ssm.softmax(x, layout=layout), y, None, d, **o)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--quick", action="store_true",
                   help="float32 only, int64 labels and soft targets (for the slower tools)")
    args = p.parse_args(argv)
    asarray, name = device(args.dry_run)
    dtypes = ["float32", "float64"] if name.startswith("cpu") else ["float16", "float32",
                                                                     "float64"]
    labels = ("u8", "i64", "soft")
    if args.quick:
        dtypes, labels = ["float32"], ("i64", "soft")
    n = 0
    for call in calls(asarray, dtypes, labels):
        call()
        n += 1
    if name == "cuda":
        import cupy
        cupy.cuda.Device().synchronize()
    print(f"sanitize_subset: {n} calls on {name}, dtypes {', '.join(dtypes)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
