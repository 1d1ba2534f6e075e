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
