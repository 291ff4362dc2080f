#include "coordinator/transport/agree.h"

#include <stdio.h>
#include <string.h>

#include "common/clock.h"

#define AGREE_MESSAGE_BYTES 1024

epmoe_status epmoe_mpi_error(int rc, const char *what) {
    char msg[MPI_MAX_ERROR_STRING];
    int len = 0;
    MPI_Error_string(rc, msg, &len);
    EPMOE_FAIL(EPMOE_ERR_MPI, "%s failed: %s", what, msg);
}

epmoe_status epmoe_mpi_wait(MPI_Request *requests, int n, const int *peer_of_request,
                            double timeout_s, int rank, const char *what) {
    const double start = epmoe_seconds_now();
    for (;;) {
        int done = 0;
        int rc = MPI_Testall(n, requests, &done, MPI_STATUSES_IGNORE);
        if (rc != MPI_SUCCESS) return epmoe_mpi_error(rc, what);
        if (done) return EPMOE_OK;
        const double waited = epmoe_seconds_now() - start;
        if (timeout_s > 0 && waited > timeout_s) break;
        epmoe_pause_since(start);
    }
    char peers[256] = "";
    if (peer_of_request) {
        /* a peer may have both a send and a receive pending: name it once */
        int pending[64], n_pending = 0;
        for (int i = 0; i < n && n_pending < 64; i++) {
            int flag = 1;
            if (requests[i] != MPI_REQUEST_NULL)
                MPI_Request_get_status(requests[i], &flag, MPI_STATUS_IGNORE);
            int seen = 0;
            for (int j = 0; j < n_pending; j++) seen |= pending[j] == peer_of_request[i];
            if (!flag && !seen) pending[n_pending++] = peer_of_request[i];
        }
        size_t used = 0;
        for (int i = 0; i < n_pending && used + 16 < sizeof peers; i++)
            used += (size_t)snprintf(peers + used, sizeof peers - used, "%s%d", i ? ", " : "",
                                     pending[i]);
    }
    if (peers[0])
        EPMOE_FAIL(EPMOE_ERR_PEER_LOST,
                   "rank %d: %s not done within collective_timeout_s = %.1f s: no answer from "
                   "rank %s (dead or hung)",
                   rank, what, timeout_s, peers);
    EPMOE_FAIL(EPMOE_ERR_PEER_LOST,
               "rank %d: %s not done within collective_timeout_s = %.1f s: a peer rank died or "
               "hung",
               rank, what, timeout_s);
}

epmoe_status epmoe_agree(MPI_Comm comm, epmoe_status local, const char *what,
                         double timeout_s) {
    int rank = 0, size = 1;
    MPI_Comm_rank(comm, &rank);
    MPI_Comm_size(comm, &size);
    /* A rank whose own failure is a lost peer may not be able to talk to everyone: it says so
     * without waiting for an agreement that may never come. */
    if (local == EPMOE_ERR_PEER_LOST) return local;
    char saved[AGREE_MESSAGE_BYTES];
    snprintf(saved, sizeof saved, "%s", local != EPMOE_OK ? epmoe_last_error() : "");

    int mine = local != EPMOE_OK ? rank : size, lowest = size;
    MPI_Request req;
    int rc = MPI_Iallreduce(&mine, &lowest, 1, MPI_INT, MPI_MIN, comm, &req);
    if (rc != MPI_SUCCESS) return epmoe_mpi_error(rc, "MPI_Iallreduce(agreement)");
    char step[160];
    snprintf(step, sizeof step, "agreement after '%s'", what);
    EPMOE_TRY(epmoe_mpi_wait(&req, 1, NULL, timeout_s, rank, step));
    if (lowest == size) return EPMOE_OK;

    /* message[0..3]: the status; then the text */
    char message[AGREE_MESSAGE_BYTES + sizeof(int)];
    memset(message, 0, sizeof message);
    if (rank == lowest) {
        int code = (int)local;
        memcpy(message, &code, sizeof code);
        memcpy(message + sizeof code, saved, sizeof saved);
    }
    rc = MPI_Ibcast(message, (int)sizeof message, MPI_CHAR, lowest, comm, &req);
    if (rc != MPI_SUCCESS) return epmoe_mpi_error(rc, "MPI_Ibcast(agreement)");
    EPMOE_TRY(epmoe_mpi_wait(&req, 1, NULL, timeout_s, rank, step));
    int code = 0;
    memcpy(&code, message, sizeof code);
    message[sizeof message - 1] = 0;
    if (rank == lowest) return epmoe_set_error_text((epmoe_status)code, saved);
    char text[AGREE_MESSAGE_BYTES + 200];
    snprintf(text, sizeof text, "rank %d failed to %s: %s", lowest, what, message + sizeof code);
    return epmoe_set_error_text((epmoe_status)code, text);
}
