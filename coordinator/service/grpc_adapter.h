/* The one place that speaks the gRPC core C API (grpc/grpc.h). Its C API changes between
 * versions (this file targets Debian's libgrpc-dev 1.51); everything else in the service sees
 * only this header: opaque servers, calls and channels, plain bytes and gRPC status codes.
 *
 * Server: unary calls only. A completion-queue thread pool receives each call's request
 * message and hands the call to a handler; whoever holds the call (the handler, or the batcher
 * later, from any thread) answers it exactly once with epmoe_rpc_call_reply. A call whose
 * client cancelled, or whose deadline passed, is flagged (epmoe_rpc_call_cancelled); replying
 * to it is allowed and simply goes nowhere.
 *
 * Client: a blocking unary call on a shared channel (safe from many threads).
 */
#ifndef EPMOE_GRPC_ADAPTER_H
#define EPMOE_GRPC_ADAPTER_H

#include <stddef.h>
#include <stdint.h>

#include "common/clock.h" /* epmoe_seconds_now: the clock deadlines are expressed in */
#include "common/status.h"

#ifdef __cplusplus
extern "C" {
#endif

/* gRPC status codes: fixed by the wire protocol (grpc/status.h spells the same numbers). */
typedef enum {
    EPMOE_RPC_OK = 0,
    EPMOE_RPC_CANCELLED = 1,
    EPMOE_RPC_UNKNOWN = 2,
    EPMOE_RPC_INVALID_ARGUMENT = 3,
    EPMOE_RPC_DEADLINE_EXCEEDED = 4,
    EPMOE_RPC_NOT_FOUND = 5,
    EPMOE_RPC_RESOURCE_EXHAUSTED = 8,
    EPMOE_RPC_FAILED_PRECONDITION = 9,
    EPMOE_RPC_UNIMPLEMENTED = 12,
    EPMOE_RPC_INTERNAL = 13,
    EPMOE_RPC_UNAVAILABLE = 14,
    EPMOE_RPC_CODE_COUNT = 17
} epmoe_rpc_code;

const char *epmoe_rpc_code_name(int code); /* "OK", "INVALID_ARGUMENT", ... */

/* A client's deadline timer fires before the server's copy of the deadline does: the server
 * counts the timeout from the request's arrival, later by its transit. So a client that gives
 * up at its deadline is seen as cancelling shortly before it. A call cancelled within this
 * many seconds of its deadline is taken for a deadline that passed. */
#define EPMOE_RPC_DEADLINE_SLACK 0.1

/* ---- server --------------------------------------------------------------------------------*/

typedef struct epmoe_rpc_server epmoe_rpc_server;
typedef struct epmoe_rpc_call epmoe_rpc_call;

/* Called on a completion-queue thread once a call's request message has arrived. Must not
 * block for long; takes ownership of the call (answer it exactly once, from any thread). */
typedef void (*epmoe_rpc_handler)(void *user, epmoe_rpc_call *call);

/* How a call ended, reported once per call that arrived (handled or refused by the adapter
 * itself), after its last event: what the client got as far as the server can know. */
typedef struct {
    const char *method;  /* the full method path ("" if it never arrived) */
    int replied_code;    /* the status the server sent or tried to send (-1: none) */
    int code;            /* what happened: replied_code when the reply went out; otherwise
                          * DEADLINE_EXCEEDED when the call ended at its deadline (within
                          * EPMOE_RPC_DEADLINE_SLACK), else CANCELLED */
    int delivered;       /* the reply (status, and message when OK) went out completely */
    double seconds;      /* from the call's arrival to its reply (or its end) */
    int64_t units;       /* what the handler set with epmoe_rpc_call_set_units (0 if not) */
} epmoe_rpc_outcome;

typedef void (*epmoe_rpc_finished)(void *user, const epmoe_rpc_outcome *outcome);

typedef struct {
    const char *listen;          /* "127.0.0.1:50051"; port 0 picks a free port */
    int64_t max_message_bytes;   /* receive and send limit */
    int64_t memory_bytes;        /* gRPC's buffers at most (resource quota), >= the above */
    int threads;                 /* completion-queue threads */
    epmoe_rpc_handler handler;
    epmoe_rpc_finished finished; /* optional: how each call ended (metrics) */
    void *user;
} epmoe_rpc_server_options;

/* Binds, starts the threads; *bound_port receives the port actually bound. */
epmoe_status epmoe_rpc_server_start(const epmoe_rpc_server_options *opt, epmoe_rpc_server **out,
                                    int *bound_port);
/* Stops accepting calls, waits for calls in flight to be answered (they must be: the caller
 * drains its own queue first), then cancels stragglers after grace_seconds, joins the threads
 * and frees everything. */
void epmoe_rpc_server_stop(epmoe_rpc_server *s, double grace_seconds);

/* The full method path, e.g. "/epmoe.v1.Moe/Forward". */
const char *epmoe_rpc_call_method(const epmoe_rpc_call *c);
const uint8_t *epmoe_rpc_call_request(const epmoe_rpc_call *c, size_t *nbytes);
/* Absolute deadline in epmoe_seconds_now() seconds; +INFINITY when the client set none. */
double epmoe_rpc_call_deadline(const epmoe_rpc_call *c);
/* Nonzero once the client cancelled, the deadline passed or the connection dropped. */
int epmoe_rpc_call_cancelled(const epmoe_rpc_call *c);
/* A number handed back in the call's outcome (the service: rows of an OK Forward reply). */
void epmoe_rpc_call_set_units(epmoe_rpc_call *c, int64_t units);
/* Sends the response message (if code is OK; may be NULL/0 for an empty message) and the
 * status, then releases the call. message: status details for errors (may be NULL). */
void epmoe_rpc_call_reply(epmoe_rpc_call *c, int code, const char *message,
                          const uint8_t *response, size_t nbytes);

/* ---- client --------------------------------------------------------------------------------*/

typedef struct epmoe_rpc_channel epmoe_rpc_channel;

epmoe_status epmoe_rpc_channel_open(const char *target, int64_t max_message_bytes,
                                    epmoe_rpc_channel **out);
void epmoe_rpc_channel_close(epmoe_rpc_channel *ch);

typedef struct {
    int code;             /* gRPC status code from the server (or the transport) */
    char message[512];    /* status details */
    uint8_t *response;    /* malloc'd response message (OK only); caller frees */
    size_t nbytes;
} epmoe_rpc_result;

/* One unary call; timeout_seconds <= 0 means no deadline. Returns EPMOE_OK when the call
 * completed with any gRPC status (see out->code); an error only if it could not be started. */
epmoe_status epmoe_rpc_unary(epmoe_rpc_channel *ch, const char *method, const uint8_t *request,
                             size_t nbytes, double timeout_seconds, epmoe_rpc_result *out);

/* Initializes and shuts down the gRPC library (reference counted; call once per program). */
void epmoe_rpc_library_init(void);
void epmoe_rpc_library_shutdown(void);

#ifdef __cplusplus
}
#endif
#endif
