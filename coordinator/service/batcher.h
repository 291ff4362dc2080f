/* The bounded request queue and the batcher thread.
 *
 * Request threads push validated requests (fp32 rows) into a bounded FIFO; when it is full the
 * push fails and the caller answers RESOURCE_EXHAUSTED. One batcher thread (the only caller of
 * the engine: the driver is not thread-safe) takes the oldest request and gathers the requests
 * with the same layer range up to the token budget, drops the expired and cancelled ones,
 * concatenates the rest, runs one forward and hands each request back its own rows. Results
 * are batch-invariant, so batching changes no output.
 *
 * When it waits for batch mates: only while the service is busy (one of the last four batches
 * held several requests), max_queue_delay from the later of the oldest request's arrival and
 * the previous batch's answer (when that batch had the same layer range), and never past a
 * mate's deadline less the gRPC slack; a request that finds the service idle runs at once.
 *
 * One request's bad rows never fail another request (DESIGN §9). When a forward fails with a
 * data error (EPMOE_ERR_NUMERIC, RANGE or INVALID_ARG: the engine refused some rows' values),
 * the batch is split in halves by request and each half computed again, down to single
 * requests; a request that fails alone is bisected by rows to its first bad row, and only it is
 * answered INVALID_ARGUMENT, naming that row of ITS request. This is exact because a row's
 * result and its acceptance depend on that row alone (the engine is row-wise and
 * batch-invariant), so every good request still gets the bits a run without the bad one gives.
 * Cost: about 2 log2(requests) + log2(rows) extra forwards per bad request, and only when one
 * fails; the engine's own messages name shard rows, which cannot be mapped back reliably.
 *
 * A lost peer (EPMOE_ERR_PEER_LOST, MPI or NCCL: the job cannot go on) is fatal: every request
 * of the batch and of the queue is answered UNAVAILABLE with the engine's message, later pushes
 * are refused, and options.fatal is called once.
 */
#ifndef EPMOE_SERVICE_BATCHER_H
#define EPMOE_SERVICE_BATCHER_H

#include <stdint.h>

#include "common/clock.h"
#include "common/status.h"
#include "coordinator/engine/driver.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct epmoe_serve_request epmoe_serve_request;

struct epmoe_serve_request {
    /* input, owned by the request */
    int64_t n_tokens;
    int64_t layer_begin, layer_end; /* resolved: 0 <= begin < end <= n_layers */
    float *x;                       /* [n_tokens, hidden] */
    int32_t *token_ids;             /* [n_tokens] or NULL */
    double enqueue_time;            /* epmoe_seconds_now() seconds */
    double deadline;                /* same clock; INFINITY for none */
    void *call;                     /* the front end's handle for the reply */
    /* output, filled by the batcher before done() with code OK */
    float *out;                     /* [n_tokens, hidden] */
    double queue_seconds;
    double forward_seconds;
    epmoe_stage_times stage_times; /* of the whole batch */
    int64_t batch_tokens, batch_requests;
    epmoe_serve_request *next;      /* queue link */
    /* the front end's own fields (the batcher does not read them) */
    char request_id[132];
    int wire_dtype;                 /* epmoe.v1.DType of the request, used for the response */
};

/* The engine call: epmoe_driver_forward's contract with a context pointer. */
typedef epmoe_status (*epmoe_forward_fn)(void *ctx, const float *x, const int32_t *token_ids,
                                         int64_t n_tokens, int64_t layer_begin, int64_t layer_end,
                                         float *out, epmoe_stage_times *times,
                                         int64_t *expert_counts);

typedef struct {
    int64_t hidden_size;
    int64_t n_layers;
    int64_t n_routed_experts;
    int64_t max_batch_tokens;    /* token budget of one forward */
    double max_queue_delay;      /* seconds a busy service waits for batch mates (above) */
    int wait_when_idle;          /* 1: the service always counts as busy */
    int64_t max_queue;           /* requests waiting at most */
    epmoe_forward_fn forward;
    void *forward_ctx;
    /* Answers a request (code: an epmoe_rpc_code) and frees it with epmoe_serve_request_free.
     * Called on the batcher thread, or the pushing thread when the queue is full. */
    void (*done)(void *ctx, epmoe_serve_request *r, int code, const char *message);
    /* Optional: the engine failed for good; message is what the waiting calls were told.
     * Called once, on the batcher thread. */
    void (*fatal)(void *ctx, epmoe_status st, const char *message);
    /* Nonzero when the request's client is gone (its result would be thrown away). */
    int (*cancelled)(void *ctx, const epmoe_serve_request *r);
    /* After every forward (optional): its wall time, stage times and tokens per expert
     * ([layers in range * n_routed_experts]). */
    void (*observe)(void *ctx, int64_t n_requests, int64_t n_tokens, double forward_seconds,
                    const epmoe_stage_times *times, const int64_t *expert_counts,
                    int64_t layer_begin, int64_t layer_end);
    void *ctx;
} epmoe_batcher_options;

typedef struct epmoe_batcher epmoe_batcher;

epmoe_status epmoe_batcher_start(const epmoe_batcher_options *opt, epmoe_batcher **out);
/* Takes ownership of r. On a full queue returns EPMOE_ERR_OOM, on a stopping batcher
 * EPMOE_ERR_UNSUPPORTED, after a fatal engine failure EPMOE_ERR_PEER_LOST (the message says
 * why), and leaves r with the caller. */
epmoe_status epmoe_batcher_push(epmoe_batcher *b, epmoe_serve_request *r);
/* Requests waiting (not yet in a running batch). */
int64_t epmoe_batcher_depth(epmoe_batcher *b);
/* Refuses new requests, computes everything already queued, joins the thread, frees. */
void epmoe_batcher_stop(epmoe_batcher *b);

void epmoe_serve_request_free(epmoe_serve_request *r);

#ifdef __cplusplus
}
#endif
#endif
