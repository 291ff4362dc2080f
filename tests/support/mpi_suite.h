/* Running a Check suite under mpiexec so that a failure fails every rank within seconds.
 *
 * MPI allows only CK_NOFORK, where a failed assertion ends the test on the rank that failed;
 * that rank then goes on to the next test while its peers still wait in the failed test's
 * collectives, until ctest's timeout (1500 s). So every test case of an MPI suite is guarded:
 *   - before each test (a checked setup, which Check runs after the previous test's result is
 *     counted), a rank with a failure prints it and calls MPI_Abort: the launcher ends every
 *     rank at once; the same after the last test;
 *   - each test runs under an alarm (EPMOE_MPI_TEST_TIMEOUT_S, default 300 s): a rank still in
 *     one test after that says so and exits, and the launcher ends the others (a hang that is
 *     not an assertion: a collective some rank never entered).
 */
#ifndef EPMOE_MPI_SUITE_H
#define EPMOE_MPI_SUITE_H

#include <check.h>

/* Adds the guard to a test case (call for every TCase of an MPI suite). */
void epmoe_mpi_guard_tcase(TCase *tc);

/* Runs the suite with CK_NOFORK (rank 0 prints, the others are silent unless they fail); on any
 * failure prints it and calls MPI_Abort. Returns 0 when every test passed. Call between
 * MPI_Init and MPI_Finalize. */
int epmoe_mpi_run_suite(Suite *s);

#endif
