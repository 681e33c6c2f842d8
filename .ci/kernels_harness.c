/*
 * .ci/kernels_harness.c -- the CPU tile kernels of ssm/_kernels.h, without Python.
 *
 * Built by .ci/aarch64 twice, with setup.py's flags (OpenMP on) plus -Wall -Wextra
 * -Werror: natively (x86-64: target_clones, AVX transposes, streaming stores), run as
 * is and under qemu-x86_64 -cpu Haswell and -cpu Nehalem (the AVX2 and baseline clones);
 * and with Debian's aarch64 cross compiler, run under qemu-aarch64 (the portable paths:
 * no clones, scalar transposes, memcpy instead of streaming stores). The ssm_problem
 * fields are set as _cpu.pyx sets them (the d_loss map and gradient scale: in one place,
 * run_problem's target loop). It drives the tile entry points as ssm/_cpu.pyx
 * does (a parallel loop over tiles, per-thread scratch, per-tile partial sums added
 * in tile order) and checks every output against a naive double-precision
 * reference below, with the tolerances of the Python tests (64 eps of the storage
 * type, absolute part relative to the output's magnitude), and the reduced losses
 * bit for bit between 1 and 4 threads.
 *
 * Problems are (outer, C, inner): inner > 1 is the strided-channel kernel shape
 * (NCHW), inner == 1 the contiguous-row shape (NHWC, (N, C)). Each is run with the
 * tile size ssm/_validation.py's tile_size picks and with 16-pixel tiles (many
 * tiles, partial last tiles, SIMD tails), and with streamed outputs.
 *
 * Usage: harness [-v]; exit status 0 when every check passed.
 */
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "_kernels.h"

static int verbose, failures, checks;
static char where[256]; /* the case being checked, for messages */

/* ---------------------------------------------------------------- storage helpers */

static double get(const void *a, int dbl, ptrdiff_t i)
{
    return dbl ? ((const double *)a)[i] : (double)((const float *)a)[i];
}

static void put(void *a, int dbl, ptrdiff_t i, double v)
{
    if (dbl)
        ((double *)a)[i] = v;
    else
        ((float *)a)[i] = (float)v;
}

static void *alloc(ptrdiff_t n, size_t size)
{
    void *p = calloc(n > 0 ? (size_t)n : 1, size);
    if (!p) {
        fprintf(stderr, "out of memory\n");
        exit(2);
    }
    return p;
}

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;

static double uniform(void) /* [0, 1), xorshift64* */
{
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return (double)((rng_state * 0x2545F4914F6CDD1Dull) >> 11) * 0x1.0p-53;
}

static double normal(void)
{
    double u = uniform() + 1e-300, v = uniform();
    return sqrt(-2.0 * log(u)) * cos(6.283185307179586 * v);
}

/* ---------------------------------------------------------------- running the tiles */

enum { OP_SOFTMAX, OP_LOG_SOFTMAX, OP_SOFTMAX_BWD, OP_SSWL_FWD, OP_SSWL_FWD_BWD, OP_SSWL_BWD };

static double tile_call(const ssm_problem *P, int op, int dbl, ptrdiff_t t, void *buf)
{
    switch (op) {
    case OP_SOFTMAX:
    case OP_LOG_SOFTMAX:
        return dbl ? ssm_softmax_fwd_tile_d(P, t, buf, op == OP_LOG_SOFTMAX)
                   : ssm_softmax_fwd_tile_f(P, t, buf, op == OP_LOG_SOFTMAX);
    case OP_SOFTMAX_BWD:
        return dbl ? ssm_softmax_bwd_tile_d(P, t, buf) : ssm_softmax_bwd_tile_f(P, t, buf);
    case OP_SSWL_BWD:
        return dbl ? ssm_sswl_bwd_tile_d(P, t, buf) : ssm_sswl_bwd_tile_f(P, t, buf);
    default:
        return dbl ? ssm_sswl_pass_tile_d(P, t, buf, op == OP_SSWL_FWD_BWD)
                   : ssm_sswl_pass_tile_f(P, t, buf, op == OP_SSWL_FWD_BWD);
    }
}

/* As _cpu.pyx's run: tiles in parallel, per-thread scratch, partials summed in order. */
static double run(const ssm_problem *P, int op, int dbl, int threads)
{
    ptrdiff_t nt = ssm_num_tiles(P), t;
    size_t nbytes = ssm_scratch_bytes(P, dbl ? 8 : 4);
    double *part = alloc(nt, sizeof(double)), total = 0.0;
#pragma omp parallel num_threads(threads)
    {
        void *buf = alloc((ptrdiff_t)nbytes, 1);
#pragma omp for schedule(dynamic, 1)
        for (t = 0; t < nt; t++)
            part[t] = tile_call(P, op, dbl, t, buf);
        free(buf);
    }
    for (t = 0; t < nt; t++)
        total += part[t];
    free(part);
    return total;
}

/* As _cpu.pyx's stats. */
static double run_stats(const ssm_problem *P, int dbl, int threads, ptrdiff_t *bad)
{
    ptrdiff_t nt = ssm_num_tiles(P), t;
    double *part = alloc(nt, sizeof(double)), norm = 0.0;
    ptrdiff_t *bads = alloc(nt, sizeof(ptrdiff_t));
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
    for (t = 0; t < nt; t++) {
        if (dbl)
            ssm_sswl_stats_d(P, t, &part[t], &bads[t]);
        else
            ssm_sswl_stats_f(P, t, &part[t], &bads[t]);
    }
    *bad = -1;
    for (t = 0; t < nt; t++) {
        norm += part[t];
        if (*bad < 0 && bads[t] >= 0)
            *bad = bads[t];
    }
    free(part);
    free(bads);
    return norm;
}

/* ---------------------------------------------------------------- checks */

static void fail(const char *what, ptrdiff_t i, double got, double want)
{
    failures++;
    if (failures <= 20)
        printf("FAIL %s: %s[%td] = %.17g, expected %.17g\n", where, what, i, got, want);
}

/* |got - want| <= 64 eps (|want| + scale), as tests/conftest.py's assert_close. */
static void check_array(const char *what, const void *got, int dbl, const double *want,
                        ptrdiff_t n, double scale)
{
    double e = 64.0 * (dbl ? 0x1.0p-52 : 0x1.0p-23);
    ptrdiff_t i;
    checks++;
    for (i = 0; i < n; i++) {
        double g = get(got, dbl, i), w = want[i];
        if (!(fabs(g - w) <= e * (fabs(w) + scale))) {
            fail(what, i, g, w);
            return;
        }
    }
}

static void check_value(const char *what, double got, double want, double scale, int dbl)
{
    double e = 64.0 * (dbl ? 0x1.0p-52 : 0x1.0p-23);
    checks++;
    if (!(fabs(got - want) <= e * (fabs(want) + scale)))
        fail(what, -1, got, want);
}

static double max_abs(const double *a, ptrdiff_t n)
{
    double m = 0.0;
    ptrdiff_t i;
    for (i = 0; i < n; i++)
        m = fabs(a[i]) > m ? fabs(a[i]) : m;
    return m;
}

/* ---------------------------------------------------------------- the reference */

typedef struct {
    ptrdiff_t outer, C, inner;
    const double *x;   /* logits as stored (rounded to the storage type) */
    int kind;          /* SSM_U8, SSM_I32, SSM_I64 or SSM_SOFT */
    const long long *y;
    long long ignore;
    const double *t;   /* soft targets */
    const double *w, *cw, *lens, *gmap;
    double smoothing, cap, g_scale;
} ref_problem;

static ptrdiff_t at(const ref_problem *R, ptrdiff_t p, ptrdiff_t c)
{
    ptrdiff_t o = p / R->inner, i = p % R->inner;
    return (o * R->C + c) * R->inner + i;
}

/* log-sum-exp of pixel p's logits */
static double ref_lse(const ref_problem *R, const double *x, ptrdiff_t p)
{
    double m = -INFINITY, s = 0.0;
    ptrdiff_t c;
    for (c = 0; c < R->C; c++)
        m = x[at(R, p, c)] > m ? x[at(R, p, c)] : m;
    for (c = 0; c < R->C; c++)
        s += exp(x[at(R, p, c)] - m);
    return m + log(s);
}

/* Pixel p's target weights a_c (into a) and its activity; returns 1 for the dense form
   (the loss uncapped), 0 for the sparse one (a is then w cw_y at y, 0 elsewhere). */
static int ref_targets(const ref_problem *R, ptrdiff_t p, double *a, double *act)
{
    ptrdiff_t C = R->C, c;
    double w = R->w ? R->w[p] : 1.0, keep = 1.0 - R->smoothing, spread = R->smoothing / C;
    int dense = R->kind == SSM_SOFT || R->lens || R->smoothing != 0.0;
    for (c = 0; c < C; c++)
        a[c] = 0.0;
    *act = 0.0;
    if (R->kind == SSM_SOFT) {
        for (c = 0; c < C; c++)
            a[c] = w * (R->cw ? R->cw[c] : 1.0) * (keep * R->t[at(R, p, c)] + spread);
        *act = w != 0.0;
        return 1;
    }
    if (R->y[p] == R->ignore)
        return dense;
    if (!dense) {
        a[R->y[p]] = w * (R->cw ? R->cw[R->y[p]] : 1.0);
        *act = 1.0;
        return 0;
    }
    for (c = 0; c < C; c++) {
        double b = R->lens ? R->lens[R->y[p] * C + c] : (double)(c == R->y[p]);
        a[c] = w * (R->cw ? R->cw[c] : 1.0) * (keep * b + spread);
    }
    *act = w != 0.0;
    return 1;
}

/* loss map and the gradient dx_c = g act (A q_c - a_c), q from the logits x or given;
   returns the largest |g act A|, the scale of the gradient's terms (the gradient itself
   cancels to 0 where C == 1) */
static double ref_sswl(const ref_problem *R, const double *q_given, double *loss, double *dx,
                       double *prob)
{
    double gterm = 0.0;
    ptrdiff_t C = R->C, P = R->outer * R->inner, p, c;
    double *a = alloc(C, sizeof(double));
    for (p = 0; p < P; p++) {
        double act, A = 0.0, l = 0.0, lse = q_given ? 0.0 : ref_lse(R, R->x, p);
        double g = R->g_scale * (R->gmap ? R->gmap[p] : 1.0);
        int dense = ref_targets(R, p, a, &act);
        for (c = 0; c < C; c++) {
            A += a[c];
            if (a[c] != 0.0 && !q_given)
                l += a[c] * (lse - R->x[at(R, p, c)]);
        }
        if (!dense && l > A * R->cap)
            l = A * R->cap;
        loss[p] = act == 0.0 ? 0.0 : l;
        gterm = fabs(g * act * A) > gterm ? fabs(g * act * A) : gterm;
        for (c = 0; c < C; c++) {
            double q = q_given ? q_given[at(R, p, c)] : exp(R->x[at(R, p, c)] - lse);
            if (prob)
                prob[at(R, p, c)] = q;
            if (dx)
                dx[at(R, p, c)] = act == 0.0 ? 0.0 : g * (A * q - a[c]);
        }
    }
    free(a);
    return gterm;
}

/* ---------------------------------------------------------------- one problem */

static ptrdiff_t library_tile(ptrdiff_t C, ptrdiff_t inner, int dbl)
{   /* ssm/_cpu.pyx: _tile_size, with MIN_TILE = 128 */
    ptrdiff_t size = dbl ? 8 : 4, t = 64 * 1024 / (C * size), wide = inner > 1 ? 128 : 16;
    t = t < 1 ? 1 : t > 1024 ? 1024 : t;
    if (t >= 16)
        t = t / 16 * 16;
    for (; wide >= 16 && t < wide; wide /= 2)
        if (wide * C * size <= 1024 * 1024) {
            t = wide;
            break;
        }
    return inner > 1 && inner < t ? inner : t;
}

typedef struct {
    const char *name;
    int kind;        /* SSM_U8, SSM_I32, SSM_I64, SSM_SOFT */
    int weights, class_weights, lens, gmap;
    double smoothing, cap;
} target_case;

static const target_case TARGETS[] = {
    {"labels u8", SSM_U8, 0, 0, 0, 0, 0.0, INFINITY},
    {"labels i32, weights, class weights", SSM_I32, 1, 1, 0, 1, 0.0, INFINITY},
    {"labels i64, weights, loss cap", SSM_I64, 1, 0, 0, 0, 0.0, 1.5},
    {"labels i64, smoothing, lens", SSM_I64, 1, 1, 1, 1, 0.1, INFINITY},
    {"soft targets, weights, class weights", SSM_SOFT, 1, 1, 0, 1, 0.0, INFINITY},
};

static void *label_array(int kind, const long long *y, ptrdiff_t n)
{
    ptrdiff_t i;
    size_t size = kind == SSM_U8 ? 1 : kind == SSM_I32 ? 4 : 8;
    void *a = alloc(n, size);
    for (i = 0; i < n; i++) {
        if (kind == SSM_U8)
            ((uint8_t *)a)[i] = (uint8_t)y[i];
        else if (kind == SSM_I32)
            ((int32_t *)a)[i] = (int32_t)y[i];
        else
            ((int64_t *)a)[i] = (int64_t)y[i];
    }
    return a;
}

/* Float arrays in the storage type, and the same values in double for the reference. */
static void *stored(const double *src, ptrdiff_t n, int dbl, double **rounded)
{
    void *a = alloc(n, dbl ? 8 : 4);
    ptrdiff_t i;
    *rounded = alloc(n, sizeof(double));
    for (i = 0; i < n; i++) {
        put(a, dbl, i, src[i]);
        (*rounded)[i] = get(a, dbl, i);
    }
    return a;
}

static void run_problem(ptrdiff_t outer, ptrdiff_t C, ptrdiff_t inner, ptrdiff_t tile, int dbl,
                        int stream)
{
    ptrdiff_t P = outer * inner, E = P * C, i, p, c, k;
    const char *shape = inner > 1 ? "strided channels" : "contiguous rows";
    double *gen = alloc(E > C * C ? E : C * C, sizeof(double)), *xd, *pd, *dpd;
    double *want = alloc(E, sizeof(double));
    double *want2 = alloc(E, sizeof(double)), *lossd = alloc(P, sizeof(double));
    void *x, *prob, *dprob, *out = alloc(E, 8), *out2 = alloc(E, 8), *lmap = alloc(P, 8);
    ref_problem R;
    ssm_problem S;
    memset(&S, 0, sizeof(S));
    S.outer = outer, S.C = C, S.inner = inner, S.tile = tile, S.stream = stream;
    memset(&R, 0, sizeof(R));
    R.outer = outer, R.C = C, R.inner = inner;

    for (i = 0; i < E; i++)
        gen[i] = 2.0 * normal();
    x = stored(gen, E, dbl, &xd);
    R.x = xd;

    /* softmax and log-softmax */
    snprintf(where, sizeof(where), "%s (%td, %td, %td) tile %td %s%s softmax", shape, outer, C,
             inner, tile, dbl ? "double" : "float", stream ? " streamed" : "");
    S.x = x, S.out = out;
    for (p = 0; p < P; p++) {
        double lse = ref_lse(&R, xd, p);
        for (c = 0; c < C; c++) {
            want[at(&R, p, c)] = exp(xd[at(&R, p, c)] - lse);
            want2[at(&R, p, c)] = xd[at(&R, p, c)] - lse;
        }
    }
    run(&S, OP_SOFTMAX, dbl, 3);
    check_array("prob", out, dbl, want, E, 1e-6);
    run(&S, OP_LOG_SOFTMAX, dbl, 3);
    check_array("log_prob", out, dbl, want2, E, 1.0);

    /* softmax_bwd: dx = p (dp - sum_c p dp), p the reference probabilities */
    prob = stored(want, E, dbl, &pd);
    for (i = 0; i < E; i++)
        gen[i] = normal();
    dprob = stored(gen, E, dbl, &dpd);
    S.x = prob, S.x2 = dprob;
    run(&S, OP_SOFTMAX_BWD, dbl, 3);
    for (p = 0; p < P; p++) {
        double dot = 0.0;
        for (c = 0; c < C; c++)
            dot += pd[at(&R, p, c)] * dpd[at(&R, p, c)];
        for (c = 0; c < C; c++)
            want2[at(&R, p, c)] = pd[at(&R, p, c)] * (dpd[at(&R, p, c)] - dot);
    }
    check_array("softmax_bwd", out, dbl, want2, E, max_abs(want2, E));
    S.x2 = NULL;

    /* the loss functions, for each kind of target */
    for (k = 0; k < (ptrdiff_t)(sizeof(TARGETS) / sizeof(TARGETS[0])); k++) {
        const target_case *T = &TARGETS[k];
        long long *y = alloc(P, sizeof(long long)), ignore = T->kind == SSM_U8 ? 255 : -1;
        double *w = NULL, *cw = NULL, *lens = NULL, *gmap = NULL, *t = NULL;
        void *labels = NULL, *soft = NULL, *wv = NULL, *cwv = NULL, *lensv = NULL, *gv = NULL;
        double total, total1, norm, want_norm = 0.0, lscale, gscale, sum_abs = 0.0;
        ptrdiff_t bad;
        if (T->kind == SSM_U8 && C > 255) {  /* uint8 labels hold classes 0-254 */
            free(y);
            continue;
        }
        snprintf(where, sizeof(where), "%s (%td, %td, %td) tile %td %s%s, %s", shape, outer, C,
                 inner, tile, dbl ? "double" : "float", stream ? " streamed" : "", T->name);

        for (p = 0; p < P; p++)
            y[p] = uniform() < 0.1 ? ignore : (long long)(uniform() * C);
        if (T->kind == SSM_SOFT) {
            for (p = 0; p < P; p++) {
                double s = 0.0;
                for (c = 0; c < C; c++)
                    s += (gen[at(&R, p, c)] = pow(uniform(), 3.0));
                for (c = 0; c < C; c++)
                    gen[at(&R, p, c)] /= s;
            }
            soft = stored(gen, E, dbl, &t);
        } else {
            labels = label_array(T->kind, y, P);
        }
        if (T->weights) {
            for (p = 0; p < P; p++)
                gen[p] = uniform() < 0.05 ? 0.0 : 2.0 * uniform();
            wv = stored(gen, P, dbl, &w);
        }
        if (T->class_weights) {
            for (c = 0; c < C; c++)
                gen[c] = 0.25 + 1.75 * uniform();
            cwv = stored(gen, C, dbl, &cw);
        }
        if (T->lens) {
            for (i = 0; i < C; i++) {
                double s = 0.0;
                for (c = 0; c < C; c++)
                    s += (gen[i * C + c] = uniform() * uniform());
                for (c = 0; c < C; c++)
                    gen[i * C + c] /= s;
            }
            lensv = stored(gen, C * C, dbl, &lens);
        }
        if (T->gmap) {
            for (p = 0; p < P; p++)
                gen[p] = uniform();
            gv = stored(gen, P, dbl, &gmap);
        }
        R.kind = T->kind, R.y = y, R.ignore = ignore, R.t = t, R.w = w, R.cw = cw;
        R.lens = lens, R.gmap = gmap, R.smoothing = T->smoothing, R.cap = T->cap;
        R.g_scale = 0.37;
        S.target_kind = T->kind, S.target = soft ? soft : labels, S.ignore_index = ignore;
        S.w = wv, S.cw = cwv, S.lens = lensv, S.smoothing = T->smoothing, S.loss_cap = T->cap;
        S.d_loss_map = gv, S.grad_scale = 0.37; /* the d_loss map and the gradient scale */
        S.x = x, S.out = out, S.out2 = NULL, S.loss_map = lmap;

        gscale = ref_sswl(&R, NULL, lossd, want2, want);
        lscale = 1.0 + max_abs(xd, E) + log((double)C);
        for (p = 0; p < P; p++)
            sum_abs += fabs(lossd[p]) + lscale * (w ? w[p] : 1.0) * (cw ? max_abs(cw, C) : 1.0);

        /* sswl_fwd: prob and the loss, bit for bit the same on 1 and 4 threads */
        total = run(&S, OP_SSWL_FWD, dbl, 4);
        check_array("sswl_fwd prob", out, dbl, want, E, 1e-6);
        check_array("sswl_fwd loss_map", lmap, dbl, lossd, P, lscale);
        for (p = 0, norm = 0.0; p < P; p++)
            norm += lossd[p];
        check_value("sswl_fwd loss sum", total, norm, sum_abs, dbl);
        total1 = run(&S, OP_SSWL_FWD, dbl, 1);
        checks++;
        if (memcmp(&total, &total1, sizeof(double)) != 0)
            fail("sswl_fwd loss sum, 4 threads vs 1", -1, total, total1);

        /* sswl_fwd_bwd: the gradient, prob in out2 */
        S.out2 = out2;
        total1 = run(&S, OP_SSWL_FWD_BWD, dbl, 4);
        check_array("sswl_fwd_bwd dlogits", out, dbl, want2, E, gscale);
        check_array("sswl_fwd_bwd prob", out2, dbl, want, E, 1e-6);
        checks++;
        if (memcmp(&total, &total1, sizeof(double)) != 0)
            fail("sswl_fwd_bwd loss sum vs sswl_fwd's", -1, total1, total);

        /* ... and the gradient without prob (the one-loop path of two classes takes it) */
        S.out2 = NULL;
        total1 = run(&S, OP_SSWL_FWD_BWD, dbl, 4);
        check_array("sswl_fwd_bwd dlogits, no prob", out, dbl, want2, E, gscale);
        checks++;
        if (memcmp(&total, &total1, sizeof(double)) != 0)
            fail("sswl_fwd_bwd loss sum (no prob) vs sswl_fwd's", -1, total1, total);
        S.loss_map = NULL;

        /* sswl_bwd: the gradient from the (stored) reference probabilities */
        S.x = prob;
        gscale = ref_sswl(&R, pd, lossd, want2, NULL);
        run(&S, OP_SSWL_BWD, dbl, 4);
        check_array("sswl_bwd dlogits", out, dbl, want2, E, gscale);
        S.x = x;

        /* sswl_stats: the "mean" normaliser, and the lowest bad label */
        for (p = 0; p < P; p++) {
            double a = T->kind == SSM_SOFT ? 1.0 : y[p] == ignore ? 0.0 : 1.0;
            if (T->kind != SSM_SOFT && a != 0.0 && cw)
                a *= cw[y[p]];
            want_norm += a * (w ? w[p] : 1.0);
        }
        norm = run_stats(&S, dbl, 4, &bad);
        check_value("sswl_stats norm", norm, want_norm, 0.0, 1);
        checks++;
        if (bad != -1)
            fail("sswl_stats first bad label (none)", -1, (double)bad, -1.0);
        if (labels && P > 2) { /* two bad labels (C, then C + 1 or -2): the first is found */
            y[P / 2] = C;
            y[P - 1] = T->kind == SSM_U8 ? C + 1 : -2;
            free(labels);
            S.target = labels = label_array(T->kind, y, P);
            run_stats(&S, dbl, 4, &bad);
            checks++;
            if (bad != P / 2)
                fail("sswl_stats first bad label", -1, (double)bad, (double)(P / 2));
        }
        free(y), free(labels), free(soft), free(wv), free(cwv), free(lensv), free(gv);
        free(w), free(cw), free(lens), free(gmap), free(t);
    }
    if (verbose)
        printf("ok %s (%td, %td, %td) tile %td %s%s\n", shape, outer, C, inner, tile,
               dbl ? "double" : "float", stream ? " streamed" : "");
    free(gen), free(xd), free(pd), free(dpd), free(want), free(want2), free(lossd);
    free(x), free(prob), free(dprob), free(out), free(out2), free(lmap);
}

int main(int argc, char **argv)
{
    /* (N, C, H*W): viewed as (N, C, H*W) (NCHW) and as (N*H*W, C, 1) (NHWC) */
    static const ptrdiff_t shapes[][3] = {{3, 1, 299}, {3, 2, 299}, {2, 5, 257}, {2, 21, 299},
                                          {1, 150, 97}, {1100, 5, 1}, {2, 33, 45},
                                          {1, 256, 19}, {1, 300, 37}};
    int s, dbl, rows, tiles, stream;
    verbose = argc > 1 && strcmp(argv[1], "-v") == 0;
    printf("ssm kernel harness: %s; %s; %d OpenMP threads available\n", ssm_compiler(),
           ssm_simd_path(), omp_get_max_threads());
    for (s = 0; s < (int)(sizeof(shapes) / sizeof(shapes[0])); s++)
        for (dbl = 0; dbl < 2; dbl++)
            for (rows = 0; rows < 2; rows++)
                for (tiles = 0; tiles < 2; tiles++)
                    for (stream = 0; stream < 2; stream++) {
                        ptrdiff_t N = shapes[s][0], C = shapes[s][1], HW = shapes[s][2];
                        ptrdiff_t outer = rows ? N * HW : N, inner = rows ? 1 : HW;
                        ptrdiff_t tile = tiles ? 16 : library_tile(C, inner, dbl);
                        if (inner == 1 && rows == 0)
                            continue; /* the same problem again */
                        if (tiles && inner > 1 && inner < 16)
                            tile = inner;
                        run_problem(outer, C, inner, tile, dbl, stream);
                    }
    printf("%d checks, %d failed\n", checks, failures);
    return failures != 0;
}
