#include "common/config.h"

#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

static const char *const scoring_names[] = {"sqrtsoftplus", "sigmoid", "topk_softmax", NULL};
static const char *const swiglu_names[] = {"dsv4", "step", "gptoss", NULL};
static const char *const gate_up_order_names[] = {"halves", "interleaved", NULL};
static const char *const weight_format_names[] = {"nvfp4", "mxfp4", NULL};
static const char *const layout_names[] = {"epmoe", "deepseek", "nvidia-nvfp4", "gpt-oss", NULL};
static const char *const act_quant_names[] = {"nvfp4", "high", "fp8", NULL};
static const char *const act_scale_names[] = {"per_row", "static", NULL};
static const char *const backend_names[] = {"auto", "cpu", "cuda", NULL};

#define OFF(field) offsetof(epmoe_config, field)
#define M EPMOE_CFG_MODEL
#define R EPMOE_CFG_RUNTIME

/* The one declaration of every setting. Defaults are the "tiny" preset. */
static const epmoe_cfg_entry table[] = {
    {"preset", EPMOE_CFG_STRING, M, OFF(preset), 0, sizeof(((epmoe_config *)0)->preset) - 1,
     "tiny", NULL,
     "model preset the other model settings started from"},
    {"hidden_size", EPMOE_CFG_INT, M, OFF(hidden_size), 32, 65536, "256", NULL,
     "model width H (multiple of 32)"},
    {"moe_inter_size", EPMOE_CFG_INT, M, OFF(moe_inter_size), 32, 65536, "128", NULL,
     "routed expert intermediate size I (multiple of 32)"},
    {"n_routed_experts", EPMOE_CFG_INT, M, OFF(n_routed_experts), 1, 4096, "256", NULL,
     "routed experts per layer E"},
    {"top_k", EPMOE_CFG_INT, M, OFF(top_k), 1, 32, "6", NULL, "experts per token"},
    {"n_shared_experts", EPMOE_CFG_INT, M, OFF(n_shared_experts), 0, 8, "1", NULL,
     "shared experts (their intermediate size is n * moe_inter_size)"},
    {"routed_scaling_factor", EPMOE_CFG_DOUBLE, M, OFF(routed_scaling_factor), 0.0, 1000.0,
     "1.5", NULL, "multiplies the renormalized routing weights"},
    {"scoring", EPMOE_CFG_ENUM, M, OFF(scoring), 0, 0, "sqrtsoftplus", scoring_names,
     "sqrtsoftplus (DeepSeek-V4) or sigmoid (DeepSeek-V3): ids by score + bias, weights from the "
     "scores; topk_softmax (gpt-oss): ids = top k of logit + bias, weights = softmax over those k"},
    {"n_groups", EPMOE_CFG_INT, M, OFF(n_groups), 1, 64, "1", NULL,
     "expert groups for group-limited routing (1 = off)"},
    {"topk_groups", EPMOE_CFG_INT, M, OFF(topk_groups), 1, 64, "1", NULL,
     "groups kept per token when n_groups > 1"},
    {"swiglu_limit", EPMOE_CFG_DOUBLE, M, OFF(swiglu_limit), 0.0, 1e6, "10.0", NULL,
     "SwiGLU clamp L (0 = no clamp)"},
    {"swiglu_variant", EPMOE_CFG_ENUM, M, OFF(swiglu_variant), 0, 0, "dsv4", swiglu_names,
     "dsv4: silu(min(g,L))*clamp(u,-L,L); step: min(silu(g),L)*clamp(u,-L,L); gptoss: "
     "g'=min(g,L), (clamp(u,-L,L)+1)*g'*sigmoid(alpha*g')"},
    {"swiglu_alpha", EPMOE_CFG_DOUBLE, M, OFF(swiglu_alpha), 0.0, 100.0, "1.702", NULL,
     "swiglu_variant gptoss: the gain alpha in g*sigmoid(alpha*g)"},
    {"expert_bias", EPMOE_CFG_INT, M, OFF(expert_bias), 0, 1, "0", NULL,
     "1: every routed expert adds a bias after its gate/up and its down projection (gpt-oss)"},
    {"gate_up_order", EPMOE_CFG_ENUM, M, OFF(gate_up_order), 0, 0, "halves", gate_up_order_names,
     "row order of a fused gate/up expert tensor (gpt-oss layout): interleaved (row 2i gate, 2i+1 "
     "up, as gpt-oss is released) or halves (gate rows, then up rows)"},
    {"n_layers", EPMOE_CFG_INT, M, OFF(n_layers), 1, 1024, "4", NULL, "MoE layers"},
    {"n_hash_layers", EPMOE_CFG_INT, M, OFF(n_hash_layers), 0, 1024, "1", NULL,
     "the first n layers route by tid2eid[token_id]"},
    {"vocab_size", EPMOE_CFG_INT, M, OFF(vocab_size), 1, 1 << 24, "1024", NULL,
     "token id range of the hash-routing table"},
    {"weight_format", EPMOE_CFG_ENUM, M, OFF(weight_format), 0, 0, "nvfp4", weight_format_names,
     "expert weight format in the checkpoint"},
    {"checkpoint_layout", EPMOE_CFG_ENUM, M, OFF(checkpoint_layout), 0, 0, "epmoe", layout_names,
     "tensor names and dtypes: epmoe (epmoe-gen's files), deepseek (DeepSeek's release: MXFP4 "
     "experts), nvidia-nvfp4 (NVIDIA's NVFP4 re-quantization) or gpt-oss (OpenAI's release: "
     "stacked MXFP4 experts with biases); docs/checkpoints.md"},
    {"n_mtp_layers", EPMOE_CFG_INT, M, OFF(n_mtp_layers), 0, 16, "0", NULL,
     "the last n layers are the multi-token-prediction block's MoE (tensors mtp.N.ffn.*)"},
    {"fp8_block_size", EPMOE_CFG_INT, M, OFF(fp8_block_size), 1, 4096, "128", NULL,
     "FP8 weights (the real layouts' shared expert) have one scale per b x b block"},
    {"expert_pad_rows", EPMOE_CFG_INT, R, OFF(expert_pad_rows), 1, 1024, "128", NULL,
     "each expert's block in the padded layout starts at a multiple of this many rows"},
    {"act_quant", EPMOE_CFG_ENUM, R, OFF(act_quant), 0, 0, "nvfp4", act_quant_names,
     "nvfp4 (W4A4), high (W4A16: activations stay fp32/bf16) or fp8 (W4A8: E4M3, a power-of-two scale per 128)"},
    {"act_scale", EPMOE_CFG_ENUM, R, OFF(act_scale), 0, 0, "per_row", act_scale_names,
     "nvfp4 activations' tensor scale: per_row amax, or the checkpoint's static input_scale"},
    {"fp8_tensor_cores", EPMOE_CFG_INT, R, OFF(fp8_tensor_cores), 0, 1, "0", NULL,
     "act_quant=fp8 on MXFP4 experts, cuda: 1 runs prefill on FP8 tensor cores (experimental: "
     "timed, its check against float64 not yet run on a GPU), 0 the exact bf16 path"},
    {"max_tokens_per_rank", EPMOE_CFG_INT, R, OFF(max_tokens_per_rank), 1, 1 << 20, "4096", NULL,
     "tokens one rank holds at most per forward; sizes the worst-case buffers"},
    {"seed", EPMOE_CFG_INT, R, OFF(seed), 0, 1e15, "1234", NULL,
     "seed for synthetic weights and inputs"},
    {"cpu_weight_cache_mib", EPMOE_CFG_INT, R, OFF(cpu_weight_cache_mib), 0, 1 << 20, "1024", NULL,
     "CPU path: keep every local expert dequantized if all layers fit in this many MiB per rank "
     "(0 = dequantize per forward)"},
    {"backend", EPMOE_CFG_ENUM, R, OFF(backend), 0, 0, "auto", backend_names,
     "where the layers run: cpu (MPI ranks), cuda (one rank per GPU), or auto (cuda when this "
     "build has CUDA and every rank sees a GPU, else cpu)"},
    {"decode_tokens", EPMOE_CFG_INT, R, OFF(decode_tokens), 0, 4096, "64", NULL,
     "cuda backend: forwards whose largest per-rank shard is at most this many tokens replay a "
     "captured CUDA graph with a fixed capacity of this many tokens per peer (0 = never)"},
    {"collective_timeout_s", EPMOE_CFG_DOUBLE, R, OFF(collective_timeout_s), 0.0, 86400.0, "300",
     NULL,
     "every transport (mpi, nccl, mpi-staged): a collective not finished after this many seconds "
     "(a peer died or hung) is abandoned with an error naming the step and, where the transport "
     "can tell, the silent peers; the job cannot continue after it (0 = wait forever)"},
};

#undef M
#undef R

typedef struct {
    const char *name;
    const char *overrides; /* "name=value;name=value" */
    const char *help;
} preset_row;

static const preset_row presets[] = {
    {"tiny", "", "256 experts on a laptop-sized model (slicing, skew and padding exercised)"},
    {"dsv4-flash",
     "hidden_size=4096;moe_inter_size=2048;n_routed_experts=256;top_k=6;n_shared_experts=1;"
     "routed_scaling_factor=1.5;scoring=sqrtsoftplus;n_groups=1;topk_groups=1;swiglu_limit=10;"
     "swiglu_variant=dsv4;n_layers=43;n_hash_layers=3;vocab_size=129280",
     "DeepSeek-V4-Flash"},
    {"dsv4-pro",
     "hidden_size=7168;moe_inter_size=3072;n_routed_experts=384;top_k=6;n_shared_experts=1;"
     "routed_scaling_factor=2.5;scoring=sqrtsoftplus;n_groups=1;topk_groups=1;swiglu_limit=10;"
     "swiglu_variant=dsv4;n_layers=61;n_hash_layers=3;vocab_size=129280",
     "DeepSeek-V4-Pro"},
    {"dsv3",
     "hidden_size=7168;moe_inter_size=2048;n_routed_experts=256;top_k=8;n_shared_experts=1;"
     "routed_scaling_factor=2.5;scoring=sigmoid;n_groups=8;topk_groups=4;swiglu_limit=0;"
     "n_layers=58;n_hash_layers=0;vocab_size=129280",
     "DeepSeek-V3 (the 58 MoE layers)"},
    /* gpt-oss (docs/checkpoints.md, "gpt-oss"): every layer is MoE, no shared expert, routing
     * and activation of their own, experts with biases, released in MXFP4. */
    {"gpt-oss-20b",
     "hidden_size=2880;moe_inter_size=2880;n_routed_experts=32;top_k=4;n_shared_experts=0;"
     "routed_scaling_factor=1;scoring=topk_softmax;n_groups=1;topk_groups=1;swiglu_limit=7;"
     "swiglu_variant=gptoss;swiglu_alpha=1.702;expert_bias=1;gate_up_order=interleaved;"
     "n_layers=24;n_hash_layers=0;vocab_size=201088;weight_format=mxfp4",
     "OpenAI gpt-oss-20b"},
    {"gpt-oss-120b",
     "hidden_size=2880;moe_inter_size=2880;n_routed_experts=128;top_k=4;n_shared_experts=0;"
     "routed_scaling_factor=1;scoring=topk_softmax;n_groups=1;topk_groups=1;swiglu_limit=7;"
     "swiglu_variant=gptoss;swiglu_alpha=1.702;expert_bias=1;gate_up_order=interleaved;"
     "n_layers=36;n_hash_layers=0;vocab_size=201088;weight_format=mxfp4",
     "OpenAI gpt-oss-120b"},
    /* gpt-oss's math at test size: H 160 and I 96 are multiples of 32 but not of 64 (2880 is
     * 90 x 32 = 45 x 64, not a multiple of 128), so the odd-width paths run on every test. */
    {"gpt-oss-tiny",
     "hidden_size=160;moe_inter_size=96;n_routed_experts=32;top_k=4;n_shared_experts=0;"
     "routed_scaling_factor=1;scoring=topk_softmax;n_groups=1;topk_groups=1;swiglu_limit=7;"
     "swiglu_variant=gptoss;swiglu_alpha=1.702;expert_bias=1;gate_up_order=interleaved;"
     "n_layers=3;n_hash_layers=0;vocab_size=1024;weight_format=mxfp4",
     "gpt-oss's math at test size (H 160, I 96, 32 experts, top-4, 3 layers)"},
};

const epmoe_cfg_entry *epmoe_config_table(int *count) {
    *count = (int)(sizeof table / sizeof table[0]);
    return table;
}

#define TABLE_N ((int)(sizeof table / sizeof table[0]))

static const epmoe_cfg_entry *find_in(const epmoe_cfg_entry *t, int n, const char *name) {
    for (int i = 0; i < n; i++)
        if (strcmp(t[i].name, name) == 0) return &t[i];
    return NULL;
}

static const epmoe_cfg_entry *find_entry(const char *name) { return find_in(table, TABLE_N, name); }

static epmoe_status set_entry(void *base, const epmoe_cfg_entry *e, const char *value) {
    char *field = (char *)base + e->offset;
    switch (e->type) {
    case EPMOE_CFG_STRING: {
        size_t n = strlen(value);
        EPMOE_REQUIRE((double)n <= e->max, EPMOE_ERR_INVALID_ARG,
                      "setting %s: value '%s' longer than %.0f characters", e->name, value,
                      e->max);
        memcpy(field, value, n + 1);
        return EPMOE_OK;
    }
    case EPMOE_CFG_INT: {
        char *end = NULL;
        errno = 0;
        long long v = strtoll(value, &end, 10);
        /* the whole text and nothing else: no leading blanks (strtoll skips them), no trailing
         * characters ("12x", "5 ") */
        EPMOE_REQUIRE(errno == 0 && end != value && *end == '\0' && !isspace((unsigned char)value[0]),
                      EPMOE_ERR_INVALID_ARG,
                      "setting %s: '%s' is not an integer", e->name, value);
        EPMOE_REQUIRE((double)v >= e->min && (double)v <= e->max, EPMOE_ERR_INVALID_ARG,
                      "setting %s: %lld outside [%.0f, %.0f]", e->name, v, e->min, e->max);
        *(int64_t *)field = v;
        return EPMOE_OK;
    }
    case EPMOE_CFG_DOUBLE: {
        char *end = NULL;
        errno = 0;
        double v = strtod(value, &end);
        EPMOE_REQUIRE(errno == 0 && end != value && *end == '\0' && isfinite(v) &&
                          !isspace((unsigned char)value[0]),
                      EPMOE_ERR_INVALID_ARG, "setting %s: '%s' is not a finite number", e->name,
                      value);
        EPMOE_REQUIRE(v >= e->min && v <= e->max, EPMOE_ERR_INVALID_ARG,
                      "setting %s: %g outside [%g, %g]", e->name, v, e->min, e->max);
        *(double *)field = v;
        return EPMOE_OK;
    }
    case EPMOE_CFG_ENUM: {
        for (int i = 0; e->enum_names[i]; i++) {
            if (strcmp(e->enum_names[i], value) == 0) {
                *(int64_t *)field = i;
                return EPMOE_OK;
            }
        }
        char choices[256] = "";
        for (int i = 0; e->enum_names[i]; i++) {
            strncat(choices, i ? "|" : "", sizeof choices - strlen(choices) - 1);
            strncat(choices, e->enum_names[i], sizeof choices - strlen(choices) - 1);
        }
        EPMOE_FAIL(EPMOE_ERR_INVALID_ARG, "setting %s: '%s' is not one of %s", e->name, value,
                   choices);
    }
    }
    EPMOE_FAIL(EPMOE_ERR_INTERNAL, "setting %s has an unknown type", e->name);
}

epmoe_status epmoe_config_set(epmoe_config *cfg, const char *name, const char *value) {
    return epmoe_cfg_table_set(cfg, table, TABLE_N, name, value);
}

epmoe_status epmoe_cfg_entry_format(const void *base, const epmoe_cfg_entry *e, char *buf,
                                    size_t cap) {
    const char *field = (const char *)base + e->offset;
    switch (e->type) {
    case EPMOE_CFG_STRING: snprintf(buf, cap, "%s", field); break;
    case EPMOE_CFG_INT: snprintf(buf, cap, "%lld", (long long)*(const int64_t *)field); break;
    case EPMOE_CFG_DOUBLE: snprintf(buf, cap, "%.17g", *(const double *)field); break;
    case EPMOE_CFG_ENUM: snprintf(buf, cap, "%s", e->enum_names[*(const int64_t *)field]); break;
    }
    return EPMOE_OK;
}

epmoe_status epmoe_config_get(const epmoe_config *cfg, const char *name, char *buf, size_t cap) {
    const epmoe_cfg_entry *e = find_entry(name);
    EPMOE_REQUIRE(e != NULL, EPMOE_ERR_NOT_FOUND, "unknown setting '%s'", name);
    return epmoe_cfg_entry_format(cfg, e, buf, cap);
}

void epmoe_cfg_table_defaults(void *base, const epmoe_cfg_entry *t, int n) {
    for (int i = 0; i < n; i++) {
        epmoe_status st = set_entry(base, &t[i], t[i].def);
        (void)st; /* defaults are checked by each table's unit test */
    }
}

epmoe_status epmoe_cfg_table_set(void *base, const epmoe_cfg_entry *t, int n, const char *name,
                                 const char *value) {
    const epmoe_cfg_entry *e = find_in(t, n, name);
    EPMOE_REQUIRE(e != NULL, EPMOE_ERR_NOT_FOUND, "unknown setting '%s' (see --print-config)",
                  name);
    return set_entry(base, e, value);
}

void epmoe_config_defaults(epmoe_config *cfg) {
    memset(cfg, 0, sizeof *cfg);
    epmoe_cfg_table_defaults(cfg, table, TABLE_N);
}

void epmoe_config_model_defaults(epmoe_config *cfg) {
    for (int i = 0; i < TABLE_N; i++)
        if (table[i].scope == EPMOE_CFG_MODEL) {
            epmoe_status st = set_entry(cfg, &table[i], table[i].def);
            (void)st; /* defaults are checked by test_config.c */
        }
}

static epmoe_status apply_overrides(epmoe_config *cfg, const char *overrides) {
    char buf[1024];
    EPMOE_REQUIRE(strlen(overrides) < sizeof buf, EPMOE_ERR_INTERNAL, "preset row too long");
    strcpy(buf, overrides);
    char *save = NULL;
    for (char *kv = strtok_r(buf, ";", &save); kv; kv = strtok_r(NULL, ";", &save)) {
        char *eq = strchr(kv, '=');
        EPMOE_REQUIRE(eq != NULL, EPMOE_ERR_INTERNAL, "preset override '%s' has no '='", kv);
        *eq = '\0';
        EPMOE_TRY(epmoe_config_set(cfg, kv, eq + 1));
    }
    return EPMOE_OK;
}

epmoe_status epmoe_config_preset(epmoe_config *cfg, const char *preset) {
    for (size_t i = 0; i < sizeof presets / sizeof presets[0]; i++) {
        if (strcmp(presets[i].name, preset) == 0) {
            epmoe_config_defaults(cfg);
            EPMOE_TRY(apply_overrides(cfg, presets[i].overrides));
            return epmoe_config_set(cfg, "preset", preset);
        }
    }
    EPMOE_FAIL(EPMOE_ERR_NOT_FOUND,
               "unknown preset '%s' (tiny, dsv4-flash, dsv4-pro, dsv3, gpt-oss-20b, gpt-oss-120b, "
               "gpt-oss-tiny)",
               preset);
}

epmoe_status epmoe_config_validate(const epmoe_config *c) {
    EPMOE_REQUIRE(c->hidden_size % 32 == 0, EPMOE_ERR_INVALID_ARG,
                  "hidden_size %lld is not a multiple of 32 (NVFP4 and MXFP4 blocks)",
                  (long long)c->hidden_size);
    EPMOE_REQUIRE(c->moe_inter_size % 32 == 0, EPMOE_ERR_INVALID_ARG,
                  "moe_inter_size %lld is not a multiple of 32 (NVFP4 and MXFP4 blocks)",
                  (long long)c->moe_inter_size);
    EPMOE_REQUIRE(c->top_k <= c->n_routed_experts, EPMOE_ERR_INVALID_ARG,
                  "top_k %lld exceeds n_routed_experts %lld", (long long)c->top_k,
                  (long long)c->n_routed_experts);
    EPMOE_REQUIRE(c->n_routed_experts % c->n_groups == 0, EPMOE_ERR_INVALID_ARG,
                  "n_groups %lld does not divide n_routed_experts %lld", (long long)c->n_groups,
                  (long long)c->n_routed_experts);
    EPMOE_REQUIRE(c->topk_groups <= c->n_groups, EPMOE_ERR_INVALID_ARG,
                  "topk_groups %lld exceeds n_groups %lld", (long long)c->topk_groups,
                  (long long)c->n_groups);
    if (c->n_groups > 1) {
        int64_t per_group = c->n_routed_experts / c->n_groups;
        EPMOE_REQUIRE(per_group >= 2, EPMOE_ERR_INVALID_ARG,
                      "group-limited routing needs >= 2 experts per group (has %lld)",
                      (long long)per_group);
        EPMOE_REQUIRE(c->topk_groups * per_group >= c->top_k, EPMOE_ERR_INVALID_ARG,
                      "topk_groups * experts per group (%lld) < top_k %lld",
                      (long long)(c->topk_groups * per_group), (long long)c->top_k);
    }
    EPMOE_REQUIRE(c->n_hash_layers <= c->n_layers, EPMOE_ERR_INVALID_ARG,
                  "n_hash_layers %lld exceeds n_layers %lld", (long long)c->n_hash_layers,
                  (long long)c->n_layers);
    EPMOE_REQUIRE(c->n_hash_layers + c->n_mtp_layers <= c->n_layers, EPMOE_ERR_INVALID_ARG,
                  "n_hash_layers %lld + n_mtp_layers %lld exceed n_layers %lld (the MTP block's "
                  "MoE is score-routed)",
                  (long long)c->n_hash_layers, (long long)c->n_mtp_layers,
                  (long long)c->n_layers);
    EPMOE_REQUIRE(c->checkpoint_layout != EPMOE_LAYOUT_DEEPSEEK ||
                      c->weight_format == EPMOE_WEIGHTS_MXFP4,
                  EPMOE_ERR_INVALID_ARG,
                  "checkpoint_layout deepseek stores MXFP4 experts: weight_format must be mxfp4");
    EPMOE_REQUIRE(c->checkpoint_layout != EPMOE_LAYOUT_NVIDIA_NVFP4 ||
                      c->weight_format == EPMOE_WEIGHTS_NVFP4,
                  EPMOE_ERR_INVALID_ARG,
                  "checkpoint_layout nvidia-nvfp4 stores NVFP4 experts: weight_format must be "
                  "nvfp4");
    /* topk_softmax weighs the chosen logits themselves: no groups, no hash layers (their
     * weights come from scores, which this routing does not have). */
    EPMOE_REQUIRE(c->scoring != EPMOE_SCORING_TOPK_SOFTMAX || c->n_groups == 1,
                  EPMOE_ERR_INVALID_ARG,
                  "scoring topk_softmax has no group limit: n_groups must be 1 (has %lld)",
                  (long long)c->n_groups);
    EPMOE_REQUIRE(c->scoring != EPMOE_SCORING_TOPK_SOFTMAX || c->n_hash_layers == 0,
                  EPMOE_ERR_INVALID_ARG,
                  "scoring topk_softmax has no hash-routed layers: n_hash_layers must be 0 (has "
                  "%lld)",
                  (long long)c->n_hash_layers);
    if (c->checkpoint_layout == EPMOE_LAYOUT_GPT_OSS) {
        /* What the released layout stores, and nothing else (docs/checkpoints.md). */
        EPMOE_REQUIRE(c->weight_format == EPMOE_WEIGHTS_MXFP4 && c->expert_bias == 1 &&
                          c->n_shared_experts == 0 && c->n_hash_layers == 0 &&
                          c->n_mtp_layers == 0,
                      EPMOE_ERR_INVALID_ARG,
                      "checkpoint_layout gpt-oss stores MXFP4 experts with biases, no shared "
                      "expert, no hash or MTP layers: needs weight_format mxfp4 (has %s), "
                      "expert_bias 1 (has %lld), n_shared_experts 0 (has %lld), n_hash_layers 0 "
                      "(has %lld), n_mtp_layers 0 (has %lld)",
                      c->weight_format == EPMOE_WEIGHTS_MXFP4 ? "mxfp4" : "nvfp4",
                      (long long)c->expert_bias, (long long)c->n_shared_experts,
                      (long long)c->n_hash_layers, (long long)c->n_mtp_layers);
    }
    return EPMOE_OK;
}

epmoe_status epmoe_config_check_cuda(const epmoe_config *c) {
    EPMOE_REQUIRE(c->act_quant != EPMOE_ACT_NVFP4 || c->moe_inter_size <= EPMOE_CUDA_MAX_INTER,
                  EPMOE_ERR_UNSUPPORTED,
                  "backend=cuda: moe_inter_size %lld with act_quant=nvfp4 is not implemented on the "
                  "GPU (the fused SwiGLU + NVFP4 kernel holds a row of at most %d floats in "
                  "shared memory); use backend=cpu or act_quant=high",
                  (long long)c->moe_inter_size, EPMOE_CUDA_MAX_INTER);
    return EPMOE_OK;
}

void epmoe_cfg_table_print(const void *base, const epmoe_cfg_entry *t, int n, int scope,
                           FILE *out) {
    for (int i = 0; i < n; i++) {
        if (scope >= 0 && (int)t[i].scope != scope) continue;
        char value[300];
        epmoe_cfg_entry_format(base, &t[i], value, sizeof value);
        char bounds[96] = "";
        if (t[i].type == EPMOE_CFG_INT) /* integers as integers: 1048576, not 1.04858e+06 */
            snprintf(bounds, sizeof bounds, " [%.0f..%.0f]", t[i].min, t[i].max);
        else if (t[i].type == EPMOE_CFG_DOUBLE)
            snprintf(bounds, sizeof bounds, " [%g..%g]", t[i].min, t[i].max);
        fprintf(out, "%-22s = %-14s # %s%s (default '%s')\n", t[i].name, value, t[i].help,
                bounds, t[i].def);
    }
}

void epmoe_config_print(const epmoe_config *cfg, FILE *out) {
    fprintf(out, "# model settings\n");
    epmoe_cfg_table_print(cfg, table, TABLE_N, EPMOE_CFG_MODEL, out);
    fprintf(out, "# runtime settings\n");
    epmoe_cfg_table_print(cfg, table, TABLE_N, EPMOE_CFG_RUNTIME, out);
}

/* "--some-name=v" -> name "some_name", value "v" (NULL when the value is the next argument);
 * 0 when the argument is not an option or its name is too long. */
static int split_option(const char *arg, char *name, size_t cap, const char **value) {
    if (strncmp(arg, "--", 2) != 0) return 0;
    const char *eq = strchr(arg + 2, '=');
    size_t n = eq ? (size_t)(eq - (arg + 2)) : strlen(arg + 2);
    if (n >= cap) return 0;
    memcpy(name, arg + 2, n);
    name[n] = '\0';
    for (char *p = name; *p; p++)
        if (*p == '-') *p = '_';
    *value = eq ? eq + 1 : NULL;
    return 1;
}

epmoe_status epmoe_cfg_table_parse_args(void *base, const epmoe_cfg_entry *t, int n, int *argc,
                                        char **argv) {
    int out = 1;
    for (int i = 1; i < *argc; i++) {
        char name[64];
        const char *value = NULL;
        const epmoe_cfg_entry *e = NULL;
        if (split_option(argv[i], name, sizeof name, &value)) e = find_in(t, n, name);
        if (!e) {
            argv[out++] = argv[i];
            continue;
        }
        if (!value) {
            EPMOE_REQUIRE(i + 1 < *argc, EPMOE_ERR_INVALID_ARG, "--%s needs a value", name);
            value = argv[++i];
        }
        EPMOE_TRY(set_entry(base, e, value));
    }
    *argc = out;
    argv[out] = NULL;
    return EPMOE_OK;
}

epmoe_status epmoe_config_parse_args(epmoe_config *cfg, int *argc, char **argv,
                                     int *print_config) {
    if (print_config) *print_config = 0;
    /* --preset first, wherever it appears, so that later settings override it; then it is
     * consumed like any other setting (setting it again records the same name). */
    for (int i = 1; i < *argc; i++) {
        char name[64];
        const char *value = NULL;
        if (!split_option(argv[i], name, sizeof name, &value) || strcmp(name, "preset") != 0)
            continue;
        if (!value) {
            EPMOE_REQUIRE(i + 1 < *argc, EPMOE_ERR_INVALID_ARG, "--preset needs a value");
            value = argv[i + 1];
        }
        EPMOE_TRY(epmoe_config_preset(cfg, value));
    }
    /* Runtime settings from the environment (EPMOE_BACKEND=cuda, ...), so a job script or a
     * test harness can choose them for every program at once; the command line wins. */
    for (int i = 0; i < TABLE_N; i++) {
        if (table[i].scope != EPMOE_CFG_RUNTIME) continue;
        char var[80] = "EPMOE_";
        size_t n = strlen(var);
        for (const char *c = table[i].name; *c && n + 1 < sizeof var; c++)
            var[n++] = (char)(*c >= 'a' && *c <= 'z' ? *c - 'a' + 'A' : *c);
        var[n] = 0;
        const char *value = getenv(var);
        if (!value || !*value) continue;
        epmoe_status st = epmoe_cfg_table_set(cfg, table, TABLE_N, table[i].name, value);
        if (st != EPMOE_OK) return epmoe_add_context(st, "environment variable %s", var);
    }
    int out = 1;
    for (int i = 1; i < *argc; i++) {
        if (strcmp(argv[i], "--print-config") == 0) {
            if (print_config) *print_config = 1;
            continue;
        }
        argv[out++] = argv[i];
    }
    *argc = out;
    argv[out] = NULL;
    return epmoe_cfg_table_parse_args(cfg, table, TABLE_N, argc, argv);
}
