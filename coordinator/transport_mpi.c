/* MPI transport: counts with MPI_Alltoall, payload with MPI_Alltoallv on host buffers. Element
 * counts above INT_MAX are sent as a contiguous datatype of a larger unit when possible. */
#include "coordinator/transport_mpi.h"

#include <limits.h>
#include <stdlib.h>

typedef struct {
    MPI_Comm comm;
    int *send_counts, *send_displs, *recv_counts, *recv_displs; /* [P] scratch */
} mpi_impl;

static epmoe_status mpi_error(int rc, const char *what) {
    char msg[MPI_MAX_ERROR_STRING];
    int len = 0;
    MPI_Error_string(rc, msg, &len);
    EPMOE_FAIL(EPMOE_ERR_MPI, "%s failed: %s", what, msg);
}

static epmoe_status mpi_exchange_counts(epmoe_transport *t, const int64_t *send_counts,
                                        int64_t *recv_counts) {
    mpi_impl *m = t->impl;
    int rc = MPI_Alltoall(send_counts, 1, MPI_INT64_T, recv_counts, 1, MPI_INT64_T, m->comm);
    if (rc != MPI_SUCCESS) return mpi_error(rc, "MPI_Alltoall(counts)");
    return EPMOE_OK;
}

static epmoe_status mpi_alltoallv(epmoe_transport *t, const void *send,
                                  const int64_t *send_counts, const int64_t *send_displs,
                                  void *recv, const int64_t *recv_counts,
                                  const int64_t *recv_displs, size_t elem_bytes) {
    mpi_impl *m = t->impl;
    MPI_Datatype elem;
    int rc = MPI_Type_contiguous((int)elem_bytes, MPI_BYTE, &elem);
    if (rc != MPI_SUCCESS) return mpi_error(rc, "MPI_Type_contiguous");
    MPI_Type_commit(&elem);
    for (int p = 0; p < t->n_ranks; p++) {
        if (send_counts[p] > INT_MAX || send_displs[p] > INT_MAX || recv_counts[p] > INT_MAX ||
            recv_displs[p] > INT_MAX) {
            MPI_Type_free(&elem);
            EPMOE_FAIL(EPMOE_ERR_UNSUPPORTED,
                       "all-to-all block for peer %d exceeds %d elements of %zu bytes; lower "
                       "max_tokens_per_rank",
                       p, INT_MAX, elem_bytes);
        }
        m->send_counts[p] = (int)send_counts[p];
        m->send_displs[p] = (int)send_displs[p];
        m->recv_counts[p] = (int)recv_counts[p];
        m->recv_displs[p] = (int)recv_displs[p];
    }
    rc = MPI_Alltoallv(send, m->send_counts, m->send_displs, elem, recv, m->recv_counts,
                       m->recv_displs, elem, m->comm);
    MPI_Type_free(&elem);
    if (rc != MPI_SUCCESS) return mpi_error(rc, "MPI_Alltoallv(payload)");
    return EPMOE_OK;
}

static epmoe_status mpi_any_failed(epmoe_transport *t, int local_failed, int *any_failed) {
    mpi_impl *m = t->impl;
    int rc = MPI_Allreduce(&local_failed, any_failed, 1, MPI_INT, MPI_MAX, m->comm);
    if (rc != MPI_SUCCESS) return mpi_error(rc, "MPI_Allreduce(status)");
    return EPMOE_OK;
}

static void mpi_destroy(epmoe_transport *t) {
    if (!t) return;
    mpi_impl *m = t->impl;
    if (m) {
        free(m->send_counts);
        free(m->send_displs);
        free(m->recv_counts);
        free(m->recv_displs);
        free(m);
    }
    free(t);
}

static const epmoe_transport_ops mpi_ops = {
    .name = "mpi",
    .exchange_counts = mpi_exchange_counts,
    .alltoallv = mpi_alltoallv,
    .any_failed = mpi_any_failed,
    .destroy = mpi_destroy,
};

epmoe_status epmoe_transport_mpi_create(MPI_Comm comm, epmoe_transport **out) {
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
    MPI_Comm_rank(comm, &t->rank);
    MPI_Comm_size(comm, &t->n_ranks);
    size_t P = (size_t)t->n_ranks;
    m->send_counts = malloc(P * sizeof(int));
    m->send_displs = malloc(P * sizeof(int));
    m->recv_counts = malloc(P * sizeof(int));
    m->recv_displs = malloc(P * sizeof(int));
    if (!m->send_counts || !m->send_displs || !m->recv_counts || !m->recv_displs) {
        mpi_destroy(t);
        EPMOE_FAIL(EPMOE_ERR_OOM, "MPI transport: out of memory");
    }
    /* Errors come back as codes so the engine can report them instead of aborting. */
    MPI_Comm_set_errhandler(comm, MPI_ERRORS_RETURN);
    *out = t;
    return EPMOE_OK;
}
