/* Clamped SwiGLU (docs/design.md §3.3). Three variants:
 *   EPMOE_SWIGLU_DSV4: silu(min(g, L)) * clamp(u, -L, L)   (DeepSeek-V4, the default)
 *   EPMOE_SWIGLU_STEP: min(silu(g), L) * clamp(u, -L, L)   (SwigluStep, what the seed ran)
 *   EPMOE_SWIGLU_GPTOSS: g' = min(g, L), u' = clamp(u, -L, L),
 *                        (u' + 1) * (g' / (1 + expf(-(alpha * g'))))   (gpt-oss, alpha 1.702)
 * dsv4 and step differ whenever g > L: silu(L) = L / (1 + e^-L) is slightly below L, and for g
 * well above L the step variant returns exactly L while the DeepSeek-V4 one returns silu(L).
 * gpt-oss's reference writes g' * sigmoid(alpha g') and (u' + 1) * glu; the fp32 operations
 * here are fixed as written (one division, like silu), the CUDA kernel would do the same.
 *
 * The clamps are written as comparisons, not fminf/fmaxf, so that a NaN input stays NaN
 * (fminf(NaN, L) would return L and hide it). */
#include "kernels/ops.h"

#include <math.h>

static float silu(float g) { return g / (1.0f + expf(-g)); }

static float clamp_upper(float x, float limit) { return x > limit ? limit : x; }

static float clamp_both(float x, float limit) {
    if (x > limit) return limit;
    if (x < -limit) return -limit;
    return x;
}

void epmoe_cpu_swiglu(const float *h, int64_t rows, int64_t I, float limit, int variant,
                      float alpha, float *out) {
    int clamp = limit > 0.0f;
    /* Any value other than STEP or GPTOSS is treated as the DeepSeek-V4 variant, the default;
     * the config table only admits the enum names. */
    int step = variant == EPMOE_SWIGLU_STEP, gptoss = variant == EPMOE_SWIGLU_GPTOSS;
    for (int64_t r = 0; r < rows; r++) {
        const float *gate = h + r * 2 * I;
        const float *up = gate + I;
        float *o = out + r * I;
        for (int64_t i = 0; i < I; i++) {
            float g = gate[i], u = up[i];
            if (clamp) u = clamp_both(u, limit);
            float act;
            if (gptoss) {
                if (clamp) g = clamp_upper(g, limit);
                o[i] = (u + 1.0f) * (g / (1.0f + expf(-(alpha * g))));
                continue;
            }
            if (step) {
                act = silu(g);
                if (clamp) act = clamp_upper(act, limit);
            } else {
                act = silu(clamp ? clamp_upper(g, limit) : g);
            }
            o[i] = act * u;
        }
    }
}
