/* Gate logits and routing on the device (kernels/ops.h defines the math; this follows it
 * operation for operation so that ids equal the CPU's): sqrtsoftplus and sigmoid scores with a
 * selection bias (DeepSeek), topk_softmax over logit + bias (gpt-oss), hash tables. */
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
 * Each output is one fmaf chain in increasing h, exactly the CPU's order, hence the same bits;
 * speed comes from running many chains side by side, never from reordering one. A block owns
 * a tile of BT tokens x 64 experts; x and Wg stream through shared memory in 32-wide slices of
 * h, stored h-major so that a thread reads its TM tokens and its 4 experts of one h with two
 * vector loads and then advances TM x 4 independent chains (one LDS per 2-8 FMAs, instead of
 * two LDS per FMA with one chain per thread: that version took 1.5 ms for 4096 tokens on
 * V4-Flash, this one 0.56 ms on an H200). Few, long blocks: used when they fill the GPU. */
#define GATE_KS 32  /* h per shared-memory slice */
#define GATE_EN 4   /* experts per thread */
#define GATE_TX 16  /* threads along experts: 64 experts a block */
#define GATE_TY 16  /* threads along tokens */

/* Small batches: a 16x16 tile of (token, expert) outputs per block, one fmaf chain per thread.
 * More blocks than the register-tiled kernel below, which matters when T x E is small (decode,
 * or a slice with few experts): there the tiled kernel ran 1.9x slower (256 vs 136 us at 43
 * tokens x 32 experts). Few tokens also make few threads (43 tokens x 256 experts: 11 K chains,
 * under 100 an SM), so the loads cannot hide behind other warps; they hide behind the chain:
 * x and Wg come through a ring of GATE_SMALL_STAGES shared-memory slices of GATE_SMALL_KS h,
 * copied (cp.async, zero-filled past T, E or H) GATE_SMALL_STAGES - 1 slices ahead of the fmafs,
 * one barrier a slice. Staging 16 h at a time behind two barriers, each slice waiting out a
 * load's whole latency, took twice this ring's time, the same at 43 and 512 tokens: latency,
 * not work, in both (docs/perf-history.md §2). The chain itself is H dependent fmafs, so the
 * ring still waits on DRAM; asking each slice's lines into L2 further ahead was measured
 * slower (the ring already has them in flight). */
#define GATE_SMALL_TILE 16
#define GATE_SMALL_KS 64    /* h per slice */
#define GATE_SMALL_STAGES 4 /* slices in the ring */
#define GATE_SMALL_ROW (GATE_SMALL_KS + 4) /* floats a row: 16-byte rows, reads conflict-free */

__global__ void __launch_bounds__(GATE_SMALL_TILE *GATE_SMALL_TILE)
    gate_logits_small_kernel(const float *x, const float *gate_weight, int64_t T, int64_t H,
                             int64_t E, float *logits) {
    constexpr int kTile = GATE_SMALL_TILE, kKS = GATE_SMALL_KS, kStages = GATE_SMALL_STAGES;
    __shared__ __align__(16) float x_ring[kStages][kTile][GATE_SMALL_ROW]; /* [token][h] */
    __shared__ __align__(16) float w_ring[kStages][kTile][GATE_SMALL_ROW]; /* [expert][h] */
    const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * kTile + tx;
    const int64_t t0 = (int64_t)blockIdx.y * kTile, e0 = (int64_t)blockIdx.x * kTile;
    const int64_t slices = (H + kKS - 1) / kKS;

    /* slice s -> stage s % kStages; consecutive threads copy consecutive h of one row */
    auto copy_slice = [&](int64_t s) {
        const int st = (int)(s % kStages);
        for (int i = tid; i < kTile * kKS; i += kTile * kTile) {
            const int row = i / kKS, hh = i % kKS;
            const int64_t h = s * kKS + hh;
            const bool x_ok = t0 + row < T && h < H, w_ok = e0 + row < E && h < H;
            cp_async4_or_zero(&x_ring[st][row][hh], x_ok ? x + (t0 + row) * H + h : x, x_ok);
            cp_async4_or_zero(&w_ring[st][row][hh], w_ok ? gate_weight + (e0 + row) * H + h : gate_weight,
                              w_ok);
        }
    };
    for (int s = 0; s < kStages - 1; ++s) {
        if (s < slices) copy_slice(s);
        cp_async_commit(); /* one group a slice, even empty */
    }

    float acc = 0.0f;
    for (int64_t s = 0; s < slices; ++s) {
        /* groups committed so far: kStages - 1 + s, the last kStages - 2 may still fly: slice s
         * (this thread's copies) has landed; the barrier makes it everyone's, and frees the
         * stage that slice s - 1 was read from for slice s + kStages - 1 */
        cp_async_wait<kStages - 2>();
        __syncthreads();
        if (s + kStages - 1 < slices) copy_slice(s + kStages - 1);
        cp_async_commit();
        const int st = (int)(s % kStages);
        const float *xr = x_ring[st][ty], *wr = w_ring[st][tx];
        const int64_t left = H - s * kKS;
        if (left >= kKS) {
#pragma unroll
            for (int j = 0; j < kKS; j += 4) {
                const float4 xv = *(const float4 *)(xr + j), wv = *(const float4 *)(wr + j);
                acc = fmaf(xv.x, wv.x, acc);
                acc = fmaf(xv.y, wv.y, acc);
                acc = fmaf(xv.z, wv.z, acc);
                acc = fmaf(xv.w, wv.w, acc);
            }
        } else {
            for (int j = 0; j < (int)left; j++) acc = fmaf(xr[j], wr[j], acc); /* none past H-1 */
        }
    }
    if (t0 + ty < T && e0 + tx < E) logits[(t0 + ty) * E + e0 + tx] = acc;
}

template <int TM> __device__ __forceinline__ void load_tokens(const float *row, float (&xv)[TM]);
template <> __device__ __forceinline__ void load_tokens<4>(const float *row, float (&xv)[4]) {
    const float4 q = *(const float4 *)row;
    xv[0] = q.x, xv[1] = q.y, xv[2] = q.z, xv[3] = q.w;
}

template <int TM>
__global__ void __launch_bounds__(GATE_TX *GATE_TY)
    gate_logits_kernel(const float *x, const float *gate_weight, int64_t T, int64_t H, int64_t E,
                       float *logits) {
    constexpr int BT = GATE_TY * TM, BE = GATE_TX * GATE_EN;
    /* +4 floats a row: keeps the float4 reads aligned and spreads the transposing stores */
    __shared__ __align__(16) float xs[GATE_KS][BT + 4];
    __shared__ __align__(16) float ws[GATE_KS][BE + 4];
    const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * GATE_TX + tx;
    const int64_t t0 = (int64_t)blockIdx.y * BT, e0 = (int64_t)blockIdx.x * BE;
    float acc[TM][GATE_EN];
#pragma unroll
    for (int i = 0; i < TM; i++)
#pragma unroll
        for (int c = 0; c < GATE_EN; c++) acc[i][c] = 0.0f;
    for (int64_t h0 = 0; h0 < H; h0 += GATE_KS) {
        /* consecutive threads read consecutive h of one row (coalesced) */
        for (int i = tid; i < BT * GATE_KS; i += GATE_TX * GATE_TY) {
            const int row = i / GATE_KS, hh = i % GATE_KS;
            const int64_t t = t0 + row, h = h0 + hh;
            xs[hh][row] = (t < T && h < H) ? x[t * H + h] : 0.0f;
        }
        for (int i = tid; i < BE * GATE_KS; i += GATE_TX * GATE_TY) {
            const int row = i / GATE_KS, hh = i % GATE_KS;
            const int64_t e = e0 + row, h = h0 + hh;
            ws[hh][row] = (e < E && h < H) ? gate_weight[e * H + h] : 0.0f;
        }
        __syncthreads();
        const int n = (int)(H - h0 < GATE_KS ? H - h0 : GATE_KS); /* no fmaf past h = H-1 */
        for (int j = 0; j < n; j++) {
            float xv[TM], wv[GATE_EN];
            load_tokens<TM>(&xs[j][ty * TM], xv);
            const float4 w4 = *(const float4 *)&ws[j][tx * GATE_EN];
            wv[0] = w4.x, wv[1] = w4.y, wv[2] = w4.z, wv[3] = w4.w;
#pragma unroll
            for (int i = 0; i < TM; i++)
#pragma unroll
                for (int c = 0; c < GATE_EN; c++) acc[i][c] = fmaf(xv[i], wv[c], acc[i][c]);
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < TM; i++) {
        const int64_t t = t0 + ty * TM + i;
#pragma unroll
        for (int c = 0; c < GATE_EN; c++) {
            const int64_t e = e0 + tx * GATE_EN + c;
            if (t < T && e < E) logits[t * E + e] = acc[i][c];
        }
    }
}

epmoe_status epmoe_cuda_gate_logits(const float *x, const float *gate_weight, int64_t T,
                                    int64_t H, int64_t E, float *logits, cudaStream_t stream) {
    EPMOE_REQUIRE(T >= 0 && H > 0 && E > 0, EPMOE_ERR_INVALID_ARG,
                  "gate logits: bad shape T=%lld H=%lld E=%lld", (long long)T, (long long)H,
                  (long long)E);
    if (T == 0) return EPMOE_OK;
    /* The register-tiled kernel when it fills the GPU at least once (its blocks are few and
     * long), else the one-chain-per-thread kernel. Both give the same bits. */
    int device = 0, n_sms = 0;
    CUDA_TRY(cudaGetDevice(&device), "gate logits: current device");
    CUDA_TRY(cudaDeviceGetAttribute(&n_sms, cudaDevAttrMultiProcessorCount, device),
             "gate logits: multiprocessor count");
    const unsigned e_blocks = (unsigned)((E + GATE_TX * GATE_EN - 1) / (GATE_TX * GATE_EN));
    const unsigned t_blocks = (unsigned)((T + GATE_TY * 4 - 1) / (GATE_TY * 4));
    if ((int64_t)e_blocks * t_blocks >= n_sms) {
        gate_logits_kernel<4><<<dim3(e_blocks, t_blocks), dim3(GATE_TX, GATE_TY), 0, stream>>>(
            x, gate_weight, T, H, E, logits);
    } else {
        const dim3 grid((unsigned)((E + GATE_SMALL_TILE - 1) / GATE_SMALL_TILE),
                        (unsigned)((T + GATE_SMALL_TILE - 1) / GATE_SMALL_TILE));
        gate_logits_small_kernel<<<grid, dim3(GATE_SMALL_TILE, GATE_SMALL_TILE), 0, stream>>>(
            x, gate_weight, T, H, E, logits);
    }
    CUDA_TRY_LAUNCH("gate_logits_kernel");
    return EPMOE_OK;
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

/* One warp per token. The selection keys s + bias live in shared memory ([warps][E]); chosen
 * experts (and experts of dropped groups) are masked with -Inf. k rounds of a warp argmax. */
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
            if (!((kept >> (e / group_size)) & 1ull)) key[e] = -INFINITY;
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
            key[best_e] = -INFINITY;
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
