/* tests/test_exp.py's harness for the kernels' inlined exp and log (ssm/_kernels.h:
   ssm_exp_nonpos / ssm_expf_nonpos, or with -DLOG ssm_log_pos / ssm_logf_pos): the
   function's text is pasted from the header into exp_fn.h by the test. Built three times:
   -DPART_VEC (the loop vectorised, as in the kernels' bodies), -DPART_SCALAR with
   -fno-tree-vectorize (the loops' remainders), and -DPART_MAIN, which draws the
   arguments, runs both and compares them with expl / logl. Prints one line: n,
   vector/scalar mismatches, NaN handling, worst ulps and its argument, for the exp the
   results below the smallest denormal that are not 0, for the log whether 0, inf and
   negative arguments give -inf, inf and NaN, and the worst ulps of the edge cases. */
#include <float.h>
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

#define DBL (sizeof(T) == 8)

#ifdef LOG
/* a random positive finite T from uniform bits: every binade alike, denormals included */
static T any_positive(void)
{
    if (DBL) {
        union { double f; uint64_t u; } v;
        v.u = rnd() % 0x7ff0000000000000u;
        return (T)v.f;
    } else {
        union { float f; uint32_t u; } v;
        v.u = (uint32_t)(rnd() % 0x7f800000u);
        return (T)v.f;
    }
}
#endif

/* T's next value up; the long double reference's error is far below these ulps */
static T up(T r) { return DBL ? (T)nextafter((double)r, INFINITY) : (T)nextafterf((float)r, INFINITY); }

#ifdef LOG
static long double ref_of(T x) { return logl((long double)x); }
#else
static long double ref_of(T x) { return expl((long double)x); }
#endif

/* |y - f(x)| in ulps of |f(x)| rounded to T (the spacing above it; denormal ulps below T's
   smallest normal) */
static double ulps(T y, T x)
{
    long double ref = ref_of(x);
    T r = (T)ref;
    T tiny = DBL ? (T)0x1p-1074 : (T)0x1p-149f;
    T a = r < 0 ? -r : r;
    T ulp = up(a) - a;
    if (ulp < tiny)
        ulp = tiny;
    return (double)(fabsl((long double)y - ref) / ulp);
}

int main(int argc, char **argv)
{
    long per = argc > 1 ? atol(argv[1]) : 1000000, n = 0, i;
    const double ln2 = 0.6931471805599453;
#ifdef LOG
    const double edges[] = {0x1p-1074, 0x1p-1073, 0x1.8p-1060, 0x1p-1023, 0x1p-1022,
                            0x1.fffffffffffffp-1023, 0x1p-149, 0x1p-126, 0x1.fffffep-127,
                            1e-300, 1e-30, 1e-8, 0.25, 0.5, 0.7071067811865475,
                            0.7071067811865476, 0.70710677, 0.7071068, 1.0 - 0x1p-53,
                            1.0 - 0x1p-24, 1.0, 1.0 + 0x1p-52, 1.0 + 0x1p-23, 1.0 + 1e-7,
                            1.4142135623730951, 1.4142135623730950, 1.4142135, 1.4142137, 2.0,
                            2.718281828459045, 3.0, 7.0, 21.0, 1000.0, 1e30, 3.4028234663852886e38,
                            1e300, DBL_MAX};
    const double specials[] = {0.0, -0.0, INFINITY, -INFINITY, -1.0, -0x1p-1074, -1e-30, NAN};
#else
    const double lo = DBL ? 745.1332191019412 : 103.97207708;  /* exp(-lo) = half the least denormal */
    const double edges[] = {0.0, -0.0, -0x1p-1074, -0x1p-149, -1e-300, -1e-30, -1e-17, -1e-8,
                            -0.5 * ln2, -ln2, -1.0, -87.0, -87.5, -88.0, -100.0, -103.0,
                            -103.9, -104.0, -104.5, -700.0, -708.3964185322641, -708.4, -709.0,
                            -720.0, -740.0, -744.0, -745.0, -745.1, -745.2, -746.0, -800.0,
                            -1e300, -INFINITY};
    const double specials[] = {NAN};
#endif
    const int ne = (int)(sizeof edges / sizeof *edges);
    const int ns = (int)(sizeof specials / sizeof *specials);
    const long cap = ne + ns + 7 * per + 1100;
    T *x = malloc((size_t)cap * sizeof(T));
    T *yv = malloc((size_t)cap * sizeof(T));
    T *ys = malloc((size_t)cap * sizeof(T));
    for (i = 0; i < ne; i++)
        x[n++] = (T)edges[i];
    for (i = 0; i < ns; i++)
        x[n++] = (T)specials[i];
#ifdef LOG
    for (i = 0; i < per; i++) x[n++] = any_positive();                       /* the whole range */
    for (i = 0; i < per; i++) x[n++] = (T)(1.0 + u01() * 999.0);            /* sums of exp: [1, C] */
    for (i = 0; i < per; i++) x[n++] = (T)u01();                            /* probabilities */
    for (i = 0; i < per; i++) {                                            /* denormals */
        T v = any_positive();
        x[n++] = DBL ? (T)ldexp((double)v, -(int)(rnd() % 1075)) : (T)ldexpf((float)v, -(int)(rnd() % 150));
    }
    for (i = 0; i < per; i++)                                              /* near 1 */
        x[n++] = (T)(1.0 + (u01() - 0.5) * ldexp(1.0, -(int)(rnd() % (DBL ? 53 : 24))));
    for (i = 0; i < per; i++) {                                            /* near sqrt(2) 2^k */
        int k = (int)(rnd() % 200) - 100;
        x[n++] = (T)ldexp(1.4142135623730951 * (1.0 + (u01() - 0.5) * (DBL ? 1e-12 : 1e-5)), k);
    }
    for (i = 0; i < per; i++) x[n++] = (T)(0.5 + u01());                     /* around 1 */
    for (i = 0; i < 1100; i++) x[n++] = (T)ldexp(1.0, (int)i - (DBL ? 1074 : 149) % 1100); /* 2^k */
    (void)ln2;
#else
    for (i = 0; i < per; i++) x[n++] = (T)(-u01() * (lo + 5.0));           /* the whole range */
    for (i = 0; i < per; i++) x[n++] = (T)(-u01() * 40.0);                 /* softmax's range */
    for (i = 0; i < per; i++) x[n++] = (T)(-u01());
    for (i = 0; i < per; i++) x[n++] = (T)(-lo + 38.0 * (DBL ? 1.0 : 0.55) * (u01() - 0.05)); /* denormals */
    for (i = 0; i < per; i++)                                              /* tiny arguments */
        x[n++] = (T)(-ldexp(1.0 + u01(), -(int)(rnd() % (DBL ? 1074 : 149))));
    for (i = 0; i < per; i++) {                                            /* near (k + 1/2) ln2 */
        double k = (double)(rnd() % (uint64_t)(lo / ln2));
        x[n++] = (T)(-(k + 0.5) * ln2 + (u01() - 0.5) * (DBL ? 1e-9 : 1e-4));
    }
    for (i = 0; i < per; i++) x[n++] = (T)(-u01() * 1e-3);
    for (i = 0; i < (long)(lo / ln2); i++) x[n++] = (T)(-(double)i * ln2);  /* near k ln2 */
#endif
    run_vec(x, yv, n);
    run_scalar(x, ys, n);
    long mismatch = 0, nonzero_below = 0;
    int nan_ok = 1, special_ok = 1;
    double worst = 0.0, worst_edge = 0.0, worst_x = 0.0;
    for (i = 0; i < n; i++) {
        if (memcmp(&yv[i], &ys[i], sizeof(T)))
            mismatch++;
        if (i >= ne && i < ne + ns) {  /* the specials: compared as values below */
            long double ref = ref_of(x[i]);
            int ok = isnan(ref) ? isnan(yv[i]) && isnan(ys[i]) : yv[i] == (T)ref && ys[i] == (T)ref;
            special_ok &= ok;
            if (isnan(x[i]))
                nan_ok &= ok;
            continue;
        }
        if (isnan(x[i])) {
            nan_ok &= isnan(yv[i]) && isnan(ys[i]);
            continue;
        }
#ifndef LOG
        if (x[i] < -lo - 1e-9 && yv[i] != 0)
            nonzero_below++;
#endif
        double e = ulps(yv[i], x[i]);
        if (e > worst) {
            worst = e;
            worst_x = (double)x[i];
        }
        if (i < ne && e > worst_edge)
            worst_edge = e;
    }
    printf("n=%ld mismatch=%ld nan_ok=%d special_ok=%d worst_ulps=%.4f worst_x=%.17g "
           "nonzero_below=%ld worst_edge_ulps=%.4f\n", n, mismatch, nan_ok, special_ok, worst,
           worst_x, nonzero_below, worst_edge);
    return 0;
}
#endif
