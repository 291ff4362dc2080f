/* Shared by the fuzz targets: the fuzzer's bytes as a file the loaders can open (they mmap a
 * path), without touching the disk: an anonymous memory file, reopened per input. */
#ifndef EPMOE_FUZZ_UTIL_H
#define EPMOE_FUZZ_UTIL_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/mman.h>
#include <unistd.h>

/* Writes data into a fresh memfd; path receives "/proc/self/fd/N". Returns the fd (close it
 * after use), or -1. */
static inline int fuzz_memfile(const uint8_t *data, size_t size, char *path, size_t cap) {
    int fd = memfd_create("epmoe-fuzz", MFD_CLOEXEC);
    if (fd < 0) return -1;
    size_t done = 0;
    while (done < size) {
        ssize_t w = write(fd, data + done, size - done);
        if (w <= 0) {
            close(fd);
            return -1;
        }
        done += (size_t)w;
    }
    snprintf(path, cap, "/proc/self/fd/%d", fd);
    return fd;
}

#endif
