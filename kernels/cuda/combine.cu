/* Weighted combine (docs/design.md §2.5): out[t] = sum over slots, in slot order, of
 * w[t,j] * y[row_of_pair[t,j]], then + shared[t], in fp32 with explicit rounding (no
 * contraction) so that the order and the bits are those of the CPU combine. The gather out of
 * the padded layout happens here: row_of_pair says where each (token, slot) row sits. Expert
 * biases (gpt-oss) are already in y: the W2 GEMM adds them (grouped_gemm.h, out_bias). */
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/ops_cuda.h"

/* One block per token, threads across H. */
__global__ void combine_kernel(const float *y_padded, int64_t H, const int32_t *row_of_pair,
                               const float *weights, int64_t top_k, const float *shared,
                               float *out) {
    const int64_t t = blockIdx.x;
    const int32_t *rows = row_of_pair + t * top_k;
    const float *w = weights + t * top_k;
    for (int64_t c = threadIdx.x; c < H; c += blockDim.x) {
        float acc = 0.0f;
        for (int64_t j = 0; j < top_k; j++) {
            int32_t row = rows[j];
            if (row < 0) continue; /* expert of another rank: combined there */
            acc = __fadd_rn(acc, __fmul_rn(w[j], y_padded[(int64_t)row * H + c]));
        }
        if (shared) acc = __fadd_rn(acc, shared[t * H + c]);
        out[t * H + c] = acc;
    }
}

epmoe_status epmoe_cuda_combine(const float *y_padded, int64_t H, const int32_t *row_of_pair,
                                const float *weights, int64_t T, int64_t top_k,
                                const float *shared, float *out, cudaStream_t stream) {
    EPMOE_REQUIRE(H > 0 && T >= 0 && top_k > 0, EPMOE_ERR_INVALID_ARG,
                  "combine: bad shape H=%lld T=%lld top_k=%lld", (long long)H, (long long)T,
                  (long long)top_k);
    if (T == 0) return EPMOE_OK;
    combine_kernel<<<(unsigned)T, 256, 0, stream>>>(y_padded, H, row_of_pair, weights, top_k,
                                                    shared, out);
    CUDA_TRY_LAUNCH("combine_kernel");
    return EPMOE_OK;
}
