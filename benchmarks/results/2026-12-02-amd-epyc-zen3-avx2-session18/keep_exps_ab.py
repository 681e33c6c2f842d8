import sys, time, numpy as np
sys.path.insert(0, sys.argv[1])
import ssm
def med(f,k=9):
    ts=[]
    for _ in range(k):
        t=time.perf_counter(); f(); ts.append(time.perf_counter()-t)
    return sorted(ts)[k//2]*1e3
th=int(sys.argv[2])
out=[]
for S,C in [(256,16),(512,16),(1024,16),(1024,64)]:
    x=np.random.default_rng(0).standard_normal((1,S,S,C),dtype=np.float32)
    out.append(med(lambda: ssm.spatial_softmax(x,layout="NHWC",threads=th)))
print(" ".join(f"{v:.2f}" for v in out))
