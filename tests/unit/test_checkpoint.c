/* Checkpoint layout, generator and per-rank loader: a generated tiny checkpoint in both weight
 * formats loads a rank's slice with the documented layout; MXFP4 converts exactly; corrupted
 * checkpoints fail naming file and tensor; the generator is deterministic. */
#include <check.h>
#include <dirent.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/checkpoint.h"
#include "common/config.h"
#include "common/layout.h"
#include "common/nvfp4.h"
#include "common/safetensors.h"
#include "kernels/ops.h"
#include "tests/support/test_support.h"
#include "worker/expert_weights.h"

#define N_LAYERS 2 /* layer 0 hash-routed, layer 1 score-routed */
#define RANKS 3
#define RANK 1
#define BAD_EXPERT 100 /* inside rank 1's slice [86, 171) of 256 experts */

static char nvfp4_dir[4096], mxfp4_dir[4096];

static void tiny_config(epmoe_config *cfg, const char *format) {
    ck_assert_int_eq(epmoe_config_preset(cfg, "tiny"), EPMOE_OK);
    ck_assert_int_eq(epmoe_config_set(cfg, "n_layers", "2"), EPMOE_OK);
    ck_assert_int_eq(epmoe_config_set(cfg, "n_hash_layers", "1"), EPMOE_OK);
    ck_assert_int_eq(epmoe_config_set(cfg, "weight_format", format), EPMOE_OK);
    ck_assert_int_eq(epmoe_config_set(cfg, "seed", "4242"), EPMOE_OK);
}

static void clean_dir(const char *dir) {
    DIR *d = opendir(dir);
    if (!d) return;
    struct dirent *ent;
    while ((ent = readdir(d)) != NULL) {
        if (ent->d_name[0] == '.') continue;
        char p[8192];
        snprintf(p, sizeof p, "%s/%s", dir, ent->d_name);
        unlink(p);
    }
    closedir(d);
}

static void generate_into(const char *name, const char *format, char *dir_out) {
    snprintf(dir_out, 4096, "%s", epmoe_test_data_path(name));
    clean_dir(dir_out);
    epmoe_config cfg;
    tiny_config(&cfg, format);
    epmoe_gen_stats stats = {0};
    epmoe_status st = epmoe_ckpt_generate(&cfg, NULL, dir_out, &stats);
    ck_assert_msg(st == EPMOE_OK, "%s", epmoe_last_error());
    ck_assert_int_eq(stats.layers, N_LAYERS);
    ck_assert_uint_gt(stats.bytes, 0);
}

static void setup_checkpoints(void) {
    generate_into("ckpt_nvfp4", "nvfp4", nvfp4_dir);
    generate_into("ckpt_mxfp4", "mxfp4", mxfp4_dir);
}

static epmoe_st_set *open_set(const char *path) {
    epmoe_st_set *s = NULL;
    epmoe_status st = epmoe_st_set_open(path, &s);
    ck_assert_msg(st == EPMOE_OK, "%s", epmoe_last_error());
    return s;
}

static epmoe_expert_slice rank_slice(const epmoe_config *cfg) {
    epmoe_expert_slice slice;
    ck_assert_int_eq(epmoe_slice_of_rank(cfg->n_routed_experts, RANKS, RANK, &slice), EPMOE_OK);
    return slice;
}

static const epmoe_st_tensor *tensor_of(const epmoe_st_set *s, int64_t layer, int64_t expert,
                                        const char *proj, const char *what) {
    char name[160];
    epmoe_config cfg;
    epmoe_config_defaults(&cfg);
    ck_assert_int_eq(epmoe_ckpt_expert_name(name, sizeof name, &cfg, layer, expert, proj, what),
                     EPMOE_OK);
    const epmoe_st_tensor *t = epmoe_st_set_find(s, name, NULL);
    ck_assert_msg(t != NULL, "%s missing", name);
    return t;
}

static float scalar_of(const epmoe_st_tensor *t) {
    float v;
    memcpy(&v, t->data, 4);
    return v;
}

/* ---- names and metadata ---- */

START_TEST(test_names) {
    char buf[160];
    epmoe_config cfg;
    tiny_config(&cfg, "nvfp4");
    ck_assert_int_eq(epmoe_ckpt_expert_name(buf, sizeof buf, &cfg, 1, 17, "w1", "weight_scale"),
                     EPMOE_OK);
    ck_assert_str_eq(buf, "layers.1.ffn.experts.17.w1.weight_scale");
    ck_assert_int_eq(epmoe_ckpt_gate_name(buf, sizeof buf, &cfg, 0, "tid2eid"), EPMOE_OK);
    ck_assert_str_eq(buf, "layers.0.ffn.gate.tid2eid");
    ck_assert_int_eq(epmoe_ckpt_shared_name(buf, sizeof buf, &cfg, 12, "w2", "weight"), EPMOE_OK);
    ck_assert_str_eq(buf, "layers.12.ffn.shared_experts.w2.weight");
    ck_assert_int_eq(epmoe_ckpt_layer_file_name(buf, sizeof buf, 7), EPMOE_OK);
    ck_assert_str_eq(buf, "model-00007.safetensors");
    ck_assert_int_eq(epmoe_ckpt_expert_name(buf, 10, &cfg, 3, 17, "w1", "weight"),
                     EPMOE_ERR_INVALID_ARG);
    ck_assert_int_eq(epmoe_ckpt_expert_name(buf, sizeof buf, &cfg, 3, 17, "w4", "weight"),
                     EPMOE_ERR_INVALID_ARG);
    ck_assert_int_eq(epmoe_ckpt_gate_name(buf, sizeof buf, &cfg, 0, "scale"), EPMOE_ERR_INVALID_ARG);
    /* the MTP block's layers are the last n_mtp_layers, named mtp.N */
    cfg.n_layers = 5;
    cfg.n_mtp_layers = 2;
    ck_assert_int_eq(epmoe_ckpt_gate_name(buf, sizeof buf, &cfg, 2, "bias"), EPMOE_OK);
    ck_assert_str_eq(buf, "layers.2.ffn.gate.bias");
    ck_assert_int_eq(epmoe_ckpt_expert_name(buf, sizeof buf, &cfg, 3, 9, "w2", "scale"), EPMOE_OK);
    ck_assert_str_eq(buf, "mtp.0.ffn.experts.9.w2.scale");
    ck_assert_int_eq(epmoe_ckpt_shared_name(buf, sizeof buf, &cfg, 4, "w1", "scale"), EPMOE_OK);
    ck_assert_str_eq(buf, "mtp.1.ffn.shared_experts.w1.scale");

    tiny_config(&cfg, "nvfp4");
    int64_t N, K;
    ck_assert_int_eq(epmoe_ckpt_expert_dims(&cfg, "w3", &N, &K), EPMOE_OK);
    ck_assert(N == cfg.moe_inter_size && K == cfg.hidden_size);
    ck_assert_int_eq(epmoe_ckpt_expert_dims(&cfg, "w2", &N, &K), EPMOE_OK);
    ck_assert(N == cfg.hidden_size && K == cfg.moe_inter_size);
}
END_TEST

START_TEST(test_config_from_checkpoint) {
    epmoe_st_set *s = open_set(mxfp4_dir);
    epmoe_config cfg;
    ck_assert_int_eq(epmoe_config_preset(&cfg, "dsv3"), EPMOE_OK); /* every model field differs */
    cfg.cpu_weight_cache_mib = 3;                                               /* runtime: kept */
    ck_assert_msg(epmoe_config_from_checkpoint(s, &cfg) == EPMOE_OK, "%s", epmoe_last_error());
    epmoe_config want;
    tiny_config(&want, "mxfp4");
    ck_assert_str_eq(cfg.preset, "tiny");
    ck_assert_int_eq(cfg.hidden_size, want.hidden_size);
    ck_assert_int_eq(cfg.moe_inter_size, want.moe_inter_size);
    ck_assert_int_eq(cfg.n_routed_experts, want.n_routed_experts);
    ck_assert_int_eq(cfg.top_k, want.top_k);
    ck_assert_int_eq(cfg.n_shared_experts, want.n_shared_experts);
    ck_assert(cfg.routed_scaling_factor == want.routed_scaling_factor);
    ck_assert_int_eq(cfg.scoring, want.scoring);
    ck_assert_int_eq(cfg.n_groups, want.n_groups);
    ck_assert_int_eq(cfg.topk_groups, want.topk_groups);
    ck_assert(cfg.swiglu_limit == want.swiglu_limit);
    ck_assert_int_eq(cfg.swiglu_variant, want.swiglu_variant);
    ck_assert_int_eq(cfg.n_layers, N_LAYERS);
    ck_assert_int_eq(cfg.n_hash_layers, 1);
    ck_assert_int_eq(cfg.vocab_size, want.vocab_size);
    ck_assert_int_eq(cfg.weight_format, EPMOE_WEIGHTS_MXFP4);
    ck_assert_int_eq(cfg.cpu_weight_cache_mib, 3);
    ck_assert_str_eq(epmoe_st_set_metadata(s, EPMOE_CKPT_META_FORMAT_VERSION),
                     EPMOE_CKPT_FORMAT_VERSION);
    epmoe_st_set_close(s);

    /* No metadata: an error that says so. Bad metadata: names the key. */
    char *path = strdup(epmoe_test_data_path("ckpt_no_meta.safetensors"));
    float one = 1.0f;
    epmoe_st_writer *w = NULL;
    ck_assert_int_eq(epmoe_st_writer_create(&w), EPMOE_OK);
    ck_assert_int_eq(epmoe_st_writer_add(w, "x", EPMOE_DTYPE_F32, 0, NULL, &one), EPMOE_OK);
    ck_assert_int_eq(epmoe_st_writer_finish(w, path), EPMOE_OK);
    epmoe_st_writer_free(w);
    s = open_set(path);
    ck_assert_int_eq(epmoe_config_from_checkpoint(s, &cfg), EPMOE_ERR_FORMAT);
    ck_assert_ptr_nonnull(strstr(epmoe_last_error(), "epmoe.format_version"));
    ck_assert_ptr_nonnull(strstr(epmoe_last_error(), "config.json"));
    ck_assert_ptr_nonnull(strstr(epmoe_last_error(), path));
    epmoe_st_set_close(s);

    tiny_config(&want, "nvfp4");
    ck_assert_int_eq(epmoe_st_writer_create(&w), EPMOE_OK);
    ck_assert_int_eq(epmoe_ckpt_write_metadata(w, &want), EPMOE_OK);
    ck_assert_int_eq(epmoe_st_writer_metadata(w, "epmoe.top_k", "six"), EPMOE_OK);
    ck_assert_int_eq(epmoe_st_writer_add(w, "x", EPMOE_DTYPE_F32, 0, NULL, &one), EPMOE_OK);
    ck_assert_int_eq(epmoe_st_writer_finish(w, path), EPMOE_OK);
    epmoe_st_writer_free(w);
    s = open_set(path);
    ck_assert_int_eq(epmoe_config_from_checkpoint(s, &cfg), EPMOE_ERR_INVALID_ARG);
    ck_assert_ptr_nonnull(strstr(epmoe_last_error(), "epmoe.top_k"));
    epmoe_st_set_close(s);
    unlink(path);
    free(path);
}
END_TEST

/* ---- loading a slice ---- */

static void check_replicated(const epmoe_st_set *s, const epmoe_config *cfg,
                             const epmoe_layer_weights *w, int64_t layer) {
    int64_t E = cfg->n_routed_experts, H = cfg->hidden_size;
    ck_assert_int_eq(w->layer, layer);
    ck_assert_int_eq(w->n_experts, E);
    /* gate: N(0, 1/sqrt(H)) */
    double sum2 = 0;
    for (int64_t i = 0; i < E * H; i++) sum2 += (double)w->gate_weight[i] * w->gate_weight[i];
    double std = sqrt(sum2 / (double)(E * H));
    ck_assert_msg(fabs(std * sqrt((double)H) - 1.0) < 0.05, "gate std %g", std);
    if (layer < cfg->n_hash_layers) {
        ck_assert_ptr_null(w->gate_bias);
        ck_assert_ptr_nonnull(w->tid2eid);
        for (int64_t t = 0; t < cfg->vocab_size; t++) {
            const int32_t *row = w->tid2eid + t * cfg->top_k;
            for (int64_t j = 0; j < cfg->top_k; j++) {
                ck_assert(row[j] >= 0 && row[j] < E);
                for (int64_t i = 0; i < j; i++) ck_assert_int_ne(row[i], row[j]);
            }
        }
    } else {
        ck_assert_ptr_null(w->tid2eid);
        ck_assert_ptr_nonnull(w->gate_bias);
        double b2 = 0;
        for (int64_t e = 0; e < E; e++) b2 += (double)w->gate_bias[e] * w->gate_bias[e];
        double bstd = sqrt(b2 / (double)E);
        ck_assert_msg(bstd > 0.07 && bstd < 0.13, "gate bias std %g", bstd);
    }
    /* shared expert: w1 rows then w3 rows, the BF16 values exactly */
    int64_t Is = cfg->n_shared_experts * cfg->moe_inter_size;
    ck_assert_int_eq(w->shared_inter, Is);
    const char *projs[3] = {"w1", "w3", "w2"};
    const float *dst[3] = {w->shared_w13, w->shared_w13 + Is * H, w->shared_w2};
    for (int p = 0; p < 3; p++) {
        char name[160];
        ck_assert_int_eq(epmoe_ckpt_shared_name(name, sizeof name, cfg, layer, projs[p], "weight"),
                         EPMOE_OK);
        const epmoe_st_tensor *t = epmoe_st_set_find(s, name, NULL);
        ck_assert_ptr_nonnull(t);
        float *ref = malloc((size_t)(Is * H) * sizeof *ref);
        ck_assert_int_eq(epmoe_convert_to_f32(EPMOE_DTYPE_BF16, t->data, (size_t)(Is * H), ref),
                         EPMOE_OK);
        ck_assert_int_eq(memcmp(ref, dst[p], (size_t)(Is * H) * sizeof *ref), 0);
        free(ref);
    }
}

START_TEST(test_load_nvfp4_slice) {
    epmoe_st_set *s = open_set(nvfp4_dir);
    epmoe_config cfg;
    epmoe_config_defaults(&cfg);
    ck_assert_int_eq(epmoe_config_from_checkpoint(s, &cfg), EPMOE_OK);
    epmoe_expert_slice slice = rank_slice(&cfg);
    int64_t H = cfg.hidden_size, I = cfg.moe_inter_size;
    for (int64_t layer = 0; layer < N_LAYERS; layer++) {
        epmoe_layer_weights w;
        epmoe_status st = epmoe_layer_weights_load(s, &cfg, layer, &slice, &w);
        ck_assert_msg(st == EPMOE_OK, "%s", epmoe_last_error());
        ck_assert_int_eq(w.hidden_size, H);
        ck_assert_int_eq(w.inter_size, I);
        ck_assert_int_eq(w.n_local, slice.end - slice.start);
        ck_assert(w.slice.start == slice.start && w.slice.end == slice.end);
        check_replicated(s, &cfg, &w, layer);

        int distinct_sf[256] = {0};
        for (int64_t j = 0; j < w.n_local; j++) {
            int64_t e = slice.start + j;
            const epmoe_st_tensor *w1 = tensor_of(s, layer, e, "w1", "weight");
            const epmoe_st_tensor *w3 = tensor_of(s, layer, e, "w3", "weight");
            const epmoe_st_tensor *w2 = tensor_of(s, layer, e, "w2", "weight");
            const uint8_t *codes13 = w.w13_codes + j * 2 * I * (H / 2);
            ck_assert_int_eq(memcmp(codes13, w1->data, (size_t)(I * H / 2)), 0);
            ck_assert_int_eq(memcmp(codes13 + I * H / 2, w3->data, (size_t)(I * H / 2)), 0);
            ck_assert_int_eq(memcmp(w.w2_codes + j * H * (I / 2), w2->data, (size_t)(H * I / 2)),
                             0);
            const epmoe_st_tensor *s1 = tensor_of(s, layer, e, "w1", "weight_scale");
            const epmoe_st_tensor *s3 = tensor_of(s, layer, e, "w3", "weight_scale");
            const epmoe_st_tensor *s2 = tensor_of(s, layer, e, "w2", "weight_scale");
            const uint8_t *sf13 = w.w13_sf + j * 2 * I * (H / 16);
            ck_assert_int_eq(memcmp(sf13, s1->data, (size_t)(I * H / 16)), 0);
            ck_assert_int_eq(memcmp(sf13 + I * H / 16, s3->data, (size_t)(I * H / 16)), 0);
            ck_assert_int_eq(memcmp(w.w2_sf + j * H * (I / 16), s2->data, (size_t)(H * I / 16)),
                             0);
            for (int64_t i = 0; i < I * H / 16; i++) distinct_sf[sf13[i]] = 1;

            float ws1 = scalar_of(tensor_of(s, layer, e, "w1", "weight_scale_2"));
            float ws3 = scalar_of(tensor_of(s, layer, e, "w3", "weight_scale_2"));
            ck_assert(w.w13_scale_2[2 * j] == ws1 && w.w13_scale_2[2 * j + 1] == ws3);
            ck_assert(ws1 != ws3); /* each its own amax */
            ck_assert(w.w2_scale_2[j] ==
                      scalar_of(tensor_of(s, layer, e, "w2", "weight_scale_2")));
            float in1 = scalar_of(tensor_of(s, layer, e, "w1", "input_scale"));
            float in3 = scalar_of(tensor_of(s, layer, e, "w3", "input_scale"));
            ck_assert(w.w13_input_scale[j] == fmaxf(in1, in3) && w.w13_input_scale[j] > 0);
            ck_assert(w.w2_input_scale[j] ==
                      scalar_of(tensor_of(s, layer, e, "w2", "input_scale")));
            /* a calibration value: amax of a normal sample (2..6) / 2688 */
            ck_assert(w.w13_input_scale[j] > 2.0f / 2688 && w.w13_input_scale[j] < 6.0f / 2688);
        }
        int n_distinct = 0;
        for (int i = 0; i < 256; i++) n_distinct += distinct_sf[i];
        ck_assert_msg(n_distinct > 40, "only %d distinct block scales", n_distinct);

        /* Dequantized rows of one expert spread over about two decades (per-row factors). */
        float *row = malloc((size_t)H * sizeof *row);
        double lo = INFINITY, hi = 0;
        for (int64_t r = 0; r < I; r++) {
            epmoe_poison_f32(row, (size_t)H);
            epmoe_nvfp4_dequantize_row(w.w13_codes + r * (H / 2), w.w13_sf + r * (H / 16),
                                       (size_t)H, w.w13_scale_2[0], row);
            ck_assert_uint_eq(epmoe_count_unwritten_f32(row, (size_t)H), 0);
            double s2 = 0;
            for (int64_t k = 0; k < H; k++) s2 += (double)row[k] * row[k];
            double rstd = sqrt(s2 / (double)H) * sqrt((double)H);
            lo = fmin(lo, rstd);
            hi = fmax(hi, rstd);
        }
        free(row);
        ck_assert_msg(hi / lo > 20 && hi / lo < 400, "row std spread %g..%g", lo, hi);

        /* CPU panels of the dense weights */
        ck_assert_int_eq(epmoe_layer_weights_prepare_cpu(&w), EPMOE_OK);
        ck_assert_ptr_nonnull(w.gate_panels);
        int64_t n = 37, k = 5;
        ck_assert(w.gate_panels[epmoe_cpu_panel_index(n, k, H)] == w.gate_weight[n * H + k]);
        ck_assert(w.shared_w2_panels[epmoe_cpu_panel_index(3, 7, w.shared_inter)] ==
                  w.shared_w2[3 * w.shared_inter + 7]);
        ck_assert_int_eq(epmoe_layer_weights_prepare_cpu(&w), EPMOE_OK); /* idempotent */
        epmoe_layer_weights_free(&w);
        ck_assert_ptr_null(w.w13_codes);
        ck_assert_ptr_null(w.gate_panels);
        epmoe_layer_weights_free(&w); /* safe twice */
    }
    epmoe_st_set_close(s);
}
END_TEST

START_TEST(test_load_mxfp4_converts_exactly) {
    epmoe_st_set *s = open_set(mxfp4_dir);
    epmoe_config cfg;
    epmoe_config_defaults(&cfg);
    ck_assert_int_eq(epmoe_config_from_checkpoint(s, &cfg), EPMOE_OK);
    ck_assert_int_eq(cfg.weight_format, EPMOE_WEIGHTS_MXFP4);
    epmoe_expert_slice slice = rank_slice(&cfg);
    int64_t H = cfg.hidden_size, I = cfg.moe_inter_size, layer = 1;
    epmoe_layer_weights w;
    epmoe_status st = epmoe_layer_weights_load(s, &cfg, layer, &slice, &w);
    ck_assert_msg(st == EPMOE_OK, "%s", epmoe_last_error());
    check_replicated(s, &cfg, &w, layer);
    float *got = malloc((size_t)H * sizeof *got), *want = malloc((size_t)H * sizeof *want);
    size_t nonzero = 0;
    for (int64_t j = 0; j < w.n_local; j++) {
        int64_t e = slice.start + j;
        const char *projs[3] = {"w1", "w3", "w2"};
        for (int p = 0; p < 3; p++) {
            int64_t N = p == 2 ? H : I, K = p == 2 ? I : H;
            const epmoe_st_tensor *codes = tensor_of(s, layer, e, projs[p], "weight");
            const epmoe_st_tensor *e8m0 = tensor_of(s, layer, e, projs[p], "scale");
            ck_assert_int_eq(codes->dtype, EPMOE_DTYPE_I8);
            ck_assert_int_eq(e8m0->dtype, EPMOE_DTYPE_F8_E8M0);
            const uint8_t *lcodes, *lsf;
            float scale_2;
            if (p < 2) {
                int64_t row0 = j * 2 * I + (p == 1 ? I : 0);
                lcodes = w.w13_codes + row0 * (H / 2);
                lsf = w.w13_sf + row0 * (H / 16);
                scale_2 = w.w13_scale_2[2 * j + p];
            } else {
                lcodes = w.w2_codes + j * H * (I / 2);
                lsf = w.w2_sf + j * H * (I / 16);
                scale_2 = w.w2_scale_2[j];
            }
            ck_assert_int_eq(memcmp(lcodes, codes->data, (size_t)(N * K / 2)), 0);
            for (int64_t r = 0; r < N; r++) {
                epmoe_poison_f32(got, (size_t)K);
                epmoe_poison_f32(want, (size_t)K);
                epmoe_mxfp4_dequantize_row((const uint8_t *)codes->data + r * (K / 2),
                                           (const uint8_t *)e8m0->data + r * (K / 32), (size_t)K,
                                           want);
                epmoe_nvfp4_dequantize_row(lcodes + r * (K / 2), lsf + r * (K / 16), (size_t)K,
                                           scale_2, got);
                ck_assert_uint_eq(epmoe_count_unwritten_f32(got, (size_t)K), 0);
                for (int64_t k = 0; k < K; k++) {
                    ck_assert_msg(got[k] == want[k], "expert %lld %s [%lld, %lld]: %g vs %g",
                                  (long long)e, projs[p], (long long)r, (long long)k,
                                  (double)got[k], (double)want[k]);
                    nonzero += want[k] != 0;
                }
            }
        }
        /* MXFP4 has no calibration: 0 means "none" (static scales need NVFP4). */
        ck_assert(w.w13_input_scale[j] == 0.0f && w.w2_input_scale[j] == 0.0f);
    }
    ck_assert_uint_gt(nonzero, (size_t)(w.n_local * 3 * H * I / 2));
    free(got);
    free(want);
    epmoe_layer_weights_free(&w);
    epmoe_st_set_close(s);
}
END_TEST

START_TEST(test_load_argument_errors) {
    epmoe_st_set *s = open_set(nvfp4_dir);
    epmoe_config cfg;
    epmoe_config_defaults(&cfg);
    ck_assert_int_eq(epmoe_config_from_checkpoint(s, &cfg), EPMOE_OK);
    epmoe_layer_weights w;
    epmoe_expert_slice slice = {10, 20};
    ck_assert_int_eq(epmoe_layer_weights_load(s, &cfg, N_LAYERS, &slice, &w), EPMOE_ERR_RANGE);
    ck_assert_int_eq(epmoe_layer_weights_load(s, &cfg, -1, &slice, &w), EPMOE_ERR_RANGE);
    epmoe_expert_slice outside = {250, 257};
    ck_assert_int_eq(epmoe_layer_weights_load(s, &cfg, 1, &outside, &w), EPMOE_ERR_RANGE);
    epmoe_expert_slice empty = {5, 5};
    ck_assert_int_eq(epmoe_layer_weights_load(s, &cfg, 1, &empty, &w), EPMOE_ERR_RANGE);
    /* The checkpoint is NVFP4: loading it as MXFP4 names the first missing tensor. */
    cfg.weight_format = EPMOE_WEIGHTS_MXFP4;
    ck_assert_int_eq(epmoe_layer_weights_load(s, &cfg, 1, &slice, &w), EPMOE_ERR_FORMAT);
    ck_assert_ptr_nonnull(strstr(epmoe_last_error(), "layers.1.ffn.experts.10.w1.weight"));
    ck_assert_ptr_null(w.gate_weight); /* freed on failure */
    epmoe_layer_weights zeroed;
    memset(&zeroed, 0, sizeof zeroed);
    epmoe_layer_weights_free(&zeroed);
    epmoe_st_set_close(s);
}
END_TEST

/* ---- corrupted checkpoints ---- */

typedef struct {
    const char *target; /* tensor to change */
    enum { M_NAN_SCALAR, M_BYTE, M_DROP, M_RESHAPE, M_I32, M_I32_DUP, M_F32_AT, M_BF16_NAN } kind;
    size_t at;          /* element index */
    uint8_t byte;
    int32_t i32;
} mutation;

/* Copies layer `layer` of checkpoint dir src into file dst, applying m. */
static void rewrite_layer(const char *src, int64_t layer, const epmoe_config *cfg,
                          const mutation *m, const char *dst) {
    char file[64], path[8192];
    ck_assert_int_eq(epmoe_ckpt_layer_file_name(file, sizeof file, layer), EPMOE_OK);
    snprintf(path, sizeof path, "%s/%s", src, file);
    epmoe_st_file *f = NULL;
    ck_assert_int_eq(epmoe_st_open(path, &f), EPMOE_OK);
    epmoe_st_writer *w = NULL;
    ck_assert_int_eq(epmoe_st_writer_create(&w), EPMOE_OK);
    ck_assert_int_eq(epmoe_ckpt_write_metadata(w, cfg), EPMOE_OK);
    int n = epmoe_st_count(f), found = 0;
    void **copies = calloc((size_t)n, sizeof *copies);
    for (int i = 0; i < n; i++) {
        const epmoe_st_tensor *t = epmoe_st_at(f, i);
        copies[i] = malloc(t->nbytes + 8);
        memcpy(copies[i], t->data, t->nbytes);
        int64_t shape[EPMOE_MAX_DIMS];
        memcpy(shape, t->shape, sizeof shape);
        int ndim = t->ndim;
        if (strcmp(t->name, m->target) == 0) {
            found = 1;
            unsigned char *b = copies[i];
            float nan = NAN;
            switch (m->kind) {
            case M_NAN_SCALAR: memcpy(b, &nan, 4); break;
            case M_F32_AT: memcpy(b + 4 * m->at, &nan, 4); break;
            case M_BYTE: b[m->at] = m->byte; break;
            case M_BF16_NAN: b[2 * m->at] = 0xc0, b[2 * m->at + 1] = 0x7f; break;
            case M_I32: memcpy(b + 4 * m->at, &m->i32, 4); break;
            case M_I32_DUP: memcpy(b + 4 * m->at, b + 4 * (m->at + 1), 4); break; /* = next */
            case M_DROP: continue;
            case M_RESHAPE: /* same bytes, [N, C] -> [N/2, 2C] */
                shape[0] /= 2;
                shape[1] *= 2;
                break;
            }
        }
        ck_assert_int_eq(epmoe_st_writer_add(w, t->name, t->dtype, ndim, shape, copies[i]),
                         EPMOE_OK);
    }
    ck_assert_msg(found, "no tensor %s in %s", m->target, path);
    ck_assert_int_eq(epmoe_st_writer_finish(w, dst), EPMOE_OK);
    epmoe_st_writer_free(w);
    for (int i = 0; i < n; i++) free(copies[i]);
    free(copies);
    epmoe_st_close(f);
}

static void expect_load_error(const char *src, int64_t layer, const char *format,
                              mutation m, epmoe_status code, const char *also) {
    epmoe_config cfg;
    tiny_config(&cfg, format);
    char *dst = strdup(epmoe_test_data_path("ckpt_corrupt.safetensors"));
    rewrite_layer(src, layer, &cfg, &m, dst);
    epmoe_st_set *s = open_set(dst);
    epmoe_expert_slice slice = rank_slice(&cfg);
    epmoe_layer_weights w;
    epmoe_clear_error();
    epmoe_status st = epmoe_layer_weights_load(s, &cfg, layer, &slice, &w);
    const char *msg = epmoe_last_error();
    ck_assert_msg(st == code, "%s: expected %s, got %s: %s", m.target, epmoe_status_name(code),
                  epmoe_status_name(st), msg);
    ck_assert_msg(strstr(msg, m.target) != NULL, "message does not name %s: %s", m.target, msg);
    ck_assert_msg(strstr(msg, dst) != NULL, "message does not name the file: %s", msg);
    if (also) ck_assert_msg(strstr(msg, also) != NULL, "no '%s' in: %s", also, msg);
    ck_assert_ptr_null(w.w13_codes);
    epmoe_st_set_close(s);
    unlink(dst);
    free(dst);
}

#define EXPERT(proj, what) "layers.1.ffn.experts.100." proj "." what

START_TEST(test_corrupt_nvfp4) {
    expect_load_error(nvfp4_dir, 1, "nvfp4", (mutation){EXPERT("w3", "weight_scale_2"),
                                                        M_NAN_SCALAR, 0, 0, 0},
                      EPMOE_ERR_NUMERIC, "nan");
    expect_load_error(nvfp4_dir, 1, "nvfp4",
                      (mutation){EXPERT("w2", "weight_scale"), M_BYTE, 77, 0xff, 0},
                      EPMOE_ERR_NUMERIC, "NaN");
    expect_load_error(nvfp4_dir, 1, "nvfp4",
                      (mutation){EXPERT("w1", "weight_scale"), M_BYTE, 3, 0x7f, 0},
                      EPMOE_ERR_NUMERIC, "NaN");
    expect_load_error(nvfp4_dir, 1, "nvfp4",
                      (mutation){EXPERT("w1", "weight_scale"), M_BYTE, 5, 0x90, 0},
                      EPMOE_ERR_NUMERIC, "negative");
    expect_load_error(nvfp4_dir, 1, "nvfp4",
                      (mutation){EXPERT("w2", "input_scale"), M_DROP, 0, 0, 0},
                      EPMOE_ERR_NOT_FOUND, "not found");
    expect_load_error(nvfp4_dir, 1, "nvfp4",
                      (mutation){EXPERT("w1", "weight_scale"), M_RESHAPE, 0, 0, 0},
                      EPMOE_ERR_FORMAT, "shape [64, 32], expected [128, 16]");
    expect_load_error(nvfp4_dir, 1, "nvfp4",
                      (mutation){EXPERT("w3", "weight"), M_RESHAPE, 0, 0, 0}, EPMOE_ERR_FORMAT,
                      "shape");
    expect_load_error(nvfp4_dir, 1, "nvfp4",
                      (mutation){"layers.1.ffn.gate.weight", M_F32_AT, 1234, 0, 0},
                      EPMOE_ERR_NUMERIC, "element 1234");
    expect_load_error(nvfp4_dir, 1, "nvfp4",
                      (mutation){"layers.1.ffn.gate.bias", M_DROP, 0, 0, 0}, EPMOE_ERR_NOT_FOUND,
                      NULL);
    expect_load_error(nvfp4_dir, 0, "nvfp4",
                      (mutation){"layers.0.ffn.gate.tid2eid", M_I32, 50, 0, 256},
                      EPMOE_ERR_RANGE, "256");
    expect_load_error(nvfp4_dir, 0, "nvfp4",
                      (mutation){"layers.0.ffn.gate.tid2eid", M_I32, 7, 0, -1}, EPMOE_ERR_RANGE,
                      "-1");
    /* element 12 = token 2 slot 0 (k = 6) takes slot 1's expert */
    expect_load_error(nvfp4_dir, 0, "nvfp4",
                      (mutation){"layers.0.ffn.gate.tid2eid", M_I32_DUP, 12, 0, 0},
                      EPMOE_ERR_FORMAT, "token 2 lists expert");
    expect_load_error(nvfp4_dir, 1, "nvfp4",
                      (mutation){"layers.1.ffn.shared_experts.w2.weight", M_BF16_NAN, 10, 0, 0},
                      EPMOE_ERR_NUMERIC, "element 10");
}
END_TEST

START_TEST(test_corrupt_mxfp4) {
    expect_load_error(mxfp4_dir, 1, "mxfp4",
                      (mutation){EXPERT("w2", "scale"), M_BYTE, 9, 0xff, 0}, EPMOE_ERR_NUMERIC,
                      "NaN");
    expect_load_error(mxfp4_dir, 1, "mxfp4",
                      (mutation){EXPERT("w1", "scale"), M_RESHAPE, 0, 0, 0}, EPMOE_ERR_FORMAT,
                      "shape");
    expect_load_error(mxfp4_dir, 1, "mxfp4", (mutation){EXPERT("w3", "weight"), M_DROP, 0, 0, 0},
                      EPMOE_ERR_NOT_FOUND, NULL);
    /* A scale exponent 30 binades below the rest cannot be converted exactly. */
    expect_load_error(mxfp4_dir, 1, "mxfp4", (mutation){EXPERT("w1", "scale"), M_BYTE, 0, 80, 0},
                      EPMOE_ERR_UNSUPPORTED, NULL);
}
END_TEST

/* ---- the generator ---- */

static void small_config(epmoe_config *cfg, const char *format, const char *seed) {
    epmoe_config_defaults(cfg);
    ck_assert_int_eq(epmoe_config_set(cfg, "hidden_size", "64"), EPMOE_OK);
    ck_assert_int_eq(epmoe_config_set(cfg, "moe_inter_size", "32"), EPMOE_OK);
    ck_assert_int_eq(epmoe_config_set(cfg, "n_routed_experts", "8"), EPMOE_OK);
    ck_assert_int_eq(epmoe_config_set(cfg, "top_k", "2"), EPMOE_OK);
    ck_assert_int_eq(epmoe_config_set(cfg, "n_layers", "2"), EPMOE_OK);
    ck_assert_int_eq(epmoe_config_set(cfg, "vocab_size", "64"), EPMOE_OK);
    ck_assert_int_eq(epmoe_config_set(cfg, "weight_format", format), EPMOE_OK);
    ck_assert_int_eq(epmoe_config_set(cfg, "seed", seed), EPMOE_OK);
}

static unsigned char *slurp(const char *path, size_t *n) {
    FILE *fp = fopen(path, "rb");
    ck_assert_msg(fp != NULL, "cannot open %s", path);
    fseek(fp, 0, SEEK_END);
    *n = (size_t)ftell(fp);
    fseek(fp, 0, SEEK_SET);
    unsigned char *b = malloc(*n + 1);
    ck_assert_uint_eq(fread(b, 1, *n, fp), *n);
    fclose(fp);
    return b;
}

static int same_file(const char *a, const char *b) {
    size_t na, nb;
    unsigned char *x = slurp(a, &na), *y = slurp(b, &nb);
    int same = na == nb && memcmp(x, y, na) == 0;
    free(x);
    free(y);
    return same;
}

START_TEST(test_generator_deterministic) {
    const char *formats[2] = {"nvfp4", "mxfp4"};
    for (int f = 0; f < 2; f++) {
        char a[4096], b[4096], c[4096];
        snprintf(a, sizeof a, "%s", epmoe_test_data_path("gen_a.safetensors"));
        snprintf(b, sizeof b, "%s", epmoe_test_data_path("gen_b.safetensors"));
        snprintf(c, sizeof c, "%s", epmoe_test_data_path("gen_c.safetensors"));
        epmoe_config cfg;
        for (int64_t layer = 0; layer < 2; layer++) {
            small_config(&cfg, formats[f], "7");
            ck_assert_int_eq(epmoe_ckpt_generate_layer(&cfg, NULL, layer, a, NULL), EPMOE_OK);
            ck_assert_int_eq(epmoe_ckpt_generate_layer(&cfg, NULL, layer, b, NULL), EPMOE_OK);
            small_config(&cfg, formats[f], "8");
            epmoe_gen_stats stats = {0};
            ck_assert_int_eq(epmoe_ckpt_generate_layer(&cfg, NULL, layer, c, &stats), EPMOE_OK);
            ck_assert_msg(same_file(a, b), "%s layer %lld: same seed, different bytes",
                          formats[f], (long long)layer);
            ck_assert_msg(!same_file(a, c), "%s layer %lld: different seeds, same bytes",
                          formats[f], (long long)layer);
            /* every tensor of the layout: gate + bias/tid2eid + 3 shared + 8 experts x 3 x k */
            ck_assert_int_eq(stats.tensors, 2 + 3 + 8 * 3 * (f == 0 ? 4 : 2));
            ck_assert_int_eq(stats.layers, 1);
        }
        unlink(a);
        unlink(b);
        unlink(c);
    }
    /* Another layer gives other values; a layer does not depend on how many are generated. */
    epmoe_config cfg;
    small_config(&cfg, "nvfp4", "7");
    char *p = strdup(epmoe_test_data_path("gen_l1.safetensors"));
    ck_assert_int_eq(epmoe_ckpt_generate_layer(&cfg, NULL, 1, p, NULL), EPMOE_OK);
    epmoe_st_set *s = open_set(p);
    const epmoe_st_tensor *g1 = epmoe_st_set_find(s, "layers.1.ffn.gate.weight", NULL);
    ck_assert_ptr_nonnull(g1);
    ck_assert_int_eq(epmoe_ckpt_generate_layer(&cfg, NULL, 5, p, NULL), EPMOE_ERR_RANGE);
    epmoe_st_set_close(s);
    unlink(p);
    free(p);
}
END_TEST

START_TEST(test_generator_skew_and_refusals) {
    epmoe_config cfg;
    small_config(&cfg, "nvfp4", "3");
    ck_assert_int_eq(epmoe_config_set(&cfg, "n_routed_experts", "64"), EPMOE_OK);
    ck_assert_int_eq(epmoe_config_set(&cfg, "vocab_size", "4096"), EPMOE_OK);
    char *p = strdup(epmoe_test_data_path("gen_skew.safetensors"));
    double mean_id[2], bias_gap[2];
    for (int skewed = 0; skewed < 2; skewed++) {
        epmoe_gen_options opt = {.skew = skewed ? 1.5 : 0.0};
        ck_assert_int_eq(epmoe_ckpt_generate_layer(&cfg, &opt, 0, p, NULL), EPMOE_OK);
        epmoe_st_set *s = open_set(p);
        const epmoe_st_tensor *t = NULL;
        ck_assert_int_eq(epmoe_st_set_require(s, "layers.0.ffn.gate.tid2eid", EPMOE_DTYPE_I32, 2,
                                              (int64_t[]){4096, 2}, &t),
                         EPMOE_OK);
        const int32_t *ids = t->data;
        double sum = 0;
        for (int i = 0; i < 4096 * 2; i++) sum += ids[i];
        mean_id[skewed] = sum / (4096 * 2);
        epmoe_st_set_close(s);
        ck_assert_int_eq(epmoe_ckpt_generate_layer(&cfg, &opt, 1, p, NULL), EPMOE_OK);
        s = open_set(p);
        ck_assert_int_eq(epmoe_st_set_require(s, "layers.1.ffn.gate.bias", EPMOE_DTYPE_F32, 1,
                                              (int64_t[]){64}, &t),
                         EPMOE_OK);
        float b[64];
        memcpy(b, t->data, sizeof b);
        double lo = 0, hi = 0;
        for (int e = 0; e < 8; e++) lo += b[e] / 8, hi += b[56 + e] / 8;
        bias_gap[skewed] = lo - hi;
        epmoe_st_set_close(s);
    }
    ck_assert_msg(fabs(mean_id[0] - 31.5) < 2.0, "balanced mean id %g", mean_id[0]);
    ck_assert_msg(mean_id[1] < 20.0, "skewed mean id %g", mean_id[1]);
    ck_assert_msg(fabs(bias_gap[0]) < 0.15, "balanced bias gap %g", bias_gap[0]);
    ck_assert_msg(bias_gap[1] > 1.0, "skewed bias gap %g", bias_gap[1]);
    unlink(p);
    free(p);

    /* A directory with other *.safetensors is refused (they would join the checkpoint). */
    char *dir = strdup(epmoe_test_data_path("gen_foreign"));
    mkdir(dir, 0777);
    clean_dir(dir);
    char other[8192];
    snprintf(other, sizeof other, "%s/model-00009.safetensors", dir);
    FILE *fp = fopen(other, "wb");
    ck_assert_ptr_nonnull(fp);
    fclose(fp);
    ck_assert_int_eq(epmoe_ckpt_generate(&cfg, NULL, dir, NULL), EPMOE_ERR_INVALID_ARG);
    ck_assert_ptr_nonnull(strstr(epmoe_last_error(), "model-00009.safetensors"));
    unlink(other);
    epmoe_gen_stats stats = {0};
    ck_assert_int_eq(epmoe_ckpt_generate(&cfg, NULL, dir, &stats), EPMOE_OK);
    ck_assert_int_eq(stats.layers, 2);
    ck_assert_int_eq(epmoe_ckpt_generate(&cfg, NULL, dir, NULL), EPMOE_OK); /* overwrite ok */
    clean_dir(dir);
    rmdir(dir);
    free(dir);
}
END_TEST

START_TEST(test_input_file) {
    epmoe_config cfg;
    small_config(&cfg, "nvfp4", "1");
    char *p = strdup(epmoe_test_data_path("gen_input.safetensors"));
    char *q = strdup(epmoe_test_data_path("gen_input2.safetensors"));
    const int64_t T = 300, H = cfg.hidden_size;
    ck_assert_int_eq(epmoe_gen_input_file(&cfg, T, EPMOE_DTYPE_F32, 99, p), EPMOE_OK);
    ck_assert_int_eq(epmoe_gen_input_file(&cfg, T, EPMOE_DTYPE_F32, 99, q), EPMOE_OK);
    ck_assert(same_file(p, q));
    epmoe_st_set *s = open_set(p);
    const epmoe_st_tensor *x = NULL, *ids = NULL;
    ck_assert_int_eq(epmoe_st_set_require(s, "hidden_states", EPMOE_DTYPE_F32, 2,
                                          (int64_t[]){T, H}, &x),
                     EPMOE_OK);
    ck_assert_int_eq(epmoe_st_set_require(s, "token_ids", EPMOE_DTYPE_I32, 1, (int64_t[]){T},
                                          &ids),
                     EPMOE_OK);
    float *v = malloc((size_t)(T * H) * sizeof *v);
    memcpy(v, x->data, (size_t)(T * H) * sizeof *v);
    size_t big = 0;
    double sum2 = 0;
    for (int64_t i = 0; i < T * H; i++) {
        ck_assert(isfinite(v[i]));
        if (fabsf(v[i]) >= 20.0f) big++;
        else sum2 += (double)v[i] * v[i];
    }
    ck_assert_uint_ge(big, 10); /* outliers that make the clamp fire */
    ck_assert_uint_le(big, (size_t)(T * H / 100));
    double std = sqrt(sum2 / (double)(T * H - (int64_t)big));
    ck_assert_msg(fabs(std - 1.0) < 0.05, "std %g", std);
    int32_t id;
    for (int64_t t = 0; t < T; t++) {
        memcpy(&id, (const char *)ids->data + 4 * t, 4);
        ck_assert(id >= 0 && id < cfg.vocab_size);
    }
    epmoe_st_set_close(s);

    /* BF16 holds the F32 values rounded; another seed gives other values. */
    ck_assert_int_eq(epmoe_gen_input_file(&cfg, T, EPMOE_DTYPE_BF16, 99, q), EPMOE_OK);
    s = open_set(q);
    ck_assert_int_eq(epmoe_st_set_require(s, "hidden_states", EPMOE_DTYPE_BF16, 2,
                                          (int64_t[]){T, H}, &x),
                     EPMOE_OK);
    float *w = malloc((size_t)(T * H) * sizeof *w);
    ck_assert_int_eq(epmoe_convert_to_f32(EPMOE_DTYPE_BF16, x->data, (size_t)(T * H), w),
                     EPMOE_OK);
    for (int64_t i = 0; i < T * H; i++) ck_assert(fabsf(w[i] - v[i]) <= fabsf(v[i]) * 0x1p-8f);
    epmoe_st_set_close(s);
    ck_assert_int_eq(epmoe_gen_input_file(&cfg, T, EPMOE_DTYPE_F32, 100, q), EPMOE_OK);
    ck_assert(!same_file(p, q));
    ck_assert_int_eq(epmoe_gen_input_file(&cfg, T, EPMOE_DTYPE_I32, 100, q),
                     EPMOE_ERR_INVALID_ARG);
    ck_assert_int_eq(epmoe_gen_input_file(&cfg, 0, EPMOE_DTYPE_F32, 100, q),
                     EPMOE_ERR_INVALID_ARG);
    free(v);
    free(w);
    unlink(p);
    unlink(q);
    free(p);
    free(q);
}
END_TEST

/* The bytes do not depend on the thread count; the plan's size is the files' size. */
typedef struct {
    int plans;
    uint64_t planned;
    uint64_t last_done;
} gen_watch;

static void watch_plan(void *ctx, const epmoe_gen_plan_info *info) {
    gen_watch *w = ctx;
    w->plans++;
    w->planned = info->total_bytes;
    ck_assert(info->bytes_per_second > 0 && info->files > 0 && info->tensors > 0);
}

static void watch_progress(void *ctx, uint64_t done, uint64_t total) {
    gen_watch *w = ctx;
    ck_assert(done <= total && total == w->planned && done >= w->last_done);
    w->last_done = done;
}

static uint64_t dir_bytes_and_compare(const char *a, const char *b) {
    DIR *d = opendir(a);
    ck_assert_ptr_nonnull(d);
    struct dirent *ent;
    uint64_t total = 0;
    int files = 0;
    while ((ent = readdir(d)) != NULL) {
        if (ent->d_name[0] == '.') continue;
        char pa[8192], pb[8192];
        snprintf(pa, sizeof pa, "%s/%s", a, ent->d_name);
        snprintf(pb, sizeof pb, "%s/%s", b, ent->d_name);
        ck_assert_msg(same_file(pa, pb), "%s differs between thread counts", ent->d_name);
        struct stat sb;
        ck_assert_int_eq(stat(pa, &sb), 0);
        size_t n = strlen(ent->d_name);
        if (n > 12 && strcmp(ent->d_name + n - 12, ".safetensors") == 0)
            total += (uint64_t)sb.st_size;
        files++;
    }
    closedir(d);
    ck_assert_int_gt(files, 0);
    return total;
}

START_TEST(test_generator_threads) {
    const char *layouts[3] = {"epmoe", "deepseek", "nvidia-nvfp4"};
    for (int l = 0; l < 3; l++) {
        char a[4096], b[4096];
        snprintf(a, sizeof a, "%s", epmoe_test_data_path("gen_threads_a"));
        snprintf(b, sizeof b, "%s", epmoe_test_data_path("gen_threads_b"));
        clean_dir(a);
        clean_dir(b);
        epmoe_config cfg;
        small_config(&cfg, l == 1 ? "mxfp4" : "nvfp4", "5");
        ck_assert_int_eq(epmoe_config_set(&cfg, "checkpoint_layout", layouts[l]), EPMOE_OK);
        ck_assert_int_eq(epmoe_config_set(&cfg, "fp8_block_size", "16"), EPMOE_OK);
        gen_watch watch = {0, 0, 0};
        epmoe_gen_options one = {.threads = 1, .shard_bytes = 20000, .on_plan = watch_plan,
                                 .on_progress = watch_progress, .ctx = &watch};
        epmoe_gen_options three = {.threads = 3, .shard_bytes = 20000};
        epmoe_gen_stats sa = {0}, sb = {0};
        ck_assert_msg(epmoe_ckpt_generate(&cfg, &one, a, &sa) == EPMOE_OK, "%s", epmoe_last_error());
        ck_assert_msg(epmoe_ckpt_generate(&cfg, &three, b, &sb) == EPMOE_OK, "%s", epmoe_last_error());
        ck_assert_int_eq(watch.plans, 1);
        ck_assert_uint_eq(watch.last_done, watch.planned); /* the final report is complete */
        ck_assert_uint_eq(sa.bytes, watch.planned);
        ck_assert_uint_eq(dir_bytes_and_compare(a, b), sa.bytes);
        ck_assert(sa.tensors == sb.tensors && sa.layers == 2);
        clean_dir(a);
        clean_dir(b);
        rmdir(a);
        rmdir(b);
    }
    /* an epmoe-layout directory is refused where a model directory's files would confuse it */
    char c[4096], cfgjson[8192];
    snprintf(c, sizeof c, "%s", epmoe_test_data_path("gen_threads_c"));
    mkdir(c, 0777);
    clean_dir(c);
    snprintf(cfgjson, sizeof cfgjson, "%s/config.json", c);
    FILE *fp = fopen(cfgjson, "w");
    ck_assert_ptr_nonnull(fp);
    fputs("{}", fp);
    fclose(fp);
    epmoe_config cfg;
    small_config(&cfg, "nvfp4", "5");
    ck_assert_int_eq(epmoe_ckpt_generate(&cfg, NULL, c, NULL), EPMOE_ERR_INVALID_ARG);
    ck_assert_ptr_nonnull(strstr(epmoe_last_error(), "config.json"));
    /* and a real layout cannot hold the step SwiGLU variant (config.json has no key for it) */
    ck_assert_int_eq(epmoe_config_set(&cfg, "checkpoint_layout", "nvidia-nvfp4"), EPMOE_OK);
    ck_assert_int_eq(epmoe_config_set(&cfg, "swiglu_variant", "step"), EPMOE_OK);
    ck_assert_int_eq(epmoe_ckpt_generate(&cfg, NULL, c, NULL), EPMOE_ERR_INVALID_ARG);
    ck_assert_ptr_nonnull(strstr(epmoe_last_error(), "swiglu_variant step"));
    unlink(cfgjson);
    rmdir(c);
}
END_TEST

static Suite *checkpoint_suite(void) {
    Suite *s = suite_create("checkpoint");
    TCase *names = tcase_create("names");
    tcase_add_test(names, test_names);
    suite_add_tcase(s, names);

    TCase *load = tcase_create("load");
    tcase_add_unchecked_fixture(load, setup_checkpoints, NULL);
    tcase_set_timeout(load, 300);
    tcase_add_test(load, test_config_from_checkpoint);
    tcase_add_test(load, test_load_nvfp4_slice);
    tcase_add_test(load, test_load_mxfp4_converts_exactly);
    tcase_add_test(load, test_load_argument_errors);
    tcase_add_test(load, test_corrupt_nvfp4);
    tcase_add_test(load, test_corrupt_mxfp4);
    suite_add_tcase(s, load);

    TCase *gen = tcase_create("generator");
    tcase_set_timeout(gen, 300);
    tcase_add_test(gen, test_generator_deterministic);
    tcase_add_test(gen, test_generator_skew_and_refusals);
    tcase_add_test(gen, test_input_file);
    tcase_add_test(gen, test_generator_threads);
    suite_add_tcase(s, gen);
    return s;
}

int main(void) {
    SRunner *sr = srunner_create(checkpoint_suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
