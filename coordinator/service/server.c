#include "coordinator/service/server.h"

#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "coordinator/service/grpc_adapter.h"
#include "coordinator/service/metrics.h"
#include "common/user_message.h"
#include "coordinator/service/wire.h"
#include "epmoe.pb-c.h"
#include "grpc/health/v1/health.pb-c.h"

#ifndef EPMOE_VERSION
#define EPMOE_VERSION "unknown"
#endif

struct epmoe_service {
    epmoe_service_options opt;
    int64_t max_batch_tokens, max_request_tokens;
    epmoe_wire_limits limits;
    epmoe_metrics *metrics;
    epmoe_metrics_http *http;
    epmoe_batcher *batcher;
    epmoe_rpc_server *rpc;
    int port, metrics_port;
    atomic_int draining;
    atomic_int failed;            /* the engine failed for good (on_fatal) */
    char failed_message[900];     /* written once before failed is set */
    atomic_llong inflight;
    /* Handlers push under this lock; the drain closes the batcher under it, so nobody pushes
     * into a batcher that is being freed. */
    pthread_mutex_t front_mu;
    int batcher_closed;
};

static epmoe_method method_of(const char *path) {
    if (strcmp(path, "/epmoe.v1.Moe/Forward") == 0) return EPMOE_METHOD_FORWARD;
    if (strcmp(path, "/epmoe.v1.Moe/Info") == 0) return EPMOE_METHOD_INFO;
    if (strncmp(path, "/grpc.health.v1.Health/", 23) == 0) return EPMOE_METHOD_HEALTH;
    return EPMOE_METHOD_OTHER;
}

/* Every reply of the service goes through here: users get messages without source
 * locations; the log keeps them (log_level 2: every refused call; 1: server-side failures). */
static void reply(epmoe_service *s, epmoe_rpc_call *call, int code, const char *message,
                  const uint8_t *bytes, size_t nbytes) {
    char clean[1024];
    if (message) epmoe_user_message(clean, sizeof clean, message);
    const int64_t level = s->opt.cfg.log_level;
    if (code != EPMOE_RPC_OK && message &&
        (level >= 2 || (level >= 1 && code == EPMOE_RPC_INTERNAL)))
        fprintf(stderr, "epmoe-serve: %s %s: %s\n", epmoe_rpc_call_method(call),
                epmoe_rpc_code_name(code), message);
    epmoe_rpc_call_reply(call, code, message ? clean : NULL, bytes, nbytes);
}

/* How each call ended (after its reply went out, or could not): the metrics count what the
 * client got, and rows only for OK replies that were delivered. */
static void on_finished(void *user, const epmoe_rpc_outcome *o) {
    epmoe_service *s = user;
    epmoe_method m = method_of(o->method);
    epmoe_metrics_count_request(s->metrics, m, o->code, o->seconds);
    if (!o->delivered && o->replied_code >= 0)
        epmoe_metrics_count_undelivered(s->metrics, m, o->replied_code);
    if (o->delivered && o->code == EPMOE_RPC_OK && m == EPMOE_METHOD_FORWARD)
        epmoe_metrics_count_tokens(s->metrics, o->units);
}

/* ---- batcher callbacks ---------------------------------------------------------------------*/

static void on_done(void *ctx, epmoe_serve_request *r, int code, const char *message) {
    epmoe_service *s = ctx;
    uint8_t *bytes = NULL;
    size_t nbytes = 0;
    char err[600];
    if (code == EPMOE_RPC_OK) {
        epmoe_status st = epmoe_wire_encode_forward(r, s->opt.info.hidden_size, &bytes, &nbytes);
        if (st == EPMOE_ERR_NUMERIC) { /* this request's output cannot be sent: its error */
            snprintf(err, sizeof err, "%s", epmoe_last_error());
            code = EPMOE_RPC_INVALID_ARGUMENT;
            message = err;
        } else if (st != EPMOE_OK) {
            snprintf(err, sizeof err, "encoding the response: %s", epmoe_last_error());
            code = st == EPMOE_ERR_OOM ? EPMOE_RPC_RESOURCE_EXHAUSTED : EPMOE_RPC_INTERNAL;
            message = err;
        } else if ((int64_t)nbytes > s->opt.cfg.max_message_bytes) {
            /* gRPC would refuse to send it (RESOURCE_EXHAUSTED of its own): say why */
            snprintf(err, sizeof err,
                     "response: %zu bytes exceed max_message_bytes %lld; send fewer rows per "
                     "request",
                     nbytes, (long long)s->opt.cfg.max_message_bytes);
            free(bytes);
            bytes = NULL;
            nbytes = 0;
            code = EPMOE_RPC_RESOURCE_EXHAUSTED;
            message = err;
        } else {
            epmoe_rpc_call_set_units(r->call, r->n_tokens);
        }
    }
    if (r->queue_seconds > 0) /* it reached a batch */
        epmoe_metrics_observe_queue(s->metrics, r->queue_seconds);
    reply(s, r->call, code, message, bytes, nbytes);
    free(bytes);
    atomic_fetch_sub(&s->inflight, 1);
    epmoe_serve_request_free(r);
}

static int on_cancelled(void *ctx, const epmoe_serve_request *r) {
    (void)ctx;
    return epmoe_rpc_call_cancelled(r->call);
}

static void on_fatal(void *ctx, epmoe_status st, const char *message) {
    epmoe_service *s = ctx;
    snprintf(s->failed_message, sizeof s->failed_message, "%s", message); /* the batcher's */
    atomic_store(&s->failed, 1);
    fprintf(stderr, "epmoe-serve: FATAL: %s\n", s->failed_message); /* with source locations */
    if (s->opt.on_fatal) s->opt.on_fatal(s->opt.on_fatal_ctx, st, message);
}

static void on_batch(void *ctx, int64_t n_requests, int64_t n_tokens, double forward_seconds,
                     const epmoe_stage_times *times, const int64_t *expert_counts,
                     int64_t layer_begin, int64_t layer_end) {
    epmoe_service *s = ctx;
    epmoe_metrics_observe_batch(s->metrics, n_requests, n_tokens, forward_seconds, times,
                                expert_counts, layer_begin, layer_end);
}

/* ---- methods -------------------------------------------------------------------------------*/

static void handle_forward(epmoe_service *s, epmoe_rpc_call *call) {
    if (atomic_load(&s->failed)) {
        reply(s, call, EPMOE_RPC_UNAVAILABLE, s->failed_message, NULL, 0);
        return;
    }
    if (atomic_load(&s->draining)) {
        reply(s, call, EPMOE_RPC_UNAVAILABLE, "the server is draining (SIGTERM): no new requests",
              NULL, 0);
        return;
    }
    size_t nbytes;
    const uint8_t *bytes = epmoe_rpc_call_request(call, &nbytes);
    epmoe_serve_request *r = NULL;
    char message[512];
    int code = epmoe_wire_decode_forward(bytes, nbytes, &s->limits, &r, message, sizeof message);
    if (code != EPMOE_RPC_OK) {
        reply(s, call, code, message, NULL, 0);
        return;
    }
    r->call = call;
    r->enqueue_time = epmoe_seconds_now();
    r->deadline = epmoe_rpc_call_deadline(call);
    if (r->enqueue_time >= r->deadline) {
        epmoe_serve_request_free(r);
        reply(s, call, EPMOE_RPC_DEADLINE_EXCEEDED,
              "deadline passed before the request was queued; not computed", NULL, 0);
        return;
    }
    atomic_fetch_add(&s->inflight, 1);
    epmoe_status st = EPMOE_ERR_UNSUPPORTED;
    pthread_mutex_lock(&s->front_mu);
    if (!s->batcher_closed) st = epmoe_batcher_push(s->batcher, r);
    pthread_mutex_unlock(&s->front_mu);
    if (st == EPMOE_OK) return;
    atomic_fetch_sub(&s->inflight, 1);
    epmoe_serve_request_free(r);
    if (st == EPMOE_ERR_OOM)
        reply(s, call, EPMOE_RPC_RESOURCE_EXHAUSTED, epmoe_last_error(), NULL, 0);
    else if (st == EPMOE_ERR_PEER_LOST)
        reply(s, call, EPMOE_RPC_UNAVAILABLE, epmoe_last_error(), NULL, 0);
    else if (st == EPMOE_ERR_UNSUPPORTED)
        reply(s, call, EPMOE_RPC_UNAVAILABLE, "the server is draining (SIGTERM): no new requests",
              NULL, 0);
    else
        reply(s, call, EPMOE_RPC_INVALID_ARGUMENT, epmoe_last_error(), NULL, 0);
}

static void handle_info(epmoe_service *s, epmoe_rpc_call *call) {
    size_t nbytes;
    const uint8_t *bytes = epmoe_rpc_call_request(call, &nbytes);
    Epmoe__V1__InfoRequest *req = epmoe__v1__info_request__unpack(NULL, nbytes, bytes);
    if (!req) {
        reply(s, call, EPMOE_RPC_INVALID_ARGUMENT,
              "request: not a valid epmoe.v1.InfoRequest message", NULL, 0);
        return;
    }
    epmoe__v1__info_request__free_unpacked(req, NULL);
    const epmoe_driver_info *i = &s->opt.info;
    Epmoe__V1__InfoResponse r = EPMOE__V1__INFO_RESPONSE__INIT;
    r.preset = (char *)i->preset;
    r.n_ranks = i->n_ranks;
    r.n_layers = i->n_layers;
    r.n_hash_layers = i->n_hash_layers;
    r.hidden_size = i->hidden_size;
    r.n_routed_experts = i->n_routed_experts;
    r.top_k = i->top_k;
    r.experts_per_rank_min = i->experts_per_rank_min;
    r.experts_per_rank_max = i->experts_per_rank_max;
    r.vocab_size = s->opt.vocab_size;
    r.max_request_tokens = s->max_request_tokens;
    r.max_batch_tokens = s->max_batch_tokens;
    r.max_message_bytes = s->opt.cfg.max_message_bytes;
    r.weight_bytes_per_rank = i->weight_bytes_per_rank;
    r.buffer_bytes_per_rank = i->buffer_bytes_per_rank;
    r.version = (char *)EPMOE_VERSION;
    r.backend = (char *)i->backend.name;
    r.device_name = (char *)i->backend.device_name;
    r.transport = (char *)i->backend.transport;
    r.decode_tokens = i->backend.decode_tokens;
    r.layer_begin = i->layer_begin;
    r.layer_end = i->layer_end;
    uint8_t buf[2048];
    size_t len = epmoe__v1__info_response__get_packed_size(&r);
    if (len > sizeof buf) {
        reply(s, call, EPMOE_RPC_INTERNAL, "info too large", NULL, 0);
        return;
    }
    epmoe__v1__info_response__pack(&r, buf);
    reply(s, call, EPMOE_RPC_OK, NULL, buf, len);
}

static void handle_health(epmoe_service *s, epmoe_rpc_call *call) {
    const char *method = epmoe_rpc_call_method(call);
    if (strcmp(method, "/grpc.health.v1.Health/Check") != 0) {
        reply(s, call, EPMOE_RPC_UNIMPLEMENTED,
              "only grpc.health.v1.Health/Check is implemented", NULL, 0);
        return;
    }
    size_t nbytes;
    const uint8_t *bytes = epmoe_rpc_call_request(call, &nbytes);
    Grpc__Health__V1__HealthCheckRequest *req =
        grpc__health__v1__health_check_request__unpack(NULL, nbytes, bytes);
    if (!req) {
        reply(s, call, EPMOE_RPC_INVALID_ARGUMENT,
              "request: not a valid grpc.health.v1.HealthCheckRequest message", NULL, 0);
        return;
    }
    int known = req->service[0] == '\0' || strcmp(req->service, "epmoe.v1.Moe") == 0;
    char service[160];
    snprintf(service, sizeof service, "%s", req->service);
    grpc__health__v1__health_check_request__free_unpacked(req, NULL);
    if (!known) {
        char msg[256];
        snprintf(msg, sizeof msg, "service: unknown service '%s' (known: '' and 'epmoe.v1.Moe')",
                 service);
        reply(s, call, EPMOE_RPC_NOT_FOUND, msg, NULL, 0);
        return;
    }
    Grpc__Health__V1__HealthCheckResponse r = GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__INIT;
    r.status = atomic_load(&s->draining) || atomic_load(&s->failed)
                   ? GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__NOT_SERVING
                   : GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING;
    uint8_t buf[16];
    size_t len = grpc__health__v1__health_check_response__pack(&r, buf);
    reply(s, call, EPMOE_RPC_OK, NULL, buf, len);
}

static void on_call(void *user, epmoe_rpc_call *call) {
    epmoe_service *s = user;
    const char *method = epmoe_rpc_call_method(call);
    switch (method_of(method)) {
    case EPMOE_METHOD_FORWARD: handle_forward(s, call); break;
    case EPMOE_METHOD_INFO: handle_info(s, call); break;
    case EPMOE_METHOD_HEALTH: handle_health(s, call); break;
    default: {
        char msg[256];
        snprintf(msg, sizeof msg, "unknown method '%s'", method);
        reply(s, call, EPMOE_RPC_UNIMPLEMENTED, msg, NULL, 0);
    }
    }
}

static char *render_metrics(void *ctx, size_t *len) {
    epmoe_service *s = ctx;
    epmoe_metrics_gauges g;
    memset(&g, 0, sizeof g);
    pthread_mutex_lock(&s->front_mu);
    if (!s->batcher_closed) g.queue_depth = epmoe_batcher_depth(s->batcher);
    pthread_mutex_unlock(&s->front_mu);
    g.inflight_requests = atomic_load(&s->inflight);
    g.draining = atomic_load(&s->draining);
    g.failed = atomic_load(&s->failed);
    return epmoe_metrics_render(s->metrics, &g, len);
}

/* ---- lifecycle -----------------------------------------------------------------------------*/

static void service_free(epmoe_service *s) {
    if (s->rpc) epmoe_rpc_server_stop(s->rpc, 0);
    if (s->batcher) epmoe_batcher_stop(s->batcher);
    if (s->http) epmoe_metrics_http_stop(s->http);
    epmoe_metrics_free(s->metrics);
    pthread_mutex_destroy(&s->front_mu);
    free(s);
}

epmoe_status epmoe_service_start(const epmoe_service_options *opt, epmoe_service **out) {
    *out = NULL;
    EPMOE_REQUIRE(opt->forward != NULL, EPMOE_ERR_INVALID_ARG, "service: no forward function");
    const epmoe_driver_info *info = &opt->info;
    EPMOE_REQUIRE(info->hidden_size > 0 && info->n_layers > 0 && info->n_routed_experts > 0 &&
                      info->max_tokens_per_forward > 0,
                  EPMOE_ERR_INVALID_ARG, "service: engine info incomplete");
    epmoe_service *s = calloc(1, sizeof *s);
    EPMOE_REQUIRE(s != NULL, EPMOE_ERR_OOM, "service: out of memory");
    s->opt = *opt;
    pthread_mutex_init(&s->front_mu, NULL);
    const epmoe_serve_config *c = &opt->cfg;
    s->max_batch_tokens = c->max_batch_tokens < info->max_tokens_per_forward
                              ? c->max_batch_tokens
                              : info->max_tokens_per_forward;
    s->max_request_tokens = c->max_request_tokens == 0 || c->max_request_tokens > s->max_batch_tokens
                                ? s->max_batch_tokens
                                : c->max_request_tokens;
    s->limits = (epmoe_wire_limits){info->hidden_size, info->n_layers, info->n_hash_layers,
                                    opt->vocab_size, s->max_request_tokens, info->layer_begin,
                                    info->layer_end};

    epmoe_status st;
    EPMOE_TRY_GOTO(st, epmoe_metrics_create(info->n_layers, info->n_routed_experts, &s->metrics),
                   fail);
    if (c->metrics_listen[0])
        EPMOE_TRY_GOTO(st, epmoe_metrics_http_start(c->metrics_listen, render_metrics, s, &s->http,
                                                    &s->metrics_port),
                       fail);
    epmoe_batcher_options bo = {
        .hidden_size = info->hidden_size,
        .n_layers = info->n_layers,
        .n_routed_experts = info->n_routed_experts,
        .max_batch_tokens = s->max_batch_tokens,
        .max_queue_delay = (double)c->max_queue_delay_us * 1e-6,
        .wait_when_idle = (int)c->wait_when_idle,
        .max_queue = c->max_queue,
        .forward = opt->forward,
        .forward_ctx = opt->forward_ctx,
        .done = on_done,
        .cancelled = on_cancelled,
        .observe = on_batch,
        .fatal = on_fatal,
        .ctx = s,
    };
    EPMOE_TRY_GOTO(st, epmoe_batcher_start(&bo, &s->batcher), fail);
    int64_t memory = c->rpc_memory_bytes;
    if (memory == 0) {
        memory = 4 * c->max_message_bytes;
        if (memory < (64 << 20)) memory = 64 << 20;
    }
    if (memory < c->max_message_bytes) memory = c->max_message_bytes;
    epmoe_rpc_server_options ro = {c->listen, c->max_message_bytes, memory, (int)c->rpc_threads,
                                   on_call, on_finished, s};
    EPMOE_TRY_GOTO(st, epmoe_rpc_server_start(&ro, &s->rpc, &s->port), fail);
    *out = s;
    return EPMOE_OK;
fail:
    service_free(s);
    return st;
}

int epmoe_service_port(const epmoe_service *s) { return s->port; }
int epmoe_service_metrics_port(const epmoe_service *s) { return s->metrics_port; }
int64_t epmoe_service_max_batch_tokens(const epmoe_service *s) { return s->max_batch_tokens; }
int64_t epmoe_service_max_request_tokens(const epmoe_service *s) { return s->max_request_tokens; }

int64_t epmoe_service_queue_depth(epmoe_service *s) {
    pthread_mutex_lock(&s->front_mu);
    int64_t d = s->batcher_closed ? 0 : epmoe_batcher_depth(s->batcher);
    pthread_mutex_unlock(&s->front_mu);
    return d;
}

int epmoe_service_failed(epmoe_service *s) { return atomic_load(&s->failed); }

void epmoe_service_drain(epmoe_service *s) {
    if (!s) return;
    atomic_store(&s->draining, 1);
    if (s->opt.cfg.drain_linger_ms > 0) {
        struct timespec ts = {(time_t)(s->opt.cfg.drain_linger_ms / 1000),
                              (long)(s->opt.cfg.drain_linger_ms % 1000) * 1000000L};
        while (nanosleep(&ts, &ts) != 0) {
        }
    }
    /* Everything already queued is computed and answered before the batcher returns. */
    pthread_mutex_lock(&s->front_mu);
    s->batcher_closed = 1;
    pthread_mutex_unlock(&s->front_mu);
    epmoe_batcher_stop(s->batcher);
    s->batcher = NULL;
    epmoe_rpc_server_stop(s->rpc, (double)s->opt.cfg.drain_timeout_ms * 1e-3);
    s->rpc = NULL;
    service_free(s);
}
