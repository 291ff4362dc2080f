/* The grouped NVFP4 GEMM (kernels/cuda/grouped_gemm.h) against a CPU reference of the same
 * math: out[r, n] = (sum_k deqA[r,k] * deqW[e,n,k]) * a_scale[r] * w_scale[e, group(n)],
 * with deq = e2m1 * float(ue4m3), summed in float64 from the exact products.
 *
 * Error bound. Every product of two dequantized values is exact (each has at most 6
 * significant bits, bf16 products on the tensor cores are exact), so the only error is the fp32
 * accumulation of K products (and the two fp32 scale multiplies). Per element that is at most
 * about K * 2^-24 * sum_k |p_k| (we allow K * 2^-23, since the tensor cores' internal
 * accumulation is not guaranteed round-to-nearest); on random signs it is ~sqrt(K) * 2^-24
 * relative, ~4e-6 at K = 1024. We require rel L2 <= 1e-4: a single dequantized operand
 * rounded to bf16 (8 bits) instead of being exact would already give ~1e-3, a wrong scale or
 * index O(1).
 *
 * Outputs are poisoned (EPMOE_POISON_BITS) before each run: every real row must be written
 * and finite, every padding row (and the capacity tail) must still hold the poison bits. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <vector>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "tests/gpu/gpu_test.h"
extern "C" {
#include "common/formats.h"
#include "common/layout.h"
#include "common/rng.h"
#include "tests/support/test_support.h"
}
#include "kernels/cuda/grouped_gemm.h"

typedef struct {
    const char *name;
    int64_t E, N, K;
    std::vector<int64_t> counts; /* filled by the case */
    int a_format;  /* epmoe_gemm_a_format: 0 NVFP4, 1 bf16, 2 FP8 */
    int groups;    /* 1 (W2) or 2 (W13: split at N/2) */
    int out_bf16;
    int tight_cap; /* cap_rows = padded_offsets[E] (forces the decode variant on skew) */
    int64_t cap_rows; /* when > 0: this cap (selects a variant; see grouped_gemm.h) */
    int w_pow2;       /* weight block scales powers of two (MXFP4's): the FP8 kernels run too */
} gemm_case;

static uint8_t random_ue4m3(epmoe_rng *r) {
    /* mostly normal scales 2^-6..2^5, some subnormals, a few zeros; never NaN (0x7f) */
    const uint64_t u = epmoe_rng_below(r, 100);
    if (u == 0) return 0;
    if (u < 5) return (uint8_t)(1 + epmoe_rng_below(r, 7));
    return (uint8_t)(0x08 + epmoe_rng_below(r, 0x58));
}

static void fill_codes(epmoe_rng *r, uint8_t *codes, size_t n) {
    for (size_t i = 0; i < n; i++) codes[i] = (uint8_t)epmoe_rng_below(r, 256);
}

static int kernels_seen[EPMOE_GEMM_SM90_KERNEL_COUNT]; /* chosen by AUTO, per kernel */
static int kernels_ran[EPMOE_GEMM_SM90_KERNEL_COUNT];  /* forced or chosen at least once */



static float bf16_round(float x) {
    return __bfloat162float(__float2bfloat16_rn(x));
}

/* A random E4M3 byte, never NaN (0x7f, 0xff). */
static uint8_t random_e4m3(epmoe_rng *r) {
    uint8_t b;
    do b = (uint8_t)epmoe_rng_below(r, 256);
    while ((b & 0x7f) == 0x7f);
    return b;
}

/* The FP8 tensor-core kernels on a case with FP8 A: the weights' FP8 image (every group exact
 * when the block scales are powers of two, and counted otherwise), then each FP8 kernel forced,
 * against the float64 reference of the real rows (ref, in expert, row, column order), padding
 * still poisoned, and the two token widths bit-identical to each other. Tolerance: the products
 * are exact; the tensor cores sum each 128-k step's 128 products with less than fp32's
 * precision (DeepSeek-V3 measured about 14 bits on H800), and the per-step scaling outside the
 * MMA keeps that error per step: rel L2 2e-3, and 2^-8 of the sum of |products| per element. */
static void fp8_kernels(const gemm_case &c, const epmoe_grouped_gemm_args &args, const uint8_t *d_wc,
                        const uint8_t *d_wsf, void *d_out, const std::vector<uint8_t> &poison_bytes,
                        const std::vector<double> &ref, const std::vector<char> &is_real,
                        const std::vector<int64_t> &offs) {
    const int64_t E = c.E, N = c.N, K = c.K, cap = args.cap_rows;
    uint8_t *d_w8, *d_w8e;
    unsigned long long *d_inexact, inexact = 0;
    GT_CUDA(cudaMalloc(&d_w8, E * N * K));
    GT_CUDA(cudaMalloc(&d_w8e, E * N * K / 128));
    GT_CUDA(cudaMalloc(&d_inexact, 8));
    GT_CUDA(cudaMemset(d_inexact, 0, 8));
    GT_OK(epmoe_cuda_weights_to_fp8_slabs(d_wc, d_wsf, E * N, K, d_w8, d_w8e, d_inexact, 0));
    GT_CUDA(cudaDeviceSynchronize());
    GT_CUDA(cudaMemcpy(&inexact, d_inexact, 8, cudaMemcpyDeviceToHost));
    const long long groups = (long long)(E * N * K / 128);
    if (!c.w_pow2) {
        GT_CHECK(inexact > 0, "%s: NVFP4 weight scales, yet no group of %lld counted inexact",
                 c.name, groups);
        printf("   %s: FP8 image of NVFP4 weights: %llu of %lld groups inexact (not used)\n",
               c.name, inexact, groups);
    } else {
        GT_CHECK(inexact == 0, "%s: %llu of %lld groups of power-of-two weights inexact", c.name,
                 inexact, groups);
        const size_t out_bytes = poison_bytes.size(), elem = c.out_bf16 ? 2 : 4;
        std::vector<uint8_t> first, raw(out_bytes);
        for (int k = EPMOE_GEMM_SM90_FP8_MT64; k <= EPMOE_GEMM_SM90_FP8_MT128; k++) {
            epmoe_grouped_gemm_args f = args;
            f.w_fp8 = d_w8;
            f.w_fp8_exp = d_w8e;
            f.sm90_kernel = (epmoe_gemm_sm90_kernel)k;
            GT_CUDA(cudaMemcpy(d_out, poison_bytes.data(), out_bytes, cudaMemcpyHostToDevice));
            const epmoe_status st = epmoe_cuda_grouped_gemm_sm90(&f, 0);
            if (st == EPMOE_ERR_UNSUPPORTED) {
                printf("   %s: %s not run here (%s)\n", c.name,
                       epmoe_grouped_gemm_sm90_kernel_name((epmoe_gemm_sm90_kernel)k), epmoe_last_error());
                continue;
            }
            GT_OK(st);
            GT_CUDA(cudaDeviceSynchronize());
            kernels_ran[k] = 1;
            GT_CUDA(cudaMemcpy(raw.data(), d_out, out_bytes, cudaMemcpyDeviceToHost));
            std::vector<float> got;
            size_t pad_overwritten = 0, bad = 0;
            for (int64_t r = 0; r < cap; r++)
                if (!is_real[r])
                    pad_overwritten += memcmp(&raw[r * N * elem], &poison_bytes[r * N * elem], N * elem) != 0;
            for (int64_t e = 0; e < E; e++)
                for (int64_t r = offs[e]; r < offs[e] + c.counts[e]; r++)
                    for (int64_t n = 0; n < N; n++) {
                        const size_t i = (size_t)(r * N + n) * elem;
                        float v;
                        if (c.out_bf16) {
                            const uint32_t bits = (uint32_t)(raw[i] | raw[i + 1] << 8) << 16;
                            memcpy(&v, &bits, 4);
                        } else {
                            memcpy(&v, &raw[i], 4);
                        }
                        bad += !isfinite(v);
                        got.push_back(v);
                    }
            const double rel = ref.empty() ? 0.0 : epmoe_rel_l2_f32_f64(got.data(), ref.data(), ref.size());
            printf("   %s [%s]: rel L2 %.3g vs float64 (bound 2e-3)\n", c.name,
                   epmoe_grouped_gemm_sm90_kernel_name((epmoe_gemm_sm90_kernel)k), rel);
            GT_CHECK(bad == 0, "%s: FP8 kernel left %zu real outputs unwritten or not finite", c.name, bad);
            GT_CHECK(pad_overwritten == 0, "%s: FP8 kernel wrote into %zu padding rows", c.name,
                     pad_overwritten);
            GT_CHECK(rel <= 2e-3, "%s: FP8 kernel rel L2 %.3g > 2e-3", c.name, rel);
            if (first.empty()) {
                first = raw;
            } else {
                size_t differ = 0;
                for (size_t i = 0; i < out_bytes; i++) differ += first[i] != raw[i];
                GT_CHECK(differ == 0, "%s: the FP8 kernels' token widths differ in %zu bytes", c.name, differ);
            }
        }
        epmoe_grouped_gemm_args a = args;
        a.w_fp8 = d_w8;
        a.w_fp8_exp = d_w8e;
        kernels_seen[epmoe_grouped_gemm_sm90_select(&a)] = 1;
    }
    cudaFree(d_w8);
    cudaFree(d_w8e);
    cudaFree(d_inexact);
}

static void run_case(const gemm_case &c, uint64_t seed) {
    const bool a_bf16 = c.a_format == EPMOE_GEMM_A_BF16, a_fp8 = c.a_format == EPMOE_GEMM_A_FP8;
    epmoe_rng rng;
    epmoe_rng_seed(&rng, seed);
    const int64_t E = c.E, N = c.N, K = c.K;
    std::vector<int64_t> offs(E + 1);
    epmoe_padded_offsets_from_counts(c.counts.data(), E, EPMOE_GEMM_PAD_ROWS, offs.data());
    int64_t total = 0;
    for (int64_t e = 0; e < E; e++) total += c.counts[e];
    int64_t cap = c.tight_cap ? offs[E] : epmoe_padded_capacity(total, E, EPMOE_GEMM_PAD_ROWS);
    cap = epmoe_round_up(cap, EPMOE_GEMM_PAD_ROWS) + EPMOE_GEMM_PAD_ROWS; /* + a poisoned tail */
    if (c.cap_rows > 0) cap = c.cap_rows;
    if (cap < offs[E]) cap = epmoe_round_up(offs[E], EPMOE_GEMM_PAD_ROWS);

    /* host data: every byte random (all 16 codes, incl. -0 and the subnormal 0.5) */
    /* FP8 A: E4M3 bytes [cap, K] and exponent bytes [cap, K/128] from the floor 2^-109 to 2^20
     * (the floor is where the workspace's 2^-8 copy is smallest) */
    std::vector<uint8_t> a_codes(a_fp8 ? cap * K : cap * K / 2), a_sf(a_fp8 ? cap * K / 128 : cap * K / 16);
    std::vector<float> a_scale(cap), a_f(cap * K);
    std::vector<__nv_bfloat16> a_b(cap * K);
    std::vector<uint8_t> w_codes(E * N * K / 2), w_sf(E * N * K / 16);
    std::vector<float> w_scale(E * c.groups);
    if (a_fp8) {
        for (auto &b : a_codes) b = random_e4m3(&rng);
        for (auto &s : a_sf)
            s = (uint8_t)(epmoe_rng_below(&rng, 8) == 0 ? 127 - 109 : 107 + epmoe_rng_below(&rng, 41));
    } else {
        fill_codes(&rng, a_codes.data(), a_codes.size());
        for (auto &s : a_sf) s = random_ue4m3(&rng);
    }
    for (auto &s : a_scale) s = 0.25f + epmoe_rng_uniform(&rng);
    fill_codes(&rng, w_codes.data(), w_codes.size());
    for (auto &s : w_sf) /* powers of two 2^-3 .. 2^5 (UE4M3 mantissa 0), a few zero blocks */
        s = c.w_pow2 ? (epmoe_rng_below(&rng, 100) == 0 ? 0 : (uint8_t)((4 + epmoe_rng_below(&rng, 9)) << 3))
                     : random_ue4m3(&rng);
    for (auto &s : w_scale) s = 0.5f + epmoe_rng_uniform(&rng);
    for (int64_t i = 0; i < cap * K; i++) {
        float v = bf16_round(epmoe_rng_normal(&rng) * 3.0f);
        if (v == 0.0f) v = 0.125f;
        a_f[i] = v;
        a_b[i] = __float2bfloat16_rn(v);
    }

    /* device */
    uint8_t *d_ac, *d_asf, *d_wc, *d_wsf;
    float *d_as, *d_ws;
    void *d_ab, *d_out, *d_abuf;
    int64_t *d_offs, *d_counts;
    const size_t out_elem = c.out_bf16 ? 2 : 4;
    GT_CUDA(cudaMalloc(&d_ac, a_codes.size()));
    GT_CUDA(cudaMalloc(&d_asf, a_sf.size()));
    GT_CUDA(cudaMalloc(&d_as, cap * sizeof(float)));
    GT_CUDA(cudaMalloc(&d_ab, cap * K * 2));
    GT_CUDA(cudaMalloc(&d_abuf, cap * K * 2)); /* the kernels' bf16 A workspace */
    GT_CUDA(cudaMemset(d_abuf, 0xFF, cap * K * 2)); /* NaN bits: a row it failed to fill shows */
    GT_CUDA(cudaMalloc(&d_wc, w_codes.size()));
    GT_CUDA(cudaMalloc(&d_wsf, w_sf.size()));
    GT_CUDA(cudaMalloc(&d_ws, w_scale.size() * sizeof(float)));
    GT_CUDA(cudaMalloc(&d_out, cap * N * out_elem));
    GT_CUDA(cudaMalloc(&d_offs, (E + 1) * sizeof(int64_t)));
    GT_CUDA(cudaMalloc(&d_counts, E * sizeof(int64_t)));
    GT_CUDA(cudaMemcpy(d_ac, a_codes.data(), a_codes.size(), cudaMemcpyHostToDevice));
    GT_CUDA(cudaMemcpy(d_asf, a_sf.data(), a_sf.size(), cudaMemcpyHostToDevice));
    GT_CUDA(cudaMemcpy(d_as, a_scale.data(), cap * sizeof(float), cudaMemcpyHostToDevice));
    GT_CUDA(cudaMemcpy(d_ab, a_b.data(), cap * K * 2, cudaMemcpyHostToDevice));
    GT_CUDA(cudaMemcpy(d_wc, w_codes.data(), w_codes.size(), cudaMemcpyHostToDevice));
    GT_CUDA(cudaMemcpy(d_wsf, w_sf.data(), w_sf.size(), cudaMemcpyHostToDevice));
    GT_CUDA(cudaMemcpy(d_ws, w_scale.data(), w_scale.size() * sizeof(float), cudaMemcpyHostToDevice));
    GT_CUDA(cudaMemcpy(d_offs, offs.data(), (E + 1) * sizeof(int64_t), cudaMemcpyHostToDevice));
    GT_CUDA(cudaMemcpy(d_counts, c.counts.data(), E * sizeof(int64_t), cudaMemcpyHostToDevice));
    /* poison: EPMOE_POISON_BITS in fp32 outputs, the bf16 NaN 0x7fc1 in bf16 outputs; one
     * image, copied in before every kernel run */
    const uint16_t poison16 = 0x7fc1;
    const size_t out_bytes = (size_t)cap * N * out_elem;
    std::vector<uint8_t> poison_bytes(out_bytes);
    if (c.out_bf16) {
        std::vector<uint16_t> p(cap * N, poison16);
        memcpy(poison_bytes.data(), p.data(), out_bytes);
    } else {
        std::vector<float> p(cap * N);
        epmoe_poison_f32(p.data(), p.size());
        memcpy(poison_bytes.data(), p.data(), out_bytes);
    }
    GT_CUDA(cudaMemcpy(d_out, poison_bytes.data(), out_bytes, cudaMemcpyHostToDevice));

    epmoe_grouped_gemm_args args;
    memset(&args, 0, sizeof args);
    args.n_experts = E;
    args.N = N;
    args.K = K;
    args.cap_rows = cap;
    args.a_format = (epmoe_gemm_a_format)c.a_format;
    args.a_codes = d_ac;
    args.a_sf = d_asf;
    args.a_scale = d_as;
    args.a_bf16 = d_ab;
    args.a_workspace = a_bf16 ? NULL : d_abuf;
    args.w_codes = d_wc;
    args.w_sf = d_wsf;
    args.w_scale = d_ws;
    args.w_scale_groups = c.groups;
    args.w_scale_split = c.groups == 2 ? N / 2 : N;
    args.padded_offsets = d_offs;
    args.tokens_per_expert = d_counts;
    args.out = d_out;
    args.out_bf16 = c.out_bf16;
    const char *variant = epmoe_grouped_gemm_sm90_variant(&args);
    const epmoe_gemm_sm90_kernel chosen = epmoe_grouped_gemm_sm90_select(&args);
    kernels_seen[chosen] = 1;
    kernels_ran[chosen] = 1;
    GT_OK(epmoe_cuda_grouped_gemm(&args, 0));
    GT_CUDA(cudaDeviceSynchronize());

    std::vector<float> out(cap * N);
    if (c.out_bf16) {
        std::vector<uint16_t> o(cap * N);
        GT_CUDA(cudaMemcpy(o.data(), d_out, o.size() * 2, cudaMemcpyDeviceToHost));
        for (int64_t i = 0; i < cap * N; i++) {
            uint32_t bits = (uint32_t)o[i] << 16;
            memcpy(&out[i], &bits, 4);
        }
    } else {
        GT_CUDA(cudaMemcpy(out.data(), d_out, out.size() * 4, cudaMemcpyDeviceToHost));
    }

    /* Every other sm_90 kernel, forced, must give the same bits everywhere (real rows equal,
     * padding still poisoned): the engine's results may not depend on which kernel a batch
     * shape selects. The wgmma kernels only where they can run (NVFP4 A on a 9.0 device). The
     * workspace is poisoned again before each run, so a kernel that reads a row its pre-pass did
     * not write shows NaN. Every kernel runs again on the same weights reordered into the slab
     * layout (grouped_gemm.h) by the library's own function: same bits again. */
    std::vector<uint8_t> again(out_bytes), first(out_bytes);
    GT_CUDA(cudaMemcpy(first.data(), d_out, out_bytes, cudaMemcpyDeviceToHost));
    uint8_t *d_wc_slab, *d_wsf_slab;
    GT_CUDA(cudaMalloc(&d_wc_slab, w_codes.size()));
    GT_CUDA(cudaMalloc(&d_wsf_slab, w_sf.size()));
    GT_CUDA(cudaMemset(d_wc_slab, 0x77, w_codes.size())); /* a unit it failed to move shows */
    GT_CUDA(cudaMemset(d_wsf_slab, 0x7F, w_sf.size()));   /* (0x7F: NaN scale bytes) */
    GT_OK(epmoe_cuda_weights_to_slabs(d_wc, d_wsf, E * N, K, d_wc_slab, d_wsf_slab, 0));
    /* pass 0: row-major weights; pass 1: slab weights; pass 2: slab weights with the kernel
     * launched only after its pre-pass (serial_launch), where passes 0-1 let the kernels that
     * read the workspace start beside it: a read before the wait sees the poison; pass 3: slab
     * weights, every row written to its mirror row cap-1-r (out_row, the engine's direct write
     * into the return buffer) and, with fp32 output, an expert bias added (out_bias, gpt-oss):
     * the same bits plus one rounded add of the row's expert's bias, padding still poisoned */
    std::vector<int32_t> mirror(cap);
    for (int64_t r = 0; r < cap; r++) mirror[r] = (int32_t)(cap - 1 - r);
    std::vector<float> bias(E * N);
    for (auto &b : bias) b = epmoe_rng_normal(&rng);
    std::vector<int64_t> expert_of_row(cap, -1);
    for (int64_t e = 0; e < E; e++)
        for (int64_t r = offs[e]; r < offs[e] + c.counts[e]; r++) expert_of_row[r] = e;
    int32_t *d_mirror;
    float *d_bias;
    GT_CUDA(cudaMalloc(&d_mirror, cap * 4));
    GT_CUDA(cudaMemcpy(d_mirror, mirror.data(), cap * 4, cudaMemcpyHostToDevice));
    GT_CUDA(cudaMalloc(&d_bias, E * N * 4));
    GT_CUDA(cudaMemcpy(d_bias, bias.data(), E * N * 4, cudaMemcpyHostToDevice));
    const size_t row_bytes = out_bytes / (size_t)cap;
    const bool with_bias = !c.out_bf16;
    for (int run = 0; run < 4 * EPMOE_GEMM_SM90_KERNEL_COUNT; run++) {
        const int k = run % EPMOE_GEMM_SM90_KERNEL_COUNT, pass = run / EPMOE_GEMM_SM90_KERNEL_COUNT;
        const int slabs = pass >= 1;
        if (k == EPMOE_GEMM_SM90_AUTO ? !slabs : (k == chosen && !slabs)) continue;
        if (k >= EPMOE_GEMM_SM90_FP8_MT64) continue; /* another summation order: fp8_kernels */
        epmoe_grouped_gemm_args forced = args;
        forced.sm90_kernel = (epmoe_gemm_sm90_kernel)k;
        forced.serial_launch = pass == 2;
        forced.out_row = pass == 3 ? d_mirror : NULL;
        forced.out_bias = pass == 3 && with_bias ? d_bias : NULL;
        if (slabs) {
            forced.w_slabs = 1;
            forced.w_codes = d_wc_slab;
            forced.w_sf = d_wsf_slab;
        }
        if (k == EPMOE_GEMM_SM90_AUTO) kernels_seen[epmoe_grouped_gemm_sm90_select(&forced)] = 1;
        GT_CUDA(cudaMemcpy(d_out, poison_bytes.data(), out_bytes, cudaMemcpyHostToDevice));
        GT_CUDA(cudaMemset(d_abuf, 0xFF, cap * K * 2));
        const epmoe_status st = epmoe_cuda_grouped_gemm_sm90(&forced, 0);
        /* wgmma: only on a 9.0 device with NVFP4 A (the warp-specialized one also only on slab
         * weights); streaming: with NVFP4 A */
        const bool ws = k >= EPMOE_GEMM_SM90_WS_MT16 && k <= EPMOE_GEMM_SM90_WS_MT128;
        const bool stream = k == EPMOE_GEMM_SM90_STREAM_MT16;
        if (st == EPMOE_ERR_UNSUPPORTED &&
            (k == EPMOE_GEMM_SM90_WGMMA_MT128 || (ws && (!slabs || a_bf16)) || (stream && a_bf16)))
            continue;
        GT_OK(st);
        GT_CUDA(cudaDeviceSynchronize());
        GT_CUDA(cudaMemcpy(again.data(), d_out, out_bytes, cudaMemcpyDeviceToHost));
        kernels_ran[k] = 1;
        size_t differ = 0;
        for (size_t i = 0; i < out_bytes; i += out_elem) {
            const size_t r = i / row_bytes, j = pass == 3 ? (cap - 1 - r) * row_bytes + i % row_bytes : i;
            if (pass == 3 && with_bias && expert_of_row[r] >= 0) {
                float want, got;
                memcpy(&want, &first[i], 4);
                memcpy(&got, &again[j], 4);
                want = want + bias[expert_of_row[r] * N + (int64_t)((i % row_bytes) / 4)];
                if (memcmp(&want, &got, 4) != 0) differ++;
            } else if (memcmp(&first[i], &again[j], out_elem) != 0) {
                differ++;
            }
        }
        GT_CHECK(differ == 0, "%s: kernel '%s' (%s weights%s) differs from '%s' in %zu of %lld outputs",
                 c.name, epmoe_grouped_gemm_sm90_kernel_name((epmoe_gemm_sm90_kernel)k),
                 slabs ? "slab" : "row-major",
                 pass == 2 ? ", serial launch" : pass == 3 ? ", rows mirrored by out_row" : "",
                 variant, differ, (long long)(cap * N));
    }
    cudaFree(d_wc_slab);
    cudaFree(d_wsf_slab);
    cudaFree(d_mirror);
    cudaFree(d_bias);

    /* reference over real rows; poison checks everywhere else */
    std::vector<float> deq_w(K), deq_a(K);
    std::vector<double> ref;
    std::vector<float> got;
    size_t pad_overwritten = 0, real_unwritten = 0, elem_bound_fail = 0;
    std::vector<char> is_real(cap, 0);
    for (int64_t e = 0; e < E; e++)
        for (int64_t r = offs[e]; r < offs[e] + c.counts[e]; r++) is_real[r] = 1;
    for (int64_t r = 0; r < cap; r++) {
        if (is_real[r]) continue;
        for (int64_t n = 0; n < N; n++) {
            uint32_t bits;
            memcpy(&bits, &out[r * N + n], 4);
            const uint32_t want = c.out_bf16 ? ((uint32_t)poison16 << 16) : EPMOE_POISON_BITS;
            if (bits != want) pad_overwritten++;
        }
    }
    std::vector<float> wdeq(N * K);
    for (int64_t e = 0; e < E; e++) {
        if (c.counts[e] == 0) continue;
        for (int64_t n = 0; n < N; n++)
            for (int64_t k = 0; k < K; k++) {
                const uint8_t byte = w_codes[(e * N + n) * (K / 2) + k / 2];
                const uint8_t code = (k & 1) ? (byte >> 4) : (byte & 15);
                wdeq[n * K + k] = epmoe_e2m1_to_float(code) *
                                  epmoe_e4m3_to_float(w_sf[(e * N + n) * (K / 16) + k / 16]);
            }
        for (int64_t r = offs[e]; r < offs[e] + c.counts[e]; r++) {
            for (int64_t k = 0; k < K; k++) {
                if (a_bf16) {
                    deq_a[k] = a_f[r * K + k];
                } else if (a_fp8) {
                    deq_a[k] = ldexpf(epmoe_e4m3_to_float(a_codes[r * K + k]),
                                      (int)a_sf[r * (K / 128) + k / 128] - 127);
                } else {
                    const uint8_t byte = a_codes[r * (K / 2) + k / 2];
                    const uint8_t code = (k & 1) ? (byte >> 4) : (byte & 15);
                    deq_a[k] = epmoe_e2m1_to_float(code) * epmoe_e4m3_to_float(a_sf[r * (K / 16) + k / 16]);
                }
            }
            const double as = a_scale[r];
            for (int64_t n = 0; n < N; n++) {
                double s = 0.0, sabs = 0.0;
                const float *w = &wdeq[n * K];
                for (int64_t k = 0; k < K; k++) {
                    const double prod = (double)deq_a[k] * (double)w[k];
                    s += prod;
                    sabs += fabs(prod);
                }
                const int grp = (c.groups == 2 && n >= N / 2) ? 1 : 0;
                const double sc = as * (double)w_scale[e * c.groups + grp];
                const double want = s * sc;
                const float g = out[r * N + n];
                if (!isfinite(g)) real_unwritten++;
                /* per-element bound: fp32 accumulation (K * 2^-23 * sum|p|), two fp32 scale
                 * multiplies, and the bf16 output rounding when asked for */
                double bound = ((double)K * 0x1p-23 * sabs + 0x1p-22 * fabs(s)) * sc + 1e-30;
                if (c.out_bf16) bound += 0x1p-8 * fabs(want);
                if (!(fabs((double)g - want) <= bound)) elem_bound_fail++;
                ref.push_back(want);
                got.push_back(g);
            }
        }
    }
    if (a_fp8) fp8_kernels(c, args, d_wc, d_wsf, d_out, poison_bytes, ref, is_real, offs);
    const double rel = ref.empty() ? 0.0 : epmoe_rel_l2_f32_f64(got.data(), ref.data(), ref.size());
    const double rel_bound = c.out_bf16 ? 4e-3 : 1e-4;
    printf("   %s [%s]: E=%lld N=%lld K=%lld rows=%lld cap=%lld  rel L2 %.3g (bound %.0e)\n", c.name,
           variant, (long long)E, (long long)N, (long long)K, (long long)total, (long long)cap, rel,
           rel_bound);
    GT_CHECK(real_unwritten == 0, "%s: %zu real outputs unwritten or not finite", c.name, real_unwritten);
    GT_CHECK(pad_overwritten == 0, "%s: %zu padding/tail outputs overwritten", c.name, pad_overwritten);
    GT_CHECK(rel <= rel_bound, "%s: rel L2 %.3g > %.0e", c.name, rel, rel_bound);
    GT_CHECK(elem_bound_fail == 0, "%s: %zu elements outside the per-element bound", c.name,
             elem_bound_fail);

    cudaFree(d_ac); cudaFree(d_asf); cudaFree(d_as); cudaFree(d_ab); cudaFree(d_abuf); cudaFree(d_wc);
    cudaFree(d_wsf); cudaFree(d_ws); cudaFree(d_out); cudaFree(d_offs); cudaFree(d_counts);
}

static std::vector<int64_t> random_counts(uint64_t seed, int64_t E, int64_t lo, int64_t hi) {
    epmoe_rng r;
    epmoe_rng_seed(&r, seed);
    std::vector<int64_t> c(E);
    for (auto &x : c) x = lo + (int64_t)epmoe_rng_below(&r, (uint64_t)(hi - lo + 1));
    return c;
}

/* decode shapes: 1..60 rows per expert, empty experts first, in the middle; last non-empty */
static void test_decode_fp4_w13(void) {
    gemm_case c = {"decode fp4 W13", 8, 256, 512, random_counts(11, 8, 1, 60), 0, 2, 0, 0, 1408, 0};
    c.counts[0] = 0;
    c.counts[4] = 0;
    c.counts[7] = 3;
    run_case(c, 101);
}
static void test_decode_bf16_w2(void) {
    gemm_case c = {"decode bf16 W2", 6, 192, 384, random_counts(12, 6, 8, 96), 1, 1, 0, 0, 1200, 0};
    c.counts[2] = 0;
    run_case(c, 102);
}
static void test_decode_fp4_bf16_out(void) {
    gemm_case c = {"decode fp4 bf16-out", 5, 128, 256, random_counts(13, 5, 1, 40), 0, 2, 1, 0, 0, 0};
    run_case(c, 103);
}
/* prefill shapes: several 64- and 128-row chunks per expert, ragged last chunk */
static void test_prefill_fp4_w13(void) {
    gemm_case c = {"prefill fp4 W13", 4, 512, 1024, random_counts(14, 4, 130, 400), 0, 2, 0, 0, 0, 0};
    c.counts[1] = 0;
    run_case(c, 104);
}
static void test_prefill_bf16_w2(void) {
    gemm_case c = {"prefill bf16 W2", 3, 320, 768, random_counts(15, 3, 200, 333), 1, 1, 0, 0, 0, 0};
    run_case(c, 105);
}
/* skew: one expert holds everything (prefill variant, then decode variant via a tight cap) */
static void test_skew_one_expert(void) {
    gemm_case c = {"skew fp4 (prefill variant)", 8, 256, 512, std::vector<int64_t>(8, 0), 0, 2, 0, 0, 0, 0};
    c.counts[3] = 700;
    run_case(c, 106);
    gemm_case d = {"skew bf16 (decode variant)", 8, 256, 256, std::vector<int64_t>(8, 0), 1, 1, 0, 1, 0, 0};
    d.counts[7] = 333; /* the last expert */
    run_case(d, 107);
}
static void test_all_empty(void) {
    gemm_case c = {"all experts empty", 4, 128, 256, std::vector<int64_t>(4, 0), 0, 1, 0, 0, 0, 0};
    run_case(c, 108);
}
/* a V4-Flash-sized W2 slice at decode size, to cover K = 2048 and wide N */
static void test_flash_w2_decode(void) {
    gemm_case c = {"flash W2 decode", 4, 4096, 2048, random_counts(16, 4, 8, 32), 0, 1, 0, 0, 0, 0};
    run_case(c, 109);
}

/* the wgmma kernel's edges: N not a multiple of its 256-row tile (a warpgroup's tiles half or
 * wholly past N), bf16 output, one-chunk experts and a ragged last chunk */
static void test_prefill_fp4_w2_ragged_n(void) {
    gemm_case c = {"prefill fp4 W2 N=352", 3, 352, 768, random_counts(17, 3, 100, 333), 0, 1, 0, 0, 0, 0};
    c.counts[2] = 128;
    run_case(c, 110);
}
/* a decode batch of at most 16 rows per expert, one expert empty */
static void test_decode_fp4_tiny(void) {
    gemm_case c = {"decode fp4 tiny", 8, 320, 768, random_counts(20, 8, 1, 16), 0, 2, 0, 0, 0, 0};
    c.counts[5] = 0;
    run_case(c, 113);
}
/* K = 128: one step per work item, fewer than the streaming kernel's two weight slots, so its
 * weight loads run two items ahead of the compute; 2 experts empty */
static void test_decode_fp4_one_step(void) {
    gemm_case c = {"decode fp4 K=128", 7, 160, 128, random_counts(22, 7, 1, 30), 0, 2, 0, 0, 0, 0};
    c.counts[1] = 0;
    c.counts[6] = 0;
    run_case(c, 115);
}
/* between decode and prefill: AUTO's wgmma class (33-128 rows per expert on average) */
static void test_mid_fp4(void) {
    gemm_case c = {"mid fp4 W13", 6, 384, 640, random_counts(19, 6, 40, 150), 0, 2, 0, 0, 0, 0};
    c.counts[4] = 0;
    run_case(c, 112);
}
static void test_prefill_fp4_bf16_out(void) {
    gemm_case c = {"prefill fp4 bf16-out", 2, 256, 512, random_counts(18, 2, 129, 300), 0, 2, 1, 0, 0, 0};
    run_case(c, 111);
}

/* more work items than SMs, so the persistent kernels carry their pipelines (the
 * warp-specialized kernel's stage ring and its mbarrier phases) across items; K = 384 is three
 * 128-k steps, fewer than its four stages, so the ring also wraps inside items */
static void test_prefill_many_items(void) {
    gemm_case c = {"prefill fp4 many items", 6, 2048, 384, random_counts(21, 6, 200, 520), 0, 2, 0, 0, 0, 0};
    run_case(c, 114);
}

/* FP8 A (act_quant = fp8): every kernel through the exact bf16 workspace (the mma.sync ones in
 * its plain order), at decode, mid and prefill sizes, one expert holding everything in the last */
static void test_fp8_a(void) {
    gemm_case d = {"decode fp8 W13", 8, 256, 512, random_counts(23, 8, 1, 16), 2, 2, 0, 0, 0, 0};
    d.counts[2] = 0;
    run_case(d, 116);
    gemm_case m = {"mid fp8 W2", 6, 384, 640, random_counts(24, 6, 20, 70), 2, 1, 0, 0, 0, 0};
    run_case(m, 117);
    gemm_case p = {"prefill fp8 W13 bf16-out", 3, 512, 768, random_counts(25, 3, 130, 400), 2, 2, 1, 0, 0, 0};
    run_case(p, 118);
    gemm_case k = {"skew fp8 W2", 8, 256, 384, std::vector<int64_t>(8, 0), 2, 1, 0, 0, 0, 0};
    k.counts[5] = 600;
    run_case(k, 119);
    /* power-of-two weight scales: the FP8 tensor-core kernels too (N = 352: a 128-row tile
     * partly past N; ragged chunks; one expert empty; one skewed) */
    gemm_case q = {"prefill fp8 MX W13", 4, 512, 1024, random_counts(26, 4, 100, 500), 2, 2, 0, 0, 0, 1};
    q.counts[2] = 0;
    run_case(q, 120);
    gemm_case r = {"prefill fp8 MX W2 N=352", 3, 352, 768, random_counts(27, 3, 60, 333), 2, 1, 0, 0, 0, 1};
    run_case(r, 121);
    gemm_case u = {"skew fp8 MX W2 bf16-out", 6, 256, 2048, std::vector<int64_t>(6, 0), 2, 1, 1, 0, 0, 1};
    u.counts[5] = 900;
    run_case(u, 122);
}

static void test_variants_covered(void) {
    /* every kernel that runs on any sm_80+ device ran, forced, on both weight layouts */
    GT_CHECK(kernels_ran[EPMOE_GEMM_SM90_STREAM_MT16], "the streaming kernel never ran");
    GT_CHECK(kernels_seen[EPMOE_GEMM_SM90_MMA_MT32] && kernels_seen[EPMOE_GEMM_SM90_STREAM_MT16] &&
                 (kernels_seen[EPMOE_GEMM_SM90_MMA_MT64] || kernels_seen[EPMOE_GEMM_SM90_WGMMA_MT128]) &&
                 (kernels_seen[EPMOE_GEMM_SM90_MMA_MT128] || kernels_seen[EPMOE_GEMM_SM90_WGMMA_MT128]),
             "AUTO did not choose every size class: MT=32 %d, MT=64 %d, MT=128 mma %d / wgmma "
             "%d, stream MT=16 %d", kernels_seen[1], kernels_seen[2], kernels_seen[3],
             kernels_seen[4], kernels_seen[5]);
    int major = 0, minor = 0, dev = 0;
    GT_CUDA(cudaGetDevice(&dev));
    GT_CUDA(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
    GT_CUDA(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev));
    if (major == 9 && minor == 0) {
        GT_CHECK(kernels_ran[EPMOE_GEMM_SM90_WGMMA_MT128], "a Hopper device, but the wgmma kernel never ran");
        GT_CHECK(kernels_seen[EPMOE_GEMM_SM90_WGMMA_MT128],
                 "a Hopper device, but AUTO never chose the wgmma kernel for prefill");
        for (int k = EPMOE_GEMM_SM90_WS_MT16; k <= EPMOE_GEMM_SM90_WS_MT128; k++)
            GT_CHECK(kernels_ran[k], "a Hopper device, but the warp-specialized kernel '%s' never ran",
                     epmoe_grouped_gemm_sm90_kernel_name((epmoe_gemm_sm90_kernel)k));
        GT_CHECK(kernels_seen[EPMOE_GEMM_SM90_WS_MT128],
                 "a Hopper device, but AUTO never chose the warp-specialized wgmma kernel for "
                 "prefill on slab weights");
        for (int k = EPMOE_GEMM_SM90_FP8_MT64; k <= EPMOE_GEMM_SM90_FP8_MT128; k++)
            GT_CHECK(kernels_ran[k], "a Hopper device, but the FP8 kernel '%s' never ran",
                     epmoe_grouped_gemm_sm90_kernel_name((epmoe_gemm_sm90_kernel)k));
        GT_CHECK(kernels_seen[EPMOE_GEMM_SM90_FP8_MT128],
                 "a Hopper device, but AUTO never chose the FP8 kernel for FP8 prefill");
    }
}

static void test_bad_args(void) {
    epmoe_grouped_gemm_args a;
    memset(&a, 0, sizeof a);
    a.n_experts = 4;
    a.N = 128;
    a.K = 100; /* not a multiple of 128 */
    a.cap_rows = 128;
    GT_CHECK(epmoe_cuda_grouped_gemm(&a, 0) == EPMOE_ERR_INVALID_ARG, "K = 100 accepted");
    a.K = 256;
    GT_CHECK(epmoe_cuda_grouped_gemm(&a, 0) == EPMOE_ERR_INVALID_ARG, "NULL weights accepted");
    GT_CHECK(epmoe_cuda_grouped_gemm_sm100(&a, 0) != EPMOE_OK, "sm_100 entry accepted bad args");
    /* every other argument valid (never dereferenced: the check fails first), the workspace
     * misaligned */
    alignas(16) static uint64_t dummy[64];
    a.w_codes = a.w_sf = a.a_codes = a.a_sf = (const uint8_t *)dummy;
    a.w_scale = a.a_scale = (const float *)dummy;
    a.w_scale_groups = 1;
    a.w_scale_split = a.N;
    a.padded_offsets = a.tokens_per_expert = (const int64_t *)dummy;
    a.out = dummy;
    a.a_workspace = dummy;
    GT_CHECK(epmoe_grouped_gemm_check_args(&a) == EPMOE_OK, "valid args rejected");
    a.a_workspace = (uint8_t *)dummy + 8;
    GT_CHECK(epmoe_grouped_gemm_check_args(&a) == EPMOE_ERR_INVALID_ARG,
             "a misaligned a_workspace accepted");
    a.a_workspace = dummy;
    a.w_slabs = 2;
    GT_CHECK(epmoe_grouped_gemm_check_args(&a) == EPMOE_ERR_INVALID_ARG, "w_slabs = 2 accepted");
    uint8_t *out8 = (uint8_t *)dummy;
    GT_CHECK(epmoe_cuda_weights_to_slabs(out8, out8, 48, 256, out8, out8, 0) == EPMOE_ERR_INVALID_ARG,
             "48 rows (not a multiple of 32) accepted by the slab reordering");
    GT_CHECK(epmoe_cuda_weights_to_slabs(out8, out8, 64, 200, out8, out8, 0) == EPMOE_ERR_INVALID_ARG,
             "K = 200 accepted by the slab reordering");
}

int main(void) {
    if (!gt_have_device()) return 77;
    GT_RUN(test_bad_args);
    GT_RUN(test_decode_fp4_w13);
    GT_RUN(test_decode_bf16_w2);
    GT_RUN(test_decode_fp4_bf16_out);
    GT_RUN(test_prefill_fp4_w13);
    GT_RUN(test_prefill_bf16_w2);
    GT_RUN(test_skew_one_expert);
    GT_RUN(test_all_empty);
    GT_RUN(test_flash_w2_decode);
    GT_RUN(test_prefill_fp4_w2_ragged_n);
    GT_RUN(test_prefill_fp4_bf16_out);
    GT_RUN(test_mid_fp4);
    GT_RUN(test_decode_fp4_tiny);
    GT_RUN(test_decode_fp4_one_step);
    GT_RUN(test_prefill_many_items);
    GT_RUN(test_fp8_a);
    GT_RUN(test_variants_covered);
    return gt_finish();
}
