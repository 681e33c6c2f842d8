/*
 * ssm/_kernels.h -- the CPU tile kernels of ssm, in C.
 *
 * Design
 * ------
 * a) Every layout is viewed as (outer, C, inner): NCHW -> (N, C, H*W...), NHWC and
 *    (N, C) -> (N*H*W..., C, 1). A pixel p is (o, i) with flat index o*inner + i, which
 *    is also its index in the (N, *spatial) label, weight and loss arrays.
 * b) The work is cut into tiles of at most `tile` pixels that never cross an image
 *    (inner > 1) or span `tile` rows (inner == 1). The partition depends only on the
 *    shape, never on the thread count: per-tile float64 partial sums, added in tile
 *    order by the caller, make every reduction bit-identical for any thread count.
 * c) Inside a tile the math runs on channel-major [C][tile] blocks so that the inner
 *    loops walk contiguous pixels and vectorise (exp through libmvec, see below).
 *    Strided channels (inner > 1) are read and written in place with channel stride
 *    `inner`. Contiguous rows (inner == 1) are transposed into per-thread scratch,
 *    computed, and transposed back: the same math, no kernel per layout.
 * d) One core function per concept: softmax_fwd (log-softmax is its epilogue),
 *    softmax_bwd, sswl_fwd / sswl_fwd_bwd (one function: the epilogue writes either
 *    the probabilities or the gradient), sswl_bwd, and the label pre-pass sswl_stats.
 *    The fused loss+gradient reads the logits once, computes exp once per element
 *    and writes the gradient once.
 * e) Targets are staged per tile into a sparse form (class index + weight per pixel,
 *    for plain labels) or a dense [C][tile] block a_c = w * cw_c * t_c (soft targets,
 *    lenses, smoothing). A label outside [0, C) is never used as an index.
 * f) Threads live in the Cython caller (prange over tiles); these functions are
 *    pure, nogil, allocation-free, and get their per-thread scratch passed in.
 *
 * Vector exp/log without -ffast-math: glibc only declares the SIMD variants of expf,
 * exp, logf and log under __FAST_MATH__, so we declare them ourselves with
 * `omp declare simd`; with -fno-math-errno and -fopenmp gcc then calls libmvec.
 * target_clones builds each tile driver for AVX-512, AVX2 and the x86-64 baseline,
 * picked once at load time (ifunc); everything below the drivers is always_inline,
 * so it is compiled for each clone.
 */
#ifndef SSM_KERNELS_H
#define SSM_KERNELS_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GLIBC__) && defined(__GNUC__) && !defined(__clang__) \
    && !defined(__FAST_MATH__) && !defined(SSM_NO_CLONES)
#pragma omp declare simd notinbranch
extern float expf(float);
#pragma omp declare simd notinbranch
extern double exp(double);
#pragma omp declare simd notinbranch
extern float logf(float);
#pragma omp declare simd notinbranch
extern double log(double);
#define SSM_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define SSM_ISA_NAMES 1
#else
#define SSM_CLONES
#endif

#define SSM_INLINE static inline __attribute__((always_inline))

/* target kinds; must match _TARGET_KIND in ssm/_validation.py */
enum { SSM_NO_TARGET = 0, SSM_U8 = 1, SSM_I32 = 2, SSM_I64 = 3, SSM_SOFT = 4 };

typedef struct {
    ptrdiff_t outer, C, inner;  /* logits viewed as (outer, C, inner) */
    ptrdiff_t tile;             /* pixels per tile */
    const void *x;              /* logits, or prob for the backward functions */
    const void *x2;             /* dprob (softmax_bwd) */
    int target_kind;            /* SSM_* above */
    const void *target;         /* labels (outer*inner) or soft targets (like x) */
    long long ignore_index;
    const void *w;              /* per-pixel weights (outer*inner) or NULL */
    const void *cw;             /* class weights (C) or NULL */
    const void *lens;           /* (C, C) row-stochastic lens or NULL */
    double smoothing;           /* label smoothing e */
    double loss_cap;            /* per-unit-weight pixel loss cap (Caffe2 clamp); INFINITY if none */
    const void *g;              /* d_loss map (outer*inner) or NULL */
    double g_scale;             /* gradient scale: d_loss / norm */
    void *out;                  /* prob, log-prob or dlogits */
    void *out2;                 /* prob, from the fused function, or NULL */
    void *loss_map;             /* per-pixel loss (outer*inner) or NULL */
} ssm_problem;

static inline ptrdiff_t ssm_num_tiles(const ssm_problem *P)
{
    if (P->outer == 0 || P->inner == 0 || P->C == 0)
        return 0;
    if (P->inner > 1)
        return P->outer * ((P->inner + P->tile - 1) / P->tile);
    return (P->outer + P->tile - 1) / P->tile;
}

/* Where tile t lives: element offset of its first logit, flat index of its first
   pixel, and its pixel count. */
SSM_INLINE void ssm_tile_geom(const ssm_problem *P, ptrdiff_t t, ptrdiff_t *base,
                              ptrdiff_t *pix, ptrdiff_t *n)
{
    if (P->inner > 1) {
        ptrdiff_t per = (P->inner + P->tile - 1) / P->tile;
        ptrdiff_t o = t / per, i0 = (t % per) * P->tile;
        *n = P->inner - i0 < P->tile ? P->inner - i0 : P->tile;
        *base = o * P->C * P->inner + i0;
        *pix = o * P->inner + i0;
    } else {
        ptrdiff_t r0 = t * P->tile;
        *n = P->outer - r0 < P->tile ? P->outer - r0 : P->tile;
        *base = r0 * P->C;
        *pix = r0;
    }
}

/* Label of pixel p as a 64-bit integer, whatever its storage type. */
SSM_INLINE long long ssm_label(const ssm_problem *P, ptrdiff_t p)
{
    switch (P->target_kind) {
    case SSM_U8: return ((const uint8_t *)P->target)[p];
    case SSM_I32: return ((const int32_t *)P->target)[p];
    default: return ((const int64_t *)P->target)[p];
    }
}

/* Per-tile scratch, in bytes, for elements of `rsize` bytes. Layout (see
   ssm_scratch_carve): 5 per-pixel arrays of R, one of int32, one of double, and
   up to 4 [C][tile] blocks (rows in, rows out, rows out2, dense target). */
static inline size_t ssm_scratch_bytes(const ssm_problem *P, size_t rsize)
{
    size_t T = (size_t)P->tile, C = (size_t)P->C;
    return 64 * 8 + T * (5 * rsize + sizeof(int32_t) + sizeof(double)) + 4 * C * T * rsize;
}

/* Pre-pass of the loss functions over tile t: the tile's share of the "mean"
   normaliser (sum of n_p, in double) and the lowest flat index of a label that is
   neither in [0, C) nor ignore_index (-1 if none). Reads labels and weights only. */
static inline void ssm_sswl_stats_generic(const ssm_problem *P, ptrdiff_t t, int is_double,
                                          double *norm, ptrdiff_t *bad)
{
    ptrdiff_t base, pix, n, j;
    double acc = 0.0;
    ssm_tile_geom(P, t, &base, &pix, &n);
    *bad = -1;
    if (P->target_kind == SSM_SOFT) {
        if (P->w == NULL) {
            acc = (double)n;
        } else if (is_double) {
            const double *w = (const double *)P->w + pix;
            for (j = 0; j < n; j++) acc += w[j];
        } else {
            const float *w = (const float *)P->w + pix;
            for (j = 0; j < n; j++) acc += (double)w[j];
        }
        *norm = acc;
        return;
    }
    for (j = 0; j < n; j++) {
        long long y = ssm_label(P, pix + j);
        double np_;
        if (y == P->ignore_index)
            continue;
        if (y < 0 || y >= P->C) {
            if (*bad < 0) *bad = pix + j;
            continue;
        }
        np_ = 1.0;
        if (is_double) {
            if (P->w) np_ *= ((const double *)P->w)[pix + j];
            if (P->cw) np_ *= ((const double *)P->cw)[y];
        } else {
            if (P->w) np_ *= (double)((const float *)P->w)[pix + j];
            if (P->cw) np_ *= (double)((const float *)P->cw)[y];
        }
        acc += np_;
    }
    *norm = acc;
}

static inline void ssm_sswl_stats_f(const ssm_problem *P, ptrdiff_t t, double *norm, ptrdiff_t *bad)
{
    ssm_sswl_stats_generic(P, t, 0, norm, bad);
}

static inline void ssm_sswl_stats_d(const ssm_problem *P, ptrdiff_t t, double *norm, ptrdiff_t *bad)
{
    ssm_sswl_stats_generic(P, t, 1, norm, bad);
}

/* The per-dtype kernels: one template, instantiated for float and double. */
#define R float
#define SSM_SFX(name) name##_f
#define SSM_EXP expf
#define SSM_LOG logf
#include "_kernels_impl.h"
#undef R
#undef SSM_SFX
#undef SSM_EXP
#undef SSM_LOG

#define R double
#define SSM_SFX(name) name##_d
#define SSM_EXP exp
#define SSM_LOG log
#include "_kernels_impl.h"
#undef R
#undef SSM_SFX
#undef SSM_EXP
#undef SSM_LOG

/* Which clone the loader picked, for show_config and the tests. */
static inline const char *ssm_simd_path(void)
{
#if defined(SSM_ISA_NAMES)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("x86-64-v4"))
        return "x86-64-v4 (AVX-512)";
    if (__builtin_cpu_supports("x86-64-v3"))
        return "x86-64-v3 (AVX2)";
    return "x86-64 baseline (SSE2)";
#else
    return "generic (no target clones)";
#endif
}

#endif /* SSM_KERNELS_H */
