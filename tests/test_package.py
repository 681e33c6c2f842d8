"""Packaging surface: one version, python -m ssm, show_config's facts."""
import subprocess
import sys
from importlib.metadata import version

import ssm
from ssm import _config, _cpu
from ssm._version import __version__

SIMD_PATHS = ("x86-64-v4 (AVX-512)", "x86-64-v3 (AVX2)", "x86-64 baseline (SSE2)",
              "generic (no target clones)")


def test_one_version():
    assert ssm.__version__ == __version__
    assert version("ssm") == __version__  # the metadata: pyproject reads ssm/_version.py


def _main(tmp_path, *args):
    # from another folder: `python -m` puts the working directory first on sys.path, and
    # the source tree's ssm/ has no compiled extension
    return subprocess.run([sys.executable, "-m", "ssm", *args], capture_output=True, text=True,
                          check=True, cwd=tmp_path).stdout


def test_main_version(tmp_path):
    out = _main(tmp_path, "--version")
    assert out.strip() == f"ssm {__version__}"


def test_main_config(tmp_path):
    out = _main(tmp_path, "--config")
    for key in ("ssm:", "numpy:", "compiler:", "build flags:", "simd path:", "openmp runtime:",
                "threads (default):", "gpu:"):
        assert key in out, out


def test_config_facts():
    c = _config.config()
    assert c["ssm"] == __version__
    assert c["simd path"] in SIMD_PATHS
    assert "openmp" in c["build flags"].lower()  # -fopenmp, /openmp, -Xpreprocessor -fopenmp
    assert c["threads (default)"] >= 1
    assert _cpu.compiler() != "unknown"


def test_show_config_prints(capsys):
    ssm.show_config()
    assert "simd path:" in capsys.readouterr().out
