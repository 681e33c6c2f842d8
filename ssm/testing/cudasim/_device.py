"""Simulated devices and streams, host synchronisations, and the record of launches.

The simulator has ``DEVICE_COUNT`` devices (so multi-device code paths run) and runs each
kernel to completion when it is launched; streams only record where work was queued. What
would wait for the device on a GPU (reading device memory to the host, ``synchronize``)
is a host synchronisation: counted, and an error inside ``forbid_synchronize()``, the
simulator's counterpart of ``cupyx.allow_synchronize(False)``.
"""
from __future__ import annotations

import contextlib
import threading

DEVICE_COUNT = 2


class SimulatorError(RuntimeError):
    """A kernel did something a GPU would not tolerate (or compute-sanitizer would report)."""


class SynchronizationError(SimulatorError):
    """A host synchronisation inside ``forbid_synchronize()``."""


_state = threading.local()


def _stack(name):
    if not hasattr(_state, name):
        setattr(_state, name, [])
    return getattr(_state, name)


def check_device_id(device_id) -> int:
    if isinstance(device_id, bool) or not isinstance(device_id, int) \
            or not 0 <= device_id < DEVICE_COUNT:
        raise ValueError(f"device: {device_id!r} is not a simulated device; expected an int in "
                         f"[0, {DEVICE_COUNT})")
    return device_id


class Device:
    """A simulated device; as a context manager it is the current device (like CuPy's)."""

    def __init__(self, device=None):
        self.id = get_device_id() if device is None else check_device_id(device)

    def __enter__(self):
        _stack("devices").append(self.id)
        return self

    def __exit__(self, *exc):
        _stack("devices").pop()

    def __eq__(self, other):
        return isinstance(other, Device) and other.id == self.id

    def __hash__(self):
        return hash(("cudasim.Device", self.id))

    def __repr__(self):
        return f"<cudasim Device {self.id}>"

    def synchronize(self):
        host_sync("Device.synchronize()")


def get_device_id() -> int:
    devices = _stack("devices")
    return devices[-1] if devices else 0


class Stream:
    """A simulated stream: ``with stream:`` makes it current; kernels record it."""

    null = None  # set below

    def __init__(self, non_blocking=False):
        self.non_blocking = bool(non_blocking)
        self.device_id = get_device_id()

    def __enter__(self):
        _stack("streams").append(self)
        return self

    def __exit__(self, *exc):
        _stack("streams").pop()

    def synchronize(self):
        host_sync("Stream.synchronize()")

    def __repr__(self):
        return "<cudasim Stream null>" if self is Stream.null else f"<cudasim Stream {id(self):#x}>"


Stream.null = Stream()


def get_current_stream() -> Stream:
    streams = _stack("streams")
    return streams[-1] if streams else Stream.null


class runtime:  # noqa: N801 -- the spelling of cupy.cuda.runtime
    @staticmethod
    def getDeviceCount() -> int:  # noqa: N802
        return DEVICE_COUNT


# ---- host synchronisation ------------------------------------------------------------------

_counts = {"syncs": 0}


def host_sync(what: str):
    """Called by everything that would wait for the device on a GPU."""
    if getattr(_state, "forbid", 0):
        raise SynchronizationError(f"host synchronisation inside forbid_synchronize(): {what}")
    _counts["syncs"] += 1


def sync_count() -> int:
    """How many host synchronisations the simulator has seen (in this process)."""
    return _counts["syncs"]


@contextlib.contextmanager
def forbid_synchronize():
    """Inside the block, a host synchronisation raises SynchronizationError (as
    ``cupyx.allow_synchronize(False)`` does on a GPU)."""
    _state.forbid = getattr(_state, "forbid", 0) + 1
    try:
        yield
    finally:
        _state.forbid -= 1


# ---- launches --------------------------------------------------------------------------------


class Launch(tuple):
    """(kernel name, grid, block, device id, stream) of one recorded launch."""

    __slots__ = ()

    @property
    def name(self):
        return self[0]

    @property
    def stream(self):
        return self[4]


def record(launch: Launch):
    for log in _stack("logs"):
        log.append(launch)


@contextlib.contextmanager
def record_launches():
    """Collect every launch made inside the block: ``with record_launches() as log:``."""
    log: list = []
    _stack("logs").append(log)
    try:
        yield log
    finally:
        _stack("logs").remove(log)
