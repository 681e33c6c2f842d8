"""ssm.dask against the single call, on a dask.distributed LocalCluster with worker processes
(and the threaded scheduler), and ssm.loss_normalizer, the shard recipe's building block.

Chunks along N and space: the loss to the rounding of the final float64 sums, the gradient
and probabilities bit for bit in float32 and float64 (given the global normaliser: with
float weights its float64 sum runs in another order), the label error naming the global
index. Chunks along C: to float tolerance.
"""
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import (FLOAT_DTYPES, LAYOUTS, REDUCTIONS, assert_close, child_process_kwargs, eps,
                      logits_shape, make_class_weights, make_labels, make_lens, make_logits,
                      make_soft_targets, make_weights, require_module)

import ssm

da = require_module("dask", "dask.array")  # pip install 'ssm[dask]'
import dask  # noqa: E402

import ssm.dask as sdask  # noqa: E402


@pytest.fixture(scope="module")
def client():
    """One LocalCluster of 2 worker processes (1 thread each) for the module. Its nannies
    set OMP_NUM_THREADS=1 in this process's environment for the workers they spawn
    (distributed's ``pre-spawn-environ``) and leave it there: restored afterwards, or a
    library whose OpenMP runtime starts later in this process (PyTorch's, say) would
    default to one thread in the tests after this module."""
    distributed = require_module("dask", "distributed")  # pip install 'ssm[dask]'
    environ = dict(os.environ)
    try:
        with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                      dashboard_address=None, silence_logs=40) as cluster, \
                distributed.Client(cluster) as c:
            yield c
    finally:
        os.environ.clear()
        os.environ.update(environ)


def _pixel_shape(shape, layout):
    return (shape[0], *shape[2:]) if layout == "NCHW" else shape[:-1]


def _chunks(shape, layout, split_c=False):
    """Uneven chunks along N and the first spatial axis (and C with split_c)."""
    cax = 1 if layout == "NCHW" else len(shape) - 1
    chunks = []
    for i, n in enumerate(shape):
        if i == cax:
            chunks.append((n // 3, n - n // 3) if split_c else (n,))
        elif i == 0:
            chunks.append((1, n - 1))
        elif i == (2 if layout == "NCHW" else 1):
            chunks.append((5, n - 5))
        else:
            chunks.append((n,))
    return tuple(chunks)


def _problem(rng, *, layout="NCHW", dtype=np.float32, shape_nc=(3, 7), spatial=(11, 13),
             target="labels", label_dtype=np.int64, weights=False, cw=False, lens=False,
             smoothing=0.0, ignore_index=-1):
    N, C = shape_nc
    shape = logits_shape(N, C, spatial, layout)
    x = make_logits(rng, shape, dtype)
    pshape = _pixel_shape(shape, layout)
    if target == "soft":
        y = make_soft_targets(rng, shape, dtype, layout)
    else:
        y = make_labels(rng, pshape, C, label_dtype, ignore_index=ignore_index)
    opts = dict(layout=layout, ignore_index=ignore_index, label_smoothing=smoothing)
    w = make_weights(rng, pshape, dtype) if weights else None
    if cw:
        opts["class_weights"] = make_class_weights(rng, C, dtype)
    if lens:
        opts["lens"] = make_lens(rng, C, dtype)
    return x, y, w, opts


CASES = [
    dict(),
    dict(dtype=np.float64),
    dict(layout="NHWC"),
    dict(layout="NHWC", dtype=np.float64, weights=True, cw=True),
    dict(weights=True, cw=True),
    dict(label_dtype=np.uint8, ignore_index=255),
    dict(label_dtype=np.int32, smoothing=0.1, cw=True),
    dict(lens=True, weights=True),
    dict(target="soft"),
    dict(target="soft", weights=True, layout="NHWC"),
    dict(spatial=(), shape_nc=(40, 9)),
    dict(spatial=(5, 7, 3)),
]


def _normalisers(reduction, x, xd, y, w, opts):
    """The single call's divisor of a "mean" and the Dask path's global one (1.0 for the
    other reductions): a count, or float64 sums of the weights in two orders."""
    if reduction != "mean":
        return 1.0, 1.0
    kw = {k: opts[k] for k in ("class_weights", "ignore_index", "layout") if k in opts}
    return float(ssm.loss_normalizer(x, y, w, **kw)), \
        float(sdask.loss_normalizer(xd, y, w, **kw).compute())


def _grad_check(actual, desired, dtype, same_normaliser=True):
    """Bit for bit (every pixel's exp the same inlined function in vector and scalar code:
    tests/test_exp.py); with float weights in float64 the normaliser's last bit may
    differ, and with it the gradient's scale."""
    if dtype == np.float32 or same_normaliser:
        np.testing.assert_array_equal(actual, desired)
    else:
        np.testing.assert_allclose(actual, desired, rtol=4 * eps(dtype),
                                   atol=4 * eps(dtype) * np.abs(desired).max())


def _loss_check(actual, desired, reduction, loss_map, norms):
    """The loss map bit for bit (every pixel's loss from the same inlined exp and log
    wherever the pixel falls); a reduced loss within ssm.dask's stated bound: the same
    float64 per-pixel losses l_p summed in two orders, at most 2 (n - 1) 2**-53 sum_p |l_p|
    apart, times the divisor (the two "mean" normalisers may differ: `norms`), then each
    rounded once to the dtype (half an ulp each). `loss_map` is the single call's."""
    if reduction == "none":
        np.testing.assert_array_equal(actual, desired)
        return
    dtype = desired.dtype.type
    norm, normd = norms
    n = loss_map.size
    abs_sum = np.abs(loss_map.astype(np.float64)).sum() * (1 + eps(dtype))  # l_p, unrounded
    divisor = {"sum": 1.0, "batch": float(loss_map.shape[0]), "mean": norm}[reduction]
    a, d = float(actual), float(desired)
    bound = 2 * (n - 1) * 2.0**-53 * abs_sum / divisor
    bound += abs(d) * (abs(norm / normd - 1) + 4 * 2.0**-53)  # the divisor; its division
    bound += float(np.spacing(dtype(max(abs(a), abs(d)))))     # the two final roundings
    assert abs(a - d) <= bound, (reduction, a, d, bound)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={getattr(v, '__name__', v)}"
                                                                  for k, v in c.items()) or "plain")
def test_fused_matches_single_call_on_cluster(client, rng, case):
    x, y, w, opts = _problem(rng, **case)
    dtype = x.dtype.type
    chunks = _chunks(x.shape, opts["layout"])
    xd = da.from_array(x, chunks=chunks)
    lazy, want = [], []
    for reduction in REDUCTIONS:
        d = 0.5 if reduction != "none" else make_weights(rng, _pixel_shape(x.shape, opts["layout"]),
                                                          dtype)
        want.append(ssm.spatial_softmax_with_loss_and_grad(x, y, w, d, reduction=reduction,
                                                           return_prob=True, **opts))
        lazy.append(sdask.spatial_softmax_with_loss_and_grad(xd, y, w, d, reduction=reduction,
                                                             return_prob=True, **opts))
    got = dask.compute(*lazy)
    loss_map = want[REDUCTIONS.index("none")][0]
    for reduction, (L, dx, p), (Ld, dxd, pd) in zip(REDUCTIONS, want, got):
        assert type(dxd) is np.ndarray and dxd.dtype == x.dtype and Ld.dtype == x.dtype
        norms = _normalisers(reduction, x, xd, y, w, opts)
        _loss_check(Ld, L, reduction, loss_map, norms)
        _grad_check(dxd, dx, dtype, norms[0] == norms[1])
        _grad_check(pd, p, dtype)


@pytest.mark.parametrize("case", [CASES[0], CASES[3], CASES[7], CASES[8]],
                         ids=["plain", "nhwc-weights", "lens", "soft"])
def test_forward_and_backward_match_single_call(client, rng, case):
    x, y, w, opts = _problem(rng, **case)
    dtype = x.dtype.type
    xd = da.from_array(x, chunks=_chunks(x.shape, opts["layout"]))
    prob, L = ssm.spatial_softmax_with_loss(x, y, w, **opts)
    dx = ssm.spatial_softmax_with_loss_grad(prob, y, w, 2.0, **opts)
    probd, Ld = sdask.spatial_softmax_with_loss(xd, y, w, **opts)
    dxd = sdask.spatial_softmax_with_loss_grad(probd, y, w, 2.0, **opts)
    probd, Ld, dxd = dask.compute(probd, Ld, dxd)
    norms = _normalisers("mean", x, xd, y, w, opts)
    _loss_check(Ld, L, "mean", ssm.cross_entropy(x, y, w, reduction="none", **opts), norms)
    _grad_check(probd, prob, dtype)
    _grad_check(dxd, dx, dtype, norms[0] == norms[1])


def test_gradient_bitwise_given_the_normaliser(client, rng):
    """With weights the global normaliser is a float64 sum in another order than the single
    call's (a last-bit difference at most); given it, the gradient is the single call's
    bit for bit, in float32 and float64, at chunk extents that leave the kernels' vector
    loops a remainder (13 x 47 pixels)."""
    for dtype in FLOAT_DTYPES:
        x, y, w, opts = _problem(rng, dtype=dtype, weights=True, cw=True, spatial=(64, 47))
        cw = opts["class_weights"]
        xd = da.from_array(x, chunks=(1, 7, 13, 47))
        norm = ssm.loss_normalizer(x, y, w, class_weights=cw)
        normd = sdask.loss_normalizer(xd, y, w, class_weights=cw).compute()
        assert normd.dtype == np.float64
        np.testing.assert_allclose(normd, norm, rtol=4 * eps(np.float64))
        Ld, dxd = dask.compute(*sdask.spatial_softmax_with_loss_and_grad(xd, y, w, **opts))
        L, dx = ssm.spatial_softmax_with_loss_and_grad(x, y, w, reduction="sum",
                                                       d_loss=1.0 / float(normd), **opts)
        np.testing.assert_array_equal(dxd, dx)
        np.testing.assert_allclose(Ld, L / normd, rtol=2 * eps(dtype))


@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[4], CASES[6], CASES[7], CASES[8],
                                  CASES[9], CASES[10]],
                         ids=["plain", "nhwc", "weights", "smoothing", "lens", "soft",
                              "soft-nhwc-weights", "2d"])
def test_class_sharded_matches_to_float_tolerance(client, rng, case):
    x, y, w, opts = _problem(rng, **dict(case, shape_nc=(case.get("shape_nc", (3, 7))[0], 40)))
    dtype = x.dtype.type
    xd = da.from_array(x, chunks=_chunks(x.shape, opts["layout"], split_c=True))
    lazy, want = [], []
    for reduction in REDUCTIONS:
        want.append(ssm.spatial_softmax_with_loss_and_grad(x, y, w, 0.5, reduction=reduction,
                                                           return_prob=True, **opts))
        lazy.append(sdask.spatial_softmax_with_loss_and_grad(xd, y, w, 0.5, reduction=reduction,
                                                             return_prob=True, **opts))
    got = dask.compute(*lazy)
    for (L, dx, p), (Ld, dxd, pd) in zip(want, got):
        assert dxd.dtype == x.dtype and dxd.shape == x.shape
        assert_close(Ld, L, dtype, scale=np.abs(L).max(), factor=16)
        assert_close(dxd, dx, dtype, scale=np.abs(dx).max(), factor=16)
        assert_close(pd, p, dtype, factor=16)
    fwd = dask.compute(*sdask.spatial_softmax_with_loss(xd, y, w, **opts))
    assert_close(fwd[1], ssm.spatial_softmax_with_loss(x, y, w, **opts)[1], dtype, factor=16)


@pytest.mark.parametrize("split_c", [False, True], ids=["NC-chunks", "C-chunks"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_softmax_functions(client, rng, layout, split_c):
    x, _, _, _ = _problem(rng, layout=layout, shape_nc=(3, 40))
    dprob = make_logits(rng, x.shape, x.dtype)
    xd = da.from_array(x, chunks=_chunks(x.shape, layout, split_c))
    got = dask.compute(sdask.softmax(xd, layout=layout), sdask.log_softmax(xd, layout=layout),
                       sdask.softmax_grad(sdask.softmax(xd, layout=layout), dprob, layout=layout))
    want = (ssm.softmax(x, layout=layout), ssm.log_softmax(x, layout=layout),
            ssm.softmax_grad(ssm.softmax(x, layout=layout), dprob, layout=layout))
    for g, w in zip(got, want):
        if split_c:
            assert_close(g, w, np.float32, scale=np.abs(w).max(), factor=16)
        else:
            np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("split_c", [False, True], ids=["NC-chunks", "C-chunks"])
def test_bad_label_in_one_chunk_names_the_global_index(client, rng, split_c):
    x, y, w, opts = _problem(rng, spatial=(11, 13), shape_nc=(3, 40))
    y[2, 9, 4] = 40
    y[2, 10, 0] = -3   # a later flat index: the lowest wins, as in the single call
    with pytest.raises(ValueError) as single:
        ssm.spatial_softmax_with_loss_and_grad(x, y)
    xd = da.from_array(x, chunks=_chunks(x.shape, "NCHW", split_c))
    loss, dx = sdask.spatial_softmax_with_loss_and_grad(xd, y, reduction="sum")  # lazy: no error
    for result in (loss, dx):
        with pytest.raises(ValueError, match=re.escape(str(single.value))):
            result.compute()
    assert "(2, 9, 4)" in str(single.value)
    with pytest.raises(ValueError, match=re.escape(str(single.value))):
        sdask.spatial_softmax_with_loss(xd, y)[0].compute(scheduler="threads")
    # 18 pixel blocks: label pre-passes in groups of ssm.dask.LABEL_PASS_GROUP, the bad
    # labels in the last group, then a lower one in the first
    fine = da.from_array(x, chunks=(1, 40, 2, 13))
    assert fine.numblocks[0] * fine.numblocks[2] > 2 * sdask.LABEL_PASS_GROUP
    with pytest.raises(ValueError, match=re.escape(str(single.value))):
        sdask.spatial_softmax_with_loss_and_grad(fine, y)[1].compute()
    y[0, 3, 1] = 41
    with pytest.raises(ValueError) as single:
        ssm.spatial_softmax_with_loss(x, y)
    assert "(0, 3, 1)" in str(single.value)
    with pytest.raises(ValueError, match=re.escape(str(single.value))):
        sdask.spatial_softmax_with_loss(fine, y)[1].compute()
    y[0, 3, 1] = 0
    # validate=False: the bad pixels' loss is NaN, as in the single call
    Ld = sdask.spatial_softmax_with_loss(xd, y, validate=False, reduction="none")[1].compute()
    assert np.isnan(Ld[2, 9, 4]) and np.isnan(Ld[2, 10, 0]) and np.isfinite(Ld[0]).all()


def test_label_pass_groups_small_chunks_not_large_ones(rng, monkeypatch):
    """Small chunks of labels share a pre-pass task (LABEL_PASS_GROUP of them at most);
    chunks over LABEL_PASS_BYTES get one each (a cluster would move the group's labels
    to one worker); the results are the single call's either way."""
    x, y, _, _ = _problem(rng, shape_nc=(10, 7))
    xd = da.from_array(x, chunks=(1,) + x.shape[1:])
    n = x.shape[0]

    def label_tasks():
        loss, dx = sdask.spatial_softmax_with_loss_and_grad(xd, y)
        graph = dict(dx.__dask_graph__())
        return sum(1 for k in graph if k[0].startswith("ssm-label-pass-")), loss, dx

    groups, loss, dx = label_tasks()
    assert groups == -(-n // sdask.LABEL_PASS_GROUP)
    monkeypatch.setattr(sdask, "LABEL_PASS_BYTES", y[0].nbytes)  # one chunk's labels
    groups, loss2, dx2 = label_tasks()
    assert groups == n
    ref_loss, ref_dx = ssm.spatial_softmax_with_loss_and_grad(x, y)
    for lo, d in ((loss, dx), (loss2, dx2)):
        lo, d = dask.compute(lo, d, scheduler="sync")
        assert_close(lo, ref_loss, x.dtype)
        np.testing.assert_array_equal(d, ref_dx)


def test_bit_identical_run_to_run(client, rng):
    x, y, w, opts = _problem(rng, weights=True, cw=True, dtype=np.float64)
    for split_c in (False, True):
        xd = da.from_array(x, chunks=_chunks(x.shape, "NCHW", split_c))
        a = dask.compute(*sdask.spatial_softmax_with_loss_and_grad(xd, y, w, **opts))
        b = dask.compute(*sdask.spatial_softmax_with_loss_and_grad(xd, y, w, **opts),
                         scheduler="threads")
        for u, v in zip(a, b):
            np.testing.assert_array_equal(u, v)


def test_threaded_scheduler_and_chunked_labels(rng):
    x, y, w, opts = _problem(rng, weights=True)
    w = np.round(4 * w) / 4   # quarters: the normaliser is exact in any order
    xd = da.from_array(x, chunks=(2, 7, 4, 13))
    yd = da.from_array(y, chunks=(1, 3, 13))      # rechunked to the logits' pixel chunks
    wd = da.from_array(w, chunks=(3, 11, 5))
    L, dx = ssm.spatial_softmax_with_loss_and_grad(x, y, w, **opts)
    Ld, dxd = dask.compute(*sdask.spatial_softmax_with_loss_and_grad(xd, yd, wd, threads=1,
                                                                     **opts),
                           scheduler="threads")
    np.testing.assert_array_equal(dxd, dx)
    _loss_check(Ld, L, "mean", ssm.cross_entropy(x, y, w, reduction="none", **opts),
                _normalisers("mean", x, xd, y, w, opts))
    lazy = sdask.spatial_softmax_with_loss_and_grad(xd, yd, wd, **opts)[1]
    assert lazy.chunks == xd.chunks


def test_zero_total_weight_mean_is_zero(rng):
    x, y, _, opts = _problem(rng)
    y[:] = -1
    xd = da.from_array(x, chunks=_chunks(x.shape, "NCHW"))
    for split_c in (False, True):
        xd = da.from_array(x, chunks=_chunks(x.shape, "NCHW", split_c))
        Ld, dxd = dask.compute(*sdask.spatial_softmax_with_loss_and_grad(xd, y))
        assert Ld == 0 and not dxd.any()


def test_eager_argument_errors(rng):
    x, y, _, _ = _problem(rng)
    xd = da.from_array(x)
    with pytest.raises(ValueError, match="reduction: 'avg' is not one of"):
        sdask.spatial_softmax_with_loss(xd, y, reduction="avg")
    with pytest.raises(ValueError, match="layout"):
        sdask.softmax(xd, layout="CHW")
    with pytest.raises(ValueError, match="target: a int64 array of shape"):
        sdask.spatial_softmax_with_loss(xd, y[:2])
    with pytest.raises(TypeError, match="weights: dtype float64 differs"):
        sdask.spatial_softmax_with_loss(xd, y, np.ones(y.shape))
    with pytest.raises(TypeError, match="x: dtype int64 is not supported"):
        sdask.softmax(da.from_array(y))


@pytest.mark.parametrize("split_c", [False, True])
def test_eager_option_errors_as_the_single_call(rng, split_c):
    # Every option is checked when the graph is built, with the single call's message,
    # whether or not the class axis is split (where no chunk calls ssm on the options)
    x = make_logits(rng, (2, 6, 3, 3), np.float32)
    y = make_labels(rng, (2, 3, 3), 6, np.int64)
    xd = da.from_array(x, chunks=(1, 3 if split_c else 6, 3, 3))
    yd = da.from_array(y, chunks=(1, 3, 3))
    soft = da.from_array(np.full(x.shape, 1 / 6, np.float32), chunks=xd.chunks)
    cases = [(dict(lens=np.ones((6, 6))), ValueError), (dict(lens=np.eye(3)), ValueError),
             (dict(lens=2 * np.eye(6) - np.roll(np.eye(6), 1, 1)), ValueError),
             (dict(class_weights=np.ones(3)), ValueError),
             (dict(class_weights="abc"), TypeError), (dict(threads=0), ValueError)]
    for kw, error in cases:
        with pytest.raises(error) as single:
            ssm.spatial_softmax_with_loss(x, y, **kw)
        with pytest.raises(error) as lazy:
            sdask.spatial_softmax_with_loss(xd, yd, **kw)
        assert str(lazy.value) == str(single.value), kw
    with pytest.raises(ValueError, match=r"^lens: a confusion lens maps integer labels"):
        sdask.spatial_softmax_with_loss(xd, soft, lens=np.eye(6))
    with pytest.raises(ValueError, match=r"^threads: "):
        sdask.softmax(xd, threads=0)
    with pytest.raises(TypeError, match=r"^target: dtype uint16 is not supported; expected "
                                        r"integer labels"):
        sdask.spatial_softmax_with_loss(xd, yd.astype(np.uint16))
    with pytest.raises(TypeError, match=r"^d_loss: a 0-d Dask array is not supported"):
        sdask.spatial_softmax_with_loss_and_grad(xd, yd, reduction="sum",
                                                 d_loss=1 / sdask.loss_normalizer(xd, yd))
    mask = da.from_array(np.array([True, False]), chunks=1)
    with pytest.raises(ValueError, match=r"^logits: shape \(nan, 6, 3, 3\) has unknown chunk "
                                         r"sizes \(NaN\); expected known ones: call "
                                         r"logits.compute_chunk_sizes\(\) first"):
        sdask.spatial_softmax_with_loss(xd[mask], yd[mask])


# ---- the public building block and the shard recipe -----------------------------------

def _reference_normaliser(y, w, cw, ignore_index):
    valid = y != ignore_index
    n = np.ones(y.shape) if w is None else w.astype(np.float64)
    if cw is not None:
        n = n * cw[np.where(valid, y, 0)].astype(np.float64)
    return float(np.sum(np.where(valid, n, 0.0)))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_loss_normalizer(rng, dtype):
    x, y, w, opts = _problem(rng, dtype=dtype, weights=True, cw=True)
    cw = opts["class_weights"]
    norm = ssm.loss_normalizer(x, y, w, class_weights=cw)
    assert norm.shape == () and norm.dtype == np.float64
    np.testing.assert_allclose(norm, _reference_normaliser(y, w, cw, -1), rtol=1e-12)
    # the divisor of the single call's "mean": sum / mean
    s = ssm.spatial_softmax_with_loss(x.astype(np.float64), y, w.astype(np.float64),
                                      class_weights=cw, reduction="sum")[1]
    m = ssm.spatial_softmax_with_loss(x.astype(np.float64), y, w.astype(np.float64),
                                      class_weights=cw)[1]
    np.testing.assert_allclose(s / m, norm, rtol=1e-6)
    # the logits are not read: a broadcast stand-in gives the same value, without a copy
    stand_in = np.broadcast_to(dtype(0), x.shape)
    assert ssm.loss_normalizer(stand_in, y, w, class_weights=cw) == norm
    assert ssm.loss_normalizer(x, make_soft_targets(rng, x.shape, dtype)) == y.size
    y[1, 2, 3] = 7
    with pytest.raises(ValueError, match=re.escape("label 7 at index (1, 2, 3) is outside "
                                                   "[0, 7)")):
        ssm.loss_normalizer(x, y)
    assert ssm.loss_normalizer(x, y, validate=False) == np.sum((y != -1) & (y != 7))


def test_shard_recipe_gives_the_single_call_gradient(rng):
    """README's recipe: shards' normalisers added, each shard's gradient with reduction="sum"
    and d_loss = 1 / norm: the single call's gradient, bit for bit (float32)."""
    x, y, w, opts = _problem(rng, shape_nc=(4, 21), spatial=(16, 16), weights=True, cw=True)
    w, opts["class_weights"] = np.round(4 * w) / 4, np.round(4 * opts["class_weights"]) / 4
    L, dx = ssm.spatial_softmax_with_loss_and_grad(x, y, w, **opts)
    shards = [slice(0, 1), slice(1, 4)]
    cw = opts["class_weights"]
    norm = sum(float(ssm.loss_normalizer(x[s], y[s], w[s], class_weights=cw)) for s in shards)
    parts = [ssm.spatial_softmax_with_loss_and_grad(x[s], y[s], w[s], reduction="sum",
                                                    d_loss=1.0 / norm, **opts) for s in shards]
    np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), dx)
    np.testing.assert_allclose(sum(float(p[0]) for p in parts) / norm, L, rtol=4 * eps(np.float32))


def test_import_ssm_does_not_import_dask(tmp_path):
    code = ("import sys, ssm; assert 'dask' not in sys.modules; "
            "assert 'dask' not in dir(ssm); import ssm.dask; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         **child_process_kwargs(tmp_path))
    assert out.stdout.strip() == "ok", out.stderr


# ---- device chunks (the CUDA simulator runs the GPU backend; CuPy chunks take the same path)

def _blocks(arr, cudasim, *extra):
    """Compute ``extra`` and every block of ``arr`` (device chunks: Dask cannot concatenate
    simulated arrays) and assemble the blocks on the host."""
    blocks = arr.to_delayed()
    got = dask.compute(*extra, *blocks.ravel(), scheduler="sync")
    out = np.empty(arr.shape, arr.dtype)
    offs = [np.cumsum((0,) + c) for c in arr.chunks]
    for n, idx in enumerate(np.ndindex(blocks.shape)):
        out[tuple(slice(o[i], o[i + 1]) for o, i in zip(offs, idx))] = \
            cudasim.asnumpy(got[len(extra) + n])
    return [cudasim.asnumpy(g) for g in got[:len(extra)]], out


@pytest.mark.cudasim
@pytest.mark.parametrize("case", [dict(), dict(weights=True, cw=True), dict(target="soft"),
                                  dict(dtype=np.float64)],
                         ids=["plain", "weights", "soft", "float64"])
def test_device_chunks_on_the_simulator(rng, case):
    from ssm.testing import cudasim
    x, y, w, opts = _problem(rng, spatial=(8, 8), **case)
    if w is not None:
        w = np.round(4 * w) / 4
    xc, yc = cudasim.asarray(x), cudasim.asarray(y)
    wc = cudasim.asarray(w) if w is not None else None
    L, dx = ssm.spatial_softmax_with_loss_and_grad(xc, yc, wc, **opts)
    xd = da.from_array(xc, chunks=(2, 7, 3, 8), asarray=False)
    Ld, dxd = sdask.spatial_softmax_with_loss_and_grad(xd, yc, wc, **opts)
    (loss,), grad = _blocks(dxd, cudasim, Ld)
    np.testing.assert_array_equal(grad, cudasim.asnumpy(dx))
    np.testing.assert_allclose(loss, cudasim.asnumpy(L), rtol=2 * eps(np.float32))
    if case.get("target") != "soft":
        y[2, 7, 1] = 7
        with pytest.raises(ValueError, match=re.escape("label 7 at index (2, 7, 1)")):
            sdask.spatial_softmax_with_loss(xd, cudasim.asarray(y), **opts)[1].compute(
                scheduler="sync")


# ---- loss="kl" -------------------------------------------------------------------------

@pytest.mark.parametrize("split_c", [False, True], ids=["NC-chunks", "C-chunks"])
@pytest.mark.parametrize("case", [CASES[6], CASES[7], CASES[8], CASES[9]],
                         ids=["smoothing", "lens", "soft", "soft-nhwc-weights"])
def test_kl(rng, case, split_c):
    # the option is passed to every chunk's pass (the fused path: the single call's
    # bits for the gradient, float64 sums of the loss in chunk order); chunks along C add
    # sum_c a_c log t_c in their own Dask operations
    x, y, w, opts = _problem(rng, **dict(case, shape_nc=(3, 40)))
    dtype = x.dtype.type
    xd = da.from_array(x, chunks=_chunks(x.shape, opts["layout"], split_c))
    loss_map = ssm.cross_entropy(x, y, w, reduction="none", loss="kl", **opts)
    lazy = [(*sdask.spatial_softmax_with_loss_and_grad(xd, y, w, 0.5, reduction=reduction,
                                                       loss="kl", **opts),
             sdask.spatial_softmax_with_loss(xd, y, w, reduction=reduction, loss="kl",
                                             **opts)[1]) for reduction in REDUCTIONS]
    got = dask.compute(*lazy)  # one graph: a cluster's round trips are the test's cost
    for reduction, (Ld, dxd, Lf) in zip(REDUCTIONS, got):
        L, dx = ssm.spatial_softmax_with_loss_and_grad(x, y, w, 0.5, reduction=reduction,
                                                       loss="kl", **opts)
        Lce = ssm.spatial_softmax_with_loss(x, y, w, reduction=reduction, **opts)[1]
        assert not np.allclose(L, Lce)  # a dense target: the KL term is not 0
        if split_c:
            scale = np.abs(Lce).max()
            assert_close(Ld, L, dtype, scale=scale, factor=16)
            assert_close(Lf, L, dtype, scale=scale, factor=16)
            assert_close(dxd, dx, dtype, scale=np.abs(dx).max(), factor=16)
        else:
            norms = _normalisers(reduction, x, xd, y, w, opts)
            _loss_check(Ld, L, reduction, loss_map, norms)
            _loss_check(Lf, L, reduction, loss_map, norms)
            _grad_check(dxd, dx, dtype, norms[0] == norms[1])
    with pytest.raises(ValueError, match="loss: 'KL' is not one of"):
        sdask.spatial_softmax_with_loss_grad(xd, y, loss="KL")


@pytest.mark.parametrize("split_c", [False, True], ids=["NC-chunks", "C-chunks"])
@pytest.mark.parametrize("case", [CASES[0], CASES[3], CASES[7], CASES[8]],
                         ids=["plain", "nhwc-weights", "lens", "soft"])
def test_cross_entropy_is_the_loss_alone(rng, case, split_c):
    # the loss of spatial_softmax_with_loss, bit for bit, from a graph without the
    # probabilities (one chunk along C: no output layer; the passes write none), the two
    # computed together (their graphs' keys differ)
    x, y, w, opts = _problem(rng, **(dict(case, shape_nc=(3, 40)) if split_c else case))
    xd = da.from_array(x, chunks=_chunks(x.shape, opts["layout"], split_c=split_c))
    for reduction in REDUCTIONS:
        lazy = sdask.cross_entropy(xd, y, w, reduction=reduction, **opts)
        prob, L = sdask.spatial_softmax_with_loss(xd, y, w, reduction=reduction, **opts)
        got, want, _ = dask.compute(lazy, L, prob, scheduler="threads")
        assert got.dtype == x.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)
        if not split_c:
            assert not any(name.startswith("ssm-out-") for name in lazy.dask.layers)
            single = ssm.cross_entropy(x, y, w, reduction=reduction, **opts)
            assert_close(got, single, x.dtype.type, scale=np.abs(single).max(), factor=4)


def _positions_pairs(rng, layout, dtype, xd_of):
    """(single call, ssm.dask call) of every positions function on 5 x 7 maps of 9 x 11,
    chunked unevenly along N, C and the spatial axes (rechunked into one)."""
    N, C, S = 5, 7, (9, 11)
    shape = (N, C, *S) if layout == "NCHW" else (N, *S, C)
    x = make_logits(rng, shape, dtype)
    xd = xd_of(x)
    T = 0.3 + rng.random(C)
    dk = rng.standard_normal((N, C, 2)).astype(dtype)
    dp = rng.standard_normal(shape).astype(dtype)
    p = ssm.spatial_softmax(x, layout=layout)
    pd = xd_of(p)
    g = rng.standard_normal((*S, 3))
    kw = dict(layout=layout)
    return [
        (ssm.spatial_softmax(x, temperature=T, **kw),
         sdask.spatial_softmax(xd, temperature=T, **kw)),
        *((ssm.spatial_softmax_grad(p, dp, temperature=t, return_temperature_grad=True, **kw),
           sdask.spatial_softmax_grad(pd, dp, temperature=t, return_temperature_grad=True, **kw))
          for t in (T, 0.7)),
        (ssm.soft_argmax(x, temperature=T, return_variance=True, return_prob=True, **kw),
         sdask.soft_argmax(xd, temperature=T, return_variance=True, return_prob=True, **kw)),
        (ssm.soft_argmax(x, coordinates="pixels", **kw),
         sdask.soft_argmax(xd, coordinates="pixels", **kw)),
        (ssm.soft_argmax_grad(x, dk, temperature=T, return_temperature_grad=True, **kw),
         sdask.soft_argmax_grad(xd, dk, temperature=T, return_temperature_grad=True, **kw)),
        (ssm.soft_argmax_grad(p, dk, from_prob=True, **kw),
         sdask.soft_argmax_grad(pd, dk, from_prob=True, **kw)),
        (ssm.spatial_expectation(p, return_variance=True, **kw),
         sdask.spatial_expectation(pd, return_variance=True, **kw)),
        (ssm.spatial_expectation(p, g, **kw), sdask.spatial_expectation(pd, g, **kw)),
    ]


def _uneven(layout):
    if layout == "NCHW":
        return lambda a: da.from_array(a, chunks=((2, 3), (3, 4), (4, 5), (11,)))
    return lambda a: da.from_array(a, chunks=((2, 3), (4, 5), (11,), (3, 4)))


def _same_bits(pairs, got):
    for (want, _), res in zip(pairs, got):
        want = want if isinstance(want, tuple) else (want,)
        res = res if isinstance(res, tuple) else (res,)
        assert len(res) == len(want)
        for a, b in zip(want, res):
            a, b = np.asarray(a), np.asarray(b)
            assert a.shape == b.shape and a.dtype == b.dtype
            assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_positions_functions_are_the_single_call(rng, layout, dtype):
    # a map is one row: every block of N and C one call with its channels' temperatures,
    # the temperature gradient's per-map terms added as the single call adds them: the
    # same bits, outputs and temperature gradients (one number and one per channel)
    pairs = _positions_pairs(rng, layout, dtype, _uneven(layout))
    _same_bits(pairs, dask.compute(*[lazy for _, lazy in pairs], scheduler="threads"))


def test_positions_functions_on_cluster(client, rng):
    pairs = _positions_pairs(rng, "NHWC", np.float32, _uneven("NHWC"))
    _same_bits(pairs, dask.compute(*[lazy for _, lazy in pairs]))


def test_positions_argument_errors(rng):
    x = da.from_array(make_logits(rng, (2, 3, 4, 5), np.float32), chunks=(1, 2, 4, 5))
    with pytest.raises(ValueError, match="layout: 'NWHC' is not one of"):
        sdask.spatial_softmax(x, layout="NWHC")
    with pytest.raises(ValueError, match=r"^temperature: shape \(2,\) does not match the 3"):
        sdask.soft_argmax(x, temperature=[1.0, 2.0])
    with pytest.raises(TypeError, match=r"^x: dtype int64"):
        sdask.spatial_softmax(da.zeros((2, 3, 4), dtype=np.int64))
    with pytest.raises(ValueError,
                       match=r"^d_keypoints: shape \(2, 3, 3\); expected \(2, 3, 2\)"):
        sdask.soft_argmax_grad(x, np.zeros((2, 3, 3), np.float32))
    with pytest.raises(TypeError, match=r"^d_keypoints: dtype float64 differs from x's float32"):
        sdask.soft_argmax_grad(x, np.zeros((2, 3, 2)))
    with pytest.raises(ValueError, match=r"^dprob: shape \(2, 3, 4, 6\) differs from prob's"):
        sdask.spatial_softmax_grad(x, np.zeros((2, 3, 4, 6), np.float32))
    with pytest.raises(TypeError, match=r"^dprob: dtype float64 differs from prob's float32"):
        sdask.spatial_softmax_grad(x, np.zeros((2, 3, 4, 5)))


@pytest.mark.cudasim
def test_positions_device_chunks_on_the_simulator(rng):
    from ssm.testing import cudasim
    x = make_logits(rng, (3, 4, 6, 7), np.float32)
    dp = make_logits(rng, x.shape, np.float32)
    T = 0.5 + rng.random(4)
    p = ssm.spatial_softmax(cudasim.asarray(x), temperature=T)
    dx, dT = ssm.spatial_softmax_grad(p, cudasim.asarray(dp), temperature=T,
                                      return_temperature_grad=True)
    pd = da.from_array(p, chunks=(2, 3, 6, 7), asarray=False)
    lazy = sdask.spatial_softmax_grad(pd, da.from_array(cudasim.asarray(dp), chunks=pd.chunks,
                                                        asarray=False),
                                      temperature=T, return_temperature_grad=True)
    (dTd,), dxd = _blocks(lazy[0], cudasim, lazy[1])
    np.testing.assert_array_equal(dxd, cudasim.asnumpy(dx))
    np.testing.assert_array_equal(dTd, cudasim.asnumpy(dT))
