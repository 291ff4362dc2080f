#include "coordinator/engine/cpu_engine.h"

#include <math.h>
#include <mpi.h> /* MPI_Wtime only: the wire goes through the transport */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/dispatch_record.h"
#include "common/layout.h"
#include "kernels/ops.h"
#include "worker/experts.h"

struct epmoe_cpu_engine {
    epmoe_config cfg;
    epmoe_transport *transport;
    const epmoe_layer_weights *layers;
    int64_t n_layers;
    int P, rank;
    int64_t H, E, k, max_tokens;
    int64_t n_local; /* this rank's slice size (same slice every layer) */
    epmoe_expert_slice slice;
    epmoe_dispatch_record row; /* the wire format of a dispatched row (fp32 payload) */
    epmoe_route_params route;

    /* capacities (rows) */
    int64_t send_rows_cap, recv_rows_cap, pairs_cap, padded_cap, ret_recv_cap;

    /* coordinator side */
    float *logits;          /* [Tmax, E] */
    int32_t *ids;           /* [Tmax, k] global expert ids */
    float *weights;         /* [Tmax, k] */
    int32_t *owner;         /* [Tmax, k] owner rank of each slot */
    int64_t *y_index;       /* [Tmax, k] row of ret_recv holding the slot's output */
    uint8_t *send_buf;      /* [send_rows_cap, row.bytes] records */
    float *ret_recv;        /* [ret_recv_cap, H] */
    float *shared_out;      /* [Tmax, H] */
    /* worker side */
    uint8_t *recv_buf;      /* [recv_rows_cap, row.bytes] */
    int64_t *pair_pos;      /* [pairs_cap] padded row of each (row, expert) pair */
    float *x_padded, *y_padded; /* [padded_cap, H] */
    float *ret_send;        /* [pairs_cap, H] */
    int64_t *tokens_per_expert, *padded_offsets, *fill; /* [n_local], [n_local+1], [n_local] */
    /* per-peer counts and displacements */
    int64_t *send_counts, *send_displs, *recv_counts, *recv_displs;
    int64_t *ret_send_counts, *ret_send_displs, *ret_recv_counts, *ret_recv_displs;
    int64_t *peer_cursor;   /* [P] */

    epmoe_expert_scratch *scratch;
    epmoe_cpu_engine_counters counters;
    int64_t buffer_bytes;
};

static void *engine_alloc(epmoe_cpu_engine *e, size_t bytes, int *failed) {
    void *p = malloc(bytes ? bytes : 1);
    if (!p) *failed = 1;
    e->buffer_bytes += (int64_t)bytes;
    return p;
}

epmoe_status epmoe_cpu_engine_create(const epmoe_config *cfg, epmoe_transport *transport,
                                 const epmoe_layer_weights *layers, int64_t n_layers,
                                 epmoe_cpu_engine **out) {
    EPMOE_REQUIRE(n_layers >= 1, EPMOE_ERR_INVALID_ARG, "engine needs at least one layer");
    epmoe_cpu_engine *e = calloc(1, sizeof *e);
    EPMOE_REQUIRE(e != NULL, EPMOE_ERR_OOM, "engine: out of memory");
    e->cfg = *cfg;
    e->transport = transport;
    e->layers = layers;
    e->n_layers = n_layers;
    e->P = transport->n_ranks;
    e->rank = transport->rank;
    e->H = cfg->hidden_size;
    e->E = cfg->n_routed_experts;
    e->k = cfg->top_k;
    e->max_tokens = cfg->max_tokens_per_rank;
    e->route = epmoe_route_params_from_config(cfg);
    epmoe_status st = epmoe_slice_of_rank(e->E, e->P, e->rank, &e->slice);
    if (st != EPMOE_OK) {
        free(e);
        return st;
    }
    e->n_local = e->slice.end - e->slice.start;
    for (int64_t l = 0; l < n_layers; l++) {
        if (layers[l].slice.start != e->slice.start || layers[l].slice.end != e->slice.end ||
            layers[l].hidden_size != e->H || layers[l].n_experts != e->E) {
            epmoe_set_error(EPMOE_ERR_INVALID_ARG, __FILE__, __LINE__,
                            "layer %lld weights hold experts [%lld, %lld) of %lld at H=%lld; "
                            "rank %d owns [%lld, %lld) of %lld at H=%lld",
                            (long long)l, (long long)layers[l].slice.start,
                            (long long)layers[l].slice.end, (long long)layers[l].n_experts,
                            (long long)layers[l].hidden_size, e->rank, (long long)e->slice.start,
                            (long long)e->slice.end, (long long)e->E, (long long)e->H);
            free(e);
            return EPMOE_ERR_INVALID_ARG;
        }
    }
    if (cfg->act_scale == EPMOE_ACT_SCALE_STATIC && cfg->act_quant == EPMOE_ACT_NVFP4) {
        for (int64_t l = 0; l < n_layers; l++)
            for (int64_t le = 0; le < e->n_local; le++) {
                float a = layers[l].w13_input_scale[le], b = layers[l].w2_input_scale[le];
                if (!(a > 0 && b > 0 && isfinite(a) && isfinite(b))) {
                    epmoe_set_error(EPMOE_ERR_INVALID_ARG, __FILE__, __LINE__,
                                    "act_scale=static needs a positive input_scale for every "
                                    "expert; layer %lld expert %lld has w13 %g, w2 %g (MXFP4 "
                                    "checkpoints carry none: use act_scale=per_row)",
                                    (long long)l, (long long)(e->slice.start + le), (double)a,
                                    (double)b);
                    free(e);
                    return EPMOE_ERR_INVALID_ARG;
                }
            }
    }
    st = epmoe_dispatch_record_layout(EPMOE_WIRE_F32, e->H, e->k, &e->row);
    if (st != EPMOE_OK) {
        free(e);
        return st;
    }

    /* Worst cases (dropless, rule 22): common/layout.h */
    const int64_t T = e->max_tokens, k = e->k, P = e->P, H = e->H;
    const epmoe_dispatch_capacity cap = epmoe_dispatch_capacity_of(T, k, (int)P, e->n_local);
    e->send_rows_cap = cap.send_rows;
    e->recv_rows_cap = cap.recv_rows;
    e->pairs_cap = cap.pairs;
    e->padded_cap = epmoe_padded_capacity(e->pairs_cap, e->n_local, cfg->expert_pad_rows);
    e->ret_recv_cap = cap.return_rows;

    int failed = 0;
    size_t f = sizeof(float), i64 = sizeof(int64_t), i32 = sizeof(int32_t);
    e->logits = engine_alloc(e, (size_t)(T * e->E) * f, &failed);
    e->ids = engine_alloc(e, (size_t)(T * k) * i32, &failed);
    e->weights = engine_alloc(e, (size_t)(T * k) * f, &failed);
    e->owner = engine_alloc(e, (size_t)(T * k) * i32, &failed);
    e->y_index = engine_alloc(e, (size_t)(T * k) * i64, &failed);
    e->send_buf = engine_alloc(e, (size_t)e->send_rows_cap * e->row.bytes, &failed);
    e->ret_recv = engine_alloc(e, (size_t)(e->ret_recv_cap * H) * f, &failed);
    e->shared_out = engine_alloc(e, (size_t)(T * H) * f, &failed);
    e->recv_buf = engine_alloc(e, (size_t)e->recv_rows_cap * e->row.bytes, &failed);
    e->pair_pos = engine_alloc(e, (size_t)e->pairs_cap * i64, &failed);
    e->x_padded = engine_alloc(e, (size_t)(e->padded_cap * H) * f, &failed);
    e->y_padded = engine_alloc(e, (size_t)(e->padded_cap * H) * f, &failed);
    e->ret_send = engine_alloc(e, (size_t)(e->pairs_cap * H) * f, &failed);
    e->tokens_per_expert = engine_alloc(e, (size_t)e->n_local * i64, &failed);
    e->padded_offsets = engine_alloc(e, (size_t)(e->n_local + 1) * i64, &failed);
    e->fill = engine_alloc(e, (size_t)e->n_local * i64, &failed);
    int64_t **peer_arrays[] = {&e->send_counts,     &e->send_displs,     &e->recv_counts,
                               &e->recv_displs,     &e->ret_send_counts, &e->ret_send_displs,
                               &e->ret_recv_counts, &e->ret_recv_displs, &e->peer_cursor};
    for (size_t i = 0; i < sizeof peer_arrays / sizeof peer_arrays[0]; i++)
        *peer_arrays[i] = engine_alloc(e, (size_t)P * i64, &failed);
    if (failed) {
        int64_t bytes = e->buffer_bytes;
        epmoe_cpu_engine_destroy(e);
        EPMOE_FAIL(EPMOE_ERR_OOM,
                   "engine buffers need %.1f MiB for max_tokens_per_rank=%lld over %d ranks; "
                   "lower max_tokens_per_rank",
                   (double)bytes / (1 << 20), (long long)T, (int)P);
    }
    st = epmoe_expert_scratch_create(H, cfg->moe_inter_size,
                                     cfg->n_shared_experts * cfg->moe_inter_size, &e->scratch);
    if (st != EPMOE_OK) {
        epmoe_cpu_engine_destroy(e);
        return st;
    }
    e->buffer_bytes += (int64_t)epmoe_expert_scratch_bytes(e->scratch);
    *out = e;
    return EPMOE_OK;
}

void epmoe_cpu_engine_destroy(epmoe_cpu_engine *e) {
    if (!e) return;
    void *bufs[] = {e->logits,          e->ids,           e->weights,        e->owner,
                    e->y_index,         e->send_buf,      e->ret_recv,       e->shared_out,
                    e->recv_buf,        e->pair_pos,      e->x_padded,       e->y_padded,
                    e->ret_send,        e->tokens_per_expert, e->padded_offsets, e->fill,
                    e->send_counts,     e->send_displs,   e->recv_counts,    e->recv_displs,
                    e->ret_send_counts, e->ret_send_displs, e->ret_recv_counts,
                    e->ret_recv_displs, e->peer_cursor};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) free(bufs[i]);
    epmoe_expert_scratch_free(e->scratch);
    free(e);
}

int64_t epmoe_cpu_engine_buffer_bytes(const epmoe_cpu_engine *e) { return e->buffer_bytes; }

void epmoe_cpu_engine_get_counters(const epmoe_cpu_engine *e, epmoe_cpu_engine_counters *c) {
    *c = e->counters;
}

static void exclusive_prefix(const int64_t *counts, int n, int64_t *displs) {
    int64_t run = 0;
    for (int i = 0; i < n; i++) {
        displs[i] = run;
        run += counts[i];
    }
}

/* A record's k global expert ids (slot order, -1 where the slot is on another rank). */
static int32_t *row_ids(const epmoe_cpu_engine *e, uint8_t *buf, int64_t row) {
    return (int32_t *)(buf + (size_t)row * (size_t)e->row.bytes + (size_t)e->row.meta_offset);
}

static float *row_hidden(const epmoe_cpu_engine *e, uint8_t *buf, int64_t row) {
    return (float *)(buf + (size_t)row * (size_t)e->row.bytes);
}

/* Route this rank's tokens and pack one row per (token, destination rank). */
static epmoe_status route_and_plan(epmoe_cpu_engine *e, const epmoe_layer_weights *w,
                                   const float *x, const int32_t *token_ids, int64_t T,
                                   int64_t layer) {
    const int64_t k = e->k, H = e->H;
    epmoe_cpu_gate_logits_panels(x, T, H, w->gate_panels, e->E, e->logits);
    (void)layer;
    if (w->layer < e->cfg.n_hash_layers) {
        EPMOE_REQUIRE(token_ids != NULL || T == 0, EPMOE_ERR_INVALID_ARG,
                      "layer %lld is hash-routed and needs token ids", (long long)w->layer);
        EPMOE_REQUIRE(w->tid2eid != NULL, EPMOE_ERR_FORMAT,
                      "layer %lld is hash-routed but its checkpoint has no tid2eid table",
                      (long long)w->layer);
        EPMOE_TRY(epmoe_cpu_route_hash(&e->route, e->logits, w->tid2eid, w->vocab_size,
                                       token_ids, T, e->ids, e->weights));
    } else {
        EPMOE_TRY(epmoe_cpu_route(&e->route, e->logits, w->gate_bias, T, e->ids, e->weights));
    }

    for (int p = 0; p < e->P; p++) e->send_counts[p] = 0;
    for (int64_t t = 0; t < T; t++) {
        for (int64_t s = 0; s < k; s++) {
            int owner = 0;
            EPMOE_TRY(epmoe_owner_of_expert(e->E, e->P, e->ids[t * k + s], &owner));
            e->owner[t * k + s] = owner;
            int first = 1; /* count a destination once per token */
            for (int64_t q = 0; q < s; q++)
                if (e->owner[t * k + q] == owner) first = 0;
            if (first) e->send_counts[owner]++;
        }
    }
    exclusive_prefix(e->send_counts, e->P, e->send_displs);
    for (int p = 0; p < e->P; p++) e->peer_cursor[p] = e->send_displs[p];

    /* Rows go out per destination in increasing token order; y_index records where each
     * slot's output will sit in the combine buffer (peer block, then arrival order). The
     * return offsets need the per-peer pair totals, so first count pairs per peer. */
    for (int p = 0; p < e->P; p++) e->ret_recv_counts[p] = 0;
    for (int64_t i = 0; i < T * k; i++) e->ret_recv_counts[e->owner[i]]++;
    exclusive_prefix(e->ret_recv_counts, e->P, e->ret_recv_displs);
    int64_t *pair_cursor = e->ret_send_counts; /* reused as scratch until the worker phase */
    for (int p = 0; p < e->P; p++) pair_cursor[p] = e->ret_recv_displs[p];

    for (int64_t t = 0; t < T; t++) {
        for (int64_t s = 0; s < k; s++) {
            int owner = e->owner[t * k + s];
            int first = 1;
            for (int64_t q = 0; q < s; q++)
                if (e->owner[t * k + q] == owner) first = 0;
            if (!first) continue;
            int64_t row = e->peer_cursor[owner]++;
            int32_t *ids = row_ids(e, e->send_buf, row);
            for (int64_t q = 0; q < k; q++) {
                const int here = e->owner[t * k + q] == owner;
                ids[q] = here ? e->ids[t * k + q] : -1;
                if (here) e->y_index[t * k + q] = pair_cursor[owner]++;
            }
            memcpy(row_hidden(e, e->send_buf, row), x + (size_t)t * (size_t)H,
                   (size_t)H * sizeof(float));
        }
    }
    return EPMOE_OK;
}

/* Worker: received rows -> padded layout -> expert MLPs -> one output row per pair, in
 * arrival order, grouped by source rank. */
static epmoe_status run_experts(epmoe_cpu_engine *e, const epmoe_layer_weights *w, int64_t R) {
    const int64_t H = e->H, n_local = e->n_local;
    for (int64_t le = 0; le < n_local; le++) e->tokens_per_expert[le] = 0;
    int64_t pairs = 0;
    for (int64_t i = 0; i < R; i++) {
        const int32_t *ids = row_ids(e, e->recv_buf, i);
        int64_t mine = 0;
        for (int64_t q = 0; q < e->k; q++) {
            if (ids[q] < 0) continue;
            int64_t local = 0; /* the global -> local mapping, checked (rule 8) */
            const epmoe_status st = epmoe_global_to_local(&e->slice, ids[q], &local);
            if (st != EPMOE_OK) return epmoe_add_context(st, "received row %lld", (long long)i);
            e->tokens_per_expert[local]++;
            mine++;
        }
        EPMOE_REQUIRE(mine >= 1, EPMOE_ERR_INTERNAL,
                      "received row %lld carries no expert of this rank", (long long)i);
        pairs += mine;
    }
    EPMOE_REQUIRE(pairs <= e->pairs_cap, EPMOE_ERR_INTERNAL,
                  "%lld (row, expert) pairs exceed the worst-case capacity %lld",
                  (long long)pairs, (long long)e->pairs_cap);
    epmoe_padded_offsets_from_counts(e->tokens_per_expert, n_local, e->cfg.expert_pad_rows,
                                     e->padded_offsets);
    for (int64_t le = 0; le < n_local; le++) e->fill[le] = e->padded_offsets[le];

    int64_t pair = 0;
    for (int64_t i = 0; i < R; i++) {
        const int32_t *ids = row_ids(e, e->recv_buf, i);
        const float *xrow = row_hidden(e, e->recv_buf, i);
        for (int64_t q = 0; q < e->k; q++) {
            if (ids[q] < 0) continue;
            int64_t pos = e->fill[ids[q] - e->slice.start]++;
            e->pair_pos[pair++] = pos;
            memcpy(e->x_padded + (size_t)pos * (size_t)H, xrow, (size_t)H * sizeof(float));
        }
    }
    epmoe_expert_stats stats = {0, 0};
    EPMOE_TRY(epmoe_cpu_experts_forward(&e->cfg, w, e->x_padded, e->tokens_per_expert,
                                        e->padded_offsets, e->y_padded, e->scratch, &stats));
    for (int64_t p = 0; p < pairs; p++)
        memcpy(e->ret_send + (size_t)p * (size_t)H, e->y_padded + (size_t)e->pair_pos[p] * (size_t)H,
               (size_t)H * sizeof(float));
    e->counters.pairs_computed += stats.rows_computed;
    e->counters.saturated_elements += stats.saturated_elements;
    e->counters.rows_returned += pairs;

    /* Return counts per source peer: pairs of the rows that peer sent, in arrival order. */
    int64_t row = 0;
    for (int p = 0; p < e->P; p++) {
        int64_t n = 0;
        for (int64_t r = 0; r < e->recv_counts[p]; r++, row++)
            for (int64_t q = 0; q < e->k; q++) n += row_ids(e, e->recv_buf, row)[q] >= 0;
        e->ret_send_counts[p] = n;
    }
    exclusive_prefix(e->ret_send_counts, e->P, e->ret_send_displs);
    return EPMOE_OK;
}

/* Every rank agrees on failure before the next collective, so none waits forever. */
static epmoe_status agree(epmoe_cpu_engine *e, epmoe_status local, int64_t layer, const char *stage) {
    if (local != EPMOE_OK)
        epmoe_add_context(local, "rank %d, layer %lld, %s", e->rank, (long long)layer, stage);
    char what[64];
    snprintf(what, sizeof what, "%s (layer %lld)", stage, (long long)layer);
    return e->transport->ops->agree(e->transport, local, what);
}

static double now(void) { return MPI_Wtime(); }

epmoe_status epmoe_cpu_engine_layer_forward(epmoe_cpu_engine *e, int64_t layer, const float *x,
                                        const int32_t *token_ids, int64_t T, float *out,
                                        epmoe_stage_times *times, int64_t *expert_counts) {
    EPMOE_REQUIRE(layer >= 0 && layer < e->n_layers, EPMOE_ERR_RANGE,
                  "layer %lld outside [0, %lld)", (long long)layer, (long long)e->n_layers);
    const epmoe_layer_weights *w = &e->layers[layer];
    const int64_t k = e->k, H = e->H;
    epmoe_transport *tr = e->transport;
    double t0 = now();

    epmoe_status st = EPMOE_OK;
    if (T < 0 || T > e->max_tokens)
        st = epmoe_set_error(EPMOE_ERR_INVALID_ARG, __FILE__, __LINE__,
                             "%lld tokens on rank %d; max_tokens_per_rank is %lld", (long long)T,
                             e->rank, (long long)e->max_tokens);
    else if (w->gate_panels == NULL)
        st = epmoe_set_error(EPMOE_ERR_INTERNAL, __FILE__, __LINE__,
                             "layer %lld: CPU weights not prepared", (long long)layer);
    else
        st = route_and_plan(e, w, x, token_ids, T, layer);
    EPMOE_TRY(agree(e, st, w->layer, "route"));
    if (expert_counts)
        for (int64_t i = 0; i < T * k; i++) expert_counts[e->ids[i]]++;
    double t1 = now();

    EPMOE_TRY(tr->ops->exchange_counts(tr, e->send_counts, e->recv_counts));
    exclusive_prefix(e->recv_counts, e->P, e->recv_displs);
    int64_t R = e->recv_displs[e->P - 1] + e->recv_counts[e->P - 1];
    EPMOE_REQUIRE(R <= e->recv_rows_cap, EPMOE_ERR_INTERNAL,
                  "%lld received rows exceed the worst-case capacity %lld", (long long)R,
                  (long long)e->recv_rows_cap);
    EPMOE_TRY(tr->ops->alltoallv(tr, e->send_buf, e->send_counts, e->send_displs, e->recv_buf,
                                 e->recv_counts, e->recv_displs, (size_t)e->row.bytes));
    int64_t sent = e->send_displs[e->P - 1] + e->send_counts[e->P - 1];
    e->counters.rows_sent += sent;
    e->counters.rows_received += R;
    double t2 = now();

    st = run_experts(e, w, R);
    EPMOE_TRY(agree(e, st, w->layer, "experts"));
    double t3 = now();

    EPMOE_TRY(tr->ops->alltoallv(tr, e->ret_send, e->ret_send_counts, e->ret_send_displs,
                                 e->ret_recv, e->ret_recv_counts, e->ret_recv_displs,
                                 (size_t)H * sizeof(float)));
    e->counters.rows_combined += T * k;
    double t4 = now();

    EPMOE_TRY(epmoe_cpu_shared_forward(&e->cfg, w, x, T, e->shared_out, e->scratch));
    double t5 = now();
    for (int64_t t = 0; t < T; t++) {
        float *o = out + (size_t)t * (size_t)H;
        for (int64_t h = 0; h < H; h++) o[h] = 0.0f;
        for (int64_t s = 0; s < k; s++) { /* slot order: the same sum for every rank count */
            float wt = e->weights[t * k + s];
            const float *y = e->ret_recv + (size_t)e->y_index[t * k + s] * (size_t)H;
            for (int64_t h = 0; h < H; h++) o[h] = o[h] + wt * y[h];
        }
        const float *sh = e->shared_out + (size_t)t * (size_t)H;
        for (int64_t h = 0; h < H; h++) o[h] = o[h] + sh[h];
    }
    double t6 = now();
    if (times) {
        times->route += t1 - t0;
        times->dispatch += t2 - t1;
        times->experts += t3 - t2;
        times->combine += (t4 - t3) + (t6 - t5);
        times->shared += t5 - t4;
        times->total += t6 - t0;
    }
    return EPMOE_OK;
}
