/* NVFP4 activation quantization per row, bit-identical to common/nvfp4.h:
 *   gs    = 2688 / amax(row)        (1 when amax == 0 or the quotient is not finite)
 *   sf    = e4m3_rn_satfinite((gs * amax16) / 6)
 *   code  = e2m1_rn_satfinite((x * gs) / float(sf))    (0 when sf == 0)
 * Every fp32 operation is an explicit round-to-nearest intrinsic (and the library is built
 * with -fmad=false), so no contraction can change a bit.
 * Output rows may be longer than the row (K_pad > K): the grouped GEMMs step K by 128, and a
 * hidden size such as gpt-oss's 2880 is not a multiple of it. The extra elements get code 0 and
 * block scale 0, which dequantize to exact zeros, so the padded product adds +0 terms and
 * equals the unpadded one. */
#include <math.h>

#include "common/nvfp4.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/ops_cuda.h"
#include "kernels/cuda/swiglu_math.cuh"

#define QUANT_THREADS 128

/* UE4M3 (fp8 e4m3fn with sign 0) of a value >= 0, round to nearest even, saturating at 448.
 * Subnormals are multiples of 2^-9; the code 0x08 that rounding can reach from below is the
 * smallest normal, 2^-6, so the arithmetic on codes stays right across the boundary. */
static __device__ __forceinline__ uint8_t ue4m3_rn_satfinite(float v) {
    if (!(v > 0.0f)) return 0;
    if (v >= 448.0f) return 0x7e;
    int exp2;
    frexpf(v, &exp2);     /* v = m * 2^exp2, m in [0.5, 1) */
    int e = exp2 - 1;     /* v in [2^e, 2^(e+1)) */
    if (e < -6) return (uint8_t)rintf(ldexpf(v, 9));
    int q = (int)rintf(ldexpf(v, 3 - e)); /* 8..16: 1.mmm in eighths */
    if (q == 16) {
        e += 1;
        q = 8;
    }
    int code = ((e + 7) << 3) | (q - 8);
    return (uint8_t)(code > 0x7e ? 0x7e : code);
}

static __device__ __forceinline__ float ue4m3_to_float(uint8_t code) {
    int e = (code >> 3) & 0xf, m = code & 7;
    if (e == 0) return ldexpf((float)m, -9);
    return ldexpf((float)(8 + m), e - 10);
}

/* E2M1 code of x, round to nearest even (ties go to the even code), saturating at +-6.
 * Negative values carry the sign bit even when they round to zero; NaN gives 0. */
static __device__ __forceinline__ uint8_t e2m1_rn_satfinite(float x) {
    if (isnan(x)) return 0;
    float a = fabsf(x);
    uint8_t m;
    if (a <= 0.25f) m = 0;       /* tie 0.25 -> 0   (code 0 even) */
    else if (a < 0.75f) m = 1;   /* tie 0.75 -> 1.0 (code 2) */
    else if (a <= 1.25f) m = 2;  /* tie 1.25 -> 1.0 */
    else if (a < 1.75f) m = 3;   /* tie 1.75 -> 2.0 (code 4) */
    else if (a <= 2.5f) m = 4;   /* tie 2.5  -> 2.0 */
    else if (a < 3.5f) m = 5;    /* tie 3.5  -> 4.0 (code 6) */
    else if (a <= 5.0f) m = 6;   /* tie 5.0  -> 4.0 */
    else m = 7;
    return (uint8_t)(m | (signbit(x) ? 8 : 0));
}

static __device__ __forceinline__ float nvfp4_global_sf(float amax) {
    if (amax == 0.0f) return 1.0f;
    float gs = __fdiv_rn(EPMOE_FP4_AMAX_TO_GLOBAL_SF, amax);
    return isfinite(gs) ? gs : 1.0f;
}

static __device__ __forceinline__ float block_max_abs(float v) {
    __shared__ float warp_max[QUANT_THREADS / 32];
    for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
    if ((threadIdx.x & 31) == 0) warp_max[threadIdx.x >> 5] = v;
    __syncthreads();
    float m = warp_max[0];
    for (int w = 1; w < QUANT_THREADS / 32; w++) m = fmaxf(m, warp_max[w]);
    return m;
}

static __device__ __forceinline__ void load16(const float *src, float v[16]) {
    const float4 *s4 = (const float4 *)src;
    for (int i = 0; i < 4; i++) {
        float4 q = s4[i];
        v[4 * i] = q.x;
        v[4 * i + 1] = q.y;
        v[4 * i + 2] = q.z;
        v[4 * i + 3] = q.w;
    }
}

/* Quantizes one row of K floats at src (global or shared memory, 16-byte aligned) with the
 * whole block (QUANT_THREADS threads; thread i takes 16-element blocks i, i + 128, ...) into
 * K_pad elements of codes_row / sf_row, [K, K_pad) as zeros.
 * static_inv_scale > 0: gs = 1 / it (a static per-expert scale); else gs from the row's amax.
 * Returns this thread's count of saturated elements. Every thread of the block must call it. */
static __device__ unsigned long long quantize_row(const float *src, int64_t K, int64_t K_pad,
                                                  float static_input_scale, uint8_t *codes_row,
                                                  uint8_t *sf_row, float *inv_global_sf_row) {
    const int64_t n_blocks = K / 16;
    float gs;
    if (static_input_scale > 0.0f) {
        gs = __fdiv_rn(1.0f, static_input_scale);
    } else {
        float m = 0.0f;
        for (int64_t b = threadIdx.x; b < n_blocks; b += QUANT_THREADS) {
            float v[16];
            load16(src + b * 16, v);
            for (int i = 0; i < 16; i++) m = fmaxf(m, fabsf(v[i]));
        }
        gs = nvfp4_global_sf(block_max_abs(m));
    }
    unsigned long long n_saturated = 0;
    for (int64_t b = threadIdx.x; b < n_blocks; b += QUANT_THREADS) {
        float v[16];
        load16(src + b * 16, v);
        float amax16 = 0.0f;
        for (int i = 0; i < 16; i++) amax16 = fmaxf(amax16, fabsf(v[i]));
        uint8_t sf = ue4m3_rn_satfinite(__fdiv_rn(__fmul_rn(gs, amax16), 6.0f));
        float sf_f = ue4m3_to_float(sf);
        uint32_t packed[2] = {0, 0};
        if (sf != 0) {
            for (int i = 0; i < 16; i++) {
                float q = __fdiv_rn(__fmul_rn(v[i], gs), sf_f);
                if (fabsf(q) > 6.0f) n_saturated++;
                packed[i / 8] |= (uint32_t)e2m1_rn_satfinite(q) << (4 * (i % 8));
            }
        }
        *(uint2 *)(codes_row + b * 8) = make_uint2(packed[0], packed[1]);
        sf_row[b] = sf;
    }
    for (int64_t b = n_blocks + threadIdx.x; b < K_pad / 16; b += QUANT_THREADS) {
        *(uint2 *)(codes_row + b * 8) = make_uint2(0, 0);
        sf_row[b] = 0;
    }
    if (threadIdx.x == 0) *inv_global_sf_row = __fdiv_rn(1.0f, gs);
    return n_saturated;
}

/* One block per row (dense rows, or every row of the padded layout of which padding returns at
 * once). */
__global__ void nvfp4_quantize_rows_kernel(const float *x, int64_t x_stride, int64_t K,
                                           int64_t K_pad, const int32_t *row_index,
                                           const int64_t *padded_offsets,
                                           const int64_t *tokens_per_expert, int64_t n_local,
                                           const float *static_input_scale, uint8_t *codes,
                                           uint8_t *block_sf, float *inv_global_sf,
                                           unsigned long long *saturated) {
    const int64_t row = blockIdx.x;
    int64_t expert = 0;
    if (padded_offsets) {
        expert = epmoe_cuda_expert_of_real_row(padded_offsets, tokens_per_expert, n_local, row);
        if (expert < 0) return; /* padding: never read by the GEMM */
    }
    const float *src = x + (row_index ? (int64_t)row_index[row] : row) * x_stride;
    unsigned long long n_saturated =
        quantize_row(src, K, K_pad, static_input_scale ? static_input_scale[expert] : 0.0f,
                     codes + row * (K_pad / 2), block_sf + row * (K_pad / 16), inv_global_sf + row);
    if (saturated && n_saturated) atomicAdd(saturated, n_saturated);
}

/* The W2 input in one pass: SwiGLU of a row of h (its expert's biases added first, when the
 * experts have them) into shared memory, then its quantization (the activation never goes to
 * device memory in fp32). One block per padded row. */
__global__ void swiglu_nvfp4_quantize_kernel(const float *h, int64_t I, int64_t I_pad,
                                             epmoe_cuda_swiglu_act act, const float *bias,
                                             const int64_t *padded_offsets,
                                             const int64_t *tokens_per_expert, int64_t n_local,
                                             const float *static_input_scale, uint8_t *codes,
                                             uint8_t *block_sf, float *inv_global_sf,
                                             unsigned long long *saturated) {
    extern __shared__ __align__(16) float act_row[]; /* [I] */
    const int64_t row = blockIdx.x;
    const int64_t expert =
        epmoe_cuda_expert_of_real_row(padded_offsets, tokens_per_expert, n_local, row);
    if (expert < 0) return;
    const float *h_row = h + row * 2 * I;
    const float *bias_row = bias ? bias + expert * 2 * I : NULL;
    for (int64_t c = threadIdx.x; c < I; c += blockDim.x)
        act_row[c] = swiglu_column(h_row, bias_row, I, c, act);
    __syncthreads();
    unsigned long long n_saturated =
        quantize_row(act_row, I, I_pad, static_input_scale ? static_input_scale[expert] : 0.0f,
                     codes + row * (I_pad / 2), block_sf + row * (I_pad / 16),
                     inv_global_sf + row);
    if (saturated && n_saturated) atomicAdd(saturated, n_saturated);
}

epmoe_status epmoe_cuda_swiglu_nvfp4_quantize(const float *h, int64_t cap_rows, int64_t I,
                                              int64_t I_pad, const epmoe_cuda_swiglu_act *act,
                                              const float *bias,
                                              const int64_t *padded_offsets,
                                              const int64_t *tokens_per_expert, int64_t n_local,
                                              const float *static_input_scale, uint8_t *codes,
                                              uint8_t *block_sf, float *inv_global_sf,
                                              unsigned long long *saturated,
                                              cudaStream_t stream) {
    EPMOE_REQUIRE(cap_rows >= 0 && I > 0 && I % 16 == 0 && I_pad >= I && I_pad % 16 == 0 &&
                      padded_offsets && tokens_per_expert && n_local > 0,
                  EPMOE_ERR_INVALID_ARG,
                  "swiglu+quantize: I=%lld and I_pad=%lld (>= I, multiples of 16), "
                  "cap_rows=%lld, and the padded layout are required",
                  (long long)I, (long long)I_pad, (long long)cap_rows);
    EPMOE_TRY(swiglu_check_act(act, "swiglu+quantize"));
    EPMOE_REQUIRE(I <= EPMOE_CUDA_MAX_FUSED_INTER, EPMOE_ERR_UNSUPPORTED,
                  "swiglu+quantize: I=%lld needs %lld bytes of shared memory (48 KiB at most)",
                  (long long)I, (long long)I * 4);
    const size_t smem = (size_t)I * sizeof(float);
    if (cap_rows == 0) return EPMOE_OK;
    swiglu_nvfp4_quantize_kernel<<<(unsigned)cap_rows, QUANT_THREADS, smem, stream>>>(
        h, I, I_pad, *act, bias, padded_offsets, tokens_per_expert, n_local, static_input_scale,
        codes, block_sf, inv_global_sf, saturated);
    CUDA_TRY_LAUNCH("swiglu_nvfp4_quantize_kernel");
    return EPMOE_OK;
}

epmoe_status epmoe_cuda_nvfp4_quantize_rows(const float *x, int64_t x_stride, int64_t rows,
                                            int64_t K, int64_t K_pad,
                                            const int32_t *row_index,
                                            const int64_t *padded_offsets,
                                            const int64_t *tokens_per_expert, int64_t n_local,
                                            const float *static_input_scale, uint8_t *codes,
                                            uint8_t *block_sf, float *inv_global_sf,
                                            unsigned long long *saturated, cudaStream_t stream) {
    EPMOE_REQUIRE(rows >= 0 && K > 0 && K % 16 == 0 && K_pad >= K && K_pad % 16 == 0,
                  EPMOE_ERR_INVALID_ARG,
                  "nvfp4 quantize: K=%lld and K_pad=%lld must be positive multiples of 16, K_pad "
                  ">= K (rows=%lld)",
                  (long long)K, (long long)K_pad, (long long)rows);
    EPMOE_REQUIRE(x_stride >= K && x_stride % 4 == 0, EPMOE_ERR_INVALID_ARG,
                  "nvfp4 quantize: row stride %lld floats for K=%lld (>= K, a multiple of 4 for "
                  "16-byte loads)", (long long)x_stride, (long long)K);
    EPMOE_REQUIRE(!static_input_scale || padded_offsets, EPMOE_ERR_INVALID_ARG,
                  "nvfp4 quantize: static input scales are per expert and need the padded "
                  "layout");
    EPMOE_REQUIRE(!padded_offsets || (tokens_per_expert && n_local > 0), EPMOE_ERR_INVALID_ARG,
                  "nvfp4 quantize: the padded layout needs tokens_per_expert and n_local > 0");
    if (rows == 0) return EPMOE_OK;
    nvfp4_quantize_rows_kernel<<<(unsigned)rows, QUANT_THREADS, 0, stream>>>(
        x, x_stride, K, K_pad, row_index, padded_offsets, tokens_per_expert, n_local, static_input_scale, codes,
        block_sf, inv_global_sf, saturated);
    CUDA_TRY_LAUNCH("nvfp4_quantize_rows_kernel");
    return EPMOE_OK;
}

/* One block per padded row; padding rows return at once. Codes move 16 bytes a thread, the
 * scales 2 (K is a multiple of 32; the record's offsets and stride are aligned for it, see
 * common/dispatch_record.h). */
__global__ void nvfp4_gather_rows_kernel(const uint8_t *src, int64_t src_stride,
                                         int64_t codes_offset, int64_t sf_offset,
                                         int64_t inv_gs_offset, int64_t K, int64_t K_pad,
                                         const int32_t *token_of_row,
                                         const int64_t *padded_offsets,
                                         const int64_t *tokens_per_expert, int64_t n_local,
                                         uint8_t *codes, uint8_t *block_sf, float *inv_global_sf) {
    const int64_t row = blockIdx.x;
    if (epmoe_cuda_expert_of_real_row(padded_offsets, tokens_per_expert, n_local, row) < 0)
        return;
    const uint8_t *rec = src + (int64_t)token_of_row[row] * src_stride;
    const uint4 *c_src = (const uint4 *)(rec + codes_offset);
    uint4 *c_dst = (uint4 *)(codes + row * (K_pad / 2));
    for (int64_t i = threadIdx.x; i < K_pad / 32; i += blockDim.x)
        c_dst[i] = i < K / 32 ? c_src[i] : make_uint4(0, 0, 0, 0);
    const uint16_t *s_src = (const uint16_t *)(rec + sf_offset);
    uint16_t *s_dst = (uint16_t *)(block_sf + row * (K_pad / 16));
    for (int64_t i = threadIdx.x; i < K_pad / 32; i += blockDim.x)
        s_dst[i] = i < K / 32 ? s_src[i] : (uint16_t)0;
    if (threadIdx.x == 0) inv_global_sf[row] = *(const float *)(rec + inv_gs_offset);
}

epmoe_status epmoe_cuda_nvfp4_gather_rows(const uint8_t *src, int64_t src_stride,
                                          int64_t codes_offset, int64_t sf_offset,
                                          int64_t inv_gs_offset, int64_t K, int64_t K_pad,
                                          const int32_t *token_of_row,
                                          const int64_t *padded_offsets,
                                          const int64_t *tokens_per_expert, int64_t n_local,
                                          int64_t cap_rows, uint8_t *codes, uint8_t *block_sf,
                                          float *inv_global_sf, cudaStream_t stream) {
    EPMOE_REQUIRE(K > 0 && K % 32 == 0 && K_pad >= K && K_pad % 32 == 0 && cap_rows >= 0 &&
                      n_local > 0 && src_stride % 16 == 0 && codes_offset % 16 == 0 &&
                      sf_offset % 2 == 0 && inv_gs_offset % 4 == 0,
                  EPMOE_ERR_INVALID_ARG,
                  "nvfp4 gather: K=%lld, K_pad=%lld (multiples of 32, K_pad >= K), stride %lld "
                  "and offsets %lld/%lld/%lld (16/2/4-byte aligned), cap_rows=%lld",
                  (long long)K, (long long)K_pad, (long long)src_stride, (long long)codes_offset,
                  (long long)sf_offset, (long long)inv_gs_offset, (long long)cap_rows);
    if (cap_rows == 0) return EPMOE_OK;
    nvfp4_gather_rows_kernel<<<(unsigned)cap_rows, 64, 0, stream>>>(
        src, src_stride, codes_offset, sf_offset, inv_gs_offset, K, K_pad, token_of_row, padded_offsets,
        tokens_per_expert, n_local, codes, block_sf, inv_global_sf);
    CUDA_TRY_LAUNCH("nvfp4_gather_rows_kernel");
    return EPMOE_OK;
}
