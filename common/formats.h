/* Scalar number formats: FP4 E2M1, FP8 E4M3 (fn: no Inf, one NaN pair), UE4M3 scales,
 * UE8M0 (power-of-two scales), bf16 and fp16. Pure functions, no state; the CUDA kernels
 * implement the same rounding and are tested bit-for-bit against these.
 *
 * Rounding is always round-to-nearest-even. "satfinite" means values beyond the largest
 * finite magnitude become that magnitude (with sign) instead of Inf/NaN.
 */
#ifndef EPMOE_FORMATS_H
#define EPMOE_FORMATS_H

#include <math.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- FP4 E2M1: 4-bit code, bit 3 = sign; magnitudes {0,0.5,1,1.5,2,3,4,6} ---- */
#define EPMOE_E2M1_MAX 6.0f
float epmoe_e2m1_to_float(uint8_t code);           /* low 4 bits used */
/* E2M1 round-to-nearest-even by comparison with the midpoints between neighbouring values:
 * a midpoint goes up where the upper neighbour's code is even (0.75 -> 1, 1.75 -> 2, 3.5 -> 4)
 * and down elsewhere (0.25 -> 0, 1.25 -> 1, 2.5 -> 2, 5 -> 4); past 5 everything is 6. Exact
 * (every midpoint is an fp32), inlined where quantizers run it per element. */
static inline uint8_t epmoe_e2m1_rn_satfinite_inline(float x) {
    float a = x < 0.0f ? -x : x;
    int m = (a > 0.25f) + (a >= 0.75f) + (a > 1.25f) + (a >= 1.75f) + (a > 2.5f) + (a >= 3.5f) +
            (a > 5.0f);
    return (uint8_t)((signbit(x) && x == x ? 0x8 : 0) | m); /* NaN: 0 */
}
uint8_t epmoe_float_to_e2m1_satfinite(float x);    /* RNE, |x|>6 -> 6; NaN -> 0 (inputs are
                                                      validated before quantization) */

/* ---- FP8 E4M3 (the "fn" variant): bias 7, max 448, subnormals down to 2^-9 ---- */
#define EPMOE_E4M3_MAX 448.0f
float epmoe_e4m3_to_float(uint8_t code);           /* 0x7f/0xff decode to NaN */
uint8_t epmoe_float_to_e4m3_satfinite(float x);    /* RNE, saturates to +-448 */

/* ---- UE8M0: an unsigned exponent byte, value 2^(code-127); 0xff is NaN ---- */
float epmoe_ue8m0_to_float(uint8_t code);

/* ---- 16-bit floats (storage only; arithmetic is done in fp32) ---- */
float epmoe_bf16_to_float(uint16_t bits);
uint16_t epmoe_float_to_bf16(float x);             /* RNE, NaN stays NaN */
float epmoe_fp16_to_float(uint16_t bits);
uint16_t epmoe_float_to_fp16(float x);             /* RNE, overflow -> Inf */

#ifdef __cplusplus
}
#endif
#endif
