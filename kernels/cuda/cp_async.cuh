/* cp.async (sm_80+): asynchronous global -> shared copies, one place for the PTX wrappers
 * every kernel that stages through shared memory uses (the Hopper GEMMs, the gate logits). A
 * thread's copies become visible to it after cp_async_wait; to the block after a barrier. */
#ifndef EPMOE_CP_ASYNC_CUH
#define EPMOE_CP_ASYNC_CUH

#include <cuda_runtime.h>
#include <stdint.h>

/* 16 bytes, bypassing L1 (.cg). */
static __device__ __forceinline__ void cp_async16(void *smem_dst, const void *gmem_src) {
    const uint32_t s = (uint32_t)__cvta_generic_to_shared(smem_dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(s), "l"(gmem_src));
}
/* The same, asking the L2 to fetch the 256 bytes around the source: for weight rows read 64
 * bytes per step, the following steps then hit L2. */
static __device__ __forceinline__ void cp_async16_l2_256(void *smem_dst, const void *gmem_src) {
    const uint32_t s = (uint32_t)__cvta_generic_to_shared(smem_dst);
    asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16;" ::"r"(s), "l"(gmem_src));
}
static __device__ __forceinline__ void cp_async8(void *smem_dst, const void *gmem_src) {
    const uint32_t s = (uint32_t)__cvta_generic_to_shared(smem_dst);
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8;" ::"r"(s), "l"(gmem_src));
}
/* 16 bytes through L1 (.ca), for data other warps of the SM read too. With a "memory" clobber,
 * as commit and wait have: a kernel that reads the copies with plain loads and no block
 * barrier between (the streaming kernel) must not see them moved across. */
static __device__ __forceinline__ void cp_async16_ca(void *smem_dst, const void *gmem_src) {
    const uint32_t s = (uint32_t)__cvta_generic_to_shared(smem_dst);
    asm volatile("cp.async.ca.shared.global [%0], [%1], 16;" ::"r"(s), "l"(gmem_src) : "memory");
}
static __device__ __forceinline__ void cp_async_commit() {
    asm volatile("cp.async.commit_group;" ::: "memory");
}
template <int kPending>
static __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(kPending) : "memory");
}
/* 16 bytes bypassing L1, or zeros when !valid (src-size 0: the source is then not read). */
static __device__ __forceinline__ void cp_async16_or_zero(void *smem_dst, const void *gmem_src, bool valid) {
    const uint32_t s = (uint32_t)__cvta_generic_to_shared(smem_dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(s), "l"(gmem_src), "r"(valid ? 16 : 0)
                 : "memory");
}
/* 4 bytes through L1, or zeros when !valid (src-size 0: the source is then not read). */
static __device__ __forceinline__ void cp_async4_or_zero(void *smem_dst, const void *gmem_src, bool valid) {
    const uint32_t s = (uint32_t)__cvta_generic_to_shared(smem_dst);
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"(s), "l"(gmem_src), "r"(valid ? 4 : 0)
                 : "memory");
}

#endif
