"""CUDA tensors through DLPack and ssm.torch on a GPU (skipped without CuPy, a device and
a CUDA build of PyTorch)."""

import numpy as np
import pytest

from conftest import make_class_weights, make_labels, make_logits

pytestmark = pytest.mark.gpu
torch = pytest.importorskip("torch")
F = torch.nn.functional

if not torch.cuda.is_available():
    pytest.skip("PyTorch has no CUDA device", allow_module_level=True)

import ssm  # noqa: E402
import ssm.torch as st  # noqa: E402

SHAPE, PIX, C = (2, 5, 3, 4), (2, 3, 4), 5


def _cuda(a):
    return torch.tensor(a, device="cuda")


def test_cuda_tensor_in_cuda_tensor_out(rng):
    x = _cuda(make_logits(rng, SHAPE, np.float32))
    y = _cuda(make_labels(rng, PIX, C, ignore_index=-1))
    p = ssm.softmax(x)
    assert isinstance(p, torch.Tensor) and p.device == x.device
    torch.testing.assert_close(p, torch.softmax(x, 1))
    loss, g = ssm.spatial_softmax_with_loss_and_grad(x, y)
    assert loss.device == x.device and g.device == x.device
    torch.testing.assert_close(loss, F.cross_entropy(x, y, ignore_index=-1))
    out = torch.empty_like(x)
    assert ssm.softmax(x, out=out) is out
    torch.testing.assert_close(out, p)


def test_cuda_and_host_do_not_mix(rng):
    x = _cuda(make_logits(rng, SHAPE, np.float32))
    with pytest.raises(TypeError, match=r"^target: a torch\.Tensor in host memory cannot be "
                                        r"mixed with logits, a torch\.Tensor on a CUDA device"):
        ssm.spatial_softmax_with_loss(x, torch.zeros(PIX, dtype=torch.int64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_parity_on_the_gpu(rng, dtype, reduction):
    x = torch.tensor(make_logits(rng, SHAPE), dtype=dtype, device="cuda")
    y = _cuda(make_labels(rng, PIX, C, ignore_index=-100))
    w = torch.tensor(make_class_weights(rng, C), dtype=dtype, device="cuda")
    results = []
    for fn in (st.cross_entropy, F.cross_entropy):
        a = x.clone().requires_grad_()
        loss = fn(a, y, w, reduction=reduction, label_smoothing=0.1)
        loss.sum().backward()
        results.append((loss.detach(), a.grad))
    (loss, g), (want, want_g) = results
    assert loss.device == x.device and g.device == x.device
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(g, want_g)


def test_side_stream_and_autocast(rng):
    x = _cuda(make_logits(rng, SHAPE, np.float32))
    y = _cuda(make_labels(rng, PIX, C, ignore_index=-100))
    want = F.cross_entropy(x, y)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = st.cross_entropy(x, y)
    torch.cuda.current_stream().wait_stream(side)
    torch.testing.assert_close(got, want)
    h = x.half().requires_grad_()
    with torch.autocast("cuda", dtype=torch.float16):
        loss = st.cross_entropy(h, y)
        ref = F.cross_entropy(h, y)
    assert loss.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=1e-3, atol=1e-3)
    loss.backward()
    assert h.grad.dtype == torch.float16


def test_compile_on_the_gpu(rng):
    x = _cuda(make_logits(rng, SHAPE, np.float32)).requires_grad_()
    y = _cuda(make_labels(rng, PIX, C, ignore_index=-100))
    f = torch.compile(lambda a: st.cross_entropy(a * 2, y), fullgraph=True)
    loss = f(x)
    (g,) = torch.autograd.grad(loss, x)
    (want_g,) = torch.autograd.grad(F.cross_entropy(x * 2, y), x)
    torch.testing.assert_close(g, want_g)
