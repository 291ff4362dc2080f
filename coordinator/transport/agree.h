/* Agreement on failure, and waiting on MPI under the watchdog: the one place for each.
 *
 * epmoe_agree: every rank calls it after a step with its own status. If none failed, all get
 * EPMOE_OK. If some failed, every rank returns the status and message of the LOWEST failing
 * rank (shards are contiguous in rank order, so that is also the lowest failing batch row),
 * prefixed with that rank where it is not the caller. So the root, which answers the user,
 * reports the real cause wherever it happened, and every rank leaves the step together (no rank
 * waits in a collective that a failed peer never enters). One small allreduce when all succeed,
 * one broadcast of the message otherwise.
 *
 * epmoe_mpi_wait: waits for MPI requests, polling, for at most timeout_s (0 = forever). A
 * request still pending then means a peer died or hung: EPMOE_ERR_PEER_LOST naming `what` (and
 * the peers of the pending requests when the caller says which peer each request talks to).
 * The requests are abandoned: the job cannot continue (programs exit non-zero).
 */
#ifndef EPMOE_AGREE_H
#define EPMOE_AGREE_H

#include <mpi.h>

#include "common/status.h"

#ifdef __cplusplus
extern "C" {
#endif

epmoe_status epmoe_agree(MPI_Comm comm, epmoe_status local, const char *what,
                         double timeout_s);

/* peer_of_request: [n] the rank each request exchanges with, or NULL (a collective). */
epmoe_status epmoe_mpi_wait(MPI_Request *requests, int n, const int *peer_of_request,
                            double timeout_s, int rank, const char *what);

/* "MPI_Xxx failed: <MPI's text>" as EPMOE_ERR_MPI. */
epmoe_status epmoe_mpi_error(int rc, const char *what);

#ifdef __cplusplus
}
#endif
#endif
