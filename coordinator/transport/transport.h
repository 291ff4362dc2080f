/* The all-to-all seam between the engine and the wire. The engine plans what goes where and
 * packs rows; a transport only moves counts and bytes. mpi.c implements it on host buffers;
 * device.h (nccl, mpi-staged) on device buffers. Every wait is under the watchdog
 * (collective_timeout_s): a peer that died or hung gives EPMOE_ERR_PEER_LOST, never a hang.
 */
#ifndef EPMOE_TRANSPORT_H
#define EPMOE_TRANSPORT_H

#include <stddef.h>
#include <stdint.h>

#include "common/status.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct epmoe_transport epmoe_transport;

typedef struct {
    const char *name;
    /* Each rank sends send_counts[p] to peer p and learns recv_counts[p] from each peer. */
    epmoe_status (*exchange_counts)(epmoe_transport *t, const int64_t *send_counts,
                                    int64_t *recv_counts);
    /* All-to-all of variable-size blocks of `elem_bytes`-sized elements; counts and
     * displacements (exclusive prefixes) in elements, per peer. */
    epmoe_status (*alltoallv)(epmoe_transport *t, const void *send, const int64_t *send_counts,
                              const int64_t *send_displs, void *recv, const int64_t *recv_counts,
                              const int64_t *recv_displs, size_t elem_bytes);
    /* Every rank learns whether any rank failed `what`, and gets the lowest failing rank's
     * status and message (coordinator/transport/agree.h), so that all leave a step together. */
    epmoe_status (*agree)(epmoe_transport *t, epmoe_status local, const char *what);
    void (*destroy)(epmoe_transport *t);
} epmoe_transport_ops;

struct epmoe_transport {
    const epmoe_transport_ops *ops;
    int rank;
    int n_ranks;
    void *impl;
};

#ifdef __cplusplus
}
#endif
#endif
