/* Result codes and error messages.
 *
 * Library code never exits: every fallible function returns an epmoe_status and, on failure,
 * leaves a message (with file:line of where it was raised) in a thread-local buffer that the
 * caller may print with epmoe_last_error(). Programs (main) decide what to do with it.
 *
 *   EPMOE_TRY(call)              propagate a failure unchanged (NCCLCHECK-style)
 *   EPMOE_FAIL(code, fmt, ...)   set the message and return code
 *   EPMOE_REQUIRE(cond, code, fmt, ...)  EPMOE_FAIL unless cond holds
 */
#ifndef EPMOE_STATUS_H
#define EPMOE_STATUS_H

#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
    EPMOE_OK = 0,
    EPMOE_ERR_INVALID_ARG, /* a caller passed a bad value, shape or option */
    EPMOE_ERR_IO,          /* open/read/write/mmap failed */
    EPMOE_ERR_FORMAT,      /* a file's contents are malformed (checkpoint, input) */
    EPMOE_ERR_NOT_FOUND,   /* a named tensor/preset/setting does not exist */
    EPMOE_ERR_OOM,         /* allocation failed or an arena is too small */
    EPMOE_ERR_RANGE,       /* an id or index outside its valid range */
    EPMOE_ERR_NUMERIC,     /* NaN/Inf where finite values are required */
    EPMOE_ERR_MPI,         /* an MPI call failed or a peer is missing */
    EPMOE_ERR_CUDA,        /* a CUDA runtime / cuBLAS call failed */
    EPMOE_ERR_NCCL,        /* an NCCL call failed or timed out */
    EPMOE_ERR_UNSUPPORTED, /* valid request this build or device cannot serve */
    EPMOE_ERR_INTERNAL,    /* a broken invariant: a bug */
    EPMOE_ERR_PEER_LOST    /* a peer rank died or hung (collective_timeout_s): the job is over */
} epmoe_status;

const char *epmoe_status_name(epmoe_status s);

/* Records "file:line: message" as the thread's last error and returns code. */
epmoe_status epmoe_set_error(epmoe_status code, const char *file, int line, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

/* Prepends context ("while loading layer 3: ") to the current message; returns code. */
epmoe_status epmoe_add_context(epmoe_status code, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/* Records `text` as it is (a message passed on from elsewhere, e.g. another rank's). */
epmoe_status epmoe_set_error_text(epmoe_status code, const char *text);

const char *epmoe_last_error(void);
void epmoe_clear_error(void);

#define EPMOE_FAIL(code, ...) return epmoe_set_error((code), __FILE__, __LINE__, __VA_ARGS__)

#define EPMOE_REQUIRE(cond, code, ...)                                                          \
    do {                                                                                        \
        if (!(cond)) EPMOE_FAIL((code), __VA_ARGS__);                                           \
    } while (0)

#define EPMOE_TRY(call)                                                                         \
    do {                                                                                        \
        epmoe_status epmoe_try_status_ = (call);                                                \
        if (epmoe_try_status_ != EPMOE_OK) return epmoe_try_status_;                            \
    } while (0)

/* For cleanup-style functions: record the failure in `st` and jump to a label. */
#define EPMOE_TRY_GOTO(st, call, label)                                                         \
    do {                                                                                        \
        (st) = (call);                                                                          \
        if ((st) != EPMOE_OK) goto label;                                                       \
    } while (0)

#ifdef __cplusplus
}
#endif
#endif
