/* The float64 reference of one MoE layer, for tests only. It follows the same quantized math
 * as worker/experts.h (the activation quantizer decides codes from fp32 values, as the
 * implementation does), but computes scores, products, SwiGLU and sums in float64, routes
 * with its own full sort, and shares no code with the engine: its number formats and NVFP4
 * quantizer are its own (tests/ref/ref_formats.h, checked against the ml_dtypes oracle), so a
 * quantizer bug in common/ cannot move the reference with it. */
#ifndef EPMOE_REF_LAYER_H
#define EPMOE_REF_LAYER_H

#include <stdint.h>

#include "common/config.h"
#include "common/status.h"
#include "common/safetensors.h"
#include "tests/ref/ref_weights.h"
#include "worker/expert_weights.h"

/* Every expert of one layer (ref_weights.h: read from a checkpoint of any layout, or viewed from
 * loaded weights). out[T, H] in float64; ids_out[T, k] and weights_out[T, k] (optional)
 * receive the reference routing in slot order. */
epmoe_status epmoe_ref_forward(const epmoe_config *cfg, const epmoe_ref_weights *w,
                               const float *x, const int32_t *token_ids, int64_t T, double *out,
                               int32_t *ids_out, double *weights_out);
epmoe_status epmoe_ref_route_w(const epmoe_config *cfg, const epmoe_ref_weights *w,
                               const float *x, const int32_t *token_ids, int64_t T,
                               int32_t *ids_out, double *weights_out);

/* The same on a rank's loaded weights, which must hold every expert (slice [0, E)). */
epmoe_status epmoe_ref_layer_forward(const epmoe_config *cfg, const epmoe_layer_weights *w,
                                     const float *x, const int32_t *token_ids, int64_t T,
                                     double *out, int32_t *ids_out, double *weights_out);

/* Pre-activations the clamp changed (g > L or |u| > L) since the last reset: lets a test prove
 * that its inputs made the clamp fire. */
extern int64_t epmoe_ref_clamp_hits;

/* Float64 routing only (same outputs as above). */
epmoe_status epmoe_ref_route(const epmoe_config *cfg, const epmoe_layer_weights *w,
                             const float *x, const int32_t *token_ids, int64_t T,
                             int32_t *ids_out, double *weights_out);


/* The expert weights the engine loaded (w: its slice of layer w->layer, NVFP4, an MXFP4
 * checkpoint converted at load) against the checkpoint's own tensors in any layout
 * (epmoe_ref_proj_read), both decoded with the reference's formats: NVFP4
 * .weight/.weight_scale (E4M3)/.weight_scale_2, or MXFP4 .weight/.scale (UE8M0), or gpt-oss's
 * stacked _blocks/_scales de-interleaved by the reference; and the expert biases. The
 * conversion is exact, so every value must be equal. Returns the number of values that differ (or -1 when
 * a tensor is missing); `first` describes the first. */
int64_t epmoe_ref_check_loaded_experts(const epmoe_st_set *ckpt, const epmoe_config *cfg,
                                       const epmoe_layer_weights *w, char *first, size_t cap);
#endif
