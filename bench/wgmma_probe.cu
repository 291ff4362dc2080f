/* What the tensor cores give the grouped GEMM's MMA pattern with nothing else in the way: no
 * global memory, no dequantization, no pipeline. One block per SM, two consumer warpgroups
 * of two m64 tiles each against one 128-token bf16 tile in shared memory (the WS kernel's
 * shape, gemm_sm90_ws.cu), m64n128k16 bf16 MMAs with fp32 accumulators, in four modes:
 *   ss         A and B from shared memory, one fence and commit per 128-k step (how a plain
 *              bf16 GEMM such as cuBLAS's issues them)
 *   rs         A from registers (fixed), one fence and commit per 128-k step
 *   rs-slice   A from registers, a fence, a commit and wait_group<3> per k16 slice: the WS
 *              kernel's issue pattern, without its dequantization
 *   rs-dequant the same with the A registers rebuilt every slice by the real dequantization
 *              (weight_fragment_slice on register-resident codes): the WS kernel's consumer
 *              with its data already in registers
 *   rs-dequant-1wg  the same with one warpgroup per SM instead of two: what a warpgroup
 *              alone issues (a ping-pong schedule runs one at a time: docs/perf-history.md §4)
 *   rs-dequant-smem the same (two warpgroups) with each step's codes and scale bytes read
 *              from shared memory and the scales converted, as the WS consumer does
 * Prints TFLOP/s per mode and the ratio to ss. Shared memory holds random bf16 in [1, 2)
 * (never zeros: the tensor cores run faster on zeros).
 *   wgmma_probe [--iters N] */
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "bench/bench_check.h"
#include "kernels/cuda/gemm_sm90_common.cuh"
#include "kernels/cuda/sm90a_async.cuh"

using namespace epmoe_sm90;

namespace {

enum Mode { kSS = 0, kRS = 1, kRSSlice = 2, kRSDequant = 3, kRSDequant1WG = 4, kRSDequantSmem = 5 };
constexpr int kModes = 6;
const char *const kModeName[] = {"ss", "rs", "rs-slice", "rs-dequant", "rs-dequant-1wg",
                                 "rs-dequant-smem"};
constexpr int warpgroups_of(int mode) { return mode == kRSDequant1WG ? 1 : 2; }
constexpr int kTileBytes = 128 * 256; /* 128 rows x 128 k of bf16, 8-row groups of 2 KB */


/* smem: the token tile (B), then each warpgroup's two m64 x 128-k weight tiles (A, ss only). */
template <int kMode>
__global__ void __launch_bounds__(256, 1) probe_kernel(int steps, const uint32_t *seed, float *sink) {
#if EPMOE_WGMMA_DEVICE
    extern __shared__ __align__(1024) uint8_t smem_raw[];
    uint8_t *smem = smem_raw + ((1024u - (smem_u32(smem_raw) & 1023u)) & 1023u);
    const int wg = threadIdx.x / 128, lane = threadIdx.x % 32;
    /* random bf16 in [1, 2): exponent 127, random mantissa */
    for (int i = threadIdx.x; i < (kTileBytes + 2 * kTileBytes) / 2; i += blockDim.x)
        ((uint16_t *)smem)[i] = (uint16_t)(0x3F80u | ((seed[0] * 2654435761u + i * 40503u) >> 9 & 0x7Fu));
    __syncthreads();
    fence_proxy_async();
    const uint32_t b_base = smem_u32(smem), a_base = b_base + kTileBytes + wg * kTileBytes;
    const uint64_t desc_b0 = desc_k_major_sw128(b_base, 2048);
    uint64_t desc_a0[2];
    for (int i = 0; i < 2; ++i) desc_a0[i] = desc_k_major_sw128(a_base + i * (kTileBytes / 2), 2048);
    uint32_t A[4][2][4];
    uint32_t codes[4];
    for (int r = 0; r < 4; ++r) codes[r] = seed[1 + r] ^ (threadIdx.x * 0x9E3779B9u);
    const uint32_t S = sf_to_bf16x2(0x38u); /* ue4m3 1.0 */
    for (int s = 0; s < 4; ++s)
        for (int i = 0; i < 2; ++i)
            for (int f = 0; f < 4; ++f) A[s][i][f] = 0x3F803F80u ^ (lane << (f + i));
    float acc[2][64];
    for (int i = 0; i < 2; ++i)
        for (int v = 0; v < 64; ++v) acc[i][v] = 0.0f;

    constexpr bool kDequant = kMode == kRSDequant || kMode == kRSDequant1WG || kMode == kRSDequantSmem;
    for (int step = 0; step < steps; ++step) {
        if (kMode == kSS || kMode == kRS) wgmma_fence();
        /* rs-dequant-smem: this step's 16-byte code unit and scale pair per row from shared
         * memory (the ss weight tiles' bytes, at a step-dependent place), as the WS consumer */
        uint4 wq[4];
        uint32_t Ss[4][2];
        if (kMode == kRSDequantSmem) {
            const uint8_t *wbase = smem + kTileBytes + ((step * 512 + threadIdx.x * 16) & 32767);
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                wq[r] = *(const uint4 *)(wbase + r * 4096);
                sf_pair_to_bf16x2(*(const uint16_t *)(wbase + 32768 + r * 2) & 0x3F3Fu, Ss[r]);
            }
        }
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const uint64_t off = ((j / 4) * 1024 + (j % 4) * 32) >> 4;
            if (kMode == kRSSlice || kDequant) {
                wgmma_wait<3>();
                if (kMode == kRSDequantSmem) {
                    const int q = j / 2;
#pragma unroll
                    for (int i = 0; i < 2; ++i)
                        weight_fragment_slice<true>(word_of(wq[2 * i], q), Ss[2 * i][q / 2],
                                                    word_of(wq[2 * i + 1], q), Ss[2 * i + 1][q / 2],
                                                    j % 2, A[j % 4][i]);
                } else if (kDequant) {
#pragma unroll
                    for (int i = 0; i < 2; ++i)
                        weight_fragment_slice<true>(codes[2 * i] + step, S, codes[2 * i + 1] ^ step,
                                                    S, j % 2, A[j % 4][i]);
                }
                wgmma_fence();
            }
#pragma unroll
            for (int i = 0; i < 2; ++i) {
                fence_operands(acc[i]);
#if EPMOE_WGMMA_DEVICE
                if (kMode == kSS) wgmma_ss_m64n128k16(acc[i], desc_a0[i] + off, desc_b0 + off, 1);
                else wgmma_m64n128k16(acc[i], A[j % 4][i], desc_b0 + off, 1);
#endif
                fence_operands(acc[i]);
            }
            if (kMode == kRSSlice || kDequant) wgmma_commit();
        }
        if (kMode == kSS || kMode == kRS) {
            wgmma_commit();
            wgmma_wait<1>();
        }
    }
    wgmma_wait<0>();
    for (int i = 0; i < 2; ++i) fence_operands(acc[i]);
    float sum = 0.0f;
    for (int i = 0; i < 2; ++i)
        for (int v = 0; v < 64; ++v) sum += acc[i][v];
    if (sum == 1.2345f) sink[0] = sum; /* keeps the MMAs alive */
#else
    (void)steps, (void)seed, (void)sink;
#endif
}

template <int kMode>
double run(int steps, const uint32_t *seed, float *sink, int sms) {
    const int smem = 3 * kTileBytes + 1024;
    CHECK_CUDA(cudaFuncSetAttribute(probe_kernel<kMode>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    cudaEvent_t a, b;
    CHECK_CUDA(cudaEventCreate(&a));
    CHECK_CUDA(cudaEventCreate(&b));
    const int threads = 128 * warpgroups_of(kMode);
    probe_kernel<kMode><<<sms, threads, smem>>>(steps / 10, seed, sink); /* warm-up */
    CHECK_CUDA(cudaGetLastError());
    float best = 1e30f;
    for (int rep = 0; rep < 5; ++rep) {
        CHECK_CUDA(cudaEventRecord(a));
        probe_kernel<kMode><<<sms, threads, smem>>>(steps, seed, sink);
        CHECK_CUDA(cudaEventRecord(b));
        CHECK_CUDA(cudaEventSynchronize(b));
        float ms = 0;
        CHECK_CUDA(cudaEventElapsedTime(&ms, a, b));
        if (ms < best) best = ms;
    }
    CHECK_CUDA(cudaEventDestroy(a));
    CHECK_CUDA(cudaEventDestroy(b));
    /* per step: each warpgroup's 2 tiles x 8 slices of 64 x 128 x 16 */
    const double flops = 2.0 * 64 * 128 * 16 * 16 * warpgroups_of(kMode) * (double)steps * sms;
    return flops / (best * 1e-3) / 1e12;
}

} // namespace

int main(int argc, char **argv) {
    int steps = 20000;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--iters") && i + 1 < argc) steps = atoi(argv[++i]);
        else {
            fprintf(stderr, "usage: %s [--iters steps]\n", argv[0]);
            return 2;
        }
    }
    cudaDeviceProp prop;
    CHECK_CUDA(cudaGetDeviceProperties(&prop, 0));
    uint32_t *seed;
    float *sink;
    CHECK_CUDA(cudaMalloc(&seed, 64));
    CHECK_CUDA(cudaMalloc(&sink, 4));
    const uint32_t h_seed[8] = {12345u, 0x9E3779B9u, 0x7F4A7C15u, 0x85EBCA6Bu, 0xC2B2AE35u, 1u, 2u, 3u};
    CHECK_CUDA(cudaMemcpy(seed, h_seed, sizeof h_seed, cudaMemcpyHostToDevice));
    const int sms = prop.multiProcessorCount;
    const double tf[kModes] = {run<kSS>(steps, seed, sink, sms),
                               run<kRS>(steps, seed, sink, sms),
                               run<kRSSlice>(steps, seed, sink, sms),
                               run<kRSDequant>(steps, seed, sink, sms),
                               run<kRSDequant1WG>(steps, seed, sink, sms),
                               run<kRSDequantSmem>(steps, seed, sink, sms)};
    printf("wgmma probe on %s (%d SMs), %d steps of 128 k per block, best of 5:\n", prop.name,
           prop.multiProcessorCount, steps);
    for (int m = 0; m < kModes; ++m)
        printf("  %-15s %7.1f TFLOP/s  %.2fx ss\n", kModeName[m], tf[m], tf[m] / tf[0]);
    return 0;
}
