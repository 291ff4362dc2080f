/* Output paths, checked before any work and opened without surprises.
 *
 * The programs write a result to a temporary file next to its path and rename it over the path
 * (common/safetensors.c). rename() replaces whatever the last component names: `--output
 * /dev/null` as root turned the device node into a regular file, a symlink was replaced by a
 * file. So a program checks its output path first (before loading weights or computing) and
 * refuses anything but a regular file or a new name in a writable directory (DESIGN §9).
 */
#ifndef EPMOE_PATHS_H
#define EPMOE_PATHS_H

#include <stdint.h>
#include <stdio.h>

#include "common/status.h"

#ifdef __cplusplus
extern "C" {
#endif

/* The path of a file the program will (re)write. Refused (EPMOE_ERR_INVALID_ARG, the message
 * names the path): empty, ending in '/', an existing directory, symlink, device node, FIFO or
 * socket. Refused (EPMOE_ERR_IO): its directory missing, not a directory or not writable, or,
 * when bytes > 0, fewer than `bytes` free on that directory's file system (statvfs). */
epmoe_status epmoe_check_output_file(const char *path, uint64_t bytes);

/* A directory the program will write files into (created if missing, with its parent
 * existing). Refused: empty, an existing non-directory (a symlink to a directory is fine:
 * writing into it replaces nothing), not writable, or its parent missing. */
epmoe_status epmoe_check_output_dir(const char *path);

/* Opens `path` for writing ("wb"), creating it, only if it is or becomes a regular file: a
 * symlink is not followed, a device node, FIFO or socket is refused (the temporary file of a
 * write-and-rename must not be a symlink planted to point somewhere else). */
epmoe_status epmoe_open_regular_for_write(const char *path, FILE **out);
/* The same as a descriptor (write-only, truncated, blocking), for writers that size a file and
 * pwrite it from several threads (common/checkpoint_gen.c); *fd_out is -1 on failure. */
epmoe_status epmoe_open_regular_fd_for_write(const char *path, int *fd_out);

#ifdef __cplusplus
}
#endif
#endif
