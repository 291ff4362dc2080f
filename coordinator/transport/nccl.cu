/* The nccl device transport: one rank per GPU, payload as grouped ncclSend/ncclRecv on the
 * bound stream, a non-blocking communicator that the watchdog polls (device_impl.h). In a
 * build without NCCL these calls say so. */
#include <stdio.h>
#include <string.h>

#ifdef EPMOE_HAVE_NCCL
#include <nccl.h>
#endif

#include "coordinator/transport/agree.h"
#include "coordinator/transport/device_impl.h"

#ifdef EPMOE_HAVE_NCCL
static ncclComm_t comm_of(const device_impl *d) { return (ncclComm_t)d->nccl; }

/* Aborts the communicator (frees it; in-flight kernels return) and marks the transport dead. */
void epmoe_dt_nccl_abort(device_impl *d) {
    if (d->nccl) ncclCommAbort(comm_of(d));
    d->nccl = NULL;
    d->dead = 1;
}

static epmoe_status nccl_fail(device_impl *d, ncclResult_t r, const char *what) {
    const char *detail = d->nccl ? ncclGetLastError(comm_of(d)) : ncclGetLastError(NULL);
    char copy[256];
    snprintf(copy, sizeof copy, "%s", detail ? detail : "");
    epmoe_dt_nccl_abort(d);
    EPMOE_FAIL(EPMOE_ERR_NCCL, "rank %d: %s failed: %s (%s); communicator aborted", d->rank, what,
               ncclGetErrorString(r), copy);
}

static epmoe_status nccl_timeout(device_impl *d, const char *what) {
    epmoe_dt_nccl_abort(d);
    EPMOE_FAIL(EPMOE_ERR_PEER_LOST,
               "rank %d: %s did not finish within collective_timeout_s = %.1f s: a peer rank "
               "died or hung (NCCL does not say which); NCCL communicator aborted",
               d->rank, what, d->timeout_s);
}

/* After a non-blocking NCCL call: polls the communicator until its work is enqueued. */
static epmoe_status nccl_settle(device_impl *d, ncclResult_t r, const char *what) {
    if (r != ncclSuccess && r != ncclInProgress) return nccl_fail(d, r, what);
    const double start = epmoe_seconds_now();
    for (;;) {
        ncclResult_t state = ncclSuccess;
        ncclResult_t q = ncclCommGetAsyncError(comm_of(d), &state);
        if (q != ncclSuccess) return nccl_fail(d, q, "ncclCommGetAsyncError");
        if (state == ncclSuccess) return EPMOE_OK;
        if (state != ncclInProgress) return nccl_fail(d, state, what);
        if (dt_timed_out(d, start)) return nccl_timeout(d, what);
        epmoe_pause_since(start);
    }
}

epmoe_status epmoe_dt_nccl_alltoallv(device_impl *d, const void *send, const int64_t *send_counts,
                                   const int64_t *send_displs, void *recv,
                                   const int64_t *recv_counts, const int64_t *recv_displs,
                                   size_t elem_bytes, const char *what) {
    ncclResult_t first = ncclSuccess;
    ncclResult_t r = ncclGroupStart();
    if (r != ncclSuccess) return nccl_fail(d, r, "ncclGroupStart");
    for (int p = 0; p < d->n_ranks; p++) {
        if (send_counts[p] > 0) {
            r = ncclSend((const char *)send + (size_t)send_displs[p] * elem_bytes,
                         (size_t)send_counts[p] * elem_bytes, ncclInt8, p, comm_of(d), d->stream);
            if (r != ncclSuccess && r != ncclInProgress && first == ncclSuccess) first = r;
        }
        if (recv_counts[p] > 0) {
            r = ncclRecv((char *)recv + (size_t)recv_displs[p] * elem_bytes,
                         (size_t)recv_counts[p] * elem_bytes, ncclInt8, p, comm_of(d), d->stream);
            if (r != ncclSuccess && r != ncclInProgress && first == ncclSuccess) first = r;
        }
    }
    r = ncclGroupEnd(); /* always closes the group, also after a failed call inside it */
    if (first != ncclSuccess) return nccl_fail(d, first, what);
    return nccl_settle(d, r, what);
}

epmoe_status epmoe_dt_nccl_poll(device_impl *d, double start, const char *what) {
    ncclResult_t state = ncclSuccess;
    ncclResult_t r = ncclCommGetAsyncError(comm_of(d), &state);
    if (r != ncclSuccess) return nccl_fail(d, r, "ncclCommGetAsyncError");
    if (state != ncclSuccess && state != ncclInProgress) return nccl_fail(d, state, what);
    if (dt_timed_out(d, start)) return nccl_timeout(d, what);
    return EPMOE_OK;
}

void epmoe_dt_nccl_close(device_impl *d) {
    if (!d->nccl) return;
    if (!d->dead && nccl_settle(d, ncclCommFinalize(comm_of(d)), "ncclCommFinalize") == EPMOE_OK)
        ncclCommDestroy(comm_of(d));
    else if (d->nccl)
        ncclCommAbort(comm_of(d));
    d->nccl = NULL;
}

epmoe_status epmoe_dt_nccl_connect(device_impl *d) {
    epmoe_status st = EPMOE_OK;
    MPI_Comm comm = d->comm;
    /* Rank 0 makes the id; its success travels with it so that no rank waits for an id that
     * will never come. */
    struct {
        int ok;
        ncclUniqueId id;
    } boot;
    memset(&boot, 0, sizeof boot);
    int rank = 0;
    MPI_Comm_rank(comm, &rank);
    if (rank == 0) {
        ncclResult_t r = ncclGetUniqueId(&boot.id);
        boot.ok = r == ncclSuccess;
        if (!boot.ok && st == EPMOE_OK)
            st = epmoe_set_error(EPMOE_ERR_NCCL, __FILE__, __LINE__,
                                 "ncclGetUniqueId failed: %s", ncclGetErrorString(r));
    }
    int rc = MPI_Bcast(&boot, (int)sizeof boot, MPI_BYTE, 0, comm);
    if (rc != MPI_SUCCESS && st == EPMOE_OK) st = epmoe_mpi_error(rc, "MPI_Bcast(NCCL id)");
    if (!boot.ok && st == EPMOE_OK)
        st = epmoe_set_error(EPMOE_ERR_NCCL, __FILE__, __LINE__,
                             "rank %d: rank 0 could not create the NCCL id", rank);
    if (st == EPMOE_OK) {
        ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
        config.blocking = 0; /* every call returns; the watchdog polls */
        ncclComm_t c = NULL;
        ncclResult_t r = ncclCommInitRankConfig(&c, d->n_ranks, boot.id, d->rank, &config);
        d->nccl = r == ncclSuccess || r == ncclInProgress ? c : NULL;
        st = d->nccl ? nccl_settle(d, r, "ncclCommInitRankConfig")
                     : epmoe_set_error(EPMOE_ERR_NCCL, __FILE__, __LINE__,
                                       "rank %d: ncclCommInitRankConfig failed: %s (device %d; "
                                       "NCCL needs one GPU per rank)",
                                       d->rank, ncclGetErrorString(r), d->device);
    }
    return st;
}
#else
static epmoe_status no_nccl(void) {
    EPMOE_FAIL(EPMOE_ERR_UNSUPPORTED, "this build has no NCCL (headers or library not found by "
                                      "CMake): use the mpi-staged transport");
}
epmoe_status epmoe_dt_nccl_connect(device_impl *d) {
    (void)d;
    return no_nccl();
}
epmoe_status epmoe_dt_nccl_alltoallv(device_impl *d, const void *send, const int64_t *send_counts,
                                     const int64_t *send_displs, void *recv,
                                     const int64_t *recv_counts, const int64_t *recv_displs,
                                     size_t elem_bytes, const char *what) {
    (void)d, (void)send, (void)send_counts, (void)send_displs, (void)recv, (void)recv_counts;
    (void)recv_displs, (void)elem_bytes, (void)what;
    return no_nccl();
}
epmoe_status epmoe_dt_nccl_poll(device_impl *d, double start, const char *what) {
    (void)d, (void)start, (void)what;
    return EPMOE_OK;
}
void epmoe_dt_nccl_abort(device_impl *d) { d->dead = 1; }
void epmoe_dt_nccl_close(device_impl *d) { (void)d; }
#endif
