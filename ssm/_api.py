"""The public functions of ssm: validate, normalise, allocate, dispatch.

Each function picks its backend once from its array arguments (``_backend``: NumPy
arrays run on the CPU through ``_cpu``, CuPy arrays (or simulated ones) on their GPU
through ``_gpu``; both modules have the same ``run``, ``stats`` and ``loss_value``),
validates all of
its arguments through ``_validation`` before any kernel runs (so an error never leaves
an ``out=`` buffer half written), views the logits as ``(outer, C, inner)`` (see
``_validation.geometry``), allocates missing outputs and calls one kernel pass
(``run``), preceded for the loss functions by the label pre-pass (``stats``) when the
labels must be checked or the "mean" normaliser counted. On the GPU the normaliser,
the gradient scale and the loss stay on the device: the only device-to-host read is
the first bad label's index, with ``validate=True``.
"""
from __future__ import annotations

import contextlib
import math
import numbers
from typing import NamedTuple

from . import _cpu, _threads
from . import _validation as V
from ._interop import accepts_dlpack

_LOSS_CAP_NONE = math.inf


def _backend(*named):
    """(backend module, device context) of one call, from its (name, argument) pairs.

    Any device array (CuPy, or simulated: ssm.testing.cudasim) makes it the GPU of that
    array; a NumPy array (or a list) beside it is a TypeError naming that argument, as is a
    device array of the other library; device arrays on different devices are a ValueError.
    """
    gpu = [(name, a) for name, a in named if V.is_device_array(a)]
    if not gpu:
        return _cpu, contextlib.nullcontext()
    first, xp = gpu[0], V.array_module(gpu[0][1])
    for name, a in named:
        if a is not None and not isinstance(a, numbers.Number) and (
                not V.is_device_array(a) or V.array_module(a) is not xp):
            where = "on the host" if not V.is_device_array(a) else "of another library"
            raise TypeError(f"{name}: a {V.type_name(a)} {where} cannot be mixed with "
                            f"{first[0]}, a {V.type_name(first[1])}; pass arrays of one "
                            f"library on one device")
    devices = {a.device.id for _, a in gpu}
    if len(devices) > 1:
        raise ValueError(f"{gpu[-1][0]}: the device arrays are on devices {sorted(devices)}; "
                         f"expected one device")
    from . import _gpu
    return _gpu, gpu[0][1].device


# ---- softmax ------------------------------------------------------------------

def _softmax(x, layout, out, threads, op):
    B, device = _backend(("x", x), ("out", out))
    with device:
        layout = V.check_choice(layout, "layout", V.LAYOUTS)
        x = V.check_float_array(x, "x")
        g = V.geometry(x, "x", layout)
        out = V.check_out(out, "out", x.shape, x.dtype, [("x", x)])
        nt = _threads.resolve(threads)
        if out is None:
            out = V.array_module(x).empty_like(x)
        B.run(op, x, out, g.outer, g.C, g.inner, g.tile, nt, stream=g.stream)
        return out


@accepts_dlpack
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


@accepts_dlpack
def log_softmax(x, *, layout="NCHW", out=None, threads=None):
    """Log-softmax over the class axis: ``x - m - log(sum_k exp(x_k - m))``.

    Same parameters as :func:`softmax`.
    """
    return _softmax(x, layout, out, threads, _cpu.LOG_SOFTMAX)


@accepts_dlpack
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
    B, device = _backend(("prob", prob), ("dprob", dprob), ("out", out))
    with device:
        layout = V.check_choice(layout, "layout", V.LAYOUTS)
        prob = V.check_float_array(prob, "prob")
        dprob = V.check_same(dprob, "dprob", prob, "prob")
        g = V.geometry(prob, "prob", layout)
        out = V.check_out(out, "out", prob.shape, prob.dtype,
                          [("prob", prob), ("dprob", dprob)])
        nt = _threads.resolve(threads)
        if out is None:
            out = V.array_module(prob).empty_like(prob)
        B.run(B.SOFTMAX_BWD, prob, out, g.outer, g.C, g.inner, g.tile, nt, x2=dprob,
              stream=g.stream)
        return out


# ---- softmax with loss ----------------------------------------------------------

class _Loss(NamedTuple):
    """A validated loss problem: arrays contiguous and typed, options checked."""

    B: object  # the backend module, _cpu or _gpu
    x: object
    geom: V.Geometry
    target: object
    kind: int
    weights: object
    class_weights: object
    lens: object
    smoothing: float
    ignore_index: int
    reduction: str
    validate: bool
    threads: tuple  # (count, adaptive), from _threads.resolve

    def out_buffer(self, out, x_name, d_loss_map=None):
        """The caller's ``out=`` for an array like x (checked: shape, dtype, writeable,
        no overlap with any input, the ``d_loss`` map included), or a new one."""
        inputs = [(x_name, self.x), ("target", self.target), ("weights", self.weights),
                  ("class_weights", self.class_weights), ("lens", self.lens),
                  ("d_loss", d_loss_map)]
        out = V.check_out(out, "out", self.geom.shape, self.x.dtype, inputs)
        return V.array_module(self.x).empty_like(self.x) if out is None else out

    def kernel_args(self):
        return dict(target=self.target, target_kind=self.kind, ignore_index=self.ignore_index,
                    w=self.weights, cw=self.class_weights, lens=self.lens,
                    smoothing=self.smoothing, stream=self.geom.stream)


def _loss_problem(x, x_name, target, weights, ignore_index, class_weights, lens,
                  label_smoothing, reduction, layout, validate, threads, B) -> _Loss:
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
    return _Loss(B, x, geom, target, kind, weights, class_weights, lens, smoothing, ignore_index,
                 reduction, validate, _threads.resolve(threads))


def _divisor(L: _Loss):
    """What the summed loss is divided by, after the label pre-pass has checked the labels.

    Raises the bad-label ValueError here, before any output is written. On the GPU the
    "mean" normaliser is a 0-d device array; reading the bad label's index
    (``int(bad)``, with ``validate=True``) is the call's one synchronisation.
    """
    g = L.geom
    need_norm = L.reduction == "mean"
    if L.kind == V.SOFT_KIND and L.weights is None:
        norm = float(g.n_pixels)
    elif need_norm or (L.validate and L.kind != V.SOFT_KIND):
        norm, bad = L.B.stats(L.x, L.target, L.kind, L.ignore_index, L.weights,
                              L.class_weights, g.outer, g.C, g.inner, g.tile, L.threads)
        if L.validate and L.kind != V.SOFT_KIND:
            bad = int(bad)
            if bad >= 0:
                raise V.bad_label_error(L.target, bad, g.C, L.ignore_index)
    else:
        norm = 0.0
    if L.reduction == "mean":
        return norm
    return float(g.N) if L.reduction == "batch" else 1.0


def _reduce(L: _Loss, total, divisor, loss_map):
    if L.reduction == "none":
        return loss_map
    return L.B.loss_value(total, divisor, L.x.dtype)


def _sswl_forward(logits, target, weights=None, *, ignore_index=-1, class_weights=None,
                  lens=None, label_smoothing=0.0, reduction="mean", layout="NCHW",
                  validate=True, out=None, threads=None, loss_cap=_LOSS_CAP_NONE):
    B, device = _backend(("logits", logits), ("target", target), ("weights", weights),
                         ("out", out))
    with device:
        L = _loss_problem(logits, "logits", target, weights, ignore_index, class_weights, lens,
                          label_smoothing, reduction, layout, validate, threads, B)
        g, xp = L.geom, V.array_module(L.x)
        prob = L.out_buffer(out, "logits")
        divisor = _divisor(L)
        loss_map = xp.empty(g.pixel_shape, L.x.dtype) if L.reduction == "none" else None
        total = B.run(B.SSWL_FWD, L.x, prob, g.outer, g.C, g.inner, g.tile, L.threads,
                      loss_cap=loss_cap, loss_map=loss_map, **L.kernel_args())
        return prob, _reduce(L, total, divisor, loss_map)


@accepts_dlpack
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


@accepts_dlpack
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
    B, device = _backend(("prob", prob), ("target", target), ("weights", weights),
                         ("d_loss", d_loss), ("out", out))
    with device:
        L = _loss_problem(prob, "prob", target, weights, ignore_index, class_weights, lens,
                          label_smoothing, reduction, layout, validate, threads, B)
        g = L.geom
        d, dmap = V.check_d_loss(d_loss, L.reduction, g, L.x.dtype)
        dx = L.out_buffer(out, "prob", dmap)
        divisor = _divisor(L)
        B.run(B.SSWL_BWD, L.x, dx, g.outer, g.C, g.inner, g.tile, L.threads,
              g=dmap, g_scale=d, g_norm=divisor, **L.kernel_args())
        return dx


@accepts_dlpack
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
    B, device = _backend(("logits", logits), ("target", target), ("weights", weights),
                         ("d_loss", d_loss), ("out", out))
    with device:
        L = _loss_problem(logits, "logits", target, weights, ignore_index, class_weights, lens,
                          label_smoothing, reduction, layout, validate, threads, B)
        g, xp = L.geom, V.array_module(L.x)
        return_prob = V.check_flag(return_prob, "return_prob")
        d, dmap = V.check_d_loss(d_loss, L.reduction, g, L.x.dtype)
        dx = L.out_buffer(out, "logits", dmap)
        divisor = _divisor(L)
        prob = xp.empty_like(L.x) if return_prob else None
        loss_map = xp.empty(g.pixel_shape, L.x.dtype) if L.reduction == "none" else None
        total = B.run(B.SSWL_FWD_BWD, L.x, dx, g.outer, g.C, g.inner, g.tile, L.threads,
                      g=dmap, g_scale=d, g_norm=divisor, out2=prob, loss_map=loss_map,
                      **L.kernel_args())
        loss = _reduce(L, total, divisor, loss_map)
        return (loss, dx, prob) if return_prob else (loss, dx)
