/* The checkpoint layouts (docs/design.md §4.1, docs/checkpoints.md) in one place: tensor names,
 * the metadata keys, reading a model directory's config.json, and the synthetic checkpoint
 * generator that writes every layout.
 *
 * Tensors of MoE layer L in epmoe-gen's own layout (one file per layer,
 * model-LLLLL.safetensors, or any split of the same names over *.safetensors files; the real
 * layouts use the same names with the dtypes in worker/expert_weights.c, and "mtp.N" in place
 * of "layers.L" for the MTP block's layers):
 *   layers.L.ffn.gate.weight              F32 [E, H]
 *   layers.L.ffn.gate.bias                F32 [E]            score-routed layers only
 *   layers.L.ffn.gate.tid2eid             I32 [vocab, top_k] hash layers (L < n_hash_layers)
 *   layers.L.ffn.shared_experts.w1.weight BF16 [Is, H]       gate; Is = n_shared * I
 *   layers.L.ffn.shared_experts.w3.weight BF16 [Is, H]       up     (absent when Is == 0)
 *   layers.L.ffn.shared_experts.w2.weight BF16 [H, Is]       down
 *   layers.L.ffn.experts.e.{w1,w3,w2}.*   routed expert e; logical [N, K] = [I, H] for w1/w3
 *                                         and [H, I] for w2. NVFP4:
 *       .weight U8 [N, K/2], .weight_scale F8_E4M3 [N, K/16], .weight_scale_2 F32 [],
 *       .input_scale F32 []
 *     MXFP4:
 *       .weight I8 [N, K/2], .scale F8_E8M0 [N, K/32]
 *     with expert_bias = 1 (the gpt-oss family), also .bias F32 [N]
 *
 * The gpt-oss layout (OpenAI's release as transformers reads it, docs/checkpoints.md) names
 * layer L "model.layers.L" and stacks every expert of a layer:
 *   model.layers.L.mlp.router.weight              BF16 [E, H]
 *   model.layers.L.mlp.router.bias                BF16 [E]
 *   model.layers.L.mlp.experts.gate_up_proj_blocks U8 [E, 2I, H/32, 16]  MXFP4 codes, rows fused
 *                                                  in gate_up_order (interleaved as released)
 *   model.layers.L.mlp.experts.gate_up_proj_scales U8 [E, 2I, H/32]      UE8M0
 *   model.layers.L.mlp.experts.gate_up_proj_bias   BF16 [E, 2I]          same row order
 *   model.layers.L.mlp.experts.down_proj_blocks    U8 [E, H, I/32, 16]
 *   model.layers.L.mlp.experts.down_proj_scales    U8 [E, H, I/32]
 *   model.layers.L.mlp.experts.down_proj_bias      BF16 [E, H]
 *
 * Metadata (every file): "epmoe.format_version" and "epmoe.<name>" for every model-scope
 * setting of the config table, as epmoe_config_get formats it.
 */
#ifndef EPMOE_CHECKPOINT_H
#define EPMOE_CHECKPOINT_H

#include <stddef.h>
#include <stdint.h>

#include "common/config.h"
#include "common/safetensors.h"
#include "common/status.h"
#include "common/tensor.h"

#ifdef __cplusplus
extern "C" {
#endif

#define EPMOE_CKPT_FORMAT_VERSION "1"
#define EPMOE_CKPT_META_PREFIX "epmoe."
#define EPMOE_CKPT_META_FORMAT_VERSION "epmoe.format_version"

/* ---- names (buf gets the name; EPMOE_ERR_INVALID_ARG if it does not fit) ---- */

/* "layers.L", or "mtp.N" for the MTP block's layers (the last cfg->n_mtp_layers). */
epmoe_status epmoe_ckpt_layer_prefix(char *buf, size_t cap, const epmoe_config *cfg,
                                     int64_t layer);
/* what: "weight", "bias" or "tid2eid". */
epmoe_status epmoe_ckpt_gate_name(char *buf, size_t cap, const epmoe_config *cfg, int64_t layer,
                                  const char *what);
/* proj: "w1", "w2" or "w3"; what: "weight" (or "scale": the real layouts' FP8 block scales). */
epmoe_status epmoe_ckpt_shared_name(char *buf, size_t cap, const epmoe_config *cfg,
                                    int64_t layer, const char *proj, const char *what);
/* proj: "w1", "w2" or "w3"; what: "weight", "weight_scale", "weight_scale_2", "input_scale"
 * (NVFP4), "weight", "scale" (MXFP4), or "bias". Not in the gpt-oss layout (stacked below). */
epmoe_status epmoe_ckpt_expert_name(char *buf, size_t cap, const epmoe_config *cfg,
                                    int64_t layer, int64_t expert, const char *proj,
                                    const char *what);
/* The gpt-oss layout's stacked expert tensors: which "gate_up_proj" or "down_proj", what
 * "blocks", "scales" or "bias" ("model.layers.3.mlp.experts.gate_up_proj_blocks"). */
epmoe_status epmoe_ckpt_stacked_expert_name(char *buf, size_t cap, const epmoe_config *cfg,
                                            int64_t layer, const char *which, const char *what);
/* The row of a fused gate/up tensor [2I, ...] that holds gate row n (up = 0) or up row n
 * (up = 1), in cfg->gate_up_order: interleaved 2n + up, halves up * I + n. The one place that
 * maps them (the loader reads, the generator writes through it). */
int64_t epmoe_ckpt_fused_row(const epmoe_config *cfg, int up, int64_t n);
/* "model-00003.safetensors": the file the generator writes layer 3 to. */
epmoe_status epmoe_ckpt_layer_file_name(char *buf, size_t cap, int64_t layer);
/* "epmoe.hidden_size" */
epmoe_status epmoe_ckpt_meta_key(char *buf, size_t cap, const char *setting);

/* ---- shapes ---- */

/* Logical [N, K] (rows, reduction) of a routed expert projection "w1", "w3" or "w2". */
epmoe_status epmoe_ckpt_expert_dims(const epmoe_config *cfg, const char *proj, int64_t *rows,
                                    int64_t *k);
/* Shared expert intermediate size Is = n_shared_experts * moe_inter_size. */
int64_t epmoe_ckpt_shared_inter(const epmoe_config *cfg);
/* Hash-routed layers carry tid2eid and no bias. */
int epmoe_ckpt_layer_is_hash(const epmoe_config *cfg, int64_t layer);

/* Reads a checkpoint's model settings into cfg (model-scope entries only): a model directory's
 * config.json (epmoe_config_from_model_dir), else epmoe-gen's epmoe.* metadata. */
epmoe_status epmoe_config_from_checkpoint(const epmoe_st_set *ckpt, epmoe_config *cfg);

/* A directory holding config.json: DeepSeek's layout, NVIDIA's NVFP4 one when config.json's
 * quantization_config.moe_quant_algo is "NVFP4" or hf_quant_config.json is present, or
 * gpt-oss's when model_type is "gpt_oss" (common/model_dir.c). The settings are checked against the tensors' headers (the first layer's gate
 * and expert, the layer count); n_mtp_layers counts the MTP layers whose MoE is present. */
int epmoe_ckpt_is_model_dir(const epmoe_st_set *ckpt);
epmoe_status epmoe_config_from_model_dir(const epmoe_st_set *ckpt, epmoe_config *cfg);

/* Writes the format version and every model-scope setting of cfg as metadata. */
epmoe_status epmoe_ckpt_write_metadata(epmoe_st_writer *w, const epmoe_config *cfg);

/* ---- the synthetic checkpoint generator (common/checkpoint_gen.c) ----
 *
 * Writes cfg's layers in cfg->checkpoint_layout:
 *   epmoe         one file per layer, model-LLLLL.safetensors, with epmoe.* metadata;
 *   deepseek      a model directory as DeepSeek releases it: config.json,
 *                 model.safetensors.index.json and model-NNNNN-of-MMMMM.safetensors shards
 *                 holding MXFP4 experts, an FP8 shared expert, a BF16 gate, I64 tid2eid, and
 *                 small random attention, norm, embedding and head tensors (never read);
 *   nvidia-nvfp4  the same directory as NVIDIA's ModelOpt export writes it: NVFP4 experts,
 *                 config.json's quantization_config.moe_quant_algo "NVFP4", hf_quant_config.json.
 * The same seed and weight format give the same weights in every layout: the epmoe layout
 * stores the gate as the F32 of the BF16 values and the shared expert as the BF16 of the FP8
 * block-scaled values, so a run on either is bit-identical.
 *
 * Values are deterministic functions of (cfg->seed, layer, expert, projection): generating
 * fewer layers or another weight format changes nothing else, nor does the thread count. Expert
 * weights are (approximately) normal with std 1/sqrt(K) times a per-output-row factor spread
 * over two decades (10^U(-1,1)), plus a few outliers; quantized with the tensor's own amax (w1
 * and w3 each their own). Gate weight N(0, 1/sqrt(H)) rounded to BF16, gate bias N(0, 0.1)
 * (+ skew), shared expert distributed like the routed experts and FP8-quantized per b x b
 * block (UE8M0 scales), tid2eid k distinct experts per token id. input_scale is a calibration
 * amax/2688 taken from a standard normal sample of the layer input size: deliberately smaller
 * than the extreme runtime values (outliers, clamp), so that static-scale saturation is
 * exercised.
 *
 * Each file is sized up front and filled by `threads` threads with pwrite, one expert
 * projection (or other tensor) at a time, under a .tmp name until every file is complete. */
typedef struct {
    uint64_t total_bytes; /* every file, headers included */
    int64_t files;
    int64_t tensors;
    int threads;
    double bytes_per_second; /* estimated from one projection, times the threads */
} epmoe_gen_plan_info;

typedef struct {
    /* Routing skew: expert e gets skew * (1 - e/(E-1)) added to its gate bias, and hash
     * layers draw expert e with weight exp(4 * skew * (1 - e/(E-1))). 0 = balanced. */
    double skew;
    int threads;          /* 0: one per online CPU */
    uint64_t shard_bytes; /* model directories: a new shard past this size (0: 4 GiB) */
    /* Optional: called once before anything is written, then with the bytes written so far
     * (from the calling thread, a few times a second, and at the end). */
    void (*on_plan)(void *ctx, const epmoe_gen_plan_info *info);
    void (*on_progress)(void *ctx, uint64_t bytes_done, uint64_t bytes_total);
    void *ctx;
} epmoe_gen_options;

typedef struct {
    int64_t layers;
    int64_t tensors;
    uint64_t bytes;
} epmoe_gen_stats;

/* Writes every layer of cfg (n_layers) into directory out_dir (created if missing). Refuses a
 * directory holding *.safetensors files it would not overwrite (they would join the
 * checkpoint) and, for the epmoe layout, a model directory's config.json or index. */
epmoe_status epmoe_ckpt_generate(const epmoe_config *cfg, const epmoe_gen_options *opt,
                                 const char *out_dir, epmoe_gen_stats *stats);
/* Writes one layer's file in the epmoe layout; stats (optional) are accumulated. */
epmoe_status epmoe_ckpt_generate_layer(const epmoe_config *cfg, const epmoe_gen_options *opt,
                                       int64_t layer, const char *path, epmoe_gen_stats *stats);

/* A batch input file: "hidden_states" [tokens, H] in dtype (F32, BF16 or F16), normal with
 * std 1 plus a few outliers of magnitude 20..100 so that the SwiGLU clamp fires, and
 * "token_ids" I32 [tokens] uniform in [0, vocab_size). Deterministic from seed. */
epmoe_status epmoe_gen_input_file(const epmoe_config *cfg, int64_t tokens, epmoe_dtype dtype,
                                  uint64_t seed, const char *path);

#ifdef __cplusplus
}
#endif
#endif
