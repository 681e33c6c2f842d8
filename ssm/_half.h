/*
 * ssm/_half.h -- half-width logits (float16, bfloat16) on the CPU: the conversions and
 * the tile drivers (_half_impl.h, instantiated once per half type). Included by
 * _kernels.h after the float and double kernels.
 *
 * Design
 * ------
 * a) Storage is 16 bits, arithmetic float32: a half tile is converted into a float32
 *    [C][n] block (strided channels) or [n][C] rows (contiguous rows), the float tile
 *    function of _kernels_impl.h runs on a sub-problem that describes that block (one
 *    tile covering it, outputs in float scratch, stream off), and its outputs are
 *    rounded once to the half type and written out (non-temporal for large outputs, as
 *    the float path does). The math is therefore the float32 path's, bit for bit, on
 *    the widened inputs; the DRAM traffic is half of it.
 *    Outputs are narrowed a channel row at a time into an L1 row that non-temporal
 *    stores copy out (see ssm_stream_u16). Cost: the float tile function is compute
 *    bound (VOC fused loss+grad, one thread: 0.68 ns/element on an L2-resident problem,
 *    0.72 from DRAM), so the widening pass, the narrowing pass and the float blocks'
 *    L1/L2 traffic (about +0.1 ns/element) cost about what half the bytes saves; the
 *    float32 tile size is the fastest for half too (384- and 192-pixel tiles were
 *    slower at C = 21, and so was 1024).
 *    Direct tiles (_half_impl.h, SSM_HSFX(ssm_sswl_tile_direct)): the loss passes of the
 *    common case, strided channels (NCHW) with integer labels and no lens or smoothing,
 *    skip those passes. The max sweep reads the half rows, widens them in registers
 *    into an L1 chunk of floats (the chunks of ssm_max_sumexp_chunked) and keeps the
 *    max; the float sum-of-exp sweep reads the chunk from L1; each output row (the
 *    gradient, the probabilities) is computed from the row of exp in scratch, rounded in
 *    registers and streamed out in one pass. The float operations are the float path's,
 *    in the same order: the bits of the widened path, tested. Callgrind, VOC-like
 *    (1, 21, 256, 256), AVX2 clone, instructions per element: fused float32 7.32,
 *    bfloat16 10.48 -> 8.41, float16 9.32 -> 7.28; the loss alone float32 5.09,
 *    bfloat16 5.98 -> 5.31, float16 5.94 -> 5.25; C = 150, fused: float32 8.22,
 *    bfloat16 10.80 -> 8.59, float16 9.90 -> 7.33. Rounding to bfloat16 is the
 *    difference (integer operations: see ssm_bf16_round8_avx2).
 * b) Per-pixel inputs (weights, d_loss maps) and the small ones (class weights, lenses)
 *    arrive widened to float32 by ssm/_cpu.pyx, so the label pre-pass is the float one;
 *    labels are read in place (offset to the tile's first pixel); soft targets, prob and
 *    dprob are converted per tile like the logits; a loss map goes through a float row.
 * c) Conversions are exact, round to nearest even, with subnormals, inf and NaN
 *    (NaN stays NaN, quieted as F16C does). float16 uses the CPU's F16C instructions
 *    where present (checked at run time, like the AVX transposes: the baseline clone may
 *    run on such a CPU), else a branch-free software version that vectorises; bfloat16
 *    is a shift one way and integer rounding the other, vectorised in every clone.
 *    tests/test_cpu.py checks every float16 bit pattern and the rounding edge cases
 *    against NumPy and ml_dtypes.
 */
#ifndef SSM_HALF_H
#define SSM_HALF_H

typedef union { uint32_t u; float f; } ssm_f32_bits;

/* float16 bits -> float, exact: the exponent is rebiased by a multiplication by
   2^(127-15), which is exact for subnormal halves too; inf and NaN (quieted) apart. */
SSM_INLINE float ssm_f16_to_f(uint16_t h)
{
    ssm_f32_bits v;
    uint32_t em = h & 0x7fffu;
    v.u = em << 13;
    v.f *= 5.192296858534828e33f;  /* 2^112 */
    if (em >= 0x7c00u)
        v.u = 0x7f800000u | (em << 13) | (em > 0x7c00u ? 0x00400000u : 0u);
    v.u |= (uint32_t)(h & 0x8000u) << 16;
    return v.f;
}

/* float -> float16 bits, round to nearest even. Below 2^-14 (subnormal halves) the
   float addition of 0.5, whose ulp is the half subnormal spacing 2^-24, does the
   rounding; above, the rebiased bits are rounded by adding 0xfff plus the kept lsb.
   2^16 and up (after rounding, 65520 and up) is inf; NaN keeps its top payload bits. */
SSM_INLINE uint16_t ssm_f_to_f16(float f)
{
    ssm_f32_bits v, d;
    uint32_t sign, u, r;
    v.f = f;
    sign = (v.u >> 16) & 0x8000u;
    u = v.u & 0x7fffffffu;
    d.u = u;
    d.f += 0.5f;
    if (u >= 0x47800000u)
        r = u > 0x7f800000u ? 0x7e00u | ((u >> 13) & 0x3ffu) : 0x7c00u;
    else if (u < 0x38800000u)
        r = d.u - 0x3f000000u;
    else
        r = (u + 0xc8000fffu + ((u >> 13) & 1u)) >> 13;  /* 0xc8000000: -112 << 23 */
    return (uint16_t)(sign | r);
}

/* bfloat16 bits -> float: the top half of the float, exact. */
SSM_INLINE float ssm_bf16_to_f(uint16_t h)
{
    ssm_f32_bits v;
    v.u = (uint32_t)h << 16;
    return v.f;
}

/* float -> bfloat16 bits, round to nearest even (overflow rounds to inf); NaN quieted.
   Written as a select of two 32-bit values shifted once: the compiler's AVX2 loop is
   2.3 instructions per element, 2.7 for the earlier two-return form (AVX2 intrinsics
   measured 2.1, and no faster in the AVX-512 clone). */
SSM_INLINE uint16_t ssm_f_to_bf16(float f)
{
    ssm_f32_bits v;
    uint32_t r;
    v.f = f;
    r = v.u + 0x7fffu + ((v.u >> 16) & 1u);
    r = (v.u & 0x7fffffffu) > 0x7f800000u ? v.u | 0x00400000u : r;
    return (uint16_t)(r >> 16);
}

/* Prefetch the n 16-bit elements of the row at h, dist elements on, into L2 (as
   ssm_prefetch_next: the same pixels of the tile after next). */
SSM_INLINE void ssm_prefetch_u16(const uint16_t *h, ptrdiff_t n, ptrdiff_t dist)
{
    ptrdiff_t j;
    uintptr_t ahead = (uintptr_t)h + (uintptr_t)dist * sizeof(uint16_t);
    for (j = 0; j < n; j += 32)
        SSM_PREFETCH((const void *)(ahead + (uintptr_t)j * sizeof(uint16_t)));
}

/* 2: the drivers convert float16 by F16C where the CPU has it, and the direct tiles
   (_half_impl.h) use their AVX-512 functions where the CPU has AVX-512 BW, else their
   AVX2 ones; 1: the AVX2 ones only; 0: the scalar loops, vectorised by the
   compiler (the widening of bfloat16 elsewhere always is: in the AVX-512 clone its loops
   were as fast as AVX-512 intrinsics, in the AVX2 one within 2% of AVX2 intrinsics). Set
   to 0 only by the tests (ssm._cpu.half_isa), between calls, to check both paths here. */
static int ssm_half_isa = 2;

#if defined(SSM_ISA_NAMES)
#define SSM_F16C 1
/* The CPU has F16C (vcvtph2ps, vcvtps2ph), and the drivers may use it. */
static inline int ssm_cpu_has_f16c(void)
{
    return ssm_half_isa && __builtin_cpu_supports("f16c");
}

__attribute__((target("avx,f16c"))) static void ssm_f16_to_f_row_f16c(
    const uint16_t *restrict h, float *restrict f, ptrdiff_t n)
{
    ptrdiff_t j = 0;
    for (; j + 8 <= n; j += 8)
        _mm256_storeu_ps(f + j, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + j))));
    for (; j < n; j++)
        f[j] = ssm_f16_to_f(h[j]);
}

__attribute__((target("avx,f16c"))) static void ssm_f_to_f16_row_f16c(
    const float *restrict f, uint16_t *restrict h, ptrdiff_t n)
{
    ptrdiff_t j = 0;
    for (; j + 8 <= n; j += 8)
        _mm_storeu_si128((__m128i *)(h + j),
                         _mm256_cvtps_ph(_mm256_loadu_ps(f + j), _MM_FROUND_TO_NEAREST_INT));
    for (; j < n; j++)
        h[j] = ssm_f_to_f16(f[j]);
}

/* ---- output rows narrowed in registers, streamed 16 bytes at a time ----------------
 * One class row of a direct tile's output (see SSM_HSFX(ssm_sswl_tile_direct)) from the
 * row of e = exp(x - m) in scratch: the probabilities e r (grad 0) or the gradient of
 * ssm_grad_sparse_one (grad 1, r = the factor f), each rounded to the half type as it
 * is computed and sent to memory by 16-byte non-temporal stores, one pass over the row.
 * 16-byte stores, not 32: the rows of numpy's large arrays start 16 bytes off a 32-byte
 * boundary, and a plain-stored head in a line the loop streams was 25% slower (see
 * ssm_stream_u16). bfloat16 rounds by integer operations, the bits of ssm_f_to_bf16:
 * not by AVX512-BF16's vcvtneps2bf16, which flushes subnormal floats to zero (a small
 * gradient would change bits). float16 by vcvtps2ph, round to nearest even, exact. */
/* Eight floats -> bfloat16 bits in the high halves of their lanes, as ssm_f_to_bf16 */
__attribute__((target("avx2"))) static inline __m256i ssm_bf16_round8_avx2(__m256 v)
{
    const __m256i u = _mm256_castps_si256(v);
    __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff),
                                                     _mm256_and_si256(_mm256_srli_epi32(u, 16),
                                                                      _mm256_set1_epi32(1))));
    __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
    return _mm256_blendv_epi8(r, _mm256_or_si256(u, _mm256_set1_epi32(0x00400000)),
                              _mm256_castps_si256(nan));
}

/* The gradient (grad 1: f = r, ssm_grad_sparse_one's operations, the same bits) or the
   probabilities e r (grad 0) of the eight pixels at j. */
__attribute__((target("avx2"))) static inline __attribute__((always_inline)) __m256
ssm_half_out8_avx2(const float *e, const float *r, const float *gl, const int32_t *cls,
                   __m256i cv, ptrdiff_t j, int grad)
{
    __m256 rv = _mm256_loadu_ps(r + j), ev = _mm256_loadu_ps(e + j), p, at;
    if (!grad)
        return _mm256_mul_ps(ev, rv);
    p = _mm256_and_ps(_mm256_mul_ps(rv, ev), _mm256_cmp_ps(rv, _mm256_setzero_ps(), _CMP_NEQ_UQ));
    at = _mm256_castsi256_ps(
        _mm256_cmpeq_epi32(_mm256_loadu_si256((const __m256i *)(cls + j)), cv));
    return _mm256_sub_ps(p, _mm256_and_ps(at, _mm256_loadu_ps(gl + j)));
}

/* Eight floats -> their half bits (bfloat16 as ssm_f_to_bf16, float16 by vcvtps2ph) */
__attribute__((target("avx2,f16c"))) static inline __attribute__((always_inline)) __m128i
ssm_half_narrow8_avx2(__m256 v, int bf16)
{
    __m256i h;
    if (!bf16)
        return _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT);
    h = _mm256_srli_epi32(ssm_bf16_round8_avx2(v), 16);
    return _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(h, h), 0xd8));
}

__attribute__((target("avx2,f16c"))) static inline __attribute__((always_inline)) void
ssm_half_row_body_avx2(uint16_t *dst, const float *e, const float *r, const float *gl,
                       const int32_t *cls, int32_t c, ptrdiff_t n, int grad, int bf16)
{
    ptrdiff_t j = 0;
    const __m256i cv = _mm256_set1_epi32(c);
    for (; j < n; j++) {  /* up to a 16-byte boundary, and all of a short row */
        float v;
        if (((uintptr_t)(dst + j) & 15) == 0 && j + 16 <= n)
            break;
        v = grad ? ssm_grad_sparse_one(e, r, gl, cls, c, j) : e[j] * r[j];
        dst[j] = bf16 ? ssm_f_to_bf16(v) : ssm_f_to_f16(v);
    }
    for (; j + 16 <= n; j += 16) {
        __m256 v0 = ssm_half_out8_avx2(e, r, gl, cls, cv, j, grad);
        __m256 v1 = ssm_half_out8_avx2(e, r, gl, cls, cv, j + 8, grad);
        if (bf16) {  /* the high halves, in order: pack within lanes, then the lanes */
            __m256i h = _mm256_permute4x64_epi64(
                _mm256_packus_epi32(_mm256_srli_epi32(ssm_bf16_round8_avx2(v0), 16),
                                    _mm256_srli_epi32(ssm_bf16_round8_avx2(v1), 16)), 0xd8);
            _mm_stream_si128((__m128i *)(dst + j), _mm256_castsi256_si128(h));
            _mm_stream_si128((__m128i *)(dst + j + 8), _mm256_extracti128_si256(h, 1));
        } else {
            _mm_stream_si128((__m128i *)(dst + j), _mm256_cvtps_ph(v0, _MM_FROUND_TO_NEAREST_INT));
            _mm_stream_si128((__m128i *)(dst + j + 8),
                             _mm256_cvtps_ph(v1, _MM_FROUND_TO_NEAREST_INT));
        }
    }
    if (j + 8 <= n) {  /* a last 8 streamed too: no plain stores into a line it streams */
        _mm_stream_si128((__m128i *)(dst + j),
                         ssm_half_narrow8_avx2(ssm_half_out8_avx2(e, r, gl, cls, cv, j, grad), bf16));
        j += 8;
    }
    for (; j < n; j++) {
        float v = grad ? ssm_grad_sparse_one(e, r, gl, cls, c, j) : e[j] * r[j];
        dst[j] = bf16 ? ssm_f_to_bf16(v) : ssm_f_to_f16(v);
    }
}

/* The direct tiles may use the AVX2 functions here: the CPU has AVX2 and F16C (every
   AVX2 CPU so far), and ssm_half_isa allows it (0: the portable loops, for the tests). */
static inline int ssm_cpu_has_avx2_f16c(void)
{
    return ssm_half_isa && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
}

/* The four instances: (probabilities, gradient) x (float16, bfloat16); callers check
   ssm_cpu_has_avx2_f16c. */
__attribute__((target("avx2,f16c"))) static void ssm_half_prob_row_avx2_h(
    uint16_t *dst, const float *e, const float *r, ptrdiff_t n)
{
    ssm_half_row_body_avx2(dst, e, r, NULL, NULL, 0, n, 0, 0);
}

__attribute__((target("avx2,f16c"))) static void ssm_half_prob_row_avx2_b(
    uint16_t *dst, const float *e, const float *r, ptrdiff_t n)
{
    ssm_half_row_body_avx2(dst, e, r, NULL, NULL, 0, n, 0, 1);
}

__attribute__((target("avx2,f16c"))) static void ssm_half_grad_row_avx2_h(
    uint16_t *dst, const float *e, const float *f, const float *gl, const int32_t *cls,
    int32_t c, ptrdiff_t n)
{
    ssm_half_row_body_avx2(dst, e, f, gl, cls, c, n, 1, 0);
}

__attribute__((target("avx2,f16c"))) static void ssm_half_grad_row_avx2_b(
    uint16_t *dst, const float *e, const float *f, const float *gl, const int32_t *cls,
    int32_t c, ptrdiff_t n)
{
    ssm_half_row_body_avx2(dst, e, f, gl, cls, c, n, 1, 1);
}

/* SSM_HSFX(ssm_widen_max) by AVX2 (and F16C for float16): the chunk's C rows (x,
   channel stride sx) widened into W[c * n + j] and their max m[j], two rows a pass as
   the float path's max sweep. vmaxps(a, m) is the float path's `a > m ? a : m` (NaN a:
   m), in the same row order: ssm_max_sumexp's max, bit for bit. The rows of the tile
   after next (pf elements on) are prefetched into L2 as each row is read. At C = 150
   (the loss alone, ADE-like, 1 thread) eight pixels through all the rows with the max in
   a register took 7.0-8.9 ms against 3.4-3.7 for this (its rows 32 KiB apart share an L1
   set), and this with every row's prefetches issued first 5.3-5.7. */
__attribute__((target("avx2,f16c"))) static inline __attribute__((always_inline)) __m256
ssm_half_load8_avx2(const uint16_t *h, int bf16)
{
    __m128i v = _mm_loadu_si128((const __m128i *)h);
    if (bf16)
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
    return _mm256_cvtph_ps(v);
}

__attribute__((target("avx2,f16c"))) static inline __attribute__((always_inline)) float
ssm_half_load1(const uint16_t *h, int bf16)
{
    return bf16 ? ssm_bf16_to_f(*h) : ssm_f16_to_f(*h);
}

__attribute__((target("avx2,f16c"))) static inline __attribute__((always_inline)) void
ssm_half_widen_max_body_avx2(const uint16_t *x, ptrdiff_t sx, float *W, ptrdiff_t C,
                             ptrdiff_t n, ptrdiff_t pf, float *m, int bf16)
{
    ptrdiff_t c, j, n8 = n & ~(ptrdiff_t)7;
    ssm_prefetch_u16(x, n, pf);
    for (j = 0; j < n8; j += 8) {
        __m256 w = ssm_half_load8_avx2(x + j, bf16);
        _mm256_storeu_ps(W + j, w);
        _mm256_storeu_ps(m + j, w);
    }
    for (; j < n; j++)
        m[j] = W[j] = ssm_half_load1(x + j, bf16);
    for (c = 1; c + 1 < C; c += 2) {
        const uint16_t *x0 = x + c * sx, *x1 = x0 + sx;
        float *W0 = W + c * n, *W1 = W0 + n;
        ssm_prefetch_u16(x0, n, pf);
        ssm_prefetch_u16(x1, n, pf);
        for (j = 0; j < n8; j += 8) {
            __m256 w0 = ssm_half_load8_avx2(x0 + j, bf16), w1 = ssm_half_load8_avx2(x1 + j, bf16);
            _mm256_storeu_ps(W0 + j, w0);
            _mm256_storeu_ps(W1 + j, w1);
            _mm256_storeu_ps(m + j, _mm256_max_ps(w1, _mm256_max_ps(w0, _mm256_loadu_ps(m + j))));
        }
        for (; j < n; j++) {
            float w0 = ssm_half_load1(x0 + j, bf16), w1 = ssm_half_load1(x1 + j, bf16);
            float v = w0 > m[j] ? w0 : m[j];
            W0[j] = w0;
            W1[j] = w1;
            m[j] = w1 > v ? w1 : v;
        }
    }
    if (c < C) {
        const uint16_t *xc = x + c * sx;
        float *Wc = W + c * n;
        ssm_prefetch_u16(xc, n, pf);
        for (j = 0; j < n8; j += 8) {
            __m256 w = ssm_half_load8_avx2(xc + j, bf16);
            _mm256_storeu_ps(Wc + j, w);
            _mm256_storeu_ps(m + j, _mm256_max_ps(w, _mm256_loadu_ps(m + j)));
        }
        for (; j < n; j++) {
            float w = ssm_half_load1(xc + j, bf16);
            Wc[j] = w;
            m[j] = w > m[j] ? w : m[j];
        }
    }
}

__attribute__((target("avx2,f16c"))) static void ssm_half_widen_max_avx2_h(
    const uint16_t *x, ptrdiff_t sx, float *W, ptrdiff_t C, ptrdiff_t n, ptrdiff_t pf,
    float *m)
{
    ssm_half_widen_max_body_avx2(x, sx, W, C, n, pf, m, 0);
}

__attribute__((target("avx2,f16c"))) static void ssm_half_widen_max_avx2_b(
    const uint16_t *x, ptrdiff_t sx, float *W, ptrdiff_t C, ptrdiff_t n, ptrdiff_t pf,
    float *m)
{
    ssm_half_widen_max_body_avx2(x, sx, W, C, n, pf, m, 1);
}

/* ---- the same row functions for AVX-512 (F and BW) -----------------------------
 * Sixteen pixels a step in one vector, where the AVX2 functions take two of eight: the
 * same float operations in each lane (masks for the ANDs of the compare results: the
 * same bits), half the instructions, and one 32-byte non-temporal store a step after a
 * 16-byte one up to a 32-byte boundary (the rows of numpy's large arrays start 16 bytes
 * off one), where the AVX2 row stores two of 16 bytes. ssm_half_isa 2 chooses them on a
 * CPU that has them. The widening max sweep stays AVX2: a 512-bit one took the same share
 * of the VOC bfloat16 fused pass (perf, Zen 4; it waits on its loads). */
static inline int ssm_cpu_has_avx512bw(void)
{
    return ssm_half_isa >= 2 && __builtin_cpu_supports("avx512f")
        && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("f16c");
}

/* Sixteen floats -> their bfloat16 bits, as ssm_f_to_bf16 (see ssm_bf16_round8_avx2) */
__attribute__((target("avx512f,avx512bw,f16c"))) static inline __m256i ssm_bf16_narrow16_avx512(
    __m512 v)
{
    const __m512i u = _mm512_castps_si512(v);
    __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff),
                                                     _mm512_and_si512(_mm512_srli_epi32(u, 16),
                                                                      _mm512_set1_epi32(1))));
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q),
                              _mm512_or_si512(u, _mm512_set1_epi32(0x00400000)));
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16));  /* vpmovdw: the high halves */
}

/* ssm_half_out8_avx2 for the sixteen pixels at j: f r where r != 0 (a zero-masked
   multiply, the AND of the AVX2 row), minus gl at the label (a masked subtract: where
   it is not the label, p itself, which is p - 0 for every p a product can be) */
__attribute__((target("avx512f,avx512bw,f16c"))) static inline __attribute__((always_inline)) __m512
ssm_half_out16_avx512(const float *e, const float *r, const float *gl, const int32_t *cls,
                      __m512i cv, ptrdiff_t j, int grad)
{
    __m512 rv = _mm512_loadu_ps(r + j), ev = _mm512_loadu_ps(e + j), p;
    if (!grad)
        return _mm512_mul_ps(ev, rv);
    p = _mm512_maskz_mul_ps(_mm512_cmp_ps_mask(rv, _mm512_setzero_ps(), _CMP_NEQ_UQ), rv, ev);
    return _mm512_mask_sub_ps(p, _mm512_cmpeq_epi32_mask(_mm512_loadu_si512(cls + j), cv), p,
                              _mm512_loadu_ps(gl + j));
}

__attribute__((target("avx512f,avx512bw,f16c"))) static inline __attribute__((always_inline)) __m256i
ssm_half_narrow16_avx512(__m512 v, int bf16)
{
    return bf16 ? ssm_bf16_narrow16_avx512(v) : _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT);
}

__attribute__((target("avx512f,avx512bw,f16c"))) static inline __attribute__((always_inline)) void
ssm_half_row_body_avx512(uint16_t *dst, const float *e, const float *r, const float *gl,
                         const int32_t *cls, int32_t c, ptrdiff_t n, int grad, int bf16)
{
    ptrdiff_t j = 0;
    const __m512i cv = _mm512_set1_epi32(c);
    const __m256i cv8 = _mm256_set1_epi32(c);
    int wide;
    for (; j < n; j++) {  /* up to a 16-byte boundary, and all of a short row */
        float v;
        if (((uintptr_t)(dst + j) & 15) == 0 && j + 16 <= n)
            break;
        v = grad ? ssm_grad_sparse_one(e, r, gl, cls, c, j) : e[j] * r[j];
        dst[j] = bf16 ? ssm_f_to_bf16(v) : ssm_f_to_f16(v);
    }
    if (((uintptr_t)(dst + j) & 31) != 0 && j + 24 <= n) {  /* 8 to a 32-byte boundary */
        __m256i h = ssm_half_narrow16_avx512(ssm_half_out16_avx512(e, r, gl, cls, cv, j, grad),
                                             bf16);
        _mm_stream_si128((__m128i *)(dst + j), _mm256_castsi256_si128(h));
        j += 8;
    }
    wide = ((uintptr_t)(dst + j) & 31) == 0;
    for (; j + 16 <= n; j += 16) {
        __m256i h = ssm_half_narrow16_avx512(ssm_half_out16_avx512(e, r, gl, cls, cv, j, grad),
                                             bf16);
        if (wide) {
            _mm256_stream_si256((__m256i *)(dst + j), h);
        } else {
            _mm_stream_si128((__m128i *)(dst + j), _mm256_castsi256_si128(h));
            _mm_stream_si128((__m128i *)(dst + j + 8), _mm256_extracti128_si256(h, 1));
        }
    }
    if (j + 8 <= n) {  /* as the AVX2 row: a last 8 streamed, by its 8-wide functions */
        _mm_stream_si128((__m128i *)(dst + j),
                         ssm_half_narrow8_avx2(ssm_half_out8_avx2(e, r, gl, cls, cv8, j, grad),
                                               bf16));
        j += 8;
    }
    for (; j < n; j++) {
        float v = grad ? ssm_grad_sparse_one(e, r, gl, cls, c, j) : e[j] * r[j];
        dst[j] = bf16 ? ssm_f_to_bf16(v) : ssm_f_to_f16(v);
    }
}

/* The four instances, as the AVX2 ones; callers check ssm_cpu_has_avx512bw (which
   asks for F16C too: the scalar rows' float16 loads). */
__attribute__((target("avx512f,avx512bw,f16c"))) static void ssm_half_prob_row_avx512_h(
    uint16_t *dst, const float *e, const float *r, ptrdiff_t n)
{
    ssm_half_row_body_avx512(dst, e, r, NULL, NULL, 0, n, 0, 0);
}

__attribute__((target("avx512f,avx512bw,f16c"))) static void ssm_half_prob_row_avx512_b(
    uint16_t *dst, const float *e, const float *r, ptrdiff_t n)
{
    ssm_half_row_body_avx512(dst, e, r, NULL, NULL, 0, n, 0, 1);
}

__attribute__((target("avx512f,avx512bw,f16c"))) static void ssm_half_grad_row_avx512_h(
    uint16_t *dst, const float *e, const float *f, const float *gl, const int32_t *cls,
    int32_t c, ptrdiff_t n)
{
    ssm_half_row_body_avx512(dst, e, f, gl, cls, c, n, 1, 0);
}

__attribute__((target("avx512f,avx512bw,f16c"))) static void ssm_half_grad_row_avx512_b(
    uint16_t *dst, const float *e, const float *f, const float *gl, const int32_t *cls,
    int32_t c, ptrdiff_t n)
{
    ssm_half_row_body_avx512(dst, e, f, gl, cls, c, n, 1, 1);
}
#else
/* (no F16C path here: the setting is kept, and read, for ssm._cpu.half_isa alone) */
static inline int ssm_half_isa_setting(void) { return ssm_half_isa; }
#endif

/* Copy n 16-bit elements with non-temporal stores (see ssm_stream_row in
   _kernels_impl.h); ordered by an sfence before the tile ends. The half drivers narrow
   a channel row into an L1 row and stream that. Narrowing straight into 32-byte
   non-temporal stores after a scalar head up to a 32-byte boundary was 25% slower on
   Cityscapes and ADE (numpy aligns large arrays to 16 bytes: plain stores into lines
   being streamed). Streaming the L1 row by 32-byte stores (after a 16-byte head) is
   0.35 instructions per element against this loop's 0.875 (callgrind, VOC, AVX2
   clone), but timed 4-6% slower on ADE (C = 150: 96-pixel rows), in three separate
   A/B runs; VOC and Cityscapes within noise. */
SSM_INLINE void ssm_stream_u16(uint16_t *dst, const uint16_t *src, ptrdiff_t n)
{
#if defined(__SSE2__)
    ptrdiff_t j = 0;
    for (; j < n && ((uintptr_t)(dst + j) & 15) != 0; j++)
        dst[j] = src[j];
    for (; j + 8 <= n; j += 8)
        _mm_stream_si128((__m128i *)(dst + j), _mm_loadu_si128((const __m128i *)(src + j)));
    for (; j < n; j++)
        dst[j] = src[j];
#else
    memcpy(dst, src, (size_t)n * sizeof(uint16_t));
#endif
}

/* Per-tile scratch of a half driver, in bytes: the float tile function's own
   (ssm_scratch_bytes for 4-byte elements: its sub-problems never exceed P's tile), then
   four float [C][tile] blocks (the two inputs, the two outputs), a float row of tile
   pixels (the loss map) and a 16-bit [C][tile] block (streamed outputs), each on a
   64-byte boundary (the carve in _half_impl.h must match). */
static inline size_t ssm_half_scratch_bytes(const ssm_problem *P)
{
    size_t T = (size_t)P->tile, CT = (size_t)P->C * T;
    return ssm_round64(ssm_scratch_bytes(P, sizeof(float))) + 64
         + 4 * ssm_round64(CT * sizeof(float)) + ssm_round64(T * sizeof(float))
         + ssm_round64(CT * sizeof(uint16_t));
}

/* The rest of ssm_max_sumexp (see there) for a direct half tile's widened chunk W
   (C rows of n, pixels j0 on of the tile), its max already in S->xmax: the label's
   logit (one gather per pixel, from the float chunk) and the sum of exp, e stored at e
   (stride se) if e != NULL. The float path's functions, on the same values: the same bits. */
SSM_INLINE void ssm_half_sumexp(const float *restrict W, float *restrict e, ptrdiff_t se,
                                ptrdiff_t C, ptrdiff_t n, ssm_scratch_f *S, ptrdiff_t j0)
{
    ptrdiff_t j;
    const int32_t *restrict cls = S->cls + j0;
    float *restrict xy = S->xlabel + j0, *restrict s = S->sumexp + j0;
    const int32_t n32 = (int32_t)n;  /* C n floats fit a tile's scratch: int32 offsets */
#pragma omp simd
    for (j = 0; j < n; j++) {
        int32_t y = cls[j];
        float v = W[(y < 0 ? 0 : y) * n32 + (int32_t)j];
        xy[j] = y < 0 ? 0.0f : v;
        s[j] = 0;
    }
    if (C <= SSM_SUM_BLOCK)
        ssm_sumexp_rows_f(W, n, e, se, 0, C, n, S->xmax + j0, s, 0);
    else
        ssm_sumexp_blocks_f(W, n, e, se, C, n, S->xmax + j0, s, S->hi + j0, S->lo + j0, 0);
}

#define SSM_HSFX(name) name##_h
#define SSM_H_TO_F ssm_f16_to_f
#define SSM_F_TO_H ssm_f_to_f16
#define SSM_H_F16C 1
#include "_half_impl.h"
#undef SSM_HSFX
#undef SSM_H_TO_F
#undef SSM_F_TO_H
#undef SSM_H_F16C

#define SSM_HSFX(name) name##_b
#define SSM_H_TO_F ssm_bf16_to_f
#define SSM_F_TO_H ssm_f_to_bf16
#define SSM_H_F16C 0
#include "_half_impl.h"
#undef SSM_HSFX
#undef SSM_H_TO_F
#undef SSM_F_TO_H
#undef SSM_H_F16C

/* Element-wise conversions, for the tests: half (bf16: bfloat16, else float16) to float
   (narrow = 0) or back, by the scalar versions (software = 1) or by the path the drivers
   take on this CPU (F16C unless ssm_half_isa is 0). */
static inline void ssm_half_convert(int bf16, int narrow, int software, const void *src,
                                    void *dst, ptrdiff_t n)
{
    const uint16_t *h = (const uint16_t *)src;
    const float *f = (const float *)src;
    ptrdiff_t j;
    if (!software) {
        if (narrow && bf16)
            ssm_narrow_b(f, (uint16_t *)dst, n);
        else if (narrow)
            ssm_narrow_h(f, (uint16_t *)dst, n);
        else if (bf16)
            ssm_widen_b(h, (float *)dst, n);
        else
            ssm_widen_h(h, (float *)dst, n);
        return;
    }
    for (j = 0; j < n; j++) {
        if (narrow)
            ((uint16_t *)dst)[j] = bf16 ? ssm_f_to_bf16(f[j]) : ssm_f_to_f16(f[j]);
        else
            ((float *)dst)[j] = bf16 ? ssm_bf16_to_f(h[j]) : ssm_f16_to_f(h[j]);
    }
}

#endif /* SSM_HALF_H */
