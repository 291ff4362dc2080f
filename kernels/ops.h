/* The operations of one MoE layer, CPU implementations (kernels/cpu/). The CUDA versions in
 * kernels/cuda/ops_cuda.h take the same arguments in the same layouts (device pointers plus a
 * stream) and are tested bit-for-bit (routing, quantization) or to a stated tolerance (GEMMs)
 * against these.
 *
 * Exact definitions that both backends follow:
 *  - gate logits: logits[t,e] = sum_h x[t,h]*Wg[e,h] in fp32, in a fixed blocked order:
 *    h is cut into chunks of EPMOE_GATE_CHUNK (the last one shorter when H is not a multiple:
 *    chunk c covers [c*CH, min((c+1)*CH, H))); the partial sum of chunk c is one fmaf chain in
 *    increasing h starting from +0; the logit is the fp32 sum of the partials in increasing c,
 *    ((0 + p_0) + p_1) + ... (each addition rounded, none fused). Blocked, because the chunks are
 *    independent chains a GPU runs side by side (one H-long dependent chain per output left
 *    its width idle at decode); fixed, because both backends then produce the same bits and
 *    the same expert ids, and because a token's logits depend on its row alone: not on T, the
 *    batch it shares, the rank count or which kernel a batch size selects.
 *  - scores: sqrtsoftplus s = sqrtf(softplus(l)), softplus(l) = l > 20 ? l : log1pf(expf(l));
 *    sigmoid s = 1/(1+expf(-l)); topk_softmax (gpt-oss) s = l.
 *  - top-k: by (s + bias) descending, ties to the lower expert id; slots are filled in that
 *    order, so slot 0 holds the best expert. Summations over slots go in slot order.
 *  - weights: w_i = s[id_i] / (sum over slots of s[id]) * routed_scaling_factor, in fp32,
 *    computed from log scores so that it cannot underflow for very negative logits:
 *    r_i = expf(log s[id_i] - max_j log s[id_j]), w_i = r_i / (sum of r in slot order) * rsf;
 *    log s: sigmoid l < 0 ? l - log1pf(expf(l)) : -log1pf(expf(-l)); sqrtsoftplus
 *    l < -20 ? l/2 : logf(softplus(l))/2 (kernels/cpu/route.c says why).
 *  - topk_softmax (gpt-oss): key = l + bias (one fp32 addition), ids = top-k of the keys (ties
 *    to the lower id), weights = softmax over the k chosen keys, in the same operations:
 *    r_i = expf(key_i - key_0), w_i = r_i / (sum of r in slot order) * rsf. The bias enters
 *    the weights here, unlike DeepSeek's. No groups, no hash layers.
 */
#ifndef EPMOE_OPS_H
#define EPMOE_OPS_H

#include <stddef.h>
#include <stdint.h>

#include "common/config.h"
#include "common/status.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    int64_t n_experts;
    int64_t top_k;
    int64_t scoring;       /* epmoe_scoring */
    int64_t n_groups;      /* 1 = no group limit */
    int64_t topk_groups;
    float routed_scaling_factor;
} epmoe_route_params;

epmoe_route_params epmoe_route_params_from_config(const epmoe_config *cfg);

/* Chunk length of the gate logits' blocked order (the definition above). A constant, not a
 * function of H or of a backend's width: changing it changes every logit's bits. 128 gives
 * H = 4096 (V4-Flash) 32 chunks, one per lane of a warp, and H = 7168 (V4-Pro) 56. */
#define EPMOE_GATE_CHUNK 128

/* logits[T,E] = x[T,H] . Wg[E,H]^T in the blocked order above: the plain statement of the
 * definition (tests and the CUDA comparison); epmoe_cpu_gate_logits_panels is the fast one. */
void epmoe_cpu_gate_logits(const float *x, const float *gate_weight, int64_t T, int64_t H,
                           int64_t E, float *logits);

/* Score-based routing (DeepSeek-V4 sqrtsoftplus+bias, DeepSeek-V3 sigmoid+bias with group
 * limit, or gpt-oss's topk_softmax of logit+bias). bias may be NULL (zero). ids[T,k] (global expert ids), weights[T,k]. Non-finite
 * logits are EPMOE_ERR_NUMERIC naming the token. */
epmoe_status epmoe_cpu_route(const epmoe_route_params *p, const float *logits,
                             const float *bias, int64_t T, int32_t *ids, float *weights);

/* Hash routing (DeepSeek-V4 layers 0-2): ids[t] = tid2eid[token_ids[t], :] (no bias, no
 * search), weights from the scores at those ids as above. token ids outside [0, vocab) and
 * table entries outside [0, E) are EPMOE_ERR_RANGE. */
epmoe_status epmoe_cpu_route_hash(const epmoe_route_params *p, const float *logits,
                                  const int32_t *tid2eid, int64_t vocab_size,
                                  const int32_t *token_ids, int64_t T, int32_t *ids,
                                  float *weights);

/* Clamped SwiGLU on h[rows, 2I] (gate in columns [0, I), up in [I, 2I)) -> out[rows, I].
 * limit <= 0 disables the clamp. dsv4: silu(min(g,L)) * clamp(u,-L,L);
 * step: min(silu(g),L) * clamp(u,-L,L). silu(g) = g / (1 + expf(-g));
 * gptoss: g' = min(g,L), (clamp(u,-L,L) + 1) * (g' / (1 + expf(-(alpha * g')))). alpha is
 * used by gptoss only. */
void epmoe_cpu_swiglu(const float *h, int64_t rows, int64_t I, float limit, int variant,
                      float alpha, float *out);

/* ---- ordered fp32 products -------------------------------------------------------------
 * C[M,N] = A[M,K] . B[N,K]^T where every output element is ONE fmaf chain over k in increasing
 * order, starting from 0. A row's result therefore does not depend on M or on the other rows in
 * the call: outputs are bit-identical whatever the batch composition or the rank count (a BLAS
 * sgemm is not: OpenBLAS gave different bits for the same row at different M on this machine).
 * B is pre-packed into column panels [ceil(N/16)][K][16] (zero-padded) so that the 16 chains of
 * a panel vectorize. */
#define EPMOE_PANEL_COLS 16
size_t epmoe_cpu_panels_floats(int64_t N, int64_t K);
void epmoe_cpu_pack_panels(const float *B, int64_t N, int64_t K, float *panels);
/* Writes column n of row k of the logical B (used when B is produced row by row). */
static inline size_t epmoe_cpu_panel_index(int64_t n, int64_t k, int64_t K) {
    return (size_t)(n / EPMOE_PANEL_COLS) * (size_t)K * EPMOE_PANEL_COLS +
           (size_t)k * EPMOE_PANEL_COLS + (size_t)(n % EPMOE_PANEL_COLS);
}
void epmoe_cpu_gemm_panels(const float *A, int64_t M, int64_t K, const float *panels, int64_t N,
                           float *C);
/* The gate logits of the spec above (blocked order, bit-identical to epmoe_cpu_gate_logits)
 * from Wg[E,H] packed as panels (N = E, K = H), vectorized as epmoe_cpu_gemm_panels is. */
void epmoe_cpu_gate_logits_panels(const float *x, int64_t T, int64_t H, const float *panels,
                                  int64_t E, float *logits);

#ifdef __cplusplus
}
#endif
#endif
