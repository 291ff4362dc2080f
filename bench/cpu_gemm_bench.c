/* The CPU expert products alone (epmoe_cpu_gemm_panels) on one expert's shapes, and the CPU
 * expert MLP (epmoe_cpu_experts_forward) of one expert with its dequantized panels cached
 * next to dequantizing them per call, so the two costs can be told apart.
 *
 *   cpu_gemm_bench [--hidden H] [--inter I] [--rows r1,r2,...] [--min-seconds s]
 *
 * Defaults are DeepSeek-V4-Flash: H = 4096, I = 2048, so W13 is N = 2I = 4096, K = H and W2
 * is N = H = 4096, K = I. Every line prints a hash of the output bits: two builds of the
 * products must print the same hashes on the same arguments (the inputs are seeded). */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/config.h"
#include "common/rng.h"
#include "kernels/ops.h"
#include "worker/expert_weights.h"
#include "worker/experts.h"

#define MAX_ROW_COUNTS 16

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void *xmalloc(size_t bytes) {
    void *p = malloc(bytes ? bytes : 1);
    if (!p) {
        fprintf(stderr, "cpu_gemm_bench: cannot allocate %zu bytes\n", bytes);
        exit(1);
    }
    return p;
}

/* FNV-1a over the bytes: equal hashes mean (with overwhelming odds) equal bits. */
static uint64_t hash_bits(const float *v, size_t n) {
    const unsigned char *p = (const unsigned char *)v;
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n * sizeof(float); i++) h = (h ^ p[i]) * 1099511628211ull;
    return h;
}

static void fill_normal(epmoe_rng *r, float *v, size_t n) {
    for (size_t i = 0; i < n; i++) v[i] = epmoe_rng_normal(r);
}

static void fill_bytes(epmoe_rng *r, uint8_t *p, size_t n, unsigned lo, unsigned hi) {
    for (size_t i = 0; i < n; i++) p[i] = (uint8_t)(lo + epmoe_rng_below(r, hi - lo + 1));
}

typedef struct {
    double best_s, mean_s;
    int reps;
} timing;

/* Repeats fn until min_seconds have passed (at least twice: the first call warms the caches
 * and is not counted). */
typedef void (*bench_fn)(void *ctx);
static timing time_it(bench_fn fn, void *ctx, double min_seconds) {
    fn(ctx);
    timing t = {1e30, 0.0, 0};
    double start = now_s(), total = 0.0;
    do {
        double t0 = now_s();
        fn(ctx);
        double dt = now_s() - t0;
        if (dt < t.best_s) t.best_s = dt;
        total += dt;
        t.reps++;
    } while (now_s() - start < min_seconds || t.reps < 2);
    t.mean_s = total / t.reps;
    return t;
}

typedef struct {
    const float *A, *panels;
    int64_t M, N, K;
    float *C;
} gemm_case;

static void run_gemm(void *ctx) {
    gemm_case *g = ctx;
    epmoe_cpu_gemm_panels(g->A, g->M, g->K, g->panels, g->N, g->C);
}

static void bench_gemm(const char *name, int64_t N, int64_t K, const int64_t *rows, int n_rows,
                       double min_seconds) {
    int64_t max_rows = 0;
    for (int i = 0; i < n_rows; i++)
        if (rows[i] > max_rows) max_rows = rows[i];
    epmoe_rng r;
    epmoe_rng_seed(&r, 11);
    float *B = xmalloc((size_t)N * (size_t)K * sizeof(float));
    float *panels = xmalloc(epmoe_cpu_panels_floats(N, K) * sizeof(float));
    float *A = xmalloc((size_t)max_rows * (size_t)K * sizeof(float));
    float *C = xmalloc((size_t)max_rows * (size_t)N * sizeof(float));
    fill_normal(&r, B, (size_t)N * (size_t)K);
    fill_normal(&r, A, (size_t)max_rows * (size_t)K);
    epmoe_cpu_pack_panels(B, N, K, panels);
    free(B);
    for (int i = 0; i < n_rows; i++) {
        gemm_case g = {A, panels, rows[i], N, K, C};
        timing t = time_it(run_gemm, &g, min_seconds);
        double gflop = 2.0 * (double)rows[i] * (double)N * (double)K * 1e-9;
        printf("gemm_panels %-3s N=%-5" PRId64 " K=%-5" PRId64 " rows=%-4" PRId64
               " best %9.3f ms  mean %9.3f ms  %6.2f GFLOP/s  reps %3d  bits %016" PRIx64 "\n",
               name, N, K, rows[i], t.best_s * 1e3, t.mean_s * 1e3, gflop / t.best_s, t.reps,
               hash_bits(C, (size_t)rows[i] * (size_t)N));
        fflush(stdout);
    }
    free(A), free(panels), free(C);
}

/* One local expert with random well-formed NVFP4 weights: any E2M1 code, UE4M3 block scales
 * in [2^-3, 2^1] (codes 0x20..0x40), tensor scales 1/64. */
static void make_expert(int64_t H, int64_t I, epmoe_layer_weights *w) {
    epmoe_rng r;
    epmoe_rng_seed(&r, 13);
    memset(w, 0, sizeof *w);
    w->hidden_size = H;
    w->inter_size = I;
    w->n_local = 1;
    w->slice.start = 0;
    w->slice.end = 1;
    w->w13_codes = xmalloc((size_t)(2 * I) * (size_t)(H / 2));
    w->w13_sf = xmalloc((size_t)(2 * I) * (size_t)(H / 16));
    w->w2_codes = xmalloc((size_t)H * (size_t)(I / 2));
    w->w2_sf = xmalloc((size_t)H * (size_t)(I / 16));
    fill_bytes(&r, w->w13_codes, (size_t)(2 * I) * (size_t)(H / 2), 0, 255);
    fill_bytes(&r, w->w13_sf, (size_t)(2 * I) * (size_t)(H / 16), 0x20, 0x40);
    fill_bytes(&r, w->w2_codes, (size_t)H * (size_t)(I / 2), 0, 255);
    fill_bytes(&r, w->w2_sf, (size_t)H * (size_t)(I / 16), 0x20, 0x40);
    static float scale_2[2] = {1.0f / 64, 1.0f / 64}, input_scale = 1.0f / 256;
    w->w13_scale_2 = scale_2;
    w->w2_scale_2 = scale_2;
    w->w13_input_scale = &input_scale;
    w->w2_input_scale = &input_scale;
}

typedef struct {
    const epmoe_config *cfg;
    const epmoe_layer_weights *w;
    const float *x;
    int64_t tokens[1], offsets[2];
    float *y;
    epmoe_expert_scratch *s;
} expert_case;

static void run_expert(void *ctx) {
    expert_case *c = ctx;
    if (epmoe_cpu_experts_forward(c->cfg, c->w, c->x, c->tokens, c->offsets, c->y, c->s, NULL) !=
        EPMOE_OK) {
        fprintf(stderr, "cpu_gemm_bench: %s\n", epmoe_last_error());
        exit(1);
    }
}

static void bench_expert(int64_t H, int64_t I, const int64_t *rows, int n_rows,
                         double min_seconds) {
    epmoe_config cfg;
    epmoe_config_defaults(&cfg);
    epmoe_layer_weights w;
    make_expert(H, I, &w);
    epmoe_expert_scratch *s = NULL;
    if (epmoe_expert_scratch_create(H, I, 0, &s) != EPMOE_OK) {
        fprintf(stderr, "cpu_gemm_bench: %s\n", epmoe_last_error());
        exit(1);
    }
    int64_t max_rows = 0;
    for (int i = 0; i < n_rows; i++)
        if (rows[i] > max_rows) max_rows = rows[i];
    epmoe_rng r;
    epmoe_rng_seed(&r, 17);
    float *x = xmalloc((size_t)max_rows * (size_t)H * sizeof(float));
    float *y = xmalloc((size_t)max_rows * (size_t)H * sizeof(float));
    fill_normal(&r, x, (size_t)max_rows * (size_t)H);
    for (int cached = 0; cached < 2; cached++) {
        if (cached && epmoe_layer_weights_cache_experts_cpu(&w) != EPMOE_OK) {
            fprintf(stderr, "cpu_gemm_bench: %s\n", epmoe_last_error());
            exit(1);
        }
        for (int i = 0; i < n_rows; i++) {
            expert_case c = {&cfg, &w, x, {rows[i]}, {0, max_rows}, y, s};
            timing t = time_it(run_expert, &c, min_seconds);
            printf("expert_mlp H=%-5" PRId64 " I=%-5" PRId64 " rows=%-4" PRId64
                   " %-12s best %9.3f ms  mean %9.3f ms  reps %3d  bits %016" PRIx64 "\n",
                   H, I, rows[i], cached ? "cached" : "dequant/call", t.best_s * 1e3,
                   t.mean_s * 1e3, t.reps, hash_bits(y, (size_t)rows[i] * (size_t)H));
            fflush(stdout);
        }
    }
    /* the dequantization alone: what a cache fill costs per expert */
    epmoe_layer_weights_release_cpu(&w);
    double t0 = now_s();
    if (epmoe_layer_weights_cache_experts_cpu(&w) != EPMOE_OK) {
        fprintf(stderr, "cpu_gemm_bench: %s\n", epmoe_last_error());
        exit(1);
    }
    printf("dequant_to_panels H=%-5" PRId64 " I=%-5" PRId64 " one expert (W13 + W2) %9.3f ms\n",
           H, I, (now_s() - t0) * 1e3);
    epmoe_layer_weights_release_cpu(&w);
    epmoe_expert_scratch_free(s);
    free(x), free(y);
    free(w.w13_codes), free(w.w13_sf), free(w.w2_codes), free(w.w2_sf);
}

static int parse_rows(const char *arg, int64_t *rows) {
    int n = 0;
    const char *p = arg;
    while (*p && n < MAX_ROW_COUNTS) {
        char *end;
        long long v = strtoll(p, &end, 10);
        if (end == p || v < 1) return -1;
        rows[n++] = v;
        p = *end == ',' ? end + 1 : end;
        if (*end && *end != ',') return -1;
    }
    return n;
}

int main(int argc, char **argv) {
    int64_t H = 4096, I = 2048;
    int64_t rows[MAX_ROW_COUNTS] = {1, 4, 8, 16, 64, 256};
    int n_rows = 6;
    double min_seconds = 1.0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--hidden") && i + 1 < argc) {
            H = strtoll(argv[++i], NULL, 10);
        } else if (!strcmp(argv[i], "--inter") && i + 1 < argc) {
            I = strtoll(argv[++i], NULL, 10);
        } else if (!strcmp(argv[i], "--rows") && i + 1 < argc) {
            n_rows = parse_rows(argv[++i], rows);
        } else if (!strcmp(argv[i], "--min-seconds") && i + 1 < argc) {
            min_seconds = strtod(argv[++i], NULL);
        } else {
            fprintf(stderr,
                    "usage: %s [--hidden H] [--inter I] [--rows r1,r2,...] [--min-seconds s]\n",
                    argv[0]);
            return 2;
        }
    }
    if (n_rows < 1 || H < 16 || I < 16 || H % 16 || I % 16) {
        fprintf(stderr, "cpu_gemm_bench: bad arguments (H and I: multiples of 16)\n");
        return 2;
    }
    bench_gemm("W13", 2 * I, H, rows, n_rows, min_seconds);
    bench_gemm("W2", H, I, rows, n_rows, min_seconds);
    bench_expert(H, I, rows, n_rows, min_seconds);
    return 0;
}
