/* The FP8 rules of common/fp8.h on the device, shared by the activation quantizers
 * (quant_fp8.cu) and the weight expansion of the FP8 GEMM (gemm_sm90_fp8.cu), so that both
 * decide exponents and codes the same way as the CPU. */
#ifndef EPMOE_FP8_MATH_CUH
#define EPMOE_FP8_MATH_CUH

#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <stdint.h>

#include "common/fp8.h"

static __device__ __forceinline__ int epmoe_fp8_block_exp_dev(float amax) {
    return epmoe_fp8_block_exp_of_bits(__float_as_uint(amax)); /* common/fp8.h's rule */
}

/* e4m3_rn_satfinite(x * 2^-e): the multiplication is exact, the conversion the hardware's
 * round-to-nearest-even with saturation. */
static __device__ __forceinline__ uint8_t epmoe_fp8_code_dev(float x, int e) {
    return (uint8_t)__nv_cvt_float_to_fp8(ldexpf(x, -e), __NV_SATFINITE, __NV_E4M3);
}

/* The value of an E4M3 code (exact in fp32). */
static __device__ __forceinline__ float epmoe_e4m3_value_dev(uint8_t code) {
    return __half2float(__half(__nv_cvt_fp8_to_halfraw(code, __NV_E4M3)));
}

#endif
