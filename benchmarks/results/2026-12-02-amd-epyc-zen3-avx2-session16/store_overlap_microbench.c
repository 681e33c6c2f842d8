/* Session 16's model of the fused pass's memory phases (not the kernel): 8 images of 21
   rows of 65536 floats in tiles of 768 pixels; per tile an optional read of the logits
   ("max sweep", argv[3] given), a compute phase (argv[2] dependent FMAs a vector, "exp
   sweep") and the gradient rows streamed out. argv[1], the store mode: 0 rows after the
   compute (as ssm), 1 plain stores, 2 CLZERO then plain stores, 3 no stores, 5 each
   vector's store inside the compute loop, 6 a row's compute then its stores, 7 the same
   in 64-pixel pieces. argv[4], argv[5]: software prefetch of the next tile's logits in
   the compute loop (1 T0, 2 T1, 3 T2, 4 NTA; distance in tiles).
       gcc -O2 -fopenmp store_overlap_microbench.c -o st && OMP_NUM_THREADS=2 ./st 5 6 r
   Figures in README.md. */
#include <immintrin.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>
#define C 21
#define HW 65536
#define NB 8
#define T 768
static int pfk = 0, pfd = 1;
/* simulate: per tile, a compute phase (FMA chains over e scratch), then write C rows of T
   floats of the gradient to out (row stride HW) by mode: 0 NT, 1 plain, 2 clzero+plain */
__attribute__((target("avx2,fma,clzero"))) static void tile(float *out, float *e, int mode, int work, const float *src)
{
    if (src) {  /* the max sweep: C rows of T from memory into e (so the compute reads them) */
        for (int c = 0; c < C; c++) {
            const float *r = src + (size_t)c * HW;
            for (int j = 0; j < T; j += 8)
                _mm256_store_ps(e + c * T + j, _mm256_max_ps(_mm256_load_ps(r + j), _mm256_load_ps(e + c * T + j)));
        }
    }
    const __m256 a = _mm256_set1_ps(0.999f), b = _mm256_set1_ps(0.001f);
    if (mode == 6 || mode == 7) {  /* row bursts: compute row c, then stream row c (6), or 64-px bursts (7) */
        int burst = mode == 6 ? T : 64;
        for (int c = 0; c < C; c++) {
            float *dst = out + (size_t)c * HW;
            for (int j0 = 0; j0 < T; j0 += burst) {
                for (int j = j0; j < j0 + burst; j += 8) {
                    __m256 v = _mm256_load_ps(e + c * T + j);
                    for (int w = 0; w < work; w++) v = _mm256_fmadd_ps(v, a, b);
                    _mm256_store_ps(e + c * T + j, v);
                }
                for (int j = j0; j < j0 + burst; j += 8)
                    _mm256_stream_ps(dst + j, _mm256_mul_ps(_mm256_load_ps(e + c * T + j), a));
            }
        }
        _mm_sfence();
        return;
    }
    if (mode == 5) {  /* per 8 elements: compute one vector of row c, stream one of row c (prev values) */
        for (int c = 0; c < C; c++) {
            float *dst = out + (size_t)c * HW;
            for (int j = 0; j < T; j += 8) {
                __m256 v = _mm256_load_ps(e + c * T + j);
                _mm256_stream_ps(dst + j, _mm256_mul_ps(v, a));
                for (int w = 0; w < work; w++)
                    v = _mm256_fmadd_ps(v, a, b);
                _mm256_store_ps(e + c * T + j, v);
            }
        }
        _mm_sfence();
        return;
    }
    for (int c = 0; c < C; c++) {
        for (int j = 0; j < T; j += 8) {
            __m256 v = _mm256_load_ps(e + c * T + j);
            if (pfk && src && (j & 15) == 0) {
                const char *q = (const char *)(src + (size_t)c * HW + (size_t)pfd * T + j);
                if (pfk == 1) _mm_prefetch(q, _MM_HINT_T0);
                else if (pfk == 2) _mm_prefetch(q, _MM_HINT_T1);
                else if (pfk == 3) _mm_prefetch(q, _MM_HINT_T2);
                else _mm_prefetch(q, _MM_HINT_NTA);
            }
            for (int w = 0; w < work; w++)
                v = _mm256_fmadd_ps(v, a, b);
            _mm256_store_ps(e + c * T + j, v);
        }
    }
    if (mode == 3) return;
    if (mode == 4) {  /* rows interleaved: compute row c (again), store row c - 1 */
        for (int c = 0; c < C; c++) {
            for (int j = 0; j < T; j += 8) {
                __m256 v = _mm256_load_ps(e + c * T + j);
                for (int w = 0; w < work; w++) v = _mm256_fmadd_ps(v, a, b);
                _mm256_store_ps(e + c * T + j, v);
            }
        }
    }
    for (int c = 0; c < C; c++) {
        float *dst = out + (size_t)c * HW;
        if (mode == 2)
            for (int j = 0; j < T; j += 16) _mm_clzero(dst + j);
        for (int j = 0; j < T; j += 8) {
            __m256 v = _mm256_mul_ps(_mm256_load_ps(e + c * T + j), a);
            if (mode == 0) _mm256_stream_ps(dst + j, v);
            else _mm256_store_ps(dst + j, v);
        }
    }
    _mm_sfence();
}
int main(int argc, char **argv)
{
    int mode = atoi(argv[1]), work = atoi(argv[2]), reps = 15, rd = argc > 3;
    if (argc > 4) pfk = atoi(argv[4]);
    if (argc > 5) pfd = atoi(argv[5]);
    size_t total = (size_t)NB * C * HW;
    float *out[2], *in[2];
    for (int i = 0; i < 2; i++) { out[i] = aligned_alloc(64, total * 4); memset(out[i], 0, total * 4); in[i] = aligned_alloc(64, total * 4); memset(in[i], 0, total * 4); }
    double ts[64];
    for (int r = 0; r < reps; r++) {
        float *o = out[r & 1]; const float *x = rd ? in[r & 1] : NULL;
        double t0 = omp_get_wtime();
        #pragma omp parallel
        {
            float *e = aligned_alloc(64, C * T * 4);
            for (int k = 0; k < C * T; k++) e[k] = 0.5f;
            #pragma omp for schedule(dynamic, 4)
            for (int t = 0; t < NB * (HW / T + 1); t++) {
                int n = t / (HW / T + 1), p = (t % (HW / T + 1)) * T;
                if (p + T > HW) continue;
                tile(o + (size_t)n * C * HW + p, e, mode, work, x ? x + (size_t)n * C * HW + p : NULL);
            }
            free(e);
        }
        ts[r] = omp_get_wtime() - t0;
    }
    /* median */
    for (int i = 0; i < reps; i++) for (int j = i + 1; j < reps; j++) if (ts[j] < ts[i]) { double x = ts[i]; ts[i] = ts[j]; ts[j] = x; }
    printf("pf %d/%d mode %d work %d threads %d: %.3f ms\n", pfk, pfd, mode, work, omp_get_max_threads(), ts[reps / 2] * 1e3);
    return 0;
}
