/* Times the grouped NVFP4 GEMMs (kernels/cuda/grouped_gemm.h) at DeepSeek-V4-Flash and V4-Pro
 * expert-slice shapes, with the two ceilings measured in the same process: a device-to-device
 * copy (bytes read + written) and a cuBLAS bf16 GEMM of the same FLOPs (one [E*rows, K] x
 * [K, N] product). Writes one JSON record per measurement.
 *
 *   gemm_bench --json out.json [--reps 20] [--rows 8,16,...] [--kernels 4,6,9] [--no-row-major]
 *              [--warm-ms 200] [--a-fp8]
 *
 * --a-fp8: W4A8 (act_quant = fp8): FP8 A (random E4M3, power-of-two scales per 128), weights
 * with power-of-two block scales (as MXFP4 loads) and their FP8 image, so AUTO runs the FP8
 * tensor-core kernel at prefill; forced kernels are compared bit for bit only within their
 * family (FP8 tensor cores or bf16), the two sum in different orders.
 *
 * Beside AUTO's choice, every sm_90 kernel of --kernels (epmoe_gemm_sm90_kernel values; default
 * all) is forced and timed on the slab-layout weights and, unless --no-row-major, on the
 * row-major ones; each forced run's output must equal AUTO's bit for bit (exit status 3 if not).
 *
 * Timing: 3 warm-up calls, then the call captured into a CUDA graph (as the layer runs it),
 * replayed for --warm-ms (the clock settles), then replayed back to back, events around each
 * batch of 3 replays, median of --reps batches: device
 * time per call. AUTO's call is also timed launched eagerly ("eager", host-side launch work
 * included), as bench/torch_grouped_mm.py times torch both ways. Working sets
 * exceed the L2 on every call (the smallest weight set, Flash W2 in NVFP4, is 151 MB against a
 * 50-60 MB L2), so back-to-back calls cannot be served from the cache. Inputs are random (never
 * zeros): random E2M1 bytes, random normal-range UE4M3 scales. */
#include <algorithm>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <vector>

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "common/layout.h"
#include "kernels/cuda/grouped_gemm.h"

#include "bench/bench_check.h"


__device__ __forceinline__ uint32_t hash32(uint64_t i, uint32_t seed) {
    uint64_t x = i * 0x9E3779B97F4A7C15ull + seed;
    x ^= x >> 31;
    x *= 0xBF58476D1CE4E5B9ull;
    x ^= x >> 29;
    return (uint32_t)x;
}
__global__ void fill_bytes(uint8_t *p, size_t n, uint32_t seed, int kind) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        const uint32_t h = hash32(i, seed);
        p[i] = kind == 0   ? (uint8_t)h                          /* codes */
               : kind == 1 ? (uint8_t)(0x20 + h % 0x30)          /* UE4M3 2^-3..2^3 */
               : kind == 2 ? (uint8_t)((h % 0x7e) | (h & 0x80))  /* E4M3, never NaN */
               : kind == 3 ? (uint8_t)(120 + h % 8)              /* UE8M0 2^-7..2^0 */
                           : (uint8_t)((4 + h % 5) << 3);        /* UE4M3 powers of two 2^-3..2^1 */
    }
}
__global__ void fill_f32(float *p, size_t n, uint32_t seed) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        p[i] = 0.5f + (hash32(i, seed) & 0xFFFF) / 65536.0f;
}
__global__ void fill_bf16(__nv_bfloat16 *p, size_t n, uint32_t seed) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        p[i] = __float2bfloat16_rn(((int)(hash32(i, seed) & 0xFFFF) - 32768) / 32768.0f);
}

static cudaStream_t g_stream; /* every timed launch goes here (graph capture needs a real stream) */

/* Median over reps of the event-timed run() on g_stream, divided by the calls it makes. */
template <typename F>
static double median_event_ms(F &&run, int reps, int calls_per_run) {
    cudaEvent_t a, b;
    CHECK_CUDA(cudaEventCreate(&a));
    CHECK_CUDA(cudaEventCreate(&b));
    std::vector<float> ms(reps);
    for (int i = 0; i < reps; i++) {
        CHECK_CUDA(cudaEventRecord(a, g_stream));
        run();
        CHECK_CUDA(cudaEventRecord(b, g_stream));
        CHECK_CUDA(cudaEventSynchronize(b));
        CHECK_CUDA(cudaEventElapsedTime(&ms[i], a, b));
        ms[i] /= calls_per_run;
    }
    CHECK_CUDA(cudaGetLastError());
    std::sort(ms.begin(), ms.end());
    CHECK_CUDA(cudaEventDestroy(a));
    CHECK_CUDA(cudaEventDestroy(b));
    return ms[reps / 2];
}

/* Milliseconds of graph replays before the timed batches (--warm-ms). Without them the first
 * call timed after a shape change (AUTO's) could take much longer than the same kernel forced
 * later at the same shape (right after the power-capped prefill shapes; the cause is not
 * measured: docs/perf-history.md §1), so every call is timed after running on its own for a
 * while. torch_grouped_mm.py warms the same way. */
static double g_warm_ms = 200.0;

/* Device time per call: the calls are captured once into a CUDA graph (as the layer runs them),
 * replayed for g_warm_ms, then replayed kBatch times back to back between two events, so
 * host-side launch work overlaps the device work instead of being timed; median over reps
 * batches. */
template <typename F>
static double median_ms(F &&launch, int reps) {
    constexpr int kBatch = 3;
    for (int i = 0; i < 3; i++) launch();
    CHECK_CUDA(cudaStreamSynchronize(g_stream));
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    CHECK_CUDA(cudaStreamBeginCapture(g_stream, cudaStreamCaptureModeRelaxed));
    launch();
    CHECK_CUDA(cudaStreamEndCapture(g_stream, &graph));
    CHECK_CUDA(cudaGraphInstantiate(&exec, graph, 0));
    CHECK_CUDA(cudaGraphLaunch(exec, g_stream)); /* upload */
    CHECK_CUDA(cudaStreamSynchronize(g_stream));
    for (double warmed = 0.0; warmed < g_warm_ms;)
        warmed += kBatch * median_event_ms([&] {
            for (int j = 0; j < kBatch; j++) CHECK_CUDA(cudaGraphLaunch(exec, g_stream));
        }, 1, kBatch);
    const double ms = median_event_ms([&] {
        for (int j = 0; j < kBatch; j++) CHECK_CUDA(cudaGraphLaunch(exec, g_stream));
    }, reps, kBatch);
    CHECK_CUDA(cudaGraphExecDestroy(exec));
    CHECK_CUDA(cudaGraphDestroy(graph));
    return ms;
}

/* The same call launched eagerly, one event pair around each: what a caller that does not use
 * graphs sees, host-side launch work included (reported beside the graph time). */
template <typename F>
static double eager_median_ms(F &&launch, int reps) {
    return median_event_ms(launch, reps, 1);
}

struct Model {
    const char *name;
    int64_t H, I, E;
};

/* Weight-stream probe: the decode kernels' access pattern alone (each warp a 32-row slab, four
 * threads per row, 16 bytes per thread per 128-k step, rows g + 8r, and each row's two scale
 * bytes), and the same bytes read linearly: the bandwidth the pattern itself allows, without
 * any dequantization or MMA. */
__global__ void probe_slab_kernel(const uint8_t *codes, const uint8_t *sf, int64_t rows, int K,
                                  unsigned *sink) {
    const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int64_t warp = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) / 32;
    const int64_t warps = (int64_t)gridDim.x * blockDim.x / 32;
    const int steps = K / 128;
    const int64_t code_row8 = 8 * (int64_t)(K / 2), sf_row8 = 8 * (int64_t)(K / 16);
    unsigned acc = 0;
    for (int64_t slab = warp; slab < rows / 32; slab += warps) {
        const uint8_t *c = codes + (slab * 32 + g) * (int64_t)(K / 2) + 16 * t;
        const uint8_t *s = sf + (slab * 32 + g) * (int64_t)(K / 16) + 2 * t;
#pragma unroll 4
        for (int step = 0; step < steps; ++step)
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                const uint4 v = __ldcs((const uint4 *)(c + r * code_row8 + step * 64));
                acc ^= v.x ^ v.y ^ v.z ^ v.w ^ __ldcs((const unsigned short *)(s + r * sf_row8 + step * 8));
            }
    }
    if (acc == 0x9E3779B9u) sink[0] = acc; /* keeps the loads */
}
/* The same slabs read in visits of 256 bytes per row (16 threads per row, four 128-k steps at
 * a time), and slabs stored step-major (each warp's 32 rows x 64 bytes of a step contiguous):
 * the two ways to make the decode stream longer. Same bytes, no compute. */
__global__ void probe_visit256_kernel(const uint8_t *codes, const uint8_t *sf, int64_t rows, int K,
                                      unsigned *sink) {
    const int lane = threadIdx.x % 32;
    const int64_t warp = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) / 32;
    const int64_t warps = (int64_t)gridDim.x * blockDim.x / 32;
    const int visits = K / 512;
    unsigned acc = 0;
    for (int64_t slab = warp; slab < rows / 32; slab += warps) {
        const uint8_t *c = codes + (slab * 32 + lane / 16) * (int64_t)(K / 2) + 16 * (lane % 16);
        const uint8_t *s = sf + (slab * 32 + lane) * (int64_t)(K / 16);
        for (int v = 0; v < visits; ++v) {
#pragma unroll
            for (int r = 0; r < 16; ++r) { /* rows 2r, 2r+1 */
                const uint4 x = __ldcs((const uint4 *)(c + 2 * r * (int64_t)(K / 2) + v * 256));
                acc ^= x.x ^ x.y ^ x.z ^ x.w;
            }
            const uint2 y = __ldcs((const uint2 *)(s + v * 32)); /* this lane's row: 32 scale bytes */
            const uint2 z = __ldcs((const uint2 *)(s + v * 32 + 8));
            const uint2 w = __ldcs((const uint2 *)(s + v * 32 + 16));
            const uint2 u = __ldcs((const uint2 *)(s + v * 32 + 24));
            acc ^= y.x ^ y.y ^ z.x ^ z.y ^ w.x ^ w.y ^ u.x ^ u.y;
        }
    }
    if (acc == 0x9E3779B9u) sink[0] = acc;
}
__global__ void probe_stepmajor_kernel(const uint8_t *codes, const uint8_t *sf, int64_t rows, int K,
                                       unsigned *sink) {
    const int lane = threadIdx.x % 32;
    const int64_t warp = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) / 32;
    const int64_t warps = (int64_t)gridDim.x * blockDim.x / 32;
    const int steps = K / 128;
    unsigned acc = 0;
    for (int64_t slab = warp; slab < rows / 32; slab += warps) {
        const uint8_t *c = codes + slab * 32 * (int64_t)(K / 2) + 16 * lane;
        const uint8_t *s = sf + slab * 32 * (int64_t)(K / 16) + 8 * lane;
#pragma unroll 4
        for (int step = 0; step < steps; ++step) {
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                const uint4 x = __ldcs((const uint4 *)(c + step * 2048 + r * 512));
                acc ^= x.x ^ x.y ^ x.z ^ x.w;
            }
            const uint2 y = __ldcs((const uint2 *)(s + step * 256));
            acc ^= y.x ^ y.y;
        }
    }
    if (acc == 0x9E3779B9u) sink[0] = acc;
}
__global__ void probe_linear_kernel(const uint4 *p, int64_t n16, unsigned *sink) {
    unsigned acc = 0;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n16;
         i += (int64_t)gridDim.x * blockDim.x) {
        const uint4 v = __ldcs(p + i);
        acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
    if (acc == 0x9E3779B9u) sink[0] = acc;
}

/* Words of a that differ from b (every kernel must give AUTO's bits at full size too). */
__global__ void count_diff_kernel(const uint32_t *a, const uint32_t *b, int64_t n, unsigned long long *diff) {
    unsigned long long local = 0;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        local += a[i] != b[i];
    if (local) atomicAdd(diff, local);
}

int main(int argc, char **argv) {
    const char *json_path = "gemm_bench.json";
    int reps = 20;
    std::vector<int64_t> rows_list = {8, 16, 32, 64, 96, 768, 1536, 3072};
    std::vector<int> kernel_list; /* sm_90 kernels timed beside AUTO (default: all) */
    for (int k = 1; k < EPMOE_GEMM_SM90_KERNEL_COUNT; k++) kernel_list.push_back(k);
    bool row_major_too = true;    /* each also on the row-major weights */
    bool a_fp8 = false;
    bool serial_too = false;      /* each also launched only after its pre-pass */
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--json") && i + 1 < argc) json_path = argv[++i];
        else if (!strcmp(argv[i], "--reps") && i + 1 < argc) reps = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--warm-ms") && i + 1 < argc) g_warm_ms = atof(argv[++i]);
        else if (!strcmp(argv[i], "--kernels") && i + 1 < argc) {
            kernel_list.clear();
            for (char *tok = strtok(argv[++i], ","); tok; tok = strtok(NULL, ","))
                kernel_list.push_back(atoi(tok));
        } else if (!strcmp(argv[i], "--no-row-major")) row_major_too = false;
        else if (!strcmp(argv[i], "--serial-too")) serial_too = true;
        else if (!strcmp(argv[i], "--a-fp8")) a_fp8 = true;
        else if (!strcmp(argv[i], "--rows") && i + 1 < argc) {
            rows_list.clear();
            for (char *tok = strtok(argv[++i], ","); tok; tok = strtok(NULL, ","))
                rows_list.push_back(atoll(tok));
        } else {
            fprintf(stderr, "usage: %s [--json path] [--reps n] [--rows a,b,c] [--kernels k1,k2,...] "
                            "[--no-row-major] [--serial-too] [--warm-ms ms]\n", argv[0]);
            return 2;
        }
    }
    FILE *js = fopen(json_path, "w");
    if (!js) {
        fprintf(stderr, "cannot open %s\n", json_path);
        return 1;
    }
    cudaDeviceProp prop;
    CHECK_CUDA(cudaGetDeviceProperties(&prop, 0));
    CHECK_CUDA(cudaStreamCreateWithFlags(&g_stream, cudaStreamNonBlocking));
    printf("device: %s, %d SMs, L2 %.0f MB\n", prop.name, prop.multiProcessorCount,
           prop.l2CacheSize / 1e6);
    fprintf(js, "{\"device\": \"%s\", \"sms\": %d, \"l2_bytes\": %d, \"records\": [\n", prop.name,
            prop.multiProcessorCount, prop.l2CacheSize);
    int first = 1;
#define RECORD(...)                                                                             \
    do {                                                                                        \
        fprintf(js, "%s  {", first ? "" : ",\n");                                               \
        fprintf(js, __VA_ARGS__);                                                               \
        fprintf(js, "}");                                                                       \
        first = 0;                                                                              \
    } while (0)

    /* ceiling 1: device-to-device copy, 2 GiB moved per copy (1 GiB read + 1 GiB written) */
    {
        const size_t bytes = (size_t)1 << 30;
        void *src, *dst;
        CHECK_CUDA(cudaMalloc(&src, bytes));
        CHECK_CUDA(cudaMalloc(&dst, bytes));
        fill_bytes<<<1024, 256>>>((uint8_t *)src, bytes, 1, 0);
        CHECK_CUDA(cudaDeviceSynchronize());
        /* eagerly: a memcpy node inside a graph goes to the copy engines, measured here at
         * 2.8 TB/s on the H200 against 4.2 TB/s for the eager (SM) copy */
        const double ms = eager_median_ms([&] { CHECK_CUDA(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, g_stream)); }, reps);
        const double gbs = 2.0 * bytes / (ms * 1e-3) / 1e9;
        printf("d2d copy: %.1f GB/s (read+write)\n", gbs);
        RECORD("\"kind\": \"copy\", \"bytes_moved\": %zu, \"ms\": %.5f, \"gbs\": %.2f", 2 * bytes, ms, gbs);
        CHECK_CUDA(cudaFree(src));
        CHECK_CUDA(cudaFree(dst));
    }

    const Model models[2] = {{"V4-Flash", 4096, 2048, 32}, {"V4-Pro", 7168, 3072, 48}};
    int64_t max_rows = 0;
    for (int64_t r : rows_list) max_rows = std::max(max_rows, r);
    /* buffers sized once for the largest shape: W13 (N = 2I, K = H) and W2 (N = H, K = I) */
    size_t max_cap = 0, max_ak = 0, max_nk_e = 0, max_out = 0, max_nk = 0;
    for (const Model &m : models) {
        const size_t cap = (size_t)(m.E * max_rows + m.E * (EPMOE_GEMM_PAD_ROWS - 1));
        const size_t capr = (cap + EPMOE_GEMM_PAD_ROWS - 1) / EPMOE_GEMM_PAD_ROWS * EPMOE_GEMM_PAD_ROWS;
        max_cap = std::max(max_cap, capr);
        max_ak = std::max(max_ak, capr * (size_t)std::max(m.H, m.I));
        max_nk_e = std::max(max_nk_e, (size_t)(m.E * 2 * m.I * m.H));
        max_nk = std::max(max_nk, (size_t)(2 * m.I * m.H));
        max_out = std::max(max_out, capr * (size_t)std::max(2 * m.I, m.H));
    }
    uint8_t *a_codes, *a_sf, *w_codes, *w_sf;
    float *a_scale, *w_scale, *out;
    __nv_bfloat16 *cb_a, *cb_w, *cb_out;
    int64_t *d_offs, *d_counts;
    CHECK_CUDA(cudaMalloc(&a_codes, max_ak)); /* FP8 A takes a byte per element */
    CHECK_CUDA(cudaMalloc(&a_sf, max_ak / 16));
    uint8_t *w_fp8 = NULL, *w_fp8_exp = NULL; /* --a-fp8: the weights' FP8 image */
    unsigned long long *d_inexact = NULL;
    if (a_fp8) {
        CHECK_CUDA(cudaMalloc(&w_fp8, max_nk_e));
        CHECK_CUDA(cudaMalloc(&w_fp8_exp, max_nk_e / 128));
        CHECK_CUDA(cudaMalloc(&d_inexact, 8));
    }
    CHECK_CUDA(cudaMalloc(&a_scale, max_cap * 4));
    CHECK_CUDA(cudaMalloc(&w_codes, max_nk_e / 2));
    CHECK_CUDA(cudaMalloc(&w_sf, max_nk_e / 16));
    CHECK_CUDA(cudaMalloc(&w_scale, 2 * 64 * 4));
    CHECK_CUDA(cudaMalloc(&out, max_out * 4));
    float *out_auto; /* AUTO's output, against which every forced kernel's bits are compared */
    CHECK_CUDA(cudaMalloc(&out_auto, max_out * 4));
    unsigned long long *d_diff;
    int any_kernel_differs = 0;
    CHECK_CUDA(cudaMalloc(&d_diff, sizeof *d_diff));
    CHECK_CUDA(cudaMalloc(&cb_a, max_ak * 2));
    void *a_ws; /* the wgmma kernel's bf16 copy of A */
    CHECK_CUDA(cudaMalloc(&a_ws, max_ak * 2));
    CHECK_CUDA(cudaMalloc(&cb_w, max_nk * 2));
    CHECK_CUDA(cudaMalloc(&cb_out, max_out * 2));
    CHECK_CUDA(cudaMalloc(&d_offs, 65 * 8));
    CHECK_CUDA(cudaMalloc(&d_counts, 64 * 8));
    fill_bytes<<<2048, 256>>>(a_codes, a_fp8 ? max_ak : max_ak / 2, 2, a_fp8 ? 2 : 0);
    fill_bytes<<<2048, 256>>>(a_sf, a_fp8 ? max_ak / 128 : max_ak / 16, 3, a_fp8 ? 3 : 1);
    fill_bytes<<<2048, 256>>>(w_codes, max_nk_e / 2, 4, 0);
    fill_bytes<<<2048, 256>>>(w_sf, max_nk_e / 16, 5, a_fp8 ? 4 : 1);
    fill_f32<<<64, 256>>>(a_scale, max_cap, 6);
    fill_f32<<<1, 128>>>(w_scale, 128, 7);
    fill_bf16<<<2048, 256>>>(cb_a, max_ak, 8);
    fill_bf16<<<2048, 256>>>(cb_w, max_nk, 9);
    CHECK_CUDA(cudaGetLastError());
    CHECK_CUDA(cudaDeviceSynchronize());
    cublasHandle_t blas;
    CHECK_CUBLAS(cublasCreate(&blas));
    CHECK_CUBLAS(cublasSetStream(blas, g_stream));

    /* the weight-stream probe over each shape's NVFP4 weights (codes + scales) */
    {
        unsigned *sink;
        CHECK_CUDA(cudaMalloc(&sink, 4));
        for (const Model &m : models) {
            for (int which = 0; which < 2; which++) {
                const int64_t N = which == 0 ? 2 * m.I : m.H, K = which == 0 ? m.H : m.I;
                const int64_t rows = m.E * N;
                const double bytes = (double)rows * K * (0.5 + 1.0 / 16);
                const int sms = prop.multiProcessorCount;
                const double slab_ms = median_ms([&] {
                    probe_slab_kernel<<<sms * 4, 128, 0, g_stream>>>(w_codes, w_sf, rows, (int)K, sink);
                }, reps);
                const double lin_ms = median_ms([&] {
                    probe_linear_kernel<<<sms * 8, 256, 0, g_stream>>>((const uint4 *)w_codes, rows * K / 32, sink);
                    probe_linear_kernel<<<sms * 8, 256, 0, g_stream>>>((const uint4 *)w_sf, rows * K / 256, sink);
                }, reps);
                const double v256_ms = median_ms([&] {
                    probe_visit256_kernel<<<sms * 4, 128, 0, g_stream>>>(w_codes, w_sf, rows, (int)K, sink);
                }, reps);
                const double sm_ms = median_ms([&] {
                    probe_stepmajor_kernel<<<sms * 4, 128, 0, g_stream>>>(w_codes, w_sf, rows, (int)K, sink);
                }, reps);
                CHECK_CUDA(cudaGetLastError());
                const double gb = bytes / 1e9;
                printf("probe %-9s %-4s weights %.0f MB: decode pattern %.1f GB/s, 256-byte visits "
                       "%.1f GB/s, step-major slabs %.1f GB/s, linear %.1f GB/s\n",
                       m.name, which == 0 ? "W13" : "W2", bytes / 1e6, gb / (slab_ms * 1e-3),
                       gb / (v256_ms * 1e-3), gb / (sm_ms * 1e-3), gb / (lin_ms * 1e-3));
                RECORD("\"kind\": \"probe\", \"model\": \"%s\", \"gemm\": \"%s\", \"bytes\": %.0f, "
                       "\"slab_gbs\": %.2f, \"visit256_gbs\": %.2f, \"stepmajor_gbs\": %.2f, "
                       "\"linear_gbs\": %.2f", m.name, which == 0 ? "W13" : "W2", bytes,
                       gb / (slab_ms * 1e-3), gb / (v256_ms * 1e-3), gb / (sm_ms * 1e-3),
                       gb / (lin_ms * 1e-3));
            }
        }
        CHECK_CUDA(cudaFree(sink));
    }

    /* "ours" runs on the weights in the slab layout, as the layer uploads them; each kernel is
     * also timed on the row-major tensors */
    uint8_t *w_codes_slab, *w_sf_slab;
    CHECK_CUDA(cudaMalloc(&w_codes_slab, max_nk_e / 2));
    CHECK_CUDA(cudaMalloc(&w_sf_slab, max_nk_e / 16));
    printf("%-9s %-4s %5s | %9s %8s %7s | %9s %7s\n", "model", "gemm", "rows", "ours us",
           "GB/s", "TFLOP/s", "cublas us", "TFLOP/s");
    for (const Model &m : models) {
        for (int which = 0; which < 2; which++) {
            const char *gname = which == 0 ? "W13" : "W2";
            const int64_t N = which == 0 ? 2 * m.I : m.H, K = which == 0 ? m.H : m.I;
            CHECK_EPMOE(epmoe_cuda_weights_to_slabs(w_codes, w_sf, m.E * N, K, w_codes_slab, w_sf_slab, g_stream));
            if (a_fp8) {
                unsigned long long inexact = 0;
                CHECK_CUDA(cudaMemsetAsync(d_inexact, 0, 8, g_stream));
                CHECK_EPMOE(epmoe_cuda_weights_to_fp8_slabs(w_codes, w_sf, m.E * N, K, w_fp8,
                                                            w_fp8_exp, d_inexact, g_stream));
                CHECK_CUDA(cudaMemcpyAsync(&inexact, d_inexact, 8, cudaMemcpyDeviceToHost, g_stream));
                CHECK_CUDA(cudaStreamSynchronize(g_stream));
                if (inexact) {
                    fprintf(stderr, "FAIL: %llu weight groups not exactly E4M3\n", inexact);
                    return 3;
                }
            }
            CHECK_CUDA(cudaStreamSynchronize(g_stream));
            for (int64_t rows : rows_list) {
                std::vector<int64_t> counts(m.E, rows), offs(m.E + 1);
                epmoe_padded_offsets_from_counts(counts.data(), m.E, EPMOE_GEMM_PAD_ROWS, offs.data());
                int64_t cap = epmoe_padded_capacity(rows * m.E, m.E, EPMOE_GEMM_PAD_ROWS);
                cap = (cap + EPMOE_GEMM_PAD_ROWS - 1) / EPMOE_GEMM_PAD_ROWS * EPMOE_GEMM_PAD_ROWS;
                CHECK_CUDA(cudaMemcpy(d_offs, offs.data(), (m.E + 1) * 8, cudaMemcpyHostToDevice));
                CHECK_CUDA(cudaMemcpy(d_counts, counts.data(), m.E * 8, cudaMemcpyHostToDevice));
                epmoe_grouped_gemm_args a;
                memset(&a, 0, sizeof a);
                a.n_experts = m.E;
                a.N = N;
                a.K = K;
                a.cap_rows = cap;
                a.a_format = a_fp8 ? EPMOE_GEMM_A_FP8 : EPMOE_GEMM_A_NVFP4;
                a.a_codes = a_codes;
                a.a_sf = a_sf;
                a.a_scale = a_scale;
                a.w_fp8 = w_fp8;
                a.w_fp8_exp = w_fp8_exp;
                a.a_workspace = a_ws;
                a.w_slabs = 1;
                a.w_codes = w_codes_slab;
                a.w_sf = w_sf_slab;
                a.w_scale = w_scale;
                a.w_scale_groups = which == 0 ? 2 : 1;
                a.w_scale_split = which == 0 ? m.I : N;
                a.padded_offsets = d_offs;
                a.tokens_per_expert = d_counts;
                a.out = out;
                const double ms = median_ms([&] { CHECK_EPMOE(epmoe_cuda_grouped_gemm(&a, g_stream)); }, reps);
                const double eager_ms = eager_median_ms([&] { CHECK_EPMOE(epmoe_cuda_grouped_gemm(&a, g_stream)); }, reps);
                const int64_t out_words = cap * N;
                CHECK_CUDA(cudaMemcpyAsync(out_auto, out, out_words * 4, cudaMemcpyDeviceToDevice, g_stream));
                long long worst_diff = 0;
                /* every sm_90 kernel at this shape, side by side (AUTO's choice is one of them) */
                char kernel_ms[1024];
                int kpos = 0;
                const int nk = (int)kernel_list.size();
                /* run: kernel x (slab, serial slab, row-major); the serial launch (the kernel
                 * starts only once its pre-pass has ended) is what the overlap is measured
                 * against */
                for (int run = 0; run < 3 * nk; run++) {
                    const int k = kernel_list[run % nk];
                    const bool serial = run / nk == 1, row_major = run / nk == 2;
                    if ((serial && !serial_too) || (row_major && !row_major_too)) continue;
                    epmoe_grouped_gemm_args f = a;
                    f.sm90_kernel = (epmoe_gemm_sm90_kernel)k;
                    f.serial_launch = serial;
                    if (row_major) {
                        f.w_slabs = 0;
                        f.w_codes = w_codes;
                        f.w_sf = w_sf;
                    }
                    char kname[96];
                    snprintf(kname, sizeof kname, "%s%s", epmoe_grouped_gemm_sm90_kernel_name(f.sm90_kernel),
                             row_major ? " row-major" : serial ? " serial launch" : "");
                    if (epmoe_cuda_grouped_gemm_sm90(&f, g_stream) != EPMOE_OK) {
                        (void)cudaGetLastError();
                        continue; /* not available here (wgmma off Hopper) */
                    }
                    const double kms = median_ms([&] { CHECK_EPMOE(epmoe_cuda_grouped_gemm_sm90(&f, g_stream)); }, reps);
                    unsigned long long diff = 0;
                    const bool fp8_kernel = k >= EPMOE_GEMM_SM90_FP8_MT64;
                    const bool auto_fp8 = epmoe_grouped_gemm_sm90_select(&a) >= EPMOE_GEMM_SM90_FP8_MT64;
                    if (fp8_kernel != auto_fp8) { /* another summation order: not compared */
                        kpos += snprintf(kernel_ms + kpos, sizeof kernel_ms - kpos, "%s\"%s\": %.5f",
                                         kpos ? ", " : "", kname, kms);
                        printf("    %-34s %9.1f us  (other family than auto)\n", kname, kms * 1e3);
                        continue;
                    }
                    CHECK_CUDA(cudaMemsetAsync(d_diff, 0, sizeof diff, g_stream));
                    count_diff_kernel<<<1024, 256, 0, g_stream>>>((const uint32_t *)out, (const uint32_t *)out_auto, out_words, d_diff);
                    CHECK_CUDA(cudaMemcpyAsync(&diff, d_diff, sizeof diff, cudaMemcpyDeviceToHost, g_stream));
                    CHECK_CUDA(cudaStreamSynchronize(g_stream));
                    worst_diff = std::max(worst_diff, (long long)diff);
                    if (diff) any_kernel_differs = 1;
                    kpos += snprintf(kernel_ms + kpos, sizeof kernel_ms - kpos, "%s\"%s\": %.5f",
                                     kpos ? ", " : "", kname, kms);
                    printf("    %-34s %9.1f us  %s\n", kname, kms * 1e3,
                           diff ? "OUTPUT DIFFERS FROM AUTO" : "same bits as auto");
                    if (diff) printf("    (%llu of %lld words differ)\n", diff, (long long)out_words);
                }
                const double flops = 2.0 * rows * m.E * N * K;
                const double wbytes = (double)m.E * N * K * (0.5 + 1.0 / 16);
                const double gbs = wbytes / (ms * 1e-3) / 1e9;
                const double tf = flops / (ms * 1e-3) / 1e12;
                /* cuBLAS bf16, same FLOPs: out[M, N] = A[M, K] . W[N, K]^T, M = E * rows */
                const int64_t M = rows * m.E;
                const float alpha = 1.0f, beta = 0.0f;
                const double cms = median_ms([&] {
                    CHECK_CUBLAS(cublasGemmEx(blas, CUBLAS_OP_T, CUBLAS_OP_N, (int)N, (int)M, (int)K, &alpha,
                                     cb_w, CUDA_R_16BF, (int)K, cb_a, CUDA_R_16BF, (int)K, &beta,
                                     cb_out, CUDA_R_16BF, (int)N, CUBLAS_COMPUTE_32F,
                                     CUBLAS_GEMM_DEFAULT));
                }, reps);
                const double ctf = flops / (cms * 1e-3) / 1e12;
                printf("%-9s %-4s %5lld | %9.1f %8.1f %7.1f | %9.1f %7.1f\n", m.name, gname,
                       (long long)rows, ms * 1e3, gbs, tf, cms * 1e3, ctf);
                fflush(stdout);
                RECORD("\"kind\": \"gemm\", \"a\": \"%s\", \"model\": \"%s\", \"gemm\": \"%s\", \"experts\": %lld, "
                       "\"rows_per_expert\": %lld, \"N\": %lld, \"K\": %lld, \"cap_rows\": %lld, "
                       "\"ours_ms\": %.5f, \"ours_eager_ms\": %.5f, \"ours_weight_gbs\": %.2f, \"ours_tflops\": %.2f, "
                       "\"weight_bytes_nvfp4\": %.0f, \"cublas_bf16_ms\": %.5f, "
                       "\"cublas_bf16_tflops\": %.2f, \"variant\": \"%s\", \"kernel_ms\": {%s}, "
                       "\"max_words_differing_from_auto\": %lld",
                       a_fp8 ? "fp8" : "nvfp4", m.name, gname, (long long)m.E, (long long)rows, (long long)N, (long long)K,
                       (long long)cap, ms, eager_ms, gbs, tf, wbytes, cms, ctf,
                       epmoe_grouped_gemm_sm90_variant(&a), kernel_ms, worst_diff);
            }
        }
    }
    fprintf(js, "\n]}\n");
    fclose(js);
    CHECK_CUBLAS(cublasDestroy(blas));
    if (any_kernel_differs) {
        fprintf(stderr, "FAIL: a forced kernel's output differs from AUTO's (lines above)\n");
        return 3;
    }
    return 0;
}
