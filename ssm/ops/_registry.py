"""The operator registry: frozen schemas, inference functions and gradient wiring.

Mirrors caffe2/operators/spatial_softmax_with_loss_op.cc: OPERATOR_SCHEMA,
TensorInferenceFunction, GetSoftmaxWithLossGradient and REGISTER_*_OPERATOR.
"""
from __future__ import annotations

import contextlib
import math
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
    """A Caffe2 argument; ``check(value, name)`` validates a given value and returns it."""

    name: str
    type: type
    default: object
    doc: str
    check: Callable = None


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
        """Caffe2 arguments with defaults filled in and checked as the operator's
        constructor does (``CAFFE_ENFORCE``); unknown names are a ValueError."""
        known = {a.name: a for a in self.arguments}
        unknown = sorted(set(given) - set(known))
        if unknown:
            raise ValueError(f"{unknown[0]}: not an argument of {self.name}; expected "
                             f"{', '.join(sorted(known))}")
        out = {}
        for a in self.arguments:
            value = given.get(a.name, a.default)
            out[a.name] = a.check(value, a.name) if a.check is not None else value
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
# What Caffe2 enforces (spatial_softmax_with_loss_op.{h,cc}): scale >= 0 and order NCHW
# in both constructors; X 4-D, T 3-D with T's N equal to X's; a label in [0, D) unless
# it is -1 (the forward only; its gradient writes out of bounds, ssm's rejects it too).
# ssm also checks what Caffe2 takes on trust: T and W are (N, H, W), P is X's shape,
# W, P and the outputs have X's dtype (Caffe2: float throughout; ssm: float32 and
# float64 on the CPU, also float16 on the GPU), d_loss is a non-empty float array.
# infer and run call the same checks on (shape, dtype) pairs, so they agree.

_ARGS = (
    Arg("scale", float, 1.0, "multiplies the gradient (Caffe2's CPU operator: not the loss); "
        ">= 0", check=V.check_scale),
    Arg("order", str, "NCHW", "storage order; only NCHW", check=V.check_order),
)

_SSWL_DOC = """Softmax over the channels of a 4-D NCHW input and the weighted mean of the
per-pixel cross entropy -log(max(P[n, T[n,h,w], h, w], 1e-20)) * W[n,h,w] over the
pixels whose label is not -1 (0 if their total weight is 0)."""

# ssm's public functions name their parameters; errors they raise (a label outside
# [0, C), a NumPy array beside a CuPy one) are re-raised with the Caffe2 input's name.
_CAFFE2_NAMES = {"logits": "X", "prob": "P", "target": "T", "weights": "W"}


@contextlib.contextmanager
def _caffe2_names():
    try:
        yield
    except (TypeError, ValueError) as e:
        name, sep, rest = str(e).partition(": ")
        if not sep or name not in _CAFFE2_NAMES:
            raise
        raise type(e)(f"{_CAFFE2_NAMES[name]}: {rest}") from None


def _check_sswl(shapes, dtypes):
    """X (N, C, H, W) float, T (N, H, W) int32, optional W (N, H, W) of X's dtype."""
    x, t = shapes[0], shapes[1]
    V.check_any_float_dtype(dtypes[0], "X")
    V.check_ndim(x, "X", 4, "(N, C, H, W)")
    V.check_caffe2_classes(x, "X")
    V.check_caffe2_labels_dtype(dtypes[1], "T")
    V.check_ndim(t, "T", 3, "(N, H, W)")
    pixels = (x[0], x[2], x[3])
    V.check_shape_matches(t, "T", pixels, "X", x)
    if len(shapes) > 2:
        V.check_dtype_matches(dtypes[2], "W", dtypes[0], "X")
        V.check_shape_matches(shapes[2], "W", pixels, "X", x)


def _check_sswl_grad(shapes, dtypes):
    """X, T, [W] as in the forward; P of X's shape and dtype; d_loss a non-empty float array."""
    _check_sswl(shapes[:-2], dtypes[:-2])
    V.check_dtype_matches(dtypes[-2], "P", dtypes[0], "X")
    V.check_shape_matches(shapes[-2], "P", shapes[0], "X", shapes[0])
    V.check_caffe2_grad_output(shapes[-1], dtypes[-1], "d_loss")


def _arrays(inputs, schema, check):
    """The inputs as arrays named by the schema (W omitted when absent), checked as
    ``check`` checks shapes and dtypes, X's dtype against its device."""
    names = [i.name for i in schema.inputs]
    if len(inputs) < len(names):
        names.remove("W")
    arrays = [V.as_array(a, n) for a, n in zip(inputs, names)]
    check([a.shape for a in arrays], [a.dtype for a in arrays])
    V.check_float_dtype(arrays[0], "X")
    return arrays


def _infer_sswl(shapes, dtypes):
    _check_sswl(shapes, dtypes)
    return [(shapes[0], dtypes[0]), ((), dtypes[0])]


def _run_sswl(inputs, args):
    x, t, *w = _arrays(inputs, REGISTRY["SpatialSoftmaxWithLoss"].schema, _check_sswl)
    with _caffe2_names():
        prob, loss = _api._sswl_forward(x, t, w[0] if w else None, ignore_index=-1,
                                        reduction="mean", loss_cap=CAFFE2_LOSS_CAP)
    return [prob, loss]


def _infer_sswl_grad(shapes, dtypes):
    _check_sswl_grad(shapes, dtypes)
    return [(shapes[0], dtypes[0])]


def _run_sswl_grad(inputs, args):
    x, t, *w, prob, d_loss = _arrays(inputs, REGISTRY["SpatialSoftmaxWithLossGradient"].schema,
                                     _check_sswl_grad)
    # Caffe2 multiplies by d_loss's first element (in float64 here); a CuPy one stays on
    # its device.
    d = d_loss.reshape(-1)[:1].astype(np.float64) * args["scale"]
    with _caffe2_names():
        return [_api.spatial_softmax_with_loss_grad(prob, t, w[0] if w else None, d,
                                                    ignore_index=-1, reduction="mean")]


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
