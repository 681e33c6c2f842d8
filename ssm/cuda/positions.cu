/*
 * ssm/cuda/positions.cu -- softmax over positions on the GPU (spatial softmax, soft-argmax).
 *
 * Kernels (T: ssm_half, ssm_bf16, float, double; `group`: 1 = strided rows, 32 = contiguous rows):
 *   pos_softmax_fwd<T>  p = exp((x - m) / T_c) / s over the L positions of each map
 *   pos_softmax_bwd<T>  dx = p (dp - sum_l p dp) / T_c, and the temperature's gradient
 *                       per map, -(1/T_c) sum_l dy log p
 *   pos_expect<T>       E_d = sum_l p g[d, l]: keypoints, variances sum_l p (g - E_d)^2,
 *                       p itself; or (want_grad) dx = p (sum_d dk_d g[d, l] - K) / T_c with
 *                       K = sum_d dk_d E_d, and the temperature's gradient per map
 *
 * The same view as ssm/_positions.h: x as (outer, L, inner), a row (map) r = o * inner + i
 * of L positions at base + l * inner, channel r % C. The same shapes as the class-axis
 * kernels (softmax.cu): contiguous rows (NCHW, inner == 1) are owned by a warp each, lanes
 * striding over the positions; strided rows (channels-last) by a thread each, adjacent
 * threads owning adjacent channels, so every load over l is coalesced. Rows are walked
 * with the grid-stride loop of common.cuh; launch sizes depend only on the shape
 * (ssm/_gpu.py, launch_config), and a row is never split across groups, so results are
 * the same bits run to run. Coordinates: the caller's (D, L) float64 table, or for the
 * built-in grids one small table per axis (pos_coord), which L1 serves. Row sums
 * (sum of exp, expectations, variances, sum p dp, temperature gradients) accumulate in
 * double; elementwise math runs in acc_t<T>. Each sweep over a row recomputes exp; the
 * re-reads of a row hit L1/L2. Without variances and for up to SSM_POS_FUSED_D
 * coordinates, pos_expect sweeps a map twice (max; sum of exp and expectations) and a
 * third time for dx or prob.
 */
#include "common.cuh"

/* Up to this many coordinates are summed in one sweep over a map (without variances);
   more take a sweep each. */
#define SSM_POS_FUSED_D 3

/* Coordinate d of position l: grid[d * L + l] from a (D, L) table (s0 == 0), or, for the
   built-in grids of up to 3 axes, from per-axis tables concatenated in `grid`: axis 0
   (fastest) of s0 positions, axis 1 of s1, axis 2 of the rest; position l has index
   l % s0, (l / s0) % s1 and l / (s0 s1) along them. */
__device__ __forceinline__ double pos_coord(const double* __restrict__ grid, int s0, int s1,
                                            int d, int L, int l)
{
    if (s0 == 0)
        return grid[(long long)d * L + l];
    if (d == 0)
        return grid[l % s0];
    if (d == 1)
        return grid[s0 + (l / s0) % s1];
    return grid[s0 + s1 + l / (s0 * s1)];
}

/* exp((x - m) * it), the unnormalised probability of one position */
template <typename T>
__device__ __forceinline__ acc_t<T> pos_e(T x, acc_t<T> m, acc_t<T> it)
{
    return ssm_exp((to_acc(x) - m) * it);
}

/* One group of `group` threads owns one map at a time: its L values x[base + l * inner]. */
template <typename T>
__global__ void __launch_bounds__(SSM_BLOCK, SSM_MIN_BLOCKS)
pos_softmax_fwd(const T* __restrict__ x, const double* __restrict__ temp, T* __restrict__ out,
                long long outer, int L, long long inner, int C, int group)
{
    typedef acc_t<T> A;
    const long long rows = outer * inner;
    const pixel_walk walk(group);
    const int lane = walk.lane;
    for (long long r = walk.first; r < rows; r += walk.step) {
        const long long base = pixel_base(r, L, inner);
        const T* __restrict__ xr = x + base;
        T* __restrict__ yr = out + base;
        const A it = (A)(1.0 / temp[r % C]);
        const A m = row_max(xr, inner, L, lane, group);
        double s = 0;
        for (int l = lane; l < L; l += group)
            s += (double)pos_e(xr[l * inner], m, it);
        s = group_reduce(s, op_sum(), group);
        const A rs = (A)(1.0 / s);
        for (int l = lane; l < L; l += group)
            yr[l * inner] = from_acc<T>(pos_e(xr[l * inner], m, it) * rs);
    }
}

/* One group owns one map: its probabilities p and upstream gradients dp. */
template <typename T>
__global__ void __launch_bounds__(SSM_BLOCK, SSM_MIN_BLOCKS)
pos_softmax_bwd(const T* __restrict__ prob, const T* __restrict__ dprob,
                const double* __restrict__ temp, T* __restrict__ out, double* __restrict__ dtemp,
                long long outer, int L, long long inner, int C, int group)
{
    typedef acc_t<T> A;
    const long long rows = outer * inner;
    const pixel_walk walk(group);
    const int lane = walk.lane;
    for (long long r = walk.first; r < rows; r += walk.step) {
        const long long base = pixel_base(r, L, inner);
        const T* __restrict__ pr = prob + base;
        const T* __restrict__ dr = dprob + base;
        T* __restrict__ yr = out + base;
        const double it_d = 1.0 / temp[r % C];
        const A it = (A)it_d;
        double dot = 0;
        for (int l = lane; l < L; l += group)
            dot += (double)to_acc(pr[l * inner]) * (double)to_acc(dr[l * inner]);
        const A dotr = (A)group_reduce(dot, op_sum(), group);
        double dt = 0;
        for (int l = lane; l < L; l += group) {
            const A p = to_acc(pr[l * inner]);
            const A dy = p * (to_acc(dr[l * inner]) - dotr);
            yr[l * inner] = from_acc<T>(dy * it);
            if (dtemp && p > (A)0)  /* where p is 0, dy is 0 too */
                dt += (double)dy * (double)ssm_log(p);
        }
        if (dtemp) {
            dt = group_reduce(dt, op_sum(), group);
            if (lane == 0)
                dtemp[r] = -it_d * dt;
        }
    }
}

/* One group owns one map: its L values (logits, or probabilities with from_prob) and
   the keypoint outputs of row r, kp[r * D + d]. */
template <typename T>
__global__ void __launch_bounds__(SSM_BLOCK, SSM_MIN_BLOCKS)
pos_expect(const T* __restrict__ x, const double* __restrict__ grid,
           const double* __restrict__ temp, const T* __restrict__ dkp, T* __restrict__ out,
           T* __restrict__ kp, T* __restrict__ var, double* __restrict__ dtemp,
           long long outer, int L, long long inner, int C, int D, int s0, int s1, int group,
           int from_prob, int want_grad)
{
    typedef acc_t<T> A;
    const long long rows = outer * inner;
    const pixel_walk walk(group);
    const int lane = walk.lane;
    for (long long r = walk.first; r < rows; r += walk.step) {
        const long long base = pixel_base(r, L, inner);
        const T* __restrict__ xr = x + base;
        const double it_d = 1.0 / temp[r % C];
        const A it = (A)it_d;
        /* without variances, the sum of exp and every coordinate's sum in one sweep */
        const bool fused = !var && D <= SSM_POS_FUSED_D;
        A m = 0;
        double s = 1.0;  /* probabilities are used as given, not renormalised */
        if (!from_prob)
            m = row_max(xr, inner, L, lane, group);
        if (!from_prob && !fused) {
            s = 0;
            for (int l = lane; l < L; l += group)
                s += (double)pos_e(xr[l * inner], m, it);
            s = group_reduce(s, op_sum(), group);
        }
        double K = 0;
        if (fused) {
            double e[SSM_POS_FUSED_D], se = 0;
#pragma unroll
            for (int d = 0; d < SSM_POS_FUSED_D; d++)
                e[d] = 0;
            for (int l = lane; l < L; l += group) {
                const A p = from_prob ? to_acc(xr[l * inner]) : pos_e(xr[l * inner], m, it);
                se += (double)p;
#pragma unroll
                for (int d = 0; d < SSM_POS_FUSED_D; d++)
                    if (d < D)
                        e[d] += (double)p * pos_coord(grid, s0, s1, d, L, l);
            }
            if (!from_prob)
                s = group_reduce(se, op_sum(), group);
#pragma unroll
            for (int d = 0; d < SSM_POS_FUSED_D; d++) {
                if (d < D) {
                    const double E = group_reduce(e[d], op_sum(), group) / s;
                    if (kp && lane == 0)
                        kp[r * D + d] = from_double<T>(E);
                    if (want_grad)
                        K += (double)to_acc(dkp[r * D + d]) * E;
                }
            }
        }
        for (int d = 0; d < D && !fused; d++) {
            double e = 0;
            for (int l = lane; l < L; l += group) {
                const A p = from_prob ? to_acc(xr[l * inner]) : pos_e(xr[l * inner], m, it);
                e += (double)p * pos_coord(grid, s0, s1, d, L, l);
            }
            const double E = group_reduce(e, op_sum(), group) / s;
            if (kp && lane == 0)
                kp[r * D + d] = from_double<T>(E);
            if (var) {
                double v = 0;
                for (int l = lane; l < L; l += group) {
                    const A p = from_prob ? to_acc(xr[l * inner]) : pos_e(xr[l * inner], m, it);
                    const double c = pos_coord(grid, s0, s1, d, L, l) - E;
                    v += (double)p * c * c;
                }
                v = group_reduce(v, op_sum(), group) / s;
                if (lane == 0)
                    var[r * D + d] = from_double<T>(v > 0 ? v : 0.0);
            }
            if (want_grad)
                K += (double)to_acc(dkp[r * D + d]) * E;
        }
        T* __restrict__ yr = out ? out + base : out;
        if (!want_grad) {
            if (yr) {
                const A rs = (A)(1.0 / s);
                for (int l = lane; l < L; l += group)
                    yr[l * inner] = from_acc<T>(pos_e(xr[l * inner], m, it) * rs);
            }
            continue;
        }
        /* dy = p / s * (sum_d dk_d g[d, l] - K); dx = dy / T; dT = -(1/T) sum dy z */
        const double w = 1.0 / s;
        double dt = 0;
        double dk[SSM_POS_FUSED_D];  /* the map's dk in registers (up to 3 coordinates) */
#pragma unroll
        for (int d = 0; d < SSM_POS_FUSED_D; d++)
            dk[d] = d < D ? (double)to_acc(dkp[r * D + d]) : 0.0;
        for (int l = lane; l < L; l += group) {
            const A v = to_acc(xr[l * inner]);
            const A p = from_prob ? v : ssm_exp((v - m) * it);
            double h = -K;
            if (D <= SSM_POS_FUSED_D) {
#pragma unroll
                for (int d = 0; d < SSM_POS_FUSED_D; d++)
                    if (d < D)
                        h += dk[d] * pos_coord(grid, s0, s1, d, L, l);
            } else {
                for (int d = 0; d < D; d++)
                    h += (double)to_acc(dkp[r * D + d]) * pos_coord(grid, s0, s1, d, L, l);
            }
            const A dy = (A)((double)p * w * h);
            yr[l * inner] = from_acc<T>(dy * it);
            if (dtemp) {
                /* where p is 0 (x = -inf, a masked position), dy is 0 and so is the term */
                const A z = p > (A)0 ? (from_prob ? ssm_log(p) : (v - m) * it) : (A)0;
                dt += (double)dy * (double)z;
            }
        }
        if (dtemp) {
            dt = group_reduce(dt, op_sum(), group);
            if (lane == 0)
                dtemp[r] = -it_d * dt;
        }
    }
}
