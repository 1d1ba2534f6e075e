// AVX-512 versions of the decoding matrix-vector products (CKernelsGemv.h).
//
// 4-bit rows: with 16 f32 lanes a register holds the whole 16-entry codebook, and vpermps turns 16
// indices into 16 codes; it reads only the low four bits of each lane. So 64 packed bytes (128 codes)
// are loaded as 16 dwords and shifted right by 0, 4, ..., 28: each shift puts the next nibble of every
// dword in its low four bits, with no widening and no masking. Shift k holds, in lane l, element
// 8l + (k ^ 1) of the 128 (the high nibble of a byte comes first). x is reordered once per input to
// match (qk_gemv4_prepare_avx512) and every row reads it; a row's last 32 to 96 codes, when its length is
// not a multiple of 128, go 16 bytes at a time (widened to 16 lanes: the 16 odd elements as they are,
// the 16 even ones after a shift by 4). Measured on a Zen 4 core against the widening loop over the
// whole row: 24 against 21.5 G multiply-adds/s with the matrix in cache (cross-lane permutes bound both).
// q8_0 and bf16 rows: the AVX2 loops at twice the width.
#pragma clang fp contract(off)
#include "CKernels.h"
#include <float.h>
#include <string.h>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#define AVX512 __attribute__((target("avx512f,avx2,fma")))

void qk_gemv4_prepare_avx512(const float *x, size_t cols, float *xp) {
    size_t groups = cols / 128, c = 128 * groups;
    for (size_t g = 0; g < groups; g++)
        for (size_t k = 0; k < 8; k++)
            for (size_t l = 0; l < 16; l++) xp[128 * g + 16 * k + l] = x[128 * g + 8 * l + (k ^ 1)];
    for (; c + 32 <= cols; c += 32)
        for (size_t j = 0; j < 16; j++) {
            xp[c + j] = x[c + 2 * j];
            xp[c + 16 + j] = x[c + 2 * j + 1];
        }
    memcpy(xp + c, x + c, (cols - c) * sizeof(float));
}

// Scales first .. first + n - 1 into out, as qk_block_scale computes each (the same two roundings), 16 at a time.
AVX512 static void decode_scales_avx512(const qk_block_scales *s, size_t first, size_t n, float *out) {
    if (s->absmax) {
        memcpy(out, s->absmax + first, n * sizeof(float));
        return;
    }
    const __m512 offset = _mm512_set1_ps(s->offset), largest = _mm512_set1_ps(FLT_MAX);
    const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    size_t b = 0;
    for (; b + 16 <= n; b += 16) {
        size_t k = first + b;
        __m512i codes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(s->codes + k)));
        __m512 value = _mm512_i32gather_ps(codes, s->table, 4);
        __m512 nested;
        if ((k >> 8) == ((k + 15) >> 8)) {
            nested = _mm512_set1_ps(s->nested[k >> 8]);
        } else {
            // The 16 straddle two groups of 256: lane l takes nested[(k + l) >> 8], relative to the first.
            __m512i group = _mm512_srli_epi32(_mm512_add_epi32(_mm512_set1_epi32((int)(k & 255)), lanes), 8);
            nested = _mm512_i32gather_ps(group, s->nested + (k >> 8), 4);
        }
        __m512 v = _mm512_add_ps(_mm512_mul_ps(value, nested), offset);
        __mmask16 finite = _mm512_cmp_ps_mask(_mm512_sub_ps(v, v), _mm512_setzero_ps(), _CMP_EQ_OQ);
        _mm512_storeu_ps(out + b, _mm512_mask_blend_ps(finite, largest, v));
    }
    for (; b < n; b++) out[b] = qk_block_scale(s, first + b);
}

// The 128 codes of 64 packed bytes as f32, w[k] = shift k (lane l: element 8l + (k ^ 1)).
AVX512 static inline void expand128(const uint8_t *p, __m512 table, __m512 w[8]) {
    __m512i v = _mm512_loadu_si512((const void *)p);
    w[0] = _mm512_permutexvar_ps(v, table);
    w[1] = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table);
    w[2] = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 8), table);
    w[3] = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 12), table);
    w[4] = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 16), table);
    w[5] = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 20), table);
    w[6] = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 24), table);
    w[7] = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 28), table);
}

// The 32 codes of 16 packed bytes as f32: even elements, odd elements.
AVX512 static inline void expand32(const uint8_t *p, __m512 table, __m512 *even, __m512 *odd) {
    __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
    *even = _mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), table);
    *odd = _mm512_permutexvar_ps(bytes, table);
}

// The scale of each lane of the 128-code group starting at block `first` of `decoded`: lane l covers
// elements 8l .. 8l + 7, which lie in block (8l) / blocksize of the group (blocksize 32, 64 or >= 128).
AVX512 static inline __m512 group_scales(const float *decoded, size_t blocksize, size_t g) {
    if (blocksize >= 128) return _mm512_set1_ps(decoded[g * 128 / blocksize]);
    if (blocksize == 64) return _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(decoded[2 * g]), _mm512_set1_ps(decoded[2 * g + 1]));
    const __m512i quarter = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    return _mm512_permutexvar_ps(quarter, _mm512_castps128_ps512(_mm_loadu_ps(decoded + 4 * g)));
}

// One row piece of `cols` codes (a multiple of 32), its blocks' scales at decoded[0 ..]. Per 128-code
// group (or 32-code chunk past the last group) the products are summed, then scaled into one of two
// running totals; kept apart (not inlined) so that its loop has the registers to itself.
AVX512 __attribute__((noinline)) static float row4_avx512(const uint8_t *pr, const float *xp, const float *decoded, size_t cols,
                                                           size_t blocksize, __m512 table) {
    __m512 t0 = _mm512_setzero_ps(), t1 = _mm512_setzero_ps();
    size_t groups = cols / 128;
    for (size_t g = 0; g < groups; g++) {
        __m512 w[8];
        expand128(pr + 64 * g, table, w);
        const float *xg = xp + 128 * g;
        __m512 a0 = _mm512_mul_ps(w[0], _mm512_loadu_ps(xg)), a1 = _mm512_mul_ps(w[1], _mm512_loadu_ps(xg + 16));
        for (int k = 2; k < 8; k += 2) {
            a0 = _mm512_fmadd_ps(w[k], _mm512_loadu_ps(xg + 16 * k), a0);
            a1 = _mm512_fmadd_ps(w[k + 1], _mm512_loadu_ps(xg + 16 * k + 16), a1);
        }
        __m512 scale = group_scales(decoded, blocksize, g);
        if (g & 1) t1 = _mm512_fmadd_ps(_mm512_add_ps(a0, a1), scale, t1);
        else t0 = _mm512_fmadd_ps(_mm512_add_ps(a0, a1), scale, t0);
    }
    for (size_t c = 128 * groups; c < cols; c += 32) {
        __m512 even, odd;
        expand32(pr + c / 2, table, &even, &odd);
        __m512 a = _mm512_fmadd_ps(odd, _mm512_loadu_ps(xp + c + 16), _mm512_mul_ps(even, _mm512_loadu_ps(xp + c)));
        t0 = _mm512_fmadd_ps(a, _mm512_set1_ps(decoded[c / blocksize]), t0);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(t0, t1));
}

#define SCALE_BUFFER 1024  /* block scales decoded at once: several rows of most matrices */

void qk_gemv4_avx512(const float *x, const float *xp, const uint8_t *packed, const qk_block_scales *scales,
                     size_t first_block, size_t rows, size_t cols, size_t blocksize, const float *code, float *y) AVX512;
void qk_gemv4_avx512(const float *x, const float *xp, const uint8_t *packed, const qk_block_scales *scales,
                     size_t first_block, size_t rows, size_t cols, size_t blocksize, const float *code, float *y) {
    size_t nb = cols / blocksize;
    float decoded[SCALE_BUFFER];
    if (blocksize % 32 != 0) {  // no such block size in the package (32 to 4096, powers of two): the reference
        qk_gemv4_reference(x, xp, packed, scales, first_block, rows, cols, blocksize, code, y);
        return;
    }
    const __m512 table = _mm512_loadu_ps(code);
    if (nb > SCALE_BUFFER) {  // long rows, row by row in pieces of SCALE_BUFFER blocks (whole 128-code groups)
        for (size_t r = 0; r < rows; r++) {
            float sum = 0.0f;
            for (size_t b0 = 0; b0 < nb; b0 += SCALE_BUFFER) {
                size_t n = nb - b0 < SCALE_BUFFER ? nb - b0 : SCALE_BUFFER;
                decode_scales_avx512(scales, first_block + r * nb + b0, n, decoded);
                sum += row4_avx512(packed + r * (cols / 2) + b0 * blocksize / 2, xp + b0 * blocksize, decoded, n * blocksize, blocksize, table);
            }
            y[r] = sum;
        }
        return;
    }
    // The scales of as many whole rows as the buffer holds, decoded together (they are consecutive).
    size_t per = SCALE_BUFFER / nb;
    for (size_t r0 = 0; r0 < rows; r0 += per) {
        size_t m = rows - r0 < per ? rows - r0 : per;
        decode_scales_avx512(scales, first_block + r0 * nb, m * nb, decoded);
        for (size_t r = r0; r < r0 + m; r++)
            y[r] = row4_avx512(packed + r * (cols / 2), xp, decoded + (r - r0) * nb, cols, blocksize, table);
    }
}

#define GEMM_CHUNK 16  /* inputs whose accumulators one pass over a row keeps */

// Few inputs (2 to 7): each row's decoded group stays in registers and every input's two sums go through memory
// (measured faster than the register-blocked loop below at 4 inputs: 283-336 against 264-292 tokens/s, Zen 5).
AVX512 static void gemm4_few_avx512(const float *xp, size_t nx, const uint8_t *packed, const qk_block_scales *scales,
                                    size_t first_block, size_t rows, size_t cols, size_t blocksize, const float *code, float *y, size_t ldy) {
    // As qk_gemm4_avx2: four rows share each group of the inputs (read from L2 once for four rows), and
    // every decoded group is scaled once and multiply-added into each input's two accumulators.
    const __m512 table = _mm512_loadu_ps(code);
    size_t nb = cols / blocksize;
    enum { R = 4 };
    __m512 total[R][GEMM_CHUNK][2];
    float decoded[R][SCALE_BUFFER];
    for (size_t r0 = 0; r0 < rows; r0 += R) {
        size_t m = rows - r0 < R ? rows - r0 : R;
        for (size_t b0 = 0; b0 < nb; b0 += SCALE_BUFFER) {  // row pieces of SCALE_BUFFER blocks (one for most matrices)
            size_t nbp = nb - b0 < SCALE_BUFFER ? nb - b0 : SCALE_BUFFER;
            size_t c0 = b0 * blocksize, cn = nbp * blocksize, gp = cn / 128;
            for (size_t rr = 0; rr < m; rr++) decode_scales_avx512(scales, first_block + (r0 + rr) * nb + b0, nbp, decoded[rr]);
            for (size_t i0 = 0; i0 < nx; i0 += GEMM_CHUNK) {
                size_t n = nx - i0 < GEMM_CHUNK ? nx - i0 : GEMM_CHUNK;
                for (size_t rr = 0; rr < m; rr++)
                    for (size_t i = 0; i < n; i++) total[rr][i][0] = total[rr][i][1] = _mm512_setzero_ps();
                for (size_t g = 0; g < gp; g++) {
                    for (size_t rr = 0; rr < m; rr++) {
                        const uint8_t *pg = packed + (r0 + rr) * (cols / 2) + (c0 + 128 * g) / 2;
                        if (r0 + R < rows) _mm_prefetch((const char *)(pg + R * (cols / 2)), _MM_HINT_T0);
                        __m512 w[8];
                        expand128(pg, table, w);
                        __m512 scale = group_scales(decoded[rr], blocksize, g);
                        for (int k = 0; k < 8; k++) w[k] = _mm512_mul_ps(w[k], scale);
                        for (size_t i = 0; i < n; i++) {
                            const float *xg = xp + (i0 + i) * cols + c0 + 128 * g;
                            __m512 a = total[rr][i][0], c = total[rr][i][1];
                            for (int k = 0; k < 8; k += 2) {
                                a = _mm512_fmadd_ps(w[k], _mm512_loadu_ps(xg + 16 * k), a);
                                c = _mm512_fmadd_ps(w[k + 1], _mm512_loadu_ps(xg + 16 * k + 16), c);
                            }
                            total[rr][i][0] = a;
                            total[rr][i][1] = c;
                        }
                    }
                }
                for (size_t e = 128 * gp; e < cn; e += 32) {  // the piece's last 32 to 96 codes
                    for (size_t rr = 0; rr < m; rr++) {
                        __m512 even, odd;
                        expand32(packed + (r0 + rr) * (cols / 2) + (c0 + e) / 2, table, &even, &odd);
                        __m512 scale = _mm512_set1_ps(decoded[rr][e / blocksize]);
                        even = _mm512_mul_ps(even, scale);
                        odd = _mm512_mul_ps(odd, scale);
                        for (size_t i = 0; i < n; i++) {
                            const float *xc = xp + (i0 + i) * cols + c0 + e;
                            total[rr][i][0] = _mm512_fmadd_ps(even, _mm512_loadu_ps(xc), total[rr][i][0]);
                            total[rr][i][1] = _mm512_fmadd_ps(odd, _mm512_loadu_ps(xc + 16), total[rr][i][1]);
                        }
                    }
                }
                for (size_t rr = 0; rr < m; rr++)
                    for (size_t i = 0; i < n; i++) {
                        float v = _mm512_reduce_add_ps(_mm512_add_ps(total[rr][i][0], total[rr][i][1]));
                        float *yi = &y[(i0 + i) * ldy + r0 + rr];
                        *yi = b0 == 0 ? v : *yi + v;
                    }
            }
        }
    }
}

void qk_gemm4_avx512(const float *x, const float *xp, size_t nx, const uint8_t *packed, const qk_block_scales *scales,
                     size_t first_block, size_t rows, size_t cols, size_t blocksize, const float *code, float *y, size_t ldy) AVX512;
void qk_gemm4_avx512(const float *x, const float *xp, size_t nx, const uint8_t *packed, const qk_block_scales *scales,
                     size_t first_block, size_t rows, size_t cols, size_t blocksize, const float *code, float *y, size_t ldy) {
    if (nx == 1 || blocksize % 32 != 0) {
        for (size_t i = 0; i < nx; i++)
            qk_gemv4_avx512(x + i * cols, xp + i * cols, packed, scales, first_block, rows, cols, blocksize, code, y + i * ldy);
        return;
    }
    if (nx < 8) {
        gemm4_few_avx512(xp, nx, packed, scales, first_block, rows, cols, blocksize, code, y, ldy);
        return;
    }
    // Four rows at a time: each 128-code group of the four is decoded and scaled once into `w` (2 KB, in L1), then
    // multiplied into the inputs four at a time with the 16 (row, input) sums in registers, so that a group costs
    // each input's sum one load and one store instead of one of each per row (the loop before this one kept every
    // sum in memory and was bound by those loads and stores: BENCHMARKS.md, batched decoding). At 16 inputs, three
    // interleaved pairs on Zen 5: 419-470 against 405-409 tokens/s.
    const __m512 table = _mm512_loadu_ps(code);
    size_t nb = cols / blocksize;
    enum { R = 4, NI = 4 };
    __m512 total[R][GEMM_CHUNK];
    __m512 w[R][8];
    float decoded[R][SCALE_BUFFER];
    for (size_t r0 = 0; r0 < rows; r0 += R) {
        size_t m = rows - r0 < R ? rows - r0 : R;
        for (size_t b0 = 0; b0 < nb; b0 += SCALE_BUFFER) {  // row pieces of SCALE_BUFFER blocks (one for most matrices)
            size_t nbp = nb - b0 < SCALE_BUFFER ? nb - b0 : SCALE_BUFFER;
            size_t c0 = b0 * blocksize, cn = nbp * blocksize, gp = cn / 128;
            for (size_t rr = 0; rr < m; rr++) decode_scales_avx512(scales, first_block + (r0 + rr) * nb + b0, nbp, decoded[rr]);
            for (size_t i0 = 0; i0 < nx; i0 += GEMM_CHUNK) {
                size_t n = nx - i0 < GEMM_CHUNK ? nx - i0 : GEMM_CHUNK;
                for (size_t rr = 0; rr < R; rr++)
                    for (size_t i = 0; i < n; i++) total[rr][i] = _mm512_setzero_ps();
                for (size_t g = 0; g < gp; g++) {
                    for (size_t rr = 0; rr < R; rr++) {
                        // Rows past the last repeat it (their sums are dropped).
                        size_t row = rr < m ? rr : 0;
                        const uint8_t *pg = packed + (r0 + row) * (cols / 2) + (c0 + 128 * g) / 2;
                        if (r0 + R < rows) _mm_prefetch((const char *)(pg + R * (cols / 2)), _MM_HINT_T0);
                        expand128(pg, table, w[rr]);
                        __m512 scale = group_scales(decoded[row], blocksize, g);
                        for (int k = 0; k < 8; k++) w[rr][k] = _mm512_mul_ps(w[rr][k], scale);
                    }
                    for (size_t ib = 0; ib < n; ib += NI) {
                        // Inputs past the last repeat it (their sums are not stored).
                        const float *xg[NI];
                        __m512 acc[R][NI];
                        for (int j = 0; j < NI; j++) {
                            size_t i = ib + j < n ? ib + j : n - 1;
                            xg[j] = xp + (i0 + i) * cols + c0 + 128 * g;
                            for (int rr = 0; rr < R; rr++) acc[rr][j] = total[rr][i];
                        }
                        for (int k = 0; k < 8; k++) {
                            __m512 xv[NI];
                            for (int j = 0; j < NI; j++) xv[j] = _mm512_loadu_ps(xg[j] + 16 * k);
                            for (int rr = 0; rr < R; rr++)
                                for (int j = 0; j < NI; j++) acc[rr][j] = _mm512_fmadd_ps(w[rr][k], xv[j], acc[rr][j]);
                        }
                        for (int j = 0; j < NI; j++)
                            if (ib + j < n)
                                for (int rr = 0; rr < R; rr++) total[rr][ib + j] = acc[rr][j];
                    }
                }
                for (size_t e = 128 * gp; e < cn; e += 32) {  // the piece's last 32 to 96 codes
                    for (size_t rr = 0; rr < m; rr++) {
                        __m512 even, odd;
                        expand32(packed + (r0 + rr) * (cols / 2) + (c0 + e) / 2, table, &even, &odd);
                        __m512 scale = _mm512_set1_ps(decoded[rr][e / blocksize]);
                        even = _mm512_mul_ps(even, scale);
                        odd = _mm512_mul_ps(odd, scale);
                        for (size_t i = 0; i < n; i++) {
                            const float *xc = xp + (i0 + i) * cols + c0 + e;
                            total[rr][i] = _mm512_fmadd_ps(odd, _mm512_loadu_ps(xc + 16), _mm512_fmadd_ps(even, _mm512_loadu_ps(xc), total[rr][i]));
                        }
                    }
                }
                for (size_t rr = 0; rr < m; rr++)
                    for (size_t i = 0; i < n; i++) {
                        float v = _mm512_reduce_add_ps(total[rr][i]);
                        float *yi = &y[(i0 + i) * ldy + r0 + rr];
                        *yi = b0 == 0 ? v : *yi + v;
                    }
            }
        }
    }
}

#define BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma")))

// The bf16 4-bit product (qk_gemm4_bf16): a block's 16 possible weights, bf16(code[j] * scale), are one vector
// of 16 words, computed once a block; the codes then index it with vpermw, 32 words at a time, so that a
// weight costs a share of one permute, not of a lookup, a multiply and a conversion. vpermw reads the low five
// bits of each index: the table is written twice (words 16-31 = words 0-15) and a byte's low nibble needs no
// mask; with 32-code blocks the two halves hold two blocks' tables and the index's fifth bit picks the block.
// A 64-code chunk decodes into its 32 even elements and its 32 odd ones, the order the inputs are prepared in.

void qk_gemm4_bf16_prepare_avx512bf16(const float *x, size_t cols, uint16_t *xb) BF16;
void qk_gemm4_bf16_prepare_avx512bf16(const float *x, size_t cols, uint16_t *xb) {
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    size_t c = 0;
    for (; c + 64 <= cols; c += 64) {
        __m512 v0 = _mm512_loadu_ps(x + c), v1 = _mm512_loadu_ps(x + c + 16);
        __m512 v2 = _mm512_loadu_ps(x + c + 32), v3 = _mm512_loadu_ps(x + c + 48);
        __m512bh e = _mm512_cvtne2ps_pbh(_mm512_permutex2var_ps(v2, even, v3), _mm512_permutex2var_ps(v0, even, v1));
        __m512bh o = _mm512_cvtne2ps_pbh(_mm512_permutex2var_ps(v2, odd, v3), _mm512_permutex2var_ps(v0, odd, v1));
        _mm512_storeu_si512((void *)(xb + c), (__m512i)e);
        _mm512_storeu_si512((void *)(xb + c + 32), (__m512i)o);
    }
    if (c + 32 <= cols) {
        __m512 v0 = _mm512_loadu_ps(x + c), v1 = _mm512_loadu_ps(x + c + 16);
        __m512bh w = _mm512_cvtne2ps_pbh(_mm512_permutex2var_ps(v0, odd, v1), _mm512_permutex2var_ps(v0, even, v1));
        _mm512_storeu_si512((void *)(xb + c), (__m512i)w);
        c += 32;
    }
    for (; c < cols; c++) xb[c] = qk_bf16_from_float(x[c]);
}

// bf16(code[j] * s) for j < 16 in words 0-15, and bf16(code[j] * s2) in words 16-31.
BF16 static inline __m512i block_table(__m512 code, float s, float s2) {
    __m256i lo = (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(code, _mm512_set1_ps(s)));
    __m256i hi = s2 == s ? lo : (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(code, _mm512_set1_ps(s2)));
    return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
}

// 64 codes at p (32 bytes) looked up in `table`: the even elements' weights, then the odd ones'. `two`: the
// table holds two 32-code blocks (words 16-31 the second's), so the index's fifth bit is set for lanes 16-31.
BF16 static inline void decode64(const uint8_t *p, __m512i table, int two, __m512i *even, __m512i *odd) {
    __m512i b = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)p));
    __m512i hi = _mm512_srli_epi16(b, 4), lo = b;
    if (two) {
        const __m512i half = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(16), 1);
        hi = _mm512_or_si512(hi, half);
        lo = _mm512_or_si512(_mm512_and_si512(b, _mm512_set1_epi16(15)), half);
    }
    *even = _mm512_permutexvar_epi16(hi, table);
    *odd = _mm512_permutexvar_epi16(lo, table);
}

// 32 codes at p (16 bytes, one block's: its table in words 0-15) as one vector: 16 even weights, 16 odd.
BF16 static inline __m512i decode32(const uint8_t *p, __m512i table) {
    __m256i b = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)p));
    __m256i t = _mm512_castsi512_si256(table);
    __m256i e = _mm256_permutexvar_epi16(_mm256_srli_epi16(b, 4), t);
    __m256i o = _mm256_permutexvar_epi16(_mm256_and_si256(b, _mm256_set1_epi16(15)), t);
    return _mm512_inserti64x4(_mm512_castsi256_si512(e), o, 1);
}

// The table of the 64-code chunk whose first block is b of a row whose block scales are `decoded`.
BF16 static inline __m512i chunk_table(__m512 code, const float *decoded, size_t b, int two) {
    return block_table(code, decoded[b], decoded[b + two]);
}

// Group g (128 codes at pg) of a row piece whose block scales are `decoded`, as four vectors: the first 64 codes'
// even and odd weights, then the second 64's (the order of the prepared inputs' words).
BF16 static inline void group_bf16(const uint8_t *pg, __m512 code, const float *decoded, size_t g, size_t blocksize, int two, __m512i w[4]) {
    size_t k0 = 128 * g / blocksize, k1 = (128 * g + 64) / blocksize;  // the two chunks' first blocks
    __m512i t0 = chunk_table(code, decoded, k0, two);
    __m512i t1 = blocksize >= 128 ? t0 : chunk_table(code, decoded, k1, two);
    decode64(pg, t0, two, &w[0], &w[1]);
    decode64(pg + 32, t1, two, &w[2], &w[3]);
}

// A row piece's codes past its last whole group, from element e to cn (a 64-code chunk, a block of 32, or both), as
// up to three vectors in the order they multiply the inputs (vector j: the 32 input words at e + 32 j); returns how many.
BF16 static inline int tail_bf16(const uint8_t *pr, __m512 code, const float *decoded, size_t e, size_t cn, size_t blocksize, int two,
                                 __m512i w[3]) {
    int n = 0;
    if (e + 64 <= cn) {
        decode64(pr + e / 2, chunk_table(code, decoded, e / blocksize, two), two, &w[0], &w[1]);
        n = 2;
        e += 64;
    }
    if (e < cn) w[n++] = decode32(pr + e / 2, block_table(code, decoded[e / 32], decoded[e / 32]));  // a block of 32
    return n;
}

// Four rows' decoded 128 codes `w` into the sums of ni (1 or 2) inputs at x (row stride ldx): total[rr * ldt + j]
// for row rr and input j, held in registers across the group's 16 vdpbf16ps a row.
BF16 static inline void dot_group(const __m512i w[4][4], const uint16_t *x, size_t ldx, int ni, __m512 *total, size_t ldt) {
    __m512 acc[4][2];
    for (int j = 0; j < ni; j++)
        for (int rr = 0; rr < 4; rr++) acc[rr][j] = total[rr * ldt + j];
    for (int k = 0; k < 4; k++)
        for (int j = 0; j < ni; j++) {
            __m512bh xv = (__m512bh)_mm512_loadu_si512((const void *)(x + j * ldx + 32 * k));
            for (int rr = 0; rr < 4; rr++) acc[rr][j] = _mm512_dpbf16_ps(acc[rr][j], (__m512bh)w[rr][k], xv);
        }
    for (int j = 0; j < ni; j++)
        for (int rr = 0; rr < 4; rr++) total[rr * ldt + j] = acc[rr][j];
}

// One input (decoding a single sequence): eight rows at a time, each row's sum in a register over the whole row
// piece instead of going through memory every 128 codes (eight chains of vdpbf16ps in flight). Each sum takes the
// same operations in the same order as one input's sum in the batched loop (the same group_bf16 and tail_bf16, one
// vdpbf16ps chain, the same reduction), so that a sequence's 4-bit products get the same bits in a batch as alone.
BF16 static void gemm4_bf16_one(const uint16_t *xb, const uint8_t *packed, const qk_block_scales *scales, size_t first_block,
                                size_t rows, size_t cols, size_t blocksize, __m512 table16, float *y) {
    enum { R = 8 };
    const int two = blocksize == 32;
    size_t nb = cols / blocksize;
    float decoded[R][SCALE_BUFFER];
    for (size_t r0 = 0; r0 < rows; r0 += R) {
        size_t m = rows - r0 < R ? rows - r0 : R;
        for (size_t b0 = 0; b0 < nb; b0 += SCALE_BUFFER) {
            size_t nbp = nb - b0 < SCALE_BUFFER ? nb - b0 : SCALE_BUFFER;
            size_t c0 = b0 * blocksize, cn = nbp * blocksize, gp = cn / 128;
            for (size_t rr = 0; rr < m; rr++) decode_scales_avx512(scales, first_block + (r0 + rr) * nb + b0, nbp, decoded[rr]);
            __m512 acc[R];
            for (int rr = 0; rr < R; rr++) acc[rr] = _mm512_setzero_ps();
            for (size_t g = 0; g < gp; g++) {
                const uint16_t *xg = xb + c0 + 128 * g;
                for (int rr = 0; rr < R; rr++) {
                    size_t row = (size_t)rr < m ? (size_t)rr : 0;  // rows past the last repeat it (their sums are dropped)
                    const uint8_t *pg = packed + (r0 + row) * (cols / 2) + (c0 + 128 * g) / 2;
                    if (r0 + R < rows) _mm_prefetch((const char *)(pg + R * (cols / 2)), _MM_HINT_T0);
                    __m512i w[4];
                    group_bf16(pg, table16, decoded[row], g, blocksize, two, w);
                    for (int k = 0; k < 4; k++) acc[rr] = _mm512_dpbf16_ps(acc[rr], (__m512bh)w[k], (__m512bh)_mm512_loadu_si512((const void *)(xg + 32 * k)));
                }
            }
            for (size_t rr = 0; rr < m; rr++) {  // the piece's last 32 to 96 codes, as the batched loop takes them
                __m512i w[3];
                int nt = tail_bf16(packed + (r0 + rr) * (cols / 2) + c0 / 2, table16, decoded[rr], 128 * gp, cn, blocksize, two, w);
                for (int j = 0; j < nt; j++)
                    acc[rr] = _mm512_dpbf16_ps(acc[rr], (__m512bh)w[j], (__m512bh)_mm512_loadu_si512((const void *)(xb + c0 + 128 * gp + 32 * j)));
            }
            for (size_t rr = 0; rr < m; rr++) {
                float v = _mm512_reduce_add_ps(acc[rr]);
                y[r0 + rr] = b0 == 0 ? v : y[r0 + rr] + v;
            }
        }
    }
}

void qk_gemm4_bf16_avx512bf16(const uint16_t *xb, size_t nx, const uint8_t *packed, const qk_block_scales *scales,
                              size_t first_block, size_t rows, size_t cols, size_t blocksize, const float *code, float *y, size_t ldy) BF16;
void qk_gemm4_bf16_avx512bf16(const uint16_t *xb, size_t nx, const uint8_t *packed, const qk_block_scales *scales,
                              size_t first_block, size_t rows, size_t cols, size_t blocksize, const float *code, float *y, size_t ldy) {
    // A 64-code chunk takes one block's table (two for blocks of 32), and a 128-code group one table from 128 on.
    if (blocksize % 32 != 0 || (blocksize > 64 && blocksize % 128 != 0)) {
        qk_gemm4_bf16_reference(xb, nx, packed, scales, first_block, rows, cols, blocksize, code, y, ldy);
        return;
    }
    if (nx == 1) {
        gemm4_bf16_one(xb, packed, scales, first_block, rows, cols, blocksize, _mm512_loadu_ps(code), y);
        return;
    }
    // Four rows at a time: each 128 codes of the four decode once into 16 bf16 vectors (registers), then go into
    // the inputs two at a time (dot_group), each vdpbf16ps two multiply-adds a lane, the (row, input) sums kept in `total`.
    const __m512 table16 = _mm512_loadu_ps(code);
    const int two = blocksize == 32;
    size_t nb = cols / blocksize;
    enum { R = 4 };
    __m512 total[R][GEMM_CHUNK];
    float decoded[R][SCALE_BUFFER];
    for (size_t r0 = 0; r0 < rows; r0 += R) {
        size_t m = rows - r0 < R ? rows - r0 : R;
        for (size_t b0 = 0; b0 < nb; b0 += SCALE_BUFFER) {  // row pieces of SCALE_BUFFER blocks (one for most matrices)
            size_t nbp = nb - b0 < SCALE_BUFFER ? nb - b0 : SCALE_BUFFER;
            size_t c0 = b0 * blocksize, cn = nbp * blocksize, gp = cn / 128;
            for (size_t rr = 0; rr < m; rr++) decode_scales_avx512(scales, first_block + (r0 + rr) * nb + b0, nbp, decoded[rr]);
            for (size_t i0 = 0; i0 < nx; i0 += GEMM_CHUNK) {
                size_t n = nx - i0 < GEMM_CHUNK ? nx - i0 : GEMM_CHUNK;
                for (size_t rr = 0; rr < R; rr++)
                    for (size_t i = 0; i < n; i++) total[rr][i] = _mm512_setzero_ps();
                for (size_t g = 0; g < gp; g++) {
                    __m512i w[R][4];
                    for (size_t rr = 0; rr < R; rr++) {
                        size_t row = rr < m ? rr : 0;  // rows past the last repeat it (their sums are dropped)
                        const uint8_t *pg = packed + (r0 + row) * (cols / 2) + (c0 + 128 * g) / 2;
                        if (r0 + R < rows) _mm_prefetch((const char *)(pg + R * (cols / 2)), _MM_HINT_T0);
                        group_bf16(pg, table16, decoded[row], g, blocksize, two, w[rr]);
                    }
                    size_t ib = 0;
                    for (; ib + 2 <= n; ib += 2) dot_group(w, xb + (i0 + ib) * cols + c0 + 128 * g, cols, 2, &total[0][ib], GEMM_CHUNK);
                    if (ib < n) dot_group(w, xb + (i0 + ib) * cols + c0 + 128 * g, cols, 1, &total[0][ib], GEMM_CHUNK);
                }
                for (size_t rr = 0; rr < m; rr++) {  // the piece's last 32 to 96 codes
                    __m512i w[3];
                    int nt = tail_bf16(packed + (r0 + rr) * (cols / 2) + c0 / 2, table16, decoded[rr], 128 * gp, cn, blocksize, two, w);
                    for (size_t i = 0; i < n; i++)
                        for (int j = 0; j < nt; j++)
                            total[rr][i] = _mm512_dpbf16_ps(total[rr][i], (__m512bh)w[j],
                                                            (__m512bh)_mm512_loadu_si512((const void *)(xb + (i0 + i) * cols + c0 + 128 * gp + 32 * j)));
                }
                for (size_t rr = 0; rr < m; rr++)
                    for (size_t i = 0; i < n; i++) {
                        float v = _mm512_reduce_add_ps(total[rr][i]);
                        float *yi = &y[(i0 + i) * ldy + r0 + rr];
                        *yi = b0 == 0 ? v : *yi + v;
                    }
            }
        }
    }
}

// A q8_0 block's 32 codes as f32 (not yet scaled), in two vectors.
AVX512 static inline void load_q8_block_avx512(const int8_t *qb, __m512 *w0, __m512 *w1) {
    *w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)qb)));
    *w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(qb + 16))));
}

void qk_gemv8_avx512(const float *x, const int8_t *q, const float *scales, size_t rows, size_t cols, float *y) AVX512;
void qk_gemv8_avx512(const float *x, const int8_t *q, const float *scales, size_t rows, size_t cols, float *y) {
    size_t nb = cols / 32;
    for (size_t r = 0; r < rows; r++) {
        const int8_t *qr = q + r * cols;
        const float *sr = scales + r * nb;
        __m512 t0 = _mm512_setzero_ps(), t1 = _mm512_setzero_ps();
        size_t b = 0;
        for (; b + 2 <= nb; b += 2) {
            // A row of the head is read once per token, from memory: fetching 2 KB ahead measured 12 -> 16-18
            // G multiply-adds/s on a Zen 4 core (the 4-bit rows, more compute a byte, gained nothing from it).
            _mm_prefetch((const char *)(qr + 32 * b + 2048), _MM_HINT_T0);
            __m512 w0, w1, v0, v1;
            load_q8_block_avx512(qr + 32 * b, &w0, &w1);
            load_q8_block_avx512(qr + 32 * b + 32, &v0, &v1);
            const float *xb = x + 32 * b;
            __m512 a = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xb + 16), _mm512_mul_ps(w0, _mm512_loadu_ps(xb)));
            __m512 c = _mm512_fmadd_ps(v1, _mm512_loadu_ps(xb + 48), _mm512_mul_ps(v0, _mm512_loadu_ps(xb + 32)));
            t0 = _mm512_fmadd_ps(a, _mm512_set1_ps(sr[b]), t0);
            t1 = _mm512_fmadd_ps(c, _mm512_set1_ps(sr[b + 1]), t1);
        }
        if (b < nb) {
            __m512 w0, w1;
            load_q8_block_avx512(qr + 32 * b, &w0, &w1);
            const float *xb = x + 32 * b;
            __m512 a = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xb + 16), _mm512_mul_ps(w0, _mm512_loadu_ps(xb)));
            t0 = _mm512_fmadd_ps(a, _mm512_set1_ps(sr[b]), t0);
        }
        y[r] = _mm512_reduce_add_ps(_mm512_add_ps(t0, t1));
    }
}

// Four inputs and more: four rows' codes, scaled, decoded once into `w` (16 KB, in L1) a piece of columns at a time,
// then each four inputs multiplied with the 16 (row, input) sums in registers: a 16-column step loads four weights
// and four inputs for 16 multiply-adds (the loop below loads and stores each input's sums at every block). Batched
// decoding on Zen 5, three interleaved pairs: 16 sequences 454-470 -> 545-574 tokens/s, 4 sequences 309-350 -> 376-390.
AVX512 static void gemm8_blocked_avx512(const float *x, size_t nx, const int8_t *q, const float *scales, size_t rows, size_t cols, float *y,
                                        size_t ldy) {
    enum { R = 4, NI = 4, CC = 1024 };
    float w[R][CC];
    __m512 total[R][GEMM_CHUNK];
    size_t nb = cols / 32;
    for (size_t i0 = 0; i0 < nx; i0 += GEMM_CHUNK) {
        size_t n = nx - i0 < GEMM_CHUNK ? nx - i0 : GEMM_CHUNK;
        for (size_t r0 = 0; r0 < rows; r0 += R) {
            size_t m = rows - r0 < R ? rows - r0 : R;
            for (size_t rr = 0; rr < R; rr++)
                for (size_t i = 0; i < n; i++) total[rr][i] = _mm512_setzero_ps();
            for (size_t c0 = 0; c0 < cols; c0 += CC) {
                size_t cc = cols - c0 < CC ? cols - c0 : CC;
                for (size_t rr = 0; rr < R; rr++) {
                    size_t row = r0 + (rr < m ? rr : 0);  // rows past the last repeat the first (their sums are dropped)
                    for (size_t b = c0 / 32; b < (c0 + cc) / 32; b++) {
                        __m512 scale = _mm512_set1_ps(scales[row * nb + b]);
                        __m512 w0, w1;
                        load_q8_block_avx512(q + row * cols + 32 * b, &w0, &w1);
                        _mm512_storeu_ps(&w[rr][32 * b - c0], _mm512_mul_ps(w0, scale));
                        _mm512_storeu_ps(&w[rr][32 * b - c0 + 16], _mm512_mul_ps(w1, scale));
                    }
                }
                for (size_t ib = 0; ib < n; ib += NI) {
                    const float *xs[NI];
                    __m512 acc[R][NI];
                    for (int j = 0; j < NI; j++) {
                        size_t i = ib + j < n ? ib + j : n - 1;  // inputs past the last repeat it (their sums are not stored)
                        xs[j] = x + (i0 + i) * cols + c0;
                        for (int rr = 0; rr < R; rr++) acc[rr][j] = total[rr][i];
                    }
                    for (size_t c = 0; c < cc; c += 16) {
                        __m512 xv[NI];
                        for (int j = 0; j < NI; j++) xv[j] = _mm512_loadu_ps(xs[j] + c);
                        for (int rr = 0; rr < R; rr++) {
                            __m512 wv = _mm512_loadu_ps(&w[rr][c]);
                            for (int j = 0; j < NI; j++) acc[rr][j] = _mm512_fmadd_ps(wv, xv[j], acc[rr][j]);
                        }
                    }
                    for (int j = 0; j < NI; j++)
                        if (ib + j < n)
                            for (int rr = 0; rr < R; rr++) total[rr][ib + j] = acc[rr][j];
                }
            }
            for (size_t rr = 0; rr < m; rr++)
                for (size_t i = 0; i < n; i++) y[(i0 + i) * ldy + r0 + rr] = _mm512_reduce_add_ps(total[rr][i]);
        }
    }
}

void qk_gemm8_avx512(const float *x, size_t nx, const int8_t *q, const float *scales, size_t rows, size_t cols, float *y, size_t ldy) AVX512;
void qk_gemm8_avx512(const float *x, size_t nx, const int8_t *q, const float *scales, size_t rows, size_t cols, float *y, size_t ldy) {
    if (nx == 1) { qk_gemv8_avx512(x, q, scales, rows, cols, y); return; }
    if (nx >= 4) { gemm8_blocked_avx512(x, nx, q, scales, rows, cols, y, ldy); return; }
    size_t nb = cols / 32;
    enum { R = 4 };
    __m512 total[R][GEMM_CHUNK][2];
    for (size_t i0 = 0; i0 < nx; i0 += GEMM_CHUNK) {
        size_t n = nx - i0 < GEMM_CHUNK ? nx - i0 : GEMM_CHUNK;
        for (size_t r0 = 0; r0 < rows; r0 += R) {
            size_t m = rows - r0 < R ? rows - r0 : R;
            for (size_t rr = 0; rr < m; rr++)
                for (size_t i = 0; i < n; i++) total[rr][i][0] = total[rr][i][1] = _mm512_setzero_ps();
            for (size_t b = 0; b < nb; b++) {
                for (size_t rr = 0; rr < m; rr++) {
                    __m512 scale = _mm512_set1_ps(scales[(r0 + rr) * nb + b]);
                    __m512 w0, w1;
                    load_q8_block_avx512(q + (r0 + rr) * cols + 32 * b, &w0, &w1);
                    w0 = _mm512_mul_ps(w0, scale);
                    w1 = _mm512_mul_ps(w1, scale);
                    for (size_t i = 0; i < n; i++) {
                        const float *xb = x + (i0 + i) * cols + 32 * b;
                        total[rr][i][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xb), total[rr][i][0]);
                        total[rr][i][1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xb + 16), total[rr][i][1]);
                    }
                }
            }
            for (size_t rr = 0; rr < m; rr++)
                for (size_t i = 0; i < n; i++) y[(i0 + i) * ldy + r0 + rr] = _mm512_reduce_add_ps(_mm512_add_ps(total[rr][i][0], total[rr][i][1]));
        }
    }
}

// 16 bf16 values as f32.
AVX512 static inline __m512 load_bf16x16(const uint16_t *w) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)w)), 16));
}

void qk_gemv_bf16_avx512(const float *x, const uint16_t *w, size_t rows, size_t cols, float *y) AVX512;
void qk_gemv_bf16_avx512(const float *x, const uint16_t *w, size_t rows, size_t cols, float *y) {
    for (size_t r = 0; r < rows; r++) {
        const uint16_t *wr = w + r * cols;
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
        size_t j = 0;
        for (; j + 32 <= cols; j += 32) {
            a0 = _mm512_fmadd_ps(load_bf16x16(wr + j), _mm512_loadu_ps(x + j), a0);
            a1 = _mm512_fmadd_ps(load_bf16x16(wr + j + 16), _mm512_loadu_ps(x + j + 16), a1);
        }
        float tail = 0.0f;
        qk_gemv_bf16_reference(x + j, wr + j, 1, cols - j, &tail);
        y[r] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1)) + tail;
    }
}

void qk_gemm_bf16_avx512(const float *x, size_t nx, const uint16_t *w, size_t rows, size_t cols, float *y, size_t ldy) AVX512;
void qk_gemm_bf16_avx512(const float *x, size_t nx, const uint16_t *w, size_t rows, size_t cols, float *y, size_t ldy) {
    if (nx == 1) { qk_gemv_bf16_avx512(x, w, rows, cols, y); return; }
    size_t c32 = cols & ~(size_t)31;
    __m512 acc[GEMM_CHUNK];
    for (size_t i0 = 0; i0 < nx; i0 += GEMM_CHUNK) {
        size_t n = nx - i0 < GEMM_CHUNK ? nx - i0 : GEMM_CHUNK;
        for (size_t r = 0; r < rows; r++) {
            const uint16_t *wr = w + r * cols;
            for (size_t i = 0; i < n; i++) acc[i] = _mm512_setzero_ps();
            for (size_t j = 0; j < c32; j += 32) {
                __m512 w0 = load_bf16x16(wr + j), w1 = load_bf16x16(wr + j + 16);
                for (size_t i = 0; i < n; i++) {
                    const float *xj = x + (i0 + i) * cols + j;
                    acc[i] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xj + 16), _mm512_fmadd_ps(w0, _mm512_loadu_ps(xj), acc[i]));
                }
            }
            for (size_t i = 0; i < n; i++) {
                float tail = 0.0f;
                qk_gemv_bf16_reference(x + (i0 + i) * cols + c32, wr + c32, 1, cols - c32, &tail);
                y[(i0 + i) * ldy + r] = _mm512_reduce_add_ps(acc[i]) + tail;
            }
        }
    }
}

#else
void qk_gemm4_bf16_prepare_avx512bf16(const float *x, size_t cols, uint16_t *xb) { qk_gemm4_bf16_prepare_reference(x, cols, xb); }
void qk_gemm4_bf16_avx512bf16(const uint16_t *xb, size_t nx, const uint8_t *p, const qk_block_scales *s, size_t fb, size_t rows,
                              size_t cols, size_t bs, const float *code, float *y, size_t ldy) {
    qk_gemm4_bf16_reference(xb, nx, p, s, fb, rows, cols, bs, code, y, ldy);
}
// Not x86-64: every entry point runs the reference (qk_cpu_supports reports 0 for the vector levels).
void qk_gemv4_prepare_avx512(const float *x, size_t cols, float *xp) { qk_gemv4_prepare_reference(x, cols, xp); }
void qk_gemv4_avx512(const float *x, const float *xp, const uint8_t *p, const qk_block_scales *s, size_t fb, size_t rows, size_t cols,
                     size_t bs, const float *code, float *y) { qk_gemv4_reference(x, xp, p, s, fb, rows, cols, bs, code, y); }
void qk_gemv8_avx512(const float *x, const int8_t *q, const float *s, size_t rows, size_t cols, float *y) { qk_gemv8_reference(x, q, s, rows, cols, y); }
void qk_gemv_bf16_avx512(const float *x, const uint16_t *w, size_t rows, size_t cols, float *y) { qk_gemv_bf16_reference(x, w, rows, cols, y); }
void qk_gemm4_avx512(const float *x, const float *xp, size_t nx, const uint8_t *p, const qk_block_scales *s, size_t fb, size_t rows,
                     size_t cols, size_t bs, const float *code, float *y, size_t ldy) { qk_gemm4_reference(x, xp, nx, p, s, fb, rows, cols, bs, code, y, ldy); }
void qk_gemm8_avx512(const float *x, size_t nx, const int8_t *q, const float *s, size_t rows, size_t cols, float *y, size_t ldy) { qk_gemm8_reference(x, nx, q, s, rows, cols, y, ldy); }
void qk_gemm_bf16_avx512(const float *x, size_t nx, const uint16_t *w, size_t rows, size_t cols, float *y, size_t ldy) { qk_gemm_bf16_reference(x, nx, w, rows, cols, y, ldy); }
#endif
