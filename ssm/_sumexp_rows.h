/*
 * ssm/_sumexp_rows.h -- the rows loop shared by the hand-written float sum-of-exp sweeps
 * (ssm_sumexp_rows_t16 in _expf_table.h, ssm_sumexp_rows_v3 in _expf_avx2.h), included by
 * the second inclusion of each. Uses ssm_prefetch_next_f (the float kernels', or a test's).
 */
#ifndef SSM_SUMEXP_ROWS_H
#define SSM_SUMEXP_ROWS_H

/* The loop over the sweep's parameters x, sx, e, se, c0, c1, n, m, s and pf (as
   ssm_sumexp_rows has them): rows c0 <= c < c1 two per pass, then the last row of an odd
   block, each row prefetched as it starts; ROW(x0, x1, e0, e1, m, s, n, pair, store) is
   the sweep's row function. A macro, so that each sweep's row function is inlined into a
   function of its own target. */
#define SSM_SUMEXP_ROWS_LOOP(ROW)                                                         \
    do {                                                                                  \
        ptrdiff_t c_;                                                                     \
        for (c_ = c0; c_ + 1 < c1; c_ += 2) {                                             \
            const float *restrict x0_ = x + c_ * sx, *restrict x1_ = x0_ + sx;            \
            ssm_prefetch_next_f(x0_, n, pf);                                              \
            ssm_prefetch_next_f(x1_, n, pf);                                              \
            if (e)                                                                        \
                ROW(x0_, x1_, e + c_ * se, e + (c_ + 1) * se, m, s, n, 1, 1);             \
            else                                                                          \
                ROW(x0_, x1_, NULL, NULL, m, s, n, 1, 0);                                 \
        }                                                                                 \
        if (c_ < c1) {                                                                    \
            ssm_prefetch_next_f(x + c_ * sx, n, pf);                                      \
            if (e)                                                                        \
                ROW(x + c_ * sx, NULL, e + c_ * se, NULL, m, s, n, 0, 1);                 \
            else                                                                          \
                ROW(x + c_ * sx, NULL, NULL, NULL, m, s, n, 0, 0);                        \
        }                                                                                 \
    } while (0)

#endif /* SSM_SUMEXP_ROWS_H */
