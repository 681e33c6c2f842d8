"""Thread counts: ssm's default, and the effective count of one call.

``threads=None`` means ssm's default: the value given to ``set_num_threads``, or
else OpenMP's default for the calling thread (``omp_get_max_threads()``, which
honours ``OMP_NUM_THREADS`` and threadpoolctl), read at call time. ssm never calls
``omp_set_num_threads``: that would change the team size of every other library
sharing the OpenMP runtime. The count reaches the kernels as ``(count, adaptive)``:
a default count adapts to foreign load (ssm/_cpu.pyx, ``_learn``), an explicit one
does not.

Every count is checked once, here: an int from 1 to ``MAX_THREADS`` (a default above
it, from OMP_NUM_THREADS say, is capped). Past the machine's CPUs more threads only
wait for each other; far past it a process runs out of address space for their
stacks, which the kernels check before a team first starts (ssm/_threads.h).

Fork safety: GNU libgomp cannot start a thread team in a child forked after the
parent used one (the child hangs; measured here with multiprocessing's "fork"
start method and os.fork). A one-thread region needs no team, so in a child
forked after ``import ssm`` (whether or not ssm had run: the fork hook cannot tell)
every call runs on one thread, whatever it asks for. Use the "spawn" or
"forkserver" start method for multi-threaded ssm in worker processes.
"""
from __future__ import annotations

import numbers
import os

from . import _cpu

_CPUS = os.cpu_count() or 1
MAX_THREADS = max(64, 4 * _CPUS)  # documented in README.md, "Threads"

_default: int | None = None
_in_forked_child = False


def _after_fork_in_child() -> None:
    global _in_forked_child
    _in_forked_child = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _check(n, name: str) -> int:
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise TypeError(f"{name}: expected a positive int or None, got {n!r}")
    if n < 1:
        raise ValueError(f"{name}: {n} is not a positive thread count; expected an int >= 1")
    if n > MAX_THREADS:
        raise ValueError(f"{name}: {n} threads is more than ssm's maximum of {MAX_THREADS} "
                         f"(4 x the {_CPUS} logical CPUs of this machine, at least 64); "
                         f"expected 1 to {MAX_THREADS}")
    return int(n)


def set_num_threads(n) -> None:
    """Set the default number of threads of ssm's CPU kernels (``None``: OpenMP's default)."""
    global _default
    _default = None if n is None else _check(n, "n")


def get_num_threads() -> int:
    """The number of threads a call with ``threads=None`` uses at most now (fewer on small
    problems, and for a while after other processes were seen to hold cores; 1 in a
    process forked after ``import ssm``, see above)."""
    if _in_forked_child:
        return 1
    return _default if _default is not None else min(_cpu.omp_max_threads(), MAX_THREADS)


def resolve(threads) -> tuple[int, bool]:
    """``(count, adaptive)`` of one call: the most threads it may use (1 in a forked child,
    see above), and whether that is the default, which adapts to foreign load."""
    n = get_num_threads() if threads is None else _check(threads, "threads")
    return (1 if _in_forked_child else n), threads is None
