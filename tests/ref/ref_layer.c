#include "tests/ref/ref_layer.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/checkpoint.h"
#include "tests/ref/ref_formats.h"

static double ref_score(double logit, int64_t scoring) {
    if (scoring == EPMOE_SCORING_SIGMOID) return 1.0 / (1.0 + exp(-logit));
    double softplus = logit > 30 ? logit : log1p(exp(logit));
    return sqrt(softplus);
}

/* Indices of the n largest keys (ties to the lower index), by repeated selection. */
static void ref_topn(const double *key, const int *allowed, int64_t count, int64_t n, int32_t *out) {
    char *taken = calloc((size_t)count, 1);
    for (int64_t j = 0; j < n; j++) {
        int64_t best = -1;
        for (int64_t e = 0; e < count; e++) {
            if (taken[e] || (allowed && !allowed[e])) continue;
            if (best < 0 || key[e] > key[best]) best = e;
        }
        out[j] = (int32_t)best;
        taken[best] = 1;
    }
    free(taken);
}

epmoe_status epmoe_ref_route(const epmoe_config *cfg, const epmoe_layer_weights *w,
                             const float *x, const int32_t *token_ids, int64_t T,
                             int32_t *ids_out, double *weights_out) {
    const int64_t H = cfg->hidden_size, E = cfg->n_routed_experts, k = cfg->top_k;
    const int hash = w->layer < cfg->n_hash_layers;
    double *s = malloc((size_t)E * sizeof(double)), *key = malloc((size_t)E * sizeof(double));
    int *allowed = malloc((size_t)E * sizeof(int));
    for (int64_t t = 0; t < T; t++) {
        for (int64_t e = 0; e < E; e++) {
            double logit = 0;
            for (int64_t h = 0; h < H; h++)
                logit += (double)x[t * H + h] * (double)w->gate_weight[e * H + h];
            s[e] = ref_score(logit, cfg->scoring);
            key[e] = s[e] + (w->gate_bias && !hash ? (double)w->gate_bias[e] : 0.0);
            allowed[e] = 1;
        }
        int32_t *ids = ids_out + t * k;
        if (hash) {
            for (int64_t j = 0; j < k; j++) ids[j] = w->tid2eid[(int64_t)token_ids[t] * k + j];
        } else {
            if (cfg->n_groups > 1) {
                int64_t G = cfg->n_groups, per = E / G;
                double *gscore = malloc((size_t)G * sizeof(double));
                for (int64_t g = 0; g < G; g++) {
                    int32_t top2[2];
                    ref_topn(key + g * per, NULL, per, 2, top2);
                    gscore[g] = key[g * per + top2[0]] + key[g * per + top2[1]];
                }
                int32_t *kept = malloc((size_t)cfg->topk_groups * sizeof(int32_t));
                ref_topn(gscore, NULL, G, cfg->topk_groups, kept);
                for (int64_t e = 0; e < E; e++) allowed[e] = 0;
                for (int64_t j = 0; j < cfg->topk_groups; j++)
                    for (int64_t e = kept[j] * per; e < (kept[j] + 1) * per; e++) allowed[e] = 1;
                free(kept);
                free(gscore);
            }
            ref_topn(key, allowed, E, k, ids);
        }
        double sum = 0;
        for (int64_t j = 0; j < k; j++) sum += s[ids[j]];
        if (weights_out)
            for (int64_t j = 0; j < k; j++)
                weights_out[t * k + j] = s[ids[j]] / sum * cfg->routed_scaling_factor;
    }
    free(s);
    free(key);
    free(allowed);
    return EPMOE_OK;
}

int64_t epmoe_ref_clamp_hits = 0;

static double ref_swiglu(double g, double u, double L, int64_t variant) {
    if (L > 0) {
        if (g > L || u > L || u < -L) epmoe_ref_clamp_hits++;
        if (variant == EPMOE_SWIGLU_DSV4 && g > L) g = L;
        u = u > L ? L : (u < -L ? -L : u);
    }
    double silu = g / (1.0 + exp(-g));
    if (L > 0 && variant == EPMOE_SWIGLU_STEP && silu > L) silu = L;
    return silu * u;
}

/* The activation as the implementation feeds it to a GEMM: NVFP4 codes decided on fp32
 * values (tests/ref/ref_formats.h: the spec's fp32 order, the reference's own rounding), then
 * taken exactly (as doubles) with their scales. */
static void ref_quantize(const epmoe_config *cfg, const float *v, int64_t K, float static_scale,
                         double *out) {
    if (cfg->act_quant == EPMOE_ACT_HIGH) {
        for (int64_t i = 0; i < K; i++) out[i] = v[i];
        return;
    }
    float gs = cfg->act_scale == EPMOE_ACT_SCALE_STATIC
                   ? 1.0f / static_scale
                   : epmoe_ref_nvfp4_global_sf(epmoe_ref_amax(v, (size_t)K));
    uint8_t *codes = malloc((size_t)K), *sf = malloc((size_t)K / 16);
    epmoe_ref_nvfp4_quantize(v, (size_t)K, gs, codes, sf);
    for (int64_t i = 0; i < K; i++)
        out[i] = epmoe_ref_e2m1_value(codes[i]) * epmoe_ref_e4m3_value(sf[i / 16]) / (double)gs;
    free(codes);
    free(sf);
}

/* Weight row n of an [N, K] NVFP4 matrix in doubles, with its tensor scale, decoded by the
 * reference's own E2M1 and E4M3. */
static void ref_weight_row(const uint8_t *codes, const uint8_t *sf, int64_t n, int64_t K,
                           double scale_2, double *out) {
    static double e2m1[16], e4m3[256]; /* the decodings, tabulated once (millions of calls) */
    static int tabulated = 0;
    if (!tabulated) {
        for (int c = 0; c < 16; c++) e2m1[c] = epmoe_ref_e2m1_value((uint8_t)c);
        for (int c = 0; c < 256; c++) e4m3[c] = epmoe_ref_e4m3_value((uint8_t)c);
        tabulated = 1;
    }
    const uint8_t *row = codes + n * (K / 2), *row_sf = sf + n * (K / 16);
    for (int64_t i = 0; i < K; i++)
        out[i] = e2m1[epmoe_ref_nibble(row, (size_t)i)] * e4m3[row_sf[i / 16]] * scale_2;
}

epmoe_status epmoe_ref_layer_forward(const epmoe_config *cfg, const epmoe_layer_weights *w,
                                     const float *x, const int32_t *token_ids, int64_t T,
                                     double *out, int32_t *ids_out, double *weights_out) {
    const int64_t H = cfg->hidden_size, I = cfg->moe_inter_size, k = cfg->top_k;
    EPMOE_REQUIRE(w->slice.start == 0 && w->slice.end == cfg->n_routed_experts,
                  EPMOE_ERR_INVALID_ARG, "the reference needs every expert");
    int32_t *ids = ids_out ? ids_out : malloc((size_t)(T * k) * sizeof(int32_t));
    double *wts = weights_out ? weights_out : malloc((size_t)(T * k) * sizeof(double));
    EPMOE_TRY(epmoe_ref_route(cfg, w, x, token_ids, T, ids, wts));

    double *xq = malloc((size_t)H * sizeof(double)), *h = malloc((size_t)(2 * I) * sizeof(double));
    double *aq = malloc((size_t)I * sizeof(double)), *wrow = malloc((size_t)(H > I ? H : I) * sizeof(double));
    float *a32 = malloc((size_t)I * sizeof(float));
    for (int64_t t = 0; t < T; t++) {
        double *o = out + t * H;
        for (int64_t c = 0; c < H; c++) o[c] = 0;
        for (int64_t j = 0; j < k; j++) {
            int64_t e = ids[t * k + j];
            ref_quantize(cfg, x + t * H, H, w->w13_input_scale[e], xq);
            const uint8_t *c13 = w->w13_codes + e * 2 * I * (H / 2), *s13 = w->w13_sf + e * 2 * I * (H / 16);
            for (int64_t n = 0; n < 2 * I; n++) {
                ref_weight_row(c13, s13, n, H, w->w13_scale_2[2 * e + (n < I ? 0 : 1)], wrow);
                double acc = 0;
                for (int64_t c = 0; c < H; c++) acc += xq[c] * wrow[c];
                h[n] = acc;
            }
            for (int64_t n = 0; n < I; n++) {
                double a = ref_swiglu(h[n], h[I + n], cfg->swiglu_limit, cfg->swiglu_variant);
                a32[n] = (float)a;
            }
            ref_quantize(cfg, a32, I, w->w2_input_scale[e], aq);
            const uint8_t *c2 = w->w2_codes + e * H * (I / 2), *s2 = w->w2_sf + e * H * (I / 16);
            for (int64_t n = 0; n < H; n++) {
                ref_weight_row(c2, s2, n, I, w->w2_scale_2[e], wrow);
                double acc = 0;
                for (int64_t c = 0; c < I; c++) acc += aq[c] * wrow[c];
                o[n] += wts[t * k + j] * acc;
            }
        }
        /* shared expert, dense, same clamp */
        /* the config decides: a routed-only run (n_shared_experts = 0) of weights that carry a
         * shared expert must not add it */
        const int64_t Is = cfg->n_shared_experts > 0 ? w->shared_inter : 0;
        if (Is > 0) {
            double *hs = malloc((size_t)(2 * Is) * sizeof(double));
            for (int64_t n = 0; n < 2 * Is; n++) {
                double acc = 0;
                for (int64_t c = 0; c < H; c++) acc += (double)x[t * H + c] * w->shared_w13[n * H + c];
                hs[n] = acc;
            }
            for (int64_t n = 0; n < Is; n++)
                hs[n] = ref_swiglu(hs[n], hs[Is + n], cfg->swiglu_limit, cfg->swiglu_variant);
            for (int64_t n = 0; n < H; n++) {
                double acc = 0;
                for (int64_t c = 0; c < Is; c++) acc += hs[c] * w->shared_w2[n * Is + c];
                o[n] += acc;
            }
            free(hs);
        }
    }
    free(xq);
    free(h);
    free(aq);
    free(wrow);
    free(a32);
    if (!ids_out) free(ids);
    if (!weights_out) free(wts);
    return EPMOE_OK;
}

/* ---- the loaded expert weights against the checkpoint's bytes -------------------------------- */

/* Value k of row n of a checkpoint projection, decoded from its own tensors. */
static double ckpt_value(const epmoe_config *cfg, const epmoe_st_tensor *weight,
                         const epmoe_st_tensor *scale, float scale_2, int64_t n, int64_t k,
                         int64_t K) {
    const uint8_t *codes = (const uint8_t *)weight->data + n * (K / 2);
    double e2m1 = epmoe_ref_e2m1_value(epmoe_ref_nibble(codes, (size_t)k));
    const uint8_t *s = scale->data;
    if (cfg->weight_format == EPMOE_WEIGHTS_MXFP4)
        return e2m1 * epmoe_ref_ue8m0_value(s[n * (K / 32) + k / 32]);
    return e2m1 * epmoe_ref_e4m3_value(s[n * (K / 16) + k / 16]) * (double)scale_2;
}

int64_t epmoe_ref_check_loaded_experts(const epmoe_st_set *ckpt, const epmoe_config *cfg,
                                       const epmoe_layer_weights *w, char *first, size_t cap) {
    const int mx = cfg->weight_format == EPMOE_WEIGHTS_MXFP4;
    const int64_t H = cfg->hidden_size, I = cfg->moe_inter_size;
    const char *projs[3] = {"w1", "w3", "w2"};
    int64_t bad = 0;
    first[0] = '\0';
    for (int64_t le = 0; le < w->n_local; le++) {
        const int64_t e = w->slice.start + le;
        for (int p = 0; p < 3; p++) {
            char wname[160], sname[160], s2name[160];
            epmoe_ckpt_expert_name(wname, sizeof wname, w->layer, e, projs[p], "weight");
            epmoe_ckpt_expert_name(sname, sizeof sname, w->layer, e, projs[p],
                                   mx ? "scale" : "weight_scale");
            epmoe_ckpt_expert_name(s2name, sizeof s2name, w->layer, e, projs[p], "weight_scale_2");
            const epmoe_st_tensor *wt = epmoe_st_set_find(ckpt, wname, NULL);
            const epmoe_st_tensor *st = epmoe_st_set_find(ckpt, sname, NULL);
            const epmoe_st_tensor *s2 = mx ? NULL : epmoe_st_set_find(ckpt, s2name, NULL);
            if (!wt || !st || (!mx && !s2)) {
                snprintf(first, cap, "layer %lld expert %lld %s: a tensor is missing",
                         (long long)w->layer, (long long)e, projs[p]);
                return -1;
            }
            const float scale_2 = mx ? 1.0f : *(const float *)s2->data;
            /* where the engine keeps it: w13 rows [0, I) w1, [I, 2I) w3; w2 its own */
            const int64_t N = p == 2 ? H : I, K = p == 2 ? I : H;
            const uint8_t *codes = p == 2 ? w->w2_codes + le * H * (I / 2)
                                          : w->w13_codes + (le * 2 * I + (p == 1 ? I : 0)) * (H / 2);
            const uint8_t *sf = p == 2 ? w->w2_sf + le * H * (I / 16)
                                       : w->w13_sf + (le * 2 * I + (p == 1 ? I : 0)) * (H / 16);
            const double loaded_scale_2 = p == 2 ? w->w2_scale_2[le] : w->w13_scale_2[2 * le + p];
            for (int64_t n = 0; n < N; n++) {
                for (int64_t k = 0; k < K; k++) {
                    double loaded = epmoe_ref_e2m1_value(epmoe_ref_nibble(codes + n * (K / 2), (size_t)k)) *
                                    epmoe_ref_e4m3_value(sf[n * (K / 16) + k / 16]) * loaded_scale_2;
                    double want = ckpt_value(cfg, wt, st, scale_2, n, k, K);
                    if (loaded != want && bad++ == 0)
                        snprintf(first, cap, "layer %lld expert %lld %s [%lld, %lld]: loaded %.9g, "
                                 "checkpoint %.9g", (long long)w->layer, (long long)e, projs[p],
                                 (long long)n, (long long)k, loaded, want);
                }
            }
        }
    }
    return bad;
}
