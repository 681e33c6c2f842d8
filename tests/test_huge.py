"""Beyond 2**31 elements: float32 logits of shape (1, 2, 2**30 + 3) (2**31 + 6 logits,
8.6 GB) and (2**30 + 3, 2) in NHWC, checked against the float64 reference at both ends
(where any 32-bit index arithmetic would have wrapped), and the summed loss against
a float64 closed form over every pixel.

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


def _hash_logits(p, salt):
    """Position-dependent logits in [-3, 3): a multiplicative hash of the pixel index, so
    a wrapped or truncated index reads values that do not match."""
    h = ((p + salt) * 2654435761) & 0xFFFFFFFF
    return (h * (6.0 / 2**32) - 3.0).astype(np.float32)


def _fill(x, layout):
    """Cheap, position-dependent logits (_hash_logits), written in chunks, so no
    temporary of the full size is made."""
    step = 1 << 24
    for s in range(0, P, step):
        p = np.arange(s, min(P, s + step), dtype=np.int64)
        a = _hash_logits(p, 0)
        b = _hash_logits(p, 12345)
        if layout == "NCHW":
            x[0, 0, s:s + len(p)] = a
            x[0, 1, s:s + len(p)] = b
        else:
            x[s:s + len(p), 0] = a
            x[s:s + len(p), 1] = b


@pytest.mark.parametrize("layout", LAYOUTS)
def test_more_than_2_31_logits(layout):
    shape = (1, 2, P) if layout == "NCHW" else (P, 2)
    x = np.empty(shape, np.float32)
    _fill(x, layout)
    y = np.empty((1, P) if layout == "NCHW" else (P,), np.uint8)
    yf = y.reshape(-1)
    for s in range(0, P, 1 << 24):  # in chunks: no full-size temporaries
        yf[s:s + (1 << 24)] = np.arange(s, min(P, s + (1 << 24))) % 3 == 0
    y.reshape(-1)[-7] = 255  # an out-of-range label at the far end: found, with its index
    with pytest.raises(ValueError, match=f"label 255 at index .*{P - 7}"):
        ssm.spatial_softmax_with_loss_and_grad(x, y, layout=layout)
    y.reshape(-1)[-7] = 1
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
    # the whole sum against a float64 sum in chunks, by the two-class closed form
    # l = logaddexp(x0, x1) - x_y (the reference's general code is too slow for 2**30 pixels)
    want = 0.0
    step = 1 << 24
    for s in range(0, P, step):
        if layout == "NCHW":
            x0, x1, ys = x[0, 0, s:s + step], x[0, 1, s:s + step], y[0, s:s + step]
        else:
            x0, x1, ys = x[s:s + step, 0], x[s:s + step, 1], y[s:s + step]
        x0, x1 = x0.astype(np.float64), x1.astype(np.float64)
        want += float(np.sum(np.logaddexp(x0, x1) - np.where(ys == 1, x1, x0)))
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    # softmax at the far end
    prob = ssm.softmax(x, layout=layout)
    for xs, ps in zip(ends(x), ends(prob)):
        assert_close(ps, ref.softmax(xs, layout), np.float32, scale=1e-6)
