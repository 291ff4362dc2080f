#include "coordinator/service/serve_config.h"

#include <errno.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

typedef enum { SETTING_INT, SETTING_STRING } setting_type;

typedef struct {
    const char *name;
    setting_type type;
    size_t offset;
    size_t size;       /* STRING capacity */
    double min, max;   /* INT bounds, inclusive */
    const char *def;
    const char *help;
} setting;

#define OFF(f) offsetof(epmoe_serve_config, f)
#define STR(f) SETTING_STRING, OFF(f), sizeof(((epmoe_serve_config *)0)->f), 0, 0
#define INT(f, lo, hi) SETTING_INT, OFF(f), 0, lo, hi

/* The one declaration of every service setting. */
static const setting table[] = {
    {"listen", STR(listen), "127.0.0.1:50051",
     "gRPC address HOST:PORT (loopback by default; port 0 picks a free one)"},
    {"metrics_listen", STR(metrics_listen), "",
     "Prometheus GET /metrics address HOST:PORT (empty: no metrics endpoint)"},
    {"ready_file", STR(ready_file), "",
     "written once serving: '<grpc port> <metrics port> <pid of rank 0>'"},
    {"max_batch_tokens", INT(max_batch_tokens, 1, 1 << 24), "1024",
     "token budget of one engine forward (capped at the engine's max tokens per forward)"},
    {"max_request_tokens", INT(max_request_tokens, 0, 1 << 24), "0",
     "largest request in tokens (0: max_batch_tokens)"},
    {"max_queue_delay_us", INT(max_queue_delay_us, 0, 10000000), "2000",
     "how long the oldest queued request waits for batch mates"},
    {"max_queue", INT(max_queue, 1, 1 << 20), "256",
     "requests waiting at most; more get RESOURCE_EXHAUSTED"},
    {"max_message_bytes", INT(max_message_bytes, 1024, 2147483647), "67108864",
     "largest gRPC message received or sent"},
    {"rpc_threads", INT(rpc_threads, 1, 64), "2", "gRPC completion-queue threads"},
    {"drain_linger_ms", INT(drain_linger_ms, 0, 600000), "200",
     "after SIGTERM: how long health says NOT_SERVING and new calls get UNAVAILABLE before "
     "the queue is finished and the port closed"},
    {"drain_timeout_ms", INT(drain_timeout_ms, 0, 3600000), "30000",
     "after the queue is finished: how long answered calls get to flush before they are cut"},
};

#undef OFF
#undef STR
#undef INT

static const setting *find_setting(const char *name) {
    for (size_t i = 0; i < sizeof table / sizeof table[0]; i++)
        if (strcmp(table[i].name, name) == 0) return &table[i];
    return NULL;
}

static epmoe_status set_one(epmoe_serve_config *c, const setting *s, const char *value) {
    char *field = (char *)c + s->offset;
    if (s->type == SETTING_STRING) {
        size_t n = strlen(value);
        EPMOE_REQUIRE(n < s->size, EPMOE_ERR_INVALID_ARG,
                      "setting %s: value longer than %zu characters", s->name, s->size - 1);
        memcpy(field, value, n + 1);
        return EPMOE_OK;
    }
    char *end = NULL;
    errno = 0;
    long long v = strtoll(value, &end, 10);
    EPMOE_REQUIRE(errno == 0 && end != value && *end == '\0', EPMOE_ERR_INVALID_ARG,
                  "setting %s: '%s' is not an integer", s->name, value);
    EPMOE_REQUIRE((double)v >= s->min && (double)v <= s->max, EPMOE_ERR_INVALID_ARG,
                  "setting %s: %lld outside [%.0f, %.0f]", s->name, v, s->min, s->max);
    *(int64_t *)field = v;
    return EPMOE_OK;
}

void epmoe_serve_config_defaults(epmoe_serve_config *c) {
    memset(c, 0, sizeof *c);
    for (size_t i = 0; i < sizeof table / sizeof table[0]; i++) {
        epmoe_status st = set_one(c, &table[i], table[i].def);
        (void)st; /* defaults are checked by the service unit test */
    }
}

epmoe_status epmoe_serve_config_set(epmoe_serve_config *c, const char *name, const char *value) {
    const setting *s = find_setting(name);
    EPMOE_REQUIRE(s != NULL, EPMOE_ERR_NOT_FOUND, "unknown service setting '%s'", name);
    return set_one(c, s, value);
}

epmoe_status epmoe_serve_config_parse_args(epmoe_serve_config *c, int *argc, char **argv) {
    int out = 1;
    for (int i = 1; i < *argc; i++) {
        const char *a = argv[i];
        if (strncmp(a, "--", 2) == 0) {
            char name[64];
            const char *eq = strchr(a + 2, '=');
            size_t n = eq ? (size_t)(eq - (a + 2)) : strlen(a + 2);
            if (n < sizeof name) {
                memcpy(name, a + 2, n);
                name[n] = '\0';
                for (char *p = name; *p; p++)
                    if (*p == '-') *p = '_';
                const setting *s = find_setting(name);
                if (s) {
                    const char *value = eq ? eq + 1 : NULL;
                    if (!value) {
                        EPMOE_REQUIRE(i + 1 < *argc, EPMOE_ERR_INVALID_ARG, "--%s needs a value",
                                      name);
                        value = argv[++i];
                    }
                    EPMOE_TRY(set_one(c, s, value));
                    continue;
                }
            }
        }
        argv[out++] = argv[i];
    }
    *argc = out;
    argv[out] = NULL;
    return EPMOE_OK;
}

void epmoe_serve_config_print(const epmoe_serve_config *c, FILE *out) {
    fprintf(out, "# service settings\n");
    for (size_t i = 0; i < sizeof table / sizeof table[0]; i++) {
        const setting *s = &table[i];
        const char *field = (const char *)c + s->offset;
        char value[300];
        char bounds[64] = "";
        if (s->type == SETTING_STRING) {
            snprintf(value, sizeof value, "%s", field);
        } else {
            snprintf(value, sizeof value, "%lld", (long long)*(const int64_t *)field);
            snprintf(bounds, sizeof bounds, " [%.0f..%.0f]", s->min, s->max);
        }
        fprintf(out, "%-22s = %-14s # %s%s (default '%s')\n", s->name, value, s->help, bounds,
                s->def);
    }
}
