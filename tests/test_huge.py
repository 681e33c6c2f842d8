"""Beyond 2**31 elements: float32 logits of shape (1, 2, 2**30 + 3) (2**31 + 6 logits,
8.6 GB) and (2**30 + 3, 2) in NHWC, checked against the float64 reference at both ends
(where any 32-bit index arithmetic would have wrapped), and the summed loss against
a float64 closed form over every pixel.

The logits and labels repeat with an odd period Q (about 2**24 pixels), so a wrapped index
(a multiple of 2**31 or 2**32 away) reads other values, and the float64 closed form is
summed over one period and scaled: the inputs cost a copy, not a hash and a float64 pass
per pixel (the test took 141 s of CI that way, most of it in NumPy on our side).

Slow and big: marked ``slow`` and skipped unless the environment variable ``SSM_SLOW=1``
is set (``SSM_SLOW=1 pytest -q tests/test_huge.py``), and skipped when the machine has
less than ~20 GiB of available memory (logits + gradient + uint8 labels: 18.3 GB).
"""

import gc
import os

import numpy as np
import pytest

import _reference as ref
import ssm
from conftest import LAYOUTS, assert_close

SLOW = os.environ.get("SSM_SLOW") == "1"
P = 2**30 + 3  # pixels; 2 classes: 2**31 + 6 logits
NEED = 2 * (2 * P * 4) + P + (1 << 30)  # x + dlogits + labels + slack


def _available_bytes():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not SLOW, reason="slow: set SSM_SLOW=1 to run"),
    pytest.mark.skipif(_available_bytes() < NEED,
                       reason=f"needs {NEED / 2**30:.1f} GiB of available memory"),
]

K = 4096  # pixels checked at each end


Q = 2**24 + 1  # the inputs' period: odd, so no wrap of 2**31 or 2**32 pixels maps p onto p
assert P > 2 * Q


def _hash_logits(p, salt):
    """Logits in [-3, 3) from a multiplicative hash of the pixel index (not smooth in p)."""
    h = ((p + salt) * 2654435761) & 0xFFFFFFFF
    return (h * (6.0 / 2**32) - 3.0).astype(np.float32)


def _period():
    """One period of the inputs: class 0 and class 1 logits, and the labels (0 or 1)."""
    p = np.arange(Q, dtype=np.int64)
    return _hash_logits(p, 0), _hash_logits(p, 12345), (p % 3 == 0).astype(np.uint8)


def _tiled(dst, block):
    """dst[i] = block[i % Q] along dst's first axis, one copy of block at a time."""
    for s in range(0, len(dst), Q):
        dst[s:s + Q] = block[:len(dst) - s]


def _closed_form_sum(a, b, y):
    """The summed loss over all P pixels, by the two-class closed form
    l = logaddexp(x0, x1) - x_y in float64: one period's sum times the number of whole
    periods, plus the sum over the leading part of the last one."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    lp = np.logaddexp(a, b) - np.where(y == 1, b, a)
    whole, rest = divmod(P, Q)
    return whole * float(np.sum(lp)) + float(np.sum(lp[:rest]))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_more_than_2_31_logits(layout):
    shape = (1, 2, P) if layout == "NCHW" else (P, 2)
    a, b, yq = _period()
    x = np.empty(shape, np.float32)
    _tiled(x[0, 0] if layout == "NCHW" else x[:, 0], a)
    _tiled(x[0, 1] if layout == "NCHW" else x[:, 1], b)
    y = np.empty((1, P) if layout == "NCHW" else (P,), np.uint8)
    _tiled(y.reshape(-1), yq)
    kept = y.reshape(-1)[-7]
    y.reshape(-1)[-7] = 255  # an out-of-range label at the far end: found, with its index
    with pytest.raises(ValueError, match=f"label 255 at index .*{P - 7}"):
        ssm.spatial_softmax_with_loss_and_grad(x, y, layout=layout)
    y.reshape(-1)[-7] = kept
    loss, grad = ssm.spatial_softmax_with_loss_and_grad(x, y, layout=layout, reduction="sum")

    def ends(a):
        if layout == "NCHW":
            return [a[..., :K], a[..., -K:]]
        return [a[:K], a[-K:]]

    def check_grad_ends(grad):
        for xs, ys, gs in zip(ends(x), ends(y), ends(grad)):
            rprob, _ = ref.sswl_loss(xs, ys, reduction="sum", layout=layout)
            rg = ref.sswl_grad(rprob, ys, reduction="sum", layout=layout)
            assert_close(gs, rg, np.float32, scale=1.0)

    check_grad_ends(grad)
    del grad  # no view of it is left: 8.6 GB back before the softmax below
    gc.collect()
    # the whole sum against the float64 closed form (the reference's general code is too
    # slow for 2**30 pixels)
    want = _closed_form_sum(a, b, yq)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    # softmax at the far end
    prob = ssm.softmax(x, layout=layout)
    for xs, ps in zip(ends(x), ends(prob)):
        assert_close(ps, ref.softmax(xs, layout), np.float32, scale=1e-6)
