"""Thread counts: the documented maximum, thread-creation failure as an exception, the
OpenMP wait policy, and the rule by which default-thread calls adapt to foreign load."""
import subprocess
import sys

import numpy as np
import pytest

import ssm
from conftest import child_process_kwargs, make_labels, make_logits
from ssm import _cpu, _threads

MAX = _threads.MAX_THREADS


def test_maximum_is_documented_and_generous():
    assert MAX >= 64
    with open(_threads.__file__) as f:
        assert "MAX_THREADS = max(64, 4 * _CPUS)" in f.read()


@pytest.mark.parametrize("n", [MAX + 1, 10**6, 2**31, 2**63, 10**30])
def test_above_maximum_is_a_value_error(rng, n):
    x = make_logits(rng, (2, 3, 4), np.float32)
    y = make_labels(rng, (2, 4), 3)
    for call in (lambda: ssm.softmax(x, threads=n),
                 lambda: ssm.spatial_softmax_with_loss_and_grad(x, y, threads=n)):
        with pytest.raises(ValueError, match=rf"^threads: {n} threads is more than ssm's "
                                             rf"maximum of {MAX} .*expected 1 to {MAX}"):
            call()
    old = ssm.get_num_threads()
    with pytest.raises(ValueError, match=rf"^n: {n} threads is more than"):
        ssm.set_num_threads(n)
    assert ssm.get_num_threads() == old
    ssm.softmax(x)  # the default still works


def test_maximum_is_accepted(rng):
    x = make_logits(rng, (2, 3, 4), np.float32)
    np.testing.assert_array_equal(ssm.softmax(x, threads=MAX), ssm.softmax(x, threads=1))


_CHILD = r"""
import resource
import time
import numpy as np
import ssm
def status(key):
    return int([l for l in open("/proc/self/status") if l.startswith(key)][0].split()[1])
x = np.ones((4, 21, 256, 256), np.float32)  # big enough for a team of 60 (grain, tiles)
before = status("Threads:")  # this one and NumPy's BLAS threads
ssm.softmax(x, threads=16)
ssm.softmax(x, threads=2)  # libgomp ends the 14 threads the team of 2 does not need
# ... in the background: wait until they have gone (up to 10 s; a busy machine may not run
# them at once), or the limit below counts their stacks as used and a team of 16 fits in it
# (CI, once: "RAN 16")
for _ in range(1000):
    if status("Threads:") <= before + 1:
        break
    time.sleep(0.01)
vm = status("VmSize:") * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + (32 << 20), resource.RLIM_INFINITY))
for n in (16, 60):  # 15 or 59 stacks of 8 MiB: more than 32 MiB
    try:
        ssm.softmax(x, threads=n)
        print("RAN", n)
    except OSError as e:
        print("OSERROR", e)
print("ALIVE", float(ssm.softmax(x, threads=2)[0, 0, 0, 0]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and pthreads")
@pytest.mark.skipif("address" in _cpu.build_flags(),
                    reason="AddressSanitizer aborts when its own allocator hits RLIMIT_AS")
def test_thread_creation_failure_raises_and_the_process_lives(tmp_path):
    # libgomp ends the process ("Thread creation failed") when it cannot start a team
    import resource
    stack = resource.getrlimit(resource.RLIMIT_STACK)[0]
    if stack != resource.RLIM_INFINITY and stack < (4 << 20):
        pytest.skip(f"thread stacks of {stack} bytes: 15 of them fit in 32 MiB")
    r = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True,
                       timeout=120, **child_process_kwargs(tmp_path))
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "threads: could not start 16 threads" in out, out  # a pool that grows back
    assert "threads: could not start 60 threads" in out, out
    assert "pass threads=" in out and "ALIVE 0.047619" in out, out


def test_huge_openmp_default_is_capped(tmp_path):
    kw = child_process_kwargs(tmp_path)
    kw["env"]["OMP_NUM_THREADS"] = "100000"
    r = subprocess.run([sys.executable, "-c", "import ssm, numpy as np; "
                        "print(ssm.get_num_threads()); print(ssm.softmax(np.ones((1, 2))))"],
                       capture_output=True, text=True, timeout=60, **kw)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[0] == str(MAX), r.stdout


def test_openmp_stack_size_parsing():
    parse = _cpu._openmp_stack_bytes
    assert parse({}) == 0
    assert parse({"OMP_STACKSIZE": "512"}) == 512 << 10  # K when no unit
    assert parse({"OMP_STACKSIZE": "4m"}) == 4 << 20
    assert parse({"OMP_STACKSIZE": "1G"}) == 1 << 30
    assert parse({"OMP_STACKSIZE": "100B"}) == 100
    assert parse({"GOMP_STACKSIZE": "2M"}) == 2 << 20
    assert parse({"OMP_STACKSIZE": "lots"}) == 0


@pytest.mark.parametrize("env,policy", [
    ({}, "spin 10000 times, then sleep (GOMP_SPINCOUNT, set by ssm)"),
    ({"OMP_WAIT_POLICY": "active"}, "as the environment sets it (OMP_WAIT_POLICY='active', "
                                    "GOMP_SPINCOUNT=None)"),
    ({"GOMP_SPINCOUNT": "1000"}, "as the environment sets it (OMP_WAIT_POLICY=None, "
                                 "GOMP_SPINCOUNT='1000')")])
def test_wait_policy(tmp_path, env, policy):
    # ssm asks its OpenMP runtime for short spins unless the user chose, and leaves
    # the environment that other libraries and child processes see as it was
    kw = child_process_kwargs(tmp_path)
    for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        kw["env"].pop(k, None)
    kw["env"].update(env)
    code = ("import os, ssm; from ssm import _config; print(_config.config()['openmp wait "
            "policy']); print(os.environ.get('OMP_WAIT_POLICY'), "
            "os.environ.get('GOMP_SPINCOUNT'))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=60, **kw)
    assert r.returncode == 0, r.stderr
    got_policy, env_after = r.stdout.splitlines()
    assert got_policy == policy
    assert env_after == f"{env.get('OMP_WAIT_POLICY')} {env.get('GOMP_SPINCOUNT')}"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/maps")
def test_wait_policy_when_the_runtime_was_loaded_first(tmp_path):
    # a source build shares the system libgomp: loaded before ssm, it keeps its default,
    # and ssm must say so rather than claim short spins
    import os
    if os.path.isdir(os.path.join(os.path.dirname(ssm.__file__), os.pardir, "ssm.libs")):
        pytest.skip("ssm's libgomp is private to it (the wheel's bundled copy)")
    kw = child_process_kwargs(tmp_path)
    for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        kw["env"].pop(k, None)
    code = ("import ctypes; ctypes.CDLL('libgomp.so.1'); import ssm; from ssm import _config; "
            "print(_config.config()['openmp wait policy'])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=60, **kw)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("the runtime's default (long spins): the OpenMP runtime was "
                               "loaded before ssm"), r.stdout


# ---- the foreign-load rule (ssm/_cpu.pyx: _plan, _learn) ----------------------------


@pytest.fixture
def rule():
    _cpu.reset_busy_state()
    yield
    _cpu.reset_busy_state()


# The calls fed to the rule end 100 s from now, so that what they set still holds when
# the test reads it back however long the process waits for a core.
FUTURE = 100.0


def test_on_time_team_keeps_every_thread(rule):
    t0 = _cpu.wtime() + FUTURE
    _cpu.learn(4, False, [t0 + 1e-3, t0 + 1.02e-3, t0 + 0.99e-3, t0 + 1.01e-3], t0, t0 + 1.03e-3)
    assert _cpu.plan(4, True) == 4
    assert _cpu.busy_state()[2] == pytest.approx(0.02)


def test_late_threads_are_left_out_for_a_while(rule):
    t0 = _cpu.wtime() + FUTURE
    # two of four threads finished 5 ms after the others, in a 6 ms call: once may be a
    # page fault or an interrupt; twice in a row is load
    late = [t0 + 1e-3, t0 + 6e-3, t0 + 1e-3, t0 + 6e-3]
    _cpu.learn(4, False, late, t0, t0 + 6e-3)
    assert _cpu.busy_state()[0] == 0 and _cpu.plan(4, True) == 4
    _cpu.learn(4, False, late, t0, t0 + 6e-3)
    drop, left, hold = _cpu.busy_state()
    assert drop == 2 and left == pytest.approx(FUTURE + 6e-3 + 0.02, abs=1.0)
    assert hold == pytest.approx(0.04)
    assert _cpu.plan(4, True) == 2
    assert _cpu.plan(16, True) == 14  # a count left out, not a team size
    assert _cpu.plan(2, True) == 1
    assert _cpu.plan(4, False) == 4  # an explicit threads=k is honoured
    assert _cpu.plan(1, True) == 1
    # late again at full size: the hold doubles, up to a second
    for expect in (0.08, 0.16, 0.32, 0.64, 1.0, 1.0):
        _cpu.learn(4, False, [t0 + 1e-3, t0 + 6e-3, t0 + 1e-3, t0 + 6e-3], t0, t0 + 6e-3)
        assert _cpu.busy_state()[2] == pytest.approx(expect)
    # the smaller team late too: one more left out; on time: the rule stays
    _cpu.learn(2, True, [t0 + 1e-3, t0 + 6e-3], t0, t0 + 6e-3)
    assert _cpu.busy_state()[0] == 3 and _cpu.plan(4, True) == 1
    _cpu.learn(2, True, [t0 + 1e-3, t0 + 1e-3], t0, t0 + 1.1e-3)
    assert _cpu.busy_state()[0] == 3
    # a full-size call on time lifts it and halves the hold
    for expect in (0.5, 0.25, 0.125, 0.0625, 0.03125, 0.02, 0.02):
        _cpu.learn(4, False, [t0 + 1e-3] * 4, t0, t0 + 1.1e-3)
        assert _cpu.busy_state()[0] == 0 and _cpu.busy_state()[2] == pytest.approx(expect)


def test_late_caller_leaves_out_one_thread(rule):
    # every thread on time, but the call returned 4 ms after they finished: the caller
    # slept at the closing barrier and had lost its core
    t0 = _cpu.wtime() + FUTURE
    for _ in range(2):
        _cpu.learn(2, False, [t0 + 1e-3, t0 + 1e-3], t0, t0 + 5e-3)
    assert _cpu.busy_state()[0] == 1 and _cpu.plan(2, True) == 1


def test_one_late_call_between_on_time_ones_is_ignored(rule):
    t0 = _cpu.wtime() + FUTURE
    for _ in range(3):
        _cpu.learn(2, False, [t0 + 1e-3, t0 + 9e-3], t0, t0 + 9e-3)  # late
        _cpu.learn(2, False, [t0 + 1e-3, t0 + 1e-3], t0, t0 + 1.1e-3)  # on time
    assert _cpu.busy_state()[0] == 0 and _cpu.plan(2, True) == 2


def test_small_differences_are_not_late(rule):
    # within LATE_MIN (200 us) or a quarter of the call: jitter, not foreign load
    t0 = _cpu.wtime() + FUTURE
    _cpu.learn(2, False, [t0 + 50e-6, t0 + 200e-6], t0, t0 + 300e-6)
    _cpu.learn(2, False, [t0 + 4e-3, t0 + 4.9e-3], t0, t0 + 5e-3)
    assert _cpu.plan(2, True) == 2


def test_rule_expires(rule):
    t0 = _cpu.wtime() - 1.0  # late calls that ended a second ago: their 20 ms are over
    for _ in range(2):
        _cpu.learn(2, False, [t0 + 1e-3, t0 + 9e-3], t0, t0 + 9e-3)
    assert _cpu.busy_state()[0] == 1 and _cpu.plan(2, True) == 2


def test_thread_limit_gives_a_smaller_team(tmp_path):
    # OMP_THREAD_LIMIT=1: OpenMP starts one thread where two were asked for; the rule must
    # not read end times of threads that never ran (it would find them "late")
    kw = child_process_kwargs(tmp_path)
    kw["env"]["OMP_THREAD_LIMIT"] = "1"
    code = ("import numpy as np, ssm; from ssm import _cpu\n"
            "ssm.set_num_threads(2)  # the default asks for 2; OpenMP gives 1\n"
            "x = np.ones((4, 21, 128, 128), np.float32)\n"
            "for _ in range(20): ssm.softmax(x)\n"
            "print(_cpu.busy_state()[0], _cpu.busy_state()[2])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=60, **kw)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["0", "0.02"], r.stdout
