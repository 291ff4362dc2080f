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

/* The gate logits in the blocked order of kernels/ops.h: per chunk, 4 rows x 16 fmaf chains
 * from +0, vectorized across the panel's columns, then each added to its running sum. The four
 * rows' accumulators are four named arrays, not acc[4][16]: GCC then vectorizes across the 16
 * columns with one broadcast per row, where the 2-D form was vectorized across rows with
 * shuffles and ran 15x slower. */
__attribute__((target_clones("arch=x86-64-v3", "default"))) void
epmoe_cpu_gate_logits_panels(const float *x, int64_t T, int64_t H, const float *panels,
                             int64_t E, float *logits) {
    enum { C = EPMOE_PANEL_COLS };
    for (int64_t n0 = 0; n0 < E; n0 += C) {
        const float *panel = panels + (size_t)(n0 / C) * (size_t)H * C;
        int64_t ncols = E - n0 < C ? E - n0 : C;
        int64_t r = 0;
        for (; r + 4 <= T; r += 4) {
            const float *x0 = x + r * H, *x1 = x0 + H, *x2 = x1 + H, *x3 = x2 + H;
            float s0[C] = {0}, s1[C] = {0}, s2[C] = {0}, s3[C] = {0};
            for (int64_t h0 = 0; h0 < H; h0 += EPMOE_GATE_CHUNK) {
                int64_t h1 = H - h0 < EPMOE_GATE_CHUNK ? H : h0 + EPMOE_GATE_CHUNK;
                float a0[C] = {0}, a1[C] = {0}, a2[C] = {0}, a3[C] = {0};
                for (int64_t h = h0; h < h1; h++) {
                    const float *b = panel + h * C;
                    float v0 = x0[h], v1 = x1[h], v2 = x2[h], v3 = x3[h];
                    for (int j = 0; j < C; j++) {
                        a0[j] = fmaf(v0, b[j], a0[j]);
                        a1[j] = fmaf(v1, b[j], a1[j]);
                        a2[j] = fmaf(v2, b[j], a2[j]);
                        a3[j] = fmaf(v3, b[j], a3[j]);
                    }
                }
                for (int j = 0; j < C; j++) {
                    s0[j] = s0[j] + a0[j];
                    s1[j] = s1[j] + a1[j];
                    s2[j] = s2[j] + a2[j];
                    s3[j] = s3[j] + a3[j];
                }
            }
            memcpy(logits + (r + 0) * E + n0, s0, (size_t)ncols * sizeof(float));
            memcpy(logits + (r + 1) * E + n0, s1, (size_t)ncols * sizeof(float));
            memcpy(logits + (r + 2) * E + n0, s2, (size_t)ncols * sizeof(float));
            memcpy(logits + (r + 3) * E + n0, s3, (size_t)ncols * sizeof(float));
        }
        for (; r < T; r++) {
            const float *x0 = x + r * H;
            float s0[C] = {0};
            for (int64_t h0 = 0; h0 < H; h0 += EPMOE_GATE_CHUNK) {
                int64_t h1 = H - h0 < EPMOE_GATE_CHUNK ? H : h0 + EPMOE_GATE_CHUNK;
                float a0[C] = {0};
                for (int64_t h = h0; h < h1; h++) {
                    const float *b = panel + h * C;
                    float v0 = x0[h];
                    for (int j = 0; j < C; j++) a0[j] = fmaf(v0, b[j], a0[j]);
                }
                for (int j = 0; j < C; j++) s0[j] = s0[j] + a0[j];
            }
            memcpy(logits + r * E + n0, s0, (size_t)ncols * sizeof(float));
        }
    }
}
