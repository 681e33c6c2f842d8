"""The exact global "mean" across MPI ranks (mpi4py), one shard of the batch per rank.

    mpiexec -n 2 python examples/data_parallel_mpi.py [--check]

The recipe (README.md, "Larger than one machine"): add the ranks' normalisers
(ssm.loss_normalizer) and loss sums (reduction="sum") separately, and compute each rank's
gradient with d_loss = 1 / global normaliser. --check: each rank compares its gradient
with its slice of one call over the whole batch (bit for bit: the ranks' normalisers, counts of quarter weights here, add up exactly; with
arbitrary float weights the float64 sum in another order may differ in its last bit).
"""
import sys

import numpy as np
from mpi4py import MPI

import ssm

N, C, H, W = 4, 21, 32, 32


def whole_batch(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, C, H, W)).astype(np.float32)
    y = rng.integers(0, C, (N, H, W))
    y[rng.random((N, H, W)) < 0.2] = -1
    w = (rng.integers(0, 5, (N, H, W)) / 4).astype(np.float32)   # pixel weights 0 to 1
    return x, y, w


def global_mean_loss_and_grad(comm, x, y, w):
    norm = comm.allreduce(float(ssm.loss_normalizer(x, y, w)), op=MPI.SUM)
    loss_sum, dx = ssm.spatial_softmax_with_loss_and_grad(
        x, y, w, reduction="sum", d_loss=1.0 / norm if norm else 0.0)
    total = comm.allreduce(float(loss_sum), op=MPI.SUM)
    return total / norm if norm else 0.0, dx


def main(argv):
    if "-h" in argv or "--help" in argv:
        print(__doc__)
        return
    comm = MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    x, y, w = whole_batch()
    shard = slice(rank * N // world, (rank + 1) * N // world)
    loss, dx = global_mean_loss_and_grad(comm, x[shard], y[shard], w[shard])
    print(f"rank {rank}/{world}: global mean loss {loss:.7f}, gradient {dx.shape}", flush=True)
    if "--check" in argv:
        L, dx_all = ssm.spatial_softmax_with_loss_and_grad(x, y, w)
        np.testing.assert_array_equal(dx, dx_all[shard])
        np.testing.assert_allclose(loss, float(L), rtol=2 * np.finfo(np.float32).eps)
        print(f"rank {rank}: gradient equals the single-process one", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
