// Scalar references: the specification of each kernel and the fallback on any CPU.
// No floating-point contraction: x*scale and code*absmax must round exactly as bitsandbytes does.
#pragma clang fp contract(off)
#include "CKernels.h"
#include <math.h>

int qk_cpu_supports(int level) {
    if (level <= QK_LEVEL_REFERENCE) return 1;
#if defined(__x86_64__) || defined(_M_X64)
    __builtin_cpu_init();
    if (level == QK_LEVEL_AVX2)
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    if (level == QK_LEVEL_AVX512)
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
               __builtin_cpu_supports("f16c");
#endif
    return 0;
}

static inline uint8_t code_index(float s, const float *thresholds) {
    uint8_t idx = 0;
    for (int t = 0; t < 15; t++) idx += (thresholds[t] < s);
    return idx;
}

long long qk_quantize4_reference(const float *x, size_t n, size_t blocksize, const float *thresholds,
                                 const uint8_t *remap, uint8_t *packed, float *absmax) {
    size_t blocks = (n + blocksize - 1) / blocksize;
    for (size_t b = 0; b < blocks; b++) {
        size_t start = b * blocksize;
        size_t end = start + blocksize < n ? start + blocksize : n;
        float m = 0.0f;
        int bad = 0;
        for (size_t i = start; i < end; i++) {
            float a = fabsf(x[i]);
            bad |= !(a <= 3.4028234663852886e38f);  // NaN or infinity
            m = a > m ? a : m;
        }
        if (bad) return (long long)b;
        float am = m > 1e-38f ? m : 1e-38f;
        int partial = (end - start) < blocksize;
        // bitsandbytes stores the clamped absmax for the short last block, the raw one otherwise.
        absmax[b] = partial ? am : m;
        float scale = 1.0f / am;
        for (size_t i = start; i < end; i++) {
            float s = partial ? x[i] / am : x[i] * scale;
            s = s < -1.0f ? -1.0f : (s > 1.0f ? 1.0f : s);
            uint8_t q = remap[code_index(s, thresholds)];
            if ((i & 1) == 0) packed[i >> 1] = (uint8_t)(q << 4);
            else packed[i >> 1] |= q;
        }
    }
    // An odd count is padded with one element of value 0 before packing, as bitsandbytes does.
    if (n & 1) packed[n >> 1] |= remap[code_index(0.0f, thresholds)];
    return -1;
}

void qk_dequantize4_reference(const uint8_t *packed, const float *absmax, size_t n, size_t blocksize,
                              const float *code, float *out) {
    for (size_t i = 0; i < n; i++) {
        uint8_t byte = packed[i >> 1];
        uint8_t q = (i & 1) ? (byte & 0x0F) : (byte >> 4);
        out[i] = code[q] * absmax[i / blocksize];
    }
}

float qk_dot4_reference(const float *x, const uint8_t *packed, const float *absmax, size_t n, size_t blocksize,
                        const float *code) {
    float total = 0.0f;
    for (size_t start = 0; start < n; start += blocksize) {
        size_t end = start + blocksize < n ? start + blocksize : n;
        float sum = 0.0f;
        for (size_t i = start; i < end; i++) {
            uint8_t byte = packed[i >> 1];
            uint8_t q = (i & 1) ? (byte & 0x0F) : (byte >> 4);
            sum += code[q] * x[i];
        }
        total += sum * absmax[start / blocksize];
    }
    return total;
}
