/* Wire messages (proto/epmoe.proto, serialized with protobuf-c) to and from the batcher's
 * requests. Decoding validates everything the engine would refuse, so that a bad request is
 * answered INVALID_ARGUMENT with the offending field named, before it can spoil a batch. */
#ifndef EPMOE_SERVICE_WIRE_H
#define EPMOE_SERVICE_WIRE_H

#include <stddef.h>
#include <stdint.h>

#include "common/status.h"
#include "coordinator/service/batcher.h"

#ifdef __cplusplus
extern "C" {
#endif

#define EPMOE_MAX_REQUEST_ID_BYTES 128

typedef struct {
    int64_t hidden_size;
    int64_t n_layers;
    int64_t n_hash_layers;      /* layers [0, n_hash_layers) route by token id */
    int64_t vocab_size;
    int64_t max_request_tokens;
    int64_t loaded_begin, loaded_end; /* the layers the server loaded; 0, 0: all */
} epmoe_wire_limits;

/* Decodes a serialized epmoe.v1.ForwardRequest. Returns a gRPC status code: OK with *out a new
 * request (fp32 rows, resolved layer range, request id, wire dtype), or INVALID_ARGUMENT /
 * RESOURCE_EXHAUSTED with message naming the field and value. */
int epmoe_wire_decode_forward(const uint8_t *bytes, size_t nbytes, const epmoe_wire_limits *lim,
                              epmoe_serve_request **out, char *message, size_t message_cap);

/* Serializes the response of a computed request (its rows in its wire dtype). */
epmoe_status epmoe_wire_encode_forward(const epmoe_serve_request *r, int64_t hidden_size,
                                       uint8_t **bytes, size_t *nbytes);

#ifdef __cplusplus
}
#endif
#endif
