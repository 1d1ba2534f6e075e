// Scalar references of the decoding matrix-vector products (CKernelsGemv.h): the spec the vector
// versions are tested against, and their fallback.
// No floating-point contraction: each product and sum rounds on its own.
#pragma clang fp contract(off)
#include "CKernels.h"
#include <string.h>

void qk_gemv4_prepare_reference(const float *x, size_t cols, float *xp) { memcpy(xp, x, cols * sizeof(float)); }

void qk_gemv4_reference(const float *x, const float *xp, const uint8_t *packed, const qk_block_scales *scales,
                        size_t first_block, size_t rows, size_t cols, size_t blocksize, const float *code, float *y) {
    (void)xp;
    size_t nb = cols / blocksize;
    for (size_t r = 0; r < rows; r++) {
        const uint8_t *pr = packed + r * (cols / 2);
        float total = 0.0f;
        for (size_t b = 0; b < nb; b++) {
            float sum = 0.0f;
            for (size_t i = b * blocksize; i < (b + 1) * blocksize; i++) {
                uint8_t byte = pr[i >> 1];
                uint8_t q = (i & 1) ? (byte & 0x0F) : (byte >> 4);
                sum += code[q] * x[i];
            }
            total += sum * qk_block_scale(scales, first_block + r * nb + b);
        }
        y[r] = total;
    }
}

void qk_gemv8_reference(const float *x, const int8_t *q, const float *scales, size_t rows, size_t cols, float *y) {
    size_t nb = cols / 32;
    for (size_t r = 0; r < rows; r++) {
        const int8_t *qr = q + r * cols;
        float total = 0.0f;
        for (size_t b = 0; b < nb; b++) {
            float sum = 0.0f;
            for (size_t j = 0; j < 32; j++) sum += (float)qr[32 * b + j] * x[32 * b + j];
            total += sum * scales[r * nb + b];
        }
        y[r] = total;
    }
}

static inline float bf16_to_float(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

void qk_gemv_bf16_reference(const float *x, const uint16_t *w, size_t rows, size_t cols, float *y) {
    for (size_t r = 0; r < rows; r++) {
        const uint16_t *wr = w + r * cols;
        float sum = 0.0f;
        for (size_t j = 0; j < cols; j++) sum += bf16_to_float(wr[j]) * x[j];
        y[r] = sum;
    }
}

void qk_gemm4_reference(const float *x, const float *xp, size_t nx, const uint8_t *packed, const qk_block_scales *scales,
                        size_t first_block, size_t rows, size_t cols, size_t blocksize, const float *code, float *y, size_t ldy) {
    for (size_t i = 0; i < nx; i++)
        qk_gemv4_reference(x + i * cols, xp + i * cols, packed, scales, first_block, rows, cols, blocksize, code, y + i * ldy);
}

void qk_gemm8_reference(const float *x, size_t nx, const int8_t *q, const float *scales, size_t rows, size_t cols, float *y, size_t ldy) {
    for (size_t i = 0; i < nx; i++) qk_gemv8_reference(x + i * cols, q, scales, rows, cols, y + i * ldy);
}

void qk_gemm_bf16_reference(const float *x, size_t nx, const uint16_t *w, size_t rows, size_t cols, float *y, size_t ldy) {
    for (size_t i = 0; i < nx; i++) qk_gemv_bf16_reference(x + i * cols, w, rows, cols, y + i * ldy);
}

// Where element e of a row sits in the inputs qk_gemm4_bf16_prepare writes: each 64 elements as their 32
// even ones then their 32 odd ones; a last 32 likewise (16 and 16); past those, in place.
static size_t bf16_prepared_position(size_t e, size_t cols) {
    size_t c64 = cols / 64 * 64;
    if (e < c64) return e / 64 * 64 + (e & 1) * 32 + (e % 64) / 2;
    if (e < c64 + 32 && c64 + 32 <= cols) return c64 + (e & 1) * 16 + (e - c64) / 2;
    return e;
}

void qk_gemm4_bf16_prepare_reference(const float *x, size_t cols, uint16_t *xb) {
    for (size_t e = 0; e < cols; e++) xb[bf16_prepared_position(e, cols)] = qk_bf16_from_float(x[e]);
}

void qk_gemm4_bf16_reference(const uint16_t *xb, size_t nx, const uint8_t *packed, const qk_block_scales *scales,
                             size_t first_block, size_t rows, size_t cols, size_t blocksize, const float *code, float *y, size_t ldy) {
    size_t nb = cols / blocksize;
    for (size_t r = 0; r < rows; r++) {
        const uint8_t *pr = packed + r * (cols / 2);
        for (size_t i = 0; i < nx; i++) {
            const uint16_t *xi = xb + i * cols;
            float sum = 0.0f;
            for (size_t e = 0; e < cols; e++) {
                uint8_t byte = pr[e >> 1];
                uint8_t q = (e & 1) ? (byte & 0x0F) : (byte >> 4);
                float w = code[q] * qk_block_scale(scales, first_block + r * nb + e / blocksize);
                sum += bf16_to_float(qk_bf16_from_float(w)) * bf16_to_float(xi[bf16_prepared_position(e, cols)]);
            }
            y[i * ldy + r] = sum;
        }
    }
}
