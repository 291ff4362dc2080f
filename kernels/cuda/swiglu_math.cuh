/* Clamped SwiGLU of one element (docs/design.md §3.3), shared by the SwiGLU kernel and the fused
 * SwiGLU + NVFP4 quantization, so both compute the same bits; the fp32 operations are those of
 * epmoe_cpu_swiglu (kernels/cpu/swiglu.c), in its order, each an explicit round-to-nearest:
 *   dsv4: silu(min(g, L)) * clamp(u, -L, L)      step: min(silu(g), L) * clamp(u, -L, L)
 *   gptoss: g' = min(g, L), (clamp(u, -L, L) + 1) * (g' / (1 + expf(-(alpha * g'))))
 *   silu(g) = g / (1 + expf(-g)); limit <= 0 disables the clamp.
 * The per-expert gate/up biases (gpt-oss) are added to g and u before any of it, as the CPU
 * adds them to h right after the scaled W13 product. */
#ifndef EPMOE_SWIGLU_MATH_CUH
#define EPMOE_SWIGLU_MATH_CUH

#include <math.h>

#include "common/config.h"
#include "common/status.h"
#include "kernels/cuda/ops_cuda.h"

static inline epmoe_status swiglu_check_act(const epmoe_cuda_swiglu_act *act, const char *who) {
    EPMOE_REQUIRE(act->variant == EPMOE_SWIGLU_DSV4 || act->variant == EPMOE_SWIGLU_STEP ||
                      act->variant == EPMOE_SWIGLU_GPTOSS,
                  EPMOE_ERR_INVALID_ARG, "%s: unknown SwiGLU variant %d", who, act->variant);
    return EPMOE_OK;
}

static __device__ __forceinline__ float silu(float g) {
    return __fdiv_rn(g, __fadd_rn(1.0f, expf(-g)));
}

/* Clamps as comparisons, as the CPU: a NaN input stays NaN (fminf would hide it). */
static __device__ __forceinline__ float clamp_upper(float x, float limit) {
    return x > limit ? limit : x;
}

static __device__ __forceinline__ float clamp_both(float x, float limit) {
    return x > limit ? limit : (x < -limit ? -limit : x);
}

static __device__ __forceinline__ float swiglu_one(float g, float u,
                                                   const epmoe_cuda_swiglu_act &act) {
    const float limit = act.limit;
    if (act.variant == EPMOE_SWIGLU_GPTOSS) {
        if (limit > 0.0f) {
            u = clamp_both(u, limit);
            g = clamp_upper(g, limit);
        }
        const float glu = __fdiv_rn(g, __fadd_rn(1.0f, expf(-__fmul_rn(act.alpha, g))));
        return __fmul_rn(__fadd_rn(u, 1.0f), glu);
    }
    if (limit <= 0.0f) return __fmul_rn(silu(g), u);
    u = clamp_both(u, limit);
    if (act.variant == EPMOE_SWIGLU_STEP) return __fmul_rn(clamp_upper(silu(g), limit), u);
    return __fmul_rn(silu(clamp_upper(g, limit)), u);
}

/* Gate and up of column c of a row of h (gate columns [0, I), up [I, 2I)), plus the row's
 * expert's biases when there are any (bias_row: [2I], gate then up, or NULL). */
static __device__ __forceinline__ float swiglu_column(const float *h_row, const float *bias_row,
                                                      int64_t I, int64_t c,
                                                      const epmoe_cuda_swiglu_act &act) {
    float g = h_row[c], u = h_row[I + c];
    if (bias_row) {
        g = __fadd_rn(g, bias_row[c]);
        u = __fadd_rn(u, bias_row[I + c]);
    }
    return swiglu_one(g, u, act);
}

#endif
