/* placeholder while the Blackwell kernel is written (replaced in the next commit) */
#include "kernels/cuda/grouped_gemm.h"
extern "C" int epmoe_cuda_grouped_gemm_sm100_available(void) { return 0; }
extern "C" epmoe_status epmoe_cuda_grouped_gemm_sm100(const epmoe_grouped_gemm_args *a, cudaStream_t s) {
    (void)s;
    EPMOE_TRY(epmoe_grouped_gemm_check_args(a));
    EPMOE_FAIL(EPMOE_ERR_UNSUPPORTED, "grouped GEMM: sm_100 path not built");
}
