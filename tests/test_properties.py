"""Property-based tests (hypothesis) of the CPU backend against the float64 reference.

Random shapes (0 to 3 spatial dims; size-1 and empty N / spatial axes, which API.md
allows; C >= 1), dtypes, layouts, label dtypes, ignore mixes, per-pixel and class
weights, lenses, smoothing, soft targets, reductions, d_loss maps and thread counts,
plus invariants that need no reference: softmax rows sum to 1, the gradient sums to 0
over classes, the loss does not change when a constant is added to all logits of a
pixel, and NHWC is NCHW transposed.

Deterministic: the ``ssm-ci`` profile below is derandomized (the same examples on every
run, no example database), with a fixed example budget; the whole module takes ~20 s.
Set ``SSM_HYPOTHESIS_PROFILE=explore`` for a longer randomized search.
"""

import math
import os

import numpy as np
import pytest

from conftest import require_module

hypothesis = require_module("hypothesis", "hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import _reference as ref  # noqa: E402
import ssm  # noqa: E402
from conftest import (FLOAT_DTYPES, LABEL_DTYPES, LAYOUTS, REDUCTIONS, assert_close,  # noqa: E402
                      eps, is_half, ref_opts)

settings.register_profile(
    "ssm-ci", derandomize=True, deadline=None, database=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile(
    "explore", deadline=None, max_examples=2000,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
_PROFILE = os.environ.get("SSM_HYPOTHESIS_PROFILE", "ssm-ci")
_N_EXAMPLES = {"ssm-ci": 3.0, "explore": 50.0}.get(_PROFILE, 1.0)


def examples(n):
    """settings for one test: ``n`` examples in CI (more with the explore profile)."""
    return settings(settings.get_profile(_PROFILE), max_examples=int(n * _N_EXAMPLES))


# ---------------------------------------------------------------- strategies


@st.composite
def problems(draw, soft=None, allow_empty=True):
    """A random loss problem: dict with logits, target, weights, d_loss and options."""
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    layout = draw(st.sampled_from(LAYOUTS))
    ndim = draw(st.integers(0, 3))
    lo = 0 if allow_empty else 1
    N = draw(st.integers(lo, 3))
    C = draw(st.sampled_from([1, 2, 3, 5, 8, 17, 21, 33]))
    max_side = {0: 1, 1: 300, 2: 24, 3: 8}[ndim]
    spatial = tuple(draw(st.lists(st.integers(lo, max_side), min_size=ndim, max_size=ndim)))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    scale = draw(st.sampled_from([0.01, 1.0, 4.0]))
    shape = (N, C, *spatial) if layout == "NCHW" else (N, *spatial, C)
    pix = (N, *spatial)
    x = (scale * rng.standard_normal(shape)).astype(dtype)

    is_soft = draw(st.booleans()) if soft is None else soft
    opts = {"layout": layout}
    if is_soft:
        t = rng.random(shape) ** 3 + 1e-3
        t /= t.sum(axis=-1 if layout == "NHWC" else 1, keepdims=True)
        target = t.astype(dtype)
    else:
        label_dtype = draw(st.sampled_from(LABEL_DTYPES))
        y = rng.integers(0, C, pix)
        ignore_frac = draw(st.sampled_from([0.0, 0.2, 1.0]))
        ignore_index = draw(st.sampled_from([-1, 0, 255, C - 1]))
        info = np.iinfo(label_dtype)
        if info.min <= ignore_index <= info.max:
            y[rng.random(pix) < ignore_frac] = ignore_index
        target = y.astype(label_dtype)
        opts["ignore_index"] = ignore_index
        if draw(st.booleans()):
            L = rng.random((C, C)) ** 2
            opts["lens"] = L / L.sum(axis=1, keepdims=True)
    weights = None
    if draw(st.booleans()):
        w = 2.0 * rng.random(pix)
        w[rng.random(pix) < 0.1] = 0.0
        weights = w.astype(dtype)
    if draw(st.booleans()):
        opts["class_weights"] = 0.25 + 1.75 * rng.random(C)
    opts["label_smoothing"] = draw(st.sampled_from([0.0, 0.0, 0.1, 1.0]))
    opts["reduction"] = draw(st.sampled_from(REDUCTIONS))
    d_loss = draw(st.sampled_from([1.0, 0.5, -2.0]))
    if opts["reduction"] == "none" and draw(st.booleans()):
        d_loss = rng.standard_normal(pix).astype(dtype)
    opts["threads"] = draw(st.sampled_from([None, 1, 2, 3]))
    return dict(x=x, target=target, weights=weights, d_loss=d_loss, opts=opts, dtype=dtype,
                layout=layout, C=C, pix=pix)


def _grad_scale(x, target, weights, d_loss, opts, layout):
    """Magnitude of the terms of the gradient: max over pixels of |g_p| A_p (the gradient
    is g (A q - a); where it cancels to ~0 the rounding error is relative to this)."""
    ropts = ref_opts(opts)
    red = ropts.pop("reduction", "mean")
    xs = ref.to_nchw(x, layout)
    N, C = xs.shape[:2]
    pix = (N,) + xs.shape[2:]
    a, n, _, _ = ref.weighted_targets(target, C, spatial_shape=pix, weights=weights,
                                      logits_shape=x.shape, **ropts)
    g = np.abs(np.broadcast_to(np.asarray(d_loss, np.float64), pix)) / ref._norm(red, n, N)
    return float(np.max(g * np.abs(a).sum(axis=1), initial=0.0))


# ---------------------------------------------------------------- against the reference


@examples(150)
@given(problems())
def test_loss_and_grad_match_reference(p):
    x, t, w, d, opts, dtype = p["x"], p["target"], p["weights"], p["d_loss"], p["opts"], p["dtype"]
    ropts = ref_opts(opts, dtype)
    red = opts["reduction"]

    prob, loss = ssm.spatial_softmax_with_loss(x, t, w, **opts)
    rprob, rloss = ref.sswl_loss(x, t, w, **ropts)
    scale = np.max(ref.sswl_loss_scale(x, t, w, **ropts), initial=0.0)
    assert prob.dtype == dtype and prob.shape == x.shape
    assert loss.dtype == dtype and loss.shape == (p["pix"] if red == "none" else ())
    assert_close(prob, rprob, dtype, scale=1e-6)
    assert_close(loss, rloss, dtype, scale=scale)

    rgrad = ref.sswl_grad(prob, t, w, d, **ropts)
    gscale = max(np.max(np.abs(rgrad), initial=0.0), _grad_scale(x, t, w, d, opts, p["layout"]))
    dx = ssm.spatial_softmax_with_loss_grad(prob, t, w, d, **opts)
    assert dx.dtype == dtype and dx.shape == x.shape
    assert_close(dx, rgrad, dtype, scale=gscale)

    floss, fgrad, fprob = ssm.spatial_softmax_with_loss_and_grad(x, t, w, d, return_prob=True,
                                                                  **opts)
    rgrad = ref.sswl_grad(rprob, t, w, d, **ropts)
    assert_close(floss, rloss, dtype, scale=scale)
    assert_close(fgrad, rgrad, dtype, scale=gscale)
    np.testing.assert_array_equal(fprob, prob)
    if red != "none":
        assert floss == loss  # one pass or two: the same fixed-order sum


@examples(60)
@given(problems(), st.sampled_from([1, 2, 4]))
def test_results_do_not_depend_on_thread_count(p, threads):
    opts = dict(p["opts"], threads=1)
    want = ssm.spatial_softmax_with_loss_and_grad(p["x"], p["target"], p["weights"], p["d_loss"],
                                                  return_prob=True, **opts)
    opts["threads"] = threads
    got = ssm.spatial_softmax_with_loss_and_grad(p["x"], p["target"], p["weights"], p["d_loss"],
                                                 return_prob=True, **opts)
    for g, e in zip(got, want):
        np.testing.assert_array_equal(g, e)


@examples(80)
@given(problems())
def test_softmax_family_match_reference(p):
    x, dtype, layout = p["x"], p["dtype"], p["layout"]
    th = p["opts"]["threads"]
    prob = ssm.softmax(x, layout=layout, threads=th)
    assert_close(prob, ref.softmax(x, layout), dtype, scale=1e-6)
    lsm = ssm.log_softmax(x, layout=layout, threads=th)
    rl = ref.log_softmax(x, layout)
    assert_close(lsm, rl, dtype, scale=np.max(np.abs(rl), initial=0.0) + 1)
    d = np.random.default_rng(x.size).standard_normal(x.shape).astype(dtype)
    sg = ssm.softmax_grad(prob, d, layout=layout, threads=th)
    rsg = ref.softmax_grad(prob, d, layout)
    assert_close(sg, rsg, dtype, scale=np.max(np.abs(d), initial=0.0))


# ---------------------------------------------------------------- invariants


def _class_axis(layout):
    return 1 if layout == "NCHW" else -1


@examples(60)
@given(problems())
def test_softmax_rows_sum_to_one(p):
    x, dtype, layout = p["x"], p["dtype"], p["layout"]
    C = p["C"]
    for prob in (ssm.softmax(x, layout=layout),
                 ssm.spatial_softmax_with_loss(x, p["target"], p["weights"], **p["opts"])[0],
                 np.exp(ssm.log_softmax(x, layout=layout).astype(np.float64))):
        s = prob.astype(np.float64).sum(axis=_class_axis(layout))
        np.testing.assert_allclose(s, 1.0, rtol=0, atol=4 * (C + 2) * eps(dtype))
        assert np.all(prob >= 0) and np.all(prob <= 1)


@examples(60)
@given(problems())
def test_gradient_sums_to_zero_over_classes(p):
    """sum_c dlogits = g (A sum_c q - sum_c a) = 0: holds for any targets, weights, options."""
    x, dtype, layout, C = p["x"], p["dtype"], p["layout"], p["C"]
    loss, grad = ssm.spatial_softmax_with_loss_and_grad(x, p["target"], p["weights"], p["d_loss"],
                                                        **p["opts"])
    ax = _class_axis(layout)
    s = grad.astype(np.float64).sum(axis=ax)
    mag = np.abs(grad.astype(np.float64)).sum(axis=ax)
    gA = _grad_scale(x, p["target"], p["weights"], p["d_loss"], p["opts"], layout)
    assert np.all(np.abs(s) <= 8 * (C + 2) * eps(dtype) * (mag + gA) + 1e-300)
    prob = ssm.softmax(x, layout=layout)
    dprob = np.random.default_rng(7).standard_normal(x.shape).astype(dtype)
    sg = ssm.softmax_grad(prob, dprob, layout=layout).astype(np.float64)
    bound = 8 * (C + 2) * eps(dtype) * np.abs(prob * dprob).sum(axis=ax) * (1 + np.abs(dprob).max(
        initial=0))
    assert np.all(np.abs(sg.sum(axis=ax)) <= bound + 1e-300)


@examples(60)
@given(problems(), st.integers(-8, 8))
def test_loss_invariant_to_per_pixel_shift(p, k):
    """Adding a constant to all logits of a pixel changes nothing. Logits are rounded to
    multiples of 1/64 (1/4 for bfloat16's 8 bits) and shifts are integers (per pixel), so
    ``x + shift`` is exact and the probabilities must be bit-identical; losses agree to
    rounding."""
    x, dtype, layout = p["x"], p["dtype"], p["layout"]
    q = 4 if np.dtype(dtype).name == "bfloat16" else 64
    x = (np.round(x.astype(np.float64) * q) / q).astype(dtype)
    rng = np.random.default_rng(abs(k) + x.size)
    shift = rng.integers(-abs(k), abs(k) + 1, p["pix"]).astype(dtype)
    shift_b = shift[:, None] if layout == "NCHW" else shift[..., None]
    xs = x + shift_b
    assert np.array_equal(xs - shift_b, x)
    opts = p["opts"]
    prob0, loss0 = ssm.spatial_softmax_with_loss(x, p["target"], p["weights"], **opts)
    prob1, loss1 = ssm.spatial_softmax_with_loss(xs, p["target"], p["weights"], **opts)
    np.testing.assert_array_equal(prob1, prob0)
    np.testing.assert_array_equal(ssm.log_softmax(xs, layout=layout),
                                  ssm.log_softmax(x, layout=layout))
    scale = np.max(ref.sswl_loss_scale(xs, p["target"], p["weights"], **ref_opts(opts)),
                   initial=0.0)
    assert_close(loss1, loss0.astype(np.float64), dtype, scale=scale)
    l0, g0 = ssm.spatial_softmax_with_loss_and_grad(x, p["target"], p["weights"], p["d_loss"],
                                                    **opts)
    l1, g1 = ssm.spatial_softmax_with_loss_and_grad(xs, p["target"], p["weights"], p["d_loss"],
                                                    **opts)
    assert_close(g1, g0.astype(np.float64), dtype,
                 scale=np.max(np.abs(g0), initial=0.0), factor=16)


@examples(60)
@given(problems())
def test_nhwc_is_nchw_transposed(p):
    x, t, w, d, opts = p["x"], p["target"], p["weights"], p["d_loss"], dict(p["opts"])
    layout, dtype = p["layout"], p["dtype"]
    other = "NHWC" if layout == "NCHW" else "NCHW"
    src, dst = (1, -1) if layout == "NCHW" else (-1, 1)
    move = lambda a: np.ascontiguousarray(np.moveaxis(a, src, dst))  # noqa: E731
    xo = move(x)
    to = move(t) if t.shape == x.shape else t
    l0, g0, p0 = ssm.spatial_softmax_with_loss_and_grad(x, t, w, d, return_prob=True, **opts)
    opts["layout"] = other
    l1, g1, p1 = ssm.spatial_softmax_with_loss_and_grad(xo, to, w, d, return_prob=True, **opts)
    # not bit-identical: the two layouts take different code paths (a few ulp apart)
    assert_close(np.moveaxis(p1, dst, src), p0.astype(np.float64), dtype, scale=1e-6, factor=8)
    gscale = max(np.max(np.abs(g0), initial=0.0), _grad_scale(x, t, w, d, p["opts"], layout))
    assert_close(np.moveaxis(g1, dst, src), g0.astype(np.float64), dtype, scale=gscale, factor=16)
    scale = np.max(ref.sswl_loss_scale(x, t, w, **ref_opts(p["opts"])), initial=0.0)
    assert_close(l1, l0.astype(np.float64), dtype, scale=scale)
    assert_close(np.moveaxis(ssm.softmax(xo, layout=other), dst, src),
                 ssm.softmax(x, layout=layout).astype(np.float64), dtype, scale=1e-6, factor=8)


@examples(40)
@given(problems(soft=False, allow_empty=False))
def test_hard_labels_equal_one_hot_soft_targets(p):
    """Labels without ignores are one-hot soft targets (lens rows when a lens is given)."""
    x, y, w, opts, dtype, C = p["x"], p["target"], p["weights"], dict(p["opts"]), p["dtype"], p["C"]
    ignore = opts.pop("ignore_index")
    y = np.where(y.astype(np.int64) == ignore, 0, y.astype(np.int64))
    if not np.all((0 <= y) & (y < C)):
        return
    if ignore in range(C):
        opts["ignore_index"] = -1  # labels in [0, C): nothing to ignore
    lens = opts.pop("lens", None)
    base = np.eye(C)[y] if lens is None else np.asarray(lens)[y]  # (N, *spatial, C)
    soft = base if p["layout"] == "NHWC" else np.moveaxis(base, -1, 1)
    l0, g0 = ssm.spatial_softmax_with_loss_and_grad(x, y, w, p["d_loss"], lens=lens, **opts)
    opts.pop("ignore_index", None)
    l1, g1 = ssm.spatial_softmax_with_loss_and_grad(x, soft.astype(dtype), w, p["d_loss"], **opts)
    if opts["reduction"] == "mean" and opts.get("class_weights") is not None:
        return  # the mean divisors differ by design: sum(w cw[y]) vs sum(w)
    scale = np.max(ref.sswl_loss_scale(x, y, w, lens=lens, **ref_opts(opts)), initial=0.0)
    assert_close(l1, l0.astype(np.float64), dtype, scale=scale, factor=128)
    gscale = max(np.max(np.abs(g0), initial=0.0),
                 _grad_scale(x, y, w, p["d_loss"], dict(opts, lens=lens), p["layout"]))
    assert_close(g1, g0.astype(np.float64), dtype, scale=gscale, factor=128)


@examples(40)
@given(problems(), st.sampled_from(["mean", "sum", "batch"]))
def test_reductions_are_consistent(p, red):
    """sum == sum of the 'none' map; batch == sum / N; mean == sum / sum(n)."""
    x, t, w, dtype = p["x"], p["target"], p["weights"], p["dtype"]
    opts = dict(p["opts"], reduction="none")
    _, lmap = ssm.spatial_softmax_with_loss(x, t, w, **opts)
    opts["reduction"] = red
    _, loss = ssm.spatial_softmax_with_loss(x, t, w, **opts)
    total = lmap.astype(np.float64).sum()
    N = x.shape[0]
    if red == "sum":
        want = total
    elif red == "batch":
        want = total / N if N else 0.0
    else:
        ropts = ref_opts(opts)
        ropts.pop("reduction")
        C = p["C"]
        soft = t.shape == x.shape
        n = ref.weighted_targets(t, C, spatial_shape=p["pix"], weights=w,
                                 logits_shape=x.shape if soft else None, **ropts)[1]
        s = n.sum()
        want = total / s if s != 0 else 0.0
    mag = np.abs(lmap.astype(np.float64)).sum()
    denom = {"sum": 1.0, "batch": max(N, 1)}.get(red, None)
    if denom is None:
        s = abs(float(np.sum(n)))
        denom = s if s else 1.0
    assert math.isclose(float(loss), float(want), rel_tol=64 * eps(dtype),
                        abs_tol=64 * eps(dtype) * mag / denom + 1e-300)
