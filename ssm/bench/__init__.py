"""Thread-scaling benchmark of ssm against the memory floor and its peers.

``ssm-bench`` (or ``python -m ssm.bench`` from outside the source tree) times the
four operations of ssm (softmax, loss forward, loss backward, fused loss+grad) at
1, 2, 4, ... threads up to the core count, and,
in the same run and at the same thread count, a copy of the same bytes (the
floor), PyTorch, a vectorised NumPy reference and scikit-learn. ``--help`` lists
the options; benchmarks/README.md explains how to read the tables. This docstring is
the reference for the method.

Modules
-------
``cli`` (options, ``main``), ``workloads`` (the workloads, the bytes model, the one
problem maker for both devices), ``timing`` (the repetition loops, the load meter, the
sweep), ``peers`` (ssm, the copy floor, NumPy, PyTorch, scikit-learn, and the agreement
check), ``cpu`` and ``gpu`` (each device's plan of rows and run), ``report`` (derived
columns, tables, JSON), ``plots``, ``machine``, ``busy`` (``--busy``).

Method
------
Data
    logits ``2 * N(0, 1)`` in the chosen float dtype; labels i.i.d. uniform in
    ``[0, C)`` with 5% set to the ignore label (-1; 255 for uint8). i.i.d. labels
    are the worst case for the label gather.
Cold caches
    Inputs and outputs rotate over several sets, enough for the sets to exceed
    64 MiB (twice this machine's L3) when a set is smaller, so that no call
    starts with its data in cache. Tiny shapes stay cache-resident; say so.
Timing
    ``perf_counter_ns`` around each call, the garbage collector off. Warm-up
    calls first (at least one per input set), then at least ``--min-reps``
    repetitions, and more until ``--budget`` seconds (at most ``MAX_REPS``).
    Tables show the median, the min-max range, and the IQR goes to the JSON.
    Values a call returns are released after the clock stops.
Bytes model (X = logits bytes, L = label bytes), what must cross the memory bus
    softmax (X -> P) 2X; loss forward (X, y -> P, loss) 2X+L; loss backward
    (P, y -> dX) 2X+L; fused (X, y -> loss, dX) 2X+L. GB/s = model bytes / median.
Floor
    ``np.copyto`` of a logits-sized buffer into a preallocated one (2X bytes
    read+written); at k threads the flat buffer is cut into k chunks copied from a
    thread pool (NumPy releases the GIL). An op's floor is that copy time scaled
    to the op's bytes; "x floor" = op median / floor.
Peers, same data, same thread count
    ssm with ``out=`` (no page faults) and ``threads=k``; PyTorch
    (``torch.set_num_threads(k)``; ``softmax``, ``cross_entropy`` forward, its
    backward through ``autograd.grad`` and forward+backward) on ``from_numpy``
    views; NumPy (vectorised, one thread only); scikit-learn
    ``HalfMultinomialLoss.loss_gradient`` (``n_threads=k``) on NHWC data made
    outside the clock, ignored pixels given weight 0. Every loss and gradient is
    checked once against ssm's, outside timing.
Noise
    Each row records the CPU time other processes used while it ran ("other", in
    cores: busy time from /proc/stat minus this process's CPU time, over the wall
    time). Rows with other > ``BUSY_CORES`` are flagged ``!``, rows whose
    (max - min) / median exceeds ``WIDE_SPREAD`` are flagged ``~``.
Traffic (``--device cudasim``)
    No timing: the three workloads, scaled down (N <= 2, spatial dims / 16), in both
    layouts, run on the CUDA simulator (ssm.testing.cudasim) built to count memory
    traffic. Per op: the sector efficiency of the kernel that walks the logits and of
    all of the op's launches (useful bytes / bytes in the 32-byte sectors a GPU would
    move, per warp-wide request), and the sectors' bytes against the op's byte model.
GPU (``--device cuda``)
    The CPU's data (drawn on the host) in CuPy arrays, CUDA events around each call on
    the current stream, rotating sets above twice the device's L2; a device-to-device
    copy of the same bytes is the floor; PyTorch CUDA on the same memory through DLPack
    where installed; the losses and gradients checked as on the CPU.
"""
from __future__ import annotations

from .cli import main, parse_args
from .machine import machine_slug
from .workloads import OPS, WORKLOADS

__all__ = ["OPS", "WORKLOADS", "machine_slug", "main", "parse_args"]
