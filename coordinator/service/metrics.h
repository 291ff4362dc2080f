/* Service metrics in the Prometheus text exposition format (version 0.0.4), and the tiny HTTP
 * server that exposes them at GET /metrics on their own port.
 *
 *   epmoe_requests_total{method,code}          counter: calls ended, by what the client got (a
 *                                              reply that could not be delivered counts as
 *                                              DEADLINE_EXCEEDED or CANCELLED)
 *   epmoe_replies_undelivered_total{method,code}  counter: replies (by the code the server
 *                                              sent) that never reached the client
 *   epmoe_request_seconds{method}              histogram, receipt to reply
 *   epmoe_stage_seconds{stage}                 histogram: queue (per request); route, dispatch,
 *                                              experts, combine, shared, forward (per batch)
 *   epmoe_batch_tokens, epmoe_batch_requests   histograms
 *   epmoe_expert_tokens_total{layer,expert}    counter: tokens routed to each expert
 *   epmoe_tokens_total                         counter: rows of OK replies delivered
 *   epmoe_queue_depth, epmoe_inflight_requests, epmoe_draining, epmoe_engine_failed   gauges
 *                                              (from the caller)
 */
#ifndef EPMOE_SERVICE_METRICS_H
#define EPMOE_SERVICE_METRICS_H

#include <stddef.h>
#include <stdint.h>

#include "common/status.h"
#include "coordinator/engine/driver.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
    EPMOE_METHOD_FORWARD = 0,
    EPMOE_METHOD_INFO,
    EPMOE_METHOD_HEALTH,
    EPMOE_METHOD_OTHER,
    EPMOE_METHOD_COUNT
} epmoe_method;

typedef struct epmoe_metrics epmoe_metrics;

typedef struct {
    int64_t queue_depth;
    int64_t inflight_requests;
    int draining;
    int failed;
} epmoe_metrics_gauges;

epmoe_status epmoe_metrics_create(int64_t n_layers, int64_t n_routed_experts,
                                  epmoe_metrics **out);
void epmoe_metrics_free(epmoe_metrics *m);

/* One answered call (code: a gRPC status code). */
void epmoe_metrics_count_request(epmoe_metrics *m, epmoe_method method, int code,
                                 double latency_seconds);
/* A reply (code: what the server sent) that never reached its client. */
void epmoe_metrics_count_undelivered(epmoe_metrics *m, epmoe_method method, int code);
/* Rows of an OK reply that reached its client. */
void epmoe_metrics_count_tokens(epmoe_metrics *m, int64_t n_tokens);
void epmoe_metrics_observe_queue(epmoe_metrics *m, double seconds);
/* One engine forward: its stage times and tokens per expert for layers [begin, end). */
void epmoe_metrics_observe_batch(epmoe_metrics *m, int64_t n_requests, int64_t n_tokens,
                                 double forward_seconds, const epmoe_stage_times *times,
                                 const int64_t *expert_counts, int64_t layer_begin,
                                 int64_t layer_end);

/* The exposition text (malloc'd, NUL-terminated); NULL when out of memory. */
char *epmoe_metrics_render(epmoe_metrics *m, const epmoe_metrics_gauges *gauges, size_t *len);

/* ---- HTTP exposition ---------------------------------------------------------------------- */

typedef char *(*epmoe_metrics_render_fn)(void *ctx, size_t *len);
typedef struct epmoe_metrics_http epmoe_metrics_http;

/* listen: "HOST:PORT" (port 0 picks one; *bound_port receives it). Serves GET /metrics; other
 * paths get 404. Each connection is served on a thread of its own with a time limit for the
 * request and the reply, so a slow client never holds up a scrape (at most
 * EPMOE_METRICS_MAX_CONNECTIONS at once; more are closed at once). */
#define EPMOE_METRICS_MAX_CONNECTIONS 16
#define EPMOE_METRICS_IO_TIMEOUT_S 5
epmoe_status epmoe_metrics_http_start(const char *listen, epmoe_metrics_render_fn render,
                                      void *ctx, epmoe_metrics_http **out, int *bound_port);
void epmoe_metrics_http_stop(epmoe_metrics_http *h);

#ifdef __cplusplus
}
#endif
#endif
