/* Helpers for the service tests that run the real programs: spawn `mpiexec -np N epmoe-serve`
 * on loopback with a free port (it binds port 0 and reports the port in its ready file), wait
 * for it, stop it with SIGTERM to rank 0, and fetch /metrics. Everything is bounded in time. */
#ifndef EPMOE_SERVICE_TEST_UTIL_H
#define EPMOE_SERVICE_TEST_UTIL_H

#include <sys/types.h>

typedef struct {
    pid_t mpiexec_pid;
    pid_t rank0_pid;
    int port, metrics_port;
    char target[64];
    char log_path[1024];
} test_server;

/* Starts the server with `extra` arguments (NULL-terminated, may be NULL); fails the test when
 * it is not serving within timeout_seconds. */
void test_server_start(test_server *s, int n_ranks, const char *checkpoint,
                       const char *const *extra, double timeout_seconds);
/* SIGTERM to rank 0; returns mpiexec's exit status (-1 if it did not exit in time: then it is
 * killed). */
int test_server_stop(test_server *s, double timeout_seconds);
/* Runs argv to completion (stdout/stderr to log_path); returns its exit status or -1. */
int test_run(char *const argv[], const char *log_path, double timeout_seconds);
/* GET /metrics; malloc'd body or NULL. */
char *test_fetch_metrics(int port);
/* Value of the first sample line starting with `series` (e.g. "epmoe_tokens_total "); -1 if
 * absent. */
double test_metric_value(const char *text, const char *series);
const char *test_env(const char *name);

#endif
