import sys, time, numpy as np, ssm
def med(f, k=7):
    ts=[]
    for _ in range(k):
        t=time.perf_counter(); f(); ts.append(time.perf_counter()-t)
    return sorted(ts)[k//2]*1e3
th=int(sys.argv[1]) if len(sys.argv)>1 else 1
for S,C in [(256,16),(512,16),(1024,16),(1024,64),(2048,4)]:
    rng=np.random.default_rng(0)
    a=rng.standard_normal((1,C,S,S),dtype=np.float32)
    b=np.ascontiguousarray(a.transpose(0,2,3,1))
    d=rng.standard_normal(a.shape,dtype=np.float32); db=np.ascontiguousarray(d.transpose(0,2,3,1))
    dk=rng.standard_normal((1,C,2),dtype=np.float32)
    r=[]
    r.append(med(lambda: ssm.spatial_softmax(a,threads=th)))
    r.append(med(lambda: ssm.spatial_softmax(b,layout="NHWC",threads=th)))
    r.append(med(lambda: ssm.spatial_softmax_grad(a,d,threads=th)))
    r.append(med(lambda: ssm.spatial_softmax_grad(b,db,layout="NHWC",threads=th)))
    r.append(med(lambda: ssm.soft_argmax(a,threads=th)))
    r.append(med(lambda: ssm.soft_argmax(b,layout="NHWC",threads=th)))
    r.append(med(lambda: ssm.soft_argmax_grad(a,dk,threads=th)))
    r.append(med(lambda: ssm.soft_argmax_grad(b,dk,layout="NHWC",threads=th)))
    print(f"{S}x{S}x{C} th={th}  softmax NCHW {r[0]:.2f} NHWC {r[1]:.2f} | grad {r[2]:.2f} {r[3]:.2f} | argmax {r[4]:.2f} {r[5]:.2f} | argmax_grad {r[6]:.2f} {r[7]:.2f}", flush=True)
