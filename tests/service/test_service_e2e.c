/* epmoe-serve end to end, on loopback, against the real engine (tiny preset from epmoe-gen):
 *   - many concurrent clients, mixed sizes, dtypes and layer ranges: every reply is
 *     bit-identical to `epmoe-run` (one rank) on the same rows, nothing lost or crossed;
 *   - bad inputs get INVALID_ARGUMENT naming the field while the others are served;
 *   - a deadline shorter than the work: DEADLINE_EXCEEDED and the request is not computed
 *     (the tokens counter only ever counts answered rows);
 *   - drain under load: SIGTERM to rank 0 while clients run; accepted calls complete, later
 *     ones get UNAVAILABLE, every rank exits 0.
 * Rows are multiples of 1/64 in [-2, 2], exact in fp32, bf16 and fp16, so all three dtypes
 * carry the same input. */
#include <check.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/rng.h"
#include "common/safetensors.h"
#include "common/tensor.h"
#include "coordinator/service/client.h"
#include "coordinator/service/grpc_adapter.h"
#include "service_test_util.h"

enum { POOL = TEST_POOL, STREAMS = 32, REQUESTS = 25, MAX_T = 8 };

static int64_t H;
static float *pool_x, *ref_all, *ref_13;
static int32_t *pool_ids;
static const char *checkpoint;

static void setup_reference(void) {
    const test_pool *p = test_pool_get();
    H = p->H;
    pool_x = p->x;
    pool_ids = p->ids;
    ref_all = p->ref_all;
    ref_13 = p->ref_13;
    checkpoint = p->checkpoint;
}

/* ---- one request: random rows of the pool, checked against the reference --------------- */

typedef struct {
    int code;
    int rows_ok;
    int64_t tokens;
    char message[512];
} call_result;

typedef enum { BAD_NONE, BAD_HIDDEN, BAD_NAN, BAD_RANGE, BAD_IDS } bad_kind;

static void call_forward(epmoe_rpc_channel *ch, epmoe_rng *rng, int64_t T, bad_kind bad,
                         double timeout, call_result *res) {
    static const epmoe_dtype dtypes[3] = {EPMOE_DTYPE_F32, EPMOE_DTYPE_BF16, EPMOE_DTYPE_F16};
    epmoe_dtype dtype = dtypes[epmoe_rng_below(rng, 3)];
    int sub_range = epmoe_rng_below(rng, 4) == 0; /* layers [1, 3), no token ids */
    int64_t rows[MAX_T * 64];
    size_t n = (size_t)(T * H);
    float *x = malloc(n * sizeof(float) + 4);
    int32_t ids[MAX_T * 64];
    for (int64_t t = 0; t < T; t++) {
        rows[t] = (int64_t)epmoe_rng_below(rng, POOL);
        memcpy(x + t * H, pool_x + rows[t] * H, (size_t)H * sizeof(float));
        ids[t] = pool_ids[rows[t]];
    }
    int64_t hidden = H;
    int64_t lb = sub_range ? 1 : 0, le = sub_range ? 3 : 0;
    const int32_t *send_ids = sub_range ? NULL : ids;
    if (bad == BAD_HIDDEN) hidden = H / 2;
    if (bad == BAD_NAN) x[n / 2] = NAN;
    if (bad == BAD_RANGE) lb = 7, le = 3;
    if (bad == BAD_IDS) lb = 0, le = 0, send_ids = NULL;
    /* This runs on the streams' threads too: no ck_assert here (Check reports failures only
     * from the test's own thread, and a failed assertion on another one crashes the suite).
     * A call that could not be made is code -1 with the reason; the test thread asserts. */
    res->code = -1;
    res->tokens = T;
    res->rows_ok = 0;
    void *wire = malloc(n * 4 + 4);
    if (epmoe_convert_from_f32(x, n, dtype, wire) != EPMOE_OK) {
        snprintf(res->message, sizeof res->message, "converting the request: %s",
                 epmoe_last_error());
        free(wire);
        free(x);
        return;
    }
    char id[48];
    snprintf(id, sizeof id, "req-%llx", (unsigned long long)epmoe_rng_next(rng));
    epmoe_forward_args a = {id, bad == BAD_HIDDEN ? 2 * T : T, hidden, dtype, wire, send_ids,
                            lb, le, timeout};
    epmoe_forward_reply r;
    epmoe_status st = epmoe_client_forward(ch, &a, &r);
    if (st != EPMOE_OK) {
        snprintf(res->message, sizeof res->message, "the call failed: %s", epmoe_last_error());
        free(wire);
        free(x);
        return;
    }
    res->code = r.code;
    snprintf(res->message, sizeof res->message, "%s", r.message);
    if (r.code == EPMOE_RPC_OK) {
        const float *ref = sub_range ? ref_13 : ref_all;
        float *want32 = malloc(n * sizeof(float) + 4);
        for (int64_t t = 0; t < T; t++)
            memcpy(want32 + t * H, ref + rows[t] * H, (size_t)H * sizeof(float));
        void *want = malloc(n * 4 + 4);
        res->rows_ok = epmoe_convert_from_f32(want32, n, dtype, want) == EPMOE_OK &&
                       r.n_tokens == T && r.hidden_size == H && r.dtype == dtype &&
                       strcmp(r.request_id, id) == 0 &&
                       memcmp(r.hidden_states, want, n * epmoe_dtype_size(dtype)) == 0;
        free(want32);
        free(want);
    }
    epmoe_forward_reply_free(&r);
    free(wire);
    free(x);
}

/* ---- concurrency, bit-identity, bad inputs, deadline, metrics, clean stop ---------------- */

typedef struct {
    epmoe_rpc_channel *ch;
    int stream;
    int64_t ok, ok_tokens, wrong, invalid, other;
    char last_error[600];
} stream_state;

static void *stream_main(void *arg) {
    stream_state *s = arg;
    epmoe_rng rng;
    epmoe_rng_seed(&rng, 77 + (uint64_t)s->stream);
    for (int i = 0; i < REQUESTS; i++) {
        bad_kind bad = BAD_NONE;
        if (i == REQUESTS / 2) bad = (bad_kind)(1 + s->stream % 4); /* one bad call per stream */
        call_result r;
        call_forward(s->ch, &rng, 1 + (int64_t)epmoe_rng_below(&rng, MAX_T), bad, 0, &r);
        if (bad != BAD_NONE) {
            static const char *const field[] = {"", "hidden_states.shape[1]", "NaN",
                                                "layer_begin", "token_ids"};
            if (r.code == EPMOE_RPC_INVALID_ARGUMENT && strstr(r.message, field[bad])) {
                s->invalid++;
            } else {
                s->other++;
                snprintf(s->last_error, sizeof s->last_error, "bad kind %d: %d %s", bad, r.code,
                         r.message);
            }
        } else if (r.code == EPMOE_RPC_OK) {
            s->ok++;
            s->ok_tokens += r.tokens;
            if (!r.rows_ok) s->wrong++;
        } else {
            s->other++;
            snprintf(s->last_error, sizeof s->last_error, "%d %s", r.code, r.message);
        }
    }
    return NULL;
}

typedef struct {
    epmoe_rpc_channel *ch;
    int64_t T;
    call_result r;
} async_call;

static void *async_main(void *arg) {
    async_call *c = arg;
    epmoe_rng rng;
    epmoe_rng_seed(&rng, 5);
    call_forward(c->ch, &rng, c->T, BAD_NONE, 0, &c->r);
    return NULL;
}

START_TEST(test_concurrent_clients_match_batch_job) {
    setup_reference();
    test_server srv;
    const char *extra[] = {"--max-queue-delay-us", "3000", "--max-batch-tokens", "256", NULL};
    test_server_start(&srv, 2, checkpoint, extra, 300);
    epmoe_rpc_channel *ch = NULL;
    ck_assert_int_eq(epmoe_rpc_channel_open(srv.target, 64 << 20, &ch), EPMOE_OK);

    epmoe_info_reply info;
    ck_assert_int_eq(epmoe_client_info(ch, 30, &info), EPMOE_OK);
    ck_assert_int_eq(info.code, EPMOE_RPC_OK);
    ck_assert_int_eq(info.n_ranks, 2);
    ck_assert_int_eq(info.hidden_size, H);
    ck_assert_int_eq(info.max_batch_tokens, 256);
    /* the engine behind it: the cpu backend here, or what EPMOE_BACKEND asked for (the GPU
     * machine runs this suite with EPMOE_BACKEND=cuda: two ranks share its GPU, mpi-staged) */
    const char *env_backend = getenv("EPMOE_BACKEND");
    const char *want_backend = env_backend && *env_backend ? env_backend : "cpu";
    ck_assert_str_eq(info.backend, want_backend);
    if (strcmp(want_backend, "cpu") == 0) {
        ck_assert_str_eq(info.device_name, "host");
        ck_assert_str_eq(info.transport, "mpi");
        ck_assert_int_eq(info.decode_tokens, 0);
    } else {
        ck_assert_str_ne(info.device_name, "host");
        ck_assert_str_eq(info.transport, "mpi-staged");
    }
    ck_assert_int_eq(info.layer_begin, 0);
    ck_assert_int_eq(info.layer_end, 4);
    int code = -1, serving = -1;
    ck_assert_int_eq(epmoe_client_health(ch, "", 30, &code, &serving), EPMOE_OK);
    ck_assert_int_eq(serving, 1);

    stream_state st[STREAMS];
    pthread_t th[STREAMS];
    for (int i = 0; i < STREAMS; i++) {
        memset(&st[i], 0, sizeof st[i]);
        st[i].ch = ch;
        st[i].stream = i;
        pthread_create(&th[i], NULL, stream_main, &st[i]);
    }
    int64_t ok = 0, ok_tokens = 0;
    for (int i = 0; i < STREAMS; i++) {
        pthread_join(th[i], NULL);
        ck_assert_msg(st[i].other == 0, "stream %d: %s", i, st[i].last_error);
        ck_assert_int_eq(st[i].wrong, 0);
        ck_assert_int_eq(st[i].invalid, 1);
        ck_assert_int_eq(st[i].ok, REQUESTS - 1);
        ok += st[i].ok;
        ok_tokens += st[i].ok_tokens;
    }

    /* A deadline shorter than the work: hold the engine with large requests (one forward each
     * at this token budget), then send one whose 10 ms deadline passes behind them. On a fast
     * machine it may still be answered in time; either way the counters must say what the
     * client got (it is a timing race by nature: the gated unit test proves "not computed"). */
    enum { BIG = 3 };
    async_call big[BIG];
    pthread_t tb[BIG];
    for (int i = 0; i < BIG; i++) {
        big[i] = (async_call){ch, 256, {0}};
        pthread_create(&tb[i], NULL, async_main, &big[i]);
    }
    for (int i = 0; i < 3000; i++) { /* until they are all in the server */
        char *m = test_fetch_metrics(srv.metrics_port);
        ck_assert_ptr_nonnull(m);
        double inflight = test_metric_value(m, "epmoe_inflight_requests ");
        free(m);
        if (inflight == BIG) break;
        usleep(2000);
    }
    epmoe_rng rng;
    epmoe_rng_seed(&rng, 9);
    call_result late;
    call_forward(ch, &rng, 4, BAD_NONE, 0.01, &late);
    ck_assert_msg(late.code == EPMOE_RPC_DEADLINE_EXCEEDED || late.code == EPMOE_RPC_OK,
                  "late call: %d %s", late.code, late.message);
    if (late.code == EPMOE_RPC_OK) {
        ck_assert(late.rows_ok);
        ok += 1;
        ok_tokens += 4;
    }
    for (int i = 0; i < BIG; i++) {
        pthread_join(tb[i], NULL);
        ck_assert_int_eq(big[i].r.code, EPMOE_RPC_OK);
        ck_assert(big[i].r.rows_ok);
        ok += 1;
        ok_tokens += 256;
    }
    /* Still serving. */
    call_result after;
    call_forward(ch, &rng, 3, BAD_NONE, 0, &after);
    ck_assert_int_eq(after.code, EPMOE_RPC_OK);
    ck_assert(after.rows_ok);
    ok += 1;
    ok_tokens += 3;

    /* The counters agree with what the clients saw: calls by the code they got, rows only of
     * OK replies delivered (a call ends on the server just after its client has the reply, so
     * wait, bounded, for the last ones to be counted). */
    const char *series[] = {"epmoe_requests_total{method=\"Forward\",code=\"OK\"} ",
                            "epmoe_requests_total{method=\"Forward\",code=\"INVALID_ARGUMENT\"} ",
                            "epmoe_requests_total{method=\"Forward\",code=\"DEADLINE_EXCEEDED\"} ",
                            "epmoe_tokens_total "};
    double want[] = {(double)ok, STREAMS, late.code == EPMOE_RPC_OK ? 0 : 1, (double)ok_tokens};
    char *m = test_wait_metrics(srv.metrics_port, series, want, 4, 60);
    ck_assert_ptr_nonnull(m);
    /* One race no server can see: a result sent in the instant between the client giving up
     * at its deadline and the server reading that it did is delivered as far as gRPC knows
     * (the server's copy of the deadline is later by the request's transit). Then the late
     * call is counted OK with its 4 rows. */
    if (late.code == EPMOE_RPC_DEADLINE_EXCEEDED &&
        test_metric_value(m, series[2]) <= 0 && test_metric_value(m, series[0]) == ok + 1) {
        want[0] = (double)(ok + 1);
        want[2] = 0;
        want[3] = (double)(ok_tokens + 4);
        printf("the late call's reply raced its deadline: counted OK\n");
    }
    for (int i = 0; i < 4; i++) {
        double v = test_metric_value(m, series[i]);
        ck_assert_msg((v < 0 ? 0 : v) == want[i], "%s= %g, expected %g", series[i], v, want[i]);
    }
    ck_assert_ptr_null(strstr(m, "code=\"CANCELLED\""));
    ck_assert_ptr_nonnull(strstr(m, "epmoe_stage_seconds_count{stage=\"experts\"}"));
    ck_assert_ptr_nonnull(strstr(m, "epmoe_expert_tokens_total{layer=\"0\",expert=\"0\"}"));
    free(m);
    epmoe_rpc_channel_close(ch);
    ck_assert_int_eq(test_server_stop(&srv, 120), 0);
}
END_TEST

/* ---- drain under load -------------------------------------------------------------------- */

typedef struct {
    epmoe_rpc_channel *ch;
    int stream;
    atomic_int *stop_sent;
    int64_t ok, ok_after_stop, unavailable, wrong, other;
    char last_error[600];
} drain_stream;

static void *drain_stream_main(void *arg) {
    drain_stream *s = arg;
    epmoe_rng rng;
    epmoe_rng_seed(&rng, 500 + (uint64_t)s->stream);
    for (int i = 0; i < 100000; i++) {
        int sent_before = atomic_load(s->stop_sent);
        call_result r;
        call_forward(s->ch, &rng, 1 + (int64_t)epmoe_rng_below(&rng, MAX_T), BAD_NONE, 60, &r);
        if (r.code == EPMOE_RPC_OK) {
            s->ok++;
            if (atomic_load(s->stop_sent)) s->ok_after_stop++;
            if (!r.rows_ok) s->wrong++;
        } else if (r.code == EPMOE_RPC_UNAVAILABLE && atomic_load(s->stop_sent)) {
            s->unavailable++;
            break;
        } else if (r.code == EPMOE_RPC_CANCELLED && sent_before) {
            /* A call that reaches the server while it closes its port is refused by the gRPC
             * library itself (never handed to the service, never computed). */
            s->unavailable++;
            break;
        } else {
            s->other++;
            snprintf(s->last_error, sizeof s->last_error, "%d %s (stop sent before: %d)", r.code,
                     r.message, sent_before);
            break;
        }
    }
    return NULL;
}

START_TEST(test_drain_under_load) {
    setup_reference();
    test_server srv;
    const char *extra[] = {"--drain-linger-ms", "100", NULL};
    test_server_start(&srv, 3, checkpoint, extra, 300);
    epmoe_rpc_channel *ch = NULL;
    ck_assert_int_eq(epmoe_rpc_channel_open(srv.target, 64 << 20, &ch), EPMOE_OK);
    atomic_int stop_sent = 0;
    enum { N = 8 };
    drain_stream st[N];
    pthread_t th[N];
    for (int i = 0; i < N; i++) {
        memset(&st[i], 0, sizeof st[i]);
        st[i].ch = ch;
        st[i].stream = i;
        st[i].stop_sent = &stop_sent;
        pthread_create(&th[i], NULL, drain_stream_main, &st[i]);
    }
    /* SIGTERM once requests are being served and some are accepted and unanswered. */
    int loaded = 0;
    for (int i = 0; i < 30000 && !loaded; i++) {
        char *m = test_fetch_metrics(srv.metrics_port);
        ck_assert_ptr_nonnull(m);
        loaded = test_metric_value(m, "epmoe_requests_total{method=\"Forward\",code=\"OK\"} ") >= N &&
                 test_metric_value(m, "epmoe_inflight_requests ") >= 2;
        free(m);
        if (!loaded) usleep(1000);
    }
    ck_assert_msg(loaded, "the server never had two calls in flight");
    atomic_store(&stop_sent, 1);
    kill(srv.rank0_pid, SIGTERM);
    int64_t ok_after = 0;
    for (int i = 0; i < N; i++) {
        pthread_join(th[i], NULL);
        ck_assert_msg(st[i].other == 0, "stream %d: %s", i, st[i].last_error);
        ck_assert_int_eq(st[i].wrong, 0);
        ck_assert_int_eq(st[i].unavailable, 1); /* each stream ends refused */
        ok_after += st[i].ok_after_stop;
    }
    ck_assert_int_ge(ok_after, 1); /* calls in flight at SIGTERM were answered */
    epmoe_rpc_channel_close(ch);
    ck_assert_int_eq(test_server_stop(&srv, 120), 0); /* SIGTERM again is harmless */
}
END_TEST

static void teardown(void) { test_kill_all(); }

static Suite *e2e_suite(void) {
    Suite *s = suite_create("service_e2e");
    TCase *tc = tcase_create("e2e");
    tcase_set_timeout(tc, 900);
    tcase_add_checked_fixture(tc, NULL, teardown); /* runs after a failed assertion too */
    tcase_add_test(tc, test_concurrent_clients_match_batch_job);
    tcase_add_test(tc, test_drain_under_load);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) {
    test_reaper_start(); /* before any thread: it forks */
    signal(SIGPIPE, SIG_IGN);
    SRunner *sr = srunner_create(e2e_suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? 1 : 0;
}
