#include "common/status.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#define EPMOE_ERROR_CAP 1024

static _Thread_local char last_error[EPMOE_ERROR_CAP];

const char *epmoe_status_name(epmoe_status s) {
    switch (s) {
    case EPMOE_OK: return "OK";
    case EPMOE_ERR_INVALID_ARG: return "INVALID_ARG";
    case EPMOE_ERR_IO: return "IO";
    case EPMOE_ERR_FORMAT: return "FORMAT";
    case EPMOE_ERR_NOT_FOUND: return "NOT_FOUND";
    case EPMOE_ERR_OOM: return "OOM";
    case EPMOE_ERR_RANGE: return "RANGE";
    case EPMOE_ERR_NUMERIC: return "NUMERIC";
    case EPMOE_ERR_MPI: return "MPI";
    case EPMOE_ERR_CUDA: return "CUDA";
    case EPMOE_ERR_NCCL: return "NCCL";
    case EPMOE_ERR_UNSUPPORTED: return "UNSUPPORTED";
    case EPMOE_ERR_INTERNAL: return "INTERNAL";
    case EPMOE_ERR_PEER_LOST: return "PEER_LOST";
    }
    return "UNKNOWN";
}

epmoe_status epmoe_set_error(epmoe_status code, const char *file, int line, const char *fmt, ...) {
    const char *base = strrchr(file, '/');
    base = base ? base + 1 : file;
    int n = snprintf(last_error, sizeof last_error, "%s:%d: ", base, line);
    if (n < 0 || n >= (int)sizeof last_error) n = 0;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(last_error + n, sizeof last_error - (size_t)n, fmt, ap);
    va_end(ap);
    return code;
}

epmoe_status epmoe_add_context(epmoe_status code, const char *fmt, ...) {
    char prefix[EPMOE_ERROR_CAP];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(prefix, sizeof prefix, fmt, ap);
    va_end(ap);
    /* Room for both parts; the result is cut back to the buffer size on the copy. */
    char joined[2 * EPMOE_ERROR_CAP + 2];
    snprintf(joined, sizeof joined, "%s: %s", prefix, last_error);
    joined[sizeof last_error - 1] = '\0';
    memcpy(last_error, joined, sizeof last_error);
    return code;
}

epmoe_status epmoe_set_error_text(epmoe_status code, const char *text) {
    snprintf(last_error, sizeof last_error, "%s", text);
    return code;
}

const char *epmoe_last_error(void) { return last_error[0] ? last_error : "(no error message)"; }

void epmoe_clear_error(void) { last_error[0] = '\0'; }
