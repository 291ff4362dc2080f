#include "common/user_message.h"

#include <stdlib.h>
#include <string.h>

#include "common/status.h"

/* Is p[0..] "name.c:123: " (a source location from epmoe_set_error)? Returns its length. */
static size_t location_at(const char *p) {
    size_t i = 0;
    while ((p[i] >= 'a' && p[i] <= 'z') || (p[i] >= 'A' && p[i] <= 'Z') ||
           (p[i] >= '0' && p[i] <= '9') || p[i] == '_' || p[i] == '.' || p[i] == '/' ||
           p[i] == '-' || p[i] == '+')
        i++;
    static const char *const ext[] = {".c", ".cu", ".h", ".cc", ".cpp"};
    int source = 0;
    for (size_t e = 0; e < sizeof ext / sizeof ext[0]; e++) {
        size_t n = strlen(ext[e]);
        if (i > n && strncmp(p + i - n, ext[e], n) == 0) source = 1;
    }
    if (!source || p[i] != ':' || !(p[i + 1] >= '0' && p[i + 1] <= '9')) return 0;
    i++;
    while (p[i] >= '0' && p[i] <= '9') i++;
    if (p[i] != ':' || p[i + 1] != ' ') return 0;
    return i + 2;
}

void epmoe_user_message(char *out, size_t cap, const char *message) {
    size_t o = 0;
    if (cap == 0) return;
    for (size_t i = 0; message[i] && o + 1 < cap;) {
        int word_start = i == 0 || message[i - 1] == ' ' || message[i - 1] == '(' ||
                         message[i - 1] == '"' || message[i - 1] == '\'';
        size_t skip = word_start ? location_at(message + i) : 0;
        if (skip) {
            i += skip;
            continue;
        }
        out[o++] = message[i++];
    }
    out[o] = '\0';
}

const char *epmoe_last_error_for_user(void) {
    static _Thread_local char plain[1024];
    const char *raw = epmoe_last_error();
    const char *keep = getenv("EPMOE_ERROR_LOCATIONS");
    if (keep && strcmp(keep, "1") == 0) return raw;
    epmoe_user_message(plain, sizeof plain, raw);
    return plain;
}
