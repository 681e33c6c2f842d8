/*
 * ssm/cuda/common.cuh -- what every ssm kernel shares: storage and accumulation types,
 * how threads are mapped to pixels, the row helpers (max, sum of exp) and the
 * warp / block reductions.
 *
 * Design
 * ------
 * a) Like the CPU kernels (ssm/_kernels.h), every layout is viewed as (outer, C, inner):
 *    pixel p = o * inner + i has its C values at base + c * inner, base = o*C*inner + i.
 *    NHWC and (N, C) are the case inner == 1 (contiguous rows).
 * b) A pixel is owned by a group of G threads (G, `group`, a kernel argument chosen by
 *    ssm/_gpu.py, launch_config):
 *      G == 1  (strided channels, inner > 1, and very short rows): one thread per pixel;
 *              adjacent threads own adjacent pixels, so every load over c is coalesced;
 *      G == 32 (contiguous rows, inner == 1): one warp per row; lanes stride over C and
 *              the row's max and sums are combined with warp shuffles.
 *    The kernel bodies are written once for both; G is a run-time value (uniform over
 *    the grid) rather than a template parameter, which halves the instantiations and so
 *    the compile time, at the cost of two uniform branches per pixel.
 * c) Groups walk the pixels with a grid-stride loop; the grid size depends only on the
 *    problem shape (ssm/_gpu.py, launch_config), so per-block partial sums have a fixed
 *    partition and the reduced loss is bit-identical run to run. No float atomics.
 * d) Storage T is ssm_half, ssm_bf16, float or double; arithmetic runs in acc_t<T>: float
 *    for ssm_half, ssm_bf16 and float, double for double. ssm_half is a 16-bit IEEE half,
 *    ssm_bf16 a bfloat16, converted with the PTX cvt instructions (widening a bfloat16 is
 *    a shift), so no CUDA header is needed (NVRTC finds none by default).
 * e) Element offsets and pixel indices are 64-bit (long long); only c is an int (C < 2^31,
 *    checked in ssm/_validation.py).
 *
 * This file is inlined into each .cu by ssm/_gpu.py before compilation (so CuPy's
 * kernel cache keys on the full text); nvcc sees it through #include.
 */
#ifndef SSM_COMMON_CUH
#define SSM_COMMON_CUH

/* Threads per block of every kernel; must match BLOCK in ssm/_gpu.py. */
#define SSM_BLOCK 256
/* Blocks per SM that __launch_bounds__ asks ptxas to fit: caps a thread at
   65536 / (256 * 2) = 128 registers. Without it ptxas 13 capped some kernels at 48
   registers and spilled; at 4 blocks (64 registers) the float64 kernels spill. */
#define SSM_MIN_BLOCKS 2
#define SSM_WARP 32

/* "no bad label" in per-block first-bad-index partials (LLONG_MAX) */
#define SSM_NO_BAD 0x7fffffffffffffffLL

/* ---- types ---------------------------------------------------------------------- */

struct __align__(2) ssm_half {
    unsigned short bits;
};
/* bfloat16: the top 16 bits of a float (ml_dtypes.bfloat16 on the host) */
struct __align__(2) ssm_bf16 {
    unsigned short bits;
};

template <typename T> struct acc_type { typedef T type; };
template <> struct acc_type<ssm_half> { typedef float type; };
template <> struct acc_type<ssm_bf16> { typedef float type; };
template <typename T> using acc_t = typename acc_type<T>::type;

template <typename A, typename B> struct same_type { static constexpr bool value = false; };
template <typename A> struct same_type<A, A> { static constexpr bool value = true; };

__device__ __forceinline__ float to_acc(ssm_half h)
{
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h.bits));
    return f;
}
__device__ __forceinline__ float to_acc(ssm_bf16 h)
{
    return __int_as_float((int)((unsigned int)h.bits << 16));  /* exact */
}
__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }

template <typename T> __device__ __forceinline__ T from_acc(acc_t<T> v) { return v; }
/* A NaN narrowed to a half type is the positive quiet NaN, float16 0x7e00 and bfloat16
   0x7fc0 (NumPy's and ml_dtypes' np.nan), where PTX's cvt gives 0x7fff. The GPU's
   arithmetic makes every NaN the canonical 0x7fffffff, so no payload is there to keep;
   the CPU keeps a NaN logit's payload (np.nan: these same bits) and x86 makes a NaN of
   its own (inf - inf) negative (0xfe00, 0xffc0 there). */
#define SSM_F16_NAN 0x7e00u
#define SSM_BF16_NAN 0x7fc0u

/* Round to nearest even (cvt); NaN as above. */
template <> __device__ __forceinline__ ssm_half from_acc<ssm_half>(float v)
{
    ssm_half h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h.bits) : "f"(v));
    if (v != v)
        h.bits = SSM_F16_NAN;
    return h;
}

/* Round to nearest even (sm_80's cvt); NaN as above. */
template <> __device__ __forceinline__ ssm_bf16 from_acc<ssm_bf16>(float v)
{
    ssm_bf16 h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h.bits) : "f"(v));
    if (v != v)
        h.bits = SSM_BF16_NAN;
    return h;
}

/* A double rounded once to T (the reduced loss, as the CPU path rounds it). For bfloat16
   by integer operations on the double's bits: no float conversion, which -ftz=true would
   flush below 2^-126 (bfloat16 has subnormals down to 2^-133). The significand is shifted
   right to bfloat16's 8 bits (more below 2^-126), rounded to nearest even; a carry steps
   the exponent field (e = 127 with q = 2^8 gives 0x7f80, inf: nothing above it). NaN:
   the positive quiet NaN, as from_acc. */
template <typename T> __device__ __forceinline__ T from_double(double v) { return (T)v; }
template <> __device__ __forceinline__ ssm_half from_double<ssm_half>(double v)
{
    ssm_half h;
    asm("cvt.rn.f16.f64 %0, %1;" : "=h"(h.bits) : "d"(v));
    if (v != v)
        h.bits = SSM_F16_NAN;
    return h;
}
template <> __device__ __forceinline__ ssm_bf16 from_double<ssm_bf16>(double v)
{
    const unsigned long long u = (unsigned long long)__double_as_longlong(v);
    const unsigned long long a = u & 0x7fffffffffffffffULL;
    const int e = (int)(a >> 52) - 1023;          /* unbiased; double subnormals: -1023 */
    const unsigned short sign = (unsigned short)((u >> 48) & 0x8000u);
    unsigned int bits = 0;
    ssm_bf16 h;
    if (a > 0x7ff0000000000000ULL) {
        h.bits = SSM_BF16_NAN;
        return h;
    }
    if (e >= 128) {
        bits = 0x7f80u;                           /* 2^128 and up, inf: inf */
    } else if (e > -1023) {
        const unsigned long long m = (a & 0x000fffffffffffffULL) | 0x0010000000000000ULL;
        const int shift = 45 + (e < -126 ? -126 - e : 0);
        if (shift < 54) {                         /* else below a quarter of 2^-133: 0 */
            const unsigned long long rem = m & ((1ULL << shift) - 1), half = 1ULL << (shift - 1);
            unsigned long long q = m >> shift;
            q += (rem > half || (rem == half && (q & 1))) ? 1 : 0;
            /* normal: the exponent field e + 127 over q's 7 stored bits (q = 2^7 + fraction,
               2^8 after a carry); subnormal: q itself (2^7: the least normal) */
            bits = (unsigned int)(e >= -126 ? ((unsigned long long)(e + 126) << 7) + q : q);
        }
    }
    h.bits = (unsigned short)(sign | bits);
    return h;
}

__device__ __forceinline__ float ssm_exp(float v) { return expf(v); }
__device__ __forceinline__ double ssm_exp(double v) { return exp(v); }
__device__ __forceinline__ float ssm_log(float v) { return logf(v); }
__device__ __forceinline__ double ssm_log(double v) { return log(v); }

template <typename A> __device__ __forceinline__ A ssm_nan();
template <> __device__ __forceinline__ float ssm_nan<float>() { return __int_as_float(0x7fc00000); }
template <> __device__ __forceinline__ double ssm_nan<double>()
{
    return __longlong_as_double(0x7ff8000000000000LL);
}
template <typename A> __device__ __forceinline__ A ssm_neg_inf();
template <> __device__ __forceinline__ float ssm_neg_inf<float>()
{
    return __int_as_float(0xff800000);
}
template <> __device__ __forceinline__ double ssm_neg_inf<double>()
{
    return __longlong_as_double((long long)0xfff0000000000000ULL);
}

/* ---- reductions ------------------------------------------------------------------- */

/* Max as the CPU kernels take it, `v > m ? v : m`: a NaN logit never becomes the max, but
   it makes its pixel's sum of exp NaN, so the whole pixel is NaN on both devices. */
struct op_max {
    template <typename V> __device__ V operator()(V a, V b) const { return b > a ? b : a; }
};
struct op_sum {
    template <typename V> __device__ V operator()(V a, V b) const { return a + b; }
};
struct op_min {
    template <typename V> __device__ V operator()(V a, V b) const { return b < a ? b : a; }
};

/* Reduce v over the 32 lanes of a warp (a butterfly: every lane gets the result). */
template <typename V, typename Op>
__device__ __forceinline__ V warp_reduce(V v, Op op)
{
#pragma unroll
    for (int off = SSM_WARP / 2; off > 0; off /= 2)
        v = op(v, __shfl_xor_sync(0xffffffffu, v, off));
    return v;
}

/* Reduce v over the `group` threads owning a pixel (1: nothing to do; 32: the warp).
   `group` is uniform over the grid, so every lane of a warp takes the same branch. */
template <typename V, typename Op>
__device__ __forceinline__ V group_reduce(V v, Op op, int group)
{
    return group == 1 ? v : warp_reduce(v, op);
}

/* Reduce v over the block (blockDim.x == SSM_BLOCK) in a fixed tree; the result is valid in
   thread 0. Each instantiation has its own shared array, so a kernel may call it once per
   value type. */
template <typename V, typename Op>
__device__ __forceinline__ V block_reduce(V v, Op op, V identity)
{
    __shared__ V warp_vals[SSM_BLOCK / SSM_WARP];
    const int lane = threadIdx.x % SSM_WARP, warp = threadIdx.x / SSM_WARP;
    v = warp_reduce(v, op);
    if (lane == 0)
        warp_vals[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = lane < SSM_BLOCK / SSM_WARP ? warp_vals[lane] : identity;
        v = warp_reduce(v, op);
    }
    return v;
}

/* ---- pixels ----------------------------------------------------------------------- */

/* How a kernel's threads walk the pixels: the group of `group` threads (1 or 32) that
   this thread belongs to starts at pixel `first` and steps by `step` (a grid-stride
   loop); `lane` is the thread's place in its group. A group's lanes see the same
   pixels, so loops over pixels are uniform within a warp. */
struct pixel_walk {
    long long first, step;
    int lane;
    __device__ __forceinline__ explicit pixel_walk(int group)
        : first(((long long)blockIdx.x * SSM_BLOCK + threadIdx.x) / group),
          step((long long)gridDim.x * (SSM_BLOCK / group)),
          lane((int)(threadIdx.x % group))
    {
    }
};

/* Element offset of pixel p's class-0 value in the (outer, C, inner) view. */
__device__ __forceinline__ long long pixel_base(long long p, int C, long long inner)
{
    if (inner == 1)
        return p * C;
    const long long o = p / inner;
    return o * C * inner + (p - o * inner);
}

/* ---- the shared row helpers: max and sum of exp over C ------------------------------ */

/* m = max_c x[c * st] over a pixel's C values (row pointer x, channel stride st), by
   the `group` threads that own it. */
template <typename T>
__device__ __forceinline__ acc_t<T> row_max(const T* __restrict__ x, long long st, int C,
                                            int lane, int group)
{
    typedef acc_t<T> A;
    A m = ssm_neg_inf<A>();
    for (int c = lane; c < C; c += group) {
        const A v = to_acc(x[c * st]);
        m = c == lane ? v : (v > m ? v : m);  /* start from the first value, as on the CPU */
    }
    return group_reduce(m, op_max(), group);
}

/* s = sum_c exp(x[c * st] - m). */
template <typename T>
__device__ __forceinline__ acc_t<T> row_sumexp(const T* __restrict__ x, long long st, int C,
                                               int lane, int group, acc_t<T> m)
{
    typedef acc_t<T> A;
    A s = 0;
    for (int c = lane; c < C; c += group)
        s += ssm_exp(to_acc(x[c * st]) - m);
    return group_reduce(s, op_sum(), group);
}

/* ---- labels ----------------------------------------------------------------------- */

/* A label as a 64-bit integer, whatever its storage type (compared as integers). */
template <typename L>
__device__ __forceinline__ long long label_at(const L* __restrict__ t, long long p)
{
    return (long long)t[p];
}

#endif /* SSM_COMMON_CUH */
