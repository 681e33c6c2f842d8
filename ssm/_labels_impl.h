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
   range; act[j] = 0 where ignored, NaN where out of range, else w[j] * cw[y] (sparse;
   w: the tile's weights or NULL, read as 1) or, for dense targets, the activity: 1, or
   0 for a zero-weight pixel, so that its loss and gradient are exactly 0 even where its
   logits are not finite. Two loops: the first, in the label's width, codes each label
   as an int32 in cls (the label, -1 ignored, -2 out of range); the second, in int32 and
   R, finishes cls and act. One loop doing both vectorised at the label's width and
   packed every mask to 32 bits: 6.8 instructions per pixel for int64 labels (callgrind,
   AVX2 clone), these 4.1 (with ssm_code_labels_i64_avx2). An ignore_index the label
   type cannot hold is matched by no label; one in [0, C) is tested first, as it is a
   valid class. */
SSM_INLINE void SSM_LSFX(ssm_stage_labels)(const SSM_LABEL *restrict lab, ptrdiff_t n,
                                           ptrdiff_t C, long long ign, int dense,
                                           const R *restrict w, const R *restrict cw,
                                           int32_t *restrict cls, R *restrict act)
{
    ptrdiff_t j;
    /* y in [0, C) as one unsigned compare: y <= top (a negative y wraps above it) */
    const SSM_ULABEL top = (unsigned long long)(C - 1) < (unsigned long long)SSM_LABEL_MAX
                         ? (SSM_ULABEL)(C - 1) : (SSM_ULABEL)SSM_LABEL_MAX;
    const int fits = ign >= (long long)SSM_LABEL_MIN && ign <= (long long)SSM_LABEL_MAX;
    /* an ignore_index no label can equal stands as 0, which the range test takes first */
    const SSM_LABEL ig = fits ? (SSM_LABEL)ign : (SSM_LABEL)0;
#if defined(SSM_AVX_TRANSPOSE)
    if (sizeof(SSM_LABEL) == sizeof(int64_t) && ssm_cpu_has_avx2()) {
        ssm_code_labels_i64_avx2((const int64_t *)lab, n, (int64_t)top, (int64_t)ign, cls);
    } else
#endif
    if (fits && ign >= 0 && ign < C) {
#pragma omp simd
        for (j = 0; j < n; j++) {
            SSM_LABEL y = lab[j];
            cls[j] = y == ig ? -1 : (SSM_ULABEL)y <= top ? (int32_t)y : -2;
        }
    } else {
#pragma omp simd
        for (j = 0; j < n; j++) {
            SSM_LABEL y = lab[j];
            cls[j] = (SSM_ULABEL)y <= top ? (int32_t)y : y == ig ? -1 : -2;
        }
    }
    if (dense) {
#pragma omp simd
        for (j = 0; j < n; j++) {
            int32_t k = cls[j];
            R aj = !w || w[j] != 0 ? (R)1 : (R)0;
            act[j] = k >= 0 ? aj : k == -1 ? (R)0 : (R)NAN;
            cls[j] = k >= 0 ? k : -1;
        }
    } else if (!w && !cw) {
#pragma omp simd
        for (j = 0; j < n; j++) {
            int32_t k = cls[j];
            act[j] = k >= 0 ? (R)1 : k == -1 ? (R)0 : (R)NAN;
            cls[j] = k >= 0 ? k : -1;
        }
    } else {  /* w[j] * cw[y], with 1 for the factor not given: the same bits */
#pragma omp simd
        for (j = 0; j < n; j++) {
            int32_t k = cls[j];
            R cy = cw ? cw[k >= 0 ? k : 0] : (R)1;
            R aj = w ? (cw ? w[j] * cy : w[j]) : cy;
            act[j] = k >= 0 ? aj : k == -1 ? (R)0 : (R)NAN;
            cls[j] = k >= 0 ? k : -1;
        }
    }
}
