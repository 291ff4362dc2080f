/* Service metrics in the Prometheus text exposition format (version 0.0.4), and the tiny HTTP
 * server that exposes them at GET /metrics on their own port.
 *
 *   epmoe_requests_total{method,code}          counter
 *   epmoe_request_seconds{method}              histogram, receipt to reply
 *   epmoe_stage_seconds{stage}                 histogram: queue (per request); route, dispatch,
 *                                              experts, combine, shared, forward (per batch)
 *   epmoe_batch_tokens, epmoe_batch_requests   histograms
 *   epmoe_expert_tokens_total{layer,expert}    counter: tokens routed to each expert
 *   epmoe_tokens_total                         counter
 *   epmoe_queue_depth, epmoe_inflight_requests, epmoe_draining   gauges (from the caller)
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
} epmoe_metrics_gauges;

epmoe_status epmoe_metrics_create(int64_t n_layers, int64_t n_routed_experts,
                                  epmoe_metrics **out);
void epmoe_metrics_free(epmoe_metrics *m);

/* One answered call (code: a gRPC status code). */
void epmoe_metrics_count_request(epmoe_metrics *m, epmoe_method method, int code,
                                 double latency_seconds);
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

/* listen: "HOST:PORT" (port 0 picks one; *bound_port receives it). Serves GET /metrics from a
 * thread of its own; other paths get 404. */
epmoe_status epmoe_metrics_http_start(const char *listen, epmoe_metrics_render_fn render,
                                      void *ctx, epmoe_metrics_http **out, int *bound_port);
void epmoe_metrics_http_stop(epmoe_metrics_http *h);

#ifdef __cplusplus
}
#endif
#endif
