"""ssm.torch: parity with torch.nn.functional, autograd, no_grad, torch.compile, autocast."""

import numpy as np
import pytest

import _reference as ref
import ssm
from conftest import (assert_close, make_class_weights, make_labels, make_lens, make_logits,
                      make_soft_targets, make_weights, require_module)

torch = require_module("torch", "torch")
F = torch.nn.functional
st = require_module("torch", "ssm.torch")

SHAPES = [(5,), (4, 5), (2, 5, 7), (2, 5, 3, 4), (2, 3, 2, 3, 4)]
CASES = {
    # name: (probability targets, ignore_index, class weights, label_smoothing)
    "plain": (False, -100, False, 0.0),
    "ignore_-1": (False, -1, False, 0.0),
    "weight": (False, -100, True, 0.0),
    "smoothing": (False, -100, False, 0.2),
    "weight_smoothing_ignore": (False, 3, True, 0.3),
    "probs": (True, -100, False, 0.0),
    "probs_weight_smoothing": (True, -100, True, 0.25),
}


def _problem(rng, case, shape):
    soft, ignore_index, weighted, smoothing = CASES[case]
    C = shape[0] if len(shape) == 1 else shape[1]
    pix = () if len(shape) == 1 else (shape[0], *shape[2:])
    x = make_logits(rng, shape)
    if soft:
        t = make_soft_targets(rng, shape if len(shape) > 1 else (1, C)).reshape(shape)
    elif ignore_index == 3:
        t = rng.integers(0, C, size=pix)  # ignore a real class
    else:
        t = make_labels(rng, pix, C, np.int64, ignore_index=ignore_index, ignore_frac=0.2)
    opts = {"ignore_index": ignore_index, "label_smoothing": smoothing}
    if weighted:
        opts["weight"] = torch.tensor(make_class_weights(rng, C))
    return torch.tensor(x), torch.tensor(np.asarray(t)), opts


def _loss_and_grad(fn, x, t, d_loss, **opts):
    x = x.clone().requires_grad_()
    loss = fn(x, t, **opts)
    loss.backward(d_loss)
    return loss.detach(), x.grad


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{len(s)}d")
@pytest.mark.parametrize("case", list(CASES))
def test_parity_with_torch(rng, case, shape, reduction):
    x, t, opts = _problem(rng, case, shape)
    pix = () if len(shape) == 1 else (shape[0], *shape[2:])
    d_loss = torch.tensor(rng.random(pix) if reduction == "none" else 0.6)
    want_loss, want_grad = _loss_and_grad(F.cross_entropy, x, t, d_loss, reduction=reduction,
                                          **opts)
    loss, grad = _loss_and_grad(st.cross_entropy, x, t, d_loss, reduction=reduction, **opts)
    assert loss.shape == want_loss.shape and loss.dtype == want_loss.dtype
    assert grad.shape == want_grad.shape
    scale = float(want_loss.abs().max()) + 1.0
    assert_close(loss.numpy(), want_loss.numpy(), np.float64, scale=scale)
    assert_close(grad.numpy(), want_grad.numpy(), np.float64,
                 scale=float(want_grad.abs().max()))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("soft", [False, True], ids=["labels", "probs"])
def test_pixel_weights_and_lens_against_the_reference(rng, reduction, soft):
    shape, pix, C = (2, 5, 3, 4), (2, 3, 4), 5
    x = make_logits(rng, shape)
    t = make_soft_targets(rng, shape) if soft else make_labels(rng, pix, C, ignore_index=-100)
    w, cw = make_weights(rng, pix), make_class_weights(rng, C)
    lens = None if soft else make_lens(rng, C)
    opts = dict(ignore_index=-100, class_weights=cw, lens=lens, label_smoothing=0.1,
                reduction=reduction)
    d_loss = rng.random(pix) if reduction == "none" else 0.7
    prob, want = ref.sswl_loss(x, t, w, **opts)
    want_grad = ref.sswl_grad(prob, t, w, d_loss, **opts)
    loss, grad = _loss_and_grad(st.cross_entropy, torch.tensor(x), torch.tensor(t),
                                torch.tensor(d_loss, dtype=torch.float64), weight=torch.tensor(cw),
                                ignore_index=-100, reduction=reduction, label_smoothing=0.1,
                                pixel_weights=torch.tensor(w),
                                lens=None if lens is None else lens.tolist())
    assert_close(loss.numpy(), want, np.float64,
                 scale=np.max(ref.sswl_loss_scale(x, t, w, **opts)))
    assert_close(grad.numpy(), want_grad, np.float64, scale=np.abs(want_grad).max())


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck(rng, reduction):
    x = torch.tensor(make_logits(rng, (2, 4, 3, 2)), requires_grad=True)
    y = torch.tensor(make_labels(rng, (2, 3, 2), 4, ignore_index=-100))
    w = torch.tensor(make_weights(rng, (2, 3, 2)))
    cw = torch.tensor(make_class_weights(rng, 4))
    p = torch.tensor(make_soft_targets(rng, (2, 4, 3, 2)))
    assert torch.autograd.gradcheck(
        lambda a: st.cross_entropy(a, y, cw, reduction=reduction, label_smoothing=0.1,
                                   pixel_weights=w, lens=make_lens(np.random.default_rng(0), 4)),
        (x,))
    assert torch.autograd.gradcheck(lambda a: st.cross_entropy(a, p, reduction=reduction), (x,))
    assert torch.autograd.gradcheck(lambda a: st.log_softmax(a, 1), (x,))
    assert torch.autograd.gradcheck(lambda a: st.softmax(a, -1), (x,))


def test_one_fused_call_in_forward_none_in_backward(rng, monkeypatch):
    calls = []
    for name in ("spatial_softmax_with_loss", "spatial_softmax_with_loss_grad",
                 "spatial_softmax_with_loss_and_grad"):
        f = getattr(ssm, name)
        monkeypatch.setattr(ssm, name, lambda *a, _f=f, _n=name, **k: calls.append(_n) or _f(*a, **k))
    x = torch.tensor(make_logits(rng, (2, 5, 3, 4)), requires_grad=True)
    y = torch.tensor(make_labels(rng, (2, 3, 4), 5, ignore_index=-100))
    loss = st.cross_entropy(x, y)
    assert calls == ["spatial_softmax_with_loss_and_grad"]
    loss.backward()
    assert calls == ["spatial_softmax_with_loss_and_grad"]
    with torch.no_grad():
        nograd = st.cross_entropy(x, y)
    assert calls[1:] == ["spatial_softmax_with_loss"] and nograd.grad_fn is None
    st.cross_entropy(x.detach(), y)  # needs no gradient either
    assert calls[2:] == ["spatial_softmax_with_loss"]
    assert nograd.item() == loss.item()


def test_backward_twice_and_accumulation(rng):
    x = torch.tensor(make_logits(rng, (2, 5, 3, 4)), requires_grad=True)
    y = torch.tensor(make_labels(rng, (2, 3, 4), 5, ignore_index=-100))
    loss = st.cross_entropy(x, y)
    loss.backward(retain_graph=True)
    first = x.grad.clone()
    loss.backward(retain_graph=True)
    loss.backward()
    torch.testing.assert_close(x.grad, 3 * first)
    (g,) = torch.autograd.grad(st.cross_entropy(x, y) * 2.5, x)
    torch.testing.assert_close(g, 2.5 * first)
    # through a view, .grad zeroed in place between two backward passes of one graph
    x.grad = None
    loss = st.cross_entropy(x.view(2, 5, 12).view(2, 5, 3, 4), y)
    loss.backward(retain_graph=True)
    x.grad.zero_()
    loss.backward()
    torch.testing.assert_close(x.grad, first)


def test_all_ignored_mean_is_nan_as_in_torch(rng):
    x = torch.tensor(make_logits(rng, (2, 5, 3)), requires_grad=True)
    y = torch.full((2, 3), -100)
    for opts in ({}, {"weight": torch.ones(5)}, {"label_smoothing": 0.2}):
        loss = st.cross_entropy(x, y, **opts)
        assert torch.isnan(loss) and torch.isnan(F.cross_entropy(x, y, **{
            k: v.double() if k == "weight" else v for k, v in opts.items()}))
        (g,) = torch.autograd.grad(loss, x)
        assert torch.count_nonzero(g) == 0  # PyTorch's gradient there is 0 too
    with torch.no_grad():
        assert torch.isnan(st.cross_entropy(x, y))
        assert st.cross_entropy(x, y, reduction="sum") == 0
        # zero pixel weights (ssm's option): the "mean" divisor is 0 as well
        w = torch.zeros(2, 3, dtype=torch.float64)
        assert torch.isnan(st.cross_entropy(x, torch.zeros(2, 3, dtype=torch.int64),
                                            pixel_weights=w))


def test_float32_and_label_dtypes(rng):
    x = torch.tensor(make_logits(rng, (2, 5, 3, 4), np.float32))
    y = torch.tensor(make_labels(rng, (2, 3, 4), 5, ignore_index=-100))
    want = F.cross_entropy(x, y)
    assert st.cross_entropy(x, y).dtype == torch.float32
    torch.testing.assert_close(st.cross_entropy(x, y), want)
    for dtype in (torch.int32, torch.uint8):  # uint8 as PyTorch; int32 beyond it
        yy = torch.where(y < 0, 255, y).to(dtype)
        torch.testing.assert_close(st.cross_entropy(x, yy, ignore_index=255),
                                   F.cross_entropy(x, yy.long(), ignore_index=255))


def test_half_precision_computed_in_float32(rng):
    x32 = torch.tensor(make_logits(rng, (2, 5, 3, 4), np.float32))
    y = torch.tensor(make_labels(rng, (2, 3, 4), 5, ignore_index=-100))
    for dtype in (torch.float16, torch.bfloat16):
        x = x32.to(dtype).requires_grad_()
        loss = st.cross_entropy(x, y)
        assert loss.dtype == dtype  # outside autocast: the input's dtype, as PyTorch
        loss.backward()
        assert x.grad.dtype == dtype
        xf = x.detach().float().requires_grad_()
        F.cross_entropy(xf, y).backward()
        torch.testing.assert_close(x.grad, xf.grad.to(dtype))
        with torch.autocast("cpu", dtype=dtype):
            loss = st.cross_entropy(x, y)
            want = F.cross_entropy(x, y)
        assert loss.dtype == want.dtype == torch.float32
        torch.testing.assert_close(loss, want)


def test_compile_is_one_graph(rng):
    x = torch.tensor(make_logits(rng, (2, 5, 3, 4), np.float32), requires_grad=True)
    y = torch.tensor(make_labels(rng, (2, 3, 4), 5, ignore_index=-100))
    w = torch.tensor(make_class_weights(rng, 5, np.float32))

    def step(a, t):
        return st.cross_entropy(a * 2.0, t, w, label_smoothing=0.1)

    explained = torch._dynamo.explain(step)(x, y)
    assert explained.graph_count == 1 and explained.graph_break_count == 0
    code = explained.graphs[0].code
    assert "torch.ops.ssm.cross_entropy_fwd_bwd" in code
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(x, y)
    (g,) = torch.autograd.grad(loss, x)
    (want_g,) = torch.autograd.grad(step(x, y), x)
    torch.testing.assert_close(loss, step(x, y))
    torch.testing.assert_close(g, want_g)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, y), loss.detach())


def test_compile_inductor(rng):
    x = torch.tensor(make_logits(rng, (2, 5, 3, 4), np.float32), requires_grad=True)
    y = torch.tensor(make_labels(rng, (2, 3, 4), 5, ignore_index=-100))
    compiled = torch.compile(st.cross_entropy, fullgraph=True)
    loss = compiled(x, y, reduction="none")
    loss.sum().backward()
    want = F.cross_entropy(x, y, reduction="none")
    torch.testing.assert_close(loss, want)
    g = x.grad.clone()
    x.grad = None
    want.sum().backward()
    torch.testing.assert_close(g, x.grad)


def test_softmax_and_log_softmax(rng):
    x = torch.tensor(make_logits(rng, (2, 5, 3, 4)), requires_grad=True)
    d = torch.tensor(rng.standard_normal((2, 5, 3, 4)))
    for ours, theirs in ((st.softmax, torch.softmax), (st.log_softmax, torch.log_softmax)):
        for dim in (1, -1):
            got, want = ours(x, dim), theirs(x, dim)
            torch.testing.assert_close(got, want)
            torch.testing.assert_close(torch.autograd.grad(got, x, d)[0],
                                       torch.autograd.grad(want, x, d)[0])
    with pytest.raises(ValueError, match=r"^dim: 2 is neither 1 nor the last dimension"):
        st.softmax(x, 2)


def test_training_loop_matches_torch(rng):
    # 20 SGD steps of a small segmentation head: the same losses with either loss function.
    feats = torch.tensor(make_logits(rng, (4, 8, 16, 16), np.float32))
    y = torch.tensor(make_labels(rng, (4, 16, 16), 6, ignore_index=255))
    losses = {}
    for name, fn in (("torch", F.cross_entropy), ("ssm", st.cross_entropy)):
        torch.manual_seed(0)
        head = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU(),
                                   torch.nn.Conv2d(16, 6, 1))
        opt = torch.optim.SGD(head.parameters(), lr=0.5, momentum=0.9)
        losses[name] = []
        for _ in range(20):
            opt.zero_grad()
            loss = fn(head(feats), y, ignore_index=255)
            loss.backward()
            opt.step()
            losses[name].append(loss.item())
    assert losses["torch"][-1] < 0.8 * losses["torch"][0]
    np.testing.assert_allclose(losses["ssm"], losses["torch"], rtol=1e-4)


def test_errors():
    x = torch.zeros(2, 3, 4)
    y = torch.zeros(2, 4, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"^reduction: 'batch' is not one of 'mean', 'sum', "):
        st.cross_entropy(x, y, reduction="batch")
    with pytest.raises(ValueError, match=r"^input: a 0-d tensor"):
        st.cross_entropy(torch.tensor(1.0), y)
    with pytest.raises(TypeError, match=r"^target: expected a torch\.Tensor, got ndarray"):
        st.cross_entropy(x, np.zeros((2, 4), np.int64))
    with pytest.raises(ValueError, match=r"^target: probability targets that require grad"):
        st.cross_entropy(x, torch.zeros(2, 3, 4, requires_grad=True))
    with pytest.raises(ValueError, match=r"^target: label 7 at index \(0, 0\)"):
        st.cross_entropy(x, torch.full((2, 4), 7))
    with pytest.raises(ValueError, match=r"^target: int64 labels of shape \(2, 5\)"):
        st.cross_entropy(x, torch.zeros(2, 5, dtype=torch.int64))


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("soft", [False, True], ids=["labels", "probs"])
def test_channels_last_is_read_in_place(rng, monkeypatch, reduction, soft):
    x = torch.tensor(make_logits(rng, (2, 5, 3, 4))).to(memory_format=torch.channels_last)
    t = (torch.tensor(make_soft_targets(rng, (2, 5, 3, 4))) if soft
         else torch.tensor(make_labels(rng, (2, 3, 4), 5, ignore_index=-100)))
    seen = []
    fused = ssm.spatial_softmax_with_loss_and_grad
    monkeypatch.setattr(ssm, "spatial_softmax_with_loss_and_grad",
                        lambda *a, **k: seen.append((a[0], k["layout"])) or fused(*a, **k))
    d = torch.tensor(rng.random((2, 3, 4)) if reduction == "none" else 0.5)
    loss, grad = _loss_and_grad(st.cross_entropy, x, t, d, reduction=reduction)
    view = seen[0][0]  # the (N, H, W, C) view of x's memory (a NumPy array), not a copy
    assert view.shape == (2, 3, 4, 5) and view.flags.c_contiguous
    assert [layout for _, layout in seen] == ["NHWC"]
    want_loss, want_grad = _loss_and_grad(F.cross_entropy, x, t, d, reduction=reduction)
    torch.testing.assert_close(loss, want_loss)
    torch.testing.assert_close(grad, want_grad)
    assert grad.is_contiguous(memory_format=torch.channels_last)


def test_a_step_allocates_the_gradient_once(rng):
    # NumPy buffers are traced by tracemalloc: forward allocates the gradient (and nothing
    # else of the logits' size), backward hands it on without a copy.
    import tracemalloc
    x = torch.tensor(make_logits(rng, (4, 5, 64, 64), np.float32), requires_grad=True)
    y = torch.tensor(make_labels(rng, (4, 64, 64), 5, ignore_index=-100))
    st.cross_entropy(x, y).backward()  # warm
    x.grad = None
    tracemalloc.start()
    loss = st.cross_entropy(x, y)
    _, forward_peak = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    loss.backward()
    _, backward_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert x.nbytes <= forward_peak < x.nbytes + 64 * 1024
    assert backward_peak < x.nbytes + 64 * 1024  # the gradient, still held; no new copy


@pytest.mark.parametrize("kw", [{}, dict(label_smoothing=0.1, weight=True),
                                dict(reduction="sum"), dict(reduction="none")])
def test_torch_func_grad(rng, kw):
    x = torch.tensor(make_logits(rng, (2, 5, 6, 7), np.float64))
    y = torch.tensor(make_labels(rng, (2, 6, 7), 5, ignore_index=-100))
    if kw.get("weight"):
        kw = dict(kw, weight=torch.rand(5, dtype=torch.float64))
    g, loss = torch.func.grad_and_value(lambda v: st.cross_entropy(v, y, **kw).sum())(x)
    g2, loss2 = torch.func.grad_and_value(lambda v: F.cross_entropy(v, y, **kw).sum())(x)
    torch.testing.assert_close(loss, loss2)
    torch.testing.assert_close(g, g2)


def test_several_losses_a_step_each_reuse_their_memory(rng):
    # a main and an auxiliary loss (two leaves, two sizes) in turn: after the first step
    # each writes into its own kept block; up to KEEP_BLOCKS of them
    shapes = [(2, 10, 128, 128), (2, 10, 64, 128)]  # float64: 2.5 and 1.25 MiB
    xs = [torch.tensor(make_logits(rng, s, np.float64), requires_grad=True)
          for s in shapes]
    ys = [torch.tensor(make_labels(rng, (2,) + s[2:], 10, ignore_index=-100)) for s in shapes]
    assert all(x.numel() * 8 >= st.REUSE_BYTES for x in xs)
    assert len(xs) <= st.KEEP_BLOCKS

    def step():
        ptrs = []
        for x, y in zip(xs, ys):
            x.grad = None
            st.cross_entropy(x, y).backward()
            ptrs.append(x.grad.data_ptr())
        return ptrs

    first = step()
    assert step() == first and step() == first
    for x, y in zip(xs, ys):
        x2 = x.detach().clone().requires_grad_()
        F.cross_entropy(x2, y).backward()
        torch.testing.assert_close(x.grad, x2.grad)


def test_the_gradient_memory_is_reused_only_once_nothing_uses_it(rng):
    # CPU gradients of REUSE_BYTES and more: a step whose gradient was dropped reuses its
    # memory (no page faults for a fresh block); one still used anywhere (held, a view, a
    # .grad) is never written again.
    shape = (2, 5, 128, 128)  # float64: 1.25 MiB
    x = torch.tensor(make_logits(rng, shape, np.float64), requires_grad=True)
    assert x.numel() * 8 >= st.REUSE_BYTES
    ys = [torch.tensor(make_labels(rng, (2, 128, 128), 5, ignore_index=-100)) for _ in range(4)]

    def step(y):
        x.grad = None
        st.cross_entropy(x, y).backward()
        return x.grad

    def expected(y):
        x2 = x.detach().clone().requires_grad_()
        F.cross_entropy(x2, y).backward()
        return x2.grad

    first = step(ys[0]).data_ptr()
    assert step(ys[1]).data_ptr() == first  # dropped, then reused
    held = step(ys[2])
    held_copy = held.clone()
    view = held[1]  # a view of it, too
    torch.testing.assert_close(held, expected(ys[2]))
    again = step(ys[3])
    assert again.data_ptr() != held.data_ptr()
    torch.testing.assert_close(held, held_copy, rtol=0, atol=0)  # untouched
    torch.testing.assert_close(again, expected(ys[3]))
    del held
    current = step(ys[0])
    current_copy = current.clone()
    torch.testing.assert_close(view, held_copy[1], rtol=0, atol=0)  # the view survives
    del view  # an older block's last user goes while the current one is still used
    step(ys[1])
    torch.testing.assert_close(current, current_copy, rtol=0, atol=0)
    del current, again
    kept = step(ys[2]).data_ptr()
    assert step(ys[3]).data_ptr() == kept  # and reuse resumes


def test_a_dropped_or_scaled_step_frees_its_gradient_at_once(rng):
    # No reference cycle holds a step's gradient: a loss dropped without backward, and a
    # backward through a scaled loss (a gradient scaler's), free it without the cyclic
    # garbage collector, so that the next step writes into the same memory.
    import gc
    x = torch.tensor(make_logits(rng, (2, 5, 128, 128), np.float64), requires_grad=True)
    y = torch.tensor(make_labels(rng, (2, 128, 128), 5, ignore_index=-100))
    st.cross_entropy(x, y).backward()
    first = x.grad.data_ptr()
    want = x.grad.clone()
    gc.disable()
    try:
        x.grad = None
        st.cross_entropy(x, y)  # dropped, no backward
        st.cross_entropy(x, y).backward()
        assert x.grad.data_ptr() == first
        x.grad = None
        (2.5 * st.cross_entropy(x, y)).backward()
        torch.testing.assert_close(x.grad, 2.5 * want)
        x.grad = None
        st.cross_entropy(x, y).backward()
        assert x.grad.data_ptr() == first
    finally:
        gc.enable()
    torch.testing.assert_close(x.grad, want)


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
def test_no_silent_second_derivative(rng):
    # create_graph=True: the gradient is joined to the logits' graph by a backward that
    # raises, so a gradient penalty through it fails loudly instead of losing its term
    x = torch.tensor(make_logits(rng, (2, 5, 3), np.float64), requires_grad=True)
    y = torch.tensor(rng.integers(0, 5, (2, 3)))
    loss = st.cross_entropy(x, y)
    (g,) = torch.autograd.grad(loss, x, create_graph=True)
    (want,) = torch.autograd.grad(torch.nn.functional.cross_entropy(x, y), x)
    assert g.requires_grad and float((g.detach() - want).abs().max()) < 1e-15
    with pytest.raises(RuntimeError, match=r"^ssm.torch.cross_entropy: its gradient is not "
                                           r"differentiable \(no double backward\)"):
        (st.cross_entropy(x, y) + (g ** 2).sum()).backward()
    x.grad = None
    st.cross_entropy(x, y).backward(create_graph=True)  # first order alone: fine
    assert x.grad.requires_grad and float((x.grad.detach() - want).abs().max()) < 1e-15
    with pytest.raises(RuntimeError, match=r"^ssm.torch.cross_entropy: its gradient is not"):
        x.grad.sum().backward()
    x.grad = None
    st.cross_entropy(x, y).backward()  # without create_graph: no graph, as before
    assert not x.grad.requires_grad
