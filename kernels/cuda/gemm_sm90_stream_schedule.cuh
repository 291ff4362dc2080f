/* How the streaming kernel (gemm_sm90_stream.cu, grouped_gemm_stream_kernel) walks its
 * work, in host-and-device code so that tests/gpu/test_stream_schedule.cu can run the kernel's
 * sequence of calls on the host (in CI, no GPU needed).
 *
 * A warp owns the work items first, first + stride, ... below total (item = token chunk x
 * 32-row weight slab), each `steps` 128-k steps long, and walks them as one sequence of global
 * steps j = 0, 1, ... Global step j lives in weight ring slot j % kDepth (registers) and in
 * token stage j % kDepth (this thread's shared-memory slots). Three cursors walk the sequence:
 *   - the weight cursor, kDepth global steps ahead of the compute cursor: its loads run on
 *     into the next item while this one finishes, so no item starts on an empty ring;
 *   - the token cursor, one global step ahead: the token fragments of step j + 1 are copied
 *     (cp.async) while step j computes;
 *   - the compute cursor. */
#ifndef EPMOE_GEMM_SM90_STREAM_SCHEDULE_CUH
#define EPMOE_GEMM_SM90_STREAM_SCHEDULE_CUH

namespace epmoe_sm90 {

struct StreamCursor {
    int item, step; /* item >= total: past this warp's work */

    /* Moves to the next global step; true when that starts a new item. */
    __host__ __device__ __forceinline__ bool advance(int steps, int stride) {
        if (++step < steps) return false;
        step = 0;
        item += stride;
        return true;
    }
};

} // namespace epmoe_sm90

#endif
