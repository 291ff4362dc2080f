/* The mpi-staged device transport, for ranks that share a GPU (NCCL refuses two ranks on one
 * device): device -> pinned host, one MPI_Isend/Irecv per peer under the watchdog, pinned host
 * -> device. Inside a CUDA graph capture the MPI part becomes a host node, which needs
 * MPI_THREAD_SERIALIZED or better. */
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "coordinator/transport/agree.h"
#include "coordinator/transport/device_impl.h"
#include "kernels/cuda/cuda_check.h"

/* Per-peer MPI exchange of host buffers under the watchdog. On a timeout the peers whose data
 * never arrived are named and the requests abandoned (the transport is dead). */
epmoe_status epmoe_dt_staged_exchange(device_impl *d, const void *send, const int64_t *send_counts,
                                    const int64_t *send_displs, void *recv,
                                    const int64_t *recv_counts, const int64_t *recv_displs,
                                    size_t elem_bytes, const char *what) {
    const int P = d->n_ranks;
    EPMOE_REQUIRE(elem_bytes > 0 && elem_bytes <= INT_MAX, EPMOE_ERR_INVALID_ARG,
                  "%s: element of %zu bytes", what, elem_bytes);
    MPI_Datatype elem;
    int rc = MPI_Type_contiguous((int)elem_bytes, MPI_BYTE, &elem);
    if (rc != MPI_SUCCESS) return epmoe_mpi_error(rc, "MPI_Type_contiguous");
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
            if (rc != MPI_SUCCESS) st = epmoe_mpi_error(rc, "MPI_Irecv");
        }
    }
    for (int p = 0; p < P && st == EPMOE_OK; p++) {
        if (send_counts[p] > 0) {
            rc = MPI_Isend((const char *)send + (size_t)send_displs[p] * elem_bytes,
                           (int)send_counts[p], elem, p, 717, d->comm, &d->requests[n_req++]);
            if (rc != MPI_SUCCESS) st = epmoe_mpi_error(rc, "MPI_Isend");
        }
    }
    if (st != EPMOE_OK) {
        d->dead = 1;
        MPI_Type_free(&elem);
        return st;
    }
    const double start = epmoe_seconds_now();
    for (;;) {
        int done = 0;
        rc = MPI_Testall(n_req, d->requests, &done, MPI_STATUSES_IGNORE);
        if (rc != MPI_SUCCESS) {
            d->dead = 1;
            MPI_Type_free(&elem);
            return epmoe_mpi_error(rc, "MPI_Testall");
        }
        if (done) break;
        if (dt_timed_out(d, start)) {
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
        epmoe_pause_since(start);
    }
    MPI_Type_free(&elem);
    return EPMOE_OK;
}

static void CUDART_CB staged_host_node(void *arg) {
    staged_op *op = (staged_op *)arg;
    device_impl *d = op->impl;
    if (d->dead || d->async_failed) return;
    const int P = d->n_ranks;
    epmoe_status st = epmoe_dt_staged_exchange(d, d->h_send, op->counts, op->counts + P, d->h_recv,
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

epmoe_status epmoe_dt_staged_alltoallv(device_impl *d, const void *send, const int64_t *send_counts,
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
        EPMOE_TRY(epmoe_dt_staged_exchange(d, d->h_send, send_counts, send_displs, d->h_recv, recv_counts,
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
