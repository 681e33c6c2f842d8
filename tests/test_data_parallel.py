"""The data-parallel examples run as written: 2 ranks each compute the exact global "mean"
(ssm.loss_normalizer + reduction="sum" + d_loss = 1 / global normaliser), and each rank's
gradient equals its slice of one call over the whole batch (the examples' --check).

torch.distributed: gloo, 2 processes on the CPU. MPI: `mpiexec -n 2` with mpi4py.
"""
import os
import shutil
import subprocess
import sys

import pytest

from conftest import child_process_kwargs, missing, require_module

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def _example(name):
    path = os.path.join(EXAMPLES, name)
    if not os.path.exists(path):
        missing("source-tree", f"examples/{name} is not beside tests/ (a test run outside the "
                               "repository)")
    return path


def _run(cmd, tmp_path, timeout=120):
    kw = child_process_kwargs(tmp_path)
    # OpenMPI refuses root without these (CI runs as root) and counts cores strictly
    kw["env"].update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
                     OMPI_MCA_rmaps_base_oversubscribe="1", OMP_NUM_THREADS="1")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_torch_distributed_gloo_two_ranks(tmp_path):
    require_module("torch", "torch.distributed")
    out = _run([sys.executable, _example("data_parallel_torch.py"), "--check"], tmp_path)
    assert out.count("gradient equals the single-process one") == 2, out


def test_mpi_two_ranks(tmp_path):
    require_module("mpi", "mpi4py")
    mpiexec = shutil.which("mpiexec")
    if mpiexec is None:
        missing("mpi", "mpiexec is not on PATH (no MPI installed: MPI example)")
    out = _run([mpiexec, "-n", "2", sys.executable, _example("data_parallel_mpi.py"), "--check"],
               tmp_path)
    assert out.count("gradient equals the single-process one") == 2, out
