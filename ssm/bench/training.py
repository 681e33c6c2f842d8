"""``ssm-bench --training-step``: the loss and its gradient as training code calls them.

PyTorch users write ``loss = F.cross_entropy(logits, target); loss.backward()``; JAX users
``jax.jit(jax.value_and_grad(loss_fn))``. This mode times exactly that, per thread count:

- ``ssm.torch.cross_entropy`` then ``.backward()``, eager and ``torch.compile``d;
- ``F.cross_entropy`` then ``.backward()``, eager and ``torch.compile``d;
- ``jit(value_and_grad)`` of ``ssm.jax.cross_entropy`` and of the same loss written with
  ``jax.nn.log_softmax`` (optax's ``softmax_cross_entropy_with_integer_labels`` is the same
  computation; masking the ignored label needs the explicit form);
- ssm's NumPy call with ``out=`` (no allocation), for scale.

The logits are a leaf tensor that requires grad (``.grad`` set to None before each step,
as ``optimizer.zero_grad()`` does). The NumPy and PyTorch cases alternate within each
round (a slow moment of a shared machine hits all of them); medians. Each JAX case runs in
a child process of its own, the two children alternating over ``JAX_ROUNDS`` rounds: in
one process XLA's CPU runtime slows whatever runs after a jitted step (measured on the
2-core EPYC: ssm.jax 11-13 ms alone, 23-27 ms alternating with the jax.nn step; ssm's
NumPy call 4.8 ms alone, 7.8-10 ms right after it), which a training loop that calls one
of them never sees. The minor page faults of each step (the
process's, median) show what fresh memory a case pays for: XLA allocates every output
afresh, PyTorch's CPU allocator returns large blocks to the system. PyTorch's and ssm's
threads are set to the row's count; XLA's CPU thread pool cannot be limited after
start-up (the JAX rows say how many cores it may use).
"""
from __future__ import annotations

import importlib.util
import os
import json
import resource
import subprocess
import sys
import time

import numpy as np

IGNORE = 255
MIN_ROUNDS = 7

TORCH_CASES = ("ssm.torch eager", "F.cross_entropy eager", "ssm.torch compiled",
               "F.cross_entropy compiled")
JAX_CASES = ("ssm.jax jit(value_and_grad)", "jax.nn jit(value_and_grad)")
RAW_CASE = "ssm NumPy, out="
JAX_ROUNDS = 2


def _inputs(shape, seed=20261130):
    rng = np.random.default_rng(seed)
    x = (2 * rng.standard_normal(shape)).astype(np.float32)
    y = rng.integers(0, shape[1], (shape[0],) + tuple(shape[2:]))
    y[rng.random(y.shape) < 0.05] = IGNORE
    return x, y


def _torch_cases(xn, yn, compile_too):
    import torch
    import torch.nn.functional as F

    import ssm.torch as st
    y = torch.from_numpy(yn)

    def step(fn):
        # each case its own leaf, as each training loop has its own parameters: setting
        # .grad to None frees the case's own last gradient (with a shared leaf a case
        # would free, and pay for unmapping, the previous case's)
        x = torch.from_numpy(xn.copy()).requires_grad_()

        def run():
            x.grad = None
            fn(x, y, ignore_index=IGNORE).backward()
        return run

    cases = {"ssm.torch eager": step(st.cross_entropy),
             "F.cross_entropy eager": step(F.cross_entropy)}
    if compile_too:
        cases["ssm.torch compiled"] = step(torch.compile(st.cross_entropy))
        cases["F.cross_entropy compiled"] = step(torch.compile(F.cross_entropy))
    return cases


def _jax_cases(xn, yn):
    import jax
    import jax.numpy as jnp

    import ssm.jax as sj
    x, y = jnp.asarray(xn), jnp.asarray(yn)

    def plain(logits, t):
        logp = jax.nn.log_softmax(logits, axis=1)
        keep = t != IGNORE
        picked = jnp.take_along_axis(logp, jnp.where(keep, t, 0)[:, None], axis=1)[:, 0]
        return -jnp.sum(jnp.where(keep, picked, 0.0)) / keep.sum()

    fs = jax.jit(jax.value_and_grad(lambda v, t: sj.cross_entropy(v, t, ignore_index=IGNORE)))
    fp = jax.jit(jax.value_and_grad(plain))
    return {JAX_CASES[0]: lambda: jax.block_until_ready(fs(x, y)),
            JAX_CASES[1]: lambda: jax.block_until_ready(fp(x, y))}


def _jax_child():
    """A child process's part of the JAX rows: one case, its seconds and faults per step as
    JSON on stdout (arguments: a JSON list [case, shape, threads, budget, min_rounds])."""
    case, shape, threads, budget, min_rounds = json.loads(sys.argv[1])
    import ssm
    ssm.set_num_threads(threads)
    xn, yn = _inputs(tuple(shape))
    faults = {}
    times = time_rounds({case: _jax_cases(xn, yn)[case]}, budget, faults=faults,
                        min_rounds=min_rounds)
    print(json.dumps({"times": times[case], "faults": faults[case]}))


def _jax_rounds(shape, threads, budget, progress):
    """Seconds and faults per step of each JAX case, each in a child process per round."""
    times = {c: [] for c in JAX_CASES}
    faults = {c: [] for c in JAX_CASES}
    code = "from ssm.bench.training import _jax_child; _jax_child()"
    # the child imports the ssm this process runs: its parent folder first on the path,
    # and run from there (from a source checkout's root, `python -c` would find the
    # uncompiled ssm/ folder of the current directory first)
    import ssm
    root = os.path.dirname(os.path.dirname(os.path.abspath(ssm.__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    for _ in range(JAX_ROUNDS):
        for case in JAX_CASES:
            arg = json.dumps([case, list(shape), threads, budget / (JAX_ROUNDS * len(JAX_CASES)),
                              max(1, -(-MIN_ROUNDS // JAX_ROUNDS))])
            done = subprocess.run([sys.executable, "-c", code, arg], capture_output=True,
                                  text=True, cwd=root, env=env)
            if done.returncode != 0:
                raise RuntimeError(f"the JAX case {case!r} failed in its child process:\n"
                                   f"{done.stderr[-2000:]}")
            got = json.loads(done.stdout.strip().splitlines()[-1])
            times[case] += got["times"]
            faults[case] += got["faults"]
            progress()
    return times, faults


def available(name):
    return importlib.util.find_spec(name) is not None


def _minor_faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def time_rounds(cases, budget, progress=lambda: None, faults=None, min_rounds=None):
    """Seconds per call of every case, in alternating rounds: at least ``min_rounds``
    (default MIN_ROUNDS), then until ``budget`` seconds have passed. ``faults``, a dict,
    receives each case's minor page faults per call."""
    for f in cases.values():  # warm-up: compilation, first touch, thread start
        f()
        f()
    times = {k: [] for k in cases}
    if faults is not None:
        faults.update({k: [] for k in cases})
    end = time.perf_counter() + budget
    least = MIN_ROUNDS if min_rounds is None else min_rounds
    while min(len(v) for v in times.values()) < least or time.perf_counter() < end:
        for k, f in cases.items():
            f0 = _minor_faults()
            t0 = time.perf_counter_ns()
            f()
            times[k].append((time.perf_counter_ns() - t0) * 1e-9)
            if faults is not None:
                faults[k].append(_minor_faults() - f0)
        progress()
    return times


def run_training(ssm, shape, thread_counts, budget, *, use_torch=True, use_jax=True,
                 compile_too=True, quiet=False):
    """Time every case at every thread count; returns rows (dicts) and printable lines."""
    xn, yn = _inputs(shape)
    out = np.empty_like(xn)
    use_torch = use_torch and available("torch")
    use_jax = use_jax and available("jax")
    rows = []
    cases = {RAW_CASE: lambda: ssm.spatial_softmax_with_loss_and_grad(
        xn, yn, ignore_index=IGNORE, out=out)}
    if use_torch:
        import torch
        cases.update(_torch_cases(xn, yn, compile_too))
    saved = (ssm._threads._default, torch.get_num_threads() if use_torch else None)

    def progress():
        if not quiet:
            print(".", end="", file=sys.stderr, flush=True)

    try:
        for threads in thread_counts:
            if not quiet:
                print(f"ssm.bench --training-step: {threads} thread(s)", end="",
                      file=sys.stderr, flush=True)
            ssm.set_num_threads(threads)
            if use_torch:
                torch.set_num_threads(threads)
            faults = {}
            times = time_rounds(cases, budget, progress, faults)
            if use_jax:
                jax_times, jax_faults = _jax_rounds(shape, threads, budget, progress)
                times.update(jax_times)
                faults.update(jax_faults)
            if not quiet:
                print(file=sys.stderr)
            for name, v in times.items():
                rows.append({"case": name, "threads": threads, "rounds": len(v),
                             "median_s": float(np.median(v)), "min_s": float(np.min(v)),
                             "max_s": float(np.max(v)),
                             "minor_faults": int(np.median(faults[name]))})
    finally:  # the process's thread settings as they were
        ssm._threads._default = saved[0]
        if use_torch:
            torch.set_num_threads(saved[1])
    return rows, format_lines(rows, shape, use_torch, use_jax)


def _ratio(rows, threads, slow, fast):
    by = {r["case"]: r["median_s"] for r in rows if r["threads"] == threads}
    if slow in by and fast in by:
        return by[slow] / by[fast]
    return None


def format_lines(rows, shape, use_torch=True, use_jax=True):
    """The table and, per thread count, the speed-ups of ssm's adaptors over their peers."""
    lines = [f"Training step: loss + gradient as training code calls it, logits "
             f"{'x'.join(map(str, shape))} float32 NCHW (a leaf that requires grad), int64 "
             f"labels with 5% ignored ({IGNORE}); medians of alternating rounds (each JAX case "
             f"in child processes of its own).",
             f"{'case':<30} {'thr':>3} {'median ms':>10} {'min-max ms':>17} {'rounds':>6} "
             f"{'faults':>7}"]
    for r in rows:
        faults = r.get("minor_faults")
        lines.append(f"{r['case']:<30} {r['threads']:>3} {r['median_s'] * 1e3:>10.2f} "
                     f"{r['min_s'] * 1e3:>8.2f}-{r['max_s'] * 1e3:<8.2f} {r['rounds']:>6} "
                     f"{'-' if faults is None else faults:>7}")
    pairs = [("F.cross_entropy eager", "ssm.torch eager", "ssm.torch vs F.cross_entropy eager"),
             ("F.cross_entropy compiled", "ssm.torch eager",
              "ssm.torch vs F.cross_entropy compiled"),
             ("jax.nn jit(value_and_grad)", "ssm.jax jit(value_and_grad)",
              "ssm.jax vs jax.nn, both jit(value_and_grad)"),
             ("ssm.torch eager", RAW_CASE, "ssm.torch's cost over the NumPy call")]
    for threads in sorted({r["threads"] for r in rows}):
        parts = []
        for slow, fast, label in pairs:
            ratio = _ratio(rows, threads, slow, fast)
            if ratio is not None:
                parts.append(f"{label}: {ratio:.2f}x")
        if parts:
            lines.append(f"{threads} thread(s): " + "; ".join(parts))
    if not use_torch:
        lines.append("PyTorch is not installed: no PyTorch rows (pip install 'ssm[torch]').")
    if not use_jax:
        lines.append("JAX is not installed: no JAX rows (pip install 'ssm[jax]').")
    else:
        lines.append(f"The JAX rows use XLA's own CPU thread pool (up to {os.cpu_count()} "
                     f"cores), whatever the row's thread count.")
    return lines


def build_training_report(argv, shape, rows, wall):
    from .report import now_iso
    return {"tool": "ssm.bench --training-step", "date": now_iso(), "argv": argv,
            "shape": list(shape), "rows": rows, "wall_s": wall}
