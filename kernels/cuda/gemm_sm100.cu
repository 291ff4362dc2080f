/* Grouped NVFP4 GEMM for Blackwell (sm_100a): the native block-scaled MMA
 * tcgen05.mma.cta_group::1.kind::mxf4nvf4.block_scale.scale_vec::4X, contract in
 * kernels/cuda/grouped_gemm.h.
 *
 * STATUS: NOT RUN. No Blackwell GPU is available to this project; this file compiles for
 * sm_100a (CI builds it) and was reviewed against the PTX ISA text (tcgen05 instruction
 * descriptor for the block-scaled kinds, shared-memory matrix descriptor, tcgen05.cp
 * 32x128b.warpx4 for scale factors, tcgen05.ld 32x32b) and the 128x4 scales of docs/design.md §4.3,
 * nothing more. The dispatcher (epmoe_cuda_grouped_gemm) only selects it on compute capability
 * 10.x when the binary holds sm_100a code and the caller supplied w_sf_swizzled; the sm_90 path
 * (which also runs on Blackwell) is never replaced. Before trusting it on a B200, run
 * tests/gpu/test_gemm with the dispatcher forced onto this path.
 *
 * Structure (correctness first, not tuned): one CTA of 4 warps per work item = (expert, chunk of
 * 64 token rows, 128 weight rows). Operand roles as on sm_90: weights are MMA A (M = 128),
 * tokens MMA B (N = 64), so decode-sized experts do not fill 128-row tiles with padding. Per
 * K step of 64: all threads copy the weight tile (128 x 32 bytes) and token tile (64 x 32
 * bytes) into shared memory in the canonical K-major, no-swizzle core-matrix layout (8 rows x
 * 16 bytes per core matrix), and the scale tiles in the 128x4 layout (weights: one 512-byte
 * block of w_sf_swizzled; tokens: built from the linear a_sf with the same offset formula);
 * thread 0 issues tcgen05.cp (scales -> tensor memory), tcgen05.mma, tcgen05.commit; everyone
 * waits on the commit's mbarrier before overwriting shared memory. The fp32 accumulator lives
 * in tensor memory (128 lanes x 64 columns) and is read back with tcgen05.ld for the epilogue
 * (a_scale * w_scale, only live token rows written). A production version would add a TMA
 * multi-stage pipeline and warp specialization; that is future work.
 */
#include <cuda_runtime.h>
#include <stdint.h>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/grouped_gemm.h"
extern "C" {
#include "common/nvfp4.h"
}

namespace {

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM100_ALL)
#define EPMOE_SM100_DEVICE 1 /* compiling the sm_100a device pass */
#endif

constexpr int kTileN = 128;    /* weight rows per item: MMA M */
constexpr int kTileTok = 64;   /* token rows per item: MMA N */

/* docs/design.md §4.3's layout on the device. Must equal epmoe_swizzled_sf_offset (common/nvfp4.h,
 * the reference); the host launcher checks the two agree before the first launch. */
__host__ __device__ inline size_t swizzled_sf_offset(size_t r, size_t c, size_t cols) {
    const size_t cols_padded = (cols + 3) / 4 * 4;
    return (r / 128) * (cols_padded / 4) * 512 + (c / 4) * 512 + (r % 32) * 16 +
           ((r % 128) / 32) * 4 + (c % 4);
}

struct Sm100Params {
    int E, N, K;
    int64_t cap_rows;
    const uint8_t *a_codes, *a_sf;
    const float *a_scale;
    const uint8_t *w_codes, *w_sf_swizzled;
    const float *w_scale;
    int w_groups, w_split;
    const int64_t *padded_offsets, *tokens_per_expert;
    void *out;
    int out_bf16;
    const int32_t *out_row; /* NULL: identity (grouped_gemm.h) */
    const float *out_bias;  /* [E, N] or NULL (grouped_gemm.h) */
};

#ifdef EPMOE_SM100_DEVICE
constexpr int kStepK = 64;     /* MMA K for kind::mxf4nvf4 (dense) */
constexpr int kMaxExperts100 = 1024;
constexpr uint32_t kTmemCols = 128; /* D: 64 columns, SFA: 4, SFB: 4 (allocation: power of 2) */
constexpr uint32_t kTmemSfaCol = 64, kTmemSfbCol = 68;

/* Instruction descriptor, .kind::mxf4nvf4 (PTX ISA "Instruction descriptor format for
 * .kind::mxf8f6f4, .kind::mxf4 and .kind::mxf4nvf4"): bits 4-5 B scale-factor data id (0),
 * 7-9 atype (E2M1 = 1), 10-12 btype (E2M1 = 1), 13/14 negate (0), 15/16 transpose (0: both
 * K-major), 17-22 N >> 3, 23 scale type (UE4M3 = 0), 27-28 M >> 7, 29-30 A scale-factor data
 * id (0). */
constexpr uint32_t kIdesc = (1u << 7) | (1u << 10) | ((uint32_t)(kTileTok >> 3) << 17) |
                            (0u << 23) | ((uint32_t)(kTileN >> 7) << 27);

/* Shared-memory matrix descriptor: start >> 4 (bits 0-13), leading-dimension byte offset >> 4
 * (16-29), stride-dimension byte offset >> 4 (32-45), fixed 0b001 (46-48), base offset 0,
 * swizzle none (61-63 = 0). K-major, no swizzle: LBO = distance between core matrices adjacent
 * in K, SBO = distance between core matrices adjacent in M/N. */
__device__ __forceinline__ uint64_t smem_desc(uint32_t saddr, uint32_t lbo, uint32_t sbo) {
    return (uint64_t)((saddr >> 4) & 0x3FFF) | ((uint64_t)((lbo >> 4) & 0x3FFF) << 16) |
           ((uint64_t)((sbo >> 4) & 0x3FFF) << 32) | (1ull << 46);
}

/* Core-matrix offset of byte b (0..31) of row r in a [rows x 32 B] K-major tile: core matrix
 * (r/8, b/16) at ((r/8)*2 + b/16)*128, 16 bytes per row inside it. LBO = 128, SBO = 256. */
__device__ __forceinline__ uint32_t kmajor_offset(int r, int b) {
    return (uint32_t)(((r / 8) * 2 + b / 16) * 128 + (r % 8) * 16 + (b % 16));
}
#endif /* EPMOE_SM100_DEVICE */

__global__ void __launch_bounds__(128, 1) grouped_gemm_sm100_kernel(const Sm100Params p) {
#ifdef EPMOE_SM100_DEVICE
    __shared__ __align__(1024) uint8_t s_w[kTileN * 32];   /* weights, 4 KB */
    __shared__ __align__(1024) uint8_t s_t[kTileTok * 32]; /* tokens, 2 KB */
    __shared__ __align__(128) uint8_t s_sfa[512];          /* 128 rows x 4 blocks, 128x4 */
    __shared__ __align__(128) uint8_t s_sfb[512];          /* 64 live rows, rest zero */
    __shared__ __align__(8) uint64_t s_bar;
    __shared__ uint32_t s_tmem;
    __shared__ int chunk_start[kMaxExperts100 + 1];

    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int E = p.E, N = p.N, K = p.K;
    const int steps = K / kStepK;

    for (int e = tid; e < E; e += 128) {
        int64_t c = p.tokens_per_expert[e];
        const int64_t room = p.padded_offsets[e + 1] - p.padded_offsets[e];
        c = c < 0 ? 0 : (c > room ? room : c);
        chunk_start[e + 1] = (int)((c + kTileTok - 1) / kTileTok);
    }
    __syncthreads();
    if (tid == 0) {
        chunk_start[0] = 0;
        for (int e = 0; e < E; ++e) chunk_start[e + 1] += chunk_start[e];
        asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(
            (uint32_t)__cvta_generic_to_shared(&s_bar)));
        asm volatile("fence.mbarrier_init.release.cluster;");
    }
    if (warp == 0) { /* one warp allocates tensor memory for the whole CTA */
        asm volatile("tcgen05.alloc.cta_group::1.sync.aligned.shared::cta.b32 [%0], %1;" ::"r"(
                         (uint32_t)__cvta_generic_to_shared(&s_tmem)),
                     "r"(kTmemCols));
        asm volatile("tcgen05.relinquish_alloc_permit.cta_group::1.sync.aligned;");
    }
    asm volatile("tcgen05.fence::before_thread_sync;");
    __syncthreads();
    asm volatile("tcgen05.fence::after_thread_sync;");
    const uint32_t tmem = s_tmem;
    const uint32_t bar = (uint32_t)__cvta_generic_to_shared(&s_bar);
    uint32_t phase = 0;

    const int n_tiles = N / kTileN;
    const int total = chunk_start[E] * n_tiles;
    const int sf_cols = K / 16;
    const size_t w_sf_expert_bytes = (size_t)((N + 127) / 128 * 128) * ((sf_cols + 3) / 4 * 4);

    for (int item = blockIdx.x; item < total; item += gridDim.x) {
        const int chunk = item / n_tiles, nt = item % n_tiles;
        int lo = 0, hi = E - 1;
        while (lo < hi) {
            const int mid = (lo + hi + 1) / 2;
            if (chunk_start[mid] <= chunk) lo = mid; else hi = mid - 1;
        }
        const int e = lo, c_in_e = chunk - chunk_start[e];
        int64_t count = p.tokens_per_expert[e];
        const int64_t room = p.padded_offsets[e + 1] - p.padded_offsets[e];
        count = count > room ? room : count;
        const int64_t row0 = p.padded_offsets[e] + (int64_t)c_in_e * kTileTok;
        const int mrows = (int)min((int64_t)kTileTok, count - (int64_t)c_in_e * kTileTok);
        const int n0 = nt * kTileN;

        for (int step = 0; step < steps; ++step) {
            /* weights: 128 rows x 32 bytes, 16 bytes per thread-iteration */
            for (int i = tid; i < kTileN * 2; i += 128) {
                const int r = i / 2, half = i % 2;
                const uint4 v = *(const uint4 *)(p.w_codes + ((int64_t)e * N + n0 + r) * (K / 2) +
                                                 step * 32 + half * 16);
                *(uint4 *)(s_w + kmajor_offset(r, half * 16)) = v;
            }
            for (int i = tid; i < kTileTok * 2; i += 128) {
                const int r = i / 2, half = i % 2;
                uint4 v = make_uint4(0, 0, 0, 0);
                if (r < mrows)
                    v = *(const uint4 *)(p.a_codes + (row0 + r) * (K / 2) + step * 32 + half * 16);
                *(uint4 *)(s_t + kmajor_offset(r, half * 16)) = v;
            }
            /* scales: the weights' 512-byte block is stored swizzled already; the tokens' is
             * built from the linear layout with the same formula (rows past mrows: zero) */
            {
                const uint8_t *src = p.w_sf_swizzled + (size_t)e * w_sf_expert_bytes +
                                     swizzled_sf_offset((size_t)n0, (size_t)step * 4, (size_t)sf_cols);
                *(uint32_t *)(s_sfa + tid * 4) = *(const uint32_t *)(src + tid * 4);
                for (int i = tid; i < 128 * 4; i += 128) {
                    const int r = i / 4, c = i % 4;
                    const uint8_t v = r < mrows ? p.a_sf[(row0 + r) * sf_cols + step * 4 + c] : 0;
                    s_sfb[swizzled_sf_offset((size_t)r, (size_t)c, 4)] = v;
                }
            }
            /* ordinary stores -> visible to the tensor core's async proxy */
            asm volatile("fence.proxy.async.shared::cta;");
            __syncthreads();
            if (tid == 0) {
                asm volatile("tcgen05.fence::after_thread_sync;");
                const uint64_t dsfa = smem_desc((uint32_t)__cvta_generic_to_shared(s_sfa), 0, 128);
                const uint64_t dsfb = smem_desc((uint32_t)__cvta_generic_to_shared(s_sfb), 0, 128);
                asm volatile("tcgen05.cp.cta_group::1.32x128b.warpx4 [%0], %1;" ::"r"(
                                 tmem + kTmemSfaCol),
                             "l"(dsfa));
                asm volatile("tcgen05.cp.cta_group::1.32x128b.warpx4 [%0], %1;" ::"r"(
                                 tmem + kTmemSfbCol),
                             "l"(dsfb));
                const uint64_t da = smem_desc((uint32_t)__cvta_generic_to_shared(s_w), 128, 256);
                const uint64_t db = smem_desc((uint32_t)__cvta_generic_to_shared(s_t), 128, 256);
                const uint32_t accumulate = step > 0 ? 1u : 0u;
                asm volatile(
                    "{\n.reg .pred p;\nsetp.ne.u32 p, %6, 0;\n"
                    "tcgen05.mma.cta_group::1.kind::mxf4nvf4.block_scale.scale_vec::4X "
                    "[%0], %1, %2, %3, [%4], [%5], p;\n}" ::"r"(tmem),
                    "l"(da), "l"(db), "r"(kIdesc), "r"(tmem + kTmemSfaCol), "r"(tmem + kTmemSfbCol),
                    "r"(accumulate));
                asm volatile(
                    "tcgen05.commit.cta_group::1.mbarrier::arrive::one.shared::cluster.b64 [%0];" ::"r"(bar));
            }
            /* the MMA has consumed shared memory (and, last step, finished the accumulator) */
            asm volatile("{\n.reg .pred done;\nWAIT_%=:\n"
                         "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
                         "@!done bra WAIT_%=;\n}" ::"r"(bar),
                         "r"(phase));
            phase ^= 1u;
            asm volatile("tcgen05.fence::after_thread_sync;");
        }

        /* epilogue: warp w reads tensor-memory lanes 32w..32w+31 = weight rows n0+32w+lane */
        const int n = n0 + warp * 32 + lane;
        const int grp = (p.w_groups > 1 && n >= p.w_split) ? 1 : 0;
        const float wscale = p.w_scale[(int64_t)e * p.w_groups + grp];
#pragma unroll
        for (int part = 0; part < kTileTok / 16; ++part) {
            uint32_t v[16];
            const uint32_t taddr = tmem + ((uint32_t)(warp * 32) << 16) + (uint32_t)(part * 16);
            asm volatile("tcgen05.ld.sync.aligned.32x32b.x16.b32 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,"
                         "%10,%11,%12,%13,%14,%15}, [%16];"
                         : "=r"(v[0]), "=r"(v[1]), "=r"(v[2]), "=r"(v[3]), "=r"(v[4]), "=r"(v[5]),
                           "=r"(v[6]), "=r"(v[7]), "=r"(v[8]), "=r"(v[9]), "=r"(v[10]),
                           "=r"(v[11]), "=r"(v[12]), "=r"(v[13]), "=r"(v[14]), "=r"(v[15])
                         : "r"(taddr));
            asm volatile("tcgen05.wait::ld.sync.aligned;");
#pragma unroll
            for (int j = 0; j < 16; ++j) {
                const int tr = part * 16 + j;
                if (tr < mrows) {
                    const int64_t row = p.out_row ? (int64_t)p.out_row[row0 + tr] : row0 + tr;
                    const float val = __uint_as_float(v[j]) * wscale * p.a_scale[row0 + tr];
                    if (p.out_bf16)
                        ((__nv_bfloat16 *)p.out)[row * N + n] = __float2bfloat16_rn(val);
                    else
                        ((float *)p.out)[row * N + n] =
                            p.out_bias ? __fadd_rn(val, p.out_bias[(int64_t)e * N + n]) : val;
                }
            }
        }
        asm volatile("tcgen05.fence::before_thread_sync;");
        __syncthreads(); /* accumulator read before the next item's first MMA overwrites it */
        asm volatile("tcgen05.fence::after_thread_sync;");
    }
    if (warp == 0)
        asm volatile("tcgen05.dealloc.cta_group::1.sync.aligned.b32 %0, %1;" ::"r"(tmem),
                     "r"(kTmemCols));
#else
    (void)p;
    __trap(); /* no sm_100a code in this build: the host never launches it then */
#endif
}

} // namespace

extern "C" int epmoe_cuda_grouped_gemm_sm100_available(void) {
    cudaFuncAttributes attr;
    if (cudaFuncGetAttributes(&attr, grouped_gemm_sm100_kernel) != cudaSuccess) {
        cudaGetLastError();
        return 0;
    }
    return attr.binaryVersion == 100; /* sm_100a machine code for this device */
}

extern "C" epmoe_status epmoe_cuda_grouped_gemm_sm100(const epmoe_grouped_gemm_args *a,
                                                      cudaStream_t stream) {
    EPMOE_TRY(epmoe_grouped_gemm_check_args(a));
    EPMOE_REQUIRE(a->a_format == EPMOE_GEMM_A_NVFP4, EPMOE_ERR_UNSUPPORTED,
                  "grouped GEMM sm_100: only NVFP4 activations (bf16 A takes the sm_90 path)");
    EPMOE_REQUIRE(a->w_sf_swizzled != NULL, EPMOE_ERR_INVALID_ARG,
                  "grouped GEMM sm_100: w_sf_swizzled (128x4 layout) is required");
    EPMOE_REQUIRE(a->N % kTileN == 0, EPMOE_ERR_UNSUPPORTED,
                  "grouped GEMM sm_100: N = %lld must be a multiple of %d", (long long)a->N, kTileN);
    EPMOE_REQUIRE(epmoe_cuda_grouped_gemm_sm100_available(), EPMOE_ERR_UNSUPPORTED,
                  "grouped GEMM sm_100: this binary holds no sm_100a code for this device");
    /* the device copy of the 128x4 formula must match the reference one */
    const size_t cols = (size_t)a->K / 16;
    for (size_t r = 0; r < 300; r += 37)
        for (size_t c = 0; c < cols; c += 3)
            EPMOE_REQUIRE(swizzled_sf_offset(r, c, cols) == epmoe_swizzled_sf_offset(r, c, cols),
                          EPMOE_ERR_INTERNAL,
                          "grouped GEMM sm_100: 128x4 offset formula disagrees at (%zu, %zu)", r, c);
    if (a->cap_rows == 0) return EPMOE_OK;
    Sm100Params p;
    p.E = (int)a->n_experts;
    p.N = (int)a->N;
    p.K = (int)a->K;
    p.cap_rows = a->cap_rows;
    p.a_codes = a->a_codes;
    p.a_sf = a->a_sf;
    p.a_scale = a->a_scale;
    p.w_codes = a->w_codes;
    p.w_sf_swizzled = a->w_sf_swizzled;
    p.w_scale = a->w_scale;
    p.w_groups = (int)a->w_scale_groups;
    p.w_split = (int)a->w_scale_split;
    p.padded_offsets = a->padded_offsets;
    p.tokens_per_expert = a->tokens_per_expert;
    p.out = a->out;
    p.out_bf16 = a->out_bf16;
    p.out_row = a->out_row;
    p.out_bias = a->out_bias;
    int device = 0, sms = 0;
    CUDA_TRY(cudaGetDevice(&device), "grouped GEMM sm_100 launch");
    CUDA_TRY(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device),
             "reading the multiprocessor count");
    const int64_t max_items = (a->cap_rows / kTileTok + a->n_experts) * (a->N / kTileN);
    int64_t blocks = sms;
    if (blocks > max_items) blocks = max_items;
    if (blocks < 1) blocks = 1;
    grouped_gemm_sm100_kernel<<<(unsigned)blocks, 128, 0, stream>>>(p);
    CUDA_TRY_LAUNCH("grouped NVFP4 GEMM (sm_100a)");
    return EPMOE_OK;
}
