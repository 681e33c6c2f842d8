"""Fused == separate, layouts, strided / read-only inputs, out=, threads, determinism."""

import concurrent.futures

import numpy as np
import pytest

import _reference as ref
import ssm
from conftest import (FLOAT_DTYPES, LABEL_DTYPES, LAYOUTS, REDUCTIONS, assert_close, is_half,
                      make_class_weights, make_labels, make_lens, make_logits, make_soft_targets,
                      make_weights)


def _inputs(rng, dtype, shape=(2, 7, 5, 6), soft=False):
    N, C = shape[:2]
    pix = (N, *shape[2:])
    x = make_logits(rng, shape, dtype)
    y = make_soft_targets(rng, shape, dtype) if soft else make_labels(rng, pix, C, np.int32)
    w = make_weights(rng, pix, dtype)
    opts = {"class_weights": make_class_weights(rng, C, dtype), "label_smoothing": 0.1}
    if not soft:
        opts["lens"] = make_lens(rng, C)
    return x, y, w, opts


@pytest.mark.parametrize("soft", [False, True], ids=["labels", "soft"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_fused_equals_separate(rng, dtype, reduction, soft):
    x, y, w, opts = _inputs(rng, dtype, soft=soft)
    d_loss = rng.random(y.shape[:1] + x.shape[2:]).astype(dtype) if reduction == "none" else 0.9
    prob, loss = ssm.spatial_softmax_with_loss(x, y, w, reduction=reduction, **opts)
    g = ssm.spatial_softmax_with_loss_grad(prob, y, w, d_loss, reduction=reduction, **opts)
    floss, fg, fprob = ssm.spatial_softmax_with_loss_and_grad(
        x, y, w, d_loss, reduction=reduction, return_prob=True, **opts)
    scale = np.max(ref.sswl_loss_scale(x, y, w, reduction=reduction, **opts))
    assert_close(floss, loss.astype(np.float64), dtype, scale=scale, factor=8)
    assert_close(fg, g.astype(np.float64), dtype, scale=np.abs(g).max(), factor=8,
                 rounded_input=True)
    assert_close(fprob, prob.astype(np.float64), dtype, scale=1e-6, factor=8)
    assert_close(fprob, ssm.softmax(x).astype(np.float64), dtype, scale=1e-6, factor=8)
    # softmax == exp(log_softmax); for half types in log space: the rounding of a log-prob
    # is absolute there, up to half an ulp of its magnitude
    logp = ssm.log_softmax(x).astype(np.float64)
    if is_half(dtype):
        assert_close(logp, np.log(prob.astype(np.float64)), dtype, scale=np.abs(logp).max(),
                     rounded_input=True)
    else:
        assert_close(np.exp(logp), prob.astype(np.float64), dtype, scale=1e-6)


@pytest.mark.parametrize("soft", [False, True], ids=["labels", "soft"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", [(2, 7, 5, 6), (3, 4, 2, 3, 5), (5, 6)])
def test_nhwc_equals_nchw(rng, shape, dtype, reduction, soft):
    x, y, w, opts = _inputs(rng, dtype, shape=shape, soft=soft)
    to_nhwc = lambda a: np.ascontiguousarray(np.moveaxis(a, 1, -1))  # noqa: E731
    xh = to_nhwc(x)
    yh = to_nhwc(y) if soft else y
    d_loss = rng.random(y.shape if not soft else x[:, 0].shape).astype(dtype) \
        if reduction == "none" else 1.25
    p, loss = ssm.spatial_softmax_with_loss(x, y, w, reduction=reduction, **opts)
    ph, lossh = ssm.spatial_softmax_with_loss(xh, yh, w, reduction=reduction, layout="NHWC",
                                              **opts)
    scale = np.max(ref.sswl_loss_scale(x, y, w, reduction=reduction, **opts))
    assert_close(ph, to_nhwc(p), dtype, scale=1e-6, factor=8)
    assert_close(lossh, loss.astype(np.float64), dtype, scale=scale, factor=8)
    g = ssm.spatial_softmax_with_loss_grad(p, y, w, d_loss, reduction=reduction, **opts)
    gh = ssm.spatial_softmax_with_loss_grad(ph, yh, w, d_loss, reduction=reduction,
                                            layout="NHWC", **opts)
    assert_close(gh, to_nhwc(g), dtype, scale=np.abs(g).max(), factor=8)
    _, fgh = ssm.spatial_softmax_with_loss_and_grad(xh, yh, w, d_loss, reduction=reduction,
                                                    layout="NHWC", **opts)
    assert_close(fgh, to_nhwc(g), dtype, scale=np.abs(g).max(), factor=8, rounded_input=True)
    for fn in (ssm.softmax, ssm.log_softmax):
        assert_close(fn(xh, layout="NHWC"), to_nhwc(fn(x)), dtype, scale=10, factor=8)
    assert_close(ssm.softmax_grad(ph, xh, layout="NHWC"), to_nhwc(ssm.softmax_grad(p, x)), dtype,
                 scale=np.abs(x).max(), factor=8)


def _views(rng, dtype):
    """(name, logits view, labels view, weights view, soft view) pairs of non-contiguous inputs."""
    big = make_logits(rng, (2, 5, 8, 14), dtype)
    lab = make_labels(rng, (2, 8, 14), 5, np.int64)
    wt = make_weights(rng, (2, 8, 14), dtype)
    soft = make_soft_targets(rng, (2, 5, 8, 14), dtype)
    nhwc = make_logits(rng, (2, 8, 7, 5), dtype)
    soft_nhwc = make_soft_targets(rng, (2, 8, 7, 5), dtype, layout="NHWC")
    return [
        ("step", big[:, :, ::2], lab[:, ::2], wt[:, ::2], soft[:, :, ::2]),
        ("negative_step", big[:, :, ::-1, 1::3], lab[:, ::-1, 1::3], wt[:, ::-1, 1::3],
         soft[:, :, ::-1, 1::3]),
        ("transposed", nhwc.transpose(0, 3, 1, 2), lab[:, :, :7], wt[:, :, :7],
         soft_nhwc.transpose(0, 3, 1, 2)),
        ("channel_step", make_logits(rng, (2, 10, 4, 3), dtype)[:, ::2], lab[:, :4, :3],
         wt[:, :4, :3], soft[:, :, :4, :3]),
        ("fortran", np.asfortranarray(big), np.asfortranarray(lab), np.asfortranarray(wt),
         np.asfortranarray(soft)),
    ]


@pytest.mark.parametrize("readonly", [False, True], ids=["writable", "readonly"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_strided_and_readonly_inputs(rng, dtype, readonly):
    for name, x, y, w, s in _views(rng, dtype):
        assert not x.flags.c_contiguous, name
        xc, yc, wc, sc = (np.ascontiguousarray(a) for a in (x, y, w, s))
        if readonly:
            for a in (x, y, w, s):
                a.flags.writeable = False
        before = [a.copy() for a in (x, y, w, s)]
        cw = make_class_weights(rng, x.shape[1], dtype)
        if readonly:
            cw.flags.writeable = False
        for target, target_c in ((y, yc), (s, sc)):
            p, loss = ssm.spatial_softmax_with_loss(x, target, w, class_weights=cw)
            pc, lossc = ssm.spatial_softmax_with_loss(xc, target_c, wc, class_weights=cw)
            np.testing.assert_array_equal(p, pc, err_msg=name)
            np.testing.assert_array_equal(loss, lossc, err_msg=name)
            rp, rloss = ref.sswl_loss(xc, target_c, wc, class_weights=cw)
            assert_close(loss, rloss, dtype, scale=ref.sswl_loss_scale(xc, target_c, wc,
                                                                       class_weights=cw))
            # gradient from a non-contiguous (and maybe read-only) prob
            pv = np.asfortranarray(pc)
            if readonly:
                pv.flags.writeable = False
            g = ssm.spatial_softmax_with_loss_grad(pv, target, w, class_weights=cw)
            gc = ssm.spatial_softmax_with_loss_grad(pc, target_c, wc, class_weights=cw)
            np.testing.assert_array_equal(g, gc, err_msg=name)
            fl, fg = ssm.spatial_softmax_with_loss_and_grad(x, target, w, class_weights=cw)
            flc, fgc = ssm.spatial_softmax_with_loss_and_grad(xc, target_c, wc, class_weights=cw)
            np.testing.assert_array_equal(fl, flc, err_msg=name)
            np.testing.assert_array_equal(fg, fgc, err_msg=name)
        np.testing.assert_array_equal(ssm.softmax(x), ssm.softmax(xc), err_msg=name)
        np.testing.assert_array_equal(ssm.log_softmax(x), ssm.log_softmax(xc), err_msg=name)
        np.testing.assert_array_equal(ssm.softmax_grad(x, w[:, None] + x),
                                      ssm.softmax_grad(xc, wc[:, None] + xc), err_msg=name)
        for a, b in zip((x, y, w, s), before):
            np.testing.assert_array_equal(a, b, err_msg=f"{name}: input modified")


def test_read_only_lens_and_d_loss(rng):
    x, y, w, opts = _inputs(rng, np.float64)
    opts["lens"].flags.writeable = False
    opts["class_weights"].flags.writeable = False
    d = rng.random(y.shape)
    d.flags.writeable = False
    a = ssm.spatial_softmax_with_loss_and_grad(x, y, w, d, reduction="none", **opts)
    b = ssm.spatial_softmax_with_loss_and_grad(x, y, w, d.copy(), reduction="none",
                                               **{k: np.array(v) if isinstance(v, np.ndarray)
                                                  else v for k, v in opts.items()})
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


# ---------------------------------------------------------------- determinism


@pytest.fixture(scope="module")
def big_inputs():
    """Large enough for many tiles on every thread: 4 x 21 x 129 x 131, float32."""
    rng = np.random.default_rng(20240611)
    N, C, H, W = 4, 21, 129, 131
    x = (2 * rng.standard_normal((N, C, H, W))).astype(np.float32)
    y = rng.integers(0, C, size=(N, H, W)).astype(np.int32)
    y[rng.random(y.shape) < 0.1] = -1
    w = rng.random((N, H, W)).astype(np.float32)
    return x, y, w


def _all_outputs(x, y, w, threads, layout="NCHW"):
    out = {}
    for reduction in ("mean", "sum", "batch"):
        p, loss = ssm.spatial_softmax_with_loss(x, y, w, reduction=reduction, layout=layout,
                                                threads=threads)
        g = ssm.spatial_softmax_with_loss_grad(p, y, w, reduction=reduction, layout=layout,
                                               threads=threads)
        fl, fg = ssm.spatial_softmax_with_loss_and_grad(x, y, w, reduction=reduction,
                                                        layout=layout, threads=threads)
        out[reduction] = (p, loss, g, fl, fg)
    return out


@pytest.mark.parametrize("layout", LAYOUTS)
def test_bitwise_identical_across_threads_and_runs(big_inputs, layout):
    x, y, w = big_inputs
    if layout == "NHWC":
        x = np.ascontiguousarray(np.moveaxis(x, 1, -1))
    base = _all_outputs(x, y, w, 1, layout)
    for threads in (1, 2, 3, None):
        other = _all_outputs(x, y, w, threads, layout)
        for reduction, arrays in base.items():
            for name, a, b in zip(("prob", "loss", "grad", "fused loss", "fused grad"),
                                  arrays, other[reduction]):
                assert a.tobytes() == b.tobytes(), f"{reduction} {name}: threads={threads}"
    # and the value is right
    _, rloss = ref.sswl_loss(x, y, w, layout=layout)
    assert_close(base["mean"][1], rloss, np.float32,
                 scale=ref.sswl_loss_scale(x, y, w, layout=layout))


@pytest.mark.parametrize("soft", [False, True], ids=["labels", "soft"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_pixels_split_anywhere_give_the_same_bits(rng, dtype, layout, soft):
    """The same pixels computed in one array or cut into pieces at odd offsets (what
    ssm.dask's chunks along N and space do) give the same probabilities, log-probabilities,
    gradients and per-pixel losses, bit for bit: which pixels fall in a vector loop's
    remainder depends on the extent, and the kernels' exp and log are the same functions
    in vector and scalar code (glibc's exp and log, vectorised through libmvec, were not:
    tests/test_exp.py)."""
    n_pix, C = 997, 7
    x, y, w, opts = _inputs(rng, dtype, (2, C, n_pix), soft)
    opts.pop("lens", None)
    if layout == "NHWC":  # rows (2 * 997, C), cut along the rows
        x = np.ascontiguousarray(np.moveaxis(x, 1, -1)).reshape(-1, C)
        y = np.ascontiguousarray(np.moveaxis(y, 1, -1)).reshape(-1, C) if soft \
            else y.reshape(-1)
        w = w.reshape(-1)
        cuts = [0, 3, 10, 17, 130, 131, 500, 763, 1001, 1994]
    else:
        cuts = [0, 3, 10, 17, 130, 131, 500, 763, 997]
    pix_axis = 0 if layout == "NHWC" else 2
    map_axis = pix_axis - (layout == "NCHW")  # the pixel axis of labels, weights, loss maps

    def outputs(x, y, w):
        """(name, array, its pixel axis) of every output that is computed per pixel."""
        kw = dict(layout=layout, **opts)
        p = ssm.softmax(x, layout=layout)
        _, g, q = ssm.spatial_softmax_with_loss_and_grad(x, y, w, 0.5, reduction="sum",
                                                         return_prob=True, **kw)
        b = ssm.spatial_softmax_with_loss_grad(q, y, w, 0.5, reduction="sum", **kw)
        # loss maps: the fused pass, the forward pass, the loss alone, the KL divergence
        # (soft targets: a log per element of the smoothed target)
        lf, _ = ssm.spatial_softmax_with_loss_and_grad(x, y, w, 0.5, reduction="none", **kw)
        _, lp = ssm.spatial_softmax_with_loss(x, y, w, reduction="none", **kw)
        la = ssm.cross_entropy(x, y, w, reduction="none", **kw)
        lk, _ = ssm.spatial_softmax_with_loss_and_grad(x, y, w, 0.5, reduction="none",
                                                       loss="kl", **kw)
        return [("softmax", p, pix_axis), ("grad", g, pix_axis), ("prob", q, pix_axis),
                ("backward grad", b, pix_axis),
                ("softmax_grad", ssm.softmax_grad(p, g, layout=layout), pix_axis),
                ("log_softmax", ssm.log_softmax(x, layout=layout), pix_axis),
                ("fused loss map", lf, map_axis), ("forward loss map", lp, map_axis),
                ("loss map alone", la, map_axis), ("kl loss map", lk, map_axis)]

    def piece(a, lo, hi, axis):
        return np.ascontiguousarray(np.take(a, np.arange(lo, hi), axis=axis))

    whole = outputs(x, y, w)
    parts = [outputs(piece(x, a, b, pix_axis),
                     piece(y, a, b, pix_axis if soft else map_axis),
                     piece(w, a, b, map_axis))
             for a, b in zip(cuts, cuts[1:])]
    for i, (name, full, axis) in enumerate(whole):
        joined = np.concatenate([p[i][1] for p in parts], axis=axis)
        assert joined.tobytes() == full.tobytes(), name


def test_loss_bitwise_identical_soft_targets_across_threads(big_inputs):
    x, _, w = big_inputs
    t = make_soft_targets(np.random.default_rng(1), x.shape, np.float32)
    losses = {threads: ssm.spatial_softmax_with_loss(x, t, w, threads=threads,
                                                     label_smoothing=0.1)[1].tobytes()
              for threads in (1, 2, 3)}
    assert len(set(losses.values())) == 1


def test_set_get_num_threads_round_trip():
    old = ssm.get_num_threads()
    assert isinstance(old, int) and old >= 1
    try:
        for n in (1, 3, 2):
            ssm.set_num_threads(n)
            assert ssm.get_num_threads() == n
    finally:
        ssm.set_num_threads(old)
    assert ssm.get_num_threads() == old


def test_set_num_threads_is_used_and_deterministic(big_inputs):
    x, y, w = big_inputs
    old = ssm.get_num_threads()
    results = []
    try:
        for n in (1, 3):
            ssm.set_num_threads(n)
            results.append(ssm.spatial_softmax_with_loss_and_grad(x, y, w))
    finally:
        ssm.set_num_threads(old)
    assert results[0][0].tobytes() == results[1][0].tobytes()
    assert results[0][1].tobytes() == results[1][1].tobytes()


def test_concurrent_python_threads_match_serial(rng):
    jobs = []
    for i in range(8):
        shape = (2, 5 + i, 17 + i, 9)
        x = make_logits(rng, shape, np.float32 if i % 2 else np.float64)
        y = make_labels(rng, (2, *shape[2:]), shape[1], np.int64)
        w = make_weights(rng, y.shape, x.dtype)
        jobs.append((x, y, w, {"reduction": REDUCTIONS[i % len(REDUCTIONS)],
                               "threads": 1 + i % 2}))

    def work(job):
        x, y, w, opts = job
        p, loss = ssm.spatial_softmax_with_loss(x, y, w, **opts)
        d = np.ones(y.shape, x.dtype) if opts["reduction"] == "none" else 1.0
        g = ssm.spatial_softmax_with_loss_grad(p, y, w, d, **opts)
        fl, fg = ssm.spatial_softmax_with_loss_and_grad(x, y, w, d, **opts)
        return p, loss, g, fl, fg, ssm.softmax(x), ssm.log_softmax(x)

    serial = [work(j) for j in jobs]
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        for _ in range(3):
            parallel = list(pool.map(work, jobs))
            for s, p in zip(serial, parallel):
                for a, b in zip(s, p):
                    assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("reduction", ["mean", "sum", "batch"])
def test_float32_reduction_accumulates_wide(big_inputs, reduction):
    # 67k pixels: a float32 running sum would be off by many eps; per-tile float64
    # partial sums leave only the per-pixel rounding, which averages out.
    x, y, w = big_inputs
    _, loss = ssm.spatial_softmax_with_loss(x, y, w, reduction=reduction)
    _, rloss = ref.sswl_loss(x, y, w, reduction=reduction)
    np.testing.assert_allclose(loss, rloss, rtol=4 * np.finfo(np.float32).eps, atol=0)


def test_forked_child_does_not_hang():
    # libgomp hangs a forked child that starts a thread team after the parent used one;
    # ssm runs single-threaded in forked children. The child gets 20 s to answer.
    import multiprocessing as mp
    if "fork" not in mp.get_all_start_methods():
        pytest.skip("no fork on this platform")
    x = np.random.default_rng(0).standard_normal((2, 5, 256, 256))  # big enough for a team
    expected = ssm.softmax(x, threads=2)  # the parent uses an OpenMP team
    ctx = mp.get_context("fork")
    with ctx.Pool(1) as pool:
        result = pool.apply_async(_softmax_in_child, (x,))
        got, threads = result.get(timeout=20)
    np.testing.assert_array_equal(got, expected)
    assert threads == 1  # get_num_threads says what a call does there


def _softmax_in_child(x):
    return ssm.softmax(x, threads=2), ssm.get_num_threads()


@pytest.mark.parametrize("C", [1, 2, 7, 8])
@pytest.mark.parametrize("soft", [False, True], ids=["labels", "soft"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_streamed_outputs_equal_cached(rng, monkeypatch, dtype, soft, C):
    """Outputs of 8 MiB and more are streamed out row by row with non-temporal stores; the
    same call with streaming forced on for a small array gives the same bits."""
    from ssm import _cpu
    x, y, w, opts = _inputs(rng, dtype, shape=(2, C, 37, 29), soft=soft)
    opts.pop("lens", None)
    dp = make_logits(rng, x.shape, dtype)

    def every_op():
        prob, loss = ssm.spatial_softmax_with_loss(x, y, w, **opts)
        floss, fg, fprob = ssm.spatial_softmax_with_loss_and_grad(x, y, w, 0.7, return_prob=True,
                                                                  **opts)
        return [prob, loss, floss, fg, fprob, ssm.softmax(x), ssm.log_softmax(x),
                ssm.spatial_softmax_with_loss_grad(prob, y, w, 0.7, **opts),
                ssm.softmax_grad(prob, dp)]

    cached = every_op()
    monkeypatch.setattr(_cpu, "STREAM_BYTES", 0)
    monkeypatch.setattr(_cpu, "STREAM_UNALIGNED_ROWS", True)  # 37x29: rows off 16 bytes
    streamed = every_op()
    for a, b in zip(streamed, cached):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_streamed_rows_at_every_alignment(rng, monkeypatch, dtype):
    """Streamed rows start and end with narrower non-temporal stores (and element stores
    off a 16-byte boundary) wherever the output's rows fall against a 64-byte line: at
    every offset of `out` in a line, the bits of the same calls with cached stores."""
    from ssm import _cpu
    x = make_logits(rng, (2, 5, 23, 29), dtype)
    y = make_labels(rng, (2, 23, 29), 5, np.int64, ignore_index=-1)
    per = 64 // x.itemsize
    raw = np.empty(x.size + 2 * per, dtype)
    start = (-raw.ctypes.data // x.itemsize) % per

    def every_op(off):
        out = raw[start + off:start + off + x.size].reshape(x.shape)
        res = [ssm.softmax(x, out=out).copy(), ssm.log_softmax(x, out=out).copy()]
        res.append(ssm.spatial_softmax_with_loss_and_grad(x, y, out=out)[0])
        res.append(out.copy())
        res.extend(ssm.spatial_softmax_with_loss_and_grad(x, y, label_smoothing=0.1,
                                                          return_prob=True))
        return res

    cached = [every_op(off) for off in range(per)]
    monkeypatch.setattr(_cpu, "STREAM_BYTES", 0)
    monkeypatch.setattr(_cpu, "STREAM_UNALIGNED_ROWS", True)  # else these are not streamed
    for off in range(per):
        for a, b in zip(every_op(off), cached[off]):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("C", [3, 8, 21, 64, 65, 256, 257, 512, 513])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_streamed_nhwc_outputs_equal_cached(rng, monkeypatch, dtype, C):
    """Streamed outputs of the rows layout (NHWC) are transposed 64 bytes of pixels at a
    time into a staging buffer and sent out by non-temporal stores (float up to 256
    classes, double up to 512; plain stores above). Every pass that writes a block of
    rows gives the cached stores' bits and writes nothing outside `out`: at each 16-byte
    offset of `out` in a 64-byte line (and 4 or 8 bytes off, where the streamed row
    begins with element stores), with a last tile and a last group of 8 pixels cut short
    (2x7x9 pixels in tiles of 16 and more). Without AVX both runs store plainly."""
    from ssm import _cpu
    x = make_logits(rng, (2, 7, 9, C), dtype)
    y = make_labels(rng, (2, 7, 9), C, np.int64, ignore_index=-1)
    w = make_weights(rng, (2, 7, 9), dtype)
    dp = make_logits(rng, x.shape, dtype)
    kw = dict(layout="NHWC")
    raw = np.empty(x.size + 128, dtype)
    start = (-raw.ctypes.data // x.itemsize) % (64 // x.itemsize) + 64 // x.itemsize

    def every_op(offset_bytes):
        at = start + offset_bytes // x.itemsize
        raw.fill(-7.0)
        out = raw[at:at + x.size].reshape(x.shape)
        res = [ssm.softmax(x, out=out, **kw).copy(), ssm.log_softmax(x, out=out, **kw).copy(),
               ssm.spatial_softmax_with_loss(x, y, w, out=out, **kw)[0].copy()]
        loss, g = ssm.spatial_softmax_with_loss_and_grad(x, y, w, 0.7, out=out, **kw)
        res += [loss, g.copy()]
        res += list(ssm.spatial_softmax_with_loss_and_grad(x, y, w, 0.7, return_prob=True,
                                                            label_smoothing=0.1, **kw))
        res.append(ssm.softmax_grad(res[0], dp, out=out, **kw).copy())
        res.append(ssm.spatial_softmax_with_loss_grad(res[0], y, w, 0.7, out=out, **kw).copy())
        assert (raw[:at] == -7.0).all() and (raw[at + x.size:] == -7.0).all()
        return res

    offsets = [0, 16, 32, 48, 4] if dtype == np.float32 else [0, 16, 32, 48, 8]
    cached = [every_op(off) for off in offsets]
    monkeypatch.setattr(_cpu, "STREAM_BYTES", 0)
    monkeypatch.setattr(_cpu, "STREAM_UNALIGNED_ROWS", True)  # the 4- and 8-byte offsets
    for off, want in zip(offsets, cached):
        for a, b in zip(every_op(off), want):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("streamed", [False, True], ids=["cached", "streamed"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nhwc_fused_gradient_is_the_nchw_one_bit_for_bit(rng, monkeypatch, dtype, streamed):
    """The rows layout (NHWC) makes the fused gradient of integer labels as it transposes
    each tile's block of exp back to rows (float32 with AVX: ssm_store_ given f), the
    strided layout (NCHW) row by row (ssm_grad_row, or streamed as computed): the same
    operations, so the same bits, for every class count mod 8 and pixel count mod 8 (a
    last tile and a last group of 8 pixels cut short), with ignored labels, weights and a
    per-pixel d_loss; and the label entry subtracted in its own pixel's row (a fix-up in
    the wrong place, or lost to a later store, is far off)."""
    from ssm import _cpu
    if streamed:
        monkeypatch.setattr(_cpu, "STREAM_BYTES", 0)
        monkeypatch.setattr(_cpu, "STREAM_UNALIGNED_ROWS", True)
    for C in list(range(1, 18)) + [21, 150, 256, 257, 300]:
        T = _cpu.tile_size(C, 1, np.dtype(dtype).itemsize)
        for P in sorted({5, 8, 13, T - 1, T + 9}):
            x = make_logits(rng, (1, C, P), dtype)
            x[0, :, 1] = np.inf  # non-finite logits: NaN rows, as in the strided layout
            x[0, C - 1, 2], x[0, 0, 3] = np.nan, -np.inf
            y = make_labels(rng, (1, P), C, np.int64, ignore_index=-1, ignore_frac=0.2)
            w = make_weights(rng, (1, P), dtype)
            d = rng.random((1, P)).astype(dtype)
            xh = np.ascontiguousarray(np.moveaxis(x, 1, -1))
            _, g = ssm.spatial_softmax_with_loss_and_grad(x, y, w, d, reduction="none")
            _, gh = ssm.spatial_softmax_with_loss_and_grad(xh, y, w, d, reduction="none",
                                                           layout="NHWC")
            np.testing.assert_array_equal(np.moveaxis(gh, -1, 1), g, err_msg=f"C={C} P={P}")
            # and the mean's one scale, with labels only
            _, g = ssm.spatial_softmax_with_loss_and_grad(x, y)
            _, gh = ssm.spatial_softmax_with_loss_and_grad(xh, y, layout="NHWC")
            np.testing.assert_array_equal(np.moveaxis(gh, -1, 1), g, err_msg=f"C={C} P={P}")


def test_outputs_streamed_only_where_rows_start_aligned(monkeypatch):
    """Large outputs are streamed, except where their class rows start off a 16-byte
    boundary, or off a 64-byte one for tiles of rows under 256 bytes (every tile row would
    begin and end in a line both streamed and stored plainly)."""
    from ssm import _cpu
    big = _cpu.STREAM_BYTES
    raw = np.empty(2048, np.float32)
    at = (-raw.ctypes.data // 4) % 16  # raw[at] starts a 64-byte line
    line, off4, off16 = raw[at:at + 512], raw[at + 1:at + 513], raw[at + 4:at + 516]
    wide = raw[at:at + 512].view(np.float64)  # 8-byte elements, the same line
    narrow = raw[at:at + 512].view(np.float16)
    cases = [  # (logit bytes, inner, tile, outputs, streamed)
        (big, 256 * 256, 768, (line, None), True),
        (big, 256 * 256, 768, (line, line), True),
        (big - 1, 256 * 256, 768, (line, None), False),  # small: cached
        (big, 255 * 255, 768, (line, None), False),  # rows 255 * 255 * 4 bytes apart
        (big, 255 * 256, 768, (line, None), True),  # 255 * 256 * 4: a multiple of 16
        (big, 1022, 64, (wide, None), True),  # 1022 * 8
        (big, 1023, 64, (wide, None), False),
        (big, 1024, 512, (narrow, None), True),  # 1024 * 2
        (big, 1020, 512, (narrow, None), False),  # 1020 * 2 = 2040
        (big, 256 * 256, 768, (off4, None), False),  # the array 4 bytes off
        (big, 256 * 256, 768, (line, off4), False),  # either output
        (big, 256 * 256, 768, (off16, None), True),  # 16 bytes off: long rows stream
        (big, 64 * 64, 16, (line, None), True),  # 64-byte rows on lines
        (big, 64 * 64, 16, (off16, None), False),  # ... 16 bytes off them
        (big, 64 * 68, 16, (line, None), True),  # 64 * 68 * 4 = 17408 = 272 * 64
        (big, 60 * 60, 16, (line, None), True),  # 14400 = 225 * 64
        (big, 60 * 61, 16, (line, None), False),  # 14640: a multiple of 16, not of 64
        (big, 64 * 64, 5, (line, None), False),  # 20-byte rows
        (big, 5, 5, (line, None), False),  # 20-byte images: whole rows, off 16 bytes
        (big, 8, 8, (line, None), False),  # 32-byte images: rows under a line
        (big, 64, 64, (line, None), True),  # 256-byte images: whole rows, on lines
        (big, 68, 68, (line, None), True),  # 272 bytes: on 16 bytes suffices
        (big, 64 * 64, 16, (narrow, None), False),  # 32-byte half rows
        (big, 4100, 32, (line, None), False),  # 128-byte rows, 16400 = 256 * 64 + 16
        (big, 4100, 64, (line, None), True),  # 256-byte rows: on 16 bytes suffices
        (big, 1, 16, (off16, None), True),  # rows layout: 16 bytes off suffices
        (big, 1, 16, (line, None), True),  # rows layout: tiles of whole pixels
        (big, 1, 16, (off4, None), False),
        (big, 255 * 255, 768, (None, None), True),  # nothing written
    ]
    for nbytes, inner, tile, outputs, want in cases:
        got = _cpu._streamed(nbytes, inner, tile, outputs)
        assert got is want, (nbytes, inner, tile, want)
    monkeypatch.setattr(_cpu, "STREAM_UNALIGNED_ROWS", True)
    assert _cpu._streamed(big, 255 * 255, 768, (off4, None)) is True
    assert _cpu._streamed(big - 1, 255 * 255, 768, (off4, None)) is False


def test_tiles_of_many_classes_are_at_least_128_pixels_wide(monkeypatch):
    """Tiles take about 64 KiB of logits, and with strided channels at least 128 pixels
    (class rows of 512 float32 bytes) while that is at most 1 MiB, else 64, 32 or 16
    (whole vectors; rows layouts 16 only); never more pixels than an image has.
    MIN_TILE = 16 gives the 64 KiB rule's tiles, widened to 16 pixels."""
    from ssm import _cpu
    from ssm._cpu import tile_size
    assert tile_size(21, 65536, 4) == 768
    assert tile_size(19, 1 << 19, 4) == 848
    assert tile_size(8, 1 << 19, 4) == 1024  # at most 1024
    assert tile_size(128, 65536, 4) == 128
    assert tile_size(150, 16384, 4) == 128  # 96 by the 64 KiB alone
    assert tile_size(1000, 4096, 4) == 128
    assert tile_size(2048, 4096, 4) == 128  # 1 MiB
    assert tile_size(2049, 4096, 4) == 64
    assert tile_size(3000, 4096, 4) == 64  # 5 by the 64 KiB alone
    assert tile_size(16384, 4096, 4) == 16
    assert tile_size(16385, 4096, 4) == 1
    assert tile_size(1000, 4096, 8) == 128
    assert tile_size(1500, 4096, 8) == 64
    assert tile_size(3000, 8, 4) == 8  # an image of 8 pixels
    assert tile_size(3000, 100, 4) == 64
    assert tile_size(150, 1, 4) == 96  # rows (NHWC): contiguous tiles, as many
    assert tile_size(1000, 1, 4) == 16
    assert tile_size(3000, 1, 4) == 16
    assert tile_size(16385, 1, 4) == 1
    for bad in (100, 8, 2048, 128.0, None):
        monkeypatch.setattr(_cpu, "MIN_TILE", bad)
        with pytest.raises(ValueError, match="MIN_TILE"):
            tile_size(150, 16384, 4)
        with pytest.raises(ValueError, match="MIN_TILE"):
            ssm.softmax(np.zeros((1, 150, 2, 2), np.float32))
    monkeypatch.setattr(_cpu, "MIN_TILE", 16)
    assert tile_size(150, 16384, 4) == 96
    assert tile_size(1000, 4096, 4) == 16
    assert tile_size(3000, 4096, 4) == 16


@pytest.mark.parametrize("label_dtype", LABEL_DTYPES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("options", ["plain", "weights", "class_weights", "smoothing",
                                     "ignore_in_range", "soft"])
def test_loss_alone_pre_pass_in_the_pass(rng, dtype, label_dtype, options):
    """run_with_stats (the loss alone: the label pre-pass done tile by tile inside the
    loss pass) gives run's sum and stats' normaliser and first bad label, bit for bit,
    with bad labels in several tiles (the lowest flat index wins) and without."""
    from ssm import _api, _cpu
    from ssm._codes import Op
    N, C, H, W = 2, 6, 37, 41
    x = make_logits(rng, (N, C, H, W), dtype)
    soft = options == "soft"
    ign = 2 if options == "ignore_in_range" else (255 if label_dtype == np.uint8 else -1)
    y = (make_soft_targets(rng, x.shape, dtype) if soft
         else make_labels(rng, (N, H, W), C, label_dtype, ignore_index=ign))
    kw = dict(weights=None, class_weights=None, lens=None, label_smoothing=0.0)
    if options in ("weights", "soft"):
        kw["weights"] = make_weights(rng, (N, H, W), dtype)
    if options == "class_weights":
        kw["class_weights"] = make_class_weights(rng, C, dtype)
    if options == "smoothing":
        kw["label_smoothing"] = 0.1
    for bad_at in ([],) if soft else ([], [(1, 30, 7), (0, 20, 3), (1, 2, 40)]):
        yb = y.copy()
        for i in bad_at:
            yb[i] = C + 3
        w = kw.pop("weights")
        L = _api._loss_call(_cpu, x, "logits", yb, w, ignore_index=ign, reduction="mean",
                            layout="NCHW", validate=True, threads=2, **kw)
        kw["weights"] = w
        P = L.problem.finish(None)
        total, norm, bad = _cpu.run_with_stats(Op.SSWL_FWD, P, L.threads)
        norm_s, bad_s = _cpu.stats(P, L.threads)
        total_r = _cpu.run(Op.SSWL_FWD, P, L.threads)
        assert (bad, norm) == (bad_s, norm_s)
        assert np.float64(total).tobytes() == np.float64(total_r).tobytes()
        if bad_at:
            assert bad == np.ravel_multi_index((0, 20, 3), y.shape)
            with pytest.raises(ValueError, match=r"label 9 at index \(0, 20, 3\)"):
                ssm.cross_entropy(x, yb, ignore_index=ign, **kw)
        else:
            assert bad == -1


@pytest.fixture
def two_classes():
    """Restore the one-loop path of two classes (ssm._cpu.two_classes) after a test."""
    from ssm import _cpu
    old = _cpu.two_classes()
    yield _cpu
    _cpu.two_classes(old)


def _bits_of(results):
    """The results of one call (arrays, tuples of them) as bytes, for a bitwise compare."""
    if isinstance(results, (tuple, list)):
        return [b for r in results for b in _bits_of(r)]
    return [np.asarray(results).tobytes()]


@pytest.mark.parametrize("stream", [False, True], ids=["cached", "streamed"])
@pytest.mark.parametrize("C", [2, 3])
@pytest.mark.parametrize("label_dtype", LABEL_DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_two_classes_equal_the_general_sweeps(rng, monkeypatch, two_classes, dtype, layout,
                                              label_dtype, C, stream):
    """With two classes and labels the loss passes run a pixel's sweeps in one loop
    (ssm_sswl_tile_two); it gives the general sweeps' bits: the loss alone, the forward
    pass (prob), the fused pass (gradient, with and without a d_loss map), with weights,
    class weights, ignored labels, NaN and infinite logits, ties, the KL loss, 1 and 2
    threads, a shape whose tiles end mid-vector, outputs streamed or not. The one-loop
    path must run for each of them (two_class_tiles) where it applies."""
    _cpu = two_classes
    if stream:
        monkeypatch.setattr(_cpu, "STREAM_BYTES", 0)
        monkeypatch.setattr(_cpu, "STREAM_UNALIGNED_ROWS", True)  # 37x41: rows off 16 bytes
    N, H, W = 3, 37, 41
    x = make_logits(rng, (N, C, H, W), dtype)
    x[0, 0, 0, :3] = np.nan
    x[1, C - 1, 2, 3] = 90.0
    x[2, :, 5, 5] = -np.inf
    x[2, 0, 6, 6] = np.inf
    x[0, :, 4, 4] = 1.25  # ties: the max's exp is exp(0) = 1 (the one loop does not
    x[1, 0, 4, 4], x[1, 1, 4, 4] = -0.0, 0.0  # compute it)
    x[1, :, 5, 6] = np.inf
    x[0, C - 1, 7, 7] = np.nan  # the other class's logit alone
    ign = 255 if label_dtype == np.uint8 else -100
    y = make_labels(rng, (N, H, W), C, label_dtype, ignore_index=ign)
    w = make_weights(rng, (N, H, W), dtype)
    cw = make_class_weights(rng, C, dtype)
    dmap = make_weights(rng, (N, H, W), dtype)
    if layout == "NHWC":
        x = np.ascontiguousarray(np.moveaxis(x, 1, -1))
    kw = dict(ignore_index=ign, layout=layout)

    def calls(threads):
        """(call, whether the one loop takes it) for each call of the test."""
        kt = dict(kw, threads=threads)
        return [(lambda: ssm.cross_entropy(x, y, **kt), True),
                (lambda: ssm.cross_entropy(x, y, w, class_weights=cw, reduction="none", **kt),
                 True),
                (lambda: ssm.spatial_softmax_with_loss(x, y, reduction="sum", **kt), True),
                (lambda: ssm.spatial_softmax_with_loss_and_grad(x, y, w, **kt), True),
                (lambda: ssm.spatial_softmax_with_loss_and_grad(
                    x, y, class_weights=cw, d_loss=dmap, reduction="none", **kt), True),
                (lambda: ssm.spatial_softmax_with_loss_and_grad(x, y, loss="kl", **kt), True),
                (lambda: ssm.spatial_softmax_with_loss_and_grad(x, y, return_prob=True, **kt),
                 False)]  # prob and gradient together: the general sweeps

    # not for three classes, nor half logits with strided channels (the half drivers'
    # direct tiles), nor the float kernels where their exp is the AVX-512 table one
    path = (C == 2 and not (is_half(dtype) and layout == "NCHW")
            and not (dtype != np.float64 and _cpu.float_exp_table()))
    for threads in (1, 2):
        for call, takes in calls(threads):
            _cpu.two_classes(False)
            ran = _cpu.two_class_tiles()
            general = call()
            assert _cpu.two_class_tiles() == ran
            _cpu.two_classes(True)
            one_loop = call()
            assert (_cpu.two_class_tiles() > ran) == (path and takes)
            assert _bits_of(one_loop) == _bits_of(general)


@pytest.fixture
def exp_sweep_v3():
    """Restore the AVX2 clone's hand-written sum-of-exp sweep (ssm._cpu.exp_sweep_v3)."""
    from ssm import _cpu
    old = _cpu.exp_sweep_v3()
    yield _cpu
    _cpu.exp_sweep_v3(old)


@pytest.mark.parametrize("stream", [False, True], ids=["cached", "streamed"])
@pytest.mark.parametrize("C", [1, 2, 3, 21, 33, 150])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [d for d in FLOAT_DTYPES if d != np.float64])
def test_avx2_exp_sweep_equals_gccs_loop(rng, monkeypatch, exp_sweep_v3, dtype, layout, C,
                                         stream):
    """Where the x86-64-v3 (AVX2) clone runs, its float sums of exp run a hand-written
    sweep (ssm/_expf_avx2.h) instead of gcc's loop: the same bits, for softmax, log-softmax,
    the loss alone, the forward and the fused passes (labels, soft targets, KL), float32
    and half logits, one block of classes and several (C > 32), tiles ending mid-vector,
    1 and 2 threads, outputs streamed or not, and exps that are NaN, 0, 1 and below
    FLT_MIN (there the sweep's one rounding of the product added to the sum, or its two
    where the exp is stored, must be gcc's)."""
    _cpu = exp_sweep_v3
    _cpu.exp_sweep_v3(True)
    if not _cpu.float_exp_sweep_v3():
        pytest.skip("the sweep is not used: another clone runs on this CPU, or the build "
                    "is not optimised (SSM_DEBUG)")
    if stream:
        monkeypatch.setattr(_cpu, "STREAM_BYTES", 0)
        monkeypatch.setattr(_cpu, "STREAM_UNALIGNED_ROWS", True)  # 37x41: rows off 16 bytes
    N, H, W = 2, 37, 41
    x = (rng.standard_normal((N, C, H, W)) * 30).astype(np.float32)
    x.reshape(-1)[::7] -= 95.0  # x - max in (-104, -87): exps below FLT_MIN, many of them
    x[0, 0, 0, :3] = np.nan
    x[0, :, 1, 1] = 1.25  # ties
    x[1, :, 2, 2] = -np.inf
    x[1, 0, 3, 3] = np.inf
    x[1, C - 1, 4, 4] = -np.inf
    x = x.astype(dtype)
    y = make_labels(rng, (N, H, W), C, np.int64)
    t = make_soft_targets(rng, (N, C, H, W), np.float32).astype(dtype)
    w = make_weights(rng, (N, H, W), dtype)
    if layout == "NHWC":
        x, t = (np.ascontiguousarray(np.moveaxis(a, 1, -1)) for a in (x, t))

    def calls(threads):
        kt = dict(layout=layout, threads=threads)
        return [lambda: ssm.softmax(x, **kt), lambda: ssm.log_softmax(x, **kt),
                lambda: ssm.cross_entropy(x, y, w, reduction="none", **kt),
                lambda: ssm.spatial_softmax_with_loss(x, y, label_smoothing=0.1, **kt),
                lambda: ssm.spatial_softmax_with_loss_and_grad(x, y, w, return_prob=True,
                                                               reduction="none", **kt),
                lambda: ssm.spatial_softmax_with_loss_and_grad(x, t, loss="kl", **kt)]

    for threads in (1, 2):
        for call in calls(threads):
            _cpu.exp_sweep_v3(False)
            assert not _cpu.float_exp_sweep_v3()
            gcc = call()
            _cpu.exp_sweep_v3(True)
            assert _bits_of(call()) == _bits_of(gcc)


def test_exp_sweep_switch_checks_its_argument(exp_sweep_v3):
    with pytest.raises(TypeError, match=r"on: expected True or False, got 0"):
        exp_sweep_v3.exp_sweep_v3(0)


def test_two_classes_switch_checks_its_argument(two_classes):
    with pytest.raises(TypeError, match=r"on: expected True or False, got 1"):
        two_classes.two_classes(1)
