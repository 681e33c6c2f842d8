"""ssm for PyTorch: ``cross_entropy``, ``softmax`` and ``log_softmax`` on torch tensors.

``ssm.torch.cross_entropy`` has ``torch.nn.functional.cross_entropy``'s signature,
defaults and results (see docs/semantics.md, "PyTorch and JAX"), plus ssm's per-pixel weights
and confusion lens, and runs ssm's fused kernel:

- Forward with autograd recording (``torch.is_grad_enabled()`` and ``input.requires_grad``)
  is one call of ``ssm.spatial_softmax_with_loss_and_grad`` with ``d_loss=1``: the logits
  are read once, the gradient of the loss is written once and kept for backward. Backward
  only scales it by the incoming gradient: a scalar for the reduced losses (skipped when
  it is 1, in eager mode on the CPU: then the saved gradient is handed on as it is, and
  recomputed should a retained graph be run backward again), the
  ``(N, *spatial)`` map for ``reduction="none"`` (broadcast over the class axis). The
  alternative for "none", keeping ``prob`` and calling ``spatial_softmax_with_loss_grad``
  with the map in backward, reads and writes as much (prob in, dlogits out, versus the
  saved gradient in, dlogits out) and also re-reads the labels, so the saved gradient wins.
- Without autograd (``torch.no_grad``, inference, inputs that need no gradient) it is the
  forward-only ``ssm.spatial_softmax_with_loss``: no gradient is computed.

On the CPU a gradient of at least ``REUSE_BYTES`` is written into the memory of the
thread's previous ones once nothing uses that any more (``_grad_buffer``): a training loop
does not pay the first touch of a fresh logits-sized block every step. Up to
``KEEP_BLOCKS`` such blocks per thread (a step may have several losses) stay allocated
between steps.

Both are ``torch.library`` custom ops (``ssm::cross_entropy_fwd_bwd`` with its autograd
formula registered, ``ssm::cross_entropy``), with fake implementations, so that
``torch.compile`` keeps them as single opaque nodes: no graph break, no tracing into NumPy.
In eager mode a plain CPU tensor skips the op's dispatch layers: the same forward and
backward run as a ``torch.autograd.Function`` (``_FwdBwdEager``).

Tensors reach ssm without a copy: a CPU tensor as a NumPy view of its memory, a CUDA
tensor through DLPack as a CuPy array, launched on PyTorch's current stream; the results
come back as tensors on the input's device. float16 and bfloat16 logits are computed in float32
(the gradient is returned in the logits' dtype; the loss too, except under autocast, where
it is float32 as ``F.cross_entropy``'s is). Importing ``ssm`` does not import this module
or torch; ``ssm.torch`` does.
"""
from __future__ import annotations

import contextlib
import threading
import weakref
from typing import Optional

import numpy as np

try:
    import torch
except ImportError as exc:
    raise ImportError(f"ssm.torch needs PyTorch, which is not importable ({exc}); install it "
                      "with pip install 'ssm[torch]' (or PyTorch's own instructions)") from exc

import ssm

__all__ = ["cross_entropy", "log_softmax", "softmax"]

_COMPUTED = (torch.float32, torch.float64)  # dtypes ssm computes in on every device
_REDUCTIONS = ("mean", "sum", "none")


def _stream_of(t: torch.Tensor):
    """A context in which CuPy launches on PyTorch's current stream of ``t``'s device."""
    if t.device.type != "cuda":
        return contextlib.nullcontext()
    import cupy
    return cupy.cuda.ExternalStream(torch.cuda.current_stream(t.device).cuda_stream,
                                    t.device.index)


def _pixel_shape(input: torch.Tensor, layout: str) -> tuple:
    return (input.shape[0], *input.shape[2:]) if layout == "NCHW" else tuple(input.shape[:-1])


def _classes(input: torch.Tensor, layout: str) -> int:
    return input.shape[1] if layout == "NCHW" else input.shape[-1]


def _mean_is_nan(loss, input, target, weight, pixel_weights, ignore_index, layout):
    """PyTorch's "mean" over no weight is NaN where ssm's is 0: the loss, made NaN where the
    normaliser is 0. On the CPU the normaliser is counted only when the loss is 0."""
    if input.device.type == "cpu" and float(loss) != 0.0:
        return loss
    C = _classes(input, layout)
    if target.is_floating_point():
        norm = (pixel_weights.sum() if pixel_weights is not None
                else torch.tensor(float(target.numel() // max(C, 1))))
    else:
        n = (target != ignore_index).to(input.dtype)
        if weight is not None:
            n = n * weight[target.long().clamp(0, C - 1)]
        if pixel_weights is not None:
            n = n * pixel_weights
        norm = n.sum()
    return torch.where(norm.to(loss.device) == 0, torch.full_like(loss, float("nan")), loss)


# ---- the gradient buffer of the CPU, reused ---------------------------------------------------
# A fresh logits-sized gradient every training step costs its first touch: the kernel maps
# and zeroes every page of it (VOC-like workload, 44 MB at 2 threads: about as long as the
# fused pass itself). PyTorch's CPU allocator returns such blocks to the system at once.
# So each thread keeps its last gradient's memory, and hands it out again once nothing
# uses it: the tensor is a view of a NumPy array that only its storage references, and
# a finalizer on that array says when the last tensor, view or .grad using it is gone.
# No reference counts are guessed: while any user of the memory lives, a new buffer is
# allocated. Each thread keeps up to KEEP_BLOCKS blocks, so that a step with several
# losses (an auxiliary head, deep supervision, or two models trained in turn) reuses
# each one's memory; beyond that a free block, else the oldest, makes room. Cost: up to
# KEEP_BLOCKS gradient-sized blocks per thread, held between steps. GPU memory is left to
# PyTorch's caching allocator.
REUSE_BYTES = 1 << 20  # smaller gradients are cheap to allocate
KEEP_BLOCKS = 4


_NUMPY_DTYPES = {torch.float32: np.dtype(np.float32), torch.float64: np.dtype(np.float64)}


class _Kept:
    """One block of a thread's kept gradient memory."""

    def __init__(self):
        self.memory = None  # a uint8 NumPy array, 64 bytes more than the gradient
        self.free = False   # no tensor uses it


_threads = threading.local()


def _mark_free(kept, memory):
    # (may run in any thread, whenever the last user goes; memory: the block it used)
    if kept.memory is memory:
        kept.free = True


def _grad_buffer(input: torch.Tensor):
    """An uninitialised C-contiguous NumPy array like the CPU tensor ``input`` for the
    gradient: the kept memory when it is free and the right size, else new memory (then
    kept); None for small, non-CPU or non-float32/64 inputs (ssm allocates)."""
    dtype = _NUMPY_DTYPES.get(input.dtype)
    if dtype is None or input.device.type != "cpu":
        return None
    nbytes = input.numel() * dtype.itemsize
    if nbytes < REUSE_BYTES:
        return None
    pool = getattr(_threads, "kept", None)
    if pool is None:
        pool = _threads.kept = []
    kept = next((k for k in pool if k.free and k.memory.size == nbytes + 64), None)
    if kept is None:
        if len(pool) < KEEP_BLOCKS:
            kept = _Kept()
            pool.append(kept)
        else:  # a free block of another size, else the oldest (its users keep theirs)
            kept = next((k for k in pool if k.free), pool[0])
            pool.remove(kept)
            pool.append(kept)
        kept.memory = np.empty(nbytes + 64, np.uint8)
    kept.free = False
    start = -kept.memory.ctypes.data % 64  # aligned for any kernel
    view = kept.memory[start:start + nbytes].view(dtype).reshape(input.shape)
    weakref.finalize(view, _mark_free, kept, kept.memory)
    return view


def _ssm_options(weight, ignore_index, reduction, label_smoothing, lens, layout):
    return dict(class_weights=weight, lens=lens, ignore_index=ignore_index,
                reduction=reduction, label_smoothing=label_smoothing, layout=layout)


def _on_cpu(input, target):
    # (the parameters were moved to input's device; a target elsewhere takes the DLPack
    # path, whose error names it)
    return input.device.type == "cpu" and target.device.type == "cpu"


def _host(*tensors):
    """CPU tensors (or None) as NumPy arrays sharing their memory: ssm's NumPy path takes
    them without the DLPack import and export of a foreign array (about 0.05 ms of CPU time
    a call, measured)."""
    return [None if t is None else t.detach().numpy() for t in tensors]


def _host_options(options):
    return dict(options, class_weights=_host(options["class_weights"])[0],
                lens=_host(options["lens"])[0])


def _fwd_bwd(input: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor],
             pixel_weights: Optional[torch.Tensor], lens: Optional[torch.Tensor],
             ignore_index: int, reduction: str, label_smoothing: float, layout: str
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss and its gradient with respect to ``input`` (for ``d_loss = 1``), one pass."""
    options = _ssm_options(weight, ignore_index, reduction, label_smoothing, lens, layout)
    if _on_cpu(input, target):  # NumPy views in and out: no DLPack round trip
        loss, grad = ssm.spatial_softmax_with_loss_and_grad(
            *_host(input, target, pixel_weights), 1.0, out=_grad_buffer(input),
            **_host_options(options))
        loss, grad = torch.from_numpy(np.asarray(loss)), torch.from_numpy(grad)
    else:
        with _stream_of(input):
            loss, grad = ssm.spatial_softmax_with_loss_and_grad(
                input.detach(), target, pixel_weights, 1.0, **options)
    if reduction == "mean":
        loss = _mean_is_nan(loss, input, target, weight, pixel_weights, ignore_index, layout)
    return loss, grad


_cross_entropy_fwd_bwd = torch.library.custom_op("ssm::cross_entropy_fwd_bwd",
                                                 mutates_args=())(_fwd_bwd)


@_cross_entropy_fwd_bwd.register_fake
def _(input, target, weight, pixel_weights, lens, ignore_index, reduction, label_smoothing,
      layout):
    loss = input.new_empty(_pixel_shape(input, layout) if reduction == "none" else ())
    return loss, torch.empty_like(input)


def _setup_context(ctx, inputs, output):
    ctx.options = inputs[5:]
    # The gradient output is never differentiated: without this, autograd would fill a
    # logits-sized tensor of zeros as its incoming gradient in every backward. Marked so,
    # it has no grad_fn, and holding it on ctx makes no reference cycle (ctx -> gradient ->
    # its grad_fn -> ctx), which kept a graph whose backward never ran (or ran with
    # another incoming gradient than 1) and its logits-sized gradient alive until the
    # cyclic garbage collector came by.
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)
    if torch.compiler.is_compiling():  # traced: the saved gradient, scaled in backward
        ctx.grad = None
        ctx.save_for_backward(output[1])
        return
    # Eager: the gradient is held as a plain attribute, so that backward can hand it on as
    # it is (autograd may then adopt it as a leaf's .grad and accumulate into it in place);
    # the inputs, saved as usual, recompute it in the rare backward through a retained
    # graph after it was handed on.
    ctx.grad = output[1]
    ctx.save_for_backward(*inputs[:5])


def _saved_grad(ctx):
    if ctx.grad is not None:
        return ctx.grad
    saved = ctx.saved_tensors
    if len(saved) == 1:
        return saved[0]
    return _cross_entropy_fwd_bwd(*saved, *ctx.options)[1]  # handed on before: recompute


NO_SECOND_DERIVATIVE = (
    "ssm.torch.cross_entropy: its gradient is not differentiable (no double backward); for "
    "second derivatives (gradient penalties, Hessian-vector products) use "
    "torch.nn.functional.cross_entropy")


class _NoSecondDerivative(torch.autograd.Function):
    """The gradient, joined to the logits' graph by a backward that raises: what
    ``once_differentiable`` does, for a backward run with ``create_graph=True``, whose
    incoming gradient need not require grad (``torch.autograd.grad(loss, x,
    create_graph=True)``), so that ``once_differentiable`` would return a gradient
    without a graph, and a second derivative through it would silently be 0."""

    @staticmethod
    def forward(grad, input):
        return grad.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, _):
        raise RuntimeError(NO_SECOND_DERIVATIVE)


def _backward(ctx, grad_loss, _grad_of_grad):
    if grad_loss is None:  # the loss was not used
        return (None,) * 9
    grad = _saved_grad(ctx)
    if ctx.options[1] == "none":  # options: ignore_index, reduction, smoothing, layout
        d = grad * grad_loss.unsqueeze(1 if ctx.options[3] == "NCHW" else -1)
    elif (ctx.grad is not None and type(grad_loss) is torch.Tensor
          and grad_loss.device.type == "cpu" and not torch.is_grad_enabled()
          and grad_loss.item() == 1.0):
        d, ctx.grad = grad, None  # loss.backward(): the gradient is the saved one, handed on
    else:
        d = grad * grad_loss
    if torch.is_grad_enabled() and ctx.needs_input_grad[0]:  # create_graph=True
        saved = ctx.saved_tensors
        if len(saved) == 1:  # traced: the logits were not saved, nothing to join
            raise RuntimeError(NO_SECOND_DERIVATIVE)
        d = _NoSecondDerivative.apply(d, saved[0])
    return (d,) + (None,) * 8


_cross_entropy_fwd_bwd.register_autograd(_backward, setup_context=_setup_context)


class _FwdBwdEager(torch.autograd.Function):
    """The custom op's forward and backward as a plain autograd Function, for plain CPU
    tensors in eager mode: the same work without the op's dispatch layers (about 0.1 ms
    of CPU time a step, measured: 0.24 -> 0.13 ms on a small problem; 2% of a
    VOC-sized step). Compiled or traced code and other devices go through the op."""

    @staticmethod
    def forward(*inputs):
        return _fwd_bwd(*inputs)

    @staticmethod
    def setup_context(ctx, inputs, output):  # (separate: torch.func's transforms need it)
        _setup_context(ctx, inputs, output)

    @staticmethod
    def backward(ctx, grad_loss, grad_of_grad):
        return _backward(ctx, grad_loss, grad_of_grad)


@torch.library.custom_op("ssm::cross_entropy", mutates_args=())
def _cross_entropy_fwd(input: torch.Tensor, target: torch.Tensor,
                       weight: Optional[torch.Tensor], pixel_weights: Optional[torch.Tensor],
                       lens: Optional[torch.Tensor], ignore_index: int, reduction: str,
                       label_smoothing: float, layout: str) -> torch.Tensor:
    """The loss alone (no gradient work)."""
    options = _ssm_options(weight, ignore_index, reduction, label_smoothing, lens, layout)
    if _on_cpu(input, target):
        _, loss = ssm.spatial_softmax_with_loss(*_host(input, target, pixel_weights),
                                                **_host_options(options))
        loss = torch.from_numpy(np.asarray(loss))
    else:
        with _stream_of(input):
            _, loss = ssm.spatial_softmax_with_loss(input.detach(), target, pixel_weights,
                                                    **options)
    if reduction == "mean":
        loss = _mean_is_nan(loss, input, target, weight, pixel_weights, ignore_index, layout)
    return loss


@_cross_entropy_fwd.register_fake
def _(input, target, weight, pixel_weights, lens, ignore_index, reduction, label_smoothing,
      layout):
    return input.new_empty(_pixel_shape(input, layout) if reduction == "none" else ())


def _as_param(value, name, dtype, device):
    """An optional small or per-pixel tensor in the computed dtype, on the logits' device."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.requires_grad:
            raise ValueError(f"{name}: a tensor that requires grad; ssm.torch computes no "
                             f"gradient for {name}: pass {name}.detach()")
        return value.to(device=device, dtype=dtype)
    return torch.as_tensor(value, dtype=dtype, device=device)


def cross_entropy(input, target, weight=None, ignore_index=-100, reduction="mean",
                  label_smoothing=0.0, *, pixel_weights=None, lens=None):
    """``torch.nn.functional.cross_entropy`` computed by ssm's fused kernel.

    Parameters
    ----------
    input : Tensor ``(N, C, *spatial)``, ``(N, C)`` or ``(C,)``, float32 or float64
        (float16 and bfloat16 are computed in float32).
    target : Tensor
        Class indices ``(N, *spatial)`` (int64, int32 or uint8), or class probabilities of
        ``input``'s shape.
    weight : Tensor ``(C,)``, optional
        Class weights, PyTorch's rule (also for smoothing and probability targets).
    ignore_index : int
        Pixels with this label add no loss, no gradient and nothing to the "mean" divisor.
    reduction : {"mean", "sum", "none"}
        "mean": the summed loss over ``sum(weight[target] * pixel_weights)`` for class
        indices (NaN when that is 0, as PyTorch), over the pixel count (``sum(pixel_weights)``
        when given) for probabilities.
    label_smoothing : float in [0, 1]
    pixel_weights : Tensor ``(N, *spatial)``, optional (ssm)
        Per-pixel weights: multiply the pixel's loss and its share of the "mean" divisor.
    lens : Tensor or array-like ``(C, C)``, optional (ssm)
        Confusion lens: the label ``y``'s target distribution is ``lens[y]``.

    Returns
    -------
    Tensor: the 0-d loss, or the ``(N, *spatial)`` loss map for "none", on input's device.
    """
    if not isinstance(input, torch.Tensor) or not isinstance(target, torch.Tensor):
        bad, name = (input, "input") if not isinstance(input, torch.Tensor) else (target, "target")
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(bad).__name__}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction: {reduction!r} is not one of 'mean', 'sum', 'none'")
    if input.dim() == 0:
        raise ValueError("input: a 0-d tensor; expected (C,), (N, C) or (N, C, *spatial)")
    unbatched = input.dim() == 1
    if unbatched:  # (C,) with a 0-d index or a (C,) distribution, as PyTorch allows
        input, target = input.unsqueeze(0), target.unsqueeze(0)
    soft = target.is_floating_point()
    if soft and target.requires_grad:
        raise ValueError("target: probability targets that require grad; ssm.torch computes "
                         "no gradient for the target: pass target.detach()")
    x = input if input.dtype in _COMPUTED else input.float()
    if soft:
        target = target.to(x.dtype)
    layout = "NCHW"
    if x.dim() > 2 and not x.is_contiguous() and x.movedim(1, -1).is_contiguous():
        # channels last in memory (torch.channels_last): ssm's NHWC layout reads it in
        # place, and the gradient comes back in the same memory format
        x, layout = x.movedim(1, -1), "NHWC"
        if soft:
            target = target.movedim(1, -1)
    weight = _as_param(weight, "weight", x.dtype, x.device)
    pixel_weights = _as_param(pixel_weights, "pixel_weights", x.dtype, x.device)
    lens = _as_param(lens, "lens", x.dtype, x.device)
    args = (x, target.detach(), weight, pixel_weights, lens, int(ignore_index), reduction,
            float(label_smoothing), layout)
    if torch.is_grad_enabled() and x.requires_grad:
        eager = (not torch.compiler.is_compiling() and not torch.jit.is_tracing()
                 and type(x) is torch.Tensor and x.device.type == "cpu")
        loss, _ = (_FwdBwdEager.apply if eager else _cross_entropy_fwd_bwd)(*args)
    else:
        loss = _cross_entropy_fwd(*args)
    if input.dtype not in _COMPUTED and not torch.is_autocast_enabled(input.device.type):
        loss = loss.to(input.dtype)
    return loss.squeeze(0) if unbatched and reduction == "none" else loss


# ---- softmax and log-softmax ------------------------------------------------------

def _layout(input: torch.Tensor, dim: int) -> str:
    nd = input.dim()
    if nd < 2:
        raise ValueError(f"input: shape {tuple(input.shape)}; expected at least 2 dimensions")
    d = dim + nd if dim < 0 else dim
    if d == 1:
        return "NCHW"
    if d == nd - 1:
        return "NHWC"
    raise ValueError(f"dim: {dim} is neither 1 nor the last dimension of a {nd}-D input; "
                     f"ssm computes softmax over the class axis, one of those")


@torch.library.custom_op("ssm::softmax", mutates_args=())
def _softmax(input: torch.Tensor, layout: str, log: bool) -> torch.Tensor:
    with _stream_of(input):
        f = ssm.log_softmax if log else ssm.softmax
        return f(input.detach(), layout=layout)


@_softmax.register_fake
def _(input, layout, log):
    return torch.empty_like(input)


@torch.library.custom_op("ssm::softmax_backward", mutates_args=())
def _softmax_backward(prob: torch.Tensor, dprob: torch.Tensor, layout: str) -> torch.Tensor:
    with _stream_of(prob):
        return ssm.softmax_grad(prob.detach(), dprob.detach(), layout=layout)


@_softmax_backward.register_fake
def _(prob, dprob, layout):
    return torch.empty_like(prob)


def _softmax_setup(ctx, inputs, output):
    ctx.layout, ctx.log = inputs[1], inputs[2]
    ctx.save_for_backward(output)


def _softmax_bwd(ctx, grad):
    (out,) = ctx.saved_tensors
    if ctx.log:  # d/dx log_softmax: g - softmax * sum(g) over the class axis
        dim = 1 if ctx.layout == "NCHW" else -1
        return grad - torch.exp(out) * grad.sum(dim, keepdim=True), None, None
    return _softmax_backward(out, grad.contiguous().to(out.dtype), ctx.layout), None, None


_softmax.register_autograd(_softmax_bwd, setup_context=_softmax_setup)


def _softmax_call(input, dim, dtype, log):
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input: expected a torch.Tensor, got {type(input).__name__}")
    layout = _layout(input, dim)
    if dtype is not None:
        input = input.to(dtype)
    x = input if input.dtype in _COMPUTED else input.float()
    out = _softmax(x, layout, log)
    return out if out.dtype == input.dtype else out.to(input.dtype)


def softmax(input, dim=1, *, dtype=None):
    """``torch.softmax(input, dim)`` by ssm, for ``dim`` the class axis: 1 (NCHW) or the last
    (channels last). Differentiable; float16/bfloat16 computed in float32."""
    return _softmax_call(input, dim, dtype, False)


def log_softmax(input, dim=1, *, dtype=None):
    """``torch.log_softmax(input, dim)`` by ssm; ``dim`` as in :func:`softmax`."""
    return _softmax_call(input, dim, dtype, True)
