/* The CPU expert MLP of worker/experts.h. Each expert's weights are dequantized (unscaled
 * e2m1*sf, exact) into column panels once per call, then its rows go through in chunks so the
 * scratch stays bounded whatever the routing skew. */
#include "worker/experts.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common/formats.h"
#include "common/fp8.h"
#include "common/nvfp4.h"
#include "kernels/ops.h"

#define ROWS_PER_CHUNK 64

struct epmoe_expert_scratch {
    int64_t H, I, shared_I;
    float *w13_panels;  /* [2I x H] logical, packed */
    float *w2_panels;   /* [H x I] */
    float *x_q;         /* [chunk, max(H, I)] dequantized activations */
    float *h;           /* [chunk, 2*max(I, shared_I)] */
    float *a;           /* [chunk, max(I, shared_I)] */
    float *row_inv_gs;  /* [chunk] 1/global_sf per row */
    uint8_t *codes;     /* [max(H, I)] (NVFP4 packs two a byte, FP8 one) */
    uint8_t *block_sf;  /* [max(H, I)/16] */
    size_t bytes;
};

static int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

epmoe_status epmoe_expert_scratch_create(int64_t H, int64_t I, int64_t shared_inter,
                                         epmoe_expert_scratch **out) {
    epmoe_expert_scratch *s = calloc(1, sizeof *s);
    EPMOE_REQUIRE(s != NULL, EPMOE_ERR_OOM, "expert scratch: out of memory");
    s->H = H;
    s->I = I;
    s->shared_I = shared_inter;
    const int64_t wide = max64(H, I), inter = max64(I, shared_inter);
    size_t sizes[] = {
        epmoe_cpu_panels_floats(2 * I, H) * sizeof(float),
        epmoe_cpu_panels_floats(H, I) * sizeof(float),
        (size_t)ROWS_PER_CHUNK * (size_t)wide * sizeof(float),
        (size_t)ROWS_PER_CHUNK * 2 * (size_t)inter * sizeof(float),
        (size_t)ROWS_PER_CHUNK * (size_t)inter * sizeof(float),
        ROWS_PER_CHUNK * sizeof(float),
        (size_t)wide,
        (size_t)wide / 16,
    };
    void **slots[] = {(void **)&s->w13_panels, (void **)&s->w2_panels, (void **)&s->x_q,
                      (void **)&s->h,          (void **)&s->a,         (void **)&s->row_inv_gs,
                      (void **)&s->codes,      (void **)&s->block_sf};
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
        *slots[i] = malloc(sizes[i] ? sizes[i] : 1);
        s->bytes += sizes[i];
        if (!*slots[i]) {
            epmoe_expert_scratch_free(s);
            EPMOE_FAIL(EPMOE_ERR_OOM, "expert scratch: cannot allocate %zu bytes", sizes[i]);
        }
    }
    *out = s;
    return EPMOE_OK;
}

void epmoe_expert_scratch_free(epmoe_expert_scratch *s) {
    if (!s) return;
    free(s->w13_panels);
    free(s->w2_panels);
    free(s->x_q);
    free(s->h);
    free(s->a);
    free(s->row_inv_gs);
    free(s->codes);
    free(s->block_sf);
    free(s);
}

size_t epmoe_expert_scratch_bytes(const epmoe_expert_scratch *s) { return s->bytes; }

/* Tiles of 16 panel columns by one scale block of k: a tile is one contiguous piece of its
 * panel (EPMOE_NVFP4_BLOCK x 16 floats), so the transposing writes stay in L1, and each block's
 * scale is decoded once rather than once per element. The values are those of
 * epmoe_nvfp4_dequantize_row with scale 1: e2m1 * sf, exact in fp32. */
void epmoe_cpu_dequant_panels(const uint8_t *codes, const uint8_t *block_sf, int64_t N,
                              int64_t K, float *panels) {
    enum { C = EPMOE_PANEL_COLS, B = EPMOE_NVFP4_BLOCK };
    float e2m1[16];
    for (int c = 0; c < 16; c++) e2m1[c] = epmoe_e2m1_to_float((uint8_t)c);
    for (int64_t n0 = 0; n0 < N; n0 += C) {
        float *panel = panels + (size_t)(n0 / C) * (size_t)K * C;
        int64_t ncols = N - n0 < C ? N - n0 : C;
        for (int64_t k0 = 0; k0 < K; k0 += B) {
            float *tile = panel + (size_t)k0 * C;
            for (int64_t j = 0; j < C; j++) {
                if (j >= ncols) {
                    for (int i = 0; i < B; i++) tile[i * C + j] = 0.0f;
                    continue;
                }
                const uint8_t *q = codes + (size_t)(n0 + j) * (size_t)(K / 2) + (size_t)(k0 / 2);
                float sf = epmoe_e4m3_to_float(block_sf[(size_t)(n0 + j) * (size_t)(K / B) +
                                                        (size_t)(k0 / B)]);
                for (int i = 0; i < B; i += 2) { /* even k in the low nibble */
                    tile[i * C + j] = e2m1[q[i / 2] & 0xf] * sf;
                    tile[(i + 1) * C + j] = e2m1[q[i / 2] >> 4] * sf;
                }
            }
        }
    }
}

/* Activation rows [rows, K] -> x_q (unscaled e2m1*sf) and row_inv_gs (1/global_sf); in W4A8
 * mode the exact e4m3 * 2^e values with factor 1 (the block scales are powers of two, so they
 * ride inside the values without a rounding); a copy with factor 1 in W4A16 mode. Returns
 * saturated element count. */
static size_t quantize_rows(const epmoe_config *cfg, const float *x, int64_t rows, int64_t K,
                            float static_input_scale, epmoe_expert_scratch *s) {
    size_t saturated = 0;
    for (int64_t r = 0; r < rows; r++) {
        const float *row = x + (size_t)r * (size_t)K;
        float *dst = s->x_q + (size_t)r * (size_t)K;
        if (cfg->act_quant == EPMOE_ACT_HIGH) {
            memcpy(dst, row, (size_t)K * sizeof(float));
            s->row_inv_gs[r] = 1.0f;
            continue;
        }
        if (cfg->act_quant == EPMOE_ACT_FP8) {
            epmoe_fp8_quantize_row(row, (size_t)K, s->codes, s->block_sf);
            epmoe_fp8_dequantize_row(s->codes, s->block_sf, (size_t)K, dst);
            s->row_inv_gs[r] = 1.0f;
            continue;
        }
        float global_sf = cfg->act_scale == EPMOE_ACT_SCALE_STATIC
                              ? 1.0f / static_input_scale
                              : epmoe_nvfp4_global_sf(epmoe_amax(row, (size_t)K));
        saturated += epmoe_nvfp4_quantize_row(row, (size_t)K, global_sf, s->codes, s->block_sf);
        epmoe_nvfp4_dequantize_row(s->codes, s->block_sf, (size_t)K, 1.0f, dst);
        s->row_inv_gs[r] = 1.0f / global_sf;
    }
    return saturated;
}

epmoe_status epmoe_cpu_experts_forward(const epmoe_config *cfg, const epmoe_layer_weights *w,
                                       const float *x_padded, const int64_t *tokens_per_expert,
                                       const int64_t *padded_offsets, float *y_padded,
                                       epmoe_expert_scratch *s, epmoe_expert_stats *stats) {
    const int64_t H = w->hidden_size, I = w->inter_size;
    EPMOE_REQUIRE(s->H == H && s->I == I, EPMOE_ERR_INVALID_ARG,
                  "expert scratch sized for H=%lld I=%lld, layer has H=%lld I=%lld",
                  (long long)s->H, (long long)s->I, (long long)H, (long long)I);
    const float limit = (float)cfg->swiglu_limit, swiglu_alpha = (float)cfg->swiglu_alpha;
    for (int64_t e = 0; e < w->n_local; e++) {
        int64_t rows = tokens_per_expert[e];
        if (rows == 0) continue;
        EPMOE_REQUIRE(padded_offsets[e] + rows <= padded_offsets[e + 1], EPMOE_ERR_INTERNAL,
                      "expert %lld: %lld rows overflow its padded block [%lld, %lld)",
                      (long long)(w->slice.start + e), (long long)rows,
                      (long long)padded_offsets[e], (long long)padded_offsets[e + 1]);
        const float *w13_panels = s->w13_panels, *w2_panels = s->w2_panels;
        if (w->w13_panels_cache) {
            w13_panels = w->w13_panels_cache + (size_t)e * epmoe_cpu_panels_floats(2 * I, H);
            w2_panels = w->w2_panels_cache + (size_t)e * epmoe_cpu_panels_floats(H, I);
        } else {
            epmoe_cpu_dequant_panels(w->w13_codes + (size_t)e * (size_t)(2 * I) * (size_t)(H / 2),
                                     w->w13_sf + (size_t)e * (size_t)(2 * I) * (size_t)(H / 16),
                                     2 * I, H, s->w13_panels);
            epmoe_cpu_dequant_panels(w->w2_codes + (size_t)e * (size_t)H * (size_t)(I / 2),
                                     w->w2_sf + (size_t)e * (size_t)H * (size_t)(I / 16), H, I,
                                     s->w2_panels);
        }
        const float gate_scale_2 = w->w13_scale_2[2 * e], up_scale_2 = w->w13_scale_2[2 * e + 1];
        const float down_scale_2 = w->w2_scale_2[e];
        const float *b13 = w->w13_bias ? w->w13_bias + (size_t)e * (size_t)(2 * I) : NULL;
        const float *b2 = w->w2_bias ? w->w2_bias + (size_t)e * (size_t)H : NULL;

        for (int64_t r0 = 0; r0 < rows; r0 += ROWS_PER_CHUNK) {
            int64_t n = rows - r0 < ROWS_PER_CHUNK ? rows - r0 : ROWS_PER_CHUNK;
            const float *x = x_padded + (size_t)(padded_offsets[e] + r0) * (size_t)H;
            float *y = y_padded + (size_t)(padded_offsets[e] + r0) * (size_t)H;

            size_t sat = quantize_rows(cfg, x, n, H, w->w13_input_scale[e], s);
            epmoe_cpu_gemm_panels(s->x_q, n, H, w13_panels, 2 * I, s->h);
            for (int64_t r = 0; r < n; r++) {
                float *h = s->h + (size_t)r * (size_t)(2 * I);
                float gate_alpha = s->row_inv_gs[r] * gate_scale_2;
                float up_alpha = s->row_inv_gs[r] * up_scale_2;
                for (int64_t j = 0; j < I; j++) h[j] *= gate_alpha;
                for (int64_t j = I; j < 2 * I; j++) h[j] *= up_alpha;
                /* the bias after the scaled product, one fp32 addition per element: a row's
                 * bits stay a function of the row alone */
                if (b13)
                    for (int64_t j = 0; j < 2 * I; j++) h[j] += b13[j];
            }
            epmoe_cpu_swiglu(s->h, n, I, limit, (int)cfg->swiglu_variant, swiglu_alpha, s->a);

            sat += quantize_rows(cfg, s->a, n, I, w->w2_input_scale[e], s);
            epmoe_cpu_gemm_panels(s->x_q, n, I, w2_panels, H, y);
            for (int64_t r = 0; r < n; r++) {
                float alpha = s->row_inv_gs[r] * down_scale_2;
                float *yr = y + (size_t)r * (size_t)H;
                for (int64_t j = 0; j < H; j++) yr[j] *= alpha;
                if (b2)
                    for (int64_t j = 0; j < H; j++) yr[j] += b2[j];
            }
            if (stats) {
                stats->rows_computed += n;
                stats->saturated_elements += (int64_t)sat;
            }
        }
    }
    return EPMOE_OK;
}

epmoe_status epmoe_cpu_shared_forward(const epmoe_config *cfg, const epmoe_layer_weights *w,
                                      const float *x, int64_t T, float *y,
                                      epmoe_expert_scratch *s) {
    const int64_t H = w->hidden_size, Is = w->shared_inter;
    if (Is == 0) {
        memset(y, 0, (size_t)T * (size_t)H * sizeof(float));
        return EPMOE_OK;
    }
    EPMOE_REQUIRE(w->shared_w13_panels != NULL && w->shared_w2_panels != NULL,
                  EPMOE_ERR_INTERNAL, "layer %lld: shared expert panels not prepared",
                  (long long)w->layer);
    EPMOE_REQUIRE(s->H == H && Is <= s->shared_I, EPMOE_ERR_INVALID_ARG,
                  "expert scratch sized for H=%lld shared I=%lld, layer has H=%lld shared I=%lld",
                  (long long)s->H, (long long)s->shared_I, (long long)H, (long long)Is);
    for (int64_t r0 = 0; r0 < T; r0 += ROWS_PER_CHUNK) {
        int64_t n = T - r0 < ROWS_PER_CHUNK ? T - r0 : ROWS_PER_CHUNK;
        epmoe_cpu_gemm_panels(x + (size_t)r0 * (size_t)H, n, H, w->shared_w13_panels, 2 * Is,
                              s->h);
        epmoe_cpu_swiglu(s->h, n, Is, (float)cfg->swiglu_limit, (int)cfg->swiglu_variant,
                         (float)cfg->swiglu_alpha, s->a);
        epmoe_cpu_gemm_panels(s->a, n, Is, w->shared_w2_panels, H, y + (size_t)r0 * (size_t)H);
    }
    return EPMOE_OK;
}


static epmoe_status pack_new(const float *B, int64_t N, int64_t K, const char *what,
                             int64_t layer, float **out) {
    EPMOE_REQUIRE(B != NULL, EPMOE_ERR_INVALID_ARG, "layer %lld: %s not loaded", (long long)layer,
                  what);
    *out = malloc(epmoe_cpu_panels_floats(N, K) * sizeof(float));
    EPMOE_REQUIRE(*out != NULL, EPMOE_ERR_OOM, "layer %lld: cannot allocate %s (%lld x %lld)",
                  (long long)layer, what, (long long)N, (long long)K);
    epmoe_cpu_pack_panels(B, N, K, *out);
    return EPMOE_OK;
}

epmoe_status epmoe_layer_weights_prepare_cpu(epmoe_layer_weights *w) {
    const int64_t H = w->hidden_size, Is = w->shared_inter;
    if (!w->gate_panels)
        EPMOE_TRY(pack_new(w->gate_weight, w->n_experts, H, "gate panels", w->layer,
                           &w->gate_panels));
    if (Is > 0 && !w->shared_w13_panels)
        EPMOE_TRY(pack_new(w->shared_w13, 2 * Is, H, "shared w13 panels", w->layer,
                           &w->shared_w13_panels));
    if (Is > 0 && !w->shared_w2_panels)
        EPMOE_TRY(pack_new(w->shared_w2, H, Is, "shared w2 panels", w->layer,
                           &w->shared_w2_panels));
    return EPMOE_OK;
}

int64_t epmoe_layer_weights_cache_bytes(const epmoe_layer_weights *w) {
    const int64_t H = w->hidden_size, I = w->inter_size;
    return w->n_local *
           (int64_t)(epmoe_cpu_panels_floats(2 * I, H) + epmoe_cpu_panels_floats(H, I)) *
           (int64_t)sizeof(float);
}

epmoe_status epmoe_layer_weights_cache_experts_cpu(epmoe_layer_weights *w) {
    if (w->w13_panels_cache) return EPMOE_OK;
    const int64_t H = w->hidden_size, I = w->inter_size;
    const size_t per13 = epmoe_cpu_panels_floats(2 * I, H), per2 = epmoe_cpu_panels_floats(H, I);
    w->w13_panels_cache = malloc((size_t)w->n_local * per13 * sizeof(float));
    w->w2_panels_cache = malloc((size_t)w->n_local * per2 * sizeof(float));
    if (!w->w13_panels_cache || !w->w2_panels_cache) {
        free(w->w13_panels_cache);
        free(w->w2_panels_cache);
        w->w13_panels_cache = w->w2_panels_cache = NULL;
        EPMOE_FAIL(EPMOE_ERR_OOM, "layer %lld: cannot allocate %.1f MiB of expert panels",
                   (long long)w->layer, (double)epmoe_layer_weights_cache_bytes(w) / (1 << 20));
    }
    for (int64_t e = 0; e < w->n_local; e++) {
        epmoe_cpu_dequant_panels(w->w13_codes + (size_t)e * (size_t)(2 * I) * (size_t)(H / 2),
                                 w->w13_sf + (size_t)e * (size_t)(2 * I) * (size_t)(H / 16),
                                 2 * I, H, w->w13_panels_cache + (size_t)e * per13);
        epmoe_cpu_dequant_panels(w->w2_codes + (size_t)e * (size_t)H * (size_t)(I / 2),
                                 w->w2_sf + (size_t)e * (size_t)H * (size_t)(I / 16), H, I,
                                 w->w2_panels_cache + (size_t)e * per2);
    }
    return EPMOE_OK;
}

void epmoe_layer_weights_release_cpu(epmoe_layer_weights *w) {
    if (!w) return;
    free(w->w13_panels_cache);
    free(w->w2_panels_cache);
    w->w13_panels_cache = w->w2_panels_cache = NULL;
    free(w->gate_panels);
    free(w->shared_w13_panels);
    free(w->shared_w2_panels);
    w->gate_panels = w->shared_w13_panels = w->shared_w2_panels = NULL;
}
