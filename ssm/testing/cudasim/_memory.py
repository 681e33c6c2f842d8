"""Simulated device memory: one private mapping per allocation, ending at a guard page.

Every allocation is mapped on its own, its bytes placed so that they end exactly where a
PROT_NONE guard page starts (and a guard page precedes the mapping), so the first byte
read or written past the end faults, and the launcher reports it (see ssm_cudasim.h).
The bytes between the start of the mapping and the start of the allocation (the
allocation's size rounded up to whole pages) are a canary, checked after every launch that
was given the allocation: a write before its start is reported too (a read there is not
seen). Fresh allocations are poisoned with the current poison byte (see ``poison``), so a
kernel that reads memory nobody wrote gives results that depend on the pattern.
"""
from __future__ import annotations

import contextlib
import ctypes
import mmap
import threading
import weakref

import numpy as np

PAGE = mmap.PAGESIZE
CANARY = 0xCD
PROT_NONE = 0
DEFAULT_POISON = 0xFF  # NaN in every float dtype, -1 in signed integers

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                       ctypes.c_long)
_libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_MAP_FAILED = ctypes.c_void_p(-1).value

_state = threading.local()
_live: "weakref.WeakValueDictionary[int, Allocation]" = weakref.WeakValueDictionary()
_serial = iter(range(1, 2**62))


def poison_byte() -> int:
    return getattr(_state, "poison", DEFAULT_POISON)


@contextlib.contextmanager
def poison(byte: int):
    """Fill the allocations made inside the block with ``byte`` (0..255) instead of 0xFF.

    Running a computation under two patterns and comparing the bits is the simulator's
    initcheck: a kernel that reads device memory nobody wrote depends on the pattern.
    """
    if not isinstance(byte, int) or not 0 <= byte <= 255:
        raise ValueError(f"byte: {byte!r} is not an int in [0, 255]")
    old = poison_byte()
    _state.poison = byte
    try:
        yield
    finally:
        _state.poison = old


def _unmap(base, length):
    _libc.munmap(base, length)


class Allocation:
    """``nbytes`` of simulated device memory on device ``device``, poisoned."""

    __slots__ = ("nbytes", "device", "base", "length", "ptr", "serial", "__weakref__")

    def __init__(self, nbytes: int, device: int):
        data_len = -(-nbytes // PAGE) * PAGE
        length = data_len + 2 * PAGE
        base = _libc.mmap(None, length, mmap.PROT_READ | mmap.PROT_WRITE,
                          mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
        if base in (None, _MAP_FAILED):
            raise MemoryError(f"cudasim: cannot map {nbytes} bytes of simulated device memory "
                              f"(errno {ctypes.get_errno()})")
        _libc.mprotect(base, PAGE, PROT_NONE)
        _libc.mprotect(base + PAGE + data_len, PAGE, PROT_NONE)
        self.nbytes, self.device, self.base, self.length = nbytes, device, base, length
        self.ptr = base + PAGE + data_len - nbytes
        self.serial = next(_serial)
        weakref.finalize(self, _unmap, base, length)
        ctypes.memset(base + PAGE, CANARY, self.ptr - base - PAGE)
        ctypes.memset(self.ptr, poison_byte(), nbytes)
        _live[self.serial] = self

    def view(self, dtype, shape) -> np.ndarray:
        """The allocation's bytes as a host NumPy array (the simulator's device memory)."""
        if self.nbytes == 0:
            return np.empty(shape, dtype)
        raw = (ctypes.c_char * self.nbytes).from_address(self.ptr)
        return np.frombuffer(raw, dtype=dtype).reshape(shape)

    def canary_intact(self) -> bool:
        n = self.ptr - self.base - PAGE
        return n == 0 or ctypes.string_at(self.base + PAGE, n) == bytes([CANARY]) * n

    def describe(self) -> str:
        return f"allocation #{self.serial} ({self.nbytes} bytes on device {self.device})"


def describe_address(addr: int) -> str:
    """Where ``addr`` lies relative to the live allocations (for fault messages)."""
    if addr < PAGE:
        return "a null pointer (or a small offset from one)"
    for a in list(_live.values()):
        if a.base <= addr < a.base + a.length:
            end = a.ptr + a.nbytes
            if addr >= end:
                return f"{addr - end} bytes past the end of {a.describe()}"
            return f"{a.ptr - addr} bytes before the start of {a.describe()}"
    return "outside every simulated device allocation (a host pointer, or freed memory)"
