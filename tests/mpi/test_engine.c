/* The expert-parallel engine under mpiexec.   mpi-ranks: 1 2 3 4 5 8
 *
 * Every case runs one layer on P ranks (MPI_COMM_WORLD) and, on rank 0, the same tokens on a
 * one-rank engine (MPI_COMM_SELF), then checks:
 *   - outputs bit-identical to the one-rank run (fixed slot-order summation),
 *   - within tolerance of the float64 reference, routing ids equal to the reference's,
 *   - every dispatched row came back exactly once (global counters),
 *   - no output element left unwritten (outputs poisoned first).
 * Assertions happen after the collectives, on every rank, so a failure cannot hang the others;
 * and every test case is guarded (tests/support/mpi_suite.h): a failure on any rank aborts the
 * job before the next test, a hang ends at EPMOE_MPI_TEST_TIMEOUT_S.
 */
#include <check.h>
#include <math.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "common/checkpoint.h"
#include "common/layout.h"
#include "common/safetensors.h"
#include "coordinator/engine/cpu_engine.h"
#include "coordinator/transport/mpi.h"
#include "kernels/ops.h"
#include "tests/ref/ref_layer.h"
#include "tests/support/mpi_suite.h"
#include "tests/support/test_support.h"

/* Relative L2 error allowed against the float64 reference. The implementation's products are
 * exact (e2m1 x e4m3 values) and accumulate in fp32 over K <= 256 terms, so the sums carry
 * ~1e-7 relative error: measured 3e-7..5e-7 on every case here. The remaining risk is the
 * re-quantization of the SwiGLU output: where fp32 and float64 pre-activations straddle an
 * E2M1 rounding boundary one code differs by a step, ~1e-5 of the output norm per flip at
 * these sizes. 1e-4 allows a few such flips and still fails by orders of magnitude on a wrong
 * expert, scale, clamp or slot (each > 1e-2). */
#define REL_L2_TOL 1e-4

static int world_rank, world_size;

typedef struct {
    const char *name;
    const char *overrides;   /* "name=value;..." applied after the preset (tiny: with 2 layers,
                              * layer 0 hash-routed) */
    int64_t tokens_total;
    int all_on_last_rank;    /* every token held by the last rank (others hold none) */
    int skew;                /* 0 none, 1 every token to expert 7 first, 2 every token to rank 0's experts */
    float input_scale;       /* multiplies the random inputs (large: the clamp fires) */
    int expect_clamp;        /* the reference must see the clamp change some pre-activations */
    int64_t layer;           /* 0 is hash-routed in the tiny preset */
    const char *preset;      /* NULL: tiny */
} engine_case;

static void apply_overrides(epmoe_config *cfg, const char *overrides) {
    char buf[512];
    snprintf(buf, sizeof buf, "%s", overrides);
    char *save = NULL;
    for (char *kv = strtok_r(buf, ";", &save); kv; kv = strtok_r(NULL, ";", &save)) {
        char *eq = strchr(kv, '=');
        *eq = '\0';
        ck_assert_msg(epmoe_config_set(cfg, kv, eq + 1) == EPMOE_OK, "%s", epmoe_last_error());
    }
}

static void make_checkpoint(const epmoe_config *cfg, const char *dir) {
    if (world_rank == 0) {
        struct stat sb;
        if (stat(dir, &sb) != 0) {
            epmoe_gen_options opt = {0};
            epmoe_status st = epmoe_ckpt_generate(cfg, &opt, dir, NULL);
            if (st != EPMOE_OK) fprintf(stderr, "generate %s: %s\n", dir, epmoe_last_error());
        }
    }
    MPI_Barrier(MPI_COMM_WORLD);
}

static void load_layer(const char *dir, epmoe_config *cfg, int64_t layer,
                       const epmoe_expert_slice *slice, epmoe_layer_weights *w, int skew) {
    epmoe_st_set *ckpt = NULL;
    ck_assert_msg(epmoe_st_set_open(dir, &ckpt) == EPMOE_OK, "%s", epmoe_last_error());
    ck_assert_msg(epmoe_config_from_checkpoint(ckpt, cfg) == EPMOE_OK, "%s", epmoe_last_error());
    ck_assert_msg(epmoe_layer_weights_load(ckpt, cfg, layer, slice, w) == EPMOE_OK, "%s",
                  epmoe_last_error());
    /* what the engine and the reference compute with, against the checkpoint's own bytes */
    char first[256];
    int64_t differ = epmoe_ref_check_loaded_experts(ckpt, cfg, w, first, sizeof first);
    ck_assert_msg(differ == 0, "%lld loaded expert weights differ from the checkpoint: %s",
                  (long long)differ, first);
    epmoe_st_set_close(ckpt);
    /* Skew through the gate bias, identically on every rank and in the reference. */
    if (skew && w->gate_bias) {
        epmoe_expert_slice first;
        ck_assert(epmoe_slice_of_rank(cfg->n_routed_experts, world_size, 0, &first) == EPMOE_OK);
        for (int64_t e = 0; e < cfg->n_routed_experts; e++) {
            if (skew == 1 && e == 7) w->gate_bias[e] += 1000.0f;
            if (skew == 2 && e >= first.start && e < first.end) w->gate_bias[e] += 1000.0f;
        }
    }
    ck_assert_msg(epmoe_layer_weights_prepare_cpu(w) == EPMOE_OK, "%s", epmoe_last_error());
}

/* The float64 routing key of expert e for one token: score(x . Wg[e]) + bias[e] (gpt-oss: the
 * biased logit itself). */
static double ref_key(const epmoe_config *cfg, const epmoe_layer_weights *w, const float *x,
                      int64_t e) {
    const int64_t H = cfg->hidden_size;
    double logit = 0;
    for (int64_t h = 0; h < H; h++) logit += (double)x[h] * (double)w->gate_weight[e * H + h];
    double s = cfg->scoring == EPMOE_SCORING_SIGMOID        ? 1.0 / (1.0 + exp(-logit))
               : cfg->scoring == EPMOE_SCORING_TOPK_SOFTMAX ? logit /* gpt-oss: the logit */
                                                            : sqrt(logit > 30 ? logit : log1p(exp(logit)));
    return s + (w->gate_bias ? (double)w->gate_bias[e] : 0.0);
}

static double ref_key_gap(const epmoe_config *cfg, const epmoe_layer_weights *w, const float *x,
                          int64_t a, int64_t b) {
    return fabs(ref_key(cfg, w, x, a) - ref_key(cfg, w, x, b));
}

/* What fp32 can tell apart at that key: a few of its ulps (the sum's rounding, the score's and
 * the fp32 logit's). */
static double ref_key_tolerance(const epmoe_config *cfg, const epmoe_layer_weights *w,
                                const float *x, int64_t e) {
    return 4.0 * ldexp(fabs(ref_key(cfg, w, x, e)) + 1.0, -23);
}

/* ---- what goes on the wire ---------------------------------------------------------------------
 * A transport that passes every call to the MPI transport and records, per all-to-all (in call
 * order), the elements and bytes this rank sends to each peer. The engine's own counters are not
 * used: the test computes what each peer must get from the routing ids alone. */
#define WIRE_MAX_CALLS 4
#define WIRE_MAX_RANKS 64

typedef struct {
    epmoe_transport *inner;
    int n_calls;
    int64_t elems[WIRE_MAX_CALLS][WIRE_MAX_RANKS];
    int64_t bytes[WIRE_MAX_CALLS][WIRE_MAX_RANKS];
} wire_log;

static epmoe_status wire_exchange_counts(epmoe_transport *t, const int64_t *send_counts,
                                         int64_t *recv_counts) {
    wire_log *log = t->impl;
    return log->inner->ops->exchange_counts(log->inner, send_counts, recv_counts);
}

static epmoe_status wire_alltoallv(epmoe_transport *t, const void *send,
                                   const int64_t *send_counts, const int64_t *send_displs,
                                   void *recv, const int64_t *recv_counts,
                                   const int64_t *recv_displs, size_t elem_bytes) {
    wire_log *log = t->impl;
    if (log->n_calls < WIRE_MAX_CALLS) {
        for (int p = 0; p < t->n_ranks; p++) {
            log->elems[log->n_calls][p] = send_counts[p];
            log->bytes[log->n_calls][p] = send_counts[p] * (int64_t)elem_bytes;
        }
    }
    log->n_calls++;
    return log->inner->ops->alltoallv(log->inner, send, send_counts, send_displs, recv,
                                      recv_counts, recv_displs, elem_bytes);
}

static epmoe_status wire_agree(epmoe_transport *t, epmoe_status local, const char *what) {
    wire_log *log = t->impl;
    return log->inner->ops->agree(log->inner, local, what);
}

static void wire_destroy(epmoe_transport *t) { (void)t; /* the test owns both */ }

static const epmoe_transport_ops wire_ops = {"wire-log", wire_exchange_counts, wire_alltoallv,
                                             wire_agree, wire_destroy};

/* Owner of expert e: E experts in P contiguous slices, the first E % P of them one larger
 * (DESIGN §1), computed here rather than by common/layout.c. */
static int owner_of(int64_t e, int64_t E, int P) {
    int64_t base = E / P, extra = E % P, in_large = extra * (base + 1);
    return e < in_large ? (int)(e / (base + 1)) : (int)(extra + (e - in_large) / base);
}

static void run_case(const engine_case *c) {
    epmoe_config cfg;
    ck_assert(epmoe_config_preset(&cfg, c->preset ? c->preset : "tiny") == EPMOE_OK);
    apply_overrides(&cfg, c->preset ? "n_layers=2" : "n_layers=2;n_hash_layers=1");
    apply_overrides(&cfg, c->overrides);
    char dir[1024];
    snprintf(dir, sizeof dir, "%s", epmoe_test_data_path(""));
    snprintf(dir + strlen(dir), sizeof dir - strlen(dir), "engine_%s_np%d", c->name, world_size);
    make_checkpoint(&cfg, dir);

    const int64_t T_all = c->tokens_total;
    cfg.max_tokens_per_rank = T_all > 0 ? T_all : 1;
    const int64_t H = cfg.hidden_size, k = cfg.top_k, E = cfg.n_routed_experts;

    /* this rank's slice and engine */
    epmoe_expert_slice slice;
    ck_assert(epmoe_slice_of_rank(E, world_size, world_rank, &slice) == EPMOE_OK);
    epmoe_layer_weights w = {0};
    epmoe_config run_cfg = cfg;
    load_layer(dir, &run_cfg, c->layer, &slice, &w, c->skew);
    run_cfg.max_tokens_per_rank = cfg.max_tokens_per_rank;
    epmoe_transport *tr = NULL;
    ck_assert(epmoe_transport_mpi_create(MPI_COMM_WORLD, 300.0, &tr) == EPMOE_OK);
    ck_assert(world_size <= WIRE_MAX_RANKS);
    wire_log wire = {.inner = tr};
    epmoe_transport wire_tr = {&wire_ops, tr->rank, tr->n_ranks, &wire};
    /* the engine indexes weights by layer: give it an array whose entry `layer` is ours */
    epmoe_layer_weights layers[2] = {w, w};
    epmoe_cpu_engine *eng = NULL;
    ck_assert_msg(epmoe_cpu_engine_create(&run_cfg, &wire_tr, layers, 2, &eng) == EPMOE_OK, "%s",
                  epmoe_last_error());

    /* inputs: made on rank 0, sharded */
    float *x_all = malloc((size_t)(T_all * H + 1) * sizeof(float));
    int32_t *tid_all = malloc((size_t)(T_all + 1) * sizeof(int32_t));
    if (world_rank == 0) {
        epmoe_rng rng;
        epmoe_rng_seed(&rng, 99 + (uint64_t)T_all);
        epmoe_fill_normal(&rng, x_all, (size_t)(T_all * H), c->input_scale);
        for (int64_t t = 0; t < T_all; t++)
            tid_all[t] = (int32_t)epmoe_rng_below(&rng, (uint64_t)cfg.vocab_size);
    }
    MPI_Bcast(x_all, (int)(T_all * H), MPI_FLOAT, 0, MPI_COMM_WORLD);
    MPI_Bcast(tid_all, (int)T_all, MPI_INT32_T, 0, MPI_COMM_WORLD);
    int64_t my_start = 0, my_count = 0;
    if (c->all_on_last_rank) {
        my_count = world_rank == world_size - 1 ? T_all : 0;
    } else {
        int64_t base = T_all / world_size, extra = T_all % world_size;
        my_start = world_rank * base + (world_rank < extra ? world_rank : extra);
        my_count = base + (world_rank < extra ? 1 : 0);
    }
    float *y = malloc((size_t)(my_count * H + 1) * sizeof(float));
    epmoe_poison_f32(y, (size_t)(my_count * H));
    int64_t *expert_counts = calloc((size_t)E, sizeof(int64_t));
    epmoe_status st = epmoe_cpu_engine_layer_forward(eng, c->layer, x_all + my_start * H,
                                                 tid_all + my_start, my_count, y, NULL,
                                                 expert_counts);
    int local_ok = st == EPMOE_OK, all_ok = 0;
    if (!local_ok) fprintf(stderr, "rank %d: %s\n", world_rank, epmoe_last_error());
    MPI_Allreduce(&local_ok, &all_ok, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);

    /* gather outputs to rank 0 in token order */
    int *counts = malloc(sizeof(int) * (size_t)world_size), *displs = malloc(sizeof(int) * (size_t)world_size);
    int mine = (int)(my_count * H);
    MPI_Gather(&mine, 1, MPI_INT, counts, 1, MPI_INT, 0, MPI_COMM_WORLD);
    if (world_rank == 0) {
        int run = 0;
        for (int r = 0; r < world_size; r++) {
            displs[r] = run;
            run += counts[r];
        }
    }
    float *y_all = malloc((size_t)(T_all * H + 1) * sizeof(float));
    MPI_Gatherv(y, mine, MPI_FLOAT, y_all, counts, displs, MPI_FLOAT, 0, MPI_COMM_WORLD);
    int64_t *counts_all = calloc((size_t)E, sizeof(int64_t));
    MPI_Reduce(expert_counts, counts_all, (int)E, MPI_INT64_T, MPI_SUM, 0, MPI_COMM_WORLD);

    /* what every rank sent to every peer, in each all-to-all: [call][src][dst] on rank 0 */
    int64_t *wire_elems = calloc((size_t)(WIRE_MAX_CALLS * world_size * world_size), sizeof(int64_t));
    int64_t *wire_bytes = calloc((size_t)(WIRE_MAX_CALLS * world_size * world_size), sizeof(int64_t));
    int *wire_calls = calloc((size_t)world_size, sizeof(int));
    MPI_Gather(&wire.n_calls, 1, MPI_INT, wire_calls, 1, MPI_INT, 0, MPI_COMM_WORLD);
    for (int call = 0; call < WIRE_MAX_CALLS; call++) {
        MPI_Gather(wire.elems[call], world_size, MPI_INT64_T,
                   wire_elems + (size_t)call * world_size * world_size, world_size, MPI_INT64_T, 0,
                   MPI_COMM_WORLD);
        MPI_Gather(wire.bytes[call], world_size, MPI_INT64_T,
                   wire_bytes + (size_t)call * world_size * world_size, world_size, MPI_INT64_T, 0,
                   MPI_COMM_WORLD);
    }
    int64_t *holder_start = calloc((size_t)world_size, sizeof(int64_t));
    int64_t *holder_count = calloc((size_t)world_size, sizeof(int64_t));
    MPI_Gather(&my_start, 1, MPI_INT64_T, holder_start, 1, MPI_INT64_T, 0, MPI_COMM_WORLD);
    MPI_Gather(&my_count, 1, MPI_INT64_T, holder_count, 1, MPI_INT64_T, 0, MPI_COMM_WORLD);

    /* row accounting over all ranks */
    epmoe_cpu_engine_counters ctr, sum;
    epmoe_cpu_engine_get_counters(eng, &ctr);
    MPI_Allreduce(&ctr, &sum, 6, MPI_INT64_T, MPI_SUM, MPI_COMM_WORLD);

    char why[512] = "";
    int ok = all_ok;
    if (ok && world_rank == 0) {
        /* one-rank run of the same tokens */
        epmoe_expert_slice all = {0, E};
        epmoe_layer_weights wf = {0};
        epmoe_config full_cfg = cfg;
        load_layer(dir, &full_cfg, c->layer, &all, &wf, c->skew);
        full_cfg.max_tokens_per_rank = cfg.max_tokens_per_rank;
        epmoe_transport *self_tr = NULL;
        ck_assert(epmoe_transport_mpi_create(MPI_COMM_SELF, 300.0, &self_tr) == EPMOE_OK);
        epmoe_layer_weights flayers[2] = {wf, wf};
        epmoe_cpu_engine *self_eng = NULL;
        ck_assert(epmoe_cpu_engine_create(&full_cfg, self_tr, flayers, 2, &self_eng) == EPMOE_OK);
        float *y1 = malloc((size_t)(T_all * H + 1) * sizeof(float));
        epmoe_poison_f32(y1, (size_t)(T_all * H));
        ck_assert_msg(epmoe_cpu_engine_layer_forward(self_eng, c->layer, x_all, tid_all, T_all, y1,
                                                 NULL, NULL) == EPMOE_OK,
                      "%s", epmoe_last_error());

        double *ref = malloc((size_t)(T_all * H + 1) * sizeof(double));
        int32_t *ref_ids = malloc((size_t)(T_all * k + 1) * sizeof(int32_t));
        epmoe_ref_clamp_hits = 0;
        ck_assert(epmoe_ref_layer_forward(&full_cfg, &wf, x_all, tid_all, T_all, ref, ref_ids,
                                          NULL) == EPMOE_OK);
        /* the implementation's routing ids, from the same routing ops the engine calls */
        float *logits = malloc((size_t)(T_all * E + 1) * sizeof(float));
        int32_t *ids = malloc((size_t)(T_all * k + 1) * sizeof(int32_t));
        float *wts = malloc((size_t)(T_all * k + 1) * sizeof(float));
        epmoe_route_params rp = epmoe_route_params_from_config(&full_cfg);
        epmoe_cpu_gate_logits_panels(x_all, T_all, H, wf.gate_panels, E, logits);
        if (c->layer < full_cfg.n_hash_layers)
            ck_assert(epmoe_cpu_route_hash(&rp, logits, wf.tid2eid, wf.vocab_size, tid_all, T_all,
                                           ids, wts) == EPMOE_OK);
        else
            ck_assert(epmoe_cpu_route(&rp, logits, wf.gate_bias, T_all, ids, wts) == EPMOE_OK);

        size_t unwritten = epmoe_count_unwritten_f32(y_all, (size_t)(T_all * H));
        double err = T_all ? epmoe_rel_l2_f32_f64(y_all, ref, (size_t)(T_all * H)) : 0.0;
        int64_t id_mismatch = 0, near_ties = 0, counted = 0;
        for (int64_t i = 0; i < T_all * k; i++) {
            if (ids[i] == ref_ids[i]) continue;
            /* The implementation ranks fp32 keys, the reference float64 ones: two experts whose
             * float64 keys (score + bias) agree to fp32 rounding may come out either way (a
             * skew bias of 1000 leaves keys 6e-5 apart in fp32). Anything else is a mismatch. */
            if (c->layer >= full_cfg.n_hash_layers &&
                ref_key_gap(&full_cfg, &wf, x_all + (i / k) * H, ids[i], ref_ids[i]) <
                    ref_key_tolerance(&full_cfg, &wf, x_all + (i / k) * H, ref_ids[i]))
                near_ties++;
            else
                id_mismatch++;
        }
        for (int64_t e = 0; e < E; e++) counted += counts_all[e];
        if (unwritten) {
            ok = 0;
            snprintf(why, sizeof why, "%zu output elements never written", unwritten);
        } else if (T_all && memcmp(y_all, y1, (size_t)(T_all * H) * sizeof(float)) != 0) {
            ok = 0;
            snprintf(why, sizeof why, "P=%d output differs from the one-rank output", world_size);
        } else if (!(err < REL_L2_TOL)) {
            ok = 0;
            snprintf(why, sizeof why, "rel L2 error %.3g vs float64 reference (tol %g)", err,
                     REL_L2_TOL);
        } else if (id_mismatch) {
            ok = 0;
            snprintf(why, sizeof why, "%lld routing ids differ from the reference",
                     (long long)id_mismatch);
        } else if (counted != T_all * k) {
            ok = 0;
            snprintf(why, sizeof why, "expert counts sum to %lld, expected %lld", (long long)counted,
                     (long long)(T_all * k));
        } else if (sum.rows_sent != sum.rows_received || sum.pairs_computed != T_all * k ||
                   sum.rows_returned != T_all * k || sum.rows_combined != T_all * k) {
            ok = 0;
            snprintf(why, sizeof why,
                     "row accounting: sent %lld received %lld pairs %lld returned %lld combined "
                     "%lld (expected %lld pairs)",
                     (long long)sum.rows_sent, (long long)sum.rows_received,
                     (long long)sum.pairs_computed, (long long)sum.rows_returned,
                     (long long)sum.rows_combined, (long long)(T_all * k));
        }
        /* The wire, per peer, against the routing ids (issue 24, defect 14): the dispatch (the
         * first all-to-all) carries one row per (token, destination rank) holding any of the
         * token's experts, each row a record of H fp32 values then the k int32 global expert
         * ids, padded to 16 bytes (common/dispatch_record.h, written out here on purpose); the
         * combine (the second) one row of H fp32 per (token, slot), from the slot's owner back
         * to the token's holder. Self-sends included. */
        const int P = world_size;
        const int64_t dispatch_row_bytes = (H * 4 + k * 4 + 15) / 16 * 16, combine_row_bytes = H * 4;
        int64_t *want_dispatch = calloc((size_t)(P * P), sizeof(int64_t));
        int64_t *want_combine = calloc((size_t)(P * P), sizeof(int64_t));
        for (int src = 0; src < P; src++) {
            for (int64_t t = holder_start[src]; t < holder_start[src] + holder_count[src]; t++) {
                for (int64_t s = 0; s < k; s++) {
                    int dst = owner_of(ids[t * k + s], E, P), seen = 0;
                    for (int64_t q = 0; q < s; q++) seen |= owner_of(ids[t * k + q], E, P) == dst;
                    if (!seen) want_dispatch[src * P + dst]++;
                    want_combine[dst * P + src]++; /* the owner returns one row per slot */
                }
            }
        }
        for (int r = 0; ok && r < P; r++)
            if (wire_calls[r] != 2) {
                ok = 0;
                snprintf(why, sizeof why, "rank %d made %d all-to-alls, expected 2 (dispatch, "
                         "combine)", r, wire_calls[r]);
            }
        for (int call = 0; ok && call < 2; call++) {
            const int64_t *want = call == 0 ? want_dispatch : want_combine;
            const int64_t row_bytes = call == 0 ? dispatch_row_bytes : combine_row_bytes;
            for (int i = 0; ok && i < P * P; i++) {
                int64_t got = wire_elems[(size_t)call * P * P + i];
                int64_t got_bytes = wire_bytes[(size_t)call * P * P + i];
                if (got != want[i] || got_bytes != want[i] * row_bytes) {
                    ok = 0;
                    snprintf(why, sizeof why,
                             "%s: rank %d sent rank %d %lld rows, %lld bytes; the routing ids "
                             "say %lld rows, %lld bytes",
                             call == 0 ? "dispatch" : "combine", i / P, i % P, (long long)got,
                             (long long)got_bytes, (long long)want[i],
                             (long long)(want[i] * row_bytes));
                }
            }
        }
        int64_t wire_rows = 0;
        for (int i = 0; i < P * P; i++) wire_rows += want_dispatch[i];
        free(want_dispatch);
        free(want_combine);
        if (ok && c->expect_clamp && epmoe_ref_clamp_hits == 0) {
            ok = 0;
            snprintf(why, sizeof why, "the inputs never made the SwiGLU clamp fire");
        }
        if (c->skew == 1) /* expert 7 must hold slot 0 of every scored-layer token */
            for (int64_t t = 0; ok && t < T_all && c->layer >= full_cfg.n_hash_layers; t++)
                if (ids[t * k] != 7) {
                    ok = 0;
                    snprintf(why, sizeof why, "skew: token %lld slot 0 is expert %d, not 7",
                             (long long)t, ids[t * k]);
                }
        fprintf(stderr,
                "case %s P=%d T=%lld: rel L2 %.3g, ids equal %s (%lld near ties), clamp hits %lld, "
                "saturated %lld, dispatched rows %lld (wire checked per peer)\n",
                c->name, world_size, (long long)T_all, err, id_mismatch ? "no" : "yes",
                (long long)near_ties, (long long)epmoe_ref_clamp_hits,
                (long long)sum.saturated_elements, (long long)wire_rows);
        epmoe_cpu_engine_destroy(self_eng);
        self_tr->ops->destroy(self_tr);
        epmoe_layer_weights_free(&wf);
        free(y1);
        free(ref);
        free(ref_ids);
        free(logits);
        free(ids);
        free(wts);
    }
    MPI_Bcast(&ok, 1, MPI_INT, 0, MPI_COMM_WORLD);
    MPI_Bcast(why, sizeof why, MPI_CHAR, 0, MPI_COMM_WORLD);

    epmoe_cpu_engine_destroy(eng);
    tr->ops->destroy(tr);
    epmoe_layer_weights_free(&w);
    free(x_all);
    free(tid_all);
    free(y);
    free(y_all);
    free(counts);
    free(displs);
    free(expert_counts);
    free(counts_all);
    free(wire_elems);
    free(wire_bytes);
    free(wire_calls);
    free(holder_start);
    free(holder_count);
    ck_assert_msg(all_ok, "forward failed on some rank (see stderr)");
    ck_assert_msg(ok, "case %s: %s", c->name, why);
}

START_TEST(scored_layer_random) {
    engine_case c = {"tiny", "", 96, 0, 0, 1.0f, 0, 1, NULL};
    run_case(&c);
}
END_TEST

START_TEST(hash_layer_random) {
    engine_case c = {"tiny", "", 96, 0, 0, 1.0f, 0, 0, NULL};
    run_case(&c);
}
END_TEST

START_TEST(clamp_fires_large_inputs) {
    engine_case c = {"tiny", "", 64, 0, 0, 12.0f, 1, 1, NULL};
    run_case(&c);
}
END_TEST

START_TEST(skew_all_to_one_expert) {
    engine_case c = {"tiny", "", 80, 0, 1, 1.0f, 0, 1, NULL};
    run_case(&c);
}
END_TEST

START_TEST(skew_all_to_one_rank) {
    engine_case c = {"tiny", "", 80, 0, 2, 1.0f, 0, 1, NULL};
    run_case(&c);
}
END_TEST

START_TEST(tokens_all_on_last_rank) {
    engine_case c = {"tiny", "", 40, 1, 0, 1.0f, 0, 1, NULL};
    run_case(&c);
}
END_TEST

START_TEST(more_ranks_than_tokens) {
    engine_case c = {"tiny", "", 3, 0, 0, 1.0f, 0, 1, NULL};
    run_case(&c);
}
END_TEST

START_TEST(zero_tokens) {
    engine_case c = {"tiny", "", 0, 0, 0, 1.0f, 0, 1, NULL};
    run_case(&c);
}
END_TEST

START_TEST(dsv3_group_routing) {
    engine_case c = {"dsv3", "scoring=sigmoid;n_groups=8;topk_groups=4;top_k=8;n_hash_layers=0;"
                             "swiglu_limit=0;routed_scaling_factor=2.5",
                     64, 0, 0, 1.0f, 0, 1, NULL};
    run_case(&c);
}
END_TEST

START_TEST(dsv4_pro_expert_count) {
    /* 384 experts split over 5 ranks is uneven (77,77,77,77,76): slices, owners and local ids
     * off by one would show here. */
    engine_case c = {"e384", "n_routed_experts=384;hidden_size=128;moe_inter_size=64", 64, 0, 0,
                     1.0f, 0, 1, NULL};
    run_case(&c);
}
END_TEST

START_TEST(mxfp4_checkpoint_w4a16) {
    engine_case c = {"mxfp4", "weight_format=mxfp4;act_quant=high", 48, 0, 0, 1.0f, 0, 1, NULL};
    run_case(&c);
}
END_TEST

START_TEST(static_scales_and_step_variant) {
    engine_case c = {"static", "act_scale=static;swiglu_variant=step", 48, 0, 0, 4.0f, 1, 1, NULL};
    run_case(&c);
}
END_TEST

/* W4A8 (act_quant = fp8): FP8 activations with power-of-two block scales, on MXFP4 weights
 * (the mode's target) and on NVFP4 ones (the same exact products on the CPU), skewed, with the
 * clamp firing, and on gpt-oss's 160-wide rows (a short last block). */
START_TEST(fp8_w4a8_mxfp4_skew) {
    engine_case c = {"fp8mx", "weight_format=mxfp4;act_quant=fp8", 48, 0, 1, 1.0f, 0, 1, NULL};
    run_case(&c);
}
END_TEST

START_TEST(fp8_w4a8_clamp_fires) {
    engine_case c = {"fp8", "act_quant=fp8", 48, 0, 0, 6.0f, 1, 1, NULL};
    run_case(&c);
}
END_TEST

START_TEST(fp8_w4a8_gptoss_skew_to_one_rank) {
    engine_case c = {"gptoss", "act_quant=fp8", 40, 0, 2, 3.0f, 0, 1, "gpt-oss-tiny"};
    run_case(&c);
}
END_TEST

/* gpt-oss (topk_softmax routing with the router bias in the weights, expert biases, the gptoss
 * SwiGLU, H 160 and I 96: not multiples of 64), in both of its layouts: the epmoe layout and
 * the released one (stacked, interleaved MXFP4); large inputs so that the clamp fires, and
 * skew (every token's first slot on expert 7, or on rank 0's experts). */
START_TEST(gptoss_clamp_fires) {
    engine_case c = {"gptoss", "", 72, 0, 0, 6.0f, 1, 1, "gpt-oss-tiny"};
    run_case(&c);
}
END_TEST

START_TEST(gptoss_released_layout) {
    engine_case c = {"gptoss_layout", "checkpoint_layout=gpt-oss", 64, 0, 0, 3.0f, 1, 0,
                     "gpt-oss-tiny"};
    run_case(&c);
}
END_TEST

START_TEST(gptoss_skew_to_one_expert) {
    engine_case c = {"gptoss", "", 56, 0, 1, 1.0f, 0, 1, "gpt-oss-tiny"};
    run_case(&c);
}
END_TEST

START_TEST(gptoss_skew_to_one_rank_w4a16) {
    engine_case c = {"gptoss", "act_quant=high", 40, 0, 2, 1.0f, 0, 1, "gpt-oss-tiny"};
    run_case(&c);
}
END_TEST

/* The guard's own check (tests/CMakeLists.txt, mpi.guard_fails_fast): with
 * EPMOE_MPI_DELIBERATE_FAILURE=1, rank 0 fails an assertion while the other ranks wait for it
 * in a barrier. Unguarded, they waited there until ctest's timeout; guarded, the job ends at
 * once, non-zero, with the failure printed. Never part of a normal run. */
START_TEST(deliberate_failure_on_rank_0) {
    ck_assert_msg(world_rank != 0, "deliberate failure on rank 0 (EPMOE_MPI_DELIBERATE_FAILURE)");
    MPI_Barrier(MPI_COMM_WORLD);
}
END_TEST

static Suite *engine_suite(void) {
    Suite *s = suite_create("engine");
    const char *deliberate = getenv("EPMOE_MPI_DELIBERATE_FAILURE");
    if (deliberate && strcmp(deliberate, "1") == 0) {
        TCase *d = tcase_create("deliberate");
        epmoe_mpi_guard_tcase(d);
        tcase_add_test(d, deliberate_failure_on_rank_0);
        tcase_add_test(d, scored_layer_random); /* the next test: where an unguarded rank 0 went */
        suite_add_tcase(s, d);
        return s;
    }
    TCase *tc = tcase_create("layer");
    epmoe_mpi_guard_tcase(tc);
    tcase_add_test(tc, scored_layer_random);
    tcase_add_test(tc, hash_layer_random);
    tcase_add_test(tc, clamp_fires_large_inputs);
    tcase_add_test(tc, skew_all_to_one_expert);
    tcase_add_test(tc, skew_all_to_one_rank);
    tcase_add_test(tc, tokens_all_on_last_rank);
    tcase_add_test(tc, more_ranks_than_tokens);
    tcase_add_test(tc, zero_tokens);
    tcase_add_test(tc, dsv3_group_routing);
    tcase_add_test(tc, dsv4_pro_expert_count);
    tcase_add_test(tc, mxfp4_checkpoint_w4a16);
    tcase_add_test(tc, static_scales_and_step_variant);
    tcase_add_test(tc, gptoss_clamp_fires);
    tcase_add_test(tc, gptoss_released_layout);
    tcase_add_test(tc, gptoss_skew_to_one_expert);
    tcase_add_test(tc, gptoss_skew_to_one_rank_w4a16);
    tcase_add_test(tc, fp8_w4a8_mxfp4_skew);
    tcase_add_test(tc, fp8_w4a8_clamp_fires);
    tcase_add_test(tc, fp8_w4a8_gptoss_skew_to_one_rank);
    suite_add_tcase(s, tc);
    return s;
}

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &world_rank);
    MPI_Comm_size(MPI_COMM_WORLD, &world_size);
    int failed = epmoe_mpi_run_suite(engine_suite()); /* aborts every rank on a failure */
    MPI_Finalize();
    return failed;
}
