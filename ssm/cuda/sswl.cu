/*
 * ssm/cuda/sswl.cu -- SpatialSoftmaxWithLoss on the GPU: loss, gradient, label pre-pass.
 *
 * Kernels (T: ssm_half, ssm_bf16, float, double; L: the label type, unsigned char / int / long long,
 * or T itself for soft targets; `group`, an argument: 1 = strided channels, 32 = rows):
 *   sswl_stats<T, L>          label pre-pass: per-block sum of n_p and first bad label index
 *   sswl_fwd<T, L>            prob and per-pixel loss (map and per-block float64 sums),
 *                             or the loss alone (out == nullptr: no sweep 3);
 *                             with want_grad = 1 it is sswl_fwd_bwd, the fused loss and
 *                             dlogits in one pass (and prob if out2 is given); with
 *                             norm_partials, sswl_stats' partials as well (group 1 only)
 *   sswl_bwd<T, L>            dlogits from prob
 *   reduce_partials<T>        fixed-shape final pass: sum of the per-block partials,
 *                             divided by the divisor (0 when it is 0), rounded once to T
 *   reduce_stats              fixed-shape final pass of sswl_stats: the sum of its n_p
 *                             partials and the lowest bad label index, or -1
 *   reduce_loss_stats<T>      fixed-shape final pass of sswl_fwd with norm_partials: the
 *                             reduced loss (divided by the normaliser or a divisor) and
 *                             the lowest bad label index
 *
 * Same math, in the same order, as ssm_sswl_stats / ssm_sswl_tile / ssm_sswl_bwd_tile in
 * ssm/_kernels_impl.h:
 *   a_c = w * cw_c * t_c,  A = sum_c a_c,  q_c = exp(x_c - m) / s
 *   sparse targets (plain labels): l = a * min(m - x_y + log s, loss_cap), a = w * cw_y
 *   dense targets (soft, lens, smoothing): l = a * (A (m + log s) - sum_c a_c x_c)
 *   loss == SSM_KL adds a * sum_c a_c log t_c to a dense target's l (a one-hot t adds 0)
 *   gradient dx_c = g (A q_c - a_c), g = (d_loss / divisor) * d_loss_map[p] (grad_scale)
 * Ignored pixels have loss and gradient exactly 0; a label outside [0, C) that is not
 * ignore_index is never used as an index: its pixel's loss and gradient are NaN, and the
 * pre-pass reports the lowest such flat index.
 *
 * Determinism: every kernel that sums writes one partial per block (the grid depends only
 * on the shape), and the final passes run in one block in a fixed order. No atomics.
 * d_loss and the divisor can live on the device (d_loss_ptr, divisor_ptr: e.g. the "mean"
 * normaliser from sswl_stats), so no kernel argument ever needs a device-to-host read.
 */
#include "common.cuh"

/* the per-pixel criteria: the values of ssm._codes.Loss (as SSM_CROSS_ENTROPY, SSM_KL in
   ssm/_kernels.h) */
enum { SSM_LOSS_CROSS_ENTROPY = 0, SSM_LOSS_KL = 1 };

/* ---- per-pixel helpers ---------------------------------------------------------------- */

/* The gradient scale d_loss / divisor, 0 when the divisor is 0 (as on the CPU): each is
   read through its pointer if given, else taken by value. The pointers let d_loss and the
   "mean" normaliser stay on the device. */
__device__ __forceinline__ double grad_scale(double d_loss, const double* __restrict__ d_loss_ptr,
                                             double divisor,
                                             const double* __restrict__ divisor_ptr)
{
    const double num = d_loss_ptr != nullptr ? *d_loss_ptr : d_loss;
    const double den = divisor_ptr != nullptr ? *divisor_ptr : divisor;
    return den != 0.0 ? num / den : 0.0;
}

/* Stage pixel p's target (ssm_stage on the CPU). Sparse form: cls = label or -1,
   a = w * cw[y] (0 if ignored, NaN if out of range). Dense form: a is the pixel's activity
   (1; 0 if ignored or of zero weight, so that its loss and gradient are exactly 0 whatever
   its logits; NaN if out of range); the class weights come from class_target.
   wv = the pixel weight. */
template <typename T, typename L>
__device__ __forceinline__ void stage_pixel(const L* __restrict__ target, const T* __restrict__ w,
                                            const T* __restrict__ cw, long long p, int C,
                                            long long ignore_index, bool dense,
                                            acc_t<T>& wv, acc_t<T>& a, int& cls)
{
    typedef acc_t<T> A;
    wv = w != nullptr ? to_acc(w[p]) : (A)1;
    if constexpr (same_type<T, L>::value) {
        a = wv != 0 ? (A)1 : (A)0;
        cls = -1;
    } else {
        const long long y = label_at(target, p);
        const bool ok = y >= 0 && y < C;
        const A aj = dense ? (wv != 0 ? (A)1 : (A)0)
                           : wv * (cw != nullptr ? to_acc(cw[ok ? y : 0]) : (A)1);
        cls = ok && y != ignore_index ? (int)y : -1;
        a = y == ignore_index ? (A)0 : ok ? aj : ssm_nan<A>();
    }
}

/* Dense target distribution t_c = (1 - e) * base_c + e / C of class c, base the soft target
   (at element `elem`), the lens row of cls, or one-hot(cls); 0 if cls < 0. */
template <typename T, typename L>
__device__ __forceinline__ acc_t<T> class_dist(const L* __restrict__ target,
                                               const T* __restrict__ lens, long long elem, int c,
                                               int C, int cls, acc_t<T> keep, acc_t<T> spread)
{
    typedef acc_t<T> A;
    A b;
    if constexpr (same_type<T, L>::value) {
        b = to_acc(target[elem]);
    } else {
        if (cls < 0)
            return 0;
        b = lens != nullptr ? to_acc(lens[(long long)cls * C + c]) : (A)(cls == c);
    }
    return keep * b + spread;
}

/* Dense target weight a_c = w * cw_c * t_c (class_dist); 0 if cls < 0. */
template <typename T, typename L>
__device__ __forceinline__ acc_t<T> class_target(const L* __restrict__ target,
                                                 const T* __restrict__ cw,
                                                 const T* __restrict__ lens, long long elem, int c,
                                                 int C, int cls, acc_t<T> wv, acc_t<T> keep,
                                                 acc_t<T> spread)
{
    typedef acc_t<T> A;
    const A cwc = cw != nullptr ? to_acc(cw[c]) : (A)1;
    if constexpr (!same_type<T, L>::value) {
        if (cls < 0)
            return 0;
    }
    return wv * cwc * class_dist(target, lens, elem, c, C, cls, keep, spread);
}

/* ---- sswl_stats ----------------------------------------------------------------------- */

/* Pixel p's share of the label pre-pass: acc gains n_p (w * cw[y] for a valid label, w for
   a soft target), and first_bad becomes p if its label is neither in [0, C) nor
   ignore_index and first_bad is still SSM_NO_BAD (a thread's pixels come in increasing
   order, so that is its lowest). sswl_stats and sswl_fwd share it: one thread walking
   the same pixels gets the same sum, bit for bit. */
template <typename T, typename L>
__device__ __forceinline__ void pixel_stats(const L* __restrict__ target,
                                            const T* __restrict__ w, const T* __restrict__ cw,
                                            long long p, int C, long long ignore_index,
                                            double& acc, long long& first_bad)
{
    const double wp = w != nullptr ? (double)to_acc(w[p]) : 1.0;
    if constexpr (same_type<T, L>::value) {
        acc += wp;
    } else {
        const long long y = label_at(target, p);
        const bool ok = y >= 0 && y < C && y != ignore_index;
        const double np_ = wp * (cw != nullptr ? (double)to_acc(cw[ok ? y : 0]) : 1.0);
        acc += ok ? np_ : 0.0;
        if (!ok && y != ignore_index && first_bad == SSM_NO_BAD)
            first_bad = p;
    }
}

/* One thread owns one pixel at a time (labels and weights only, no logits). Writes the
   block's sum of n_p and the lowest flat index of a bad label (SSM_NO_BAD if none). */
template <typename T, typename L>
__global__ void __launch_bounds__(SSM_BLOCK, SSM_MIN_BLOCKS)
sswl_stats(const L* __restrict__ target, const T* __restrict__ w, const T* __restrict__ cw,
           long long npix, int C, long long ignore_index, double* __restrict__ norm_partials,
           long long* __restrict__ bad_partials)
{
    double acc = 0.0;
    long long first_bad = SSM_NO_BAD;
    const pixel_walk walk(1);
    for (long long p = walk.first; p < npix; p += walk.step)
        pixel_stats(target, w, cw, p, C, ignore_index, acc, first_bad);
    acc = block_reduce(acc, op_sum(), 0.0);
    first_bad = block_reduce(first_bad, op_min(), SSM_NO_BAD);
    if (threadIdx.x == 0) {
        norm_partials[blockIdx.x] = acc;
        bad_partials[blockIdx.x] = first_bad;
    }
}

/* ---- sswl_fwd (and sswl_fwd_bwd) ------------------------------------------------------ */

/* One group of `group` threads owns one pixel at a time: reads its C logits once (the sweeps'
   re-reads hit L1/L2), writes its C outputs, its loss to loss_map[p] (if given), and the
   block's float64 loss sum to partials[blockIdx.x].
   want_grad == 0 (sswl_fwd): `out` = prob, or nullptr for the loss alone (sweep 3 skipped).
   loss: SSM_LOSS_CROSS_ENTROPY, or SSM_LOSS_KL (a log per element of a dense target: the
   kernel is bound by memory traffic, so the log costs less here than a per-label table,
   its launch and its scratch would; the CPU uses such a table).
   want_grad == 1 (sswl_fwd_bwd, the fused loss and gradient): `out` = dlogits, and
   `out2` = prob if given. One kernel for both, as ssm_sswl_tile on the CPU: the flag only
   changes the epilogue, and a second kernel would double the compile time.
   norm_partials and bad_partials (both or neither): the label pre-pass rides in this pass
   (for reduce_loss_stats); with group == 1 the walk is sswl_stats' on the same grid, so
   the partials are the ones sswl_stats would write, bit for bit. */
template <typename T, typename L>
__global__ void __launch_bounds__(SSM_BLOCK, SSM_MIN_BLOCKS)
sswl_fwd(const T* __restrict__ x, const L* __restrict__ target, const T* __restrict__ w,
         const T* __restrict__ cw, const T* __restrict__ lens, const T* __restrict__ d_loss_map,
         long long outer, int C, long long inner, int group, long long ignore_index,
         double smoothing, double loss_cap, int want_grad, int loss, double d_loss,
         const double* __restrict__ d_loss_ptr, double divisor,
         const double* __restrict__ divisor_ptr,
         T* __restrict__ out, T* __restrict__ out2, T* __restrict__ loss_map,
         double* __restrict__ partials, double* __restrict__ norm_partials,
         long long* __restrict__ bad_partials)
{
    typedef acc_t<T> A;
    const bool dense = same_type<T, L>::value || lens != nullptr || smoothing != 0.0;
    const A keep = (A)(1.0 - smoothing), spread = (A)(smoothing / (double)C);
    const A gs = want_grad ? (A)grad_scale(d_loss, d_loss_ptr, divisor, divisor_ptr) : (A)0;
    const long long npix = outer * inner;
    const pixel_walk walk(group);
    const int lane = walk.lane;
    double acc = 0.0, norm = 0.0;
    long long first_bad = SSM_NO_BAD;
    for (long long p = walk.first; p < npix; p += walk.step) {
        const long long base = pixel_base(p, C, inner);
        const T* __restrict__ xr = x + base;
        A wv, a, r, f, ga = 0;
        int cls;
        double lp;
        if (norm_partials != nullptr && lane == 0)
            pixel_stats(target, w, cw, p, C, ignore_index, norm, first_bad);
        stage_pixel(target, w, cw, p, C, ignore_index, dense, wv, a, cls);
        const A g = want_grad ? (d_loss_map != nullptr ? gs * to_acc(d_loss_map[p]) : gs) : (A)0;

        /* sweeps 1-2: max, then the sum of exp (and, for dense targets, A and sum a_c x_c) */
        const A m = row_max(xr, inner, C, lane, group);
        if (!dense) {
            const A xy = cls >= 0 ? to_acc(xr[cls * inner]) : (A)0;
            const A s = row_sumexp(xr, inner, C, lane, group, m);
            const A ls = ssm_log(s);
            const double nll = (double)m - (double)xy + (double)ls;
            lp = a == 0 ? 0.0 : (double)a * (nll > loss_cap ? loss_cap : nll);  /* NaN stays NaN */
            r = (A)1 / s;
            /* g a / s, exactly 0 for an inactive pixel (a == 0) even where s is not finite
               (NaN or +inf logits): its gradient row is 0, as on the CPU */
            f = want_grad && a != 0 ? g * a * r : (A)0;
            ga = g * a;
        } else {
            /* sum_c a_c x_c in double, as on the CPU: in float its rounding error (~1e-7
               relative to the terms) would not cancel against A (m + log s), and a loss that
               is exactly 0 (C = 1) would come out as ~1e-7 */
            A s = 0, asum = 0;
            double ax = 0.0, ent = 0.0;
            const bool kl = loss == SSM_LOSS_KL;
            for (int c = lane; c < C; c += group) {
                const A v = to_acc(xr[c * inner]);
                const A ac = class_target(target, cw, lens, base + c * inner, c, C, cls, wv, keep,
                                          spread);
                s += ssm_exp(v - m);
                asum += ac;
                ax += ac != 0 ? (double)ac * (double)v : 0.0;  /* 0 log 0 = 0 */
                if (kl && ac != 0)  /* sum_c a_c log t_c, 0 log 0 = 0 */
                    ent += (double)ac * (double)ssm_log(class_dist(target, lens, base + c * inner,
                                                                   c, C, cls, keep, spread));
            }
            s = group_reduce(s, op_sum(), group);
            asum = group_reduce(asum, op_sum(), group);
            ax = group_reduce(ax, op_sum(), group);
            if (kl)
                ent = group_reduce(ent, op_sum(), group);
            const A ls = ssm_log(s);
            const double l = (double)asum * ((double)m + (double)ls) - ax + ent;
            lp = a == 0 ? 0.0 : (double)a * l;
            r = (A)1 / s;
            f = want_grad && a != 0 ? g * a * asum * r : (A)0;  /* 0 when inactive, as above */
        }

        /* sweep 3: the epilogue; rows of inactive pixels (f == 0) are exactly 0 */
        for (int c = lane; c < C && (want_grad || out != nullptr); c += group) {
            const long long e_off = c * inner;
            const A e = ssm_exp(to_acc(xr[e_off]) - m);
            if (!want_grad) {
                out[base + e_off] = from_acc<T>(e * r);
                continue;
            }
            if (out2 != nullptr)
                out2[base + e_off] = from_acc<T>(e * r);
            const A sub = dense ? g * class_target(target, cw, lens, base + e_off, c, C, cls, wv,
                                                   keep, spread)
                                : (cls == c ? ga : (A)0);
            out[base + e_off] = from_acc<T>((f != 0 ? f * e : (A)0) - sub);
        }
        if (lane == 0) {
            if (loss_map != nullptr)
                loss_map[p] = from_acc<T>((A)lp);
            acc += lp;
        }
    }
    if (partials != nullptr) {
        acc = block_reduce(acc, op_sum(), 0.0);
        if (threadIdx.x == 0)
            partials[blockIdx.x] = acc;
    }
    if (norm_partials != nullptr) {
        __syncthreads();  /* block_reduce<double>'s shared array again: warp 0 has read it */
        norm = block_reduce(norm, op_sum(), 0.0);
        first_bad = block_reduce(first_bad, op_min(), SSM_NO_BAD);
        if (threadIdx.x == 0) {
            norm_partials[blockIdx.x] = norm;
            bad_partials[blockIdx.x] = first_bad;
        }
    }
}

/* ---- sswl_bwd ------------------------------------------------------------------------- */

/* One group of `group` threads owns one pixel at a time: reads its C probabilities q,
   writes dx_c = g (A q_c - a_c). */
template <typename T, typename L>
__global__ void __launch_bounds__(SSM_BLOCK, SSM_MIN_BLOCKS)
sswl_bwd(const T* __restrict__ prob, const L* __restrict__ target, const T* __restrict__ w,
         const T* __restrict__ cw, const T* __restrict__ lens, const T* __restrict__ d_loss_map,
         long long outer, int C, long long inner, int group, long long ignore_index,
         double smoothing, double d_loss, const double* __restrict__ d_loss_ptr,
         double divisor, const double* __restrict__ divisor_ptr, T* __restrict__ out)
{
    typedef acc_t<T> A;
    const bool dense = same_type<T, L>::value || lens != nullptr || smoothing != 0.0;
    const A keep = (A)(1.0 - smoothing), spread = (A)(smoothing / (double)C);
    const A gs = (A)grad_scale(d_loss, d_loss_ptr, divisor, divisor_ptr);
    const long long npix = outer * inner;
    const pixel_walk walk(group);
    const int lane = walk.lane;
    for (long long p = walk.first; p < npix; p += walk.step) {
        const long long base = pixel_base(p, C, inner);
        A wv, a, f;
        int cls;
        stage_pixel(target, w, cw, p, C, ignore_index, dense, wv, a, cls);
        const A g = d_loss_map != nullptr ? gs * to_acc(d_loss_map[p]) : gs;
        if (dense) {
            A asum = 0;
            for (int c = lane; c < C; c += group)
                asum += class_target(target, cw, lens, base + c * inner, c, C, cls, wv, keep,
                                     spread);
            asum = group_reduce(asum, op_sum(), group);
            f = g * a * asum;
        } else {
            f = g * a;  /* also the amount subtracted at the label */
        }
        for (int c = lane; c < C; c += group) {
            const long long off = base + c * inner;
            const A q = to_acc(prob[off]);
            const A sub = dense ? g * class_target(target, cw, lens, off, c, C, cls, wv, keep,
                                                   spread)
                                : (cls == c ? f : (A)0);
            out[off] = from_acc<T>((f != 0 ? f * q : (A)0) - sub);
        }
    }
}

/* ---- final passes ------------------------------------------------------------------------ */

/* One block (SSM_BLOCK threads) owns the whole array of n partials: thread t sums
   partials[t], partials[t + SSM_BLOCK], ... in order, then the block tree. out[0] =
   sum / divisor (0 when the divisor is 0; divisor = *div_ptr if given, else div), rounded
   once to T. */
template <typename T>
__global__ void __launch_bounds__(SSM_BLOCK, SSM_MIN_BLOCKS)
reduce_partials(const double* __restrict__ partials, long long n, double div,
                const double* __restrict__ div_ptr, T* __restrict__ out)
{
    double s = 0.0;
    for (long long i = threadIdx.x; i < n; i += SSM_BLOCK)
        s += partials[i];
    s = block_reduce(s, op_sum(), 0.0);
    if (threadIdx.x == 0) {
        const double d = div_ptr != nullptr ? *div_ptr : div;
        out[0] = from_double<T>(d != 0.0 ? s / d : 0.0);
    }
}

/* One block owns sswl_stats' n partials: norm[0] = the sum of the norm partials, in
   reduce_partials' order (thread t sums elements t, t + SSM_BLOCK, ..., then the block
   tree), and bad[0] = the lowest bad partial, or -1 if none. One launch for both (a loss
   call's launches are few and small; each costs the host microseconds). block_reduce has
   one shared array per value type, so the two reductions do not share one. */
__global__ void __launch_bounds__(SSM_BLOCK, SSM_MIN_BLOCKS)
reduce_stats(const double* __restrict__ norm_partials, const long long* __restrict__ bad_partials,
             long long n, double* __restrict__ norm, long long* __restrict__ bad)
{
    double s = 0.0;
    long long v = SSM_NO_BAD;
    for (long long i = threadIdx.x; i < n; i += SSM_BLOCK) {
        s += norm_partials[i];
        v = bad_partials[i] < v ? bad_partials[i] : v;
    }
    s = block_reduce(s, op_sum(), 0.0);
    v = block_reduce(v, op_min(), SSM_NO_BAD);
    if (threadIdx.x == 0) {
        norm[0] = s;
        bad[0] = v == SSM_NO_BAD ? -1 : v;
    }
}

/* One block owns the n partials of an sswl_fwd pass with norm_partials: bad[0] = the lowest
   bad label index or -1 (reduce_stats' rule); and, if loss_partials is given, out[0] = the
   loss sum / d (0 when d is 0), rounded once to T, with d the sum of the norm partials
   (use_norm, "mean") or the divisor (div_ptr, else div). Each sum in reduce_partials'
   order: the same bits as reduce_stats, then reduce_partials with the normaliser. */
template <typename T>
__global__ void __launch_bounds__(SSM_BLOCK, SSM_MIN_BLOCKS)
reduce_loss_stats(const double* __restrict__ loss_partials,
                  const double* __restrict__ norm_partials,
                  const long long* __restrict__ bad_partials, long long n, int use_norm,
                  double div, const double* __restrict__ div_ptr, T* __restrict__ out,
                  long long* __restrict__ bad)
{
    double s = 0.0, sn = 0.0;
    long long v = SSM_NO_BAD;
    for (long long i = threadIdx.x; i < n; i += SSM_BLOCK) {
        if (loss_partials != nullptr)
            s += loss_partials[i];
        sn += norm_partials[i];
        v = bad_partials[i] < v ? bad_partials[i] : v;
    }
    v = block_reduce(v, op_min(), SSM_NO_BAD);
    if (threadIdx.x == 0)
        bad[0] = v == SSM_NO_BAD ? -1 : v;
    if (loss_partials == nullptr)
        return;
    s = block_reduce(s, op_sum(), 0.0);
    const double total = s;  /* thread 0's; the other threads' are partial */
    __syncthreads();         /* block_reduce<double>'s shared array again: warp 0 has read it */
    sn = block_reduce(sn, op_sum(), 0.0);
    if (threadIdx.x == 0) {
        const double d = use_norm ? sn : div_ptr != nullptr ? *div_ptr : div;
        out[0] = from_double<T>(d != 0.0 ? total / d : 0.0);
    }
}
