#include "common/layout.h"

epmoe_status epmoe_slice_of_rank(int64_t n_experts, int n_ranks, int rank,
                                 epmoe_expert_slice *out) {
    EPMOE_REQUIRE(n_ranks >= 1, EPMOE_ERR_INVALID_ARG, "rank count %d < 1", n_ranks);
    EPMOE_REQUIRE(n_ranks <= n_experts, EPMOE_ERR_INVALID_ARG,
                  "%d ranks for %lld routed experts: every rank must own at least one expert "
                  "(use at most %lld ranks)",
                  n_ranks, (long long)n_experts, (long long)n_experts);
    EPMOE_REQUIRE(rank >= 0 && rank < n_ranks, EPMOE_ERR_RANGE, "rank %d outside [0, %d)", rank,
                  n_ranks);
    int64_t base = n_experts / n_ranks, extra = n_experts % n_ranks;
    out->start = rank * base + (rank < extra ? rank : extra);
    out->end = out->start + base + (rank < extra ? 1 : 0);
    return EPMOE_OK;
}

void epmoe_shard_of_rank(int64_t T, int n_ranks, int rank, int64_t *start, int64_t *count) {
    const int64_t base = T / n_ranks, extra = T % n_ranks;
    *start = rank * base + (rank < extra ? rank : extra);
    *count = base + (rank < extra ? 1 : 0);
}

epmoe_dispatch_capacity epmoe_dispatch_capacity_of(int64_t max_tokens, int64_t top_k, int n_ranks,
                                                   int64_t n_local) {
    const int64_t P = n_ranks, k_local = top_k < n_local ? top_k : n_local;
    epmoe_dispatch_capacity c;
    c.send_rows = max_tokens * (top_k < P ? top_k : P);
    c.recv_rows = P * max_tokens;
    c.pairs = c.recv_rows * k_local;
    c.return_rows = max_tokens * top_k;
    return c;
}

epmoe_status epmoe_owner_of_expert(int64_t n_experts, int n_ranks, int64_t expert, int *rank) {
    EPMOE_REQUIRE(expert >= 0 && expert < n_experts, EPMOE_ERR_RANGE,
                  "expert id %lld outside [0, %lld)", (long long)expert, (long long)n_experts);
    EPMOE_REQUIRE(n_ranks >= 1 && n_ranks <= n_experts, EPMOE_ERR_INVALID_ARG,
                  "%d ranks for %lld experts", n_ranks, (long long)n_experts);
    int64_t base = n_experts / n_ranks, extra = n_experts % n_ranks;
    int64_t big = extra * (base + 1); /* experts owned by the ranks with one more */
    *rank = expert < big ? (int)(expert / (base + 1)) : (int)(extra + (expert - big) / base);
    return EPMOE_OK;
}

epmoe_status epmoe_global_to_local(const epmoe_expert_slice *slice, int64_t global,
                                   int64_t *local) {
    EPMOE_REQUIRE(global >= slice->start && global < slice->end, EPMOE_ERR_RANGE,
                  "expert %lld is not in this rank's slice [%lld, %lld)", (long long)global,
                  (long long)slice->start, (long long)slice->end);
    *local = global - slice->start;
    return EPMOE_OK;
}

void epmoe_offsets_from_counts(const int64_t *counts, int64_t n, int64_t *offsets) {
    offsets[0] = 0;
    for (int64_t e = 0; e < n; e++) offsets[e + 1] = offsets[e] + counts[e];
}

void epmoe_padded_offsets_from_counts(const int64_t *counts, int64_t n, int64_t pad_rows,
                                      int64_t *padded_offsets) {
    padded_offsets[0] = 0;
    for (int64_t e = 0; e < n; e++)
        padded_offsets[e + 1] = padded_offsets[e] + epmoe_round_up(counts[e], pad_rows);
}

int64_t epmoe_padded_capacity(int64_t rows, int64_t n_experts, int64_t pad_rows) {
    return rows + n_experts * (pad_rows - 1);
}

int64_t epmoe_expert_of_row(const int64_t *offsets, int64_t n, int64_t row) {
    if (row < 0 || row >= offsets[n]) return -1;
    /* Largest e with offsets[e] <= row ("searchsorted right" minus one), which skips empty
     * experts because their offsets[e] == offsets[e+1]. */
    int64_t lo = 0, hi = n; /* invariant: offsets[lo] <= row < offsets[hi] */
    while (hi - lo > 1) {
        int64_t mid = lo + (hi - lo) / 2;
        if (offsets[mid] <= row) lo = mid;
        else hi = mid;
    }
    return lo;
}
