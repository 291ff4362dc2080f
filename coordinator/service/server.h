/* The service on rank 0: gRPC methods (epmoe.v1.Moe/Forward and Info, grpc.health.v1.Health/
 * Check) over the adapter, the batcher in front of the engine, metrics, and the drain.
 *
 * The engine is reached only through options.forward (epmoe_driver_forward on the root in
 * epmoe-serve), called only from the batcher thread.
 */
#ifndef EPMOE_SERVICE_SERVER_H
#define EPMOE_SERVICE_SERVER_H

#include <stdint.h>

#include "common/status.h"
#include "coordinator/engine/driver.h"
#include "coordinator/service/batcher.h"
#include "coordinator/service/serve_config.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    epmoe_serve_config cfg;
    epmoe_driver_info info; /* what Info reports and requests are checked against */
    int64_t vocab_size;
    epmoe_forward_fn forward;
    void *forward_ctx;
} epmoe_service_options;

typedef struct epmoe_service epmoe_service;

/* Starts metrics (if configured), the batcher and the gRPC server; returns once listening. */
epmoe_status epmoe_service_start(const epmoe_service_options *opt, epmoe_service **out);
int epmoe_service_port(const epmoe_service *s);
int epmoe_service_metrics_port(const epmoe_service *s); /* 0 when off */
int64_t epmoe_service_max_batch_tokens(const epmoe_service *s);
int64_t epmoe_service_max_request_tokens(const epmoe_service *s);
/* Requests waiting for a batch. */
int64_t epmoe_service_queue_depth(epmoe_service *s);

/* Graceful stop: health turns NOT_SERVING and new Forward calls get UNAVAILABLE; after
 * drain_linger_ms the queued requests are computed and answered, the port closes (calls
 * still unflushed after drain_timeout_ms are cancelled), metrics stop. Frees s. The engine is
 * not touched afterwards: the caller may then shut it down. */
void epmoe_service_drain(epmoe_service *s);

#ifdef __cplusplus
}
#endif
#endif
