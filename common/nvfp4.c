/* NVFP4 and MXFP4 block quantization (docs/design.md §3.4, §3.5).
 *
 * The fp32 arithmetic here is the contract the CUDA kernels reproduce bit for bit: each
 * expression is a sequence of single IEEE operations in a fixed order (products, then the
 * division), with no fused multiply-add (the build uses -ffp-contract=off) and no
 * multiplication by a reciprocal in place of a division. Keep that order when editing. */
#include "common/nvfp4.h"

#include <math.h>
#include <string.h>

#include "common/formats.h"

/* 2^e for e in [-149, 127], exact (built from bits). */
static float pow2f(int e) {
    uint32_t u = e >= -126 ? (uint32_t)(e + 127) << 23 : 1u << (e + 149);
    float x;
    memcpy(&x, &u, sizeof x);
    return x;
}

float epmoe_nvfp4_global_sf(float amax) {
    /* Invalid amax (NaN, Inf, negative) gives NaN so that the caller's finiteness check fails
     * loudly instead of quantizing everything to zero. */
    if (!(amax >= 0.0f) || isinf(amax)) return NAN;
    float global_sf = EPMOE_FP4_AMAX_TO_GLOBAL_SF / amax;
    if (amax == 0.0f || !isfinite(global_sf)) return 1.0f;
    return global_sf;
}

float epmoe_amax(const float *x, size_t n) {
    float amax = 0.0f;
    for (size_t i = 0; i < n; i++) {
        float a = fabsf(x[i]);
        if (isnan(a)) return NAN;
        if (a > amax) amax = a;
    }
    return amax;
}

static void put_nibble(uint8_t *codes, size_t k, uint8_t code) {
    if (k % 2 == 0)
        codes[k / 2] = (uint8_t)((codes[k / 2] & 0xf0) | (code & 0x0f));
    else
        codes[k / 2] = (uint8_t)((codes[k / 2] & 0x0f) | (uint8_t)(code << 4));
}

static uint8_t get_nibble(const uint8_t *codes, size_t k) {
    return (uint8_t)((k % 2 == 0) ? codes[k / 2] & 0x0f : codes[k / 2] >> 4);
}

size_t epmoe_nvfp4_quantize_row(const float *x, size_t K, float global_sf, uint8_t *codes,
                                uint8_t *block_sf) {
    size_t saturated = 0;
    for (size_t b = 0; b < K / EPMOE_NVFP4_BLOCK; b++) {
        const float *xb = x + b * EPMOE_NVFP4_BLOCK;
        float amax16 = epmoe_amax(xb, EPMOE_NVFP4_BLOCK);
        uint8_t sf = epmoe_float_to_e4m3_satfinite((global_sf * amax16) / EPMOE_E2M1_MAX);
        float sf_value = epmoe_e4m3_to_float(sf);
        block_sf[b] = sf;
        for (size_t i = 0; i < EPMOE_NVFP4_BLOCK; i++) {
            uint8_t code = 0;
            if (sf_value != 0.0f) {
                float scaled = (xb[i] * global_sf) / sf_value;
                if (fabsf(scaled) > EPMOE_E2M1_MAX) saturated++;
                code = epmoe_float_to_e2m1_satfinite(scaled);
            }
            put_nibble(codes, b * EPMOE_NVFP4_BLOCK + i, code);
        }
    }
    return saturated;
}

void epmoe_nvfp4_dequantize_row(const uint8_t *codes, const uint8_t *block_sf, size_t K,
                                float dequant_scale, float *out) {
    for (size_t k = 0; k < K; k++) {
        float sf_value = epmoe_e4m3_to_float(block_sf[k / EPMOE_NVFP4_BLOCK]);
        out[k] = (epmoe_e2m1_to_float(get_nibble(codes, k)) * sf_value) * dequant_scale;
    }
}

/* UE8M0 range: code 0 is 2^-127, code 254 is 2^127 (255 is NaN). */
#define UE8M0_MIN_EXP (-127)
#define UE8M0_MAX_EXP 127
#define E2M1_EMAX 2 /* 6 = 1.5 * 2^2 */

/* floor(log2(a)) for finite a > 0, from the bits (log2f could round across an integer). */
static int floor_log2(float a) {
    uint32_t u;
    memcpy(&u, &a, sizeof u);
    uint32_t exp_field = (u >> 23) & 0xff;
    if (exp_field != 0) return (int)exp_field - 127;
    int top = 31;
    while (!(u & (1u << top))) top--; /* subnormal: the leading one's position */
    return top - 149;
}

void epmoe_mxfp4_quantize_row(const float *x, size_t K, uint8_t *codes, uint8_t *block_e8m0) {
    for (size_t b = 0; b < K / EPMOE_MXFP4_BLOCK; b++) {
        const float *xb = x + b * EPMOE_MXFP4_BLOCK;
        float amax32 = epmoe_amax(xb, EPMOE_MXFP4_BLOCK);
        /* OCP MX: shared exponent = floor(log2(amax)) - emax(E2M1). An all-zero block takes
         * the smallest scale (code 0, 2^-127), as the OCP reference does for log2(0) = -Inf;
         * its codes are zero whatever the scale. */
        int shared_exp = UE8M0_MIN_EXP;
        if (amax32 > 0.0f && isfinite(amax32)) shared_exp = floor_log2(amax32) - E2M1_EMAX;
        if (isinf(amax32)) shared_exp = UE8M0_MAX_EXP;
        if (shared_exp < UE8M0_MIN_EXP) shared_exp = UE8M0_MIN_EXP;
        if (shared_exp > UE8M0_MAX_EXP) shared_exp = UE8M0_MAX_EXP;
        block_e8m0[b] = (uint8_t)(shared_exp + 127);
        /* Multiplying by 2^-shared_exp (a normal fp32 for every shared_exp in range) is exact
         * wherever the result can round to a nonzero code. */
        float inv_scale = pow2f(-shared_exp);
        for (size_t i = 0; i < EPMOE_MXFP4_BLOCK; i++)
            put_nibble(codes, b * EPMOE_MXFP4_BLOCK + i,
                       epmoe_float_to_e2m1_satfinite(xb[i] * inv_scale));
    }
}

void epmoe_mxfp4_dequantize_row(const uint8_t *codes, const uint8_t *block_e8m0, size_t K,
                                float *out) {
    for (size_t k = 0; k < K; k++) {
        float scale = epmoe_ue8m0_to_float(block_e8m0[k / EPMOE_MXFP4_BLOCK]);
        out[k] = epmoe_e2m1_to_float(get_nibble(codes, k)) * scale;
    }
}

/* UE4M3 code of 2^p for p in [-9, 8]: subnormals 2^-9..2^-7 (mantissa 1, 2, 4), then normals
 * with a zero mantissa. */
static uint8_t ue4m3_pow2_code(int p) {
    if (p < -6) return (uint8_t)(1u << (p + 9));
    return (uint8_t)((p + 7) << 3);
}

#define UE4M3_POW2_MIN (-9)
#define UE4M3_POW2_MAX 8

epmoe_status epmoe_mxfp4_to_nvfp4(const uint8_t *block_e8m0, size_t rows, size_t K,
                                  uint8_t *block_sf, float *weight_scale_2) {
    EPMOE_REQUIRE(K % EPMOE_MXFP4_BLOCK == 0, EPMOE_ERR_INVALID_ARG,
                  "MXFP4 row length K=%zu is not a multiple of %d", K, EPMOE_MXFP4_BLOCK);
    EPMOE_REQUIRE(block_e8m0 && block_sf && weight_scale_2, EPMOE_ERR_INVALID_ARG,
                  "mxfp4_to_nvfp4: NULL %s", !block_e8m0 ? "block_e8m0"
                                             : !block_sf ? "block_sf" : "weight_scale_2");
    size_t n_blocks = rows * (K / EPMOE_MXFP4_BLOCK);
    if (n_blocks == 0) {
        *weight_scale_2 = 1.0f;
        return EPMOE_OK;
    }
    size_t at_min = 0, at_max = 0;
    for (size_t i = 0; i < n_blocks; i++) {
        EPMOE_REQUIRE(block_e8m0[i] != 0xff, EPMOE_ERR_NUMERIC,
                      "MXFP4 scale %zu (row %zu, block %zu) is 0xff, the UE8M0 NaN", i,
                      i / (K / EPMOE_MXFP4_BLOCK), i % (K / EPMOE_MXFP4_BLOCK));
        if (block_e8m0[i] < block_e8m0[at_min]) at_min = i;
        if (block_e8m0[i] > block_e8m0[at_max]) at_max = i;
    }
    int e_max = block_e8m0[at_max], e_min = block_e8m0[at_min];
    int spread = e_max - e_min;
    EPMOE_REQUIRE(spread <= UE4M3_POW2_MAX - UE4M3_POW2_MIN, EPMOE_ERR_UNSUPPORTED,
                  "MXFP4 scales span 2^%d (block %zu) to 2^%d (block %zu), %d binades; an exact "
                  "NVFP4 conversion allows at most %d (UE4M3 powers of two 2^-9..2^8)",
                  e_min - 127, at_min, e_max - 127, at_max, spread,
                  UE4M3_POW2_MAX - UE4M3_POW2_MIN);
    for (size_t i = 0; i < n_blocks; i++) {
        uint8_t sf = ue4m3_pow2_code((int)block_e8m0[i] - e_max + UE4M3_POW2_MAX);
        block_sf[2 * i] = sf; /* one 32-block is two 16-blocks */
        block_sf[2 * i + 1] = sf;
    }
    *weight_scale_2 = pow2f(e_max - 127 - UE4M3_POW2_MAX);
    return EPMOE_OK;
}

/* ---- Blackwell 128x4 swizzled scale layout ---- */

static size_t round_up(size_t n, size_t m) { return (n + m - 1) / m * m; }

size_t epmoe_swizzled_sf_size(size_t rows, size_t cols) {
    return round_up(rows, 128) * round_up(cols, 4);
}

size_t epmoe_swizzled_sf_offset(size_t r, size_t c, size_t cols) {
    size_t padded_cols = round_up(cols, 4);
    return (r / 128) * (padded_cols / 4) * 512 + (c / 4) * 512 + (r % 32) * 16 +
           ((r % 128) / 32) * 4 + (c % 4);
}

void epmoe_swizzle_sf(const uint8_t *linear, size_t rows, size_t cols, uint8_t *swizzled) {
    memset(swizzled, 0, epmoe_swizzled_sf_size(rows, cols));
    for (size_t r = 0; r < rows; r++)
        for (size_t c = 0; c < cols; c++)
            swizzled[epmoe_swizzled_sf_offset(r, c, cols)] = linear[r * cols + c];
}

void epmoe_unswizzle_sf(const uint8_t *swizzled, size_t rows, size_t cols, uint8_t *linear) {
    for (size_t r = 0; r < rows; r++)
        for (size_t c = 0; c < cols; c++)
            linear[r * cols + c] = swizzled[epmoe_swizzled_sf_offset(r, c, cols)];
}
