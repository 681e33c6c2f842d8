import numpy as np, ssm, time
from ssm import _cpu
rng = np.random.default_rng(0)
def timeit(f, reps):
    f(); ts = []
    for _ in range(reps):
        t0 = time.perf_counter(); f(); ts.append(time.perf_counter() - t0)
    return np.median(ts)
for shape in [(1,1,2048,2048), (1,1,1024,1024), (1,1,512,512), (1,1,256,256), (2,4,512,512), (1,2,1024,1024)]:
    x = rng.standard_normal(shape).astype(np.float32)
    p = ssm.spatial_softmax(x); dp = rng.standard_normal(shape).astype(np.float32)
    for T in (1, 2):
        dk = rng.standard_normal(shape[:2] + (2,)).astype(np.float32)
        for name, f in [("softmax", lambda: ssm.spatial_softmax(x, threads=T)),
                        ("grad", lambda: ssm.spatial_softmax_grad(p, dp, threads=T)),
                        ("kp+prob", lambda: ssm.soft_argmax(x, return_prob=True, threads=T)),
                        ("kp grad", lambda: ssm.soft_argmax_grad(x, dk, threads=T))]:
            r = {}
            for rnd in range(3):
                for mode, v in (("scratch", 1 << 62), ("inplace", 0)):
                    _cpu.POS_IN_PLACE_ROW_BYTES = v
                    r.setdefault(mode, []).append(timeit(f, 9 if shape[-1] >= 1024 else 31))
            a, b = np.median(r["scratch"]), np.median(r["inplace"])
            print(f"{str(shape):18s} T={T} {name:8s} scratch {a*1e3:7.3f} ms  in place {b*1e3:7.3f} ms  ratio {b/a:.3f}", flush=True)
