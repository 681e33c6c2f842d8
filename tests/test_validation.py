"""Every misuse raises the right exception with a message "<argname>: <what, with the value>"."""

import importlib.util
import re

import numpy as np
import pytest

import ssm
from conftest import FLOAT_DTYPES, LAYOUTS, make_labels, make_logits, make_soft_targets

N, C, H, W = 2, 5, 3, 4
LOSS_FUNCS = ["spatial_softmax_with_loss", "spatial_softmax_with_loss_grad",
              "spatial_softmax_with_loss_and_grad"]


@pytest.fixture
def data(rng):
    x = make_logits(rng, (N, C, H, W), np.float32)
    y = make_labels(rng, (N, H, W), C, np.int32)
    return x, y


def _call(name, x, y, *args, **kwargs):
    """Call a loss function (the _grad one takes x as its probabilities: only checks run)."""
    return getattr(ssm, name)(x, y, *args, **kwargs)


def _first_arg(name):
    return "prob" if name == "spatial_softmax_with_loss_grad" else "logits"


# ---------------------------------------------------------------- logits / x / prob


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.int16, np.complex128, np.bool_,
                                   np.uint8])
@pytest.mark.parametrize("name", LOSS_FUNCS)
def test_first_argument_dtype(data, name, dtype):
    x, y = data
    arg = _first_arg(name)
    with pytest.raises(TypeError, match=rf"^{arg}: .*{np.dtype(dtype).name}"):
        getattr(ssm, name)(x.astype(dtype), y)


@pytest.mark.parametrize("dtype", [np.int32, np.uint16, np.complex64])
def test_softmax_family_dtype(dtype):
    x = np.zeros((2, 3), dtype)
    with pytest.raises(TypeError, match=rf"^x: .*{np.dtype(dtype).name}"):
        ssm.softmax(x)
    with pytest.raises(TypeError, match=rf"^x: .*{np.dtype(dtype).name}"):
        ssm.log_softmax(x)
    with pytest.raises(TypeError, match=rf"^prob: .*{np.dtype(dtype).name}"):
        ssm.softmax_grad(x, np.zeros((2, 3)))
    with pytest.raises(TypeError, match=rf"^dprob: .*{np.dtype(dtype).name}"):
        ssm.softmax_grad(np.zeros((2, 3)), x)


def test_softmax_grad_dtype_mismatch():
    with pytest.raises(TypeError, match=r"^dprob: .*float64"):
        ssm.softmax_grad(np.zeros((2, 3), np.float32), np.zeros((2, 3), np.float64))


@pytest.mark.parametrize("shape", [(5,), ()])
def test_ndim_below_two(shape):
    x = np.zeros(shape)
    for fn in (ssm.softmax, ssm.log_softmax):
        with pytest.raises(ValueError, match=r"^x: "):
            fn(x)
    for name in LOSS_FUNCS:
        with pytest.raises(ValueError, match=rf"^{_first_arg(name)}: "):
            getattr(ssm, name)(x, np.zeros(shape[:1], np.int64))


def test_softmax_grad_shape_mismatch():
    with pytest.raises(ValueError, match=r"^dprob: .*\(2, 4\)"):
        ssm.softmax_grad(np.zeros((2, 3)), np.zeros((2, 4)))
    with pytest.raises(ValueError, match=r"^dprob: .*\(3, 2\)"):
        ssm.softmax_grad(np.zeros((2, 3)), np.zeros((3, 2)))


@pytest.mark.parametrize("name", LOSS_FUNCS + ["softmax", "log_softmax"])
def test_non_array_objects(name):
    arg = "x" if name in ("softmax", "log_softmax") else _first_arg(name)
    y = np.zeros((2, 3), np.int64)
    for bad in (object(), "logits", None):
        with pytest.raises(TypeError, match=rf"^{arg}: "):
            if name in ("softmax", "log_softmax"):
                getattr(ssm, name)(bad)
            else:
                getattr(ssm, name)(bad, y)


# ---------------------------------------------------------------- target


@pytest.mark.parametrize("name", LOSS_FUNCS)
def test_target_wrong_shape(data, name):
    x, y = data
    for bad_shape in [(N, H, W + 1), (N + 1, H, W), (N, H), (N, 1, H, W), (N, H, W, 1)]:
        with pytest.raises(ValueError, match=r"^target: .*" + re.escape(str(bad_shape))):
            _call(name, x, np.zeros(bad_shape, np.int32))


@pytest.mark.parametrize("name", LOSS_FUNCS)
def test_target_nhwc_shape(data, name):
    x, y = data
    xh = np.ascontiguousarray(np.moveaxis(x, 1, -1))
    with pytest.raises(ValueError, match=r"^target: "):
        _call(name, xh, np.zeros((N, C, H), np.int32), layout="NHWC")
    # labels for NHWC are (N, H, W): accepted
    _call(name, xh, y, layout="NHWC")


@pytest.mark.parametrize("name", LOSS_FUNCS)
def test_soft_target_dtype_differs(data, name):
    x, _ = data
    t = make_soft_targets(np.random.default_rng(0), x.shape, np.float64)
    with pytest.raises(TypeError, match=r"^target: .*float64"):
        _call(name, x, t)


@pytest.mark.parametrize("name", LOSS_FUNCS)
def test_float_target_with_label_shape(data, name):
    x, y = data
    with pytest.raises((TypeError, ValueError), match=r"^target: "):
        _call(name, x, y.astype(np.float32))


@pytest.mark.parametrize("dtype", [np.int16, np.int8, np.uint16, np.uint32, np.uint64, np.bool_,
                                   np.complex64])
@pytest.mark.parametrize("name", LOSS_FUNCS)
def test_target_dtype(data, name, dtype):
    x, y = data
    with pytest.raises(TypeError, match=rf"^target: .*{np.dtype(dtype).name}"):
        _call(name, x, y.astype(dtype))


# ---------------------------------------------------------------- out-of-range labels


def _mentions(msg, number):
    return re.search(rf"(?<![\d.]){number}(?![\d.])", msg) is not None


def _mentions_index(msg, flat, shape):
    if _mentions(msg, flat):
        return True
    multi = ",\\s*".join(str(int(i)) for i in np.unravel_index(flat, shape))
    return re.search(rf"\(\s*{multi}\s*\)|\[\s*{multi}\s*\]", msg) is not None


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("label_dtype,bad,ignore", [
    (np.int32, 5, -1), (np.int32, -2, -1), (np.int64, 7, -1), (np.int64, 2**40, -100),
    (np.uint8, 200, 255), (np.uint8, 255, -1), (np.int64, -1, 0)])
@pytest.mark.parametrize("name", LOSS_FUNCS)
def test_out_of_range_label(data, name, label_dtype, bad, ignore, layout):
    x, y = data
    if layout == "NHWC":
        x = np.ascontiguousarray(np.moveaxis(x, 1, -1))
    y = np.random.default_rng(3).integers(1, C, size=y.shape).astype(label_dtype)
    flat_first, flat_second = 13, 19
    second_bad = 9 if bad != 9 else 8
    if label_dtype == np.uint8:
        second_bad = 201
    y.flat[flat_first] = bad
    y.flat[flat_second] = second_bad
    sentinel = np.full(x.shape, 123.25, x.dtype)
    out = sentinel.copy()
    with pytest.raises(ValueError, match=r"^target: ") as info:
        _call(name, x, y, ignore_index=ignore, layout=layout, out=out)
    msg = str(info.value)
    assert _mentions(msg, bad), msg
    assert _mentions_index(msg, flat_first, y.shape), msg
    # the lowest flat index wins
    assert not _mentions(msg, second_bad) and not _mentions_index(msg, flat_second, y.shape), msg
    np.testing.assert_array_equal(out, sentinel)


def test_out_of_range_label_reduction_none_and_weights(data):
    x, y = data
    y = y.copy()
    y[y == -1] = 0
    y[1, 2, 3] = C
    out = np.full(x.shape, 7.0, x.dtype)
    w = np.ones(y.shape, x.dtype)
    for name in LOSS_FUNCS:
        args = (w,) if name == "spatial_softmax_with_loss" else (w, np.ones(y.shape, x.dtype))
        with pytest.raises(ValueError, match=r"^target: ") as info:
            _call(name, x, y, *args, reduction="none", out=out)
        assert _mentions(str(info.value), C)
        assert _mentions_index(str(info.value), 23, y.shape), str(info.value)
        assert np.all(out == 7.0)


# ---------------------------------------------------------------- weights, class_weights, lens


@pytest.mark.parametrize("name", LOSS_FUNCS)
def test_weights(data, name):
    x, y = data
    with pytest.raises(ValueError, match=r"^weights: .*\(2, 3\)"):
        _call(name, x, y, np.ones((2, 3), np.float32))
    with pytest.raises(ValueError, match=r"^weights: .*\(2, 5, 3, 4\)"):
        _call(name, x, y, np.ones((N, C, H, W), np.float32))
    with pytest.raises(TypeError, match=r"^weights: .*float64"):
        _call(name, x, y, np.ones((N, H, W), np.float64))
    with pytest.raises(TypeError, match=r"^weights: .*int32"):
        _call(name, x, y, np.ones((N, H, W), np.int32))


@pytest.mark.parametrize("name", LOSS_FUNCS)
def test_class_weights(data, name):
    x, y = data
    for bad in ([1.0] * 4, np.ones(6), np.ones(0)):
        with pytest.raises(ValueError, match=r"^class_weights: "):
            _call(name, x, y, class_weights=bad)
    with pytest.raises(ValueError, match=r"^class_weights: .*\b4\b"):
        _call(name, x, y, class_weights=[1.0] * 4)


@pytest.mark.parametrize("name", LOSS_FUNCS)
def test_lens(data, name):
    x, y = data
    eye = np.eye(C)
    with pytest.raises(ValueError, match=r"^lens: .*\(5, 4\)"):
        _call(name, x, y, lens=eye[:, :4])
    with pytest.raises(ValueError, match=r"^lens: .*\(4, 4\)"):
        _call(name, x, y, lens=np.eye(4))
    with pytest.raises(ValueError, match=r"^lens: .*\(25,\)"):
        _call(name, x, y, lens=eye.ravel())
    neg = eye.copy()
    neg[1, :2] = [-0.5, 1.5]
    with pytest.raises(ValueError, match=r"^lens: entry \[1, 0\] is -0.5; expected finite "
                                         r"entries >= 0 \(rows are distributions\)"):
        _call(name, x, y, lens=neg)
    rows = eye.copy()
    rows[2, 3] = 0.01  # row 2 sums to 1.01
    with pytest.raises(ValueError, match=r"^lens: "):
        _call(name, x, y, lens=rows)
    nan = eye.copy()
    nan[0, 0] = np.nan
    with pytest.raises(ValueError, match=r"^lens: "):
        _call(name, x, y, lens=nan)
    inf = eye.copy()
    inf[4, 4] = np.inf
    with pytest.raises(ValueError, match=r"^lens: "):
        _call(name, x, y, lens=inf)
    # within 1e-4 is accepted
    ok = eye.copy()
    ok[2, 3] = 5e-5
    _call(name, x, y, lens=ok)


@pytest.mark.parametrize("name", LOSS_FUNCS)
def test_lens_with_soft_targets(data, name):
    x, _ = data
    t = make_soft_targets(np.random.default_rng(0), x.shape, x.dtype)
    with pytest.raises(ValueError, match=r"^(lens|target): "):
        _call(name, x, t, lens=np.eye(C))


# ---------------------------------------------------------------- scalar options


@pytest.mark.parametrize("name", LOSS_FUNCS)
@pytest.mark.parametrize("value,text", [(-0.1, r"-0\.1"), (1.5, r"1\.5"), (np.nan, "nan")])
def test_label_smoothing_range(data, name, value, text):
    x, y = data
    with pytest.raises(ValueError, match=rf"^label_smoothing: .*{text}"):
        _call(name, x, y, label_smoothing=value)


@pytest.mark.parametrize("name", LOSS_FUNCS)
def test_label_smoothing_bounds_accepted(data, name):
    x, y = data
    _call(name, x, y, label_smoothing=0.0)
    _call(name, x, y, label_smoothing=1.0)


@pytest.mark.parametrize("name", LOSS_FUNCS)
@pytest.mark.parametrize("value", ["avg", "elementwise_mean", ""])
def test_reduction_unknown(data, name, value):
    x, y = data
    with pytest.raises(ValueError, match=rf"^reduction: .*'{value}'"):
        _call(name, x, y, reduction=value)


@pytest.mark.parametrize("name", LOSS_FUNCS + ["softmax", "log_softmax", "softmax_grad"])
@pytest.mark.parametrize("value", ["NWHC", "CHW", ""])
def test_layout_unknown(data, name, value):
    x, y = data
    with pytest.raises(ValueError, match=rf"^layout: .*'{value}'"):
        if name in ("softmax", "log_softmax"):
            getattr(ssm, name)(x, layout=value)
        elif name == "softmax_grad":
            ssm.softmax_grad(x, x, layout=value)
        else:
            _call(name, x, y, layout=value)


@pytest.mark.parametrize("name", LOSS_FUNCS + ["softmax", "log_softmax", "softmax_grad"])
def test_threads(data, name):
    x, y = data

    def call(threads):
        if name in ("softmax", "log_softmax"):
            return getattr(ssm, name)(x, threads=threads)
        if name == "softmax_grad":
            return ssm.softmax_grad(x, x, threads=threads)
        return _call(name, x, y, threads=threads)

    for bad, exc, text in [(0, ValueError, r"\b0\b"), (-1, ValueError, r"-1"),
                           (1.5, (TypeError, ValueError), r"1\.5"),
                           ("2", (TypeError, ValueError), r"'2'|str")]:
        with pytest.raises(exc, match=rf"^threads: .*{text}"):
            call(bad)
    call(1)
    call(np.int64(2))


@pytest.mark.parametrize("bad,exc", [(0, ValueError), (-3, ValueError), (2.5, (TypeError,
                                                                               ValueError))])
def test_set_num_threads(bad, exc):
    old = ssm.get_num_threads()
    with pytest.raises(exc, match=r"^(n|threads): "):
        ssm.set_num_threads(bad)
    assert ssm.get_num_threads() == old


# ---------------------------------------------------------------- d_loss


@pytest.mark.parametrize("reduction", ["mean", "sum", "batch"])
@pytest.mark.parametrize("name", LOSS_FUNCS[1:])
def test_d_loss_map_needs_reduction_none(data, name, reduction):
    x, y = data
    with pytest.raises(ValueError, match=r"^d_loss: "):
        _call(name, x, y, None, np.ones((N, H, W), x.dtype), reduction=reduction)
    with pytest.raises(ValueError, match=r"^d_loss: "):
        _call(name, x, y, None, np.ones(2, x.dtype), reduction=reduction)


@pytest.mark.parametrize("name", LOSS_FUNCS[1:])
def test_d_loss_wrong_shape(data, name):
    x, y = data
    for bad_shape in [(N, H), (N, H, W + 1), (N, 1, H, W), (N, C, H, W)]:
        with pytest.raises(ValueError, match=r"^d_loss: .*" + re.escape(str(bad_shape))):
            _call(name, x, y, None, np.ones(bad_shape, x.dtype), reduction="none")


# ---------------------------------------------------------------- out=


@pytest.mark.parametrize("name", LOSS_FUNCS + ["softmax", "log_softmax", "softmax_grad"])
def test_out(data, name):
    x, y = data

    def call(out):
        if name in ("softmax", "log_softmax"):
            return getattr(ssm, name)(x, out=out)
        if name == "softmax_grad":
            return ssm.softmax_grad(x, x, out=out)
        return _call(name, x, y, out=out)

    with pytest.raises(ValueError, match=r"^out: .*\(2, 5, 3, 5\)"):
        call(np.zeros((N, C, H, W + 1), x.dtype))
    with pytest.raises(ValueError, match=r"^out: .*\(2, 5, 12\)"):
        call(np.zeros((N, C, H * W), x.dtype))
    with pytest.raises(ValueError, match=r"^out: .*float64"):
        call(np.zeros(x.shape, np.float64))
    with pytest.raises(ValueError, match=r"^out: .*contiguous"):
        call(np.zeros((N, C, H, 2 * W), x.dtype)[..., ::2])
    with pytest.raises(ValueError, match=r"^out: .*contiguous"):
        call(np.asfortranarray(np.zeros(x.shape, x.dtype)))
    with pytest.raises((TypeError, ValueError), match=r"^out: "):
        call([0.0] * x.size)
    ro = np.zeros(x.shape, x.dtype)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match=r"^out: "):
        call(ro)


@pytest.mark.parametrize("name", LOSS_FUNCS[1:])
def test_out_overlapping_d_loss_map(data, name):
    # A "none" d_loss map that is a view of out= would be read after the kernel wrote
    # over it (a silently wrong gradient): it is an input like any other.
    x, y = data
    out = np.zeros(x.shape, x.dtype)
    out_before = out.copy()
    flat = out.reshape(-1)  # contiguous views (strided ones are copied before use)
    for d_loss in (flat[:N * H * W].reshape(N, H, W), flat[-N * H * W:].reshape(N, H, W)):
        with pytest.raises(ValueError, match=r"^out: the buffer overlaps d_loss"):
            _call(name, x, y, None, d_loss, reduction="none", out=out)
    assert np.array_equal(out, out_before)


@pytest.mark.parametrize("name", LOSS_FUNCS)
def test_out_overlapping_every_input(rng, name):
    # float64, so that class weights and lens reach the check without a cast (a copy).
    x = make_logits(rng, (N, C, H, W), np.float64)
    y = make_labels(rng, (N, H, W), C, np.int64)
    mem = np.zeros(x.size + C * C, np.float64)
    out = mem[:x.size].reshape(x.shape)
    with pytest.raises(ValueError, match=r"^out: the buffer overlaps weights"):
        _call(name, x, y, mem[:N * H * W].reshape(N, H, W), out=out)
    mem[:C] = 1.0
    with pytest.raises(ValueError, match=r"^out: the buffer overlaps class_weights"):
        _call(name, x, y, class_weights=mem[:C], out=out)
    lens = mem[x.size:].reshape(C, C)
    lens[:] = np.eye(C)
    with pytest.raises(ValueError, match=r"^out: the buffer overlaps lens"):
        _call(name, x, y, lens=lens, out=mem[C * C:].reshape(x.shape))
    soft = make_soft_targets(rng, x.shape, np.float64)
    with pytest.raises(ValueError, match=r"^out: the buffer overlaps target"):
        _call(name, x, soft, out=soft)


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("name", LOSS_FUNCS)
def test_out_of_range_label_lowest_index_across_tiles(name, threads):
    # Bad labels in several tiles (and threads): the lowest flat index is reported.
    rng = np.random.default_rng(11)
    x = np.zeros((4, 3, 129, 131), np.float32)
    y = rng.integers(0, 3, size=(4, 129, 131)).astype(np.int32)
    bad = {60001: 17, 20011: 5, 50021: -7, 45000: 3}
    for flat, value in bad.items():
        y.flat[flat] = value
    out = np.full(x.shape, -4.5, np.float32)
    with pytest.raises(ValueError, match=r"^target: ") as info:
        _call(name, x, y, threads=threads, out=out)
    msg = str(info.value)
    assert _mentions(msg, 5) and _mentions_index(msg, 20011, y.shape), msg
    for flat, value in bad.items():
        if flat != 20011:
            assert not _mentions_index(msg, flat, y.shape), msg
    assert np.all(out == -4.5)


# ---------------------------------------------------------------- what target may be


TARGET_KINDS = (r"expected integer labels \(uint8, int32, int64\) of shape \(2, 3, 4\), or soft "
                r"targets of the logits' shape \(2, 5, 3, 4\) and dtype float32")


@pytest.mark.parametrize("name", LOSS_FUNCS)
def test_float_labels_are_told_to_be_integers(data, name):
    # A float array of the labels' shape: the message says labels are integers, and
    # what target may be.
    x, y = data
    for dtype in FLOAT_DTYPES:
        with pytest.raises(TypeError, match=rf"^target: a {np.dtype(dtype).name} array of "
                                            r"shape \(2, 3, 4\) .*labels must be integers"):
            _call(name, x, y.astype(dtype))
        with pytest.raises(TypeError, match=TARGET_KINDS):
            _call(name, x, y.astype(dtype))


@pytest.mark.parametrize("name", LOSS_FUNCS)
def test_target_messages_say_what_target_may_be(data, name):
    x, y = data
    cases = [(np.zeros((N, H), np.float32), ValueError, r"a float32 array of shape \(2, 3\)"),
             (np.zeros((N, H, W + 1), np.int32), ValueError, r"int32 labels of shape \(2, 3, 5\)"),
             (np.zeros((N, C, H, W), np.float64), TypeError,
              r"soft targets of dtype float64 .*float32"),
             (y.astype(np.int16), TypeError, r"dtype int16 is not supported")]
    for t, exc, what in cases:
        with pytest.raises(exc, match=rf"^target: {what}.*; {TARGET_KINDS}"):
            _call(name, x, t)


def test_target_kinds_follow_the_layout(data):
    x, y = data
    xh = np.ascontiguousarray(np.moveaxis(x, 1, -1))
    with pytest.raises(TypeError, match=r"integer labels .* of shape \(2, 3, 4\), or soft "
                                        r"targets of the logits' shape \(2, 3, 4, 5\)"):
        ssm.spatial_softmax_with_loss(xh, y.astype(np.float32), layout="NHWC")


# ---------------------------------------------------------------- masked arrays


MASKED = r"a masked array \(numpy\.ma\.MaskedArray\) is not accepted: its mask would be ignored"


def _masked(a):
    m = np.zeros(a.shape, bool)
    m.flat[0] = True
    return np.ma.masked_array(a, mask=m)


@pytest.mark.parametrize("name", LOSS_FUNCS)
def test_masked_arrays_rejected(data, name):
    x, y = data
    w = np.ones(y.shape, x.dtype)
    arg = _first_arg(name)
    with pytest.raises(TypeError, match=rf"^{arg}: {MASKED}; .*np\.asarray\({arg}\)"):
        _call(name, _masked(x), y)
    with pytest.raises(TypeError, match=rf"^target: {MASKED}; for labels, pass "
                                        r"target\.filled\(ignore_index\)"):
        _call(name, x, _masked(y))
    with pytest.raises(TypeError, match=rf"^weights: {MASKED}; pass weights\.filled\(0\)"):
        _call(name, x, y, _masked(w))
    with pytest.raises(TypeError, match=rf"^class_weights: {MASKED}"):
        _call(name, x, y, class_weights=_masked(np.ones(C)))
    with pytest.raises(TypeError, match=rf"^lens: {MASKED}"):
        _call(name, x, y, lens=_masked(np.eye(C)))
    with pytest.raises(TypeError, match=rf"^out: {MASKED}"):
        _call(name, x, y, out=_masked(np.empty_like(x)))
    if name != "spatial_softmax_with_loss":
        with pytest.raises(TypeError, match=rf"^d_loss: {MASKED}; pass d_loss\.filled\(0\)"):
            _call(name, x, y, None, _masked(np.ones(y.shape, x.dtype)), reduction="none")


def test_masked_arrays_rejected_softmax_family(data):
    x, _ = data
    for fn in (ssm.softmax, ssm.log_softmax):
        with pytest.raises(TypeError, match=rf"^x: {MASKED}"):
            fn(_masked(x))
    with pytest.raises(TypeError, match=rf"^dprob: {MASKED}"):
        ssm.softmax_grad(x, _masked(x))


def test_masked_arrays_rejected_by_ops(rng):
    X = rng.random((2, 3, 4, 5)).astype(np.float32)
    T = np.zeros((2, 4, 5), np.int32)
    with pytest.raises(TypeError, match=rf"^T: {MASKED}; for labels, pass T\.filled\(-1\)"):
        ssm.ops.run("SpatialSoftmaxWithLoss", [X, _masked(T)])
    with pytest.raises(TypeError, match=rf"^W: {MASKED}; pass W\.filled\(0\)"):
        ssm.ops.run("SpatialSoftmaxWithLoss", [X, T, _masked(np.ones(T.shape, np.float32))])


# ---------------------------------------------------------------- what is accepted


ACCEPTED = (r"expected a NumPy array, a number or a nested list or tuple of numbers \(CPU\), "
            r"a CuPy array \(GPU\), or an array of another library with __dlpack__")


class _FakeTensor:
    """Like a torch.Tensor: __dlpack__ and __dlpack_device__ (DLPack device type 1 = CPU,
    2 = CUDA), and __array__ where it is on the CPU."""

    def __init__(self, device_type):
        self.device_type = device_type

    def __dlpack__(self, **kwargs):
        raise AssertionError("ssm must not convert")

    def __dlpack_device__(self):
        return (self.device_type, 0)


class _OnlyDLPack:
    def __dlpack__(self, **kwargs):
        raise AssertionError("ssm must not convert")


class _OnlyArray:
    def __array__(self, dtype=None, copy=None):
        raise AssertionError("ssm must not convert")


@pytest.mark.parametrize("name", LOSS_FUNCS + ["softmax", "log_softmax"])
def test_foreign_arrays_get_a_conversion_hint(data, name):
    # Arrays with __dlpack__ are imported (tests/test_dlpack.py); one whose export fails,
    # or that lives on a device ssm has no path for, is a TypeError that says why.
    x, y = data
    arg = "x" if name in ("softmax", "log_softmax") else _first_arg(name)

    def call(bad):
        if name in ("softmax", "log_softmax"):
            return getattr(ssm, name)(bad)
        return getattr(ssm, name)(bad, y)

    failed = r"could not be imported through DLPack \(AssertionError: ssm must not convert\)$"
    cases = [(_FakeTensor(1), failed), (_OnlyDLPack(), failed),
             (_FakeTensor(4), r"on DLPack device type 4 \(OpenCL\), id 0 is not supported; "
                              r"expected an array in host memory \(CPU\) or on a CUDA device$")]
    if importlib.util.find_spec("cupy") is None and name in ("softmax", "log_softmax"):
        cases.append((_FakeTensor(2), r"on a CUDA device \(DLPack device type 2 \(CUDA\), id 0\) "
                                      r"needs CuPy for ssm's GPU path"))
    elif name not in ("softmax", "log_softmax"):  # host labels beside CUDA logits
        with pytest.raises(TypeError, match=rf"^target: a numpy\.ndarray in host memory cannot "
                                            rf"be mixed with {arg}, a test_validation\._FakeTensor "
                                            r"on a CUDA device; pass arrays on one device$"):
            call(_FakeTensor(2))
    for bad, says in cases:
        with pytest.raises(TypeError, match=rf"^{arg}: a test_validation\.{type(bad).__name__} "
                                            + says):
            call(bad)
    with pytest.raises(TypeError, match=rf"^{arg}: {ACCEPTED}; got test_validation\._OnlyArray\. "
                                        rf"Convert it first: np\.asarray\({arg}\)$"):
        call(_OnlyArray())
    for bad, got in [(object(), "object"), ("logits", "str"), (None, "NoneType")]:
        with pytest.raises(TypeError, match=rf"^{arg}: {ACCEPTED}; got {got}$"):
            call(bad)
    # lists are accepted, as the message says
    call(x.tolist())


def test_out_says_what_is_accepted(data):
    x, y = data
    with pytest.raises(TypeError, match=r"^out: expected a NumPy array \(CPU\), a CuPy array "
                                        r"\(GPU\), or a writeable array of another library "
                                        r"with __dlpack__; got list"):
        ssm.softmax(x, out=x.tolist())


# ---------------------------------------------------------------- loss=, and the loss alone


@pytest.mark.parametrize("name", LOSS_FUNCS + ["cross_entropy"])
@pytest.mark.parametrize("value", ["KL", "kl_div", "focal", "", None, 1])
def test_loss_unknown(data, name, value):
    x, y = data
    with pytest.raises(ValueError, match=r"^loss: .* is not one of 'cross_entropy', 'kl'$"):
        _call(name, x, y, loss=value)


@pytest.mark.parametrize("name", LOSS_FUNCS + ["cross_entropy"])
def test_loss_choices_accepted(data, name):
    x, y = data
    for value in ("cross_entropy", "kl"):
        _call(name, x, y, label_smoothing=0.1, loss=value)


def test_cross_entropy_checks_as_the_forward_pass(data):
    x, y = data
    with pytest.raises(TypeError, match=r"^logits: .*int32"):
        ssm.cross_entropy(x.astype(np.int32), y)
    with pytest.raises(ValueError, match=r"^reduction: .*'avg'"):
        ssm.cross_entropy(x, y, reduction="avg")
    with pytest.raises(ValueError, match=r"^lens: "):
        ssm.cross_entropy(x, make_soft_targets(np.random.default_rng(0), x.shape, x.dtype),
                          lens=np.eye(C))
    bad = y.copy()
    bad.flat[7] = C
    with pytest.raises(ValueError, match=rf"^target: .*\b{C}\b"):
        ssm.cross_entropy(x, bad)
    with pytest.raises(TypeError, match="out"):
        ssm.cross_entropy(x, y, out=np.empty_like(x))  # nothing of the logits' size to write


# ---------------------------------------------------------------- the common cases' fast paths
# (ssm/_validation.py, _rounding.py: a call on small logits costs about half what it did)

def test_contiguous_returns_ready_arrays_and_copies_the_rest():
    from ssm import _validation as V
    a = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    assert V.contiguous(a) is a
    assert V.contiguous(a, np.float32) is a
    as64 = V.contiguous(a, np.float64)
    assert as64.dtype == np.float64 and np.array_equal(as64, a)
    f = np.asfortranarray(a)
    assert V.contiguous(f).flags.c_contiguous and np.array_equal(V.contiguous(f), a)
    raw = np.zeros(4 * 24 + 1, np.uint8)
    odd = raw[1:].view(np.float32).reshape(2, 3, 4)  # contiguous, not aligned to 4 bytes
    odd[...] = a
    assert not odd.flags.aligned
    fixed = V.contiguous(odd)
    assert fixed.flags.aligned and fixed.flags.c_contiguous and np.array_equal(fixed, a)

    class Sub(np.ndarray):
        pass

    s = a.view(Sub)
    assert type(V.contiguous(s)) is np.ndarray and np.array_equal(V.contiguous(s), a)


@pytest.mark.parametrize("value,error,text", [
    (True, TypeError, "True"), (2**63, ValueError, str(2**63)),
    (-(2**63) - 1, ValueError, "does not fit"), (1.0, TypeError, r"1\.0")])
def test_ignore_index_checks_beyond_plain_ints(data, value, error, text):
    x, y = data
    with pytest.raises(error, match=rf"^ignore_index: .*{text}"):
        ssm.cross_entropy(x, y, ignore_index=value)


@pytest.mark.parametrize("value", [np.int64(-7), np.int8(-1), 2**63 - 1, -(2**63)])
def test_ignore_index_accepts_any_64_bit_integer(data, value):
    x, y = data
    y = np.maximum(y, 0)  # no -1 labels: every label is a class
    assert ssm.cross_entropy(x, y, ignore_index=value) == ssm.cross_entropy(x, y, ignore_index=99)


@pytest.mark.parametrize("value,error", [(True, TypeError), ("0.1", TypeError),
                                         (float("inf"), ValueError), (-0.0, None),
                                         (np.float32(0.25), None), (1, None)])
def test_label_smoothing_checks_beyond_plain_floats(data, value, error):
    x, y = data
    if error is None:
        assert ssm.cross_entropy(x, y, label_smoothing=value) == \
            ssm.cross_entropy(x, y, label_smoothing=float(value))
    else:
        with pytest.raises(error, match=r"^label_smoothing: "):
            ssm.cross_entropy(x, y, label_smoothing=value)


def test_round_once_rounds_to_numpys_floats_once():
    from ssm._rounding import round_once
    # just above the midpoint between 1 and the next float16 / float32: once, it rounds up;
    # through a narrower or a wider float first it would land on the midpoint, then on 1
    assert round_once(1 + 2.0**-11 + 2.0**-40, np.float16) == np.float16(1 + 2.0**-10)
    assert round_once(1 + 2.0**-24 + 2.0**-50, np.float32) == np.float32(1 + 2.0**-23)
    assert round_once(1 + 2.0**-24, np.float32) == np.float32(1.0)  # a tie: to even
    rng = np.random.default_rng(5)
    a = rng.standard_normal(1000) * 10.0 ** rng.integers(-6, 4, 1000)  # float16 overflows at 65520
    for dtype in (np.float16, np.float32):
        got = round_once(a, dtype)
        assert got.dtype == dtype and got.shape == a.shape
        g = got.astype(np.float64)
        up = np.nextafter(got, np.inf).astype(np.float64)
        down = np.nextafter(got, -np.inf).astype(np.float64)
        assert np.all(np.abs(a - g) <= np.abs(a - up)) and np.all(np.abs(a - g) <= np.abs(a - down))
    assert np.array_equal(round_once(a, np.float64), a)
    scalar = round_once(-0.0, np.float32)
    assert scalar.shape == () and scalar.dtype == np.float32 and np.signbit(scalar)


def test_is_device_array_fast_path():
    from ssm import _validation as V
    from ssm.testing import cudasim
    for host in (None, 0, 1.5, True, np.zeros(3), np.float32(1.0), [1.0], "x"):
        assert not V.is_device_array(host)
    assert V.is_device_array(cudasim.zeros(3, np.float32))


def test_byte_swapped_inputs_are_read_as_their_numbers(rng):
    # A big-endian (non-native) array is copied to native order, as a strided one is
    # copied to C order; an out= buffer of another byte order is not the logits' dtype.
    x = make_logits(rng, (2, 4, 3, 5), np.float32)
    y = make_labels(rng, (2, 3, 5), 4, np.int64)
    w = rng.random((2, 3, 5)).astype(np.float32)
    t = make_soft_targets(rng, x.shape, np.float32)
    swapped = [a.astype(a.dtype.newbyteorder(">")) for a in (x, y, w, t)]
    assert not swapped[0].dtype.isnative
    xs, ys, ws, ts = swapped
    for got, want in ((ssm.cross_entropy(xs, ys, ws), ssm.cross_entropy(x, y, w)),
                      (ssm.cross_entropy(xs, ts), ssm.cross_entropy(x, t)),
                      (ssm.softmax(xs), ssm.softmax(x)),
                      (ssm.spatial_softmax(xs, temperature=xs.dtype.type(0.5)),
                       ssm.spatial_softmax(x, temperature=0.5))):
        assert got.dtype == want.dtype and got.tobytes() == want.tobytes()
    with pytest.raises(ValueError, match=r"^out: dtype >f4 does not match; expected float32"):
        ssm.softmax(x, out=np.empty(x.shape, ">f4"))


def test_nested_lists_take_the_logits_dtype(rng):
    # Python's numbers have no dtype: weights, soft targets and d_keypoints given as
    # nested lists are the logits' dtype, as d_loss maps and class weights are
    for dtype in (np.float32, np.float16):
        x = make_logits(rng, (2, 3, 2, 2), dtype)
        y = make_labels(rng, (2, 2, 2), 3, np.int64)
        w = rng.random((2, 2, 2)).astype(dtype)
        t = make_soft_targets(rng, x.shape, dtype)
        dk = rng.standard_normal((2, 3, 2)).astype(dtype)
        assert ssm.cross_entropy(x, y, w.tolist()) == ssm.cross_entropy(x, y, w)
        assert ssm.cross_entropy(x, t.tolist()) == ssm.cross_entropy(x, t)
        np.testing.assert_array_equal(ssm.soft_argmax_grad(x, dk.tolist()),
                                      ssm.soft_argmax_grad(x, dk))
    with pytest.raises(TypeError, match=r"^weights: dtype bool differs"):
        ssm.cross_entropy(x, y, (w > 0.5).tolist())


def test_unsupported_dtype_names_the_device(rng):
    with pytest.raises(TypeError, match=r"^x: dtype int16 is not supported on the CPU; "
                                        r"expected one of float"):
        ssm.softmax(np.zeros((2, 3), np.int16))


def test_ragged_nested_lists_name_the_argument(rng):
    x = make_logits(rng, (1, 3, 2, 2), np.float32)
    with pytest.raises(ValueError, match=r"^target: a nested list or tuple must have an "
                                         r"array's shape .* got a ragged one"):
        ssm.cross_entropy(x, [[[1, 2], [0]]])
    with pytest.raises(ValueError, match=r"^logits: a nested list or tuple must have"):
        ssm.cross_entropy([[[[1.0, 2.0], [0.5]]]], np.zeros((1, 2, 2), np.int64))
    with pytest.raises(ValueError, match=r"^class_weights: a nested list or tuple must have"):
        ssm.cross_entropy(x, np.zeros((1, 2, 2), np.int64), class_weights=[[1.0], [1.0, 2.0]])
    with pytest.raises(ValueError, match=r"^weights: a nested list or tuple must have"):
        ssm.cross_entropy(x, np.zeros((1, 2, 2), np.int64), [[[1.0, 2.0], [1.0]]])
    with pytest.raises(ValueError, match=r"^dprob: a nested list or tuple must have"):
        ssm.softmax_grad(ssm.softmax(x), [[[[1.0]]], [[[1.0, 2.0]]]])


def test_dprob_as_a_nested_list_takes_prob_dtype(rng):
    # a nested list of Python floats has no dtype to differ from prob's (as soft targets,
    # weights and d_keypoints)
    x = make_logits(rng, (2, 3, 4), np.float32)
    dp = rng.standard_normal(x.shape)
    p = ssm.softmax(x)
    expected = ssm.softmax_grad(p, dp.astype(np.float32))
    np.testing.assert_array_equal(ssm.softmax_grad(p, dp.tolist()), expected)
    m = make_logits(rng, (1, 2, 3, 4), np.float32)
    pm = ssm.spatial_softmax(m)
    dm = rng.standard_normal(m.shape)
    np.testing.assert_array_equal(ssm.spatial_softmax_grad(pm, dm.tolist()),
                                  ssm.spatial_softmax_grad(pm, dm.astype(np.float32)))
    with pytest.raises(TypeError, match=r"^dprob: dtype float64 differs from prob's float32"):
        ssm.softmax_grad(p, dp)  # an array's dtype is its own
