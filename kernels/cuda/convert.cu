/* Host-format rows to and from the fp32 the layer computes in, on the device: a batch crosses
 * PCIe once in its own dtype (half the bytes of fp32 for bf16/f16). Conversions are exact
 * (bf16/f16 -> fp32) or round to nearest even (fp32 -> bf16/f16), as the CPU's
 * epmoe_convert_from_f32, so both backends write the same bits for the same fp32 values. */
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/ops_cuda.h"

static unsigned grid_for(size_t n) {
    size_t blocks = (n + 255) / 256;
    return (unsigned)(blocks > 65535 ? 65535 : (blocks ? blocks : 1));
}

__global__ void rows_to_f32_kernel(const void *x, int dtype, size_t n, float *out,
                                   unsigned long long *first_bad) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        float v;
        if (dtype == EPMOE_DTYPE_BF16)
            v = __bfloat162float(((const __nv_bfloat16 *)x)[i]);
        else if (dtype == EPMOE_DTYPE_F16)
            v = __half2float(((const __half *)x)[i]);
        else
            v = ((const float *)x)[i];
        out[i] = v;
        if (!isfinite(v)) atomicMin(first_bad, (unsigned long long)i);
    }
}

__global__ void rows_from_f32_kernel(const float *y, size_t n, int dtype, void *out,
                                     unsigned long long *first_bad) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        const float v = y[i];
        int overflow = 0;
        if (dtype == EPMOE_DTYPE_BF16) {
            const __nv_bfloat16 b = __float2bfloat16_rn(v);
            ((__nv_bfloat16 *)out)[i] = b;
            overflow = isinf(__bfloat162float(b)) && isfinite(v);
        } else if (dtype == EPMOE_DTYPE_F16) {
            const __half h = __float2half_rn(v);
            ((__half *)out)[i] = h;
            overflow = isinf(__half2float(h)) && isfinite(v);
        } else {
            ((float *)out)[i] = v;
        }
        if (overflow || !isfinite(v)) atomicMin(first_bad, (unsigned long long)i);
    }
}

__global__ void expert_histogram_kernel(const int32_t *ids, int64_t n, int64_t E,
                                        unsigned long long *counts) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        const int32_t e = ids[i];
        if (e >= 0 && e < E) atomicAdd(&counts[e], 1ull);
    }
}

static epmoe_status check_dtype(epmoe_dtype dtype) {
    EPMOE_REQUIRE(dtype == EPMOE_DTYPE_F32 || dtype == EPMOE_DTYPE_BF16 ||
                      dtype == EPMOE_DTYPE_F16,
                  EPMOE_ERR_INVALID_ARG, "rows of dtype %d: expected F32, BF16 or F16",
                  (int)dtype);
    return EPMOE_OK;
}

epmoe_status epmoe_cuda_rows_to_f32(const void *x, epmoe_dtype dtype, size_t n, float *out,
                                    unsigned long long *first_bad, cudaStream_t stream) {
    EPMOE_TRY(check_dtype(dtype));
    if (n == 0) return EPMOE_OK;
    rows_to_f32_kernel<<<grid_for(n), 256, 0, stream>>>(x, (int)dtype, n, out, first_bad);
    CUDA_TRY_LAUNCH("rows_to_f32_kernel");
    return EPMOE_OK;
}

epmoe_status epmoe_cuda_rows_from_f32(const float *y, size_t n, epmoe_dtype dtype, void *out,
                                      unsigned long long *first_bad, cudaStream_t stream) {
    EPMOE_TRY(check_dtype(dtype));
    if (n == 0) return EPMOE_OK;
    rows_from_f32_kernel<<<grid_for(n), 256, 0, stream>>>(y, n, (int)dtype, out, first_bad);
    CUDA_TRY_LAUNCH("rows_from_f32_kernel");
    return EPMOE_OK;
}

epmoe_status epmoe_cuda_expert_histogram(const int32_t *ids, int64_t n, int64_t E,
                                         unsigned long long *counts, cudaStream_t stream) {
    if (n == 0) return EPMOE_OK;
    expert_histogram_kernel<<<grid_for((size_t)n), 256, 0, stream>>>(ids, n, E, counts);
    CUDA_TRY_LAUNCH("expert_histogram_kernel");
    return EPMOE_OK;
}
