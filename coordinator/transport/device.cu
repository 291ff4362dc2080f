/* Device transports (coordinator/transport/device.h): the public calls and the transport.h
 * ops, one watchdog for both transports; each transport's own calls are in its file (nccl.cu,
 * mpi_staged.cu; device_impl.h). */
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "coordinator/transport/agree.h"
#include "coordinator/transport/device_impl.h"
#include "kernels/cuda/cuda_check.h"

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
    device_impl *d = dt_impl_of(t);
    EPMOE_TRY(dt_check_alive(d, what));
    for (int p = 0; p < d->n_ranks; p++)
        EPMOE_REQUIRE(send_counts[p] >= 0 && send_displs[p] >= 0 && recv_counts[p] >= 0 &&
                          recv_displs[p] >= 0,
                      EPMOE_ERR_INVALID_ARG, "%s: negative count or displacement for peer %d",
                      what, p);
    if (d->kind == KIND_NCCL)
        return epmoe_dt_nccl_alltoallv(d, send, send_counts, send_displs, recv, recv_counts,
                                       recv_displs, elem_bytes, what);
    return epmoe_dt_staged_alltoallv(d, send, send_counts, send_displs, recv, recv_counts,
                                     recv_displs, elem_bytes, what);
}

epmoe_status epmoe_device_transport_wait(epmoe_transport *t, const char *what) {
    device_impl *d = dt_impl_of(t);
    EPMOE_TRY(dt_check_alive(d, what));
    /* mpi-staged host nodes time out on their own and name the peers: give them the first say. */
    const double limit = d->kind == KIND_STAGED ? 2.0 * d->timeout_s + 1.0 : d->timeout_s;
    const double start = epmoe_seconds_now();
    for (;;) {
        cudaError_t q = cudaStreamQuery(d->stream);
        if (q == cudaSuccess) break;
        if (q != cudaErrorNotReady) {
            if (d->kind == KIND_NCCL) epmoe_dt_nccl_abort(d);
            d->dead = 1;
            EPMOE_FAIL(EPMOE_ERR_CUDA, "rank %d: %s: the stream failed: %s", d->rank, what,
                       cudaGetErrorString(q));
        }
        if (d->kind == KIND_NCCL) EPMOE_TRY(epmoe_dt_nccl_poll(d, start, what));
        if (d->kind == KIND_STAGED && d->timeout_s > 0 && epmoe_seconds_now() - start > limit) {
            d->dead = 1;
            EPMOE_FAIL(EPMOE_ERR_PEER_LOST,
                       "rank %d: %s did not finish within %.1f s (collective_timeout_s = %.1f): "
                       "a peer rank died or hung",
                       d->rank, what, limit, d->timeout_s);
        }
        if (d->async_failed) break; /* the host node gave up; report its message below */
        epmoe_pause_since(start);
    }
    if (d->async_failed) {
        d->dead = 1;
        EPMOE_FAIL(EPMOE_ERR_MPI, "%s (during %s)", d->async_msg, what);
    }
    return EPMOE_OK;
}

int epmoe_device_transport_graph_safe(const epmoe_transport *t) {
    if (!epmoe_transport_is_device(t)) return 0;
    const device_impl *d = dt_impl_of(t);
    if (d->kind == KIND_NCCL) return 1;
    int provided = MPI_THREAD_SINGLE;
    MPI_Query_thread(&provided);
    return provided >= MPI_THREAD_SERIALIZED;
}

cudaStream_t epmoe_device_transport_stream(const epmoe_transport *t) {
    return dt_impl_of(t)->stream;
}

/* ---- transport.h ops ----------------------------------------------------------------------- */

static epmoe_status device_exchange_counts(epmoe_transport *t, const int64_t *send_counts,
                                           int64_t *recv_counts) {
    device_impl *d = dt_impl_of(t);
    const int P = d->n_ranks;
    EPMOE_TRY(dt_check_alive(d, "exchange of counts"));
    if (d->kind == KIND_STAGED) {
        int64_t *ones = (int64_t *)malloc((size_t)P * 16);
        EPMOE_REQUIRE(ones, EPMOE_ERR_OOM, "exchange of counts: out of host memory");
        for (int p = 0; p < P; p++) ones[p] = 1, ones[P + p] = p;
        epmoe_status st = epmoe_dt_staged_exchange(d, send_counts, ones, ones + P, recv_counts, ones,
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
    device_impl *d = dt_impl_of(t);
    if (d->dead) return local != EPMOE_OK ? local : dt_check_alive(d, what);
    epmoe_status st = epmoe_agree(d->comm, local, what, d->timeout_s);
    if (st == EPMOE_ERR_PEER_LOST) {
        if (d->kind == KIND_NCCL) epmoe_dt_nccl_abort(d);
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
    device_impl *d = dt_impl_of(t);
    if (d) {
        if (!d->dead && d->stream && epmoe_device_transport_wait(t, "teardown") != EPMOE_OK)
            d->dead = 1;
        epmoe_dt_nccl_close(d);
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
    if (rc != MPI_SUCCESS) return epmoe_mpi_error(rc, "MPI_Comm_split_type(shared)");
    MPI_Comm_rank(node, &local_rank);
    MPI_Comm_size(node, &local_size);
    MPI_Comm_free(&node);
    int shares = !local_fail && local_size > n_devices, flags[2] = {shares, local_fail}, any[2];
    rc = MPI_Allreduce(flags, any, 2, MPI_INT, MPI_MAX, comm);
    if (rc != MPI_SUCCESS) return epmoe_mpi_error(rc, "MPI_Allreduce(local GPUs)");
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
        return epmoe_mpi_error(rc, "MPI_Comm_dup");
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

/* Creation is collective: every rank gets the lowest failing rank's error (agree.h). */
static epmoe_status agree_created(epmoe_transport *t, MPI_Comm comm, epmoe_status st,
                                  double timeout_s, epmoe_transport **out) {
    const int local_failed = st != EPMOE_OK;
    st = epmoe_agree(comm, st, "create its device transport", timeout_s);
    if (st != EPMOE_OK) {
        if (t) {
            dt_impl_of(t)->dead |= local_failed; /* our own failure: peers may be gone */
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
    return agree_created(t, comm, st, timeout_s, out);
}

epmoe_status epmoe_transport_nccl_create(MPI_Comm comm, int device, cudaStream_t stream,
                                         double timeout_s, epmoe_transport **out) {
    epmoe_transport *t = NULL;
    epmoe_status st = create_common(comm, device, stream, timeout_s, KIND_NCCL, &t);
    if (st == EPMOE_OK) st = epmoe_dt_nccl_connect(dt_impl_of(t));
    return agree_created(t, comm, st, timeout_s, out);
}

epmoe_status epmoe_device_transport_create(MPI_Comm comm, int device, int any_rank_shares,
                                           cudaStream_t stream, double timeout_s,
                                           epmoe_transport **out) {
    if (!any_rank_shares && epmoe_transport_nccl_available())
        return epmoe_transport_nccl_create(comm, device, stream, timeout_s, out);
    return epmoe_transport_mpi_staged_create(comm, device, stream, timeout_s, out);
}
