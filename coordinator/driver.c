#include "coordinator/driver.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/safetensors.h"
#include "coordinator/engine.h"
#include "coordinator/transport_mpi.h"
#include "worker/expert_weights.h"

/* Commands the root broadcasts to the followers. */
enum { CMD_FORWARD = 1, CMD_SHUTDOWN = 2 };
/* cmd[] = {op, T, layer_begin, layer_end, has_token_ids, want_expert_counts} */
#define CMD_WORDS 6

struct epmoe_driver {
    MPI_Comm comm;
    int rank, n_ranks;
    epmoe_config cfg;
    epmoe_layer_weights *layers;
    int64_t n_layers;
    epmoe_transport *transport;
    epmoe_engine *engine;
    epmoe_driver_info info;
    /* this rank's shard, double-buffered across layers */
    float *x_local, *y_local;
    int32_t *ids_local;
    int64_t *counts_local; /* [n_layers * E] */
    int *shard_counts, *shard_displs; /* [P], in tokens, for scatter/gather */
    MPI_Datatype hidden_row;          /* H floats: one token's hidden state */
};

/* The command broadcast is nonblocking and polled with short sleeps, so an idle follower
 * (a service waiting for requests) does not spin a core; the root uses the matching Ibcast
 * (MPI does not match blocking with nonblocking collectives). */
static int command_bcast(int64_t cmd[], int words, MPI_Comm comm, int is_root) {
    MPI_Request req;
    int rc = MPI_Ibcast(cmd, words, MPI_INT64_T, 0, comm, &req);
    if (rc != MPI_SUCCESS) return rc;
    if (is_root) return MPI_Wait(&req, MPI_STATUS_IGNORE);
    for (;;) {
        int done = 0;
        rc = MPI_Test(&req, &done, MPI_STATUS_IGNORE);
        if (rc != MPI_SUCCESS || done) return rc;
        struct timespec nap = {0, 200 * 1000}; /* 0.2 ms: negligible next to a forward */
        nanosleep(&nap, NULL);
    }
}

static epmoe_status mpi_check(int rc, const char *what) {
    if (rc == MPI_SUCCESS) return EPMOE_OK;
    char msg[MPI_MAX_ERROR_STRING];
    int len = 0;
    MPI_Error_string(rc, msg, &len);
    EPMOE_FAIL(EPMOE_ERR_MPI, "%s failed: %s", what, msg);
}

/* Tokens [start, start + count) of a batch of T go to rank r: contiguous and balanced, so
 * outputs come back in input order. */
static void shard_of_rank(int64_t T, int P, int r, int64_t *start, int64_t *count) {
    int64_t base = T / P, extra = T % P;
    *start = r * base + (r < extra ? r : extra);
    *count = base + (r < extra ? 1 : 0);
}

int epmoe_driver_rank(const epmoe_driver *d) { return d->rank; }
const epmoe_config *epmoe_driver_config(const epmoe_driver *d) { return &d->cfg; }
void epmoe_driver_get_info(const epmoe_driver *d, epmoe_driver_info *info) { *info = d->info; }

static int64_t layer_weight_bytes(const epmoe_layer_weights *w) {
    int64_t H = w->hidden_size, I = w->inter_size, n = w->n_local, Is = w->shared_inter;
    int64_t experts = n * (2 * I * H / 2 + 2 * I * H / 16 + H * I / 2 + H * I / 16 + 4 * 5);
    int64_t dense = w->n_experts * H * 4 * 2 /* gate + its panels */ + 3 * Is * H * 4 * 2;
    return experts + dense;
}

void epmoe_driver_destroy(epmoe_driver *d) {
    if (!d) return;
    epmoe_engine_destroy(d->engine);
    if (d->transport) d->transport->ops->destroy(d->transport);
    if (d->layers)
        for (int64_t l = 0; l < d->n_layers; l++) epmoe_layer_weights_free(&d->layers[l]);
    free(d->layers);
    free(d->x_local);
    free(d->y_local);
    free(d->ids_local);
    free(d->counts_local);
    free(d->shard_counts);
    free(d->shard_displs);
    if (d->hidden_row != MPI_DATATYPE_NULL) MPI_Type_free(&d->hidden_row);
    free(d);
}

/* Loads this rank's weights; returns the local status (the caller makes it collective). */
static epmoe_status load_local(epmoe_driver *d, const char *checkpoint) {
    epmoe_st_set *ckpt = NULL;
    EPMOE_TRY(epmoe_st_set_open(checkpoint, &ckpt));
    epmoe_status st = epmoe_config_from_checkpoint(ckpt, &d->cfg);
    epmoe_expert_slice slice = {0, 0};
    if (st == EPMOE_OK)
        st = epmoe_slice_of_rank(d->cfg.n_routed_experts, d->n_ranks, d->rank, &slice);
    if (st == EPMOE_OK) {
        d->n_layers = d->cfg.n_layers;
        d->layers = calloc((size_t)d->n_layers, sizeof *d->layers);
        if (!d->layers) st = epmoe_set_error(EPMOE_ERR_OOM, __FILE__, __LINE__, "out of memory");
    }
    for (int64_t l = 0; st == EPMOE_OK && l < d->n_layers; l++) {
        st = epmoe_layer_weights_load(ckpt, &d->cfg, l, &slice, &d->layers[l]);
        if (st == EPMOE_OK) st = epmoe_layer_weights_prepare_cpu(&d->layers[l]);
        if (st != EPMOE_OK) epmoe_add_context(st, "rank %d, layer %lld", d->rank, (long long)l);
    }
    /* Keep the experts dequantized when every layer fits the budget (results are identical). */
    int64_t cache_bytes = 0;
    for (int64_t l = 0; st == EPMOE_OK && l < d->n_layers; l++)
        cache_bytes += epmoe_layer_weights_cache_bytes(&d->layers[l]);
    if (st == EPMOE_OK && cache_bytes <= d->cfg.cpu_weight_cache_mb * (int64_t)(1 << 20))
        for (int64_t l = 0; st == EPMOE_OK && l < d->n_layers; l++)
            st = epmoe_layer_weights_cache_experts_cpu(&d->layers[l]);
    /* Weights were copied out of the mapping: the checkpoint can be closed. */
    epmoe_st_set_close(ckpt);
    return st;
}

/* Every rank learns whether any failed; on failure the driver is destroyed everywhere and the
 * failing rank keeps its own message, the others say that a peer failed. */
static epmoe_status agree_or_destroy(epmoe_driver *d, epmoe_status local, const char *what) {
    char saved[1024];
    snprintf(saved, sizeof saved, "%s", epmoe_last_error());
    int failed = local != EPMOE_OK, any = 0;
    MPI_Allreduce(&failed, &any, 1, MPI_INT, MPI_MAX, d->comm);
    if (!any) return EPMOE_OK;
    epmoe_driver_destroy(d);
    if (failed) return epmoe_set_error(local, __FILE__, __LINE__, "%s", saved);
    EPMOE_FAIL(EPMOE_ERR_MPI, "another rank failed to %s (see its log)", what);
}

epmoe_status epmoe_driver_create(const epmoe_config *cfg, const char *checkpoint, MPI_Comm comm,
                                 epmoe_driver **out) {
    epmoe_driver *d = calloc(1, sizeof *d);
    EPMOE_REQUIRE(d != NULL, EPMOE_ERR_OOM, "driver: out of memory");
    d->comm = comm;
    d->cfg = *cfg;
    d->hidden_row = MPI_DATATYPE_NULL;
    MPI_Comm_rank(comm, &d->rank);
    MPI_Comm_size(comm, &d->n_ranks);
    MPI_Comm_set_errhandler(comm, MPI_ERRORS_RETURN);

    epmoe_status st = agree_or_destroy(d, load_local(d, checkpoint), "load its weights");
    if (st != EPMOE_OK) return st;

    st = epmoe_transport_mpi_create(comm, &d->transport);
    if (st == EPMOE_OK)
        st = epmoe_engine_create(&d->cfg, d->transport, d->layers, d->n_layers, &d->engine);
    const int64_t T = d->cfg.max_tokens_per_rank, H = d->cfg.hidden_size;
    if (st == EPMOE_OK) {
        d->x_local = malloc((size_t)(T * H) * sizeof(float));
        d->y_local = malloc((size_t)(T * H) * sizeof(float));
        d->ids_local = malloc((size_t)T * sizeof(int32_t));
        d->counts_local = malloc((size_t)(d->n_layers * d->cfg.n_routed_experts) * sizeof(int64_t));
        d->shard_counts = malloc((size_t)d->n_ranks * sizeof(int));
        d->shard_displs = malloc((size_t)d->n_ranks * sizeof(int));
        if (MPI_Type_contiguous((int)H, MPI_FLOAT, &d->hidden_row) == MPI_SUCCESS)
            MPI_Type_commit(&d->hidden_row);
        else
            d->hidden_row = MPI_DATATYPE_NULL;
        if (d->hidden_row == MPI_DATATYPE_NULL ||!d->x_local || !d->y_local || !d->ids_local || !d->counts_local ||
            !d->shard_counts || !d->shard_displs)
            st = epmoe_set_error(EPMOE_ERR_OOM, __FILE__, __LINE__,
                                 "driver shard buffers: out of memory");
    }
    st = agree_or_destroy(d, st, "set up");
    if (st != EPMOE_OK) return st;

    int64_t weight_bytes = 0, cache_bytes = 0;
    for (int64_t l = 0; l < d->n_layers; l++) {
        weight_bytes += layer_weight_bytes(&d->layers[l]);
        if (d->layers[l].w13_panels_cache)
            cache_bytes += epmoe_layer_weights_cache_bytes(&d->layers[l]);
    }
    int64_t buffer_bytes = epmoe_engine_buffer_bytes(d->engine) + 2 * T * H * 4;
    epmoe_expert_slice slice = d->layers[0].slice;
    fprintf(stderr,
            "epmoe: rank %d/%d owns experts [%lld, %lld) of %lld; weights %.1f MiB over %lld "
            "layers (+%.1f MiB dequantized cache); worst-case buffers %.1f MiB "
            "(max_tokens_per_rank=%lld)\n",
            d->rank, d->n_ranks, (long long)slice.start, (long long)slice.end,
            (long long)d->cfg.n_routed_experts, (double)weight_bytes / (1 << 20),
            (long long)d->n_layers, (double)cache_bytes / (1 << 20),
            (double)buffer_bytes / (1 << 20), (long long)T);

    epmoe_driver_info *info = &d->info;
    snprintf(info->preset, sizeof info->preset, "%s", d->cfg.preset);
    info->n_ranks = d->n_ranks;
    info->n_layers = d->n_layers;
    info->n_hash_layers = d->cfg.n_hash_layers;
    info->hidden_size = H;
    info->n_routed_experts = d->cfg.n_routed_experts;
    info->top_k = d->cfg.top_k;
    info->experts_per_rank_min = d->cfg.n_routed_experts / d->n_ranks;
    info->experts_per_rank_max =
        (d->cfg.n_routed_experts + d->n_ranks - 1) / d->n_ranks;
    info->max_tokens_per_forward = T * d->n_ranks;
    MPI_Allreduce(&weight_bytes, &info->weight_bytes_per_rank, 1, MPI_INT64_T, MPI_MAX, comm);
    MPI_Allreduce(&buffer_bytes, &info->buffer_bytes_per_rank, 1, MPI_INT64_T, MPI_MAX, comm);
    *out = d;
    return EPMOE_OK;
}

/* Root-side validation: nothing reaches the other ranks unless the request is well-formed. */
static epmoe_status validate(const epmoe_driver *d, const float *x, const int32_t *token_ids,
                             int64_t T, int64_t begin, int64_t end) {
    const int64_t H = d->cfg.hidden_size;
    EPMOE_REQUIRE(d->rank == 0, EPMOE_ERR_INVALID_ARG, "epmoe_driver_forward is root-only");
    EPMOE_REQUIRE(T >= 0 && T <= d->info.max_tokens_per_forward, EPMOE_ERR_INVALID_ARG,
                  "tokens: %lld outside [0, %lld] (max_tokens_per_rank x ranks)", (long long)T,
                  (long long)d->info.max_tokens_per_forward);
    EPMOE_REQUIRE(begin >= 0 && begin < end && end <= d->n_layers, EPMOE_ERR_INVALID_ARG,
                  "layers: [%lld, %lld) is not a non-empty range inside [0, %lld)",
                  (long long)begin, (long long)end, (long long)d->n_layers);
    for (int64_t i = 0; i < T * H; i++)
        EPMOE_REQUIRE(isfinite(x[i]), EPMOE_ERR_NUMERIC,
                      "hidden_states: element [%lld, %lld] is %f (NaN/Inf not accepted)",
                      (long long)(i / H), (long long)(i % H), (double)x[i]);
    if (begin < d->cfg.n_hash_layers && T > 0) {
        EPMOE_REQUIRE(token_ids != NULL, EPMOE_ERR_INVALID_ARG,
                      "token_ids: required because layer %lld is hash-routed (the first %lld "
                      "layers are)",
                      (long long)begin, (long long)d->cfg.n_hash_layers);
    }
    if (token_ids) {
        for (int64_t t = 0; t < T; t++)
            EPMOE_REQUIRE(token_ids[t] >= 0 && token_ids[t] < d->cfg.vocab_size, EPMOE_ERR_RANGE,
                          "token_ids[%lld] = %d outside the vocabulary [0, %lld)", (long long)t,
                          token_ids[t], (long long)d->cfg.vocab_size);
    }
    return EPMOE_OK;
}

/* The part every rank runs: scatter, layers, gather. */
static epmoe_status forward_collective(epmoe_driver *d, const int64_t cmd[CMD_WORDS],
                                       const float *x, const int32_t *token_ids, float *out,
                                       epmoe_stage_times *times, int64_t *expert_counts) {
    const int64_t T = cmd[1], begin = cmd[2], end = cmd[3];
    const int has_ids = (int)cmd[4], want_counts = (int)cmd[5];
    const int64_t E = d->cfg.n_routed_experts;
    int64_t my_start = 0, my_count = 0;
    shard_of_rank(T, d->n_ranks, d->rank, &my_start, &my_count);
    for (int r = 0; r < d->n_ranks; r++) {
        int64_t s, c;
        shard_of_rank(T, d->n_ranks, r, &s, &c);
        d->shard_counts[r] = (int)c;
        d->shard_displs[r] = (int)s;
    }
    EPMOE_TRY(mpi_check(MPI_Scatterv(x, d->shard_counts, d->shard_displs, d->hidden_row,
                                     d->x_local, (int)my_count, d->hidden_row, 0, d->comm),
                        "MPI_Scatterv(hidden_states)"));
    if (has_ids) {
        EPMOE_TRY(mpi_check(MPI_Scatterv(token_ids, d->shard_counts, d->shard_displs, MPI_INT32_T,
                                         d->ids_local, (int)my_count, MPI_INT32_T, 0, d->comm),
                            "MPI_Scatterv(token_ids)"));
    }
    int64_t n_range = end - begin;
    if (want_counts) memset(d->counts_local, 0, (size_t)(n_range * E) * sizeof(int64_t));
    epmoe_stage_times local_times = {0};
    for (int64_t l = begin; l < end; l++) {
        EPMOE_TRY(epmoe_engine_layer_forward(d->engine, l, d->x_local,
                                             has_ids ? d->ids_local : NULL, my_count, d->y_local,
                                             &local_times,
                                             want_counts ? d->counts_local + (l - begin) * E
                                                         : NULL));
        float *tmp = d->x_local; /* this layer's output is the next layer's input */
        d->x_local = d->y_local;
        d->y_local = tmp;
    }
    EPMOE_TRY(mpi_check(MPI_Gatherv(d->x_local, (int)my_count, d->hidden_row, out,
                                    d->shard_counts, d->shard_displs, d->hidden_row, 0, d->comm),
                        "MPI_Gatherv(outputs)"));
    if (want_counts) {
        EPMOE_TRY(mpi_check(MPI_Reduce(d->counts_local, expert_counts, (int)(n_range * E),
                                       MPI_INT64_T, MPI_SUM, 0, d->comm),
                            "MPI_Reduce(expert counts)"));
    }
    if (times) {
        times->route += local_times.route;
        times->dispatch += local_times.dispatch;
        times->experts += local_times.experts;
        times->combine += local_times.combine;
        times->shared += local_times.shared;
        times->total += local_times.total;
    }
    return EPMOE_OK;
}

epmoe_status epmoe_driver_forward(epmoe_driver *d, const float *x, const int32_t *token_ids,
                                  int64_t T, int64_t layer_begin, int64_t layer_end, float *out,
                                  epmoe_stage_times *times, int64_t *expert_counts) {
    EPMOE_TRY(validate(d, x, token_ids, T, layer_begin, layer_end));
    int64_t cmd[CMD_WORDS] = {CMD_FORWARD,         T, layer_begin, layer_end,
                              token_ids != NULL, expert_counts != NULL};
    EPMOE_TRY(mpi_check(command_bcast(cmd, CMD_WORDS, d->comm, 1), "MPI_Ibcast(command)"));
    return forward_collective(d, cmd, x, token_ids, out, times, expert_counts);
}

epmoe_status epmoe_driver_follow(epmoe_driver *d) {
    EPMOE_REQUIRE(d->rank != 0, EPMOE_ERR_INVALID_ARG, "the root does not follow");
    for (;;) {
        int64_t cmd[CMD_WORDS];
        EPMOE_TRY(mpi_check(command_bcast(cmd, CMD_WORDS, d->comm, 0), "MPI_Ibcast(command)"));
        if (cmd[0] == CMD_SHUTDOWN) return EPMOE_OK;
        EPMOE_REQUIRE(cmd[0] == CMD_FORWARD, EPMOE_ERR_INTERNAL, "unknown command %lld",
                      (long long)cmd[0]);
        epmoe_status st = forward_collective(d, cmd, NULL, NULL, NULL, NULL, NULL);
        if (st == EPMOE_ERR_MPI && strstr(epmoe_last_error(), "another rank failed") == NULL)
            return st; /* the wire itself broke: no way to keep serving */
        if (st != EPMOE_OK)
            fprintf(stderr, "epmoe: rank %d: forward failed (%s): %s\n", d->rank,
                    epmoe_status_name(st), epmoe_last_error());
    }
}

epmoe_status epmoe_driver_shutdown(epmoe_driver *d) {
    EPMOE_REQUIRE(d->rank == 0, EPMOE_ERR_INVALID_ARG, "only the root shuts the followers down");
    int64_t cmd[CMD_WORDS] = {CMD_SHUTDOWN, 0, 0, 0, 0, 0};
    return mpi_check(command_bcast(cmd, CMD_WORDS, d->comm, 1), "MPI_Ibcast(shutdown)");
}
