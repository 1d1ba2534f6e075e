// Hot loops of swift-qlora, in C so that each can carry its own instruction-set attribute.
// Every kernel has a scalar `_reference` version (the spec, and the fallback) and, on x86-64, `_avx2`
// and `_avx512` versions. Swift picks one set once at start-up (QLoRAKernels/KernelTable.swift).
// Calling an `_avx2`/`_avx512` function on a CPU without that feature is undefined: check
// qk_cpu_supports() first.
#ifndef CKERNELS_H
#define CKERNELS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/// Instruction-set levels, in increasing order.
enum { QK_LEVEL_REFERENCE = 0, QK_LEVEL_AVX2 = 1, QK_LEVEL_AVX512 = 2 };

/// 1 if this CPU (and this build) can run kernels of `level`, else 0.
int qk_cpu_supports(int level);

/// Blockwise 4-bit quantization (bitsandbytes semantics).
/// x: n floats, all finite. Blocks of `blocksize` (even, >= 2); the last block may be short.
/// Full blocks scale by x * (1/absmax); the short last block by x / absmax (as bitsandbytes does),
/// absmax clamped to >= 1e-38 (and stored clamped for the short block only). The code index is the number of `thresholds` (15 ascending
/// midpoints) strictly below the clamped scaled value, mapped through `remap` (16 entries).
/// packed: (n+1)/2 bytes, first element in the high nibble, an odd count padded with the code of 0.0;
/// absmax: ceil(n/blocksize) floats.
/// Returns -1, or the index of the first block holding a NaN or infinity (outputs then undefined).
long long qk_quantize4_reference(const float *x, size_t n, size_t blocksize, const float *thresholds,
                                 const uint8_t *remap, uint8_t *packed, float *absmax);
long long qk_quantize4_avx2(const float *x, size_t n, size_t blocksize, const float *thresholds,
                            const uint8_t *remap, uint8_t *packed, float *absmax);
long long qk_quantize4_avx512(const float *x, size_t n, size_t blocksize, const float *thresholds,
                              const uint8_t *remap, uint8_t *packed, float *absmax);

/// out[i] = code[nibble(i)] * absmax[i / blocksize] for i < n (f32, one rounding per element).
void qk_dequantize4_reference(const uint8_t *packed, const float *absmax, size_t n, size_t blocksize,
                              const float *code, float *out);
void qk_dequantize4_avx2(const uint8_t *packed, const float *absmax, size_t n, size_t blocksize,
                         const float *code, float *out);
void qk_dequantize4_avx512(const uint8_t *packed, const float *absmax, size_t n, size_t blocksize,
                           const float *code, float *out);

/// Fused dequantize-and-dot: sum_i x[i] * code[nibble(i)] * absmax[i / blocksize], for a run of n
/// elements that starts on a block boundary (packed and absmax point at that block).
/// Per block, the code-times-x products are summed and then scaled by the block's absmax.
float qk_dot4_reference(const float *x, const uint8_t *packed, const float *absmax, size_t n, size_t blocksize,
                        const float *code);
float qk_dot4_avx2(const float *x, const uint8_t *packed, const float *absmax, size_t n, size_t blocksize,
                   const float *code);
float qk_dot4_avx512(const float *x, const uint8_t *packed, const float *absmax, size_t n, size_t blocksize,
                     const float *code);

#ifdef __cplusplus
}
#endif
#endif

#ifndef CKERNELS_ROWOPS_H
#define CKERNELS_ROWOPS_H
#ifdef __cplusplus
extern "C" {
#endif

/// Softmax of row[0..<visible] in place (max subtracted, f32); row[visible..<length] set to 0.
void qk_softmax_row_reference(float *row, size_t visible, size_t length);
void qk_softmax_row_avx2(float *row, size_t visible, size_t length);
void qk_softmax_row_avx512(float *row, size_t visible, size_t length);

/// nq queries of one key-value head (the query heads that share it under grouped-query attention) against
/// S cached positions (decoding's attention). For each query qi (d floats at q + qi * d): scores[qi * S + j]
/// = scale * q . k_j, softmax over j (qk_softmax_row), out[qi * d ...] = sum_j p_j v_j. Position j's key
/// and value are the d floats at keys + j * stride and values + j * stride; each is read once for all nq.
/// scores: nq * S floats of scratch (the probabilities after). With `stats` (2 * nq floats) the output is
/// left unnormalized, for attention split over ranges of positions: stats[2 qi] = m, the largest score,
/// stats[2 qi + 1] = l = sum_j exp(score_j - m), out = sum_j exp(score_j - m) v_j; the ranges then
/// combine as sum_r exp(m_r - M) out_r / sum_r exp(m_r - M) l_r, M the largest m_r. NULL: normalized.
void qk_attend_reference(const float *q, size_t nq, const float *keys, const float *values, size_t S, size_t d, size_t stride,
                         float scale, float *scores, float *out, float *stats);
void qk_attend_avx2(const float *q, size_t nq, const float *keys, const float *values, size_t S, size_t d, size_t stride,
                    float scale, float *scores, float *out, float *stats);
void qk_attend_avx512(const float *q, size_t nq, const float *keys, const float *values, size_t S, size_t d, size_t stride,
                      float scale, float *scores, float *out, float *stats);

/// a = silu(g) * u = g / (1 + exp(-g)) * u.
void qk_swiglu_reference(float *a, const float *g, const float *u, size_t n);
void qk_swiglu_avx2(float *a, const float *g, const float *u, size_t n);
void qk_swiglu_avx512(float *a, const float *g, const float *u, size_t n);

/// dg = da * u * sig(g) * (1 + g * (1 - sig(g))), du = da * silu(g).
void qk_geglu_reference(float *a, const float *g, const float *u, size_t n);
void qk_geglu_avx2(float *a, const float *g, const float *u, size_t n);
void qk_geglu_avx512(float *a, const float *g, const float *u, size_t n);
void qk_geglu_backward_reference(float *dg, float *du, const float *da, const float *g, const float *u, size_t n);
void qk_geglu_backward_avx2(float *dg, float *du, const float *da, const float *g, const float *u, size_t n);
void qk_geglu_backward_avx512(float *dg, float *du, const float *da, const float *g, const float *u, size_t n);
void qk_swiglu_backward_reference(float *dg, float *du, const float *da, const float *g, const float *u, size_t n);
void qk_swiglu_backward_avx2(float *dg, float *du, const float *da, const float *g, const float *u, size_t n);
void qk_swiglu_backward_avx512(float *dg, float *du, const float *da, const float *g, const float *u, size_t n);

/// Dropout of n activations with its mask drawn from SplitMix64 (a Weyl sequence through a 64-bit
/// mixer): group g of four elements takes z = mix(start + (g + 1) * 0x9E3779B97F4A7C15), and element
/// 4g + j the 16-bit uniform u = (z >> 16j) & 0xFFFF; it is kept when u >= threshold. mask[i] = kept
/// (0 or 1); out[i] = kept ? x[i] * keep : 0. The same (start, threshold) give the same mask at every level.
void qk_dropout_reference(const float *x, uint8_t *mask, float *out, size_t n, uint64_t start, uint32_t threshold, float keep);
void qk_dropout_avx2(const float *x, uint8_t *mask, float *out, size_t n, uint64_t start, uint32_t threshold, float keep);
void qk_dropout_avx512(const float *x, uint8_t *mask, float *out, size_t n, uint64_t start, uint32_t threshold, float keep);

/// Cross-entropy of one row: returns logsumexp(x) - x[target] (in f64) and overwrites x with
/// (softmax(x) - onehot(target)) * scale.
double qk_cross_entropy_row_reference(float *x, size_t vocab, size_t target, float scale);
double qk_cross_entropy_row_avx2(float *x, size_t vocab, size_t target, float scale);
double qk_cross_entropy_row_avx512(float *x, size_t vocab, size_t target, float scale);

#ifdef __cplusplus
}
#endif
#endif

// The bf16 GEMM of the training step.
#include "CKernelsBF16.h"

// The matrix-vector products of decoding.
#include "CKernelsGemv.h"

// The 16-bit KV cache's conversions and attention.
#include "CKernelsKV.h"
