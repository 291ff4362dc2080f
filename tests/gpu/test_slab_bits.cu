/* The slab bit order of NVFP4 weight codes (kernels/cuda/gemm_sm90_common.cuh): host-only, so
 * it runs in CI too (no device needed). Checks that slab_code_word moves every bit exactly once,
 * that the kernels' slab extraction (slab_pair_bits) gives the same bf16 bits as the nibble-order
 * extraction for every pair of codes, and that those bits are the E2M1 values themselves (times
 * 2^-126, docs/design.md §3.4: E2M1), so the two extractions cannot agree by sharing a mistake. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "kernels/cuda/gemm_sm90_common.cuh"
#include "tests/gpu/gpu_test.h"

using namespace epmoe_sm90;

/* The E2M1 value of a nibble (bit 3 the sign), from the format's definition. */
static float e2m1_value(uint32_t nibble) {
    static const float kMag[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
    return (nibble & 8u) ? -kMag[nibble & 7u] : kMag[nibble & 7u];
}

/* A bf16 (the 16 bits) as a float; subnormals included (no flush on the host). */
static float bf16_bits_value(uint32_t bits16) {
    const uint32_t f = bits16 << 16;
    float v;
    memcpy(&v, &f, sizeof v);
    return v;
}

static void test_permutation(void) {
    int seen[32] = {0};
    for (int i = 0; i < 8; ++i)
        for (int b = 0; b < 4; ++b) {
            const int pos = slab_code_bit(i, b);
            GT_CHECK(pos >= 0 && pos < 32, "code %d bit %d -> position %d", i, b, pos);
            if (pos >= 0 && pos < 32) seen[pos]++;
        }
    for (int pos = 0; pos < 32; ++pos) GT_CHECK(seen[pos] == 1, "position %d used %d times", pos, seen[pos]);
    /* the word transform moves single bits to single bits */
    for (int k = 0; k < 32; ++k) {
        const uint32_t w = slab_code_word(1u << k);
        GT_CHECK(w != 0 && (w & (w - 1)) == 0, "bit %d -> word 0x%08x", k, w);
    }
}

/* Every pair m, every value of its two codes, the other six codes random. */
static void test_every_pair(void) {
    int bad = 0;
    for (int m = 0; m < 4; ++m)
        for (uint32_t lo = 0; lo < 16; ++lo)
            for (uint32_t hi = 0; hi < 16; ++hi)
                for (int rep = 0; rep < 64; ++rep) {
                    uint32_t w = gt_next_u32();
                    w &= ~((0xFu << (4 * m)) | (0xFu << (4 * (m + 4))));
                    w |= (lo << (4 * m)) | (hi << (4 * (m + 4)));
                    const uint32_t ref = nibble_pair_bits(w, m);
                    const uint32_t got = slab_pair_bits(slab_code_word(w), m);
                    /* the bits are the codes' values times 2^-126 */
                    const float v_lo = ldexpf(bf16_bits_value(ref & 0xFFFFu), 126);
                    const float v_hi = ldexpf(bf16_bits_value(ref >> 16), 126);
                    if (got != ref || v_lo != e2m1_value(lo) || v_hi != e2m1_value(hi)) {
                        if (bad++ < 8)
                            GT_CHECK(0, "pair %d codes (%u, %u) word 0x%08x: slab 0x%08x nibble 0x%08x "
                                     "(%g, %g; want %g, %g)", m, lo, hi, w, got, ref, v_lo, v_hi,
                                     e2m1_value(lo), e2m1_value(hi));
                    }
                }
    GT_CHECK(bad == 0, "%d of %d extractions wrong", bad, 4 * 256 * 64);
}

static void test_random_words(void) {
    int bad = 0;
    for (int n = 0; n < 1 << 20; ++n) {
        const uint32_t w = gt_next_u32(), s = slab_code_word(w);
        for (int m = 0; m < 4; ++m) bad += slab_pair_bits(s, m) != nibble_pair_bits(w, m);
    }
    GT_CHECK(bad == 0, "%d of %d random pair extractions differ", bad, 4 << 20);
}

int main(void) {
    GT_RUN(test_permutation);
    GT_RUN(test_every_pair);
    GT_RUN(test_random_words);
    return gt_finish();
}
