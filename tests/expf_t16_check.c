/* tests/test_exp.py's harness for the AVX-512 clone's float exp (ssm/_expf_table.h):
   ssm_expf_t16 (scalar: positions' loops, gcc-vectorised) and the hand-written sweep
   ssm_sumexp_t16 (AVX-512, masked tail) and gcc's vectorisation of the scalar one must give the same bits for every argument, and
   both within 1.5 ulps of exp (double exp as the reference: its error is far below a
   float ulp). Arguments: every `stride`-th float in [-104, 0], the edges and specials;
   the sweep also at every n in [0, 40] with guards past n, for its masked tail. Prints
   one line: n, mismatches (scalar vs sweep, for e and for the sums), worst ulps and its
   argument, worst ulps of denormal results, NaN and special handling, guard damage. */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define SSM_2M64 5.42101086242752217e-20f
#include "_expf_table.h"

static double ulps(float y, float x)
{
    double ref = exp((double)x);
    float r = (float)ref;
    float ulp = nextafterf(r, INFINITY) - r;
    if (ulp < 0x1p-149f)
        ulp = 0x1p-149f;
    return fabs((double)y - ref) / ulp;
}

/* The sweep of one or two rows, as ssm_sumexp_rows_t16 runs it. */
__attribute__((target("arch=x86-64-v4"))) static void ssm_sumexp_t16(
    const float *restrict x0, const float *restrict x1, float *restrict e0,
    float *restrict e1, const float *restrict m, float *restrict s, ptrdiff_t n)
{
    if (x1 && e0)
        ssm_sumexp_t16_row(x0, x1, e0, e1, m, s, n, 1, 1);
    else if (x1)
        ssm_sumexp_t16_row(x0, x1, NULL, NULL, m, s, n, 1, 0);
    else if (e0)
        ssm_sumexp_t16_row(x0, NULL, e0, NULL, m, s, n, 0, 1);
    else
        ssm_sumexp_t16_row(x0, NULL, NULL, NULL, m, s, n, 0, 0);
}

/* gcc's vectorisation of the scalar function (positions' loops): gathers for the table */
__attribute__((target("arch=x86-64-v4"), noinline)) static void run_gcc_vec(
    const float *x, float *y, long n)
{
#pragma omp simd
    for (long i = 0; i < n; i++)
        y[i] = ssm_expf_t16(x[i]);
}

static int same(float a, float b) { return memcmp(&a, &b, sizeof a) == 0; }

int main(int argc, char **argv)
{
    const long stride = argc > 1 ? atol(argv[1]) : 1;
    union { float f; uint32_t u; } lim, v;
    const float edges[] = {0.0f, -0.0f, -0x1p-149f, -1e-30f, -1e-8f, -0.0216608f, -0.0433217f,
                           -0.3465736f, -0.6931472f, -1.0f, -87.0f, -87.33655f, -87.5f,
                           -100.0f, -103.0f, -103.97207f, -103.9721f, -104.0f, -104.5f,
                           -200.0f, -FLT_MAX, -INFINITY};
    const int ne = (int)(sizeof edges / sizeof *edges);
    long n = 0, mismatch = 0, guard = 0, i;
    double worst = 0.0, worst_den = 0.0, worst_x = 0.0;
    int nan_ok, special_ok = 1;
    float *x, *e, *s, *m, *e2, *s2;
    long cap, k;
    lim.f = -104.0f;
    cap = (long)((lim.u - 0x80000000u) / (uint32_t)stride) + ne + 64;
    x = malloc((size_t)cap * sizeof *x);
    e = malloc((size_t)cap * sizeof *e);
    s = malloc((size_t)cap * sizeof *s);
    m = malloc((size_t)cap * sizeof *m);
    for (i = 0; i < ne; i++)
        x[n++] = edges[i];
    for (v.u = 0x80000000u; v.u <= lim.u; v.u += (uint32_t)stride)
        x[n++] = v.f;
    for (i = 0; i < n; i++) {
        m[i] = 0.0f;
        s[i] = 0.0f;
    }
    ssm_sumexp_t16(x, NULL, e, NULL, m, s, n);
    run_gcc_vec(x, m, n);
    for (i = 0; i < n; i++) {
        const float y = ssm_expf_t16(x[i]);
        double u;
        if (!same(y, e[i]) || !same(y, s[i]) || !same(y, m[i]))
            mismatch++;
        u = ulps(y, x[i]);
        if (u > worst) {
            worst = u;
            worst_x = x[i];
        }
        if ((float)exp((double)x[i]) < FLT_MIN && u > worst_den)
            worst_den = u;
    }
    for (i = 0; i < ne; i++)  /* 0 and -0 give 1, -inf and below -104 give 0 */
        if (edges[i] >= -0.0f ? ssm_expf_t16(edges[i]) != 1.0f
                              : edges[i] < -104.0f && ssm_expf_t16(edges[i]) != 0.0f)
            special_ok = 0;
    {
        float xn[3] = {NAN, -NAN, NAN}, zero[3] = {0.0f, 0.0f, 0.0f}, en[3], sn[3] = {0};
        ssm_sumexp_t16(xn, NULL, en, NULL, zero, sn, 3);
        nan_ok = isnan(ssm_expf_t16(NAN)) && isnan(en[0]) && isnan(en[1]) && isnan(sn[2]);
    }
    /* the pair sweep and the masked tail: (s + e^a) + e^b, e stored, for n in [0, 40] */
    e2 = malloc(2 * 56 * sizeof *e2);
    s2 = malloc(56 * sizeof *s2);
    for (k = 0; k <= 40; k++) {
        float mm[56], xa[56], xb[56];
        for (i = 0; i < 56; i++) {
            mm[i] = 3.0f;
            xa[i] = x[(i * 7919 + k) % n] + 3.0f;
            xb[i] = x[(i * 104729 + 3 * k) % n] + 3.0f;
            s2[i] = 0.25f;
            e2[i] = e2[56 + i] = -1.0f;
        }
        ssm_sumexp_t16(xa, xb, e2, e2 + 56, mm, s2, k);
        for (i = 0; i < 56; i++) {
            if (i < k) {
                const float a = ssm_expf_t16(xa[i] - mm[i]), b = ssm_expf_t16(xb[i] - mm[i]);
                if (!same(a, e2[i]) || !same(b, e2[56 + i]) || !same((0.25f + a) + b, s2[i]))
                    mismatch++;
            } else if (s2[i] != 0.25f || e2[i] != -1.0f || e2[56 + i] != -1.0f) {
                guard++;
            }
        }
    }
    printf("n=%ld mismatch=%ld worst_ulps=%.4f worst_x=%.9g worst_denormal_ulps=%.4f "
           "nan_ok=%d special_ok=%d guard=%ld\n", n, mismatch, worst, worst_x, worst_den,
           nan_ok, special_ok, guard);
    return 0;
}
