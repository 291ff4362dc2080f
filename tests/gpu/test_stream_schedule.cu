/* The streaming kernel's schedule (kernels/cuda/gemm_sm90_stream_schedule.cuh and
 * chunk_expert in gemm_sm90_common.cuh): host-only, so it runs in CI too (no device needed).
 *
 * Each warp of grouped_gemm_stream_kernel walks its work items as one sequence of global
 * steps with three cursors (weights kDepth steps ahead, tokens one step ahead, compute). Here
 * the kernel's sequence of cursor moves is replayed on the host for random work lists (empty
 * experts, steps shorter and longer than the ring, more items than warps and fewer), with the
 * ring slots and token stages as tagged records: every compute must find in its slot the
 * weights of its own (item, step) -- of the right expert -- and in its stage its own tokens,
 * and every (item, step) of the warp must be computed exactly once, in order. A cursor that
 * skipped, repeated or ran into the wrong item fails here before it fails on a GPU. */
#include <stdint.h>
#include <string.h>

#include <vector>

#include "kernels/cuda/gemm_sm90_common.cuh"
#include "kernels/cuda/gemm_sm90_stream_schedule.cuh"
#include "tests/gpu/gpu_test.h"

using namespace epmoe_sm90;

/* chunk_expert against a scan: the expert whose chunks [start_e, start_e+1) hold the chunk */
static void test_chunk_expert(void) {
    int bad = 0, checked = 0;
    for (int trial = 0; trial < 400; ++trial) {
        const int E = 1 + (int)(gt_next_u32() % 40);
        std::vector<int> start(E + 1, 0);
        for (int e = 0; e < E; ++e) start[e + 1] = start[e] + (gt_next_u32() % 3 == 0 ? 0 : (int)(gt_next_u32() % 5));
        for (int chunk = 0; chunk < start[E]; ++chunk) {
            int owner = -1;
            for (int e = 0; e < E; ++e)
                if (start[e] <= chunk && chunk < start[e + 1]) owner = e;
            bad += chunk_expert(start.data(), E, chunk) != owner;
            ++checked;
        }
    }
    GT_CHECK(checked > 1000, "only %d chunks checked", checked);
    GT_CHECK(bad == 0, "chunk_expert disagrees with a scan on %d of %d chunks", bad, checked);
}

struct Tag {
    int item, step, expert; /* what a slot or stage holds; item -1: nothing */
};

/* One warp of the kernel, replayed: the same calls in the same order as
 * grouped_gemm_stream_kernel (prime kDepth weight slots, copy step 0's tokens, then per
 * global step: copy the next step's tokens into the next stage, compute, load into the slot
 * just used, move the compute cursor). Returns the number of mismatches. */
static int replay_warp(int kDepth, int first, int stride, int total, int steps, int n_slabs,
                       const std::vector<int> &start, int E, std::vector<int> &computed_steps) {
    int bad = 0;
    StreamCursor ccur = {first, 0};
    if (ccur.item >= total) return 0;
    StreamCursor wcur = ccur;
    int w_expert = chunk_expert(start.data(), E, wcur.item / n_slabs); /* the kernel's seek */
    std::vector<Tag> slot(kDepth, Tag{-1, -1, -1}), stage(kDepth, Tag{-1, -1, -1});
    auto load_next = [&](int d) {
        if (wcur.item >= total) return;
        slot[d] = Tag{wcur.item, wcur.step, w_expert};
        if (wcur.advance(steps, stride) && wcur.item < total)
            w_expert = chunk_expert(start.data(), E, wcur.item / n_slabs);
    };
    for (int d = 0; d < kDepth; ++d) load_next(d);
    stage[0] = Tag{ccur.item, 0, -1};
    int expected_item = first, expected_step = 0;
    for (long long j = 0;; ++j) {
        const int d = (int)(j % kDepth);
        StreamCursor tcur = ccur;
        tcur.advance(steps, stride);
        if (tcur.item < total) stage[(d + 1) % kDepth] = Tag{tcur.item, tcur.step, -1};
        /* compute (item, step) from slot d and stage d */
        const int expert = chunk_expert(start.data(), E, ccur.item / n_slabs);
        bad += slot[d].item != ccur.item || slot[d].step != ccur.step || slot[d].expert != expert;
        bad += stage[d].item != ccur.item || stage[d].step != ccur.step;
        bad += ccur.item != expected_item || ccur.step != expected_step;
        computed_steps[ccur.item]++;
        if (++expected_step == steps) {
            expected_step = 0;
            expected_item += stride;
        }
        slot[d] = Tag{-1, -1, -1}; /* consumed: a load that never comes shows */
        load_next(d);
        if (ccur.advance(steps, stride) && ccur.item >= total) break;
    }
    return bad;
}

static void test_schedule(void) {
    int bad = 0, configs = 0, crossing = 0;
    for (int trial = 0; trial < 300; ++trial) {
        const int E = 1 + (int)(gt_next_u32() % 12);
        std::vector<int> start(E + 1, 0);
        for (int e = 0; e < E; ++e) start[e + 1] = start[e] + (gt_next_u32() % 4 == 0 ? 0 : 1 + (int)(gt_next_u32() % 4));
        const int n_slabs = 1 + (int)(gt_next_u32() % 8);
        const int total = start[E] * n_slabs;
        const int steps = 1 + (int)(gt_next_u32() % 6); /* K = 128 .. 768: shorter and longer than the ring */
        const int warps = 1 + (int)(gt_next_u32() % 24);  /* the grid's warps: more or fewer than items */
        for (int kDepth = 2; kDepth <= 3; ++kDepth) {
            std::vector<int> computed(total > 0 ? total : 1, 0);
            for (int w = 0; w < warps; ++w)
                bad += replay_warp(kDepth, w, warps, total, steps, n_slabs, start, E, computed);
            for (int item = 0; item < total; ++item) bad += computed[item] != steps;
            ++configs;
            crossing += total > warps;
        }
    }
    GT_CHECK(configs == 600 && crossing > 100, "%d configurations, %d with items crossing warps", configs,
             crossing);
    GT_CHECK(bad == 0, "the replayed schedule went wrong %d times (a slot, stage or order mismatch, "
                       "or an item not computed exactly `steps` times)", bad);
}

int main(void) {
    GT_RUN(test_chunk_expert);
    GT_RUN(test_schedule);
    return gt_finish();
}
