"""``ssm-bench --dask``: the fused loss+grad through ssm.dask against one call of ssm.

The data: ``--dask-scale`` (default 4) times the workload's batch (VOC-like: 32 x 21 x
256 x 256 float32 logits, 176 MB, and the 176 MB gradient), in chunks of one image. Both
paths get the same work at the same parallelism, 2 by default (``--threads``'s largest
value): the single call with that many OpenMP threads; the Dask path with each chunk's
call on one thread, under (a) the threaded scheduler with that many threads, (b) a
``dask.distributed`` LocalCluster of that many worker processes of one thread, and (c) one
worker process of that many threads. The chunks are in the workers' memory before the
clock starts (``persist``; one task draws a chunk's logits and labels, so a cluster holds
them on one worker, as a model's forward pass would leave them), and the gradient stays
there (``persist``; the loss's one chunk is then fetched, on a cluster from its worker,
without a second graph): what is timed is the graph (label pre-pass per group of chunks,
the global normaliser, the fused pass per chunk, the loss), not moving data to it. Timed alternately
(A/B), medians. On a cluster each task costs a scheduler round trip: ``--dask-chunk 4``
shows how much of the gap larger chunks close.

The single call allocates its gradient, as the chunks' calls do (a fresh 176 MB array is
mapped and faulted in on every call, while the chunks' 5.5 MB arrays come back from the
heap); the row with ``out=`` shows the call into a buffer already faulted in.

Printed: the median time of each path, the Dask path's overhead per chunk (its time minus
the single call's, over the chunks) and each path's throughput as a fraction of a copy of
the same bytes (the memory floor: the fused pass reads X and the labels and writes dX; a
copy reads X and writes X).
"""
from __future__ import annotations

import contextlib
import functools
import operator
import os
import statistics
import time

import numpy as np

from .workloads import IGNORE_FRACTION, SEED

REPS = 7


def _make_pair(i, *, shape, C, x_dtype, k):
    """Chunk i's logits and labels, drawn together: one task makes both, so that a
    cluster holds them on one worker, as the outputs of a model's forward pass would be."""
    rng = np.random.default_rng([SEED, i])
    x = (2 * rng.standard_normal((k, C, *shape[2:]))).astype(x_dtype)
    y = rng.integers(0, C, (k, *shape[2:]))
    y[rng.random(y.shape) < IGNORE_FRACTION] = -1
    return x, y


def _inputs(shape, dtype, k=1):
    """Logits and labels as Dask arrays of k images per chunk, drawn by the chunks' tasks
    (a chunk's logits and labels by one task)."""
    import dask.array as da
    from dask.base import tokenize
    from dask.highlevelgraph import HighLevelGraph
    N, C = shape[0], shape[1]
    n_blocks, zeros = N // k, (0,) * (len(shape) - 2)
    token = tokenize(shape, np.dtype(dtype).str, k, SEED)
    pname, xname, yname = (f"ssm-bench-{s}-{token}" for s in ("pair", "x", "y"))
    make = functools.partial(_make_pair, shape=shape, C=C, x_dtype=dtype, k=k)
    layers = {pname: {(pname, i): (make, i) for i in range(n_blocks)},
              xname: {(xname, i, 0, *zeros): (operator.getitem, (pname, i), 0)
                      for i in range(n_blocks)},
              yname: {(yname, i, *zeros): (operator.getitem, (pname, i), 1)
                      for i in range(n_blocks)}}
    graph = HighLevelGraph(layers, {pname: set(), xname: {pname}, yname: {pname}})
    spatial = [(s,) for s in shape[2:]]
    x = da.Array(graph, xname, ((k,) * n_blocks, (C,), *spatial), dtype=dtype)
    y = da.Array(graph, yname, ((k,) * n_blocks, *spatial), dtype=np.int64)
    return x, y


def _clusters(threads):
    """(row label, worker processes, threads per worker) of the LocalClusters timed."""
    return [(f"dask, LocalCluster {threads} processes x 1 thread", threads, 1),
            (f"dask, LocalCluster 1 process x {threads} threads", 1, threads)]


def _median_ms(times):
    return 1e3 * statistics.median(times)


@contextlib.contextmanager
def _environ_kept():
    """os.environ as it was, after the block: a LocalCluster's nannies set OMP_NUM_THREADS=1
    (and more) in this process for the workers they spawn, and leave it (distributed's
    ``pre-spawn-environ``), so an OpenMP runtime started later here would run one thread."""
    environ = dict(os.environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(environ)


def run_dask(ssm, args, name, shape, threads):
    """Lines of the --dask report."""
    import dask
    import distributed
    import ssm.dask as sdask

    scale = args.dask_scale
    shape = (shape[0] * scale, *shape[1:])
    dtype = np.dtype(args.dtype)
    k = args.dask_chunk
    if shape[0] % k:
        raise SystemExit(f"--dask-chunk {k} does not divide the batch of {shape[0]} images")
    x_lazy, y_lazy = _inputs(shape, dtype, k)
    x_np, y_np = dask.compute(x_lazy, y_lazy, scheduler="threads")
    n_chunks = shape[0] // k
    gb = (2 * x_np.nbytes + y_np.nbytes) / 1e9
    copy_dst = np.empty_like(x_np)

    def single():  # a new gradient array, as the Dask path's chunks are

        t0 = time.perf_counter()
        ssm.spatial_softmax_with_loss_and_grad(x_np, y_np, threads=threads)
        return time.perf_counter() - t0

    out = np.zeros_like(x_np)

    def single_out():  # into a gradient buffer already faulted in
        t0 = time.perf_counter()
        ssm.spatial_softmax_with_loss_and_grad(x_np, y_np, threads=threads, out=out)
        return time.perf_counter() - t0

    def copy():  # into a buffer already faulted in: the floor
        t0 = time.perf_counter()
        np.copyto(copy_dst, x_np)
        return time.perf_counter() - t0

    calls = iter(range(1 << 30))

    def dask_path(client, x, y, **compute_kw):
        # a new d_loss each time, so that the graph's keys are new: a cluster would hand
        # back the results of an identical graph still in its memory
        d_loss = 1.0 + next(calls) * 2.0**-40
        t0 = time.perf_counter()
        loss, dx = sdask.spatial_softmax_with_loss_and_grad(x, y, d_loss=d_loss, threads=1)
        if client is None:
            dx, loss = dask.persist(dx, loss, **compute_kw)
            float(loss.compute(scheduler="sync"))
        else:
            dx, loss = client.persist([dx, loss])
            distributed.wait([dx, loss])
            # the loss's one chunk, fetched: loss.compute() would submit a graph again (one
            # more round trip through the scheduler, 30-40 ms on a 2-core VM)
            (fut,) = distributed.futures_of(loss)
            float(fut.result())
        elapsed = time.perf_counter() - t0
        if client is not None:
            client.cancel([dx, loss])
        del dx, loss
        return elapsed

    rows = {"copy (memory floor)": [], "ssm, one call, out= (faulted in)": [],
            "ssm, one call": []}
    configs = [("dask, threaded scheduler", None, {"scheduler": "threads",
                                                    "num_workers": threads})]
    clusters = _clusters(threads)
    # the threaded scheduler on data in this process
    xs, ys = dask.persist(x_lazy, y_lazy, scheduler="threads")
    for label, _, kw in configs:
        rows[label] = []
        for fn in (copy, single, single_out):
            fn()
        dask_path(None, xs, ys, **kw)
        for _ in range(REPS):
            rows["copy (memory floor)"].append(copy())
            rows["ssm, one call, out= (faulted in)"].append(single_out())
            rows["ssm, one call"].append(single())
            rows[label].append(dask_path(None, xs, ys, **kw))
    for label, workers, per in clusters:
        rows[label] = []
        with _environ_kept(), \
                distributed.LocalCluster(n_workers=workers, threads_per_worker=per,
                                         processes=True, dashboard_address=None,
                                         silence_logs=40) as cluster, \
                distributed.Client(cluster) as client:
            xw, yw = client.persist([x_lazy, y_lazy])
            distributed.wait([xw, yw])
            dask_path(client, xw, yw)
            for _ in range(REPS):
                rows["ssm, one call"].append(single())
                rows[label].append(dask_path(client, xw, yw))
    base = _median_ms(rows["ssm, one call"])
    copy_ms = _median_ms(rows["copy (memory floor)"])
    lines = [f"ssm.bench --dask: fused loss+grad, {name or 'shape'} x{scale}: "
             f"{'x'.join(map(str, shape))} {dtype}, int64 labels, chunks of {k} image(s) "
             f"({n_chunks} chunks), parallelism {threads}, {REPS} alternating reps, medians",
             f"{'path':44s} {'median ms':>10s} {'vs one call':>12s} {'overhead/chunk':>15s} "
             f"{'GB/s':>7s} {'of copy':>8s}"]
    for label, times in rows.items():
        ms = _median_ms(times)
        nbytes = 2 * x_np.nbytes if label.startswith("copy") else gb * 1e9
        gbs = nbytes / 1e9 / (ms / 1e3)
        per_chunk = f"{(ms - base) / n_chunks:.2f} ms" if label.startswith("dask") else ""
        ratio = f"{ms / base:.2f}x" if not label.startswith("copy") else ""
        lines.append(f"{label:44s} {ms:10.1f} {ratio:>12s} {per_chunk:>15s} {gbs:7.2f} "
                     f"{gbs / (2 * x_np.nbytes / 1e9 / (copy_ms / 1e3)):8.0%}")
    return lines
