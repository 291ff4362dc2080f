/* All-to-all benchmark of the expert-parallel dispatch and combine (kernels/cuda/dispatch.h over
 * a device transport, coordinator/transport_nccl.h), an MPI program: one rank per GPU.
 *
 *   mpirun -np P a2a_bench [--tokens 4096] [--decode-tokens 128] [--iters 20]
 *
 * Per model width (DeepSeek-V4-Flash H=4096 E=256, V4-Pro H=7168 E=384, top-6):
 *  - prefill: `tokens` per rank, random gate (routing on the device included). dispatch = gate
 *    logits + routing + plan + pack + counts exchange (one host sync) + payload all-to-all
 *    (fp32 rows and their ids); combine = unpack + return pack (identity experts: each pair
 *    returns its row) + return all-to-all + weighted combine. Bandwidth counted as DeepEP
 *    counts it: the bytes of the rows this rank sends (fp32 H per row, self included, ids
 *    excluded; per pair for combine) divided by the stage time. Next to it, in the same run, a
 *    raw grouped ncclSend/ncclRecv all-to-all moving the same bytes split evenly over peers.
 *  - decode: `decode-tokens` per rank, the fixed-capacity path (no host sync) captured in a
 *    CUDA graph and replayed: latency of dispatch and of combine (two graphs).
 * Times: median of `iters` after 3 warm-ups, cudaEvent on the stream, max over ranks.
 * With 1 rank every all-to-all is a copy to itself: the figures then say nothing about links.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <mpi.h>

extern "C" {
#include "common/config.h"
#include "common/layout.h"
#include "common/rng.h"
#include "kernels/ops.h"
}
#include "coordinator/transport_nccl.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/dispatch.h"
#include "kernels/cuda/ops_cuda.h"
#ifdef EPMOE_HAVE_NCCL
#include <nccl.h>
#endif

#define CK(call)                                                                                \
    do {                                                                                        \
        epmoe_status st_ = (call);                                                              \
        if (st_ != EPMOE_OK) {                                                                  \
            fprintf(stderr, "rank %d: %s:%d: %s\n", g_rank, __FILE__, __LINE__,                 \
                    epmoe_last_error());                                                        \
            MPI_Abort(MPI_COMM_WORLD, 1);                                                       \
        }                                                                                       \
    } while (0)
#define CU(call)                                                                                \
    do {                                                                                        \
        cudaError_t e_ = (call);                                                                \
        if (e_ != cudaSuccess) {                                                                \
            fprintf(stderr, "rank %d: %s:%d: %s\n", g_rank, __FILE__, __LINE__,                 \
                    cudaGetErrorString(e_));                                                    \
            MPI_Abort(MPI_COMM_WORLD, 1);                                                       \
        }                                                                                       \
    } while (0)

static int g_rank = 0, g_P = 1;

typedef struct {
    int64_t H, E, k, T; /* T: tokens per rank (and the fixed capacity in decode mode) */
    epmoe_route_params route;
    epmoe_transport *t;
    cudaStream_t s;
    float *x, *gate, *logits, *w, *send_x, *recv_x, *ret_send, *ret_recv, *out;
    int32_t *ids, *owner, *row_rank, *pair_rank, *ret_index, *send_meta, *recv_meta, *ids_recv,
        *peer_of_row;
    int64_t *rank_start, *send_counts, *recv_counts, *bases, *ret_row_offset; /* bases: [6P] */
    uint32_t *flags;
    int64_t *h_counts; /* pinned [4P] */
    int64_t h[12][64]; /* host counts/displs; P <= 64 */
    int64_t rows_sent, pairs_sent;
} bench;

static void *dmalloc(size_t bytes) {
    void *p = NULL;
    CU(cudaMalloc(&p, bytes ? bytes : 16));
    CU(cudaMemset(p, 0, bytes ? bytes : 16));
    return p;
}

static void bench_make(bench *b, int64_t H, int64_t E, int64_t T, epmoe_transport *t,
                       cudaStream_t s) {
    memset(b, 0, sizeof *b);
    epmoe_config cfg;
    epmoe_config_defaults(&cfg);
    cfg.hidden_size = H, cfg.n_routed_experts = E, cfg.top_k = 6;
    b->route = epmoe_route_params_from_config(&cfg);
    b->H = H, b->E = E, b->k = 6, b->T = T, b->t = t, b->s = s;
    const size_t P = (size_t)g_P, k = 6, rows = (size_t)T * P, pairs = rows * k;
    b->x = (float *)dmalloc(T * H * 4);
    b->gate = (float *)dmalloc(E * H * 4);
    b->logits = (float *)dmalloc(T * E * 4);
    b->w = (float *)dmalloc(T * k * 4);
    b->ids = (int32_t *)dmalloc(T * k * 4);
    b->owner = (int32_t *)dmalloc(T * k * 4);
    b->ret_index = (int32_t *)dmalloc(T * k * 4);
    b->row_rank = (int32_t *)dmalloc(T * P * 4);
    b->pair_rank = (int32_t *)dmalloc(T * P * 4);
    b->send_x = (float *)dmalloc(rows * H * 4);
    b->send_meta = (int32_t *)dmalloc(rows * k * 4);
    b->recv_x = (float *)dmalloc(rows * H * 4);
    b->recv_meta = (int32_t *)dmalloc(rows * k * 4);
    b->ids_recv = (int32_t *)dmalloc(rows * k * 4);
    b->peer_of_row = (int32_t *)dmalloc(rows * 4);
    b->ret_row_offset = (int64_t *)dmalloc(rows * 8);
    b->ret_send = (float *)dmalloc(pairs * H * 4);
    b->ret_recv = (float *)dmalloc(pairs * H * 4);
    b->out = (float *)dmalloc(T * H * 4);
    b->rank_start = (int64_t *)dmalloc((P + 1) * 8);
    b->send_counts = (int64_t *)dmalloc(2 * P * 8);
    b->recv_counts = (int64_t *)dmalloc(2 * P * 8);
    b->bases = (int64_t *)dmalloc(6 * P * 8);
    b->flags = (uint32_t *)dmalloc(4);
    CU(cudaMallocHost(&b->h_counts, 4 * P * 8));
    /* The counts exchange (one 16-byte element per peer) is the first transfer of every
     * dispatch, so its host counts must be set before the first call. */
    for (int p = 0; p < g_P; p++) b->h[0][p] = 1, b->h[1][p] = p;
    int64_t starts[65];
    for (int p = 0; p < g_P; p++) {
        epmoe_expert_slice sl;
        CK(epmoe_slice_of_rank(E, g_P, p, &sl));
        starts[p] = sl.start, starts[p + 1] = sl.end;
    }
    CU(cudaMemcpy(b->rank_start, starts, (P + 1) * 8, cudaMemcpyHostToDevice));
    /* random activations and gate (host rng, once) */
    epmoe_rng rng;
    epmoe_rng_seed(&rng, 42 + (uint64_t)g_rank);
    float *tmp = (float *)malloc((size_t)(E > T ? E : T) * H * 4);
    for (int64_t i = 0; i < T * H; i++) tmp[i] = (float)epmoe_rng_uniform(&rng) * 2.0f - 1.0f;
    CU(cudaMemcpy(b->x, tmp, T * H * 4, cudaMemcpyHostToDevice));
    epmoe_rng_seed(&rng, 7); /* the same gate on every rank */
    for (int64_t i = 0; i < E * H; i++) tmp[i] = ((float)epmoe_rng_uniform(&rng) - 0.5f) * 0.05f;
    CU(cudaMemcpy(b->gate, tmp, E * H * 4, cudaMemcpyHostToDevice));
    free(tmp);
}

static void bench_free(bench *b) {
    void *bufs[] = {b->x, b->gate, b->logits, b->w, b->ids, b->owner, b->ret_index, b->row_rank,
                    b->pair_rank, b->send_x, b->send_meta, b->recv_x, b->recv_meta, b->ids_recv,
                    b->peer_of_row, b->ret_row_offset, b->ret_send, b->ret_recv, b->out,
                    b->rank_start, b->send_counts, b->recv_counts, b->bases, b->flags};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) cudaFree(bufs[i]);
    cudaFreeHost(b->h_counts);
}

/* host arrays: 0 ones, 1 iota, 2 rows to, 3 row displs out, 4 rows from, 5 row displs in,
 * 6 pairs to, 7 pair displs out (return recv), 8 pairs from, 9 pair displs in (return send) */
static void host_counts(bench *b, int fixed) {
    const int P = g_P;
    int64_t ro = 0, ri = 0, po = 0, pi = 0;
    for (int p = 0; p < P; p++) {
        b->h[0][p] = 1, b->h[1][p] = p;
        int64_t rt = fixed ? b->T : b->h_counts[2 * p], pt = fixed ? b->T * b->k : b->h_counts[2 * p + 1];
        int64_t rf = fixed ? b->T : b->h_counts[2 * P + 2 * p];
        int64_t pf = fixed ? b->T * b->k : b->h_counts[2 * P + 2 * p + 1];
        b->h[2][p] = rt, b->h[3][p] = ro, b->h[4][p] = rf, b->h[5][p] = ri;
        b->h[6][p] = pt, b->h[7][p] = po, b->h[8][p] = pf, b->h[9][p] = pi;
        ro += rt, ri += rf, po += pt, pi += pf;
    }
    b->rows_sent = ro, b->pairs_sent = pi;
}

/* bases on the device: [0,P) send rows, [P,2P) return recv, [2P,3P) recv rows, [3P,4P) return
 * send; fixed mode uploads the host displacements. */
static void dispatch_stage(bench *b, int fixed) {
    const int P = g_P;
    CK(epmoe_cuda_gate_logits(b->x, b->gate, b->T, b->H, b->E, b->logits, b->s));
    CK(epmoe_cuda_route(&b->route, b->logits, NULL, b->T, b->ids, b->w, b->flags, b->s));
    CK(epmoe_cuda_dispatch_plan(b->ids, b->T, b->k, b->rank_start, P, b->owner, b->row_rank,
                                b->pair_rank, b->send_counts, b->s));
    if (!fixed) CK(epmoe_cuda_dispatch_bases(b->send_counts, P, b->bases, b->bases + P, b->s));
    CK(epmoe_cuda_dispatch_pack(b->x, b->H, b->ids, b->T, b->k, P, b->owner, b->row_rank,
                                b->pair_rank, b->bases, b->bases + P, b->send_x, b->send_meta,
                                b->ret_index, b->s));
    CK(epmoe_device_alltoallv_async(b->t, b->send_counts, b->h[0], b->h[1], b->recv_counts,
                                    b->h[0], b->h[1], 16, "counts"));
    if (!fixed) {
        CU(cudaMemcpyAsync(b->h_counts, b->send_counts, 2 * P * 8, cudaMemcpyDeviceToHost, b->s));
        CU(cudaMemcpyAsync(b->h_counts + 2 * P, b->recv_counts, 2 * P * 8, cudaMemcpyDeviceToHost, b->s));
        CK(epmoe_device_transport_wait(b->t, "counts"));
        host_counts(b, 0);
        CK(epmoe_cuda_dispatch_bases(b->recv_counts, P, b->bases + 2 * P, b->bases + 3 * P, b->s));
    }
    CK(epmoe_device_alltoallv_async(b->t, b->send_x, b->h[2], b->h[3], b->recv_x, b->h[4], b->h[5],
                                    b->H * 4, "dispatch rows"));
    CK(epmoe_device_alltoallv_async(b->t, b->send_meta, b->h[2], b->h[3], b->recv_meta, b->h[4],
                                    b->h[5], b->k * 4, "dispatch ids"));
}

static void combine_stage(bench *b, int fixed) {
    const int P = g_P;
    const int64_t rows = fixed ? (int64_t)P * b->T : b->h[5][P - 1] + b->h[4][P - 1];
    CK(epmoe_cuda_dispatch_unpack(b->recv_meta, rows, b->k, P, b->bases + 2 * P, b->recv_counts,
                                  0, b->E, b->ids_recv, b->peer_of_row, b->flags, b->s));
    CK(epmoe_cuda_dispatch_return_offsets(b->ids_recv, b->k, P, b->bases + 2 * P, b->recv_counts,
                                          b->bases + 3 * P, b->ret_row_offset, b->flags, b->s));
    CK(epmoe_cuda_dispatch_return_pack(b->recv_x, b->H, b->ids_recv, NULL, b->peer_of_row,
                                       b->ret_row_offset, rows, b->k, b->ret_send, b->s));
    CK(epmoe_device_alltoallv_async(b->t, b->ret_send, b->h[8], b->h[9], b->ret_recv, b->h[6],
                                    b->h[7], b->H * 4, "return"));
    CK(epmoe_cuda_combine(b->ret_recv, b->H, b->ret_index, b->w, b->T, b->k, NULL, b->out, b->s));
}

static int cmp_f(const void *a, const void *b) {
    float x = *(const float *)a, y = *(const float *)b;
    return x < y ? -1 : x > y;
}

/* Median ms over iters of fn, max over ranks. */
typedef void (*stage_fn)(bench *, int);
static float time_stages(bench *b, int fixed, int iters, float *combine_ms) {
    cudaEvent_t e0, e1, e2;
    cudaEventCreate(&e0), cudaEventCreate(&e1), cudaEventCreate(&e2);
    float *d = (float *)malloc(iters * 4), *c = (float *)malloc(iters * 4);
    for (int i = -3; i < iters; i++) {
        MPI_Barrier(MPI_COMM_WORLD);
        CU(cudaEventRecord(e0, b->s));
        dispatch_stage(b, fixed);
        CU(cudaEventRecord(e1, b->s));
        combine_stage(b, fixed);
        CU(cudaEventRecord(e2, b->s));
        CK(epmoe_device_transport_wait(b->t, "bench"));
        if (i >= 0) cudaEventElapsedTime(&d[i], e0, e1), cudaEventElapsedTime(&c[i], e1, e2);
    }
    qsort(d, iters, 4, cmp_f), qsort(c, iters, 4, cmp_f);
    float med[2] = {d[iters / 2], c[iters / 2]}, mx[2];
    MPI_Allreduce(med, mx, 2, MPI_FLOAT, MPI_MAX, MPI_COMM_WORLD);
    free(d), free(c);
    cudaEventDestroy(e0), cudaEventDestroy(e1), cudaEventDestroy(e2);
    *combine_ms = mx[1];
    return mx[0];
}

#ifdef EPMOE_HAVE_NCCL
/* Raw grouped send/recv of `bytes` split evenly over peers, median ms (max over ranks). */
static float raw_nccl_ms(ncclComm_t comm, cudaStream_t s, void *send, void *recv, size_t bytes,
                         int iters) {
    const size_t per = bytes / (size_t)g_P;
    cudaEvent_t e0, e1;
    cudaEventCreate(&e0), cudaEventCreate(&e1);
    float *t = (float *)malloc(iters * 4);
    for (int i = -3; i < iters; i++) {
        MPI_Barrier(MPI_COMM_WORLD);
        CU(cudaEventRecord(e0, s));
        ncclGroupStart();
        for (int p = 0; p < g_P; p++) {
            ncclSend((char *)send + p * per, per, ncclInt8, p, comm, s);
            ncclRecv((char *)recv + p * per, per, ncclInt8, p, comm, s);
        }
        ncclGroupEnd();
        CU(cudaEventRecord(e1, s));
        CU(cudaStreamSynchronize(s));
        if (i >= 0) cudaEventElapsedTime(&t[i], e0, e1);
    }
    qsort(t, iters, 4, cmp_f);
    float med = t[iters / 2], mx;
    MPI_Allreduce(&med, &mx, 1, MPI_FLOAT, MPI_MAX, MPI_COMM_WORLD);
    free(t);
    cudaEventDestroy(e0), cudaEventDestroy(e1);
    return mx;
}
#endif

int main(int argc, char **argv) {
    int provided = 0;
    MPI_Init_thread(&argc, &argv, MPI_THREAD_MULTIPLE, &provided);
    MPI_Comm_rank(MPI_COMM_WORLD, &g_rank);
    MPI_Comm_size(MPI_COMM_WORLD, &g_P);
    int64_t tokens = 4096, decode_tokens = 128;
    int iters = 20;
    for (int i = 1; i + 1 < argc; i++) {
        if (!strcmp(argv[i], "--tokens")) tokens = atoll(argv[i + 1]);
        if (!strcmp(argv[i], "--decode-tokens")) decode_tokens = atoll(argv[i + 1]);
        if (!strcmp(argv[i], "--iters")) iters = atoi(argv[i + 1]);
    }
    if (g_P > 64) {
        fprintf(stderr, "at most 64 ranks\n");
        MPI_Abort(MPI_COMM_WORLD, 1);
    }
    int device = 0, shares = 0;
    CK(epmoe_local_gpu(MPI_COMM_WORLD, &device, &shares));
    CU(cudaSetDevice(device));
    cudaStream_t s;
    CU(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    epmoe_transport *t = NULL;
    const int use_nccl = !shares && epmoe_transport_nccl_available();
    if (use_nccl) CK(epmoe_transport_nccl_create(MPI_COMM_WORLD, device, s, 120.0, &t));
    else CK(epmoe_transport_mpi_staged_create(MPI_COMM_WORLD, device, s, 120.0, &t));
    cudaDeviceProp prop;
    cudaGetDeviceProperties(&prop, device);
    if (g_rank == 0) {
        printf("a2a_bench: %d rank(s), %s, transport %s%s\n", g_P, prop.name, t->ops->name,
               shares ? " (ranks share a GPU)" : "");
        if (g_P == 1)
            printf("NOTE: 1 rank: every all-to-all is a copy to itself; these figures measure the "
                   "kernels and a local copy, not a link. Meaningful only with 2+ GPUs.\n");
        printf("bandwidth = bytes of the fp32 rows this rank sends (DeepEP's convention: H*4 per "
               "dispatched row, per returned pair for combine, self included, ids excluded) / "
               "median stage time, max over ranks\n");
    }
#ifdef EPMOE_HAVE_NCCL
    ncclComm_t raw = NULL;
    if (use_nccl) {
        ncclUniqueId id;
        if (g_rank == 0) ncclGetUniqueId(&id);
        MPI_Bcast(&id, sizeof id, MPI_BYTE, 0, MPI_COMM_WORLD);
        if (ncclCommInitRank(&raw, g_P, id, g_rank) != ncclSuccess) raw = NULL;
    }
#endif
    struct {
        const char *name;
        int64_t H, E;
    } models[2] = {{"dsv4-flash", 4096, 256}, {"dsv4-pro", 7168, 384}};
    for (int m = 0; m < 2; m++) {
        bench b;
        bench_make(&b, models[m].H, models[m].E, tokens, t, s);
        float comb_ms = 0, disp_ms = time_stages(&b, 0, iters, &comb_ms);
        int64_t mine[2] = {b.rows_sent, b.pairs_sent}, most[2];
        MPI_Allreduce(mine, most, 2, MPI_INT64_T, MPI_MAX, MPI_COMM_WORLD);
        const double disp_bytes = (double)b.rows_sent * b.H * 4, comb_bytes = (double)b.pairs_sent * b.H * 4;
        if (g_rank == 0)
            printf("%s prefill %lld tokens/rank: dispatch %.3f ms (%.1f GB/s, %lld rows), combine "
                   "%.3f ms (%.1f GB/s, %lld pairs) [rank 0 bytes]\n",
                   models[m].name, (long long)tokens, disp_ms, disp_bytes / disp_ms / 1e6,
                   (long long)b.rows_sent, comb_ms, comb_bytes / comb_ms / 1e6,
                   (long long)b.pairs_sent);
#ifdef EPMOE_HAVE_NCCL
        if (raw) {
            float r1 = raw_nccl_ms(raw, s, b.send_x, b.recv_x, (size_t)disp_bytes, iters);
            float r2 = raw_nccl_ms(raw, s, b.ret_send, b.ret_recv, (size_t)comb_bytes, iters);
            if (g_rank == 0)
                printf("%s raw NCCL all-to-all, same bytes: dispatch-sized %.3f ms (%.1f GB/s; "
                       "dispatch reaches %.0f%%), combine-sized %.3f ms (%.1f GB/s; combine "
                       "reaches %.0f%%)\n",
                       models[m].name, r1, disp_bytes / r1 / 1e6, 100.0 * r1 / disp_ms, r2,
                       comb_bytes / r2 / 1e6, 100.0 * r2 / comb_ms);
        }
#endif
        bench_free(&b);

        /* decode: fixed capacity, captured */
        bench_make(&b, models[m].H, models[m].E, decode_tokens, t, s);
        host_counts(&b, 1);
        int64_t hb[4 * 64];
        for (int p = 0; p < g_P; p++) {
            hb[p] = p * decode_tokens;                      /* send rows */
            hb[g_P + p] = p * decode_tokens * b.k;          /* return recv */
            hb[2 * g_P + p] = p * decode_tokens;            /* recv rows */
            hb[3 * g_P + p] = p * decode_tokens * b.k;      /* return send */
        }
        CU(cudaMemcpy(b.bases, hb, 4 * g_P * 8, cudaMemcpyHostToDevice));
        if (!epmoe_device_transport_graph_safe(t)) {
            if (g_rank == 0) printf("%s decode: transport not graph-safe here, skipped\n", models[m].name);
            bench_free(&b);
            continue;
        }
        dispatch_stage(&b, 1), combine_stage(&b, 1); /* warm-up (connections, staging) */
        CK(epmoe_device_transport_wait(t, "decode warm-up"));
        cudaGraph_t g[2];
        cudaGraphExec_t ge[2];
        for (int stage = 0; stage < 2; stage++) {
            CU(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
            if (stage == 0) dispatch_stage(&b, 1);
            else combine_stage(&b, 1);
            CU(cudaStreamEndCapture(s, &g[stage]));
            CU(cudaGraphInstantiate(&ge[stage], g[stage], 0));
        }
        float lat[2];
        for (int stage = 0; stage < 2; stage++) {
            cudaEvent_t e0, e1;
            cudaEventCreate(&e0), cudaEventCreate(&e1);
            float *v = (float *)malloc(iters * 4);
            for (int i = -3; i < iters; i++) {
                MPI_Barrier(MPI_COMM_WORLD);
                if (stage == 1) CU(cudaGraphLaunch(ge[0], s)); /* combine needs a dispatch */
                CU(cudaEventRecord(e0, s));
                CU(cudaGraphLaunch(ge[stage], s));
                CU(cudaEventRecord(e1, s));
                CK(epmoe_device_transport_wait(t, "decode replay"));
                if (i >= 0) cudaEventElapsedTime(&v[i], e0, e1);
            }
            qsort(v, iters, 4, cmp_f);
            float med = v[iters / 2];
            MPI_Allreduce(&med, &lat[stage], 1, MPI_FLOAT, MPI_MAX, MPI_COMM_WORLD);
            free(v);
            cudaEventDestroy(e0), cudaEventDestroy(e1);
        }
        if (g_rank == 0)
            printf("%s decode %lld tokens/rank (graph-replayed, fixed capacity): dispatch %.1f us, "
                   "combine %.1f us\n",
                   models[m].name, (long long)decode_tokens, lat[0] * 1e3, lat[1] * 1e3);
        for (int stage = 0; stage < 2; stage++) cudaGraphExecDestroy(ge[stage]), cudaGraphDestroy(g[stage]);
        bench_free(&b);
    }
#ifdef EPMOE_HAVE_NCCL
    if (raw) ncclCommDestroy(raw);
#endif
    t->ops->destroy(t);
    cudaStreamDestroy(s);
    MPI_Finalize();
    return 0;
}
