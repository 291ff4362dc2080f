/* Whole-layer timing on one GPU, graph-replayed (issue 4's harness, the layer half).
 *
 *   layer_bench [--preset dsv4-flash|dsv4-pro|gpt-oss-20b|gpt-oss-120b] [--local-experts N]
 *               [--rows 8,64,768,3072 | --tokens 1,8,128] [--reps N] [--json FILE]
 *               [--act-quant nvfp4|fp8|high]
 *
 * One rank's slice of experts with every routed expert local (n_routed_experts = N, the
 * preset's top-k), so rows per expert = T * k / N (--rows gives T = rows * N / k, rounded up;
 * --tokens gives T itself, for decode batches that touch only some experts: the experts the
 * routing touched are reported, the weight bytes a forward must read). gpt-oss presets run their own routing
 * (topk_softmax), activation and expert biases, without a shared expert. Random NVFP4 weights (valid codes and UE4M3 scales), random
 * inputs on the device. Each stage (route, plan, experts, shared, combine) and the whole layer
 * are captured as CUDA graphs and replayed; the median of --reps replays is reported, with two
 * input sets alternating so the inputs are not all L2-resident.
 */
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include <cuda_runtime.h>

#include "common/config.h"
#include "common/formats.h"
#include "common/rng.h"
#include "worker/cuda/gpu_layer.h"

#include "bench/bench_check.h"
#include "bench/bench_weights.h"

typedef epmoe_status (*stage_fn)(epmoe_gpu_context *, const epmoe_gpu_layer *, const float *,
                                 int64_t, float *, cudaStream_t);

struct bench_ctx {
    epmoe_gpu_context *ctx;
    epmoe_gpu_layer *layer;
    int64_t T;
};

/* Captures `stage` on input set `set` and returns the median replay time in microseconds. */
template <typename F>
static double time_graph(cudaStream_t stream, int reps, F capture_body) {
    cudaGraphExec_t exec[2];
    for (int set = 0; set < 2; set++) {
        cudaGraph_t graph;
        CHECK_CUDA(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
        capture_body(set);
        CHECK_CUDA(cudaStreamEndCapture(stream, &graph));
        CHECK_CUDA(cudaGraphInstantiate(&exec[set], graph, 0));
        CHECK_CUDA(cudaGraphDestroy(graph));
    }
    cudaEvent_t a, b;
    CHECK_CUDA(cudaEventCreate(&a));
    CHECK_CUDA(cudaEventCreate(&b));
    for (int i = 0; i < 3; i++) CHECK_CUDA(cudaGraphLaunch(exec[i % 2], stream));
    std::vector<float> t(reps);
    for (int i = 0; i < reps; i++) {
        CHECK_CUDA(cudaEventRecord(a, stream));
        CHECK_CUDA(cudaGraphLaunch(exec[i % 2], stream));
        CHECK_CUDA(cudaEventRecord(b, stream));
        CHECK_CUDA(cudaEventSynchronize(b));
        CHECK_CUDA(cudaEventElapsedTime(&t[i], a, b));
    }
    std::sort(t.begin(), t.end());
    for (int s = 0; s < 2; s++) CHECK_CUDA(cudaGraphExecDestroy(exec[s]));
    CHECK_CUDA(cudaEventDestroy(a));
    CHECK_CUDA(cudaEventDestroy(b));
    return 1e3 * t[reps / 2];
}

int main(int argc, char **argv) {
    const char *preset = "dsv4-flash", *json = NULL, *rows_arg = "8,32,96,768,3072";
    const char *tokens_arg = NULL;
    const char *act_quant = "nvfp4";
    int64_t local_experts = -1;
    int reps = 20;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--preset") && i + 1 < argc) preset = argv[++i];
        else if (!strcmp(argv[i], "--local-experts") && i + 1 < argc) local_experts = atoll(argv[++i]);
        else if (!strcmp(argv[i], "--rows") && i + 1 < argc) rows_arg = argv[++i];
        else if (!strcmp(argv[i], "--tokens") && i + 1 < argc) tokens_arg = argv[++i];
        else if (!strcmp(argv[i], "--reps") && i + 1 < argc) reps = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--json") && i + 1 < argc) json = argv[++i];
        else if (!strcmp(argv[i], "--act-quant") && i + 1 < argc) act_quant = argv[++i];
        else {
            fprintf(stderr, "usage: layer_bench [--preset P] [--local-experts N] "
                            "[--rows a,b | --tokens a,b] [--reps N] [--json F] "
                            "[--act-quant nvfp4|fp8|high]\n");
            return 2;
        }
    }
    epmoe_config cfg;
    CHECK_EPMOE(epmoe_config_preset(&cfg, preset));
    if (local_experts < 0) local_experts = cfg.n_routed_experts / 8; /* an EP=8 slice */
    char buf[64];
    snprintf(buf, sizeof buf, "%lld", (long long)local_experts);
    CHECK_EPMOE(epmoe_config_set(&cfg, "n_routed_experts", buf));
    CHECK_EPMOE(epmoe_config_set(&cfg, "n_hash_layers", "0"));
    CHECK_EPMOE(bench_set_act_quant(&cfg, act_quant));
    const int64_t E = cfg.n_routed_experts, k = cfg.top_k, H = cfg.hidden_size;
    std::vector<int64_t> tokens; /* T of each measurement */
    for (const char *p = tokens_arg ? tokens_arg : rows_arg; *p;) {
        const int64_t v = atoll(p);
        if (v < 1) {
            fprintf(stderr, "layer_bench: %s must be positive integers\n",
                    tokens_arg ? "--tokens" : "--rows");
            return 2;
        }
        tokens.push_back(tokens_arg ? v : (v * E + k - 1) / k);
        while (*p && *p != ',') p++;
        if (*p == ',') p++;
    }
    const int64_t max_T = *std::max_element(tokens.begin(), tokens.end());
    cfg.max_tokens_per_rank = max_T;

    epmoe_layer_weights w;
    bench_make_weights(&cfg, 0, E, &w);
    epmoe_gpu_context *ctx = NULL;
    CHECK_EPMOE(epmoe_gpu_context_create(&cfg, 0, 0, E, max_T * k, 1, NULL, &ctx));
    epmoe_gpu_layer layer;
    CHECK_EPMOE(epmoe_gpu_layer_upload(ctx, &w, &layer));
    cudaStream_t stream;
    CHECK_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));

    float *x[2], *out;
    CHECK_CUDA(cudaMalloc(&x[0], sizeof(float) * max_T * H));
    CHECK_CUDA(cudaMalloc(&x[1], sizeof(float) * max_T * H));
    CHECK_CUDA(cudaMalloc(&out, sizeof(float) * max_T * H));
    {
        std::vector<float> host((size_t)(max_T * H));
        epmoe_rng r;
        epmoe_rng_seed(&r, 11);
        for (int s = 0; s < 2; s++) {
            for (auto &v : host) v = epmoe_rng_normal(&r);
            CHECK_CUDA(cudaMemcpy(x[s], host.data(), sizeof(float) * host.size(), cudaMemcpyHostToDevice));
        }
    }
    cudaDeviceProp prop;
    CHECK_CUDA(cudaGetDeviceProperties(&prop, 0));
    printf("layer_bench on %s: %s slice of %lld local experts (top-%lld), H=%lld I=%lld, "
           "act_quant %s, graph-replayed medians of %d reps (us)\n",
           prop.name, preset, (long long)E, (long long)k, (long long)H,
           (long long)cfg.moe_inter_size, act_quant, reps);
    printf("%8s %7s %8s %9s %9s %9s %9s %9s %10s %11s %12s\n", "rows/exp", "tokens", "touched",
           "route", "plan", "experts", "shared", "combine", "layer", "tokens/s", "expert TF/s");
    FILE *jf = json ? fopen(json, "w") : NULL;
    if (jf) fprintf(jf, "{\"device\": \"%s\", \"preset\": \"%s\", \"act_quant\": \"%s\", \"local_experts\": %lld, \"rows\": [\n", prop.name, preset, act_quant, (long long)E);
    std::vector<int64_t> per_expert((size_t)E);
    for (size_t i = 0; i < tokens.size(); i++) {
        const int64_t T = tokens[i];
        const double rows_per_expert = (double)T * (double)k / (double)E;
        /* route and plan must run before experts/shared/combine can be captured alone */
        CHECK_EPMOE(epmoe_gpu_route(ctx, &layer, x[0], NULL, T, stream));
        CHECK_EPMOE(epmoe_gpu_plan(ctx, T, stream));
        CHECK_CUDA(cudaStreamSynchronize(stream));
        CHECK_CUDA(cudaMemcpy(per_expert.data(), ctx->arena.tokens_per_expert, sizeof(int64_t) * E,
                              cudaMemcpyDeviceToHost));
        int64_t touched = 0; /* experts whose weights this forward reads */
        for (int64_t n : per_expert) touched += n > 0;
        double t_route = time_graph(stream, reps, [&](int s) { CHECK_EPMOE(epmoe_gpu_route(ctx, &layer, x[s], NULL, T, stream)); });
        double t_plan = time_graph(stream, reps, [&](int) { CHECK_EPMOE(epmoe_gpu_plan(ctx, T, stream)); });
        double t_exp = time_graph(stream, reps, [&](int s) { CHECK_EPMOE(epmoe_gpu_experts(ctx, &layer, x[s], T, stream)); });
        double t_sh = time_graph(stream, reps, [&](int s) { CHECK_EPMOE(epmoe_gpu_shared(ctx, &layer, x[s], T, stream)); });
        double t_comb = time_graph(stream, reps, [&](int) { CHECK_EPMOE(epmoe_gpu_combine(ctx, &layer, T, out, stream)); });
        double t_layer = time_graph(stream, reps, [&](int s) { CHECK_EPMOE(epmoe_gpu_layer_forward(ctx, &layer, x[s], NULL, T, out, stream)); });
        unsigned long long sat = 0;
        CHECK_EPMOE(epmoe_gpu_read_flags(ctx, stream, &sat));
        double flops = 2.0 * (double)T * k * (3.0 * (double)H * cfg.moe_inter_size);
        printf("%8.2f %7lld %8lld %9.1f %9.1f %9.1f %9.1f %9.1f %10.1f %11.0f %12.1f\n",
               rows_per_expert, (long long)T, (long long)touched, t_route, t_plan, t_exp, t_sh,
               t_comb, t_layer, T / (t_layer * 1e-6), flops / (t_exp * 1e-6) / 1e12);
        if (jf)
            fprintf(jf, "%s {\"rows_per_expert\": %.3f, \"tokens\": %lld, \"experts_touched\": %lld, \"route_us\": %.2f, \"plan_us\": %.2f, \"experts_us\": %.2f, \"shared_us\": %.2f, \"combine_us\": %.2f, \"layer_us\": %.2f}\n",
                    i ? "," : "", rows_per_expert, (long long)T, (long long)touched, t_route, t_plan, t_exp, t_sh, t_comb, t_layer);
    }
    if (jf) {
        fprintf(jf, "]}\n");
        fclose(jf);
    }
    epmoe_gpu_layer_free(&layer);
    epmoe_gpu_context_free(ctx);
    epmoe_layer_weights_free(&w);
    return 0;
}
