/*
 * ssm/_labels_impl.h -- the loops of _kernels_impl.h that read integer labels, included
 * there once per label type SSM_LABEL (uint8_t, int32_t, int64_t) with SSM_LSFX naming
 * the functions, inside each instantiation for R. Reading the labels in their storage
 * type lets the loops vectorise for each type; ssm_sswl_stats and ssm_stage pick one
 * per tile, by target_kind. Not a standalone header.
 */

/* The "mean" normaliser of n labels lab[j]: the sum of n_p = w_j cw[y_j] over the valid
   labels, in double (the count of them when unweighted; w: the tile's weights or NULL).
   *bad = the first j whose label is neither in [0, C) nor `ign`, or -1. The first loop
   vectorises; the scan for a bad label runs only in a tile that has one. */
SSM_INLINE double SSM_LSFX(ssm_label_norm)(const SSM_LABEL *restrict lab, ptrdiff_t n,
                                           long long C, long long ign, const R *restrict w,
                                           const R *restrict cw, ptrdiff_t *bad)
{
    ptrdiff_t j;
    double acc = 0.0;
    int any_bad = 0;
    *bad = -1;
    if (!w && !cw) {
        ptrdiff_t count = 0;
#pragma omp simd reduction(+:count) reduction(|:any_bad)
        for (j = 0; j < n; j++) {
            long long y = (long long)lab[j];
            int in = y >= 0 && y < C;
            count += in && y != ign;
            any_bad |= !in && y != ign;
        }
        acc = (double)count;
    } else {
#pragma omp simd reduction(+:acc) reduction(|:any_bad)
        for (j = 0; j < n; j++) {
            long long y = (long long)lab[j];
            int ok = y >= 0 && y < C && y != ign;
            double np_ = (w ? (double)w[j] : 1.0) * (cw ? (double)cw[ok ? y : 0] : 1.0);
            acc += ok ? np_ : 0.0;
            any_bad |= !ok && y != ign;
        }
    }
    if (any_bad) {
        for (j = 0; j < n; j++) {
            long long y = (long long)lab[j];
            if (y != ign && (y < 0 || y >= C)) {
                *bad = j;
                break;
            }
        }
    }
    return acc;
}

/* Stage n labels lab[j]: cls[j] = the label, or -1 where it is ignored or out of
   range; act[j] = 0 where ignored, NaN where out of range, else weight[j] * cw[y]
   (sparse) or, for dense targets, the activity: 1, or 0 for a zero-weight pixel, so
   that its loss and gradient are exactly 0 even where its logits are not finite. */
SSM_INLINE void SSM_LSFX(ssm_stage_labels)(const SSM_LABEL *restrict lab, ptrdiff_t n,
                                           ptrdiff_t C, long long ign, int dense,
                                           const R *restrict weight, const R *restrict cw,
                                           int32_t *restrict cls, R *restrict act)
{
    ptrdiff_t j;
#pragma omp simd
    for (j = 0; j < n; j++) {
        long long y = (long long)lab[j];
        int ok = y >= 0 && y < C;
        R aj = dense ? (weight[j] != 0 ? (R)1 : (R)0) : weight[j] * (cw ? cw[ok ? y : 0] : (R)1);
        cls[j] = ok && y != ign ? (int32_t)y : -1;
        act[j] = y == ign ? (R)0 : ok ? aj : (R)NAN;
    }
}
