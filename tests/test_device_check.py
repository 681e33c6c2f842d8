"""benchmarks/gpu/device_check.sh, the one command for a lent GPU machine, runs here as a
dry run (stand-ins that need no GPU), so that its logic is known to work the day it
matters."""
import os
import shutil
import subprocess
import sys
import tarfile

import pytest

from conftest import missing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu", "device_check.sh")

if not os.path.exists(SCRIPT):
    missing("source-tree", "needs the source tree's benchmarks/gpu/device_check.sh")
if shutil.which("bash") is None or shutil.which("timeout") is None:
    pytest.skip("needs bash and timeout", allow_module_level=True)


def test_dry_run(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable)
    r = subprocess.run(["bash", SCRIPT, "--dry-run"], capture_output=True, text=True, env=env,
                       timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    files = sorted(os.listdir(out))
    assert files == ["device_check.tar.gz", "summary.md"]  # the device tool returns <= 8 files
    summary = (out / "summary.md").read_text()
    assert "(dry run)" in summary and "every step that ran passed" in summary, summary
    for step in ("machine", "compute-sanitizer memcheck", "compute-sanitizer racecheck",
                 "compute-sanitizer initcheck", "compute-sanitizer synccheck",
                 "Nsight Compute profile", "GPU benchmark", "CPU thread sweep"):
        assert f"| {step}" in summary, (step, summary)
    assert "FAILED" not in summary and "TIMED OUT" not in summary, summary
    names = tarfile.open(out / "device_check.tar.gz").getnames()
    for name in ("./machine.txt", "./sanitizer_memcheck.txt", "./gpu_bench.json",
                 "./cpu_sweep.json"):
        assert name in names, names
    with tarfile.open(out / "device_check.tar.gz") as t:
        log = t.extractfile("./sanitizer_memcheck.txt").read().decode()
    assert "would run: compute-sanitizer --tool memcheck" in log and "calls on" in log, log
