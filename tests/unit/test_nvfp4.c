/* NVFP4 / MXFP4 block formats (common/nvfp4.h): quantized rows bit-exact against the numpy
 * oracle (tests/oracle/gen_vectors.py, nvfp4_rows.txt), round-trip error bounds, the all-zero
 * case, the exact MXFP4 -> NVFP4 conversion and the 128x4 scale swizzle. */
#include <check.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/formats.h"
#include "common/nvfp4.h"
#include "tests/support/test_support.h"

#define POISON_BYTE 0xab

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

static uint8_t nibble(const uint8_t *codes, size_t k) {
    return (uint8_t)(k % 2 == 0 ? codes[k / 2] & 0xf : codes[k / 2] >> 4);
}

static void *xmalloc(size_t n) {
    void *p = malloc(n ? n : 1);
    ck_assert_msg(p != NULL, "out of memory allocating %zu bytes", n);
    return p;
}

/* ---- the numpy oracle's rows ---- */

typedef struct {
    char name[64];
    size_t K;
    float amax, global_sf;
    size_t saturated;
    float *x, *deq;
    uint8_t *codes; /* unpacked, one per element */
    uint8_t *sf;
} oracle_row;

/* Reads "KEY v v v ..." with exactly `n` hex values into out (as uint32). */
static void parse_hex_line(char *line, const char *key, const char *row, size_t n,
                           uint32_t *out) {
    size_t key_len = strlen(key);
    ck_assert_msg(strncmp(line, key, key_len) == 0 && line[key_len] == ' ',
                  "nvfp4_rows.txt row %s: expected a '%s' line, got '%.40s'", row, key, line);
    char *p = line + key_len, *end;
    for (size_t i = 0; i < n; i++) {
        unsigned long v = strtoul(p, &end, 16);
        ck_assert_msg(end != p, "nvfp4_rows.txt row %s: '%s' line has %zu values, expected %zu",
                      row, key, i, n);
        out[i] = (uint32_t)v;
        p = end;
    }
}

static size_t read_oracle_rows(oracle_row *rows, size_t cap) {
    const char *path = epmoe_test_data_path("nvfp4_rows.txt");
    FILE *f = fopen(path, "r");
    ck_assert_msg(f != NULL,
                  "cannot open oracle vector file %s: %s (the oracle.vectors test writes it: "
                  "python tests/oracle/gen_vectors.py --out $EPMOE_TEST_DATA)",
                  path, strerror(errno));
    char *line = NULL;
    size_t line_cap = 0, n = 0;
    while (getline(&line, &line_cap, f) > 0) {
        if (strncmp(line, "row ", 4) != 0) continue;
        ck_assert_msg(n < cap, "nvfp4_rows.txt has more than %zu rows", cap);
        oracle_row *r = &rows[n];
        unsigned amax_bits, gs_bits;
        ck_assert_msg(sscanf(line, "row %63s %zu %x %x %zu", r->name, &r->K, &amax_bits, &gs_bits,
                             &r->saturated) == 5,
                      "nvfp4_rows.txt: malformed row header '%s'", line);
        ck_assert_msg(r->K > 0 && r->K % EPMOE_NVFP4_BLOCK == 0, "row %s: K=%zu", r->name, r->K);
        r->amax = float_of(amax_bits);
        r->global_sf = float_of(gs_bits);
        uint32_t *tmp = xmalloc(r->K * sizeof *tmp);
        r->x = xmalloc(r->K * sizeof *r->x);
        r->deq = xmalloc(r->K * sizeof *r->deq);
        r->codes = xmalloc(r->K);
        r->sf = xmalloc(r->K / EPMOE_NVFP4_BLOCK);
        const char *keys[] = {"x", "codes", "sf", "deq"};
        for (int k = 0; k < 4; k++) {
            ck_assert_msg(getline(&line, &line_cap, f) > 0, "row %s: file ends before '%s'",
                          r->name, keys[k]);
            size_t count = k == 2 ? r->K / EPMOE_NVFP4_BLOCK : r->K;
            parse_hex_line(line, keys[k], r->name, count, tmp);
            for (size_t i = 0; i < count; i++) {
                if (k == 0) r->x[i] = float_of(tmp[i]);
                if (k == 1) r->codes[i] = (uint8_t)tmp[i];
                if (k == 2) r->sf[i] = (uint8_t)tmp[i];
                if (k == 3) r->deq[i] = float_of(tmp[i]);
            }
        }
        free(tmp);
        n++;
    }
    free(line);
    fclose(f);
    return n;
}

static void free_oracle_rows(oracle_row *rows, size_t n) {
    for (size_t i = 0; i < n; i++) {
        free(rows[i].x);
        free(rows[i].deq);
        free(rows[i].codes);
        free(rows[i].sf);
    }
}

START_TEST(quantize_matches_numpy_oracle) {
    oracle_row rows[32];
    size_t n = read_oracle_rows(rows, 32);
    ck_assert_msg(n >= 6, "nvfp4_rows.txt has %zu rows, expected at least 6", n);
    int seen_zero_row = 0, seen_saturation = 0;
    for (size_t i = 0; i < n; i++) {
        oracle_row *r = &rows[i];
        float gs = epmoe_nvfp4_global_sf(r->amax);
        ck_assert_msg(bits_of(gs) == bits_of(r->global_sf),
                      "row %s: global_sf(%g) = %.9g, oracle %.9g", r->name, r->amax, gs,
                      r->global_sf);

        uint8_t *codes = xmalloc(r->K / 2), *sf = xmalloc(r->K / EPMOE_NVFP4_BLOCK);
        memset(codes, POISON_BYTE, r->K / 2);
        memset(sf, POISON_BYTE, r->K / EPMOE_NVFP4_BLOCK);
        size_t saturated = epmoe_nvfp4_quantize_row(r->x, r->K, r->global_sf, codes, sf);
        for (size_t b = 0; b < r->K / EPMOE_NVFP4_BLOCK; b++)
            ck_assert_msg(sf[b] == r->sf[b], "row %s block %zu: sf 0x%02x, oracle 0x%02x",
                          r->name, b, sf[b], r->sf[b]);
        for (size_t k = 0; k < r->K; k++)
            ck_assert_msg(nibble(codes, k) == r->codes[k],
                          "row %s element %zu (x=%.9g): code 0x%x, oracle 0x%x", r->name, k,
                          r->x[k], nibble(codes, k), r->codes[k]);
        ck_assert_msg(saturated == r->saturated, "row %s: %zu saturated, oracle %zu", r->name,
                      saturated, r->saturated);

        float *deq = xmalloc(r->K * sizeof *deq);
        epmoe_poison_f32(deq, r->K);
        epmoe_nvfp4_dequantize_row(codes, sf, r->K, 1.0f, deq);
        for (size_t k = 0; k < r->K; k++)
            ck_assert_msg(bits_of(deq[k]) == bits_of(r->deq[k]),
                          "row %s element %zu: e2m1*sf = %.9g, oracle %.9g", r->name, k, deq[k],
                          r->deq[k]);
        if (r->amax == 0.0f) seen_zero_row = 1;
        if (r->saturated > 0 && strcmp(r->name, "scale_too_small") == 0) seen_saturation = 1;
        free(codes);
        free(sf);
        free(deq);
    }
    ck_assert_msg(seen_zero_row, "the oracle rows lack the all-zero row");
    ck_assert_msg(seen_saturation, "the oracle rows lack a saturating row");
    free_oracle_rows(rows, n);
}
END_TEST

/* ---- properties on random data ---- */

/* Half the E2M1 grid spacing around a scaled magnitude s in [0, 6]. */
static double e2m1_half_gap(double s) {
    if (s <= 2.0) return 0.25;
    if (s <= 4.0) return 0.5;
    return 1.0;
}

START_TEST(round_trip_error_within_half_a_step) {
    epmoe_rng rng;
    epmoe_rng_seed(&rng, 41);
    const size_t K = 512;
    float *x = xmalloc(K * sizeof *x), *deq = xmalloc(K * sizeof *deq);
    uint8_t codes[256], sf[32];
    for (int trial = 0; trial < 20; trial++) {
        /* block magnitudes up to 2^15 apart, so that block scales cover the e4m3 normals and
         * subnormals without rounding to zero (which the bound could not cover) */
        for (size_t k = 0; k < K; k++) {
            float block_scale = ldexpf(1.0f, (int)((k / 16) % 16) - 11 + trial % 5);
            x[k] = epmoe_rng_normal(&rng) * block_scale;
            if (x[k] == 0.0f) x[k] = block_scale; /* random data never zero */
        }
        float gs = epmoe_nvfp4_global_sf(epmoe_amax(x, K));
        ck_assert(isfinite(gs) && gs > 0.0f);
        memset(codes, POISON_BYTE, sizeof codes);
        memset(sf, POISON_BYTE, sizeof sf);
        epmoe_nvfp4_quantize_row(x, K, gs, codes, sf);
        epmoe_poison_f32(deq, K);
        epmoe_nvfp4_dequantize_row(codes, sf, K, 1.0f / gs, deq);
        ck_assert_uint_eq(epmoe_count_unwritten_f32(deq, K), 0);
        for (size_t k = 0; k < K; k++) {
            ck_assert_msg(sf[k / 16] != 0 && sf[k / 16] != POISON_BYTE, "block %zu: sf 0x%02x",
                          k / 16, sf[k / 16]);
            double sf_value = epmoe_e4m3_to_float(sf[k / 16]);
            double step = sf_value / gs; /* the value of e2m1 1.0 in this block */
            double s = fabs((double)x[k]) / step;
            double bound = e2m1_half_gap(s) * step;
            if (s > 6.0) {
                /* a block scale rounded down pushes the block's largest elements past 6; by at
                 * most half an e4m3 step of the scale (2^-4 relative for normals) */
                double sf_half_step = sf[k / 16] < 0x08 ? ldexp(1.0, -10) : sf_value / 16.0;
                ck_assert_msg(s <= 6.0 * (sf_value + sf_half_step) / sf_value + 1e-5,
                              "element %zu scaled to %g: beyond e4m3 rounding of the scale", k, s);
                bound = (s - 6.0) * step;
            }
            bound += 1e-6 * fabs((double)x[k]) + 1e-30; /* fp32 rounding of x*gs/sf and 1/gs */
            double err = fabs((double)deq[k] - (double)x[k]);
            ck_assert_msg(err <= bound,
                          "trial %d element %zu: x=%.9g dequantized %.9g, error %g > bound %g "
                          "(block sf %g, global_sf %g)",
                          trial, k, x[k], deq[k], err, bound,
                          (double)epmoe_e4m3_to_float(sf[k / 16]), gs);
        }
    }
    free(x);
    free(deq);
}
END_TEST

START_TEST(zero_amax_gives_finite_scales_and_zero_codes) {
    ck_assert(epmoe_nvfp4_global_sf(0.0f) == 1.0f);
    ck_assert(epmoe_nvfp4_global_sf(float_of(1)) == 1.0f); /* 2688/2^-149 overflows */
    ck_assert(isnan(epmoe_nvfp4_global_sf(NAN)));
    ck_assert(isnan(epmoe_nvfp4_global_sf(-1.0f)));
    ck_assert(isnan(epmoe_nvfp4_global_sf(INFINITY)));
    ck_assert(epmoe_nvfp4_global_sf(2688.0f) == 1.0f);

    float x[64] = {0}, deq[64];
    x[5] = -0.0f;
    uint8_t codes[32], sf[4];
    memset(codes, POISON_BYTE, sizeof codes);
    memset(sf, POISON_BYTE, sizeof sf);
    float gs = epmoe_nvfp4_global_sf(epmoe_amax(x, 64));
    ck_assert(gs == 1.0f);
    ck_assert_uint_eq(epmoe_nvfp4_quantize_row(x, 64, gs, codes, sf), 0);
    for (int b = 0; b < 4; b++) ck_assert_msg(sf[b] == 0, "block %d sf 0x%02x", b, sf[b]);
    for (int i = 0; i < 32; i++) ck_assert_msg(codes[i] == 0, "code byte %d 0x%02x", i, codes[i]);
    epmoe_poison_f32(deq, 64);
    epmoe_nvfp4_dequantize_row(codes, sf, 64, 1.0f / gs, deq);
    for (int k = 0; k < 64; k++) ck_assert_msg(deq[k] == 0.0f, "element %d: %g", k, deq[k]);
}
END_TEST

START_TEST(amax_basics) {
    float x[5] = {1.0f, -7.5f, 3.0f, -0.0f, 7.25f};
    ck_assert(epmoe_amax(x, 5) == 7.5f);
    ck_assert(epmoe_amax(x, 0) == 0.0f);
    x[3] = NAN;
    ck_assert(isnan(epmoe_amax(x, 5)));
}
END_TEST

START_TEST(too_large_global_scale_saturates_without_inf) {
    epmoe_rng rng;
    epmoe_rng_seed(&rng, 7);
    float x[32], deq[32];
    for (int k = 0; k < 32; k++) x[k] = 1.0f + epmoe_rng_uniform(&rng); /* all in [1, 2) */
    uint8_t codes[16], sf[2];
    /* global scale for amax 1e-3: every block scale wants ~900 > 448 */
    size_t saturated = epmoe_nvfp4_quantize_row(x, 32, epmoe_nvfp4_global_sf(1e-3f), codes, sf);
    ck_assert_msg(saturated == 32, "%zu of 32 elements counted saturated", saturated);
    ck_assert_uint_eq(sf[0], 0x7e);
    ck_assert_uint_eq(sf[1], 0x7e);
    epmoe_nvfp4_dequantize_row(codes, sf, 32, 1.0f, deq);
    for (int k = 0; k < 32; k++) ck_assert_msg(deq[k] == 6.0f * 448.0f, "element %d: %g", k, deq[k]);
}
END_TEST

/* ---- MXFP4 ---- */

START_TEST(mxfp4_exact_values_round_trip) {
    /* values on the MX grid (e2m1 * 2^s, with a 6 * 2^s in every block) come back exactly */
    epmoe_rng rng;
    epmoe_rng_seed(&rng, 3);
    const size_t K = 32 * 8;
    float x[256], deq[256];
    uint8_t want_codes[256], codes[128], e8m0[8];
    const int shared_exps[8] = {-127, -120, -10, -1, 0, 3, 60, 125};
    for (size_t b = 0; b < 8; b++)
        for (size_t i = 0; i < 32; i++) {
            uint8_t c = (uint8_t)(1 + epmoe_rng_below(&rng, 15)); /* nonzero codes */
            if (c == 8) c = 9;
            if (i == 7) c = (b % 2) ? 0xf : 0x7; /* the block's |max| is 6 */
            want_codes[b * 32 + i] = c;
            x[b * 32 + i] = epmoe_e2m1_to_float(c) * ldexpf(1.0f, shared_exps[b]);
        }
    memset(codes, POISON_BYTE, sizeof codes);
    memset(e8m0, POISON_BYTE, sizeof e8m0);
    epmoe_mxfp4_quantize_row(x, K, codes, e8m0);
    for (size_t b = 0; b < 8; b++)
        ck_assert_msg(e8m0[b] == shared_exps[b] + 127, "block %zu: scale code %u, want %d", b,
                      e8m0[b], shared_exps[b] + 127);
    for (size_t k = 0; k < K; k++)
        ck_assert_msg(nibble(codes, k) == want_codes[k], "element %zu: code 0x%x, want 0x%x", k,
                      nibble(codes, k), want_codes[k]);
    epmoe_poison_f32(deq, K);
    epmoe_mxfp4_dequantize_row(codes, e8m0, K, deq);
    for (size_t k = 0; k < K; k++)
        ck_assert_msg(bits_of(deq[k]) == bits_of(x[k]), "element %zu: %g back as %g", k, x[k],
                      deq[k]);
}
END_TEST

START_TEST(mxfp4_random_round_trip) {
    epmoe_rng rng;
    epmoe_rng_seed(&rng, 5);
    const size_t K = 32 * 16;
    float x[512], deq[512];
    uint8_t codes[256], e8m0[16];
    for (size_t k = 0; k < K; k++) {
        x[k] = epmoe_rng_normal(&rng) * ldexpf(1.0f, (int)(k / 32) * 3 - 20);
        if (x[k] == 0.0f) x[k] = 1.0f;
    }
    for (size_t i = 32; i < 64; i++) x[i] = 0.0f; /* an all-zero block */
    memset(codes, POISON_BYTE, sizeof codes);
    memset(e8m0, POISON_BYTE, sizeof e8m0);
    epmoe_mxfp4_quantize_row(x, K, codes, e8m0);
    epmoe_poison_f32(deq, K);
    epmoe_mxfp4_dequantize_row(codes, e8m0, K, deq);
    for (size_t b = 0; b < K / 32; b++) {
        float amax = epmoe_amax(x + b * 32, 32);
        int want = 0; /* documented: an all-zero block takes code 0 (2^-127) */
        if (amax > 0.0f) {
            int e;
            frexpf(amax, &e); /* amax = m * 2^e, m in [0.5, 1): floor(log2) = e - 1 */
            want = (e - 1) - 2 + 127;
        }
        ck_assert_msg(e8m0[b] == want, "block %zu (amax %g): scale code %u, want %d", b, amax,
                      e8m0[b], want);
        double scale = ldexp(1.0, (int)e8m0[b] - 127);
        for (size_t i = 0; i < 32; i++) {
            size_t k = b * 32 + i;
            double s = fabs((double)x[k]) / scale;
            double bound = (s > 6.0 ? s - 6.0 : e2m1_half_gap(s)) * scale;
            ck_assert_msg(fabs((double)deq[k] - x[k]) <= bound,
                          "element %zu: x=%g dequantized %g (scale 2^%d)", k, x[k], deq[k],
                          (int)e8m0[b] - 127);
            if (amax == 0.0f) ck_assert(nibble(codes, k) == 0);
        }
    }
}
END_TEST

/* Converts [rows, K] MXFP4 (codes, e8m0) and checks the NVFP4 dequantization equals the MXFP4
 * one bit for bit, every block scale a power of two (or 0 for an all-zero block). */
static void convert_and_check(const char *what, const uint8_t *codes, const uint8_t *e8m0,
                              size_t rows, size_t K, epmoe_mxfp4_conversion *info) {
    uint8_t *out = xmalloc(rows * K / 2), *sf = xmalloc(rows * K / 16);
    memset(out, POISON_BYTE, rows * K / 2);
    memset(sf, POISON_BYTE, rows * K / 16);
    float ws2 = epmoe_poison_value();
    epmoe_status st = epmoe_mxfp4_to_nvfp4(codes, e8m0, rows, K, out, sf, &ws2, info);
    ck_assert_msg(st == EPMOE_OK, "%s: %s", what, epmoe_last_error());
    ck_assert(isfinite(ws2) && ws2 > 0.0f);
    int e;
    ck_assert_msg(frexpf(ws2, &e) == 0.5f && e - 1 >= -126, "%s: weight_scale_2 %g", what, ws2);
    for (size_t i = 0; i < rows * K / 16; i++) {
        float v = epmoe_e4m3_to_float(sf[i]);
        int zero_block = 1;
        for (size_t k = i * 16; k < i * 16 + 16; k++) zero_block &= (nibble(codes, k) & 7) == 0;
        if (zero_block) {
            ck_assert_msg(sf[i] == 0, "%s: all-zero block %zu has block_sf 0x%02x", what, i, sf[i]);
            continue;
        }
        ck_assert_msg(v > 0.0f && frexpf(v, &e) == 0.5f,
                      "%s: block_sf %zu = 0x%02x (%g) is not a power of two", what, i, sf[i], v);
    }
    float *mx = xmalloc(K * sizeof(float)), *nv = xmalloc(K * sizeof(float));
    for (size_t r = 0; r < rows; r++) {
        epmoe_poison_f32(mx, K);
        epmoe_poison_f32(nv, K);
        epmoe_mxfp4_dequantize_row(codes + r * K / 2, e8m0 + r * K / 32, K, mx);
        epmoe_nvfp4_dequantize_row(out + r * K / 2, sf + r * K / 16, K, ws2, nv);
        for (size_t k = 0; k < K; k++)
            ck_assert_msg(bits_of(mx[k]) == bits_of(nv[k]) && !isnan(mx[k]),
                          "%s: row %zu element %zu: MXFP4 %g, NVFP4 %g", what, r, k, mx[k], nv[k]);
    }
    free(mx);
    free(nv);
    free(out);
    free(sf);
}

/* Random MXFP4 codes with scales in [e_max - spread, e_max] (spread <= 17: no code moves). */
static void check_conversion(epmoe_rng *rng, int e_max, int spread) {
    enum { ROWS = 5, K = 96 };
    uint8_t codes[ROWS * K / 2], e8m0[ROWS * K / 32];
    for (size_t i = 0; i < sizeof codes; i++) codes[i] = (uint8_t)epmoe_rng_below(rng, 256);
    for (size_t i = 0; i < sizeof e8m0; i++)
        e8m0[i] = (uint8_t)(e_max - (int)epmoe_rng_below(rng, (uint64_t)spread + 1));
    e8m0[3] = (uint8_t)e_max; /* both ends present */
    e8m0[7] = (uint8_t)(e_max - spread);
    char what[64];
    snprintf(what, sizeof what, "e_max %d spread %d", e_max, spread);
    epmoe_mxfp4_conversion info;
    convert_and_check(what, codes, e8m0, ROWS, K, &info);
    ck_assert_uint_eq(info.shifted_blocks, 0);
}

START_TEST(mxfp4_to_nvfp4_is_exact) {
    epmoe_rng rng;
    epmoe_rng_seed(&rng, 11);
    check_conversion(&rng, 127, 17);
    check_conversion(&rng, 130, 5);
    check_conversion(&rng, 254, 17); /* largest scales */
    check_conversion(&rng, 9, 9);    /* smallest tensor scale that is a normal fp32: 2^-126 */
    check_conversion(&rng, 5, 5);    /* 2^(e_top - 8) subnormal: the tensor scale is raised */
    check_conversion(&rng, 100, 0);  /* one exponent everywhere */
}
END_TEST

/* Fills a 16-element block (first = element index, a multiple of 16) with magnitudes drawn from
 * `mags` (E2M1 magnitude indices), random signs. */
static void fill_block(epmoe_rng *rng, uint8_t *codes, size_t first, const int *mags, int n) {
    for (size_t k = first; k < first + 16; k++) {
        uint8_t c = (uint8_t)(mags[epmoe_rng_below(rng, (uint64_t)n)] |
                              (epmoe_rng_below(rng, 2) ? 8 : 0));
        codes[k / 2] = (uint8_t)(k % 2 ? (codes[k / 2] & 0x0f) | (c << 4)
                                       : (codes[k / 2] & 0xf0) | c);
    }
}

/* What real checkpoints hold and the plain conversion refused: all-zero blocks at the smallest
 * scale (2^-127, the OCP rule for amax 0), and blocks far below the rest whose codes can move. */
START_TEST(mxfp4_to_nvfp4_zero_blocks_and_wide_spans) {
    enum { ROWS = 4, K = 128 };
    epmoe_rng rng;
    epmoe_rng_seed(&rng, 5);
    const int any[7] = {1, 2, 3, 4, 5, 6, 7}, small[1] = {1} /* 0.5 */, four[1] = {6} /* 4 */,
              six[1] = {7} /* 6 */;
    uint8_t codes[ROWS * K / 2], e8m0[ROWS * K / 32];
    epmoe_mxfp4_conversion info;

    /* 1. zero blocks at 2^-127 among blocks at 2^-3..2^-10: the span of the nonzero ones is 7 */
    for (size_t b = 0; b < ROWS * K / 32; b++) {
        e8m0[b] = (uint8_t)(127 - 3 - (int)epmoe_rng_below(&rng, 8));
        fill_block(&rng, codes, 32 * b, any, 7);
        fill_block(&rng, codes, 32 * b + 16, any, 7);
    }
    for (size_t b = 1; b < ROWS * K / 32; b += 3) { /* every third 32-block all zero */
        e8m0[b] = 0;
        memset(codes + 16 * b, b % 2 ? 0x00 : 0x88, 16); /* +0 and -0 codes */
    }
    convert_and_check("zero blocks at 2^-127", codes, e8m0, ROWS, K, &info);
    ck_assert_uint_eq(info.zero_blocks, 2 * ((ROWS * K / 32 + 1) / 3));
    ck_assert_uint_eq(info.shifted_blocks, 0);

    /* 2. a block 20 binades below the largest, whose codes are all 4 (4 / 2^3 = 0.5) */
    for (size_t b = 0; b < ROWS * K / 32; b++) {
        e8m0[b] = (uint8_t)(120 - (int)epmoe_rng_below(&rng, 10));
        fill_block(&rng, codes, 32 * b, any, 7);
        fill_block(&rng, codes, 32 * b + 16, any, 7);
    }
    e8m0[0] = 121; /* the largest scale, full codes: anchors the tensor scale at 2^-14 */
    codes[0] = 0x77;
    e8m0[9] = 101; /* 20 below: its NVFP4 power would be 2^-12, so 2^-9 with codes / 8 */
    fill_block(&rng, codes, 32 * 9, four, 1);
    fill_block(&rng, codes, 32 * 9 + 16, four, 1);
    convert_and_check("a block 20 binades down", codes, e8m0, ROWS, K, &info);
    ck_assert_uint_eq(info.shifted_blocks, 2);

    /* 3. the tensor scale itself moves: the top block holds only 0.5s (it can double), a block
     * 20 below holds 6s (they halve twice at most): A = top - 9, top codes doubled. */
    for (size_t b = 0; b < ROWS * K / 32; b++) {
        e8m0[b] = 110;
        fill_block(&rng, codes, 32 * b, any, 7);
        fill_block(&rng, codes, 32 * b + 16, any, 7);
    }
    e8m0[2] = 121;
    fill_block(&rng, codes, 64, small, 1);
    fill_block(&rng, codes, 80, small, 1);
    e8m0[5] = 101;
    fill_block(&rng, codes, 160, six, 1);
    fill_block(&rng, codes, 176, six, 1);
    convert_and_check("top block doubled, low block halved", codes, e8m0, ROWS, K, &info);
    ck_assert_uint_eq(info.shifted_blocks, 4);

    /* 4. nothing but zeros */
    memset(codes, 0, sizeof codes);
    memset(e8m0, 0, sizeof e8m0);
    convert_and_check("all zero", codes, e8m0, ROWS, K, &info);
    ck_assert_uint_eq(info.zero_blocks, ROWS * K / 16);
}
END_TEST

START_TEST(mxfp4_to_nvfp4_errors) {
    /* 2 rows of 96: 6 scales. Block [1, 0] is 18 binades below block [0, 64] and holds a 1.5,
     * which cannot move: no tensor scale serves both. */
    uint8_t codes[2 * 96 / 2], e8m0[6] = {120, 121, 130, 112, 125, 126}, sf[12], out[96];
    memset(codes, 0x22, sizeof codes); /* magnitude 1.0 everywhere */
    codes[48] = 0x73;                  /* element [1, 0] = 1.5, [1, 1] = 6 */
    codes[32] = 0x37;                  /* element [0, 64] = 6 */
    float ws2 = 0.0f;
    epmoe_status st = epmoe_mxfp4_to_nvfp4(codes, e8m0, 2, 96, out, sf, &ws2, NULL);
    ck_assert_msg(st == EPMOE_ERR_UNSUPPORTED, "spread 18 gave %s", epmoe_status_name(st));
    const char *msg = epmoe_last_error();
    ck_assert_msg(strstr(msg, "block [0, 64] (scale 2^3) needs >= 2^-5") != NULL, "%s", msg);
    ck_assert_msg(strstr(msg, "block [1, 0] (scale 2^-15) needs <= 2^-6") != NULL, "%s", msg);
    /* the same tensor with block [1, 0..15] all zero converts */
    codes[48] = 0x00;
    for (int i = 49; i < 56; i++) codes[i] = 0;
    ck_assert_int_eq(epmoe_mxfp4_to_nvfp4(codes, e8m0, 2, 96, out, sf, &ws2, NULL), EPMOE_OK);
    e8m0[0] = 0xff;
    ck_assert_int_eq(epmoe_mxfp4_to_nvfp4(codes, e8m0, 2, 96, out, sf, &ws2, NULL),
                     EPMOE_ERR_NUMERIC);
    ck_assert_int_eq(epmoe_mxfp4_to_nvfp4(codes, e8m0, 2, 48, out, sf, &ws2, NULL),
                     EPMOE_ERR_INVALID_ARG);
    ck_assert_int_eq(epmoe_mxfp4_to_nvfp4(codes, e8m0, 0, 96, out, sf, &ws2, NULL), EPMOE_OK);
}
END_TEST

/* ---- 128x4 swizzle ---- */

static size_t round_up(size_t n, size_t m) { return (n + m - 1) / m * m; }

/* docs/design.md §4.3's layout written as the order the bytes are stored in: 128x4 tiles, row tiles
 * outermost; inside a 512-byte tile, 32 rows of 16 bytes, each holding the same row of the
 * tile's four 32-row groups, 4 columns each. */
static size_t *expected_offsets(size_t rows, size_t cols) {
    size_t R = round_up(rows, 128), C = round_up(cols, 4);
    size_t *off = xmalloc(R * C * sizeof *off), next = 0;
    for (size_t row_tile = 0; row_tile < R / 128; row_tile++)
        for (size_t col_tile = 0; col_tile < C / 4; col_tile++)
            for (size_t r32 = 0; r32 < 32; r32++)
                for (size_t group = 0; group < 4; group++)
                    for (size_t c4 = 0; c4 < 4; c4++)
                        off[(row_tile * 128 + group * 32 + r32) * C + col_tile * 4 + c4] = next++;
    return off;
}

static const size_t shapes[][2] = {{1, 1}, {5, 3}, {32, 4}, {128, 4}, {129, 5},
                                   {300, 9}, {256, 8}, {127, 12}, {1, 17}};

START_TEST(swizzle_offset_matches_design) {
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        size_t rows = shapes[s][0], cols = shapes[s][1];
        size_t R = round_up(rows, 128), C = round_up(cols, 4);
        ck_assert_uint_eq(epmoe_swizzled_sf_size(rows, cols), R * C);
        size_t *want = expected_offsets(rows, cols);
        for (size_t r = 0; r < R; r++)
            for (size_t c = 0; c < C; c++)
                ck_assert_msg(epmoe_swizzled_sf_offset(r, c, cols) == want[r * C + c],
                              "%zux%zu scales: off(%zu, %zu) = %zu, want %zu", rows, cols, r, c,
                              epmoe_swizzled_sf_offset(r, c, cols), want[r * C + c]);
        free(want);
    }
}
END_TEST

START_TEST(swizzle_round_trip_with_zero_padding) {
    epmoe_rng rng;
    epmoe_rng_seed(&rng, 13);
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        size_t rows = shapes[s][0], cols = shapes[s][1];
        size_t size = epmoe_swizzled_sf_size(rows, cols), C = round_up(cols, 4);
        uint8_t *linear = xmalloc(rows * cols), *back = xmalloc(rows * cols);
        uint8_t *swz = xmalloc(size);
        for (size_t i = 0; i < rows * cols; i++)
            linear[i] = (uint8_t)(1 + epmoe_rng_below(&rng, 255)); /* never zero */
        memset(swz, POISON_BYTE, size);
        epmoe_swizzle_sf(linear, rows, cols, swz);
        size_t *want = expected_offsets(rows, cols);
        for (size_t r = 0; r < round_up(rows, 128); r++)
            for (size_t c = 0; c < C; c++) {
                uint8_t v = swz[want[r * C + c]];
                if (r < rows && c < cols)
                    ck_assert_msg(v == linear[r * cols + c], "%zux%zu: (%zu,%zu) swizzled wrong",
                                  rows, cols, r, c);
                else
                    ck_assert_msg(v == 0, "%zux%zu: padding (%zu,%zu) holds 0x%02x", rows, cols,
                                  r, c, v);
            }
        memset(back, POISON_BYTE, rows * cols);
        epmoe_unswizzle_sf(swz, rows, cols, back);
        ck_assert_msg(memcmp(back, linear, rows * cols) == 0, "%zux%zu: unswizzle(swizzle(x)) != x",
                      rows, cols);
        free(want);
        free(linear);
        free(back);
        free(swz);
    }
}
END_TEST

static Suite *nvfp4_suite(void) {
    Suite *s = suite_create("nvfp4");
    TCase *nv = tcase_create("nvfp4");
    tcase_add_test(nv, quantize_matches_numpy_oracle);
    tcase_add_test(nv, round_trip_error_within_half_a_step);
    tcase_add_test(nv, zero_amax_gives_finite_scales_and_zero_codes);
    tcase_add_test(nv, amax_basics);
    tcase_add_test(nv, too_large_global_scale_saturates_without_inf);
    suite_add_tcase(s, nv);
    TCase *mx = tcase_create("mxfp4");
    tcase_add_test(mx, mxfp4_exact_values_round_trip);
    tcase_add_test(mx, mxfp4_random_round_trip);
    tcase_add_test(mx, mxfp4_to_nvfp4_is_exact);
    tcase_add_test(mx, mxfp4_to_nvfp4_zero_blocks_and_wide_spans);
    tcase_add_test(mx, mxfp4_to_nvfp4_errors);
    suite_add_tcase(s, mx);
    TCase *swz = tcase_create("swizzle");
    tcase_add_test(swz, swizzle_offset_matches_design);
    tcase_add_test(swz, swizzle_round_trip_with_zero_padding);
    suite_add_tcase(s, swz);
    return s;
}

int main(void) {
    SRunner *sr = srunner_create(nvfp4_suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
