"""float32 at vocabulary-sized class counts: within a few ulps of float64 at any C.

Near-uniform logits (randn * 1e-3) are the worst case for a per-pixel class sum: C
terms of about the same size. A float running sum over C = 2^20 of them was off by
~4e-3 relative (36000 ulps in softmax); the kernels sum blocks of channels in float
and the blocks in double (docs/semantics.md, "Accuracy at large C"). Every public
function with a class sum is checked in both kernel shapes: strided channels (NCHW
with pixels) and contiguous rows ((N, C) and NHWC), against float64 computed from
the same float32 inputs. An ulp here is eps32 * |exact|, or eps32 times the size of
the terms where the result cancels (soft-target gradient, softmax_grad).
"""

import numpy as np
import pytest

import _reference as ref
import ssm
from conftest import eps

EPS = eps(np.float32)
ULPS = 4  # measured: at most 1.5 (softmax, gradient), 1 (log_softmax, loss), 0.2 (softmax_grad)

# (layout, shape): rows kernel at C = 2^20, strided channels with 1-pixel and 3-pixel
# tiles, rows again from NHWC. About 1.5 s for the file, float64 references included.
CASES = [
    ("NCHW", (1, 2**20)),
    ("NCHW", (2, 65536, 3)),
    ("NCHW", (1, 4099, 37)),
    ("NHWC", (2, 3, 65536)),
]


def _id(case):
    layout, shape = case
    return f"{layout}-{'x'.join(map(str, shape))}"


def _class_axis(layout):
    return 1 if layout == "NCHW" else -1


def _near_uniform(rng, shape):
    return (1e-3 * rng.standard_normal(shape)).astype(np.float32)


def _check(actual, desired, scale, what):
    """|actual - desired| <= ULPS * eps32 * scale, elementwise (scale: the magnitude
    the result is known to; |desired| when nothing cancels)."""
    actual = np.asarray(actual)
    assert actual.dtype == np.float32
    err = np.abs(actual.astype(np.float64) - desired)
    worst = float(np.max(err / (EPS * scale)))
    assert worst <= ULPS, f"{what}: {worst:.1f} ulps (allowed {ULPS})"


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_softmax_and_log_softmax(rng, case):
    layout, shape = case
    x = _near_uniform(rng, shape)
    p = ref.softmax(x, layout)
    _check(ssm.softmax(x, layout=layout), p, p, "softmax")
    lp = ref.log_softmax(x, layout)
    _check(ssm.log_softmax(x, layout=layout), lp, np.abs(lp), "log_softmax")


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_loss_and_gradient_labels(rng, case):
    layout, shape = case
    axis = _class_axis(layout)
    x = _near_uniform(rng, shape)
    C = shape[axis]
    pix_shape = shape[:1] + (shape[2:] if layout == "NCHW" else shape[1:-1])
    y = rng.integers(0, C, size=pix_shape)
    yk = np.expand_dims(y, axis)
    lp = ref.log_softmax(x, layout)
    p = np.exp(lp)
    onehot = np.zeros(shape)
    np.put_along_axis(onehot, yk, 1.0, axis=axis)
    npix = y.size
    rloss = -np.take_along_axis(lp, yk, axis=axis).mean()
    rgrad = (p - onehot) / npix
    gscale = (p + onehot) / npix

    loss, dx = ssm.spatial_softmax_with_loss_and_grad(x, y, layout=layout)
    _check(loss, rloss, abs(rloss), "fused loss")
    _check(dx, rgrad, gscale, "fused gradient")
    prob, loss2 = ssm.spatial_softmax_with_loss(x, y, layout=layout)
    _check(loss2, rloss, abs(rloss), "loss")
    _check(prob, p, p, "loss probabilities")


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_loss_and_gradient_soft_targets(rng, case):
    """Soft targets take the dense path, whose A = sum_c a_c is a class sum too."""
    layout, shape = case
    axis = _class_axis(layout)
    x = _near_uniform(rng, shape)
    t = 1.0 + 0.5 * rng.random(shape)
    t = (t / t.sum(axis=axis, keepdims=True)).astype(np.float32)
    rprob, rloss = ref.sswl_loss(x, t, layout=layout)
    rgrad = ref.sswl_grad(rprob, t, layout=layout)
    npix = t.size // shape[axis]
    A = np.sum(t, axis=axis, dtype=np.float64, keepdims=True)
    gscale = (A * rprob + t) / npix

    loss, dx = ssm.spatial_softmax_with_loss_and_grad(x, t, layout=layout)
    _check(loss, rloss, abs(rloss), "fused loss")
    _check(dx, rgrad, gscale, "fused gradient")
    dx2 = ssm.spatial_softmax_with_loss_grad(rprob.astype(np.float32), t, layout=layout)
    _check(dx2, ref.sswl_grad(rprob.astype(np.float32), t, layout=layout), gscale,
           "gradient from probabilities")


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_softmax_grad(rng, case):
    """dp near a constant: sum_c p dp grows to about 1 over the classes (the worst case);
    dp - sum_c p dp then cancels, so the error is measured against the magnitude of
    the terms, p (|dp| + sum_c |p dp|)."""
    layout, shape = case
    axis = _class_axis(layout)
    p = ssm.softmax(_near_uniform(rng, shape), layout=layout)
    dp = (1.0 + 1e-3 * rng.standard_normal(shape)).astype(np.float32)
    p64, dp64 = p.astype(np.float64), dp.astype(np.float64)
    scale = p64 * (np.abs(dp64) + np.sum(np.abs(p64 * dp64), axis=axis, keepdims=True))
    _check(ssm.softmax_grad(p, dp, layout=layout), ref.softmax_grad(p, dp, layout), scale,
           "softmax_grad")
