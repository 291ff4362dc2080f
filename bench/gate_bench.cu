/* The gate logits alone: every tiling of kernels/cuda/route.cu (and the one chosen by shape)
 * at V4-Flash and V4-Pro router shapes over decode and prefill batch sizes, timed with CUDA
 * events (median of --reps launches after a warm-up). Prints one row per (preset, T): the
 * choice's microseconds, then each tiling's, so that the choice can be checked against the
 * fastest on the GPU at hand.
 *   build/bench/gate_bench [--tokens 1,8,43,128,512,1024,2048,4096,8192,16384] [--reps 20] */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <vector>

#include <cuda_runtime.h>

#include "kernels/cuda/ops_cuda.h"

#define CK(call)                                                                                \
    do {                                                                                        \
        cudaError_t e_ = (call);                                                                \
        if (e_ != cudaSuccess) {                                                                \
            fprintf(stderr, "%s:%d: %s\n", __FILE__, __LINE__, cudaGetErrorString(e_));          \
            exit(1);                                                                            \
        }                                                                                       \
    } while (0)

/* uniform in [-scale, scale): the timing does not depend on the values */
static void fill(std::vector<float> &v, uint32_t seed, float scale) {
    for (auto &f : v) {
        seed = seed * 1664525u + 1013904223u;
        f = ((float)(seed >> 8) / 16777216.0f * 2.0f - 1.0f) * scale;
    }
}

static double time_us(int kernel, const float *x, const float *w, int64_t T, int64_t H,
                      int64_t E, float *logits, int reps) {
    cudaEvent_t a, b;
    CK(cudaEventCreate(&a));
    CK(cudaEventCreate(&b));
    std::vector<float> ms(reps);
    for (int r = -2; r < reps; r++) {
        CK(cudaEventRecord(a, 0));
        if (epmoe_cuda_gate_logits_kernel(kernel, x, w, T, H, E, logits, 0) != EPMOE_OK) {
            fprintf(stderr, "gate logits kernel %d: %s\n", kernel, epmoe_last_error());
            exit(1);
        }
        CK(cudaEventRecord(b, 0));
        CK(cudaEventSynchronize(b));
        if (r >= 0) CK(cudaEventElapsedTime(&ms[r], a, b));
    }
    CK(cudaEventDestroy(a));
    CK(cudaEventDestroy(b));
    std::sort(ms.begin(), ms.end());
    return ms[reps / 2] * 1e3;
}

int main(int argc, char **argv) {
    std::vector<int64_t> tokens = {1, 8, 43, 128, 512, 1024, 2048, 4096, 8192, 16384};
    int reps = 20;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--reps")) {
            reps = atoi(argv[i + 1]);
        } else if (!strcmp(argv[i], "--tokens")) {
            tokens.clear();
            for (char *p = argv[i + 1]; *p;) {
                tokens.push_back(strtoll(p, &p, 10));
                if (*p == ',') p++;
            }
        } else {
            fprintf(stderr, "unknown argument %s\n", argv[i]);
            return 2;
        }
    }
    if (reps < 1) reps = 1;
    const struct {
        const char *name;
        int64_t H, E;
    } presets[] = {{"V4-Flash", 4096, 256}, {"V4-Pro", 7168, 384}, {"gpt-oss-120b", 2880, 128}};
    const int64_t T_max = *std::max_element(tokens.begin(), tokens.end());
    printf("%-13s %6s %9s", "preset", "T", "chosen_us");
    for (int k = 0; k < EPMOE_CUDA_GATE_KERNELS; k++) printf("   k%d_us", k);
    printf("\n");
    for (const auto &p : presets) {
        std::vector<float> hx(T_max * p.H), hw(p.E * p.H);
        fill(hx, 1, 1.0f);
        fill(hw, 2, 0.02f);
        float *x, *w, *logits;
        CK(cudaMalloc(&x, hx.size() * 4));
        CK(cudaMalloc(&w, hw.size() * 4));
        CK(cudaMalloc(&logits, T_max * p.E * 4));
        CK(cudaMemcpy(x, hx.data(), hx.size() * 4, cudaMemcpyHostToDevice));
        CK(cudaMemcpy(w, hw.data(), hw.size() * 4, cudaMemcpyHostToDevice));
        for (int64_t T : tokens) {
            printf("%-13s %6lld %9.1f", p.name, (long long)T,
                   time_us(-1, x, w, T, p.H, p.E, logits, reps));
            for (int k = 0; k < EPMOE_CUDA_GATE_KERNELS; k++)
                printf(" %8.1f", time_us(k, x, w, T, p.H, p.E, logits, reps));
            printf("\n");
            fflush(stdout);
        }
        CK(cudaFree(x));
        CK(cudaFree(w));
        CK(cudaFree(logits));
    }
    return 0;
}
