/* FP8 activation blocks and the exact FP8 form of FP4 weights (common/fp8.h): the block
 * exponent rule at its boundaries, rows bit-exact against the float64 reference's quantizer
 * (tests/ref/ref_formats.c, written from the definition with no shared code), the exact
 * dequantization, and the weight expansion: exact for MXFP4-origin weights, counted (never
 * silently used) for NVFP4 scales and for groups whose blocks lie too far apart. */
#include <check.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common/formats.h"
#include "common/fp8.h"
#include "common/nvfp4.h"
#include "common/rng.h"
#include "tests/ref/ref_formats.h"

static void *xmalloc(size_t n) {
    void *p = malloc(n ? n : 1);
    ck_assert_msg(p != NULL, "out of memory allocating %zu bytes", n);
    return p;
}

/* e is the smallest exponent with amax <= 448 * 2^e: exactly at 448 * 2^e it stays, one ulp
 * above it moves up, and a sweep over magnitudes agrees with stepping in double. */
START_TEST(block_exponent_rule) {
    for (int e = -100; e <= 100; e++) {
        float at = ldexpf(448.0f, e);
        ck_assert_int_eq(epmoe_fp8_block_exp(at), e);
        ck_assert_int_eq(epmoe_fp8_block_exp(nextafterf(at, INFINITY)), e + 1);
        ck_assert_int_eq(epmoe_fp8_block_exp(nextafterf(at, 0.0f)), e);
    }
    ck_assert_int_eq(epmoe_fp8_block_exp(0.0f), 0);
    ck_assert_int_eq(epmoe_fp8_block_exp(1e-38f), EPMOE_FP8_MIN_EXP);
    ck_assert_int_eq(epmoe_fp8_block_exp(3.0e38f), 120);
    epmoe_rng r;
    epmoe_rng_seed(&r, 7);
    for (int i = 0; i < 20000; i++) {
        float amax = ldexpf(epmoe_rng_uniform(&r) + 0.5f, (int)epmoe_rng_below(&r, 200) - 100);
        int want = -140;
        while ((double)amax > 448.0 * ldexp(1.0, want)) want++;
        if (want < EPMOE_FP8_MIN_EXP) want = EPMOE_FP8_MIN_EXP;
        ck_assert_msg(epmoe_fp8_block_exp(amax) == want, "amax %a: e %d, want %d", (double)amax,
                      epmoe_fp8_block_exp(amax), want);
    }
}
END_TEST

/* Rows of several lengths (a short last block: gpt-oss's 2880 = 22.5 blocks) and magnitudes,
 * with a zero block and a tiny one: codes and exponents equal the reference's, and the
 * dequantized values are e4m3 * 2^e exactly, within half a step of x. */
START_TEST(rows_match_reference) {
    const size_t lengths[] = {128, 160, 384, 2880};
    epmoe_rng r;
    epmoe_rng_seed(&r, 11);
    for (size_t li = 0; li < sizeof lengths / sizeof lengths[0]; li++) {
        const size_t K = lengths[li], nb = (K + 127) / 128;
        float *x = xmalloc(K * sizeof(float)), *deq = xmalloc(K * sizeof(float));
        uint8_t *codes = xmalloc(K), *ref_codes = xmalloc(K), *e8m0 = xmalloc(nb);
        int *ref_exps = xmalloc(nb * sizeof(int));
        for (int trial = 0; trial < 20; trial++) {
            float scale = ldexpf(1.0f, (int)epmoe_rng_below(&r, 60) - 30);
            for (size_t k = 0; k < K; k++) x[k] = epmoe_rng_normal(&r) * scale;
            if (trial % 4 == 1) memset(x, 0, 128 * sizeof(float));             /* zero block */
            if (trial % 4 == 2)
                for (size_t k = 0; k < 128; k++) x[k] *= 1e-35f; /* below the clamp */
            if (trial % 4 == 3) x[K - 1] = 448.0f * scale;       /* at a boundary */
            memset(codes, 0xab, K);
            memset(e8m0, 0xab, nb);
            epmoe_fp8_quantize_row(x, K, codes, e8m0);
            epmoe_ref_fp8_quantize(x, K, ref_codes, ref_exps);
            for (size_t b = 0; b < nb; b++)
                ck_assert_msg((int)e8m0[b] - 127 == ref_exps[b], "K %zu block %zu: e %d, ref %d",
                              K, b, (int)e8m0[b] - 127, ref_exps[b]);
            for (size_t k = 0; k < K; k++)
                ck_assert_msg(codes[k] == ref_codes[k], "K %zu k %zu x %a: code %#x, ref %#x", K,
                              k, (double)x[k], codes[k], ref_codes[k]);
            epmoe_fp8_dequantize_row(codes, e8m0, K, deq);
            for (size_t k = 0; k < K; k++) {
                double want = epmoe_ref_e4m3_value(codes[k]) * ldexp(1.0, ref_exps[k / 128]);
                ck_assert_msg((double)deq[k] == want, "k %zu: %a != %a", k, (double)deq[k], want);
                /* half a step of e4m3 (2^-4 relative) or of its subnormal spacing */
                double tol = fmax(fabs((double)x[k]) / 16.0, ldexp(1.0, ref_exps[k / 128] - 10));
                if (ref_exps[k / 128] > EPMOE_FP8_MIN_EXP)
                    ck_assert_msg(fabs((double)deq[k] - x[k]) <= tol, "k %zu: %g from %g", k,
                                  (double)deq[k], (double)x[k]);
            }
        }
        free(x), free(deq), free(codes), free(ref_codes), free(e8m0), free(ref_exps);
    }
}
END_TEST

/* Expands [rows, K] FP4 and checks every element of every group the call calls exact. */
static size_t expand_and_check(const uint8_t *codes, const uint8_t *sf, size_t rows, size_t K) {
    uint8_t *e4m3 = xmalloc(rows * K), *ge = xmalloc(rows * K / 128);
    memset(e4m3, 0xab, rows * K);
    size_t inexact = epmoe_fp4_to_fp8_weights(codes, sf, rows, K, e4m3, ge);
    size_t counted = 0;
    for (size_t r = 0; r < rows; r++)
        for (size_t g = 0; g < K / 128; g++) {
            int exact = 1;
            for (size_t i = 0; i < 128; i++) {
                size_t k = g * 128 + i;
                uint8_t byte = codes[r * K / 2 + k / 2];
                double v = epmoe_ref_e2m1_value(k % 2 ? byte >> 4 : byte & 0xf) *
                           epmoe_ref_e4m3_value(sf[r * K / 16 + k / 16]);
                double w = epmoe_ref_e4m3_value(e4m3[r * K + k]) *
                           epmoe_ref_ue8m0_value(ge[r * K / 128 + g]);
                exact &= v == w;
            }
            counted += !exact;
        }
    free(e4m3);
    free(ge);
    ck_assert_msg(counted == inexact, "%zu groups inexact, the call said %zu", counted, inexact);
    return inexact;
}

/* MXFP4 weights (a UE8M0 scale per 32, blocks of very different magnitudes within each
 * group), converted exactly to NVFP4 at load as the worker does, then to FP8: every group exact. */
START_TEST(mxfp4_weights_expand_exactly) {
    const size_t rows = 64, K = 512;
    epmoe_rng r;
    epmoe_rng_seed(&r, 3);
    float *w = xmalloc(rows * K * sizeof(float));
    uint8_t *codes = xmalloc(rows * K / 2), *e8m0 = xmalloc(rows * K / 32);
    uint8_t *sf = xmalloc(rows * K / 16);
    for (size_t i = 0; i < rows * K; i++)
        w[i] = epmoe_rng_normal(&r) * ldexpf(1.0f, (int)((i / 32) % 13) - 6); /* 12 binades */
    for (size_t row = 0; row < rows; row++)
        epmoe_mxfp4_quantize_row(w + row * K, K, codes + row * K / 2, e8m0 + row * K / 32);
    float ws2 = 0;
    ck_assert(epmoe_mxfp4_to_nvfp4(codes, e8m0, rows, K, codes, sf, &ws2, NULL) == EPMOE_OK);
    ck_assert_uint_eq(expand_and_check(codes, sf, rows, K), 0);
    free(w), free(codes), free(e8m0), free(sf);
}
END_TEST

/* NVFP4 weights (UE4M3 scales with mantissa bits): e2m1 * sf needs up to 5 significant bits,
 * so most groups cannot be E4M3 and every one of them is counted. */
START_TEST(nvfp4_weights_are_counted) {
    const size_t rows = 32, K = 256;
    epmoe_rng r;
    epmoe_rng_seed(&r, 5);
    float *w = xmalloc(K * sizeof(float));
    uint8_t *codes = xmalloc(rows * K / 2), *sf = xmalloc(rows * K / 16);
    for (size_t row = 0; row < rows; row++) {
        for (size_t k = 0; k < K; k++) w[k] = epmoe_rng_normal(&r);
        epmoe_nvfp4_quantize_row(w, K, epmoe_nvfp4_global_sf(epmoe_amax(w, K)),
                                 codes + row * K / 2, sf + row * K / 16);
    }
    size_t inexact = expand_and_check(codes, sf, rows, K);
    ck_assert_msg(inexact > rows * K / 128 / 2, "only %zu of %zu groups inexact", inexact,
                  rows * K / 128);
    free(w), free(codes), free(sf);
}
END_TEST

/* Power-of-two scales, but one block 2^21 below its group's largest (6 * 448 against
 * 0.5 * 2^-9): its codes fall below E4M3's range, and only that group is counted. */
START_TEST(far_apart_blocks_are_counted) {
    const size_t rows = 2, K = 256;
    uint8_t codes[2 * 128], sf[2 * 16];
    memset(codes, 0x11, sizeof codes);  /* every code 0.5 */
    memset(sf, 0x38, sizeof sf);        /* every scale 1.0 */
    sf[16 + 8] = 0x7e;                  /* row 1, group 1: one block at 448 ... */
    memset(codes + 128 + 64, 0x77, 8);  /* ... of 6s, ... */
    sf[16 + 9] = 0x01;                  /* ... and one at 2^-9: 0.5 * 2^-9 is 2^-19 below it */
    ck_assert_uint_eq(expand_and_check(codes, sf, rows, K), 1);
}
END_TEST

int main(void) {
    Suite *s = suite_create("fp8");
    TCase *tc = tcase_create("fp8");
    tcase_add_test(tc, block_exponent_rule);
    tcase_add_test(tc, rows_match_reference);
    tcase_add_test(tc, mxfp4_weights_expand_exactly);
    tcase_add_test(tc, nvfp4_weights_are_counted);
    tcase_add_test(tc, far_apart_blocks_are_counted);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
