/* GPU suite, part 1: every op of kernels/cuda/ops_cuda.h against its CPU definition on the
 * same inputs. Bit-identical where the contract says so (gate logits, routing ids, NVFP4 codes,
 * block scales and global scales, layout, combine); to a stated tolerance where libm and the
 * CUDA math library may differ by ulps (routing weights, SwiGLU). gpt-oss's pieces: the
 * topk_softmax routing, the gptoss SwiGLU with expert biases, the down-projection bias in the
 * combine, and the K padding of rows of 2880 (or 160) to the GEMMs' 128-wide k step. Outputs are poisoned (0xFF
 * bytes, a NaN pattern) before every launch so an element not written fails. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include <vector>

#include "tests/gpu/gpu_test.h"

extern "C" {
#include "common/formats.h"
#include "common/fp8.h"
#include "common/layout.h"
#include "common/nvfp4.h"
#include "common/rng.h"
#include "kernels/ops.h"
#include "tests/support/test_support.h"
}
#include "kernels/cuda/dispatch.h"
#include "kernels/cuda/ops_cuda.h"

/* expf/log1pf of the CUDA math library are within 2 ulp of libm's: a routing weight goes
 * through ~k+3 roundings, a SwiGLU output through 4. */
#define WEIGHT_REL_TOL 1e-5
#define SWIGLU_REL_TOL 2e-6

template <typename T> static T *dev_alloc(size_t n) {
    T *p = NULL;
    if (cudaMalloc(&p, n * sizeof(T) + 1) != cudaSuccess) return NULL;
    cudaMemset(p, 0xff, n * sizeof(T) + 1); /* poison */
    return p;
}
template <typename T> static T *dev_copy(const T *h, size_t n) {
    T *p = dev_alloc<T>(n);
    if (p) cudaMemcpy(p, h, n * sizeof(T), cudaMemcpyHostToDevice);
    return p;
}
template <typename T> static void to_host(T *h, const T *d, size_t n) {
    cudaMemcpy(h, d, n * sizeof(T), cudaMemcpyDeviceToHost);
}

static uint32_t f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

/* ---- gate logits ---------------------------------------------------------------------- */

/* One gate-logit launch (kernel -1: the one chosen by shape) against the CPU's logits, into
 * a poisoned output; returns the number of logits whose bits differ, -1 when the launch failed.
 * shift > 0 offsets x and Wg by that many floats inside their allocations, so that 16-byte
 * copies are refused and the 4-byte path runs. */
static int64_t gate_logits_diff(int kernel, const float *x, const float *w, int64_t T, int64_t H,
                                int64_t E, const float *cpu, int shift) {
    float *dx = dev_alloc<float>(T * H + shift), *dw = dev_alloc<float>(E * H + shift);
    float *dl = dev_alloc<float>(T * E); /* poisoned: an unwritten logit is a NaN pattern */
    std::vector<float> gpu(T * E);
    int64_t diff = -1;
    if (dx && dw && dl) {
        cudaMemcpy(dx + shift, x, T * H * 4, cudaMemcpyHostToDevice);
        cudaMemcpy(dw + shift, w, E * H * 4, cudaMemcpyHostToDevice);
        if (epmoe_cuda_gate_logits_kernel(kernel, dx + shift, dw + shift, T, H, E, dl, 0) ==
                EPMOE_OK &&
            cudaDeviceSynchronize() == cudaSuccess) {
            to_host(gpu.data(), dl, T * E);
            diff = 0;
            for (int64_t i = 0; i < T * E; i++) diff += f32_bits(cpu[i]) != f32_bits(gpu[i]);
        }
    }
    cudaFree(dx), cudaFree(dw), cudaFree(dl);
    return diff;
}

/* The CPU's logits by the engine's panels (the unit suite holds them to the plain definition,
 * epmoe_cpu_gate_logits, bit for bit; they are 15x faster for these sizes). */
static void cpu_gate_logits(const std::vector<float> &x, const std::vector<float> &w, int64_t T,
                            int64_t H, int64_t E, std::vector<float> &out) {
    std::vector<float> panels(epmoe_cpu_panels_floats(E, H));
    epmoe_cpu_pack_panels(w.data(), E, H, panels.data());
    out.assign(T * E, 0.0f);
    epmoe_cpu_gate_logits_panels(x.data(), T, H, panels.data(), E, out.data());
}

static void test_gate_logits_bit_identical(void) {
    /* Every kernel (and the one chosen by shape) on decode and prefill batch sizes, against H
     * below one chunk (7, 100), a chunk count that is neither a multiple of the chunk groups
     * nor H of the chunk (2880: 22.5 chunks) and V4-Flash's 4096; E = 256 and a ragged 37
     * (tile tails in E). The 4-byte copy path runs for H = 7 and for shifted (unaligned) x and
     * Wg. The plain definition itself is checked once per shape. */
    const int64_t Ts[] = {1, 3, 64, 129, 1000, 4100};
    const int64_t Hs[] = {7, 100, 2880, 4096};
    const int64_t Es[] = {256, 37};
    epmoe_rng rng;
    epmoe_rng_seed(&rng, 11);
    for (int64_t E : Es)
        for (int64_t H : Hs)
            for (int64_t T : Ts) {
                std::vector<float> x(T * H), w(E * H), cpu;
                epmoe_fill_normal(&rng, x.data(), T * H, 1.0f);
                epmoe_fill_normal(&rng, w.data(), E * H, 1.0f / sqrtf((float)H));
                cpu_gate_logits(x, w, T, H, E, cpu);
                if (T <= 3) { /* the panels against the plain definition, on a few rows */
                    std::vector<float> plain(T * E);
                    epmoe_cpu_gate_logits(x.data(), w.data(), T, H, E, plain.data());
                    GT_CHECK(memcmp(plain.data(), cpu.data(), T * E * 4) == 0,
                             "T=%lld H=%lld E=%lld: CPU panels differ from the definition",
                             (long long)T, (long long)H, (long long)E);
                }
                for (int kernel = -1; kernel < EPMOE_CUDA_GATE_KERNELS; kernel++)
                    for (int shift = 0; shift <= 1; shift++) {
                        if (shift && T > 129 && kernel >= 0) continue; /* auto covers it */
                        int64_t diff =
                            gate_logits_diff(kernel, x.data(), w.data(), T, H, E, cpu.data(), shift);
                        GT_CHECK(diff == 0,
                                 "kernel %d, T=%lld H=%lld E=%lld%s: %lld logits differ in bits "
                                 "(-1: the launch failed: %s)",
                                 kernel, (long long)T, (long long)H, (long long)E,
                                 shift ? " (unaligned)" : "", (long long)diff, epmoe_last_error());
                    }
            }
    /* V4-Pro's shape: 56 chunks, two rounds of 32, fourteen of 4, seven of 8 */
    for (int64_t T : {1, 43, 700, 2100}) {
        const int64_t H = 7168, E = 384;
        std::vector<float> x(T * H), w(E * H), cpu;
        epmoe_fill_normal(&rng, x.data(), T * H, 1.0f);
        epmoe_fill_normal(&rng, w.data(), E * H, 1.0f / sqrtf((float)H));
        cpu_gate_logits(x, w, T, H, E, cpu);
        for (int kernel = -1; kernel < EPMOE_CUDA_GATE_KERNELS; kernel++) {
            int64_t diff = gate_logits_diff(kernel, x.data(), w.data(), T, H, E, cpu.data(), 0);
            GT_CHECK(diff == 0, "kernel %d, T=%lld H=%lld E=%lld: %lld logits differ in bits",
                     kernel, (long long)T, (long long)H, (long long)E, (long long)diff);
        }
    }
}

/* A token's logits do not depend on its batch: windows of a 4100-token batch, launched as
 * batches of their own (other kernels by shape), give the bits of the whole batch. */
static void test_gate_logits_batch_invariant(void) {
    const int64_t H = 4096, E = 256, T = 4100;
    epmoe_rng rng;
    epmoe_rng_seed(&rng, 12);
    std::vector<float> x(T * H), w(E * H), cpu;
    epmoe_fill_normal(&rng, x.data(), T * H, 1.0f);
    epmoe_fill_normal(&rng, w.data(), E * H, 1.0f / sqrtf((float)H));
    cpu_gate_logits(x, w, T, H, E, cpu);
    const int64_t windows[][2] = {{4100, 0}, {64, 4000}, {1, 4099}, {3, 17}, {129, 1}, {1000, 7}};
    for (const auto &win : windows) {
        const int64_t n = win[0], t0 = win[1];
        int64_t diff = gate_logits_diff(-1, x.data() + t0 * H, w.data(), n, H, E,
                                        cpu.data() + t0 * E, 0);
        GT_CHECK(diff == 0, "tokens [%lld, %lld) as a batch of %lld: %lld logits differ from "
                 "the batch of %lld", (long long)t0, (long long)(t0 + n), (long long)n,
                 (long long)diff, (long long)T);
    }
}

/* ---- routing -------------------------------------------------------------------------- */

/* Routes logits[T,E] on both backends, compares ids exactly and weights to WEIGHT_REL_TOL. */
static void compare_routing(const char *what, const epmoe_route_params *p, const float *logits,
                            const float *bias, int64_t T, const int32_t *tid2eid,
                            int64_t vocab, const int32_t *token_ids) {
    const int64_t E = p->n_experts, k = p->top_k;
    int32_t *ids_cpu = (int32_t *)malloc(T * k * 4), *ids_gpu = (int32_t *)malloc(T * k * 4);
    float *w_cpu = (float *)malloc(T * k * 4), *w_gpu = (float *)malloc(T * k * 4);
    if (tid2eid)
        GT_OK(epmoe_cpu_route_hash(p, logits, tid2eid, vocab, token_ids, T, ids_cpu, w_cpu));
    else
        GT_OK(epmoe_cpu_route(p, logits, bias, T, ids_cpu, w_cpu));
    float *dl = dev_copy(logits, T * E), *db = bias ? dev_copy(bias, E) : NULL;
    int32_t *dids = dev_alloc<int32_t>(T * k);
    float *dw = dev_alloc<float>(T * k);
    uint32_t *dflags = dev_alloc<uint32_t>(1), flags = 0;
    cudaMemset(dflags, 0, 4);
    int32_t *dtab = NULL, *dtok = NULL;
    if (tid2eid) {
        dtab = dev_copy(tid2eid, vocab * k);
        dtok = dev_copy(token_ids, T);
        GT_OK(epmoe_cuda_route_hash(p, dl, dtab, vocab, dtok, T, dids, dw, dflags, 0));
    } else {
        GT_OK(epmoe_cuda_route(p, dl, db, T, dids, dw, dflags, 0));
    }
    GT_CUDA(cudaDeviceSynchronize());
    to_host(ids_gpu, dids, T * k);
    to_host(w_gpu, dw, T * k);
    to_host(&flags, dflags, 1);
    GT_CHECK(flags == 0, "%s: device flags 0x%x", what, flags);
    int64_t id_diff = 0, first = -1;
    double worst = 0;
    for (int64_t i = 0; i < T * k; i++) {
        if (ids_cpu[i] != ids_gpu[i]) {
            if (first < 0) first = i;
            id_diff++;
        }
        double rel = fabs((double)w_gpu[i] - w_cpu[i]) / fabs((double)w_cpu[i]);
        if (!(rel <= worst)) worst = rel; /* NaN sticks */
    }
    GT_CHECK(id_diff == 0, "%s: %lld ids differ (first at token %lld slot %lld: cpu %d gpu %d)",
             what, (long long)id_diff, (long long)(first / k), (long long)(first % k),
             first >= 0 ? ids_cpu[first] : 0, first >= 0 ? ids_gpu[first] : 0);
    GT_CHECK(worst <= WEIGHT_REL_TOL, "%s: weights differ by %.3g relative (tolerance %g)", what,
             worst, WEIGHT_REL_TOL);
    printf("   %s: ids identical=%s, max weight rel err %.2e\n", what, id_diff ? "NO" : "yes", worst);
    cudaFree(dl), cudaFree(db), cudaFree(dids), cudaFree(dw), cudaFree(dflags), cudaFree(dtab),
        cudaFree(dtok);
    free(ids_cpu), free(ids_gpu), free(w_cpu), free(w_gpu);
}

static void test_routing_matches_cpu(void) {
    epmoe_rng rng;
    epmoe_rng_seed(&rng, 21);
    const int64_t T = 1000, E = 256;
    float *logits = (float *)malloc(T * 384 * 4), *bias = (float *)malloc(384 * 4);
    epmoe_fill_normal(&rng, logits, T * 384, 2.0f);
    epmoe_fill_normal(&rng, bias, 384, 0.1f);

    epmoe_route_params v4 = {E, 6, EPMOE_SCORING_SQRTSOFTPLUS, 1, 1, 1.5f};
    compare_routing("dsv4 sqrtsoftplus+bias E=256 k=6", &v4, logits, bias, T, NULL, 0, NULL);
    compare_routing("dsv4 no bias", &v4, logits, NULL, T, NULL, 0, NULL);
    epmoe_route_params v4pro = {384, 6, EPMOE_SCORING_SQRTSOFTPLUS, 1, 1, 2.5f};
    compare_routing("dsv4-pro E=384", &v4pro, logits, bias, T, NULL, 0, NULL);
    epmoe_route_params v3 = {E, 8, EPMOE_SCORING_SIGMOID, 8, 4, 2.5f};
    compare_routing("dsv3 sigmoid, 8 groups keep 4, k=8", &v3, logits, bias, T, NULL, 0, NULL);

    /* Ties everywhere: logits from four values, no bias; the lower id must win on both. */
    float *tied = (float *)malloc(T * E * 4);
    const float levels[4] = {-1.0f, 0.0f, 0.5f, 1.0f};
    for (int64_t i = 0; i < T * E; i++) tied[i] = levels[epmoe_rng_below(&rng, 4)];
    compare_routing("dsv4 massive ties", &v4, tied, NULL, T, NULL, 0, NULL);
    compare_routing("dsv3 massive ties (groups tie too)", &v3, tied, NULL, T, NULL, 0, NULL);

    /* Hash routing: tid2eid rows of k distinct experts. */
    const int64_t vocab = 777, k = 6;
    int32_t *tab = (int32_t *)malloc(vocab * k * 4), *tok = (int32_t *)malloc(T * 4);
    for (int64_t v = 0; v < vocab; v++)
        for (int64_t j = 0; j < k; j++) {
            int32_t e;
            int dup;
            do {
                e = (int32_t)epmoe_rng_below(&rng, E);
                dup = 0;
                for (int64_t i = 0; i < j; i++) dup |= tab[v * k + i] == e;
            } while (dup);
            tab[v * k + j] = e;
        }
    for (int64_t t = 0; t < T; t++) tok[t] = (int32_t)epmoe_rng_below(&rng, vocab);
    tok[0] = 0, tok[1] = (int32_t)(vocab - 1);
    compare_routing("hash (tid2eid)", &v4, logits, NULL, T, tab, vocab, tok);
    free(logits), free(bias), free(tied), free(tab), free(tok);
}

/* gpt-oss's topk_softmax: ids = top 4 of logit + bias, weights = softmax over those 4 biased
 * logits (the bias in the weights too). 120b's 128 experts and 20b's 32, a bias large enough to
 * reorder the logits, ties (four logit levels and no bias: the lower id wins), and keys far
 * below 0 (a softmax needs no scores, so nothing may underflow). */
static void test_routing_topk_softmax(void) {
    epmoe_rng rng;
    epmoe_rng_seed(&rng, 23);
    const int64_t T = 1000;
    std::vector<float> logits(T * 128), bias(128), tied(T * 128);
    epmoe_fill_normal(&rng, logits.data(), logits.size(), 2.0f);
    epmoe_fill_normal(&rng, bias.data(), bias.size(), 1.0f);
    epmoe_route_params oss120 = {128, 4, EPMOE_SCORING_TOPK_SOFTMAX, 1, 1, 1.0f};
    epmoe_route_params oss20 = {32, 4, EPMOE_SCORING_TOPK_SOFTMAX, 1, 1, 1.0f};
    compare_routing("topk_softmax E=128 k=4 +bias", &oss120, logits.data(), bias.data(), T, NULL,
                    0, NULL);
    compare_routing("topk_softmax E=32 k=4 +bias", &oss20, logits.data(), bias.data(), T, NULL, 0,
                    NULL);
    compare_routing("topk_softmax no bias", &oss120, logits.data(), NULL, T, NULL, 0, NULL);
    const float levels[4] = {-1.0f, 0.0f, 0.5f, 1.0f};
    for (auto &v : tied) v = levels[epmoe_rng_below(&rng, 4)];
    compare_routing("topk_softmax massive ties", &oss120, tied.data(), NULL, T, NULL, 0, NULL);
    for (auto &v : logits) v -= 150.0f;
    compare_routing("topk_softmax logits near -150", &oss120, logits.data(), bias.data(), T, NULL,
                    0, NULL);

    /* the weights of one token by hand: keys 3, 2, 1, 0 (logit + bias) on experts 5, 9, 2, 7 */
    float l[32] = {0}, b[32] = {0};
    for (int e = 0; e < 32; e++) l[e] = -10.0f;
    l[5] = 1.0f, b[5] = 2.0f;   /* key 3: the bias lifts it to first */
    l[9] = 2.5f, b[9] = -0.5f;  /* key 2 */
    l[2] = 1.0f;                /* key 1 */
    l[7] = 0.5f, b[7] = -0.5f;  /* key 0 */
    float *dl = dev_copy(l, 32), *db = dev_copy(b, 32), *dw = dev_alloc<float>(4), w[4];
    int32_t *dids = dev_alloc<int32_t>(4), ids[4];
    uint32_t *dflags = dev_alloc<uint32_t>(1);
    cudaMemset(dflags, 0, 4);
    GT_OK(epmoe_cuda_route(&oss20, dl, db, 1, dids, dw, dflags, 0));
    GT_CUDA(cudaDeviceSynchronize());
    to_host(ids, dids, 4);
    to_host(w, dw, 4);
    double den = 1.0 + exp(-1.0) + exp(-2.0) + exp(-3.0), worst = 0;
    for (int j = 0; j < 4; j++) worst = fmax(worst, fabs(w[j] - exp(-(double)j) / den) / (exp(-(double)j) / den));
    GT_CHECK(ids[0] == 5 && ids[1] == 9 && ids[2] == 2 && ids[3] == 7,
             "topk_softmax by hand: ids %d %d %d %d, want 5 9 2 7", ids[0], ids[1], ids[2], ids[3]);
    GT_CHECK(worst < 1e-6, "topk_softmax by hand: weights %g %g %g %g, rel err %.3g", w[0], w[1],
             w[2], w[3], worst);
    cudaFree(dl), cudaFree(db), cudaFree(dw), cudaFree(dids), cudaFree(dflags);

    /* Keys of -Inf from finite inputs (logit + bias overflowing): only experts 25 and 20 have
     * finite keys, so slots 2 and 3 go to -Inf keys, the lowest ids first (0, then 1), as the
     * CPU's topk_insert takes them. A chosen expert must never come back: the kernel once
     * masked chosen keys with -Inf, and slot 3 then took expert 0 a second time. */
    for (int e = 0; e < 32; e++) l[e] = -3e38f, b[e] = -3e38f;
    l[25] = 2.0f, b[25] = 0.0f;
    l[20] = 1.0f, b[20] = 0.0f;
    int32_t want[4];
    float w_cpu[4];
    GT_OK(epmoe_cpu_route(&oss20, l, b, 1, want, w_cpu));
    dl = dev_copy(l, 32), db = dev_copy(b, 32), dw = dev_alloc<float>(4);
    dids = dev_alloc<int32_t>(4), dflags = dev_alloc<uint32_t>(1);
    cudaMemset(dflags, 0, 4);
    GT_OK(epmoe_cuda_route(&oss20, dl, db, 1, dids, dw, dflags, 0));
    GT_CUDA(cudaDeviceSynchronize());
    to_host(ids, dids, 4);
    GT_CHECK(want[0] == 25 && want[1] == 20 && want[2] == 0 && want[3] == 1,
             "topk_softmax -Inf keys: CPU ids %d %d %d %d, want 25 20 0 1", want[0], want[1],
             want[2], want[3]);
    GT_CHECK(memcmp(ids, want, sizeof ids) == 0,
             "topk_softmax -Inf keys: GPU ids %d %d %d %d, CPU %d %d %d %d", ids[0], ids[1],
             ids[2], ids[3], want[0], want[1], want[2], want[3]);
    cudaFree(dl), cudaFree(db), cudaFree(dw), cudaFree(dids), cudaFree(dflags);
}

/* Every chosen logit far below 0 (issue 24, defect 11): the fp32 scores underflow, the weights
 * are normalized in log space on both backends. Ids (decided by a bias with 0.01 gaps, or by the
 * table) identical to the CPU's, weights within WEIGHT_REL_TOL of the CPU's (which the unit
 * suite checks against float64), no device flag. */
static void test_routing_very_negative_logits(void) {
    const int64_t T = 64, E = 256, vocab = 32, k = 6;
    const float levels[] = {-80.0f, -95.0f, -110.0f, -200.0f};
    float *logits = (float *)malloc(T * E * 4), bias[256];
    int32_t tab[32 * 6], tok[64];
    for (int64_t e = 0; e < E; e++) bias[e] = 0.01f * (float)((e * 97) % E); /* a permutation */
    for (int64_t v = 0; v < vocab; v++)
        for (int64_t j = 0; j < k; j++) tab[v * k + j] = (int32_t)((v * 7 + j * 41) % E);
    for (int64_t t = 0; t < T; t++) tok[t] = (int32_t)(t % vocab);
    uint32_t r = 12345;
    for (int si = 0; si < 2; si++) {
        epmoe_route_params p = {E, k, si ? EPMOE_SCORING_SIGMOID : EPMOE_SCORING_SQRTSOFTPLUS, 1,
                                1, 2.5f};
        for (int li = 0; li < 4; li++) {
            for (int64_t i = 0; i < T * E; i++) {
                r = r * 1664525u + 1013904223u;
                logits[i] = levels[li] + 6.0f * ((float)(r >> 8) / 16777216.0f - 0.5f);
            }
            char what[96];
            snprintf(what, sizeof what, "%s logits %g +- 3", si ? "sigmoid" : "sqrtsoftplus",
                     (double)levels[li]);
            compare_routing(what, &p, logits, bias, T, NULL, 0, NULL);
            snprintf(what, sizeof what, "%s logits %g +- 3, hash", si ? "sigmoid" : "sqrtsoftplus",
                     (double)levels[li]);
            compare_routing(what, &p, logits, NULL, T, tab, vocab, tok);
        }
    }
    free(logits);
}

/* Bad data cannot be returned without a sync: it raises a device flag and keeps ids in range. */
static void test_routing_flags(void) {
    const int64_t T = 4, E = 64, k = 4, vocab = 10;
    epmoe_route_params p = {E, k, EPMOE_SCORING_SQRTSOFTPLUS, 1, 1, 1.0f};
    float logits[T * E];
    for (int64_t i = 0; i < T * E; i++) logits[i] = 0.01f * (float)(i % 97);
    logits[2 * E + 5] = NAN;
    int32_t tab[vocab * k], tok[T] = {1, 2, 3, 4};
    for (int64_t i = 0; i < vocab * k; i++) tab[i] = (int32_t)(i % E);
    float *dl = dev_copy(logits, T * E);
    int32_t *dids = dev_alloc<int32_t>(T * k), ids[T * k];
    float *dw = dev_alloc<float>(T * k);
    uint32_t *dflags = dev_alloc<uint32_t>(1), flags = 0;
    cudaMemset(dflags, 0, 4);
    GT_OK(epmoe_cuda_route(&p, dl, NULL, T, dids, dw, dflags, 0));
    GT_CUDA(cudaDeviceSynchronize());
    to_host(&flags, dflags, 1);
    to_host(ids, dids, T * k);
    GT_CHECK(flags == EPMOE_CUDA_FLAG_NONFINITE_LOGIT, "NaN logit: flags 0x%x", flags);
    GT_CHECK(epmoe_cuda_flags_status(flags, "test") == EPMOE_ERR_NUMERIC, "status of NaN flag");
    int in_range = 1;
    for (int64_t i = 0; i < T * k; i++) in_range &= ids[i] >= 0 && ids[i] < E;
    GT_CHECK(in_range, "ids stay in range after a NaN logit");

    logits[2 * E + 5] = 0.0f;
    cudaMemcpy(dl, logits, sizeof logits, cudaMemcpyHostToDevice);
    tok[3] = (int32_t)vocab; /* out of range */
    int32_t *dtab = dev_copy(tab, vocab * k), *dtok = dev_copy(tok, T);
    cudaMemset(dflags, 0, 4);
    GT_OK(epmoe_cuda_route_hash(&p, dl, dtab, vocab, dtok, T, dids, dw, dflags, 0));
    GT_CUDA(cudaDeviceSynchronize());
    to_host(&flags, dflags, 1);
    GT_CHECK(flags == EPMOE_CUDA_FLAG_TOKEN_RANGE, "token id == vocab: flags 0x%x", flags);
    GT_CHECK(epmoe_cuda_flags_status(flags, "test") == EPMOE_ERR_RANGE, "status of range flag");
    cudaFree(dl), cudaFree(dids), cudaFree(dw), cudaFree(dflags), cudaFree(dtab), cudaFree(dtok);
}

/* ---- NVFP4 quantization ---------------------------------------------------------------- */

/* Rows that exercise every branch: ordinary magnitudes over 6 decades, an all-zero row, -0,
 * subnormal block scales next to a huge outlier, and exact E2M1 midpoints (ties to even). */
static void make_quant_rows(epmoe_rng *rng, float *x, int64_t rows, int64_t K) {
    for (int64_t r = 0; r < rows; r++) {
        float *row = x + r * K;
        float scale = powf(10.0f, -3.0f + 6.0f * epmoe_rng_uniform(rng));
        epmoe_fill_normal(rng, row, K, scale);
        switch (r % 8) {
        case 1: memset(row, 0, K * 4); break;
        case 2:
            for (int64_t i = 0; i < K; i += 3) row[i] = -0.0f;
            break;
        case 3: /* one outlier: the other blocks get tiny (subnormal e4m3) scales */
            epmoe_fill_normal(rng, row, K, 1e-3f);
            row[K / 2] = 3.0e4f;
            break;
        case 4: { /* amax 2688 -> global_sf 1; blocks of max 6 -> sf 1: codes see x itself */
            const float mids[8] = {0.25f, 0.75f, 1.25f, 1.75f, 2.5f, 3.5f, 5.0f, 6.0f};
            for (int64_t i = 0; i < K; i++)
                row[i] = (i % 16 == 15 ? 6.0f : mids[i % 8]) * (i % 5 == 0 ? -1.0f : 1.0f);
            row[0] = 2688.0f;
            break;
        }
        case 5: /* values past the saturation point of a rounded-down block scale */
            for (int64_t i = 0; i < K; i++) row[i] = (i % 16 == 0) ? 1.03f * scale : 0.5f * scale;
            break;
        default: break;
        }
    }
}

/* Rows of K quantized into rows of K_pad >= K elements (the GEMMs' 128-wide k step): the first
 * K elements as the CPU quantizes them, the rest code 0 with block scale 0. */
static void test_nvfp4_quantize_bit_identical(void) {
    epmoe_rng rng;
    epmoe_rng_seed(&rng, 31);
    const int64_t shapes[][3] = {{64, 256, 256}, {9, 7168, 7168}, {3, 16, 16},
                                 {11, 2880, 3072}, {7, 160, 256}};
    for (int s = 0; s < 5; s++) {
        int64_t rows = shapes[s][0], K = shapes[s][1], Kp = shapes[s][2];
        float *x = (float *)malloc(rows * K * 4), *inv_cpu = (float *)malloc(rows * 4),
              *inv_gpu = (float *)malloc(rows * 4);
        uint8_t *codes_cpu = (uint8_t *)malloc(rows * K / 2), *codes_gpu = (uint8_t *)malloc(rows * K / 2);
        uint8_t *sf_cpu = (uint8_t *)malloc(rows * K / 16), *sf_gpu = (uint8_t *)malloc(rows * K / 16);
        make_quant_rows(&rng, x, rows, K);
        unsigned long long sat_cpu = 0, sat_gpu = 0;
        for (int64_t r = 0; r < rows; r++) {
            float gs = epmoe_nvfp4_global_sf(epmoe_amax(x + r * K, K));
            sat_cpu += epmoe_nvfp4_quantize_row(x + r * K, K, gs, codes_cpu + r * K / 2,
                                                sf_cpu + r * K / 16);
            inv_cpu[r] = 1.0f / gs;
        }
        float *dx = dev_copy(x, rows * K), *dinv = dev_alloc<float>(rows);
        uint8_t *dcodes = dev_alloc<uint8_t>(rows * Kp / 2), *dsf = dev_alloc<uint8_t>(rows * Kp / 16);
        unsigned long long *dsat = dev_alloc<unsigned long long>(1);
        cudaMemset(dsat, 0, 8);
        GT_OK(epmoe_cuda_nvfp4_quantize_rows(dx, K, rows, K, Kp, NULL, NULL, NULL, 0, NULL, dcodes,
                                             dsf, dinv, dsat, 0));
        GT_CUDA(cudaDeviceSynchronize());
        std::vector<uint8_t> codes_pad(rows * Kp / 2), sf_pad(rows * Kp / 16);
        to_host(codes_pad.data(), dcodes, codes_pad.size());
        to_host(sf_pad.data(), dsf, sf_pad.size());
        to_host(inv_gpu, dinv, rows);
        to_host(&sat_gpu, dsat, 1);
        int64_t code_diff = 0, sf_diff = 0, inv_diff = 0, pad_nonzero = 0;
        for (int64_t r = 0; r < rows; r++) {
            memcpy(codes_gpu + r * K / 2, &codes_pad[r * Kp / 2], K / 2);
            memcpy(sf_gpu + r * K / 16, &sf_pad[r * Kp / 16], K / 16);
            for (int64_t i = K / 2; i < Kp / 2; i++) pad_nonzero += codes_pad[r * Kp / 2 + i] != 0;
            for (int64_t i = K / 16; i < Kp / 16; i++) pad_nonzero += sf_pad[r * Kp / 16 + i] != 0;
        }
        GT_CHECK(pad_nonzero == 0, "rows=%lld K=%lld K_pad=%lld: %lld padding bytes not zero",
                 (long long)rows, (long long)K, (long long)Kp, (long long)pad_nonzero);
        for (int64_t i = 0; i < rows * K / 2; i++) code_diff += codes_cpu[i] != codes_gpu[i];
        for (int64_t i = 0; i < rows * K / 16; i++) sf_diff += sf_cpu[i] != sf_gpu[i];
        for (int64_t r = 0; r < rows; r++) inv_diff += f32_bits(inv_cpu[r]) != f32_bits(inv_gpu[r]);
        GT_CHECK(code_diff == 0, "rows=%lld K=%lld: %lld code bytes differ", (long long)rows,
                 (long long)K, (long long)code_diff);
        GT_CHECK(sf_diff == 0, "rows=%lld K=%lld: %lld block scales differ", (long long)rows,
                 (long long)K, (long long)sf_diff);
        GT_CHECK(inv_diff == 0, "rows=%lld K=%lld: %lld 1/global_sf differ", (long long)rows,
                 (long long)K, (long long)inv_diff);
        GT_CHECK(sat_cpu == sat_gpu, "saturations cpu %llu gpu %llu", sat_cpu, sat_gpu);
        printf("   rows=%lld K=%lld K_pad=%lld: codes/scales identical, %llu saturated\n",
               (long long)rows, (long long)K, (long long)Kp, sat_gpu);
        cudaFree(dx), cudaFree(dinv), cudaFree(dcodes), cudaFree(dsf), cudaFree(dsat);
        free(x), free(inv_cpu), free(inv_gpu), free(codes_cpu), free(codes_gpu), free(sf_cpu),
            free(sf_gpu);
    }
}

/* The padded path: rows gathered from tokens, static per-expert scales (too small, so that
 * saturation happens and is counted), padding rows never written. */
static void test_nvfp4_quantize_padded_static(void) {
    epmoe_rng rng;
    epmoe_rng_seed(&rng, 41);
    const int64_t n = 3, K = 256, T = 50, pad = 128;
    const int64_t counts[n] = {5, 0, 130};
    int64_t offsets[n + 1];
    epmoe_padded_offsets_from_counts(counts, n, pad, offsets);
    const int64_t cap = offsets[n];
    float x[T * K], input_scale[n] = {0.5f / 2688.0f, 1.0f / 2688.0f, 2.0f / 2688.0f};
    epmoe_fill_normal(&rng, x, T * K, 1.0f);
    int32_t token_of_row[cap];
    for (int64_t r = 0; r < cap; r++) token_of_row[r] = (int32_t)epmoe_rng_below(&rng, T);
    int64_t *doff = dev_copy(offsets, n + 1), *dcnt = dev_copy(counts, n);
    int32_t *dtor = dev_copy(token_of_row, cap);
    float *dx = dev_copy(x, T * K), *dis = dev_copy(input_scale, n), *dinv = dev_alloc<float>(cap);
    uint8_t *dcodes = dev_alloc<uint8_t>(cap * K / 2), *dsf = dev_alloc<uint8_t>(cap * K / 16);
    unsigned long long *dsat = dev_alloc<unsigned long long>(1), sat_gpu = 0, sat_cpu = 0;
    cudaMemset(dsat, 0, 8);
    GT_OK(epmoe_cuda_nvfp4_quantize_rows(dx, K, cap, K, K, dtor, doff, dcnt, n, dis, dcodes, dsf, dinv,
                                         dsat, 0));
    GT_CUDA(cudaDeviceSynchronize());
    uint8_t *codes = (uint8_t *)malloc(cap * K / 2), *sf = (uint8_t *)malloc(cap * K / 16);
    float *inv = (float *)malloc(cap * 4);
    to_host(codes, dcodes, cap * K / 2);
    to_host(sf, dsf, cap * K / 16);
    to_host(inv, dinv, cap);
    to_host(&sat_gpu, dsat, 1);
    int64_t wrong = 0, written_padding = 0;
    uint8_t c_ref[K / 2], s_ref[K / 16];
    for (int64_t e = 0; e < n; e++)
        for (int64_t r = offsets[e]; r < offsets[e + 1]; r++) {
            if (r - offsets[e] < counts[e]) {
                float gs = 1.0f / input_scale[e];
                sat_cpu += epmoe_nvfp4_quantize_row(x + token_of_row[r] * K, K, gs, c_ref, s_ref);
                wrong += memcmp(c_ref, codes + r * K / 2, K / 2) != 0;
                wrong += memcmp(s_ref, sf + r * K / 16, K / 16) != 0;
                wrong += f32_bits(inv[r]) != f32_bits(1.0f / gs);
            } else {
                for (int64_t i = 0; i < K / 2; i++) written_padding += codes[r * K / 2 + i] != 0xff;
                written_padding += f32_bits(inv[r]) != 0xffffffffu;
            }
        }
    GT_CHECK(wrong == 0, "%lld real rows differ from the CPU quantizer", (long long)wrong);
    GT_CHECK(written_padding == 0, "%lld padding bytes were written", (long long)written_padding);
    GT_CHECK(sat_cpu == sat_gpu && sat_gpu > 0, "saturations cpu %llu gpu %llu (want > 0)",
             sat_cpu, sat_gpu);
    cudaFree(doff), cudaFree(dcnt), cudaFree(dtor), cudaFree(dx), cudaFree(dis), cudaFree(dinv),
        cudaFree(dcodes), cudaFree(dsf), cudaFree(dsat);
    free(codes), free(sf), free(inv);
}

/* The NVFP4 dispatch wire: dispatch records (kernels/cuda/dispatch.h layout) holding rows that
 * the CPU quantized, gathered into a padded layout, must equal quantizing the fp32 rows there;
 * and quantizing straight from fp32 records (a row stride wider than K) must read the right
 * rows. The padded layout's rows are K_pad elements (the GEMMs' k step): [K, K_pad) zero codes
 * and scales. Padding rows stay poisoned. K = 160 puts the record's 1/gs after a 2-byte gap,
 * and the records are written by epmoe_cuda_dispatch_pack (its 2-byte copy path there). */
static void gather_records_case(int64_t K, int64_t Kp) {
    epmoe_rng rng;
    epmoe_rng_seed(&rng, 43 + (uint64_t)K);
    const int64_t n = 3, T = 40, pad = 128, k = 6;
    const int64_t counts[n] = {7, 0, 131};
    int64_t offsets[n + 1];
    epmoe_padded_offsets_from_counts(counts, n, pad, offsets);
    const int64_t cap = offsets[n];
    epmoe_dispatch_record q_rec, f_rec;
    GT_OK(epmoe_dispatch_record_layout(EPMOE_WIRE_NVFP4, K, k, &q_rec));
    GT_OK(epmoe_dispatch_record_layout(EPMOE_WIRE_F32, K, k, &f_rec));
    /* payload 9K/16 + 4 bytes (+ 2 when K % 64 == 32) against 4K: 148 vs 1024 at K = 256 */
    GT_CHECK(q_rec.bytes % 16 == 0 && f_rec.bytes % 16 == 0 &&
                 q_rec.payload_bytes == (K / 2 + K / 16 + 3) / 4 * 4 + 4 &&
                 f_rec.payload_bytes == 4 * K && q_rec.inv_gs_offset % 4 == 0 &&
                 q_rec.inv_gs_offset >= q_rec.sf_offset + K / 16 &&
                 q_rec.meta_offset >= q_rec.inv_gs_offset + 4 &&
                 q_rec.bytes >= q_rec.meta_offset + 4 * k,
             "record layout K=%lld: nvfp4 %lld bytes (payload %lld, meta at %lld), fp32 %lld bytes",
             (long long)K, (long long)q_rec.bytes, (long long)q_rec.payload_bytes,
             (long long)q_rec.meta_offset, (long long)f_rec.bytes);
    std::vector<float> x(T * K);
    epmoe_fill_normal(&rng, x.data(), T * K, 1.0f);
    std::vector<uint8_t> f_records(T * f_rec.bytes, 0xa5);
    std::vector<uint8_t> c_ref(T * K / 2), s_ref(T * K / 16);
    std::vector<float> inv_ref(T);
    for (int64_t t = 0; t < T; t++) {
        const float gs = epmoe_nvfp4_global_sf(epmoe_amax(&x[t * K], K));
        epmoe_nvfp4_quantize_row(&x[t * K], K, gs, &c_ref[t * K / 2], &s_ref[t * K / 16]);
        inv_ref[t] = 1.0f / gs;
        memcpy(&f_records[t * f_rec.bytes], &x[t * K], K * 4);
    }
    /* the NVFP4 records as the sender packs them: one record per token, all on "rank 0" */
    std::vector<int32_t> ids(T * k, 0), owner(T * k, 0), row_rank(T), pair_rank(T, 0);
    for (int64_t t = 0; t < T; t++) row_rank[t] = (int32_t)t;
    const int64_t zero = 0;
    uint8_t *dcq = dev_copy(c_ref.data(), c_ref.size()), *dsq = dev_copy(s_ref.data(), s_ref.size());
    float *diq = dev_copy(inv_ref.data(), T);
    int32_t *dids = dev_copy(ids.data(), ids.size()), *down = dev_copy(owner.data(), owner.size());
    int32_t *drr = dev_copy(row_rank.data(), T), *dpr = dev_copy(pair_rank.data(), T);
    int32_t *dret = dev_alloc<int32_t>(T * k);
    int64_t *dzero = dev_copy(&zero, 1);
    uint8_t *dq = dev_alloc<uint8_t>(T * q_rec.bytes);
    GT_OK(epmoe_cuda_dispatch_pack(&q_rec, NULL, dcq, dsq, diq, dids, T, 1, down, drr, dpr, dzero,
                                   dzero, dq, dret, 0));
    GT_CUDA(cudaDeviceSynchronize());
    std::vector<uint8_t> q_records(T * q_rec.bytes);
    to_host(q_records.data(), dq, q_records.size());
    int64_t bad_record = 0;
    for (int64_t t = 0; t < T; t++) {
        const uint8_t *q = &q_records[t * q_rec.bytes];
        bad_record += memcmp(q + q_rec.codes_offset, &c_ref[t * K / 2], K / 2) != 0;
        bad_record += memcmp(q + q_rec.sf_offset, &s_ref[t * K / 16], K / 16) != 0;
        bad_record += memcmp(q + q_rec.inv_gs_offset, &inv_ref[t], 4) != 0;
    }
    GT_CHECK(bad_record == 0, "K=%lld: %lld fields of packed NVFP4 records wrong", (long long)K,
             (long long)bad_record);

    std::vector<int32_t> token_of_row(cap);
    for (int64_t r = 0; r < cap; r++) token_of_row[r] = (int32_t)epmoe_rng_below(&rng, T);
    int64_t *doff = dev_copy(offsets, n + 1), *dcnt = dev_copy(counts, n);
    int32_t *dtor = dev_copy(token_of_row.data(), cap);
    uint8_t *df = dev_copy(f_records.data(), f_records.size());
    for (int from_fp32 = 0; from_fp32 < 2; from_fp32++) {
        uint8_t *dcodes = dev_alloc<uint8_t>(cap * Kp / 2), *dsf = dev_alloc<uint8_t>(cap * Kp / 16);
        float *dinv = dev_alloc<float>(cap);
        cudaMemset(dcodes, 0xff, cap * Kp / 2), cudaMemset(dsf, 0xff, cap * Kp / 16);
        cudaMemset(dinv, 0xff, cap * 4);
        if (from_fp32)
            GT_OK(epmoe_cuda_nvfp4_quantize_rows((const float *)df, f_rec.bytes / 4, cap, K, Kp,
                                                 dtor, doff, dcnt, n, NULL, dcodes, dsf, dinv,
                                                 NULL, 0));
        else
            GT_OK(epmoe_cuda_nvfp4_gather_rows(dq, q_rec.bytes, q_rec.codes_offset,
                                               q_rec.sf_offset, q_rec.inv_gs_offset, K, Kp, dtor,
                                               doff, dcnt, n, cap, dcodes, dsf, dinv, 0));
        GT_CUDA(cudaDeviceSynchronize());
        std::vector<uint8_t> codes(cap * Kp / 2), sf(cap * Kp / 16);
        std::vector<float> inv(cap);
        to_host(codes.data(), dcodes, codes.size());
        to_host(sf.data(), dsf, sf.size());
        to_host(inv.data(), dinv, cap);
        int64_t wrong = 0, written_padding = 0, real_rows = 0, pad_nonzero = 0;
        for (int64_t e = 0; e < n; e++)
            for (int64_t r = offsets[e]; r < offsets[e + 1]; r++) {
                const int64_t t = token_of_row[r];
                if (r - offsets[e] < counts[e]) {
                    real_rows++;
                    wrong += memcmp(&c_ref[t * K / 2], &codes[r * Kp / 2], K / 2) != 0;
                    wrong += memcmp(&s_ref[t * K / 16], &sf[r * Kp / 16], K / 16) != 0;
                    wrong += f32_bits(inv[r]) != f32_bits(inv_ref[t]);
                    for (int64_t i = K / 2; i < Kp / 2; i++) pad_nonzero += codes[r * Kp / 2 + i] != 0;
                    for (int64_t i = K / 16; i < Kp / 16; i++) pad_nonzero += sf[r * Kp / 16 + i] != 0;
                } else {
                    for (int64_t i = 0; i < Kp / 2; i++) written_padding += codes[r * Kp / 2 + i] != 0xff;
                    written_padding += f32_bits(inv[r]) != 0xffffffffu;
                }
            }
        const char *how = from_fp32 ? "quantized from fp32 records" : "gathered from nvfp4 records";
        GT_CHECK(wrong == 0, "K=%lld %s: %lld fields of real rows differ from the CPU quantizer",
                 (long long)K, how, (long long)wrong);
        GT_CHECK(pad_nonzero == 0, "K=%lld %s: %lld bytes of the K padding not zero", (long long)K,
                 how, (long long)pad_nonzero);
        GT_CHECK(written_padding == 0, "K=%lld %s: %lld padding bytes were written", (long long)K,
                 how, (long long)written_padding);
        printf("   K=%lld K_pad=%lld %s: %lld real rows identical to the CPU quantizer\n",
               (long long)K, (long long)Kp, how, (long long)real_rows);
        cudaFree(dcodes), cudaFree(dsf), cudaFree(dinv);
    }
    cudaFree(doff), cudaFree(dcnt), cudaFree(dtor), cudaFree(dq), cudaFree(df);
    cudaFree(dcq), cudaFree(dsq), cudaFree(diq), cudaFree(dids), cudaFree(down), cudaFree(drr),
        cudaFree(dpr), cudaFree(dret), cudaFree(dzero);
}

static void test_nvfp4_gather_records(void) {
    gather_records_case(256, 256);
    gather_records_case(2880, 3072); /* gpt-oss: 1/gs right after the scales */
    gather_records_case(160, 256);   /* gpt-oss-tiny: H % 64 == 32 */
}

/* The fused SwiGLU + NVFP4 quantization (the W2 input) against the two kernels it replaces,
 * epmoe_cuda_swiglu then epmoe_cuda_nvfp4_quantize_rows (each checked against the CPU above;
 * the GPU's expf may differ from the CPU's by an ulp, so the fused kernel must match the GPU
 * path bit for bit, not the CPU): every variant, the clamp firing (|g|, |u| often past the
 * limit), per-row and static scales (static too small, so saturation happens and the counts
 * must agree), gpt-oss's expert biases and its I = 2880 padded to the GEMM's 3072 (and
 * gpt-oss-tiny's 96 to 128), padding rows never written. */
static void swiglu_fused_case(int64_t I, int64_t Ip, int variant, int with_bias) {
    epmoe_rng rng;
    epmoe_rng_seed(&rng, 47 + (uint64_t)I);
    const int64_t n = 3, pad = 128;
    const int64_t counts[n] = {9, 0, 133};
    int64_t offsets[n + 1];
    epmoe_padded_offsets_from_counts(counts, n, pad, offsets);
    const int64_t cap = offsets[n];
    const float input_scale[n] = {0.02f, 0.5f, 0.002f};
    const epmoe_cuda_swiglu_act act = {7.0f, variant, 1.702f};
    std::vector<float> h(cap * 2 * I), bias(n * 2 * I);
    epmoe_fill_normal(&rng, h.data(), h.size(), 6.0f);
    epmoe_fill_normal(&rng, bias.data(), bias.size(), 0.5f);
    int64_t *doff = dev_copy(offsets, n + 1), *dcnt = dev_copy(counts, n);
    float *dh = dev_copy(h.data(), h.size()), *dis = dev_copy(input_scale, n);
    float *db = with_bias ? dev_copy(bias.data(), bias.size()) : NULL;
    float *dact = dev_alloc<float>(cap * I);
    for (int is_static = 0; is_static < 2; is_static++) {
        uint8_t *codes_d[2], *sf_d[2];
        float *inv_d[2];
        unsigned long long *sat_d[2], sat[2] = {0, 0};
        for (int path = 0; path < 2; path++) {
            codes_d[path] = dev_alloc<uint8_t>(cap * Ip / 2);
            sf_d[path] = dev_alloc<uint8_t>(cap * Ip / 16);
            inv_d[path] = dev_alloc<float>(cap);
            sat_d[path] = dev_alloc<unsigned long long>(1);
            cudaMemset(sat_d[path], 0, 8);
        }
        GT_OK(epmoe_cuda_swiglu_nvfp4_quantize(dh, cap, I, Ip, &act, db, doff, dcnt, n,
                                               is_static ? dis : NULL, codes_d[0], sf_d[0],
                                               inv_d[0], sat_d[0], 0));
        GT_OK(epmoe_cuda_swiglu(dh, cap, I, &act, db, doff, dcnt, n, I, dact, NULL, 0));
        GT_OK(epmoe_cuda_nvfp4_quantize_rows(dact, I, cap, I, Ip, NULL, doff, dcnt, n,
                                             is_static ? dis : NULL, codes_d[1], sf_d[1],
                                             inv_d[1], sat_d[1], 0));
        GT_CUDA(cudaDeviceSynchronize());
        std::vector<uint8_t> codes[2], sf[2];
        std::vector<float> inv[2];
        for (int path = 0; path < 2; path++) {
            codes[path].resize(cap * Ip / 2), sf[path].resize(cap * Ip / 16), inv[path].resize(cap);
            to_host(codes[path].data(), codes_d[path], codes[path].size());
            to_host(sf[path].data(), sf_d[path], sf[path].size());
            to_host(inv[path].data(), inv_d[path], cap);
            to_host(&sat[path], sat_d[path], 1);
        }
        int64_t wrong = 0, written_padding = 0, real = 0, pad_nonzero = 0;
        for (int64_t e = 0; e < n; e++)
            for (int64_t r = offsets[e]; r < offsets[e + 1]; r++) {
                if (r - offsets[e] < counts[e]) {
                    real++;
                    wrong += memcmp(&codes[0][r * Ip / 2], &codes[1][r * Ip / 2], Ip / 2) != 0;
                    wrong += memcmp(&sf[0][r * Ip / 16], &sf[1][r * Ip / 16], Ip / 16) != 0;
                    wrong += f32_bits(inv[0][r]) != f32_bits(inv[1][r]);
                    wrong += f32_bits(inv[0][r]) == 0xffffffffu; /* written at all */
                    for (int64_t i = I / 2; i < Ip / 2; i++) pad_nonzero += codes[0][r * Ip / 2 + i] != 0;
                    for (int64_t i = I / 16; i < Ip / 16; i++) pad_nonzero += sf[0][r * Ip / 16 + i] != 0;
                } else {
                    for (int64_t i = 0; i < Ip / 2; i++) written_padding += codes[0][r * Ip / 2 + i] != 0xff;
                    written_padding += f32_bits(inv[0][r]) != 0xffffffffu;
                }
            }
        const char *how = is_static ? "static" : "per-row";
        GT_CHECK(wrong == 0, "I=%lld variant %d%s, %s scales: %lld fields of %lld real rows differ "
                 "from swiglu + quantize", (long long)I, variant, with_bias ? " +bias" : "", how,
                 (long long)wrong, (long long)real);
        GT_CHECK(pad_nonzero == 0, "I=%lld I_pad=%lld: %lld bytes of the K padding not zero",
                 (long long)I, (long long)Ip, (long long)pad_nonzero);
        GT_CHECK(written_padding == 0, "I=%lld variant %d: %lld padding bytes written",
                 (long long)I, variant, (long long)written_padding);
        GT_CHECK(sat[0] == sat[1] && (!is_static || sat[0] > 0),
                 "I=%lld variant %d, %s scales: saturations fused %llu, two kernels %llu%s",
                 (long long)I, variant, how, sat[0], sat[1], is_static ? " (want > 0)" : "");
        printf("   I=%lld I_pad=%lld variant %d%s, %s scales: %lld fused rows identical to swiglu + "
               "quantize, %llu saturated\n", (long long)I, (long long)Ip, variant,
               with_bias ? " +bias" : "", how, (long long)real, sat[0]);
        for (int path = 0; path < 2; path++)
            cudaFree(codes_d[path]), cudaFree(sf_d[path]), cudaFree(inv_d[path]), cudaFree(sat_d[path]);
    }
    cudaFree(doff), cudaFree(dcnt), cudaFree(dh), cudaFree(dis), cudaFree(dact), cudaFree(db);
}

static void test_swiglu_nvfp4_fused(void) {
    swiglu_fused_case(2048, 2048, EPMOE_SWIGLU_DSV4, 0);
    swiglu_fused_case(2048, 2048, EPMOE_SWIGLU_STEP, 0);
    swiglu_fused_case(2880, 3072, EPMOE_SWIGLU_GPTOSS, 1);
    swiglu_fused_case(96, 128, EPMOE_SWIGLU_GPTOSS, 1);
}

/* ---- FP8 quantization (act_quant = fp8) -------------------------------------------------- */

/* The real rows of a padded layout (3 experts, one empty) as the CPU quantizes them: codes and
 * block exponents equal common/fp8.h's, [K, K_pad) code 0 with exponent byte 127 for blocks
 * wholly past K, padding rows unwritten (poison kept). A row is its row of the GPU output or,
 * for swiglu, the CPU quantization of the GPU SwiGLU's fp32 output (the fused kernel must
 * give the same bits as SwiGLU then quantization). */
static void fp8_case(int64_t K, int64_t Kp, int swiglu, int variant) {
    epmoe_rng rng;
    epmoe_rng_seed(&rng, 53 + (uint64_t)K + 7 * (uint64_t)swiglu);
    const int64_t n = 3, pad = 128, T = 150;
    const int64_t counts[n] = {9, 0, 133};
    int64_t offsets[n + 1];
    epmoe_padded_offsets_from_counts(counts, n, pad, offsets);
    const int64_t cap = offsets[n], nb = Kp / EPMOE_FP8_BLOCK;
    std::vector<int32_t> token_of_row(cap, -1);
    for (int64_t e = 0; e < n; e++)
        for (int64_t i = 0; i < counts[e]; i++)
            token_of_row[offsets[e] + i] = (int32_t)epmoe_rng_below(&rng, T);
    /* rows over 12 decades, a zero row, a row below the exponent floor, boundaries 448 * 2^e */
    std::vector<float> x(T * K), h(cap * 2 * K), bias(n * 2 * K);
    for (int64_t t = 0; t < T; t++) {
        float *row = &x[t * K];
        epmoe_fill_normal(&rng, row, K, ldexpf(1.0f, (int)epmoe_rng_below(&rng, 40) - 20));
        if (t % 7 == 1) memset(row, 0, K * 4);
        if (t % 7 == 2)
            for (int64_t i = 0; i < K; i++) row[i] *= 1e-32f;
        if (t % 7 == 3) row[K - 1] = ldexpf(448.0f, (int)epmoe_rng_below(&rng, 20) - 10);
    }
    epmoe_fill_normal(&rng, h.data(), h.size(), 6.0f);
    epmoe_fill_normal(&rng, bias.data(), bias.size(), 0.5f);
    const epmoe_cuda_swiglu_act act = {7.0f, variant, 1.702f};
    int64_t *doff = dev_copy(offsets, n + 1), *dcnt = dev_copy(counts, n);
    int32_t *dtok = dev_copy(token_of_row.data(), cap);
    float *dx = dev_copy(x.data(), x.size()), *dh = dev_copy(h.data(), h.size());
    float *db = dev_copy(bias.data(), bias.size()), *dact = dev_alloc<float>(cap * K);
    uint8_t *dcodes = dev_alloc<uint8_t>(cap * Kp), *dexp = dev_alloc<uint8_t>(cap * nb);
    if (swiglu) {
        GT_OK(epmoe_cuda_swiglu_fp8_quantize(dh, cap, K, Kp, &act, db, doff, dcnt, n, dcodes, dexp, 0));
        GT_OK(epmoe_cuda_swiglu(dh, cap, K, &act, db, doff, dcnt, n, K, dact, NULL, 0));
    } else {
        GT_OK(epmoe_cuda_fp8_quantize_rows(dx, K, cap, K, Kp, dtok, doff, dcnt, n, dcodes, dexp, 0));
    }
    GT_CUDA(cudaDeviceSynchronize());
    std::vector<uint8_t> codes(cap * Kp), exps(cap * nb), want_codes(K), want_exps(nb);
    std::vector<float> act_rows(swiglu ? cap * K : 0);
    to_host(codes.data(), dcodes, codes.size());
    to_host(exps.data(), dexp, exps.size());
    if (swiglu) to_host(act_rows.data(), dact, act_rows.size());
    int64_t wrong = 0, pad_wrong = 0, written_padding = 0, real = 0, floor_blocks = 0;
    for (int64_t e = 0; e < n; e++)
        for (int64_t r = offsets[e]; r < offsets[e + 1]; r++) {
            if (r - offsets[e] >= counts[e]) {
                for (int64_t i = 0; i < Kp; i++) written_padding += codes[r * Kp + i] != 0xff;
                for (int64_t b = 0; b < nb; b++) written_padding += exps[r * nb + b] != 0xff;
                continue;
            }
            real++;
            const float *src = swiglu ? &act_rows[r * K] : &x[token_of_row[r] * K];
            epmoe_fp8_quantize_row(src, K, want_codes.data(), want_exps.data());
            wrong += memcmp(&codes[r * Kp], want_codes.data(), K) != 0;
            const int64_t cpu_blocks = (K + EPMOE_FP8_BLOCK - 1) / EPMOE_FP8_BLOCK;
            wrong += memcmp(&exps[r * nb], want_exps.data(), cpu_blocks) != 0;
            for (int64_t b = 0; b < cpu_blocks; b++)
                floor_blocks += want_exps[b] == EPMOE_FP8_MIN_EXP + 127;
            for (int64_t i = K; i < Kp; i++) pad_wrong += codes[r * Kp + i] != 0;
            for (int64_t b = cpu_blocks; b < nb; b++) pad_wrong += exps[r * nb + b] != 127;
        }
    GT_CHECK(wrong == 0, "K=%lld %s: %lld fields of %lld real rows differ from the CPU",
             (long long)K, swiglu ? "swiglu" : "rows", (long long)wrong, (long long)real);
    GT_CHECK(pad_wrong == 0, "K=%lld K_pad=%lld: %lld bytes of the K padding wrong",
             (long long)K, (long long)Kp, (long long)pad_wrong);
    GT_CHECK(written_padding == 0, "K=%lld: %lld bytes of padding rows written", (long long)K,
             (long long)written_padding);
    GT_CHECK(swiglu || floor_blocks > 0, "K=%lld: no block reached the exponent floor", (long long)K);
    printf("   K=%lld K_pad=%lld %s: %lld real rows identical to the CPU (%lld blocks at the floor)\n",
           (long long)K, (long long)Kp, swiglu ? "swiglu" : "rows", (long long)real,
           (long long)floor_blocks);
    cudaFree(doff), cudaFree(dcnt), cudaFree(dtok), cudaFree(dx), cudaFree(dh), cudaFree(db),
        cudaFree(dact), cudaFree(dcodes), cudaFree(dexp);
}

static void test_fp8_quantize_bit_identical(void) {
    fp8_case(256, 256, 0, 0);
    fp8_case(7168, 7168, 0, 0);
    fp8_case(2880, 3072, 0, 0);
    fp8_case(160, 256, 0, 0);
    fp8_case(2048, 2048, 1, EPMOE_SWIGLU_DSV4);
    fp8_case(2880, 3072, 1, EPMOE_SWIGLU_GPTOSS);
    fp8_case(96, 128, 1, EPMOE_SWIGLU_STEP);
}

/* ---- padded layout --------------------------------------------------------------------- */

static void check_layout_case(const char *what, const int32_t *ids, int64_t T, int64_t k,
                              int64_t start, int64_t n_local) {
    const int64_t pad = 128, n_pairs = T * k;
    const int64_t cap = epmoe_round_up(epmoe_padded_capacity(n_pairs, n_local, pad), 128);
    int64_t *counts = (int64_t *)calloc(n_local, 8), *offsets = (int64_t *)malloc((n_local + 1) * 8);
    int32_t *rows = (int32_t *)malloc(n_pairs * 4);
    for (int64_t p = 0; p < n_pairs; p++) {
        int64_t e = ids[p] - start;
        if (e >= 0 && e < n_local) counts[e]++;
    }
    epmoe_padded_offsets_from_counts(counts, n_local, pad, offsets);
    int64_t *seen = (int64_t *)calloc(n_local, 8);
    for (int64_t p = 0; p < n_pairs; p++) {
        int64_t e = ids[p] - start;
        rows[p] = (e >= 0 && e < n_local) ? (int32_t)(offsets[e] + seen[e]++) : -1;
    }
    int32_t *dids = dev_copy(ids, n_pairs), *drank = dev_alloc<int32_t>(n_pairs),
            *drows = dev_alloc<int32_t>(n_pairs), *dtor = dev_alloc<int32_t>(cap);
    int64_t *dcnt = dev_alloc<int64_t>(n_local), *doff = dev_alloc<int64_t>(n_local + 1);
    GT_OK(epmoe_cuda_plan_layout(dids, T, k, start, n_local, pad, drank, dcnt, doff, drows, dtor, 0));
    GT_CUDA(cudaDeviceSynchronize());
    int64_t *g_cnt = (int64_t *)malloc(n_local * 8), *g_off = (int64_t *)malloc((n_local + 1) * 8);
    int32_t *g_rows = (int32_t *)malloc(n_pairs * 4), *g_tor = (int32_t *)malloc(cap * 4);
    to_host(g_cnt, dcnt, n_local);
    to_host(g_off, doff, n_local + 1);
    to_host(g_rows, drows, n_pairs);
    to_host(g_tor, dtor, cap);
    GT_CHECK(memcmp(g_cnt, counts, n_local * 8) == 0, "%s: tokens_per_expert differ", what);
    GT_CHECK(memcmp(g_off, offsets, (n_local + 1) * 8) == 0,
             "%s: padded offsets differ from epmoe_padded_offsets_from_counts", what);
    GT_CHECK(memcmp(g_rows, rows, n_pairs * 4) == 0, "%s: row_of_pair differs", what);
    int64_t bad_tor = 0;
    for (int64_t p = 0; p < n_pairs; p++)
        if (rows[p] >= 0) bad_tor += g_tor[rows[p]] != (int32_t)(p / k);
    GT_CHECK(bad_tor == 0, "%s: %lld token_of_row entries wrong", what, (long long)bad_tor);
    cudaFree(dids), cudaFree(drank), cudaFree(drows), cudaFree(dtor), cudaFree(dcnt), cudaFree(doff);
    free(counts), free(offsets), free(rows), free(seen), free(g_cnt), free(g_off), free(g_rows),
        free(g_tor);
}

static void test_layout_matches_cpu(void) {
    epmoe_rng rng;
    epmoe_rng_seed(&rng, 51);
    const int64_t T = 700, k = 6, E = 256, n = T * k;
    int32_t *ids = (int32_t *)malloc(n * 4);
    for (int64_t i = 0; i < n; i++) ids[i] = (int32_t)epmoe_rng_below(&rng, E);
    check_layout_case("random", ids, T, k, 0, E);
    check_layout_case("slice [64, 128) of 256 (others -1)", ids, T, k, 64, 64);
    for (int64_t i = 0; i < n; i++) ids[i] = 17;
    check_layout_case("everything in one expert", ids, T, k, 0, E);
    for (int64_t i = 0; i < n; i++) ids[i] = (int32_t)(E - 1);
    check_layout_case("everything in the last expert", ids, T, k, 0, E);
    for (int64_t i = 0; i < n; i++) ids[i] = (int32_t)(2 * epmoe_rng_below(&rng, E / 2));
    check_layout_case("odd experts empty", ids, T, k, 0, E);
    for (int64_t i = 0; i < n; i++) ids[i] = (int32_t)(i % 3 == 0 ? 0 : E - 1);
    check_layout_case("first and last only", ids, 1, k, 0, E);
    check_layout_case("zero tokens", ids, 0, k, 0, E);
    free(ids);
}

/* ---- SwiGLU ---------------------------------------------------------------------------- */

static void test_swiglu_matches_cpu(void) {
    epmoe_rng rng;
    epmoe_rng_seed(&rng, 61);
    const int64_t rows = 97, I = 384;
    float *h = (float *)malloc(rows * 2 * I * 4), *cpu = (float *)malloc(rows * I * 4),
          *gpu = (float *)malloc(rows * I * 4);
    epmoe_fill_normal(&rng, h, rows * 2 * I, 8.0f); /* |g|, |u| > 10 often: the clamp fires */
    int64_t fires = 0;
    for (int64_t r = 0; r < rows; r++)
        for (int64_t i = 0; i < I; i++) fires += h[r * 2 * I + i] > 10.0f || fabsf(h[r * 2 * I + I + i]) > 10.0f;
    GT_CHECK(fires > rows, "the clamp must fire (%lld elements beyond L)", (long long)fires);
    float *dh = dev_copy(h, rows * 2 * I), *dout = dev_alloc<float>(rows * I);
    const struct {
        float limit;
        int variant;
        const char *name;
    } cases[] = {{10.0f, EPMOE_SWIGLU_DSV4, "dsv4 L=10"},
                 {10.0f, EPMOE_SWIGLU_STEP, "step L=10"},
                 {0.0f, EPMOE_SWIGLU_DSV4, "no clamp"},
                 {7.0f, EPMOE_SWIGLU_GPTOSS, "gptoss L=7"},
                 {0.0f, EPMOE_SWIGLU_GPTOSS, "gptoss no clamp"}};
    for (int c = 0; c < 5; c++) {
        cudaMemset(dout, 0xff, rows * I * 4);
        epmoe_cpu_swiglu(h, rows, I, cases[c].limit, cases[c].variant, 1.702f, cpu);
        const epmoe_cuda_swiglu_act act = {cases[c].limit, cases[c].variant, 1.702f};
        GT_OK(epmoe_cuda_swiglu(dh, rows, I, &act, NULL, NULL, NULL, 0, I, dout, NULL, 0));
        GT_CUDA(cudaDeviceSynchronize());
        to_host(gpu, dout, rows * I);
        double worst = 0;
        for (int64_t i = 0; i < rows * I; i++) {
            double d = fabs((double)gpu[i] - cpu[i]) / (fabs((double)cpu[i]) + 1e-30);
            if (!(d <= worst)) worst = d;
        }
        GT_CHECK(worst <= SWIGLU_REL_TOL, "%s: max rel err %.3g (tolerance %g)", cases[c].name,
                 worst, SWIGLU_REL_TOL);
        printf("   swiglu %s: max rel err %.2e\n", cases[c].name, worst);
    }
    cudaFree(dh), cudaFree(dout);
    free(h), free(cpu), free(gpu);
}

/* gpt-oss's expert biases on the padded layout: row r of expert e computes swiglu(h[r] + b13[e])
 * as the CPU (h += b13, then epmoe_cpu_swiglu), into bf16 rows of I_pad columns whose
 * [I, I_pad) are zeros (the W4A16 W2 input), padding rows untouched. */
static void test_swiglu_bias_padded_matches_cpu(void) {
    epmoe_rng rng;
    epmoe_rng_seed(&rng, 63);
    const int64_t n = 3, I = 96, Ip = 128, pad = 128;
    const int64_t counts[n] = {5, 0, 70};
    int64_t offsets[n + 1];
    epmoe_padded_offsets_from_counts(counts, n, pad, offsets);
    const int64_t cap = offsets[n];
    std::vector<float> h(cap * 2 * I), bias(n * 2 * I), hb(2 * I), cpu(I);
    epmoe_fill_normal(&rng, h.data(), h.size(), 6.0f);
    epmoe_fill_normal(&rng, bias.data(), bias.size(), 2.0f);
    const epmoe_cuda_swiglu_act act = {7.0f, EPMOE_SWIGLU_GPTOSS, 1.702f};
    int64_t *doff = dev_copy(offsets, n + 1), *dcnt = dev_copy(counts, n);
    float *dh = dev_copy(h.data(), h.size()), *db = dev_copy(bias.data(), bias.size());
    float *df = dev_alloc<float>(cap * Ip);
    uint16_t *dbf = dev_alloc<uint16_t>(cap * Ip);
    GT_OK(epmoe_cuda_swiglu(dh, cap, I, &act, db, doff, dcnt, n, Ip, df, dbf, 0));
    GT_CUDA(cudaDeviceSynchronize());
    std::vector<float> gf(cap * Ip);
    std::vector<uint16_t> gb(cap * Ip);
    to_host(gf.data(), df, gf.size());
    to_host(gb.data(), dbf, gb.size());
    double worst = 0;
    int64_t bad_bf16 = 0, pad_nonzero = 0, written_padding = 0, fires = 0;
    for (int64_t e = 0; e < n; e++)
        for (int64_t r = offsets[e]; r < offsets[e + 1]; r++) {
            if (r - offsets[e] >= counts[e]) {
                for (int64_t i = 0; i < Ip; i++) written_padding += gb[r * Ip + i] != 0xffff;
                continue;
            }
            for (int64_t i = 0; i < 2 * I; i++) hb[i] = h[r * 2 * I + i] + bias[e * 2 * I + i];
            for (int64_t i = 0; i < I; i++) fires += hb[i] > 7.0f || fabsf(hb[I + i]) > 7.0f;
            epmoe_cpu_swiglu(hb.data(), 1, I, 7.0f, EPMOE_SWIGLU_GPTOSS, 1.702f, cpu.data());
            for (int64_t i = 0; i < I; i++) {
                const float g = gf[r * Ip + i];
                double d = fabs((double)g - cpu[i]) / (fabs((double)cpu[i]) + 1e-30);
                if (!(d <= worst)) worst = d;
                bad_bf16 += gb[r * Ip + i] != epmoe_float_to_bf16(g);
            }
            for (int64_t i = I; i < Ip; i++) pad_nonzero += gf[r * Ip + i] != 0.0f || gb[r * Ip + i] != 0;
        }
    GT_CHECK(fires > 0, "gptoss +bias: the clamp never fired");
    GT_CHECK(worst <= SWIGLU_REL_TOL, "gptoss +bias: max rel err %.3g (tolerance %g)", worst,
             SWIGLU_REL_TOL);
    GT_CHECK(bad_bf16 == 0, "gptoss +bias: %lld bf16 outputs are not the fp32 ones rounded",
             (long long)bad_bf16);
    GT_CHECK(pad_nonzero == 0, "gptoss +bias: %lld K-padding columns not zero",
             (long long)pad_nonzero);
    GT_CHECK(written_padding == 0, "gptoss +bias: %lld elements of padding rows written",
             (long long)written_padding);
    printf("   swiglu gptoss +bias, I=%lld in rows of %lld: max rel err %.2e, %lld clamped\n",
           (long long)I, (long long)Ip, worst, (long long)fires);
    cudaFree(doff), cudaFree(dcnt), cudaFree(dh), cudaFree(db), cudaFree(df), cudaFree(dbf);
}

/* ---- combine --------------------------------------------------------------------------- */

/* The weighted sum in slot order, bit for bit (expert biases are the W2 GEMM's: test_gemm). */
static void test_combine_bit_identical(void) {
    epmoe_rng rng;
    epmoe_rng_seed(&rng, 71);
    const int64_t T = 33, k = 6, H = 256, rows = 300;
    float *y = (float *)malloc(rows * H * 4), *w = (float *)malloc(T * k * 4),
          *shared = (float *)malloc(T * H * 4), *cpu = (float *)malloc(T * H * 4),
          *gpu = (float *)malloc(T * H * 4);
    int32_t *row_of_pair = (int32_t *)malloc(T * k * 4);
    epmoe_fill_normal(&rng, y, rows * H, 1.0f);
    epmoe_fill_uniform(&rng, w, T * k, 0.01f, 1.0f);
    epmoe_fill_normal(&rng, shared, T * H, 1.0f);
    for (int64_t i = 0; i < T * k; i++)
        row_of_pair[i] = i % 7 == 3 ? -1 : (int32_t)epmoe_rng_below(&rng, rows);
    for (int64_t t = 0; t < T; t++)
        for (int64_t c = 0; c < H; c++) {
            float acc = 0.0f;
            for (int64_t j = 0; j < k; j++) {
                int32_t r = row_of_pair[t * k + j];
                if (r < 0) continue;
                float prod = w[t * k + j] * y[r * H + c];
                acc = acc + prod;
            }
            cpu[t * H + c] = acc + shared[t * H + c];
        }
    float *dy = dev_copy(y, rows * H), *dw = dev_copy(w, T * k), *ds = dev_copy(shared, T * H),
          *dout = dev_alloc<float>(T * H);
    int32_t *drows = dev_copy(row_of_pair, T * k);
    GT_OK(epmoe_cuda_combine(dy, H, drows, dw, T, k, ds, dout, 0));
    GT_CUDA(cudaDeviceSynchronize());
    to_host(gpu, dout, T * H);
    int64_t diff = 0;
    for (int64_t i = 0; i < T * H; i++) diff += f32_bits(cpu[i]) != f32_bits(gpu[i]);
    GT_CHECK(diff == 0, "%lld combined elements differ in bits", (long long)diff);
    cudaFree(dy), cudaFree(dw), cudaFree(ds), cudaFree(dout), cudaFree(drows);
    free(y), free(w), free(shared), free(cpu), free(gpu), free(row_of_pair);
}

/* ---- shared expert --------------------------------------------------------------------- */

static float round_bf16(float x) { return epmoe_bf16_to_float(epmoe_float_to_bf16(x)); }

/* Against a float64 reference that rounds the activations to bf16 where the GPU does (x, and
 * the SwiGLU output), with bf16-exact weights: what remains is fp32 accumulation and the rare
 * activation whose bf16 rounding an fp32-vs-float64 difference flips. A transposed operand, a
 * wrong clamp or a wrong variant gives > 1e-1. */
#define SHARED_REL_TOL 5e-4
static void test_shared_expert_vs_reference(void) {
    epmoe_rng rng;
    epmoe_rng_seed(&rng, 81);
    const int64_t T = 64, H = 256, Is = 128;
    const float L = 10.0f;
    float *x = (float *)malloc(T * H * 4), *w13 = (float *)malloc(2 * Is * H * 4),
          *w2 = (float *)malloc(H * Is * 4), *y = (float *)malloc(T * H * 4);
    uint16_t *w13_b = (uint16_t *)malloc(2 * Is * H * 2), *w2_b = (uint16_t *)malloc(H * Is * 2);
    epmoe_fill_normal(&rng, x, T * H, 1.0f);
    for (int64_t t = 0; t < T; t += 5)
        for (int64_t c = 0; c < H; c++) x[t * H + c] *= 20.0f; /* the clamp fires */
    epmoe_fill_normal(&rng, w13, 2 * Is * H, 1.0f / 16.0f);
    epmoe_fill_normal(&rng, w2, H * Is, 1.0f / 11.0f);
    for (int64_t i = 0; i < 2 * Is * H; i++) w13_b[i] = epmoe_float_to_bf16(w13[i]);
    for (int64_t i = 0; i < H * Is; i++) w2_b[i] = epmoe_float_to_bf16(w2[i]);
    for (int v = 0; v < 2; v++) {
        double *ref = (double *)malloc(T * H * 8), *h = (double *)malloc(2 * Is * 8);
        float *a = (float *)malloc(Is * 4);
        int64_t fires = 0;
        for (int64_t t = 0; t < T; t++) {
            for (int64_t n = 0; n < 2 * Is; n++) {
                double acc = 0;
                for (int64_t c = 0; c < H; c++)
                    acc += (double)round_bf16(x[t * H + c]) * epmoe_bf16_to_float(w13_b[n * H + c]);
                h[n] = acc;
            }
            for (int64_t i = 0; i < Is; i++) {
                double g = h[i], u = h[Is + i];
                fires += g > L || fabs(u) > L;
                u = u > L ? L : (u < -L ? -L : u);
                double act;
                if (v == EPMOE_SWIGLU_STEP) {
                    act = g / (1.0 + exp(-g));
                    act = act > L ? L : act;
                } else {
                    double gc = g > L ? L : g;
                    act = gc / (1.0 + exp(-gc));
                }
                a[i] = round_bf16((float)(act * u));
            }
            for (int64_t n = 0; n < H; n++) {
                double acc = 0;
                for (int64_t i = 0; i < Is; i++) acc += (double)a[i] * epmoe_bf16_to_float(w2_b[n * Is + i]);
                ref[t * H + n] = acc;
            }
        }
        GT_CHECK(fires > 0, "shared expert: the clamp never fired");
        cublasHandle_t cublas;
        GT_CHECK(cublasCreate(&cublas) == CUBLAS_STATUS_SUCCESS, "cublasCreate");
        const size_t ws_bytes = 32u << 20;
        void *ws = dev_alloc<uint8_t>(ws_bytes);
        /* batch invariance: T2 rows repeating x's T rows, over more than one chunk */
        const int64_t T2 = EPMOE_SHARED_CHUNK_ROWS + 188;
        const int64_t Ts = (T2 + EPMOE_SHARED_CHUNK_ROWS - 1) / EPMOE_SHARED_CHUNK_ROWS *
                           EPMOE_SHARED_CHUNK_ROWS;
        float *x2 = (float *)malloc((size_t)(T2 * H) * 4), *y2 = (float *)malloc((size_t)(T2 * H) * 4);
        for (int64_t t = 0; t < T2; t++) memcpy(x2 + t * H, x + (t % T) * H, (size_t)H * 4);
        float *dx = dev_copy(x, T * H), *dy = dev_alloc<float>(Ts * H);
        float *dx2 = dev_copy(x2, T2 * H);
        uint16_t *d13 = dev_copy(w13_b, 2 * Is * H), *d2 = dev_copy(w2_b, H * Is);
        epmoe_cuda_shared_scratch sc = {dev_alloc<uint16_t>(Ts * H), dev_alloc<float>(Ts * 2 * Is),
                                        dev_alloc<uint16_t>(Ts * Is)};
        GT_CUDA(cudaMemset(dy, 0xff, (size_t)(Ts * H) * 4));
        const epmoe_cuda_swiglu_act act = {L, v, 1.702f};
        GT_OK(epmoe_cuda_shared_forward(cublas, ws, ws_bytes, dx2, T2, H, Is, d13, d2, &act, &sc, dy, 0));
        GT_CUDA(cudaDeviceSynchronize());
        to_host(y2, dy, T2 * H);
        GT_CUDA(cudaMemset(dy, 0xff, (size_t)(Ts * H) * 4));
        GT_OK(epmoe_cuda_shared_forward(cublas, ws, ws_bytes, dx, T, H, Is, d13, d2, &act, &sc, dy, 0));
        GT_CUDA(cudaDeviceSynchronize());
        to_host(y, dy, T * H);
        int64_t differ = 0;
        for (int64_t i = 0; i < T2 * H; i++)
            differ += memcmp(&y2[i], &y[(i / H) % T * H + i % H], 4) != 0;
        GT_CHECK(differ == 0,
                 "shared expert: %lld of %lld outputs differ between a batch of %lld and one of "
                 "%lld rows (not batch-invariant)",
                 (long long)differ, (long long)(T2 * H), (long long)T, (long long)T2);
        free(x2), free(y2), cudaFree(dx2);
        size_t unwritten = epmoe_count_unwritten_f32(y, T * H);
        double err = epmoe_rel_l2_f32_f64(y, ref, T * H);
        GT_CHECK(unwritten == 0, "shared expert: %zu outputs unwritten", unwritten);
        GT_CHECK(err <= SHARED_REL_TOL, "shared expert variant %d: rel L2 %.3e > %.0e", v, err,
                 SHARED_REL_TOL);
        printf("   shared expert (%s): rel L2 vs bf16-aware float64 reference %.2e, %lld clamped\n",
               v ? "step" : "dsv4", err, (long long)fires);
        cublasDestroy(cublas);
        cudaFree(ws), cudaFree(dx), cudaFree(dy), cudaFree(d13), cudaFree(d2), cudaFree(sc.x_bf16),
            cudaFree(sc.h), cudaFree(sc.a_bf16);
        free(ref), free(h), free(a);
    }
    free(x), free(w13), free(w2), free(y), free(w13_b), free(w2_b);
}

int main(void) {
    if (!gt_have_device()) return 77;
    GT_RUN(test_gate_logits_bit_identical);
    GT_RUN(test_gate_logits_batch_invariant);
    GT_RUN(test_routing_matches_cpu);
    GT_RUN(test_routing_topk_softmax);
    GT_RUN(test_routing_very_negative_logits);
    GT_RUN(test_routing_flags);
    GT_RUN(test_nvfp4_quantize_bit_identical);
    GT_RUN(test_nvfp4_quantize_padded_static);
    GT_RUN(test_nvfp4_gather_records);
    GT_RUN(test_layout_matches_cpu);
    GT_RUN(test_swiglu_matches_cpu);
    GT_RUN(test_swiglu_bias_padded_matches_cpu);
    GT_RUN(test_swiglu_nvfp4_fused);
    GT_RUN(test_fp8_quantize_bit_identical);
    GT_RUN(test_combine_bit_identical);
    GT_RUN(test_shared_expert_vs_reference);
    return gt_finish();
}
