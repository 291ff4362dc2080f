/* Loading one layer's weights for one rank (layouts in worker/expert_weights.h).
 *
 * MXFP4 checkpoints carry no input_scale: w13_input_scale and w2_input_scale are 0 then, and
 * act_scale=static needs an NVFP4 checkpoint (the runtime must refuse static scales of 0).
 * For NVFP4, w1 and w3 quantize the same input: w13_input_scale is the larger of the two
 * calibrations, so a block scale derived from it cannot be smaller than either would give.
 */
#include "worker/expert_weights.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common/checkpoint.h"
#include "common/nvfp4.h"

#define NAME_CAP 160

typedef struct {
    const epmoe_st_set *ckpt;
    const epmoe_config *cfg;
    int64_t layer;
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

static epmoe_status check_finite(const loader *ld, const char *name, const float *x, size_t n) {
    for (size_t i = 0; i < n; i++)
        EPMOE_REQUIRE(isfinite(x[i]), EPMOE_ERR_NUMERIC, "%s: %s: element %zu is %g",
                      file_of(ld, name), name, i, (double)x[i]);
    return EPMOE_OK;
}

/* A dense F32 or BF16 tensor of exactly `shape`, converted to fp32 and checked finite. */
static epmoe_status load_dense(const loader *ld, const char *name, epmoe_dtype dtype, int ndim,
                               const int64_t *shape, float *dst) {
    const epmoe_st_tensor *t = NULL;
    EPMOE_TRY(epmoe_st_set_require(ld->ckpt, name, dtype, ndim, shape, &t));
    size_t n = t->nbytes / epmoe_dtype_size(dtype);
    EPMOE_TRY(epmoe_convert_to_f32(dtype, t->data, n, dst));
    return check_finite(ld, name, dst, n);
}

/* An F32 scalar (shape []) that must be finite and > 0. */
static epmoe_status load_positive_scalar(const loader *ld, const char *name, float *out) {
    const epmoe_st_tensor *t = NULL;
    EPMOE_TRY(epmoe_st_set_require(ld->ckpt, name, EPMOE_DTYPE_F32, 0, NULL, &t));
    float v;
    memcpy(&v, t->data, sizeof v);
    EPMOE_REQUIRE(isfinite(v) && v > 0.0f, EPMOE_ERR_NUMERIC,
                  "%s: %s: %g, expected a finite value > 0", file_of(ld, name), name, (double)v);
    *out = v;
    return EPMOE_OK;
}

static epmoe_status load_gate(const loader *ld, epmoe_layer_weights *w) {
    const epmoe_config *cfg = ld->cfg;
    char name[NAME_CAP];
    int64_t E = cfg->n_routed_experts, H = cfg->hidden_size;

    EPMOE_TRY(epmoe_ckpt_gate_name(name, sizeof name, ld->layer, "weight"));
    EPMOE_TRY(alloc_bytes((void **)&w->gate_weight, (size_t)(E * H) * sizeof(float), name,
                          ld->layer));
    EPMOE_TRY(load_dense(ld, name, EPMOE_DTYPE_F32, 2, (int64_t[]){E, H}, w->gate_weight));

    if (!epmoe_ckpt_layer_is_hash(cfg, ld->layer)) {
        EPMOE_TRY(epmoe_ckpt_gate_name(name, sizeof name, ld->layer, "bias"));
        EPMOE_TRY(alloc_bytes((void **)&w->gate_bias, (size_t)E * sizeof(float), name,
                              ld->layer));
        EPMOE_TRY(load_dense(ld, name, EPMOE_DTYPE_F32, 1, (int64_t[]){E}, w->gate_bias));
        return EPMOE_OK;
    }

    /* Hash layer: tid2eid, and no bias (selection is by table, not by score). */
    int64_t V = cfg->vocab_size, k = cfg->top_k;
    const epmoe_st_tensor *t = NULL;
    EPMOE_TRY(epmoe_ckpt_gate_name(name, sizeof name, ld->layer, "tid2eid"));
    EPMOE_TRY(epmoe_st_set_require(ld->ckpt, name, EPMOE_DTYPE_I32, 2, (int64_t[]){V, k}, &t));
    EPMOE_TRY(alloc_bytes((void **)&w->tid2eid, t->nbytes, name, ld->layer));
    memcpy(w->tid2eid, t->data, t->nbytes);
    for (int64_t i = 0; i < V * k; i++)
        EPMOE_REQUIRE(w->tid2eid[i] >= 0 && w->tid2eid[i] < E, EPMOE_ERR_RANGE,
                      "%s: %s: token %lld slot %lld holds expert %d, outside [0, %lld)",
                      file_of(ld, name), name, (long long)(i / k), (long long)(i % k),
                      (int)w->tid2eid[i], (long long)E);
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

static epmoe_status load_shared(const loader *ld, epmoe_layer_weights *w) {
    int64_t Is = w->shared_inter, H = w->hidden_size;
    if (Is == 0) return EPMOE_OK;
    char name[NAME_CAP];
    EPMOE_TRY(alloc_bytes((void **)&w->shared_w13, (size_t)(2 * Is * H) * sizeof(float),
                          "shared_w13", ld->layer));
    EPMOE_TRY(alloc_bytes((void **)&w->shared_w2, (size_t)(H * Is) * sizeof(float), "shared_w2",
                          ld->layer));
    EPMOE_TRY(epmoe_ckpt_shared_name(name, sizeof name, ld->layer, "w1", "weight"));
    EPMOE_TRY(load_dense(ld, name, EPMOE_DTYPE_BF16, 2, (int64_t[]){Is, H}, w->shared_w13));
    EPMOE_TRY(epmoe_ckpt_shared_name(name, sizeof name, ld->layer, "w3", "weight"));
    EPMOE_TRY(load_dense(ld, name, EPMOE_DTYPE_BF16, 2, (int64_t[]){Is, H},
                         w->shared_w13 + Is * H));
    EPMOE_TRY(epmoe_ckpt_shared_name(name, sizeof name, ld->layer, "w2", "weight"));
    EPMOE_TRY(load_dense(ld, name, EPMOE_DTYPE_BF16, 2, (int64_t[]){H, Is}, w->shared_w2));
    return EPMOE_OK;
}

/* Where one projection of one expert lands in the rank's arrays. */
typedef struct {
    uint8_t *codes;    /* [N, K/2] */
    uint8_t *sf;       /* [N, K/16] UE4M3 */
    float *scale_2;
    float input_scale; /* 0 when the checkpoint has none (MXFP4) */
} proj_dst;

static epmoe_status load_proj_nvfp4(const loader *ld, int64_t expert, const char *proj,
                                    int64_t N, int64_t K, proj_dst *dst) {
    char name[NAME_CAP];
    const epmoe_st_tensor *t = NULL;

    EPMOE_TRY(epmoe_ckpt_expert_name(name, sizeof name, ld->layer, expert, proj, "weight"));
    EPMOE_TRY(epmoe_st_set_require(ld->ckpt, name, EPMOE_DTYPE_U8, 2, (int64_t[]){N, K / 2},
                                   &t));
    memcpy(dst->codes, t->data, t->nbytes);

    EPMOE_TRY(epmoe_ckpt_expert_name(name, sizeof name, ld->layer, expert, proj, "weight_scale"));
    EPMOE_TRY(epmoe_st_set_require(ld->ckpt, name, EPMOE_DTYPE_F8_E4M3, 2,
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

    EPMOE_TRY(epmoe_ckpt_expert_name(name, sizeof name, ld->layer, expert, proj,
                                     "weight_scale_2"));
    EPMOE_TRY(load_positive_scalar(ld, name, dst->scale_2));
    EPMOE_TRY(epmoe_ckpt_expert_name(name, sizeof name, ld->layer, expert, proj, "input_scale"));
    EPMOE_TRY(load_positive_scalar(ld, name, &dst->input_scale));
    return EPMOE_OK;
}

static epmoe_status load_proj_mxfp4(const loader *ld, int64_t expert, const char *proj,
                                    int64_t N, int64_t K, proj_dst *dst) {
    char name[NAME_CAP];
    const epmoe_st_tensor *t = NULL;

    EPMOE_TRY(epmoe_ckpt_expert_name(name, sizeof name, ld->layer, expert, proj, "weight"));
    EPMOE_TRY(epmoe_st_set_require(ld->ckpt, name, EPMOE_DTYPE_I8, 2, (int64_t[]){N, K / 2},
                                   &t));
    memcpy(dst->codes, t->data, t->nbytes); /* same E2M1 packing: codes stay as they are */

    EPMOE_TRY(epmoe_ckpt_expert_name(name, sizeof name, ld->layer, expert, proj, "scale"));
    EPMOE_TRY(epmoe_st_set_require(ld->ckpt, name, EPMOE_DTYPE_F8_E8M0, 2,
                                   (int64_t[]){N, K / EPMOE_MXFP4_BLOCK}, &t));
    const uint8_t *e8m0 = t->data;
    for (size_t i = 0; i < t->nbytes; i++)
        EPMOE_REQUIRE(e8m0[i] != 0xff, EPMOE_ERR_NUMERIC,
                      "%s: %s: block scale [%zu, %zu] is NaN (byte 0xff)", file_of(ld, name),
                      name, i / (size_t)(K / EPMOE_MXFP4_BLOCK),
                      i % (size_t)(K / EPMOE_MXFP4_BLOCK));
    epmoe_status st = epmoe_mxfp4_to_nvfp4(dst->codes, e8m0, (size_t)N, (size_t)K, dst->codes,
                                           dst->sf, dst->scale_2, NULL);
    if (st != EPMOE_OK) return epmoe_add_context(st, "%s: %s", file_of(ld, name), name);
    dst->input_scale = 0.0f;
    return EPMOE_OK;
}

static epmoe_status load_experts(const loader *ld, epmoe_layer_weights *w) {
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

    int mxfp4 = ld->cfg->weight_format == EPMOE_WEIGHTS_MXFP4;
    for (int64_t local = 0; local < n; local++) {
        int64_t expert = w->slice.start + local;
        int64_t row13 = local * 2 * I; /* first w13 row of this expert */
        proj_dst w1 = {w->w13_codes + row13 * (H / 2), w->w13_sf + row13 * (H / 16),
                       &w->w13_scale_2[2 * local], 0.0f};
        proj_dst w3 = {w->w13_codes + (row13 + I) * (H / 2), w->w13_sf + (row13 + I) * (H / 16),
                       &w->w13_scale_2[2 * local + 1], 0.0f};
        proj_dst w2 = {w->w2_codes + local * H * (I / 2), w->w2_sf + local * H * (I / 16),
                       &w->w2_scale_2[local], 0.0f};
        if (mxfp4) {
            EPMOE_TRY(load_proj_mxfp4(ld, expert, "w1", I, H, &w1));
            EPMOE_TRY(load_proj_mxfp4(ld, expert, "w3", I, H, &w3));
            EPMOE_TRY(load_proj_mxfp4(ld, expert, "w2", H, I, &w2));
        } else {
            EPMOE_TRY(load_proj_nvfp4(ld, expert, "w1", I, H, &w1));
            EPMOE_TRY(load_proj_nvfp4(ld, expert, "w3", I, H, &w3));
            EPMOE_TRY(load_proj_nvfp4(ld, expert, "w2", H, I, &w2));
        }
        w->w13_input_scale[local] = fmaxf(w1.input_scale, w3.input_scale);
        w->w2_input_scale[local] = w2.input_scale;
    }
    return EPMOE_OK;
}

static epmoe_status load_all(const loader *ld, epmoe_layer_weights *w) {
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

    out->layer = layer;
    out->hidden_size = cfg->hidden_size;
    out->inter_size = cfg->moe_inter_size;
    out->slice = *slice;
    out->n_local = slice->end - slice->start;
    out->n_experts = cfg->n_routed_experts;
    out->vocab_size = cfg->vocab_size;
    out->shared_inter = epmoe_ckpt_shared_inter(cfg);

    loader ld = {ckpt, cfg, layer};
    epmoe_status st = load_all(&ld, out);
    if (st != EPMOE_OK) {
        epmoe_layer_weights_free(out);
        return epmoe_add_context(st, "loading layer %lld", (long long)layer);
    }
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
    free(w->gate_weight);
    free(w->gate_bias);
    free(w->tid2eid);
    free(w->shared_w13);
    free(w->shared_w2);
    memset(w, 0, sizeof *w);
}
