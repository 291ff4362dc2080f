/* The C client of epmoe.v1.Moe: what epmoe-client and the service tests call. Thin: encodes a
 * request with protobuf-c, makes one unary call through the adapter, decodes the reply. */
#ifndef EPMOE_SERVICE_CLIENT_H
#define EPMOE_SERVICE_CLIENT_H

#include <stddef.h>
#include <stdint.h>

#include "common/status.h"
#include "common/tensor.h"
#include "coordinator/service/grpc_adapter.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    const char *request_id;
    int64_t n_tokens, hidden_size;
    epmoe_dtype dtype;          /* EPMOE_DTYPE_F32, BF16 or F16: how rows travel both ways */
    const void *hidden_states;  /* [n_tokens, hidden_size] of dtype (raw bytes) */
    const int32_t *token_ids;   /* [n_tokens] or NULL */
    int64_t layer_begin, layer_end; /* layer_end 0 = through the last layer */
    double timeout_seconds;     /* <= 0: no deadline */
} epmoe_forward_args;

typedef struct {
    int code;                   /* gRPC status */
    char message[512];
    char request_id[132];       /* echoed */
    int64_t n_tokens, hidden_size;
    epmoe_dtype dtype;
    void *hidden_states;        /* malloc'd [n_tokens, hidden_size] of dtype; caller frees */
    int64_t layer_begin, layer_end;
    double queue_seconds, forward_seconds;
    int64_t batch_tokens, batch_requests;
} epmoe_forward_reply;

/* Encodes a ForwardRequest (for tests that need to send odd messages, see the raw variant). */
epmoe_status epmoe_client_encode_forward(const epmoe_forward_args *a, uint8_t **bytes,
                                         size_t *nbytes);
/* One Forward call. EPMOE_OK when the call completed (with any gRPC status in out->code);
 * an error when it could not be made or an OK reply was malformed. */
epmoe_status epmoe_client_forward(epmoe_rpc_channel *ch, const epmoe_forward_args *a,
                                  epmoe_forward_reply *out);
void epmoe_forward_reply_free(epmoe_forward_reply *r);

typedef struct {
    int code;
    char message[512];
    char preset[32];
    int n_ranks;
    int64_t n_layers, n_hash_layers, hidden_size, n_routed_experts, top_k;
    int64_t experts_per_rank_min, experts_per_rank_max, vocab_size;
    int64_t max_request_tokens, max_batch_tokens, max_message_bytes;
    int64_t weight_bytes_per_rank, buffer_bytes_per_rank;
    char backend[16], device_name[96], transport[16]; /* the engine the root runs */
    int64_t decode_tokens;        /* cuda decode-graph capacity per rank; 0: none */
    int64_t layer_begin, layer_end; /* the layers loaded */
} epmoe_info_reply;

epmoe_status epmoe_client_info(epmoe_rpc_channel *ch, double timeout_seconds,
                               epmoe_info_reply *out);

/* grpc.health.v1.Health/Check: *serving_status is the ServingStatus enum (1 SERVING,
 * 2 NOT_SERVING) when *code is OK. */
epmoe_status epmoe_client_health(epmoe_rpc_channel *ch, const char *service,
                                 double timeout_seconds, int *code, int *serving_status);

#ifdef __cplusplus
}
#endif
#endif
