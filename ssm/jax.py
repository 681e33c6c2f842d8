"""ssm for JAX: ``cross_entropy``, ``softmax`` and ``log_softmax`` as ``jax.custom_vjp``
functions, usable under ``jit``, ``grad`` and ``vmap``.

The kernels run on the host through ``jax.pure_callback`` (JAX hands the callback host
arrays, which ssm reads without a copy, and takes NumPy results back). ``cross_entropy``
under differentiation makes one fused call, ``ssm.spatial_softmax_with_loss_and_grad``
with ``d_loss=1``, and keeps the gradient as the VJP's residual; the backward pass only
scales it by the incoming cotangent (a scalar, or the loss map's cotangent broadcast over
the class axis for ``reduction="none"``). Without differentiation it is the forward-only
``ssm.spatial_softmax_with_loss``. ``vmap`` runs the callback once per batch element.

The options are ssm's (``ssm.spatial_softmax_with_loss``: defaults ``ignore_index=-1``,
``reduction="mean"``, 0 when the "mean" divisor is 0, ``layout="NCHW"``); they must be
static (Python values, not traced arrays); ``class_weights`` and ``lens`` may be arrays.
No gradient flows to the target, the weights, ``class_weights`` or ``lens``.

Devices: the CPU. On a GPU backend JAX copies the arguments to the host for the callback
and the results back, so it computes correctly but without ssm's GPU kernels (not yet
supported). Importing ``ssm`` does not import this module or JAX; ``ssm.jax`` does.
"""
from __future__ import annotations

import functools

try:
    import jax
    import jax.numpy as jnp
except ImportError as exc:
    raise ImportError(f"ssm.jax needs JAX, which is not importable ({exc}); install it with "
                      "pip install 'ssm[jax]'") from exc

import numpy as np

import ssm

__all__ = ["cross_entropy", "log_softmax", "softmax"]


def _pixel_shape(shape, layout):
    return (shape[0], *shape[2:]) if layout == "NCHW" else tuple(shape[:-1])


def _loss_struct(logits, reduction, layout):
    shape = _pixel_shape(logits.shape, layout) if reduction == "none" else ()
    return jax.ShapeDtypeStruct(shape, logits.dtype)


def _host_options(options):
    return dict(options, class_weights=None if options["class_weights"] is None
                else np.asarray(options["class_weights"]),
                lens=None if options["lens"] is None else np.asarray(options["lens"]))


def _loss_only(logits, target, weights, cw, lens, statics):
    options = dict(statics, class_weights=cw, lens=lens)

    def host(x, t, w, cw, lens):
        _, loss = ssm.spatial_softmax_with_loss(
            np.asarray(x), np.asarray(t), None if w is None else np.asarray(w),
            **_host_options(dict(options, class_weights=cw, lens=lens)))
        return np.asarray(loss, dtype=x.dtype)

    return jax.pure_callback(host, _loss_struct(logits, statics["reduction"], statics["layout"]),
                             logits, target, weights, cw, lens, vmap_method="sequential")


def _loss_and_grad(logits, target, weights, cw, lens, statics):
    def host(x, t, w, cw, lens):
        loss, grad = ssm.spatial_softmax_with_loss_and_grad(
            np.asarray(x), np.asarray(t), None if w is None else np.asarray(w), 1.0,
            **_host_options(dict(statics, class_weights=cw, lens=lens)))
        return np.asarray(loss, dtype=x.dtype), grad

    structs = (_loss_struct(logits, statics["reduction"], statics["layout"]),
               jax.ShapeDtypeStruct(logits.shape, logits.dtype))
    return jax.pure_callback(host, structs, logits, target, weights, cw, lens,
                             vmap_method="sequential")


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _cross_entropy(logits, target, weights, cw, lens, statics):
    return _loss_only(logits, target, weights, cw, lens, dict(statics))


def _ce_fwd(logits, target, weights, cw, lens, statics):
    loss, grad = _loss_and_grad(logits, target, weights, cw, lens, dict(statics))
    return loss, grad


def _ce_bwd(statics, grad, ct):
    statics = dict(statics)
    if statics["reduction"] == "none":
        axis = 1 if statics["layout"] == "NCHW" else ct.ndim
        ct = jnp.expand_dims(ct, axis)
    return grad * ct.astype(grad.dtype), None, None, None, None


_cross_entropy.defvjp(_ce_fwd, _ce_bwd)


def cross_entropy(logits, target, weights=None, *, ignore_index=-1, class_weights=None,
                  lens=None, label_smoothing=0.0, reduction="mean", layout="NCHW"):
    """The loss of ``ssm.spatial_softmax_with_loss``, differentiable in ``logits``.

    Parameters and semantics are ssm's (see ``help(ssm.spatial_softmax_with_loss)``):
    ``logits`` ``(N, C, *spatial)`` (or channels last with ``layout="NHWC"``), float32 or
    float64; ``target`` integer labels ``(N, *spatial)`` or soft targets of the logits'
    shape; ``weights`` per-pixel. Returns the 0-d loss, or the loss map for "none".
    """
    statics = (("ignore_index", int(ignore_index)), ("label_smoothing", float(label_smoothing)),
               ("reduction", reduction), ("layout", layout))
    return _cross_entropy(logits, target, weights, class_weights, lens, statics)


# ---- softmax and log-softmax ------------------------------------------------------

def _host_softmax(x, layout, log):
    f = ssm.log_softmax if log else ssm.softmax
    return jax.pure_callback(lambda a: f(np.asarray(a), layout=layout),
                             jax.ShapeDtypeStruct(x.shape, x.dtype), x,
                             vmap_method="sequential")


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _softmax(x, layout, log):
    return _host_softmax(x, layout, log)


def _softmax_fwd(x, layout, log):
    out = _host_softmax(x, layout, log)
    return out, out


def _softmax_bwd(layout, log, out, g):
    axis = 1 if layout == "NCHW" else -1
    if log:  # d/dx log_softmax: g - softmax * sum(g)
        return (g - jnp.exp(out) * g.sum(axis, keepdims=True),)
    dx = jax.pure_callback(
        lambda p, d: ssm.softmax_grad(np.asarray(p), np.asarray(d, dtype=p.dtype), layout=layout),
        jax.ShapeDtypeStruct(out.shape, out.dtype), out, g, vmap_method="sequential")
    return (dx,)


_softmax.defvjp(_softmax_fwd, _softmax_bwd)


def softmax(x, *, layout="NCHW"):
    """``ssm.softmax`` over the class axis (1 for NCHW, the last for NHWC), differentiable."""
    return _softmax(x, layout, False)


def log_softmax(x, *, layout="NCHW"):
    """``ssm.log_softmax`` over the class axis, differentiable."""
    return _softmax(x, layout, True)
