/* The service without the MoE engine: settings, request validation, metrics text, the batcher,
 * and the whole gRPC path (adapter server and client) in front of a row-wise test engine whose
 * forward can be held at a gate, so that queue-full, deadline and drain cases are
 * deterministic rather than timed. */
#include <check.h>
#include <arpa/inet.h>
#include <math.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/rng.h"
#include "common/tensor.h"
#include "coordinator/service/batcher.h"
#include "coordinator/service/client.h"
#include "coordinator/service/grpc_adapter.h"
#include "coordinator/service/metrics.h"
#include "coordinator/service/serve_config.h"
#include "coordinator/service/server.h"
#include "common/user_message.h"
#include "coordinator/service/wire.h"
#include "epmoe.pb-c.h"
#include "service_test_util.h"
#include "tests/support/test_support.h"

enum { H = 64, N_LAYERS = 4, N_HASH = 1, VOCAB = 100, E = 16 };

/* ---- the row-wise test engine --------------------------------------------------------------
 * out[t, h] = 0.5 x[t, h] + layer_begin + 0.25 layer_end + (ids ? ids[t] % 7 : 0): each row a
 * function of itself, so any row landing in the wrong response or the wrong place shows. */

static float expected_value(float x, int64_t lb, int64_t le, const int32_t *ids, int64_t t) {
    return 0.5f * x + (float)lb + 0.25f * (float)le + (ids ? (float)(ids[t] % 7) : 0.0f);
}

typedef struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int gate_closed;   /* forwards wait while set */
    int inside;        /* forwards currently waiting at the gate or running */
    int64_t calls, rows, max_batch_rows;
    int lost;          /* every forward fails with EPMOE_ERR_PEER_LOST */
} test_engine;

static test_engine engine = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 0, 0, 0, 0, 0};

/* Like the real engine, rows beyond this magnitude fail the whole forward with a data error
 * that names a row of the batch (not of any one request). */
#define HUGE_ROW 1e30f

static void engine_reset(void) {
    pthread_mutex_lock(&engine.mu);
    engine.gate_closed = 0;
    engine.inside = 0;
    engine.calls = engine.rows = engine.max_batch_rows = 0;
    engine.lost = 0;
    pthread_mutex_unlock(&engine.mu);
}

static void engine_gate(int closed) {
    pthread_mutex_lock(&engine.mu);
    engine.gate_closed = closed;
    pthread_cond_broadcast(&engine.cv);
    pthread_mutex_unlock(&engine.mu);
}

static void engine_wait_inside(void) {
    pthread_mutex_lock(&engine.mu);
    while (engine.inside == 0) pthread_cond_wait(&engine.cv, &engine.mu);
    pthread_mutex_unlock(&engine.mu);
}

static epmoe_status engine_forward(void *ctx, const float *x, const int32_t *ids, int64_t T,
                                   int64_t lb, int64_t le, float *out, epmoe_stage_times *times,
                                   int64_t *expert_counts) {
    (void)ctx;
    pthread_mutex_lock(&engine.mu);
    engine.inside++;
    pthread_cond_broadcast(&engine.cv);
    while (engine.gate_closed) pthread_cond_wait(&engine.cv, &engine.mu);
    engine.calls++;
    engine.rows += T;
    if (T > engine.max_batch_rows) engine.max_batch_rows = T;
    engine.inside--;
    int lost = engine.lost;
    pthread_mutex_unlock(&engine.mu);
    if (lost)
        return epmoe_set_error(EPMOE_ERR_PEER_LOST, __FILE__, __LINE__,
                               "rank 0: test: no answer from rank 2 (dead or hung)");
    for (int64_t i = 0; i < T * H; i++)
        if (fabsf(x[i]) > HUGE_ROW)
            return epmoe_set_error(EPMOE_ERR_NUMERIC, __FILE__, __LINE__,
                                   "routing: gate logit of token %lld is inf", (long long)(i / H));
    for (int64_t t = 0; t < T; t++)
        for (int64_t h = 0; h < H; h++)
            out[t * H + h] = expected_value(x[t * H + h], lb, le, ids, t);
    memset(times, 0, sizeof *times);
    times->experts = 1e-3;
    for (int64_t i = 0; i < (le - lb) * E; i++) expert_counts[i] = T * (i % E == 3);
    return EPMOE_OK;
}

/* ---- serve settings ------------------------------------------------------------------------*/

START_TEST(test_serve_config) {
    epmoe_serve_config c;
    epmoe_serve_config_defaults(&c);
    ck_assert_str_eq(c.listen, "127.0.0.1:50051");
    ck_assert_int_eq(c.max_batch_tokens, 1024);
    ck_assert_int_eq(c.max_queue, 256);
    ck_assert_int_eq(c.wait_when_idle, 0);
    ck_assert_int_eq(epmoe_serve_config_set(&c, "wait_when_idle", "2"), EPMOE_ERR_INVALID_ARG);
    ck_assert_int_eq(epmoe_serve_config_set(&c, "max_queue", "0"), EPMOE_ERR_INVALID_ARG);
    ck_assert_ptr_nonnull(strstr(epmoe_last_error(), "max_queue"));
    ck_assert_int_eq(epmoe_serve_config_set(&c, "max_queue", "x"), EPMOE_ERR_INVALID_ARG);
    ck_assert_int_eq(epmoe_serve_config_set(&c, "nope", "1"), EPMOE_ERR_NOT_FOUND);
    char a0[] = "prog", a1[] = "--max-batch-tokens", a2[] = "77", a3[] = "--listen=1.2.3.4:5",
         a4[] = "--other", a5[] = "v";
    char *argv[] = {a0, a1, a2, a3, a4, a5, NULL};
    int argc = 6;
    ck_assert_int_eq(epmoe_serve_config_parse_args(&c, &argc, argv), EPMOE_OK);
    ck_assert_int_eq(c.max_batch_tokens, 77);
    ck_assert_str_eq(c.listen, "1.2.3.4:5");
    ck_assert_int_eq(argc, 3);
    ck_assert_str_eq(argv[1], "--other");
    ck_assert_str_eq(argv[2], "v");
}
END_TEST

/* ---- messages for users --------------------------------------------------------------------*/

START_TEST(test_user_message_strips_source_locations) {
    struct {
        const char *in, *out;
    } cases[] = {
        {"batcher.c:248: queue full", "queue full"},
        {"engine forward failed (NUMERIC): rank 1 failed to route: /work/x/kernels/cpu/route.c:73: "
         "routing: gate logit of token 3 is inf",
         "engine forward failed (NUMERIC): rank 1 failed to route: routing: gate logit of token 3 "
         "is inf"},
        {"(agree.c:59: rank 1: lost)", "(rank 1: lost)"},
        {"gpu_engine.cu:466: bad", "bad"},
        {"token_ids[0]: 1024 outside [0, 1024)", "token_ids[0]: 1024 outside [0, 1024)"},
        {"rank 0: file x.c has 3: fine", "rank 0: file x.c has 3: fine"},
        {"ratio 1.5: ok; see notes.c:12:3 (no space)", "ratio 1.5: ok; see notes.c:12:3 (no space)"},
        {"", ""},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char out[256];
        epmoe_user_message(out, sizeof out, cases[i].in);
        ck_assert_str_eq(out, cases[i].out);
    }
    char small[8];
    epmoe_user_message(small, sizeof small, "wire.c:1: abcdefghijk");
    ck_assert_str_eq(small, "abcdefg");
}
END_TEST

/* ---- request validation --------------------------------------------------------------------*/

static const epmoe_wire_limits limits = {H, N_LAYERS, N_HASH, VOCAB, 32, 0, 0};

typedef struct {
    int64_t shape[3];
    size_t n_shape;
    int dtype;
    size_t data_len;
    float fill;
    int n_ids, id_value;
    int64_t lb, le;
    const char *request_id;
} msg_spec;

static msg_spec good_spec(int64_t T) {
    msg_spec s = {{T, H, 1}, 2, EPMOE__V1__DTYPE__DTYPE_FP32, (size_t)(T * H) * 4, 0.5f, (int)T,
                  5, 0, 0, "rid"};
    return s;
}

static uint8_t *pack_spec(const msg_spec *s, size_t *n) {
    uint8_t *data = calloc(s->data_len + 4, 1);
    size_t elem = s->dtype == EPMOE__V1__DTYPE__DTYPE_FP32 ? 4 : 2;
    for (size_t i = 0; i + elem <= s->data_len; i += elem) {
        if (elem == 4) {
            memcpy(data + i, &s->fill, 4);
        } else {
            epmoe_status st = epmoe_convert_from_f32(
                &s->fill, 1, s->dtype == EPMOE__V1__DTYPE__DTYPE_BF16 ? EPMOE_DTYPE_BF16 : EPMOE_DTYPE_F16,
                data + i);
            ck_assert_int_eq(st, EPMOE_OK);
        }
    }
    int32_t ids[64];
    for (int i = 0; i < 64; i++) ids[i] = s->id_value;
    Epmoe__V1__Tensor t = EPMOE__V1__TENSOR__INIT;
    t.n_shape = s->n_shape;
    t.shape = (int64_t *)s->shape;
    t.dtype = (Epmoe__V1__DType)s->dtype;
    t.data.len = s->data_len;
    t.data.data = data;
    Epmoe__V1__ForwardRequest m = EPMOE__V1__FORWARD_REQUEST__INIT;
    m.request_id = (char *)s->request_id;
    m.hidden_states = &t;
    m.n_token_ids = (size_t)s->n_ids;
    m.token_ids = ids;
    m.layer_begin = s->lb;
    m.layer_end = s->le;
    *n = epmoe__v1__forward_request__get_packed_size(&m);
    uint8_t *buf = malloc(*n + 1);
    epmoe__v1__forward_request__pack(&m, buf);
    free(data);
    return buf;
}

/* Decodes s and requires INVALID_ARGUMENT with `field` in the message. */
static void expect_invalid(const msg_spec *s, const char *field) {
    size_t n;
    uint8_t *buf = pack_spec(s, &n);
    epmoe_serve_request *r = NULL;
    char msg[512];
    int code = epmoe_wire_decode_forward(buf, n, &limits, &r, msg, sizeof msg);
    free(buf);
    ck_assert_msg(code == EPMOE_RPC_INVALID_ARGUMENT, "%s: code %d (%s)", field, code, msg);
    ck_assert_ptr_null(r);
    ck_assert_msg(strstr(msg, field) != NULL, "message '%s' does not name '%s'", msg, field);
}

START_TEST(test_wire_rejects_each_bad_field) {
    msg_spec s;
    s = good_spec(3); s.shape[1] = H + 32; s.data_len = (size_t)(3 * (H + 32)) * 4;
    expect_invalid(&s, "hidden_states.shape[1]");
    s = good_spec(3); s.dtype = EPMOE__V1__DTYPE__DTYPE_UNSPECIFIED;
    expect_invalid(&s, "hidden_states.dtype");
    s = good_spec(3); s.dtype = 9;
    expect_invalid(&s, "hidden_states.dtype");
    s = good_spec(3); s.n_shape = 3;
    expect_invalid(&s, "hidden_states.shape");
    s = good_spec(3); s.data_len -= 4;
    expect_invalid(&s, "hidden_states.data");
    s = good_spec(3); s.dtype = EPMOE__V1__DTYPE__DTYPE_BF16; /* bytes still sized for fp32 */
    expect_invalid(&s, "hidden_states.data");
    s = good_spec(3); s.fill = NAN;
    expect_invalid(&s, "NaN");
    s = good_spec(3); s.fill = INFINITY;
    expect_invalid(&s, "Inf");
    s = good_spec(3); s.dtype = EPMOE__V1__DTYPE__DTYPE_FP16; s.fill = 1e6f; s.data_len = 3 * H * 2;
    expect_invalid(&s, "Inf"); /* overflows fp16 on the client: Inf on the wire */
    s = good_spec(0); s.data_len = 0; s.n_ids = 0;
    expect_invalid(&s, "hidden_states.shape[0]");
    s = good_spec(33); s.n_ids = 0; s.lb = 1;
    expect_invalid(&s, "max_request_tokens");
    s = good_spec(3); s.lb = N_LAYERS;
    expect_invalid(&s, "layer_begin");
    s = good_spec(3); s.lb = -1;
    expect_invalid(&s, "layer_begin");
    s = good_spec(3); s.lb = 2; s.le = 2;
    expect_invalid(&s, "layer_end");
    s = good_spec(3); s.le = N_LAYERS + 1;
    expect_invalid(&s, "layer_end");
    s = good_spec(3); s.n_ids = 0;
    expect_invalid(&s, "token_ids");
    s = good_spec(3); s.n_ids = 2;
    expect_invalid(&s, "token_ids");
    s = good_spec(3); s.id_value = VOCAB;
    expect_invalid(&s, "token_ids[0]");
    s = good_spec(3); s.id_value = -1;
    expect_invalid(&s, "token_ids[0]");
    char long_id[200];
    memset(long_id, 'a', sizeof long_id - 1);
    long_id[sizeof long_id - 1] = '\0';
    s = good_spec(3); s.request_id = long_id;
    expect_invalid(&s, "request_id");
    /* Not a message at all. */
    uint8_t junk[] = {0xff, 0xff, 0xff, 0xff};
    epmoe_serve_request *r = NULL;
    char msg[512];
    ck_assert_int_eq(epmoe_wire_decode_forward(junk, sizeof junk, &limits, &r, msg, sizeof msg),
                     EPMOE_RPC_INVALID_ARGUMENT);
    ck_assert_ptr_nonnull(strstr(msg, "ForwardRequest"));
}
END_TEST

START_TEST(test_wire_decodes_good_requests) {
    const int dtypes[3] = {EPMOE__V1__DTYPE__DTYPE_FP32, EPMOE__V1__DTYPE__DTYPE_BF16,
                           EPMOE__V1__DTYPE__DTYPE_FP16};
    for (int d = 0; d < 3; d++) {
        msg_spec s = good_spec(5);
        s.dtype = dtypes[d];
        s.data_len = (size_t)(5 * H) * (d == 0 ? 4 : 2);
        s.fill = -1.375f; /* exact in all three */
        size_t n;
        uint8_t *buf = pack_spec(&s, &n);
        epmoe_serve_request *r = NULL;
        char msg[512];
        ck_assert_int_eq(epmoe_wire_decode_forward(buf, n, &limits, &r, msg, sizeof msg), 0);
        free(buf);
        ck_assert_int_eq(r->n_tokens, 5);
        ck_assert_int_eq(r->layer_begin, 0);
        ck_assert_int_eq(r->layer_end, N_LAYERS); /* 0 resolved to all layers */
        ck_assert_int_eq(r->wire_dtype, dtypes[d]);
        ck_assert_str_eq(r->request_id, "rid");
        for (int i = 0; i < 5 * H; i++) ck_assert_float_eq(r->x[i], -1.375f);
        for (int i = 0; i < 5; i++) ck_assert_int_eq(r->token_ids[i], 5);
        epmoe_serve_request_free(r);
    }
    /* Past the hash layers, token ids may be left out. */
    msg_spec s = good_spec(2);
    s.n_ids = 0;
    s.lb = 1;
    s.le = 3;
    size_t n;
    uint8_t *buf = pack_spec(&s, &n);
    epmoe_serve_request *r = NULL;
    char msg[512];
    ck_assert_int_eq(epmoe_wire_decode_forward(buf, n, &limits, &r, msg, sizeof msg), 0);
    free(buf);
    ck_assert_ptr_null(r->token_ids);
    ck_assert_int_eq(r->layer_begin, 1);
    ck_assert_int_eq(r->layer_end, 3);
    epmoe_serve_request_free(r);
}
END_TEST

/* ---- metrics -------------------------------------------------------------------------------*/

START_TEST(test_metrics_text) {
    epmoe_metrics *m = NULL;
    ck_assert_int_eq(epmoe_metrics_create(2, 3, &m), EPMOE_OK);
    epmoe_metrics_count_request(m, EPMOE_METHOD_FORWARD, EPMOE_RPC_OK, 0.003);
    epmoe_metrics_count_request(m, EPMOE_METHOD_FORWARD, EPMOE_RPC_OK, 0.2);
    epmoe_metrics_count_request(m, EPMOE_METHOD_FORWARD, EPMOE_RPC_INVALID_ARGUMENT, 0.0001);
    epmoe_stage_times t = {0.001, 0.002, 0.003, 0.004, 0.005, 0.015};
    int64_t counts[3] = {4, 0, 7}; /* layer 1 only */
    epmoe_metrics_observe_batch(m, 2, 11, 0.02, &t, counts, 1, 2);
    epmoe_metrics_count_tokens(m, 9); /* rows delivered: not what a forward computed */
    epmoe_metrics_count_undelivered(m, EPMOE_METHOD_FORWARD, EPMOE_RPC_OK);
    epmoe_metrics_gauges g = {5, 6, 1, 0};
    size_t len = 0;
    char *text = epmoe_metrics_render(m, &g, &len);
    ck_assert_ptr_nonnull(text);
    ck_assert_uint_eq(strlen(text), len);
    const char *want[] = {
        "epmoe_requests_total{method=\"Forward\",code=\"OK\"} 2\n",
        "epmoe_requests_total{method=\"Forward\",code=\"INVALID_ARGUMENT\"} 1\n",
        "epmoe_request_seconds_bucket{method=\"Forward\",le=\"0.0025\"} 1\n",
        "epmoe_request_seconds_bucket{method=\"Forward\",le=\"0.005\"} 2\n",
        "epmoe_request_seconds_bucket{method=\"Forward\",le=\"+Inf\"} 3\n",
        "epmoe_request_seconds_count{method=\"Forward\"} 3\n",
        "epmoe_stage_seconds_count{stage=\"experts\"} 1\n",
        "epmoe_batch_tokens_bucket{le=\"16\"} 1\n",
        "epmoe_batch_tokens_bucket{le=\"8\"} 0\n",
        "epmoe_expert_tokens_total{layer=\"1\",expert=\"2\"} 7\n",
        "epmoe_expert_tokens_total{layer=\"0\",expert=\"0\"} 0\n",
        "epmoe_tokens_total 9\n",
        "epmoe_replies_undelivered_total{method=\"Forward\",code=\"OK\"} 1\n",
        "epmoe_engine_failed 0\n",
        "epmoe_queue_depth 5\n",
        "epmoe_inflight_requests 6\n",
        "epmoe_draining 1\n",
        "# TYPE epmoe_stage_seconds histogram\n",
    };
    for (size_t i = 0; i < sizeof want / sizeof want[0]; i++)
        ck_assert_msg(strstr(text, want[i]) != NULL, "missing: %s", want[i]);
    free(text);
    epmoe_metrics_free(m);
}
END_TEST

/* ---- batcher -------------------------------------------------------------------------------*/

typedef struct {
    pthread_mutex_t mu;
    int64_t answered, ok, wrong;
    int codes[EPMOE_RPC_CODE_COUNT];
} batch_log;

static batch_log blog;

static void batch_done(void *ctx, epmoe_serve_request *r, int code, const char *message) {
    (void)ctx;
    (void)message;
    pthread_mutex_lock(&blog.mu);
    blog.answered++;
    blog.codes[code]++;
    if (code == EPMOE_RPC_OK) {
        blog.ok++;
        for (int64_t t = 0; t < r->n_tokens; t++)
            for (int64_t h = 0; h < H; h++) {
                float want = expected_value(r->x[t * H + h], r->layer_begin, r->layer_end,
                                            r->token_ids, t);
                if (memcmp(&want, &r->out[t * H + h], 4) != 0) blog.wrong++;
            }
    }
    pthread_mutex_unlock(&blog.mu);
    epmoe_serve_request_free(r);
}

static epmoe_serve_request *make_request(epmoe_rng *rng, int64_t T, int64_t lb, int64_t le,
                                         int with_ids) {
    epmoe_serve_request *r = calloc(1, sizeof *r);
    r->n_tokens = T;
    r->layer_begin = lb;
    r->layer_end = le;
    r->x = malloc((size_t)(T * H) * sizeof(float));
    epmoe_fill_normal(rng, r->x, (size_t)(T * H), 1.0f);
    if (with_ids) {
        r->token_ids = malloc((size_t)T * sizeof(int32_t));
        for (int64_t t = 0; t < T; t++) r->token_ids[t] = (int32_t)epmoe_rng_below(rng, VOCAB);
    }
    r->enqueue_time = epmoe_seconds_now();
    r->deadline = INFINITY;
    return r;
}

static epmoe_batcher_options batcher_options(int64_t max_batch_tokens, int64_t max_queue,
                                             double delay) {
    epmoe_batcher_options o;
    memset(&o, 0, sizeof o);
    o.hidden_size = H;
    o.n_layers = N_LAYERS;
    o.n_routed_experts = E;
    o.max_batch_tokens = max_batch_tokens;
    o.max_queue_delay = delay;
    o.max_queue = max_queue;
    o.forward = engine_forward;
    o.done = batch_done;
    return o;
}

static void blog_reset(void) {
    pthread_mutex_lock(&blog.mu);
    blog.answered = blog.ok = blog.wrong = 0;
    memset(blog.codes, 0, sizeof blog.codes);
    pthread_mutex_unlock(&blog.mu);
}

START_TEST(test_batcher_batches_and_splits) {
    pthread_mutex_init(&blog.mu, NULL);
    blog_reset();
    engine_reset();
    epmoe_batcher_options o = batcher_options(40, 64, 0.0);
    epmoe_batcher *b = NULL;
    ck_assert_int_eq(epmoe_batcher_start(&o, &b), EPMOE_OK);
    epmoe_rng rng;
    epmoe_rng_seed(&rng, 11);
    /* Hold the engine on a first request, queue many behind it, then let go: the queue must be
     * drained in batches that respect the token budget and the layer ranges. */
    engine_gate(1);
    ck_assert_int_eq(epmoe_batcher_push(b, make_request(&rng, 3, 0, 4, 1)), EPMOE_OK);
    engine_wait_inside();
    int64_t pushed_tokens = 3;
    for (int i = 0; i < 40; i++) {
        int64_t T = 1 + (int64_t)epmoe_rng_below(&rng, 12);
        int64_t lb = i % 3 == 0 ? 1 : 0, le = i % 3 == 0 ? 3 : 4;
        ck_assert_int_eq(epmoe_batcher_push(b, make_request(&rng, T, lb, le, lb == 0)), EPMOE_OK);
        pushed_tokens += T;
    }
    ck_assert_int_eq(epmoe_batcher_depth(b), 40);
    engine_gate(0);
    epmoe_batcher_stop(b); /* computes everything queued */
    ck_assert_int_eq(blog.answered, 41);
    ck_assert_int_eq(blog.ok, 41);
    ck_assert_int_eq(blog.wrong, 0);
    ck_assert_int_eq(engine.rows, pushed_tokens);
    ck_assert_int_le(engine.max_batch_rows, 40);
    /* 41 requests in far fewer forwards: they were batched. */
    ck_assert_int_lt(engine.calls, 20);
}
END_TEST

START_TEST(test_batcher_queue_full_and_deadline) {
    pthread_mutex_init(&blog.mu, NULL);
    blog_reset();
    engine_reset();
    epmoe_batcher_options o = batcher_options(64, 3, 0.0);
    epmoe_batcher *b = NULL;
    ck_assert_int_eq(epmoe_batcher_start(&o, &b), EPMOE_OK);
    epmoe_rng rng;
    epmoe_rng_seed(&rng, 12);
    engine_gate(1);
    ck_assert_int_eq(epmoe_batcher_push(b, make_request(&rng, 2, 0, 4, 1)), EPMOE_OK);
    engine_wait_inside();
    epmoe_serve_request *expired = make_request(&rng, 5, 0, 4, 1);
    expired->deadline = epmoe_seconds_now() - 1.0;
    ck_assert_int_eq(epmoe_batcher_push(b, expired), EPMOE_OK);
    ck_assert_int_eq(epmoe_batcher_push(b, make_request(&rng, 4, 0, 4, 1)), EPMOE_OK);
    ck_assert_int_eq(epmoe_batcher_push(b, make_request(&rng, 1, 0, 4, 1)), EPMOE_OK);
    epmoe_serve_request *extra = make_request(&rng, 1, 0, 4, 1);
    ck_assert_int_eq(epmoe_batcher_push(b, extra), EPMOE_ERR_OOM); /* full: still ours */
    ck_assert_ptr_nonnull(strstr(epmoe_last_error(), "queue full"));
    epmoe_serve_request_free(extra);
    epmoe_serve_request *big = make_request(&rng, 65, 0, 4, 1);
    ck_assert_int_eq(epmoe_batcher_push(b, big), EPMOE_ERR_INVALID_ARG);
    epmoe_serve_request_free(big);
    engine_gate(0);
    epmoe_batcher_stop(b);
    ck_assert_int_eq(blog.answered, 4);
    ck_assert_int_eq(blog.codes[EPMOE_RPC_OK], 3);
    ck_assert_int_eq(blog.codes[EPMOE_RPC_DEADLINE_EXCEEDED], 1);
    ck_assert_int_eq(blog.wrong, 0);
    ck_assert_int_eq(engine.rows, 2 + 4 + 1); /* the expired request was not computed */
}
END_TEST

typedef struct {
    pthread_mutex_t mu;
    char messages[8][512];
    int fatal_calls;
    char fatal_message[512];
} message_log;

static message_log mlog = {PTHREAD_MUTEX_INITIALIZER, {{0}}, 0, ""};

/* Answers like batch_done, and keeps each request's message by its first value's index. */
static void batch_done_keep(void *ctx, epmoe_serve_request *r, int code, const char *message) {
    pthread_mutex_lock(&mlog.mu);
    int slot = (int)r->x[0] & 7; /* the test puts the request's number in x[0] */
    snprintf(mlog.messages[slot], sizeof mlog.messages[slot], "%s", message ? message : "");
    pthread_mutex_unlock(&mlog.mu);
    batch_done(ctx, r, code, message);
}

static void batch_fatal(void *ctx, epmoe_status st, const char *message) {
    (void)ctx;
    pthread_mutex_lock(&mlog.mu);
    mlog.fatal_calls++;
    snprintf(mlog.fatal_message, sizeof mlog.fatal_message, "%s: %s", epmoe_status_name(st),
             message);
    pthread_mutex_unlock(&mlog.mu);
}

/* One request's bad row fails only that request, naming its own row; the others of the batch
 * are answered with their exact rows (issue 24, defect 1). */
START_TEST(test_batcher_isolates_a_bad_request) {
    pthread_mutex_init(&blog.mu, NULL);
    blog_reset();
    engine_reset();
    epmoe_batcher_options o = batcher_options(64, 16, 0.0);
    o.done = batch_done_keep;
    epmoe_batcher *b = NULL;
    ck_assert_int_eq(epmoe_batcher_start(&o, &b), EPMOE_OK);
    epmoe_rng rng;
    epmoe_rng_seed(&rng, 13);
    engine_gate(1);
    ck_assert_int_eq(epmoe_batcher_push(b, make_request(&rng, 1, 0, 4, 1)), EPMOE_OK);
    engine_wait_inside(); /* the seven below queue up behind it and form one batch */
    int64_t calls_before = 0;
    for (int i = 0; i < 7; i++) {
        epmoe_serve_request *r = make_request(&rng, 5, 0, 4, 1);
        r->x[0] = (float)i; /* the request's number, for batch_done_keep */
        if (i == 4)
            for (int64_t h = 0; h < H; h++) r->x[3 * H + h] = 3.0e38f; /* its row 3 */
        ck_assert_int_eq(epmoe_batcher_push(b, r), EPMOE_OK);
    }
    calls_before = engine.calls;
    engine_gate(0);
    epmoe_batcher_stop(b);
    ck_assert_int_eq(blog.answered, 8);
    ck_assert_int_eq(blog.codes[EPMOE_RPC_OK], 7);
    ck_assert_int_eq(blog.codes[EPMOE_RPC_INVALID_ARGUMENT], 1);
    ck_assert_int_eq(blog.wrong, 0);
    ck_assert_msg(strstr(mlog.messages[4], "hidden_states row 3:") != NULL, "%s",
                  mlog.messages[4]);
    /* split by requests then rows: a handful of extra forwards, not one per row */
    ck_assert_int_le(engine.calls - calls_before, 1 + 2 * 3 + 3 + 1 + 1);
    (void)calls_before;
}
END_TEST

/* A lost rank fails the batch and the queue UNAVAILABLE, once, and refuses later pushes. */
START_TEST(test_batcher_lost_rank_is_fatal) {
    pthread_mutex_init(&blog.mu, NULL);
    blog_reset();
    engine_reset();
    mlog.fatal_calls = 0;
    epmoe_batcher_options o = batcher_options(8, 16, 0.0);
    o.fatal = batch_fatal;
    epmoe_batcher *b = NULL;
    ck_assert_int_eq(epmoe_batcher_start(&o, &b), EPMOE_OK);
    epmoe_rng rng;
    epmoe_rng_seed(&rng, 14);
    engine_gate(1);
    ck_assert_int_eq(epmoe_batcher_push(b, make_request(&rng, 2, 0, 4, 1)), EPMOE_OK);
    engine_wait_inside();
    for (int i = 0; i < 5; i++) /* 4 tokens each: two batches' worth */
        ck_assert_int_eq(epmoe_batcher_push(b, make_request(&rng, 4, 0, 4, 1)), EPMOE_OK);
    pthread_mutex_lock(&engine.mu);
    engine.lost = 1;
    pthread_mutex_unlock(&engine.mu);
    engine_gate(0);
    for (int i = 0; i < 20000 && blog.answered < 6; i++) usleep(1000);
    ck_assert_int_eq(blog.answered, 6);
    ck_assert_int_eq(blog.codes[EPMOE_RPC_UNAVAILABLE], 6);
    ck_assert_int_eq(mlog.fatal_calls, 1);
    ck_assert_ptr_nonnull(strstr(mlog.fatal_message, "rank 2"));
    ck_assert_int_eq(engine.calls, 1); /* the engine is not called again */
    epmoe_serve_request *late = make_request(&rng, 1, 0, 4, 1);
    ck_assert_int_eq(epmoe_batcher_push(b, late), EPMOE_ERR_PEER_LOST);
    ck_assert_ptr_nonnull(strstr(epmoe_last_error(), "rank 2"));
    epmoe_serve_request_free(late);
    epmoe_batcher_stop(b);
}
END_TEST

/* Waits up to `seconds` for `n` answers in all; returns the count reached. */
static int64_t answered_within(int64_t n, double seconds) {
    double until = epmoe_seconds_now() + seconds;
    for (;;) {
        pthread_mutex_lock(&blog.mu);
        int64_t answered = blog.answered;
        pthread_mutex_unlock(&blog.mu);
        if (answered >= n || epmoe_seconds_now() > until) return answered;
        usleep(1000);
    }
}

static int64_t engine_calls(void) {
    pthread_mutex_lock(&engine.mu);
    int64_t calls = engine.calls;
    pthread_mutex_unlock(&engine.mu);
    return calls;
}

/* Pushes a request of T tokens on layers [lb, le) whose arrival lies `age` seconds back. */
static void push_aged(epmoe_batcher *b, epmoe_rng *rng, int64_t T, int64_t lb, int64_t le,
                      double age) {
    epmoe_serve_request *r = make_request(rng, T, lb, le, lb == 0);
    r->enqueue_time -= age;
    ck_assert_int_eq(epmoe_batcher_push(b, r), EPMOE_OK);
}

/* Pushes one request that fills the budget alone (a batch of one request), waits for it. */
static void one_request_batch(epmoe_batcher *b, epmoe_rng *rng, int64_t answered_after) {
    push_aged(b, rng, 8, 0, 4, 0.0);
    ck_assert_int_eq(answered_within(answered_after, 60.0), answered_after);
}

/* The queue delay is paid only while the service is busy: a request that finds it idle runs at
 * once; after a batch of several requests the next batches of the same layer range wait for
 * mates, counted from the later of their arrival and the last answer, until the budget fills,
 * and so until four batches in a row held one request each.
 * The delay (an hour) is one no run reaches, so "ran" means "ran without waiting"; "did not run
 * within 0.2 s" can only miss a fault on a loaded machine, never fail a correct batcher. */
START_TEST(test_batcher_waits_for_mates_only_when_busy) {
    pthread_mutex_init(&blog.mu, NULL);
    blog_reset();
    engine_reset();
    epmoe_batcher_options o = batcher_options(8, 16, 3600.0);
    epmoe_batcher *b = NULL;
    ck_assert_int_eq(epmoe_batcher_start(&o, &b), EPMOE_OK);
    epmoe_rng rng;
    epmoe_rng_seed(&rng, 15);
    /* idle: runs at once */
    push_aged(b, &rng, 1, 0, 4, 0.0);
    ck_assert_int_eq(answered_within(1, 60.0), 1);
    /* two queued behind a held forward: after a one-request batch they run at once, together */
    engine_gate(1);
    push_aged(b, &rng, 1, 0, 4, 0.0);
    engine_wait_inside();
    push_aged(b, &rng, 2, 0, 4, 0.0);
    push_aged(b, &rng, 2, 0, 4, 0.0);
    engine_gate(0);
    ck_assert_int_eq(answered_within(4, 60.0), 4);
    ck_assert_int_eq(engine_calls(), 3);
    /* busy (the last batch held two): the next request waits for mates, counted from the last
     * answer although it arrived two hours "ago", until they fill the budget */
    push_aged(b, &rng, 1, 0, 4, 7200.0);
    ck_assert_int_eq(answered_within(5, 0.2), 4);
    ck_assert_int_eq(engine_calls(), 3);
    push_aged(b, &rng, 7, 0, 4, 0.0);
    ck_assert_int_eq(answered_within(6, 60.0), 6);
    ck_assert_int_eq(engine_calls(), 4);
    /* three one-request batches later, still busy: a request waits again */
    for (int i = 0; i < 3; i++) one_request_batch(b, &rng, 7 + i);
    push_aged(b, &rng, 1, 0, 4, 0.0);
    ck_assert_int_eq(answered_within(10, 0.2), 9);
    push_aged(b, &rng, 7, 0, 4, 0.0);
    ck_assert_int_eq(answered_within(11, 60.0), 11);
    ck_assert_int_eq(engine_calls(), 8);
    /* another layer range: its wait counts from its own arrival (two hours back), not from the
     * last answer, whose clients cannot join it */
    push_aged(b, &rng, 1, 1, 3, 7200.0);
    ck_assert_int_eq(answered_within(12, 60.0), 12);
    /* four one-request batches in a row: idle again, a lone request runs at once */
    for (int i = 0; i < 3; i++) one_request_batch(b, &rng, 13 + i);
    push_aged(b, &rng, 1, 0, 4, 0.0);
    ck_assert_int_eq(answered_within(16, 60.0), 16);
    ck_assert_int_eq(engine_calls(), 13);
    ck_assert_int_eq(blog.ok, 16);
    ck_assert_int_eq(blog.wrong, 0);
    /* busy again (two requests behind a held forward), then a request with a deadline: the
     * deadline, less the slack, ends its wait for mates (answered at all is the point: on a
     * loaded machine it may come back DEADLINE_EXCEEDED) */
    engine_gate(1);
    push_aged(b, &rng, 1, 0, 4, 0.0);
    engine_wait_inside();
    push_aged(b, &rng, 2, 0, 4, 0.0);
    push_aged(b, &rng, 2, 0, 4, 0.0);
    engine_gate(0);
    ck_assert_int_eq(answered_within(19, 60.0), 19);
    ck_assert_int_eq(engine_calls(), 15);
    epmoe_serve_request *r = make_request(&rng, 1, 0, 4, 1);
    r->deadline = epmoe_seconds_now() + EPMOE_RPC_DEADLINE_SLACK + 0.05;
    ck_assert_int_eq(epmoe_batcher_push(b, r), EPMOE_OK);
    ck_assert_int_eq(answered_within(20, 60.0), 20);
    epmoe_batcher_stop(b);

    /* wait_when_idle: even the first request of an idle service waits for the budget */
    blog_reset();
    engine_reset();
    o.wait_when_idle = 1;
    ck_assert_int_eq(epmoe_batcher_start(&o, &b), EPMOE_OK);
    push_aged(b, &rng, 3, 0, 4, 0.0);
    ck_assert_int_eq(answered_within(1, 0.2), 0);
    push_aged(b, &rng, 5, 0, 4, 0.0);
    ck_assert_int_eq(answered_within(2, 60.0), 2);
    ck_assert_int_eq(engine_calls(), 1);
    epmoe_batcher_stop(b);
    ck_assert_int_eq(blog.ok, 2);
    ck_assert_int_eq(blog.wrong, 0);
}
END_TEST

/* ---- the whole gRPC path -------------------------------------------------------------------*/

static epmoe_service *start_service_with(int64_t max_queue, int64_t delay_us, int metrics,
                                         int64_t max_message_bytes) {
    epmoe_service_options so;
    memset(&so, 0, sizeof so);
    epmoe_serve_config_defaults(&so.cfg);
    snprintf(so.cfg.listen, sizeof so.cfg.listen, "127.0.0.1:0");
    if (metrics) snprintf(so.cfg.metrics_listen, sizeof so.cfg.metrics_listen, "127.0.0.1:0");
    so.cfg.max_batch_tokens = 48;
    so.cfg.max_queue = max_queue;
    so.cfg.max_queue_delay_us = delay_us;
    so.cfg.max_message_bytes = max_message_bytes;
    so.cfg.drain_linger_ms = 0;
    snprintf(so.info.preset, sizeof so.info.preset, "unit");
    so.info.n_ranks = 1;
    so.info.n_layers = N_LAYERS;
    so.info.n_hash_layers = N_HASH;
    so.info.hidden_size = H;
    so.info.n_routed_experts = E;
    so.info.top_k = 2;
    so.info.experts_per_rank_min = so.info.experts_per_rank_max = E;
    so.info.max_tokens_per_forward = 64;
    so.vocab_size = VOCAB;
    so.forward = engine_forward;
    epmoe_service *s = NULL;
    epmoe_status st = epmoe_service_start(&so, &s);
    ck_assert_msg(st == EPMOE_OK, "%s", epmoe_last_error());
    return s;
}

static epmoe_service *start_service(int64_t max_queue, int64_t delay_us, int metrics) {
    return start_service_with(max_queue, delay_us, metrics, 1 << 20);
}

static epmoe_rpc_channel *connect_to(epmoe_service *s) {
    char target[64];
    snprintf(target, sizeof target, "127.0.0.1:%d", epmoe_service_port(s));
    epmoe_rpc_channel *ch = NULL;
    ck_assert_int_eq(epmoe_rpc_channel_open(target, 4 << 20, &ch), EPMOE_OK);
    return ch;
}

typedef struct {
    epmoe_rpc_channel *ch;
    int64_t T;
    epmoe_dtype dtype;
    double timeout;
    uint64_t seed;
    int layer_begin, layer_end, with_ids;
    int code;
    int rows_ok;
    char message[512];
} call_job;

/* One Forward with random rows that are exact in the dtype; checks the reply rows. */
static void *forward_job(void *arg) {
    call_job *j = arg;
    epmoe_rng rng;
    epmoe_rng_seed(&rng, j->seed);
    size_t n = (size_t)(j->T * H);
    float *x = malloc(n * sizeof(float));
    for (size_t i = 0; i < n; i++) x[i] = (float)((int)epmoe_rng_below(&rng, 64) - 32) / 8.0f;
    int32_t ids[64];
    for (int i = 0; i < 64; i++) ids[i] = (int32_t)epmoe_rng_below(&rng, VOCAB);
    void *wire = malloc(n * 4);
    ck_assert_int_eq(epmoe_convert_from_f32(x, n, j->dtype, wire), EPMOE_OK);
    char id[32];
    snprintf(id, sizeof id, "job-%llu", (unsigned long long)j->seed);
    epmoe_forward_args a = {id, j->T, H, j->dtype, wire, j->with_ids ? ids : NULL,
                            j->layer_begin, j->layer_end, j->timeout};
    epmoe_forward_reply r;
    epmoe_status st = epmoe_client_forward(j->ch, &a, &r);
    ck_assert_msg(st == EPMOE_OK, "%s", epmoe_last_error());
    j->code = r.code;
    snprintf(j->message, sizeof j->message, "%s", r.message);
    j->rows_ok = 0;
    if (r.code == EPMOE_RPC_OK) {
        int64_t le = j->layer_end ? j->layer_end : N_LAYERS;
        float *want32 = malloc(n * sizeof(float));
        for (int64_t t = 0; t < j->T; t++)
            for (int64_t h = 0; h < H; h++)
                want32[t * H + h] =
                    expected_value(x[t * H + h], j->layer_begin, le, j->with_ids ? ids : NULL, t);
        void *want = malloc(n * 4);
        ck_assert_int_eq(epmoe_convert_from_f32(want32, n, j->dtype, want), EPMOE_OK);
        j->rows_ok = r.n_tokens == j->T && r.hidden_size == H && r.dtype == j->dtype &&
                     strcmp(r.request_id, id) == 0 && r.layer_end == le &&
                     memcmp(r.hidden_states, want, n * epmoe_dtype_size(j->dtype)) == 0;
        free(want32);
        free(want);
    }
    epmoe_forward_reply_free(&r);
    free(wire);
    free(x);
    return NULL;
}

static call_job job(epmoe_rpc_channel *ch, int64_t T, epmoe_dtype dtype, uint64_t seed) {
    call_job j;
    memset(&j, 0, sizeof j);
    j.ch = ch;
    j.T = T;
    j.dtype = dtype;
    j.seed = seed;
    j.with_ids = 1;
    j.code = -1;
    return j;
}

START_TEST(test_grpc_info_health_forward) {
    engine_reset();
    epmoe_service *s = start_service(64, 500, 0);
    epmoe_rpc_channel *ch = connect_to(s);
    epmoe_info_reply info;
    ck_assert_int_eq(epmoe_client_info(ch, 10, &info), EPMOE_OK);
    ck_assert_int_eq(info.code, EPMOE_RPC_OK);
    ck_assert_str_eq(info.preset, "unit");
    ck_assert_int_eq(info.hidden_size, H);
    ck_assert_int_eq(info.n_layers, N_LAYERS);
    ck_assert_int_eq(info.max_batch_tokens, 48);
    ck_assert_int_eq(info.max_request_tokens, 48);
    int code = -1, serving = -1;
    ck_assert_int_eq(epmoe_client_health(ch, "", 10, &code, &serving), EPMOE_OK);
    ck_assert_int_eq(code, EPMOE_RPC_OK);
    ck_assert_int_eq(serving, 1);
    ck_assert_int_eq(epmoe_client_health(ch, "epmoe.v1.Moe", 10, &code, &serving), EPMOE_OK);
    ck_assert_int_eq(serving, 1);
    ck_assert_int_eq(epmoe_client_health(ch, "nope", 10, &code, &serving), EPMOE_OK);
    ck_assert_int_eq(code, EPMOE_RPC_NOT_FOUND);
    epmoe_rpc_result res;
    ck_assert_int_eq(epmoe_rpc_unary(ch, "/epmoe.v1.Moe/Nope", NULL, 0, 10, &res), EPMOE_OK);
    ck_assert_int_eq(res.code, EPMOE_RPC_UNIMPLEMENTED);
    ck_assert_int_eq(epmoe_rpc_unary(ch, "/grpc.health.v1.Health/Watch", NULL, 0, 10, &res),
                     EPMOE_OK);
    ck_assert_int_eq(res.code, EPMOE_RPC_UNIMPLEMENTED);

    /* Concurrent calls of mixed sizes, dtypes and ranges: every reply holds its own rows. */
    enum { JOBS = 48 };
    call_job jobs[JOBS];
    pthread_t th[JOBS];
    const epmoe_dtype dtypes[3] = {EPMOE_DTYPE_F32, EPMOE_DTYPE_BF16, EPMOE_DTYPE_F16};
    for (int i = 0; i < JOBS; i++) {
        jobs[i] = job(ch, 1 + i % 17, dtypes[i % 3], 100 + (uint64_t)i);
        if (i % 4 == 1) {
            jobs[i].layer_begin = 1;
            jobs[i].layer_end = 3;
            jobs[i].with_ids = 0;
        }
        pthread_create(&th[i], NULL, forward_job, &jobs[i]);
    }
    for (int i = 0; i < JOBS; i++) {
        pthread_join(th[i], NULL);
        ck_assert_msg(jobs[i].code == EPMOE_RPC_OK, "job %d: %d %s", i, jobs[i].code,
                      jobs[i].message);
        ck_assert_msg(jobs[i].rows_ok, "job %d: wrong rows", i);
    }
    /* Each bad request gets INVALID_ARGUMENT naming the field, and the server goes on. */
    call_job bad = job(ch, 49, EPMOE_DTYPE_F32, 7);
    forward_job(&bad);
    ck_assert_int_eq(bad.code, EPMOE_RPC_INVALID_ARGUMENT);
    ck_assert_ptr_nonnull(strstr(bad.message, "hidden_states.shape[0]"));
    bad = job(ch, 3, EPMOE_DTYPE_F32, 8);
    bad.with_ids = 0;
    forward_job(&bad);
    ck_assert_int_eq(bad.code, EPMOE_RPC_INVALID_ARGUMENT);
    ck_assert_ptr_nonnull(strstr(bad.message, "token_ids"));
    uint8_t junk[3] = {0xff, 0xff, 0xff};
    ck_assert_int_eq(epmoe_rpc_unary(ch, "/epmoe.v1.Moe/Forward", junk, 3, 10, &res), EPMOE_OK);
    ck_assert_int_eq(res.code, EPMOE_RPC_INVALID_ARGUMENT);
    call_job good = job(ch, 5, EPMOE_DTYPE_BF16, 9);
    forward_job(&good);
    ck_assert_int_eq(good.code, EPMOE_RPC_OK);
    ck_assert(good.rows_ok);

    epmoe_rpc_channel_close(ch);
    epmoe_service_drain(s);
}
END_TEST

START_TEST(test_grpc_max_message_size) {
    engine_reset();
    epmoe_service *s = start_service(64, 0, 0);
    epmoe_rpc_channel *ch = connect_to(s);
    uint8_t *big = calloc(2 << 20, 1); /* over the server's 1 MiB limit */
    epmoe_rpc_result res;
    ck_assert_int_eq(epmoe_rpc_unary(ch, "/epmoe.v1.Moe/Forward", big, 2 << 20, 10, &res),
                     EPMOE_OK);
    ck_assert_int_eq(res.code, EPMOE_RPC_RESOURCE_EXHAUSTED);
    free(big);
    call_job good = job(ch, 4, EPMOE_DTYPE_F32, 10);
    forward_job(&good);
    ck_assert_int_eq(good.code, EPMOE_RPC_OK);
    epmoe_rpc_channel_close(ch);
    epmoe_service_drain(s);
}
END_TEST

static void *drain_thread(void *s) {
    epmoe_service_drain(s);
    return NULL;
}

static void wait_depth(epmoe_service *s, int64_t depth) {
    /* Bounded: the calls are on their way over loopback. */
    for (int i = 0; i < 20000 && epmoe_service_queue_depth(s) != depth; i++) usleep(1000);
    ck_assert_int_eq(epmoe_service_queue_depth(s), depth);
}

START_TEST(test_grpc_queue_full_deadline_and_drain) {
    engine_reset();
    epmoe_service *s = start_service(2, 0, 1);
    epmoe_rpc_channel *ch = connect_to(s);
    engine_gate(1);
    /* A: in the engine, held at the gate. */
    call_job a = job(ch, 3, EPMOE_DTYPE_F32, 20);
    pthread_t ta, tb, tc;
    pthread_create(&ta, NULL, forward_job, &a);
    engine_wait_inside();
    /* B: queued with a deadline that passes while the engine is held: never computed. */
    call_job b = job(ch, 6, EPMOE_DTYPE_F32, 21);
    b.timeout = 0.3;
    pthread_create(&tb, NULL, forward_job, &b);
    wait_depth(s, 1);
    /* C: queued, fills the queue (max_queue 2). */
    call_job c = job(ch, 5, EPMOE_DTYPE_F16, 22);
    pthread_create(&tc, NULL, forward_job, &c);
    wait_depth(s, 2);
    /* D: refused at once. */
    call_job d = job(ch, 2, EPMOE_DTYPE_F32, 23);
    forward_job(&d);
    ck_assert_int_eq(d.code, EPMOE_RPC_RESOURCE_EXHAUSTED);
    ck_assert_ptr_nonnull(strstr(d.message, "queue full"));
    pthread_join(tb, NULL);
    ck_assert_int_eq(b.code, EPMOE_RPC_DEADLINE_EXCEEDED);

    /* Drain while A runs and C waits: health turns NOT_SERVING, new calls UNAVAILABLE, A and C
     * are answered, drain returns. */
    pthread_t drainer;
    pthread_create(&drainer, NULL, drain_thread, s);
    int code = -1, serving = 1;
    for (int i = 0; i < 20000 && serving != 2; i++) {
        ck_assert_int_eq(epmoe_client_health(ch, "", 10, &code, &serving), EPMOE_OK);
        if (serving != 2) usleep(1000);
    }
    ck_assert_int_eq(serving, 2);
    call_job e = job(ch, 2, EPMOE_DTYPE_F32, 24);
    forward_job(&e);
    ck_assert_int_eq(e.code, EPMOE_RPC_UNAVAILABLE);
    engine_gate(0);
    pthread_join(ta, NULL);
    pthread_join(tc, NULL);
    pthread_join(drainer, NULL);
    ck_assert_int_eq(a.code, EPMOE_RPC_OK);
    ck_assert(a.rows_ok);
    ck_assert_int_eq(c.code, EPMOE_RPC_OK);
    ck_assert(c.rows_ok);
    ck_assert_int_eq(engine.rows, 3 + 5); /* B was dropped before computing */
    /* After the drain the port is closed. */
    call_job f = job(ch, 2, EPMOE_DTYPE_F32, 25);
    f.timeout = 5;
    forward_job(&f);
    ck_assert_int_eq(f.code, EPMOE_RPC_UNAVAILABLE);
    epmoe_rpc_channel_close(ch);
}
END_TEST

/* The counters say what the clients got (issue 24, defect 6): a deadline that passes in the
 * queue is DEADLINE_EXCEEDED, not CANCELLED; a result computed for a caller that has gone is
 * neither OK nor counted in epmoe_tokens_total; a reply that cannot be sent is not OK. */
START_TEST(test_grpc_metrics_count_what_happened) {
    engine_reset();
    /* Requests of this size get responses just over the limit (the response adds timings). */
    const int64_t T_BIG = 12;
    call_job probe = job(NULL, T_BIG, EPMOE_DTYPE_F32, 40);
    probe.with_ids = 0;
    probe.layer_begin = 1;
    probe.layer_end = 3;
    size_t request_bytes = 0;
    {
        float *x = calloc((size_t)(T_BIG * H), sizeof(float));
        epmoe_forward_args a = {"job-40", T_BIG, H, EPMOE_DTYPE_F32, x, NULL, 1, 3, 0};
        uint8_t *b = NULL;
        ck_assert_int_eq(epmoe_client_encode_forward(&a, &b, &request_bytes), EPMOE_OK);
        free(b);
        free(x);
    }
    epmoe_service *s = start_service_with(8, 0, 1, (int64_t)request_bytes + 4);
    epmoe_rpc_channel *ch = connect_to(s);
    const int mport = epmoe_service_metrics_port(s);

    /* A in the engine and B in the queue, both with deadlines that pass while the engine is
     * held: the clients get DEADLINE_EXCEEDED; A is computed (it was already running), but its
     * reply can no longer be delivered. */
    engine_gate(1);
    call_job a = job(ch, 3, EPMOE_DTYPE_F32, 41), b = job(ch, 4, EPMOE_DTYPE_F32, 42);
    a.timeout = b.timeout = 1.0; /* long enough for B to be queued on a loaded machine */
    pthread_t ta, tb;
    pthread_create(&ta, NULL, forward_job, &a);
    engine_wait_inside();
    pthread_create(&tb, NULL, forward_job, &b);
    wait_depth(s, 1);
    pthread_join(ta, NULL);
    pthread_join(tb, NULL);
    ck_assert_int_eq(a.code, EPMOE_RPC_DEADLINE_EXCEEDED);
    ck_assert_int_eq(b.code, EPMOE_RPC_DEADLINE_EXCEEDED);
    /* The clients' cancellations travel on this connection; a call answered on it afterwards
     * means the server has read them. Otherwise A's result could still be sent before the
     * server learns its client is gone (a race no server can see: counted OK). */
    int hcode = -1, serving = -1;
    ck_assert_int_eq(epmoe_client_health(ch, "", 10, &hcode, &serving), EPMOE_OK);
    engine_gate(0);

    /* C: its response would exceed max_message_bytes. */
    probe.ch = ch;
    forward_job(&probe);
    ck_assert_msg(probe.code == EPMOE_RPC_RESOURCE_EXHAUSTED, "%d %s", probe.code, probe.message);
    ck_assert_ptr_nonnull(strstr(probe.message, "max_message_bytes"));
    /* D: fine. */
    call_job d = job(ch, 5, EPMOE_DTYPE_F32, 43);
    forward_job(&d);
    ck_assert_int_eq(d.code, EPMOE_RPC_OK);
    ck_assert(d.rows_ok);

    const char *series[] = {
        "epmoe_requests_total{method=\"Forward\",code=\"OK\"} ",
        "epmoe_requests_total{method=\"Forward\",code=\"DEADLINE_EXCEEDED\"} ",
        "epmoe_requests_total{method=\"Forward\",code=\"CANCELLED\"} ",
        "epmoe_requests_total{method=\"Forward\",code=\"RESOURCE_EXHAUSTED\"} ",
        "epmoe_tokens_total "};
    const double want[] = {1, 2, 0, 1, 5};
    char *m = test_wait_metrics(mport, series, want, 5, 30);
    ck_assert_ptr_nonnull(m);
    for (const char *line = m; line && *line; line = strchr(line, '\n') ? strchr(line, '\n') + 1 : NULL)
        if (strncmp(line, "epmoe_requests_total", 20) == 0 || strncmp(line, "epmoe_replies", 13) == 0 ||
            strncmp(line, "epmoe_tokens_total", 18) == 0)
            printf("%.*s\n", (int)strcspn(line, "\n"), line);
    for (int i = 0; i < 5; i++) {
        double v = test_metric_value(m, series[i]);
        ck_assert_msg((v < 0 ? 0 : v) == want[i], "%s= %g, expected %g", series[i], v, want[i]);
    }
    /* A's computed result never reached its client */
    ck_assert_ptr_nonnull(strstr(m, "epmoe_replies_undelivered_total{method=\"Forward\""));
    free(m);
    epmoe_rpc_channel_close(ch);
    epmoe_service_drain(s);
}
END_TEST

typedef struct {
    int port;
    atomic_int sent;
    int cut_by_server; /* the server closed the connection before we stopped */
} trickler;

/* A slow scraper: sends "GET /metrics HTTP/1.0\r\n" one byte every 100 ms, never finishing
 * the request, for up to 15 s. */
static void *trickle_main(void *arg) {
    trickler *t = arg;
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_port = htons((uint16_t)t->port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ck_assert_int_eq(connect(fd, (struct sockaddr *)&a, sizeof a), 0);
    const char *req = "GET /metrics HTTP/1.0\r\n";
    for (int i = 0; i < 150; i++) {
        if (send(fd, req + (size_t)i % strlen(req), 1, MSG_NOSIGNAL) != 1) {
            t->cut_by_server = 1;
            break;
        }
        atomic_fetch_add(&t->sent, 1);
        char c;
        if (recv(fd, &c, 1, MSG_DONTWAIT) == 0) { /* closed by the server */
            t->cut_by_server = 1;
            break;
        }
        usleep(100000);
    }
    close(fd);
    return NULL;
}

/* A scraper that trickles its request must not hold up the others (issue 24, defect 8): they
 * are answered while it is still connected, and the server cuts it off after its deadline. */
START_TEST(test_metrics_slow_client_does_not_block_scrapes) {
    engine_reset();
    epmoe_service *s = start_service(8, 0, 1);
    trickler t = {epmoe_service_metrics_port(s), 0, 0};
    pthread_t th;
    pthread_create(&th, NULL, trickle_main, &t);
    while (atomic_load(&t.sent) < 3) usleep(10000);
    for (int i = 0; i < 3; i++) { /* test_fetch_metrics gives up after 10 s */
        char *m = test_fetch_metrics(t.port);
        ck_assert_msg(m != NULL, "scrape %d blocked behind the slow client", i);
        ck_assert_ptr_nonnull(strstr(m, "epmoe_requests_total"));
        free(m);
    }
    pthread_join(th, NULL);
    ck_assert_msg(t.cut_by_server, "the slow client was never cut off");
    epmoe_service_drain(s);
}
END_TEST

static Suite *service_suite(void) {
    Suite *s = suite_create("service_units");
    TCase *tc = tcase_create("units");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, test_serve_config);
    tcase_add_test(tc, test_user_message_strips_source_locations);
    tcase_add_test(tc, test_wire_rejects_each_bad_field);
    tcase_add_test(tc, test_wire_decodes_good_requests);
    tcase_add_test(tc, test_metrics_text);
    tcase_add_test(tc, test_batcher_batches_and_splits);
    tcase_add_test(tc, test_batcher_queue_full_and_deadline);
    tcase_add_test(tc, test_batcher_isolates_a_bad_request);
    tcase_add_test(tc, test_batcher_lost_rank_is_fatal);
    tcase_add_test(tc, test_batcher_waits_for_mates_only_when_busy);
    tcase_add_test(tc, test_grpc_info_health_forward);
    tcase_add_test(tc, test_grpc_max_message_size);
    tcase_add_test(tc, test_grpc_queue_full_deadline_and_drain);
    tcase_add_test(tc, test_grpc_metrics_count_what_happened);
    tcase_add_test(tc, test_metrics_slow_client_does_not_block_scrapes);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) {
    SRunner *sr = srunner_create(service_suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? 1 : 0;
}
