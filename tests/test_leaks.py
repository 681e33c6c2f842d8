"""No leaks: many calls of every public function keep the process's memory flat, both the
Python heap (tracemalloc) and the resident set (RSS: the C scratch blocks and OpenMP
teams are invisible to tracemalloc).

The quick version (1,000 calls of each function) always runs. The 10,000-call version is
marked ``slow`` and skipped unless the environment variable ``SSM_SLOW=1`` is set:
``SSM_SLOW=1 pytest -q tests/test_leaks.py``.
"""

import gc
import os
import tracemalloc

import numpy as np
import pytest

import ssm
from conftest import make_labels, make_logits

SLOW = os.environ.get("SSM_SLOW") == "1"


def _rss_bytes():
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux
        return None


def _calls():
    rng = np.random.default_rng(0)
    x = make_logits(rng, (2, 5, 17, 9), np.float32)  # 17 x 9: a tile tail
    y = make_labels(rng, (2, 17, 9), 5)
    w = rng.random((2, 17, 9)).astype(np.float32)
    xh = make_logits(rng, (2, 17, 9, 5), np.float64)
    soft = ssm.softmax(make_logits(rng, x.shape, np.float32))
    out = np.empty_like(x)
    return {
        "softmax": lambda: ssm.softmax(x),
        "log_softmax": lambda: ssm.log_softmax(xh, layout="NHWC", threads=2),
        "softmax_grad": lambda: ssm.softmax_grad(soft, x, out=out),
        "loss": lambda: ssm.spatial_softmax_with_loss(x, y, w, reduction="none"),
        "loss_soft": lambda: ssm.spatial_softmax_with_loss(x, soft, class_weights=[1, 2, 3, 4, 5]),
        "grad": lambda: ssm.spatial_softmax_with_loss_grad(soft, y, w, d_loss=0.5),
        "fused": lambda: ssm.spatial_softmax_with_loss_and_grad(x, y, w, return_prob=True,
                                                                threads=2),
        "fused_lens": lambda: ssm.spatial_softmax_with_loss_and_grad(
            x, y, lens=np.eye(5), reduction="sum", out=out),
        "bad_label": lambda: _raises(lambda: ssm.spatial_softmax_with_loss(x, y + 5)),
        "bad_option": lambda: _raises(lambda: ssm.softmax(x, layout="NCWH")),
    }


def _raises(f):
    try:
        f()
    except ValueError:
        return
    raise AssertionError("expected ValueError")


def _check_flat(n_calls, name, call):
    for _ in range(min(200, n_calls)):  # warm up: caches, OpenMP teams, interned objects
        call()
    gc.collect()
    rss0 = _rss_bytes()
    tracemalloc.start()
    try:
        snap0 = tracemalloc.take_snapshot()
        for _ in range(n_calls):
            call()
        gc.collect()
        snap1 = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    rss1 = _rss_bytes()
    grown = sum(s.size_diff for s in snap1.compare_to(snap0, "filename")
                if "tracemalloc" not in str(s.traceback))
    # a leak of one small object per call is n_calls * ~100 bytes
    assert grown < 32 * 1024, f"{name}: Python heap grew {grown} bytes over {n_calls} calls"
    if rss0 is not None and "asan" not in os.environ.get("LD_PRELOAD", ""):
        # (under AddressSanitizer freed blocks sit in its quarantine: RSS grows by design)
        # scratch (~50 KB per call per thread) leaked per call would be >= 50 MB over 1,000
        assert rss1 - rss0 < 4 * 1024 * 1024, f"{name}: RSS grew {(rss1 - rss0) >> 10} KiB"


@pytest.mark.parametrize("name", list(_calls()))
def test_no_leak_quick(name):
    _check_flat(1000, name, _calls()[name])


@pytest.mark.slow
@pytest.mark.skipif(not SLOW, reason="slow: set SSM_SLOW=1 to run")
@pytest.mark.parametrize("name", list(_calls()))
def test_no_leak_10k(name):
    _check_flat(10_000, name, _calls()[name])
