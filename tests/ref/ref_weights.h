/* The float64 reference's view of one layer's weights, for tests only: every expert, read
 * straight from a checkpoint's tensors in any layout (MXFP4 decoded as e2m1 * 2^e, NVFP4 as
 * e2m1 * e4m3 * weight_scale_2, the FP8 shared expert as e4m3 * its block scale, all in
 * float64), or taken from a rank's loaded epmoe_layer_weights. It shares nothing with the
 * loader (worker/expert_weights.c) or the MXFP4 -> NVFP4 conversion beyond the safetensors
 * reader and the tensor names (common/checkpoint.h); its number formats are the reference's own
 * (tests/ref/ref_formats.h, checked against the ml_dtypes oracle), so a loader, conversion or
 * format bug shows up as a difference from it. */
#ifndef EPMOE_REF_WEIGHTS_H
#define EPMOE_REF_WEIGHTS_H

#include <stdint.h>

#include "common/config.h"
#include "common/safetensors.h"
#include "common/status.h"
#include "worker/expert_weights.h"

/* One expert projection [N, K]: codes [N, K/2] with MXFP4 (UE8M0 per 32) or NVFP4 (UE4M3 per
 * 16 times scale_2) block scales; the bytes belong to the checkpoint or the layer weights.
 * Row n starts row_stride rows after row n-1 (0 or 1: contiguous; 2: every other row of a
 * tensor that interleaves two projections, as gpt-oss's gate_up_proj does). */
typedef struct {
    int mxfp4;
    const uint8_t *codes;
    const uint8_t *scales;
    double scale_2;     /* NVFP4 only */
    double input_scale; /* 0 when the checkpoint has none */
    int64_t row_stride;
} epmoe_ref_proj;

typedef struct {
    int64_t layer, H, I, E, Is, vocab, top_k;
    double *gate;      /* [E, H] */
    double *bias;      /* [E], or NULL */
    int32_t *tid2eid;  /* [vocab, k] for hash layers, else NULL */
    double *shared_w13;/* [2 Is, H] (gate rows, then up rows) */
    double *shared_w2; /* [H, Is] */
    epmoe_ref_proj *proj; /* [E][3]: w1, w3, w2 */
    double *b13;       /* [E, 2I] gate then up biases (expert_bias = 1), else NULL */
    double *b2;        /* [E, H] */
} epmoe_ref_weights;

/* Every expert of `layer`, read from the checkpoint (which must stay open while *out is used).
 * cfg is what epmoe_config_from_checkpoint read. */
epmoe_status epmoe_ref_weights_read(const epmoe_st_set *ckpt, const epmoe_config *cfg,
                                    int64_t layer, epmoe_ref_weights *out);
/* The same view of loaded weights holding every expert (slice [0, E)); w must outlive *out. */
epmoe_status epmoe_ref_weights_from_layer(const epmoe_config *cfg, const epmoe_layer_weights *w,
                                          epmoe_ref_weights *out);
void epmoe_ref_weights_free(epmoe_ref_weights *w);

/* One expert projection ("w1", "w3" or "w2") of `layer` as the checkpoint holds it: MXFP4 when
 * it has a .scale tensor, else NVFP4 (.weight_scale, .weight_scale_2, .input_scale if any); in
 * the gpt-oss layout the expert's rows of the stacked MXFP4 tensors (w1 the gate rows and w3
 * the up rows of gate_up_proj, de-interleaved here from gpt-oss's definition: x[..., ::2] is
 * the gate, x[..., 1::2] the up projection). */
epmoe_status epmoe_ref_proj_read(const epmoe_st_set *ckpt, const epmoe_config *cfg, int64_t layer,
                                 int64_t expert, const char *proj, epmoe_ref_proj *out);
/* Expert `expert`'s biases as the checkpoint holds them: b13[2I] (gate, then up) and b2[H]. */
epmoe_status epmoe_ref_expert_bias_read(const epmoe_st_set *ckpt, const epmoe_config *cfg,
                                        int64_t layer, int64_t expert, double *b13, double *b2);

/* Row n of a projection in float64. */
void epmoe_ref_proj_row(const epmoe_ref_proj *p, int64_t n, int64_t K, double *out);

#endif
