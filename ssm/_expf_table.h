/*
 * ssm/_expf_table.h -- the float exp of the AVX-512 clone: a 16-entry table and a
 * degree-3 polynomial, 7 FMA-pipe operations where ssm_expf_nonpos has 10. Included by
 * _kernels.h (x86-64 gcc builds with target clones only).
 *
 * Why: the float sum-of-exp sweeps (ssm_sumexp_rows: the fused loss+gradient, the loss
 * alone, the probabilities, softmax) are bound by the FMA/MUL pipes on Zen 4 (two of
 * them; adds, shuffles and integer ops run elsewhere), and 512-bit operations take two
 * cycles on them. Zen 4, 1 thread, the tile kernels alternated in one process, VOC-like
 * (8, 21, 1024) float32 in L2: loss alone 7-8% less time, fused and softmax 1-2%.
 * Used where the x86-64-v4 clone runs; the other clones keep ssm_expf_nonpos (an 8-entry
 * AVX2 version with 7 FMA-pipe operations reached only 1.45 ulps; one within 1 ulp
 * needs 8, and saved 10% of the sweep in a microbenchmark: not built).
 *
 * x = (16k + j) ln2/16 + r, |r| <= ln2/32: e^x = 2^k 2^(j/16) e^r. t = x 16/ln2 + 1.5 2^23
 * holds n = 16k + j in its low mantissa bits, so j is the low 4 bits of t's bits: the
 * index of vpermps with no masking. The reduction is the Cody-Waite one of
 * ssm_expf_nonpos (with FMA, x - kf hi is exact: |r| < 2^-5 and both terms are multiples
 * of 2^-29 there, so the result has at most 24 bits).
 * T_j = 2^(j/16) / c as a float carries up to half an ulp of error: the second table
 * holds d_j = ln(T_j) - (j ln2/16 - ln c) (T_j as rounded), subtracted from r (an add),
 * so T_j e^(r - d_j) = 2^(j/16) e^r / c exactly as far as e^(r - d_j) goes.
 * The scale s = T_j 2^(k+64) is built by integer ops: t's bits << 19 give (k << 23) +
 * (j << 19) (the bits of 1.5 2^23 shift out), and the table stores T_j's bits plus
 * 64 << 23 less j << 19.
 * p = 2^-64 c P(r), P(r) = 1 + r + a2 r^2 + a3 r^3 (a relative-error minimax fit of e^r on
 * |r| <= 1.003 ln2/32 by Lawson's iteratively reweighted least squares in float64, a2 and
 * a3 free: 1.6e-9 relative error; benchmarks/fit_expf_table.py recomputes every
 * constant). c = 249/256 keeps p below 1 (relative rounding error of
 * p at most 2^-25 / 0.95, half that of a p above 1, whose rounding cost up to an ulp of a
 * result with a mantissa near 2). The final p s is one rounding: results below FLT_MIN
 * underflow gradually to denormals, as in ssm_expf_nonpos (the 2^-64 in p, the 2^64 in s).
 * Measured over every float in [-104, 0]: 1.052 ulps (ssm_expf_nonpos: 1.048), 0.75 on
 * denormal results; tests/test_exp.py.
 * The scalar ssm_expf_t16 does the same operations (explicit fmaf, a scalar table index;
 * the last product an FMA with 0, so that no caller contracts it with an add):
 * the same bits as the vector code for every argument (tests/test_exp.py).
 * x < -104 gives 0, -inf 0, NaN NaN (max(-104, x) keeps a NaN x; p is NaN).
 */
#ifndef SSM_EXPF_TABLE_H
#define SSM_EXPF_TABLE_H

#include <immintrin.h>
#include <stdint.h>

/* must match: ssm_expf_t16 and ssm_expf_t16_v, and tests/test_exp.py's reading of them */
#define SSM_T16_SHIFTER 12582912.0f         /* 1.5 * 2^23 */
#define SSM_T16_L2E 23.0831203f             /* 16 / ln2 */
#define SSM_T16_HI 0.0433216989f            /* ln2/16 rounded to float */
#define SSM_T16_LO -1.19040888e-10f         /* ln2/16 - SSM_T16_HI */
#define SSM_T16_A3 (0.162109882f * SSM_2M64) /* c a3 */
#define SSM_T16_A2 (0.48634392f * SSM_2M64)  /* c a2 */
#define SSM_T16_A1 (0.97265625f * SSM_2M64)  /* c = 249/256, exact */

/* bits of T_j = 2^(j/16) / c, plus (64 << 23) - (j << 19) */
static const uint32_t ssm_t16_scale[16] __attribute__((aligned(64))) = {
    0x5f839930u, 0x5f816cbdu, 0x5f7f8252u, 0x5f7ddcdeu, 0x5f7c7f6cu, 0x5f7b6d2fu,
    0x5f7aa979u, 0x5f7a37c5u, 0x5f7a1bb5u, 0x5f7a5913u, 0x5f7af3d5u, 0x5f7bf01du,
    0x5f7d523cu, 0x5f7f1eb6u, 0x5f815a3fu, 0x5f8409c1u};

/* d_j = ln(T_j) - (j ln2/16 - ln c), T_j as rounded to float */
static const float ssm_t16_delta[16] __attribute__((aligned(64))) = {
    -3.7252903e-08f, 4.8695231e-08f, -1.44826666e-08f, 5.00225958e-08f,
    -2.72353056e-08f, 3.24092113e-08f, 2.62388067e-09f, -2.65659743e-08f,
    -1.28337314e-08f, -1.14596865e-08f, 8.35414493e-09f, 9.21696408e-09f,
    -3.06893462e-08f, 6.84966439e-09f, 2.41554154e-08f, -2.24034746e-08f};

/* exp(x) for float x <= 0 (or NaN), scalar: ssm_expf_t16_v's operations, one lane. */
__attribute__((target("arch=x86-64-v4"))) static inline float ssm_expf_t16(float x)
{
    union { float f; uint32_t u; } tb, s;
    float t, kf, r, p;
    uint32_t j;
    x = x < -104.0f ? -104.0f : x;
    t = __builtin_fmaf(x, SSM_T16_L2E, SSM_T16_SHIFTER);
    kf = t - SSM_T16_SHIFTER;
    r = __builtin_fmaf(-kf, SSM_T16_HI, x);
    r = __builtin_fmaf(-kf, SSM_T16_LO, r);
    tb.f = t;
    j = tb.u & 15u;
    r = r - ssm_t16_delta[j];
    p = __builtin_fmaf(SSM_T16_A3, r, SSM_T16_A2);
    p = __builtin_fmaf(p, r, SSM_T16_A1);
    p = __builtin_fmaf(p, r, SSM_T16_A1);
    s.u = (tb.u << 19) + ssm_t16_scale[j];
    return __builtin_fmaf(p, s.f, 0.0f);  /* p s, which no caller can contract */
}

/* The same, sixteen lanes. */
__attribute__((target("arch=x86-64-v4"))) static inline __m512 ssm_expf_t16_v(__m512 x)
{
    const __m512 shifter = _mm512_set1_ps(SSM_T16_SHIFTER);
    __m512 t, kf, r, p;
    __m512i tb;
    x = _mm512_max_ps(_mm512_set1_ps(-104.0f), x);  /* this operand order keeps a NaN x */
    t = _mm512_fmadd_ps(x, _mm512_set1_ps(SSM_T16_L2E), shifter);
    kf = _mm512_sub_ps(t, shifter);
    r = _mm512_fnmadd_ps(kf, _mm512_set1_ps(SSM_T16_HI), x);
    r = _mm512_fnmadd_ps(kf, _mm512_set1_ps(SSM_T16_LO), r);
    tb = _mm512_castps_si512(t);
    r = _mm512_sub_ps(r, _mm512_permutexvar_ps(tb, _mm512_load_ps(ssm_t16_delta)));
    p = _mm512_fmadd_ps(_mm512_set1_ps(SSM_T16_A3), r, _mm512_set1_ps(SSM_T16_A2));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(SSM_T16_A1));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(SSM_T16_A1));
    tb = _mm512_add_epi32(_mm512_slli_epi32(tb, 19),
                          _mm512_permutexvar_epi32(tb, _mm512_load_si512(ssm_t16_scale)));
    /* p s as an FMA with 0 (the same rounding): a plain product was contracted with the
       sweep's add of it in some loops and not in others (a pixel's sum then depended on
       where a chunk's tail fell) */
    return _mm512_fmadd_ps(p, _mm512_castsi512_ps(tb), _mm512_setzero_ps());
}

/* Whether the float kernels use this exp: in the AVX-512 clone, that is, on a CPU the
   loader gives the x86-64-v4 clone (the same test as the ifunc's), or in a build forced
   to that clone. Every float exp of a clone is then the same function. */
static inline int ssm_expf_use_t16(void)
{
#if defined(SSM_FORCE_CLONE)
    return __builtin_strcmp(SSM_STR(SSM_FORCE_CLONE), "x86-64-v4") == 0;
#else
    return __builtin_cpu_supports("x86-64-v4");
#endif
}

/* 512 bits wide: a 256-bit version (vpermt2ps for the 16-entry table) made the loss 12%
   slower than ssm_expf_nonpos's 512-bit loops (Zen 4, C harness, 1 thread). */
#define SSM_T16_LANES 16
#define SSM_T16_MASK __mmask16
#define SSM_T16_V __m512
#define SSM_T16_LOAD(k, p) (k == (__mmask16)-1 ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(k, p))
#define SSM_T16_STORE(p, k, v) (k == (__mmask16)-1 ? _mm512_storeu_ps(p, v) : _mm512_mask_storeu_ps(p, k, v))
#define SSM_T16_ADD _mm512_add_ps
#define SSM_T16_SUB _mm512_sub_ps
#define SSM_T16_EXP ssm_expf_t16_v

/* One vector of pixels j.. of ssm_sumexp_rows's loops with this exp: s = (s + e^(x0 - m))
   + e^(x1 - m) (pair; else the first term only), the exps stored in e0 (and e1) if
   store. Under mask k (the last n % lanes pixels: no access past n), the same
   operations. */
#define SSM_T16_STEP(k, j, pair, store)                                                   \
    do {                                                                                  \
        const SSM_T16_V mv_ = SSM_T16_LOAD(k, m + (j));                                   \
        const SSM_T16_V v0_ = SSM_T16_EXP(SSM_T16_SUB(SSM_T16_LOAD(k, x0 + (j)), mv_));   \
        SSM_T16_V acc_ = SSM_T16_ADD(SSM_T16_LOAD(k, s + (j)), v0_);                      \
        if (store)                                                                        \
            SSM_T16_STORE(e0 + (j), k, v0_);                                              \
        if (pair) {                                                                       \
            const SSM_T16_V v1_ = SSM_T16_EXP(SSM_T16_SUB(SSM_T16_LOAD(k, x1 + (j)), mv_)); \
            acc_ = SSM_T16_ADD(acc_, v1_);                                                \
            if (store)                                                                    \
                SSM_T16_STORE(e1 + (j), k, v1_);                                          \
        }                                                                                 \
        SSM_T16_STORE(s + (j), k, acc_);                                                  \
    } while (0)

__attribute__((target("arch=x86-64-v4"), always_inline)) static inline void ssm_sumexp_t16_row(
    const float *restrict x0, const float *restrict x1, float *restrict e0,
    float *restrict e1, const float *restrict m, float *restrict s, ptrdiff_t n,
    const int pair, const int store)
{
    const SSM_T16_MASK all = (SSM_T16_MASK)-1;
    ptrdiff_t j;
    for (j = 0; j + SSM_T16_LANES <= n; j += SSM_T16_LANES)
        SSM_T16_STEP(all, j, pair, store);
    if (j < n) {
        const SSM_T16_MASK k = (SSM_T16_MASK)((1u << (unsigned)(n - j)) - 1u);
        SSM_T16_STEP(k, j, pair, store);
    }
}

/* e[l] = exp((x[l] - m) * it) for l < n: the row sweep of positions' softmax (its loops,
   vectorised by gcc, read the table by gathers: 2.5-4x slower than ssm_expf_nonpos). */
__attribute__((target("arch=x86-64-v4"))) static inline void ssm_expf_t16_scaled(
    const float *restrict x, float *restrict e, float m, float it, ptrdiff_t n)
{
    const __m512 mv = _mm512_set1_ps(m), iv = _mm512_set1_ps(it);
    ptrdiff_t l;
    for (l = 0; l + 16 <= n; l += 16)
        _mm512_storeu_ps(e + l, ssm_expf_t16_v(_mm512_mul_ps(_mm512_sub_ps(
                                    _mm512_loadu_ps(x + l), mv), iv)));
    if (l < n) {
        const __mmask16 k = (__mmask16)((1u << (unsigned)(n - l)) - 1u);
        _mm512_mask_storeu_ps(e + l, k, ssm_expf_t16_v(_mm512_mul_ps(_mm512_sub_ps(
                                            _mm512_maskz_loadu_ps(k, x + l), mv), iv)));
    }
}

#ifdef SSM_HAVE_EXPF_T16  /* in the kernels (not in tests/expf_t16_check.c) */
/* ssm_sumexp_rows for float with this exp (defined below, in the second inclusion). */
__attribute__((target("arch=x86-64-v4"))) static void ssm_sumexp_rows_t16(
    const float *restrict x, ptrdiff_t sx, float *restrict e, ptrdiff_t se, ptrdiff_t c0,
    ptrdiff_t c1, ptrdiff_t n, const float *restrict m, float *restrict s, ptrdiff_t pf);
#endif

#endif /* SSM_EXPF_TABLE_H */

/* Second inclusion, after the float kernels (SSM_EXPF_TABLE_ROWS defined): the sweep over a
   chunk's rows, which uses their prefetch helper. */
#if defined(SSM_EXPF_TABLE_ROWS) && !defined(SSM_EXPF_TABLE_ROWS_H)
#define SSM_EXPF_TABLE_ROWS_H
#include "_sumexp_rows.h"
/* ssm_sumexp_rows for float with this exp: rows c0 <= c < c1 of x (row stride sx), two
   per pass, e (row stride se) if not NULL; pf as there. One call per chunk, so the
   constants are loaded once for all its rows. */
__attribute__((target("arch=x86-64-v4"))) static void ssm_sumexp_rows_t16(
    const float *restrict x, ptrdiff_t sx, float *restrict e, ptrdiff_t se, ptrdiff_t c0,
    ptrdiff_t c1, ptrdiff_t n, const float *restrict m, float *restrict s, ptrdiff_t pf)
{
    SSM_SUMEXP_ROWS_LOOP(ssm_sumexp_t16_row);
}

#endif /* SSM_EXPF_TABLE_ROWS_H */

