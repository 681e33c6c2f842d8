/*
 * ssm/_positions_impl.h -- the per-dtype body of _positions.h, included once per R
 * (float, double) with SSM_SFX, SSM_EXP and SSM_LOG defined. Not a standalone header.
 *
 * The row helpers work on one contiguous row of n = L values; every loop is a
 * contiguous, vectorisable sweep.
 */

/* ---- blocked sums: R inside a block of SSM_POS_BLOCK, double across blocks ---------- */

/* sum_l a[l] * (b ? b[l] : 1) */
SSM_INLINE double SSM_SFX(ssm_pos_dot)(const R *restrict a, const R *restrict b, ptrdiff_t n)
{
    double total = 0.0;
    ptrdiff_t l0, l, l1;
    for (l0 = 0; l0 < n; l0 += SSM_POS_BLOCK) {
        R part = 0;
        l1 = n - l0 < SSM_POS_BLOCK ? n : l0 + SSM_POS_BLOCK;
        if (b) {
#pragma omp simd reduction(+:part)
            for (l = l0; l < l1; l++)
                part += a[l] * b[l];
        } else {
#pragma omp simd reduction(+:part)
            for (l = l0; l < l1; l++)
                part += a[l];
        }
        total += (double)part;
    }
    return total;
}

/* sum_l a[l] * (b[l] - c)^2 */
SSM_INLINE double SSM_SFX(ssm_pos_centred)(const R *restrict a, const R *restrict b, R c,
                                           ptrdiff_t n)
{
    double total = 0.0;
    ptrdiff_t l0, l, l1;
    for (l0 = 0; l0 < n; l0 += SSM_POS_BLOCK) {
        R part = 0;
        l1 = n - l0 < SSM_POS_BLOCK ? n : l0 + SSM_POS_BLOCK;
#pragma omp simd reduction(+:part)
        for (l = l0; l < l1; l++) {
            const R v = b[l] - c;
            part += a[l] * v * v;
        }
        total += (double)part;
    }
    return total;
}

/* sum_l dy[l] * z[l] with z = (x - m) / T (logits) or log p (probabilities, 0 where p is
   0, where dy is 0 too): the temperature gradient's sum, -(1/T) times it. Since
   sum_l dy = 0, z may be shifted by any constant per row. */
SSM_INLINE double SSM_SFX(ssm_pos_dtemp_sum)(const R *restrict dy, const R *restrict x,
                                             R m, R it, int logs, ptrdiff_t n)
{
    double total = 0.0;
    ptrdiff_t l0, l, l1;
    for (l0 = 0; l0 < n; l0 += SSM_POS_BLOCK) {
        R part = 0;
        l1 = n - l0 < SSM_POS_BLOCK ? n : l0 + SSM_POS_BLOCK;
        if (logs) {
#pragma omp simd reduction(+:part)
            for (l = l0; l < l1; l++) {
                const R p = x[l] > 0 ? x[l] : (R)1;
                part += dy[l] * SSM_LOG(p);
            }
        } else {
#pragma omp simd reduction(+:part)
            for (l = l0; l < l1; l++)
                part += dy[l] * ((x[l] - m) * it);
        }
        total += (double)part;
    }
    return total;
}

/* m = max_l x[l] (a NaN is never the max; it makes the row's sum NaN) */
SSM_INLINE R SSM_SFX(ssm_pos_max)(const R *restrict x, ptrdiff_t n)
{
    R m = x[0];
    ptrdiff_t l;
#pragma omp simd reduction(max:m)
    for (l = 1; l < n; l++)
        m = x[l] > m ? x[l] : m;
    return m;
}

/* e[l] = exp((x[l] - m) * it); returns sum_l e[l] (blocked). */
SSM_INLINE double SSM_SFX(ssm_pos_exp)(const R *restrict x, R *restrict e, R m, R it,
                                       ptrdiff_t n)
{
    ptrdiff_t l;
#ifdef SSM_EXP_ROW
    (void)l;
    SSM_EXP_ROW(x, e, m, it, n);
#else
#pragma omp simd
    for (l = 0; l < n; l++)
        e[l] = SSM_EXP((x[l] - m) * it);
#endif
    return SSM_SFX(ssm_pos_dot)(e, NULL, n);
}

/* Two sums in one sweep: *s0 = sum_l p[l] g0[l], *s1 = sum_l p[l] g1[l] (blocked). */
SSM_INLINE void SSM_SFX(ssm_pos_dot2)(const R *restrict p, const R *restrict g0,
                                      const R *restrict g1, ptrdiff_t n, double *s0, double *s1)
{
    double t0 = 0.0, t1 = 0.0;
    ptrdiff_t l0, l, l1;
    for (l0 = 0; l0 < n; l0 += SSM_POS_BLOCK) {
        R a = 0, b = 0;
        l1 = n - l0 < SSM_POS_BLOCK ? n : l0 + SSM_POS_BLOCK;
#pragma omp simd reduction(+:a, b)
        for (l = l0; l < l1; l++) {
            a += p[l] * g0[l];
            b += p[l] * g1[l];
        }
        t0 += (double)a;
        t1 += (double)b;
    }
    *s0 = t0;
    *s1 = t1;
}

/* e[l] = exp((x[l] - m) * it) (stored if e != NULL) and its sums against 1, g0, g1 in one
   sweep (the 2-D soft-argmax); returns sum_l e[l]. `pf`, if not NULL, is the next row's
   input, fetched into the cache during this sweep (one line per 64 bytes), so that the
   next row's first sweep finds it there instead of waiting on DRAM. */
SSM_INLINE double SSM_SFX(ssm_pos_exp2)(const R *restrict x, R *restrict e, R m, R it,
                                        const R *restrict g0, const R *restrict g1,
                                        ptrdiff_t n, double *s0, double *s1, const R *pf)
{
    double t = 0.0, t0 = 0.0, t1 = 0.0;
    ptrdiff_t l0, l, l1, k;
    for (l0 = 0; l0 < n; l0 += SSM_POS_BLOCK) {
        R c = 0, a = 0, b = 0;
        l1 = n - l0 < SSM_POS_BLOCK ? n : l0 + SSM_POS_BLOCK;
        if (pf) {
            for (k = l0; k < l1; k += 64 / (ptrdiff_t)sizeof(R))
                __builtin_prefetch(pf + k, 0, 3);
        }
#ifdef SSM_EXP_ROW  /* the exps first (into e, or a block of the stack), then the sums */
        {
            R blk[SSM_POS_BLOCK] __attribute__((aligned(64)));
            R *restrict v = e ? e + l0 : blk;
            SSM_EXP_ROW(x + l0, v, m, it, l1 - l0);
#pragma omp simd reduction(+:c, a, b)
            for (l = l0; l < l1; l++) {
                c += v[l - l0];
                a += v[l - l0] * g0[l];
                b += v[l - l0] * g1[l];
            }
        }
#else
        if (e) {
#pragma omp simd reduction(+:c, a, b)
            for (l = l0; l < l1; l++) {
                const R v = SSM_EXP((x[l] - m) * it);
                e[l] = v;
                c += v;
                a += v * g0[l];
                b += v * g1[l];
            }
        } else {
#pragma omp simd reduction(+:c, a, b)
            for (l = l0; l < l1; l++) {
                const R v = SSM_EXP((x[l] - m) * it);
                c += v;
                a += v * g0[l];
                b += v * g1[l];
            }
        }
#endif
        t += (double)c;
        t0 += (double)a;
        t1 += (double)b;
    }
    *s0 = t0;
    *s1 = t1;
    return t;
}

/* ssm_pos_exp2 for the separable grid of an (H, W) map (the built-in coordinates:
   g0[l] = gx[l % W] with gx = g0[0 .. W), g1[l] = gy[l / W] = g1[(l / W) * W]): the y sum
   taken per line, sum_h gy[h] * (sum of the line's e), so one FMA and one load of g1
   fewer per element. A line is the block of the sums (W <= SSM_POS_BLOCK). */
SSM_INLINE double SSM_SFX(ssm_pos_exp2_sep)(const R *restrict x, R *restrict e, R m, R it,
                                            const R *restrict gx, const R *restrict g1,
                                            ptrdiff_t n, ptrdiff_t W, double *s0, double *s1,
                                            const R *pf)
{
    double t = 0.0, t0 = 0.0, t1 = 0.0;
    ptrdiff_t l0, l, k;
    for (l0 = 0; l0 < n; l0 += W) {
        const R *restrict xl = x + l0;
        R c = 0, a = 0;
        if (pf) {
            for (k = l0; k < l0 + W; k += 64 / (ptrdiff_t)sizeof(R))
                __builtin_prefetch(pf + k, 0, 3);
        }
#ifdef SSM_EXP_ROW  /* W <= SSM_POS_BLOCK: as in ssm_pos_exp2 */
        {
            R blk[SSM_POS_BLOCK] __attribute__((aligned(64)));
            R *restrict v = e ? e + l0 : blk;
            SSM_EXP_ROW(xl, v, m, it, W);
#pragma omp simd reduction(+:c, a)
            for (l = 0; l < W; l++) {
                c += v[l];
                a += v[l] * gx[l];
            }
        }
#else
        if (e) {
            R *restrict el = e + l0;
#pragma omp simd reduction(+:c, a)
            for (l = 0; l < W; l++) {
                const R v = SSM_EXP((xl[l] - m) * it);
                el[l] = v;
                c += v;
                a += v * gx[l];
            }
        } else {
#pragma omp simd reduction(+:c, a)
            for (l = 0; l < W; l++) {
                const R v = SSM_EXP((xl[l] - m) * it);
                c += v;
                a += v * gx[l];
            }
        }
#endif
        t += (double)c;
        t0 += (double)a;
        t1 += (double)g1[l0] * (double)c;
    }
    *s0 = t0;
    *s1 = t1;
    return t;
}

/* Rows of large outputs are copied out with ssm_stream_row (_kernels_impl.h): non-temporal
   stores, ordered by the caller's sfence before its tile ends. */

/* The 2-D soft-argmax (D == 2, no variance) in three sweeps: the max, exp with its three
   sums, and (EXPECT_BWD) dx, written to `out` or, when `stream`, to h and streamed out.
   With e NULL (in place: out given, not streamed) the exp row is kept in `out` itself and
   scaled there (the same operations, the same bits), in loops of their own that touch
   `out` alone, as in ssm_pos_row. */
SSM_INLINE void SSM_SFX(ssm_pos_row2)(const ssm_pos_problem *P, int op, ptrdiff_t r,
                                      const R *restrict x, R *restrict out, R *restrict e,
                                      R *restrict h, int stream, const R *pf)
{
    const ptrdiff_t n = P->L;
    const double T = P->temp[r % P->C], it_d = 1.0 / T;
    const R it = (R)it_d;
    const R *restrict g0 = (const R *)P->grid, *restrict g1 = g0 + n;
    /* the built-in grid, by lines when they are long enough for the per-line sums to pay
       (measured: a loss at W = 64, 9% less time at W = 128) and short enough to be a
       block of the sums */
    const ptrdiff_t W = P->grid_w >= 128 && P->grid_w <= SSM_POS_BLOCK ? P->grid_w : 0;
    const R *restrict p;
    R m = 0;
    double s, E0, E1;
    ptrdiff_t l, l0;
    if (P->from_prob) {
        p = x;
        s = 1.0;
        SSM_SFX(ssm_pos_dot2)(x, g0, g1, n, &E0, &E1);
    } else {
        R *keep = op == SSM_POS_EXPECT && !out ? NULL : e ? e : out;  /* for an output sweep */
        m = SSM_SFX(ssm_pos_max)(x, n);
        if (W)
            s = SSM_SFX(ssm_pos_exp2_sep)(x, keep, m, it, g0, g1, n, W, &E0, &E1, pf);
        else
            s = SSM_SFX(ssm_pos_exp2)(x, keep, m, it, g0, g1, n, &E0, &E1, pf);
        p = e;
    }
    E0 /= s;
    E1 /= s;
    if (P->kp) {
        ((R *)P->kp)[r * 2] = (R)E0;
        ((R *)P->kp)[r * 2 + 1] = (R)E1;
    }
    if (op == SSM_POS_EXPECT) {
        if (out && !e && !P->from_prob) {  /* in place */
            const R rs = (R)(1.0 / s);
#pragma omp simd
            for (l = 0; l < n; l++)
                out[l] = out[l] * rs;
            return;
        }
        if (out) {
            const R rs = (R)(1.0 / s);
            R *restrict o = stream ? h : out;
#pragma omp simd
            for (l = 0; l < n; l++)
                o[l] = p[l] * rs;
            if (stream)
                SSM_SFX(ssm_stream_row)(out, h, n);
        }
        return;
    }
    {   /* dx = p / s * (dk0 g0 + dk1 g1 - K) / T */
        const double w = it_d / s;
        const double dk0 = (double)((const R *)P->dkp)[r * 2];
        const double dk1 = (double)((const R *)P->dkp)[r * 2 + 1];
        const R a0 = (R)(dk0 * w), a1 = (R)(dk1 * w), b = (R)(-(dk0 * E0 + dk1 * E1) * w);
        /* in chunks of whole lines (or SSM_POS_BLOCK elements): a streamed output goes
           out from an L1-resident chunk of h as soon as it is computed */
        const ptrdiff_t chunk = W ? W * (SSM_POS_BLOCK / W) : SSM_POS_BLOCK;
        double dts = 0.0;
        ptrdiff_t c0, c1;
        const int in_place = !e && !P->from_prob;  /* p is out itself */
        for (c0 = 0; c0 < n; c0 = c1) {
            R *restrict o = stream ? h - c0 : out;  /* o[l], l in [c0, c1) */
            c1 = n - c0 < chunk ? n : c0 + chunk;
            if (in_place && W) {
                for (l0 = c0; l0 < c1; l0 += W) {
                    const R cl = a1 * g1[l0] + b;
#pragma omp simd
                    for (l = l0; l < l0 + W; l++)
                        out[l] = out[l] * (a0 * g0[l - l0] + cl);
                }
            } else if (in_place) {
#pragma omp simd
                for (l = c0; l < c1; l++)
                    out[l] = out[l] * (a0 * g0[l] + a1 * g1[l] + b);
            } else if (W) {
                for (l0 = c0; l0 < c1; l0 += W) {
                    const R cl = a1 * g1[l0] + b;
#pragma omp simd
                    for (l = l0; l < l0 + W; l++)
                        o[l] = p[l] * (a0 * g0[l - l0] + cl);
                }
            } else {
#pragma omp simd
                for (l = c0; l < c1; l++)
                    o[l] = p[l] * (a0 * g0[l] + a1 * g1[l] + b);
            }
            if (P->dtemp)  /* dT = -(1/T) sum dy z = -sum dx z */
                dts += SSM_SFX(ssm_pos_dtemp_sum)(in_place ? out + c0 : o + c0, x + c0, m, it,
                                                  P->from_prob, c1 - c0);
            if (stream)
                SSM_SFX(ssm_stream_row)(out + c0, h, c1 - c0);
        }
        if (P->dtemp)
            P->dtemp[r] = -dts;
    }
}

/* ---- one row -------------------------------------------------------------------------- */

/* Pass `op` over row r: x (and x2) its n = L contiguous values, out its output row (or
   NULL), e and h scratch rows of L. Writes kp, var and dtemp at r as asked. SOFTMAX and
   SOFTMAX_BWD with e or h NULL keep that row in `out` instead (the same operations, the
   same bits: each element is stored as R and read back), in loops of their own: one loop
   for both through a pointer that may alias `out` (no restrict) took 5% more
   instructions on the scratch path (callgrind, spatial_softmax and its gradient, 64 x 48
   to 512 x 512 maps). */
SSM_INLINE void SSM_SFX(ssm_pos_row)(const ssm_pos_problem *P, int op, ptrdiff_t r,
                                     const R *restrict x, const R *restrict x2,
                                     R *restrict out, R *restrict e, R *restrict h)
{
    const ptrdiff_t n = P->L, D = P->D;
    const double T = P->temp[r % P->C], it_d = 1.0 / T;
    const R it = (R)it_d;
    const R *restrict grid = (const R *)P->grid;
    const R *restrict p;  /* the (unnormalised) probabilities: e, or x itself */
    R m = 0, rs;
    double s, K = 0.0;
    ptrdiff_t l, d;

    if (op == SSM_POS_SOFTMAX) {
        m = SSM_SFX(ssm_pos_max)(x, n);
        if (!e) {  /* in place */
            rs = (R)(1.0 / SSM_SFX(ssm_pos_exp)(x, out, m, it, n));
#pragma omp simd
            for (l = 0; l < n; l++)
                out[l] = out[l] * rs;
            return;
        }
        rs = (R)(1.0 / SSM_SFX(ssm_pos_exp)(x, e, m, it, n));
#pragma omp simd
        for (l = 0; l < n; l++)
            out[l] = e[l] * rs;
        return;
    }
    if (op == SSM_POS_SOFTMAX_BWD) {
        /* dy = p * (dp - sum p dp); dx = dy / T */
        const R dot = (R)SSM_SFX(ssm_pos_dot)(x, x2, n);
        if (!h) {  /* in place: dy in out, then scaled there */
#pragma omp simd
            for (l = 0; l < n; l++)
                out[l] = x[l] * (x2[l] - dot);
            if (P->dtemp)
                P->dtemp[r] = -it_d * SSM_SFX(ssm_pos_dtemp_sum)(out, x, 0, it, 1, n);
#pragma omp simd
            for (l = 0; l < n; l++)
                out[l] = out[l] * it;
            return;
        }
#pragma omp simd
        for (l = 0; l < n; l++)
            h[l] = x[l] * (x2[l] - dot);
        if (P->dtemp)
            P->dtemp[r] = -it_d * SSM_SFX(ssm_pos_dtemp_sum)(h, x, 0, it, 1, n);
#pragma omp simd
        for (l = 0; l < n; l++)
            out[l] = h[l] * it;
        return;
    }

    /* EXPECT, EXPECT_BWD: E_d = sum_l p_l g_d[l] / s */
    if (P->from_prob) {
        p = x;
        s = 1.0;  /* probabilities are used as given, not renormalised (as kornia) */
    } else {
        m = SSM_SFX(ssm_pos_max)(x, n);
        s = SSM_SFX(ssm_pos_exp)(x, e, m, it, n);
        p = e;
    }
    rs = (R)(1.0 / s);
    for (d = 0; d < D; d++) {
        const R *restrict g = grid + d * n;
        const double E = SSM_SFX(ssm_pos_dot)(p, g, n) / s;
        if (P->kp)
            ((R *)P->kp)[r * D + d] = (R)E;
        if (P->var) {
            const double v = SSM_SFX(ssm_pos_centred)(p, g, (R)E, n) / s;
            ((R *)P->var)[r * D + d] = (R)(v > 0.0 ? v : 0.0);
        }
        if (op == SSM_POS_EXPECT_BWD)
            K += (double)((const R *)P->dkp)[r * D + d] * E;
    }
    if (op == SSM_POS_EXPECT) {
        if (out) {
#pragma omp simd
            for (l = 0; l < n; l++)
                out[l] = p[l] * rs;
        }
        return;
    }
    /* EXPECT_BWD: h_l = sum_d dk_d g_d[l] - K; dy = p h / s; dx = dy / T */
    {
        const R Kr = (R)K;
#pragma omp simd
        for (l = 0; l < n; l++)
            h[l] = -Kr;
        for (d = 0; d < D; d++) {
            const R *restrict g = grid + d * n;
            const R dk = ((const R *)P->dkp)[r * D + d];
#pragma omp simd
            for (l = 0; l < n; l++)
                h[l] += dk * g[l];
        }
#pragma omp simd
        for (l = 0; l < n; l++)
            h[l] = p[l] * rs * h[l];
        if (P->dtemp)
            P->dtemp[r] = -it_d * SSM_SFX(ssm_pos_dtemp_sum)(h, x, m, it, P->from_prob, n);
#pragma omp simd
        for (l = 0; l < n; l++)
            out[l] = h[l] * it;
    }
}

/* ---- one tile ------------------------------------------------------------------------- */

SSM_INLINE char *SSM_SFX(ssm_pos_align)(char *p)
{
    return (char *)(((uintptr_t)p + 63) & ~(uintptr_t)63);
}

/* Pass `op` over tile t (see ssm_pos_num_tiles) with per-thread scratch `buf` of
   ssm_pos_scratch_bytes(P, sizeof(R)) bytes. */
SSM_CLONES void SSM_SFX(ssm_pos_tile)(const ssm_pos_problem *P, int op, ptrdiff_t t, void *buf)
{
    const ptrdiff_t L = P->L, inner = P->inner, T = P->tile;
    const R *x = (const R *)P->x, *x2 = (const R *)P->x2;
    R *out = (R *)P->out;
    /* the fused 2-D soft-argmax, else the general row function */
    const int two = P->D == 2 && !P->var && (op == SSM_POS_EXPECT || op == SSM_POS_EXPECT_BWD);
    char *q = SSM_SFX(ssm_pos_align)((char *)buf);
    R *e = (R *)q, *h, *o;
    ptrdiff_t r0, r, nr;
    q = SSM_SFX(ssm_pos_align)(q + L * sizeof(R));
    h = (R *)q;
    q = SSM_SFX(ssm_pos_align)(q + L * sizeof(R));
    o = (R *)q;
    q = SSM_SFX(ssm_pos_align)(q + L * sizeof(R));

    if (inner == 1) {  /* contiguous rows, in place (large outputs streamed from scratch) */
        const int stream = P->stream && out != NULL;
        r0 = t * T;
        nr = P->outer - r0 < T ? P->outer - r0 : T;
        for (r = r0; r < r0 + nr; r++) {
            R *dst = out ? out + r * L : NULL;
            if (two) {
                const int in_place = P->in_place && !stream && dst;  /* e in dst */
                SSM_SFX(ssm_pos_row2)(P, op, r, x + r * L, dst, in_place ? NULL : e, h, stream,
                                      r + 1 < P->outer ? x + (r + 1) * L : NULL);
            } else if (P->in_place && !stream && dst
                       && (op == SSM_POS_SOFTMAX || op == SSM_POS_SOFTMAX_BWD)) {
                SSM_SFX(ssm_pos_row)(P, op, r, x + r * L, x2 ? x2 + r * L : NULL, dst,
                                     NULL, NULL);
            } else {
                SSM_SFX(ssm_pos_row)(P, op, r, x + r * L, x2 ? x2 + r * L : NULL,
                                     stream ? o : dst, e, h);
                if (stream)
                    SSM_SFX(ssm_stream_row)(dst, o, L);
            }
        }
#if defined(__SSE2__)
        if (stream)
            _mm_sfence();
#endif
        return;
    }
    /* strided rows: channels [i0, i0 + nr) of image im, gathered as nr rows of L, Ls
       apart (see ssm_pos_row_stride) */
    {
        const ptrdiff_t per = (inner + T - 1) / T, im = t / per, i0 = (t % per) * T;
        const ptrdiff_t base = im * L * inner + i0, Ls = ssm_pos_row_stride(L, sizeof(R));
        R *X = (R *)q, *X2, *O;
        ptrdiff_t l, j;
        q = SSM_SFX(ssm_pos_align)(q + T * Ls * sizeof(R));
        X2 = (R *)q;
        q = SSM_SFX(ssm_pos_align)(q + T * Ls * sizeof(R));
        O = (R *)q;
        nr = inner - i0 < T ? inner - i0 : T;
        for (l = 0; l < L; l++) {
            const R *src = x + base + l * inner;
            for (j = 0; j < nr; j++)
                X[j * Ls + l] = src[j];
        }
        if (x2) {
            for (l = 0; l < L; l++) {
                const R *src = x2 + base + l * inner;
                for (j = 0; j < nr; j++)
                    X2[j * Ls + l] = src[j];
            }
        }
        for (j = 0; j < nr; j++) {
            R *dst = out ? O + j * Ls : NULL;
            if (two)
                SSM_SFX(ssm_pos_row2)(P, op, im * inner + i0 + j, X + j * Ls, dst, e, h, 0, NULL);
            else
                SSM_SFX(ssm_pos_row)(P, op, im * inner + i0 + j, X + j * Ls,
                                     x2 ? X2 + j * Ls : NULL, dst, e, h);
        }
        if (out) {
            for (l = 0; l < L; l++) {
                R *dst = out + base + l * inner;
                for (j = 0; j < nr; j++)
                    dst[j] = O[j * Ls + l];
            }
        }
    }
}

#ifdef SSM_POS_HALF
/* ---- half-width maps (float16, bfloat16) ----------------------------------------------
 * The float rows above on widened rows: each row of the tile widened into a float row
 * (contiguous) or gathered widened (strided), the row function run on a one-row problem
 * Q (Q.C = 1, the row's temperature, its kp/var/dkp in D-float scratch, its dtemp at r),
 * and its float outputs rounded once to the half type. So every element is the float32
 * path's on the widened input, rounded: bit for bit (tests/test_positions.py). */
SSM_CLONES void SSM_SFX(ssm_pos_tile_half)(const ssm_pos_problem *P, int op, ptrdiff_t t,
                                           void *buf, int bf16)
{
    const ptrdiff_t L = P->L, inner = P->inner, T = P->tile, D = P->D;
    const uint16_t *x = (const uint16_t *)P->x, *x2 = (const uint16_t *)P->x2;
    const uint16_t *dkp = (const uint16_t *)P->dkp;
    uint16_t *out = (uint16_t *)P->out, *kp = (uint16_t *)P->kp, *var = (uint16_t *)P->var;
    const int two = D == 2 && !P->var && (op == SSM_POS_EXPECT || op == SSM_POS_EXPECT_BWD);
    const ptrdiff_t Ls = inner > 1 ? ssm_pos_row_stride(L, sizeof(R)) : L;
    const ptrdiff_t TL = inner > 1 ? T * Ls : L;  /* a tile's gathered rows, or one row */
    char *q = SSM_SFX(ssm_pos_align)((char *)buf);
    R *e, *h, *X, *X2, *O, *kw, *vw, *dw;
    uint16_t *tmp;
    ssm_pos_problem Q = *P;
    ptrdiff_t base = 0, r0, nr, j, l, d;
#define SSM_POS_CARVE(ptr, type, count) \
    ptr = (type *)q;                     \
    q = SSM_SFX(ssm_pos_align)(q + (size_t)(count) * sizeof(type))
    SSM_POS_CARVE(e, R, L);
    SSM_POS_CARVE(h, R, L);
    SSM_POS_CARVE(X, R, TL);
    SSM_POS_CARVE(X2, R, TL);
    SSM_POS_CARVE(O, R, TL);
    SSM_POS_CARVE(kw, R, 3 * D);
    SSM_POS_CARVE(tmp, uint16_t, L);
#undef SSM_POS_CARVE
    vw = kw + D;
    dw = kw + 2 * D;
    Q.C = 1;
    Q.kp = kp ? (void *)kw : NULL;
    Q.var = var ? (void *)vw : NULL;
    Q.dkp = dw;

    if (inner == 1) {  /* rows [r0, r0 + nr), one at a time through X's first row */
        r0 = t * T;
        nr = P->outer - r0 < T ? P->outer - r0 : T;
    } else {           /* channels [i0, i0 + nr) of image im, gathered widened */
        const ptrdiff_t per = (inner + T - 1) / T, im = t / per, i0 = (t % per) * T;
        base = im * L * inner + i0;
        r0 = im * inner + i0;
        nr = inner - i0 < T ? inner - i0 : T;
        for (l = 0; l < L; l++) {
            const uint16_t *src = x + base + l * inner, *src2 = x2 ? x2 + base + l * inner : NULL;
            for (j = 0; j < nr; j++)
                X[j * Ls + l] = bf16 ? ssm_bf16_to_f(src[j]) : ssm_f16_to_f(src[j]);
            for (j = 0; src2 && j < nr; j++)
                X2[j * Ls + l] = bf16 ? ssm_bf16_to_f(src2[j]) : ssm_f16_to_f(src2[j]);
        }
    }
    for (j = 0; j < nr; j++) {
        const ptrdiff_t r = r0 + j;
        R *xr = inner == 1 ? X : X + j * Ls, *x2r = inner == 1 ? X2 : X2 + j * Ls;
        R *o = out ? (inner == 1 ? O : O + j * Ls) : NULL;
        if (inner == 1) {
            if (bf16) ssm_widen_b(x + r * L, xr, L); else ssm_widen_h(x + r * L, xr, L);
            if (x2 && bf16) ssm_widen_b(x2 + r * L, x2r, L);
            else if (x2) ssm_widen_h(x2 + r * L, x2r, L);
        }
        Q.temp = P->temp + r % P->C;
        Q.dtemp = P->dtemp ? P->dtemp + r : NULL;
        for (d = 0; op == SSM_POS_EXPECT_BWD && d < D; d++)
            dw[d] = bf16 ? ssm_bf16_to_f(dkp[r * D + d]) : ssm_f16_to_f(dkp[r * D + d]);
        if (two)
            SSM_SFX(ssm_pos_row2)(&Q, op, 0, xr, o, e, h, 0, NULL);
        else
            SSM_SFX(ssm_pos_row)(&Q, op, 0, xr, x2 ? x2r : NULL, o, e, h);
        for (d = 0; d < D; d++) {
            if (kp)
                kp[r * D + d] = bf16 ? ssm_f_to_bf16(kw[d]) : ssm_f_to_f16(kw[d]);
            if (var)
                var[r * D + d] = bf16 ? ssm_f_to_bf16(vw[d]) : ssm_f_to_f16(vw[d]);
        }
        if (out && inner == 1) {
            uint16_t *dst = out + r * L;
            if (bf16) ssm_narrow_out_b(O, dst, L, P->stream, tmp);
            else ssm_narrow_out_h(O, dst, L, P->stream, tmp);
        }
    }
    if (out && inner > 1) {
        for (l = 0; l < L; l++) {
            uint16_t *dst = out + base + l * inner;
            for (j = 0; j < nr; j++)
                dst[j] = bf16 ? ssm_f_to_bf16(O[j * Ls + l]) : ssm_f_to_f16(O[j * Ls + l]);
        }
    }
#if defined(__SSE2__)
    if (out && inner == 1 && P->stream)
        _mm_sfence();
#endif
}
#endif
