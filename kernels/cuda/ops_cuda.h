/* The operations of one MoE layer on NVIDIA GPUs: the CUDA mirror of kernels/ops.h. Same
 * arguments in the same layouts, but device pointers, and every function only enqueues work
 * on `stream` (no allocation, no host synchronization: all of it may be captured in a CUDA
 * graph). Launch shapes depend only on the host-side sizes passed in (T, E, cap_rows, ...),
 * never on routing: routing-dependent sizes live only on the device.
 *
 * Exactness (tested in tests/gpu against the CPU functions):
 *  - gate logits: bit-identical (the blocked order kernels/ops.h defines).
 *  - routing ids: identical; weights to fp32 rounding (expf/log1pf differ by ulps from libm).
 *  - NVFP4 quantization: codes, block scales and global scales bit-identical to
 *    common/nvfp4.h (same fp32 operations in the same order, no contraction); FP8 codes and
 *    block exponents bit-identical to common/fp8.h.
 *  - SwiGLU, combine: fp32, expf from the CUDA math library (ulps from libm).
 *
 * Errors that only the data can reveal (non-finite logits, token ids outside the vocabulary,
 * hash-table entries outside [0, E)) cannot be returned without a sync: kernels OR a bit into
 * a device word `error_flags` (EPMOE_CUDA_FLAG_*) and write safe values (distinct valid ids,
 * weight 0) so that later kernels stay in bounds. The host reads the word when it
 * synchronizes anyway and turns it into a status with epmoe_cuda_flags_status().
 *
 * bf16 tensors are passed as uint16_t (their bit patterns) so that this header stays C.
 */
#ifndef EPMOE_OPS_CUDA_H
#define EPMOE_OPS_CUDA_H

#include <stddef.h>
#include <stdint.h>

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include "common/status.h"
#include "common/tensor.h"
#include "kernels/ops.h"

#ifdef __cplusplus
extern "C" {
#endif

#define EPMOE_CUDA_FLAG_NONFINITE_LOGIT 1u /* a token's logits had NaN/Inf */
#define EPMOE_CUDA_FLAG_TOKEN_RANGE 2u     /* hash layer: token id outside [0, vocab) */
#define EPMOE_CUDA_FLAG_TABLE_RANGE 4u     /* hash layer: tid2eid entry outside [0, E) */
#define EPMOE_CUDA_FLAG_ZERO_SCORE_SUM 8u  /* a token's chosen scores sum to 0 */

/* EPMOE_OK for 0, else EPMOE_ERR_NUMERIC / EPMOE_ERR_RANGE naming every flag set. */
epmoe_status epmoe_cuda_flags_status(uint32_t flags, const char *where);

/* The SwiGLU of the routed and shared experts (docs/design.md §3.3, epmoe_cpu_swiglu). */
typedef struct {
    float limit; /* swiglu_limit; <= 0 disables the clamp */
    int variant; /* epmoe_swiglu_variant */
    float alpha; /* gptoss: the gain in g * sigmoid(alpha g); unused by dsv4 and step */
} epmoe_cuda_swiglu_act;

static inline epmoe_cuda_swiglu_act epmoe_cuda_swiglu_act_of(const epmoe_config *cfg) {
    epmoe_cuda_swiglu_act act;
    act.limit = (float)cfg->swiglu_limit;
    act.variant = (int)cfg->swiglu_variant;
    act.alpha = (float)cfg->swiglu_alpha;
    return act;
}

/* ---- routing (route.cu) ------------------------------------------------------------------ */

/* logits[T,E] = x[T,H] . Wg[E,H]^T in the blocked order of kernels/ops.h (bit-identical to
 * the CPU). No host sync, no allocation: capturable. */
epmoe_status epmoe_cuda_gate_logits(const float *x, const float *gate_weight, int64_t T,
                                    int64_t H, int64_t E, float *logits, cudaStream_t stream);
/* The same with the kernel named (0 .. EPMOE_CUDA_GATE_KERNELS - 1, largest tile first; -1:
 * chosen by shape as above), so that tests run every kernel on every shape: all give the
 * same bits. */
#define EPMOE_CUDA_GATE_KERNELS 5
epmoe_status epmoe_cuda_gate_logits_kernel(int kernel, const float *x, const float *gate_weight,
                                           int64_t T, int64_t H, int64_t E, float *logits,
                                           cudaStream_t stream);

/* Score-based routing (sqrtsoftplus+bias, sigmoid+bias with group limit, or gpt-oss's
 * topk_softmax of logit+bias, whose weights are a softmax over the chosen biased logits), as
 * epmoe_cpu_route. bias may be NULL. ids[T,k] global expert ids in slot order, weights[T,k]. */
epmoe_status epmoe_cuda_route(const epmoe_route_params *p, const float *logits,
                              const float *bias, int64_t T, int32_t *ids, float *weights,
                              uint32_t *error_flags, cudaStream_t stream);

/* Hash routing: ids[t] = tid2eid[token_ids[t], :], weights from the scores at those ids. */
epmoe_status epmoe_cuda_route_hash(const epmoe_route_params *p, const float *logits,
                                   const int32_t *tid2eid, int64_t vocab_size,
                                   const int32_t *token_ids, int64_t T, int32_t *ids,
                                   float *weights, uint32_t *error_flags, cudaStream_t stream);

/* ---- padded expert layout (layout.cu) ------------------------------------------------------ */

/* From ids[T, top_k] (global ids) and this rank's slice [expert_start, expert_start+n_local):
 *   tokens_per_expert[n_local], padded_offsets[n_local+1]  (common/layout.h convention, the
 *       same rule as epmoe_padded_offsets_from_counts)
 *   row_of_pair[T*top_k]   padded row of (t, slot), -1 for experts outside the slice
 *   token_of_row[cap_rows] token whose row sits there (only real rows are written)
 * Rows of an expert are in increasing (token, slot) order, as the CPU layout. pair_rank
 * [T*top_k] is scratch. Three launches whatever the routing. */
epmoe_status epmoe_cuda_plan_layout(const int32_t *ids, int64_t T, int64_t top_k,
                                    int64_t expert_start, int64_t n_local, int64_t pad_rows,
                                    int32_t *pair_rank, int64_t *tokens_per_expert,
                                    int64_t *padded_offsets, int32_t *row_of_pair,
                                    int32_t *token_of_row, cudaStream_t stream);

/* out[row] = bf16(x[token_of_row[row]]) for every real row of the padded layout (act_quant =
 * high); x rows are x_stride floats apart; out rows are K_pad >= K elements, [K, K_pad) written
 * as zeros (the GEMM's K padding); padding rows are not written. */
epmoe_status epmoe_cuda_permute_bf16(const float *x, int64_t x_stride, int64_t K, int64_t K_pad,
                                     const int32_t *token_of_row,
                                     const int64_t *padded_offsets,
                                     const int64_t *tokens_per_expert, int64_t n_local,
                                     int64_t cap_rows, uint16_t *out, cudaStream_t stream);

/* ---- NVFP4 activation quantization (quant.cu) --------------------------------------------- */

/* Quantizes rows of K floats (K a multiple of 16; rows x_stride floats apart, a multiple of
 * 4), exactly common/nvfp4.h, into rows of K_pad elements (K_pad >= K, a multiple of 16): the
 * elements [K, K_pad) get code 0 and block scale 0, so a GEMM over K_pad (the grouped GEMMs
 * step K by 128) adds exact zeros. K_pad = K writes no padding.
 *   dense   (padded_offsets == NULL): rows [0, rows) of x.
 *   padded  (padded_offsets != NULL): the real rows of a padded layout of `rows` = cap_rows
 *           rows; row r reads x[row_index[r]] when row_index is given (gather from tokens),
 *           else x[r]. Padding rows are not written.
 * Global scale per row: static_input_scale == NULL: gs = epmoe_nvfp4_global_sf(amax(row));
 * else gs = 1 / static_input_scale[expert of the row] (padded only).
 * Writes codes[rows, K_pad/2], block_sf[rows, K_pad/16], inv_global_sf[rows] = 1/gs (the GEMM's
 * a_scale) and adds the saturated element count to *saturated (may be NULL). */
epmoe_status epmoe_cuda_nvfp4_quantize_rows(const float *x, int64_t x_stride, int64_t rows,
                                            int64_t K, int64_t K_pad,
                                            const int32_t *row_index,
                                            const int64_t *padded_offsets,
                                            const int64_t *tokens_per_expert, int64_t n_local,
                                            const float *static_input_scale, uint8_t *codes,
                                            uint8_t *block_sf, float *inv_global_sf,
                                            unsigned long long *saturated, cudaStream_t stream);

/* The real rows of a padded layout from rows quantized elsewhere (the NVFP4 dispatch records of
 * kernels/cuda/dispatch.h): padded row r copies source row token_of_row[r]'s codes (K/2 bytes at
 * codes_offset), block scales (K/16 bytes at sf_offset) and 1/gs (fp32 at inv_gs_offset);
 * source rows are src_stride bytes apart. Rows of codes and block_sf are K_pad elements (K and
 * K_pad multiples of 32), [K, K_pad) written as code 0 and scale 0, as the quantizer pads.
 * Padding rows are not written. */
epmoe_status epmoe_cuda_nvfp4_gather_rows(const uint8_t *src, int64_t src_stride,
                                          int64_t codes_offset, int64_t sf_offset,
                                          int64_t inv_gs_offset, int64_t K, int64_t K_pad,
                                          const int32_t *token_of_row,
                                          const int64_t *padded_offsets,
                                          const int64_t *tokens_per_expert, int64_t n_local,
                                          int64_t cap_rows, uint8_t *codes, uint8_t *block_sf,
                                          float *inv_global_sf, cudaStream_t stream);

/* SwiGLU (as epmoe_cuda_swiglu, biases included) and NVFP4 quantization (as
 * epmoe_cuda_nvfp4_quantize_rows, padded mode, no gather, rows of I_pad elements) in one pass:
 * h [cap_rows, 2I] -> codes/block_sf/inv_global_sf of the real rows, the same bits as the two
 * kernels one after the other, without the fp32 activation round trip through device memory.
 * I * 4 bytes must fit in 48 KiB (I <= EPMOE_CUDA_MAX_FUSED_INTER). */
#define EPMOE_CUDA_MAX_FUSED_INTER EPMOE_CUDA_MAX_INTER /* common/config.h: refused at start */
epmoe_status epmoe_cuda_swiglu_nvfp4_quantize(const float *h, int64_t cap_rows, int64_t I,
                                              int64_t I_pad, const epmoe_cuda_swiglu_act *act,
                                              const float *bias,
                                              const int64_t *padded_offsets,
                                              const int64_t *tokens_per_expert, int64_t n_local,
                                              const float *static_input_scale, uint8_t *codes,
                                              uint8_t *block_sf, float *inv_global_sf,
                                              unsigned long long *saturated,
                                              cudaStream_t stream);

/* ---- FP8 activation quantization (quant_fp8.cu) ------------------------------------------- */

/* act_quant = fp8: the real rows of a padded layout as E4M3 codes [cap_rows, K_pad] and one
 * UE8M0 exponent byte per 128 [cap_rows, K_pad/128], bit-identical to epmoe_fp8_quantize_row
 * (common/fp8.h). K_pad is a multiple of 128 >= K; [K, K_pad) gets code 0, and blocks wholly
 * past K exponent 0. Padding rows are not written.
 *   rows:   padded row r quantizes x[token_of_row[r]] (x 16-byte aligned, x_stride and K
 *           multiples of 4).
 *   swiglu: padded row r quantizes the SwiGLU of h[r] (+ its expert's biases), as
 *           epmoe_cuda_swiglu computes it; I_pad >= I. */
epmoe_status epmoe_cuda_fp8_quantize_rows(const float *x, int64_t x_stride, int64_t cap_rows,
                                          int64_t K, int64_t K_pad, const int32_t *token_of_row,
                                          const int64_t *padded_offsets,
                                          const int64_t *tokens_per_expert, int64_t n_local,
                                          uint8_t *codes, uint8_t *block_e8m0,
                                          cudaStream_t stream);
epmoe_status epmoe_cuda_swiglu_fp8_quantize(const float *h, int64_t cap_rows, int64_t I,
                                            int64_t I_pad, const epmoe_cuda_swiglu_act *act,
                                            const float *bias, const int64_t *padded_offsets,
                                            const int64_t *tokens_per_expert, int64_t n_local,
                                            uint8_t *codes, uint8_t *block_e8m0,
                                            cudaStream_t stream);

/* ---- SwiGLU (swiglu.cu) ------------------------------------------------------------------- */

/* h[rows, 2I] (gate columns [0,I), up [I,2I)) -> out[rows, out_cols], as epmoe_cpu_swiglu, with
 * columns [I, out_cols) written as zeros (the next GEMM's K padding; out_cols = I: none). With
 * padded_offsets given, only the real rows of the padded layout are computed, and bias (may be
 * NULL) holds every local expert's gate/up biases [n_local, 2I], added to h before the
 * activation (gpt-oss). out_f32 and/or out_bf16 may be NULL (at least one given). */
epmoe_status epmoe_cuda_swiglu(const float *h, int64_t rows, int64_t I,
                               const epmoe_cuda_swiglu_act *act, const float *bias,
                               const int64_t *padded_offsets, const int64_t *tokens_per_expert,
                               int64_t n_local, int64_t out_cols, float *out_f32,
                               uint16_t *out_bf16, cudaStream_t stream);

/* ---- combine (combine.cu) ----------------------------------------------------------------- */

/* out[t,:] = (sum over slots j in order of weights[t,j] * y[row_of_pair[t,j], :]) + shared[t,:]
 * in fp32 (no contraction). Slots with row -1 (experts of other ranks) are skipped. shared may
 * be NULL. Expert biases (gpt-oss) are in y already (the W2 GEMM's out_bias). */
epmoe_status epmoe_cuda_combine(const float *y_padded, int64_t H, const int32_t *row_of_pair,
                                const float *weights, int64_t T, int64_t top_k,
                                const float *shared, float *out, cudaStream_t stream);

/* ---- host-format rows (convert.cu) ------------------------------------------------------- */

/* n elements of dtype (F32, BF16, F16) -> fp32. *first_bad (initialize it to ~0ull) gets the
 * smallest index of a NaN/Inf element. */
epmoe_status epmoe_cuda_rows_to_f32(const void *x, epmoe_dtype dtype, size_t n, float *out,
                                    unsigned long long *first_bad, cudaStream_t stream);
/* fp32 -> dtype (RNE). *first_bad (initialize to ~0ull) gets the smallest index whose value is
 * not finite or does not fit dtype (became Inf). */
epmoe_status epmoe_cuda_rows_from_f32(const float *y, size_t n, epmoe_dtype dtype, void *out,
                                      unsigned long long *first_bad, cudaStream_t stream);
/* counts[e] += number of ids[i] == e, over n ids (entries outside [0, E) are skipped). */
epmoe_status epmoe_cuda_expert_histogram(const int32_t *ids, int64_t n, int64_t E,
                                         unsigned long long *counts, cudaStream_t stream);

/* ---- shared expert (shared_expert.cu) ----------------------------------------------------- */

/* fp32 -> bf16 (RNE), n elements. */
epmoe_status epmoe_cuda_f32_to_bf16(const float *x, size_t n, uint16_t *out,
                                    cudaStream_t stream);

/* The shared expert's GEMMs always run on whole chunks of this many rows, whatever T is.
 * cuBLAS picks its kernel (tile shape, split-K) from the problem size, and a different kernel
 * sums a row's products in a different order: with one fixed M, every chunk is the same
 * problem, so a token's bits do not depend on how many other tokens share its batch (the
 * guarantee the CPU path and the routed experts already give). 512 rows fill the H100's SMs
 * with 128x128 tiles at H = 4096, so prefill loses little; a decode batch pays for 512 rows of
 * a GEMM that reading the weights bounds anyway. */
#define EPMOE_SHARED_CHUNK_ROWS 512

/* Scratch of the shared expert (device pointers, sized by the caller for
 * Ts = T rounded up to EPMOE_SHARED_CHUNK_ROWS rows). */
typedef struct {
    uint16_t *x_bf16;   /* [Ts, H] */
    float *h;           /* [Ts, 2*Is] */
    uint16_t *a_bf16;   /* [Ts, Is] */
} epmoe_cuda_shared_scratch;

/* y[T,H] = swiglu(x . W13^T) . W2^T with bf16 operands (y holds Ts rows; rows past T are
 * scratch) (weights w13 [2*Is, H], w2 [H, Is]),
 * fp32 accumulation (cublasGemmEx, CUBLAS_COMPUTE_32F), the same clamp as the routed experts.
 * Binds the handle to `stream` and then to the caller's workspace (cublasSetStream resets the
 * workspace to cuBLAS's own pool, which would allocate during graph capture). */
epmoe_status epmoe_cuda_shared_forward(cublasHandle_t cublas, void *cublas_workspace,
                                       size_t cublas_workspace_bytes, const float *x, int64_t T,
                                       int64_t H, int64_t Is, const uint16_t *w13_bf16,
                                       const uint16_t *w2_bf16, const epmoe_cuda_swiglu_act *act,
                                       const epmoe_cuda_shared_scratch *scratch, float *y,
                                       cudaStream_t stream);

#ifdef __cplusplus
}
#endif

#ifdef __CUDACC__
/* ---- device helpers shared by the .cu files ------------------------------------------------ */

/* Expert of padded row `row` (the largest e with padded_offsets[e] <= row, skipping empty
 * experts, as epmoe_expert_of_row) and whether the row is real: row - padded_offsets[e] <
 * tokens_per_expert[e]. -1 for padding rows and rows beyond the layout. */
static __device__ __forceinline__ int64_t epmoe_cuda_expert_of_real_row(
    const int64_t *padded_offsets, const int64_t *tokens_per_expert, int64_t n, int64_t row) {
    if (row < 0 || row >= padded_offsets[n]) return -1;
    int64_t lo = 0, hi = n; /* padded_offsets[lo] <= row < padded_offsets[hi] */
    while (hi - lo > 1) {
        int64_t mid = lo + (hi - lo) / 2;
        if (padded_offsets[mid] <= row) lo = mid;
        else hi = mid;
    }
    return row - padded_offsets[lo] < tokens_per_expert[lo] ? lo : -1;
}
#endif
#endif
