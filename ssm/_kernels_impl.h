/*
 * ssm/_kernels_impl.h -- the per-dtype body of _kernels.h, included once per R
 * (float, double) with SSM_SFX, SSM_EXP, SSM_LOG and SSM_LOG_SUM defined; it includes
 * _labels_impl.h once per label type. Not a standalone header.
 *
 * Core functions work on one tile of n pixels held channel-major: element (c, j) of
 * a block is at ptr[c * stride + j]. Pixels (j) are innermost so every loop over j
 * is a contiguous, vectorisable sweep; the tile's C rows stay in L1/L2 between the
 * sweeps, so DRAM sees each input once and each output once.
 */

/* One thread's scratch for one tile: every array has one meaning. Per pixel j < n: */
typedef struct {
    R *xmax;        /* max_c x[c, j] */
    R *sumexp;      /* sum_c exp(x[c, j] - xmax[j]) */
    R *inv_sum;     /* 1 / sumexp */
    R *log_sum;     /* log(sumexp) */
    R *xlabel;      /* x[cls[j], j], the logit of the label (0 without one) */
    R *weight;      /* dense targets: per-pixel weight w (1 without weights) */
    R *act;         /* labels: w * cw[y]; dense targets: activity 1 or 0 (zero weight);
                       0 where ignored, NaN where the label is out of range */
    R *gscale;      /* gradient scale: grad_scale * d_loss_map (0 without a gradient;
                       unset for the loss alone) */
    R *glabel;      /* labels: gscale * act, subtracted from the gradient at the label */
    R *gfactor;     /* gradient factor f of dx_c = f e_c - ... (see ssm_grad_row) */
    R *asum;        /* dense targets: sum_c A[c, j] */
    R *dot;         /* softmax_bwd: sum_c p dp */
    R *log_t;       /* soft targets, loss SSM_KL: log t_c of the class row being staged */
    int32_t *cls;   /* class index, or -1 (ignored, out of range, dense targets) */
    double *loss;   /* pixel loss */
    double *ax;     /* dense targets: sum_c A[c, j] x[c, j] */
    double *ent;    /* dense targets, loss SSM_KL: sum_c A[c, j] log t_c (0 log 0 = 0) */
    double *hi, *lo;  /* wide accumulator of a class sum (ssm_sum_block_end), C > 32 only */
    /* [C][tile] blocks */
    R *X;           /* rows tiles: the input (logits or prob), transposed */
    R *X2;          /* rows tiles: the second input (dprob or soft targets), transposed */
    R *O;           /* the output, where computed in scratch: rows, or streamed strided */
    R *O2;          /* the second output (prob of the fused loss+gradient), as O */
    R *A;           /* dense targets A[c, j] = w cw_c t_c */
} SSM_SFX(ssm_scratch);

SSM_INLINE char *SSM_SFX(ssm_align)(char *p)
{
    return (char *)(((uintptr_t)p + 63) & ~(uintptr_t)63);
}

/* Cut `buf` (ssm_scratch_bytes long) into the arrays of S; the counts of each kind
   must match ssm_scratch_bytes. */
SSM_INLINE SSM_SFX(ssm_scratch) SSM_SFX(ssm_scratch_carve)(const ssm_problem *P, void *buf)
{
    SSM_SFX(ssm_scratch) S;
    size_t T = (size_t)P->tile, CT = (size_t)P->C * T;
    char *p = SSM_SFX(ssm_align)((char *)buf);
#define SSM_TAKE(field, type, count) \
    (S.field = (type *)p, p = SSM_SFX(ssm_align)(p + (count) * sizeof(type)))
    SSM_TAKE(xmax, R, T);     /* SSM_SCRATCH_PIXEL_R = 13 arrays of R */
    SSM_TAKE(sumexp, R, T);
    SSM_TAKE(inv_sum, R, T);
    SSM_TAKE(log_sum, R, T);
    SSM_TAKE(xlabel, R, T);
    SSM_TAKE(weight, R, T);
    SSM_TAKE(act, R, T);
    SSM_TAKE(gscale, R, T);
    SSM_TAKE(glabel, R, T);
    SSM_TAKE(gfactor, R, T);
    SSM_TAKE(asum, R, T);
    SSM_TAKE(dot, R, T);
    SSM_TAKE(log_t, R, T);
    SSM_TAKE(cls, int32_t, T);
    SSM_TAKE(loss, double, T);  /* SSM_SCRATCH_PIXEL_DOUBLE = 3 arrays of double */
    SSM_TAKE(ax, double, T);
    SSM_TAKE(ent, double, T);
    SSM_TAKE(X, R, CT);         /* SSM_SCRATCH_BLOCKS = 5 blocks */
    SSM_TAKE(X2, R, CT);
    SSM_TAKE(O, R, CT);
    SSM_TAKE(O2, R, CT);
    SSM_TAKE(A, R, CT);
    S.hi = S.lo = NULL;  /* only sums over more than one block use them */
    if (P->C > SSM_SUM_BLOCK) {
        SSM_TAKE(hi, double, T);
        SSM_TAKE(lo, double, T);
    }
#undef SSM_TAKE
    return S;
}

/* ---- moving tiles between the arrays and channel-major blocks ---------------- */

/* Channel-major view of tile input `src`: in place for strided channels, else the
   rows are transposed into `scratch`. Returns the block; *stride its channel stride. */
SSM_INLINE const R *SSM_SFX(ssm_load)(const ssm_problem *P, const R *src, ptrdiff_t base,
                                      ptrdiff_t n, R *scratch, ptrdiff_t *stride)
{
    ptrdiff_t C = P->C, T = P->tile, c, j;
    if (P->inner > 1) {
        *stride = P->inner;
        return src + base;
    }
    src += base;
    *stride = T;
#if defined(SSM_AVX_TRANSPOSE)
    if (ssm_cpu_has_avx()) {
        SSM_SFX(ssm_rows_to_block_avx)(src, C, n, scratch, T);
        return scratch;
    }
#endif
    for (j = 0; j < n; j++)
        for (c = 0; c < C; c++)
            scratch[c * T + j] = src[j * C + c];
    return scratch;
}

/* Where a tile output is computed: in place for strided channels, else in scratch
   (rows, or strided outputs that ssm_store streams out). */
SSM_INLINE R *SSM_SFX(ssm_target_block)(const ssm_problem *P, R *dst, ptrdiff_t base,
                                        R *scratch, ptrdiff_t *stride)
{
    if (P->inner > 1 && !P->stream) {
        *stride = P->inner;
        return dst + base;
    }
    *stride = P->tile;
    return scratch;
}

#if defined(SSM_AVX_TRANSPOSE)
/* The head and the tail of a streamed row, for the functions below: non-temporal stores
   of 16 and 32 bytes up to the first `align`-byte boundary (32 or 64) and after the last
   one, the elements one by one only before the first 16-byte boundary and after the last
   (rows of an array 4-byte aligned but not 16). A numpy output is 16 bytes off a line,
   and plain stores into a line whose other bytes are streamed cost a read of the line
   and its eviction (the gradient rows' head was 4 plain stores, the softmax rows' 12:
   1 thread, Zen 4, A/B min-of-calls: VOC fused 3-10% faster, ADE 12-15%, Cityscapes 4%,
   VOC softmax 4%; ADE's 96-pixel tile rows have the most edges). head returns the first
   pixel at the boundary (or n); tail starts at pixel j, where the wide stores stopped.
   With s2 the row is src * s2 (ssm_stream_scaled_*), else src. */
typedef R SSM_SFX(ssm_v16) __attribute__((vector_size(16), aligned(sizeof(R))));
typedef R SSM_SFX(ssm_v32) __attribute__((vector_size(32), aligned(sizeof(R))));
typedef R SSM_SFX(ssm_v64) __attribute__((vector_size(64), aligned(sizeof(R))));

__attribute__((target("avx"))) static inline void SSM_SFX(ssm_stream_16)(
    R *dst, const R *src, const R *s2, ptrdiff_t j)
{
    SSM_SFX(ssm_v16) v = *(const SSM_SFX(ssm_v16) *)(src + j);
    if (s2)
        v = v * *(const SSM_SFX(ssm_v16) *)(s2 + j);
    _mm_stream_si128((__m128i *)(dst + j), (__m128i)v);
}

__attribute__((target("avx"))) static inline void SSM_SFX(ssm_stream_32)(
    R *dst, const R *src, const R *s2, ptrdiff_t j)
{
    SSM_SFX(ssm_v32) v = *(const SSM_SFX(ssm_v32) *)(src + j);
    if (s2)
        v = v * *(const SSM_SFX(ssm_v32) *)(s2 + j);
    _mm256_stream_si256((__m256i *)(dst + j), (__m256i)v);
}

__attribute__((target("avx"))) static inline ptrdiff_t SSM_SFX(ssm_stream_head)(
    R *dst, const R *src, const R *s2, ptrdiff_t n, int align)
{
    ptrdiff_t j = 0, q = 16 / (ptrdiff_t)sizeof(R);
    for (; j < n && ((uintptr_t)(dst + j) & 15) != 0; j++)
        dst[j] = s2 ? src[j] * s2[j] : src[j];
    if (((uintptr_t)(dst + j) & 16) && j + q <= n) {
        SSM_SFX(ssm_stream_16)(dst, src, s2, j);
        j += q;
    }
    if (align == 64 && ((uintptr_t)(dst + j) & 32) && j + 2 * q <= n) {
        SSM_SFX(ssm_stream_32)(dst, src, s2, j);
        j += 2 * q;
    }
    return j;
}

__attribute__((target("avx"))) static inline void SSM_SFX(ssm_stream_tail)(
    R *dst, const R *src, const R *s2, ptrdiff_t j, ptrdiff_t n)
{
    ptrdiff_t q = 16 / (ptrdiff_t)sizeof(R);
    if (((uintptr_t)(dst + j) & 31) == 0 && j + 2 * q <= n) {
        SSM_SFX(ssm_stream_32)(dst, src, s2, j);
        j += 2 * q;
    }
    if (((uintptr_t)(dst + j) & 15) == 0 && j + q <= n) {
        SSM_SFX(ssm_stream_16)(dst, src, s2, j);
        j += q;
    }
    for (; j < n; j++)
        dst[j] = s2 ? src[j] * s2[j] : src[j];
}

/* ssm_stream_row 32 and 64 bytes a store: the 16-byte loop was 1.8 instructions per
   element of the fused pass (callgrind, VOC, AVX2 clone); rows are few and long. */
__attribute__((target("avx"))) static void SSM_SFX(ssm_stream_row_avx)(R *dst, const R *src,
                                                                         ptrdiff_t n)
{
    ptrdiff_t j = SSM_SFX(ssm_stream_head)(dst, src, NULL, n, 32), per = 32 / (ptrdiff_t)sizeof(R);
    for (; j + 2 * per <= n; j += 2 * per) {  /* two a pass: fewer loop instructions */
        _mm256_stream_si256((__m256i *)(dst + j), _mm256_loadu_si256((const __m256i *)(src + j)));
        _mm256_stream_si256((__m256i *)(dst + j + per), _mm256_loadu_si256((const __m256i *)(src + j + per)));
    }
    for (; j + per <= n; j += per)
        _mm256_stream_si256((__m256i *)(dst + j), _mm256_loadu_si256((const __m256i *)(src + j)));
    SSM_SFX(ssm_stream_tail)(dst, src, NULL, j, n);
}

__attribute__((target("avx512f"))) static void SSM_SFX(ssm_stream_row_avx512)(
    R *dst, const R *src, ptrdiff_t n)
{
    ptrdiff_t j = SSM_SFX(ssm_stream_head)(dst, src, NULL, n, 64), per = 64 / (ptrdiff_t)sizeof(R);
    for (; j + 2 * per <= n; j += 2 * per) {  /* two a pass: fewer loop instructions */
        _mm512_stream_si512((__m512i *)(dst + j), _mm512_loadu_si512((const void *)(src + j)));
        _mm512_stream_si512((__m512i *)(dst + j + per), _mm512_loadu_si512((const void *)(src + j + per)));
    }
    for (; j + per <= n; j += per)
        _mm512_stream_si512((__m512i *)(dst + j), _mm512_loadu_si512((const void *)(src + j)));
    SSM_SFX(ssm_stream_tail)(dst, src, NULL, j, n);
}
#endif

/* Copy one row of n elements to memory with non-temporal stores: the lines go to
   DRAM without first being read into the cache, as a plain store would. The widest
   stores the CPU has (checked at run time, as for the transposes). */
SSM_INLINE void SSM_SFX(ssm_stream_row)(R *dst, const R *src, ptrdiff_t n)
{
#if defined(SSM_AVX_TRANSPOSE)
    if (ssm_cpu_has_avx512()) {
        SSM_SFX(ssm_stream_row_avx512)(dst, src, n);
        return;
    }
    if (ssm_cpu_has_avx()) {
        SSM_SFX(ssm_stream_row_avx)(dst, src, n);
        return;
    }
#endif
#if defined(__SSE2__)
    ptrdiff_t j = 0, per = 16 / (ptrdiff_t)sizeof(R);
    for (; j < n && ((uintptr_t)(dst + j) & 15) != 0; j++)
        dst[j] = src[j];
    for (; j + per <= n; j += per)
        _mm_stream_si128((__m128i *)(dst + j), _mm_loadu_si128((const __m128i *)(src + j)));
    for (; j < n; j++)
        dst[j] = src[j];
#else
    memcpy(dst, src, (size_t)n * sizeof(R));
#endif
}

/* Row c of a tile's output block is final. A strided output that is streamed
   (P->stream) goes out now, while the row is in L1; the sfence in ssm_store
   orders these stores. Other outputs are left to ssm_store. */
SSM_INLINE void SSM_SFX(ssm_row_done)(const ssm_problem *P, R *dst, ptrdiff_t base, ptrdiff_t c,
                                      ptrdiff_t n, const R *row)
{
    if (P->inner > 1 && P->stream)
        SSM_SFX(ssm_stream_row)(dst + base + c * P->inner, row, n);
}

#if defined(SSM_AVX_TRANSPOSE)
/* dst[j] = src[j] * r[j] with non-temporal stores 32 / 64 bytes wide (GCC vector types,
   so one body serves float and double). */

__attribute__((target("avx"))) static void SSM_SFX(ssm_stream_scaled_avx)(
    R *dst, const R *src, const R *r, ptrdiff_t n)
{
    ptrdiff_t j = SSM_SFX(ssm_stream_head)(dst, src, r, n, 32), per = 32 / (ptrdiff_t)sizeof(R);
    for (; j + per <= n; j += per) {
        SSM_SFX(ssm_v32) v = *(const SSM_SFX(ssm_v32) *)(src + j)
                           * *(const SSM_SFX(ssm_v32) *)(r + j);
        _mm256_stream_si256((__m256i *)(dst + j), (__m256i)v);
    }
    SSM_SFX(ssm_stream_tail)(dst, src, r, j, n);
}

__attribute__((target("avx512f"))) static void SSM_SFX(ssm_stream_scaled_avx512)(
    R *dst, const R *src, const R *r, ptrdiff_t n)
{
    ptrdiff_t j = SSM_SFX(ssm_stream_head)(dst, src, r, n, 64), per = 64 / (ptrdiff_t)sizeof(R);
    for (; j + per <= n; j += per) {
        SSM_SFX(ssm_v64) v = *(const SSM_SFX(ssm_v64) *)(src + j)
                           * *(const SSM_SFX(ssm_v64) *)(r + j);
        _mm512_stream_si512((__m512i *)(dst + j), (__m512i)v);
    }
    SSM_SFX(ssm_stream_tail)(dst, src, r, j, n);
}
#endif

/* Row c of an output is row[j] * r[j] (probabilities from exp and 1/s): into out_row
   (which may be row itself), then ssm_row_done. A streamed strided output on a CPU
   with AVX gets the products by non-temporal stores directly, out_row untouched: one
   pass over the row instead of two (callgrind, VOC softmax, AVX2 clone: -0.5
   instructions per element). */
SSM_INLINE void SSM_SFX(ssm_scaled_row_done)(const ssm_problem *P, R *dst, ptrdiff_t base,
                                             ptrdiff_t c, ptrdiff_t n, const R *row,
                                             const R *restrict r, R *out_row)
{
    ptrdiff_t j;
#if defined(SSM_AVX_TRANSPOSE)
    if (P->inner > 1 && P->stream && ssm_cpu_has_avx()) {
        if (ssm_cpu_has_avx512())
            SSM_SFX(ssm_stream_scaled_avx512)(dst + base + c * P->inner, row, r, n);
        else
            SSM_SFX(ssm_stream_scaled_avx)(dst + base + c * P->inner, row, r, n);
        return;
    }
#endif
#pragma omp simd
    for (j = 0; j < n; j++)
        out_row[j] = row[j] * r[j];
    SSM_SFX(ssm_row_done)(P, dst, base, c, n, out_row);
}

#if defined(SSM_AVX_TRANSPOSE)
/* A tile's channel-major block back to rows (NHWC, (N, C)) by non-temporal stores, for a
   streamed output (P->stream): 64 bytes of pixels at a time (16 float, 8 double: 64 C
   bytes of rows, whole lines where the output starts on a line; a NumPy array is often
   16 bytes off one, and consecutive groups then share a line, which the write-combining
   buffer joins) are transposed into a staging buffer in L1, then streamed out by
   ssm_stream_row. Plain stores read every line of the output into the cache
   first: a third more memory traffic than the bytes written. The same values, moved.
   The buffer is 4 KiB aligned, so that up to 64 classes it lies in one page: the
   transposes' unaligned 32-byte stores and ssm_stream_row's loads never straddle a page
   boundary there. One that did cost 15-25% of an NHWC fused pass (Zen 3, 1 thread, VOC:
   the stack placed the buffer across a page in some processes and not in others).
   Zen 3, NHWC 8x21x256x256 float32, fused, streamed / plain time, alternating in one
   process: 0.93 at 1 thread, 0.97 at 2; 8x150x256x256: 0.88 and 0.94. Out of line: inlined,
   the buffer's alignment made every tile call of its caller realign the stack to 4 KiB
   (the NCHW loss alone 1-3% slower, ab_builds.py, 7-9 rounds). */
#define SSM_ROWS_STAGE 4096  /* elements: C <= 256 float, 512 double, else plain stores */
SSM_NOINLINE void SSM_SFX(ssm_block_to_rows_streamed)(const R *block, ptrdiff_t T, ptrdiff_t C,
                                                    ptrdiff_t n, R *rows, const float *f,
                                                    const float *gl, const int32_t *cls)
{
    R stage[SSM_ROWS_STAGE + 8] __attribute__((aligned(4096)));
    ptrdiff_t j0, m, q = 64 / (ptrdiff_t)sizeof(R);
    for (j0 = 0; j0 < n; j0 += m) {
        m = n - j0 < q ? n - j0 : q;
        if (sizeof(R) == sizeof(float) && f)  /* the gradient made on the way (float only) */
            ssm_block_to_stage_grad_avx_f((const float *)block + j0, T, C, m, (float *)stage,
                                          f + j0, gl + j0, cls + j0);
        else if (sizeof(R) == sizeof(float))
            ssm_block_to_stage_avx_f((const float *)block + j0, T, C, m, (float *)stage);
        else
            SSM_SFX(ssm_block_to_rows_avx)(block + j0, T, C, m, stage);
        SSM_SFX(ssm_stream_row)(rows + j0 * C, stage, m * C);
    }
    _mm_sfence();
}
#endif

/* Whether a rows-layout tile's sparse-label gradient is made on its way out of the block
   (ssm_store_) instead of by ssm_grad_row in the block first: float, a CPU
   with AVX. */
SSM_INLINE int SSM_SFX(ssm_rows_grad_on_store)(const ssm_problem *P)
{
#if defined(SSM_AVX_TRANSPOSE)
    return P->inner == 1 && sizeof(R) == sizeof(float) && ssm_cpu_has_avx();
#else
    (void)P;
    return 0;
#endif
}

/* Finish a tile's output block: rows are transposed back to the array (streamed where
   P->stream: ssm_block_to_rows_streamed); streamed strided rows (sent by ssm_row_done)
   are ordered before the parallel region ends. With f (NULL or not at each call; not
   NULL only where ssm_rows_grad_on_store), the block holds e and the rows get the
   gradient ssm_grad_row would have made from e, f (gfactor), gl (glabel) and cls, made
   as they are transposed (ssm_block_to_rows_grad_avx_f): the same bits, one pass over
   the block fewer (Zen 3, NHWC fused: 0.93-0.94x the time, VOC-, ADE- and
   Cityscapes-like; benchmarks/results/2026-12-01-amd-epyc-zen3-avx2-session14/). */
SSM_INLINE void SSM_SFX(ssm_store_)(const ssm_problem *P, R *dst, ptrdiff_t base, ptrdiff_t n,
                                    const R *block, const R *f, const R *gl,
                                    const int32_t *cls)
{
    ptrdiff_t C = P->C, T = P->tile, c, j;
    if (P->inner > 1) {
#if defined(__SSE2__)
        if (P->stream)
            _mm_sfence();
#endif
        return;
    }
    dst += base;
#if defined(SSM_AVX_TRANSPOSE)
    if (ssm_cpu_has_avx()) {
        if (P->stream && C <= SSM_ROWS_STAGE / (64 / (ptrdiff_t)sizeof(R))) {
            SSM_SFX(ssm_block_to_rows_streamed)(block, T, C, n, dst, (const float *)f,
                                                (const float *)gl, cls);
            return;
        }
        if (sizeof(R) == sizeof(float) && f)
            ssm_block_to_rows_grad_avx_f((const float *)block, T, C, n, (float *)dst,
                                         (const float *)f, (const float *)gl, cls);
        else
            SSM_SFX(ssm_block_to_rows_avx)(block, T, C, n, dst);
        return;
    }
#endif
    (void)gl;
    (void)cls;
    if (f)  /* ssm_rows_grad_on_store asks for AVX */
        SSM_UNREACHABLE();
    for (j = 0; j < n; j++)
        for (c = 0; c < C; c++)
            dst[j * C + c] = block[c * T + j];
}

SSM_INLINE void SSM_SFX(ssm_store)(const ssm_problem *P, R *dst, ptrdiff_t base, ptrdiff_t n,
                                   const R *block)
{
    SSM_SFX(ssm_store_)(P, dst, base, n, block, NULL, NULL, NULL);
}

/* Strided channels: a tile reads C row segments of n pixels, `inner` apart: more
   concurrent streams than the hardware prefetchers follow. While row c of this tile
   is being worked on, ask for row c of the tile after next (pixels 2n on) into L2
   (locality 2): prefetching into L1 evicted the working tile and cost 15-25%, one
   tile ahead left less time for the lines to arrive (A/B, 2026-11-23). Prefetches
   never fault; the address is formed as an integer, since it may lie past the end
   of the array. `dist` is how far ahead, in elements: 2n for a whole tile row
   (ssm_rows_ahead; 0 where the hardware prefetchers do better); for a rows layout's
   block in scratch, the distance that maps its row c onto the c-th segment of the
   next tile's logits (ssm_next_tile_ahead); a caller working on part of a tile passes
   the whole tile's distance. */
SSM_INLINE void SSM_SFX(ssm_prefetch_next)(const R *row, ptrdiff_t n, ptrdiff_t dist)
{
    ptrdiff_t j;
    uintptr_t ahead = (uintptr_t)row + (uintptr_t)dist * sizeof(R);
    if (!dist)
        return;
    /* four lines a pass: the loop's own instructions were 0.25 per element of a sweep;
       up to three lines past the row are asked for: harmless, and the next tile's */
    for (j = 0; j < n; j += 4 * 64 / (ptrdiff_t)sizeof(R)) {
        SSM_PREFETCH((const void *)(ahead + (uintptr_t)j * sizeof(R)));
        SSM_PREFETCH((const void *)(ahead + (uintptr_t)j * sizeof(R) + 64));
        SSM_PREFETCH((const void *)(ahead + (uintptr_t)j * sizeof(R) + 128));
        SSM_PREFETCH((const void *)(ahead + (uintptr_t)j * sizeof(R) + 192));
    }
}

/* ---- per-pixel class sums --------------------------------------------------------
 * A sum over C classes (sum of exp, sum_c p dp, sum_c A_c) added up in R one row at a
 * time loses up to C - 1 units of roundoff; in float, with near-uniform logits, 4e-3
 * relative (36000 ulps) at C = 2^20. Instead each block of SSM_SUM_BLOCK rows is summed
 * in R by the same vectorised row sweeps, and the block sums go into a per-pixel double
 * accumulator: plain for float (each block sum is exact in double; the C/32 additions
 * lose at most C/32 * 2^-53), a compensated pair hi + lo (TwoSum) for double. The sum's
 * error is then that of one block, at most SSM_SUM_BLOCK - 1 units of roundoff for
 * terms of one sign and 1-2 in practice, plus one final rounding, whatever C. With
 * C <= SSM_SUM_BLOCK there is one block: the plain sum, bit for bit, in the code the
 * drivers had before (every segmentation class count). Blocks are fixed by C, so the
 * result stays deterministic. */

/* End of channel block [c0, c1) of a sum whose block partial is `part` (which the
   caller zeroes at each block start). After the last block, `part` is the whole sum. */
SSM_INLINE void SSM_SFX(ssm_sum_block_end)(R *restrict part, double *restrict hi,
                                           double *restrict lo, ptrdiff_t n, ptrdiff_t c0,
                                           ptrdiff_t c1, ptrdiff_t C)
{
    ptrdiff_t j;
    if (C <= SSM_SUM_BLOCK)
        return;
    if (c0 == 0) {
#pragma omp simd
        for (j = 0; j < n; j++) {
            hi[j] = (double)part[j];
            lo[j] = 0.0;
        }
    } else if (sizeof(R) < sizeof(double)) {
#pragma omp simd
        for (j = 0; j < n; j++)
            hi[j] += (double)part[j];
    } else {
#pragma omp simd
        for (j = 0; j < n; j++) {  /* TwoSum: hi + lo gains the exact error of hi + b */
            double a = hi[j], b = (double)part[j], t = a + b, bb = t - a;
            lo[j] += (a - (t - bb)) + (b - bb);
            hi[j] = t;
        }
    }
    if (c1 == C) {
#pragma omp simd
        for (j = 0; j < n; j++)  /* lo is NaN when hi is +-inf (inf - inf): hi alone then */
            part[j] = (R)(hi[j] - hi[j] == 0.0 ? hi[j] + lo[j] : hi[j]);
    }
}

/* The end of the channel block that starts at c0. */
SSM_INLINE ptrdiff_t SSM_SFX(ssm_block_stop)(ptrdiff_t c0, ptrdiff_t C)
{
    return C - c0 > SSM_SUM_BLOCK ? c0 + SSM_SUM_BLOCK : C;
}

/* ---- shared row helper: max and sum of exp over C ----------------------------- */

/* s[j] += sum of exp(x[c, j] - m[j]) over rows c0 <= c < c1, stored in e as well if
   e != NULL. Rows go two per pass over j, so s is loaded and stored half as often.
   pf: prefetch pf elements on from each row as it is read (see ssm_prefetch_next:
   strided channels, the rows two tiles ahead; rows layouts, the next tile); 0 for none. */
SSM_INLINE void SSM_SFX(ssm_sumexp_rows)(const R *restrict x, ptrdiff_t sx, R *restrict e,
                                         ptrdiff_t se, ptrdiff_t c0, ptrdiff_t c1, ptrdiff_t n,
                                         const R *restrict m, R *restrict s, ptrdiff_t pf)
{
    ptrdiff_t c, j;
#ifdef SSM_HAVE_EXPF_T16
    if (sizeof(R) == sizeof(float) && ssm_expf_use_t16()) {  /* see _expf_table.h */
        ssm_sumexp_rows_t16((const float *)x, sx, (float *)e, se, c0, c1, n, (const float *)m,
                            (float *)s, pf);
        return;
    }
    if (sizeof(R) == sizeof(float) && ssm_expf_use_v3()) {  /* see _expf_avx2.h */
        ssm_sumexp_rows_v3((const float *)x, sx, (float *)e, se, c0, c1, n, (const float *)m,
                           (float *)s, pf);
        return;
    }
#endif
    for (c = c0; c + 1 < c1; c += 2) {
        const R *restrict x0 = x + c * sx, *restrict x1 = x0 + sx;
        SSM_SFX(ssm_prefetch_next)(x0, n, pf);
        SSM_SFX(ssm_prefetch_next)(x1, n, pf);
        if (e) {
            R *restrict e0 = e + c * se, *restrict e1 = e0 + se;
#pragma omp simd
            for (j = 0; j < n; j++) {
                R v0 = SSM_EXP(x0[j] - m[j]), v1 = SSM_EXP(x1[j] - m[j]);
                e0[j] = v0;
                e1[j] = v1;
                s[j] = s[j] + v0 + v1;  /* (s + v0) + v1: the order of one row at a time */
            }
        } else {
#pragma omp simd
            for (j = 0; j < n; j++)
                s[j] = s[j] + SSM_EXP(x0[j] - m[j]) + SSM_EXP(x1[j] - m[j]);
        }
    }
    if (c < c1) {  /* the last row of an odd block */
        const R *restrict xc = x + c * sx;
        SSM_SFX(ssm_prefetch_next)(xc, n, pf);
        if (e) {
            R *restrict ec = e + c * se;
#pragma omp simd
            for (j = 0; j < n; j++) {
                R v = SSM_EXP(xc[j] - m[j]);
                ec[j] = v;
                s[j] += v;
            }
        } else {
#pragma omp simd
            for (j = 0; j < n; j++)
                s[j] += SSM_EXP(xc[j] - m[j]);
        }
    }
}

/* s[j] = sum_c exp(x[c, j] - m[j]) for C > SSM_SUM_BLOCK, in blocks (s starts at 0).
   Out of line: the tile drivers, and the register allocation of their hot loops, stay
   as they are for the class counts of one block (VOC fused lost 3% to a reload). */
SSM_NOINLINE SSM_CLONES void SSM_SFX(ssm_sumexp_blocks)(
    const R *restrict x, ptrdiff_t sx, R *restrict e, ptrdiff_t se, ptrdiff_t C, ptrdiff_t n,
    const R *restrict m, R *restrict s, double *restrict hi, double *restrict lo, ptrdiff_t pf)
{
    ptrdiff_t c0, c1, j;
    for (c0 = 0; c0 < C; c0 = c1) {  /* see ssm_sum_block_end */
        c1 = SSM_SFX(ssm_block_stop)(c0, C);
        if (c0 > 0) {
#pragma omp simd
            for (j = 0; j < n; j++)
                s[j] = 0;
        }
        SSM_SFX(ssm_sumexp_rows)(x, sx, e, se, c0, c1, n, m, s, pf);
        SSM_SFX(ssm_sum_block_end)(s, hi, lo, n, c0, c1, C);
    }
}

/* m[j] = max_c x[c, j]; if e != NULL, e[c, j] = exp(x - m) is stored as well;
   s[j] = sum_c exp(x[c, j] - m[j]) (in channel order; over C > SSM_SUM_BLOCK in
   blocks, with hi and lo as the accumulators: see ssm_sum_block_end). A NaN logit
   makes that pixel's sum NaN. If cls != NULL, also xy[j] = x[cls[j], j] (0 where
   cls[j] < 0), by one gather per pixel after the max sweep (a vector gather in the
   AVX2 and AVX-512 clones): a select per element in the max sweep cost 0.8
   instructions per element (callgrind, VOC, AVX2 clone). The max sweep takes two
   rows per pass over j, so m is loaded and stored half as often. */
SSM_INLINE void SSM_SFX(ssm_max_sumexp)(const R *restrict x, ptrdiff_t sx, R *restrict e,
                                        ptrdiff_t se, ptrdiff_t C, ptrdiff_t n,
                                        R *restrict m, R *restrict s,
                                        double *restrict hi, double *restrict lo,
                                        const int32_t *restrict cls, R *restrict xy,
                                        ptrdiff_t pf)
{
    ptrdiff_t c, j;
#pragma omp simd
    for (j = 0; j < n; j++) {
        m[j] = x[j];
        s[j] = 0;
    }
    for (c = 1; c + 1 < C; c += 2) {
        const R *restrict x0 = x + c * sx, *restrict x1 = x0 + sx;
#pragma omp simd
        for (j = 0; j < n; j++) {
            R v = x0[j] > m[j] ? x0[j] : m[j];
            m[j] = x1[j] > v ? x1[j] : v;
        }
    }
    if (c < C) {  /* the last row when C is even */
        const R *restrict xc = x + c * sx;
#pragma omp simd
        for (j = 0; j < n; j++)
            m[j] = xc[j] > m[j] ? xc[j] : m[j];
    }
    /* cls is -1 or in [0, C): row 0 stands in for -1, then the 0 is chosen. int32
       offsets where they fit (vgatherdps; with 64-bit ones gcc 12 gathers scalar) */
#if defined(SSM_AVX_TRANSPOSE)
    if (cls && sizeof(R) == sizeof(float) && (C - 1) * sx + n <= INT32_MAX
        && ssm_cpu_has_avx2()) {
        ssm_gather_labels_avx2((const float *)x, (int32_t)sx, cls, (float *)xy, n);
    } else
#endif
    if (cls && (C - 1) * sx + n <= INT32_MAX) {
        const int32_t sx32 = (int32_t)sx;
#pragma omp simd
        for (j = 0; j < n; j++) {
            int32_t y = cls[j];
            R v = x[(y < 0 ? 0 : y) * sx32 + (int32_t)j];
            xy[j] = y < 0 ? (R)0 : v;
        }
    } else if (cls) {
#pragma omp simd
        for (j = 0; j < n; j++) {
            int32_t y = cls[j];
            R v = x[(ptrdiff_t)(y < 0 ? 0 : y) * sx + j];
            xy[j] = y < 0 ? (R)0 : v;
        }
    }
    if (C <= SSM_SUM_BLOCK)
        SSM_SFX(ssm_sumexp_rows)(x, sx, e, se, 0, C, n, m, s, pf);
    else
        SSM_SFX(ssm_sumexp_blocks)(x, sx, e, se, C, n, m, s, hi, lo, pf);
}

/* The prefetch distance of the sum-of-exp sweeps over a rows-layout tile (NHWC, (N, C);
   P->inner == 1), in elements from its channel-major copy xs in scratch (rows P->tile
   apart), as ssm_prefetch_next takes it: row c of xs is given the c-th n-element segment
   of the next tile's logits (one contiguous span, n C elements right after this tile's,
   at base + n C), so the next tile comes into L2 a few lines at a time while this one is
   computed, and its transpose (ssm_load) reads L2, not DRAM. The arrays are unrelated:
   integer arithmetic. None for the last tile, nor for the half drivers' one-tile
   problems (their x is scratch); a shorter last tile next leaves some prefetches past
   the array's end, which is harmless (prefetches never fault). Strided channels prefetch as
   ssm_rows_ahead says. Zen 3, 2 threads, NHWC float32 fused, this / none (alternating
   processes): VOC-like 8x256x256x21 0.92, ADE-like 4x128x128x150 0.76; every 64 pixels'
   share in one burst before the sweeps instead was slower than none. */
SSM_INLINE ptrdiff_t SSM_SFX(ssm_next_tile_ahead)(const ssm_problem *P, const R *xs,
                                                  ptrdiff_t base, ptrdiff_t n)
{
    uintptr_t next;
    if (base / P->C + n >= P->outer)  /* the last tile, or a half driver's one-tile problem */
        return 0;
    next = (uintptr_t)P->x + (uintptr_t)(base + n * P->C) * sizeof(R);
    return (ptrdiff_t)(next - (uintptr_t)xs) / (ptrdiff_t)sizeof(R);
}

/* ssm_max_sumexp over the tile's n pixels (which start at element `base` of the logits)
   in chunks whose C rows of x take about SSM_L1_CHUNK bytes (64 pixels at least), so that
   the sum-of-exp sweep reads what the max sweep left in L1 (the whole tile's rows are in
   L2 only). Per pixel the same operations: the same bits. Rows of the tile after next
   (strided channels, ssm_rows_ahead) or the next tile (rows, ssm_next_tile_ahead) are
   prefetched as for the whole tile. */
SSM_INLINE void SSM_SFX(ssm_max_sumexp_chunked)(const ssm_problem *P, const R *x, ptrdiff_t sx,
                                                R *e, ptrdiff_t se, ptrdiff_t base, ptrdiff_t n,
                                                SSM_SFX(ssm_scratch) *S, const int32_t *cls,
                                                R *xy)
{
    ptrdiff_t j0, nc, C = P->C, chunk = ssm_l1_chunk(C, n, (ptrdiff_t)sizeof(R));
    ptrdiff_t pf = P->inner > 1 ? ssm_rows_ahead(P, n) : SSM_SFX(ssm_next_tile_ahead)(P, x, base, n);
    for (j0 = 0; j0 < n; j0 += nc) {
        nc = n - j0 < chunk ? n - j0 : chunk;
        SSM_SFX(ssm_max_sumexp)(x + j0, sx, e ? e + j0 : NULL, se, C, nc, S->xmax + j0,
                                S->sumexp + j0, S->hi ? S->hi + j0 : NULL,
                                S->lo ? S->lo + j0 : NULL, cls ? cls + j0 : NULL,
                                xy ? xy + j0 : NULL, pf);
    }
}

/* ---- softmax_fwd / log_softmax_fwd -------------------------------------------- */

SSM_CLONES double SSM_SFX(ssm_softmax_fwd_tile)(const ssm_problem *P, ptrdiff_t t, void *buf,
                                                int logspace)
{
    SSM_SFX(ssm_scratch) S = SSM_SFX(ssm_scratch_carve)(P, buf);
    ptrdiff_t base, pix, n, sx, sy, c, j, C = P->C;
    const R *x;
    R *y;
    ssm_tile_geom(P, t, &base, &pix, &n);
    x = SSM_SFX(ssm_load)(P, (const R *)P->x, base, n, S.X, &sx);
    y = SSM_SFX(ssm_target_block)(P, (R *)P->out, base, S.O, &sy);
    if (!logspace) {
        SSM_SFX(ssm_max_sumexp_chunked)(P, x, sx, y, sy, base, n, &S, NULL, NULL);
#pragma omp simd
        for (j = 0; j < n; j++)
            S.inv_sum[j] = (R)1 / S.sumexp[j];
        for (c = 0; c < C; c++)
            SSM_SFX(ssm_scaled_row_done)(P, (R *)P->out, base, c, n, y + c * sy, S.inv_sum,
                                         y + c * sy);
    } else {
        SSM_SFX(ssm_max_sumexp_chunked)(P, x, sx, NULL, 0, base, n, &S, NULL, NULL);
#pragma omp simd
        for (j = 0; j < n; j++)
            S.log_sum[j] = SSM_LOG_SUM(S.sumexp[j]);
        for (c = 0; c < C; c++) {
            const R *restrict xc = x + c * sx;
            R *restrict yc = y + c * sy;
            const R *restrict m = S.xmax, *restrict ls = S.log_sum;
#pragma omp simd
            for (j = 0; j < n; j++)
                yc[j] = (xc[j] - m[j]) - ls[j];  /* x - m first: exact near the max */
            SSM_SFX(ssm_row_done)(P, (R *)P->out, base, c, n, yc);
        }
    }
    SSM_SFX(ssm_store)(P, (R *)P->out, base, n, y);
    return 0.0;
}

/* ---- softmax_bwd: dx = p * (dp - sum_c p * dp) -------------------------------- */

SSM_CLONES double SSM_SFX(ssm_softmax_bwd_tile)(const ssm_problem *P, ptrdiff_t t, void *buf)
{
    SSM_SFX(ssm_scratch) S = SSM_SFX(ssm_scratch_carve)(P, buf);
    ptrdiff_t base, pix, n, sp, sd, so, c, c0, c1, j, pf, C = P->C;
    const R *p, *dp;
    R *dx, *dot = S.dot;
    ssm_tile_geom(P, t, &base, &pix, &n);
    p = SSM_SFX(ssm_load)(P, (const R *)P->x, base, n, S.X, &sp);
    dp = SSM_SFX(ssm_load)(P, (const R *)P->x2, base, n, S.X2, &sd);
    dx = SSM_SFX(ssm_target_block)(P, (R *)P->out, base, S.O, &so);
    pf = ssm_rows_ahead(P, n);
    for (c0 = 0; c0 < C; c0 = c1) {  /* dot = sum_c p dp, in blocks: see ssm_sum_block_end */
        c1 = SSM_SFX(ssm_block_stop)(c0, C);
#pragma omp simd
        for (j = 0; j < n; j++)
            dot[j] = 0;
        for (c = c0; c < c1; c++) {
            const R *restrict pc = p + c * sp, *restrict dc = dp + c * sd;
            SSM_SFX(ssm_prefetch_next)(pc, n, pf);
            SSM_SFX(ssm_prefetch_next)(dc, n, pf);
#pragma omp simd
            for (j = 0; j < n; j++)
                dot[j] += pc[j] * dc[j];
        }
        SSM_SFX(ssm_sum_block_end)(dot, S.hi, S.lo, n, c0, c1, C);
    }
    for (c = 0; c < C; c++) {
        const R *restrict pc = p + c * sp, *restrict dc = dp + c * sd;
        R *restrict oc = dx + c * so;
#pragma omp simd
        for (j = 0; j < n; j++)
            oc[j] = pc[j] * (dc[j] - dot[j]);
        SSM_SFX(ssm_row_done)(P, (R *)P->out, base, c, n, oc);
    }
    SSM_SFX(ssm_store)(P, (R *)P->out, base, n, dx);
    return 0.0;
}

/* ---- the label types -------------------------------------------------------------
 * The loops that read integer labels, instantiated per label type (_labels_impl.h) as
 * this file is per R; the callers pick one per tile with a switch on target_kind. */
#define SSM_LABEL uint8_t
#define SSM_ULABEL uint8_t
#define SSM_LABEL_MIN 0
#define SSM_LABEL_MAX UINT8_MAX
#define SSM_LSFX(name) SSM_SFX(name##_u8)
#include "_labels_impl.h"
#undef SSM_LABEL
#undef SSM_ULABEL
#undef SSM_LABEL_MIN
#undef SSM_LABEL_MAX
#undef SSM_LSFX

#define SSM_LABEL int32_t
#define SSM_ULABEL uint32_t
#define SSM_LABEL_MIN INT32_MIN
#define SSM_LABEL_MAX INT32_MAX
#define SSM_LSFX(name) SSM_SFX(name##_i32)
#include "_labels_impl.h"
#undef SSM_LABEL
#undef SSM_ULABEL
#undef SSM_LABEL_MIN
#undef SSM_LABEL_MAX
#undef SSM_LSFX

#define SSM_LABEL int64_t
#define SSM_ULABEL uint64_t
#define SSM_LABEL_MIN INT64_MIN
#define SSM_LABEL_MAX INT64_MAX
#define SSM_LSFX(name) SSM_SFX(name##_i64)
#include "_labels_impl.h"
#undef SSM_LABEL
#undef SSM_ULABEL
#undef SSM_LABEL_MIN
#undef SSM_LABEL_MAX
#undef SSM_LSFX

/* Prefetch the labels (and weights) of the tile after next, as ssm_prefetch_next does
   for the logits: a tile's labels are a few KB, too few for the hardware prefetcher to
   be ahead before the staging loop waits on them (VOC loss alone, 1 thread: the int64
   coding loop had 11% of the time, nearly all on its loads; 4% with this). */
SSM_INLINE void SSM_SFX(ssm_prefetch_labels)(const ssm_problem *P, ptrdiff_t pix, ptrdiff_t n)
{
    const ptrdiff_t ahead = pix + 2 * P->tile, rsize = (ptrdiff_t)sizeof(R);
    const ptrdiff_t lsize = (ptrdiff_t)ssm_label_bytes(P->target_kind);
    ssm_prefetch_span(P->target, ahead * lsize, n * lsize);
    if (P->w)
        ssm_prefetch_span(P->w, ahead * rsize, n * rsize);
}

/* ---- sswl_stats: the label pre-pass of the loss functions ----------------------
 * The tile's share of the "mean" normaliser (sum of n_p, in double) and the lowest
 * flat index of a label that is neither in [0, C) nor ignore_index (-1 if none).
 * Reads labels and weights only. ssm_label_stats: the n pixels from flat index pix; out
 * of line, so that the pre-pass and a loss-alone pass (ssm_tile_stats) sum a normaliser
 * with one compiled body: inlined copies may be contracted into FMAs differently (a
 * weighted float64 normaliser differed by an ulp between them after an unrelated edit). */
SSM_NOINLINE SSM_CLONES void SSM_SFX(ssm_label_stats)(const ssm_problem *P, ptrdiff_t pix,
                                                      ptrdiff_t n, double *norm, ptrdiff_t *bad)
{
    ptrdiff_t j, first = -1;
    double acc = 0.0;
    const R *w = (const R *)P->w, *cw = (const R *)P->cw, *wt;
    const long long ign = P->ignore_index, C = P->C;
    wt = w ? w + pix : NULL;  /* the tile's weights */
    switch (P->target_kind) {
    case SSM_SOFT:
        if (!wt)
            acc = (double)n;
        else
            for (j = 0; j < n; j++)
                acc += (double)wt[j];
        break;
    case SSM_U8:
        acc = SSM_SFX(ssm_label_norm_u8)((const uint8_t *)P->target + pix, n, C, ign, wt, cw,
                                         &first);
        break;
    case SSM_I32:
        acc = SSM_SFX(ssm_label_norm_i32)((const int32_t *)P->target + pix, n, C, ign, wt, cw,
                                          &first);
        break;
    case SSM_I64:
        acc = SSM_SFX(ssm_label_norm_i64)((const int64_t *)P->target + pix, n, C, ign, wt, cw,
                                          &first);
        break;
    default:
        SSM_UNREACHABLE();
    }
    *norm = acc;
    *bad = first < 0 ? -1 : pix + first;
}

SSM_CLONES void SSM_SFX(ssm_sswl_stats)(const ssm_problem *P, ptrdiff_t t, double *norm,
                                        ptrdiff_t *bad)
{
    ptrdiff_t base, pix, n;
    ssm_tile_geom(P, t, &base, &pix, &n);
    SSM_SFX(ssm_prefetch_labels)(P, pix, n);
    SSM_SFX(ssm_label_stats)(P, pix, n, norm, bad);
}

/* ---- target staging ------------------------------------------------------------ */

/* Soft targets: A[c][j] = w cw_c ((1-e) t_c + e/C); every pixel is active unless its
   weight is 0, and has no class index. For the KL divergence also ent[j] = sum_c A[c][j]
   log t'_c (t' the smoothed target; 0 where A is 0): the log in a loop of R alone, so
   that it vectorises (see ssm_sswl_tile), the products summed in double. */
SSM_INLINE void SSM_SFX(ssm_stage_soft)(const ssm_problem *P, SSM_SFX(ssm_scratch) *S,
                                        ptrdiff_t base, ptrdiff_t n, R keep, R spread, int kl)
{
    ptrdiff_t C = P->C, T = P->tile, c, j, st;
    const R *cw = (const R *)P->cw;
    const R *tb = SSM_SFX(ssm_load)(P, (const R *)P->target, base, n, S->X2, &st);
    if (kl)
        for (j = 0; j < n; j++)
            S->ent[j] = 0.0;
    for (c = 0; c < C; c++) {
        R cwc = cw ? cw[c] : (R)1;
        const R *restrict tc = tb + c * st;
        R *restrict Ac = S->A + c * T;
        const R *restrict wv = S->weight;
#pragma omp simd
        for (j = 0; j < n; j++)
            Ac[j] = wv[j] * cwc * (keep * tc[j] + spread);
        if (kl) {
            R *restrict lt = S->log_t;
            double *restrict ent = S->ent;
#pragma omp simd
            for (j = 0; j < n; j++)
                lt[j] = SSM_LOG(keep * tc[j] + spread);
#pragma omp simd
            for (j = 0; j < n; j++)
                ent[j] += Ac[j] != 0 ? (double)Ac[j] * (double)lt[j] : 0.0;
        }
    }
    for (j = 0; j < n; j++) {
        S->act[j] = S->weight[j] != 0 ? (R)1 : (R)0;  /* zero weight: inactive, exactly 0 */
        S->cls[j] = -1;
    }
}

/* Labels with a lens or smoothing, from cls: A[c][j] = w cw_c ((1-e) b_c + e/C), with
   b = the lens row of the label, or its one-hot; 0 for a pixel without a class. */
SSM_INLINE void SSM_SFX(ssm_stage_dense_labels)(const ssm_problem *P, SSM_SFX(ssm_scratch) *S,
                                                ptrdiff_t n, R keep, R spread, int kl)
{
    ptrdiff_t C = P->C, T = P->tile, c, j;
    const R *cw = (const R *)P->cw, *lens = (const R *)P->lens;
    for (c = 0; c < C; c++) {
        R cwc = cw ? cw[c] : (R)1;
        R *restrict Ac = S->A + c * T;
        for (j = 0; j < n; j++) {
            int32_t y = S->cls[j];
            R b;
            if (y < 0) {
                Ac[j] = 0;
                continue;
            }
            b = lens ? lens[(ptrdiff_t)y * C + c] : (R)(y == c);
            Ac[j] = S->weight[j] * cwc * (keep * b + spread);
        }
    }
    if (kl) {  /* ent = w sum_c cw_c t_c log t_c: the label's table entry */
        const double *K = P->label_terms;
        for (j = 0; j < n; j++)
            S->ent[j] = S->cls[j] >= 0 ? (double)S->weight[j] * K[S->cls[j]] : 0.0;
    }
}

/* Stage tile targets. Sparse form (returns 0): cls and act of ssm_stage_labels. Dense
   form (returns 1): the block A of ssm_stage_soft or ssm_stage_dense_labels and act,
   the pixel's activity, and with `kl` (a loss pass of the KL divergence) ent. Dense
   targets fill weight (labels read the weights in place); gscale (0 unless `want_g`) is
   filled for the passes with an epilogue, which alone read it: not for the loss alone. */
SSM_INLINE int SSM_SFX(ssm_stage)(const ssm_problem *P, SSM_SFX(ssm_scratch) *S, ptrdiff_t base,
                                  ptrdiff_t pix, ptrdiff_t n, int want_g, int kl)
{
    ptrdiff_t C = P->C, j;
    const R *w = (const R *)P->w, *cw = (const R *)P->cw;
    const R *dmap = (const R *)P->d_loss_map;
    const R gs = want_g ? (R)P->grad_scale : (R)0;
    const long long ign = P->ignore_index;
    int dense = P->target_kind == SSM_SOFT || P->lens != NULL || P->smoothing != 0.0;
    R keep = (R)(1.0 - P->smoothing), spread = (R)(P->smoothing / (double)C);
    SSM_SFX(ssm_prefetch_labels)(P, pix, n);

    if (dmap && want_g) {
        for (j = 0; j < n; j++) S->gscale[j] = gs * dmap[pix + j];
    } else if (want_g || P->out) {  /* the loss alone has no epilogue to read it */
        for (j = 0; j < n; j++) S->gscale[j] = gs;
    }
    if (dense)  /* labels read w in place */
        for (j = 0; j < n; j++)
            S->weight[j] = w ? w[pix + j] : (R)1;

    switch (P->target_kind) {
    case SSM_SOFT:
        SSM_SFX(ssm_stage_soft)(P, S, base, n, keep, spread, kl);
        return 1;
    case SSM_U8:
        SSM_SFX(ssm_stage_labels_u8)((const uint8_t *)P->target + pix, n, C, ign, dense,
                                     w ? w + pix : NULL, cw, S->cls, S->act);
        break;
    case SSM_I32:
        SSM_SFX(ssm_stage_labels_i32)((const int32_t *)P->target + pix, n, C, ign, dense,
                                      w ? w + pix : NULL, cw, S->cls, S->act);
        break;
    case SSM_I64:
        SSM_SFX(ssm_stage_labels_i64)((const int64_t *)P->target + pix, n, C, ign, dense,
                                      w ? w + pix : NULL, cw, S->cls, S->act);
        break;
    default:
        SSM_UNREACHABLE();
    }
    if (dense)
        SSM_SFX(ssm_stage_dense_labels)(P, S, n, keep, spread, kl);
    return dense;
}

/* The label pre-pass of tile t (ssm_sswl_stats) into P->norms[t] and P->bads[t], for a
   loss pass that has staged the tile (act). Labels without weights or class weights are
   counted and checked from act, where a valid label is 1, an ignored one 0 and one out
   of range NaN: the same integer count, 1.8 instructions per pixel where the pre-pass
   takes 3.9 (int64 labels, AVX2 clone); otherwise the pre-pass itself. */
SSM_INLINE void SSM_SFX(ssm_tile_stats)(const ssm_problem *P, const SSM_SFX(ssm_scratch) *S,
                                        ptrdiff_t t, ptrdiff_t pix, ptrdiff_t n)
{
    ptrdiff_t j, count = 0, first = -1;
    int any_bad = 0;
    const R *restrict a = S->act;
    if (P->target_kind == SSM_SOFT || P->w || P->cw) {
        SSM_SFX(ssm_label_stats)(P, pix, n, &P->norms[t], &P->bads[t]);
        return;
    }
#pragma omp simd reduction(+:count) reduction(|:any_bad)
    for (j = 0; j < n; j++) {
        count += a[j] == (R)1;
        any_bad |= a[j] != a[j];
    }
    if (any_bad)
        for (j = 0; j < n; j++)
            if (a[j] != a[j]) {
                first = j;
                break;
            }
    P->norms[t] = (double)count;
    P->bads[t] = first < 0 ? -1 : pix + first;
}

/* Dense targets: Asum[j] = sum_c A[c, j] (in blocks: see ssm_sum_block_end) and, if
   x != NULL, ax[j] = sum_c A[c, j] x[c, j] in double (0 where A is 0: 0 log 0 = 0).
   Out of line, as ssm_sumexp_blocks, so the label path of the drivers is unchanged. */
SSM_NOINLINE SSM_CLONES void SSM_SFX(ssm_dense_sums)(
    const R *restrict A, ptrdiff_t T, const R *restrict x, ptrdiff_t sx, ptrdiff_t C,
    ptrdiff_t n, R *restrict Asum, double *restrict ax, double *restrict hi,
    double *restrict lo)
{
    ptrdiff_t c, c0, c1, j;
    if (x)
        for (j = 0; j < n; j++)
            ax[j] = 0.0;
    for (c0 = 0; c0 < C; c0 = c1) {
        c1 = SSM_SFX(ssm_block_stop)(c0, C);
        for (j = 0; j < n; j++)
            Asum[j] = 0;
        for (c = c0; c < c1; c++) {
            const R *restrict Ac = A + c * T;
            if (x) {
                const R *restrict xc = x + c * sx;
#pragma omp simd
                for (j = 0; j < n; j++) {
                    Asum[j] += Ac[j];
                    ax[j] += Ac[j] != 0 ? (double)Ac[j] * (double)xc[j] : 0.0;
                }
            } else {
#pragma omp simd
                for (j = 0; j < n; j++)
                    Asum[j] += Ac[j];
            }
        }
        SSM_SFX(ssm_sum_block_end)(Asum, hi, lo, n, c0, c1, C);
    }
}

/* One class row of the gradient dx_c = g (A q_c - a_c), from the factor f = g A and
   e = q_c (or e = exp(x_c - m) with f = g A / s): sparse targets subtract glabel = g a
   at the label (cls), dense ones gscale A_c (Ac != NULL). Rows of inactive pixels
   (f == 0) are exactly 0, even where e is not finite. */
SSM_INLINE void SSM_SFX(ssm_grad_row)(R *oc, const R *ec, const R *restrict f,
                                      const R *restrict glabel, const R *restrict gscale,
                                      const int32_t *restrict cls, const R *restrict Ac,
                                      ptrdiff_t c, ptrdiff_t n)
{
    ptrdiff_t j;
    const int32_t c32 = (int32_t)c;  /* compare int32 with int32: full-width vectors */
    if (Ac) {
#pragma omp simd
        for (j = 0; j < n; j++)
            oc[j] = (f[j] != 0 ? f[j] * ec[j] : (R)0) - gscale[j] * Ac[j];
    } else {
#pragma omp simd
        for (j = 0; j < n; j++) {  /* glabel read unconditionally: a plain load, not masked */
            R gl = glabel[j];
            oc[j] = (f[j] != 0 ? f[j] * ec[j] : (R)0) - (cls[j] == c32 ? gl : (R)0);
        }
    }
}

/* Row c of the gradient for sparse targets, streamed out directly (ssm_grad_sparse_stream_*)
   where that applies: a streamed strided output, float, a CPU with AVX2. Returns 0
   where it does not (then ssm_grad_row and ssm_row_done). */
SSM_INLINE int SSM_SFX(ssm_grad_row_streamed)(const ssm_problem *P, R *dst, ptrdiff_t base,
                                              ptrdiff_t c, ptrdiff_t n, const R *ec,
                                              const R *f, const R *glabel,
                                              const int32_t *cls)
{
#if defined(SSM_AVX_TRANSPOSE)
    if (sizeof(R) == sizeof(float) && P->inner > 1 && P->stream && ssm_cpu_has_avx2()) {
        ssm_grad_sparse_stream_avx2((float *)(dst + base + c * P->inner), (const float *)ec,
                                    (const float *)f, (const float *)glabel, cls, (int32_t)c,
                                    n);
        return 1;
    }
#else
    (void)P; (void)dst; (void)base; (void)c; (void)n; (void)ec; (void)f; (void)glabel;
    (void)cls;
#endif
    return 0;
}

/* Tile loss: per-pixel losses into loss_map (if any) and their float64 sum. */
SSM_INLINE double SSM_SFX(ssm_tile_loss)(const ssm_problem *P, const double *lp, ptrdiff_t pix,
                                         ptrdiff_t n)
{
    double acc = 0.0;
    ptrdiff_t j;
    /* fixed order for a given tile and clone: deterministic whatever the threads */
#pragma omp simd reduction(+:acc)
    for (j = 0; j < n; j++)
        acc += lp[j];
    if (P->loss_map) {
        R *lm = (R *)P->loss_map + pix;
        for (j = 0; j < n; j++)
            lm[j] = (R)lp[j];
    }
    return acc;
}

/* ---- sswl_fwd and sswl_fwd_bwd: one pass over the logits ----------------------
 * pixel loss l = A (m + log s) - sum_c a_c x_c   (A = sum_c a_c)
 * gradient   dx_c = g (A q_c - a_c),  q_c = exp(x_c - m) / s
 * After the sweeps over the logits (max, then sum of exp), the per-pixel terms of one
 * target form (ssm_sparse_terms, ssm_dense_terms), then one sweep writes the output. */

/* Labels (a = act at the label, A = a): loss = a min(m + log s - x_y, cap), 0 for an
   inactive pixel (NaN stays NaN); inv_sum = 1/s; gfactor = g a / s, exactly 0 for an
   inactive pixel even where s is not finite, and without a gradient; glabel = g a.
   The log runs in its own float-only loop before (see ssm_sswl_tile). The loss alone
   (epilogue 0) stops after the loss. */
SSM_INLINE void SSM_SFX(ssm_sparse_terms)(SSM_SFX(ssm_scratch) *S, ptrdiff_t n, double cap,
                                          int want_grad, int epilogue)
{
    ptrdiff_t j;
    const R *restrict a = S->act, *restrict m = S->xmax, *restrict ls = S->log_sum;
    const R *restrict xy = S->xlabel, *restrict s = S->sumexp, *restrict g = S->gscale;
    R *restrict r = S->inv_sum, *restrict f = S->gfactor, *restrict ga = S->glabel;
    double *restrict lp = S->loss;
    /* every select in double: one that tests a float (a == 0) in a loop of doubles
       has its mask widened, the double one (nll > cap) narrowed and widened back (5.9
       instructions per pixel, AVX2 clone; this, the same bits, 4.4) */
#pragma omp simd
    for (j = 0; j < n; j++) {
        double nll = (double)m[j] - (double)xy[j] + (double)ls[j], da = (double)a[j];
        nll = cap < nll ? cap : nll;  /* NaN stays NaN */
        lp[j] = da == 0.0 ? 0.0 : da * nll;
    }
    if (!epilogue)  /* the loss alone */
        return;
#pragma omp simd
    for (j = 0; j < n; j++) {
        r[j] = (R)1 / s[j];
        f[j] = want_grad && a[j] != 0 ? g[j] * a[j] * r[j] : (R)0;
        ga[j] = g[j] * a[j];
    }
}

/* Dense targets (a = act, the activity): asum = A = sum_c A_c and ax = sum_c A_c x_c
   (ssm_dense_sums); loss = a (A (m + log s) - ax), plus a ent for the KL divergence
   (kl); inv_sum = 1/s; gfactor = g a A / s (0 as for labels); epilogue as for labels. */
SSM_INLINE void SSM_SFX(ssm_dense_terms)(SSM_SFX(ssm_scratch) *S, const R *x, ptrdiff_t sx,
                                         ptrdiff_t C, ptrdiff_t n, ptrdiff_t T, int want_grad,
                                         int kl, int epilogue)
{
    ptrdiff_t j;
    SSM_SFX(ssm_dense_sums)(S->A, T, x, sx, C, n, S->asum, S->ax, S->hi, S->lo);
    {  /* restrict from here: asum and ax are written above through other pointers */
        const R *restrict a = S->act, *restrict m = S->xmax, *restrict ls = S->log_sum;
        const R *restrict s = S->sumexp, *restrict g = S->gscale, *restrict Asum = S->asum;
        const double *restrict ax = S->ax;
        R *restrict r = S->inv_sum, *restrict f = S->gfactor;
        double *restrict lp = S->loss;
        if (kl) {
            const double *restrict ent = S->ent;
#pragma omp simd
            for (j = 0; j < n; j++) {
                double l = (double)Asum[j] * ((double)m[j] + (double)ls[j]) - ax[j] + ent[j];
                lp[j] = a[j] == 0 ? 0.0 : (double)a[j] * l;
            }
        } else {
#pragma omp simd
            for (j = 0; j < n; j++) {
                double l = (double)Asum[j] * ((double)m[j] + (double)ls[j]) - ax[j];
                lp[j] = a[j] == 0 ? 0.0 : (double)a[j] * l;
            }
        }
        if (!epilogue)  /* the loss alone */
            return;
#pragma omp simd
        for (j = 0; j < n; j++) {
            r[j] = (R)1 / s[j];
            f[j] = want_grad && a[j] != 0 ? g[j] * a[j] * Asum[j] * r[j] : (R)0;
        }
    }
}

/* ---- two classes: a pixel's sweeps in one loop ---------------------------------
 * With two classes (binary segmentation) a pixel has more per-pixel work than per-logit
 * work, and the general sweeps over class rows and the per-pixel loops between them
 * (the label's logit, log s) each load and store the pixel's arrays again. Here one loop
 * holds a pixel's two logits in registers and does the max, the label's logit, the sum
 * of exp, log s and the output row's e (or prob) at once. Against the general sweeps
 * (benchmarks/two_classes.py, Zen 3 AVX2, 1 and 2 threads): NCHW fused 0.96-1.00x the
 * time, forward 0.90-0.92x, loss alone 0.93-0.94x; NHWC, whose pixel pairs it reads in
 * place (and whose gradient it writes in place), 0.74x, 0.84-0.85x and 0.82x. With 3
 * classes such a loop was even, with 4 the fused pass up to 7% slower. The operations
 * are ssm_sswl_tile's, in its order (the same max, exp, sum, log and selects), so the
 * bits are the same (tests/test_consistency.py compares the two); the loss terms in
 * double and the gradient rows are ssm_sswl_tile's own code (computing the gradient in
 * the loop, gcc made its selects masked stores: 1.2x slower). Sparse labels, without
 * prob and gradient together; float only where every float exp is ssm_expf_nonpos (not
 * in the x86-64-v4 clone, whose sweeps use the table exp). */

/* mode 0: the loss alone; 1: o = prob; 2: o = e and sumexp, for the gradient. x is
   channel-major (rows 0: logit c of pixel j at x[c * sx + j]) or the array's rows
   (rows 1: at x[2 j + c], read in place: the transpose into scratch took 12-16% of the
   loss alone's time). o is channel-major (stride so). mode and rows are constants at
   each call. */
SSM_INLINE void SSM_SFX(ssm_two_sweep)(const R *restrict x, ptrdiff_t sx, const int rows,
                                       const int mode, ptrdiff_t n, SSM_SFX(ssm_scratch) *S,
                                       R *restrict o, ptrdiff_t so)
{
    ptrdiff_t j;
    const int32_t *restrict cls = S->cls;
    R *restrict xmax = S->xmax, *restrict xlab = S->xlabel, *restrict lsum = S->log_sum;
    R *restrict ssum = S->sumexp;
#pragma omp simd
    for (j = 0; j < n; j++) {
        R v0 = rows ? x[2 * j] : x[j], v1 = rows ? x[2 * j + 1] : x[sx + j], m, e0, e1, s;
        int32_t y = cls[j];  /* -1 or 0 or 1 */
        /* one exp: exp(m - m) is exp(0) = 1 exactly, or NaN where m is not finite, which
           (m - m) + 1 gives alike */
        const int up = v1 > v0;
        R e, emax;
        m = up ? v1 : v0;
        e = SSM_EXP((up ? v0 : v1) - m);
        emax = (m - m) + (R)1;
        e0 = up ? e : emax;
        e1 = up ? emax : e;
        s = (R)0 + e0 + e1;
        xmax[j] = m;
        xlab[j] = y == 1 ? v1 : y == 0 ? v0 : (R)0;
        lsum[j] = SSM_LOG_SUM(s);
        if (mode == 1) {
            R r = (R)1 / s;
            o[j] = e0 * r;
            o[so + j] = e1 * r;
        } else if (mode == 2) {
            ssum[j] = s;
            o[j] = e0;
            o[so + j] = e1;
        }
    }
}

/* The gradient of a rows tile of two classes into the output's pixel pairs d[2 j + c],
   from e (channel-major, stride se) and ssm_sparse_terms' factors: ssm_grad_row's
   operations, without the scratch block and its transpose by ssm_store. */
SSM_INLINE void SSM_SFX(ssm_two_grad_rows)(R *restrict d, const R *restrict e, ptrdiff_t se,
                                           const SSM_SFX(ssm_scratch) *S, ptrdiff_t n)
{
    ptrdiff_t j;
    const R *restrict f = S->gfactor, *restrict ga = S->glabel;
    const int32_t *restrict cls = S->cls;
#pragma omp simd
    for (j = 0; j < n; j++) {
        R fj = f[j], gl = ga[j];  /* read unconditionally: plain loads, not masked */
        int32_t y = cls[j];
        d[2 * j] = (fj != 0 ? fj * e[j] : (R)0) - (y == 0 ? gl : (R)0);
        d[2 * j + 1] = (fj != 0 ? fj * e[se + j] : (R)0) - (y == 1 ? gl : (R)0);
    }
}

/* Whether ssm_sswl_tile_two takes P's tiles (see there). */
SSM_INLINE int SSM_SFX(ssm_two_applies)(const ssm_problem *P, int want_grad)
{
    if (!ssm_two_classes || P->C != 2 || P->target_kind == SSM_SOFT || P->lens
        || P->smoothing != 0.0 || (want_grad && P->out2))
        return 0;
    return sizeof(R) != sizeof(float) || !ssm_float_exp_table();
}

/* ssm_sswl_tile for two classes and sparse labels (ssm_two_applies). */
SSM_NOINLINE SSM_CLONES double SSM_SFX(ssm_sswl_tile_two)(const ssm_problem *P, ptrdiff_t t,
                                                         void *buf, int want_grad)
{
    SSM_SFX(ssm_scratch) S = SSM_SFX(ssm_scratch_carve)(P, buf);
    ptrdiff_t base, pix, n, sx, so = 0, c;
    const R *x;
    R *o = NULL;
    int mode = want_grad ? 2 : P->out ? 1 : 0;
#pragma omp atomic
    ssm_two_class_tiles++;
    ssm_tile_geom(P, t, &base, &pix, &n);
    SSM_SFX(ssm_stage)(P, &S, base, pix, n, want_grad, 0);
    if (P->norms)
        SSM_SFX(ssm_tile_stats)(P, &S, t, pix, n);
    if (mode)
        o = SSM_SFX(ssm_target_block)(P, (R *)P->out, base, S.O, &so);
    if (P->inner == 1) {  /* rows: read in place */
        x = (const R *)P->x + base;
        if (mode == 0)
            SSM_SFX(ssm_two_sweep)(x, 0, 1, 0, n, &S, o, so);
        else if (mode == 1)
            SSM_SFX(ssm_two_sweep)(x, 0, 1, 1, n, &S, o, so);
        else
            SSM_SFX(ssm_two_sweep)(x, 0, 1, 2, n, &S, o, so);
    } else {
        x = SSM_SFX(ssm_load)(P, (const R *)P->x, base, n, S.X, &sx);
        if (mode == 0)
            SSM_SFX(ssm_two_sweep)(x, sx, 0, 0, n, &S, o, so);
        else if (mode == 1)
            SSM_SFX(ssm_two_sweep)(x, sx, 0, 1, n, &S, o, so);
        else
            SSM_SFX(ssm_two_sweep)(x, sx, 0, 2, n, &S, o, so);
    }
    SSM_SFX(ssm_sparse_terms)(&S, n, P->loss_cap, want_grad, mode == 2);
    if (P->inner == 1 && mode == 2) {  /* rows: the gradient to the pixel pairs */
        SSM_SFX(ssm_two_grad_rows)((R *)P->out + base, o, so, &S, n);
        return SSM_SFX(ssm_tile_loss)(P, S.loss, pix, n);
    }
    for (c = 0; mode == 2 && c < 2; c++) {  /* ssm_sswl_tile's sweep 3 */
        R *oc = o + c * so;
        if (SSM_SFX(ssm_grad_row_streamed)(P, (R *)P->out, base, c, n, oc, S.gfactor,
                                           S.glabel, S.cls))
            continue;
        SSM_SFX(ssm_grad_row)(oc, oc, S.gfactor, S.glabel, S.gscale, S.cls, NULL, c, n);
        SSM_SFX(ssm_row_done)(P, (R *)P->out, base, c, n, oc);
    }
    for (c = 0; mode == 1 && c < 2; c++)
        SSM_SFX(ssm_row_done)(P, (R *)P->out, base, c, n, o + c * so);
    if (mode)
        SSM_SFX(ssm_store)(P, (R *)P->out, base, n, o);
    return SSM_SFX(ssm_tile_loss)(P, S.loss, pix, n);
}

/* want_grad = 0: out = prob, or the loss alone if out is NULL (the exp values are summed,
   never stored, and sweep 3 is skipped).  want_grad = 1: out = dlogits, out2 = prob if
   given. With P->norms, also the tile's label pre-pass (ssm_tile_stats). */
SSM_CLONES double SSM_SFX(ssm_sswl_tile)(const ssm_problem *P, ptrdiff_t t, void *buf,
                                         int want_grad)
{
    SSM_SFX(ssm_scratch) S = SSM_SFX(ssm_scratch_carve)(P, buf);
    ptrdiff_t base, pix, n, sx, so = 0, so2 = 0, c, j, C = P->C, T = P->tile;
    const R *x;
    R *o = NULL, *o2 = NULL;
    int dense, grad_on_store;
    ssm_tile_geom(P, t, &base, &pix, &n);
    dense = SSM_SFX(ssm_stage)(P, &S, base, pix, n, want_grad, P->loss == SSM_KL);
    grad_on_store = want_grad && !dense && SSM_SFX(ssm_rows_grad_on_store)(P);
    if (P->norms)
        SSM_SFX(ssm_tile_stats)(P, &S, t, pix, n);
    x = SSM_SFX(ssm_load)(P, (const R *)P->x, base, n, S.X, &sx);
    if (want_grad || P->out)
        o = SSM_SFX(ssm_target_block)(P, (R *)P->out, base, S.O, &so);
    if (want_grad && P->out2)
        o2 = SSM_SFX(ssm_target_block)(P, (R *)P->out2, base, S.O2, &so2);

    /* sweeps 1-2: max (and the label's logit), then e = exp(x - m) into `o` (if any),
       s = sum e. The loss alone stores nothing per element: the sweeps run over chunks
       of the tile's pixels whose C rows fit in L1 (SSM_L1_CHUNK bytes), so the second
       reads what the first left there (VOC, 1 thread: 5% faster); per pixel the same
       operations, so the same bits. */
    SSM_SFX(ssm_max_sumexp_chunked)(P, x, sx, o, so, base, n, &S, dense ? NULL : S.cls, S.xlabel);

    /* per pixel: log s, in a loop of R alone (a loop mixing R and double vectorises at
       two widths, or not at all); then the loss and the gradient factors */
#pragma omp simd
    for (j = 0; j < n; j++)
        S.log_sum[j] = SSM_LOG_SUM(S.sumexp[j]);
    if (dense)
        SSM_SFX(ssm_dense_terms)(&S, x, sx, C, n, T, want_grad, P->loss == SSM_KL, o != NULL);
    else  /* one-hot t: the KL divergence is the cross-entropy */
        SSM_SFX(ssm_sparse_terms)(&S, n, P->loss_cap, want_grad, o != NULL);
    if (!o)  /* the loss alone */
        return SSM_SFX(ssm_tile_loss)(P, S.loss, pix, n);

    /* sweep 3: the epilogue, each row streamed out as soon as it is final */
    for (c = 0; c < C; c++) {
        R *restrict oc = o + c * so;
        const R *restrict r = S.inv_sum;
        if (!want_grad) {
            SSM_SFX(ssm_scaled_row_done)(P, (R *)P->out, base, c, n, oc, r, oc);
            continue;
        }
        if (o2)
            SSM_SFX(ssm_scaled_row_done)(P, (R *)P->out2, base, c, n, oc, r, o2 + c * so2);
        if (!dense && SSM_SFX(ssm_grad_row_streamed)(P, (R *)P->out, base, c, n, oc,
                                                     S.gfactor, S.glabel, S.cls))
            continue;
        if (grad_on_store)  /* made by ssm_store_ */
            continue;
        SSM_SFX(ssm_grad_row)(oc, oc, S.gfactor, S.glabel, S.gscale, S.cls,
                              dense ? S.A + c * T : NULL, c, n);
        SSM_SFX(ssm_row_done)(P, (R *)P->out, base, c, n, oc);
    }
    SSM_SFX(ssm_store_)(P, (R *)P->out, base, n, o, grad_on_store ? S.gfactor : NULL,
                        S.glabel, S.cls);
    if (o2)
        SSM_SFX(ssm_store)(P, (R *)P->out2, base, n, o2);
    return SSM_SFX(ssm_tile_loss)(P, S.loss, pix, n);
}

/* The tile of a loss pass (sswl_fwd, sswl_fwd_bwd, the loss alone): ssm_sswl_tile_two
   where it applies, else ssm_sswl_tile. The choice is made here, outside both: a test
   at the top of ssm_sswl_tile made its VOC-like fused pass 2% slower (code placement). */
static inline double SSM_SFX(ssm_sswl_pass_tile)(const ssm_problem *P, ptrdiff_t t, void *buf,
                                                 int want_grad)
{
    if (SSM_SFX(ssm_two_applies)(P, want_grad))
        return SSM_SFX(ssm_sswl_tile_two)(P, t, buf, want_grad);
    return SSM_SFX(ssm_sswl_tile)(P, t, buf, want_grad);
}

/* ---- sswl_bwd: dx_c = g (A q_c - a_c) from the probabilities q ---------------- */

SSM_CLONES double SSM_SFX(ssm_sswl_bwd_tile)(const ssm_problem *P, ptrdiff_t t, void *buf)
{
    SSM_SFX(ssm_scratch) S = SSM_SFX(ssm_scratch_carve)(P, buf);
    ptrdiff_t base, pix, n, sq, so, c, j, C = P->C, T = P->tile;
    const R *q;
    R *o, *f = S.gfactor;
    int dense;
    ssm_tile_geom(P, t, &base, &pix, &n);
    dense = SSM_SFX(ssm_stage)(P, &S, base, pix, n, 1, 0);
    q = SSM_SFX(ssm_load)(P, (const R *)P->x, base, n, S.X, &sq);
    o = SSM_SFX(ssm_target_block)(P, (R *)P->out, base, S.O, &so);
    if (dense) {
        SSM_SFX(ssm_dense_sums)(S.A, T, NULL, 0, C, n, S.asum, NULL, S.hi, S.lo);
        for (j = 0; j < n; j++)
            f[j] = S.gscale[j] * S.act[j] * S.asum[j];
    } else {
        R *restrict ga = S.glabel;
        const R *restrict g = S.gscale, *restrict a = S.act;
#pragma omp simd
        for (j = 0; j < n; j++) {
            ga[j] = g[j] * a[j];
            f[j] = ga[j];  /* q is normalised: the factor is g a */
        }
    }
    for (c = 0; c < C; c++) {
        /* on every clone (see ssm_rows_ahead) */
        SSM_SFX(ssm_prefetch_next)(q + c * sq, n, P->inner > 1 ? 2 * n : 0);
        SSM_SFX(ssm_grad_row)(o + c * so, q + c * sq, f, S.glabel, S.gscale, S.cls,
                              dense ? S.A + c * T : NULL, c, n);
        SSM_SFX(ssm_row_done)(P, (R *)P->out, base, c, n, o + c * so);
    }
    SSM_SFX(ssm_store)(P, (R *)P->out, base, n, o);
    return 0.0;
}
