/* FP8 activation quantization (act_quant = fp8), bit-identical to common/fp8.h: per block of
 * 128 along K, e = the smallest exponent with amax <= 448 * 2^e (clamped to
 * [EPMOE_FP8_MIN_EXP, 127]; 0 for a zero block), code = e4m3_rn_satfinite(x * 2^-e). The
 * multiplication by 2^-e is exact and the conversion is the hardware's round-to-nearest-even
 * with saturation, as the CPU's; the exponent is integer arithmetic on amax's bits
 * (fp8_math.cuh).
 *
 * One warp per row, its blocks in turn, four elements a lane. Two sources share the kernel: rows gathered
 * from tokens (the W13 input) and the SwiGLU of the W13 output (the W2 input, the same element
 * math as swiglu.cu). Rows are K_pad wide: the elements [K, K_pad) are zeros, which leave every
 * amax unchanged, so a block straddling K has the CPU's short last block's exponent. */
#include "common/fp8.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/fp8_math.cuh"
#include "kernels/cuda/ops_cuda.h"
#include "kernels/cuda/swiglu_math.cuh"

namespace {

constexpr int kWarpsPerBlock = 8;

struct GatherSource { /* x[token_of_row[row]], K wide, rows x_stride floats apart */
    const float *x;
    int64_t x_stride;
    const int32_t *token_of_row;
    int64_t K;
    __device__ void load4(int64_t row, int64_t, int64_t c, float v[4]) const {
        const float *src = x + (int64_t)token_of_row[row] * x_stride + c;
        if (c + 4 <= K) {
            const float4 f = *(const float4 *)src;
            v[0] = f.x, v[1] = f.y, v[2] = f.z, v[3] = f.w;
            return;
        }
        for (int i = 0; i < 4; i++) v[i] = c + i < K ? src[i] : 0.0f;
    }
};

struct SwigluSource { /* SwiGLU(h[row] + bias[expert]), I wide */
    const float *h;
    int64_t I;
    epmoe_cuda_swiglu_act act;
    const float *bias;
    __device__ void load4(int64_t row, int64_t expert, int64_t c, float v[4]) const {
        const float *h_row = h + row * 2 * I, *bias_row = bias ? bias + expert * 2 * I : NULL;
        for (int i = 0; i < 4; i++) v[i] = c + i < I ? swiglu_column(h_row, bias_row, I, c + i, act) : 0.0f;
    }
};

template <class Source>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    fp8_quantize_kernel(const Source src, int64_t cap_rows, int64_t K, int64_t K_pad,
                        const int64_t *padded_offsets, const int64_t *tokens_per_expert,
                        int64_t n_local, uint8_t *codes, uint8_t *block_e8m0) {
    const int lane = threadIdx.x % 32;
    const int64_t blocks_per_row = K_pad / EPMOE_FP8_BLOCK;
    const int64_t warps = (int64_t)gridDim.x * kWarpsPerBlock;
    for (int64_t row = (int64_t)blockIdx.x * kWarpsPerBlock + threadIdx.x / 32; row < cap_rows;
         row += warps) {
        const int64_t expert =
            epmoe_cuda_expert_of_real_row(padded_offsets, tokens_per_expert, n_local, row);
        if (expert < 0) continue; /* padding rows are not written (the whole warp skips) */
        for (int64_t block = 0; block < blocks_per_row; block++) {
            const int64_t c = block * EPMOE_FP8_BLOCK + 4 * lane;
            float v[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            if (c < K) src.load4(row, expert, c, v);
            float amax = fmaxf(fmaxf(fabsf(v[0]), fabsf(v[1])), fmaxf(fabsf(v[2]), fabsf(v[3])));
            for (int off = 16; off > 0; off >>= 1)
                amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
            const int e = epmoe_fp8_block_exp_dev(amax);
            uint32_t word = 0;
            for (int i = 0; i < 4; i++) word |= (uint32_t)epmoe_fp8_code_dev(v[i], e) << (8 * i);
            *(uint32_t *)(codes + row * K_pad + c) = word;
            if (lane == 0) block_e8m0[row * blocks_per_row + block] = (uint8_t)(e + 127);
        }
    }
}

template <class Source>
epmoe_status launch(const Source &src, int64_t cap_rows, int64_t K, int64_t K_pad,
                    const int64_t *padded_offsets, const int64_t *tokens_per_expert,
                    int64_t n_local, uint8_t *codes, uint8_t *block_e8m0, cudaStream_t stream,
                    const char *who) {
    EPMOE_REQUIRE(cap_rows >= 0 && K > 0 && K_pad >= K && K_pad % EPMOE_FP8_BLOCK == 0,
                  EPMOE_ERR_INVALID_ARG, "%s: bad shape cap_rows=%lld K=%lld K_pad=%lld", who,
                  (long long)cap_rows, (long long)K, (long long)K_pad);
    EPMOE_REQUIRE(padded_offsets && tokens_per_expert && n_local > 0 && codes && block_e8m0 &&
                      ((uintptr_t)codes & 3) == 0,
                  EPMOE_ERR_INVALID_ARG,
                  "%s: needs the padded layout, n_local > 0 and 4-byte aligned codes", who);
    if (cap_rows == 0) return EPMOE_OK;
    /* a warp per row: whether a row is padding is decided once per row, not once per block
     * (at decode most of the worst-case capacity is padding) */
    const int64_t blocks = (cap_rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
    const unsigned grid = (unsigned)(blocks < 65536 ? blocks : 65536); /* grid-stride beyond */
    fp8_quantize_kernel<Source><<<grid, kWarpsPerBlock * 32, 0, stream>>>(
        src, cap_rows, K, K_pad, padded_offsets, tokens_per_expert, n_local, codes, block_e8m0);
    CUDA_TRY_LAUNCH(who);
    return EPMOE_OK;
}

} // namespace

epmoe_status epmoe_cuda_fp8_quantize_rows(const float *x, int64_t x_stride, int64_t cap_rows,
                                          int64_t K, int64_t K_pad, const int32_t *token_of_row,
                                          const int64_t *padded_offsets,
                                          const int64_t *tokens_per_expert, int64_t n_local,
                                          uint8_t *codes, uint8_t *block_e8m0,
                                          cudaStream_t stream) {
    EPMOE_REQUIRE(x && token_of_row && x_stride >= K && x_stride % 4 == 0 && K % 4 == 0 &&
                      ((uintptr_t)x & 15) == 0,
                  EPMOE_ERR_INVALID_ARG,
                  "fp8 quantize rows: x (16-byte aligned), token_of_row and a stride >= K, both "
                  "multiples of 4, are required");
    const GatherSource src = {x, x_stride, token_of_row, K};
    return launch(src, cap_rows, K, K_pad, padded_offsets, tokens_per_expert, n_local, codes,
                  block_e8m0, stream, "fp8 quantize rows");
}

epmoe_status epmoe_cuda_swiglu_fp8_quantize(const float *h, int64_t cap_rows, int64_t I,
                                            int64_t I_pad, const epmoe_cuda_swiglu_act *act,
                                            const float *bias, const int64_t *padded_offsets,
                                            const int64_t *tokens_per_expert, int64_t n_local,
                                            uint8_t *codes, uint8_t *block_e8m0,
                                            cudaStream_t stream) {
    EPMOE_REQUIRE(h && act, EPMOE_ERR_INVALID_ARG, "swiglu fp8 quantize: h and act are required");
    EPMOE_TRY(swiglu_check_act(act, "swiglu fp8 quantize"));
    const SwigluSource src = {h, I, *act, bias};
    return launch(src, cap_rows, I, I_pad, padded_offsets, tokens_per_expert, n_local, codes,
                  block_e8m0, stream, "swiglu fp8 quantize");
}
