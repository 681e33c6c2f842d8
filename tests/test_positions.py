"""Softmax over positions: spatial_softmax, soft_argmax, spatial_expectation and their
gradients, on the CPU and on the GPU path (the simulator; a real GPU where there is one).

Against float64 references (tests/_reference_positions.py), finite differences,
kornia's ``spatial_soft_argmax2d`` / ``spatial_expectation2d`` / ``spatial_softmax2d``
where torch and kornia are installed; bit-identical results for any thread count; the
error messages.
"""

import ml_dtypes
import numpy as np
import pytest

import _reference_positions as ref
import ssm
from conftest import assert_close, make_logits, require_module
from ssm import _cpu
from ssm import _positions

LAYOUTS = ("NCHW", "NHWC")
CPU_DTYPES = (np.float32, np.float64)
HALF = (np.float16, np.dtype(ml_dtypes.bfloat16).type)
GPU_DTYPES = (*HALF, np.float32, np.float64)
# (N, C, spatial): ranks 1 to 3, a map of one position, a row longer than a tile,
# more channels than a strided tile holds, lines the CPU sums one by one (W = 128, 256)
SHAPES = [(2, 3, (5, 7)), (1, 2, (9,)), (2, 2, (3, 4, 5)), (3, 1, (1, 1)), (1, 3, (40, 50)),
          (2, 37, (3, 5)), (2, 2, (3, 128)), (1, 2, (2, 256))]


def _shape(N, C, spatial, layout):
    return (N, C, *spatial) if layout == "NCHW" else (N, *spatial, C)


def _sid(case):
    N, C, spatial = case
    return f"{N}x{C}x{'x'.join(map(str, spatial))}"


def _temperature(rng, C, kind):
    return {"one": 1.0, "number": 0.37, "channels": 0.25 + 2 * rng.random(C)}[kind]


def _factor(dtype):
    return 64 if dtype == np.float64 else 128


# ---- CPU against the references -----------------------------------------------------

@pytest.mark.parametrize("tkind", ["one", "number", "channels"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("case", SHAPES, ids=_sid)
def test_spatial_softmax(rng, case, dtype, layout, tkind):
    N, C, spatial = case
    x = make_logits(rng, _shape(N, C, spatial, layout), dtype)
    T = _temperature(rng, C, tkind)
    p = ssm.spatial_softmax(x, temperature=T, layout=layout)
    assert p.shape == x.shape and p.dtype == x.dtype
    assert_close(p, ref.spatial_softmax(x, T, layout), dtype, factor=_factor(dtype))


@pytest.mark.parametrize("coordinates", _positions.COORDINATES)
@pytest.mark.parametrize("tkind", ["one", "channels"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("case", SHAPES, ids=_sid)
def test_soft_argmax(rng, case, dtype, layout, tkind, coordinates):
    N, C, spatial = case
    x = make_logits(rng, _shape(N, C, spatial, layout), dtype)
    T = _temperature(rng, C, tkind)
    kp_ref, var_ref = ref.soft_argmax(x, T, coordinates, layout)
    scale = max(spatial) if coordinates == "pixels" else 1.0
    kp = ssm.soft_argmax(x, temperature=T, coordinates=coordinates, layout=layout)
    assert kp.shape == (N, C, len(spatial)) and kp.dtype == x.dtype
    assert_close(kp, kp_ref, dtype, scale=scale, factor=_factor(dtype))
    # the general path (variance) and the probabilities written in the same pass
    kp2, var, p = ssm.soft_argmax(x, temperature=T, coordinates=coordinates, layout=layout,
                                  return_variance=True, return_prob=True)
    assert_close(kp2, kp_ref, dtype, scale=scale, factor=_factor(dtype))
    assert_close(var, var_ref, dtype, scale=scale ** 2, factor=_factor(dtype))
    assert_close(p, ref.spatial_softmax(x, T, layout), dtype, factor=_factor(dtype))


@pytest.mark.parametrize("from_prob", [False, True])
@pytest.mark.parametrize("tkind", ["number", "channels"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("case", SHAPES, ids=_sid)
def test_soft_argmax_grad(rng, case, dtype, layout, tkind, from_prob):
    N, C, spatial = case
    x = make_logits(rng, _shape(N, C, spatial, layout), dtype)
    T = _temperature(rng, C, tkind)
    dk = rng.standard_normal((N, C, len(spatial))).astype(dtype)
    dx_ref, dT_ref = ref.soft_argmax_grad(x, dk, T, "normalized", layout)
    given = ssm.spatial_softmax(x, temperature=T, layout=layout) if from_prob else x
    dx, dT = ssm.soft_argmax_grad(given, dk, temperature=T, layout=layout,
                                  from_prob=from_prob, return_temperature_grad=True)
    assert dx.shape == x.shape and dx.dtype == x.dtype
    assert_close(dx, dx_ref, dtype, scale=np.abs(dk).max(), factor=_factor(dtype))
    dT_ref = dT_ref.sum() if tkind == "number" else dT_ref
    assert dT.shape == np.shape(dT_ref) and dT.dtype == x.dtype
    assert_close(dT, dT_ref, dtype, scale=np.abs(dk).max() * N * 8, factor=_factor(dtype) * 8)
    dx_only = ssm.soft_argmax_grad(given, dk, temperature=T, layout=layout, from_prob=from_prob)
    np.testing.assert_array_equal(dx_only, dx)


@pytest.mark.parametrize("tkind", ["number", "channels"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("case", SHAPES[:3], ids=_sid)
def test_spatial_softmax_grad(rng, case, dtype, layout, tkind):
    N, C, spatial = case
    x = make_logits(rng, _shape(N, C, spatial, layout), dtype)
    T = _temperature(rng, C, tkind)
    p = ssm.spatial_softmax(x, temperature=T, layout=layout)
    dp = rng.standard_normal(x.shape).astype(dtype)
    dx_ref, dT_ref = ref.spatial_softmax_grad(p, dp, T, layout)
    dx, dT = ssm.spatial_softmax_grad(p, dp, temperature=T, layout=layout,
                                      return_temperature_grad=True)
    assert_close(dx, dx_ref, dtype, scale=np.abs(dp).max(), factor=_factor(dtype))
    dT_ref = dT_ref.sum() if tkind == "number" else dT_ref
    assert_close(dT, dT_ref, dtype, scale=np.abs(dp).max() * 8 * N, factor=_factor(dtype) * 8)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_spatial_expectation(rng, dtype, layout):
    N, C, spatial = 2, 3, (4, 6)
    x = make_logits(rng, _shape(N, C, spatial, layout), dtype)
    p = ssm.spatial_softmax(x, layout=layout)
    for coordinates in _positions.COORDINATES:
        E, var = ssm.spatial_expectation(p, coordinates=coordinates, layout=layout,
                                         return_variance=True)
        E_ref, var_ref = ref.expectation(p, ref.grid(spatial, coordinates), layout)
        assert_close(E, E_ref, dtype, scale=6, factor=_factor(dtype))
        assert_close(var, var_ref, dtype, scale=36, factor=_factor(dtype))
    # a grid of the caller's, (*spatial, D), any D
    g = rng.standard_normal((*spatial, 3))
    E = ssm.spatial_expectation(p, g, layout=layout)
    E_ref, _ = ref.expectation(p, g.reshape(-1, 3).T, layout)
    assert E.shape == (N, C, 3)
    assert_close(E, E_ref, dtype, scale=4, factor=_factor(dtype))


def test_maps_are_used_as_given(rng):
    # not renormalised, as kornia's spatial_expectation2d
    p = np.zeros((1, 1, 3, 3))
    p[0, 0, 2, 1] = 2.0
    np.testing.assert_array_equal(ssm.spatial_expectation(p, coordinates="pixels"),
                                  [[[2.0, 4.0]]])


def test_known_values():
    x = np.zeros((1, 1, 3, 3))
    x[0, 0, 1, 2] = 100.0
    np.testing.assert_allclose(ssm.soft_argmax(x, coordinates="pixels"), [[[2.0, 1.0]]])
    # y = 0 up to the rounding of the exp(-100) terms' sum (its order depends on the build:
    # exactly 0 when vectorised, about 1e-60 at -O0)
    np.testing.assert_allclose(ssm.soft_argmax(x), [[[1.0, 0.0]]], atol=1e-40)
    # x first: the fastest axis
    x = np.zeros((1, 1, 2, 3, 4))
    x[0, 0, 1, 2, 3] = 100.0
    np.testing.assert_allclose(ssm.soft_argmax(x, coordinates="pixels"), [[[3.0, 2.0, 1.0]]])
    # a temperature divides: T -> 0 is the argmax, T -> inf the centre
    x = np.array([[[0.0, 1.0, 0.0, 0.0]]])
    assert ssm.soft_argmax(x, temperature=1e-3, coordinates="pixels")[0, 0, 0] == 1.0
    np.testing.assert_allclose(ssm.soft_argmax(x, temperature=1e9, coordinates="pixels"),
                               [[[1.5]]])


def test_extreme_values():
    x = np.array([[[-np.inf, 0.0, -np.inf], [1e30, -1e30, 0.0]]], np.float32)
    kp = ssm.soft_argmax(x, coordinates="pixels")
    np.testing.assert_array_equal(kp, [[[1.0], [0.0]]])
    x = np.array([[[np.nan, 0.0, 1.0]]])
    assert np.isnan(ssm.soft_argmax(x)).all()


# ---- finite differences ------------------------------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS)
def test_soft_argmax_finite_differences(rng, layout):
    N, C, spatial = 2, 3, (3, 4)
    x = make_logits(rng, _shape(N, C, spatial, layout))
    T = 0.5 + rng.random(C)
    dk = rng.standard_normal((N, C, 2))

    def f(x, T):
        return float((ssm.soft_argmax(x, temperature=T, layout=layout) * dk).sum())

    dx, dT = ssm.soft_argmax_grad(x, dk, temperature=T, layout=layout,
                                  return_temperature_grad=True)
    h = 1e-6
    for idx in [tuple(rng.integers(0, s) for s in x.shape) for _ in range(12)]:
        xp, xm = x.copy(), x.copy()
        xp[idx] += h
        xm[idx] -= h
        np.testing.assert_allclose(dx[idx], (f(xp, T) - f(xm, T)) / (2 * h), atol=1e-7)
    for c in range(C):
        Tp, Tm = T.copy(), T.copy()
        Tp[c] += h
        Tm[c] -= h
        np.testing.assert_allclose(dT[c], (f(x, Tp) - f(x, Tm)) / (2 * h), atol=1e-7)
    # one number: the sum over the channels
    _, dT1 = ssm.soft_argmax_grad(x, dk, temperature=0.8, layout=layout,
                                  return_temperature_grad=True)
    fd = (f(x, 0.8 + h) - f(x, 0.8 - h)) / (2 * h)
    np.testing.assert_allclose(dT1, fd, atol=1e-7)


def test_spatial_softmax_finite_differences(rng):
    N, C, spatial = 1, 2, (2, 3)
    x = make_logits(rng, (N, C, *spatial))
    T = np.array([0.7, 1.9])
    dp = rng.standard_normal(x.shape)

    def f(x, T):
        return float((ssm.spatial_softmax(x, temperature=T) * dp).sum())

    p = ssm.spatial_softmax(x, temperature=T)
    dx, dT = ssm.spatial_softmax_grad(p, dp, temperature=T, return_temperature_grad=True)
    h = 1e-6
    for idx in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[idx] += h
        xm[idx] -= h
        np.testing.assert_allclose(dx[idx], (f(xp, T) - f(xm, T)) / (2 * h), atol=1e-7)
    for c in range(C):
        Tp, Tm = T.copy(), T.copy()
        Tp[c] += h
        Tm[c] -= h
        np.testing.assert_allclose(dT[c], (f(x, Tp) - f(x, Tm)) / (2 * h), atol=1e-7)


# ---- consistency: threads, layouts, out=, streamed stores ----------------------------

@pytest.mark.parametrize("layout", LAYOUTS)
def test_bit_identical_for_any_thread_count(rng, layout):
    x = make_logits(rng, _shape(3, 20, (33, 47), layout), np.float32)
    dk = rng.standard_normal((3, 20, 2)).astype(np.float32)
    T = 0.25 + rng.random(20)
    results = []
    for threads in (1, 2, 3, 8):
        results.append((ssm.spatial_softmax(x, temperature=T, layout=layout, threads=threads),
                        *ssm.soft_argmax(x, temperature=T, layout=layout, return_variance=True,
                                         threads=threads),
                        *ssm.soft_argmax_grad(x, dk, temperature=T, layout=layout,
                                              return_temperature_grad=True, threads=threads)))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a, b)


def test_layouts_agree(rng):
    x = make_logits(rng, (2, 5, 6, 7), np.float32)
    xl = np.ascontiguousarray(np.moveaxis(x, 1, -1))
    dk = rng.standard_normal((2, 5, 2)).astype(np.float32)
    np.testing.assert_array_equal(ssm.soft_argmax(x), ssm.soft_argmax(xl, layout="NHWC"))
    np.testing.assert_array_equal(
        ssm.soft_argmax_grad(x, dk),
        np.moveaxis(ssm.soft_argmax_grad(xl, dk, layout="NHWC"), -1, 1))


def test_out_buffers_and_strided_inputs(rng):
    x = make_logits(rng, (2, 3, 8, 9), np.float64)
    dk = rng.standard_normal((2, 3, 2))
    kp = np.empty((2, 3, 2))
    assert ssm.soft_argmax(x, out=kp) is kp
    np.testing.assert_array_equal(kp, ssm.soft_argmax(x))
    dx = np.empty_like(x)
    assert ssm.soft_argmax_grad(x, dk, out=dx) is dx
    p = np.empty_like(x)
    assert ssm.spatial_softmax(x, out=p) is p
    strided = np.asfortranarray(x)
    strided.flags.writeable = False
    np.testing.assert_array_equal(ssm.soft_argmax_grad(strided, dk), dx)


def test_positions_stream_rows_that_stay_in_l2(monkeypatch):
    """Large positions outputs are streamed, except maps over POS_STREAM_ROW_BYTES in the
    kernels' float type (each row is streamed from a scratch row, which then leaves L2);
    the passes ask with the map's bytes in that type."""
    from ssm import _cpu
    big = np.empty(_cpu.STREAM_BYTES // 4, np.float32)
    small = big[:-1]
    limit = _cpu.POS_STREAM_ROW_BYTES
    assert _cpu._pos_streamed(big, limit) is True
    assert _cpu._pos_streamed(big, limit + 4) is False
    assert _cpu._pos_streamed(small, 4) is False
    assert _cpu._pos_streamed(None, 4) is False
    monkeypatch.setattr(_cpu, "POS_STREAM_ROW_BYTES", 1 << 62)
    assert _cpu._pos_streamed(big, 64 << 20) is True
    monkeypatch.undo()

    asked = []
    real = _cpu._pos_streamed

    def spy(out, row_bytes):
        asked.append((None if out is None else out.shape, row_bytes))
        return real(out, row_bytes)

    monkeypatch.setattr(_cpu, "_pos_streamed", spy)
    x = np.zeros((2, 3, 5, 7))
    dk = np.zeros((2, 3, 2))
    for dtype, size in ((np.float64, 8), (np.float32, 4), (np.float16, 4)):
        asked.clear()
        xd = x.astype(dtype)
        ssm.spatial_softmax(xd)
        ssm.soft_argmax_grad(xd, dk.astype(dtype))
        ssm.soft_argmax(xd)  # keypoints alone: no map written
        assert asked == [((2, 3, 5, 7), 35 * size)] * 2 + [(None, 35 * size)], dtype


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_in_place_rows_same_bits(rng, monkeypatch, dtype):
    # Rows of at least POS_IN_PLACE_ROW_BYTES keep spatial_softmax's exp row and its
    # gradient's dy row in the output (no scratch row): the same bits either way, the
    # temperature gradient included; streamed rows and strided ones keep their scratch
    # The 2-D soft-argmax's probabilities and gradient likewise keep the exp row in the
    # output: 12-pixel lines, and 128-pixel ones (the built-in grid by lines)
    T = np.array([0.5, 1.0, 2.0])
    for shape in ((2, 3, 8, 12), (1, 3, 3, 128)):
        x = make_logits(rng, shape, dtype)
        dp = make_logits(rng, x.shape, dtype)
        dk = rng.standard_normal((shape[0], 3, 2)).astype(dtype)

        def calls():
            p = ssm.spatial_softmax(x, temperature=T)
            dx, dT = ssm.spatial_softmax_grad(p, dp, temperature=T,
                                              return_temperature_grad=True)
            ph = ssm.spatial_softmax(np.ascontiguousarray(np.moveaxis(x, 1, -1)),
                                     temperature=T, layout="NHWC")
            kp, pk = ssm.soft_argmax(x, temperature=T, return_prob=True)
            dk_x, dk_T = ssm.soft_argmax_grad(x, dk, temperature=T,
                                              return_temperature_grad=True)
            return [a.tobytes() for a in (p, dx, dT, ph, kp, pk, dk_x, dk_T)]

        monkeypatch.setattr(_cpu, "POS_IN_PLACE_ROW_BYTES", 1 << 62)
        scratch = calls()
        monkeypatch.setattr(_cpu, "POS_IN_PLACE_ROW_BYTES", 0)
        assert calls() == scratch
        monkeypatch.setattr(_cpu, "STREAM_BYTES", 64)  # streamed rows: scratch, same bits
        assert calls() == scratch
        monkeypatch.undo()


# Channels-last maps, a row of each: more channels than a tile holds (20, 70: tiles of
# 64 and 6), 1-D and 3-D maps, lines the 2-D soft-argmax sums one by one (128, 200, 129:
# its sums and its gradient then chunk differently from the 256-element blocks of given
# probabilities' sums), a partial last chunk.
CHUNKED = [(2, 3, (5, 7)), (1, 20, (40, 50)), (2, 5, (3, 128)), (1, 17, (2, 256)),
           (1, 3, (30, 200)), (1, 2, (1300,)), (1, 4, (6, 7, 30)), (1, 70, (9, 61)),
           (1, 2, (40, 129))]


def _positions_calls(x, dp, dk, T, layout, threads):
    kw = dict(layout=layout, threads=threads)
    p = ssm.spatial_softmax(x, temperature=T, **kw)
    p1 = ssm.spatial_softmax(x, **kw)
    return [*_results(p),
            *_results(ssm.spatial_softmax_grad(p, dp, temperature=T,
                                               return_temperature_grad=True, **kw)),
            *_results(ssm.soft_argmax(x, temperature=T, return_variance=True,
                                      return_prob=True, **kw)),
            *_results(ssm.soft_argmax(x, temperature=T, return_prob=True, **kw)),
            *_results(ssm.soft_argmax(x, temperature=T, coordinates="pixels", **kw)),
            *_results(ssm.soft_argmax_grad(x, dk, temperature=T,
                                           return_temperature_grad=True, **kw)),
            *_results(ssm.soft_argmax_grad(p1, dk, from_prob=True,
                                           return_temperature_grad=True, **kw)),
            *_results(ssm.spatial_expectation(p1, return_variance=True, **kw))]


def _results(r):
    return list(r) if isinstance(r, tuple) else [r]


@pytest.mark.parametrize("dtype", [*CPU_DTYPES, *HALF])
def test_chunked_strided_rows_same_bits(rng, monkeypatch, dtype):
    # Channels-last maps whose gathered tile would not stay in the cache are swept chunk
    # by chunk (POS_GATHER_BYTES): every output and sum the same bits as the gathered
    # rows', for any number of threads (the tiles are cut by it), and as channels-first
    # maps' for float32 and float64
    for N, C, spatial in CHUNKED:
        x = make_logits(rng, (N, *spatial, C), dtype)
        dp = make_logits(rng, x.shape, dtype)
        dk = rng.standard_normal((N, C, len(spatial))).astype(dtype)
        T = 0.25 + 2 * rng.random(C)
        monkeypatch.setattr(_cpu, "POS_GATHER_BYTES", 1 << 62)
        gathered = _positions_calls(x, dp, dk, T, "NHWC", 1)
        monkeypatch.setattr(_cpu, "POS_GATHER_BYTES", 0)
        for threads in (1, 2, 3):
            chunked = _positions_calls(x, dp, dk, T, "NHWC", threads)
            for i, (a, b) in enumerate(zip(gathered, chunked)):
                assert a.tobytes() == b.tobytes(), (N, C, spatial, threads, i)
        if dtype in CPU_DTYPES:
            first = _positions_calls(np.ascontiguousarray(np.moveaxis(x, -1, 1)),
                                     np.ascontiguousarray(np.moveaxis(dp, -1, 1)), dk, T,
                                     "NCHW", 2)
            for i, (a, b) in enumerate(zip(first, chunked)):
                b = np.moveaxis(b, -1, 1) if b.shape == x.shape else b
                np.testing.assert_array_equal(a, b, err_msg=f"{N, C, spatial, i}")
        monkeypatch.undo()


def test_chunked_strided_rows_same_bits_nan_and_inf(rng, monkeypatch):
    # maps with NaN, +inf and -inf: the same bytes, NaNs' signs included
    x = make_logits(rng, (2, 7, 9, 20), np.float32)
    x[0, 1, 2, 3], x[1, 4, 4, 7], x[0, :, 0, 5] = np.nan, np.inf, -np.inf
    dp = make_logits(rng, x.shape, np.float32)
    dk = rng.standard_normal((2, 20, 2)).astype(np.float32)
    T = 0.5 + rng.random(20)
    monkeypatch.setattr(_cpu, "POS_GATHER_BYTES", 1 << 62)
    gathered = _positions_calls(x, dp, dk, T, "NHWC", 1)
    monkeypatch.setattr(_cpu, "POS_GATHER_BYTES", 0)
    chunked = _positions_calls(x, dp, dk, T, "NHWC", 2)
    for i, (a, b) in enumerate(zip(gathered, chunked)):
        assert a.tobytes() == b.tobytes(), i


def test_chunked_strided_rows_tiles():
    # all of a position's channels up to 64, halved in multiples of 8 (then to 1) while
    # fewer tiles than threads; chunk by chunk above POS_GATHER_BYTES, or with fewer gathered tiles
    # than threads above 256 KiB
    assert _cpu._pos_chunked_tile(1, 16, 1) == 16
    assert _cpu._pos_chunked_tile(1, 16, 2) == 8
    assert _cpu._pos_chunked_tile(1, 100, 1) == 64
    assert _cpu._pos_chunked_tile(1, 100, 2) == 64
    assert _cpu._pos_chunked_tile(1, 64, 4) == 16
    assert _cpu._pos_chunked_tile(1, 4, 8) == 1
    assert _cpu._pos_chunked_tile(1, 4, 2) == 2
    assert _cpu._pos_chunked_tile(1, 6, 2) == 3
    assert _cpu._pos_chunked_tile(2, 4, 2) == 4
    assert _cpu._pos_chunked_tile(3, 16, 2) == 16
    limit = _cpu.POS_GATHER_BYTES
    assert _cpu._pos_chunked(limit + 1, 100, 1) and not _cpu._pos_chunked(limit, 100, 1)
    assert _cpu._pos_chunked(256 * 1024 + 1, 1, 2)
    assert not _cpu._pos_chunked(256 * 1024, 1, 2) and not _cpu._pos_chunked(limit, 2, 2)


def test_streamed_stores(rng, monkeypatch):
    x = make_logits(rng, (2, 3, 16, 20), np.float32)
    dk = rng.standard_normal((2, 3, 2)).astype(np.float32)
    plain = (ssm.spatial_softmax(x), ssm.soft_argmax_grad(x, dk),
             ssm.soft_argmax(x, return_prob=True)[1])
    monkeypatch.setattr(_cpu, "STREAM_BYTES", 64)
    streamed = (ssm.spatial_softmax(x), ssm.soft_argmax_grad(x, dk),
                ssm.soft_argmax(x, return_prob=True)[1])
    for a, b in zip(plain, streamed):
        np.testing.assert_array_equal(a, b)


# ---- half-width maps (float16, bfloat16) on the CPU ------------------------------------

def _same_bits(half, full):
    """``half`` is ``full`` (the float32 path) rounded to the half type, bit for bit (NaN
    for NaN)."""
    assert half.dtype != full.dtype and half.shape == full.shape
    want = full.astype(half.dtype)
    nan = np.isnan(full)
    np.testing.assert_array_equal(np.isnan(half.astype(np.float32)), nan)
    np.testing.assert_array_equal(half.view(np.uint16)[~nan], want.view(np.uint16)[~nan])


def _rounded_once(half, total):
    """A float64 sum (the temperature's gradient) rounded once to the half type: within
    half a unit in the last place of it (the float32 path's own is a float32 rounding)."""
    total = np.asarray(total, np.float64)
    spacing = np.abs(total) * float(ml_dtypes.finfo(half.dtype).eps)
    assert (np.abs(half.astype(np.float64) - total) <= 0.5 * spacing + 1e-30).all()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", HALF, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("case", SHAPES, ids=_sid)
def test_half_maps_are_the_float32_path_rounded(rng, case, dtype, layout):
    N, C, spatial = case
    x = make_logits(rng, _shape(N, C, spatial, layout), dtype)
    x.flat[::7] = -30.0  # exp underflows in the scaled maps: small probabilities round too
    x32 = x.astype(np.float32)
    T = 0.25 + 2 * rng.random(C)
    dk = rng.standard_normal((N, C, len(spatial))).astype(dtype)
    dk32 = dk.astype(np.float32)
    kw = dict(temperature=T, layout=layout)
    _same_bits(ssm.spatial_softmax(x, **kw), ssm.spatial_softmax(x32, **kw))
    for coordinates in _positions.COORDINATES:
        for var in (False, True):  # D = 2 without variance: the fused sweep
            half = ssm.soft_argmax(x, coordinates=coordinates, return_variance=var,
                                   return_prob=True, **kw)
            full = ssm.soft_argmax(x32, coordinates=coordinates, return_variance=var,
                                   return_prob=True, **kw)
            for a, b in zip(half, full):
                _same_bits(a, b)
        for from_prob in (False, True):
            xin = ssm.spatial_softmax(x, **kw) if from_prob else x
            dx, dT = ssm.soft_argmax_grad(xin, dk, coordinates=coordinates, from_prob=from_prob,
                                          return_temperature_grad=True, **kw)
            dx32, dT32 = ssm.soft_argmax_grad(xin.astype(np.float32), dk32,
                                              coordinates=coordinates, from_prob=from_prob,
                                              return_temperature_grad=True, **kw)
            _same_bits(dx, dx32)
            assert dT.dtype == dtype and dT.shape == (C,)
            _rounded_once(dT, dT32.astype(np.float64))
    p = ssm.spatial_softmax(x, **kw)
    dp = rng.standard_normal(x.shape).astype(dtype)
    g, gT = ssm.spatial_softmax_grad(p, dp, return_temperature_grad=True, **kw)
    g32, gT32 = ssm.spatial_softmax_grad(p.astype(np.float32), dp.astype(np.float32),
                                         return_temperature_grad=True, **kw)
    _same_bits(g, g32)
    _rounded_once(gT, gT32.astype(np.float64))
    grid = rng.standard_normal((*spatial, 3))
    half = ssm.spatial_expectation(p, grid, layout=layout, return_variance=True)
    full = ssm.spatial_expectation(p.astype(np.float32), grid.astype(np.float32),
                                   layout=layout, return_variance=True)
    for a, b in zip(half, full):
        _same_bits(a, b)
    _same_bits(ssm.spatial_expectation(p, layout=layout),
               ssm.spatial_expectation(p.astype(np.float32), layout=layout))


@pytest.mark.parametrize("dtype", HALF, ids=lambda d: np.dtype(d).name)
def test_half_maps_threads_streams_and_scalar_temperature(rng, monkeypatch, dtype):
    # bit-identical for any thread count; streamed outputs the same bits; one temperature's
    # gradient a 0-d half value; NaN maps give NaN
    x = make_logits(rng, (3, 20, 33, 47), dtype)
    x[1, 2, 5, 5] = np.nan
    dk = rng.standard_normal((3, 20, 2)).astype(dtype)
    runs = []
    for threads, stream in ((1, False), (2, False), (3, True), (8, True)):
        if stream:
            monkeypatch.setattr(_cpu, "STREAM_BYTES", 64)
        runs.append((ssm.spatial_softmax(x, temperature=0.5, threads=threads),
                     *ssm.soft_argmax(x, return_prob=True, threads=threads),
                     *ssm.soft_argmax_grad(x, dk, temperature=0.5, threads=threads,
                                           return_temperature_grad=True)))
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            np.testing.assert_array_equal(a.view(np.uint16), b.view(np.uint16))
    p, kp, _, dx, dT = runs[0]
    assert dT.shape == () and dT.dtype == dtype
    # a grid and per-channel temperatures of the half type are taken as their values
    grid = rng.standard_normal((33, 47, 2)).astype(dtype)
    np.testing.assert_array_equal(ssm.spatial_expectation(p, grid).view(np.uint16),
                                  ssm.spatial_expectation(p, grid.astype(np.float64))
                                  .view(np.uint16))
    T = (0.5 + rng.random(20)).astype(dtype)
    np.testing.assert_array_equal(ssm.soft_argmax(x, temperature=T).view(np.uint16),
                                  ssm.soft_argmax(x, temperature=T.astype(np.float64))
                                  .view(np.uint16))
    assert np.isnan(p[1, 2].astype(np.float32)).all() and np.isnan(kp[1, 2].astype(np.float32)).all()
    assert not np.isnan(p[1, 3].astype(np.float32)).any()


# ---- validation ------------------------------------------------------------------

def test_too_many_channels_is_a_value_error():
    # an empty batch of 2**40 channels: the single call's error, not an 8 TiB allocation
    for layout, shape in (("NCHW", (0, 2**40, 3)), ("NHWC", (0, 3, 2**40))):
        x = np.broadcast_to(np.zeros((), np.float32), shape)
        with pytest.raises(ValueError, match=r"^x: 1099511627776 channels; at most 2\*\*31 - 1"):
            ssm.spatial_softmax(x, layout=layout, temperature=2.0)


def test_errors():
    x = np.zeros((2, 3, 4, 5), np.float32)
    dk = np.zeros((2, 3, 2), np.float32)
    with pytest.raises(ValueError, match=r"x: shape \(2, 3\) has 2 dimension\(s\); expected at "
                                         r"least 3"):
        ssm.soft_argmax(np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"x: shape \(2, 3, 0\) has no positions"):
        ssm.spatial_softmax(np.zeros((2, 3, 0)))
    with pytest.raises(ValueError, match="layout: 'NWHC' is not one of 'NCHW', 'NHWC'"):
        ssm.spatial_softmax(x, layout="NWHC")
    with pytest.raises(ValueError, match="coordinates: 'pixel' is not one of 'normalized', "
                                         "'pixels'"):
        ssm.soft_argmax(x, coordinates="pixel")
    with pytest.raises(ValueError, match=r"temperature: 0.0 is not a positive finite number"):
        ssm.spatial_softmax(x, temperature=0.0)
    with pytest.raises(ValueError, match=r"temperature: nan is not a positive finite number"):
        ssm.soft_argmax(x, temperature=[1.0, np.nan, 1.0])
    with pytest.raises(ValueError, match=r"temperature: 1e-39 is too small for float32 maps, "
                                         r"whose kernels scale by 1/T in float32; expected "
                                         r"temperature >= 2.93873\d*e-39"):
        ssm.spatial_softmax(x, temperature=[1.0, 1e-39, 1.0])
    with pytest.raises(ValueError, match=r"temperature: 1e-309 is too small for float64 maps, "
                                         r"whose kernels scale by 1/T in float64; expected "
                                         r"temperature >= 2.2250738585072014e-308"):
        ssm.soft_argmax(x.astype(np.float64), temperature=1e-309)
    with pytest.raises(ValueError, match=r"1e-39 is too small for float16 maps, whose kernels "
                                         r"scale by 1/T in float32"):
        ssm.spatial_softmax(x.astype(np.float16), temperature=1e-39)
    for dtype, lowest in ((np.float32, 1.0 / float(np.finfo(np.float32).max)),
                          (np.float64, float(np.finfo(np.float64).tiny))):  # the limit: one-hot
        z = np.zeros((1, 1, 2, 2), dtype)
        z[0, 0, 1, 0] = 1e-3
        np.testing.assert_array_equal(ssm.spatial_softmax(z, temperature=lowest).ravel(),
                                      [0, 0, 1, 0])
    with pytest.raises(ValueError, match=r"temperature: shape \(2,\) does not match the 3 "
                                         r"channels; expected a number or shape \(3,\)"):
        ssm.soft_argmax(x, temperature=[1.0, 2.0])
    with pytest.raises(TypeError, match="temperature: expected a NumPy array, a number"):
        ssm.soft_argmax(x, temperature="hot")
    with pytest.raises(TypeError, match="return_variance: expected True or False"):
        ssm.soft_argmax(x, return_variance=1)
    with pytest.raises(TypeError, match="x: dtype int64 is not supported on the CPU"):
        ssm.soft_argmax(np.zeros((2, 3, 4), np.int64))
    with pytest.raises(ValueError, match=r"d_keypoints: shape \(2, 3, 3\) does not match; "
                                         r"expected \(2, 3, 2\)"):
        ssm.soft_argmax_grad(x, np.zeros((2, 3, 3), np.float32))
    with pytest.raises(TypeError, match="d_keypoints: dtype float64 differs from x's float32"):
        ssm.soft_argmax_grad(x, dk.astype(np.float64))
    with pytest.raises(ValueError, match=r"out: shape \(2, 3, 3\) does not match; "
                                         r"expected \(2, 3, 2\)"):
        ssm.soft_argmax(x, out=np.zeros((2, 3, 3), np.float32))
    with pytest.raises(ValueError, match="out: the buffer overlaps x"):
        ssm.spatial_softmax(x, out=x)
    with pytest.raises(ValueError, match=r"grid: shape \(4, 5\) does not match the spatial "
                                         r"shape \(4, 5\); expected \(4, 5, 'D'\)"):
        ssm.spatial_expectation(x, np.zeros((4, 5)))
    with pytest.raises(TypeError, match="grid: dtype complex128 is not a real number type"):
        ssm.spatial_expectation(x, np.zeros((4, 5, 2), complex))
    with pytest.raises(ValueError, match=r"dprob: shape \(2, 3, 4, 4\) differs from prob's"):
        ssm.spatial_softmax_grad(x, np.zeros((2, 3, 4, 4), np.float32))


# ---- kornia ----------------------------------------------------------------------

def _kornia():
    torch = require_module("torch", "torch")
    subpix = require_module("kornia", "kornia.geometry.subpix")
    return torch, subpix


@pytest.mark.parametrize("normalized", [True, False])
@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_kornia_parity(rng, dtype, normalized):
    torch, subpix = _kornia()
    x = make_logits(rng, (2, 4, 7, 9), dtype)
    t = torch.from_numpy(x)
    coordinates = "normalized" if normalized else "pixels"
    kp = ssm.soft_argmax(x, temperature=0.6, coordinates=coordinates)
    kk = subpix.spatial_soft_argmax2d(t, 0.6, normalized_coordinates=normalized).numpy()
    assert_close(kp, kk, dtype, scale=9, factor=_factor(dtype))
    p = ssm.spatial_softmax(x, temperature=0.6)
    assert_close(p, subpix.spatial_softmax2d(t, 0.6).numpy(), dtype, factor=_factor(dtype))
    E = ssm.spatial_expectation(p, coordinates=coordinates)
    Ek = subpix.spatial_expectation2d(torch.from_numpy(p), normalized).numpy()
    assert_close(E, Ek, dtype, scale=9, factor=_factor(dtype))
    # the gradient, and the temperature's, through kornia's autograd (per channel)
    xt = torch.from_numpy(x.astype(np.float64)).requires_grad_()
    T = torch.tensor(0.3 + rng.random(4), requires_grad=True)
    out = subpix.spatial_soft_argmax2d(xt, T.view(1, 4, 1), normalized_coordinates=normalized)
    dk = rng.standard_normal(out.shape)
    out.backward(torch.from_numpy(dk))
    dx, dT = ssm.soft_argmax_grad(x, dk.astype(dtype), temperature=T.detach().numpy(),
                                  coordinates=coordinates, return_temperature_grad=True)
    assert_close(dx, xt.grad.numpy(), dtype, scale=9, factor=_factor(dtype))
    assert_close(dT, T.grad.numpy(), dtype, scale=9 * 50, factor=_factor(dtype))


# ---- the GPU path: the simulator (and a real GPU where there is one) -------------------

@pytest.fixture(params=[pytest.param("cuda", marks=pytest.mark.gpu),
                        pytest.param("cudasim", marks=pytest.mark.cudasim)])
def xp(request):
    if request.param == "cuda":
        import cupy
        return cupy
    from ssm.testing import cudasim
    return cudasim


def _host(xp, a):
    return a if isinstance(a, np.ndarray) else xp.asnumpy(a)


def _gpu_tol(dtype):
    """(dtype, factor) for assert_close of a GPU result: the half types get 4 of their eps,
    the rule these kernels were checked with (they round between passes), written as
    float32 eps (conftest's half rule, float32 math and one rounding, is the CPU's)."""
    if dtype in HALF:  # float16 eps 2**-10, bfloat16 2**-7: 2**13, 2**16 float32 eps
        return np.float32, 4 * 2**(13 if dtype == np.float16 else 16)
    return dtype, _factor(dtype)


def _masked_temperature_grads(xp, layout, dtype, T):
    """soft_argmax_grad's temperature gradient with masked (-inf) positions, and with the
    mask a finite value too small to matter (-1e30: p, and so dy, exactly 0)."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal(_shape(2, 3, (6, 9), layout)).astype(dtype)
    mask = np.zeros(x.shape, bool)
    if layout == "NCHW":
        mask[:, :, 0, :] = True
        mask[1, 2, :, 3:] = True
    else:
        mask[:, 0, :, :] = True
        mask[1, :, 3:, 2] = True
    dk = rng.standard_normal((2, 3, 2)).astype(dtype)
    out = []
    for fill in (-np.inf, -1e30):
        xm = np.where(mask, fill, x).astype(dtype)
        out.append([_host(xp, a) for a in ssm.soft_argmax_grad(
            xp.asarray(xm), xp.asarray(dk), temperature=T, layout=layout,
            return_temperature_grad=True)])
    return out


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_masked_positions_temperature_grad(monkeypatch, layout, dtype):
    # A position at -inf (a masked map) has p = 0 and dy = 0: its term of the temperature
    # gradient is 0, not 0 * -inf = NaN; the same as a mask too small to matter
    T = np.array([0.7, 1.0, 2.5])
    for gather in (1 << 62, 0):  # NHWC: gathered rows and rows chunk by chunk
        monkeypatch.setattr(_cpu, "POS_GATHER_BYTES", gather)
        (dx, dT), (dx_f, dT_f) = _masked_temperature_grads(np, layout, dtype, T)
        assert np.isfinite(dT).all() and np.isfinite(dx).all()
        np.testing.assert_array_equal(dx, dx_f)
        np.testing.assert_allclose(dT, dT_f, rtol=1e-12 if dtype == np.float64 else 1e-5)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_gpu_masked_positions_temperature_grad(xp, layout):
    (dx, dT), (dx_f, dT_f) = _masked_temperature_grads(xp, layout, np.float32, 0.7)
    assert np.isfinite(dT).all() and np.isfinite(dx).all()
    np.testing.assert_array_equal(dx, dx_f)
    np.testing.assert_allclose(dT, dT_f, rtol=1e-5)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("case", [(2, 3, (5, 7)), (1, 2, (9,)), (2, 2, (2, 3, 4)),
                                  (2, 37, (3, 5)), (1, 2, (2, 2, 3, 2))], ids=_sid)
def test_gpu_against_the_references(xp, rng, case, dtype, layout):
    N, C, spatial = case
    x = make_logits(rng, _shape(N, C, spatial, layout), dtype)
    T = 0.25 + 2 * rng.random(C)
    dk = rng.standard_normal((N, C, len(spatial))).astype(dtype)
    tdt, f = _gpu_tol(dtype)
    xd = xp.asarray(x)
    p = ssm.spatial_softmax(xd, temperature=T, layout=layout)
    assert type(p) is type(xd)
    p_ref = ref.spatial_softmax(x, T, layout)
    assert_close(_host(xp, p), p_ref, tdt, factor=f)
    kp, var, p2 = ssm.soft_argmax(xd, temperature=T, layout=layout, return_variance=True,
                                  return_prob=True)
    kp_ref, var_ref = ref.soft_argmax(x, T, "normalized", layout)
    assert_close(_host(xp, kp), kp_ref, tdt, factor=f)
    assert_close(_host(xp, var), var_ref, tdt, factor=f)
    assert_close(_host(xp, p2), p_ref, tdt, factor=f)
    # the fused sweep (no variance) gives the same bits as a sweep per coordinate
    np.testing.assert_array_equal(_host(xp, ssm.soft_argmax(xd, temperature=T, layout=layout)),
                                  _host(xp, kp))
    kpx = ssm.soft_argmax(xd, coordinates="pixels", layout=layout)
    assert_close(_host(xp, kpx), ref.soft_argmax(x, 1.0, "pixels", layout)[0], tdt,
                 scale=max(spatial), factor=f)
    dx, dT = ssm.soft_argmax_grad(xd, xp.asarray(dk), temperature=T, layout=layout,
                                  return_temperature_grad=True)
    dx_ref, dT_ref = ref.soft_argmax_grad(x, dk, T, "normalized", layout)
    assert_close(_host(xp, dx), dx_ref, tdt, scale=np.abs(dk).max(), factor=f)
    assert_close(_host(xp, dT), dT_ref, tdt, scale=8 * N, factor=8 * f)
    pd = xp.asarray(p_ref.astype(dtype))
    dxp = ssm.soft_argmax_grad(pd, xp.asarray(dk), temperature=T, layout=layout,
                               from_prob=True)
    assert_close(_host(xp, dxp), dx_ref, tdt, scale=np.abs(dk).max(), factor=f)
    dp = rng.standard_normal(x.shape).astype(dtype)
    g, gT = ssm.spatial_softmax_grad(pd, xp.asarray(dp), temperature=T, layout=layout,
                                     return_temperature_grad=True)
    g_ref, gT_ref = ref.spatial_softmax_grad(p_ref.astype(dtype), dp, T, layout)
    assert_close(_host(xp, g), g_ref, tdt, scale=np.abs(dp).max(), factor=f)
    assert_close(_host(xp, gT), gT_ref, tdt, scale=8 * N, factor=8 * f)
    grid = rng.standard_normal((*spatial, 2))
    E = ssm.spatial_expectation(pd, grid, layout=layout)
    E_ref, _ = ref.expectation(p_ref.astype(dtype), grid.reshape(-1, 2).T, layout)
    assert E.shape == (N, C, 2)
    assert_close(_host(xp, E), E_ref, tdt, scale=4, factor=f)


@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=lambda d: np.dtype(d).name)
def test_gpu_agrees_with_the_cpu(xp, rng, dtype):
    x = make_logits(rng, (2, 3, 6, 10), dtype)
    dk = rng.standard_normal((2, 3, 2)).astype(dtype)
    tdt, f = _gpu_tol(dtype)
    cpu = ssm.soft_argmax_grad(x, dk, temperature=0.7)
    gpu = _host(xp, ssm.soft_argmax_grad(xp.asarray(x), xp.asarray(dk), temperature=0.7))
    assert gpu.dtype == cpu.dtype == dtype
    assert_close(gpu, cpu.astype(np.float64), tdt, scale=np.abs(dk).max(), factor=f)
    kp = ssm.soft_argmax(x, temperature=0.7, return_variance=True)
    kpd = ssm.soft_argmax(xp.asarray(x), temperature=0.7, return_variance=True)
    for a, b in zip(kpd, kp):
        assert_close(_host(xp, a), b.astype(np.float64), tdt, factor=f)
    with pytest.raises(TypeError, match="d_keypoints: a numpy.ndarray on the host cannot be mixed"):
        ssm.soft_argmax_grad(xp.asarray(x), dk)


# ---- the benchmark ---------------------------------------------------------------

def test_bench_positions_runs(capsys, tmp_path):
    import json

    from ssm.bench import cli
    path = tmp_path / "positions.json"
    assert cli.main(["--positions", "--shape", "2", "3", "8", "8", "--threads", "1",
                     "--budget", "0.01", "--min-reps", "1", "--json", str(path)]) == 0
    text = capsys.readouterr().out
    assert "forward  1T  ssm" in text and "fwd+bwd  1T  ssm" in text
    rows = json.loads(path.read_text())["positions"]
    assert {r["op"] for r in rows} == {"forward", "fwd+bwd"}
    assert all(r["x_floor"] > 0 for r in rows)


@pytest.mark.cudasim
@pytest.mark.parametrize("layout", LAYOUTS)
def test_simulator_initcheck(rng, layout):
    """Every output's bits are the same with fresh device memory poisoned 0xFF and 0x00:
    no kernel reads memory nobody wrote."""
    from ssm.testing import cudasim
    x = make_logits(rng, _shape(2, 3, (4, 6), layout), np.float32)
    dk = rng.standard_normal((2, 3, 2)).astype(np.float32)
    dp = rng.standard_normal(x.shape).astype(np.float32)
    grid = rng.standard_normal((4, 6, 3))

    def run():
        xd = cudasim.asarray(x)
        p = ssm.spatial_softmax(xd, temperature=[0.5, 1.0, 2.0], layout=layout)
        outs = [p, *ssm.spatial_softmax_grad(p, cudasim.asarray(dp), layout=layout,
                                             return_temperature_grad=True),
                *ssm.soft_argmax(xd, return_variance=True, return_prob=True, layout=layout),
                ssm.soft_argmax(xd, layout=layout),
                *ssm.soft_argmax_grad(xd, cudasim.asarray(dk), temperature=0.7, layout=layout,
                                      return_temperature_grad=True),
                ssm.soft_argmax_grad(p, cudasim.asarray(dk), from_prob=True, layout=layout),
                ssm.spatial_expectation(p, grid, layout=layout)]
        return [cudasim.asnumpy(o).tobytes() for o in outs]

    results = []
    for byte in (0xFF, 0x00):
        with cudasim.poison(byte):
            results.append(run())
    assert results[0] == results[1]
