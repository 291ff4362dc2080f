/* Loading a rank's weights: layers [begin, end) of its expert slice, one layer at a time, each
 * handed to the backend as soon as it is read (the cuda backend uploads it and frees the host
 * copy, so host memory holds one layer at a time). Prints one progress line per layer and the
 * load rate at the end on rank 0, both counting the tensor bytes read from the checkpoint
 * (epmoe_layer_weights.checkpoint_bytes). */
#ifndef EPMOE_LOAD_H
#define EPMOE_LOAD_H

#include <stdint.h>
#include <stdio.h>

#include "common/config.h"
#include "common/layout.h"
#include "common/safetensors.h"
#include "common/status.h"
#include "worker/expert_weights.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Takes the layer's weights (ownership passes: the sink keeps or frees them). */
typedef epmoe_status (*epmoe_layer_sink)(void *sink_ctx, int64_t layer, epmoe_layer_weights *w);

/* Not collective: a failure is this rank's own (the caller agrees). rank: for messages and
 * for printing (rank 0 prints to log). */
epmoe_status epmoe_load_layers(const epmoe_st_set *ckpt, const epmoe_config *cfg,
                               const epmoe_expert_slice *slice, int64_t begin, int64_t end,
                               int rank, FILE *log, epmoe_layer_sink sink, void *sink_ctx);

/* Bytes of one layer's weights as a rank holds them (its experts' NVFP4 codes and scales, the
 * gate, the shared expert in fp32): what a rank's memory report counts. */
int64_t epmoe_layer_weights_bytes(const epmoe_layer_weights *w);

#ifdef __cplusplus
}
#endif
#endif
