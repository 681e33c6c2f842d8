"""What a backend is given: one validated call, by name.

``ssm/_api.py`` validates every argument (``_validation``), allocates the outputs and
builds one ``Problem``; a backend's ``run(op, problem, threads)``,
``run_loss(op, problem, threads, divisor)``, ``run_checked(op, problem, threads,
divisor)`` and ``stats(problem, threads)`` read it and nothing else (ssm/_cpu.pyx, ssm/_gpu.py). Every array is C-contiguous, typed as the
kernels need and on the backend's device; ``None`` means "not given". Which fields an op reads:

=============  ====================================================================
op             reads (besides ``geom``, ``x`` and ``out``)
=============  ====================================================================
SOFTMAX,       nothing else
LOG_SOFTMAX
SOFTMAX_BWD    ``dprob`` (``x`` holds prob)
SSWL_FWD       target, kind, weights, class_weights, lens, smoothing, ignore_index,
               loss, loss_cap; writes ``out`` (prob) and ``loss_map``; with ``out``
               None, the loss alone (nothing of the logits' size is written)
SSWL_FWD_BWD   as SSWL_FWD, plus ``d_loss``, ``d_loss_map``, ``divisor``; writes ``out``
               (dlogits), ``prob_out`` and ``loss_map``
SSWL_BWD       as SSWL_FWD_BWD without ``loss``, ``loss_cap``, ``prob_out``, ``loss_map``
               (``x`` holds prob)
=============  ====================================================================
``stats`` (the label pre-pass) reads target, kind, weights, class_weights, ignore_index.

The gradient is ``d_loss * d_loss_map[p] / divisor`` times the per-pixel math, 0 when the
divisor is 0. On the GPU ``d_loss`` and ``divisor`` may each be a 0-d float64 device array
(d_loss handed over on the device, the "mean" normaliser from ``stats``), so that no value
comes to the host; on the CPU they are floats.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple

from ._codes import Loss, Target
from ._validation import Geometry, PositionsGeometry


_new = tuple.__new__


class Problem(NamedTuple):
    """One call of a kernel pass, validated (see the module docstring)."""

    # the inputs
    geom: Geometry             # the logits' shape as (outer, C, inner)
    x: Any                     # logits, or prob for SOFTMAX_BWD and SSWL_BWD
    dprob: Any = None          # SOFTMAX_BWD: the gradient with respect to prob
    target: Any = None         # labels (N, *spatial) or a soft target map like x
    kind: Target = Target.NONE
    weights: Any = None        # per-pixel weights (N, *spatial)
    class_weights: Any = None  # (C,), x's dtype
    lens: Any = None           # (C, C), rows are distributions, x's dtype
    smoothing: float = 0.0
    ignore_index: int = -1
    loss: Loss = Loss.CROSS_ENTROPY  # the per-pixel criterion (the gradient is the same)
    # what the pass writes, and the gradient's scale: set by finish()
    out: Any = None            # prob, log-prob or dlogits
    loss_cap: float = math.inf  # per-unit-weight pixel loss cap (Caffe2's clamp)
    d_loss: Any = 1.0          # the gradient of the reduced loss: float or 0-d device array
    d_loss_map: Any = None     # reduction="none": the per-pixel d_loss (N, *spatial)
    divisor: Any = 1.0         # the reduction's divisor: float or 0-d device array
    prob_out: Any = None       # SSWL_FWD_BWD: also write prob here
    loss_map: Any = None       # reduction="none": write the per-pixel loss here

    def finish(self, out, loss_cap=math.inf, d_loss=1.0, d_loss_map=None, divisor=1.0,
               prob_out=None, loss_map=None):
        """These inputs with the pass's outputs and gradient scale (the fields from ``out``
        on): ``_replace`` without its cost (a microsecond per call, of about twenty)."""
        return _new(Problem, self[:_INPUTS] + (out, loss_cap, d_loss, d_loss_map, divisor,
                                               prob_out, loss_map))


_INPUTS = Problem._fields.index("out")


class PositionsProblem(NamedTuple):
    """One call of a softmax-over-positions pass (an ssm._codes.PosOp), validated.

    Arrays C-contiguous on the backend's device; ``x``, ``dprob`` and ``out`` like x; the
    keypoint arrays ``(N, C, D)`` of x's dtype; ``grid`` ``(D, L)`` coordinates (the CPU:
    x's dtype; the GPU: float64); ``temperature`` ``(C,)`` float64; ``d_temperature`` one
    float64 per map ``(N * C,)``, summed over the maps by the caller.

    =============  ===================================================================
    op             reads (besides geom, x, temperature); writes
    =============  ===================================================================
    SOFTMAX        -; out (prob)
    SOFTMAX_BWD    dprob (x holds prob); out (dx), d_temperature if given
    EXPECT         grid, from_prob; keypoints, variance and out (prob) where given
    EXPECT_BWD     grid, from_prob, d_keypoints; out (dx), keypoints and d_temperature
                   where given
    =============  ===================================================================
    """

    geom: PositionsGeometry
    x: Any
    temperature: Any
    grid: Any = None
    dprob: Any = None
    d_keypoints: Any = None
    from_prob: bool = False
    out: Any = None
    keypoints: Any = None
    variance: Any = None
    d_temperature: Any = None
    grid_sizes: Any = None  # GPU, built-in grids of <= 3 axes: the axis sizes, fastest
    #                         first (a tuple); grid then holds one table per axis
    grid_w: int = 0  # W when grid is the built-in grid of (H, W) maps, else 0 (CPU hint)
