/* Grouped NVFP4 GEMMs for the routed experts (W13 and W2), docs/design.md §2.4, §3.4, §5.3.
 *
 * One call computes, for every local expert e and every real row r of that expert
 * (rows [padded_offsets[e], padded_offsets[e] + tokens_per_expert[e])):
 *
 *   out[r, n] = (sum_k deqA[r, k] * deqW[e, n, k]) * a_scale[r] * w_scale[e, group(n)]
 *
 *   deqA = e2m1(a_codes) * float(ue4m3 a_sf)   (NVFP4 A; exact in bf16)
 *        = a_bf16                              (bf16 A; a_scale may then be NULL = 1.0)
 *        = e4m3(a_codes) * 2^(a_sf - 127)      (FP8 A, one exponent byte per 128 k; exact in
 *                                               bf16; a_scale may be NULL = 1.0)
 *   deqW = e2m1(w_codes) * float(ue4m3 w_sf)   (exact in bf16)
 *   group(n) = n < w_scale_split ? 0 : 1
 *
 * The products are exact (bf16 x bf16 of exactly representable values); the sum accumulates
 * in fp32 on the tensor cores; the two tensor scales are applied in the fp32 epilogue.
 *
 * Capture safety: the launch shape depends only on cap_rows, N, K and n_experts. The kernels
 * read padded_offsets / tokens_per_expert on the device, skip padding rows and empty experts,
 * and write nothing else: rows beyond each expert's count (padding) are left untouched. No
 * host synchronization, no allocation.
 *
 * Layouts (row-major, K contiguous):
 *   a_codes   [cap_rows, K/2]        packed E2M1, even element in the low nibble
 *   a_sf      [cap_rows, K/16]       UE4M3, linear layout
 *   a_scale   [cap_rows] fp32        1/gs of the row's activation quantization
 *   a_bf16    [cap_rows, K]          bf16 activations (act_quant = high)
 *   a_codes   [cap_rows, K]          FP8 A: E4M3 codes, one byte each (act_quant = fp8)
 *   a_sf      [cap_rows, K/128]      FP8 A: UE8M0 block exponents
 *   w_codes   [E, N, K/2]            packed E2M1
 *   w_sf      [E, N, K/16]           UE4M3, linear layout (the sm_100 path swizzles on its own
 *                                    copy; see w_sf_swizzled)
 *   w_scale   [E, w_scale_groups]    fp32 weight_scale_2
 *   out       [cap_rows, N]          fp32 (or bf16 when out_bf16 is set)
 *
 * W13: N = 2*I, w_scale_split = I, w_scale_groups = 2 (w1 and w3 carry their own
 * weight_scale_2).  W2: N = H, w_scale_split = N, w_scale_groups = 1.
 *
 * Shapes: K a multiple of 128, N a multiple of 32; violations are EPMOE_ERR_INVALID_ARG.
 * Choosing a kernel variant (sm_90): cap_rows should be this batch's padded capacity
 * (epmoe_padded_capacity(rows, E, 128), common/layout.h): it bounds the live rows per expert on
 * average, and the class (16, 32, 64 or more) picks the kernel: the streaming decode kernel up to
 * 16; above, on a compute capability 9.0 device with NVFP4 or FP8 A, the warp-specialized wgmma kernel
 * with a 32-, 64- or 128-token tile (slab weights) or the first wgmma kernel (row-major), and the
 * mma.sync kernels otherwise. All are correct for any routing and give the same bits
 * (tests/gpu/test_gemm.cu and bench/gemm_bench.cu compare them), so the choice, which depends on
 * shapes only and keeps a captured graph valid, never changes a result.
 */
#ifndef EPMOE_GROUPED_GEMM_H
#define EPMOE_GROUPED_GEMM_H

#include <stdint.h>

#include <cuda_runtime.h>

#include "common/status.h"

#ifdef __cplusplus
extern "C" {
#endif

#define EPMOE_GEMM_PAD_ROWS 128 /* padded layout granularity the kernels assume */
#define EPMOE_GEMM_K_STEP 128   /* K of every call is a multiple of this (the kernels' k step);
                                   a caller with another K pads it with zero codes, zero scales */

typedef enum {
    EPMOE_GEMM_A_NVFP4 = 0, /* a_codes + a_sf + a_scale */
    EPMOE_GEMM_A_BF16 = 1,  /* a_bf16 (+ optional a_scale) */
    EPMOE_GEMM_A_FP8 = 2    /* a_codes (E4M3) + a_sf (UE8M0 per 128) + a_workspace (+ optional
                               a_scale): act_quant = fp8, common/fp8.h */
} epmoe_gemm_a_format;

/* The sm_90 path's kernels. AUTO picks from the shapes (below); the others force one, for the
 * tests that compare them and the benchmark. Every kernel is correct for any routing; the
 * forced choice must still fit the device (WGMMA needs compute capability 9.0, an sm_90a
 * build, NVFP4 or FP8 A and a_workspace; the WS kernels also slab weights; STREAM needs NVFP4 or FP8 A and
 * a_workspace: EPMOE_ERR_UNSUPPORTED otherwise). */
typedef enum {
    EPMOE_GEMM_SM90_AUTO = 0,
    EPMOE_GEMM_SM90_MMA_MT32 = 1,   /* mma.sync, 32-token chunks x 128 weight rows (decode) */
    EPMOE_GEMM_SM90_MMA_MT64 = 2,   /* mma.sync, 64 x 128 (decode) */
    EPMOE_GEMM_SM90_MMA_MT128 = 3,   /* mma.sync, 128 x 256 (prefill, any sm_80+ device) */
    EPMOE_GEMM_SM90_WGMMA_MT128 = 4, /* wgmma, 128 x 256 (prefill on Hopper, NVFP4 or FP8 A) */
    EPMOE_GEMM_SM90_STREAM_MT16 = 5, /* streaming decode, 16-token chunks x 32 rows per warp,
                                        weights streamed to registers across work items, tokens
                                        a step ahead in shared memory (NVFP4 or FP8 A, a_workspace) */
    /* warp-specialized wgmma, MT-token chunks x 256 weight rows, a bulk-copy producer warp
     * (Hopper: NVFP4 or FP8 A, a_workspace, slab weights, cap_rows % 8 == 0) */
    EPMOE_GEMM_SM90_WS_MT16 = 6,
    EPMOE_GEMM_SM90_WS_MT32 = 7,
    EPMOE_GEMM_SM90_WS_MT64 = 8,
    EPMOE_GEMM_SM90_WS_MT128 = 9,
    /* FP8 tensor cores (W4A8): FP8 A on the weights' exact FP8 image (w_fp8), MT tokens x 128
     * weight rows, per-128-k scaling outside the MMA (Hopper, cap_rows % 128 == 0). Not
     * bit-identical to the kernels above (another summation order), held to float64. */
    EPMOE_GEMM_SM90_FP8_MT64 = 10,
    EPMOE_GEMM_SM90_FP8_MT128 = 11,
    EPMOE_GEMM_SM90_KERNEL_COUNT = 12 /* one past the last kernel, for loops over them */
} epmoe_gemm_sm90_kernel;

typedef struct {
    int64_t n_experts; /* E: local experts */
    int64_t N;         /* output columns */
    int64_t K;         /* reduction length */
    int64_t cap_rows;  /* rows of the padded A / out buffers (capacity, not the live count) */

    /* A operand */
    epmoe_gemm_a_format a_format;
    const uint8_t *a_codes; /* [cap_rows, K/2]  (NVFP4) */
    const uint8_t *a_sf;    /* [cap_rows, K/16] (NVFP4) */
    const float *a_scale;   /* [cap_rows]; required for NVFP4, optional (NULL = 1) for bf16 */
    const void *a_bf16;     /* [cap_rows, K] __nv_bfloat16 (BF16) */
    void *a_workspace;      /* [cap_rows, K] bf16, 16-byte aligned, or NULL (NVFP4): where the
                               wgmma and streaming kernels put the exact bf16 of A (in their own
                               K order) once per call; without it they are not used. Required
                               with FP8 A, which every sm_90-path kernel reads from here */

    /* Weights */
    const uint8_t *w_codes;     /* [E, N, K/2], or the slab layout when w_slabs */
    const uint8_t *w_sf;        /* [E, N, K/16] linear (sm_90 path), or the slab layout */
    int w_slabs;                /* 1: w_codes and w_sf in the step-major slab layout written by
                                   epmoe_cuda_weights_to_slabs (sm_90 path only) */
    const uint8_t *w_sf_swizzled; /* [E][swizzled(N, K/16)] 128x4 layout for the sm_100 path;
                                     NULL: the sm_100 entry reports EPMOE_ERR_INVALID_ARG */
    const uint8_t *w_fp8;       /* FP8 A only, or NULL: the same weights as E4M3 in the FP8
                                   slab image (epmoe_cuda_weights_to_fp8_slabs), which the FP8
                                   tensor-core kernel reads; exact by construction */
    const uint8_t *w_fp8_exp;   /* its group exponents */
    const float *w_scale;       /* [E, w_scale_groups] */
    int64_t w_scale_groups;     /* 1 or 2 */
    int64_t w_scale_split;      /* columns n < split use group 0, the rest group 1 */

    /* Routing layout on the device (common/layout.h convention) */
    const int64_t *padded_offsets;    /* [E+1] */
    const int64_t *tokens_per_expert; /* [E] */

    /* Output */
    void *out;    /* [cap_rows, N] fp32, or bf16 when out_bf16 != 0; see out_row */
    int out_bf16;
    const int32_t *out_row; /* [cap_rows] or NULL: live row r is written to row out_row[r] of
                               out instead of row r (the engine's W2 writes each pair straight
                               into its place in the return buffer); the caller sizes out */
    const float *out_bias;  /* [E, N] fp32 or NULL: added to each fp32 output after its scales,
                               one rounded add (gpt-oss's down-projection bias, in the CPU
                               worker's order (acc * scales) + b); not with out_bf16 */

    epmoe_gemm_sm90_kernel sm90_kernel; /* AUTO (0, what memset gives) unless forcing one */
    int serial_launch; /* 0 (default): on sm_90+ the streaming and warp-specialized kernels
                          launch while the pre-pass that writes a_workspace still runs
                          (programmatic dependent launch) and wait for it only where they first
                          read it; 1: they launch after it, for the benchmark's side-by-side
                          and for ruling the overlap out */
} epmoe_grouped_gemm_args;

/* The step-major slab layout of NVFP4 weights. Rows are grouped in slabs of 32 (N is a
 * multiple of 32, so a slab never straddles two experts); slab j of the [E*N] rows stores its
 * 128-k steps one after another:
 *   codes: 2048 bytes per (slab, step): 16-byte unit (r*32 + 4g + t) holds bytes [16t, 16t+16)
 *          of the step's 64 bytes of row 32j + g + 8r (g < 8, r < 4, t < 4) -- exactly what
 *          the 32 lanes (g, t) of one warp load for rows g + 8r, so a decode warp's step is
 *          one contiguous 2 KB read instead of 32 reads of 64 bytes from 32 rows.
 *          Each 4-byte word (8 consecutive k) keeps its 32 bits in the slab bit order
 *          (gemm_sm90_common.cuh, slab_code_word), in which the kernels dequantize a word in
 *          13 instructions instead of 19.
 *   scales: 256 bytes per (slab, step): row 32j + i's 8 scale bytes of the step at 8i.
 * Same bits as the row-major [E, N, K/2] / [E, N, K/16] tensors, moved. Why: loads alone, in
 * the row-major decode pattern (32 scattered 64-byte pieces per step), stream far below the
 * copy bandwidth, and near it in this layout (weight-stream probe, docs/perf-history.md §2). */
#define EPMOE_GEMM_SLAB_ROWS 32

/* Row-major codes [rows, K/2] and scales [rows, K/16] (rows = E*N, a multiple of 32; K a
 * multiple of 128) -> the slab layout, into separate buffers of the same sizes. Enqueues on
 * `stream`. */
epmoe_status epmoe_cuda_weights_to_slabs(const uint8_t *codes, const uint8_t *sf, int64_t rows,
                                         int64_t K, uint8_t *slab_codes, uint8_t *slab_sf,
                                         cudaStream_t stream);

/* FP4 weights, row-major codes [rows, K/2] and UE4M3 scales [rows, K/16] (rows a multiple of
 * 32, K of 128), as E4M3 times a power of two per row and 128-k group (common/fp8.h's rule) in
 * the FP8 GEMM's slab image: fp8 [rows, K] bytes, fp8_exp [rows, K/128]. Groups whose values do
 * not come back exactly (NVFP4's non-power-of-two scales, or MXFP4 blocks too far apart) are
 * added to *inexact_groups (device memory): a caller that finds any must not pass this image
 * as w_fp8. Enqueues on `stream`. */
epmoe_status epmoe_cuda_weights_to_fp8_slabs(const uint8_t *codes, const uint8_t *sf,
                                             int64_t rows, int64_t K, uint8_t *fp8,
                                             uint8_t *fp8_exp, unsigned long long *inexact_groups,
                                             cudaStream_t stream);

/* Validates args (shapes, pointers) without touching device memory. */
epmoe_status epmoe_grouped_gemm_check_args(const epmoe_grouped_gemm_args *args);

/* Run-time dispatcher: picks the sm_100 path on compute capability 10.x when it was compiled
 * in (and w_sf_swizzled is given), the sm_90 path otherwise. Enqueues on `stream` only. */
epmoe_status epmoe_cuda_grouped_gemm(const epmoe_grouped_gemm_args *args, cudaStream_t stream);

/* Hopper path (also correct on any sm_80+ device): FP4 tiles dequantized to bf16 in shared
 * memory, bf16 tensor cores, fp32 accumulation, tensor scales in the epilogue. */
epmoe_status epmoe_cuda_grouped_gemm_sm90(const epmoe_grouped_gemm_args *args,
                                          cudaStream_t stream);

/* The sm_90 kernel these args select on the current device (resolves AUTO). */
epmoe_gemm_sm90_kernel epmoe_grouped_gemm_sm90_select(const epmoe_grouped_gemm_args *args);

/* Name of an sm_90 kernel (tests and benchmarks report it). */
const char *epmoe_grouped_gemm_sm90_kernel_name(epmoe_gemm_sm90_kernel kernel);

/* Name of the sm_90 variant these args select (= kernel_name(select(args))). */
const char *epmoe_grouped_gemm_sm90_variant(const epmoe_grouped_gemm_args *args);

/* Blackwell path: tcgen05.mma kind::mxf4nvf4.block_scale with 128x4-swizzled scales.
 * Requires an sm_100a build and a compute capability 10.0 device; EPMOE_ERR_UNSUPPORTED
 * otherwise. NOT RUN in this project's test environment (no Blackwell GPU): reviewed
 * against the PTX ISA only. */
epmoe_status epmoe_cuda_grouped_gemm_sm100(const epmoe_grouped_gemm_args *args,
                                           cudaStream_t stream);

/* 1 when the sm_100 kernel was compiled into this binary. */
int epmoe_cuda_grouped_gemm_sm100_available(void);

#ifdef __cplusplus
}
#endif
#endif
