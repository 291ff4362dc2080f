/* The driver: what the batch job (epmoe-run) and the service (epmoe-serve) call.
 *
 * Rank 0 (the root) holds a batch of tokens; epmoe_driver_forward shards them over all ranks,
 * every rank runs the layers on its shard through its backend (coordinator/engine/backend.h:
 * cpu or cuda, chosen by the `backend` setting), and the outputs come back to the root in input
 * order. The other ranks sit in epmoe_driver_follow, executing the root's commands until it
 * calls epmoe_driver_shutdown.
 *
 * Results do not depend on the rank count or on which other tokens share the batch: a token's
 * output is a function of that token alone (per-row activation scales, fixed summation orders;
 * docs/design.md).
 */
#ifndef EPMOE_DRIVER_H
#define EPMOE_DRIVER_H

#include <mpi.h>
#include <stdint.h>

#include "common/config.h"
#include "common/status.h"
#include "common/tensor.h"
#include "coordinator/engine/backend.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct epmoe_driver epmoe_driver;

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
    int64_t layer_begin, layer_end; /* the layers loaded: forwards must stay inside */
    int64_t weight_bytes_per_rank;  /* largest over ranks */
    int64_t buffer_bytes_per_rank;  /* worst-case activation buffers, largest over ranks */
    epmoe_backend_info backend;     /* the root's (every rank runs the same backend) */
} epmoe_driver_info;

/* Collective over comm: every rank reads the checkpoint's model settings and its own expert
 * slice of layers [layer_begin, layer_end) (layer_end < 0: to the last layer), and its backend
 * sizes its buffers for the worst case. cfg carries the runtime settings; its model settings
 * are replaced by the checkpoint's. Prints one line per rank (backend, device, slice, bytes). */
epmoe_status epmoe_driver_create(const epmoe_config *cfg, const char *checkpoint, MPI_Comm comm,
                                 int64_t layer_begin, int64_t layer_end, epmoe_driver **out);
void epmoe_driver_destroy(epmoe_driver *d);

int epmoe_driver_rank(const epmoe_driver *d);
const epmoe_config *epmoe_driver_config(const epmoe_driver *d);
void epmoe_driver_get_info(const epmoe_driver *d, epmoe_driver_info *info);
/* This rank's backend counters (tests). */
void epmoe_driver_get_counters(const epmoe_driver *d, epmoe_backend_counters *c);

/* Root only. x[T, H] and out[T, H] in `dtype` (F32, BF16 or F16), token_ids[T] (required
 * when a hash layer is in range, else may be NULL), layers [layer_begin, layer_end). T may be
 * 0. The root checks the shape, the layer range and the token ids before any rank works; each
 * rank's backend refuses NaN/Inf rows and outputs its dtype cannot hold, naming the batch row.
 * Such errors leave the driver usable. expert_counts (optional, [(end - begin) * E]) receives
 * the tokens routed to each expert. times (optional) accumulates the root's stage times. */
epmoe_status epmoe_driver_forward(epmoe_driver *d, const void *x, epmoe_dtype dtype,
                                  const int32_t *token_ids, int64_t T, int64_t layer_begin,
                                  int64_t layer_end, void *out, epmoe_stage_times *times,
                                  int64_t *expert_counts);

/* Non-root ranks: execute the root's forwards until shutdown. Returns EPMOE_OK on a normal
 * shutdown; EPMOE_ERR_PEER_LOST (or MPI) when the job cannot continue. */
epmoe_status epmoe_driver_follow(epmoe_driver *d);
/* Root: release the followers (they return from epmoe_driver_follow). */
epmoe_status epmoe_driver_shutdown(epmoe_driver *d);

#ifdef __cplusplus
}
#endif
#endif
