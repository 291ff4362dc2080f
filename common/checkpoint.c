#include "common/checkpoint.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

static epmoe_status format_name(char *buf, size_t cap, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static epmoe_status format_name(char *buf, size_t cap, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, cap, fmt, ap);
    va_end(ap);
    EPMOE_REQUIRE(n >= 0 && (size_t)n < cap, EPMOE_ERR_INVALID_ARG,
                  "checkpoint name needs %d characters, buffer holds %zu", n, cap);
    return EPMOE_OK;
}

static int is_proj(const char *proj) {
    return proj && (strcmp(proj, "w1") == 0 || strcmp(proj, "w2") == 0 || strcmp(proj, "w3") == 0);
}

epmoe_status epmoe_ckpt_layer_prefix(char *buf, size_t cap, const epmoe_config *cfg,
                                     int64_t layer) {
    if (cfg->checkpoint_layout == EPMOE_LAYOUT_GPT_OSS) /* transformers' names, no MTP block */
        return format_name(buf, cap, "model.layers.%lld", (long long)layer);
    const int64_t first_mtp = cfg->n_layers - cfg->n_mtp_layers;
    if (layer >= first_mtp && layer < cfg->n_layers)
        return format_name(buf, cap, "mtp.%lld", (long long)(layer - first_mtp));
    return format_name(buf, cap, "layers.%lld", (long long)layer);
}

epmoe_status epmoe_ckpt_gate_name(char *buf, size_t cap, const epmoe_config *cfg, int64_t layer,
                                  const char *what) {
    EPMOE_REQUIRE(what && (strcmp(what, "weight") == 0 || strcmp(what, "bias") == 0 ||
                           strcmp(what, "tid2eid") == 0),
                  EPMOE_ERR_INVALID_ARG, "gate tensor '%s' (weight, bias or tid2eid)",
                  what ? what : "(null)");
    char prefix[32];
    EPMOE_TRY(epmoe_ckpt_layer_prefix(prefix, sizeof prefix, cfg, layer));
    if (cfg->checkpoint_layout == EPMOE_LAYOUT_GPT_OSS) {
        EPMOE_REQUIRE(strcmp(what, "tid2eid") != 0, EPMOE_ERR_INVALID_ARG,
                      "the gpt-oss layout has no hash routing table (tid2eid)");
        return format_name(buf, cap, "%s.mlp.router.%s", prefix, what);
    }
    return format_name(buf, cap, "%s.ffn.gate.%s", prefix, what);
}

epmoe_status epmoe_ckpt_shared_name(char *buf, size_t cap, const epmoe_config *cfg,
                                    int64_t layer, const char *proj, const char *what) {
    EPMOE_REQUIRE(is_proj(proj), EPMOE_ERR_INVALID_ARG, "projection '%s' (w1, w2 or w3)",
                  proj ? proj : "(null)");
    EPMOE_REQUIRE(cfg->checkpoint_layout != EPMOE_LAYOUT_GPT_OSS, EPMOE_ERR_INVALID_ARG,
                  "the gpt-oss layout has no shared expert");
    char prefix[32];
    EPMOE_TRY(epmoe_ckpt_layer_prefix(prefix, sizeof prefix, cfg, layer));
    return format_name(buf, cap, "%s.ffn.shared_experts.%s.%s", prefix, proj, what);
}

epmoe_status epmoe_ckpt_expert_name(char *buf, size_t cap, const epmoe_config *cfg,
                                    int64_t layer, int64_t expert, const char *proj,
                                    const char *what) {
    EPMOE_REQUIRE(is_proj(proj), EPMOE_ERR_INVALID_ARG, "projection '%s' (w1, w2 or w3)",
                  proj ? proj : "(null)");
    EPMOE_REQUIRE(cfg->checkpoint_layout != EPMOE_LAYOUT_GPT_OSS, EPMOE_ERR_INVALID_ARG,
                  "the gpt-oss layout stacks a layer's experts: epmoe_ckpt_stacked_expert_name");
    char prefix[32];
    EPMOE_TRY(epmoe_ckpt_layer_prefix(prefix, sizeof prefix, cfg, layer));
    return format_name(buf, cap, "%s.ffn.experts.%lld.%s.%s", prefix, (long long)expert, proj,
                       what);
}

epmoe_status epmoe_ckpt_stacked_expert_name(char *buf, size_t cap, const epmoe_config *cfg,
                                            int64_t layer, const char *which, const char *what) {
    EPMOE_REQUIRE(cfg->checkpoint_layout == EPMOE_LAYOUT_GPT_OSS, EPMOE_ERR_INVALID_ARG,
                  "stacked expert tensors exist in the gpt-oss layout only");
    EPMOE_REQUIRE(which && (strcmp(which, "gate_up_proj") == 0 || strcmp(which, "down_proj") == 0),
                  EPMOE_ERR_INVALID_ARG, "stacked projection '%s' (gate_up_proj or down_proj)",
                  which ? which : "(null)");
    EPMOE_REQUIRE(what && (strcmp(what, "blocks") == 0 || strcmp(what, "scales") == 0 ||
                           strcmp(what, "bias") == 0),
                  EPMOE_ERR_INVALID_ARG, "stacked tensor '%s' (blocks, scales or bias)",
                  what ? what : "(null)");
    char prefix[32];
    EPMOE_TRY(epmoe_ckpt_layer_prefix(prefix, sizeof prefix, cfg, layer));
    return format_name(buf, cap, "%s.mlp.experts.%s_%s", prefix, which, what);
}

int64_t epmoe_ckpt_fused_row(const epmoe_config *cfg, int up, int64_t n) {
    if (cfg->gate_up_order == EPMOE_GATE_UP_INTERLEAVED) return 2 * n + (up ? 1 : 0);
    return (up ? cfg->moe_inter_size : 0) + n;
}

epmoe_status epmoe_ckpt_layer_file_name(char *buf, size_t cap, int64_t layer) {
    return format_name(buf, cap, "model-%05lld.safetensors", (long long)layer);
}

epmoe_status epmoe_ckpt_meta_key(char *buf, size_t cap, const char *setting) {
    return format_name(buf, cap, "%s%s", EPMOE_CKPT_META_PREFIX, setting);
}

epmoe_status epmoe_ckpt_expert_dims(const epmoe_config *cfg, const char *proj, int64_t *rows,
                                    int64_t *k) {
    EPMOE_REQUIRE(is_proj(proj), EPMOE_ERR_INVALID_ARG, "projection '%s' (w1, w2 or w3)",
                  proj ? proj : "(null)");
    if (strcmp(proj, "w2") == 0) {
        *rows = cfg->hidden_size;
        *k = cfg->moe_inter_size;
    } else {
        *rows = cfg->moe_inter_size;
        *k = cfg->hidden_size;
    }
    return EPMOE_OK;
}

int64_t epmoe_ckpt_shared_inter(const epmoe_config *cfg) {
    return cfg->n_shared_experts * cfg->moe_inter_size;
}

int epmoe_ckpt_layer_is_hash(const epmoe_config *cfg, int64_t layer) {
    return layer >= 0 && layer < cfg->n_hash_layers;
}

epmoe_status epmoe_ckpt_write_metadata(epmoe_st_writer *w, const epmoe_config *cfg) {
    EPMOE_TRY(epmoe_st_writer_metadata(w, EPMOE_CKPT_META_FORMAT_VERSION,
                                       EPMOE_CKPT_FORMAT_VERSION));
    int n = 0;
    const epmoe_cfg_entry *table = epmoe_config_table(&n);
    for (int i = 0; i < n; i++) {
        if (table[i].scope != EPMOE_CFG_MODEL) continue;
        char key[96], value[128];
        EPMOE_TRY(epmoe_ckpt_meta_key(key, sizeof key, table[i].name));
        EPMOE_TRY(epmoe_config_get(cfg, table[i].name, value, sizeof value));
        EPMOE_TRY(epmoe_st_writer_metadata(w, key, value));
    }
    return EPMOE_OK;
}

/* Model settings added after format version 1: a version-1 file without them means their
 * defaults (its layout is epmoe's, it has no MTP layers, no FP8 tensors, no expert biases). */
static int added_after_version_1(const char *setting) {
    return strcmp(setting, "checkpoint_layout") == 0 || strcmp(setting, "n_mtp_layers") == 0 ||
           strcmp(setting, "fp8_block_size") == 0 || strcmp(setting, "swiglu_alpha") == 0 ||
           strcmp(setting, "expert_bias") == 0 || strcmp(setting, "gate_up_order") == 0;
}

static epmoe_status config_from_metadata(const epmoe_st_set *ckpt, epmoe_config *cfg) {
    const char *path = epmoe_st_set_path(ckpt);
    const char *version = epmoe_st_set_metadata(ckpt, EPMOE_CKPT_META_FORMAT_VERSION);
    EPMOE_REQUIRE(version != NULL, EPMOE_ERR_FORMAT,
                  "%s: no config.json and no %s metadata: neither a model directory (config.json, "
                  "%s, shards) nor a checkpoint written by epmoe-gen",
                  path, EPMOE_CKPT_META_FORMAT_VERSION, EPMOE_ST_INDEX_FILE);
    EPMOE_REQUIRE(strcmp(version, EPMOE_CKPT_FORMAT_VERSION) == 0, EPMOE_ERR_UNSUPPORTED,
                  "%s: checkpoint format version %s, this build reads version %s", path, version,
                  EPMOE_CKPT_FORMAT_VERSION);
    int n = 0;
    const epmoe_cfg_entry *table = epmoe_config_table(&n);
    for (int i = 0; i < n; i++) {
        if (table[i].scope != EPMOE_CFG_MODEL) continue;
        char key[96];
        EPMOE_TRY(epmoe_ckpt_meta_key(key, sizeof key, table[i].name));
        const char *value = epmoe_st_set_metadata(ckpt, key);
        if (!value && added_after_version_1(table[i].name)) value = table[i].def;
        EPMOE_REQUIRE(value != NULL, EPMOE_ERR_FORMAT, "%s: metadata %s is missing", path, key);
        epmoe_status st = epmoe_config_set(cfg, table[i].name, value);
        if (st != EPMOE_OK) return epmoe_add_context(st, "%s: metadata %s", path, key);
    }
    EPMOE_REQUIRE(cfg->checkpoint_layout == EPMOE_LAYOUT_EPMOE, EPMOE_ERR_FORMAT,
                  "%s: metadata %scheckpoint_layout is not epmoe: files with epmoe.* metadata "
                  "are epmoe-gen's own layout",
                  path, EPMOE_CKPT_META_PREFIX);
    epmoe_status st = epmoe_config_validate(cfg);
    if (st != EPMOE_OK) return epmoe_add_context(st, "%s: model settings", path);
    return EPMOE_OK;
}

epmoe_status epmoe_config_from_checkpoint(const epmoe_st_set *ckpt, epmoe_config *cfg) {
    if (epmoe_ckpt_is_model_dir(ckpt)) return epmoe_config_from_model_dir(ckpt, cfg);
    return config_from_metadata(ckpt, cfg);
}
