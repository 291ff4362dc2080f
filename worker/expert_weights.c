/* Loading one layer's weights for one rank (layouts in worker/expert_weights.h; the checkpoint
 * layouts in docs/checkpoints.md).
 *
 * What each layout stores and what the loader makes of it:
 *   gate.weight     F32 (epmoe) or BF16 [E, H]                  -> fp32
 *   gate.bias       F32 [E] (BF16 accepted)                     -> fp32; score-routed layers
 *   gate.tid2eid    I32 (epmoe) or I64 [vocab, k]               -> int32, checked < E
 *   shared w1/w3/w2 BF16, or F8_E4M3 + .scale per b x b block   -> fp32, exactly
 *                   (UE8M0 as F8_E8M0 or U8, or F32), b = fp8_block_size
 *   routed experts  NVFP4 (.weight U8, .weight_scale E4M3 [N, K/16], .weight_scale_2 and
 *                   .input_scale F32) or MXFP4 (.weight I8/U8, .scale UE8M0 [N, K/32],
 *                   converted to NVFP4 exactly). The epmoe layout says which in
 *                   weight_format; a model directory says it per projection, by the tensors
 *                   present (NVIDIA's export may leave the MTP block's experts in MXFP4).
 *   expert biases   (expert_bias = 1) epmoe: .bias F32 [N] per projection; gpt-oss: stacked
 *                   BF16 [E, 2I] and [E, H]                     -> fp32 w13_bias, w2_bias
 *   gpt-oss         every expert of a layer stacked: gate_up_proj_blocks U8 [E, 2I, H/32, 16]
 *                   and _scales U8 [E, 2I, H/32] (MXFP4), rows fused in gate_up_order; a rank
 *                   copies its experts' rows out, gate rows and up rows apart, and converts
 *                   each to NVFP4 exactly as above (w1 and w3 keep their own tensor scales).
 * MXFP4 has no input_scale, nor may NVIDIA's export: w13_input_scale and w2_input_scale are 0
 * then, and act_scale=static is refused by the engine. For NVFP4, w1 and w3 quantize the same
 * input: w13_input_scale is the larger of the two calibrations, so a block scale derived from
 * it cannot be smaller than either would give.
 *
 * The local experts are read by a few threads (each copies its experts' byte ranges out of the
 * mapped shards, so the page faults that read the file overlap); the result does not depend on
 * their number, and the first failing expert's message is the one reported.
 */
#include "worker/expert_weights.h"

#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/checkpoint.h"
#include "common/formats.h"
#include "common/nvfp4.h"

#define NAME_CAP 160
#define MAX_LOAD_THREADS 8

typedef struct {
    const epmoe_st_set *ckpt;
    const epmoe_config *cfg;
    int64_t layer;
    int model_dir;               /* a real layout: formats are read off the tensors present */
    _Atomic int64_t bytes_read;  /* tensor bytes copied out of the checkpoint */
} loader;

static const char *file_of(const loader *ld, const char *name) {
    const epmoe_st_file *file = NULL;
    epmoe_st_set_find(ld->ckpt, name, &file);
    return file ? epmoe_st_path(file) : epmoe_st_set_path(ld->ckpt);
}

static epmoe_status alloc_bytes(void **p, size_t n, const char *what, int64_t layer) {
    *p = malloc(n ? n : 1);
    EPMOE_REQUIRE(*p != NULL, EPMOE_ERR_OOM, "layer %lld: cannot allocate %zu bytes for %s",
                  (long long)layer, n, what);
    return EPMOE_OK;
}

static void count_read(loader *ld, const epmoe_st_tensor *t) {
    atomic_fetch_add(&ld->bytes_read, (int64_t)t->nbytes);
}

static void count_bytes(loader *ld, size_t n) { atomic_fetch_add(&ld->bytes_read, (int64_t)n); }

static epmoe_status check_finite(const loader *ld, const char *name, const float *x, size_t n) {
    for (size_t i = 0; i < n; i++)
        EPMOE_REQUIRE(isfinite(x[i]), EPMOE_ERR_NUMERIC, "%s: %s: element %zu is %g",
                      file_of(ld, name), name, i, (double)x[i]);
    return EPMOE_OK;
}

/* A dense F32 or BF16 tensor of exactly `shape`, converted to fp32 and checked finite. */
static epmoe_status load_dense(loader *ld, const char *name, int ndim, const int64_t *shape,
                               float *dst) {
    static const epmoe_dtype dense[2] = {EPMOE_DTYPE_F32, EPMOE_DTYPE_BF16};
    const epmoe_st_tensor *t = NULL;
    EPMOE_TRY(epmoe_st_set_require_any(ld->ckpt, name, dense, 2, ndim, shape, &t));
    size_t n = t->nbytes / epmoe_dtype_size(t->dtype);
    EPMOE_TRY(epmoe_convert_to_f32(t->dtype, t->data, n, dst));
    count_read(ld, t);
    return check_finite(ld, name, dst, n);
}

/* One F32 value stored as a scalar ([] or [1]) that must be finite and > 0. */
static epmoe_status load_positive_scalar(loader *ld, const char *name, float *out) {
    const epmoe_st_tensor *t = NULL;
    EPMOE_TRY(epmoe_st_set_require(ld->ckpt, name, EPMOE_DTYPE_F32, 0, NULL, &t));
    EPMOE_REQUIRE(t->ndim == 0 || (t->ndim == 1 && t->shape[0] == 1), EPMOE_ERR_FORMAT,
                  "%s: %s: %d dimensions of %lld..., expected a scalar ([] or [1])",
                  file_of(ld, name), name, t->ndim, (long long)(t->ndim ? t->shape[0] : 0));
    float v;
    memcpy(&v, t->data, sizeof v);
    EPMOE_REQUIRE(isfinite(v) && v > 0.0f, EPMOE_ERR_NUMERIC,
                  "%s: %s: %g, expected a finite value > 0", file_of(ld, name), name, (double)v);
    count_read(ld, t);
    *out = v;
    return EPMOE_OK;
}

/* ---- gate ---- */

static epmoe_status load_gate_weight(loader *ld, epmoe_layer_weights *w) {
    const int64_t E = w->n_experts, H = w->hidden_size;
    char name[NAME_CAP];
    EPMOE_TRY(epmoe_ckpt_gate_name(name, sizeof name, ld->cfg, ld->layer, "weight"));
    EPMOE_TRY(alloc_bytes((void **)&w->gate_weight, (size_t)(E * H) * sizeof(float), name,
                          ld->layer));
    const epmoe_st_tensor *t = NULL;
    EPMOE_TRY(epmoe_st_set_lookup(ld->ckpt, name, &t, NULL));
    /* [H, E] is a gate stored the other way round (x.W rather than W.x): say so rather than
     * guess which convention a converter meant. */
    EPMOE_REQUIRE(!t || H == E || t->ndim != 2 || t->shape[0] != H || t->shape[1] != E,
                  EPMOE_ERR_FORMAT,
                  "%s: %s: shape [%lld, %lld], expected [%lld, %lld] (n_routed_experts, "
                  "hidden_size): the gate looks transposed",
                  file_of(ld, name), name, (long long)H, (long long)E, (long long)E,
                  (long long)H);
    return load_dense(ld, name, 2, (int64_t[]){E, H}, w->gate_weight);
}

/* tid2eid as I32 or I64 [vocab, k]: every id an expert, no expert twice in a row. */
static epmoe_status load_tid2eid(loader *ld, epmoe_layer_weights *w) {
    const int64_t V = ld->cfg->vocab_size, k = ld->cfg->top_k, E = w->n_experts;
    static const epmoe_dtype ids[2] = {EPMOE_DTYPE_I32, EPMOE_DTYPE_I64};
    char name[NAME_CAP];
    const epmoe_st_tensor *t = NULL;
    EPMOE_TRY(epmoe_ckpt_gate_name(name, sizeof name, ld->cfg, ld->layer, "tid2eid"));
    EPMOE_TRY(epmoe_st_set_require_any(ld->ckpt, name, ids, 2, 2, (int64_t[]){V, k}, &t));
    EPMOE_TRY(alloc_bytes((void **)&w->tid2eid, (size_t)(V * k) * sizeof(int32_t), name,
                          ld->layer));
    const unsigned char *p = t->data;
    for (int64_t i = 0; i < V * k; i++) {
        int64_t id;
        if (t->dtype == EPMOE_DTYPE_I64) {
            memcpy(&id, p + 8 * i, 8);
        } else {
            int32_t id32;
            memcpy(&id32, p + 4 * i, 4);
            id = id32;
        }
        EPMOE_REQUIRE(id >= 0 && id < E, EPMOE_ERR_RANGE,
                      "%s: %s: token %lld slot %lld holds expert %lld, outside [0, %lld)",
                      file_of(ld, name), name, (long long)(i / k), (long long)(i % k),
                      (long long)id, (long long)E);
        w->tid2eid[i] = (int32_t)id;
    }
    count_read(ld, t);
    /* Routing would reject such a row at forward time; a checkpoint that holds one is broken,
     * so say so at load, naming the token. */
    for (int64_t tok = 0; tok < V; tok++) {
        const int32_t *row = w->tid2eid + tok * k;
        for (int64_t a = 0; a < k; a++)
            for (int64_t b = a + 1; b < k; b++)
                EPMOE_REQUIRE(row[a] != row[b], EPMOE_ERR_FORMAT,
                              "%s: %s: token %lld lists expert %d twice (slots %lld and %lld); "
                              "a token's %lld experts must be distinct",
                              file_of(ld, name), name, (long long)tok, (int)row[a], (long long)a,
                              (long long)b, (long long)k);
    }
    return EPMOE_OK;
}

static epmoe_status load_gate(loader *ld, epmoe_layer_weights *w) {
    EPMOE_TRY(load_gate_weight(ld, w));
    if (epmoe_ckpt_layer_is_hash(ld->cfg, ld->layer)) return load_tid2eid(ld, w);
    /* Score-routed: the selection bias (DeepSeek's noaux_tc routing). */
    char name[NAME_CAP];
    const int64_t E = w->n_experts;
    EPMOE_TRY(epmoe_ckpt_gate_name(name, sizeof name, ld->cfg, ld->layer, "bias"));
    const char *where = epmoe_st_set_index_path(ld->ckpt) ? epmoe_st_set_index_path(ld->ckpt)
                                                          : epmoe_st_set_path(ld->ckpt);
    EPMOE_REQUIRE(epmoe_st_set_contains(ld->ckpt, name) ||
                      ld->cfg->scoring == EPMOE_SCORING_TOPK_SOFTMAX,
                  EPMOE_ERR_NOT_FOUND,
                  "%s: tensor %s not found: layer %lld routes by score (layers below %lld route "
                  "by token id) and needs its selection bias",
                  where, name, (long long)ld->layer, (long long)ld->cfg->n_hash_layers);
    EPMOE_REQUIRE(epmoe_st_set_contains(ld->ckpt, name), EPMOE_ERR_NOT_FOUND,
                  "%s: tensor %s not found: the router of layer %lld has a bias (gpt-oss: part "
                  "of its logits)",
                  where, name, (long long)ld->layer);
    EPMOE_TRY(alloc_bytes((void **)&w->gate_bias, (size_t)E * sizeof(float), name, ld->layer));
    return load_dense(ld, name, 1, (int64_t[]){E}, w->gate_bias);
}

/* ---- shared expert ---- */

/* FP8 E4M3 [N, K] with one scale per b x b block ([ceil(N/b), ceil(K/b)], UE8M0 or F32):
 * e4m3 * 2^e is exact in fp32 (and in bf16, which the GPU upload converts it to). */
static epmoe_status load_fp8_blocks(loader *ld, const char *name, const epmoe_st_tensor *wt,
                                    const char *scale_name, int64_t N, int64_t K, float *dst) {
    const int64_t b = ld->cfg->fp8_block_size, SN = (N + b - 1) / b, SK = (K + b - 1) / b;
    static const epmoe_dtype scales[3] = {EPMOE_DTYPE_F8_E8M0, EPMOE_DTYPE_U8, EPMOE_DTYPE_F32};
    const epmoe_st_tensor *st = NULL;
    EPMOE_TRY(epmoe_st_set_require_any(ld->ckpt, scale_name, scales, 3, 2, (int64_t[]){SN, SK},
                                       &st));
    float *block_scale = malloc((size_t)(SN * SK) * sizeof(float));
    EPMOE_REQUIRE(block_scale != NULL, EPMOE_ERR_OOM, "%s: %lld block scales", scale_name,
                  (long long)(SN * SK));
    epmoe_status status = EPMOE_OK;
    for (int64_t i = 0; i < SN * SK && status == EPMOE_OK; i++) {
        if (st->dtype == EPMOE_DTYPE_F32) {
            memcpy(&block_scale[i], (const unsigned char *)st->data + 4 * i, 4);
        } else {
            uint8_t e = ((const uint8_t *)st->data)[i];
            block_scale[i] = epmoe_ue8m0_to_float(e);
        }
        if (!isfinite(block_scale[i]) || block_scale[i] < 0.0f)
            status = epmoe_set_error(EPMOE_ERR_NUMERIC, __FILE__, __LINE__,
                                     "%s: %s: block scale [%lld, %lld] is %g",
                                     file_of(ld, scale_name), scale_name, (long long)(i / SK),
                                     (long long)(i % SK), (double)block_scale[i]);
    }
    const uint8_t *codes = wt->data;
    for (int64_t n = 0; n < N && status == EPMOE_OK; n++) {
        for (int64_t k = 0; k < K; k++) {
            uint8_t c = codes[n * K + k];
            if ((c & 0x7f) == 0x7f) {
                status = epmoe_set_error(EPMOE_ERR_NUMERIC, __FILE__, __LINE__,
                                         "%s: %s: element [%lld, %lld] is the E4M3 NaN (0x%02x)",
                                         file_of(ld, name), name, (long long)n, (long long)k, c);
                break;
            }
            dst[n * K + k] = epmoe_e4m3_to_float(c) * block_scale[(n / b) * SK + k / b];
        }
    }
    free(block_scale);
    EPMOE_TRY(status);
    count_read(ld, wt);
    count_read(ld, st);
    return check_finite(ld, name, dst, (size_t)(N * K));
}

static epmoe_status load_shared_proj(loader *ld, const char *proj, int64_t N, int64_t K,
                                     float *dst) {
    char name[NAME_CAP], scale_name[NAME_CAP];
    EPMOE_TRY(epmoe_ckpt_shared_name(name, sizeof name, ld->cfg, ld->layer, proj, "weight"));
    if (!ld->model_dir) return load_dense(ld, name, 2, (int64_t[]){N, K}, dst);
    static const epmoe_dtype stored[3] = {EPMOE_DTYPE_F8_E4M3, EPMOE_DTYPE_BF16, EPMOE_DTYPE_F32};
    const epmoe_st_tensor *t = NULL;
    EPMOE_TRY(epmoe_st_set_require_any(ld->ckpt, name, stored, 3, 2, (int64_t[]){N, K}, &t));
    if (t->dtype != EPMOE_DTYPE_F8_E4M3) return load_dense(ld, name, 2, (int64_t[]){N, K}, dst);
    EPMOE_TRY(epmoe_ckpt_shared_name(scale_name, sizeof scale_name, ld->cfg, ld->layer, proj,
                                     "scale"));
    return load_fp8_blocks(ld, name, t, scale_name, N, K, dst);
}

static epmoe_status load_shared(loader *ld, epmoe_layer_weights *w) {
    int64_t Is = w->shared_inter, H = w->hidden_size;
    if (Is == 0) return EPMOE_OK;
    EPMOE_TRY(alloc_bytes((void **)&w->shared_w13, (size_t)(2 * Is * H) * sizeof(float),
                          "shared_w13", ld->layer));
    EPMOE_TRY(alloc_bytes((void **)&w->shared_w2, (size_t)(H * Is) * sizeof(float), "shared_w2",
                          ld->layer));
    EPMOE_TRY(load_shared_proj(ld, "w1", Is, H, w->shared_w13));
    EPMOE_TRY(load_shared_proj(ld, "w3", Is, H, w->shared_w13 + Is * H));
    return load_shared_proj(ld, "w2", H, Is, w->shared_w2);
}

/* ---- routed experts ---- */

/* Where one projection of one expert lands in the rank's arrays. */
typedef struct {
    uint8_t *codes;    /* [N, K/2] */
    uint8_t *sf;       /* [N, K/16] UE4M3 */
    float *scale_2;
    float input_scale; /* 0 when the checkpoint has none */
} proj_dst;

static const epmoe_dtype code_dtypes[2] = {EPMOE_DTYPE_U8, EPMOE_DTYPE_I8};

static epmoe_status load_proj_nvfp4(loader *ld, int64_t expert, const char *proj, int64_t N,
                                    int64_t K, proj_dst *dst) {
    char name[NAME_CAP];
    const epmoe_st_tensor *t = NULL;
    const epmoe_config *cfg = ld->cfg;

    EPMOE_TRY(epmoe_ckpt_expert_name(name, sizeof name, cfg, ld->layer, expert, proj, "weight"));
    EPMOE_TRY(epmoe_st_set_require_any(ld->ckpt, name, code_dtypes, ld->model_dir ? 2 : 1, 2,
                                       (int64_t[]){N, K / 2}, &t));
    memcpy(dst->codes, t->data, t->nbytes);
    count_read(ld, t);

    static const epmoe_dtype sf_dtypes[2] = {EPMOE_DTYPE_F8_E4M3, EPMOE_DTYPE_U8};
    EPMOE_TRY(epmoe_ckpt_expert_name(name, sizeof name, cfg, ld->layer, expert, proj,
                                     "weight_scale"));
    EPMOE_TRY(epmoe_st_set_require_any(ld->ckpt, name, sf_dtypes, ld->model_dir ? 2 : 1, 2,
                                       (int64_t[]){N, K / EPMOE_NVFP4_BLOCK}, &t));
    const uint8_t *sf = t->data;
    for (size_t i = 0; i < t->nbytes; i++) {
        /* 0x7f/0xff are the e4m3fn NaNs; a set sign bit is a negative block scale, which
         * the unsigned (UE4M3) scale inputs of the block-scaled GEMMs cannot express. */
        EPMOE_REQUIRE((sf[i] & 0x7f) != 0x7f, EPMOE_ERR_NUMERIC,
                      "%s: %s: block scale [%zu, %zu] is NaN (byte 0x%02x)", file_of(ld, name),
                      name, i / (size_t)(K / EPMOE_NVFP4_BLOCK),
                      i % (size_t)(K / EPMOE_NVFP4_BLOCK), sf[i]);
        EPMOE_REQUIRE((sf[i] & 0x80) == 0, EPMOE_ERR_NUMERIC,
                      "%s: %s: block scale [%zu, %zu] is negative (byte 0x%02x)",
                      file_of(ld, name), name, i / (size_t)(K / EPMOE_NVFP4_BLOCK),
                      i % (size_t)(K / EPMOE_NVFP4_BLOCK), sf[i]);
    }
    memcpy(dst->sf, sf, t->nbytes);
    count_read(ld, t);

    EPMOE_TRY(epmoe_ckpt_expert_name(name, sizeof name, cfg, ld->layer, expert, proj,
                                     "weight_scale_2"));
    EPMOE_TRY(load_positive_scalar(ld, name, dst->scale_2));
    EPMOE_TRY(epmoe_ckpt_expert_name(name, sizeof name, cfg, ld->layer, expert, proj,
                                     "input_scale"));
    dst->input_scale = 0.0f;
    if (!ld->model_dir || epmoe_st_set_contains(ld->ckpt, name))
        EPMOE_TRY(load_positive_scalar(ld, name, &dst->input_scale));
    return EPMOE_OK;
}

/* MXFP4 codes already in dst->codes (the same E2M1 packing) and their UE8M0 scales
 * [N, K/32] -> NVFP4 in place, exactly (common/nvfp4.h), or refused naming the tensor. */
static epmoe_status convert_mxfp4(loader *ld, const char *name, const char *part,
                                  const uint8_t *scales, int64_t N, int64_t K, proj_dst *dst) {
    epmoe_status st = epmoe_mxfp4_to_nvfp4(dst->codes, scales, (size_t)N, (size_t)K, dst->codes,
                                           dst->sf, dst->scale_2, NULL);
    if (st != EPMOE_OK) return epmoe_add_context(st, "%s: %s%s", file_of(ld, name), name, part);
    dst->input_scale = 0.0f;
    return EPMOE_OK;
}

static epmoe_status load_proj_mxfp4(loader *ld, int64_t expert, const char *proj, int64_t N,
                                    int64_t K, proj_dst *dst) {
    char name[NAME_CAP];
    const epmoe_st_tensor *t = NULL;
    const epmoe_config *cfg = ld->cfg;
    static const epmoe_dtype mx_codes[2] = {EPMOE_DTYPE_I8, EPMOE_DTYPE_U8};
    static const epmoe_dtype mx_scales[2] = {EPMOE_DTYPE_F8_E8M0, EPMOE_DTYPE_U8};

    EPMOE_TRY(epmoe_ckpt_expert_name(name, sizeof name, cfg, ld->layer, expert, proj, "weight"));
    EPMOE_TRY(epmoe_st_set_require_any(ld->ckpt, name, mx_codes, ld->model_dir ? 2 : 1, 2,
                                       (int64_t[]){N, K / 2}, &t));
    memcpy(dst->codes, t->data, t->nbytes); /* the same E2M1 packing */
    count_read(ld, t);

    EPMOE_TRY(epmoe_ckpt_expert_name(name, sizeof name, cfg, ld->layer, expert, proj, "scale"));
    EPMOE_TRY(epmoe_st_set_require_any(ld->ckpt, name, mx_scales, ld->model_dir ? 2 : 1, 2,
                                       (int64_t[]){N, K / EPMOE_MXFP4_BLOCK}, &t));
    count_read(ld, t);
    EPMOE_TRY(convert_mxfp4(ld, name, "", t->data, N, K, dst));
    return EPMOE_OK;
}

/* The epmoe layout: weight_format says. A model directory: the tensors present say. */
static epmoe_status load_proj(loader *ld, int64_t expert, const char *proj, int64_t N, int64_t K,
                              proj_dst *dst) {
    int mxfp4 = ld->cfg->weight_format == EPMOE_WEIGHTS_MXFP4;
    if (ld->model_dir) {
        char nv[NAME_CAP], mx[NAME_CAP];
        EPMOE_TRY(epmoe_ckpt_expert_name(nv, sizeof nv, ld->cfg, ld->layer, expert, proj,
                                         "weight_scale"));
        EPMOE_TRY(epmoe_ckpt_expert_name(mx, sizeof mx, ld->cfg, ld->layer, expert, proj,
                                         "scale"));
        int has_nv = epmoe_st_set_contains(ld->ckpt, nv), has_mx = epmoe_st_set_contains(ld->ckpt, mx);
        EPMOE_REQUIRE(has_nv || has_mx, EPMOE_ERR_NOT_FOUND,
                      "%s: neither %s (NVFP4) nor %s (MXFP4) is in the checkpoint",
                      epmoe_st_set_index_path(ld->ckpt) ? epmoe_st_set_index_path(ld->ckpt)
                                                        : epmoe_st_set_path(ld->ckpt),
                      nv, mx);
        EPMOE_REQUIRE(!(has_nv && has_mx), EPMOE_ERR_FORMAT,
                      "%s: both %s (NVFP4) and %s (MXFP4) are in the checkpoint: which one the "
                      "weight belongs to is ambiguous",
                      file_of(ld, mx), nv, mx);
        mxfp4 = has_mx;
    }
    return mxfp4 ? load_proj_mxfp4(ld, expert, proj, N, K, dst)
                 : load_proj_nvfp4(ld, expert, proj, N, K, dst);
}

/* ---- gpt-oss: a layer's experts stacked in one tensor per projection ---- */

/* One stacked projection: blocks [E, N, K/32, 16] and scales [E, N, K/32] (MXFP4, U8 as released;
 * I8 / F8_E8M0 hold the same bytes) and bias [E, N] (BF16 as released, F32 accepted), each
 * shape checked. */
typedef struct {
    char blocks_name[NAME_CAP], scales_name[NAME_CAP], bias_name[NAME_CAP];
    const epmoe_st_tensor *blocks, *scales, *bias;
} stacked_proj;

static epmoe_status stacked_lookup(loader *ld, const char *which, int64_t N, int64_t K,
                                   stacked_proj *p) {
    static const epmoe_dtype codes[2] = {EPMOE_DTYPE_U8, EPMOE_DTYPE_I8};
    static const epmoe_dtype scales[2] = {EPMOE_DTYPE_U8, EPMOE_DTYPE_F8_E8M0};
    static const epmoe_dtype dense[2] = {EPMOE_DTYPE_BF16, EPMOE_DTYPE_F32};
    const epmoe_config *cfg = ld->cfg;
    const int64_t E = cfg->n_routed_experts, G = K / EPMOE_MXFP4_BLOCK;
    EPMOE_TRY(epmoe_ckpt_stacked_expert_name(p->blocks_name, NAME_CAP, cfg, ld->layer, which,
                                             "blocks"));
    EPMOE_TRY(epmoe_ckpt_stacked_expert_name(p->scales_name, NAME_CAP, cfg, ld->layer, which,
                                             "scales"));
    EPMOE_TRY(epmoe_ckpt_stacked_expert_name(p->bias_name, NAME_CAP, cfg, ld->layer, which,
                                             "bias"));
    EPMOE_TRY(epmoe_st_set_require_any(ld->ckpt, p->blocks_name, codes, 2, 4,
                                       (int64_t[]){E, N, G, EPMOE_MXFP4_BLOCK / 2}, &p->blocks));
    EPMOE_TRY(epmoe_st_set_require_any(ld->ckpt, p->scales_name, scales, 2, 3,
                                       (int64_t[]){E, N, G}, &p->scales));
    return epmoe_st_set_require_any(ld->ckpt, p->bias_name, dense, 2, 2, (int64_t[]){E, N},
                                    &p->bias);
}

/* Expert `expert`'s N bias values of a stacked [E, N] tensor, as fp32, checked finite. */
static epmoe_status stacked_bias_row(loader *ld, const stacked_proj *p, int64_t expert, int64_t N,
                                     float *dst) {
    const size_t size = epmoe_dtype_size(p->bias->dtype);
    EPMOE_TRY(epmoe_convert_to_f32(p->bias->dtype,
                                   (const uint8_t *)p->bias->data + (size_t)(expert * N) * size,
                                   (size_t)N, dst));
    count_bytes(ld, (size_t)N * size);
    for (int64_t n = 0; n < N; n++)
        EPMOE_REQUIRE(isfinite(dst[n]), EPMOE_ERR_NUMERIC, "%s: %s: element [%lld, %lld] is %g",
                      file_of(ld, p->bias_name), p->bias_name, (long long)expert, (long long)n,
                      (double)dst[n]);
    return EPMOE_OK;
}

/* Gate rows (up = 0) or up rows (up = 1) of expert `expert` out of the fused gate/up tensors,
 * in gate_up_order (epmoe_ckpt_fused_row), into w1 or w3 as NVFP4, and their biases into b. */
static epmoe_status load_fused_half(loader *ld, const stacked_proj *p, int64_t expert, int up,
                                    proj_dst *dst, uint8_t *scales, const float *fused_bias,
                                    float *b) {
    const epmoe_config *cfg = ld->cfg;
    const int64_t I = cfg->moe_inter_size, H = cfg->hidden_size;
    const size_t row_codes = (size_t)(H / 2), row_scales = (size_t)(H / EPMOE_MXFP4_BLOCK);
    const uint8_t *blocks = (const uint8_t *)p->blocks->data + (size_t)(expert * 2 * I) * row_codes;
    const uint8_t *all_scales =
        (const uint8_t *)p->scales->data + (size_t)(expert * 2 * I) * row_scales;
    for (int64_t n = 0; n < I; n++) {
        const int64_t r = epmoe_ckpt_fused_row(cfg, up, n);
        memcpy(dst->codes + (size_t)n * row_codes, blocks + (size_t)r * row_codes, row_codes);
        memcpy(scales + (size_t)n * row_scales, all_scales + (size_t)r * row_scales, row_scales);
        b[n] = fused_bias[r];
    }
    count_bytes(ld, (size_t)I * (row_codes + row_scales));
    return convert_mxfp4(ld, p->scales_name, up ? " (up rows)" : " (gate rows)", scales, I, H, dst);
}

static epmoe_status load_expert_stacked(loader *ld, epmoe_layer_weights *w, int64_t local,
                                        proj_dst *w1, proj_dst *w3, proj_dst *w2) {
    const int64_t H = w->hidden_size, I = w->inter_size, expert = w->slice.start + local;
    stacked_proj gate_up, down;
    EPMOE_TRY(stacked_lookup(ld, "gate_up_proj", 2 * I, H, &gate_up));
    EPMOE_TRY(stacked_lookup(ld, "down_proj", H, I, &down));
    /* one expert's gate or up scales, and its fused biases */
    uint8_t *scales = malloc((size_t)(I * (H / EPMOE_MXFP4_BLOCK)) + 1);
    float *fused_bias = malloc((size_t)(2 * I) * sizeof(float));
    epmoe_status st = scales && fused_bias
                          ? EPMOE_OK
                          : epmoe_set_error(EPMOE_ERR_OOM, __FILE__, __LINE__,
                                            "expert %lld: scratch for its gate/up rows",
                                            (long long)expert);
    float *b13 = w->w13_bias + local * 2 * I;
    if (st == EPMOE_OK) st = stacked_bias_row(ld, &gate_up, expert, 2 * I, fused_bias);
    if (st == EPMOE_OK) st = load_fused_half(ld, &gate_up, expert, 0, w1, scales, fused_bias, b13);
    if (st == EPMOE_OK)
        st = load_fused_half(ld, &gate_up, expert, 1, w3, scales, fused_bias, b13 + I);
    free(scales);
    free(fused_bias);
    EPMOE_TRY(st);
    /* down_proj: expert e's [H, I] rows as they are */
    const size_t codes = (size_t)(H * I / 2), n_scales = (size_t)(H * (I / EPMOE_MXFP4_BLOCK));
    memcpy(w2->codes, (const uint8_t *)down.blocks->data + (size_t)expert * codes, codes);
    count_bytes(ld, codes + n_scales);
    EPMOE_TRY(convert_mxfp4(ld, down.scales_name, "",
                            (const uint8_t *)down.scales->data + (size_t)expert * n_scales, H, I,
                            w2));
    EPMOE_TRY(stacked_bias_row(ld, &down, expert, H, w->w2_bias + local * H));
    w->w13_input_scale[local] = 0.0f; /* MXFP4 has no calibration */
    w->w2_input_scale[local] = 0.0f;
    return EPMOE_OK;
}

static epmoe_status load_expert(loader *ld, epmoe_layer_weights *w, int64_t local) {
    const int64_t H = w->hidden_size, I = w->inter_size;
    const int64_t expert = w->slice.start + local;
    const int64_t row13 = local * 2 * I; /* first w13 row of this expert */
    proj_dst w1 = {w->w13_codes + row13 * (H / 2), w->w13_sf + row13 * (H / 16),
                   &w->w13_scale_2[2 * local], 0.0f};
    proj_dst w3 = {w->w13_codes + (row13 + I) * (H / 2), w->w13_sf + (row13 + I) * (H / 16),
                   &w->w13_scale_2[2 * local + 1], 0.0f};
    proj_dst w2 = {w->w2_codes + local * H * (I / 2), w->w2_sf + local * H * (I / 16),
                   &w->w2_scale_2[local], 0.0f};
    if (ld->cfg->checkpoint_layout == EPMOE_LAYOUT_GPT_OSS)
        return load_expert_stacked(ld, w, local, &w1, &w3, &w2);
    EPMOE_TRY(load_proj(ld, expert, "w1", I, H, &w1));
    EPMOE_TRY(load_proj(ld, expert, "w3", I, H, &w3));
    EPMOE_TRY(load_proj(ld, expert, "w2", H, I, &w2));
    w->w13_input_scale[local] = fmaxf(w1.input_scale, w3.input_scale);
    w->w2_input_scale[local] = w2.input_scale;
    if (ld->cfg->expert_bias) { /* epmoe layout: one F32 (or BF16) [N] per projection */
        char name[NAME_CAP];
        float *b13 = w->w13_bias + local * 2 * I;
        EPMOE_TRY(epmoe_ckpt_expert_name(name, sizeof name, ld->cfg, ld->layer, expert, "w1", "bias"));
        EPMOE_TRY(load_dense(ld, name, 1, (int64_t[]){I}, b13));
        EPMOE_TRY(epmoe_ckpt_expert_name(name, sizeof name, ld->cfg, ld->layer, expert, "w3", "bias"));
        EPMOE_TRY(load_dense(ld, name, 1, (int64_t[]){I}, b13 + I));
        EPMOE_TRY(epmoe_ckpt_expert_name(name, sizeof name, ld->cfg, ld->layer, expert, "w2", "bias"));
        EPMOE_TRY(load_dense(ld, name, 1, (int64_t[]){H}, w->w2_bias + local * H));
    }
    return EPMOE_OK;
}

/* Experts handed out one at a time to a few threads; the lowest failing expert is reported. */
typedef struct {
    loader *ld;
    epmoe_layer_weights *w;
    _Atomic int64_t next;
    pthread_mutex_t lock;
    int64_t failed_at; /* n_local when none failed */
    epmoe_status failed_status;
    char message[1024];
} expert_queue;

static void *load_experts_worker(void *arg) {
    expert_queue *q = arg;
    for (;;) {
        int64_t local = atomic_fetch_add(&q->next, 1);
        pthread_mutex_lock(&q->lock);
        int stop = local >= q->failed_at; /* also: past the end */
        pthread_mutex_unlock(&q->lock);
        if (stop) return NULL;
        epmoe_status st = load_expert(q->ld, q->w, local);
        if (st != EPMOE_OK) {
            pthread_mutex_lock(&q->lock);
            if (local < q->failed_at) {
                q->failed_at = local;
                q->failed_status = st;
                snprintf(q->message, sizeof q->message, "%s", epmoe_last_error());
            }
            pthread_mutex_unlock(&q->lock);
        }
    }
}

static int load_thread_count(int64_t n_local) {
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    int64_t n = cpus > 0 ? cpus : 1;
    if (n > MAX_LOAD_THREADS) n = MAX_LOAD_THREADS;
    if (n > n_local) n = n_local;
    return (int)(n > 0 ? n : 1);
}

static epmoe_status load_experts(loader *ld, epmoe_layer_weights *w) {
    int64_t H = w->hidden_size, I = w->inter_size, n = w->n_local;
    size_t w13_codes = (size_t)(n * 2 * I * H / 2), w13_sf = (size_t)(n * 2 * I * H / 16);
    size_t w2_codes = (size_t)(n * H * I / 2), w2_sf = (size_t)(n * H * I / 16);
    EPMOE_TRY(alloc_bytes((void **)&w->w13_codes, w13_codes, "w13 codes", ld->layer));
    EPMOE_TRY(alloc_bytes((void **)&w->w13_sf, w13_sf, "w13 block scales", ld->layer));
    EPMOE_TRY(alloc_bytes((void **)&w->w13_scale_2, (size_t)(2 * n) * sizeof(float),
                          "w13 weight_scale_2", ld->layer));
    EPMOE_TRY(alloc_bytes((void **)&w->w13_input_scale, (size_t)n * sizeof(float),
                          "w13 input_scale", ld->layer));
    EPMOE_TRY(alloc_bytes((void **)&w->w2_codes, w2_codes, "w2 codes", ld->layer));
    EPMOE_TRY(alloc_bytes((void **)&w->w2_sf, w2_sf, "w2 block scales", ld->layer));
    EPMOE_TRY(alloc_bytes((void **)&w->w2_scale_2, (size_t)n * sizeof(float),
                          "w2 weight_scale_2", ld->layer));
    EPMOE_TRY(alloc_bytes((void **)&w->w2_input_scale, (size_t)n * sizeof(float),
                          "w2 input_scale", ld->layer));
    if (ld->cfg->expert_bias) {
        EPMOE_TRY(alloc_bytes((void **)&w->w13_bias, (size_t)(n * 2 * I) * sizeof(float),
                              "w13 biases", ld->layer));
        EPMOE_TRY(alloc_bytes((void **)&w->w2_bias, (size_t)(n * H) * sizeof(float), "w2 biases",
                              ld->layer));
    }

    expert_queue q = {.ld = ld, .w = w, .failed_at = n, .failed_status = EPMOE_OK};
    atomic_init(&q.next, 0);
    pthread_mutex_init(&q.lock, NULL);
    int n_threads = load_thread_count(n), started = 0;
    pthread_t threads[MAX_LOAD_THREADS];
    for (int i = 1; i < n_threads; i++) {
        if (pthread_create(&threads[i], NULL, load_experts_worker, &q) != 0) break;
        started = i;
    }
    load_experts_worker(&q); /* this thread works too */
    for (int i = 1; i <= started; i++) pthread_join(threads[i], NULL);
    pthread_mutex_destroy(&q.lock);
    if (q.failed_status != EPMOE_OK)
        return epmoe_set_error(q.failed_status, __FILE__, __LINE__, "expert %lld: %s",
                               (long long)(w->slice.start + q.failed_at), q.message);
    return EPMOE_OK;
}

static epmoe_status load_all(loader *ld, epmoe_layer_weights *w) {
    EPMOE_TRY(load_gate(ld, w));
    EPMOE_TRY(load_shared(ld, w));
    EPMOE_TRY(load_experts(ld, w));
    return EPMOE_OK;
}

epmoe_status epmoe_layer_weights_load(const epmoe_st_set *ckpt, const epmoe_config *cfg,
                                      int64_t layer, const epmoe_expert_slice *slice,
                                      epmoe_layer_weights *out) {
    memset(out, 0, sizeof *out);
    EPMOE_REQUIRE(ckpt && cfg && slice, EPMOE_ERR_INVALID_ARG, "NULL checkpoint, config or slice");
    EPMOE_TRY(epmoe_config_validate(cfg));
    EPMOE_REQUIRE(layer >= 0 && layer < cfg->n_layers, EPMOE_ERR_RANGE,
                  "layer %lld outside [0, %lld)", (long long)layer, (long long)cfg->n_layers);
    EPMOE_REQUIRE(slice->start >= 0 && slice->start < slice->end &&
                      slice->end <= cfg->n_routed_experts,
                  EPMOE_ERR_RANGE, "expert slice [%lld, %lld) is not inside [0, %lld)",
                  (long long)slice->start, (long long)slice->end,
                  (long long)cfg->n_routed_experts);
    const int model_dir = cfg->checkpoint_layout != EPMOE_LAYOUT_EPMOE;
    if (model_dir != epmoe_ckpt_is_model_dir(ckpt)) {
        char layout[32];
        epmoe_config_get(cfg, "checkpoint_layout", layout, sizeof layout);
        EPMOE_FAIL(EPMOE_ERR_INVALID_ARG,
                   "%s: the settings say checkpoint_layout %s, but this is %s", epmoe_st_set_path(ckpt),
                   layout, model_dir ? "not a model directory (no config.json)"
                                     : "a model directory (config.json)");
    }

    out->layer = layer;
    out->hidden_size = cfg->hidden_size;
    out->inter_size = cfg->moe_inter_size;
    out->slice = *slice;
    out->n_local = slice->end - slice->start;
    out->n_experts = cfg->n_routed_experts;
    out->vocab_size = cfg->vocab_size;
    out->shared_inter = epmoe_ckpt_shared_inter(cfg);

    loader ld = {ckpt, cfg, layer, model_dir, 0};
    epmoe_status st = load_all(&ld, out);
    if (st != EPMOE_OK) {
        epmoe_layer_weights_free(out);
        return epmoe_add_context(st, "loading layer %lld", (long long)layer);
    }
    out->checkpoint_bytes = atomic_load(&ld.bytes_read);
    return EPMOE_OK;
}

/* The CPU panels (epmoe_layer_weights_prepare_cpu, worker/experts_cpu.c) go with the rest. */
void epmoe_layer_weights_free(epmoe_layer_weights *w) {
    if (!w) return;
    epmoe_layer_weights_release_cpu(w);
    free(w->w13_codes);
    free(w->w13_sf);
    free(w->w13_scale_2);
    free(w->w13_input_scale);
    free(w->w2_codes);
    free(w->w2_sf);
    free(w->w2_scale_2);
    free(w->w2_input_scale);
    free(w->w13_bias);
    free(w->w2_bias);
    free(w->gate_weight);
    free(w->gate_bias);
    free(w->tid2eid);
    free(w->shared_w13);
    free(w->shared_w2);
    memset(w, 0, sizeof *w);
}
