/* FP8 activation blocks and the exact FP8 form of FP4 weights (common/fp8.h). */
#include "common/fp8.h"

#include <math.h>
#include <string.h>

#include "common/formats.h"

int epmoe_fp8_block_exp(float amax) {
    uint32_t bits;
    memcpy(&bits, &amax, sizeof bits);
    return epmoe_fp8_block_exp_of_bits(bits);
}

void epmoe_fp8_quantize_row(const float *x, size_t K, uint8_t *codes, uint8_t *block_e8m0) {
    for (size_t b0 = 0; b0 < K; b0 += EPMOE_FP8_BLOCK) {
        size_t n = K - b0 < EPMOE_FP8_BLOCK ? K - b0 : EPMOE_FP8_BLOCK;
        float amax = 0.0f;
        for (size_t i = 0; i < n; i++) amax = fmaxf(amax, fabsf(x[b0 + i]));
        int e = epmoe_fp8_block_exp(amax);
        block_e8m0[b0 / EPMOE_FP8_BLOCK] = (uint8_t)(e + 127);
        for (size_t i = 0; i < n; i++)
            codes[b0 + i] = epmoe_float_to_e4m3_satfinite(ldexpf(x[b0 + i], -e));
    }
}

void epmoe_fp8_dequantize_row(const uint8_t *codes, const uint8_t *block_e8m0, size_t K,
                              float *out) {
    for (size_t k = 0; k < K; k++)
        out[k] = ldexpf(epmoe_e4m3_to_float(codes[k]), (int)block_e8m0[k / EPMOE_FP8_BLOCK] - 127);
}

size_t epmoe_fp4_to_fp8_weights(const uint8_t *codes, const uint8_t *block_sf, size_t rows,
                                size_t K, uint8_t *e4m3, uint8_t *group_e8m0) {
    enum { G = EPMOE_FP8_BLOCK };
    size_t inexact = 0;
    float v[G];
    for (size_t r = 0; r < rows; r++) {
        for (size_t g0 = 0; g0 < K; g0 += G) {
            float amax = 0.0f;
            for (size_t i = 0; i < G; i++) {
                size_t k = g0 + i;
                uint8_t byte = codes[r * (K / 2) + k / 2];
                float sf = epmoe_e4m3_to_float(block_sf[r * (K / 16) + k / 16]);
                v[i] = epmoe_e2m1_to_float(k % 2 ? byte >> 4 : byte & 0xf) * sf; /* exact */
                amax = fmaxf(amax, fabsf(v[i]));
            }
            int e = epmoe_fp8_block_exp(amax);
            group_e8m0[r * (K / G) + g0 / G] = (uint8_t)(e + 127);
            int exact = 1;
            for (size_t i = 0; i < G; i++) {
                uint8_t c = epmoe_float_to_e4m3_satfinite(ldexpf(v[i], -e));
                e4m3[r * K + g0 + i] = c;
                exact &= ldexpf(epmoe_e4m3_to_float(c), e) == v[i];
            }
            inexact += !exact;
        }
    }
    return inexact;
}
