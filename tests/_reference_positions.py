"""Float64 NumPy references for softmax over positions: slow, obviously right.

Maps are taken to (N, C, L) first (channels-last moved), and results come back in the
input's layout. ``T`` is the (C,) temperature array.
"""

import math

import numpy as np


def to_ncl(x, layout):
    """(N, C, L) float64 view of x, and the spatial shape."""
    x = np.asarray(x, np.float64)
    if layout == "NHWC":
        x = np.moveaxis(x, -1, 1)
    return x.reshape(x.shape[0], x.shape[1], -1), x.shape[2:]


def from_ncl(a, shape, layout):
    """(N, C, L) back to x's shape and layout."""
    if layout == "NHWC":
        nchw = (shape[0], shape[-1], *shape[1:-1])
        return np.moveaxis(a.reshape(nchw), 1, -1)
    return a.reshape(shape)


def grid(spatial, coordinates):
    """(D, L): fastest axis first; "normalized" 2 i / (S - 1) - 1 (0 when S == 1)."""
    axes = []
    for S in spatial:
        i = np.arange(S, dtype=np.float64)
        if coordinates == "normalized":
            i = 2 * i / (S - 1) - 1 if S > 1 else np.zeros(S)
        axes.append(i)
    mesh = np.meshgrid(*axes, indexing="ij")
    return np.stack([m.reshape(-1) for m in mesh[::-1]])


def temperatures(T, C):
    return np.broadcast_to(np.asarray(T, np.float64), (C,))


def spatial_softmax(x, T=1.0, layout="NCHW"):
    x3, _ = to_ncl(x, layout)
    z = x3 / temperatures(T, x3.shape[1])[None, :, None]
    z = z - z.max(axis=2, keepdims=True)
    e = np.exp(z)
    return from_ncl(e / e.sum(axis=2, keepdims=True), np.shape(x), layout)


def expectation(p, g, layout="NCHW"):
    """(E, var): (N, C, D) each, the maps used as given."""
    p3, _ = to_ncl(p, layout)
    E = np.einsum("ncl,dl->ncd", p3, g)
    var = np.einsum("ncl,ncdl->ncd", p3, (g[None, None] - E[..., None]) ** 2)
    return E, var


def soft_argmax(x, T=1.0, coordinates="normalized", layout="NCHW"):
    """(keypoints, variance), (N, C, ndim)."""
    _, spatial = to_ncl(x, layout)
    return expectation(spatial_softmax(x, T, layout), grid(spatial, coordinates), layout)


def soft_argmax_grad(x, dk, T=1.0, coordinates="normalized", layout="NCHW"):
    """(dx, dT per channel (C,)): dy = p (sum_d dk_d g_d - K), dx = dy / T,
    dT = -sum_l dy * x / T^2."""
    x3, spatial = to_ncl(x, layout)
    C = x3.shape[1]
    Tc = temperatures(T, C)[None, :, None]
    p3, _ = to_ncl(spatial_softmax(x, T, layout), layout)
    g = grid(spatial, coordinates)
    dk = np.asarray(dk, np.float64)
    h = np.einsum("ncd,dl->ncl", dk, g)
    K = np.einsum("ncl,ncl->nc", p3, h)[..., None]
    dy = p3 * (h - K)
    dT = (-(dy * x3).sum(axis=2) / Tc[..., 0] ** 2).sum(axis=0)
    return from_ncl(dy / Tc, np.shape(x), layout), dT


def spatial_softmax_grad(prob, dprob, T=1.0, layout="NCHW", x=None):
    """(dx, dT per channel): dy = p (dp - sum p dp), dx = dy / T, dT = -sum dy log p / T."""
    p3, _ = to_ncl(prob, layout)
    d3, _ = to_ncl(dprob, layout)
    Tc = temperatures(T, p3.shape[1])[None, :, None]
    dy = p3 * (d3 - (p3 * d3).sum(axis=2, keepdims=True))
    with np.errstate(divide="ignore", invalid="ignore"):
        logp = np.where(p3 > 0, np.log(np.where(p3 > 0, p3, 1)), 0)
    dT = (-(dy * logp).sum(axis=2) / Tc[..., 0]).sum(axis=0)
    return from_ncl(dy / Tc, np.shape(prob), layout), dT


def n_positions(spatial):
    return math.prod(spatial)
