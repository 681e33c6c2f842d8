"""Every CPU function and option against the float64 reference in _reference.py."""

import numpy as np
import pytest

import _reference as ref
import ssm
from conftest import (FLOAT_DTYPES, LABEL_DTYPES, LAYOUTS, REDUCTIONS, assert_close, eps, is_half,
                      logits_shape, make_class_weights, make_labels, make_lens, make_logits,
                      make_soft_targets, make_weights, ref_opts)

# (N, C, spatial): 0 to 3 spatial dims, odd pixel counts (1, 7, 33, 257, 1000+) so
# tiles and SIMD tails are hit, C in {1, 2, 5, 21, 150}.
SHAPES = [
    (3, 5, ()),
    (1, 1, ()),
    (2, 21, (1,)),
    (2, 5, (7,)),
    (1, 2, (33,)),
    (1, 1, (257,)),
    (2, 21, (4, 5)),
    (1, 150, (3, 11)),
    (2, 5, (3, 4, 5)),
    (1, 21, (1031,)),
    (2, 2, (33, 37)),
    (1, 5, (3, 7, 61)),
    (2, 150, (29, 31)),
    (1100, 5, ()),
]
SMALL_SHAPES = [(3, 5, ()), (2, 5, (7,)), (2, 21, (4, 5)), (1, 150, (3, 11)), (2, 5, (3, 4, 3))]


def _sid(shape):
    N, C, spatial = shape
    return f"N{N}C{C}S{'x'.join(map(str, spatial)) or '-'}"


def check_loss_and_grad(logits, target, weights=None, d_loss=1.0, **opts):
    """Run the three loss functions and compare each output with the reference."""
    dtype = logits.dtype
    reduction = opts.get("reduction", "mean")
    ropts = ref_opts(opts, dtype)
    N = logits.shape[0]
    pix_shape = (N,) + (logits.shape[2:] if opts.get("layout", "NCHW") == "NCHW"
                        else logits.shape[1:-1])

    prob, loss = ssm.spatial_softmax_with_loss(logits, target, weights, **opts)
    rprob, rloss = ref.sswl_loss(logits, target, weights, **ropts)
    scale = np.max(ref.sswl_loss_scale(logits, target, weights, **ropts), initial=0.0)

    assert type(prob) is np.ndarray and prob.dtype == dtype and prob.shape == logits.shape
    assert type(loss) is np.ndarray and loss.dtype == dtype
    assert loss.shape == (pix_shape if reduction == "none" else ())
    assert_close(prob, rprob, dtype, scale=1e-6)
    assert_close(loss, rloss, dtype, scale=scale)
    # the loss alone: the same bits, from a pass that writes no probabilities
    alone = ssm.cross_entropy(logits, target, weights, **{k: v for k, v in opts.items()
                                                          if k != "out"})
    assert type(alone) is np.ndarray and alone.dtype == dtype and alone.shape == loss.shape
    assert alone.tobytes() == loss.tobytes()

    dlogits = ssm.spatial_softmax_with_loss_grad(prob, target, weights, d_loss, **opts)
    rgrad = ref.sswl_grad(prob, target, weights, d_loss, **ropts)
    gscale = np.nanmax(np.abs(rgrad), initial=0.0)
    assert type(dlogits) is np.ndarray and dlogits.dtype == dtype
    assert dlogits.shape == logits.shape
    assert_close(dlogits, rgrad, dtype, scale=gscale)

    floss, fgrad, fprob = ssm.spatial_softmax_with_loss_and_grad(
        logits, target, weights, d_loss, return_prob=True, **opts)
    rgrad_exact = ref.sswl_grad(rprob, target, weights, d_loss, **ropts)
    assert fgrad.dtype == dtype and fprob.dtype == dtype and floss.dtype == dtype
    assert floss.shape == loss.shape and fgrad.shape == logits.shape
    assert_close(floss, rloss, dtype, scale=scale)
    assert_close(fgrad, rgrad_exact, dtype, scale=gscale)
    assert_close(fprob, rprob, dtype, scale=1e-6)
    return prob, loss, dlogits


# ---------------------------------------------------------------- softmax family


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=_sid)
def test_softmax_and_log_softmax(rng, shape, dtype, layout):
    N, C, spatial = shape
    x = make_logits(rng, logits_shape(N, C, spatial, layout), dtype)
    p = ssm.softmax(x, layout=layout)
    lp = ssm.log_softmax(x, layout=layout)
    assert p.dtype == dtype and p.shape == x.shape
    assert lp.dtype == dtype and lp.shape == x.shape
    assert_close(p, ref.softmax(x, layout), dtype, scale=1e-6)
    lp_ref = ref.log_softmax(x, layout)
    assert_close(lp, lp_ref, dtype)  # rtol and atol of 64 eps: relative to the output


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=_sid)
def test_softmax_grad(rng, shape, dtype, layout):
    N, C, spatial = shape
    lshape = logits_shape(N, C, spatial, layout)
    prob = ref.softmax(make_logits(rng, lshape), layout).astype(dtype)
    dprob = rng.standard_normal(lshape).astype(dtype)
    dx = ssm.softmax_grad(prob, dprob, layout=layout)
    assert dx.dtype == dtype and dx.shape == lshape
    assert_close(dx, ref.softmax_grad(prob, dprob, layout), dtype, scale=np.abs(dprob).max())


def test_softmax_extreme_logits():
    # Large magnitudes: the max shift must keep exp finite; log-softmax accurate to a few
    # eps of its own value, however large the logits (x - max is formed first).
    x = np.array([[1000.0, 0.0, -1000.0], [-1e4, -1e4, -1e4]])
    p = ssm.softmax(x)
    lp = ssm.log_softmax(x)
    np.testing.assert_allclose(p, ref.softmax(x), rtol=1e-15, atol=0)
    np.testing.assert_allclose(lp, [[0.0, -1000.0, -2000.0], [-np.log(3)] * 3],
                               rtol=4 * eps(np.float64), atol=4 * eps(np.float64))
    x32 = x.astype(np.float32)
    np.testing.assert_allclose(ssm.softmax(x32), ref.softmax(x32), rtol=4 * eps(np.float32),
                               atol=0)
    assert np.all(np.isfinite(ssm.log_softmax(x32)))


# ---------------------------------------------------------------- loss: shapes and dtypes


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=_sid)
def test_loss_shapes(rng, shape, dtype, layout, reduction):
    N, C, spatial = shape
    x = make_logits(rng, logits_shape(N, C, spatial, layout), dtype)
    y = make_labels(rng, (N, *spatial), C, np.int64)
    d_loss = rng.random((N, *spatial)).astype(dtype) if reduction == "none" else 0.75
    check_loss_and_grad(x, y, None, d_loss, reduction=reduction, layout=layout)


@pytest.mark.parametrize("label_dtype", LABEL_DTYPES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", [(2, 5, (3, 4)), (1, 150, (33,))], ids=_sid)
def test_label_dtypes(rng, shape, dtype, label_dtype):
    N, C, spatial = shape
    ignore = 255 if label_dtype == np.uint8 else -1
    x = make_logits(rng, (N, C, *spatial), dtype)
    y = make_labels(rng, (N, *spatial), C, label_dtype, ignore_index=ignore)
    y.flat[1] = ignore
    for reduction in REDUCTIONS:
        check_loss_and_grad(x, y, ignore_index=ignore, reduction=reduction)


# ---------------------------------------------------------------- loss: every option


def _options(rng, name, N, C, spatial, dtype, layout):
    """Return (target, weights, opts) for one named option set."""
    pix = (N, *spatial)
    lshape = logits_shape(N, C, spatial, layout)
    labels = make_labels(rng, pix, C, np.int64)
    if name == "plain":
        return labels, None, {}
    if name == "weights":
        return labels, make_weights(rng, pix, dtype), {}
    if name == "class_weights":
        return labels, None, {"class_weights": make_class_weights(rng, C, dtype)}
    if name == "smoothing":
        return labels, None, {"label_smoothing": 0.1}
    if name == "smoothing_full":
        return labels, None, {"label_smoothing": 1.0}
    if name == "smoothing_weighted":
        return labels, make_weights(rng, pix, dtype), {
            "label_smoothing": 0.2, "class_weights": make_class_weights(rng, C, dtype)}
    if name == "lens":
        return labels, None, {"lens": make_lens(rng, C)}
    if name == "lens_all":
        return labels, make_weights(rng, pix, dtype), {
            "lens": make_lens(rng, C), "label_smoothing": 0.3,
            "class_weights": make_class_weights(rng, C, dtype)}
    if name == "soft":
        return make_soft_targets(rng, lshape, dtype, layout), None, {}
    if name == "soft_all":
        return make_soft_targets(rng, lshape, dtype, layout), make_weights(rng, pix, dtype), {
            "label_smoothing": 0.15, "class_weights": make_class_weights(rng, C, dtype)}
    if name == "ignore_-100":
        return make_labels(rng, pix, C, np.int32, ignore_index=-100), None, {"ignore_index": -100}
    if name == "ignore_real_class":
        # ignore_index equal to a real class: every pixel labelled 0 is ignored.
        return rng.integers(0, C, size=pix), make_weights(rng, pix, dtype), {"ignore_index": 0}
    if name == "uint8_255":
        return (make_labels(rng, pix, C, np.uint8, ignore_index=255), None,
                {"ignore_index": 255, "class_weights": make_class_weights(rng, C, dtype)})
    if name == "uint8_never_ignored":
        # uint8 labels compared as integers: -1 never matches 255.
        y = rng.integers(0, C, size=pix).astype(np.uint8)
        return y, None, {"ignore_index": -1}
    raise AssertionError(name)


OPTION_SETS = ["plain", "weights", "class_weights", "smoothing", "smoothing_full",
               "smoothing_weighted", "lens", "lens_all", "soft", "soft_all", "ignore_-100",
               "ignore_real_class", "uint8_255", "uint8_never_ignored"]
OPTION_SHAPES = [(3, 5, ()), (2, 5, (7,)), (2, 21, (3, 5)), (1, 5, (2, 3, 4))]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", OPTION_SHAPES, ids=_sid)
@pytest.mark.parametrize("option", OPTION_SETS)
def test_options(rng, option, shape, dtype, layout, reduction):
    N, C, spatial = shape
    x = make_logits(rng, logits_shape(N, C, spatial, layout), dtype)
    target, weights, opts = _options(rng, option, N, C, spatial, dtype, layout)
    d_loss = rng.random((N, *spatial)).astype(dtype) if reduction == "none" else 1.5
    check_loss_and_grad(x, target, weights, d_loss, reduction=reduction, layout=layout, **opts)


@pytest.mark.parametrize("reduction", ["mean", "batch", "none"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", OPTION_SHAPES + [(1, 150, (3, 11))], ids=_sid)
@pytest.mark.parametrize("option", OPTION_SETS)
def test_kl_options(rng, option, shape, dtype, layout, reduction):
    N, C, spatial = shape
    x = make_logits(rng, logits_shape(N, C, spatial, layout), dtype)
    target, weights, opts = _options(rng, option, N, C, spatial, dtype, layout)
    d_loss = rng.random((N, *spatial)).astype(dtype) if reduction == "none" else 1.5
    check_loss_and_grad(x, target, weights, d_loss, reduction=reduction, layout=layout,
                        loss="kl", **opts)


@pytest.mark.parametrize("option", ["plain", "weights", "class_weights", "ignore_-100",
                                    "uint8_255"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_kl_is_cross_entropy_for_one_hot_targets(rng, option, dtype):
    # t one-hot: sum_c a_c log t_c = 0; the same kernel path, the same bits
    x = make_logits(rng, (2, 5, 7, 3), dtype)
    target, weights, opts = _options(rng, option, 2, 5, (7, 3), dtype, "NCHW")
    for reduction in REDUCTIONS:
        opts["reduction"] = reduction
        ce = ssm.spatial_softmax_with_loss(x, target, weights, **opts)
        kl = ssm.spatial_softmax_with_loss(x, target, weights, loss="kl", **opts)
        assert ce[0].tobytes() == kl[0].tobytes() and ce[1].tobytes() == kl[1].tobytes()
        fce = ssm.spatial_softmax_with_loss_and_grad(x, target, weights, **opts)
        fkl = ssm.spatial_softmax_with_loss_and_grad(x, target, weights, loss="kl", **opts)
        assert all(a.tobytes() == b.tobytes() for a, b in zip(fce, fkl))
        g = ssm.spatial_softmax_with_loss_grad(ce[0], target, weights, **opts)
        gkl = ssm.spatial_softmax_with_loss_grad(ce[0], target, weights, loss="kl", **opts)
        assert g.tobytes() == gkl.tobytes()


def test_kl_lens_example():
    # the confusion-lens example: softmax [.4, .3, .2, .1], lens row [.5, .5, 0, 0]:
    # cross-entropy 1.0601, KL 0.5 log(.5/.4) + 0.5 log(.5/.3) = 0.3670
    lens = np.array([[0.5, 0.5, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    exact = 0.5 * np.log(0.5 / 0.4) + 0.5 * np.log(0.5 / 0.3)
    for dtype in FLOAT_DTYPES:
        x = np.log(np.array([[0.4, 0.3, 0.2, 0.1]])).astype(dtype)
        _, loss = ssm.spatial_softmax_with_loss(x, np.array([0]), lens=lens, loss="kl")
        alone = ssm.cross_entropy(x, np.array([0]), lens=lens, loss="kl")
        np.testing.assert_allclose(loss, exact, rtol=8 * eps(dtype))
        np.testing.assert_allclose(loss, 0.3670, atol=1e-4 + eps(dtype) / 2)  # 0.3670: 4 digits
        assert alone.tobytes() == loss.tobytes()
        # the same divergence from the lens row given as a soft target
        t = np.array([[0.5, 0.5, 0, 0]], dtype)
        np.testing.assert_allclose(ssm.cross_entropy(x, t, loss="kl"), exact,
                                   rtol=8 * eps(dtype))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_kl_of_the_prediction_itself_is_zero(rng, dtype, layout):
    # KL(q || q) = 0 up to rounding of the terms; KL >= 0 for other targets
    x = make_logits(rng, logits_shape(2, 7, (5, 3), layout), dtype)
    q = ref.softmax(x, layout).astype(dtype)
    lmap = ssm.cross_entropy(x, q, layout=layout, loss="kl", reduction="none")
    scale = ref.sswl_loss_scale(x, q, layout=layout, loss="kl", reduction="none")
    assert np.all(np.abs(lmap) <= 64 * eps(dtype) * scale)
    t = make_soft_targets(rng, x.shape, dtype, layout)
    assert np.all(ssm.cross_entropy(x, t, layout=layout, loss="kl", reduction="none")
                  > -64 * eps(dtype) * scale)


def test_loss_alone_writes_nothing_of_the_logits_size(rng):
    import tracemalloc

    x = make_logits(rng, (2, 21, 64, 64), np.float32)
    y = make_labels(rng, (2, 64, 64), 21)
    for opts in ({}, {"label_smoothing": 0.1, "loss": "kl"}, {"reduction": "none"}):
        ssm.cross_entropy(x, y, **opts)
        tracemalloc.start()
        ssm.cross_entropy(x, y, threads=2, **opts)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < x.nbytes // 8, (opts, peak)  # the loss map, when asked for: x / 21


@pytest.mark.parametrize("loss", ["cross_entropy", "kl"])
@pytest.mark.parametrize("option", ["plain", "lens_all", "soft_all"])
def test_loss_alone_is_deterministic_across_threads(rng, option, loss):
    x = make_logits(rng, (3, 21, 40, 50), np.float32)
    target, weights, opts = _options(rng, option, 3, 21, (40, 50), np.float32, "NCHW")
    first = ssm.cross_entropy(x, target, weights, threads=1, loss=loss, **opts)
    for threads in (2, 3, 4):
        again = ssm.cross_entropy(x, target, weights, threads=threads, loss=loss, **opts)
        assert again.tobytes() == first.tobytes()


def test_ignore_real_class_matches_dropping_pixels(rng):
    # Ignoring class 0 == giving the class-0 pixels weight 0 (an independent route).
    x = make_logits(rng, (2, 5, 6, 7))
    y = rng.integers(0, 5, size=(2, 6, 7))
    _, loss = ssm.spatial_softmax_with_loss(x, y, ignore_index=0)
    _, loss_w = ssm.spatial_softmax_with_loss(x, y, (y != 0).astype(np.float64), ignore_index=-1)
    np.testing.assert_allclose(loss, loss_w, rtol=1e-14)


def test_lens_identity_equals_plain(rng):
    x = make_logits(rng, (2, 7, 5, 3))
    y = make_labels(rng, (2, 5, 3), 7)
    _, plain = ssm.spatial_softmax_with_loss(x, y)
    _, lensed = ssm.spatial_softmax_with_loss(x, y, lens=np.eye(7))
    np.testing.assert_allclose(lensed, plain, rtol=1e-14)


def test_lens_seed_example():
    # research/semantics.md section 6: q = [.4, .3, .2, .1], lens row [.5, .5, 0, 0] -> 1.0601.
    x = np.log(np.array([[0.4, 0.3, 0.2, 0.1]]))
    lens = np.array([[0.5, 0.5, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    _, loss = ssm.spatial_softmax_with_loss(x, np.array([0]), lens=lens)
    np.testing.assert_allclose(loss, -0.5 * np.log(0.4) - 0.5 * np.log(0.3), rtol=1e-14)
    np.testing.assert_allclose(loss, 1.0601, atol=1e-4)


def test_list_inputs_are_converted(rng):
    x = make_logits(rng, (2, 3, 4))
    y = make_labels(rng, (2, 4), 3)
    prob, loss = ssm.spatial_softmax_with_loss(x.tolist(), y.tolist(),
                                               class_weights=[1.0, 2.0, 0.5])
    rprob, rloss = ref.sswl_loss(x, y, class_weights=[1.0, 2.0, 0.5])
    assert type(prob) is np.ndarray and prob.dtype == np.float64
    assert_close(prob, rprob, np.float64, scale=1e-6)
    assert_close(loss, rloss, np.float64, scale=10)


@pytest.mark.parametrize("d_loss", [0.5, np.float32(0.5), np.array(0.5), np.array([0.5]),
                                    np.array([[0.5]])], ids=["float", "np32", "0d", "1", "1x1"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_scalar_d_loss_forms(rng, d_loss, reduction):
    x = make_logits(rng, (2, 5, 3, 4))
    y = make_labels(rng, (2, 3, 4), 5)
    prob = ssm.softmax(x)
    g = ssm.spatial_softmax_with_loss_grad(prob, y, None, d_loss, reduction=reduction)
    r = ref.sswl_grad(prob, y, None, 0.5, reduction=reduction)
    assert_close(g, r, np.float64, scale=np.abs(r).max())
    _, fg = ssm.spatial_softmax_with_loss_and_grad(x, y, None, d_loss, reduction=reduction)
    assert_close(fg, r, np.float64, scale=np.abs(r).max())


# ---------------------------------------------------------------- degenerate inputs


@pytest.mark.parametrize("reduction", ["mean", "sum", "batch"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("case", ["all_ignored", "zero_weights", "ignored_and_zero_weights"])
def test_zero_normaliser_gives_exact_zeros(rng, case, dtype, reduction):
    x = make_logits(rng, (2, 5, 3, 7), dtype)
    y = make_labels(rng, (2, 3, 7), 5, np.int32, ignore_frac=0)
    w = None
    if case in ("all_ignored", "ignored_and_zero_weights"):
        y[...] = -1
    if case in ("zero_weights", "ignored_and_zero_weights"):
        w = np.zeros((2, 3, 7), dtype)
    prob, loss = ssm.spatial_softmax_with_loss(x, y, w, reduction=reduction)
    assert loss.dtype == dtype and loss.shape == ()
    assert loss == 0
    assert_close(prob, ref.softmax(x), dtype, scale=1e-6)
    g = ssm.spatial_softmax_with_loss_grad(prob, y, w, 1.0, reduction=reduction)
    assert np.all(g == 0)
    floss, fg = ssm.spatial_softmax_with_loss_and_grad(x, y, w, reduction=reduction)
    assert floss == 0 and np.all(fg == 0)


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_zero_class_weight_normaliser(rng, smoothing):
    # Every label is class 2 and cw[2] == 0: sum(n) == 0, so "mean" is exactly 0 and so is
    # its gradient, even though smoothing gives the other classes weight ("sum" is not 0).
    x = make_logits(rng, (2, 4, 3, 5))
    y = np.full((2, 3, 5), 2)
    cw = np.array([1.0, 0.5, 0.0, 2.0])
    opts = {"class_weights": cw, "label_smoothing": smoothing}
    _, loss = ssm.spatial_softmax_with_loss(x, y, **opts)
    floss, fg = ssm.spatial_softmax_with_loss_and_grad(x, y, **opts)
    g = ssm.spatial_softmax_with_loss_grad(ssm.softmax(x), y, **opts)
    assert loss == 0 and floss == 0 and np.all(g == 0) and np.all(fg == 0)
    _, lsum = ssm.spatial_softmax_with_loss(x, y, reduction="sum", **opts)
    _, rsum = ref.sswl_loss(x, y, reduction="sum", **opts)
    assert (lsum > 0) == (smoothing > 0)
    assert_close(lsum, rsum, np.float64, scale=100)


def test_ignore_index_does_not_apply_to_soft_targets(rng):
    x = make_logits(rng, (2, 4, 3, 5))
    t = make_soft_targets(rng, x.shape)
    for ignore in (0, 1, -1):
        _, loss = ssm.spatial_softmax_with_loss(x, t, ignore_index=ignore, reduction="none")
        _, rloss = ref.sswl_loss(x, t, reduction="none")
        assert_close(loss, rloss, np.float64, scale=20)
        assert np.all(loss > 0)


def test_all_ignored_none_map_is_zero(rng):
    x = make_logits(rng, (2, 5, 3, 7))
    y = np.full((2, 3, 7), 3)
    _, lmap = ssm.spatial_softmax_with_loss(x, y, ignore_index=3, reduction="none")
    assert lmap.shape == (2, 3, 7) and np.all(lmap == 0)
    g = ssm.spatial_softmax_with_loss_grad(ssm.softmax(x), y, None, np.ones((2, 3, 7)),
                                           ignore_index=3, reduction="none")
    assert np.all(g == 0)


def test_ignored_rows_exactly_zero(rng):
    x = make_logits(rng, (2, 5, 4, 9))
    y = make_labels(rng, (2, 4, 9), 5, ignore_frac=0.3)
    ign = y == -1
    assert ign.any() and (~ign).any()
    for reduction in REDUCTIONS:
        d_loss = np.ones((2, 4, 9)) if reduction == "none" else 1.0
        prob, lossmap = ssm.spatial_softmax_with_loss(x, y, reduction="none")
        assert np.all(lossmap[ign] == 0)
        g = ssm.spatial_softmax_with_loss_grad(prob, y, None, d_loss, reduction=reduction)
        _, fg = ssm.spatial_softmax_with_loss_and_grad(x, y, None, d_loss, reduction=reduction)
        for grad in (g, fg):
            assert np.all(np.moveaxis(grad, 1, -1)[ign] == 0)


EMPTY_SHAPES = [(0, 5, ()), (0, 5, (3, 4)), (2, 5, (0,)), (2, 5, (3, 0)), (1, 3, (0, 2, 2))]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", EMPTY_SHAPES, ids=_sid)
def test_empty(shape, dtype, layout, reduction):
    N, C, spatial = shape
    x = np.zeros(logits_shape(N, C, spatial, layout), dtype)
    pix = (N, *spatial)
    y = np.zeros(pix, np.int64)
    w = np.ones(pix, dtype)
    d_loss = np.ones(pix, dtype) if reduction == "none" else 1.0
    assert ssm.softmax(x, layout=layout).shape == x.shape
    assert ssm.log_softmax(x, layout=layout).shape == x.shape
    assert ssm.softmax_grad(x, x, layout=layout).shape == x.shape
    opts = {"reduction": reduction, "layout": layout}
    prob, loss = ssm.spatial_softmax_with_loss(x, y, w, **opts)
    assert prob.shape == x.shape and prob.dtype == dtype
    assert loss.dtype == dtype
    if reduction == "none":
        assert loss.shape == pix
    else:
        assert loss.shape == () and loss == 0
    g = ssm.spatial_softmax_with_loss_grad(prob, y, w, d_loss, **opts)
    assert g.shape == x.shape and g.dtype == dtype
    floss, fg, fp = ssm.spatial_softmax_with_loss_and_grad(x, y, w, d_loss, return_prob=True,
                                                           **opts)
    assert floss.shape == loss.shape and fg.shape == x.shape and fp.shape == x.shape
    if reduction != "none":
        assert floss == 0
    # soft targets too
    _, sloss = ssm.spatial_softmax_with_loss(x, x, **opts)
    assert sloss.shape == loss.shape


# ---------------------------------------------------------------- out=, threads, return_prob


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_out(rng, dtype, layout):
    lshape = logits_shape(2, 5, (3, 7), layout)
    x = make_logits(rng, lshape, dtype)
    y = make_labels(rng, (2, 3, 7), 5)
    dp = rng.standard_normal(lshape).astype(dtype)

    def filled():
        return np.full(lshape, np.nan, dtype)

    out = filled()
    res = ssm.softmax(x, layout=layout, out=out)
    assert np.shares_memory(res, out)
    assert_close(out, ref.softmax(x, layout), dtype, scale=1e-6)

    out = filled()
    res = ssm.log_softmax(x, layout=layout, out=out)
    assert np.shares_memory(res, out)
    assert_close(out, ref.log_softmax(x, layout), dtype, scale=10)

    prob = ref.softmax(x, layout).astype(dtype)
    out = filled()
    res = ssm.softmax_grad(prob, dp, layout=layout, out=out)
    assert np.shares_memory(res, out)
    assert_close(out, ref.softmax_grad(prob, dp, layout), dtype, scale=np.abs(dp).max())

    out = filled()
    res, loss = ssm.spatial_softmax_with_loss(x, y, layout=layout, out=out)
    rprob, rloss = ref.sswl_loss(x, y, layout=layout)
    assert np.shares_memory(res, out)
    assert_close(out, rprob, dtype, scale=1e-6)
    assert_close(loss, rloss, dtype, scale=10)

    rgrad = ref.sswl_grad(prob, y, layout=layout)
    out = filled()
    res = ssm.spatial_softmax_with_loss_grad(prob, y, layout=layout, out=out)
    assert np.shares_memory(res, out)
    assert_close(out, rgrad, dtype, scale=np.abs(rgrad).max())

    out = filled()
    loss, res = ssm.spatial_softmax_with_loss_and_grad(x, y, layout=layout, out=out)
    assert np.shares_memory(res, out)
    assert_close(out, ref.sswl_grad(rprob, y, layout=layout), dtype, scale=np.abs(rgrad).max())
    assert_close(loss, rloss, dtype, scale=10)

    out = filled()
    loss, res, p = ssm.spatial_softmax_with_loss_and_grad(x, y, layout=layout, out=out,
                                                          return_prob=True)
    assert np.shares_memory(res, out) and not np.shares_memory(p, out)
    assert_close(p, rprob, dtype, scale=1e-6)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_threads(rng, threads, layout):
    N, C, spatial = 3, 21, (17, 29)
    x = make_logits(rng, logits_shape(N, C, spatial, layout), np.float32)
    y = make_labels(rng, (N, *spatial), C, np.int32)
    w = make_weights(rng, (N, *spatial), np.float32)
    assert_close(ssm.softmax(x, layout=layout, threads=threads), ref.softmax(x, layout),
                 np.float32, scale=1e-6)
    assert_close(ssm.log_softmax(x, layout=layout, threads=threads), ref.log_softmax(x, layout),
                 np.float32, scale=10)
    prob = ref.softmax(x, layout).astype(np.float32)
    assert_close(ssm.softmax_grad(prob, x, layout=layout, threads=threads),
                 ref.softmax_grad(prob, x, layout), np.float32, scale=np.abs(x).max())
    for reduction in REDUCTIONS:
        d_loss = np.ones((N, *spatial), np.float32) if reduction == "none" else 1.0
        check_loss_and_grad(x, y, w, d_loss, layout=layout, reduction=reduction, threads=threads)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_return_prob(rng, reduction):
    x = make_logits(rng, (2, 5, 3, 4), np.float32)
    y = make_labels(rng, (2, 3, 4), 5)
    two = ssm.spatial_softmax_with_loss_and_grad(x, y, reduction=reduction)
    three = ssm.spatial_softmax_with_loss_and_grad(x, y, reduction=reduction, return_prob=True)
    assert len(two) == 2 and len(three) == 3
    np.testing.assert_array_equal(two[0], three[0])
    np.testing.assert_array_equal(two[1], three[1])
    assert three[2].dtype == np.float32 and three[2].shape == x.shape
    assert_close(three[2], ref.softmax(x), np.float32, scale=1e-6)


# ---------------------------------------------------------------- validate=False


@pytest.mark.parametrize("label_dtype,bad", [(np.int64, 7), (np.int32, -2), (np.uint8, 200),
                                             (np.int64, 2**40)])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_validate_false_out_of_range(rng, dtype, layout, label_dtype, bad):
    N, C, spatial = 2, 5, (3, 4)
    x = make_logits(rng, logits_shape(N, C, spatial, layout), dtype)
    ignore = 255 if label_dtype == np.uint8 else -1
    y = make_labels(rng, (N, *spatial), C, label_dtype, ignore_index=ignore)
    w = make_weights(rng, (N, *spatial), dtype)
    idx = (1, 2, 1)
    y[idx] = bad
    badmask = np.zeros(y.shape, bool)
    badmask[idx] = True
    opts = {"layout": layout, "ignore_index": ignore, "validate": False}

    prob, lmap = ssm.spatial_softmax_with_loss(x, y, w, reduction="none", **opts)
    assert np.isnan(lmap[idx])
    assert np.all(np.isfinite(lmap[~badmask]))
    rprob, rmap = ref.sswl_loss(x, y, w, reduction="none", layout=layout, ignore_index=ignore)
    assert np.isnan(rmap[idx])
    assert_close(prob, rprob, dtype, scale=1e-6)
    assert_close(lmap[~badmask], rmap[~badmask], dtype, scale=50)

    for reduction in ["mean", "sum", "batch"]:
        _, loss = ssm.spatial_softmax_with_loss(x, y, w, reduction=reduction, **opts)
        assert np.isnan(loss)

    for reduction in REDUCTIONS:
        d_loss = np.ones((N, *spatial), dtype) if reduction == "none" else 1.0
        rg = ref.sswl_grad(prob, y, w, d_loss, reduction=reduction, layout=layout,
                           ignore_index=ignore)
        # the fused gradient starts from the unrounded probabilities (half types differ)
        rg_fused = ref.sswl_grad(rprob, y, w, d_loss, reduction=reduction, layout=layout,
                                 ignore_index=ignore)
        g = ssm.spatial_softmax_with_loss_grad(prob, y, w, d_loss, reduction=reduction, **opts)
        floss, fg = ssm.spatial_softmax_with_loss_and_grad(x, y, w, d_loss, reduction=reduction,
                                                           **opts)
        if reduction == "none":
            assert np.isnan(floss[idx]) and np.all(np.isfinite(floss[~badmask]))
        else:
            assert np.isnan(floss)
        for grad, rgrad in ((g, rg), (fg, rg_fused)):
            rows = ref.to_nchw(grad, layout)
            rows = np.moveaxis(rows, 1, -1)  # (N, *spatial, C)
            assert np.all(np.isnan(rows[idx]))
            assert np.all(np.isfinite(rows[~badmask]))
            # The bad pixel adds nothing to the normaliser: other rows match the reference.
            rrows = np.moveaxis(ref.to_nchw(rgrad, layout), 1, -1)
            assert_close(rows[~badmask], rrows[~badmask], dtype, scale=np.nanmax(np.abs(rgrad)))


def test_validate_false_in_range_is_unchanged(rng):
    x = make_logits(rng, (2, 5, 3, 4))
    y = make_labels(rng, (2, 3, 4), 5)
    a = ssm.spatial_softmax_with_loss_and_grad(x, y, validate=True)
    b = ssm.spatial_softmax_with_loss_and_grad(x, y, validate=False)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_rows_layout_every_channel_and_pixel_remainder(rng, dtype):
    """Rows (NHWC, (N, C)) are transposed to channel-major blocks and back in register
    tiles of 8 x 8 (float32) or 4 x 4 (float64), with the last channels of each pixel
    stored wide into the next pixel's place: every C mod 8 and pixel count mod 8, over
    tile boundaries, against the reference (a misplaced or lost element is far off)."""
    from ssm._cpu import tile_size
    for C in list(range(1, 18)) + [23, 150]:
        T = tile_size(C, 1, np.dtype(dtype).itemsize)
        for P in sorted({1, 7, 8, 9, 15, 17, T - 1, T, T + 3, 2 * T + 5}):
            x = make_logits(rng, (P, C), dtype)
            y = rng.integers(0, C, P)
            assert_close(ssm.softmax(x), ref.softmax(x), dtype, scale=1e-6)
            assert_close(ssm.log_softmax(x), ref.log_softmax(x), dtype)
            loss, g = ssm.spatial_softmax_with_loss_and_grad(x, y, reduction="sum")
            rprob, rloss = ref.sswl_loss(x, y, reduction="sum")
            assert_close(g, ref.sswl_grad(rprob, y, reduction="sum"), dtype, scale=1.0)
            assert_close(loss, rloss, dtype, scale=float(np.abs(rloss)) + 1.0)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_large_outputs_start_on_a_cache_line(rng, layout):
    # outputs ssm allocates of 1 MiB or more begin on a 64-byte boundary (streamed rows
    # then fill whole lines); smaller ones are numpy's own. Values as with out= given.
    x = make_logits(rng, logits_shape(2, 21, (128, 96), layout), np.float32)
    y = make_labels(rng, (2, 128, 96), 21)
    p = ssm.softmax(x, layout=layout)
    _, g, q = ssm.spatial_softmax_with_loss_and_grad(x, y, layout=layout, return_prob=True)
    outs = [p, ssm.log_softmax(x, layout=layout), g, q,
            ssm.spatial_softmax_with_loss(x, y, layout=layout)[0],
            ssm.softmax_grad(p, g, layout=layout), ssm.spatial_softmax(x, layout=layout)]
    for o in outs:
        assert type(o) is np.ndarray and o.shape == x.shape and o.dtype == x.dtype
        assert o.flags.c_contiguous and o.flags.writeable and o.ctypes.data % 64 == 0
    given = np.empty_like(x)
    ssm.spatial_softmax_with_loss_and_grad(x, y, layout=layout, out=given)
    assert given.tobytes() == g.tobytes()
    small = make_logits(rng, logits_shape(1, 3, (5, 7), layout), np.float32)
    assert ssm.softmax(small, layout=layout).shape == small.shape
