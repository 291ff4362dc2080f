/* The driver: what the batch job (epmoe-run) and the service (epmoe-serve) call.
 *
 * Rank 0 (the root) holds a batch of tokens; epmoe_driver_forward shards them over all ranks,
 * every rank runs the layers (route, dispatch, experts, combine, shared expert) on its shard,
 * and the outputs come back to the root in input order. The other ranks sit in
 * epmoe_driver_follow, executing the root's commands until it calls epmoe_driver_shutdown.
 *
 * Results do not depend on the rank count or on which other tokens share the batch: a token's
 * output is a function of that token alone (per-row activation scales, fixed slot order).
 */
#ifndef EPMOE_DRIVER_H
#define EPMOE_DRIVER_H

#include <mpi.h>
#include <stdint.h>

#include "common/config.h"
#include "common/status.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct epmoe_driver epmoe_driver;

/* Seconds spent per stage, summed over the layers of one forward (root's view). */
typedef struct {
    double route;
    double dispatch;
    double experts;
    double combine;
    double shared;
    double total;
} epmoe_stage_times;

typedef struct {
    char preset[32];
    int n_ranks;
    int64_t n_layers;
    int64_t n_hash_layers;
    int64_t hidden_size;
    int64_t n_routed_experts;
    int64_t top_k;
    int64_t experts_per_rank_min, experts_per_rank_max;
    int64_t max_tokens_per_forward; /* the root accepts at most this many tokens per call */
    int64_t weight_bytes_per_rank;  /* largest over ranks */
    int64_t buffer_bytes_per_rank;  /* worst-case activation buffers, largest over ranks */
} epmoe_driver_info;

/* Collective over comm: every rank reads the checkpoint's model settings and its own expert
 * slice of every layer, and sizes its buffers for the worst case. cfg carries the runtime
 * settings; its model settings are replaced by the checkpoint's. */
epmoe_status epmoe_driver_create(const epmoe_config *cfg, const char *checkpoint, MPI_Comm comm,
                                 epmoe_driver **out);
void epmoe_driver_destroy(epmoe_driver *d);

int epmoe_driver_rank(const epmoe_driver *d);
const epmoe_config *epmoe_driver_config(const epmoe_driver *d);
void epmoe_driver_get_info(const epmoe_driver *d, epmoe_driver_info *info);

/* Root only. x[T, H] fp32, token_ids[T] (required when a hash layer is in range, else may be
 * NULL), layers [layer_begin, layer_end). out[T, H]. T may be 0. Inputs are validated on the
 * root before any rank does work (shape, layer range, NaN/Inf, ids in the vocabulary); such an
 * error returns EPMOE_ERR_INVALID_ARG (or NUMERIC/RANGE) and leaves the driver usable.
 * expert_counts (optional, [n_layers_in_range * E]) receives tokens routed to each expert. */
epmoe_status epmoe_driver_forward(epmoe_driver *d, const float *x, const int32_t *token_ids,
                                  int64_t T, int64_t layer_begin, int64_t layer_end, float *out,
                                  epmoe_stage_times *times, int64_t *expert_counts);

/* Non-root ranks: execute the root's forwards until shutdown. Returns EPMOE_OK on a normal
 * shutdown. */
epmoe_status epmoe_driver_follow(epmoe_driver *d);
/* Root: release the followers (they return from epmoe_driver_follow). */
epmoe_status epmoe_driver_shutdown(epmoe_driver *d);

#ifdef __cplusplus
}
#endif
#endif
