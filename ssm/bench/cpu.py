"""The CPU run: NumPy arrays, the plan of rows per thread count, ``perf_counter_ns``."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from .peers import (SklearnFused, check_agreement, copy_call, import_peers, numpy_calls,
                    read_call, ssm_calls, stream_call, torch_calls)
from .report import describe_problem
from .timing import BUSY_CORES, LoadMeter, QuietWait, probe_load, run_plan, time_cpu
from .workloads import COPY_OP, READ_OP, make_problem


def _once(make):
    """A memoised ``make()``."""
    cache = []

    def get():
        if not cache:
            cache.append(make())
        return cache[0]
    return get


def torch_row(torch, calls, threads, op):
    torch.set_num_threads(threads)
    return calls()[op]


def plan_cpu(ssm, pb, threads_list, ops, torch, sk, pool):
    """The rows to time, in order: per thread count the floors (np.copyto, the streaming
    copy, the read), ssm, torch, sklearn; NumPy at 1.

    Each row is (op, impl, threads, make), ``make()`` returning the ``fn(i)`` to time.
    """
    plan = []
    tcalls = _once(lambda: torch_calls(torch, pb))
    for k in threads_list:
        plan.append((COPY_OP, "copy", k, lambda k=k: copy_call(pb, k, pool)))
        plan.append((COPY_OP, "stream", k, lambda k=k: stream_call(pb, k)))
        plan.append((READ_OP, "read", k, lambda k=k: read_call(pb, k)))
        plan += [(op, "ssm", k, lambda op=op, k=k: ssm_calls(ssm, pb, k)[op]) for op in ops]
        if torch is not None:
            plan += [(op, "torch", k, lambda op=op, k=k: torch_row(torch, tcalls, k, op))
                     for op in ops]
        if sk is not None and "fused" in ops:
            plan.append(("fused", "sklearn", k, lambda k=k: sk.call(k)))
        if k == threads_list[0]:         # NumPy does not thread: one row per op, at 1
            plan += [(op, "numpy", 1, lambda op=op: numpy_calls(pb)[op]) for op in ops]
    return plan


def run_cpu(ssm, args, name, shape):
    """(problem, rows, checks, notes, foreign loads) of the CPU sweep."""
    pb = make_problem(name, shape, args.dtype, args.labels, ssm)
    torch, loss_cls, notes = import_peers(not args.no_torch, not args.no_sklearn)
    sk = SklearnFused(loss_cls, pb) if loss_cls is not None and "fused" in args.ops else None
    if sk is not None:
        notes.append("sklearn: HalfMultinomialLoss.loss_gradient on NHWC rows transposed off "
                     "the clock (an NCHW user also pays two transposes); fused only.")
    notes.append("numpy: vectorised reference, one thread only (NumPy ufuncs do not thread).")
    if torch is not None:
        notes.append("torch: softmax, cross_entropy forward, backward via autograd.grad, "
                     "forward+backward; outputs are fresh tensors (torch has no out=), "
                     "freed off the clock.")
    checks = check_agreement(ssm, pb, torch, sk)
    loads = {"before": probe_load()}
    print(describe_problem(pb, args), flush=True)
    wait = QuietWait(args.max_wait)
    meter = LoadMeter()
    with ThreadPoolExecutor(max(args.threads)) as pool:
        plan = plan_cpu(ssm, pb, args.threads, args.ops, torch, sk, pool)
        rows = run_plan(plan, pb, args, lambda impl: time_cpu, wait)
    loads["during"] = meter.stop()
    if args.max_wait > 0:
        notes.append(f"Waited {wait.waited:.1f} s (of --max-wait {args.max_wait:g}) for "
                     f"other processes to drop below {BUSY_CORES} cores before rows.")
    return pb, rows, checks, notes, loads
