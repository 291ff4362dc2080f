#include "common/paths.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

/* What an existing non-regular file is, for messages. */
static const char *kind_of(mode_t mode) {
    if (S_ISDIR(mode)) return "a directory";
    if (S_ISLNK(mode)) return "a symbolic link";
    if (S_ISCHR(mode)) return "a character device";
    if (S_ISBLK(mode)) return "a block device";
    if (S_ISFIFO(mode)) return "a FIFO";
    if (S_ISSOCK(mode)) return "a socket";
    return "not a regular file";
}

/* The directory part of path ("." when there is none) into buf. */
static epmoe_status dir_of(const char *path, char *buf, size_t cap) {
    const char *slash = strrchr(path, '/');
    size_t n = slash ? (size_t)(slash - path) : 0;
    if (!slash) {
        snprintf(buf, cap, ".");
        return EPMOE_OK;
    }
    if (n == 0) n = 1; /* "/name": the root directory */
    EPMOE_REQUIRE(n < cap, EPMOE_ERR_INVALID_ARG, "%s: path too long", path);
    memcpy(buf, path, n);
    buf[n] = '\0';
    return EPMOE_OK;
}

static epmoe_status check_writable_dir(const char *dir, const char *for_path) {
    struct stat sb;
    EPMOE_REQUIRE(stat(dir, &sb) == 0, EPMOE_ERR_IO, "%s: directory %s: %s", for_path, dir,
                  strerror(errno));
    EPMOE_REQUIRE(S_ISDIR(sb.st_mode), EPMOE_ERR_IO, "%s: %s is not a directory", for_path, dir);
    EPMOE_REQUIRE(access(dir, W_OK | X_OK) == 0, EPMOE_ERR_IO,
                  "%s: directory %s is not writable: %s", for_path, dir, strerror(errno));
    return EPMOE_OK;
}

epmoe_status epmoe_check_output_file(const char *path, uint64_t bytes) {
    EPMOE_REQUIRE(path && path[0], EPMOE_ERR_INVALID_ARG, "output path is empty");
    size_t len = strlen(path);
    EPMOE_REQUIRE(path[len - 1] != '/', EPMOE_ERR_INVALID_ARG,
                  "output %s names a directory (ends in '/'): give a file name", path);
    struct stat sb;
    if (lstat(path, &sb) == 0) {
        EPMOE_REQUIRE(S_ISREG(sb.st_mode), EPMOE_ERR_INVALID_ARG,
                      "output %s is %s: refusing to replace it (give a regular file's path)",
                      path, kind_of(sb.st_mode));
    } else {
        EPMOE_REQUIRE(errno == ENOENT, EPMOE_ERR_IO, "output %s: %s", path, strerror(errno));
    }
    char dir[4096];
    EPMOE_TRY(dir_of(path, dir, sizeof dir));
    EPMOE_TRY(check_writable_dir(dir, path));
    if (bytes > 0) {
        struct statvfs vfs;
        /* where the file system cannot say (statvfs fails), nothing is known: go on */
        if (statvfs(dir, &vfs) == 0) {
            uint64_t free_bytes = (uint64_t)vfs.f_bavail * (uint64_t)vfs.f_frsize;
            EPMOE_REQUIRE(bytes <= free_bytes, EPMOE_ERR_IO,
                          "output %s needs %llu bytes, but its file system has %llu bytes free",
                          path, (unsigned long long)bytes, (unsigned long long)free_bytes);
        }
    }
    return EPMOE_OK;
}

epmoe_status epmoe_check_output_dir(const char *path) {
    EPMOE_REQUIRE(path && path[0], EPMOE_ERR_INVALID_ARG, "output directory path is empty");
    struct stat sb;
    if (stat(path, &sb) == 0) { /* follows a symlink: writing into its target replaces nothing */
        EPMOE_REQUIRE(S_ISDIR(sb.st_mode), EPMOE_ERR_INVALID_ARG,
                      "output directory %s exists and is %s", path, kind_of(sb.st_mode));
        return check_writable_dir(path, path);
    }
    EPMOE_REQUIRE(errno == ENOENT, EPMOE_ERR_IO, "output directory %s: %s", path,
                  strerror(errno));
    char copy[4096];
    size_t len = strlen(path);
    EPMOE_REQUIRE(len < sizeof copy, EPMOE_ERR_INVALID_ARG, "%s: path too long", path);
    memcpy(copy, path, len + 1);
    while (len > 1 && copy[len - 1] == '/') copy[--len] = '\0'; /* "dir/" -> "dir" */
    char parent[4096];
    EPMOE_TRY(dir_of(copy, parent, sizeof parent));
    return check_writable_dir(parent, path);
}

epmoe_status epmoe_open_regular_fd_for_write(const char *path, int *fd_out) {
    *fd_out = -1;
    /* O_NOFOLLOW: a symlink fails (ELOOP) instead of being written through; O_NONBLOCK: a FIFO
     * without a reader fails instead of blocking (and one with a reader is refused below). */
    int fd = open(path, O_WRONLY | O_CREAT | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC, 0666);
    EPMOE_REQUIRE(fd >= 0, EPMOE_ERR_IO, "%s: cannot create: %s%s", path, strerror(errno),
                  errno == ELOOP ? " (a symbolic link is in the way)" : "");
    struct stat sb;
    if (fstat(fd, &sb) != 0) {
        int err = errno;
        close(fd);
        EPMOE_FAIL(EPMOE_ERR_IO, "%s: %s", path, strerror(err));
    }
    if (!S_ISREG(sb.st_mode)) {
        close(fd);
        EPMOE_FAIL(EPMOE_ERR_IO, "%s is %s: refusing to write to it", path, kind_of(sb.st_mode));
    }
    /* truncate only now that it is known to be a regular file; back to blocking writes */
    if (ftruncate(fd, 0) != 0 || fcntl(fd, F_SETFL, 0) != 0) {
        int err = errno;
        close(fd);
        EPMOE_FAIL(EPMOE_ERR_IO, "%s: %s", path, strerror(err));
    }
    *fd_out = fd;
    return EPMOE_OK;
}

epmoe_status epmoe_open_regular_for_write(const char *path, FILE **out) {
    *out = NULL;
    int fd = -1;
    EPMOE_TRY(epmoe_open_regular_fd_for_write(path, &fd));
    *out = fdopen(fd, "wb");
    if (!*out) {
        int err = errno;
        close(fd);
        EPMOE_FAIL(EPMOE_ERR_IO, "%s: %s", path, strerror(err));
    }
    return EPMOE_OK;
}
