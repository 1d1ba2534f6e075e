// Matrix-vector products of decoding (one token: y = W x, W [rows, cols] row-major) on the weight
// formats the model keeps: 4-bit codes with block scales (NF4/FP4/Int4), 8-bit codes with a scale per
// 32 (q8_0, for the LM head), and bfloat16. Each has a scalar `_reference` (the spec) and x86-64
// variants (AVX2 in gemv_x86.c, AVX-512 in gemv_avx512.c).
// Results equal the reference up to the order of the f32 sums.
#ifndef CKERNELS_GEMV_H
#define CKERNELS_GEMV_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/// x (cols floats) rearranged into xp (cols floats) for qk_gemv4 of the same level: the AVX2 kernel
/// reads each group of 64 inputs in the order its codebook lookups produce them; the AVX-512 kernel reads
/// each 32 as its 16 even elements then its 16 odd ones; the reference reads x as it is (xp is a copy).
/// Prepare once, multiply by any number of rows.
void qk_gemv4_prepare_reference(const float *x, size_t cols, float *xp);
void qk_gemv4_prepare_avx2(const float *x, size_t cols, float *xp);
void qk_gemv4_prepare_avx512(const float *x, size_t cols, float *xp);

/// Where a 4-bit matrix's block scales come from: f32 values, or double quantization (bitsandbytes'
/// compress_statistics): scale b = table[codes[b]] * nested[b / 256] + offset, two f32 roundings, a
/// result past the largest float held at FLT_MAX (as NestedAbsmax.decode does).
typedef struct qk_block_scales {
    const float *absmax;   /* f32 scales, or NULL when double-quantized */
    const uint8_t *codes;  /* 8-bit codes of absmax - offset */
    const float *nested;   /* one scale per 256 codes */
    const float *table;    /* the 256 values of the signed dynamic map */
    float offset;
} qk_block_scales;

static inline float qk_block_scale(const qk_block_scales *s, size_t b) {
    if (s->absmax) return s->absmax[b];
    float v = s->table[s->codes[b]] * s->nested[b >> 8];
    v = v + s->offset;
    return (v - v == 0.0f) ? v : 3.4028234663852886e38f;  /* finite, else FLT_MAX */
}

/// y[r] = sum_b scale(first_block + r * nb + b) * (sum_{i in block b} code[nibble(r, i)] * x[i]) for
/// r < rows, nb = cols / blocksize (cols a multiple of blocksize): per block the products are summed,
/// then scaled. nibble(r, i) is element i of row r in `packed` (cols / 2 bytes a row, first element in
/// the high nibble), as qk_dot4 reads it; x and its prepared xp.
void qk_gemv4_reference(const float *x, const float *xp, const uint8_t *packed, const qk_block_scales *scales,
                        size_t first_block, size_t rows, size_t cols, size_t blocksize, const float *code, float *y);
void qk_gemv4_avx2(const float *x, const float *xp, const uint8_t *packed, const qk_block_scales *scales,
                   size_t first_block, size_t rows, size_t cols, size_t blocksize, const float *code, float *y);
void qk_gemv4_avx512(const float *x, const float *xp, const uint8_t *packed, const qk_block_scales *scales,
                     size_t first_block, size_t rows, size_t cols, size_t blocksize, const float *code, float *y);

/// The same product for nx inputs at once (batched decoding): y[i * ldy + r] = row r times input i, for
/// i < nx. x: the inputs [nx][cols]; xp: each prepared by qk_gemv4_prepare of the same level [nx][cols].
/// Each weight group is decoded once for all the inputs; one input (nx 1) runs qk_gemv4. The same holds for
/// qk_gemm8 and qk_gemm_bf16 below: the batched entry points are the only ones a caller needs.
void qk_gemm4_reference(const float *x, const float *xp, size_t nx, const uint8_t *packed, const qk_block_scales *scales,
                        size_t first_block, size_t rows, size_t cols, size_t blocksize, const float *code, float *y, size_t ldy);
void qk_gemm4_avx2(const float *x, const float *xp, size_t nx, const uint8_t *packed, const qk_block_scales *scales,
                   size_t first_block, size_t rows, size_t cols, size_t blocksize, const float *code, float *y, size_t ldy);
void qk_gemm4_avx512(const float *x, const float *xp, size_t nx, const uint8_t *packed, const qk_block_scales *scales,
                     size_t first_block, size_t rows, size_t cols, size_t blocksize, const float *code, float *y, size_t ldy);

/// The bf16 compute dtype's 4-bit product (as bitsandbytes with bnb_4bit_compute_dtype=bfloat16): each weight
/// code[nibble] * scale computed in f32 and rounded to bf16 (nearest even, subnormals to zero: qk_bf16_from_float),
/// times the input rounded to bf16, the products summed in f32. The inputs come as xb [nx][cols] bf16 words
/// through qk_gemm4_bf16_prepare (rounded, and each 64 reordered as its 32 even elements then its 32 odd ones,
/// the order the vector kernel decodes codes in; a last 32 likewise), for the reference and the vector kernel alike; y[i * ldy + r] = row r times input i. The two agree to the order of
/// the f32 sums: the reference adds each product in element order; the AVX512-BF16 kernel pairs products in
/// vdpbf16ps's lanes.
void qk_gemm4_bf16_prepare_reference(const float *x, size_t cols, uint16_t *xb);
void qk_gemm4_bf16_prepare_avx512bf16(const float *x, size_t cols, uint16_t *xb);
void qk_gemm4_bf16_reference(const uint16_t *xb, size_t nx, const uint8_t *packed, const qk_block_scales *scales,
                             size_t first_block, size_t rows, size_t cols, size_t blocksize, const float *code, float *y, size_t ldy);
void qk_gemm4_bf16_avx512bf16(const uint16_t *xb, size_t nx, const uint8_t *packed, const qk_block_scales *scales,
                              size_t first_block, size_t rows, size_t cols, size_t blocksize, const float *code, float *y, size_t ldy);

/// y[r] = sum_b scales[r * cols / 32 + b] * (sum_{j < 32} q[r * cols + 32 b + j] * x[32 b + j]), cols a multiple of 32.
void qk_gemv8_reference(const float *x, const int8_t *q, const float *scales, size_t rows, size_t cols, float *y);
void qk_gemv8_avx2(const float *x, const int8_t *q, const float *scales, size_t rows, size_t cols, float *y);
void qk_gemv8_avx512(const float *x, const int8_t *q, const float *scales, size_t rows, size_t cols, float *y);

/// q8_0 rows times nx inputs x [nx][cols]: y[i * ldy + r].
void qk_gemm8_reference(const float *x, size_t nx, const int8_t *q, const float *scales, size_t rows, size_t cols, float *y, size_t ldy);
void qk_gemm8_avx2(const float *x, size_t nx, const int8_t *q, const float *scales, size_t rows, size_t cols, float *y, size_t ldy);
void qk_gemm8_avx512(const float *x, size_t nx, const int8_t *q, const float *scales, size_t rows, size_t cols, float *y, size_t ldy);

/// y[r] = sum_j float(w[r * cols + j]) * x[j], w bfloat16 bits.
void qk_gemv_bf16_reference(const float *x, const uint16_t *w, size_t rows, size_t cols, float *y);
void qk_gemv_bf16_avx2(const float *x, const uint16_t *w, size_t rows, size_t cols, float *y);
void qk_gemv_bf16_avx512(const float *x, const uint16_t *w, size_t rows, size_t cols, float *y);

/// bf16 rows times nx inputs x [nx][cols]: y[i * ldy + r].
void qk_gemm_bf16_reference(const float *x, size_t nx, const uint16_t *w, size_t rows, size_t cols, float *y, size_t ldy);
void qk_gemm_bf16_avx2(const float *x, size_t nx, const uint16_t *w, size_t rows, size_t cols, float *y, size_t ldy);
void qk_gemm_bf16_avx512(const float *x, size_t nx, const uint16_t *w, size_t rows, size_t cols, float *y, size_t ldy);

#ifdef __cplusplus
}
#endif
#endif
