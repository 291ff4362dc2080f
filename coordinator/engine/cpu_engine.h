/* The expert-parallel engine: one MoE layer over a transport, every rank both a coordinator
 * (for the tokens it holds) and a worker (for the experts it owns). docs/design.md §2:
 *
 *   route  -> plan (owner rank of each slot; one row per destination rank, carrying the local
 *             expert ids of that rank in slot order) -> dispatch (all-to-all)
 *   worker: validate ids, count per local expert, padded offsets, scatter into the padded
 *           layout, expert MLPs, gather one output row per (row, expert) pair in arrival order
 *   combine (all-to-all back) -> out[t] = sum over slots in slot order of w * y, + shared(x[t])
 *
 * Combine returns one row per (token, slot) rather than a per-rank partial sum: the owner then
 * adds the k outputs in slot order, so the result is bit-identical for every rank count (a
 * per-rank partial sum would change the association with P). It costs k/(distinct ranks hit)
 * times the combine bytes of partial sums.
 */
#ifndef EPMOE_CPU_ENGINE_H
#define EPMOE_CPU_ENGINE_H

#include <stdint.h>

#include "common/config.h"
#include "common/status.h"
#include "coordinator/engine/backend.h"
#include "coordinator/transport/transport.h"
#include "worker/expert_weights.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct epmoe_cpu_engine epmoe_cpu_engine;

/* layers[n_layers]: this rank's weights of every layer (not owned). Buffers are sized for the
 * worst case of cfg->max_tokens_per_rank tokens on every rank, all routed to one expert. */
epmoe_status epmoe_cpu_engine_create(const epmoe_config *cfg, epmoe_transport *transport,
                                 const epmoe_layer_weights *layers, int64_t n_layers,
                                 epmoe_cpu_engine **out);
void epmoe_cpu_engine_destroy(epmoe_cpu_engine *e);
int64_t epmoe_cpu_engine_buffer_bytes(const epmoe_cpu_engine *e);

/* Collective: every rank calls it for the same layer with its own T tokens (T may be 0,
 * T <= max_tokens_per_rank). token_ids required for hash layers. out may alias nothing.
 * times (optional) accumulates seconds; expert_counts (optional, [E]) accumulates how many of
 * this rank's tokens chose each expert. A failure on any rank makes every rank return an
 * error for this layer. */
epmoe_status epmoe_cpu_engine_layer_forward(epmoe_cpu_engine *e, int64_t layer, const float *x,
                                        const int32_t *token_ids, int64_t T, float *out,
                                        epmoe_stage_times *times, int64_t *expert_counts);

/* Counters since creation, for tests: rows sent, rows received as a worker, (row, expert)
 * pairs computed, output rows returned and output rows received back. */
typedef struct {
    int64_t rows_sent, rows_received, pairs_computed, rows_returned, rows_combined;
    int64_t saturated_elements;
} epmoe_cpu_engine_counters;
void epmoe_cpu_engine_get_counters(const epmoe_cpu_engine *e, epmoe_cpu_engine_counters *c);

#ifdef __cplusplus
}
#endif
#endif
