/* NVFP4 and MXFP4 block quantization (docs/design.md §3.4, §3.5).
 *
 * The fp32 arithmetic here is the contract the CUDA kernels reproduce bit for bit: each
 * expression is a sequence of single IEEE operations in a fixed order (products, then the
 * division), with no fused multiply-add (the build uses -ffp-contract=off) and no
 * multiplication by a reciprocal in place of a division. Keep that order when editing. */
#include "common/nvfp4.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
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
        uint8_t *out = codes + b * EPMOE_NVFP4_BLOCK / 2;
        if (sf_value == 0.0f) {
            memset(out, 0, EPMOE_NVFP4_BLOCK / 2);
            continue;
        }
        for (size_t i = 0; i < EPMOE_NVFP4_BLOCK; i += 2) { /* even element in the low nibble */
            float lo = (xb[i] * global_sf) / sf_value, hi = (xb[i + 1] * global_sf) / sf_value;
            saturated += (fabsf(lo) > EPMOE_E2M1_MAX) + (fabsf(hi) > EPMOE_E2M1_MAX);
            out[i / 2] = (uint8_t)(epmoe_e2m1_rn_satfinite_inline(lo) |
                                   epmoe_e2m1_rn_satfinite_inline(hi) << 4);
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
        uint8_t *out = codes + b * EPMOE_MXFP4_BLOCK / 2;
        for (size_t i = 0; i < EPMOE_MXFP4_BLOCK; i += 2) /* even element in the low nibble */
            out[i / 2] = (uint8_t)(epmoe_e2m1_rn_satfinite_inline(xb[i] * inv_scale) |
                                   epmoe_e2m1_rn_satfinite_inline(xb[i + 1] * inv_scale) << 4);
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
#define FP32_NORMAL_MIN_EXP (-126)
#define FP32_MAX_EXP 127
#define E2M1_SHIFT_MAX 3 /* 0.5 * 2^3 = 4 and 4 / 2^3 = 0.5: no code survives a larger shift */

/* Magnitude (low 3 bits) of the E2M1 code whose value is that of magnitude m times 2^t, or -1
 * when no E2M1 value equals it. Magnitudes: 0, 0.5, 1, 1.5, 2, 3, 4, 6. */
static int e2m1_magnitude_shifted(int m, int t) {
    static const float values[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
    float v = t >= 0 ? values[m] * (float)(1 << t) : values[m] / (float)(1 << -t);
    for (int j = 0; j < 8; j++)
        if (values[j] == v) return j;
    return -1;
}

/* How far each E2M1 magnitude (0, 0.5, 1, 1.5, 2, 3, 4, 6) can be multiplied by 2^t and stay
 * an E2M1 value: t in [-shift_down[m], shift_up[m]] (0.5 -> 1 -> 2 -> 4; 1.5 -> 3 -> 6). */
static const int8_t shift_up[8] = {E2M1_SHIFT_MAX, 3, 2, 2, 1, 1, 0, 0};
static const int8_t shift_down[8] = {E2M1_SHIFT_MAX, 0, 1, 0, 2, 1, 3, 2};

/* One nonzero 16-element block of an MXFP4 tensor, as the conversion's pass 1 sees it. */
typedef struct {
    int exp;      /* block scale 2^exp (the UE8M0 code minus 127) */
    int up, down; /* its codes stay E2M1 values when multiplied by 2^t, -down <= t <= up */
} mx_block;

/* Whether 16-element block i holds only zero magnitudes (its 16 codes are one 8-byte word). */
static int block_is_zero(const uint8_t *codes, size_t i) {
    uint64_t word;
    _Static_assert(EPMOE_NVFP4_BLOCK / 2 == sizeof word, "a 16-element block is 8 bytes");
    memcpy(&word, codes + i * sizeof word, sizeof word);
    return (word & 0x7777777777777777ull) == 0;
}

static mx_block describe_block(const uint8_t *codes, size_t i, uint8_t e8m0) {
    mx_block b = {(int)e8m0 - 127, E2M1_SHIFT_MAX, E2M1_SHIFT_MAX};
    const uint8_t *bytes = codes + i * (EPMOE_NVFP4_BLOCK / 2);
    for (size_t i = 0; i < EPMOE_NVFP4_BLOCK / 2; i++) {
        int lo_m = bytes[i] & 7, hi_m = (bytes[i] >> 4) & 7;
        if (shift_up[lo_m] < b.up) b.up = shift_up[lo_m];
        if (shift_up[hi_m] < b.up) b.up = shift_up[hi_m];
        if (shift_down[lo_m] < b.down) b.down = shift_down[lo_m];
        if (shift_down[hi_m] < b.down) b.down = shift_down[hi_m];
    }
    return b;
}

epmoe_status epmoe_mxfp4_to_nvfp4(const uint8_t *codes, const uint8_t *block_e8m0, size_t rows,
                                  size_t K, uint8_t *codes_out, uint8_t *block_sf,
                                  float *weight_scale_2, epmoe_mxfp4_conversion *info) {
    EPMOE_REQUIRE(K % EPMOE_MXFP4_BLOCK == 0, EPMOE_ERR_INVALID_ARG,
                  "MXFP4 row length K=%zu is not a multiple of %d", K, EPMOE_MXFP4_BLOCK);
    EPMOE_REQUIRE(codes && block_e8m0 && codes_out && block_sf && weight_scale_2,
                  EPMOE_ERR_INVALID_ARG, "mxfp4_to_nvfp4: NULL argument");
    epmoe_mxfp4_conversion stats = {0, 0};
    const size_t per_row = K / EPMOE_NVFP4_BLOCK, n_blocks = rows * per_row;
    /* Pass 0: the scales are numbers, and the exponent range of the nonzero blocks. */
    int e_top = INT32_MIN, e_min = INT32_MAX;
    for (size_t i = 0; i < n_blocks; i++) {
        uint8_t e8m0 = block_e8m0[i / 2]; /* one 32-block is two 16-blocks */
        EPMOE_REQUIRE(e8m0 != 0xff, EPMOE_ERR_NUMERIC,
                      "MXFP4 scale [%zu, %zu] is 0xff, the UE8M0 NaN", i / per_row,
                      (i % per_row) / 2);
        if (block_is_zero(codes, i)) continue;
        const int exp = (int)e8m0 - 127;
        if (exp > e_top) e_top = exp;
        if (exp < e_min) e_min = exp;
    }
    if (e_top == INT32_MIN) { /* every block zero: any scale will do */
        memset(block_sf, 0, n_blocks);
        if (codes_out != codes) memcpy(codes_out, codes, rows * K / 2);
        *weight_scale_2 = 1.0f;
        if (info) *info = (epmoe_mxfp4_conversion){n_blocks, 0};
        return EPMOE_OK;
    }
    /* The tensor scale of the plain conversion: the largest block at 2^8, no code moved. When
     * every nonzero block lies within the 17 binades below it (the usual tensor) and 2^A is a
     * normal fp32, it is what pass 1 would choose, so pass 1 is skipped. */
    int A = e_top - UE4M3_POW2_MAX;
    if (e_top - e_min > UE4M3_POW2_MAX - UE4M3_POW2_MIN || A < FP32_NORMAL_MIN_EXP) {
        /* Pass 1: each nonzero block b allows tensor scales 2^A with
         *   exp_b - 8 - up_b <= A <= exp_b + 9 + down_b
         * (its UE4M3 power q = exp_b - A - t in [-9, 8] for a code shift t in
         * [-down_b, up_b]); 2^A itself must be a normal fp32. */
        int lo = FP32_NORMAL_MIN_EXP, hi = FP32_MAX_EXP;
        size_t at_lo = n_blocks, at_hi = n_blocks;
        for (size_t i = 0; i < n_blocks; i++) {
            if (block_is_zero(codes, i)) continue;
            mx_block b = describe_block(codes, i, block_e8m0[i / 2]);
            if (b.exp - UE4M3_POW2_MAX - b.up > lo) lo = b.exp - UE4M3_POW2_MAX - b.up, at_lo = i;
            if (b.exp - UE4M3_POW2_MIN + b.down < hi)
                hi = b.exp - UE4M3_POW2_MIN + b.down, at_hi = i;
        }
        if (lo > hi) {
            char why_lo[96], why_hi[96];
            if (at_lo < n_blocks)
                snprintf(why_lo, sizeof why_lo, "block [%zu, %zu] (scale 2^%d) needs >= 2^%d",
                         at_lo / per_row, (at_lo % per_row) * EPMOE_NVFP4_BLOCK,
                         (int)block_e8m0[at_lo / 2] - 127, lo);
            else
                snprintf(why_lo, sizeof why_lo, "a normal fp32 needs >= 2^%d", lo);
            if (at_hi < n_blocks)
                snprintf(why_hi, sizeof why_hi, "block [%zu, %zu] (scale 2^%d) needs <= 2^%d",
                         at_hi / per_row, (at_hi % per_row) * EPMOE_NVFP4_BLOCK,
                         (int)block_e8m0[at_hi / 2] - 127, hi);
            else
                snprintf(why_hi, sizeof why_hi, "a finite fp32 needs <= 2^%d", hi);
            EPMOE_FAIL(EPMOE_ERR_UNSUPPORTED,
                       "MXFP4 tensor cannot be converted to NVFP4 exactly: no tensor scale fits "
                       "every block (%s; %s; UE4M3 powers of two span 2^-9..2^8, and a block's "
                       "codes can be rescaled only while they stay E2M1 values)",
                       why_lo, why_hi);
        }
        if (A < lo) A = lo;
        if (A > hi) A = hi;
    }

    /* Pass 2: each block's UE4M3 power, and its codes moved by t where the power alone
     * cannot reach. */
    if (codes_out != codes) memcpy(codes_out, codes, rows * K / 2);
    for (size_t i = 0; i < n_blocks; i++) {
        if (block_is_zero(codes_out, i)) { /* codes_out holds block i's codes unchanged yet */
            block_sf[i] = 0;
            stats.zero_blocks++;
            continue;
        }
        int q = (int)block_e8m0[i / 2] - 127 - A, t = 0;
        if (q > UE4M3_POW2_MAX) t = q - UE4M3_POW2_MAX, q = UE4M3_POW2_MAX;
        if (q < UE4M3_POW2_MIN) t = q - UE4M3_POW2_MIN, q = UE4M3_POW2_MIN;
        block_sf[i] = ue4m3_pow2_code(q);
        if (t == 0) continue;
        stats.shifted_blocks++;
        const size_t first = i * EPMOE_NVFP4_BLOCK;
        for (size_t k = first; k < first + EPMOE_NVFP4_BLOCK; k++) {
            uint8_t c = get_nibble(codes_out, k);
            int m = e2m1_magnitude_shifted(c & 7, t); /* >= 0: pass 1 checked the range */
            put_nibble(codes_out, k, (uint8_t)((c & 8) | (m < 0 ? 0 : m)));
        }
    }
    *weight_scale_2 = pow2f(A);
    if (info) *info = stats;
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
