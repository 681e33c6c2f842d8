"""Concurrency on the CPU: many Python threads calling ssm at once (each with its own
thread count) get the results of serial calls; the GIL is released during the kernels
(another Python thread runs while a kernel does); KeyboardInterrupt during a long call is honoured when the
call returns. Fork safety is in test_consistency.py::test_forked_child_does_not_hang.
"""

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import ssm
from conftest import FLOAT_DTYPES, child_process_kwargs, make_labels, make_logits


def _cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _jobs(rng):
    """(function, args, kwargs) jobs of every kind, with different shapes and thread counts."""
    jobs = []
    for i, (shape, layout) in enumerate([((2, 21, 40, 37), "NCHW"), ((2, 40, 37, 21), "NHWC"),
                                         ((3, 5, 1031), "NCHW"), ((500, 7), "NCHW")]):
        for dtype in FLOAT_DTYPES:
            x = make_logits(rng, shape, dtype)
            C = shape[1] if layout == "NCHW" else shape[-1]
            pix = (shape[0],) + (shape[2:] if layout == "NCHW" else shape[1:-1])
            y = make_labels(rng, pix, C)
            w = rng.random(pix).astype(dtype)
            th = 1 + (i + len(jobs)) % 3
            kw = dict(layout=layout, threads=th)
            jobs += [
                (ssm.spatial_softmax_with_loss_and_grad, (x, y, w), dict(kw, return_prob=True)),
                (ssm.spatial_softmax_with_loss, (x, y), dict(kw, reduction="none",
                                                             label_smoothing=0.1)),
                (ssm.spatial_softmax_with_loss_grad, (ssm.softmax(x, layout=layout), y, w), kw),
                (ssm.softmax, (x,), kw),
                (ssm.log_softmax, (x,), kw),
            ]
    return jobs


def _as_tuple(r):
    return r if isinstance(r, tuple) else (r,)


def test_threads_calling_at_once_match_serial_calls(rng):
    jobs = _jobs(rng)
    want = [_as_tuple(f(*a, **k)) for f, a, k in jobs]
    n_workers = 8
    rounds = 3
    errors = []
    results = {}
    barrier = threading.Barrier(n_workers)

    def worker(wid):
        try:
            barrier.wait()
            for r in range(rounds):
                for j in range(wid, wid + len(jobs)):  # every worker runs every job
                    j %= len(jobs)
                    f, a, k = jobs[j]
                    k = dict(k, threads=1 + (wid + r) % 4)  # results do not depend on it
                    results[(wid, r, j)] = _as_tuple(f(*a, **k))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    ts = [threading.Thread(target=worker, args=(i,)) for i in range(n_workers)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=300)
    assert not errors, errors
    assert len(results) == n_workers * rounds * len(jobs)
    for (wid, r, j), got in results.items():
        for g, e in zip(got, want[j]):
            np.testing.assert_array_equal(g, e, err_msg=f"worker {wid} round {r} job {j}")


def test_set_num_threads_from_threads_does_not_change_results(rng):
    x = make_logits(rng, (2, 21, 64, 64), np.float32)
    y = make_labels(rng, (2, 64, 64), 21)
    want = ssm.spatial_softmax_with_loss_and_grad(x, y, threads=1)
    saved = ssm._threads._default  # None unless set_num_threads was called
    errors = []

    def worker(i):
        try:
            for k in range(10):
                ssm.set_num_threads(1 + (i + k) % 3)
                loss, g = ssm.spatial_softmax_with_loss_and_grad(x, y)
                assert loss == want[0]
                np.testing.assert_array_equal(g, want[1])
        except BaseException as exc:  # pragma: no cover
            errors.append(exc)

    try:
        ts = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(timeout=120)
    finally:
        ssm.set_num_threads(saved)
    assert not errors, errors


def _call_of_about(seconds):
    """A fused call (threads=1) that takes about ``seconds``: returns (call, its time)."""
    rng = np.random.default_rng(0)
    side = 64
    while True:
        x = make_logits(rng, (1, 21, side, side), np.float32)
        y = make_labels(rng, (1, side, side), 21)

        def call(x=x, y=y):
            ssm.spatial_softmax_with_loss_and_grad(x, y, threads=1)

        call()
        t = min(_timed(call) for _ in range(3))
        if t >= seconds or side >= 2048:
            return call, t
        side = int(side * max(1.2, min(4.0, (seconds / max(t, 1e-6)) ** 0.5)))


def _timed(f):
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


def _other_thread_progress(call, seconds):
    """How far another Python thread got while ``call()`` ran: the increments it made
    between the reads just before and just after the call, over repeated calls until
    it got anywhere or ``seconds`` passed.

    With forced GIL switches off (a switch interval of 1000 s), the other thread runs
    Python code only while this one has released the GIL, and it gives the GIL back at
    once (``time.sleep(0)``), so the count can move during ``call`` only if ``call``
    released the GIL. No timing is asserted: a busy machine only makes the loop repeat."""
    counter = [0]
    stop = threading.Event()

    def other():
        while not stop.is_set():
            counter[0] += 1
            time.sleep(0)  # releases the GIL between increments

    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1000.0)
    t = threading.Thread(target=other, daemon=True)
    t.start()
    try:
        deadline = time.monotonic() + seconds
        while True:
            before = counter[0]
            call()
            progress = counter[0] - before
            if progress > 0 or time.monotonic() > deadline:
                return progress
    finally:
        stop.set()
        sys.setswitchinterval(old_interval)
        t.join()


@pytest.mark.skipif(not getattr(sys, "_is_gil_enabled", lambda: True)(),
                    reason="free-threaded CPython: there is no GIL to release")
def test_gil_is_released_during_kernels():
    """Another Python thread makes progress while an ssm call runs (the GIL is released
    around the kernels), and none while Python code holds the GIL (the negative control:
    the harness can tell the two apart)."""
    call, _ = _call_of_about(0.02)

    def hold_gil():
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 0.02:
            pass

    assert _other_thread_progress(hold_gil, seconds=0.1) == 0
    assert _other_thread_progress(call, seconds=60.0) > 0


_INTERRUPT_CHILD = r"""
import signal, sys, time
import numpy as np
import ssm
# Python leaves SIGINT ignored if it started so (a job put in the background by a shell
# without job control, as `.ci/run &` is): KeyboardInterrupt, as an interactive run has it
signal.signal(signal.SIGINT, signal.default_int_handler)
x = np.random.default_rng(0).standard_normal((4, 21, 512, 512)).astype(np.float32)
y = np.random.default_rng(1).integers(0, 21, (4, 512, 512))
want_loss, want_grad = ssm.spatial_softmax_with_loss_and_grad(x, y, threads=1)
t0 = time.perf_counter()
ssm.spatial_softmax_with_loss_and_grad(x, y, threads=1)
print("CALL", time.perf_counter() - t0, flush=True)
done = 0
try:
    print("READY", flush=True)
    while True:
        loss, grad = ssm.spatial_softmax_with_loss_and_grad(x, y, threads=1)
        done += 1
except KeyboardInterrupt:
    ok = loss == want_loss and np.array_equal(grad, want_grad) if done else True
    print("INTERRUPTED", done, ok, flush=True)
    sys.exit(3)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_keyboard_interrupt_is_honoured_after_the_call(tmp_path):
    p = subprocess.Popen([sys.executable, "-c", _INTERRUPT_CHILD], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, **child_process_kwargs(tmp_path))
    try:
        first = p.stdout.readline()
        assert first.startswith("CALL "), (first, p.stderr.read() if p.poll() is not None else "")
        call_s = float(first.split()[1])
        assert p.stdout.readline().strip() == "READY"
        time.sleep(max(0.3, 2.5 * call_s))  # in the middle of some call
        t0 = time.perf_counter()
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
        waited = time.perf_counter() - t0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 3, (p.returncode, out, err)
    _, done, ok = out.split()
    assert ok == "True", out  # the outputs of the last completed call are intact
    # honoured at the next call boundary: at most about one more call
    assert waited < 3 * call_s + 2.0, (waited, call_s)
