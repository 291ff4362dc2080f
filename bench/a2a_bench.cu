/* All-to-all benchmark of the expert-parallel dispatch and combine (kernels/cuda/dispatch.h over
 * a device transport, coordinator/transport/device.h), an MPI program: one rank per GPU.
 *
 *   mpirun -np P a2a_bench [--tokens 4096] [--decode-tokens 128] [--iters 20]
 *
 * Per model width (DeepSeek-V4-Flash H=4096 E=256, V4-Pro H=7168 E=384, top-6) and per wire
 * format of the dispatched rows (nvfp4: codes + scales + 1/gs, 9H/16 + 4 bytes; fp32: 4H):
 *  - prefill: `tokens` per rank, random gate. route = gate logits + top-k (the model's router,
 *    reported apart). dispatch = [NVFP4 quantization of the tokens] + plan + pack + counts
 *    exchange (one host sync) + the payload all-to-all: everything after routing that moves a
 *    row to its experts' owner, permutation included. combine = unpack + return offsets +
 *    return pack (identity experts: each pair returns an fp32 row) + the return all-to-all +
 *    the weighted combine.
 *    Bandwidth as DeepEP counts it (bytes of the payload a rank receives in dispatch and sends
 *    in combine, over the stage time; self included; the ids and record padding excluded).
 *    Next to it, in the same run, a raw grouped ncclSend/ncclRecv all-to-all of the same
 *    bytes (the most any rank moves, split evenly over the peers).
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
#include "coordinator/transport/device.h"
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
    epmoe_dispatch_record rec;
    epmoe_route_params route;
    epmoe_transport *t;
    cudaStream_t s;
    float *x, *gate, *logits, *w, *y_echo, *ret_send, *ret_recv, *out;
    uint8_t *q_codes, *q_sf, *send_rec, *recv_rec;
    float *q_inv_gs;
    int32_t *ids, *owner, *row_rank, *pair_rank, *ret_index, *ids_recv, *peer_of_row;
    int64_t *rank_start, *send_counts, *recv_counts, *bases, *ret_row_offset; /* bases: [4P] */
    uint32_t *flags;
    int64_t *h_counts; /* pinned [4P] */
    int64_t h[12][64]; /* host counts/displs; P <= 64 */
    int64_t rows_sent, rows_received, pairs_returned;
    cudaEvent_t ev[4]; /* dispatch: start, after pack, after counts, after payload */
} bench;

static void *dmalloc(size_t bytes) {
    void *p = NULL;
    CU(cudaMalloc(&p, bytes ? bytes : 16));
    CU(cudaMemset(p, 0, bytes ? bytes : 16));
    return p;
}

static void bench_make(bench *b, int64_t H, int64_t E, int64_t T, epmoe_wire_format wire,
                       epmoe_transport *t, cudaStream_t s) {
    memset(b, 0, sizeof *b);
    epmoe_config cfg;
    epmoe_config_defaults(&cfg);
    cfg.hidden_size = H, cfg.n_routed_experts = E, cfg.top_k = 6;
    b->route = epmoe_route_params_from_config(&cfg);
    b->H = H, b->E = E, b->k = 6, b->T = T, b->t = t, b->s = s;
    CK(epmoe_dispatch_record_layout(wire, H, b->k, &b->rec));
    const size_t P = (size_t)g_P, k = 6, rows = (size_t)T * P, pairs = rows * k;
    const size_t R = (size_t)b->rec.bytes;
    b->x = (float *)dmalloc(T * H * 4);
    b->gate = (float *)dmalloc(E * H * 4);
    b->logits = (float *)dmalloc(T * E * 4);
    b->w = (float *)dmalloc(T * k * 4);
    b->ids = (int32_t *)dmalloc(T * k * 4);
    b->owner = (int32_t *)dmalloc(T * k * 4);
    b->ret_index = (int32_t *)dmalloc(T * k * 4);
    b->row_rank = (int32_t *)dmalloc(T * P * 4);
    b->pair_rank = (int32_t *)dmalloc(T * P * 4);
    b->q_codes = (uint8_t *)dmalloc(T * H / 2);
    b->q_sf = (uint8_t *)dmalloc(T * H / 16);
    b->q_inv_gs = (float *)dmalloc(T * 4);
    b->send_rec = (uint8_t *)dmalloc(rows * R);
    b->recv_rec = (uint8_t *)dmalloc(rows * R);
    b->y_echo = (float *)dmalloc(rows * H * 4);
    b->ids_recv = (int32_t *)dmalloc(rows * k * 4);
    b->peer_of_row = (int32_t *)dmalloc(rows * 4);
    b->ret_row_offset = (int64_t *)dmalloc(rows * 8);
    b->ret_send = (float *)dmalloc(pairs * H * 4);
    b->ret_recv = (float *)dmalloc(pairs * H * 4);
    b->out = (float *)dmalloc(T * H * 4);
    b->rank_start = (int64_t *)dmalloc((P + 1) * 8);
    b->send_counts = (int64_t *)dmalloc(2 * P * 8);
    b->recv_counts = (int64_t *)dmalloc(2 * P * 8);
    b->bases = (int64_t *)dmalloc(4 * P * 8);
    b->flags = (uint32_t *)dmalloc(4);
    CU(cudaMallocHost(&b->h_counts, 4 * P * 8));
    for (int i = 0; i < 4; i++) CU(cudaEventCreate(&b->ev[i]));
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
                    b->pair_rank, b->q_codes, b->q_sf, b->q_inv_gs, b->send_rec, b->recv_rec,
                    b->y_echo, b->ids_recv, b->peer_of_row, b->ret_row_offset, b->ret_send,
                    b->ret_recv, b->out, b->rank_start, b->send_counts, b->recv_counts, b->bases,
                    b->flags};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) cudaFree(bufs[i]);
    cudaFreeHost(b->h_counts);
    for (int i = 0; i < 4; i++) cudaEventDestroy(b->ev[i]);
}

/* host arrays: 0 ones, 1 iota (both set by bench_make), 2 rows to, 3 row displs out, 4 rows from, 5 row displs in,
 * 6 pairs to, 7 pair displs out (return recv), 8 pairs from, 9 pair displs in (return send) */
static void host_counts(bench *b, int fixed) {
    const int P = g_P;
    int64_t ro = 0, ri = 0, po = 0, pi = 0;
    for (int p = 0; p < P; p++) {
        int64_t rt = fixed ? b->T : b->h_counts[2 * p], pt = fixed ? b->T * b->k : b->h_counts[2 * p + 1];
        int64_t rf = fixed ? b->T : b->h_counts[2 * P + 2 * p];
        int64_t pf = fixed ? b->T * b->k : b->h_counts[2 * P + 2 * p + 1];
        b->h[2][p] = rt, b->h[3][p] = ro, b->h[4][p] = rf, b->h[5][p] = ri;
        b->h[6][p] = pt, b->h[7][p] = po, b->h[8][p] = pf, b->h[9][p] = pi;
        ro += rt, ri += rf, po += pt, pi += pf;
    }
    b->rows_sent = ro, b->rows_received = ri, b->pairs_returned = pi;
}

static void route_stage(bench *b) {
    CK(epmoe_cuda_gate_logits(b->x, b->gate, b->T, b->H, b->E, b->logits, b->s));
    CK(epmoe_cuda_route(&b->route, b->logits, NULL, b->T, b->ids, b->w, b->flags, b->s));
}

/* bases on the device: [0,P) send rows, [P,2P) return recv, [2P,3P) recv rows, [3P,4P) return
 * send; fixed mode uploads the host displacements. Events: start, packed, counts known, sent
 * (not recorded while capturing). */
static void dispatch_stage(bench *b, int fixed) {
    const int P = g_P;
    if (!fixed) CU(cudaEventRecord(b->ev[0], b->s));
    if (b->rec.format == EPMOE_WIRE_NVFP4)
        CK(epmoe_cuda_nvfp4_quantize_rows(b->x, b->H, b->T, b->H, b->H, NULL, NULL, NULL, 0, NULL,
                                          b->q_codes, b->q_sf, b->q_inv_gs, NULL, b->s));
    CK(epmoe_cuda_dispatch_plan(b->ids, b->T, b->k, b->rank_start, P, b->owner, b->row_rank,
                                b->pair_rank, b->send_counts, b->s));
    if (!fixed) CK(epmoe_cuda_dispatch_bases(b->send_counts, P, b->bases, b->bases + P, b->s));
    CK(epmoe_cuda_dispatch_pack(&b->rec, b->x, b->q_codes, b->q_sf, b->q_inv_gs, b->ids, b->T, P,
                                b->owner, b->row_rank, b->pair_rank, b->bases, b->bases + P,
                                b->send_rec, b->ret_index, b->s));
    if (!fixed) CU(cudaEventRecord(b->ev[1], b->s));
    CK(epmoe_device_alltoallv_async(b->t, b->send_counts, b->h[0], b->h[1], b->recv_counts,
                                    b->h[0], b->h[1], 16, "counts"));
    if (!fixed) {
        CU(cudaMemcpyAsync(b->h_counts, b->send_counts, 2 * P * 8, cudaMemcpyDeviceToHost, b->s));
        CU(cudaMemcpyAsync(b->h_counts + 2 * P, b->recv_counts, 2 * P * 8, cudaMemcpyDeviceToHost, b->s));
        CK(epmoe_device_transport_wait(b->t, "counts"));
        host_counts(b, 0);
        CK(epmoe_cuda_dispatch_bases(b->recv_counts, P, b->bases + 2 * P, b->bases + 3 * P, b->s));
        CU(cudaEventRecord(b->ev[2], b->s));
    }
    CK(epmoe_device_alltoallv_async(b->t, b->send_rec, b->h[2], b->h[3], b->recv_rec, b->h[4],
                                    b->h[5], (size_t)b->rec.bytes, "dispatch rows"));
    if (!fixed) CU(cudaEventRecord(b->ev[3], b->s));
}

/* The benchmark's expert is the identity: each received row goes back once per valid slot, in
 * slot order, to its place in the return buffer (what the engine's W2 GEMM writes there). One
 * block per received row. */
__global__ void echo_return_kernel(const float4 *y, int64_t H4, const int32_t *ids_recv,
                                   const int32_t *peer_of_row, const int64_t *ret_row_offset,
                                   int64_t top_k, float4 *ret_send) {
    const int64_t i = blockIdx.x;
    if (peer_of_row[i] < 0) return;
    int64_t dst = ret_row_offset[i];
    for (int64_t j = 0; j < top_k; j++) {
        if (ids_recv[i * top_k + j] == -1) continue; /* uniform over the block */
        for (int64_t c = threadIdx.x; c < H4; c += blockDim.x) ret_send[dst * H4 + c] = y[i * H4 + c];
        dst++;
    }
}

static void combine_stage(bench *b, int fixed) {
    const int P = g_P;
    const int64_t rows = fixed ? (int64_t)P * b->T : b->h[5][P - 1] + b->h[4][P - 1];
    CK(epmoe_cuda_dispatch_unpack(&b->rec, b->recv_rec, rows, P, b->bases + 2 * P,
                                  b->recv_counts, 0, b->E, b->ids_recv, b->peer_of_row, b->flags,
                                  b->s));
    CK(epmoe_cuda_dispatch_return_offsets(b->ids_recv, b->k, P, b->bases + 2 * P, b->recv_counts,
                                          b->bases + 3 * P, b->ret_row_offset, b->flags, b->s));
    if (rows > 0)
        echo_return_kernel<<<(unsigned)rows, 128, 0, b->s>>>(
            (const float4 *)b->y_echo, b->H / 4, b->ids_recv, b->peer_of_row, b->ret_row_offset,
            b->k, (float4 *)b->ret_send);
    CU(cudaGetLastError());
    CK(epmoe_device_alltoallv_async(b->t, b->ret_send, b->h[8], b->h[9], b->ret_recv, b->h[6],
                                    b->h[7], b->H * 4, "return"));
    CK(epmoe_cuda_combine(b->ret_recv, b->H, b->ret_index, b->w, b->T, b->k, NULL, b->out,
                          b->s));
}

static int cmp_f(const void *a, const void *b) {
    float x = *(const float *)a, y = *(const float *)b;
    return x < y ? -1 : x > y;
}

static float median_max(float *v, int n) {
    qsort(v, n, 4, cmp_f);
    float med = v[n / 2], mx = 0;
    MPI_Allreduce(&med, &mx, 1, MPI_FLOAT, MPI_MAX, MPI_COMM_WORLD);
    return mx;
}

/* Medians (max over ranks) in ms: [0] route, [1] dispatch, [2] combine, and the dispatch parts
 * [3] quantize+plan+pack, [4] counts exchange + host sync, [5] payload all-to-all. */
static void time_stages(bench *b, int iters, float ms[6]) {
    cudaEvent_t r0, c1;
    cudaEventCreate(&r0), cudaEventCreate(&c1);
    float *v[6];
    for (int i = 0; i < 6; i++) v[i] = (float *)malloc(iters * 4);
    for (int i = -3; i < iters; i++) {
        MPI_Barrier(MPI_COMM_WORLD);
        CU(cudaEventRecord(r0, b->s));
        route_stage(b);
        dispatch_stage(b, 0);
        combine_stage(b, 0);
        CU(cudaEventRecord(c1, b->s));
        CK(epmoe_device_transport_wait(b->t, "bench"));
        if (i < 0) continue;
        cudaEventElapsedTime(&v[0][i], r0, b->ev[0]);
        cudaEventElapsedTime(&v[1][i], b->ev[0], b->ev[3]);
        cudaEventElapsedTime(&v[2][i], b->ev[3], c1);
        cudaEventElapsedTime(&v[3][i], b->ev[0], b->ev[1]);
        cudaEventElapsedTime(&v[4][i], b->ev[1], b->ev[2]);
        cudaEventElapsedTime(&v[5][i], b->ev[2], b->ev[3]);
    }
    for (int i = 0; i < 6; i++) ms[i] = median_max(v[i], iters), free(v[i]);
    cudaEventDestroy(r0), cudaEventDestroy(c1);
}

#ifdef EPMOE_HAVE_NCCL
/* Raw grouped send/recv of `bytes` per rank split evenly over the peers (the same on every
 * rank, so the pairs match), median ms (max over ranks). */
static float raw_nccl_ms(ncclComm_t comm, cudaStream_t s, void *send, void *recv, size_t bytes,
                         int iters) {
    const size_t per = bytes / (size_t)g_P / 16 * 16;
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
    float mx = median_max(t, iters);
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
    CK(epmoe_device_transport_create(MPI_COMM_WORLD, device, shares, s, 120.0, &t));
    const int use_nccl = strcmp(t->ops->name, "nccl") == 0;
    cudaDeviceProp prop;
    cudaGetDeviceProperties(&prop, device);
    if (g_rank == 0) {
        printf("a2a_bench: %d rank(s), %s, transport %s%s\n", g_P, prop.name, t->ops->name,
               shares ? " (ranks share a GPU)" : "");
        if (g_P == 1)
            printf("NOTE: 1 rank: every all-to-all is a copy to itself; these figures measure the "
                   "kernels and a local copy, not a link. Meaningful only with 2+ GPUs.\n");
        printf("bandwidth = payload bytes a rank receives in dispatch (the record's payload: "
               "9H/16+4 nvfp4, 4H fp32) and sends in combine (4H per pair), self included, ids "
               "and padding excluded, the most over ranks / the median stage time, max over "
               "ranks (DeepEP's way)\n");
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
    for (int m = 0; m < 2; m++)
        for (int wi = 0; wi < 2; wi++) {
            const epmoe_wire_format wire = wi == 0 ? EPMOE_WIRE_NVFP4 : EPMOE_WIRE_F32;
            const char *wname = epmoe_wire_format_name(wire);
            bench b;
            bench_make(&b, models[m].H, models[m].E, tokens, wire, t, s);
            float ms[6];
            time_stages(&b, iters, ms);
            /* DeepEP's count: payload bytes received in dispatch, sent in combine, per rank. */
            int64_t mine[2] = {b.rows_received * b.rec.payload_bytes, b.pairs_returned * b.H * 4};
            int64_t most[2];
            MPI_Allreduce(mine, most, 2, MPI_INT64_T, MPI_MAX, MPI_COMM_WORLD);
            if (g_rank == 0) {
                printf("%s %s wire (%lld B/row) prefill %lld tokens/rank: route %.3f ms | dispatch "
                       "%.3f ms = pack %.3f + counts %.3f + payload %.3f (%.1f GB/s, %lld rows in "
                       "on rank 0) | combine %.3f ms (%.1f GB/s)\n",
                       models[m].name, wname, (long long)b.rec.bytes, (long long)tokens, ms[0],
                       ms[1], ms[3], ms[4], ms[5], most[0] / ms[1] / 1e6,
                       (long long)b.rows_received, ms[2], most[1] / ms[2] / 1e6);
            }
#ifdef EPMOE_HAVE_NCCL
            if (raw) {
                float r1 = raw_nccl_ms(raw, s, b.send_rec, b.recv_rec, (size_t)most[0], iters);
                float r2 = raw_nccl_ms(raw, s, b.ret_send, b.ret_recv, (size_t)most[1], iters);
                if (g_rank == 0)
                    printf("%s %s wire raw NCCL all-to-all of the same bytes: dispatch-sized %.3f "
                           "ms (%.1f GB/s; our dispatch reaches %.0f%%, its payload all-to-all "
                           "alone %.0f%%), combine-sized %.3f ms (%.1f GB/s; combine reaches "
                           "%.0f%%)\n",
                           models[m].name, wname, r1, most[0] / r1 / 1e6, 100.0 * r1 / ms[1],
                           100.0 * r1 / ms[5], r2, most[1] / r2 / 1e6, 100.0 * r2 / ms[2]);
            }
#endif
            bench_free(&b);

            /* decode: fixed capacity, captured */
            bench_make(&b, models[m].H, models[m].E, decode_tokens, wire, t, s);
            host_counts(&b, 1);
            int64_t hb[4 * 64];
            for (int p = 0; p < g_P; p++) {
                hb[p] = p * decode_tokens;                 /* send rows */
                hb[g_P + p] = p * decode_tokens * b.k;     /* return recv */
                hb[2 * g_P + p] = p * decode_tokens;       /* recv rows */
                hb[3 * g_P + p] = p * decode_tokens * b.k; /* return send */
            }
            CU(cudaMemcpy(b.bases, hb, 4 * g_P * 8, cudaMemcpyHostToDevice));
            if (!epmoe_device_transport_graph_safe(t)) {
                if (g_rank == 0) printf("%s decode: transport not graph-safe here, skipped\n", models[m].name);
                bench_free(&b);
                continue;
            }
            route_stage(&b);
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
                lat[stage] = median_max(v, iters);
                free(v);
                cudaEventDestroy(e0), cudaEventDestroy(e1);
            }
            if (g_rank == 0)
                printf("%s %s wire decode %lld tokens/rank (graph-replayed, fixed capacity): "
                       "dispatch %.1f us, combine %.1f us\n",
                       models[m].name, wname, (long long)decode_tokens, lat[0] * 1e3, lat[1] * 1e3);
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
