"""The backend contract: codes defined once (ssm/_codes.py) and what each backend is given.

- The C values of the op selectors and target kinds (compiled into ssm/_cpu.pyx and
  ssm/_kernels.h) equal ssm._codes.Op and ssm._codes.Target.
- The CPU's kernel families cover exactly the CPU dtype table.
- Every CUDA kernel's arguments, as ssm/_gpu.py builds them, match the kernel's signature
  in the .cu text: count, scalar types by position, and the dtype of every pointer. CuPy
  packs arguments by position and checks none of this; a mismatch would read garbage on a
  GPU (the simulator, which runs the same builders, would most likely crash or misread too,
  but this names the parameter). No GPU and no CUDA toolkit needed.
"""
from __future__ import annotations

import re

import numpy as np
import pytest

from ssm import _cpu, _gpu
from ssm import _validation as V
from ssm._codes import LABEL_KINDS, LOSSES, Loss, Op, PosOp, Target
from ssm._problem import PositionsGeometry, PositionsProblem, Problem


def test_op_and_target_codes_match_the_c_values():
    ops, targets, losses = _cpu.kernel_codes()
    assert ops == {op.name: op.value for op in Op}
    assert targets == {kind.name: kind.value for kind in Target}
    assert losses == {kind.name: kind.value for kind in Loss}
    assert set(LOSSES.values()) == set(Loss)


def test_cuda_loss_codes_match():
    text = _gpu.source("sswl.cu")
    for kind in Loss:
        assert f"SSM_LOSS_{kind.name} = {kind.value}" in text


def test_positions_codes_match_the_c_values():
    assert _cpu.positions_codes() == {op.name: op.value for op in PosOp}


def test_label_kinds_are_the_integer_targets():
    assert set(LABEL_KINDS.values()) == set(Target) - {Target.NONE, Target.SOFT}
    assert V.LABEL_KINDS is LABEL_KINDS  # validation reads the one table


def test_cpu_kernel_families_cover_the_cpu_dtypes():
    # by dtype name (bfloat16 is ml_dtypes'); the half types run the float32 kernels
    assert set(_cpu.KERNELS) == {d.name for d in V.FLOAT_DTYPES["cpu"]}
    assert len(set(_cpu.KERNELS.values())) == len(_cpu.KERNELS)


# ---- the CUDA kernels' arguments --------------------------------------------------------

_SIGNATURE = re.compile(
    r"__global__\s+void\s+(?:__launch_bounds__\s*\([^)]*\)\s+)?(\w+)\s*\(([^)]*)\)", re.S)
_SCALARS = {"long long": np.int64, "int": np.int32, "double": np.float64}


def _kernel_signatures():
    """{kernel name: [(C type, parameter name)]} for every __global__ in ssm/cuda/*.cu."""
    kernels = {}
    for filename in _gpu.CUDA_FILES:
        for name, params in _SIGNATURE.findall(_gpu.source(filename)):
            parsed = []
            for param in params.split(","):
                words = param.replace("__restrict__", " ").replace("const", " ").split()
                ctype, pname = " ".join(words[:-1]), words[-1]
                parsed.append((ctype, pname))
            assert name not in kernels, f"two kernels named {name}"
            kernels[name] = parsed
    return kernels


def test_every_kernel_has_a_builder():
    assert set(_kernel_signatures()) == set(_gpu.ARGUMENT_BUILDERS)
    launched = {name.split("<")[0] for f in _gpu.CUDA_FILES for name in _gpu.name_expressions(f)}
    assert launched == set(_gpu.ARGUMENT_BUILDERS)


def _geom(outer, C, inner):
    return V.geometry(np.empty((outer, C, inner), np.uint8), "x", "NCHW")


def _full_problem(T, L):
    """A problem with every optional array given (so every pointer is a real array),
    d_loss and the divisor as 0-d float64 arrays (as on the device)."""
    outer, C, inner = 2, 3, 5
    x = np.zeros((outer, C, inner), T)
    target = np.zeros((outer, C, inner), T) if L == T else np.zeros((outer, inner), L)
    kind = Target.SOFT if L == T else LABEL_KINDS[np.dtype(L)]
    return Problem(_geom(outer, C, inner), x, out=np.zeros_like(x), dprob=np.zeros_like(x),
                   target=target, kind=kind, weights=np.ones((outer, inner), T),
                   class_weights=np.ones(C, T), lens=np.eye(C, dtype=T), smoothing=0.1,
                   ignore_index=-1, loss=Loss.KL, loss_cap=3.0, d_loss=np.ones((), np.float64),
                   d_loss_map=np.ones((outer, inner), T), divisor=np.ones((), np.float64),
                   prob_out=np.zeros_like(x), loss_map=np.zeros((outer, inner), T))


def _positions_problem(T, full):
    """A positions problem of dtype T: every optional array given (full) or none."""
    N, C, H, W = 2, 3, 4, 5
    geom = PositionsGeometry((N, C, H, W), N, C, (H, W), N * C, H * W, 1)
    x = np.zeros((N, C, H, W), T)

    def opt(a):
        return a if full else None
    return PositionsProblem(geom, x, np.ones(C), grid=np.zeros((2, H * W)),
                            grid_sizes=opt((W, H)),
                            dprob=np.zeros_like(x), d_keypoints=opt(np.zeros((N, C, 2), T)),
                            out=opt(np.zeros_like(x)), keypoints=opt(np.zeros((N, C, 2), T)),
                            variance=opt(np.zeros((N, C, 2), T)),
                            d_temperature=opt(np.zeros(N * C)))


def _builds(P):
    """kernel name -> its arguments as _gpu.run / stats / loss_value / positions build them."""
    f64, i64 = np.zeros(4, np.float64), np.zeros(4, np.int64)
    Q = _positions_problem(P.x.dtype, P.weights is not None)
    Q_out = Q._replace(out=np.zeros_like(Q.x))  # the passes that always write out
    return {
        "pos_softmax_fwd": _gpu.pos_softmax_fwd_args(Q_out, 32),
        "pos_softmax_bwd": _gpu.pos_softmax_bwd_args(Q_out, 1),
        "pos_expect": _gpu.pos_expect_args(Q, 32, True),
        "softmax_fwd": _gpu.softmax_fwd_args(P, 32, True),
        "softmax_bwd": _gpu.softmax_bwd_args(P, 32),
        "sswl_stats": _gpu.sswl_stats_args(P, P.class_weights, f64, i64),
        "sswl_fwd": _gpu.sswl_fwd_args(P, 1, P.class_weights, P.lens, True, f64, f64, i64),
        "sswl_bwd": _gpu.sswl_bwd_args(P, 1, P.class_weights, P.lens),
        "reduce_partials": _gpu.reduce_partials_args(f64, 4, P.divisor, P.out[0, 0, :1]),
        "reduce_stats": _gpu.reduce_stats_args(f64, i64, 4, f64[:1], i64[:1]),
        "reduce_loss_stats": _gpu.reduce_loss_stats_args(f64, f64, i64, 4, P.divisor,
                                                         P.out[0, 0, :1], i64[:1]),
    }


@pytest.mark.parametrize("L", [*LABEL_KINDS, "soft"], ids=str)
@pytest.mark.parametrize("T", V.FLOAT_DTYPES["cuda"], ids=str)
def test_argument_builders_match_the_cuda_signatures(T, L):
    L = T if L == "soft" else L
    pointee = {"T": np.dtype(T), "L": np.dtype(L), "double": np.dtype(np.float64),
               "long long": np.dtype(np.int64)}
    P = _full_problem(T, L)
    sparse = P._replace(weights=None, class_weights=None, lens=None,
                        d_loss=1.0, d_loss_map=None, divisor=2.0, prob_out=None, loss_map=None)
    for problem, nullable in ((P, False), (sparse, True)):
        built = _builds(problem)
        for name, params in _kernel_signatures().items():
            args = built[name]
            assert len(args) == len(params), \
                f"{name}: {len(args)} arguments built, the kernel has {len(params)}"
            for arg, (ctype, pname) in zip(args, params):
                where = f"{name}({ctype} {pname})"
                if ctype.endswith("*"):
                    if nullable and type(arg) is np.uint64:
                        assert arg == 0, where  # a null pointer, by value
                        continue
                    assert isinstance(arg, np.ndarray), f"{where}: got {type(arg).__name__}"
                    assert arg.dtype == pointee[ctype[:-1].strip()], f"{where}: {arg.dtype}"
                else:
                    assert type(arg) is _SCALARS[ctype], f"{where}: got {type(arg).__name__}"


def test_loss_alone_passes_a_null_output():
    P = _full_problem(np.float32, np.int64)._replace(out=None)
    params = [name for _, name in _kernel_signatures()["sswl_fwd"]]
    args = _gpu.sswl_fwd_args(P, 1, P.class_weights, P.lens, False, np.zeros(4))
    out = args[params.index("out")]
    assert type(out) is np.uint64 and out == 0
    assert args[params.index("loss")] == int(Loss.KL)


def test_finish_is_replace_of_the_trailing_fields():
    P = _full_problem(np.float32, np.int64)
    outputs = dict(out=1, loss_cap=2, d_loss=3, d_loss_map=4, divisor=5, prob_out=6, loss_map=7)
    assert P.finish(**outputs) == P._replace(**outputs)
    assert type(P.finish(None)) is Problem


def test_cpu_backend_refuses_anything_but_a_problem():
    x = np.zeros((1, 2, 3), np.float32)
    with pytest.raises(TypeError, match="Problem"):
        _cpu.run(Op.SOFTMAX, (_geom(1, 2, 3), x), (1, False))
