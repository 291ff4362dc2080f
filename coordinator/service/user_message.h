/* What users see of an error message: library errors carry "file.c:123: " source locations
 * (common/status.c); those belong in the server's log, not in replies or a CLI's output. */
#ifndef EPMOE_SERVICE_USER_MESSAGE_H
#define EPMOE_SERVICE_USER_MESSAGE_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Copies message to out (cap bytes, always NUL-terminated) without the source locations. */
void epmoe_user_message(char *out, size_t cap, const char *message);

#ifdef __cplusplus
}
#endif
#endif
