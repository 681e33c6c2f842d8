"""A strict CUDA simulator for ssm's GPU backend: the CUDA kernels of ssm/cuda, on the CPU.

    >>> from ssm.testing import cudasim
    >>> x = cudasim.asarray(numpy_logits)      # a simulated device array
    >>> prob = ssm.softmax(x)                  # ssm's GPU backend and CUDA kernels, simulated
    >>> cudasim.asnumpy(prob)

Every public ssm function accepts simulated arrays as it accepts CuPy arrays and returns
simulated arrays; ``ssm._gpu`` runs unchanged, with this module in place of CuPy (it is the
"array module" of simulated arrays: ``RawModule``, ``cuda.Device``, ``empty``...). The
kernels are compiled from the same text NVRTC gets, by the host C++ compiler (C++17 needed
at run time), and run with CUDA's rules, checked more strictly than a GPU does (as
compute-sanitizer would): a ``__syncthreads`` not reached by every thread of the block, a
warp shuffle without all the lanes of its mask, shared-memory races between barriers and
reads of unwritten shared memory, global accesses outside their allocation, kernel
arguments whose number, size or kind does not match the parameters, host synchronisations
inside ``forbid_synchronize()``; fresh device memory is poisoned (``poison``: compare the
bits of a computation under two patterns to find reads of unwritten memory). Violations
raise ``SimulatorError`` naming kernel, block, thread and what happened.

See README.md, "Running the GPU path without a GPU".
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from . import _device
from ._array import _empty, ndarray
from ._device import (DEVICE_COUNT, Device, SimulatorError, Stream, SynchronizationError,
                      forbid_synchronize, record_launches, sync_count)
from ._memory import poison
from ._module import KernelTraffic, RawModule, fp_contract, traffic

__all__ = ["DEVICE_COUNT", "Device", "KernelTraffic", "RawModule", "SimulatorError", "Stream",
           "SynchronizationError", "asarray", "asnumpy", "ascontiguousarray", "cuda", "empty",
           "empty_like", "forbid_synchronize", "fp_contract", "full", "may_share_memory",
           "ndarray", "ones", "poison", "record_launches", "sync_count", "traffic", "zeros"]

# the public names, in messages and tracebacks ("a ssm.testing.cudasim.ndarray")
for _public in (ndarray, SimulatorError, SynchronizationError, KernelTraffic):
    _public.__module__ = __name__

# cupy.cuda's spelling of devices and streams
cuda = SimpleNamespace(Device=Device, Stream=Stream, runtime=_device.runtime,
                       get_current_stream=_device.get_current_stream)


def asarray(a, dtype=None) -> ndarray:
    """A simulated device array on the current device holding ``a`` (a NumPy array, anything
    ``numpy.asarray`` takes, or a simulated array, returned as it is when nothing changes)."""
    if isinstance(a, ndarray):
        return a if dtype is None or np.dtype(dtype) == a.dtype else a.astype(dtype)
    h = np.asarray(a, dtype=dtype)
    out = _empty(h.shape, h.dtype)
    out._h[...] = h
    return out


def asnumpy(a) -> np.ndarray:
    """A NumPy copy of a simulated array (a host synchronisation); NumPy arrays pass through."""
    return a.get() if isinstance(a, ndarray) else np.asarray(a)


def empty(shape, dtype=float) -> ndarray:
    return _empty(shape, dtype)


def empty_like(a, dtype=None) -> ndarray:
    return _empty(a.shape, a.dtype if dtype is None else dtype)


def full(shape, fill_value, dtype=None) -> ndarray:
    out = _empty(shape, np.asarray(fill_value).dtype if dtype is None else dtype)
    out._h[...] = fill_value
    return out


def zeros(shape, dtype=float) -> ndarray:
    return full(shape, 0, dtype)


def ones(shape, dtype=float) -> ndarray:
    return full(shape, 1, dtype)


def ascontiguousarray(a, dtype=None) -> ndarray:
    if not isinstance(a, ndarray):
        return asarray(np.ascontiguousarray(a, dtype=dtype))
    if a.flags.c_contiguous and (dtype is None or np.dtype(dtype) == a.dtype):
        return a
    out = _empty(a.shape, a.dtype if dtype is None else dtype, a.device.id)
    out._h[...] = a._h
    return out


def may_share_memory(a, b) -> bool:
    if not (isinstance(a, ndarray) and isinstance(b, ndarray)):  # as CuPy's (typed) one
        raise TypeError(f"may_share_memory: expected two simulated arrays, got "
                        f"{type(a).__name__} and {type(b).__name__}")
    return bool(np.may_share_memory(a._h, b._h))
