"""The Caffe2 operator surface ssm.ops against the Caffe2 reference in _reference.py."""

import numpy as np
import pytest

import _reference as ref
import ssm
from conftest import assert_close
from ssm import _validation as V
from ssm import ops

FWD = "SpatialSoftmaxWithLoss"
GRAD = "SpatialSoftmaxWithLossGradient"
F32 = np.float32


def caffe2_inputs(rng, n=2, D=5, H=6, W=7, weighted=True):
    """Inputs drawn like caffe2's softmax_ops_test: labels in [-1, D), X = rand + 1e-2."""
    X = (rng.random((n, D, H, W)) + 1e-2).astype(F32)
    T = (rng.random((n, H, W)) * (D + 1)).astype(np.int32) - 1
    inputs = [X, T]
    if weighted:
        inputs.append(rng.random((n, H, W)).astype(F32))
    return inputs


def run_forward_and_gradient(inputs, d_loss, **args):
    """Forward, then the gradient operator fed through the gradient def's wiring."""
    P, loss = ops.run(FWD, inputs, **args)
    g = ops.gradient(FWD)
    pools = {"I": inputs, "O": [P, loss], "GO": {1: d_loss}}
    wired = []
    for r in g.wiring(len(inputs)):
        kind, k = r.rstrip(")").split("(")
        wired.append(pools[kind][int(k)])
    (dX,) = ops.run(g.op, wired, **args)
    return P, loss, dX


# ---------------------------------------------------------------- registry data


def test_schema_forward():
    s = ops.schema(FWD)
    assert s.name == FWD
    assert [i.name for i in s.inputs] == ["X", "T", "W"]
    assert [i.optional for i in s.inputs] == [False, False, True]
    assert [o.name for o in s.outputs] == ["P", "loss"]
    args = {a.name: a for a in s.arguments}
    assert set(args) == {"scale", "order"}
    assert args["scale"].default == 1.0 and args["order"].default == "NCHW"
    assert s.doc.strip()
    assert (s.min_inputs, s.max_inputs) == (2, 3)


def test_schema_gradient():
    s = ops.schema(GRAD)
    assert s.name == GRAD
    assert [i.name for i in s.inputs] == ["X", "T", "W", "P", "d_loss"]
    assert [i.optional for i in s.inputs] == [False, False, True, False, False]
    assert [o.name for o in s.outputs] == ["dX"]
    assert {"scale", "order"} <= {a.name for a in s.arguments}


def test_schemas_are_frozen():
    s = ops.schema(FWD)
    with pytest.raises(AttributeError):
        s.name = "x"
    with pytest.raises(AttributeError):
        ops.gradient(FWD).op = "x"


def test_gradient_wiring():
    g = ops.gradient(FWD)
    assert g.op == GRAD
    assert tuple(g.outputs) == ("GI(0)",)
    # Caffe2's GetSoftmaxWithLossGradient: {I(0), I(1), O(0), GO(1)}, I(2) inserted at 2.
    assert tuple(g.wiring(2)) == ("I(0)", "I(1)", "O(0)", "GO(1)")
    assert tuple(g.wiring(3)) == ("I(0)", "I(1)", "I(2)", "O(0)", "GO(1)")
    with pytest.raises(ValueError, match=r"^name: "):
        ops.gradient(GRAD)


@pytest.mark.parametrize("weighted", [False, True])
def test_inputs_for_matches_wiring(rng, weighted):
    inputs = caffe2_inputs(rng, weighted=weighted)
    outputs = ops.run(FWD, inputs)
    d = np.ones((), F32)
    wired = ops.gradient(FWD).inputs_for(inputs, outputs, {1: d})
    expected = inputs[:2] + inputs[2:] + [outputs[0], d]
    assert len(wired) == len(expected)
    assert all(a is b for a, b in zip(wired, expected))


def test_devices():
    for name in (FWD, GRAD):
        devs = ops.devices(name)
        assert "cpu" in devs
        assert set(devs) <= {"cpu", "cuda"}


def test_unknown_operator():
    for fn in (ops.schema, ops.gradient, ops.devices):
        with pytest.raises(ValueError, match=r"^name: .*'SoftmaxWithLoss'"):
            fn("SoftmaxWithLoss")
    with pytest.raises(ValueError, match=r"^name: "):
        ops.run("SoftmaxWithLoss", [])


# ---------------------------------------------------------------- inference


@pytest.mark.parametrize("weighted", [False, True])
def test_infer_forward(weighted):
    # caffe2 shape_inference_test: img (32, 19, 33, 28), img_labels (32, 33, 28) int32.
    shapes = [(32, 19, 33, 28), (32, 33, 28)] + ([(32, 33, 28)] if weighted else [])
    dtypes = [F32, np.int32] + ([F32] if weighted else [])
    out = ops.infer(FWD, shapes, dtypes)
    assert len(out) == 2
    (s0, d0), (s1, d1) = out
    assert tuple(s0) == (32, 19, 33, 28) and np.dtype(d0) == F32
    assert tuple(s1) == () and np.dtype(d1) == F32


@pytest.mark.parametrize("weighted", [False, True])
def test_infer_matches_run(rng, weighted):
    inputs = caffe2_inputs(rng, n=3, D=4, H=5, W=2, weighted=weighted)
    inferred = ops.infer(FWD, [a.shape for a in inputs], [a.dtype for a in inputs])
    outputs = ops.run(FWD, inputs)
    assert [(tuple(s), np.dtype(d)) for s, d in inferred] == \
        [(o.shape, o.dtype) for o in outputs]
    g = ops.gradient(FWD)
    ginputs = g.inputs_for(inputs, outputs, {1: np.ones((), F32)})
    ginferred = ops.infer(g.op, [a.shape for a in ginputs], [a.dtype for a in ginputs])
    (dX,) = ops.run(g.op, ginputs)
    assert [(tuple(s), np.dtype(d)) for s, d in ginferred] == [(dX.shape, dX.dtype)]


def test_infer_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"^X: .*\(2, 5, 6\)"):
        ops.infer(FWD, [(2, 5, 6), (2, 6)], [F32, np.int32])
    with pytest.raises(ValueError, match=r"^T: .*\(2, 6, 7, 1\)"):
        ops.infer(FWD, [(2, 5, 6, 7), (2, 6, 7, 1)], [F32, np.int32])
    with pytest.raises(ValueError, match=r"^inputs: "):
        ops.infer(FWD, [(2, 5, 6, 7)], [F32])
    with pytest.raises(ValueError, match=r"^inputs: "):
        ops.infer(FWD, [(2, 5, 6, 7), (2, 6, 7), (2, 6, 7), (2, 6, 7)], [F32, np.int32, F32, F32])


# ---------------------------------------------------------------- numerics


@pytest.mark.parametrize("scale", [1.0, 2.5, 0.0])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("shape", [(2, 5, 6, 7), (1, 21, 13, 11), (3, 2, 1, 1)])
def test_forward_and_gradient(rng, shape, weighted, scale):
    n, D, H, W = shape
    inputs = caffe2_inputs(rng, n, D, H, W, weighted=weighted)
    d_loss = np.array([0.75], F32)
    P, loss, dX = run_forward_and_gradient(inputs, d_loss, scale=scale)
    rP, rloss = ref.caffe2_sswl(*inputs)
    assert P.dtype == F32 and P.shape == shape
    assert loss.dtype == F32 and loss.shape == ()
    assert_close(P, rP, F32, scale=1e-6)
    assert_close(loss, rloss, F32, scale=50)  # scale is not applied to the loss
    w = inputs[2] if weighted else None
    rdX = ref.caffe2_sswl_grad(inputs[0], inputs[1], w, P, d_loss, scale=scale)
    assert dX.dtype == F32 and dX.shape == shape
    assert_close(dX, rdX, F32, scale=np.abs(rdX).max())
    # scale multiplies the gradient only: the loss is bit-identical to scale=1.
    _, loss1 = ops.run(FWD, inputs)
    assert loss.tobytes() == loss1.tobytes()


def test_gradient_equals_ssm_mean_gradient(rng):
    # Without clamping, Caffe2's gradient is ssm's "mean" gradient times scale * d_loss.
    X, T, W = caffe2_inputs(rng)
    P, loss, dX = run_forward_and_gradient([X, T, W], np.array(2.0, F32), scale=3.0)
    g = ssm.spatial_softmax_with_loss_grad(P, T, W, 6.0)
    np.testing.assert_allclose(dX, g, rtol=8 * np.finfo(F32).eps, atol=1e-9)


def test_probability_clamp(rng):
    # Label 1 has logit -200: P_y = e^-200 underflows, Caffe2 clamps P at 1e-20f, so
    # that pixel's loss saturates at -log(1e-20f) = 46.0517 (ssm's own loss does not).
    X = np.zeros((1, 4, 1, 2), F32)
    X[0, 1, 0, 0] = -200.0
    T = np.array([[[1, 0]]], np.int32)
    W = np.array([[[1.0, 0.0]]], F32)
    P, loss, dX = run_forward_and_gradient([X, T, W], np.ones(1, F32))
    cap = -np.log(np.float64(np.float32(1e-20)))
    np.testing.assert_allclose(cap, 46.0517, atol=1e-4)
    np.testing.assert_allclose(loss, cap, rtol=4 * np.finfo(F32).eps)
    _, rloss = ref.caffe2_sswl(X, T, W)
    np.testing.assert_allclose(loss, rloss, rtol=4 * np.finfo(F32).eps)
    # ssm's exact loss for the same pixel is 200 + log(3 + e^-200)
    _, exact = ssm.spatial_softmax_with_loss(X, T, W)
    np.testing.assert_allclose(exact, 200 + np.log(3.0), rtol=4 * np.finfo(F32).eps)
    # The gradient keeps P - 1 (no clamp): -1 at the label, P elsewhere, 0 for weight 0.
    np.testing.assert_allclose(dX[0, :, 0, 0], P[0, :, 0, 0] - np.eye(4)[1], atol=1e-7)
    assert np.all(dX[0, :, 0, 1] == 0)
    # Weighted: saturated pixel with weight 2 next to a normal pixel of weight 1.
    W2 = np.array([[[2.0, 1.0]]], F32)
    P2, loss2 = ops.run(FWD, [X, T, W2])
    expected = (2 * cap - np.log(np.float64(P2[0, 0, 0, 1]))) / 3
    np.testing.assert_allclose(loss2, expected, rtol=8 * np.finfo(F32).eps)


@pytest.mark.parametrize("case", ["all_ignored", "zero_weights"])
def test_zero_total_weight(rng, case):
    X, T, W = caffe2_inputs(rng)
    if case == "all_ignored":
        T[...] = -1
    else:
        W[...] = 0
    for inputs in ([X, T, W], [X, T]) if case == "all_ignored" else ([X, T, W],):
        P, loss, dX = run_forward_and_gradient(inputs, np.ones(1, F32), scale=2.0)
        assert loss == 0
        assert np.all(dX == 0)
        assert_close(P, ref.softmax(X), F32, scale=1e-6)


@pytest.mark.parametrize("bad", [5, -2, 100])
@pytest.mark.parametrize("weighted", [False, True])
def test_out_of_range_labels_rejected(rng, bad, weighted):
    inputs = caffe2_inputs(rng, D=5, weighted=weighted)
    inputs[1][1, 2, 3] = bad
    message = rf"^T: label {bad} at index \(1, 2, 3\) is outside \[0, 5\)"
    with pytest.raises(ValueError, match=message):
        ops.run(FWD, inputs)
    # the gradient operator checks too (Caffe2 would write out of bounds)
    P = np.full(inputs[0].shape, 0.2, F32)
    with pytest.raises(ValueError, match=message):
        ops.run(GRAD, inputs + [P, np.ones(1, F32)])


def test_run_argument_errors(rng):
    X, T, W = caffe2_inputs(rng)
    with pytest.raises(ValueError, match=r"^order: .*'NHWC'"):
        ops.run(FWD, [X, T], order="NHWC")
    with pytest.raises(ValueError, match=r"^label_prob: "):
        ops.run(FWD, [X, T], label_prob=1)
    with pytest.raises(TypeError, match=r"^scale: "):
        ops.run(FWD, [X, T], scale="2")
    P, loss = ops.run(FWD, [X, T])
    with pytest.raises(ValueError, match=r"^scale: "):
        ops.run(GRAD, [X, T, P, np.ones(1, F32)], scale=-1.0)
    with pytest.raises(TypeError, match=r"^T: .*int64"):
        ops.run(FWD, [X, T.astype(np.int64)])
    with pytest.raises(ValueError, match=r"^X: "):
        ops.run(FWD, [X[0], T[0]])
    with pytest.raises(ValueError, match=r"^inputs: "):
        ops.run(FWD, [X])
    with pytest.raises(ValueError, match=r"^inputs: "):
        ops.run(GRAD, [X, T, P])


# ---------------------------------------------------------------- what Caffe2 enforces


def _inputs_of(shapes, dtypes):
    """Arrays of the given shapes and dtypes: X of ones, labels 0, weights 1, d_loss 1."""
    return [np.ones(s, d) for s, d in zip(shapes, dtypes)]


def _shapes_dtypes(name, dtype=F32, weighted=True, n=2, D=5, H=6, W=7):
    x, t = (n, D, H, W), (n, H, W)
    shapes, dtypes = [x, t], [dtype, np.int32]
    if weighted:
        shapes.append(t)
        dtypes.append(dtype)
    if name == GRAD:
        shapes += [x, (1,)]
        dtypes += [dtype, dtype]
    return shapes, dtypes


@pytest.mark.parametrize("scale", [-1.0, -1e-30, -np.inf, np.inf, np.nan, np.float32(-2)])
@pytest.mark.parametrize("name", [FWD, GRAD])
def test_scale_must_be_finite_and_non_negative(name, scale):
    # Caffe2's constructors: CAFFE_ENFORCE(scale_ >= 0), in the forward operator too.
    shapes, dtypes = _shapes_dtypes(name)
    with pytest.raises(ValueError, match=r"^scale: .* is not a finite number >= 0"):
        ops.run(name, _inputs_of(shapes, dtypes), scale=scale)
    with pytest.raises(ValueError, match=r"^scale: .* is not a finite number >= 0"):
        ops.infer(name, shapes, dtypes, scale=scale)


@pytest.mark.parametrize("scale", ["2", None, True, 1j])
@pytest.mark.parametrize("name", [FWD, GRAD])
def test_scale_must_be_a_number(name, scale):
    shapes, dtypes = _shapes_dtypes(name)
    with pytest.raises(TypeError, match=r"^scale: expected a number >= 0, got "):
        ops.run(name, _inputs_of(shapes, dtypes), scale=scale)
    with pytest.raises(TypeError, match=r"^scale: expected a number >= 0, got "):
        ops.infer(name, shapes, dtypes, scale=scale)


@pytest.mark.parametrize("name", [FWD, GRAD])
def test_order(rng, name):
    shapes, dtypes = _shapes_dtypes(name)
    inputs = _inputs_of(shapes, dtypes)
    for order in ("NHWC", "nhwc", "CHW", ""):
        with pytest.raises(ValueError, match=rf"^order: '{order}' is not supported; "
                                             r"expected 'NCHW'"):
            ops.run(name, inputs, order=order)
        with pytest.raises(ValueError, match=r"^order: "):
            ops.infer(name, shapes, dtypes, order=order)
    with pytest.raises(TypeError, match=r"^order: expected a string, got int"):
        ops.run(name, inputs, order=2)
    # Caffe2's StringToStorageOrder also reads the lower-case spelling
    lower, upper = ops.run(name, inputs, order="nchw"), ops.run(name, inputs, order="NCHW")
    assert all(a.tobytes() == b.tobytes() for a, b in zip(lower, upper))


def _infer_vs_run(inputs_fwd, dtype):
    outputs = ops.run(FWD, inputs_fwd)
    inferred = ops.infer(FWD, [a.shape for a in inputs_fwd], [a.dtype for a in inputs_fwd])
    assert [(tuple(s), np.dtype(d)) for s, d in inferred] == [(o.shape, o.dtype) for o in outputs]
    assert [np.dtype(d) for _, d in inferred] == [dtype, dtype]
    g = ops.gradient(FWD)
    ginputs = g.inputs_for(inputs_fwd, outputs, {1: outputs[1]})
    ginferred = ops.infer(g.op, [a.shape for a in ginputs], [a.dtype for a in ginputs])
    (dX,) = ops.run(g.op, ginputs)
    assert [(tuple(s), np.dtype(d)) for s, d in ginferred] == [(dX.shape, dX.dtype)]
    assert dX.dtype == dtype


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dtype", V.FLOAT_DTYPES["cpu"], ids=str)
def test_infer_matches_run_every_dtype(rng, dtype, weighted):
    # Both operators, every dtype the CPU accepts: the loss has X's dtype in both.
    inputs = [a.astype(dtype) if a.dtype.kind == "f" else a
              for a in caffe2_inputs(rng, n=2, D=3, H=4, W=5, weighted=weighted)]
    _infer_vs_run(inputs, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dtype", V.FLOAT_DTYPES["cuda"], ids=str)
def test_infer_matches_run_every_dtype_gpu(rng, dtype, weighted):
    import cupy
    inputs = [cupy.asarray(a.astype(dtype) if a.dtype.kind == "f" else a)
              for a in caffe2_inputs(rng, n=2, D=3, H=4, W=5, weighted=weighted)]
    _infer_vs_run(inputs, dtype)


def test_float16_runs_on_the_cpu():
    shapes, _ = _shapes_dtypes(FWD, weighted=False)
    dtypes = [np.float16, np.int32]
    assert [np.dtype(d) for _, d in ops.infer(FWD, shapes, dtypes)] == [np.float16] * 2
    assert [a.dtype for a in ops.run(FWD, _inputs_of(shapes, dtypes))] == [np.float16] * 2


def _bad(name, k, shape=None, dtype=None):
    """The valid inputs of `name` with input k's shape or dtype replaced."""
    shapes, dtypes = _shapes_dtypes(name, weighted=True)
    if shape is not None:
        shapes[k] = shape
    if dtype is not None:
        dtypes[k] = dtype
    return shapes, dtypes


X_SHAPE = r"\(2, 5, 6, 7\)"
BAD_INPUTS = [
    # (operator, (shapes, dtypes), exception, message)
    (FWD, _bad(FWD, 0, shape=(2, 5, 6)), ValueError, r"^X: shape \(2, 5, 6\) is not 4-D"),
    (FWD, _bad(FWD, 0, shape=(2, 5, 6, 7, 1)), ValueError, r"^X: shape .* is not 4-D"),
    (FWD, _bad(FWD, 0, shape=(2, 0, 6, 7)), ValueError, r"^X: .*empty class axis"),
    (FWD, _bad(FWD, 0, dtype=np.int32), TypeError, r"^X: dtype int32 is not supported; "
                                                   r"expected one of .*float16, float32, float64"),
    (FWD, _bad(FWD, 1, shape=(2, 6, 7, 1)), ValueError, r"^T: shape \(2, 6, 7, 1\) is not 3-D"),
    # Caffe2: CAFFE_ENFORCE_EQ(T.dim32(0), N); ssm also checks H and W
    (FWD, _bad(FWD, 1, shape=(3, 6, 7)), ValueError,
     rf"^T: shape \(3, 6, 7\) does not match X's {X_SHAPE}; expected \(2, 6, 7\)"),
    (FWD, _bad(FWD, 1, shape=(2, 7, 6)), ValueError, r"^T: shape \(2, 7, 6\) does not match"),
    (FWD, _bad(FWD, 1, dtype=np.int64), TypeError, r"^T: dtype int64 is not supported; "
                                                   r"expected int32 labels"),
    (FWD, _bad(FWD, 1, dtype=F32), TypeError, r"^T: dtype float32 is not supported; "
                                              r"expected int32 labels"),
    (FWD, _bad(FWD, 2, dtype=np.float64), TypeError, r"^W: dtype float64 differs from X's "
                                                     r"float32"),
    (FWD, _bad(FWD, 2, shape=(2, 6)), ValueError, r"^W: shape \(2, 6\) does not match X's"),
    (GRAD, _bad(GRAD, 0, shape=(2, 5, 42)), ValueError, r"^X: shape \(2, 5, 42\) is not 4-D"),
    (GRAD, _bad(GRAD, 1, dtype=np.uint8), TypeError, r"^T: dtype uint8 is not supported"),
    (GRAD, _bad(GRAD, 2, shape=(2, 6, 8)), ValueError, r"^W: shape \(2, 6, 8\) does not match"),
    (GRAD, _bad(GRAD, 3, shape=(2, 5, 6, 8)), ValueError,
     rf"^P: shape \(2, 5, 6, 8\) does not match X's {X_SHAPE}"),
    (GRAD, _bad(GRAD, 3, dtype=np.float64), TypeError, r"^P: dtype float64 differs from X's"),
    (GRAD, _bad(GRAD, 4, shape=(0,)), ValueError, r"^d_loss: shape \(0,\) is empty"),
    (GRAD, _bad(GRAD, 4, dtype=np.int32), TypeError, r"^d_loss: dtype int32 is not a float"),
]


@pytest.mark.parametrize("name, shapes_dtypes, exc, message", BAD_INPUTS,
                         ids=[f"{n[-8:]}-{m[1:20]}" for n, _, _, m in BAD_INPUTS])
def test_infer_and_run_raise_the_same_errors(name, shapes_dtypes, exc, message):
    shapes, dtypes = shapes_dtypes
    with pytest.raises(exc, match=message):
        ops.infer(name, shapes, dtypes)
    with pytest.raises(exc, match=message):
        ops.run(name, _inputs_of(shapes, dtypes))


def test_infer_argument_types():
    with pytest.raises(TypeError, match=r"^input_shapes: 7 is not a shape"):
        ops.infer(FWD, [(2, 5, 6, 7), 7], [F32, np.int32])
    with pytest.raises(ValueError, match=r"^input_shapes: shape \(2, -5, 6, 7\) has a negative"):
        ops.infer(FWD, [(2, -5, 6, 7), (2, 6, 7)], [F32, np.int32])
    with pytest.raises(TypeError, match=r"^input_dtypes: 'float33' is not a dtype"):
        ops.infer(FWD, [(2, 5, 6, 7), (2, 6, 7)], ["float33", np.int32])
    with pytest.raises(ValueError, match=r"^label_prob: not an argument"):
        ops.infer(FWD, [(2, 5, 6, 7), (2, 6, 7)], [F32, np.int32], label_prob=1)
    # dtype names and numpy scalar types are as good as dtypes
    assert ops.infer(FWD, [[2, 5, 6, 7], [2, 6, 7]], ["float64", "int32"]) == \
        [((2, 5, 6, 7), np.float64), ((), np.float64)]


def test_run_inputs_must_be_a_list(rng):
    X, T, W = caffe2_inputs(rng)
    with pytest.raises(TypeError, match=r"^inputs: expected a list of the input arrays, got "
                                        r"numpy.ndarray"):
        ops.run(FWD, X)
    P, loss = ops.run(FWD, (X, T))  # a tuple is a list
    assert P.shape == X.shape
