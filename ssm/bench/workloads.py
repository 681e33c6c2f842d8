"""The workloads, the operations and their bytes model, and the rotating input sets.

One problem maker for both devices: the data are drawn on the host (so that the CPU and
the GPU benchmark the same numbers) and moved with the array module's ``asarray``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# The standard workloads (float32 logits, int64 labels, 5% ignored); benchmarks/ uses these.
WORKLOADS = {
    "voc": ("VOC-like", (8, 21, 256, 256)),
    "ade": ("ADE20K-like", (4, 150, 128, 128)),
    "cityscapes": ("Cityscapes-like", (2, 19, 512, 1024)),
}
DEFAULT_WORKLOAD = "voc"

# Operations: title, and the model bytes as multiples of (X, L).
OPS = {
    "softmax": ("softmax (X -> P)", 2, 0),
    "forward": ("loss forward (X, y -> P, loss)", 2, 1),
    "backward": ("loss backward (P, y -> dX)", 2, 1),
    "fused": ("fused loss+grad (X, y -> loss, dX)", 2, 1),
    "loss": ("loss alone (X, y -> loss)", 1, 1),
}
COPY_OP = "copy"   # impls: "copy" (np.copyto, device copy), "stream" (non-temporal stores)
READ_OP = "read"   # impl "read": every byte of X read once
FLOORS = {COPY_OP: 2, READ_OP: 1}  # their bytes, in X
# Passes that write nothing of X's size: their floor is the read floor, not a copy's.
READ_ONLY_OPS = frozenset({READ_OP, "loss"})
IMPLS = ("ssm", "torch", "numpy", "sklearn")
IGNORE_FRACTION = 0.05
SEED = 20261123

ROTATE_BYTES = 64 << 20          # input sets rotate until they cover this many bytes
MAX_SETS = 8


@dataclass
class Problem:
    """The benchmark's shape, dtypes and rotating input/output sets."""

    name: str
    shape: tuple
    dtype: np.dtype
    label_dtype: np.dtype
    ignore_index: int
    x: list                 # logits per set
    y: list                 # labels per set
    prob: list              # softmax(x) per set: the backward's input
    out: list               # preallocated output per set (P or dX)
    rotate_bytes: int = ROTATE_BYTES    # the sets cover this much when they are small

    @property
    def n_sets(self):
        return len(self.x)

    @property
    def x_bytes(self):
        return self.x[0].nbytes

    @property
    def label_bytes(self):
        return self.y[0].nbytes

    def op_bytes(self, op):
        if op in FLOORS:
            return FLOORS[op] * self.x_bytes
        _, kx, kl = OPS[op]
        return kx * self.x_bytes + kl * self.label_bytes


def n_sets_for(set_bytes, rotate_bytes=ROTATE_BYTES):
    """Enough sets (2 to MAX_SETS) to cover ``rotate_bytes``."""
    return max(2, min(MAX_SETS, math.ceil(rotate_bytes / max(set_bytes, 1))))


def make_labels(rng, shape, C, label_dtype, ignore_index):
    y = rng.integers(0, C, size=shape, dtype=np.int64)
    y[rng.random(shape) < IGNORE_FRACTION] = ignore_index
    return y.astype(label_dtype)


def make_problem(name, shape, dtype, label_dtype, ssm, xp=np, rotate_bytes=ROTATE_BYTES):
    """Random logits and labels, their softmax, and zeroed outputs, for every set.

    Drawn on the host and moved with ``xp.asarray`` (NumPy: no copy; CuPy: to the current
    device); the sets cover ``rotate_bytes`` (the CPU's L3 twice, or the GPU's L2 twice).
    """
    dtype, label_dtype = np.dtype(dtype), np.dtype(label_dtype)
    ignore_index = 255 if label_dtype == np.uint8 else -1
    rng = np.random.default_rng(SEED)
    C, pix = shape[1], (shape[0],) + tuple(shape[2:])
    n = n_sets_for(math.prod(shape) * dtype.itemsize, rotate_bytes)
    xs, ys, ps, outs = [], [], [], []
    for _ in range(n):
        x = rng.standard_normal(shape, dtype=dtype)
        x *= 2
        y = make_labels(rng, pix, C, label_dtype, ignore_index)
        p = ssm.softmax(x)
        xs.append(xp.asarray(x))
        ys.append(xp.asarray(y))
        ps.append(xp.asarray(p))
        outs.append(xp.empty_like(xs[-1]))
    for o in outs:
        o.fill(0)                            # fault the output pages in now
    return Problem(name, tuple(shape), dtype, label_dtype, ignore_index, xs, ys, ps, outs,
                   rotate_bytes=rotate_bytes)
