// AVX2 versions of the decoding matrix-vector products (CKernelsGemv.h); the AVX-512 ones are in gemv_avx512.c.
//
// 4-bit rows: the AVX2 codebook lookup that costs least is vpshufb over the four byte planes of the
// 16 f32 codes (one 16-byte table a plane), then two rounds of unpacks that assemble the bytes into
// f32 lanes. The unpacks leave the 64 values of a 32-byte group in a fixed shuffled order; instead of
// shuffling every row's values back, x is shuffled once into that order (qk_gemv4_prepare_avx2) and
// every row of the matrix reads it. Measured on a Zen 3 core: 11.5 G multiply-adds/s, 2.2x the per-row
// kernel that put the codes back in order (qk_dot4_avx2).
#pragma clang fp contract(off)
#include "CKernels.h"
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#define AVX2 __attribute__((target("avx2,fma")))

// Group of 64 elements = 32 bytes; byte i (0..31) holds element 2i (high nibble) and 2i + 1 (low).
// After expand(), output vector o (0..3) lane j holds byte i = (j < 4 ? 4o + j : 16 + 4o + j - 4):
// the vpshufb / unpack rounds work within each 128-bit half. xp holds, per group, the 8 vectors
// [even elements of o = 0..3, odd elements of o = 0..3].
static inline size_t group_byte(size_t o, size_t j) { return j < 4 ? 4 * o + j : 16 + 4 * o + (j - 4); }

void qk_gemv4_prepare_avx2(const float *x, size_t cols, float *xp) {
    size_t groups = cols / 64;
    for (size_t g = 0; g < groups; g++) {
        const float *xg = x + 64 * g;
        float *pg = xp + 64 * g;
        for (size_t odd = 0; odd < 2; odd++)
            for (size_t o = 0; o < 4; o++)
                for (size_t j = 0; j < 8; j++) pg[32 * odd + 8 * o + j] = xg[2 * group_byte(o, j) + odd];
    }
    memcpy(xp + 64 * groups, x + 64 * groups, (cols - 64 * groups) * sizeof(float));
}

// The 32 codes of `idx` (one index 0..15 a byte) as f32, in the order above.
AVX2 static inline void expand32(__m256i idx, const __m256i t[4], __m256 out[4]) {
    __m256i p0 = _mm256_shuffle_epi8(t[0], idx), p1 = _mm256_shuffle_epi8(t[1], idx);
    __m256i p2 = _mm256_shuffle_epi8(t[2], idx), p3 = _mm256_shuffle_epi8(t[3], idx);
    __m256i l01 = _mm256_unpacklo_epi8(p0, p1), h01 = _mm256_unpackhi_epi8(p0, p1);
    __m256i l23 = _mm256_unpacklo_epi8(p2, p3), h23 = _mm256_unpackhi_epi8(p2, p3);
    out[0] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(l01, l23));
    out[1] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(l01, l23));
    out[2] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(h01, h23));
    out[3] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(h01, h23));
}

// The four byte planes of the 16 f32 codes, each a 16-byte vpshufb table repeated in both halves.
AVX2 static inline void code_planes(const float *code, __m256i t[4]) {
    uint8_t planes[4][32];
    for (int k = 0; k < 16; k++) {
        uint32_t u;
        memcpy(&u, &code[k], 4);
        for (int b = 0; b < 4; b++) planes[b][k] = planes[b][k + 16] = (uint8_t)(u >> (8 * b));
    }
    for (int b = 0; b < 4; b++) t[b] = _mm256_loadu_si256((const __m256i *)planes[b]);
}

// The 64 codes of a 32-byte group as f32: w[0..3] the even elements, w[4..7] the odd, in xp's order.
AVX2 static inline void expand64(__m256i v, const __m256i t[4], __m256 w[8]) {
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    expand32(_mm256_and_si256(_mm256_srli_epi16(v, 4), low4), t, w);
    expand32(_mm256_and_si256(v, low4), t, w + 4);
}

// A q8_0 block's 32 codes as f32 (not yet scaled).
AVX2 static inline void load_q8_block(const int8_t *qb, __m256 w[4]) {
    for (int k = 0; k < 4; k++) w[k] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(qb + 8 * k))));
}

AVX2 static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// Scales first .. first + n - 1 into out. (An AVX2 gather from the 256-entry map measured slower than
// this scalar loop on Zen 3.)
static void decode_scales(const qk_block_scales *s, size_t first, size_t n, float *out) {
    if (s->absmax) {
        memcpy(out, s->absmax + first, n * sizeof(float));
        return;
    }
    for (size_t b = 0; b < n; b++) out[b] = qk_block_scale(s, first + b);
}

// Rows through a per-row dot product over f32 scales decoded into a stack buffer, 256 blocks at a time.
typedef float (*dot4_fn)(const float *, const uint8_t *, const float *, size_t, size_t, const float *);
static void gemv4_by_rows(dot4_fn dot, const float *x, const uint8_t *packed, const qk_block_scales *scales, size_t first_block,
                          size_t rows, size_t cols, size_t blocksize, const float *code, float *y) {
    size_t nb = cols / blocksize;
    float decoded[256];
    for (size_t r = 0; r < rows; r++) {
        float total = 0.0f;
        for (size_t b0 = 0; b0 < nb; b0 += 256) {
            size_t n = nb - b0 < 256 ? nb - b0 : 256;
            decode_scales(scales, first_block + r * nb + b0, n, decoded);
            total += dot(x + b0 * blocksize, packed + r * (cols / 2) + b0 * blocksize / 2, decoded, n * blocksize, blocksize, code);
        }
        y[r] = total;
    }
}

// One row: n blocks of `groups` groups of 64, scale b at decoded[b]. Kept apart (and not inlined) so
// that its loop has the registers to itself: inlined into the caller, the tables spilled to the stack.
AVX2 __attribute__((noinline)) static float row4_avx2(const uint8_t *pr, const float *xp, const float *decoded, size_t n, size_t groups,
                                                       __m256i t0, __m256i t1, __m256i t2, __m256i t3) {
    const __m256i t[4] = {t0, t1, t2, t3};
    __m256 total = _mm256_setzero_ps();
    for (size_t b = 0; b < n; b++) {
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
        for (size_t g = 0; g < groups; g++) {
            __m256 w[8];
            expand64(_mm256_loadu_si256((const __m256i *)pr), t, w);
            for (int k = 0; k < 8; k += 2) {
                a0 = _mm256_fmadd_ps(w[k], _mm256_loadu_ps(xp + 8 * k), a0);
                a1 = _mm256_fmadd_ps(w[k + 1], _mm256_loadu_ps(xp + 8 * k + 8), a1);
            }
            pr += 32;
            xp += 64;
        }
        total = _mm256_fmadd_ps(_mm256_add_ps(a0, a1), _mm256_broadcast_ss(&decoded[b]), total);
    }
    return hsum256(total);
}

void qk_gemv4_avx2(const float *x, const float *xp, const uint8_t *packed, const qk_block_scales *scales,
                   size_t first_block, size_t rows, size_t cols, size_t blocksize, const float *code, float *y) AVX2;
void qk_gemv4_avx2(const float *x, const float *xp, const uint8_t *packed, const qk_block_scales *scales,
                   size_t first_block, size_t rows, size_t cols, size_t blocksize, const float *code, float *y) {
    size_t nb = cols / blocksize;
    if (blocksize % 64 != 0) {
        gemv4_by_rows(qk_dot4_avx2, x, packed, scales, first_block, rows, cols, blocksize, code, y);
        return;
    }
    __m256i t[4];
    code_planes(code, t);
    size_t groups = blocksize / 64;
    float decoded[256];
    for (size_t r = 0; r < rows; r++) {
        const uint8_t *pr = packed + r * (cols / 2);
        float sum = 0.0f;
        for (size_t b0 = 0; b0 < nb; b0 += 256) {
            // The row's scales first, so that the loop broadcasts each from memory (a load, where a
            // register broadcast would take a shuffle slot from the lookups).
            size_t n = nb - b0 < 256 ? nb - b0 : 256;
            decode_scales(scales, first_block + r * nb + b0, n, decoded);
            sum += row4_avx2(pr + b0 * blocksize / 2, xp + b0 * blocksize, decoded, n, groups, t[0], t[1], t[2], t[3]);
        }
        y[r] = sum;
    }
}

void qk_gemv8_avx2(const float *x, const int8_t *q, const float *scales, size_t rows, size_t cols, float *y) AVX2;
void qk_gemv8_avx2(const float *x, const int8_t *q, const float *scales, size_t rows, size_t cols, float *y) {
    size_t nb = cols / 32;
    for (size_t r = 0; r < rows; r++) {
        const int8_t *qr = q + r * cols;
        const float *sr = scales + r * nb;
        __m256 total = _mm256_setzero_ps();
        for (size_t b = 0; b < nb; b++) {
            const int8_t *qb = qr + 32 * b;
            const float *xb = x + 32 * b;
            __m256 w[4];
            load_q8_block(qb, w);
            __m256 a0 = _mm256_mul_ps(w[0], _mm256_loadu_ps(xb)), a1 = _mm256_mul_ps(w[1], _mm256_loadu_ps(xb + 8));
            a0 = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(xb + 16), a0);
            a1 = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(xb + 24), a1);
            total = _mm256_fmadd_ps(_mm256_add_ps(a0, a1), _mm256_set1_ps(sr[b]), total);
        }
        y[r] = hsum256(total);
    }
}

void qk_gemv_bf16_avx2(const float *x, const uint16_t *w, size_t rows, size_t cols, float *y) AVX2;
void qk_gemv_bf16_avx2(const float *x, const uint16_t *w, size_t rows, size_t cols, float *y) {
    for (size_t r = 0; r < rows; r++) {
        const uint16_t *wr = w + r * cols;
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
        size_t j = 0;
        for (; j + 16 <= cols; j += 16) {
            __m256i u0 = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(wr + j)));
            __m256i u1 = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(wr + j + 8)));
            a0 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(u0, 16)), _mm256_loadu_ps(x + j), a0);
            a1 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(u1, 16)), _mm256_loadu_ps(x + j + 8), a1);
        }
        float sum = hsum256(_mm256_add_ps(a0, a1));
        float tail = 0.0f;
        qk_gemv_bf16_reference(x + j, wr + j, 1, cols - j, &tail);
        y[r] = sum + tail;
    }
}

// ---- batched: nx inputs at once ---------------------------------------------------------------------
#define GEMM_CHUNK 16  /* inputs whose accumulators one pass over a row keeps */

void qk_gemm4_avx2(const float *x, const float *xp, size_t nx, const uint8_t *packed, const qk_block_scales *scales,
                   size_t first_block, size_t rows, size_t cols, size_t blocksize, const float *code, float *y, size_t ldy) AVX2;
void qk_gemm4_avx2(const float *x, const float *xp, size_t nx, const uint8_t *packed, const qk_block_scales *scales,
                   size_t first_block, size_t rows, size_t cols, size_t blocksize, const float *code, float *y, size_t ldy) {
    if (nx == 1 || blocksize % 64 != 0) {  // one input: the matrix-vector kernel is faster
        for (size_t i = 0; i < nx; i++)
            qk_gemv4_avx2(x + i * cols, xp + i * cols, packed, scales, first_block, rows, cols, blocksize, code, y + i * ldy);
        return;
    }
    __m256i t[4];
    code_planes(code, t);
    size_t nb = cols / blocksize, groups = blocksize / 64;
    // Rows four at a time, so that a group of the inputs (64 values each) is read from L2 once for four
    // rows and from L1 for the others (16 inputs of 1,536 values do not fit in L1). Each decoded group
    // is scaled once (code * scale, one more f32 rounding) and multiply-added straight into the input's
    // total (two accumulators each): independent accumulators keep the FMA units busy, where summing each block before
    // scaling it left every input waiting on its own chain.
    enum { R = 4 };
    __m256 total[R][GEMM_CHUNK][2];
    for (size_t i0 = 0; i0 < nx; i0 += GEMM_CHUNK) {
        size_t n = nx - i0 < GEMM_CHUNK ? nx - i0 : GEMM_CHUNK;
        for (size_t r0 = 0; r0 < rows; r0 += R) {
            size_t m = rows - r0 < R ? rows - r0 : R;
            for (size_t rr = 0; rr < m; rr++)
                for (size_t i = 0; i < n; i++) total[rr][i][0] = total[rr][i][1] = _mm256_setzero_ps();
            for (size_t b = 0; b < nb; b++) {
                for (size_t g = 0; g < groups; g++) {
                    size_t e = b * blocksize + 64 * g;
                    for (size_t rr = 0; rr < m; rr++) {
                        const uint8_t *pg = packed + (r0 + rr) * (cols / 2) + e / 2;
                        // The same group of the next four rows: four interleaved row streams defeat the hardware
                        // prefetchers once the matrix is past L2 (measured: half the rate without this).
                        if (r0 + R < rows) _mm_prefetch((const char *)(pg + R * (cols / 2)), _MM_HINT_T0);
                        __m256 w[8];
                        expand64(_mm256_loadu_si256((const __m256i *)pg), t, w);
                        __m256 scale = _mm256_set1_ps(qk_block_scale(scales, first_block + (r0 + rr) * nb + b));
                        for (int k = 0; k < 8; k++) w[k] = _mm256_mul_ps(w[k], scale);
                        for (size_t i = 0; i < n; i++) {
                            const float *xg = xp + (i0 + i) * cols + e;
                            __m256 a = total[rr][i][0], c = total[rr][i][1];
                            for (int k = 0; k < 8; k += 2) {
                                a = _mm256_fmadd_ps(w[k], _mm256_loadu_ps(xg + 8 * k), a);
                                c = _mm256_fmadd_ps(w[k + 1], _mm256_loadu_ps(xg + 8 * k + 8), c);
                            }
                            total[rr][i][0] = a;
                            total[rr][i][1] = c;
                        }
                    }
                }
            }
            for (size_t rr = 0; rr < m; rr++)
                for (size_t i = 0; i < n; i++) y[(i0 + i) * ldy + r0 + rr] = hsum256(_mm256_add_ps(total[rr][i][0], total[rr][i][1]));
        }
    }
}

void qk_gemm8_avx2(const float *x, size_t nx, const int8_t *q, const float *scales, size_t rows, size_t cols, float *y, size_t ldy) AVX2;
void qk_gemm8_avx2(const float *x, size_t nx, const int8_t *q, const float *scales, size_t rows, size_t cols, float *y, size_t ldy) {
    // As qk_gemm4_avx2: four rows share each block of the inputs, the codes are scaled once, and each
    // input sums into two accumulators a row.
    if (nx == 1) { qk_gemv8_avx2(x, q, scales, rows, cols, y); return; }
    size_t nb = cols / 32;
    enum { R = 4 };
    __m256 total[R][GEMM_CHUNK][2];
    for (size_t i0 = 0; i0 < nx; i0 += GEMM_CHUNK) {
        size_t n = nx - i0 < GEMM_CHUNK ? nx - i0 : GEMM_CHUNK;
        for (size_t r0 = 0; r0 < rows; r0 += R) {
            size_t m = rows - r0 < R ? rows - r0 : R;
            for (size_t rr = 0; rr < m; rr++)
                for (size_t i = 0; i < n; i++) total[rr][i][0] = total[rr][i][1] = _mm256_setzero_ps();
            for (size_t b = 0; b < nb; b++) {
                for (size_t rr = 0; rr < m; rr++) {
                    const int8_t *qb = q + (r0 + rr) * cols + 32 * b;
                    __m256 scale = _mm256_set1_ps(scales[(r0 + rr) * nb + b]);
                    __m256 w[4];
                    load_q8_block(qb, w);
                    for (int k = 0; k < 4; k++) w[k] = _mm256_mul_ps(w[k], scale);
                    for (size_t i = 0; i < n; i++) {
                        const float *xb = x + (i0 + i) * cols + 32 * b;
                        __m256 a = total[rr][i][0], c = total[rr][i][1];
                        a = _mm256_fmadd_ps(w[0], _mm256_loadu_ps(xb), a);
                        c = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(xb + 8), c);
                        a = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(xb + 16), a);
                        c = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(xb + 24), c);
                        total[rr][i][0] = a;
                        total[rr][i][1] = c;
                    }
                }
            }
            for (size_t rr = 0; rr < m; rr++)
                for (size_t i = 0; i < n; i++) y[(i0 + i) * ldy + r0 + rr] = hsum256(_mm256_add_ps(total[rr][i][0], total[rr][i][1]));
        }
    }
}

void qk_gemm_bf16_avx2(const float *x, size_t nx, const uint16_t *w, size_t rows, size_t cols, float *y, size_t ldy) AVX2;
void qk_gemm_bf16_avx2(const float *x, size_t nx, const uint16_t *w, size_t rows, size_t cols, float *y, size_t ldy) {
    if (nx == 1) { qk_gemv_bf16_avx2(x, w, rows, cols, y); return; }
    size_t c16 = cols & ~(size_t)15;
    __m256 acc[GEMM_CHUNK];
    for (size_t i0 = 0; i0 < nx; i0 += GEMM_CHUNK) {
        size_t n = nx - i0 < GEMM_CHUNK ? nx - i0 : GEMM_CHUNK;
        for (size_t r = 0; r < rows; r++) {
            const uint16_t *wr = w + r * cols;
            for (size_t i = 0; i < n; i++) acc[i] = _mm256_setzero_ps();
            for (size_t j = 0; j < c16; j += 16) {
                __m256 w0 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(wr + j))), 16));
                __m256 w1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(wr + j + 8))), 16));
                for (size_t i = 0; i < n; i++) {
                    const float *xj = x + (i0 + i) * cols + j;
                    acc[i] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xj + 8), _mm256_fmadd_ps(w0, _mm256_loadu_ps(xj), acc[i]));
                }
            }
            for (size_t i = 0; i < n; i++) {
                float tail = 0.0f;
                qk_gemv_bf16_reference(x + (i0 + i) * cols + c16, wr + c16, 1, cols - c16, &tail);
                y[(i0 + i) * ldy + r] = hsum256(acc[i]) + tail;
            }
        }
    }
}

#else
// Not x86-64: every entry point runs the reference (qk_cpu_supports reports 0 for the vector levels).
void qk_gemv4_prepare_avx2(const float *x, size_t cols, float *xp) { qk_gemv4_prepare_reference(x, cols, xp); }
void qk_gemv4_avx2(const float *x, const float *xp, const uint8_t *p, const qk_block_scales *s, size_t fb, size_t rows, size_t cols,
                   size_t bs, const float *code, float *y) { qk_gemv4_reference(x, xp, p, s, fb, rows, cols, bs, code, y); }
void qk_gemv8_avx2(const float *x, const int8_t *q, const float *s, size_t rows, size_t cols, float *y) { qk_gemv8_reference(x, q, s, rows, cols, y); }
void qk_gemv_bf16_avx2(const float *x, const uint16_t *w, size_t rows, size_t cols, float *y) { qk_gemv_bf16_reference(x, w, rows, cols, y); }
void qk_gemm4_avx2(const float *x, const float *xp, size_t nx, const uint8_t *p, const qk_block_scales *s, size_t fb, size_t rows,
                   size_t cols, size_t bs, const float *code, float *y, size_t ldy) { qk_gemm4_reference(x, xp, nx, p, s, fb, rows, cols, bs, code, y, ldy); }
void qk_gemm8_avx2(const float *x, size_t nx, const int8_t *q, const float *s, size_t rows, size_t cols, float *y, size_t ldy) { qk_gemm8_reference(x, nx, q, s, rows, cols, y, ldy); }
void qk_gemm_bf16_avx2(const float *x, size_t nx, const uint16_t *w, size_t rows, size_t cols, float *y, size_t ldy) { qk_gemm_bf16_reference(x, nx, w, rows, cols, y, ldy); }
#endif
