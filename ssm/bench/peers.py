"""The implementations timed, each maker returning ``fn(i)`` for one call on set ``i``:
ssm, the copy floor, NumPy, PyTorch and scikit-learn; and the agreement check of every
loss and gradient with ssm's (once, off the clock).

ssm's and torch's makers serve both devices: ssm takes NumPy or CuPy arrays alike, and
torch sees the same memory through ``torch_bridge`` (``from_numpy`` on the CPU, DLPack
on the GPU).
"""
from __future__ import annotations

import numpy as np

LOSS_RTOL = 1e-5                 # agreement of each implementation's loss with ssm's
GRAD_RTOL = 1e-4                 # ... and of its gradient, relative to max |dX|


def ssm_calls(ssm, pb, threads, *, into_out=True, **kw):
    """ssm's four ops with ``out=`` on the sets (or, with ``into_out=False``, into outputs
    of their own); ``kw`` (e.g. ``validate=False``) goes to the loss calls."""
    ig = pb.ignore_index

    def out(i):
        return pb.out[i] if into_out else None

    def softmax(i):
        return ssm.softmax(pb.x[i], out=out(i), threads=threads)

    def forward(i):
        return ssm.spatial_softmax_with_loss(pb.x[i], pb.y[i], ignore_index=ig,
                                             out=out(i), threads=threads, **kw)

    def backward(i):
        return ssm.spatial_softmax_with_loss_grad(pb.prob[i], pb.y[i], ignore_index=ig,
                                                  out=out(i), threads=threads, **kw)

    def fused(i):
        return ssm.spatial_softmax_with_loss_and_grad(pb.x[i], pb.y[i], ignore_index=ig,
                                                      out=out(i), threads=threads, **kw)

    def loss(i):
        return ssm.cross_entropy(pb.x[i], pb.y[i], ignore_index=ig, threads=threads, **kw)

    return {"softmax": softmax, "forward": forward, "backward": backward, "fused": fused,
            "loss": loss}


def copy_call(pb, threads, pool):
    """np.copyto of X into the output buffer, split in ``threads`` chunks."""
    if threads == 1:
        return lambda i: np.copyto(pb.out[i], pb.x[i])
    chunks = [(np.array_split(d.reshape(-1), threads), np.array_split(s.reshape(-1), threads))
              for d, s in zip(pb.out, pb.x)]

    def call(i):
        dst, src = chunks[i]
        futures = [pool.submit(np.copyto, d, s) for d, s in zip(dst[1:], src[1:])]
        np.copyto(dst[0], src[0])            # the calling thread copies the first chunk
        for f in futures:
            f.result()

    return call


def stream_call(pb, threads):
    """X copied into the output buffer with the kernels' non-temporal stores (ssm/_floors.h):
    the floor of a pass that reads X and writes X."""
    from .. import _cpu
    return lambda i: _cpu.floor_stream(pb.out[i], pb.x[i], threads)


def read_call(pb, threads):
    """Every byte of X read once (ssm/_floors.h): the floor of a pass that only reads."""
    from .. import _cpu
    return lambda i: _cpu.floor_read(pb.x[i], threads)


def numpy_softmax(x, out):
    """Softmax over axis 1 into ``out``; returns the row max and the sum of exponentials."""
    m = x.max(axis=1, keepdims=True)
    np.subtract(x, m, out=out)
    np.exp(out, out=out)
    s = out.sum(axis=1, keepdims=True)
    out /= s
    return m, s


def numpy_loss(x, y, m, s, ignore_index):
    """Mean cross-entropy from the softmax's max and sum: log s + m - x_y, in float64."""
    valid = y != ignore_index
    yc = np.where(valid, y, 0).astype(np.intp)[:, None]
    xy = np.take_along_axis(x, yc, axis=1)[:, 0]
    pix = np.log(s[:, 0], dtype=np.float64) + m[:, 0] - xy
    count = np.count_nonzero(valid)
    return pix[valid].sum() / count if count else 0.0


def numpy_grad_inplace(p, y, ignore_index):
    """Turn softmax P into the mean loss's gradient in place: (P - onehot(y)) * valid / count."""
    valid = y != ignore_index
    count = np.count_nonzero(valid)
    w = (valid / count if count else np.zeros(valid.shape)).astype(p.dtype)
    yc = np.where(valid, y, 0).astype(np.intp)[:, None]
    p *= w[:, None]
    np.put_along_axis(p, yc, np.take_along_axis(p, yc, axis=1) - w[:, None], axis=1)
    return p


def numpy_calls(pb):
    def softmax(i):
        numpy_softmax(pb.x[i], pb.out[i])

    def forward(i):
        m, s = numpy_softmax(pb.x[i], pb.out[i])
        return numpy_loss(pb.x[i], pb.y[i], m, s, pb.ignore_index)

    def backward(i):
        np.copyto(pb.out[i], pb.prob[i])
        return numpy_grad_inplace(pb.out[i], pb.y[i], pb.ignore_index)

    def fused(i):
        m, s = numpy_softmax(pb.x[i], pb.out[i])
        loss = numpy_loss(pb.x[i], pb.y[i], m, s, pb.ignore_index)
        numpy_grad_inplace(pb.out[i], pb.y[i], pb.ignore_index)
        return loss

    # the loss alone: NumPy has no pass without the probabilities (the forward's row)
    return {"softmax": softmax, "forward": forward, "backward": backward, "fused": fused,
            "loss": forward}


def torch_bridge(torch, device):
    """(array -> tensor, tensor -> array), sharing memory: NumPy on the CPU, CuPy (DLPack)
    on the GPU."""
    if device == "cpu":
        return torch.from_numpy, lambda t: t.numpy()
    import cupy
    return torch.from_dlpack, cupy.from_dlpack


def torch_calls(torch, pb, device="cpu"):
    """PyTorch on zero-copy views of the same arrays (int64 labels made off the clock)."""
    F = torch.nn.functional
    tensor, _ = torch_bridge(torch, device)
    xs = [tensor(x) for x in pb.x]
    ys = [tensor(y.astype("int64")) for y in pb.y]
    ig = pb.ignore_index
    leaves = [tensor(x).requires_grad_() for x in pb.x]
    graphs = []

    def softmax(i):
        return torch.softmax(xs[i], 1)

    def forward(i):
        return F.cross_entropy(xs[i], ys[i], ignore_index=ig)

    def backward(i):
        if not graphs:                       # one forward per set, built on first use
            graphs.extend(F.cross_entropy(v, t, ignore_index=ig) for v, t in zip(leaves, ys))
        return torch.autograd.grad(graphs[i], leaves[i], retain_graph=True)[0]

    def fused(i):
        loss = F.cross_entropy(leaves[i], ys[i], ignore_index=ig)
        return loss, torch.autograd.grad(loss, leaves[i])[0]

    # the loss alone is torch's forward (F.cross_entropy returns the loss only)
    return {"softmax": softmax, "forward": forward, "backward": backward, "fused": fused,
            "loss": forward}


class SklearnFused:
    """HalfMultinomialLoss.loss_gradient on NHWC rows; ignored pixels weigh 0, others 1/count."""

    def __init__(self, loss_cls, pb):
        C = pb.shape[1]
        self.loss = loss_cls(n_classes=C)
        self.raw, self.y, self.w, self.lo, self.go = [], [], [], [], []
        for x, y in zip(pb.x, pb.y):
            valid = y != pb.ignore_index
            count = max(np.count_nonzero(valid), 1)
            self.raw.append(np.ascontiguousarray(np.moveaxis(x, 1, -1)).reshape(-1, C))
            self.y.append(np.where(valid, y, 0).astype(pb.dtype).reshape(-1))
            self.w.append((valid / count).astype(pb.dtype).reshape(-1))
            self.lo.append(np.empty(self.y[-1].shape, pb.dtype))
            self.go.append(np.empty_like(self.raw[-1]))

    def call(self, threads):
        def fused(i):
            self.loss.loss_gradient(self.y[i], self.raw[i], sample_weight=self.w[i],
                                    loss_out=self.lo[i], gradient_out=self.go[i],
                                    n_threads=threads)
            return self.lo[i].sum(dtype=np.float64)
        return fused

    def grad_nchw(self, i, shape):
        g = self.go[i].reshape((shape[0],) + tuple(shape[2:]) + (shape[1],))
        return np.moveaxis(g, -1, 1)


def import_peers(with_torch, with_sklearn):
    """(torch module or None, HalfMultinomialLoss or None, notes on what was skipped)."""
    torch = loss_cls = None
    notes = []
    if with_torch:
        try:
            import torch
        except ImportError as e:
            notes.append(f"PyTorch skipped: not importable ({e}). To compare with it, "
                         "`pip install torch` (not in the [bench] extra: a large download).")
    if with_sklearn:
        try:
            from sklearn._loss.loss import HalfMultinomialLoss as loss_cls
        except ImportError as e:
            notes.append(f"scikit-learn skipped: not importable ({e}); "
                         "`pip install scikit-learn` (or the [bench] extra) adds it.")
    return torch, loss_cls, notes


def agreement(ref_loss, dx, found):
    """Check records: each ``impl: (loss, gradient or None)`` of ``found`` against ssm's
    ``ref_loss`` and gradient ``dx`` (NumPy or CuPy, like the gradients found)."""
    gmax = float(abs(dx).max()) or 1.0
    checks = []
    for impl, (value, grad) in found.items():
        rel = abs(value - ref_loss) / max(abs(ref_loss), 1e-30)
        gerr = None if grad is None else float(abs(grad - dx).max()) / gmax
        ok = rel <= LOSS_RTOL and (gerr is None or gerr <= GRAD_RTOL)
        checks.append({"impl": impl, "loss": value, "ssm_loss": ref_loss, "loss_rel_err": rel,
                       "grad_err_rel_max": gerr, "ok": ok})
    return checks


def check_agreement(ssm, pb, torch=None, sk=None, device="cpu"):
    """ssm's forward, NumPy (CPU), torch and scikit-learn (CPU) on set 0 against ssm's
    fused loss and gradient; returns check records."""
    x, y, ig = pb.x[0], pb.y[0], pb.ignore_index
    loss, dx = ssm.spatial_softmax_with_loss_and_grad(x, y, ignore_index=ig, threads=1)
    found = {"ssm forward": (float(ssm.spatial_softmax_with_loss(x, y, ignore_index=ig)[1]),
                             None),
             "ssm loss alone": (float(ssm.cross_entropy(x, y, ignore_index=ig)), None)}
    if device == "cpu":
        p = np.empty_like(x)
        m, s = numpy_softmax(x, p)
        found["numpy"] = (float(numpy_loss(x, y, m, s, ig)), numpy_grad_inplace(p, y, ig))
    if torch is not None:
        tensor, array = torch_bridge(torch, device)
        leaf = tensor(x.copy()).requires_grad_()
        tl = torch.nn.functional.cross_entropy(leaf, tensor(y.astype("int64")), ignore_index=ig)
        found["torch"] = (tl.item(), array(torch.autograd.grad(tl, leaf)[0]))
    if sk is not None:
        found["sklearn"] = (float(sk.call(1)(0)), sk.grad_nchw(0, pb.shape))
    return agreement(float(loss), dx, found)
