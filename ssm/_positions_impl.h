/*
 * ssm/_positions_impl.h -- the per-dtype body of _positions.h, included once per R
 * (float, double) with SSM_SFX, SSM_EXP and SSM_LOG defined. Not a standalone header.
 *
 * The row helpers work on one contiguous row of n = L values; every loop is a
 * contiguous, vectorisable sweep.
 */

/* ---- blocked sums: R inside a block of SSM_POS_BLOCK, double across blocks ---------- */

/* Every blocked sum takes the running total of the blocks before it (`total`: 0 for a
   whole row), so that a row summed chunk by chunk (chunks of whole blocks, see
   ssm_pos_tile_chunks) adds the same block sums in the same order: the same bits. */

/* total + sum_l a[l] * (b ? b[l] : 1) */
SSM_INLINE double SSM_SFX(ssm_pos_dot_acc)(const R *restrict a, const R *restrict b,
                                           ptrdiff_t n, double total)
{
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

SSM_INLINE double SSM_SFX(ssm_pos_dot)(const R *restrict a, const R *restrict b, ptrdiff_t n)
{
    return SSM_SFX(ssm_pos_dot_acc)(a, b, n, 0.0);
}

/* total + sum_l a[l] * (b[l] - c)^2 */
SSM_INLINE double SSM_SFX(ssm_pos_centred_acc)(const R *restrict a, const R *restrict b, R c,
                                               ptrdiff_t n, double total)
{
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

SSM_INLINE double SSM_SFX(ssm_pos_centred)(const R *restrict a, const R *restrict b, R c,
                                           ptrdiff_t n)
{
    return SSM_SFX(ssm_pos_centred_acc)(a, b, c, n, 0.0);
}

/* total + sum_l dy[l] * z[l] with z = (x - m) / T (logits) or log p (probabilities; 0
   where p is 0 or x is -inf, where dy is 0 too): the temperature gradient's sum, -(1/T) times it.
   Since sum_l dy = 0, z may be shifted by any constant per row. */
SSM_INLINE double SSM_SFX(ssm_pos_dtemp_acc)(const R *restrict dy, const R *restrict x,
                                             R m, R it, int logs, ptrdiff_t n, double total)
{
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
            for (l = l0; l < l1; l++) {  /* x = -inf: dy is 0, and so is its term */
                const R z = (x[l] - m) * it;
                part += dy[l] * (z != -(R)INFINITY ? z : (R)0);
            }
        }
        total += (double)part;
    }
    return total;
}

SSM_INLINE double SSM_SFX(ssm_pos_dtemp_sum)(const R *restrict dy, const R *restrict x,
                                             R m, R it, int logs, ptrdiff_t n)
{
    return SSM_SFX(ssm_pos_dtemp_acc)(dy, x, m, it, logs, n, 0.0);
}

/* max(m, max_l x[l]) (a NaN is never the max; it makes the row's sum NaN) */
SSM_INLINE R SSM_SFX(ssm_pos_max_from)(const R *restrict x, ptrdiff_t n, R m)
{
    ptrdiff_t l;
#pragma omp simd reduction(max:m)
    for (l = 0; l < n; l++)
        m = x[l] > m ? x[l] : m;
    return m;
}

/* max_l x[l], n >= 1 */
SSM_INLINE R SSM_SFX(ssm_pos_max)(const R *restrict x, ptrdiff_t n)
{
    return SSM_SFX(ssm_pos_max_from)(x + 1, n - 1, x[0]);
}

/* e[l] = exp((x[l] - m) * it) */
SSM_INLINE void SSM_SFX(ssm_pos_exps)(const R *restrict x, R *restrict e, R m, R it,
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
}

/* e[l] = exp((x[l] - m) * it); returns total + sum_l e[l] (blocked). */
SSM_INLINE double SSM_SFX(ssm_pos_exp_acc)(const R *restrict x, R *restrict e, R m, R it,
                                           ptrdiff_t n, double total)
{
    SSM_SFX(ssm_pos_exps)(x, e, m, it, n);
    return SSM_SFX(ssm_pos_dot_acc)(e, NULL, n, total);
}

SSM_INLINE double SSM_SFX(ssm_pos_exp)(const R *restrict x, R *restrict e, R m, R it,
                                       ptrdiff_t n)
{
    return SSM_SFX(ssm_pos_exp_acc)(x, e, m, it, n, 0.0);
}

/* Two sums in one sweep, added to the running totals: acc[1] += sum_l p[l] g0[l],
   acc[2] += sum_l p[l] g1[l] (blocked). */
SSM_INLINE void SSM_SFX(ssm_pos_dot2)(const R *restrict p, const R *restrict g0,
                                      const R *restrict g1, ptrdiff_t n, double *acc)
{
    double t0 = acc[1], t1 = acc[2];
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
    acc[1] = t0;
    acc[2] = t1;
}

/* e[l] = exp((x[l] - m) * it) (stored if e != NULL) and its sums against 1, g0, g1 in one
   sweep (the 2-D soft-argmax), added to the running totals acc[0 .. 3). `pf`, if not NULL, is the next row's
   input, fetched into the cache during this sweep (one line per 64 bytes), so that the
   next row's first sweep finds it there instead of waiting on DRAM. */
SSM_INLINE void SSM_SFX(ssm_pos_exp2)(const R *restrict x, R *restrict e, R m, R it,
                                      const R *restrict g0, const R *restrict g1,
                                      ptrdiff_t n, double *acc, const R *pf)
{
    double t = acc[0], t0 = acc[1], t1 = acc[2];
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
    acc[0] = t;
    acc[1] = t0;
    acc[2] = t1;
}

/* ssm_pos_exp2 for the separable grid of an (H, W) map (the built-in coordinates:
   g0[l] = gx[l % W] with gx = g0[0 .. W), g1[l] = gy[l / W] = g1[(l / W) * W]): the y sum
   taken per line, sum_h gy[h] * (sum of the line's e), so one FMA and one load of g1
   fewer per element. A line is the block of the sums (W <= SSM_POS_BLOCK). */
SSM_INLINE void SSM_SFX(ssm_pos_exp2_sep)(const R *restrict x, R *restrict e, R m, R it,
                                          const R *restrict gx, const R *restrict g1,
                                          ptrdiff_t n, ptrdiff_t W, double *acc, const R *pf)
{
    double t = acc[0], t0 = acc[1], t1 = acc[2];
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
    acc[0] = t;
    acc[1] = t0;
    acc[2] = t1;
}

/* Rows of large outputs are copied out with ssm_stream_row (_kernels_impl.h): non-temporal
   stores, ordered by the caller's sfence before its tile ends. */

/* The 2-D soft-argmax's gradient over positions [c, ce) of a row (c a multiple of
   ssm_pos_grad2_chunk; x, p, out indexed by the row's positions):
   out[l] = p[l] (a0 g0[l] + a1 g1[l] + b), by the grid's lines when W, in chunks of
   whole lines (or SSM_POS_BLOCK elements): a streamed output goes out (through h) from
   an L1-resident chunk as soon as it is computed. With `in_place`, p is out itself.
   Returns dts + the temperature gradient's sums (when `dtemp`), chunk by chunk. */
SSM_INLINE double SSM_SFX(ssm_pos_grad2)(R *restrict out, const R *restrict p,
                                         const R *restrict x, R *restrict h,
                                         const R *restrict g0, const R *restrict g1,
                                         ptrdiff_t W, R a0, R a1, R b, R m, R it,
                                         int from_prob, int dtemp, int stream, int in_place,
                                         ptrdiff_t c, ptrdiff_t ce, double dts)
{
    const ptrdiff_t chunk = ssm_pos_grad2_chunk(W);
    ptrdiff_t c0, c1, l, l0;
    for (c0 = c; c0 < ce; c0 = c1) {
        R *restrict o = stream ? h - c0 : out;  /* o[l], l in [c0, c1) */
        c1 = ce - c0 < chunk ? ce : c0 + chunk;
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
        if (dtemp)  /* dT = -(1/T) sum dy z = -sum dx z */
            dts += SSM_SFX(ssm_pos_dtemp_sum)(in_place ? out + c0 : o + c0, x + c0, m, it,
                                              from_prob, c1 - c0);
        if (stream)
            SSM_SFX(ssm_stream_row)(out + c0, h, c1 - c0);
    }
    return dts;
}

/* The 2-D soft-argmax's sums over n positions of a row from l0 (a multiple of
   ssm_pos_grad2_chunk), added to acc (sum of p, sum of p g0, sum of p g1): p = x, or
   the exps of x (kept in e if not NULL; e, x indexed from l0). */
SSM_INLINE void SSM_SFX(ssm_pos_sums2)(const ssm_pos_problem *P, const R *restrict x,
                                       R *restrict e, R m, R it, ptrdiff_t l0, ptrdiff_t n,
                                       double *acc, const R *pf)
{
    const R *restrict g0 = (const R *)P->grid, *restrict g1 = g0 + P->L;
    const ptrdiff_t W = ssm_pos_lines(P);
    if (P->from_prob)
        SSM_SFX(ssm_pos_dot2)(x, g0 + l0, g1 + l0, n, acc);
    else if (W)
        SSM_SFX(ssm_pos_exp2_sep)(x, e, m, it, g0, g1 + l0, n, W, acc, pf);
    else
        SSM_SFX(ssm_pos_exp2)(x, e, m, it, g0 + l0, g1 + l0, n, acc, pf);
}

/* The gradient's coefficients of the 2-D soft-argmax: dx = p / s * (dk0 g0 + dk1 g1 - K) / T
   = p (a0 g0 + a1 g1 + b), from the row's sums acc and dk = its (dk0, dk1) */
SSM_INLINE void SSM_SFX(ssm_pos_coef2)(const double *acc, double s, double it_d,
                                       const R *dk, R *a0, R *a1, R *b)
{
    const double w = it_d / s, E0 = acc[1] / s, E1 = acc[2] / s;
    const double dk0 = (double)dk[0], dk1 = (double)dk[1];
    *a0 = (R)(dk0 * w);
    *a1 = (R)(dk1 * w);
    *b = (R)(-(dk0 * E0 + dk1 * E1) * w);
}

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
    const ptrdiff_t W = ssm_pos_lines(P);
    const R *restrict p;
    R m = 0;
    double acc[3] = {0.0, 0.0, 0.0}, s;
    ptrdiff_t l;
    if (P->from_prob) {
        p = x;
        SSM_SFX(ssm_pos_sums2)(P, x, NULL, 0, it, 0, n, acc, NULL);
        s = 1.0;
    } else {
        R *keep = op == SSM_POS_EXPECT && !out ? NULL : e ? e : out;  /* for an output sweep */
        m = SSM_SFX(ssm_pos_max)(x, n);
        SSM_SFX(ssm_pos_sums2)(P, x, keep, m, it, 0, n, acc, pf);
        s = acc[0];
        p = e;
    }
    if (P->kp) {
        ((R *)P->kp)[r * 2] = (R)(acc[1] / s);
        ((R *)P->kp)[r * 2 + 1] = (R)(acc[2] / s);
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
    {
        R a0, a1, b;
        double dts;
        SSM_SFX(ssm_pos_coef2)(acc, s, it_d, (const R *)P->dkp + r * 2, &a0, &a1, &b);
        dts = SSM_SFX(ssm_pos_grad2)(out, p, x, h, g0, g1, W, a0, a1, b, m, it, P->from_prob,
                                     P->dtemp != NULL, stream, !e && !P->from_prob, 0, n,
                                     0.0);
        if (P->dtemp)
            P->dtemp[r] = -dts;
    }
}

/* ---- one row -------------------------------------------------------------------------- */

/* spatial_softmax's gradient over n positions: dy = h = p (dp - dot) (p = x, dp = x2),
   out = h / T; returns dts + the temperature gradient's sum of dy z */
SSM_INLINE double SSM_SFX(ssm_pos_sgrad)(const R *restrict x, const R *restrict x2, R dot,
                                         R it, int dtemp, R *restrict h, R *restrict out,
                                         ptrdiff_t n, double dts)
{
    ptrdiff_t l;
#pragma omp simd
    for (l = 0; l < n; l++)
        h[l] = x[l] * (x2[l] - dot);
    if (dtemp)
        dts = SSM_SFX(ssm_pos_dtemp_acc)(h, x, 0, it, 1, n, dts);
#pragma omp simd
    for (l = 0; l < n; l++)
        out[l] = h[l] * it;
    return dts;
}

/* soft-argmax's gradient over n positions (grid: D rows gs apart, from these positions):
   dy = h = p rs (sum_d dk_d g_d - K), out = h / T; returns dts + the temperature
   gradient's sum of dy z */
SSM_INLINE double SSM_SFX(ssm_pos_egrad)(const R *restrict p, const R *restrict x,
                                         const R *restrict grid, ptrdiff_t gs,
                                         const R *restrict dk, ptrdiff_t D, R Kr, R rs, R m,
                                         R it, int from_prob, int dtemp, R *restrict h,
                                         R *restrict out, ptrdiff_t n, double dts)
{
    ptrdiff_t l, d;
#pragma omp simd
    for (l = 0; l < n; l++)
        h[l] = -Kr;
    for (d = 0; d < D; d++) {
        const R *restrict g = grid + d * gs;
        const R dkd = dk[d];
#pragma omp simd
        for (l = 0; l < n; l++)
            h[l] += dkd * g[l];
    }
#pragma omp simd
    for (l = 0; l < n; l++)
        h[l] = p[l] * rs * h[l];
    if (dtemp)
        dts = SSM_SFX(ssm_pos_dtemp_acc)(h, x, m, it, from_prob, n, dts);
#pragma omp simd
    for (l = 0; l < n; l++)
        out[l] = h[l] * it;
    return dts;
}

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
        {
            const double dts = SSM_SFX(ssm_pos_sgrad)(x, x2, dot, it, P->dtemp != NULL, h,
                                                      out, n, 0.0);
            if (P->dtemp)
                P->dtemp[r] = -it_d * dts;
        }
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
            K = fma((double)((const R *)P->dkp)[r * D + d], E, K);  /* see ssm_pos_tile_chunks */
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
        const double dts = SSM_SFX(ssm_pos_egrad)(p, x, grid, n, (const R *)P->dkp + r * D, D,
                                                  (R)K, rs, m, it, P->from_prob,
                                                  P->dtemp != NULL, h, out, n, 0.0);
        if (P->dtemp)
            P->dtemp[r] = -it_d * dts;
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

/* ---- strided rows chunk by chunk -----------------------------------------------------
 * A strided tile whose gathered rows would not stay in the cache (ssm_pos_problem.chunked:
 * large maps, channels last) is not gathered whole: each sweep of the row functions goes
 * over the tile's rows a chunk of ssm_pos_chunk_len positions at a time, gathered
 * from x (and x2) into K-long rows, its outputs scattered back. K is a whole number of
 * the sums' blocks (and of the grid's lines, and of ssm_pos_grad2's chunks), and every
 * sum takes the running total of the chunks before it, so every row adds the same
 * block sums in the same order as ssm_pos_row and ssm_pos_row2 do: the same bits. The
 * exps are computed again in each sweep that needs them (the same values). Scratch:
 * ssm_pos_chunks_scratch_bytes, a few chunks, whatever the map's size. */

/* Positions [l0, l0 + k) of nr channels at x + base (channels contiguous, positions
   `inner` apart) into rows of X, K apart; from float16 (half 1) or bfloat16 (half 2)
   storage widened. */
SSM_INLINE void SSM_SFX(ssm_pos_gather)(const void *x, int half, ptrdiff_t base,
                                        ptrdiff_t inner, ptrdiff_t l0, ptrdiff_t k,
                                        ptrdiff_t nr, R *restrict X, ptrdiff_t K)
{
    ptrdiff_t l, j;
#ifdef SSM_POS_HALF
    if (half) {
        const uint16_t *src = (const uint16_t *)x + base + l0 * inner;
        for (l = 0; l < k; l++, src += inner) {
            if (half == 2) {
                for (j = 0; j < nr; j++)
                    X[j * K + l] = ssm_bf16_to_f(src[j]);
            } else {
                for (j = 0; j < nr; j++)
                    X[j * K + l] = ssm_f16_to_f(src[j]);
            }
        }
        return;
    }
#endif
    {
        const R *src = (const R *)x + base + l0 * inner;
        l = 0;
#ifdef SSM_POS_TRANSPOSE
        {   /* blocks of B positions x B channels, B = 32 bytes of R */
            const ptrdiff_t B = 32 / (ptrdiff_t)sizeof(R);
            for (; l + B <= k; l += B) {
                for (j = 0; j + B <= nr; j += B)
                    SSM_POS_TR(src + l * inner + j, inner, X + j * K + l, K);
                for (; j < nr; j++) {
                    ptrdiff_t i;
                    for (i = l; i < l + B; i++)
                        X[j * K + i] = src[i * inner + j];
                }
            }
        }
#endif
        for (src += l * inner; l < k; l++, src += inner)
            for (j = 0; j < nr; j++)
                X[j * K + l] = src[j];
    }
}

/* The inverse of ssm_pos_gather: rows of O (K apart) out to positions [l0, l0 + k),
   rounded to the half type if `half`. */
SSM_INLINE void SSM_SFX(ssm_pos_scatter)(void *out, int half, ptrdiff_t base,
                                         ptrdiff_t inner, ptrdiff_t l0, ptrdiff_t k,
                                         ptrdiff_t nr, const R *restrict O, ptrdiff_t K)
{
    ptrdiff_t l, j;
#ifdef SSM_POS_HALF
    if (half) {
        uint16_t *dst = (uint16_t *)out + base + l0 * inner;
        for (l = 0; l < k; l++, dst += inner) {
            if (half == 2) {
                for (j = 0; j < nr; j++)
                    dst[j] = ssm_f_to_bf16(O[j * K + l]);
            } else {
                for (j = 0; j < nr; j++)
                    dst[j] = ssm_f_to_f16(O[j * K + l]);
            }
        }
        return;
    }
#endif
    {
        R *dst = (R *)out + base + l0 * inner;
        l = 0;
#ifdef SSM_POS_TRANSPOSE
        {
            const ptrdiff_t B = 32 / (ptrdiff_t)sizeof(R);
            for (; l + B <= k; l += B) {
                for (j = 0; j + B <= nr; j += B)
                    SSM_POS_TR(O + j * K + l, K, dst + l * inner + j, inner);
                for (; j < nr; j++) {
                    ptrdiff_t i;
                    for (i = l; i < l + B; i++)
                        dst[i * inner + j] = O[j * K + i];
                }
            }
        }
#endif
        for (dst += l * inner; l < k; l++, dst += inner)
            for (j = 0; j < nr; j++)
                dst[j] = O[j * K + l];
    }
}

/* element i of a (…, D) array of keypoints in the storage type */
SSM_INLINE R SSM_SFX(ssm_pos_load)(const void *a, int half, ptrdiff_t i)
{
#ifdef SSM_POS_HALF
    if (half)
        return half == 2 ? ssm_bf16_to_f(((const uint16_t *)a)[i])
                         : ssm_f16_to_f(((const uint16_t *)a)[i]);
#endif
    return ((const R *)a)[i];
}

SSM_INLINE void SSM_SFX(ssm_pos_store)(void *a, int half, ptrdiff_t i, R v)
{
#ifdef SSM_POS_HALF
    if (half) {
        ((uint16_t *)a)[i] = half == 2 ? ssm_f_to_bf16(v) : ssm_f_to_f16(v);
        return;
    }
#endif
    ((R *)a)[i] = v;
}

/* Pass `op` over strided tile t (see ssm_pos_num_tiles), its rows chunk by chunk, with
   per-thread scratch `buf` of ssm_pos_chunks_scratch_bytes(P, sizeof(R)) bytes; x, x2,
   out, kp, var and dkp in the storage type: R, or (float only) float16 (half 1) or
   bfloat16 (half 2), computed as R (as ssm_pos_tile_half: the float path, rounded). */
SSM_CLONES void SSM_SFX(ssm_pos_tile_chunks)(const ssm_pos_problem *P, int op, ptrdiff_t t,
                                             void *buf, int half)
{
    const ptrdiff_t L = P->L, inner = P->inner, T = P->tile, D = P->D;
    const ptrdiff_t K0 = ssm_pos_chunk_len(P, op, 0), K1 = ssm_pos_chunk_len(P, op, 1);
    const ptrdiff_t K = K0 > K1 ? K0 : K1, A = ssm_pos_chunk_sums(P);  /* K: rows' stride */
    const ptrdiff_t per = (inner + T - 1) / T, im = t / per, i0 = (t % per) * T;
    const ptrdiff_t base = im * L * inner + i0, r0 = im * inner + i0;
    const ptrdiff_t nr = inner - i0 < T ? inner - i0 : T;
    const int two = D == 2 && !P->var && (op == SSM_POS_EXPECT || op == SSM_POS_EXPECT_BWD);
    const int sgrad = op == SSM_POS_SOFTMAX_BWD, expect = op >= SSM_POS_EXPECT;
    const int exps = !P->from_prob && !sgrad;  /* p = the exps of x (else x itself) */
    const int dtemp = P->dtemp != NULL;
    /* spatial_softmax keeps its exps in out (as the rows in place), read back in the last
       sweep instead of computed again, where the tile holds every channel of a position:
       where another thread's tile writes the other channels of the same lines, the
       second pass over out was slower than the exps it saves (1x512x512x16, tiles of 8,
       2 threads: 1.3x the time; tiles of 16, 1 thread: 0.82-0.90x). Not for the half
       types (out holds the exps rounded). */
    const int keep = op == SSM_POS_SOFTMAX && !half && T == inner;
    const ptrdiff_t W = ssm_pos_lines(P);
    const R *grid = (const R *)P->grid;
    char *q = SSM_SFX(ssm_pos_align)((char *)buf);
    R *X, *X2, *O, *e, *h, *m, *it, *co;
    double *S;  /* per row: A running sums (see ssm_pos_chunk_sums) */
    ptrdiff_t l0, k, j, d;
#define SSM_POS_CARVE(ptr, type, count) \
    ptr = (type *)q;                     \
    q = SSM_SFX(ssm_pos_align)(q + (size_t)(count) * sizeof(type))
    SSM_POS_CARVE(X, R, T * K);
    SSM_POS_CARVE(X2, R, T * K);
    SSM_POS_CARVE(O, R, T * K);
    SSM_POS_CARVE(e, R, K);
    SSM_POS_CARVE(h, R, K);
    SSM_POS_CARVE(m, R, T);
    SSM_POS_CARVE(it, R, T);
    SSM_POS_CARVE(co, R, T * (D + 3));  /* dk (D), then ssm_pos_coef2's a0, a1, b */
    SSM_POS_CARVE(S, double, T * A);
#undef SSM_POS_CARVE
    for (j = 0; j < nr; j++) {
        it[j] = (R)(1.0 / P->temp[(r0 + j) % P->C]);
        m[j] = 0;
        for (d = 0; d < A; d++)
            S[j * A + d] = 0.0;
        for (d = 0; op == SSM_POS_EXPECT_BWD && d < D; d++)
            co[j * (D + 3) + d] = SSM_SFX(ssm_pos_load)(P->dkp, half, (r0 + j) * D + d);
    }

    /* the max of each row */
    for (l0 = 0; exps && l0 < L; l0 += K0) {
        k = L - l0 < K0 ? L - l0 : K0;
        SSM_SFX(ssm_pos_gather)(P->x, half, base, inner, l0, k, nr, X, K);
        for (j = 0; j < nr; j++)
            m[j] = l0 == 0 ? SSM_SFX(ssm_pos_max)(X + j * K, k)
                           : SSM_SFX(ssm_pos_max_from)(X + j * K, k, m[j]);
    }

    /* the sums: S[0] the sum of the exps (the dot of p and dp for sgrad), then
       S[1 .. 1 + D) the sums of p g_d */
    for (l0 = 0; l0 < L; l0 += K0) {
        k = L - l0 < K0 ? L - l0 : K0;
        SSM_SFX(ssm_pos_gather)(P->x, half, base, inner, l0, k, nr, X, K);
        if (sgrad)
            SSM_SFX(ssm_pos_gather)(P->x2, half, base, inner, l0, k, nr, X2, K);
        for (j = 0; j < nr; j++) {
            const R *xj = X + j * K, *p = xj;
            double *a = S + j * A;
            if (sgrad) {
                a[0] = SSM_SFX(ssm_pos_dot_acc)(xj, X2 + j * K, k, a[0]);
            } else if (two) {
                SSM_SFX(ssm_pos_sums2)(P, xj, NULL, m[j], it[j], l0, k, a, NULL);
            } else {
                if (exps) {
                    a[0] = SSM_SFX(ssm_pos_exp_acc)(xj, keep ? O + j * K : e, m[j], it[j], k,
                                                    a[0]);
                    p = e;
                }
                for (d = 0; expect && d < D; d++)
                    a[1 + d] = SSM_SFX(ssm_pos_dot_acc)(p, grid + d * L + l0, k, a[1 + d]);
            }
        }
        if (keep)
            SSM_SFX(ssm_pos_scatter)(P->out, 0, base, inner, l0, k, nr, O, K);
    }

    /* the keypoints, and what the last sweep needs of them (K with explicit fma, here and in
       ssm_pos_row: gcc contracted the one and not the other, 1 ulp apart) */
    for (j = 0; expect && j < nr; j++) {
        const ptrdiff_t r = r0 + j;
        double *a = S + j * A, K0 = 0.0;
        const double s = P->from_prob ? 1.0 : a[0];
        R *c = co + j * (D + 3);
        for (d = 0; d < D; d++) {
            const double E = a[1 + d] / s;
            if (P->kp)
                SSM_SFX(ssm_pos_store)(P->kp, half, r * D + d, (R)E);
            if (op == SSM_POS_EXPECT_BWD)
                K0 = fma((double)c[d], E, K0);  /* one rounding, whatever gcc contracts */
        }
        if (two && op == SSM_POS_EXPECT_BWD)
            SSM_SFX(ssm_pos_coef2)(a, s, 1.0 / P->temp[r % P->C], c, c + D, c + D + 1,
                                   c + D + 2);
        else
            c[D] = (R)K0;  /* K, in the storage type, as ssm_pos_row's Kr */
    }

    /* the last sweep: the variances' sums S[1 + D .. 1 + 2D), the output, the temperature
       gradient's sum S[1 + 2D] */
    if (keep) {  /* out = e / s, e read back from out (stored as R: e's bits) */
        for (l0 = 0; l0 < L; l0 += K1) {
            k = L - l0 < K1 ? L - l0 : K1;
            SSM_SFX(ssm_pos_gather)(P->out, 0, base, inner, l0, k, nr, O, K);
            for (j = 0; j < nr; j++) {
                R *restrict oj = O + j * K;
                const R rs = (R)(1.0 / S[j * A]);
                ptrdiff_t l;
#pragma omp simd
                for (l = 0; l < k; l++)
                    oj[l] = oj[l] * rs;
            }
            SSM_SFX(ssm_pos_scatter)(P->out, 0, base, inner, l0, k, nr, O, K);
        }
    } else if (P->out || P->var) {
        for (l0 = 0; l0 < L; l0 += K1) {
            k = L - l0 < K1 ? L - l0 : K1;
            SSM_SFX(ssm_pos_gather)(P->x, half, base, inner, l0, k, nr, X, K);
            if (sgrad)
                SSM_SFX(ssm_pos_gather)(P->x2, half, base, inner, l0, k, nr, X2, K);
            for (j = 0; j < nr; j++) {
                const R *xj = X + j * K, *p = xj;
                R *oj = O + j * K, *c = co + j * (D + 3);
                double *a = S + j * A;
                const double s = P->from_prob || sgrad ? 1.0 : a[0];
                const R rs = (R)(1.0 / s);
                ptrdiff_t l;
                if (sgrad) {
                    a[1 + 2 * D] = SSM_SFX(ssm_pos_sgrad)(xj, X2 + j * K, (R)a[0], it[j], dtemp,
                                                          h, oj, k, a[1 + 2 * D]);
                    continue;
                }
                if (exps) {
                    SSM_SFX(ssm_pos_exps)(xj, e, m[j], it[j], k);
                    p = e;
                }
                for (d = 0; P->var && d < D; d++)
                    a[1 + D + d] = SSM_SFX(ssm_pos_centred_acc)(p, grid + d * L + l0,
                                                                (R)(a[1 + d] / s), k,
                                                                a[1 + D + d]);
                if (op == SSM_POS_SOFTMAX || op == SSM_POS_EXPECT) {
                    if (P->out) {
#pragma omp simd
                        for (l = 0; l < k; l++)
                            oj[l] = p[l] * rs;
                    }
                } else if (two) {
                    a[1 + 2 * D] = SSM_SFX(ssm_pos_grad2)(
                        oj, p, xj, NULL, W ? grid : grid + l0, grid + L + l0, W, c[D],
                        c[D + 1], c[D + 2], m[j], it[j], P->from_prob, dtemp, 0, 0, 0, k,
                        a[1 + 2 * D]);
                } else {
                    a[1 + 2 * D] = SSM_SFX(ssm_pos_egrad)(p, xj, grid + l0, L, c, D, c[D], rs,
                                                          m[j], it[j], P->from_prob, dtemp, h,
                                                          oj, k, a[1 + 2 * D]);
                }
            }
            if (P->out)
                SSM_SFX(ssm_pos_scatter)(P->out, half, base, inner, l0, k, nr, O, K);
        }
    }

    for (j = 0; j < nr; j++) {
        const ptrdiff_t r = r0 + j;
        const double *a = S + j * A, s = P->from_prob || sgrad ? 1.0 : a[0];
        for (d = 0; P->var && d < D; d++) {
            const double v = a[1 + D + d] / s;
            SSM_SFX(ssm_pos_store)(P->var, half, r * D + d, (R)(v > 0.0 ? v : 0.0));
        }
        if (dtemp && (sgrad || op == SSM_POS_EXPECT_BWD))  /* as the rows' (a NaN's sign too):
                                                              two: dT = -sum dx z */
            P->dtemp[r] = two ? -a[1 + 2 * D] : -(1.0 / P->temp[r % P->C]) * a[1 + 2 * D];
    }
}
