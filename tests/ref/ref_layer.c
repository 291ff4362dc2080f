#include "tests/ref/ref_layer.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/checkpoint.h"
#include "tests/ref/ref_formats.h"

/* gpt-oss ranks (and weighs) the logits themselves. */
static double ref_score(double logit, int64_t scoring) {
    if (scoring == EPMOE_SCORING_TOPK_SOFTMAX) return logit;
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

epmoe_status epmoe_ref_route_w(const epmoe_config *cfg, const epmoe_ref_weights *w,
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
                logit += (double)x[t * H + h] * w->gate[e * H + h];
            s[e] = ref_score(logit, cfg->scoring);
            key[e] = s[e] + (w->bias && !hash ? w->bias[e] : 0.0);
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
        if (cfg->scoring == EPMOE_SCORING_TOPK_SOFTMAX) {
            /* gpt-oss: softmax over the k chosen biased logits (F.linear(x, W, b), topk,
             * softmax of the top values), computed from their definition */
            double sum = 0;
            for (int64_t j = 0; j < k; j++) sum += exp(key[ids[j]] - key[ids[0]]);
            if (weights_out)
                for (int64_t j = 0; j < k; j++)
                    weights_out[t * k + j] = exp(key[ids[j]] - key[ids[0]]) / sum *
                                             cfg->routed_scaling_factor;
            continue;
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

static double ref_swiglu(double g, double u, double L, int64_t variant, double alpha) {
    if (L > 0) {
        if (g > L || u > L || u < -L) epmoe_ref_clamp_hits++;
        if ((variant == EPMOE_SWIGLU_DSV4 || variant == EPMOE_SWIGLU_GPTOSS) && g > L) g = L;
        u = u > L ? L : (u < -L ? -L : u);
    }
    /* gpt-oss: x_glu * sigmoid(alpha x_glu) * (x_linear + 1) */
    if (variant == EPMOE_SWIGLU_GPTOSS) return g * (1.0 / (1.0 + exp(-alpha * g))) * (u + 1.0);
    double silu = g / (1.0 + exp(-g));
    if (L > 0 && variant == EPMOE_SWIGLU_STEP && silu > L) silu = L;
    return silu * u;
}

/* The activation as the implementation feeds it to a GEMM: FP8 codes with their power-of-two
 * block scales, or NVFP4 codes decided on fp32 values (tests/ref/ref_formats.h: the spec's fp32 order, the reference's own rounding), then
 * taken exactly (as doubles) with their scales. */
static void ref_quantize(const epmoe_config *cfg, const float *v, int64_t K, float static_scale,
                         double *out) {
    if (cfg->act_quant == EPMOE_ACT_HIGH) {
        for (int64_t i = 0; i < K; i++) out[i] = v[i];
        return;
    }
    if (cfg->act_quant == EPMOE_ACT_FP8) {
        uint8_t *codes = malloc((size_t)K);
        int *exps = malloc((size_t)(K / 128 + 1) * sizeof(int));
        epmoe_ref_fp8_quantize(v, (size_t)K, codes, exps);
        for (int64_t i = 0; i < K; i++)
            out[i] = epmoe_ref_e4m3_value(codes[i]) * ldexp(1.0, exps[i / 128]);
        free(codes);
        free(exps);
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

epmoe_status epmoe_ref_forward(const epmoe_config *cfg, const epmoe_ref_weights *w,
                               const float *x, const int32_t *token_ids, int64_t T, double *out,
                               int32_t *ids_out, double *weights_out) {
    const int64_t H = cfg->hidden_size, I = cfg->moe_inter_size, k = cfg->top_k;
    EPMOE_REQUIRE(w->E == cfg->n_routed_experts && w->H == H && w->I == I, EPMOE_ERR_INVALID_ARG,
                  "the reference needs every expert of the configured shape");
    int32_t *ids = ids_out ? ids_out : malloc((size_t)(T * k) * sizeof(int32_t));
    double *wts = weights_out ? weights_out : malloc((size_t)(T * k) * sizeof(double));
    EPMOE_TRY(epmoe_ref_route_w(cfg, w, x, token_ids, T, ids, wts));

    double *xq = malloc((size_t)H * sizeof(double)), *h = malloc((size_t)(2 * I) * sizeof(double));
    double *aq = malloc((size_t)I * sizeof(double)), *wrow = malloc((size_t)(H > I ? H : I) * sizeof(double));
    float *a32 = malloc((size_t)I * sizeof(float));
    for (int64_t t = 0; t < T; t++) {
        double *o = out + t * H;
        for (int64_t c = 0; c < H; c++) o[c] = 0;
        for (int64_t j = 0; j < k; j++) {
            int64_t e = ids[t * k + j];
            const epmoe_ref_proj *p1 = &w->proj[3 * e], *p3 = &w->proj[3 * e + 1],
                                 *p2 = &w->proj[3 * e + 2];
            /* w1 and w3 quantize the same input: the larger calibration serves both */
            double in13 = p1->input_scale > p3->input_scale ? p1->input_scale : p3->input_scale;
            ref_quantize(cfg, x + t * H, H, (float)in13, xq);
            for (int64_t n = 0; n < 2 * I; n++) {
                epmoe_ref_proj_row(n < I ? p1 : p3, n < I ? n : n - I, H, wrow);
                double acc = 0;
                for (int64_t c = 0; c < H; c++) acc += xq[c] * wrow[c];
                h[n] = acc + (w->b13 ? w->b13[e * 2 * I + n] : 0.0);
            }
            for (int64_t n = 0; n < I; n++) {
                double a = ref_swiglu(h[n], h[I + n], cfg->swiglu_limit, cfg->swiglu_variant,
                                      cfg->swiglu_alpha);
                a32[n] = (float)a;
            }
            ref_quantize(cfg, a32, I, (float)p2->input_scale, aq);
            for (int64_t n = 0; n < H; n++) {
                epmoe_ref_proj_row(p2, n, I, wrow);
                double acc = 0;
                for (int64_t c = 0; c < I; c++) acc += aq[c] * wrow[c];
                o[n] += wts[t * k + j] * (acc + (w->b2 ? w->b2[e * H + n] : 0.0));
            }
        }
        /* shared expert, dense, same clamp */
        /* the config decides: a routed-only run (n_shared_experts = 0) of weights that carry a
         * shared expert must not add it */
        const int64_t Is = cfg->n_shared_experts > 0 ? w->Is : 0;
        if (Is > 0) {
            double *hs = malloc((size_t)(2 * Is) * sizeof(double));
            for (int64_t n = 0; n < 2 * Is; n++) {
                double acc = 0;
                for (int64_t c = 0; c < H; c++) acc += (double)x[t * H + c] * w->shared_w13[n * H + c];
                hs[n] = acc;
            }
            for (int64_t n = 0; n < Is; n++)
                hs[n] = ref_swiglu(hs[n], hs[Is + n], cfg->swiglu_limit, cfg->swiglu_variant,
                                   cfg->swiglu_alpha);
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

epmoe_status epmoe_ref_layer_forward(const epmoe_config *cfg, const epmoe_layer_weights *w,
                                     const float *x, const int32_t *token_ids, int64_t T,
                                     double *out, int32_t *ids_out, double *weights_out) {
    epmoe_ref_weights view;
    EPMOE_TRY(epmoe_ref_weights_from_layer(cfg, w, &view));
    epmoe_status st = epmoe_ref_forward(cfg, &view, x, token_ids, T, out, ids_out, weights_out);
    epmoe_ref_weights_free(&view);
    return st;
}

epmoe_status epmoe_ref_route(const epmoe_config *cfg, const epmoe_layer_weights *w,
                             const float *x, const int32_t *token_ids, int64_t T,
                             int32_t *ids_out, double *weights_out) {
    epmoe_ref_weights view;
    EPMOE_TRY(epmoe_ref_weights_from_layer(cfg, w, &view));
    epmoe_status st = epmoe_ref_route_w(cfg, &view, x, token_ids, T, ids_out, weights_out);
    epmoe_ref_weights_free(&view);
    return st;
}

/* ---- the loaded expert weights against the checkpoint's bytes -------------------------------- */

int64_t epmoe_ref_check_loaded_experts(const epmoe_st_set *ckpt, const epmoe_config *cfg,
                                       const epmoe_layer_weights *w, char *first, size_t cap) {
    const int64_t H = cfg->hidden_size, I = cfg->moe_inter_size;
    const char *projs[3] = {"w1", "w3", "w2"};
    double *want = malloc((size_t)(H > I ? H : I) * sizeof(double));
    double *loaded = malloc((size_t)(H > I ? H : I) * sizeof(double));
    int64_t bad = 0;
    first[0] = '\0';
    for (int64_t le = 0; le < w->n_local && bad >= 0; le++) {
        const int64_t e = w->slice.start + le;
        for (int p = 0; p < 3 && bad >= 0; p++) {
            epmoe_ref_proj ck;
            if (epmoe_ref_proj_read(ckpt, cfg, w->layer, e, projs[p], &ck) != EPMOE_OK) {
                snprintf(first, cap, "layer %lld expert %lld %s: a tensor is missing (%s)",
                         (long long)w->layer, (long long)e, projs[p], epmoe_last_error());
                bad = -1;
                break;
            }
            /* where the engine keeps it: w13 rows [0, I) w1, [I, 2I) w3; w2 its own */
            const int64_t N = p == 2 ? H : I, K = p == 2 ? I : H;
            const epmoe_ref_proj lp = {
                .codes = p == 2 ? w->w2_codes + le * H * (I / 2)
                                : w->w13_codes + (le * 2 * I + (p == 1 ? I : 0)) * (H / 2),
                .scales = p == 2 ? w->w2_sf + le * H * (I / 16)
                                 : w->w13_sf + (le * 2 * I + (p == 1 ? I : 0)) * (H / 16),
                .scale_2 = p == 2 ? w->w2_scale_2[le] : w->w13_scale_2[2 * le + p]};
            for (int64_t n = 0; n < N; n++) {
                epmoe_ref_proj_row(&ck, n, K, want);
                epmoe_ref_proj_row(&lp, n, K, loaded);
                for (int64_t k = 0; k < K; k++)
                    if (loaded[k] != want[k] && bad++ == 0)
                        snprintf(first, cap, "layer %lld expert %lld %s [%lld, %lld]: loaded %.9g, "
                                 "checkpoint %.9g", (long long)w->layer, (long long)e, projs[p],
                                 (long long)n, (long long)k, loaded[k], want[k]);
            }
        }
        if (cfg->expert_bias && bad >= 0) { /* the biases, gate then up, then down */
            double *b = malloc((size_t)(2 * I + H) * sizeof(double));
            if (!w->w13_bias || !w->w2_bias ||
                epmoe_ref_expert_bias_read(ckpt, cfg, w->layer, e, b, b + 2 * I) != EPMOE_OK) {
                snprintf(first, cap, "layer %lld expert %lld: biases missing (%s)",
                         (long long)w->layer, (long long)e, epmoe_last_error());
                bad = -1;
            }
            for (int64_t i = 0; bad >= 0 && i < 2 * I + H; i++) {
                double got = i < 2 * I ? w->w13_bias[le * 2 * I + i] : w->w2_bias[le * H + i - 2 * I];
                if (got != b[i] && bad++ == 0)
                    snprintf(first, cap, "layer %lld expert %lld bias %lld (%s): loaded %.9g, "
                             "checkpoint %.9g", (long long)w->layer, (long long)e, (long long)i,
                             i < I ? "gate" : i < 2 * I ? "up" : "down", got, b[i]);
            }
            free(b);
        }
    }
    free(want);
    free(loaded);
    return bad;
}
