/* The float64 reference of one MoE layer, for tests only. It follows the same quantized math
 * as worker/experts.h (the activation quantizer decides codes from fp32 values, as the
 * implementation does), but computes scores, products, SwiGLU and sums in float64, routes
 * with its own full sort, and shares no code with the engine beyond the NVFP4 quantizer
 * (itself tested against an independent oracle). */
#ifndef EPMOE_REF_LAYER_H
#define EPMOE_REF_LAYER_H

#include <stdint.h>

#include "common/config.h"
#include "common/status.h"
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

#endif
