/* The cuda backend: coordinator/engine/gpu_engine.h, one rank per GPU.
 *
 * Device = this rank's index among the ranks of its node, modulo the node's GPUs; NCCL between
 * the GPUs, bootstrapped from MPI (mpi-staged when ranks share a GPU). Weights are uploaded one
 * layer at a time as they are read, after a check that they fit.
 *
 * A forward moves the shard to the device once in its own dtype, converts it there (refusing
 * NaN/Inf), runs every requested layer back to back on the device, converts the result back
 * to the dtype (refusing values it cannot hold) and copies it out once. Two modes, same kernels,
 * same bits (coordinator/engine/gpu_engine.h):
 *  - throughput: every block sized by the real counts; one host wait per layer for them.
 *  - decode: when every rank's shard is at most decode_tokens rows and the transport can be
 *    captured, the whole forward (conversions, every layer with both all-to-alls, the expert
 *    histogram) is one CUDA graph, captured at the first forward of that shape and replayed.
 */
#include <stdlib.h>
#include <string.h>

#include "coordinator/engine/backend.h"
#include "coordinator/engine/gpu_engine.h"
#include "coordinator/engine/load.h"
#include "coordinator/transport/agree.h"
#include "coordinator/transport/device.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/ops_cuda.h"

#define MAX_GRAPHS 64

typedef struct {
    int64_t T, begin, end, dtype, has_ids, want_counts; /* the shape a graph was captured for */
    cudaGraphExec_t exec;
    uint64_t last_used;
} decode_graph;

typedef struct {
    epmoe_config cfg;
    MPI_Comm comm;
    int rank, n_ranks, device;
    cudaStream_t stream;
    epmoe_transport *transport;
    epmoe_gpu_engine *engine;
    int64_t H, E, k, max_tokens, decode_tokens, n_layers;
    /* device */
    void *d_raw;                  /* [max_tokens, H] rows in the caller's dtype, in and out */
    float *d_x, *d_y;             /* [max_tokens, H] fp32: ping-pong across layers */
    int32_t *d_ids;               /* [max_tokens] */
    unsigned long long *d_counts; /* [n_layers, E] */
    unsigned long long *d_bad;    /* [2] first bad input element, first bad output element */
    /* pinned host */
    void *h_rows;                 /* [decode_tokens, H] staging of decode forwards */
    int32_t *h_ids;               /* [decode_tokens] */
    unsigned long long *h_bad;    /* [2] */
    unsigned long long *h_counts; /* [n_layers, E] */
    cudaEvent_t *events;          /* [n_layers][EPMOE_GPU_STAGE_EVENTS] */
    cudaEvent_t graph_start, graph_end;
    decode_graph graphs[MAX_GRAPHS];
    uint64_t uses;
    epmoe_gpu_engine_counters last_counters;
} cuda_backend;

int epmoe_backend_cuda_devices(void) {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        cudaGetLastError(); /* no driver or no device: not an error for auto */
        return 0;
    }
    return n;
}

static void cuda_destroy(epmoe_backend *b) {
    if (!b) return;
    cuda_backend *c = (cuda_backend *)b->impl;
    if (c) {
        if (c->device >= 0) cudaSetDevice(c->device);
        for (int i = 0; i < MAX_GRAPHS; i++)
            if (c->graphs[i].exec) cudaGraphExecDestroy(c->graphs[i].exec);
        epmoe_gpu_engine_destroy(c->engine);
        if (c->transport) c->transport->ops->destroy(c->transport);
        if (c->events)
            for (int64_t i = 0; i < c->n_layers * EPMOE_GPU_STAGE_EVENTS; i++)
                if (c->events[i]) cudaEventDestroy(c->events[i]);
        free(c->events);
        if (c->graph_start) cudaEventDestroy(c->graph_start);
        if (c->graph_end) cudaEventDestroy(c->graph_end);
        void *dev[] = {c->d_raw, c->d_x, c->d_y, c->d_ids, c->d_counts, c->d_bad};
        for (size_t i = 0; i < sizeof dev / sizeof dev[0]; i++)
            if (dev[i]) cudaFree(dev[i]);
        void *host[] = {c->h_rows, c->h_ids, c->h_bad, c->h_counts};
        for (size_t i = 0; i < sizeof host / sizeof host[0]; i++)
            if (host[i]) cudaFreeHost(host[i]);
        if (c->stream) cudaStreamDestroy(c->stream);
        free(c);
    }
    free(b);
}

static void cuda_get_counters(const epmoe_backend *b, epmoe_backend_counters *out) {
    const cuda_backend *c = (const cuda_backend *)b->impl;
    epmoe_gpu_engine_counters k;
    epmoe_gpu_engine_get_counters(c->engine, &k);
    memset(out, 0, sizeof *out);
    out->rows_sent = k.rows_sent;
    out->rows_received = k.rows_received;
    out->pairs_computed = k.pairs_computed;
    out->pairs_combined = k.pairs_combined;
}

/* ---- the forward ------------------------------------------------------------------------- */

/* Everything on the device between the rows arriving in d_raw and leaving it: capturable when
 * decode is set (no host wait, fixed sizes). */
static epmoe_status device_forward(cuda_backend *c, epmoe_backend *b, epmoe_dtype dtype,
                                   int has_ids, int64_t T, int64_t begin, int64_t end,
                                   int want_counts, int decode, int timed) {
    const size_t n = (size_t)(T * c->H);
    CUDA_TRY(cudaMemsetAsync(c->d_bad, 0xff, 2 * sizeof *c->d_bad, c->stream), "clearing flags");
    EPMOE_TRY(epmoe_cuda_rows_to_f32(c->d_raw, dtype, n, c->d_x, &c->d_bad[0], c->stream));
    if (want_counts)
        CUDA_TRY(cudaMemsetAsync(c->d_counts, 0, (size_t)((end - begin) * c->E) * 8, c->stream),
                 "clearing the expert counts");
    for (int64_t l = begin; l < end; l++) {
        const int64_t index = l - b->layer_begin;
        const int32_t *ids = has_ids ? c->d_ids : NULL;
        if (decode) {
            EPMOE_TRY(epmoe_gpu_engine_forward_decode(c->engine, index, c->d_x, ids, T, c->d_y));
        } else {
            epmoe_gpu_engine_set_stage_events(
                c->engine, timed ? c->events + (l - begin) * EPMOE_GPU_STAGE_EVENTS : NULL);
            EPMOE_TRY(epmoe_gpu_engine_forward(c->engine, index, c->d_x, ids, T, c->d_y));
        }
        if (want_counts)
            EPMOE_TRY(epmoe_cuda_expert_histogram(epmoe_gpu_engine_ids(c->engine), T * c->k, c->E,
                                                  c->d_counts + (l - begin) * c->E, c->stream));
        float *next = c->d_y; /* this layer's output is the next layer's input */
        c->d_y = c->d_x;
        c->d_x = next;
    }
    return epmoe_cuda_rows_from_f32(c->d_x, n, dtype, c->d_raw, &c->d_bad[1], c->stream);
}

static decode_graph *find_graph(cuda_backend *c, const int64_t key[6]) {
    for (int i = 0; i < MAX_GRAPHS; i++) {
        decode_graph *g = &c->graphs[i];
        if (g->exec && g->T == key[0] && g->begin == key[1] && g->end == key[2] &&
            g->dtype == key[3] && g->has_ids == key[4] && g->want_counts == key[5])
            return g;
    }
    return NULL;
}

/* Captures the decode forward of this shape (the first time) into the least recently used
 * slot. The capture runs no work; every rank captures its own graph for its own T. */
static epmoe_status capture_graph(cuda_backend *c, epmoe_backend *b, const int64_t key[6],
                                  decode_graph **out) {
    decode_graph *slot = &c->graphs[0];
    for (int i = 0; i < MAX_GRAPHS; i++) {
        if (!c->graphs[i].exec) {
            slot = &c->graphs[i];
            break;
        }
        if (c->graphs[i].last_used < slot->last_used) slot = &c->graphs[i];
    }
    if (slot->exec) cudaGraphExecDestroy(slot->exec);
    memset(slot, 0, sizeof *slot);
    CUDA_TRY(cudaStreamBeginCapture(c->stream, cudaStreamCaptureModeThreadLocal),
             "capturing the decode forward");
    epmoe_status st = device_forward(c, b, (epmoe_dtype)key[3], (int)key[4], key[0], key[1],
                                     key[2], (int)key[5], 1, 0);
    cudaGraph_t graph = NULL;
    const cudaError_t end_err = cudaStreamEndCapture(c->stream, &graph);
    if (st == EPMOE_OK && end_err != cudaSuccess)
        st = epmoe_set_error(EPMOE_ERR_CUDA, __FILE__, __LINE__,
                             "capturing the decode forward failed: %s",
                             cudaGetErrorString(end_err));
    if (st == EPMOE_OK && cudaGraphInstantiate(&slot->exec, graph, 0) != cudaSuccess) {
        slot->exec = NULL;
        st = epmoe_set_error(EPMOE_ERR_CUDA, __FILE__, __LINE__,
                             "instantiating the decode graph failed");
    }
    if (graph) cudaGraphDestroy(graph);
    EPMOE_TRY(st);
    slot->T = key[0], slot->begin = key[1], slot->end = key[2];
    slot->dtype = key[3], slot->has_ids = key[4], slot->want_counts = key[5];
    *out = slot;
    return EPMOE_OK;
}

static double elapsed_s(cudaEvent_t a, cudaEvent_t b) {
    float ms = 0;
    return cudaEventElapsedTime(&ms, a, b) == cudaSuccess ? 1e-3 * ms : 0.0;
}

/* After the stream is done: the stage times from the events of every layer. */
static void read_times(cuda_backend *c, int64_t n_layers, int decode, epmoe_stage_times *t) {
    if (decode) {
        const double total = elapsed_s(c->graph_start, c->graph_end);
        t->total += total;
        return;
    }
    for (int64_t l = 0; l < n_layers; l++) {
        cudaEvent_t *ev = c->events + l * EPMOE_GPU_STAGE_EVENTS;
        t->route += elapsed_s(ev[0], ev[1]);
        t->shared += elapsed_s(ev[1], ev[2]);
        t->dispatch += elapsed_s(ev[2], ev[3]);
        t->experts += elapsed_s(ev[3], ev[4]);
        t->combine += elapsed_s(ev[4], ev[5]);
        t->total += elapsed_s(ev[0], ev[5]);
    }
}

/* The first bad element of the input (stage 0) or output (1) as a message naming the row. */
static epmoe_status bad_element(cuda_backend *c, const epmoe_backend_batch *in, int stage,
                                unsigned long long index) {
    const int64_t row = in->first_row + (int64_t)(index / (unsigned long long)c->H);
    const int64_t col = (int64_t)(index % (unsigned long long)c->H);
    float value = 0;
    if (stage == 0)
        epmoe_convert_to_f32(in->dtype, (const char *)in->x + index * epmoe_dtype_size(in->dtype),
                             1, &value);
    else
        cudaMemcpy(&value, c->d_x + index, sizeof value, cudaMemcpyDeviceToHost);
    return epmoe_row_value_refused(stage, in->dtype, row, col, value);
}

static epmoe_status forward_local(cuda_backend *c, epmoe_backend *b,
                                  const epmoe_backend_batch *in, int decode) {
    const int64_t T = in->T, n_range = in->layer_end - in->layer_begin;
    const size_t row_bytes = (size_t)c->H * epmoe_dtype_size(in->dtype);
    const int has_ids = in->token_ids != NULL, want_counts = in->expert_counts != NULL;
    cudaStream_t s = c->stream;
    CUDA_TRY(cudaSetDevice(c->device), "selecting this rank's GPU");
    if (decode) {
        /* through pinned staging: the graph's copies need fixed, page-locked addresses */
        memcpy(c->h_rows, in->x, (size_t)T * row_bytes);
        if (has_ids) memcpy(c->h_ids, in->token_ids, (size_t)T * 4);
        const int64_t key[6] = {T, in->layer_begin, in->layer_end, in->dtype, has_ids,
                                want_counts};
        decode_graph *g = find_graph(c, key);
        if (!g) EPMOE_TRY(capture_graph(c, b, key, &g));
        g->last_used = ++c->uses;
        CUDA_TRY(cudaMemcpyAsync(c->d_raw, c->h_rows, (size_t)T * row_bytes,
                                 cudaMemcpyHostToDevice, s), "copying the rows in");
        if (has_ids)
            CUDA_TRY(cudaMemcpyAsync(c->d_ids, c->h_ids, (size_t)T * 4, cudaMemcpyHostToDevice, s),
                     "copying the token ids in");
        CUDA_TRY(cudaEventRecord(c->graph_start, s), "timing the decode graph");
        CUDA_TRY(cudaGraphLaunch(g->exec, s), "replaying the decode graph");
        CUDA_TRY(cudaEventRecord(c->graph_end, s), "timing the decode graph");
        CUDA_TRY(cudaMemcpyAsync(c->h_rows, c->d_raw, (size_t)T * row_bytes,
                                 cudaMemcpyDeviceToHost, s), "copying the outputs out");
    } else {
        CUDA_TRY(cudaMemcpyAsync(c->d_raw, in->x, (size_t)T * row_bytes, cudaMemcpyHostToDevice,
                                 s), "copying the rows in");
        if (has_ids)
            CUDA_TRY(cudaMemcpyAsync(c->d_ids, in->token_ids, (size_t)T * 4,
                                     cudaMemcpyHostToDevice, s), "copying the token ids in");
        EPMOE_TRY(device_forward(c, b, in->dtype, has_ids, T, in->layer_begin, in->layer_end,
                                 want_counts, 0, in->times != NULL));
        CUDA_TRY(cudaMemcpyAsync(in->out, c->d_raw, (size_t)T * row_bytes,
                                 cudaMemcpyDeviceToHost, s), "copying the outputs out");
    }
    CUDA_TRY(cudaMemcpyAsync(c->h_bad, c->d_bad, 2 * sizeof *c->h_bad, cudaMemcpyDeviceToHost, s),
             "reading the row checks");
    if (want_counts)
        CUDA_TRY(cudaMemcpyAsync(c->h_counts, c->d_counts, (size_t)(n_range * c->E) * 8,
                                 cudaMemcpyDeviceToHost, s), "reading the expert counts");
    unsigned long long saturated = 0;
    const epmoe_status flags = epmoe_gpu_engine_sync(c->engine, &saturated); /* waits, watchdog */
    if (flags == EPMOE_ERR_PEER_LOST || flags == EPMOE_ERR_NCCL || flags == EPMOE_ERR_CUDA)
        return flags;
    /* the input's own fault first: it explains any routing flag it caused */
    if (c->h_bad[0] != ~0ull) return bad_element(c, in, 0, c->h_bad[0]);
    EPMOE_TRY(flags);
    if (c->h_bad[1] != ~0ull) return bad_element(c, in, 1, c->h_bad[1]);
    if (decode) memcpy(in->out, c->h_rows, (size_t)T * row_bytes);
    if (want_counts)
        for (int64_t i = 0; i < n_range * c->E; i++) in->expert_counts[i] += (int64_t)c->h_counts[i];
    if (in->times) read_times(c, n_range, decode, in->times);
    return EPMOE_OK;
}

/* Decode graphs run on nccl only. mpi-staged (ranks sharing a GPU) can be captured too, but its
 * graph calls MPI from CUDA's host-callback thread; the service on two ranks sharing one H100
 * crashed in that configuration (cause not established), so such ranks stay in throughput
 * mode, which gives the same bits. */
static int decode_capable(const cuda_backend *c) {
    return c->decode_tokens > 0 && strcmp(c->transport->ops->name, "nccl") == 0 &&
           epmoe_device_transport_graph_safe(c->transport);
}

static epmoe_status cuda_forward(epmoe_backend *b, const epmoe_backend_batch *in) {
    cuda_backend *c = (cuda_backend *)b->impl;
    EPMOE_REQUIRE(in->T >= 0 && in->T <= c->max_tokens, EPMOE_ERR_INVALID_ARG,
                  "rank %d: %lld tokens, max_tokens_per_rank is %lld", c->rank,
                  (long long)in->T, (long long)c->max_tokens);
    /* every rank takes the same mode: the largest shard is the same number on every rank */
    const int decode = decode_capable(c) && in->largest_T <= c->decode_tokens;
    const epmoe_status st = forward_local(c, b, in, decode);
    return c->transport->ops->agree(c->transport, st, "run its shard");
}

static const epmoe_backend_ops cuda_ops = {
    .forward = cuda_forward,
    .get_counters = cuda_get_counters,
    .destroy = cuda_destroy,
};

/* ---- creation ------------------------------------------------------------------------------ */

typedef struct {
    cuda_backend *c;
    int64_t begin, end;
    int checked;
} upload_ctx;

/* Load sink: checks once that every layer will fit, uploads, frees the host copy. */
static epmoe_status upload_layer(void *ctx, int64_t layer, epmoe_layer_weights *w) {
    upload_ctx *u = (upload_ctx *)ctx;
    cuda_backend *c = u->c;
    epmoe_status st = EPMOE_OK;
    if (!u->checked) {
        size_t free_bytes = 0, total_bytes = 0;
        cudaError_t err = cudaMemGetInfo(&free_bytes, &total_bytes);
        const int64_t need = (u->end - u->begin) * epmoe_gpu_engine_layer_bytes(c->engine, w) +
                             epmoe_gpu_engine_staging_bytes(c->engine);
        if (err != cudaSuccess)
            st = epmoe_set_error(EPMOE_ERR_CUDA, __FILE__, __LINE__, "cudaMemGetInfo failed: %s",
                                 cudaGetErrorString(err));
        else if ((size_t)need > free_bytes)
            st = epmoe_set_error(
                EPMOE_ERR_OOM, __FILE__, __LINE__,
                "rank %d: the weights of layers [%lld, %lld) for experts of this rank need "
                "%.2f GiB on GPU %d, which has %.2f GiB free after %.2f GiB of buffers; run more "
                "ranks (each holds 1/P of the experts), fewer layers (--layers A:B) or a smaller "
                "max_tokens_per_rank",
                c->rank, (long long)u->begin, (long long)u->end, (double)need / (1 << 30),
                c->device, (double)free_bytes / (1 << 30),
                (double)epmoe_gpu_engine_device_bytes(c->engine) / (1 << 30));
        u->checked = 1;
    }
    if (st == EPMOE_OK) st = epmoe_gpu_engine_set_layer(c->engine, layer - u->begin, w);
    epmoe_layer_weights_free(w);
    return st;
}

static epmoe_status create_local(epmoe_backend *b, cuda_backend *c, const epmoe_st_set *ckpt,
                                 FILE *log) {
    int shares = 0;
    EPMOE_TRY(epmoe_local_gpu(c->comm, &c->device, &shares));
    CUDA_TRY(cudaSetDevice(c->device), "selecting this rank's GPU");
    cudaDeviceProp prop;
    CUDA_TRY(cudaGetDeviceProperties(&prop, c->device), "reading the GPU's properties");
    b->info.device = c->device;
    snprintf(b->info.device_name, sizeof b->info.device_name, "%.95s", prop.name);
    CUDA_TRY(cudaStreamCreateWithFlags(&c->stream, cudaStreamNonBlocking), "creating a stream");
    EPMOE_TRY(epmoe_device_transport_create(c->comm, c->device, shares, c->stream,
                                            c->cfg.collective_timeout_s, &c->transport));
    snprintf(b->info.transport, sizeof b->info.transport, "%s", c->transport->ops->name);
    const int64_t n_layers = b->layer_end - b->layer_begin;
    c->n_layers = n_layers;
    EPMOE_TRY(epmoe_gpu_engine_create(&c->cfg, c->transport, c->device, NULL, n_layers,
                                      c->decode_tokens, c->rank == 0 ? log : NULL, &c->engine));

    const size_t rows = (size_t)(c->max_tokens * c->H), C = (size_t)c->decode_tokens;
    CUDA_TRY(cudaMalloc(&c->d_raw, rows * 4), "allocating the row buffers");
    CUDA_TRY(cudaMalloc((void **)&c->d_x, rows * 4), "allocating the row buffers");
    CUDA_TRY(cudaMalloc((void **)&c->d_y, rows * 4), "allocating the row buffers");
    CUDA_TRY(cudaMalloc((void **)&c->d_ids, (size_t)c->max_tokens * 4), "allocating token ids");
    CUDA_TRY(cudaMalloc((void **)&c->d_counts, (size_t)(n_layers * c->E) * 8), "expert counts");
    CUDA_TRY(cudaMalloc((void **)&c->d_bad, 2 * 8), "row checks");
    CUDA_TRY(cudaMallocHost(&c->h_rows, (C ? C : 1) * (size_t)c->H * 4), "pinned staging");
    CUDA_TRY(cudaMallocHost((void **)&c->h_ids, (C ? C : 1) * 4), "pinned staging");
    CUDA_TRY(cudaMallocHost((void **)&c->h_bad, 2 * 8), "pinned staging");
    CUDA_TRY(cudaMallocHost((void **)&c->h_counts, (size_t)(n_layers * c->E) * 8),
             "pinned staging");
    c->events = (cudaEvent_t *)calloc((size_t)(n_layers * EPMOE_GPU_STAGE_EVENTS),
                                      sizeof(cudaEvent_t));
    EPMOE_REQUIRE(c->events, EPMOE_ERR_OOM, "cuda backend: out of host memory");
    for (int64_t i = 0; i < n_layers * EPMOE_GPU_STAGE_EVENTS; i++)
        CUDA_TRY(cudaEventCreate(&c->events[i]), "creating stage events");
    CUDA_TRY(cudaEventCreate(&c->graph_start), "creating events");
    CUDA_TRY(cudaEventCreate(&c->graph_end), "creating events");

    upload_ctx u = {c, b->layer_begin, b->layer_end, 0};
    epmoe_expert_slice slice;
    EPMOE_TRY(epmoe_slice_of_rank(c->cfg.n_routed_experts, c->n_ranks, c->rank, &slice));
    size_t free_before = 0, free_after = 0, total = 0;
    CUDA_TRY(cudaMemGetInfo(&free_before, &total), "cudaMemGetInfo");
    EPMOE_TRY(epmoe_load_layers(ckpt, &c->cfg, &slice, b->layer_begin, b->layer_end, c->rank, log,
                                upload_layer, &u));
    CUDA_TRY(cudaMemGetInfo(&free_after, &total), "cudaMemGetInfo");
    b->info.weight_bytes = (int64_t)(free_before - free_after);
    b->info.buffer_bytes = epmoe_gpu_engine_device_bytes(c->engine) + (int64_t)(3 * rows * 4);
    b->info.decode_tokens = decode_capable(c) ? c->decode_tokens : 0;
    if (c->cfg.act_quant == EPMOE_ACT_FP8) {
        int64_t with_fp8 = 0, tensors = 0, inexact = 0;
        epmoe_gpu_engine_fp8_tensors(c->engine, &with_fp8, &tensors, &inexact);
        if (c->cfg.weight_format != EPMOE_WEIGHTS_MXFP4)
            snprintf(b->info.note, sizeof b->info.note,
                     "act_quant fp8 on NVFP4 experts: their block scales do not fold into E4M3 "
                     "exactly, so every GEMM runs the exact bf16 path (FP8 tensor cores need "
                     "MXFP4 experts)");
        else if (!c->cfg.fp8_tensor_cores)
            snprintf(b->info.note, sizeof b->info.note,
                     "act_quant fp8: every GEMM on the exact bf16 path (fp8_tensor_cores 1: FP8 "
                     "tensor cores at prefill, experimental)");
        else
            snprintf(b->info.note, sizeof b->info.note,
                     "act_quant fp8: FP8 tensor cores at prefill for %lld of %lld expert tensors "
                     "(%lld weight groups not exactly E4M3 keep the others on the bf16 path)",
                     (long long)with_fp8, (long long)tensors, (long long)inexact);
    }
    return EPMOE_OK;
}

/* The first use of each kernel, of cuBLAS's algorithms and of NCCL's channels loads code and
 * sets things up (tens of milliseconds in all): pay that at load time, not in the first batch
 * a job times or the first request a client waits for. Two collective forwards through every
 * loaded layer: one token (the decode kernels, and the decode graph where there is one) and
 * max_tokens_per_rank tokens (the prefill kernels), on deterministic finite rows. */
static epmoe_status warm_up(epmoe_backend *b, cuda_backend *c) {
    const int64_t T = c->max_tokens, H = c->H;
    float *x = (float *)malloc((size_t)(T * H) * sizeof(float));
    float *y = (float *)malloc((size_t)(T * H) * sizeof(float));
    int32_t *ids = (int32_t *)malloc((size_t)T * sizeof(int32_t));
    epmoe_status st = x && y && ids ? EPMOE_OK
                                    : epmoe_set_error(EPMOE_ERR_OOM, __FILE__, __LINE__,
                                                      "cuda backend: no host memory to warm up");
    uint32_t r = 2463534242u + (uint32_t)c->rank;
    for (int64_t i = 0; st == EPMOE_OK && i < T * H; i++) {
        r ^= r << 13, r ^= r >> 17, r ^= r << 5; /* xorshift32 */
        x[i] = (float)(r >> 8) * (2.0f / 16777216.0f) - 1.0f;
    }
    for (int64_t t = 0; st == EPMOE_OK && t < T; t++) ids[t] = (int32_t)(t % c->cfg.vocab_size);
    const int64_t sizes[2] = {1, T};
    for (int i = 0; i < 2; i++) {
        epmoe_backend_batch batch;
        memset(&batch, 0, sizeof batch);
        batch.x = x, batch.out = y, batch.dtype = EPMOE_DTYPE_F32, batch.token_ids = ids;
        batch.T = st == EPMOE_OK ? sizes[i] : 0;
        batch.largest_T = sizes[i];
        batch.layer_begin = b->layer_begin, batch.layer_end = b->layer_end;
        /* collective even after a local failure: every rank makes the same calls */
        const epmoe_status fst = cuda_forward(b, &batch);
        if (st == EPMOE_OK) st = fst;
    }
    free(x), free(y), free(ids);
    return st;
}

epmoe_status epmoe_backend_cuda_create(const epmoe_config *cfg, MPI_Comm comm,
                                       const epmoe_st_set *ckpt, int64_t layer_begin,
                                       int64_t layer_end, FILE *log, epmoe_backend **out) {
    *out = NULL;
    epmoe_backend *b = (epmoe_backend *)calloc(1, sizeof *b);
    cuda_backend *c = (cuda_backend *)calloc(1, sizeof *c);
    if (!b || !c) {
        free(b);
        free(c);
        EPMOE_FAIL(EPMOE_ERR_OOM, "cuda backend: out of host memory");
    }
    b->ops = &cuda_ops;
    b->impl = c;
    b->layer_begin = layer_begin;
    b->layer_end = layer_end;
    snprintf(b->info.name, sizeof b->info.name, "cuda");
    b->info.device = -1;
    c->device = -1;
    c->cfg = *cfg;
    c->comm = comm;
    MPI_Comm_rank(comm, &c->rank);
    MPI_Comm_size(comm, &c->n_ranks);
    c->H = cfg->hidden_size;
    c->E = cfg->n_routed_experts;
    c->k = cfg->top_k;
    c->max_tokens = cfg->max_tokens_per_rank;
    c->decode_tokens = cfg->decode_tokens < c->max_tokens ? cfg->decode_tokens : c->max_tokens;

    /* what the kernels cannot run is refused before touching a device */
    epmoe_status st = epmoe_config_check_cuda(cfg);
    if (st == EPMOE_OK && epmoe_backend_cuda_devices() == 0)
        st = epmoe_set_error(EPMOE_ERR_UNSUPPORTED, __FILE__, __LINE__,
                             "backend=cuda: rank %d sees no CUDA device (driver missing, or "
                             "CUDA_VISIBLE_DEVICES empty); use backend=cpu",
                             c->rank);
    if (st == EPMOE_OK) st = create_local(b, c, ckpt, log);
    st = epmoe_agree(comm, st, "set up its GPU", cfg->collective_timeout_s);
    if (st == EPMOE_OK && (st = warm_up(b, c)) != EPMOE_OK) epmoe_add_context(st, "warming up");
    if (st != EPMOE_OK) {
        cuda_destroy(b);
        return st;
    }
    *out = b;
    return EPMOE_OK;
}
