#include "coordinator/service/batcher.h"

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "coordinator/service/grpc_adapter.h"

struct epmoe_batcher {
    epmoe_batcher_options opt;
    pthread_t thread;
    int thread_started;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    epmoe_serve_request *head, *tail;
    int64_t depth;
    int stopping;
    /* the batch being computed (batcher thread only) */
    float *x, *out;
    int32_t *token_ids;
    int64_t *expert_counts;
    epmoe_serve_request **batch;
};

void epmoe_serve_request_free(epmoe_serve_request *r) {
    if (!r) return;
    free(r->x);
    free(r->token_ids);
    free(r->out);
    free(r);
}

static int same_range(const epmoe_serve_request *a, const epmoe_serve_request *b) {
    return a->layer_begin == b->layer_begin && a->layer_end == b->layer_end;
}

static void abs_time_after(double seconds_from_now, struct timespec *until) {
    clock_gettime(CLOCK_MONOTONIC, until);
    double t = (double)until->tv_sec + 1e-9 * (double)until->tv_nsec + seconds_from_now;
    until->tv_sec = (time_t)t;
    until->tv_nsec = (long)((t - (double)until->tv_sec) * 1e9);
    if (until->tv_nsec >= 1000000000L) until->tv_nsec = 999999999L;
}

/* Waits (lock held) until the oldest request's batch is worth running, then unlinks it from
 * the queue into b->batch. Returns the number taken; 0 means stop. */
static int64_t take_batch(epmoe_batcher *b) {
    while (!b->head && !b->stopping) pthread_cond_wait(&b->cv, &b->mu);
    if (!b->head) return 0;
    for (;;) {
        int64_t tokens = 0;
        for (epmoe_serve_request *r = b->head; r; r = r->next)
            if (same_range(r, b->head)) tokens += r->n_tokens;
        if (tokens >= b->opt.max_batch_tokens || b->stopping) break;
        double wait = b->head->enqueue_time + b->opt.max_queue_delay - epmoe_rpc_now();
        if (wait <= 0) break;
        struct timespec until;
        abs_time_after(wait, &until);
        pthread_cond_timedwait(&b->cv, &b->mu, &until);
    }
    /* Oldest first; a request that would overflow the budget waits for the next batch (it
     * becomes the head eventually, and the head is always taken). */
    const epmoe_serve_request key = *b->head;
    int64_t n = 0, tokens = 0;
    epmoe_serve_request **link = &b->head, *prev = NULL;
    while (*link) {
        epmoe_serve_request *r = *link;
        if (same_range(r, &key) && (n == 0 || tokens + r->n_tokens <= b->opt.max_batch_tokens)) {
            *link = r->next;
            if (b->tail == r) b->tail = prev;
            r->next = NULL;
            b->batch[n++] = r;
            tokens += r->n_tokens;
            b->depth--;
        } else {
            prev = r;
            link = &r->next;
        }
    }
    return n;
}

static int rpc_code_for(epmoe_status st) {
    switch (st) {
    case EPMOE_ERR_INVALID_ARG:
    case EPMOE_ERR_RANGE:
    case EPMOE_ERR_NUMERIC: return EPMOE_RPC_INVALID_ARGUMENT;
    case EPMOE_ERR_OOM: return EPMOE_RPC_RESOURCE_EXHAUSTED;
    default: return EPMOE_RPC_INTERNAL;
    }
}

static void run_batch(epmoe_batcher *b, int64_t n_taken) {
    const epmoe_batcher_options *o = &b->opt;
    const int64_t H = o->hidden_size;
    /* An expired request is not computed; a cancelled one neither (nobody would read it). */
    double start = epmoe_rpc_now();
    int64_t n = 0, tokens = 0;
    int all_have_ids = 1;
    for (int64_t i = 0; i < n_taken; i++) {
        epmoe_serve_request *r = b->batch[i];
        char msg[160];
        if (o->cancelled && o->cancelled(o->ctx, r)) {
            o->done(o->ctx, r, EPMOE_RPC_CANCELLED, "cancelled by the client; not computed");
        } else if (start >= r->deadline) {
            snprintf(msg, sizeof msg, "deadline passed after %.6f s in the queue; not computed",
                     start - r->enqueue_time);
            o->done(o->ctx, r, EPMOE_RPC_DEADLINE_EXCEEDED, msg);
        } else {
            b->batch[n++] = r;
            tokens += r->n_tokens;
            all_have_ids &= r->token_ids != NULL;
        }
    }
    if (n == 0) return;

    int64_t row = 0;
    for (int64_t i = 0; i < n; i++) {
        epmoe_serve_request *r = b->batch[i];
        memcpy(b->x + row * H, r->x, (size_t)(r->n_tokens * H) * sizeof(float));
        if (all_have_ids)
            memcpy(b->token_ids + row, r->token_ids, (size_t)r->n_tokens * sizeof(int32_t));
        r->queue_seconds = start - r->enqueue_time;
        row += r->n_tokens;
    }
    const int64_t layer_begin = b->batch[0]->layer_begin, layer_end = b->batch[0]->layer_end;
    epmoe_stage_times times;
    memset(&times, 0, sizeof times);
    double t0 = epmoe_rpc_now();
    epmoe_status st = o->forward(o->forward_ctx, b->x, all_have_ids ? b->token_ids : NULL, tokens,
                                 layer_begin, layer_end, b->out, &times, b->expert_counts);
    double forward_seconds = epmoe_rpc_now() - t0;
    if (st != EPMOE_OK) {
        char msg[600];
        snprintf(msg, sizeof msg, "engine forward failed (%s): %s", epmoe_status_name(st),
                 epmoe_last_error());
        for (int64_t i = 0; i < n; i++) o->done(o->ctx, b->batch[i], rpc_code_for(st), msg);
        return;
    }
    if (o->observe)
        o->observe(o->ctx, n, tokens, forward_seconds, &times, b->expert_counts, layer_begin,
                   layer_end);
    row = 0;
    for (int64_t i = 0; i < n; i++) {
        epmoe_serve_request *r = b->batch[i];
        const int64_t rows = r->n_tokens; /* done() frees r */
        size_t bytes = (size_t)(rows * H) * sizeof(float);
        r->out = malloc(bytes ? bytes : 1);
        r->forward_seconds = forward_seconds;
        r->stage_times = times;
        r->batch_tokens = tokens;
        r->batch_requests = n;
        if (!r->out) {
            o->done(o->ctx, r, EPMOE_RPC_RESOURCE_EXHAUSTED, "out of memory for the response");
        } else {
            memcpy(r->out, b->out + row * H, bytes);
            if (o->cancelled && o->cancelled(o->ctx, r))
                o->done(o->ctx, r, EPMOE_RPC_CANCELLED, "cancelled by the client; result discarded");
            else
                o->done(o->ctx, r, EPMOE_RPC_OK, NULL);
        }
        row += rows;
    }
}

static void *batcher_thread(void *arg) {
    epmoe_batcher *b = arg;
    pthread_mutex_lock(&b->mu);
    for (;;) {
        int64_t n = take_batch(b);
        if (n == 0) break;
        pthread_mutex_unlock(&b->mu);
        run_batch(b, n);
        pthread_mutex_lock(&b->mu);
    }
    pthread_mutex_unlock(&b->mu);
    return NULL;
}

static void batcher_free(epmoe_batcher *b) {
    free(b->x);
    free(b->out);
    free(b->token_ids);
    free(b->expert_counts);
    free(b->batch);
    pthread_mutex_destroy(&b->mu);
    pthread_cond_destroy(&b->cv);
    free(b);
}

epmoe_status epmoe_batcher_start(const epmoe_batcher_options *opt, epmoe_batcher **out) {
    *out = NULL;
    EPMOE_REQUIRE(opt->forward && opt->done, EPMOE_ERR_INVALID_ARG,
                  "batcher: forward and done callbacks are required");
    EPMOE_REQUIRE(opt->hidden_size > 0 && opt->n_layers > 0 && opt->n_routed_experts > 0,
                  EPMOE_ERR_INVALID_ARG, "batcher: hidden_size, n_layers, n_routed_experts > 0");
    EPMOE_REQUIRE(opt->max_batch_tokens > 0 && opt->max_queue > 0 && opt->max_queue_delay >= 0,
                  EPMOE_ERR_INVALID_ARG,
                  "batcher: max_batch_tokens %lld and max_queue %lld must be > 0, "
                  "max_queue_delay %g >= 0",
                  (long long)opt->max_batch_tokens, (long long)opt->max_queue,
                  opt->max_queue_delay);
    epmoe_batcher *b = calloc(1, sizeof *b);
    EPMOE_REQUIRE(b != NULL, EPMOE_ERR_OOM, "batcher: out of memory");
    b->opt = *opt;
    pthread_mutex_init(&b->mu, NULL);
    /* Queue delays are measured on CLOCK_MONOTONIC, so the wait is too. */
    pthread_condattr_t attr;
    pthread_condattr_init(&attr);
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    pthread_cond_init(&b->cv, &attr);
    pthread_condattr_destroy(&attr);
    size_t rows = (size_t)opt->max_batch_tokens;
    b->x = malloc(rows * (size_t)opt->hidden_size * sizeof(float));
    b->out = malloc(rows * (size_t)opt->hidden_size * sizeof(float));
    b->token_ids = malloc(rows * sizeof(int32_t));
    b->expert_counts = calloc((size_t)(opt->n_layers * opt->n_routed_experts), sizeof(int64_t));
    b->batch = calloc((size_t)opt->max_queue, sizeof *b->batch);
    if (!b->x || !b->out || !b->token_ids || !b->expert_counts || !b->batch) {
        batcher_free(b);
        EPMOE_FAIL(EPMOE_ERR_OOM, "batcher: cannot allocate buffers for %lld tokens x %lld",
                   (long long)opt->max_batch_tokens, (long long)opt->hidden_size);
    }
    if (pthread_create(&b->thread, NULL, batcher_thread, b) != 0) {
        batcher_free(b);
        EPMOE_FAIL(EPMOE_ERR_INTERNAL, "batcher: cannot start its thread");
    }
    b->thread_started = 1;
    *out = b;
    return EPMOE_OK;
}

epmoe_status epmoe_batcher_push(epmoe_batcher *b, epmoe_serve_request *r) {
    EPMOE_REQUIRE(r->n_tokens > 0 && r->n_tokens <= b->opt.max_batch_tokens,
                  EPMOE_ERR_INVALID_ARG, "batcher: request of %lld tokens outside [1, %lld]",
                  (long long)r->n_tokens, (long long)b->opt.max_batch_tokens);
    pthread_mutex_lock(&b->mu);
    if (b->stopping) {
        pthread_mutex_unlock(&b->mu);
        EPMOE_FAIL(EPMOE_ERR_UNSUPPORTED, "the server is draining");
    }
    if (b->depth >= b->opt.max_queue) {
        int64_t depth = b->depth;
        pthread_mutex_unlock(&b->mu);
        EPMOE_FAIL(EPMOE_ERR_OOM, "request queue full (%lld requests waiting, max_queue %lld)",
                   (long long)depth, (long long)b->opt.max_queue);
    }
    r->next = NULL;
    if (b->tail)
        b->tail->next = r;
    else
        b->head = r;
    b->tail = r;
    b->depth++;
    pthread_cond_signal(&b->cv);
    pthread_mutex_unlock(&b->mu);
    return EPMOE_OK;
}

int64_t epmoe_batcher_depth(epmoe_batcher *b) {
    pthread_mutex_lock(&b->mu);
    int64_t d = b->depth;
    pthread_mutex_unlock(&b->mu);
    return d;
}

void epmoe_batcher_stop(epmoe_batcher *b) {
    if (!b) return;
    pthread_mutex_lock(&b->mu);
    b->stopping = 1;
    pthread_cond_broadcast(&b->cv);
    pthread_mutex_unlock(&b->mu);
    if (b->thread_started) pthread_join(b->thread, NULL);
    batcher_free(b);
}
