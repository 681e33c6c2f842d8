"""The command line: ``ssm-bench`` options, and ``main`` for the sweep and for ``--busy``."""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from . import busy, training
from .cpu import run_cpu
from .gpu import run_gpu
from .machine import default_threads, usable_cores
from .plots import plot, plot_busy
from .report import (build_busy_report, build_report, derive, describe_problem,
                     format_tables, summary_lines, write_json)
from .timing import BUSY_CORES, DEFAULT_BUDGET_S, DEFAULT_MIN_REPS
from .workloads import DEFAULT_WORKLOAD, OPS, WORKLOADS


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="ssm-bench",
        description="Thread-scaling benchmark of ssm (softmax, loss forward, loss backward, "
                    "fused loss+grad) against a copy of the same bytes and against PyTorch, "
                    "NumPy and scikit-learn, all in one run.",
        epilog="Workloads: " + "; ".join(f"{k}: {v[0]} {'x'.join(map(str, v[1]))}"
                                         for k, v in WORKLOADS.items()))
    p.add_argument("--workload", choices=sorted(WORKLOADS), default=None,
                   help=f"a standard workload (default: {DEFAULT_WORKLOAD} unless --shape)")
    p.add_argument("--shape", type=int, nargs="+", metavar="DIM",
                   help="logits shape N C [spatial...], e.g. --shape 8 21 256 256")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                   help="logits dtype (default float32)")
    p.add_argument("--labels", choices=("int64", "int32", "uint8"), default="int64",
                   help="label dtype (default int64; uint8 ignores label 255)")
    p.add_argument("--threads", type=_thread_list, default=None,
                   help="comma-separated thread counts (default: 1, 2, 4, ... up to the "
                        f"usable cores, here {','.join(map(str, default_threads()))})")
    p.add_argument("--ops", type=_op_list, default=tuple(OPS),
                   help=f"comma-separated subset of {','.join(OPS)} (default: all)")
    p.add_argument("--device", choices=("cpu", "cuda", "cudasim"), default="cpu",
                   help="cpu (NumPy arrays), cuda (CuPy arrays, CUDA events) or cudasim "
                        "(the memory-traffic table of the CUDA kernels, simulated)")
    p.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S,
                   help=f"seconds of timed calls per row (default {DEFAULT_BUDGET_S})")
    p.add_argument("--min-reps", type=int, default=DEFAULT_MIN_REPS,
                   help=f"at least this many timed calls per row (default {DEFAULT_MIN_REPS})")
    p.add_argument("--max-wait", type=float, default=0.0, metavar="SECONDS",
                   help="before each row, wait (up to SECONDS over the whole run) until "
                        f"other processes use < {BUSY_CORES} cores (default 0: no wait)")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch rows")
    p.add_argument("--no-sklearn", action="store_true", help="skip the scikit-learn rows")
    p.add_argument("--no-validate", action="store_true",
                   help="GPU only: call ssm with validate=False (no device-to-host read)")
    p.add_argument("--json", metavar="FILE", help="write every figure, the machine and the "
                                                  "library versions to FILE")
    p.add_argument("--plot", metavar="FILE.png", help="thread scaling and ssm vs peers "
                                                      "(needs matplotlib)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.add_argument("--training-step", action="store_true",
                   help="instead: loss + backward as training code calls it, ssm.torch vs "
                        "F.cross_entropy (eager and torch.compile) and ssm.jax vs jax.nn "
                        "(jit(value_and_grad)), at each --threads count, on the workload "
                        "(--budget seconds per count; --json applies)")
    p.add_argument("--no-compile", action="store_true",
                   help="--training-step: skip the torch.compile rows")
    p.add_argument("--no-jax", action="store_true", help="--training-step: skip the JAX rows")
    p.add_argument("--busy", action="store_true",
                   help="instead: the fused pass with default threads vs threads=1 on four "
                        "sizes (or --shape), quiet and beside one spinning process per core "
                        "(--budget seconds per size and phase; --json and --plot apply; "
                        "--threads does not)")
    p.add_argument("--dask", action="store_true",
                   help="instead: the fused pass through ssm.dask (chunks of one image; "
                        "threaded scheduler and LocalClusters) against one call, on "
                        "--dask-scale times the workload's batch, at the largest --threads "
                        "count (default 2)")
    p.add_argument("--dask-scale", type=int, default=None, metavar="K",
                   help="--dask: K times the workload's batch (default 4)")
    p.add_argument("--dask-chunk", type=int, default=None, metavar="K",
                   help="--dask: K images per chunk (default 1)")
    p.add_argument("--positions", action="store_true",
                   help="instead: soft-argmax forward and forward+backward (ssm.soft_argmax, "
                        "ssm.soft_argmax_grad) against the copy floor and kornia, on two "
                        "keypoint workloads (or --shape), calls interleaved, medians "
                        "(--threads, --json, --no-torch apply)")
    args = p.parse_args(argv)
    modes = [f"--{m.replace('_', '-')}" for m in ("busy", "training_step", "dask", "positions")
             if getattr(args, m)]
    if len(modes) > 1:
        p.error(f"give one of {', '.join(modes)}, not several")
    for flag, given, mode in (("--dask-scale", args.dask_scale is not None, args.dask),
                              ("--dask-chunk", args.dask_chunk is not None, args.dask),
                              ("--no-compile", args.no_compile, args.training_step),
                              ("--no-jax", args.no_jax, args.training_step)):
        if given and not mode:
            owner = "--dask" if flag.startswith("--dask") else "--training-step"
            p.error(f"{flag} applies to {owner} only")
    if args.busy and args.threads is not None:
        p.error("--threads does not apply to --busy (it compares the default threads with "
                "threads=1)")
    for flag, value in (("--dask-scale", args.dask_scale), ("--dask-chunk", args.dask_chunk)):
        if value is not None and value < 1:
            p.error(f"{flag}: {value}; expected an integer >= 1")
    args.dask_scale = 4 if args.dask_scale is None else args.dask_scale
    args.dask_chunk = 1 if args.dask_chunk is None else args.dask_chunk
    if args.device == "cudasim":
        given = [f for f, v in (("--shape", args.shape), ("--workload", args.workload),
                                ("--json", args.json), ("--plot", args.plot),
                                ("--ops", args.ops != tuple(OPS)),
                                ("--labels", args.labels != "int64"), *((m, 1) for m in modes))
                 if v]
        if given:
            p.error(f"--device cudasim prints the simulated GPU's launches and traffic for the "
                    f"three standard workloads (--dtype applies); it does not take "
                    f"{', '.join(given)}")
    if args.threads is not None:
        from .. import _threads
        for t in args.threads:
            try:
                _threads.resolve(t)
            except ValueError as exc:
                p.error(f"--threads: {exc}")
    if args.positions and args.shape is not None and len(args.shape) < 3:
        p.error("--positions --shape: expected N C H [W ...] (maps of at least one spatial "
                "axis)")
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        if path:  # before the run, not after it
            folder = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
                p.error(f"{flag}: {folder} is not a folder this process can write to")
    if args.plot and os.path.splitext(args.plot)[1].lower() not in (".png", ".pdf", ".svg"):
        p.error(f"--plot: {args.plot!r}; expected a .png, .pdf or .svg file name")
    if args.dask and args.threads is None:
        args.threads = [2]
    if args.shape is not None and args.workload is not None:
        p.error("give --workload or --shape, not both")
    if args.shape is not None and (len(args.shape) < 2 or min(args.shape) < 1):
        p.error("--shape: expected N C [spatial...] with every extent >= 1")
    if args.budget < 0 or args.min_reps < 1 or args.max_wait < 0:
        p.error("--budget and --max-wait must be >= 0 and --min-reps >= 1")
    if args.threads is None:
        args.threads = default_threads()
    return args


def _thread_list(text):
    try:
        ts = sorted({int(t) for t in text.split(",") if t.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list like 1,2,4") from None
    if not ts or ts[0] < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: thread counts must be >= 1")
    return ts


def _op_list(text):
    ops = tuple(o.strip() for o in text.split(",") if o.strip())
    bad = [o for o in ops if o not in OPS]
    if bad or not ops:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a subset of {','.join(OPS)}")
    return tuple(op for op in OPS if op in ops)


def workload_of(args):
    if args.shape is not None:
        return "", tuple(args.shape)
    name, shape = WORKLOADS[args.workload or DEFAULT_WORKLOAD]
    return name, shape


def main_busy(ssm, args, argv):
    t0 = time.perf_counter()
    shapes = busy.SHAPES if args.shape is None else (tuple(args.shape),)
    rows, lines = busy.run_busy(ssm, usable_cores(), args.budget, shapes, args.quiet)
    for line in lines:
        print(line)
    wall = time.perf_counter() - t0
    print(f"Wall time {wall:.1f} s.")
    if args.json:
        write_json(args.json, build_busy_report(sys.argv[1:] if argv is None else list(argv),
                                                rows, wall))
    if args.plot:
        plot_busy(args.plot, rows, lines[0][:110])
    return 0


def main_training(ssm, args, argv):
    t0 = time.perf_counter()
    _, shape = workload_of(args)
    rows, lines = training.run_training(ssm, shape, args.threads, args.budget,
                                        use_torch=not args.no_torch, use_jax=not args.no_jax,
                                        compile_too=not args.no_compile, quiet=args.quiet)
    for line in lines:
        print(line)
    wall = time.perf_counter() - t0
    print(f"Wall time {wall:.1f} s.")
    if args.json:
        write_json(args.json, training.build_training_report(
            sys.argv[1:] if argv is None else list(argv), shape, rows, wall))
    return 0


def main(argv=None):
    """``ssm-bench``: parse ``argv`` (default ``sys.argv[1:]``), run, print; returns 0."""
    args = parse_args(argv)
    import ssm
    if args.device == "cudasim":
        from .traffic import traffic_lines
        for line in traffic_lines(ssm, np.dtype(args.dtype)):
            print(line)
        return 0
    if args.busy:
        return main_busy(ssm, args, argv)
    if args.training_step:
        return main_training(ssm, args, argv)
    if args.dask:
        from .dask_bench import run_dask
        t0 = time.perf_counter()
        name, shape = workload_of(args)
        for line in run_dask(ssm, args, name, shape, max(args.threads)):
            print(line)
        print(f"Wall time {time.perf_counter() - t0:.1f} s.")
        return 0
    if args.positions:
        from .positions import main_positions
        return main_positions(ssm, args)
    t0 = time.perf_counter()
    name, shape = workload_of(args)
    runner = run_gpu if args.device == "cuda" else run_cpu
    pb, rows, checks, notes, loads = runner(ssm, args, name, shape)
    derived = derive(rows)
    for line in format_tables(derived, pb, args.device) + summary_lines(derived, checks, notes,
                                                                         loads):
        print(line)
    wall = time.perf_counter() - t0
    print(f"Wall time {wall:.1f} s.")
    title = describe_problem(pb, args).removeprefix("ssm.bench: ")
    if args.json:
        argv = sys.argv[1:] if argv is None else list(argv)
        write_json(args.json, build_report(args, argv, pb, derived, checks, notes, loads, wall))
    if args.plot:
        plot(args.plot, derived, title)
    return 0
