import sys, time, numpy as np, ssm
op = sys.argv[1]; wl = sys.argv[2] if len(sys.argv) > 2 else "voc"; thr = int(sys.argv[3]) if len(sys.argv) > 3 else 1
shape = {"voc": (8,21,256,256), "vocp": (8,21,256,264), "vocq": (8,21,256,257), "vocr": (8,21,257,256), "adep": (4,150,128,136), "ade1": (1,150,128,128), "voc1": (1,21,256,256), "voc2": (2,21,256,256), "ade1p": (1,150,128,136), "cityp": (2,19,512,1040), "ade": (4,150,128,128), "city": (2,19,512,1024)}[wl]
rng = np.random.default_rng(0)
xs = [(1*rng.standard_normal(shape)).astype(np.float32) for _ in range(1 if wl.endswith(("1","1p")) else 3)]
y = rng.integers(0, shape[1], (shape[0],)+shape[2:]); y[rng.random(y.shape)<0.05] = -1
from ssm import _validation as V; out = [V.empty_like(xs[0]) for _ in range(1 if wl.endswith(("1","1p")) else 3)]
ts=[]
for i in range(int(sys.argv[4]) if len(sys.argv) > 4 else 300):
    t=time.perf_counter()
    if op == "fused": ssm.spatial_softmax_with_loss_and_grad(xs[i%len(xs)], y, out=out[i%len(xs)], threads=thr)
    elif op == "loss": ssm.cross_entropy(xs[i%len(xs)], y, threads=thr)
    elif op == "bwd": ssm.spatial_softmax_with_loss_grad(xs[i%len(xs)], y, out=out[i%len(xs)], threads=thr)
    elif op == "sgrad": ssm.softmax_grad(xs[i%len(xs)], xs[(i+1)%len(xs)], out=out[i%len(xs)], threads=thr)
    elif op == "softmax": ssm.softmax(xs[i%len(xs)], out=out[i%len(xs)], threads=thr)
    ts.append(time.perf_counter()-t)
print(op, wl, thr, "median ms %.3f" % (1e3*np.median(ts)))
