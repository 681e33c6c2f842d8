/* tests/test_exp.py's harness for the AVX2 clone's hand-written float sum-of-exp sweep
   (ssm/_expf_avx2.h): it must give the bits of gcc's loop (ssm_sumexp_rows's loops over
   ssm_expf_nonpos, vectorised for x86-64-v3) for the exps it stores and for the sums, one
   row or two per pass, stored or not. Arguments: every `stride`-th float in [-104, 0] plus
   edges and specials as x0, a scrambled order of them as x1, m = 0; the sweep also at
   every n in [0, 40] with guards past n, for its masked tail. Prints one line: n,
   mismatches, NaN handling, guard damage. exp_fn.h (written by the test) holds
   ssm_expf_nonpos, its constants and floor, and ssm_mask32, as in ssm/_kernels.h. */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define SSM_INLINE static inline __attribute__((always_inline))
#include "exp_fn.h"

static int ssm_exp_sweep_v3 = 1;
static inline void ssm_prefetch_next_f(const float *row, ptrdiff_t n, ptrdiff_t dist)
{
    (void)row, (void)n, (void)dist;
}
#include "_expf_avx2.h"
#define SSM_EXPF_AVX2_ROWS
#include "_expf_avx2.h"

/* gcc's loop: ssm_sumexp_rows's operations for one row or two */
__attribute__((target("arch=x86-64-v3"), noinline)) static void gcc_rows(
    const float *restrict x0, const float *restrict x1, float *restrict e0,
    float *restrict e1, const float *restrict m, float *restrict s, ptrdiff_t n)
{
    ptrdiff_t j;
    if (x1 && e0) {
#pragma omp simd
        for (j = 0; j < n; j++) {
            float v0 = ssm_expf_nonpos(x0[j] - m[j]), v1 = ssm_expf_nonpos(x1[j] - m[j]);
            e0[j] = v0;
            e1[j] = v1;
            s[j] = s[j] + v0 + v1;
        }
    } else if (x1) {
#pragma omp simd
        for (j = 0; j < n; j++)
            s[j] = s[j] + ssm_expf_nonpos(x0[j] - m[j]) + ssm_expf_nonpos(x1[j] - m[j]);
    } else if (e0) {
#pragma omp simd
        for (j = 0; j < n; j++) {
            float v = ssm_expf_nonpos(x0[j] - m[j]);
            e0[j] = v;
            s[j] += v;
        }
    } else {
#pragma omp simd
        for (j = 0; j < n; j++)
            s[j] += ssm_expf_nonpos(x0[j] - m[j]);
    }
}

/* the sweep's row function, as ssm_sumexp_rows_v3 calls it for one row or two */
__attribute__((target("arch=x86-64-v3"), noinline)) static void v3_rows(
    const float *restrict x0, const float *restrict x1, float *restrict e0,
    float *restrict e1, const float *restrict m, float *restrict s, ptrdiff_t n)
{
    if (x1 && e0)
        ssm_sumexp_v3_row(x0, x1, e0, e1, m, s, n, 1, 1);
    else if (x1)
        ssm_sumexp_v3_row(x0, x1, NULL, NULL, m, s, n, 1, 0);
    else if (e0)
        ssm_sumexp_v3_row(x0, NULL, e0, NULL, m, s, n, 0, 1);
    else
        ssm_sumexp_v3_row(x0, NULL, NULL, NULL, m, s, n, 0, 0);
}

static int same(const float *a, const float *b, ptrdiff_t n)
{
    return memcmp(a, b, (size_t)n * sizeof(float)) == 0;
}

#define GUARD 16
#define G 1234.5f

int main(int argc, char **argv)
{
    long stride = argc > 1 ? atol(argv[1]) : 37, mismatch = 0, guard = 0, mode;
    uint32_t u, lo;
    float f = -104.0f, *x0, *x1, *m, *e0, *e1, *s, *f0, *f1, *fs;
    const float special[] = {0.0f, -0.0f, -104.0f, -103.99999f, -104.00001f, -1e30f,
                             -INFINITY, NAN, -87.33654f, -87.33655f, -0.5f * 0.693147f};
    ptrdiff_t n = 0, cap, j, k;
    int nan_ok = 1;
    memcpy(&lo, &f, 4);
    cap = (ptrdiff_t)((lo - 0x80000000u) / (uint32_t)stride) + 64;
    x0 = malloc(2 * sizeof(float) * (size_t)cap);  /* rows x0 and x1, cap apart */
    x1 = x0 + cap;
    m = calloc((size_t)cap, sizeof(float));
    e0 = malloc(2 * sizeof(float) * (size_t)cap);
    e1 = e0 + cap;
    s = malloc(sizeof(float) * (size_t)cap);
    f0 = malloc(sizeof(float) * (size_t)cap);
    f1 = malloc(sizeof(float) * (size_t)cap);
    fs = malloc(sizeof(float) * (size_t)cap);
    for (u = 0x80000000u; u <= lo && n < cap - 16; u += (uint32_t)stride)
        memcpy(&x0[n++], &u, 4);
    for (k = 0; k < (ptrdiff_t)(sizeof special / sizeof special[0]); k++)
        x0[n++] = special[k];
    for (j = 0; j < n; j++)  /* another order: the pairs mix large and tiny exps */
        x1[j] = x0[(j * 7919) % n];
    for (mode = 0; mode < 4; mode++) {  /* bit 0: two rows; bit 1: exps stored */
        const float *y1 = mode & 1 ? x1 : NULL;
        float *d0 = mode & 2 ? e0 : NULL, *d1 = mode & 2 ? e1 : NULL;  /* e1 = e0 + cap */
        float *g0 = mode & 2 ? f0 : NULL, *g1 = mode & 2 ? f1 : NULL;
        for (j = 0; j < n; j++)
            s[j] = fs[j] = (float)(j % 3) * 0.25f;  /* sums in progress */
        gcc_rows(x0, y1, g0, g1, m, fs, n);
        ssm_sumexp_rows_v3(x0, cap, d0, cap, 0, mode & 1 ? 2 : 1, n, m, s, 0);
        mismatch += !same(s, fs, n);
        if (mode & 2)
            mismatch += !same(e0, f0, n) + ((mode & 1) && !same(e1, f1, n));
        /* the masked tail: every n in [0, 40], nothing written past n */
        for (k = 0; k <= 40; k++) {
            float sv[40 + GUARD], sg[40 + GUARD], ev[2][40 + GUARD], eg[2][40 + GUARD];
            for (j = 0; j < 40 + GUARD; j++)
                sv[j] = sg[j] = ev[0][j] = ev[1][j] = eg[0][j] = eg[1][j] = G;
            gcc_rows(x0 + 100 * k, y1 ? x1 + 100 * k : NULL, g0 ? eg[0] : NULL,
                     g1 ? eg[1] : NULL, m, sg, k);
            v3_rows(x0 + 100 * k, y1 ? x1 + 100 * k : NULL, d0 ? ev[0] : NULL,
                    d1 ? ev[1] : NULL, m, sv, k);
            mismatch += !same(sv, sg, k) + !same(ev[0], eg[0], k) + !same(ev[1], eg[1], k);
            for (j = k; j < 40 + GUARD; j++)
                guard += sv[j] != G || ev[0][j] != G || ev[1][j] != G;
        }
    }
    /* -inf's exp is 0; a NaN argument's exp and sum are NaN */
    v3_rows(x0 + n - 5, NULL, e0, NULL, m, memset(s, 0, 16 * sizeof(float)), 4);
    nan_ok = e0[0] == 0.0f && e0[1] != e0[1] && s[1] != s[1];
    printf("n=%ld mismatch=%ld nan_ok=%d guard=%ld\n", (long)n, mismatch, nan_ok, guard);
    return 0;
}
