/* The CPU panel forms of kernels/ops.h. The ordered fp32 products (epmoe_cpu_gemm_panels):
 * every output is one fmaf chain over k in increasing order from +0, so the kernel must give
 * exactly the bits of the two references written here: the plain definition on row-major B, and
 * the straightforward panel loop the kernel replaced (kept as it was). Shapes cover every
 * remainder of the kernel's row blocks and column panels, K = 1 and M = 1, and the V4-Flash
 * expert's K. The NVFP4 weights dequantized into panels (epmoe_cpu_dequant_panels): the bits of
 * the row dequantization packed into panels, for every code and every scale code. */
#include <check.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common/rng.h"
#include "kernels/ops.h"
#include "common/nvfp4.h"
#include "tests/support/test_support.h"
#include "worker/experts.h"

/* ---- references ---------------------------------------------------------------------------- */

/* The definition: C[m,n] = fmaf chain over k of A[m,k] * B[n,k], B row-major [N, K]. */
static void plain_gemm(const float *A, int64_t M, int64_t K, const float *B, int64_t N,
                       float *C) {
    for (int64_t m = 0; m < M; m++)
        for (int64_t n = 0; n < N; n++) {
            float acc = 0.0f;
            for (int64_t k = 0; k < K; k++) acc = fmaf(A[m * K + k], B[n * K + k], acc);
            C[m * N + n] = acc;
        }
}

/* The panel loop before its accumulators were split per row, unchanged but for the name and
 * the target_clones attribute. */
#define OLD_ROWS_PER_BLOCK 4
static void old_gemm_panels(const float *A, int64_t M, int64_t K, const float *panels, int64_t N,
                            float *C) {
    for (int64_t n0 = 0; n0 < N; n0 += EPMOE_PANEL_COLS) {
        const float *panel = panels + (size_t)(n0 / EPMOE_PANEL_COLS) * (size_t)K * EPMOE_PANEL_COLS;
        int64_t ncols = N - n0 < EPMOE_PANEL_COLS ? N - n0 : EPMOE_PANEL_COLS;
        int64_t r = 0;
        for (; r + OLD_ROWS_PER_BLOCK <= M; r += OLD_ROWS_PER_BLOCK) {
            float acc[OLD_ROWS_PER_BLOCK][EPMOE_PANEL_COLS];
            memset(acc, 0, sizeof acc);
            for (int64_t k = 0; k < K; k++) {
                const float *b = panel + k * EPMOE_PANEL_COLS;
                for (int i = 0; i < OLD_ROWS_PER_BLOCK; i++) {
                    float a = A[(r + i) * K + k];
                    for (int j = 0; j < EPMOE_PANEL_COLS; j++) acc[i][j] = fmaf(a, b[j], acc[i][j]);
                }
            }
            for (int i = 0; i < OLD_ROWS_PER_BLOCK; i++)
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

/* ---- checks -------------------------------------------------------------------------------- */

#define GUARD 37 /* poisoned floats after C: the kernel must not write past row M-1 */

static void assert_same_bits(const float *got, const float *want, int64_t M, int64_t N,
                             int64_t K, const char *what) {
    for (int64_t i = 0; i < M * N; i++)
        ck_assert_msg(memcmp(&got[i], &want[i], sizeof(float)) == 0,
                      "M=%lld N=%lld K=%lld: C[%lld,%lld] = %a, %s gives %a", (long long)M,
                      (long long)N, (long long)K, (long long)(i / N), (long long)(i % N),
                      (double)got[i], what, (double)want[i]);
}

/* Runs the kernel on random A and B of one shape and compares it with both references, bit for
 * bit, and with a float64 sum to fp32 accuracy (the references themselves are checked there). */
static void check_shape(epmoe_rng *rng, int64_t M, int64_t N, int64_t K) {
    const size_t a_n = (size_t)(M * K), b_n = (size_t)(N * K), c_n = (size_t)(M * N);
    float *A = malloc(a_n * sizeof(float)), *B = malloc(b_n * sizeof(float));
    float *panels = malloc(epmoe_cpu_panels_floats(N, K) * sizeof(float));
    float *got = malloc((c_n + GUARD) * sizeof(float));
    float *plain = malloc(c_n * sizeof(float)), *old = malloc(c_n * sizeof(float));
    ck_assert(A && B && panels && got && plain && old);
    epmoe_fill_normal(rng, A, a_n, 1.0f);
    epmoe_fill_normal(rng, B, b_n, 0.05f);
    epmoe_cpu_pack_panels(B, N, K, panels);

    epmoe_poison_f32(plain, c_n);
    plain_gemm(A, M, K, B, N, plain);
    epmoe_poison_f32(old, c_n);
    old_gemm_panels(A, M, K, panels, N, old);
    assert_same_bits(old, plain, M, N, K, "the old panel loop vs the definition");

    epmoe_poison_f32(got, c_n + GUARD);
    epmoe_cpu_gemm_panels(A, M, K, panels, N, got);
    assert_same_bits(got, plain, M, N, K, "the definition");
    assert_same_bits(got, old, M, N, K, "the old panel loop");
    ck_assert_msg(epmoe_count_unwritten_f32(got + c_n, GUARD) == GUARD,
                  "M=%lld N=%lld K=%lld: wrote past C", (long long)M, (long long)N, (long long)K);

    for (int64_t m = 0; m < M; m++)
        for (int64_t n = 0; n < N; n++) {
            double exact = 0, magnitude = 0;
            for (int64_t k = 0; k < K; k++) {
                exact += (double)A[m * K + k] * B[n * K + k];
                magnitude += fabs((double)A[m * K + k] * B[n * K + k]);
            }
            ck_assert_msg(fabs(plain[m * N + n] - exact) <= 1e-6 * (double)K * magnitude,
                          "M=%lld N=%lld K=%lld: C[%lld,%lld] = %.9g, float64 %.9g", (long long)M,
                          (long long)N, (long long)K, (long long)m, (long long)n,
                          (double)plain[m * N + n], exact);
        }
    free(A), free(B), free(panels), free(got), free(plain), free(old);
}

/* Every row count up to two row blocks and a half, column counts around the panel width, and
 * K from 1 through values that are not multiples of anything. */
START_TEST(test_gemm_panels_small_shapes) {
    const int64_t Ms[] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10};
    const int64_t Ns[] = {1, 3, 15, 16, 17, 33, 48};
    const int64_t Ks[] = {1, 2, 7, 16, 17, 130};
    epmoe_rng rng;
    epmoe_rng_seed(&rng, 21);
    for (size_t m = 0; m < sizeof Ms / sizeof Ms[0]; m++)
        for (size_t n = 0; n < sizeof Ns / sizeof Ns[0]; n++)
            for (size_t k = 0; k < sizeof Ks / sizeof Ks[0]; k++)
                check_shape(&rng, Ms[m], Ns[n], Ks[k]);
}
END_TEST

/* The expert's K (H = 4096 for W13, I = 2048 for W2) and a worker chunk of rows plus a tail. */
START_TEST(test_gemm_panels_model_shapes) {
    epmoe_rng rng;
    epmoe_rng_seed(&rng, 22);
    check_shape(&rng, 7, 50, 4096);
    check_shape(&rng, 1, 35, 2048);
    check_shape(&rng, 67, 21, 257);
}
END_TEST

/* A row's outputs are a function of the row alone: every window of rows computed as a call of
 * its own (so each row lands in a row block, a 2-3 row tail or the single-row path) gives the
 * bits of the whole call. */
START_TEST(test_gemm_panels_batch_invariant) {
    const int64_t M = 11, N = 40, K = 300;
    epmoe_rng rng;
    epmoe_rng_seed(&rng, 23);
    float *A = malloc((size_t)(M * K) * sizeof(float)), *B = malloc((size_t)(N * K) * sizeof(float));
    float *panels = malloc(epmoe_cpu_panels_floats(N, K) * sizeof(float));
    float *all = malloc((size_t)(M * N) * sizeof(float)), *some = malloc((size_t)(M * N) * sizeof(float));
    ck_assert(A && B && panels && all && some);
    epmoe_fill_normal(&rng, A, (size_t)(M * K), 1.0f);
    epmoe_fill_normal(&rng, B, (size_t)(N * K), 0.05f);
    epmoe_cpu_pack_panels(B, N, K, panels);
    epmoe_cpu_gemm_panels(A, M, K, panels, N, all);
    for (int64_t n = 1; n <= M; n++)
        for (int64_t r0 = 0; r0 + n <= M; r0++) {
            epmoe_poison_f32(some, (size_t)(n * N));
            epmoe_cpu_gemm_panels(A + r0 * K, n, K, panels, N, some);
            ck_assert_msg(memcmp(some, all + r0 * N, (size_t)(n * N) * sizeof(float)) == 0,
                          "rows [%lld, %lld) as a call of %lld rows differ from the call of %lld",
                          (long long)r0, (long long)(r0 + n), (long long)n, (long long)M);
        }
    free(A), free(B), free(panels), free(all), free(some);
}
END_TEST

/* Every byte of codes and every scale code (NaN 0x7f/0xff, subnormals, the sign bit) in a
 * matrix whose N leaves a partial panel: the same bits as the row dequantization packed, the
 * padding columns zero. */
START_TEST(test_dequant_panels_same_bits_as_rows) {
    const int64_t N = 37, K = 112;
    uint8_t *codes = malloc((size_t)(N * K / 2)), *sf = malloc((size_t)(N * K / 16));
    float *rows = malloc((size_t)(N * K) * sizeof(float));
    const size_t p_n = epmoe_cpu_panels_floats(N, K);
    float *want = malloc(p_n * sizeof(float)), *got = malloc(p_n * sizeof(float));
    ck_assert(codes && sf && rows && want && got);
    ck_assert_int_ge(N * K / 16, 256);
    for (int64_t i = 0; i < N * K / 2; i++) codes[i] = (uint8_t)(i * 7);
    for (int64_t i = 0; i < N * K / 16; i++) sf[i] = (uint8_t)(i * 13);
    for (int64_t n = 0; n < N; n++)
        epmoe_nvfp4_dequantize_row(codes + n * (K / 2), sf + n * (K / 16), (size_t)K, 1.0f,
                                   rows + n * K);
    epmoe_cpu_pack_panels(rows, N, K, want);
    epmoe_poison_f32(got, p_n);
    epmoe_cpu_dequant_panels(codes, sf, N, K, got);
    for (size_t i = 0; i < p_n; i++)
        ck_assert_msg(memcmp(&got[i], &want[i], sizeof(float)) == 0,
                      "panel float %zu = %a, the packed rows give %a", i, (double)got[i],
                      (double)want[i]);
    free(codes), free(sf), free(rows), free(want), free(got);
}
END_TEST

static Suite *gemm_suite(void) {
    Suite *s = suite_create("gemm");
    TCase *tc = tcase_create("core");
    tcase_add_test(tc, test_gemm_panels_small_shapes);
    tcase_add_test(tc, test_gemm_panels_model_shapes);
    tcase_add_test(tc, test_gemm_panels_batch_invariant);
    tcase_add_test(tc, test_dequant_panels_same_bits_as_rows);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) {
    SRunner *sr = srunner_create(gemm_suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
