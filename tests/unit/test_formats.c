/* Scalar formats (common/formats.h) against the ml_dtypes/numpy oracle vectors that
 * tests/oracle/gen_vectors.py writes into EPMOE_TEST_DATA: every code of every table and every
 * rounding case must match bit for bit. */
#include <check.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/formats.h"
#include "tests/support/test_support.h"

static uint32_t bits_of(float x) {
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    return u;
}

static float float_of(uint32_t u) {
    float x;
    memcpy(&x, &u, sizeof x);
    return x;
}

static FILE *open_vectors(const char *name) {
    const char *path = epmoe_test_data_path(name);
    FILE *f = fopen(path, "r");
    ck_assert_msg(f != NULL,
                  "cannot open oracle vector file %s: %s (the oracle.vectors test writes it: "
                  "python tests/oracle/gen_vectors.py --out $EPMOE_TEST_DATA)",
                  path, strerror(errno));
    return f;
}

/* Next non-comment line as two whitespace-separated hex fields; the second may be "nan"
 * (then *is_nan is set). Returns 0 at end of file. */
static int next_pair(FILE *f, const char *name, int line_no, uint32_t *a, uint32_t *b,
                     int *is_nan) {
    char line[256];
    while (fgets(line, sizeof line, f)) {
        if (line[0] == '#' || line[0] == '\n') continue;
        char first[64], second[64];
        ck_assert_msg(sscanf(line, "%63s %63s", first, second) == 2,
                      "%s line ~%d: malformed '%s'", name, line_no, line);
        *a = (uint32_t)strtoul(first, NULL, 16);
        *is_nan = strcmp(second, "nan") == 0;
        *b = *is_nan ? 0 : (uint32_t)strtoul(second, NULL, 16);
        return 1;
    }
    return 0;
}

/* ---- code tables ---- */

START_TEST(e2m1_every_code) {
    FILE *f = open_vectors("e2m1_codes.txt");
    uint32_t code, want;
    int is_nan, n = 0;
    while (next_pair(f, "e2m1_codes.txt", n, &code, &want, &is_nan)) {
        float got = epmoe_e2m1_to_float((uint8_t)code);
        ck_assert_msg(bits_of(got) == want, "E2M1 code 0x%x decodes to %08x (%g), oracle %08x",
                      code, bits_of(got), got, want);
        uint8_t back = epmoe_float_to_e2m1_satfinite(got);
        ck_assert_msg(back == code, "E2M1 %g encodes to 0x%x, not its own code 0x%x", got, back,
                      code);
        n++;
    }
    fclose(f);
    ck_assert_msg(n == 16, "e2m1_codes.txt has %d codes, expected 16", n);
}
END_TEST

START_TEST(e4m3_every_code) {
    FILE *f = open_vectors("e4m3_codes.txt");
    uint32_t code, want;
    int is_nan, n = 0;
    while (next_pair(f, "e4m3_codes.txt", n, &code, &want, &is_nan)) {
        float got = epmoe_e4m3_to_float((uint8_t)code);
        if (is_nan) {
            ck_assert_msg(isnan(got), "E4M3 code 0x%02x should decode to NaN, got %g", code, got);
        } else {
            ck_assert_msg(bits_of(got) == want,
                          "E4M3 code 0x%02x decodes to %08x (%g), oracle %08x", code,
                          bits_of(got), got, want);
            uint8_t back = epmoe_float_to_e4m3_satfinite(got);
            ck_assert_msg(back == code, "E4M3 %g encodes to 0x%02x, not its own code 0x%02x",
                          got, back, code);
        }
        n++;
    }
    fclose(f);
    ck_assert_msg(n == 256, "e4m3_codes.txt has %d codes, expected 256", n);
}
END_TEST

START_TEST(ue8m0_every_code) {
    FILE *f = open_vectors("ue8m0_codes.txt");
    uint32_t code, want;
    int is_nan, n = 0;
    while (next_pair(f, "ue8m0_codes.txt", n, &code, &want, &is_nan)) {
        float got = epmoe_ue8m0_to_float((uint8_t)code);
        if (is_nan)
            ck_assert_msg(isnan(got), "UE8M0 code 0x%02x should be NaN, got %g", code, got);
        else
            ck_assert_msg(bits_of(got) == want,
                          "UE8M0 code 0x%02x decodes to %08x (%g), oracle %08x", code,
                          bits_of(got), got, want);
        n++;
    }
    fclose(f);
    ck_assert_msg(n == 256, "ue8m0_codes.txt has %d codes, expected 256", n);
}
END_TEST

/* ---- rounding vectors ---- */

typedef uint32_t (*encode_fn)(float x);

static uint32_t enc_e2m1(float x) { return epmoe_float_to_e2m1_satfinite(x); }
static uint32_t enc_e4m3(float x) { return epmoe_float_to_e4m3_satfinite(x); }
static uint32_t enc_bf16(float x) { return epmoe_float_to_bf16(x); }
static uint32_t enc_fp16(float x) { return epmoe_float_to_fp16(x); }

/* Every line "input_bits expected_code" must match; reports the first mismatches. */
static void check_rounding_file(const char *name, const char *format, encode_fn encode,
                                int min_cases) {
    FILE *f = open_vectors(name);
    uint32_t in, want;
    int is_nan, n = 0, bad = 0;
    char first_bad[512] = "";
    while (next_pair(f, name, n, &in, &want, &is_nan)) {
        ck_assert_msg(!is_nan, "%s: NaN expectation for input %08x", name, in);
        uint32_t got = encode(float_of(in));
        if (got != want) {
            if (bad == 0)
                snprintf(first_bad, sizeof first_bad,
                         "first: %.9g (bits %08x) -> 0x%x, oracle 0x%x", float_of(in), in, got,
                         want);
            bad++;
        }
        n++;
    }
    fclose(f);
    ck_assert_msg(n >= min_cases, "%s has only %d cases (expected at least %d)", name, n,
                  min_cases);
    ck_assert_msg(bad == 0, "%s: %d of %d fp32 -> %s roundings differ from the oracle; %s", name,
                  bad, n, format, first_bad);
}

START_TEST(e2m1_rounding_matches_oracle) {
    check_rounding_file("e2m1_rounding.txt", "E2M1", enc_e2m1, 1000);
}
END_TEST

START_TEST(e4m3_rounding_matches_oracle) {
    check_rounding_file("e4m3_rounding.txt", "E4M3", enc_e4m3, 1000);
}
END_TEST

START_TEST(bf16_rounding_matches_oracle) {
    check_rounding_file("bf16_rounding.txt", "bf16", enc_bf16, 1000);
}
END_TEST

START_TEST(fp16_rounding_matches_oracle) {
    check_rounding_file("fp16_rounding.txt", "fp16", enc_fp16, 1000);
}
END_TEST

/* ---- cases the oracle files leave out ---- */

START_TEST(e2m1_ties_go_to_even) {
    /* tie -> the even code (mantissa bit 0) on each side */
    const float ties[] = {0.25f, 0.75f, 1.25f, 1.75f, 2.5f, 3.5f, 5.0f};
    const uint8_t even[] = {0x0, 0x2, 0x2, 0x4, 0x4, 0x6, 0x6};
    for (int i = 0; i < 7; i++) {
        ck_assert_msg(epmoe_float_to_e2m1_satfinite(ties[i]) == even[i],
                      "E2M1 tie %g -> 0x%x, want 0x%x", ties[i],
                      epmoe_float_to_e2m1_satfinite(ties[i]), even[i]);
        ck_assert_msg(epmoe_float_to_e2m1_satfinite(-ties[i]) == (even[i] | 0x8),
                      "E2M1 tie %g -> 0x%x, want 0x%x", -ties[i],
                      epmoe_float_to_e2m1_satfinite(-ties[i]), even[i] | 0x8);
    }
}
END_TEST

START_TEST(nan_handling) {
    ck_assert_uint_eq(epmoe_float_to_e2m1_satfinite(NAN), 0);
    ck_assert_uint_eq(epmoe_float_to_e2m1_satfinite(-NAN), 0);
    ck_assert_uint_eq(epmoe_float_to_e2m1_satfinite(INFINITY), 0x7);
    ck_assert_uint_eq(epmoe_float_to_e2m1_satfinite(-INFINITY), 0xf);
    ck_assert_uint_eq(epmoe_float_to_e4m3_satfinite(NAN), 0x7f);
    ck_assert_uint_eq(epmoe_float_to_e4m3_satfinite(-NAN), 0xff);
    ck_assert_uint_eq(epmoe_float_to_e4m3_satfinite(INFINITY), 0x7e);
    ck_assert_uint_eq(epmoe_float_to_e4m3_satfinite(-INFINITY), 0xfe);
    ck_assert(isnan(epmoe_bf16_to_float(epmoe_float_to_bf16(NAN))));
    ck_assert(isnan(epmoe_fp16_to_float(epmoe_float_to_fp16(NAN))));
    /* a NaN whose payload sits only in the low bits must not truncate to Inf */
    ck_assert(isnan(epmoe_bf16_to_float(epmoe_float_to_bf16(float_of(0x7f800001u)))));
    ck_assert(isnan(epmoe_fp16_to_float(epmoe_float_to_fp16(float_of(0xff800001u)))));
    ck_assert_uint_eq(epmoe_float_to_bf16(INFINITY), 0x7f80);
    ck_assert_uint_eq(epmoe_float_to_fp16(-INFINITY), 0xfc00);
}
END_TEST

/* Every 16-bit pattern decodes and re-encodes to itself (NaNs stay NaN): with the rounding
 * vectors (which hit every grid point of several binades) this pins down the decoders. */
START_TEST(sixteen_bit_round_trip) {
    for (uint32_t b = 0; b < 65536; b++) {
        float bf = epmoe_bf16_to_float((uint16_t)b);
        float hf = epmoe_fp16_to_float((uint16_t)b);
        if (isnan(bf))
            ck_assert_msg((b & 0x7f80) == 0x7f80 && (b & 0x7f), "bf16 %04x decoded to NaN", b);
        else
            ck_assert_msg(epmoe_float_to_bf16(bf) == b, "bf16 %04x -> %g -> %04x", b, bf,
                          epmoe_float_to_bf16(bf));
        if (isnan(hf)) {
            ck_assert_msg((b & 0x7c00) == 0x7c00 && (b & 0x3ff), "fp16 %04x decoded to NaN", b);
            ck_assert(isnan(epmoe_fp16_to_float(epmoe_float_to_fp16(hf))));
        } else {
            ck_assert_msg(epmoe_float_to_fp16(hf) == b, "fp16 %04x -> %g -> %04x", b, hf,
                          epmoe_float_to_fp16(hf));
        }
    }
    ck_assert(epmoe_fp16_to_float(0x7bff) == 65504.0f);
    ck_assert(epmoe_fp16_to_float(0x0001) == ldexpf(1.0f, -24));
}
END_TEST

static Suite *formats_suite(void) {
    Suite *s = suite_create("formats");
    TCase *tables = tcase_create("code_tables");
    tcase_add_test(tables, e2m1_every_code);
    tcase_add_test(tables, e4m3_every_code);
    tcase_add_test(tables, ue8m0_every_code);
    suite_add_tcase(s, tables);
    TCase *rounding = tcase_create("rounding");
    tcase_add_test(rounding, e2m1_rounding_matches_oracle);
    tcase_add_test(rounding, e4m3_rounding_matches_oracle);
    tcase_add_test(rounding, bf16_rounding_matches_oracle);
    tcase_add_test(rounding, fp16_rounding_matches_oracle);
    tcase_add_test(rounding, e2m1_ties_go_to_even);
    tcase_add_test(rounding, nan_handling);
    tcase_add_test(rounding, sixteen_bit_round_trip);
    suite_add_tcase(s, rounding);
    return s;
}

int main(void) {
    SRunner *sr = srunner_create(formats_suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
