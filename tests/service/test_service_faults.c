/* epmoe-serve under faults, end to end (the real programs, tiny checkpoint):
 *   - one request whose row is finite but huge (3.0e38), batched with six good ones: only it
 *     fails, INVALID_ARGUMENT naming ITS row; the six are answered bit-identical to `epmoe-run`
 *     on their rows alone (issue 24, defect 1; DESIGN §9);
 *   - a hung rank (SIGSTOP): the waiting call is answered UNAVAILABLE naming the rank, health
 *     turns NOT_SERVING, and the job ends non-zero so that a scheduler restarts it (defect 3).
 * Every process started is killed on every path (service_test_util.h). */
#include <check.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/tensor.h"
#include "coordinator/service/client.h"
#include "coordinator/service/grpc_adapter.h"
#include "service_test_util.h"

enum { N_REQ = 7, ROWS = 4, BAD_REQ = 3, BAD_ROW = 2 };

typedef struct {
    epmoe_rpc_channel *ch;
    int index;        /* pool rows [index * ROWS, index * ROWS + ROWS) */
    int bad;          /* row BAD_ROW is 3.0e38 everywhere */
    int code;
    int rows_ok;
    int64_t batch_requests;
    char message[512];
} req_job;

/* One Forward over layers [1, 3) (routed by score, no token ids) with pool rows. */
static void *request_main(void *arg) {
    req_job *j = arg;
    const test_pool *p = test_pool_get();
    const int64_t H = p->H;
    float *x = malloc((size_t)(ROWS * H) * sizeof(float));
    memcpy(x, p->x + (size_t)(j->index * ROWS * H), (size_t)(ROWS * H) * sizeof(float));
    if (j->bad)
        for (int64_t h = 0; h < H; h++) x[BAD_ROW * H + h] = 3.0e38f;
    char id[32];
    snprintf(id, sizeof id, "%s-%d", j->bad ? "bad" : "good", j->index);
    epmoe_forward_args a = {id, ROWS, H, EPMOE_DTYPE_F32, x, NULL, 1, 3, 120};
    epmoe_forward_reply r;
    epmoe_status st = epmoe_client_forward(j->ch, &a, &r);
    ck_assert_msg(st == EPMOE_OK, "%s", epmoe_last_error());
    j->code = r.code;
    snprintf(j->message, sizeof j->message, "%s", r.message);
    j->batch_requests = r.batch_requests;
    j->rows_ok = r.code == EPMOE_RPC_OK && r.n_tokens == ROWS && strcmp(r.request_id, id) == 0 &&
                 memcmp(r.hidden_states, p->ref_13 + (size_t)(j->index * ROWS * H),
                        (size_t)(ROWS * H) * sizeof(float)) == 0;
    epmoe_forward_reply_free(&r);
    free(x);
    return NULL;
}

START_TEST(test_bad_request_fails_alone) {
    const test_pool *p = test_pool_get();
    test_server srv;
    /* The batch fires when its token budget is full, i.e. once all seven have arrived (the
     * queue delay is far longer, and the first waits too: wait_when_idle): the seven ride in
     * one forward, deterministically. */
    char budget[16];
    snprintf(budget, sizeof budget, "%d", N_REQ * ROWS);
    const char *extra[] = {"--max-batch-tokens", budget, "--max-queue-delay-us", "10000000",
                           "--wait-when-idle", "1", "--log-level", "2", NULL};
    test_server_start(&srv, 2, p->checkpoint, extra, 300);
    epmoe_rpc_channel *ch = NULL;
    ck_assert_int_eq(epmoe_rpc_channel_open(srv.target, 64 << 20, &ch), EPMOE_OK);

    req_job jobs[N_REQ];
    pthread_t th[N_REQ];
    for (int i = 0; i < N_REQ; i++) {
        jobs[i] = (req_job){ch, i, i == BAD_REQ, -1, 0, 0, ""};
        pthread_create(&th[i], NULL, request_main, &jobs[i]);
    }
    int64_t most_together = 0;
    for (int i = 0; i < N_REQ; i++) {
        pthread_join(th[i], NULL);
        if (i == BAD_REQ) continue;
        ck_assert_msg(jobs[i].code == EPMOE_RPC_OK, "good request %d: %d %s", i, jobs[i].code,
                      jobs[i].message);
        ck_assert_msg(jobs[i].rows_ok, "good request %d: rows differ from epmoe-run", i);
        if (jobs[i].batch_requests > most_together) most_together = jobs[i].batch_requests;
    }
    const req_job *bad = &jobs[BAD_REQ];
    printf("bad request: %s: %s\n", epmoe_rpc_code_name(bad->code), bad->message);
    ck_assert_int_eq(bad->code, EPMOE_RPC_INVALID_ARGUMENT);
    ck_assert_msg(strstr(bad->message, "hidden_states row 2:") != NULL,
                  "message does not name row %d of the request: %s", BAD_ROW, bad->message);
    ck_assert_msg(strstr(bad->message, ".c:") == NULL, "source location in: %s", bad->message);
    /* good requests still rode together after the bad one was split off */
    ck_assert_int_ge(most_together, 2);

    /* Alone, the same request fails the same way; the server goes on serving. */
    req_job again = {ch, BAD_REQ, 1, -1, 0, 0, ""};
    req_job fill[N_REQ - 1];
    pthread_t tf[N_REQ - 1];
    for (int i = 0; i < N_REQ - 1; i++) { /* fill the budget so the batch fires */
        fill[i] = (req_job){ch, 8 + i, 0, -1, 0, 0, ""};
        pthread_create(&tf[i], NULL, request_main, &fill[i]);
    }
    request_main(&again);
    for (int i = 0; i < N_REQ - 1; i++) {
        pthread_join(tf[i], NULL);
        ck_assert_int_eq(fill[i].code, EPMOE_RPC_OK);
        ck_assert(fill[i].rows_ok);
    }
    ck_assert_int_eq(again.code, EPMOE_RPC_INVALID_ARGUMENT);
    ck_assert_str_eq(again.message, bad->message);

    /* Counted as what the clients got. */
    const char *series[] = {"epmoe_requests_total{method=\"Forward\",code=\"OK\"} ",
                            "epmoe_requests_total{method=\"Forward\",code=\"INVALID_ARGUMENT\"} ",
                            "epmoe_tokens_total "};
    const double want[] = {2 * (N_REQ - 1), 2, 2 * (N_REQ - 1) * ROWS};
    char *m = test_wait_metrics(srv.metrics_port, series, want, 3, 60);
    ck_assert_ptr_nonnull(m);
    for (int i = 0; i < 3; i++)
        ck_assert_msg(test_metric_value(m, series[i]) == want[i], "%s= %g, expected %g",
                      series[i], test_metric_value(m, series[i]), want[i]);
    free(m);
    epmoe_rpc_channel_close(ch);
    ck_assert_int_eq(test_server_stop(&srv, 120), 0);
}
END_TEST

START_TEST(test_hung_rank_fails_calls_and_ends_the_job) {
    const test_pool *p = test_pool_get();
    test_server srv;
    /* a linger long enough to see NOT_SERVING before the port closes */
    const char *extra[] = {"--collective_timeout_s", "3", "--drain-linger-ms", "2000", NULL};
    test_server_start(&srv, 3, p->checkpoint, extra, 300);
    epmoe_rpc_channel *ch = NULL;
    ck_assert_int_eq(epmoe_rpc_channel_open(srv.target, 64 << 20, &ch), EPMOE_OK);
    int code = -1, serving = -1;
    ck_assert_int_eq(epmoe_client_health(ch, "", 30, &code, &serving), EPMOE_OK);
    ck_assert_int_eq(serving, 1);

    ck_assert_int_eq(kill(srv.rank_pids[2], SIGSTOP), 0);
    const int64_t H = p->H, T = 24;
    epmoe_forward_args a = {"while-hung", T, H, EPMOE_DTYPE_F32, p->x, p->ids, 0, 0, 120};
    epmoe_forward_reply r;
    double t0 = test_now();
    ck_assert_int_eq(epmoe_client_forward(ch, &a, &r), EPMOE_OK);
    double waited = test_now() - t0;
    printf("while rank 2 is stopped: %s after %.1f s: %s\n", epmoe_rpc_code_name(r.code), waited,
           r.message);
    ck_assert_int_eq(r.code, EPMOE_RPC_UNAVAILABLE);
    ck_assert_msg(strstr(r.message, "rank 2") != NULL, "the rank is not named: %s", r.message);
    ck_assert_msg(strstr(r.message, ".c:") == NULL, "source location in: %s", r.message);
    /* collective_timeout_s is 3 s; generous for a loaded machine, far below the call's 120 s */
    ck_assert_msg(waited < 60, "answered after %.1f s", waited);
    epmoe_forward_reply_free(&r);

    /* Health says NOT_SERVING while the replies flush, or the server is already gone. */
    ck_assert_int_eq(epmoe_client_health(ch, "", 30, &code, &serving), EPMOE_OK);
    ck_assert_msg((code == EPMOE_RPC_OK && serving == 2) || code == EPMOE_RPC_UNAVAILABLE,
                  "health after the loss: code %d, status %d", code, serving);
    epmoe_rpc_channel_close(ch);
    int status = test_server_wait(&srv, 120);
    printf("mpiexec exit status after the loss: %d\n", status);
    ck_assert_msg(status > 0, "the job did not end non-zero by itself (status %d)", status);
}
END_TEST

static void teardown(void) { test_kill_all(); }

int main(void) {
    test_reaper_start(); /* before any thread: it forks */
    signal(SIGPIPE, SIG_IGN);
    Suite *s = suite_create("service_faults");
    TCase *tc = tcase_create("faults");
    tcase_set_timeout(tc, 900);
    tcase_add_checked_fixture(tc, NULL, teardown); /* runs after a failed assertion too */
    tcase_add_test(tc, test_bad_request_fails_alone);
    tcase_add_test(tc, test_hung_rank_fails_calls_and_ends_the_job);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? 1 : 0;
}
