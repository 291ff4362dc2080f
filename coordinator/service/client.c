#include "coordinator/service/client.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "epmoe.pb-c.h"
#include "grpc/health/v1/health.pb-c.h"

static int to_wire_dtype(epmoe_dtype t) {
    switch (t) {
    case EPMOE_DTYPE_F32: return EPMOE__V1__DTYPE__DTYPE_FP32;
    case EPMOE_DTYPE_BF16: return EPMOE__V1__DTYPE__DTYPE_BF16;
    case EPMOE_DTYPE_F16: return EPMOE__V1__DTYPE__DTYPE_FP16;
    default: return -1;
    }
}

static int from_wire_dtype(int w, epmoe_dtype *t) {
    switch (w) {
    case EPMOE__V1__DTYPE__DTYPE_FP32: *t = EPMOE_DTYPE_F32; return 1;
    case EPMOE__V1__DTYPE__DTYPE_BF16: *t = EPMOE_DTYPE_BF16; return 1;
    case EPMOE__V1__DTYPE__DTYPE_FP16: *t = EPMOE_DTYPE_F16; return 1;
    default: return 0;
    }
}

epmoe_status epmoe_client_encode_forward(const epmoe_forward_args *a, uint8_t **bytes,
                                         size_t *nbytes) {
    *bytes = NULL;
    *nbytes = 0;
    int wire = to_wire_dtype(a->dtype);
    EPMOE_REQUIRE(wire >= 0, EPMOE_ERR_INVALID_ARG, "forward: dtype %s cannot travel (F32, BF16, F16)",
                  epmoe_dtype_name(a->dtype));
    int64_t shape[2] = {a->n_tokens, a->hidden_size};
    Epmoe__V1__Tensor t = EPMOE__V1__TENSOR__INIT;
    t.n_shape = 2;
    t.shape = shape;
    t.dtype = (Epmoe__V1__DType)wire;
    t.data.len = (size_t)(a->n_tokens * a->hidden_size) * epmoe_dtype_size(a->dtype);
    t.data.data = (uint8_t *)a->hidden_states;
    Epmoe__V1__ForwardRequest req = EPMOE__V1__FORWARD_REQUEST__INIT;
    req.request_id = (char *)(a->request_id ? a->request_id : "");
    req.hidden_states = &t;
    req.n_token_ids = a->token_ids ? (size_t)a->n_tokens : 0;
    req.token_ids = (int32_t *)a->token_ids;
    req.layer_begin = a->layer_begin;
    req.layer_end = a->layer_end;
    size_t len = epmoe__v1__forward_request__get_packed_size(&req);
    uint8_t *buf = malloc(len ? len : 1);
    EPMOE_REQUIRE(buf != NULL, EPMOE_ERR_OOM, "forward: out of memory for a %zu-byte request", len);
    epmoe__v1__forward_request__pack(&req, buf);
    *bytes = buf;
    *nbytes = len;
    return EPMOE_OK;
}

epmoe_status epmoe_client_forward(epmoe_rpc_channel *ch, const epmoe_forward_args *a,
                                  epmoe_forward_reply *out) {
    memset(out, 0, sizeof *out);
    uint8_t *bytes;
    size_t nbytes;
    EPMOE_TRY(epmoe_client_encode_forward(a, &bytes, &nbytes));
    epmoe_rpc_result res;
    epmoe_status st = epmoe_rpc_unary(ch, "/epmoe.v1.Moe/Forward", bytes, nbytes,
                                      a->timeout_seconds, &res);
    free(bytes);
    EPMOE_TRY(st);
    out->code = res.code;
    memcpy(out->message, res.message, sizeof out->message);
    if (res.code != EPMOE_RPC_OK) {
        free(res.response);
        return EPMOE_OK;
    }
    Epmoe__V1__ForwardResponse *resp =
        epmoe__v1__forward_response__unpack(NULL, res.nbytes, res.response);
    free(res.response);
    EPMOE_REQUIRE(resp != NULL, EPMOE_ERR_FORMAT, "forward: malformed ForwardResponse");
    const Epmoe__V1__Tensor *t = resp->hidden_states;
    epmoe_dtype dtype = EPMOE_DTYPE_F32;
    st = EPMOE_OK;
    if (!t || t->n_shape != 2 || !from_wire_dtype((int)t->dtype, &dtype) ||
        t->data.len != (size_t)(t->shape[0] * t->shape[1]) * epmoe_dtype_size(dtype)) {
        st = epmoe_set_error(EPMOE_ERR_FORMAT, __FILE__, __LINE__,
                             "forward: response tensor missing or inconsistent");
    } else {
        out->hidden_states = malloc(t->data.len ? t->data.len : 1);
        if (!out->hidden_states) {
            st = epmoe_set_error(EPMOE_ERR_OOM, __FILE__, __LINE__, "forward: out of memory");
        } else {
            memcpy(out->hidden_states, t->data.data, t->data.len);
            out->n_tokens = t->shape[0];
            out->hidden_size = t->shape[1];
            out->dtype = dtype;
            snprintf(out->request_id, sizeof out->request_id, "%s", resp->request_id);
            out->layer_begin = resp->layer_begin;
            out->layer_end = resp->layer_end;
            if (resp->timing) {
                out->queue_seconds = resp->timing->queue_seconds;
                out->forward_seconds = resp->timing->forward_seconds;
                out->batch_tokens = resp->timing->batch_tokens;
                out->batch_requests = resp->timing->batch_requests;
            }
        }
    }
    epmoe__v1__forward_response__free_unpacked(resp, NULL);
    return st;
}

void epmoe_forward_reply_free(epmoe_forward_reply *r) {
    if (!r) return;
    free(r->hidden_states);
    r->hidden_states = NULL;
}

epmoe_status epmoe_client_info(epmoe_rpc_channel *ch, double timeout_seconds,
                               epmoe_info_reply *out) {
    memset(out, 0, sizeof *out);
    Epmoe__V1__InfoRequest req = EPMOE__V1__INFO_REQUEST__INIT;
    uint8_t buf[16];
    size_t n = epmoe__v1__info_request__pack(&req, buf);
    epmoe_rpc_result res;
    EPMOE_TRY(epmoe_rpc_unary(ch, "/epmoe.v1.Moe/Info", buf, n, timeout_seconds, &res));
    out->code = res.code;
    memcpy(out->message, res.message, sizeof out->message);
    if (res.code != EPMOE_RPC_OK) {
        free(res.response);
        return EPMOE_OK;
    }
    Epmoe__V1__InfoResponse *r = epmoe__v1__info_response__unpack(NULL, res.nbytes, res.response);
    free(res.response);
    EPMOE_REQUIRE(r != NULL, EPMOE_ERR_FORMAT, "info: malformed InfoResponse");
    snprintf(out->preset, sizeof out->preset, "%s", r->preset);
    out->n_ranks = r->n_ranks;
    out->n_layers = r->n_layers;
    out->n_hash_layers = r->n_hash_layers;
    out->hidden_size = r->hidden_size;
    out->n_routed_experts = r->n_routed_experts;
    out->top_k = r->top_k;
    out->experts_per_rank_min = r->experts_per_rank_min;
    out->experts_per_rank_max = r->experts_per_rank_max;
    out->vocab_size = r->vocab_size;
    out->max_request_tokens = r->max_request_tokens;
    out->max_batch_tokens = r->max_batch_tokens;
    out->max_message_bytes = r->max_message_bytes;
    out->weight_bytes_per_rank = r->weight_bytes_per_rank;
    out->buffer_bytes_per_rank = r->buffer_bytes_per_rank;
    snprintf(out->backend, sizeof out->backend, "%s", r->backend);
    snprintf(out->device_name, sizeof out->device_name, "%s", r->device_name);
    snprintf(out->transport, sizeof out->transport, "%s", r->transport);
    out->decode_tokens = r->decode_tokens;
    out->layer_begin = r->layer_begin;
    out->layer_end = r->layer_end;
    epmoe__v1__info_response__free_unpacked(r, NULL);
    return EPMOE_OK;
}

epmoe_status epmoe_client_health(epmoe_rpc_channel *ch, const char *service,
                                 double timeout_seconds, int *code, int *serving_status) {
    *serving_status = 0;
    Grpc__Health__V1__HealthCheckRequest req = GRPC__HEALTH__V1__HEALTH_CHECK_REQUEST__INIT;
    req.service = (char *)(service ? service : "");
    size_t n = grpc__health__v1__health_check_request__get_packed_size(&req);
    uint8_t *buf = malloc(n + 1);
    EPMOE_REQUIRE(buf != NULL, EPMOE_ERR_OOM, "health: out of memory");
    grpc__health__v1__health_check_request__pack(&req, buf);
    epmoe_rpc_result res;
    epmoe_status st =
        epmoe_rpc_unary(ch, "/grpc.health.v1.Health/Check", buf, n, timeout_seconds, &res);
    free(buf);
    EPMOE_TRY(st);
    *code = res.code;
    if (res.code == EPMOE_RPC_OK) {
        Grpc__Health__V1__HealthCheckResponse *r =
            grpc__health__v1__health_check_response__unpack(NULL, res.nbytes, res.response);
        if (r) {
            *serving_status = (int)r->status;
            grpc__health__v1__health_check_response__free_unpacked(r, NULL);
        } else {
            st = epmoe_set_error(EPMOE_ERR_FORMAT, __FILE__, __LINE__,
                                 "health: malformed HealthCheckResponse");
        }
    }
    free(res.response);
    return st;
}
