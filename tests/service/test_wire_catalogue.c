/* The bad-input catalogue of the wire surface (issue 24): one table, each row a request that
 * epmoe-serve must refuse with an exact gRPC status and a message naming the field, sent to the
 * real server (2 ranks, tiny checkpoint) over gRPC; after every case a good request must still
 * be answered, bit-identical to `epmoe-run`. Messages must carry no source locations. Then a
 * valid non-ASCII request id must come back byte for byte. */
#include <check.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#include "common/tensor.h"
#include "coordinator/service/client.h"
#include "coordinator/service/grpc_adapter.h"
#include "epmoe.pb-c.h"
#include "grpc/health/v1/health.pb-c.h"
#include "service_test_util.h"

enum { MAX_REQUEST_TOKENS = 64, MAX_MESSAGE = 1 << 20, N_LAYERS = 4 };

typedef enum { DT_FP32 = 0, DT_BF16, DT_FP16, DT_UNSPECIFIED, DT_BOGUS } dtype_kind;
typedef enum { FILL_NONE = 0, FILL_NAN, FILL_INF, FILL_HUGE } fill_kind;
typedef enum { IDS_GOOD = 0, IDS_NONE, IDS_SHORT, IDS_VOCAB, IDS_NEGATIVE } ids_kind;
typedef enum {
    SPECIAL_NONE = 0,
    SPECIAL_JUNK,          /* bytes that are no protobuf message */
    SPECIAL_EMPTY,         /* a 0-byte message: every field missing */
    SPECIAL_TRUNCATED,     /* the first half of a good message */
    SPECIAL_NO_HIDDEN,     /* token ids, no hidden_states */
    SPECIAL_OVERSIZE,      /* more than max_message_bytes */
    SPECIAL_DEADLINE,      /* a deadline that has passed when the call starts */
    SPECIAL_METHOD,        /* a method that does not exist */
    SPECIAL_HEALTH,        /* Health/Check of an unknown service */
    SPECIAL_INFO_JUNK,     /* Info with bytes that are no InfoRequest */
} special_kind;

typedef struct {
    const char *name;
    int64_t rows;            /* rows of data sent; 0: 4 */
    int has_shape0;
    int64_t shape0;          /* shape[0] declared when has_shape0, else rows */
    int n_shape;             /* 0: 2 */
    int64_t hidden_delta;    /* shape[1] = hidden_size + this; the data sized to match */
    dtype_kind dtype;
    int data_as_fp32;        /* bytes sized as fp32 whatever the dtype says */
    int64_t data_delta;      /* bytes added (or removed) after the right amount */
    fill_kind fill;          /* row 1 gets it */
    ids_kind ids;
    int64_t lb, le;          /* layer range; 0, 0: all */
    const char *raw_id;      /* request_id bytes as sent (raw_id_len of them) */
    size_t raw_id_len;
    special_kind special;
    int expect;              /* gRPC status */
    const char *field;       /* the message must contain this (case-insensitive) */
} wire_case;

static const wire_case cases[] = {
    {.name = "dtype unspecified", .dtype = DT_UNSPECIFIED, .data_as_fp32 = 1,
     .expect = EPMOE_RPC_INVALID_ARGUMENT, .field = "hidden_states.dtype"},
    {.name = "dtype unknown (7)", .dtype = DT_BOGUS, .data_as_fp32 = 1,
     .expect = EPMOE_RPC_INVALID_ARGUMENT, .field = "hidden_states.dtype"},
    {.name = "shape of 1 dimension", .n_shape = 1, .expect = EPMOE_RPC_INVALID_ARGUMENT,
     .field = "hidden_states.shape"},
    {.name = "shape of 3 dimensions", .n_shape = 3, .expect = EPMOE_RPC_INVALID_ARGUMENT,
     .field = "hidden_states.shape"},
    {.name = "wrong hidden size", .hidden_delta = 32, .expect = EPMOE_RPC_INVALID_ARGUMENT,
     .field = "hidden_states.shape[1]"},
    {.name = "empty tensor (0 rows)", .rows = -1, .has_shape0 = 1, .shape0 = 0, .ids = IDS_NONE,
     .lb = 1, .expect = EPMOE_RPC_INVALID_ARGUMENT, .field = "hidden_states.shape[0]"},
    {.name = "negative row count", .has_shape0 = 1, .shape0 = -4,
     .expect = EPMOE_RPC_INVALID_ARGUMENT, .field = "hidden_states.shape[0]"},
    {.name = "more rows than max_request_tokens", .rows = MAX_REQUEST_TOKENS + 1,
     .expect = EPMOE_RPC_INVALID_ARGUMENT, .field = "max_request_tokens"},
    {.name = "data 4 bytes short", .data_delta = -4, .expect = EPMOE_RPC_INVALID_ARGUMENT,
     .field = "hidden_states.data"},
    {.name = "data 4 bytes long", .data_delta = 4, .expect = EPMOE_RPC_INVALID_ARGUMENT,
     .field = "hidden_states.data"},
    {.name = "bf16 declared, fp32 bytes", .dtype = DT_BF16, .data_as_fp32 = 1,
     .expect = EPMOE_RPC_INVALID_ARGUMENT, .field = "hidden_states.data"},
    {.name = "hidden_states missing", .special = SPECIAL_NO_HIDDEN,
     .expect = EPMOE_RPC_INVALID_ARGUMENT, .field = "hidden_states"},
    {.name = "NaN in fp32", .fill = FILL_NAN, .expect = EPMOE_RPC_INVALID_ARGUMENT,
     .field = "hidden_states.data: element [1, 5] is NaN"},
    {.name = "Inf in fp32", .fill = FILL_INF, .expect = EPMOE_RPC_INVALID_ARGUMENT,
     .field = "hidden_states.data: element [1, 5] is Inf"},
    {.name = "NaN in bf16", .dtype = DT_BF16, .fill = FILL_NAN,
     .expect = EPMOE_RPC_INVALID_ARGUMENT, .field = "hidden_states.data: element [1, 5] is NaN"},
    {.name = "Inf in fp16", .dtype = DT_FP16, .fill = FILL_INF,
     .expect = EPMOE_RPC_INVALID_ARGUMENT, .field = "hidden_states.data: element [1, 5] is Inf"},
    {.name = "huge finite fp32 row, scored layers 1:3", .fill = FILL_HUGE, .ids = IDS_NONE,
     .lb = 1, .le = 3, .expect = EPMOE_RPC_INVALID_ARGUMENT, .field = "hidden_states row 1:"},
    {.name = "huge finite bf16 row, all layers", .dtype = DT_BF16, .fill = FILL_HUGE,
     .expect = EPMOE_RPC_INVALID_ARGUMENT, .field = "hidden_states row 1:"},
    {.name = "layer_begin negative", .lb = -1, .expect = EPMOE_RPC_INVALID_ARGUMENT,
     .field = "layer_begin"},
    {.name = "layer_begin = n_layers", .lb = N_LAYERS, .ids = IDS_NONE,
     .expect = EPMOE_RPC_INVALID_ARGUMENT, .field = "layer_begin"},
    {.name = "layer_end beyond the last layer", .le = N_LAYERS + 1,
     .expect = EPMOE_RPC_INVALID_ARGUMENT, .field = "layer_end"},
    {.name = "empty layer range", .lb = 2, .le = 2, .ids = IDS_NONE,
     .expect = EPMOE_RPC_INVALID_ARGUMENT, .field = "layer_end"},
    {.name = "reversed layer range", .lb = 3, .le = 1, .ids = IDS_NONE,
     .expect = EPMOE_RPC_INVALID_ARGUMENT, .field = "layer_end"},
    {.name = "token ids missing, hash layer 0 in range", .ids = IDS_NONE,
     .expect = EPMOE_RPC_INVALID_ARGUMENT, .field = "token_ids: missing"},
    {.name = "fewer token ids than rows", .ids = IDS_SHORT, .expect = EPMOE_RPC_INVALID_ARGUMENT,
     .field = "token_ids"},
    {.name = "token id = vocab_size", .ids = IDS_VOCAB, .expect = EPMOE_RPC_INVALID_ARGUMENT,
     .field = "token_ids[0]"},
    {.name = "token id negative", .ids = IDS_NEGATIVE, .expect = EPMOE_RPC_INVALID_ARGUMENT,
     .field = "token_ids[0]"},
    {.name = "request_id invalid UTF-8 (0xff)", .raw_id = "ab\xff", .raw_id_len = 3,
     .expect = EPMOE_RPC_INVALID_ARGUMENT, .field = "request_id: byte 2"},
    {.name = "request_id with a NUL byte", .raw_id = "ab\0cd", .raw_id_len = 5,
     .expect = EPMOE_RPC_INVALID_ARGUMENT, .field = "request_id: byte 2"},
    {.name = "request_id overlong UTF-8 (C0 80)", .raw_id = "\xc0\x80", .raw_id_len = 2,
     .expect = EPMOE_RPC_INVALID_ARGUMENT, .field = "request_id: byte 0"},
    {.name = "request_id UTF-16 surrogate (ED A0 80)", .raw_id = "x\xed\xa0\x80", .raw_id_len = 4,
     .expect = EPMOE_RPC_INVALID_ARGUMENT, .field = "request_id: byte 1"},
    {.name = "request_id UTF-8 cut short (E2 82)", .raw_id = "\xe2\x82", .raw_id_len = 2,
     .expect = EPMOE_RPC_INVALID_ARGUMENT, .field = "request_id: byte 0"},
    {.name = "request_id of 129 bytes",
     .raw_id = "0123456789012345678901234567890123456789012345678901234567890123"
               "45678901234567890123456789012345678901234567890123456789012345678",
     .raw_id_len = 129, .expect = EPMOE_RPC_INVALID_ARGUMENT, .field = "request_id: 129 bytes"},
    {.name = "not a protobuf message", .special = SPECIAL_JUNK,
     .expect = EPMOE_RPC_INVALID_ARGUMENT, .field = "ForwardRequest"},
    {.name = "a message cut in half", .special = SPECIAL_TRUNCATED,
     .expect = EPMOE_RPC_INVALID_ARGUMENT, .field = "ForwardRequest"},
    {.name = "an empty message", .special = SPECIAL_EMPTY, .expect = EPMOE_RPC_INVALID_ARGUMENT,
     .field = "hidden_states: missing"},
    {.name = "message over max_message_bytes", .special = SPECIAL_OVERSIZE,
     .expect = EPMOE_RPC_RESOURCE_EXHAUSTED, .field = "larger than max"},
    {.name = "deadline already passed", .special = SPECIAL_DEADLINE,
     .expect = EPMOE_RPC_DEADLINE_EXCEEDED, .field = "deadline"},
    {.name = "unknown method", .special = SPECIAL_METHOD, .expect = EPMOE_RPC_UNIMPLEMENTED,
     .field = "unknown method '/epmoe.v1.Moe/Nope'"},
    {.name = "health of an unknown service", .special = SPECIAL_HEALTH,
     .expect = EPMOE_RPC_NOT_FOUND, .field = "service: unknown service 'nope'"},
    {.name = "Info with junk", .special = SPECIAL_INFO_JUNK, .expect = EPMOE_RPC_INVALID_ARGUMENT,
     .field = "InfoRequest"},
};

enum { N_CASES = sizeof cases / sizeof cases[0] };

static int wire_dtype(dtype_kind d) {
    switch (d) {
    case DT_FP32: return EPMOE__V1__DTYPE__DTYPE_FP32;
    case DT_BF16: return EPMOE__V1__DTYPE__DTYPE_BF16;
    case DT_FP16: return EPMOE__V1__DTYPE__DTYPE_FP16;
    case DT_UNSPECIFIED: return EPMOE__V1__DTYPE__DTYPE_UNSPECIFIED;
    default: return 7;
    }
}

/* The message bytes of case c (malloc'd). */
static uint8_t *build(const wire_case *c, const test_pool *p, size_t *n) {
    if (c->special == SPECIAL_JUNK) {
        *n = 4;
        return (uint8_t *)strdup("\xff\xff\xff\xff");
    }
    if (c->special == SPECIAL_EMPTY) {
        *n = 0;
        return malloc(1);
    }
    if (c->special == SPECIAL_OVERSIZE) {
        *n = 2 * MAX_MESSAGE;
        return calloc(*n, 1);
    }
    const int64_t T = c->rows < 0 ? 0 : c->rows ? c->rows : 4;
    const int64_t H = p->H + c->hidden_delta;
    const int real_dtype = c->dtype == DT_BF16 || c->dtype == DT_FP16;
    const epmoe_dtype dt = c->data_as_fp32 || !real_dtype ? EPMOE_DTYPE_F32
                           : c->dtype == DT_BF16          ? EPMOE_DTYPE_BF16
                                                          : EPMOE_DTYPE_F16;
    float *x = calloc((size_t)(T * H) + 1, sizeof(float));
    for (int64_t t = 0; t < T; t++)
        memcpy(x + t * H, p->x + (t % TEST_POOL) * p->H,
               (size_t)(H < p->H ? H : p->H) * sizeof(float));
    if (c->fill == FILL_NAN) x[1 * H + 5] = NAN;
    if (c->fill == FILL_INF) x[1 * H + 5] = INFINITY;
    if (c->fill == FILL_HUGE)
        for (int64_t h = 0; h < H; h++) x[1 * H + h] = 3.0e38f;
    size_t data_len = (size_t)(T * H) * epmoe_dtype_size(dt);
    uint8_t *data = calloc(data_len + 64, 1);
    ck_assert_int_eq(epmoe_convert_from_f32(x, (size_t)(T * H), dt, data), EPMOE_OK);
    data_len = (size_t)((int64_t)data_len + c->data_delta);
    int32_t ids[MAX_REQUEST_TOKENS + 8];
    size_t n_ids = c->ids == IDS_NONE ? 0 : c->ids == IDS_SHORT ? (size_t)T - 1 : (size_t)T;
    for (int64_t t = 0; t < T; t++) ids[t] = p->ids[t % TEST_POOL];
    if (c->ids == IDS_VOCAB) ids[0] = (int32_t)p->vocab;
    if (c->ids == IDS_NEGATIVE) ids[0] = -1;

    const int64_t shape0 = c->has_shape0 ? c->shape0 : T;
    int64_t shape[3] = {shape0, H, 1};
    int64_t flat[1] = {shape0 * H};
    Epmoe__V1__Tensor t = EPMOE__V1__TENSOR__INIT;
    t.n_shape = c->n_shape ? (size_t)c->n_shape : 2;
    t.shape = c->n_shape == 1 ? flat : shape;
    t.dtype = (Epmoe__V1__DType)wire_dtype(c->dtype);
    t.data.len = data_len;
    t.data.data = data;
    Epmoe__V1__ForwardRequest m = EPMOE__V1__FORWARD_REQUEST__INIT;
    m.request_id = (char *)(c->raw_id ? "" : "catalogue");
    m.hidden_states = c->special == SPECIAL_NO_HIDDEN ? NULL : &t;
    m.n_token_ids = n_ids;
    m.token_ids = ids;
    m.layer_begin = c->lb;
    m.layer_end = c->le;
    size_t len = epmoe__v1__forward_request__get_packed_size(&m);
    uint8_t *buf = malloc(len + c->raw_id_len + 16);
    epmoe__v1__forward_request__pack(&m, buf);
    if (c->raw_id) { /* field 1 (request_id), length-delimited, as raw bytes: last one wins */
        buf[len++] = 0x0a;
        for (size_t v = c->raw_id_len; ; v >>= 7) { /* base-128 varint */
            buf[len++] = (uint8_t)((v & 0x7f) | (v >= 0x80 ? 0x80 : 0));
            if (v < 0x80) break;
        }
        memcpy(buf + len, c->raw_id, c->raw_id_len);
        len += c->raw_id_len;
    }
    if (c->special == SPECIAL_TRUNCATED) len /= 2;
    free(data);
    free(x);
    *n = len;
    return buf;
}

/* A good call: 4 pool rows through every layer, bit-identical to epmoe-run. */
static void expect_good(epmoe_rpc_channel *ch, const test_pool *p, const char *after) {
    epmoe_forward_args a = {"good", 4, p->H, EPMOE_DTYPE_F32, p->x, p->ids, 0, 0, 120};
    epmoe_forward_reply r;
    ck_assert_int_eq(epmoe_client_forward(ch, &a, &r), EPMOE_OK);
    ck_assert_msg(r.code == EPMOE_RPC_OK, "after '%s': good call got %d %s", after, r.code,
                  r.message);
    ck_assert_msg(memcmp(r.hidden_states, p->ref_all, (size_t)(4 * p->H) * sizeof(float)) == 0,
                  "after '%s': the good call's rows differ from epmoe-run", after);
    epmoe_forward_reply_free(&r);
}

START_TEST(test_wire_catalogue) {
    const test_pool *p = test_pool_get();
    test_server srv;
    char max_msg[32], max_tok[32];
    snprintf(max_msg, sizeof max_msg, "%d", MAX_MESSAGE);
    snprintf(max_tok, sizeof max_tok, "%d", MAX_REQUEST_TOKENS);
    const char *extra[] = {"--max-message-bytes", max_msg, "--max-request-tokens", max_tok,
                           "--max-queue-delay-us", "0", "--log-level", "2", NULL};
    test_server_start(&srv, 2, p->checkpoint, extra, 300);
    epmoe_rpc_channel *ch = NULL;
    ck_assert_int_eq(epmoe_rpc_channel_open(srv.target, 64 << 20, &ch), EPMOE_OK);
    expect_good(ch, p, "start");

    ck_assert_int_ge(N_CASES, 25);
    for (int i = 0; i < N_CASES; i++) {
        const wire_case *c = &cases[i];
        size_t n = 0;
        uint8_t *bytes = NULL;
        const char *method = "/epmoe.v1.Moe/Forward";
        double timeout = 120;
        if (c->special == SPECIAL_METHOD) {
            method = "/epmoe.v1.Moe/Nope";
        } else if (c->special == SPECIAL_INFO_JUNK) {
            method = "/epmoe.v1.Moe/Info";
            bytes = (uint8_t *)strdup("\xff\xff\xff");
            n = 3;
        } else if (c->special == SPECIAL_HEALTH) {
            method = "/grpc.health.v1.Health/Check";
            Grpc__Health__V1__HealthCheckRequest h = GRPC__HEALTH__V1__HEALTH_CHECK_REQUEST__INIT;
            h.service = (char *)"nope";
            n = grpc__health__v1__health_check_request__get_packed_size(&h);
            bytes = malloc(n);
            grpc__health__v1__health_check_request__pack(&h, bytes);
        } else if (c->special == SPECIAL_DEADLINE) {
            timeout = 1e-6;
        }
        if (!bytes) bytes = build(c, p, &n);
        epmoe_rpc_result res;
        ck_assert_int_eq(epmoe_rpc_unary(ch, method, bytes, n, timeout, &res), EPMOE_OK);
        free(bytes);
        free(res.response);
        printf("%2d %-42s %-18s %s\n", i + 1, c->name, epmoe_rpc_code_name(res.code),
               res.message);
        ck_assert_msg(res.code == c->expect, "case '%s': %s (%s), expected %s", c->name,
                      epmoe_rpc_code_name(res.code), res.message,
                      epmoe_rpc_code_name(c->expect));
        ck_assert_msg(strcasestr(res.message, c->field) != NULL,
                      "case '%s': message '%s' does not name '%s'", c->name, res.message,
                      c->field);
        ck_assert_msg(strstr(res.message, ".c:") == NULL, "case '%s': source location in '%s'",
                      c->name, res.message);
        expect_good(ch, p, c->name);
    }

    /* A valid non-ASCII id comes back byte for byte. */
    const char *id = "r\xc3\xa9q-\xe2\x82\xac-\xf0\x9f\x98\x80";
    epmoe_forward_args a = {id, 2, p->H, EPMOE_DTYPE_F32, p->x, p->ids, 0, 0, 120};
    epmoe_forward_reply r;
    ck_assert_int_eq(epmoe_client_forward(ch, &a, &r), EPMOE_OK);
    ck_assert_int_eq(r.code, EPMOE_RPC_OK);
    ck_assert_str_eq(r.request_id, id);
    epmoe_forward_reply_free(&r);

    epmoe_rpc_channel_close(ch);
    ck_assert_int_eq(test_server_stop(&srv, 120), 0);
}
END_TEST

static void teardown(void) { test_kill_all(); }

int main(void) {
    test_reaper_start(); /* before any thread: it forks */
    signal(SIGPIPE, SIG_IGN);
    Suite *s = suite_create("wire_catalogue");
    TCase *tc = tcase_create("catalogue");
    tcase_set_timeout(tc, 900);
    tcase_add_checked_fixture(tc, NULL, teardown); /* runs after a failed assertion too */
    tcase_add_test(tc, test_wire_catalogue);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? 1 : 0;
}
