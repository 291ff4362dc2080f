/* One MoE layer on one GPU (docs/design.md §2 without the all-to-alls, on a rank's own experts):
 * a device arena shared by all layers, per-layer device weights uploaded once, and a forward
 * split into the stages that the multi-GPU path will separate with its all-to-alls:
 *
 *   route    x -> gate logits -> ids, weights                       (coordinator side)
 *   plan     ids -> tokens_per_expert, padded_offsets, row_of_pair  (on the device)
 *   experts  x rows -> padded layout -> NVFP4 W13 (+ b13) -> SwiGLU -> NVFP4 W2 -> y_padded
 *   shared   x -> shared expert (bf16 cuBLAS), none when n_shared_experts = 0 (gpt-oss)
 *   combine  out[t] = sum_j w[t,j] * (y[row_of_pair[t,j]] (+ b2 of its expert)) + shared[t]
 *
 * Capture safety: nothing in these functions allocates, synchronizes with the host or launches
 * a routing-dependent number of kernels. T (the token count) is a host value fixed when a
 * graph is captured; every routing-dependent size lives only in the arena on the device.
 * Data errors found by kernels (non-finite logits, bad token ids) are flags on the device,
 * read by epmoe_gpu_read_flags outside the forward.
 */
#ifndef EPMOE_GPU_LAYER_H
#define EPMOE_GPU_LAYER_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include "common/config.h"
#include "common/status.h"
#include "worker/expert_weights.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Every buffer of the forward, carved out of one cudaMalloc. Sized for the worst case: all
 * max_expert_rows (token, expert) rows on one expert plus every expert's padding
 * (epmoe_padded_capacity), so no routing can overflow it (dropless, rule 22). */
typedef struct {
    void *base;
    size_t bytes;

    int64_t max_tokens;      /* T at most (cfg.max_tokens_per_rank) */
    int64_t max_expert_rows; /* (token, expert) rows the expert side may hold */
    int64_t cap_rows;        /* rows of the padded layout buffers (multiple of 128) */

    /* route */
    float *logits;               /* [max_tokens, E] */
    int32_t *ids;                /* [max_tokens, k] global expert ids */
    float *weights;              /* [max_tokens, k] */
    /* plan */
    int32_t *pair_rank;          /* [max_tokens * k] scratch */
    int32_t *row_of_pair;        /* [max_tokens * k] padded row, -1 = not local */
    int64_t *tokens_per_expert;  /* [n_local] */
    int64_t *padded_offsets;     /* [n_local + 1] */
    int32_t *token_of_row;       /* [cap_rows] */
    /* experts: the A operand of both GEMMs (W13 then W2 reuse it) */
    uint8_t *a_codes;            /* [cap_rows, max(Hp, Ip) / 2] (act_quant = nvfp4), or
                                    [cap_rows, max(Hp, Ip)] e4m3 (fp8) */
    uint8_t *a_sf;               /* [cap_rows, max(Hp, Ip) / 16], or / 128 ue8m0 (fp8) */
    size_t a_codes_bytes, a_sf_bytes; /* their sizes in this arena's act_quant (0: none) */
    float *a_scale;              /* [cap_rows] 1/gs per row */
    uint16_t *a_bf16;            /* [cap_rows, max(Hp, Ip)] (act_quant = high; the GEMMs'
                                    workspace for FP8 A, and on Hopper for NVFP4 A) */
    float *h;                    /* [cap_rows, 2I] W13 output */
    float *y;                    /* [cap_rows, H] W2 output */
    /* shared expert */
    uint16_t *shared_x_bf16;     /* [max_tokens, H] */
    float *shared_h;             /* [max_tokens, 2 Is] */
    uint16_t *shared_a_bf16;     /* [max_tokens, Is] */
    float *shared_y;             /* [Ts, H]: max_tokens rounded up to EPMOE_SHARED_CHUNK_ROWS */
    void *cublas_workspace;
    size_t cublas_workspace_bytes;
    /* device-side status */
    uint32_t *error_flags;               /* EPMOE_CUDA_FLAG_* */
    unsigned long long *saturated;       /* NVFP4 elements clamped at 6 */
} epmoe_gpu_arena;

typedef struct {
    epmoe_config cfg;
    int device;
    int64_t expert_start;    /* this rank's slice */
    int64_t n_local;
    int64_t shared_inter;    /* Is = n_shared_experts * moe_inter_size */
    /* K of the W13 and W2 GEMMs: H and I rounded up to EPMOE_GEMM_K_STEP (gpt-oss's 2880 ->
     * 3072). The weights and the GEMM inputs carry zero codes with zero block scales in
     * [H, Hp) and [I, Ip): exact zeros, so the products equal the unpadded ones; outputs (h,
     * y) have the real widths 2I and H. */
    int64_t hidden_pad;      /* Hp */
    int64_t inter_pad;       /* Ip */
    epmoe_gpu_arena arena;
    cublasHandle_t cublas;
} epmoe_gpu_context;

/* Device copy of one layer's weights (one cudaMalloc per layer, made once). */
typedef struct {
    int64_t layer;
    int hash_routed;          /* layer < n_hash_layers: ids from tid2eid */
    void *base;
    size_t bytes;
    /* expert weights in the GEMMs' slab layout (kernels/cuda/grouped_gemm.h), the same bytes
     * as the checkpoint's row-major tensors, K padded to Hp / Ip with zeros (context), reordered
     * once at upload */
    uint8_t *w13_codes;       /* [n_local, 2I, Hp/2] */
    uint8_t *w13_sf;          /* [n_local, 2I, Hp/16] */
    float *w13_scale_2;       /* [n_local, 2] */
    float *w13_input_scale;   /* [n_local] */
    uint8_t *w2_codes;        /* [n_local, H, Ip/2] */
    uint8_t *w2_sf;           /* [n_local, H, Ip/16] */
    float *w2_scale_2;        /* [n_local] */
    float *w2_input_scale;    /* [n_local] */
    /* expert biases (expert_bias = 1, gpt-oss), else NULL: W13's added before the SwiGLU, W2's
     * to each pair's output row before its routing weight (worker/experts.h) */
    float *w13_bias;          /* [n_local, 2I] gate then up */
    float *w2_bias;           /* [n_local, H] */
    float *gate_weight;       /* [E, H] fp32 */
    float *gate_bias;         /* [E] or NULL */
    int32_t *tid2eid;         /* [vocab, k] or NULL */
    int64_t vocab_size;
    uint16_t *shared_w13;     /* [2 Is, H] bf16, NULL without a shared expert */
    uint16_t *shared_w2;      /* [H, Is] bf16 */
    /* act_quant = fp8 on MXFP4 experts with fp8_tensor_cores = 1: the same weights as E4M3 with a power-of-two scale per
     * row and 128-k group, in the FP8 GEMM's slab image (grouped_gemm.h), for the FP8 tensor
     * cores at prefill sizes; NULL otherwise, and for a tensor with any group that is not
     * exactly E4M3 (counted in fp8_inexact_groups; that GEMM keeps the exact bf16 path) */
    uint8_t *w13_fp8, *w13_fp8_exp; /* [n_local * 2I, Hp], [n_local * 2I, Hp/128] */
    uint8_t *w2_fp8, *w2_fp8_exp;   /* [n_local * H, Ip], [n_local * H, Ip/128] */
    int64_t fp8_inexact_groups;
} epmoe_gpu_layer;

/* Makes the arena for cfg on `device` for the slice [expert_start, expert_start + n_local),
 * with max_expert_rows = the (token, expert) rows the expert side may receive (single GPU:
 * max_tokens_per_rank * top_k). with_y: the arena holds the experts' output y [cap_rows, H]
 * for the combine stage (the single-GPU layer); 0 when every experts call names its own output
 * (epmoe_gpu_rows.out: the multi-GPU engine, which saves those cap_rows x H x 4 bytes). Prints
 * every buffer's size and the total to `log` (NULL: silent). */
epmoe_status epmoe_gpu_context_create(const epmoe_config *cfg, int device, int64_t expert_start,
                                      int64_t n_local, int64_t max_expert_rows, int with_y,
                                      FILE *log, epmoe_gpu_context **out);
void epmoe_gpu_context_free(epmoe_gpu_context *ctx);

/* Uploads a layer's host weights (worker/expert_weights.h); shapes are checked against the
 * context. Not capture-safe (allocates): done once at load. */
epmoe_status epmoe_gpu_layer_upload(epmoe_gpu_context *ctx, const epmoe_layer_weights *w,
                                    epmoe_gpu_layer *out);
void epmoe_gpu_layer_free(epmoe_gpu_layer *layer);
/* Device bytes a layer's weights take (what epmoe_gpu_layer_upload allocates), and the
 * temporary staging buffer an upload needs on top: for a fit check before loading. */
int64_t epmoe_gpu_layer_bytes(const epmoe_gpu_context *ctx, const epmoe_layer_weights *w);
int64_t epmoe_gpu_layer_staging_bytes(const epmoe_gpu_context *ctx);

/* The stages. x: [T, H] fp32 on the device; token_ids: [T] int32 on the device (hash-routed
 * layers only, else may be NULL); out: [T, H] fp32 on the device. T <= max_tokens. */
epmoe_status epmoe_gpu_route(epmoe_gpu_context *ctx, const epmoe_gpu_layer *layer,
                             const float *x, const int32_t *token_ids, int64_t T,
                             cudaStream_t stream);
epmoe_status epmoe_gpu_plan(epmoe_gpu_context *ctx, int64_t T, cudaStream_t stream);
epmoe_status epmoe_gpu_experts(epmoe_gpu_context *ctx, const epmoe_gpu_layer *layer,
                               const float *x, int64_t T, cudaStream_t stream);
/* Source rows of the experts stage: source row token_of_row[r] feeds padded row r (the plan
 * stage, or the multi-GPU dispatch, fills token_of_row and the offsets). Either fp32 rows, or
 * rows already quantized to NVFP4 with per-row global scales (what the worker would compute
 * itself; only valid with act_quant = nvfp4 and act_scale = per_row). */
typedef struct {
    const float *x;          /* fp32 rows, x_stride floats apart; NULL when nvfp4 is given */
    int64_t x_stride;
    const uint8_t *nvfp4;    /* quantized rows, nvfp4_stride bytes apart: codes (H/2 bytes),
                                block scales (H/16) and 1/gs (fp32) at the offsets */
    int64_t nvfp4_stride, codes_offset, sf_offset, inv_gs_offset;
    /* Where the expert outputs go: NULL, the arena's y [cap_rows, H] in padded-row order (the
     * combine stage gathers from it); else out [.., H], padded row r to row out_row[r] (the
     * engine's return buffer: no separate pass copies y into it) */
    float *out;
    const int32_t *out_row;
} epmoe_gpu_rows;

/* The experts stage on any source rows; pairs_bound is the most (row, expert) pairs this call
 * can hold, a host value that fixes the launch shapes. */
epmoe_status epmoe_gpu_experts_rows(epmoe_gpu_context *ctx, const epmoe_gpu_layer *layer,
                                    const epmoe_gpu_rows *rows, int64_t pairs_bound,
                                    cudaStream_t stream);
epmoe_status epmoe_gpu_shared(epmoe_gpu_context *ctx, const epmoe_gpu_layer *layer,
                              const float *x, int64_t T, cudaStream_t stream);
epmoe_status epmoe_gpu_combine(epmoe_gpu_context *ctx, const epmoe_gpu_layer *layer, int64_t T,
                               float *out, cudaStream_t stream);

/* All five in order: out = MoE(x). */
epmoe_status epmoe_gpu_layer_forward(epmoe_gpu_context *ctx, const epmoe_gpu_layer *layer,
                                     const float *x, const int32_t *token_ids, int64_t T,
                                     float *out, cudaStream_t stream);

/* Outside the forward: waits for `stream`, returns the device error flags as a status and the
 * saturated-element count, and clears both for the next forward. */
epmoe_status epmoe_gpu_read_flags(epmoe_gpu_context *ctx, cudaStream_t stream,
                                  unsigned long long *saturated);

#ifdef __cplusplus
}
#endif
#endif
