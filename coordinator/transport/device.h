/* Device transports: coordinator/transport/transport.h on DEVICE buffers, work enqueued on one CUDA
 * stream that the transport is bound to. Two implementations with the same calls:
 *
 *   nccl        one rank per GPU. Bootstrapped from MPI: rank 0 ncclGetUniqueId, MPI_Bcast,
 *               every rank ncclCommInitRankConfig (non-blocking communicator). Payload moves as
 *               grouped ncclSend/ncclRecv inside ncclGroupStart/End. Capturable in a CUDA graph.
 *   mpi-staged  for ranks that SHARE a GPU (NCCL refuses two ranks on one device): device ->
 *               pinned host (cudaMemcpyAsync), per-peer MPI_Isend/Irecv, pinned host -> device.
 *               Outside a graph the host waits for the copy out (a sync per call); inside a
 *               capture the MPI part becomes a host node (cudaLaunchHostFunc), which needs
 *               MPI_THREAD_SERIALIZED or better (checked).
 *
 * Element counts and displacements are host arrays (the number of bytes each NCCL/MPI call
 * moves must be known to the host); the data pointers are device pointers. The generic ops of
 * transport.h (exchange_counts, alltoallv, any_failed) are blocking and guarded by the
 * watchdog; the *_async calls below only enqueue, and epmoe_device_transport_wait waits.
 *
 * Watchdog: every wait polls (cudaStreamQuery + ncclCommGetAsyncError, or MPI_Test) against
 * collective_timeout_s (common/config.h; 0 = forever). A collective not done in time is
 * aborted (ncclCommAbort for NCCL; the MPI requests are abandoned for mpi-staged) and the call
 * returns EPMOE_ERR_NCCL (nccl) or EPMOE_ERR_MPI (mpi-staged) naming the collective, the
 * timeout and, for mpi-staged, the peers whose data never arrived (NCCL does not say which
 * peer stalled). After that the transport is dead: every later call fails at once, and the
 * caller is expected to exit non-zero.
 */
#ifndef EPMOE_TRANSPORT_DEVICE_H
#define EPMOE_TRANSPORT_DEVICE_H

#include <stddef.h>
#include <stdint.h>

#include <cuda_runtime.h>
#include <mpi.h>

#include "coordinator/transport/transport.h"

#ifdef __cplusplus
extern "C" {
#endif

/* 1 when this build has the NCCL transport (NCCL headers and library were found). */
int epmoe_transport_nccl_available(void);

/* Collective over comm. The GPU of this rank: its rank among the ranks of its node (an
 * MPI_COMM_TYPE_SHARED sub-communicator) modulo the node's device count. *any_rank_shares is 1
 * on every rank when some node has more ranks than GPUs (then NCCL cannot be used). */
epmoe_status epmoe_local_gpu(MPI_Comm comm, int *device, int *any_rank_shares);

/* Collective over comm (which is duplicated; the caller keeps its own). The transport selects
 * `device` and binds `stream` (which must belong to it). timeout_s: collective_timeout_s. */
epmoe_status epmoe_transport_nccl_create(MPI_Comm comm, int device, cudaStream_t stream,
                                         double timeout_s, epmoe_transport **out);
epmoe_status epmoe_transport_mpi_staged_create(MPI_Comm comm, int device, cudaStream_t stream,
                                               double timeout_s, epmoe_transport **out);

/* The transport for one rank per GPU: nccl when this build has it and no rank shares its GPU
 * (any_rank_shares from epmoe_local_gpu), mpi-staged otherwise. Collective. */
epmoe_status epmoe_device_transport_create(MPI_Comm comm, int device, int any_rank_shares,
                                           cudaStream_t stream, double timeout_s,
                                           epmoe_transport **out);

/* 1 for the transports of this header (data on the device), 0 for any other. */
int epmoe_transport_is_device(const epmoe_transport *t);
/* 1 when the *_async calls may be captured in a CUDA graph on this transport. */
int epmoe_device_transport_graph_safe(const epmoe_transport *t);
cudaStream_t epmoe_device_transport_stream(const epmoe_transport *t);

/* Enqueues an all-to-all of variable blocks on the bound stream (counts and displacements in
 * elements of elem_bytes, host arrays of n_ranks). send and recv are device buffers and must
 * not overlap. nccl: nothing waits. mpi-staged outside a capture: waits for the copy out and
 * for MPI (watchdog), then enqueues the copy in. */
epmoe_status epmoe_device_alltoallv_async(epmoe_transport *t, const void *send,
                                          const int64_t *send_counts, const int64_t *send_displs,
                                          void *recv, const int64_t *recv_counts,
                                          const int64_t *recv_displs, size_t elem_bytes,
                                          const char *what);

/* Waits for everything enqueued on the bound stream, under the watchdog. `what` names the
 * step in the timeout message. */
epmoe_status epmoe_device_transport_wait(epmoe_transport *t, const char *what);

#ifdef __cplusplus
}
#endif
#endif
