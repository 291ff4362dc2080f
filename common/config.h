/* Configuration: one table declares every setting once, with its type, bounds, default and
 * help (common/config.c). Presets (docs/design.md §6) are rows of overrides on the defaults; a
 * checkpoint's metadata carries the model settings it was written with, and command-line
 * `--name value` pairs come last. Every program prints the effective values with
 * --print-config.
 *
 * Model shape settings are data: nothing in the code assumes 256 experts or a hidden size.
 */
#ifndef EPMOE_CONFIG_H
#define EPMOE_CONFIG_H

#include <stdint.h>
#include <stdio.h>

#include "common/status.h"

#ifdef __cplusplus
extern "C" {
#endif

/* How the gate logits l = x . Wg route a token (docs/design.md §3.2): DeepSeek-V4 and V3 score
 * each expert (sqrtsoftplus, sigmoid), pick by score + bias and weigh by the scores; gpt-oss's
 * topk_softmax picks the top k of l + bias and weighs them by a softmax over those k. */
typedef enum {
    EPMOE_SCORING_SQRTSOFTPLUS = 0,
    EPMOE_SCORING_SIGMOID = 1,
    EPMOE_SCORING_TOPK_SOFTMAX = 2
} epmoe_scoring;

/* DeepSeek-V4 clamps the gate before the activation; "step" (SwigluStep) clamps after it;
 * "gptoss" is gpt-oss's (gate clamped above, up clamped both ways, g * sigmoid(alpha g) times
 * (u + 1)). docs/design.md §3.3. */
typedef enum { EPMOE_SWIGLU_DSV4 = 0, EPMOE_SWIGLU_STEP = 1, EPMOE_SWIGLU_GPTOSS = 2 } epmoe_swiglu_variant;

/* How a fused gate/up tensor of a model directory orders its 2I rows: gpt-oss interleaves
 * them (row 2i is gate row i, row 2i+1 up row i); "halves" puts the I gate rows first. In
 * memory epmoe always keeps halves (worker/expert_weights.h). */
typedef enum { EPMOE_GATE_UP_HALVES = 0, EPMOE_GATE_UP_INTERLEAVED = 1 } epmoe_gate_up_order;

typedef enum { EPMOE_WEIGHTS_NVFP4 = 0, EPMOE_WEIGHTS_MXFP4 = 1 } epmoe_weight_format;

/* How a checkpoint names and stores its tensors (docs/checkpoints.md): epmoe-gen's own files
 * (epmoe.* metadata, one file per layer), DeepSeek's release (config.json, index, shards;
 * MXFP4 experts, FP8 shared expert), NVIDIA's NVFP4 re-quantization of it (ModelOpt), or
 * OpenAI's gpt-oss release (config.json, index, shards; every layer's experts stacked in MXFP4
 * *_blocks / *_scales tensors with BF16 biases). */
typedef enum {
    EPMOE_LAYOUT_EPMOE = 0,
    EPMOE_LAYOUT_DEEPSEEK = 1,
    EPMOE_LAYOUT_NVIDIA_NVFP4 = 2,
    EPMOE_LAYOUT_GPT_OSS = 3
} epmoe_checkpoint_layout;

/* Activations before each expert GEMM: NVFP4 (W4A4, the production path), kept in higher
 * precision (W4A16: fp32 on the CPU, bf16 on GPUs), or FP8 E4M3 with a power-of-two scale per
 * 128 along K (W4A8, common/fp8.h: FP8 tensor cores on Hopper for MXFP4 weights). */
typedef enum { EPMOE_ACT_NVFP4 = 0, EPMOE_ACT_HIGH = 1, EPMOE_ACT_FP8 = 2 } epmoe_act_quant;

/* How the activation tensor scale is chosen: per row from that row's amax (default: results
 * do not depend on which other tokens share the batch or the rank), or the checkpoint's
 * calibrated input_scale (block scales saturate and are counted, never Inf). */
typedef enum { EPMOE_ACT_SCALE_PER_ROW = 0, EPMOE_ACT_SCALE_STATIC = 1 } epmoe_act_scale;

/* Where the layers run (coordinator/engine/backend.h). */
typedef enum { EPMOE_BACKEND_AUTO = 0, EPMOE_BACKEND_CPU = 1, EPMOE_BACKEND_CUDA = 2 } epmoe_backend_kind;

typedef struct {
    /* model */
    char preset[32];
    int64_t hidden_size;
    int64_t moe_inter_size;
    int64_t n_routed_experts;
    int64_t top_k;
    int64_t n_shared_experts;
    double routed_scaling_factor;
    int64_t scoring;           /* epmoe_scoring */
    int64_t n_groups;          /* group-limited routing (dsv3); 1 = off */
    int64_t topk_groups;
    double swiglu_limit;       /* 0 = no clamp */
    int64_t swiglu_variant;    /* epmoe_swiglu_variant */
    double swiglu_alpha;       /* gptoss variant: the gain in g * sigmoid(alpha g) */
    int64_t expert_bias;       /* 1: routed experts add a bias after each projection (gpt-oss) */
    int64_t gate_up_order;     /* epmoe_gate_up_order of a fused gate/up tensor */
    int64_t n_layers;
    int64_t n_hash_layers;     /* the first n layers route by tid2eid[token_id] */
    int64_t vocab_size;
    int64_t weight_format;     /* epmoe_weight_format */
    int64_t checkpoint_layout; /* epmoe_checkpoint_layout */
    int64_t n_mtp_layers;      /* the last n of n_layers are the MTP block's MoE (mtp.N.*) */
    int64_t fp8_block_size;    /* FP8 weights (shared expert) carry one scale per b x b block */
    /* runtime */
    int64_t expert_pad_rows;   /* each expert's block in the padded layout is a multiple */
    int64_t act_quant;         /* epmoe_act_quant */
    int64_t act_scale;         /* epmoe_act_scale */
    int64_t fp8_tensor_cores;  /* act_quant = fp8 on MXFP4 experts, cuda: 1 = FP8 MMAs at prefill */
    int64_t max_tokens_per_rank; /* sizes the worst-case buffers (dropless) */
    int64_t seed;
    int64_t cpu_weight_cache_mib; /* dequantized expert weights kept per rank (CPU path) */
    int64_t backend;           /* epmoe_backend_kind */
    int64_t decode_tokens;     /* cuda: per-rank capacity of the captured decode graph */
    double collective_timeout_s; /* GPU transports: abort a collective unfinished after this */
} epmoe_config;

typedef enum { EPMOE_CFG_INT, EPMOE_CFG_DOUBLE, EPMOE_CFG_ENUM, EPMOE_CFG_STRING } epmoe_cfg_type;

/* Which settings a checkpoint fixes (model) and which a run may choose (runtime). */
typedef enum { EPMOE_CFG_MODEL, EPMOE_CFG_RUNTIME } epmoe_cfg_scope;

typedef struct {
    const char *name;
    epmoe_cfg_type type;
    epmoe_cfg_scope scope;
    size_t offset;          /* into the settings struct the table describes */
    double min, max;        /* inclusive bounds for INT / DOUBLE; STRING: max = longest length */
    const char *def;        /* default, as text */
    const char *const *enum_names; /* NULL-terminated, for ENUM */
    const char *help;
} epmoe_cfg_entry;

const epmoe_cfg_entry *epmoe_config_table(int *count);

/* The machinery behind every settings table (this one, and any program's own, e.g. the
 * service's): `base` is the struct the table's offsets point into. */
void epmoe_cfg_table_defaults(void *base, const epmoe_cfg_entry *table, int n);
epmoe_status epmoe_cfg_table_set(void *base, const epmoe_cfg_entry *table, int n,
                                 const char *name, const char *value);
epmoe_status epmoe_cfg_entry_format(const void *base, const epmoe_cfg_entry *e, char *buf,
                                    size_t cap);
/* "name = value   # help [bounds] (default d)" for every entry of `scope` (-1: all). */
void epmoe_cfg_table_print(const void *base, const epmoe_cfg_entry *table, int n, int scope,
                           FILE *out);
/* Consumes `--name value` / `--name=value` (dashes or underscores) for the table's names,
 * leaving other arguments in argv (argc updated, argv[argc] = NULL). */
epmoe_status epmoe_cfg_table_parse_args(void *base, const epmoe_cfg_entry *table, int n,
                                        int *argc, char **argv);

/* Defaults of every entry (the "tiny" preset). */
void epmoe_config_defaults(epmoe_config *cfg);
/* Defaults of the model-scope entries only (a model directory's reader starts from these, so
 * nothing of another family's settings survives; runtime settings are kept). */
void epmoe_config_model_defaults(epmoe_config *cfg);
/* Defaults, then the preset's overrides. Unknown name: EPMOE_ERR_NOT_FOUND listing presets. */
epmoe_status epmoe_config_preset(epmoe_config *cfg, const char *preset);
/* Sets one entry from text, checking type, enum names and bounds. */
epmoe_status epmoe_config_set(epmoe_config *cfg, const char *name, const char *value);
/* Formats one entry's value as text (for printing and checkpoint metadata). */
epmoe_status epmoe_config_get(const epmoe_config *cfg, const char *name, char *buf, size_t cap);
/* Cross-field rules (top_k <= experts, K multiples of 16/32, groups divide experts, ...). */
epmoe_status epmoe_config_validate(const epmoe_config *cfg);
/* Whether the CUDA kernels implement this model: EPMOE_ERR_UNSUPPORTED with the reason when
 * they do not. Every routing, SwiGLU variant, expert bias and hidden size the settings admit
 * runs on the GPU (sizes that are not a multiple of the GEMMs' 128-wide k step are padded with
 * exact zeros); what remains is the fused SwiGLU + NVFP4 kernel's one row of
 * EPMOE_CUDA_MAX_INTER floats in 48 KiB of shared memory. The cuda backend refuses such a model
 * at start, backend=auto picks cpu for it, and the GPU layer refuses it too (one rule, here). */
#define EPMOE_CUDA_MAX_INTER 12288
epmoe_status epmoe_config_check_cuda(const epmoe_config *cfg);
/* "name = value   # help" for every entry, model settings first. */
void epmoe_config_print(const epmoe_config *cfg, FILE *out);

/* Command-line helper shared by the programs: applies runtime settings given in the
 * environment as EPMOE_<NAME> (EPMOE_BACKEND=cpu), then consumes every `--name value` (or
 * `--name=value`) whose name is a config entry, plus `--preset NAME` (applied first wherever it
 * appears) and leaves other arguments in argv (argc updated). Sets *print_config when
 * --print-config was given. */
epmoe_status epmoe_config_parse_args(epmoe_config *cfg, int *argc, char **argv,
                                     int *print_config);

#ifdef __cplusplus
}
#endif
#endif
