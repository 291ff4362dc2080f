#include "coordinator/service/metrics.h"

#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include "coordinator/service/grpc_adapter.h"

static const char *const method_names[EPMOE_METHOD_COUNT] = {"Forward", "Info", "Health",
                                                             "other"};

/* Latency buckets (seconds), roughly 2.5x apart from 50 us to 10 s. */
static const double seconds_buckets[] = {5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2,
                                         2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0};
#define N_SECONDS_BUCKETS (int)(sizeof seconds_buckets / sizeof seconds_buckets[0])
/* Batch sizes: powers of two. */
#define N_COUNT_BUCKETS 16

typedef struct {
    const double *bounds;
    int n_bounds;
    uint64_t counts[N_SECONDS_BUCKETS > N_COUNT_BUCKETS ? N_SECONDS_BUCKETS : N_COUNT_BUCKETS];
    uint64_t count; /* also the +Inf bucket */
    double sum;
} histogram;

enum { STAGE_QUEUE, STAGE_ROUTE, STAGE_DISPATCH, STAGE_EXPERTS, STAGE_COMBINE, STAGE_SHARED,
       STAGE_FORWARD, STAGE_COUNT };
static const char *const stage_names[STAGE_COUNT] = {"queue",   "route",  "dispatch", "experts",
                                                     "combine", "shared", "forward"};

static double count_buckets[N_COUNT_BUCKETS];

struct epmoe_metrics {
    pthread_mutex_t mu;
    int64_t n_layers, n_experts;
    uint64_t requests[EPMOE_METHOD_COUNT][EPMOE_RPC_CODE_COUNT];
    uint64_t undelivered[EPMOE_METHOD_COUNT][EPMOE_RPC_CODE_COUNT];
    histogram request_seconds[EPMOE_METHOD_COUNT];
    histogram stage_seconds[STAGE_COUNT];
    histogram batch_tokens, batch_requests;
    uint64_t tokens_total;
    uint64_t *expert_tokens; /* [n_layers * n_experts] */
};

static void histogram_init(histogram *h, const double *bounds, int n) {
    memset(h, 0, sizeof *h);
    h->bounds = bounds;
    h->n_bounds = n;
}

static void histogram_add(histogram *h, double v) {
    for (int i = 0; i < h->n_bounds; i++)
        if (v <= h->bounds[i]) h->counts[i]++;
    h->count++;
    h->sum += v;
}

epmoe_status epmoe_metrics_create(int64_t n_layers, int64_t n_routed_experts,
                                  epmoe_metrics **out) {
    *out = NULL;
    EPMOE_REQUIRE(n_layers > 0 && n_routed_experts > 0, EPMOE_ERR_INVALID_ARG,
                  "metrics: n_layers %lld and n_routed_experts %lld must be > 0",
                  (long long)n_layers, (long long)n_routed_experts);
    for (int i = 0; i < N_COUNT_BUCKETS; i++) count_buckets[i] = (double)(1 << i);
    epmoe_metrics *m = calloc(1, sizeof *m);
    EPMOE_REQUIRE(m != NULL, EPMOE_ERR_OOM, "metrics: out of memory");
    m->expert_tokens = calloc((size_t)(n_layers * n_routed_experts), sizeof(uint64_t));
    if (!m->expert_tokens) {
        free(m);
        EPMOE_FAIL(EPMOE_ERR_OOM, "metrics: out of memory");
    }
    m->n_layers = n_layers;
    m->n_experts = n_routed_experts;
    pthread_mutex_init(&m->mu, NULL);
    for (int i = 0; i < EPMOE_METHOD_COUNT; i++)
        histogram_init(&m->request_seconds[i], seconds_buckets, N_SECONDS_BUCKETS);
    for (int i = 0; i < STAGE_COUNT; i++)
        histogram_init(&m->stage_seconds[i], seconds_buckets, N_SECONDS_BUCKETS);
    histogram_init(&m->batch_tokens, count_buckets, N_COUNT_BUCKETS);
    histogram_init(&m->batch_requests, count_buckets, N_COUNT_BUCKETS);
    *out = m;
    return EPMOE_OK;
}

void epmoe_metrics_free(epmoe_metrics *m) {
    if (!m) return;
    pthread_mutex_destroy(&m->mu);
    free(m->expert_tokens);
    free(m);
}

void epmoe_metrics_count_request(epmoe_metrics *m, epmoe_method method, int code,
                                 double latency_seconds) {
    if ((int)method < 0 || method >= EPMOE_METHOD_COUNT) method = EPMOE_METHOD_OTHER;
    if (code < 0 || code >= EPMOE_RPC_CODE_COUNT) code = EPMOE_RPC_UNKNOWN;
    pthread_mutex_lock(&m->mu);
    m->requests[method][code]++;
    histogram_add(&m->request_seconds[method], latency_seconds);
    pthread_mutex_unlock(&m->mu);
}

void epmoe_metrics_count_undelivered(epmoe_metrics *m, epmoe_method method, int code) {
    if ((int)method < 0 || method >= EPMOE_METHOD_COUNT) method = EPMOE_METHOD_OTHER;
    if (code < 0 || code >= EPMOE_RPC_CODE_COUNT) code = EPMOE_RPC_UNKNOWN;
    pthread_mutex_lock(&m->mu);
    m->undelivered[method][code]++;
    pthread_mutex_unlock(&m->mu);
}

void epmoe_metrics_count_tokens(epmoe_metrics *m, int64_t n_tokens) {
    pthread_mutex_lock(&m->mu);
    m->tokens_total += (uint64_t)n_tokens;
    pthread_mutex_unlock(&m->mu);
}

void epmoe_metrics_observe_queue(epmoe_metrics *m, double seconds) {
    pthread_mutex_lock(&m->mu);
    histogram_add(&m->stage_seconds[STAGE_QUEUE], seconds);
    pthread_mutex_unlock(&m->mu);
}

void epmoe_metrics_observe_batch(epmoe_metrics *m, int64_t n_requests, int64_t n_tokens,
                                 double forward_seconds, const epmoe_stage_times *times,
                                 const int64_t *expert_counts, int64_t layer_begin,
                                 int64_t layer_end) {
    pthread_mutex_lock(&m->mu);
    histogram_add(&m->batch_requests, (double)n_requests);
    histogram_add(&m->batch_tokens, (double)n_tokens);
    histogram_add(&m->stage_seconds[STAGE_FORWARD], forward_seconds);
    if (times) {
        histogram_add(&m->stage_seconds[STAGE_ROUTE], times->route);
        histogram_add(&m->stage_seconds[STAGE_DISPATCH], times->dispatch);
        histogram_add(&m->stage_seconds[STAGE_EXPERTS], times->experts);
        histogram_add(&m->stage_seconds[STAGE_COMBINE], times->combine);
        histogram_add(&m->stage_seconds[STAGE_SHARED], times->shared);
    }
    if (expert_counts && layer_begin >= 0 && layer_end <= m->n_layers) {
        for (int64_t l = layer_begin; l < layer_end; l++)
            for (int64_t e = 0; e < m->n_experts; e++)
                m->expert_tokens[l * m->n_experts + e] +=
                    (uint64_t)expert_counts[(l - layer_begin) * m->n_experts + e];
    }
    pthread_mutex_unlock(&m->mu);
}

/* A growing text buffer; on allocation failure it stays failed and render returns NULL. */
typedef struct {
    char *data;
    size_t len, cap;
    int failed;
} text;

static void put(text *t, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void put(text *t, const char *fmt, ...) {
    if (t->failed) return;
    for (;;) {
        va_list ap;
        va_start(ap, fmt);
        int n = vsnprintf(t->data + t->len, t->cap - t->len, fmt, ap);
        va_end(ap);
        if (n < 0) {
            t->failed = 1;
            return;
        }
        if ((size_t)n < t->cap - t->len) {
            t->len += (size_t)n;
            return;
        }
        size_t cap = t->cap * 2 + (size_t)n + 1;
        char *d = realloc(t->data, cap);
        if (!d) {
            t->failed = 1;
            return;
        }
        t->data = d;
        t->cap = cap;
    }
}

static void put_histogram(text *t, const char *name, const char *labels, const histogram *h) {
    const char *sep = labels[0] ? "," : "";
    for (int i = 0; i < h->n_bounds; i++)
        put(t, "%s_bucket{%s%sle=\"%g\"} %llu\n", name, labels, sep, h->bounds[i],
            (unsigned long long)h->counts[i]);
    put(t, "%s_bucket{%s%sle=\"+Inf\"} %llu\n", name, labels, sep, (unsigned long long)h->count);
    if (labels[0]) {
        put(t, "%s_sum{%s} %.9g\n", name, labels, h->sum);
        put(t, "%s_count{%s} %llu\n", name, labels, (unsigned long long)h->count);
    } else {
        put(t, "%s_sum %.9g\n", name, h->sum);
        put(t, "%s_count %llu\n", name, (unsigned long long)h->count);
    }
}

char *epmoe_metrics_render(epmoe_metrics *m, const epmoe_metrics_gauges *g, size_t *len) {
    text t = {malloc(1 << 16), 0, 1 << 16, 0};
    if (!t.data) return NULL;
    t.data[0] = '\0';
    pthread_mutex_lock(&m->mu);
    put(&t, "# HELP epmoe_requests_total Calls answered, by method and gRPC status code.\n");
    put(&t, "# TYPE epmoe_requests_total counter\n");
    for (int i = 0; i < EPMOE_METHOD_COUNT; i++)
        for (int c = 0; c < EPMOE_RPC_CODE_COUNT; c++)
            if (m->requests[i][c] || (c == EPMOE_RPC_OK && i == EPMOE_METHOD_FORWARD))
                put(&t, "epmoe_requests_total{method=\"%s\",code=\"%s\"} %llu\n", method_names[i],
                    epmoe_rpc_code_name(c), (unsigned long long)m->requests[i][c]);
    put(&t, "# HELP epmoe_replies_undelivered_total Replies that never reached their client "
            "(client gone, deadline passed, or gRPC refused to send), by the code sent.\n");
    put(&t, "# TYPE epmoe_replies_undelivered_total counter\n");
    for (int i = 0; i < EPMOE_METHOD_COUNT; i++)
        for (int c = 0; c < EPMOE_RPC_CODE_COUNT; c++)
            if (m->undelivered[i][c])
                put(&t, "epmoe_replies_undelivered_total{method=\"%s\",code=\"%s\"} %llu\n",
                    method_names[i], epmoe_rpc_code_name(c),
                    (unsigned long long)m->undelivered[i][c]);
    put(&t, "# HELP epmoe_request_seconds Receipt to reply, by method.\n");
    put(&t, "# TYPE epmoe_request_seconds histogram\n");
    for (int i = 0; i < EPMOE_METHOD_COUNT; i++) {
        char labels[64];
        snprintf(labels, sizeof labels, "method=\"%s\"", method_names[i]);
        put_histogram(&t, "epmoe_request_seconds", labels, &m->request_seconds[i]);
    }
    put(&t, "# HELP epmoe_stage_seconds Time per stage: queue per request; engine stages "
            "(summed over layers) and the whole forward per batch.\n");
    put(&t, "# TYPE epmoe_stage_seconds histogram\n");
    for (int i = 0; i < STAGE_COUNT; i++) {
        char labels[64];
        snprintf(labels, sizeof labels, "stage=\"%s\"", stage_names[i]);
        put_histogram(&t, "epmoe_stage_seconds", labels, &m->stage_seconds[i]);
    }
    put(&t, "# HELP epmoe_batch_tokens Tokens per engine forward.\n");
    put(&t, "# TYPE epmoe_batch_tokens histogram\n");
    put_histogram(&t, "epmoe_batch_tokens", "", &m->batch_tokens);
    put(&t, "# HELP epmoe_batch_requests Requests per engine forward.\n");
    put(&t, "# TYPE epmoe_batch_requests histogram\n");
    put_histogram(&t, "epmoe_batch_requests", "", &m->batch_requests);
    put(&t, "# HELP epmoe_tokens_total Rows of OK Forward replies delivered to clients.\n"
            "# TYPE epmoe_tokens_total counter\n");
    put(&t, "epmoe_tokens_total %llu\n", (unsigned long long)m->tokens_total);
    put(&t, "# HELP epmoe_expert_tokens_total Tokens routed to each expert, per layer.\n");
    put(&t, "# TYPE epmoe_expert_tokens_total counter\n");
    for (int64_t l = 0; l < m->n_layers; l++)
        for (int64_t e = 0; e < m->n_experts; e++)
            put(&t, "epmoe_expert_tokens_total{layer=\"%lld\",expert=\"%lld\"} %llu\n",
                (long long)l, (long long)e,
                (unsigned long long)m->expert_tokens[l * m->n_experts + e]);
    pthread_mutex_unlock(&m->mu);
    if (g) {
        put(&t, "# HELP epmoe_queue_depth Requests waiting for a batch.\n");
        put(&t, "# TYPE epmoe_queue_depth gauge\nepmoe_queue_depth %lld\n",
            (long long)g->queue_depth);
        put(&t, "# HELP epmoe_inflight_requests Forward calls received and not yet answered.\n");
        put(&t, "# TYPE epmoe_inflight_requests gauge\nepmoe_inflight_requests %lld\n",
            (long long)g->inflight_requests);
        put(&t, "# HELP epmoe_draining 1 after SIGTERM: new calls are refused.\n");
        put(&t, "# TYPE epmoe_draining gauge\nepmoe_draining %d\n", g->draining);
        put(&t, "# HELP epmoe_engine_failed 1 once a rank was lost: the server is restarting.\n");
        put(&t, "# TYPE epmoe_engine_failed gauge\nepmoe_engine_failed %d\n", g->failed);
    }
    if (t.failed) {
        free(t.data);
        return NULL;
    }
    *len = t.len;
    return t.data;
}

/* ---- HTTP exposition ---------------------------------------------------------------------- */

struct epmoe_metrics_http {
    int listen_fd;
    int stop_pipe[2];
    pthread_t thread;
    epmoe_metrics_render_fn render;
    void *ctx;
    /* connections being served, each on a detached thread */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int conn_fds[EPMOE_METRICS_MAX_CONNECTIONS]; /* -1: free slot */
    int active;
};

static double monotonic_seconds(void) { return epmoe_seconds_now(); }

/* Sends everything unless the connection fails or the reply deadline passes. */
static void write_all(int fd, const char *data, size_t n, double deadline) {
    while (n > 0) {
        double left = deadline - monotonic_seconds();
        if (left <= 0) return;
        struct pollfd p = {fd, POLLOUT, 0};
        int r = poll(&p, 1, (int)(left * 1000) + 1);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return;
        ssize_t w = send(fd, data, n, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (w < 0 && (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK)) continue;
        if (w <= 0) return;
        data += w;
        n -= (size_t)w;
    }
}

static void serve_one(epmoe_metrics_http *h, int fd) {
    /* The whole exchange has a deadline: a client that trickles its request (or reads the
     * reply slowly) is cut off, and holds only its own thread meanwhile. */
    const double deadline = monotonic_seconds() + EPMOE_METRICS_IO_TIMEOUT_S;
    char req[4096];
    size_t n = 0;
    while (n < sizeof req - 1) {
        double left = deadline - monotonic_seconds();
        if (left <= 0) break;
        struct pollfd p = {fd, POLLIN, 0};
        int pr = poll(&p, 1, (int)(left * 1000) + 1);
        if (pr < 0 && errno == EINTR) continue;
        if (pr <= 0) break;
        ssize_t r = recv(fd, req + n, sizeof req - 1 - n, MSG_DONTWAIT);
        if (r < 0 && (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK)) continue;
        if (r <= 0) break;
        n += (size_t)r;
        req[n] = '\0';
        if (strstr(req, "\r\n\r\n") || strstr(req, "\n\n")) break;
    }
    req[n] = '\0';
    char header[256];
    if (strncmp(req, "GET /metrics ", 13) == 0 || strncmp(req, "GET /metrics?", 13) == 0) {
        size_t len = 0;
        char *body = h->render(h->ctx, &len);
        if (body) {
            int hn = snprintf(header, sizeof header,
                              "HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4; "
                              "charset=utf-8\r\nContent-Length: %zu\r\nConnection: close\r\n\r\n",
                              len);
            write_all(fd, header, (size_t)hn, deadline);
            write_all(fd, body, len, deadline);
            free(body);
            return;
        }
        const char *err = "HTTP/1.0 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n";
        write_all(fd, err, strlen(err), deadline);
        return;
    }
    const char *body = "not found: try GET /metrics\n";
    int hn = snprintf(header, sizeof header,
                      "HTTP/1.0 404 Not Found\r\nContent-Type: text/plain\r\nContent-Length: "
                      "%zu\r\nConnection: close\r\n\r\n",
                      strlen(body));
    write_all(fd, header, (size_t)hn, deadline);
    write_all(fd, body, strlen(body), deadline);
}

typedef struct {
    epmoe_metrics_http *h;
    int slot;
} http_conn;

static void *conn_thread(void *arg) {
    http_conn *c = arg;
    epmoe_metrics_http *h = c->h;
    serve_one(h, h->conn_fds[c->slot]);
    pthread_mutex_lock(&h->mu);
    close(h->conn_fds[c->slot]);
    h->conn_fds[c->slot] = -1;
    h->active--;
    pthread_cond_broadcast(&h->cv);
    pthread_mutex_unlock(&h->mu);
    free(c);
    return NULL;
}

/* Starts a thread for the connection; closes it at once when all slots are busy. */
static void start_conn(epmoe_metrics_http *h, int fd) {
    pthread_mutex_lock(&h->mu);
    int slot = -1;
    for (int i = 0; i < EPMOE_METRICS_MAX_CONNECTIONS && slot < 0; i++)
        if (h->conn_fds[i] < 0) slot = i;
    http_conn *c = slot >= 0 ? malloc(sizeof *c) : NULL;
    if (!c) {
        pthread_mutex_unlock(&h->mu);
        close(fd);
        return;
    }
    *c = (http_conn){h, slot};
    h->conn_fds[slot] = fd;
    h->active++;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_t t;
    if (pthread_create(&t, &attr, conn_thread, c) != 0) {
        h->conn_fds[slot] = -1;
        h->active--;
        close(fd);
        free(c);
    }
    pthread_attr_destroy(&attr);
    pthread_mutex_unlock(&h->mu);
}

static void *http_thread(void *arg) {
    epmoe_metrics_http *h = arg;
    for (;;) {
        struct pollfd fds[2] = {{h->listen_fd, POLLIN, 0}, {h->stop_pipe[0], POLLIN, 0}};
        int r = poll(fds, 2, -1);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0 || fds[1].revents) break;
        if (fds[0].revents & POLLIN) {
            int fd = accept(h->listen_fd, NULL, NULL);
            if (fd >= 0) start_conn(h, fd);
        }
    }
    return NULL;
}

/* Splits "host:port" (IPv6 as "[::1]:port"). */
static epmoe_status split_host_port(const char *listen, char *host, size_t host_cap, char *port,
                                    size_t port_cap) {
    const char *colon = strrchr(listen, ':');
    EPMOE_REQUIRE(colon && colon[1], EPMOE_ERR_INVALID_ARG,
                  "metrics listen address '%s' is not HOST:PORT", listen);
    const char *hb = listen, *he = colon;
    if (*hb == '[' && he > hb && he[-1] == ']') {
        hb++;
        he--;
    }
    EPMOE_REQUIRE((size_t)(he - hb) < host_cap && strlen(colon + 1) < port_cap,
                  EPMOE_ERR_INVALID_ARG, "metrics listen address '%s' too long", listen);
    memcpy(host, hb, (size_t)(he - hb));
    host[he - hb] = '\0';
    strcpy(port, colon + 1);
    return EPMOE_OK;
}

epmoe_status epmoe_metrics_http_start(const char *address, epmoe_metrics_render_fn render,
                                      void *ctx, epmoe_metrics_http **out, int *bound_port) {
    *out = NULL;
    char host[256], port[32];
    EPMOE_TRY(split_host_port(address, host, sizeof host, port, sizeof port));
    struct addrinfo hints, *res = NULL;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
    int gai = getaddrinfo(host[0] ? host : NULL, port, &hints, &res);
    EPMOE_REQUIRE(gai == 0, EPMOE_ERR_INVALID_ARG, "metrics listen address '%s': %s", address,
                  gai_strerror(gai));
    int fd = socket(res->ai_family, res->ai_socktype, res->ai_protocol);
    if (fd < 0) {
        freeaddrinfo(res);
        EPMOE_FAIL(EPMOE_ERR_IO, "metrics: socket: %s", strerror(errno));
    }
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(fd, res->ai_addr, res->ai_addrlen) != 0 || listen(fd, 16) != 0) {
        int e = errno;
        freeaddrinfo(res);
        close(fd);
        EPMOE_FAIL(EPMOE_ERR_IO, "metrics: cannot listen on '%s': %s", address, strerror(e));
    }
    freeaddrinfo(res);
    struct sockaddr_storage addr;
    socklen_t alen = sizeof addr;
    getsockname(fd, (struct sockaddr *)&addr, &alen);
    int p = addr.ss_family == AF_INET6 ? ntohs(((struct sockaddr_in6 *)&addr)->sin6_port)
                                        : ntohs(((struct sockaddr_in *)&addr)->sin_port);
    epmoe_metrics_http *h = calloc(1, sizeof *h);
    if (!h || pipe(h->stop_pipe) != 0) {
        free(h);
        close(fd);
        EPMOE_FAIL(EPMOE_ERR_IO, "metrics: cannot create the server");
    }
    h->listen_fd = fd;
    h->render = render;
    h->ctx = ctx;
    pthread_mutex_init(&h->mu, NULL);
    pthread_cond_init(&h->cv, NULL);
    for (int i = 0; i < EPMOE_METRICS_MAX_CONNECTIONS; i++) h->conn_fds[i] = -1;
    if (pthread_create(&h->thread, NULL, http_thread, h) != 0) {
        close(h->stop_pipe[0]);
        close(h->stop_pipe[1]);
        close(fd);
        free(h);
        EPMOE_FAIL(EPMOE_ERR_INTERNAL, "metrics: cannot start the HTTP thread");
    }
    if (bound_port) *bound_port = p;
    *out = h;
    return EPMOE_OK;
}

void epmoe_metrics_http_stop(epmoe_metrics_http *h) {
    if (!h) return;
    ssize_t w = write(h->stop_pipe[1], "x", 1);
    (void)w;
    pthread_join(h->thread, NULL);
    /* Cut the connections still being served and wait for their threads to let go. */
    pthread_mutex_lock(&h->mu);
    for (int i = 0; i < EPMOE_METRICS_MAX_CONNECTIONS; i++)
        if (h->conn_fds[i] >= 0) shutdown(h->conn_fds[i], SHUT_RDWR);
    while (h->active > 0) pthread_cond_wait(&h->cv, &h->mu);
    pthread_mutex_unlock(&h->mu);
    pthread_mutex_destroy(&h->mu);
    pthread_cond_destroy(&h->cv);
    close(h->stop_pipe[0]);
    close(h->stop_pipe[1]);
    close(h->listen_fd);
    free(h);
}
