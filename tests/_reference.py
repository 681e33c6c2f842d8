"""Slow, obviously-right float64 reference for ssm (see docs/semantics.md).

Everything is computed in float64 on NCHW arrays: NHWC inputs have their
channel axis moved to position 1 first and the outputs moved back. For every
pixel the dense target distribution ``t`` is built explicitly (one-hot, lens
row, smoothing, soft target), then ``a_c = w_p * cw_c * t_c`` and

    l_p     = -sum_c a_c log q_c                (loss="cross_entropy")
    l_p     = sum_c a_c (log t_c - log q_c)     (loss="kl", 0 log 0 = 0)
    dlogits = g_p * (A_p q - a),   A_p = sum_c a_c,   g_p = d_loss / norm.

Nothing here shares code or structure with the implementation: no tiling, no
fused passes, no cleverness.
"""

import numpy as np

# Caffe2's probability clamp, as the float32 literal ``1e-20f``.
CAFFE2_PROB_FLOOR = float(np.float32(1e-20))


def to_nchw(x, layout):
    """Move the class axis of a ``layout`` array to position 1."""
    x = np.asarray(x)
    return np.moveaxis(x, -1, 1) if layout == "NHWC" else x


def from_nchw(x, layout):
    """Inverse of :func:`to_nchw`."""
    return np.moveaxis(x, 1, -1) if layout == "NHWC" else x


def _f64(x):
    return np.asarray(x, dtype=np.float64)


# ---------------------------------------------------------------- softmax family


def softmax(x, layout="NCHW"):
    x = to_nchw(_f64(x), layout)
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return from_nchw(e / e.sum(axis=1, keepdims=True), layout)


def log_softmax(x, layout="NCHW"):
    x = to_nchw(_f64(x), layout)
    z = x - x.max(axis=1, keepdims=True)
    return from_nchw(z - np.log(np.exp(z).sum(axis=1, keepdims=True)), layout)


def softmax_grad(prob, dprob, layout="NCHW"):
    p = to_nchw(_f64(prob), layout)
    d = to_nchw(_f64(dprob), layout)
    return from_nchw(p * (d - (p * d).sum(axis=1, keepdims=True)), layout)


# ---------------------------------------------------------------- loss pieces


def _is_soft(target, logits_shape):
    dtype = np.asarray(target).dtype
    return ((dtype.kind == "f" or dtype.name == "bfloat16")
            and np.shape(target) == tuple(logits_shape))


def weighted_targets(target, C, *, spatial_shape, weights=None, ignore_index=-1,
                     class_weights=None, lens=None, label_smoothing=0.0, layout="NCHW",
                     logits_shape=None, with_t=False):
    """Per-pixel weighted target ``a`` (N, C, *spatial), normaliser contributions
    ``n`` (N, *spatial), ``ignored`` and ``bad`` (out-of-range label) masks; and the
    target distribution ``t`` (N, C, *spatial) too with ``with_t=True``."""
    N = spatial_shape[0]
    pix_shape = tuple(spatial_shape)
    w = np.ones(pix_shape) if weights is None else _f64(weights)
    cw = np.ones(C) if class_weights is None else _f64(class_weights).reshape(C)
    cw_b = cw.reshape((1, C) + (1,) * (len(pix_shape) - 1))
    e = float(label_smoothing)

    if logits_shape is not None and _is_soft(target, logits_shape):
        t = to_nchw(_f64(target), layout)
        t = (1.0 - e) * t + e / C
        ignored = np.zeros(pix_shape, dtype=bool)
        bad = np.zeros(pix_shape, dtype=bool)
        n = w.copy()
    else:
        y = np.asarray(target).astype(np.int64)
        assert y.shape == pix_shape
        ignored = y == int(ignore_index)
        bad = ~ignored & ((y < 0) | (y >= C))
        ok = ~ignored & ~bad
        ys = np.where(ok, y, 0)
        base = np.zeros((N, C) + pix_shape[1:])
        if lens is None:
            for c in range(C):
                base[:, c] = ys == c
        else:
            L = _f64(lens)
            for c in range(C):
                base[:, c] = L[ys, c]
        t = (1.0 - e) * base + e / C
        t = t * ok[:, None]
        n = np.where(ok, w * cw[ys], 0.0)
    a = w[:, None] * cw_b * t
    return (a, n, ignored, bad, t) if with_t else (a, n, ignored, bad)


def _a_log_t(a, t):
    """sum_c a_c log t_c per pixel, with 0 log 0 = 0 (terms where a_c == 0 are 0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(a != 0, a * np.log(np.where(a != 0, t, 1.0)), 0.0).sum(axis=1)


def _norm(reduction, n, N):
    if reduction == "mean":
        s = n.sum()
        return s if s != 0 else np.inf  # 1/inf = 0: "0 when the normaliser is 0"
    if reduction == "batch":
        return N if N != 0 else np.inf
    return 1.0


def sswl_loss(logits, target, weights=None, *, ignore_index=-1, class_weights=None,
              lens=None, label_smoothing=0.0, reduction="mean", layout="NCHW",
              loss="cross_entropy"):
    """Return ``(prob, loss)`` in float64 (prob in ``layout``, loss 0-d or a map)."""
    assert loss in ("cross_entropy", "kl")
    logits = _f64(logits)
    x = to_nchw(logits, layout)
    N, C = x.shape[:2]
    pix_shape = (N,) + x.shape[2:]
    a, n, ignored, bad, t = weighted_targets(
        target, C, spatial_shape=pix_shape, weights=weights, ignore_index=ignore_index,
        class_weights=class_weights, lens=lens, label_smoothing=label_smoothing,
        layout=layout, logits_shape=logits.shape, with_t=True)
    logq = to_nchw(log_softmax(x), "NCHW")
    lmap = -(a * logq).sum(axis=1)
    if loss == "kl":
        lmap = lmap + _a_log_t(a, t)
    lmap = np.where(ignored, 0.0, lmap)
    lmap = np.where(bad, np.nan, lmap)
    prob = from_nchw(np.exp(logq), layout)
    if reduction == "none":
        return prob, lmap
    loss = lmap.sum() / _norm(reduction, n, N)
    return prob, np.float64(loss)


def sswl_grad(prob, target, weights=None, d_loss=1.0, *, ignore_index=-1, class_weights=None,
              lens=None, label_smoothing=0.0, reduction="mean", layout="NCHW",
              loss="cross_entropy"):
    """dlogits from the probabilities ``prob`` (in ``layout``), float64: the same for
    either ``loss`` (they differ by a term without logits)."""
    prob = _f64(prob)
    q = to_nchw(prob, layout)
    N, C = q.shape[:2]
    pix_shape = (N,) + q.shape[2:]
    a, n, ignored, bad = weighted_targets(
        target, C, spatial_shape=pix_shape, weights=weights, ignore_index=ignore_index,
        class_weights=class_weights, lens=lens, label_smoothing=label_smoothing,
        layout=layout, logits_shape=prob.shape)
    g = np.broadcast_to(_f64(d_loss), pix_shape) / _norm(reduction, n, N)
    A = a.sum(axis=1, keepdims=True)
    d = g[:, None] * (A * q - a)
    d = np.where(ignored[:, None], 0.0, d)
    d = np.where(bad[:, None], np.nan, d)
    return from_nchw(d, layout)


def sswl_loss_scale(logits, target, weights=None, *, ignore_index=-1, class_weights=None,
                    lens=None, label_smoothing=0.0, reduction="mean", layout="NCHW",
                    loss="cross_entropy"):
    """Magnitude of the terms summed into the loss, reduced like the loss.

    ``A_p (|m_p| + log s_p) + sum_c |a_c x_c|`` (plus ``sum_c |a_c log t_c|`` for the KL
    divergence): a rounding-error bound for the loss is a small multiple of eps times
    this (used to set absolute tolerances).
    """
    logits = _f64(logits)
    x = to_nchw(logits, layout)
    N, C = x.shape[:2]
    pix_shape = (N,) + x.shape[2:]
    a, n, _, bad, t = weighted_targets(
        target, C, spatial_shape=pix_shape, weights=weights, ignore_index=ignore_index,
        class_weights=class_weights, lens=lens, label_smoothing=label_smoothing,
        layout=layout, logits_shape=logits.shape, with_t=True)
    if x.size == 0:
        m = np.zeros(pix_shape)
        logs = np.zeros(pix_shape)
    else:
        m = x.max(axis=1)
        logs = np.log(np.exp(x - m[:, None]).sum(axis=1))
    mag = np.abs(a).sum(axis=1) * (np.abs(m) + logs) + np.abs(a * x).sum(axis=1)
    if loss == "kl":
        mag = mag + np.abs(_a_log_t(np.abs(a), t))  # sum_c |a_c log t_c| (t <= 1)
    mag = np.where(bad, 0.0, mag)
    if reduction == "none":
        return mag
    return np.abs(mag).sum() / _norm(reduction, n, N)


# ---------------------------------------------------------------- Caffe2 operators


def caffe2_sswl(X, T, W=None):
    """Caffe2 SpatialSoftmaxWithLoss (CPU): ``(P, loss)``; ``scale`` is not applied."""
    X = _f64(X)
    P = softmax(X)
    T = np.asarray(T).astype(np.int64)
    w = np.ones(T.shape) if W is None else _f64(W)
    valid = T != -1
    ys = np.where(valid, T, 0)
    Py = np.take_along_axis(P, ys[:, None], axis=1)[:, 0]
    pix = np.where(valid, -np.log(np.maximum(Py, CAFFE2_PROB_FLOOR)) * w, 0.0)
    total = np.where(valid, w, 0.0).sum()
    loss = pix.sum() / total if total != 0 else 0.0
    return P, np.float64(loss)


def caffe2_sswl_grad(X, T, W, P, d_loss, scale=1.0):
    """Caffe2 SpatialSoftmaxWithLossGradient: ``d_loss * scale * w * (P - onehot) / sum(w)``."""
    P = _f64(P)
    T = np.asarray(T).astype(np.int64)
    w = np.ones(T.shape) if W is None else _f64(W)
    valid = T != -1
    C = P.shape[1]
    onehot = np.stack([(T == c) for c in range(C)], axis=1).astype(np.float64)
    dX = (P - onehot) * (w * valid)[:, None]
    total = np.where(valid, w, 0.0).sum()
    if total > 0:
        dX = dX * (scale / total)
    return dX * float(np.ravel(d_loss)[0])


def bf16_bits_rounded_once(d):
    """The bfloat16 bit patterns nearest the doubles ``d`` (ties to even patterns, beyond
    the largest value's half step the infinities, a zero with ``d``'s sign), found in the
    table of every finite bfloat16 value, where each pair's midpoint is exact: no cast of a
    double involved."""
    bits = np.arange(1 << 16, dtype=np.uint32)
    finite = (bits & 0x7f80) != 0x7f80
    bits = bits[finite]
    values = (bits << 16).view(np.float32).astype(np.float64)
    order = np.argsort(values, kind="stable")
    values, bits = values[order], bits[order]
    keep = np.r_[True, values[1:] != values[:-1]]  # -0 and +0: keep the first of each
    values, bits = values[keep], bits[keep]
    d = np.asarray(d, dtype=np.float64)
    hi = np.clip(np.searchsorted(values, d), 1, len(values) - 1)
    mid = (values[hi - 1] + values[hi]) / 2
    up = (d > mid) | ((d == mid) & (bits[hi] % 2 == 0))
    out = np.where(up, bits[hi], bits[hi - 1])
    top = values[-1] + (values[-1] - values[-2]) / 2
    out = np.where(d >= top, 0x7f80, np.where(d <= -top, 0xff80, out))
    out = np.where((out & 0x7fff) == 0, np.where(np.signbit(d), 0x8000, 0), out)  # -0 too
    return out.astype(np.uint16)
