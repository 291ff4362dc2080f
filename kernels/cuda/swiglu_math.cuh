/* Clamped SwiGLU of one element (docs/design.md §3.3), shared by the SwiGLU kernel and the fused
 * SwiGLU + NVFP4 quantization, so both compute the same bits:
 *   dsv4: silu(min(g, L)) * clamp(u, -L, L)      step: min(silu(g), L) * clamp(u, -L, L)
 *   silu(g) = g / (1 + expf(-g)); limit <= 0 disables the clamp. */
#ifndef EPMOE_SWIGLU_MATH_CUH
#define EPMOE_SWIGLU_MATH_CUH

#include <math.h>

#include "common/config.h"

static __device__ __forceinline__ float silu(float g) {
    return __fdiv_rn(g, __fadd_rn(1.0f, expf(-g)));
}

/* Clamps as comparisons, as the CPU: a NaN input stays NaN (fminf would hide it). */
static __device__ __forceinline__ float clamp_upper(float x, float limit) {
    return x > limit ? limit : x;
}

static __device__ __forceinline__ float swiglu_one(float g, float u, float limit, int variant) {
    if (limit <= 0.0f) return __fmul_rn(silu(g), u);
    u = u > limit ? limit : (u < -limit ? -limit : u);
    if (variant == EPMOE_SWIGLU_STEP) return __fmul_rn(clamp_upper(silu(g), limit), u);
    return __fmul_rn(silu(clamp_upper(g, limit)), u);
}

#endif
