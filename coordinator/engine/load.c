#include "coordinator/engine/load.h"

#include "common/clock.h"

int64_t epmoe_layer_weights_bytes(const epmoe_layer_weights *w) {
    const int64_t H = w->hidden_size, I = w->inter_size, n = w->n_local, Is = w->shared_inter;
    /* per expert: W13 [2I, H] and W2 [H, I], codes (1/2 byte) + block scales (1/16 byte) */
    const int64_t experts = n * (3 * I * H / 2 + 3 * I * H / 16 + 4 * 5) +
                            (w->w13_bias ? n * (2 * I + H) * 4 : 0); /* fp32 expert biases */
    const int64_t gate = w->n_experts * H * 4 + (w->gate_bias ? w->n_experts * 4 : 0);
    const int64_t shared = 3 * Is * H * 4;
    return experts + gate + shared;
}

epmoe_status epmoe_load_layers(const epmoe_st_set *ckpt, const epmoe_config *cfg,
                               const epmoe_expert_slice *slice, int64_t begin, int64_t end,
                               int rank, FILE *log, epmoe_layer_sink sink, void *sink_ctx) {
    const double t0 = epmoe_seconds_now();
    int64_t total_bytes = 0;
    for (int64_t l = begin; l < end; l++) {
        epmoe_layer_weights w;
        epmoe_status st = epmoe_layer_weights_load(ckpt, cfg, l, slice, &w);
        if (st != EPMOE_OK)
            return epmoe_add_context(st, "rank %d, layer %lld", rank, (long long)l);
        /* the load rate counts what was read: the tensors' bytes in the checkpoint (an MXFP4
         * or FP8 tensor is smaller there than the NVFP4 or fp32 copy this rank keeps) */
        const int64_t bytes = w.checkpoint_bytes;
        st = sink(sink_ctx, l, &w); /* owns w from here, on failure too */
        if (st != EPMOE_OK)
            return epmoe_add_context(st, "rank %d, layer %lld", rank, (long long)l);
        total_bytes += bytes;
        if (log && rank == 0) {
            const double dt = epmoe_seconds_now() - t0;
            fprintf(log, "epmoe: loaded layer %lld (%lld of %lld): %.2f GB read so far, %.1f s\n",
                    (long long)l, (long long)(l - begin + 1), (long long)(end - begin),
                    (double)total_bytes / 1e9, dt);
        }
    }
    if (log && rank == 0) {
        const double dt = epmoe_seconds_now() - t0;
        fprintf(log, "epmoe: rank 0 read %.2f GB of checkpoint tensors in %.2f s (%.2f GB/s)\n",
                (double)total_bytes / 1e9, dt, dt > 0 ? (double)total_bytes / 1e9 / dt : 0.0);
    }
    return EPMOE_OK;
}
