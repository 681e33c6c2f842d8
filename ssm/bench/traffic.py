"""``ssm-bench --device cudasim``: the memory traffic of the CUDA kernels, simulated.

No timing: the three workloads, scaled down, in both layouts, run on the CUDA simulator
(ssm.testing.cudasim) built to count memory traffic; see the package docstring.
"""
from __future__ import annotations

import numpy as np

from .workloads import OPS, SEED, WORKLOADS

TRAFFIC_SCALE = 16  # spatial dims divided by this for --device cudasim


def traffic_lines(ssm, dtype=np.float32):
    """The --device cudasim table: per workload (scaled down), layout and op, the sector
    efficiency of the logits kernel and of all launches, and traffic against the model."""
    from ssm.testing import cudasim

    rng = np.random.default_rng(SEED)
    lines = ["ssm.bench: memory traffic of the CUDA kernels on the simulator "
             f"({np.dtype(dtype)}, int64 labels; sectors of 32 bytes per warp-wide request)",
             "(traffic counts every request: re-reads of a pixel's logits, which L1/L2 serve "
             "on a GPU, included)",
             f"{'workload':32s} {'layout':6s} {'op':9s} {'kernel':27s} {'kernel eff':>10s} "
             f"{'all eff':>8s} {'traffic/model':>13s}"]
    for key, (title, (N, C, *spatial)) in WORKLOADS.items():
        N, spatial = min(N, 2), [max(1, d // TRAFFIC_SCALE) for d in spatial]
        x = (2.0 * rng.standard_normal((N, C, *spatial))).astype(dtype)
        y = rng.integers(0, C, (N, *spatial))
        for layout in ("NCHW", "NHWC"):
            xl = x if layout == "NCHW" else np.ascontiguousarray(np.moveaxis(x, 1, -1))
            xd, yd = cudasim.asarray(xl), cudasim.asarray(y)
            prob = ssm.softmax(xd, layout=layout)
            calls = {"softmax": lambda: ssm.softmax(xd, layout=layout),
                     "forward": lambda: ssm.spatial_softmax_with_loss(
                         xd, yd, layout=layout, validate=False),
                     "backward": lambda: ssm.spatial_softmax_with_loss_grad(
                         prob, yd, layout=layout, validate=False),
                     "fused": lambda: ssm.spatial_softmax_with_loss_and_grad(
                         xd, yd, layout=layout, validate=False),
                     "loss": lambda: ssm.cross_entropy(xd, yd, layout=layout, validate=False)}
            for op, call in calls.items():
                with cudasim.traffic() as log:
                    call()
                main = max(log, key=lambda r: r.sector_bytes)
                useful = sum(r.useful_bytes for r in log)
                moved = sum(r.sector_bytes for r in log)
                _, kx, kl = OPS[op]
                model = kx * x.nbytes + kl * y.nbytes
                lines.append(f"{title + ' ' + str((N, C, *spatial)):32s} {layout:6s} {op:9s} "
                             f"{main.name:27s} {main.sector_efficiency:10.1%} "
                             f"{useful / moved:8.1%} {moved / model:13.2f}")
    return lines
