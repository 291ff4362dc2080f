/* Clamped SwiGLU (docs/design.md §3.3) as epmoe_cpu_swiglu: gate columns [0, I), up [I, 2I).
 *   dsv4: silu(min(g, L)) * clamp(u, -L, L)      step: min(silu(g), L) * clamp(u, -L, L)
 *   silu(g) = g / (1 + expf(-g)); limit <= 0 disables the clamp. */
#include <cuda_bf16.h>
#include <math.h>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/ops_cuda.h"
#include "kernels/cuda/swiglu_math.cuh"

/* One block per row; padding rows of a padded layout return at once. */
__global__ void swiglu_kernel(const float *h, int64_t I, float limit, int variant,
                              const int64_t *padded_offsets, const int64_t *tokens_per_expert,
                              int64_t n_local, float *out_f32, __nv_bfloat16 *out_bf16) {
    const int64_t row = blockIdx.x;
    if (padded_offsets &&
        epmoe_cuda_expert_of_real_row(padded_offsets, tokens_per_expert, n_local, row) < 0)
        return;
    const float *gate = h + row * 2 * I, *up = gate + I;
    for (int64_t c = threadIdx.x; c < I; c += blockDim.x) {
        float a = swiglu_one(gate[c], up[c], limit, variant);
        if (out_f32) out_f32[row * I + c] = a;
        if (out_bf16) out_bf16[row * I + c] = __float2bfloat16_rn(a);
    }
}

epmoe_status epmoe_cuda_swiglu(const float *h, int64_t rows, int64_t I, float limit,
                               int variant, const int64_t *padded_offsets,
                               const int64_t *tokens_per_expert, int64_t n_local,
                               float *out_f32, uint16_t *out_bf16, cudaStream_t stream) {
    EPMOE_REQUIRE(rows >= 0 && I > 0, EPMOE_ERR_INVALID_ARG, "swiglu: bad shape rows=%lld I=%lld",
                  (long long)rows, (long long)I);
    EPMOE_REQUIRE(variant == EPMOE_SWIGLU_DSV4 || variant == EPMOE_SWIGLU_STEP,
                  EPMOE_ERR_INVALID_ARG, "swiglu: unknown variant %d", variant);
    EPMOE_REQUIRE(out_f32 || out_bf16, EPMOE_ERR_INVALID_ARG, "swiglu: no output given");
    EPMOE_REQUIRE(!padded_offsets || (tokens_per_expert && n_local > 0), EPMOE_ERR_INVALID_ARG,
                  "swiglu: the padded layout needs tokens_per_expert and n_local > 0");
    if (rows == 0) return EPMOE_OK;
    unsigned threads = I >= 256 ? 256 : 128;
    swiglu_kernel<<<(unsigned)rows, threads, 0, stream>>>(h, I, limit, variant, padded_offsets,
                                                          tokens_per_expert, n_local, out_f32,
                                                          (__nv_bfloat16 *)out_bf16);
    CUDA_TRY_LAUNCH("swiglu_kernel");
    return EPMOE_OK;
}
