/* The microbenchmark behind ssm/_expf_avx2.h (session 15): float sum-of-exp sweeps over L1-resident rows, gcc's loop against hand-interleaved ones.
   gcc -O3 -fopenmp-simd -mavx2 -mfma exp_sweep_microbench.c -o mb && ./mb [C n reps]   (cycles assume 3.2 GHz) */
#include <stdio.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <immintrin.h>
#define INL static inline __attribute__((always_inline))
#define K64 5.42101086242752217e-20f
__attribute__((weak)) float g_floor = -104.0f;
INL float exp_h(float x){
    const float shifter = 12582912.0f; union { float f; uint32_t u; } tb, s; float t,kf,r,p;
    x = x < g_floor ? g_floor : x;
    t = x * 1.44269504088896341f + shifter; kf = t - shifter;
    r = x - kf * 0.693359375f; r = r - kf * -2.12194440e-4f;
    p = 0.0013843653723597527f * K64;
    p = p * r + 0.00837415549904108f * K64; p = p * r + 0.04166800156235695f * K64;
    p = p * r + 0.16666431725025177f * K64; p = p * r + 0.4999999403953552f * K64;
    p = p * r + 1.0f * K64; p = p * r + 1.0f * K64;
    tb.f = t; s.u = (tb.u + 191u) << 23; return p * s.f; }
__attribute__((noinline,target("avx2,fma"))) void sw_ref(const float *restrict x, long sx, long C, long n, const float *restrict m, float *restrict s){
  long c,j; for (c=0;c+1<C;c+=2){ const float *restrict x0=x+c*sx, *restrict x1=x0+sx;
  _Pragma("omp simd") for(j=0;j<n;j++) s[j]=s[j]+exp_h(x0[j]-m[j])+exp_h(x1[j]-m[j]); }
  if(c<C){ const float *restrict xc=x+c*sx; _Pragma("omp simd") for(j=0;j<n;j++) s[j]+=exp_h(xc[j]-m[j]);} }
#define B(v) _mm256_set1_ps(v)
/* K interleaved exps of v[k] (already x - m), results added into acc */
#define EXPK(KK, v, out) do { \
  __m256 fl = _mm256_broadcast_ss(&g_floor); __m256 t[KK], kf[KK], r[KK], p[KK]; __m256i e[KK]; \
  for (int q=0;q<KK;q++) v[q] = _mm256_max_ps(v[q], fl); \
  for (int q=0;q<KK;q++) t[q] = _mm256_fmadd_ps(v[q], B(1.44269504088896341f), B(12582912.0f)); \
  for (int q=0;q<KK;q++) kf[q] = _mm256_sub_ps(t[q], B(12582912.0f)); \
  for (int q=0;q<KK;q++) e[q] = _mm256_slli_epi32(_mm256_add_epi32(_mm256_castps_si256(t[q]), _mm256_set1_epi32(191)), 23); \
  for (int q=0;q<KK;q++) r[q] = _mm256_fnmadd_ps(kf[q], B(0.693359375f), v[q]); \
  for (int q=0;q<KK;q++) r[q] = _mm256_fnmadd_ps(kf[q], B(-2.12194440e-4f), r[q]); \
  for (int q=0;q<KK;q++) p[q] = _mm256_fmadd_ps(B(0.0013843653723597527f * K64), r[q], B(0.00837415549904108f * K64)); \
  for (int q=0;q<KK;q++) p[q] = _mm256_fmadd_ps(p[q], r[q], B(0.04166800156235695f * K64)); \
  for (int q=0;q<KK;q++) p[q] = _mm256_fmadd_ps(p[q], r[q], B(0.16666431725025177f * K64)); \
  for (int q=0;q<KK;q++) p[q] = _mm256_fmadd_ps(p[q], r[q], B(0.4999999403953552f * K64)); \
  for (int q=0;q<KK;q++) p[q] = _mm256_fmadd_ps(p[q], r[q], B(1.0f * K64)); \
  for (int q=0;q<KK;q++) p[q] = _mm256_fmadd_ps(p[q], r[q], B(1.0f * K64)); \
  for (int q=0;q<KK;q++) out[q] = _mm256_mul_ps(p[q], _mm256_castsi256_ps(e[q])); \
} while (0)
/* 2 rows, 1 vector of pixels: 2 interleaved exps */
__attribute__((noinline,target("avx2,fma"))) void sw_i2(const float *restrict x, long sx, long C, long n, const float *restrict m, float *restrict s){
  long c,j; for (c=0;c+1<C;c+=2){ const float *restrict x0=x+c*sx, *restrict x1=x0+sx;
    for(j=0;j<n;j+=8){ __m256 mm=_mm256_load_ps(m+j); __m256 v[2]={_mm256_sub_ps(_mm256_load_ps(x0+j),mm),_mm256_sub_ps(_mm256_load_ps(x1+j),mm)}, o[2];
      EXPK(2, v, o); _mm256_store_ps(s+j, _mm256_add_ps(_mm256_add_ps(_mm256_load_ps(s+j), o[0]), o[1])); } }
  if(c<C){ const float *restrict xc=x+c*sx; for(j=0;j<n;j+=8){ __m256 v[1]={_mm256_sub_ps(_mm256_load_ps(xc+j),_mm256_load_ps(m+j))}, o[1]; EXPK(1,v,o); _mm256_store_ps(s+j,_mm256_add_ps(_mm256_load_ps(s+j),o[0])); } } }
/* 2 rows, 2 vectors of pixels: 4 interleaved */
__attribute__((noinline,target("avx2,fma"))) void sw_i4(const float *restrict x, long sx, long C, long n, const float *restrict m, float *restrict s){
  long c,j; for (c=0;c+1<C;c+=2){ const float *restrict x0=x+c*sx, *restrict x1=x0+sx;
    for(j=0;j<n;j+=16){ __m256 m0=_mm256_load_ps(m+j), m1=_mm256_load_ps(m+j+8);
      __m256 v[4]={_mm256_sub_ps(_mm256_load_ps(x0+j),m0),_mm256_sub_ps(_mm256_load_ps(x1+j),m0),_mm256_sub_ps(_mm256_load_ps(x0+j+8),m1),_mm256_sub_ps(_mm256_load_ps(x1+j+8),m1)}, o[4];
      EXPK(4, v, o); _mm256_store_ps(s+j, _mm256_add_ps(_mm256_add_ps(_mm256_load_ps(s+j), o[0]), o[1]));
      _mm256_store_ps(s+j+8, _mm256_add_ps(_mm256_add_ps(_mm256_load_ps(s+j+8), o[2]), o[3])); } }
  if(c<C){ const float *restrict xc=x+c*sx; for(j=0;j<n;j+=8){ __m256 v[1]={_mm256_sub_ps(_mm256_load_ps(xc+j),_mm256_load_ps(m+j))}, o[1]; EXPK(1,v,o); _mm256_store_ps(s+j,_mm256_add_ps(_mm256_load_ps(s+j),o[0])); } } }
/* 1 row, 3 vectors of pixels */
__attribute__((noinline,target("avx2,fma"))) void sw_i3(const float *restrict x, long sx, long C, long n, const float *restrict m, float *restrict s){
  long c,j; for (c=0;c<C;c++){ const float *restrict x0=x+c*sx;
    for(j=0;j+24<=n;j+=24){ __m256 v[3]={_mm256_sub_ps(_mm256_load_ps(x0+j),_mm256_load_ps(m+j)),_mm256_sub_ps(_mm256_load_ps(x0+j+8),_mm256_load_ps(m+j+8)),_mm256_sub_ps(_mm256_load_ps(x0+j+16),_mm256_load_ps(m+j+16))}, o[3];
      EXPK(3, v, o); for(int q=0;q<3;q++) _mm256_store_ps(s+j+8*q, _mm256_add_ps(_mm256_load_ps(s+j+8*q), o[q])); }
    for(;j<n;j+=8){ __m256 v[1]={_mm256_sub_ps(_mm256_load_ps(x0+j),_mm256_load_ps(m+j))}, o[1]; EXPK(1,v,o); _mm256_store_ps(s+j,_mm256_add_ps(_mm256_load_ps(s+j),o[0])); } } }

#define SH2 (12582912.0f + 191.0f)
#define EXPKA(KK, v, acc) do { \
  __m256 fl = _mm256_broadcast_ss(&g_floor); __m256 t[KK], kf[KK], r[KK], p[KK]; __m256i e[KK]; \
  for (int q=0;q<KK;q++) v[q] = _mm256_max_ps(v[q], fl); \
  for (int q=0;q<KK;q++) t[q] = _mm256_fmadd_ps(v[q], B(1.44269504088896341f), B(SH2)); \
  for (int q=0;q<KK;q++) kf[q] = _mm256_sub_ps(t[q], B(SH2)); \
  for (int q=0;q<KK;q++) e[q] = _mm256_slli_epi32(_mm256_castps_si256(t[q]), 23); \
  for (int q=0;q<KK;q++) r[q] = _mm256_fnmadd_ps(kf[q], B(0.693359375f), v[q]); \
  for (int q=0;q<KK;q++) r[q] = _mm256_fnmadd_ps(kf[q], B(-2.12194440e-4f), r[q]); \
  for (int q=0;q<KK;q++) p[q] = _mm256_fmadd_ps(B(0.0013843653723597527f * K64), r[q], B(0.00837415549904108f * K64)); \
  for (int q=0;q<KK;q++) p[q] = _mm256_fmadd_ps(p[q], r[q], B(0.04166800156235695f * K64)); \
  for (int q=0;q<KK;q++) p[q] = _mm256_fmadd_ps(p[q], r[q], B(0.16666431725025177f * K64)); \
  for (int q=0;q<KK;q++) p[q] = _mm256_fmadd_ps(p[q], r[q], B(0.4999999403953552f * K64)); \
  for (int q=0;q<KK;q++) p[q] = _mm256_fmadd_ps(p[q], r[q], B(1.0f * K64)); \
  for (int q=0;q<KK;q++) p[q] = _mm256_fmadd_ps(p[q], r[q], B(1.0f * K64)); \
  for (int q=0;q<KK;q++) acc[q] = _mm256_fmadd_ps(p[q], _mm256_castsi256_ps(e[q]), acc[q]); \
} while (0)
/* column sweep: KK pixel vectors, all rows, acc in registers */
#define COLS(NAME, KK) __attribute__((noinline,target("avx2,fma"))) void NAME(const float *restrict x, long sx, long C, long n, const float *restrict m, float *restrict s){ \
  long c,j; for(j=0;j+8*KK<=n;j+=8*KK){ __m256 mm[KK], acc[KK]; for(int q=0;q<KK;q++){ mm[q]=_mm256_load_ps(m+j+8*q); acc[q]=_mm256_setzero_ps(); } \
    for(c=0;c<C;c++){ const float *xc=x+c*sx+j; __m256 v[KK]; for(int q=0;q<KK;q++) v[q]=_mm256_sub_ps(_mm256_load_ps(xc+8*q), mm[q]); EXPKA(KK, v, acc); } \
    for(int q=0;q<KK;q++) _mm256_store_ps(s+j+8*q, acc[q]); } \
  for(;j<n;j+=8){ __m256 mm[1]={_mm256_load_ps(m+j)}, acc[1]={_mm256_setzero_ps()}; for(c=0;c<C;c++){ __m256 v[1]={_mm256_sub_ps(_mm256_load_ps(x+c*sx+j), mm[0])}; EXPKA(1,v,acc);} _mm256_store_ps(s+j,acc[0]); } }
COLS(col2, 2)
COLS(col3, 3)
COLS(col4, 4)
/* row sweep, 1 row, 3 vectors, new exp */
__attribute__((noinline,target("avx2,fma"))) void sw_a3(const float *restrict x, long sx, long C, long n, const float *restrict m, float *restrict s){
  long c,j; for (c=0;c<C;c++){ const float *restrict x0=x+c*sx;
    for(j=0;j+24<=n;j+=24){ __m256 v[3], acc[3]; for(int q=0;q<3;q++){ v[q]=_mm256_sub_ps(_mm256_load_ps(x0+j+8*q),_mm256_load_ps(m+j+8*q)); acc[q]=_mm256_load_ps(s+j+8*q);} 
      EXPKA(3, v, acc); for(int q=0;q<3;q++) _mm256_store_ps(s+j+8*q, acc[q]); }
    for(;j<n;j+=8){ __m256 v[1]={_mm256_sub_ps(_mm256_load_ps(x0+j),_mm256_load_ps(m+j))}, acc[1]={_mm256_load_ps(s+j)}; EXPKA(1,v,acc); _mm256_store_ps(s+j,acc[0]); } } }
#define EXPKB(KK, v, acc) do { \
  __m256 fl = _mm256_broadcast_ss(&g_floor); __m256 t[KK], kf[KK], r[KK], p[KK]; __m256i e[KK]; \
  for (int q=0;q<KK;q++) v[q] = _mm256_max_ps(v[q], fl); \
  for (int q=0;q<KK;q++) t[q] = _mm256_fmadd_ps(v[q], B(1.44269504088896341f), B(12582912.0f)); \
  for (int q=0;q<KK;q++) kf[q] = _mm256_sub_ps(t[q], B(12582912.0f)); \
  for (int q=0;q<KK;q++) e[q] = _mm256_slli_epi32(_mm256_add_epi32(_mm256_castps_si256(t[q]), _mm256_set1_epi32(191)), 23); \
  for (int q=0;q<KK;q++) r[q] = _mm256_fnmadd_ps(kf[q], B(0.693359375f), v[q]); \
  for (int q=0;q<KK;q++) r[q] = _mm256_fnmadd_ps(kf[q], B(-2.12194440e-4f), r[q]); \
  for (int q=0;q<KK;q++) p[q] = _mm256_fmadd_ps(B(0.0013843653723597527f * K64), r[q], B(0.00837415549904108f * K64)); \
  for (int q=0;q<KK;q++) p[q] = _mm256_fmadd_ps(p[q], r[q], B(0.04166800156235695f * K64)); \
  for (int q=0;q<KK;q++) p[q] = _mm256_fmadd_ps(p[q], r[q], B(0.16666431725025177f * K64)); \
  for (int q=0;q<KK;q++) p[q] = _mm256_fmadd_ps(p[q], r[q], B(0.4999999403953552f * K64)); \
  for (int q=0;q<KK;q++) p[q] = _mm256_fmadd_ps(p[q], r[q], B(1.0f * K64)); \
  for (int q=0;q<KK;q++) p[q] = _mm256_fmadd_ps(p[q], r[q], B(1.0f * K64)); \
  for (int q=0;q<KK;q++) acc[q] = _mm256_fmadd_ps(p[q], _mm256_castsi256_ps(e[q]), acc[q]); \
} while (0)
/* row sweep, 1 row, 3 vectors, new exp */
__attribute__((noinline,target("avx2,fma"))) void sw_b3(const float *restrict x, long sx, long C, long n, const float *restrict m, float *restrict s){
  long c,j; for (c=0;c<C;c++){ const float *restrict x0=x+c*sx;
    for(j=0;j+24<=n;j+=24){ __m256 v[3], acc[3]; for(int q=0;q<3;q++){ v[q]=_mm256_sub_ps(_mm256_load_ps(x0+j+8*q),_mm256_load_ps(m+j+8*q)); acc[q]=_mm256_load_ps(s+j+8*q);} 
      EXPKB(3, v, acc); for(int q=0;q<3;q++) _mm256_store_ps(s+j+8*q, acc[q]); }
    for(;j<n;j+=8){ __m256 v[1]={_mm256_sub_ps(_mm256_load_ps(x0+j),_mm256_load_ps(m+j))}, acc[1]={_mm256_load_ps(s+j)}; EXPKB(1,v,acc); _mm256_store_ps(s+j,acc[0]); } } }

__attribute__((noinline,target("avx2,fma"))) void sw_p2(const float *restrict x, long sx, long C, long n, const float *restrict m, float *restrict s){
  long c,j; for (c=0;c+1<C;c+=2){ const float *restrict x0=x+c*sx, *restrict x1=x0+sx;
    for(j=0;j+16<=n;j+=16){ __m256 m0=_mm256_load_ps(m+j), m1=_mm256_load_ps(m+j+8);
      __m256 v[2]={_mm256_sub_ps(_mm256_load_ps(x0+j),m0),_mm256_sub_ps(_mm256_load_ps(x0+j+8),m1)}, acc[2]={_mm256_load_ps(s+j),_mm256_load_ps(s+j+8)};
      EXPKA(2, v, acc);
      __m256 w[2]={_mm256_sub_ps(_mm256_load_ps(x1+j),m0),_mm256_sub_ps(_mm256_load_ps(x1+j+8),m1)};
      EXPKA(2, w, acc); _mm256_store_ps(s+j, acc[0]); _mm256_store_ps(s+j+8, acc[1]); }
    for(;j<n;j+=8){ __m256 mm=_mm256_load_ps(m+j); __m256 v[1]={_mm256_sub_ps(_mm256_load_ps(x0+j),mm)}, acc[1]={_mm256_load_ps(s+j)}; EXPKA(1,v,acc); __m256 w[1]={_mm256_sub_ps(_mm256_load_ps(x1+j),mm)}; EXPKA(1,w,acc); _mm256_store_ps(s+j,acc[0]); } }
  if(c<C){ const float *restrict xc=x+c*sx; for(j=0;j<n;j+=8){ __m256 v[1]={_mm256_sub_ps(_mm256_load_ps(xc+j),_mm256_load_ps(m+j))}, acc[1]={_mm256_load_ps(s+j)}; EXPKA(1,v,acc); _mm256_store_ps(s+j,acc[0]); } } }
static double now(){struct timespec t; clock_gettime(CLOCK_MONOTONIC,&t); return t.tv_sec+1e-9*t.tv_nsec;}

__attribute__((noinline,target("avx2,fma"))) void swe_ref(const float *restrict x, long sx, long C, long n, const float *restrict m, float *restrict s, float *restrict e){
  long c,j; for (c=0;c+1<C;c+=2){ const float *restrict x0=x+c*sx, *restrict x1=x0+sx; float *restrict e0=e+c*n, *restrict e1=e0+n;
  _Pragma("omp simd") for(j=0;j<n;j++){ float v0=exp_h(x0[j]-m[j]), v1=exp_h(x1[j]-m[j]); e0[j]=v0; e1[j]=v1; s[j]=s[j]+v0+v1; } }
  if(c<C){ const float *restrict xc=x+c*sx; float *restrict ec=e+c*n; _Pragma("omp simd") for(j=0;j<n;j++){ float v=exp_h(xc[j]-m[j]); ec[j]=v; s[j]+=v;} } }
#define EXPKE(KK, v, out) do { \
  __m256 fl = _mm256_broadcast_ss(&g_floor); __m256 t[KK], kf[KK], r[KK], p[KK]; __m256i e[KK]; \
  for (int q=0;q<KK;q++) v[q] = _mm256_max_ps(fl, v[q]); \
  for (int q=0;q<KK;q++) t[q] = _mm256_fmadd_ps(v[q], B(1.44269504088896341f), B(SH2)); \
  for (int q=0;q<KK;q++) kf[q] = _mm256_sub_ps(t[q], B(SH2)); \
  for (int q=0;q<KK;q++) e[q] = _mm256_slli_epi32(_mm256_castps_si256(t[q]), 23); \
  for (int q=0;q<KK;q++) r[q] = _mm256_fnmadd_ps(kf[q], B(0.693359375f), v[q]); \
  for (int q=0;q<KK;q++) r[q] = _mm256_fnmadd_ps(kf[q], B(-2.12194440e-4f), r[q]); \
  for (int q=0;q<KK;q++) p[q] = _mm256_fmadd_ps(B(0.0013843653723597527f * K64), r[q], B(0.00837415549904108f * K64)); \
  for (int q=0;q<KK;q++) p[q] = _mm256_fmadd_ps(p[q], r[q], B(0.04166800156235695f * K64)); \
  for (int q=0;q<KK;q++) p[q] = _mm256_fmadd_ps(p[q], r[q], B(0.16666431725025177f * K64)); \
  for (int q=0;q<KK;q++) p[q] = _mm256_fmadd_ps(p[q], r[q], B(0.4999999403953552f * K64)); \
  for (int q=0;q<KK;q++) p[q] = _mm256_fmadd_ps(p[q], r[q], B(1.0f * K64)); \
  for (int q=0;q<KK;q++) p[q] = _mm256_fmadd_ps(p[q], r[q], B(1.0f * K64)); \
  for (int q=0;q<KK;q++) out[q] = _mm256_mul_ps(p[q], _mm256_castsi256_ps(e[q])); \
} while (0)
__attribute__((noinline,target("avx2,fma"))) void swe_p2(const float *restrict x, long sx, long C, long n, const float *restrict m, float *restrict s, float *restrict e){
  long c,j; for (c=0;c+1<C;c+=2){ const float *restrict x0=x+c*sx, *restrict x1=x0+sx; float *restrict e0=e+c*n, *restrict e1=e0+n;
    for(j=0;j+16<=n;j+=16){ __m256 m0=_mm256_load_ps(m+j), m1=_mm256_load_ps(m+j+8), o[2];
      __m256 v[2]={_mm256_sub_ps(_mm256_load_ps(x0+j),m0),_mm256_sub_ps(_mm256_load_ps(x0+j+8),m1)};
      EXPKE(2, v, o); _mm256_store_ps(e0+j,o[0]); _mm256_store_ps(e0+j+8,o[1]);
      __m256 a0=_mm256_add_ps(_mm256_load_ps(s+j),o[0]), a1=_mm256_add_ps(_mm256_load_ps(s+j+8),o[1]);
      __m256 w[2]={_mm256_sub_ps(_mm256_load_ps(x1+j),m0),_mm256_sub_ps(_mm256_load_ps(x1+j+8),m1)};
      EXPKE(2, w, o); _mm256_store_ps(e1+j,o[0]); _mm256_store_ps(e1+j+8,o[1]);
      _mm256_store_ps(s+j, _mm256_add_ps(a0,o[0])); _mm256_store_ps(s+j+8, _mm256_add_ps(a1,o[1])); }
    for(;j<n;j++){ float v0=exp_h(x0[j]-m[j]), v1=exp_h(x1[j]-m[j]); e0[j]=v0; e1[j]=v1; s[j]=s[j]+v0+v1; } }
  if(c<C){ const float *restrict xc=x+c*sx; float *restrict ec=e+c*n; for(j=0;j<n;j++){ float v=exp_h(xc[j]-m[j]); ec[j]=v; s[j]+=v;} } }
typedef void (*fne)(const float*,long,long,long,const float*,float*,float*);
void run_e(const float *x, long C, long n, long reps, const float *m, float *s){
  float *e=aligned_alloc(64,4*C*n), *e0=aligned_alloc(64,4*C*n), *s0=malloc(4*n); fne f[]={swe_ref,swe_p2}; const char*nm[]={"e ref","e pairs2vec"}; double best[2]={1e9,1e9};
  for(int round=0;round<7;round++) for(int k=0;k<2;k++){ memset(s,0,4*n); f[k](x,n,C,n,m,s,e); if(round==0){ if(k==0){memcpy(s0,s,4*n);memcpy(e0,e,4*C*n);} else printf("same: %d %d\n", !memcmp(s0,s,4*n), !memcmp(e0,e,4*C*n)); }
    double t0=now(); for(long r=0;r<reps;r++) f[k](x,n,C,n,m,s,e); double t=now()-t0; if(t<best[k]) best[k]=t; }
  for(int k=0;k<2;k++) printf("%-22s %.3f cycles/8 elem\n",nm[k],3.2e9*8*best[k]/(reps*C*n)); }
typedef void (*fn)(const float*,long,long,long,const float*,float*);
int main(int argc,char**argv){
  long C=argc>1?atol(argv[1]):21, n=argc>2?atol(argv[2]):192, reps=argc>3?atol(argv[3]):20000;
  float *x=aligned_alloc(64,sizeof(float)*C*n), *m=aligned_alloc(64,4*n), *s=aligned_alloc(64,4*n);
  srand(1); for(long i=0;i<C*n;i++) x[i]=4.0f*((float)rand()/RAND_MAX-0.5f);
  for(long j=0;j<n;j++){ m[j]=x[j]; for(long c=1;c<C;c++) if(x[c*n+j]>m[j]) m[j]=x[c*n+j]; }
  fn f[]={sw_ref,sw_a3,sw_b3,sw_p2,col2}; const char*nm[]={"ref (gcc)","rows a3","rows b3 (paddd)","pairs 2vec","col2"};
  int NF=5; double best[8]; for(int k=0;k<NF;k++) best[k]=1e9; float *s0=malloc(4*n);
  for(int round=0;round<7;round++) for(int k=0;k<NF;k++){
    memset(s,0,4*n); f[k](x,n,C,n,m,s); if(round==0){ if(k==0) memcpy(s0,s,4*n); else printf("%s same bits: %d\n", nm[k], !memcmp(s0,s,4*n)); }
    double t0=now(); for(long r=0;r<reps;r++){ f[k](x,n,C,n,m,s);} double t=now()-t0; if(t<best[k]) best[k]=t; }
  for(int k=0;k<NF;k++) printf("%-22s %.3f cycles/8 elem\n",nm[k],3.2e9*8*best[k]/(reps*C*n));
  run_e(x,C,n,reps,m,s);
}
