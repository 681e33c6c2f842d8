"""Arrays of other libraries through DLPack: accepted without a copy, answered in kind."""

import types

import numpy as np
import pytest

import ssm
from ssm import _interop
from conftest import make_labels, make_logits, require_module

SHAPE = (2, 5, 3, 4)


class _ArrayAPIArray:
    """A minimal foreign array: __dlpack__ / __dlpack_device__ over a NumPy array, and an
    __array_namespace__ whose from_dlpack wraps the result again."""

    def __init__(self, a):
        self.a = a

    def __dlpack__(self, **kwargs):
        return self.a.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self.a.__dlpack_device__()

    def __array_namespace__(self, api_version=None):
        return types.SimpleNamespace(from_dlpack=lambda r: _ArrayAPIArray(np.from_dlpack(r)))


def _calls(x, y):
    """Each public function on (x, y), as (name, thunk)."""
    return [
        ("softmax", lambda: ssm.softmax(x)),
        ("log_softmax", lambda: ssm.log_softmax(x)),
        ("softmax_grad", lambda: ssm.softmax_grad(x, x)),
        ("spatial_softmax_with_loss", lambda: ssm.spatial_softmax_with_loss(x, y)),
        ("spatial_softmax_with_loss_grad", lambda: ssm.spatial_softmax_with_loss_grad(x, y)),
        ("spatial_softmax_with_loss_and_grad",
         lambda: ssm.spatial_softmax_with_loss_and_grad(x, y, return_prob=True)),
    ]


def _as_tuple(r):
    return r if isinstance(r, tuple) else (r,)


def test_array_api_object_in_and_out(rng):
    x = make_logits(rng, SHAPE, np.float32)
    y = make_labels(rng, (2, 3, 4), 5, np.int64)
    for (name, ours), (_, ref) in zip(_calls(_ArrayAPIArray(x), _ArrayAPIArray(y)),
                                      _calls(x, y)):
        for got, want in zip(_as_tuple(ours()), _as_tuple(ref())):
            assert isinstance(got, _ArrayAPIArray), name
            np.testing.assert_array_equal(got.a, want)


def test_import_and_export_share_memory(rng):
    x = make_logits(rng, SHAPE, np.float64)
    native = _interop.to_native(_ArrayAPIArray(x), "x")
    assert np.shares_memory(native, x)
    back = _interop._from_dlpack_of(_ArrayAPIArray(x))(x)
    assert np.shares_memory(back.a, x)


def test_foreign_numbers_and_lists_stay_native():
    for a in (None, 1, 1.5, [1, 2], (1,), "x", np.zeros(2), np.float32(1)):
        assert not _interop.is_foreign(a)
    assert _interop.is_foreign(_ArrayAPIArray(np.zeros(2)))


# ---------------------------------------------------------------- PyTorch


@pytest.fixture
def torch():
    return require_module("torch", "torch")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_torch_in_torch_out(rng, torch, dtype):
    x = make_logits(rng, SHAPE, np.dtype(dtype))
    y = make_labels(rng, (2, 3, 4), 5, np.int64)
    for (name, ours), (_, ref) in zip(_calls(torch.from_numpy(x), torch.from_numpy(y)),
                                      _calls(x, y)):
        for got, want in zip(_as_tuple(ours()), _as_tuple(ref())):
            assert isinstance(got, torch.Tensor), name
            assert got.dtype == getattr(torch, dtype)
            np.testing.assert_array_equal(got.numpy(), want)


def test_torch_zero_copy(rng, torch):
    t = torch.from_numpy(make_logits(rng, SHAPE, np.float32))
    native = _interop.to_native(t, "x")
    assert native.__array_interface__["data"][0] == t.data_ptr()
    r = np.ones(SHAPE, np.float32)
    assert _interop._from_dlpack_of(t)(r).data_ptr() == r.__array_interface__["data"][0]


def test_torch_out_is_written_in_place(rng, torch):
    x = torch.from_numpy(make_logits(rng, SHAPE, np.float32))
    y = torch.from_numpy(make_labels(rng, (2, 3, 4), 5, np.int64))
    out = torch.full(SHAPE, 7.0)
    assert ssm.softmax(x, out=out) is out
    torch.testing.assert_close(out, torch.softmax(x, 1), rtol=0, atol=1e-6)
    # out= of another library than the logits: still the caller's object, written
    out_np = np.empty(SHAPE, np.float32)
    loss, d = ssm.spatial_softmax_with_loss_and_grad(x, y, out=out_np)
    assert d is out_np and isinstance(loss, torch.Tensor)
    grad_out = torch.empty(SHAPE)
    loss, d = ssm.spatial_softmax_with_loss_and_grad(x.numpy(), y, out=grad_out)
    assert d is grad_out and isinstance(loss, np.ndarray)
    np.testing.assert_array_equal(grad_out.numpy(), out_np)


def test_torch_out_must_be_contiguous_and_separate(rng, torch):
    x = torch.from_numpy(make_logits(rng, SHAPE, np.float32))
    with pytest.raises(ValueError, match=r"^out: the buffer is not C-contiguous"):
        ssm.softmax(x, out=torch.empty(5, 2, 3, 4).transpose(0, 1))
    with pytest.raises(ValueError, match=r"^out: the buffer overlaps x"):
        ssm.softmax(x, out=x)
    with pytest.raises(ValueError, match=r"^out: dtype float64 does not match; expected float32"):
        ssm.softmax(x, out=torch.empty(SHAPE, dtype=torch.float64))


def test_torch_lazy_negation_is_applied(rng, torch):
    # x.conj().imag is a view with the negative bit set: DLPack exports the memory without
    # it, so ssm reads the tensor resolved (a copy), and refuses it as out=
    z = torch.randn(2, 4, 3, 3, dtype=torch.complex64)
    im = z.conj().imag
    assert im.is_neg()
    torch.testing.assert_close(ssm.softmax(im), torch.softmax(im, 1))
    labels = torch.from_numpy(make_labels(rng, (2, 3, 3), 4))
    torch.testing.assert_close(ssm.cross_entropy(im, labels),
                               torch.nn.functional.cross_entropy(im, labels, ignore_index=-1))
    with pytest.raises(TypeError, match="out: a torch.Tensor with its neg bit set"):
        ssm.softmax(torch.randn(2, 4, 3, 3), out=torch.randn(2, 4, 3, 3,
                                                            dtype=torch.complex64).conj().imag)


def test_torch_strided_input_is_copied(rng, torch):
    x = make_logits(rng, (5, 2, 3, 4), np.float64)
    t = torch.from_numpy(x).transpose(0, 1)
    np.testing.assert_array_equal(ssm.softmax(t).numpy(), ssm.softmax(x.transpose(1, 0, 2, 3)))


def test_torch_mixed_with_numpy_and_lists(rng, torch):
    x = make_logits(rng, SHAPE, np.float64)
    y = make_labels(rng, (2, 3, 4), 5, np.int64)
    w = rng.random((2, 3, 4))
    want = ssm.spatial_softmax_with_loss(x, y, w, class_weights=[1, 2, 3, 4, 5])[1]
    got = ssm.spatial_softmax_with_loss(x, torch.from_numpy(y), torch.from_numpy(w),
                                        class_weights=torch.arange(1.0, 6.0))[1]
    assert isinstance(got, np.ndarray)  # the first argument's library
    np.testing.assert_array_equal(got, want)


def test_torch_requires_grad_says_detach(rng, torch):
    x = torch.zeros(SHAPE, requires_grad=True)
    with pytest.raises(TypeError, match=r"^x: a torch\.Tensor could not be imported through "
                                        r"DLPack \(.*\); pass x\.detach\(\), or use "
                                        r"ssm\.torch\.cross_entropy"):
        ssm.softmax(x)


def test_torch_unsupported_dtype(torch):
    with pytest.raises(TypeError, match=r"^x: dtype complex64 is not supported on the CPU"):
        ssm.softmax(torch.zeros(SHAPE, dtype=torch.complex64))


@pytest.mark.parametrize("name", ["float16", "bfloat16"])
def test_torch_half_in_torch_half_out(rng, torch, name):
    # NumPy cannot import DLPack's kDLBfloat: ssm relabels the export uint16 and views it as
    # ml_dtypes.bfloat16, without a copy; results go back as torch tensors of the same dtype
    import ml_dtypes
    tdtype = getattr(torch, name)
    ndtype = np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(np.float16)
    x = make_logits(rng, SHAPE, np.float32).astype(ndtype)
    y = make_labels(rng, (2, 3, 4), 5)
    xt = torch.from_numpy(x.view(np.uint16).astype(np.int32)).to(torch.int16).view(tdtype)
    native = _interop.to_native(xt, "x")
    assert native.dtype == ndtype and native.ctypes.data == xt.data_ptr()  # no copy
    for (call, ours), (_, ref) in zip(_calls(xt, torch.from_numpy(y)), _calls(x, y)):
        for got, want in zip(_as_tuple(ours()), _as_tuple(ref())):
            assert isinstance(got, torch.Tensor) and got.dtype == tdtype, call
            np.testing.assert_array_equal(got.view(torch.int16).numpy().view(np.uint16),
                                          np.asarray(want).view(np.uint16))


@pytest.mark.parametrize("name", ["float16", "bfloat16"])
def test_torch_half_out_buffer(rng, torch, name):
    # A writeable torch tensor is an out= buffer in every dtype: bfloat16's export is
    # relabelled in a versioned DLPack capsule, which says it is writeable (NumPy imports
    # a legacy one read-only); a read-only JAX array stays refused
    tdtype = getattr(torch, name)
    xt = torch.from_numpy(make_logits(rng, SHAPE, np.float32)).to(tdtype)
    out = torch.full_like(xt, 7.0)
    assert ssm.softmax(xt, out=out) is out
    assert torch.equal(out, ssm.softmax(xt))
    jax = require_module("jax", "jax")
    xj = jax.numpy.asarray(xt.float().numpy()).astype(getattr(jax.numpy, name))
    with pytest.raises(ValueError, match=r"^out: the buffer is read-only"):
        ssm.softmax(xj, out=jax.numpy.zeros_like(xj))


def test_jax_bfloat16_in_jax_out(rng):
    jax = require_module("jax", "jax")
    jnp = jax.numpy
    x = make_logits(rng, SHAPE, np.float32).astype(jnp.bfloat16)
    got = ssm.softmax(jnp.asarray(x))
    assert isinstance(got, jax.Array) and got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got).view(np.uint16),
                                  ssm.softmax(x).view(np.uint16))


def test_torch_errors_name_the_argument(rng, torch):
    x = torch.from_numpy(make_logits(rng, SHAPE, np.float64))
    with pytest.raises(ValueError, match=r"^target: int64 labels of shape \(2, 3\)"):
        ssm.spatial_softmax_with_loss(x, torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"^target: label 9 at index \(0, 0, 0\)"):
        ssm.spatial_softmax_with_loss(x, torch.full((2, 3, 4), 9))


# ---------------------------------------------------------------- JAX


def test_jax_in_jax_out(rng):
    jax = require_module("jax", "jax")
    jnp = jax.numpy
    x = make_logits(rng, SHAPE, np.float32)
    y = make_labels(rng, (2, 3, 4), 5, np.int32)
    for (name, ours), (_, ref) in zip(_calls(jnp.asarray(x), jnp.asarray(y)), _calls(x, y)):
        for got, want in zip(_as_tuple(ours()), _as_tuple(ref())):
            assert isinstance(got, jax.Array), name
            np.testing.assert_array_equal(np.asarray(got), want)
    with pytest.raises(ValueError, match=r"^out: the buffer is read-only"):  # JAX is immutable
        ssm.softmax(jnp.asarray(x), out=jnp.zeros(SHAPE, jnp.float32))


def test_ops_run_takes_torch_tensors(rng, torch):
    X = make_logits(rng, SHAPE, np.float32)
    T = make_labels(rng, (2, 3, 4), 5, np.int32)
    W = rng.random((2, 3, 4)).astype(np.float32)
    for inputs in ([X, T], [X, T, W]):
        want = ssm.ops.run("SpatialSoftmaxWithLoss", inputs)
        got = ssm.ops.run("SpatialSoftmaxWithLoss", [torch.from_numpy(a) for a in inputs])
        assert isinstance(got, list) and all(isinstance(g, torch.Tensor) for g in got)
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g.numpy(), w)
    with pytest.raises(TypeError, match=r"^T: dtype int64 is not supported; expected int32"):
        ssm.ops.run("SpatialSoftmaxWithLoss", [torch.from_numpy(X), torch.zeros(2, 3, 4).long()])


def test_torch_no_allocation_beyond_the_outputs(rng, torch):
    # NumPy reports its buffers to tracemalloc: a torch tensor in, a torch tensor out, and
    # the only large buffer allocated is the result itself (no copy of the input, none out).
    import tracemalloc
    x = torch.from_numpy(make_logits(rng, (4, 5, 64, 64), np.float32))
    y = torch.from_numpy(make_labels(rng, (4, 64, 64), 5, np.int64))
    ssm.spatial_softmax_with_loss_and_grad(x, y)  # warm
    for call, outputs in ((lambda: ssm.softmax(x), x.nbytes),
                          (lambda: ssm.spatial_softmax_with_loss_and_grad(x, y), x.nbytes),
                          (lambda: ssm.softmax(x, out=torch.empty_like(x)), 0)):
        tracemalloc.start()
        result = call()
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert outputs <= peak < outputs + 64 * 1024, (peak, outputs)
        del result
