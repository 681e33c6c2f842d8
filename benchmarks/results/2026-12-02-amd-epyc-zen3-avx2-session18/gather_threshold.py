import sys, time, numpy as np, ssm
from ssm import _cpu
def med(f, k=9):
    ts=[]
    for _ in range(k):
        t=time.perf_counter(); f(); ts.append(time.perf_counter()-t)
    return sorted(ts)[k//2]*1e3
th=int(sys.argv[1])
for N,S,C in [(8,32,16),(4,64,16),(2,96,16),(2,128,16),(1,128,64),(1,180,16),(2,256,4),(1,256,16)]:
    rng=np.random.default_rng(0)
    b=rng.standard_normal((N,S,S,C),dtype=np.float32)
    dk=rng.standard_normal((N,C,2),dtype=np.float32)
    res={}
    for rnd in range(2):
      for g in (1<<62, 0):
        _cpu.POS_GATHER_BYTES=g
        r=(med(lambda: ssm.spatial_softmax(b,layout="NHWC",threads=th)), med(lambda: ssm.soft_argmax(b,layout="NHWC",threads=th)), med(lambda: ssm.soft_argmax_grad(b,dk,layout="NHWC",threads=th)))
        res.setdefault(g,[]).append(r)
    a=np.min(res[1<<62],axis=0); c=np.min(res[0],axis=0)
    print(f"{N}x{S}x{S}x{C} th={th} gathered-block {16*S*S*4/1024:.0f}KiB  chunked/gathered: softmax {c[0]/a[0]:.2f} argmax {c[1]/a[1]:.2f} argmax_grad {c[2]/a[2]:.2f}  (gathered ms {a[0]:.2f} {a[1]:.2f} {a[2]:.2f})", flush=True)
