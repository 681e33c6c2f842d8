"""``ssm.show_config()``: what a bug report needs to say about this installation."""
from __future__ import annotations

import platform
import sys

import numpy as np

from . import _cpu, _threads
from ._version import __version__


def _openmp_runtime() -> str:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "unknown (install threadpoolctl to see it)"
    for info in threadpool_info():
        if info.get("user_api") == "openmp":
            version = f" {info['version']}" if info.get("version") else ""
            return f"{info.get('prefix')}{version} ({info.get('filepath')})"
    return "not found"


def _cuda_version(v: int) -> str:
    return f"{v // 1000}.{v % 1000 // 10}"  # 13000 -> "13.0"


def _gpu() -> str:
    try:
        import cupy
    except Exception as e:  # ImportError, or a broken CUDA install
        return f"CuPy not importable ({type(e).__name__})"
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:
        return f"CuPy {cupy.__version__}, no CUDA device ({type(e).__name__})"
    rt = cupy.cuda.runtime
    lines = [f"CuPy {cupy.__version__}, CUDA runtime {_cuda_version(rt.runtimeGetVersion())}, "
             f"driver {_cuda_version(rt.driverGetVersion())}, {n} device(s)"]
    for i in range(n):
        p = cupy.cuda.runtime.getDeviceProperties(i)
        lines.append(f"  [{i}] {p['name'].decode()} (compute capability {p['major']}.{p['minor']})")
    return "\n".join(lines)


def config() -> dict:
    """The facts ``show_config`` prints, as a dict."""
    return {
        "ssm": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "numpy": np.__version__,
        "compiler": _cpu.compiler(),
        "build flags": _cpu.build_flags(),
        "simd path": _cpu.simd_path(),
        "openmp runtime": _openmp_runtime(),
        "openmp wait policy": _cpu.wait_policy,
        "threads (default)": _threads.get_num_threads(),
        "gpu": _gpu(),
    }


def show_config() -> None:
    """Print the ssm version, build, SIMD path, threads, NumPy and GPU availability."""
    for key, value in config().items():
        print(f"{key + ':':<20} {value}")
