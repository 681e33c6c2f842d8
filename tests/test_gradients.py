"""Central finite differences (float64) of the loss against the analytic gradients."""

import numpy as np
import pytest

import _reference as ref
import ssm
from conftest import (LAYOUTS, REDUCTIONS, logits_shape, make_class_weights, make_labels, make_lens,
                      make_logits, make_soft_targets, make_weights)

H = 1e-5  # central differences: truncation ~H**2, rounding ~eps * |f| / H


def numerical_gradient(f, x, h=H):
    g = np.empty_like(x)
    for i in np.ndindex(x.shape):
        xp = x.copy()
        xm = x.copy()
        xp[i] += h
        xm[i] -= h
        g[i] = (f(xp) - f(xm)) / (2 * h)
    return g


def assert_matches_fd(analytic, numeric, f0):
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-7 * (1 + abs(f0)))


def _case(rng, name, N, C, spatial, layout):
    pix = (N, *spatial)
    labels = make_labels(rng, pix, C, ignore_frac=0.2)
    if name == "plain":
        return labels, None, {}
    if name == "weights":
        return labels, make_weights(rng, pix), {}
    if name == "class_weights":
        return labels, None, {"class_weights": make_class_weights(rng, C)}
    if name == "smoothing":
        return labels, None, {"label_smoothing": 0.25}
    if name == "lens":
        return labels, None, {"lens": make_lens(rng, C)}
    if name == "labels_all":
        return labels, make_weights(rng, pix), {
            "class_weights": make_class_weights(rng, C), "label_smoothing": 0.1,
            "lens": make_lens(rng, C)}
    if name == "soft":
        return make_soft_targets(rng, logits_shape(N, C, spatial, layout), layout=layout), None, {}
    if name == "soft_all":
        return (make_soft_targets(rng, logits_shape(N, C, spatial, layout), layout=layout),
                make_weights(rng, pix),
                {"class_weights": make_class_weights(rng, C), "label_smoothing": 0.3})
    if name == "ignore_real_class":
        return rng.integers(0, C, size=pix), make_weights(rng, pix), {"ignore_index": 1}
    raise AssertionError(name)


CASES = ["plain", "weights", "class_weights", "smoothing", "lens", "labels_all", "soft",
         "soft_all", "ignore_real_class"]


def _loss_only(z, target, w, **opts):
    """The loss, from ssm.cross_entropy for the KL divergence (the loss alone; both
    functions get differentiated) and from the forward pass for the cross-entropy."""
    if opts.get("loss") == "kl":
        return ssm.cross_entropy(z, target, w, **opts)
    return ssm.spatial_softmax_with_loss(z, target, w, **opts)[1]


@pytest.mark.parametrize("loss", ["cross_entropy", "kl"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("spatial", [(), (2, 3), (3,)], ids=["NC", "NCHW", "NCL"])
@pytest.mark.parametrize("case", CASES)
def test_loss_gradient_fd(rng, case, spatial, layout, reduction, loss):
    N, C = 2, 4
    x = make_logits(rng, logits_shape(N, C, spatial, layout))
    target, w, opts = _case(rng, case, N, C, spatial, layout)
    opts.update(layout=layout, reduction=reduction, loss=loss)
    if reduction == "none":
        d_loss = rng.standard_normal((N, *spatial))

        def f(z):
            return float(np.sum(d_loss * _loss_only(z, target, w, **opts)))
    else:
        d_loss = 0.7

        def f(z):
            return d_loss * float(_loss_only(z, target, w, **opts))

    numeric = numerical_gradient(f, x)
    f0 = f(x)
    g = ssm.spatial_softmax_with_loss_grad(ssm.softmax(x, layout=layout), target, w, d_loss,
                                           **opts)
    assert_matches_fd(g, numeric, f0)
    loss, fg = ssm.spatial_softmax_with_loss_and_grad(x, target, w, d_loss, **opts)
    assert_matches_fd(fg, numeric, f0)
    # And the reference gradient agrees with the reference loss (keeps the reference honest).
    ropts = dict(opts)
    if reduction == "none":
        def rf(z):
            return float(np.sum(d_loss * ref.sswl_loss(z, target, w, **ropts)[1]))
    else:
        def rf(z):
            return d_loss * float(ref.sswl_loss(z, target, w, **ropts)[1])
    assert_matches_fd(ref.sswl_grad(ref.softmax(x, layout), target, w, d_loss, **ropts),
                      numerical_gradient(rf, x), f0)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(3, 5), (2, 4, 3, 2), (1, 3, 2, 2, 2)])
def test_softmax_grad_fd(rng, shape, layout):
    x = make_logits(rng, shape)
    dprob = rng.standard_normal(shape)

    def f(z):
        return float(np.sum(ssm.softmax(z, layout=layout) * dprob))

    numeric = numerical_gradient(f, x)
    g = ssm.softmax_grad(ssm.softmax(x, layout=layout), dprob, layout=layout)
    assert_matches_fd(g, numeric, f(x))
