/*
 * ssm/cuda/softmax.cu -- the softmax family on the GPU.
 *
 * Kernels (T: ssm_half, ssm_bf16, float, double; `group`: 1 = strided channels, 32 = contiguous rows):
 *   softmax_fwd<T>      prob = exp(x - m) / s, or with `logspace` the log-softmax epilogue
 *                       (x - m) - log s; m the pixel's max, s = sum_c exp(x_c - m)
 *   softmax_bwd<T>      dx = p * (dp - sum_c p * dp)
 *
 * Same math, in the same order, as ssm_softmax_fwd_tile / ssm_softmax_bwd_tile in
 * ssm/_kernels_impl.h. Each pixel's C values are read in up to three sweeps (max, sum,
 * write); the re-reads of a pixel hit L1/L2. Launched by ssm/_gpu.py on the current
 * stream with SSM_BLOCK threads per block and a grid that depends only on the shape.
 */
#include "common.cuh"

/* One group of `group` threads owns one pixel (o, i) at a time: its C logits
   x[base + c * inner]. */
template <typename T>
__global__ void __launch_bounds__(SSM_BLOCK, SSM_MIN_BLOCKS)
softmax_fwd(const T* __restrict__ x, T* __restrict__ out, long long outer, int C,
            long long inner, int group, int logspace)
{
    typedef acc_t<T> A;
    const long long npix = outer * inner;
    const pixel_walk walk(group);
    const int lane = walk.lane;
    for (long long p = walk.first; p < npix; p += walk.step) {
        const long long base = pixel_base(p, C, inner);
        const T* __restrict__ xr = x + base;
        T* __restrict__ yr = out + base;
        const A m = row_max(xr, inner, C, lane, group);
        const A s = row_sumexp(xr, inner, C, lane, group, m);
        if (logspace) {
            const A ls = ssm_log(s);
            for (int c = lane; c < C; c += group)  /* x - m first: exact near the max */
                yr[c * inner] = from_acc<T>((to_acc(xr[c * inner]) - m) - ls);
        } else {
            const A r = (A)1 / s;
            for (int c = lane; c < C; c += group)
                yr[c * inner] = from_acc<T>(ssm_exp(to_acc(xr[c * inner]) - m) * r);
        }
    }
}

/* One group of `group` threads owns one pixel: its C probabilities p and upstream
   gradients dp. */
template <typename T>
__global__ void __launch_bounds__(SSM_BLOCK, SSM_MIN_BLOCKS)
softmax_bwd(const T* __restrict__ prob, const T* __restrict__ dprob, T* __restrict__ out,
            long long outer, int C, long long inner, int group)
{
    typedef acc_t<T> A;
    const long long npix = outer * inner;
    const pixel_walk walk(group);
    const int lane = walk.lane;
    for (long long p = walk.first; p < npix; p += walk.step) {
        const long long base = pixel_base(p, C, inner);
        const T* __restrict__ pr = prob + base;
        const T* __restrict__ dr = dprob + base;
        T* __restrict__ yr = out + base;
        A dot = 0;
        for (int c = lane; c < C; c += group)
            dot += to_acc(pr[c * inner]) * to_acc(dr[c * inner]);
        dot = group_reduce(dot, op_sum(), group);
        for (int c = lane; c < C; c += group)
            yr[c * inner] = from_acc<T>(to_acc(pr[c * inner]) * (to_acc(dr[c * inner]) - dot));
    }
}
