/* Device kernels of the expert-parallel dispatch and return (docs/design.md §2.2-§2.5), used by
 * coordinator/engine/gpu_engine.cu. Every launch shape depends on host sizes only (T, top_k, P, the
 * receive capacity), never on routing, so all of it may be captured in a CUDA graph.
 *
 * Sender side, for T tokens with global expert ids[T, k] and the owners' slices
 * rank_expert_start[P+1] (rank r owns [start[r], start[r+1])):
 *   owner_of_pair[t*k+j]  rank owning slot j of token t
 *   row_rank[t*P+p]       position of token t among the tokens sent to p (-1: none of its
 *                         slots is on p). Rows to a peer are in increasing token order.
 *   pair_rank[t*P+p]      (row, expert) pairs sent to p by tokens before t
 *   send_counts[2p], [2p+1]  rows and pairs sent to p (the numbers that are exchanged)
 * A row is one record (epmoe_dispatch_record below): the token's payload, x[t] in fp32 or
 * already quantized to NVFP4, and its meta: k ids in slot order, the global id where the slot
 * is on p, else -1. The pairs a peer returns come back in (row, slot) order, so the sender
 * knows where each slot's output lands: ret_index_of_pair[t*k+j] = ret_recv_base[p] +
 * pair_rank[t*P+p] + (slots of t before j that are also on p). Combine then sums, per token,
 * w[t,j] * ret[ret_index_of_pair[t,j]] over j in slot order: the single-GPU order, so the
 * result is bit-identical for any number of ranks.
 *
 * Worker side, on recv_rows received rows (recv_row_base[p] is where peer p's block starts;
 * its first recv_counts[2p] rows are real, anything after is unused fixed capacity):
 *   ids_recv[i*k+j]  the meta, validated (ids outside this rank's slice are flagged and
 *                    dropped), -1 for unused rows: feeds epmoe_cuda_plan_layout as "tokens"
 *   peer_of_row[i]   sending peer, -1 for unused rows
 *   ret_row_offset[i] where row i's first returned pair goes in the return send buffer
 *                    (ret_send_base[p] + pairs of p's earlier rows)
 *
 * Bases (where each peer's block starts) are exclusive prefixes of the counts in throughput
 * mode (epmoe_cuda_dispatch_bases) or fixed multiples of a capacity in decode mode (constant
 * arrays): the kernels only read them.
 */
#ifndef EPMOE_DISPATCH_H
#define EPMOE_DISPATCH_H

#include <stdint.h>

#include <cuda_runtime.h>

#include "common/status.h"

#include "common/dispatch_record.h"

#ifdef __cplusplus
extern "C" {
#endif

#define EPMOE_CUDA_FLAG_DISPATCH_ID 16u    /* a received row named an expert not on this rank */
#define EPMOE_CUDA_FLAG_DISPATCH_COUNT 32u /* received pairs differ from the sender's count */
#define EPMOE_CUDA_FLAG_DISPATCH_EMPTY 64u /* a received row carried no expert of this rank */

/* The wire format of a row: common/dispatch_record.h. */

/* owner_of_pair, row_rank, pair_rank and send_counts as above. Two launches. */
epmoe_status epmoe_cuda_dispatch_plan(const int32_t *ids, int64_t T, int64_t top_k,
                                      const int64_t *rank_expert_start, int n_ranks,
                                      int32_t *owner_of_pair, int32_t *row_rank,
                                      int32_t *pair_rank, int64_t *send_counts,
                                      cudaStream_t stream);

/* row_base[p] = sum_{q<p} counts[2q], pair_base[p] = sum_{q<p} counts[2q+1]. */
epmoe_status epmoe_cuda_dispatch_bases(const int64_t *counts, int n_ranks, int64_t *row_base,
                                       int64_t *pair_base, cudaStream_t stream);

/* Writes each token's record at send_row_base[p] + row_rank for every peer p it reaches, and
 * ret_index_of_pair [T*k]. The payload comes from x [T, H] (F32) or from the token's
 * quantized row q_codes [T, H/2], q_sf [T, H/16], q_inv_gs [T] (NVFP4, made by
 * epmoe_cuda_nvfp4_quantize_rows in dense mode); the other source may be NULL. */
epmoe_status epmoe_cuda_dispatch_pack(const epmoe_dispatch_record *rec, const float *x,
                                      const uint8_t *q_codes, const uint8_t *q_sf,
                                      const float *q_inv_gs, const int32_t *ids, int64_t T,
                                      int n_ranks, const int32_t *owner_of_pair,
                                      const int32_t *row_rank, const int32_t *pair_rank,
                                      const int64_t *send_row_base, const int64_t *ret_recv_base,
                                      uint8_t *send_records, int32_t *ret_index_of_pair,
                                      cudaStream_t stream);

/* ids_recv [recv_rows, k] and peer_of_row [recv_rows] from the meta of the received records.
 * Flags EPMOE_CUDA_FLAG_DISPATCH_ID / _EMPTY into error_flags. */
epmoe_status epmoe_cuda_dispatch_unpack(const epmoe_dispatch_record *rec,
                                        const uint8_t *recv_records, int64_t recv_rows,
                                        int n_ranks,
                                        const int64_t *recv_row_base, const int64_t *recv_counts,
                                        int64_t expert_start, int64_t n_local, int32_t *ids_recv,
                                        int32_t *peer_of_row, uint32_t *error_flags,
                                        cudaStream_t stream);

/* ret_row_offset [recv_rows]; checks each peer's pairs against recv_counts[2p+1]
 * (EPMOE_CUDA_FLAG_DISPATCH_COUNT). One block per peer. */
epmoe_status epmoe_cuda_dispatch_return_offsets(const int32_t *ids_recv, int64_t top_k,
                                                int n_ranks, const int64_t *recv_row_base,
                                                const int64_t *recv_counts,
                                                const int64_t *ret_send_base,
                                                int64_t *ret_row_offset, uint32_t *error_flags,
                                                cudaStream_t stream);

/* ret_row_of_padded[row_of_pair[i*k+j]] = ret_row_offset[i] + r for the r-th valid slot j of
 * each real received row i: where the W2 GEMM writes each padded row's output in the return
 * buffer (epmoe_grouped_gemm_args.out_row), so the outputs leave in slot order per row with no
 * gather pass of their own. Rows of padding are not written (the GEMM never stores them). */
epmoe_status epmoe_cuda_dispatch_return_rows(const int32_t *ids_recv, const int32_t *row_of_pair,
                                             const int32_t *peer_of_row,
                                             const int64_t *ret_row_offset, int64_t recv_rows,
                                             int64_t top_k, int32_t *ret_row_of_padded,
                                             cudaStream_t stream);

#ifdef __cplusplus
}
#endif
#endif
