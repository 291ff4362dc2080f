/* A -> its exact bf16 copy in one of the Hopper GEMM kernels' K orders (the orders are defined
 * in gemm_sm90_common.cuh, AOrder), from NVFP4 A or from FP8 A. Run once per GEMM call by the
 * kernels that read the copy instead of converting A once per weight tile (wgmma, streaming
 * decode; with FP8 A every kernel of the sm_90 path). */
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/fp8_math.cuh"
#include "kernels/cuda/gemm_sm90_common.cuh"
#include "kernels/cuda/ops_cuda.h"

using namespace epmoe_sm90;

namespace {

/* bf16 bits of e4m3 * 2^exp2 (exact: 4 significant bits, a normal bf16 by the exponent floor
 * of common/fp8.h). */
__device__ __forceinline__ uint32_t fp8_bf16_bits(uint8_t code, int exp2) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(ldexpf(epmoe_e4m3_value_dev(code), exp2)));
}

/* One 128-k step of a row as bf16 pairs o[span t][word q][pair m]: elements 32t + 8q + m (low
 * half) and + 4 (high half), the order dequant8 gives the NVFP4 codes of a word in. */
template <bool kFp8>
__device__ __forceinline__ void step_pairs(const GemmParams &p, int64_t row, int step,
                                           int fp8_exp_offset, uint32_t (&o)[4][4][4]) {
    const int K = p.K;
    if (kFp8) {
        const uint8_t *codes = p.a_codes + row * K + step * kStepK;
        const int exp2 = (int)p.a_sf[row * (K / kStepK) + step] - 127 + fp8_exp_offset;
#pragma unroll
        for (int t = 0; t < 4; ++t)
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                const uint2 w = *(const uint2 *)(codes + 32 * t + 8 * q);
                const uint32_t lo = w.x, hi = w.y; /* elements 0-3, 4-7 of the word */
#pragma unroll
                for (int m = 0; m < 4; ++m)
                    o[t][q][m] = fp8_bf16_bits((uint8_t)(lo >> (8 * m)), exp2) |
                                 fp8_bf16_bits((uint8_t)(hi >> (8 * m)), exp2) << 16;
            }
        return;
    }
    const uint8_t *codes = p.a_codes + row * (K / 2) + step * 64;
    const uint8_t *sf = p.a_sf + row * (K / 16) + step * 8;
#pragma unroll
    for (int t = 0; t < 4; ++t) {
        const uint4 w = *(const uint4 *)(codes + 16 * t);
        const uint32_t sf2 = *(const uint16_t *)(sf + 2 * t);
#pragma unroll
        for (int q = 0; q < 4; ++q)
            dequant8(word_of(w, q), sf_to_bf16x2(q < 2 ? (sf2 & 0xFFu) : (sf2 >> 8)), o[t][q]);
    }
}

/* One warp per row, lanes over the row's 128-k steps (each lane writes its step's 256 bytes).
 * Live rows only. Launch shape from cap_rows only. */
template <AOrder kOrder, bool kFp8>
__global__ void __launch_bounds__(256) a_rows_to_bf16_kernel(const GemmParams p) {
    prepass_let_next_launch(); /* the GEMM's work list and first weight loads need none of this */
    const int lane = threadIdx.x % 32;
    const int64_t warps = (int64_t)gridDim.x * blockDim.x / 32;
    const int K = p.K, steps = K / kStepK;
    for (int64_t row = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) / 32; row < p.cap_rows;
         row += warps) {
        if (epmoe_cuda_expert_of_real_row(p.padded_offsets, p.tokens_per_expert, p.E, row) < 0)
            continue; /* padding, or past the layout */
        for (int step = lane; step < steps; step += 32) {
            uint32_t o[4][4][4]; /* [span t][word q][pair m] */
            /* the 2^-8 of kDequantFix, except in the plain order, which the mma.sync kernels
             * read as bf16 A (unscaled) */
            step_pairs<kFp8>(p, row, step, kOrder == kOrderPlain ? 0 : -8, o);
#pragma unroll
            for (int c = 0; c < 16; ++c) {
                const int q = c / 4, x = c % 4; /* x: pair m (slices) or span t (fragments) */
                uint4 v;
                if (kOrder == kOrderPlain) { /* chunk c: elements 8c .. 8c+7 in order */
                    const uint32_t(&w)[4] = o[c / 4][c % 4]; /* span c/4, word c%4 */
                    v = make_uint4(__byte_perm(w[0], w[1], 0x5410), __byte_perm(w[2], w[3], 0x5410),
                                   __byte_perm(w[0], w[1], 0x7632), __byte_perm(w[2], w[3], 0x7632));
                } else if (kOrder == kOrderFragments) {
                    v = make_uint4(o[x][q][0], o[x][q][1], o[x][q][2], o[x][q][3]);
                } else {
                    v = make_uint4(o[0][q][x], o[1][q][x], o[2][q][x], o[3][q][x]);
                }
                const int64_t offset = kOrder == kOrderTileImage
                                           ? a_tile_image_offset(row, step, c, p.cap_rows)
                                           : (row * K + step * kStepK) * 2 + 16 * c;
                *(uint4 *)((uint8_t *)p.a_ws + offset) = v;
            }
        }
    }
}

template <bool kFp8>
void launch_order(const GemmParams &p, AOrder order, unsigned grid, cudaStream_t stream) {
    if (order == kOrderSlices)
        a_rows_to_bf16_kernel<kOrderSlices, kFp8><<<grid, 256, 0, stream>>>(p);
    else if (order == kOrderFragments)
        a_rows_to_bf16_kernel<kOrderFragments, kFp8><<<grid, 256, 0, stream>>>(p);
    else if (order == kOrderTileImage)
        a_rows_to_bf16_kernel<kOrderTileImage, kFp8><<<grid, 256, 0, stream>>>(p);
    else
        a_rows_to_bf16_kernel<kOrderPlain, kFp8><<<grid, 256, 0, stream>>>(p);
}

} // namespace

epmoe_status epmoe_sm90::epmoe_a_rows_to_bf16_launch(const GemmParams &p, AOrder order,
                                                     cudaStream_t stream) {
    EPMOE_REQUIRE(order != kOrderPlain || p.a_fp8, EPMOE_ERR_INTERNAL,
                  "the plain bf16 order is made from FP8 A only");
    /* 8 rows (warps) per block, 2 blocks per SM at most (a grid-stride loop over the rows):
     * 512 threads leave room on every SM for the GEMM block launched after it
     * (launch_after_prepass) to start its set-up while this runs. Measured faster than 8
     * blocks per SM at every batch size (docs/perf-history.md §2) */
    unsigned grid = 0;
    EPMOE_TRY(persistent_grid(2, (p.cap_rows + 7) / 8, &grid));
    if (p.a_fp8)
        launch_order<true>(p, order, grid, stream);
    else
        launch_order<false>(p, order, grid, stream);
    CUDA_TRY_LAUNCH("A -> bf16 into the grouped GEMM's workspace");
    return EPMOE_OK;
}
