"""The loss and its gradient as training code calls it, VOC-like workload (8x21x256x256,
float32, 5% of the labels ignored): ``loss.backward()`` through ``ssm.torch.cross_entropy``
and ``F.cross_entropy`` (eager and ``torch.compile``d), and ``jit(value_and_grad)`` of
``ssm.jax.cross_entropy`` and of the same loss written with ``jax.nn``; plus ssm's NumPy
call for scale. The cases alternate within each round; medians over the rounds.

    python benchmarks/training_step.py [--threads 2] [--rounds 11] [--no-compile] [--no-jax]

Run from outside the source tree or after an in-place build (it imports the installed ssm).
XLA's CPU thread pool is not limited by --threads: give JAX a machine with that many cores.
"""
import argparse
import importlib.util
import os
import statistics
import time

import numpy as np


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=11)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--no-jax", action="store_true")
    a = p.parse_args()

    import torch
    import torch.nn.functional as F

    import ssm
    import ssm.torch as st
    torch.set_num_threads(a.threads)
    ssm.set_num_threads(a.threads)
    rng = np.random.default_rng(0)
    xn = (2 * rng.standard_normal((8, 21, 256, 256))).astype(np.float32)
    yn = rng.integers(0, 21, (8, 256, 256))
    yn[rng.random(yn.shape) < 0.05] = 255
    x = torch.from_numpy(xn.copy()).requires_grad_()
    y = torch.from_numpy(yn)

    def torch_step(fn):
        def run():
            x.grad = None
            fn(x, y, ignore_index=255).backward()
        return run

    cases = {
        "ssm NumPy spatial_softmax_with_loss_and_grad": lambda: ssm.spatial_softmax_with_loss_and_grad(
            xn, yn, ignore_index=255),
        "ssm.torch.cross_entropy eager": torch_step(st.cross_entropy),
        "F.cross_entropy eager": torch_step(F.cross_entropy),
    }
    if not a.no_compile:
        cases["ssm.torch.cross_entropy compiled"] = torch_step(torch.compile(st.cross_entropy))
        cases["F.cross_entropy compiled"] = torch_step(torch.compile(F.cross_entropy))
    if not a.no_jax and importlib.util.find_spec("jax"):
        import jax
        import jax.numpy as jnp

        import ssm.jax as sj
        xj, yj = jnp.asarray(xn), jnp.asarray(yn)

        def plain(logits, t):
            logp = jax.nn.log_softmax(logits, axis=1)
            keep = t != 255
            picked = jnp.take_along_axis(logp, jnp.where(keep, t, 0)[:, None], axis=1)[:, 0]
            return -jnp.sum(jnp.where(keep, picked, 0.0)) / keep.sum()

        fs = jax.jit(jax.value_and_grad(lambda v, t: sj.cross_entropy(v, t, ignore_index=255)))
        fp = jax.jit(jax.value_and_grad(plain))
        cases["ssm.jax.cross_entropy jit(value_and_grad)"] = lambda: jax.block_until_ready(fs(xj, yj))
        cases["jax.nn loss jit(value_and_grad)"] = lambda: jax.block_until_ready(fp(xj, yj))

    for f in cases.values():  # warm-up: compilation, first touch
        f()
        f()
    times = {k: [] for k in cases}
    for _ in range(a.rounds):
        for k, f in cases.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    print(f"{a.threads} threads, {a.rounds} alternating rounds, load average "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    for k, v in times.items():
        print(f"{k:46s} median {statistics.median(v) * 1e3:8.2f} ms   min {min(v) * 1e3:8.2f} ms")


if __name__ == "__main__":
    main()
