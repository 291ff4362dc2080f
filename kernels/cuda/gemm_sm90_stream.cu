/* Streaming decode grouped GEMM (any sm_80+ device; Hopper is what it is tuned on): AUTO's
 * kernel for NVFP4 A at <= 16 rows per expert when the caller gives the bf16 workspace.
 * Contract in grouped_gemm.h; dequantization and K order in gemm_sm90_common.cuh.
 *
 * Why a second decode kernel. The shared-memory kernel (gemm_sm90.cu) stages every 128-k step
 * of weights and tokens through shared memory behind a block barrier, 12 warps per SM. Here
 * nothing is shared between warps and there is no barrier after the work list is built:
 *   - each warp owns one (16-token chunk, 32 weight rows) work item at a time and streams its
 *     weight rows global -> registers (16-byte loads that bypass L1, kDepth steps in flight);
 *     in the slab layout (grouped_gemm.h) one step of the warp's rows is 2 KB contiguous. One
 *     weight cursor runs across the warp's work items, so the next item's first steps are in
 *     flight while this one finishes (a fresh ring per item stalled on every item's first
 *     step in Nsight Compute);
 *   - the token operand is the workspace copy of A in fragment order (pre-pass): one 16-byte
 *     piece per (8 token rows, word q) is a thread's whole B operand of two k16 slices. Each
 *     thread copies its own pieces of the next step into its own shared-memory slots
 *     (cp.async; no barrier, a thread reads only what it copied), so the MMAs wait on shared
 *     memory, not on L2 (loading them a word ahead from L1/L2 was the other stall it showed).
 * Against the kernel without the two: no slower at 8 rows per expert, faster at 16
 * (docs/perf-history.md §2). The schedule is in gemm_sm90_stream_schedule.cuh and is replayed
 * on the host by tests/gpu/test_stream_schedule.cu. The MMAs see the same k16 slices in the same
 * order as every other Hopper kernel, so the output bits are the same (test_gemm checks it). */
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <type_traits>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/gemm_sm90_common.cuh"
#include "kernels/cuda/gemm_sm90_stream_schedule.cuh"

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
/* One work item: (token chunk, 32-row weight slab). */
struct StreamItem {
    int e, mrows, n_warp;
    int64_t row0;
};
template <int MT>
__device__ __forceinline__ StreamItem stream_item(const GemmParams &p, const int *chunk_start, int item,
                                                  int n_slabs) {
    const Chunk ck = find_chunk<MT>(p, chunk_start, item / n_slabs);
    StreamItem s;
    s.e = ck.e;
    s.mrows = ck.mrows;
    s.row0 = ck.row0;
    s.n_warp = (item % n_slabs) * 32;
    return s;
}

/* Bytes of token slots per block: kDepth stages x kNT8 tiles x 4 words x 16 bytes a thread. */
template <int MT, int NWARPS, int kDepth>
constexpr int stream_smem_bytes() {
    return kDepth * (MT / 8) * 4 * NWARPS * 32 * 16;
}

template <int MT, int NWARPS, int kDepth, int kMinBlocks, bool kSlabs>
__global__ void __launch_bounds__(NWARPS * 32, kMinBlocks)
    grouped_gemm_stream_kernel(const GemmParams p) {
    constexpr int kNT8 = MT / 8;
    constexpr int kThreads = NWARPS * 32;
    static_assert(kDepth == 2, "the step loop below is unrolled for 2 slots");
    __shared__ int chunk_start[kMaxExperts + 1];
    extern __shared__ uint4 tok_slots[]; /* [kDepth][kNT8][4 words][kThreads] */

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane / 4, t = lane % 4;
    const int E = p.E, K = p.K;
    const int steps = K / kStepK;

    build_chunk_list<MT>(p, chunk_start);
    const int n_slabs = p.N / 32; /* N is a multiple of 32 (checked) */
    const int total = chunk_start[E] * n_slabs;
    const int stride = gridDim.x * NWARPS;
    const float fix = kDequantFix * kDequantFix;
    StreamCursor ccur = {(int)blockIdx.x * NWARPS + warp, 0}; /* compute */
    if (ccur.item >= total) { /* no block barrier below */
        wait_for_prepass();   /* so that this grid's end still means the pre-pass's end */
        return;
    }

    /* the layout's step and row distances, the same for every item */
    const WeightWalk walk0 = weight_walk<kSlabs>(p, 0, g, t);
    const int64_t tk_row8 = 8 * (int64_t)K * 2;

    /* weight cursor: rows g + 8r of the item's slab, span t, at wc / ws */
    StreamCursor wcur = ccur;
    const uint8_t *wc, *ws;
    auto seek = [&](int item) {
        const int e = chunk_expert(chunk_start, E, item / n_slabs);
        const WeightWalk w = weight_walk<kSlabs>(p, e, (item % n_slabs) * 32 + g, t);
        wc = p.w_codes + w.code;
        ws = p.w_sf + w.sf + 2 * t;
    };
    seek(wcur.item);
    auto load_next = [&](uint4 (&w)[4], uint32_t (&s)[4]) {
        if (wcur.item >= total) return;
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            w[r] = ld_stream16(wc + r * walk0.code_row8 + wcur.step * walk0.code_step);
            s[r] = ld_stream_u16(ws + r * walk0.sf_row8 + wcur.step * walk0.sf_step);
        }
        if (wcur.advance(steps, stride) && wcur.item < total) seek(wcur.item);
    };

    /* the item being computed and the next one (whose tokens are copied during this one's last
     * step); their rows come from global memory, asked for an item ahead */
    StreamItem cur = stream_item<MT>(p, chunk_start, ccur.item, n_slabs);
    StreamItem nxt = cur;
    if (ccur.item + stride < total) nxt = stream_item<MT>(p, chunk_start, ccur.item + stride, n_slabs);

    /* token row 8c + g of the item, fragment chunk 4q + t of each 256-byte step (kOrderFragments;
     * rows past mrows in the last tile are padding or the next chunk's rows: inside the padded
     * layout, and their products land in accumulators the epilogue never writes) */
    auto slot = [&](int stage, int c, int q) -> uint4 & {
        return tok_slots[((stage * kNT8 + c) * 4 + q) * kThreads + threadIdx.x];
    };
    auto copy_tokens = [&](const StreamItem &it, int step, int stage) {
        const int live = (it.mrows + 7) / 8;
        const uint8_t *tk = (const uint8_t *)p.a_ws + (it.row0 + g) * (int64_t)K * 2 + 16 * t;
#pragma unroll
        for (int c = 0; c < kNT8; ++c)
            if (c < live)
#pragma unroll
                for (int q = 0; q < 4; ++q)
                    cp_async16_ca(&slot(stage, c, q), tk + c * tk_row8 + step * 256 + q * 64);
        cp_async_commit();
    };

    float acc[2][kNT8][4];
    zero_warp_tile<kNT8>(acc);

    auto compute = [&](int stage, const uint4 (&w)[4], const uint32_t (&s)[4]) {
        const int live_c = (cur.mrows + 7) / 8;
        uint32_t S[4][2];
#pragma unroll
        for (int r = 0; r < 4; ++r) sf_pair_to_bf16x2(s[r], S[r]);
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            uint32_t A[2][2][4]; /* [m16 tile][k16 slice][fragment] */
            word_fragments<kSlabs, 2>(w, S, q, A);
#pragma unroll
            for (int c = 0; c < kNT8; ++c)
                if (c < live_c) {
                    const uint4 b = slot(stage, c, q); /* B of slices 2q, 2q+1 */
                    mma_word<kNT8>(acc, c, A, b);
                }
        }
    };

    uint4 wb[kDepth][4];
    uint32_t sb[kDepth][4];
#pragma unroll
    for (int d = 0; d < kDepth; ++d) load_next(wb[d], sb[d]);
    wait_for_prepass(); /* everything above ran beside the pre-pass; the tokens are its output */
    copy_tokens(cur, 0, 0);

    /* one global step in ring slot D (a constant, so the ring stays in registers); true once
     * this warp's work is done */
    auto one_step = [&](auto slot_constant) -> bool {
        constexpr int d = decltype(slot_constant)::value;
        StreamCursor tcur = ccur; /* the token cursor: the next global step */
        const bool tokens_of_next_item = tcur.advance(steps, stride);
        if (tcur.item < total) copy_tokens(tokens_of_next_item ? nxt : cur, tcur.step, (d + 1) % kDepth);
        else cp_async_commit(); /* an empty group: wait<1> below still means "this step's" */
        cp_async_wait<1>();
        compute(d, wb[d], sb[d]);
        load_next(wb[d], sb[d]);
        if (ccur.advance(steps, stride)) {
            store_warp_tile<kNT8>(p, acc, cur.e, cur.n_warp, cur.row0, cur.mrows, fix, g, t);
            if (ccur.item >= total) return true;
            cur = nxt;
            if (ccur.item + stride < total) nxt = stream_item<MT>(p, chunk_start, ccur.item + stride, n_slabs);
            zero_warp_tile<kNT8>(acc);
        }
        return false;
    };
    for (;;) {
        if (one_step(std::integral_constant<int, 0>{})) return;
        if (one_step(std::integral_constant<int, 1>{})) return;
    }
}

/* The streaming kernel: the occupancy's blocks on every SM, never more warps than the largest
 * possible work list (one item per warp), launched while the pre-pass that writes A's bf16 copy
 * in fragment order still runs (launch_after_prepass). */
template <int MT, int NWARPS, int kDepth, int kMinBlocks, bool kSlabs>
epmoe_status launch_stream(const GemmParams &p, cudaStream_t stream) {
    auto kernel = grouped_gemm_stream_kernel<MT, NWARPS, kDepth, kMinBlocks, kSlabs>;
    constexpr int smem = stream_smem_bytes<MT, NWARPS, kDepth>();
    CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem),
             "raising the streaming grouped GEMM's shared-memory limit");
    int per_sm = 0;
    CUDA_TRY(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, NWARPS * 32, smem),
             "streaming grouped GEMM occupancy");
    if (per_sm < 1) EPMOE_FAIL(EPMOE_ERR_CUDA, "the streaming grouped GEMM (MT=%d) does not fit on an SM", MT);
    const int64_t max_items = (p.cap_rows / MT + p.E) * (p.N / 32);
    unsigned grid = 0;
    EPMOE_TRY(persistent_grid(per_sm, (max_items + NWARPS - 1) / NWARPS, &grid));
    EPMOE_TRY(epmoe_a_rows_to_bf16_launch(p, kOrderFragments, stream));
    return launch_after_prepass(kernel, grid, NWARPS * 32, smem, p, stream);
}

} // namespace

epmoe_status epmoe_sm90::epmoe_gemm_sm90_stream_launch(const GemmParams &p, cudaStream_t stream) {
    /* 16-token chunks, two weight steps in flight per warp (125-127 registers, no spill; three
     * spill), 8 warps, 2 blocks per SM: 16 warps per SM; token slots 64 KB a block. (An 8-token
     * instance with three steps in flight gained nothing at 8 rows and lost at 16; a 32-token
     * one at 168 registers lost to the shared-memory kernel at 32 rows: docs/perf-history.md
     * §4.) */
    return p.w_slabs ? launch_stream<16, 8, 2, 2, true>(p, stream)
                     : launch_stream<16, 8, 2, 2, false>(p, stream);
}
