/* The number formats of the float64 reference, written from their definitions (DESIGN §3, the
 * OCP MX spec for E2M1 and E8M0, the fn variant of FP8 E4M3), sharing no code with
 * common/formats.c or common/nvfp4.c: a bug there must not move the reference with it.
 *
 * Decoding goes by the bit fields. Encoding (round to nearest, ties to the even code,
 * saturating) searches every finite code for the nearest value, in double, where these small
 * values and their distances are exact. NVFP4 activation quantization follows DESIGN §3 in its
 * fp32 order: sf = e4m3(global_sf * amax16 / 6), code = e2m1(x * global_sf / float(sf)).
 * tests/unit/test_ref_formats.c checks all of it against the ml_dtypes oracle vectors. */
#ifndef EPMOE_REF_FORMATS_H
#define EPMOE_REF_FORMATS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

double epmoe_ref_e2m1_value(uint8_t code);   /* low 4 bits: sign, 2 exponent bits, 1 mantissa */
uint8_t epmoe_ref_e2m1_encode(float x);      /* nearest, ties to even, |x| > 6 -> 6; NaN -> 0 */
double epmoe_ref_e4m3_value(uint8_t code);   /* sign, 4 exponent bits (bias 7), 3 mantissa; 0x7f NaN */
uint8_t epmoe_ref_e4m3_encode(float x);      /* nearest, ties to even, |x| > 448 -> 448 */
double epmoe_ref_ue8m0_value(uint8_t code);  /* 2^(code - 127); 0xff NaN */
double epmoe_ref_bf16_value(uint16_t code);  /* sign, 8 exponent bits (bias 127), 7 mantissa */

/* global_sf = 448 * 6 / amax in fp32; 1 when amax is 0 or the quotient is not finite. */
float epmoe_ref_nvfp4_global_sf(float amax);
/* Largest |x| of n values (fp32 is exact for it). */
float epmoe_ref_amax(const float *x, size_t n);
/* One row of K (a multiple of 16) values: codes[K] (unpacked, one per element) and sf[K/16];
 * returns how many elements saturated (|x * gs / sf| > 6). */
size_t epmoe_ref_nvfp4_quantize(const float *x, size_t K, float global_sf, uint8_t *codes,
                                uint8_t *sf);
/* FP8 activation blocks (act_quant = fp8): for each block of 128 (the last one shorter), e is
 * the smallest integer with amax <= 448 * 2^e (found by stepping, in double), clamped to
 * [-109, 127], 0 for a zero block; codes[k] = e4m3(x * 2^-e). exps[b] = e. */
void epmoe_ref_fp8_quantize(const float *x, size_t K, uint8_t *codes, int *exps);
/* Code k of a packed row (two a byte, the even element in the low nibble). */
uint8_t epmoe_ref_nibble(const uint8_t *packed, size_t k);

#ifdef __cplusplus
}
#endif
#endif
