"""Building blocks for a loss reduced over shards: the "mean" normaliser, and one shard's
pass with a given global scale.

The "mean" of a loss split over shards (Dask chunks, data-parallel ranks) is
``sum_k L_k / sum_k n_k``: the per-shard loss *sums* ``L_k`` and per-shard normalisers
``n_k`` are reduced separately, never the per-shard means. Every shard's gradient is then
computed with the global normaliser as its divisor. A pixel's gradient depends only on that
pixel and the scale ``d_loss / norm`` (one float64 division, the same on both backends), so
the shards' gradients are those of one call over the whole batch.

The public recipe (README, "Larger than one machine"; examples/)::

    n_k = ssm.loss_normalizer(x_k, y_k)                   # this shard's denominator
    norm = allreduce_sum(n_k)                             # float64
    L_k, dx_k = ssm.spatial_softmax_with_loss_and_grad(
        x_k, y_k, reduction="sum", d_loss=1.0 / norm if norm else 0.0)
    loss = allreduce_sum(L_k) / norm                      # 0 when norm == 0

``shard_pass`` is the same call for ``ssm.dask`` with the float64 loss sum kept (the public
``reduction="sum"`` rounds it to the logits' dtype) and the divisor handed to the kernel
as the single call hands it (``d_loss / divisor`` is computed by the kernel itself).
"""
from __future__ import annotations

import numpy as np

from . import _threads
from . import _validation as V
from ._api import _backend, _LossCall, _loss_call, label_pass
from ._codes import Op
from ._interop import accepts_dlpack
from ._problem import Problem


def normalizer_call(logits, target, weights, *, class_weights, ignore_index, layout,
                    validate, threads) -> _LossCall:
    """The validated call of ``loss_normalizer``: as a loss call's, but the logits are not
    copied (only their shape and dtype are read, so a broadcast stand-in will do)."""
    B, device = _backend(("logits", logits), ("target", target), ("weights", weights))
    with device:
        layout = V.check_choice(layout, "layout", V.LAYOUTS)
        x = V.as_array(logits, "logits")
        V.check_float_dtype(x, "logits")
        geom = V.geometry(x, "logits", layout)
        target, kind = V.check_target(target, geom, x, "logits")
        problem = Problem(
            geom, x, target=target, kind=kind,
            weights=V.check_weights(weights, geom, x.dtype),
            class_weights=V.check_class_weights(class_weights, geom.C, x.dtype),
            ignore_index=V.check_ignore_index(ignore_index))
        return _LossCall(B, problem, "mean", V.check_flag(validate, "validate"),
                         _threads.resolve(threads)), device


@accepts_dlpack
def loss_normalizer(logits, target, weights=None, *, class_weights=None, ignore_index=-1,
                    layout="NCHW", validate=True, threads=None):
    """The ``reduction="mean"`` denominator of this (shard of the) batch.

    ``norm = sum_p n_p`` over non-ignored pixels, ``n_p = weights[p] * class_weights[y_p]``
    for labels, ``weights[p]`` for soft targets (1 where absent): what
    :func:`spatial_softmax_with_loss` divides the summed loss by, computed by the same
    label pre-pass, so the value is bit for bit the one the loss call uses.

    For a mean over shards (ranks, chunks), add the shards' normalisers and their
    ``reduction="sum"`` losses separately, and compute each shard's gradient with
    ``reduction="sum", d_loss=d / norm`` (0 when ``norm == 0``): see README.md,
    "Larger than one machine".

    Parameters
    ----------
    logits : ndarray
        Only the shape and dtype are read (it is not copied: a broadcast stand-in such
        as ``np.broadcast_to(np.float32(0), shape)`` will do).
    target, weights, class_weights, ignore_index, layout, threads
        As in :func:`spatial_softmax_with_loss` (``lens`` and ``label_smoothing`` do not
        change the normaliser).
    validate : bool
        Check the labels as the loss functions do (ValueError naming the first bad one).

    Returns
    -------
    norm : 0-d float64 ndarray (on the logits' device)
    """
    L, device = normalizer_call(logits, target, weights, class_weights=class_weights,
                                ignore_index=ignore_index, layout=layout, validate=validate,
                                threads=threads)
    with device:
        P = L.problem
        norm, bad = label_pass(L)
        if bad >= 0:
            raise V.bad_label_error(P.target, bad, P.geom.C, P.ignore_index)
        return V.array_module(P.x).asarray(norm, dtype=np.float64)


def shard_pass(op, x, target, weights=None, d_loss=1.0, *, divisor=1.0, return_prob=False,
               loss_map=False, ignore_index=-1, class_weights=None, lens=None,
               label_smoothing=0.0, layout="NCHW", threads=None, loss="cross_entropy",
               with_prob=True):
    """One shard's SSWL_FWD, SSWL_FWD_BWD or SSWL_BWD pass with the labels already checked.

    ``divisor`` is the global one (the "mean" normaliser, ``N`` or 1), handed to the kernel
    as the single call hands its own, so the gradient's scale ``d_loss / divisor`` is the
    same float64 division. ``d_loss`` is a number, a 0-d float64 device array, or the
    shard's ``(n, *spatial)`` map (with ``loss_map=True``, reduction "none").

    Returns ``(total, out, prob, loss_map)``: the float64 loss sum (a float, or a 0-d
    device array; 0.0 for SSWL_BWD), the pass's output (prob for SSWL_FWD, None there with
    ``with_prob=False``: the loss alone, as ``ssm.cross_entropy``; dlogits otherwise),
    prob (SSWL_FWD_BWD with ``return_prob``) and the loss map (or None).
    """
    x_name = "prob" if op == Op.SSWL_BWD else "logits"
    B, device = _backend((x_name, x), ("target", target), ("weights", weights),
                         ("d_loss", d_loss))
    with device:
        reduction = "none" if loss_map else "sum"
        L = _loss_call(B, x, x_name, target, weights, ignore_index=ignore_index,
                       class_weights=class_weights, lens=lens,
                       label_smoothing=label_smoothing, reduction=reduction, layout=layout,
                       validate=False, threads=threads, loss=loss)
        P = L.problem
        xp = V.array_module(P.x)
        d, dmap = V.check_d_loss(d_loss, reduction, P.geom, P.x.dtype)
        out = xp.empty_like(P.x) if with_prob or op != Op.SSWL_FWD else None
        prob = xp.empty_like(P.x) if return_prob and op == Op.SSWL_FWD_BWD else None
        lmap = xp.empty(P.geom.pixel_shape, P.x.dtype) if loss_map and op != Op.SSWL_BWD \
            else None
        total = B.run(op, P.finish(out, d_loss=d, d_loss_map=dmap, divisor=divisor,
                                   prob_out=prob, loss_map=lmap), L.threads)
        return total, out, prob, lmap
