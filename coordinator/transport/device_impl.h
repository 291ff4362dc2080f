/* Internal to the device transports (coordinator/transport/device.h): the state one device
 * transport keeps, the watchdog's small helpers, and the calls each transport's own file
 * provides. nccl.cu: one rank per GPU over NCCL; mpi_staged.cu: ranks sharing a GPU, through
 * pinned host buffers and MPI; device.cu: the public calls, which pick one of the two. */
#ifndef EPMOE_TRANSPORT_DEVICE_IMPL_H
#define EPMOE_TRANSPORT_DEVICE_IMPL_H

#include <stdint.h>

#include <cuda_runtime.h>
#include <mpi.h>

#include "common/clock.h"
#include "coordinator/transport/device.h"

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
    void *nccl; /* ncclComm_t (nccl.cu), NULL when none */
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

static inline int dt_timed_out(const device_impl *d, double start) {
    return d->timeout_s > 0 && epmoe_seconds_now() - start > d->timeout_s;
}

static inline device_impl *dt_impl_of(const epmoe_transport *t) { return (device_impl *)t->impl; }

static inline epmoe_status dt_check_alive(const device_impl *d, const char *what) {
    EPMOE_REQUIRE(!d->dead, EPMOE_ERR_PEER_LOST,
                  "%s: the %s transport is dead after an earlier collective failed or timed out",
                  what, d->kind == KIND_NCCL ? "nccl" : "mpi-staged");
    return EPMOE_OK;
}

/* ---- nccl.cu (stubs that say so in a build without NCCL) ---- */
/* Boots the communicator from MPI (rank 0's id, broadcast) on d->comm. */
epmoe_status epmoe_dt_nccl_connect(device_impl *d);
epmoe_status epmoe_dt_nccl_alltoallv(device_impl *d, const void *send, const int64_t *send_counts,
                                     const int64_t *send_displs, void *recv,
                                     const int64_t *recv_counts, const int64_t *recv_displs,
                                     size_t elem_bytes, const char *what);
/* One poll of a wait that began at `start`: fails on an asynchronous NCCL error or the timeout. */
epmoe_status epmoe_dt_nccl_poll(device_impl *d, double start, const char *what);
/* Aborts the communicator (in-flight kernels return) and marks the transport dead. */
void epmoe_dt_nccl_abort(device_impl *d);
/* Finalizes and destroys the communicator (aborts it when that fails or the transport is dead). */
void epmoe_dt_nccl_close(device_impl *d);

/* ---- mpi_staged.cu ---- */
epmoe_status epmoe_dt_staged_exchange(device_impl *d, const void *send,
                                      const int64_t *send_counts, const int64_t *send_displs,
                                      void *recv, const int64_t *recv_counts,
                                      const int64_t *recv_displs, size_t elem_bytes,
                                      const char *what);
epmoe_status epmoe_dt_staged_alltoallv(device_impl *d, const void *send,
                                       const int64_t *send_counts, const int64_t *send_displs,
                                       void *recv, const int64_t *recv_counts,
                                       const int64_t *recv_displs, size_t elem_bytes,
                                       const char *what);

#endif
