/* MPI transport on host buffers. Counts with MPI_Ialltoall; payload as one MPI_Isend/Irecv per
 * peer (so a wait that times out can name the peers whose data never came); every wait under
 * the watchdog (coordinator/transport/agree.h). Blocks larger than INT_MAX elements are refused
 * with a message (lower max_tokens_per_rank). */
#include "coordinator/transport/mpi.h"

#include <limits.h>
#include <stdlib.h>

#include "coordinator/transport/agree.h"

typedef struct {
    MPI_Comm comm;
    double timeout_s;
    int dead;            /* a wait timed out: requests were abandoned, refuse further work */
    MPI_Request *requests; /* [2P] */
    int *peer_of_request;  /* [2P] */
} mpi_impl;

static epmoe_status check_alive(const epmoe_transport *t, const char *what) {
    const mpi_impl *m = t->impl;
    EPMOE_REQUIRE(!m->dead, EPMOE_ERR_PEER_LOST,
                  "rank %d: %s: the mpi transport is dead after an earlier collective timed out",
                  t->rank, what);
    return EPMOE_OK;
}

static epmoe_status wait_or_die(epmoe_transport *t, int n, const int *peers, const char *what) {
    mpi_impl *m = t->impl;
    epmoe_status st = epmoe_mpi_wait(m->requests, n, peers, m->timeout_s, t->rank, what);
    if (st == EPMOE_ERR_PEER_LOST) m->dead = 1;
    return st;
}

static epmoe_status mpi_exchange_counts(epmoe_transport *t, const int64_t *send_counts,
                                        int64_t *recv_counts) {
    mpi_impl *m = t->impl;
    EPMOE_TRY(check_alive(t, "exchange of counts"));
    int rc = MPI_Ialltoall(send_counts, 1, MPI_INT64_T, recv_counts, 1, MPI_INT64_T, m->comm,
                           &m->requests[0]);
    if (rc != MPI_SUCCESS) return epmoe_mpi_error(rc, "MPI_Ialltoall(counts)");
    return wait_or_die(t, 1, NULL, "exchange of counts (MPI_Ialltoall)");
}

static epmoe_status mpi_alltoallv(epmoe_transport *t, const void *send,
                                  const int64_t *send_counts, const int64_t *send_displs,
                                  void *recv, const int64_t *recv_counts,
                                  const int64_t *recv_displs, size_t elem_bytes) {
    mpi_impl *m = t->impl;
    EPMOE_TRY(check_alive(t, "all-to-all"));
    for (int p = 0; p < t->n_ranks; p++)
        EPMOE_REQUIRE(send_counts[p] <= INT_MAX && recv_counts[p] <= INT_MAX,
                      EPMOE_ERR_UNSUPPORTED,
                      "all-to-all block for peer %d exceeds %d elements of %zu bytes; lower "
                      "max_tokens_per_rank",
                      p, INT_MAX, elem_bytes);
    MPI_Datatype elem;
    int rc = MPI_Type_contiguous((int)elem_bytes, MPI_BYTE, &elem);
    if (rc != MPI_SUCCESS) return epmoe_mpi_error(rc, "MPI_Type_contiguous");
    MPI_Type_commit(&elem);
    const int tag = 7401;
    int n = 0;
    for (int p = 0; p < t->n_ranks && rc == MPI_SUCCESS; p++) {
        m->peer_of_request[n] = p;
        rc = MPI_Irecv((char *)recv + (size_t)recv_displs[p] * elem_bytes, (int)recv_counts[p],
                       elem, p, tag, m->comm, &m->requests[n++]);
    }
    for (int p = 0; p < t->n_ranks && rc == MPI_SUCCESS; p++) {
        m->peer_of_request[n] = p;
        rc = MPI_Isend((const char *)send + (size_t)send_displs[p] * elem_bytes,
                       (int)send_counts[p], elem, p, tag, m->comm, &m->requests[n++]);
    }
    MPI_Type_free(&elem);
    if (rc != MPI_SUCCESS) return epmoe_mpi_error(rc, "MPI_Isend/Irecv(payload)");
    return wait_or_die(t, n, m->peer_of_request, "all-to-all of rows");
}

static epmoe_status mpi_agree(epmoe_transport *t, epmoe_status local, const char *what) {
    mpi_impl *m = t->impl;
    if (m->dead) return local != EPMOE_OK ? local : check_alive(t, what);
    epmoe_status st = epmoe_agree(m->comm, local, what, m->timeout_s);
    if (st == EPMOE_ERR_PEER_LOST) m->dead = 1;
    return st;
}

static void mpi_destroy(epmoe_transport *t) {
    if (!t) return;
    mpi_impl *m = t->impl;
    if (m) {
        free(m->requests);
        free(m->peer_of_request);
        free(m);
    }
    free(t);
}

static const epmoe_transport_ops mpi_ops = {
    .name = "mpi",
    .exchange_counts = mpi_exchange_counts,
    .alltoallv = mpi_alltoallv,
    .agree = mpi_agree,
    .destroy = mpi_destroy,
};

epmoe_status epmoe_transport_mpi_create(MPI_Comm comm, double timeout_s, epmoe_transport **out) {
    epmoe_transport *t = calloc(1, sizeof *t);
    mpi_impl *m = calloc(1, sizeof *m);
    if (!t || !m) {
        free(t);
        free(m);
        EPMOE_FAIL(EPMOE_ERR_OOM, "MPI transport: out of memory");
    }
    t->ops = &mpi_ops;
    t->impl = m;
    m->comm = comm;
    m->timeout_s = timeout_s;
    MPI_Comm_rank(comm, &t->rank);
    MPI_Comm_size(comm, &t->n_ranks);
    size_t P = (size_t)t->n_ranks;
    m->requests = malloc(2 * P * sizeof *m->requests);
    m->peer_of_request = malloc(2 * P * sizeof *m->peer_of_request);
    if (!m->requests || !m->peer_of_request) {
        mpi_destroy(t);
        EPMOE_FAIL(EPMOE_ERR_OOM, "MPI transport: out of memory");
    }
    /* Errors come back as codes so the engine can report them instead of aborting. */
    MPI_Comm_set_errhandler(comm, MPI_ERRORS_RETURN);
    *out = t;
    return EPMOE_OK;
}
