// AVX2 and AVX-512 versions of the 4-bit kernels. Each vector loop hands its tail to the scalar
// reference, so both share one definition of the edge cases. Compiled for any x86-64; the functions
// carry their own target attributes and run only after qk_cpu_supports() said yes.
#pragma clang fp contract(off)
#include "CKernels.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#include <math.h>

#define AVX2 __attribute__((target("avx2,fma")))
#define AVX512 __attribute__((target("avx512f,avx2,fma")))

// ---------------------------------------------------------------------------------------------
// Quantize
// ---------------------------------------------------------------------------------------------

AVX2 static float absmax_avx2(const float *x, size_t n, int *bad) {
    const __m256 signmask = _mm256_set1_ps(-0.0f);
    const __m256 big = _mm256_set1_ps(3.4028234663852886e38f);
    __m256 m = _mm256_setzero_ps();
    __m256 notfinite = _mm256_setzero_ps();
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 a = _mm256_andnot_ps(signmask, _mm256_loadu_ps(x + i));
        notfinite = _mm256_or_ps(notfinite, _mm256_cmp_ps(a, big, _CMP_NLE_UQ));  // NaN or > max
        m = _mm256_max_ps(m, a);
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, m);
    float r = 0.0f;
    for (int k = 0; k < 8; k++) r = lanes[k] > r ? lanes[k] : r;
    int b = _mm256_movemask_ps(notfinite) != 0;
    for (; i < n; i++) {
        float a = fabsf(x[i]);
        b |= !(a <= 3.4028234663852886e38f);
        r = a > r ? a : r;
    }
    *bad = b;
    return r;
}

long long qk_quantize4_avx2(const float *x, size_t n, size_t blocksize, const float *thresholds,
                            const uint8_t *remap, uint8_t *packed, float *absmax) AVX2;
long long qk_quantize4_avx2(const float *x, size_t n, size_t blocksize, const float *thresholds,
                            const uint8_t *remap, uint8_t *packed, float *absmax) {
    size_t full = n / blocksize;
    __m256 t[15];
    for (int k = 0; k < 15; k++) t[k] = _mm256_set1_ps(thresholds[k]);
    const __m256 one = _mm256_set1_ps(1.0f), minus_one = _mm256_set1_ps(-1.0f);
    for (size_t b = 0; b < full; b++) {
        const float *xb = x + b * blocksize;
        uint8_t *pb = packed + b * blocksize / 2;
        int bad = 0;
        float m = absmax_avx2(xb, blocksize, &bad);
        if (bad) return (long long)b;
        absmax[b] = m;
        __m256 scale = _mm256_set1_ps(1.0f / (m > 1e-38f ? m : 1e-38f));
        size_t i = 0;
        for (; i + 8 <= blocksize; i += 8) {
            __m256 s = _mm256_mul_ps(_mm256_loadu_ps(xb + i), scale);
            s = _mm256_min_ps(_mm256_max_ps(s, minus_one), one);
            __m256i cnt = _mm256_setzero_si256();
            for (int k = 0; k < 15; k++)
                cnt = _mm256_sub_epi32(cnt, _mm256_castps_si256(_mm256_cmp_ps(t[k], s, _CMP_LT_OQ)));
            int q[8];
            _mm256_storeu_si256((__m256i *)q, cnt);
            for (int k = 0; k < 8; k += 2)
                pb[(i + k) >> 1] = (uint8_t)((remap[q[k]] << 4) | remap[q[k + 1]]);
        }
        if (i < blocksize) {  // blocksize not a multiple of 8: finish the block in scalar code
            float sc = 1.0f / (m > 1e-38f ? m : 1e-38f);
            for (; i < blocksize; i++) {
                float s = xb[i] * sc;
                s = s < -1.0f ? -1.0f : (s > 1.0f ? 1.0f : s);
                uint8_t idx = 0;
                for (int k = 0; k < 15; k++) idx += (thresholds[k] < s);
                if ((i & 1) == 0) pb[i >> 1] = (uint8_t)(remap[idx] << 4);
                else pb[i >> 1] |= remap[idx];
            }
        }
    }
    if (full * blocksize < n) {
        size_t start = full * blocksize;
        long long r = qk_quantize4_reference(x + start, n - start, blocksize, thresholds, remap,
                                             packed + start / 2, absmax + full);
        if (r >= 0) return (long long)full;
    }
    return -1;
}

AVX512 static float absmax_avx512(const float *x, size_t n, int *bad) {
    const __m512 big = _mm512_set1_ps(3.4028234663852886e38f);
    __m512 m = _mm512_setzero_ps();
    __mmask16 notfinite = 0;
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512 a = _mm512_abs_ps(_mm512_loadu_ps(x + i));
        notfinite |= _mm512_cmp_ps_mask(a, big, _CMP_NLE_UQ);
        m = _mm512_max_ps(m, a);
    }
    float r = _mm512_reduce_max_ps(m);
    int b = notfinite != 0;
    for (; i < n; i++) {
        float a = fabsf(x[i]);
        b |= !(a <= 3.4028234663852886e38f);
        r = a > r ? a : r;
    }
    *bad = b;
    return r;
}

long long qk_quantize4_avx512(const float *x, size_t n, size_t blocksize, const float *thresholds,
                              const uint8_t *remap, uint8_t *packed, float *absmax) AVX512;
long long qk_quantize4_avx512(const float *x, size_t n, size_t blocksize, const float *thresholds,
                              const uint8_t *remap, uint8_t *packed, float *absmax) {
    if (blocksize % 16 != 0) return qk_quantize4_avx2(x, n, blocksize, thresholds, remap, packed, absmax);
    size_t full = n / blocksize;
    __m512 t[15];
    for (int k = 0; k < 15; k++) t[k] = _mm512_set1_ps(thresholds[k]);
    int remap32[16];
    for (int k = 0; k < 16; k++) remap32[k] = remap[k];
    const __m512i remapv = _mm512_loadu_si512(remap32);
    const __m512 one = _mm512_set1_ps(1.0f), minus_one = _mm512_set1_ps(-1.0f);
    const __m512i ones = _mm512_set1_epi32(1);
    for (size_t b = 0; b < full; b++) {
        const float *xb = x + b * blocksize;
        uint8_t *pb = packed + b * blocksize / 2;
        int bad = 0;
        float m = absmax_avx512(xb, blocksize, &bad);
        if (bad) return (long long)b;
        absmax[b] = m;
        __m512 scale = _mm512_set1_ps(1.0f / (m > 1e-38f ? m : 1e-38f));
        for (size_t i = 0; i < blocksize; i += 16) {
            __m512 s = _mm512_mul_ps(_mm512_loadu_ps(xb + i), scale);
            s = _mm512_min_ps(_mm512_max_ps(s, minus_one), one);
            __m512i cnt = _mm512_setzero_si512();
            for (int k = 0; k < 15; k++)
                cnt = _mm512_mask_add_epi32(cnt, _mm512_cmp_ps_mask(t[k], s, _CMP_LT_OQ), cnt, ones);
            __m512i q = _mm512_permutexvar_epi32(cnt, remapv);
            // Each 64-bit lane holds (even, odd): byte = even << 4 | odd in its low 32 bits.
            __m512i pair = _mm512_or_si512(_mm512_slli_epi64(q, 4), _mm512_srli_epi64(q, 32));
            _mm_storel_epi64((__m128i *)(pb + i / 2), _mm512_cvtepi64_epi8(pair));
        }
    }
    if (full * blocksize < n) {
        size_t start = full * blocksize;
        long long r = qk_quantize4_reference(x + start, n - start, blocksize, thresholds, remap,
                                             packed + start / 2, absmax + full);
        if (r >= 0) return (long long)full;
    }
    return -1;
}

// ---------------------------------------------------------------------------------------------
// Dequantize
// ---------------------------------------------------------------------------------------------

// 16 codebook lookups from 8 packed bytes, in element order (high nibble first).
AVX2 static inline __m256i nibbles8_avx2(const uint8_t *p, __m256i *second) {
    __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
    __m256i hi = _mm256_srli_epi32(bytes, 4);
    __m256i lo = _mm256_and_si256(bytes, _mm256_set1_epi32(0x0F));
    __m256i a = _mm256_unpacklo_epi32(hi, lo);  // h0 l0 h1 l1 | h4 l4 h5 l5
    __m256i b = _mm256_unpackhi_epi32(hi, lo);  // h2 l2 h3 l3 | h6 l6 h7 l7
    *second = _mm256_permute2x128_si256(a, b, 0x31);
    return _mm256_permute2x128_si256(a, b, 0x20);
}

AVX2 static inline __m256 lookup16_avx2(__m256i idx, __m256 lo_tab, __m256 hi_tab) {
    __m256 l = _mm256_permutevar8x32_ps(lo_tab, idx);
    __m256 h = _mm256_permutevar8x32_ps(hi_tab, idx);
    __m256 use_hi = _mm256_castsi256_ps(_mm256_cmpgt_epi32(idx, _mm256_set1_epi32(7)));
    return _mm256_blendv_ps(l, h, use_hi);
}

void qk_dequantize4_avx2(const uint8_t *packed, const float *absmax, size_t n, size_t blocksize,
                         const float *code, float *out) AVX2;
void qk_dequantize4_avx2(const uint8_t *packed, const float *absmax, size_t n, size_t blocksize,
                         const float *code, float *out) {
    if (blocksize % 16 != 0) { qk_dequantize4_reference(packed, absmax, n, blocksize, code, out); return; }
    const __m256 lo_tab = _mm256_loadu_ps(code), hi_tab = _mm256_loadu_ps(code + 8);
    size_t full = n / blocksize;
    for (size_t b = 0; b < full; b++) {
        const __m256 scale = _mm256_set1_ps(absmax[b]);
        const uint8_t *pb = packed + b * blocksize / 2;
        float *ob = out + b * blocksize;
        for (size_t i = 0; i < blocksize; i += 16) {
            __m256i second;
            __m256i first = nibbles8_avx2(pb + i / 2, &second);
            _mm256_storeu_ps(ob + i, _mm256_mul_ps(lookup16_avx2(first, lo_tab, hi_tab), scale));
            _mm256_storeu_ps(ob + i + 8, _mm256_mul_ps(lookup16_avx2(second, lo_tab, hi_tab), scale));
        }
    }
    size_t start = full * blocksize;
    if (start < n) qk_dequantize4_reference(packed + start / 2, absmax + full, n - start, blocksize, code, out + start);
}

// 32 codebook indices from 16 packed bytes, in element order, as two vectors of 16.
AVX512 static inline __m512i nibbles16_avx512(const uint8_t *p, __m512i *second) {
    __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
    __m512i hi = _mm512_srli_epi32(bytes, 4);
    __m512i lo = _mm512_and_si512(bytes, _mm512_set1_epi32(0x0F));
    const __m512i first_idx = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i second_idx = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    *second = _mm512_permutex2var_epi32(hi, second_idx, lo);
    return _mm512_permutex2var_epi32(hi, first_idx, lo);
}

void qk_dequantize4_avx512(const uint8_t *packed, const float *absmax, size_t n, size_t blocksize,
                           const float *code, float *out) AVX512;
void qk_dequantize4_avx512(const uint8_t *packed, const float *absmax, size_t n, size_t blocksize,
                           const float *code, float *out) {
    if (blocksize % 32 != 0) { qk_dequantize4_avx2(packed, absmax, n, blocksize, code, out); return; }
    const __m512 table = _mm512_loadu_ps(code);
    size_t full = n / blocksize;
    for (size_t b = 0; b < full; b++) {
        const __m512 scale = _mm512_set1_ps(absmax[b]);
        const uint8_t *pb = packed + b * blocksize / 2;
        float *ob = out + b * blocksize;
        for (size_t i = 0; i < blocksize; i += 32) {
            __m512i second;
            __m512i first = nibbles16_avx512(pb + i / 2, &second);
            _mm512_storeu_ps(ob + i, _mm512_mul_ps(_mm512_permutexvar_ps(first, table), scale));
            _mm512_storeu_ps(ob + i + 16, _mm512_mul_ps(_mm512_permutexvar_ps(second, table), scale));
        }
    }
    size_t start = full * blocksize;
    if (start < n) qk_dequantize4_reference(packed + start / 2, absmax + full, n - start, blocksize, code, out + start);
}

// ---------------------------------------------------------------------------------------------
// Fused dequantize-and-dot (one row of a 4-bit matrix times a vector: the decode step)
// ---------------------------------------------------------------------------------------------

float qk_dot4_avx2(const float *x, const uint8_t *packed, const float *absmax, size_t n, size_t blocksize,
                   const float *code) AVX2;
float qk_dot4_avx2(const float *x, const uint8_t *packed, const float *absmax, size_t n, size_t blocksize,
                   const float *code) {
    if (blocksize % 16 != 0) return qk_dot4_reference(x, packed, absmax, n, blocksize, code);
    const __m256 lo_tab = _mm256_loadu_ps(code), hi_tab = _mm256_loadu_ps(code + 8);
    __m256 total = _mm256_setzero_ps();
    size_t full = n / blocksize;
    for (size_t b = 0; b < full; b++) {
        const uint8_t *pb = packed + b * blocksize / 2;
        const float *xb = x + b * blocksize;
        __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
        for (size_t i = 0; i < blocksize; i += 16) {
            __m256i second;
            __m256i first = nibbles8_avx2(pb + i / 2, &second);
            acc0 = _mm256_fmadd_ps(lookup16_avx2(first, lo_tab, hi_tab), _mm256_loadu_ps(xb + i), acc0);
            acc1 = _mm256_fmadd_ps(lookup16_avx2(second, lo_tab, hi_tab), _mm256_loadu_ps(xb + i + 8), acc1);
        }
        total = _mm256_fmadd_ps(_mm256_add_ps(acc0, acc1), _mm256_set1_ps(absmax[b]), total);
    }
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(total), _mm256_extractf128_ps(total, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    float result = _mm_cvtss_f32(s);
    size_t start = full * blocksize;
    if (start < n) result += qk_dot4_reference(x + start, packed + start / 2, absmax + full, n - start, blocksize, code);
    return result;
}

float qk_dot4_avx512(const float *x, const uint8_t *packed, const float *absmax, size_t n, size_t blocksize,
                     const float *code) AVX512;
float qk_dot4_avx512(const float *x, const uint8_t *packed, const float *absmax, size_t n, size_t blocksize,
                     const float *code) {
    if (blocksize % 32 != 0) return qk_dot4_avx2(x, packed, absmax, n, blocksize, code);
    const __m512 table = _mm512_loadu_ps(code);
    __m512 total = _mm512_setzero_ps();
    size_t full = n / blocksize;
    for (size_t b = 0; b < full; b++) {
        const uint8_t *pb = packed + b * blocksize / 2;
        const float *xb = x + b * blocksize;
        __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
        for (size_t i = 0; i < blocksize; i += 32) {
            __m512i second;
            __m512i first = nibbles16_avx512(pb + i / 2, &second);
            acc0 = _mm512_fmadd_ps(_mm512_permutexvar_ps(first, table), _mm512_loadu_ps(xb + i), acc0);
            acc1 = _mm512_fmadd_ps(_mm512_permutexvar_ps(second, table), _mm512_loadu_ps(xb + i + 16), acc1);
        }
        total = _mm512_fmadd_ps(_mm512_add_ps(acc0, acc1), _mm512_set1_ps(absmax[b]), total);
    }
    float result = _mm512_reduce_add_ps(total);
    size_t start = full * blocksize;
    if (start < n) result += qk_dot4_reference(x + start, packed + start / 2, absmax + full, n - start, blocksize, code);
    return result;
}

#else
// Not x86-64: the vector entry points fall back to the references (qk_cpu_supports reports 0).
long long qk_quantize4_avx2(const float *x, size_t n, size_t bs, const float *t, const uint8_t *r, uint8_t *p, float *a) {
    return qk_quantize4_reference(x, n, bs, t, r, p, a);
}
long long qk_quantize4_avx512(const float *x, size_t n, size_t bs, const float *t, const uint8_t *r, uint8_t *p, float *a) {
    return qk_quantize4_reference(x, n, bs, t, r, p, a);
}
void qk_dequantize4_avx2(const uint8_t *p, const float *a, size_t n, size_t bs, const float *c, float *o) {
    qk_dequantize4_reference(p, a, n, bs, c, o);
}
void qk_dequantize4_avx512(const uint8_t *p, const float *a, size_t n, size_t bs, const float *c, float *o) {
    qk_dequantize4_reference(p, a, n, bs, c, o);
}
float qk_dot4_avx2(const float *x, const uint8_t *p, const float *a, size_t n, size_t bs, const float *c) {
    return qk_dot4_reference(x, p, a, n, bs, c);
}
float qk_dot4_avx512(const float *x, const uint8_t *p, const float *a, size_t n, size_t bs, const float *c) {
    return qk_dot4_reference(x, p, a, n, bs, c);
}
#endif
