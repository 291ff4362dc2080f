/* Random but well-formed NVFP4 layer weights for the benchmark programs: any E2M1 code, UE4M3
 * block scales in [2^-3, 2^1] (powers of two when weight_format = mxfp4, as an MXFP4
 * checkpoint's arrive), tensor scales 1/64, input scales 1/256, a random fp32 gate and a
 * bf16-representable shared expert; with expert_bias (gpt-oss) random expert biases. Codes are
 * filled 8 bytes per generator call so that a whole model's slice (GBs) takes seconds. */
#ifndef EPMOE_BENCH_WEIGHTS_H
#define EPMOE_BENCH_WEIGHTS_H

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "common/config.h"
#include "common/formats.h"
#include "common/rng.h"
#include "worker/expert_weights.h"

/* The benchmarks' --act-quant. W4A8 (fp8) is for MXFP4 experts as released: it also makes the
 * weights MXFP4-like (power-of-two block scales, bench_make_weights) and lets the GPU layer
 * run its FP8 tensor-core GEMM. */
static epmoe_status bench_set_act_quant(epmoe_config *cfg, const char *act_quant) {
    EPMOE_TRY(epmoe_config_set(cfg, "act_quant", act_quant));
    if (strcmp(act_quant, "fp8") != 0) return EPMOE_OK;
    EPMOE_TRY(epmoe_config_set(cfg, "weight_format", "mxfp4"));
    return epmoe_config_set(cfg, "fp8_tensor_cores", "1");
}

static void bench_fill_bytes(epmoe_rng *r, uint8_t *p, size_t n, uint8_t lo, uint8_t hi) {
    if (lo == 0 && hi == 255) {
        size_t i = 0;
        for (; i + 8 <= n; i += 8) {
            const uint64_t v = epmoe_rng_next(r);
            memcpy(p + i, &v, 8);
        }
        for (; i < n; i++) p[i] = (uint8_t)epmoe_rng_next(r);
        return;
    }
    for (size_t i = 0; i < n; i++) p[i] = (uint8_t)(lo + epmoe_rng_below(r, (uint64_t)(hi - lo + 1)));
}

/* The weights of experts [expert_start, expert_start + n_local) of cfg's layer 1 (every
 * rank gets the same gate and shared expert). Exits on out-of-memory (a program, not a
 * library). */
static void bench_make_weights(const epmoe_config *cfg, int64_t expert_start, int64_t n_local,
                               epmoe_layer_weights *w) {
    const int64_t H = cfg->hidden_size, I = cfg->moe_inter_size, E = cfg->n_routed_experts;
    const int64_t Is = cfg->n_shared_experts * I, n = n_local;
    epmoe_rng r;
    epmoe_rng_seed(&r, 7 + (uint64_t)expert_start);
    memset(w, 0, sizeof *w);
    w->layer = 1;
    w->hidden_size = H;
    w->inter_size = I;
    w->slice.start = expert_start;
    w->slice.end = expert_start + n;
    w->n_local = n;
    w->n_experts = E;
    w->vocab_size = cfg->vocab_size;
    const size_t n13 = (size_t)(n * 2 * I * H), n2 = (size_t)(n * H * I);
    w->w13_codes = (uint8_t *)malloc(n13 / 2);
    w->w13_sf = (uint8_t *)malloc(n13 / 16);
    w->w2_codes = (uint8_t *)malloc(n2 / 2);
    w->w2_sf = (uint8_t *)malloc(n2 / 16);
    w->w13_scale_2 = (float *)malloc(sizeof(float) * 2 * n);
    w->w2_scale_2 = (float *)malloc(sizeof(float) * n);
    w->w13_input_scale = (float *)malloc(sizeof(float) * n);
    w->w2_input_scale = (float *)malloc(sizeof(float) * n);
    w->gate_weight = (float *)malloc(sizeof(float) * E * H);
    w->gate_bias = (float *)calloc((size_t)E, sizeof(float));
    w->shared_inter = Is;
    w->shared_w13 = Is ? (float *)malloc(sizeof(float) * 2 * Is * H) : NULL;
    w->shared_w2 = Is ? (float *)malloc(sizeof(float) * H * Is) : NULL;
    if (cfg->expert_bias) {
        w->w13_bias = (float *)malloc(sizeof(float) * n * 2 * I);
        w->w2_bias = (float *)malloc(sizeof(float) * n * H);
    }
    if (!w->w13_codes || !w->w13_sf || !w->w2_codes || !w->w2_sf || !w->w13_scale_2 ||
        !w->w2_scale_2 || !w->w13_input_scale || !w->w2_input_scale || !w->gate_weight ||
        !w->gate_bias || (Is && (!w->shared_w13 || !w->shared_w2)) ||
        (cfg->expert_bias && (!w->w13_bias || !w->w2_bias))) {
        fprintf(stderr, "bench weights: out of host memory for %lld experts\n", (long long)n);
        exit(1);
    }
    bench_fill_bytes(&r, w->w13_codes, n13 / 2, 0, 255);
    bench_fill_bytes(&r, w->w2_codes, n2 / 2, 0, 255);
    bench_fill_bytes(&r, w->w13_sf, n13 / 16, 0x20, 0x40);
    bench_fill_bytes(&r, w->w2_sf, n2 / 16, 0x20, 0x40);
    if (cfg->weight_format == EPMOE_WEIGHTS_MXFP4) { /* as MXFP4 loads: power-of-two scales */
        for (size_t i = 0; i < (size_t)(n13 / 16); i++) w->w13_sf[i] &= 0xf8;
        for (size_t i = 0; i < (size_t)(n2 / 16); i++) w->w2_sf[i] &= 0xf8;
    }
    for (int64_t e = 0; e < n; e++) {
        w->w13_scale_2[2 * e] = w->w13_scale_2[2 * e + 1] = 1.0f / 64;
        w->w2_scale_2[e] = 1.0f / 64;
        w->w13_input_scale[e] = w->w2_input_scale[e] = 1.0f / 256;
    }
    if (cfg->expert_bias) {
        for (int64_t i = 0; i < n * 2 * I; i++) w->w13_bias[i] = epmoe_rng_normal(&r) * 0.5f;
        for (int64_t i = 0; i < n * H; i++) w->w2_bias[i] = epmoe_rng_normal(&r) * 0.05f;
    }
    epmoe_rng_seed(&r, 7); /* the router and the shared expert: the same on every rank */
    for (int64_t i = 0; i < E * H; i++) w->gate_weight[i] = epmoe_rng_normal(&r) * 0.02f;
    for (int64_t i = 0; i < 2 * Is * H; i++)
        w->shared_w13[i] = epmoe_bf16_to_float(epmoe_float_to_bf16(epmoe_rng_normal(&r) * 0.02f));
    for (int64_t i = 0; i < H * Is; i++)
        w->shared_w2[i] = epmoe_bf16_to_float(epmoe_float_to_bf16(epmoe_rng_normal(&r) * 0.02f));
}

#endif
