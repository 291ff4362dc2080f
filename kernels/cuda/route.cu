/* Gate logits and routing on the device (kernels/ops.h defines the math; this follows it
 * operation for operation so that logits and ids equal the CPU's): sqrtsoftplus and sigmoid
 * scores with a selection bias (DeepSeek), topk_softmax over logit + bias (gpt-oss), hash tables. */
#include <math.h>

#include "kernels/cuda/cp_async.cuh"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/ops_cuda.h"

epmoe_status epmoe_cuda_flags_status(uint32_t flags, const char *where) {
    if (flags == 0) return EPMOE_OK;
    EPMOE_REQUIRE(!(flags & EPMOE_CUDA_FLAG_NONFINITE_LOGIT), EPMOE_ERR_NUMERIC,
                  "%s: a token's gate logits contain NaN/Inf (device flags 0x%x); its ids "
                  "were replaced by 0..k-1 with weight 0",
                  where, flags);
    EPMOE_REQUIRE(!(flags & EPMOE_CUDA_FLAG_TOKEN_RANGE), EPMOE_ERR_RANGE,
                  "%s: a token id is outside [0, vocab_size) in a hash-routed layer (device "
                  "flags 0x%x)",
                  where, flags);
    EPMOE_REQUIRE(!(flags & EPMOE_CUDA_FLAG_TABLE_RANGE), EPMOE_ERR_RANGE,
                  "%s: a tid2eid entry is outside [0, n_experts) (device flags 0x%x)", where,
                  flags);
    /* EPMOE_CUDA_FLAG_ZERO_SCORE_SUM is no longer raised: weights are normalized in log space */
    EPMOE_REQUIRE(!(flags & EPMOE_CUDA_FLAG_ZERO_SCORE_SUM), EPMOE_ERR_NUMERIC,
                  "%s: the scores of a token's chosen experts sum to 0 (device flags 0x%x)",
                  where, flags);
    EPMOE_FAIL(EPMOE_ERR_INTERNAL, "%s: unknown device error flags 0x%x", where, flags);
}

/* ---- gate logits ----------------------------------------------------------------------------
 * The blocked order of kernels/ops.h: chunk c's partial is one fmaf chain from +0 over its
 * EPMOE_GATE_CHUNK h in increasing h; the logit is 0 + p_0 + p_1 + ... in increasing c, each
 * addition __fadd_rn. Every kernel below computes exactly that, so every kernel (and the CPU)
 * gives the same bits; they differ only in how the chains are spread over threads.
 *
 * One template, a tile of BT = PT*TM tokens x BE = PE*TN experts per block:
 *  - G chunk groups: group g runs chunks g, g + G, g + 2G, ... (one "round" = G chunks side by
 *    side), each of its PT x PE threads a TM x TN register tile of independent chains. G = 1
 *    (large batches: enough tiles to fill the GPU) keeps the running sums in registers and adds
 *    each chunk's partial when the chunk ends; G > 1 (small batches: few tiles, so the chunks
 *    supply the parallelism) writes the partials of a round to shared memory, where the
 *    thread that owns an output folds them into its running sum in chunk order.
 *  - x and Wg stream through a ring of STAGES shared-memory slices, BK h of every chunk of the
 *    round per slice, copied by cp.async STAGES - 1 slices ahead of the fmafs, one barrier a
 *    slice. Rows are stored h-contiguous (BK + 4 floats: 16-byte aligned, and the rows a warp
 *    reads at one h fall in different banks), read as float4: TM + TN vector loads per
 *    4 * TM * TN fmafs. A thread's tokens and experts are strided (pt + PT*i, pe + PE*j) so
 *    that neighbouring lanes read neighbouring rows.
 *  - Past T, E or H the copies write zeros (src-size 0, nothing read). Zero padding is exact,
 *    though not quite because nothing is -0: a partial can be -0 (fmaf(-1e-30f, 1e-20f, +0):
 *    a negative product below half the smallest subnormal rounds to -0), and a padded step
 *    fmaf(0, 0, -0) = +0 then flips it where the CPU, with no padded steps, keeps -0. Padding
 *    only ever follows the last real h of the last chunk, so only that partial's sign of zero
 *    can differ, and the running sum absorbs it: it starts at +0 and an fp32 sum is -0 only
 *    when both operands are, so it is never -0, and s + (+0) = s + (-0) for every such s. Any
 *    nonzero, Inf or NaN partial passes fmaf(0, 0, .) unchanged. */
template <int G, int PT, int PE, int TM, int TN, int BK, int STAGES> struct GateTile {
    static constexpr int kThreads = G * PT * PE;
    static constexpr int kBT = PT * TM, kBE = PE * TN;
    static constexpr int kOutputs = kBT * kBE;
    static constexpr int kRows = kBT + kBE;       /* tokens first, then experts */
    static constexpr int kRow = BK + 4;           /* floats a staged row piece */
    static constexpr int kGroup = kRows * kRow + 4; /* +4: groups start in different banks */
    static constexpr int kStage = G * kGroup;
    static constexpr int kPieces = BK / 4;        /* 16-byte pieces a row piece */
    static constexpr int kSlicesPerChunk = EPMOE_GATE_CHUNK / BK;
    static constexpr int kOwn = (kOutputs + kThreads - 1) / kThreads; /* G > 1: outputs folded */
    static_assert(EPMOE_GATE_CHUNK % BK == 0 && BK % 4 == 0, "slices tile a chunk in float4s");
    static_assert(STAGES >= 2, "a ring");
};

template <int G, int PT, int PE, int TM, int TN, int BK, int STAGES, int MIN_BLOCKS, bool VEC>
__global__ void __launch_bounds__(G *PT *PE, MIN_BLOCKS)
    gate_logits_kernel(const float *x, const float *gate_weight, int64_t T, int64_t H, int64_t E,
                       float *logits) {
    using K = GateTile<G, PT, PE, TM, TN, BK, STAGES>;
    constexpr int CH = EPMOE_GATE_CHUNK;
    /* the ring, then (G > 1) a round's partials, [g][token][expert] */
    __shared__ __align__(16) float smem[STAGES * K::kStage + (G > 1 ? G * K::kOutputs : 0)];
    float *const ring = smem, *const part = smem + STAGES * K::kStage;
    const int tid = threadIdx.x;
    const int g = tid / (PT * PE), pe = tid % PE, pt = (tid / PE) % PT;
    const int64_t t0 = (int64_t)blockIdx.x * K::kBT, e0 = (int64_t)blockIdx.y * K::kBE;
    const int64_t n_chunks = (H + CH - 1) / CH;
    const int64_t rounds = (n_chunks + G - 1) / G;
    const int64_t n_slices = rounds * K::kSlicesPerChunk;

    /* This thread's 16-byte pieces of every slice, fixed but for h: piece i is row `row` of
     * group gi, floats [4q, 4q + 4) of the slice. Computed once, so that a slice's copies cost
     * an add per piece, not the divisions that place it. */
    constexpr int kPiecesAll = G * K::kRows * K::kPieces;
    constexpr int kCopies = (kPiecesAll + K::kThreads - 1) / K::kThreads;
    const float *c_src[kCopies]; /* row start, or any valid address when the row is padding */
    int c_dst[kCopies];          /* float offset in a stage; -1: no piece */
    int c_h[kCopies];            /* h offset from the round's first h */
    bool c_row_ok[kCopies];
#pragma unroll
    for (int m = 0; m < kCopies; m++) {
        const int i = tid + m * K::kThreads;
        const int gi = i / (K::kRows * K::kPieces), rem = i % (K::kRows * K::kPieces);
        const int row = rem / K::kPieces, q = rem % K::kPieces;
        const bool is_x = row < K::kBT;
        const int64_t r = is_x ? t0 + row : e0 + (row - K::kBT);
        c_row_ok[m] = i < kPiecesAll && r < (is_x ? T : E);
        c_src[m] = (is_x ? x : gate_weight) + (c_row_ok[m] ? r * H : 0);
        c_dst[m] = i < kPiecesAll ? gi * K::kGroup + row * K::kRow + 4 * q : -1;
        c_h[m] = gi * CH + 4 * q;
    }
    /* slice s -> stage s % STAGES: BK h at offset k0 of each of the round's G chunks */
    auto copy_slice = [&](int64_t s) {
        float *stage = ring + (int)(s % STAGES) * K::kStage;
        const int64_t h0 = (s / K::kSlicesPerChunk) * G * CH + (s % K::kSlicesPerChunk) * BK;
#pragma unroll
        for (int m = 0; m < kCopies; m++) {
            if (c_dst[m] < 0) continue;
            const int64_t h = h0 + c_h[m];
            float *dst = stage + c_dst[m];
            if constexpr (VEC) {
                const bool ok = c_row_ok[m] && h < H; /* H % 4 == 0: all in or all out */
                cp_async16_or_zero(dst, ok ? c_src[m] + h : c_src[m], ok);
            } else {
#pragma unroll
                for (int u = 0; u < 4; u++) {
                    const bool ok = c_row_ok[m] && h + u < H;
                    cp_async4_or_zero(dst + u, ok ? c_src[m] + h + u : c_src[m], ok);
                }
            }
        }
    };

    float acc[TM][TN];
    float total[G == 1 ? TM : K::kOwn][G == 1 ? TN : 1];
#pragma unroll
    for (int i = 0; i < TM; i++)
#pragma unroll
        for (int j = 0; j < TN; j++) acc[i][j] = 0.0f;
#pragma unroll
    for (int i = 0; i < (G == 1 ? TM : K::kOwn); i++)
#pragma unroll
        for (int j = 0; j < (G == 1 ? TN : 1); j++) total[i][j] = 0.0f;

    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < n_slices) copy_slice(s);
        cp_async_commit(); /* one group a slice, even empty */
    }
    for (int64_t s = 0; s < n_slices; ++s) {
        /* groups committed: STAGES - 1 + s, the last STAGES - 2 may still fly: slice s has
         * landed for this thread; the barrier makes it everyone's and frees the stage slice
         * s - 1 was read from, for slice s + STAGES - 1 */
        cp_async_wait<STAGES - 2>();
        __syncthreads();
        if (s + STAGES - 1 < n_slices) copy_slice(s + STAGES - 1);
        cp_async_commit();

        const float *grp = ring + (int)(s % STAGES) * K::kStage + g * K::kGroup;
#pragma unroll
        for (int kk = 0; kk < BK; kk += 4) {
            float4 wv[TN];
#pragma unroll
            for (int j = 0; j < TN; j++)
                wv[j] = *(const float4 *)(grp + (K::kBT + pe + PE * j) * K::kRow + kk);
#pragma unroll
            for (int i = 0; i < TM; i++) {
                const float4 xv = *(const float4 *)(grp + (pt + PT * i) * K::kRow + kk);
#pragma unroll
                for (int j = 0; j < TN; j++) { /* h, h+1, h+2, h+3 in order */
                    acc[i][j] = fmaf(xv.x, wv[j].x, acc[i][j]);
                    acc[i][j] = fmaf(xv.y, wv[j].y, acc[i][j]);
                    acc[i][j] = fmaf(xv.z, wv[j].z, acc[i][j]);
                    acc[i][j] = fmaf(xv.w, wv[j].w, acc[i][j]);
                }
            }
        }

        if ((s + 1) % K::kSlicesPerChunk != 0) continue; /* the chunk goes on */
        if constexpr (G == 1) {
#pragma unroll
            for (int i = 0; i < TM; i++)
#pragma unroll
                for (int j = 0; j < TN; j++) {
                    total[i][j] = __fadd_rn(total[i][j], acc[i][j]);
                    acc[i][j] = 0.0f;
                }
        } else {
#pragma unroll
            for (int i = 0; i < TM; i++)
#pragma unroll
                for (int j = 0; j < TN; j++) {
                    part[g * K::kOutputs + (pt + PT * i) * K::kBE + pe + PE * j] = acc[i][j];
                    acc[i][j] = 0.0f;
                }
            __syncthreads();
            /* chunks of this round in increasing c, none past the last (their partials are
             * +0 and would change nothing, but need not be added). The next write to part
             * comes after the next slice's barrier. */
            const int64_t first = (s / K::kSlicesPerChunk) * G;
            const int live = (int)(n_chunks - first < G ? n_chunks - first : G);
#pragma unroll
            for (int m = 0; m < K::kOwn; m++) {
                const int o = tid + m * K::kThreads;
                if (o < K::kOutputs)
                    for (int gi = 0; gi < live; gi++)
                        total[m][0] = __fadd_rn(total[m][0], part[gi * K::kOutputs + o]);
            }
        }
    }

    if constexpr (G == 1) {
#pragma unroll
        for (int i = 0; i < TM; i++) {
            const int64_t t = t0 + pt + PT * i;
#pragma unroll
            for (int j = 0; j < TN; j++) {
                const int64_t e = e0 + pe + PE * j;
                if (t < T && e < E) logits[t * E + e] = total[i][j];
            }
        }
    } else {
#pragma unroll
        for (int m = 0; m < K::kOwn; m++) {
            const int o = tid + m * K::kThreads;
            const int64_t t = t0 + o / K::kBE, e = e0 + o % K::kBE;
            if (o < K::kOutputs && t < T && e < E) logits[t * E + e] = total[m][0];
        }
    }
}

template <int G, int PT, int PE, int TM, int TN, int BK, int STAGES, int MIN_BLOCKS>
static epmoe_status launch_gate_logits(const float *x, const float *gate_weight, int64_t T,
                                       int64_t H, int64_t E, float *logits,
                                       cudaStream_t stream) {
    using K = GateTile<G, PT, PE, TM, TN, BK, STAGES>;
    const dim3 grid((unsigned)((T + K::kBT - 1) / K::kBT), (unsigned)((E + K::kBE - 1) / K::kBE));
    /* 16-byte copies need 16-byte rows; otherwise (H = 7, unaligned slices) 4-byte ones */
    const bool vec = H % 4 == 0 && (uintptr_t)x % 16 == 0 && (uintptr_t)gate_weight % 16 == 0;
    if (vec)
        gate_logits_kernel<G, PT, PE, TM, TN, BK, STAGES, MIN_BLOCKS, true>
            <<<grid, K::kThreads, 0, stream>>>(x, gate_weight, T, H, E, logits);
    else
        gate_logits_kernel<G, PT, PE, TM, TN, BK, STAGES, MIN_BLOCKS, false>
            <<<grid, K::kThreads, 0, stream>>>(x, gate_weight, T, H, E, logits);
    CUDA_TRY_LAUNCH("gate_logits_kernel");
    return EPMOE_OK;
}

static int64_t tiles(int64_t T, int64_t E, int64_t bt, int64_t be) {
    return ((T + bt - 1) / bt) * ((E + be - 1) / be);
}

epmoe_status epmoe_cuda_gate_logits_kernel(int kernel, const float *x, const float *gate_weight,
                                           int64_t T, int64_t H, int64_t E, float *logits,
                                           cudaStream_t stream) {
    EPMOE_REQUIRE(T >= 0 && H > 0 && E > 0, EPMOE_ERR_INVALID_ARG,
                  "gate logits: bad shape T=%lld H=%lld E=%lld", (long long)T, (long long)H,
                  (long long)E);
    EPMOE_REQUIRE(T / 4 < INT32_MAX && (E + 3) / 4 <= 65535, EPMOE_ERR_INVALID_ARG,
                  "gate logits: T=%lld E=%lld exceed the grid", (long long)T, (long long)E);
    EPMOE_REQUIRE(kernel >= -1 && kernel < EPMOE_CUDA_GATE_KERNELS, EPMOE_ERR_INVALID_ARG,
                  "gate logits: no kernel %d", kernel);
    if (T == 0) return EPMOE_OK;
    if (kernel < 0) {
        int device = 0, n_sms = 0;
        CUDA_TRY(cudaGetDevice(&device), "gate logits: current device");
        CUDA_TRY(cudaDeviceGetAttribute(&n_sms, cudaDevAttrMultiProcessorCount, device),
                 "gate logits: multiprocessor count");
        /* The largest tile that still gives the GPU enough blocks: large tiles read x and Wg
         * from L2 fewest times (a tile reads BT + BE rows for BT x BE outputs); chunk groups
         * (G > 1) make up the parallelism that few tiles lack. */
        kernel = tiles(T, E, 128, 64) >= n_sms     ? 0
                 : 2 * tiles(T, E, 64, 64) >= n_sms ? 1
                 : tiles(T, E, 16, 32) >= n_sms     ? 2
                 : 2 * tiles(T, E, 8, 16) >= n_sms  ? 3
                                                    : 4;
    }
    switch (kernel) {
    case 0: /* prefill: 128 x 64, 8 x 4 chains a thread */
        return launch_gate_logits<1, 16, 16, 8, 4, 16, 3, 2>(x, gate_weight, T, H, E, logits,
                                                             stream);
    case 1: /* 64 x 64, 4 x 4 a thread */
        return launch_gate_logits<1, 16, 16, 4, 4, 16, 3, 2>(x, gate_weight, T, H, E, logits,
                                                             stream);
    case 2: /* 16 x 32, four chunks side by side */
        return launch_gate_logits<4, 8, 8, 2, 4, 8, 4, 1>(x, gate_weight, T, H, E, logits,
                                                          stream);
    case 3: /* 8 x 16, eight chunks side by side */
        return launch_gate_logits<8, 4, 8, 2, 2, 8, 4, 1>(x, gate_weight, T, H, E, logits,
                                                          stream);
    default: /* decode: 4 x 4, 32 chunks side by side (all of V4-Flash's) */
        return launch_gate_logits<32, 1, 4, 4, 1, 8, 3, 1>(x, gate_weight, T, H, E, logits,
                                                           stream);
    }
}

epmoe_status epmoe_cuda_gate_logits(const float *x, const float *gate_weight, int64_t T,
                                    int64_t H, int64_t E, float *logits, cudaStream_t stream) {
    return epmoe_cuda_gate_logits_kernel(-1, x, gate_weight, T, H, E, logits, stream);
}

/* ---- scores --------------------------------------------------------------------------------- */

/* topk_softmax (gpt-oss) ranks the logits themselves: its score is the logit. */
static __device__ __forceinline__ float score_of_logit(float l, int64_t scoring) {
    if (scoring == EPMOE_SCORING_TOPK_SOFTMAX) return l;
    if (scoring == EPMOE_SCORING_SIGMOID) return __fdiv_rn(1.0f, __fadd_rn(1.0f, expf(-l)));
    float softplus = l > 20.0f ? l : log1pf(expf(l));
    return sqrtf(softplus);
}

/* Is (v, id) better than (best_v, best_id)? Larger value, ties to the lower id. */
static __device__ __forceinline__ bool better(float v, int id, float best_v, int best_id) {
    return v > best_v || (v == best_v && id < best_id);
}

/* Warp-wide argmax of (value, id) pairs, ties to the lower id; every lane gets the result. */
static __device__ __forceinline__ void warp_argmax(float *v, int *id) {
    for (int off = 16; off > 0; off >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, *v, off);
        int oid = __shfl_xor_sync(0xffffffffu, *id, off);
        if (better(ov, oid, *v, *id)) {
            *v = ov;
            *id = oid;
        }
    }
}

/* log s, the CPU's log_score_of_logit (kernels/cpu/route.c) operation for operation: finite
 * for every finite logit, where the scores themselves underflow below about -87. */
static __device__ __forceinline__ float log_score_of_logit(float l, int64_t scoring) {
    if (scoring == EPMOE_SCORING_TOPK_SOFTMAX) return l; /* given l + bias: softmax's exponent */
    if (scoring == EPMOE_SCORING_SIGMOID)
        return l < 0.0f ? __fsub_rn(l, log1pf(expf(l))) : -log1pf(expf(-l));
    if (l < -20.0f) return __fmul_rn(0.5f, l);
    return __fmul_rn(0.5f, logf(l > 20.0f ? l : log1pf(expf(l))));
}

/* Weights w_j = s[id_j] / (sum over slots of s) * scale, as the CPU computes them: r_j =
 * expf(log s_j - max log s), w_j = r_j / (sum of r in slot order) * scale. The largest r is 1,
 * so the sum cannot underflow however negative the logits. softmax_bias (topk_softmax only, may
 * be NULL): the weights are a softmax over the chosen keys l + bias, recomputed here with the
 * same one addition as the selection's (route_kernel has masked its copy of the keys). */
static __device__ void write_weights(const float *logits_t, const float *softmax_bias,
                                     const int32_t *ids_t, int64_t k, int64_t scoring,
                                     float scale, float *weights_t) {
    float max_log = -INFINITY;
    for (int64_t j = 0; j < k; j++) {
        const float l = logits_t[ids_t[j]];
        weights_t[j] =
            log_score_of_logit(softmax_bias ? __fadd_rn(l, softmax_bias[ids_t[j]]) : l, scoring);
        if (weights_t[j] > max_log) max_log = weights_t[j];
    }
    float sum = 0.0f;
    for (int64_t j = 0; j < k; j++) {
        weights_t[j] = expf(__fsub_rn(weights_t[j], max_log));
        sum = __fadd_rn(sum, weights_t[j]);
    }
    for (int64_t j = 0; j < k; j++) weights_t[j] = __fmul_rn(__fdiv_rn(weights_t[j], sum), scale);
}

/* Replacement routing for a token whose inputs are bad: distinct valid ids, zero weights. */
static __device__ void write_safe_route(int64_t k, int32_t *ids_t, float *weights_t) {
    for (int64_t j = 0; j < k; j++) {
        ids_t[j] = (int32_t)j;
        weights_t[j] = 0.0f;
    }
}

/* A key that is out of the running: NaN, which better() never prefers to anything (v > b and
 * v == b are both false). Not -Inf: a real key can be -Inf (logit + bias overflowing, or a
 * bias of -Inf), and the argmax takes -Inf keys (ties to the lower id) once nothing larger is
 * left, so a chosen expert masked with -Inf could be chosen again, or an expert of a dropped
 * group taken; the CPU (topk_insert) never reconsiders either. */
static constexpr float kMaskedKey = __builtin_nanf("");

/* One warp per token. The selection keys s + bias live in shared memory ([warps][E]); chosen
 * experts (and experts of dropped groups) are masked with kMaskedKey. k rounds of a warp
 * argmax. */
__global__ void route_kernel(epmoe_route_params p, const float *logits, const float *bias,
                             int64_t T, int32_t *ids, float *weights, uint32_t *error_flags) {
    extern __shared__ float route_smem[];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int64_t E = p.n_experts, k = p.top_k;
    int64_t t = (int64_t)blockIdx.x * (blockDim.x >> 5) + warp;
    if (t >= T) return;
    float *key = route_smem + (int64_t)warp * E;
    const float *logits_t = logits + t * E;
    int32_t *ids_t = ids + t * k;
    float *weights_t = weights + t * k;

    int finite = 1;
    for (int64_t e = lane; e < E; e += 32) {
        float l = logits_t[e];
        if (!isfinite(l)) finite = 0;
        float s = score_of_logit(l, p.scoring);
        key[e] = bias ? __fadd_rn(s, bias[e]) : s;
    }
    finite = __all_sync(0xffffffffu, finite);
    if (!finite) {
        if (lane == 0) {
            atomicOr(error_flags, EPMOE_CUDA_FLAG_NONFINITE_LOGIT);
            write_safe_route(k, ids_t, weights_t);
        }
        return;
    }
    __syncwarp();

    if (p.n_groups > 1) {
        /* Group-limited (DeepSeek-V3): group score = sum of the group's two best keys; keep the
         * topk_groups best groups (ties to the lower group), mask the others. Lane g owns
         * groups g, g+32, ...; the group scores sit in registers of their owners. */
        const int64_t G = p.n_groups, group_size = E / G;
        float gscore[2]; /* n_groups <= 64 (config bound): at most two groups per lane */
        for (int i = 0; i < 2; i++) {
            int64_t g = lane + 32 * i;
            gscore[i] = -INFINITY;
            if (g >= G) continue;
            float top1 = -INFINITY, top2 = -INFINITY;
            for (int64_t e = g * group_size; e < (g + 1) * group_size; e++) {
                float v = key[e];
                if (v > top1) {
                    top2 = top1;
                    top1 = v;
                } else if (v > top2) {
                    top2 = v;
                }
            }
            gscore[i] = __fadd_rn(top1, top2);
        }
        unsigned long long kept = 0; /* bit g set: group g kept (G <= 64) */
        for (int64_t r = 0; r < p.topk_groups; r++) {
            float best_v = -INFINITY;
            int best_g = 0x7fffffff;
            for (int i = 0; i < 2; i++) {
                int g = lane + 32 * i;
                if (g < G && !((kept >> g) & 1ull) && better(gscore[i], g, best_v, best_g)) {
                    best_v = gscore[i];
                    best_g = g;
                }
            }
            warp_argmax(&best_v, &best_g);
            kept |= 1ull << best_g;
        }
        for (int64_t e = lane; e < E; e += 32)
            if (!((kept >> (e / group_size)) & 1ull)) key[e] = kMaskedKey;
        __syncwarp();
    }

    for (int64_t j = 0; j < k; j++) {
        float best_v = -INFINITY;
        int best_e = 0x7fffffff;
        for (int64_t e = lane; e < E; e += 32)
            if (better(key[e], (int)e, best_v, best_e)) {
                best_v = key[e];
                best_e = (int)e;
            }
        warp_argmax(&best_v, &best_e);
        if (lane == 0) {
            ids_t[j] = best_e;
            key[best_e] = kMaskedKey;
        }
        __syncwarp();
    }
    /* DeepSeek weighs by the scores (the bias steers the choice only); gpt-oss's softmax takes
     * the biased logits, as the CPU's */
    const float *softmax_bias = p.scoring == EPMOE_SCORING_TOPK_SOFTMAX ? bias : NULL;
    if (lane == 0)
        write_weights(logits_t, softmax_bias, ids_t, k, p.scoring, p.routed_scaling_factor,
                      weights_t);
}

static epmoe_status check_route_params(const epmoe_route_params *p) {
    EPMOE_REQUIRE(p->n_experts > 0 && p->top_k > 0 && p->top_k <= p->n_experts,
                  EPMOE_ERR_INVALID_ARG, "routing: top_k %lld with %lld experts",
                  (long long)p->top_k, (long long)p->n_experts);
    EPMOE_REQUIRE(p->scoring == EPMOE_SCORING_SQRTSOFTPLUS || p->scoring == EPMOE_SCORING_SIGMOID ||
                      p->scoring == EPMOE_SCORING_TOPK_SOFTMAX,
                  EPMOE_ERR_INVALID_ARG, "routing: unknown scoring %lld", (long long)p->scoring);
    EPMOE_REQUIRE(p->scoring != EPMOE_SCORING_TOPK_SOFTMAX || p->n_groups == 1,
                  EPMOE_ERR_INVALID_ARG,
                  "routing: topk_softmax has no group limit (n_groups %lld, must be 1)",
                  (long long)p->n_groups);
    if (p->n_groups > 1) {
        EPMOE_REQUIRE(p->n_groups <= 64 && p->n_experts % p->n_groups == 0 &&
                          p->n_experts / p->n_groups >= 2,
                      EPMOE_ERR_INVALID_ARG,
                      "routing: %lld groups over %lld experts (need <= 64 groups of >= 2 "
                      "experts, dividing E)",
                      (long long)p->n_groups, (long long)p->n_experts);
        EPMOE_REQUIRE(p->topk_groups >= 1 && p->topk_groups <= p->n_groups &&
                          p->topk_groups * (p->n_experts / p->n_groups) >= p->top_k,
                      EPMOE_ERR_INVALID_ARG,
                      "routing: keeping %lld of %lld groups leaves fewer than top_k=%lld experts",
                      (long long)p->topk_groups, (long long)p->n_groups, (long long)p->top_k);
    }
    return EPMOE_OK;
}

epmoe_status epmoe_cuda_route(const epmoe_route_params *p, const float *logits,
                              const float *bias, int64_t T, int32_t *ids, float *weights,
                              uint32_t *error_flags, cudaStream_t stream) {
    EPMOE_TRY(check_route_params(p));
    if (T == 0) return EPMOE_OK;
    /* Shared memory holds E keys per warp; stay under the 48 KiB default. */
    int64_t warps = 4;
    while (warps > 1 && warps * p->n_experts * (int64_t)sizeof(float) > 48 * 1024) warps--;
    size_t smem = (size_t)(warps * p->n_experts) * sizeof(float);
    EPMOE_REQUIRE(smem <= 48 * 1024, EPMOE_ERR_UNSUPPORTED,
                  "routing: %lld experts need more than 48 KiB of shared memory per token",
                  (long long)p->n_experts);
    unsigned blocks = (unsigned)((T + warps - 1) / warps);
    route_kernel<<<blocks, (unsigned)(32 * warps), smem, stream>>>(*p, logits, bias, T, ids,
                                                                    weights, error_flags);
    CUDA_TRY_LAUNCH("route_kernel");
    return EPMOE_OK;
}

/* One thread per token: the ids come from the table, the weights from the scores there. */
__global__ void route_hash_kernel(epmoe_route_params p, const float *logits,
                                  const int32_t *tid2eid, int64_t vocab_size,
                                  const int32_t *token_ids, int64_t T, int32_t *ids,
                                  float *weights, uint32_t *error_flags) {
    int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= T) return;
    const int64_t E = p.n_experts, k = p.top_k;
    const float *logits_t = logits + t * E;
    int32_t *ids_t = ids + t * k;
    float *weights_t = weights + t * k;
    int32_t tok = token_ids[t];
    if (tok < 0 || tok >= vocab_size) {
        atomicOr(error_flags, EPMOE_CUDA_FLAG_TOKEN_RANGE);
        write_safe_route(k, ids_t, weights_t);
        return;
    }
    for (int64_t e = 0; e < E; e++) /* the whole row, as the CPU checks it */
        if (!isfinite(logits_t[e])) {
            atomicOr(error_flags, EPMOE_CUDA_FLAG_NONFINITE_LOGIT);
            write_safe_route(k, ids_t, weights_t);
            return;
        }
    for (int64_t j = 0; j < k; j++) {
        int32_t e = tid2eid[(int64_t)tok * k + j];
        if (e < 0 || e >= E) {
            atomicOr(error_flags, EPMOE_CUDA_FLAG_TABLE_RANGE);
            write_safe_route(k, ids_t, weights_t);
            return;
        }
        ids_t[j] = e;
    }
    write_weights(logits_t, NULL, ids_t, k, p.scoring, p.routed_scaling_factor, weights_t);
}

epmoe_status epmoe_cuda_route_hash(const epmoe_route_params *p, const float *logits,
                                   const int32_t *tid2eid, int64_t vocab_size,
                                   const int32_t *token_ids, int64_t T, int32_t *ids,
                                   float *weights, uint32_t *error_flags, cudaStream_t stream) {
    EPMOE_TRY(check_route_params(p));
    EPMOE_REQUIRE(p->scoring != EPMOE_SCORING_TOPK_SOFTMAX, EPMOE_ERR_INVALID_ARG,
                  "hash routing: topk_softmax has no hash-routed layers (its weights need the "
                  "biased logits of a top-k choice)");
    EPMOE_REQUIRE(tid2eid && token_ids && vocab_size > 0, EPMOE_ERR_INVALID_ARG,
                  "hash routing needs tid2eid, token ids and vocab_size > 0 (got %lld)",
                  (long long)vocab_size);
    if (T == 0) return EPMOE_OK;
    unsigned blocks = (unsigned)((T + 127) / 128);
    route_hash_kernel<<<blocks, 128, 0, stream>>>(*p, logits, tid2eid, vocab_size, token_ids, T,
                                                  ids, weights, error_flags);
    CUDA_TRY_LAUNCH("route_hash_kernel");
    return EPMOE_OK;
}
