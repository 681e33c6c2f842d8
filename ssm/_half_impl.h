/*
 * ssm/_half_impl.h -- the tile drivers of one half type, included by _half.h with
 * SSM_HSFX (name suffix: _h float16, _b bfloat16), SSM_H_TO_F, SSM_F_TO_H and
 * SSM_H_F16C (1: use F16C where the CPU has it) defined. Not a standalone header.
 *
 * Each driver widens the tile's half inputs into float scratch, runs the float tile
 * function on a sub-problem of exactly that tile, and narrows its outputs (see the
 * design block of _half.h).
 */

/* n half elements -> float */
SSM_INLINE void SSM_HSFX(ssm_widen)(const uint16_t *restrict h, float *restrict f, ptrdiff_t n)
{
    ptrdiff_t j;
#if defined(SSM_F16C)
    if (SSM_H_F16C && ssm_cpu_has_f16c()) {
        ssm_f16_to_f_row_f16c(h, f, n);
        return;
    }
#endif
#pragma omp simd
    for (j = 0; j < n; j++)
        f[j] = SSM_H_TO_F(h[j]);
}

/* n floats -> half, into h */
SSM_INLINE void SSM_HSFX(ssm_narrow)(const float *restrict f, uint16_t *restrict h, ptrdiff_t n)
{
    ptrdiff_t j;
#if defined(SSM_F16C)
    if (SSM_H_F16C && ssm_cpu_has_f16c()) {
        ssm_f_to_f16_row_f16c(f, h, n);
        return;
    }
#endif
#pragma omp simd
    for (j = 0; j < n; j++)
        h[j] = SSM_F_TO_H(f[j]);
}

/* n floats -> half at dst: directly, or through the L1 row tmp and non-temporal stores
   (see ssm_stream_u16) */
SSM_INLINE void SSM_HSFX(ssm_narrow_out)(const float *f, uint16_t *dst, ptrdiff_t n, int stream,
                                         uint16_t *tmp)
{
    if (!stream) {
        SSM_HSFX(ssm_narrow)(f, dst, n);
        return;
    }
    SSM_HSFX(ssm_narrow)(f, tmp, n);
    ssm_stream_u16(dst, tmp, n);
}

/* The tile of half input `src` as float: channel rows (strided channels, each row of the
   tile after next prefetched, as the float path does) into blk[c * n + j], or the tile's
   contiguous rows as they are. */
SSM_INLINE void SSM_HSFX(ssm_half_load)(const ssm_problem *P, const void *src, ptrdiff_t base,
                                        ptrdiff_t n, float *blk)
{
    const uint16_t *s = (const uint16_t *)src + base;
    ptrdiff_t c, j;
    if (P->inner == 1) {
        SSM_HSFX(ssm_widen)(s, blk, n * P->C);
        return;
    }
    for (c = 0; c < P->C; c++) {
        const uint16_t *row = s + c * P->inner;
        uintptr_t ahead = (uintptr_t)row + (uintptr_t)(2 * n) * sizeof(uint16_t);
        for (j = 0; j < n; j += 32)
            SSM_PREFETCH((const void *)(ahead + (uintptr_t)j * sizeof(uint16_t)));
        SSM_HSFX(ssm_widen)(row, blk + c * n, n);
    }
}

/* The float tile output blk (laid out as ssm_half_load's) -> half array dst. */
SSM_INLINE void SSM_HSFX(ssm_half_store)(const ssm_problem *P, void *dst, ptrdiff_t base,
                                         ptrdiff_t n, const float *blk, uint16_t *tmp)
{
    uint16_t *d = (uint16_t *)dst + base;
    ptrdiff_t c;
    if (P->inner == 1)
        SSM_HSFX(ssm_narrow_out)(blk, d, n * P->C, P->stream, tmp);
    else
        for (c = 0; c < P->C; c++)
            SSM_HSFX(ssm_narrow_out)(blk + c * n, d + c * P->inner, n, P->stream, tmp);
#if defined(__SSE2__)
    if (P->stream)
        _mm_sfence();
#endif
}

/* Tile t of P as a float problem in scratch. Labels, weights and d_loss maps (float32:
   see _half.h) are read in place from the tile's first pixel; *hs gets the half driver's
   blocks, *sub_buf the float function's scratch. The caller points x, x2, target (soft),
   out, out2 and loss_map at float scratch. */
SSM_INLINE ssm_problem SSM_HSFX(ssm_half_sub)(const ssm_problem *P, ptrdiff_t t, void *buf,
                                              ptrdiff_t *base, ptrdiff_t *pix, ptrdiff_t *n,
                                              float **blk, float **lmap, uint16_t **tmp,
                                              void **sub_buf)
{
    ssm_problem S = *P;
    size_t T = (size_t)P->tile, CT = (size_t)P->C * T;
    char *p;
    int k;
    ssm_tile_geom(P, t, base, pix, n);
    /* strided channels: (1, C, n); rows: (n, C, 1); one tile either way */
    S.outer = P->inner > 1 ? 1 : *n;
    S.inner = P->inner > 1 ? *n : 1;
    S.tile = *n;
    S.stream = 0;
    S.norms = NULL;  /* the half driver's own, of tile t */
    S.bads = NULL;
    S.x = S.x2 = NULL;
    S.out = S.out2 = S.loss_map = NULL;
    if (P->target_kind != SSM_SOFT && P->target)
        S.target = (const char *)P->target + *pix * (ptrdiff_t)ssm_label_bytes(P->target_kind);
    if (P->w)
        S.w = (const float *)P->w + *pix;
    if (P->d_loss_map)
        S.d_loss_map = (const float *)P->d_loss_map + *pix;
    *sub_buf = buf;
    p = (char *)buf + ssm_round64(ssm_scratch_bytes(P, sizeof(float)));
    p = (char *)(((uintptr_t)p + 63) & ~(uintptr_t)63);
    for (k = 0; k < 4; k++) {  /* must match ssm_half_scratch_bytes */
        blk[k] = (float *)p;
        p += ssm_round64(CT * sizeof(float));
    }
    *lmap = (float *)p;
    p += ssm_round64(T * sizeof(float));
    *tmp = (uint16_t *)p;
    return S;
}

/* The per-pixel loss map of a tile, from the float row. */
SSM_INLINE void SSM_HSFX(ssm_half_loss_map)(const ssm_problem *P, ptrdiff_t pix, ptrdiff_t n,
                                            const float *lmap)
{
    if (P->loss_map)
        SSM_HSFX(ssm_narrow)(lmap, (uint16_t *)P->loss_map + pix, n);
}

/* ---- direct tiles: strided channels, labels ------------------------------------
 * The loss passes of the common case (NCHW, integer labels, no lens, no smoothing) skip
 * the widened tile and the float output blocks: the logits are widened an L1 chunk at a
 * time (the chunks of ssm_max_sumexp_chunked, so that the two sweeps that follow read
 * the chunk from L1 as the float path reads its own), and each output row is computed
 * from the row of exp in scratch, rounded and streamed in one pass (ssm_half_*_row_avx2).
 * Every float operation is the float path's, on the same values, in the same order: the
 * bits of the widened path (tests/test_half.py compares the two). */

/* The tile goes the direct way: strided channels, sparse targets (ssm_stage's
   test), and the label pre-pass's staging. */
SSM_INLINE int SSM_HSFX(ssm_half_direct)(const ssm_problem *P)
{
    return P->inner > 1 && P->target_kind != SSM_SOFT && P->target_kind != SSM_NO_TARGET
        && P->lens == NULL && P->smoothing == 0.0;
}

/* Row c of an output: probabilities e r (f == NULL) or the sparse gradient (factor f,
   glabel gl) into the half array at dst (the row's first pixel), from the float row e.
   Streamed in one pass where the CPU allows; else computed into the float row `row`
   (which may be e), rounded and written out as the widened path does. */
SSM_INLINE void SSM_HSFX(ssm_half_out_row)(const ssm_problem *P, uint16_t *dst, float *e,
                                           const float *r, const float *f, const float *gl,
                                           const int32_t *cls, ptrdiff_t c, ptrdiff_t n,
                                           float *row, uint16_t *tmp)
{
    ptrdiff_t j;
#if defined(SSM_F16C)
    if (P->stream && ssm_cpu_has_avx512bw()) {
        if (f)
            SSM_HSFX(ssm_half_grad_row_avx512)(dst, e, f, gl, cls, (int32_t)c, n);
        else
            SSM_HSFX(ssm_half_prob_row_avx512)(dst, e, r, n);
        return;
    }
    if (P->stream && ssm_cpu_has_avx2_f16c()) {
        if (f)
            SSM_HSFX(ssm_half_grad_row_avx2)(dst, e, f, gl, cls, (int32_t)c, n);
        else
            SSM_HSFX(ssm_half_prob_row_avx2)(dst, e, r, n);
        return;
    }
#endif
    if (f) {
        ssm_grad_row_f(row, e, f, gl, NULL, cls, NULL, c, n);
    } else {
#pragma omp simd
        for (j = 0; j < n; j++)
            row[j] = e[j] * r[j];
    }
    SSM_HSFX(ssm_narrow_out)(row, dst, n, P->stream, tmp);
}

/* 1: a direct tile's max sweep is ssm_half_widen_max_avx2_* (see ssm_cpu_has_avx2_f16c);
   0: the compiler's loops of ssm_widen_max (float16 by the software conversion). */
SSM_INLINE int SSM_HSFX(ssm_widen_avx2)(void)
{
#if defined(SSM_F16C)
    return ssm_cpu_has_avx2_f16c();
#else
    return 0;
#endif
}

/* The chunk's C half rows (x, channel stride sx) widened into W[c * n + j] and their
   maximum m[j], in one sweep: the max of ssm_max_sumexp (two rows a pass, the same
   comparisons in the same order: the same m, NaN included). */
SSM_INLINE void SSM_HSFX(ssm_widen_max)(const uint16_t *restrict x, ptrdiff_t sx,
                                        float *restrict W, ptrdiff_t C, ptrdiff_t n,
                                        ptrdiff_t pf, float *restrict m)
{
    ptrdiff_t c, j;
    ssm_prefetch_u16(x, n, pf);
#pragma omp simd
    for (j = 0; j < n; j++)
        m[j] = W[j] = SSM_H_TO_F(x[j]);
    for (c = 1; c + 1 < C; c += 2) {
        const uint16_t *restrict x0 = x + c * sx, *restrict x1 = x0 + sx;
        float *restrict W0 = W + c * n, *restrict W1 = W0 + n;
        ssm_prefetch_u16(x0, n, pf);
        ssm_prefetch_u16(x1, n, pf);
#pragma omp simd
        for (j = 0; j < n; j++) {
            float w0 = SSM_H_TO_F(x0[j]), w1 = SSM_H_TO_F(x1[j]);
            float v = w0 > m[j] ? w0 : m[j];
            W0[j] = w0;
            W1[j] = w1;
            m[j] = w1 > v ? w1 : v;
        }
    }
    if (c < C) {
        const uint16_t *restrict xc = x + c * sx;
        float *restrict Wc = W + c * n;
        ssm_prefetch_u16(xc, n, pf);
#pragma omp simd
        for (j = 0; j < n; j++) {
            float w = SSM_H_TO_F(xc[j]);
            Wc[j] = w;
            m[j] = w > m[j] ? w : m[j];
        }
    }
}

/* sswl_fwd and sswl_fwd_bwd of a direct tile (as ssm_sswl_tile_f, see there). */
SSM_INLINE double SSM_HSFX(ssm_sswl_tile_direct)(const ssm_problem *P, ptrdiff_t t, void *buf,
                                                 int want_grad)
{
    ssm_scratch_f S = ssm_scratch_carve_f(P, buf);
    ssm_problem L = *P;
    ptrdiff_t base, pix, n, c, j, j0, nc, C = P->C, T = P->tile, chunk;
    float *blk[4], *lmap, *o = NULL, *W;
    uint16_t *tmp, *out = (uint16_t *)P->out, *out2 = (uint16_t *)P->out2;
    void *sb;
    double r;
    (void)SSM_HSFX(ssm_half_sub)(P, t, buf, &base, &pix, &n, blk, &lmap, &tmp, &sb);
    (void)ssm_stage_f(P, &S, base, pix, n, want_grad, P->loss == SSM_KL);  /* sparse */
    if (P->norms)
        ssm_tile_stats_f(P, &S, t, pix, n);
    if (want_grad || P->out)
        o = S.O;  /* the rows of e, in scratch */
    W = blk[0];   /* the widened chunk */
    chunk = ssm_l1_chunk(C, n, (ptrdiff_t)sizeof(float));  /* the float path's chunks */
    for (j0 = 0; j0 < n; j0 += nc) {
        const uint16_t *xc = (const uint16_t *)P->x + base + j0;
        nc = n - j0 < chunk ? n - j0 : chunk;
#if defined(SSM_F16C)
        if (SSM_HSFX(ssm_widen_avx2)())
            SSM_HSFX(ssm_half_widen_max_avx2)(xc, P->inner, W, C, nc, 2 * n, S.xmax + j0);
        else
#endif
            SSM_HSFX(ssm_widen_max)(xc, P->inner, W, C, nc, 2 * n, S.xmax + j0);
        ssm_half_sumexp(W, o ? o + j0 : NULL, T, C, nc, &S, j0);
    }
#pragma omp simd
    for (j = 0; j < n; j++)
        S.log_sum[j] = ssm_logf_sum(S.sumexp[j]);  /* the float kernels' SSM_LOG_SUM: must match */
    ssm_sparse_terms_f(&S, n, P->loss_cap, want_grad, o != NULL);
    L.loss_map = P->loss_map ? lmap : NULL;  /* float, then rounded, as the widened path */
    r = ssm_tile_loss_f(&L, S.loss, 0, n);
    SSM_HSFX(ssm_half_loss_map)(P, pix, n, lmap);
    if (!o)  /* the loss alone */
        return r;
    for (c = 0; c < C; c++) {
        float *ec = o + c * T;
        ptrdiff_t at = base + c * P->inner;
        if (!want_grad) {
            SSM_HSFX(ssm_half_out_row)(P, out + at, ec, S.inv_sum, NULL, NULL, NULL, c, n, ec,
                                       tmp);
            continue;
        }
        if (out2)  /* before the gradient overwrites e in the fallback */
            SSM_HSFX(ssm_half_out_row)(P, out2 + at, ec, S.inv_sum, NULL, NULL, NULL, c, n,
                                       blk[1], tmp);
        SSM_HSFX(ssm_half_out_row)(P, out + at, ec, NULL, S.gfactor, S.glabel, S.cls, c, n, ec,
                                   tmp);
    }
#if defined(__SSE2__)
    if (P->stream)
        _mm_sfence();
#endif
    return r;
}

SSM_CLONES double SSM_HSFX(ssm_softmax_fwd_tile)(const ssm_problem *P, ptrdiff_t t, void *buf,
                                                 int logspace)
{
    ptrdiff_t base, pix, n;
    float *blk[4], *lmap;
    uint16_t *tmp;
    void *sb;
    double r;
    ssm_problem S = SSM_HSFX(ssm_half_sub)(P, t, buf, &base, &pix, &n, blk, &lmap, &tmp, &sb);
    SSM_HSFX(ssm_half_load)(P, P->x, base, n, blk[0]);
    S.x = blk[0];
    S.out = blk[2];
    r = ssm_softmax_fwd_tile_f(&S, 0, sb, logspace);
    SSM_HSFX(ssm_half_store)(P, P->out, base, n, blk[2], tmp);
    return r;
}

SSM_CLONES double SSM_HSFX(ssm_softmax_bwd_tile)(const ssm_problem *P, ptrdiff_t t, void *buf)
{
    ptrdiff_t base, pix, n;
    float *blk[4], *lmap;
    uint16_t *tmp;
    void *sb;
    double r;
    ssm_problem S = SSM_HSFX(ssm_half_sub)(P, t, buf, &base, &pix, &n, blk, &lmap, &tmp, &sb);
    SSM_HSFX(ssm_half_load)(P, P->x, base, n, blk[0]);
    SSM_HSFX(ssm_half_load)(P, P->x2, base, n, blk[1]);
    S.x = blk[0];
    S.x2 = blk[1];
    S.out = blk[2];
    r = ssm_softmax_bwd_tile_f(&S, 0, sb);
    SSM_HSFX(ssm_half_store)(P, P->out, base, n, blk[2], tmp);
    return r;
}

/* sswl_fwd (want_grad 0: prob, or the loss alone without out) and sswl_fwd_bwd */
SSM_CLONES double SSM_HSFX(ssm_sswl_tile)(const ssm_problem *P, ptrdiff_t t, void *buf,
                                          int want_grad)
{
    ptrdiff_t base, pix, n;
    float *blk[4], *lmap;
    uint16_t *tmp;
    void *sb;
    double r;
    ssm_problem S;
    if (SSM_HSFX(ssm_half_direct)(P))
        return SSM_HSFX(ssm_sswl_tile_direct)(P, t, buf, want_grad);
    S = SSM_HSFX(ssm_half_sub)(P, t, buf, &base, &pix, &n, blk, &lmap, &tmp, &sb);
    SSM_HSFX(ssm_half_load)(P, P->x, base, n, blk[0]);
    S.x = blk[0];
    if (P->target_kind == SSM_SOFT) {
        SSM_HSFX(ssm_half_load)(P, P->target, base, n, blk[1]);
        S.target = blk[1];
    }
    S.out = P->out ? blk[2] : NULL;
    S.out2 = P->out2 ? blk[3] : NULL;
    S.loss_map = P->loss_map ? lmap : NULL;
    if (P->norms)  /* P: the widened problem (float32 weights) */
        ssm_label_stats_f(P, pix, n, &P->norms[t], &P->bads[t]);
    r = ssm_sswl_pass_tile_f(&S, 0, sb, want_grad);
    if (P->out)
        SSM_HSFX(ssm_half_store)(P, P->out, base, n, blk[2], tmp);
    if (P->out2)
        SSM_HSFX(ssm_half_store)(P, P->out2, base, n, blk[3], tmp);
    SSM_HSFX(ssm_half_loss_map)(P, pix, n, lmap);
    return r;
}

SSM_CLONES double SSM_HSFX(ssm_sswl_bwd_tile)(const ssm_problem *P, ptrdiff_t t, void *buf)
{
    ptrdiff_t base, pix, n;
    float *blk[4], *lmap;
    uint16_t *tmp;
    void *sb;
    double r;
    ssm_problem S = SSM_HSFX(ssm_half_sub)(P, t, buf, &base, &pix, &n, blk, &lmap, &tmp, &sb);
    SSM_HSFX(ssm_half_load)(P, P->x, base, n, blk[0]);
    S.x = blk[0];
    if (P->target_kind == SSM_SOFT) {
        SSM_HSFX(ssm_half_load)(P, P->target, base, n, blk[1]);
        S.target = blk[1];
    }
    S.out = blk[2];
    r = ssm_sswl_bwd_tile_f(&S, 0, sb);
    SSM_HSFX(ssm_half_store)(P, P->out, base, n, blk[2], tmp);
    return r;
}
