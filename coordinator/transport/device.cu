/* Device transports (coordinator/transport/device.h): NCCL for one rank per GPU, mpi-staged
 * for ranks sharing a GPU, one watchdog for both. Built with EPMOE_HAVE_NCCL when CMake found
 * NCCL; without it only mpi-staged exists and epmoe_transport_nccl_create says so. */
#include "coordinator/transport/device.h"

#include <limits.h>
#include <stdio.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#ifdef EPMOE_HAVE_NCCL
#include <nccl.h>
#endif

#include "coordinator/transport/agree.h"
#include "kernels/cuda/cuda_check.h"

typedef enum { KIND_NCCL = 0, KIND_STAGED = 1 } device_kind;

struct device_impl;

/* A captured mpi-staged call: what its host node exchanges at every replay. Lives until the
 * transport is destroyed (a graph may replay it any time before that). */
typedef struct staged_op {
    struct device_impl *impl;
    int64_t *counts; /* [4P]: send counts, send displs, recv counts, recv displs (elements) */
    size_t elem_bytes;
    char what[64];
    struct staged_op *next;
} staged_op;

typedef struct device_impl {
    device_kind kind;
    MPI_Comm comm; /* our duplicate */
    int rank, n_ranks;
    int device;
    cudaStream_t stream;
    double timeout_s;
    int dead; /* a collective failed or timed out: refuse further work */
#ifdef EPMOE_HAVE_NCCL
    ncclComm_t nccl;
#endif
    int64_t *d_counts; /* [2P] device scratch of exchange_counts (nccl) */
    int64_t *h_counts; /* [2P] pinned */
    /* mpi-staged */
    void *h_send, *h_recv; /* pinned staging */
    size_t h_send_bytes, h_recv_bytes;
    int staging_frozen; /* a captured graph holds these pointers: never reallocate */
    MPI_Request *requests; /* [2P] */
    staged_op *ops;
    volatile int async_failed; /* set by a host node */
    char async_msg[600];
} device_impl;

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* Between two polls of a wait that began at `start`: yield only, for the first 2 ms (a
 * collective usually completes within that, and nanosleep's timer slack would add ~50 us to
 * every transfer: measured, the dispatch all-to-all took 3x the raw NCCL time with a sleep
 * here), then sleep 20 us per poll so that a long wait does not hold a core. */
static void pause_since(double start) {
    if (now_s() - start < 2e-3) {
        sched_yield();
        return;
    }
    struct timespec ts = {0, 20000};
    nanosleep(&ts, NULL);
}

static int timed_out(const device_impl *d, double start) {
    return d->timeout_s > 0 && now_s() - start > d->timeout_s;
}

static epmoe_status mpi_error(int rc, const char *what) {
    char msg[MPI_MAX_ERROR_STRING];
    int len = 0;
    MPI_Error_string(rc, msg, &len);
    EPMOE_FAIL(EPMOE_ERR_MPI, "%s failed: %s", what, msg);
}

static device_impl *impl_of(const epmoe_transport *t) { return (device_impl *)t->impl; }

static epmoe_status check_alive(const device_impl *d, const char *what) {
    EPMOE_REQUIRE(!d->dead, EPMOE_ERR_PEER_LOST,
                  "%s: the %s transport is dead after an earlier collective failed or timed out",
                  what, d->kind == KIND_NCCL ? "nccl" : "mpi-staged");
    return EPMOE_OK;
}

/* ---- NCCL -------------------------------------------------------------------------------- */

#ifdef EPMOE_HAVE_NCCL
/* Aborts the communicator (frees it; in-flight kernels return) and marks the transport dead. */
static void nccl_abort(device_impl *d) {
    if (d->nccl) ncclCommAbort(d->nccl);
    d->nccl = NULL;
    d->dead = 1;
}

static epmoe_status nccl_fail(device_impl *d, ncclResult_t r, const char *what) {
    const char *detail = d->nccl ? ncclGetLastError(d->nccl) : ncclGetLastError(NULL);
    char copy[256];
    snprintf(copy, sizeof copy, "%s", detail ? detail : "");
    nccl_abort(d);
    EPMOE_FAIL(EPMOE_ERR_NCCL, "rank %d: %s failed: %s (%s); communicator aborted", d->rank, what,
               ncclGetErrorString(r), copy);
}

static epmoe_status nccl_timeout(device_impl *d, const char *what) {
    nccl_abort(d);
    EPMOE_FAIL(EPMOE_ERR_PEER_LOST,
               "rank %d: %s did not finish within collective_timeout_s = %.1f s: a peer rank "
               "died or hung (NCCL does not say which); NCCL communicator aborted",
               d->rank, what, d->timeout_s);
}

/* After a non-blocking NCCL call: polls the communicator until its work is enqueued. */
static epmoe_status nccl_settle(device_impl *d, ncclResult_t r, const char *what) {
    if (r != ncclSuccess && r != ncclInProgress) return nccl_fail(d, r, what);
    const double start = now_s();
    for (;;) {
        ncclResult_t state = ncclSuccess;
        ncclResult_t q = ncclCommGetAsyncError(d->nccl, &state);
        if (q != ncclSuccess) return nccl_fail(d, q, "ncclCommGetAsyncError");
        if (state == ncclSuccess) return EPMOE_OK;
        if (state != ncclInProgress) return nccl_fail(d, state, what);
        if (timed_out(d, start)) return nccl_timeout(d, what);
        pause_since(start);
    }
}

static epmoe_status nccl_alltoallv(device_impl *d, const void *send, const int64_t *send_counts,
                                   const int64_t *send_displs, void *recv,
                                   const int64_t *recv_counts, const int64_t *recv_displs,
                                   size_t elem_bytes, const char *what) {
    ncclResult_t first = ncclSuccess;
    ncclResult_t r = ncclGroupStart();
    if (r != ncclSuccess) return nccl_fail(d, r, "ncclGroupStart");
    for (int p = 0; p < d->n_ranks; p++) {
        if (send_counts[p] > 0) {
            r = ncclSend((const char *)send + (size_t)send_displs[p] * elem_bytes,
                         (size_t)send_counts[p] * elem_bytes, ncclInt8, p, d->nccl, d->stream);
            if (r != ncclSuccess && r != ncclInProgress && first == ncclSuccess) first = r;
        }
        if (recv_counts[p] > 0) {
            r = ncclRecv((char *)recv + (size_t)recv_displs[p] * elem_bytes,
                         (size_t)recv_counts[p] * elem_bytes, ncclInt8, p, d->nccl, d->stream);
            if (r != ncclSuccess && r != ncclInProgress && first == ncclSuccess) first = r;
        }
    }
    r = ncclGroupEnd(); /* always closes the group, also after a failed call inside it */
    if (first != ncclSuccess) return nccl_fail(d, first, what);
    return nccl_settle(d, r, what);
}
#endif

/* ---- mpi-staged ---------------------------------------------------------------------------- */

/* Per-peer MPI exchange of host buffers under the watchdog. On a timeout the peers whose data
 * never arrived are named and the requests abandoned (the transport is dead). */
static epmoe_status staged_exchange(device_impl *d, const void *send, const int64_t *send_counts,
                                    const int64_t *send_displs, void *recv,
                                    const int64_t *recv_counts, const int64_t *recv_displs,
                                    size_t elem_bytes, const char *what) {
    const int P = d->n_ranks;
    EPMOE_REQUIRE(elem_bytes > 0 && elem_bytes <= INT_MAX, EPMOE_ERR_INVALID_ARG,
                  "%s: element of %zu bytes", what, elem_bytes);
    MPI_Datatype elem;
    int rc = MPI_Type_contiguous((int)elem_bytes, MPI_BYTE, &elem);
    if (rc != MPI_SUCCESS) return mpi_error(rc, "MPI_Type_contiguous");
    MPI_Type_commit(&elem);
    int n_req = 0, recv_req_of_peer[64];
    epmoe_status st = EPMOE_OK;
    for (int p = 0; p < P && st == EPMOE_OK; p++) {
        if (p < 64) recv_req_of_peer[p] = -1;
        if (recv_counts[p] > INT_MAX || send_counts[p] > INT_MAX) {
            st = epmoe_set_error(EPMOE_ERR_UNSUPPORTED, __FILE__, __LINE__,
                                 "%s: block for peer %d exceeds %d elements", what, p, INT_MAX);
            break;
        }
        if (recv_counts[p] > 0) {
            if (p < 64) recv_req_of_peer[p] = n_req;
            rc = MPI_Irecv((char *)recv + (size_t)recv_displs[p] * elem_bytes, (int)recv_counts[p],
                           elem, p, 717, d->comm, &d->requests[n_req++]);
            if (rc != MPI_SUCCESS) st = mpi_error(rc, "MPI_Irecv");
        }
    }
    for (int p = 0; p < P && st == EPMOE_OK; p++) {
        if (send_counts[p] > 0) {
            rc = MPI_Isend((const char *)send + (size_t)send_displs[p] * elem_bytes,
                           (int)send_counts[p], elem, p, 717, d->comm, &d->requests[n_req++]);
            if (rc != MPI_SUCCESS) st = mpi_error(rc, "MPI_Isend");
        }
    }
    if (st != EPMOE_OK) {
        d->dead = 1;
        MPI_Type_free(&elem);
        return st;
    }
    const double start = now_s();
    for (;;) {
        int done = 0;
        rc = MPI_Testall(n_req, d->requests, &done, MPI_STATUSES_IGNORE);
        if (rc != MPI_SUCCESS) {
            d->dead = 1;
            MPI_Type_free(&elem);
            return mpi_error(rc, "MPI_Testall");
        }
        if (done) break;
        if (timed_out(d, start)) {
            char peers[256] = "";
            size_t len = 0;
            for (int p = 0; p < P && p < 64; p++) {
                int i = recv_req_of_peer[p], flag = 1;
                if (i < 0 || d->requests[i] == MPI_REQUEST_NULL) continue;
                MPI_Test(&d->requests[i], &flag, MPI_STATUS_IGNORE);
                if (!flag && len + 8 < sizeof peers)
                    len += (size_t)snprintf(peers + len, sizeof peers - len, "%s%d",
                                            len ? ", " : "", p);
            }
            d->dead = 1;
            MPI_Type_free(&elem);
            EPMOE_FAIL(EPMOE_ERR_PEER_LOST,
                       "rank %d: %s did not finish within collective_timeout_s = %.1f s; no "
                       "data from peer rank(s) %s (died or hung); MPI requests abandoned",
                       d->rank, what, d->timeout_s, len ? peers : "(none missing: a send stalled)");
        }
        pause_since(start);
    }
    MPI_Type_free(&elem);
    return EPMOE_OK;
}

static void CUDART_CB staged_host_node(void *arg) {
    staged_op *op = (staged_op *)arg;
    device_impl *d = op->impl;
    if (d->dead || d->async_failed) return;
    const int P = d->n_ranks;
    epmoe_status st = staged_exchange(d, d->h_send, op->counts, op->counts + P, d->h_recv,
                                      op->counts + 2 * P, op->counts + 3 * P, op->elem_bytes,
                                      op->what);
    if (st != EPMOE_OK) {
        snprintf(d->async_msg, sizeof d->async_msg, "%s", epmoe_last_error());
        d->async_failed = 1;
    }
}

/* Grows a pinned staging buffer outside a capture; inside one (or once a graph holds it) the
 * buffer must already be large enough. */
static epmoe_status ensure_staging(device_impl *d, void **buf, size_t *have, size_t need,
                                   int capturing, const char *what) {
    if (need <= *have) return EPMOE_OK;
    EPMOE_REQUIRE(!capturing && !d->staging_frozen, EPMOE_ERR_INVALID_ARG,
                  "%s: mpi-staged needs %zu bytes of pinned staging, has %zu, and cannot grow it "
                  "once a CUDA graph uses it: run the same shapes once before capturing",
                  what, need, *have);
    if (*buf) cudaFreeHost(*buf);
    *buf = NULL;
    *have = 0;
    CUDA_TRY(cudaMallocHost(buf, need), "allocating mpi-staged pinned staging");
    *have = need;
    return EPMOE_OK;
}

static epmoe_status staged_alltoallv(device_impl *d, const void *send, const int64_t *send_counts,
                                     const int64_t *send_displs, void *recv,
                                     const int64_t *recv_counts, const int64_t *recv_displs,
                                     size_t elem_bytes, const char *what) {
    const int P = d->n_ranks;
    size_t send_span = 0, recv_span = 0;
    for (int p = 0; p < P; p++) {
        if (send_counts[p] > 0) {
            size_t end = (size_t)(send_displs[p] + send_counts[p]) * elem_bytes;
            if (end > send_span) send_span = end;
        }
        if (recv_counts[p] > 0) {
            size_t end = (size_t)(recv_displs[p] + recv_counts[p]) * elem_bytes;
            if (end > recv_span) recv_span = end;
        }
    }
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    CUDA_TRY(cudaStreamIsCapturing(d->stream, &capture), "querying stream capture");
    const int capturing = capture == cudaStreamCaptureStatusActive;
    EPMOE_TRY(ensure_staging(d, &d->h_send, &d->h_send_bytes, send_span, capturing, what));
    EPMOE_TRY(ensure_staging(d, &d->h_recv, &d->h_recv_bytes, recv_span, capturing, what));
    if (send_span)
        CUDA_TRY(cudaMemcpyAsync(d->h_send, send, send_span, cudaMemcpyDeviceToHost, d->stream),
                 "mpi-staged: copying the send blocks out");
    if (capturing) {
        int provided = MPI_THREAD_SINGLE;
        MPI_Query_thread(&provided);
        EPMOE_REQUIRE(provided >= MPI_THREAD_SERIALIZED, EPMOE_ERR_UNSUPPORTED,
                      "%s: capturing the mpi-staged transport in a CUDA graph runs MPI on "
                      "CUDA's host-node thread: initialize MPI with MPI_Init_thread("
                      "MPI_THREAD_SERIALIZED or MULTIPLE)",
                      what);
        staged_op *op = (staged_op *)calloc(1, sizeof *op);
        int64_t *counts = (int64_t *)malloc(4 * (size_t)P * sizeof(int64_t));
        if (!op || !counts) {
            free(op);
            free(counts);
            EPMOE_FAIL(EPMOE_ERR_OOM, "%s: out of host memory", what);
        }
        memcpy(counts, send_counts, (size_t)P * 8);
        memcpy(counts + P, send_displs, (size_t)P * 8);
        memcpy(counts + 2 * P, recv_counts, (size_t)P * 8);
        memcpy(counts + 3 * P, recv_displs, (size_t)P * 8);
        op->impl = d;
        op->counts = counts;
        op->elem_bytes = elem_bytes;
        snprintf(op->what, sizeof op->what, "%s", what);
        op->next = d->ops;
        d->ops = op;
        d->staging_frozen = 1;
        CUDA_TRY(cudaLaunchHostFunc(d->stream, staged_host_node, op),
                 "mpi-staged: capturing the MPI host node");
    } else {
        /* The copy out reads only this rank's own work: a plain sync cannot hang on a peer. */
        CUDA_TRY(cudaStreamSynchronize(d->stream), "mpi-staged: waiting for the copy out");
        EPMOE_TRY(staged_exchange(d, d->h_send, send_counts, send_displs, d->h_recv, recv_counts,
                                  recv_displs, elem_bytes, what));
    }
    /* Per-peer copies in: gaps between the blocks of recv stay untouched, as with NCCL. */
    for (int p = 0; p < P; p++)
        if (recv_counts[p] > 0) {
            size_t off = (size_t)recv_displs[p] * elem_bytes;
            CUDA_TRY(cudaMemcpyAsync((char *)recv + off, (char *)d->h_recv + off,
                                     (size_t)recv_counts[p] * elem_bytes, cudaMemcpyHostToDevice,
                                     d->stream),
                     "mpi-staged: copying a received block in");
        }
    return EPMOE_OK;
}

/* ---- the public device calls --------------------------------------------------------------- */

int epmoe_transport_nccl_available(void) {
#ifdef EPMOE_HAVE_NCCL
    return 1;
#else
    return 0;
#endif
}

epmoe_status epmoe_device_alltoallv_async(epmoe_transport *t, const void *send,
                                          const int64_t *send_counts, const int64_t *send_displs,
                                          void *recv, const int64_t *recv_counts,
                                          const int64_t *recv_displs, size_t elem_bytes,
                                          const char *what) {
    EPMOE_REQUIRE(epmoe_transport_is_device(t), EPMOE_ERR_INVALID_ARG,
                  "%s: transport '%s' does not move device buffers", what, t->ops->name);
    device_impl *d = impl_of(t);
    EPMOE_TRY(check_alive(d, what));
    for (int p = 0; p < d->n_ranks; p++)
        EPMOE_REQUIRE(send_counts[p] >= 0 && send_displs[p] >= 0 && recv_counts[p] >= 0 &&
                          recv_displs[p] >= 0,
                      EPMOE_ERR_INVALID_ARG, "%s: negative count or displacement for peer %d",
                      what, p);
#ifdef EPMOE_HAVE_NCCL
    if (d->kind == KIND_NCCL)
        return nccl_alltoallv(d, send, send_counts, send_displs, recv, recv_counts, recv_displs,
                              elem_bytes, what);
#endif
    return staged_alltoallv(d, send, send_counts, send_displs, recv, recv_counts, recv_displs,
                            elem_bytes, what);
}

epmoe_status epmoe_device_transport_wait(epmoe_transport *t, const char *what) {
    device_impl *d = impl_of(t);
    EPMOE_TRY(check_alive(d, what));
    /* mpi-staged host nodes time out on their own and name the peers: give them the first say. */
    const double limit = d->kind == KIND_STAGED ? 2.0 * d->timeout_s + 1.0 : d->timeout_s;
    const double start = now_s();
    for (;;) {
        cudaError_t q = cudaStreamQuery(d->stream);
        if (q == cudaSuccess) break;
        if (q != cudaErrorNotReady) {
#ifdef EPMOE_HAVE_NCCL
            if (d->kind == KIND_NCCL) nccl_abort(d);
#endif
            d->dead = 1;
            EPMOE_FAIL(EPMOE_ERR_CUDA, "rank %d: %s: the stream failed: %s", d->rank, what,
                       cudaGetErrorString(q));
        }
#ifdef EPMOE_HAVE_NCCL
        if (d->kind == KIND_NCCL) {
            ncclResult_t state = ncclSuccess;
            ncclResult_t r = ncclCommGetAsyncError(d->nccl, &state);
            if (r != ncclSuccess) return nccl_fail(d, r, "ncclCommGetAsyncError");
            if (state != ncclSuccess && state != ncclInProgress) return nccl_fail(d, state, what);
            if (timed_out(d, start)) return nccl_timeout(d, what);
        }
#endif
        if (d->kind == KIND_STAGED && d->timeout_s > 0 && now_s() - start > limit) {
            d->dead = 1;
            EPMOE_FAIL(EPMOE_ERR_PEER_LOST,
                       "rank %d: %s did not finish within %.1f s (collective_timeout_s = %.1f): "
                       "a peer rank died or hung",
                       d->rank, what, limit, d->timeout_s);
        }
        if (d->async_failed) break; /* the host node gave up; report its message below */
        pause_since(start);
    }
    if (d->async_failed) {
        d->dead = 1;
        EPMOE_FAIL(EPMOE_ERR_MPI, "%s (during %s)", d->async_msg, what);
    }
    return EPMOE_OK;
}

int epmoe_device_transport_graph_safe(const epmoe_transport *t) {
    if (!epmoe_transport_is_device(t)) return 0;
    const device_impl *d = impl_of(t);
    if (d->kind == KIND_NCCL) return 1;
    int provided = MPI_THREAD_SINGLE;
    MPI_Query_thread(&provided);
    return provided >= MPI_THREAD_SERIALIZED;
}

cudaStream_t epmoe_device_transport_stream(const epmoe_transport *t) {
    return impl_of(t)->stream;
}

/* ---- transport.h ops ----------------------------------------------------------------------- */

static epmoe_status device_exchange_counts(epmoe_transport *t, const int64_t *send_counts,
                                           int64_t *recv_counts) {
    device_impl *d = impl_of(t);
    const int P = d->n_ranks;
    EPMOE_TRY(check_alive(d, "exchange of counts"));
    if (d->kind == KIND_STAGED) {
        int64_t *ones = (int64_t *)malloc((size_t)P * 16);
        EPMOE_REQUIRE(ones, EPMOE_ERR_OOM, "exchange of counts: out of host memory");
        for (int p = 0; p < P; p++) ones[p] = 1, ones[P + p] = p;
        epmoe_status st = staged_exchange(d, send_counts, ones, ones + P, recv_counts, ones,
                                          ones + P, 8, "exchange of counts");
        free(ones);
        return st;
    }
    /* nccl: a device all-to-all of one count per peer */
    int64_t *ones = (int64_t *)malloc((size_t)P * 16);
    EPMOE_REQUIRE(ones, EPMOE_ERR_OOM, "exchange of counts: out of host memory");
    for (int p = 0; p < P; p++) ones[p] = 1, ones[P + p] = p;
    memcpy(d->h_counts, send_counts, (size_t)P * 8);
    epmoe_status st = EPMOE_OK;
    cudaError_t err = cudaMemcpyAsync(d->d_counts, d->h_counts, (size_t)P * 8,
                                      cudaMemcpyHostToDevice, d->stream);
    if (err == cudaSuccess)
        st = epmoe_device_alltoallv_async(t, d->d_counts, ones, ones + P, d->d_counts + P, ones,
                                          ones + P, 8, "exchange of counts");
    if (err == cudaSuccess && st == EPMOE_OK)
        err = cudaMemcpyAsync(d->h_counts + P, d->d_counts + P, (size_t)P * 8,
                              cudaMemcpyDeviceToHost, d->stream);
    free(ones);
    CUDA_TRY(err, "exchange of counts: copies");
    EPMOE_TRY(st);
    EPMOE_TRY(epmoe_device_transport_wait(t, "exchange of counts"));
    memcpy(recv_counts, d->h_counts + P, (size_t)P * 8);
    return EPMOE_OK;
}

static epmoe_status device_alltoallv(epmoe_transport *t, const void *send,
                                     const int64_t *send_counts, const int64_t *send_displs,
                                     void *recv, const int64_t *recv_counts,
                                     const int64_t *recv_displs, size_t elem_bytes) {
    EPMOE_TRY(epmoe_device_alltoallv_async(t, send, send_counts, send_displs, recv, recv_counts,
                                           recv_displs, elem_bytes, "all-to-all"));
    return epmoe_device_transport_wait(t, "all-to-all");
}

static epmoe_status device_agree(epmoe_transport *t, epmoe_status local, const char *what) {
    device_impl *d = impl_of(t);
    if (d->dead) return local != EPMOE_OK ? local : check_alive(d, what);
    epmoe_status st = epmoe_agree(d->comm, local, what, d->timeout_s);
    if (st == EPMOE_ERR_PEER_LOST) {
#ifdef EPMOE_HAVE_NCCL
        if (d->kind == KIND_NCCL) nccl_abort(d);
#endif
        d->dead = 1;
    }
    return st;
}

/* Teardown order: wait for this rank's enqueued work (under the watchdog), finalize then
 * destroy the NCCL communicator (abort instead when it failed or finalizing times out), then
 * free device and pinned memory, then the duplicated MPI communicator (skipped when a peer is
 * gone: freeing it could wait on that peer). */
static void device_destroy(epmoe_transport *t) {
    if (!t) return;
    device_impl *d = impl_of(t);
    if (d) {
        if (!d->dead && d->stream && epmoe_device_transport_wait(t, "teardown") != EPMOE_OK)
            d->dead = 1;
#ifdef EPMOE_HAVE_NCCL
        if (d->nccl) {
            if (!d->dead && nccl_settle(d, ncclCommFinalize(d->nccl), "ncclCommFinalize") == EPMOE_OK)
                ncclCommDestroy(d->nccl);
            else if (d->nccl)
                ncclCommAbort(d->nccl);
            d->nccl = NULL;
        }
#endif
        if (d->d_counts) cudaFree(d->d_counts);
        if (d->h_counts) cudaFreeHost(d->h_counts);
        if (d->h_send) cudaFreeHost(d->h_send);
        if (d->h_recv) cudaFreeHost(d->h_recv);
        while (d->ops) {
            staged_op *next = d->ops->next;
            free(d->ops->counts);
            free(d->ops);
            d->ops = next;
        }
        free(d->requests);
        if (d->comm != MPI_COMM_NULL && !d->dead) MPI_Comm_free(&d->comm);
        free(d);
    }
    free(t);
}

static const epmoe_transport_ops nccl_ops = {
    .name = "nccl",
    .exchange_counts = device_exchange_counts,
    .alltoallv = device_alltoallv,
    .agree = device_agree,
    .destroy = device_destroy,
};

static const epmoe_transport_ops staged_ops = {
    .name = "mpi-staged",
    .exchange_counts = device_exchange_counts,
    .alltoallv = device_alltoallv,
    .agree = device_agree,
    .destroy = device_destroy,
};

int epmoe_transport_is_device(const epmoe_transport *t) {
    return t && (t->ops == &nccl_ops || t->ops == &staged_ops);
}

/* ---- creation ------------------------------------------------------------------------------ */

epmoe_status epmoe_local_gpu(MPI_Comm comm, int *device, int *any_rank_shares) {
    int rank = 0, n_devices = 0, local_rank = 0, local_size = 1;
    MPI_Comm_rank(comm, &rank);
    cudaError_t err = cudaGetDeviceCount(&n_devices);
    int local_fail = err != cudaSuccess || n_devices < 1;
    MPI_Comm node;
    int rc = MPI_Comm_split_type(comm, MPI_COMM_TYPE_SHARED, rank, MPI_INFO_NULL, &node);
    if (rc != MPI_SUCCESS) return mpi_error(rc, "MPI_Comm_split_type(shared)");
    MPI_Comm_rank(node, &local_rank);
    MPI_Comm_size(node, &local_size);
    MPI_Comm_free(&node);
    int shares = !local_fail && local_size > n_devices, flags[2] = {shares, local_fail}, any[2];
    rc = MPI_Allreduce(flags, any, 2, MPI_INT, MPI_MAX, comm);
    if (rc != MPI_SUCCESS) return mpi_error(rc, "MPI_Allreduce(local GPUs)");
    EPMOE_REQUIRE(!local_fail, EPMOE_ERR_CUDA, "rank %d: no usable CUDA device (%s)", rank,
                  err != cudaSuccess ? cudaGetErrorString(err) : "0 devices");
    EPMOE_REQUIRE(!any[1], EPMOE_ERR_CUDA, "rank %d: another rank has no usable CUDA device",
                  rank);
    *device = local_rank % n_devices;
    *any_rank_shares = any[0];
    return EPMOE_OK;
}

static epmoe_status create_common(MPI_Comm comm, int device, cudaStream_t stream,
                                  double timeout_s, device_kind kind, epmoe_transport **out) {
    *out = NULL;
    epmoe_transport *t = (epmoe_transport *)calloc(1, sizeof *t);
    device_impl *d = (device_impl *)calloc(1, sizeof *d);
    if (!t || !d) {
        free(t);
        free(d);
        EPMOE_FAIL(EPMOE_ERR_OOM, "device transport: out of host memory");
    }
    t->ops = kind == KIND_NCCL ? &nccl_ops : &staged_ops;
    t->impl = d;
    d->kind = kind;
    d->comm = MPI_COMM_NULL;
    d->device = device;
    d->stream = stream;
    d->timeout_s = timeout_s;
    *out = t;
    int rc = MPI_Comm_dup(comm, &d->comm);
    if (rc != MPI_SUCCESS) {
        d->comm = MPI_COMM_NULL;
        return mpi_error(rc, "MPI_Comm_dup");
    }
    /* Errors come back as codes so that they can be reported instead of aborting. */
    MPI_Comm_set_errhandler(d->comm, MPI_ERRORS_RETURN);
    MPI_Comm_rank(d->comm, &d->rank);
    MPI_Comm_size(d->comm, &d->n_ranks);
    t->rank = d->rank;
    t->n_ranks = d->n_ranks;
    EPMOE_REQUIRE(timeout_s >= 0, EPMOE_ERR_INVALID_ARG, "collective_timeout_s = %g < 0",
                  timeout_s);
    d->requests = (MPI_Request *)malloc(2 * (size_t)d->n_ranks * sizeof(MPI_Request));
    EPMOE_REQUIRE(d->requests, EPMOE_ERR_OOM, "device transport: out of host memory");
    CUDA_TRY(cudaSetDevice(device), "selecting this rank's GPU");
    CUDA_TRY(cudaMalloc(&d->d_counts, 2 * (size_t)d->n_ranks * 8), "device transport scratch");
    CUDA_TRY(cudaMallocHost(&d->h_counts, 2 * (size_t)d->n_ranks * 8), "device transport scratch");
    return EPMOE_OK;
}

/* Makes creation collective: every rank learns whether any failed, and all return an error. */
static epmoe_status agree(epmoe_transport *t, MPI_Comm comm, epmoe_status st,
                          epmoe_transport **out) {
    int local = st != EPMOE_OK, any = 0, rank = 0;
    MPI_Comm_rank(comm, &rank);
    int rc = MPI_Allreduce(&local, &any, 1, MPI_INT, MPI_MAX, comm);
    if (st == EPMOE_OK && rc != MPI_SUCCESS) st = mpi_error(rc, "MPI_Allreduce(create)");
    if (st == EPMOE_OK && any)
        st = epmoe_set_error(EPMOE_ERR_NCCL, __FILE__, __LINE__,
                             "rank %d: another rank failed to create its device transport", rank);
    if (st != EPMOE_OK) {
        if (t) {
            impl_of(t)->dead |= local; /* our own failure: peers may be gone */
            device_destroy(t);
        }
        *out = NULL;
        return st;
    }
    *out = t;
    return EPMOE_OK;
}

epmoe_status epmoe_transport_mpi_staged_create(MPI_Comm comm, int device, cudaStream_t stream,
                                               double timeout_s, epmoe_transport **out) {
    epmoe_transport *t = NULL;
    epmoe_status st = create_common(comm, device, stream, timeout_s, KIND_STAGED, &t);
    return agree(t, comm, st, out);
}

epmoe_status epmoe_transport_nccl_create(MPI_Comm comm, int device, cudaStream_t stream,
                                         double timeout_s, epmoe_transport **out) {
#ifndef EPMOE_HAVE_NCCL
    (void)device, (void)stream, (void)timeout_s;
    epmoe_status st = epmoe_set_error(EPMOE_ERR_UNSUPPORTED, __FILE__, __LINE__,
                                      "this build has no NCCL (headers or library not found "
                                      "by CMake): use the mpi-staged transport");
    return agree(NULL, comm, st, out);
#else
    epmoe_transport *t = NULL;
    epmoe_status st = create_common(comm, device, stream, timeout_s, KIND_NCCL, &t);
    device_impl *d = t ? impl_of(t) : NULL;
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
    if (rc != MPI_SUCCESS && st == EPMOE_OK) st = mpi_error(rc, "MPI_Bcast(NCCL id)");
    if (!boot.ok && st == EPMOE_OK)
        st = epmoe_set_error(EPMOE_ERR_NCCL, __FILE__, __LINE__,
                             "rank %d: rank 0 could not create the NCCL id", rank);
    if (st == EPMOE_OK) {
        ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
        config.blocking = 0; /* every call returns; the watchdog polls */
        ncclResult_t r = ncclCommInitRankConfig(&d->nccl, d->n_ranks, boot.id, d->rank, &config);
        if (r != ncclSuccess && r != ncclInProgress) d->nccl = NULL;
        st = d->nccl ? nccl_settle(d, r, "ncclCommInitRankConfig")
                     : epmoe_set_error(EPMOE_ERR_NCCL, __FILE__, __LINE__,
                                       "rank %d: ncclCommInitRankConfig failed: %s (device %d; "
                                       "NCCL needs one GPU per rank)",
                                       d->rank, ncclGetErrorString(r), device);
    }
    return agree(t, comm, st, out);
#endif
}

epmoe_status epmoe_device_transport_create(MPI_Comm comm, int device, int any_rank_shares,
                                           cudaStream_t stream, double timeout_s,
                                           epmoe_transport **out) {
    if (!any_rank_shares && epmoe_transport_nccl_available())
        return epmoe_transport_nccl_create(comm, device, stream, timeout_s, out);
    return epmoe_transport_mpi_staged_create(comm, device, stream, timeout_s, out);
}
