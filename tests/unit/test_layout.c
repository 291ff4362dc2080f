/* common/layout.c: expert slices per rank, the global->local map, offsets and padded offsets,
 * the padded capacity bound, and the bucket search that maps a row back to its expert (seed
 * bug 2: searchsorted(right=False) put boundary rows in the wrong expert). */
#include <check.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common/dispatch_record.h"
#include "common/layout.h"
#include "common/rng.h"

/* ---- slices --------------------------------------------------------------------------------- */

static void check_slices(int64_t E, int P) {
    epmoe_expert_slice prev = {0, 0};
    int64_t smallest = E, largest = 0;
    for (int r = 0; r < P; r++) {
        epmoe_expert_slice s;
        ck_assert_msg(epmoe_slice_of_rank(E, P, r, &s) == EPMOE_OK, "E=%lld P=%d rank %d",
                      (long long)E, P, r);
        /* Contiguous: each slice starts where the previous one ended, the first at 0. */
        ck_assert_int_eq(s.start, r == 0 ? 0 : prev.end);
        ck_assert_int_gt(s.end, s.start);
        int64_t size = s.end - s.start;
        /* The first E % P ranks own one more. */
        ck_assert_int_eq(size, E / P + (r < E % P ? 1 : 0));
        if (size < smallest) smallest = size;
        if (size > largest) largest = size;
        prev = s;
    }
    ck_assert_int_eq(prev.end, E); /* everything covered */
    ck_assert_int_le(largest - smallest, 1);

    /* owner_of_expert agrees with slice_of_rank for every expert. */
    for (int64_t e = 0; e < E; e++) {
        int owner = -1;
        ck_assert(epmoe_owner_of_expert(E, P, e, &owner) == EPMOE_OK);
        ck_assert_int_ge(owner, 0);
        ck_assert_int_lt(owner, P);
        epmoe_expert_slice s;
        ck_assert(epmoe_slice_of_rank(E, P, owner, &s) == EPMOE_OK);
        ck_assert_msg(e >= s.start && e < s.end,
                      "E=%lld P=%d: expert %lld said to be owned by rank %d, slice [%lld,%lld)",
                      (long long)E, P, (long long)e, owner, (long long)s.start,
                      (long long)s.end);
        int64_t local = -1;
        ck_assert(epmoe_global_to_local(&s, e, &local) == EPMOE_OK);
        ck_assert_int_eq(local, e - s.start);
    }
}

START_TEST(test_slices_E256_E384_P1_to_9) {
    const int64_t Es[2] = {256, 384};
    for (int i = 0; i < 2; i++)
        for (int P = 1; P <= 9; P++) check_slices(Es[i], P);
    check_slices(384, 5);
    check_slices(7, 7);   /* one expert each */
    check_slices(10, 3);  /* 4, 3, 3 */
}
END_TEST

START_TEST(test_slices_384_over_5_exact) {
    const int64_t expect[5][2] = {{0, 77}, {77, 154}, {154, 231}, {231, 308}, {308, 384}};
    for (int r = 0; r < 5; r++) {
        epmoe_expert_slice s;
        ck_assert(epmoe_slice_of_rank(384, 5, r, &s) == EPMOE_OK);
        ck_assert_int_eq(s.start, expect[r][0]);
        ck_assert_int_eq(s.end, expect[r][1]);
    }
    int owner;
    ck_assert(epmoe_owner_of_expert(384, 5, 307, &owner) == EPMOE_OK);
    ck_assert_int_eq(owner, 3);
    ck_assert(epmoe_owner_of_expert(384, 5, 308, &owner) == EPMOE_OK);
    ck_assert_int_eq(owner, 4);
}
END_TEST

START_TEST(test_slice_errors) {
    epmoe_expert_slice s = {-7, -7};
    ck_assert_int_eq(epmoe_slice_of_rank(8, 9, 0, &s), EPMOE_ERR_INVALID_ARG); /* P > E */
    ck_assert_int_eq(epmoe_slice_of_rank(256, 0, 0, &s), EPMOE_ERR_INVALID_ARG);
    ck_assert_int_eq(epmoe_slice_of_rank(256, 4, 4, &s), EPMOE_ERR_RANGE);
    ck_assert_int_eq(epmoe_slice_of_rank(256, 4, -1, &s), EPMOE_ERR_RANGE);
    int owner = -7;
    ck_assert_int_eq(epmoe_owner_of_expert(256, 4, 256, &owner), EPMOE_ERR_RANGE);
    ck_assert_int_eq(epmoe_owner_of_expert(256, 4, -1, &owner), EPMOE_ERR_RANGE);
    ck_assert_int_eq(epmoe_owner_of_expert(8, 9, 0, &owner), EPMOE_ERR_INVALID_ARG);
    ck_assert_int_eq(owner, -7); /* untouched on failure */
}
END_TEST

START_TEST(test_global_to_local_outside_slice) {
    epmoe_expert_slice s;
    ck_assert(epmoe_slice_of_rank(256, 3, 1, &s) == EPMOE_OK); /* [86, 171) */
    ck_assert_int_eq(s.start, 86);
    ck_assert_int_eq(s.end, 171);
    int64_t local = -7;
    ck_assert(epmoe_global_to_local(&s, 86, &local) == EPMOE_OK);
    ck_assert_int_eq(local, 0);
    ck_assert(epmoe_global_to_local(&s, 170, &local) == EPMOE_OK);
    ck_assert_int_eq(local, 84);
    local = -7;
    ck_assert_int_eq(epmoe_global_to_local(&s, 85, &local), EPMOE_ERR_RANGE);
    ck_assert_int_eq(epmoe_global_to_local(&s, 171, &local), EPMOE_ERR_RANGE);
    ck_assert_int_eq(epmoe_global_to_local(&s, 0, &local), EPMOE_ERR_RANGE);
    ck_assert_int_eq(epmoe_global_to_local(&s, -1, &local), EPMOE_ERR_RANGE);
    ck_assert_int_eq(local, -7);
    ck_assert_msg(strstr(epmoe_last_error(), "expert -1") != NULL, "message: %s",
                  epmoe_last_error());
}
END_TEST

/* ---- offsets -------------------------------------------------------------------------------- */

#define MAX_N 400

typedef struct {
    const char *name;
    int64_t n;
    int64_t counts[8];
} counts_case;

static const counts_case offsets_cases[] = {
    {"empties between", 6, {0, 0, 5, 0, 3, 0}},
    {"all in one expert", 5, {0, 0, 17, 0, 0}},
    {"all in the first", 4, {9, 0, 0, 0}},
    {"last expert only", 5, {0, 0, 0, 0, 130}},
    {"none at all", 4, {0, 0, 0, 0}},
    {"one each", 3, {1, 1, 1}},
    {"exact multiples", 4, {128, 0, 256, 127}},
};

static void check_offsets(const int64_t *counts, int64_t n, int64_t pad, const char *name) {
    int64_t offsets[MAX_N + 1], padded[MAX_N + 1];
    for (int64_t i = 0; i <= n; i++) offsets[i] = padded[i] = -999;
    epmoe_offsets_from_counts(counts, n, offsets);
    epmoe_padded_offsets_from_counts(counts, n, pad, padded);
    ck_assert_int_eq(offsets[0], 0);
    ck_assert_int_eq(padded[0], 0);
    int64_t total = 0, padded_total = 0;
    for (int64_t e = 0; e < n; e++) {
        total += counts[e];
        int64_t block = (counts[e] + pad - 1) / pad * pad;
        padded_total += block;
        ck_assert_msg(offsets[e + 1] == total, "%s: offsets[%lld] = %lld, expected %lld", name,
                      (long long)(e + 1), (long long)offsets[e + 1], (long long)total);
        ck_assert_msg(padded[e + 1] == padded_total,
                      "%s pad %lld: padded_offsets[%lld] = %lld, expected %lld", name,
                      (long long)pad, (long long)(e + 1), (long long)padded[e + 1],
                      (long long)padded_total);
        int64_t got_block = padded[e + 1] - padded[e];
        ck_assert_int_eq(got_block % pad, 0);
        ck_assert_int_ge(got_block, counts[e]);
        ck_assert_int_lt(got_block, counts[e] + pad);
        if (counts[e] == 0) ck_assert_int_eq(got_block, 0); /* empty experts take no rows */
        ck_assert_int_eq(padded[e] % pad, 0);               /* blocks start aligned */
    }
    if (pad == 1)
        for (int64_t i = 0; i <= n; i++) ck_assert_int_eq(padded[i], offsets[i]);
    ck_assert_int_le(padded[n], epmoe_padded_capacity(total, n, pad));
}

START_TEST(test_offsets_and_padded_offsets_edge_cases) {
    const int64_t pads[3] = {128, 1, 16};
    for (size_t c = 0; c < sizeof offsets_cases / sizeof offsets_cases[0]; c++)
        for (int i = 0; i < 3; i++)
            check_offsets(offsets_cases[c].counts, offsets_cases[c].n, pads[i],
                          offsets_cases[c].name);

    /* Spelled out for pad = 128. */
    const int64_t counts[6] = {0, 0, 5, 0, 130, 0};
    int64_t padded[7];
    epmoe_padded_offsets_from_counts(counts, 6, 128, padded);
    const int64_t expect[7] = {0, 0, 0, 128, 128, 384, 384};
    for (int i = 0; i < 7; i++) ck_assert_int_eq(padded[i], expect[i]);
}
END_TEST

START_TEST(test_padded_capacity_never_exceeded) {
    epmoe_rng rng;
    epmoe_rng_seed(&rng, 31);
    const int64_t pads[4] = {1, 16, 128, 7};
    int64_t counts[MAX_N], padded[MAX_N + 1];
    for (int trial = 0; trial < 400; trial++) {
        int64_t n = 1 + (int64_t)epmoe_rng_below(&rng, 384);
        int64_t rows = (int64_t)epmoe_rng_below(&rng, 5000);
        int64_t pad = pads[trial % 4];
        for (int64_t e = 0; e < n; e++) counts[e] = 0;
        /* Skewed: half the trials pile most rows onto a few experts. */
        int64_t hot = trial % 2 ? 1 + (int64_t)epmoe_rng_below(&rng, 3) : n;
        for (int64_t r = 0; r < rows; r++) counts[epmoe_rng_below(&rng, (uint64_t)hot) % n]++;
        epmoe_padded_offsets_from_counts(counts, n, pad, padded);
        ck_assert_msg(padded[n] <= epmoe_padded_capacity(rows, n, pad),
                      "n=%lld rows=%lld pad=%lld: padded %lld > capacity %lld", (long long)n,
                      (long long)rows, (long long)pad, (long long)padded[n],
                      (long long)epmoe_padded_capacity(rows, n, pad));
    }
    /* The bound is tight: every expert one row past a multiple of pad. */
    const int64_t n = 256, pad = 128;
    for (int64_t e = 0; e < n; e++) counts[e] = 1 + (e % 3) * pad;
    int64_t rows = 0;
    for (int64_t e = 0; e < n; e++) rows += counts[e];
    epmoe_padded_offsets_from_counts(counts, n, pad, padded);
    ck_assert_int_eq(padded[n], epmoe_padded_capacity(rows, n, pad));
}
END_TEST

/* ---- bucket search -------------------------------------------------------------------------- */

static int64_t linear_expert_of_row(const int64_t *offsets, int64_t n, int64_t row) {
    for (int64_t e = 0; e < n; e++)
        if (offsets[e] <= row && row < offsets[e + 1]) return e;
    return -1;
}

static void check_bucket_search(const int64_t *offsets, int64_t n, const char *name) {
    for (int64_t row = -3; row < offsets[n] + 3; row++) {
        int64_t got = epmoe_expert_of_row(offsets, n, row);
        int64_t want = linear_expert_of_row(offsets, n, row);
        ck_assert_msg(got == want, "%s: row %lld in expert %lld, linear scan says %lld", name,
                      (long long)row, (long long)got, (long long)want);
    }
    /* The boundary rows themselves: the first row of every non-empty expert is that expert's
     * (searchsorted with right=False returned the previous one), the last row too. */
    for (int64_t e = 0; e < n; e++) {
        if (offsets[e + 1] == offsets[e]) continue;
        ck_assert_int_eq(epmoe_expert_of_row(offsets, n, offsets[e]), e);
        ck_assert_int_eq(epmoe_expert_of_row(offsets, n, offsets[e + 1] - 1), e);
    }
}

START_TEST(test_expert_of_row_matches_linear_scan) {
    int64_t offsets[MAX_N + 1];
    const int64_t pads[2] = {1, 128};
    for (size_t c = 0; c < sizeof offsets_cases / sizeof offsets_cases[0]; c++) {
        const counts_case *cc = &offsets_cases[c];
        epmoe_offsets_from_counts(cc->counts, cc->n, offsets);
        check_bucket_search(offsets, cc->n, cc->name);
        for (int i = 0; i < 2; i++) {
            epmoe_padded_offsets_from_counts(cc->counts, cc->n, pads[i], offsets);
            check_bucket_search(offsets, cc->n, cc->name);
        }
    }
    /* n = 0: no rows at all. */
    offsets[0] = 0;
    ck_assert_int_eq(epmoe_expert_of_row(offsets, 0, 0), -1);

    /* Random counts with many empty experts, including runs of them at both ends. */
    epmoe_rng rng;
    epmoe_rng_seed(&rng, 47);
    int64_t counts[MAX_N];
    for (int trial = 0; trial < 50; trial++) {
        int64_t n = 1 + (int64_t)epmoe_rng_below(&rng, 300);
        for (int64_t e = 0; e < n; e++)
            counts[e] = epmoe_rng_below(&rng, 3) == 0 ? (int64_t)epmoe_rng_below(&rng, 9) : 0;
        counts[0] = 0;
        counts[n - 1] = trial % 2 ? 0 : 1 + (int64_t)epmoe_rng_below(&rng, 4);
        epmoe_offsets_from_counts(counts, n, offsets);
        check_bucket_search(offsets, n, "random");
        epmoe_padded_offsets_from_counts(counts, n, 16, offsets);
        check_bucket_search(offsets, n, "random padded");
    }
}
END_TEST

/* The GPU dispatch record (common/dispatch_record.h): every field aligned for the copies that move
 * it (codes 16 bytes, block scales 2, 1/gs and the ids 4, the record 16) at DeepSeek's widths
 * and gpt-oss's (2880 = 45 x 64; 160 = 2.5 x 64 puts 1/gs after a 2-byte gap). */
START_TEST(test_dispatch_record_alignment) {
    const int64_t widths[] = {256, 4096, 7168, 2880, 160, 32};
    for (size_t i = 0; i < sizeof widths / sizeof widths[0]; i++) {
        const int64_t H = widths[i];
        epmoe_dispatch_record r;
        ck_assert_int_eq(epmoe_dispatch_record_layout(EPMOE_WIRE_NVFP4, H, 6, &r), EPMOE_OK);
        ck_assert_int_eq(r.codes_offset % 16, 0);
        ck_assert_int_eq(r.sf_offset, r.codes_offset + H / 2);
        ck_assert_int_eq(r.sf_offset % 2, 0);
        ck_assert_int_eq(r.inv_gs_offset % 4, 0);
        ck_assert(r.inv_gs_offset >= r.sf_offset + H / 16 && r.inv_gs_offset < r.sf_offset + H / 16 + 4);
        ck_assert_int_eq(r.meta_offset, r.inv_gs_offset + 4);
        ck_assert_int_eq(r.payload_bytes, r.meta_offset);
        ck_assert(r.bytes % 16 == 0 && r.bytes >= r.meta_offset + 4 * 6 && r.bytes < r.meta_offset + 4 * 6 + 16);
        if (H % 64 == 0) ck_assert_int_eq(r.payload_bytes, H / 2 + H / 16 + 4);
    }
    epmoe_dispatch_record r;
    ck_assert_int_eq(epmoe_dispatch_record_layout(EPMOE_WIRE_NVFP4, 48, 6, &r), EPMOE_ERR_INVALID_ARG);
    ck_assert_int_eq(epmoe_dispatch_record_layout(EPMOE_WIRE_F32, 2880, 4, &r), EPMOE_OK);
    ck_assert_int_eq(r.payload_bytes, 4 * 2880);
}
END_TEST

static Suite *layout_suite(void) {
    Suite *s = suite_create("layout");
    TCase *tc = tcase_create("core");
    tcase_add_test(tc, test_slices_E256_E384_P1_to_9);
    tcase_add_test(tc, test_slices_384_over_5_exact);
    tcase_add_test(tc, test_slice_errors);
    tcase_add_test(tc, test_global_to_local_outside_slice);
    tcase_add_test(tc, test_offsets_and_padded_offsets_edge_cases);
    tcase_add_test(tc, test_padded_capacity_never_exceeded);
    tcase_add_test(tc, test_expert_of_row_matches_linear_scan);
    tcase_add_test(tc, test_dispatch_record_alignment);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) {
    SRunner *sr = srunner_create(layout_suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
