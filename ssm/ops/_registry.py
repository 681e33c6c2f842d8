"""The operator registry: frozen schemas, inference functions and gradient wiring.

Mirrors caffe2/operators/spatial_softmax_with_loss_op.cc: OPERATOR_SCHEMA,
TensorInferenceFunction, GetSoftmaxWithLossGradient and REGISTER_*_OPERATOR.
"""
from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .. import _api
from .. import _validation as V

# Caffe2 clamps the probability at 1e-20f: -log(max(P, 1e-20f)) <= -log(1e-20f).
CAFFE2_LOSS_CAP = -math.log(float(np.float32(1e-20)))


@dataclass(frozen=True)
class Input:
    name: str
    doc: str
    optional: bool = False


@dataclass(frozen=True)
class Arg:
    name: str
    type: type
    default: object
    doc: str


@dataclass(frozen=True)
class OpSchema:
    name: str
    inputs: tuple
    outputs: tuple
    arguments: tuple
    doc: str

    @property
    def min_inputs(self) -> int:
        return sum(not i.optional for i in self.inputs)

    @property
    def max_inputs(self) -> int:
        return len(self.inputs)

    def check_input_count(self, n: int) -> None:
        if not self.min_inputs <= n <= self.max_inputs:
            expected = (f"{self.min_inputs}" if self.min_inputs == self.max_inputs
                        else f"{self.min_inputs} to {self.max_inputs}")
            raise ValueError(f"inputs: {self.name} takes {expected} inputs "
                             f"({', '.join(i.name for i in self.inputs)}), got {n}")

    def arguments_from(self, given: dict) -> dict:
        """Caffe2 arguments with defaults filled in; unknown names are a ValueError."""
        known = {a.name: a for a in self.arguments}
        unknown = sorted(set(given) - set(known))
        if unknown:
            raise ValueError(f"{unknown[0]}: not an argument of {self.name}; expected "
                             f"{', '.join(sorted(known))}")
        out = {}
        for a in self.arguments:
            value = given.get(a.name, a.default)
            if a.type is float and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
                raise TypeError(f"{a.name}: expected a number, got {value!r}")
            out[a.name] = a.type(value)
        return out


_REF = re.compile(r"^(I|O|GO)\((\d+)\)$")


@dataclass(frozen=True)
class GradientDef:
    """A gradient operator and its inputs in Caffe2's vocabulary.

    ``inputs`` lists every reference; those in ``present_if_given`` appear only when
    the forward operator had that input (Caffe2 inserts ``I(2)`` for the weights).
    """

    op: str
    inputs: tuple
    outputs: tuple
    present_if_given: frozenset = field(default_factory=frozenset)

    def wiring(self, n_forward_inputs: int) -> tuple:
        """The input references for a forward operator that had `n_forward_inputs`."""
        keep = []
        for ref in self.inputs:
            kind, k = _REF.match(ref).groups()
            if ref in self.present_if_given and int(k) >= n_forward_inputs:
                continue
            keep.append(ref)
        return tuple(keep)

    def inputs_for(self, forward_inputs, forward_outputs, output_grads: dict) -> list:
        """The gradient operator's inputs: ``output_grads`` maps an output index to its gradient."""
        pools = {"I": list(forward_inputs), "O": list(forward_outputs), "GO": output_grads}
        wired = []
        for ref in self.wiring(len(forward_inputs)):
            kind, k = _REF.match(ref).groups()
            try:
                wired.append(pools[kind][int(k)])
            except (IndexError, KeyError):
                raise ValueError(f"output_grads: the gradient needs {ref}, which was not given") from None
        return wired


@dataclass(frozen=True)
class OpDef:
    schema: OpSchema
    infer: Callable
    run: Callable
    gradient: GradientDef | None
    devices: frozenset


# ---- SpatialSoftmaxWithLoss ------------------------------------------------------

_ARGS = (
    Arg("scale", float, 1.0, "multiplies the gradient (Caffe2's CPU operator: not the loss)"),
    Arg("order", str, "NCHW", "storage order; only NCHW"),
)

_SSWL_DOC = """Softmax over the channels of a 4-D NCHW input and the weighted mean of the
per-pixel cross entropy -log(max(P[n, T[n,h,w], h, w], 1e-20)) * W[n,h,w] over the
pixels whose label is not -1 (0 if their total weight is 0)."""


def _check_order(args):
    if args["order"] != "NCHW":
        raise ValueError(f"order: {args['order']!r} is not supported; only 'NCHW' is")


def _check_caffe2_shapes(x_shape, t_shape):
    if len(x_shape) != 4:
        raise ValueError(f"X: shape {tuple(x_shape)} is not 4-D; expected (N, C, H, W)")
    if len(t_shape) != 3:
        raise ValueError(f"T: shape {tuple(t_shape)} is not 3-D; expected (N, H, W)")


def _check_labels(t):
    t = V.as_array(t, "T")
    if t.dtype != np.int32:
        raise TypeError(f"T: dtype {t.dtype} is not supported; Caffe2 labels are int32")
    return t


def _infer_sswl(shapes, dtypes):
    x_shape, t_shape = shapes[0], shapes[1]
    _check_caffe2_shapes(x_shape, t_shape)
    return [(tuple(x_shape), np.dtype(dtypes[0])), ((), np.dtype(np.float32))]


def _run_sswl(inputs, args):
    _check_order(args)
    x, t = V.as_array(inputs[0], "X"), _check_labels(inputs[1])
    _check_caffe2_shapes(x.shape, t.shape)
    w = inputs[2] if len(inputs) > 2 else None
    prob, loss = _api._sswl_forward(x, t, w, ignore_index=-1, reduction="mean",
                                    loss_cap=CAFFE2_LOSS_CAP)
    return [prob, loss]


def _infer_sswl_grad(shapes, dtypes):
    _check_caffe2_shapes(shapes[0], shapes[1])
    return [(tuple(shapes[0]), np.dtype(dtypes[0]))]


def _run_sswl_grad(inputs, args):
    _check_order(args)
    x, t = V.as_array(inputs[0], "X"), _check_labels(inputs[1])
    _check_caffe2_shapes(x.shape, t.shape)
    w = inputs[2] if len(inputs) == 5 else None
    prob, d_loss = V.as_array(inputs[-2], "P"), V.as_array(inputs[-1], "d_loss")
    if prob.shape != x.shape:
        raise ValueError(f"P: shape {prob.shape} differs from X's {x.shape}")
    if d_loss.size < 1:
        raise ValueError("d_loss: empty; Caffe2 reads its first element")
    scale = args["scale"]
    if scale < 0:
        raise ValueError(f"scale: {scale} < 0; Caffe2 requires scale >= 0")
    d = float(d_loss.reshape(-1)[0]) * scale
    return [_api.spatial_softmax_with_loss_grad(prob, t, w, d, ignore_index=-1, reduction="mean")]


REGISTRY = {
    "SpatialSoftmaxWithLoss": OpDef(
        schema=OpSchema(
            name="SpatialSoftmaxWithLoss",
            inputs=(Input("X", "logits, (N, C, H, W)"),
                    Input("T", "int32 labels, (N, H, W); -1 is ignored"),
                    Input("W", "per-pixel weights, (N, H, W)", optional=True)),
            outputs=(Input("P", "softmax of X over C, (N, C, H, W)"),
                     Input("loss", "scalar weighted mean loss")),
            arguments=_ARGS,
            doc=_SSWL_DOC),
        infer=_infer_sswl,
        run=_run_sswl,
        gradient=GradientDef(op="SpatialSoftmaxWithLossGradient",
                             inputs=("I(0)", "I(1)", "I(2)", "O(0)", "GO(1)"),
                             outputs=("GI(0)",),
                             present_if_given=frozenset({"I(2)"})),
        devices=frozenset({"cpu"}),
    ),
    "SpatialSoftmaxWithLossGradient": OpDef(
        schema=OpSchema(
            name="SpatialSoftmaxWithLossGradient",
            inputs=(Input("X", "logits (used for its shape)"),
                    Input("T", "int32 labels, (N, H, W)"),
                    Input("W", "per-pixel weights, (N, H, W)", optional=True),
                    Input("P", "softmax output of the forward operator"),
                    Input("d_loss", "gradient of the loss; its first element is used")),
            outputs=(Input("dX", "gradient of the loss with respect to X"),),
            arguments=_ARGS,
            doc="dX = d_loss * scale * W * (P - one_hot(T)) / sum(W), 0 where T == -1."),
        infer=_infer_sswl_grad,
        run=_run_sswl_grad,
        gradient=None,
        devices=frozenset({"cpu"}),
    ),
}
