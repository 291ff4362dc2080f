/* Dispatch and return kernels (kernels/cuda/dispatch.h). Positions come from block-wide
 * prefix sums walked in token (row) order, never from atomics, so the layout of every buffer is
 * a function of the routing alone: deterministic, and identical on both ends of the wire. */
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/dispatch.h"

#include <string.h>

#define SCAN_THREADS 256

/* Exclusive prefix of two per-thread counts over a block of SCAN_THREADS threads, and their
 * block totals. Every thread of the block must call it. */
static __device__ void block_scan2(int a, int b, int *excl_a, int *excl_b, int *total_a,
                                   int *total_b) {
    __shared__ int warp_a[SCAN_THREADS / 32], warp_b[SCAN_THREADS / 32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int ia = a, ib = b; /* inclusive within the warp */
    for (int off = 1; off < 32; off <<= 1) {
        int xa = __shfl_up_sync(0xffffffffu, ia, off), xb = __shfl_up_sync(0xffffffffu, ib, off);
        if (lane >= off) ia += xa, ib += xb;
    }
    if (lane == 31) warp_a[warp] = ia, warp_b[warp] = ib;
    __syncthreads();
    int before_a = 0, before_b = 0, ta = 0, tb = 0;
    for (int w = 0; w < SCAN_THREADS / 32; w++) {
        if (w < warp) before_a += warp_a[w], before_b += warp_b[w];
        ta += warp_a[w], tb += warp_b[w];
    }
    *excl_a = before_a + ia - a;
    *excl_b = before_b + ib - b;
    *total_a = ta;
    *total_b = tb;
    __syncthreads(); /* warp_a/warp_b are reused by the next call */
}

/* Owner rank of each pair: the r with start[r] <= id < start[r+1]; -1 for an id outside
 * [0, start[P]) (routing never produces one; such a slot is then dropped everywhere). */
__global__ void owner_kernel(const int32_t *ids, int64_t n_pairs,
                             const int64_t *rank_expert_start, int n_ranks,
                             int32_t *owner_of_pair) {
    int64_t pair = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (pair >= n_pairs) return;
    const int64_t id = ids[pair];
    if (id < rank_expert_start[0] || id >= rank_expert_start[n_ranks]) {
        owner_of_pair[pair] = -1;
        return;
    }
    int lo = 0, hi = n_ranks; /* start[lo] <= id < start[hi] */
    while (hi - lo > 1) {
        int mid = (lo + hi) / 2;
        if (rank_expert_start[mid] <= id) lo = mid;
        else hi = mid;
    }
    owner_of_pair[pair] = lo;
}

/* Block p: ranks of the rows and pairs each token sends to p, in token order. */
__global__ void plan_kernel(const int32_t *owner_of_pair, int64_t T, int64_t top_k, int n_ranks,
                            int32_t *row_rank, int32_t *pair_rank, int64_t *send_counts) {
    const int p = blockIdx.x;
    int64_t rows = 0, pairs = 0;
    for (int64_t base = 0; base < T; base += SCAN_THREADS) {
        const int64_t t = base + threadIdx.x;
        int n = 0;
        if (t < T)
            for (int64_t j = 0; j < top_k; j++) n += owner_of_pair[t * top_k + j] == p;
        const int m = n > 0;
        int ex_m, ex_n, tot_m, tot_n;
        block_scan2(m, n, &ex_m, &ex_n, &tot_m, &tot_n);
        if (t < T) {
            row_rank[t * n_ranks + p] = m ? (int32_t)(rows + ex_m) : -1;
            pair_rank[t * n_ranks + p] = (int32_t)(pairs + ex_n);
        }
        rows += tot_m;
        pairs += tot_n;
    }
    if (threadIdx.x == 0) {
        send_counts[2 * p] = rows;
        send_counts[2 * p + 1] = pairs;
    }
}

epmoe_status epmoe_cuda_dispatch_plan(const int32_t *ids, int64_t T, int64_t top_k,
                                      const int64_t *rank_expert_start, int n_ranks,
                                      int32_t *owner_of_pair, int32_t *row_rank,
                                      int32_t *pair_rank, int64_t *send_counts,
                                      cudaStream_t stream) {
    EPMOE_REQUIRE(T >= 0 && top_k > 0 && n_ranks > 0 && T * top_k < INT32_MAX,
                  EPMOE_ERR_INVALID_ARG, "dispatch plan: bad shape T=%lld top_k=%lld P=%d",
                  (long long)T, (long long)top_k, n_ranks);
    const int64_t n_pairs = T * top_k;
    if (n_pairs > 0) {
        owner_kernel<<<(unsigned)((n_pairs + 255) / 256), 256, 0, stream>>>(
            ids, n_pairs, rank_expert_start, n_ranks, owner_of_pair);
        CUDA_TRY_LAUNCH("dispatch owner_kernel");
    }
    /* Also for T = 0: the counts (zeros) are still written and exchanged. */
    plan_kernel<<<(unsigned)n_ranks, SCAN_THREADS, 0, stream>>>(owner_of_pair, T, top_k, n_ranks,
                                                               row_rank, pair_rank, send_counts);
    CUDA_TRY_LAUNCH("dispatch plan_kernel");
    return EPMOE_OK;
}

__global__ void bases_kernel(const int64_t *counts, int n_ranks, int64_t *row_base,
                             int64_t *pair_base) {
    if (threadIdx.x != 0 || blockIdx.x != 0) return;
    int64_t rows = 0, pairs = 0;
    for (int p = 0; p < n_ranks; p++) {
        row_base[p] = rows;
        pair_base[p] = pairs;
        rows += counts[2 * p];
        pairs += counts[2 * p + 1];
    }
}

epmoe_status epmoe_cuda_dispatch_bases(const int64_t *counts, int n_ranks, int64_t *row_base,
                                       int64_t *pair_base, cudaStream_t stream) {
    EPMOE_REQUIRE(n_ranks > 0, EPMOE_ERR_INVALID_ARG, "dispatch bases: P=%d", n_ranks);
    bases_kernel<<<1, 32, 0, stream>>>(counts, n_ranks, row_base, pair_base);
    CUDA_TRY_LAUNCH("dispatch bases_kernel");
    return EPMOE_OK;
}

/* Up to three pieces of a token's payload, each copied to its offset in the record, in units
 * of U (4 bytes, or 2 where a hidden size that is an odd multiple of 32 makes the block scales
 * H/16 = 2 mod 4 bytes). */
typedef struct {
    const void *src[3];
    int64_t bytes[3];  /* per token; 0 = unused */
    int64_t offset[3]; /* bytes into the record */
} payload_sources;

/* One block per token: its record to every peer it reaches, and where each slot's output will
 * come back. */
template <typename U>
__global__ void pack_kernel(payload_sources payload, int64_t record_bytes, int64_t meta_offset,
                            const int32_t *ids, int64_t top_k, int n_ranks,
                            const int32_t *owner_of_pair, const int32_t *row_rank,
                            const int32_t *pair_rank, const int64_t *send_row_base,
                            const int64_t *ret_recv_base, uint8_t *send_records,
                            int32_t *ret_index_of_pair) {
    const int64_t t = blockIdx.x;
    const int32_t *owner = owner_of_pair + t * top_k;
    if (threadIdx.x < top_k) {
        const int j = threadIdx.x, p = owner[j];
        int32_t index = -1;
        if (p >= 0) {
            int before = 0;
            for (int jj = 0; jj < j; jj++) before += owner[jj] == p;
            index = (int32_t)(ret_recv_base[p] + pair_rank[t * n_ranks + p] + before);
        }
        ret_index_of_pair[t * top_k + j] = index;
    }
    for (int p = 0; p < n_ranks; p++) {
        const int32_t rank = row_rank[t * n_ranks + p];
        if (rank < 0) continue; /* uniform over the block */
        uint8_t *record = send_records + (send_row_base[p] + rank) * record_bytes;
        for (int piece = 0; piece < 3; piece++) {
            const int64_t n = payload.bytes[piece] / (int64_t)sizeof(U);
            const U *src = (const U *)payload.src[piece] + t * n;
            U *dst = (U *)(record + payload.offset[piece]);
            for (int64_t c = threadIdx.x; c < n; c += blockDim.x) dst[c] = src[c];
        }
        if (threadIdx.x < top_k) {
            const int j = threadIdx.x;
            ((uint32_t *)(record + meta_offset))[j] =
                (uint32_t)(owner[j] == p ? ids[t * top_k + j] : -1);
        }
    }
}

epmoe_status epmoe_cuda_dispatch_pack(const epmoe_dispatch_record *rec, const float *x,
                                      const uint8_t *q_codes, const uint8_t *q_sf,
                                      const float *q_inv_gs, const int32_t *ids, int64_t T,
                                      int n_ranks, const int32_t *owner_of_pair,
                                      const int32_t *row_rank, const int32_t *pair_rank,
                                      const int64_t *send_row_base, const int64_t *ret_recv_base,
                                      uint8_t *send_records, int32_t *ret_index_of_pair,
                                      cudaStream_t stream) {
    const int64_t H = rec->hidden_size, top_k = rec->top_k;
    EPMOE_REQUIRE(T >= 0 && n_ranks > 0 && rec->bytes % 16 == 0, EPMOE_ERR_INVALID_ARG,
                  "dispatch pack: bad shape T=%lld P=%d record %lld bytes", (long long)T,
                  n_ranks, (long long)rec->bytes);
    payload_sources payload;
    memset(&payload, 0, sizeof payload);
    if (rec->format == EPMOE_WIRE_NVFP4) {
        EPMOE_REQUIRE(q_codes && q_sf && q_inv_gs, EPMOE_ERR_INVALID_ARG,
                      "dispatch pack: the NVFP4 wire format needs the quantized rows");
        payload.src[0] = q_codes, payload.bytes[0] = H / 2, payload.offset[0] = rec->codes_offset;
        payload.src[1] = q_sf, payload.bytes[1] = H / 16, payload.offset[1] = rec->sf_offset;
        payload.src[2] = q_inv_gs, payload.bytes[2] = 4, payload.offset[2] = rec->inv_gs_offset;
    } else {
        EPMOE_REQUIRE(x, EPMOE_ERR_INVALID_ARG, "dispatch pack: the fp32 wire format needs x");
        payload.src[0] = x, payload.bytes[0] = 4 * H, payload.offset[0] = 0;
    }
    bool words = rec->meta_offset % 4 == 0;
    for (int piece = 0; piece < 3; piece++)
        words = words && payload.bytes[piece] % 4 == 0 && payload.offset[piece] % 4 == 0;
    if (T == 0) return EPMOE_OK;
    if (words)
        pack_kernel<uint32_t><<<(unsigned)T, 128, 0, stream>>>(
            payload, rec->bytes, rec->meta_offset, ids, top_k, n_ranks, owner_of_pair, row_rank,
            pair_rank, send_row_base, ret_recv_base, send_records, ret_index_of_pair);
    else
        pack_kernel<uint16_t><<<(unsigned)T, 128, 0, stream>>>(
            payload, rec->bytes, rec->meta_offset, ids, top_k, n_ranks, owner_of_pair, row_rank,
            pair_rank, send_row_base, ret_recv_base, send_records, ret_index_of_pair);
    CUDA_TRY_LAUNCH("dispatch pack_kernel");
    return EPMOE_OK;
}

/* One thread per receive row: its peer (the one whose block holds it among its real rows) and
 * its validated ids. */
__global__ void unpack_kernel(const int32_t *recv_meta, int64_t meta_stride, int64_t recv_rows,
                              int64_t top_k, int n_ranks, const int64_t *recv_row_base,
                              const int64_t *recv_counts, int64_t expert_start, int64_t n_local,
                              int32_t *ids_recv, int32_t *peer_of_row, uint32_t *error_flags) {
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= recv_rows) return;
    int peer = -1;
    for (int p = 0; p < n_ranks; p++) {
        const int64_t local = i - recv_row_base[p];
        if (local >= 0 && local < recv_counts[2 * p]) {
            peer = p;
            break;
        }
    }
    peer_of_row[i] = peer;
    int valid = 0;
    uint32_t flags = 0;
    for (int64_t j = 0; j < top_k; j++) {
        int32_t id = peer >= 0 ? recv_meta[i * meta_stride + j] : -1;
        if (id != -1 && (id < expert_start || id >= expert_start + n_local)) {
            flags |= EPMOE_CUDA_FLAG_DISPATCH_ID;
            id = -1;
        }
        ids_recv[i * top_k + j] = id;
        valid += id != -1;
    }
    if (peer >= 0 && valid == 0) flags |= EPMOE_CUDA_FLAG_DISPATCH_EMPTY;
    if (flags) atomicOr(error_flags, flags);
}

epmoe_status epmoe_cuda_dispatch_unpack(const epmoe_dispatch_record *rec,
                                        const uint8_t *recv_records, int64_t recv_rows,
                                        int n_ranks, const int64_t *recv_row_base,
                                        const int64_t *recv_counts, int64_t expert_start,
                                        int64_t n_local, int32_t *ids_recv, int32_t *peer_of_row,
                                        uint32_t *error_flags, cudaStream_t stream) {
    EPMOE_REQUIRE(recv_rows >= 0 && n_ranks > 0 && n_local > 0, EPMOE_ERR_INVALID_ARG,
                  "dispatch unpack: bad shape rows=%lld P=%d n_local=%lld",
                  (long long)recv_rows, n_ranks, (long long)n_local);
    if (recv_rows == 0) return EPMOE_OK;
    unpack_kernel<<<(unsigned)((recv_rows + 255) / 256), 256, 0, stream>>>(
        (const int32_t *)(recv_records + rec->meta_offset), rec->bytes / 4, recv_rows,
        rec->top_k, n_ranks, recv_row_base, recv_counts, expert_start, n_local, ids_recv,
        peer_of_row, error_flags);
    CUDA_TRY_LAUNCH("dispatch unpack_kernel");
    return EPMOE_OK;
}

/* Block p: offsets of its rows' returned pairs, in row order, and a check of the total. */
__global__ void return_offsets_kernel(const int32_t *ids_recv, int64_t top_k, int n_ranks,
                                      const int64_t *recv_row_base, const int64_t *recv_counts,
                                      const int64_t *ret_send_base, int64_t *ret_row_offset,
                                      uint32_t *error_flags) {
    const int p = blockIdx.x;
    const int64_t rows = recv_counts[2 * p], first = recv_row_base[p];
    int64_t pairs = 0;
    for (int64_t base = 0; base < rows; base += SCAN_THREADS) {
        const int64_t local = base + threadIdx.x;
        int n = 0;
        if (local < rows)
            for (int64_t j = 0; j < top_k; j++) n += ids_recv[(first + local) * top_k + j] != -1;
        int ex_n, ex_unused, tot_n, tot_unused;
        block_scan2(n, 0, &ex_n, &ex_unused, &tot_n, &tot_unused);
        if (local < rows) ret_row_offset[first + local] = ret_send_base[p] + pairs + ex_n;
        pairs += tot_n;
    }
    if (threadIdx.x == 0 && pairs != recv_counts[2 * p + 1])
        atomicOr(error_flags, EPMOE_CUDA_FLAG_DISPATCH_COUNT);
}

epmoe_status epmoe_cuda_dispatch_return_offsets(const int32_t *ids_recv, int64_t top_k,
                                                int n_ranks, const int64_t *recv_row_base,
                                                const int64_t *recv_counts,
                                                const int64_t *ret_send_base,
                                                int64_t *ret_row_offset, uint32_t *error_flags,
                                                cudaStream_t stream) {
    EPMOE_REQUIRE(top_k > 0 && n_ranks > 0, EPMOE_ERR_INVALID_ARG,
                  "dispatch return offsets: top_k=%lld P=%d", (long long)top_k, n_ranks);
    return_offsets_kernel<<<(unsigned)n_ranks, SCAN_THREADS, 0, stream>>>(
        ids_recv, top_k, n_ranks, recv_row_base, recv_counts, ret_send_base, ret_row_offset,
        error_flags);
    CUDA_TRY_LAUNCH("dispatch return_offsets_kernel");
    return EPMOE_OK;
}

/* One thread per receive row: the return-buffer row of each of its pairs, in slot order. */
__global__ void return_rows_kernel(const int32_t *ids_recv, const int32_t *row_of_pair,
                                   const int32_t *peer_of_row, const int64_t *ret_row_offset,
                                   int64_t recv_rows, int64_t top_k, int32_t *ret_row_of_padded) {
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= recv_rows || peer_of_row[i] < 0) return;
    int64_t dst = ret_row_offset[i];
    for (int64_t j = 0; j < top_k; j++) {
        if (ids_recv[i * top_k + j] == -1) continue;
        ret_row_of_padded[row_of_pair[i * top_k + j]] = (int32_t)dst++;
    }
}

epmoe_status epmoe_cuda_dispatch_return_rows(const int32_t *ids_recv, const int32_t *row_of_pair,
                                             const int32_t *peer_of_row,
                                             const int64_t *ret_row_offset, int64_t recv_rows,
                                             int64_t top_k, int32_t *ret_row_of_padded,
                                             cudaStream_t stream) {
    EPMOE_REQUIRE(recv_rows >= 0 && top_k > 0 && row_of_pair && ret_row_of_padded,
                  EPMOE_ERR_INVALID_ARG, "dispatch return rows: rows=%lld top_k=%lld",
                  (long long)recv_rows, (long long)top_k);
    if (recv_rows == 0) return EPMOE_OK;
    return_rows_kernel<<<(unsigned)((recv_rows + 255) / 256), 256, 0, stream>>>(
        ids_recv, row_of_pair, peer_of_row, ret_row_offset, recv_rows, top_k, ret_row_of_padded);
    CUDA_TRY_LAUNCH("dispatch return_rows_kernel");
    return EPMOE_OK;
}
