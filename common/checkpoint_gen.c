/* The synthetic checkpoint generator (layout and value distributions: common/checkpoint.h).
 *
 * A layer file is written through the safetensors writer's deferred tensors: each tensor is
 * produced when the writer reaches it, so memory stays at one projection's fp32 values plus
 * its quantized forms, whatever the preset. The four tensors of one expert projection come
 * from one quantization, cached until the writer moves on to the next projection.
 */
#include <dirent.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "common/checkpoint.h"
#include "common/nvfp4.h"
#include "common/rng.h"

#define NAME_CAP 160

/* ---- deterministic streams: one per (layer, expert, what) ---- */

enum {
    STREAM_GATE_WEIGHT = 1,
    STREAM_GATE_BIAS,
    STREAM_TID2EID,
    STREAM_SHARED_W1,
    STREAM_SHARED_W3,
    STREAM_SHARED_W2,
    STREAM_EXPERT_W1,
    STREAM_EXPERT_W3,
    STREAM_EXPERT_W2,
    STREAM_INPUT_SCALE_W13,
    STREAM_INPUT_SCALE_W2,
    STREAM_INPUT_FILE,
};

static uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static void stream_seed(epmoe_rng *r, uint64_t seed, int64_t layer, int64_t expert, int what) {
    uint64_t h = mix64(seed + 0x9e3779b97f4a7c15ull);
    h = mix64(h ^ ((uint64_t)(layer + 1) * 0xd1b54a32d192ed03ull));
    h = mix64(h ^ ((uint64_t)(expert + 2) * 0xabc98388fb8fac03ull));
    h = mix64(h ^ ((uint64_t)what * 0x8cb92ba72f3d8dd7ull));
    epmoe_rng_seed(r, h);
}

/* ---- value distributions ---- */

/* [N, K] weights: N(0, 1/sqrt(K)) times a per-row factor 10^U(-1,1) (two decades, so block
 * and tensor scales vary), plus ~1 outlier per 8192 elements at 10..30 times its row's std. */
static epmoe_status fill_weight(epmoe_rng *r, int64_t N, int64_t K, float *x) {
    float *row_std = malloc((size_t)N * sizeof *row_std);
    EPMOE_REQUIRE(row_std != NULL, EPMOE_ERR_OOM, "row factors of a [%lld, %lld] weight",
                  (long long)N, (long long)K);
    float base = 1.0f / sqrtf((float)K);
    for (int64_t n = 0; n < N; n++) {
        row_std[n] = base * powf(10.0f, 2.0f * epmoe_rng_uniform(r) - 1.0f);
        for (int64_t k = 0; k < K; k++) x[n * K + k] = row_std[n] * epmoe_rng_normal(r);
    }
    int64_t outliers = 1 + N * K / 8192;
    for (int64_t i = 0; i < outliers; i++) {
        int64_t at = (int64_t)epmoe_rng_below(r, (uint64_t)(N * K));
        float sign = (epmoe_rng_next(r) & 1) ? 1.0f : -1.0f;
        x[at] = sign * row_std[at / K] * (10.0f + 20.0f * epmoe_rng_uniform(r));
    }
    free(row_std);
    return EPMOE_OK;
}

/* A calibration input_scale: amax of n standard normals / 2688, a typical value rather than
 * the extreme ones runtime data reaches. */
static float calibration_input_scale(epmoe_rng *r, int64_t n) {
    float amax = 0.0f;
    for (int64_t i = 0; i < n; i++) amax = fmaxf(amax, fabsf(epmoe_rng_normal(r)));
    return amax / EPMOE_FP4_AMAX_TO_GLOBAL_SF;
}

/* ---- the tensors of one layer ---- */

typedef enum {
    T_GATE_WEIGHT,
    T_GATE_BIAS,
    T_TID2EID,
    T_SHARED,
    T_EXPERT,
} tensor_kind;

typedef enum {
    PART_WEIGHT,         /* NVFP4 U8 codes / MXFP4 I8 codes */
    PART_WEIGHT_SCALE,   /* NVFP4 block scales */
    PART_WEIGHT_SCALE_2, /* NVFP4 tensor scale */
    PART_INPUT_SCALE,    /* NVFP4 calibration */
    PART_MX_SCALE,       /* MXFP4 UE8M0 block scales */
} expert_part;

typedef struct layer_gen layer_gen;

typedef struct {
    layer_gen *gen;
    tensor_kind kind;
    int proj; /* 0 = w1, 1 = w3, 2 = w2 */
    int64_t expert;
    expert_part part;
} tensor_job;

static const char *const proj_names[3] = {"w1", "w3", "w2"};

struct layer_gen {
    const epmoe_config *cfg;
    const epmoe_gen_options *opt;
    int64_t layer;
    /* the projection whose quantized forms are cached */
    int64_t cached_expert;
    int cached_proj;
    float *values;     /* [N, K] fp32, the largest projection */
    uint8_t *codes;    /* [N, K/2] */
    uint8_t *block_sf; /* [N, K/16] NVFP4 or [N, K/32] MXFP4 */
    float weight_scale_2;
    float input_scale;
};

static void proj_dims(const epmoe_config *cfg, int proj, int64_t *N, int64_t *K) {
    *N = proj == 2 ? cfg->hidden_size : cfg->moe_inter_size;
    *K = proj == 2 ? cfg->moe_inter_size : cfg->hidden_size;
}

static epmoe_status quantize_projection(layer_gen *g, int64_t expert, int proj) {
    if (g->cached_expert == expert && g->cached_proj == proj) return EPMOE_OK;
    const epmoe_config *cfg = g->cfg;
    int64_t N, K;
    proj_dims(cfg, proj, &N, &K);
    epmoe_rng r;
    stream_seed(&r, (uint64_t)cfg->seed, g->layer, expert, STREAM_EXPERT_W1 + proj);
    EPMOE_TRY(fill_weight(&r, N, K, g->values));

    if (cfg->weight_format == EPMOE_WEIGHTS_MXFP4) {
        for (int64_t n = 0; n < N; n++)
            epmoe_mxfp4_quantize_row(g->values + n * K, (size_t)K, g->codes + n * (K / 2),
                                     g->block_sf + n * (K / EPMOE_MXFP4_BLOCK));
    } else {
        /* w1 and w3 are quantized each with its own amax, as separate checkpoint tensors. */
        float amax = epmoe_amax(g->values, (size_t)(N * K));
        EPMOE_REQUIRE(isfinite(amax), EPMOE_ERR_INTERNAL, "generated weights are not finite");
        float global_sf = epmoe_nvfp4_global_sf(amax);
        for (int64_t n = 0; n < N; n++)
            epmoe_nvfp4_quantize_row(g->values + n * K, (size_t)K, global_sf,
                                     g->codes + n * (K / 2),
                                     g->block_sf + n * (K / EPMOE_NVFP4_BLOCK));
        g->weight_scale_2 = amax / EPMOE_FP4_AMAX_TO_GLOBAL_SF;
        /* w1 and w3 see the same input, hence the same calibration. */
        epmoe_rng rc;
        stream_seed(&rc, (uint64_t)cfg->seed, g->layer, expert,
                    proj == 2 ? STREAM_INPUT_SCALE_W2 : STREAM_INPUT_SCALE_W13);
        g->input_scale = calibration_input_scale(&rc, K);
    }
    g->cached_expert = expert;
    g->cached_proj = proj;
    return EPMOE_OK;
}

static epmoe_status fill_expert(const tensor_job *job, void *dst, size_t nbytes) {
    layer_gen *g = job->gen;
    EPMOE_TRY(quantize_projection(g, job->expert, job->proj));
    const void *src = NULL;
    switch (job->part) {
    case PART_WEIGHT: src = g->codes; break;
    case PART_WEIGHT_SCALE:
    case PART_MX_SCALE: src = g->block_sf; break;
    case PART_WEIGHT_SCALE_2: src = &g->weight_scale_2; break;
    case PART_INPUT_SCALE: src = &g->input_scale; break;
    }
    memcpy(dst, src, nbytes);
    return EPMOE_OK;
}

/* Samples k distinct experts, expert e with weight w[e]. */
static void sample_distinct(epmoe_rng *r, const double *w, int64_t E, int64_t k, char *taken,
                            int32_t *out) {
    memset(taken, 0, (size_t)E);
    for (int64_t j = 0; j < k; j++) {
        double total = 0;
        for (int64_t e = 0; e < E; e++)
            if (!taken[e]) total += w[e];
        double u = (double)epmoe_rng_uniform(r) * total, acc = 0;
        int64_t pick = -1;
        for (int64_t e = 0; e < E; e++) {
            if (taken[e]) continue;
            pick = e; /* the last free expert absorbs rounding at the top end */
            acc += w[e];
            if (u < acc) break;
        }
        taken[pick] = 1;
        out[j] = (int32_t)pick;
    }
}

static double skew_position(int64_t e, int64_t E) {
    return E > 1 ? 1.0 - (double)e / (double)(E - 1) : 0.0;
}

static epmoe_status fill_tid2eid(const layer_gen *g, int32_t *ids) {
    const epmoe_config *cfg = g->cfg;
    int64_t E = cfg->n_routed_experts, k = cfg->top_k, V = cfg->vocab_size;
    double *w = malloc((size_t)E * sizeof *w);
    char *taken = malloc((size_t)E);
    if (!w || !taken) {
        free(w);
        free(taken);
        EPMOE_FAIL(EPMOE_ERR_OOM, "tid2eid sampling buffers for %lld experts", (long long)E);
    }
    for (int64_t e = 0; e < E; e++) w[e] = exp(4.0 * g->opt->skew * skew_position(e, E));
    epmoe_rng r;
    stream_seed(&r, (uint64_t)cfg->seed, g->layer, -1, STREAM_TID2EID);
    for (int64_t t = 0; t < V; t++) sample_distinct(&r, w, E, k, taken, ids + t * k);
    free(w);
    free(taken);
    return EPMOE_OK;
}

static epmoe_status fill_tensor(void *ctx, const char *name, void *dst, size_t nbytes) {
    (void)name;
    const tensor_job *job = ctx;
    layer_gen *g = job->gen;
    const epmoe_config *cfg = g->cfg;
    int64_t E = cfg->n_routed_experts, H = cfg->hidden_size;
    epmoe_rng r;
    switch (job->kind) {
    case T_GATE_WEIGHT: {
        float *x = dst; /* the writer's scratch buffer is malloc'd: aligned */
        stream_seed(&r, (uint64_t)cfg->seed, g->layer, -1, STREAM_GATE_WEIGHT);
        float std = 1.0f / sqrtf((float)H);
        for (int64_t i = 0; i < E * H; i++) x[i] = std * epmoe_rng_normal(&r);
        return EPMOE_OK;
    }
    case T_GATE_BIAS: {
        float *b = dst;
        stream_seed(&r, (uint64_t)cfg->seed, g->layer, -1, STREAM_GATE_BIAS);
        for (int64_t e = 0; e < E; e++)
            b[e] = 0.1f * epmoe_rng_normal(&r) + (float)(g->opt->skew * skew_position(e, E));
        return EPMOE_OK;
    }
    case T_TID2EID: return fill_tid2eid(g, dst);
    case T_SHARED: {
        int64_t Is = epmoe_ckpt_shared_inter(cfg);
        int64_t N = job->proj == 2 ? H : Is, K = job->proj == 2 ? Is : H;
        float *x = malloc((size_t)(N * K) * sizeof *x);
        EPMOE_REQUIRE(x != NULL, EPMOE_ERR_OOM, "shared expert values [%lld, %lld]",
                      (long long)N, (long long)K);
        stream_seed(&r, (uint64_t)cfg->seed, g->layer, -1, STREAM_SHARED_W1 + job->proj);
        epmoe_status st = fill_weight(&r, N, K, x);
        if (st == EPMOE_OK)
            st = epmoe_convert_from_f32(x, (size_t)(N * K), EPMOE_DTYPE_BF16, dst);
        free(x);
        (void)nbytes;
        return st;
    }
    case T_EXPERT: return fill_expert(job, dst, nbytes);
    }
    EPMOE_FAIL(EPMOE_ERR_INTERNAL, "unknown tensor kind %d", (int)job->kind);
}

/* ---- one layer file ---- */

typedef struct {
    tensor_job *jobs;
    int n, cap;
} job_list;

static epmoe_status add_job(epmoe_st_writer *w, job_list *jobs, tensor_job job, const char *name,
                            epmoe_dtype dtype, int ndim, const int64_t *shape) {
    EPMOE_REQUIRE(jobs->n < jobs->cap, EPMOE_ERR_INTERNAL, "generator job list overflow");
    jobs->jobs[jobs->n] = job;
    EPMOE_TRY(epmoe_st_writer_add_deferred(w, name, dtype, ndim, shape, fill_tensor,
                                           &jobs->jobs[jobs->n]));
    jobs->n++;
    return EPMOE_OK;
}

/* Adds every tensor of the layer. In the back-to-back data section every tensor keeps its
 * natural alignment (byte arrays and their scales 8-byte aligned, an F32 scalar pair at 8 and
 * 4); the tensors of sizes 4*E and 4*vocab*top_k (gate bias, tid2eid) go last. */
static epmoe_status add_layer_tensors(epmoe_st_writer *w, layer_gen *g, job_list *jobs) {
    const epmoe_config *cfg = g->cfg;
    int64_t L = g->layer, E = cfg->n_routed_experts, H = cfg->hidden_size;
    int64_t Is = epmoe_ckpt_shared_inter(cfg);
    char name[NAME_CAP];

    EPMOE_TRY(epmoe_ckpt_gate_name(name, sizeof name, L, "weight"));
    EPMOE_TRY(add_job(w, jobs, (tensor_job){g, T_GATE_WEIGHT, 0, -1, PART_WEIGHT}, name,
                      EPMOE_DTYPE_F32, 2, (int64_t[]){E, H}));
    if (Is > 0) {
        for (int p = 0; p < 3; p++) {
            EPMOE_TRY(epmoe_ckpt_shared_name(name, sizeof name, L, proj_names[p], "weight"));
            int64_t shape[2] = {p == 2 ? H : Is, p == 2 ? Is : H};
            EPMOE_TRY(add_job(w, jobs, (tensor_job){g, T_SHARED, p, -1, PART_WEIGHT}, name,
                              EPMOE_DTYPE_BF16, 2, shape));
        }
    }
    int mxfp4 = cfg->weight_format == EPMOE_WEIGHTS_MXFP4;
    for (int64_t e = 0; e < E; e++) {
        for (int p = 0; p < 3; p++) {
            int64_t N, K;
            proj_dims(cfg, p, &N, &K);
            const char *proj = proj_names[p];
            tensor_job job = {g, T_EXPERT, p, e, PART_WEIGHT};
            EPMOE_TRY(epmoe_ckpt_expert_name(name, sizeof name, L, e, proj, "weight"));
            EPMOE_TRY(add_job(w, jobs, job, name, mxfp4 ? EPMOE_DTYPE_I8 : EPMOE_DTYPE_U8, 2,
                              (int64_t[]){N, K / 2}));
            if (mxfp4) {
                job.part = PART_MX_SCALE;
                EPMOE_TRY(epmoe_ckpt_expert_name(name, sizeof name, L, e, proj, "scale"));
                EPMOE_TRY(add_job(w, jobs, job, name, EPMOE_DTYPE_F8_E8M0, 2,
                                  (int64_t[]){N, K / EPMOE_MXFP4_BLOCK}));
                continue;
            }
            job.part = PART_WEIGHT_SCALE;
            EPMOE_TRY(epmoe_ckpt_expert_name(name, sizeof name, L, e, proj, "weight_scale"));
            EPMOE_TRY(add_job(w, jobs, job, name, EPMOE_DTYPE_F8_E4M3, 2,
                              (int64_t[]){N, K / EPMOE_NVFP4_BLOCK}));
            job.part = PART_WEIGHT_SCALE_2;
            EPMOE_TRY(epmoe_ckpt_expert_name(name, sizeof name, L, e, proj, "weight_scale_2"));
            EPMOE_TRY(add_job(w, jobs, job, name, EPMOE_DTYPE_F32, 0, NULL));
            job.part = PART_INPUT_SCALE;
            EPMOE_TRY(epmoe_ckpt_expert_name(name, sizeof name, L, e, proj, "input_scale"));
            EPMOE_TRY(add_job(w, jobs, job, name, EPMOE_DTYPE_F32, 0, NULL));
        }
    }
    if (epmoe_ckpt_layer_is_hash(cfg, L)) {
        EPMOE_TRY(epmoe_ckpt_gate_name(name, sizeof name, L, "tid2eid"));
        EPMOE_TRY(add_job(w, jobs, (tensor_job){g, T_TID2EID, 0, -1, PART_WEIGHT}, name,
                          EPMOE_DTYPE_I32, 2, (int64_t[]){cfg->vocab_size, cfg->top_k}));
    } else {
        EPMOE_TRY(epmoe_ckpt_gate_name(name, sizeof name, L, "bias"));
        EPMOE_TRY(add_job(w, jobs, (tensor_job){g, T_GATE_BIAS, 0, -1, PART_WEIGHT}, name,
                          EPMOE_DTYPE_F32, 1, (int64_t[]){E}));
    }
    return EPMOE_OK;
}

epmoe_status epmoe_ckpt_generate_layer(const epmoe_config *cfg, const epmoe_gen_options *opt,
                                       int64_t layer, const char *path, epmoe_gen_stats *stats) {
    EPMOE_TRY(epmoe_config_validate(cfg));
    EPMOE_REQUIRE(layer >= 0 && layer < cfg->n_layers, EPMOE_ERR_RANGE,
                  "layer %lld outside [0, %lld)", (long long)layer, (long long)cfg->n_layers);
    epmoe_gen_options defaults = {0};
    if (!opt) opt = &defaults;
    EPMOE_REQUIRE(isfinite(opt->skew) && fabs(opt->skew) <= 100.0, EPMOE_ERR_INVALID_ARG,
                  "skew %g outside [-100, 100]", opt->skew);

    int64_t H = cfg->hidden_size, I = cfg->moe_inter_size, E = cfg->n_routed_experts;
    size_t max_nk = (size_t)(H * I);
    layer_gen g = {.cfg = cfg, .opt = opt, .layer = layer, .cached_expert = -1,
                   .cached_proj = -1};
    job_list jobs = {.cap = (int)(4 + 3 + 4 * 3 * E)};
    g.values = malloc(max_nk * sizeof(float));
    g.codes = malloc(max_nk / 2);
    g.block_sf = malloc(max_nk / EPMOE_NVFP4_BLOCK);
    jobs.jobs = calloc((size_t)jobs.cap, sizeof *jobs.jobs);
    epmoe_st_writer *w = NULL;
    epmoe_status st = EPMOE_OK;
    if (!g.values || !g.codes || !g.block_sf || !jobs.jobs) {
        st = epmoe_set_error(EPMOE_ERR_OOM, __FILE__, __LINE__,
                             "generator buffers for [%lld, %lld] projections", (long long)I,
                             (long long)H);
        goto done;
    }
    EPMOE_TRY_GOTO(st, epmoe_st_writer_create(&w), done);
    EPMOE_TRY_GOTO(st, epmoe_ckpt_write_metadata(w, cfg), done);
    EPMOE_TRY_GOTO(st, add_layer_tensors(w, &g, &jobs), done);
    EPMOE_TRY_GOTO(st, epmoe_st_writer_finish(w, path), done);
    if (stats) {
        struct stat sb;
        stats->layers++;
        stats->tensors += jobs.n;
        if (stat(path, &sb) == 0) stats->bytes += (uint64_t)sb.st_size;
    }
done:
    epmoe_st_writer_free(w);
    free(jobs.jobs);
    free(g.values);
    free(g.codes);
    free(g.block_sf);
    if (st != EPMOE_OK) return epmoe_add_context(st, "generating layer %lld", (long long)layer);
    return EPMOE_OK;
}

/* Files in dir that a checkpoint of n_layers would not overwrite but would read. */
static epmoe_status check_no_foreign_files(const char *dir, int64_t n_layers) {
    DIR *d = opendir(dir);
    EPMOE_REQUIRE(d != NULL, EPMOE_ERR_IO, "%s: cannot open directory: %s", dir, strerror(errno));
    struct dirent *ent;
    char foreign[256] = "";
    while ((ent = readdir(d)) != NULL) {
        size_t n = strlen(ent->d_name);
        if (ent->d_name[0] == '.' || n < 12 || strcmp(ent->d_name + n - 12, ".safetensors") != 0)
            continue;
        int ours = 0;
        for (int64_t L = 0; L < n_layers && !ours; L++) {
            char name[64];
            if (epmoe_ckpt_layer_file_name(name, sizeof name, L) == EPMOE_OK)
                ours = strcmp(name, ent->d_name) == 0;
        }
        if (!ours) {
            snprintf(foreign, sizeof foreign, "%s", ent->d_name);
            break;
        }
    }
    closedir(d);
    EPMOE_REQUIRE(foreign[0] == '\0', EPMOE_ERR_INVALID_ARG,
                  "%s holds %s, which this %lld-layer checkpoint would not overwrite but would "
                  "read: remove it or choose an empty directory",
                  dir, foreign, (long long)n_layers);
    return EPMOE_OK;
}

epmoe_status epmoe_ckpt_generate(const epmoe_config *cfg, const epmoe_gen_options *opt,
                                 const char *out_dir, epmoe_gen_stats *stats) {
    EPMOE_REQUIRE(out_dir != NULL, EPMOE_ERR_INVALID_ARG, "output directory is NULL");
    EPMOE_REQUIRE(mkdir(out_dir, 0777) == 0 || errno == EEXIST, EPMOE_ERR_IO,
                  "%s: cannot create directory: %s", out_dir, strerror(errno));
    EPMOE_TRY(check_no_foreign_files(out_dir, cfg->n_layers));
    for (int64_t L = 0; L < cfg->n_layers; L++) {
        char file[64], path[4096];
        EPMOE_TRY(epmoe_ckpt_layer_file_name(file, sizeof file, L));
        int n = snprintf(path, sizeof path, "%s/%s", out_dir, file);
        EPMOE_REQUIRE(n > 0 && (size_t)n < sizeof path, EPMOE_ERR_INVALID_ARG,
                      "output path too long: %s", out_dir);
        EPMOE_TRY(epmoe_ckpt_generate_layer(cfg, opt, L, path, stats));
        if (opt && opt->on_layer) opt->on_layer(opt->on_layer_ctx, L, path);
    }
    return EPMOE_OK;
}

/* ---- batch input files ---- */

epmoe_status epmoe_gen_input_file(const epmoe_config *cfg, int64_t tokens, epmoe_dtype dtype,
                                  uint64_t seed, const char *path) {
    EPMOE_REQUIRE(tokens >= 1, EPMOE_ERR_INVALID_ARG, "tokens %lld < 1", (long long)tokens);
    EPMOE_REQUIRE(dtype == EPMOE_DTYPE_F32 || dtype == EPMOE_DTYPE_BF16 ||
                      dtype == EPMOE_DTYPE_F16,
                  EPMOE_ERR_INVALID_ARG, "input dtype %s (F32, BF16 or F16)",
                  epmoe_dtype_name(dtype));
    int64_t H = cfg->hidden_size, n = tokens * H;
    float *x = malloc((size_t)n * sizeof *x);
    void *stored = malloc((size_t)n * epmoe_dtype_size(dtype));
    int32_t *ids = malloc((size_t)tokens * sizeof *ids);
    epmoe_st_writer *w = NULL;
    epmoe_status st = EPMOE_OK;
    if (!x || !stored || !ids) {
        st = epmoe_set_error(EPMOE_ERR_OOM, __FILE__, __LINE__, "input of %lld x %lld",
                             (long long)tokens, (long long)H);
        goto done;
    }
    epmoe_rng r;
    stream_seed(&r, seed, -1, -1, STREAM_INPUT_FILE);
    for (int64_t i = 0; i < n; i++) x[i] = epmoe_rng_normal(&r);
    /* ~1 outlier per 512 values (at least one): large enough that expert pre-activations
     * exceed the SwiGLU limit and static activation scales saturate. */
    int64_t outliers = 1 + n / 512;
    for (int64_t i = 0; i < outliers; i++) {
        int64_t at = (int64_t)epmoe_rng_below(&r, (uint64_t)n);
        float sign = (epmoe_rng_next(&r) & 1) ? 1.0f : -1.0f;
        x[at] = sign * (20.0f + 80.0f * epmoe_rng_uniform(&r));
    }
    for (int64_t t = 0; t < tokens; t++)
        ids[t] = (int32_t)epmoe_rng_below(&r, (uint64_t)cfg->vocab_size);
    EPMOE_TRY_GOTO(st, epmoe_convert_from_f32(x, (size_t)n, dtype, stored), done);

    char value[32];
    EPMOE_TRY_GOTO(st, epmoe_st_writer_create(&w), done);
    EPMOE_TRY_GOTO(st, epmoe_st_writer_metadata(w, EPMOE_CKPT_META_FORMAT_VERSION,
                                                EPMOE_CKPT_FORMAT_VERSION), done);
    snprintf(value, sizeof value, "%lld", (long long)H);
    EPMOE_TRY_GOTO(st, epmoe_st_writer_metadata(w, "epmoe.hidden_size", value), done);
    snprintf(value, sizeof value, "%lld", (long long)seed);
    EPMOE_TRY_GOTO(st, epmoe_st_writer_metadata(w, "epmoe.seed", value), done);
    EPMOE_TRY_GOTO(st, epmoe_st_writer_add(w, "hidden_states", dtype, 2,
                                           (int64_t[]){tokens, H}, stored), done);
    EPMOE_TRY_GOTO(st, epmoe_st_writer_add(w, "token_ids", EPMOE_DTYPE_I32, 1,
                                           (int64_t[]){tokens}, ids), done);
    EPMOE_TRY_GOTO(st, epmoe_st_writer_finish(w, path), done);
done:
    epmoe_st_writer_free(w);
    free(x);
    free(stored);
    free(ids);
    return st;
}
