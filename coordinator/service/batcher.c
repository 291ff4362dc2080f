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
    int broken;               /* the engine failed for good: refuse everything */
    char broken_message[900];
    /* the batch being computed (batcher thread only) */
    float *x, *out;
    int32_t *token_ids;
    int64_t *expert_counts;
    epmoe_serve_request **batch; /* NULL once answered */
    int64_t *row_of;             /* [max_queue + 1]: first batch row of each request */
    int batch_has_ids;
    int64_t batch_begin, batch_end, batch_tokens, batch_requests;
    double batch_start;
    /* how busy the service is (batcher thread only): bit i set when the batch i batches ago
     * held several requests; when the last batch was answered, and its layer range */
    unsigned several_requests_history;
    double last_batch_end;
    int64_t last_batch_begin_layer, last_batch_end_layer;
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

/* Until when the oldest request waits for batch mates (the budget filling ends it sooner, and
 * so does a mate's deadline: see take_batch). While the service is busy (one of the last
 * BUSY_BATCHES batches held several requests), the clients the last batch answered are coming
 * back: a batch of the same layer range waits max_queue_delay from the later of the head's
 * arrival and that answer, so they ride together with the requests that queued during the
 * forward. Counting from the head's arrival alone, a head that queued during a forward has
 * waited long enough already, and the two groups alternate for good, each waiting a whole
 * forward. A request that finds the service idle runs at once (a lone client pays no delay)
 * unless wait_when_idle is set: then the service always counts as busy. */
#define BUSY_BATCHES 4
static double wait_until(const epmoe_batcher *b) {
    const epmoe_serve_request *head = b->head;
    int busy = b->opt.wait_when_idle ||
               (b->several_requests_history & ((1u << BUSY_BATCHES) - 1)) != 0;
    if (!busy) return head->enqueue_time;
    double since = head->enqueue_time;
    const int same_range_as_last = head->layer_begin == b->last_batch_begin_layer &&
                                   head->layer_end == b->last_batch_end_layer;
    if (same_range_as_last) since = fmax(since, b->last_batch_end);
    return since + b->opt.max_queue_delay;
}

/* Waits (lock held) until the oldest request's batch is worth running, then unlinks it from
 * the queue into b->batch. Returns the number taken; 0 means stop. */
static int64_t take_batch(epmoe_batcher *b) {
    while (!b->head && !b->stopping) pthread_cond_wait(&b->cv, &b->mu);
    if (!b->head) return 0;
    for (;;) {
        int64_t tokens = 0;
        double until = wait_until(b);
        for (epmoe_serve_request *r = b->head; r; r = r->next) {
            if (!same_range(r, b->head)) continue;
            tokens += r->n_tokens;
            /* never wait a batch mate past its deadline (less the slack gRPC keeps) */
            until = fmin(until, r->deadline - EPMOE_RPC_DEADLINE_SLACK);
        }
        if (tokens >= b->opt.max_batch_tokens || b->stopping || b->broken) break;
        double wait = until - epmoe_seconds_now();
        if (wait <= 0) break;
        struct timespec wake;
        abs_time_after(wait, &wake);
        pthread_cond_timedwait(&b->cv, &b->mu, &wake);
    }
    /* Oldest first; a request that would overflow the budget waits for the next batch (it
     * becomes the head eventually, and the head is always taken). */
    const epmoe_serve_request key = *b->head;
    b->last_batch_begin_layer = key.layer_begin;
    b->last_batch_end_layer = key.layer_end;
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

/* Errors that depend on the values of the rows (the engine refused some): splitting the batch
 * finds them. */
static int is_data_error(epmoe_status st) {
    return st == EPMOE_ERR_INVALID_ARG || st == EPMOE_ERR_RANGE || st == EPMOE_ERR_NUMERIC;
}

/* The job cannot go on (DESIGN §9): the service reports it and is restarted. */
static int is_fatal(epmoe_status st) {
    return st == EPMOE_ERR_PEER_LOST || st == EPMOE_ERR_MPI || st == EPMOE_ERR_NCCL;
}

static int rpc_code_for(epmoe_status st) {
    if (is_data_error(st)) return EPMOE_RPC_INVALID_ARGUMENT;
    if (is_fatal(st)) return EPMOE_RPC_UNAVAILABLE;
    if (st == EPMOE_ERR_OOM) return EPMOE_RPC_RESOURCE_EXHAUSTED;
    return EPMOE_RPC_INTERNAL;
}

static void answer(epmoe_batcher *b, int64_t i, int code, const char *message) {
    epmoe_serve_request *r = b->batch[i];
    b->batch[i] = NULL;
    b->opt.done(b->opt.ctx, r, code, message);
}

/* One engine call on batch rows [row0, row0 + n); on failure *message holds why. */
static epmoe_status forward_rows(epmoe_batcher *b, int64_t row0, int64_t n, char *message,
                                 size_t cap) {
    const epmoe_batcher_options *o = &b->opt;
    const int64_t H = o->hidden_size;
    epmoe_stage_times times;
    memset(&times, 0, sizeof times);
    double t0 = epmoe_seconds_now();
    epmoe_status st = o->forward(o->forward_ctx, b->x + row0 * H,
                                 b->batch_has_ids ? b->token_ids + row0 : NULL, n,
                                 b->batch_begin, b->batch_end, b->out + row0 * H, &times,
                                 b->expert_counts);
    double seconds = epmoe_seconds_now() - t0;
    if (st != EPMOE_OK) {
        snprintf(message, cap, "%s", epmoe_last_error());
        return st;
    }
    if (o->observe) {
        int64_t requests = 0; /* overlapping the rows */
        for (int64_t i = 0; i < b->batch_requests; i++)
            requests += b->row_of[i] < row0 + n && b->row_of[i + 1] > row0;
        o->observe(o->ctx, requests, n, seconds, &times, b->expert_counts, b->batch_begin,
                   b->batch_end);
    }
    /* what each request reports: the forward it rode in */
    for (int64_t i = 0; i < b->batch_requests; i++) {
        epmoe_serve_request *r = b->batch[i];
        if (!r || b->row_of[i] < row0 || b->row_of[i] >= row0 + n) continue;
        r->forward_seconds = seconds;
        r->stage_times = times;
        r->batch_tokens = n;
    }
    return EPMOE_OK;
}

/* Hands request i its rows (computed in place in b->out). */
static void answer_rows(epmoe_batcher *b, int64_t i, int64_t requests_in_forward) {
    const epmoe_batcher_options *o = &b->opt;
    epmoe_serve_request *r = b->batch[i];
    size_t bytes = (size_t)(r->n_tokens * o->hidden_size) * sizeof(float);
    r->out = malloc(bytes ? bytes : 1);
    r->batch_requests = requests_in_forward;
    if (!r->out) {
        answer(b, i, EPMOE_RPC_RESOURCE_EXHAUSTED, "out of memory for the response");
        return;
    }
    memcpy(r->out, b->out + b->row_of[i] * o->hidden_size, bytes);
    if (o->cancelled && o->cancelled(o->ctx, r))
        answer(b, i, EPMOE_RPC_CANCELLED, "cancelled by the client; result discarded");
    else
        answer(b, i, EPMOE_RPC_OK, NULL);
}

/* The engine failed for good: remember why and tell the front end (once). */
static void go_broken(epmoe_batcher *b, epmoe_status st, const char *message) {
    pthread_mutex_lock(&b->mu);
    int first = !b->broken;
    if (first) {
        b->broken = 1;
        snprintf(b->broken_message, sizeof b->broken_message,
                 "the engine failed and the server is restarting (%s): %s",
                 epmoe_status_name(st), message);
    }
    pthread_mutex_unlock(&b->mu);
    if (first && b->opt.fatal) b->opt.fatal(b->opt.ctx, st, b->broken_message);
}

/* Request i failed alone with a data error: find its first bad row by bisection (rows are
 * independent, so a part fails iff it holds a bad row) and answer it naming that row. */
static void isolate_row(epmoe_batcher *b, int64_t i, epmoe_status st, const char *whole) {
    const int64_t first = b->row_of[i], T = b->batch[i]->n_tokens;
    char message[700], last[700];
    snprintf(last, sizeof last, "%s", whole);
    epmoe_status last_st = st;
    int64_t lo = 0, hi = T; /* rows [lo, hi) of the request hold a bad row */
    int tested_alone = T == 1;
    while (hi - lo > 1) {
        int64_t mid = lo + (hi - lo) / 2;
        epmoe_status s2 = forward_rows(b, first + lo, mid - lo, message, sizeof message);
        if (s2 == EPMOE_OK) {
            lo = mid;
            tested_alone = 0;
        } else if (is_data_error(s2)) {
            hi = mid;
            tested_alone = hi - lo == 1;
            snprintf(last, sizeof last, "%s", message);
            last_st = s2;
        } else {
            if (is_fatal(s2)) go_broken(b, s2, message);
            answer(b, i, rpc_code_for(s2), is_fatal(s2) ? b->broken_message : message);
            return;
        }
    }
    if (!tested_alone) {
        epmoe_status s2 = forward_rows(b, first + lo, 1, message, sizeof message);
        if (s2 == EPMOE_OK) { /* not row-wise after all: report the request as a whole */
            char text[1200];
            snprintf(text, sizeof text, "hidden_states: the engine refused this request (%s): %s",
                     epmoe_status_name(st), whole);
            answer(b, i, EPMOE_RPC_INVALID_ARGUMENT, text);
            return;
        }
        if (!is_data_error(s2)) {
            if (is_fatal(s2)) go_broken(b, s2, message);
            answer(b, i, rpc_code_for(s2), is_fatal(s2) ? b->broken_message : message);
            return;
        }
        snprintf(last, sizeof last, "%s", message);
        last_st = s2;
    }
    char text[1200];
    snprintf(text, sizeof text,
             "hidden_states row %lld: the engine refused this row (%s; computed alone, so the "
             "engine calls it token 0): %s",
             (long long)lo, epmoe_status_name(last_st), last);
    answer(b, i, EPMOE_RPC_INVALID_ARGUMENT, text);
}

/* Computes requests [i0, i1) of the batch in one forward; on a data error splits them. */
static void compute(epmoe_batcher *b, int64_t i0, int64_t i1) {
    char message[700];
    const int64_t row0 = b->row_of[i0], rows = b->row_of[i1] - row0;
    epmoe_status st = forward_rows(b, row0, rows, message, sizeof message);
    if (st == EPMOE_OK) {
        for (int64_t i = i0; i < i1; i++) answer_rows(b, i, i1 - i0);
    } else if (is_fatal(st)) {
        go_broken(b, st, message); /* the caller answers every request left */
    } else if (is_data_error(st) && i1 - i0 > 1) {
        int64_t mid = i0 + (i1 - i0) / 2;
        compute(b, i0, mid);
        if (!b->broken) compute(b, mid, i1);
    } else if (is_data_error(st)) {
        isolate_row(b, i0, st, message);
    } else {
        char text[1200];
        snprintf(text, sizeof text, "engine forward failed (%s): %s", epmoe_status_name(st),
                 message);
        for (int64_t i = i0; i < i1; i++) answer(b, i, rpc_code_for(st), text);
    }
}

static void run_batch(epmoe_batcher *b, int64_t n_taken) {
    const epmoe_batcher_options *o = &b->opt;
    const int64_t H = o->hidden_size;
    /* An expired request is not computed; a cancelled one neither (nobody would read it). The
     * deadline is checked first: gRPC flags a call whose deadline passed as cancelled too. */
    double start = epmoe_seconds_now();
    int64_t n = 0, tokens = 0;
    int all_have_ids = 1;
    for (int64_t i = 0; i < n_taken; i++) {
        epmoe_serve_request *r = b->batch[i];
        char msg[160];
        if (b->broken) {
            o->done(o->ctx, r, EPMOE_RPC_UNAVAILABLE, b->broken_message);
        } else if (start >= r->deadline) {
            snprintf(msg, sizeof msg, "deadline passed after %.6f s in the queue; not computed",
                     start - r->enqueue_time);
            o->done(o->ctx, r, EPMOE_RPC_DEADLINE_EXCEEDED, msg);
        } else if (o->cancelled && o->cancelled(o->ctx, r)) {
            /* a client gives up at its deadline a little before the server's copy of it */
            int deadline = start >= r->deadline - EPMOE_RPC_DEADLINE_SLACK;
            o->done(o->ctx, r, deadline ? EPMOE_RPC_DEADLINE_EXCEEDED : EPMOE_RPC_CANCELLED,
                    deadline ? "deadline passed in the queue; not computed"
                             : "cancelled by the client; not computed");
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
        b->row_of[i] = row;
        row += r->n_tokens;
    }
    b->row_of[n] = row;
    b->batch_has_ids = all_have_ids;
    b->batch_begin = b->batch[0]->layer_begin;
    b->batch_end = b->batch[0]->layer_end;
    b->batch_tokens = tokens;
    b->batch_requests = n;
    b->batch_start = start;
    compute(b, 0, n);
    for (int64_t i = 0; i < n; i++) /* left unanswered only by a fatal failure */
        if (b->batch[i]) answer(b, i, EPMOE_RPC_UNAVAILABLE, b->broken_message);
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
        b->several_requests_history = b->several_requests_history << 1 | (n > 1);
        b->last_batch_end = epmoe_seconds_now();
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
    free(b->row_of);
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
    b->row_of = calloc((size_t)opt->max_queue + 1, sizeof *b->row_of);
    if (!b->x || !b->out || !b->token_ids || !b->expert_counts || !b->batch || !b->row_of) {
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
    if (b->broken) {
        epmoe_set_error_text(EPMOE_ERR_PEER_LOST, b->broken_message);
        pthread_mutex_unlock(&b->mu);
        return EPMOE_ERR_PEER_LOST;
    }
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
