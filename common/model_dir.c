/* A model directory's settings: config.json (and hf_quant_config.json) of DeepSeek-V4's release,
 * of NVIDIA's NVFP4 re-quantization, and of OpenAI's gpt-oss release, read into epmoe's model
 * settings. The keys and what
 * they mean, with the public loaders they were checked against: docs/checkpoints.md.
 *
 * Everything epmoe's math depends on is read or checked: a key with a value epmoe does not
 * implement (softmax scoring, FP8 experts, unnormalized top-k weights, another activation) is
 * refused naming the file, the key, the value found and the ones accepted.
 */
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "common/checkpoint.h"

#define PATH_CAP 4096

typedef struct {
    const char *path; /* config.json, for messages */
    json_t *root;     /* the model's settings (text_config when the file nests them) */
} model_json;

static epmoe_status join(char *buf, const char *dir, const char *file) {
    int n = snprintf(buf, PATH_CAP, "%s/%s", dir, file);
    EPMOE_REQUIRE(n > 0 && n < PATH_CAP, EPMOE_ERR_INVALID_ARG, "path too long: %s/%s", dir, file);
    return EPMOE_OK;
}

/* An integer key; absent -> *out = def when def_ok, else an error. */
static epmoe_status get_int(const model_json *m, const char *key, int def_ok, int64_t def,
                            int64_t *out) {
    json_t *v = json_object_get(m->root, key);
    if (!v || json_is_null(v)) {
        EPMOE_REQUIRE(def_ok, EPMOE_ERR_FORMAT, "%s: \"%s\" is missing", m->path, key);
        *out = def;
        return EPMOE_OK;
    }
    EPMOE_REQUIRE(json_is_integer(v), EPMOE_ERR_FORMAT, "%s: \"%s\" is not an integer", m->path,
                  key);
    *out = (int64_t)json_integer_value(v);
    return EPMOE_OK;
}

static epmoe_status get_number(const model_json *m, const char *key, double def, double *out) {
    json_t *v = json_object_get(m->root, key);
    if (!v || json_is_null(v)) {
        *out = def;
        return EPMOE_OK;
    }
    EPMOE_REQUIRE(json_is_number(v), EPMOE_ERR_FORMAT, "%s: \"%s\" is not a number", m->path, key);
    *out = json_number_value(v);
    return EPMOE_OK;
}

/* A string key; absent -> def. */
static epmoe_status get_string(const model_json *m, json_t *obj, const char *key, const char *def,
                               const char **out) {
    json_t *v = obj ? json_object_get(obj, key) : NULL;
    if (!v || json_is_null(v)) {
        *out = def;
        return EPMOE_OK;
    }
    EPMOE_REQUIRE(json_is_string(v), EPMOE_ERR_FORMAT, "%s: \"%s\" is not a string", m->path, key);
    *out = json_string_value(v);
    return EPMOE_OK;
}

static epmoe_status set_int(epmoe_config *cfg, const model_json *m, const char *setting,
                            const char *key, int64_t value) {
    char text[32];
    snprintf(text, sizeof text, "%lld", (long long)value);
    epmoe_status st = epmoe_config_set(cfg, setting, text);
    if (st != EPMOE_OK) return epmoe_add_context(st, "%s: \"%s\"", m->path, key);
    return EPMOE_OK;
}

static epmoe_status set_number(epmoe_config *cfg, const model_json *m, const char *setting,
                               const char *key, double value) {
    char text[64];
    snprintf(text, sizeof text, "%.17g", value);
    epmoe_status st = epmoe_config_set(cfg, setting, text);
    if (st != EPMOE_OK) return epmoe_add_context(st, "%s: \"%s\"", m->path, key);
    return EPMOE_OK;
}

/* Integer keys copied as they are into settings: {config.json key, setting, optional, default}. */
typedef struct {
    const char *key, *setting;
    int def_ok;
    int64_t def;
} int_key;

static epmoe_status copy_ints(epmoe_config *cfg, const model_json *m, const int_key *keys,
                              size_t n) {
    for (size_t i = 0; i < n; i++) {
        int64_t v = 0;
        EPMOE_TRY(get_int(m, keys[i].key, keys[i].def_ok, keys[i].def, &v));
        EPMOE_TRY(set_int(cfg, m, keys[i].setting, keys[i].key, v));
    }
    return EPMOE_OK;
}

/* A number key (absent -> def) into the setting of the same name. */
static epmoe_status copy_number(epmoe_config *cfg, const model_json *m, const char *key,
                                double def) {
    double x = 0.0;
    EPMOE_TRY(get_number(m, key, def, &x));
    return set_number(cfg, m, key, key, x);
}

/* Hash-routed layers: "num_hash_layers" (the release) or "mlp_layer_types" (transformers:
 * "hash_moe" entries first, then "moe"). */
static epmoe_status read_hash_layers(const model_json *m, int64_t n_layers, int64_t *out) {
    json_t *types = json_object_get(m->root, "mlp_layer_types");
    int64_t from_count = -1, from_types = -1;
    if (json_object_get(m->root, "num_hash_layers"))
        EPMOE_TRY(get_int(m, "num_hash_layers", 0, 0, &from_count));
    if (types && !json_is_null(types)) {
        EPMOE_REQUIRE(json_is_array(types) && (int64_t)json_array_size(types) == n_layers,
                      EPMOE_ERR_FORMAT,
                      "%s: \"mlp_layer_types\" is not a list of num_hidden_layers (%lld) entries",
                      m->path, (long long)n_layers);
        from_types = 0;
        for (size_t i = 0; i < json_array_size(types); i++) {
            const char *t = json_string_value(json_array_get(types, i));
            int hash = t && strcmp(t, "hash_moe") == 0;
            EPMOE_REQUIRE(t && (hash || strcmp(t, "moe") == 0), EPMOE_ERR_FORMAT,
                          "%s: \"mlp_layer_types\"[%zu] is %s, expected \"hash_moe\" or \"moe\"",
                          m->path, i, t ? t : "not a string");
            EPMOE_REQUIRE(!hash || from_types == (int64_t)i, EPMOE_ERR_UNSUPPORTED,
                          "%s: \"mlp_layer_types\"[%zu] is \"hash_moe\" after a \"moe\" layer: "
                          "epmoe routes by hash the first n layers only",
                          m->path, i);
            from_types += hash;
        }
    }
    EPMOE_REQUIRE(from_count >= 0 || from_types >= 0, EPMOE_ERR_FORMAT,
                  "%s: neither \"num_hash_layers\" nor \"mlp_layer_types\" says which layers "
                  "route by token id",
                  m->path);
    EPMOE_REQUIRE(from_count < 0 || from_types < 0 || from_count == from_types, EPMOE_ERR_FORMAT,
                  "%s: \"num_hash_layers\" %lld disagrees with \"mlp_layer_types\" (%lld "
                  "hash_moe layers)",
                  m->path, (long long)from_count, (long long)from_types);
    *out = from_count >= 0 ? from_count : from_types;
    return EPMOE_OK;
}

/* NVIDIA's export names its format twice: config.json's quantization_config.moe_quant_algo
 * and hf_quant_config.json (ModelOpt's manifest). Either marks the NVFP4 layout; what they
 * say must be NVFP4 with 16-element groups. *nvfp4 is set when either is present. */
static epmoe_status read_nvfp4_marks(const model_json *m, const char *dir, json_t *quant,
                                     int *nvfp4) {
    *nvfp4 = 0;
    const char *moe_algo = NULL;
    EPMOE_TRY(get_string(m, quant, "moe_quant_algo", NULL, &moe_algo));
    if (moe_algo) {
        EPMOE_REQUIRE(strcmp(moe_algo, "NVFP4") == 0, EPMOE_ERR_UNSUPPORTED,
                      "%s: quantization_config.moe_quant_algo \"%s\": epmoe reads NVFP4 (NVIDIA's "
                      "re-quantization) or, without the key, DeepSeek's MXFP4 experts",
                      m->path, moe_algo);
        *nvfp4 = 1;
    }
    char path[PATH_CAP];
    EPMOE_TRY(join(path, dir, "hf_quant_config.json"));
    if (access(path, F_OK) != 0) return EPMOE_OK;
    json_error_t jerr;
    json_t *root = json_load_file(path, 0, &jerr);
    EPMOE_REQUIRE(root != NULL, EPMOE_ERR_FORMAT, "%s: not valid JSON: %s (line %d)", path,
                  jerr.text, jerr.line);
    json_t *q = json_object_get(root, "quantization");
    const char *algo = json_string_value(json_object_get(q, "quant_algo"));
    json_t *group = json_object_get(q, "group_size");
    epmoe_status st = EPMOE_OK;
    if (!algo || (strcmp(algo, "NVFP4") != 0 && strcmp(algo, "MIXED_PRECISION") != 0))
        st = epmoe_set_error(EPMOE_ERR_UNSUPPORTED, __FILE__, __LINE__,
                             "%s: quantization.quant_algo %s: epmoe reads NVFP4 experts "
                             "(\"NVFP4\", or \"MIXED_PRECISION\" with NVFP4 experts)",
                             path, algo ? algo : "is missing");
    else if (group && (!json_is_integer(group) || json_integer_value(group) != 16))
        st = epmoe_set_error(EPMOE_ERR_UNSUPPORTED, __FILE__, __LINE__,
                             "%s: quantization.group_size is not 16 (NVFP4 scales 16 elements)",
                             path);
    json_decref(root);
    EPMOE_TRY(st);
    *nvfp4 = 1;
    return EPMOE_OK;
}

/* gpt-oss's config.json (transformers' GptOssConfig; docs/checkpoints.md, "gpt-oss"): the
 * family's routing, activation and biases are fixed by the model type, the shapes and the
 * clamp are read. The experts must be the released MXFP4 (quantization_config.quant_method
 * "mxfp4"). */
static epmoe_status read_gptoss_settings(const model_json *m, json_t *file_root,
                                         epmoe_config *cfg) {
    static const int_key ints[] = {
        {"hidden_size", "hidden_size", 0, 0},          {"intermediate_size", "moe_inter_size", 0, 0},
        {"num_local_experts", "n_routed_experts", 0, 0}, {"num_hidden_layers", "n_layers", 0, 0},
        {"vocab_size", "vocab_size", 0, 0},
    };
    EPMOE_TRY(copy_ints(cfg, m, ints, sizeof ints / sizeof ints[0]));
    int64_t per_token = 0, legacy = -1;
    EPMOE_TRY(get_int(m, "num_experts_per_tok", 0, 0, &per_token));
    /* the release also carries the original code's name for it: the two must agree */
    EPMOE_TRY(get_int(m, "experts_per_token", 1, -1, &legacy));
    EPMOE_REQUIRE(legacy < 0 || legacy == per_token, EPMOE_ERR_FORMAT,
                  "%s: \"experts_per_token\" %lld disagrees with \"num_experts_per_tok\" %lld",
                  m->path, (long long)legacy, (long long)per_token);
    EPMOE_TRY(set_int(cfg, m, "top_k", "num_experts_per_tok", per_token));
    EPMOE_TRY(copy_number(cfg, m, "swiglu_limit", 7.0));   /* GptOssConfig's default */
    EPMOE_TRY(copy_number(cfg, m, "swiglu_alpha", 1.702)); /* newer transformers name it */
    const char *act = NULL;
    EPMOE_TRY(get_string(m, m->root, "hidden_act", "silu", &act));
    EPMOE_REQUIRE(strcmp(act, "silu") == 0, EPMOE_ERR_UNSUPPORTED,
                  "%s: hidden_act \"%s\": gpt-oss's experts are its clamped SwiGLU (config.json "
                  "says \"silu\")",
                  m->path, act);
    json_t *quant = json_object_get(m->root, "quantization_config");
    if (!quant) quant = json_object_get(file_root, "quantization_config");
    const char *method = NULL;
    EPMOE_TRY(get_string(m, quant, "quant_method", NULL, &method));
    EPMOE_REQUIRE(method && strcmp(method, "mxfp4") == 0, EPMOE_ERR_UNSUPPORTED,
                  "%s: quantization_config.quant_method %s: epmoe reads gpt-oss with its experts "
                  "in MXFP4 as released (\"mxfp4\"; a dequantized BF16 copy is not supported)",
                  m->path, method ? method : "is missing");
    /* What the model type fixes (gpt_oss/torch/model.py, transformers' GptOssTopKRouter and
     * GptOssExperts): */
    static const char *const fixed[][2] = {
        {"scoring", "topk_softmax"},   {"swiglu_variant", "gptoss"}, {"expert_bias", "1"},
        {"gate_up_order", "interleaved"}, {"n_shared_experts", "0"},  {"routed_scaling_factor", "1"},
        {"n_hash_layers", "0"},        {"n_mtp_layers", "0"},        {"n_groups", "1"},
        {"topk_groups", "1"},          {"weight_format", "mxfp4"},   {"checkpoint_layout", "gpt-oss"},
    };
    for (size_t i = 0; i < sizeof fixed / sizeof fixed[0]; i++)
        EPMOE_TRY(epmoe_config_set(cfg, fixed[i][0], fixed[i][1]));
    return EPMOE_OK;
}

/* Reads config.json's model settings (model json m) into cfg. */
static epmoe_status read_settings(const model_json *m, const char *dir, json_t *file_root,
                                  epmoe_config *cfg) {
    const char *model_type = NULL;
    EPMOE_TRY(get_string(m, m->root, "model_type", NULL, &model_type));
    if (!model_type) EPMOE_TRY(get_string(m, file_root, "model_type", NULL, &model_type));
    if (model_type && strcmp(model_type, "gpt_oss") == 0)
        return read_gptoss_settings(m, file_root, cfg);
    EPMOE_REQUIRE(model_type && strcmp(model_type, "deepseek_v4") == 0, EPMOE_ERR_UNSUPPORTED,
                  "%s: model_type %s: epmoe reads DeepSeek-V4 and gpt-oss model directories "
                  "(model_type \"deepseek_v4\" or \"gpt_oss\")",
                  m->path, model_type ? model_type : "is missing");

    static const int_key ints[] = {
        {"hidden_size", "hidden_size", 0, 0},
        {"moe_intermediate_size", "moe_inter_size", 0, 0},
        {"n_routed_experts", "n_routed_experts", 0, 0},
        {"num_experts_per_tok", "top_k", 0, 0},
        {"n_shared_experts", "n_shared_experts", 1, 0},
        {"vocab_size", "vocab_size", 0, 0},
        {"n_group", "n_groups", 1, 1},
        {"topk_group", "topk_groups", 1, 1},
    };
    EPMOE_TRY(copy_ints(cfg, m, ints, sizeof ints / sizeof ints[0]));
    EPMOE_TRY(copy_number(cfg, m, "routed_scaling_factor", 1.0));
    EPMOE_TRY(copy_number(cfg, m, "swiglu_limit", 0.0)); /* null or absent: no clamp */
    EPMOE_TRY(epmoe_config_set(cfg, "swiglu_variant", "dsv4"));

    const char *scoring = NULL;
    EPMOE_TRY(get_string(m, m->root, "scoring_func", "sqrtsoftplus", &scoring));
    EPMOE_REQUIRE(strcmp(scoring, "sqrtsoftplus") == 0 || strcmp(scoring, "sigmoid") == 0,
                  EPMOE_ERR_UNSUPPORTED,
                  "%s: scoring_func \"%s\": epmoe routes with sqrtsoftplus or sigmoid", m->path,
                  scoring);
    EPMOE_TRY(epmoe_config_set(cfg, "scoring", scoring));
    json_t *norm = json_object_get(m->root, "norm_topk_prob");
    EPMOE_REQUIRE(!norm || json_is_null(norm) || json_is_true(norm), EPMOE_ERR_UNSUPPORTED,
                  "%s: norm_topk_prob is not true: epmoe renormalizes the top-k weights "
                  "(DeepSeek-V4's rule for sqrtsoftplus and sigmoid scoring)",
                  m->path);
    const char *act = NULL;
    EPMOE_TRY(get_string(m, m->root, "hidden_act", "silu", &act));
    EPMOE_REQUIRE(strcmp(act, "silu") == 0, EPMOE_ERR_UNSUPPORTED,
                  "%s: hidden_act \"%s\": epmoe's experts are SwiGLU (silu)", m->path, act);
    const char *expert_dtype = NULL;
    EPMOE_TRY(get_string(m, m->root, "expert_dtype", "fp4", &expert_dtype));
    EPMOE_REQUIRE(strcmp(expert_dtype, "fp4") == 0, EPMOE_ERR_UNSUPPORTED,
                  "%s: expert_dtype \"%s\": epmoe serves FP4 routed experts (\"fp4\"; an FP8-expert "
                  "checkpoint such as a -Base release is not supported)",
                  m->path, expert_dtype);

    int64_t n_hidden = 0, n_mtp = 0, n_hash = 0;
    EPMOE_TRY(get_int(m, "num_hidden_layers", 0, 0, &n_hidden));
    EPMOE_TRY(get_int(m, "num_nextn_predict_layers", 1, 0, &n_mtp));
    EPMOE_REQUIRE(n_hidden >= 1 && n_mtp >= 0, EPMOE_ERR_FORMAT,
                  "%s: num_hidden_layers %lld, num_nextn_predict_layers %lld", m->path,
                  (long long)n_hidden, (long long)n_mtp);
    EPMOE_TRY(read_hash_layers(m, n_hidden, &n_hash));
    EPMOE_TRY(set_int(cfg, m, "n_layers", "num_hidden_layers", n_hidden + n_mtp));
    EPMOE_TRY(set_int(cfg, m, "n_mtp_layers", "num_nextn_predict_layers", n_mtp));
    EPMOE_TRY(set_int(cfg, m, "n_hash_layers", "num_hash_layers", n_hash));

    json_t *quant = json_object_get(m->root, "quantization_config");
    if (!quant) quant = json_object_get(file_root, "quantization_config");
    int64_t block = 128;
    json_t *wbs = json_object_get(quant, "weight_block_size");
    if (wbs) {
        EPMOE_REQUIRE(json_is_array(wbs) && json_array_size(wbs) == 2 &&
                          json_is_integer(json_array_get(wbs, 0)) &&
                          json_integer_value(json_array_get(wbs, 0)) ==
                              json_integer_value(json_array_get(wbs, 1)),
                      EPMOE_ERR_UNSUPPORTED,
                      "%s: quantization_config.weight_block_size is not [b, b] (FP8 blocks must "
                      "be square)",
                      m->path);
        block = (int64_t)json_integer_value(json_array_get(wbs, 0));
    }
    EPMOE_TRY(set_int(cfg, m, "fp8_block_size", "quantization_config.weight_block_size", block));
    int nvfp4 = 0;
    EPMOE_TRY(read_nvfp4_marks(m, dir, quant, &nvfp4));
    EPMOE_TRY(epmoe_config_set(cfg, "weight_format", nvfp4 ? "nvfp4" : "mxfp4"));
    EPMOE_TRY(epmoe_config_set(cfg, "checkpoint_layout", nvfp4 ? "nvidia-nvfp4" : "deepseek"));
    return EPMOE_OK;
}

/* gpt-oss: the first layer's router and fused gate/up blocks have config.json's shapes, the last
 * layer exists and no layer after it. */
static epmoe_status check_gptoss_tensors(const epmoe_st_set *set, const char *config_path,
                                         const epmoe_config *cfg) {
    char name[160];
    const epmoe_st_tensor *t = NULL;
    const epmoe_st_file *file = NULL;
    const int64_t E = cfg->n_routed_experts, H = cfg->hidden_size, I = cfg->moe_inter_size;
    const char *where = epmoe_st_set_index_path(set) ? epmoe_st_set_index_path(set)
                                                     : epmoe_st_set_path(set);
    EPMOE_TRY(epmoe_ckpt_gate_name(name, sizeof name, cfg, 0, "weight"));
    EPMOE_TRY(epmoe_st_set_lookup(set, name, &t, &file));
    EPMOE_REQUIRE(t != NULL, EPMOE_ERR_NOT_FOUND,
                  "%s: tensor %s not found: not a gpt-oss model directory (%s)", where, name,
                  config_path);
    EPMOE_REQUIRE(t->ndim == 2 && t->shape[0] == E && t->shape[1] == H, EPMOE_ERR_FORMAT,
                  "%s (num_local_experts %lld, hidden_size %lld) disagrees with the tensors: %s: "
                  "%s has shape [%lld, %lld], expected [%lld, %lld]",
                  config_path, (long long)E, (long long)H, epmoe_st_path(file), name,
                  (long long)(t->ndim > 0 ? t->shape[0] : 0),
                  (long long)(t->ndim > 1 ? t->shape[1] : 0), (long long)E, (long long)H);
    EPMOE_TRY(epmoe_ckpt_stacked_expert_name(name, sizeof name, cfg, 0, "gate_up_proj", "blocks"));
    EPMOE_TRY(epmoe_st_set_lookup(set, name, &t, &file));
    EPMOE_REQUIRE(t != NULL, EPMOE_ERR_NOT_FOUND, "%s: tensor %s not found", where, name);
    const int64_t want[4] = {E, 2 * I, H / 32, 16};
    int same = t->ndim == 4;
    for (int d = 0; same && d < 4; d++) same = t->shape[d] == want[d];
    EPMOE_REQUIRE(same, EPMOE_ERR_FORMAT,
                  "%s (num_local_experts %lld, intermediate_size %lld, hidden_size %lld) "
                  "disagrees with the tensors: %s: %s has shape [%lld, %lld, %lld, %lld], "
                  "expected [%lld, %lld, %lld, 16] (2 x intermediate_size rows, hidden_size/32 "
                  "blocks of 16 bytes)",
                  config_path, (long long)E, (long long)I, (long long)H, epmoe_st_path(file), name,
                  (long long)(t->ndim > 0 ? t->shape[0] : 0),
                  (long long)(t->ndim > 1 ? t->shape[1] : 0),
                  (long long)(t->ndim > 2 ? t->shape[2] : 0),
                  (long long)(t->ndim > 3 ? t->shape[3] : 0), (long long)E, (long long)(2 * I),
                  (long long)(H / 32));
    for (int64_t layer = cfg->n_layers - 1; layer <= cfg->n_layers; layer++) {
        EPMOE_TRY(epmoe_ckpt_gate_name(name, sizeof name, cfg, layer, "weight"));
        int want_it = layer < cfg->n_layers;
        EPMOE_REQUIRE(epmoe_st_set_contains(set, name) == want_it, EPMOE_ERR_FORMAT,
                      "%s (num_hidden_layers %lld) disagrees with the tensors: %s %s", config_path,
                      (long long)cfg->n_layers, name,
                      want_it ? "is missing" : "exists (more layers than the config says)");
    }
    return EPMOE_OK;
}

/* The tensors must be the model config.json describes: the first layer's gate and first expert
 * have its shapes, the last layer exists and no layer after it (shards are opened for headers
 * only). */
static epmoe_status check_against_tensors(const epmoe_st_set *set, const char *config_path,
                                          epmoe_config *cfg) {
    if (cfg->checkpoint_layout == EPMOE_LAYOUT_GPT_OSS)
        return check_gptoss_tensors(set, config_path, cfg);
    char name[160];
    const epmoe_st_tensor *t = NULL;
    const epmoe_st_file *file = NULL;
    int64_t E = cfg->n_routed_experts, H = cfg->hidden_size, I = cfg->moe_inter_size;
    EPMOE_TRY(epmoe_ckpt_gate_name(name, sizeof name, cfg, 0, "weight"));
    EPMOE_TRY(epmoe_st_set_lookup(set, name, &t, &file));
    EPMOE_REQUIRE(t != NULL, EPMOE_ERR_NOT_FOUND,
                  "%s: tensor %s not found: not a DeepSeek-V4 model directory (%s)",
                  epmoe_st_set_index_path(set) ? epmoe_st_set_index_path(set)
                                               : epmoe_st_set_path(set),
                  name, config_path);
    EPMOE_REQUIRE(t->ndim == 2 && t->shape[0] == E && t->shape[1] == H, EPMOE_ERR_FORMAT,
                  "%s (n_routed_experts %lld, hidden_size %lld) disagrees with the tensors: "
                  "%s: %s has shape [%lld, %lld], expected [%lld, %lld]",
                  config_path, (long long)E, (long long)H, epmoe_st_path(file), name,
                  (long long)(t->ndim > 0 ? t->shape[0] : 0),
                  (long long)(t->ndim > 1 ? t->shape[1] : 0), (long long)E, (long long)H);
    EPMOE_TRY(epmoe_ckpt_expert_name(name, sizeof name, cfg, 0, 0, "w1", "weight"));
    EPMOE_TRY(epmoe_st_set_lookup(set, name, &t, &file));
    EPMOE_REQUIRE(t != NULL, EPMOE_ERR_NOT_FOUND, "%s: tensor %s not found",
                  epmoe_st_set_path(set), name);
    EPMOE_REQUIRE(t->ndim == 2 && t->shape[0] == I && t->shape[1] == H / 2, EPMOE_ERR_FORMAT,
                  "%s (moe_intermediate_size %lld, hidden_size %lld) disagrees with the "
                  "tensors: %s: %s has shape [%lld, %lld], expected [%lld, %lld] (two FP4 codes "
                  "a byte)",
                  config_path, (long long)I, (long long)H, epmoe_st_path(file), name,
                  (long long)(t->ndim > 0 ? t->shape[0] : 0),
                  (long long)(t->ndim > 1 ? t->shape[1] : 0), (long long)I, (long long)(H / 2));
    const int64_t n_main = cfg->n_layers - cfg->n_mtp_layers;
    for (int64_t layer = n_main - 1; layer <= n_main; layer++) {
        char gate[64];
        snprintf(gate, sizeof gate, "layers.%lld.ffn.gate.weight", (long long)layer);
        int want = layer < n_main;
        EPMOE_REQUIRE(epmoe_st_set_contains(set, gate) == want, EPMOE_ERR_FORMAT,
                      "%s (num_hidden_layers %lld) disagrees with the tensors: %s %s",
                      config_path, (long long)n_main, gate,
                      want ? "is missing" : "exists (more layers than the config says)");
    }
    /* The MTP block: served when its MoE tensors are there (some exports drop it). */
    int64_t mtp_present = 0;
    while (mtp_present < cfg->n_mtp_layers) {
        char gate[64];
        snprintf(gate, sizeof gate, "mtp.%lld.ffn.gate.weight", (long long)mtp_present);
        if (!epmoe_st_set_contains(set, gate)) break;
        mtp_present++;
    }
    cfg->n_layers -= cfg->n_mtp_layers - mtp_present;
    cfg->n_mtp_layers = mtp_present;
    return EPMOE_OK;
}

int epmoe_ckpt_is_model_dir(const epmoe_st_set *set) {
    const char *dir = epmoe_st_set_dir(set);
    char path[PATH_CAP];
    return dir && join(path, dir, "config.json") == EPMOE_OK && access(path, F_OK) == 0;
}

epmoe_status epmoe_config_from_model_dir(const epmoe_st_set *set, epmoe_config *cfg) {
    const char *dir = epmoe_st_set_dir(set);
    EPMOE_REQUIRE(dir != NULL, EPMOE_ERR_INVALID_ARG, "%s: not a directory",
                  epmoe_st_set_path(set));
    char path[PATH_CAP];
    EPMOE_TRY(join(path, dir, "config.json"));
    json_error_t jerr;
    json_t *root = json_load_file(path, 0, &jerr);
    EPMOE_REQUIRE(root != NULL, EPMOE_ERR_FORMAT, "%s: not valid JSON: %s (line %d)", path,
                  jerr.text, jerr.line);
    model_json m = {path, root};
    json_t *text = json_object_get(root, "text_config");
    if (json_is_object(text)) m.root = text;
    /* every model setting comes from this directory: none of another family's may survive */
    epmoe_config_model_defaults(cfg);
    epmoe_status st = json_is_object(root)
                          ? read_settings(&m, dir, root, cfg)
                          : epmoe_set_error(EPMOE_ERR_FORMAT, __FILE__, __LINE__,
                                            "%s: not a JSON object", path);
    json_decref(root);
    EPMOE_TRY(st);
    /* the directory's name (e.g. DeepSeek-V4-Flash) says where the settings came from */
    char name[32];
    size_t len = strlen(dir);
    while (len > 1 && dir[len - 1] == '/') len--;
    size_t start = len;
    while (start > 0 && dir[start - 1] != '/') start--;
    snprintf(name, sizeof name, "%.*s", (int)(len - start), dir + start);
    EPMOE_TRY(epmoe_config_set(cfg, "preset", name));
    st = epmoe_config_validate(cfg);
    if (st != EPMOE_OK) return epmoe_add_context(st, "%s", path);
    EPMOE_TRY(check_against_tensors(set, path, cfg));
    return epmoe_config_validate(cfg);
}
