/*
 * ssm/_kernels.h -- the CPU tile kernels of ssm, in C.
 *
 * Design
 * ------
 * a) Every layout is viewed as (outer, C, inner): NCHW -> (N, C, H*W...), NHWC and
 *    (N, C) -> (N*H*W..., C, 1). A pixel p is (o, i) with flat index o*inner + i, which
 *    is also its index in the (N, *spatial) label, weight and loss arrays.
 * b) The work is cut into tiles of at most `tile` pixels that never cross an image
 *    (inner > 1) or span `tile` rows (inner == 1). The partition depends only on the
 *    shape, never on the thread count: per-tile float64 partial sums, added in tile
 *    order by the caller, make every reduction bit-identical for any thread count.
 * c) Inside a tile the math runs on channel-major [C][tile] blocks so that the inner
 *    loops walk contiguous pixels and vectorise (exp and log inlined).
 *    Strided channels (inner > 1) are read in place with channel stride `inner`
 *    (the rows two tiles ahead prefetched into L2) and written in place, or, for outputs larger
 *    than the caches, computed in scratch and written with non-temporal stores, which
 *    spare DRAM the read of every output line a plain store costs. Contiguous rows
 *    (inner == 1) are transposed into per-thread scratch, computed, and transposed
 *    back (large outputs through an L1 staging buffer and non-temporal stores): the
 *    same math, no kernel per layout. The max and sum-of-exp sweeps run over
 *    chunks of the tile whose rows fit in L1 (SSM_L1_CHUNK), so the second reads the
 *    first's lines from L1; the epilogue sweeps take whole tile rows (row segments
 *    streamed chunk by chunk were 25% slower: the non-temporal stores scatter).
 * d) One core function per concept: softmax_fwd (log-softmax is its epilogue),
 *    softmax_bwd, sswl_fwd / sswl_fwd_bwd (one function: the epilogue writes either
 *    the probabilities or the gradient; with no output, the loss alone, no epilogue
 *    and no exp stored), sswl_bwd, and the label pre-pass sswl_stats.
 *    The fused loss+gradient reads the logits once, computes exp once per element
 *    and writes the gradient once.
 * e) Targets are staged per tile into a sparse form (class index + weight per pixel,
 *    for plain labels) or a dense [C][tile] block a_c = w * cw_c * t_c (soft targets,
 *    lenses, smoothing). A label outside [0, C) is never used as an index. The loops
 *    that read labels are instantiated per label type (uint8, int32, int64) as the
 *    kernels are per float type, and picked once per tile by a switch on target_kind.
 *    The KL divergence (loss SSM_KL) adds sum_c a_c log t_c to a dense target's pixel
 *    loss: staged per pixel (ent), from a per-label table (label_terms, C values
 *    computed once per call) or, for soft targets, a log per element.
 * f) Threads live in the Cython caller (prange over tiles); these functions are
 *    pure, nogil, allocation-free, and get their per-thread scratch passed in.
 * g) Precision: elementwise math runs in the storage type R. Per-pixel class sums (sum
 *    of exp, sum_c p dp, sum_c a_c) are summed in R over blocks of SSM_SUM_BLOCK (32)
 *    channel rows, the block sums in double (ssm_sum_block_end): within a few ulps of
 *    float64 at any C, and the plain float sum, bit for bit, for C <= 32. Per-pixel
 *    losses and every loss reduction are double.
 *
 * exp and log are ours, inlined (ssm_expf_nonpos, ssm_exp_nonpos, ssm_logf_pos,
 * ssm_log_pos): the same bits in a vectorised loop body and in its scalar remainder, so
 * a pixel's value never depends on where a tile's extent puts it (glibc's would: gcc
 * vectorises its exp and log through libmvec in loop bodies and calls the scalar libm
 * functions in remainders, and the two differ in the last bit for some arguments).
 * target_clones builds each tile driver for AVX-512, AVX2 and the x86-64 baseline,
 * picked once at load time (ifunc); everything below the drivers is always_inline,
 * so it is compiled for each clone, but for the float sum-of-exp sweeps of the AVX-512
 * and AVX2 clones, written by hand (_expf_table.h, _expf_avx2.h). Only with gcc on x86-64
 * glibc (SSM_ISA_NAMES); elsewhere (aarch64, clang, MSVC) one portable build, without the
 * x86 intrinsics: .ci/aarch64 compiles it for aarch64 with -Wall -Wextra -Werror and
 * tests it.
 */
#ifndef SSM_KERNELS_H
#define SSM_KERNELS_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#if defined(__x86_64__) && defined(__GLIBC__) && defined(__GNUC__) && !defined(__clang__) \
    && !defined(__FAST_MATH__) && !defined(SSM_NO_CLONES)
#if defined(SSM_FORCE_CLONE)  /* one clone only, e.g. -DSSM_FORCE_CLONE=x86-64-v3 (setup.py) */
#define SSM_STR_(x) #x
#define SSM_STR(x) SSM_STR_(x)
#define SSM_CLONES __attribute__((target("arch=" SSM_STR(SSM_FORCE_CLONE))))
#else
#define SSM_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#endif
#define SSM_ISA_NAMES 1
#else
#define SSM_CLONES
#endif

#if defined(_MSC_VER)
#define SSM_INLINE static __forceinline
#define SSM_NOINLINE static __declspec(noinline)
#define restrict __restrict
#else
#define SSM_INLINE static inline __attribute__((always_inline))
#define SSM_NOINLINE static __attribute__((noinline))
#endif

/* Prefetch the line at p for reading, into L2 and out (locality 2: prefetcht1 on x86);
   never faults. MSVC has no __builtin_prefetch: its _mm_prefetch on x86, else nothing. */
#if defined(__GNUC__) || defined(__clang__)
#define SSM_PREFETCH(p) __builtin_prefetch((p), 0, 2)
#elif defined(_MSC_VER) && (defined(_M_X64) || defined(_M_IX86))
#include <xmmintrin.h>
#define SSM_PREFETCH(p) _mm_prefetch((const char *)(p), _MM_HINT_T1)
#else
#define SSM_PREFETCH(p) ((void)(p))
#endif

/* Prefetch the `bytes` bytes `at` bytes on from p, a line at a time. They may lie past
   the end of p's array: the address is formed as an integer, and prefetches never fault. */
static inline void ssm_prefetch_span(const void *p, ptrdiff_t at, ptrdiff_t bytes)
{
    uintptr_t a = (uintptr_t)p + (uintptr_t)at;
    ptrdiff_t k;
    for (k = 0; k < bytes; k += 64)
        SSM_PREFETCH((const void *)(a + (uintptr_t)k));
}

/* exp(x) for float x <= 0 (or NaN), the only arguments softmax gives it (x - max).
   Inlined so every loop that calls it vectorises in every clone; glibc's libmvec
   expf was 40% of the softmax time here, this is a few FMAs per element.
   Cody-Waite reduction x = k ln2 + r, |r| <= ln2/2, then a degree-6 polynomial
   (relative-error near-minimax fit of e^r on that interval: 0.29 half-ulp; about
   1 ulp after float rounding), then p 2^k = (2^-64 p) 2^(k+64), the 2^-64 folded
   into the coefficients: one rounding, so results below FLT_MIN underflow gradually
   to denormals, exactly as expf does (and bit for bit as the former two-step scaling). 2^(k+64) is built from t's bits alone
   (two integer ops: t = 1.5 2^23 + k holds k in its low mantissa bits). x < -104
   gives 0 (e^-104 rounds to 0), -inf gives 0, NaN gives NaN. */
#define SSM_2M64 5.42101086242752217e-20f  /* 2^-64, exactly */
/* The floors of the exps' arguments, as variables that no code writes rather than as
   literals: with a literal, gcc evaluates the exp of the floor at compile time (0) and
   turns the clamp into a compare and a mask on the result, two vector operations at the
   end of the exp's chain, where a variable leaves one max at its start (the same bits:
   the exp of either floor is 0). The float sum-of-exp sweep took 15% less time in a
   microbenchmark (AVX2 clone, Zen 3: 8.3 -> 7.1 cycles per 8 exps). Weak, so that no
   compiler may take a value it can see for the one it will read (a const one, weak or
   not, gcc 12 folds); hidden, so that the extension does not export them. */
#if defined(__GNUC__) || defined(__clang__)
#define SSM_OPAQUE __attribute__((weak, visibility("hidden")))
#else
#define SSM_OPAQUE static
#endif
SSM_OPAQUE float ssm_expf_floor = -104.0f;
SSM_OPAQUE double ssm_exp_floor = -746.0;
SSM_INLINE float ssm_expf_nonpos(float x)
{
    const float shifter = 12582912.0f;          /* 1.5 * 2^23: round to nearest int */
    union { float f; uint32_t u; } tb, s;
    float t, kf, r, p;
    x = x < ssm_expf_floor ? ssm_expf_floor : x;  /* one max; NaN stays NaN */
    t = x * 1.44269504088896341f + shifter;
    kf = t - shifter;
    r = x - kf * 0.693359375f;                  /* ln2, high part: exact product */
    r = r - kf * -2.12194440e-4f;               /* ln2, low part */
    /* the coefficients times 2^-64 (exact: every step is the unscaled one times 2^-64,
       far from underflow), so p = 2^-64 P(r) and the last product is p 2^(k+64) */
    p = 0.0013843653723597527f * SSM_2M64;
    p = p * r + 0.00837415549904108f * SSM_2M64;
    p = p * r + 0.04166800156235695f * SSM_2M64;
    p = p * r + 0.16666431725025177f * SSM_2M64;
    p = p * r + 0.4999999403953552f * SSM_2M64;
    p = p * r + 1.0f * SSM_2M64;
    p = p * r + 1.0f * SSM_2M64;
    /* k in [-150, 0]: tb.u = 0x4B400000 + k, and 0x4B400000 << 23 wraps to 0, so the
       shift leaves the exponent field k + 64 + 127 in [41, 191]: 2^(k+64). Unsigned
       arithmetic: defined for any bits (NaN x gives garbage here, NaN from p). */
    tb.f = t;
    s.u = (tb.u + 191u) << 23;
    return p * s.f;
}

/* 1: the x86-64-v3 clone's float sums of exp run ssm_sumexp_rows_v3 (_expf_avx2.h); 0:
   gcc's loop. Set to 0 only by the tests (ssm._cpu.exp_sweep_v3), between calls, to
   compare the two. No effect in builds without target clones. */
static int ssm_exp_sweep_v3 = 1;

/* The AVX-512 clone's float exp, a table-driven one with fewer FMAs (ssm_expf_t16; its
   sweeps are hand-written). */
#if defined(SSM_ISA_NAMES)
#define SSM_HAVE_EXPF_T16
#include "_expf_table.h"
/* ... and the AVX2 clone's float sum-of-exp sweep, by hand (ssm_sumexp_rows_v3). */
#include "_expf_avx2.h"
#endif

/* exp(x) for double x <= 0 (or NaN): ssm_expf_nonpos's scheme in double, for the same
   reason and one more: gcc vectorises glibc's exp through libmvec in a loop's body but
   calls the scalar exp in its remainder, and the two differ in the last bit for some
   arguments, so a pixel's value depended on where the tile's extent put it (results
   changed with the chunking of the array). Inlined, this is one function in vector and
   scalar code alike (the same operations, fused the same way in a given clone).
   x = k ln2 + r, |r| <= ln2/2 (ln2's high part has 32 bits: k * hi is exact for any
   k here), e^r = 1 + r + r^2 g(r) with g of degree 9 (a Chebyshev fit of (e^r - 1 - r)
   / r^2: 0.08 ulp of e^r; 0.95 ulp measured with FMA, 1.24 without: tests/test_exp.py),
   scaled by 2^k in two steps so that results below DBL_MIN underflow gradually to
   denormals, as exp does. x < -746 gives 0
   (e^-745.2 rounds to 0), -inf gives 0, NaN gives NaN. Integer work in unsigned 64-bit
   lanes, no arithmetic shift (AVX2 has none for 64-bit lanes). */
SSM_INLINE double ssm_exp_nonpos(double x)
{
    const double shifter = 6755399441055744.0;  /* 1.5 * 2^52: round to nearest int */
    union { double f; uint64_t u; } tb, s1, s2;
    double t, kf, r, p;
    uint64_t mk, h;
    x = x < ssm_exp_floor ? ssm_exp_floor : x;
    t = x * 1.4426950408889634 + shifter;
    kf = t - shifter;
    tb.f = t;                                   /* -k = kf, read off t's low bits */
    mk = 0x4338000000000000u - tb.u;            /* -k in [0, 1077]; garbage for NaN x */
    r = x - kf * 6.93147180369123816490e-01;    /* ln2, high part: exact product */
    r = r - kf * 1.90821492927058770002e-10;    /* ln2, low part */
    p = 2.510038549551032e-08;
    p = p * r + 2.7620088445409746e-07;
    p = p * r + 2.7557268459997064e-06;
    p = p * r + 2.4801521295954376e-05;
    p = p * r + 0.00019841269863053618;
    p = p * r + 0.0013888888917213717;
    p = p * r + 0.008333333333330062;
    p = p * r + 0.04166666666662413;
    p = p * r + 0.16666666666666669;
    p = p * r + 0.5000000000000001;
    p = p * r + 1.0;
    p = p * r + 1.0;
    h = mk >> 1;                                /* 2^k = 2^-h 2^-(mk - h), both normal */
    s1.u = (1023u - h) << 52;                   /* unsigned: defined for any mk */
    s2.u = (1023u - (mk - h)) << 52;
    return p * s1.f * s2.f;
}

/* log(x) for float x > 0, and the special arguments. For the same reason as the exp: the
   same bits in vector and scalar code (libmvec's logf and libm's differ by an ulp for
   some arguments). What the kernels pass: sums of exp in [1, C] (NaN for a pixel whose
   logits are not finite), smoothed soft targets (0 gives -inf, whose product the caller
   discards; a negative target NaN) and probabilities in (0, 1]; every float is handled:
   denormals, +-0 -> -inf, +inf -> +inf, negative or NaN -> NaN (by selects at the end:
   what the arithmetic gave those arguments is discarded).
   x = 2^k m with m in [sqrt(1/2), sqrt(2)): adding the bits of 1 - sqrt(1/2) to x's moves
   the binade boundary to sqrt(1/2), so k and m are read off the exponent and mantissa
   fields (k as a float by the 2^23 trick: no int-to-float conversion). With f = m - 1
   (exact) and s = f / (2 + f), log m = log((1 + s) / (1 - s)) = 2s + s R(s^2) with
   R(z) = 2 (z/3 + z^2/5 + ...), a degree-3 fit (relative error 3e-7 of R, which is at
   most 0.02: 3e-9 of log m). The sum is arranged as fdlibm's, the large terms added
   last: log x = k ln2_hi - ((f^2/2 - (s (f^2/2 + R) + k ln2_lo)) - f) (f - f^2/2 +
   s (f^2/2 + R) = 2s + sR since 2s = f - sf); ln2_hi has 15 bits, so k ln2_hi is exact.
   0.84 ulp measured without FMA, 0.75 with (tests/test_exp.py). A denormal x is scaled
   by 2^23 first (k less 23). In float, eight lanes per AVX2 vector: computed in double
   and rounded once it was 0.50 ulp, but 7.3 instructions per element under AVX2 where
   this takes 5.6 (libmvec's logf 5.0). */
SSM_INLINE float ssm_logf_any(float x, int general)
{
    union { float f; uint32_t u; } v, m, e;
    float f, s, z, p, hfsq, kf, r;
    const int tiny = general && x < 0x1p-126f;
    v.f = tiny ? x * 0x1p23f : x;
    v.u += 0x3f800000u - 0x3f3504f3u;                   /* 1 - sqrt(1/2): bits */
    m.u = (v.u & 0x007fffffu) + 0x3f3504f3u;            /* m in [sqrt(1/2), sqrt(2)) */
    e.u = (v.u >> 23) + 0x4b000000u;                    /* 2^23 + k + 127 */
    kf = e.f - (tiny ? 8388758.0f : 8388735.0f);        /* 2^23 + 127 (+ 23) */
    f = m.f - 1.0f;
    s = f / (2.0f + f);
    z = s * s;
    p = 0.29580509662628174f;
    p = p * z + 0.39988765120506287f;
    p = p * z + 0.6666668653488159f;
    p = p * z;
    hfsq = 0.5f * f * f;
    r = kf * 0.693145751953125f - ((hfsq - (s * (hfsq + p) + kf * 1.428606765330187e-06f)) - f);
    if (general)
        r = x > 0 ? r : (x == 0 ? -INFINITY : NAN);
    return x < INFINITY ? r : x;
}

SSM_INLINE float ssm_logf_pos(float x) { return ssm_logf_any(x, 1); }

/* log s for a sum of exp s = sum_c exp(x_c - m), which holds exp(0) = 1: s >= 1, or NaN
   (logits not finite). There ssm_logf_pos's selects for denormal, zero and negative
   arguments are idle; without them, the same bits (VOC loss alone: 1.9 instructions
   per pixel fewer, AVX2 clone). */
SSM_INLINE float ssm_logf_sum(float x) { return ssm_logf_any(x, 0); }

/* log(x) for double x: ssm_logf_pos's scheme in double, with a degree-7 fit of R
   (relative error 5e-16 of R, 2^-57 of log m) and ln2_hi of 32 bits (as in
   ssm_exp_nonpos). 0.86 ulp measured without FMA, 0.76 with (tests/test_exp.py). A
   denormal x is scaled by 2^52 first (k less 52). The kernels pass it what they pass
   ssm_logf_pos. */
SSM_INLINE double ssm_log_any(double x, int general)
{
    union { double f; uint64_t u; } v, m, e;
    double f, s, z, p, hfsq, kf, r;
    const int tiny = general && x < 0x1p-1022;
    v.f = tiny ? x * 0x1p52 : x;
    v.u += 0x3ff0000000000000u - 0x3fe6a09e667f3bcdu;
    m.u = (v.u & 0x000fffffffffffffu) + 0x3fe6a09e667f3bcdu;
    e.u = (v.u >> 52) + 0x4330000000000000u;
    kf = e.f - (tiny ? 4503599627371571.0 : 4503599627371519.0);  /* 2^52 + 1023 (+ 52) */
    f = m.f - 1.0;
    s = f / (2.0 + f);
    z = s * s;
    p = 0.14616875333604523;
    p = p * z + 0.15331684037552043;
    p = p * z + 0.18182890368150278;
    p = p * z + 0.22222211115844537;
    p = p * z + 0.2857142862610605;
    p = p * z + 0.3999999999989918;
    p = p * z + 0.666666666666667;
    p = p * z;
    hfsq = 0.5 * f * f;
    r = kf * 6.93147180369123816490e-01
        - ((hfsq - (s * (hfsq + p) + kf * 1.90821492927058770002e-10)) - f);
    if (general)
        r = x > 0 ? r : (x == 0 ? -INFINITY : NAN);
    return x < INFINITY ? r : x;
}

SSM_INLINE double ssm_log_pos(double x) { return ssm_log_any(x, 1); }

/* as ssm_logf_sum */
SSM_INLINE double ssm_log_sum(double x) { return ssm_log_any(x, 0); }

/* target kinds and loss kinds: the values of ssm._codes.Target and ssm._codes.Loss
   (tests/test_contract.py checks them) */
enum { SSM_NO_TARGET = 0, SSM_U8 = 1, SSM_I32 = 2, SSM_I64 = 3, SSM_SOFT = 4 };
enum { SSM_CROSS_ENTROPY = 0, SSM_KL = 1 };

typedef struct {
    ptrdiff_t outer, C, inner;  /* logits viewed as (outer, C, inner) */
    ptrdiff_t tile;             /* pixels per tile */
    const void *x;              /* logits, or prob for the backward functions */
    const void *x2;             /* dprob (softmax_bwd) */
    int target_kind;            /* SSM_* above */
    const void *target;         /* labels (outer*inner) or soft targets (like x) */
    long long ignore_index;
    const void *w;              /* per-pixel weights (outer*inner) or NULL */
    const void *cw;             /* class weights (C) or NULL */
    const void *lens;           /* (C, C) row-stochastic lens or NULL */
    double smoothing;           /* label smoothing e */
    double loss_cap;            /* per-unit-weight pixel loss cap (Caffe2 clamp); INFINITY if none */
    int loss;                   /* SSM_CROSS_ENTROPY or SSM_KL (which adds sum_c a_c log t_c) */
    const double *label_terms;  /* SSM_KL, dense labels: sum_c cw_c t_c log t_c per label (C) */
    const void *d_loss_map;     /* per-pixel d_loss (outer*inner) or NULL */
    double grad_scale;          /* gradient factor: d_loss / divisor */
    void *out;                  /* prob, log-prob or dlogits; sswl_fwd: NULL for the loss alone */
    void *out2;                 /* prob, from the fused function, or NULL */
    void *loss_map;             /* per-pixel loss (outer*inner) or NULL */
    int stream;                 /* outputs streamed out (non-temporal stores): see ssm_store */
    double *norms;              /* sswl_fwd: per tile, ssm_sswl_stats's sum of n_p, or NULL */
    ptrdiff_t *bads;            /* ... and its first bad label (with norms) */
} ssm_problem;

static inline ptrdiff_t ssm_num_tiles(const ssm_problem *P)
{
    if (P->outer == 0 || P->inner == 0 || P->C == 0)
        return 0;
    if (P->inner > 1)
        return P->outer * ((P->inner + P->tile - 1) / P->tile);
    return (P->outer + P->tile - 1) / P->tile;
}

/* How far ahead, in elements, the float and double sweeps (ssm_max_sumexp_chunked,
   ssm_softmax_bwd_tile) prefetch the rows they read (strided channels: the same pixels
   of the tile after next, see ssm_prefetch_next), or 0 for none. In the builds with
   target clones, only where the AVX-512 clone runs: on its CPU (Zen 4) prefetching
   helped (A/B, 2026-11-23), while on an AVX2-only Zen 3 the hardware prefetchers did
   better alone (alternating processes, 2026-12-01: VOC-like 2 threads fused 5.81 ->
   5.47 ms, loss alone 3.68 -> 3.42, softmax_grad 5.44 -> 4.80; Cityscapes-like loss
   7.07 -> 6.42). Builds without clones prefetch as before. Not changed: the labels'
   prefetch (ssm_prefetch_labels), the gradient from probabilities (ssm_sswl_bwd_tile:
   without it 9-11% slower at 1 thread, 6% at 2, of which 4% and 1-2% were code
   placement) and the half types (_half_impl.h: 3% slower without, bfloat16 fused and
   loss); figures in benchmarks/results/2026-12-01-amd-epyc-zen3-avx2-session9/. */
static inline ptrdiff_t ssm_rows_ahead(const ssm_problem *P, ptrdiff_t n)
{
    if (P->inner <= 1)
        return 0;
#if defined(SSM_HAVE_EXPF_T16)
    return ssm_expf_use_t16() ? 2 * n : 0;  /* the x86-64-v4 clone runs (or is forced) */
#else
    return 2 * n;  /* builds without clones (and other architectures): as before */
#endif
}

/* Where tile t lives: element offset of its first logit, flat index of its first
   pixel, and its pixel count. */
SSM_INLINE void ssm_tile_geom(const ssm_problem *P, ptrdiff_t t, ptrdiff_t *base,
                              ptrdiff_t *pix, ptrdiff_t *n)
{
    if (P->inner > 1) {
        ptrdiff_t per = (P->inner + P->tile - 1) / P->tile;
        ptrdiff_t o = t / per, i0 = (t % per) * P->tile;
        *n = P->inner - i0 < P->tile ? P->inner - i0 : P->tile;
        *base = o * P->C * P->inner + i0;
        *pix = o * P->inner + i0;
    } else {
        ptrdiff_t r0 = t * P->tile;
        *n = P->outer - r0 < P->tile ? P->outer - r0 : P->tile;
        *base = r0 * P->C;
        *pix = r0;
    }
}

/* A branch the callers never take (the target kind of a label function, say: the
   kinds come from ssm/_validation.py). UBSan reports it if it is ever reached. */
#if defined(__GNUC__) || defined(__clang__)
#define SSM_UNREACHABLE() __builtin_unreachable()
#elif defined(_MSC_VER)
#define SSM_UNREACHABLE() __assume(0)
#else
#define SSM_UNREACHABLE() ((void)0)
#endif

static inline size_t ssm_round64(size_t bytes) { return (bytes + 63) & ~(size_t)63; }

/* Per-pixel class sums over more than this many channels are summed in blocks of it
   (see ssm_sum_block_end in _kernels_impl.h). Even: the row sweeps take rows in pairs. */
#define SSM_SUM_BLOCK 32

/* The max and sum-of-exp sweeps run over chunks of a tile whose C rows take about this
   many bytes (ssm_max_sumexp_chunked): half of a 32 KiB L1 data cache. */
#define SSM_L1_CHUNK 16384

/* Pixels per chunk of those sweeps for C rows of `size`-byte elements: a multiple of 16,
   or the tile's n where under 64 pixels fit (C > 64 for float): the row loops would be
   too short, their setup and prefetches of four lines a row outweighing the L1 hits.
   The float path and the direct half tiles cut their tiles alike: the same bits. */
SSM_INLINE ptrdiff_t ssm_l1_chunk(ptrdiff_t C, ptrdiff_t n, ptrdiff_t size)
{
    ptrdiff_t chunk = SSM_L1_CHUNK / (C * size);
    return chunk < 64 ? n : chunk & ~(ptrdiff_t)15;
}

/* Per-tile scratch (the arrays of ssm_scratch in _kernels_impl.h, carved in this
   order by ssm_scratch_carve; the counts must match it), in bytes, for elements of
   `rsize` bytes: per-pixel arrays, [C][tile] blocks and, for C > SSM_SUM_BLOCK, the
   two double accumulators of a class sum, each starting on a 64-byte boundary, plus
   64 for aligning the start of an unaligned buffer. */
#define SSM_SCRATCH_PIXEL_R 13      /* per-pixel arrays of R */
#define SSM_SCRATCH_PIXEL_DOUBLE 3  /* per-pixel arrays of double */
#define SSM_SCRATCH_BLOCKS 5        /* [C][tile] blocks of R */
static inline size_t ssm_scratch_bytes(const ssm_problem *P, size_t rsize)
{
    size_t T = (size_t)P->tile, CT = (size_t)P->C * T;
    size_t nd = SSM_SCRATCH_PIXEL_DOUBLE + (P->C > SSM_SUM_BLOCK ? 2 : 0);
    return 64 + SSM_SCRATCH_PIXEL_R * ssm_round64(T * rsize) + ssm_round64(T * sizeof(int32_t))
         + nd * ssm_round64(T * sizeof(double)) + SSM_SCRATCH_BLOCKS * ssm_round64(CT * rsize);
}

/* ---- rows <-> channel-major blocks, for rows (NHWC, (N, C)) ---------------------
 * block[c * T + j] = rows[j * C + c] and back. Element by element these transposes
 * took 70% of an NHWC call; on CPUs with AVX (checked at run time: the baseline
 * clone may run on one) 8 x 8 float or 4 x 4 double tiles go through registers;
 * the last channels of a row are read by masked loads (masked lanes are never
 * touched) and written as ssm_block_to_rows_avx_f says. Pixels past the last full
 * group of 8 (4) are moved one by one. */
#if defined(SSM_ISA_NAMES)
#include <immintrin.h>
#define SSM_AVX_TRANSPOSE 1

static const int32_t ssm_mask32[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
static const int64_t ssm_mask64[8] = {-1, -1, -1, -1, 0, 0, 0, 0};

/* r[k][i] -> r[i][k] */
__attribute__((target("avx"))) static inline void ssm_tr8x8_ps(__m256 *r)
{
    __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
    __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
    __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
    __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
    /* s_i: element i (low lane) and i + 4 (high lane) of rows 0-3 (s0-s3) or 4-7 (s4-s7) */
    __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
    __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
    __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    r[0] = _mm256_permute2f128_ps(s0, s4, 0x20);
    r[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
    r[2] = _mm256_permute2f128_ps(s2, s6, 0x20);
    r[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
    r[4] = _mm256_permute2f128_ps(s0, s4, 0x31);
    r[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
    r[6] = _mm256_permute2f128_ps(s2, s6, 0x31);
    r[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}

__attribute__((target("avx"))) static inline void ssm_tr4x4_pd(__m256d *r)
{
    __m256d t0 = _mm256_unpacklo_pd(r[0], r[1]), t1 = _mm256_unpackhi_pd(r[0], r[1]);
    __m256d t2 = _mm256_unpacklo_pd(r[2], r[3]), t3 = _mm256_unpackhi_pd(r[2], r[3]);
    r[0] = _mm256_permute2f128_pd(t0, t2, 0x20);
    r[1] = _mm256_permute2f128_pd(t1, t3, 0x20);
    r[2] = _mm256_permute2f128_pd(t0, t2, 0x31);
    r[3] = _mm256_permute2f128_pd(t1, t3, 0x31);
}

__attribute__((target("avx"))) static void ssm_rows_to_block_avx_f(
    const float *restrict rows, ptrdiff_t C, ptrdiff_t n, float *restrict block, ptrdiff_t T)
{
    ptrdiff_t j0, c0, c, k, n8 = n & ~(ptrdiff_t)7;
    for (j0 = 0; j0 < n8; j0 += 8)
        for (c0 = 0; c0 < C; c0 += 8) {
            ptrdiff_t w = C - c0 < 8 ? C - c0 : 8;
            __m256 r[8];
            if (w == 8) {
                for (k = 0; k < 8; k++)
                    r[k] = _mm256_loadu_ps(rows + (j0 + k) * C + c0);
            } else {
                __m256i m = _mm256_loadu_si256((const __m256i *)(ssm_mask32 + 8 - w));
                for (k = 0; k < 8; k++)
                    r[k] = _mm256_maskload_ps(rows + (j0 + k) * C + c0, m);
            }
            ssm_tr8x8_ps(r);
            for (c = 0; c < w; c++)
                _mm256_storeu_ps(block + (c0 + c) * T + j0, r[c]);
        }
    for (k = n8; k < n; k++)
        for (c = 0; c < C; c++)
            block[c * T + k] = rows[k * C + c];
}

/* Block to rows. Masked stores are slow on some CPUs (microcoded on AMD), so the last
   w < 8 channels of each pixel are stored 8 wide, first: the extra lanes land on the
   next pixel's first channels, which later stores in this tile overwrite. Where
   the 8 lanes would pass the tile's end, they go one by one, unless `room` (a constant
   at each call) says the destination has 8 floats of room past its n C: a staging
   buffer (ssm_block_to_stage_avx_f), whose stores are then all whole, with no test.
   With f (a constant NULL or not at each call), the gradient of sparse labels is made
   on the way, from the block of e (see ssm_block_to_rows_grad_avx_f): each loaded
   vector becomes f != 0 ? f e : 0, and once a group of eight pixels has all its
   stores, the entry of each pixel's label (cls, -1 for none) is less gl. These are
   ssm_grad_row's operations (p - 0 is p for every product p), so the same bits. */
__attribute__((target("avx"), always_inline)) static inline __m256 ssm_grad_p8(
    __m256 e, const float *f, __m256 fv, __m256 fnz)
{
    return f ? _mm256_and_ps(_mm256_mul_ps(fv, e), fnz) : e;
}

static inline void ssm_rows_label_fixup(float *restrict d, ptrdiff_t C, ptrdiff_t m,
                                        const float *restrict gl, const int32_t *restrict cls)
{
    ptrdiff_t k;
    for (k = 0; k < m; k++) {
        int32_t y = cls[k];
        if ((uint32_t)y < (uint32_t)C)  /* -1: no label, nothing to subtract */
            d[k * C + y] -= gl[k];
    }
}

__attribute__((target("avx"), always_inline)) static inline void ssm_block_to_rows_avx_f_(
    const float *restrict block, ptrdiff_t T, ptrdiff_t C, ptrdiff_t n, float *restrict rows,
    const int room, const float *restrict f, const float *restrict gl,
    const int32_t *restrict cls)
{
    ptrdiff_t j0, c0, c, k, n8 = n & ~(ptrdiff_t)7, cw = C & ~(ptrdiff_t)7, w = C - cw;
    __m256 r[8], fv = _mm256_setzero_ps(), fnz = _mm256_setzero_ps();
    float last[8];
    for (j0 = 0; j0 < n8; j0 += 8) {
        const float *b = block + j0;
        float *d = rows + j0 * C;
        if (f) {
            fv = _mm256_loadu_ps(f + j0);
            fnz = _mm256_cmp_ps(fv, _mm256_setzero_ps(), _CMP_NEQ_UQ);
        }
        if (w) {
            for (c = 0; c < 8; c++)
                r[c] = c < w ? ssm_grad_p8(_mm256_loadu_ps(b + (cw + c) * T), f, fv, fnz)
                             : _mm256_setzero_ps();
            ssm_tr8x8_ps(r);
            for (k = 0; k < 8; k++) {
                float *dst = d + k * C + cw;
                if (room || (j0 + k) * C + cw + 8 <= n * C) {
                    _mm256_storeu_ps(dst, r[k]);
                } else {
                    _mm256_storeu_ps(last, r[k]);
                    for (c = 0; c < w; c++)
                        dst[c] = last[c];
                }
            }
        }
        for (c0 = 0; c0 < cw; c0 += 8) {
            for (c = 0; c < 8; c++)
                r[c] = ssm_grad_p8(_mm256_loadu_ps(b + (c0 + c) * T), f, fv, fnz);
            ssm_tr8x8_ps(r);
            for (k = 0; k < 8; k++)
                _mm256_storeu_ps(d + k * C + c0, r[k]);
        }
        if (f)
            ssm_rows_label_fixup(d, C, 8, gl + j0, cls + j0);
    }
    for (k = n8; k < n; k++)
        for (c = 0; c < C; c++) {
            float e = block[c * T + k];
            rows[k * C + c] = !f ? e : f[k] != 0 ? f[k] * e : 0.0f;
        }
    if (f)
        ssm_rows_label_fixup(rows + n8 * C, C, n - n8, gl + n8, cls + n8);
}

__attribute__((target("avx"))) static void ssm_block_to_rows_avx_f(
    const float *restrict block, ptrdiff_t T, ptrdiff_t C, ptrdiff_t n, float *restrict rows)
{
    ssm_block_to_rows_avx_f_(block, T, C, n, rows, 0, NULL, NULL, NULL);
}

/* ... into a staging buffer of m pixels with room for 8 more floats than their m C
   (ssm_block_to_rows_streamed). */
__attribute__((target("avx"))) static void ssm_block_to_stage_avx_f(
    const float *restrict block, ptrdiff_t T, ptrdiff_t C, ptrdiff_t m, float *restrict stage)
{
    ssm_block_to_rows_avx_f_(block, T, C, m, stage, 1, NULL, NULL, NULL);
}

/* The two above with the gradient of sparse labels made on the way from a block of
   e = exp(x - m): rows get (f != 0 ? f e : 0) - (cls == c ? gl : 0), what ssm_grad_row
   would have left in the block, without that pass over it (NHWC fused loss+gradient). */
__attribute__((target("avx"))) static void ssm_block_to_rows_grad_avx_f(
    const float *restrict block, ptrdiff_t T, ptrdiff_t C, ptrdiff_t n, float *restrict rows,
    const float *restrict f, const float *restrict gl, const int32_t *restrict cls)
{
    ssm_block_to_rows_avx_f_(block, T, C, n, rows, 0, f, gl, cls);
}

__attribute__((target("avx"))) static void ssm_block_to_stage_grad_avx_f(
    const float *restrict block, ptrdiff_t T, ptrdiff_t C, ptrdiff_t m, float *restrict stage,
    const float *restrict f, const float *restrict gl, const int32_t *restrict cls)
{
    ssm_block_to_rows_avx_f_(block, T, C, m, stage, 1, f, gl, cls);
}

__attribute__((target("avx"))) static void ssm_rows_to_block_avx_d(
    const double *restrict rows, ptrdiff_t C, ptrdiff_t n, double *restrict block, ptrdiff_t T)
{
    ptrdiff_t j0, c0, c, k, n4 = n & ~(ptrdiff_t)3;
    for (j0 = 0; j0 < n4; j0 += 4)
        for (c0 = 0; c0 < C; c0 += 4) {
            ptrdiff_t w = C - c0 < 4 ? C - c0 : 4;
            __m256d r[4];
            if (w == 4) {
                for (k = 0; k < 4; k++)
                    r[k] = _mm256_loadu_pd(rows + (j0 + k) * C + c0);
            } else {
                __m256i m = _mm256_loadu_si256((const __m256i *)(ssm_mask64 + 4 - w));
                for (k = 0; k < 4; k++)
                    r[k] = _mm256_maskload_pd(rows + (j0 + k) * C + c0, m);
            }
            ssm_tr4x4_pd(r);
            for (c = 0; c < w; c++)
                _mm256_storeu_pd(block + (c0 + c) * T + j0, r[c]);
        }
    for (k = n4; k < n; k++)
        for (c = 0; c < C; c++)
            block[c * T + k] = rows[k * C + c];
}

__attribute__((target("avx"))) static void ssm_block_to_rows_avx_d(
    const double *restrict block, ptrdiff_t T, ptrdiff_t C, ptrdiff_t n, double *restrict rows)
{
    ptrdiff_t j0, c0, c, k, n4 = n & ~(ptrdiff_t)3, cw = C & ~(ptrdiff_t)3, w = C - cw;
    __m256d r[4];
    double last[4];
    for (j0 = 0; j0 < n4; j0 += 4) {
        if (w) {  /* as in the float version: 4 wide, first, spilling into later pixels */
            for (c = 0; c < 4; c++)
                r[c] = c < w ? _mm256_loadu_pd(block + (cw + c) * T + j0) : _mm256_setzero_pd();
            ssm_tr4x4_pd(r);
            for (k = 0; k < 4; k++) {
                double *dst = rows + (j0 + k) * C + cw;
                if ((j0 + k) * C + cw + 4 <= n * C) {
                    _mm256_storeu_pd(dst, r[k]);
                } else {
                    _mm256_storeu_pd(last, r[k]);
                    for (c = 0; c < w; c++)
                        dst[c] = last[c];
                }
            }
        }
        for (c0 = 0; c0 < cw; c0 += 4) {
            for (c = 0; c < 4; c++)
                r[c] = _mm256_loadu_pd(block + (c0 + c) * T + j0);
            ssm_tr4x4_pd(r);
            for (k = 0; k < 4; k++)
                _mm256_storeu_pd(rows + (j0 + k) * C + c0, r[k]);
        }
    }
    for (k = n4; k < n; k++)
        for (c = 0; c < C; c++)
            rows[k * C + c] = block[c * T + k];
}

/* The CPU the code runs on has AVX (the baseline clone may run on one). */
static inline int ssm_cpu_has_avx(void)
{
    return __builtin_cpu_supports("avx");
}

/* ... and AVX-512F (non-temporal stores 64 bytes wide). */
static inline int ssm_cpu_has_avx512(void)
{
    return __builtin_cpu_supports("avx512f");
}

/* ... and AVX2 (256-bit integer compares). */
static inline int ssm_cpu_has_avx2(void)
{
    return __builtin_cpu_supports("avx2");
}

/* One row of the fused gradient for sparse labels, float, sent to memory by
   non-temporal stores as it is computed: dst[j] = (f != 0 ? f e : 0) - (cls == c ? gl : 0),
   the operations of ssm_grad_row (no contraction: the same bits). The row of e stays
   in scratch; without this the row was computed into scratch and copied out by
   ssm_stream_row, a second pass over it. 256 bits wide on AVX-512 CPUs too: a 512-bit
   version (masked multiply and subtract, 64-byte streamed stores) made the VOC fused pass
   11% slower on Zen 4 (A/B, 1 thread) with a head of up to 15 plain stores, and took the
   same time as this one with the head streamed as here: the sweep waits on its stores
   (sent to scratch instead of memory, VOC fused 1 thread took a third less time).
   Sixteen pixels (one 64-byte line, two stores) a pass: VOC fused 7.32 -> 7.08
   instructions per element (callgrind, AVX2 clone). The head up to a 32-byte boundary
   and the tail as in ssm_stream_head / ssm_stream_tail (see there). */
SSM_INLINE float ssm_grad_sparse_one(const float *e, const float *f, const float *gl,
                                     const int32_t *cls, int32_t c, ptrdiff_t j)
{
    float g = gl[j];
    return (f[j] != 0 ? f[j] * e[j] : 0.0f) - (cls[j] == c ? g : 0.0f);
}

/* ssm_grad_sparse_one for pixels j to j + 7, as a vector (cv: c in every lane) */
__attribute__((target("avx2"))) static inline __m256 ssm_grad_sparse_8(
    const float *e, const float *f, const float *gl, const int32_t *cls, __m256i cv, ptrdiff_t j)
{
    __m256 fv = _mm256_loadu_ps(f + j);
    __m256 p = _mm256_and_ps(_mm256_mul_ps(fv, _mm256_loadu_ps(e + j)),
                             _mm256_cmp_ps(fv, _mm256_setzero_ps(), _CMP_NEQ_UQ));
    __m256 at = _mm256_castsi256_ps(
        _mm256_cmpeq_epi32(_mm256_loadu_si256((const __m256i *)(cls + j)), cv));
    return _mm256_sub_ps(p, _mm256_and_ps(at, _mm256_loadu_ps(gl + j)));
}

/* ... for pixels j to j + 3 (cv: c in every lane) */
__attribute__((target("avx2"))) static inline __m128 ssm_grad_sparse_4(
    const float *e, const float *f, const float *gl, const int32_t *cls, __m128i cv, ptrdiff_t j)
{
    __m128 fv = _mm_loadu_ps(f + j);
    __m128 p = _mm_and_ps(_mm_mul_ps(fv, _mm_loadu_ps(e + j)), _mm_cmpneq_ps(fv, _mm_setzero_ps()));
    __m128 at = _mm_castsi128_ps(_mm_cmpeq_epi32(_mm_loadu_si128((const __m128i *)(cls + j)), cv));
    return _mm_sub_ps(p, _mm_and_ps(at, _mm_loadu_ps(gl + j)));
}

__attribute__((target("avx2"))) static void ssm_grad_sparse_stream_avx2(
    float *dst, const float *e, const float *f, const float *gl, const int32_t *cls,
    int32_t c, ptrdiff_t n)
{
    ptrdiff_t j = 0;
    const __m256i cv = _mm256_set1_epi32(c);
    for (; j < n && ((uintptr_t)(dst + j) & 15) != 0; j++)
        dst[j] = ssm_grad_sparse_one(e, f, gl, cls, c, j);
    if (j + 4 <= n && ((uintptr_t)(dst + j) & 31) != 0) {
        _mm_stream_ps(dst + j, ssm_grad_sparse_4(e, f, gl, cls, _mm256_castsi256_si128(cv), j));
        j += 4;
    }
    for (; j + 16 <= n; j += 16) {
        _mm256_stream_ps(dst + j, ssm_grad_sparse_8(e, f, gl, cls, cv, j));
        _mm256_stream_ps(dst + j + 8, ssm_grad_sparse_8(e, f, gl, cls, cv, j + 8));
    }
    if (j + 8 <= n) {
        _mm256_stream_ps(dst + j, ssm_grad_sparse_8(e, f, gl, cls, cv, j));
        j += 8;
    }
    if (j + 4 <= n) {
        _mm_stream_ps(dst + j, ssm_grad_sparse_4(e, f, gl, cls, _mm256_castsi256_si128(cv), j));
        j += 4;
    }
    for (; j < n; j++)
        dst[j] = ssm_grad_sparse_one(e, f, gl, cls, c, j);
}

/* xy[j] = x[cls[j] * sx + j], 0 where cls[j] < 0 (row 0 is read instead), float: the
   label's logit, one hardware gather per 8 pixels. gcc 12 does not emit gathers for the
   x86-64-v3/v4 clones (their tuning) and builds each lane from scalar loads instead:
   45 instructions per 8 pixels (VOC loss alone, AVX2 clone: 5.09 -> 4.91 instructions
   per element; A/B on Zen 4, 1 thread, data in L2: 2-4% faster, loss alone and streamed
   fused). Needs (C - 1) * sx + n <= INT32_MAX, as the vector loop it replaces. */
__attribute__((target("avx2"))) static void ssm_gather_labels_avx2(
    const float *x, int32_t sx, const int32_t *cls, float *xy, ptrdiff_t n)
{
    ptrdiff_t j = 0;
    const __m256i zero = _mm256_setzero_si256(), step = _mm256_set1_epi32(8);
    __m256i jv = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i sxv = _mm256_set1_epi32(sx);
    for (; j + 8 <= n; j += 8) {
        __m256i y = _mm256_loadu_si256((const __m256i *)(cls + j));
        __m256i ok = _mm256_cmpgt_epi32(y, _mm256_set1_epi32(-1));
        __m256i off = _mm256_add_epi32(_mm256_mullo_epi32(_mm256_max_epi32(y, zero), sxv), jv);
        __m256 v = _mm256_i32gather_ps(x, off, 4);
        _mm256_storeu_ps(xy + j, _mm256_and_ps(v, _mm256_castsi256_ps(ok)));
        jv = _mm256_add_epi32(jv, step);
    }
    for (; j < n; j++) {
        int32_t y = cls[j];
        float v = x[(y < 0 ? 0 : y) * sx + (int32_t)j];
        xy[j] = y < 0 ? 0.0f : v;
    }
}

/* The first loop of ssm_stage_labels for int64 labels: cls[j] = y where y is in
   [0, top], else -1 where y == ig, else -2 (ig in [0, top] is tested first, as there;
   an ig outside is equal only to labels out of range, so one order serves both).
   gcc's loop packs each 64-bit mask and the labels to 32 bits apart, three packs per
   8 labels (5.3 instructions per label, AVX2 clone); here the selects run in 64-bit
   lanes and one pack ends them (2.4). */
__attribute__((target("avx2"))) static inline __m256i ssm_code_i64_4(
    __m256i y, __m256i sign, __m256i topv, __m256i igv)
{
    __m256i out = _mm256_cmpgt_epi64(_mm256_xor_si256(y, sign), topv);  /* unsigned y > top */
    __m256i c = _mm256_blendv_epi8(y, _mm256_set1_epi64x(-2), out);
    return _mm256_or_si256(c, _mm256_cmpeq_epi64(y, igv));            /* -1 where y == ig */
}

__attribute__((target("avx2"))) static void ssm_code_labels_i64_avx2(
    const int64_t *lab, ptrdiff_t n, int64_t top, int64_t ig, int32_t *cls)
{
    ptrdiff_t j = 0;
    const __m256i sign = _mm256_set1_epi64x(INT64_MIN);
    const __m256i topv = _mm256_set1_epi64x((int64_t)((uint64_t)top ^ (uint64_t)INT64_MIN));
    const __m256i igv = _mm256_set1_epi64x(ig);
    const __m256i low = _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6);  /* each lane's low half */
    for (; j + 8 <= n; j += 8) {
        __m256i a = ssm_code_i64_4(_mm256_loadu_si256((const __m256i *)(lab + j)), sign, topv,
                                   igv);
        __m256i b = ssm_code_i64_4(_mm256_loadu_si256((const __m256i *)(lab + j + 4)), sign,
                                   topv, igv);
        a = _mm256_permutevar8x32_epi32(a, low);
        b = _mm256_permutevar8x32_epi32(b, low);
        _mm256_storeu_si256((__m256i *)(cls + j), _mm256_permute2x128_si256(a, b, 0x20));
    }
    for (; j < n; j++) {
        int64_t y = lab[j];
        cls[j] = y == ig ? -1 : (uint64_t)y <= (uint64_t)top ? (int32_t)y : -2;
    }
}
#endif

/* Bytes per label of a target kind (0: no labels, or soft targets). */
static inline size_t ssm_label_bytes(int kind)
{
    return kind == SSM_U8 ? 1 : kind == SSM_I32 ? 4 : kind == SSM_I64 ? 8 : 0;
}

/* Whether the float sums of exp are the x86-64-v3 clone's hand-written sweep. */
static inline int ssm_float_exp_sweep_v3(void)
{
#if defined(SSM_HAVE_EXPF_T16)
    return ssm_expf_use_v3();
#else
    return ssm_exp_sweep_v3 & 0;  /* no such sweep here */
#endif
}

/* Whether the float kernels' exp is the x86-64-v4 clone's table one (ssm_expf_t16). */
static inline int ssm_float_exp_table(void)
{
#if defined(SSM_HAVE_EXPF_T16)
    return ssm_expf_use_t16();
#else
    return 0;
#endif
}

/* 1: the loss passes give the tiles of sparse labels over two classes to
   ssm_sswl_tile_two (_kernels_impl.h); 0: to ssm_sswl_tile. Set to 0 only by the tests
   (ssm._cpu.two_classes), between calls, to compare the two. */
static int ssm_two_classes = 1;
static long long ssm_two_class_tiles = 0;  /* tiles ssm_sswl_tile_two has run, for tests */

/* The per-dtype kernels: one template, instantiated for float and double (each
   instantiates the label loops of _labels_impl.h for the three label types). */
#define R float
#define SSM_SFX(name) name##_f
#define SSM_EXP ssm_expf_nonpos
#define SSM_LOG ssm_logf_pos
#define SSM_LOG_SUM ssm_logf_sum
#include "_kernels_impl.h"
#undef R
#undef SSM_SFX
#undef SSM_EXP
#undef SSM_LOG
#undef SSM_LOG_SUM
#ifdef SSM_HAVE_EXPF_T16
#define SSM_EXPF_TABLE_ROWS
#include "_expf_table.h"
#define SSM_EXPF_AVX2_ROWS
#include "_expf_avx2.h"
#endif

#define R double
#define SSM_SFX(name) name##_d
#define SSM_EXP ssm_exp_nonpos
#define SSM_LOG ssm_log_pos
#define SSM_LOG_SUM ssm_log_sum
#include "_kernels_impl.h"
#undef R
#undef SSM_SFX
#undef SSM_EXP
#undef SSM_LOG
#undef SSM_LOG_SUM

/* Half-width logits (float16, bfloat16): float tiles, converted on the way in and out. */
#include "_half.h"

/* The compiler this extension was built with, for show_config. */
static inline const char *ssm_compiler(void)
{
#if defined(__clang__)
    return "clang " __clang_version__;
#elif defined(__GNUC__)
    return "gcc " __VERSION__;
#elif defined(_MSC_VER)
    return "MSVC";
#else
    return "unknown";
#endif
}

/* The flags setup.py compiled and linked with (SSM_BUILD_FLAGS), for show_config. */
static inline const char *ssm_build_flags(void)
{
#if defined(SSM_BUILD_FLAGS)
    return SSM_BUILD_FLAGS;
#else
    return "unknown (not built by setup.py)";
#endif
}

/* Which clone the loader picked, for show_config and the tests. */
static inline const char *ssm_simd_path(void)
{
#if defined(SSM_ISA_NAMES) && defined(SSM_FORCE_CLONE)
    return "arch=" SSM_STR(SSM_FORCE_CLONE) " only (SSM_FORCE_CLONE)";
#elif defined(SSM_ISA_NAMES)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("x86-64-v4"))
        return "x86-64-v4 (AVX-512)";
    if (__builtin_cpu_supports("x86-64-v3"))
        return "x86-64-v3 (AVX2)";
    return "x86-64 baseline (SSE2)";
#else
    return "generic (no target clones)";
#endif
}

#endif /* SSM_KERNELS_H */
