/*
 * ssm/_positions.h -- the CPU kernels of softmax over positions (spatial softmax,
 * soft-argmax), in C. Shares the conventions and macros of _kernels.h.
 *
 * Design
 * ------
 * a) Every layout is viewed as (outer, L, inner): L = the number of positions of a map
 *    (H*W...), and a row is one (n, c) map. NCHW -> (N*C, L, 1): rows are contiguous;
 *    channels-last (N, *spatial, C) -> (N, L, C): a row's positions are C apart. Row
 *    r = o * inner + i is map (n, c) = (r / C, r % C) in both, and its keypoints, variances
 *    and temperature gradient are at r in the (N, C, ...) outputs.
 * b) Tiles: contiguous rows are cut into runs of whole rows, computed in place;
 *    strided rows into blocks of `tile` channels of one image, gathered into per-thread
 *    scratch as contiguous rows (reads of whole channel runs), computed by the same row
 *    function and scattered back. The partition depends only on the shape and a row is
 *    never split, so every result is bit-identical for any thread count.
 * c) One row function (ssm_pos_row): the max, exp((x - m) / T) kept in scratch (exp once
 *    per element), then short sweeps over the row, which stays in L1/L2: the sum, one
 *    expectation per coordinate, the variance (centred, a second sweep), the output. The
 *    fused soft-argmax gradient reads x once and writes dx once.
 * d) Coordinates come as a (D, L) table in the storage type (built once in Python):
 *    normalised or pixel grids of any spatial rank, or the caller's own grid.
 * e) Precision: elementwise math in the storage type R; every sum over a row (sum of exp,
 *    expectations, variances, sum p*dp, the temperature gradient) in blocks of
 *    SSM_POS_BLOCK elements in R, the block sums added in double.
 * f) Threads live in the Cython caller (ssm/_cpu.pyx, `positions`): these functions are
 *    pure, nogil, allocation-free, and get per-thread scratch (ssm_pos_scratch_bytes).
 */
#ifndef SSM_POSITIONS_H
#define SSM_POSITIONS_H

#include "_kernels.h"

/* kernel passes: the values of ssm._codes.PosOp (tests/test_contract.py checks them) */
enum { SSM_POS_SOFTMAX = 0, SSM_POS_SOFTMAX_BWD = 1, SSM_POS_EXPECT = 2, SSM_POS_EXPECT_BWD = 3 };

/* Elements per partial sum in R before it is added in double (a multiple of 16). */
#define SSM_POS_BLOCK 256

typedef struct {
    ptrdiff_t outer, L, inner;  /* x as (outer, L, inner); row r = o * inner + i */
    ptrdiff_t C;                /* channels: row r has temperature temp[r % C] */
    ptrdiff_t D;                /* coordinates per position */
    ptrdiff_t tile;             /* rows per tile (inner == 1) or channels per tile */
    int from_prob;              /* EXPECT*: x holds probabilities (no max, no exp) */
    const void *x;              /* logits, or prob (SOFTMAX_BWD, from_prob) */
    const void *x2;             /* dprob (SOFTMAX_BWD), like x */
    const void *grid;           /* (D, L) coordinates, storage type */
    const double *temp;         /* (C,) temperatures */
    const void *dkp;            /* (rows, D) gradient of the keypoints (EXPECT_BWD) */
    void *out;                  /* prob (SOFTMAX, EXPECT) or dx (*_BWD), like x; or NULL */
    void *kp;                   /* (rows, D) expectations or NULL */
    void *var;                  /* (rows, D) variances or NULL */
    double *dtemp;              /* (rows,) gradient of the temperature, per row, or NULL */
    int stream;                 /* large contiguous outputs: non-temporal stores */
    int in_place;               /* contiguous rows not streamed: the passes that write
                                   `out` keep their row there instead of scratch (rows
                                   too large for the cache: no scratch row to fault in) */
    ptrdiff_t grid_w;           /* the grid is the built-in one of (H, W) maps: W, else 0 */
    int chunked;                /* strided rows: swept chunk by chunk (ssm_pos_tile_chunks),
                                   not gathered whole */
} ssm_pos_problem;

static inline ptrdiff_t ssm_pos_num_tiles(const ssm_pos_problem *P)
{
    if (P->outer == 0 || P->inner == 0 || P->L == 0)
        return 0;
    if (P->inner > 1)
        return P->outer * ((P->inner + P->tile - 1) / P->tile);
    return (P->outer + P->tile - 1) / P->tile;
}

/* Elements between the gathered rows of a strided tile: L rounded up to a whole number
   of 64-byte lines, plus one line, so that rows do not start at addresses a multiple
   of 4 KiB apart (the gather and scatter touch every row at once: with a power-of-two
   stride they all fall in one L1 set and evict each other). */
static inline ptrdiff_t ssm_pos_row_stride(ptrdiff_t L, size_t rsize)
{
    const ptrdiff_t line = 64 / (ptrdiff_t)rsize;
    return (L + line - 1) / line * line + line;
}

/* The line length by which the 2-D soft-argmax sums the built-in grid (W), else 0: by
   lines when they are long enough for the per-line sums to pay (measured: a loss at
   W = 64, 9% less time at W = 128) and short enough to be a block of the sums. */
static inline ptrdiff_t ssm_pos_lines(const ssm_pos_problem *P)
{
    return P->grid_w >= 128 && P->grid_w <= SSM_POS_BLOCK ? P->grid_w : 0;
}

/* The chunks of the 2-D soft-argmax's gradient sweep (and of its temperature gradient's
   sums): whole lines of W, or SSM_POS_BLOCK elements. */
static inline ptrdiff_t ssm_pos_grad2_chunk(ptrdiff_t W)
{
    return W ? W * (SSM_POS_BLOCK / W) : SSM_POS_BLOCK;
}

/* Positions per chunk of ssm_pos_tile_chunks' sweeps for pass `op` (`last`: its last
   sweep, else the max and the sums): 8192 / tile (about 32 KiB of floats a block), a
   whole number of the units its row function sums by there: SSM_POS_BLOCK (ssm_pos_row;
   ssm_pos_row2's sums of given probabilities), else ssm_pos_grad2_chunk (ssm_pos_row2's
   lines, and the chunks of its gradient's temperature sums); at most the map's length. */
static inline ptrdiff_t ssm_pos_chunk_len(const ssm_pos_problem *P, int op, int last)
{
    const int two = P->D == 2 && !P->var && (op == SSM_POS_EXPECT || op == SSM_POS_EXPECT_BWD);
    const ptrdiff_t g = two && (last || !P->from_prob) ? ssm_pos_grad2_chunk(ssm_pos_lines(P))
                                                       : SSM_POS_BLOCK;
    const ptrdiff_t want = 8192 / (P->tile > 1 ? P->tile : 1);
    const ptrdiff_t K = g * (want / g > 1 ? want / g : 1);
    return K < P->L ? K : P->L;  /* one chunk: the whole map, any length */
}

/* Running sums per row of ssm_pos_tile_chunks: the sum of the exps (or of p dp), D
   expectations, D variances, the temperature gradient. */
static inline ptrdiff_t ssm_pos_chunk_sums(const ssm_pos_problem *P)
{
    return 2 + 2 * P->D;
}

/* Per-thread scratch of ssm_pos_tile_chunks, in bytes (its carve must match), elements of
   `rsize` bytes: three blocks of tile chunks (x, dprob, out), two chunks (e, h), 2 + (D + 3)
   values per row, its running sums in double; each on a 64-byte boundary, plus 64 for
   aligning the start. */
static inline size_t ssm_pos_chunks_scratch_bytes(const ssm_pos_problem *P, int op,
                                                  size_t rsize)
{
    const size_t K0 = (size_t)ssm_pos_chunk_len(P, op, 0);
    const size_t K1 = (size_t)ssm_pos_chunk_len(P, op, 1);
    const size_t T = (size_t)P->tile, K = K0 > K1 ? K0 : K1;
    const size_t D = (size_t)P->D;
    return 64 + 3 * ssm_round64(T * K * rsize) + 2 * ssm_round64(K * rsize)
         + 2 * ssm_round64(T * rsize) + ssm_round64(T * (D + 3) * rsize)
         + ssm_round64(T * (size_t)ssm_pos_chunk_sums(P) * sizeof(double));
}

/* Block transposes for ssm_pos_gather and ssm_pos_scatter (strided rows chunk by chunk):
   dst[c * ds + i] = src[i * ss + c] for an 8 x 8 block of floats or a 4 x 4 block of
   doubles, in vectors of 32 bytes (two of 16 in the baseline clone), three rounds of
   two-vector shuffles. Without GNU C vectors, element by element. */
#if defined(__GNUC__) || defined(__clang__)
#define SSM_POS_TRANSPOSE 1
typedef float ssm_v8f __attribute__((vector_size(32), aligned(4), may_alias));
typedef double ssm_v4d __attribute__((vector_size(32), aligned(8), may_alias));
#if defined(__clang__)
#define SSM_SHUF8(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#define SSM_SHUF4(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
typedef int ssm_v8i __attribute__((vector_size(32)));
typedef long long ssm_v4l __attribute__((vector_size(32)));
#define SSM_SHUF8(a, b, ...) __builtin_shuffle(a, b, (ssm_v8i){__VA_ARGS__})
#define SSM_SHUF4(a, b, ...) __builtin_shuffle(a, b, (ssm_v4l){__VA_ARGS__})
#endif

SSM_INLINE void ssm_pos_tr_f(const float *src, ptrdiff_t ss, float *dst, ptrdiff_t ds)
{
    ssm_v8f v[8], a[8], b[8];
    int i;
    for (i = 0; i < 8; i++)
        v[i] = *(const ssm_v8f *)(src + i * ss);
    for (i = 0; i < 8; i += 2) {  /* pairs of rows, interleaved within 16-byte lanes */
        a[i] = SSM_SHUF8(v[i], v[i + 1], 0, 8, 1, 9, 4, 12, 5, 13);
        a[i + 1] = SSM_SHUF8(v[i], v[i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
    }
    for (i = 0; i < 8; i += 4) {  /* then pairs of those, 8 bytes at a time */
        b[i] = SSM_SHUF8(a[i], a[i + 2], 0, 1, 8, 9, 4, 5, 12, 13);
        b[i + 1] = SSM_SHUF8(a[i], a[i + 2], 2, 3, 10, 11, 6, 7, 14, 15);
        b[i + 2] = SSM_SHUF8(a[i + 1], a[i + 3], 0, 1, 8, 9, 4, 5, 12, 13);
        b[i + 3] = SSM_SHUF8(a[i + 1], a[i + 3], 2, 3, 10, 11, 6, 7, 14, 15);
    }
    for (i = 0; i < 4; i++) {  /* then the 16-byte halves: b[i] holds c = i and i + 4 */
        *(ssm_v8f *)(dst + i * ds) = SSM_SHUF8(b[i], b[i + 4], 0, 1, 2, 3, 8, 9, 10, 11);
        *(ssm_v8f *)(dst + (i + 4) * ds) = SSM_SHUF8(b[i], b[i + 4], 4, 5, 6, 7, 12, 13, 14, 15);
    }
}

SSM_INLINE void ssm_pos_tr_d(const double *src, ptrdiff_t ss, double *dst, ptrdiff_t ds)
{
    ssm_v4d v[4], a[4];
    int i;
    for (i = 0; i < 4; i++)
        v[i] = *(const ssm_v4d *)(src + i * ss);
    for (i = 0; i < 4; i += 2) {
        a[i] = SSM_SHUF4(v[i], v[i + 1], 0, 4, 2, 6);
        a[i + 1] = SSM_SHUF4(v[i], v[i + 1], 1, 5, 3, 7);
    }
    *(ssm_v4d *)(dst) = SSM_SHUF4(a[0], a[2], 0, 1, 4, 5);
    *(ssm_v4d *)(dst + 2 * ds) = SSM_SHUF4(a[0], a[2], 2, 3, 6, 7);
    *(ssm_v4d *)(dst + ds) = SSM_SHUF4(a[1], a[3], 0, 1, 4, 5);
    *(ssm_v4d *)(dst + 3 * ds) = SSM_SHUF4(a[1], a[3], 2, 3, 6, 7);
}
#endif

/* Per-thread scratch in bytes for elements of `rsize` bytes: three rows (exp, h, out), and
   for strided rows the gathered inputs (x, dprob) and outputs of a tile, each on a
   64-byte boundary, plus 64 for aligning the start. */
static inline size_t ssm_pos_scratch_bytes(const ssm_pos_problem *P, size_t rsize)
{
    size_t L = (size_t)P->L;
    size_t TL = P->inner > 1 ? (size_t)P->tile * (size_t)ssm_pos_row_stride(P->L, rsize) : 0;
    return 64 + 3 * ssm_round64(L * rsize) + 3 * ssm_round64(TL * rsize);
}

#define R float
#define SSM_SFX(name) name##_f
#define SSM_POS_TR ssm_pos_tr_f
#define SSM_EXP ssm_expf_nonpos
#define SSM_LOG ssm_logf_pos
#define SSM_POS_HALF
#include "_positions_impl.h"
#undef SSM_POS_HALF
#undef R
#undef SSM_SFX
#undef SSM_POS_TR
#undef SSM_EXP
#undef SSM_LOG

#ifdef SSM_HAVE_EXPF_T16
/* The float kernels again with the AVX-512 clone's exp (see _expf_table.h): every float
   exp of a clone is the same function. gcc vectorises its table reads as gathers. */
#define R float
#define SSM_SFX(name) name##_ft
#define SSM_POS_TR ssm_pos_tr_f
#define SSM_EXP ssm_expf_t16
#define SSM_LOG ssm_logf_pos
#define SSM_EXP_ROW ssm_expf_t16_scaled
#define ssm_stream_row_ft ssm_stream_row_f  /* the kernels' float helper */
#define SSM_POS_HALF
#include "_positions_impl.h"
#undef SSM_POS_HALF
#undef ssm_stream_row_ft
#undef SSM_EXP_ROW
#undef R
#undef SSM_SFX
#undef SSM_POS_TR
#undef SSM_EXP
#undef SSM_LOG
#endif

#define R double
#define SSM_SFX(name) name##_d
#define SSM_POS_TR ssm_pos_tr_d
#define SSM_EXP ssm_exp_nonpos
#define SSM_LOG ssm_log_pos
#include "_positions_impl.h"
#undef R
#undef SSM_SFX
#undef SSM_POS_TR
#undef SSM_EXP
#undef SSM_LOG

/* ssm_pos_tile for float: the instantiation whose exp is the running clone's. */
static inline void ssm_pos_tile_float(const ssm_pos_problem *P, int op, ptrdiff_t t, void *buf)
{
#ifdef SSM_HAVE_EXPF_T16
    if (ssm_expf_use_t16()) {
        ssm_pos_tile_ft(P, op, t, buf);
        return;
    }
#endif
    ssm_pos_tile_f(P, op, t, buf);
}

/* ssm_pos_tile_chunks for float (half 0) and the half types (1 float16, 2 bfloat16): the
   instantiation whose exp is the running clone's. */
static inline void ssm_pos_tile_chunks_float(const ssm_pos_problem *P, int op, ptrdiff_t t,
                                             void *buf, int half)
{
#ifdef SSM_HAVE_EXPF_T16
    if (ssm_expf_use_t16()) {
        ssm_pos_tile_chunks_ft(P, op, t, buf, half);
        return;
    }
#endif
    ssm_pos_tile_chunks_f(P, op, t, buf, half);
}

/* Half-width maps (bf16: bfloat16, else float16): the float rows on widened rows, with
   the running clone's exp (see SSM_SFX(ssm_pos_tile_half) in _positions_impl.h). */
static inline void ssm_pos_tile_half(const ssm_pos_problem *P, int op, ptrdiff_t t, void *buf,
                                     int bf16)
{
#ifdef SSM_HAVE_EXPF_T16
    if (ssm_expf_use_t16()) {
        ssm_pos_tile_half_ft(P, op, t, buf, bf16);
        return;
    }
#endif
    ssm_pos_tile_half_f(P, op, t, buf, bf16);
}

/* Per-thread scratch of ssm_pos_tile_half, in bytes (its carve must match): two float
   rows (e, h), three float blocks of tile rows (x, dprob, out: Ls apart when strided,
   one row of L when not), 3 D floats (kp, var, dkp of a row) and a 16-bit row (streamed
   outputs), each on a 64-byte boundary, plus 64 for aligning the start. */
static inline size_t ssm_pos_half_scratch_bytes(const ssm_pos_problem *P)
{
    size_t L = (size_t)P->L, F = sizeof(float);
    size_t TL = P->inner > 1 ? (size_t)P->tile * (size_t)ssm_pos_row_stride(P->L, F) : L;
    return 64 + 2 * ssm_round64(L * F) + 3 * ssm_round64(TL * F)
         + ssm_round64(3 * (size_t)P->D * F) + ssm_round64(L * sizeof(uint16_t));
}

#endif /* SSM_POSITIONS_H */
