"""Smoke test of an installed ssm: a few calls of every public function against a small
float64 NumPy reference, then a check of the SIMD path the loader picked.

.ci/run runs it natively (``--expect-simd fast`` when the CPU has AVX2) and under
``qemu-x86_64 -cpu Nehalem`` (``--expect-simd baseline``): a CPU without AVX, which
proves the wheel holds no instruction a baseline x86-64 (plus NumPy's own SSE4.2
minimum) lacks. Run it from outside the source tree so that the installed package
is the one imported.
"""
import argparse
import sys
import time

import numpy as np

import ssm
from ssm import _cpu, ops

t0 = time.perf_counter()
parser = argparse.ArgumentParser()
parser.add_argument("--expect-simd", choices=["baseline", "fast", "generic", "any"], default="any")
parser.add_argument("--expect-bundled-openmp", action="store_true",
                    help="the OpenMP runtime in use must be the copy in ssm.libs (auditwheel)")
args = parser.parse_args()

if "site-packages" not in ssm.__file__:
    sys.exit(f"smoke: imported ssm from {ssm.__file__}, not from an installed wheel")

TOL = {np.float32: dict(rtol=2e-5, atol=2e-6), np.float64: dict(rtol=1e-12, atol=1e-13)}
rng = np.random.default_rng(0)
checks = 0


def close(actual, desired, dtype, what):
    global checks
    np.testing.assert_allclose(np.asarray(actual, np.float64), desired, **TOL[dtype], err_msg=what)
    checks += 1


def ref_softmax(x, axis=1):
    z = x - x.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True), z - np.log(e.sum(axis=axis, keepdims=True))


def ref_loss(x, y, w=None, ignore=-1):
    """Mean cross-entropy over non-ignored pixels (weighted), and its gradient (NCHW)."""
    p, logp = ref_softmax(x)
    C = x.shape[1]
    valid = y != ignore
    yy = np.where(valid, y, 0).astype(np.int64)
    onehot = np.moveaxis(np.eye(C)[yy], -1, 1)
    w = np.ones(y.shape) if w is None else w.astype(np.float64)
    w = w * valid
    nll = -np.take_along_axis(logp, yy[:, None], axis=1)[:, 0]
    div = w.sum()
    loss = (w * nll).sum() / div if div else 0.0
    grad = (p - onehot) * (w / div if div else 0.0)[:, None]
    return p, loss, grad


# (N, C, H, W): C and the pixel counts off every vector width, and one shape with many tiles
for shape in [(2, 5, 7, 9), (3, 21, 33, 35), (4, 3)]:
    for dtype in (np.float32, np.float64):
        x = (2 * rng.standard_normal(shape)).astype(dtype)
        x64 = x.astype(np.float64)
        C = shape[1]
        y = rng.integers(0, C, (shape[0],) + shape[2:])
        y[rng.random(y.shape) < 0.1] = -1
        w = rng.random(y.shape).astype(dtype)
        p_ref, logp_ref = ref_softmax(x64)
        tag = f"{shape} {np.dtype(dtype).name}"
        for threads in (1, 2):
            close(ssm.softmax(x, threads=threads), p_ref, dtype, f"softmax {tag}")
            close(ssm.log_softmax(x, threads=threads), logp_ref, dtype, f"log_softmax {tag}")
        dp = rng.standard_normal(shape).astype(dtype)
        p = p_ref.astype(dtype)
        sg_ref = p.astype(np.float64) * (dp - (p.astype(np.float64) * dp).sum(1, keepdims=True))
        close(ssm.softmax_grad(p, dp), sg_ref, dtype, f"softmax_grad {tag}")

        for yd in (np.uint8, np.int32, np.int64):
            yt = y.astype(yd) if yd != np.uint8 else np.where(y < 0, 255, y).astype(yd)
            ignore = 255 if yd == np.uint8 else -1
            for weights in (None, w):
                _, loss_ref, grad_ref = ref_loss(x64, y, weights)
                prob, loss = ssm.spatial_softmax_with_loss(x, yt, weights, ignore_index=ignore)
                close(prob, p_ref, dtype, f"sswl prob {tag}")
                close(loss, loss_ref, dtype, f"sswl loss {tag}")
                close(ssm.spatial_softmax_with_loss_grad(prob, yt, weights, ignore_index=ignore),
                      grad_ref, dtype, f"sswl grad {tag}")
                for threads in (1, 2):
                    loss2, dx = ssm.spatial_softmax_with_loss_and_grad(
                        x, yt, weights, 0.5, ignore_index=ignore, threads=threads)
                    close(loss2, loss_ref, dtype, f"sswl_and_grad loss {tag}")
                    close(dx, 0.5 * grad_ref, dtype, f"sswl_and_grad grad {tag}")

        # NHWC layout: the same numbers with the class axis last
        if len(shape) == 4:
            xh = np.ascontiguousarray(np.moveaxis(x, 1, -1))
            close(ssm.softmax(xh, layout="NHWC"), np.moveaxis(p_ref, 1, -1), dtype, f"NHWC {tag}")
            loss_h, dx_h = ssm.spatial_softmax_with_loss_and_grad(xh, y, layout="NHWC")
            _, loss_ref, grad_ref = ref_loss(x64, y)
            close(loss_h, loss_ref, dtype, f"NHWC loss {tag}")
            close(dx_h, np.moveaxis(grad_ref, 1, -1), dtype, f"NHWC grad {tag}")

        # Caffe2's operator (float32, int32 labels; logits small enough that the clamp is inert)
        if dtype is np.float32 and len(shape) == 4:
            P, loss = ops.run("SpatialSoftmaxWithLoss", [x, y.astype(np.int32)])
            _, loss_ref, _ = ref_loss(x64, y)
            close(P, p_ref, dtype, f"ops.run P {tag}")
            close(loss, loss_ref, dtype, f"ops.run loss {tag}")

# the loss is bit-identical for any thread count
x = rng.standard_normal((2, 19, 61, 67)).astype(np.float32)
y = rng.integers(0, 19, (2, 61, 67))
losses = {t: ssm.spatial_softmax_with_loss(x, y, threads=t)[1] for t in (1, 2, 3)}
assert len({float(v) for v in losses.values()}) == 1, losses

simd = _cpu.simd_path()
print(f"smoke: ssm {ssm.__version__} from {ssm.__file__}")
print(f"smoke: {checks} comparisons with the NumPy reference passed; simd path: {simd}; "
      f"numpy {np.__version__}; {time.perf_counter() - t0:.1f} s")
if args.expect_simd == "baseline":
    assert simd.startswith("x86-64 baseline"), f"expected the baseline clone, got {simd!r}"
elif args.expect_simd == "fast":
    assert simd.startswith(("x86-64-v3", "x86-64-v4")), f"expected the AVX2/AVX-512 clone, got {simd!r}"
elif args.expect_simd == "generic":  # no target clones: not x86-64 (.ci/aarch64), or not gcc
    assert simd.startswith("generic"), f"expected the portable build, got {simd!r}"
if args.expect_bundled_openmp:
    from threadpoolctl import threadpool_info
    omp = [i["filepath"] for i in threadpool_info() if i.get("user_api") == "openmp"]
    assert omp and all("ssm.libs" in f for f in omp), f"OpenMP runtime not the bundled one: {omp}"
    print(f"smoke: OpenMP runtime {omp[0]}")
print("smoke: OK")
