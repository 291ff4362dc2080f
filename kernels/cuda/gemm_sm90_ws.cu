/* Warp-specialized grouped NVFP4 GEMM for Hopper (sm_90a) on slab-layout weights: AUTO's
 * kernel from 17 rows per expert up (token chunks of MT = 32, 64 or 128 rows; a 16-row instance
 * exists for the tests and the benchmark). Contract in kernels/cuda/grouped_gemm.h;
 * dequantization and K order in gemm_sm90_common.cuh; the PTX wrappers in sm90a_async.cuh.
 *
 * Why a second wgmma kernel. The first (gemm_sm90_wgmma.cu) has every warp copy, dequantize and
 * issue MMAs, with a block barrier per 128-k step. Here the roles are split, as in CUTLASS's
 * warp-specialized mainloops:
 *   - one producer warp moves each stage with the bulk copy engine: lane j < 8 weight slab j
 *     (2 KB of codes, 256 B of scales: one 128-k step of 32 rows, contiguous in the slab
 *     layout), lane 31 the token tile (MT rows x 128 k of bf16, laid out by the pre-pass exactly
 *     as wgmma reads it, kOrderTileImage: one copy). Completion is counted in bytes on the
 *     stage's "full" mbarrier; no thread waits on a copy it issued.
 *   - two consumer warpgroups, 128 weight rows each (two m64 tiles): wait for a full stage,
 *     dequantize their weight rows from shared memory into wgmma's register A operand one k16
 *     slice at a time, issue m64nMTk16 MMAs against the token tile with three slices in
 *     flight, and release the stage on its "empty" mbarrier once its MMAs have completed. No
 *     block barrier in the main loop: the producer runs up to kStages - 2 steps ahead, across
 *     work items and across the consumers' epilogue.
 *
 * Work item: (expert, chunk of up to MT token rows, 256 weight rows). The k16 slices and their
 * order are those of every other Hopper kernel, so the output bits are theirs
 * (tests/gpu/test_gemm.cu and bench/gemm_bench.cu compare them). Only live rows and real
 * columns are written. bf16 output (out_bf16; the layer writes fp32) leaves through shared
 * memory in 16-byte stores (store_wgmma_tiles_bf16_staged; its speed is not measured: the
 * timed paths write fp32). A ping-pong instance (128-row items alternating between the
 * warpgroups, one's epilogue under the other's MMAs) measured slower, although one warpgroup
 * alone issues the MMA pattern nearly as fast as two (wgmma_probe); it loads the token tile
 * once per 128 weight rows instead of 256 and hands a turn over at every item
 * (docs/perf-history.md §4). */
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/gemm_sm90_common.cuh"
#include "kernels/cuda/sm90a_async.cuh"

using namespace epmoe_sm90;

namespace {

constexpr int kWsConsumerWGs = 2;
constexpr int kWsConsumerWarps = kWsConsumerWGs * 4;
constexpr int kWsConsumerThreads = kWsConsumerWarps * 32;
/* + a producer warpgroup (one warp of it works). Three warps per SM sub-partition would cap
 * every thread at 168 registers; setmaxnreg moves them: the producers drop to 40 so that each
 * consumer gets 232 (up to 128 accumulators, the staged weight words, four slices of A). */
constexpr int kWsThreads = kWsConsumerThreads + 128;
[[maybe_unused]] constexpr int kWsProducerRegs = 40, kWsConsumerRegs = 232;

/* MT token rows per chunk (the wgmma N); each consumer warpgroup owns kWT = 2 m64 weight tiles,
 * so an item is MT tokens x kBN = 256 weight rows (a 256-token instance with one tile per
 * warpgroup, half the dequantization per FLOP, measured no faster: docs/perf-history.md §4). One
 * stage in shared memory (from a 1024-aligned base): the token tile image (MT/8 groups of 8
 * rows x 2 KB), the weight codes (kSlabs x 2 KB, the slab layout's step unit) and scales
 * (kSlabs x 256 B). As many stages as fit in 220 KB: at decode sizes the weights are nearly
 * all of a stage, and the stages in flight are what keeps the DRAM busy. */
constexpr int kWT = 2;
template <int MT>
struct WsPlan {
    static constexpr int kBN = kWsConsumerWGs * kWT * 64;
    static constexpr int kSlabs = kBN / EPMOE_GEMM_SLAB_ROWS;
    static constexpr int kTile = MT * 256;
    static constexpr int kCodes = kSlabs * 2048;
    static constexpr int kSf = kSlabs * 256;
    static constexpr int kStage = kTile + kCodes + kSf;
    static constexpr int kStages = (220 * 1024) / kStage;
    /* the bf16 epilogue's 1 KB per consumer warp (store_wgmma_tiles_bf16_staged), where it fits
     * beside the stages, the static shared memory (5 KB) and the 227 KB limit: all but MT = 16 */
    static constexpr int kEpi = kWsConsumerWarps * 1024;
    static constexpr bool kStagedStore = kStages * kStage + kEpi + 1024 + 6 * 1024 <= 227 * 1024;
    static constexpr int kBytes = kStages * kStage + (kStagedStore ? kEpi : 0) +
                                  1024; /* + alignment slack */
    static_assert(kStage % 1024 == 0, "token tiles must stay 1024-aligned");
    static_assert(kStages >= 3, "the ring holds the consumers' two stages and one in flight");
    static_assert(MT == 16 || MT == 32 || MT == 64 || MT == 128, "a wgmma width with a wrapper");
    static_assert(kSlabs <= 31, "one producer lane per slab, lane 31 for the token tile");
};

template <int MT>
__global__ void __launch_bounds__(kWsThreads, 1) grouped_gemm_wgmma_ws_kernel(const GemmParams p) {
#if EPMOE_WGMMA_DEVICE
    using Plan = WsPlan<MT>;
    constexpr int WT = kWT;
    constexpr int kBN = Plan::kBN;
    constexpr int kRows = 2 * WT; /* weight rows per thread: g and g + 8 of each m64 tile */
    constexpr int kWsStages = Plan::kStages;
    extern __shared__ __align__(1024) uint8_t smem_raw[];
    __shared__ int chunk_start[kMaxExperts + 1];
    __shared__ __align__(8) uint64_t full_bar[kWsStages], empty_bar[kWsStages];
    uint8_t *smem = smem_align_1024(smem_raw);

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int E = p.E, N = p.N, K = p.K;
    const int steps = K / kStepK;

    if (threadIdx.x == 0) ring_init(full_bar, empty_bar, kWsStages, kWsConsumerWarps);
    build_chunk_list<MT>(p, chunk_start); /* its block barriers also publish the barriers */
    const int n_tiles = (N + kBN - 1) / kBN;
    const int total = chunk_start[E] * n_tiles;

    if (warp >= kWsConsumerWarps) {
        /* ---- producer: warp kWsConsumerWarps; lane j < kSlabs moves weight slab j, lane 31 the
         * token tile, after lane 0 has announced the stage's bytes ---- */
        asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(kWsProducerRegs));
        if (warp != kWsConsumerWarps) return;
        /* the token tiles are the pre-pass's output (launch_after_prepass); the consumers read
         * only what this warp's copies bring */
        wait_for_prepass();
        const int64_t image_step = (p.cap_rows / 8) * 2048; /* bytes per step of the image */
        int it = 0;                                         /* stage use counter */
        for (int item = blockIdx.x; item < total; item += gridDim.x) {
            const int chunk = item / n_tiles, nt = item % n_tiles;
            const Chunk ck = find_chunk<MT>(p, chunk_start, chunk);
            const int n0 = nt * kBN;
            const int slabs = min(kBN, N - n0) / EPMOE_GEMM_SLAB_ROWS;
            /* live rows rounded up to the 8-row group: inside the expert's padded block */
            const uint32_t tile_bytes = (uint32_t)((ck.mrows + 7) / 8) * 2048;
            const uint8_t *tile_src = (const uint8_t *)p.a_ws + (ck.row0 / 8) * 2048;
            const int64_t slab = ((int64_t)ck.e * N + n0) / EPMOE_GEMM_SLAB_ROWS + lane;
            const uint8_t *codes_src = p.w_codes + slab * steps * 2048;
            const uint8_t *sf_src = p.w_sf + slab * steps * 256;
            const uint32_t stage_bytes = tile_bytes + (uint32_t)slabs * (2048 + 256);
            for (int step = 0; step < steps; ++step, ++it) {
                const int s = it % kWsStages;
                mbar_wait(&empty_bar[s], ((it / kWsStages) & 1) ^ 1);
                uint8_t *stage = smem + s * Plan::kStage;
                if (lane == 0) mbar_arrive_expect_tx(&full_bar[s], stage_bytes);
                __syncwarp(); /* the bytes are announced before any of them can land */
                if (lane < slabs) {
                    bulk_copy_g2s(stage + Plan::kTile + lane * 2048, codes_src + step * 2048, 2048,
                                  &full_bar[s]);
                    bulk_copy_g2s(stage + Plan::kTile + Plan::kCodes + lane * 256,
                                  sf_src + step * 256, 256, &full_bar[s]);
                }
                if (lane == 31)
                    bulk_copy_g2s(stage, tile_src + step * image_step, tile_bytes, &full_bar[s]);
            }
        }
        return;
    }

    /* ---- consumers: warpgroup wg owns weight rows [64 WT wg, 64 WT (wg + 1)) of the item ---- */
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(kWsConsumerRegs));
    const int wg = warp / 4, wi = warp % 4, g = lane / 4, t = lane % 4;
    const float fix = kDequantFix * kDequantFix;
    constexpr int kASets = 4, kInFlight = kASets - 1; /* 8 slices per step: a multiple of kASets */
    /* this thread's rows r = 2i + h (m64 tile i, row g + 8h of the warp's 16): their place in
     * the stage's slabs (slab, 16-byte code unit, scale byte pair) */
    int lrow[kRows], code_off[kRows], sf_off[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
        const int i = r / 2, h = r % 2;
        lrow[r] = 64 * WT * wg + 64 * i + 16 * wi + g + 8 * h;
        const int slab = lrow[r] / 32, in_slab = lrow[r] % 32;
        code_off[r] = Plan::kTile + slab * 2048 + ((in_slab / 8) * 32 + 4 * g + t) * 16;
        sf_off[r] = Plan::kTile + Plan::kCodes + slab * 256 + in_slab * 8 + 2 * t;
    }
    const uint32_t smem_base = smem_u32(smem);

    int it = 0;
    for (int item = blockIdx.x; item < total; item += gridDim.x) {
        const int chunk = item / n_tiles, nt = item % n_tiles;
        const Chunk ck = find_chunk<MT>(p, chunk_start, chunk);
        const int e = ck.e, mrows = ck.mrows;
        const int64_t row0 = ck.row0;
        const int n0 = nt * kBN;

        float acc[WT][MT / 2];
        uint32_t A[kASets][WT][4]; /* [register set][m64 tile][fragment] */
#pragma unroll
        for (int i = 0; i < WT; ++i)
#pragma unroll
            for (int v = 0; v < MT / 2; ++v) acc[i][v] = 0.0f;

        for (int step = 0; step < steps; ++step, ++it) {
            const int s = it % kWsStages;
            mbar_wait(&full_bar[s], (it / kWsStages) & 1);
            const uint8_t *stage = smem + s * Plan::kStage;
            const uint64_t desc0 = desc_k_major_sw128(smem_base + s * Plan::kStage, 2048);
            uint4 wq[kRows];
            uint32_t S[kRows][2];
#pragma unroll
            for (int r = 0; r < kRows; ++r) {
                wq[r] = *(const uint4 *)(stage + code_off[r]);
                const uint32_t sf2 = *(const uint16_t *)(stage + sf_off[r]);
                sf_pair_to_bf16x2(sf2, S[r]);
            }
            /* One commit group per k16 slice (both m64 tiles), kInFlight groups in flight while
             * the next slice is dequantized: slice j's A registers are set j % kASets, reused
             * only once the group that read them (slice j - kASets) has completed. */
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                const int q = j / 2, sl = j % 2;
                wgmma_wait<kInFlight>(); /* slice j - kASets (this step or the last) is done */
                /* from slice 3 on, only this step's slices are pending: every MMA of the
                 * previous step has completed, and lane 0 of each warp releases its stage (a
                 * predicated arrival: a branch here would serialize the MMAs, C7513) */
                if (j == 3)
                    mbar_arrive_if(&empty_bar[(it + kWsStages - 1) % kWsStages],
                                   lane == 0 && step > 0);
#pragma unroll
                for (int i = 0; i < WT; ++i)
                    weight_fragment_slice<true>(word_of(wq[2 * i], q), S[2 * i][q / 2],
                                                word_of(wq[2 * i + 1], q), S[2 * i + 1][q / 2], sl,
                                                A[j % kASets][i]);
                wgmma_fence();
                /* slice j starts (j / 4) KB + 32 (j % 4) bytes into the tile (the descriptor
                 * holds the address in 16-byte units, no carry out of its 14 bits) */
                const uint64_t desc = desc0 + (((j / 4) * 1024 + (j % 4) * 32) >> 4);
#pragma unroll
                for (int i = 0; i < WT; ++i) {
                    fence_operands(acc[i]);
                    wgmma_tile<MT>(acc[i], A[j % kASets][i], desc, 1);
                    fence_operands(acc[i]);
                }
                wgmma_commit();
            }
        }
        wgmma_wait<0>(); /* the accumulators are final; the last stage is free */
#pragma unroll
        for (int i = 0; i < WT; ++i) fence_operands(acc[i]);
        if (lane == 0) mbar_arrive(&empty_bar[(it - 1) % kWsStages]); /* steps >= 1 */

        if constexpr (Plan::kStagedStore) {
            if (p.out_bf16) {
                store_wgmma_tiles_bf16_staged<WT, MT>(p, acc, lrow, e, n0, row0, mrows, fix, lane,
                                                      smem_base + kWsStages * Plan::kStage +
                                                          warp * 1024);
                continue;
            }
        }
        store_wgmma_tiles<WT, MT>(p, acc, lrow, e, n0, row0, mrows, fix, t);
    }
#else
    (void)p;
#endif
}

} // namespace

int epmoe_sm90::epmoe_gemm_sm90_ws_compiled(void) {
    return kernel_has_sm90_image((const void *)grouped_gemm_wgmma_ws_kernel<128>);
}

namespace {
template <int MT>
epmoe_status launch_ws(const GemmParams &p, cudaStream_t stream) {
    auto kernel = grouped_gemm_wgmma_ws_kernel<MT>;
    using Plan = WsPlan<MT>;
    CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Plan::kBytes),
             "raising the warp-specialized wgmma GEMM's shared-memory limit");
    const int64_t n_tiles = (p.N + Plan::kBN - 1) / Plan::kBN;
    unsigned grid = 0; /* one block per SM */
    EPMOE_TRY(persistent_grid(1, (p.cap_rows / MT + p.E) * n_tiles, &grid));
    /* A operand: NVFP4 -> bf16, already in the shared tile's image, then the GEMM, launched
     * while that runs */
    EPMOE_TRY(epmoe_a_rows_to_bf16_launch(p, kOrderTileImage, stream));
    return launch_after_prepass(kernel, grid, kWsThreads, Plan::kBytes, p, stream);
}
} // namespace

epmoe_status epmoe_sm90::epmoe_gemm_sm90_ws_launch(const GemmParams &p, int mt, cudaStream_t stream) {
    switch (mt) {
    case 16: return launch_ws<16>(p, stream);
    case 32: return launch_ws<32>(p, stream);
    case 64: return launch_ws<64>(p, stream);
    case 128: return launch_ws<128>(p, stream);
    default: break;
    }
    EPMOE_FAIL(EPMOE_ERR_INVALID_ARG, "warp-specialized wgmma GEMM: no %d-row token tile", mt);
}
