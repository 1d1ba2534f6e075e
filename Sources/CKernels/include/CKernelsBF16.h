// bfloat16 matrix multiply for the training step's frozen products (QLoRA's bf16 compute dtype):
// operands rounded to bf16 (nearest even), products accumulated in f32. On x86-64 with AVX512-BF16
// one vdpbf16ps does two multiply-adds per f32 lane, twice the f32 FMA rate.
//
// Layouts (all row-major):
// - A: bf16 rows [m][lda], k values per row; a row of odd k ends in one zero (lda >= k rounded up to even).
// - B packed: panels of QK_BF16_NR = 32 columns; panel p holds, for each k-pair kp, 32 u32 words
//   (column j of the panel: low half B[2kp][j], high half B[2kp + 1][j]), zero past k and past n.
//   A panel is 32 * ceil(k/2) words; panels follow each other.
// - C: f32 [m][ldc].
#ifndef CKERNELS_BF16_H
#define CKERNELS_BF16_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum { QK_BF16_NR = 32, QK_BF16_MR = 12 };

/// 1 if this CPU (and build) can run the `_avx512bf16` functions.
int qk_cpu_supports_bf16(void);

/// f32 -> bf16 bits, round to nearest even; NaN stays NaN (quiet, sign kept); subnormals become signed zeros
/// (as vcvtneps2bf16 does, measured on this Zen 4; torch keeps them, rounded).
uint16_t qk_bf16_from_float(float x);

/// dst[r][c] = bf16(src[r * ld + c]) for c < cols; when cols is odd, dst[r][cols] = 0. ldd >= cols rounded up to even.
void qk_bf16_convert_rows_reference(const float *src, size_t rows, size_t cols, size_t ld, uint16_t *dst, size_t ldd);
void qk_bf16_convert_rows_avx512bf16(const float *src, size_t rows, size_t cols, size_t ld, uint16_t *dst, size_t ldd);

/// The transpose as bf16 rows: dst[c][r] = bf16(src[r * ld + c]); when rows is odd, dst[c][rows] = 0.
/// ldd >= rows rounded up to even.
void qk_bf16_convert_transposed_reference(const float *src, size_t rows, size_t cols, size_t ld, uint16_t *dst, size_t ldd);
void qk_bf16_convert_transposed_avx512bf16(const float *src, size_t rows, size_t cols, size_t ld, uint16_t *dst, size_t ldd);

/// Words of a packed B of k x n.
size_t qk_bf16_packed_words(size_t k, size_t n);

/// Packs panels [p0, p1) of B (k x n) from f32. transposed = 1: B is stored [n][ldb] (B[kk][j] = b[j * ldb + kk],
/// a weight tile W for C = A Wᵀ); 0: stored [k][ldb] (B[kk][j] = b[kk * ldb + j], for C = A W).
void qk_bf16_pack_b_reference(const float *b, size_t ldb, int transposed, size_t k, size_t n, size_t p0, size_t p1, uint32_t *packed);
void qk_bf16_pack_b_avx512bf16(const float *b, size_t ldb, int transposed, size_t k, size_t n, size_t p0, size_t p1, uint32_t *packed);

/// C[i][j] = alpha * (sum over kk of A[i][kk] * B[kk][j]) (+ C[i][j] when accumulate), for rows i in [m0, m1)
/// and the columns of panels [p0, p1) (clipped to n). The reference takes each output's k-pairs in order, adding
/// the odd product and then the even one in f32 (the order of vdpbf16ps); the vector version adds its sums into
/// C in blocks of 1024 values of k, so the two agree to f32 rounding, not bit for bit. A, B and C need no
/// particular alignment.
void qk_bf16_gemm_reference(const uint16_t *a, size_t lda, const uint32_t *packed, size_t k, size_t n, float *c, size_t ldc,
                            size_t m0, size_t m1, size_t p0, size_t p1, float alpha, int accumulate);
void qk_bf16_gemm_avx512bf16(const uint16_t *a, size_t lda, const uint32_t *packed, size_t k, size_t n, float *c, size_t ldc,
                             size_t m0, size_t m1, size_t p0, size_t p1, float alpha, int accumulate);

#ifdef __cplusplus
}
#endif
#endif
