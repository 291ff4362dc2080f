/* Row-major NVFP4 weights -> the step-major slab layout the Hopper GEMM kernels read fastest.
 * The layout is defined in grouped_gemm.h (epmoe_cuda_weights_to_slabs); the kernels find a
 * row's bytes in it with weight_walk (gemm_sm90_common.cuh), and each code word's bits in the
 * slab bit order (slab_code_word, same header). Run once, when a layer's weights are uploaded. */
#include <cuda_runtime.h>
#include <stdint.h>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/gemm_sm90_common.cuh"
#include "kernels/cuda/grouped_gemm.h"

using epmoe_sm90::slab_code_word;

namespace {

/* One thread per 16-byte destination unit of the codes; coalesced writes, 16-byte reads. */
__global__ void codes_to_slabs_kernel(const uint4 *codes, int64_t units, int steps, int64_t row_bytes,
                                      uint4 *slab_codes) {
    for (int64_t u = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; u < units;
         u += (int64_t)gridDim.x * blockDim.x) {
        const int64_t block = u / 128; /* (slab, step): 2048 bytes */
        const int within = (int)(u % 128), r = within / 32, g = (within % 32) / 4, t = within % 4;
        const int64_t slab = block / steps;
        const int step = (int)(block % steps);
        const int64_t row = slab * EPMOE_GEMM_SLAB_ROWS + g + 8 * r;
        const uint4 v = codes[(row * row_bytes + step * 64 + 16 * t) / 16];
        slab_codes[u] = make_uint4(slab_code_word(v.x), slab_code_word(v.y), slab_code_word(v.z),
                                   slab_code_word(v.w));
    }
}

/* One thread per row's 8 scale bytes of a step. */
__global__ void sf_to_slabs_kernel(const uint2 *sf, int64_t units, int steps, int64_t row_bytes,
                                   uint2 *slab_sf) {
    for (int64_t u = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; u < units;
         u += (int64_t)gridDim.x * blockDim.x) {
        const int64_t block = u / EPMOE_GEMM_SLAB_ROWS; /* (slab, step): 256 bytes */
        const int i = (int)(u % EPMOE_GEMM_SLAB_ROWS);
        const int64_t row = (block / steps) * EPMOE_GEMM_SLAB_ROWS + i;
        const int step = (int)(block % steps);
        slab_sf[u] = sf[(row * row_bytes + step * 8) / 8];
    }
}

} // namespace

extern "C" epmoe_status epmoe_cuda_weights_to_slabs(const uint8_t *codes, const uint8_t *sf,
                                                    int64_t rows, int64_t K, uint8_t *slab_codes,
                                                    uint8_t *slab_sf, cudaStream_t stream) {
    EPMOE_REQUIRE(codes && sf && slab_codes && slab_sf, EPMOE_ERR_INVALID_ARG,
                  "weights to slabs: NULL buffer");
    EPMOE_REQUIRE(rows >= 0 && rows % EPMOE_GEMM_SLAB_ROWS == 0, EPMOE_ERR_INVALID_ARG,
                  "weights to slabs: %lld rows, must be a multiple of %d", (long long)rows,
                  EPMOE_GEMM_SLAB_ROWS);
    EPMOE_REQUIRE(K >= 128 && K % 128 == 0 && K <= (1 << 20), EPMOE_ERR_INVALID_ARG,
                  "weights to slabs: K = %lld, must be a positive multiple of 128", (long long)K);
    EPMOE_REQUIRE(((uintptr_t)codes & 15) == 0 && ((uintptr_t)slab_codes & 15) == 0 &&
                      ((uintptr_t)sf & 7) == 0 && ((uintptr_t)slab_sf & 7) == 0,
                  EPMOE_ERR_INVALID_ARG,
                  "weights to slabs: codes must be 16-byte aligned and scales 8-byte aligned");
    if (rows == 0) return EPMOE_OK;
    const int steps = (int)(K / 128);
    const int64_t code_units = rows * K / 32, sf_units = rows * (K / 128);
    codes_to_slabs_kernel<<<4096, 256, 0, stream>>>((const uint4 *)codes, code_units, steps, K / 2,
                                                    (uint4 *)slab_codes);
    CUDA_TRY_LAUNCH("weight codes to the slab layout");
    sf_to_slabs_kernel<<<1024, 256, 0, stream>>>((const uint2 *)sf, sf_units, steps, K / 16,
                                                 (uint2 *)slab_sf);
    CUDA_TRY_LAUNCH("weight scales to the slab layout");
    return EPMOE_OK;
}
