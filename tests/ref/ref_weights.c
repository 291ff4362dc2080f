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
    const uint8_t *codes = p->codes + n * (K / 2);
    for (int64_t k = 0; k < K; k++) {
        double v = e2m1_table[epmoe_ref_nibble(codes, (size_t)k)];
        if (p->mxfp4)
            out[k] = v * ue8m0_table[p->scales[n * (K / 32) + k / 32]];
        else
            out[k] = v * e4m3_table[p->scales[n * (K / 16) + k / 16]] * p->scale_2;
    }
}

void epmoe_ref_weights_free(epmoe_ref_weights *w) {
    free(w->gate);
    free(w->bias);
    free(w->tid2eid);
    free(w->shared_w13);
    free(w->shared_w2);
    free(w->proj);
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

epmoe_status epmoe_ref_proj_read(const epmoe_st_set *s, const epmoe_config *cfg, int64_t layer,
                                 int64_t e, const char *proj, epmoe_ref_proj *out) {
    char name[160];
    memset(out, 0, sizeof *out);
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
    for (int64_t e = 0; e < w->E; e++)
        for (int p = 0; p < 3; p++)
            EPMOE_TRY(epmoe_ref_proj_read(s, cfg, layer, e, projs[p], &w->proj[3 * e + p]));
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
    for (int64_t e = 0; e < E; e++) {
        int64_t row13 = e * 2 * I;
        out->proj[3 * e + 0] = (epmoe_ref_proj){0, lw->w13_codes + row13 * (H / 2),
                                                lw->w13_sf + row13 * (H / 16),
                                                lw->w13_scale_2[2 * e], lw->w13_input_scale[e]};
        out->proj[3 * e + 1] = (epmoe_ref_proj){0, lw->w13_codes + (row13 + I) * (H / 2),
                                                lw->w13_sf + (row13 + I) * (H / 16),
                                                lw->w13_scale_2[2 * e + 1], lw->w13_input_scale[e]};
        out->proj[3 * e + 2] = (epmoe_ref_proj){0, lw->w2_codes + e * H * (I / 2),
                                                lw->w2_sf + e * H * (I / 16), lw->w2_scale_2[e],
                                                lw->w2_input_scale[e]};
    }
    return EPMOE_OK;
}
