/* End-to-end expert-parallel layer throughput on 1 or more GPUs (issue 6's scaling figure), an
 * MPI program: one rank per GPU, coordinator/engine/gpu_engine.h in throughput mode over NCCL.
 *
 *   mpirun -np P ep_layer_bench [--preset dsv4-flash] [--tokens 4096[,16384...]] [--iters 10]
 *                               [--act-quant nvfp4|fp8|high]
 *
 * Every rank holds its slice of the model's routed experts (random well-formed NVFP4 weights,
 * bench/bench_weights.h), the router and the shared expert, and runs the whole layer on its
 * own `tokens` random tokens: route, dispatch (NVFP4 rows), the experts, return, combine,
 * shared expert. Time per forward = from a barrier to the end of epmoe_gpu_engine_sync (host
 * clock; the forward waits for its counts once), median of `iters` after 2 warm-ups, the
 * slowest rank's. tokens/s = P * tokens / that time. Run at P = 1 and P = 2 with the same
 * tokens per rank (weak scaling) and with P * tokens fixed (strong): bench/ep-scaling.sh.
 * Several token counts run one after another on one engine sized for the largest (as a batch
 * job or the service runs every batch size), one RESULT line each.
 */
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include <cuda_runtime.h>
#include <mpi.h>

#include "bench/bench_check.h"
#include "bench/bench_weights.h"
#include "common/config.h"
#include "common/layout.h"
#include "coordinator/engine/gpu_engine.h"
#include "coordinator/transport/device.h"

static double now_s() {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

int main(int argc, char **argv) {
    int provided = 0, rank = 0, P = 1;
    MPI_Init_thread(&argc, &argv, MPI_THREAD_MULTIPLE, &provided);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &P);
    const char *preset = "dsv4-flash", *act_quant = "nvfp4", *tokens_arg = "4096";
    int iters = 10;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--preset")) preset = argv[i + 1];
        else if (!strcmp(argv[i], "--tokens")) tokens_arg = argv[i + 1];
        else if (!strcmp(argv[i], "--iters")) iters = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--act-quant")) act_quant = argv[i + 1];
    }
    std::vector<int64_t> token_counts;
    for (const char *p = tokens_arg; *p;) {
        const int64_t v = atoll(p);
        if (v < 1 || iters < 1) {
            if (rank == 0) fprintf(stderr, "ep_layer_bench: --tokens and --iters must be positive\n");
            MPI_Finalize();
            return 2;
        }
        token_counts.push_back(v);
        while (*p && *p != ',') p++;
        if (*p == ',') p++;
    }
    const int64_t max_tokens = *std::max_element(token_counts.begin(), token_counts.end());
    epmoe_config cfg;
    CHECK_EPMOE(epmoe_config_preset(&cfg, preset));
    CHECK_EPMOE(epmoe_config_set(&cfg, "n_hash_layers", "0"));
    CHECK_EPMOE(bench_set_act_quant(&cfg, act_quant));
    cfg.max_tokens_per_rank = max_tokens;
    int device = 0, shares = 0;
    CHECK_EPMOE(epmoe_local_gpu(MPI_COMM_WORLD, &device, &shares));
    CHECK_CUDA(cudaSetDevice(device));
    cudaStream_t stream;
    CHECK_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    epmoe_transport *t = NULL;
    CHECK_EPMOE(epmoe_device_transport_create(MPI_COMM_WORLD, device, shares, stream, 300.0, &t));

    epmoe_expert_slice slice;
    CHECK_EPMOE(epmoe_slice_of_rank(cfg.n_routed_experts, P, rank, &slice));
    epmoe_layer_weights w;
    bench_make_weights(&cfg, slice.start, slice.end - slice.start, &w);
    epmoe_gpu_engine *engine = NULL;
    CHECK_EPMOE(epmoe_gpu_engine_create(&cfg, t, device, &w, 1, 0, rank == 0 ? stdout : NULL,
                                        &engine));
    epmoe_layer_weights_free(&w);

    const int64_t H = cfg.hidden_size;
    float *x = NULL, *out = NULL;
    CHECK_CUDA(cudaMalloc(&x, sizeof(float) * max_tokens * H));
    CHECK_CUDA(cudaMalloc(&out, sizeof(float) * max_tokens * H));
    {
        std::vector<float> host((size_t)(max_tokens * H));
        epmoe_rng r;
        epmoe_rng_seed(&r, 100 + (uint64_t)rank);
        for (auto &v : host) v = epmoe_rng_normal(&r);
        CHECK_CUDA(cudaMemcpy(x, host.data(), sizeof(float) * host.size(), cudaMemcpyHostToDevice));
    }
    for (const int64_t tokens : token_counts) {
        epmoe_gpu_engine_counters before, after;
        epmoe_gpu_engine_get_counters(engine, &before);
        std::vector<double> times;
        for (int i = -2; i < iters; i++) {
            MPI_Barrier(MPI_COMM_WORLD);
            const double t0 = now_s();
            CHECK_EPMOE(epmoe_gpu_engine_forward(engine, 0, x, NULL, tokens, out));
            CHECK_EPMOE(epmoe_gpu_engine_sync(engine, NULL));
            if (i >= 0) times.push_back(now_s() - t0);
        }
        std::sort(times.begin(), times.end());
        double med = times[times.size() / 2], slowest = 0;
        MPI_Allreduce(&med, &slowest, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
        epmoe_gpu_engine_get_counters(engine, &after);
        int64_t pairs = (after.pairs_computed - before.pairs_computed) / (iters + 2), most_pairs = 0;
        MPI_Allreduce(&pairs, &most_pairs, 1, MPI_INT64_T, MPI_MAX, MPI_COMM_WORLD);
        if (rank == 0) {
            cudaDeviceProp prop;
            CHECK_CUDA(cudaGetDeviceProperties(&prop, device));
            printf("ep_layer_bench %s on %d x %s (transport %s): %lld tokens/rank, layer %.3f ms "
                   "(median of %d, slowest rank), %.0f tokens/s, most pairs on one rank %lld\n",
                   preset, P, prop.name, t->ops->name, (long long)tokens, slowest * 1e3, iters,
                   (double)P * tokens / slowest, (long long)most_pairs);
            printf("RESULT ranks=%d tokens_per_rank=%lld layer_ms=%.4f tokens_per_s=%.1f\n", P,
                   (long long)tokens, slowest * 1e3, (double)P * tokens / slowest);
            fflush(stdout);
        }
    }
    cudaFree(x), cudaFree(out);
    epmoe_gpu_engine_destroy(engine);
    t->ops->destroy(t);
    cudaStreamDestroy(stream);
    MPI_Finalize();
    return 0;
}
