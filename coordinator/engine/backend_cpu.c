/* The cpu backend: coordinator/engine/cpu_engine.h over the MPI transport, weights in host
 * memory (dense weights packed into panels; experts dequantized into a cache when every layer
 * fits cpu_weight_cache_mib). */
#include <stdlib.h>
#include <string.h>

#include "coordinator/engine/backend.h"
#include "coordinator/engine/cpu_engine.h"
#include "coordinator/engine/load.h"
#include "coordinator/transport/agree.h"
#include "coordinator/transport/mpi.h"

typedef struct {
    epmoe_config cfg;
    MPI_Comm comm;
    int rank;
    epmoe_transport *transport;
    epmoe_cpu_engine *engine;
    epmoe_layer_weights *layers; /* [layer_end - layer_begin] */
    int64_t n_layers;
    float *x, *y;                /* [max_tokens_per_rank, H]: ping-pong across layers */
} cpu_backend;

static void cpu_destroy(epmoe_backend *b) {
    if (!b) return;
    cpu_backend *c = b->impl;
    if (c) {
        epmoe_cpu_engine_destroy(c->engine);
        if (c->transport) c->transport->ops->destroy(c->transport);
        if (c->layers)
            for (int64_t l = 0; l < c->n_layers; l++) epmoe_layer_weights_free(&c->layers[l]);
        free(c->layers);
        free(c->x);
        free(c->y);
        free(c);
    }
    free(b);
}

static void cpu_get_counters(const epmoe_backend *b, epmoe_backend_counters *out) {
    const cpu_backend *c = b->impl;
    epmoe_cpu_engine_counters k;
    epmoe_cpu_engine_get_counters(c->engine, &k);
    out->rows_sent = k.rows_sent;
    out->rows_received = k.rows_received;
    out->pairs_computed = k.pairs_computed;
    out->pairs_combined = k.rows_combined;
    out->saturated_elements = k.saturated_elements;
}

static epmoe_status cpu_forward(epmoe_backend *b, const epmoe_backend_batch *in) {
    cpu_backend *c = b->impl;
    const int64_t H = c->cfg.hidden_size, E = c->cfg.n_routed_experts;
    epmoe_status st = epmoe_rows_to_f32(in->x, in->dtype, in->T, H, in->first_row, c->x);
    EPMOE_TRY(c->transport->ops->agree(c->transport, st, "read its rows"));
    for (int64_t l = in->layer_begin; l < in->layer_end; l++) {
        int64_t *counts = in->expert_counts ? in->expert_counts + (l - in->layer_begin) * E : NULL;
        EPMOE_TRY(epmoe_cpu_engine_layer_forward(c->engine, l - b->layer_begin, c->x,
                                                 in->token_ids, in->T, c->y, in->times, counts));
        float *next = c->y; /* this layer's output is the next layer's input */
        c->y = c->x;
        c->x = next;
    }
    st = epmoe_rows_from_f32(c->x, in->T, H, in->first_row, in->dtype, in->out);
    return c->transport->ops->agree(c->transport, st, "write its outputs");
}

static const epmoe_backend_ops cpu_ops = {
    .forward = cpu_forward,
    .get_counters = cpu_get_counters,
    .destroy = cpu_destroy,
};

static epmoe_status keep_layer(void *ctx, int64_t layer, epmoe_layer_weights *w) {
    cpu_backend *c = ctx;
    (void)layer; /* layers arrive in order: layer_begin, layer_begin + 1, ... */
    c->layers[c->n_layers++] = *w;
    return epmoe_layer_weights_prepare_cpu(&c->layers[c->n_layers - 1]);
}

static epmoe_status create_local(epmoe_backend *b, cpu_backend *c, const epmoe_st_set *ckpt,
                                 FILE *log) {
    const int64_t n = b->layer_end - b->layer_begin, T = c->cfg.max_tokens_per_rank;
    int n_ranks = 1;
    MPI_Comm_size(c->comm, &n_ranks);
    epmoe_expert_slice slice;
    EPMOE_TRY(epmoe_slice_of_rank(c->cfg.n_routed_experts, n_ranks, c->rank, &slice));
    c->layers = calloc((size_t)n, sizeof *c->layers);
    c->x = malloc((size_t)(T * c->cfg.hidden_size) * sizeof(float));
    c->y = malloc((size_t)(T * c->cfg.hidden_size) * sizeof(float));
    EPMOE_REQUIRE(c->layers && c->x && c->y, EPMOE_ERR_OOM,
                  "cpu backend: out of memory for max_tokens_per_rank=%lld rows", (long long)T);
    EPMOE_TRY(epmoe_load_layers(ckpt, &c->cfg, &slice, b->layer_begin, b->layer_end, c->rank,
                                log, keep_layer, c));
    /* Keep the experts dequantized when every layer fits the budget (results are identical). */
    int64_t cache_bytes = 0, weight_bytes = 0;
    for (int64_t l = 0; l < n; l++) {
        cache_bytes += epmoe_layer_weights_cache_bytes(&c->layers[l]);
        weight_bytes += epmoe_layer_weights_bytes(&c->layers[l]);
    }
    if (cache_bytes <= c->cfg.cpu_weight_cache_mib * (int64_t)(1 << 20)) {
        for (int64_t l = 0; l < n; l++)
            EPMOE_TRY(epmoe_layer_weights_cache_experts_cpu(&c->layers[l]));
        weight_bytes += cache_bytes;
    }
    EPMOE_TRY(epmoe_cpu_engine_create(&c->cfg, c->transport, c->layers, n, &c->engine));
    b->info.weight_bytes = weight_bytes;
    b->info.buffer_bytes = epmoe_cpu_engine_buffer_bytes(c->engine) + 2 * T * c->cfg.hidden_size * 4;
    return EPMOE_OK;
}

epmoe_status epmoe_backend_cpu_create(const epmoe_config *cfg, MPI_Comm comm,
                                      const epmoe_st_set *ckpt, int64_t layer_begin,
                                      int64_t layer_end, FILE *log, epmoe_backend **out) {
    *out = NULL;
    epmoe_backend *b = calloc(1, sizeof *b);
    cpu_backend *c = calloc(1, sizeof *c);
    if (!b || !c) {
        free(b);
        free(c);
        EPMOE_FAIL(EPMOE_ERR_OOM, "cpu backend: out of memory");
    }
    b->ops = &cpu_ops;
    b->impl = c;
    b->layer_begin = layer_begin;
    b->layer_end = layer_end;
    snprintf(b->info.name, sizeof b->info.name, "cpu");
    snprintf(b->info.device_name, sizeof b->info.device_name, "host");
    snprintf(b->info.transport, sizeof b->info.transport, "mpi");
    b->info.device = -1;
    c->cfg = *cfg;
    c->comm = comm;
    MPI_Comm_rank(comm, &c->rank);
    epmoe_status st = epmoe_transport_mpi_create(comm, cfg->collective_timeout_s, &c->transport);
    if (st == EPMOE_OK) st = create_local(b, c, ckpt, log);
    st = epmoe_agree(comm, st, "load its weights", cfg->collective_timeout_s);
    if (st != EPMOE_OK) {
        cpu_destroy(b);
        return st;
    }
    *out = b;
    return EPMOE_OK;
}
