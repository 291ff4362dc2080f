/* The worker's expert computation on the CPU: rows already scattered into the padded
 * expert-contiguous layout go through each local expert's MLP. The CUDA pipeline
 * (worker/cuda/) computes the same function; this is its reference of record.
 *
 * Per local expert e and each of its real rows r (rows [padded_offsets[e],
 * padded_offsets[e] + tokens_per_expert[e]); padding rows are never read or written):
 *
 *   act_quant = nvfp4 (W4A4):
 *     gs_x   = per_row: epmoe_nvfp4_global_sf(amax(x[r]))   static: 1 / w13_input_scale[e]
 *     xq     = dequant(quantize(x[r], gs_x), 1.0)            # e2m1*sf, exact in fp32 and bf16
 *     h[n]   = (xq . w13q[e][n]) * ((1/gs_x) * w13_scale_2[e][n < I ? 0 : 1])
 *              (+ w13_bias[e][n] when the experts have biases, expert_bias = 1)
 *     a      = swiglu(h)                                     # variant, limit, alpha from config
 *     gs_a   = per_row: epmoe_nvfp4_global_sf(amax(a))       static: 1 / w2_input_scale[e]
 *     aq     = dequant(quantize(a, gs_a), 1.0)
 *     y[r]   = (aq . w2q[e][n]) * ((1/gs_a) * w2_scale_2[e])   (+ w2_bias[e][n])
 *   act_quant = high (W4A16): xq = x[r], aq = a, and the 1/gs factors are 1.
 *   act_quant = fp8 (W4A8): xq = e4m3 * 2^e per 128-block of x[r] (common/fp8.h), exact in
 *     fp32; aq likewise from a; the 1/gs factors are 1.
 *
 * w13q / w2q are the unscaled e2m1*sf weights (dequant with scale 1.0). The dot products
 * accumulate in fp32 (BLAS on the CPU; tensor cores with fp32 accumulation on GPUs).
 */
#ifndef EPMOE_EXPERTS_H
#define EPMOE_EXPERTS_H

#include <stddef.h>
#include <stdint.h>

#include "common/config.h"
#include "common/status.h"
#include "worker/expert_weights.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    int64_t rows_computed;        /* real (row, expert) pairs */
    int64_t saturated_elements;   /* NVFP4 codes clamped at 6 (static scales too small) */
} epmoe_expert_stats;

/* Scratch for the CPU expert MLPs (routed and shared), reused across calls and layers. Rows go
 * through in fixed-size chunks, so its size does not depend on the routing. */
typedef struct epmoe_expert_scratch epmoe_expert_scratch;
epmoe_status epmoe_expert_scratch_create(int64_t hidden_size, int64_t inter_size,
                                         int64_t shared_inter, epmoe_expert_scratch **out);
void epmoe_expert_scratch_free(epmoe_expert_scratch *s);
size_t epmoe_expert_scratch_bytes(const epmoe_expert_scratch *s);

/* x_padded / y_padded: [padded_offsets[n_local], H] fp32. tokens_per_expert[n_local],
 * padded_offsets[n_local + 1] (common/layout.h convention). */
epmoe_status epmoe_cpu_experts_forward(const epmoe_config *cfg, const epmoe_layer_weights *w,
                                       const float *x_padded, const int64_t *tokens_per_expert,
                                       const int64_t *padded_offsets, float *y_padded,
                                       epmoe_expert_scratch *scratch, epmoe_expert_stats *stats);

/* Shared expert on rows x[T, H] -> y[T, H] (fp32 products, same clamp as the routed experts). */
epmoe_status epmoe_cpu_shared_forward(const epmoe_config *cfg, const epmoe_layer_weights *w,
                                      const float *x, int64_t T, float *y,
                                      epmoe_expert_scratch *scratch);

/* The unscaled weights (e2m1 * block scale: epmoe_nvfp4_dequantize_row with scale 1) of one
 * [N, K] NVFP4 matrix (codes [N, K/2], block_sf [N, K/16]; K a multiple of 16) in the panel
 * layout of kernels/ops.h, zero-padded to whole panels. */
void epmoe_cpu_dequant_panels(const uint8_t *codes, const uint8_t *block_sf, int64_t N,
                              int64_t K, float *panels);

#ifdef __cplusplus
}
#endif
#endif
