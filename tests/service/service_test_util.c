#include "service_test_util.h"

#include <arpa/inet.h>
#include <check.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

extern char **environ;

const char *test_env(const char *name) {
    const char *v = getenv(name);
    ck_assert_msg(v && v[0], "environment variable %s is not set (run through ctest)", name);
    return v;
}

static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static pid_t spawn_logged(char *const argv[], const char *log_path) {
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, 1, log_path, O_WRONLY | O_CREAT | O_APPEND, 0644);
    posix_spawn_file_actions_adddup2(&fa, 1, 2);
    posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
    pid_t pid = -1;
    int rc = posix_spawn(&pid, argv[0], &fa, NULL, argv, environ);
    posix_spawn_file_actions_destroy(&fa);
    ck_assert_msg(rc == 0, "cannot start %s: %s", argv[0], strerror(rc));
    return pid;
}

/* Waits for pid; 1 with *status when it exited in time. */
static int wait_timeout(pid_t pid, double seconds, int *status) {
    double until = now_seconds() + seconds;
    for (;;) {
        pid_t r = waitpid(pid, status, WNOHANG);
        if (r == pid) return 1;
        if (r < 0) return 0;
        if (now_seconds() > until) return 0;
        usleep(20000);
    }
}

static void dump_log(const char *path) {
    FILE *f = fopen(path, "r");
    if (!f) return;
    char line[1024];
    fprintf(stderr, "---- %s ----\n", path);
    while (fgets(line, sizeof line, f)) fputs(line, stderr);
    fclose(f);
}

int test_run(char *const argv[], const char *log_path, double timeout_seconds) {
    pid_t pid = spawn_logged(argv, log_path);
    int status = 0;
    if (!wait_timeout(pid, timeout_seconds, &status)) {
        kill(pid, SIGKILL);
        waitpid(pid, &status, 0);
        dump_log(log_path);
        return -1;
    }
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) dump_log(log_path);
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

void test_server_start(test_server *s, int n_ranks, const char *checkpoint,
                       const char *const *extra, double timeout_seconds) {
    memset(s, 0, sizeof *s);
    const char *data = test_env("EPMOE_SERVICE_DATA");
    char ready[1024], np[16];
    static int serial;
    snprintf(ready, sizeof ready, "%s/ready-%ld-%d", data, (long)getpid(), serial);
    snprintf(s->log_path, sizeof s->log_path, "%s/serve-%ld-%d.log", data, (long)getpid(), serial);
    serial++;
    unlink(ready);
    unlink(s->log_path);
    snprintf(np, sizeof np, "%d", n_ranks);
    const char *argv[64] = {test_env("EPMOE_MPIEXEC"), "-np", np, test_env("EPMOE_SERVE"),
                            "--checkpoint", checkpoint, "--listen", "127.0.0.1:0",
                            "--metrics-listen", "127.0.0.1:0", "--ready-file", ready};
    int n = 12;
    for (int i = 0; extra && extra[i] && n < 63; i++) argv[n++] = extra[i];
    argv[n] = NULL;
    s->mpiexec_pid = spawn_logged((char *const *)argv, s->log_path);
    double until = now_seconds() + timeout_seconds;
    for (;;) {
        FILE *f = fopen(ready, "r");
        if (f) {
            long pid = 0;
            int got = fscanf(f, "%d %d %ld", &s->port, &s->metrics_port, &pid);
            fclose(f);
            if (got == 3) {
                s->rank0_pid = (pid_t)pid;
                break;
            }
        }
        int status;
        if (waitpid(s->mpiexec_pid, &status, WNOHANG) == s->mpiexec_pid) {
            dump_log(s->log_path);
            ck_abort_msg("epmoe-serve exited before serving (see the log above)");
        }
        if (now_seconds() > until) {
            kill(s->mpiexec_pid, SIGKILL);
            dump_log(s->log_path);
            ck_abort_msg("epmoe-serve not serving after %.0f s", timeout_seconds);
        }
        usleep(50000);
    }
    snprintf(s->target, sizeof s->target, "127.0.0.1:%d", s->port);
}

int test_server_stop(test_server *s, double timeout_seconds) {
    kill(s->rank0_pid, SIGTERM);
    int status = 0;
    if (!wait_timeout(s->mpiexec_pid, timeout_seconds, &status)) {
        kill(s->mpiexec_pid, SIGKILL);
        waitpid(s->mpiexec_pid, &status, 0);
        dump_log(s->log_path);
        return -1;
    }
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) dump_log(s->log_path);
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

char *test_fetch_metrics(int port) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) return NULL;
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_port = htons((uint16_t)port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    struct timeval tv = {10, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    if (connect(fd, (struct sockaddr *)&a, sizeof a) != 0) {
        close(fd);
        return NULL;
    }
    const char *req = "GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n";
    if (write(fd, req, strlen(req)) != (ssize_t)strlen(req)) {
        close(fd);
        return NULL;
    }
    size_t cap = 1 << 16, len = 0;
    char *buf = malloc(cap);
    for (;;) {
        if (len + 4096 > cap) {
            cap *= 2;
            buf = realloc(buf, cap);
        }
        ssize_t r = read(fd, buf + len, cap - len - 1);
        if (r <= 0) break;
        len += (size_t)r;
    }
    close(fd);
    buf[len] = '\0';
    char *body = strstr(buf, "\r\n\r\n");
    if (strncmp(buf, "HTTP/1.0 200", 12) != 0 || !body) {
        free(buf);
        return NULL;
    }
    memmove(buf, body + 4, strlen(body + 4) + 1);
    return buf;
}

double test_metric_value(const char *text, const char *series) {
    size_t n = strlen(series);
    for (const char *p = text; p && *p; p = strchr(p, '\n') ? strchr(p, '\n') + 1 : NULL) {
        if (strncmp(p, series, n) == 0) return atof(p + n);
    }
    return -1;
}
