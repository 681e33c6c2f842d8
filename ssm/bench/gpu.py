"""The GPU run (``--device cuda``): CuPy arrays, CUDA events on the current stream, a
device-to-device copy as the floor, PyTorch CUDA on the same memory through DLPack.

CuPy is imported only by ``cuda_modules`` (and ``peers.torch_bridge``); the rest takes
the array module as an argument, so that NumPy can stand in for it in the tests.
"""
from __future__ import annotations

from .peers import check_agreement, ssm_calls, torch_calls
from .report import describe_problem
from .timing import run_plan, time_cuda_with
from .workloads import COPY_OP, make_problem

DEFAULT_L2_BYTES = 50 << 20      # when the device does not report its L2 size


def cuda_modules():
    """(cupy, torch-with-CUDA or None); SystemExit with a clear message without a device."""
    try:
        import cupy
        if cupy.cuda.runtime.getDeviceCount() < 1:
            raise RuntimeError("no CUDA device visible")
    except Exception as e:  # ImportError, CUDARuntimeError, RuntimeError
        raise SystemExit(f"ssm.bench: --device cuda needs CuPy and a CUDA device ({e}). "
                         "Install cupy-cuda12x (pip install 'ssm[cuda12]') on a GPU machine, "
                         "or run with --device cpu.") from None
    try:
        import torch
        torch = torch if torch.cuda.is_available() else None
    except ImportError:
        torch = None
    return cupy, torch


def make_gpu_problem(cupy, ssm, name, shape, args):
    """The CPU problem's data on the GPU, with sets covering twice the device's L2."""
    l2 = cupy.cuda.Device().attributes.get("L2CacheSize", DEFAULT_L2_BYTES)
    return make_problem(name, shape, args.dtype, args.labels, ssm, xp=cupy, rotate_bytes=2 * l2)


def plan_gpu(cupy, ssm, torch, pb, ops, validate):
    """The rows to time (threads None): the copy floor, ssm, torch; as in cpu.plan_cpu.
    Without ``validate``, ssm's loss calls skip the label check's device-to-host read.
    ssm's calls allocate their outputs, as PyTorch's do (each from its library's caching
    pool) and as ssm.torch calls ssm: with a caller's ``out=`` a validating call reads the
    bad-label index before its pass (a bad label never reaches the buffer), without it
    after its launches."""
    plan = [(COPY_OP, "copy", None, lambda: (lambda i: cupy.copyto(pb.out[i], pb.x[i])))]
    calls = ssm_calls(ssm, pb, None, into_out=False,
                      **({} if validate else {"validate": False}))
    plan += [(op, "ssm", None, lambda op=op: calls[op]) for op in ops]
    if torch is not None:
        tcalls = torch_calls(torch, pb, "cuda")
        plan += [(op, "torch", None, lambda op=op: tcalls[op]) for op in ops]
    return plan


def event_timers(cupy, torch):
    """``timer_for(impl)``: torch's own CUDA events for torch rows, CuPy's for the others."""
    def cupy_events():
        return cupy.cuda.Event(), cupy.cuda.Event(), cupy.cuda.get_elapsed_time

    def torch_events():
        start, stop = (torch.cuda.Event(enable_timing=True) for _ in range(2))
        return start, stop, lambda a, b: a.elapsed_time(b)

    timers = {"torch": time_cuda_with(torch_events), "other": time_cuda_with(cupy_events)}
    return lambda impl: timers.get(impl, timers["other"])


def run_gpu(ssm, args, name, shape):
    """(problem, rows, checks, notes, foreign loads: none) of the GPU run."""
    cupy, torch = cuda_modules()
    pb = make_gpu_problem(cupy, ssm, name, shape, args)
    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    notes = [f"GPU: {props['name'].decode()}; CUDA events on the current stream; floor = "
             "device-to-device copy of the same bytes."]
    if torch is None:
        notes.append("PyTorch CUDA skipped: torch with CUDA not importable.")
    try:
        checks = check_agreement(ssm, pb, torch, None, device="cuda")
    except NotImplementedError as e:
        raise SystemExit(f"ssm.bench: this ssm build cannot run on the GPU ({e})") from None
    print(describe_problem(pb, args), flush=True)
    plan = plan_gpu(cupy, ssm, torch, pb, args.ops, not args.no_validate)
    rows = run_plan(plan, pb, args, event_timers(cupy, torch))
    return pb, rows, checks, notes, {}
