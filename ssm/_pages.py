"""Huge pages for large outputs that another library allocated and ssm writes first.

A fresh block of memory costs its first touch: the kernel of the operating system maps and
zeroes every page as the first write reaches it. With 4 KiB pages that is one fault per
page: a VOC-sized gradient (44 MB) takes 10,753 of them, measured here (a 2-core
Firecracker VM, one thread) at 24 ms of CPU time over the 9.4 ms of ssm's pass into
resident memory. With transparent huge pages (2 MiB) it is about 530 faults (21 huge
pages, 4 KiB ones at the unaligned ends) and 5.4 ms.

NumPy asks for huge pages on its own large blocks (``madvise(MADV_HUGEPAGE)``, which
Linux's default THP mode "madvise" requires); XLA's CPU runtime does not, and allocates
every output of a jitted function afresh. ``advise_huge`` asks for them on such a block
before ssm writes it. It is advice: nothing changes where Linux, the kernel's THP setting
or the platform says no, and it never fails.
"""
from __future__ import annotations

import ctypes
import mmap
import sys

HUGE_BYTES = 4 << 20  # NumPy's threshold for the same advice
_MADV_HUGEPAGE = 14   # <sys/mman.h> on Linux, every architecture


def _libc_madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        f = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    f.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    f.restype = ctypes.c_int
    return f


_madvise = _libc_madvise()


def advise_huge(array) -> bool:
    """Advise huge pages for the whole pages inside ``array``'s memory (a NumPy array of
    ``HUGE_BYTES`` or more; smaller ones are left alone). True when Linux took the advice.
    """
    if _madvise is None or array.nbytes < HUGE_BYTES:
        return False
    start = array.ctypes.data
    lo = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
    hi = (start + array.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
    return hi > lo and _madvise(lo, hi - lo, _MADV_HUGEPAGE) == 0
