/* Ordered fp32 products (see kernels/ops.h): one fmaf chain per output, vectorized across the
 * 16 columns of a panel. target_clones builds an AVX2/FMA version picked at load time where the
 * CPU has it; the generic version calls the correctly rounded fmaf and gives the same bits. */
#include <math.h>
#include <string.h>

#include "kernels/ops.h"

size_t epmoe_cpu_panels_floats(int64_t N, int64_t K) {
    int64_t panels = (N + EPMOE_PANEL_COLS - 1) / EPMOE_PANEL_COLS;
    return (size_t)panels * (size_t)K * EPMOE_PANEL_COLS;
}

void epmoe_cpu_pack_panels(const float *B, int64_t N, int64_t K, float *panels) {
    memset(panels, 0, epmoe_cpu_panels_floats(N, K) * sizeof(float));
    for (int64_t n = 0; n < N; n++)
        for (int64_t k = 0; k < K; k++) panels[epmoe_cpu_panel_index(n, k, K)] = B[n * K + k];
}

/* The kernels below are inlined into each clone of epmoe_cpu_gemm_panels, so they take its
 * target. Each row's 16 chains live in a named array of their own: GCC then vectorizes every
 * fmaf across the 16 columns with one broadcast per row. A 2-D acc[rows][16] was vectorized
 * across rows instead, with shuffles on every k. */
#define PANEL_KERNEL static inline __attribute__((always_inline))

/* Rows a0..a3 of A against one panel: 4 x 16 chains in increasing k from +0. */
PANEL_KERNEL void panel_rows4(const float *a0, const float *a1, const float *a2,
                              const float *a3, int64_t K, const float *panel, float *c0,
                              float *c1, float *c2, float *c3, int64_t ncols) {
    enum { C = EPMOE_PANEL_COLS };
    float s0[C] = {0}, s1[C] = {0}, s2[C] = {0}, s3[C] = {0};
    for (int64_t k = 0; k < K; k++) {
        const float *b = panel + k * C;
        float v0 = a0[k], v1 = a1[k], v2 = a2[k], v3 = a3[k];
        for (int j = 0; j < C; j++) {
            s0[j] = fmaf(v0, b[j], s0[j]);
            s1[j] = fmaf(v1, b[j], s1[j]);
            s2[j] = fmaf(v2, b[j], s2[j]);
            s3[j] = fmaf(v3, b[j], s3[j]);
        }
    }
    memcpy(c0, s0, (size_t)ncols * sizeof(float));
    memcpy(c1, s1, (size_t)ncols * sizeof(float));
    memcpy(c2, s2, (size_t)ncols * sizeof(float));
    memcpy(c3, s3, (size_t)ncols * sizeof(float));
}

/* One row of A against one panel. */
PANEL_KERNEL void panel_rows1(const float *a0, int64_t K, const float *panel, float *c0,
                              int64_t ncols) {
    enum { C = EPMOE_PANEL_COLS };
    float s0[C] = {0};
    for (int64_t k = 0; k < K; k++) {
        const float *b = panel + k * C;
        float v0 = a0[k];
        for (int j = 0; j < C; j++) s0[j] = fmaf(v0, b[j], s0[j]);
    }
    memcpy(c0, s0, (size_t)ncols * sizeof(float));
}

/* The last 2 or 3 rows: the 4-row kernel with the last row repeated, which costs about what 4
 * rows cost, where one row at a time runs 2 dependent chains and waits on their latency. A
 * repeated row computes its own chains again, so its outputs keep their bits; the copy's go to
 * a sink. */
PANEL_KERNEL void panel_rows_tail(const float *A, int64_t rows, int64_t K, const float *panel,
                                  float *C, int64_t N, int64_t ncols) {
    float sink[EPMOE_PANEL_COLS];
    const float *a[4];
    float *c[4];
    for (int64_t i = 0; i < 4; i++) {
        a[i] = A + (i < rows ? i : rows - 1) * K;
        c[i] = i < rows ? C + i * N : sink;
    }
    panel_rows4(a[0], a[1], a[2], a[3], K, panel, c[0], c[1], c[2], c[3], ncols);
}

__attribute__((target_clones("arch=x86-64-v3", "default"))) void
epmoe_cpu_gemm_panels(const float *A, int64_t M, int64_t K, const float *panels, int64_t N,
                      float *C) {
    for (int64_t n0 = 0; n0 < N; n0 += EPMOE_PANEL_COLS) {
        const float *panel = panels + (size_t)(n0 / EPMOE_PANEL_COLS) * (size_t)K * EPMOE_PANEL_COLS;
        int64_t ncols = N - n0 < EPMOE_PANEL_COLS ? N - n0 : EPMOE_PANEL_COLS;
        int64_t r = 0;
        for (; r + 4 <= M; r += 4) {
            const float *a = A + r * K;
            float *c = C + r * N + n0;
            panel_rows4(a, a + K, a + 2 * K, a + 3 * K, K, panel, c, c + N, c + 2 * N, c + 3 * N,
                        ncols);
        }
        if (M - r == 1)
            panel_rows1(A + r * K, K, panel, C + r * N + n0, ncols);
        else if (M - r > 1)
            panel_rows_tail(A + r * K, M - r, K, panel, C + r * N + n0, N, ncols);
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
