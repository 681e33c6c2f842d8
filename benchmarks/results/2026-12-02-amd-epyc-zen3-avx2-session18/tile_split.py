import time, numpy as np, ssm
from ssm import _cpu
orig=_cpu._pos_chunked_tile
def finer(outer, inner, threads):
    t = inner if inner < 64 else 64
    while t > 1 and outer * ((inner + t - 1) // t) < threads:
        t = (t + 1) // 2 if t <= 8 else (t // 2 + 7) // 8 * 8
    return t
def med(f,k=7):
    ts=[]
    for _ in range(k):
        t=time.perf_counter(); f(); ts.append(time.perf_counter()-t)
    return sorted(ts)[k//2]*1e3
for S,C in [(2048,4),(1024,4),(512,2)]:
    x=np.random.default_rng(0).standard_normal((1,S,S,C),dtype=np.float32)
    dk=np.random.default_rng(1).standard_normal((1,C,2),dtype=np.float32)
    res={}
    for rnd in range(3):
        for name,fn in (("T=C",orig),("finer",finer)):
            _cpu._pos_chunked_tile=fn
            r=(med(lambda: ssm.spatial_softmax(x,layout="NHWC",threads=2)), med(lambda: ssm.soft_argmax_grad(x,dk,layout="NHWC",threads=2)))
            res.setdefault(name,[]).append(r)
    a=np.min(res["T=C"],0); b=np.min(res["finer"],0)
    print(S,C,"T=C ms",a.round(2),"finer ms",b.round(2),"ratio",(b/a).round(2), flush=True)
