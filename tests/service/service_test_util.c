#include "service_test_util.h"

#include "common/rng.h"
#include "common/safetensors.h"

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

double test_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* ---- tracking and the reaper ---------------------------------------------------------------*/

#define MAX_TRACKED 256
static pid_t tracked[MAX_TRACKED];
static int reaper_fd = -1; /* write end of the reaper's pipe */

/* A process we started (or one of its ranks), not an unrelated process that reused the pid. */
static int is_ours(pid_t pid) {
    char path[64], cmd[512];
    snprintf(path, sizeof path, "/proc/%ld/cmdline", (long)pid);
    int fd = open(path, O_RDONLY);
    if (fd < 0) return 0;
    ssize_t n = read(fd, cmd, sizeof cmd - 1);
    close(fd);
    if (n <= 0) return 0;
    cmd[n] = '\0';
    for (ssize_t i = 0; i < n; i++)
        if (cmd[i] == '\0') cmd[i] = ' ';
    return strstr(cmd, "epmoe") || strstr(cmd, "mpiexec") || strstr(cmd, "mpirun") ||
           strstr(cmd, "orterun") || strstr(cmd, "prterun");
}

static void reaper_send(int op, pid_t pid) {
    if (reaper_fd < 0) return;
    int32_t rec[2] = {op, (int32_t)pid};
    ssize_t w = write(reaper_fd, rec, sizeof rec);
    (void)w;
}

static void track(pid_t pid) {
    for (int i = 0; i < MAX_TRACKED; i++)
        if (tracked[i] == 0) {
            tracked[i] = pid;
            break;
        }
    reaper_send(1, pid);
}

static void untrack(pid_t pid) {
    for (int i = 0; i < MAX_TRACKED; i++)
        if (tracked[i] == pid) tracked[i] = 0;
    reaper_send(-1, pid);
}

static void kill_tracked(pid_t pid) {
    if (pid > 0 && is_ours(pid)) {
        kill(pid, SIGCONT); /* a stopped process dies of SIGKILL too, but be explicit */
        kill(pid, SIGKILL);
    }
}

void test_kill_all(void) {
    for (int i = 0; i < MAX_TRACKED; i++) {
        if (tracked[i] == 0) continue;
        kill_tracked(tracked[i]);
        waitpid(tracked[i], NULL, WNOHANG); /* our children: reap (others: not ours, ECHILD) */
    }
    for (int i = 0; i < MAX_TRACKED; i++) {
        if (tracked[i] == 0) continue;
        int status;
        for (int k = 0; k < 200 && waitpid(tracked[i], &status, WNOHANG) == 0; k++) usleep(10000);
        untrack(tracked[i]);
    }
}

static void reaper_main(int fd) {
    pid_t pids[MAX_TRACKED] = {0};
    int32_t rec[2];
    for (;;) {
        ssize_t n = read(fd, rec, sizeof rec);
        if (n < 0 && errno == EINTR) continue;
        if (n != (ssize_t)sizeof rec) break; /* EOF: the test process is gone */
        for (int i = 0; i < MAX_TRACKED; i++) {
            if (rec[0] > 0 && pids[i] == 0) {
                pids[i] = rec[1];
                break;
            }
            if (rec[0] < 0 && pids[i] == rec[1]) pids[i] = 0;
        }
    }
    for (int i = 0; i < MAX_TRACKED; i++) kill_tracked(pids[i]);
    _exit(0);
}

void test_reaper_start(void) {
    if (reaper_fd >= 0) return;
    int fds[2];
    if (pipe2(fds, O_CLOEXEC) != 0) return;
    pid_t pid = fork();
    if (pid == 0) {
        close(fds[1]);
        setsid(); /* not in the test's process group: a signal to that group leaves it be */
        reaper_main(fds[0]);
    }
    close(fds[0]);
    if (pid < 0) {
        close(fds[1]);
        return;
    }
    reaper_fd = fds[1];
    atexit(test_kill_all);
}

/* ---- processes ---------------------------------------------------------------------------*/

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
    track(pid);
    return pid;
}

/* Waits for pid; 1 with *status when it exited in time. */
static int wait_timeout(pid_t pid, double seconds, int *status) {
    double until = test_now() + seconds;
    for (;;) {
        pid_t r = waitpid(pid, status, WNOHANG);
        if (r == pid) {
            untrack(pid);
            return 1;
        }
        if (r < 0) return 0;
        if (test_now() > until) return 0;
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
        untrack(pid);
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
    double until = test_now() + timeout_seconds;
    s->n_ranks = n_ranks;
    ck_assert_int_le(n_ranks, TEST_MAX_RANKS);
    for (;;) {
        FILE *f = fopen(ready, "r"); /* written whole (renamed into place) */
        if (f) {
            long pid = 0;
            int got = fscanf(f, "%d %d %ld", &s->port, &s->metrics_port, &pid);
            for (int r = 0; r < n_ranks && got >= 3; r++) {
                long p = 0;
                got += fscanf(f, "%ld", &p);
                s->rank_pids[r] = (pid_t)p;
            }
            fclose(f);
            if (got == 3 + n_ranks) {
                s->rank0_pid = (pid_t)pid;
                for (int r = 0; r < n_ranks; r++) track(s->rank_pids[r]);
                break;
            }
        }
        int status;
        if (waitpid(s->mpiexec_pid, &status, WNOHANG) == s->mpiexec_pid) {
            untrack(s->mpiexec_pid);
            dump_log(s->log_path);
            ck_abort_msg("epmoe-serve exited before serving (see the log above)");
        }
        if (test_now() > until) {
            test_server_kill(s);
            dump_log(s->log_path);
            ck_abort_msg("epmoe-serve not serving after %.0f s", timeout_seconds);
        }
        usleep(50000);
    }
    snprintf(s->target, sizeof s->target, "127.0.0.1:%d", s->port);
}

void test_server_kill(test_server *s) {
    for (int r = 0; r < s->n_ranks; r++) {
        kill_tracked(s->rank_pids[r]);
        untrack(s->rank_pids[r]);
        s->rank_pids[r] = 0;
    }
    if (s->mpiexec_pid > 0) {
        kill_tracked(s->mpiexec_pid);
        waitpid(s->mpiexec_pid, NULL, 0);
        untrack(s->mpiexec_pid);
    }
    s->mpiexec_pid = 0;
}

int test_server_wait(test_server *s, double timeout_seconds) {
    int status = 0;
    if (!wait_timeout(s->mpiexec_pid, timeout_seconds, &status)) {
        test_server_kill(s);
        dump_log(s->log_path);
        return -1;
    }
    s->mpiexec_pid = 0;
    /* mpiexec is gone; so should its ranks be (a stopped one is not) */
    for (int r = 0; r < s->n_ranks; r++) {
        kill_tracked(s->rank_pids[r]);
        untrack(s->rank_pids[r]);
    }
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) dump_log(s->log_path);
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

int test_server_stop(test_server *s, double timeout_seconds) {
    kill(s->rank0_pid, SIGTERM);
    return test_server_wait(s, timeout_seconds);
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

char *test_wait_metrics(int port, const char *const *series, const double *want, int n,
                        double timeout_seconds) {
    double until = test_now() + timeout_seconds;
    for (;;) {
        char *m = test_fetch_metrics(port);
        int all = m != NULL;
        for (int i = 0; all && i < n; i++) {
            double v = test_metric_value(m, series[i]);
            all = (v < 0 ? 0 : v) == want[i];
        }
        if (all || test_now() > until) return m;
        free(m);
        usleep(20000);
    }
}

static float *read_ref(const char *path, int64_t rows, int64_t H) {
    epmoe_st_file *f = NULL;
    ck_assert_msg(epmoe_st_open(path, &f) == EPMOE_OK, "%s", epmoe_last_error());
    const epmoe_st_tensor *t = epmoe_st_find(f, "hidden_states");
    ck_assert_ptr_nonnull(t);
    ck_assert_int_eq(t->dtype, EPMOE_DTYPE_F32);
    ck_assert_int_eq(t->shape[0], rows);
    ck_assert_int_eq(t->shape[1], H);
    float *y = malloc((size_t)(rows * H) * sizeof(float));
    memcpy(y, t->data, (size_t)(rows * H) * sizeof(float));
    epmoe_st_close(f);
    return y;
}

const test_pool *test_pool_get(void) {
    static test_pool p;
    if (p.x) return &p;
    const char *data = test_env("EPMOE_SERVICE_DATA");
    snprintf(p.checkpoint, sizeof p.checkpoint, "%s/tiny", data);
    epmoe_st_set *ckpt = NULL;
    ck_assert_msg(epmoe_st_set_open(p.checkpoint, &ckpt) == EPMOE_OK, "%s", epmoe_last_error());
    const char *h = epmoe_st_set_metadata(ckpt, "epmoe.hidden_size");
    const char *v = epmoe_st_set_metadata(ckpt, "epmoe.vocab_size");
    ck_assert_msg(h && v, "checkpoint metadata lacks hidden_size/vocab_size");
    const int64_t H = atoll(h);
    p.vocab = atoll(v);
    epmoe_st_set_close(ckpt);

    epmoe_rng rng;
    epmoe_rng_seed(&rng, 2024);
    float *x = malloc((size_t)(TEST_POOL * H) * sizeof(float));
    p.ids = malloc(TEST_POOL * sizeof(int32_t));
    for (int64_t i = 0; i < TEST_POOL * H; i++)
        x[i] = (float)((int)epmoe_rng_below(&rng, 257) - 128) / 64.0f;
    for (int i = 0; i < TEST_POOL; i++)
        p.ids[i] = (int32_t)epmoe_rng_below(&rng, (uint64_t)p.vocab);
    /* per process: suites may run at the same time */
    char in[1100], out_all[1100], out_13[1100], log[1100];
    snprintf(in, sizeof in, "%s/pool-%ld.safetensors", data, (long)getpid());
    snprintf(out_all, sizeof out_all, "%s/ref-all-%ld.safetensors", data, (long)getpid());
    snprintf(out_13, sizeof out_13, "%s/ref-13-%ld.safetensors", data, (long)getpid());
    snprintf(log, sizeof log, "%s/ref-%ld.log", data, (long)getpid());
    epmoe_st_writer *w = NULL;
    int64_t shape[2] = {TEST_POOL, H};
    ck_assert_int_eq(epmoe_st_writer_create(&w), EPMOE_OK);
    ck_assert_int_eq(epmoe_st_writer_add(w, "hidden_states", EPMOE_DTYPE_F32, 2, shape, x),
                     EPMOE_OK);
    ck_assert_int_eq(epmoe_st_writer_add(w, "token_ids", EPMOE_DTYPE_I32, 1, shape, p.ids),
                     EPMOE_OK);
    ck_assert_int_eq(epmoe_st_writer_finish(w, in), EPMOE_OK);
    epmoe_st_writer_free(w);
    const char *mpiexec = test_env("EPMOE_MPIEXEC"), *run = test_env("EPMOE_RUN");
    char *argv_all[] = {(char *)mpiexec, "-np", "1", (char *)run, "--checkpoint", p.checkpoint,
                        "--input", in, "--output", out_all, "--quiet", NULL};
    unlink(out_all);
    ck_assert_int_eq(test_run(argv_all, log, 600), 0);
    char *argv_13[] = {(char *)mpiexec, "-np", "1", (char *)run, "--checkpoint", p.checkpoint,
                       "--input", in, "--output", out_13, "--layers", "1:3", "--quiet", NULL};
    unlink(out_13);
    ck_assert_int_eq(test_run(argv_13, log, 600), 0);
    p.ref_all = read_ref(out_all, TEST_POOL, H);
    p.ref_13 = read_ref(out_13, TEST_POOL, H);
    unlink(in);
    unlink(out_all);
    unlink(out_13);
    p.H = H;
    p.x = x;
    return &p;
}
