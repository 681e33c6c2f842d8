"""Softmax over positions: spatial softmax, soft-argmax and spatial expectations.

The public functions here validate (``_validation``: the positions checks are there too),
normalise,
allocate and describe the call as one ``_problem.PositionsProblem``, then call one pass
(``positions(op, problem, threads)``) of the backend of their arrays (``_api._backend``):
ssm/_positions.h through ``_cpu`` on NumPy arrays, ssm/cuda/positions.cu through ``_gpu``
on CuPy (or simulated) arrays.

Each (n, c) map of ``x`` is a distribution over its positions: ``(N, C, *spatial)``
("NCHW", any spatial rank >= 1) or channels-last ``(N, *spatial, C)`` ("NHWC"). With
temperature ``T`` (a number, or one per channel):

    p[n, c, l] = exp(x[n, c, l] / T_c) / sum_k exp(x[n, c, k] / T_c)
    keypoints[n, c, d] = sum_l p[n, c, l] * g[d, l]

``g[d]`` the coordinate of each position along axis d, fastest axis first (x, then y,
then z ...). See docs/semantics.md, "Softmax over positions".
"""
from __future__ import annotations

import functools
import math

import numpy as np

from . import _threads
from . import _validation as V
from ._api import _backend
from ._codes import PosOp
from ._interop import accepts_dlpack
from ._problem import PositionsProblem
from ._rounding import round_once

COORDINATES = V.COORDINATES


# ---- coordinates ---------------------------------------------------------------------------

@functools.lru_cache(maxsize=64)
def coordinate_grid(spatial: tuple, coordinates: str, dtype) -> np.ndarray:
    """The (D, L) coordinates of the positions of a map of shape ``spatial``, D =
    len(spatial), fastest axis first; read-only.

    "pixels": the index along the axis, 0 .. S-1. "normalized": ``2 i / (S - 1) - 1``,
    -1 .. 1 (kornia's ``create_meshgrid(normalized_coordinates=True)``, corners aligned),
    0 for an axis of one position. Computed in float64, rounded once to ``dtype``.
    """
    D, L = len(spatial), math.prod(spatial)
    g = np.empty((D, L), np.float64)
    for d in range(D):
        axis = len(spatial) - 1 - d
        S = spatial[axis]
        i = np.arange(S, dtype=np.float64)
        if coordinates == "normalized":
            i = 2.0 * i / (S - 1) - 1.0 if S > 1 else np.zeros(S)
        shape = [1] * len(spatial)
        shape[axis] = S
        g[d] = np.broadcast_to(i.reshape(shape), spatial).reshape(L)
    g = g.astype(dtype)
    g.flags.writeable = False
    return g


@functools.lru_cache(maxsize=64)
def axis_tables(spatial: tuple, coordinates: str) -> np.ndarray:
    """The built-in grid as one table per axis, fastest axis first, concatenated (float64,
    the values of coordinate_grid): what the GPU reads for up to 3 axes."""
    tables = np.concatenate([coordinate_grid((S,), coordinates, np.dtype(np.float64))[0]
                             for S in reversed(spatial)])
    tables.flags.writeable = False
    return tables


def _grid_args(B, geom, x, coordinates, grid=None):
    """The coordinates as the backend reads them: a (D, L) table in the type x is computed
    in on the CPU (float32 for the half types; with ``grid_w``, see ssm/_positions.h); on
    the GPU float64, per-axis tables for the built-in grids of up to 3 axes
    (ssm/cuda/positions.cu, pos_coord), else a (D, L) table."""
    if not V.is_device_array(x):
        half = x.dtype.itemsize == 2  # float16, bfloat16: computed in float32
        dtype = np.dtype(np.float32) if half else x.dtype
        if grid is None:
            return {"grid": coordinate_grid(geom.spatial, coordinates, dtype),
                    "grid_w": _grid_w(geom)}
        return {"grid": np.ascontiguousarray(grid, dtype)}
    xp, dev = V.array_module(x), x.device.id
    if grid is None and len(geom.spatial) <= 3:
        return {"grid": B.device_grid(xp, axis_tables(geom.spatial, coordinates), dev),
                "grid_sizes": tuple(reversed(geom.spatial))}
    if grid is None:
        grid = coordinate_grid(geom.spatial, coordinates, np.dtype(np.float64))
    return {"grid": B.device_grid(xp, np.ascontiguousarray(grid, np.float64), dev)}


def _grid_w(geom):
    """W for the built-in grid of (H, W) maps (separable: the CPU sums y by line), else 0."""
    return geom.spatial[1] if len(geom.spatial) == 2 else 0


def _temperature_for(B, x, t):
    if V.is_device_array(x):
        return B.small_array(V.array_module(x), t, x.device.id)
    return t


def _d_temperature(per_map, geom, scalar, dtype):
    """The temperature's gradient from one float64 term per map: summed over the maps of
    each channel (or all of them for one number), in a fixed order; x's dtype."""
    per_channel = per_map.reshape(geom.N, geom.C).sum(axis=0)
    total = per_channel.sum() if scalar else per_channel
    if not V.is_device_array(total):
        return round_once(total, dtype)  # bfloat16 too, rounded once (ssm/_rounding.py)
    if dtype.name == "bfloat16":  # C values, by way of the host (a device sync)
        xp = V.array_module(total)
        return xp.asarray(round_once(xp.asnumpy(total), dtype))
    return total.astype(dtype)


def _common(B, x, name, layout, temperature, threads):
    layout = V.check_choice(layout, "layout", V.LAYOUTS)
    x = V.check_float_array(x, name)
    geom = V.positions_geometry(x, name, layout)
    t, scalar = V.check_temperature(temperature, geom.C, x.dtype)
    return x, geom, t, scalar, _threads.resolve(threads)


def _empty(x, shape, dtype):
    return V.array_module(x).empty(shape, dtype)


# ---- spatial softmax ----------------------------------------------------------------------

@accepts_dlpack
def spatial_softmax(x, *, temperature=1.0, layout="NCHW", out=None, threads=None):
    """Softmax over the positions of each (n, c) map.

    ``p[n, c, l] = exp((x[n, c, l] - m) / T) / sum_k exp((x[n, c, k] - m) / T)``, ``m`` the
    map's largest value, ``T`` the channel's temperature. This is robomimic's and
    TensorFlow's ``softmax(x / temperature)``, and kornia 0.9's; older kornia releases
    multiplied by their ``temperature`` (``softmax(x * t)``): pass ``1 / t`` for those.

    Parameters
    ----------
    x : ndarray, float16, bfloat16 (computed in float32), float32 or float64
        ``(N, C, *spatial)`` (NCHW) or ``(N, *spatial, C)`` (NHWC), any spatial rank >= 1.
    temperature : float or array_like of shape (C,)
        Positive; one number, or one per channel.
    layout : {"NCHW", "NHWC"}
    out : ndarray, optional
        C-contiguous buffer of x's shape and dtype for the result.
    threads : int, optional

    Returns
    -------
    prob : ndarray of x's shape and dtype
    """
    B, device = _backend(("x", x), ("out", out))
    with device:
        x, geom, t, _, nt = _common(B, x, "x", layout, temperature, threads)
        out = V.check_out(out, "out", x.shape, x.dtype, [("x", x)])
        if out is None:
            out = V.empty_like(x)
        B.positions(PosOp.SOFTMAX, PositionsProblem(geom, x, _temperature_for(B, x, t),
                                                    out=out), nt)
        return out


@accepts_dlpack
def spatial_softmax_grad(prob, dprob, *, temperature=1.0, layout="NCHW",
                         return_temperature_grad=False, out=None, threads=None):
    """Gradient of :func:`spatial_softmax`: ``dx = p * (dp - sum_l p dp) / T``.

    With ``return_temperature_grad``, also ``dT = -(1/T) sum_l dy_l log p_l`` with
    ``dy = p * (dp - sum_l p dp)``, summed over the maps of each channel (over all maps
    for one number).

    Parameters
    ----------
    prob : ndarray
        The output of :func:`spatial_softmax`.
    dprob : ndarray of prob's shape and dtype
    temperature, layout, threads
        As in :func:`spatial_softmax`.
    return_temperature_grad : bool
    out : ndarray, optional
        Buffer for dx.

    Returns
    -------
    dx : ndarray of prob's shape and dtype
    d_temperature : ndarray, only with ``return_temperature_grad``
        0-d for one temperature, ``(C,)`` for one per channel; prob's dtype.
    """
    return _spatial_softmax_grad(prob, dprob, temperature, layout, return_temperature_grad,
                                 out, threads, _d_temperature)


def _spatial_softmax_grad(prob, dprob, temperature, layout, return_temperature_grad, out,
                          threads, d_temperature):
    """spatial_softmax_grad, its temperature gradient d_temperature(the float64 term of each
    map, geom, scalar, dtype): _d_temperature, or (ssm.dask) the terms themselves."""
    B, device = _backend(("prob", prob), ("dprob", dprob),
                         ("out", out))
    with device:
        prob, geom, t, scalar, nt = _common(B, prob, "prob", layout, temperature, threads)
        dprob = V.check_same(dprob, "dprob", prob, "prob")
        want_dt = V.check_flag(return_temperature_grad, "return_temperature_grad")
        out = V.check_out(out, "out", prob.shape, prob.dtype, [("prob", prob), ("dprob", dprob)])
        if out is None:
            out = V.empty_like(prob)
        dt = _empty(prob, geom.rows, np.float64) if want_dt else None
        B.positions(PosOp.SOFTMAX_BWD,
                    PositionsProblem(geom, prob, _temperature_for(B, prob, t), dprob=dprob,
                                     out=out, d_temperature=dt), nt)
        if want_dt:
            return out, d_temperature(dt, geom, scalar, prob.dtype)
        return out


# ---- soft-argmax ---------------------------------------------------------------------------

@accepts_dlpack
def soft_argmax(x, *, temperature=1.0, coordinates="normalized", return_variance=False,
                return_prob=False, layout="NCHW", out=None, threads=None):
    """Expected coordinates of each map under its spatial softmax, in one pass over x.

    ``keypoints[n, c, d] = sum_l p[n, c, l] * g[d, l]`` with ``p`` as in
    :func:`spatial_softmax` and ``g[d, l]`` the coordinate of position l along axis d,
    **fastest axis first**: (x, y) for 2-D maps, (x, y, z) for 3-D (kornia's and
    robomimic's order; the reverse of the array's axis order).

    Parameters
    ----------
    x : ndarray
        As in :func:`spatial_softmax`.
    temperature : float or array_like of shape (C,)
    coordinates : {"normalized", "pixels"}
        "normalized": ``2 i / (S - 1) - 1``, from -1 to 1 (kornia's
        ``normalized_coordinates=True``, corners aligned; 0 for an axis of length 1);
        "pixels": the index ``i``, 0 to S - 1.
    return_variance : bool
        Also return ``var[n, c, d] = sum_l p (g[d, l] - keypoints[n, c, d])^2``, the
        keypoint's uncertainty along each axis.
    return_prob : bool
        Also return the probabilities (written once, in the same pass).
    layout : {"NCHW", "NHWC"}
    out : ndarray, optional
        Buffer for the keypoints, ``(N, C, ndim)``.
    threads : int, optional

    Returns
    -------
    keypoints : ndarray ``(N, C, ndim)`` of x's dtype
    variance : ndarray ``(N, C, ndim)``, only with ``return_variance``
    prob : ndarray of x's shape, only with ``return_prob``
    """
    B, device = _backend(("x", x), ("out", out))
    with device:
        x, geom, t, _, nt = _common(B, x, "x", layout, temperature, threads)
        coordinates = V.check_choice(coordinates, "coordinates", V.COORDINATES)
        want_var = V.check_flag(return_variance, "return_variance")
        want_prob = V.check_flag(return_prob, "return_prob")
        kshape = (geom.N, geom.C, len(geom.spatial))
        out = V.check_out(out, "out", kshape, x.dtype, [("x", x)])
        kp = _empty(x, kshape, x.dtype) if out is None else out
        var = _empty(x, kshape, x.dtype) if want_var else None
        prob = V.empty_like(x) if want_prob else None
        B.positions(PosOp.EXPECT,
                    PositionsProblem(geom, x, _temperature_for(B, x, t),
                                     out=prob, keypoints=kp, variance=var,
                                     **_grid_args(B, geom, x, coordinates)), nt)
        return _results(kp, var if want_var else None, prob if want_prob else None)


def _results(first, *optional):
    extra = [a for a in optional if a is not None]
    return (first, *extra) if extra else first


@accepts_dlpack
def soft_argmax_grad(x, d_keypoints, *, temperature=1.0, coordinates="normalized",
                     from_prob=False, return_temperature_grad=False, layout="NCHW", out=None,
                     threads=None):
    """Gradient of :func:`soft_argmax` with respect to x, recomputing the softmax: reads x
    once and writes dx once.

    With ``h[l] = sum_d dk[d] * g[d, l]`` and ``K = sum_d dk[d] * keypoints[d]``:
    ``dy[l] = p[l] * (h[l] - K)``, ``dx = dy / T``, and the temperature's gradient
    ``dT = -(1/T) sum_l dy[l] * (x[l] - m) / T`` (summed over the maps of each channel,
    or of all channels for one number).

    Parameters
    ----------
    x : ndarray
        The logits (or, with ``from_prob=True``, the probabilities of :func:`spatial_softmax`
        at the same temperature: then ``keypoints = sum_l p g`` uses them as given).
    d_keypoints : ndarray ``(N, C, ndim)`` of x's dtype
        The gradient with respect to the keypoints.
    temperature, coordinates, layout, threads
        As in :func:`soft_argmax`.
    from_prob : bool
    return_temperature_grad : bool
    out : ndarray, optional
        Buffer for dx.

    Returns
    -------
    dx : ndarray of x's shape and dtype
    d_temperature : ndarray, only with ``return_temperature_grad``
        0-d for one temperature, ``(C,)`` for one per channel; x's dtype.
    """
    return _soft_argmax_grad(x, d_keypoints, temperature, coordinates, from_prob,
                             return_temperature_grad, layout, out, threads, _d_temperature)


def _soft_argmax_grad(x, d_keypoints, temperature, coordinates, from_prob,
                      return_temperature_grad, layout, out, threads, d_temperature):
    """soft_argmax_grad, its temperature gradient as in _spatial_softmax_grad."""
    B, device = _backend(("x", x), ("d_keypoints", d_keypoints),
                         ("out", out))
    with device:
        x, geom, t, scalar, nt = _common(B, x, "x", layout, temperature, threads)
        coordinates = V.check_choice(coordinates, "coordinates", V.COORDINATES)
        from_prob = V.check_flag(from_prob, "from_prob")
        want_dt = V.check_flag(return_temperature_grad, "return_temperature_grad")
        dk = V.check_d_keypoints(d_keypoints, geom, x)
        out = V.check_out(out, "out", x.shape, x.dtype, [("x", x), ("d_keypoints", dk)])
        if out is None:
            out = V.empty_like(x)
        dt = _empty(x, geom.rows, np.float64) if want_dt else None
        B.positions(PosOp.EXPECT_BWD,
                    PositionsProblem(geom, x, _temperature_for(B, x, t),
                                     d_keypoints=dk, from_prob=from_prob, out=out,
                                     d_temperature=dt,
                                     **_grid_args(B, geom, x, coordinates)), nt)
        if want_dt:
            return out, d_temperature(dt, geom, scalar, x.dtype)
        return out


# ---- spatial expectation ------------------------------------------------------------------

@accepts_dlpack
def spatial_expectation(prob, grid=None, *, coordinates="normalized", return_variance=False,
                        layout="NCHW", out=None, threads=None):
    """Expected coordinates under given probability maps: ``sum_l prob[l] * g[d, l]``.

    The maps are used as given, not renormalised (kornia's ``spatial_expectation2d``).

    Parameters
    ----------
    prob : ndarray
        ``(N, C, *spatial)`` or ``(N, *spatial, C)`` maps, e.g. from :func:`spatial_softmax`.
    grid : array_like ``(*spatial, D)``, optional
        The coordinates of each position (any D >= 1, e.g. kornia's ``create_meshgrid``
        without its batch axis); default: the grid of ``coordinates``, fastest axis first.
    coordinates : {"normalized", "pixels"}
        As in :func:`soft_argmax`, when ``grid`` is not given.
    return_variance : bool
        Also return ``sum_l prob[l] * (g[d, l] - E_d)^2``.
    layout, threads
        As in :func:`spatial_softmax`.
    out : ndarray, optional
        Buffer for the expectations ``(N, C, D)``.

    Returns
    -------
    expectation : ndarray ``(N, C, D)`` of prob's dtype
    variance : ndarray ``(N, C, D)``, only with ``return_variance``
    """
    B, device = _backend(("prob", prob), ("out", out))
    with device:
        prob, geom, t, _, nt = _common(B, prob, "prob", layout, 1.0, threads)
        coordinates = V.check_choice(coordinates, "coordinates", V.COORDINATES)
        want_var = V.check_flag(return_variance, "return_variance")
        g = None if grid is None else V.check_grid(grid, geom.spatial)
        D = len(geom.spatial) if g is None else g.shape[0]
        kshape = (geom.N, geom.C, D)
        out = V.check_out(out, "out", kshape, prob.dtype, [("prob", prob)])
        kp = _empty(prob, kshape, prob.dtype) if out is None else out
        var = _empty(prob, kshape, prob.dtype) if want_var else None
        B.positions(PosOp.EXPECT,
                    PositionsProblem(geom, prob, _temperature_for(B, prob, t),
                                     from_prob=True, keypoints=kp, variance=var,
                                     **_grid_args(B, geom, prob, coordinates, g)), nt)
        return _results(kp, var)
