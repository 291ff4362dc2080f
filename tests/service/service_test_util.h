/* Helpers for the service tests that run the real programs: spawn `mpiexec -np N epmoe-serve`
 * on loopback with a free port (it binds port 0 and reports the port and every rank's pid in
 * its ready file), wait for it, stop it with SIGTERM to rank 0, and fetch /metrics. Everything
 * is bounded in time.
 *
 * Every process a test starts is tracked, and killed on every path: by test_kill_all (the
 * suites call it from a Check teardown, which runs after a failed assertion too), at exit, and,
 * when the test process itself is killed (a ctest timeout), by a reaper: a small child process
 * started by test_reaper_start that waits on a pipe and, once the test process is gone, sends
 * SIGCONT and SIGKILL to every process still tracked. Ranks run in process groups of their own
 * (Open MPI), and a SIGSTOPped rank outlives its mpiexec, so each rank is tracked by pid. */
#ifndef EPMOE_SERVICE_TEST_UTIL_H
#define EPMOE_SERVICE_TEST_UTIL_H

#include <stdint.h>
#include <sys/types.h>

#define TEST_MAX_RANKS 16

typedef struct {
    pid_t mpiexec_pid;
    pid_t rank0_pid;
    pid_t rank_pids[TEST_MAX_RANKS];
    int n_ranks;
    int port, metrics_port;
    char target[64];
    char log_path[1024];
} test_server;

/* Call first in main, before any thread exists (it forks). */
void test_reaper_start(void);
/* Kills (SIGCONT, SIGKILL) every tracked process that is still ours, and reaps our children. */
void test_kill_all(void);

/* Starts the server with `extra` arguments (NULL-terminated, may be NULL); fails the test when
 * it is not serving within timeout_seconds. */
void test_server_start(test_server *s, int n_ranks, const char *checkpoint,
                       const char *const *extra, double timeout_seconds);
/* SIGTERM to rank 0; returns mpiexec's exit status (-1 if it did not exit in time: then it and
 * its ranks are killed). */
int test_server_stop(test_server *s, double timeout_seconds);
/* Waits up to timeout_seconds for mpiexec to end by itself; its exit status, or -1 (then it
 * and its ranks are killed). */
int test_server_wait(test_server *s, double timeout_seconds);
/* Kills the server's mpiexec and ranks now. */
void test_server_kill(test_server *s);
/* Runs argv to completion (stdout/stderr to log_path); returns its exit status or -1. */
int test_run(char *const argv[], const char *log_path, double timeout_seconds);
/* GET /metrics; malloc'd body or NULL. */
char *test_fetch_metrics(int port);
/* Value of the first sample line starting with `series` (e.g. "epmoe_tokens_total "); -1 if
 * absent. */
double test_metric_value(const char *text, const char *series);
/* Metrics are counted when a call has ended on the server, which can be just after its client
 * got the reply: polls until every series[i] has value want[i] (absent counts as 0), for at
 * most timeout_seconds. Returns the last text fetched (malloc'd) for the caller's asserts. */
char *test_wait_metrics(int port, const char *const *series, const double *want, int n,
                        double timeout_seconds);
const char *test_env(const char *name);
double test_now(void);

/* Rows every service suite sends, and the batch job's answers for them: TEST_POOL rows that are
 * multiples of 1/64 in [-2, 2] (exact in fp32, bf16 and fp16), token ids, and `epmoe-run` (one
 * rank) over all layers and over layers [1, 3) of the tiny checkpoint. Made once per process. */
#define TEST_POOL 64
typedef struct {
    char checkpoint[1024];
    int64_t H, vocab;
    float *x;         /* [TEST_POOL, H] */
    int32_t *ids;     /* [TEST_POOL] */
    float *ref_all;   /* [TEST_POOL, H] */
    float *ref_13;    /* [TEST_POOL, H] */
} test_pool;
const test_pool *test_pool_get(void);

#endif
