/* Gate logits and top-k routing on the CPU. These are the definitions the CUDA kernels are
 * tested against bit for bit, so every floating-point operation here happens in a fixed order
 * (see kernels/ops.h): nothing depends on threading, vector width or summation trees. */
#include "kernels/ops.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>

epmoe_route_params epmoe_route_params_from_config(const epmoe_config *cfg) {
    epmoe_route_params p;
    p.n_experts = cfg->n_routed_experts;
    p.top_k = cfg->top_k;
    p.scoring = cfg->scoring;
    p.n_groups = cfg->n_groups;
    p.topk_groups = cfg->topk_groups;
    p.routed_scaling_factor = (float)cfg->routed_scaling_factor;
    return p;
}

/* One chunk's partial sum: an fmaf chain in increasing h from +0. */
static float chunk_partial(const float *xt, const float *we, int64_t h0, int64_t h1) {
    float acc = 0.0f;
    for (int64_t h = h0; h < h1; h++) acc = fmaf(xt[h], we[h], acc);
    return acc;
}

void epmoe_cpu_gate_logits(const float *x, const float *gate_weight, int64_t T, int64_t H,
                           int64_t E, float *logits) {
    for (int64_t t = 0; t < T; t++) {
        const float *xt = x + t * H;
        for (int64_t e = 0; e < E; e++) {
            const float *we = gate_weight + e * H;
            float logit = 0.0f;
            for (int64_t h0 = 0; h0 < H; h0 += EPMOE_GATE_CHUNK) {
                int64_t h1 = H - h0 < EPMOE_GATE_CHUNK ? H : h0 + EPMOE_GATE_CHUNK;
                logit = logit + chunk_partial(xt, we, h0, h1);
            }
            logits[t * E + e] = logit;
        }
    }
}

/* topk_softmax (gpt-oss) ranks the logits themselves: its score is the logit. */
static float score_of_logit(int64_t scoring, float l) {
    if (scoring == EPMOE_SCORING_TOPK_SOFTMAX) return l;
    if (scoring == EPMOE_SCORING_SIGMOID) return 1.0f / (1.0f + expf(-l));
    float softplus = l > 20.0f ? l : log1pf(expf(l));
    return sqrtf(softplus);
}

static epmoe_status check_route_params(const epmoe_route_params *p) {
    EPMOE_REQUIRE(p->n_experts >= 1 && p->n_experts <= INT32_MAX, EPMOE_ERR_INVALID_ARG,
                  "routing: n_experts %lld outside [1, %d]", (long long)p->n_experts, INT32_MAX);
    EPMOE_REQUIRE(p->top_k >= 1 && p->top_k <= p->n_experts, EPMOE_ERR_INVALID_ARG,
                  "routing: top_k %lld outside [1, n_experts=%lld]", (long long)p->top_k,
                  (long long)p->n_experts);
    EPMOE_REQUIRE(p->scoring == EPMOE_SCORING_SQRTSOFTPLUS || p->scoring == EPMOE_SCORING_SIGMOID ||
                      p->scoring == EPMOE_SCORING_TOPK_SOFTMAX,
                  EPMOE_ERR_INVALID_ARG, "routing: unknown scoring %lld", (long long)p->scoring);
    EPMOE_REQUIRE(p->scoring != EPMOE_SCORING_TOPK_SOFTMAX || p->n_groups == 1,
                  EPMOE_ERR_INVALID_ARG,
                  "routing: topk_softmax has no group limit (n_groups %lld, must be 1)",
                  (long long)p->n_groups);
    EPMOE_REQUIRE(p->n_groups >= 1 && p->n_experts % p->n_groups == 0, EPMOE_ERR_INVALID_ARG,
                  "routing: n_groups %lld does not divide n_experts %lld", (long long)p->n_groups,
                  (long long)p->n_experts);
    if (p->n_groups > 1) {
        int64_t per_group = p->n_experts / p->n_groups;
        EPMOE_REQUIRE(p->topk_groups >= 1 && p->topk_groups <= p->n_groups,
                      EPMOE_ERR_INVALID_ARG, "routing: topk_groups %lld outside [1, n_groups=%lld]",
                      (long long)p->topk_groups, (long long)p->n_groups);
        /* A group's score is the sum of its two best experts. */
        EPMOE_REQUIRE(per_group >= 2, EPMOE_ERR_INVALID_ARG,
                      "routing: group-limited routing needs >= 2 experts per group (has %lld)",
                      (long long)per_group);
        EPMOE_REQUIRE(p->topk_groups * per_group >= p->top_k, EPMOE_ERR_INVALID_ARG,
                      "routing: topk_groups %lld x %lld experts per group < top_k %lld",
                      (long long)p->topk_groups, (long long)per_group, (long long)p->top_k);
    }
    EPMOE_REQUIRE(isfinite(p->routed_scaling_factor), EPMOE_ERR_INVALID_ARG,
                  "routing: routed_scaling_factor is %g", (double)p->routed_scaling_factor);
    return EPMOE_OK;
}

static epmoe_status check_logits_row(const float *row, int64_t E, int64_t t) {
    for (int64_t e = 0; e < E; e++)
        EPMOE_REQUIRE(isfinite(row[e]), EPMOE_ERR_NUMERIC,
                      "routing: gate logit of token %lld, expert %lld is %g (must be finite)",
                      (long long)t, (long long)e, (double)row[e]);
    return EPMOE_OK;
}

/* Keeps the best `cap` (id, key) pairs seen so far in best_ids/best_keys, sorted by key
 * descending. Candidates arrive in increasing id, and a candidate only displaces strictly
 * smaller keys, so equal keys stay in id order: ties go to the lower id. */
static void topk_insert(int32_t *best_ids, float *best_keys, int64_t *count, int64_t cap,
                        int32_t id, float key) {
    int64_t n = *count;
    if (n == cap && !(key > best_keys[n - 1])) return;
    int64_t pos = n < cap ? n : cap - 1;
    while (pos > 0 && key > best_keys[pos - 1]) {
        best_ids[pos] = best_ids[pos - 1];
        best_keys[pos] = best_keys[pos - 1];
        pos--;
    }
    best_ids[pos] = id;
    best_keys[pos] = key;
    if (n < cap) *count = n + 1;
}

/* log s, finite for every finite logit. The scores themselves underflow: sigmoid below about
 * -87 (to subnormals, then to 0 at -88.7 where expf(-l) overflows), sqrtsoftplus below about
 * -87 (softplus = expf(l) subnormal, sqrt of it imprecise) and to 0 at -104.
 *   sigmoid:      log s = l - softplus(l) for l < 0 (expf(l) < 1, cannot overflow),
 *                         -softplus(-l)   for l >= 0;
 *   sqrtsoftplus: log s = log(softplus(l)) / 2, and for l < -20 log(softplus(l)) =
 *                 l + log1p(-expf(l)/2 + ...) rounds to l (expf(l)/2 < 1e-9, under half an ulp
 *                 of |l|), so it is l / 2 exactly there. */
static float log_score_of_logit(int64_t scoring, float l) {
    if (scoring == EPMOE_SCORING_TOPK_SOFTMAX) return l; /* given l + bias: softmax's exponent */
    if (scoring == EPMOE_SCORING_SIGMOID) return l < 0.0f ? l - log1pf(expf(l)) : -log1pf(expf(-l));
    if (l < -20.0f) return 0.5f * l;
    return 0.5f * logf(l > 20.0f ? l : log1pf(expf(l)));
}

/* w_j = s_j / (sum over slots of s) * routed_scaling_factor, computed as r_j = expf(log s_j -
 * max log s) / (sum of r in slot order) * routed_scaling_factor: the largest r is 1, so the
 * sum is at least 1 however negative the logits (scaling by the largest chosen score, in log
 * space where it cannot underflow). kernels/cuda/route.cu does the same operations.
 * topk_softmax passes the keys l + bias as logits_row and takes log s = key: then this is
 * exactly softmax over the k chosen keys (max subtracted), times the factor (1 for gpt-oss). */
static void write_weights(const float *logits_row, const int32_t *ids, int64_t k,
                          int64_t scoring, float routed_scaling_factor, float *weights) {
    float max_log = -INFINITY;
    for (int64_t j = 0; j < k; j++) {
        weights[j] = log_score_of_logit(scoring, logits_row[ids[j]]);
        if (weights[j] > max_log) max_log = weights[j];
    }
    float sum = 0.0f;
    for (int64_t j = 0; j < k; j++) {
        weights[j] = expf(weights[j] - max_log);
        sum += weights[j];
    }
    for (int64_t j = 0; j < k; j++) weights[j] = weights[j] / sum * routed_scaling_factor;
}

typedef struct {
    float *scores;         /* [E] s */
    float *keys;           /* [E] s + bias */
    int32_t *best_ids;     /* [k] */
    float *best_keys;      /* [k] */
    int32_t *group_ids;    /* [topk_groups] */
    float *group_keys;     /* [topk_groups] */
    unsigned char *group_kept; /* [n_groups] */
} route_scratch;

static void free_scratch(route_scratch *s) {
    free(s->scores);
    free(s->keys);
    free(s->best_ids);
    free(s->best_keys);
    free(s->group_ids);
    free(s->group_keys);
    free(s->group_kept);
}

static epmoe_status alloc_scratch(const epmoe_route_params *p, route_scratch *s) {
    size_t E = (size_t)p->n_experts, k = (size_t)p->top_k, G = (size_t)p->n_groups;
    size_t kg = p->n_groups > 1 ? (size_t)p->topk_groups : 1;
    s->scores = malloc(E * sizeof(float));
    s->keys = malloc(E * sizeof(float));
    s->best_ids = malloc(k * sizeof(int32_t));
    s->best_keys = malloc(k * sizeof(float));
    s->group_ids = malloc(kg * sizeof(int32_t));
    s->group_keys = malloc(kg * sizeof(float));
    s->group_kept = malloc(G);
    if (!s->scores || !s->keys || !s->best_ids || !s->best_keys || !s->group_ids ||
        !s->group_keys || !s->group_kept) {
        free_scratch(s);
        EPMOE_FAIL(EPMOE_ERR_OOM, "routing: scratch for %zu experts, top_k %zu", E, k);
    }
    return EPMOE_OK;
}

/* DeepSeek-V3 group limit: a group's key is the sum of its two best (s + bias); the
 * topk_groups best groups (ties to the lower group index) stay eligible. */
static void select_groups(const epmoe_route_params *p, route_scratch *s) {
    int64_t G = p->n_groups, per_group = p->n_experts / G;
    int64_t kept = 0;
    for (int64_t g = 0; g < G; g++) {
        const float *keys = s->keys + g * per_group;
        float first = keys[0] >= keys[1] ? keys[0] : keys[1];
        float second = keys[0] >= keys[1] ? keys[1] : keys[0];
        for (int64_t i = 2; i < per_group; i++) {
            if (keys[i] > first) {
                second = first;
                first = keys[i];
            } else if (keys[i] > second) {
                second = keys[i];
            }
        }
        topk_insert(s->group_ids, s->group_keys, &kept, p->topk_groups, (int32_t)g,
                    first + second);
    }
    for (int64_t g = 0; g < G; g++) s->group_kept[g] = 0;
    for (int64_t i = 0; i < kept; i++) s->group_kept[s->group_ids[i]] = 1;
}

epmoe_status epmoe_cpu_route(const epmoe_route_params *p, const float *logits,
                             const float *bias, int64_t T, int32_t *ids, float *weights) {
    EPMOE_TRY(check_route_params(p));
    EPMOE_REQUIRE(T >= 0, EPMOE_ERR_INVALID_ARG, "routing: token count %lld < 0", (long long)T);
    if (T == 0) return EPMOE_OK;
    EPMOE_REQUIRE(logits && ids && weights, EPMOE_ERR_INVALID_ARG,
                  "routing: NULL logits, ids or weights for %lld tokens", (long long)T);
    int64_t E = p->n_experts, k = p->top_k;
    if (bias)
        for (int64_t e = 0; e < E; e++)
            EPMOE_REQUIRE(isfinite(bias[e]), EPMOE_ERR_NUMERIC,
                          "routing: gate bias of expert %lld is %g (must be finite)",
                          (long long)e, (double)bias[e]);

    route_scratch s = {0};
    EPMOE_TRY(alloc_scratch(p, &s));
    epmoe_status st = EPMOE_OK;
    int64_t per_group = E / p->n_groups;
    for (int64_t t = 0; t < T; t++) {
        const float *row = logits + t * E;
        EPMOE_TRY_GOTO(st, check_logits_row(row, E, t), done);
        for (int64_t e = 0; e < E; e++) {
            s.scores[e] = score_of_logit(p->scoring, row[e]);
            s.keys[e] = bias ? s.scores[e] + bias[e] : s.scores[e];
        }
        if (p->n_groups > 1) select_groups(p, &s);

        int64_t chosen = 0;
        for (int64_t e = 0; e < E; e++) {
            if (p->n_groups > 1 && !s.group_kept[e / per_group]) continue;
            topk_insert(s.best_ids, s.best_keys, &chosen, k, (int32_t)e, s.keys[e]);
        }
        if (chosen != k) {
            st = epmoe_set_error(EPMOE_ERR_INTERNAL, __FILE__, __LINE__,
                                 "routing: token %lld got %lld of %lld experts", (long long)t,
                                 (long long)chosen, (long long)k);
            goto done;
        }
        for (int64_t j = 0; j < k; j++) ids[t * k + j] = s.best_ids[j];
        /* DeepSeek weighs by the scores (the bias steers the choice only); gpt-oss's softmax
         * takes the biased logits, F.linear(x, W, b) in its reference. */
        const float *weigh = p->scoring == EPMOE_SCORING_TOPK_SOFTMAX ? s.keys : row;
        write_weights(weigh, s.best_ids, k, p->scoring, p->routed_scaling_factor, weights + t * k);
    }
done:
    free_scratch(&s);
    return st;
}

epmoe_status epmoe_cpu_route_hash(const epmoe_route_params *p, const float *logits,
                                  const int32_t *tid2eid, int64_t vocab_size,
                                  const int32_t *token_ids, int64_t T, int32_t *ids,
                                  float *weights) {
    EPMOE_TRY(check_route_params(p));
    EPMOE_REQUIRE(p->scoring != EPMOE_SCORING_TOPK_SOFTMAX, EPMOE_ERR_INVALID_ARG,
                  "hash routing: topk_softmax has no hash-routed layers (its weights need the "
                  "biased logits of a top-k choice)");
    EPMOE_REQUIRE(T >= 0, EPMOE_ERR_INVALID_ARG, "hash routing: token count %lld < 0",
                  (long long)T);
    EPMOE_REQUIRE(vocab_size >= 1, EPMOE_ERR_INVALID_ARG, "hash routing: vocab_size %lld < 1",
                  (long long)vocab_size);
    if (T == 0) return EPMOE_OK;
    EPMOE_REQUIRE(logits && tid2eid && token_ids && ids && weights, EPMOE_ERR_INVALID_ARG,
                  "hash routing: NULL argument for %lld tokens", (long long)T);
    int64_t E = p->n_experts, k = p->top_k;

    epmoe_status st = EPMOE_OK;
    for (int64_t t = 0; t < T; t++) {
        const float *row = logits + t * E;
        EPMOE_TRY_GOTO(st, check_logits_row(row, E, t), done);
        int64_t token = token_ids[t];
        if (token < 0 || token >= vocab_size) {
            st = epmoe_set_error(EPMOE_ERR_RANGE, __FILE__, __LINE__,
                                 "hash routing: token %lld has token id %lld outside [0, %lld)",
                                 (long long)t, (long long)token, (long long)vocab_size);
            goto done;
        }
        const int32_t *table_row = tid2eid + token * k;
        for (int64_t j = 0; j < k; j++) {
            int64_t e = table_row[j];
            if (e < 0 || e >= E) {
                st = epmoe_set_error(EPMOE_ERR_RANGE, __FILE__, __LINE__,
                                     "hash routing: token %lld (token id %lld): tid2eid[%lld][%lld]"
                                     " = %lld outside [0, %lld)",
                                     (long long)t, (long long)token, (long long)token,
                                     (long long)j, (long long)e, (long long)E);
                goto done;
            }
            for (int64_t i = 0; i < j; i++) {
                if (table_row[i] == e) {
                    st = epmoe_set_error(EPMOE_ERR_FORMAT, __FILE__, __LINE__,
                                         "hash routing: token %lld (token id %lld): tid2eid[%lld]"
                                         " lists expert %lld twice (slots %lld and %lld)",
                                         (long long)t, (long long)token, (long long)token,
                                         (long long)e, (long long)i, (long long)j);
                    goto done;
                }
            }
            ids[t * k + j] = (int32_t)e;
        }
        write_weights(row, table_row, k, p->scoring, p->routed_scaling_factor, weights + t * k);
    }
done:
    return st;
}
