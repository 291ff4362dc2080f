#include "tests/support/mpi_suite.h"

#include <mpi.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static SRunner *runner;
static int world_rank;
static unsigned test_timeout_s = 300;

static void print_failures_and_abort(const char *when) {
    int n = srunner_ntests_failed(runner);
    TestResult **failures = srunner_failures(runner);
    for (int i = 0; failures && i < n; i++)
        fprintf(stderr, "rank %d: FAILED %s:%d: %s: %s\n", world_rank, tr_lfile(failures[i]),
                tr_lno(failures[i]), tr_tcname(failures[i]), tr_msg(failures[i]));
    fprintf(stderr,
            "rank %d: %d test(s) failed (%s): MPI_Abort, so that no rank waits in a collective "
            "the failed test left\n",
            world_rank, n, when);
    fflush(stderr);
    free(failures);
    MPI_Abort(MPI_COMM_WORLD, 1);
}

static void on_alarm(int sig) {
    (void)sig;
    static const char msg[] = "a test ran past EPMOE_MPI_TEST_TIMEOUT_S (a rank hangs in a "
                              "collective): exiting so that the launcher ends every rank\n";
    char head[32];
    int n = snprintf(head, sizeof head, "rank %d: ", world_rank);
    ssize_t ignored = write(STDERR_FILENO, head, (size_t)n);
    ignored = write(STDERR_FILENO, msg, sizeof msg - 1);
    (void)ignored;
    _exit(124);
}

static void guard_setup(void) {
    if (srunner_ntests_failed(runner) > 0) print_failures_and_abort("before the next test");
    alarm(test_timeout_s);
}

static void guard_teardown(void) { alarm(0); }

void epmoe_mpi_guard_tcase(TCase *tc) { tcase_add_checked_fixture(tc, guard_setup, guard_teardown); }

int epmoe_mpi_run_suite(Suite *s) {
    MPI_Comm_rank(MPI_COMM_WORLD, &world_rank);
    const char *env = getenv("EPMOE_MPI_TEST_TIMEOUT_S");
    if (env && atoi(env) > 0) test_timeout_s = (unsigned)atoi(env);
    signal(SIGALRM, on_alarm);
    runner = srunner_create(s);
    srunner_set_fork_status(runner, CK_NOFORK);
    srunner_run_all(runner, world_rank == 0 ? CK_NORMAL : CK_SILENT);
    if (srunner_ntests_failed(runner) > 0) print_failures_and_abort("after the last test");
    srunner_free(runner);
    return 0;
}
