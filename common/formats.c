/* Scalar number formats, bit-exact and portable: every conversion works on the fp32 bit
 * pattern with integer arithmetic, so the result does not depend on the FPU's rounding mode,
 * flush-to-zero settings or compiler contraction. */
#include "common/formats.h"

#include <math.h>
#include <string.h>

static uint32_t f32_bits(float x) {
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    return u;
}

static float f32_from_bits(uint32_t u) {
    float x;
    memcpy(&x, &u, sizeof x);
    return x;
}

/* 2^e for e in [-149, 127], built from bits (exact, including the fp32 subnormals). */
static float pow2f(int e) {
    if (e >= -126) return f32_from_bits((uint32_t)(e + 127) << 23);
    return f32_from_bits(1u << (e + 149));
}

/* Round a finite, non-negative fp32 (given as bits) to a binary format with `mant_bits`
 * explicit mantissa bits and smallest normal exponent `emin` (below it: subnormals with the
 * fixed quantum 2^(emin - mant_bits)), round-to-nearest-even. Returns the magnitude code
 * (exponent field << mant_bits | mantissa) of the rounded value; a result past the format's
 * largest finite value comes back as a larger code, which the caller saturates or maps to Inf.
 *
 * Why this one formula covers normals, subnormals and carries: with E' = max(E, emin) and
 * q = round(|x| / 2^(E' - mant_bits)), the code is ((E' - emin) << mant_bits) + q. For a normal
 * q has its implicit bit set (q >= 2^mant_bits), which adds 1 to the exponent field; for a
 * subnormal it does not; a rounding carry (q == 2^(mant_bits+1)) moves to the next binade. */
static uint32_t round_magnitude(uint32_t abs_bits, int mant_bits, int emin) {
    uint32_t exp_field = abs_bits >> 23;
    uint32_t significand = abs_bits & 0x7fffffu;
    int exponent = -126; /* fp32 subnormal: no implicit bit, exponent fixed at -126 */
    if (exp_field != 0) {
        significand |= 0x800000u;
        exponent = (int)exp_field - 127;
    }
    if (significand == 0) return 0;
    int kept_exponent = exponent > emin ? exponent : emin;
    /* |x| = significand * 2^(exponent - 23); drop this many low bits to reach the quantum. */
    int shift = 23 - mant_bits + (kept_exponent - exponent);
    if (shift > 24) return 0; /* below half the smallest step: rounds to zero */
    uint32_t q = significand >> shift;
    uint32_t rest = significand & ((1u << shift) - 1u);
    uint32_t half = 1u << (shift - 1);
    if (rest > half || (rest == half && (q & 1u))) q++;
    return ((uint32_t)(kept_exponent - emin) << mant_bits) + q;
}

/* ---- FP4 E2M1: 2 exponent bits (bias 1), 1 mantissa bit; code 1 is the subnormal 0.5 ---- */

float epmoe_e2m1_to_float(uint8_t code) {
    static const float magnitude[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
    float v = magnitude[code & 0x7];
    return (code & 0x8) ? -v : v;
}

uint8_t epmoe_float_to_e2m1_satfinite(float x) { return epmoe_e2m1_rn_satfinite_inline(x); }

/* ---- FP8 E4M3 fn: 4 exponent bits (bias 7), 3 mantissa bits, 0x7f/0xff NaN, no Inf ---- */

float epmoe_e4m3_to_float(uint8_t code) {
    uint32_t exp_field = (code >> 3) & 0xf, mant = code & 0x7;
    float v;
    if (exp_field == 0xf && mant == 0x7) return NAN;
    if (exp_field == 0)
        v = (float)mant * pow2f(-9);
    else
        v = (float)(8 + mant) * pow2f((int)exp_field - 7 - 3);
    return (code & 0x80) ? -v : v;
}

uint8_t epmoe_float_to_e4m3_satfinite(float x) {
    uint32_t bits = f32_bits(x);
    uint8_t sign = (uint8_t)((bits >> 24) & 0x80);
    uint32_t abs_bits = bits & 0x7fffffffu;
    if (abs_bits > 0x7f800000u) return sign | 0x7f;               /* NaN stays NaN */
    if (abs_bits >= f32_bits(EPMOE_E4M3_MAX)) return sign | 0x7e; /* includes Inf */
    uint32_t m = round_magnitude(abs_bits, 3, -6);
    if (m > 0x7e) m = 0x7e; /* never 0x7f, which is NaN */
    return (uint8_t)(sign | m);
}

/* ---- UE8M0 ---- */

float epmoe_ue8m0_to_float(uint8_t code) {
    if (code == 0xff) return NAN;
    return pow2f((int)code - 127);
}

/* ---- bf16 and fp16 ---- */

float epmoe_bf16_to_float(uint16_t bits) { return f32_from_bits((uint32_t)bits << 16); }

uint16_t epmoe_float_to_bf16(float x) {
    uint32_t bits = f32_bits(x);
    uint16_t sign = (uint16_t)((bits >> 16) & 0x8000);
    uint32_t abs_bits = bits & 0x7fffffffu;
    if (abs_bits > 0x7f800000u) return (uint16_t)(sign | 0x7fc0 | ((abs_bits >> 16) & 0x3f));
    if (abs_bits == 0x7f800000u) return sign | 0x7f80;
    uint32_t m = round_magnitude(abs_bits, 7, -126);
    if (m > 0x7f80) m = 0x7f80; /* rounding past the largest finite value is Inf */
    return (uint16_t)(sign | m);
}

float epmoe_fp16_to_float(uint16_t bits) {
    uint32_t sign = (uint32_t)(bits & 0x8000) << 16;
    uint32_t exp_field = (bits >> 10) & 0x1f, mant = bits & 0x3ff;
    if (exp_field == 0x1f) /* Inf, or NaN keeping the payload's top bits */
        return f32_from_bits(sign | 0x7f800000u | (mant << 13));
    float v = exp_field == 0 ? (float)mant * pow2f(-24)
                             : (float)(0x400 + mant) * pow2f((int)exp_field - 15 - 10);
    return (bits & 0x8000) ? -v : v;
}

uint16_t epmoe_float_to_fp16(float x) {
    uint32_t bits = f32_bits(x);
    uint16_t sign = (uint16_t)((bits >> 16) & 0x8000);
    uint32_t abs_bits = bits & 0x7fffffffu;
    if (abs_bits > 0x7f800000u) return (uint16_t)(sign | 0x7e00 | ((abs_bits >> 13) & 0x1ff));
    if (abs_bits >= 0x47800000u) return sign | 0x7c00; /* >= 65536 (and Inf): Inf */
    uint32_t m = round_magnitude(abs_bits, 10, -14);
    if (m > 0x7c00) m = 0x7c00; /* [65520, 65536) rounds up to Inf under RNE */
    return (uint16_t)(sign | m);
}
