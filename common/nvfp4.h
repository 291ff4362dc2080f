/* NVFP4 and MXFP4 block formats (docs/design.md §3.4, §3.5).
 *
 * Vocabulary, used by every file that touches these formats:
 *   codes       packed E2M1, two per byte, the even element in the low nibble; K contiguous.
 *   block_sf    one UE4M3 byte per 16 consecutive K elements ([rows, K/16], row-major, the
 *               "linear" layout; the 128x4 swizzled layout is only for Blackwell MMA).
 *   global_sf   the kernels' tensor scale, 448*6/amax: quantize multiplies by it.
 *   weight_scale_2 the checkpoint's tensor scale, amax/2688: dequantize multiplies by it.
 *   dequant     x ~= e2m1 * float(block_sf) / global_sf.
 *
 * K must be a multiple of 16 (NVFP4) or 32 (MXFP4); callers validate shapes.
 */
#ifndef EPMOE_NVFP4_H
#define EPMOE_NVFP4_H

#include <stddef.h>
#include <stdint.h>

#include "common/status.h"

#ifdef __cplusplus
extern "C" {
#endif

#define EPMOE_NVFP4_BLOCK 16
#define EPMOE_MXFP4_BLOCK 32
#define EPMOE_FP4_AMAX_TO_GLOBAL_SF 2688.0f /* 448 (e4m3 max) * 6 (e2m1 max) */

/* global_sf = 2688 / amax; amax == 0 (or subnormal-small enough to overflow) gives 1.0 so that
 * an all-zero tensor quantizes to zeros with finite scales. amax must be finite and >= 0. */
float epmoe_nvfp4_global_sf(float amax);

/* Largest |x| over n floats (NaN-propagating: returns NaN if any element is NaN). */
float epmoe_amax(const float *x, size_t n);

/* Quantize one row of K floats: codes[K/2], block_sf[K/16]. Exactly docs/design.md §3.4:
 *   sf    = e4m3_rn_satfinite((global_sf * amax16) / 6)
 *   code  = e2m1_rn_satfinite((x * global_sf) / float(sf))     (code 0 when sf == 0)
 * Returns the number of elements whose |x*global_sf/sf| exceeded 6 (saturated), so that a
 * too-small static scale is counted, never turned into Inf. */
size_t epmoe_nvfp4_quantize_row(const float *x, size_t K, float global_sf, uint8_t *codes,
                                uint8_t *block_sf);

/* Dequantize one row: out[k] = e2m1 * float(sf) * dequant_scale, where dequant_scale is
 * 1/global_sf (activations) or weight_scale_2 (checkpoint weights). Pass 1.0f to get the
 * unscaled e2m1*sf products that the GEMMs consume (exact in fp32 and bf16). */
void epmoe_nvfp4_dequantize_row(const uint8_t *codes, const uint8_t *block_sf, size_t K,
                                float dequant_scale, float *out);

/* MXFP4: E2M1 codes with one UE8M0 scale per 32 elements (OCP MX rule: scale exponent =
 * floor(log2(amax32)) - 2, clamped to the UE8M0 range; elements RNE satfinite). */
void epmoe_mxfp4_quantize_row(const float *x, size_t K, uint8_t *codes, uint8_t *block_e8m0);
void epmoe_mxfp4_dequantize_row(const uint8_t *codes, const uint8_t *block_e8m0, size_t K,
                                float *out);

/* Exact MXFP4 -> NVFP4 conversion of a [rows, K] matrix, block by 16-element block. The
 * tensor gets one scale 2^A (weight_scale_2) and each block b with UE8M0 scale 2^e_b the UE4M3
 * power of two 2^q_b, its codes multiplied by 2^t_b, with e_b = A + q_b + t_b:
 *   - blocks whose codes are all zero carry no information: block_sf 0, codes unchanged;
 *   - A is e_top - 8 (e_top: the largest nonzero block scale), so q_b = e_b - A whenever that
 *     lies in 2^-9..2^8 (17 binades below e_top) and codes stay unchanged;
 *   - a block beyond that range keeps its value exactly by moving its codes (0.5 <-> 1 <-> 2
 *     <-> 4, 1.5 <-> 3 <-> 6: t_b = +-1..3 while every code stays an E2M1 value), A moving
 *     within what every block allows.
 * Every value is reproduced bit for bit (e2m1' * sf * weight_scale_2 == e2m1 * 2^e). A tensor
 * no choice of A can express is EPMOE_ERR_UNSUPPORTED, naming the two blocks that conflict;
 * values are never rounded. codes_out may alias codes; block_sf gets [rows, K/16]; info
 * (optional) counts zero and shifted blocks. */
typedef struct {
    size_t zero_blocks;    /* 16-blocks with only zero codes (block_sf 0) */
    size_t shifted_blocks; /* 16-blocks whose codes were multiplied by a power of two */
} epmoe_mxfp4_conversion;
epmoe_status epmoe_mxfp4_to_nvfp4(const uint8_t *codes, const uint8_t *block_e8m0, size_t rows,
                                  size_t K, uint8_t *codes_out, uint8_t *block_sf,
                                  float *weight_scale_2, epmoe_mxfp4_conversion *info);

/* Blackwell 128x4 swizzled scales (docs/design.md §4.3). For a scale matrix of `rows` x `cols`
 * (cols = K/16), padded to rows' = ceil(rows/128)*128 and cols' = ceil(cols/4)*4: */
size_t epmoe_swizzled_sf_size(size_t rows, size_t cols);            /* rows' * cols' bytes */
size_t epmoe_swizzled_sf_offset(size_t r, size_t c, size_t cols);   /* off(r, c) */
/* Linear [rows, cols] -> swizzled (padding zero-filled), and back. */
void epmoe_swizzle_sf(const uint8_t *linear, size_t rows, size_t cols, uint8_t *swizzled);
void epmoe_unswizzle_sf(const uint8_t *swizzled, size_t rows, size_t cols, uint8_t *linear);

#ifdef __cplusplus
}
#endif
#endif
