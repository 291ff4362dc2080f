/* A tiny self-contained test harness for the GPU suite (GPU machines have no Check): count
 * assertions, print every failure with file:line, print "N passed, N failed" last, exit
 * non-zero on any failure, 77 (ctest: skipped) when there is no CUDA device. */
#ifndef EPMOE_GPU_TEST_H
#define EPMOE_GPU_TEST_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cuda_runtime.h>

extern "C" {
#include "common/status.h"
}

static int gt_passed = 0, gt_failed = 0;

#define GT_CHECK(cond, ...)                                                                     \
    do {                                                                                        \
        if (cond) {                                                                             \
            gt_passed++;                                                                        \
        } else {                                                                                \
            gt_failed++;                                                                        \
            fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond);                     \
            fprintf(stderr, __VA_ARGS__);                                                       \
            fprintf(stderr, "\n");                                                              \
        }                                                                                       \
    } while (0)

/* An epmoe_status call that must succeed; on failure the test function returns. */
#define GT_OK(call)                                                                             \
    do {                                                                                        \
        epmoe_status gt_st_ = (call);                                                           \
        GT_CHECK(gt_st_ == EPMOE_OK, "%s -> %s: %s", #call, epmoe_status_name(gt_st_),          \
                 epmoe_last_error());                                                           \
        if (gt_st_ != EPMOE_OK) return;                                                         \
    } while (0)

/* A CUDA runtime call that must succeed; on failure the test function returns. */
#define GT_CUDA(call)                                                                           \
    do {                                                                                        \
        cudaError_t gt_err_ = (call);                                                           \
        GT_CHECK(gt_err_ == cudaSuccess, "%s -> %s", #call, cudaGetErrorString(gt_err_));       \
        if (gt_err_ != cudaSuccess) return;                                                     \
    } while (0)

/* EPMOE_GT_ONLY=text runs only the test functions whose name contains it (a quick rerun of
 * one part on the device); the others print that they were skipped. */
#define GT_RUN(fn)                                                                              \
    do {                                                                                        \
        const char *gt_only_ = getenv("EPMOE_GT_ONLY");                                         \
        if (gt_only_ && !strstr(#fn, gt_only_)) {                                               \
            fprintf(stdout, "-- %s: skipped (EPMOE_GT_ONLY=%s)\n", #fn, gt_only_);              \
            break;                                                                              \
        }                                                                                       \
        int gt_before_ = gt_failed;                                                             \
        fprintf(stdout, "-- %s\n", #fn);                                                        \
        fflush(stdout);                                                                         \
        fn();                                                                                   \
        fprintf(stdout, "   %s: %s\n", #fn, gt_failed == gt_before_ ? "ok" : "FAILED");         \
        fflush(stdout);                                                                         \
    } while (0)

/* xorshift32, the host-only programs' random numbers: a fixed start, so a failure repeats. */
static uint32_t gt_rng_state = 0x12345678u;
static inline uint32_t gt_next_u32(void) {
    gt_rng_state ^= gt_rng_state << 13;
    gt_rng_state ^= gt_rng_state >> 17;
    gt_rng_state ^= gt_rng_state << 5;
    return gt_rng_state;
}

/* 1 when a device is usable; else prints why and the summary line, and the caller exits 77. */
static int gt_have_device(void) {
    int n = 0;
    cudaError_t err = cudaGetDeviceCount(&n);
    if (err != cudaSuccess || n == 0) {
        printf("skipped: no CUDA device (%s)\n", err != cudaSuccess ? cudaGetErrorString(err) : "0 devices");
        printf("0 passed, 0 failed\n");
        return 0;
    }
    cudaDeviceProp prop;
    if (cudaGetDeviceProperties(&prop, 0) == cudaSuccess)
        printf("device 0: %s, compute capability %d.%d, %.1f GiB\n", prop.name, prop.major,
               prop.minor, prop.totalGlobalMem / 1073741824.0);
    return 1;
}

static int gt_finish(void) {
    printf("%d passed, %d failed\n", gt_passed, gt_failed);
    fflush(stdout);
    return gt_failed ? 1 : 0;
}

#endif
