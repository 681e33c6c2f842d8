/*
 * ssm/_floors.h -- the memory floors the benchmark compares the kernels with.
 *
 * Not used by any kernel: ssm-bench times these beside ssm's passes, at the same thread
 * count, to say how close a pass comes to the memory system's limit for its bytes.
 *   ssm_floor_stream: copy n bytes with non-temporal stores, the store path the kernels
 *     use for large outputs (ssm_stream_row): every byte read once and written once, no
 *     destination line read first. The floor of a pass that reads X and writes X.
 *   ssm_floor_read: read n bytes (a wrapping sum of their 64-bit words, so the reads
 *     cannot be dropped): the floor of a pass that only reads, such as a loss alone.
 * Each works on one chunk; the Cython caller splits the bytes into chunks over threads.
 */
#ifndef SSM_FLOORS_H
#define SSM_FLOORS_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

static inline void ssm_floor_stream(char *dst, const char *src, size_t n)
{
#if defined(__SSE2__)
    size_t j = 0;
    for (; j < n && ((uintptr_t)(dst + j) & 15) != 0; j++)
        dst[j] = src[j];
    for (; j + 64 <= n; j += 64) {  /* a line per iteration: four 16-byte streams */
        __m128i a = _mm_loadu_si128((const __m128i *)(src + j));
        __m128i b = _mm_loadu_si128((const __m128i *)(src + j + 16));
        __m128i c = _mm_loadu_si128((const __m128i *)(src + j + 32));
        __m128i d = _mm_loadu_si128((const __m128i *)(src + j + 48));
        _mm_stream_si128((__m128i *)(dst + j), a);
        _mm_stream_si128((__m128i *)(dst + j + 16), b);
        _mm_stream_si128((__m128i *)(dst + j + 32), c);
        _mm_stream_si128((__m128i *)(dst + j + 48), d);
    }
    for (; j < n; j++)
        dst[j] = src[j];
    _mm_sfence();
#else
    memcpy(dst, src, n);
#endif
}

static inline uint64_t ssm_floor_read(const char *src, size_t n)
{
    uint64_t acc[8] = {0, 0, 0, 0, 0, 0, 0, 0}, w, total = 0;
    size_t j = 0, k;
    for (; j + 64 <= n; j += 64)  /* independent lanes: the loop vectorises */
        for (k = 0; k < 8; k++) {
            memcpy(&w, src + j + 8 * k, 8);
            acc[k] += w;
        }
    for (k = 0; k < 8; k++)
        total += acc[k];
    for (; j < n; j++)
        total += (unsigned char)src[j];
    return total;
}

#endif
