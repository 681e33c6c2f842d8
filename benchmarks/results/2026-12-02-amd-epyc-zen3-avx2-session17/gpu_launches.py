import numpy as np, ssm, time
from ssm.testing import cudasim as cs
rng=np.random.default_rng(0)
N,C,H,W=2,21,16,32
x=cs.asarray(rng.standard_normal((N,C,H,W)).astype(np.float32))
y=cs.asarray(rng.integers(0,C,(N,H,W)).astype(np.int64))
def count(name,f):
    s0=cs.sync_count()
    with cs.record_launches() as log:
        r=f()
    s1=cs.sync_count()
    print(f"{name:40s} launches={len(log)} syncs={s1-s0} ", [getattr(l,'name',l) for l in log])
count("softmax", lambda: ssm.softmax(x))
count("cross_entropy mean", lambda: ssm.cross_entropy(x,y))
count("cross_entropy mean validate=False", lambda: ssm.cross_entropy(x,y,validate=False))
count("sswl fwd mean", lambda: ssm.spatial_softmax_with_loss(x,y))
count("sswl fwd sum validate=False", lambda: ssm.spatial_softmax_with_loss(x,y,reduction='sum',validate=False))
count("fused mean", lambda: ssm.spatial_softmax_with_loss_and_grad(x,y))
count("fused mean validate=False", lambda: ssm.spatial_softmax_with_loss_and_grad(x,y,validate=False))
p,_=ssm.spatial_softmax_with_loss(x,y)
count("grad mean", lambda: ssm.spatial_softmax_with_loss_grad(p,y))
with cs.traffic() as log:
    ssm.softmax(x); ssm.spatial_softmax_with_loss_and_grad(x,y,validate=False)
for t in log: print(t.name, t.load_bytes, t.load_sectors*32, t.store_bytes, t.store_sectors*32, round(t.sector_efficiency,3))
