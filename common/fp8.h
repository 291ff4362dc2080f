/* FP8 activations (act_quant = fp8, W4A8) and the exact FP8 form of FP4 weights.
 *
 * Activations: E4M3 codes, one per element, with one power-of-two scale per block of
 * EPMOE_FP8_BLOCK consecutive K elements (a UE8M0 exponent byte), DeepSeek's own FP8
 * convention for activations (1 x 128 tiles, power-of-two scales as in its "ue8m0" scale
 * format). Block b of a row covers [128b, min(128b + 128, K)) and its scale 2^e is the
 * smallest power of two with amax(block) <= 448 * 2^e (exact: decided on the exponent and the
 * mantissa of amax, no division), clamped to [EPMOE_FP8_MIN_EXP, 127]; a block of zeros gets
 * 2^0. Then code = e4m3_rn_satfinite(x * 2^-e), a multiplication by a power of two and so
 * exact before the one rounding. Why powers of two: x ~= e4m3 * 2^e is then exact in fp32 and
 * bf16 (every kernel that takes the values in bf16 reproduces them), and so is the product
 * of the two scales a GEMM applies per block (activation and weight), which leaves only the
 * accumulation order to differ between the backends.
 *
 * Weights: an FP4 weight matrix (E2M1 codes, one UE4M3 scale per 16; an MXFP4 checkpoint's
 * experts arrive in this form with power-of-two scales, common/nvfp4.h) is re-expressed per row
 * and per 128-K group as E4M3 codes times one power-of-two group scale chosen by the same rule
 * as an activation block (from the group's largest |e2m1 * sf|). Where every value of a group
 * survives that exactly (MXFP4: every block within ~15 binades of the group's largest), FP8
 * tensor cores can take the weights with no rounding at all. Groups that do not (NVFP4's
 * non-power-of-two scales make 4- and 5-bit mantissas) are counted, never rounded: the caller
 * then keeps the exact bf16 path for that matrix. */
#ifndef EPMOE_FP8_H
#define EPMOE_FP8_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define EPMOE_FP8_BLOCK 128
/* Smallest block exponent: e4m3's smallest step 2^-9 times 2^-109 is 2^-118, so every
 * dequantized value, and its copy at 2^-8 in the Hopper kernels' bf16 staging of A
 * (kernels/cuda/gemm_sm90_common.cuh), is a normal fp32 and bf16 (blocks with
 * amax < 448 * 2^-110, about 3.5e-31, lose their smallest values to zero). */
#define EPMOE_FP8_MIN_EXP (-109)
#define EPMOE_FP8_MAX_EXP 127

/* The block exponent e of the rule above, from a finite amax >= 0's bits, one definition for
 * both backends (kernels/cuda/fp8_math.cuh calls it on the device). amax = 1.M * 2^(E - 127)
 * for a normal amax (E the biased exponent) is m * 2^x with m = 1.M / 2 and x = E - 126; 448 =
 * 0.875 * 2^9, and m <= 0.875 exactly when M <= 0x600000. A subnormal amax lies far below the
 * clamp. Zero (and anything not > 0) gives 0. */
#ifdef __CUDACC__
#define EPMOE_FP8_HD __host__ __device__
#else
#define EPMOE_FP8_HD
#endif
static inline EPMOE_FP8_HD int epmoe_fp8_block_exp_of_bits(uint32_t amax_bits) {
    const int E = (int)((amax_bits >> 23) & 0xff), M = (int)(amax_bits & 0x7fffff);
    if ((amax_bits >> 31) || amax_bits == 0 || (E == 0xff && M)) return 0;
    const int e = E == 0 ? EPMOE_FP8_MIN_EXP : (M <= 0x600000 ? E - 135 : E - 134);
    return e < EPMOE_FP8_MIN_EXP ? EPMOE_FP8_MIN_EXP : (e > EPMOE_FP8_MAX_EXP ? EPMOE_FP8_MAX_EXP : e);
}
int epmoe_fp8_block_exp(float amax); /* the same from the float */

/* One row of K floats (finite; callers validate): codes[K] E4M3, block_e8m0[ceil(K/128)]
 * (e + 127). */
void epmoe_fp8_quantize_row(const float *x, size_t K, uint8_t *codes, uint8_t *block_e8m0);

/* out[k] = e4m3(codes[k]) * 2^(block_e8m0[k/128] - 127), exact. */
void epmoe_fp8_dequantize_row(const uint8_t *codes, const uint8_t *block_e8m0, size_t K,
                              float *out);

/* FP4 [rows, K] (codes [rows, K/2], block_sf [rows, K/16]; K a multiple of 128) -> E4M3
 * [rows, K] and group_exp [rows, K/128] (the group scale's exponent e, value 2^e as the
 * UE8M0 byte e + 127) with e4m3 * 2^e == e2m1 * sf for every element of every exact group.
 * Returns how many groups are not exact (their codes are written anyway, rounded, and must not
 * be used). */
size_t epmoe_fp4_to_fp8_weights(const uint8_t *codes, const uint8_t *block_sf, size_t rows,
                                size_t K, uint8_t *e4m3, uint8_t *group_e8m0);

#ifdef __cplusplus
}
#endif
#endif
