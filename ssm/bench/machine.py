"""The machine and the library versions, for the report and the results folder's name."""
from __future__ import annotations

import os
import platform
import sys

import numpy as np


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_bytes():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def usable_cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def default_threads():
    """1, 2, 4, ... up to the usable cores, and the core count itself."""
    n = usable_cores()
    ts = [1 << i for i in range(n.bit_length()) if (1 << i) <= n]
    return ts + ([n] if ts[-1] != n else [])


def machine_info():
    return {"cpu": _cpu_model(), "cores": usable_cores(), "logical_cpus": os.cpu_count(),
            "memory_bytes": _memory_bytes(), "platform": platform.platform(),
            "hostname": platform.node()}


def machine_slug():
    """A short directory-friendly name such as "amd-epyc-2c"."""
    words = "".join(ch if ch.isalnum() else " " for ch in _cpu_model().lower()).split()
    words = [w for w in words if w not in {"processor", "cpu", "r", "tm", "with", "core"}]
    return "-".join(words[:4] + [f"{usable_cores()}c"])


def versions():
    v = {"python": platform.python_version(), "numpy": np.__version__}
    for name in ("ssm", "torch", "sklearn", "matplotlib", "cupy", "threadpoolctl"):
        mod = sys.modules.get(name)
        if mod is not None:
            v[name] = getattr(mod, "__version__", "?")
    try:
        from threadpoolctl import threadpool_info
        v["threadpools"] = [{k: i.get(k) for k in ("internal_api", "filepath", "version",
                                                   "num_threads")} for i in threadpool_info()]
    except ImportError:
        pass
    return v
