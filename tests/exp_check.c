/* tests/test_exp.py's harness for the kernels' inlined exp (ssm_exp_nonpos, double, or
   ssm_expf_nonpos, float): the function's text is pasted from ssm/_kernels.h into
   exp_fn.h by the test. Built three times: -DPART_VEC (the loop vectorised, as in the
   kernels' bodies), -DPART_SCALAR with -fno-tree-vectorize (the loops' remainders), and
   -DPART_MAIN, which draws the arguments, runs both and compares them with expl.
   Prints one line: n, vector/scalar mismatches, NaN handling, worst ulps, results
   below the smallest denormal that are not 0, and the worst ulps of the edge cases. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define SSM_INLINE static inline __attribute__((always_inline))
#ifndef T
#define T double
#endif

#if defined(PART_VEC) || defined(PART_SCALAR)
#include "exp_fn.h"
#if defined(PART_VEC)
void run_vec(const T *x, T *y, long n)
#else
void run_scalar(const T *x, T *y, long n)
#endif
{
    for (long i = 0; i < n; i++)
        y[i] = FN(x[i]);
}
#else
void run_vec(const T *x, T *y, long n);
void run_scalar(const T *x, T *y, long n);

static uint64_t state = 88172645463325252ull;
static uint64_t rnd(void)
{
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    return state;
}
static double u01(void) { return (double)(rnd() >> 11) * 0x1p-53; }

static int dbl_t(T v) { (void)v; return sizeof(T) == 8; }

/* |y - exp(x)| in ulps of exp(x) rounded to T (denormal ulps below T's smallest normal) */
static double ulps(T y, T x)
{
    long double ref = expl((long double)x);
    T r = (T)ref;
    T tiny = sizeof(T) == 8 ? (T)0x1p-1074 : (T)0x1p-149f;
    T ulp = r == 0 ? tiny : (dbl_t(r) ? (T)nextafter((double)r, INFINITY)
                                      : (T)nextafterf((float)r, INFINITY)) - r;
    if (ulp < tiny)
        ulp = tiny;
    return (double)(fabsl((long double)y - ref) / ulp);
}

int main(int argc, char **argv)
{
    const int dbl = sizeof(T) == 8;
    const double lo = dbl ? 745.1332191019412 : 103.97207708;  /* exp(-lo) = half the least denormal */
    const double ln2 = 0.6931471805599453;
    long per = argc > 1 ? atol(argv[1]) : 1000000, n = 0, i;
    const double edges[] = {0.0, -0.0, -0x1p-1074, -0x1p-149, -1e-300, -1e-30, -1e-17, -1e-8,
                            -0.5 * ln2, -ln2, -1.0, -87.0, -87.5, -88.0, -100.0, -103.0,
                            -103.9, -104.0, -104.5, -700.0, -708.3964185322641, -708.4, -709.0,
                            -720.0, -740.0, -744.0, -745.0, -745.1, -745.2, -746.0, -800.0,
                            -1e300, -INFINITY, NAN};
    const int ne = (int)(sizeof edges / sizeof *edges);
    T *x = malloc((size_t)(ne + 7 * per + 1100) * sizeof(T));
    T *yv = malloc((size_t)(ne + 7 * per + 1100) * sizeof(T));
    T *ys = malloc((size_t)(ne + 7 * per + 1100) * sizeof(T));
    for (i = 0; i < ne; i++)
        x[n++] = (T)edges[i];
    for (i = 0; i < per; i++) x[n++] = (T)(-u01() * (lo + 5.0));           /* the whole range */
    for (i = 0; i < per; i++) x[n++] = (T)(-u01() * 40.0);                 /* softmax's range */
    for (i = 0; i < per; i++) x[n++] = (T)(-u01());
    for (i = 0; i < per; i++) x[n++] = (T)(-lo + 38.0 * (dbl ? 1.0 : 0.55) * (u01() - 0.05)); /* denormals */
    for (i = 0; i < per; i++)                                              /* tiny arguments */
        x[n++] = (T)(-ldexp(1.0 + u01(), -(int)(rnd() % (dbl ? 1074 : 149))));
    for (i = 0; i < per; i++) {                                            /* near (k + 1/2) ln2 */
        double k = (double)(rnd() % (uint64_t)(lo / ln2));
        x[n++] = (T)(-(k + 0.5) * ln2 + (u01() - 0.5) * (dbl ? 1e-9 : 1e-4));
    }
    for (i = 0; i < per; i++) x[n++] = (T)(-u01() * 1e-3);
    for (i = 0; i < (long)(lo / ln2); i++) x[n++] = (T)(-(double)i * ln2);  /* near k ln2 */
    run_vec(x, yv, n);
    run_scalar(x, ys, n);
    long mismatch = 0, nonzero_below = 0;
    int nan_ok = 1;
    double worst = 0.0, worst_edge = 0.0, worst_x = 0.0;
    for (i = 0; i < n; i++) {
        if (memcmp(&yv[i], &ys[i], sizeof(T)))
            mismatch++;
        if (isnan(x[i])) {
            nan_ok &= isnan(yv[i]) && isnan(ys[i]);
            continue;
        }
        if (x[i] < -lo - 1e-9 && yv[i] != 0)
            nonzero_below++;
        double e = ulps(yv[i], x[i]);
        if (e > worst) {
            worst = e;
            worst_x = (double)x[i];
        }
        if (i < ne && e > worst_edge)
            worst_edge = e;
    }
    printf("n=%ld mismatch=%ld nan_ok=%d worst_ulps=%.4f worst_x=%.17g nonzero_below=%ld "
           "worst_edge_ulps=%.4f\n", n, mismatch, nan_ok, worst, worst_x, nonzero_below,
           worst_edge);
    return 0;
}
#endif
