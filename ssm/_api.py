"""The public functions of ssm: validate, normalise, allocate, dispatch.

Each function validates all of its arguments through ``_validation`` before any
kernel runs (so an error never leaves an ``out=`` buffer half written), views the
logits as ``(outer, C, inner)`` (see ``_validation.geometry``), allocates missing
outputs with ``np.empty`` and calls one CPU kernel pass (``_cpu.run``), preceded for
the loss functions by the label pre-pass (``_cpu.stats``) when the labels must be
checked or the "mean" normaliser counted.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from . import _cpu, _threads
from . import _validation as V

_LOSS_CAP_NONE = math.inf


def _reject_gpu(*arrays):
    # The CuPy backend is a separate piece of work (ssm/_gpu.py); until it lands a CuPy
    # array must fail loudly rather than be copied to the host behind the user's back.
    for a in arrays:
        if V.is_cupy_array(a):
            raise NotImplementedError("ssm: CuPy arrays are not supported by this build yet; "
                                      "pass NumPy arrays")


# ---- softmax ------------------------------------------------------------------

def _softmax(x, layout, out, threads, op):
    _reject_gpu(x, out)
    layout = V.check_choice(layout, "layout", V.LAYOUTS)
    x = V.check_float_array(x, "x")
    g = V.geometry(x, "x", layout)
    out = V.check_out(out, "out", x.shape, x.dtype, (x,))
    nt = _threads.resolve(threads)
    if out is None:
        out = np.empty_like(x)
    _cpu.run(op, x, out, g.outer, g.C, g.inner, g.tile, nt)
    return out


def softmax(x, *, layout="NCHW", out=None, threads=None):
    """Softmax over the class axis.

    ``prob[n, c, p] = exp(x[n, c, p] - m) / sum_k exp(x[n, k, p] - m)``, ``m`` the
    pixel's largest logit.

    Parameters
    ----------
    x : ndarray, float32 or float64, ``(N, C, *spatial)`` (NCHW) or ``(N, *spatial, C)`` (NHWC)
    layout : {"NCHW", "NHWC"}
    out : ndarray, optional
        C-contiguous buffer of x's shape and dtype to write the result into.
    threads : int, optional
        Number of CPU threads (default: ``ssm.get_num_threads()``).

    Returns
    -------
    prob : ndarray of x's shape and dtype
    """
    return _softmax(x, layout, out, threads, _cpu.SOFTMAX)


def log_softmax(x, *, layout="NCHW", out=None, threads=None):
    """Log-softmax over the class axis: ``x - m - log(sum_k exp(x_k - m))``.

    Same parameters as :func:`softmax`.
    """
    return _softmax(x, layout, out, threads, _cpu.LOG_SOFTMAX)


def softmax_grad(prob, dprob, *, layout="NCHW", out=None, threads=None):
    """Gradient of softmax: ``dx = prob * (dprob - sum_c prob * dprob)``.

    Parameters
    ----------
    prob : ndarray
        The output of :func:`softmax`.
    dprob : ndarray of prob's shape and dtype
        The gradient with respect to ``prob``.
    layout, out, threads
        As in :func:`softmax`.

    Returns
    -------
    dx : ndarray of prob's shape and dtype
    """
    _reject_gpu(prob, dprob, out)
    layout = V.check_choice(layout, "layout", V.LAYOUTS)
    prob = V.check_float_array(prob, "prob")
    dprob = V.check_same(dprob, "dprob", prob, "prob")
    g = V.geometry(prob, "prob", layout)
    out = V.check_out(out, "out", prob.shape, prob.dtype, (prob, dprob))
    nt = _threads.resolve(threads)
    if out is None:
        out = np.empty_like(prob)
    _cpu.run(_cpu.SOFTMAX_BWD, prob, out, g.outer, g.C, g.inner, g.tile, nt, x2=dprob)
    return out


# ---- softmax with loss ----------------------------------------------------------

class _Loss(NamedTuple):
    """A validated loss problem: arrays contiguous and typed, options checked."""

    x: np.ndarray
    geom: V.Geometry
    target: np.ndarray
    kind: int
    weights: np.ndarray | None
    class_weights: np.ndarray | None
    lens: np.ndarray | None
    smoothing: float
    ignore_index: int
    reduction: str
    validate: bool
    threads: int

    def kernel_args(self):
        return dict(target=self.target, target_kind=self.kind, ignore_index=self.ignore_index,
                    w=self.weights, cw=self.class_weights, lens=self.lens,
                    smoothing=self.smoothing)


def _loss_problem(x, x_name, target, weights, ignore_index, class_weights, lens,
                  label_smoothing, reduction, layout, validate, threads) -> _Loss:
    layout = V.check_choice(layout, "layout", V.LAYOUTS)
    reduction = V.check_choice(reduction, "reduction", V.REDUCTIONS)
    x = V.check_float_array(x, x_name)
    geom = V.geometry(x, x_name, layout)
    target, kind = V.check_target(target, geom, x, x_name)
    weights = V.check_weights(weights, geom, x.dtype)
    class_weights = V.check_class_weights(class_weights, geom.C, x.dtype)
    lens = V.check_lens(lens, geom.C, x.dtype, kind)
    smoothing = V.check_smoothing(label_smoothing)
    ignore_index = V.check_ignore_index(ignore_index)
    validate = V.check_flag(validate, "validate")
    return _Loss(x, geom, target, kind, weights, class_weights, lens, smoothing, ignore_index,
                 reduction, validate, _threads.resolve(threads))


def _divisor(L: _Loss) -> float:
    """What the summed loss is divided by, after the label pre-pass has checked the labels.

    Raises the bad-label ValueError here, before any output is written.
    """
    g = L.geom
    need_norm = L.reduction == "mean"
    if L.kind == V.SOFT_KIND and L.weights is None:
        norm = float(g.n_pixels)
    elif need_norm or (L.validate and L.kind != V.SOFT_KIND):
        norm, bad = _cpu.stats(L.x, L.target, L.kind, L.ignore_index, L.weights,
                               L.class_weights, g.outer, g.C, g.inner, g.tile, L.threads)
        if bad >= 0 and L.validate:
            raise V.bad_label_error(L.target, bad, g.C, L.ignore_index)
    else:
        norm = 0.0
    if L.reduction == "mean":
        return norm
    return float(g.N) if L.reduction == "batch" else 1.0


def _reduce(L: _Loss, total: float, divisor: float, loss_map):
    if L.reduction == "none":
        return loss_map
    value = total / divisor if divisor != 0 else 0.0
    return np.asarray(value, dtype=L.x.dtype)


def _sswl_forward(logits, target, weights=None, *, ignore_index=-1, class_weights=None,
                  lens=None, label_smoothing=0.0, reduction="mean", layout="NCHW",
                  validate=True, out=None, threads=None, loss_cap=_LOSS_CAP_NONE):
    _reject_gpu(logits, target, weights, out)
    L = _loss_problem(logits, "logits", target, weights, ignore_index, class_weights, lens,
                      label_smoothing, reduction, layout, validate, threads)
    g = L.geom
    out = V.check_out(out, "out", g.shape, L.x.dtype, (L.x, L.target, L.weights))
    divisor = _divisor(L)
    prob = np.empty_like(L.x) if out is None else out
    loss_map = np.empty(g.pixel_shape, L.x.dtype) if L.reduction == "none" else None
    total = _cpu.run(_cpu.SSWL_FWD, L.x, prob, g.outer, g.C, g.inner, g.tile, L.threads,
                     loss_cap=loss_cap, loss_map=loss_map, **L.kernel_args())
    return prob, _reduce(L, total, divisor, loss_map)


def spatial_softmax_with_loss(logits, target, weights=None, *, ignore_index=-1,
                              class_weights=None, lens=None, label_smoothing=0.0,
                              reduction="mean", layout="NCHW", validate=True, out=None,
                              threads=None):
    """Softmax over the class axis and the cross-entropy loss against ``target``.

    Per pixel ``p`` with ``q = softmax(logits[p])`` and target distribution ``t``
    (one-hot label, ``lens[label]``, smoothed, or the soft target itself),
    ``a_c = weights[p] * class_weights[c] * t_c`` and the pixel loss is
    ``l_p = -sum_c a_c log q_c``, computed from log-sum-exp.

    Parameters
    ----------
    logits : ndarray, float32 or float64, ``(N, C, *spatial)`` (NCHW) or ``(N, *spatial, C)``
    target : ndarray
        Integer labels ``(N, *spatial)`` (uint8, int32, int64), or soft targets with
        the logits' shape and dtype.
    weights : ndarray, optional
        Per-pixel weights ``(N, *spatial)``, logits' dtype.
    ignore_index : int
        Label whose pixels contribute no loss and no gradient (labels only).
    class_weights : array_like, optional
        ``(C,)`` weight of each class of the target distribution.
    lens : array_like, optional
        ``(C, C)`` confusion lens; label ``y`` has the target distribution ``lens[y]``.
    label_smoothing : float in [0, 1]
        ``t = (1 - e) * t + e / C``.
    reduction : {"mean", "sum", "batch", "none"}
        ``mean``: ``sum(l) / sum(n_p)`` with ``n_p = weights[p] * class_weights[label]``
        (``weights[p]`` for soft targets) over non-ignored pixels, 0 when that sum is 0;
        ``sum``; ``batch``: ``sum(l) / N``; ``none``: the ``(N, *spatial)`` loss map.
    layout : {"NCHW", "NHWC"}
    validate : bool
        Check that every label is in ``[0, C)`` or ``ignore_index`` (ValueError naming
        the first bad one). With False a bad label's pixel loss is NaN.
    out : ndarray, optional
        Buffer for ``prob``.
    threads : int, optional

    Returns
    -------
    prob : ndarray of the logits' shape and dtype
    loss : 0-d ndarray of the logits' dtype, or the loss map for ``reduction="none"``.
    """
    return _sswl_forward(logits, target, weights, ignore_index=ignore_index,
                         class_weights=class_weights, lens=lens,
                         label_smoothing=label_smoothing, reduction=reduction, layout=layout,
                         validate=validate, out=out, threads=threads)


def spatial_softmax_with_loss_grad(prob, target, weights=None, d_loss=1.0, *, ignore_index=-1,
                                   class_weights=None, lens=None, label_smoothing=0.0,
                                   reduction="mean", layout="NCHW", validate=True, out=None,
                                   threads=None):
    """Gradient of :func:`spatial_softmax_with_loss` with respect to the logits.

    ``dlogits = d_loss * (sum_c a_c * q - a) / norm`` with ``q = prob`` and ``norm``
    the reduction's divisor. Parameters as in :func:`spatial_softmax_with_loss`, plus:

    Parameters
    ----------
    prob : ndarray
        The probabilities from the forward pass.
    d_loss : float or ndarray
        Gradient of the reduced loss (a number); for ``reduction="none"`` also an
        ``(N, *spatial)`` map.
    out : ndarray, optional
        Buffer for ``dlogits``.

    Returns
    -------
    dlogits : ndarray of prob's shape and dtype
    """
    _reject_gpu(prob, target, weights, d_loss, out)
    L = _loss_problem(prob, "prob", target, weights, ignore_index, class_weights, lens,
                      label_smoothing, reduction, layout, validate, threads)
    g = L.geom
    out = V.check_out(out, "out", g.shape, L.x.dtype, (L.x, L.target, L.weights))
    d, dmap = V.check_d_loss(d_loss, L.reduction, g, L.x.dtype)
    divisor = _divisor(L)
    scale = d / divisor if divisor != 0 else 0.0
    dx = np.empty_like(L.x) if out is None else out
    _cpu.run(_cpu.SSWL_BWD, L.x, dx, g.outer, g.C, g.inner, g.tile, L.threads,
             g=dmap, g_scale=scale, **L.kernel_args())
    return dx


def spatial_softmax_with_loss_and_grad(logits, target, weights=None, d_loss=1.0, *,
                                       ignore_index=-1, class_weights=None, lens=None,
                                       label_smoothing=0.0, reduction="mean", layout="NCHW",
                                       validate=True, return_prob=False, out=None,
                                       threads=None):
    """Loss and gradient in one pass: reads the logits once, writes the gradient once.

    Parameters as in :func:`spatial_softmax_with_loss_grad` (with ``logits`` in place
    of ``prob``), plus ``return_prob``: also return the probabilities.

    Returns
    -------
    loss : 0-d ndarray, or the loss map for ``reduction="none"``
    dlogits : ndarray of the logits' shape and dtype (written into ``out`` if given)
    prob : ndarray, only with ``return_prob=True``
    """
    _reject_gpu(logits, target, weights, d_loss, out)
    L = _loss_problem(logits, "logits", target, weights, ignore_index, class_weights, lens,
                      label_smoothing, reduction, layout, validate, threads)
    g = L.geom
    return_prob = V.check_flag(return_prob, "return_prob")
    out = V.check_out(out, "out", g.shape, L.x.dtype, (L.x, L.target, L.weights))
    d, dmap = V.check_d_loss(d_loss, L.reduction, g, L.x.dtype)
    divisor = _divisor(L)
    scale = d / divisor if divisor != 0 else 0.0
    dx = np.empty_like(L.x) if out is None else out
    prob = np.empty_like(L.x) if return_prob else None
    loss_map = np.empty(g.pixel_shape, L.x.dtype) if L.reduction == "none" else None
    total = _cpu.run(_cpu.SSWL_FWD_BWD, L.x, dx, g.outer, g.C, g.inner, g.tile, L.threads,
                     g=dmap, g_scale=scale, out2=prob, loss_map=loss_map, **L.kernel_args())
    loss = _reduce(L, total, divisor, loss_map)
    return (loss, dx, prob) if return_prob else (loss, dx)
