// The 16-bit KV cache of inference: keys and values kept as IEEE half (f16) or bfloat16 words, narrowed
// once when a position is written and widened to f32 as attention reads them. Each kernel has a scalar
// `_reference` (the spec) and x86-64 variants (AVX2 with F16C, AVX-512) in rowops_x86.c; the vector
// variants equal the reference exactly for the conversions and up to the order of f32 sums for attention.
#ifndef CKERNELS_KV_H
#define CKERNELS_KV_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/// The word format of a 16-bit cache.
enum { QK_KV_F16 = 1, QK_KV_BF16 = 2 };

/// dst[i] = src[i] narrowed to `format` (round to nearest, ties to even; f16 overflow gives infinity, NaN stays
/// a quiet NaN), for i < n.
void qk_kv_narrow_reference(const float *src, uint16_t *dst, size_t n, int format);
void qk_kv_narrow_avx2(const float *src, uint16_t *dst, size_t n, int format);

/// dst[i] = src[i] widened to f32 (exact), for i < n.
void qk_kv_widen_reference(const uint16_t *src, float *dst, size_t n, int format);
void qk_kv_widen_avx2(const uint16_t *src, float *dst, size_t n, int format);

/// qk_attend over a 16-bit cache: position j's key and value are the d words at keys + j * stride and
/// values + j * stride, in `format`; every other argument as qk_attend's.
void qk_attend16_reference(const float *q, size_t nq, const uint16_t *keys, const uint16_t *values, size_t S, size_t d, size_t stride,
                           float scale, float *scores, float *out, float *stats, int format);
void qk_attend16_avx2(const float *q, size_t nq, const uint16_t *keys, const uint16_t *values, size_t S, size_t d, size_t stride,
                      float scale, float *scores, float *out, float *stats, int format);
void qk_attend16_avx512(const float *q, size_t nq, const uint16_t *keys, const uint16_t *values, size_t S, size_t d, size_t stride,
                        float scale, float *scores, float *out, float *stats, int format);

#ifdef __cplusplus
}
#endif
#endif
