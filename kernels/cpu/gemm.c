/* Ordered fp32 products (see kernels/ops.h): one fmaf chain per output, vectorized across the
 * 16 columns of a panel. target_clones builds an AVX2/FMA version picked at load time where the
 * CPU has it; the generic version calls the correctly rounded fmaf and gives the same bits. */
#include <math.h>
#include <string.h>

#include "kernels/ops.h"

#define ROWS_PER_BLOCK 4

size_t epmoe_cpu_panels_floats(int64_t N, int64_t K) {
    int64_t panels = (N + EPMOE_PANEL_COLS - 1) / EPMOE_PANEL_COLS;
    return (size_t)panels * (size_t)K * EPMOE_PANEL_COLS;
}

void epmoe_cpu_pack_panels(const float *B, int64_t N, int64_t K, float *panels) {
    memset(panels, 0, epmoe_cpu_panels_floats(N, K) * sizeof(float));
    for (int64_t n = 0; n < N; n++)
        for (int64_t k = 0; k < K; k++) panels[epmoe_cpu_panel_index(n, k, K)] = B[n * K + k];
}

__attribute__((target_clones("arch=x86-64-v3", "default"))) void
epmoe_cpu_gemm_panels(const float *A, int64_t M, int64_t K, const float *panels, int64_t N,
                      float *C) {
    for (int64_t n0 = 0; n0 < N; n0 += EPMOE_PANEL_COLS) {
        const float *panel = panels + (size_t)(n0 / EPMOE_PANEL_COLS) * (size_t)K * EPMOE_PANEL_COLS;
        int64_t ncols = N - n0 < EPMOE_PANEL_COLS ? N - n0 : EPMOE_PANEL_COLS;
        int64_t r = 0;
        for (; r + ROWS_PER_BLOCK <= M; r += ROWS_PER_BLOCK) {
            float acc[ROWS_PER_BLOCK][EPMOE_PANEL_COLS];
            memset(acc, 0, sizeof acc);
            for (int64_t k = 0; k < K; k++) {
                const float *b = panel + k * EPMOE_PANEL_COLS;
                for (int i = 0; i < ROWS_PER_BLOCK; i++) {
                    float a = A[(r + i) * K + k];
                    for (int j = 0; j < EPMOE_PANEL_COLS; j++) acc[i][j] = fmaf(a, b[j], acc[i][j]);
                }
            }
            for (int i = 0; i < ROWS_PER_BLOCK; i++)
                memcpy(C + (r + i) * N + n0, acc[i], (size_t)ncols * sizeof(float));
        }
        for (; r < M; r++) {
            float acc[EPMOE_PANEL_COLS];
            memset(acc, 0, sizeof acc);
            for (int64_t k = 0; k < K; k++) {
                const float *b = panel + k * EPMOE_PANEL_COLS;
                float a = A[r * K + k];
                for (int j = 0; j < EPMOE_PANEL_COLS; j++) acc[j] = fmaf(a, b[j], acc[j]);
            }
            memcpy(C + r * N + n0, acc, (size_t)ncols * sizeof(float));
        }
    }
}
