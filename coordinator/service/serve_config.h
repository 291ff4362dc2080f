/* The service's own settings (epmoe-serve), declared once in a table in the style of
 * common/config.h: name, type, bounds, default, help. The model and engine settings stay in
 * the shared table; --print-config prints both. */
#ifndef EPMOE_SERVICE_SERVE_CONFIG_H
#define EPMOE_SERVICE_SERVE_CONFIG_H

#include <stdint.h>
#include <stdio.h>

#include "common/status.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    char listen[256];          /* gRPC address */
    char metrics_listen[256];  /* Prometheus HTTP address; "" = off */
    char ready_file[1024];     /* written once serving: "grpc_port metrics_port pid", pids */
    int64_t max_batch_tokens;
    int64_t max_request_tokens;
    int64_t max_queue_delay_us;
    int64_t wait_when_idle;    /* 1: wait for batch mates even when idle */
    int64_t max_queue;
    int64_t max_message_bytes;
    int64_t rpc_memory_bytes;  /* gRPC buffers at most; 0: 4 x max_message_bytes, >= 64 MiB */
    int64_t rpc_threads;
    int64_t drain_linger_ms;
    int64_t drain_timeout_ms;
    int64_t log_level;         /* 0 quiet, 1 server-side failures, 2 every refused call */
} epmoe_serve_config;

void epmoe_serve_config_defaults(epmoe_serve_config *c);
epmoe_status epmoe_serve_config_set(epmoe_serve_config *c, const char *name, const char *value);
/* Consumes every `--name value` / `--name=value` naming a service setting (dashes or
 * underscores), leaving the other arguments in argv. */
epmoe_status epmoe_serve_config_parse_args(epmoe_serve_config *c, int *argc, char **argv);
void epmoe_serve_config_print(const epmoe_serve_config *c, FILE *out);

#ifdef __cplusplus
}
#endif
#endif
