"""ssm for JAX: ``cross_entropy``, ``softmax`` and ``log_softmax`` as ``jax.custom_vjp``
functions, usable under ``jit``, ``grad`` and ``vmap``.

The kernels run on the host through ``jax.experimental.buffer_callback`` on the CPU
backend (ssm reads JAX's buffers and writes XLA's output buffers in place: no copy either
way; the backward pass scales the saved gradient in its own buffer), else through
``jax.pure_callback`` (JAX copies the results into its buffers). ``cross_entropy``
under differentiation makes one fused call, ``ssm.spatial_softmax_with_loss_and_grad``
with ``d_loss=1``, and keeps the gradient as the VJP's residual; the backward pass only
scales it by the incoming cotangent (a scalar, or the loss map's cotangent broadcast over
the class axis for ``reduction="none"``). Without differentiation it is the forward-only
``ssm.spatial_softmax_with_loss``. ``vmap`` runs the callback once per batch element.

The options are ssm's (``ssm.spatial_softmax_with_loss``: defaults ``ignore_index=-1``,
``reduction="mean"``, 0 when the "mean" divisor is 0, ``layout="NCHW"``); they must be
static (Python values, not traced arrays); ``class_weights`` and ``lens`` may be arrays.
No gradient flows to the target, the weights, ``class_weights`` or ``lens``: differentiating
with respect to one of them is a ``ValueError`` when the function is traced (JAX would
otherwise take a zero gradient for it).

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
from ssm import _validation as V
from ssm._codes import LABEL_KINDS
from ssm._interop import _bfloat16_host
from ssm._pages import advise_huge

try:  # zero-copy host callbacks (JAX 0.7 and later)
    from jax.experimental.buffer_callback import buffer_callback as _buffer_callback
except ImportError:
    _buffer_callback = None

__all__ = ["cross_entropy", "log_softmax", "softmax"]


def _pixel_shape(shape, layout):
    return (shape[0], *shape[2:]) if layout == "NCHW" else tuple(shape[:-1])


def _loss_struct(logits, reduction, layout):
    shape = _pixel_shape(logits.shape, layout) if reduction == "none" else ()
    return jax.ShapeDtypeStruct(shape, logits.dtype)


def _host_options(statics, cw, lens):
    return dict(statics, class_weights=None if cw is None else np.asarray(cw),
                lens=None if lens is None else np.asarray(lens))


def _host_array(a):
    """A buffer_callback buffer as a NumPy array of its memory (bfloat16 relabelled for
    NumPy, which cannot import DLPack's kDLBfloat: ml_dtypes.bfloat16, no copy)."""
    if a is None:
        return None
    if np.dtype(a.dtype).name == "bfloat16":
        return _bfloat16_host(a)
    return np.from_dlpack(a)


def _on_host(fill, structs, *args, alias=None):
    """Run ``fill(outs, *arrays)`` on the host: it writes the NumPy arrays ``outs`` (shaped
    as the tuple ``structs``) from the NumPy ``arrays`` of ``args`` (None stays None).

    On the CPU backend this is ``buffer_callback``: the callback reads JAX's buffers and
    writes XLA's output buffers in place, without a copy either way; ``alias`` maps an
    argument index to the output it shares a buffer with. Elsewhere (or with a JAX
    without it) ``pure_callback``, which copies the results into JAX's buffers."""
    if _buffer_callback is not None and jax.default_backend() == "cpu":
        def callback(ctx, outs, *bufs):
            outs = tuple(_host_array(o) for o in outs)
            for o in outs:  # XLA's fresh output blocks: first touched by ssm (ssm/_pages.py)
                advise_huge(o)
            fill(outs, *map(_host_array, bufs))

        return _buffer_callback(callback, structs, vmap_method="sequential",
                                input_output_aliases=alias)(*args)

    def callback(*arrays):
        arrays = [None if a is None else np.asarray(a) for a in arrays]
        outs = tuple(np.empty(st.shape, st.dtype) for st in structs)
        for arg, out in (alias or {}).items():
            outs[out][...] = arrays[arg]
        fill(outs, *arrays)
        return outs

    return jax.pure_callback(callback, structs, *args, vmap_method="sequential")


def _loss_only(logits, target, weights, cw, lens, statics):
    def fill(outs, x, t, w, cw, lens):
        _, loss = ssm.spatial_softmax_with_loss(x, t, w, **_host_options(statics, cw, lens))
        outs[0][...] = loss

    loss_struct = _loss_struct(logits, statics["reduction"], statics["layout"])
    return _on_host(fill, (loss_struct,), logits, target, weights, cw, lens)[0]


def _loss_and_grad(logits, target, weights, cw, lens, statics):
    def fill(outs, x, t, w, cw, lens):
        loss, _ = ssm.spatial_softmax_with_loss_and_grad(
            x, t, w, 1.0, out=outs[1], **_host_options(statics, cw, lens))
        outs[0][...] = loss

    structs = (_loss_struct(logits, statics["reduction"], statics["layout"]),
               jax.ShapeDtypeStruct(logits.shape, logits.dtype))
    return _on_host(fill, structs, logits, target, weights, cw, lens)


def _scaled(grad, ct, statics):
    """``grad`` times the cotangent ``ct`` (broadcast over the class axis for "none"),
    in place in ``grad``'s buffer where JAX lets it be (a cotangent of 1: no work)."""
    none, nchw = statics["reduction"] == "none", statics["layout"] == "NCHW"

    def fill(outs, g, c):
        out = outs[0]  # g's buffer itself, or (pure_callback) a copy of it
        if none:
            out *= np.expand_dims(c, 1 if nchw else c.ndim).astype(out.dtype)
        elif c != 1:
            out *= out.dtype.type(c)

    return _on_host(fill, (jax.ShapeDtypeStruct(grad.shape, grad.dtype),), grad, ct,
                    alias={0: 0})[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _cross_entropy(logits, target, weights, cw, lens, statics):
    return _loss_only(logits, target, weights, cw, lens, dict(statics))


_NO_GRADIENT = ("target", "weights", "class_weights", "lens")


def _ce_fwd(logits, target, weights, cw, lens, statics):
    # symbolic_zeros: each argument comes as a CustomVJPPrimal (None as None), which says
    # whether it is differentiated; only the logits have a gradient here
    for name, a in zip(_NO_GRADIENT, (target, weights, cw, lens)):
        if a is not None and a.perturbed:
            raise ValueError(f"{name}: ssm.jax.cross_entropy has a gradient with respect to "
                             f"the logits only, not the {name}; differentiate with respect "
                             f"to the logits (or stop_gradient the {name})")
    values = [None if a is None else a.value for a in (logits, target, weights, cw, lens)]
    loss, grad = _loss_and_grad(*values, dict(statics))
    return loss, grad


def _ce_bwd(statics, grad, ct):
    if isinstance(ct, jax.custom_derivatives.SymbolicZero):  # the loss is not used
        return jnp.zeros_like(grad), None, None, None, None
    return _scaled(grad, ct, dict(statics)), None, None, None, None


_cross_entropy.defvjp(_ce_fwd, _ce_bwd, symbolic_zeros=True)


def _stand_in(a):
    """A NumPy array of `a`'s shape and dtype that owns one element (a zero-stride view):
    for ssm's checks of shapes and dtypes, which raise before they read or copy it."""
    return np.broadcast_to(np.zeros((), np.dtype(a.dtype)), tuple(a.shape))


def _check_dtype(a, name):
    """ssm's dtype check of a (possibly traced) float array."""
    V.check_float_dtype(np.zeros((), a.dtype), name)


def _check(logits, target, weights, ignore_index, label_smoothing, reduction, layout):
    """ssm's checks of shapes, dtypes and options, when the function is traced (with ssm's
    messages), instead of inside the callback, where JAX would report each as an INTERNAL
    runtime error at the first run."""
    V.check_choice(reduction, "reduction", V.REDUCTIONS)
    V.check_choice(layout, "layout", V.LAYOUTS)
    V.check_ignore_index(ignore_index)
    V.check_smoothing(label_smoothing)
    _check_dtype(logits, "logits")
    x = _stand_in(logits)
    g = V.geometry(x, "logits", layout)
    tdt, tshape = np.dtype(target.dtype), tuple(target.shape)
    if not ((tdt in LABEL_KINDS and tshape == g.pixel_shape)
            or (tdt == x.dtype and tshape == g.shape)):
        V.check_target(_stand_in(target), g, x, "logits")  # raises, with ssm's message
    if weights is not None and (np.dtype(weights.dtype) != x.dtype
                                or tuple(weights.shape) != g.pixel_shape):
        V.check_weights(_stand_in(weights), g, x.dtype)  # raises


def _check_labels(logits, target, ignore_index, layout):
    """Labels given as values (not traced: outside ``jit``) are checked here, so that a bad
    one is ssm's ValueError; inside the callback (under ``jit``) JAX can only report it as
    its runtime error, with ssm's message in its text."""
    tracer = getattr(jax.core, "Tracer", ())
    if isinstance(target, tracer) or np.dtype(target.dtype) not in LABEL_KINDS:
        return
    ssm.loss_normalizer(_stand_in(logits), np.asarray(target), ignore_index=ignore_index,
                        layout=layout)  # reads the labels alone: raises for a bad one


def _small(a):
    """class_weights or lens as an array argument (a list or tuple as NumPy's)."""
    return np.asarray(a) if isinstance(a, (list, tuple)) else a


def cross_entropy(logits, target, weights=None, *, ignore_index=-1, class_weights=None,
                  lens=None, label_smoothing=0.0, reduction="mean", layout="NCHW"):
    """The loss of ``ssm.spatial_softmax_with_loss``, differentiable in ``logits``.

    Parameters and semantics are ssm's (see ``help(ssm.spatial_softmax_with_loss)``):
    ``logits`` ``(N, C, *spatial)`` (or channels last with ``layout="NHWC"``), float16,
    bfloat16, float32 or float64; ``target`` integer labels ``(N, *spatial)`` or
    soft targets of the logits' shape; ``weights`` per-pixel. Returns the 0-d loss, or the
    loss map for "none". Shapes, dtypes and options are checked when the function is
    traced (ssm's errors); the labels' values before the call outside ``jit`` (ssm's
    ValueError), in the callback under ``jit`` (JAX's runtime error, ssm's message in it).
    """
    logits, target = jnp.asarray(logits), jnp.asarray(target)  # lists, NumPy: as JAX takes them
    weights = None if weights is None else jnp.asarray(weights)
    _check(logits, target, weights, ignore_index, label_smoothing, reduction, layout)
    _check_labels(logits, target, ignore_index, layout)
    statics = (("ignore_index", int(ignore_index)), ("label_smoothing", float(label_smoothing)),
               ("reduction", reduction), ("layout", layout))
    return _cross_entropy(logits, target, weights, _small(class_weights), _small(lens), statics)


# ---- softmax and log-softmax ------------------------------------------------------

def _host_softmax(x, layout, log):
    f = ssm.log_softmax if log else ssm.softmax
    return _on_host(lambda outs, a: f(a, layout=layout, out=outs[0]),
                    (jax.ShapeDtypeStruct(x.shape, x.dtype),), x)[0]


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
    dx = _on_host(lambda outs, p, d: ssm.softmax_grad(p, d.astype(p.dtype, copy=False),
                                                      layout=layout, out=outs[0]),
                  (jax.ShapeDtypeStruct(out.shape, out.dtype),), out, g)[0]
    return (dx,)


_softmax.defvjp(_softmax_fwd, _softmax_bwd)


def _checked_softmax_input(x, layout):
    x = jnp.asarray(x)
    V.check_choice(layout, "layout", V.LAYOUTS)
    _check_dtype(x, "x")
    V.geometry(_stand_in(x), "x", layout)
    return x


def softmax(x, *, layout="NCHW"):
    """``ssm.softmax`` over the class axis (1 for NCHW, the last for NHWC), differentiable."""
    return _softmax(_checked_softmax_input(x, layout), layout, False)


def log_softmax(x, *, layout="NCHW"):
    """``ssm.log_softmax`` over the class axis, differentiable."""
    return _softmax(_checked_softmax_input(x, layout), layout, True)
