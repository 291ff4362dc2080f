#include "common/tensor.h"

#include <string.h>

#include "common/formats.h"

typedef struct {
    const char *name; /* safetensors spelling */
    size_t size;      /* bytes per element */
} dtype_info;

/* Indexed by epmoe_dtype. */
static const dtype_info dtypes[EPMOE_DTYPE_COUNT] = {
    [EPMOE_DTYPE_F32] = {"F32", 4},         [EPMOE_DTYPE_F64] = {"F64", 8},
    [EPMOE_DTYPE_BF16] = {"BF16", 2},       [EPMOE_DTYPE_F16] = {"F16", 2},
    [EPMOE_DTYPE_U8] = {"U8", 1},           [EPMOE_DTYPE_I8] = {"I8", 1},
    [EPMOE_DTYPE_I32] = {"I32", 4},         [EPMOE_DTYPE_I64] = {"I64", 8},
    [EPMOE_DTYPE_F8_E4M3] = {"F8_E4M3", 1}, [EPMOE_DTYPE_F8_E8M0] = {"F8_E8M0", 1},
};

static int dtype_valid(epmoe_dtype t) { return (int)t >= 0 && t < EPMOE_DTYPE_COUNT; }

size_t epmoe_dtype_size(epmoe_dtype t) { return dtype_valid(t) ? dtypes[t].size : 0; }

const char *epmoe_dtype_name(epmoe_dtype t) { return dtype_valid(t) ? dtypes[t].name : "?"; }

epmoe_status epmoe_dtype_from_name(const char *name, epmoe_dtype *out) {
    EPMOE_REQUIRE(name != NULL, EPMOE_ERR_INVALID_ARG, "dtype name is NULL");
    for (int t = 0; t < EPMOE_DTYPE_COUNT; t++) {
        if (strcmp(dtypes[t].name, name) == 0) {
            *out = (epmoe_dtype)t;
            return EPMOE_OK;
        }
    }
    EPMOE_FAIL(EPMOE_ERR_FORMAT,
               "unknown dtype '%s' (known: F32 F64 BF16 F16 U8 I8 I32 I64 F8_E4M3 F8_E8M0)", name);
}

int64_t epmoe_tensor_numel(const epmoe_tensor *t) {
    int64_t n = 1;
    for (int d = 0; d < t->ndim; d++) n *= t->shape[d];
    return n;
}

size_t epmoe_tensor_nbytes(const epmoe_tensor *t) {
    return (size_t)epmoe_tensor_numel(t) * epmoe_dtype_size(t->dtype);
}

/* Element loads go through memcpy: file data (mmapped safetensors) need not be aligned. */
epmoe_status epmoe_convert_to_f32(epmoe_dtype src_dtype, const void *src, size_t n, float *dst) {
    const unsigned char *p = (const unsigned char *)src;
    switch (src_dtype) {
    case EPMOE_DTYPE_F32: memmove(dst, src, n * sizeof(float)); return EPMOE_OK;
    case EPMOE_DTYPE_F64:
        for (size_t i = 0; i < n; i++) {
            double v;
            memcpy(&v, p + 8 * i, 8);
            dst[i] = (float)v;
        }
        return EPMOE_OK;
    case EPMOE_DTYPE_BF16:
    case EPMOE_DTYPE_F16:
        for (size_t i = 0; i < n; i++) {
            uint16_t bits;
            memcpy(&bits, p + 2 * i, 2);
            dst[i] = src_dtype == EPMOE_DTYPE_BF16 ? epmoe_bf16_to_float(bits)
                                                   : epmoe_fp16_to_float(bits);
        }
        return EPMOE_OK;
    default: break;
    }
    EPMOE_FAIL(EPMOE_ERR_UNSUPPORTED, "cannot convert dtype %s to F32 (F32, F64, BF16, F16 only)",
               epmoe_dtype_name(src_dtype));
}

epmoe_status epmoe_convert_from_f32(const float *src, size_t n, epmoe_dtype dst_dtype, void *dst) {
    unsigned char *p = (unsigned char *)dst;
    switch (dst_dtype) {
    case EPMOE_DTYPE_F32: memmove(dst, src, n * sizeof(float)); return EPMOE_OK;
    case EPMOE_DTYPE_BF16:
    case EPMOE_DTYPE_F16:
        for (size_t i = 0; i < n; i++) {
            uint16_t bits = dst_dtype == EPMOE_DTYPE_BF16 ? epmoe_float_to_bf16(src[i])
                                                          : epmoe_float_to_fp16(src[i]);
            memcpy(p + 2 * i, &bits, 2);
        }
        return EPMOE_OK;
    default: break;
    }
    EPMOE_FAIL(EPMOE_ERR_UNSUPPORTED, "cannot convert F32 to dtype %s (F32, BF16, F16 only)",
               epmoe_dtype_name(dst_dtype));
}
