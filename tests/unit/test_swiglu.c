/* Clamped SwiGLU, the three named variants, against a float64 reference written here (gpt-oss's
 * from its reference's formula: x_glu.clamp(max=L) * sigmoid(alpha x_glu) * (x_linear.clamp(-L,
 * L) + 1)). Inputs are scaled (|g|, |u| up to 40 with L = 10 or 7) so that the clamp fires on a
 * large share of the elements (rule 25). */
#include <check.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common/config.h"
#include "common/rng.h"
#include "kernels/ops.h"
#include "tests/support/test_support.h"

#define GUARD 8 /* poisoned elements after the output that must stay untouched */

static double ref_silu(double g) { return g / (1.0 + exp(-g)); }

#define GPTOSS_ALPHA 1.702 /* gpt-oss's reference: swiglu(x, alpha=1.702, limit=7.0) */

static void ref_swiglu_alpha(const float *h, int64_t rows, int64_t I, double L, int variant,
                             double alpha, double *out) {
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t i = 0; i < I; i++) {
            double g = h[r * 2 * I + i], u = h[r * 2 * I + I + i];
            if (L > 0) u = fmin(fmax(u, -L), L);
            double act;
            if (variant == EPMOE_SWIGLU_GPTOSS) {
                if (L > 0) g = fmin(g, L);
                out[r * I + i] = g * (1.0 / (1.0 + exp(-alpha * g))) * (u + 1.0);
                continue;
            }
            if (variant == EPMOE_SWIGLU_STEP) {
                act = ref_silu(g);
                if (L > 0) act = fmin(act, L);
            } else {
                act = ref_silu(L > 0 ? fmin(g, L) : g);
            }
            out[r * I + i] = act * u;
        }
    }
}

static void ref_swiglu(const float *h, int64_t rows, int64_t I, double L, int variant,
                       double *out) {
    ref_swiglu_alpha(h, rows, I, L, variant, GPTOSS_ALPHA, out);
}

static int same_bits(float a, float b) { return memcmp(&a, &b, sizeof a) == 0; }

/* Runs the kernel into a poisoned buffer with a guard; checks every output written and the
 * guard untouched. The caller frees the result. */
static float *run_swiglu_alpha(const float *h, int64_t rows, int64_t I, float L, int variant,
                               float alpha) {
    size_t n = (size_t)(rows * I);
    float *out = malloc((n + GUARD) * sizeof(float));
    ck_assert_ptr_nonnull(out);
    epmoe_poison_f32(out, n + GUARD);
    epmoe_cpu_swiglu(h, rows, I, L, variant, alpha, out);
    ck_assert_uint_eq(epmoe_count_unwritten_f32(out, n), 0);
    for (size_t i = 0; i < GUARD; i++) ck_assert(same_bits(out[n + i], epmoe_poison_value()));
    return out;
}

static float *run_swiglu(const float *h, int64_t rows, int64_t I, float L, int variant) {
    return run_swiglu_alpha(h, rows, I, L, variant, (float)GPTOSS_ALPHA);
}

static void check_against_ref(const float *h, int64_t rows, int64_t I, float L, int variant,
                              const float *out) {
    size_t n = (size_t)(rows * I);
    double *ref = malloc(n * sizeof *ref);
    ck_assert_ptr_nonnull(ref);
    ref_swiglu(h, rows, I, L, variant, ref);
    /* expf is accurate to an ulp or two over the whole range and the rest is three roundings,
     * so the relative error stays near 1e-7 even where silu is tiny (g near -40). */
    double err = epmoe_max_rel_err(out, ref, n, 1e-30);
    ck_assert_msg(err < 4e-6, "variant %d, L=%g: max rel err %.3g", variant, (double)L, err);
    free(ref);
}

static float *make_input(uint64_t seed, int64_t rows, int64_t I, float lo, float hi) {
    epmoe_rng rng;
    epmoe_rng_seed(&rng, seed);
    float *h = malloc((size_t)(rows * 2 * I) * sizeof(float));
    ck_assert_ptr_nonnull(h);
    epmoe_fill_uniform(&rng, h, (size_t)(rows * 2 * I), lo, hi);
    return h;
}

START_TEST(test_swiglu_clamp_fires_both_variants_match_reference) {
    const int64_t rows = 37, I = 64;
    const float L = 10.0f;
    float *h = make_input(1, rows, I, -40.0f, 40.0f);
    /* The clamp must actually fire on both halves. */
    int64_t gate_over = 0, up_over = 0;
    for (int64_t r = 0; r < rows; r++)
        for (int64_t i = 0; i < I; i++) {
            gate_over += h[r * 2 * I + i] > L;
            up_over += fabsf(h[r * 2 * I + I + i]) > L;
        }
    ck_assert_int_gt(gate_over, rows * I / 4);
    ck_assert_int_gt(up_over, rows * I / 4);

    float *dsv4 = run_swiglu(h, rows, I, L, EPMOE_SWIGLU_DSV4);
    float *step = run_swiglu(h, rows, I, L, EPMOE_SWIGLU_STEP);
    check_against_ref(h, rows, I, L, EPMOE_SWIGLU_DSV4, dsv4);
    check_against_ref(h, rows, I, L, EPMOE_SWIGLU_STEP, step);

    /* Where the gate is well above L, the step variant is exactly L * clamp(u) and the
     * DeepSeek-V4 one silu(L) * clamp(u), which is smaller in magnitude: they differ. */
    int64_t differ = 0;
    volatile float L_runtime = L; /* computed by libm at run time, like the kernel */
    const float silu_L = L_runtime / (1.0f + expf(-L_runtime));
    for (int64_t r = 0; r < rows; r++)
        for (int64_t i = 0; i < I; i++) {
            float g = h[r * 2 * I + i], u = h[r * 2 * I + I + i];
            float uc = u > L ? L : (u < -L ? -L : u);
            if (g > L + 1.0f) {
                ck_assert(same_bits(step[r * I + i], L * uc));
                ck_assert(same_bits(dsv4[r * I + i], silu_L * uc));
                ck_assert(fabsf(dsv4[r * I + i]) < fabsf(step[r * I + i]));
            }
            if (!same_bits(dsv4[r * I + i], step[r * I + i])) differ++;
        }
    ck_assert_int_ge(differ, gate_over);
    free(dsv4);
    free(step);
    free(h);
}
END_TEST

START_TEST(test_swiglu_variants_equal_below_limit_and_without_clamp) {
    const int64_t rows = 19, I = 48;
    /* Nothing reaches the limit: the two variants give the same bits. */
    float *small = make_input(2, rows, I, -9.5f, 9.5f);
    float *a = run_swiglu(small, rows, I, 10.0f, EPMOE_SWIGLU_DSV4);
    float *b = run_swiglu(small, rows, I, 10.0f, EPMOE_SWIGLU_STEP);
    ck_assert(memcmp(a, b, (size_t)(rows * I) * sizeof(float)) == 0);
    check_against_ref(small, rows, I, 10.0f, EPMOE_SWIGLU_DSV4, a);
    free(a);
    free(b);
    free(small);

    /* limit <= 0 disables the clamp: equal to each other and to the unclamped SwiGLU. */
    float *big = make_input(3, rows, I, -40.0f, 40.0f);
    const float limits[2] = {0.0f, -1.0f};
    for (int i = 0; i < 2; i++) {
        a = run_swiglu(big, rows, I, limits[i], EPMOE_SWIGLU_DSV4);
        b = run_swiglu(big, rows, I, limits[i], EPMOE_SWIGLU_STEP);
        ck_assert(memcmp(a, b, (size_t)(rows * I) * sizeof(float)) == 0);
        check_against_ref(big, rows, I, 0.0f, EPMOE_SWIGLU_DSV4, a);
        /* And not clamped: some outputs exceed L * L. */
        int64_t beyond = 0;
        for (int64_t j = 0; j < rows * I; j++) beyond += fabsf(a[j]) > 100.0f;
        ck_assert_int_gt(beyond, 0);
        free(a);
        free(b);
    }
    free(big);
}
END_TEST

START_TEST(test_swiglu_random_normal) {
    const int64_t rows = 129, I = 96;
    epmoe_rng rng;
    epmoe_rng_seed(&rng, 4);
    float *h = malloc((size_t)(rows * 2 * I) * sizeof(float));
    ck_assert_ptr_nonnull(h);
    epmoe_fill_normal(&rng, h, (size_t)(rows * 2 * I), 4.0f);
    const float limits[3] = {7.0f, 10.0f, 0.0f};
    for (int i = 0; i < 3; i++) {
        for (int v = 0; v < 2; v++) {
            int variant = v ? EPMOE_SWIGLU_STEP : EPMOE_SWIGLU_DSV4;
            float *out = run_swiglu(h, rows, I, limits[i], variant);
            check_against_ref(h, rows, I, limits[i], variant, out);
            free(out);
        }
    }
    free(h);
}
END_TEST

/* The gate is columns [0, I) and up [I, 2I): swapping them must show. */
START_TEST(test_swiglu_gate_up_layout) {
    const int64_t I = 3;
    const float h[2 * 6] = {1.0f, 2.0f, -1.0f, 0.5f, -3.0f, 4.0f,
                            12.0f, 0.0f, -20.0f, -15.0f, 7.0f, 2.0f};
    float out[6];
    epmoe_poison_f32(out, 6);
    epmoe_cpu_swiglu(h, 2, I, 10.0f, EPMOE_SWIGLU_DSV4, 1.702f, out);
    double ref[6];
    ref_swiglu(h, 2, I, 10.0, EPMOE_SWIGLU_DSV4, ref);
    for (int i = 0; i < 6; i++) ck_assert_double_eq_tol(out[i], ref[i], 1e-6 * fabs(ref[i]) + 1e-12);
    /* Hand values: row 0, i = 0: silu(1) * 0.5; row 1, i = 0: silu(min(12,10)) * clamp(-15). */
    ck_assert_double_eq_tol(out[0], 0.5 / (1.0 + exp(-1.0)), 1e-6);
    ck_assert_double_eq_tol(out[3], 10.0 / (1.0 + exp(-10.0)) * -10.0, 1e-5);
    ck_assert(out[4] == 0.0f); /* silu(0) = 0 */
}
END_TEST

/* The clamps must not turn NaN into a finite value (fminf(NaN, L) would return L). */
START_TEST(test_swiglu_nan_propagates) {
    const float h[4] = {NAN, 2.0f, 3.0f, NAN}; /* I = 2: gate {NaN, 2}, up {3, NaN} */
    const int variants[3] = {EPMOE_SWIGLU_DSV4, EPMOE_SWIGLU_STEP, EPMOE_SWIGLU_GPTOSS};
    for (int v = 0; v < 3; v++) {
        float out[2] = {0.0f, 0.0f};
        epmoe_cpu_swiglu(h, 1, 2, 10.0f, variants[v], 1.702f, out);
        ck_assert(isnan(out[0]));
        ck_assert(isnan(out[1]));
    }
}
END_TEST

/* gpt-oss (L = 7, alpha 1.702) with inputs that make both clamps fire: against the float64
 * formula; the clamp is on the pre-activation gate (not after it, not missing), the up clamp
 * is two-sided, the + 1 is on up (not on the product), and alpha is the setting's. */
START_TEST(test_swiglu_gptoss_clamp_fires_matches_reference) {
    const int64_t rows = 41, I = 96; /* I = 3 x 32: gpt-oss widths are 32-multiples, not 64 */
    const float L = 7.0f;
    float *h = make_input(5, rows, I, -30.0f, 30.0f);
    int64_t gate_over = 0, up_over = 0;
    for (int64_t r = 0; r < rows; r++)
        for (int64_t i = 0; i < I; i++) {
            gate_over += h[r * 2 * I + i] > L;
            up_over += fabsf(h[r * 2 * I + I + i]) > L;
        }
    ck_assert_int_gt(gate_over, rows * I / 4);
    ck_assert_int_gt(up_over, rows * I / 4);
    float *out = run_swiglu(h, rows, I, L, EPMOE_SWIGLU_GPTOSS);
    check_against_ref(h, rows, I, L, EPMOE_SWIGLU_GPTOSS, out);

    /* Element by element, the cases a wrong formula would get wrong. */
    volatile float Lr = L, ar = 1.702f; /* libm at run time, like the kernel */
    const float glu_L = Lr / (1.0f + expf(-(ar * Lr)));
    int64_t checked = 0;
    for (int64_t r = 0; r < rows; r++)
        for (int64_t i = 0; i < I; i++) {
            float g = h[r * 2 * I + i], u = h[r * 2 * I + I + i];
            float uc = u > L ? L : (u < -L ? -L : u);
            if (g > L) { /* the gate clamp: exactly glu(L) * (clamp(u) + 1) */
                ck_assert(same_bits(out[r * I + i], (uc + 1.0f) * glu_L));
                checked++;
            }
            if (u < -L && g > 0.0f) /* up clamped at -L: (1 - L) * glu(g) is negative */
                ck_assert(out[r * I + i] < 0.0f);
        }
    ck_assert_int_eq(checked, gate_over);
    /* Hand values: g = 1, u = 0 gives glu(1) = 1 / (1 + e^-1.702) (the + 1 on up);
     * g = 10, u = 10 gives 7 sigmoid(11.914) * 8. */
    const float hand[4] = {1.0f, 10.0f, 0.0f, 10.0f};
    float two[2];
    epmoe_cpu_swiglu(hand, 1, 2, 7.0f, EPMOE_SWIGLU_GPTOSS, 1.702f, two);
    ck_assert_double_eq_tol(two[0], 1.0 / (1.0 + exp(-1.702)), 1e-6);
    ck_assert_double_eq_tol(two[1], 8.0 * 7.0 / (1.0 + exp(-1.702 * 7.0)), 1e-5);

    /* alpha is the setting's: alpha 1 is silu, and differs. */
    float *silu_like = run_swiglu_alpha(h, rows, I, L, EPMOE_SWIGLU_GPTOSS, 1.0f);
    double *ref1 = malloc((size_t)(rows * I) * sizeof(double));
    ref_swiglu_alpha(h, rows, I, L, EPMOE_SWIGLU_GPTOSS, 1.0, ref1);
    ck_assert(epmoe_max_rel_err(silu_like, ref1, (size_t)(rows * I), 1e-30) < 4e-6);
    ck_assert(memcmp(silu_like, out, (size_t)(rows * I) * sizeof(float)) != 0);
    free(ref1);
    free(silu_like);
    /* no clamp (limit 0): equal to the unclamped formula, some values beyond anything the clamp
     * allows (glu(7) * 8 < 56) */
    float *free_run = run_swiglu(h, rows, I, 0.0f, EPMOE_SWIGLU_GPTOSS);
    check_against_ref(h, rows, I, 0.0f, EPMOE_SWIGLU_GPTOSS, free_run);
    int64_t beyond = 0;
    for (int64_t j = 0; j < rows * I; j++) beyond += fabsf(free_run[j]) > 56.0f;
    ck_assert_int_gt(beyond, 0);
    free(free_run);
    free(out);
    free(h);
}
END_TEST

static Suite *swiglu_suite(void) {
    Suite *s = suite_create("swiglu");
    TCase *tc = tcase_create("core");
    tcase_add_test(tc, test_swiglu_clamp_fires_both_variants_match_reference);
    tcase_add_test(tc, test_swiglu_variants_equal_below_limit_and_without_clamp);
    tcase_add_test(tc, test_swiglu_random_normal);
    tcase_add_test(tc, test_swiglu_gate_up_layout);
    tcase_add_test(tc, test_swiglu_nan_propagates);
    tcase_add_test(tc, test_swiglu_gptoss_clamp_fires_matches_reference);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) {
    SRunner *sr = srunner_create(swiglu_suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
