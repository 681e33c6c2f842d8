"""ssm against torch.nn.functional.cross_entropy (float64, loss and autograd gradient)."""

import numpy as np
import pytest

import _reference as ref
import ssm
from conftest import (assert_close, make_class_weights, make_labels, make_logits,
                      make_soft_targets, require_module)

torch = require_module("torch", "torch")
F = torch.nn.functional

SHAPES = [(4, 5), (2, 5, 7), (2, 5, 3, 4), (2, 3, 2, 3, 4)]
CASES = {
    # name: (soft targets, ignore_index, class weights, label_smoothing)
    "plain": (False, -100, False, 0.0),
    "ignore_-1": (False, -1, False, 0.0),
    "ignore_real_class": (False, 2, False, 0.0),
    "weight": (False, -100, True, 0.0),
    "smoothing": (False, -100, False, 0.2),
    "weight_smoothing_ignore": (False, -1, True, 0.3),
    "full_smoothing": (False, -100, True, 1.0),
    "probs": (True, None, False, 0.0),
    "probs_weight_smoothing": (True, None, True, 0.25),
}


def torch_loss_and_grad(x, target, d_loss, *, class_weights, ignore_index, label_smoothing,
                        reduction):
    xt = torch.tensor(x, requires_grad=True)
    kwargs = {"reduction": reduction, "label_smoothing": label_smoothing}
    if class_weights is not None:
        kwargs["weight"] = torch.tensor(class_weights)
    if ignore_index is not None:
        kwargs["ignore_index"] = ignore_index
    loss = F.cross_entropy(xt, torch.tensor(target), **kwargs)
    loss.backward(torch.as_tensor(d_loss, dtype=torch.float64).expand_as(loss))
    return loss.detach().numpy(), xt.grad.numpy()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{len(s)}d")
@pytest.mark.parametrize("case", list(CASES))
def test_cross_entropy_parity(rng, case, shape, reduction):
    soft, ignore_index, weighted, smoothing = CASES[case]
    N, C = shape[:2]
    pix = (N, *shape[2:])
    x = make_logits(rng, shape)
    if soft:
        target = make_soft_targets(rng, shape)
    elif ignore_index == 2:
        target = rng.integers(0, C, size=pix)
    else:
        target = make_labels(rng, pix, C, np.int64, ignore_index=ignore_index, ignore_frac=0.2)
    cw = make_class_weights(rng, C) if weighted else None
    d_loss = rng.random(pix) if reduction == "none" else 0.6

    tloss, tgrad = torch_loss_and_grad(x, target, d_loss, class_weights=cw,
                                       ignore_index=ignore_index, label_smoothing=smoothing,
                                       reduction=reduction)
    opts = {"class_weights": cw, "label_smoothing": smoothing, "reduction": reduction}
    if ignore_index is not None:
        opts["ignore_index"] = ignore_index
    scale = np.max(ref.sswl_loss_scale(x, target, **opts))
    prob, loss = ssm.spatial_softmax_with_loss(x, target, **opts)
    assert loss.shape == tloss.shape
    assert_close(loss, tloss, np.float64, scale=scale)
    gscale = np.abs(tgrad).max()
    g = ssm.spatial_softmax_with_loss_grad(prob, target, None, d_loss, **opts)
    assert_close(g, tgrad, np.float64, scale=gscale)
    floss, fg = ssm.spatial_softmax_with_loss_and_grad(x, target, None, d_loss, **opts)
    assert_close(floss, tloss, np.float64, scale=scale)
    assert_close(fg, tgrad, np.float64, scale=gscale)
    assert_close(prob, torch.softmax(torch.tensor(x), 1).numpy(), np.float64, scale=1e-6)
    assert_close(ssm.log_softmax(x), torch.log_softmax(torch.tensor(x), 1).numpy(), np.float64,
                 scale=10)


@pytest.mark.parametrize("shape", [(2, 5, 3, 4), (3, 4)])
def test_softmax_backward_parity(rng, shape):
    x = make_logits(rng, shape)
    dprob = rng.standard_normal(shape)
    xt = torch.tensor(x, requires_grad=True)
    p = torch.softmax(xt, 1)
    p.backward(torch.tensor(dprob))
    ours = ssm.softmax_grad(ssm.softmax(x), dprob)
    assert_close(ours, xt.grad.numpy(), np.float64, scale=np.abs(dprob).max())


@pytest.mark.parametrize("weighted", [False, True])
def test_all_ignored_mean_torch_nan_ssm_zero(rng, weighted):
    x = make_logits(rng, (2, 5, 3, 4))
    y = np.full((2, 3, 4), -100, np.int64)
    cw = make_class_weights(rng, 5) if weighted else None
    tloss, _ = torch_loss_and_grad(x, y, 1.0, class_weights=cw, ignore_index=-100,
                                   label_smoothing=0.0, reduction="mean")
    assert np.isnan(tloss)  # PyTorch: 0 / 0
    _, loss = ssm.spatial_softmax_with_loss(x, y, ignore_index=-100, class_weights=cw)
    assert loss == 0  # ssm (Caffe2): 0 when the normaliser is 0
    floss, g = ssm.spatial_softmax_with_loss_and_grad(x, y, ignore_index=-100, class_weights=cw)
    assert floss == 0 and np.all(g == 0)
    # "sum" agrees: 0 on both sides
    tsum, _ = torch_loss_and_grad(x, y, 1.0, class_weights=cw, ignore_index=-100,
                                  label_smoothing=0.0, reduction="sum")
    _, ssum = ssm.spatial_softmax_with_loss(x, y, ignore_index=-100, class_weights=cw,
                                            reduction="sum")
    assert tsum == 0 and ssum == 0


def test_batch_reduction_is_sum_over_n(rng):
    # torch has no "batch" reduction: it is torch's "sum" divided by N.
    x = make_logits(rng, (3, 5, 4, 2))
    y = make_labels(rng, (3, 4, 2), 5)
    tsum, tgrad = torch_loss_and_grad(x, y, 1.0, class_weights=None, ignore_index=-1,
                                      label_smoothing=0.1, reduction="sum")
    loss, g = ssm.spatial_softmax_with_loss_and_grad(x, y, label_smoothing=0.1, reduction="batch")
    assert_close(loss, tsum / 3, np.float64, scale=10)
    assert_close(g, tgrad / 3, np.float64, scale=1)


# ---- loss="kl" against F.kl_div(log_softmax(x), t) ---------------------------------------

KL_REDUCTIONS = {"sum": "sum", "batch": "batchmean", "none": "none", "mean": "none"}


def torch_kl_and_grad(x, t, d_loss, reduction):
    """F.kl_div on log-probabilities, reduced as ssm reduces (its "none" map is summed over
    the class axis; ssm's "mean" over pixels is that map's mean), and its gradient."""
    xt = torch.tensor(x, requires_grad=True)
    loss = F.kl_div(F.log_softmax(xt, dim=1), torch.tensor(t), reduction=KL_REDUCTIONS[reduction])
    if reduction in ("none", "mean"):
        loss = loss.sum(dim=1)
        if reduction == "mean":
            loss = loss.mean()
    loss.backward(torch.as_tensor(d_loss, dtype=torch.float64).expand_as(loss))
    return loss.detach().numpy(), xt.grad.numpy()


@pytest.mark.parametrize("reduction", ["mean", "sum", "batch", "none"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{len(s)}d")
@pytest.mark.parametrize("case", ["probs", "probs_with_zeros", "lens"])
def test_kl_div_parity(rng, case, shape, reduction):
    N, C = shape[:2]
    pix = (N, *shape[2:])
    x = make_logits(rng, shape)
    if case == "lens":
        lens = rng.random((C, C)) ** 2
        lens[:, 0] = 0  # zeros in the target: 0 log 0 = 0
        lens /= lens.sum(axis=1, keepdims=True)
        target = rng.integers(0, C, size=pix)
        t = np.moveaxis(lens[target], -1, 1)
        opts = {"lens": lens}
    else:
        t = make_soft_targets(rng, shape)
        if case == "probs_with_zeros":
            t[:, 1] = 0
            t /= t.sum(axis=1, keepdims=True)
        target, opts = t, {}
    d_loss = rng.random(pix) if reduction == "none" else 0.6
    tloss, tgrad = torch_kl_and_grad(x, t, d_loss, reduction)
    loss, grad = ssm.spatial_softmax_with_loss_and_grad(x, target, None, d_loss, loss="kl",
                                                        reduction=reduction, **opts)
    alone = ssm.cross_entropy(x, target, loss="kl", reduction=reduction, **opts)
    scale = np.max(ref.sswl_loss_scale(x, target, reduction=reduction, loss="kl", **opts))
    assert_close(loss, tloss, np.float64, scale=scale)
    assert alone.tobytes() == loss.tobytes()
    assert_close(grad, tgrad, np.float64, scale=np.abs(tgrad).max())
