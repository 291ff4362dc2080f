#include "coordinator/engine/driver.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/layout.h"
#include "common/safetensors.h"
#include "common/user_message.h"
#include "coordinator/transport/agree.h"
#include "worker/expert_weights.h"

/* Commands the root broadcasts to the followers. */
enum { CMD_FORWARD = 1, CMD_SHUTDOWN = 2 };
/* cmd[] = {op, T, layer_begin, layer_end, has_token_ids, want_expert_counts, dtype} */
#define CMD_WORDS 7

struct epmoe_driver {
    MPI_Comm comm;
    int rank, n_ranks;
    epmoe_config cfg;
    epmoe_backend *backend;
    epmoe_driver_info info;
    /* a follower's shard (the root reads and writes the caller's buffers in place) */
    void *x_local, *y_local;      /* [max_tokens_per_rank, H] of up to 4-byte elements */
    int32_t *ids_local;
    int64_t *counts_local;        /* [n_layers * E] */
    int *shard_counts, *shard_displs; /* [P], in tokens, for scatter/gather */
    MPI_Request *requests;            /* [2P]: scatter and gather */
    int *request_peers;               /* [2P] */
};

/* A follower's side of the command broadcast: nonblocking and polled with short sleeps, so an
 * idle follower (a service waiting for requests) does not spin a core; the root uses the
 * matching Ibcast (root_command; MPI does not match blocking with nonblocking collectives). */
static int command_bcast(int64_t cmd[], int words, MPI_Comm comm) {
    MPI_Request req;
    int rc = MPI_Ibcast(cmd, words, MPI_INT64_T, 0, comm, &req);
    if (rc != MPI_SUCCESS) return rc;
    for (;;) { /* no time limit: a follower waits as long as the service is idle */
        int done = 0;
        rc = MPI_Test(&req, &done, MPI_STATUS_IGNORE);
        if (rc != MPI_SUCCESS || done) return rc;
        struct timespec nap = {0, 200 * 1000}; /* 0.2 ms: negligible next to a forward */
        nanosleep(&nap, NULL);
    }
}

static epmoe_status mpi_check(int rc, const char *what) {
    return rc == MPI_SUCCESS ? EPMOE_OK : epmoe_mpi_error(rc, what);
}

/* The root's side of command_bcast, under the watchdog: a follower that died or hung must not
 * keep the root (and the service's callers) waiting forever. */
static epmoe_status root_command(epmoe_driver *d, int64_t cmd[], const char *what) {
    MPI_Request req;
    EPMOE_TRY(mpi_check(MPI_Ibcast(cmd, CMD_WORDS, MPI_INT64_T, 0, d->comm, &req), what));
    return epmoe_mpi_wait(&req, 1, NULL, d->cfg.collective_timeout_s, d->rank, what);
}

/* Rows between the root and the followers travel point to point, each wait under the
 * watchdog, the root's sends synchronous (MPI_Issend completes only once the follower has
 * taken the message): a follower that died or hung is then named by rank within
 * collective_timeout_s, instead of a blocking MPI_Scatterv/Gatherv waiting forever. */
enum { TAG_ROWS = 7301, TAG_IDS = 7302, TAG_OUT = 7303 };

static epmoe_status scatter_rows(epmoe_driver *d, const void *x, const int32_t *ids, int has_ids,
                                 MPI_Datatype row, size_t row_bytes) {
    MPI_Request *req = d->requests;
    int *peer = d->request_peers, n = 0, rc = MPI_SUCCESS;
    if (d->rank == 0) {
        for (int p = 1; p < d->n_ranks && rc == MPI_SUCCESS; p++) {
            peer[n] = p;
            rc = MPI_Issend((const char *)x + (size_t)d->shard_displs[p] * row_bytes,
                            d->shard_counts[p], row, p, TAG_ROWS, d->comm, &req[n++]);
            if (rc == MPI_SUCCESS && has_ids) {
                peer[n] = p;
                rc = MPI_Issend(ids + d->shard_displs[p], d->shard_counts[p], MPI_INT32_T, p,
                                TAG_IDS, d->comm, &req[n++]);
            }
        }
    } else {
        const int count = d->shard_counts[d->rank];
        peer[n] = 0;
        rc = MPI_Irecv(d->x_local, count, row, 0, TAG_ROWS, d->comm, &req[n++]);
        if (rc == MPI_SUCCESS && has_ids) {
            peer[n] = 0;
            rc = MPI_Irecv(d->ids_local, count, MPI_INT32_T, 0, TAG_IDS, d->comm, &req[n++]);
        }
    }
    if (rc != MPI_SUCCESS) return mpi_check(rc, "MPI_Issend/Irecv(rows to the ranks)");
    return epmoe_mpi_wait(req, n, peer, d->cfg.collective_timeout_s, d->rank,
                          "sending the batch's rows to the ranks");
}

static epmoe_status gather_rows(epmoe_driver *d, void *out, MPI_Datatype row, size_t row_bytes) {
    MPI_Request *req = d->requests;
    int *peer = d->request_peers, n = 0, rc = MPI_SUCCESS;
    if (d->rank == 0) {
        for (int p = 1; p < d->n_ranks && rc == MPI_SUCCESS; p++) {
            peer[n] = p;
            rc = MPI_Irecv((char *)out + (size_t)d->shard_displs[p] * row_bytes,
                           d->shard_counts[p], row, p, TAG_OUT, d->comm, &req[n++]);
        }
    } else {
        peer[n] = 0;
        rc = MPI_Isend(d->y_local, d->shard_counts[d->rank], row, 0, TAG_OUT, d->comm,
                       &req[n++]);
    }
    if (rc != MPI_SUCCESS) return mpi_check(rc, "MPI_Isend/Irecv(outputs to the root)");
    return epmoe_mpi_wait(req, n, peer, d->cfg.collective_timeout_s, d->rank,
                          "gathering the outputs at the root");
}

int epmoe_driver_rank(const epmoe_driver *d) { return d->rank; }
const epmoe_config *epmoe_driver_config(const epmoe_driver *d) { return &d->cfg; }
void epmoe_driver_get_info(const epmoe_driver *d, epmoe_driver_info *info) { *info = d->info; }
void epmoe_driver_get_counters(const epmoe_driver *d, epmoe_backend_counters *c) {
    d->backend->ops->get_counters(d->backend, c);
}

void epmoe_driver_destroy(epmoe_driver *d) {
    if (!d) return;
    epmoe_backend_destroy(d->backend);
    free(d->x_local);
    free(d->y_local);
    free(d->ids_local);
    free(d->counts_local);
    free(d->shard_counts);
    free(d->shard_displs);
    free(d->requests);
    free(d->request_peers);
    free(d);
}

/* Opens the checkpoint, reads its model settings and makes the backend (collective). */
static epmoe_status create_backend(epmoe_driver *d, const char *checkpoint, int64_t begin,
                                   int64_t end) {
    epmoe_st_set *ckpt = NULL;
    epmoe_status st = epmoe_st_set_open(checkpoint, &ckpt);
    if (st == EPMOE_OK) st = epmoe_config_from_checkpoint(ckpt, &d->cfg);
    if (st == EPMOE_OK && end < 0) end = d->cfg.n_layers;
    if (st == EPMOE_OK && !(begin >= 0 && begin < end && end <= d->cfg.n_layers))
        st = epmoe_set_error(EPMOE_ERR_INVALID_ARG, __FILE__, __LINE__,
                             "layers %lld:%lld: not a non-empty range inside the checkpoint's "
                             "%lld layers",
                             (long long)begin, (long long)end, (long long)d->cfg.n_layers);
    if (st == EPMOE_OK && d->n_ranks > d->cfg.n_routed_experts)
        st = epmoe_set_error(EPMOE_ERR_INVALID_ARG, __FILE__, __LINE__,
                             "%d ranks for %lld routed experts: use at most %lld ranks",
                             d->n_ranks, (long long)d->cfg.n_routed_experts,
                             (long long)d->cfg.n_routed_experts);
    st = epmoe_agree(d->comm, st, "open the checkpoint", d->cfg.collective_timeout_s);
    if (st == EPMOE_OK)
        st = epmoe_backend_create(&d->cfg, d->comm, ckpt, begin, end, stderr, &d->backend);
    epmoe_st_set_close(ckpt); /* weights were copied out of the mapping */
    return st;
}

epmoe_status epmoe_driver_create(const epmoe_config *cfg, const char *checkpoint, MPI_Comm comm,
                                 int64_t layer_begin, int64_t layer_end, epmoe_driver **out) {
    *out = NULL;
    epmoe_driver *d = calloc(1, sizeof *d);
    EPMOE_REQUIRE(d != NULL, EPMOE_ERR_OOM, "driver: out of memory");
    d->comm = comm;
    d->cfg = *cfg;
    MPI_Comm_rank(comm, &d->rank);
    MPI_Comm_size(comm, &d->n_ranks);
    MPI_Comm_set_errhandler(comm, MPI_ERRORS_RETURN);

    epmoe_status st = create_backend(d, checkpoint, layer_begin, layer_end);
    if (st != EPMOE_OK) {
        epmoe_driver_destroy(d);
        return st;
    }
    const int64_t T = d->cfg.max_tokens_per_rank, H = d->cfg.hidden_size;
    const int64_t n_range = d->backend->layer_end - d->backend->layer_begin;
    d->x_local = malloc((size_t)(T * H) * sizeof(float));
    d->y_local = malloc((size_t)(T * H) * sizeof(float));
    d->ids_local = malloc((size_t)T * sizeof(int32_t));
    d->counts_local = malloc((size_t)(n_range * d->cfg.n_routed_experts) * sizeof(int64_t));
    d->shard_counts = malloc((size_t)d->n_ranks * sizeof(int));
    d->shard_displs = malloc((size_t)d->n_ranks * sizeof(int));
    d->requests = malloc(2 * (size_t)d->n_ranks * sizeof *d->requests);
    d->request_peers = malloc(2 * (size_t)d->n_ranks * sizeof *d->request_peers);
    st = d->x_local && d->y_local && d->ids_local && d->counts_local && d->shard_counts &&
                 d->shard_displs && d->requests && d->request_peers
             ? EPMOE_OK
             : epmoe_set_error(EPMOE_ERR_OOM, __FILE__, __LINE__,
                               "driver shard buffers: out of memory");
    st = epmoe_agree(comm, st, "set up its shard buffers", d->cfg.collective_timeout_s);
    if (st != EPMOE_OK) {
        epmoe_driver_destroy(d);
        return st;
    }

    const epmoe_backend_info *bi = &d->backend->info;
    epmoe_expert_slice slice;
    epmoe_slice_of_rank(d->cfg.n_routed_experts, d->n_ranks, d->rank, &slice);
    fprintf(stderr,
            "epmoe: rank %d/%d: backend %s (%s%s%.0d, transport %s), experts [%lld, %lld) of "
            "%lld, layers [%lld, %lld): weights %.1f MiB, worst-case buffers %.1f MiB "
            "(max_tokens_per_rank=%lld)\n",
            d->rank, d->n_ranks, bi->name, bi->device_name, bi->device >= 0 ? ", device " : "",
            bi->device >= 0 ? bi->device : 0, bi->transport, (long long)slice.start,
            (long long)slice.end, (long long)d->cfg.n_routed_experts,
            (long long)d->backend->layer_begin, (long long)d->backend->layer_end,
            (double)bi->weight_bytes / (1 << 20), (double)bi->buffer_bytes / (1 << 20),
            (long long)T);
    if (bi->note[0] && d->rank == 0) fprintf(stderr, "epmoe: %s\n", bi->note);

    epmoe_driver_info *info = &d->info;
    snprintf(info->preset, sizeof info->preset, "%s", d->cfg.preset);
    info->n_ranks = d->n_ranks;
    info->n_layers = d->cfg.n_layers;
    info->n_hash_layers = d->cfg.n_hash_layers;
    info->hidden_size = H;
    info->n_routed_experts = d->cfg.n_routed_experts;
    info->top_k = d->cfg.top_k;
    info->experts_per_rank_min = d->cfg.n_routed_experts / d->n_ranks;
    info->experts_per_rank_max = (d->cfg.n_routed_experts + d->n_ranks - 1) / d->n_ranks;
    info->max_tokens_per_forward = T * d->n_ranks;
    info->layer_begin = d->backend->layer_begin;
    info->layer_end = d->backend->layer_end;
    info->backend = *bi;
    MPI_Allreduce(&bi->weight_bytes, &info->weight_bytes_per_rank, 1, MPI_INT64_T, MPI_MAX, comm);
    MPI_Allreduce(&bi->buffer_bytes, &info->buffer_bytes_per_rank, 1, MPI_INT64_T, MPI_MAX, comm);
    *out = d;
    return EPMOE_OK;
}

/* Root-side checks: nothing reaches the other ranks unless the request is well-formed. (Row
 * values are checked by each rank's backend on its own shard, on the device for cuda.) */
static epmoe_status validate(const epmoe_driver *d, epmoe_dtype dtype, const int32_t *token_ids,
                             int64_t T, int64_t begin, int64_t end) {
    EPMOE_REQUIRE(d->rank == 0, EPMOE_ERR_INVALID_ARG, "epmoe_driver_forward is root-only");
    EPMOE_REQUIRE(dtype == EPMOE_DTYPE_F32 || dtype == EPMOE_DTYPE_BF16 ||
                      dtype == EPMOE_DTYPE_F16,
                  EPMOE_ERR_INVALID_ARG, "hidden_states: dtype %s; expected F32, BF16 or F16",
                  epmoe_dtype_name(dtype));
    EPMOE_REQUIRE(T >= 0 && T <= d->info.max_tokens_per_forward, EPMOE_ERR_INVALID_ARG,
                  "tokens: %lld outside [0, %lld] (max_tokens_per_rank x ranks)", (long long)T,
                  (long long)d->info.max_tokens_per_forward);
    EPMOE_REQUIRE(begin >= d->info.layer_begin && begin < end && end <= d->info.layer_end,
                  EPMOE_ERR_INVALID_ARG,
                  "layers: [%lld, %lld) is not a non-empty range inside the loaded layers "
                  "[%lld, %lld)",
                  (long long)begin, (long long)end, (long long)d->info.layer_begin,
                  (long long)d->info.layer_end);
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

/* The part every rank runs: scatter, layers, gather. The root's own shard is the first rows
 * of the caller's buffers (MPI_IN_PLACE: never copied on the host). */
static epmoe_status forward_collective(epmoe_driver *d, const int64_t cmd[CMD_WORDS],
                                       const void *x, const int32_t *token_ids, void *out,
                                       epmoe_stage_times *times, int64_t *expert_counts) {
    const int64_t T = cmd[1], begin = cmd[2], end = cmd[3];
    const int has_ids = (int)cmd[4], want_counts = (int)cmd[5];
    const epmoe_dtype dtype = (epmoe_dtype)cmd[6];
    const int64_t E = d->cfg.n_routed_experts, H = d->cfg.hidden_size;
    const int root = d->rank == 0;
    for (int r = 0; r < d->n_ranks; r++) {
        int64_t start, count;
        epmoe_shard_of_rank(T, d->n_ranks, r, &start, &count);
        d->shard_counts[r] = (int)count;
        d->shard_displs[r] = (int)start;
    }
    const int64_t my_count = d->shard_counts[d->rank], my_start = d->shard_displs[d->rank];
    MPI_Datatype row;
    EPMOE_TRY(mpi_check(MPI_Type_contiguous((int)(H * (int64_t)epmoe_dtype_size(dtype)), MPI_BYTE,
                                            &row),
                        "MPI_Type_contiguous(row)"));
    MPI_Type_commit(&row);
    const size_t row_bytes = (size_t)H * epmoe_dtype_size(dtype);
    epmoe_status st = scatter_rows(d, x, token_ids, has_ids, row, row_bytes);
    if (st != EPMOE_OK) {
        MPI_Type_free(&row);
        return st;
    }
    const int64_t n_range = end - begin;
    if (want_counts) memset(d->counts_local, 0, (size_t)(n_range * E) * sizeof(int64_t));
    epmoe_stage_times local_times = {0};
    epmoe_backend_batch batch = {
        .x = root ? x : d->x_local,
        .out = root ? out : d->y_local,
        .dtype = dtype,
        .token_ids = !has_ids ? NULL : root ? token_ids : d->ids_local,
        .T = my_count,
        .largest_T = d->shard_counts[0], /* rank 0's shard is never smaller than another's */
        .first_row = my_start,
        .layer_begin = begin,
        .layer_end = end,
        .times = &local_times,
        .expert_counts = want_counts ? d->counts_local : NULL,
    };
    st = d->backend->ops->forward(d->backend, &batch);
    if (st == EPMOE_OK) /* agreed: every rank gathers, or none does */
        st = gather_rows(d, out, row, row_bytes);
    MPI_Type_free(&row);
    EPMOE_TRY(st);
    if (want_counts) {
        MPI_Request req;
        EPMOE_TRY(mpi_check(MPI_Ireduce(d->counts_local, expert_counts, (int)(n_range * E),
                                        MPI_INT64_T, MPI_SUM, 0, d->comm, &req),
                            "MPI_Ireduce(expert counts)"));
        EPMOE_TRY(epmoe_mpi_wait(&req, 1, NULL, d->cfg.collective_timeout_s, d->rank,
                                 "summing the expert counts"));
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

epmoe_status epmoe_driver_forward(epmoe_driver *d, const void *x, epmoe_dtype dtype,
                                  const int32_t *token_ids, int64_t T, int64_t layer_begin,
                                  int64_t layer_end, void *out, epmoe_stage_times *times,
                                  int64_t *expert_counts) {
    EPMOE_TRY(validate(d, dtype, token_ids, T, layer_begin, layer_end));
    int64_t cmd[CMD_WORDS] = {CMD_FORWARD,       T, layer_begin, layer_end, token_ids != NULL,
                              expert_counts != NULL, (int64_t)dtype};
    EPMOE_TRY(root_command(d, cmd, "MPI_Ibcast(command)"));
    return forward_collective(d, cmd, x, token_ids, out, times, expert_counts);
}

epmoe_status epmoe_driver_follow(epmoe_driver *d) {
    EPMOE_REQUIRE(d->rank != 0, EPMOE_ERR_INVALID_ARG, "the root does not follow");
    for (;;) {
        int64_t cmd[CMD_WORDS];
        EPMOE_TRY(mpi_check(command_bcast(cmd, CMD_WORDS, d->comm), "MPI_Ibcast(command)"));
        if (cmd[0] == CMD_SHUTDOWN) return EPMOE_OK;
        EPMOE_REQUIRE(cmd[0] == CMD_FORWARD, EPMOE_ERR_INTERNAL, "unknown command %lld",
                      (long long)cmd[0]);
        epmoe_status st = forward_collective(d, cmd, NULL, NULL, NULL, NULL, NULL);
        /* a lost peer or a broken wire ends the job; a bad batch does not */
        if (st == EPMOE_ERR_PEER_LOST || st == EPMOE_ERR_MPI || st == EPMOE_ERR_NCCL) return st;
        if (st != EPMOE_OK)
            fprintf(stderr, "epmoe: rank %d: forward failed (%s): %s\n", d->rank,
                    epmoe_status_name(st), epmoe_last_error_for_user());
    }
}

epmoe_status epmoe_driver_shutdown(epmoe_driver *d) {
    EPMOE_REQUIRE(d->rank == 0, EPMOE_ERR_INVALID_ARG, "only the root shuts the followers down");
    int64_t cmd[CMD_WORDS] = {CMD_SHUTDOWN, 0, 0, 0, 0, 0, 0};
    return root_command(d, cmd, "MPI_Ibcast(shutdown)");
}
