"""Where a training step's milliseconds go: ssm.torch and ssm.jax against their parts.

The workload of ``ssm-bench --training-step`` (float32 logits 2x21x512x512, int64 labels,
5% ignored as 255). Every case runs once per round, rounds alternate the cases (a slow
moment of a shared machine hits all of them), medians and minima per case:

- the kernel pass alone (``_cpu.run`` on a prepared problem, ``out=`` reused), with the
  default threads (adaptive) and with ``threads`` fixed;
- the label pre-pass alone (the "mean" divisor and the label check, ``_cpu.stats``);
- ``ssm.spatial_softmax_with_loss_and_grad`` with ``out=`` (the NumPy API: validation,
  pre-pass, kernel), and into a fresh block advised huge pages (as ssm.jax writes XLA's);
- an ssm.torch step (``.grad = None``, loss, ``.backward()``), its forward and backward
  timed apart, and its minor page faults;
- an ssm.jax ``jit(value_and_grad)`` step and its minor page faults.

    python benchmarks/training_breakdown.py --threads 2 --rounds 30

Run from the source tree with PYTHONPATH set to it (or with ssm installed).
"""
import argparse
import mmap
import resource
import time

import numpy as np


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--no-jax", action="store_true")
    args = ap.parse_args()

    import torch

    import ssm
    import ssm.torch as st
    from ssm import _api, _cpu, _pages
    from ssm._codes import Op
    from ssm.bench.training import IGNORE, _inputs

    ssm.set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    xn, yn = _inputs((2, 21, 512, 512))
    out = np.empty_like(xn)
    call = _api._loss_call(_cpu, xn, "logits", yn, None, ignore_index=IGNORE,
                           class_weights=None, lens=None, label_smoothing=0.0,
                           reduction="mean", layout="NCHW", validate=True, threads=None)
    problem = call.problem.finish(out, d_loss=1.0, divisor=_api._divisor(call))
    fixed = (args.threads, False)

    x = torch.from_numpy(xn.copy()).requires_grad_()
    y = torch.from_numpy(yn)
    parts = {"ssm.torch forward": [], "ssm.torch backward": []}

    def torch_step():
        x.grad = None
        t0 = time.perf_counter()
        loss = st.cross_entropy(x, y, ignore_index=IGNORE)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        parts["ssm.torch forward"].append(t1 - t0)
        parts["ssm.torch backward"].append(t2 - t1)

    def fresh_advised():
        block = mmap.mmap(-1, xn.nbytes + mmap.PAGESIZE, flags=mmap.MAP_PRIVATE)
        g = np.frombuffer(block, np.uint8)[:xn.nbytes].view(np.float32).reshape(xn.shape)
        _pages.advise_huge(g)
        ssm.spatial_softmax_with_loss_and_grad(xn, yn, ignore_index=IGNORE, out=g)
        del g
        block.close()

    cases = {
        "kernel, default threads": lambda: _cpu.run(Op.SSWL_FWD_BWD, problem, call.threads),
        f"kernel, threads={args.threads}": lambda: _cpu.run(Op.SSWL_FWD_BWD, problem, fixed),
        "label pre-pass": lambda: _cpu.stats(call.problem, call.threads),
        "NumPy API, out=": lambda: ssm.spatial_softmax_with_loss_and_grad(
            xn, yn, ignore_index=IGNORE, out=out),
        "NumPy API, fresh huge-page block": fresh_advised,
        "ssm.torch step": torch_step,
    }
    if not args.no_jax:
        import jax
        import jax.numpy as jnp

        import ssm.jax as sj
        xj, yj = jnp.asarray(xn), jnp.asarray(yn)
        fs = jax.jit(jax.value_and_grad(lambda v, t: sj.cross_entropy(v, t, ignore_index=IGNORE)))
        cases["ssm.jax step"] = lambda: jax.block_until_ready(fs(xj, yj))

    for f in cases.values():
        f()
        f()
    for v in parts.values():
        v.clear()
    times = {k: [] for k in cases}
    faults = {k: [] for k in cases}
    for _ in range(args.rounds):
        for k, f in cases.items():
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
            faults[k].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    times.update(parts)
    print(f"threads={args.threads}, {args.rounds} alternating rounds; ms")
    print(f"{'case':<34} {'median':>7} {'min':>7} {'minor faults':>13}")
    for k, v in times.items():
        fl = f"{int(np.median(faults[k])):>13}" if k in faults else ""
        print(f"{k:<34} {np.median(v) * 1e3:7.2f} {np.min(v) * 1e3:7.2f} {fl}")


if __name__ == "__main__":
    main()
