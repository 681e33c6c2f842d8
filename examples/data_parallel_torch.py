"""The exact global "mean" across data-parallel ranks with torch.distributed (gloo, CPU).

Each rank holds a shard of the batch. The mean of the ranks' means is not the mean over all
non-ignored pixels; the exact one is sum(loss sums) / sum(normalisers), and each rank's
gradient is scaled by that global normaliser:

    n_k = ssm.loss_normalizer(x_k, y_k)                  # this rank's denominator
    norm = all_reduce(n_k)                               # float64
    L_k, dx_k = ssm.spatial_softmax_with_loss_and_grad(x_k, y_k, reduction="sum",
                                                       d_loss=1 / norm if norm else 0)
    loss = all_reduce(L_k) / norm

Run: python examples/data_parallel_torch.py [--check]   (starts 2 processes on the CPU).
--check: every rank compares its gradient with its slice of one call over the whole batch
(bit for bit: the ranks' normalisers, counts of quarter weights here, add up exactly; with
arbitrary float weights the float64 sum in another order may differ in its last bit) and the loss with that call's (float32 rounding of the final sum).
"""
import os
import sys

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import ssm

N, C, H, W = 4, 21, 32, 32


def whole_batch(seed=0):
    """The same batch on every rank: logits, labels (some ignored), pixel weights."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, C, H, W)).astype(np.float32)
    y = rng.integers(0, C, (N, H, W))
    y[rng.random((N, H, W)) < 0.2] = -1
    w = (rng.integers(0, 5, (N, H, W)) / 4).astype(np.float32)   # pixel weights 0 to 1
    return x, y, w


def global_mean_loss_and_grad(x, y, w, group=None):
    """This rank's gradient and the exact global mean loss (every rank gets it)."""
    n = torch.tensor(float(ssm.loss_normalizer(x, y, w)), dtype=torch.float64)
    dist.all_reduce(n, group=group)                     # the global normaliser
    norm = float(n)
    loss_sum, dx = ssm.spatial_softmax_with_loss_and_grad(
        x, y, w, reduction="sum", d_loss=1.0 / norm if norm else 0.0)
    total = torch.tensor(float(loss_sum), dtype=torch.float64)
    dist.all_reduce(total, group=group)
    return float(total) / norm if norm else 0.0, dx


def run(rank, world, port, check):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        x, y, w = whole_batch()
        shard = slice(rank * N // world, (rank + 1) * N // world)   # this rank's images
        loss, dx = global_mean_loss_and_grad(x[shard], y[shard], w[shard])
        print(f"rank {rank}: global mean loss {loss:.7f}, gradient {dx.shape}", flush=True)
        if check:
            L, dx_all = ssm.spatial_softmax_with_loss_and_grad(x, y, w)
            np.testing.assert_array_equal(dx, dx_all[shard])
            np.testing.assert_allclose(loss, float(L), rtol=2 * np.finfo(np.float32).eps)
            print(f"rank {rank}: gradient equals the single-process one", flush=True)
    finally:
        dist.destroy_process_group()


def main(argv):
    if "-h" in argv or "--help" in argv:
        print(__doc__)
        return
    import socket
    with socket.socket() as s:       # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(run, args=(2, port, "--check" in argv), nprocs=2, join=True)


if __name__ == "__main__":
    main(sys.argv[1:])
