"""Caffe2's operator surface for ssm: schemas, tensor inference, gradients, devices, run.

The registry is data plus pure functions, in Caffe2's vocabulary: an ``OpSchema``
per operator, a tensor inference function, a ``GradientDef`` whose inputs are
written ``I(k)`` (forward input k), ``O(k)`` (forward output k) and ``GO(k)`` (the
gradient of forward output k), and the devices that implement it. ``run`` calls
ssm's public functions; no numerical code lives here.

Caffe2 semantics (see docs/semantics.md): labels are int32, the ignore label is
-1, the loss is the weighted mean of ``-log(max(P_y, 1e-20))`` (0 when the total
weight is 0), and ``scale`` multiplies the gradient only. Unlike Caffe2, both
operators reject labels outside ``[0, C)`` instead of reading or writing out of
bounds.

Example
-------
>>> P, loss = ops.run("SpatialSoftmaxWithLoss", [X, T])
>>> g = ops.gradient("SpatialSoftmaxWithLoss")
>>> (dX,) = ops.run(g.op, g.inputs_for([X, T], [P, loss], {1: np.ones((), np.float32)}))
"""
from __future__ import annotations

from .. import _interop
from .. import _validation as V
from ._registry import GradientDef, OpSchema, Arg, Input
from ._registry import REGISTRY as _REGISTRY


def _lookup(name):
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"name: {name!r} is not a registered operator; expected one of "
                         f"{', '.join(repr(n) for n in sorted(_REGISTRY))}") from None


def names() -> list:
    """The registered operator names."""
    return sorted(_REGISTRY)


def schema(name: str) -> OpSchema:
    """The schema of operator `name`: inputs, outputs, arguments and doc."""
    return _lookup(name).schema


def infer(name: str, input_shapes, input_dtypes, **args) -> list:
    """Tensor inference: ``[(shape, dtype), ...]`` of the outputs, without running.

    Checks the shapes, dtypes and arguments as `run` checks its inputs, and raises the
    same errors. float16 and bfloat16 are accepted here, as `run` accepts them on the CPU and
    on the GPU.
    """
    op = _lookup(name)
    op.schema.check_input_count(len(input_shapes))
    if len(input_dtypes) != len(input_shapes):
        raise ValueError(f"input_dtypes: {len(input_dtypes)} dtypes for {len(input_shapes)} shapes")
    op.schema.arguments_from(args)
    shapes = [V.as_shape(s, "input_shapes") for s in input_shapes]
    dtypes = [V.as_dtype(d, "input_dtypes") for d in input_dtypes]
    return op.infer(shapes, dtypes)


def gradient(name: str) -> GradientDef:
    """The gradient operator of `name` and its input wiring."""
    g = _lookup(name).gradient
    if g is None:
        raise ValueError(f"name: operator {name!r} has no registered gradient")
    return g


def devices(name: str) -> frozenset:
    """The devices that implement operator `name` (``"cpu"``, ``"cuda"``)."""
    return _lookup(name).devices


def run(name: str, inputs, **args) -> list:
    """Run operator `name` on `inputs` with Caffe2 arguments; returns its outputs."""
    op = _lookup(name)
    if not isinstance(inputs, (list, tuple)):
        raise TypeError(f"inputs: expected a list of the input arrays, got {V.type_name(inputs)}")
    op.schema.check_input_count(len(inputs))
    arguments = op.schema.arguments_from(args)
    full = len(inputs) == len(op.schema.inputs)  # else W, the optional input, is absent
    names = [i.name for i in op.schema.inputs if full or i.name != "W"]
    return _interop.call_on_list(lambda arrays: op.run(arrays, arguments), inputs, names)


__all__ = ["Arg", "GradientDef", "Input", "OpSchema", "devices", "gradient", "infer", "names",
           "run", "schema"]
