/* NVFP4 A -> its exact bf16 copy in one of the Hopper GEMM kernels' K orders (the orders are
 * defined in gemm_sm90_common.cuh, AOrder). Run once per GEMM call by the kernels that read the
 * copy instead of dequantizing A once per weight tile (wgmma, streaming decode). */
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/gemm_sm90_common.cuh"
#include "kernels/cuda/ops_cuda.h"

using namespace epmoe_sm90;

namespace {

/* One warp per row, lanes over the row's 128-k steps (coalesced 64-byte code reads, each lane
 * writes its step's 256 bytes). Live rows only. Launch shape from cap_rows only. */
template <AOrder kOrder>
__global__ void __launch_bounds__(256) nvfp4_rows_to_bf16_kernel(const GemmParams p) {
    prepass_let_next_launch(); /* the GEMM's work list and first weight loads need none of this */
    const int lane = threadIdx.x % 32;
    const int64_t warps = (int64_t)gridDim.x * blockDim.x / 32;
    const int K = p.K, steps = K / kStepK;
    for (int64_t row = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) / 32; row < p.cap_rows;
         row += warps) {
        if (epmoe_cuda_expert_of_real_row(p.padded_offsets, p.tokens_per_expert, p.E, row) < 0)
            continue; /* padding, or past the layout */
        for (int step = lane; step < steps; step += 32) {
            const uint8_t *codes = p.a_codes + row * (K / 2) + step * 64;
            const uint8_t *sf = p.a_sf + row * (K / 16) + step * 8;
            uint32_t o[4][4][4]; /* [span t][word q][pair m] */
#pragma unroll
            for (int t = 0; t < 4; ++t) {
                const uint4 w = *(const uint4 *)(codes + 16 * t);
                const uint32_t sf2 = *(const uint16_t *)(sf + 2 * t);
#pragma unroll
                for (int q = 0; q < 4; ++q)
                    dequant8(word_of(w, q), sf_to_bf16x2(q < 2 ? (sf2 & 0xFFu) : (sf2 >> 8)), o[t][q]);
            }
#pragma unroll
            for (int c = 0; c < 16; ++c) {
                const int q = c / 4, x = c % 4; /* x: pair m (slices) or span t (fragments) */
                const uint4 v = kOrder == kOrderFragments
                                    ? make_uint4(o[x][q][0], o[x][q][1], o[x][q][2], o[x][q][3])
                                    : make_uint4(o[0][q][x], o[1][q][x], o[2][q][x], o[3][q][x]);
                const int64_t offset = kOrder == kOrderTileImage
                                           ? a_tile_image_offset(row, step, c, p.cap_rows)
                                           : (row * K + step * kStepK) * 2 + 16 * c;
                *(uint4 *)((uint8_t *)p.a_ws + offset) = v;
            }
        }
    }
}

} // namespace

epmoe_status epmoe_sm90::epmoe_nvfp4_rows_to_bf16_launch(const GemmParams &p, AOrder order,
                                                         cudaStream_t stream) {
    /* 8 rows (warps) per block, 2 blocks per SM at most (a grid-stride loop over the rows):
     * 512 threads leave room on every SM for the GEMM block launched after it
     * (launch_after_prepass) to start its set-up while this runs. Measured faster than 8
     * blocks per SM at every batch size (docs/perf-history.md §2) */
    unsigned grid = 0;
    EPMOE_TRY(persistent_grid(2, (p.cap_rows + 7) / 8, &grid));
    if (order == kOrderSlices)
        nvfp4_rows_to_bf16_kernel<kOrderSlices><<<grid, 256, 0, stream>>>(p);
    else if (order == kOrderFragments)
        nvfp4_rows_to_bf16_kernel<kOrderFragments><<<grid, 256, 0, stream>>>(p);
    else
        nvfp4_rows_to_bf16_kernel<kOrderTileImage><<<grid, 256, 0, stream>>>(p);
    CUDA_TRY_LAUNCH("NVFP4 A -> bf16 into the grouped GEMM's workspace");
    return EPMOE_OK;
}
