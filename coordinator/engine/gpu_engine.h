/* The expert-parallel MoE layer on GPUs: one MPI rank per GPU (or several ranks sharing one,
 * over the mpi-staged transport), every rank a coordinator for its tokens and a worker for its
 * experts, as coordinator/engine/cpu_engine.h on the CPU:
 *
 *   route (device) -> device plan: one row per (token, destination rank) carrying the k ids in
 *   slot order (-1 where the slot is on another rank), rows and pairs per peer counted on the
 *   device -> counts exchanged (device all-to-all) -> dispatch payload -> worker: validate ids,
 *   padded layout over the received rows, the NVFP4 expert GEMMs of worker/cuda/gpu_layer's
 *   kernels -> return one fp32 row per (row, expert) pair -> combine in slot order + shared.
 *
 * Payload (kernels/cuda/dispatch.h, epmoe_dispatch_record): one record per (token, destination
 * rank), its k ids included, one all-to-all. With act_quant = nvfp4 and per-row scales (the
 * default) the sender quantizes each token once and the record carries the NVFP4 row (codes,
 * block scales, 1/gs: 9H/16 + 4 bytes instead of 4H), which the worker gathers straight into
 * the GEMM's A operand: the codes are the ones the worker would have computed, so the output
 * bits do not change. With static per-expert scales (the quantization depends on the expert)
 * or W4A16, the record carries the fp32 row. The return carries one fp32 row per (row, expert)
 * pair (4H bytes): combine sums in fp32 in slot order, and bf16 rows on the way back would
 * round the expert outputs, which the single-GPU layer does not (so its bits would be lost).
 * Either way the output is bit-identical to epmoe_gpu_layer_forward on the same tokens for any
 * rank count (the shared expert aside: see below).
 *
 * Two modes, the same kernels:
 *  - throughput (epmoe_gpu_engine_forward): blocks sized by the real counts; the host waits
 *    once for the counts (to size the NCCL calls). Not capturable.
 *  - decode (epmoe_gpu_engine_forward_decode): every peer block has the fixed capacity
 *    decode_tokens rows (dispatch) and decode_tokens * min(k, n_local of the worker) pairs
 *    (return), so no host sync and no routing-dependent size: the whole layer, both
 *    all-to-alls included, can be captured in a CUDA graph and replayed with new routing.
 *    Every rank must use the same decode_tokens (an engine parameter) and call it with its
 *    own T <= decode_tokens (T = 0 allowed). Costs the full capacity on the wire every step.
 *
 * Shared expert: computed on the rank that holds the token (cuBLAS bf16); its bits can depend
 * on T through cuBLAS's choice of algorithm, so bit-identity against a single GPU holds for the
 * same per-rank batches, and for the routed part always.
 */
#ifndef EPMOE_GPU_ENGINE_H
#define EPMOE_GPU_ENGINE_H

#include <stdint.h>
#include <stdio.h>

#include <cuda_runtime.h>

#include "common/config.h"
#include "common/status.h"
#include "coordinator/transport/transport.h"
#include "worker/expert_weights.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct epmoe_gpu_engine epmoe_gpu_engine;

/* transport: a device transport (coordinator/transport/device.h) bound to the stream this
 * engine runs on, on `device`. layers[n_layers]: this rank's host weights (its slice:
 * epmoe_slice_of_rank(E, P, rank)), uploaded once; or NULL (epmoe_gpu_engine_set_layer). decode_tokens: the per-peer capacity of
 * decode mode (0: decode mode unused), <= max_tokens_per_rank. The worker arena holds the worst
 * case: every token of every rank sent here, all its k slots on this rank. Collective. */
epmoe_status epmoe_gpu_engine_create(const epmoe_config *cfg, epmoe_transport *transport,
                                     int device, const epmoe_layer_weights *layers,
                                     int64_t n_layers, int64_t decode_tokens, FILE *log,
                                     epmoe_gpu_engine **out);
void epmoe_gpu_engine_destroy(epmoe_gpu_engine *e);
int64_t epmoe_gpu_engine_device_bytes(const epmoe_gpu_engine *e);

/* Collective: every rank calls it for the same layer with its own T tokens (0 <= T <=
 * max_tokens_per_rank). x, out: [T, H] fp32 on the device; token_ids: [T] on the device (hash
 * layers). Returns once the counts are known; the rest is enqueued on the stream (read the
 * result after epmoe_gpu_engine_sync). */
epmoe_status epmoe_gpu_engine_forward(epmoe_gpu_engine *e, int64_t layer, const float *x,
                                      const int32_t *token_ids, int64_t T, float *out);

/* Collective, capturable: as above with the fixed decode capacity (T <= decode_tokens). */
epmoe_status epmoe_gpu_engine_forward_decode(epmoe_gpu_engine *e, int64_t layer, const float *x,
                                             const int32_t *token_ids, int64_t T, float *out);

/* Waits for the stream (watchdog), then reads and clears the device flags of both sides
 * (routing, dispatch validation) and the NVFP4 saturation count. Not collective. */
epmoe_status epmoe_gpu_engine_sync(epmoe_gpu_engine *e, unsigned long long *saturated);

/* Counters since creation, throughput mode only (decode mode never tells the host): rows
 * sent, rows received, pairs computed here, pairs received back. */
typedef struct {
    int64_t rows_sent, rows_received, pairs_computed, pairs_combined;
} epmoe_gpu_engine_counters;
void epmoe_gpu_engine_get_counters(const epmoe_gpu_engine *e, epmoe_gpu_engine_counters *c);

/* For tests: fills every routing-dependent buffer (dispatch rows, the experts' GEMM inputs,
 * activations and outputs, return rows) with 0xff bytes (NaN as floats) on the stream, so that
 * a row (or a row's K padding) read but never written in the next forward poisons its output. */
epmoe_status epmoe_gpu_engine_poison(epmoe_gpu_engine *e);

/* The routing ids [T, k] of the last forward (device memory of the engine). */
const int32_t *epmoe_gpu_engine_ids(const epmoe_gpu_engine *e);

/* Creation with layers = NULL leaves every layer empty: upload them one at a time here (the
 * host copy can be freed afterwards). Not collective. For a fit check against cudaMemGetInfo:
 * the device bytes a layer's weights take, and the temporary staging an upload adds. */
epmoe_status epmoe_gpu_engine_set_layer(epmoe_gpu_engine *e, int64_t index,
                                        const epmoe_layer_weights *w);
int64_t epmoe_gpu_engine_layer_bytes(const epmoe_gpu_engine *e, const epmoe_layer_weights *w);
int64_t epmoe_gpu_engine_staging_bytes(const epmoe_gpu_engine *e);

/* Throughput mode records events[i] at the stage boundaries of every forward (NULL: none):
 * 0 start, 1 routed+packed, 2 shared expert done, 3 rows dispatched, 4 experts done,
 * 5 outputs returned and combined. */
#define EPMOE_GPU_STAGE_EVENTS 6
void epmoe_gpu_engine_set_stage_events(epmoe_gpu_engine *e, cudaEvent_t *events);

/* W4A8 (act_quant = fp8): how many of the loaded layers' expert tensors (W13 and W2 of each)
 * carry the exact FP8 image the FP8 tensor-core GEMM reads, of how many, and the groups that
 * kept the others on the bf16 path (worker/cuda/gpu_layer.h). */
void epmoe_gpu_engine_fp8_tensors(const epmoe_gpu_engine *e, int64_t *with_fp8, int64_t *tensors,
                                  int64_t *inexact_groups);

#ifdef __cplusplus
}
#endif
#endif
