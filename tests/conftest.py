"""Shared fixtures and helpers: the tables under test, seeded inputs, tolerances, the GPU
and simulator skip hooks, and the requirements a run can promise (SSM_REQUIRE)."""

import importlib
import os
import zlib

import numpy as np
import pytest

from ssm import _validation as V

# What ssm supports, read from its one table (ssm/_validation.py), as NumPy scalar types.
FLOAT_DTYPES = tuple(d.type for d in V.FLOAT_DTYPES["cpu"])
GPU_FLOAT_DTYPES = tuple(d.type for d in V.FLOAT_DTYPES["cuda"])
LABEL_DTYPES = tuple(d.type for d in V.LABEL_KINDS)
LAYOUTS = V.LAYOUTS
REDUCTIONS = V.REDUCTIONS


# ---------------------------------------------------------------- GPU and simulator skip hooks


def _gpu_unavailable_reason():
    try:
        import cupy
    except Exception as exc:  # ImportError, or a broken CUDA install
        return f"CuPy is not importable ({type(exc).__name__}: {exc})"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        return f"no CUDA device ({type(exc).__name__}: {exc})"
    if count == 0:
        return "no CUDA device (getDeviceCount() == 0)"
    return None


def _cudasim_unavailable_reason():
    from ssm.testing.cudasim import SimulatorError, _module
    try:
        _module.find_compiler()
    except SimulatorError as exc:
        return str(exc)
    return None


# ---------------------------------------------------------------- promised requirements

# Tools and libraries whose absence makes a test skip. A run can promise some of them:
# SSM_REQUIRE=nvcc,nvrtc,... (.ci/run sets it per stage; "all" for every one). There a test
# that would skip for want of a promised one fails instead, so a check CI promises cannot
# silently go unrun. Not requirements, and so still skipping everywhere: the GPU cases
# without a CUDA device, the opt-in slow tests (SSM_SLOW=1), and platform conditions.
REQUIREMENTS = {
    "cudasim": "the CUDA simulator (a C++17 compiler): the cases marked cudasim",
    "nvcc": "nvcc on PATH: tests/test_cuda_compile.py's builds",
    "nvrtc": "CuPy and NVRTC: tests/test_cuda_compile.py's NVRTC builds",
    "torch": "PyTorch: the parity tests, ssm.torch and DLPack with it",
    "jax": "JAX (and optax): ssm.jax and DLPack with it",
    "kornia": "kornia: the parity tests of the softmax over positions",
    "hypothesis": "hypothesis: tests/test_properties.py",
    "dask": "dask.array and dask.distributed: ssm.dask (tests/test_dask.py)",
    "mpi": "mpi4py and mpiexec: the MPI data-parallel example",
    "source-tree": "the source tree's benchmarks/ (tests run from a clone)",
}


def _required(text):
    names = {n.strip() for n in text.split(",") if n.strip()}
    if "all" in names:
        names = set(REQUIREMENTS)
    unknown = names - set(REQUIREMENTS)
    if unknown:
        raise pytest.UsageError(f"SSM_REQUIRE: unknown requirement(s) {sorted(unknown)}; "
                                f"expected some of {sorted(REQUIREMENTS)} or 'all'")
    return frozenset(names)


REQUIRED = _required(os.environ.get("SSM_REQUIRE", ""))
REQUIRE_CUDASIM = "cudasim" in REQUIRED


def missing(requirement, reason):
    """Skip the calling test because `requirement` (a key of REQUIREMENTS) is missing;
    fail it instead where the run promised that requirement (SSM_REQUIRE)."""
    assert requirement in REQUIREMENTS, requirement
    if requirement in REQUIRED:
        pytest.fail(f"{reason}; SSM_REQUIRE promises {requirement} "
                    f"({REQUIREMENTS[requirement]})", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def require_module(requirement, name):
    """``pytest.importorskip(name)``, a failure where `requirement` is promised."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        missing(requirement, f"could not import {name!r}: {exc}")


def pytest_collection_modifyitems(config, items):
    for marker, why in (("gpu", _gpu_unavailable_reason), ("cudasim", _cudasim_unavailable_reason)):
        marked = [item for item in items if item.get_closest_marker(marker)]
        reason = why() if marked and not (marker == "cudasim" and REQUIRE_CUDASIM) else None
        if reason is None:
            continue
        skip = pytest.mark.skip(reason=reason)
        for item in marked:
            item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if REQUIRE_CUDASIM and report.skipped and item.get_closest_marker("cudasim"):
        report.outcome = "failed"
        report.longrepr = ("a simulator case skipped where SSM_REQUIRE promises cudasim: "
                           f"{report.longrepr}")


# ---------------------------------------------------------------- randomness


@pytest.fixture
def rng(request):
    """A Generator seeded from the test id: fresh inputs per test, reproducible per test."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


def make_logits(rng, shape, dtype=np.float64):
    return (2.0 * rng.standard_normal(shape)).astype(dtype)


def make_labels(rng, shape, C, dtype=np.int64, ignore_index=-1, ignore_frac=0.1):
    """Labels uniform in [0, C); about ``ignore_frac`` of them set to ``ignore_index``
    (skipped when ``ignore_index`` does not fit ``dtype``)."""
    y = rng.integers(0, C, size=shape)
    info = np.iinfo(dtype)
    if ignore_frac and info.min <= ignore_index <= info.max:
        y[rng.random(shape) < ignore_frac] = ignore_index
    return y.astype(dtype)


def make_weights(rng, shape, dtype=np.float64):
    """Per-pixel weights in [0, 2), a few exactly 0."""
    w = 2.0 * rng.random(shape)
    w[rng.random(shape) < 0.05] = 0.0
    return w.astype(dtype)


def make_class_weights(rng, C, dtype=np.float64):
    return (0.25 + 1.75 * rng.random(C)).astype(dtype)


def make_soft_targets(rng, shape, dtype=np.float64, layout="NCHW"):
    """Random distributions over the class axis of ``shape`` (given in ``layout``)."""
    axis = -1 if layout == "NHWC" else 1
    t = rng.random(shape) ** 3
    t /= t.sum(axis=axis, keepdims=True)
    return t.astype(dtype)


def make_lens(rng, C, dtype=np.float64):
    """A random row-stochastic (C, C) lens; rows sum to 1 within float64 rounding."""
    L = rng.random((C, C)) ** 2
    return (L / L.sum(axis=1, keepdims=True)).astype(dtype)


def logits_shape(N, C, spatial, layout):
    return (N, C, *spatial) if layout == "NCHW" else (N, *spatial, C)


# ---------------------------------------------------------------- tolerances


def is_half(dtype):
    return np.dtype(dtype).name in V.HALF_DTYPE_NAMES


def ref_opts(opts, dtype=None):
    """The reference's options of a call's; for half logits, class weights and lenses as
    the library uses them: rounded to the logits' dtype (the GPU's rule), so that the
    comparison measures the computation, not that rounding amplified by cancellation in
    A q - a."""
    ropts = {k: v for k, v in opts.items() if k not in ("validate", "threads", "out")}
    if dtype is not None and is_half(dtype):
        for k in ("class_weights", "lens"):
            if ropts.get(k) is not None:
                ropts[k] = np.asarray(ropts[k], np.float64).astype(dtype)
    return ropts


def finfo(dtype):
    """np.finfo, or ml_dtypes.finfo for bfloat16 (NumPy's does not know it)."""
    if np.dtype(dtype).name == "bfloat16":
        import ml_dtypes
        return ml_dtypes.finfo(dtype)
    return np.finfo(dtype)


def eps(dtype):
    return float(finfo(dtype).eps)


def tol(dtype, scale=1.0, factor=64):
    """``rtol`` and ``atol`` as ``factor`` eps of ``dtype``; ``atol`` is relative to ``scale``
    (the magnitude of the terms that were summed). Half types are computed in float32 and
    rounded once: ``factor`` float32 eps plus two half roundings (the output's, and that of
    the class weights or lens, rounded to the logits' dtype as the inputs are: half an ulp
    each, relative) and half the smallest float16 subnormal (absolute); not ``factor``
    half eps."""
    if is_half(dtype):
        e = factor * eps(np.float32)
        return {"rtol": e + eps(dtype), "atol": e * float(scale) + 2.0 ** -25}
    e = factor * eps(dtype)
    return {"rtol": e, "atol": e * float(scale)}


def assert_close(actual, desired, dtype, scale=1.0, factor=64, rounded_input=False):
    """``rounded_input``: one side was computed from an intermediate rounded to ``dtype``
    (the gradient from a returned prob, against the fused one): for half types that moves
    it by up to an ulp of the result's magnitude ``scale``, absolute (A q - a cancels)."""
    actual = np.asarray(actual)
    t = tol(dtype, scale, factor)
    if rounded_input and is_half(dtype):
        t["atol"] += eps(dtype) * float(scale)
    np.testing.assert_allclose(actual.astype(np.float64), desired, **t, equal_nan=True)


def child_process_kwargs(tmp_path):
    """``subprocess`` keywords for a child Python that imports the ssm this process
    tests: run from an empty folder (from the repository root, ``import ssm`` would find
    the uncompiled source folder first) with that ssm's parent folder on PYTHONPATH
    (an in-place build, as .ci/asan makes, is not installed)."""
    import ssm
    root = os.path.dirname(os.path.dirname(os.path.abspath(ssm.__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return {"cwd": str(tmp_path), "env": env}
