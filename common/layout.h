/* Where things live: which rank owns which experts, and where each expert's rows sit in the
 * padded expert-contiguous layout. Every component (CPU and GPU, dispatch and compute, scale
 * assembly and GEMM) calls these; nothing recomputes them (docs/design.md §9, rules 4, 8, 14).
 *
 * Offsets convention (the only one): an exclusive prefix of length n+1.
 *   offsets[0] = 0, offsets[e+1] = offsets[e] + count[e]; expert e's rows are
 *   [offsets[e], offsets[e+1]). Padded offsets round each count up to a multiple of pad_rows
 *   (an empty expert takes 0 rows).
 */
#ifndef EPMOE_LAYOUT_H
#define EPMOE_LAYOUT_H

#include <stdint.h>

#include "common/status.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Contiguous, balanced expert slices: the first (E % P) ranks own one expert more. */
typedef struct {
    int64_t start; /* first global expert id owned */
    int64_t end;   /* one past the last */
} epmoe_expert_slice;

/* P > E is an error (a rank would own nothing and the layout would be ambiguous). */
epmoe_status epmoe_slice_of_rank(int64_t n_experts, int n_ranks, int rank,
                                 epmoe_expert_slice *out);
/* The driver's token shards of a batch of T: rank r holds rows [start, start + count),
 * contiguous and balanced like the expert slices, so outputs gather back in input order. */
void epmoe_shard_of_rank(int64_t T, int n_ranks, int rank, int64_t *start, int64_t *count);
/* Dropless worst cases of one rank's dispatch buffers (rule 22), the one place both engines
 * size them from: a token goes to at most min(k, P) ranks, once each; a worker receives at most
 * every token of every rank, each carrying at most min(k, n_local) of its experts; a token gets
 * back one output per slot. Counts of rows or pairs, not bytes. */
typedef struct {
    int64_t send_rows;   /* max_tokens x min(k, P) */
    int64_t recv_rows;   /* P x max_tokens */
    int64_t pairs;       /* recv_rows x min(k, n_local): expert outputs computed and sent back */
    int64_t return_rows; /* max_tokens x k: expert outputs received back */
} epmoe_dispatch_capacity;
epmoe_dispatch_capacity epmoe_dispatch_capacity_of(int64_t max_tokens, int64_t top_k, int n_ranks,
                                                   int64_t n_local);

/* Owner rank of a global expert id; ids outside [0, E) are EPMOE_ERR_RANGE. */
epmoe_status epmoe_owner_of_expert(int64_t n_experts, int n_ranks, int64_t expert, int *rank);
/* local = global - start, checked against the slice (rule 8). */
epmoe_status epmoe_global_to_local(const epmoe_expert_slice *slice, int64_t global,
                                   int64_t *local);

static inline int64_t epmoe_round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

/* offsets[n+1] from counts[n] (exclusive prefix). */
void epmoe_offsets_from_counts(const int64_t *counts, int64_t n, int64_t *offsets);
/* padded_offsets[n+1]: each count rounded up to a multiple of pad_rows. */
void epmoe_padded_offsets_from_counts(const int64_t *counts, int64_t n, int64_t pad_rows,
                                      int64_t *padded_offsets);
/* Rows the padded layout can need at most for `rows` rows over n experts: every expert may
 * add pad_rows - 1 rows of padding. Buffers are sized with this (dropless, rule 22). */
int64_t epmoe_padded_capacity(int64_t rows, int64_t n_experts, int64_t pad_rows);

/* Bucket search: the expert whose [offsets[e], offsets[e+1]) holds `row`, i.e. the largest e
 * with offsets[e] <= row and offsets[e+1] > row (empty experts are skipped). -1 when row is
 * outside [0, offsets[n]). */
int64_t epmoe_expert_of_row(const int64_t *offsets, int64_t n, int64_t row);

#ifdef __cplusplus
}
#endif
#endif
