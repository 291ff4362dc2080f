/* Shared expert (docs/design.md §2.6) on the device: bf16 operands through cuBLAS with fp32
 * accumulation, the routed experts' clamped SwiGLU in between. Row-major [T, K] x [N, K]^T is
 * the column-major product W^T(op T) . X(op N) with m = N, n = T, k = K. */
#include <cuda_bf16.h>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/ops_cuda.h"

__global__ void f32_to_bf16_kernel(const float *x, size_t n, __nv_bfloat16 *out) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        out[i] = __float2bfloat16_rn(x[i]);
}

epmoe_status epmoe_cuda_f32_to_bf16(const float *x, size_t n, uint16_t *out,
                                    cudaStream_t stream) {
    if (n == 0) return EPMOE_OK;
    size_t blocks = (n + 255) / 256;
    if (blocks > 65535) blocks = 65535;
    f32_to_bf16_kernel<<<(unsigned)blocks, 256, 0, stream>>>(x, n, (__nv_bfloat16 *)out);
    CUDA_TRY_LAUNCH("f32_to_bf16_kernel");
    return EPMOE_OK;
}

/* out[T, N] (fp32) = a[T, K] (bf16) . w[N, K]^T (bf16). */
static epmoe_status gemm_bf16_nt(cublasHandle_t cublas, const uint16_t *a, const uint16_t *w,
                                 int64_t T, int64_t N, int64_t K, float *out, const char *what) {
    const float one = 1.0f, zero = 0.0f;
    CUBLAS_TRY(cublasGemmEx(cublas, CUBLAS_OP_T, CUBLAS_OP_N, (int)N, (int)T, (int)K, &one, w,
                            CUDA_R_16BF, (int)K, a, CUDA_R_16BF, (int)K, &zero, out, CUDA_R_32F,
                            (int)N, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
               what);
    return EPMOE_OK;
}

epmoe_status epmoe_cuda_shared_forward(cublasHandle_t cublas, void *cublas_workspace,
                                       size_t cublas_workspace_bytes, const float *x, int64_t T,
                                       int64_t H, int64_t Is, const uint16_t *w13_bf16,
                                       const uint16_t *w2_bf16, const epmoe_cuda_swiglu_act *act,
                                       const epmoe_cuda_shared_scratch *scratch, float *y,
                                       cudaStream_t stream) {
    EPMOE_REQUIRE(T >= 0 && H > 0 && Is > 0 && T < INT32_MAX && 2 * Is < INT32_MAX,
                  EPMOE_ERR_INVALID_ARG, "shared expert: bad shape T=%lld H=%lld Is=%lld",
                  (long long)T, (long long)H, (long long)Is);
    if (T == 0) return EPMOE_OK;
    CUBLAS_TRY(cublasSetStream(cublas, stream), "binding the shared expert's stream");
    CUBLAS_TRY(cublasSetWorkspace(cublas, cublas_workspace, cublas_workspace_bytes),
               "binding cuBLAS to the arena's workspace (needed for graph capture)");
    const int64_t S = EPMOE_SHARED_CHUNK_ROWS, Ts = (T + S - 1) / S * S;
    /* rows [T, Ts) of the last chunk are zeros (finite): their results are never read */
    CUDA_TRY(cudaMemsetAsync(scratch->x_bf16 + (size_t)(T * H), 0, (size_t)((Ts - T) * H) * 2,
                             stream),
             "clearing the shared expert's padding rows");
    EPMOE_TRY(epmoe_cuda_f32_to_bf16(x, (size_t)(T * H), scratch->x_bf16, stream));
    for (int64_t r = 0; r < Ts; r += S)
        EPMOE_TRY(gemm_bf16_nt(cublas, scratch->x_bf16 + (size_t)(r * H), w13_bf16, S, 2 * Is, H,
                               scratch->h + (size_t)(r * 2 * Is),
                               "shared expert x . w13^T (bf16, fp32 accumulation)"));
    EPMOE_TRY(epmoe_cuda_swiglu(scratch->h, Ts, Is, act, NULL, NULL, NULL, 0, Is, NULL,
                                scratch->a_bf16, stream));
    for (int64_t r = 0; r < Ts; r += S)
        EPMOE_TRY(gemm_bf16_nt(cublas, scratch->a_bf16 + (size_t)(r * Is), w2_bf16, S, H, Is,
                               y + (size_t)(r * H),
                               "shared expert a . w2^T (bf16, fp32 accumulation)"));
    return EPMOE_OK;
}
