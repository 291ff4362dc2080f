/* Checks for the single-process benchmark programs (a program may exit; library code never
 * does): print file, line, the failing call and the reason, then exit(1). */
#ifndef EPMOE_BENCH_CHECK_H
#define EPMOE_BENCH_CHECK_H

#include <cstdio>
#include <cstdlib>

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include "common/status.h"

#define CHECK_CUDA(call)                                                                       \
    do {                                                                                       \
        cudaError_t e_ = (call);                                                               \
        if (e_ != cudaSuccess) {                                                               \
            fprintf(stderr, "%s:%d: %s failed: %s\n", __FILE__, __LINE__, #call,               \
                    cudaGetErrorString(e_));                                                   \
            exit(1);                                                                           \
        }                                                                                      \
    } while (0)
#define CHECK_CUBLAS(call)                                                                     \
    do {                                                                                       \
        cublasStatus_t s_ = (call);                                                            \
        if (s_ != CUBLAS_STATUS_SUCCESS) {                                                     \
            fprintf(stderr, "%s:%d: %s failed: %d\n", __FILE__, __LINE__, #call, (int)s_);     \
            exit(1);                                                                           \
        }                                                                                      \
    } while (0)
#define CHECK_EPMOE(call)                                                                      \
    do {                                                                                       \
        epmoe_status s_ = (call);                                                              \
        if (s_ != EPMOE_OK) {                                                                  \
            fprintf(stderr, "%s:%d: %s failed: %s\n", __FILE__, __LINE__, #call,               \
                    epmoe_last_error());                                                       \
            exit(1);                                                                           \
        }                                                                                      \
    } while (0)

#endif
