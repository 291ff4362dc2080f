#include "coordinator/service/wire.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/tensor.h"
#include "epmoe.pb-c.h"

/* The bytes on the wire are little-endian; so is every machine this builds for. */
_Static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "wire tensors are little-endian");

static int wire_dtype_to_epmoe(int wire, epmoe_dtype *out) {
    switch (wire) {
    case EPMOE__V1__DTYPE__DTYPE_FP32: *out = EPMOE_DTYPE_F32; return 1;
    case EPMOE__V1__DTYPE__DTYPE_BF16: *out = EPMOE_DTYPE_BF16; return 1;
    case EPMOE__V1__DTYPE__DTYPE_FP16: *out = EPMOE_DTYPE_F16; return 1;
    default: return 0;
    }
}

static const char *wire_dtype_name(int wire) {
    switch (wire) {
    case EPMOE__V1__DTYPE__DTYPE_UNSPECIFIED: return "DTYPE_UNSPECIFIED";
    case EPMOE__V1__DTYPE__DTYPE_FP32: return "DTYPE_FP32";
    case EPMOE__V1__DTYPE__DTYPE_BF16: return "DTYPE_BF16";
    case EPMOE__V1__DTYPE__DTYPE_FP16: return "DTYPE_FP16";
    default: return "unknown";
    }
}

/* Well-formed UTF-8 (RFC 3629: no overlongs, no surrogates, at most U+10FFFF) without NUL:
 * what stock protobuf accepts in a string and what a C string can echo whole. Returns the
 * offset of the first bad byte, or n. */
static size_t first_bad_utf8(const uint8_t *p, size_t n) {
    size_t i = 0;
    while (i < n) {
        uint8_t c = p[i];
        size_t len;
        uint32_t cp;
        if (c == 0) return i;
        if (c < 0x80) {
            i++;
            continue;
        } else if (c >= 0xc2 && c <= 0xdf) {
            len = 2;
            cp = c & 0x1f;
        } else if (c >= 0xe0 && c <= 0xef) {
            len = 3;
            cp = c & 0x0f;
        } else if (c >= 0xf0 && c <= 0xf4) {
            len = 4;
            cp = c & 0x07;
        } else {
            return i;
        }
        if (i + len > n) return i;
        for (size_t k = 1; k < len; k++) {
            if ((p[i + k] & 0xc0) != 0x80) return i;
            cp = cp << 6 | (p[i + k] & 0x3f);
        }
        if ((len == 3 && cp < 0x800) || (len == 4 && (cp < 0x10000 || cp > 0x10ffff)) ||
            (cp >= 0xd800 && cp <= 0xdfff))
            return i;
        i += len;
    }
    return n;
}

/* Reads a base-128 varint; 0 when it runs past the end or is longer than 10 bytes. */
static size_t read_varint(const uint8_t *p, size_t n, uint64_t *v) {
    *v = 0;
    for (size_t i = 0; i < n && i < 10; i++) {
        *v |= (uint64_t)(p[i] & 0x7f) << (7 * i);
        if (!(p[i] & 0x80)) return i + 1;
    }
    return 0;
}

/* The raw bytes of the last top-level length-delimited field `field` of a message (the value
 * proto3 keeps), or NULL. protobuf-c hands strings over NUL-terminated, so a NUL inside would
 * silently cut the string; the raw bytes show it. The message has already unpacked, so it is
 * well-formed; malformed input just ends the scan. */
static const uint8_t *raw_field(const uint8_t *p, size_t n, uint32_t field, size_t *len) {
    const uint8_t *found = NULL;
    size_t i = 0;
    *len = 0;
    while (i < n) {
        uint64_t key, v;
        size_t k = read_varint(p + i, n - i, &key);
        if (!k) break;
        i += k;
        switch (key & 7) {
        case 0: /* varint */
            k = read_varint(p + i, n - i, &v);
            if (!k) return found;
            i += k;
            break;
        case 1: i += 8; break;
        case 5: i += 4; break;
        case 2:
            k = read_varint(p + i, n - i, &v);
            if (!k || v > n - i - k) return found;
            i += k;
            if ((key >> 3) == field) {
                found = p + i;
                *len = (size_t)v;
            }
            i += (size_t)v;
            break;
        default: return found;
        }
    }
    return found;
}

#define BAD(...)                                                                                \
    do {                                                                                        \
        snprintf(message, message_cap, __VA_ARGS__);                                            \
        code = 3; /* INVALID_ARGUMENT */                                                        \
        goto done;                                                                              \
    } while (0)

int epmoe_wire_decode_forward(const uint8_t *bytes, size_t nbytes, const epmoe_wire_limits *lim,
                              epmoe_serve_request **out, char *message, size_t message_cap) {
    *out = NULL;
    message[0] = '\0';
    int code = 0;
    epmoe_serve_request *r = NULL;
    void *staging = NULL;
    Epmoe__V1__ForwardRequest *msg = epmoe__v1__forward_request__unpack(NULL, nbytes, bytes);
    if (!msg) BAD("request: not a valid epmoe.v1.ForwardRequest message (%zu bytes)", nbytes);

    size_t id_len = 0;
    const uint8_t *id = raw_field(bytes, nbytes, 1, &id_len);
    if (id_len > EPMOE_MAX_REQUEST_ID_BYTES)
        BAD("request_id: %zu bytes, at most %d", id_len, EPMOE_MAX_REQUEST_ID_BYTES);
    size_t bad_at = id ? first_bad_utf8(id, id_len) : 0;
    if (id && bad_at < id_len)
        BAD("request_id: byte %zu (0x%02x) is %s; expected UTF-8 text without NUL", bad_at,
            id[bad_at], id[bad_at] ? "not valid UTF-8" : "NUL");
    const Epmoe__V1__Tensor *t = msg->hidden_states;
    if (!t) BAD("hidden_states: missing");
    epmoe_dtype dtype;
    if (!wire_dtype_to_epmoe((int)t->dtype, &dtype))
        BAD("hidden_states.dtype: %s (%d); expected DTYPE_FP32, DTYPE_BF16 or DTYPE_FP16",
            wire_dtype_name((int)t->dtype), (int)t->dtype);
    const int64_t H = lim->hidden_size;
    if (t->n_shape != 2)
        BAD("hidden_states.shape: %zu dimensions; expected 2, [tokens, %lld]", t->n_shape,
            (long long)H);
    const int64_t T = t->shape[0];
    if (t->shape[1] != H)
        BAD("hidden_states.shape[1]: %lld; expected hidden_size %lld", (long long)t->shape[1],
            (long long)H);
    if (T <= 0) BAD("hidden_states.shape[0]: %lld tokens; a request needs at least 1", (long long)T);
    if (T > lim->max_request_tokens)
        BAD("hidden_states.shape[0]: %lld tokens exceeds max_request_tokens %lld", (long long)T,
            (long long)lim->max_request_tokens);
    const size_t elem = epmoe_dtype_size(dtype);
    const size_t want = (size_t)(T * H) * elem;
    if (t->data.len != want)
        BAD("hidden_states.data: %zu bytes; shape [%lld, %lld] of %s needs %zu", t->data.len,
            (long long)T, (long long)H, wire_dtype_name((int)t->dtype), want);

    const int64_t lo = lim->loaded_end > 0 ? lim->loaded_begin : 0;
    const int64_t hi = lim->loaded_end > 0 ? lim->loaded_end : lim->n_layers;
    int64_t begin = msg->layer_begin;
    int64_t end = msg->layer_end == 0 ? hi : msg->layer_end;
    if (begin < lo || begin >= hi)
        BAD("layer_begin: %lld outside the loaded layers [%lld, %lld)", (long long)begin,
            (long long)lo, (long long)hi);
    if (end <= begin || end > hi)
        BAD("layer_end: %lld; expected layer_begin %lld < layer_end <= %lld (or 0 for all)",
            (long long)msg->layer_end, (long long)begin, (long long)hi);
    const int need_ids = begin < lim->n_hash_layers;
    if (need_ids && msg->n_token_ids == 0)
        BAD("token_ids: missing, but layers [%lld, %lld) in the range route by token id",
            (long long)begin, (long long)(lim->n_hash_layers < end ? lim->n_hash_layers : end));
    if (msg->n_token_ids != 0 && (int64_t)msg->n_token_ids != T)
        BAD("token_ids: %zu ids for %lld tokens", msg->n_token_ids, (long long)T);
    for (size_t i = 0; i < msg->n_token_ids; i++)
        if (msg->token_ids[i] < 0 || msg->token_ids[i] >= lim->vocab_size)
            BAD("token_ids[%zu]: %d outside the vocabulary [0, %lld)", i, msg->token_ids[i],
                (long long)lim->vocab_size);

    r = calloc(1, sizeof *r);
    if (r) r->x = malloc((size_t)(T * H) * sizeof(float));
    if (r && msg->n_token_ids) r->token_ids = malloc((size_t)T * sizeof(int32_t));
    if (!r || !r->x || (msg->n_token_ids && !r->token_ids)) {
        snprintf(message, message_cap, "out of memory for a request of %lld tokens", (long long)T);
        code = 8; /* RESOURCE_EXHAUSTED */
        goto done;
    }
    /* protobuf-c's bytes need not be aligned for the element type: convert from a copy. */
    if (dtype == EPMOE_DTYPE_F32) {
        memcpy(r->x, t->data.data, want);
    } else {
        staging = malloc(want);
        if (!staging) {
            snprintf(message, message_cap, "out of memory for a request of %lld tokens",
                     (long long)T);
            code = 8;
            goto done;
        }
        memcpy(staging, t->data.data, want);
        if (epmoe_convert_to_f32(dtype, staging, (size_t)(T * H), r->x) != EPMOE_OK)
            BAD("hidden_states.data: cannot convert %s: %s", wire_dtype_name((int)t->dtype),
                epmoe_last_error());
    }
    for (int64_t i = 0; i < T * H; i++)
        if (!isfinite(r->x[i]))
            BAD("hidden_states.data: element [%lld, %lld] is %s", (long long)(i / H),
                (long long)(i % H), isnan(r->x[i]) ? "NaN" : "Inf");
    if (r->token_ids) memcpy(r->token_ids, msg->token_ids, (size_t)T * sizeof(int32_t));
    r->n_tokens = T;
    r->layer_begin = begin;
    r->layer_end = end;
    r->wire_dtype = (int)t->dtype;
    if (id_len) memcpy(r->request_id, id, id_len);
    r->request_id[id_len] = '\0';

done:
    free(staging);
    if (msg) epmoe__v1__forward_request__free_unpacked(msg, NULL);
    if (code != 0) {
        epmoe_serve_request_free(r);
        return code;
    }
    *out = r;
    return 0;
}

epmoe_status epmoe_wire_encode_forward(const epmoe_serve_request *r, int64_t hidden_size,
                                       uint8_t **bytes, size_t *nbytes) {
    *bytes = NULL;
    *nbytes = 0;
    epmoe_dtype dtype;
    EPMOE_REQUIRE(wire_dtype_to_epmoe(r->wire_dtype, &dtype), EPMOE_ERR_INTERNAL,
                  "response of request '%s': wire dtype %d", r->request_id, r->wire_dtype);
    size_t n = (size_t)(r->n_tokens * hidden_size);
    uint8_t *data = malloc(n * epmoe_dtype_size(dtype) + 1);
    EPMOE_REQUIRE(data != NULL, EPMOE_ERR_OOM, "response of %lld tokens: out of memory",
                  (long long)r->n_tokens);
    epmoe_status st = epmoe_convert_from_f32(r->out, n, dtype, data);
    if (st != EPMOE_OK) {
        free(data);
        return st;
    }
    /* An output the request's dtype cannot carry is an error of that request, never an Inf
     * sent silently (a row the model blows up, or a value beyond fp16's 65504). */
    const uint16_t exp_mask = dtype == EPMOE_DTYPE_F16 ? 0x7c00 : 0x7f80;
    for (size_t i = 0; i < n; i++) {
        uint16_t bits;
        if (!isfinite(r->out[i])) {
            free(data);
            EPMOE_FAIL(EPMOE_ERR_NUMERIC,
                       "hidden_states row %lld: output element %lld is %g: the row's values "
                       "are out of range for this model",
                       (long long)(i / (size_t)hidden_size), (long long)(i % (size_t)hidden_size),
                       (double)r->out[i]);
        }
        if (dtype == EPMOE_DTYPE_F32) continue;
        memcpy(&bits, data + 2 * i, 2);
        if ((bits & exp_mask) == exp_mask) {
            free(data);
            EPMOE_FAIL(EPMOE_ERR_NUMERIC,
                       "hidden_states.dtype: output row %lld element %lld = %g does not fit %s; "
                       "ask for DTYPE_FP32%s",
                       (long long)(i / (size_t)hidden_size), (long long)(i % (size_t)hidden_size),
                       (double)r->out[i], wire_dtype_name(r->wire_dtype),
                       dtype == EPMOE_DTYPE_F16 ? " or DTYPE_BF16" : "");
        }
    }
    int64_t shape[2] = {r->n_tokens, hidden_size};
    Epmoe__V1__Tensor tensor = EPMOE__V1__TENSOR__INIT;
    tensor.n_shape = 2;
    tensor.shape = shape;
    tensor.dtype = (Epmoe__V1__DType)r->wire_dtype;
    tensor.data.len = n * epmoe_dtype_size(dtype);
    tensor.data.data = data;
    Epmoe__V1__ServerTiming timing = EPMOE__V1__SERVER_TIMING__INIT;
    timing.queue_seconds = r->queue_seconds;
    timing.forward_seconds = r->forward_seconds;
    timing.route_seconds = r->stage_times.route;
    timing.dispatch_seconds = r->stage_times.dispatch;
    timing.experts_seconds = r->stage_times.experts;
    timing.combine_seconds = r->stage_times.combine;
    timing.shared_seconds = r->stage_times.shared;
    timing.batch_tokens = r->batch_tokens;
    timing.batch_requests = r->batch_requests;
    Epmoe__V1__ForwardResponse resp = EPMOE__V1__FORWARD_RESPONSE__INIT;
    resp.request_id = (char *)r->request_id;
    resp.hidden_states = &tensor;
    resp.layer_begin = r->layer_begin;
    resp.layer_end = r->layer_end;
    resp.timing = &timing;
    size_t len = epmoe__v1__forward_response__get_packed_size(&resp);
    uint8_t *buf = malloc(len ? len : 1);
    if (!buf) {
        free(data);
        EPMOE_FAIL(EPMOE_ERR_OOM, "response of %zu bytes: out of memory", len);
    }
    epmoe__v1__forward_response__pack(&resp, buf);
    free(data);
    *bytes = buf;
    *nbytes = len;
    return EPMOE_OK;
}
