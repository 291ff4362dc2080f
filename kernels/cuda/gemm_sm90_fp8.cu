/* FP8 tensor-core grouped GEMM for Hopper (sm_90a): act_quant = fp8 (W4A8) on weights whose FP4
 * values are E4M3 times a power of two per row and 128-k group, exactly (MXFP4 checkpoints;
 * common/fp8.h). Contract in kernels/cuda/grouped_gemm.h (w_fp8, EPMOE_GEMM_SM90_FP8_MT*).
 *
 * What it computes. Per 128-k step s, the tensor cores sum the E4M3 products of the step
 * (wgmma m64nMTk32, both operands in shared memory) into a fresh fp32 partial; the consumer then
 * adds partial * 2^ea[token, s] * 2^ew[row, s] to its accumulator (two exact multiplications by
 * powers of two, one rounded addition: the per-block scaling DeepSeek applies "outside the MMA",
 * which also bounds how far the tensor cores' own accumulation runs). The epilogue is every
 * Hopper kernel's (store_wgmma_tiles: a_scale, w_scale, bias, out_row), with no dequantization
 * factor. The products are those of the bf16 path exactly (the same real numbers); the sums
 * differ in order, so this kernel is held to the float64 reference, not to the other kernels'
 * bits (tests/gpu/test_gemm.cu).
 *
 * Layouts (both written once: the weights at upload, the tokens by a pre-pass per call):
 *   weights  slab image: for each 32-row slab and step, 4 KB = 32 rows x 128 bytes, the 16-byte
 *            chunk c of row r at r * 128 + 16 (c ^ (r % 8)) -- wgmma's 128-byte swizzle, so one
 *            bulk copy puts it in shared memory as the MMA reads it; then the slab's step
 *            exponents, 32 bytes (UE8M0 of 2^ew) per (slab, step), in a second array.
 *   tokens   tile image in the workspace: for each step, 8-row groups of 1 KB swizzled the same
 *            way, then [steps][cap_rows] exponent bytes: a chunk's step is one contiguous copy
 *            of each.
 * Roles as in gemm_sm90_ws.cu: one producer warp moves each stage with the bulk copy engine
 * (lanes 0-3 a weight slab each, lane 31 the token tile and exponents) and two consumer
 * warpgroups each own one m64 weight tile, so an item is MT tokens x 128 weight rows. */
#include <cuda_runtime.h>
#include <stdint.h>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/fp8_math.cuh"
#include "kernels/cuda/gemm_sm90_common.cuh"
#include "kernels/cuda/ops_cuda.h"
#include "kernels/cuda/sm90a_async.cuh"

using namespace epmoe_sm90;

namespace {

constexpr int kF8ConsumerWarps = 8;
constexpr int kF8Threads = kF8ConsumerWarps * 32 + 128; /* + a producer warpgroup (one warp works) */
[[maybe_unused]] constexpr int kF8ProducerRegs = 40, kF8ConsumerRegs = 232;
constexpr int kF8BN = 128;                   /* weight rows per item: an m64 tile per warpgroup */
constexpr int kF8Slabs = kF8BN / EPMOE_GEMM_SLAB_ROWS;
constexpr int kSlabStepBytes = EPMOE_GEMM_SLAB_ROWS * kStepK; /* 4 KB: 32 rows x 128 E4M3 */

template <int MT>
struct F8Plan {
    static constexpr int kTile = MT * kStepK;                 /* token codes, MT/8 groups of 1 KB */
    static constexpr int kW = kF8Slabs * kSlabStepBytes;      /* weight codes */
    static constexpr int kTexp = kTile + kW;                  /* MT token exponents */
    static constexpr int kWexp = kTexp + MT;                  /* 128 weight exponents */
    static constexpr int kStage = (kWexp + kF8BN + 1023) / 1024 * 1024;
    static constexpr int kStages = (200 * 1024) / kStage;
    static constexpr int kBytes = kStages * kStage + 1024; /* + alignment slack */
    static_assert(kStages >= 3, "the ring holds a stage per consumer warpgroup and one in flight");
    static_assert(MT == 64 || MT == 128, "a width with an FP8 wgmma wrapper");
};

#if EPMOE_WGMMA_DEVICE
/* 2^(b - 127) exactly: the byte is the fp32 exponent field (b = 0: the subnormal 2^-127). */
__device__ __forceinline__ float ue8m0_value(uint32_t b) {
    return __uint_as_float(b ? b << 23 : 0x400000u);
}
#endif

template <int MT>
__global__ void __launch_bounds__(kF8Threads, 1) grouped_gemm_fp8_kernel(const GemmParams p) {
#if EPMOE_WGMMA_DEVICE
    using Plan = F8Plan<MT>;
    constexpr int kStages = Plan::kStages;
    extern __shared__ __align__(1024) uint8_t smem_raw[];
    __shared__ int chunk_start[kMaxExperts + 1];
    __shared__ __align__(8) uint64_t full_bar[kStages], empty_bar[kStages];
    uint8_t *smem = smem_align_1024(smem_raw);

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int E = p.E, N = p.N, K = p.K;
    const int steps = K / kStepK;

    if (threadIdx.x == 0) ring_init(full_bar, empty_bar, kStages, kF8ConsumerWarps);
    build_chunk_list<MT>(p, chunk_start); /* its block barriers also publish the barriers */
    const int n_tiles = (N + kF8BN - 1) / kF8BN;
    const int total = chunk_start[E] * n_tiles;

    if (warp >= kF8ConsumerWarps) {
        asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(kF8ProducerRegs));
        if (warp != kF8ConsumerWarps) return;
        wait_for_prepass(); /* the token image is the pre-pass's output */
        const uint8_t *image = (const uint8_t *)p.a_ws;
        const uint8_t *image_exp = image + p.cap_rows * (int64_t)K;
        const int64_t image_step = (p.cap_rows / 8) * 1024;
        int it = 0;
        for (int item = blockIdx.x; item < total; item += gridDim.x) {
            const int chunk = item / n_tiles, nt = item % n_tiles;
            const Chunk ck = find_chunk<MT>(p, chunk_start, chunk);
            const int n0 = nt * kF8BN;
            const int slabs = min(kF8BN, N - n0) / EPMOE_GEMM_SLAB_ROWS;
            const uint32_t tile_bytes = (uint32_t)((ck.mrows + 7) / 8) * 1024;
            const int64_t slab = ((int64_t)ck.e * N + n0) / EPMOE_GEMM_SLAB_ROWS + lane;
            const uint32_t stage_bytes = tile_bytes + MT + (uint32_t)slabs * (kSlabStepBytes + 32);
            for (int step = 0; step < steps; ++step, ++it) {
                const int s = it % kStages;
                mbar_wait(&empty_bar[s], ((it / kStages) & 1) ^ 1);
                uint8_t *stage = smem + s * Plan::kStage;
                if (lane == 0) mbar_arrive_expect_tx(&full_bar[s], stage_bytes);
                __syncwarp(); /* the bytes are announced before any of them can land */
                if (lane < slabs) {
                    const int64_t unit = slab * steps + step;
                    bulk_copy_g2s(stage + Plan::kTile + lane * kSlabStepBytes,
                                  p.w_fp8 + unit * kSlabStepBytes, kSlabStepBytes, &full_bar[s]);
                    bulk_copy_g2s(stage + Plan::kWexp + lane * 32, p.w_fp8_exp + unit * 32, 32,
                                  &full_bar[s]);
                }
                if (lane == 31) {
                    bulk_copy_g2s(stage, image + step * image_step + (ck.row0 / 8) * 1024,
                                  tile_bytes, &full_bar[s]);
                    bulk_copy_g2s(stage + Plan::kTexp, image_exp + step * p.cap_rows + ck.row0, MT,
                                  &full_bar[s]);
                }
            }
        }
        return;
    }

    /* ---- consumers: warpgroup wg owns weight rows [64 wg, 64 wg + 64) of the item ---- */
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(kF8ConsumerRegs));
    const int wg = warp / 4, wi = warp % 4, g = lane / 4, t = lane % 4;
    int lrow[2];
    lrow[0] = 64 * wg + 16 * wi + g;
    lrow[1] = lrow[0] + 8;
    const uint32_t smem_base = smem_u32(smem);

    int it = 0;
    for (int item = blockIdx.x; item < total; item += gridDim.x) {
        const int chunk = item / n_tiles, nt = item % n_tiles;
        const Chunk ck = find_chunk<MT>(p, chunk_start, chunk);
        const int n0 = nt * kF8BN;

        float acc[1][MT / 2], part[MT / 2];
#pragma unroll
        for (int v = 0; v < MT / 2; ++v) acc[0][v] = 0.0f;

        for (int step = 0; step < steps; ++step, ++it) {
            const int s = it % kStages;
            mbar_wait(&full_bar[s], (it / kStages) & 1);
            const uint32_t stage = smem_base + s * Plan::kStage;
            /* A: this warpgroup's 64 rows (slabs 2wg, 2wg + 1: 8 groups of 1 KB); B: the token
             * tile; the k32 slice j starts 32 j bytes into every 128-byte row */
            const uint64_t desc_a = desc_k_major_sw128(stage + Plan::kTile + wg * 2 * kSlabStepBytes);
            const uint64_t desc_b = desc_k_major_sw128(stage);
            wgmma_fence();
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                fence_operands(part);
                wgmma_fp8_tile<MT>(part, desc_a + 2 * j, desc_b + 2 * j, j > 0);
                fence_operands(part);
            }
            wgmma_commit();
            wgmma_wait<0>();
            fence_operands(part);
            /* the scales of this thread's rows and tokens, read before the stage is released */
            const uint8_t *sp = smem + s * Plan::kStage;
            float sw[2], sa[MT / 4];
#pragma unroll
            for (int h = 0; h < 2; ++h) sw[h] = ue8m0_value(sp[Plan::kWexp + lrow[h]]);
#pragma unroll
            for (int c = 0; c < MT / 8; ++c)
#pragma unroll
                for (int j = 0; j < 2; ++j)
                    sa[2 * c + j] = ue8m0_value(sp[Plan::kTexp + 8 * c + 2 * t + j]);
            __syncwarp();
            if (lane == 0) mbar_arrive(&empty_bar[s]);
            /* acc[4c + 2h + j] is (weight row lrow[h], token 8c + 2t + j) */
#pragma unroll
            for (int c = 0; c < MT / 8; ++c)
#pragma unroll
                for (int h = 0; h < 2; ++h)
#pragma unroll
                    for (int j = 0; j < 2; ++j) {
                        const int v = 4 * c + 2 * h + j;
                        acc[0][v] = __fadd_rn(acc[0][v], __fmul_rn(__fmul_rn(part[v], sa[2 * c + j]), sw[h]));
                    }
        }
        store_wgmma_tiles<1, MT>(p, acc, lrow, ck.e, n0, ck.row0, ck.mrows, 1.0f, t);
    }
#else
    (void)p;
#endif
}

/* FP8 A -> the token tile image and its exponents (the layout above), live rows only: one warp
 * per row, lanes over the row's 16-byte chunks. */
__global__ void __launch_bounds__(256) fp8_tokens_to_image_kernel(const GemmParams p) {
    prepass_let_next_launch();
    const int lane = threadIdx.x % 32;
    const int64_t warps = (int64_t)gridDim.x * blockDim.x / 32;
    const int K = p.K, steps = K / kStepK;
    uint8_t *image = (uint8_t *)p.a_ws;
    uint8_t *image_exp = image + p.cap_rows * (int64_t)K;
    for (int64_t row = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) / 32; row < p.cap_rows;
         row += warps) {
        if (epmoe_cuda_expert_of_real_row(p.padded_offsets, p.tokens_per_expert, p.E, row) < 0)
            continue;
        const int r8 = (int)(row % 8);
        for (int i = lane; i < steps * 8; i += 32) {
            const int step = i / 8, c = i % 8;
            const uint4 v = *(const uint4 *)(p.a_codes + row * K + step * kStepK + 16 * c);
            *(uint4 *)(image + (step * (p.cap_rows / 8) + row / 8) * 1024 + r8 * 128 +
                       ((c ^ r8) << 4)) = v;
        }
        for (int step = lane; step < steps; step += 32)
            image_exp[step * p.cap_rows + row] = p.a_sf[row * steps + step];
    }
}

/* FP4 weights (row-major codes [rows, K/2], UE4M3 scales [rows, K/16]) -> the FP8 slab image:
 * one warp per (row, step), four elements a lane; the group exponent and codes by common/fp8.h's
 * rule (fp8_math.cuh), and a group that does not come back exactly counted in *inexact. */
__global__ void fp4_to_fp8_slabs_kernel(const uint8_t *codes, const uint8_t *sf, int64_t rows,
                                        int K, uint8_t *out, uint8_t *out_exp,
                                        unsigned long long *inexact) {
    const int lane = threadIdx.x % 32, steps = K / kStepK;
    const int64_t items = rows * steps, warps = (int64_t)gridDim.x * blockDim.x / 32;
    for (int64_t item = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) / 32; item < items;
         item += warps) {
        const int64_t row = item / steps;
        const int step = (int)(item % steps), k0 = step * kStepK + 4 * lane;
        const uint16_t two = *(const uint16_t *)(codes + row * (K / 2) + k0 / 2);
        const float scale = epmoe_e4m3_value_dev(sf[row * (K / 16) + k0 / 16]);
        float v[4], amax = 0.0f;
        for (int i = 0; i < 4; ++i) {
            const uint8_t nib = (uint8_t)((two >> (4 * i)) & 0xf);
            const float m[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
            v[i] = (nib & 8 ? -m[nib & 7] : m[nib & 7]) * scale; /* exact */
            amax = fmaxf(amax, fabsf(v[i]));
        }
        for (int off = 16; off > 0; off >>= 1)
            amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
        const int e = epmoe_fp8_block_exp_dev(amax);
        uint32_t word = 0;
        bool exact = true;
        for (int i = 0; i < 4; ++i) {
            const uint8_t c = epmoe_fp8_code_dev(v[i], e);
            exact &= ldexpf(epmoe_e4m3_value_dev(c), e) == v[i];
            word |= (uint32_t)c << (8 * i);
        }
        const int64_t slab = row / EPMOE_GEMM_SLAB_ROWS, unit = slab * steps + step;
        const int r = (int)(row % EPMOE_GEMM_SLAB_ROWS), chunk = lane / 4;
        *(uint32_t *)(out + unit * kSlabStepBytes + r * 128 + ((chunk ^ (r % 8)) << 4) +
                      4 * (lane % 4)) = word;
        const bool all_exact = __all_sync(0xffffffffu, exact);
        if (lane == 0) {
            out_exp[unit * 32 + r] = (uint8_t)(e + 127);
            if (!all_exact) atomicAdd(inexact, 1ull);
        }
    }
}

template <int MT>
epmoe_status launch_fp8(const GemmParams &p, cudaStream_t stream) {
    auto kernel = grouped_gemm_fp8_kernel<MT>;
    using Plan = F8Plan<MT>;
    CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Plan::kBytes),
             "raising the FP8 GEMM's shared-memory limit");
    const int64_t n_tiles = (p.N + kF8BN - 1) / kF8BN;
    unsigned grid = 0, prepass_grid = 0;
    EPMOE_TRY(persistent_grid(1, (p.cap_rows / MT + p.E) * n_tiles, &grid));
    EPMOE_TRY(persistent_grid(2, (p.cap_rows + 7) / 8, &prepass_grid));
    fp8_tokens_to_image_kernel<<<prepass_grid, 256, 0, stream>>>(p);
    CUDA_TRY_LAUNCH("FP8 A -> the FP8 GEMM's token image");
    return launch_after_prepass(kernel, grid, kF8Threads, Plan::kBytes, p, stream);
}

} // namespace

int epmoe_sm90::epmoe_gemm_sm90_fp8_compiled(void) {
    return kernel_has_sm90_image((const void *)grouped_gemm_fp8_kernel<128>);
}

epmoe_status epmoe_sm90::epmoe_gemm_sm90_fp8_launch(const GemmParams &p, int mt,
                                                    cudaStream_t stream) {
    EPMOE_REQUIRE(p.a_fp8 && p.w_fp8 && p.w_fp8_exp && p.a_ws, EPMOE_ERR_INVALID_ARG,
                  "FP8 GEMM: needs FP8 A, its workspace and the weights' FP8 image");
    switch (mt) {
    case 64: return launch_fp8<64>(p, stream);
    case 128: return launch_fp8<128>(p, stream);
    default: break;
    }
    EPMOE_FAIL(EPMOE_ERR_INVALID_ARG, "FP8 GEMM: no %d-row token tile", mt);
}

extern "C" epmoe_status epmoe_cuda_weights_to_fp8_slabs(const uint8_t *codes, const uint8_t *sf,
                                                        int64_t rows, int64_t K, uint8_t *fp8,
                                                        uint8_t *fp8_exp,
                                                        unsigned long long *inexact_groups,
                                                        cudaStream_t stream) {
    EPMOE_REQUIRE(rows > 0 && rows % EPMOE_GEMM_SLAB_ROWS == 0 && K > 0 && K % kStepK == 0 &&
                      K <= (1 << 20),
                  EPMOE_ERR_INVALID_ARG,
                  "FP8 weight image: rows = %lld (a multiple of 32) and K = %lld (of 128)",
                  (long long)rows, (long long)K);
    EPMOE_REQUIRE(codes && sf && fp8 && fp8_exp && inexact_groups &&
                      ((uintptr_t)codes & 1) == 0 && ((uintptr_t)fp8 & 3) == 0,
                  EPMOE_ERR_INVALID_ARG, "FP8 weight image: a pointer is NULL or misaligned");
    unsigned grid = 0;
    EPMOE_TRY(persistent_grid(8, (rows * (K / kStepK) + 7) / 8, &grid));
    fp4_to_fp8_slabs_kernel<<<grid, 256, 0, stream>>>(codes, sf, rows, (int)K, fp8, fp8_exp,
                                                      inexact_groups);
    CUDA_TRY_LAUNCH("FP4 weights -> the FP8 GEMM's slab image");
    return EPMOE_OK;
}
