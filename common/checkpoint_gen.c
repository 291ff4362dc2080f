/* The synthetic checkpoint generator (layouts and value distributions: common/checkpoint.h).
 *
 * A plan first: every tensor of every file with its dtype, shape and byte offset, grouped into
 * jobs (one expert projection with its scales, one gate, one shared-expert projection, ...),
 * so that the sizes are known before a byte is written. Then threads take jobs one at a time,
 * compute their bytes from the job's own random stream and pwrite them into the pre-sized
 * files: the output does not depend on the thread count or the order jobs finish in.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "common/clock.h"
#include "common/checkpoint.h"
#include "common/formats.h"
#include "common/nvfp4.h"
#include "common/paths.h"
#include "common/rng.h"

#define NAME_CAP 160
#define PATH_CAP 4096
#define DEFAULT_SHARD_BYTES (4ull << 30)
#define MISC_CHUNK (1u << 20) /* misc tensors are produced and written this many bytes at a time */
#define MAX_THREADS 256

/* Shapes of the never-read tensors of the real layouts: small, but of the real kinds. */
#define MISC_Q_RANK 64
#define MISC_KV_DIM 64
#define MISC_HEADS 8
#define MISC_HC 4 /* hyper-connection streams: hc_*_fn is [(2 + hc) * hc, hc * H] */

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
    STREAM_MISC,
    STREAM_EXPERT_BIAS_W1, /* expert biases (expert_bias = 1): w1, w3, w2 in this order */
    STREAM_EXPERT_BIAS_W3,
    STREAM_EXPERT_BIAS_W2,
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

/* Approximately standard normal from one 64-bit draw: the sum of four 16-bit uniforms (Irwin-
 * Hall, variance 4/12) scaled to variance 1. Bounded at +-3.46: the tails come from the
 * explicit outliers. A few times cheaper than Box-Muller, which sets the generator's speed. */
static float approx_normal(epmoe_rng *r) {
    uint64_t u = epmoe_rng_next(r);
    int32_t sum = (int32_t)(u & 0xffff) + (int32_t)((u >> 16) & 0xffff) +
                  (int32_t)((u >> 32) & 0xffff) + (int32_t)(u >> 48);
    return (float)(sum - 2 * 65535) * (1.7320508f / 65536.0f);
}

/* [N, K] weights: normal with std 1/sqrt(K) times a per-row factor 10^U(-1,1) (two decades,
 * so block and tensor scales vary), plus ~1 outlier per 8192 elements at 10..30 times its
 * row's std. row_std: N floats of scratch. */
static void fill_weight(epmoe_rng *r, int64_t N, int64_t K, float *x, float *row_std) {
    float base = 1.0f / sqrtf((float)K);
    for (int64_t n = 0; n < N; n++) {
        row_std[n] = base * powf(10.0f, 2.0f * epmoe_rng_uniform(r) - 1.0f);
        for (int64_t k = 0; k < K; k++) x[n * K + k] = row_std[n] * approx_normal(r);
    }
    int64_t outliers = 1 + N * K / 8192;
    for (int64_t i = 0; i < outliers; i++) {
        int64_t at = (int64_t)epmoe_rng_below(r, (uint64_t)(N * K));
        float sign = (epmoe_rng_next(r) & 1) ? 1.0f : -1.0f;
        x[at] = sign * row_std[at / K] * (10.0f + 20.0f * epmoe_rng_uniform(r));
    }
}

/* A calibration input_scale: amax of n standard normals / 2688, a typical value rather than
 * the extreme ones runtime data reaches. */
static float calibration_input_scale(epmoe_rng *r, int64_t n) {
    float amax = 0.0f;
    for (int64_t i = 0; i < n; i++) amax = fmaxf(amax, fabsf(epmoe_rng_normal(r)));
    return amax / EPMOE_FP4_AMAX_TO_GLOBAL_SF;
}

/* 2^e for |e| <= 126, exact. */
static float pow2i(int e) {
    uint32_t u = (uint32_t)(e + 127) << 23;
    float x;
    memcpy(&x, &u, sizeof x);
    return x;
}

/* FP8 E4M3 with one UE8M0 scale per b x b block, the real layouts' shared-expert format: the
 * block's scale is the smallest power of two 2^e with amax / 2^e <= 448. codes [N, K],
 * scales [ceil(N/b), ceil(K/b)] (UE8M0 codes); values back into x (e4m3 * 2^e, exact). */
static void fp8_block_quantize(float *x, int64_t N, int64_t K, int64_t b, uint8_t *codes,
                               uint8_t *scales) {
    const int64_t SK = (K + b - 1) / b;
    for (int64_t bi = 0; bi < (N + b - 1) / b; bi++) {
        for (int64_t bj = 0; bj < SK; bj++) {
            int64_t n_end = (bi + 1) * b < N ? (bi + 1) * b : N;
            int64_t k_end = (bj + 1) * b < K ? (bj + 1) * b : K;
            float amax = 0.0f;
            for (int64_t n = bi * b; n < n_end; n++)
                for (int64_t k = bj * b; k < k_end; k++) {
                    float a = fabsf(x[n * K + k]);
                    amax = a > amax ? a : amax;
                }
            int e = 0;
            if (amax > 0.0f) {
                frexpf(amax / EPMOE_E4M3_MAX, &e); /* amax/448 = m 2^e, m in [0.5, 1) */
                if (ldexpf(1.0f, e - 1) >= amax / EPMOE_E4M3_MAX) e--;
                if (e < -126) e = -126;
                if (e > 126) e = 126;
            }
            scales[bi * SK + bj] = (uint8_t)(e + 127);
            float scale = pow2i(e);
            for (int64_t n = bi * b; n < n_end; n++)
                for (int64_t k = bj * b; k < k_end; k++) {
                    uint8_t c = epmoe_float_to_e4m3_satfinite(x[n * K + k] / scale);
                    codes[n * K + k] = c;
                    x[n * K + k] = epmoe_e4m3_to_float(c) * scale;
                }
        }
    }
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

/* ---- the plan ---- */

typedef enum {
    J_EXPERT,  /* one projection of one routed expert: codes and scales */
    J_SHARED,  /* one shared-expert projection (and its FP8 scales) */
    J_GATE,
    J_BIAS,
    J_TID2EID,
    J_MISC,    /* a tensor epmoe never reads: random values of its dtype */
    J_STACKED, /* gpt-oss: one stacked projection of every expert of a layer (blocks, scales,
                  bias); proj 0 = the fused gate/up, 2 = down */
} job_kind;

typedef struct {
    char name[NAME_CAP];
    epmoe_dtype dtype;
    int ndim;
    int64_t shape[4];
    uint64_t nbytes;
    int file;
    uint64_t offset; /* absolute, in its file */
} gen_tensor;

typedef struct {
    job_kind kind;
    int64_t layer, expert;
    int proj; /* 0 = w1, 1 = w3, 2 = w2 */
    int first, count; /* its tensors */
    int file;
    int file_break; /* real layouts: FILE_BEFORE / FILE_AFTER start a new shard there */
} gen_job;

enum { FILE_BEFORE = 1, FILE_AFTER = 2 };

typedef struct {
    char name[64];
    char path[PATH_CAP], tmp[PATH_CAP + 8];
    int fd;
    uint64_t bytes;
    char *head;
    size_t head_bytes;
} gen_file;

typedef struct {
    const epmoe_config *cfg;
    const epmoe_gen_options *opt;
    int real; /* a model directory (deepseek, nvidia-nvfp4 or gpt-oss) */
    int gptoss; /* the gpt-oss layout */
    gen_tensor *tensors;
    int n_tensors, cap_tensors;
    gen_job *jobs;
    int n_jobs, cap_jobs;
    gen_file *files;
    int n_files;
    uint64_t total_bytes;
} gen_plan;

static const char *const proj_names[3] = {"w1", "w3", "w2"};

static void proj_dims(const epmoe_config *cfg, int proj, int64_t *N, int64_t *K) {
    *N = proj == 2 ? cfg->hidden_size : cfg->moe_inter_size;
    *K = proj == 2 ? cfg->moe_inter_size : cfg->hidden_size;
}

static void shared_dims(const epmoe_config *cfg, int proj, int64_t *N, int64_t *K) {
    int64_t Is = epmoe_ckpt_shared_inter(cfg), H = cfg->hidden_size;
    *N = proj == 2 ? H : Is;
    *K = proj == 2 ? Is : H;
}

static void plan_free(gen_plan *p) {
    for (int i = 0; i < p->n_files; i++) free(p->files[i].head);
    free(p->files);
    free(p->tensors);
    free(p->jobs);
    memset(p, 0, sizeof *p);
}

static epmoe_status plan_job(gen_plan *p, job_kind kind, int64_t layer, int64_t expert, int proj) {
    if (p->n_jobs == p->cap_jobs) {
        int cap = p->cap_jobs ? 2 * p->cap_jobs : 256;
        gen_job *grown = realloc(p->jobs, (size_t)cap * sizeof *grown);
        EPMOE_REQUIRE(grown != NULL, EPMOE_ERR_OOM, "generator plan: %d jobs", cap);
        p->jobs = grown;
        p->cap_jobs = cap;
    }
    p->jobs[p->n_jobs++] = (gen_job){kind, layer, expert, proj, p->n_tensors, 0, -1, 0};
    return EPMOE_OK;
}

/* Adds a tensor of up to 4 dimensions to the last job. */
static epmoe_status plan_tensor_nd(gen_plan *p, const char *name, epmoe_dtype dtype, int ndim,
                                   const int64_t *shape) {
    if (p->n_tensors == p->cap_tensors) {
        int cap = p->cap_tensors ? 2 * p->cap_tensors : 1024;
        gen_tensor *grown = realloc(p->tensors, (size_t)cap * sizeof *grown);
        EPMOE_REQUIRE(grown != NULL, EPMOE_ERR_OOM, "generator plan: %d tensors", cap);
        p->tensors = grown;
        p->cap_tensors = cap;
    }
    gen_tensor *t = &p->tensors[p->n_tensors++];
    memset(t, 0, sizeof *t);
    snprintf(t->name, sizeof t->name, "%s", name);
    t->dtype = dtype;
    t->ndim = ndim;
    uint64_t numel = 1;
    for (int d = 0; d < ndim; d++) {
        t->shape[d] = shape[d];
        numel *= (uint64_t)shape[d];
    }
    t->nbytes = numel * epmoe_dtype_size(dtype);
    p->jobs[p->n_jobs - 1].count++;
    return EPMOE_OK;
}

static epmoe_status plan_tensor(gen_plan *p, const char *name, epmoe_dtype dtype, int ndim,
                                int64_t d0, int64_t d1) {
    return plan_tensor_nd(p, name, dtype, ndim, (int64_t[]){d0, d1});
}

/* A never-read tensor "prefix.what" of its own job. */
static epmoe_status plan_misc(gen_plan *p, int64_t layer, const char *prefix, const char *what,
                              epmoe_dtype dtype, int ndim, int64_t d0, int64_t d1) {
    char name[NAME_CAP];
    snprintf(name, sizeof name, "%s%s%s", prefix, prefix[0] ? "." : "", what);
    EPMOE_TRY(plan_job(p, J_MISC, layer, -1, 0));
    return plan_tensor(p, name, dtype, ndim, d0, d1);
}

/* An FP8 linear of the attention path: weight [N, K] and its UE8M0 block scales. */
static epmoe_status plan_misc_fp8(gen_plan *p, int64_t layer, const char *prefix,
                                  const char *what, int64_t N, int64_t K) {
    char w[64], s[64];
    int64_t b = p->cfg->fp8_block_size;
    snprintf(w, sizeof w, "%s.weight", what);
    snprintf(s, sizeof s, "%s.scale", what);
    EPMOE_TRY(plan_misc(p, layer, prefix, w, EPMOE_DTYPE_F8_E4M3, 2, N, K));
    return plan_misc(p, layer, prefix, s, EPMOE_DTYPE_F8_E8M0, 2, (N + b - 1) / b, (K + b - 1) / b);
}

/* The attention, norm and hyper-connection tensors of one layer (real layouts). */
static epmoe_status plan_layer_misc(gen_plan *p, int64_t layer, const char *prefix) {
    const int64_t H = p->cfg->hidden_size, hc_rows = (2 + MISC_HC) * MISC_HC;
    EPMOE_TRY(plan_misc(p, layer, prefix, "attn_norm.weight", EPMOE_DTYPE_BF16, 1, H, 0));
    EPMOE_TRY(plan_misc_fp8(p, layer, prefix, "attn.wq_a", MISC_Q_RANK, H));
    EPMOE_TRY(plan_misc_fp8(p, layer, prefix, "attn.wkv", MISC_KV_DIM, H));
    EPMOE_TRY(plan_misc(p, layer, prefix, "attn.attn_sink", EPMOE_DTYPE_F32, 1, MISC_HEADS, 0));
    EPMOE_TRY(plan_misc(p, layer, prefix, "hc_attn_fn", EPMOE_DTYPE_F32, 2, hc_rows, MISC_HC * H));
    EPMOE_TRY(plan_misc(p, layer, prefix, "hc_attn_base", EPMOE_DTYPE_F32, 1, hc_rows, 0));
    EPMOE_TRY(plan_misc(p, layer, prefix, "ffn_norm.weight", EPMOE_DTYPE_BF16, 1, H, 0));
    return EPMOE_OK;
}

/* The MoE tensors of one layer, in the order the layout keeps them. */
static epmoe_status plan_layer_moe(gen_plan *p, int64_t L) {
    const epmoe_config *cfg = p->cfg;
    const int64_t E = cfg->n_routed_experts, H = cfg->hidden_size;
    const int64_t Is = epmoe_ckpt_shared_inter(cfg), b = cfg->fp8_block_size;
    const int hash = epmoe_ckpt_layer_is_hash(cfg, L);
    char name[NAME_CAP];

    EPMOE_TRY(epmoe_ckpt_gate_name(name, sizeof name, cfg, L, "weight"));
    EPMOE_TRY(plan_job(p, J_GATE, L, -1, 0));
    EPMOE_TRY(plan_tensor(p, name, p->real ? EPMOE_DTYPE_BF16 : EPMOE_DTYPE_F32, 2, E, H));
    if (p->real) { /* the real layouts keep the routing tensors beside the gate */
        EPMOE_TRY(epmoe_ckpt_gate_name(name, sizeof name, cfg, L, hash ? "tid2eid" : "bias"));
        EPMOE_TRY(plan_job(p, hash ? J_TID2EID : J_BIAS, L, -1, 0));
        if (hash)
            EPMOE_TRY(plan_tensor(p, name, EPMOE_DTYPE_I64, 2, cfg->vocab_size, cfg->top_k));
        else
            EPMOE_TRY(plan_tensor(p, name, EPMOE_DTYPE_F32, 1, E, 0));
    }
    for (int proj = 0; Is > 0 && proj < 3; proj++) {
        int64_t N, K;
        shared_dims(cfg, proj, &N, &K);
        EPMOE_TRY(epmoe_ckpt_shared_name(name, sizeof name, cfg, L, proj_names[proj], "weight"));
        EPMOE_TRY(plan_job(p, J_SHARED, L, -1, proj));
        EPMOE_TRY(plan_tensor(p, name, p->real ? EPMOE_DTYPE_F8_E4M3 : EPMOE_DTYPE_BF16, 2, N, K));
        if (!p->real) continue;
        EPMOE_TRY(epmoe_ckpt_shared_name(name, sizeof name, cfg, L, proj_names[proj], "scale"));
        EPMOE_TRY(plan_tensor(p, name, EPMOE_DTYPE_F8_E8M0, 2, (N + b - 1) / b, (K + b - 1) / b));
    }
    const int mxfp4 = cfg->weight_format == EPMOE_WEIGHTS_MXFP4;
    for (int64_t e = 0; e < E; e++) {
        for (int proj = 0; proj < 3; proj++) {
            int64_t N, K;
            proj_dims(cfg, proj, &N, &K);
            const char *pn = proj_names[proj];
            EPMOE_TRY(plan_job(p, J_EXPERT, L, e, proj));
            EPMOE_TRY(epmoe_ckpt_expert_name(name, sizeof name, cfg, L, e, pn, "weight"));
            EPMOE_TRY(plan_tensor(p, name, mxfp4 ? EPMOE_DTYPE_I8 : EPMOE_DTYPE_U8, 2, N, K / 2));
            if (mxfp4) {
                EPMOE_TRY(epmoe_ckpt_expert_name(name, sizeof name, cfg, L, e, pn, "scale"));
                EPMOE_TRY(plan_tensor(p, name, EPMOE_DTYPE_F8_E8M0, 2, N, K / EPMOE_MXFP4_BLOCK));
            } else {
                EPMOE_TRY(epmoe_ckpt_expert_name(name, sizeof name, cfg, L, e, pn, "weight_scale"));
                EPMOE_TRY(plan_tensor(p, name, EPMOE_DTYPE_F8_E4M3, 2, N, K / EPMOE_NVFP4_BLOCK));
                EPMOE_TRY(epmoe_ckpt_expert_name(name, sizeof name, cfg, L, e, pn,
                                                 "weight_scale_2"));
                EPMOE_TRY(plan_tensor(p, name, EPMOE_DTYPE_F32, 0, 0, 0));
                EPMOE_TRY(epmoe_ckpt_expert_name(name, sizeof name, cfg, L, e, pn, "input_scale"));
                EPMOE_TRY(plan_tensor(p, name, EPMOE_DTYPE_F32, 0, 0, 0));
            }
            if (cfg->expert_bias) { /* the job's last tensor (produce_expert) */
                EPMOE_TRY(epmoe_ckpt_expert_name(name, sizeof name, cfg, L, e, pn, "bias"));
                EPMOE_TRY(plan_tensor(p, name, EPMOE_DTYPE_F32, 1, N, 0));
            }
        }
    }
    if (!p->real) { /* sizes 4*E and 4*vocab*k last: the rest stays 8-byte aligned */
        EPMOE_TRY(epmoe_ckpt_gate_name(name, sizeof name, cfg, L, hash ? "tid2eid" : "bias"));
        EPMOE_TRY(plan_job(p, hash ? J_TID2EID : J_BIAS, L, -1, 0));
        if (hash)
            EPMOE_TRY(plan_tensor(p, name, EPMOE_DTYPE_I32, 2, cfg->vocab_size, cfg->top_k));
        else
            EPMOE_TRY(plan_tensor(p, name, EPMOE_DTYPE_F32, 1, E, 0));
    }
    return EPMOE_OK;
}

/* gpt-oss: the attention and norm tensors of a layer as transformers names them (small). */
static epmoe_status plan_gptoss_layer_misc(gen_plan *p, int64_t layer, const char *prefix) {
    const int64_t H = p->cfg->hidden_size, QKV = MISC_KV_DIM;
    EPMOE_TRY(plan_misc(p, layer, prefix, "input_layernorm.weight", EPMOE_DTYPE_F32, 1, H, 0));
    static const char *const qkv[3] = {"q_proj", "k_proj", "v_proj"};
    for (int i = 0; i < 3; i++) {
        char what[64];
        snprintf(what, sizeof what, "self_attn.%s.weight", qkv[i]);
        EPMOE_TRY(plan_misc(p, layer, prefix, what, EPMOE_DTYPE_BF16, 2, QKV, H));
        snprintf(what, sizeof what, "self_attn.%s.bias", qkv[i]);
        EPMOE_TRY(plan_misc(p, layer, prefix, what, EPMOE_DTYPE_BF16, 1, QKV, 0));
    }
    EPMOE_TRY(plan_misc(p, layer, prefix, "self_attn.o_proj.weight", EPMOE_DTYPE_BF16, 2, H, QKV));
    EPMOE_TRY(plan_misc(p, layer, prefix, "self_attn.o_proj.bias", EPMOE_DTYPE_BF16, 1, H, 0));
    EPMOE_TRY(plan_misc(p, layer, prefix, "self_attn.sinks", EPMOE_DTYPE_BF16, 1, MISC_HEADS, 0));
    return plan_misc(p, layer, prefix, "post_attention_layernorm.weight", EPMOE_DTYPE_F32, 1, H,
                     0);
}

/* gpt-oss: the router (weight, bias) and the two stacked projections of every expert. */
static epmoe_status plan_gptoss_layer_moe(gen_plan *p, int64_t L) {
    const epmoe_config *cfg = p->cfg;
    const int64_t E = cfg->n_routed_experts, H = cfg->hidden_size, I = cfg->moe_inter_size;
    char name[NAME_CAP];
    EPMOE_TRY(epmoe_ckpt_gate_name(name, sizeof name, cfg, L, "weight"));
    EPMOE_TRY(plan_job(p, J_GATE, L, -1, 0));
    EPMOE_TRY(plan_tensor(p, name, EPMOE_DTYPE_BF16, 2, E, H));
    EPMOE_TRY(epmoe_ckpt_gate_name(name, sizeof name, cfg, L, "bias"));
    EPMOE_TRY(plan_job(p, J_BIAS, L, -1, 0));
    EPMOE_TRY(plan_tensor(p, name, EPMOE_DTYPE_BF16, 1, E, 0));
    for (int proj = 0; proj <= 2; proj += 2) {
        const char *which = proj == 0 ? "gate_up_proj" : "down_proj";
        const int64_t N = proj == 0 ? 2 * I : H, K = proj == 0 ? H : I;
        EPMOE_TRY(plan_job(p, J_STACKED, L, -1, proj));
        EPMOE_TRY(epmoe_ckpt_stacked_expert_name(name, sizeof name, cfg, L, which, "blocks"));
        EPMOE_TRY(plan_tensor_nd(p, name, EPMOE_DTYPE_U8, 4,
                                 (int64_t[]){E, N, K / EPMOE_MXFP4_BLOCK, EPMOE_MXFP4_BLOCK / 2}));
        EPMOE_TRY(epmoe_ckpt_stacked_expert_name(name, sizeof name, cfg, L, which, "scales"));
        EPMOE_TRY(plan_tensor_nd(p, name, EPMOE_DTYPE_U8, 3,
                                 (int64_t[]){E, N, K / EPMOE_MXFP4_BLOCK}));
        EPMOE_TRY(epmoe_ckpt_stacked_expert_name(name, sizeof name, cfg, L, which, "bias"));
        EPMOE_TRY(plan_tensor(p, name, EPMOE_DTYPE_BF16, 2, E, N));
    }
    return EPMOE_OK;
}

/* gpt-oss: every tensor of the release, in shard order: the embeddings alone in the first
 * shard, the layers, the final norm and the head in shards of their own. */
static epmoe_status plan_gptoss_jobs(gen_plan *p) {
    const epmoe_config *cfg = p->cfg;
    const int64_t H = cfg->hidden_size, V = cfg->vocab_size;
    EPMOE_TRY(plan_misc(p, -1, "", "model.embed_tokens.weight", EPMOE_DTYPE_BF16, 2, V, H));
    p->jobs[p->n_jobs - 1].file_break = FILE_BEFORE | FILE_AFTER;
    for (int64_t L = 0; L < cfg->n_layers; L++) {
        char prefix[32];
        EPMOE_TRY(epmoe_ckpt_layer_prefix(prefix, sizeof prefix, cfg, L));
        EPMOE_TRY(plan_gptoss_layer_misc(p, L, prefix));
        EPMOE_TRY(plan_gptoss_layer_moe(p, L));
    }
    EPMOE_TRY(plan_misc(p, -1, "", "model.norm.weight", EPMOE_DTYPE_F32, 1, H, 0));
    p->jobs[p->n_jobs - 1].file_break = FILE_BEFORE;
    return plan_misc(p, -1, "", "lm_head.weight", EPMOE_DTYPE_BF16, 2, V, H);
}

static uint64_t job_bytes(const gen_plan *p, const gen_job *j) {
    uint64_t n = 0;
    for (int i = j->first; i < j->first + j->count; i++) n += p->tensors[i].nbytes;
    return n;
}

/* Every job of the layout, in file order. first_layer..end_layer (epmoe: one file each). */
static epmoe_status plan_jobs(gen_plan *p, int64_t first_layer, int64_t end_layer) {
    const epmoe_config *cfg = p->cfg;
    const int64_t H = cfg->hidden_size, V = cfg->vocab_size;
    const int64_t n_main = cfg->n_layers - cfg->n_mtp_layers;
    if (p->gptoss) return plan_gptoss_jobs(p);
    if (p->real) {
        EPMOE_TRY(plan_misc(p, -1, "", "embed.weight", EPMOE_DTYPE_BF16, 2, V, H));
        p->jobs[p->n_jobs - 1].file_break = FILE_BEFORE | FILE_AFTER;
    }
    for (int64_t L = first_layer; L < end_layer; L++) {
        char prefix[32];
        EPMOE_TRY(epmoe_ckpt_layer_prefix(prefix, sizeof prefix, cfg, L));
        if (p->real && L >= n_main) { /* the MTP block's own projections */
            EPMOE_TRY(plan_misc(p, L, prefix, "enorm.weight", EPMOE_DTYPE_BF16, 1, H, 0));
            EPMOE_TRY(plan_misc(p, L, prefix, "hnorm.weight", EPMOE_DTYPE_BF16, 1, H, 0));
            EPMOE_TRY(plan_misc_fp8(p, L, prefix, "e_proj", H, H));
            EPMOE_TRY(plan_misc_fp8(p, L, prefix, "h_proj", H, H));
        }
        if (p->real) EPMOE_TRY(plan_layer_misc(p, L, prefix));
        EPMOE_TRY(plan_layer_moe(p, L));
        if (p->real && L >= n_main)
            EPMOE_TRY(plan_misc(p, L, prefix, "norm.weight", EPMOE_DTYPE_BF16, 1, H, 0));
    }
    if (p->real) {
        EPMOE_TRY(plan_misc(p, -1, "", "norm.weight", EPMOE_DTYPE_BF16, 1, H, 0));
        p->jobs[p->n_jobs - 1].file_break = FILE_BEFORE;
        EPMOE_TRY(plan_misc(p, -1, "", "hc_head_fn", EPMOE_DTYPE_F32, 2, MISC_HC, MISC_HC * H));
        EPMOE_TRY(plan_misc(p, -1, "", "head.weight", EPMOE_DTYPE_BF16, 2, V, H));
    }
    return EPMOE_OK;
}

/* Files: the epmoe layout one per layer; a model directory in shards of about shard_bytes, a
 * job never split, the embeddings and the head each starting a shard of their own (so that a
 * run never opens them). */
static epmoe_status plan_files(gen_plan *p, int64_t first_layer, const char *dir,
                               const char *single_path) {
    uint64_t target = p->opt->shard_bytes ? p->opt->shard_bytes : DEFAULT_SHARD_BYTES;
    int n_files = 0;
    uint64_t in_file = 0;
    int64_t last_layer = first_layer - 1;
    for (int j = 0; j < p->n_jobs; j++) {
        gen_job *job = &p->jobs[j];
        uint64_t bytes = job_bytes(p, job);
        int start = n_files == 0;
        if (!p->real)
            start |= job->layer != last_layer;
        else
            start |= (job->file_break & FILE_BEFORE) || (in_file > 0 && in_file + bytes > target) ||
                     (j > 0 && (p->jobs[j - 1].file_break & FILE_AFTER));
        if (start) {
            n_files++;
            in_file = 0;
        }
        job->file = n_files - 1;
        in_file += bytes;
        last_layer = job->layer;
    }
    p->files = calloc((size_t)n_files, sizeof *p->files);
    EPMOE_REQUIRE(p->files != NULL, EPMOE_ERR_OOM, "generator plan: %d files", n_files);
    p->n_files = n_files;
    for (int f = 0; f < n_files; f++) {
        gen_file *file = &p->files[f];
        file->fd = -1;
        if (p->gptoss) /* as the release names them: counted from 0, "of" the last index */
            snprintf(file->name, sizeof file->name, "model-%05d-of-%05d.safetensors", f,
                     n_files - 1);
        else if (p->real)
            snprintf(file->name, sizeof file->name, "model-%05d-of-%05d.safetensors", f + 1,
                     n_files);
        else
            EPMOE_TRY(epmoe_ckpt_layer_file_name(file->name, sizeof file->name,
                                                 first_layer + f));
        int n = single_path ? snprintf(file->path, sizeof file->path, "%s", single_path)
                            : snprintf(file->path, sizeof file->path, "%s/%s", dir, file->name);
        EPMOE_REQUIRE(n > 0 && (size_t)n < sizeof file->path, EPMOE_ERR_INVALID_ARG,
                      "output path too long: %s", dir ? dir : single_path);
        snprintf(file->tmp, sizeof file->tmp, "%s.tmp", file->path);
    }
    for (int j = 0; j < p->n_jobs; j++)
        for (int i = p->jobs[j].first; i < p->jobs[j].first + p->jobs[j].count; i++)
            p->tensors[i].file = p->jobs[j].file;
    return EPMOE_OK;
}

/* Each file's header and its tensors' offsets, through the safetensors writer. */
static epmoe_status plan_headers(gen_plan *p) {
    p->total_bytes = 0;
    int next = 0; /* tensors are in file order */
    for (int f = 0; f < p->n_files; f++) {
        epmoe_st_writer *w = NULL;
        EPMOE_TRY(epmoe_st_writer_create(&w));
        epmoe_status st = p->real ? epmoe_st_writer_metadata(w, "format", "pt")
                                  : epmoe_ckpt_write_metadata(w, p->cfg);
        int first = next;
        while (st == EPMOE_OK && next < p->n_tensors && p->tensors[next].file == f) {
            const gen_tensor *t = &p->tensors[next];
            st = epmoe_st_writer_add_reserved(w, t->name, t->dtype, t->ndim, t->shape);
            next++;
        }
        uint64_t data_bytes = 0;
        if (st == EPMOE_OK)
            st = epmoe_st_writer_layout(w, &p->files[f].head, &p->files[f].head_bytes, &data_bytes);
        for (int i = first; st == EPMOE_OK && i < next; i++)
            p->tensors[i].offset = p->files[f].head_bytes + epmoe_st_writer_data_offset(w, i - first);
        epmoe_st_writer_free(w);
        EPMOE_TRY(st);
        p->files[f].bytes = p->files[f].head_bytes + data_bytes;
        p->total_bytes += p->files[f].bytes;
    }
    return EPMOE_OK;
}

static epmoe_status plan_build(gen_plan *p, const epmoe_config *cfg, const epmoe_gen_options *opt,
                               int64_t first_layer, int64_t end_layer, const char *dir,
                               const char *single_path) {
    memset(p, 0, sizeof *p);
    p->cfg = cfg;
    p->opt = opt;
    p->real = cfg->checkpoint_layout != EPMOE_LAYOUT_EPMOE;
    p->gptoss = cfg->checkpoint_layout == EPMOE_LAYOUT_GPT_OSS;
    epmoe_status st = plan_jobs(p, first_layer, end_layer);
    if (st == EPMOE_OK) st = plan_files(p, first_layer, dir, single_path);
    if (st == EPMOE_OK) st = plan_headers(p);
    if (st != EPMOE_OK) plan_free(p);
    return st;
}

/* ---- producing a job's bytes ---- */

typedef struct {
    float *values;      /* [N, K] fp32, the largest projection */
    float *row_std;     /* [N] */
    uint8_t *codes;     /* [N, K] bytes: FP4 pairs or FP8 */
    uint8_t *scales;    /* [N, K/16] or FP8 block scales */
    uint8_t *chunk;     /* MISC_CHUNK bytes */
    double *sample_w;   /* [E] */
    char *taken;        /* [E] */
    int32_t *ids;       /* [vocab * k] */
} scratch;

static void scratch_free(scratch *s) {
    free(s->values);
    free(s->row_std);
    free(s->codes);
    free(s->scales);
    free(s->chunk);
    free(s->sample_w);
    free(s->taken);
    free(s->ids);
    memset(s, 0, sizeof *s);
}

static epmoe_status scratch_alloc(scratch *s, const epmoe_config *cfg) {
    memset(s, 0, sizeof *s);
    int64_t H = cfg->hidden_size, I = cfg->moe_inter_size, Is = epmoe_ckpt_shared_inter(cfg);
    size_t nk = (size_t)(H * (I > Is ? I : Is));
    size_t gate = (size_t)(cfg->n_routed_experts * H);
    if (gate > nk) nk = gate;
    s->values = malloc(nk * sizeof(float));
    int64_t rows = H > I ? H : I;
    s->row_std = malloc((size_t)(rows > Is ? rows : Is) * sizeof(float));
    s->codes = malloc(nk * 4); /* FP8 codes, or a gate/bias/tid2eid staged as bytes */
    s->scales = malloc(nk / EPMOE_NVFP4_BLOCK + 64);
    s->chunk = malloc(MISC_CHUNK);
    s->sample_w = malloc((size_t)cfg->n_routed_experts * sizeof(double));
    s->taken = malloc((size_t)cfg->n_routed_experts);
    s->ids = malloc((size_t)(cfg->vocab_size * cfg->top_k) * sizeof(int32_t));
    if (!s->values || !s->row_std || !s->codes || !s->scales || !s->chunk || !s->sample_w || !s->taken ||
        !s->ids) {
        scratch_free(s);
        EPMOE_FAIL(EPMOE_ERR_OOM, "generator scratch for [%lld, %lld] projections", (long long)H,
                   (long long)(I > Is ? I : Is));
    }
    return EPMOE_OK;
}

static epmoe_status pwrite_all(const gen_file *f, const void *data, uint64_t n, uint64_t at) {
    const uint8_t *p = data;
    while (n > 0) {
        ssize_t w = pwrite(f->fd, p, n, (off_t)at);
        if (w < 0 && errno == EINTR) continue;
        EPMOE_REQUIRE(w > 0, EPMOE_ERR_IO, "%s: write of %llu bytes at %llu failed: %s", f->tmp,
                      (unsigned long long)n, (unsigned long long)at,
                      w < 0 ? strerror(errno) : "no progress");
        p += w;
        n -= (uint64_t)w;
        at += (uint64_t)w;
    }
    return EPMOE_OK;
}

static epmoe_status put(const gen_plan *p, int tensor, const void *data) {
    const gen_tensor *t = &p->tensors[tensor];
    return pwrite_all(&p->files[t->file], data, t->nbytes, t->offset);
}

/* The N biases of one expert projection (expert_bias = 1): normal, std 0.5 on the gate/up rows
 * (enough to move pre-activations across the clamp) and 0.05 on down, rounded to BF16 (what
 * gpt-oss stores), so every layout holds the same values. */
static void fill_expert_bias(const epmoe_config *cfg, int64_t layer, int64_t expert, int proj,
                             int64_t N, float *out) {
    epmoe_rng r;
    stream_seed(&r, (uint64_t)cfg->seed, layer, expert, STREAM_EXPERT_BIAS_W1 + proj);
    const float std = proj == 2 ? 0.05f : 0.5f;
    for (int64_t n = 0; n < N; n++)
        out[n] = epmoe_bf16_to_float(epmoe_float_to_bf16(std * approx_normal(&r)));
}

/* gpt-oss: one stacked projection of every expert of a layer, expert by expert (each expert's
 * values from the same streams as the other layouts', MXFP4 quantized row by row the same way,
 * so the weights are identical): the fused gate/up rows go where epmoe_ckpt_fused_row puts
 * them. Blocks [E, N, K/32, 16], scales [E, N, K/32], bias BF16 [E, N]. */
static epmoe_status produce_stacked(const gen_plan *p, const gen_job *j, scratch *s) {
    const epmoe_config *cfg = p->cfg;
    const int64_t E = cfg->n_routed_experts, I = cfg->moe_inter_size, H = cfg->hidden_size;
    const int fused = j->proj == 0;
    const int64_t N = fused ? 2 * I : H, K = fused ? H : I;
    const gen_tensor *blocks = &p->tensors[j->first], *scales = &p->tensors[j->first + 1],
                     *bias = &p->tensors[j->first + 2];
    const size_t row_codes = (size_t)(K / 2), row_scales = (size_t)(K / EPMOE_MXFP4_BLOCK);
    float *values = s->values, *bias_f = s->row_std; /* [max(H, I)] floats */
    uint16_t *bias_bf16 = (uint16_t *)s->chunk;      /* [N] */
    for (int64_t e = 0; e < E; e++) {
        for (int part = 0; part < (fused ? 2 : 1); part++) { /* gate rows, up rows; or down */
            const int proj = fused ? part : 2; /* 0 = w1 (gate), 1 = w3 (up), 2 = w2 */
            const int64_t rows = fused ? I : H;
            epmoe_rng r;
            stream_seed(&r, (uint64_t)cfg->seed, j->layer, e, STREAM_EXPERT_W1 + proj);
            fill_weight(&r, rows, K, values, s->row_std);
            for (int64_t n = 0; n < rows; n++) {
                const int64_t row = fused ? epmoe_ckpt_fused_row(cfg, part, n) : n;
                epmoe_mxfp4_quantize_row(values + n * K, (size_t)K, s->codes + row * row_codes,
                                         s->scales + row * row_scales);
            }
            fill_expert_bias(cfg, j->layer, e, proj, rows, bias_f);
            for (int64_t n = 0; n < rows; n++)
                bias_bf16[fused ? epmoe_ckpt_fused_row(cfg, part, n) : n] =
                    epmoe_float_to_bf16(bias_f[n]);
        }
        EPMOE_TRY(pwrite_all(&p->files[blocks->file], s->codes, (uint64_t)N * row_codes,
                             blocks->offset + (uint64_t)e * (uint64_t)N * row_codes));
        EPMOE_TRY(pwrite_all(&p->files[scales->file], s->scales, (uint64_t)N * row_scales,
                             scales->offset + (uint64_t)e * (uint64_t)N * row_scales));
        EPMOE_TRY(pwrite_all(&p->files[bias->file], bias_bf16, (uint64_t)N * 2,
                             bias->offset + (uint64_t)e * (uint64_t)N * 2));
    }
    return EPMOE_OK;
}

static epmoe_status produce_expert(const gen_plan *p, const gen_job *j, scratch *s) {
    const epmoe_config *cfg = p->cfg;
    int64_t N, K;
    proj_dims(cfg, j->proj, &N, &K);
    epmoe_rng r;
    stream_seed(&r, (uint64_t)cfg->seed, j->layer, j->expert, STREAM_EXPERT_W1 + j->proj);
    fill_weight(&r, N, K, s->values, s->row_std);
    if (cfg->expert_bias) { /* the job's last tensor */
        fill_expert_bias(cfg, j->layer, j->expert, j->proj, N, s->row_std);
        EPMOE_TRY(put(p, j->first + j->count - 1, s->row_std));
    }
    if (cfg->weight_format == EPMOE_WEIGHTS_MXFP4) {
        for (int64_t n = 0; n < N; n++)
            epmoe_mxfp4_quantize_row(s->values + n * K, (size_t)K, s->codes + n * (K / 2),
                                     s->scales + n * (K / EPMOE_MXFP4_BLOCK));
        EPMOE_TRY(put(p, j->first, s->codes));
        return put(p, j->first + 1, s->scales);
    }
    /* w1 and w3 are quantized each with its own amax, as separate checkpoint tensors. */
    float amax = epmoe_amax(s->values, (size_t)(N * K));
    EPMOE_REQUIRE(isfinite(amax), EPMOE_ERR_INTERNAL, "generated weights are not finite");
    float global_sf = epmoe_nvfp4_global_sf(amax);
    for (int64_t n = 0; n < N; n++)
        epmoe_nvfp4_quantize_row(s->values + n * K, (size_t)K, global_sf, s->codes + n * (K / 2),
                                 s->scales + n * (K / EPMOE_NVFP4_BLOCK));
    float weight_scale_2 = amax / EPMOE_FP4_AMAX_TO_GLOBAL_SF;
    /* w1 and w3 see the same input, hence the same calibration. */
    epmoe_rng rc;
    stream_seed(&rc, (uint64_t)cfg->seed, j->layer, j->expert,
                j->proj == 2 ? STREAM_INPUT_SCALE_W2 : STREAM_INPUT_SCALE_W13);
    float input_scale = calibration_input_scale(&rc, K);
    EPMOE_TRY(put(p, j->first, s->codes));
    EPMOE_TRY(put(p, j->first + 1, s->scales));
    EPMOE_TRY(put(p, j->first + 2, &weight_scale_2));
    return put(p, j->first + 3, &input_scale);
}

static epmoe_status produce_shared(const gen_plan *p, const gen_job *j, scratch *s) {
    const epmoe_config *cfg = p->cfg;
    int64_t N, K;
    shared_dims(cfg, j->proj, &N, &K);
    epmoe_rng r;
    stream_seed(&r, (uint64_t)cfg->seed, j->layer, -1, STREAM_SHARED_W1 + j->proj);
    fill_weight(&r, N, K, s->values, s->row_std);
    fp8_block_quantize(s->values, N, K, cfg->fp8_block_size, s->codes, s->scales);
    if (p->real) {
        EPMOE_TRY(put(p, j->first, s->codes));
        return put(p, j->first + 1, s->scales);
    }
    /* the same values in BF16 (e4m3 * 2^e needs 3 mantissa bits: exact) */
    EPMOE_TRY(epmoe_convert_from_f32(s->values, (size_t)(N * K), EPMOE_DTYPE_BF16, s->codes));
    return put(p, j->first, s->codes);
}

static epmoe_status produce_gate(const gen_plan *p, const gen_job *j, scratch *s) {
    const epmoe_config *cfg = p->cfg;
    const int64_t n = cfg->n_routed_experts * cfg->hidden_size;
    epmoe_rng r;
    stream_seed(&r, (uint64_t)cfg->seed, j->layer, -1, STREAM_GATE_WEIGHT);
    float std = 1.0f / sqrtf((float)cfg->hidden_size);
    for (int64_t i = 0; i < n; i++) s->values[i] = std * approx_normal(&r);
    /* BF16 values in both layouts: the epmoe layout's F32 holds them exactly */
    EPMOE_TRY(epmoe_convert_from_f32(s->values, (size_t)n, EPMOE_DTYPE_BF16, s->codes));
    if (p->real) return put(p, j->first, s->codes);
    EPMOE_TRY(epmoe_convert_to_f32(EPMOE_DTYPE_BF16, s->codes, (size_t)n, s->values));
    return put(p, j->first, s->values);
}

static epmoe_status produce_bias(const gen_plan *p, const gen_job *j, scratch *s) {
    const epmoe_config *cfg = p->cfg;
    const int64_t E = cfg->n_routed_experts;
    epmoe_rng r;
    stream_seed(&r, (uint64_t)cfg->seed, j->layer, -1, STREAM_GATE_BIAS);
    for (int64_t e = 0; e < E; e++)
        s->values[e] = 0.1f * epmoe_rng_normal(&r) + (float)(p->opt->skew * skew_position(e, E));
    /* gpt-oss's router is a BF16 Linear: its bias is BF16-valued in every layout */
    if (cfg->scoring == EPMOE_SCORING_TOPK_SOFTMAX)
        EPMOE_TRY(epmoe_convert_from_f32(s->values, (size_t)E, EPMOE_DTYPE_BF16, s->codes));
    if (p->tensors[j->first].dtype == EPMOE_DTYPE_BF16) return put(p, j->first, s->codes);
    if (cfg->scoring == EPMOE_SCORING_TOPK_SOFTMAX)
        EPMOE_TRY(epmoe_convert_to_f32(EPMOE_DTYPE_BF16, s->codes, (size_t)E, s->values));
    return put(p, j->first, s->values);
}

static epmoe_status produce_tid2eid(const gen_plan *p, const gen_job *j, scratch *s) {
    const epmoe_config *cfg = p->cfg;
    const int64_t E = cfg->n_routed_experts, k = cfg->top_k, V = cfg->vocab_size;
    for (int64_t e = 0; e < E; e++)
        s->sample_w[e] = exp(4.0 * p->opt->skew * skew_position(e, E));
    epmoe_rng r;
    stream_seed(&r, (uint64_t)cfg->seed, j->layer, -1, STREAM_TID2EID);
    for (int64_t t = 0; t < V; t++) sample_distinct(&r, s->sample_w, E, k, s->taken, s->ids + t * k);
    if (p->tensors[j->first].dtype == EPMOE_DTYPE_I32) return put(p, j->first, s->ids);
    /* I64, as DeepSeek stores it: staged and written a chunk at a time */
    const gen_tensor *t = &p->tensors[j->first];
    const uint64_t per_chunk = MISC_CHUNK / 8;
    for (uint64_t at = 0; at < (uint64_t)(V * k); at += per_chunk) {
        uint64_t n = (uint64_t)(V * k) - at < per_chunk ? (uint64_t)(V * k) - at : per_chunk;
        for (uint64_t i = 0; i < n; i++) {
            int64_t id = s->ids[at + i];
            memcpy(s->chunk + 8 * i, &id, 8);
        }
        EPMOE_TRY(pwrite_all(&p->files[t->file], s->chunk, 8 * n, t->offset + 8 * at));
    }
    return EPMOE_OK;
}

/* Random values of the tensor's dtype: small normals (F32, BF16), FP8 codes that are not NaN,
 * UE8M0 scales near 1. */
static epmoe_status produce_misc(const gen_plan *p, const gen_job *j, scratch *s) {
    const gen_tensor *t = &p->tensors[j->first];
    epmoe_rng r;
    stream_seed(&r, (uint64_t)p->cfg->seed, j->layer, (int64_t)j->first, STREAM_MISC);
    const size_t elem = epmoe_dtype_size(t->dtype);
    for (uint64_t at = 0; at < t->nbytes; at += MISC_CHUNK) {
        uint64_t n = t->nbytes - at < MISC_CHUNK ? t->nbytes - at : MISC_CHUNK;
        for (uint64_t i = 0; i < n / elem; i++) {
            uint8_t *dst = s->chunk + i * elem;
            if (t->dtype == EPMOE_DTYPE_F32) {
                float v = 0.02f * approx_normal(&r);
                memcpy(dst, &v, 4);
            } else if (t->dtype == EPMOE_DTYPE_BF16) {
                uint16_t v = epmoe_float_to_bf16(0.02f * approx_normal(&r));
                memcpy(dst, &v, 2);
            } else if (t->dtype == EPMOE_DTYPE_F8_E8M0) {
                *dst = (uint8_t)(120 + epmoe_rng_below(&r, 8));
            } else {
                uint8_t c = (uint8_t)epmoe_rng_next(&r);
                *dst = (c & 0x7f) == 0x7f ? (uint8_t)(c - 1) : c;
            }
        }
        EPMOE_TRY(pwrite_all(&p->files[t->file], s->chunk, n, t->offset + at));
    }
    return EPMOE_OK;
}

static epmoe_status produce(const gen_plan *p, const gen_job *j, scratch *s) {
    switch (j->kind) {
    case J_EXPERT: return produce_expert(p, j, s);
    case J_SHARED: return produce_shared(p, j, s);
    case J_GATE: return produce_gate(p, j, s);
    case J_BIAS: return produce_bias(p, j, s);
    case J_TID2EID: return produce_tid2eid(p, j, s);
    case J_MISC: return produce_misc(p, j, s);
    case J_STACKED: return produce_stacked(p, j, s);
    }
    EPMOE_FAIL(EPMOE_ERR_INTERNAL, "unknown generator job kind %d", (int)j->kind);
}

/* ---- running the plan ---- */

typedef struct {
    const gen_plan *plan;
    _Atomic int next_job;
    _Atomic uint64_t bytes_done;
    _Atomic int failed;
    _Atomic int running;
    pthread_mutex_t lock;
    epmoe_status status;
    char message[1024];
} gen_run;

static void run_fail(gen_run *run, epmoe_status st) {
    pthread_mutex_lock(&run->lock);
    if (run->status == EPMOE_OK) {
        run->status = st;
        snprintf(run->message, sizeof run->message, "%s", epmoe_last_error());
    }
    pthread_mutex_unlock(&run->lock);
    atomic_store(&run->failed, 1);
}

static void *gen_worker(void *arg) {
    gen_run *run = arg;
    scratch s;
    epmoe_status st = scratch_alloc(&s, run->plan->cfg);
    if (st != EPMOE_OK) run_fail(run, st);
    while (st == EPMOE_OK && !atomic_load(&run->failed)) {
        int j = atomic_fetch_add(&run->next_job, 1);
        if (j >= run->plan->n_jobs) break;
        const gen_job *job = &run->plan->jobs[j];
        st = produce(run->plan, job, &s);
        if (st != EPMOE_OK) {
            epmoe_add_context(st, "%s", run->plan->tensors[job->first].name);
            run_fail(run, st);
        }
        atomic_fetch_add(&run->bytes_done, job_bytes(run->plan, job));
    }
    if (s.values) scratch_free(&s);
    atomic_fetch_sub(&run->running, 1);
    return NULL;
}

static int thread_count(const epmoe_gen_options *opt) {
    if (opt->threads > 0) return opt->threads < MAX_THREADS ? opt->threads : MAX_THREADS;
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    return cpus < 1 ? 1 : cpus > MAX_THREADS ? MAX_THREADS : (int)cpus;
}

/* Bytes per second of one thread on the largest projection, quantized into scratch (nothing
 * written): what the estimate before a run scales up. The faster of two tries, the first
 * paying for the scratch's first touch. */
static double measure_rate(const gen_plan *p) {
    const epmoe_config *cfg = p->cfg;
    int64_t N, K;
    proj_dims(cfg, 0, &N, &K);
    scratch s;
    if (scratch_alloc(&s, cfg) != EPMOE_OK) return 0.0;
    double best = INFINITY;
    for (int attempt = 0; attempt < 2; attempt++) {
        double t0 = epmoe_seconds_now();
        epmoe_rng r;
        stream_seed(&r, (uint64_t)cfg->seed, 0, 0, STREAM_EXPERT_W1);
        fill_weight(&r, N, K, s.values, s.row_std);
        float gs = epmoe_nvfp4_global_sf(epmoe_amax(s.values, (size_t)(N * K)));
        for (int64_t n = 0; n < N; n++) {
            if (cfg->weight_format == EPMOE_WEIGHTS_MXFP4)
                epmoe_mxfp4_quantize_row(s.values + n * K, (size_t)K, s.codes + n * (K / 2),
                                         s.scales + n * (K / 32));
            else
                epmoe_nvfp4_quantize_row(s.values + n * K, (size_t)K, gs, s.codes + n * (K / 2),
                                         s.scales + n * (K / 16));
        }
        double dt = epmoe_seconds_now() - t0;
        if (dt < best) best = dt;
    }
    scratch_free(&s);
    return best > 0 && isfinite(best) ? (double)(N * K) * (9.0 / 16.0) / best : 0.0;
}

static void close_files(gen_plan *p, int unlink_tmp) {
    for (int f = 0; f < p->n_files; f++) {
        if (p->files[f].fd >= 0) close(p->files[f].fd);
        p->files[f].fd = -1;
        if (unlink_tmp) unlink(p->files[f].tmp);
    }
}

/* Creates every file at its final size with its header, fills the data from the worker
 * threads, then renames each into place. */
static epmoe_status plan_write(gen_plan *p) {
    const epmoe_gen_options *opt = p->opt;
    int threads = thread_count(opt);
    if (opt->on_plan) {
        epmoe_gen_plan_info info = {p->total_bytes, p->n_files, p->n_tensors, threads,
                                    measure_rate(p) * threads};
        opt->on_plan(opt->ctx, &info);
    }
    epmoe_status st = EPMOE_OK;
    for (int f = 0; f < p->n_files && st == EPMOE_OK; f++) {
        gen_file *file = &p->files[f];
        /* never through a symlink or into a device planted at the temp name (common/paths.h) */
        st = epmoe_open_regular_fd_for_write(file->tmp, &file->fd);
        if (st != EPMOE_OK) break;
        if (ftruncate(file->fd, (off_t)file->bytes) != 0)
            st = epmoe_set_error(EPMOE_ERR_IO, __FILE__, __LINE__,
                                 "%s: cannot size to %llu bytes: %s", file->tmp,
                                 (unsigned long long)file->bytes, strerror(errno));
        else
            st = pwrite_all(file, file->head, file->head_bytes, 0);
    }
    if (st != EPMOE_OK) {
        close_files(p, 1);
        return st;
    }

    gen_run run = {.plan = p, .status = EPMOE_OK};
    atomic_init(&run.next_job, 0);
    atomic_init(&run.bytes_done, 0);
    atomic_init(&run.failed, 0);
    atomic_init(&run.running, threads);
    pthread_mutex_init(&run.lock, NULL);
    pthread_t tids[MAX_THREADS];
    int started = 0;
    for (; started < threads; started++)
        if (pthread_create(&tids[started], NULL, gen_worker, &run) != 0) break;
    atomic_fetch_sub(&run.running, threads - started);
    if (started == 0) {
        run.status = epmoe_set_error(EPMOE_ERR_INTERNAL, __FILE__, __LINE__,
                                     "cannot start generator threads");
    } else {
        while (atomic_load(&run.running) > 0) {
            struct timespec nap = {0, 200 * 1000 * 1000};
            nanosleep(&nap, NULL);
            if (opt->on_progress && atomic_load(&run.running) > 0)
                opt->on_progress(opt->ctx, atomic_load(&run.bytes_done), p->total_bytes);
        }
    }
    for (int i = 0; i < started; i++) pthread_join(tids[i], NULL);
    pthread_mutex_destroy(&run.lock);
    if (run.status != EPMOE_OK) {
        close_files(p, 1);
        return epmoe_set_error(run.status, __FILE__, __LINE__, "%s", run.message);
    }
    for (int f = 0; f < p->n_files && st == EPMOE_OK; f++) {
        gen_file *file = &p->files[f];
        if (close(file->fd) != 0)
            st = epmoe_set_error(EPMOE_ERR_IO, __FILE__, __LINE__, "%s: close failed: %s",
                                 file->tmp, strerror(errno));
        file->fd = -1;
    }
    for (int f = 0; f < p->n_files && st == EPMOE_OK; f++)
        if (rename(p->files[f].tmp, p->files[f].path) != 0)
            st = epmoe_set_error(EPMOE_ERR_IO, __FILE__, __LINE__, "cannot rename %s to %s: %s",
                                 p->files[f].tmp, p->files[f].path, strerror(errno));
    if (st != EPMOE_OK) close_files(p, 1);
    else if (opt->on_progress) opt->on_progress(opt->ctx, p->total_bytes, p->total_bytes);
    return st;
}

/* ---- a model directory's JSON files ---- */

static epmoe_status write_json(json_t *root, const char *dir, const char *file) {
    char path[PATH_CAP];
    int n = snprintf(path, sizeof path, "%s/%s", dir, file);
    EPMOE_REQUIRE(root != NULL && n > 0 && (size_t)n < sizeof path, EPMOE_ERR_OOM, "%s/%s", dir,
                  file);
    /* like every output: to path.tmp, opened as a regular file only, then renamed over path */
    char tmp[PATH_CAP + 8];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE *fp = NULL;
    epmoe_status st = epmoe_open_regular_for_write(tmp, &fp);
    if (st != EPMOE_OK) {
        json_decref(root);
        return st;
    }
    int rc = json_dumpf(root, fp, JSON_INDENT(2));
    json_decref(root);
    if (fclose(fp) != 0) rc = -1;
    if (rc != 0) {
        unlink(tmp);
        EPMOE_FAIL(EPMOE_ERR_IO, "%s: cannot write", tmp);
    }
    if (rename(tmp, path) != 0) {
        int err = errno;
        unlink(tmp);
        EPMOE_FAIL(EPMOE_ERR_IO, "cannot rename %s to %s: %s", tmp, path, strerror(err));
    }
    return EPMOE_OK;
}

/* config.json with the generator's mark (preset and seed, so a synthetic directory says what it
 * is), written to dir. */
static epmoe_status write_config_with_mark(const epmoe_config *c, json_t *root, const char *dir) {
    char seed[32];
    snprintf(seed, sizeof seed, "%lld", (long long)c->seed);
    json_object_set_new(root, "epmoe_synthetic",
                        json_pack("{s:s, s:s, s:s}", "generator", "epmoe-gen", "preset", c->preset,
                                  "seed", seed));
    return write_json(root, dir, "config.json");
}

/* config.json as gpt-oss's release spells it (docs/checkpoints.md, "gpt-oss"): the MoE keys
 * epmoe reads, and the attention keys of the (never read) small attention tensors. */
static epmoe_status write_gptoss_config_json(const gen_plan *p, const char *dir) {
    const epmoe_config *c = p->cfg;
    json_t *quant = json_pack("{s:[s, s, s, s], s:s}", "modules_to_not_convert",
                              "model.layers.*.self_attn", "model.layers.*.mlp.router",
                              "model.embed_tokens", "lm_head", "quant_method", "mxfp4");
    json_t *root = json_pack(
        "{s:[s], s:s, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:f, s:s, s:b, s:I, s:I, s:I, s:I, "
        "s:s, s:o}",
        "architectures", "GptOssForCausalLM", "model_type", "gpt_oss", "hidden_size",
        (json_int_t)c->hidden_size, "intermediate_size", (json_int_t)c->moe_inter_size,
        "num_local_experts", (json_int_t)c->n_routed_experts, "num_experts_per_tok",
        (json_int_t)c->top_k, "experts_per_token", (json_int_t)c->top_k, "num_hidden_layers",
        (json_int_t)c->n_layers, "vocab_size", (json_int_t)c->vocab_size, "swiglu_limit",
        c->swiglu_limit, "hidden_act", "silu", "attention_bias", 1, "head_dim",
        (json_int_t)(MISC_KV_DIM / MISC_HEADS), "num_attention_heads", (json_int_t)MISC_HEADS,
        "num_key_value_heads", (json_int_t)MISC_HEADS, "sliding_window", (json_int_t)128, "torch_dtype",
        "bfloat16", "quantization_config", quant);
    EPMOE_REQUIRE(root != NULL, EPMOE_ERR_OOM, "config.json");
    /* the release has no swiglu_alpha (its code fixes 1.702); newer transformers read one */
    if (c->swiglu_alpha != 1.702)
        json_object_set_new(root, "swiglu_alpha", json_real(c->swiglu_alpha));
    return write_config_with_mark(c, root, dir);
}

/* config.json as DeepSeek-V4's release spells it (docs/checkpoints.md), plus NVIDIA's mark. */
static epmoe_status write_config_json(const gen_plan *p, const char *dir) {
    const epmoe_config *c = p->cfg;
    if (p->gptoss) return write_gptoss_config_json(p, dir);
    const int64_t n_main = c->n_layers - c->n_mtp_layers, b = c->fp8_block_size;
    json_t *quant = json_pack("{s:s, s:s, s:s, s:s, s:[I, I]}", "quant_method", "fp8",
                              "activation_scheme", "dynamic", "fmt", "e4m3", "scale_fmt", "ue8m0",
                              "weight_block_size", (json_int_t)b, (json_int_t)b);
    if (quant && c->checkpoint_layout == EPMOE_LAYOUT_NVIDIA_NVFP4)
        json_object_set_new(quant, "moe_quant_algo", json_string("NVFP4"));
    json_t *root = json_pack(
        "{s:[s], s:s, s:I, s:I, s:I, s:I, s:I, s:f, s:s, s:b, s:s, s:s, s:I, s:I, s:I, s:I, "
        "s:s, s:s, s:o}",
        "architectures", "DeepseekV4ForCausalLM", "model_type", "deepseek_v4", "hidden_size",
        (json_int_t)c->hidden_size, "moe_intermediate_size", (json_int_t)c->moe_inter_size,
        "n_routed_experts", (json_int_t)c->n_routed_experts, "num_experts_per_tok",
        (json_int_t)c->top_k, "n_shared_experts", (json_int_t)c->n_shared_experts,
        "routed_scaling_factor", c->routed_scaling_factor, "scoring_func",
        c->scoring == EPMOE_SCORING_SIGMOID ? "sigmoid" : "sqrtsoftplus", "norm_topk_prob", 1,
        "topk_method", "noaux_tc", "hidden_act", "silu", "num_hidden_layers", (json_int_t)n_main,
        "num_nextn_predict_layers", (json_int_t)c->n_mtp_layers, "num_hash_layers",
        (json_int_t)c->n_hash_layers, "vocab_size", (json_int_t)c->vocab_size, "expert_dtype",
        "fp4", "torch_dtype", "bfloat16", "quantization_config", quant);
    EPMOE_REQUIRE(root != NULL, EPMOE_ERR_OOM, "config.json");
    json_object_set_new(root, "swiglu_limit",
                        c->swiglu_limit > 0 ? json_real(c->swiglu_limit) : json_null());
    if (c->n_groups > 1) {
        json_object_set_new(root, "n_group", json_integer(c->n_groups));
        json_object_set_new(root, "topk_group", json_integer(c->topk_groups));
    }
    return write_config_with_mark(c, root, dir);
}

static epmoe_status write_index_json(const gen_plan *p, const char *dir) {
    json_t *map = json_object();
    EPMOE_REQUIRE(map != NULL, EPMOE_ERR_OOM, "index");
    for (int i = 0; i < p->n_tensors; i++)
        json_object_set_new(map, p->tensors[i].name,
                            json_string(p->files[p->tensors[i].file].name));
    uint64_t tensor_bytes = 0;
    for (int i = 0; i < p->n_tensors; i++) tensor_bytes += p->tensors[i].nbytes;
    json_t *root = json_pack("{s:{s:I}, s:o}", "metadata", "total_size", (json_int_t)tensor_bytes,
                             "weight_map", map);
    return write_json(root, dir, EPMOE_ST_INDEX_FILE);
}

/* hf_quant_config.json as ModelOpt's DeepSeek-V4 export writes it. */
static epmoe_status write_hf_quant_config(const gen_plan *p, const char *dir) {
    json_t *layers = json_object();
    EPMOE_REQUIRE(layers != NULL, EPMOE_ERR_OOM, "hf_quant_config.json");
    for (int j = 0; j < p->n_jobs; j++) {
        const gen_job *job = &p->jobs[j];
        if (job->kind != J_EXPERT) continue;
        char name[NAME_CAP];
        snprintf(name, sizeof name, "%s", p->tensors[job->first].name);
        name[strlen(name) - strlen(".weight")] = '\0';
        json_object_set_new(layers, name, json_pack("{s:s, s:i}", "quant_algo", "NVFP4",
                                                    "group_size", 16));
    }
    json_t *root = json_pack(
        "{s:{s:s, s:s}, s:{s:s, s:n, s:i, s:o, s:[s, s, s, s, s, s, s, s, s]}}", "producer",
        "name", "modelopt", "version", "epmoe-gen synthetic", "quantization", "quant_algo",
        "MIXED_PRECISION", "kv_cache_quant_algo", "group_size", 16, "quantized_layers", layers,
        "exclude_modules", "*.attn.*", "*.attn_norm.*", "*.ffn.shared_experts.*", "*.ffn.gate.*",
        "*.ffn_norm.*", "embed.weight", "head.weight", "*.hc_*", "norm.weight");
    return write_json(root, dir, "hf_quant_config.json");
}

/* ---- entry points ---- */

static int is_plan_file(const gen_plan *p, const char *name) {
    for (int f = 0; f < p->n_files; f++)
        if (strcmp(p->files[f].name, name) == 0) return 1;
    return 0;
}

/* Files in dir the checkpoint would not overwrite but would read (other *.safetensors), and
 * for the epmoe layout a model directory's config.json or index, which would make the
 * directory read as one. */
static epmoe_status check_no_foreign_files(const gen_plan *p, const char *dir) {
    DIR *d = opendir(dir);
    EPMOE_REQUIRE(d != NULL, EPMOE_ERR_IO, "%s: cannot open directory: %s", dir, strerror(errno));
    struct dirent *ent;
    char foreign[256] = "";
    while ((ent = readdir(d)) != NULL && !foreign[0]) {
        const char *name = ent->d_name;
        size_t n = strlen(name);
        int st_file = n >= 12 && strcmp(name + n - 12, ".safetensors") == 0 && name[0] != '.';
        int model_dir_file = strcmp(name, "config.json") == 0 ||
                             strcmp(name, EPMOE_ST_INDEX_FILE) == 0 ||
                             strcmp(name, "hf_quant_config.json") == 0;
        if ((st_file && !is_plan_file(p, name)) || (!p->real && model_dir_file))
            snprintf(foreign, sizeof foreign, "%s", name);
    }
    closedir(d);
    EPMOE_REQUIRE(foreign[0] == '\0', EPMOE_ERR_INVALID_ARG,
                  "%s holds %s, which this checkpoint would not overwrite but would read: remove "
                  "it or choose an empty directory",
                  dir, foreign);
    return EPMOE_OK;
}

static epmoe_status check_options(const epmoe_config *cfg, const epmoe_gen_options *opt) {
    EPMOE_TRY(epmoe_config_validate(cfg));
    EPMOE_REQUIRE(isfinite(opt->skew) && fabs(opt->skew) <= 100.0, EPMOE_ERR_INVALID_ARG,
                  "skew %g outside [-100, 100]", opt->skew);
    const int64_t layout = cfg->checkpoint_layout;
    if (layout == EPMOE_LAYOUT_DEEPSEEK || layout == EPMOE_LAYOUT_NVIDIA_NVFP4) {
        EPMOE_REQUIRE(cfg->swiglu_variant == EPMOE_SWIGLU_DSV4, EPMOE_ERR_INVALID_ARG,
                      "swiglu_variant %s cannot be written to a DeepSeek model directory: "
                      "config.json has no key for it (DeepSeek-V4 clamps the gate before the "
                      "activation)",
                      cfg->swiglu_variant == EPMOE_SWIGLU_STEP ? "step" : "gptoss");
        EPMOE_REQUIRE(cfg->scoring != EPMOE_SCORING_TOPK_SOFTMAX && !cfg->expert_bias,
                      EPMOE_ERR_INVALID_ARG,
                      "scoring topk_softmax and expert biases are gpt-oss's: a DeepSeek model "
                      "directory cannot hold them (use --layout gpt-oss or epmoe)");
    }
    if (layout == EPMOE_LAYOUT_GPT_OSS) {
        /* config.json says model_type gpt_oss, which fixes these (common/model_dir.c) */
        EPMOE_REQUIRE(cfg->scoring == EPMOE_SCORING_TOPK_SOFTMAX &&
                          cfg->swiglu_variant == EPMOE_SWIGLU_GPTOSS &&
                          cfg->routed_scaling_factor == 1.0 &&
                          cfg->gate_up_order == EPMOE_GATE_UP_INTERLEAVED,
                      EPMOE_ERR_INVALID_ARG,
                      "the gpt-oss layout is gpt-oss's model (its config.json has no keys for "
                      "anything else): needs scoring topk_softmax, swiglu_variant gptoss, "
                      "routed_scaling_factor 1 and gate_up_order interleaved (start from "
                      "--preset gpt-oss-20b, gpt-oss-120b or gpt-oss-tiny)");
    }
    return EPMOE_OK;
}

static void add_stats(const gen_plan *p, int64_t layers, epmoe_gen_stats *stats) {
    if (!stats) return;
    stats->layers += layers;
    stats->tensors += p->n_tensors;
    stats->bytes += p->total_bytes;
}

epmoe_status epmoe_ckpt_generate_layer(const epmoe_config *cfg, const epmoe_gen_options *opt,
                                       int64_t layer, const char *path, epmoe_gen_stats *stats) {
    epmoe_gen_options defaults = {0};
    if (!opt) opt = &defaults;
    EPMOE_REQUIRE(path != NULL, EPMOE_ERR_INVALID_ARG, "output path is NULL");
    EPMOE_TRY(check_options(cfg, opt));
    EPMOE_REQUIRE(cfg->checkpoint_layout == EPMOE_LAYOUT_EPMOE, EPMOE_ERR_INVALID_ARG,
                  "one layer's file exists in the epmoe layout only (a model directory is "
                  "written whole: epmoe_ckpt_generate)");
    EPMOE_REQUIRE(layer >= 0 && layer < cfg->n_layers, EPMOE_ERR_RANGE,
                  "layer %lld outside [0, %lld)", (long long)layer, (long long)cfg->n_layers);
    gen_plan plan;
    EPMOE_TRY(plan_build(&plan, cfg, opt, layer, layer + 1, NULL, path));
    epmoe_status st = plan_write(&plan);
    if (st == EPMOE_OK) add_stats(&plan, 1, stats);
    plan_free(&plan);
    if (st != EPMOE_OK) return epmoe_add_context(st, "generating layer %lld", (long long)layer);
    return EPMOE_OK;
}

epmoe_status epmoe_ckpt_generate(const epmoe_config *cfg, const epmoe_gen_options *opt,
                                 const char *out_dir, epmoe_gen_stats *stats) {
    epmoe_gen_options defaults = {0};
    if (!opt) opt = &defaults;
    EPMOE_REQUIRE(out_dir != NULL, EPMOE_ERR_INVALID_ARG, "output directory is NULL");
    EPMOE_TRY(check_options(cfg, opt));
    EPMOE_REQUIRE(mkdir(out_dir, 0777) == 0 || errno == EEXIST, EPMOE_ERR_IO,
                  "%s: cannot create directory: %s", out_dir, strerror(errno));
    gen_plan plan;
    EPMOE_TRY(plan_build(&plan, cfg, opt, 0, cfg->n_layers, out_dir, NULL));
    epmoe_status st = check_no_foreign_files(&plan, out_dir);
    if (st == EPMOE_OK) st = plan_write(&plan);
    if (st == EPMOE_OK && plan.real) st = write_index_json(&plan, out_dir);
    if (st == EPMOE_OK && cfg->checkpoint_layout == EPMOE_LAYOUT_NVIDIA_NVFP4)
        st = write_hf_quant_config(&plan, out_dir);
    if (st == EPMOE_OK && plan.real) st = write_config_json(&plan, out_dir); /* last: marks it done */
    if (st == EPMOE_OK) add_stats(&plan, cfg->n_layers, stats);
    plan_free(&plan);
    return st;
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
