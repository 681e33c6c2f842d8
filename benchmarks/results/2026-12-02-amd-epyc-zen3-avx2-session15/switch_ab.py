import sys, time, numpy as np
sys.path.insert(0, ".")  # run from the repository root
import ssm
from ssm import _cpu
rng = np.random.default_rng(0)
x = (rng.standard_normal((2, 21, 37, 41)) * 30).astype(np.float32); x.flat[::7] -= 95
p = ssm.softmax(x); print('denormal probs:', np.count_nonzero((p > 0) & (p < 1.18e-38)))
thr = int(sys.argv[1])
shape = (8, 21, 256, 256) if len(sys.argv) < 3 else tuple(int(v) for v in sys.argv[2].split('x'))
N, C = shape[:2]
xs = [rng.standard_normal(shape, dtype=np.float32) for _ in range(2)]
y = rng.integers(0, C, (N,) + shape[2:]).astype(np.int64)
g = np.empty_like(xs[0])
res = {}
for rnd in range(9):
    for on in (True, False):
        _cpu.exp_sweep_v3(on)
        for op in ('loss', 'fused', 'softmax'):
            ts = []
            for r in range(6):
                xx = xs[r % 2]
                t = time.perf_counter()
                if op == 'loss': ssm.cross_entropy(xx, y, threads=thr)
                elif op == 'fused': ssm.spatial_softmax_with_loss_and_grad(xx, y, threads=thr, out=g)
                else: ssm.softmax(xx, threads=thr, out=g)
                ts.append(time.perf_counter() - t)
            res.setdefault((op, on), []).append(np.median(ts[1:]))
for op in ('loss', 'fused', 'softmax'):
    a, b = np.median(res[(op, True)]), np.median(res[(op, False)])
    print(f'{op:8s} v3 {a*1e3:.3f} ms  gcc {b*1e3:.3f} ms  ratio {a/b:.3f}')
