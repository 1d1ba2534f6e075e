// Scalar references of the row operations (softmax, SwiGLU, cross-entropy): the specification the
// vector versions are tested against.
#include "CKernels.h"
#include <math.h>

// exp(row[j] - m) in place for j < visible, m the largest; returns their sum and sets *max = m.
static float exp_row_reference(float *row, size_t visible, float *max) {
    float m = -INFINITY;
    for (size_t j = 0; j < visible; j++) m = row[j] > m ? row[j] : m;
    float sum = 0.0f;
    for (size_t j = 0; j < visible; j++) { row[j] = expf(row[j] - m); sum += row[j]; }
    *max = m;
    return sum;
}

void qk_softmax_row_reference(float *row, size_t visible, size_t length) {
    float m;
    float inv = 1.0f / exp_row_reference(row, visible, &m);
    for (size_t j = 0; j < visible; j++) row[j] *= inv;
    for (size_t j = visible; j < length; j++) row[j] = 0.0f;
}

void qk_attend_reference(const float *q, size_t nq, const float *keys, const float *values, size_t S, size_t d, size_t stride,
                         float scale, float *scores, float *out, float *stats) {
    for (size_t qi = 0; qi < nq; qi++) {
        const float *qq = q + qi * d;
        float *sc = scores + qi * S, *o = out + qi * d;
        for (size_t j = 0; j < S; j++) {
            const float *k = keys + j * stride;
            float dot = 0.0f;
            for (size_t i = 0; i < d; i++) dot += qq[i] * k[i];
            sc[j] = dot * scale;
        }
        if (stats) stats[2 * qi + 1] = exp_row_reference(sc, S, &stats[2 * qi]);
        else qk_softmax_row_reference(sc, S, S);
        for (size_t i = 0; i < d; i++) o[i] = 0.0f;
        for (size_t j = 0; j < S; j++) {
            const float *v = values + j * stride;
            float p = sc[j];
            for (size_t i = 0; i < d; i++) o[i] += p * v[i];
        }
    }
}

void qk_swiglu_reference(float *a, const float *g, const float *u, size_t n) {
    for (size_t i = 0; i < n; i++) a[i] = (g[i] / (1.0f + expf(-g[i]))) * u[i];
}

void qk_swiglu_backward_reference(float *dg, float *du, const float *da, const float *g, const float *u, size_t n) {
    for (size_t i = 0; i < n; i++) {
        float x = g[i];
        float s = 1.0f / (1.0f + expf(-x));
        dg[i] = da[i] * u[i] * (s * (1.0f + x * (1.0f - s)));
        du[i] = da[i] * (x * s);
    }
}

/* GeGLU with GELU's tanh approximation: a = 0.5 g (1 + tanh(u)) * up, u = sqrt(2/pi) (g + 0.044715 g^3),
   written as torch's gelu(approximate="tanh") computes it. */
#define QK_GELU_BETA 0.7978845608028654f
#define QK_GELU_KAPPA 0.044715f

void qk_geglu_reference(float *a, const float *g, const float *u, size_t n) {
    for (size_t i = 0; i < n; i++) {
        float x = g[i];
        float inner = QK_GELU_BETA * (x + QK_GELU_KAPPA * (x * x * x));
        a[i] = 0.5f * x * (1.0f + tanhf(inner)) * u[i];
    }
}

void qk_geglu_backward_reference(float *dg, float *du, const float *da, const float *g, const float *u, size_t n) {
    for (size_t i = 0; i < n; i++) {
        float x = g[i];
        float t = tanhf(QK_GELU_BETA * (x + QK_GELU_KAPPA * (x * x * x)));
        float slope = 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * QK_GELU_BETA * (1.0f + 3.0f * QK_GELU_KAPPA * x * x);
        dg[i] = da[i] * u[i] * slope;
        du[i] = da[i] * (0.5f * x * (1.0f + t));
    }
}

double qk_cross_entropy_row_reference(float *x, size_t vocab, size_t target, float scale) {
    float m = -INFINITY;
    for (size_t j = 0; j < vocab; j++) m = x[j] > m ? x[j] : m;
    double sum = 0.0;
    for (size_t j = 0; j < vocab; j++) sum += (double)expf(x[j] - m);
    double loss = (double)m + log(sum) - (double)x[target];
    float inv = (float)(1.0 / sum) * scale;
    for (size_t j = 0; j < vocab; j++) x[j] = expf(x[j] - m) * inv;
    x[target] -= scale;
    return loss;
}

void qk_dropout_reference(const float *x, uint8_t *mask, float *out, size_t n, uint64_t start, uint32_t threshold, float keep) {
    for (size_t g = 0; 4 * g < n; g++) {
        uint64_t z = start + (uint64_t)(g + 1) * 0x9E3779B97F4A7C15ull;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        z ^= z >> 31;
        for (size_t j = 0; j < 4 && 4 * g + j < n; j++) {
            size_t i = 4 * g + j;
            uint8_t kept = ((z >> (16 * j)) & 0xFFFF) >= threshold;
            mask[i] = kept;
            out[i] = kept ? x[i] * keep : 0.0f;
        }
    }
}

// ---- The 16-bit KV cache ----------------------------------------------------------------------------

static inline uint32_t float_bits(float f) {
    union { float f; uint32_t u; } v = {.f = f};
    return v.u;
}

static inline float bits_float(uint32_t u) {
    union { uint32_t u; float f; } v = {.u = u};
    return v.f;
}

static uint16_t narrow_f16(float f) {
    uint32_t x = float_bits(f);
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000);
    uint32_t exponent = (x >> 23) & 0xFF, mantissa = x & 0x7FFFFF;
    if (exponent == 0xFF) return mantissa ? (uint16_t)(sign | 0x7E00 | (mantissa >> 13)) : (uint16_t)(sign | 0x7C00);
    int e = (int)exponent - 127 + 15;
    if (e >= 0x1F) return sign | 0x7C00;
    if (e <= 0) {
        // A subnormal half (or zero): the mantissa with its implicit bit, shifted right and rounded to even.
        if (e < -10) return sign;
        uint32_t full = mantissa | 0x800000;
        uint32_t shift = (uint32_t)(14 - e);
        uint32_t half = full >> shift, rest = full & ((1u << shift) - 1), midpoint = 1u << (shift - 1);
        if (rest > midpoint || (rest == midpoint && (half & 1))) half++;
        return (uint16_t)(sign | half);
    }
    uint32_t half = ((uint32_t)e << 10) | (mantissa >> 13), rest = mantissa & 0x1FFF;
    // Rounding up may carry into the exponent, up to infinity: the bit pattern's order makes that right.
    if (rest > 0x1000 || (rest == 0x1000 && (half & 1))) half++;
    return (uint16_t)(sign | half);
}

static float widen_f16(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exponent = (h >> 10) & 0x1F, mantissa = h & 0x3FF;
    if (exponent == 0x1F) return bits_float(sign | 0x7F800000 | (mantissa << 13));
    if (exponent == 0) {
        float magnitude = (float)mantissa * 5.9604644775390625e-8f;  // 2^-24
        return sign ? -magnitude : magnitude;
    }
    return bits_float(sign | ((exponent + 112) << 23) | (mantissa << 13));
}

static uint16_t narrow_bf16(float f) {
    uint32_t x = float_bits(f);
    if ((x & 0x7F800000) == 0x7F800000 && (x & 0x7FFFFF)) return (uint16_t)((x >> 16) | 0x40);  // quiet NaN
    return (uint16_t)((x + 0x7FFF + ((x >> 16) & 1)) >> 16);
}

static inline float widen_bf16(uint16_t h) { return bits_float((uint32_t)h << 16); }

void qk_kv_narrow_reference(const float *src, uint16_t *dst, size_t n, int format) {
    for (size_t i = 0; i < n; i++) dst[i] = format == QK_KV_F16 ? narrow_f16(src[i]) : narrow_bf16(src[i]);
}

void qk_kv_widen_reference(const uint16_t *src, float *dst, size_t n, int format) {
    for (size_t i = 0; i < n; i++) dst[i] = format == QK_KV_F16 ? widen_f16(src[i]) : widen_bf16(src[i]);
}

void qk_attend16_reference(const float *q, size_t nq, const uint16_t *keys, const uint16_t *values, size_t S, size_t d, size_t stride,
                           float scale, float *scores, float *out, float *stats, int format) {
    for (size_t qi = 0; qi < nq; qi++) {
        const float *qq = q + qi * d;
        float *sc = scores + qi * S, *o = out + qi * d;
        for (size_t j = 0; j < S; j++) {
            const uint16_t *k = keys + j * stride;
            float dot = 0.0f;
            for (size_t i = 0; i < d; i++) dot += qq[i] * (format == QK_KV_F16 ? widen_f16(k[i]) : widen_bf16(k[i]));
            sc[j] = dot * scale;
        }
        if (stats) stats[2 * qi + 1] = exp_row_reference(sc, S, &stats[2 * qi]);
        else qk_softmax_row_reference(sc, S, S);
        for (size_t i = 0; i < d; i++) o[i] = 0.0f;
        for (size_t j = 0; j < S; j++) {
            const uint16_t *v = values + j * stride;
            float p = sc[j];
            for (size_t i = 0; i < d; i++) o[i] += p * (format == QK_KV_F16 ? widen_f16(v[i]) : widen_bf16(v[i]));
        }
    }
}
