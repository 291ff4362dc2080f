/* The expert-parallel GPU layer (coordinator/engine/gpu_engine.h): gpu_layer's route, expert and
 * shared-expert kernels around the dispatch kernels (kernels/cuda/dispatch.h) and a device
 * transport (coordinator/transport/device.h). */
#include "coordinator/engine/gpu_engine.h"

#include <stdlib.h>
#include <string.h>

#include "common/layout.h"
#include "coordinator/transport/device.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/dispatch.h"
#include "kernels/cuda/grouped_gemm.h"
#include "kernels/cuda/ops_cuda.h"
#include "worker/cuda/gpu_layer.h"

#define ENGINE_ALIGN 256

struct epmoe_gpu_engine {
    epmoe_config cfg;
    epmoe_transport *transport;
    cudaStream_t stream;
    int P, rank, device;
    int64_t H, k, max_tokens, decode_tokens;
    int64_t expert_start, n_local;
    int64_t k_local;         /* min(k, n_local): pairs one received row can hold here */
    int64_t *h_rank_start;   /* [P+1] slices of every rank */
    epmoe_dispatch_record rec; /* the wire format of a dispatched row */
    epmoe_gpu_context *ctx;  /* route + shared for max_tokens; worker rows for the worst case */
    epmoe_gpu_layer *layers;
    int64_t n_layers;

    /* capacities (rows of the buffers below) */
    int64_t send_rows_cap, recv_rows_cap, ret_send_cap, ret_recv_cap;

    /* device, one cudaMalloc */
    void *base;
    size_t bytes;
    int64_t *rank_start;                        /* [P+1] */
    int32_t *owner_of_pair, *ret_index_of_pair; /* [max_tokens * k] */
    int32_t *row_rank, *pair_rank;              /* [max_tokens * P] */
    int64_t *send_counts, *recv_counts;         /* [2P] rows, pairs per peer */
    int64_t *send_row_base, *ret_recv_base, *recv_row_base, *ret_send_base;          /* [P] */
    int64_t *fixed_send_row_base, *fixed_ret_recv_base, *fixed_recv_row_base,
        *fixed_ret_send_base;                   /* [P] decode-mode constants */
    uint8_t *q_codes, *q_sf;                    /* [max_tokens, H/2], [max_tokens, H/16] */
    float *q_inv_gs;                            /* [max_tokens]: the NVFP4 wire's source */
    uint8_t *send_records;                      /* [send_rows_cap, rec.bytes] */
    uint8_t *recv_records;                      /* [recv_rows_cap, rec.bytes] */
    int32_t *ids_recv;                          /* [recv_rows_cap, k] */
    int32_t *peer_of_row;                       /* [recv_rows_cap] */
    int64_t *ret_row_offset;                    /* [recv_rows_cap] */
    int32_t *pair_rank_recv, *row_of_pair_recv; /* [recv_rows_cap * k] */
    int32_t *ret_row_of_padded;                 /* [the arena's cap_rows]: W2's output rows */
    float *ret_send;                            /* [ret_send_cap, H] */
    float *ret_recv;                            /* [ret_recv_cap, H] */
    uint32_t *dispatch_flags;

    /* host */
    int64_t *h_counts; /* pinned [4P]: send counts then recv counts */
    int64_t *h_ones, *h_iota; /* [P]: the counts exchange moves one 16-byte element per peer */
    int64_t *h_send_counts, *h_send_displs, *h_recv_counts, *h_recv_displs;   /* [P] scratch */
    int64_t *h_ret_send_counts, *h_ret_send_displs, *h_ret_recv_counts, *h_ret_recv_displs;
    /* decode constants [P] */
    int64_t *h_dec_rows, *h_dec_row_displs, *h_dec_ret_send_counts, *h_dec_ret_send_displs,
        *h_dec_ret_recv_counts, *h_dec_ret_recv_displs;

    epmoe_gpu_engine_counters counters;
    cudaEvent_t *stage_events; /* [EPMOE_GPU_STAGE_EVENTS] or NULL */
};

/* ---- creation -------------------------------------------------------------------------------- */

typedef struct {
    void **slot;
    size_t bytes;
} carve_item;

static size_t carve(carve_item *items, int n, void *base) {
    size_t offset = 0;
    for (int i = 0; i < n; i++) {
        if (base) *items[i].slot = items[i].bytes ? (char *)base + offset : NULL;
        offset += (size_t)epmoe_round_up((int64_t)items[i].bytes, ENGINE_ALIGN);
    }
    return offset;
}

static int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
static int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

static epmoe_status create_local(epmoe_gpu_engine *e, const epmoe_config *cfg,
                                 const epmoe_layer_weights *layers, FILE *log) {
    const int P = e->P;
    const int64_t H = e->H, k = e->k, T = e->max_tokens, C = e->decode_tokens;
    EPMOE_REQUIRE(cfg->n_routed_experts >= P, EPMOE_ERR_INVALID_ARG,
                  "gpu engine: %d ranks for %lld experts: every rank needs an expert", P,
                  (long long)cfg->n_routed_experts);
    EPMOE_REQUIRE(C >= 0 && C <= T, EPMOE_ERR_INVALID_ARG,
                  "gpu engine: decode_tokens = %lld outside [0, max_tokens_per_rank = %lld]",
                  (long long)C, (long long)T);
    e->h_rank_start = (int64_t *)malloc((size_t)(P + 1) * 8);
    int64_t *h = (int64_t *)calloc(14 * (size_t)P, 8);
    EPMOE_REQUIRE(e->h_rank_start && h, EPMOE_ERR_OOM, "gpu engine: out of host memory");
    e->h_ones = h, e->h_iota = h + P, e->h_send_counts = h + 2 * P, e->h_send_displs = h + 3 * P;
    e->h_recv_counts = h + 4 * P, e->h_recv_displs = h + 5 * P, e->h_ret_send_counts = h + 6 * P;
    e->h_ret_send_displs = h + 7 * P, e->h_ret_recv_counts = h + 8 * P;
    e->h_ret_recv_displs = h + 9 * P, e->h_dec_rows = h + 10 * P, e->h_dec_row_displs = h + 11 * P;
    e->h_dec_ret_send_counts = h + 12 * P, e->h_dec_ret_send_displs = h + 13 * P;
    e->h_dec_ret_recv_counts = (int64_t *)calloc(2 * (size_t)P, 8);
    EPMOE_REQUIRE(e->h_dec_ret_recv_counts, EPMOE_ERR_OOM, "gpu engine: out of host memory");
    e->h_dec_ret_recv_displs = e->h_dec_ret_recv_counts + P;

    /* Slices of every rank: sizes of the decode return blocks depend on the receiver's slice. */
    int64_t dec_ret_recv_total = 0;
    for (int p = 0; p < P; p++) {
        epmoe_expert_slice s;
        EPMOE_TRY(epmoe_slice_of_rank(cfg->n_routed_experts, P, p, &s));
        e->h_rank_start[p] = s.start;
        e->h_rank_start[p + 1] = s.end;
        const int64_t k_of_p = min64(k, s.end - s.start);
        if (p == e->rank) e->expert_start = s.start, e->n_local = s.end - s.start;
        e->h_ones[p] = 1, e->h_iota[p] = p;
        e->h_dec_ret_recv_counts[p] = C * k_of_p;
        e->h_dec_ret_recv_displs[p] = dec_ret_recv_total;
        dec_ret_recv_total += C * k_of_p;
    }
    e->k_local = min64(k, e->n_local);
    /* Rows travel quantized when the worker would quantize them per row anyway (no change to
     * its input bits); with static (per-expert) scales or W4A16 the worker needs the fp32 row. */
    const int wire_nvfp4 =
        cfg->act_quant == EPMOE_ACT_NVFP4 && cfg->act_scale == EPMOE_ACT_SCALE_PER_ROW;
    EPMOE_TRY(epmoe_dispatch_record_layout(wire_nvfp4 ? EPMOE_WIRE_NVFP4 : EPMOE_WIRE_F32, H, k,
                                           &e->rec));
    for (int p = 0; p < P; p++) {
        e->h_dec_rows[p] = C;
        e->h_dec_row_displs[p] = (int64_t)p * C;
        e->h_dec_ret_send_counts[p] = C * e->k_local;
        e->h_dec_ret_send_displs[p] = (int64_t)p * C * e->k_local;
    }

    /* Worst cases (dropless, common/layout.h); decode mode also sends and receives whole blocks
     * of its capacity C per peer */
    const epmoe_dispatch_capacity cap = epmoe_dispatch_capacity_of(T, k, P, e->n_local);
    e->send_rows_cap = max64(cap.send_rows, (int64_t)P * C);
    e->recv_rows_cap = cap.recv_rows;
    e->ret_send_cap = cap.pairs;
    e->ret_recv_cap = max64(cap.return_rows, dec_ret_recv_total);

    /* The arena's expert rows: the worst case received, and at least T*k (its own checks of
     * the local route and shared-expert stages ask for that); no y, since the W2 GEMM writes
     * the return buffer. */
    EPMOE_TRY(epmoe_gpu_context_create(cfg, e->device, e->expert_start, e->n_local,
                                       max64(e->ret_send_cap, T * k), 0, log, &e->ctx));
    e->layers = (epmoe_gpu_layer *)calloc((size_t)e->n_layers, sizeof *e->layers);
    EPMOE_REQUIRE(e->layers, EPMOE_ERR_OOM, "gpu engine: out of host memory");
    if (layers)
        for (int64_t l = 0; l < e->n_layers; l++)
            EPMOE_TRY(epmoe_gpu_layer_upload(e->ctx, &layers[l], &e->layers[l]));

    const size_t Pz = (size_t)P, Tk = (size_t)(T * k), TP = (size_t)T * Pz;
    const size_t R = (size_t)e->recv_rows_cap, S = (size_t)e->send_rows_cap;
    const size_t Q = e->rec.format == EPMOE_WIRE_NVFP4 ? (size_t)T : 0; /* quantized tokens */
    carve_item items[] = {
        {(void **)&e->rank_start, (Pz + 1) * 8},
        {(void **)&e->owner_of_pair, Tk * 4},
        {(void **)&e->ret_index_of_pair, Tk * 4},
        {(void **)&e->row_rank, TP * 4},
        {(void **)&e->pair_rank, TP * 4},
        {(void **)&e->send_counts, 2 * Pz * 8},
        {(void **)&e->recv_counts, 2 * Pz * 8},
        {(void **)&e->send_row_base, Pz * 8},
        {(void **)&e->ret_recv_base, Pz * 8},
        {(void **)&e->recv_row_base, Pz * 8},
        {(void **)&e->ret_send_base, Pz * 8},
        {(void **)&e->fixed_send_row_base, Pz * 8},
        {(void **)&e->fixed_ret_recv_base, Pz * 8},
        {(void **)&e->fixed_recv_row_base, Pz * 8},
        {(void **)&e->fixed_ret_send_base, Pz * 8},
        {(void **)&e->q_codes, Q * (size_t)H / 2},
        {(void **)&e->q_sf, Q * (size_t)H / 16},
        {(void **)&e->q_inv_gs, Q * 4},
        /* one rank: what it sends is what it receives, so the two sides share one buffer and
         * no exchange copies the rows (alltoallv_rows) */
        {(void **)&e->send_records, (P == 1 ? max64(S, R) : S) * (size_t)e->rec.bytes},
        {(void **)&e->recv_records, P == 1 ? 0 : R * (size_t)e->rec.bytes},
        {(void **)&e->ids_recv, R * (size_t)k * 4},
        {(void **)&e->peer_of_row, R * 4},
        {(void **)&e->ret_row_offset, R * 8},
        {(void **)&e->pair_rank_recv, R * (size_t)k * 4},
        {(void **)&e->row_of_pair_recv, R * (size_t)k * 4},
        {(void **)&e->ret_row_of_padded, (size_t)e->ctx->arena.cap_rows * 4},
        {(void **)&e->ret_send,
         (size_t)(P == 1 ? max64(e->ret_send_cap, e->ret_recv_cap) : e->ret_send_cap) * H * 4},
        {(void **)&e->ret_recv, P == 1 ? 0 : (size_t)e->ret_recv_cap * (size_t)H * 4},
        {(void **)&e->dispatch_flags, 4},
    };
    const int n_items = (int)(sizeof items / sizeof items[0]);
    e->bytes = carve(items, n_items, NULL);
    cudaError_t err = cudaMalloc(&e->base, e->bytes);
    if (err != cudaSuccess) {
        e->base = NULL;
        EPMOE_FAIL(EPMOE_ERR_OOM,
                   "gpu engine: cudaMalloc of %zu bytes (%.1f MiB) of dispatch buffers failed: "
                   "%s; lower max_tokens_per_rank (%lld)",
                   e->bytes, e->bytes / 1048576.0, cudaGetErrorString(err), (long long)T);
    }
    carve(items, n_items, e->base);
    if (P == 1) e->recv_records = e->send_records, e->ret_recv = e->ret_send;
    CUDA_TRY(cudaMemset(e->base, 0, e->bytes), "clearing the dispatch buffers");
    CUDA_TRY(cudaMemcpy(e->rank_start, e->h_rank_start, (Pz + 1) * 8, cudaMemcpyHostToDevice),
             "uploading the expert slices");
    CUDA_TRY(cudaMemcpy(e->fixed_send_row_base, e->h_dec_row_displs, Pz * 8,
                        cudaMemcpyHostToDevice), "uploading decode bases");
    CUDA_TRY(cudaMemcpy(e->fixed_recv_row_base, e->h_dec_row_displs, Pz * 8,
                        cudaMemcpyHostToDevice), "uploading decode bases");
    CUDA_TRY(cudaMemcpy(e->fixed_ret_recv_base, e->h_dec_ret_recv_displs, Pz * 8,
                        cudaMemcpyHostToDevice), "uploading decode bases");
    CUDA_TRY(cudaMemcpy(e->fixed_ret_send_base, e->h_dec_ret_send_displs, Pz * 8,
                        cudaMemcpyHostToDevice), "uploading decode bases");
    CUDA_TRY(cudaMallocHost(&e->h_counts, 4 * Pz * 8), "pinned counts");
    if (log)
        fprintf(log,
                "gpu engine rank %d/%d (device %d, transport %s): experts [%lld, %lld), dispatch "
                "rows on the wire %s (%lld bytes a row), combine rows fp32 (%lld bytes), "
                "buffers %.1f MiB (send %lld rows, receive %lld rows, return %lld + %lld "
                "pairs), decode capacity %lld tokens per peer\n",
                e->rank, P, e->device, e->transport->ops->name, (long long)e->expert_start,
                (long long)(e->expert_start + e->n_local), epmoe_wire_format_name(e->rec.format),
                (long long)e->rec.bytes, (long long)(4 * H), e->bytes / 1048576.0,
                (long long)e->send_rows_cap, (long long)e->recv_rows_cap,
                (long long)e->ret_send_cap, (long long)e->ret_recv_cap, (long long)C);
    return EPMOE_OK;
}

epmoe_status epmoe_gpu_engine_create(const epmoe_config *cfg, epmoe_transport *transport,
                                     int device, const epmoe_layer_weights *layers,
                                     int64_t n_layers, int64_t decode_tokens, FILE *log,
                                     epmoe_gpu_engine **out) {
    *out = NULL;
    EPMOE_REQUIRE(epmoe_transport_is_device(transport), EPMOE_ERR_INVALID_ARG,
                  "gpu engine: transport '%s' does not move device buffers (use nccl or "
                  "mpi-staged)", transport->ops->name);
    EPMOE_TRY(epmoe_config_validate(cfg));
    epmoe_gpu_engine *e = (epmoe_gpu_engine *)calloc(1, sizeof *e);
    EPMOE_REQUIRE(e, EPMOE_ERR_OOM, "gpu engine: out of host memory");
    e->cfg = *cfg;
    e->transport = transport;
    e->stream = epmoe_device_transport_stream(transport);
    e->P = transport->n_ranks;
    e->rank = transport->rank;
    e->device = device;
    e->H = cfg->hidden_size;
    e->k = cfg->top_k;
    e->max_tokens = cfg->max_tokens_per_rank;
    e->decode_tokens = decode_tokens;
    e->n_layers = n_layers;
    epmoe_status st = create_local(e, cfg, layers, log);
    st = transport->ops->agree(transport, st, "create its gpu engine");
    if (st != EPMOE_OK) {
        epmoe_gpu_engine_destroy(e);
        return st;
    }
    *out = e;
    return EPMOE_OK;
}

void epmoe_gpu_engine_destroy(epmoe_gpu_engine *e) {
    if (!e) return;
    if (e->layers)
        for (int64_t l = 0; l < e->n_layers; l++) epmoe_gpu_layer_free(&e->layers[l]);
    free(e->layers);
    epmoe_gpu_context_free(e->ctx);
    if (e->base) cudaFree(e->base);
    if (e->h_counts) cudaFreeHost(e->h_counts);
    free(e->h_rank_start);
    free(e->h_ones);
    free(e->h_dec_ret_recv_counts);
    free(e);
}

int64_t epmoe_gpu_engine_device_bytes(const epmoe_gpu_engine *e) {
    return (int64_t)(e->bytes + e->ctx->arena.bytes);
}

/* ---- the worker side ------------------------------------------------------------------------ */

/* The expert MLPs on the received rows: gpu_layer's experts stage, fed from the records. */
static epmoe_status worker_experts(epmoe_gpu_engine *e, const epmoe_gpu_layer *layer,
                                   int64_t pairs_bound) {
    epmoe_gpu_rows rows;
    memset(&rows, 0, sizeof rows);
    rows.out = e->ret_send;
    rows.out_row = e->ret_row_of_padded;
    if (e->rec.format == EPMOE_WIRE_NVFP4) {
        rows.nvfp4 = e->recv_records;
        rows.nvfp4_stride = e->rec.bytes;
        rows.codes_offset = e->rec.codes_offset;
        rows.sf_offset = e->rec.sf_offset;
        rows.inv_gs_offset = e->rec.inv_gs_offset;
    } else {
        rows.x = (const float *)e->recv_records;
        rows.x_stride = e->rec.bytes / 4;
    }
    return epmoe_gpu_experts_rows(e->ctx, layer, &rows, pairs_bound, e->stream);
}

/* Received rows [0, recv_rows) -> validated ids -> padded layout -> experts, whose W2 GEMM
 * writes each pair's output row straight into its place in the return buffer. */
static epmoe_status worker(epmoe_gpu_engine *e, const epmoe_gpu_layer *layer, int64_t recv_rows,
                           const int64_t *recv_row_base, const int64_t *ret_send_base,
                           int64_t pairs_bound) {
    epmoe_gpu_arena *a = &e->ctx->arena;
    cudaStream_t s = e->stream;
    EPMOE_TRY(epmoe_cuda_dispatch_unpack(&e->rec, e->recv_records, recv_rows, e->P, recv_row_base,
                                         e->recv_counts, e->expert_start, e->n_local, e->ids_recv,
                                         e->peer_of_row, e->dispatch_flags, s));
    EPMOE_TRY(epmoe_cuda_dispatch_return_offsets(e->ids_recv, e->k, e->P, recv_row_base,
                                                 e->recv_counts, ret_send_base, e->ret_row_offset,
                                                 e->dispatch_flags, s));
    EPMOE_TRY(epmoe_cuda_plan_layout(e->ids_recv, recv_rows, e->k, e->expert_start, e->n_local,
                                     e->cfg.expert_pad_rows, e->pair_rank_recv,
                                     a->tokens_per_expert, a->padded_offsets,
                                     e->row_of_pair_recv, a->token_of_row, s));
    EPMOE_TRY(epmoe_cuda_dispatch_return_rows(e->ids_recv, e->row_of_pair_recv, e->peer_of_row,
                                              e->ret_row_offset, recv_rows, e->k,
                                              e->ret_row_of_padded, s));
    return worker_experts(e, layer, pairs_bound); /* W2 writes the return buffer */
}

/* ---- the forward ------------------------------------------------------------------------------ */

/* An exchange of rows; none when the two sides are one buffer (one rank). */
static epmoe_status alltoallv_rows(epmoe_gpu_engine *e, const void *send,
                                   const int64_t *send_counts, const int64_t *send_displs,
                                   void *recv, const int64_t *recv_counts,
                                   const int64_t *recv_displs, size_t row_bytes, const char *what) {
    if (send == recv) return EPMOE_OK;
    return epmoe_device_alltoallv_async(e->transport, send, send_counts, send_displs, recv,
                                        recv_counts, recv_displs, row_bytes, what);
}

static epmoe_status check_forward(const epmoe_gpu_engine *e, int64_t layer, int64_t T,
                                  int64_t T_max) {
    EPMOE_REQUIRE(layer >= 0 && layer < e->n_layers, EPMOE_ERR_INVALID_ARG,
                  "gpu engine: layer %lld outside [0, %lld)", (long long)layer,
                  (long long)e->n_layers);
    EPMOE_REQUIRE(T >= 0 && T <= T_max, EPMOE_ERR_INVALID_ARG,
                  "gpu engine: %lld tokens, this mode holds at most %lld per rank",
                  (long long)T, (long long)T_max);
    return EPMOE_OK;
}

/* Route, plan and pack with the given sender bases; shared expert on the way. */
/* Records stage boundary i when the caller asked for timing (throughput mode). */
static epmoe_status mark(epmoe_gpu_engine *e, int i) {
    if (e->stage_events) CUDA_TRY(cudaEventRecord(e->stage_events[i], e->stream), "stage event");
    return EPMOE_OK;
}

static epmoe_status coordinator_front(epmoe_gpu_engine *e, const epmoe_gpu_layer *L,
                                      const float *x, const int32_t *token_ids, int64_t T,
                                      int fixed) {
    epmoe_gpu_arena *a = &e->ctx->arena;
    cudaStream_t s = e->stream;
    if (!fixed) EPMOE_TRY(mark(e, 0));
    EPMOE_TRY(epmoe_gpu_route(e->ctx, L, x, token_ids, T, s));
    EPMOE_TRY(epmoe_cuda_dispatch_plan(a->ids, T, e->k, e->rank_start, e->P, e->owner_of_pair,
                                       e->row_rank, e->pair_rank, e->send_counts, s));
    const int64_t *send_row_base = fixed ? e->fixed_send_row_base : e->send_row_base;
    const int64_t *ret_recv_base = fixed ? e->fixed_ret_recv_base : e->ret_recv_base;
    if (!fixed)
        EPMOE_TRY(epmoe_cuda_dispatch_bases(e->send_counts, e->P, e->send_row_base,
                                            e->ret_recv_base, s));
    /* NVFP4 wire: each token quantized once, whatever the number of ranks it goes to. Its
     * saturated elements are counted here, once per token (the single-GPU layer counts them
     * once per (token, expert) pair). */
    if (e->rec.format == EPMOE_WIRE_NVFP4)
        EPMOE_TRY(epmoe_cuda_nvfp4_quantize_rows(x, e->H, T, e->H, e->H, NULL, NULL, NULL, 0, NULL,
                                                 e->q_codes, e->q_sf, e->q_inv_gs, a->saturated,
                                                 s));
    EPMOE_TRY(epmoe_cuda_dispatch_pack(&e->rec, x, e->q_codes, e->q_sf, e->q_inv_gs, a->ids, T,
                                       e->P, e->owner_of_pair, e->row_rank, e->pair_rank,
                                       send_row_base, ret_recv_base, e->send_records,
                                       e->ret_index_of_pair, s));
    if (!fixed) EPMOE_TRY(mark(e, 1));
    /* The shared expert needs only the local tokens: it runs while the counts travel. */
    EPMOE_TRY(epmoe_gpu_shared(e->ctx, L, x, T, s));
    if (!fixed) EPMOE_TRY(mark(e, 2));
    /* Counts: one (rows, pairs) element of 16 bytes per peer, device to device. */
    return epmoe_device_alltoallv_async(e->transport, e->send_counts, e->h_ones, e->h_iota,
                                        e->recv_counts, e->h_ones, e->h_iota, 16,
                                        "exchange of counts");
}

static epmoe_status combine(epmoe_gpu_engine *e, int64_t T, float *out) {
    epmoe_gpu_arena *a = &e->ctx->arena;
    /* the returned rows already hold their experts' down-projection biases (worker side) */
    return epmoe_cuda_combine(e->ret_recv, e->H, e->ret_index_of_pair, a->weights, T, e->k,
                              e->ctx->shared_inter ? a->shared_y : NULL, out, e->stream);
}

epmoe_status epmoe_gpu_engine_forward(epmoe_gpu_engine *e, int64_t layer, const float *x,
                                      const int32_t *token_ids, int64_t T, float *out) {
    EPMOE_TRY(check_forward(e, layer, T, e->max_tokens));
    const epmoe_gpu_layer *L = &e->layers[layer];
    const int P = e->P;
    cudaStream_t s = e->stream;
    EPMOE_TRY(coordinator_front(e, L, x, token_ids, T, 0));
    CUDA_TRY(cudaMemcpyAsync(e->h_counts, e->send_counts, 2 * (size_t)P * 8,
                             cudaMemcpyDeviceToHost, s), "copying the send counts");
    CUDA_TRY(cudaMemcpyAsync(e->h_counts + 2 * P, e->recv_counts, 2 * (size_t)P * 8,
                             cudaMemcpyDeviceToHost, s), "copying the receive counts");
    EPMOE_TRY(epmoe_device_transport_wait(e->transport, "exchange of counts"));

    /* Host sizes of every block; a count no sender could have produced is a broken peer. */
    int64_t rows_out = 0, rows_in = 0, pairs_out = 0, pairs_in = 0;
    for (int p = 0; p < P; p++) {
        const int64_t rows_to = e->h_counts[2 * p], pairs_to = e->h_counts[2 * p + 1];
        const int64_t rows_from = e->h_counts[2 * P + 2 * p];
        const int64_t pairs_from = e->h_counts[2 * P + 2 * p + 1];
        EPMOE_REQUIRE(rows_from >= 0 && rows_from <= e->max_tokens && pairs_from >= rows_from &&
                          pairs_from <= rows_from * e->k_local,
                      EPMOE_ERR_INTERNAL,
                      "rank %d: peer %d announced %lld rows and %lld pairs, impossible for at "
                      "most %lld tokens and %lld experts of this rank per row",
                      e->rank, p, (long long)rows_from, (long long)pairs_from,
                      (long long)e->max_tokens, (long long)e->k_local);
        e->h_send_counts[p] = rows_to, e->h_send_displs[p] = rows_out;
        e->h_recv_counts[p] = rows_from, e->h_recv_displs[p] = rows_in;
        e->h_ret_send_counts[p] = pairs_from, e->h_ret_send_displs[p] = pairs_in;
        e->h_ret_recv_counts[p] = pairs_to, e->h_ret_recv_displs[p] = pairs_out;
        rows_out += rows_to, rows_in += rows_from, pairs_out += pairs_to, pairs_in += pairs_from;
    }
    EPMOE_REQUIRE(rows_out <= e->send_rows_cap && pairs_out <= T * e->k, EPMOE_ERR_INTERNAL,
                  "rank %d: plan of %lld rows / %lld pairs for %lld tokens", e->rank,
                  (long long)rows_out, (long long)pairs_out, (long long)T);

    EPMOE_TRY(epmoe_cuda_dispatch_bases(e->recv_counts, P, e->recv_row_base, e->ret_send_base, s));
    EPMOE_TRY(alltoallv_rows(e, e->send_records, e->h_send_counts,
                             e->h_send_displs, e->recv_records, e->h_recv_counts,
                             e->h_recv_displs, (size_t)e->rec.bytes,
                             "dispatch (rows)"));
    EPMOE_TRY(mark(e, 3));
    EPMOE_TRY(worker(e, L, rows_in, e->recv_row_base, e->ret_send_base, pairs_in));
    EPMOE_TRY(mark(e, 4));
    EPMOE_TRY(alltoallv_rows(e, e->ret_send, e->h_ret_send_counts,
                             e->h_ret_send_displs, e->ret_recv,
                             e->h_ret_recv_counts, e->h_ret_recv_displs,
                             (size_t)e->H * 4, "return (expert outputs)"));
    EPMOE_TRY(combine(e, T, out));
    EPMOE_TRY(mark(e, 5));
    e->counters.rows_sent += rows_out;
    e->counters.rows_received += rows_in;
    e->counters.pairs_computed += pairs_in;
    e->counters.pairs_combined += pairs_out;
    return EPMOE_OK;
}

epmoe_status epmoe_gpu_engine_forward_decode(epmoe_gpu_engine *e, int64_t layer, const float *x,
                                             const int32_t *token_ids, int64_t T, float *out) {
    EPMOE_REQUIRE(e->decode_tokens > 0, EPMOE_ERR_INVALID_ARG,
                  "gpu engine: decode mode needs decode_tokens > 0 at creation");
    EPMOE_TRY(check_forward(e, layer, T, e->decode_tokens));
    const epmoe_gpu_layer *L = &e->layers[layer];
    const int64_t C = e->decode_tokens;
    EPMOE_TRY(coordinator_front(e, L, x, token_ids, T, 1));
    EPMOE_TRY(alltoallv_rows(e, e->send_records, e->h_dec_rows,
                             e->h_dec_row_displs, e->recv_records, e->h_dec_rows,
                             e->h_dec_row_displs, (size_t)e->rec.bytes,
                             "decode dispatch (rows)"));
    /* Every peer block is C rows; the real ones are told by recv_counts on the device. */
    EPMOE_TRY(worker(e, L, (int64_t)e->P * C, e->fixed_recv_row_base, e->fixed_ret_send_base,
                     (int64_t)e->P * C * e->k_local));
    EPMOE_TRY(alltoallv_rows(e, e->ret_send, e->h_dec_ret_send_counts,
                             e->h_dec_ret_send_displs, e->ret_recv,
                             e->h_dec_ret_recv_counts, e->h_dec_ret_recv_displs,
                             (size_t)e->H * 4, "decode return (expert outputs)"));
    return combine(e, T, out);
}

epmoe_status epmoe_gpu_engine_sync(epmoe_gpu_engine *e, unsigned long long *saturated) {
    EPMOE_TRY(epmoe_device_transport_wait(e->transport, "layer forward"));
    uint32_t flags = 0;
    CUDA_TRY(cudaMemcpy(&flags, e->dispatch_flags, 4, cudaMemcpyDeviceToHost),
             "reading the dispatch flags");
    CUDA_TRY(cudaMemset(e->dispatch_flags, 0, 4), "clearing the dispatch flags");
    EPMOE_TRY(epmoe_gpu_read_flags(e->ctx, e->stream, saturated));
    EPMOE_REQUIRE(flags == 0, EPMOE_ERR_RANGE,
                  "rank %d: dispatch flags 0x%x:%s%s%s", e->rank, flags,
                  flags & EPMOE_CUDA_FLAG_DISPATCH_ID
                      ? " a received row named an expert outside this rank's slice;" : "",
                  flags & EPMOE_CUDA_FLAG_DISPATCH_COUNT
                      ? " received pairs differ from the sender's count;" : "",
                  flags & EPMOE_CUDA_FLAG_DISPATCH_EMPTY
                      ? " a received row carried no expert of this rank;" : "");
    return EPMOE_OK;
}

void epmoe_gpu_engine_get_counters(const epmoe_gpu_engine *e, epmoe_gpu_engine_counters *c) {
    *c = e->counters;
}

const int32_t *epmoe_gpu_engine_ids(const epmoe_gpu_engine *e) { return e->ctx->arena.ids; }

epmoe_status epmoe_gpu_engine_set_layer(epmoe_gpu_engine *e, int64_t index,
                                        const epmoe_layer_weights *w) {
    EPMOE_REQUIRE(index >= 0 && index < e->n_layers, EPMOE_ERR_INVALID_ARG,
                  "gpu engine: layer index %lld outside [0, %lld)", (long long)index,
                  (long long)e->n_layers);
    epmoe_gpu_layer_free(&e->layers[index]);
    return epmoe_gpu_layer_upload(e->ctx, w, &e->layers[index]);
}

void epmoe_gpu_engine_fp8_tensors(const epmoe_gpu_engine *e, int64_t *with_fp8, int64_t *tensors,
                                  int64_t *inexact_groups) {
    *with_fp8 = *tensors = *inexact_groups = 0;
    for (int64_t l = 0; l < e->n_layers; l++) {
        const epmoe_gpu_layer *g = &e->layers[l];
        if (!g->base) continue; /* not loaded on this rank */
        *tensors += 2;
        *with_fp8 += (g->w13_fp8 != NULL) + (g->w2_fp8 != NULL);
        *inexact_groups += g->fp8_inexact_groups;
    }
}

int64_t epmoe_gpu_engine_layer_bytes(const epmoe_gpu_engine *e, const epmoe_layer_weights *w) {
    return epmoe_gpu_layer_bytes(e->ctx, w);
}

int64_t epmoe_gpu_engine_staging_bytes(const epmoe_gpu_engine *e) {
    return epmoe_gpu_layer_staging_bytes(e->ctx);
}

void epmoe_gpu_engine_set_stage_events(epmoe_gpu_engine *e, cudaEvent_t *events) {
    e->stage_events = events;
}

epmoe_status epmoe_gpu_engine_poison(epmoe_gpu_engine *e) {
    epmoe_gpu_arena *a = &e->ctx->arena;
    const epmoe_config *c = &e->cfg;
    const size_t cap = (size_t)a->cap_rows, H = (size_t)e->H, I = (size_t)c->moe_inter_size;
    const epmoe_gpu_context *x = e->ctx;
    const size_t K_max = (size_t)(x->hidden_pad > x->inter_pad ? x->hidden_pad : x->inter_pad);
    struct {
        void *p;
        size_t bytes;
    } bufs[] = {
        /* records: 0xff bytes are NaN as fp32 rows and as the NVFP4 rows' 1/gs */
        {e->send_records, (size_t)e->send_rows_cap * (size_t)e->rec.bytes},
        {e->recv_records, (size_t)e->recv_rows_cap * (size_t)e->rec.bytes},
        {e->q_inv_gs, e->q_inv_gs ? (size_t)e->max_tokens * 4 : 0},
        {e->ret_send, (size_t)e->ret_send_cap * H * 4}, {e->ret_recv, (size_t)e->ret_recv_cap * H * 4},
        {a->h, cap * 2 * I * 4}, {a->y, cap * H * 4},
        {a->a_scale, a->a_scale ? cap * 4 : 0}, {a->weights, (size_t)(a->max_tokens * e->k) * 4},
        /* GEMM inputs: 0xff bytes are NVFP4 codes of -6 with a huge block scale, E4M3 and
         * UE8M0 NaNs, 0xffff a bf16 NaN, so K padding left unwritten would reach the outputs */
        {a->a_codes, a->a_codes_bytes}, {a->a_sf, a->a_sf_bytes},
        {a->a_bf16, a->a_bf16 ? cap * K_max * 2 : 0},
    };
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
        if (bufs[i].p && bufs[i].bytes)
            CUDA_TRY(cudaMemsetAsync(bufs[i].p, 0xff, bufs[i].bytes, e->stream), "poisoning");
    return EPMOE_OK;
}
