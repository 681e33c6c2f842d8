"""Simulated RawModules: the CUDA source compiled for the host and launched with CUDA rules.

``RawModule(code=..., options=..., name_expressions=...)`` takes what ``cupy.RawModule``
takes. On the first launch it builds a shared library from exactly that text: the prelude
ssm_cudasim.h, the source with two mechanical rewrites (``__shared__`` arrays become
race-checked ``ssm_sim::shared_array``s; the PTX ``cvt`` half conversions become calls),
and a table that describes each name expression by the parameter types of the
instantiated template. Libraries are cached on disk (``$SSM_CUDASIM_CACHE``, else
``~/.cache/ssm-cudasim``) under a hash of everything that goes into them.

Compile settings (part of the hash): ``SSM_CUDASIM_FP_CONTRACT`` (``fast``, the default,
as nvcc's --fmad=true, or ``off``; see ``fp_contract``), ``SSM_CUDASIM_CFLAGS`` (extra
flags, e.g. -fsanitize=address,undefined in the CI's sanitizer stage), ``CXX``.

Inside ``with traffic() as log:`` kernels run from a build instrumented to count memory
traffic (see ssm_cudasim.h, e): each launch appends a ``KernelTraffic`` record of the warp-
wide requests it made to the allocations it was given, and the 32-byte sectors they touch.

A launch checks its arguments as cuLaunchKernel receives them: their number, and for each
the size and kind (pointer, signed or unsigned integer, floating point) of the kernel
parameter; pointers must be simulated device arrays on the current device. Then the
library runs the grid (see ssm_cudasim.h) and any violation is raised as SimulatorError.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from importlib import resources
from typing import NamedTuple

import numpy as np

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

from . import _device
from ._array import ndarray
from ._device import SimulatorError
from ._memory import describe_address

PRELUDE = "ssm_cudasim.h"
# What CuPy adds to a RawModule's options (ssm._gpu.CUPY_ADDED_OPTIONS): the simulator
# honours -ftz=true by flushing float denormals (see ssm_cudasim.h).
CUPY_ADDED = ("-ftz=true",)
KNOWN_OPTIONS = ("--std=c++17", "-std=c++17", "-ftz=true", "-ftz=false")
FP_CONTRACT_MODES = ("fast", "off")

# The PTX of ssm's half conversions, and the prelude function that does the same.
_PTX = {
    "cvt.f32.f16 %0, %1;": "ssm_sim::cvt_f32_f16",
    "cvt.rn.f16.f32 %0, %1;": "ssm_sim::cvt_rn_f16_f32",
    "cvt.rn.f16.f64 %0, %1;": "ssm_sim::cvt_rn_f16_f64",
    "cvt.rn.bf16.f32 %0, %1;": "ssm_sim::cvt_rn_bf16_f32",
}
_ASM = re.compile(r'asm\s*(?:volatile\s*)?\(\s*"([^"]*)"\s*:\s*"=\w"\s*\(([^()]+)\)\s*'
                  r':\s*"\w"\s*\(([^()]+)\)\s*\)')
_SHARED = re.compile(r"__shared__\s+([\w:<>, ]+?)\s+(\w+)\s*\[([^\]]+)\]\s*;")

_lock = threading.RLock()  # one launch at a time: the library's launch state is global
_state = threading.local()


# ---- settings -----------------------------------------------------------------------------


def current_fp_contract() -> str:
    mode = getattr(_state, "fp_contract", None) or os.environ.get("SSM_CUDASIM_FP_CONTRACT",
                                                                  "fast")
    if mode not in FP_CONTRACT_MODES:
        raise ValueError(f"SSM_CUDASIM_FP_CONTRACT: {mode!r} is not one of 'fast', 'off'")
    return mode


@contextlib.contextmanager
def fp_contract(mode: str):
    """Build and run the kernels launched inside the block with FMA contraction ``mode``
    ('fast': a*b+c may become one fused multiply-add, as nvcc does by default; 'off')."""
    if mode not in FP_CONTRACT_MODES:
        raise ValueError(f"mode: {mode!r} is not one of 'fast', 'off'")
    old = getattr(_state, "fp_contract", None)
    _state.fp_contract = mode
    try:
        yield
    finally:
        _state.fp_contract = old


class KernelTraffic(NamedTuple):
    """What one launch moved: warp-wide requests, the bytes its lanes asked for, and the
    32-byte sectors those bytes lie in (what a GPU's memory system moves), loads and stores."""

    name: str
    load_requests: int
    load_bytes: int
    load_sectors: int
    store_requests: int
    store_bytes: int
    store_sectors: int

    @property
    def useful_bytes(self) -> int:
        return self.load_bytes + self.store_bytes

    @property
    def sector_bytes(self) -> int:
        return 32 * (self.load_sectors + self.store_sectors)

    @property
    def sector_efficiency(self) -> float:
        """Useful bytes / bytes in the touched sectors (1.0: perfectly coalesced)."""
        return self.useful_bytes / self.sector_bytes if self.sector_bytes else 1.0


def _traffic_log():
    return getattr(_state, "traffic", None)


@contextlib.contextmanager
def traffic():
    """Count the memory traffic of the launches inside the block: ``with traffic() as log:``
    gives a list of KernelTraffic records, one per launch (kernels built with GCC's
    access instrumentation; slower than plain simulation)."""
    old = _traffic_log()
    _state.traffic = []
    try:
        yield _state.traffic
    finally:
        _state.traffic = old


def find_compiler() -> str:
    """The host C++ compiler: $CXX, else c++, g++ or clang++ on PATH (POSIX systems only:
    the simulator maps memory with guard pages and catches faults with signals)."""
    if os.name != "posix":
        raise SimulatorError(f"ssm.testing.cudasim needs a POSIX system (Linux, macOS); this "
                             f"is {sys.platform}")
    candidates = [os.environ["CXX"]] if os.environ.get("CXX") else ["c++", "g++", "clang++"]
    for name in candidates:
        path = shutil.which(name)
        if path:
            return path
    raise SimulatorError(
        "ssm.testing.cudasim compiles the CUDA kernels for the host and needs a C++17 "
        f"compiler: none of {', '.join(candidates)} was found on PATH; install g++ or clang++, "
        "or set CXX to one")


def _cpu_has_fma() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " fma" in line for line in f)
    except OSError:
        return False


def cache_dir() -> str:
    path = os.environ.get("SSM_CUDASIM_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "ssm-cudasim")
    os.makedirs(path, exist_ok=True)
    return path


# ---- translation unit --------------------------------------------------------------------


def translate(code: str, filename: str, name_expressions) -> str:
    """The C++ translation unit for ``code`` (see the module docstring)."""
    def asm(m):
        instr, out, arg = m.group(1).strip(), m.group(2).strip(), m.group(3).strip()
        if instr not in _PTX:
            raise SimulatorError(f"{filename}: inline PTX {instr!r} is not simulated; the "
                                 f"simulator knows {', '.join(map(repr, _PTX))}")
        return f"({out} = {_PTX[instr]}({arg}))"

    body = _ASM.sub(asm, code)
    if re.search(r"\basm\b", body):
        line = body[:re.search(r"\basm\b", body).start()].count("\n") + 1
        raise SimulatorError(f"{filename}, line {line}: an inline asm statement the simulator "
                             f"cannot translate (one output, one input, a known cvt)")
    body = _SHARED.sub(lambda m: f"__shared__ ssm_sim::shared_array<{m.group(1)}, ({m.group(3)})> "
                                 f"{m.group(2)}{{\"{m.group(2)}\"}};", body)
    if re.search(r"__shared__\s+(?!ssm_sim::shared_array)", body):
        raise SimulatorError(f"{filename}: only __shared__ arrays with a constant extent are "
                             f"simulated (declare a scalar as an array of 1)")
    table = ",\n".join(f'    ssm_sim::describe("{n}", &{n})' for n in name_expressions)
    return (f'#include "{PRELUDE}"\n#line 1 "{filename}"\n{body}\n'
            f'#line 1 "<cudasim: kernel table>"\n'
            f"const ssm_sim::KernelDesc ssm_sim_table[] = {{\n{table}\n}};\n"
            f"const int ssm_sim_table_size = {len(name_expressions)};\n")


def _compile_flags() -> list:
    flags = ["-std=c++17", "-O2", "-fPIC", "-shared", "-fvisibility=hidden", "-fno-math-errno",
             "-U_FORTIFY_SOURCE", "-Wno-unknown-pragmas", "-Wno-attributes"]
    if current_fp_contract() == "fast":
        flags += ["-ffp-contract=fast"] + (["-mfma"] if _cpu_has_fma() else [])
    else:
        flags += ["-ffp-contract=off"]
    flags += os.environ.get("SSM_CUDASIM_CFLAGS", "").split()
    if _traffic_log() is not None:  # every access calls a hook (ssm_cudasim.h, e)
        flags += ["-DSSM_SIM_TRAFFIC=1", "-fsanitize=kernel-address",
                  "--param", "asan-instrumentation-with-call-threshold=0",
                  "--param", "asan-stack=0", "--param", "asan-globals=0"]
    return flags


class _Library:
    """A compiled module: its kernels' signatures and the launch entry point."""

    def __init__(self, path):
        self.lib = ctypes.CDLL(path)
        self.lib.ssm_sim_kernel_name.restype = ctypes.c_char_p
        self.lib.ssm_sim_kernel_signature.restype = ctypes.c_char_p
        self.lib.ssm_sim_launch.argtypes = (
            ctypes.c_int, ctypes.POINTER(ctypes.c_uint), ctypes.POINTER(ctypes.c_uint),
            ctypes.POINTER(ctypes.c_void_p), ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t,
            ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_int))
        self.kernels = {}
        for i in range(self.lib.ssm_sim_kernel_count()):
            sig = self.lib.ssm_sim_kernel_signature(i).decode()
            params = [tuple(p.split(" ", 2)) for p in sig.split(";") if p]
            self.kernels[self.lib.ssm_sim_kernel_name(i).decode()] = (
                i, [(kind, int(size), ctype) for kind, size, ctype in params])


def build(code: str, name_expressions, filename="module.cu") -> _Library:
    """Compile (or find in the cache) the library for one module under the current settings."""
    cxx = find_compiler()
    prelude = resources.files(__package__).joinpath(PRELUDE).read_text()
    tu = translate(code, filename, name_expressions)
    flags = _compile_flags()
    key = hashlib.sha256("\0".join([prelude, tu, cxx, *flags]).encode()).hexdigest()[:32]
    folder = cache_dir()
    path = os.path.join(folder, f"{key}.so")
    if not os.path.exists(path):
        with _build_lock(path + ".lock"):
            if not os.path.exists(path):  # another process built it while this one waited
                _compile(cxx, flags, tu, prelude, filename, folder, path)
    return _Library(path)


@contextlib.contextmanager
def _build_lock(path):
    """Held by one process at a time (fcntl.flock; none where there is no fcntl), so that
    processes sharing the cache (pytest-xdist workers) build each library once: the others
    wait for it instead of compiling the same text beside it."""
    if fcntl is None:  # Windows: each process may build it; os.replace keeps that safe
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _compile(cxx, flags, tu, prelude, filename, folder, path):
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        src = os.path.join(tmp, "module.cpp")
        with open(src, "w") as f:
            f.write(tu)
        with open(os.path.join(tmp, PRELUDE), "w") as f:
            f.write(prelude)
        out = os.path.join(tmp, "module.so")
        proc = subprocess.run([cxx, *flags, "-I", tmp, src, "-o", out],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise SimulatorError(f"{filename}: the host compiler ({cxx}) failed:\n"
                                 f"{proc.stderr[-4000:]}")
        os.replace(out, path)  # atomic: a reader never sees a partly written library


# ---- RawModule --------------------------------------------------------------------------------


class RawModule:
    """``cupy.RawModule`` for the simulator: same arguments, launches run on the CPU."""

    def __init__(self, code: str, options=(), name_expressions=(), *, filename="module.cu"):
        unknown = [o for o in options if o not in KNOWN_OPTIONS]
        if unknown:
            raise SimulatorError(f"options: {unknown} are not understood by the simulator; "
                                 f"expected some of {', '.join(KNOWN_OPTIONS)}")
        self.code = code
        self.options = tuple(options) + tuple(o for o in CUPY_ADDED if o not in options)
        self.name_expressions = tuple(name_expressions)
        self.filename = filename
        self._libraries = {}

    def _library(self) -> _Library:
        key = (current_fp_contract(), os.environ.get("SSM_CUDASIM_CFLAGS", ""),
               _traffic_log() is not None)
        with _lock:
            if key not in self._libraries:
                self._libraries[key] = build(self.code, self.name_expressions, self.filename)
            return self._libraries[key]

    def get_function(self, name: str) -> "Function":
        if name not in self.name_expressions:
            raise SimulatorError(f"name: {name!r} is not one of the module's name_expressions "
                                 f"{list(self.name_expressions)}")
        return Function(self, name)


def _dims(value, what):
    dims = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    if not 1 <= len(dims) <= 3 or not all(isinstance(d, (int, np.integer)) and d >= 1 for d in dims):
        raise SimulatorError(f"{what}: {value!r} is not 1 to 3 positive ints")
    return tuple(int(d) for d in dims) + (1,) * (3 - len(dims))


_KIND_NAMES = {"p": "a pointer", "f": "floating point", "i": "a signed integer",
               "u": "an unsigned integer", "b": "a bool", "s": "a struct"}


def _pack(name, params, args):
    """ctypes buffers of the arguments, checked against the parameters (number, size, kind)."""
    sig = ", ".join(c for _, _, c in params)
    if len(args) != len(params):
        raise SimulatorError(f"kernel {name}: {len(args)} arguments for {len(params)} parameters "
                             f"({sig})")
    device = _device.get_device_id()
    buffers, pointers = [], []
    for i, (a, (kind, size, ctype)) in enumerate(zip(args, params)):
        where = f"kernel {name}, argument {i} (parameter {ctype}, {size} bytes)"
        if isinstance(a, ndarray):
            if kind != "p":
                raise SimulatorError(f"{where}: got a device array; expected {_KIND_NAMES[kind]}")
            if a.device.id != device:
                raise SimulatorError(f"{where}: an array on device {a.device.id}, launched on "
                                     f"device {device}")
            raw = np.uint64(a.data.ptr).tobytes()
            pointers.append(a._alloc)
        elif isinstance(a, np.generic) and a.dtype.kind in "fiub":
            got = {"f": "f", "i": "i", "u": "u", "b": "b"}[a.dtype.kind]
            as_pointer = kind == "p" and got in "iu"  # a raw address (ssm passes 0 for NULL)
            if (got != kind and not as_pointer) or a.dtype.itemsize != size:
                raise SimulatorError(f"{where}: got numpy.{a.dtype} ({a.dtype.itemsize} bytes, "
                                     f"{_KIND_NAMES[got]}); expected {size} bytes, "
                                     f"{_KIND_NAMES[kind]}")
            raw = a.tobytes()
        else:
            raise SimulatorError(f"{where}: a {type(a).__module__}.{type(a).__qualname__} cannot "
                                 f"be passed to a kernel; pass a simulated device array or a "
                                 f"NumPy scalar of the parameter's type")
        buffers.append(ctypes.create_string_buffer(raw, max(len(raw), 8)))
    params_arr = (ctypes.c_void_p * max(1, len(buffers)))(
        *[ctypes.cast(b, ctypes.c_void_p) for b in buffers])
    return params_arr, buffers, pointers


class Function:
    """A kernel of a simulated module: ``f(grid, block, args)`` as a CuPy RawKernel."""

    def __init__(self, module: RawModule, name: str):
        self.module, self.name = module, name

    def __call__(self, grid, block, args, *, shared_mem=0):
        grid, block = _dims(grid, "grid"), _dims(block, "block")
        if shared_mem:
            raise SimulatorError(f"kernel {self.name}: shared_mem={shared_mem!r}: dynamic shared "
                                 f"memory is not simulated (declare __shared__ arrays)")
        if block[0] * block[1] * block[2] > 1024:
            raise SimulatorError(f"kernel {self.name}: block {block} has more than 1024 threads")
        lib = self.module._library()
        index, params = lib.kernels[self.name]
        params_arr, buffers, allocations = _pack(self.name, params, tuple(args))
        msg = ctypes.create_string_buffer(2048)
        addr, write = ctypes.c_void_p(0), ctypes.c_int(0)
        ftz = int("-ftz=true" in self.module.options and _computes_in_float(self.name))
        stream = _device.get_current_stream()
        log = _traffic_log()
        with _lock:
            if log is not None:
                ranges = [v for a in allocations for v in (a.ptr, a.ptr + a.nbytes)]
                lib.lib.ssm_sim_traffic_start(
                    (ctypes.c_ulonglong * max(1, len(ranges)))(*ranges), len(allocations))
            rc = lib.lib.ssm_sim_launch(index, (ctypes.c_uint * 3)(*grid),
                                        (ctypes.c_uint * 3)(*block), params_arr, ftz, msg,
                                        len(msg), ctypes.byref(addr), ctypes.byref(write))
            if log is not None and rc == 0:
                totals = (ctypes.c_ulonglong * 6)()
                lib.lib.ssm_sim_traffic_totals(totals)
                log.append(KernelTraffic(self.name, *totals))
        _device.record(_device.Launch((self.name, grid, block, _device.get_device_id(), stream)))
        if rc == 2:
            raise SimulatorError(f"{msg.value.decode()} ({describe_address(addr.value or 0)})")
        if rc != 0:
            raise SimulatorError(msg.value.decode())
        for alloc in allocations:
            if not alloc.canary_intact():
                raise SimulatorError(f"kernel {self.name}: a write before the start of "
                                     f"{alloc.describe()}")


def _computes_in_float(name: str) -> bool:
    """Whether an instantiation computes in float (its template arguments name float,
    ssm_half or ssm_bf16): -ftz=true flushes float denormals, and x86 can only flush float
    and double together, so double kernels run without the flush."""
    args = name.partition("<")[2]
    return bool(re.search(r"\b(float|ssm_half|ssm_bf16)\b", args))
