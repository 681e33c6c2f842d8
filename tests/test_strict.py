"""SSM_REQUIRE (tests/conftest.py): where a run promises a tool, a test that would skip
for want of it fails instead; elsewhere it still skips."""
import os
import subprocess
import sys

import pytest

import conftest
from conftest import child_process_kwargs, missing
from ssm import _gpu

HERE = os.path.dirname(os.path.abspath(__file__))


def test_missing_skips_unless_promised(monkeypatch):
    monkeypatch.setattr(conftest, "REQUIRED", frozenset())
    with pytest.raises(pytest.skip.Exception, match="^nvcc is not on PATH$"):
        missing("nvcc", "nvcc is not on PATH")
    monkeypatch.setattr(conftest, "REQUIRED", frozenset({"nvcc"}))
    with pytest.raises(pytest.fail.Exception,
                       match="^nvcc is not on PATH; SSM_REQUIRE promises nvcc"):
        missing("nvcc", "nvcc is not on PATH")
    with pytest.raises(pytest.skip.Exception):  # a requirement not promised still skips
        missing("torch", "no torch")


def test_require_module(monkeypatch):
    monkeypatch.setattr(conftest, "REQUIRED", frozenset({"torch"}))
    assert conftest.require_module("torch", "os") is os
    with pytest.raises(pytest.fail.Exception, match="could not import 'no_such_module_ssm'"):
        conftest.require_module("torch", "no_such_module_ssm")


def test_parse():
    assert conftest._required("") == frozenset()
    assert conftest._required(" nvcc, torch ,") == {"nvcc", "torch"}
    assert conftest._required("all") == set(conftest.REQUIREMENTS)
    with pytest.raises(pytest.UsageError, match=r"unknown requirement\(s\) \['nvc'\]"):
        conftest._required("nvcc,nvc")


def _pytest_without_nvcc(tmp_path, require):
    """tests/test_cuda_compile.py's nvcc cases in a child pytest, nvcc off PATH."""
    kwargs = child_process_kwargs(tmp_path)
    env = kwargs["env"]
    env["PATH"] = os.pathsep.join(d for d in env.get("PATH", "").split(os.pathsep)
                                  if not os.path.exists(os.path.join(d, "nvcc")))
    env["SSM_REQUIRE"] = require
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
                        os.path.join(HERE, "test_cuda_compile.py"), "-k", "test_nvcc"],
                       capture_output=True, text=True, timeout=300, **kwargs)
    return r.returncode, r.stdout + r.stderr


def test_a_promised_tool_that_is_missing_fails(tmp_path):
    rc, out = _pytest_without_nvcc(tmp_path, "")
    assert rc == 0 and "skipped" in out and "nvcc is not on PATH" in out, out
    rc, out = _pytest_without_nvcc(tmp_path, "nvcc")
    # the skip came from a fixture: an error at setup, which fails the run as a failure does
    from test_cuda_compile import ARCHS
    errors = len(_gpu.CUDA_FILES) * len(ARCHS)  # one per (file, arch) case
    assert rc == 1 and f"{errors} errors" in out and "SSM_REQUIRE promises nvcc" in out, out
    rc, out = _pytest_without_nvcc(tmp_path, "nvcc,bogus")
    assert rc == pytest.ExitCode.USAGE_ERROR and "unknown requirement(s) ['bogus']" in out, out
