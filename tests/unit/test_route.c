/* Routing: gate logits, top-k (DeepSeek-V4 sqrtsoftplus, DeepSeek-V3 sigmoid with group limit,
 * gpt-oss topk_softmax), hash routing and their errors, against a plain float64 reference written here (full sorts,
 * no shared code with kernels/cpu/route.c). Random inputs are regenerated until the reference
 * keys have clear gaps, so that fp32 and fp64 must agree on every id and on the slot order. */
#include <check.h>
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/config.h"
#include "common/rng.h"
#include "kernels/ops.h"
#include "tests/support/test_support.h"

#define ID_POISON INT32_MIN
/* Smallest gap between reference keys (and group scores) that decide the result. fp32 scores
 * of O(1) carry errors of ~1e-7, so 1e-5 leaves no room for a legitimate fp32/fp64 flip. */
#define MIN_GAP 1e-5

/* ---- the float64 reference ------------------------------------------------------------------ */

typedef struct {
    double key;
    int id;
} keyed;

static int by_key_desc_then_id(const void *a, const void *b) {
    const keyed *x = a, *y = b;
    if (x->key > y->key) return -1;
    if (x->key < y->key) return 1;
    return (x->id > y->id) - (x->id < y->id);
}

static double ref_score(int64_t scoring, double l) {
    if (scoring == EPMOE_SCORING_TOPK_SOFTMAX) return l; /* gpt-oss ranks the logits */
    if (scoring == EPMOE_SCORING_SIGMOID) return 1.0 / (1.0 + exp(-l));
    return sqrt(log1p(exp(l)));
}

typedef struct {
    int ids[64];
    double weights[64];
    unsigned char group_kept[64];
    double group_score[64];
    double min_gap; /* smallest gap among the keys and group scores that decide ids and order */
} ref_result;

static void ref_route(const epmoe_route_params *p, const float *logits, const float *bias,
                      ref_result *r) {
    int E = (int)p->n_experts, k = (int)p->top_k, G = (int)p->n_groups;
    int per_group = E / G;
    double *s = malloc((size_t)E * sizeof *s);
    keyed *all = malloc((size_t)E * sizeof *all);
    ck_assert_ptr_nonnull(s);
    ck_assert_ptr_nonnull(all);
    for (int e = 0; e < E; e++) {
        s[e] = ref_score(p->scoring, logits[e]);
        all[e].key = s[e] + (bias ? bias[e] : 0.0);
        all[e].id = e;
    }
    r->min_gap = INFINITY;
    for (int g = 0; g < G; g++) r->group_kept[g] = 1;
    if (G > 1) {
        keyed groups[64];
        for (int g = 0; g < G; g++) {
            keyed *members = malloc((size_t)per_group * sizeof *members);
            ck_assert_ptr_nonnull(members);
            memcpy(members, all + g * per_group, (size_t)per_group * sizeof *members);
            qsort(members, (size_t)per_group, sizeof *members, by_key_desc_then_id);
            groups[g].key = members[0].key + members[1].key;
            groups[g].id = g;
            r->group_score[g] = groups[g].key;
            free(members);
        }
        qsort(groups, (size_t)G, sizeof groups[0], by_key_desc_then_id);
        for (int g = 0; g < G; g++) r->group_kept[g] = 0;
        for (int i = 0; i < p->topk_groups; i++) r->group_kept[groups[i].id] = 1;
        /* Which groups are kept must not depend on rounding. */
        int gap_upto = p->topk_groups < G ? (int)p->topk_groups : G - 1;
        for (int i = 0; i < gap_upto; i++)
            r->min_gap = fmin(r->min_gap, groups[i].key - groups[i + 1].key);
    }
    int n = 0;
    for (int e = 0; e < E; e++)
        if (r->group_kept[e / per_group]) all[n++] = all[e];
    qsort(all, (size_t)n, sizeof *all, by_key_desc_then_id);
    double sum = 0;
    for (int j = 0; j < k; j++) {
        r->ids[j] = all[j].id;
        sum += s[all[j].id];
    }
    for (int j = 0; j < k; j++) r->weights[j] = s[r->ids[j]] / sum * p->routed_scaling_factor;
    if (p->scoring == EPMOE_SCORING_TOPK_SOFTMAX) {
        /* gpt-oss: softmax over the k chosen keys, logit + bias (GptOssTopKRouter: F.linear with
         * its bias, topk, softmax of the top values) */
        double z = 0;
        for (int j = 0; j < k; j++) z += exp(all[j].key);
        for (int j = 0; j < k; j++)
            r->weights[j] = exp(all[j].key) / z * p->routed_scaling_factor;
    }
    int gap_upto = k < n ? k : n - 1;
    for (int j = 0; j < gap_upto; j++) r->min_gap = fmin(r->min_gap, all[j].key - all[j + 1].key);
    free(s);
    free(all);
}

/* ---- helpers -------------------------------------------------------------------------------- */

static epmoe_route_params make_params(int64_t E, int64_t k, int64_t scoring, int64_t G,
                                      int64_t keep, float scale) {
    epmoe_route_params p = {.n_experts = E, .top_k = k, .scoring = scoring, .n_groups = G,
                            .topk_groups = keep, .routed_scaling_factor = scale};
    return p;
}

static void poison_ids(int32_t *ids, size_t n) {
    for (size_t i = 0; i < n; i++) ids[i] = ID_POISON;
}

/* Random logits for T tokens, each token regenerated until its reference result has clear
 * gaps; the reference results are returned in refs[T]. */
static void make_gapped_inputs(epmoe_rng *rng, const epmoe_route_params *p, const float *bias,
                               int64_t T, float stddev, float *logits, ref_result *refs) {
    int64_t E = p->n_experts;
    for (int64_t t = 0; t < T; t++) {
        int tries = 0;
        do {
            ck_assert_msg(tries++ < 1000, "could not draw gapped logits for token %lld",
                          (long long)t);
            epmoe_fill_normal(rng, logits + t * E, (size_t)E, stddev);
            ref_route(p, logits + t * E, bias, &refs[t]);
        } while (!(refs[t].min_gap > MIN_GAP));
    }
}

/* Every slot written; ids exactly the reference's, in order; weights close to the reference;
 * weights sum to routed_scaling_factor within fp32 rounding. */
static void check_against_ref(const epmoe_route_params *p, int64_t T, const int32_t *ids,
                              const float *weights, const ref_result *refs) {
    int64_t k = p->top_k;
    ck_assert_uint_eq(epmoe_count_unwritten_f32(weights, (size_t)(T * k)), 0);
    for (int64_t t = 0; t < T; t++) {
        double wsum = 0;
        for (int64_t j = 0; j < k; j++) {
            ck_assert_msg(ids[t * k + j] == refs[t].ids[j],
                          "token %lld slot %lld: id %d, reference %d", (long long)t,
                          (long long)j, ids[t * k + j], refs[t].ids[j]);
            double w = weights[t * k + j], rw = refs[t].weights[j];
            ck_assert_msg(fabs(w - rw) <= 1e-5 * fabs(rw),
                          "token %lld slot %lld: weight %.9g, reference %.9g", (long long)t,
                          (long long)j, w, rw);
            wsum += w;
        }
        double rsf = p->routed_scaling_factor;
        ck_assert_msg(fabs(wsum - rsf) <= 4.0 * (double)k * FLT_EPSILON * rsf,
                      "token %lld: weights sum to %.9g, not %g", (long long)t, wsum, rsf);
    }
}

static void run_random_case(int64_t E, int64_t k, int64_t scoring, int64_t G, int64_t keep,
                            float scale, int with_bias, uint64_t seed) {
    const int64_t T = 48;
    epmoe_route_params p = make_params(E, k, scoring, G, keep, scale);
    epmoe_rng rng;
    epmoe_rng_seed(&rng, seed);
    float *logits = malloc((size_t)(T * E) * sizeof(float));
    float *bias = malloc((size_t)E * sizeof(float));
    int32_t *ids = malloc((size_t)(T * k) * sizeof(int32_t));
    float *weights = malloc((size_t)(T * k) * sizeof(float));
    ref_result *refs = malloc((size_t)T * sizeof *refs);
    ck_assert(logits && bias && ids && weights && refs);
    /* Bias comparable to the spread of the scores, so that it changes some selections. */
    epmoe_fill_uniform(&rng, bias, (size_t)E, -0.3f, 0.3f);
    const float *b = with_bias ? bias : NULL;
    make_gapped_inputs(&rng, &p, b, T, 1.5f, logits, refs);

    poison_ids(ids, (size_t)(T * k));
    epmoe_poison_f32(weights, (size_t)(T * k));
    epmoe_status st = epmoe_cpu_route(&p, logits, b, T, ids, weights);
    ck_assert_msg(st == EPMOE_OK, "%s", epmoe_last_error());
    check_against_ref(&p, T, ids, weights, refs);

    free(logits);
    free(bias);
    free(ids);
    free(weights);
    free(refs);
}

/* ---- gate logits ---------------------------------------------------------------------------- */

/* The definition of kernels/ops.h restated independently: the chunk partials first, each an
 * fmaf chain from +0 in increasing h, then their sum in chunk order starting from 0. */
static float blocked_logit(const float *xt, const float *we, int64_t H) {
    int64_t n_chunks = (H + EPMOE_GATE_CHUNK - 1) / EPMOE_GATE_CHUNK;
    float partial[512];
    ck_assert_int_le(n_chunks, 512);
    for (int64_t c = 0; c < n_chunks; c++) {
        int64_t end = (c + 1) * EPMOE_GATE_CHUNK;
        if (end > H) end = H;
        partial[c] = 0.0f;
        for (int64_t h = c * EPMOE_GATE_CHUNK; h < end; h++)
            partial[c] = fmaf(xt[h], we[h], partial[c]);
    }
    float sum = 0.0f;
    for (int64_t c = 0; c < n_chunks; c++) sum = sum + partial[c];
    return sum;
}

static void assert_same_bits(const float *got, const float *want, int64_t n, const char *what,
                             int64_t H) {
    for (int64_t i = 0; i < n; i++)
        ck_assert_msg(memcmp(&got[i], &want[i], sizeof(float)) == 0,
                      "%s, H=%lld: logit %lld = %.9g, the blocked order gives %.9g", what,
                      (long long)H, (long long)i, got[i], want[i]);
}

/* Both CPU implementations (the plain one and the panels the engine uses) give the blocked
 * order's bits for H below, at and around multiples of the chunk and at the models' sizes, and
 * stay within fp32 accuracy of the float64 sum. */
START_TEST(test_gate_logits_blocked_order_and_accuracy) {
    const int64_t Hs[] = {1, 7, 100, EPMOE_GATE_CHUNK - 1, EPMOE_GATE_CHUNK, EPMOE_GATE_CHUNK + 1,
                          301, 2880, 4096, 7168};
    const int64_t T = 6, E = 37; /* a panel and a half; T one more than a row block */
    epmoe_rng rng;
    epmoe_rng_seed(&rng, 11);
    for (size_t n = 0; n < sizeof Hs / sizeof Hs[0]; n++) {
        const int64_t H = Hs[n];
        float *x = malloc((size_t)(T * H) * sizeof(float));
        float *w = malloc((size_t)(E * H) * sizeof(float));
        float *want = malloc((size_t)(T * E) * sizeof(float));
        float *got = malloc((size_t)(T * E) * sizeof(float));
        float *panels = malloc(epmoe_cpu_panels_floats(E, H) * sizeof(float));
        ck_assert(x && w && want && got && panels);
        epmoe_fill_normal(&rng, x, (size_t)(T * H), 1.0f);
        epmoe_fill_normal(&rng, w, (size_t)(E * H), 0.05f);
        for (int64_t t = 0; t < T; t++)
            for (int64_t e = 0; e < E; e++) {
                want[t * E + e] = blocked_logit(x + t * H, w + e * H, H);
                double exact = 0, magnitude = 0;
                for (int64_t h = 0; h < H; h++) {
                    exact += (double)x[t * H + h] * w[e * H + h];
                    magnitude += fabs((double)x[t * H + h] * w[e * H + h]);
                }
                ck_assert_msg(fabs(want[t * E + e] - exact) <= 1e-5 * magnitude,
                              "H=%lld logit [%lld,%lld] = %.9g, float64 %.9g", (long long)H,
                              (long long)t, (long long)e, want[t * E + e], exact);
            }

        epmoe_poison_f32(got, (size_t)(T * E));
        epmoe_cpu_gate_logits(x, w, T, H, E, got);
        assert_same_bits(got, want, T * E, "epmoe_cpu_gate_logits", H);

        epmoe_cpu_pack_panels(w, E, H, panels);
        epmoe_poison_f32(got, (size_t)(T * E));
        epmoe_cpu_gate_logits_panels(x, T, H, panels, E, got);
        assert_same_bits(got, want, T * E, "epmoe_cpu_gate_logits_panels", H);
        free(x), free(w), free(want), free(got), free(panels);
    }
}
END_TEST

/* A token's logits are a function of its row alone: the same bits whether it is computed
 * alone, first or last in a batch, or inside a row block of the panel version or its tail. */
START_TEST(test_gate_logits_batch_invariant) {
    const int64_t H = 2880, E = 40, T = 11;
    epmoe_rng rng;
    epmoe_rng_seed(&rng, 12);
    float *x = malloc((size_t)(T * H) * sizeof(float));
    float *w = malloc((size_t)(E * H) * sizeof(float));
    float *all = malloc((size_t)(T * E) * sizeof(float));
    float *some = malloc((size_t)(T * E) * sizeof(float));
    float *panels = malloc(epmoe_cpu_panels_floats(E, H) * sizeof(float));
    ck_assert(x && w && all && some && panels);
    epmoe_fill_normal(&rng, x, (size_t)(T * H), 1.0f);
    epmoe_fill_normal(&rng, w, (size_t)(E * H), 0.05f);
    epmoe_cpu_pack_panels(w, E, H, panels);
    epmoe_cpu_gate_logits(x, w, T, H, E, all);
    for (int panel_version = 0; panel_version < 2; panel_version++) {
        /* every window [t0, t0 + n) of the batch, computed as a batch of its own */
        for (int64_t n = 1; n <= T; n++)
            for (int64_t t0 = 0; t0 + n <= T; t0++) {
                epmoe_poison_f32(some, (size_t)(n * E));
                if (panel_version)
                    epmoe_cpu_gate_logits_panels(x + t0 * H, n, H, panels, E, some);
                else
                    epmoe_cpu_gate_logits(x + t0 * H, w, n, H, E, some);
                ck_assert_msg(memcmp(some, all + t0 * E, (size_t)(n * E) * sizeof(float)) == 0,
                              "%s: tokens [%lld, %lld) computed as a batch of %lld differ from "
                              "the batch of %lld",
                              panel_version ? "panels" : "plain", (long long)t0,
                              (long long)(t0 + n), (long long)n, (long long)T);
            }
    }
    free(x), free(w), free(all), free(some), free(panels);
}
END_TEST

/* ---- score-based routing against the reference ---------------------------------------------- */

START_TEST(test_route_sqrtsoftplus_E256_k6) {
    run_random_case(256, 6, EPMOE_SCORING_SQRTSOFTPLUS, 1, 1, 1.5f, 1, 101);
    run_random_case(256, 6, EPMOE_SCORING_SQRTSOFTPLUS, 1, 1, 1.5f, 0, 102);
}
END_TEST

START_TEST(test_route_sqrtsoftplus_E384_k6) {
    run_random_case(384, 6, EPMOE_SCORING_SQRTSOFTPLUS, 1, 1, 2.5f, 1, 201);
    run_random_case(384, 6, EPMOE_SCORING_SQRTSOFTPLUS, 1, 1, 2.5f, 0, 202);
}
END_TEST

START_TEST(test_route_sigmoid_without_groups) {
    run_random_case(256, 8, EPMOE_SCORING_SIGMOID, 1, 1, 2.5f, 1, 301);
}
END_TEST

START_TEST(test_route_dsv3_group_limit) {
    const int64_t E = 256, k = 8, G = 8, keep = 4, T = 64, per_group = E / G;
    epmoe_route_params p = make_params(E, k, EPMOE_SCORING_SIGMOID, G, keep, 2.5f);
    epmoe_rng rng;
    epmoe_rng_seed(&rng, 401);
    float *logits = malloc((size_t)(T * E) * sizeof(float));
    float bias[256];
    int32_t ids[64 * 8];
    float weights[64 * 8];
    ref_result *refs = malloc((size_t)T * sizeof *refs);
    ck_assert(logits && refs);
    epmoe_fill_uniform(&rng, bias, (size_t)E, -0.1f, 0.1f);
    make_gapped_inputs(&rng, &p, bias, T, 2.0f, logits, refs);
    poison_ids(ids, (size_t)(T * k));
    epmoe_poison_f32(weights, (size_t)(T * k));
    ck_assert_msg(epmoe_cpu_route(&p, logits, bias, T, ids, weights) == EPMOE_OK, "%s",
                  epmoe_last_error());
    check_against_ref(&p, T, ids, weights, refs);

    int limited = 0;
    for (int64_t t = 0; t < T; t++) {
        const ref_result *r = &refs[t];
        int n_kept = 0;
        for (int64_t g = 0; g < G; g++) n_kept += r->group_kept[g];
        ck_assert_int_eq(n_kept, keep);
        /* The kept groups are those with the best top-2 sums. */
        for (int64_t g = 0; g < G; g++)
            for (int64_t h = 0; h < G; h++)
                if (r->group_kept[g] && !r->group_kept[h])
                    ck_assert_msg(r->group_score[g] > r->group_score[h],
                                  "token %lld: kept group %lld scores %.9g <= dropped %lld %.9g",
                                  (long long)t, (long long)g, r->group_score[g], (long long)h,
                                  r->group_score[h]);
        /* Every chosen expert lies in a kept group. */
        for (int64_t j = 0; j < k; j++)
            ck_assert_msg(r->group_kept[ids[t * k + j] / per_group],
                          "token %lld: expert %d is in a dropped group", (long long)t,
                          ids[t * k + j]);
        /* Count tokens where the limit mattered: the unlimited top-k would differ. */
        epmoe_route_params flat = p;
        flat.n_groups = 1;
        ref_result unlimited;
        ref_route(&flat, logits + t * E, bias, &unlimited);
        if (memcmp(unlimited.ids, r->ids, (size_t)k * sizeof(int)) != 0) limited++;
    }
    /* Otherwise this test would not distinguish group-limited from plain top-k. */
    ck_assert_msg(limited > 0, "no token where the group limit changed the choice");
    free(logits);
    free(refs);
}
END_TEST

/* A group with one outstanding expert loses to groups with two good ones: the plain top-8
 * would take the outstanding expert, the group-limited rule must not. */
START_TEST(test_route_dsv3_top2_sum_not_max) {
    const int64_t E = 256, k = 8, G = 8, keep = 4, per_group = 32;
    epmoe_route_params p = make_params(E, k, EPMOE_SCORING_SIGMOID, G, keep, 2.5f);
    float logits[256];
    for (int64_t e = 0; e < E; e++) logits[e] = -4.0f - 0.01f * (float)(e % per_group);
    logits[7 * per_group + 5] = 6.0f; /* group 7: one very good expert, the rest poor */
    /* groups 1, 2, 4, 6: two good experts each, graded so that the order is clear */
    const int good_groups[4] = {1, 2, 4, 6};
    for (int i = 0; i < 4; i++) {
        int g = good_groups[i];
        logits[g * per_group + 3] = 2.0f - 0.1f * (float)i;
        logits[g * per_group + 20] = 1.5f - 0.1f * (float)i;
    }
    int32_t ids[8];
    float weights[8];
    poison_ids(ids, 8);
    epmoe_poison_f32(weights, 8);
    ck_assert_msg(epmoe_cpu_route(&p, logits, NULL, 1, ids, weights) == EPMOE_OK, "%s",
                  epmoe_last_error());
    const int32_t expect[8] = {1 * 32 + 3,  2 * 32 + 3,  4 * 32 + 3,  6 * 32 + 3,
                               1 * 32 + 20, 2 * 32 + 20, 4 * 32 + 20, 6 * 32 + 20};
    for (int j = 0; j < 8; j++) ck_assert_int_eq(ids[j], expect[j]);
    ck_assert_uint_eq(epmoe_count_unwritten_f32(weights, 8), 0);

    /* Without the group limit the outstanding expert comes first. */
    p.n_groups = 1;
    poison_ids(ids, 8);
    ck_assert(epmoe_cpu_route(&p, logits, NULL, 1, ids, weights) == EPMOE_OK);
    ck_assert_int_eq(ids[0], 7 * 32 + 5);
}
END_TEST

/* ---- ties ----------------------------------------------------------------------------------- */

START_TEST(test_route_ties_go_to_lower_ids) {
    const int64_t E = 256, k = 6;
    epmoe_route_params p = make_params(E, k, EPMOE_SCORING_SQRTSOFTPLUS, 1, 1, 1.5f);
    float logits[256];
    int32_t ids[8];
    float weights[8];

    /* All equal: experts 0..k-1 in order, equal weights. */
    for (int64_t e = 0; e < E; e++) logits[e] = 0.75f;
    poison_ids(ids, 8);
    epmoe_poison_f32(weights, 8);
    ck_assert(epmoe_cpu_route(&p, logits, NULL, 1, ids, weights) == EPMOE_OK);
    for (int j = 0; j < k; j++) {
        ck_assert_int_eq(ids[j], j);
        ck_assert_float_eq_tol(weights[j], 1.5f / 6.0f, 2e-7f);
        ck_assert(weights[j] == weights[0]);
    }

    /* A tied best set scattered over the ids, then a tied second set: lower ids first within
     * each, and the second set cut off at k. */
    for (int64_t e = 0; e < E; e++) logits[e] = -1.0f - 0.001f * (float)(e % 17);
    const int best[4] = {200, 50, 100, 7};
    const int second[4] = {255, 3, 128, 90};
    for (int i = 0; i < 4; i++) logits[best[i]] = 3.0f;
    for (int i = 0; i < 4; i++) logits[second[i]] = 2.0f;
    poison_ids(ids, 8);
    ck_assert(epmoe_cpu_route(&p, logits, NULL, 1, ids, weights) == EPMOE_OK);
    const int32_t expect[6] = {7, 50, 100, 200, 3, 90};
    for (int j = 0; j < k; j++) ck_assert_int_eq(ids[j], expect[j]);

    /* The bias lifts expert 4 above expert 9; the other 254 experts tie. */
    float bias[256];
    for (int64_t e = 0; e < E; e++) {
        logits[e] = -2.0f;
        bias[e] = 0.0f;
    }
    logits[9] = 1.0f;  /* s(1) ~ 1.1446 */
    logits[4] = 0.0f;  /* s(0) ~ 0.8326 */
    bias[4] = 1.0f;    /* 4 now well ahead of 9 */
    bias[9] = 0.0f;
    poison_ids(ids, 8);
    ck_assert(epmoe_cpu_route(&p, logits, bias, 1, ids, weights) == EPMOE_OK);
    ck_assert_int_eq(ids[0], 4);
    ck_assert_int_eq(ids[1], 9);
    /* The remaining 254 experts are tied: 0, 1, 2, 3 (lowest ids not already chosen). */
    const int32_t rest[4] = {0, 1, 2, 3};
    for (int j = 0; j < 4; j++) ck_assert_int_eq(ids[2 + j], rest[j]);
}
END_TEST

START_TEST(test_route_group_ties_go_to_lower_groups) {
    const int64_t E = 256, k = 8;
    epmoe_route_params p = make_params(E, k, EPMOE_SCORING_SIGMOID, 8, 4, 2.5f);
    float logits[256];
    int32_t ids[8];
    float weights[8];
    for (int64_t e = 0; e < E; e++) logits[e] = 0.5f;
    poison_ids(ids, 8);
    epmoe_poison_f32(weights, 8);
    ck_assert(epmoe_cpu_route(&p, logits, NULL, 1, ids, weights) == EPMOE_OK);
    for (int j = 0; j < 8; j++) ck_assert_int_eq(ids[j], j);

    /* Groups 6, 5, 3, 2, 1 tie on their top-2 sum and beat the rest; only four are kept, so
     * group 6 (the highest index) goes. Within a tied group every expert has s = 0.5 but one
     * (the last, s = sigmoid(1)). Group 0 holds an equally good expert but a poor second one:
     * it is dropped, so that expert is not chosen although its key ties for the best. */
    for (int64_t e = 0; e < E; e++) logits[e] = -3.0f;
    const int tied_groups[5] = {6, 5, 3, 2, 1};
    for (int i = 0; i < 5; i++) {
        int g = tied_groups[i];
        for (int m = 0; m < 32; m++) logits[g * 32 + m] = 0.0f;
        logits[g * 32 + 31] = 1.0f;
    }
    logits[0 * 32 + 10] = 1.0f;
    poison_ids(ids, 8);
    ck_assert(epmoe_cpu_route(&p, logits, NULL, 1, ids, weights) == EPMOE_OK);
    const int32_t expect[8] = {1 * 32 + 31, 2 * 32 + 31, 3 * 32 + 31, 5 * 32 + 31,
                               1 * 32 + 0,  1 * 32 + 1,  1 * 32 + 2,  1 * 32 + 3};
    for (int j = 0; j < 8; j++) ck_assert_int_eq(ids[j], expect[j]);
}
END_TEST

/* ---- bias steers selection, not weights ----------------------------------------------------- */

START_TEST(test_route_bias_steers_selection_not_weights) {
    const int64_t E = 256, k = 6, T = 16;
    epmoe_route_params p = make_params(E, k, EPMOE_SCORING_SQRTSOFTPLUS, 1, 1, 1.5f);
    epmoe_rng rng;
    epmoe_rng_seed(&rng, 501);
    float *logits = malloc((size_t)(T * E) * sizeof(float));
    ref_result *refs = malloc((size_t)T * sizeof *refs);
    ck_assert(logits && refs);
    make_gapped_inputs(&rng, &p, NULL, T, 1.0f, logits, refs);

    /* Large, distinct biases on six experts: they are chosen in bias order whatever the
     * logits, and their weights come from s alone. */
    float bias[256] = {0};
    const int favored[6] = {150, 3, 255, 17, 99, 201};
    for (int i = 0; i < 6; i++) bias[favored[i]] = 100.0f - 10.0f * (float)i;
    int32_t ids[16 * 6];
    float weights[16 * 6];
    poison_ids(ids, (size_t)(T * k));
    epmoe_poison_f32(weights, (size_t)(T * k));
    ck_assert(epmoe_cpu_route(&p, logits, bias, T, ids, weights) == EPMOE_OK);
    for (int64_t t = 0; t < T; t++) {
        double s[6], sum = 0;
        for (int j = 0; j < 6; j++) {
            ck_assert_int_eq(ids[t * k + j], favored[j]);
            s[j] = ref_score(p.scoring, logits[t * E + favored[j]]);
            sum += s[j];
        }
        for (int j = 0; j < 6; j++) {
            double rw = s[j] / sum * 1.5;
            ck_assert_msg(fabs(weights[t * k + j] - rw) <= 1e-5 * rw,
                          "token %lld slot %d: weight %.9g, from s only %.9g", (long long)t, j,
                          (double)weights[t * k + j], rw);
        }
    }

    /* The same bias on every expert changes nothing: ids and weights bit-identical to no bias. */
    float flat_bias[256];
    for (int64_t e = 0; e < E; e++) flat_bias[e] = 0.25f;
    int32_t ids_plain[16 * 6], ids_flat[16 * 6];
    float w_plain[16 * 6], w_flat[16 * 6];
    poison_ids(ids_plain, (size_t)(T * k));
    poison_ids(ids_flat, (size_t)(T * k));
    epmoe_poison_f32(w_plain, (size_t)(T * k));
    epmoe_poison_f32(w_flat, (size_t)(T * k));
    ck_assert(epmoe_cpu_route(&p, logits, NULL, T, ids_plain, w_plain) == EPMOE_OK);
    ck_assert(epmoe_cpu_route(&p, logits, flat_bias, T, ids_flat, w_flat) == EPMOE_OK);
    check_against_ref(&p, T, ids_plain, w_plain, refs);
    ck_assert(memcmp(ids_plain, ids_flat, sizeof ids_plain) == 0);
    ck_assert(memcmp(w_plain, w_flat, sizeof w_plain) == 0);
    free(logits);
    free(refs);
}
END_TEST

/* ---- hash routing --------------------------------------------------------------------------- */

/* tid2eid[vocab][k] with k distinct experts per row. */
static void make_hash_table(epmoe_rng *rng, int64_t vocab, int64_t k, int64_t E, int32_t *table) {
    for (int64_t v = 0; v < vocab; v++) {
        for (int64_t j = 0; j < k; j++) {
            int32_t e;
            int dup;
            do {
                e = (int32_t)epmoe_rng_below(rng, (uint64_t)E);
                dup = 0;
                for (int64_t i = 0; i < j; i++) dup |= table[v * k + i] == e;
            } while (dup);
            table[v * k + j] = e;
        }
    }
}

START_TEST(test_route_hash_ids_are_table_rows) {
    const int64_t E = 256, k = 6, vocab = 50, T = 40;
    epmoe_route_params p = make_params(E, k, EPMOE_SCORING_SQRTSOFTPLUS, 1, 1, 1.5f);
    epmoe_rng rng;
    epmoe_rng_seed(&rng, 601);
    int32_t table[50 * 6], token_ids[40], ids[40 * 6];
    float weights[40 * 6];
    float *logits = malloc((size_t)(T * E) * sizeof(float));
    ck_assert_ptr_nonnull(logits);
    make_hash_table(&rng, vocab, k, E, table);
    for (int64_t t = 0; t < T; t++) token_ids[t] = (int32_t)epmoe_rng_below(&rng, vocab);
    token_ids[0] = 0;
    token_ids[1] = (int32_t)vocab - 1;
    epmoe_fill_normal(&rng, logits, (size_t)(T * E), 2.0f);
    poison_ids(ids, (size_t)(T * k));
    epmoe_poison_f32(weights, (size_t)(T * k));
    ck_assert_msg(epmoe_cpu_route_hash(&p, logits, table, vocab, token_ids, T, ids, weights) ==
                      EPMOE_OK,
                  "%s", epmoe_last_error());
    ck_assert_uint_eq(epmoe_count_unwritten_f32(weights, (size_t)(T * k)), 0);
    for (int64_t t = 0; t < T; t++) {
        const int32_t *row = table + token_ids[t] * k;
        double s[6], sum = 0, wsum = 0;
        for (int64_t j = 0; j < k; j++) {
            ck_assert_int_eq(ids[t * k + j], row[j]);
            s[j] = ref_score(p.scoring, logits[t * E + row[j]]);
            sum += s[j];
        }
        for (int64_t j = 0; j < k; j++) {
            double rw = s[j] / sum * 1.5;
            ck_assert_msg(fabs(weights[t * k + j] - rw) <= 1e-5 * rw,
                          "token %lld slot %lld: weight %.9g, reference %.9g", (long long)t,
                          (long long)j, (double)weights[t * k + j], rw);
            wsum += weights[t * k + j];
        }
        ck_assert(fabs(wsum - 1.5) <= 4.0 * 6 * FLT_EPSILON * 1.5);
    }
    free(logits);
}
END_TEST

/* ---- very negative logits ------------------------------------------------------------------- */

/* Every chosen logit far below 0: the fp32 scores underflow (to subnormals below about -87, to 0
 * below -88.7 for sigmoid and -104 for sqrtsoftplus), yet the weights are ratios of scores and
 * the float64 reference gives them to full precision. The implementation normalizes in log
 * space, so its weights must match the reference to fp32 rounding (a few ulps) at every level,
 * with score-based routing (ids decided by a bias with clear gaps: fp32 and fp64 keys are the
 * bias plus a negligible score) and with hash routing (ids from the table). */
#define DEEP_WEIGHT_REL_TOL 2e-6

static void check_deep_weights(const char *what, int64_t scoring, float rsf, const float *row,
                               const int32_t *ids, const float *weights, int64_t k) {
    double s[32], sum = 0, wsum = 0;
    for (int64_t j = 0; j < k; j++) {
        s[j] = ref_score(scoring, row[ids[j]]);
        sum += s[j];
    }
    for (int64_t j = 0; j < k; j++) {
        double rw = s[j] / sum * rsf, w = weights[j];
        ck_assert_msg(isfinite(w) && fabs(w - rw) <= DEEP_WEIGHT_REL_TOL * rw,
                      "%s: slot %lld (logit %.9g): weight %.9g, float64 reference %.9g "
                      "(rel err %.3g)",
                      what, (long long)j, (double)row[ids[j]], w, rw, fabs(w - rw) / rw);
        wsum += w;
    }
    ck_assert_msg(fabs(wsum - rsf) <= 4.0 * (double)k * FLT_EPSILON * rsf,
                  "%s: weights sum to %.9g, not %g", what, wsum, (double)rsf);
}

START_TEST(test_route_weights_at_very_negative_logits) {
    const int64_t E = 256, k = 6, T = 8, vocab = 16;
    const float levels[] = {-80.0f, -95.0f, -110.0f, -200.0f};
    const int64_t scorings[] = {EPMOE_SCORING_SQRTSOFTPLUS, EPMOE_SCORING_SIGMOID};
    epmoe_rng rng;
    epmoe_rng_seed(&rng, 811);
    float *logits = malloc((size_t)(T * E) * sizeof(float));
    float bias[256];
    int32_t order[256], table[16 * 6], token_ids[8], ids[8 * 6];
    float weights[8 * 6];
    ck_assert_ptr_nonnull(logits);
    /* bias = a random permutation of 0, 0.01, ..., 2.55: ids follow it, the top k by bias */
    for (int64_t e = 0; e < E; e++) order[e] = (int32_t)e;
    for (int64_t e = E - 1; e > 0; e--) {
        int64_t o = (int64_t)epmoe_rng_below(&rng, (uint64_t)(e + 1));
        int32_t tmp = order[e];
        order[e] = order[o];
        order[o] = tmp;
    }
    for (int64_t e = 0; e < E; e++) bias[order[e]] = 0.01f * (float)e;
    make_hash_table(&rng, vocab, k, E, table);
    for (int64_t t = 0; t < T; t++) token_ids[t] = (int32_t)epmoe_rng_below(&rng, vocab);
    for (int si = 0; si < 2; si++) {
        epmoe_route_params p = make_params(E, k, scorings[si], 1, 1, 2.5f);
        for (int li = 0; li < 4; li++) {
            /* level +- 3: the weights differ by up to e^6 (sigmoid) or e^3 (sqrtsoftplus) */
            for (int64_t i = 0; i < T * E; i++)
                logits[i] = levels[li] + 6.0f * (epmoe_rng_uniform(&rng) - 0.5f);
            char what[96];
            snprintf(what, sizeof what, "%s logits %g +- 3", si ? "sigmoid" : "sqrtsoftplus",
                     (double)levels[li]);
            poison_ids(ids, (size_t)(T * k));
            epmoe_poison_f32(weights, (size_t)(T * k));
            epmoe_status st = epmoe_cpu_route(&p, logits, bias, T, ids, weights);
            ck_assert_msg(st == EPMOE_OK, "%s: %s", what, epmoe_last_error());
            for (int64_t t = 0; t < T; t++) {
                for (int64_t j = 0; j < k; j++) /* the k largest biases, in order */
                    ck_assert_msg(ids[t * k + j] == order[E - 1 - j],
                                  "%s: token %lld slot %lld: id %d, expected %d", what,
                                  (long long)t, (long long)j, ids[t * k + j], order[E - 1 - j]);
                check_deep_weights(what, p.scoring, p.routed_scaling_factor, logits + t * E,
                                   ids + t * k, weights + t * k, k);
            }
            epmoe_poison_f32(weights, (size_t)(T * k));
            st = epmoe_cpu_route_hash(&p, logits, table, vocab, token_ids, T, ids, weights);
            ck_assert_msg(st == EPMOE_OK, "%s (hash): %s", what, epmoe_last_error());
            for (int64_t t = 0; t < T; t++)
                check_deep_weights(what, p.scoring, p.routed_scaling_factor, logits + t * E,
                                   ids + t * k, weights + t * k, k);
        }
    }
    /* Mixed: one chosen logit near 0, the others at -200: their weights are ~e^-100 (sigmoid)
     * of the first one's, finite and positive, not NaN from a 0/0. */
    epmoe_route_params sig = make_params(E, k, EPMOE_SCORING_SIGMOID, 1, 1, 2.5f);
    for (int64_t i = 0; i < T * E; i++) logits[i] = -200.0f;
    logits[order[E - 1]] = 0.5f;
    ck_assert(epmoe_cpu_route(&sig, logits, bias, 1, ids, weights) == EPMOE_OK);
    ck_assert_int_eq(ids[0], order[E - 1]);
    ck_assert_msg(fabs(weights[0] - 2.5) <= 4 * FLT_EPSILON * 2.5, "weight %.9g", (double)weights[0]);
    for (int64_t j = 1; j < k; j++) ck_assert(weights[j] >= 0.0f && isfinite(weights[j]));
    free(logits);
}
END_TEST

/* ---- errors --------------------------------------------------------------------------------- */

static int message_has(const char *needle) { return strstr(epmoe_last_error(), needle) != NULL; }

START_TEST(test_route_rejects_non_finite_logits) {
    const int64_t E = 256, k = 6, T = 5;
    epmoe_route_params p = make_params(E, k, EPMOE_SCORING_SQRTSOFTPLUS, 1, 1, 1.5f);
    epmoe_rng rng;
    epmoe_rng_seed(&rng, 701);
    float logits[5 * 256];
    int32_t ids[5 * 6];
    float weights[5 * 6];
    const float bad[3] = {NAN, INFINITY, -INFINITY};
    for (int i = 0; i < 3; i++) {
        epmoe_fill_normal(&rng, logits, (size_t)(T * E), 1.0f);
        logits[3 * E + 17] = bad[i];
        epmoe_clear_error();
        ck_assert_int_eq(epmoe_cpu_route(&p, logits, NULL, T, ids, weights), EPMOE_ERR_NUMERIC);
        ck_assert_msg(message_has("token 3,") && message_has("expert 17"), "message: %s",
                      epmoe_last_error());

        int32_t table[4 * 6] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11,
                                12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23};
        int32_t tokens[5] = {0, 1, 2, 3, 0};
        epmoe_clear_error();
        ck_assert_int_eq(epmoe_cpu_route_hash(&p, logits, table, 4, tokens, T, ids, weights),
                         EPMOE_ERR_NUMERIC);
        ck_assert_msg(message_has("token 3,"), "message: %s", epmoe_last_error());
    }

    /* Non-finite bias is named by expert. */
    float bias[256] = {0};
    bias[42] = NAN;
    epmoe_fill_normal(&rng, logits, (size_t)(T * E), 1.0f);
    ck_assert_int_eq(epmoe_cpu_route(&p, logits, bias, T, ids, weights), EPMOE_ERR_NUMERIC);
    ck_assert_msg(message_has("expert 42"), "message: %s", epmoe_last_error());

}
END_TEST

START_TEST(test_route_hash_rejects_bad_tokens_and_tables) {
    const int64_t E = 256, k = 6, vocab = 8, T = 4;
    epmoe_route_params p = make_params(E, k, EPMOE_SCORING_SQRTSOFTPLUS, 1, 1, 1.5f);
    epmoe_rng rng;
    epmoe_rng_seed(&rng, 801);
    int32_t table[8 * 6];
    make_hash_table(&rng, vocab, k, E, table);
    float logits[4 * 256];
    epmoe_fill_normal(&rng, logits, (size_t)(T * E), 1.0f);
    int32_t ids[4 * 6];
    float weights[4 * 6];

    int32_t tokens[4] = {1, 2, 8, 3}; /* token 2 has id == vocab */
    ck_assert_int_eq(epmoe_cpu_route_hash(&p, logits, table, vocab, tokens, T, ids, weights),
                     EPMOE_ERR_RANGE);
    ck_assert_msg(message_has("token 2 ") && message_has("token id 8"), "message: %s",
                  epmoe_last_error());
    tokens[2] = -1;
    ck_assert_int_eq(epmoe_cpu_route_hash(&p, logits, table, vocab, tokens, T, ids, weights),
                     EPMOE_ERR_RANGE);
    ck_assert_msg(message_has("token id -1"), "message: %s", epmoe_last_error());
    tokens[2] = 5;

    int32_t saved = table[5 * k + 4];
    table[5 * k + 4] = (int32_t)E;
    ck_assert_int_eq(epmoe_cpu_route_hash(&p, logits, table, vocab, tokens, T, ids, weights),
                     EPMOE_ERR_RANGE);
    ck_assert_msg(message_has("token 2 ") && message_has("= 256"), "message: %s",
                  epmoe_last_error());
    table[5 * k + 4] = -3;
    ck_assert_int_eq(epmoe_cpu_route_hash(&p, logits, table, vocab, tokens, T, ids, weights),
                     EPMOE_ERR_RANGE);
    ck_assert_msg(message_has("= -3"), "message: %s", epmoe_last_error());

    table[5 * k + 4] = table[5 * k + 1]; /* duplicate expert in a row */
    ck_assert_int_eq(epmoe_cpu_route_hash(&p, logits, table, vocab, tokens, T, ids, weights),
                     EPMOE_ERR_FORMAT);
    ck_assert_msg(message_has("twice"), "message: %s", epmoe_last_error());

    table[5 * k + 4] = saved;
    ck_assert_int_eq(epmoe_cpu_route_hash(&p, logits, table, vocab, tokens, T, ids, weights),
                     EPMOE_OK);
}
END_TEST

START_TEST(test_route_topk_softmax_gptoss_shapes) {
    run_random_case(32, 4, EPMOE_SCORING_TOPK_SOFTMAX, 1, 1, 1.0f, 1, 31);  /* gpt-oss-20b */
    run_random_case(128, 4, EPMOE_SCORING_TOPK_SOFTMAX, 1, 1, 1.0f, 1, 32); /* gpt-oss-120b */
    run_random_case(32, 4, EPMOE_SCORING_TOPK_SOFTMAX, 1, 1, 1.0f, 0, 33);  /* no bias */
    run_random_case(48, 5, EPMOE_SCORING_TOPK_SOFTMAX, 1, 1, 2.0f, 1, 34);  /* factor applied */
}
END_TEST

/* gpt-oss's bias is part of the logits: it picks the experts AND enters the softmax (DeepSeek's
 * only picks them). Hand values. */
START_TEST(test_route_topk_softmax_bias_enters_weights) {
    epmoe_route_params p = make_params(4, 2, EPMOE_SCORING_TOPK_SOFTMAX, 1, 1, 1.0f);
    const float logits[4] = {1.0f, 0.5f, 0.25f, 0.0f}, bias[4] = {0.0f, 0.0f, 1.0f, 0.0f};
    int32_t ids[2] = {ID_POISON, ID_POISON};
    float w[2];
    epmoe_poison_f32(w, 2);
    ck_assert_int_eq(epmoe_cpu_route(&p, logits, bias, 1, ids, w), EPMOE_OK);
    ck_assert_int_eq(ids[0], 2); /* key 1.25 */
    ck_assert_int_eq(ids[1], 0); /* key 1.0 */
    const double e = exp(0.25);  /* softmax(1.25, 1.0) */
    ck_assert_double_eq_tol(w[0], e / (1.0 + e), 1e-7);
    ck_assert_double_eq_tol(w[1], 1.0 / (1.0 + e), 1e-7);
    /* the unbiased logits of the same two (0.25, 1.0) would weigh them the other way round */
    ck_assert(w[0] > w[1]);
    /* without a bias: experts 0 and 1, softmax(1.0, 0.5) */
    ck_assert_int_eq(epmoe_cpu_route(&p, logits, NULL, 1, ids, w), EPMOE_OK);
    ck_assert_int_eq(ids[0], 0);
    ck_assert_int_eq(ids[1], 1);
    ck_assert_double_eq_tol(w[0], 1.0 / (1.0 + exp(-0.5)), 1e-7);
}
END_TEST

/* Equal logits: ids in increasing order, weights exactly 1/k; far apart logits (|l| ~ 80, where
 * expf(l) itself would overflow or underflow) stay finite and sum to 1. */
START_TEST(test_route_topk_softmax_ties_and_extremes) {
    epmoe_route_params p = make_params(32, 4, EPMOE_SCORING_TOPK_SOFTMAX, 1, 1, 1.0f);
    float logits[2 * 32];
    for (int e = 0; e < 32; e++) logits[e] = 3.0f;
    for (int e = 0; e < 32; e++) logits[32 + e] = e == 9 ? 90.0f : (e == 20 ? 89.0f : -80.0f);
    int32_t ids[8];
    float w[8];
    poison_ids(ids, 8);
    epmoe_poison_f32(w, 8);
    ck_assert_int_eq(epmoe_cpu_route(&p, logits, NULL, 2, ids, w), EPMOE_OK);
    for (int j = 0; j < 4; j++) {
        ck_assert_int_eq(ids[j], j);
        ck_assert(w[j] == 0.25f);
    }
    ck_assert_int_eq(ids[4], 9);
    ck_assert_int_eq(ids[5], 20);
    ck_assert_int_eq(ids[6], 0); /* the -80 ties go to the lower ids */
    ck_assert_int_eq(ids[7], 1);
    ck_assert_double_eq_tol(w[4], 1.0 / (1.0 + exp(-1.0)), 1e-6);
    ck_assert(isfinite(w[6]) && w[6] >= 0.0f && w[6] < 1e-30f);
    ck_assert_double_eq_tol((double)w[4] + w[5] + w[6] + w[7], 1.0, 1e-6);
}
END_TEST

START_TEST(test_route_topk_softmax_refuses_groups_and_hash) {
    float logits[32] = {0};
    int32_t ids[8], table[4 * 4] = {0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3}, tok[1] = {0};
    float w[8];
    epmoe_route_params grouped = make_params(32, 4, EPMOE_SCORING_TOPK_SOFTMAX, 4, 2, 1.0f);
    ck_assert_int_eq(epmoe_cpu_route(&grouped, logits, NULL, 1, ids, w), EPMOE_ERR_INVALID_ARG);
    ck_assert_msg(strstr(epmoe_last_error(), "group") != NULL, "%s", epmoe_last_error());
    epmoe_route_params p = make_params(32, 4, EPMOE_SCORING_TOPK_SOFTMAX, 1, 1, 1.0f);
    ck_assert_int_eq(epmoe_cpu_route_hash(&p, logits, table, 4, tok, 1, ids, w),
                     EPMOE_ERR_INVALID_ARG);
    ck_assert_msg(strstr(epmoe_last_error(), "hash") != NULL, "%s", epmoe_last_error());
}
END_TEST

START_TEST(test_route_rejects_bad_params) {
    float logits[256] = {0};
    int32_t ids[256];
    float weights[256];
    epmoe_route_params bad[5] = {
        make_params(256, 0, EPMOE_SCORING_SQRTSOFTPLUS, 1, 1, 1.5f),   /* k = 0 */
        make_params(4, 6, EPMOE_SCORING_SQRTSOFTPLUS, 1, 1, 1.5f),     /* k > E */
        make_params(256, 8, EPMOE_SCORING_SIGMOID, 7, 4, 2.5f),        /* 7 does not divide 256 */
        make_params(256, 8, EPMOE_SCORING_SIGMOID, 128, 3, 2.5f),      /* 3 groups x 2 < 8 */
        make_params(256, 8, EPMOE_SCORING_SIGMOID, 8, 9, 2.5f),        /* keep > groups */
    };
    for (int i = 0; i < 5; i++)
        ck_assert_msg(epmoe_cpu_route(&bad[i], logits, NULL, 1, ids, weights) ==
                          EPMOE_ERR_INVALID_ARG,
                      "params %d accepted", i);
}
END_TEST

START_TEST(test_route_params_from_presets) {
    epmoe_config cfg;
    ck_assert(epmoe_config_preset(&cfg, "dsv3") == EPMOE_OK);
    epmoe_route_params p = epmoe_route_params_from_config(&cfg);
    ck_assert_int_eq(p.n_experts, 256);
    ck_assert_int_eq(p.top_k, 8);
    ck_assert_int_eq(p.scoring, EPMOE_SCORING_SIGMOID);
    ck_assert_int_eq(p.n_groups, 8);
    ck_assert_int_eq(p.topk_groups, 4);
    ck_assert(p.routed_scaling_factor == 2.5f);
    ck_assert(epmoe_config_preset(&cfg, "dsv4-pro") == EPMOE_OK);
    p = epmoe_route_params_from_config(&cfg);
    ck_assert_int_eq(p.n_experts, 384);
    ck_assert_int_eq(p.top_k, 6);
    ck_assert_int_eq(p.scoring, EPMOE_SCORING_SQRTSOFTPLUS);
    ck_assert_int_eq(p.n_groups, 1);
    ck_assert(p.routed_scaling_factor == 2.5f);
    ck_assert(epmoe_config_preset(&cfg, "gpt-oss-20b") == EPMOE_OK);
    p = epmoe_route_params_from_config(&cfg);
    ck_assert_int_eq(p.n_experts, 32);
    ck_assert_int_eq(p.top_k, 4);
    ck_assert_int_eq(p.scoring, EPMOE_SCORING_TOPK_SOFTMAX);
    ck_assert_int_eq(p.n_groups, 1);
    ck_assert(p.routed_scaling_factor == 1.0f);
}
END_TEST

static Suite *route_suite(void) {
    Suite *s = suite_create("route");
    TCase *tc = tcase_create("core");
    tcase_add_test(tc, test_gate_logits_blocked_order_and_accuracy);
    tcase_add_test(tc, test_gate_logits_batch_invariant);
    tcase_add_test(tc, test_route_sqrtsoftplus_E256_k6);
    tcase_add_test(tc, test_route_sqrtsoftplus_E384_k6);
    tcase_add_test(tc, test_route_sigmoid_without_groups);
    tcase_add_test(tc, test_route_dsv3_group_limit);
    tcase_add_test(tc, test_route_dsv3_top2_sum_not_max);
    tcase_add_test(tc, test_route_ties_go_to_lower_ids);
    tcase_add_test(tc, test_route_group_ties_go_to_lower_groups);
    tcase_add_test(tc, test_route_bias_steers_selection_not_weights);
    tcase_add_test(tc, test_route_hash_ids_are_table_rows);
    tcase_add_test(tc, test_route_weights_at_very_negative_logits);
    tcase_add_test(tc, test_route_rejects_non_finite_logits);
    tcase_add_test(tc, test_route_hash_rejects_bad_tokens_and_tables);
    tcase_add_test(tc, test_route_rejects_bad_params);
    tcase_add_test(tc, test_route_params_from_presets);
    tcase_add_test(tc, test_route_topk_softmax_gptoss_shapes);
    tcase_add_test(tc, test_route_topk_softmax_bias_enters_weights);
    tcase_add_test(tc, test_route_topk_softmax_ties_and_extremes);
    tcase_add_test(tc, test_route_topk_softmax_refuses_groups_and_hash);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) {
    SRunner *sr = srunner_create(route_suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
