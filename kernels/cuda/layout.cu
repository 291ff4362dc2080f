/* Per-expert counts, padded offsets and the permutation into the padded expert layout, on the
 * device, in a fixed number of launches whatever the routing (capture-safe).
 *
 * Determinism: the rows of an expert are its (token, slot) pairs in increasing pair index
 * t*top_k + slot, the order the CPU layout uses, so both backends put every pair in the same
 * row. Each block owns one expert and walks all pairs in order, ranking its matches with a
 * block-wide prefix count; no atomics decide positions. */
#include <cuda_bf16.h>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/ops_cuda.h"

#define LAYOUT_THREADS 256

/* Block e: rank of each pair routed to local expert e, and the expert's count. */
__global__ void count_and_rank_kernel(const int32_t *ids, int64_t n_pairs, int64_t expert_start,
                                      int32_t *pair_rank, int64_t *tokens_per_expert) {
    __shared__ int warp_counts[LAYOUT_THREADS / 32];
    const int64_t e = blockIdx.x;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int64_t running = 0; /* matches before this chunk */
    for (int64_t base = 0; base < n_pairs; base += LAYOUT_THREADS) {
        int64_t pair = base + threadIdx.x;
        bool match = pair < n_pairs && (int64_t)ids[pair] - expert_start == e;
        unsigned ballot = __ballot_sync(0xffffffffu, match);
        if (lane == 0) warp_counts[warp] = __popc(ballot);
        __syncthreads();
        int before = 0, total = 0;
        for (int w = 0; w < LAYOUT_THREADS / 32; w++) {
            if (w < warp) before += warp_counts[w];
            total += warp_counts[w];
        }
        before += __popc(ballot & ((1u << lane) - 1u));
        if (match) pair_rank[pair] = (int32_t)(running + before);
        running += total;
        __syncthreads(); /* warp_counts is reused by the next chunk */
    }
    if (threadIdx.x == 0) tokens_per_expert[e] = running;
}

/* padded_offsets from the counts: the rule of epmoe_padded_offsets_from_counts (each count
 * rounded up to a multiple of pad_rows, exclusive prefix, length n+1). One thread: n_local is
 * at most a few hundred. */
__global__ void padded_offsets_kernel(const int64_t *tokens_per_expert, int64_t n_local,
                                      int64_t pad_rows, int64_t *padded_offsets) {
    if (threadIdx.x != 0 || blockIdx.x != 0) return;
    int64_t offset = 0;
    padded_offsets[0] = 0;
    for (int64_t e = 0; e < n_local; e++) {
        offset += (tokens_per_expert[e] + pad_rows - 1) / pad_rows * pad_rows;
        padded_offsets[e + 1] = offset;
    }
}

/* One thread per pair: its padded row, and the inverse map for the gather into that row. */
__global__ void place_pairs_kernel(const int32_t *ids, int64_t n_pairs, int64_t top_k,
                                   int64_t expert_start, int64_t n_local,
                                   const int32_t *pair_rank, const int64_t *padded_offsets,
                                   int32_t *row_of_pair, int32_t *token_of_row) {
    int64_t pair = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (pair >= n_pairs) return;
    int64_t e = (int64_t)ids[pair] - expert_start;
    if (e < 0 || e >= n_local) {
        row_of_pair[pair] = -1;
        return;
    }
    int64_t row = padded_offsets[e] + pair_rank[pair];
    row_of_pair[pair] = (int32_t)row;
    token_of_row[row] = (int32_t)(pair / top_k);
}

epmoe_status epmoe_cuda_plan_layout(const int32_t *ids, int64_t T, int64_t top_k,
                                    int64_t expert_start, int64_t n_local, int64_t pad_rows,
                                    int32_t *pair_rank, int64_t *tokens_per_expert,
                                    int64_t *padded_offsets, int32_t *row_of_pair,
                                    int32_t *token_of_row, cudaStream_t stream) {
    EPMOE_REQUIRE(T >= 0 && top_k > 0 && n_local > 0 && pad_rows > 0 && expert_start >= 0,
                  EPMOE_ERR_INVALID_ARG,
                  "layout: bad arguments T=%lld top_k=%lld n_local=%lld pad_rows=%lld "
                  "expert_start=%lld",
                  (long long)T, (long long)top_k, (long long)n_local, (long long)pad_rows,
                  (long long)expert_start);
    int64_t n_pairs = T * top_k;
    EPMOE_REQUIRE(n_pairs + n_local * pad_rows < INT32_MAX, EPMOE_ERR_INVALID_ARG,
                  "layout: %lld pairs over %lld experts overflow 32-bit row indices",
                  (long long)n_pairs, (long long)n_local);
    count_and_rank_kernel<<<(unsigned)n_local, LAYOUT_THREADS, 0, stream>>>(
        ids, n_pairs, expert_start, pair_rank, tokens_per_expert);
    CUDA_TRY_LAUNCH("count_and_rank_kernel");
    padded_offsets_kernel<<<1, 32, 0, stream>>>(tokens_per_expert, n_local, pad_rows,
                                                padded_offsets);
    CUDA_TRY_LAUNCH("padded_offsets_kernel");
    if (n_pairs == 0) return EPMOE_OK;
    place_pairs_kernel<<<(unsigned)((n_pairs + 255) / 256), 256, 0, stream>>>(
        ids, n_pairs, top_k, expert_start, n_local, pair_rank, padded_offsets, row_of_pair,
        token_of_row);
    CUDA_TRY_LAUNCH("place_pairs_kernel");
    return EPMOE_OK;
}

/* One block per padded row; padding rows return at once. Columns [K, K_pad) are the GEMM's K
 * padding: zeros. */
__global__ void permute_bf16_kernel(const float *x, int64_t x_stride, int64_t K, int64_t K_pad,
                                    const int32_t *token_of_row,
                                    const int64_t *padded_offsets,
                                    const int64_t *tokens_per_expert, int64_t n_local,
                                    __nv_bfloat16 *out) {
    int64_t row = blockIdx.x;
    if (epmoe_cuda_expert_of_real_row(padded_offsets, tokens_per_expert, n_local, row) < 0)
        return;
    const float *src = x + (int64_t)token_of_row[row] * x_stride;
    for (int64_t c = threadIdx.x; c < K_pad; c += blockDim.x)
        out[row * K_pad + c] = __float2bfloat16_rn(c < K ? src[c] : 0.0f);
}

epmoe_status epmoe_cuda_permute_bf16(const float *x, int64_t x_stride, int64_t K, int64_t K_pad,
                                     const int32_t *token_of_row,
                                     const int64_t *padded_offsets,
                                     const int64_t *tokens_per_expert, int64_t n_local,
                                     int64_t cap_rows, uint16_t *out, cudaStream_t stream) {
    EPMOE_REQUIRE(K > 0 && K_pad >= K && cap_rows >= 0 && x_stride >= K, EPMOE_ERR_INVALID_ARG,
                  "permute: bad shape K=%lld K_pad=%lld stride=%lld cap_rows=%lld", (long long)K,
                  (long long)K_pad, (long long)x_stride, (long long)cap_rows);
    if (cap_rows == 0) return EPMOE_OK;
    permute_bf16_kernel<<<(unsigned)cap_rows, 128, 0, stream>>>(
        x, x_stride, K, K_pad, token_of_row, padded_offsets, tokens_per_expert, n_local,
        (__nv_bfloat16 *)out);
    CUDA_TRY_LAUNCH("permute_bf16_kernel");
    return EPMOE_OK;
}
