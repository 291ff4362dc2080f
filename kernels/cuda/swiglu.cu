/* Clamped SwiGLU (docs/design.md §3.3) as epmoe_cpu_swiglu: gate columns [0, I), up [I, 2I);
 * the element math is in swiglu_math.cuh. */
#include <cuda_bf16.h>
#include <math.h>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/ops_cuda.h"
#include "kernels/cuda/swiglu_math.cuh"

/* One block per row; padding rows of a padded layout return at once. Output rows are out_cols
 * wide: columns [I, out_cols) are written as zeros (the K padding of the next GEMM's input). */
__global__ void swiglu_kernel(const float *h, int64_t I, epmoe_cuda_swiglu_act act,
                              const float *bias, const int64_t *padded_offsets,
                              const int64_t *tokens_per_expert, int64_t n_local, int64_t out_cols,
                              float *out_f32, __nv_bfloat16 *out_bf16) {
    const int64_t row = blockIdx.x;
    int64_t expert = -1;
    if (padded_offsets) {
        expert = epmoe_cuda_expert_of_real_row(padded_offsets, tokens_per_expert, n_local, row);
        if (expert < 0) return;
    }
    const float *h_row = h + row * 2 * I;
    const float *bias_row = bias ? bias + expert * 2 * I : NULL;
    for (int64_t c = threadIdx.x; c < out_cols; c += blockDim.x) {
        const float a = c < I ? swiglu_column(h_row, bias_row, I, c, act) : 0.0f;
        if (out_f32) out_f32[row * out_cols + c] = a;
        if (out_bf16) out_bf16[row * out_cols + c] = __float2bfloat16_rn(a);
    }
}

epmoe_status epmoe_cuda_swiglu(const float *h, int64_t rows, int64_t I,
                               const epmoe_cuda_swiglu_act *act, const float *bias,
                               const int64_t *padded_offsets, const int64_t *tokens_per_expert,
                               int64_t n_local, int64_t out_cols, float *out_f32,
                               uint16_t *out_bf16, cudaStream_t stream) {
    EPMOE_REQUIRE(rows >= 0 && I > 0 && out_cols >= I, EPMOE_ERR_INVALID_ARG,
                  "swiglu: bad shape rows=%lld I=%lld out_cols=%lld", (long long)rows,
                  (long long)I, (long long)out_cols);
    EPMOE_TRY(swiglu_check_act(act, "swiglu"));
    EPMOE_REQUIRE(out_f32 || out_bf16, EPMOE_ERR_INVALID_ARG, "swiglu: no output given");
    EPMOE_REQUIRE(!padded_offsets || (tokens_per_expert && n_local > 0), EPMOE_ERR_INVALID_ARG,
                  "swiglu: the padded layout needs tokens_per_expert and n_local > 0");
    EPMOE_REQUIRE(!bias || padded_offsets, EPMOE_ERR_INVALID_ARG,
                  "swiglu: expert biases are per expert and need the padded layout");
    if (rows == 0) return EPMOE_OK;
    unsigned threads = I >= 256 ? 256 : 128;
    swiglu_kernel<<<(unsigned)rows, threads, 0, stream>>>(h, I, *act, bias, padded_offsets,
                                                          tokens_per_expert, n_local, out_cols,
                                                          out_f32, (__nv_bfloat16 *)out_bf16);
    CUDA_TRY_LAUNCH("swiglu_kernel");
    return EPMOE_OK;
}
