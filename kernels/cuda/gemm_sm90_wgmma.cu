/* Grouped NVFP4 GEMM for Hopper with wgmma (sm_90a): the prefill kernel. Contract in
 * kernels/cuda/grouped_gemm.h; dequantization and K order in gemm_sm90_common.cuh.
 *
 * Same operand order as the mma.sync kernel (gemm_sm90.cu): weights are the M side, tokens the
 * N side. Two launches:
 *   1. epmoe_a_rows_to_bf16_launch (gemm_sm90_prepass.cu): every live NVFP4 A row -> exact
 *      bf16, in the slice order, into the caller's workspace (once, instead of once per weight
 *      tile that meets the row).
 *   2. grouped_gemm_wgmma_kernel, per work item (one expert, a chunk of up to 128 token rows,
 *      256 weight rows), per step of 128 along K:
 *        weights: global -> shared (cp.async) -> registers -> exact bf16 pairs = wgmma's A
 *                 operand straight from registers (one m64 tile per warpgroup, four
 *                 warpgroups: 16 warps per SM to cover the dequantization latency)
 *        tokens:  bf16 workspace -> shared (cp.async, each 16-byte chunk at its place in
 *                 wgmma's K-major 128-byte-swizzled layout) = wgmma's B operand (n = 128)
 * wgmma runs asynchronously: the next 32 k of weights are dequantized on the CUDA cores while
 * the tensor cores work, which the mma.sync kernel cannot do (its dequantization and MMAs share
 * the issue slots and wait on each other).
 *
 * Bits. Each k16 slice holds the same k values, in the same pairs, as the mma.sync kernel's,
 * and slices are accumulated in the same order; tests/gpu/test_gemm.cu checks that the two
 * kernels' outputs agree bit for bit, which keeps the engine's results independent of which
 * kernel a batch shape selects (and so of the rank count).
 *
 * Compiled for sm_90a only (wgmma does not exist elsewhere); in other architectures' passes the
 * kernel bodies are empty and epmoe_gemm_sm90_wgmma_compiled() reports whether this binary
 * holds the sm_90a code. */
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/gemm_sm90_common.cuh"
#include "kernels/cuda/sm90a_async.cuh"

using namespace epmoe_sm90;

namespace {

constexpr int kSwizzleRowBytes = 128; /* one 64-k half of a token row: the swizzle width */

/* Shared-memory plan (bytes from a 1024-aligned base): kStages stages, each a bf16 token tile
 * (two 64-k halves of MT rows x 128 B, 1024-aligned: the swizzle pattern repeats every 8 rows
 * x 128 B) followed by the weight rows (BN x 64 code bytes, then BN x 8 scale bytes).
 * MMAs stay in flight across the step barrier, so a stage is refilled only two steps after
 * its last MMAs were issued: every warpgroup has waited for those before it arrives at the
 * barrier (kAhead = kStages - 2 steps are prefetched). */
template <int MT, int WT, int NWG, int kStages>
struct WgmmaPlan {
    static constexpr int kBN = NWG * WT * 64;
    static constexpr int kTileHalf = MT * kSwizzleRowBytes;
    static constexpr int kTile = 2 * kTileHalf;
    static constexpr int kWStage = kBN * (64 + 8);
    static constexpr int kStage = kTile + kWStage;
    static constexpr int kAhead = kStages - 2;
    static constexpr int kBytes = kStages * kStage + 1024; /* + alignment slack */
    static_assert(kStage % 1024 == 0, "token tiles must stay 1024-aligned");
    static_assert(kAhead >= 1, "the pipeline prefetches at least one step");
};

/* MT token rows per chunk (wgmma N), WT m64 weight tiles per warpgroup, NWG warpgroups; kSlabs:
 * the weights are in the slab layout and its bit order. */
template <int MT, int WT, int NWG, int kStages, bool kSlabs>
__global__ void __launch_bounds__(NWG * 128, 1) grouped_gemm_wgmma_kernel(const GemmParams p) {
#if EPMOE_WGMMA_DEVICE
    using Plan = WgmmaPlan<MT, WT, NWG, kStages>;
    constexpr int kThreads = NWG * 128;
    constexpr int kBN = Plan::kBN;
    constexpr int kRows = 2 * WT; /* weight rows per thread: rows g and g+8 of each m64 tile */
    /* 16-byte token chunks per thread and stage; 16 consecutive threads copy one row's 256
     * bytes (coalesced), and the 8 of a 16-byte access phase land in 8 distinct swizzled
     * columns (no bank conflicts) */
    constexpr int kUnits = MT * 16 / kThreads;
    static_assert(MT == 128, "the wgmma wrapper is m64n128k16");
    static_assert((MT * 16) % kThreads == 0, "token staging must divide evenly");

    extern __shared__ __align__(1024) uint8_t smem_raw[];
    __shared__ int chunk_start[kMaxExperts + 1];
    uint8_t *smem = smem_align_1024(smem_raw);
    const uint32_t smem_base = smem_u32(smem);

    const int wg = threadIdx.x / 128, wi = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
    const int g = lane / 4, t = lane % 4;
    const int E = p.E, N = p.N, K = p.K;
    const int steps = K / kStepK;

    build_chunk_list<MT>(p, chunk_start);
    const int n_tiles = (N + kBN - 1) / kBN;
    const int total = chunk_start[E] * n_tiles;
    const float fix = kDequantFix * kDequantFix;

    /* this thread's weight rows inside a block tile (r = 2i + half: m64 tile i, row g + 8*half) */
    int lrow[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) lrow[r] = wg * WT * 64 + 64 * (r / 2) + 16 * wi + g + 8 * (r % 2);

    for (int item = blockIdx.x; item < total; item += gridDim.x) {
        const int chunk = item / n_tiles, nt = item % n_tiles;
        const Chunk ck = find_chunk<MT>(p, chunk_start, chunk);
        const int e = ck.e, mrows = ck.mrows;
        const int64_t row0 = ck.row0;
        const int n0 = nt * kBN;

        const uint8_t *a_rows = (const uint8_t *)p.a_ws + row0 * (int64_t)K * 2;

        /* One stage: this thread's weight rows (16 code bytes each; quad leader t == 0 also the
         * row's 8 scale bytes) and its 16-byte chunks of the bf16 token rows, each stored at its
         * swizzled place in the tile (chunk c of a 256-byte row step -> half c/8, column
         * (c%8) ^ (row%8)). Rows past N or past the chunk's live rows are copied from the last
         * valid row instead of being skipped: no branches in the loop, and their products land
         * in accumulators the epilogue never writes. */
        const int n_last = N - 1 - n0, tr_last = mrows - 1;
        const uint8_t *w_codes[kRows], *w_sf[kRows]; /* this thread's rows at step 0 */
        int code_step = 0, sf_step = 0;
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
            const WeightWalk walk = weight_walk<kSlabs>(p, e, n0 + min(lrow[r], n_last), t);
            w_codes[r] = p.w_codes + walk.code;
            w_sf[r] = p.w_sf + walk.sf;
            code_step = walk.code_step;
            sf_step = walk.sf_step;
        }
        auto issue_stage = [&](int step) {
            if (step < steps) {
                uint8_t *stage = smem + (step % kStages) * Plan::kStage;
                uint8_t *wst = stage + Plan::kTile;
#pragma unroll
                for (int r = 0; r < kRows; ++r) {
                    cp_async16(wst + lrow[r] * 64 + 16 * t, w_codes[r] + step * code_step);
                    if (t == 0) cp_async8(wst + kBN * 64 + lrow[r] * 8, w_sf[r] + step * sf_step);
                }
#pragma unroll
                for (int u = 0; u < kUnits; ++u) {
                    const int idx = threadIdx.x + u * kThreads;
                    const int tr = idx / 16, c = idx % 16;
                    cp_async16(stage + (c / 8) * Plan::kTileHalf + tr * kSwizzleRowBytes +
                                   (((c % 8) ^ (tr & 7)) << 4),
                               a_rows + min(tr, tr_last) * (K * 2) + step * 256 + c * 16);
                }
            }
            cp_async_commit(); /* always: keeps the group count equal to the step count */
        };

        float acc[WT][MT / 2];
#pragma unroll
        for (int i = 0; i < WT; ++i)
#pragma unroll
            for (int v = 0; v < MT / 2; ++v) acc[i][v] = 0.0f;

        __syncthreads(); /* the previous item's last reads of shared memory are done */
#pragma unroll
        for (int s = 0; s < Plan::kAhead; ++s) issue_stage(s);

        for (int step = 0; step < steps; ++step) {
            cp_async_wait<Plan::kAhead - 1>(); /* own copies of stage `step` landed */
            fence_proxy_async();               /* ... and visible to wgmma's reads */
            /* stage `step` complete for all; every warpgroup's MMAs of step-2 are done */
            __syncthreads();
            issue_stage(step + Plan::kAhead);
            const uint8_t *wst = smem + (step % kStages) * Plan::kStage + Plan::kTile;
            const uint32_t tile = smem_base + (step % kStages) * Plan::kStage;
            uint4 wq[kRows];
            uint32_t S[kRows][2];
#pragma unroll
            for (int r = 0; r < kRows; ++r) {
                wq[r] = *(const uint4 *)(wst + lrow[r] * 64 + 16 * t);
                const uint32_t sf2 = *(const uint16_t *)(wst + kBN * 64 + lrow[r] * 8 + 2 * t);
                sf_pair_to_bf16x2(sf2, S[r]);
            }
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                uint32_t A[WT][2][4]; /* [m64 tile][k16 slice 2q+s][fragment] */
                word_fragments<kSlabs, WT>(wq, S, q, A);
                wgmma_fence();
#pragma unroll
                for (int s = 0; s < 2; ++s) {
                    const int j = 2 * q + s; /* k16 slice of this step */
                    const uint64_t desc =
                        desc_k_major_sw128(tile + (j / 4) * Plan::kTileHalf + (j % 4) * 32);
#pragma unroll
                    for (int i = 0; i < WT; ++i) {
                        fence_operands(acc[i]);
                        wgmma_m64n128k16(acc[i], A[i][s], desc, 1);
                        fence_operands(acc[i]);
                    }
                }
                wgmma_commit();
                /* this warpgroup's slice pair q-1 is done: its A registers may be reused */
                wgmma_wait<1>();
            }
        }
        wgmma_wait<0>(); /* the accumulators are final */
#pragma unroll
        for (int i = 0; i < WT; ++i) fence_operands(acc[i]);
        cp_async_wait<0>();

        store_wgmma_tiles<WT, MT, (MT / 8 >= 4 ? 4 : MT / 8)>(p, acc, lrow, e, n0, row0, mrows, fix, t);
    }
#else
    (void)p;
#endif
}

constexpr int kMT = 128, kWT = 1, kNWG = 4, kStagesW = 4;

} // namespace

int epmoe_sm90::epmoe_gemm_sm90_wgmma_compiled(void) {
    return kernel_has_sm90_image(
        (const void *)grouped_gemm_wgmma_kernel<kMT, kWT, kNWG, kStagesW, false>);
}

epmoe_status epmoe_sm90::epmoe_gemm_sm90_wgmma_launch(const GemmParams &p, cudaStream_t stream) {
    auto kernel = p.w_slabs ? grouped_gemm_wgmma_kernel<kMT, kWT, kNWG, kStagesW, true>
                            : grouped_gemm_wgmma_kernel<kMT, kWT, kNWG, kStagesW, false>;
    using Plan = WgmmaPlan<kMT, kWT, kNWG, kStagesW>;
    const int smem_bytes = Plan::kBytes;
    CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes),
             "raising the wgmma grouped GEMM's shared-memory limit");
    /* one block per SM */
    const int64_t n_tiles = (p.N + Plan::kBN - 1) / Plan::kBN;
    unsigned grid = 0;
    EPMOE_TRY(persistent_grid(1, (p.cap_rows / kMT + p.E) * n_tiles, &grid));
    /* A operand: NVFP4 -> bf16 into the workspace, then the GEMM */
    EPMOE_TRY(epmoe_a_rows_to_bf16_launch(p, kOrderSlices, stream));
    kernel<<<grid, kNWG * 128, smem_bytes, stream>>>(p);
    CUDA_TRY_LAUNCH("grouped NVFP4 GEMM (sm_90a wgmma)");
    return EPMOE_OK;
}
