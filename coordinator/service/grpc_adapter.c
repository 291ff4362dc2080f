/* Every gRPC core call of the project lives here (see grpc_adapter.h). Written against the
 * gRPC core C API of Debian's libgrpc-dev 1.51. */
#include "coordinator/service/grpc_adapter.h"

#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/slice.h>
#include <grpc/support/time.h>

#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

const char *epmoe_rpc_code_name(int code) {
    static const char *const names[EPMOE_RPC_CODE_COUNT] = {
        "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
        "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
        "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
        "UNAUTHENTICATED"};
    return code >= 0 && code < EPMOE_RPC_CODE_COUNT ? names[code] : "?";
}

static atomic_int library_refs;

void epmoe_rpc_library_init(void) {
    if (atomic_fetch_add(&library_refs, 1) == 0) grpc_init();
}

void epmoe_rpc_library_shutdown(void) {
    if (atomic_fetch_sub(&library_refs, 1) == 1) grpc_shutdown_blocking();
}

/* Reads a whole byte buffer into one malloc'd block (NULL buffer: empty message). */
static uint8_t *read_byte_buffer(grpc_byte_buffer *bb, size_t *nbytes) {
    *nbytes = 0;
    if (!bb) return malloc(1);
    grpc_byte_buffer_reader reader;
    if (!grpc_byte_buffer_reader_init(&reader, bb)) return NULL;
    grpc_slice all = grpc_byte_buffer_reader_readall(&reader);
    grpc_byte_buffer_reader_destroy(&reader);
    size_t n = GRPC_SLICE_LENGTH(all);
    uint8_t *data = malloc(n ? n : 1);
    if (data) {
        memcpy(data, GRPC_SLICE_START_PTR(all), n);
        *nbytes = n;
    }
    grpc_slice_unref(all);
    return data;
}

static grpc_byte_buffer *make_byte_buffer(const uint8_t *data, size_t nbytes) {
    grpc_slice s = grpc_slice_from_copied_buffer((const char *)data, nbytes);
    grpc_byte_buffer *bb = grpc_raw_byte_buffer_create(&s, 1);
    grpc_slice_unref(s);
    return bb;
}

/* ---- server --------------------------------------------------------------------------------*/

typedef enum { TAG_NEW_CALL, TAG_RECV_MESSAGE, TAG_CLOSED, TAG_SENT, TAG_SHUTDOWN } tag_kind;

typedef struct {
    tag_kind kind;
    epmoe_rpc_call *call; /* NULL for TAG_SHUTDOWN */
} call_tag;

struct epmoe_rpc_call {
    epmoe_rpc_server *server;
    grpc_call *call;
    grpc_call_details details;
    grpc_metadata_array request_metadata;
    grpc_byte_buffer *recv_buffer;
    int close_cancelled; /* written by RECV_CLOSE_ON_SERVER */
    call_tag tag_new, tag_recv, tag_closed, tag_sent;
    /* Two owners keep the call alive: the pending close notification, and the reply (the
     * handler's ownership until its send completes). */
    atomic_int refs;
    atomic_int cancelled;
    atomic_int replied;
    char method[128];
    double arrival, reply_time;
    double closed_time; /* when the call ended on gRPC's side (TAG_CLOSED) */
    double deadline;
    int arrived;      /* a real call (not a pending slot): its outcome is reported */
    int replied_code; /* -1 until replied */
    int send_ok;      /* the reply batch completed successfully */
    int64_t units;
    uint8_t *request;
    size_t request_nbytes;
    grpc_byte_buffer *send_buffer;
    grpc_slice status_details;
    int have_status_details;
};

struct epmoe_rpc_server {
    grpc_server *server;
    grpc_completion_queue *cq;
    epmoe_rpc_server_options opt;
    pthread_t *threads;
    int n_threads;
    atomic_int stopping;
    call_tag tag_shutdown;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int shutdown_done;
    /* Starting a batch on a shut-down completion queue aborts inside gRPC. A handler can still
     * be about to start one (a call that arrived just before shutdown, a late reply), so every
     * server-side batch goes through start_batch, and stop closes the gate and waits for the
     * batches being started before it shuts the queue down. */
    atomic_int cq_closing;
    atomic_int batches_starting;
};

/* Calls we ask gRPC for ahead of time: that many can arrive at once without waiting. */
#define PENDING_CALLS 32

/* Reports how the call ended (once both its close notification and its reply are done). */
static void report_outcome(epmoe_rpc_call *c) {
    epmoe_rpc_server *s = c->server;
    if (!c->arrived || !s->opt.finished) return;
    const double now = epmoe_seconds_now();
    epmoe_rpc_outcome o;
    o.method = c->method;
    o.replied_code = c->replied_code;
    o.delivered = c->replied_code >= 0 && c->send_ok && !c->close_cancelled;
    const double ended = c->closed_time > 0 ? c->closed_time : now;
    if (o.delivered)
        o.code = c->replied_code;
    else
        o.code = ended >= c->deadline - EPMOE_RPC_DEADLINE_SLACK ? EPMOE_RPC_DEADLINE_EXCEEDED
                                                                 : EPMOE_RPC_CANCELLED;
    o.seconds = (c->replied_code >= 0 ? c->reply_time : now) - c->arrival;
    o.units = c->units;
    s->opt.finished(s->opt.user, &o);
}

static void call_free(epmoe_rpc_call *c) {
    report_outcome(c);
    if (c->call) grpc_call_unref(c->call);
    grpc_call_details_destroy(&c->details);
    grpc_metadata_array_destroy(&c->request_metadata);
    if (c->recv_buffer) grpc_byte_buffer_destroy(c->recv_buffer);
    if (c->send_buffer) grpc_byte_buffer_destroy(c->send_buffer);
    if (c->have_status_details) grpc_slice_unref(c->status_details);
    free(c->request);
    free(c);
}

/* grpc_call_start_batch unless the completion queue is closing (then GRPC_CALL_ERROR, and the
 * caller cleans up as for any refused batch). Sequentially consistent atomics: either this sees
 * cq_closing, or stop sees batches_starting > 0 and waits. */
static grpc_call_error start_batch(epmoe_rpc_call *c, const grpc_op *ops, size_t n, void *tag) {
    epmoe_rpc_server *s = c->server;
    atomic_fetch_add(&s->batches_starting, 1);
    grpc_call_error err = GRPC_CALL_ERROR;
    if (!atomic_load(&s->cq_closing)) err = grpc_call_start_batch(c->call, ops, n, tag, NULL);
    atomic_fetch_sub(&s->batches_starting, 1);
    return err;
}

static void call_release(epmoe_rpc_call *c) {
    if (atomic_fetch_sub(&c->refs, 1) == 1) call_free(c);
}

static void request_new_call(epmoe_rpc_server *s) {
    if (atomic_load(&s->stopping)) return;
    epmoe_rpc_call *c = calloc(1, sizeof *c);
    if (!c) return; /* the next completed call asks again */
    c->server = s;
    grpc_call_details_init(&c->details);
    grpc_metadata_array_init(&c->request_metadata);
    c->tag_new = (call_tag){TAG_NEW_CALL, c};
    c->tag_recv = (call_tag){TAG_RECV_MESSAGE, c};
    c->tag_closed = (call_tag){TAG_CLOSED, c};
    c->tag_sent = (call_tag){TAG_SENT, c};
    grpc_call_error err = grpc_server_request_call(s->server, &c->call, &c->details,
                                                   &c->request_metadata, s->cq, s->cq, &c->tag_new);
    if (err != GRPC_CALL_OK) call_free(c);
}

static double deadline_seconds(gpr_timespec deadline) {
    if (gpr_time_cmp(deadline, gpr_inf_future(deadline.clock_type)) == 0) return INFINITY;
    gpr_timespec now = gpr_now(deadline.clock_type);
    double remaining = (double)gpr_timespec_to_micros(gpr_time_sub(deadline, now)) * 1e-6;
    return epmoe_seconds_now() + remaining;
}

static void on_new_call(epmoe_rpc_server *s, epmoe_rpc_call *c, int success) {
    if (!success) { /* server shutting down: this slot was never used */
        call_free(c);
        return;
    }
    request_new_call(s);
    size_t n = GRPC_SLICE_LENGTH(c->details.method);
    if (n >= sizeof c->method) n = sizeof c->method - 1;
    memcpy(c->method, GRPC_SLICE_START_PTR(c->details.method), n);
    c->method[n] = '\0';
    c->deadline = deadline_seconds(c->details.deadline);
    c->arrival = epmoe_seconds_now();
    c->replied_code = -1;
    c->arrived = 1;
    atomic_store(&c->refs, 2);

    grpc_op close_op;
    memset(&close_op, 0, sizeof close_op);
    close_op.op = GRPC_OP_RECV_CLOSE_ON_SERVER;
    close_op.data.recv_close_on_server.cancelled = &c->close_cancelled;
    if (start_batch(c, &close_op, 1, &c->tag_closed) != GRPC_CALL_OK) {
        c->close_cancelled = 1;
        atomic_store(&c->cancelled, 1);
        atomic_fetch_sub(&c->refs, 1);
    }
    grpc_op recv_op;
    memset(&recv_op, 0, sizeof recv_op);
    recv_op.op = GRPC_OP_RECV_MESSAGE;
    recv_op.data.recv_message.recv_message = &c->recv_buffer;
    if (start_batch(c, &recv_op, 1, &c->tag_recv) != GRPC_CALL_OK)
        epmoe_rpc_call_reply(c, EPMOE_RPC_INTERNAL, "could not receive the request", NULL, 0);
}

static void on_recv_message(epmoe_rpc_server *s, epmoe_rpc_call *c, int success) {
    if (!success || !c->recv_buffer) {
        /* The client half-closed without a message, or the message was cut short (or the call
         * broke: then nobody reads this, and the outcome says CANCELLED). */
        epmoe_rpc_call_reply(c, EPMOE_RPC_INVALID_ARGUMENT,
                             "request: no complete request message received", NULL, 0);
        return;
    }
    c->request = read_byte_buffer(c->recv_buffer, &c->request_nbytes);
    grpc_byte_buffer_destroy(c->recv_buffer);
    c->recv_buffer = NULL;
    if (!c->request) {
        epmoe_rpc_call_reply(c, EPMOE_RPC_RESOURCE_EXHAUSTED, "out of memory reading request",
                             NULL, 0);
        return;
    }
    s->opt.handler(s->opt.user, c);
}

static void *cq_thread(void *arg) {
    epmoe_rpc_server *s = arg;
    for (;;) {
        grpc_event ev = grpc_completion_queue_next(s->cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
        if (ev.type == GRPC_QUEUE_SHUTDOWN) break;
        if (ev.type != GRPC_OP_COMPLETE) continue;
        call_tag *tag = ev.tag;
        switch (tag->kind) {
        case TAG_NEW_CALL: on_new_call(s, tag->call, ev.success); break;
        case TAG_RECV_MESSAGE: on_recv_message(s, tag->call, ev.success); break;
        case TAG_CLOSED:
            /* Fires when the call ends: after our status was sent, or earlier when the client
             * cancelled, the deadline passed or the connection broke. */
            tag->call->closed_time = epmoe_seconds_now();
            if (tag->call->close_cancelled || !atomic_load(&tag->call->replied))
                atomic_store(&tag->call->cancelled, 1);
            call_release(tag->call);
            break;
        case TAG_SENT:
            tag->call->send_ok = ev.success;
            call_release(tag->call);
            break;
        case TAG_SHUTDOWN:
            pthread_mutex_lock(&s->mu);
            s->shutdown_done = 1;
            pthread_cond_broadcast(&s->cv);
            pthread_mutex_unlock(&s->mu);
            break;
        }
    }
    return NULL;
}

epmoe_status epmoe_rpc_server_start(const epmoe_rpc_server_options *opt, epmoe_rpc_server **out,
                                    int *bound_port) {
    *out = NULL;
    EPMOE_REQUIRE(opt->handler && opt->listen && opt->threads >= 1, EPMOE_ERR_INVALID_ARG,
                  "rpc server: handler, listen address and threads >= 1 are required");
    EPMOE_REQUIRE(opt->max_message_bytes > 0 && opt->max_message_bytes <= INT32_MAX,
                  EPMOE_ERR_INVALID_ARG, "rpc server: max_message_bytes %lld outside [1, 2^31)",
                  (long long)opt->max_message_bytes);
    EPMOE_REQUIRE(opt->memory_bytes >= opt->max_message_bytes, EPMOE_ERR_INVALID_ARG,
                  "rpc server: memory_bytes %lld below max_message_bytes %lld",
                  (long long)opt->memory_bytes, (long long)opt->max_message_bytes);
    epmoe_rpc_server *s = calloc(1, sizeof *s);
    EPMOE_REQUIRE(s != NULL, EPMOE_ERR_OOM, "rpc server: out of memory");
    s->opt = *opt;
    s->tag_shutdown = (call_tag){TAG_SHUTDOWN, NULL};
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->cv, NULL);
    epmoe_rpc_library_init();

    /* gRPC core 1.51 checks GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH only once a message is whole:
     * a client declaring 3 GiB is read into memory up to 3 GiB first (measured). What bounds
     * that memory is the resource quota: once gRPC's buffers reach it, its reclaimer cancels a
     * stream ("Buffers full"). So the server gets a quota of its own, memory_bytes. */
    grpc_resource_quota *quota = grpc_resource_quota_create("epmoe-serve");
    grpc_resource_quota_resize(quota, (size_t)opt->memory_bytes);
    grpc_arg args[3];
    memset(args, 0, sizeof args);
    args[0].type = GRPC_ARG_INTEGER;
    args[0].key = GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH;
    args[0].value.integer = (int)opt->max_message_bytes;
    args[1].type = GRPC_ARG_INTEGER;
    args[1].key = GRPC_ARG_MAX_SEND_MESSAGE_LENGTH;
    args[1].value.integer = (int)opt->max_message_bytes;
    args[2].type = GRPC_ARG_POINTER;
    args[2].key = GRPC_ARG_RESOURCE_QUOTA;
    args[2].value.pointer.p = quota;
    args[2].value.pointer.vtable = grpc_resource_quota_arg_vtable();
    grpc_channel_args channel_args = {3, args};
    s->server = grpc_server_create(&channel_args, NULL);
    grpc_resource_quota_unref(quota); /* the server holds its own reference */
    s->cq = grpc_completion_queue_create_for_next(NULL);
    grpc_server_register_completion_queue(s->server, s->cq, NULL);
    grpc_server_credentials *creds = grpc_insecure_server_credentials_create();
    int port = grpc_server_add_http2_port(s->server, opt->listen, creds);
    grpc_server_credentials_release(creds);
    if (port == 0) {
        grpc_server_destroy(s->server);
        grpc_completion_queue_shutdown(s->cq);
        while (grpc_completion_queue_next(s->cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL).type !=
               GRPC_QUEUE_SHUTDOWN) {
        }
        grpc_completion_queue_destroy(s->cq);
        epmoe_rpc_library_shutdown();
        free(s);
        EPMOE_FAIL(EPMOE_ERR_IO, "rpc server: cannot listen on '%s' (address in use or invalid)",
                   opt->listen);
    }
    grpc_server_start(s->server);
    for (int i = 0; i < PENDING_CALLS; i++) request_new_call(s);
    s->threads = calloc((size_t)opt->threads, sizeof *s->threads);
    EPMOE_REQUIRE(s->threads != NULL, EPMOE_ERR_OOM, "rpc server: out of memory");
    for (int i = 0; i < opt->threads; i++) {
        if (pthread_create(&s->threads[i], NULL, cq_thread, s) != 0) break;
        s->n_threads++;
    }
    if (s->n_threads == 0) {
        epmoe_rpc_server_stop(s, 0);
        EPMOE_FAIL(EPMOE_ERR_INTERNAL, "rpc server: cannot start completion-queue threads");
    }
    if (bound_port) *bound_port = port;
    *out = s;
    return EPMOE_OK;
}

static int wait_shutdown(epmoe_rpc_server *s, double seconds) {
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    double t = (double)until.tv_sec + 1e-9 * (double)until.tv_nsec + seconds;
    until.tv_sec = (time_t)t;
    until.tv_nsec = (long)((t - (double)until.tv_sec) * 1e9);
    pthread_mutex_lock(&s->mu);
    while (!s->shutdown_done) {
        if (pthread_cond_timedwait(&s->cv, &s->mu, &until) != 0) break;
    }
    int done = s->shutdown_done;
    pthread_mutex_unlock(&s->mu);
    return done;
}

void epmoe_rpc_server_stop(epmoe_rpc_server *s, double grace_seconds) {
    if (!s) return;
    atomic_store(&s->stopping, 1);
    grpc_server_shutdown_and_notify(s->server, s->cq, &s->tag_shutdown);
    if (s->n_threads > 0 && !wait_shutdown(s, grace_seconds > 0 ? grace_seconds : 0.001)) {
        grpc_server_cancel_all_calls(s->server);
        wait_shutdown(s, 3600.0);
    }
    if (s->n_threads == 0) {
        /* No thread to see the notification: drain it here. */
        grpc_server_cancel_all_calls(s->server);
        grpc_completion_queue_pluck(s->cq, &s->tag_shutdown, gpr_inf_future(GPR_CLOCK_REALTIME),
                                    NULL);
    }
    grpc_server_destroy(s->server);
    atomic_store(&s->cq_closing, 1);
    while (atomic_load(&s->batches_starting) > 0) {
        struct timespec nap = {0, 100 * 1000};
        nanosleep(&nap, NULL);
    }
    grpc_completion_queue_shutdown(s->cq);
    for (int i = 0; i < s->n_threads; i++) pthread_join(s->threads[i], NULL);
    grpc_completion_queue_destroy(s->cq);
    free(s->threads);
    pthread_mutex_destroy(&s->mu);
    pthread_cond_destroy(&s->cv);
    free(s);
    epmoe_rpc_library_shutdown();
}

const char *epmoe_rpc_call_method(const epmoe_rpc_call *c) { return c->method; }

const uint8_t *epmoe_rpc_call_request(const epmoe_rpc_call *c, size_t *nbytes) {
    *nbytes = c->request_nbytes;
    return c->request;
}

double epmoe_rpc_call_deadline(const epmoe_rpc_call *c) { return c->deadline; }

int epmoe_rpc_call_cancelled(const epmoe_rpc_call *c) {
    return atomic_load(&((epmoe_rpc_call *)c)->cancelled);
}

void epmoe_rpc_call_set_units(epmoe_rpc_call *c, int64_t units) { c->units = units; }

void epmoe_rpc_call_reply(epmoe_rpc_call *c, int code, const char *message,
                          const uint8_t *response, size_t nbytes) {
    c->replied_code = code;
    c->reply_time = epmoe_seconds_now();
    atomic_store(&c->replied, 1);
    grpc_op ops[3];
    memset(ops, 0, sizeof ops);
    size_t n = 0;
    ops[n].op = GRPC_OP_SEND_INITIAL_METADATA;
    ops[n].data.send_initial_metadata.count = 0;
    n++;
    if (code == EPMOE_RPC_OK) {
        c->send_buffer = make_byte_buffer(response ? response : (const uint8_t *)"", nbytes);
        ops[n].op = GRPC_OP_SEND_MESSAGE;
        ops[n].data.send_message.send_message = c->send_buffer;
        n++;
    }
    c->status_details = grpc_slice_from_copied_string(message ? message : "");
    c->have_status_details = 1;
    ops[n].op = GRPC_OP_SEND_STATUS_FROM_SERVER;
    ops[n].data.send_status_from_server.trailing_metadata_count = 0;
    ops[n].data.send_status_from_server.status = (grpc_status_code)code;
    ops[n].data.send_status_from_server.status_details = &c->status_details;
    n++;
    if (start_batch(c, ops, n, &c->tag_sent) != GRPC_CALL_OK)
        call_release(c); /* no completion will come for this batch */
}

/* ---- client --------------------------------------------------------------------------------*/

struct epmoe_rpc_channel {
    grpc_channel *channel;
};

epmoe_status epmoe_rpc_channel_open(const char *target, int64_t max_message_bytes,
                                    epmoe_rpc_channel **out) {
    *out = NULL;
    EPMOE_REQUIRE(max_message_bytes > 0 && max_message_bytes <= INT32_MAX, EPMOE_ERR_INVALID_ARG,
                  "rpc channel: max_message_bytes %lld outside [1, 2^31)",
                  (long long)max_message_bytes);
    epmoe_rpc_channel *ch = calloc(1, sizeof *ch);
    EPMOE_REQUIRE(ch != NULL, EPMOE_ERR_OOM, "rpc channel: out of memory");
    epmoe_rpc_library_init();
    grpc_arg args[3];
    memset(args, 0, sizeof args);
    args[0].type = GRPC_ARG_INTEGER;
    args[0].key = GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH;
    args[0].value.integer = (int)max_message_bytes;
    args[1].type = GRPC_ARG_INTEGER;
    args[1].key = GRPC_ARG_MAX_SEND_MESSAGE_LENGTH;
    args[1].value.integer = (int)max_message_bytes;
    /* A loopback service must not be sent through an http_proxy from the environment. */
    args[2].type = GRPC_ARG_INTEGER;
    args[2].key = GRPC_ARG_ENABLE_HTTP_PROXY;
    args[2].value.integer = 0;
    grpc_channel_args channel_args = {3, args};
    grpc_channel_credentials *creds = grpc_insecure_credentials_create();
    ch->channel = grpc_channel_create(target, creds, &channel_args);
    grpc_channel_credentials_release(creds);
    if (!ch->channel) {
        free(ch);
        epmoe_rpc_library_shutdown();
        EPMOE_FAIL(EPMOE_ERR_INVALID_ARG, "rpc channel: cannot create a channel to '%s'", target);
    }
    *out = ch;
    return EPMOE_OK;
}

void epmoe_rpc_channel_close(epmoe_rpc_channel *ch) {
    if (!ch) return;
    grpc_channel_destroy(ch->channel);
    free(ch);
    epmoe_rpc_library_shutdown();
}

epmoe_status epmoe_rpc_unary(epmoe_rpc_channel *ch, const char *method, const uint8_t *request,
                             size_t nbytes, double timeout_seconds, epmoe_rpc_result *out) {
    memset(out, 0, sizeof *out);
    grpc_completion_queue *cq = grpc_completion_queue_create_for_pluck(NULL);
    gpr_timespec deadline = gpr_inf_future(GPR_CLOCK_REALTIME);
    if (timeout_seconds > 0)
        deadline = gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC),
                                gpr_time_from_micros((int64_t)(timeout_seconds * 1e6), GPR_TIMESPAN));
    grpc_slice method_slice = grpc_slice_from_copied_string(method);
    grpc_call *call = grpc_channel_create_call(ch->channel, NULL, GRPC_PROPAGATE_DEFAULTS, cq,
                                               method_slice, NULL, deadline, NULL);
    grpc_slice_unref(method_slice);
    if (!call) {
        grpc_completion_queue_shutdown(cq);
        grpc_completion_queue_destroy(cq);
        EPMOE_FAIL(EPMOE_ERR_INTERNAL, "rpc %s: cannot create the call", method);
    }

    grpc_byte_buffer *send = make_byte_buffer(request ? request : (const uint8_t *)"", nbytes);
    grpc_byte_buffer *recv = NULL;
    grpc_metadata_array initial_md, trailing_md;
    grpc_metadata_array_init(&initial_md);
    grpc_metadata_array_init(&trailing_md);
    grpc_status_code status = GRPC_STATUS_UNKNOWN;
    grpc_slice details = grpc_empty_slice();

    grpc_op ops[6];
    memset(ops, 0, sizeof ops);
    ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
    ops[1].op = GRPC_OP_SEND_MESSAGE;
    ops[1].data.send_message.send_message = send;
    ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
    ops[3].op = GRPC_OP_RECV_INITIAL_METADATA;
    ops[3].data.recv_initial_metadata.recv_initial_metadata = &initial_md;
    ops[4].op = GRPC_OP_RECV_MESSAGE;
    ops[4].data.recv_message.recv_message = &recv;
    ops[5].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
    ops[5].data.recv_status_on_client.trailing_metadata = &trailing_md;
    ops[5].data.recv_status_on_client.status = &status;
    ops[5].data.recv_status_on_client.status_details = &details;
    int tag = 0;
    grpc_call_error err = grpc_call_start_batch(call, ops, 6, &tag, NULL);
    epmoe_status st = EPMOE_OK;
    if (err != GRPC_CALL_OK) {
        st = epmoe_set_error(EPMOE_ERR_INTERNAL, __FILE__, __LINE__, "rpc %s: start_batch: %s",
                             method, grpc_call_error_to_string(err));
    } else {
        grpc_completion_queue_pluck(cq, &tag, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
        out->code = (int)status;
        size_t n = GRPC_SLICE_LENGTH(details);
        if (n >= sizeof out->message) n = sizeof out->message - 1;
        memcpy(out->message, GRPC_SLICE_START_PTR(details), n);
        out->message[n] = '\0';
        if (status == GRPC_STATUS_OK) {
            out->response = read_byte_buffer(recv, &out->nbytes);
            if (!out->response)
                st = epmoe_set_error(EPMOE_ERR_OOM, __FILE__, __LINE__,
                                     "rpc %s: out of memory reading the response", method);
        }
    }
    grpc_slice_unref(details);
    if (recv) grpc_byte_buffer_destroy(recv);
    grpc_byte_buffer_destroy(send);
    grpc_metadata_array_destroy(&initial_md);
    grpc_metadata_array_destroy(&trailing_md);
    grpc_call_unref(call);
    grpc_completion_queue_shutdown(cq);
    while (grpc_completion_queue_pluck(cq, NULL, gpr_inf_future(GPR_CLOCK_REALTIME), NULL).type !=
           GRPC_QUEUE_SHUTDOWN) {
    }
    grpc_completion_queue_destroy(cq);
    return st;
}
