// AVX2 and AVX-512 row operations with a vector exp (Cody-Waite range reduction to 2^k · e^r,
// |r| <= ln2/2, degree-6 polynomial; relative error about 2 ulp over the range softmax uses), and the
// scalar reference for tails.
#include "CKernels.h"
#include <math.h>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#define AVX2 __attribute__((target("avx2,fma")))
#define AVX512 __attribute__((target("avx512f,avx2,fma")))

// ---- exp ----------------------------------------------------------------------------------------
#define EXP_HI 88.3762626647949f
#define EXP_LO -87.3365478515625f
#define LOG2EF 1.44269504088896341f
#define LN2_HI 0.693359375f
#define LN2_LO -2.12194440e-4f
#define P0 1.9875691500E-4f
#define P1 1.3981999507E-3f
#define P2 8.3334519073E-3f
#define P3 4.1665795894E-2f
#define P4 1.6666665459E-1f
#define P5 5.0000001201E-1f

AVX512 static inline __m512 exp512(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(EXP_LO)), _mm512_set1_ps(EXP_HI));
    __m512 fx = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(LOG2EF)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(LN2_HI), x);
    x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(LN2_LO), x);
    __m512 y = _mm512_set1_ps(P0);
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(P1));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(P2));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(P3));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(P4));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(P5));
    __m512 x2 = _mm512_mul_ps(x, x);
    y = _mm512_fmadd_ps(y, x2, _mm512_add_ps(x, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(y, fx);
}

AVX2 static inline __m256 exp256(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(EXP_LO)), _mm256_set1_ps(EXP_HI));
    __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(LOG2EF)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(LN2_HI), x);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(LN2_LO), x);
    __m256 y = _mm256_set1_ps(P0);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(P1));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(P2));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(P3));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(P4));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(P5));
    __m256 x2 = _mm256_mul_ps(x, x);
    y = _mm256_fmadd_ps(y, x2, _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

// ---- softmax ------------------------------------------------------------------------------------
void qk_softmax_row_avx512(float *row, size_t visible, size_t length) AVX512;
void qk_softmax_row_avx512(float *row, size_t visible, size_t length) {
    size_t j = 0;
    __m512 vm = _mm512_set1_ps(-INFINITY);
    for (; j + 16 <= visible; j += 16) vm = _mm512_max_ps(vm, _mm512_loadu_ps(row + j));
    float m = _mm512_reduce_max_ps(vm);
    for (; j < visible; j++) m = row[j] > m ? row[j] : m;
    __m512 mm = _mm512_set1_ps(m), vs = _mm512_setzero_ps();
    for (j = 0; j + 16 <= visible; j += 16) {
        __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(row + j), mm));
        _mm512_storeu_ps(row + j, e);
        vs = _mm512_add_ps(vs, e);
    }
    float sum = _mm512_reduce_add_ps(vs);
    for (; j < visible; j++) { row[j] = expf(row[j] - m); sum += row[j]; }
    __m512 inv = _mm512_set1_ps(1.0f / sum);
    for (j = 0; j + 16 <= visible; j += 16) _mm512_storeu_ps(row + j, _mm512_mul_ps(_mm512_loadu_ps(row + j), inv));
    for (; j < visible; j++) row[j] *= 1.0f / sum;
    for (j = visible; j < length; j++) row[j] = 0.0f;
}

// exp(row[j] - m) in place for j < visible, m the largest; returns their sum and sets *max = m.
AVX2 static float exp_row_avx2(float *row, size_t visible, float *max) {
    size_t j = 0;
    __m256 vm = _mm256_set1_ps(-INFINITY);
    for (; j + 8 <= visible; j += 8) vm = _mm256_max_ps(vm, _mm256_loadu_ps(row + j));
    float lanes[8];
    _mm256_storeu_ps(lanes, vm);
    float m = -INFINITY;
    for (int k = 0; k < 8; k++) m = lanes[k] > m ? lanes[k] : m;
    for (; j < visible; j++) m = row[j] > m ? row[j] : m;
    __m256 mm = _mm256_set1_ps(m), vs = _mm256_setzero_ps();
    for (j = 0; j + 8 <= visible; j += 8) {
        __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(row + j), mm));
        _mm256_storeu_ps(row + j, e);
        vs = _mm256_add_ps(vs, e);
    }
    _mm256_storeu_ps(lanes, vs);
    float sum = 0.0f;
    for (int k = 0; k < 8; k++) sum += lanes[k];
    for (; j < visible; j++) { row[j] = expf(row[j] - m); sum += row[j]; }
    *max = m;
    return sum;
}

void qk_softmax_row_avx2(float *row, size_t visible, size_t length) AVX2;
void qk_softmax_row_avx2(float *row, size_t visible, size_t length) {
    float m;
    float sum = exp_row_avx2(row, visible, &m);
    size_t j;
    __m256 inv = _mm256_set1_ps(1.0f / sum);
    for (j = 0; j + 8 <= visible; j += 8) _mm256_storeu_ps(row + j, _mm256_mul_ps(_mm256_loadu_ps(row + j), inv));
    for (; j < visible; j++) row[j] *= 1.0f / sum;
    for (j = visible; j < length; j++) row[j] = 0.0f;
}

// ---- SwiGLU ---------------------------------------------------------------------------------------
void qk_swiglu_avx512(float *a, const float *g, const float *u, size_t n) AVX512;
void qk_swiglu_avx512(float *a, const float *g, const float *u, size_t n) {
    size_t i = 0;
    const __m512 one = _mm512_set1_ps(1.0f);
    for (; i + 16 <= n; i += 16) {
        __m512 x = _mm512_loadu_ps(g + i);
        __m512 s = _mm512_div_ps(x, _mm512_add_ps(one, exp512(_mm512_sub_ps(_mm512_setzero_ps(), x))));
        _mm512_storeu_ps(a + i, _mm512_mul_ps(s, _mm512_loadu_ps(u + i)));
    }
    qk_swiglu_reference(a + i, g + i, u + i, n - i);
}

void qk_swiglu_avx2(float *a, const float *g, const float *u, size_t n) AVX2;
void qk_swiglu_avx2(float *a, const float *g, const float *u, size_t n) {
    size_t i = 0;
    const __m256 one = _mm256_set1_ps(1.0f);
    for (; i + 8 <= n; i += 8) {
        __m256 x = _mm256_loadu_ps(g + i);
        __m256 s = _mm256_div_ps(x, _mm256_add_ps(one, exp256(_mm256_sub_ps(_mm256_setzero_ps(), x))));
        _mm256_storeu_ps(a + i, _mm256_mul_ps(s, _mm256_loadu_ps(u + i)));
    }
    qk_swiglu_reference(a + i, g + i, u + i, n - i);
}

void qk_swiglu_backward_avx512(float *dg, float *du, const float *da, const float *g, const float *u, size_t n) AVX512;
void qk_swiglu_backward_avx512(float *dg, float *du, const float *da, const float *g, const float *u, size_t n) {
    size_t i = 0;
    const __m512 one = _mm512_set1_ps(1.0f);
    for (; i + 16 <= n; i += 16) {
        __m512 x = _mm512_loadu_ps(g + i), d = _mm512_loadu_ps(da + i);
        __m512 s = _mm512_div_ps(one, _mm512_add_ps(one, exp512(_mm512_sub_ps(_mm512_setzero_ps(), x))));
        __m512 deriv = _mm512_mul_ps(s, _mm512_fmadd_ps(x, _mm512_sub_ps(one, s), one));
        _mm512_storeu_ps(dg + i, _mm512_mul_ps(_mm512_mul_ps(d, _mm512_loadu_ps(u + i)), deriv));
        _mm512_storeu_ps(du + i, _mm512_mul_ps(d, _mm512_mul_ps(x, s)));
    }
    qk_swiglu_backward_reference(dg + i, du + i, da + i, g + i, u + i, n - i);
}

/* GeGLU (tanh approximation) as x * sigmoid(2u), which equals 0.5 x (1 + tanh(u)), u = beta (x + kappa x^3):
   the sigmoid through the same exp as SwiGLU's. The derivative: s + x s (1 - s) 2 beta (1 + 3 kappa x^2). */
void qk_geglu_avx512(float *a, const float *g, const float *u, size_t n) AVX512;
void qk_geglu_avx512(float *a, const float *g, const float *u, size_t n) {
    size_t i = 0;
    const __m512 one = _mm512_set1_ps(1.0f), m2beta = _mm512_set1_ps(-2.0f * 0.7978845608028654f), kappa = _mm512_set1_ps(0.044715f);
    for (; i + 16 <= n; i += 16) {
        __m512 x = _mm512_loadu_ps(g + i);
        __m512 z = _mm512_mul_ps(m2beta, _mm512_fmadd_ps(_mm512_mul_ps(kappa, x), _mm512_mul_ps(x, x), x));
        __m512 s = _mm512_div_ps(x, _mm512_add_ps(one, exp512(z)));
        _mm512_storeu_ps(a + i, _mm512_mul_ps(s, _mm512_loadu_ps(u + i)));
    }
    qk_geglu_reference(a + i, g + i, u + i, n - i);
}

void qk_geglu_avx2(float *a, const float *g, const float *u, size_t n) AVX2;
void qk_geglu_avx2(float *a, const float *g, const float *u, size_t n) {
    size_t i = 0;
    const __m256 one = _mm256_set1_ps(1.0f), m2beta = _mm256_set1_ps(-2.0f * 0.7978845608028654f), kappa = _mm256_set1_ps(0.044715f);
    for (; i + 8 <= n; i += 8) {
        __m256 x = _mm256_loadu_ps(g + i);
        __m256 z = _mm256_mul_ps(m2beta, _mm256_fmadd_ps(_mm256_mul_ps(kappa, x), _mm256_mul_ps(x, x), x));
        __m256 s = _mm256_div_ps(x, _mm256_add_ps(one, exp256(z)));
        _mm256_storeu_ps(a + i, _mm256_mul_ps(s, _mm256_loadu_ps(u + i)));
    }
    qk_geglu_reference(a + i, g + i, u + i, n - i);
}

void qk_geglu_backward_avx512(float *dg, float *du, const float *da, const float *g, const float *u, size_t n) AVX512;
void qk_geglu_backward_avx512(float *dg, float *du, const float *da, const float *g, const float *u, size_t n) {
    size_t i = 0;
    const __m512 one = _mm512_set1_ps(1.0f), m2beta = _mm512_set1_ps(-2.0f * 0.7978845608028654f), kappa = _mm512_set1_ps(0.044715f);
    const __m512 twobeta = _mm512_set1_ps(2.0f * 0.7978845608028654f), kappa3 = _mm512_set1_ps(3.0f * 0.044715f);
    for (; i + 16 <= n; i += 16) {
        __m512 x = _mm512_loadu_ps(g + i), d = _mm512_loadu_ps(da + i);
        __m512 x2 = _mm512_mul_ps(x, x);
        __m512 z = _mm512_mul_ps(m2beta, _mm512_fmadd_ps(_mm512_mul_ps(kappa, x), x2, x));
        __m512 s = _mm512_div_ps(one, _mm512_add_ps(one, exp512(z)));
        __m512 dz = _mm512_mul_ps(twobeta, _mm512_fmadd_ps(kappa3, x2, one));
        __m512 slope = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_mul_ps(x, s), _mm512_sub_ps(one, s)), dz, s);
        _mm512_storeu_ps(dg + i, _mm512_mul_ps(_mm512_mul_ps(d, _mm512_loadu_ps(u + i)), slope));
        _mm512_storeu_ps(du + i, _mm512_mul_ps(d, _mm512_mul_ps(x, s)));
    }
    qk_geglu_backward_reference(dg + i, du + i, da + i, g + i, u + i, n - i);
}

void qk_geglu_backward_avx2(float *dg, float *du, const float *da, const float *g, const float *u, size_t n) AVX2;
void qk_geglu_backward_avx2(float *dg, float *du, const float *da, const float *g, const float *u, size_t n) {
    size_t i = 0;
    const __m256 one = _mm256_set1_ps(1.0f), m2beta = _mm256_set1_ps(-2.0f * 0.7978845608028654f), kappa = _mm256_set1_ps(0.044715f);
    const __m256 twobeta = _mm256_set1_ps(2.0f * 0.7978845608028654f), kappa3 = _mm256_set1_ps(3.0f * 0.044715f);
    for (; i + 8 <= n; i += 8) {
        __m256 x = _mm256_loadu_ps(g + i), d = _mm256_loadu_ps(da + i);
        __m256 x2 = _mm256_mul_ps(x, x);
        __m256 z = _mm256_mul_ps(m2beta, _mm256_fmadd_ps(_mm256_mul_ps(kappa, x), x2, x));
        __m256 s = _mm256_div_ps(one, _mm256_add_ps(one, exp256(z)));
        __m256 dz = _mm256_mul_ps(twobeta, _mm256_fmadd_ps(kappa3, x2, one));
        __m256 slope = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_mul_ps(x, s), _mm256_sub_ps(one, s)), dz, s);
        _mm256_storeu_ps(dg + i, _mm256_mul_ps(_mm256_mul_ps(d, _mm256_loadu_ps(u + i)), slope));
        _mm256_storeu_ps(du + i, _mm256_mul_ps(d, _mm256_mul_ps(x, s)));
    }
    qk_geglu_backward_reference(dg + i, du + i, da + i, g + i, u + i, n - i);
}

void qk_swiglu_backward_avx2(float *dg, float *du, const float *da, const float *g, const float *u, size_t n) AVX2;
void qk_swiglu_backward_avx2(float *dg, float *du, const float *da, const float *g, const float *u, size_t n) {
    size_t i = 0;
    const __m256 one = _mm256_set1_ps(1.0f);
    for (; i + 8 <= n; i += 8) {
        __m256 x = _mm256_loadu_ps(g + i), d = _mm256_loadu_ps(da + i);
        __m256 s = _mm256_div_ps(one, _mm256_add_ps(one, exp256(_mm256_sub_ps(_mm256_setzero_ps(), x))));
        __m256 deriv = _mm256_mul_ps(s, _mm256_fmadd_ps(x, _mm256_sub_ps(one, s), one));
        _mm256_storeu_ps(dg + i, _mm256_mul_ps(_mm256_mul_ps(d, _mm256_loadu_ps(u + i)), deriv));
        _mm256_storeu_ps(du + i, _mm256_mul_ps(d, _mm256_mul_ps(x, s)));
    }
    qk_swiglu_backward_reference(dg + i, du + i, da + i, g + i, u + i, n - i);
}

// ---- cross-entropy ------------------------------------------------------------------------------
double qk_cross_entropy_row_avx512(float *x, size_t vocab, size_t target, float scale) AVX512;
double qk_cross_entropy_row_avx512(float *x, size_t vocab, size_t target, float scale) {
    size_t j = 0;
    __m512 vm = _mm512_set1_ps(-INFINITY);
    for (; j + 16 <= vocab; j += 16) vm = _mm512_max_ps(vm, _mm512_loadu_ps(x + j));
    float m = _mm512_reduce_max_ps(vm);
    for (; j < vocab; j++) m = x[j] > m ? x[j] : m;
    float target_logit = x[target];
    __m512 mm = _mm512_set1_ps(m), vs = _mm512_setzero_ps();
    for (j = 0; j + 16 <= vocab; j += 16) {
        __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(x + j), mm));
        _mm512_storeu_ps(x + j, e);
        vs = _mm512_add_ps(vs, e);
    }
    double sum = (double)_mm512_reduce_add_ps(vs);
    for (; j < vocab; j++) { x[j] = expf(x[j] - m); sum += x[j]; }
    double loss = (double)m + log(sum) - (double)target_logit;
    __m512 inv = _mm512_set1_ps((float)(1.0 / sum) * scale);
    for (j = 0; j + 16 <= vocab; j += 16) _mm512_storeu_ps(x + j, _mm512_mul_ps(_mm512_loadu_ps(x + j), inv));
    for (; j < vocab; j++) x[j] *= (float)(1.0 / sum) * scale;
    x[target] -= scale;
    return loss;
}

double qk_cross_entropy_row_avx2(float *x, size_t vocab, size_t target, float scale) AVX2;
double qk_cross_entropy_row_avx2(float *x, size_t vocab, size_t target, float scale) {
    size_t j = 0;
    __m256 vm = _mm256_set1_ps(-INFINITY);
    for (; j + 8 <= vocab; j += 8) vm = _mm256_max_ps(vm, _mm256_loadu_ps(x + j));
    float lanes[8];
    _mm256_storeu_ps(lanes, vm);
    float m = -INFINITY;
    for (int k = 0; k < 8; k++) m = lanes[k] > m ? lanes[k] : m;
    for (; j < vocab; j++) m = x[j] > m ? x[j] : m;
    float target_logit = x[target];
    __m256 mm = _mm256_set1_ps(m), vs = _mm256_setzero_ps();
    for (j = 0; j + 8 <= vocab; j += 8) {
        __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(x + j), mm));
        _mm256_storeu_ps(x + j, e);
        vs = _mm256_add_ps(vs, e);
    }
    _mm256_storeu_ps(lanes, vs);
    double sum = 0.0;
    for (int k = 0; k < 8; k++) sum += lanes[k];
    for (; j < vocab; j++) { x[j] = expf(x[j] - m); sum += x[j]; }
    double loss = (double)m + log(sum) - (double)target_logit;
    __m256 inv = _mm256_set1_ps((float)(1.0 / sum) * scale);
    for (j = 0; j + 8 <= vocab; j += 8) _mm256_storeu_ps(x + j, _mm256_mul_ps(_mm256_loadu_ps(x + j), inv));
    for (; j < vocab; j++) x[j] *= (float)(1.0 / sum) * scale;
    x[target] -= scale;
    return loss;
}

// ---- dropout ------------------------------------------------------------------------------------
// Eight SplitMix64 outputs per step are 32 16-bit uniforms in element order (little-endian lanes), so one
// compare gives the mask of 32 elements. Needs AVX512-BW/DQ/VL besides F; without them, the reference.
#define AVX512BWDQ __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")))

AVX512BWDQ static void dropout_avx512bw(const float *x, uint8_t *mask, float *out, size_t n, uint64_t start, uint32_t threshold, float keep) {
    const __m512i golden8 = _mm512_set1_epi64((long long)(8 * 0x9E3779B97F4A7C15ull));
    const __m512i m1 = _mm512_set1_epi64((long long)0xBF58476D1CE4E5B9ull), m2 = _mm512_set1_epi64((long long)0x94D049BB133111EBull);
    const __m512i thr = _mm512_set1_epi16((short)threshold);
    const __m512 kv = _mm512_set1_ps(keep);
    const __m256i one = _mm256_set1_epi8(1);
    // Lane l of the first step holds group l: start + (l + 1) * golden.
    __m512i w = _mm512_add_epi64(_mm512_set1_epi64((long long)start),
                                 _mm512_mullo_epi64(_mm512_setr_epi64(1, 2, 3, 4, 5, 6, 7, 8), _mm512_set1_epi64((long long)0x9E3779B97F4A7C15ull)));
    size_t i = 0;
    for (; i + 32 <= n; i += 32) {
        __m512i z = w;
        z = _mm512_mullo_epi64(_mm512_xor_si512(z, _mm512_srli_epi64(z, 30)), m1);
        z = _mm512_mullo_epi64(_mm512_xor_si512(z, _mm512_srli_epi64(z, 27)), m2);
        z = _mm512_xor_si512(z, _mm512_srli_epi64(z, 31));
        __mmask32 k = _mm512_cmpge_epu16_mask(z, thr);
        _mm256_storeu_si256((__m256i *)(mask + i), _mm256_maskz_mov_epi8(k, one));
        _mm512_storeu_ps(out + i, _mm512_maskz_mul_ps((__mmask16)k, _mm512_loadu_ps(x + i), kv));
        _mm512_storeu_ps(out + i + 16, _mm512_maskz_mul_ps((__mmask16)(k >> 16), _mm512_loadu_ps(x + i + 16), kv));
        w = _mm512_add_epi64(w, golden8);
    }
    // The tail: its first group is group i / 4 of the whole.
    if (i < n) qk_dropout_reference(x + i, mask + i, out + i, n - i, start + (uint64_t)(i / 4) * 0x9E3779B97F4A7C15ull, threshold, keep);
}

void qk_dropout_avx512(const float *x, uint8_t *mask, float *out, size_t n, uint64_t start, uint32_t threshold, float keep) {
    // qk_cpu_supports ran __builtin_cpu_init before any table was handed out; these read its result.
    if (threshold <= 0xFFFF && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl"))
        dropout_avx512bw(x, mask, out, n, start, threshold, keep);
    else qk_dropout_reference(x, mask, out, n, start, threshold, keep);
}

void qk_dropout_avx2(const float *x, uint8_t *mask, float *out, size_t n, uint64_t start, uint32_t threshold, float keep) {
    qk_dropout_reference(x, mask, out, n, start, threshold, keep);
}

// ---- attention of one key-value head's queries (decoding) ---------------------------------------------
// Decoding attention's loops over keys and values of element type T: WIDEN8 loads eight of them as eight floats,
// LINE elements fill a 64-byte cache line (what the prefetches step by). Scores eight positions at a time: eight dot
// products in eight accumulators, then one reduction tree (hadd, hadd, lane add) that leaves dot t in lane t; the eight
// key rows stay in L1 for every query. Then out = sum_j p_j v_j: positions in chunks of 32 (their value rows stay in
// L1 for every query), 64 lanes of a query's output in registers at a time. The cache is read from memory once per
// step, rows apart by `stride`: keys are fetched 16 positions ahead, values a chunk ahead.
#define ATTEND_AVX2_BODY(T, WIDEN8, LINE)                                                                                            \
    size_t j = 0;                                                                                                             \
    for (; j + 8 <= S; j += 8) {                                                                                              \
        for (size_t t = 0; t < 8; t++)                                                                                        \
            for (size_t i = 0; i < d; i += LINE) _mm_prefetch((const char *)(keys + (j + 16 + t) * stride + i), _MM_HINT_T0); \
        for (size_t qi = 0; qi < nq; qi++) {                                                                                  \
            const float *qq = q + qi * d;                                                                                     \
            __m256 acc[8];                                                                                                    \
            for (size_t t = 0; t < 8; t++) acc[t] = _mm256_setzero_ps();                                                      \
            for (size_t i = 0; i < d; i += 8) {                                                                               \
                __m256 qv = _mm256_loadu_ps(qq + i);                                                                          \
                for (size_t t = 0; t < 8; t++) acc[t] = _mm256_fmadd_ps(qv, WIDEN8(keys + (j + t) * stride + i), acc[t]);    \
            }                                                                                                                 \
            __m256 s01 = _mm256_hadd_ps(acc[0], acc[1]), s23 = _mm256_hadd_ps(acc[2], acc[3]);                                \
            __m256 s45 = _mm256_hadd_ps(acc[4], acc[5]), s67 = _mm256_hadd_ps(acc[6], acc[7]);                                \
            __m256 s0123 = _mm256_hadd_ps(s01, s23), s4567 = _mm256_hadd_ps(s45, s67);                                        \
            __m256 lo = _mm256_permute2f128_ps(s0123, s4567, 0x20), hi = _mm256_permute2f128_ps(s0123, s4567, 0x31);         \
            _mm256_storeu_ps(scores + qi * S + j, _mm256_mul_ps(_mm256_add_ps(lo, hi), _mm256_set1_ps(scale)));               \
        }                                                                                                                     \
    }                                                                                                                         \
    for (; j < S; j++) {                                                                                                      \
        const T *k = keys + j * stride;                                                                                \
        for (size_t qi = 0; qi < nq; qi++) {                                                                                  \
            __m256 a0 = _mm256_setzero_ps();                                                                                  \
            for (size_t i = 0; i < d; i += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + qi * d + i), WIDEN8(k + i), a0);       \
            __m128 h = _mm_add_ps(_mm256_castps256_ps128(a0), _mm256_extractf128_ps(a0, 1));                                  \
            h = _mm_add_ps(h, _mm_movehl_ps(h, h));                                                                           \
            h = _mm_add_ss(h, _mm_movehdup_ps(h));                                                                            \
            scores[qi * S + j] = _mm_cvtss_f32(h) * scale;                                                                    \
        }                                                                                                                     \
    }                                                                                                                         \
    for (size_t qi = 0; qi < nq; qi++) {                                                                                      \
        if (stats) stats[2 * qi + 1] = exp_row_avx2(scores + qi * S, S, &stats[2 * qi]);                                      \
        else qk_softmax_row_avx2(scores + qi * S, S, S);                                                                      \
    }                                                                                                                         \
    for (size_t i = 0; i < nq * d; i++) out[i] = 0.0f;                                                                        \
    for (size_t j0 = 0; j0 < S; j0 += 32) {                                                                                   \
        size_t j1 = S - j0 < 32 ? S : j0 + 32;                                                                                \
        for (size_t jj = j0 + 32; jj < j1 + 32 && jj < S; jj++)                                                               \
            for (size_t i = 0; i < d; i += LINE) _mm_prefetch((const char *)(values + jj * stride + i), _MM_HINT_T0);           \
        for (size_t qi = 0; qi < nq; qi++) {                                                                                  \
            const float *p = scores + qi * S;                                                                                 \
            for (size_t i0 = 0; i0 < d; i0 += 64) {                                                                           \
                size_t n = d - i0 < 64 ? (d - i0) / 8 : 8;                                                                    \
                float *o = out + qi * d + i0;                                                                                 \
                __m256 acc[8];                                                                                                \
                for (size_t t = 0; t < n; t++) acc[t] = _mm256_loadu_ps(o + 8 * t);                                           \
                for (size_t jj = j0; jj < j1; jj++) {                                                                         \
                    const T *v = values + jj * stride + i0;                                                            \
                    __m256 pj = _mm256_set1_ps(p[jj]);                                                                        \
                    for (size_t t = 0; t < n; t++) acc[t] = _mm256_fmadd_ps(pj, WIDEN8(v + 8 * t), acc[t]);                   \
                }                                                                                                             \
                for (size_t t = 0; t < n; t++) _mm256_storeu_ps(o + 8 * t, acc[t]);                                           \
            }                                                                                                                 \
        }                                                                                                                     \
    }

void qk_attend_avx2(const float *q, size_t nq, const float *keys, const float *values, size_t S, size_t d, size_t stride,
                    float scale, float *scores, float *out, float *stats) AVX2;
void qk_attend_avx2(const float *q, size_t nq, const float *keys, const float *values, size_t S, size_t d, size_t stride,
                    float scale, float *scores, float *out, float *stats) {
    if (d % 8 != 0 || d > 256) {
        qk_attend_reference(q, nq, keys, values, S, d, stride, scale, scores, out, stats);
        return;
    }
    ATTEND_AVX2_BODY(float, _mm256_loadu_ps, 16)
}

void qk_attend_avx512(const float *q, size_t nq, const float *keys, const float *values, size_t S, size_t d, size_t stride,
                      float scale, float *scores, float *out, float *stats) {
    qk_attend_avx2(q, nq, keys, values, S, d, stride, scale, scores, out, stats);
}

// ---- The 16-bit KV cache ------------------------------------------------------------------------------
#define AVX2F16C __attribute__((target("avx2,fma,f16c")))
#define AVX512F16 __attribute__((target("avx512f,avx2,fma,f16c")))

// Eight cache words as eight floats (exact).
AVX2F16C static inline __m256 widen8_f16(const uint16_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }
AVX2F16C static inline __m256 widen8_bf16(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}
// Sixteen cache words as sixteen floats (exact).
AVX512F16 static inline __m512 widen16_f16(const uint16_t *p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)); }
AVX512F16 static inline __m512 widen16_bf16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

void qk_kv_narrow_avx2(const float *src, uint16_t *dst, size_t n, int format) AVX2F16C;
void qk_kv_narrow_avx2(const float *src, uint16_t *dst, size_t n, int format) {
    size_t i = 0;
    if (format == QK_KV_F16) {
        // vcvtps2ph rounds to nearest even, overflows to infinity and quiets NaN as the reference does.
        for (; i + 8 <= n; i += 8)
            _mm_storeu_si128((__m128i *)(dst + i), _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    } else {
        const __m256i bias = _mm256_set1_epi32(0x7FFF), one = _mm256_set1_epi32(1), exponent = _mm256_set1_epi32(0x7F800000);
        const __m256i magnitude = _mm256_set1_epi32(0x7FFFFFFF), quiet = _mm256_set1_epi32(0x00400000);
        for (; i + 8 <= n; i += 8) {
            __m256i x = _mm256_castps_si256(_mm256_loadu_ps(src + i));
            __m256i rounded = _mm256_add_epi32(x, _mm256_add_epi32(bias, _mm256_and_si256(_mm256_srli_epi32(x, 16), one)));
            __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(x, magnitude), exponent);
            __m256i r = _mm256_srli_epi32(_mm256_blendv_epi8(rounded, _mm256_or_si256(x, quiet), nan), 16);
            // 32-bit lanes to 16-bit words in order (packus saturates, but every lane is below 65536).
            __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xD8);
            _mm_storeu_si128((__m128i *)(dst + i), _mm256_castsi256_si128(packed));
        }
    }
    qk_kv_narrow_reference(src + i, dst + i, n - i, format);
}

void qk_kv_widen_avx2(const uint16_t *src, float *dst, size_t n, int format) AVX2F16C;
void qk_kv_widen_avx2(const uint16_t *src, float *dst, size_t n, int format) {
    size_t i = 0;
    if (format == QK_KV_F16)
        for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, widen8_f16(src + i));
    else
        for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, widen8_bf16(src + i));
    qk_kv_widen_reference(src + i, dst + i, n - i, format);
}

AVX2F16C static void attend16_f16_avx2(const float *q, size_t nq, const uint16_t *keys, const uint16_t *values, size_t S, size_t d,
                                        size_t stride, float scale, float *scores, float *out, float *stats) {
    ATTEND_AVX2_BODY(uint16_t, widen8_f16, 32)
}

AVX2F16C static void attend16_bf16_avx2(const float *q, size_t nq, const uint16_t *keys, const uint16_t *values, size_t S, size_t d,
                                         size_t stride, float scale, float *scores, float *out, float *stats) {
    ATTEND_AVX2_BODY(uint16_t, widen8_bf16, 32)
}

void qk_attend16_avx2(const float *q, size_t nq, const uint16_t *keys, const uint16_t *values, size_t S, size_t d, size_t stride,
                      float scale, float *scores, float *out, float *stats, int format) {
    if (d % 8 != 0 || d > 256) qk_attend16_reference(q, nq, keys, values, S, d, stride, scale, scores, out, stats, format);
    else if (format == QK_KV_F16) attend16_f16_avx2(q, nq, keys, values, S, d, stride, scale, scores, out, stats);
    else attend16_bf16_avx2(q, nq, keys, values, S, d, stride, scale, scores, out, stats);
}

// The same with sixteen lanes: a position's dot product in a 512-bit accumulator folded to 256 bits, then
// qk_attend_avx2's reduction tree over eight positions; the output 128 lanes of a query at a time.
#define ATTEND16_AVX512_BODY(WIDEN16)                                                                                         \
    size_t j = 0;                                                                                                             \
    for (; j + 8 <= S; j += 8) {                                                                                              \
        for (size_t t = 0; t < 8; t++)                                                                                        \
            for (size_t i = 0; i < d; i += 32) _mm_prefetch((const char *)(keys + (j + 16 + t) * stride + i), _MM_HINT_T0); \
        for (size_t qi = 0; qi < nq; qi++) {                                                                                  \
            const float *qq = q + qi * d;                                                                                     \
            __m512 acc[8];                                                                                                    \
            for (size_t t = 0; t < 8; t++) acc[t] = _mm512_setzero_ps();                                                      \
            for (size_t i = 0; i < d; i += 16) {                                                                              \
                __m512 qv = _mm512_loadu_ps(qq + i);                                                                          \
                for (size_t t = 0; t < 8; t++) acc[t] = _mm512_fmadd_ps(qv, WIDEN16(keys + (j + t) * stride + i), acc[t]);   \
            }                                                                                                                 \
            __m256 f[8];                                                                                                      \
            for (size_t t = 0; t < 8; t++)                                                                                    \
                f[t] = _mm256_add_ps(_mm512_castps512_ps256(acc[t]),                                                          \
                                     _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc[t]), 1)));                  \
            __m256 s01 = _mm256_hadd_ps(f[0], f[1]), s23 = _mm256_hadd_ps(f[2], f[3]);                                        \
            __m256 s45 = _mm256_hadd_ps(f[4], f[5]), s67 = _mm256_hadd_ps(f[6], f[7]);                                        \
            __m256 s0123 = _mm256_hadd_ps(s01, s23), s4567 = _mm256_hadd_ps(s45, s67);                                        \
            __m256 lo = _mm256_permute2f128_ps(s0123, s4567, 0x20), hi = _mm256_permute2f128_ps(s0123, s4567, 0x31);         \
            _mm256_storeu_ps(scores + qi * S + j, _mm256_mul_ps(_mm256_add_ps(lo, hi), _mm256_set1_ps(scale)));               \
        }                                                                                                                     \
    }                                                                                                                         \
    for (; j < S; j++) {                                                                                                      \
        const uint16_t *k = keys + j * stride;                                                                                \
        for (size_t qi = 0; qi < nq; qi++) {                                                                                  \
            __m512 a0 = _mm512_setzero_ps();                                                                                  \
            for (size_t i = 0; i < d; i += 16) a0 = _mm512_fmadd_ps(_mm512_loadu_ps(q + qi * d + i), WIDEN16(k + i), a0);     \
            scores[qi * S + j] = _mm512_reduce_add_ps(a0) * scale;                                                            \
        }                                                                                                                     \
    }                                                                                                                         \
    for (size_t qi = 0; qi < nq; qi++) {                                                                                      \
        if (stats) stats[2 * qi + 1] = exp_row_avx2(scores + qi * S, S, &stats[2 * qi]);                                      \
        else qk_softmax_row_avx512(scores + qi * S, S, S);                                                                    \
    }                                                                                                                         \
    for (size_t i = 0; i < nq * d; i++) out[i] = 0.0f;                                                                        \
    for (size_t j0 = 0; j0 < S; j0 += 32) {                                                                                   \
        size_t j1 = S - j0 < 32 ? S : j0 + 32;                                                                                \
        for (size_t jj = j0 + 32; jj < j1 + 32 && jj < S; jj++)                                                               \
            for (size_t i = 0; i < d; i += 32) _mm_prefetch((const char *)(values + jj * stride + i), _MM_HINT_T0);           \
        for (size_t qi = 0; qi < nq; qi++) {                                                                                  \
            const float *p = scores + qi * S;                                                                                 \
            for (size_t i0 = 0; i0 < d; i0 += 128) {                                                                          \
                size_t n = d - i0 < 128 ? (d - i0) / 16 : 8;                                                                  \
                float *o = out + qi * d + i0;                                                                                 \
                __m512 acc[8];                                                                                                \
                for (size_t t = 0; t < n; t++) acc[t] = _mm512_loadu_ps(o + 16 * t);                                          \
                for (size_t jj = j0; jj < j1; jj++) {                                                                         \
                    const uint16_t *v = values + jj * stride + i0;                                                            \
                    __m512 pj = _mm512_set1_ps(p[jj]);                                                                        \
                    for (size_t t = 0; t < n; t++) acc[t] = _mm512_fmadd_ps(pj, WIDEN16(v + 16 * t), acc[t]);                 \
                }                                                                                                             \
                for (size_t t = 0; t < n; t++) _mm512_storeu_ps(o + 16 * t, acc[t]);                                          \
            }                                                                                                                 \
        }                                                                                                                     \
    }

AVX512F16 static void attend16_f16_avx512(const float *q, size_t nq, const uint16_t *keys, const uint16_t *values, size_t S, size_t d,
                                           size_t stride, float scale, float *scores, float *out, float *stats) {
    ATTEND16_AVX512_BODY(widen16_f16)
}

AVX512F16 static void attend16_bf16_avx512(const float *q, size_t nq, const uint16_t *keys, const uint16_t *values, size_t S, size_t d,
                                            size_t stride, float scale, float *scores, float *out, float *stats) {
    ATTEND16_AVX512_BODY(widen16_bf16)
}

void qk_attend16_avx512(const float *q, size_t nq, const uint16_t *keys, const uint16_t *values, size_t S, size_t d, size_t stride,
                        float scale, float *scores, float *out, float *stats, int format) {
    if (d % 16 != 0 || d > 256) qk_attend16_avx2(q, nq, keys, values, S, d, stride, scale, scores, out, stats, format);
    else if (format == QK_KV_F16) attend16_f16_avx512(q, nq, keys, values, S, d, stride, scale, scores, out, stats);
    else attend16_bf16_avx512(q, nq, keys, values, S, d, stride, scale, scores, out, stats);
}

#else
void qk_dropout_avx2(const float *x, uint8_t *m, float *o, size_t n, uint64_t s, uint32_t t, float k) { qk_dropout_reference(x, m, o, n, s, t, k); }
void qk_dropout_avx512(const float *x, uint8_t *m, float *o, size_t n, uint64_t s, uint32_t t, float k) { qk_dropout_reference(x, m, o, n, s, t, k); }
void qk_softmax_row_avx2(float *r, size_t v, size_t l) { qk_softmax_row_reference(r, v, l); }
void qk_attend_avx2(const float *q, size_t nq, const float *k, const float *v, size_t S, size_t d, size_t st, float sc, float *s, float *o, float *t) {
    qk_attend_reference(q, nq, k, v, S, d, st, sc, s, o, t);
}
void qk_attend_avx512(const float *q, size_t nq, const float *k, const float *v, size_t S, size_t d, size_t st, float sc, float *s, float *o, float *t) {
    qk_attend_reference(q, nq, k, v, S, d, st, sc, s, o, t);
}
void qk_softmax_row_avx512(float *r, size_t v, size_t l) { qk_softmax_row_reference(r, v, l); }
void qk_kv_narrow_avx2(const float *s, uint16_t *d, size_t n, int f) { qk_kv_narrow_reference(s, d, n, f); }
void qk_kv_widen_avx2(const uint16_t *s, float *d, size_t n, int f) { qk_kv_widen_reference(s, d, n, f); }
void qk_attend16_avx2(const float *q, size_t nq, const uint16_t *k, const uint16_t *v, size_t S, size_t d, size_t st, float sc, float *s, float *o,
                      float *t, int f) {
    qk_attend16_reference(q, nq, k, v, S, d, st, sc, s, o, t, f);
}
void qk_attend16_avx512(const float *q, size_t nq, const uint16_t *k, const uint16_t *v, size_t S, size_t d, size_t st, float sc, float *s,
                        float *o, float *t, int f) {
    qk_attend16_reference(q, nq, k, v, S, d, st, sc, s, o, t, f);
}
void qk_swiglu_avx2(float *a, const float *g, const float *u, size_t n) { qk_swiglu_reference(a, g, u, n); }
void qk_swiglu_avx512(float *a, const float *g, const float *u, size_t n) { qk_swiglu_reference(a, g, u, n); }
void qk_geglu_avx2(float *a, const float *g, const float *u, size_t n) { qk_geglu_reference(a, g, u, n); }
void qk_geglu_avx512(float *a, const float *g, const float *u, size_t n) { qk_geglu_reference(a, g, u, n); }
void qk_geglu_backward_avx2(float *dg, float *du, const float *da, const float *g, const float *u, size_t n) { qk_geglu_backward_reference(dg, du, da, g, u, n); }
void qk_geglu_backward_avx512(float *dg, float *du, const float *da, const float *g, const float *u, size_t n) { qk_geglu_backward_reference(dg, du, da, g, u, n); }
void qk_swiglu_backward_avx2(float *dg, float *du, const float *da, const float *g, const float *u, size_t n) { qk_swiglu_backward_reference(dg, du, da, g, u, n); }
void qk_swiglu_backward_avx512(float *dg, float *du, const float *da, const float *g, const float *u, size_t n) { qk_swiglu_backward_reference(dg, du, da, g, u, n); }
double qk_cross_entropy_row_avx2(float *x, size_t v, size_t t, float s) { return qk_cross_entropy_row_reference(x, v, t, s); }
double qk_cross_entropy_row_avx512(float *x, size_t v, size_t t, float s) { return qk_cross_entropy_row_reference(x, v, t, s); }
#endif
