/* Real model directories (DeepSeek's layout and NVIDIA's NVFP4 one, docs/checkpoints.md), as
 * epmoe-gen writes them: config.json read back into the settings; every layer (the MTP block's
 * too) loads the same weights as the epmoe layout of the same seed, bit for bit; a rank opens
 * only the shards that hold its tensors and never reads the embedding or head shards; MXFP4
 * with all-zero blocks and a wide span loads and equals the reference; and a catalogue of
 * broken directories, each refused with a message naming the file and the tensor, nothing
 * left allocated, next to the variations the loader accepts; and the generator never writes
 * through a symlink planted at one of its file names. */
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

START_TEST(test_broken_directories) {
    for (size_t i = 0; i < sizeof catalogue / sizeof catalogue[0]; i++) {
        const broken_case *c = &catalogue[i];
        const char *dir = scratch_copy(c->base == BASE_DEEPSEEK ? deepseek_dir : nvidia_dir);
        char file[256];
        const char *shard_tensor = !c->file ? c->tensor : strncmp(c->file, "layers.", 7) == 0 ? c->file : NULL;
        snprintf(file, sizeof file, "%s", shard_tensor ? shard_of(dir, shard_tensor) : c->file);
        c->breaks(dir);
        epmoe_clear_error();
        epmoe_status st = load_dir(dir, NULL);
        const char *msg = epmoe_last_error();
        ck_assert_msg(st == c->expect, "%s: expected %s, got %s: %s", c->what,
                      epmoe_status_name(c->expect), epmoe_status_name(st), msg);
        ck_assert_msg(strstr(msg, file), "%s: the message does not name %s: %s", c->what, file,
                      msg);
        ck_assert_msg(strstr(msg, c->tensor), "%s: the message does not name %s: %s", c->what,
                      c->tensor, msg);
        ck_assert_msg(strstr(msg, c->detail), "%s: no '%s' in: %s", c->what, c->detail, msg);
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
    tcase_set_timeout(tc, 600);
    tcase_add_test(tc, test_config_json);
    tcase_add_test(tc, test_same_weights_as_epmoe_layout);
    tcase_add_test(tc, test_opens_only_its_shards);
    tcase_add_test(tc, test_broken_directories);
    tcase_add_test(tc, test_accepted_variations);
    tcase_add_test(tc, test_mxfp4_zero_blocks_and_wide_span);
    tcase_add_test(tc, test_generator_never_follows_symlinks);
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
