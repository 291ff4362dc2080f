/* What users see of an error message: library errors carry "file.c:123: " source locations
 * (common/status.c); those belong in the server's log and a developer's terminal, not in
 * replies or a program's output. */
#ifndef EPMOE_COMMON_USER_MESSAGE_H
#define EPMOE_COMMON_USER_MESSAGE_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Copies message to out (cap bytes, always NUL-terminated) without the source locations. */
void epmoe_user_message(char *out, size_t cap, const char *message);

/* epmoe_last_error() as a program shows it to its user: without the source locations, unless
 * the environment sets EPMOE_ERROR_LOCATIONS=1 (for developers). Valid until the next call on
 * the same thread. */
const char *epmoe_last_error_for_user(void);

#ifdef __cplusplus
}
#endif
#endif
