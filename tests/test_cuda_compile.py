"""Compile every ssm/cuda/*.cu for sm_80 and sm_90, without a GPU.

The instantiations compiled are exactly those the runtime loads: ``ssm._gpu.name_expressions``
(generated from the dtype tables of ssm/_validation.py). Two compilers:

- nvcc (when on PATH): a wrapper .cu holds the source as ``ssm._gpu.source`` gives it to
  CuPy and takes the address of every name expression; ``-cubin -Xptxas -v`` with every
  warning an error. Fails on a compile error, any warning, any register spill, or a
  missing instantiation.
- NVRTC through ``cupy.cuda.nvrtc`` (when CuPy and libnvrtc are installed): the compiler
  CuPy really uses, with ``ssm._gpu.OPTIONS`` and the same name expressions, to PTX.

The nvcc runs start together (a module fixture) so that the four compiles share the cores.
"""

import re
import shutil
import subprocess

import pytest

from conftest import missing, require_module
from ssm import _gpu
from ssm import _validation as V

ARCHS = ("80", "90")
SPILL = re.compile(r"(\d+) bytes spill (stores|loads)")
ENTRY = re.compile(r"Compiling entry function '([^']+)'")


def _check_ptxas_log(log, names):
    spills = [m.group(0) for m in SPILL.finditer(log) if int(m.group(1)) != 0]
    assert not spills, f"register spills: {spills}\n{log}"
    assert "warning" not in log.lower(), log
    entries = ENTRY.findall(log)
    assert len(set(entries)) == len(names), (sorted(entries), names)


def test_name_expressions_cover_the_dtype_tables():
    # Every dtype the validator accepts on the GPU has a C++ type, and every kernel is
    # instantiated for every dtype combination, in exactly one module.
    for dtype in V.FLOAT_DTYPES["cuda"]:
        assert dtype.name in _gpu.FLOAT_CTYPES
    for dtype in V.LABEL_KINDS:
        assert dtype in _gpu.LABEL_CTYPES
    floats = [_gpu.FLOAT_CTYPES[d.name] for d in V.FLOAT_DTYPES["cuda"]]
    labels = [_gpu.LABEL_CTYPES[d] for d in V.LABEL_KINDS]
    soft = _gpu.name_expressions("softmax.cu")
    sswl = _gpu.name_expressions("sswl.cu")
    assert len(soft) == len(set(soft)) and len(sswl) == len(set(sswl))
    for t in floats:
        assert f"softmax_fwd<{t}>" in soft and f"softmax_bwd<{t}>" in soft
        assert f"reduce_partials<{t}>" in sswl and f"reduce_loss_stats<{t}>" in sswl
        for lab in labels + [t]:
            for kernel in ("sswl_stats", "sswl_fwd", "sswl_bwd"):
                assert f"{kernel}<{t}, {lab}>" in sswl
    assert "reduce_partials<double>" in sswl and "reduce_stats" in sswl
    for name in soft + sswl:
        assert re.fullmatch(r"[a-z_]+(<[a-z_ ,0-9]+>)?", name), name


def test_sources_inline_common():
    for filename in _gpu.CUDA_FILES:
        text = _gpu.source(filename)
        assert '#include "common.cuh"' not in text
        assert "#define SSM_BLOCK %d" % _gpu.BLOCK in text  # the must-match constant


@pytest.fixture(scope="module")
def nvcc_runs(tmp_path_factory):
    """Start every (file, arch) compile at once (they take seconds each); tests wait on theirs."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        missing("nvcc", "nvcc is not on PATH")
    folder = tmp_path_factory.mktemp("nvcc")
    runs = {}
    for filename in _gpu.CUDA_FILES:
        refs = ",\n".join(f"    (void*)&{name}" for name in _gpu.name_expressions(filename))
        wrapper = folder / f"check_{filename}"
        wrapper.write_text(f"{_gpu.source(filename)}\n\nvoid* ssm_instances[] = {{\n{refs}\n}};\n")
        for arch in ARCHS:
            log = folder / f"{filename}.sm_{arch}.log"
            cmd = [nvcc, "-cubin", f"-arch=sm_{arch}", *_gpu.OPTIONS, *_gpu.CUPY_ADDED_OPTIONS,
                   "-Xptxas", "-v", "-Werror", "all-warnings",
                   "-o", str(folder / f"{filename}.sm_{arch}.cubin"), str(wrapper)]
            with open(log, "w") as fh:
                runs[filename, arch] = (subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT),
                                        log)
    yield runs
    for proc, _ in runs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("filename", _gpu.CUDA_FILES)
def test_nvcc(nvcc_runs, filename, arch):
    proc, log_path = nvcc_runs[filename, arch]
    rc = proc.wait(timeout=600)
    log = log_path.read_text()
    assert rc == 0, log
    _check_ptxas_log(log, _gpu.name_expressions(filename))


def _nvrtc():
    require_module("nvrtc", "cupy")
    from cupy.cuda import nvrtc

    try:
        nvrtc.getVersion()
    except Exception as exc:  # libnvrtc not installed
        missing("nvrtc", f"NVRTC is not available ({type(exc).__name__}: {exc})")
    return nvrtc


@pytest.mark.parametrize("filename", _gpu.CUDA_FILES)
def test_nvrtc(filename):
    # NVRTC is the compiler CuPy runs: same source text, options and name expressions.
    # PTX only (ptxas and its register report are checked through nvcc above).
    nvrtc = _nvrtc()
    names = _gpu.name_expressions(filename)
    prog = nvrtc.createProgram(_gpu.source(filename), filename, [], [])
    try:
        for name in names:
            nvrtc.addNameExpression(prog, name)
        try:
            nvrtc.compileProgram(prog, ("-arch=compute_90", *_gpu.OPTIONS,
                                        *_gpu.CUPY_ADDED_OPTIONS))
        except nvrtc.NVRTCError:
            pytest.fail(nvrtc.getProgramLog(prog))
        log = nvrtc.getProgramLog(prog)
        assert "warning" not in log.lower(), log
        assert nvrtc.getPTX(prog)
        lowered = [nvrtc.getLoweredName(prog, name) for name in names]
        assert all(lowered) and len(set(lowered)) == len(names)
    finally:
        nvrtc.destroyProgram(prog)
