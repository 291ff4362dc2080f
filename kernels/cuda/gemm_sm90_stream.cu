/* Streaming decode grouped GEMM (any sm_80+ device; Hopper is what it is tuned on): the decode
 * kernel for NVFP4 A at <= 16 rows per expert when the caller gives the bf16 workspace.
 * Contract in grouped_gemm.h; dequantization and K order in gemm_sm90_common.cuh.
 *
 * Why a second decode kernel. The shared-memory kernel (gemm_sm90.cu) stages every 128-k step
 * of weights and tokens through shared memory behind a block barrier, 12 warps per SM. Here
 * nothing is shared between warps and there is no barrier after the work list is built:
 *   - each warp owns one (token chunk, 32 weight rows) work item at a time and streams its
 *     weight rows global -> registers (16-byte loads that bypass L1, kDepth steps in flight);
 *     in the slab layout (grouped_gemm.h) one step of the warp's rows is 2 KB contiguous;
 *   - the token operand is the workspace copy of A in fragment order (prepass), so one
 *     16-byte load per (8 token rows, word q) is a thread's whole B operand of two k16
 *     slices; the warps of a block work on neighbouring weight rows of the same chunk, so
 *     those loads hit L1 after the first warp.
 * The MMAs see the same k16 slices in the same order as every other Hopper kernel, so the
 * output bits are the same (test_gemm checks it). */
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/gemm_sm90_common.cuh"

using namespace epmoe_sm90;

namespace {

/* Weights are read once: keep them out of L1 (the tokens live there). */
__device__ __forceinline__ uint4 ld_stream16(const void *ptr) {
    uint4 r;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
                 : "l"(ptr));
    return r;
}
__device__ __forceinline__ uint32_t ld_stream_u16(const void *ptr) {
    uint32_t r;
    asm volatile("ld.global.nc.L1::no_allocate.u16 %0, [%1];" : "=r"(r) : "l"(ptr));
    return r;
}
/* Token fragments are read by every warp working on the chunk: through L1. */
__device__ __forceinline__ uint4 ld_token16(const void *ptr) {
    uint4 r;
    asm volatile("ld.global.nc.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
                 : "l"(ptr));
    return r;
}

/* MT token rows per chunk; NWARPS warps per block (independent); kDepth steps of weights in
 * flight per warp; kSlabs: the weights are in the slab layout and its bit order. */
template <int MT, int NWARPS, int kDepth, int kMinBlocks, bool kSlabs>
__global__ void __launch_bounds__(NWARPS * 32, kMinBlocks)
    grouped_gemm_stream_kernel(const GemmParams p) {
    constexpr int kNT8 = MT / 8;
    __shared__ int chunk_start[kMaxExperts + 1];

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane / 4, t = lane % 4;
    const int E = p.E, N = p.N, K = p.K;
    const int steps = K / kStepK;

    build_chunk_list<MT>(p, chunk_start);
    const int n_slabs = N / 32; /* N is a multiple of 32 (checked) */
    const int total = chunk_start[E] * n_slabs;
    const float fix = kDequantFix * kDequantFix;

    for (int item = blockIdx.x * NWARPS + warp; item < total; item += gridDim.x * NWARPS) {
        const int chunk = item / n_slabs, slab = item % n_slabs;
        const Chunk ck = find_chunk<MT>(p, chunk_start, chunk);
        const int e = ck.e, mrows = ck.mrows;
        const int64_t row0 = ck.row0;
        const int n_warp = slab * 32;
        const int live_c = (mrows + 7) / 8; /* n8 token tiles with live rows */

        /* rows g + 8r of the slab, span t (either layout); the span's scale bytes 2t, 2t+1 */
        const WeightWalk walk = weight_walk(p, e, n_warp + g, t);
        const uint8_t *wc = p.w_codes + walk.code, *ws = p.w_sf + walk.sf + 2 * t;
        /* token row c*8 + g, fragment chunk 4q + t of each 256-byte step. Rows past mrows in
         * the last tile are padding or the next chunk's rows: inside the padded layout, and
         * their products land in accumulators the epilogue never writes. */
        const uint8_t *tk = (const uint8_t *)p.a_ws + (row0 + g) * (int64_t)K * 2 + 16 * t;
        const int64_t tk_row8 = 8 * (int64_t)K * 2;

        auto load = [&](int step, uint4 (&w)[4], uint32_t (&s)[4]) {
            if (step < steps) {
#pragma unroll
                for (int r = 0; r < 4; ++r) {
                    w[r] = ld_stream16(wc + r * walk.code_row8 + step * walk.code_step);
                    s[r] = ld_stream_u16(ws + r * walk.sf_row8 + step * walk.sf_step);
                }
            }
        };

        float acc[2][kNT8][4];
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
            for (int c = 0; c < kNT8; ++c)
#pragma unroll
                for (int v = 0; v < 4; ++v) acc[i][c][v] = 0.0f;

        auto compute = [&](int step, const uint4 (&w)[4], const uint32_t (&s)[4]) {
            /* B of slices 2q, 2q+1 per n8 tile; word q+1's loads are issued before word q's
             * MMAs */
            uint4 bv[kNT8], bv_next[kNT8];
            auto load_b = [&](int q, uint4 (&b)[kNT8]) {
#pragma unroll
                for (int c = 0; c < kNT8; ++c)
                    if (c < live_c) b[c] = ld_token16(tk + c * tk_row8 + step * 256 + q * 64);
            };
            load_b(0, bv);
            uint32_t S[4][2];
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                S[r][0] = sf_to_bf16x2(s[r] & 0xFFu);
                S[r][1] = sf_to_bf16x2(s[r] >> 8);
            }
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                if (q + 1 < 4) load_b(q + 1, bv_next);
                uint32_t A[2][2][4]; /* [m16 tile][k16 slice][fragment] */
#pragma unroll
                for (int i = 0; i < 2; ++i)
                    weight_fragments<kSlabs>(word_of(w[2 * i], q), S[2 * i][q / 2],
                                             word_of(w[2 * i + 1], q), S[2 * i + 1][q / 2], A[i]);
#pragma unroll
                for (int c = 0; c < kNT8; ++c) {
                    if (c < live_c) {
#pragma unroll
                        for (int i = 0; i < 2; ++i) {
                            mma_bf16_16816(acc[i][c], A[i][0], bv[c].x, bv[c].y);
                            mma_bf16_16816(acc[i][c], A[i][1], bv[c].z, bv[c].w);
                        }
                    }
                }
#pragma unroll
                for (int c = 0; c < kNT8; ++c) bv[c] = bv_next[c];
            }
        };

        /* a ring of kDepth register stages, indexed statically by unrolling d */
        uint4 wb[kDepth][4];
        uint32_t sb[kDepth][4];
#pragma unroll
        for (int d = 0; d < kDepth; ++d) load(d, wb[d], sb[d]);
        for (int step0 = 0; step0 < steps; step0 += kDepth) {
#pragma unroll
            for (int d = 0; d < kDepth; ++d) {
                const int step = step0 + d;
                if (step < steps) {
                    compute(step, wb[d], sb[d]);
                    load(step + kDepth, wb[d], sb[d]);
                }
            }
        }

        store_warp_tile<kNT8>(p, acc, e, n_warp, row0, mrows, fix, g, t);
    }
}

template <int MT, int NWARPS, int kDepth, int kMinBlocks, bool kSlabs>
epmoe_status launch_stream(const GemmParams &p, cudaStream_t stream) {
    auto kernel = grouped_gemm_stream_kernel<MT, NWARPS, kDepth, kMinBlocks, kSlabs>;
    int per_sm = 0;
    CUDA_TRY(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, NWARPS * 32, 0),
             "streaming grouped GEMM occupancy");
    if (per_sm < 1)
        EPMOE_FAIL(EPMOE_ERR_CUDA, "streaming grouped GEMM MT=%d does not fit on an SM", MT);
    /* one work item per warp: never more warps than the largest possible work list */
    const int64_t max_items = (p.cap_rows / MT + p.E) * (p.N / 32);
    unsigned grid = 0;
    EPMOE_TRY(persistent_grid(per_sm, (max_items + NWARPS - 1) / NWARPS, &grid));
    EPMOE_TRY(epmoe_nvfp4_rows_to_bf16_launch(p, kOrderFragments, stream));
    kernel<<<grid, NWARPS * 32, 0, stream>>>(p);
    CUDA_TRY_LAUNCH("grouped NVFP4 GEMM (streaming decode)");
    return EPMOE_OK;
}

} // namespace

epmoe_status epmoe_sm90::epmoe_gemm_sm90_stream_launch(const GemmParams &p, cudaStream_t stream) {
    /* 16-token chunks, two steps of weights in flight per warp, 128 registers: 16 warps per SM.
     * (An MT=32 instance at 168 registers, 12 warps per SM, lost to the shared-memory kernel
     * at 32 rows by 1.2x on the H100: bench/RESULTS.md v5.) */
    return p.w_slabs ? launch_stream<16, 8, 2, 2, true>(p, stream)
                     : launch_stream<16, 8, 2, 2, false>(p, stream);
}
