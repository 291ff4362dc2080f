/* The float64 reference's own number formats (tests/ref/ref_formats.h) against the ml_dtypes /
 * numpy oracle vectors (tests/oracle/gen_vectors.py): every code of E2M1, E4M3 and UE8M0, every
 * rounding vector, every NVFP4 oracle row (codes, block scales, global scale, saturation count);
 * and every bf16 code against its definition (the upper half of an fp32).
 * The reference shares no code with common/formats.c or common/nvfp4.c, so this suite and
 * test_formats/test_nvfp4 together check the implementation and the reference independently
 * against the same third party. */
#include <check.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tests/ref/ref_formats.h"
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
    ck_assert_msg(f != NULL, "cannot open oracle vector file %s: %s (ctest's oracle.vectors "
                  "fixture writes it)", path, strerror(errno));
    return f;
}

/* Next "hex hex|nan" line; 0 at the end. */
static int next_pair(FILE *f, uint32_t *a, uint32_t *b, int *is_nan) {
    char line[256], first[64], second[64];
    while (fgets(line, sizeof line, f)) {
        if (line[0] == '#' || line[0] == '\n') continue;
        ck_assert_msg(sscanf(line, "%63s %63s", first, second) == 2, "malformed '%s'", line);
        *a = (uint32_t)strtoul(first, NULL, 16);
        *is_nan = strcmp(second, "nan") == 0;
        *b = *is_nan ? 0 : (uint32_t)strtoul(second, NULL, 16);
        return 1;
    }
    return 0;
}

typedef double (*decode_fn)(uint8_t);

static void check_code_table(const char *name, decode_fn decode, int expected) {
    FILE *f = open_vectors(name);
    uint32_t code, want;
    int is_nan, n = 0;
    while (next_pair(f, &code, &want, &is_nan)) {
        double got = decode((uint8_t)code);
        if (is_nan)
            ck_assert_msg(isnan(got), "%s: code 0x%02x: %g, oracle NaN", name, code, got);
        else
            ck_assert_msg(!isnan(got) && bits_of((float)got) == want && (double)(float)got == got,
                          "%s: code 0x%02x decodes to %.17g, oracle %08x (%g)", name, code, got,
                          want, (double)float_of(want));
        n++;
    }
    fclose(f);
    ck_assert_msg(n == expected, "%s has %d codes, expected %d", name, n, expected);
}

START_TEST(every_code_decodes_as_ml_dtypes) {
    check_code_table("e2m1_codes.txt", epmoe_ref_e2m1_value, 16);
    check_code_table("e4m3_codes.txt", epmoe_ref_e4m3_value, 256);
    check_code_table("ue8m0_codes.txt", epmoe_ref_ue8m0_value, 256);
    /* and every finite code encodes back to itself */
    for (int c = 0; c < 16; c++)
        ck_assert_int_eq(epmoe_ref_e2m1_encode((float)epmoe_ref_e2m1_value((uint8_t)c)), c);
    for (int c = 0; c < 256; c++)
        if ((c & 0x7f) != 0x7f)
            ck_assert_int_eq(epmoe_ref_e4m3_encode((float)epmoe_ref_e4m3_value((uint8_t)c)), c);
    /* bf16 (the real layouts' gate) is the upper half of an fp32 by definition: every code */
    for (uint32_t c = 0; c < 65536; c++) {
        double got = epmoe_ref_bf16_value((uint16_t)c);
        if ((c & 0x7f80) == 0x7f80 && (c & 0x7f))
            ck_assert_msg(isnan(got), "bf16 0x%04x: %g, expected NaN", c, got);
        else
            ck_assert_msg(bits_of((float)got) == c << 16 && (double)(float)got == got,
                          "bf16 0x%04x decodes to %.17g", c, got);
    }
}
END_TEST

typedef uint8_t (*encode_fn)(float);

static void check_rounding(const char *name, encode_fn encode) {
    FILE *f = open_vectors(name);
    uint32_t in, want;
    int is_nan, n = 0, bad = 0;
    char first[256] = "";
    while (next_pair(f, &in, &want, &is_nan)) {
        uint8_t got = encode(float_of(in));
        if (got != want && bad++ == 0)
            snprintf(first, sizeof first, "%.9g (%08x) -> 0x%x, oracle 0x%x",
                     (double)float_of(in), in, got, want);
        n++;
    }
    fclose(f);
    ck_assert_msg(n >= 1000, "%s: only %d cases", name, n);
    ck_assert_msg(bad == 0, "%s: %d of %d roundings differ from ml_dtypes; first: %s", name, bad, n,
                  first);
}

START_TEST(rounding_matches_ml_dtypes) {
    check_rounding("e2m1_rounding.txt", epmoe_ref_e2m1_encode);
    check_rounding("e4m3_rounding.txt", epmoe_ref_e4m3_encode);
}
END_TEST

/* "KEY v v ..." with n hex values. */
static void parse_hex(const char *line, const char *key, size_t n, uint32_t *out) {
    size_t len = strlen(key);
    ck_assert_msg(strncmp(line, key, len) == 0 && line[len] == ' ', "expected '%s', got '%.40s'",
                  key, line);
    const char *p = line + len;
    char *end;
    for (size_t i = 0; i < n; i++, p = end) {
        out[i] = (uint32_t)strtoul(p, &end, 16);
        ck_assert_msg(end != p, "'%s' line: %zu values, expected %zu", key, i, n);
    }
}

START_TEST(nvfp4_rows_match_the_numpy_oracle) {
    FILE *f = open_vectors("nvfp4_rows.txt");
    char *line = NULL;
    size_t cap = 0;
    int rows = 0;
    while (getline(&line, &cap, f) > 0) {
        if (strncmp(line, "row ", 4) != 0) continue;
        char name[64];
        size_t K = 0, saturated = 0;
        unsigned amax_bits, gs_bits;
        ck_assert(sscanf(line, "row %63s %zu %x %x %zu", name, &K, &amax_bits, &gs_bits,
                         &saturated) == 5);
        uint32_t *x = malloc(K * 4), *codes = malloc(K * 4), *sf = malloc(K / 16 * 4);
        uint8_t *got_codes = malloc(K), *got_sf = malloc(K / 16);
        float *xf = malloc(K * 4);
        ck_assert(x && codes && sf && got_codes && got_sf && xf);
        const char *keys[] = {"x", "codes", "sf"};
        uint32_t *dst[] = {x, codes, sf};
        for (int k = 0; k < 3; k++) {
            ck_assert(getline(&line, &cap, f) > 0);
            parse_hex(line, keys[k], k == 2 ? K / 16 : K, dst[k]);
        }
        for (size_t i = 0; i < K; i++) xf[i] = float_of(x[i]);
        float gs = epmoe_ref_nvfp4_global_sf(float_of(amax_bits));
        ck_assert_msg(bits_of(gs) == gs_bits, "row %s: global_sf %08x, oracle %08x", name,
                      bits_of(gs), gs_bits);
        size_t sat = epmoe_ref_nvfp4_quantize(xf, K, gs, got_codes, got_sf);
        ck_assert_msg(sat == saturated, "row %s: %zu saturated, oracle %zu", name, sat, saturated);
        for (size_t b = 0; b < K / 16; b++)
            ck_assert_msg(got_sf[b] == sf[b], "row %s block %zu: sf 0x%02x, oracle 0x%02x", name,
                          b, got_sf[b], sf[b]);
        for (size_t i = 0; i < K; i++)
            ck_assert_msg(got_codes[i] == codes[i], "row %s element %zu (%.9g): code 0x%x, "
                          "oracle 0x%x", name, i, (double)xf[i], got_codes[i], codes[i]);
        free(x), free(codes), free(sf), free(got_codes), free(got_sf), free(xf);
        rows++;
    }
    free(line);
    fclose(f);
    ck_assert_msg(rows >= 6, "nvfp4_rows.txt: %d rows", rows);
}
END_TEST

int main(void) {
    Suite *s = suite_create("ref_formats");
    TCase *tc = tcase_create("oracle");
    tcase_add_test(tc, every_code_decodes_as_ml_dtypes);
    tcase_add_test(tc, rounding_matches_ml_dtypes);
    tcase_add_test(tc, nvfp4_rows_match_the_numpy_oracle);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
