"""The public functions of ssm: validate, normalise, allocate, dispatch.

Each function picks its backend once from its array arguments (``_backend``: NumPy
arrays run on the CPU through ``_cpu``, CuPy arrays (or simulated ones) on their GPU
through ``_gpu``; both modules have the same ``run``, ``run_loss``, ``run_checked``,
``stats`` and ``loss_value``),
validates all of
its arguments through ``_validation`` before any kernel runs (so an error never leaves
an ``out=`` buffer half written), views the logits as ``(outer, C, inner)`` (see
``_validation.geometry``), allocates missing outputs, describes the call as one
``_problem.Problem`` and calls one kernel pass (``run(op, problem, threads)``; for a
loss pass ``run_loss`` or ``run_checked``, which reduce its loss as well), with,
for the loss functions, the label pre-pass (``stats``) where the labels must be checked
or the "mean" normaliser counted: before the pass, or in it (``run_checked``) where the
outputs are the call's own and the pass does not need the normaliser, raising for a
bad label after it (``_loss_pass``). On the GPU the normaliser, the gradient scale and
the loss stay on the device: the only device-to-host read is the first bad label's
index, with ``validate=True``, after the call's launches unless the caller gave an
``out=`` buffer; the reduced loss comes from the loss pass's own final launch.
"""
from __future__ import annotations

import contextlib
import math
import numbers
from typing import NamedTuple

import numpy as np

from . import _cpu, _threads
from . import _validation as V
from ._codes import Op, Target
from ._interop import accepts_dlpack
from ._problem import Problem

_LOSS_CAP_NONE = math.inf
_HOST = contextlib.nullcontext()  # the CPU backend's device context (reusable: it does nothing)


def _backend(*named):
    """(backend module, device context) of one call, from its (name, argument) pairs.

    Any device array (CuPy, or simulated: ssm.testing.cudasim) makes it the GPU of that
    array; a NumPy array (or a list) beside it is a TypeError naming that argument, as is a
    device array of the other library; device arrays on different devices are a ValueError.
    """
    gpu = [(name, a) for name, a in named if V.is_device_array(a)]
    if not gpu:
        return _cpu, _HOST
    first, xp = gpu[0], V.array_module(gpu[0][1])
    for name, a in named:
        if name == "d_loss" and type(a) is np.ndarray and a.ndim == 0:
            continue  # a host scalar, as a number is (a 0-d array is never a loss map)
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
            out = V.empty_like(x)
        B.run(op, Problem(g, x, out=out), nt)
        return out


@accepts_dlpack
def softmax(x, *, layout="NCHW", out=None, threads=None):
    """Softmax over the class axis.

    ``prob[n, c, p] = exp(x[n, c, p] - m) / sum_k exp(x[n, k, p] - m)``, ``m`` the
    pixel's largest logit.

    Parameters
    ----------
    x : ndarray, float16, bfloat16 (computed in float32), float32 or float64
        ``(N, C, *spatial)`` (NCHW) or ``(N, *spatial, C)`` (NHWC)
    layout : {"NCHW", "NHWC"}
    out : ndarray, optional
        C-contiguous buffer of x's shape and dtype to write the result into.
    threads : int, optional
        Number of CPU threads (default: ``ssm.get_num_threads()``).

    Returns
    -------
    prob : ndarray of x's shape and dtype
    """
    return _softmax(x, layout, out, threads, Op.SOFTMAX)


@accepts_dlpack
def log_softmax(x, *, layout="NCHW", out=None, threads=None):
    """Log-softmax over the class axis: ``x - m - log(sum_k exp(x_k - m))``.

    Same parameters as :func:`softmax`.
    """
    return _softmax(x, layout, out, threads, Op.LOG_SOFTMAX)


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
            out = V.empty_like(prob)
        B.run(Op.SOFTMAX_BWD, Problem(g, prob, dprob, out=out), nt)
        return out


# ---- softmax with loss ----------------------------------------------------------

class _LossCall(NamedTuple):
    """A validated loss call: the problem's inputs (outputs not yet allocated) and what
    the API decides above the backend."""

    B: object             # the backend module, _cpu or _gpu
    problem: Problem      # inputs validated; outputs, d_loss and divisor still to come
    reduction: str
    validate: bool
    threads: tuple        # (count, adaptive), from _threads.resolve

    def out_buffer(self, out, x_name, d_loss_map=None):
        """The caller's ``out=`` for an array like x (checked: shape, dtype, writeable,
        no overlap with any input, the ``d_loss`` map included), or a new one."""
        P = self.problem
        inputs = [(x_name, P.x), ("target", P.target), ("weights", P.weights),
                  ("class_weights", P.class_weights), ("lens", P.lens),
                  ("d_loss", d_loss_map)]
        out = V.check_out(out, "out", P.geom.shape, P.x.dtype, inputs)
        return V.empty_like(P.x) if out is None else out


def _loss_call(B, x, x_name, target, weights, *, ignore_index, class_weights, lens,
               label_smoothing, reduction, layout, validate, threads,
               loss="cross_entropy") -> _LossCall:
    layout = V.check_choice(layout, "layout", V.LAYOUTS)
    reduction = V.check_choice(reduction, "reduction", V.REDUCTIONS)
    loss = V.check_loss(loss)
    x = V.check_float_array(x, x_name)
    geom = V.geometry(x, x_name, layout)
    target, kind = V.check_target(target, geom, x, x_name)
    problem = Problem(
        geom, x, target=target, kind=kind,
        weights=V.check_weights(weights, geom, x.dtype),
        class_weights=V.check_class_weights(class_weights, geom.C, x.dtype),
        lens=V.check_lens(lens, geom.C, x.dtype, kind),
        smoothing=V.check_smoothing(label_smoothing),
        ignore_index=V.check_ignore_index(ignore_index), loss=loss)
    return _LossCall(B, problem, reduction, V.check_flag(validate, "validate"),
                     _threads.resolve(threads))


def _label_kernel_needed(L: _LossCall) -> bool:
    """Whether label_pass runs a kernel (not for soft targets without weights)."""
    return L.problem.kind != Target.SOFT or L.problem.weights is not None


def _validates_labels(L: _LossCall) -> bool:
    """Whether the call checks label values: ``validate=True`` and labels (not soft targets)."""
    return L.validate and L.problem.kind != Target.SOFT


def _label_result(L: _LossCall, norm, bad):
    """label_pass's answer from the kernel's (norm, bad): the bad index read to the host
    only with ``validate=True`` and labels (the one synchronisation)."""
    return norm, (int(bad) if _validates_labels(L) else -1)


def label_pass(L: _LossCall):
    """(normaliser, lowest flat index of a bad label or -1) of a validated loss call: the
    label pre-pass, without raising (ssm._distributed and ssm.dask use it per shard).

    The normaliser is a float (CPU) or a 0-d float64 device array; reading the bad index
    to the host (only with ``validate=True`` and labels) is the one synchronisation.
    """
    if not _label_kernel_needed(L):
        return float(L.problem.geom.n_pixels), -1
    return _label_result(L, *L.B.stats(L.problem, L.threads))


def _label_pass_needed(L: _LossCall) -> bool:
    """The pre-pass runs only where its result is used: for "mean", or to check labels."""
    return L.reduction == "mean" or _validates_labels(L)


def _raise_if_bad(L: _LossCall, bad):
    """The bad-label ValueError if ``bad`` (a flat index, -1, or a 0-d device index read
    here: see _loss_pass) names a label; None does not."""
    if bad is not None and (index := int(bad)) >= 0:
        P = L.problem
        raise V.bad_label_error(P.target, index, P.geom.C, P.ignore_index)


def _constant_divisor(L: _LossCall) -> float:
    """The divisor of the reductions other than "mean" (1 for "sum" and "none")."""
    return float(L.problem.geom.N) if L.reduction == "batch" else 1.0


def _divisor_from(L: _LossCall, norm, bad):
    """What the summed loss is divided by, from label_pass's (norm, bad); raises the
    bad-label ValueError."""
    _raise_if_bad(L, bad)
    return norm if L.reduction == "mean" else _constant_divisor(L)


def _divisor(L: _LossCall):
    """What the summed loss is divided by, after the label pre-pass has checked the labels.

    Raises the bad-label ValueError here, before any output is written.
    """
    return _divisor_from(L, *(label_pass(L) if _label_pass_needed(L) else (0.0, -1)))


def _loss_pass(L: _LossCall, op, out, finish):
    """Run loss pass `op` (SSWL_FWD, or SSWL_FWD_BWD) after or with the label pre-pass, and
    raise the bad-label ValueError: its reduced loss (the loss map for "none").

    ``out``: the caller's ``out=`` buffer, or None (the loss alone, or outputs of the
    call's own); ``finish(divisor)``: the finished Problem, given the divisor of the
    gradient scale (the forward ignores it). Three orders, by what the outputs are:
    - the call's own (no ``out=``), and the pass does not need the pre-pass's result
      inside it (it does: the gradient's "mean" normaliser): the pre-pass rides in the
      pass (``run_checked``: one read of the labels on the CPU, one launch fewer on a
      GPU) and a bad label raises after it, the outputs dropped;
    - the call's own, on a GPU: the pre-pass, the pass, then the bad index is read, so
      the device does not idle in mid-call while the host reads it;
    - a caller's buffer: the pre-pass raises before the pass writes into it (on the CPU
      the order costs nothing).
    The second and third are _checked_divisor's.
    """
    if (out is None and _label_pass_needed(L) and _label_kernel_needed(L)
            and (op == Op.SSWL_FWD or L.reduction != "mean")):
        constant = _constant_divisor(L)
        problem = finish(constant)
        divisor = (None if L.reduction == "none" else
                   "mean" if L.reduction == "mean" else constant)
        value, bad = L.B.run_checked(op, problem, L.threads, divisor)
        _raise_if_bad(L, bad if _validates_labels(L) else None)
        return problem.loss_map if L.reduction == "none" else value
    divisor, bad = _checked_divisor(L, out)
    value = _loss_value(L, op, finish(divisor), divisor)
    _raise_if_bad(L, bad)
    return value


def _loss_value(L: _LossCall, op, problem, divisor):
    """Run loss pass `op` over `problem`: the reduced loss (the loss map for "none")."""
    if L.reduction == "none":
        L.B.run_loss(op, problem, L.threads, None)
        return problem.loss_map
    return L.B.run_loss(op, problem, L.threads, divisor)


def _checked_divisor(L: _LossCall, out):
    """(divisor, bad) of a pass that needs the divisor first, from the label pre-pass
    (_loss_pass's second and third orders; the gradient from probabilities): on a GPU
    without ``out=``, ``bad`` is the 0-d device index, for _raise_if_bad to read after the
    launches; else ``bad`` is None and the ValueError comes here, before any kernel
    writes."""
    if out is None and L.B is not _cpu and _label_pass_needed(L) and _label_kernel_needed(L):
        norm, bad = L.B.stats(L.problem, L.threads)
        return _divisor_from(L, norm, -1), (bad if _validates_labels(L) else None)
    return _divisor(L), None


def _sswl_forward(logits, target, weights=None, *, ignore_index=-1, class_weights=None,
                  lens=None, label_smoothing=0.0, reduction="mean", layout="NCHW",
                  validate=True, out=None, threads=None, loss_cap=_LOSS_CAP_NONE,
                  loss="cross_entropy", with_prob=True):
    """(prob, loss), or the loss alone with ``with_prob=False`` (no probabilities are
    computed or written: the pass reads the logits and labels once)."""
    named = [("logits", logits), ("target", target), ("weights", weights)]
    B, device = _backend(*named, ("out", out)) if with_prob else _backend(*named)
    with device:
        L = _loss_call(B, logits, "logits", target, weights, ignore_index=ignore_index,
                       class_weights=class_weights, lens=lens, label_smoothing=label_smoothing,
                       reduction=reduction, layout=layout, validate=validate, threads=threads,
                       loss=loss)
        P = L.problem
        xp = V.array_module(P.x)
        loss_map = xp.empty(P.geom.pixel_shape, P.x.dtype) if L.reduction == "none" else None
        prob = L.out_buffer(out, "logits") if with_prob else None
        value = _loss_pass(L, Op.SSWL_FWD, out,
                           lambda _: P.finish(prob, loss_cap, loss_map=loss_map))
        return (prob, value) if with_prob else value


@accepts_dlpack
def spatial_softmax_with_loss(logits, target, weights=None, *, ignore_index=-1,
                              class_weights=None, lens=None, label_smoothing=0.0,
                              reduction="mean", layout="NCHW", validate=True, out=None,
                              threads=None, loss="cross_entropy"):
    """Softmax over the class axis and the cross-entropy loss against ``target``.

    Per pixel ``p`` with ``q = softmax(logits[p])`` and target distribution ``t``
    (one-hot label, ``lens[label]``, smoothed, or the soft target itself),
    ``a_c = weights[p] * class_weights[c] * t_c`` and the pixel loss is
    ``l_p = -sum_c a_c log q_c``, computed from log-sum-exp; with ``loss="kl"`` the
    KL divergence ``l_p = sum_c a_c (log t_c - log q_c)`` (``0 log 0 = 0``).

    Parameters
    ----------
    logits : ndarray, float16, bfloat16 (computed in float32), float32 or float64
        ``(N, C, *spatial)`` (NCHW) or ``(N, *spatial, C)`` (NHWC)
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
    loss : {"cross_entropy", "kl"}
        The per-pixel criterion. ``"kl"`` adds ``sum_c a_c log t_c`` to the cross-entropy
        (the same for plain labels, whose ``t`` is one-hot); the gradient, and the
        normaliser of ``"mean"``, are the cross-entropy's.

    Returns
    -------
    prob : ndarray of the logits' shape and dtype
    loss : 0-d ndarray of the logits' dtype, or the loss map for ``reduction="none"``.
    """
    return _sswl_forward(logits, target, weights, ignore_index=ignore_index,
                         class_weights=class_weights, lens=lens,
                         label_smoothing=label_smoothing, reduction=reduction, layout=layout,
                         validate=validate, out=out, threads=threads, loss=loss)


@accepts_dlpack
def cross_entropy(logits, target, weights=None, *, ignore_index=-1, class_weights=None,
                  lens=None, label_smoothing=0.0, reduction="mean", layout="NCHW",
                  validate=True, threads=None, loss="cross_entropy"):
    """The loss of :func:`spatial_softmax_with_loss` alone, in one read.

    Reads the logits and the target once and writes nothing of the logits' size (no
    probabilities are computed or stored); the same loss, bit for bit. Parameters as in
    :func:`spatial_softmax_with_loss` (every option, ``loss="kl"`` included; no ``out``).

    Returns
    -------
    loss : 0-d ndarray of the logits' dtype, or the loss map for ``reduction="none"``.
    """
    return _sswl_forward(logits, target, weights, ignore_index=ignore_index,
                         class_weights=class_weights, lens=lens,
                         label_smoothing=label_smoothing, reduction=reduction, layout=layout,
                         validate=validate, threads=threads, loss=loss, with_prob=False)


@accepts_dlpack
def spatial_softmax_with_loss_grad(prob, target, weights=None, d_loss=1.0, *, ignore_index=-1,
                                   class_weights=None, lens=None, label_smoothing=0.0,
                                   reduction="mean", layout="NCHW", validate=True, out=None,
                                   threads=None, loss="cross_entropy"):
    """Gradient of :func:`spatial_softmax_with_loss` with respect to the logits.

    ``dlogits = d_loss * (sum_c a_c * q - a) / norm`` with ``q = prob`` and ``norm``
    the reduction's divisor, for either ``loss`` (checked, and otherwise unused: the
    KL divergence differs from the cross-entropy by a term without logits).
    Parameters as in :func:`spatial_softmax_with_loss`, plus:

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
        L = _loss_call(B, prob, "prob", target, weights, ignore_index=ignore_index,
                       class_weights=class_weights, lens=lens, label_smoothing=label_smoothing,
                       reduction=reduction, layout=layout, validate=validate, threads=threads,
                       loss=loss)
        P = L.problem
        d, dmap = V.check_d_loss(d_loss, L.reduction, P.geom, P.x.dtype)
        dx = L.out_buffer(out, "prob", dmap)
        divisor, bad = _checked_divisor(L, out)
        B.run(Op.SSWL_BWD, P.finish(dx, d_loss=d, d_loss_map=dmap, divisor=divisor), L.threads)
        _raise_if_bad(L, bad)
        return dx


@accepts_dlpack
def spatial_softmax_with_loss_and_grad(logits, target, weights=None, d_loss=1.0, *,
                                       ignore_index=-1, class_weights=None, lens=None,
                                       label_smoothing=0.0, reduction="mean", layout="NCHW",
                                       validate=True, return_prob=False, out=None,
                                       threads=None, loss="cross_entropy"):
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
        L = _loss_call(B, logits, "logits", target, weights, ignore_index=ignore_index,
                       class_weights=class_weights, lens=lens, label_smoothing=label_smoothing,
                       reduction=reduction, layout=layout, validate=validate, threads=threads,
                       loss=loss)
        P = L.problem
        xp = V.array_module(P.x)
        return_prob = V.check_flag(return_prob, "return_prob")
        d, dmap = V.check_d_loss(d_loss, L.reduction, P.geom, P.x.dtype)
        dx = L.out_buffer(out, "logits", dmap)
        prob = V.empty_like(P.x) if return_prob else None
        loss_map = xp.empty(P.geom.pixel_shape, P.x.dtype) if L.reduction == "none" else None
        loss = _loss_pass(L, Op.SSWL_FWD_BWD, out,
                          lambda divisor: P.finish(dx, d_loss=d, d_loss_map=dmap,
                                                   divisor=divisor, prob_out=prob,
                                                   loss_map=loss_map))
        return (loss, dx, prob) if return_prob else (loss, dx)
