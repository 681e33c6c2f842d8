"""Half-width logits on the CPU (ssm/_half.h): float16 and bfloat16 (ml_dtypes), stored as
such and computed in float32.

- The conversions, exact: every float16 and bfloat16 bit pattern widened, and floats
  narrowed (random bit patterns, every midpoint between neighbouring halves and its two
  float neighbours, the overflow and subnormal edges) against NumPy's and ml_dtypes'
  casts; by the software versions and by each path the kernels take here (F16C where the
  CPU has it, and the compiler-vectorised loops).
- Each function on half inputs is the float32 path on the widened inputs, its outputs
  rounded once: bit for bit (the reduced loss: within its one rounding). The float32 path
  itself is checked against the float64 reference in test_cpu.py, which runs the half
  types too.
"""
import ml_dtypes
import numpy as np
import pytest

import _reference as ref
import ssm
from ssm import _cpu
from ssm import _validation as V

from conftest import (LAYOUTS, logits_shape, make_class_weights, make_labels, make_logits,
                      make_soft_targets, make_weights)

BF16 = np.dtype(ml_dtypes.bfloat16)
HALF = (np.dtype(np.float16), BF16)
ALL_BITS = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)


# conversion paths: (software, half_isa level) -- the scalar versions, or the drivers'
# with F16C where the CPU has it (1) or their compiler-vectorised loops (0)
PATHS = [(True, 1), (False, 1), (False, 0)]
PATH_IDS = ["software", "native", "loops"]


@pytest.fixture
def isa_level():
    """Set the drivers' float16 conversions (_cpu.half_isa) for one test."""
    old = _cpu.half_isa()
    yield _cpu.half_isa
    _cpu.half_isa(old)


def _same_floats(a, b):
    """Bitwise equal, NaN with NaN of the same sign (payloads may differ: F16C quiets)."""
    a, b = np.asarray(a), np.asarray(b)
    na, nb = np.isnan(a.astype(np.float32)), np.isnan(b.astype(np.float32))
    np.testing.assert_array_equal(na, nb)
    bits = a.view(np.uint32 if a.itemsize == 4 else np.uint16)
    rbits = b.view(bits.dtype)
    np.testing.assert_array_equal(bits[~na], rbits[~na])
    sign = 1 << (8 * a.itemsize - 1)
    np.testing.assert_array_equal(bits[na] & sign, rbits[na] & sign)


@pytest.mark.parametrize("software, level", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_every_half_widens_exactly(dtype, software, level, isa_level):
    isa_level(level)
    got = _cpu.half_convert(ALL_BITS, dtype == BF16, software)
    _same_floats(got, ALL_BITS.view(dtype).astype(np.float32))


def _narrowing_cases(dtype, rng):
    """Floats around every rounding decision of `dtype`: each midpoint between neighbouring
    finite halves (exact in float32) and the floats either side of it, the halves
    themselves, the overflow edge, tiny and subnormal floats, inf, NaN, random bits."""
    with np.errstate(invalid="ignore"):
        h = ALL_BITS.view(dtype).astype(np.float64)
    h = np.unique(h[np.isfinite(h)])
    mid = ((h[:-1] + h[1:]) / 2).astype(np.float32)
    assert np.all(mid.astype(np.float64) == (h[:-1] + h[1:]) / 2)  # midpoints are exact
    top = float(h[-1])
    spacing = float(h[-1] - h[-2])
    edge = np.array([top, top + spacing / 2, top + spacing / 2 * (1 - 2 ** -20), 2.0 ** 16,
                     np.inf, -np.inf, np.nan, -np.nan, 0.0, -0.0, 1e-45, 2.0 ** -24,
                     2.0 ** -25, 2.0 ** -25 * 1.0000001, 2.0 ** -14, 2.0 ** -14 * (1 - 2 ** -12)],
                    np.float32)
    rand = rng.integers(0, 1 << 32, 1 << 18, dtype=np.uint64).astype(np.uint32).view(np.float32)
    cases = [mid, np.nextafter(mid, np.float32(np.inf)), np.nextafter(mid, np.float32(-np.inf)),
             h.astype(np.float32), edge, rand]
    cases = np.concatenate(cases)
    return np.concatenate([cases, -cases])


@pytest.mark.parametrize("software, level", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_floats_narrow_to_nearest_even(rng, dtype, software, level, isa_level):
    isa_level(level)
    f = _narrowing_cases(dtype, rng)
    got = _cpu.half_convert(f, dtype == BF16, software).view(dtype)
    with np.errstate(over="ignore", invalid="ignore"):
        _same_floats(got, f.astype(dtype))


def test_half_convert_checks_its_input():
    with pytest.raises(TypeError, match="^src: expected a C-contiguous uint16 or float32"):
        _cpu.half_convert(np.zeros(3), False)


# ---------------------------------------------------------------- the float32 path, rounded

SHAPES = [(3, 5, ()), (2, 21, (9, 7)), (1, 150, (3, 11)), (2, 3, (1100,))]


def _target(rng, kind, N, C, spatial, dtype, layout):
    if kind == "soft":
        return make_soft_targets(rng, logits_shape(N, C, spatial, layout), dtype, layout)
    ignore = 255 if kind == "uint8" else -1
    return make_labels(rng, (N, *spatial), C, dtype=kind, ignore_index=ignore)


def _widened(a):
    return a.astype(np.float32) if isinstance(a, np.ndarray) and a.dtype in HALF else a


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_half_is_the_float32_path_rounded(rng, shape, dtype, layout):
    N, C, spatial = shape
    x = make_logits(rng, logits_shape(N, C, spatial, layout), dtype)
    x32 = x.astype(np.float32)

    def same(half, full):
        assert half.dtype == dtype and half.shape == full.shape
        np.testing.assert_array_equal(half.view(np.uint16), full.astype(dtype).view(np.uint16))

    for f in (ssm.softmax, ssm.log_softmax):
        same(f(x, layout=layout), f(x32, layout=layout))
    p, dp = ssm.softmax(x, layout=layout), make_logits(rng, x.shape, dtype)
    same(ssm.softmax_grad(p, dp, layout=layout),
         ssm.softmax_grad(p.astype(np.float32), dp.astype(np.float32), layout=layout))

    for kind in ("uint8", "int32", "int64", "soft"):
        t = _target(rng, kind, N, C, spatial, dtype, layout)
        w = make_weights(rng, (N, *spatial), dtype)
        opts = dict(layout=layout, class_weights=make_class_weights(rng, C).astype(dtype),
                    label_smoothing=0.1)
        if kind == "int32":
            eye = np.eye(C)  # entries exact in both half types: rows still sum to 1
            opts["lens"] = (0.75 * eye + 0.25 * np.roll(eye, 1, axis=1)).astype(dtype)
            opts["loss"] = "kl"
        if kind == "uint8":
            opts["ignore_index"] = 255
        t32, w32 = _widened(t), _widened(w)
        o32 = {k: _widened(v) for k, v in opts.items()}
        for reduction in ("mean", "none"):
            d_loss = make_weights(rng, (N, *spatial), dtype) if reduction == "none" else 0.5
            d32 = _widened(d_loss)
            hp, hl = ssm.spatial_softmax_with_loss(x, t, w, reduction=reduction, **opts)
            fp, fl = ssm.spatial_softmax_with_loss(x32, t32, w32, reduction=reduction, **o32)
            same(hp, fp)
            hl2, hg, hq = ssm.spatial_softmax_with_loss_and_grad(
                x, t, w, d_loss, reduction=reduction, return_prob=True, **opts)
            fl2, fg, fq = ssm.spatial_softmax_with_loss_and_grad(
                x32, t32, w32, d32, reduction=reduction, return_prob=True, **o32)
            same(hg, fg)
            same(hq, fq)
            same(ssm.spatial_softmax_with_loss_grad(hp, t, w, d_loss, reduction=reduction,
                                                    **opts),
                 ssm.spatial_softmax_with_loss_grad(hp.astype(np.float32), t32, w32, d32,
                                                    reduction=reduction, **o32))
            alone = ssm.cross_entropy(x, t, w, reduction=reduction, **opts)
            assert alone.tobytes() == hl.tobytes() == hl2.tobytes()
            if reduction == "none":  # a map: each pixel's float32 loss, rounded
                same(hl, fl)
            else:  # the float64 sum rounded once to the half type, float32's rounded twice
                assert hl.dtype == dtype and hl.shape == ()
                np.testing.assert_allclose(hl.astype(np.float64), float(fl),
                                           rtol=float(ml_dtypes.finfo(dtype).eps))


# the direct tiles (NCHW, integer labels, no lens or smoothing: ssm_sswl_tile_direct in
# ssm/_half_impl.h), which the test above never reaches (it smooths every label):
# widths that leave vector remainders, C over one summation block, rows from unaligned
# starts, streamed and plain outputs, the AVX-512 and AVX2 rows and the compiler's loops
DIRECT_SHAPES = [(2, 21, (9, 37)), (1, 150, (5, 13)), (2, 3, (1100,)), (1, 40, (33, 33)),
                 (1, 2, (1,))]


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("shape", DIRECT_SHAPES, ids=str)
def test_direct_half_tiles_are_the_float32_path_rounded(rng, monkeypatch, isa_level, shape,
                                                       dtype):
    N, C, spatial = shape
    x = make_logits(rng, (N, C, *spatial), dtype)
    x.flat[::89] = -60.0   # exp underflows to float32 subnormals: gradients round there too
    x.flat[3::101] = np.nan
    x32 = x.astype(np.float32)

    def same(half, full):
        assert half.dtype == dtype and half.shape == full.shape
        _same_floats(half, full.astype(dtype))

    cases = []
    for kind in ("uint8", "int32", "int64"):
        t = _target(rng, kind, N, C, spatial, dtype, "NCHW")
        ign = 255 if kind == "uint8" else -1
        w = make_weights(rng, (N, *spatial), dtype)
        cw = make_class_weights(rng, C).astype(dtype)
        cases += [(t, None, dict(ignore_index=ign)),
                  (t, w, dict(ignore_index=ign, class_weights=cw)),
                  (t, w, dict(ignore_index=ign, loss="kl"))]
    monkeypatch.setattr(_cpu, "STREAM_UNALIGNED_ROWS", True)  # rows off 16 bytes, streamed
    for stream_bytes, level in ((1 << 62, 2), (0, 2), (0, 1), (0, 0)):
        monkeypatch.setattr(_cpu, "STREAM_BYTES", stream_bytes)
        isa_level(level)
        for t, w, opts in cases:
            w32 = _widened(w)
            for reduction in ("mean", "sum", "none"):
                d_loss = make_weights(rng, (N, *spatial), dtype) if reduction == "none" else 0.5
                d32 = _widened(d_loss)
                hl, hg, hq = ssm.spatial_softmax_with_loss_and_grad(
                    x, t, w, d_loss, reduction=reduction, return_prob=True, **opts)
                fl, fg, fq = ssm.spatial_softmax_with_loss_and_grad(
                    x32, t, w32, d32, reduction=reduction, return_prob=True, **opts)
                same(hg, fg)
                same(hq, fq)
                hg2 = ssm.spatial_softmax_with_loss_and_grad(x, t, w, d_loss,
                                                             reduction=reduction, **opts)[1]
                assert hg2.tobytes() == hg.tobytes()
                hp, hl2 = ssm.spatial_softmax_with_loss(x, t, w, reduction=reduction, **opts)
                same(hp, fq)
                alone = ssm.cross_entropy(x, t, w, reduction=reduction, **opts)
                assert alone.tobytes() == hl.tobytes() == hl2.tobytes()
                if reduction == "none":
                    same(hl, fl)
                else:  # as above (NaN where a NaN logit counts)
                    assert hl.dtype == dtype and hl.shape == ()
                    np.testing.assert_allclose(hl.astype(np.float64), float(fl),
                                               rtol=float(ml_dtypes.finfo(dtype).eps))


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_half_results_do_not_depend_on_threads(rng, dtype):
    x = make_logits(rng, (2, 21, 37, 41), dtype)
    y = make_labels(rng, (2, 37, 41), 21)
    runs = [ssm.spatial_softmax_with_loss_and_grad(x, y, threads=n) for n in (1, 2, 3)]
    for loss, grad in runs[1:]:
        assert loss.tobytes() == runs[0][0].tobytes()
        assert grad.tobytes() == runs[0][1].tobytes()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_streamed_half_outputs(rng, monkeypatch, isa_level, dtype, layout):
    # outputs of at least STREAM_BYTES go out with non-temporal stores (rows streamed
    # from unaligned starts): the same bits, by every conversion path
    # (test_half_is_the_float32_path_rounded checks the default one)
    x = make_logits(rng, logits_shape(2, 7, (33, 35), layout), dtype)
    y = make_labels(rng, (2, 33, 35), 7)
    x[(0,) * x.ndim] = np.nan
    runs = []
    monkeypatch.setattr(_cpu, "STREAM_UNALIGNED_ROWS", True)  # 33x35: rows off 16 bytes
    for level in (2, 1, 0):
        isa_level(level)
        for stream_bytes in (1 << 62, 1024):
            monkeypatch.setattr(_cpu, "STREAM_BYTES", stream_bytes)
            runs.append(ssm.spatial_softmax_with_loss_and_grad(
                x, y, reduction="none", return_prob=True, layout=layout)
                + (ssm.softmax(x, layout=layout),))
    for run in runs[1:]:
        for a, b in zip(runs[0], run):
            assert a.tobytes() == b.tobytes()


def test_reduced_loss_is_rounded_once(rng):
    # the float64 loss to bfloat16 in one rounding, whatever ml_dtypes' cast does (before
    # 0.7 it went through float: 1 + 2**-8 + 2**-40 became the midpoint, then 1.0)
    bf16 = np.dtype(ml_dtypes.bfloat16)
    d = rng.standard_normal(4096) * np.exp(rng.uniform(-80, 80, 4096))
    d[:8] = [1 + 2.0**-8 + 2.0**-40, 1 + 2.0**-8, -(1 + 2.0**-8 + 2.0**-40), 3.3961e38,
             -3.3963e38, 1e300, 0.0, -0.0]
    got = np.array([_cpu.loss_value(float(v), 1.0, bf16).view(np.uint16) for v in d])
    np.testing.assert_array_equal(got, ref.bf16_bits_rounded_once(d))
    assert np.isnan(_cpu.loss_value(np.nan, 1.0, bf16).astype(np.float32))
    assert _cpu.loss_value(3.0, 0.0, bf16).view(np.uint16) == 0  # 0 when the divisor is 0
    half = np.array([_cpu.loss_value(float(v), 1.0, np.float16) for v in d[8:]])
    np.testing.assert_array_equal(half, d[8:].astype(np.float16))  # NumPy's: rounded once


def test_half_dtypes_are_in_the_cpu_table():
    assert set(HALF) <= set(V.FLOAT_DTYPES["cpu"])
    assert {d.name for d in V.FLOAT_DTYPES["cpu"]} == set(_cpu.KERNELS)


def test_mixed_half_dtypes_are_refused(rng):
    x = make_logits(rng, (2, 5, 3), BF16)
    with pytest.raises(TypeError, match=r"^weights: dtype float16 differs from the logits' "
                                        r"bfloat16"):
        ssm.spatial_softmax_with_loss(x, make_labels(rng, (2, 3), 5),
                                      np.ones((2, 3), np.float16))
    with pytest.raises(TypeError, match=r"^target: soft targets of dtype float32 differ"):
        ssm.spatial_softmax_with_loss(x, make_soft_targets(rng, (2, 5, 3), np.float32))
