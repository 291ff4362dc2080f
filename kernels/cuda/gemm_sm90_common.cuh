/* Device helpers shared by the Hopper grouped GEMM kernels (gemm_sm90.cu: mma.sync through
 * shared memory; gemm_sm90_stream.cu: mma.sync streaming decode; gemm_sm90_wgmma.cu: wgmma,
 * sm_90a prefill; gemm_sm90_ws.cu: warp-specialized wgmma, sm_90a prefill on slab weights;
 * gemm_sm90_prepass.cu: A's bf16 copy). One place for the exact NVFP4 -> bf16
 * dequantization, the K order both operands share, where a weight row's bytes are in either
 * layout, the cp.async wrappers, the device-built work list and the mma.sync epilogue, so the
 * kernels cannot drift apart in what they compute.
 *
 * Exact dequantization to bf16 without a lookup table. An E2M1 nibble (s e1 e0 m) placed as
 * bf16 bits (s << 15) | (e1 e0 m << 6) has the value e2m1 * 2^-126 (the e = 0 code 0.5 lands
 * on a bf16 subnormal, which mul.bf16x2 handles). Multiplying by the bf16 S = sf * 2^118
 * gives e2m1 * sf * 2^-8: at most 6 significant bits, never below 2^-18, so exact. The 2^-8
 * per dequantized operand comes back as a power of two in the fp32 epilogue (kDequantFix).
 *
 * K order. The reduction is a sum, so any permutation of k applied to both operands gives the
 * same products. dequant8 turns one 32-bit word (8 consecutive k) into the pairs (k0,k4)
 * (k1,k5) (k2,k6) (k3,k7); the token operand is stored in the same order, so the bf16 pairing
 * costs no shuffle. Both kernels feed the tensor cores the same k16 slices in the same order
 * (slice 2q+s of a 128-step holds, for quad thread t, the pairs 2s and 2s+1 of word q of span
 * [32t, 32t+32)), which is what lets their outputs agree bit for bit. */
#ifndef EPMOE_GEMM_SM90_COMMON_CUH
#define EPMOE_GEMM_SM90_COMMON_CUH

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "kernels/cuda/cp_async.cuh"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/grouped_gemm.h"

/* Internal to the two GEMM translation units; the helpers have internal linkage (static). */
namespace epmoe_sm90 {

constexpr int kStepK = 128;                        /* k elements per pipeline step */
constexpr int kMaxExperts = 1024;
constexpr float kDequantFix = 256.0f;              /* 2^8 per dequantized operand */

struct GemmParams {
    int E, N, K;
    int64_t cap_rows;
    const uint8_t *a_codes, *a_sf;
    int a_fp8; /* a_codes/a_sf are FP8 (E4M3, UE8M0 per 128), not NVFP4: the pre-pass's input */
    const float *a_scale;
    const __nv_bfloat16 *a_bf16;
    const uint8_t *w_codes, *w_sf;
    int w_slabs; /* codes and scales in the slab layout (grouped_gemm.h) */
    const uint8_t *w_fp8, *w_fp8_exp; /* the weights' FP8 slab image, or NULL (grouped_gemm.h) */
    const float *w_scale;
    int w_groups, w_split;
    const int64_t *padded_offsets, *tokens_per_expert;
    void *out;
    int out_bf16;
    const int32_t *out_row; /* NULL: identity (grouped_gemm.h) */
    const float *out_bias;  /* [E, N] or NULL (grouped_gemm.h) */
    void *a_ws; /* [cap_rows, K] bf16 workspace of the wgmma kernel (NVFP4 A dequantized) */
    int serial_launch; /* host only: no programmatic dependent launch after the pre-pass */
};

static __device__ __forceinline__ uint32_t bf16x2_mul(uint32_t a, uint32_t b) {
    uint32_t d;
    asm("mul.rn.bf16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
    return d;
}

/* bf16x2 of S = float(ue4m3 byte) * 2^118 in both halves (exact: 4 significant bits). The
 * byte shifted to bf16 bits (b << 4) is sf * 2^-120 (E = 0 lands on a bf16 subnormal, as the
 * E2M1 0.5 does); two exact multiplies by 2^119 give sf * 2^118. byte < 256, so the two
 * shifted copies are one multiply (the FMA pipe, not the busier integer ALU). */
static __device__ __forceinline__ uint32_t sf_to_bf16x2(uint32_t byte) {
    const uint32_t k2p119 = 0x7B007B00u;
    return bf16x2_mul(bf16x2_mul(byte * 0x00100010u, k2p119), k2p119);
}
/* A weight row's two scale bytes of its 32-k span in one 128-k step (bytes 2t, 2t+1, loaded as
 * one 16-bit value) as S[0] (words 0-1 of the span) and S[1] (words 2-3). */
static __device__ __forceinline__ void sf_pair_to_bf16x2(uint32_t sf2, uint32_t (&S)[2]) {
    S[0] = sf_to_bf16x2(sf2 & 0xFFu);
    S[1] = sf_to_bf16x2(sf2 >> 8);
}

/* The slab layout's bit order (grouped_gemm.h). Extracting a pair from nibble order costs two
 * shifts and two logic ops; placing a word's 32 bits at upload so that each pair needs one
 * shift and one mask was checked exhaustively to be impossible (no four translates of the
 * eight target bits, kPairBits, tile 32 bits; nor 64 with funnel shifts). The best found (same
 * search, tests/gpu/test_slab_bits.cu checks it): pairs 0, 1, 2 come out with one shift or
 * rotation and one mask, pair 3 with a rotation and two logic ops -- 13 instructions per word
 * with the multiplies instead of 19, 7 of them on the integer ALU pipe instead of ~12. Pair m
 * is brought to its bf16 bits by shifting left (rotating, m = 2, 3) by kSlabPairShift[m]; pair
 * 3's bits 8 and 24 are stored in place. */
constexpr uint32_t kPairBits = 0x81C081C0u; /* sign 15, e1 e0 m 8:6, and the same + 16 */
constexpr uint32_t kSlabPair3InPlace = 0x01000100u;
static __host__ __device__ __forceinline__ int slab_pair_shift(int m) {
    return m == 0 ? 2 : m == 1 ? 6 : m == 2 ? 12 : 8;
}

/* Where the slab bit order keeps bit b (0 = m, 1 = e0, 2 = e1, 3 = sign) of code i (0..7, nibble
 * i of the row-major word): the bf16 bit it must land on, moved back by its pair's shift. */
static __host__ __device__ __forceinline__ int slab_code_bit(int i, int b) {
    const int target = (i / 4) * 16 + (b == 3 ? 15 : 6 + b);
    const bool in_place = i % 4 == 3 && ((kSlabPair3InPlace >> target) & 1u);
    const int shift = in_place ? 0 : slab_pair_shift(i % 4);
    return (target - shift + 32) % 32;
}

/* A row-major code word (code i in nibble i) in the slab bit order. Run at upload. */
static __host__ __device__ __forceinline__ uint32_t slab_code_word(uint32_t nibbles) {
    uint32_t w = 0;
    for (int i = 0; i < 8; ++i)
        for (int b = 0; b < 4; ++b) w |= ((nibbles >> (4 * i + b)) & 1u) << slab_code_bit(i, b);
    return w;
}

static __host__ __device__ __forceinline__ uint32_t rotl32(uint32_t w, int s) {
    return (w << s) | (w >> (32 - s));
}

/* The bf16x2 bits (before the scale multiply) of pair m (codes m and m+4) of a word in nibble
 * order (row-major weights, activations) or in the slab bit order. */
static __host__ __device__ __forceinline__ uint32_t nibble_pair_bits(uint32_t w, int m) {
    const uint32_t kMag = 0x01C001C0u, kSign = 0x80008000u;
    return m == 0   ? ((w << 6) & kMag) | ((w << 12) & kSign)
           : m == 1 ? ((w << 2) & kMag) | ((w << 8) & kSign)
           : m == 2 ? ((w >> 2) & kMag) | ((w << 4) & kSign)
                    : ((w >> 6) & kMag) | (w & kSign);
}
static __host__ __device__ __forceinline__ uint32_t slab_pair_bits(uint32_t w, int m) {
    return m == 0   ? (w << 2) & kPairBits
           : m == 1 ? (w << 6) & kPairBits
           : m == 2 ? rotl32(w, 12) & kPairBits
                    : (rotl32(w, 8) & (kPairBits & ~kSlabPair3InPlace)) | (w & kSlabPair3InPlace);
}

/* Pair m (elements m and m+4) of 8 E2M1 codes (one word, element i in nibble i) as bf16, times
 * S. m is a compile-time constant in every caller. */
static __device__ __forceinline__ uint32_t dequant_pair(uint32_t w, uint32_t S, int m) {
    return bf16x2_mul(nibble_pair_bits(w, m), S);
}
/* The same for a weight word, in the slab bit order when kSlabBits. */
template <bool kSlabBits>
static __device__ __forceinline__ uint32_t weight_pair(uint32_t w, uint32_t S, int m) {
    return bf16x2_mul(kSlabBits ? slab_pair_bits(w, m) : nibble_pair_bits(w, m), S);
}

/* 8 E2M1 codes (one word) -> bf16 pairs (i, i+4), times S. */
static __device__ __forceinline__ void dequant8(uint32_t w, uint32_t S, uint32_t out[4]) {
#pragma unroll
    for (int m = 0; m < 4; ++m) out[m] = dequant_pair(w, S, m);
}

/* The A fragment (mma.m16n8k16 / wgmma register-A order) of k16 slice 2q+s of a 128-step for
 * rows g and g+8 of an m16 tile: w_g, w_g8 are word q of the two rows' 32-k span of this quad
 * thread (in the slab bit order when kSlabBits), S_g, S_g8 their scale as from sf_to_bf16x2.
 * Every kernel builds its weight fragments here, so all give the tensor cores the same slices,
 * hence the same bits. */
template <bool kSlabBits>
static __device__ __forceinline__ void weight_fragment_slice(uint32_t w_g, uint32_t S_g, uint32_t w_g8,
                                                             uint32_t S_g8, int s, uint32_t (&A)[4]) {
    A[0] = weight_pair<kSlabBits>(w_g, S_g, 2 * s);       /* row g,   k pair (2t, 2t+1) */
    A[1] = weight_pair<kSlabBits>(w_g8, S_g8, 2 * s);     /* row g+8, k pair (2t, 2t+1) */
    A[2] = weight_pair<kSlabBits>(w_g, S_g, 2 * s + 1);   /* row g,   k pair (2t+8, 2t+9) */
    A[3] = weight_pair<kSlabBits>(w_g8, S_g8, 2 * s + 1); /* row g+8, k pair (2t+8, 2t+9) */
}
/* Both slices 2q, 2q+1 at once (A[s] = slice 2q+s). */
template <bool kSlabBits>
static __device__ __forceinline__ void weight_fragments(uint32_t w_g, uint32_t S_g, uint32_t w_g8,
                                                        uint32_t S_g8, uint32_t (&A)[2][4]) {
#pragma unroll
    for (int s = 0; s < 2; ++s) weight_fragment_slice<kSlabBits>(w_g, S_g, w_g8, S_g8, s, A[s]);
}

/* 8 bf16 (k0..k7 in four words) -> the same (i, i+4) pairing as dequant8. */
static __device__ __forceinline__ uint4 permute8(uint4 v) {
    uint4 r;
    r.x = __byte_perm(v.x, v.z, 0x5410);
    r.y = __byte_perm(v.x, v.z, 0x7632);
    r.z = __byte_perm(v.y, v.w, 0x5410);
    r.w = __byte_perm(v.y, v.w, 0x7632);
    return r;
}

static __device__ __forceinline__ void mma_bf16_16816(float c[4], const uint32_t a[4], uint32_t b0,
                                               uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, "
                 "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

static __device__ __forceinline__ uint32_t word_of(const uint4 &v, int q) {
    return q == 0 ? v.x : q == 1 ? v.y : q == 2 ? v.z : v.w;
}

/* Word q of a 128-k step for WT tiles of 16 rows each (mma.sync m16 tiles, or a wgmma m64
 * tile's 16 rows of this warp): A[i][s] = slice 2q+s of tile i, from the span words w[2i]
 * (row g) and w[2i+1] (row g+8) and their scales S as from sf_pair_to_bf16x2. */
template <bool kSlabBits, int WT>
static __device__ __forceinline__ void word_fragments(const uint4 (&w)[2 * WT], const uint32_t (&S)[2 * WT][2],
                                                      int q, uint32_t (&A)[WT][2][4]) {
#pragma unroll
    for (int i = 0; i < WT; ++i)
        weight_fragments<kSlabBits>(word_of(w[2 * i], q), S[2 * i][q / 2], word_of(w[2 * i + 1], q),
                                    S[2 * i + 1][q / 2], A[i]);
}

/* The accumulators of a warp's tile on the mma.sync kernels (two m16 weight tiles x kNT8 n8
 * token tiles), zeroed at a work item's start. */
template <int kNT8>
static __device__ __forceinline__ void zero_warp_tile(float (&acc)[2][kNT8][4]) {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int c = 0; c < kNT8; ++c)
#pragma unroll
            for (int v = 0; v < 4; ++v) acc[i][c][v] = 0.0f;
}

/* Word q of a step on the mma.sync kernels: both m16 weight tiles' slices 2q, 2q+1 (A, from
 * word_fragments) against n8 token tile c, whose B of those slices is b (one 16-byte load of
 * the fragment order), into acc[i][c]. */
template <int kNT8>
static __device__ __forceinline__ void mma_word(float (&acc)[2][kNT8][4], int c, const uint32_t (&A)[2][2][4],
                                                const uint4 &b) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        mma_bf16_16816(acc[i][c], A[i][0], b.x, b.y);
        mma_bf16_16816(acc[i][c], A[i][1], b.z, b.w);
    }
}

/* Where weight row n of expert e keeps the 16 code bytes of span t (bytes [16t, 16t+16) of
 * each 128-k step's 64) and the step's 8 scale bytes, in either layout (kSlabs: the slab
 * layout, a compile-time choice so that the distances below are constants in the kernels'
 * address arithmetic): offsets at step 0 and the distance one step moves them. Rows n and
 * n + 8 are row8_* apart when n % 32 < 24 (the kernels only step by 8 inside a 32-row group).
 * One place for both layouts; each kernel instance takes kSlabs from p.w_slabs at launch. */
struct WeightWalk {
    int64_t code, sf;           /* byte offsets into w_codes / w_sf at step 0 */
    int code_step, sf_step;     /* bytes per 128-k step */
    int64_t code_row8, sf_row8; /* bytes from row n to row n + 8 */
};
template <bool kSlabs>
static __device__ __forceinline__ WeightWalk weight_walk(const GemmParams &p, int e, int n, int t) {
    const int64_t row = (int64_t)e * p.N + n;
    WeightWalk w;
    if (kSlabs) {
        const int64_t slab = row / 32, steps = p.K / kStepK;
        const int i = (int)(row % 32);
        w.code = (slab * steps) * 2048 + ((i / 8) * 32 + (i % 8) * 4 + t) * 16;
        w.sf = (slab * steps) * 256 + i * 8;
        w.code_step = 2048;
        w.sf_step = 256;
        w.code_row8 = 512;
        w.sf_row8 = 64;
    } else {
        w.code = row * (p.K / 2) + 16 * t;
        w.sf = row * (p.K / 16);
        w.code_step = 64;
        w.sf_step = 8;
        w.code_row8 = 8 * (int64_t)(p.K / 2);
        w.sf_row8 = 8 * (int64_t)(p.K / 16);
    }
    return w;
}

/* The activation scales of a thread's token rows row0 + 8(c0 + c) + 2t + j (c < kC, j < 2; 1
 * for bf16 A, 0 past the live rows), loaded together before the stores that use them. Loaded
 * beside the stores, each load waited for the store before it (out and a_scale may alias, so
 * the compiler cannot hoist them): one L2 round trip per token row, a large share of the WS
 * kernel's stall samples at prefill (docs/perf-history.md §2). */
template <int kC>
static __device__ __forceinline__ void load_row_scales(const GemmParams &p, int64_t row0, int mrows,
                                                       int t, int c0, float (&as)[kC][2]) {
#pragma unroll
    for (int c = 0; c < kC; ++c)
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            const int tr = (c0 + c) * 8 + 2 * t + j;
            as[c][j] = tr >= mrows ? 0.0f : p.a_scale ? p.a_scale[row0 + tr] : 1.0f;
        }
}

/* The output row of live row `row` (grouped_gemm.h, out_row). */
static __device__ __forceinline__ int64_t out_row_of(const GemmParams &p, int64_t row) {
    return p.out_row ? (int64_t)p.out_row[row] : row;
}

/* An fp32 output of expert e, column n, plus its bias when there is one (out_bias). */
static __device__ __forceinline__ float plus_bias(const GemmParams &p, int e, int n, float v) {
    return p.out_bias ? __fadd_rn(v, p.out_bias[(int64_t)e * p.N + n]) : v;
}

/* Epilogue of one warp of the mma.sync kernels: the m16n8k16 accumulators of 32 weight rows
 * (two m16 tiles, columns n_warp + 16i + 8half + g) by kNT8 n8 token tiles (rows row0 + 8c +
 * 2t + j) -> out, times the fp32 tensor scales (and the dequantization's powers of two, fix).
 * Only live token rows (< mrows) are written. */
template <int kNT8>
static __device__ __forceinline__ void store_warp_tile(const GemmParams &p, const float (&acc)[2][kNT8][4],
                                                int e, int n_warp, int64_t row0, int mrows,
                                                float fix, int g, int t) {
    float as[kNT8][2];
    load_row_scales<kNT8>(p, row0, mrows, t, 0, as);
#pragma unroll
    for (int i = 0; i < 2; ++i) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int n = n_warp + 16 * i + 8 * half + g;
            const int grp = (p.w_groups > 1 && n >= p.w_split) ? 1 : 0;
            const float wscale = p.w_scale[(int64_t)e * p.w_groups + grp] * fix;
#pragma unroll
            for (int c = 0; c < kNT8; ++c) {
#pragma unroll
                for (int j = 0; j < 2; ++j) {
                    const int tr = c * 8 + 2 * t + j;
                    if (tr < mrows) {
                        const int64_t row = out_row_of(p, row0 + tr);
                        const float v = acc[i][c][2 * half + j] * wscale * as[c][j];
                        if (p.out_bf16)
                            ((__nv_bfloat16 *)p.out)[row * p.N + n] = __float2bfloat16_rn(v);
                        else
                            ((float *)p.out)[row * p.N + n] = plus_bias(p, e, n, v);
                    }
                }
            }
        }
    }
}

/* Epilogue of a thread of the wgmma kernels: the m64nMTk16 accumulators of its WT m64 tiles
 * (rows lrow[2i] and lrow[2i+1] = g and g + 8 of tile i, weight rows n0 + lrow[r]; columns
 * 8c + 2t + j = token rows row0 + 8c + 2t + j) -> out, times the fp32 tensor scales (and the
 * dequantization's powers of two, fix). Only live token rows (< mrows) and real columns
 * (< N) are written. The activation scales are loaded kBatch x 8 token rows at a time (all at
 * once by default; the 128-register wgmma kernel takes four batches, or it spills). */
template <int WT, int MT, int kBatch = MT / 8>
static __device__ __forceinline__ void store_wgmma_tiles(const GemmParams &p, const float (&acc)[WT][MT / 2],
                                                  const int (&lrow)[2 * WT], int e, int n0,
                                                  int64_t row0, int mrows, float fix, int t) {
    float wscale[2 * WT];
#pragma unroll
    for (int r = 0; r < 2 * WT; ++r) {
        const int n = min(n0 + lrow[r], p.N - 1);
        const int grp = (p.w_groups > 1 && n >= p.w_split) ? 1 : 0;
        wscale[r] = p.w_scale[(int64_t)e * p.w_groups + grp] * fix;
    }
    static_assert((MT / 8) % kBatch == 0, "whole batches of 8 token rows");
#pragma unroll
    for (int c0 = 0; c0 < MT / 8; c0 += kBatch) {
        float as[kBatch][2];
        load_row_scales<kBatch>(p, row0, mrows, t, c0, as);
#pragma unroll
        for (int c = c0; c < c0 + kBatch; ++c) {
#pragma unroll
            for (int j = 0; j < 2; ++j) {
                const int tr = c * 8 + 2 * t + j;
                if (tr >= mrows) continue;
                const int64_t row = out_row_of(p, row0 + tr);
#pragma unroll
                for (int r = 0; r < 2 * WT; ++r) {
                    const int n = n0 + lrow[r];
                    if (n >= p.N) continue;
                    const float v = acc[r / 2][4 * c + 2 * (r % 2) + j] * wscale[r] * as[c - c0][j];
                    if (p.out_bf16)
                        ((__nv_bfloat16 *)p.out)[row * p.N + n] = __float2bfloat16_rn(v);
                    else
                        ((float *)p.out)[row * p.N + n] = plus_bias(p, e, n, v);
                }
            }
        }
    }
}

/* The same epilogue for bf16 output, through 1 KB of shared memory per warp (smem_warp,
 * 16-byte aligned): the scattered 2-byte stores above become 16-byte ones. A warp's 16 weight
 * rows of a tile are 16 consecutive columns of 32 output rows at a time: stmatrix.trans writes
 * the bf16 fragments transposed (one 16-byte row per token and 8 columns), and each lane then
 * stores two 16-byte pieces, two lanes per token row, 32 bytes per row: whole sectors. The
 * values and their rounding are those of store_wgmma_tiles, so the bits are too. The halves
 * of a token's 32 bytes swap on tokens 4-7 of every 8 (bank groups of the 8 rows that one
 * matrix stores). N % 32 == 0, so a warp's 16 columns are all real or all past N. */
template <int WT, int MT>
static __device__ __forceinline__ void store_wgmma_tiles_bf16_staged(
    const GemmParams &p, const float (&acc)[WT][MT / 2], const int (&lrow)[2 * WT], int e, int n0,
    int64_t row0, int mrows, float fix, int lane, uint32_t smem_warp) {
    static_assert(MT % 32 == 0, "32 token rows per round");
    const int g = lane / 4, t = lane % 4;
    float wscale[2 * WT];
#pragma unroll
    for (int r = 0; r < 2 * WT; ++r) {
        const int n = min(n0 + lrow[r], p.N - 1);
        const int grp = (p.w_groups > 1 && n >= p.w_split) ? 1 : 0;
        wscale[r] = p.w_scale[(int64_t)e * p.w_groups + grp] * fix;
    }
    /* the shared-memory place of (token lt of the round, column half h): 32 bytes per token */
    auto piece = [](int lt, int h) { return (uint32_t)(lt * 32 + 16 * (h ^ ((lt >> 2) & 1))); };
    /* stmatrix x4: matrix m = lane / 8 gets its row lane % 8 (a token) from this lane's address;
     * matrix m holds token block 2q + m / 2 of the round and column half m % 2 */
    const int m = lane / 8, k = lane % 8;
    __nv_bfloat16 *out = (__nv_bfloat16 *)p.out;
    float as[MT / 8][2];
    load_row_scales<MT / 8>(p, row0, mrows, t, 0, as);
#pragma unroll
    for (int i = 0; i < WT; ++i) {
        const int n_base = n0 + lrow[2 * i] - g; /* the warp's first column of tile i */
        const bool n_live = n_base < p.N;
#pragma unroll
        for (int round = 0; round < MT / 32; ++round) {
            uint32_t frag[2][4];
#pragma unroll
            for (int cc = 0; cc < 4; ++cc) {
                const int c = 4 * round + cc;
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const float v0 = acc[i][4 * c + 2 * h] * wscale[2 * i + h] * as[c][0];
                    const float v1 = acc[i][4 * c + 2 * h + 1] * wscale[2 * i + h] * as[c][1];
                    const __nv_bfloat162 b = __floats2bfloat162_rn(v0, v1);
                    frag[cc / 2][2 * (cc % 2) + h] = *(const uint32_t *)&b;
                }
            }
#pragma unroll
            for (int q = 0; q < 2; ++q) {
                const uint32_t addr = smem_warp + piece(8 * (2 * q + m / 2) + k, m % 2);
                asm volatile("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1, %2, %3, %4};"
                             ::"r"(addr), "r"(frag[q][0]), "r"(frag[q][1]), "r"(frag[q][2]),
                             "r"(frag[q][3])
                             : "memory");
            }
            __syncwarp();
#pragma unroll
            for (int k2 = 0; k2 < 2; ++k2) {
                const int pc = lane + 32 * k2, lt = pc / 2, h = pc % 2;
                uint4 v;
                asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];"
                             : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                             : "r"(smem_warp + piece(lt, h)));
                const int tr = 32 * round + lt;
                if (n_live && tr < mrows)
                    *(uint4 *)(out + out_row_of(p, row0 + tr) * p.N + n_base + 8 * h) = v;
            }
            __syncwarp(); /* the next round's stmatrix overwrites what was just read */
        }
    }
}

/* Work list of one launch: expert e contributes ceil(count_e / MT) token chunks, each crossed
 * with the weight tiles. Built on the device from the counts (no host sync) into
 * chunk_start[0..E]; every thread of the block must call it. */
template <int MT>
static __device__ __forceinline__ void build_chunk_list(const GemmParams &p, int *chunk_start) {
    for (int e = threadIdx.x; e < p.E; e += blockDim.x) {
        int64_t c = p.tokens_per_expert[e];
        const int64_t room = p.padded_offsets[e + 1] - p.padded_offsets[e];
        c = c < 0 ? 0 : (c > room ? room : c); /* never write outside the expert's rows */
        chunk_start[e + 1] = (int)((c + MT - 1) / MT);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        chunk_start[0] = 0;
        for (int e = 0; e < p.E; ++e) chunk_start[e + 1] += chunk_start[e];
    }
    __syncthreads();
}

/* The expert that owns chunk `chunk` of the work list chunk_start[0..E]: the largest e with
 * chunk_start[e] <= chunk (experts without chunks have chunk_start[e] == chunk_start[e + 1], so
 * they are skipped). Reads the shared list only; tests/gpu/test_stream_schedule.cu checks it
 * on the host against a scan. */
static __host__ __device__ __forceinline__ int chunk_expert(const int *chunk_start, int E, int chunk) {
    int lo = 0, hi = E - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if (chunk_start[mid] <= chunk) lo = mid; else hi = mid - 1;
    }
    return lo;
}

/* The token chunk `chunk` of the list: its expert, first padded row and live row count. */
struct Chunk {
    int e;
    int64_t row0;
    int mrows;
};
template <int MT>
static __device__ __forceinline__ Chunk find_chunk(const GemmParams &p, const int *chunk_start,
                                            int chunk) {
    const int lo = chunk_expert(chunk_start, p.E, chunk);
    Chunk c;
    c.e = lo;
    const int c_in_e = chunk - chunk_start[lo];
    int64_t count = p.tokens_per_expert[lo];
    const int64_t room = p.padded_offsets[lo + 1] - p.padded_offsets[lo];
    count = count > room ? room : count;
    c.row0 = p.padded_offsets[lo] + (int64_t)c_in_e * MT;
    c.mrows = (int)min((int64_t)MT, count - (int64_t)c_in_e * MT);
    return c;
}

/* Grid of a persistent launch: blocks_per_sm blocks on every SM of the current device, never
 * more than max_blocks (what the largest possible work list needs), at least one. */
static inline epmoe_status persistent_grid(int64_t blocks_per_sm, int64_t max_blocks, unsigned *grid) {
    int device = 0, sms = 0;
    CUDA_TRY(cudaGetDevice(&device), "grouped GEMM launch");
    CUDA_TRY(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device),
             "reading the multiprocessor count");
    int64_t blocks = sms * blocks_per_sm;
    if (blocks > max_blocks) blocks = max_blocks;
    if (blocks < 1) blocks = 1;
    *grid = (unsigned)blocks;
    return EPMOE_OK;
}

/* 1 when `kernel` (a __global__ function of this binary) has sm_90 machine code for the current
 * device, i.e. it was built for the 90a architecture and runs on a compute capability 9.0 GPU;
 * 0 when no image fits (not an error of the caller's: the error is cleared). */
static inline int kernel_has_sm90_image(const void *kernel) {
    cudaFuncAttributes attr;
    if (cudaFuncGetAttributes(&attr, kernel) != cudaSuccess) {
        (void)cudaGetLastError();
        return 0;
    }
    return attr.binaryVersion == 90;
}

/* The parameter block every Hopper kernel takes, from validated public args. */
static inline GemmParams make_params(const epmoe_grouped_gemm_args *a) {
    GemmParams p;
    p.E = (int)a->n_experts;
    p.N = (int)a->N;
    p.K = (int)a->K;
    p.cap_rows = a->cap_rows;
    p.a_codes = a->a_codes;
    p.a_sf = a->a_sf;
    p.a_fp8 = a->a_format == EPMOE_GEMM_A_FP8;
    p.a_scale = a->a_scale;
    p.a_bf16 = (const __nv_bfloat16 *)a->a_bf16;
    p.w_codes = a->w_codes;
    p.w_sf = a->w_sf;
    p.w_slabs = a->w_slabs;
    p.w_fp8 = a->w_fp8;
    p.w_fp8_exp = a->w_fp8_exp;
    p.w_scale = a->w_scale;
    p.w_groups = (int)a->w_scale_groups;
    p.w_split = (int)a->w_scale_split;
    p.padded_offsets = a->padded_offsets;
    p.tokens_per_expert = a->tokens_per_expert;
    p.out = a->out;
    p.out_bf16 = a->out_bf16;
    p.out_row = a->out_row;
    p.out_bias = a->out_bias;
    p.a_ws = a->a_workspace;
    p.serial_launch = a->serial_launch;
    return p;
}

/* The exact bf16 copy of NVFP4 A that some kernels read instead of converting A per weight
 * tile: per live row and 128-k step, 16 chunks of 16 bytes (eight bf16) in one of two orders.
 *   kOrderSlices:    chunk 4q + m = pair m of word q for the quad threads t = 0..3: the k16
 *                    slices in order, 32 bytes each (wgmma's K-major B operand).
 *   kOrderFragments: chunk 4q + t = pairs 0..3 of word q of span t: one mma.m16n8k16 thread's
 *                    two B registers of slices 2q and 2q+1 (one 16-byte load per thread).
 *   kOrderTileImage: the slice order, laid out as the warp-specialized wgmma kernel's shared
 *                    token tile (a_tile_image_offset): for each step, 8-row groups of 2 KB
 *                    one after another, so any run of 8-aligned rows of one step is one
 *                    contiguous image that a single bulk copy moves. Needs cap_rows % 8 == 0.
 *   kOrderPlain:     row-major, k in order (FP8 A only): what the mma.sync kernels read as
 *                    bf16 A, so that they take FP8 A too (Blackwell and any device without
 *                    wgmma run those).
 * FP8 A (p.a_fp8) gives the same orders of e4m3 * 2^e * 2^-8, the 2^-8 that the NVFP4 copy
 * carries too (kDequantFix), and the plain order unscaled, as bf16 A is; exact by the exponent
 * floor of common/fp8.h.
 * Padding rows are neither read nor written. gemm_sm90_prepass.cu. */
enum AOrder { kOrderSlices = 0, kOrderFragments = 1, kOrderTileImage = 2, kOrderPlain = 3 };

/* kOrderTileImage: byte offset of 16-byte chunk c (slice order, 0..15) of row `row`'s 128-k step
 * `step`. An 8-row group's step is 2 KB: two 1 KB halves (k 0-63, 64-127) of 8 rows x 128 B,
 * each 16-byte chunk at column (c % 8) ^ (row % 8) -- wgmma's K-major 128-byte swizzle, whose
 * pattern repeats every 1 KB, so the image is valid at any 1024-aligned shared address. */
static __host__ __device__ __forceinline__ int64_t a_tile_image_offset(int64_t row, int step, int c,
                                                                       int64_t cap_rows) {
    return ((int64_t)step * (cap_rows / 8) + row / 8) * 2048 + (c / 8) * 1024 + (row % 8) * 128 +
           (((c % 8) ^ (int)(row % 8)) << 4);
}
epmoe_status epmoe_a_rows_to_bf16_launch(const GemmParams &p, AOrder order, cudaStream_t stream);

/* The wgmma kernel (gemm_sm90_wgmma.cu), NVFP4 A only: token chunks of 128 rows, 256 weight
 * rows per block; p.a_ws is required. Requires a compute capability 9.0 device; the caller
 * checks. */
epmoe_status epmoe_gemm_sm90_wgmma_launch(const GemmParams &p, cudaStream_t stream);

/* 1 when this binary carries the sm_90a wgmma code (built with the 90a architecture). */
int epmoe_gemm_sm90_wgmma_compiled(void);

/* The warp-specialized wgmma kernel (gemm_sm90_ws.cu), NVFP4 A and slab-layout weights only:
 * token chunks of mt = 16, 32, 64 or 128 rows (the wgmma N), 256 weight rows per block, a
 * producer warp moving stages with the bulk copy engine; p.a_ws is required (16-byte aligned,
 * as are the weight codes and scales), cap_rows % 8 == 0. Requires a compute capability 9.0
 * device; the caller checks. */
epmoe_status epmoe_gemm_sm90_ws_launch(const GemmParams &p, int mt, cudaStream_t stream);

/* 1 when this binary carries the sm_90a code of the warp-specialized kernel. */
int epmoe_gemm_sm90_ws_compiled(void);

/* The FP8 tensor-core kernel (gemm_sm90_fp8.cu): FP8 A and the weights' FP8 slab image
 * (p.w_fp8, p.w_fp8_exp), token chunks of mt = 64 or 128 rows x 128 weight rows, its own
 * pre-pass into p.a_ws. Compute capability 9.0, an sm_90a build. */
epmoe_status epmoe_gemm_sm90_fp8_launch(const GemmParams &p, int mt, cudaStream_t stream);
int epmoe_gemm_sm90_fp8_compiled(void);

/* The streaming decode kernel (gemm_sm90_stream.cu), NVFP4 A only: token chunks of 16 rows,
 * one 32-row weight slab per warp at a time, weights streamed to registers, tokens copied a
 * step ahead into shared memory; p.a_ws is required. Any sm_80+ device. */
epmoe_status epmoe_gemm_sm90_stream_launch(const GemmParams &p, cudaStream_t stream);

/* Programmatic dependent launch after the pre-pass (sm_90+). The pre-pass lets the next kernel
 * launch as soon as all its blocks run; a kernel launched with launch_after_prepass does what
 * does not depend on A's bf16 copy (its work list, its first weight loads) while the pre-pass
 * runs, and calls wait_for_prepass() before it first reads p.a_ws: that waits for the pre-pass
 * grid to complete and its writes to be visible. Without the launch attribute (serial_launch,
 * or a device below 9.0) the wait returns at once. The pre-pass is launched plainly, so every
 * kernel before it has completed when the GEMM starts: its routing layout, a_scale and out are
 * safe to touch before the wait. */
static __device__ __forceinline__ void prepass_let_next_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
static __device__ __forceinline__ void wait_for_prepass() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
template <typename Kernel>
static inline epmoe_status launch_after_prepass(Kernel kernel, unsigned grid, int threads, int smem,
                                                const GemmParams &p, cudaStream_t stream) {
    int device = 0, major = 0;
    CUDA_TRY(cudaGetDevice(&device), "grouped GEMM launch");
    CUDA_TRY(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device),
             "reading the compute capability");
    cudaLaunchAttribute overlap;
    overlap.id = cudaLaunchAttributeProgrammaticStreamSerialization;
    overlap.val.programmaticStreamSerializationAllowed = 1;
    cudaLaunchConfig_t config = {};
    config.gridDim = dim3(grid);
    config.blockDim = dim3(threads);
    config.dynamicSmemBytes = (size_t)smem;
    config.stream = stream;
    config.attrs = &overlap;
    config.numAttrs = major >= 9 && !p.serial_launch ? 1 : 0;
    CUDA_TRY(cudaLaunchKernelEx(&config, kernel, p), "launching a grouped GEMM after its pre-pass");
    return EPMOE_OK;
}

} // namespace epmoe_sm90

#endif
