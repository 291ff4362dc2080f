#include "tests/ref/ref_formats.h"

#include <math.h>

double epmoe_ref_e2m1_value(uint8_t code) {
    int sign = (code >> 3) & 1, exponent = (code >> 1) & 3, mantissa = code & 1;
    /* exponent 0: subnormal 0.m x 2^0 (bias 1); else 1.m x 2^(e - 1) */
    double v = exponent == 0 ? 0.5 * mantissa : (1.0 + 0.5 * mantissa) * ldexp(1.0, exponent - 1);
    return sign ? -v : v;
}

double epmoe_ref_e4m3_value(uint8_t code) {
    if ((code & 0x7f) == 0x7f) return NAN; /* the fn variant: no Inf, S.1111.111 is NaN */
    int sign = code >> 7, exponent = (code >> 3) & 0xf, mantissa = code & 7;
    double v = exponent == 0 ? mantissa / 8.0 * ldexp(1.0, -6)
                             : (1.0 + mantissa / 8.0) * ldexp(1.0, exponent - 7);
    return sign ? -v : v;
}

double epmoe_ref_ue8m0_value(uint8_t code) { return code == 0xff ? NAN : ldexp(1.0, code - 127); }

double epmoe_ref_bf16_value(uint16_t code) {
    int sign = code >> 15, exponent = (code >> 7) & 0xff, mantissa = code & 0x7f;
    double v = exponent == 0xff ? (mantissa ? NAN : INFINITY)
               : exponent == 0 ? mantissa / 128.0 * ldexp(1.0, -126)
                               : (1.0 + mantissa / 128.0) * ldexp(1.0, exponent - 127);
    return sign ? -v : v;
}

/* The non-negative code in [0, n_codes) nearest to a >= 0 (values increasing with the code),
 * ties to the even code; beyond the largest value, the largest. */
static uint8_t nearest_code(double a, int n_codes, double (*value)(uint8_t)) {
    /* saturate first: far beyond the largest value every distance rounds to the same double */
    if (a >= value((uint8_t)(n_codes - 1))) return (uint8_t)(n_codes - 1);
    int best = 0;
    double best_d = INFINITY;
    for (int c = 0; c < n_codes; c++) {
        double d = fabs(a - value((uint8_t)c));
        if (d < best_d || (d == best_d && (c & 1) == 0)) {
            best = c;
            best_d = d;
        }
    }
    return (uint8_t)best;
}

uint8_t epmoe_ref_e2m1_encode(float x) {
    if (isnan(x)) return 0;
    uint8_t code = nearest_code(fabs((double)x), 8, epmoe_ref_e2m1_value);
    return signbit(x) ? (uint8_t)(code | 0x8) : code;
}

uint8_t epmoe_ref_e4m3_encode(float x) {
    if (isnan(x)) return 0;
    uint8_t code = nearest_code(fabs((double)x), 0x7f, epmoe_ref_e4m3_value); /* 0x7e = 448 */
    return signbit(x) ? (uint8_t)(code | 0x80) : code;
}

float epmoe_ref_nvfp4_global_sf(float amax) {
    if (amax == 0.0f) return 1.0f;
    float gs = (448.0f * 6.0f) / amax; /* 2688 exactly, then one fp32 division */
    return isfinite(gs) ? gs : 1.0f;
}

float epmoe_ref_amax(const float *x, size_t n) {
    float amax = 0.0f;
    for (size_t i = 0; i < n; i++)
        if (fabsf(x[i]) > amax) amax = fabsf(x[i]);
    return amax;
}

size_t epmoe_ref_nvfp4_quantize(const float *x, size_t K, float global_sf, uint8_t *codes,
                                uint8_t *sf) {
    size_t saturated = 0;
    for (size_t b = 0; b < K / 16; b++) {
        const float *xb = x + 16 * b;
        float block_amax = epmoe_ref_amax(xb, 16);
        float sf_arg = global_sf * block_amax; /* fp32, in the spec's order */
        sf_arg = sf_arg / 6.0f;
        sf[b] = epmoe_ref_e4m3_encode(sf_arg);
        float sf_value = (float)epmoe_ref_e4m3_value(sf[b]); /* exact in fp32 */
        for (size_t i = 0; i < 16; i++) {
            if (sf_value == 0.0f) { /* a block scale that rounded to 0: every code 0 */
                codes[16 * b + i] = 0;
                continue;
            }
            float scaled = xb[i] * global_sf;
            scaled = scaled / sf_value;
            if (fabsf(scaled) > 6.0f) saturated++;
            codes[16 * b + i] = epmoe_ref_e2m1_encode(scaled);
        }
    }
    return saturated;
}

uint8_t epmoe_ref_nibble(const uint8_t *packed, size_t k) {
    return (uint8_t)(k % 2 == 0 ? packed[k / 2] & 0xf : packed[k / 2] >> 4);
}

void epmoe_ref_fp8_quantize(const float *x, size_t K, uint8_t *codes, int *exps) {
    for (size_t b0 = 0, b = 0; b0 < K; b0 += 128, b++) {
        size_t n = K - b0 < 128 ? K - b0 : 128;
        double amax = epmoe_ref_amax(x + b0, n);
        int e = 0;
        if (amax > 0) {
            e = -140;
            while (amax > 448.0 * ldexp(1.0, e)) e++;
            if (e < -109) e = -109;
            if (e > 127) e = 127;
        }
        exps[b] = e;
        for (size_t i = 0; i < n; i++)
            codes[b0 + i] = epmoe_ref_e4m3_encode((float)ldexp((double)x[b0 + i], -e));
    }
}
