/* Grouped NVFP4 GEMM for Hopper (sm_90; any sm_90+ device runs it): the contract is in
 * kernels/cuda/grouped_gemm.h.
 *
 * Operand order ("swap AB"): the weights are the wide MMA operand (the m16 rows of
 * mma.m16n8k16 are output columns n), the tokens the narrow one (the n8 columns are token
 * rows). A decode-sized expert with 8 rows then costs one n8 tile, not a 128-row tile, and the
 * kernel skips every n8 tile past the expert's live row count, so padding rows cost nothing.
 *
 * Data flow per work item (one expert, one chunk of up to MT token rows, BN = 32*NWARPS weight
 * rows), per step of 128 along K:
 *   weights: global -> shared (cp.async, kStages deep) -> registers (16-byte loads) -> exact
 *            bf16 pairs -> MMA A
 *   tokens:  global -> shared (cp.async, same stages) -> bf16 tile in MMA order (each thread
 *            dequantizes / permutes the units it copied) -> MMA B
 * Each weight element is read from memory and dequantized exactly once per token chunk, so a
 * decode step streams the weights once; a prefill chunk of 128 tokens reuses each dequantized
 * weight register 128 times.
 *
 * The exact NVFP4 -> bf16 dequantization and the K order both operands share are explained in
 * gemm_sm90_common.cuh. Thread t of a quad owns k in [32t, 32t+32) of each 128-step: one
 * 16-byte load per row and exactly two NVFP4 scale blocks.
 */
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/gemm_sm90_common.cuh"
#include "kernels/cuda/grouped_gemm.h"

using namespace epmoe_sm90;

namespace {

constexpr int kTileRowBytes = kStepK * 2 + 64;     /* bf16 row + pad: rows 2i, 2i+1 of a
                                                      16-byte load phase hit disjoint banks */

/* Shared-memory plan of one variant (bytes). Weight stage: BN rows x 64 code bytes, then
 * BN x 8 scale bytes. Token stage (NVFP4): MT x 64 code bytes, then MT x 4 x 8 scale bytes (each
 * unit copies its row's 8 scale bytes into its own slot, so no thread reads another's copy),
 * converted into a double-buffered bf16 tile; (bf16): the stage is itself the tile (each
 * thread permutes its own 16-byte chunks in place). */
template <int MT, int NWARPS, int kStages, bool kFp4>
struct SmemPlan {
    static constexpr int kBN = NWARPS * 32;
    static constexpr int kWStage = kBN * (64 + 8);
    static constexpr int kTStage = kFp4 ? MT * (64 + 32) : MT * kTileRowBytes;
    static constexpr int kTile = MT * kTileRowBytes;
    static constexpr int kW = 0;
    static constexpr int kT = kW + kStages * kWStage;
    static constexpr int kTiles = kT + kStages * kTStage;
    static constexpr int kBytes = kTiles + (kFp4 ? 2 * kTile : 0);
};

/* MT: token rows per work item; NWARPS: each warp owns 32 weight rows (two m16 tiles);
 * kStages: depth of the cp.async pipeline (steps of 128 k in flight); kSlabs: the weights are in
 * the slab layout and its bit order. */
template <int MT, int NWARPS, int kStages, bool kFp4, int kMinBlocks, bool kSlabs>
__global__ void __launch_bounds__(NWARPS * 32, kMinBlocks)
    grouped_gemm_sm90_kernel(const GemmParams p) {
    using Plan = SmemPlan<MT, NWARPS, kStages, kFp4>;
    constexpr int kThreads = NWARPS * 32;
    constexpr int kBN = Plan::kBN;
    constexpr int kNT8 = MT / 8;
    /* (token row, 32-k span) units per thread. Decode variants: unit u covers row u % MT, so the
     * few live rows of a decode chunk spread over all warps instead of loading warp 0 alone.
     * Prefill: four consecutive threads share a row, so global loads are 64-byte contiguous
     * and tile stores conflict-free (the spread mapping made the prefill variant slower:
     * scattered loads, bank conflicts; docs/perf-history.md §2). */
    constexpr bool kSpread = MT < 128;
    constexpr int kUnits = MT * 4 / kThreads;
    static_assert(MT % 8 == 0 && (MT * 4) % kThreads == 0, "token staging must divide evenly");
    static_assert(kStages >= 2, "pipeline needs two stages");

    extern __shared__ __align__(16) uint8_t smem[];
    __shared__ int chunk_start[kMaxExperts + 1];

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane / 4, t = lane % 4;
    const int E = p.E, N = p.N, K = p.K;
    const int steps = K / kStepK;

    build_chunk_list<MT>(p, chunk_start);
    const int n_tiles = (N + kBN - 1) / kBN;
    const int total = chunk_start[E] * n_tiles;
    const float fix = kFp4 ? kDequantFix * kDequantFix : kDequantFix;

    for (int item = blockIdx.x; item < total; item += gridDim.x) {
        const int chunk = item / n_tiles, nt = item % n_tiles;
        const Chunk ck = find_chunk<MT>(p, chunk_start, chunk);
        const int e = ck.e, mrows = ck.mrows;
        const int64_t row0 = ck.row0;

        const int n_warp = nt * kBN + warp * 32;
        const bool warp_active = n_warp < N;
        const int wrow = warp * 32 + g; /* this thread's first weight row inside the tile */
        /* rows n_warp + g + 8r (r < 4) of either weight layout */
        const WeightWalk walk = weight_walk<kSlabs>(p, e, n_warp + g, t);
        const uint8_t *wc = p.w_codes + walk.code, *ws = p.w_sf + walk.sf;

        /* One pipeline stage: this thread's weight rows g+8r (16 code bytes each; quad
         * leader t == 0 also the row's 8 scale bytes) and its token units. */
        auto issue_stage = [&](int step) {
            if (step < steps) {
                const int b = step % kStages;
                uint8_t *wst = smem + Plan::kW + b * Plan::kWStage;
                if (warp_active) {
#pragma unroll
                    for (int r = 0; r < 4; ++r) {
                        cp_async16_l2_256(wst + (wrow + 8 * r) * 64 + 16 * t,
                                          wc + r * walk.code_row8 + step * walk.code_step);
                        if (t == 0)
                            cp_async8(wst + kBN * 64 + (wrow + 8 * r) * 8,
                                      ws + r * walk.sf_row8 + step * walk.sf_step);
                    }
                }
                uint8_t *tst = smem + Plan::kT + b * Plan::kTStage;
#pragma unroll
                for (int u = 0; u < kUnits; ++u) {
                    const int unit = threadIdx.x + u * kThreads;
                    const int tr = kSpread ? unit % MT : unit / 4, s = kSpread ? unit / MT : unit % 4;
                    if (tr < mrows) {
                        const int64_t row = row0 + tr;
                        if constexpr (kFp4) {
                            cp_async16(tst + tr * 64 + s * 16,
                                       p.a_codes + row * (K / 2) + step * 64 + s * 16);
                            cp_async8(tst + MT * 64 + (tr * 4 + s) * 8, p.a_sf + row * (K / 16) + step * 8);
                        } else {
                            const __nv_bfloat16 *src = p.a_bf16 + row * K + step * kStepK + s * 32;
#pragma unroll
                            for (int q = 0; q < 4; ++q)
                                cp_async16(tst + tr * kTileRowBytes + (q * 4 + s) * 16, src + q * 8);
                        }
                    }
                }
            }
            cp_async_commit(); /* always: keeps the group count equal to the step count */
        };

        /* Own token units of a landed stage -> the bf16 tile in MMA order. */
        auto convert_stage = [&](int step) {
            const int b = step % kStages;
            uint8_t *tst = smem + Plan::kT + b * Plan::kTStage;
#pragma unroll
            for (int u = 0; u < kUnits; ++u) {
                const int unit = threadIdx.x + u * kThreads;
                    const int tr = kSpread ? unit % MT : unit / 4, s = kSpread ? unit / MT : unit % 4;
                if (tr < mrows) {
                    if constexpr (kFp4) {
                        uint8_t *tile = smem + Plan::kTiles + (step & 1) * Plan::kTile;
                        const uint4 codes = *(const uint4 *)(tst + tr * 64 + s * 16);
                        const uint32_t sf2 = *(const uint16_t *)(tst + MT * 64 + (tr * 4 + s) * 8 + 2 * s);
#pragma unroll
                        for (int q = 0; q < 4; ++q) {
                            const uint32_t S = sf_to_bf16x2(q < 2 ? (sf2 & 0xFFu) : (sf2 >> 8));
                            uint32_t o[4];
                            dequant8(word_of(codes, q), S, o);
                            *(uint4 *)(tile + tr * kTileRowBytes + (q * 4 + s) * 16) =
                                make_uint4(o[0], o[1], o[2], o[3]);
                        }
                    } else {
#pragma unroll
                        for (int q = 0; q < 4; ++q) {
                            uint4 *c = (uint4 *)(tst + tr * kTileRowBytes + (q * 4 + s) * 16);
                            *c = permute8(*c);
                        }
                    }
                }
            }
        };

        float acc[2][kNT8][4];
        zero_warp_tile<kNT8>(acc);

        __syncthreads(); /* the previous item's last reads of shared memory are done */
#pragma unroll
        for (int s = 0; s < kStages - 1; ++s) issue_stage(s);
        cp_async_wait<kStages - 2>(); /* stage 0 landed (own copies) */
        convert_stage(0);

        for (int step = 0; step < steps; ++step) {
            /* tile[step] and weight stage `step` visible to all; step-1 fully consumed */
            __syncthreads();
            issue_stage(step + kStages - 1);
            if (warp_active) {
                const uint8_t *wst = smem + Plan::kW + (step % kStages) * Plan::kWStage;
                const uint8_t *tb = kFp4 ? smem + Plan::kTiles + (step & 1) * Plan::kTile
                                         : smem + Plan::kT + (step % kStages) * Plan::kTStage;
                uint4 wq[4];
                uint32_t S[4][2];
#pragma unroll
                for (int r = 0; r < 4; ++r) {
                    wq[r] = *(const uint4 *)(wst + (wrow + 8 * r) * 64 + 16 * t);
                    const uint32_t sf2 = *(const uint16_t *)(wst + kBN * 64 + (wrow + 8 * r) * 8 + 2 * t);
                    sf_pair_to_bf16x2(sf2, S[r]);
                }
#pragma unroll
                for (int q = 0; q < 4; ++q) {
                    uint32_t A[2][2][4]; /* [m16 tile][k16 sub-step][fragment] */
                    word_fragments<kSlabs, 2>(wq, S, q, A);
#pragma unroll
                    for (int c = 0; c < kNT8; ++c) {
                        if (c * 8 < mrows) {
                            const uint4 bv = *(const uint4 *)(tb + (c * 8 + g) * kTileRowBytes +
                                                              (q * 4 + t) * 16);
                            mma_word<kNT8>(acc, c, A, bv);
                        }
                    }
                }
            }
            if (step + 1 < steps) {
                cp_async_wait<kStages - 2>(); /* stage step+1 landed (own copies) */
                convert_stage(step + 1);
            }
        }
        cp_async_wait<0>();

        if (warp_active) store_warp_tile<kNT8>(p, acc, e, n_warp, row0, mrows, fix, g, t);
    }
}

template <int MT, int NWARPS, int kStages, bool kFp4, int kMinBlocks, bool kSlabs>
epmoe_status launch_instance(const GemmParams &p, cudaStream_t stream) {
    auto kernel = grouped_gemm_sm90_kernel<MT, NWARPS, kStages, kFp4, kMinBlocks, kSlabs>;
    const int smem_bytes = SmemPlan<MT, NWARPS, kStages, kFp4>::kBytes;
    CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes),
             "raising the grouped GEMM's shared-memory limit");
    int per_sm = 0;
    CUDA_TRY(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, NWARPS * 32,
                                                           smem_bytes),
             "grouped GEMM occupancy");
    if (per_sm < 1)
        EPMOE_FAIL(EPMOE_ERR_CUDA, "grouped GEMM variant MT=%d NWARPS=%d (%d B shared) does not "
                   "fit on an SM", MT, NWARPS, smem_bytes);
    const int64_t n_tiles = (p.N + NWARPS * 32 - 1) / (NWARPS * 32);
    unsigned grid = 0;
    EPMOE_TRY(persistent_grid(per_sm, (p.cap_rows / MT + p.E) * n_tiles, &grid));
    kernel<<<grid, NWARPS * 32, smem_bytes, stream>>>(p);
    CUDA_TRY_LAUNCH("grouped NVFP4 GEMM (sm_90)");
    return EPMOE_OK;
}
/* The instance for the weights' layout. */
template <int MT, int NWARPS, int kStages, bool kFp4, int kMinBlocks>
epmoe_status launch_variant(const GemmParams &p, cudaStream_t stream) {
    return p.w_slabs ? launch_instance<MT, NWARPS, kStages, kFp4, kMinBlocks, true>(p, stream)
                     : launch_instance<MT, NWARPS, kStages, kFp4, kMinBlocks, false>(p, stream);
}

/* Token rows per work item of the size class (16 exists for the streaming kernel only; the
 * shared-memory kernel runs 32 there). cap_rows is the padded capacity of this
 * batch (common/layout.h epmoe_padded_capacity): at most E*(pad-1) of it is padding, so
 * cap_rows - E*127 bounds the live rows. The choice depends on shapes only (capture-safe); every
 * variant is correct for any routing, a small-MT one re-reads an expert's weights once per MT
 * rows. */
int sm90_rows_per_chunk(const epmoe_grouped_gemm_args *a) {
    /* (E + 1): a caller may also round the capacity up to a multiple of the pad */
    const int64_t live_bound = a->cap_rows - (a->n_experts + 1) * (EPMOE_GEMM_PAD_ROWS - 1);
    if (live_bound <= 16 * a->n_experts) return 16;  /* decode (streaming only; else 32) */
    if (live_bound <= 32 * a->n_experts) return 32;  /* decode, 3 blocks per SM */
    if (live_bound <= 64 * a->n_experts) return 64;  /* decode, 2 blocks per SM */
    return 128;                                      /* prefill */
}

/* wgmma needs an sm_90a image, a compute capability 9.0 device, NVFP4 or FP8 A and the
 * workspace its bf16 copy of A goes to. */
bool wgmma_usable(const epmoe_grouped_gemm_args *a) {
    int device = 0, major = 0, minor = 0;
    if (a->a_format == EPMOE_GEMM_A_BF16 || !a->a_workspace) return false;
    if (cudaGetDevice(&device) != cudaSuccess ||
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
        cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess) {
        (void)cudaGetLastError();
        return false;
    }
    return major == 9 && minor == 0 && epmoe_gemm_sm90_wgmma_compiled();
}

/* The warp-specialized kernel also needs its own sm_90a image, slab-layout weights and the
 * 16-byte alignment of everything its bulk copies move. */
bool wgmma_ws_usable(const epmoe_grouped_gemm_args *a) {
    return a->w_slabs && a->cap_rows % 8 == 0 && ((uintptr_t)a->w_codes & 15) == 0 &&
           ((uintptr_t)a->w_sf & 15) == 0 && ((uintptr_t)a->a_workspace & 15) == 0 &&
           wgmma_usable(a) && epmoe_gemm_sm90_ws_compiled();
}

/* The FP8 kernel: FP8 A, the weights' FP8 image, its sm_90a image on a 9.0 device, and the
 * 16-byte alignment its bulk copies of the token exponents need (cap_rows % 128). */
bool fp8_usable(const epmoe_grouped_gemm_args *a) {
    return a->a_format == EPMOE_GEMM_A_FP8 && a->w_fp8 && a->w_fp8_exp && a->cap_rows % 128 == 0 &&
           ((uintptr_t)a->w_fp8 & 15) == 0 && ((uintptr_t)a->w_fp8_exp & 15) == 0 &&
           wgmma_usable(a) && epmoe_gemm_sm90_fp8_compiled();
}

} // namespace

extern "C" epmoe_gemm_sm90_kernel epmoe_grouped_gemm_sm90_select(const epmoe_grouped_gemm_args *a) {
    if (a->sm90_kernel != EPMOE_GEMM_SM90_AUTO) return a->sm90_kernel;
    /* Measured (docs/perf-history.md §2): the streaming kernel beats mma.sync MT=32 and the
     * warp-specialized MT=16 kernel up to 16 rows per expert; from 17 rows on, on slab weights,
     * the warp-specialized kernel with the class's token tile beats what ran there before
     * (mma.sync MT=32 at 32 rows, the first wgmma kernel at 64 rows and at prefill). Row-major
     * weights keep the older kernels. */
    const int rows = sm90_rows_per_chunk(a);
    const bool stream = a->a_format != EPMOE_GEMM_A_BF16 && a->a_workspace;
    if (rows == 16) return stream ? EPMOE_GEMM_SM90_STREAM_MT16 : EPMOE_GEMM_SM90_MMA_MT32;
    /* prefill on FP8 weights: FP8 tensor cores (twice bf16's rate); below it the 8-bit weights
     * would be read where the 4-bit ones are, and reading is what decode is bound by */
    if (rows == 128 && fp8_usable(a)) return EPMOE_GEMM_SM90_FP8_MT128;
    if (wgmma_ws_usable(a))
        return rows == 32 ? EPMOE_GEMM_SM90_WS_MT32
                          : rows == 64 ? EPMOE_GEMM_SM90_WS_MT64 : EPMOE_GEMM_SM90_WS_MT128;
    if (rows == 32) return EPMOE_GEMM_SM90_MMA_MT32;
    if (wgmma_usable(a)) return EPMOE_GEMM_SM90_WGMMA_MT128;
    return rows == 64 ? EPMOE_GEMM_SM90_MMA_MT64 : EPMOE_GEMM_SM90_MMA_MT128;
}

extern "C" const char *epmoe_grouped_gemm_sm90_kernel_name(epmoe_gemm_sm90_kernel k) {
    switch (k) {
    case EPMOE_GEMM_SM90_AUTO: return "auto";
    case EPMOE_GEMM_SM90_MMA_MT32: return "decode MT=32 BN=128";
    case EPMOE_GEMM_SM90_MMA_MT64: return "decode MT=64 BN=128";
    case EPMOE_GEMM_SM90_MMA_MT128: return "prefill MT=128 BN=256";
    case EPMOE_GEMM_SM90_WGMMA_MT128: return "prefill wgmma MT=128 BN=256";
    case EPMOE_GEMM_SM90_STREAM_MT16: return "decode stream MT=16";
    case EPMOE_GEMM_SM90_WS_MT16: return "wgmma-ws MT=16 BN=256";
    case EPMOE_GEMM_SM90_WS_MT32: return "wgmma-ws MT=32 BN=256";
    case EPMOE_GEMM_SM90_WS_MT64: return "wgmma-ws MT=64 BN=256";
    case EPMOE_GEMM_SM90_WS_MT128: return "wgmma-ws MT=128 BN=256";
    case EPMOE_GEMM_SM90_FP8_MT64: return "fp8 wgmma MT=64 BN=128";
    case EPMOE_GEMM_SM90_FP8_MT128: return "fp8 wgmma MT=128 BN=128";
    case EPMOE_GEMM_SM90_KERNEL_COUNT: break;
    }
    return "unknown";
}

extern "C" const char *epmoe_grouped_gemm_sm90_variant(const epmoe_grouped_gemm_args *a) {
    return epmoe_grouped_gemm_sm90_kernel_name(epmoe_grouped_gemm_sm90_select(a));
}

extern "C" epmoe_status epmoe_grouped_gemm_check_args(const epmoe_grouped_gemm_args *a) {
    EPMOE_REQUIRE(a != NULL, EPMOE_ERR_INVALID_ARG, "grouped GEMM: args is NULL");
    EPMOE_REQUIRE(a->n_experts >= 1 && a->n_experts <= kMaxExperts, EPMOE_ERR_INVALID_ARG,
                  "grouped GEMM: n_experts = %lld, must be in [1, %d]", (long long)a->n_experts,
                  kMaxExperts);
    EPMOE_REQUIRE(a->N >= 32 && a->N % 32 == 0 && a->N <= (1 << 20), EPMOE_ERR_INVALID_ARG,
                  "grouped GEMM: N = %lld, must be a positive multiple of 32", (long long)a->N);
    EPMOE_REQUIRE(a->K >= 128 && a->K % 128 == 0 && a->K <= (1 << 20), EPMOE_ERR_INVALID_ARG,
                  "grouped GEMM: K = %lld, must be a positive multiple of 128", (long long)a->K);
    EPMOE_REQUIRE(a->cap_rows >= 0 && a->cap_rows <= (int64_t)1 << 31, EPMOE_ERR_INVALID_ARG,
                  "grouped GEMM: cap_rows = %lld out of range", (long long)a->cap_rows);
    EPMOE_REQUIRE(a->w_codes && a->w_sf && a->w_scale, EPMOE_ERR_INVALID_ARG,
                  "grouped GEMM: w_codes, w_sf and w_scale are required");
    EPMOE_REQUIRE(((uintptr_t)a->w_codes & 15) == 0 && ((uintptr_t)a->w_sf & 1) == 0,
                  EPMOE_ERR_INVALID_ARG,
                  "grouped GEMM: w_codes must be 16-byte aligned and w_sf 2-byte aligned");
    EPMOE_REQUIRE(a->w_slabs == 0 || a->w_slabs == 1, EPMOE_ERR_INVALID_ARG,
                  "grouped GEMM: w_slabs = %d, must be 0 (row-major) or 1 (slab layout)",
                  a->w_slabs);
    EPMOE_REQUIRE(a->w_scale_groups == 1 || a->w_scale_groups == 2, EPMOE_ERR_INVALID_ARG,
                  "grouped GEMM: w_scale_groups = %lld, must be 1 or 2",
                  (long long)a->w_scale_groups);
    EPMOE_REQUIRE(a->w_scale_split >= 0 && a->w_scale_split <= a->N, EPMOE_ERR_INVALID_ARG,
                  "grouped GEMM: w_scale_split = %lld outside [0, N = %lld]",
                  (long long)a->w_scale_split, (long long)a->N);
    EPMOE_REQUIRE(a->padded_offsets && a->tokens_per_expert && a->out, EPMOE_ERR_INVALID_ARG,
                  "grouped GEMM: padded_offsets, tokens_per_expert and out are required");
    EPMOE_REQUIRE(!a->out_bias || !a->out_bf16, EPMOE_ERR_INVALID_ARG,
                  "grouped GEMM: an output bias needs fp32 output");
    if (a->a_format == EPMOE_GEMM_A_NVFP4) {
        EPMOE_REQUIRE(a->a_codes && a->a_sf && a->a_scale, EPMOE_ERR_INVALID_ARG,
                      "grouped GEMM: NVFP4 A needs a_codes, a_sf and a_scale");
        EPMOE_REQUIRE(((uintptr_t)a->a_codes & 15) == 0 && ((uintptr_t)a->a_sf & 1) == 0,
                      EPMOE_ERR_INVALID_ARG,
                      "grouped GEMM: a_codes must be 16-byte aligned and a_sf 2-byte aligned");
        EPMOE_REQUIRE(((uintptr_t)a->a_workspace & 15) == 0, EPMOE_ERR_INVALID_ARG,
                      "grouped GEMM: a_workspace must be 16-byte aligned (or NULL)");
    } else if (a->a_format == EPMOE_GEMM_A_FP8) {
        EPMOE_REQUIRE(a->a_codes && a->a_sf && a->a_workspace, EPMOE_ERR_INVALID_ARG,
                      "grouped GEMM: FP8 A needs a_codes, a_sf and a_workspace");
        EPMOE_REQUIRE(((uintptr_t)a->a_codes & 15) == 0 && ((uintptr_t)a->a_workspace & 15) == 0,
                      EPMOE_ERR_INVALID_ARG,
                      "grouped GEMM: FP8 a_codes and a_workspace must be 16-byte aligned");
    } else if (a->a_format == EPMOE_GEMM_A_BF16) {
        EPMOE_REQUIRE(a->a_bf16 && ((uintptr_t)a->a_bf16 & 15) == 0, EPMOE_ERR_INVALID_ARG,
                      "grouped GEMM: bf16 A needs a 16-byte aligned a_bf16");
    } else {
        EPMOE_FAIL(EPMOE_ERR_INVALID_ARG, "grouped GEMM: unknown a_format %d", (int)a->a_format);
    }
    return EPMOE_OK;
}

extern "C" epmoe_status epmoe_cuda_grouped_gemm_sm90(const epmoe_grouped_gemm_args *a,
                                                     cudaStream_t stream) {
    EPMOE_TRY(epmoe_grouped_gemm_check_args(a));
    GemmParams p = make_params(a);
    if (a->cap_rows == 0) return EPMOE_OK;

    const bool fp4 = a->a_format == EPMOE_GEMM_A_NVFP4;
    const epmoe_gemm_sm90_kernel kernel = epmoe_grouped_gemm_sm90_select(a);
    if (a->a_format == EPMOE_GEMM_A_FP8 && kernel >= EPMOE_GEMM_SM90_MMA_MT32 &&
        kernel <= EPMOE_GEMM_SM90_MMA_MT128) {
        /* the mma.sync kernels take FP8 A as bf16 A: its exact bf16, in order, in the workspace */
        EPMOE_TRY(epmoe_a_rows_to_bf16_launch(p, kOrderPlain, stream));
        p.a_bf16 = (const __nv_bfloat16 *)a->a_workspace;
    }
    switch (kernel) {
    case EPMOE_GEMM_SM90_MMA_MT32:
        return fp4 ? launch_variant<32, 4, 4, true, 3>(p, stream)
                   : launch_variant<32, 4, 4, false, 3>(p, stream);
    case EPMOE_GEMM_SM90_MMA_MT64:
        return fp4 ? launch_variant<64, 4, 4, true, 2>(p, stream)
                   : launch_variant<64, 4, 4, false, 2>(p, stream);
    case EPMOE_GEMM_SM90_MMA_MT128:
        return fp4 ? launch_variant<128, 8, 4, true, 1>(p, stream)
                   : launch_variant<128, 8, 3, false, 1>(p, stream);
    case EPMOE_GEMM_SM90_WGMMA_MT128:
        /* AUTO chose it only after wgmma_usable; a forced choice is checked here */
        EPMOE_REQUIRE(a->sm90_kernel == EPMOE_GEMM_SM90_AUTO || wgmma_usable(a), EPMOE_ERR_UNSUPPORTED,
                      "grouped GEMM: the wgmma kernel needs NVFP4 or FP8 A, an a_workspace, a compute capability 9.0 device and a build for the 90a "
                      "architecture");
        return epmoe_gemm_sm90_wgmma_launch(p, stream);
    case EPMOE_GEMM_SM90_WS_MT16:
    case EPMOE_GEMM_SM90_WS_MT32:
    case EPMOE_GEMM_SM90_WS_MT64:
    case EPMOE_GEMM_SM90_WS_MT128:
        EPMOE_REQUIRE(a->sm90_kernel == EPMOE_GEMM_SM90_AUTO || wgmma_ws_usable(a), EPMOE_ERR_UNSUPPORTED,
                      "grouped GEMM: the warp-specialized wgmma kernel needs NVFP4 or FP8 A, an a_workspace, slab-layout weights, "
                      "16-byte aligned weight codes, scales and workspace, cap_rows a multiple of 8, a compute capability 9.0 "
                      "device and a build for the 90a architecture");
        return epmoe_gemm_sm90_ws_launch(p, 16 << (kernel - EPMOE_GEMM_SM90_WS_MT16), stream);
    case EPMOE_GEMM_SM90_FP8_MT64:
    case EPMOE_GEMM_SM90_FP8_MT128:
        EPMOE_REQUIRE(fp8_usable(a), EPMOE_ERR_UNSUPPORTED,
                      "grouped GEMM: the FP8 kernel needs FP8 A, the weights' FP8 image (w_fp8, "
                      "w_fp8_exp, 16-byte aligned), cap_rows a multiple of 128, a compute "
                      "capability 9.0 device and a build for the 90a architecture");
        return epmoe_gemm_sm90_fp8_launch(p, kernel == EPMOE_GEMM_SM90_FP8_MT64 ? 64 : 128, stream);
    case EPMOE_GEMM_SM90_STREAM_MT16:
        EPMOE_REQUIRE(a->a_format != EPMOE_GEMM_A_BF16 && a->a_workspace, EPMOE_ERR_UNSUPPORTED,
                      "grouped GEMM: the streaming decode kernel needs NVFP4 or FP8 A and an a_workspace");
        return epmoe_gemm_sm90_stream_launch(p, stream);
    default:
        break;
    }
    EPMOE_FAIL(EPMOE_ERR_INVALID_ARG, "grouped GEMM: unknown sm90_kernel %d", (int)a->sm90_kernel);
}

extern "C" epmoe_status epmoe_cuda_grouped_gemm(const epmoe_grouped_gemm_args *a,
                                                cudaStream_t stream) {
    int device = 0, major = 0;
    CUDA_TRY(cudaGetDevice(&device), "grouped GEMM dispatch");
    CUDA_TRY(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device),
             "reading the compute capability");
    /* Blackwell's native block-scaled MMA only where it was compiled in and the caller gave the
     * swizzled scales; Hopper (and anything else) takes the dequantizing path. */
    if (major == 10 && a && a->w_sf_swizzled && !a->w_slabs && a->a_format == EPMOE_GEMM_A_NVFP4 &&
        a->N % 128 == 0 && epmoe_cuda_grouped_gemm_sm100_available())
        return epmoe_cuda_grouped_gemm_sm100(a, stream);
    return epmoe_cuda_grouped_gemm_sm90(a, stream);
}
