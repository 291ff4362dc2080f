#include "coordinator/service/serve_config.h"

#include <stddef.h>

#include "common/config.h"

#define OFF(f) offsetof(epmoe_serve_config, f)
#define STR(f) EPMOE_CFG_STRING, EPMOE_CFG_RUNTIME, OFF(f), 0, sizeof(((epmoe_serve_config *)0)->f) - 1
#define INT(f, lo, hi) EPMOE_CFG_INT, EPMOE_CFG_RUNTIME, OFF(f), lo, hi

/* The one declaration of every service setting; parsed, bounded and printed by the same
 * machinery as the model and engine settings (common/config.h). */
static const epmoe_cfg_entry table[] = {
    {"listen", STR(listen), "127.0.0.1:50051", NULL,
     "gRPC address HOST:PORT (loopback by default; port 0 picks a free one)"},
    {"metrics_listen", STR(metrics_listen), "", NULL,
     "Prometheus GET /metrics address HOST:PORT (empty: no metrics endpoint)"},
    {"ready_file", STR(ready_file), "", NULL,
     "written once serving: '<grpc port> <metrics port> <pid of rank 0>', then a line with "
     "the pid of every rank in rank order"},
    {"max_batch_tokens", INT(max_batch_tokens, 1, 1 << 24), "1024", NULL,
     "token budget of one engine forward (capped at the engine's max tokens per forward)"},
    {"max_request_tokens", INT(max_request_tokens, 0, 1 << 24), "0", NULL,
     "largest request in tokens (0: max_batch_tokens)"},
    {"max_queue_delay_us", INT(max_queue_delay_us, 0, 10000000), "2000", NULL,
     "how long a batch waits for mates while the service is busy (one of the last four batches "
     "held several requests), from the later of its oldest request's arrival and the last "
     "answer; a request that finds the service idle runs at once"},
    {"wait_when_idle", INT(wait_when_idle, 0, 1), "0", NULL,
     "1: the service always counts as busy, so a request that finds it idle also waits "
     "max_queue_delay_us for batch mates (fuller batches from the first; a lone client pays "
     "the delay)"},
    {"max_queue", INT(max_queue, 1, 1 << 20), "256", NULL,
     "requests waiting at most; more get RESOURCE_EXHAUSTED"},
    {"max_message_bytes", INT(max_message_bytes, 1024, 2147483647), "67108864", NULL,
     "largest gRPC message received or sent"},
    {"rpc_memory_bytes", INT(rpc_memory_bytes, 0, 1099511627776.0), "0", NULL,
     "memory gRPC may buffer for calls being received (its resource quota; a call that would "
     "go beyond is cut): 0 = 4 x max_message_bytes, at least 64 MiB. gRPC enforces "
     "max_message_bytes only once a message is whole, so this is what bounds a client "
     "declaring a huge message"},
    {"rpc_threads", INT(rpc_threads, 1, 64), "2", NULL, "gRPC completion-queue threads"},
    {"drain_linger_ms", INT(drain_linger_ms, 0, 600000), "200", NULL,
     "after SIGTERM: how long health says NOT_SERVING and new calls get UNAVAILABLE before "
     "the queue is finished and the port closed"},
    {"drain_timeout_ms", INT(drain_timeout_ms, 0, 3600000), "30000", NULL,
     "after the queue is finished: how long answered calls get to flush before they are cut"},
    {"log_level", INT(log_level, 0, 2), "1", NULL,
     "server log (stderr): 0 quiet, 1 server-side failures, 2 also every refused call with its "
     "full message (source locations included; users never see those)"},
};

#undef OFF
#undef STR
#undef INT

#define TABLE_N ((int)(sizeof table / sizeof table[0]))

void epmoe_serve_config_defaults(epmoe_serve_config *c) {
    *c = (epmoe_serve_config){0};
    epmoe_cfg_table_defaults(c, table, TABLE_N);
}

epmoe_status epmoe_serve_config_set(epmoe_serve_config *c, const char *name, const char *value) {
    return epmoe_cfg_table_set(c, table, TABLE_N, name, value);
}

epmoe_status epmoe_serve_config_parse_args(epmoe_serve_config *c, int *argc, char **argv) {
    return epmoe_cfg_table_parse_args(c, table, TABLE_N, argc, argv);
}

void epmoe_serve_config_print(const epmoe_serve_config *c, FILE *out) {
    fprintf(out, "# service settings\n");
    epmoe_cfg_table_print(c, table, TABLE_N, -1, out);
}
