/* Element types as they appear in files and on the wire, and a small host tensor view. */
#ifndef EPMOE_TENSOR_H
#define EPMOE_TENSOR_H

#include <stddef.h>
#include <stdint.h>

#include "common/status.h"

#ifdef __cplusplus
extern "C" {
#endif

#define EPMOE_MAX_DIMS 8

typedef enum {
    EPMOE_DTYPE_F32 = 0,
    EPMOE_DTYPE_F64,
    EPMOE_DTYPE_BF16,
    EPMOE_DTYPE_F16,
    EPMOE_DTYPE_U8,
    EPMOE_DTYPE_I8,
    EPMOE_DTYPE_I32,
    EPMOE_DTYPE_I64,
    EPMOE_DTYPE_F8_E4M3,
    EPMOE_DTYPE_F8_E8M0,
    EPMOE_DTYPE_COUNT
} epmoe_dtype;

size_t epmoe_dtype_size(epmoe_dtype t);
/* safetensors spelling: "F32", "BF16", "F8_E4M3", "F8_E8M0", ... */
const char *epmoe_dtype_name(epmoe_dtype t);
epmoe_status epmoe_dtype_from_name(const char *name, epmoe_dtype *out);

typedef struct {
    epmoe_dtype dtype;
    int ndim;
    int64_t shape[EPMOE_MAX_DIMS];
    void *data; /* not owned */
} epmoe_tensor;

int64_t epmoe_tensor_numel(const epmoe_tensor *t);
size_t epmoe_tensor_nbytes(const epmoe_tensor *t);

/* Converts n elements of a float-like dtype (F32, F64, BF16, F16) to fp32. */
epmoe_status epmoe_convert_to_f32(epmoe_dtype src_dtype, const void *src, size_t n, float *dst);
/* Converts fp32 to F32, BF16 or F16 (RNE). */
epmoe_status epmoe_convert_from_f32(const float *src, size_t n, epmoe_dtype dst_dtype, void *dst);

#ifdef __cplusplus
}
#endif
#endif
