/* Real model directories (DeepSeek's layout, NVIDIA's NVFP4 one and gpt-oss's, docs/checkpoints.md), as
 * epmoe-gen writes them: config.json read back into the settings; every layer (the MTP block's
 * too) loads the same weights as the epmoe layout of the same seed, bit for bit; a rank opens
 * only the shards that hold its tensors and never reads the embedding or head shards; MXFP4
 * with all-zero blocks and a wide span loads and equals the reference; and a catalogue of
 * broken directories, each refused with a message naming the file and the tensor, nothing
 * left allocated, next to the variations the loader accepts; and the generator never writes
 * through a symlink planted at one of its file names. gpt-oss: the released layout loads what
 * the epmoe layout of the same seed loads; a directory written here byte by byte proves the
 * gate/up interleaving, the biases and the activation against float64; broken ones are
 * refused naming the file and the tensor. */
#include <check.h>
#include <dirent.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/checkpoint.h"
#include "common/config.h"
#include "common/formats.h"
#include "common/layout.h"
#include "common/nvfp4.h"
#include "common/safetensors.h"
#include "tests/ref/ref_layer.h"
#include "tests/support/test_support.h"
#include "worker/expert_weights.h"
#include "worker/experts.h"

#define PATH_CAP 4200
#define N_LAYERS 4 /* layer 0 hash-routed, 1-2 score-routed, 3 the MTP block's (mtp.0) */

static char deepseek_dir[PATH_CAP], nvidia_dir[PATH_CAP], epmoe_mx_dir[PATH_CAP],
    epmoe_nv_dir[PATH_CAP];

static void small_config(epmoe_config *cfg, const char *layout, const char *format) {
    epmoe_config_defaults(cfg);
    const char *settings[][2] = {
        {"hidden_size", "64"},    {"moe_inter_size", "32"}, {"n_routed_experts", "16"},
        {"top_k", "4"},           {"n_layers", "4"},        {"n_mtp_layers", "1"},
        {"n_hash_layers", "1"},   {"vocab_size", "64"},     {"fp8_block_size", "32"},
        {"seed", "77"},           {"routed_scaling_factor", "2.5"},
        {"checkpoint_layout", layout}, {"weight_format", format}};
    for (size_t i = 0; i < sizeof settings / sizeof settings[0]; i++)
        ck_assert_msg(epmoe_config_set(cfg, settings[i][0], settings[i][1]) == EPMOE_OK, "%s",
                      epmoe_last_error());
}

static void remove_dir(const char *dir) {
    DIR *d = opendir(dir);
    if (!d) return;
    struct dirent *ent;
    while ((ent = readdir(d)) != NULL) {
        if (ent->d_name[0] == '.') continue;
        char p[2 * PATH_CAP];
        snprintf(p, sizeof p, "%s/%s", dir, ent->d_name);
        unlink(p);
    }
    closedir(d);
    rmdir(dir);
}

static void generate(const char *name, const char *layout, const char *format, char *dir) {
    snprintf(dir, PATH_CAP, "%s", epmoe_test_data_path(name));
    remove_dir(dir);
    epmoe_config cfg;
    small_config(&cfg, layout, format);
    epmoe_gen_options opt = {.shard_bytes = 40000, .threads = 2};
    epmoe_gen_stats stats = {0};
    ck_assert_msg(epmoe_ckpt_generate(&cfg, &opt, dir, &stats) == EPMOE_OK, "%s: %s", name,
                  epmoe_last_error());
    ck_assert_int_eq(stats.layers, N_LAYERS);
}

static void setup_dirs(void) {
    generate("md_deepseek", "deepseek", "mxfp4", deepseek_dir);
    generate("md_nvidia", "nvidia-nvfp4", "nvfp4", nvidia_dir);
    generate("md_epmoe_mx", "epmoe", "mxfp4", epmoe_mx_dir);
    generate("md_epmoe_nv", "epmoe", "nvfp4", epmoe_nv_dir);
}

static epmoe_st_set *open_ckpt(const char *dir, epmoe_config *cfg) {
    epmoe_st_set *s = NULL;
    ck_assert_msg(epmoe_st_set_open(dir, &s) == EPMOE_OK, "%s", epmoe_last_error());
    epmoe_config_defaults(cfg);
    ck_assert_msg(epmoe_config_from_checkpoint(s, cfg) == EPMOE_OK, "%s", epmoe_last_error());
    return s;
}

/* ---- reading a directory ---- */

START_TEST(test_config_json) {
    const char *dirs[2] = {deepseek_dir, nvidia_dir};
    for (int i = 0; i < 2; i++) {
        epmoe_config cfg, want;
        small_config(&want, i ? "nvidia-nvfp4" : "deepseek", i ? "nvfp4" : "mxfp4");
        epmoe_st_set *s = open_ckpt(dirs[i], &cfg);
        ck_assert_int_eq(cfg.hidden_size, 64);
        ck_assert_int_eq(cfg.moe_inter_size, 32);
        ck_assert_int_eq(cfg.n_routed_experts, 16);
        ck_assert_int_eq(cfg.top_k, 4);
        ck_assert_int_eq(cfg.n_shared_experts, 1);
        ck_assert(cfg.routed_scaling_factor == 2.5);
        ck_assert_int_eq(cfg.scoring, EPMOE_SCORING_SQRTSOFTPLUS);
        ck_assert(cfg.swiglu_limit == want.swiglu_limit);
        ck_assert_int_eq(cfg.swiglu_variant, EPMOE_SWIGLU_DSV4);
        ck_assert_int_eq(cfg.n_layers, N_LAYERS);
        ck_assert_int_eq(cfg.n_mtp_layers, 1);
        ck_assert_int_eq(cfg.n_hash_layers, 1);
        ck_assert_int_eq(cfg.vocab_size, 64);
        ck_assert_int_eq(cfg.fp8_block_size, 32);
        ck_assert_int_eq(cfg.checkpoint_layout, want.checkpoint_layout);
        ck_assert_int_eq(cfg.weight_format, want.weight_format);
        ck_assert_str_eq(cfg.preset, i ? "md_nvidia" : "md_deepseek");
        /* only the first layer's shards, for the headers config.json is checked against */
        ck_assert(epmoe_st_set_files_open(s) >= 1 && epmoe_st_set_files_open(s) <= 2);
        epmoe_st_set_close(s);
    }
}
END_TEST

static void expect_same_bytes(const void *a, const void *b, size_t n, const char *what,
                              int64_t layer) {
    ck_assert_msg((a == NULL) == (b == NULL), "layer %lld %s: present in one only",
                  (long long)layer, what);
    if (a) ck_assert_msg(memcmp(a, b, n) == 0, "layer %lld %s differ", (long long)layer, what);
}

/* The real layout and the epmoe layout of the same seed load the same weights, bit for bit. */
START_TEST(test_same_weights_as_epmoe_layout) {
    const char *real[2] = {deepseek_dir, nvidia_dir}, *own[2] = {epmoe_mx_dir, epmoe_nv_dir};
    for (int i = 0; i < 2; i++) {
        epmoe_config cr, co;
        epmoe_st_set *sr = open_ckpt(real[i], &cr), *so = open_ckpt(own[i], &co);
        epmoe_expert_slice all = {0, 16};
        for (int64_t L = 0; L < N_LAYERS; L++) {
            epmoe_layer_weights a, b;
            ck_assert_msg(epmoe_layer_weights_load(sr, &cr, L, &all, &a) == EPMOE_OK, "%s",
                          epmoe_last_error());
            ck_assert_msg(epmoe_layer_weights_load(so, &co, L, &all, &b) == EPMOE_OK, "%s",
                          epmoe_last_error());
            const int64_t H = 64, I = 32, E = 16, Is = 32;
            expect_same_bytes(a.gate_weight, b.gate_weight, E * H * 4, "gate", L);
            expect_same_bytes(a.gate_bias, b.gate_bias, E * 4, "bias", L);
            expect_same_bytes(a.tid2eid, b.tid2eid, 64 * 4 * 4, "tid2eid", L);
            ck_assert((L == 0) == (a.tid2eid != NULL));
            expect_same_bytes(a.shared_w13, b.shared_w13, 2 * Is * H * 4, "shared_w13", L);
            expect_same_bytes(a.shared_w2, b.shared_w2, H * Is * 4, "shared_w2", L);
            expect_same_bytes(a.w13_codes, b.w13_codes, E * 2 * I * H / 2, "w13 codes", L);
            expect_same_bytes(a.w13_sf, b.w13_sf, E * 2 * I * H / 16, "w13 sf", L);
            expect_same_bytes(a.w2_codes, b.w2_codes, E * H * I / 2, "w2 codes", L);
            expect_same_bytes(a.w2_sf, b.w2_sf, E * H * I / 16, "w2 sf", L);
            expect_same_bytes(a.w13_scale_2, b.w13_scale_2, 2 * E * 4, "w13 scale_2", L);
            expect_same_bytes(a.w2_scale_2, b.w2_scale_2, E * 4, "w2 scale_2", L);
            expect_same_bytes(a.w13_input_scale, b.w13_input_scale, E * 4, "w13 input", L);
            expect_same_bytes(a.w2_input_scale, b.w2_input_scale, E * 4, "w2 input", L);
            ck_assert(a.w13_input_scale[3] > 0 || i == 0); /* NVFP4 carries calibration */
            ck_assert_int_gt(a.checkpoint_bytes, E * 3 * I * H / 2);
            epmoe_layer_weights_free(&a);
            epmoe_layer_weights_free(&b);
        }
        epmoe_st_set_close(sr);
        epmoe_st_set_close(so);
    }
}
END_TEST

static json_t *load_json(const char *dir, const char *file);

/* Whether tensor `name` is one a rank loading experts [e0, e1) of `layer` reads. */
static int needed_by(const char *name, int64_t layer, int64_t e0, int64_t e1) {
    char prefix[64];
    snprintf(prefix, sizeof prefix, "layers.%lld.ffn.", (long long)layer);
    if (strncmp(name, prefix, strlen(prefix)) != 0) return 0;
    const char *rest = name + strlen(prefix);
    if (strncmp(rest, "gate.", 5) == 0 || strncmp(rest, "shared_experts.", 15) == 0) return 1;
    long long e;
    return sscanf(rest, "experts.%lld.", &e) == 1 && e >= e0 && e < e1;
}

START_TEST(test_opens_only_its_shards) {
    epmoe_config cfg;
    epmoe_st_set *s = open_ckpt(deepseek_dir, &cfg);
    epmoe_expert_slice slice = {4, 8};
    epmoe_layer_weights w;
    ck_assert_msg(epmoe_layer_weights_load(s, &cfg, 2, &slice, &w) == EPMOE_OK, "%s",
                  epmoe_last_error());
    epmoe_layer_weights_free(&w);

    json_t *root = load_json(deepseek_dir, EPMOE_ST_INDEX_FILE);
    json_t *map = json_object_get(root, "weight_map");
    const char *name;
    json_t *v;
    int n_needed = 0;
    for (int f = 1; f <= epmoe_st_set_file_count(s); f++) {
        char shard[64];
        snprintf(shard, sizeof shard, "model-%05d-of-%05d.safetensors", f,
                 epmoe_st_set_file_count(s));
        int needed = 0;
        json_object_foreach(map, name, v) {
            if (strcmp(json_string_value(v), shard) != 0) continue;
            /* what config.json is checked against: the first layer's gate and expert 0 */
            needed |= needed_by(name, 2, 4, 8) || strcmp(name, "layers.0.ffn.gate.weight") == 0 ||
                      strcmp(name, "layers.0.ffn.experts.0.w1.weight") == 0;
        }
        n_needed += needed;
        ck_assert_msg(epmoe_st_set_file_is_open(s, shard) == needed, "%s: open %d, needed %d",
                      shard, epmoe_st_set_file_is_open(s, shard), needed);
    }
    ck_assert_int_eq(epmoe_st_set_files_open(s), n_needed);
    ck_assert_int_lt(n_needed, epmoe_st_set_file_count(s) / 2);
    json_decref(root);
    epmoe_st_set_close(s);
}
END_TEST

/* ---- a scratch copy of a directory to break ---- */

static char scratch_dir[PATH_CAP];

static void copy_file(const char *src, const char *dst) {
    FILE *in = fopen(src, "rb"), *out = fopen(dst, "wb");
    ck_assert_msg(in && out, "copy %s -> %s", src, dst);
    char buf[1 << 16];
    size_t n;
    while ((n = fread(buf, 1, sizeof buf, in)) > 0) ck_assert_uint_eq(fwrite(buf, 1, n, out), n);
    fclose(in);
    fclose(out);
}

static const char *scratch_copy(const char *src) {
    snprintf(scratch_dir, sizeof scratch_dir, "%s", epmoe_test_data_path("md_scratch"));
    remove_dir(scratch_dir);
    ck_assert_int_eq(mkdir(scratch_dir, 0777), 0);
    DIR *d = opendir(src);
    ck_assert_ptr_nonnull(d);
    struct dirent *ent;
    while ((ent = readdir(d)) != NULL) {
        if (ent->d_name[0] == '.') continue;
        char a[2 * PATH_CAP], b[2 * PATH_CAP];
        snprintf(a, sizeof a, "%s/%s", src, ent->d_name);
        snprintf(b, sizeof b, "%s/%s", scratch_dir, ent->d_name);
        copy_file(a, b);
    }
    closedir(d);
    return scratch_dir;
}

static void path_in(char *out, const char *dir, const char *file) {
    int n = snprintf(out, PATH_CAP, "%s/%s", dir, file);
    ck_assert(n > 0 && n < PATH_CAP);
}

static json_t *load_json(const char *dir, const char *file) {
    char p[PATH_CAP];
    path_in(p, dir, file);
    json_t *j = json_load_file(p, 0, NULL);
    ck_assert_msg(j != NULL, "%s", p);
    return j;
}

static void save_json(json_t *j, const char *dir, const char *file) {
    char p[PATH_CAP];
    path_in(p, dir, file);
    ck_assert_int_eq(json_dump_file(j, p, JSON_INDENT(1)), 0);
    json_decref(j);
}

/* The shard file (no directory) the index gives for a tensor. */
static const char *shard_of(const char *dir, const char *tensor) {
    static char shard[256];
    json_t *idx = load_json(dir, EPMOE_ST_INDEX_FILE);
    const char *s = json_string_value(json_object_get(json_object_get(idx, "weight_map"), tensor));
    ck_assert_msg(s != NULL, "%s not in the index", tensor);
    snprintf(shard, sizeof shard, "%s", s);
    json_decref(idx);
    return shard;
}

/* One tensor of a shard, copied so that it can be changed before the shard is rewritten. */
typedef struct {
    char name[160];
    epmoe_dtype dtype;
    int ndim;
    int64_t shape[EPMOE_MAX_DIMS];
    unsigned char *data;
    size_t nbytes;
    int drop;
} tensor_copy;

typedef void (*edit_fn)(tensor_copy *t, const void *arg);

/* Rewrites the shard holding `tensor`, applying edit to that tensor (all others copied). */
static void edit_tensor(const char *dir, const char *tensor, edit_fn edit, const void *arg) {
    char path[PATH_CAP];
    path_in(path, dir, shard_of(dir, tensor));
    epmoe_st_file *f = NULL;
    ck_assert_msg(epmoe_st_open(path, &f) == EPMOE_OK, "%s", epmoe_last_error());
    int n = epmoe_st_count(f), found = 0;
    tensor_copy *copies = calloc((size_t)n, sizeof *copies);
    epmoe_st_writer *w = NULL;
    ck_assert_int_eq(epmoe_st_writer_create(&w), EPMOE_OK);
    ck_assert_int_eq(epmoe_st_writer_metadata(w, "format", "pt"), EPMOE_OK);
    for (int i = 0; i < n; i++) {
        const epmoe_st_tensor *t = epmoe_st_at(f, i);
        tensor_copy *c = &copies[i];
        snprintf(c->name, sizeof c->name, "%s", t->name);
        c->dtype = t->dtype;
        c->ndim = t->ndim;
        memcpy(c->shape, t->shape, sizeof c->shape);
        c->nbytes = t->nbytes;
        c->data = malloc(t->nbytes + 64);
        memcpy(c->data, t->data, t->nbytes);
        if (strcmp(c->name, tensor) == 0) {
            found = 1;
            edit(c, arg);
        }
        if (c->drop) continue;
        ck_assert_msg(epmoe_st_writer_add(w, c->name, c->dtype, c->ndim, c->shape, c->data) ==
                          EPMOE_OK,
                      "%s", epmoe_last_error());
    }
    ck_assert_msg(found, "%s not in %s", tensor, path);
    epmoe_st_close(f);
    ck_assert_msg(epmoe_st_writer_finish(w, path) == EPMOE_OK, "%s", epmoe_last_error());
    epmoe_st_writer_free(w);
    for (int i = 0; i < n; i++) free(copies[i].data);
    free(copies);
}

static void set_dtype(tensor_copy *t, const void *arg) { t->dtype = *(const epmoe_dtype *)arg; }
static void set_shape(tensor_copy *t, const void *arg) {
    const int64_t *shape = arg; /* {ndim, d0, d1} */
    size_t numel = 1;
    t->ndim = (int)shape[0];
    for (int d = 0; d < t->ndim; d++) numel *= (size_t)(t->shape[d] = shape[1 + d]);
    t->nbytes = numel * epmoe_dtype_size(t->dtype); /* the data keeps its first bytes */
}
static void drop(tensor_copy *t, const void *arg) {
    (void)arg;
    t->drop = 1;
}
static void set_byte(tensor_copy *t, const void *arg) {
    const int *at_value = arg;
    t->data[at_value[0]] = (unsigned char)at_value[1];
}
static void set_i64(tensor_copy *t, const void *arg) {
    const int64_t *at_value = arg;
    memcpy(t->data + 8 * at_value[0], &at_value[1], 8);
}
static void transpose(tensor_copy *t, const void *arg) {
    (void)arg;
    int64_t r = t->shape[0], c = t->shape[1];
    size_t elem = epmoe_dtype_size(t->dtype);
    unsigned char *out = malloc(t->nbytes + 64);
    for (int64_t i = 0; i < r; i++)
        for (int64_t j = 0; j < c; j++) memcpy(out + (j * r + i) * elem, t->data + (i * c + j) * elem, elem);
    free(t->data);
    t->data = out;
    t->shape[0] = c;
    t->shape[1] = r;
}
/* I64 tid2eid -> I32 */
static void narrow_ids(tensor_copy *t, const void *arg) {
    (void)arg;
    size_t n = t->nbytes / 8;
    for (size_t i = 0; i < n; i++) {
        int64_t v;
        memcpy(&v, t->data + 8 * i, 8);
        int32_t v32 = (int32_t)v;
        memcpy(t->data + 4 * i, &v32, 4);
    }
    t->dtype = EPMOE_DTYPE_I32;
    t->nbytes = n * 4;
}
/* UE8M0 block scales -> the F32 they stand for (FP8 checkpoints without ue8m0 scale_fmt) */
static void scales_to_f32(tensor_copy *t, const void *arg) {
    (void)arg;
    size_t n = t->nbytes;
    unsigned char *out = malloc(4 * n + 64);
    for (size_t i = 0; i < n; i++) {
        float v = ldexpf(1.0f, (int)t->data[i] - 127);
        memcpy(out + 4 * i, &v, 4);
    }
    free(t->data);
    t->data = out;
    t->dtype = EPMOE_DTYPE_F32;
    t->nbytes = 4 * n;
}

/* Drops a tensor from its shard and from the index. */
static void drop_everywhere(const char *dir, const char *tensor) {
    edit_tensor(dir, tensor, drop, NULL);
    json_t *idx = load_json(dir, EPMOE_ST_INDEX_FILE);
    json_object_del(json_object_get(idx, "weight_map"), tensor);
    save_json(idx, dir, EPMOE_ST_INDEX_FILE);
}

/* Opens dir, reads its settings and loads every layer whole; returns the first failure. The
 * weights of a failed load must be all NULL. */
static epmoe_status load_dir(const char *dir, epmoe_layer_weights *loaded /* [N_LAYERS] */) {
    epmoe_st_set *s = NULL;
    epmoe_status st = epmoe_st_set_open(dir, &s);
    if (st != EPMOE_OK) return st;
    epmoe_config cfg;
    epmoe_config_defaults(&cfg);
    st = epmoe_config_from_checkpoint(s, &cfg);
    epmoe_expert_slice all = {0, cfg.n_routed_experts};
    for (int64_t L = 0; st == EPMOE_OK && L < cfg.n_layers; L++) {
        epmoe_layer_weights w;
        memset(&w, 0x5a, sizeof w); /* poisoned: the loader must clear it */
        st = epmoe_layer_weights_load(s, &cfg, L, &all, &w);
        if (st != EPMOE_OK) {
            char saved[1024];
            snprintf(saved, sizeof saved, "%s", epmoe_last_error());
            ck_assert_msg(!w.gate_weight && !w.gate_bias && !w.tid2eid && !w.shared_w13 &&
                              !w.w13_codes && !w.w13_sf && !w.w2_codes && !w.w13_scale_2,
                          "layer %lld: a failed load left weights allocated", (long long)L);
            epmoe_set_error(st, __FILE__, __LINE__, "%s", saved);
            break;
        }
        if (loaded) loaded[L] = w;
        else epmoe_layer_weights_free(&w);
    }
    epmoe_st_set_close(s);
    return st;
}

/* ---- the catalogue ---- */

typedef enum { BASE_DEEPSEEK, BASE_NVIDIA } base_dir;

typedef struct {
    const char *what;
    base_dir base;
    void (*breaks)(const char *dir);
    epmoe_status expect;
    const char *file;    /* basename the message names (NULL: the shard of `tensor`; a tensor
                          * name: that tensor's shard) */
    const char *tensor;  /* the tensor it names */
    const char *detail;  /* and this */
} broken_case;

#define X1W "layers.1.ffn.experts.10.w2.weight"

/* The shard of X1W holds layer 1's tensors only (so the message names one of those). */
static void check_layer1_shard(const char *dir) {
    const char *shard = shard_of(dir, X1W);
    json_t *idx = load_json(dir, EPMOE_ST_INDEX_FILE);
    const char *name;
    json_t *v;
    json_object_foreach(json_object_get(idx, "weight_map"), name, v)
        if (strcmp(json_string_value(v), shard) == 0)
            ck_assert_msg(strncmp(name, "layers.1.", 9) == 0, "%s holds %s", shard, name);
    json_decref(idx);
}

static void missing_shard(const char *dir) {
    check_layer1_shard(dir);
    char p[PATH_CAP];
    path_in(p, dir, shard_of(dir, X1W));
    ck_assert_int_eq(unlink(p), 0);
}
static void truncated_shard(const char *dir) {
    check_layer1_shard(dir);
    char p[PATH_CAP];
    path_in(p, dir, shard_of(dir, X1W));
    struct stat sb;
    ck_assert_int_eq(stat(p, &sb), 0);
    ck_assert_int_eq(truncate(p, sb.st_size / 2), 0);
}
static void index_names_missing_tensor(const char *dir) {
    json_t *idx = load_json(dir, EPMOE_ST_INDEX_FILE);
    json_t *map = json_object_get(idx, "weight_map");
    json_object_set_new(map, "layers.2.ffn.experts.5.w3.scale",
                        json_string(json_string_value(json_object_get(map, "embed.weight"))));
    save_json(idx, dir, EPMOE_ST_INDEX_FILE);
}
static void index_lacks_tensor(const char *dir) {
    json_t *idx = load_json(dir, EPMOE_ST_INDEX_FILE);
    json_object_del(json_object_get(idx, "weight_map"), "layers.2.ffn.shared_experts.w2.scale");
    save_json(idx, dir, EPMOE_ST_INDEX_FILE);
}
static void gate_dtype_f16(const char *dir) {
    epmoe_dtype f16 = EPMOE_DTYPE_F16;
    edit_tensor(dir, "layers.1.ffn.gate.weight", set_dtype, &f16);
}
static void expert_wrong_shape(const char *dir) {
    int64_t shape[3] = {2, 32, 32};
    edit_tensor(dir, "layers.2.ffn.experts.7.w2.weight", set_shape, shape);
}
static void mx_scale_wrong_length(const char *dir) {
    int64_t shape[3] = {2, 32, 1};
    edit_tensor(dir, "layers.1.ffn.experts.4.w1.scale", set_shape, shape);
}
static void nv_scale_wrong_length(const char *dir) {
    int64_t shape[3] = {2, 32, 3};
    edit_tensor(dir, "layers.1.ffn.experts.4.w1.weight_scale", set_shape, shape);
}
static void shared_scale_wrong_shape(const char *dir) {
    int64_t shape[3] = {2, 2, 1};
    edit_tensor(dir, "layers.1.ffn.shared_experts.w1.scale", set_shape, shape);
}
static void config_hidden(const char *dir) {
    json_t *c = load_json(dir, "config.json");
    json_object_set_new(c, "hidden_size", json_integer(128));
    save_json(c, dir, "config.json");
}
static void config_layers(const char *dir) {
    json_t *c = load_json(dir, "config.json");
    json_object_set_new(c, "num_hidden_layers", json_integer(2));
    save_json(c, dir, "config.json");
}
static void config_experts(const char *dir) {
    json_t *c = load_json(dir, "config.json");
    json_object_set_new(c, "n_routed_experts", json_integer(32));
    save_json(c, dir, "config.json");
}
static void config_fp8_experts(const char *dir) {
    json_t *c = load_json(dir, "config.json");
    json_object_set_new(c, "expert_dtype", json_string("fp8"));
    save_json(c, dir, "config.json");
}
static void config_softmax(const char *dir) {
    json_t *c = load_json(dir, "config.json");
    json_object_set_new(c, "scoring_func", json_string("softmax"));
    save_json(c, dir, "config.json");
}
static void hf_quant_fp8(const char *dir) {
    json_t *c = load_json(dir, "hf_quant_config.json");
    json_object_set_new(json_object_get(c, "quantization"), "quant_algo", json_string("FP8"));
    save_json(c, dir, "hf_quant_config.json");
}
static void tid2eid_out_of_range(const char *dir) {
    int64_t at_value[2] = {7, 999}; /* token 1, slot 3 (k = 4) */
    edit_tensor(dir, "layers.0.ffn.gate.tid2eid", set_i64, at_value);
}
static void gate_transposed(const char *dir) {
    edit_tensor(dir, "layers.2.ffn.gate.weight", transpose, NULL);
}
static void bias_missing(const char *dir) { drop_everywhere(dir, "layers.1.ffn.gate.bias"); }
static void mx_scale_nan(const char *dir) {
    int at_value[2] = {5, 0xff};
    edit_tensor(dir, "layers.2.ffn.experts.9.w3.scale", set_byte, at_value);
}
static void shared_fp8_nan(const char *dir) {
    int at_value[2] = {70, 0x7f};
    edit_tensor(dir, "mtp.0.ffn.shared_experts.w2.weight", set_byte, at_value);
}
/* a .weight_scale beside the .scale of an MXFP4 projection */
static void both_formats(const char *dir) {
    json_t *idx = load_json(dir, EPMOE_ST_INDEX_FILE);
    json_t *map = json_object_get(idx, "weight_map");
    json_object_set_new(map, "layers.1.ffn.experts.2.w1.weight_scale",
                        json_string(json_string_value(
                            json_object_get(map, "layers.1.ffn.experts.2.w1.scale"))));
    save_json(idx, dir, EPMOE_ST_INDEX_FILE);
}
static void expert_nvfp4_scale_2_missing(const char *dir) {
    drop_everywhere(dir, "layers.2.ffn.experts.11.w2.weight_scale_2");
}

static const broken_case catalogue[] = {
    /* which of the shard's tensors is looked up first is the loader's business: the message
     * names one of them, as the shard's, and the shard */
    {"missing shard", BASE_DEEPSEEK, missing_shard, EPMOE_ERR_IO, X1W, "the shard of layers.1.",
     "No such file"},
    {"truncated shard", BASE_NVIDIA, truncated_shard, EPMOE_ERR_FORMAT, X1W,
     "the shard of layers.1.", "outside the data section"},
    {"index names a tensor its shard lacks", BASE_DEEPSEEK, index_names_missing_tensor,
     EPMOE_ERR_FORMAT, "model-00001-of-", "layers.2.ffn.experts.5.w3.scale", "does not hold"},
    {"index lacks a tensor", BASE_DEEPSEEK, index_lacks_tensor, EPMOE_ERR_NOT_FOUND,
     EPMOE_ST_INDEX_FILE, "layers.2.ffn.shared_experts.w2.scale", "not found"},
    {"wrong dtype", BASE_NVIDIA, gate_dtype_f16, EPMOE_ERR_FORMAT, NULL,
     "layers.1.ffn.gate.weight", "dtype F16, expected F32 or BF16"},
    {"wrong shape", BASE_DEEPSEEK, expert_wrong_shape, EPMOE_ERR_FORMAT, NULL,
     "layers.2.ffn.experts.7.w2.weight", "shape [32, 32], expected [64, 16]"},
    {"MXFP4 scale of the wrong length", BASE_DEEPSEEK, mx_scale_wrong_length, EPMOE_ERR_FORMAT,
     NULL, "layers.1.ffn.experts.4.w1.scale", "shape [32, 1], expected [32, 2]"},
    {"NVFP4 scale of the wrong length", BASE_NVIDIA, nv_scale_wrong_length, EPMOE_ERR_FORMAT,
     NULL, "layers.1.ffn.experts.4.w1.weight_scale", "shape [32, 3], expected [32, 4]"},
    {"FP8 block scales of the wrong shape", BASE_DEEPSEEK, shared_scale_wrong_shape,
     EPMOE_ERR_FORMAT, NULL, "layers.1.ffn.shared_experts.w1.scale",
     "shape [2, 1], expected [1, 2]"},
    {"config.json hidden_size disagrees", BASE_DEEPSEEK, config_hidden, EPMOE_ERR_FORMAT,
     "config.json", "layers.0.ffn.gate.weight", "has shape [16, 64], expected [16, 128]"},
    {"config.json n_routed_experts disagrees", BASE_NVIDIA, config_experts, EPMOE_ERR_FORMAT,
     "config.json", "layers.0.ffn.gate.weight", "expected [32, 64]"},
    {"config.json num_hidden_layers disagrees", BASE_DEEPSEEK, config_layers, EPMOE_ERR_FORMAT,
     "config.json", "layers.2.ffn.gate.weight", "more layers than the config says"},
    {"config.json FP8 experts", BASE_DEEPSEEK, config_fp8_experts, EPMOE_ERR_UNSUPPORTED,
     "config.json", "expert_dtype", "\"fp8\""},
    {"config.json softmax scoring", BASE_DEEPSEEK, config_softmax, EPMOE_ERR_UNSUPPORTED,
     "config.json", "scoring_func", "softmax"},
    {"hf_quant_config.json not NVFP4", BASE_NVIDIA, hf_quant_fp8, EPMOE_ERR_UNSUPPORTED,
     "hf_quant_config.json", "quant_algo", "FP8"},
    {"tid2eid out of range", BASE_DEEPSEEK, tid2eid_out_of_range, EPMOE_ERR_RANGE, NULL,
     "layers.0.ffn.gate.tid2eid", "token 1 slot 3 holds expert 999"},
    {"transposed gate", BASE_NVIDIA, gate_transposed, EPMOE_ERR_FORMAT, NULL,
     "layers.2.ffn.gate.weight", "looks transposed"},
    {"missing bias", BASE_DEEPSEEK, bias_missing, EPMOE_ERR_NOT_FOUND, EPMOE_ST_INDEX_FILE,
     "layers.1.ffn.gate.bias", "selection bias"},
    {"NaN MXFP4 scale", BASE_DEEPSEEK, mx_scale_nan, EPMOE_ERR_NUMERIC, NULL,
     "layers.2.ffn.experts.9.w3.scale", "0xff"},
    {"NaN FP8 shared weight", BASE_DEEPSEEK, shared_fp8_nan, EPMOE_ERR_NUMERIC, NULL,
     "mtp.0.ffn.shared_experts.w2.weight", "E4M3 NaN"},
    {"both NVFP4 and MXFP4 scales", BASE_DEEPSEEK, both_formats, EPMOE_ERR_FORMAT,
     "layers.1.ffn.experts.2.w1.scale", "layers.1.ffn.experts.2.w1.weight_scale", "ambiguous"},
    {"NVFP4 without weight_scale_2", BASE_NVIDIA, expert_nvfp4_scale_2_missing,
     EPMOE_ERR_NOT_FOUND, EPMOE_ST_INDEX_FILE, "layers.2.ffn.experts.11.w2.weight_scale_2",
     "not found"},
};

/* Breaks the scratch copy `dir` as case c says and checks the load is refused with c's status
 * and a message naming `file`, the tensor and the detail. */
static void expect_refused(const broken_case *c, const char *dir, const char *file) {
    c->breaks(dir);
    epmoe_clear_error();
    epmoe_status st = load_dir(dir, NULL);
    const char *msg = epmoe_last_error();
    ck_assert_msg(st == c->expect, "%s: expected %s, got %s: %s", c->what,
                  epmoe_status_name(c->expect), epmoe_status_name(st), msg);
    ck_assert_msg(strstr(msg, file), "%s: the message does not name %s: %s", c->what, file, msg);
    ck_assert_msg(strstr(msg, c->tensor), "%s: the message does not name %s: %s", c->what,
                  c->tensor, msg);
    ck_assert_msg(strstr(msg, c->detail), "%s: no '%s' in: %s", c->what, c->detail, msg);
}

START_TEST(test_broken_directories) {
    for (size_t i = 0; i < sizeof catalogue / sizeof catalogue[0]; i++) {
        const broken_case *c = &catalogue[i];
        const char *dir = scratch_copy(c->base == BASE_DEEPSEEK ? deepseek_dir : nvidia_dir);
        char file[256];
        const char *shard_tensor = !c->file ? c->tensor : strncmp(c->file, "layers.", 7) == 0 ? c->file : NULL;
        snprintf(file, sizeof file, "%s", shard_tensor ? shard_of(dir, shard_tensor) : c->file);
        expect_refused(c, dir, file);
    }
    remove_dir(scratch_dir);
}
END_TEST

/* ---- variations that load, to the same weights ---- */

static void expect_loads_same(const char *what, const char *base, void (*change)(const char *)) {
    epmoe_layer_weights want[N_LAYERS], got[N_LAYERS];
    ck_assert_msg(load_dir(base, want) == EPMOE_OK, "%s", epmoe_last_error());
    const char *dir = scratch_copy(base);
    change(dir);
    ck_assert_msg(load_dir(dir, got) == EPMOE_OK, "%s: %s", what, epmoe_last_error());
    for (int64_t L = 0; L < N_LAYERS; L++) {
        const int64_t H = 64, I = 32, E = 16;
        expect_same_bytes(want[L].gate_weight, got[L].gate_weight, E * H * 4, what, L);
        expect_same_bytes(want[L].tid2eid, got[L].tid2eid, 64 * 4 * 4, what, L);
        expect_same_bytes(want[L].shared_w13, got[L].shared_w13, 2 * I * H * 4, what, L);
        expect_same_bytes(want[L].shared_w2, got[L].shared_w2, I * H * 4, what, L);
        expect_same_bytes(want[L].w13_codes, got[L].w13_codes, E * I * H, what, L);
        expect_same_bytes(want[L].w13_sf, got[L].w13_sf, E * I * H / 8, what, L);
        expect_same_bytes(want[L].w2_sf, got[L].w2_sf, E * I * H / 16, what, L);
        expect_same_bytes(want[L].w13_scale_2, got[L].w13_scale_2, 2 * E * 4, what, L);
        epmoe_layer_weights_free(&want[L]);
        epmoe_layer_weights_free(&got[L]);
    }
    remove_dir(scratch_dir);
}

static void scale_as_u8(const char *dir) {
    epmoe_dtype u8 = EPMOE_DTYPE_U8;
    edit_tensor(dir, "layers.1.ffn.experts.3.w2.scale", set_dtype, &u8);
}
static void tid2eid_i32(const char *dir) {
    edit_tensor(dir, "layers.0.ffn.gate.tid2eid", narrow_ids, NULL);
}
static void shared_scales_f32(const char *dir) {
    edit_tensor(dir, "layers.2.ffn.shared_experts.w3.scale", scales_to_f32, NULL);
}
static void attention_unknown_dtype(const char *dir) {
    epmoe_dtype unknown = EPMOE_DTYPE_COUNT; /* written as "?": a dtype nobody knows */
    (void)unknown;
    /* F8_E5M2 is a real dtype epmoe does not compute with; the header names it */
    char p[PATH_CAP];
    path_in(p, dir, shard_of(dir, "layers.1.attn.wkv.weight"));
    FILE *f = fopen(p, "r+b");
    ck_assert_ptr_nonnull(f);
    uint64_t hlen = 0;
    unsigned char len[8];
    ck_assert_uint_eq(fread(len, 1, 8, f), 8);
    for (int i = 7; i >= 0; i--) hlen = (hlen << 8) | len[i];
    char *h = malloc(hlen + 1);
    ck_assert_uint_eq(fread(h, 1, hlen, f), hlen);
    h[hlen] = '\0';
    char *at = strstr(h, "\"layers.1.attn.wkv.weight\":{\"dtype\":\"F8_E4M3\"");
    ck_assert_msg(at != NULL, "header layout changed");
    memcpy(strstr(at, "F8_E4M3"), "F8_E5M2", 7);
    fseek(f, 8, SEEK_SET);
    ck_assert_uint_eq(fwrite(h, 1, hlen, f), hlen);
    fclose(f);
    free(h);
}
static void scale_2_shape_1(const char *dir) {
    int64_t shape[2] = {1, 1};
    edit_tensor(dir, "layers.1.ffn.experts.0.w1.weight_scale_2", set_shape, shape);
}
static void mlp_layer_types(const char *dir) {
    json_t *c = load_json(dir, "config.json");
    json_object_del(c, "num_hash_layers");
    json_object_set_new(c, "mlp_layer_types", json_pack("[s, s, s]", "hash_moe", "moe", "moe"));
    save_json(c, dir, "config.json");
}
static void no_input_scale(const char *dir) {
    drop_everywhere(dir, "layers.2.ffn.experts.6.w1.input_scale");
    drop_everywhere(dir, "layers.2.ffn.experts.6.w3.input_scale");
}
static void embed_and_head_garbage(const char *dir) {
    const char *never[2] = {"embed.weight", "head.weight"};
    for (int i = 0; i < 2; i++) {
        char p[PATH_CAP];
        path_in(p, dir, shard_of(dir, never[i]));
        FILE *f = fopen(p, "wb");
        ck_assert_ptr_nonnull(f);
        fputs("not a safetensors file", f);
        fclose(f);
    }
}

START_TEST(test_accepted_variations) {
    expect_loads_same("MXFP4 scales as U8", deepseek_dir, scale_as_u8);
    expect_loads_same("tid2eid as I32", deepseek_dir, tid2eid_i32);
    expect_loads_same("FP8 block scales as F32", nvidia_dir, shared_scales_f32);
    expect_loads_same("an attention tensor of an unknown dtype", deepseek_dir,
                      attention_unknown_dtype);
    expect_loads_same("weight_scale_2 of shape [1]", nvidia_dir, scale_2_shape_1);
    expect_loads_same("mlp_layer_types", deepseek_dir, mlp_layer_types);
    expect_loads_same("embedding and head shards never read", nvidia_dir, embed_and_head_garbage);

    /* NVIDIA's export without calibration: input_scale 0, which act_scale=static refuses */
    const char *dir = scratch_copy(nvidia_dir);
    no_input_scale(dir);
    epmoe_layer_weights got[N_LAYERS];
    ck_assert_msg(load_dir(dir, got) == EPMOE_OK, "%s", epmoe_last_error());
    ck_assert(got[2].w13_input_scale[6] == 0.0f && got[2].w13_input_scale[5] > 0.0f);
    for (int L = 0; L < N_LAYERS; L++) epmoe_layer_weights_free(&got[L]);
    remove_dir(scratch_dir);
}
END_TEST

/* ---- MXFP4 the plain conversion refused ---- */

/* Block [row 0, 0..31] all zero at scale 2^-127 (what epmoe's and the OCP quantizer write for
 * amax 0); block [row 1, 32..63] 20 binades below the tensor's largest, codes all +-4. */
static void edge_blocks(tensor_copy *t, const void *arg) {
    (void)arg;
    if (strstr(t->name, ".scale")) {
        uint8_t top = 0;
        for (size_t i = 0; i < t->nbytes; i++) top = t->data[i] > top ? t->data[i] : top;
        t->data[0] = 0;                      /* row 0, block 0 */
        t->data[1 * 2 + 1] = (uint8_t)(top - 20); /* row 1, block 1 (K = 64: 2 per row) */
    } else {
        memset(t->data, 0, 16);              /* row 0, elements 0..31 */
        for (int b = 0; b < 16; b++) t->data[32 + 16 + b] = (b % 3) ? 0x66 : 0xe6; /* +-4 */
    }
}

START_TEST(test_mxfp4_zero_blocks_and_wide_span) {
    const char *dir = scratch_copy(deepseek_dir);
    edit_tensor(dir, "layers.1.ffn.experts.3.w1.scale", edge_blocks, NULL);
    edit_tensor(dir, "layers.1.ffn.experts.3.w1.weight", edge_blocks, NULL);
    epmoe_config cfg;
    epmoe_st_set *s = open_ckpt(dir, &cfg);
    epmoe_expert_slice all = {0, 16};
    epmoe_layer_weights w;
    ck_assert_msg(epmoe_layer_weights_load(s, &cfg, 1, &all, &w) == EPMOE_OK, "%s",
                  epmoe_last_error());
    /* every weight equals the reference's MXFP4 decoding, bit for bit */
    epmoe_ref_weights from_ckpt, from_loaded;
    ck_assert_int_eq(epmoe_ref_weights_read(s, &cfg, 1, &from_ckpt), EPMOE_OK);
    ck_assert_int_eq(epmoe_ref_weights_from_layer(&cfg, &w, &from_loaded), EPMOE_OK);
    double a[64], b[64];
    for (int64_t p = 0; p < 3 * 16; p++) {
        int64_t N = p % 3 == 2 ? 64 : 32, K = p % 3 == 2 ? 32 : 64;
        for (int64_t n = 0; n < N; n++) {
            epmoe_ref_proj_row(&from_ckpt.proj[p], n, K, a);
            epmoe_ref_proj_row(&from_loaded.proj[p], n, K, b);
            ck_assert_msg(memcmp(a, b, (size_t)K * sizeof(double)) == 0,
                          "expert %lld proj %lld row %lld differs", (long long)(p / 3),
                          (long long)(p % 3), (long long)n);
        }
    }
    /* the edited rows: zeros, and +-4 * 2^(top - 20 - 127) */
    epmoe_ref_proj_row(&from_loaded.proj[3 * 3], 0, 64, a);
    for (int k = 0; k < 32; k++) ck_assert(a[k] == 0.0);
    epmoe_ref_proj_row(&from_loaded.proj[3 * 3], 1, 64, a);
    ck_assert(a[32] != 0.0 && fabs(a[32]) == fabs(a[63]));
    /* and so does a forward pass: the reference on the loaded weights equals the reference on
     * the checkpoint's own MXFP4 */
    const int64_t T = 40;
    float *x = malloc((size_t)(T * 64) * sizeof(float));
    int32_t tok[40];
    epmoe_rng rng;
    epmoe_rng_seed(&rng, 3);
    epmoe_fill_normal(&rng, x, (size_t)(T * 64), 1.0f);
    for (int t = 0; t < T; t++) tok[t] = t % 64;
    double *ya = malloc((size_t)(T * 64) * sizeof(double)), *yb = malloc((size_t)(T * 64) * sizeof(double));
    int32_t ids[40 * 4];
    /* route every token through expert 3 so the edited blocks are used */
    from_ckpt.bias[3] += 100.0;
    from_loaded.bias[3] += 100.0;
    ck_assert_int_eq(epmoe_ref_forward(&cfg, &from_ckpt, x, tok, T, ya, ids, NULL), EPMOE_OK);
    for (int t = 0; t < T; t++) ck_assert_int_eq(ids[4 * t], 3);
    ck_assert_int_eq(epmoe_ref_forward(&cfg, &from_loaded, x, tok, T, yb, NULL, NULL), EPMOE_OK);
    ck_assert(memcmp(ya, yb, (size_t)(T * 64) * sizeof(double)) == 0);
    free(x);
    free(ya);
    free(yb);
    epmoe_ref_weights_free(&from_ckpt);
    epmoe_ref_weights_free(&from_loaded);
    epmoe_layer_weights_free(&w);
    epmoe_st_set_close(s);
    remove_dir(scratch_dir);
}
END_TEST

/* ---- gpt-oss (docs/checkpoints.md, "gpt-oss") ---- */

#define GO_E 8 /* gpt-oss-tiny with 8 experts and 2 layers: H 160, I 96 */
#define GO_H 160
#define GO_I 96
static char gptoss_dir[PATH_CAP], gptoss_epmoe_dir[PATH_CAP];

static void gptoss_config(epmoe_config *cfg, const char *layout) {
    ck_assert(epmoe_config_preset(cfg, "gpt-oss-tiny") == EPMOE_OK);
    const char *settings[][2] = {{"n_layers", "2"}, {"n_routed_experts", "8"}, {"seed", "78"},
                                 {"checkpoint_layout", layout}};
    for (size_t i = 0; i < sizeof settings / sizeof settings[0]; i++)
        ck_assert_msg(epmoe_config_set(cfg, settings[i][0], settings[i][1]) == EPMOE_OK, "%s",
                      epmoe_last_error());
}

static void setup_gptoss_dirs(void) {
    const char *names[2] = {"md_gptoss", "md_gptoss_epmoe"}, *layouts[2] = {"gpt-oss", "epmoe"};
    char *dirs[2] = {gptoss_dir, gptoss_epmoe_dir};
    for (int i = 0; i < 2; i++) {
        snprintf(dirs[i], PATH_CAP, "%s", epmoe_test_data_path(names[i]));
        remove_dir(dirs[i]);
        epmoe_config cfg;
        gptoss_config(&cfg, layouts[i]);
        epmoe_gen_options opt = {.shard_bytes = 200000, .threads = 2};
        ck_assert_msg(epmoe_ckpt_generate(&cfg, &opt, dirs[i], NULL) == EPMOE_OK, "%s: %s",
                      names[i], epmoe_last_error());
    }
}

START_TEST(test_gptoss_config_json) {
    epmoe_config cfg;
    epmoe_st_set *s = open_ckpt(gptoss_dir, &cfg);
    ck_assert_int_eq(cfg.checkpoint_layout, EPMOE_LAYOUT_GPT_OSS);
    ck_assert_int_eq(cfg.hidden_size, GO_H);
    ck_assert_int_eq(cfg.moe_inter_size, GO_I);
    ck_assert_int_eq(cfg.n_routed_experts, GO_E);
    ck_assert_int_eq(cfg.top_k, 4);
    ck_assert_int_eq(cfg.n_layers, 2);
    ck_assert_int_eq(cfg.n_shared_experts, 0);
    ck_assert_int_eq(cfg.n_hash_layers, 0);
    ck_assert_int_eq(cfg.scoring, EPMOE_SCORING_TOPK_SOFTMAX);
    ck_assert_int_eq(cfg.swiglu_variant, EPMOE_SWIGLU_GPTOSS);
    ck_assert(cfg.swiglu_limit == 7.0 && cfg.swiglu_alpha == 1.702);
    ck_assert(cfg.routed_scaling_factor == 1.0);
    ck_assert_int_eq(cfg.expert_bias, 1);
    ck_assert_int_eq(cfg.gate_up_order, EPMOE_GATE_UP_INTERLEAVED);
    ck_assert_int_eq(cfg.weight_format, EPMOE_WEIGHTS_MXFP4);
    /* the release's shard names: counted from 0, "of" the last index (the head's shard) */
    int last = -1, of = -2;
    ck_assert_int_eq(sscanf(shard_of(gptoss_dir, "lm_head.weight"), "model-%5d-of-%5d", &last, &of), 2);
    ck_assert_int_eq(last, of);
    char want[64];
    snprintf(want, sizeof want, "model-00000-of-%05d.safetensors", of);
    ck_assert_str_eq(shard_of(gptoss_dir, "model.embed_tokens.weight"), want);
    epmoe_st_set_close(s);
    /* a DeepSeek directory read after it keeps none of gpt-oss's settings */
    epmoe_config c2 = cfg;
    s = NULL;
    ck_assert(epmoe_st_set_open(deepseek_dir, &s) == EPMOE_OK);
    ck_assert(epmoe_config_from_checkpoint(s, &c2) == EPMOE_OK);
    ck_assert_int_eq(c2.expert_bias, 0);
    ck_assert_int_eq(c2.swiglu_variant, EPMOE_SWIGLU_DSV4);
    epmoe_st_set_close(s);
}
END_TEST

/* The released layout and the epmoe layout of the same seed load the same weights and biases,
 * bit for bit, and what is loaded equals the reference's own decoding of the stacked tensors
 * (tests/ref: gate = even rows, up = odd rows, from gpt-oss's definition), on two slices. */
START_TEST(test_gptoss_same_weights_as_epmoe_layout) {
    epmoe_config cr, co;
    epmoe_st_set *sr = open_ckpt(gptoss_dir, &cr), *so = open_ckpt(gptoss_epmoe_dir, &co);
    const epmoe_expert_slice slices[2] = {{0, GO_E}, {3, 6}};
    for (int sl = 0; sl < 2; sl++) {
        const int64_t n = slices[sl].end - slices[sl].start, H = GO_H, I = GO_I;
        for (int64_t L = 0; L < 2; L++) {
            epmoe_layer_weights a, b;
            ck_assert_msg(epmoe_layer_weights_load(sr, &cr, L, &slices[sl], &a) == EPMOE_OK,
                          "%s", epmoe_last_error());
            ck_assert_msg(epmoe_layer_weights_load(so, &co, L, &slices[sl], &b) == EPMOE_OK,
                          "%s", epmoe_last_error());
            expect_same_bytes(a.gate_weight, b.gate_weight, GO_E * H * 4, "router", L);
            expect_same_bytes(a.gate_bias, b.gate_bias, GO_E * 4, "router bias", L);
            ck_assert(a.tid2eid == NULL && a.shared_w13 == NULL);
            expect_same_bytes(a.w13_codes, b.w13_codes, n * 2 * I * H / 2, "w13 codes", L);
            expect_same_bytes(a.w13_sf, b.w13_sf, n * 2 * I * H / 16, "w13 sf", L);
            expect_same_bytes(a.w2_codes, b.w2_codes, n * H * I / 2, "w2 codes", L);
            expect_same_bytes(a.w2_sf, b.w2_sf, n * H * I / 16, "w2 sf", L);
            expect_same_bytes(a.w13_scale_2, b.w13_scale_2, 2 * n * 4, "w13 scale_2", L);
            expect_same_bytes(a.w2_scale_2, b.w2_scale_2, n * 4, "w2 scale_2", L);
            ck_assert(a.w13_bias != NULL && a.w2_bias != NULL);
            expect_same_bytes(a.w13_bias, b.w13_bias, n * 2 * I * 4, "w13 bias", L);
            expect_same_bytes(a.w2_bias, b.w2_bias, n * H * 4, "w2 bias", L);
            char first[256];
            ck_assert_msg(epmoe_ref_check_loaded_experts(sr, &cr, &a, first, sizeof first) == 0,
                          "layer %lld: %s", (long long)L, first);
            ck_assert_msg(epmoe_ref_check_loaded_experts(so, &co, &b, first, sizeof first) == 0,
                          "layer %lld: %s", (long long)L, first);
            /* only this slice's bytes counted as read (the stacked tensors hold all experts) */
            ck_assert_int_lt(a.checkpoint_bytes, b.checkpoint_bytes + GO_E * H * 2 + GO_E * 2 + 1);
            epmoe_layer_weights_free(&a);
            epmoe_layer_weights_free(&b);
        }
    }
    epmoe_st_set_close(sr);
    epmoe_st_set_close(so);
}
END_TEST

/* ---- a gpt-oss directory written here byte by byte, from the release's definition alone ----
 * (names as strings, values chosen here): gate_up_proj holds expert e's gate row n at fused row
 * 2n and its up row n at 2n + 1 (gpt_oss/torch/model.py swiglu: x[..., ::2], x[..., 1::2];
 * transformers GptOssExperts: gate_up[..., ::2], gate_up[..., 1::2]), biases in the same
 * fused order. The engine's expert MLP on it is compared with a float64 computation written
 * here from the stored bytes, on inputs that make both clamps fire. */
#define HM_E 2
#define HM_H 64
#define HM_I 32

typedef struct {
    uint8_t blocks13[HM_E * 2 * HM_I * HM_H / 2], scales13[HM_E * 2 * HM_I * HM_H / 32];
    uint8_t blocks2[HM_E * HM_H * HM_I / 2], scales2[HM_E * HM_H * HM_I / 32];
    uint16_t bias13[HM_E * 2 * HM_I], bias2[HM_E * HM_H], router[HM_E * HM_H], router_bias[HM_E];
} handmade;

static double hm_e2m1(uint8_t nibble) {
    static const double mag[8] = {0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0};
    return (nibble & 8 ? -1.0 : 1.0) * mag[nibble & 7];
}

/* Row `row` of a [rows, K] MXFP4 matrix (low nibble first, UE8M0 per 32), element k. */
static double hm_weight(const uint8_t *blocks, const uint8_t *scales, int64_t row, int64_t K,
                        int64_t k) {
    uint8_t byte = blocks[row * (K / 2) + k / 2];
    return hm_e2m1(k % 2 ? byte >> 4 : byte & 15) * ldexp(1.0, scales[row * (K / 32) + k / 32] - 127);
}

static double hm_bf16(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static void write_handmade(const char *dir, handmade *m) {
    remove_dir(dir);
    ck_assert_int_eq(mkdir(dir, 0777), 0);
    epmoe_rng rng;
    epmoe_rng_seed(&rng, 2880);
    for (size_t i = 0; i < sizeof m->blocks13; i++) m->blocks13[i] = (uint8_t)epmoe_rng_next(&rng);
    for (size_t i = 0; i < sizeof m->blocks2; i++) m->blocks2[i] = (uint8_t)epmoe_rng_next(&rng);
    for (size_t i = 0; i < sizeof m->scales13; i++) m->scales13[i] = (uint8_t)(125 + epmoe_rng_below(&rng, 3));
    for (size_t i = 0; i < sizeof m->scales2; i++) m->scales2[i] = (uint8_t)(123 + epmoe_rng_below(&rng, 3));
    for (int i = 0; i < HM_E * 2 * HM_I; i++)
        m->bias13[i] = epmoe_float_to_bf16(2.0f * epmoe_rng_normal(&rng));
    for (int i = 0; i < HM_E * HM_H; i++) m->bias2[i] = epmoe_float_to_bf16(epmoe_rng_normal(&rng));
    for (int i = 0; i < HM_E * HM_H; i++) m->router[i] = epmoe_float_to_bf16(0.1f * epmoe_rng_normal(&rng));
    for (int i = 0; i < HM_E; i++) m->router_bias[i] = 0;
    const char *shard = "model-00000-of-00000.safetensors";
    struct {
        const char *name;
        epmoe_dtype dtype;
        int ndim;
        int64_t shape[4];
        const void *data;
    } t[] = {
        {"model.layers.0.mlp.router.weight", EPMOE_DTYPE_BF16, 2, {HM_E, HM_H}, m->router},
        {"model.layers.0.mlp.router.bias", EPMOE_DTYPE_BF16, 1, {HM_E}, m->router_bias},
        {"model.layers.0.mlp.experts.gate_up_proj_blocks", EPMOE_DTYPE_U8, 4,
         {HM_E, 2 * HM_I, HM_H / 32, 16}, m->blocks13},
        {"model.layers.0.mlp.experts.gate_up_proj_scales", EPMOE_DTYPE_U8, 3,
         {HM_E, 2 * HM_I, HM_H / 32}, m->scales13},
        {"model.layers.0.mlp.experts.gate_up_proj_bias", EPMOE_DTYPE_BF16, 2, {HM_E, 2 * HM_I},
         m->bias13},
        {"model.layers.0.mlp.experts.down_proj_blocks", EPMOE_DTYPE_U8, 4,
         {HM_E, HM_H, HM_I / 32, 16}, m->blocks2},
        {"model.layers.0.mlp.experts.down_proj_scales", EPMOE_DTYPE_U8, 3,
         {HM_E, HM_H, HM_I / 32}, m->scales2},
        {"model.layers.0.mlp.experts.down_proj_bias", EPMOE_DTYPE_BF16, 2, {HM_E, HM_H}, m->bias2},
    };
    epmoe_st_writer *w = NULL;
    ck_assert_int_eq(epmoe_st_writer_create(&w), EPMOE_OK);
    json_t *map = json_object();
    for (size_t i = 0; i < sizeof t / sizeof t[0]; i++) {
        ck_assert_int_eq(epmoe_st_writer_add(w, t[i].name, t[i].dtype, t[i].ndim, t[i].shape,
                                             t[i].data),
                         EPMOE_OK);
        json_object_set_new(map, t[i].name, json_string(shard));
    }
    char p[PATH_CAP];
    path_in(p, dir, shard);
    ck_assert_msg(epmoe_st_writer_finish(w, p) == EPMOE_OK, "%s", epmoe_last_error());
    epmoe_st_writer_free(w);
    save_json(json_pack("{s:{}, s:o}", "metadata", "weight_map", map), dir, EPMOE_ST_INDEX_FILE);
    save_json(json_pack("{s:s, s:i, s:i, s:i, s:i, s:i, s:i, s:i, s:f, s:s, s:{s:s}}",
                        "model_type", "gpt_oss", "hidden_size", HM_H, "intermediate_size", HM_I,
                        "num_local_experts", HM_E, "num_experts_per_tok", 1, "experts_per_token",
                        1, "num_hidden_layers", 1, "vocab_size", 16, "swiglu_limit", 7.0,
                        "hidden_act", "silu", "quantization_config", "quant_method", "mxfp4"),
              dir, "config.json");
}

/* Expert e's MLP on one token in float64 from the stored bytes; gate row n of the fused tensor
 * taken at fused row gate(n) and up row n at up(n). Counts the clamps. */
static void hm_expert(const handmade *m, int e, const float *x, int interleaved, double *y,
                      int64_t *gate_clamped, int64_t *up_clamped, int64_t *unclamped) {
    double h[2 * HM_I], a[HM_I];
    for (int64_t r = 0; r < 2 * HM_I; r++) {
        double acc = 0;
        for (int64_t k = 0; k < HM_H; k++)
            acc += (double)x[k] * hm_weight(m->blocks13, m->scales13, e * 2 * HM_I + r, HM_H, k);
        h[r] = acc + hm_bf16(m->bias13[e * 2 * HM_I + r]);
    }
    for (int64_t n = 0; n < HM_I; n++) {
        double g = interleaved ? h[2 * n] : h[n], u = interleaved ? h[2 * n + 1] : h[HM_I + n];
        const double L = 7.0, alpha = 1.702;
        *gate_clamped += g > L;
        *up_clamped += u > L || u < -L;
        *unclamped += g <= L && u <= L && u >= -L;
        g = g > L ? L : g;
        u = u > L ? L : (u < -L ? -L : u);
        a[n] = g / (1.0 + exp(-alpha * g)) * (u + 1.0);
    }
    for (int64_t j = 0; j < HM_H; j++) {
        double acc = 0;
        for (int64_t n = 0; n < HM_I; n++)
            acc += a[n] * hm_weight(m->blocks2, m->scales2, e * HM_H + j, HM_I, n);
        y[j] = acc + hm_bf16(m->bias2[e * HM_H + j]);
    }
}

/* The engine's expert MLP (W4A16: the activations go in unquantized, so the only difference to
 * float64 is fp32 rounding) on T tokens through both experts, in gate_up_order `order`. */
static void hm_engine(const char *dir, int64_t order, const float *x, int64_t T, float *y) {
    epmoe_config cfg;
    epmoe_st_set *s = open_ckpt(dir, &cfg);
    ck_assert_int_eq(cfg.gate_up_order, EPMOE_GATE_UP_INTERLEAVED); /* as released */
    cfg.gate_up_order = order;
    cfg.act_quant = EPMOE_ACT_HIGH;
    epmoe_expert_slice all = {0, HM_E};
    epmoe_layer_weights w;
    ck_assert_msg(epmoe_layer_weights_load(s, &cfg, 0, &all, &w) == EPMOE_OK, "%s",
                  epmoe_last_error());
    epmoe_expert_scratch *scratch = NULL;
    ck_assert_int_eq(epmoe_expert_scratch_create(HM_H, HM_I, 0, &scratch), EPMOE_OK);
    float *xp = malloc((size_t)(2 * T * HM_H) * sizeof(float));
    memcpy(xp, x, (size_t)(T * HM_H) * sizeof(float)); /* the same tokens to both experts */
    memcpy(xp + T * HM_H, x, (size_t)(T * HM_H) * sizeof(float));
    const int64_t counts[HM_E] = {T, T}, offsets[HM_E + 1] = {0, T, 2 * T};
    epmoe_poison_f32(y, (size_t)(2 * T * HM_H));
    ck_assert_msg(epmoe_cpu_experts_forward(&cfg, &w, xp, counts, offsets, y, scratch, NULL) ==
                      EPMOE_OK,
                  "%s", epmoe_last_error());
    ck_assert_uint_eq(epmoe_count_unwritten_f32(y, (size_t)(2 * T * HM_H)), 0);
    free(xp);
    epmoe_expert_scratch_free(scratch);
    epmoe_layer_weights_free(&w);
    epmoe_st_set_close(s);
}

START_TEST(test_gptoss_handmade_interleave_bias_activation) {
    char dir[PATH_CAP];
    snprintf(dir, sizeof dir, "%s", epmoe_test_data_path("md_gptoss_handmade"));
    handmade *m = malloc(sizeof *m);
    write_handmade(dir, m);
    const int64_t T = 24;
    float x[24 * HM_H];
    epmoe_rng rng;
    epmoe_rng_seed(&rng, 45);
    epmoe_fill_normal(&rng, x, (size_t)(T * HM_H), 1.0f);
    float *y = malloc((size_t)(2 * T * HM_H) * sizeof(float));
    double *want = malloc((size_t)(2 * T * HM_H) * sizeof(double));
    double *swapped = malloc((size_t)(2 * T * HM_H) * sizeof(double));
    for (int interleaved = 1; interleaved >= 0; interleaved--) {
        int64_t gate_clamped = 0, up_clamped = 0, unclamped = 0, ignore = 0;
        for (int e = 0; e < HM_E; e++)
            for (int64_t t = 0; t < T; t++) {
                hm_expert(m, e, x + t * HM_H, interleaved, want + (e * T + t) * HM_H,
                          &gate_clamped, &up_clamped, &unclamped);
                /* the other order: what a loader that got the interleaving wrong computes */
                hm_expert(m, e, x + t * HM_H, !interleaved, swapped + (e * T + t) * HM_H,
                          &ignore, &ignore, &ignore);
            }
        ck_assert_msg(gate_clamped > 0 && up_clamped > 0 && unclamped > 0,
                      "inputs must make both clamps fire and leave some values alone: gate %lld, "
                      "up %lld, neither %lld",
                      (long long)gate_clamped, (long long)up_clamped, (long long)unclamped);
        hm_engine(dir, interleaved ? EPMOE_GATE_UP_INTERLEAVED : EPMOE_GATE_UP_HALVES, x, T, y);
        const size_t n = (size_t)(2 * T * HM_H);
        double err = epmoe_rel_l2_f32_f64(y, want, n), other = epmoe_rel_l2_f32_f64(y, swapped, n);
        ck_assert_msg(err < 1e-6, "%s: rel L2 %.3g against float64", interleaved ? "interleaved" : "halves", err);
        ck_assert_msg(other > 1e-2, "the wrong row order is indistinguishable (%.3g)", other);
        /* gate and up swapped in place (the row order right, the roles wrong) */
        if (interleaved) {
            handmade *sw = malloc(sizeof *sw);
            memcpy(sw, m, sizeof *sw);
            for (int64_t r = 0; r < HM_E * 2 * HM_I; r += 2) {
                for (int64_t c = 0; c < HM_H / 2; c++) {
                    uint8_t tmp = sw->blocks13[r * HM_H / 2 + c];
                    sw->blocks13[r * HM_H / 2 + c] = sw->blocks13[(r + 1) * HM_H / 2 + c];
                    sw->blocks13[(r + 1) * HM_H / 2 + c] = tmp;
                }
                for (int64_t c = 0; c < HM_H / 32; c++) {
                    uint8_t tmp = sw->scales13[r * HM_H / 32 + c];
                    sw->scales13[r * HM_H / 32 + c] = sw->scales13[(r + 1) * HM_H / 32 + c];
                    sw->scales13[(r + 1) * HM_H / 32 + c] = tmp;
                }
                uint16_t tb = sw->bias13[r];
                sw->bias13[r] = sw->bias13[r + 1];
                sw->bias13[r + 1] = tb;
            }
            double *roles = malloc(n * sizeof(double));
            for (int e = 0; e < HM_E; e++)
                for (int64_t t = 0; t < T; t++)
                    hm_expert(sw, e, x + t * HM_H, 1, roles + (e * T + t) * HM_H, &ignore, &ignore,
                              &ignore);
            ck_assert_msg(epmoe_rel_l2_f32_f64(y, roles, n) > 1e-2,
                          "gate and up swapped are indistinguishable");
            free(roles);
            free(sw);
        }
    }
    free(y);
    free(want);
    free(swapped);
    free(m);
    remove_dir(dir);
}
END_TEST

/* ---- broken gpt-oss directories: refused naming the file and the tensor ---- */

#define GO_L1 "model.layers.1.mlp."
static void go_scales_missing(const char *dir) { drop_everywhere(dir, GO_L1 "experts.gate_up_proj_scales"); }
static void go_blocks_wrong_shape(const char *dir) {
    int64_t shape[4] = {3, GO_E, GO_H, GO_I / 2}; /* the 4-D blocks flattened to 3-D */
    edit_tensor(dir, GO_L1 "experts.down_proj_blocks", set_shape, shape);
}
static void go_bias_f16(const char *dir) {
    epmoe_dtype f16 = EPMOE_DTYPE_F16;
    edit_tensor(dir, GO_L1 "experts.gate_up_proj_bias", set_dtype, &f16);
}
static void go_config_inter(const char *dir) {
    json_t *c = load_json(dir, "config.json");
    json_object_set_new(c, "intermediate_size", json_integer(64));
    save_json(c, dir, "config.json");
}
static void go_config_not_mxfp4(const char *dir) {
    json_t *c = load_json(dir, "config.json");
    json_object_del(c, "quantization_config");
    save_json(c, dir, "config.json");
}
static void go_config_layers(const char *dir) {
    json_t *c = load_json(dir, "config.json");
    json_object_set_new(c, "num_hidden_layers", json_integer(1));
    save_json(c, dir, "config.json");
}
static void go_config_top_k(const char *dir) {
    json_t *c = load_json(dir, "config.json");
    json_object_set_new(c, "experts_per_token", json_integer(2));
    save_json(c, dir, "config.json");
}
static void go_router_bias_missing(const char *dir) { drop_everywhere(dir, GO_L1 "router.bias"); }
static void go_bias_nan(const char *dir) { /* BF16 NaN 0x7fc0 at element 5 of expert 0 */
    int lo[2] = {10, 0xc0}, hi[2] = {11, 0x7f};
    edit_tensor(dir, GO_L1 "experts.down_proj_bias", set_byte, lo);
    edit_tensor(dir, GO_L1 "experts.down_proj_bias", set_byte, hi);
}
/* expert 0's fused row 0 (a gate row): one block at 2^-126, the next at 2^127, no exact NVFP4 */
static void go_scales_no_nvfp4(const char *dir) {
    int lo[2] = {0, 1}, hi[2] = {1, 254};
    edit_tensor(dir, GO_L1 "experts.gate_up_proj_scales", set_byte, lo);
    edit_tensor(dir, GO_L1 "experts.gate_up_proj_scales", set_byte, hi);
}

static const broken_case gptoss_catalogue[] = {
    {"gpt-oss: scales missing", BASE_DEEPSEEK, go_scales_missing, EPMOE_ERR_NOT_FOUND,
     EPMOE_ST_INDEX_FILE, GO_L1 "experts.gate_up_proj_scales", "not found"},
    {"gpt-oss: blocks of the wrong shape", BASE_DEEPSEEK, go_blocks_wrong_shape,
     EPMOE_ERR_FORMAT, NULL, GO_L1 "experts.down_proj_blocks", "expected [8, 160, 3, 16]"},
    {"gpt-oss: bias of the wrong dtype", BASE_DEEPSEEK, go_bias_f16, EPMOE_ERR_FORMAT, NULL,
     GO_L1 "experts.gate_up_proj_bias", "dtype F16, expected BF16 or F32"},
    {"gpt-oss: config.json intermediate_size disagrees", BASE_DEEPSEEK, go_config_inter,
     EPMOE_ERR_FORMAT, "config.json", "model.layers.0.mlp.experts.gate_up_proj_blocks",
     "expected [8, 128, 5, 16]"},
    {"gpt-oss: experts not MXFP4", BASE_DEEPSEEK, go_config_not_mxfp4, EPMOE_ERR_UNSUPPORTED,
     "config.json", "quant_method", "is missing"},
    {"gpt-oss: config.json num_hidden_layers disagrees", BASE_DEEPSEEK, go_config_layers,
     EPMOE_ERR_FORMAT, "config.json", "model.layers.1.mlp.router.weight",
     "more layers than the config says"},
    {"gpt-oss: experts_per_token disagrees", BASE_DEEPSEEK, go_config_top_k, EPMOE_ERR_FORMAT,
     "config.json", "experts_per_token", "disagrees with \"num_experts_per_tok\" 4"},
    {"gpt-oss: router bias missing", BASE_DEEPSEEK, go_router_bias_missing, EPMOE_ERR_NOT_FOUND,
     EPMOE_ST_INDEX_FILE, GO_L1 "router.bias", "not found"},
    {"gpt-oss: NaN expert bias", BASE_DEEPSEEK, go_bias_nan, EPMOE_ERR_NUMERIC, NULL,
     GO_L1 "experts.down_proj_bias", "element [0, 5] is nan"},
    {"gpt-oss: MXFP4 scales with no exact NVFP4", BASE_DEEPSEEK, go_scales_no_nvfp4,
     EPMOE_ERR_UNSUPPORTED, NULL, GO_L1 "experts.gate_up_proj_scales (gate rows)", "expert 0"},
};

START_TEST(test_gptoss_broken_directories) {
    for (size_t i = 0; i < sizeof gptoss_catalogue / sizeof gptoss_catalogue[0]; i++) {
        const broken_case *c = &gptoss_catalogue[i];
        const char *dir = scratch_copy(gptoss_dir);
        char file[256];
        if (c->file) snprintf(file, sizeof file, "%s", c->file);
        else { /* the shard of the tensor named (its first word) */
            char tensor[160];
            snprintf(tensor, sizeof tensor, "%s", c->tensor);
            *strchrnul(tensor, ' ') = '\0';
            snprintf(file, sizeof file, "%s", shard_of(dir, tensor));
        }
        expect_refused(c, dir, file);
    }
    remove_dir(scratch_dir);
}
END_TEST

/* ---- writing: never through a symlink (common/paths.h) ---- */

static void plant_victim(const char *victim) {
    FILE *f = fopen(victim, "w");
    ck_assert_ptr_nonnull(f);
    fputs("keep me", f);
    fclose(f);
}

static void victim_intact(const char *victim) {
    struct stat sb;
    ck_assert_int_eq(stat(victim, &sb), 0);
    ck_assert_msg(sb.st_size == 7, "%s was written through a symlink (%lld bytes)", victim,
                  (long long)sb.st_size);
}

START_TEST(test_generator_never_follows_symlinks) {
    char dir[PATH_CAP], victim[PATH_CAP], link[2 * PATH_CAP];
    snprintf(victim, sizeof victim, "%s", epmoe_test_data_path("md_victim"));
    epmoe_config cfg;
    epmoe_gen_options opt = {.shard_bytes = 40000, .threads = 2};
    /* the temp name of a shard (epmoe layout) and of config.json (a model directory), each
     * planted as a symlink to a victim: refused naming it, the victim untouched */
    const char *layouts[2] = {"epmoe", "deepseek"}, *planted[2] = {"model-00000.safetensors.tmp",
                                                                   "config.json.tmp"};
    for (int i = 0; i < 2; i++) {
        snprintf(dir, sizeof dir, "%s", epmoe_test_data_path("md_symlink"));
        remove_dir(dir);
        ck_assert_int_eq(mkdir(dir, 0777), 0);
        plant_victim(victim);
        snprintf(link, sizeof link, "%s/%s", dir, planted[i]);
        ck_assert_int_eq(symlink(victim, link), 0);
        small_config(&cfg, layouts[i], "mxfp4");
        ck_assert_int_eq(epmoe_ckpt_generate(&cfg, &opt, dir, NULL), EPMOE_ERR_IO);
        ck_assert_msg(strstr(epmoe_last_error(), planted[i]) != NULL, "%s: %s", planted[i],
                      epmoe_last_error());
        victim_intact(victim);
    }
    /* a symlink at config.json itself is replaced by the file, never written through */
    remove_dir(dir);
    ck_assert_int_eq(mkdir(dir, 0777), 0);
    plant_victim(victim);
    snprintf(link, sizeof link, "%s/config.json", dir);
    ck_assert_int_eq(symlink(victim, link), 0);
    small_config(&cfg, "deepseek", "mxfp4");
    ck_assert_msg(epmoe_ckpt_generate(&cfg, &opt, dir, NULL) == EPMOE_OK, "%s",
                  epmoe_last_error());
    victim_intact(victim);
    struct stat sb;
    ck_assert_int_eq(lstat(link, &sb), 0);
    ck_assert(S_ISREG(sb.st_mode));
    remove_dir(dir);
    unlink(victim);
}
END_TEST

static Suite *model_dir_suite(void) {
    Suite *s = suite_create("model_dir");
    TCase *tc = tcase_create("model_dir");
    tcase_add_unchecked_fixture(tc, setup_dirs, NULL);
    tcase_add_unchecked_fixture(tc, setup_gptoss_dirs, NULL);
    tcase_set_timeout(tc, 600);
    tcase_add_test(tc, test_config_json);
    tcase_add_test(tc, test_same_weights_as_epmoe_layout);
    tcase_add_test(tc, test_opens_only_its_shards);
    tcase_add_test(tc, test_broken_directories);
    tcase_add_test(tc, test_accepted_variations);
    tcase_add_test(tc, test_mxfp4_zero_blocks_and_wide_span);
    tcase_add_test(tc, test_generator_never_follows_symlinks);
    tcase_add_test(tc, test_gptoss_config_json);
    tcase_add_test(tc, test_gptoss_same_weights_as_epmoe_layout);
    tcase_add_test(tc, test_gptoss_handmade_interleave_bias_activation);
    tcase_add_test(tc, test_gptoss_broken_directories);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) {
    SRunner *sr = srunner_create(model_dir_suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
