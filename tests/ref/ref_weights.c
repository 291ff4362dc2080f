#include "tests/ref/ref_weights.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/checkpoint.h"
#include "tests/ref/ref_formats.h"

/* The reference's own decodings (tests/ref/ref_formats.h), tabulated once: millions of rows. */
static double e2m1_table[16], e4m3_table[256], ue8m0_table[256];
static int tabulated = 0;

static void tabulate(void) {
    if (tabulated) return;
    for (int c = 0; c < 16; c++) e2m1_table[c] = epmoe_ref_e2m1_value((uint8_t)c);
    for (int c = 0; c < 256; c++) {
        e4m3_table[c] = epmoe_ref_e4m3_value((uint8_t)c);
        ue8m0_table[c] = epmoe_ref_ue8m0_value((uint8_t)c);
    }
    tabulated = 1;
}

void epmoe_ref_proj_row(const epmoe_ref_proj *p, int64_t n, int64_t K, double *out) {
    tabulate();
    const int64_t row = n * (p->row_stride > 1 ? p->row_stride : 1);
    const uint8_t *codes = p->codes + row * (K / 2);
    for (int64_t k = 0; k < K; k++) {
        double v = e2m1_table[epmoe_ref_nibble(codes, (size_t)k)];
        if (p->mxfp4)
            out[k] = v * ue8m0_table[p->scales[row * (K / 32) + k / 32]];
        else
            out[k] = v * e4m3_table[p->scales[row * (K / 16) + k / 16]] * p->scale_2;
    }
}

void epmoe_ref_weights_free(epmoe_ref_weights *w) {
    free(w->gate);
    free(w->bias);
    free(w->tid2eid);
    free(w->shared_w13);
    free(w->shared_w2);
    free(w->proj);
    free(w->b13);
    free(w->b2);
    memset(w, 0, sizeof *w);
}

static epmoe_status alloc_view(epmoe_ref_weights *w, const epmoe_config *cfg, int64_t layer,
                               int64_t shared_inter) {
    memset(w, 0, sizeof *w);
    w->layer = layer;
    w->H = cfg->hidden_size;
    w->I = cfg->moe_inter_size;
    w->E = cfg->n_routed_experts;
    w->Is = shared_inter;
    w->vocab = cfg->vocab_size;
    w->top_k = cfg->top_k;
    w->gate = malloc((size_t)(w->E * w->H) * sizeof(double));
    w->proj = calloc((size_t)(3 * w->E), sizeof *w->proj);
    w->shared_w13 = malloc((size_t)(2 * w->Is * w->H + 1) * sizeof(double));
    w->shared_w2 = malloc((size_t)(w->H * w->Is + 1) * sizeof(double));
    EPMOE_REQUIRE(w->gate && w->proj && w->shared_w13 && w->shared_w2, EPMOE_ERR_OOM,
                  "reference weights of layer %lld", (long long)layer);
    if (cfg->expert_bias) {
        w->b13 = malloc((size_t)(w->E * 2 * w->I) * sizeof(double));
        w->b2 = malloc((size_t)(w->E * w->H) * sizeof(double));
        EPMOE_REQUIRE(w->b13 && w->b2, EPMOE_ERR_OOM, "reference biases of layer %lld",
                      (long long)layer);
    }
    return EPMOE_OK;
}

/* ---- from a checkpoint ---- */

static float scalar(const epmoe_st_tensor *t) {
    float v;
    memcpy(&v, t->data, 4);
    return v;
}

/* Dense values of any float dtype the layouts use, or FP8 with its block scales. */
static epmoe_status read_dense(const epmoe_st_set *s, const epmoe_config *cfg, const char *name,
                               const char *scale_name, int64_t N, int64_t K, double *out) {
    const epmoe_st_tensor *t = NULL;
    EPMOE_TRY(epmoe_st_set_lookup(s, name, &t, NULL));
    EPMOE_REQUIRE(t && t->nbytes / (t->dtype == EPMOE_DTYPE_COUNT ? 1 : epmoe_dtype_size(t->dtype)) ==
                           (size_t)(N * K),
                  EPMOE_ERR_FORMAT, "reference: %s missing or not %lld elements", name,
                  (long long)(N * K));
    const unsigned char *p = t->data;
    if (t->dtype == EPMOE_DTYPE_F8_E4M3) {
        const epmoe_st_tensor *st = NULL;
        EPMOE_TRY(epmoe_st_set_lookup(s, scale_name, &st, NULL));
        EPMOE_REQUIRE(st != NULL, EPMOE_ERR_FORMAT, "reference: %s missing", scale_name);
        int64_t b = cfg->fp8_block_size, SK = (K + b - 1) / b;
        for (int64_t n = 0; n < N; n++)
            for (int64_t k = 0; k < K; k++) {
                int64_t at = (n / b) * SK + k / b;
                double scale;
                if (st->dtype == EPMOE_DTYPE_F32) {
                    float f;
                    memcpy(&f, (const unsigned char *)st->data + 4 * at, 4);
                    scale = f;
                } else {
                    scale = epmoe_ref_ue8m0_value(((const uint8_t *)st->data)[at]);
                }
                out[n * K + k] = epmoe_ref_e4m3_value(p[n * K + k]) * scale;
            }
        return EPMOE_OK;
    }
    for (int64_t i = 0; i < N * K; i++) {
        if (t->dtype == EPMOE_DTYPE_F32) {
            float f;
            memcpy(&f, p + 4 * i, 4);
            out[i] = f;
        } else if (t->dtype == EPMOE_DTYPE_BF16) {
            uint16_t b;
            memcpy(&b, p + 2 * i, 2);
            out[i] = epmoe_ref_bf16_value(b);
        } else {
            EPMOE_FAIL(EPMOE_ERR_FORMAT, "reference: %s has dtype %s", name, t->dtype_text);
        }
    }
    return EPMOE_OK;
}

/* gpt-oss: the 2I rows of gate_up_proj hold gate row n at 2n and up row n at 2n + 1 as released
 * (swiglu: x_glu, x_linear = x[..., ::2], x[..., 1::2]); with gate_up_order halves (not a
 * released layout) gate rows [0, I), up rows [I, 2I). First row and stride of one half. */
static void fused_half(const epmoe_config *cfg, int up, int64_t *first, int64_t *stride) {
    const int interleaved = cfg->gate_up_order == EPMOE_GATE_UP_INTERLEAVED;
    *first = interleaved ? up : up * cfg->moe_inter_size;
    *stride = interleaved ? 2 : 1;
}

static epmoe_status stacked_tensor(const epmoe_st_set *s, const epmoe_config *cfg, int64_t layer,
                                   const char *which, const char *what,
                                   const epmoe_st_tensor **t) {
    char name[160];
    EPMOE_TRY(epmoe_ckpt_stacked_expert_name(name, sizeof name, cfg, layer, which, what));
    EPMOE_TRY(epmoe_st_set_lookup(s, name, t, NULL));
    EPMOE_REQUIRE(*t != NULL, EPMOE_ERR_FORMAT, "reference: %s missing", name);
    return EPMOE_OK;
}

static epmoe_status gptoss_proj_read(const epmoe_st_set *s, const epmoe_config *cfg,
                                     int64_t layer, int64_t e, const char *proj,
                                     epmoe_ref_proj *out) {
    const int64_t H = cfg->hidden_size, I = cfg->moe_inter_size;
    const int down = strcmp(proj, "w2") == 0;
    const char *which = down ? "down_proj" : "gate_up_proj";
    const int64_t rows = down ? H : 2 * I, K = down ? I : H;
    const epmoe_st_tensor *blocks = NULL, *scales = NULL;
    EPMOE_TRY(stacked_tensor(s, cfg, layer, which, "blocks", &blocks));
    EPMOE_TRY(stacked_tensor(s, cfg, layer, which, "scales", &scales));
    int64_t first = 0, stride = 1;
    if (!down) fused_half(cfg, strcmp(proj, "w3") == 0, &first, &stride);
    const int64_t row0 = e * rows + first;
    out->mxfp4 = 1;
    out->codes = (const uint8_t *)blocks->data + row0 * (K / 2);
    out->scales = (const uint8_t *)scales->data + row0 * (K / 32);
    out->row_stride = stride;
    return EPMOE_OK;
}

static double dense_element(const epmoe_st_tensor *t, int64_t i) {
    if (t->dtype == EPMOE_DTYPE_F32) {
        float f;
        memcpy(&f, (const unsigned char *)t->data + 4 * i, 4);
        return f;
    }
    uint16_t b;
    memcpy(&b, (const unsigned char *)t->data + 2 * i, 2);
    return t->dtype == EPMOE_DTYPE_BF16 ? epmoe_ref_bf16_value(b) : NAN;
}

epmoe_status epmoe_ref_expert_bias_read(const epmoe_st_set *s, const epmoe_config *cfg,
                                        int64_t layer, int64_t e, double *b13, double *b2) {
    const int64_t H = cfg->hidden_size, I = cfg->moe_inter_size;
    if (cfg->checkpoint_layout == EPMOE_LAYOUT_GPT_OSS) {
        const epmoe_st_tensor *fused = NULL, *down = NULL;
        EPMOE_TRY(stacked_tensor(s, cfg, layer, "gate_up_proj", "bias", &fused));
        EPMOE_TRY(stacked_tensor(s, cfg, layer, "down_proj", "bias", &down));
        for (int up = 0; up < 2; up++) {
            int64_t first, stride;
            fused_half(cfg, up, &first, &stride);
            for (int64_t n = 0; n < I; n++)
                b13[up * I + n] = dense_element(fused, e * 2 * I + first + n * stride);
        }
        for (int64_t n = 0; n < H; n++) b2[n] = dense_element(down, e * H + n);
        return EPMOE_OK;
    }
    char name[160];
    EPMOE_TRY(epmoe_ckpt_expert_name(name, sizeof name, cfg, layer, e, "w1", "bias"));
    EPMOE_TRY(read_dense(s, cfg, name, "", 1, I, b13));
    EPMOE_TRY(epmoe_ckpt_expert_name(name, sizeof name, cfg, layer, e, "w3", "bias"));
    EPMOE_TRY(read_dense(s, cfg, name, "", 1, I, b13 + I));
    EPMOE_TRY(epmoe_ckpt_expert_name(name, sizeof name, cfg, layer, e, "w2", "bias"));
    return read_dense(s, cfg, name, "", 1, H, b2);
}

epmoe_status epmoe_ref_proj_read(const epmoe_st_set *s, const epmoe_config *cfg, int64_t layer,
                                 int64_t e, const char *proj, epmoe_ref_proj *out) {
    char name[160];
    memset(out, 0, sizeof *out);
    if (cfg->checkpoint_layout == EPMOE_LAYOUT_GPT_OSS)
        return gptoss_proj_read(s, cfg, layer, e, proj, out);
    const epmoe_st_tensor *t = NULL;
    EPMOE_TRY(epmoe_ckpt_expert_name(name, sizeof name, cfg, layer, e, proj, "weight"));
    EPMOE_TRY(epmoe_st_set_lookup(s, name, &t, NULL));
    EPMOE_REQUIRE(t != NULL, EPMOE_ERR_FORMAT, "reference: %s missing", name);
    out->codes = t->data;
    EPMOE_TRY(epmoe_ckpt_expert_name(name, sizeof name, cfg, layer, e, proj, "scale"));
    EPMOE_TRY(epmoe_st_set_lookup(s, name, &t, NULL));
    if (t) { /* MXFP4 */
        out->mxfp4 = 1;
        out->scales = t->data;
        return EPMOE_OK;
    }
    EPMOE_TRY(epmoe_ckpt_expert_name(name, sizeof name, cfg, layer, e, proj, "weight_scale"));
    EPMOE_TRY(epmoe_st_set_lookup(s, name, &t, NULL));
    EPMOE_REQUIRE(t != NULL, EPMOE_ERR_FORMAT, "reference: %s missing", name);
    out->scales = t->data;
    EPMOE_TRY(epmoe_ckpt_expert_name(name, sizeof name, cfg, layer, e, proj, "weight_scale_2"));
    EPMOE_TRY(epmoe_st_set_lookup(s, name, &t, NULL));
    EPMOE_REQUIRE(t != NULL, EPMOE_ERR_FORMAT, "reference: %s missing", name);
    out->scale_2 = scalar(t);
    EPMOE_TRY(epmoe_ckpt_expert_name(name, sizeof name, cfg, layer, e, proj, "input_scale"));
    EPMOE_TRY(epmoe_st_set_lookup(s, name, &t, NULL));
    out->input_scale = t ? scalar(t) : 0.0;
    return EPMOE_OK;
}

static epmoe_status read_all(const epmoe_st_set *s, const epmoe_config *cfg, int64_t layer,
                             epmoe_ref_weights *w) {
    char name[160], scale[160];
    EPMOE_TRY(epmoe_ckpt_gate_name(name, sizeof name, cfg, layer, "weight"));
    EPMOE_TRY(read_dense(s, cfg, name, "", w->E, w->H, w->gate));
    if (epmoe_ckpt_layer_is_hash(cfg, layer)) {
        const epmoe_st_tensor *t = NULL;
        EPMOE_TRY(epmoe_ckpt_gate_name(name, sizeof name, cfg, layer, "tid2eid"));
        EPMOE_TRY(epmoe_st_set_lookup(s, name, &t, NULL));
        EPMOE_REQUIRE(t != NULL, EPMOE_ERR_FORMAT, "reference: %s missing", name);
        w->tid2eid = malloc((size_t)(w->vocab * w->top_k) * sizeof(int32_t));
        EPMOE_REQUIRE(w->tid2eid != NULL, EPMOE_ERR_OOM, "reference tid2eid");
        for (int64_t i = 0; i < w->vocab * w->top_k; i++) {
            int64_t v = 0;
            if (t->dtype == EPMOE_DTYPE_I64) memcpy(&v, (const char *)t->data + 8 * i, 8);
            else {
                int32_t v32;
                memcpy(&v32, (const char *)t->data + 4 * i, 4);
                v = v32;
            }
            w->tid2eid[i] = (int32_t)v;
        }
    } else {
        EPMOE_TRY(epmoe_ckpt_gate_name(name, sizeof name, cfg, layer, "bias"));
        w->bias = malloc((size_t)w->E * sizeof(double));
        EPMOE_REQUIRE(w->bias != NULL, EPMOE_ERR_OOM, "reference bias");
        EPMOE_TRY(read_dense(s, cfg, name, "", 1, w->E, w->bias));
    }
    const char *projs[3] = {"w1", "w3", "w2"};
    double *dst[3] = {w->shared_w13, w->shared_w13 + w->Is * w->H, w->shared_w2};
    for (int p = 0; w->Is > 0 && p < 3; p++) {
        EPMOE_TRY(epmoe_ckpt_shared_name(name, sizeof name, cfg, layer, projs[p], "weight"));
        EPMOE_TRY(epmoe_ckpt_shared_name(scale, sizeof scale, cfg, layer, projs[p], "scale"));
        EPMOE_TRY(read_dense(s, cfg, name, scale, p == 2 ? w->H : w->Is, p == 2 ? w->Is : w->H,
                             dst[p]));
    }
    for (int64_t e = 0; e < w->E; e++) {
        for (int p = 0; p < 3; p++)
            EPMOE_TRY(epmoe_ref_proj_read(s, cfg, layer, e, projs[p], &w->proj[3 * e + p]));
        if (w->b13)
            EPMOE_TRY(epmoe_ref_expert_bias_read(s, cfg, layer, e, w->b13 + e * 2 * w->I,
                                                 w->b2 + e * w->H));
    }
    return EPMOE_OK;
}

epmoe_status epmoe_ref_weights_read(const epmoe_st_set *ckpt, const epmoe_config *cfg,
                                    int64_t layer, epmoe_ref_weights *out) {
    epmoe_status st = alloc_view(out, cfg, layer, epmoe_ckpt_shared_inter(cfg));
    if (st == EPMOE_OK) st = read_all(ckpt, cfg, layer, out);
    if (st != EPMOE_OK) epmoe_ref_weights_free(out);
    return st;
}

/* ---- from loaded weights (NVFP4 after the loader) ---- */

epmoe_status epmoe_ref_weights_from_layer(const epmoe_config *cfg, const epmoe_layer_weights *lw,
                                          epmoe_ref_weights *out) {
    EPMOE_REQUIRE(lw->slice.start == 0 && lw->slice.end == lw->n_experts, EPMOE_ERR_INVALID_ARG,
                  "the reference needs every expert");
    EPMOE_TRY(alloc_view(out, cfg, lw->layer, lw->shared_inter));
    const int64_t H = lw->hidden_size, I = lw->inter_size, E = lw->n_experts, Is = lw->shared_inter;
    for (int64_t i = 0; i < E * H; i++) out->gate[i] = lw->gate_weight[i];
    if (lw->gate_bias) {
        out->bias = malloc((size_t)E * sizeof(double));
        EPMOE_REQUIRE(out->bias != NULL, EPMOE_ERR_OOM, "reference bias");
        for (int64_t e = 0; e < E; e++) out->bias[e] = lw->gate_bias[e];
    }
    if (lw->tid2eid) {
        size_t n = (size_t)(lw->vocab_size * cfg->top_k);
        out->tid2eid = malloc(n * sizeof(int32_t));
        EPMOE_REQUIRE(out->tid2eid != NULL, EPMOE_ERR_OOM, "reference tid2eid");
        memcpy(out->tid2eid, lw->tid2eid, n * sizeof(int32_t));
    }
    for (int64_t i = 0; i < 2 * Is * H; i++) out->shared_w13[i] = lw->shared_w13[i];
    for (int64_t i = 0; i < H * Is; i++) out->shared_w2[i] = lw->shared_w2[i];
    if (out->b13 && lw->w13_bias && lw->w2_bias) {
        for (int64_t i = 0; i < E * 2 * I; i++) out->b13[i] = lw->w13_bias[i];
        for (int64_t i = 0; i < E * H; i++) out->b2[i] = lw->w2_bias[i];
    }
    EPMOE_REQUIRE(!out->b13 || (lw->w13_bias && lw->w2_bias), EPMOE_ERR_INVALID_ARG,
                  "expert_bias = 1 but layer %lld has no expert biases", (long long)lw->layer);
    for (int64_t e = 0; e < E; e++) {
        int64_t row13 = e * 2 * I;
        out->proj[3 * e + 0] = (epmoe_ref_proj){0, lw->w13_codes + row13 * (H / 2),
                                                lw->w13_sf + row13 * (H / 16),
                                                lw->w13_scale_2[2 * e], lw->w13_input_scale[e], 1};
        out->proj[3 * e + 1] = (epmoe_ref_proj){0, lw->w13_codes + (row13 + I) * (H / 2),
                                                lw->w13_sf + (row13 + I) * (H / 16),
                                                lw->w13_scale_2[2 * e + 1], lw->w13_input_scale[e],
                                                1};
        out->proj[3 * e + 2] = (epmoe_ref_proj){0, lw->w2_codes + e * H * (I / 2),
                                                lw->w2_sf + e * H * (I / 16), lw->w2_scale_2[e],
                                                lw->w2_input_scale[e], 1};
    }
    return EPMOE_OK;
}
