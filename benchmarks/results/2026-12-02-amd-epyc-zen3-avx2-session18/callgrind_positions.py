import sys, numpy as np
sys.path.insert(0, sys.argv[1])
import ssm
rng=np.random.default_rng(0)
x=rng.standard_normal((4,17,64,48)).astype(np.float32)
xb=rng.standard_normal((1,2,256,256)).astype(np.float32)
dk=rng.standard_normal((4,17,2)).astype(np.float32)
dkb=rng.standard_normal((1,2,2)).astype(np.float32)
x3=rng.standard_normal((2,5,16,16,16)).astype(np.float32)
dk3=rng.standard_normal((2,5,3)).astype(np.float32)
for a,d in ((x,dk),(xb,dkb)):
    p=ssm.spatial_softmax(a,threads=1)
    ssm.spatial_softmax_grad(p,a,threads=1,return_temperature_grad=True)
    ssm.soft_argmax(a,threads=1)
    ssm.soft_argmax(a,threads=1,return_variance=True)
    ssm.soft_argmax_grad(a,d,threads=1,return_temperature_grad=True)
ssm.soft_argmax_grad(x3,dk3,threads=1,return_temperature_grad=True)
