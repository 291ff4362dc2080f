/* The weights of one layer as a rank holds them: its slice of routed experts in NVFP4 (an
 * MXFP4 checkpoint is converted exactly at load), plus the replicated gate and shared expert.
 *
 * Layouts (row-major, K contiguous; NVFP4 vocabulary in common/nvfp4.h):
 *   w13_codes [n_local, 2I, H/2]   rows [0, I) are w1 (gate), rows [I, 2I) are w3 (up)
 *   w13_sf    [n_local, 2I, H/16]  UE4M3, linear layout
 *   w13_scale_2 [n_local, 2]       weight_scale_2 of w1 and of w3 (they may differ)
 *   w2_codes  [n_local, H, I/2], w2_sf [n_local, H, I/16], w2_scale_2 [n_local]
 *   w13_input_scale / w2_input_scale [n_local]: checkpoint calibration (amax/2688 convention),
 *   used only with act_scale=static.
 *   w13_bias [n_local, 2I] (gate then up, whatever order the checkpoint fused them in),
 *   w2_bias [n_local, H]: fp32, present when expert_bias = 1 (gpt-oss), else NULL.
 * Shared expert (dense, fp32 on the host): shared_w13 [2*Is, H] (gate rows then up rows),
 * shared_w2 [H, Is], Is = n_shared_experts * moe_inter_size.
 */
#ifndef EPMOE_EXPERT_WEIGHTS_H
#define EPMOE_EXPERT_WEIGHTS_H

#include <stdint.h>

#include "common/checkpoint.h" /* epmoe_config_from_checkpoint, for the loader's callers */
#include "common/config.h"
#include "common/layout.h"
#include "common/safetensors.h"
#include "common/status.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    int64_t layer;
    int64_t hidden_size;     /* H */
    int64_t inter_size;      /* I */
    epmoe_expert_slice slice;
    int64_t n_local;         /* slice.end - slice.start */

    uint8_t *w13_codes;
    uint8_t *w13_sf;
    float *w13_scale_2;
    float *w13_input_scale;
    uint8_t *w2_codes;
    uint8_t *w2_sf;
    float *w2_scale_2;
    float *w2_input_scale;
    float *w13_bias;         /* [n_local, 2I] or NULL */
    float *w2_bias;          /* [n_local, H] or NULL */

    /* replicated on every rank */
    int64_t n_experts;       /* E */
    float *gate_weight;      /* [E, H] fp32 */
    float *gate_bias;        /* [E] or NULL (no bias) */
    int32_t *tid2eid;        /* [vocab, top_k] for hash layers, else NULL */
    int64_t vocab_size;
    int64_t shared_inter;    /* Is; 0 = no shared expert */
    float *shared_w13;       /* [2*Is, H] */
    float *shared_w2;        /* [H, Is] */

    /* CPU compute forms, packed by epmoe_layer_weights_prepare_cpu (kernels/ops.h panels);
     * NULL until then. */
    float *gate_panels;      /* Wg as panels, N = E, K = H */
    float *shared_w13_panels;/* N = 2*Is, K = H */
    float *shared_w2_panels; /* N = H, K = Is */
    /* Optional cache of the unscaled dequantized expert weights as panels, [n_local] blocks of
     * epmoe_cpu_panels_floats(2I, H) and (H, I) floats; NULL = dequantize per call. */
    float *w13_panels_cache;
    float *w2_panels_cache;

    int64_t checkpoint_bytes; /* tensor bytes this rank read from the checkpoint for the layer */
} epmoe_layer_weights;

/* Reads layer `layer`'s gate, shared expert and the experts of `slice` from a checkpoint
 * (only those tensors: a rank never touches other ranks' experts, and a model directory's
 * shards that hold none of them are never opened). cfg is what epmoe_config_from_checkpoint
 * read from the same checkpoint (checkpoint_layout says how tensors are named and stored).
 * Every tensor's dtype and shape are checked against cfg; NaN/Inf in scales or dense weights
 * is EPMOE_ERR_NUMERIC. Errors name the file and the tensor; on error nothing stays allocated.
 * One call per layer: a run over layers [A, B) loads only those. */
epmoe_status epmoe_layer_weights_load(const epmoe_st_set *ckpt, const epmoe_config *cfg,
                                      int64_t layer, const epmoe_expert_slice *slice,
                                      epmoe_layer_weights *out);
void epmoe_layer_weights_free(epmoe_layer_weights *w);

/* Packs the dense weights (gate, shared expert) into the CPU panel layout; idempotent.
 * epmoe_layer_weights_free releases them too. */
epmoe_status epmoe_layer_weights_prepare_cpu(epmoe_layer_weights *w);
void epmoe_layer_weights_release_cpu(epmoe_layer_weights *w);
/* Bytes the expert panel cache of this layer would take. */
int64_t epmoe_layer_weights_cache_bytes(const epmoe_layer_weights *w);
/* Dequantizes every local expert into the panel cache (exactly the values a per-call
 * dequantization produces, so results do not change). */
epmoe_status epmoe_layer_weights_cache_experts_cpu(epmoe_layer_weights *w);

#ifdef __cplusplus
}
#endif
#endif
