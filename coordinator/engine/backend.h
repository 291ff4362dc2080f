/* The engine seam: one interface, two backends. The driver (coordinator/engine/driver.h) calls
 * only this; it never asks which backend runs.
 *
 *   cpu   coordinator/engine/cpu_engine.h over MPI (host buffers): the reference, and the
 *         embedded default where there is no GPU.
 *   cuda  coordinator/engine/gpu_engine.h, one rank per GPU, NCCL between GPUs (mpi-staged
 *         when ranks share a GPU). Weights stay on the device for the life of the backend; a
 *         batch goes to the device once, runs through every requested layer there, and comes
 *         back once.
 *
 * Creation loads this rank's expert slice of layers [layer_begin, layer_end) from the
 * checkpoint (coordinator/engine/load.h) and sizes every buffer for the worst case of
 * max_tokens_per_rank tokens per rank all routed to one expert (dropless).
 *
 * A forward is collective and synchronous: every rank calls it with the same layer range and
 * its own shard (T may differ per rank, 0 included); it returns when the outputs are in host
 * memory. A failure on any rank (bad data found on the device, a peer lost) makes every rank
 * return the lowest failing rank's status and message (coordinator/transport/agree.h).
 */
#ifndef EPMOE_BACKEND_H
#define EPMOE_BACKEND_H

#include <mpi.h>
#include <stdint.h>
#include <stdio.h>

#include "common/config.h"
#include "common/safetensors.h"
#include "common/status.h"
#include "common/tensor.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Seconds spent per stage, summed over the layers of one forward. On the cuda backend they
 * come from CUDA events on the stream (a replayed decode graph reports its total only). */
typedef struct {
    double route;
    double dispatch;
    double experts;
    double combine;
    double shared;
    double total;
} epmoe_stage_times;

typedef struct {
    char name[8];             /* "cpu" or "cuda" */
    int device;               /* CUDA device of this rank; -1 on the cpu backend */
    char device_name[96];     /* "NVIDIA H100 80GB HBM3", or "host" */
    char transport[16];       /* "mpi", "nccl" or "mpi-staged" */
    int64_t weight_bytes;     /* this rank's weights of the loaded layers, where they are used */
    int64_t buffer_bytes;     /* worst-case activation buffers (on the device for cuda) */
    int64_t decode_tokens;    /* cuda: per-rank capacity of the captured decode graph; 0: none */
    char note[200];           /* what a run should know about how it computes (W4A8's GEMMs),
                                 or "" */
} epmoe_backend_info;

typedef struct {
    int64_t rows_sent;          /* dispatched rows (one per token and destination rank) */
    int64_t rows_received;      /* rows received as a worker */
    int64_t pairs_computed;     /* (row, expert) pairs computed here */
    int64_t pairs_combined;     /* expert outputs received back and combined */
    int64_t saturated_elements; /* NVFP4 activation elements clamped at +-6 */
} epmoe_backend_counters;

/* One forward of this rank's shard. */
typedef struct {
    const void *x;            /* [T, H] host memory, in dtype */
    void *out;                /* [T, H] host memory, in dtype; never aliases x */
    epmoe_dtype dtype;        /* F32, BF16 or F16 */
    const int32_t *token_ids; /* [T], or NULL when no hash-routed layer is in range */
    int64_t T;
    int64_t largest_T;        /* the largest shard of any rank in this forward: the same on
                                 every rank, so all choose the same mode */
    int64_t first_row;        /* the batch row of this shard's row 0: messages name batch rows */
    int64_t layer_begin, layer_end;
    epmoe_stage_times *times; /* optional: accumulated */
    int64_t *expert_counts;   /* optional: [(layer_end - layer_begin) * E], accumulated */
} epmoe_backend_batch;

typedef struct epmoe_backend epmoe_backend;

typedef struct {
    epmoe_status (*forward)(epmoe_backend *b, const epmoe_backend_batch *batch);
    void (*get_counters)(const epmoe_backend *b, epmoe_backend_counters *c);
    void (*destroy)(epmoe_backend *b);
} epmoe_backend_ops;

struct epmoe_backend {
    const epmoe_backend_ops *ops;
    epmoe_backend_info info;
    int64_t layer_begin, layer_end; /* the loaded layers */
    void *impl;
};

/* Collective over comm. cfg->backend chooses (auto: cuda when this build has CUDA and every
 * rank sees a GPU). cfg holds the checkpoint's model settings already. log: progress lines
 * (NULL: silent). */
epmoe_status epmoe_backend_create(const epmoe_config *cfg, MPI_Comm comm,
                                  const epmoe_st_set *ckpt, int64_t layer_begin,
                                  int64_t layer_end, FILE *log, epmoe_backend **out);
void epmoe_backend_destroy(epmoe_backend *b);

/* The two implementations (backend.c picks). The cuda one exists in CUDA builds only. */
epmoe_status epmoe_backend_cpu_create(const epmoe_config *cfg, MPI_Comm comm,
                                      const epmoe_st_set *ckpt, int64_t layer_begin,
                                      int64_t layer_end, FILE *log, epmoe_backend **out);
epmoe_status epmoe_backend_cuda_create(const epmoe_config *cfg, MPI_Comm comm,
                                       const epmoe_st_set *ckpt, int64_t layer_begin,
                                       int64_t layer_end, FILE *log, epmoe_backend **out);
/* How many CUDA devices this process sees (0 in a build without CUDA or without a driver). */
int epmoe_backend_cuda_devices(void);

/* Shared by both backends: host rows of dtype -> fp32, refusing NaN/Inf with a message naming
 * the batch row (first_row + t) and column; fp32 -> dtype, refusing values that overflow it
 * (an F16 output above 65504 is an error, never a silent Inf). */
epmoe_status epmoe_rows_to_f32(const void *x, epmoe_dtype dtype, int64_t T, int64_t H,
                               int64_t first_row, float *out);
epmoe_status epmoe_rows_from_f32(const float *y, int64_t T, int64_t H, int64_t first_row,
                                 epmoe_dtype dtype, void *out);
/* The refusal both conversions give (and the cuda backend's, which checks on the device): an
 * input element that is NaN/Inf (is_output 0), or an output value dtype cannot hold (1). */
epmoe_status epmoe_row_value_refused(int is_output, epmoe_dtype dtype, int64_t row, int64_t col,
                                     double value);

#ifdef __cplusplus
}
#endif
#endif
