# forward (prob + loss, no out=) and cross_entropy: median call time, one process
import sys, time, numpy as np, ssm
rng = np.random.default_rng(0)
res = {}
for name, shape, T in [("voc", (8, 21, 256, 256), 1), ("voc", (8, 21, 256, 256), 2), ("tiny", (1, 21, 4, 4), 1), ("small", (1, 21, 32, 64), 1)]:
    x = rng.standard_normal(shape).astype(np.float32)
    y = rng.integers(0, 21, (shape[0],) + shape[2:]).astype(np.int64)
    y[:, :2] = -1
    reps = 15 if name == "voc" else 2000
    for op, f in [("forward", lambda: ssm.spatial_softmax_with_loss(x, y, threads=T)),
                  ("fused_sum", lambda: ssm.spatial_softmax_with_loss_and_grad(x, y, reduction="sum", threads=T))]:
        f()
        ts = []
        for r in range(5):
            t0 = time.perf_counter()
            for _ in range(reps): f()
            ts.append((time.perf_counter() - t0) / reps)
        print(f"{name} T={T} {op} {np.median(ts)*1e6:.1f}")
