/* Checked CUDA runtime and cuBLAS calls for library code: a failure records
 * "file:line: <call> failed: <error name> (<error string>); <hint>" as the thread's last error
 * and returns EPMOE_ERR_CUDA from the enclosing function (which must return epmoe_status).
 * Nothing here exits or aborts (common/status.h).
 *
 *   CUDA_TRY(cudaMemcpyAsync(...), "copying the routing ids");
 *   CUDA_TRY_LAUNCH("gate logits");   // after a <<<...>>> launch: checks cudaGetLastError,
 *                                     // which neither synchronizes nor breaks graph capture
 *   CUBLAS_TRY(cublasGemmEx(...), "shared expert w13");
 */
#ifndef EPMOE_CUDA_CHECK_H
#define EPMOE_CUDA_CHECK_H

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include "common/status.h"

#define CUDA_TRY(call, hint)                                                                    \
    do {                                                                                        \
        cudaError_t epmoe_cuda_err_ = (call);                                                   \
        if (epmoe_cuda_err_ != cudaSuccess)                                                     \
            return epmoe_set_error(EPMOE_ERR_CUDA, __FILE__, __LINE__,                          \
                                   "%s failed: %s (%s); %s", #call,                             \
                                   cudaGetErrorName(epmoe_cuda_err_),                           \
                                   cudaGetErrorString(epmoe_cuda_err_), (hint));                \
    } while (0)

#define CUDA_TRY_LAUNCH(what)                                                                   \
    do {                                                                                        \
        cudaError_t epmoe_cuda_err_ = cudaGetLastError();                                       \
        if (epmoe_cuda_err_ != cudaSuccess)                                                     \
            return epmoe_set_error(EPMOE_ERR_CUDA, __FILE__, __LINE__,                          \
                                   "launching %s failed: %s (%s); check the launch shape "      \
                                   "and that the binary was built for this GPU's architecture", \
                                   (what), cudaGetErrorName(epmoe_cuda_err_),                   \
                                   cudaGetErrorString(epmoe_cuda_err_));                        \
    } while (0)

static inline const char *epmoe_cublas_status_name(cublasStatus_t s) {
    switch (s) {
    case CUBLAS_STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_ALLOC_FAILED: return "CUBLAS_STATUS_ALLOC_FAILED";
    case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "CUBLAS_STATUS_ARCH_MISMATCH";
    case CUBLAS_STATUS_MAPPING_ERROR: return "CUBLAS_STATUS_MAPPING_ERROR";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
    case CUBLAS_STATUS_INTERNAL_ERROR: return "CUBLAS_STATUS_INTERNAL_ERROR";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
    case CUBLAS_STATUS_LICENSE_ERROR: return "CUBLAS_STATUS_LICENSE_ERROR";
    default: return "unknown cuBLAS status";
    }
}

#define CUBLAS_TRY(call, hint)                                                                  \
    do {                                                                                        \
        cublasStatus_t epmoe_cublas_st_ = (call);                                               \
        if (epmoe_cublas_st_ != CUBLAS_STATUS_SUCCESS)                                          \
            return epmoe_set_error(EPMOE_ERR_CUDA, __FILE__, __LINE__, "%s failed: %s; %s",     \
                                   #call, epmoe_cublas_status_name(epmoe_cublas_st_), (hint));  \
    } while (0)

#endif
