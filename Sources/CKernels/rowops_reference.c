// Scalar references of the row operations (softmax, SwiGLU, cross-entropy): the specification the
// vector versions are tested against.
#include "CKernels.h"
#include <math.h>

void qk_softmax_row_reference(float *row, size_t visible, size_t length) {
    float m = -INFINITY;
    for (size_t j = 0; j < visible; j++) m = row[j] > m ? row[j] : m;
    float sum = 0.0f;
    for (size_t j = 0; j < visible; j++) { row[j] = expf(row[j] - m); sum += row[j]; }
    float inv = 1.0f / sum;
    for (size_t j = 0; j < visible; j++) row[j] *= inv;
    for (size_t j = visible; j < length; j++) row[j] = 0.0f;
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
