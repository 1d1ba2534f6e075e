// bfloat16 GEMM (see CKernelsBF16.h): scalar references, which define the results, and the AVX512-BF16
// versions the training step runs. The references round and accumulate in the vector order, so the two
// agree to f32 rounding (the vector kernel adds long sums into C in blocks of 1024 values of k).
#pragma clang fp contract(off)
#include "CKernelsBF16.h"
#include <string.h>

uint16_t qk_bf16_from_float(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);  // NaN: quiet, sign kept
    if ((u & 0x7f800000u) == 0) return (uint16_t)((u >> 16) & 0x8000u);           // subnormal: signed zero
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float bf16_to_float(uint32_t h) {
    uint32_t u = h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

void qk_bf16_convert_rows_reference(const float *src, size_t rows, size_t cols, size_t ld, uint16_t *dst, size_t ldd) {
    for (size_t r = 0; r < rows; r++) {
        for (size_t c = 0; c < cols; c++) dst[r * ldd + c] = qk_bf16_from_float(src[r * ld + c]);
        if (cols & 1) dst[r * ldd + cols] = 0;
    }
}

void qk_bf16_convert_transposed_reference(const float *src, size_t rows, size_t cols, size_t ld, uint16_t *dst, size_t ldd) {
    for (size_t c = 0; c < cols; c++) {
        for (size_t r = 0; r < rows; r++) dst[c * ldd + r] = qk_bf16_from_float(src[r * ld + c]);
        if (rows & 1) dst[c * ldd + rows] = 0;
    }
}

size_t qk_bf16_packed_words(size_t k, size_t n) {
    return (n + QK_BF16_NR - 1) / QK_BF16_NR * QK_BF16_NR * ((k + 1) / 2);
}

static inline float b_at(const float *b, size_t ldb, int transposed, size_t kk, size_t j) {
    return transposed ? b[j * ldb + kk] : b[kk * ldb + j];
}

void qk_bf16_pack_b_reference(const float *b, size_t ldb, int transposed, size_t k, size_t n, size_t p0, size_t p1, uint32_t *packed) {
    size_t kp = (k + 1) / 2;
    for (size_t p = p0; p < p1; p++) {
        uint32_t *dst = packed + p * QK_BF16_NR * kp;
        for (size_t q = 0; q < kp; q++) {
            for (size_t jj = 0; jj < QK_BF16_NR; jj++) {
                size_t j = p * QK_BF16_NR + jj, k0 = 2 * q, k1 = 2 * q + 1;
                uint32_t lo = (j < n) ? qk_bf16_from_float(b_at(b, ldb, transposed, k0, j)) : 0;
                uint32_t hi = (j < n && k1 < k) ? qk_bf16_from_float(b_at(b, ldb, transposed, k1, j)) : 0;
                dst[q * QK_BF16_NR + jj] = lo | (hi << 16);
            }
        }
    }
}

void qk_bf16_gemm_reference(const uint16_t *a, size_t lda, const uint32_t *packed, size_t k, size_t n, float *c, size_t ldc,
                            size_t m0, size_t m1, size_t p0, size_t p1, float alpha, int accumulate) {
    size_t kp = (k + 1) / 2;
    for (size_t i = m0; i < m1; i++) {
        const uint16_t *row = a + i * lda;
        for (size_t p = p0; p < p1; p++) {
            const uint32_t *panel = packed + p * QK_BF16_NR * kp;
            for (size_t jj = 0; jj < QK_BF16_NR; jj++) {
                size_t j = p * QK_BF16_NR + jj;
                if (j >= n) break;
                float acc = 0.0f;
                for (size_t q = 0; q < kp; q++) {
                    uint32_t w = panel[q * QK_BF16_NR + jj];
                    float a0 = bf16_to_float(row[2 * q]);
                    float a1 = 2 * q + 1 < k ? bf16_to_float(row[2 * q + 1]) : 0.0f;
                    acc = acc + a1 * bf16_to_float(w >> 16);
                    acc = acc + a0 * bf16_to_float(w & 0xffffu);
                }
                acc = acc * alpha;
                c[i * ldc + j] = accumulate ? c[i * ldc + j] + acc : acc;
            }
        }
    }
}

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#define BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma")))

int qk_cpu_supports_bf16(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512bf16");
}

// 32 floats from p (only the first `count` < 32 read; the rest 0) as 32 bf16 in order.
BF16 static inline __m512i convert32(const float *p, size_t count) {
    __m512 lo, hi;
    if (count >= 32) {
        lo = _mm512_loadu_ps(p);
        hi = _mm512_loadu_ps(p + 16);
    } else {
        __mmask16 mlo = count >= 16 ? 0xffff : (__mmask16)((1u << count) - 1);
        __mmask16 mhi = count > 16 ? (__mmask16)((1u << (count - 16)) - 1) : 0;
        lo = _mm512_maskz_loadu_ps(mlo, p);
        hi = _mm512_maskz_loadu_ps(mhi, p + 16);
    }
    return (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
}

// In place: r[i] lane j becomes r[j] lane i (16 x 16 words).
BF16 static inline void transpose16(__m512i r[16]) {
    __m512i t[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) {
        r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    for (int i = 0; i < 2; i++) {
        for (int j = 0; j < 4; j++) {
            t[8 * i + j] = _mm512_shuffle_i32x4(r[8 * i + j], r[8 * i + j + 4], 0x88);
            t[8 * i + j + 4] = _mm512_shuffle_i32x4(r[8 * i + j], r[8 * i + j + 4], 0xdd);
        }
    }
    for (int j = 0; j < 8; j++) {
        r[j] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0x88);
        r[j + 8] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0xdd);
    }
}

// Columns [c0, c0 + 16) of rows 2i and 2i + 1 as 16 words (low half from the even row); rows past `rows`
// and columns past `cols` read as 0.
BF16 static inline __m512i row_pair(const float *src, size_t ld, size_t r, size_t rows, __mmask16 m) {
    __m512 e = r < rows ? _mm512_maskz_loadu_ps(m, src + r * ld) : _mm512_setzero_ps();
    __m512 o = r + 1 < rows ? _mm512_maskz_loadu_ps(m, src + (r + 1) * ld) : _mm512_setzero_ps();
    __m512i lo = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(e));
    __m512i hi = _mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(o)), 16);
    return _mm512_or_si512(lo, hi);
}

void qk_bf16_convert_transposed_avx512bf16(const float *src, size_t rows, size_t cols, size_t ld, uint16_t *dst, size_t ldd) BF16;
void qk_bf16_convert_transposed_avx512bf16(const float *src, size_t rows, size_t cols, size_t ld, uint16_t *dst, size_t ldd) {
    size_t even = (rows + 1) & ~(size_t)1;
    for (size_t r0 = 0; r0 < even; r0 += 32) {
        size_t valid = even - r0 < 32 ? even - r0 : 32;
        __mmask32 store = valid == 32 ? 0xffffffffu : (__mmask32)((1u << valid) - 1);
        for (size_t c0 = 0; c0 < cols; c0 += 16) {
            size_t width = cols - c0 < 16 ? cols - c0 : 16;
            __mmask16 m = width == 16 ? 0xffff : (__mmask16)((1u << width) - 1);
            __m512i v[16];
            for (int i = 0; i < 16; i++) v[i] = row_pair(src + c0, ld, r0 + 2 * i, rows, m);
            transpose16(v);
            for (size_t c = 0; c < width; c++) _mm512_mask_storeu_epi16(dst + (c0 + c) * ldd + r0, store, v[c]);
        }
    }
}

void qk_bf16_convert_rows_avx512bf16(const float *src, size_t rows, size_t cols, size_t ld, uint16_t *dst, size_t ldd) BF16;
void qk_bf16_convert_rows_avx512bf16(const float *src, size_t rows, size_t cols, size_t ld, uint16_t *dst, size_t ldd) {
    size_t even = (cols + 1) & ~(size_t)1;
    for (size_t r = 0; r < rows; r++) {
        const float *s = src + r * ld;
        uint16_t *d = dst + r * ldd;
        size_t c = 0;
        for (; c + 32 <= cols; c += 32) _mm512_storeu_si512(d + c, convert32(s + c, 32));
        if (c < even) {
            // The tail, with the zero that pads an odd row (the masked load reads 0 there).
            __m512i v = convert32(s + c, cols - c);
            _mm512_mask_storeu_epi16(d + c, (__mmask32)((1ull << (even - c)) - 1), v);
        }
    }
}

void qk_bf16_pack_b_avx512bf16(const float *b, size_t ldb, int transposed, size_t k, size_t n, size_t p0, size_t p1, uint32_t *packed) BF16;
void qk_bf16_pack_b_avx512bf16(const float *b, size_t ldb, int transposed, size_t k, size_t n, size_t p0, size_t p1, uint32_t *packed) {
    size_t kp = (k + 1) / 2;
    for (size_t p = p0; p < p1; p++) {
        uint32_t *dst = packed + p * QK_BF16_NR * kp;
        size_t j0 = p * QK_BF16_NR, cols = n - j0 < QK_BF16_NR ? n - j0 : QK_BF16_NR;
        if (transposed) {
            // Column j of B is row j of the stored matrix, its pairs consecutive: 16 rows x 16 pairs
            // converted, transposed in registers, and stored as 16 k-pairs of 16 columns.
            for (size_t half = 0; half < 2; half++) {
                for (size_t q = 0; q < kp; q += 16) {
                    size_t left = k - 2 * q;
                    __m512i v[16];
                    for (size_t i = 0; i < 16; i++) {
                        size_t jj = 16 * half + i;
                        v[i] = jj < cols ? convert32(b + (j0 + jj) * ldb + 2 * q, left < 32 ? left : 32) : _mm512_setzero_si512();
                    }
                    transpose16(v);
                    size_t m = kp - q < 16 ? kp - q : 16;
                    for (size_t t = 0; t < m; t++) _mm512_storeu_si512(dst + (q + t) * QK_BF16_NR + 16 * half, v[t]);
                }
            }
        } else {
            // Rows 2q and 2q + 1 of B interleaved: low half from the even row, high half from the odd.
            __mmask16 mlo = cols >= 16 ? 0xffff : (__mmask16)((1u << cols) - 1);
            __mmask16 mhi = cols > 16 ? (__mmask16)((1u << (cols - 16)) - 1) : 0;
            for (size_t q = 0; q < kp; q++) {
                const float *r0 = b + 2 * q * ldb + j0;
                int odd = 2 * q + 1 < k;
                for (int half = 0; half < 2; half++) {
                    __mmask16 m = half ? mhi : mlo;
                    __m512 e = _mm512_maskz_loadu_ps(m, r0 + 16 * half);
                    __m512 o = odd ? _mm512_maskz_loadu_ps(m, r0 + ldb + 16 * half) : _mm512_setzero_ps();
                    __m512i lo = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(e));
                    __m512i hi = _mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(o)), 16);
                    _mm512_storeu_si512(dst + q * QK_BF16_NR + 16 * half, _mm512_or_si512(lo, hi));
                }
            }
        }
    }
}

// MR x 32 block of C from MR rows of A and one panel of B, over all k-pairs. Inlined with a constant
// MR, so the accumulators stay in registers (2 * MR of the 32 zmm).
BF16 static inline __attribute__((always_inline)) void micro(const int MR, const uint16_t *a, size_t lda, const uint32_t *panel,
                                                              size_t kp, float *c, size_t ldc, __mmask16 m0, __mmask16 m1,
                                                              float alpha, int accumulate) {
    __m512 c0[QK_BF16_MR], c1[QK_BF16_MR];
#pragma clang loop unroll(full)
    for (int i = 0; i < MR; i++) {
        c0[i] = _mm512_setzero_ps();
        c1[i] = _mm512_setzero_ps();
    }
    for (size_t q = 0; q < kp; q++) {
        __m512bh b0 = (__m512bh)_mm512_loadu_si512(panel + q * QK_BF16_NR);
        __m512bh b1 = (__m512bh)_mm512_loadu_si512(panel + q * QK_BF16_NR + 16);
#pragma clang loop unroll(full)
        for (int i = 0; i < MR; i++) {
            int32_t pair;
            memcpy(&pair, a + i * lda + 2 * q, 4);
            __m512bh av = (__m512bh)_mm512_set1_epi32(pair);
            c0[i] = _mm512_dpbf16_ps(c0[i], av, b0);
            c1[i] = _mm512_dpbf16_ps(c1[i], av, b1);
        }
    }
#pragma clang loop unroll(full)
    for (int i = 0; i < MR; i++) {
        float *row = c + i * ldc;
        if (alpha != 1.0f) {
            c0[i] = _mm512_mul_ps(c0[i], _mm512_set1_ps(alpha));
            c1[i] = _mm512_mul_ps(c1[i], _mm512_set1_ps(alpha));
        }
        if (accumulate) {
            c0[i] = _mm512_add_ps(_mm512_maskz_loadu_ps(m0, row), c0[i]);
            c1[i] = _mm512_add_ps(_mm512_maskz_loadu_ps(m1, row + 16), c1[i]);
        }
        _mm512_mask_storeu_ps(row, m0, c0[i]);
        _mm512_mask_storeu_ps(row + 16, m1, c1[i]);
    }
}

#define MICRO(R)                                                                                              \
    BF16 static void micro##R(const uint16_t *a, size_t lda, const uint32_t *panel, size_t kp, float *c, size_t ldc, \
                              __mmask16 m0, __mmask16 m1, float alpha, int acc) {                            \
        micro(R, a, lda, panel, kp, c, ldc, m0, m1, alpha, acc);                                              \
    }
MICRO(1) MICRO(2) MICRO(3) MICRO(4) MICRO(5) MICRO(6) MICRO(7) MICRO(8) MICRO(9) MICRO(10) MICRO(11) MICRO(12)
typedef void (*micro_fn)(const uint16_t *, size_t, const uint32_t *, size_t, float *, size_t, __mmask16, __mmask16, float, int);
static const micro_fn micros[QK_BF16_MR + 1] = {0,       micro1,  micro2,  micro3, micro4, micro5, micro6,
                                                micro7,  micro8,  micro9,  micro10, micro11, micro12};

void qk_bf16_gemm_avx512bf16(const uint16_t *a, size_t lda, const uint32_t *packed, size_t k, size_t n, float *c, size_t ldc,
                             size_t m0, size_t m1, size_t p0, size_t p1, float alpha, int accumulate) BF16;
void qk_bf16_gemm_avx512bf16(const uint16_t *a, size_t lda, const uint32_t *packed, size_t k, size_t n, float *c, size_t ldc,
                             size_t m0, size_t m1, size_t p0, size_t p1, float alpha, int accumulate) {
    size_t kp = (k + 1) / 2;
    // Blocks of up to 512 k-pairs (1024 values of k): a block of A rows stays in L2 and a block of B
    // (N x 1024 values) in L3 while the panels stream by; C takes the blocks' partial sums in turn.
    // Without this, a 4096 x 4096 x 4096 product re-read all of B from memory for every 12 rows of A
    // (275 GFLOP/s against 400 at 2048).
    const size_t block = 512;
    for (size_t q0 = 0; q0 < kp; q0 += block) {
        size_t qn = kp - q0 < block ? kp - q0 : block;
        int acc = q0 == 0 ? accumulate : 1;
        // Rows of A per pass over the panels: about 192 KB of A.
        size_t mc = (192 * 1024) / (4 * qn) / QK_BF16_MR * QK_BF16_MR;
        if (mc < QK_BF16_MR) mc = QK_BF16_MR;
        if (mc > 16 * QK_BF16_MR) mc = 16 * QK_BF16_MR;
        for (size_t i0 = m0; i0 < m1; i0 += mc) {
            size_t i1 = i0 + mc < m1 ? i0 + mc : m1;
            for (size_t p = p0; p < p1; p++) {
                size_t j0 = p * QK_BF16_NR;
                if (j0 >= n) break;
                size_t cols = n - j0 < QK_BF16_NR ? n - j0 : QK_BF16_NR;
                __mmask16 mk0 = cols >= 16 ? 0xffff : (__mmask16)((1u << cols) - 1);
                __mmask16 mk1 = cols > 16 ? (cols >= 32 ? 0xffff : (__mmask16)((1u << (cols - 16)) - 1)) : 0;
                const uint32_t *panel = packed + p * QK_BF16_NR * kp + q0 * QK_BF16_NR;
                for (size_t i = i0; i < i1; i += QK_BF16_MR) {
                    size_t mr = i1 - i < QK_BF16_MR ? i1 - i : QK_BF16_MR;
                    micros[mr](a + i * lda + 2 * q0, lda, panel, qn, c + i * ldc + j0, ldc, mk0, mk1, alpha, acc);
                }
            }
        }
    }
}

#else
int qk_cpu_supports_bf16(void) { return 0; }
void qk_bf16_convert_transposed_avx512bf16(const float *src, size_t rows, size_t cols, size_t ld, uint16_t *dst, size_t ldd) {
    qk_bf16_convert_transposed_reference(src, rows, cols, ld, dst, ldd);
}
void qk_bf16_convert_rows_avx512bf16(const float *src, size_t rows, size_t cols, size_t ld, uint16_t *dst, size_t ldd) {
    qk_bf16_convert_rows_reference(src, rows, cols, ld, dst, ldd);
}
void qk_bf16_pack_b_avx512bf16(const float *b, size_t ldb, int transposed, size_t k, size_t n, size_t p0, size_t p1, uint32_t *packed) {
    qk_bf16_pack_b_reference(b, ldb, transposed, k, n, p0, p1, packed);
}
void qk_bf16_gemm_avx512bf16(const uint16_t *a, size_t lda, const uint32_t *packed, size_t k, size_t n, float *c, size_t ldc,
                             size_t m0, size_t m1, size_t p0, size_t p1, float alpha, int accumulate) {
    qk_bf16_gemm_reference(a, lda, packed, k, n, c, ldc, m0, m1, p0, p1, alpha, accumulate);
}
#endif
