/*
 * ssm/_expf_avx2.h -- the float sum-of-exp sweep of the x86-64-v3 (AVX2) clone, written
 * by hand: ssm_expf_nonpos's operations, as gcc compiles them in that clone (the same
 * bits), for two vectors of pixels at a time, interleaved. Included by _kernels.h (x86-64
 * gcc builds with target clones only), twice, as _expf_table.h is.
 *
 * Why: gcc's loop (ssm_sumexp_rows) computes one exp after the other, each a chain of
 * about 16 dependent operations 47 cycles long, and the scheduler runs dry before the next
 * one's independent work is reached: 7.4 cycles per 8 exps on Zen 3, where its 10
 * FMA-pipe operations need 5. Two exps whose steps alternate in program order take 6.5
 * (microbenchmark, rows of L1-resident logits, 21 and 150 classes). The sweep also drops
 * one integer add per exp: the shifter is 1.5 2^23 + 191 instead of 1.5 2^23, so t's bits
 * shifted left by 23 are already 2^(k+64) (ssm_expf_nonpos adds the 191 to them). The two
 * shifters give the same k for every float in [-104, 0] (checked exhaustively: the FMA
 * rounds x log2e + shifter once, and no x of the interval puts it on a tie).
 * gcc contracts the scalar code's p 2^(k+64) with the add of it to the sum where the exp
 * goes to the sum alone (one FMA, one rounding); where it is also stored (e), the product
 * is rounded and then added. So does this sweep. (The product is exact unless it is below
 * FLT_MIN, and a sum that small is on the same 2^-149 grid: the two could differ only on
 * a tie.) tests/test_consistency.py compares this sweep's bits with gcc's loop's.
 * Used where the x86-64-v3 clone runs (a CPU with AVX2 and FMA and without AVX-512, or a
 * build forced to that clone); elsewhere each clone keeps its own loop (the AVX-512 one,
 * ssm_sumexp_rows_t16).
 */
#ifndef SSM_EXPF_AVX2_H
#define SSM_EXPF_AVX2_H

#include <immintrin.h>

#define SSM_V3 __attribute__((target("arch=x86-64-v3")))
#define SSM_V3_SHIFTER 12583103.0f  /* 1.5 * 2^23 + 191 */

/* Whether the float sum-of-exp sweeps are ssm_sumexp_rows_v3: where the x86-64-v3 clone
   runs (the test of the ifunc that picks it), or in a build forced to that clone; never
   in a build without optimisation (setup.py's SSM_DEBUG, -O0), where gcc contracts
   nothing and its loop's bits are not this sweep's. */
static inline int ssm_expf_use_v3(void)
{
    if (!ssm_exp_sweep_v3)
        return 0;
#if !defined(__OPTIMIZE__)
    return 0;
#elif defined(SSM_FORCE_CLONE)
    return __builtin_strcmp(SSM_STR(SSM_FORCE_CLONE), "x86-64-v3") == 0;
#else
    return __builtin_cpu_supports("x86-64-v3") && !__builtin_cpu_supports("x86-64-v4");
#endif
}

/* ssm_sumexp_rows for float in that clone (defined below, in the second inclusion). */
SSM_V3 static void ssm_sumexp_rows_v3(const float *restrict x, ptrdiff_t sx, float *restrict e,
                                      ptrdiff_t se, ptrdiff_t c0, ptrdiff_t c1, ptrdiff_t n,
                                      const float *restrict m, float *restrict s,
                                      ptrdiff_t pf);

#endif /* SSM_EXPF_AVX2_H */

/* Second inclusion, after the float kernels (SSM_EXPF_AVX2_ROWS defined): the sweep, which
   uses their prefetch helper. */
#if defined(SSM_EXPF_AVX2_ROWS) && !defined(SSM_EXPF_AVX2_ROWS_H)
#define SSM_EXPF_AVX2_ROWS_H
#include "_sumexp_rows.h"

/* e^a = pa sa and e^b = pb sb, ssm_expf_nonpos's steps for two vectors in turn; the caller
   multiplies (or multiplies and adds, one FMA). */
SSM_V3 __attribute__((always_inline)) static inline void ssm_expf_v3_x2(
    __m256 a, __m256 b, __m256 *pa, __m256 *sa, __m256 *pb, __m256 *sb)
{
    const __m256 fl = _mm256_broadcast_ss(&ssm_expf_floor), sh = _mm256_set1_ps(SSM_V3_SHIFTER);
    const __m256 l2e = _mm256_set1_ps(1.44269504088896341f);
    const __m256 hi = _mm256_set1_ps(0.693359375f), lo = _mm256_set1_ps(-2.12194440e-4f);
    __m256 ta, tb, ka, kb, ra, rb, qa, qb;
    a = _mm256_max_ps(fl, a);  /* this operand order keeps a NaN */
    b = _mm256_max_ps(fl, b);
    ta = _mm256_fmadd_ps(a, l2e, sh);
    tb = _mm256_fmadd_ps(b, l2e, sh);
    ka = _mm256_sub_ps(ta, sh);
    kb = _mm256_sub_ps(tb, sh);
    ra = _mm256_fnmadd_ps(ka, hi, a);
    rb = _mm256_fnmadd_ps(kb, hi, b);
    ra = _mm256_fnmadd_ps(ka, lo, ra);
    rb = _mm256_fnmadd_ps(kb, lo, rb);
    qa = _mm256_fmadd_ps(_mm256_set1_ps(0.0013843653723597527f * SSM_2M64), ra,
                         _mm256_set1_ps(0.00837415549904108f * SSM_2M64));
    qb = _mm256_fmadd_ps(_mm256_set1_ps(0.0013843653723597527f * SSM_2M64), rb,
                         _mm256_set1_ps(0.00837415549904108f * SSM_2M64));
    qa = _mm256_fmadd_ps(qa, ra, _mm256_set1_ps(0.04166800156235695f * SSM_2M64));
    qb = _mm256_fmadd_ps(qb, rb, _mm256_set1_ps(0.04166800156235695f * SSM_2M64));
    qa = _mm256_fmadd_ps(qa, ra, _mm256_set1_ps(0.16666431725025177f * SSM_2M64));
    qb = _mm256_fmadd_ps(qb, rb, _mm256_set1_ps(0.16666431725025177f * SSM_2M64));
    qa = _mm256_fmadd_ps(qa, ra, _mm256_set1_ps(0.4999999403953552f * SSM_2M64));
    qb = _mm256_fmadd_ps(qb, rb, _mm256_set1_ps(0.4999999403953552f * SSM_2M64));
    qa = _mm256_fmadd_ps(qa, ra, _mm256_set1_ps(1.0f * SSM_2M64));
    qb = _mm256_fmadd_ps(qb, rb, _mm256_set1_ps(1.0f * SSM_2M64));
    *pa = _mm256_fmadd_ps(qa, ra, _mm256_set1_ps(1.0f * SSM_2M64));
    *pb = _mm256_fmadd_ps(qb, rb, _mm256_set1_ps(1.0f * SSM_2M64));
    /* t = 1.5 2^23 + 191 + k: its bits << 23 are those of 2^(k+64) (see above) */
    *sa = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_castps_si256(ta), 23));
    *sb = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_castps_si256(tb), 23));
}

/* Loads and stores of the vectors of pixels j and j + 8 (a and b), under masks ka and kb
   where masked (they keep every access within the first n pixels). */
#define SSM_V3_LD(k, p) (masked ? _mm256_maskload_ps(p, k) : _mm256_loadu_ps(p))
#define SSM_V3_ST(p, k, v) (masked ? _mm256_maskstore_ps(p, k, v) : _mm256_storeu_ps(p, v))

/* Row x over pixels j and j + 8: sa and sb gain e^(x - m) (ma, mb), stored in e if store.
   gcc's contraction: the product rounded and then added where it is stored, else one FMA. */
SSM_V3 __attribute__((always_inline)) static inline void ssm_sumexp_v3_add(
    const float *restrict x, float *restrict e, ptrdiff_t j, __m256 ma, __m256 mb,
    __m256 *sa, __m256 *sb, const int store, const int masked, __m256i ka, __m256i kb)
{
    __m256 pa, qa, pb, qb;
    ssm_expf_v3_x2(_mm256_sub_ps(SSM_V3_LD(ka, x + j), ma),
                   _mm256_sub_ps(SSM_V3_LD(kb, x + j + 8), mb), &pa, &qa, &pb, &qb);
    if (store) {
        const __m256 va = _mm256_mul_ps(pa, qa), vb = _mm256_mul_ps(pb, qb);
        SSM_V3_ST(e + j, ka, va);
        SSM_V3_ST(e + j + 8, kb, vb);
        *sa = _mm256_add_ps(*sa, va);
        *sb = _mm256_add_ps(*sb, vb);
    } else {
        *sa = _mm256_fmadd_ps(pa, qa, *sa);
        *sb = _mm256_fmadd_ps(pb, qb, *sb);
    }
}

/* Row x0 (and x1 if pair) over pixels j and j + 8: s = (s + e^(x0 - m)) + e^(x1 - m), the
   exps stored in e0 (and e1) if store. ssm_sumexp_rows's operations: the same bits. */
SSM_V3 __attribute__((always_inline)) static inline void ssm_sumexp_v3_step(
    const float *restrict x0, const float *restrict x1, float *restrict e0,
    float *restrict e1, const float *restrict m, float *restrict s, ptrdiff_t j,
    const int pair, const int store, const int masked, __m256i ka, __m256i kb)
{
    const __m256 ma = SSM_V3_LD(ka, m + j), mb = SSM_V3_LD(kb, m + j + 8);
    __m256 sa = SSM_V3_LD(ka, s + j), sb = SSM_V3_LD(kb, s + j + 8);
    ssm_sumexp_v3_add(x0, e0, j, ma, mb, &sa, &sb, store, masked, ka, kb);
    if (pair)
        ssm_sumexp_v3_add(x1, e1, j, ma, mb, &sa, &sb, store, masked, ka, kb);
    SSM_V3_ST(s + j, ka, sa);
    SSM_V3_ST(s + j + 8, kb, sb);
}
#undef SSM_V3_LD
#undef SSM_V3_ST

/* One row (pair: two) over the n pixels: 16 at a time, then the last 1-16 under masks. */
SSM_V3 __attribute__((always_inline)) static inline void ssm_sumexp_v3_row(
    const float *restrict x0, const float *restrict x1, float *restrict e0,
    float *restrict e1, const float *restrict m, float *restrict s, ptrdiff_t n,
    const int pair, const int store)
{
    const __m256i all = _mm256_set1_epi32(-1);
    ptrdiff_t j;
    for (j = 0; j + 16 <= n; j += 16)
        ssm_sumexp_v3_step(x0, x1, e0, e1, m, s, j, pair, store, 0, all, all);
    if (j < n) {  /* ssm_mask32 + 8 - r: r lanes of -1, then 0s */
        ptrdiff_t r = n - j, ra = r < 8 ? r : 8, rb = r - ra;
        const __m256i ka = _mm256_loadu_si256((const __m256i *)(ssm_mask32 + 8 - ra));
        const __m256i kb = _mm256_loadu_si256((const __m256i *)(ssm_mask32 + 8 - rb));
        ssm_sumexp_v3_step(x0, x1, e0, e1, m, s, j, pair, store, 1, ka, kb);
    }
}

/* ssm_sumexp_rows for float in the x86-64-v3 clone: rows c0 <= c < c1 of x (row stride
   sx), two per pass, e (row stride se) if not NULL; pf as there. */
SSM_V3 static void ssm_sumexp_rows_v3(const float *restrict x, ptrdiff_t sx, float *restrict e,
                                      ptrdiff_t se, ptrdiff_t c0, ptrdiff_t c1, ptrdiff_t n,
                                      const float *restrict m, float *restrict s, ptrdiff_t pf)
{
    SSM_SUMEXP_ROWS_LOOP(ssm_sumexp_v3_row);
}

#endif /* SSM_EXPF_AVX2_ROWS_H */
