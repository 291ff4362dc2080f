#include "coordinator/engine/backend.h"

#include <math.h>
#include <stdlib.h>

#include "common/user_message.h"
#include "coordinator/transport/agree.h"

#ifndef EPMOE_HAVE_CUDA
epmoe_status epmoe_backend_cuda_create(const epmoe_config *cfg, MPI_Comm comm,
                                       const epmoe_st_set *ckpt, int64_t layer_begin,
                                       int64_t layer_end, FILE *log, epmoe_backend **out) {
    (void)cfg, (void)comm, (void)ckpt, (void)layer_begin, (void)layer_end, (void)log;
    *out = NULL;
    EPMOE_FAIL(EPMOE_ERR_UNSUPPORTED,
               "backend=cuda: this build has no CUDA code (no nvcc when it was configured); "
               "rebuild on a machine with the CUDA toolkit, or use backend=cpu");
}
int epmoe_backend_cuda_devices(void) { return 0; }
#endif

epmoe_status epmoe_backend_create(const epmoe_config *cfg, MPI_Comm comm,
                                  const epmoe_st_set *ckpt, int64_t layer_begin,
                                  int64_t layer_end, FILE *log, epmoe_backend **out) {
    *out = NULL;
    int64_t kind = cfg->backend;
    if (kind == EPMOE_BACKEND_AUTO) {
        /* cuda only when every rank has a GPU: a mixed job would fail at the first collective */
        int mine = epmoe_backend_cuda_devices() > 0, all = 0;
        if (MPI_Allreduce(&mine, &all, 1, MPI_INT, MPI_MIN, comm) != MPI_SUCCESS)
            EPMOE_FAIL(EPMOE_ERR_MPI, "backend=auto: asking the ranks for GPUs failed");
        kind = all ? EPMOE_BACKEND_CUDA : EPMOE_BACKEND_CPU;
        /* a model the GPU kernels do not implement (epmoe_config_check_cuda) runs where it is
         * implemented; every rank has the same settings, so every rank decides the same */
        if (kind == EPMOE_BACKEND_CUDA && epmoe_config_check_cuda(cfg) != EPMOE_OK) {
            int rank = 0;
            MPI_Comm_rank(comm, &rank);
            if (log && rank == 0)
                fprintf(log, "epmoe: backend=auto: cpu, not cuda: %s\n", epmoe_last_error_for_user());
            kind = EPMOE_BACKEND_CPU;
        }
    }
    if (kind == EPMOE_BACKEND_CUDA) {
        /* refused before anything is loaded, in builds with and without CUDA alike */
        EPMOE_TRY(epmoe_config_check_cuda(cfg));
        return epmoe_backend_cuda_create(cfg, comm, ckpt, layer_begin, layer_end, log, out);
    }
    return epmoe_backend_cpu_create(cfg, comm, ckpt, layer_begin, layer_end, log, out);
}

void epmoe_backend_destroy(epmoe_backend *b) {
    if (b) b->ops->destroy(b);
}

epmoe_status epmoe_row_value_refused(int is_output, epmoe_dtype dtype, int64_t row, int64_t col,
                                     double value) {
    if (!is_output)
        EPMOE_FAIL(EPMOE_ERR_NUMERIC,
                   "hidden_states: element [%lld, %lld] is %f (NaN/Inf not accepted)",
                   (long long)row, (long long)col, value);
    EPMOE_FAIL(EPMOE_ERR_NUMERIC,
               "output element [%lld, %lld] = %g does not fit %s (largest finite %g); ask for "
               "F32 or BF16 output",
               (long long)row, (long long)col, value, epmoe_dtype_name(dtype),
               dtype == EPMOE_DTYPE_F16 ? 65504.0 : 3.39e38);
}

epmoe_status epmoe_rows_to_f32(const void *x, epmoe_dtype dtype, int64_t T, int64_t H,
                               int64_t first_row, float *out) {
    EPMOE_TRY(epmoe_convert_to_f32(dtype, x, (size_t)(T * H), out));
    for (int64_t i = 0; i < T * H; i++)
        if (!isfinite(out[i]))
            return epmoe_row_value_refused(0, dtype, first_row + i / H, i % H, out[i]);
    return EPMOE_OK;
}

epmoe_status epmoe_rows_from_f32(const float *y, int64_t T, int64_t H, int64_t first_row,
                                 epmoe_dtype dtype, void *out) {
    EPMOE_TRY(epmoe_convert_from_f32(y, (size_t)(T * H), dtype, out));
    if (dtype == EPMOE_DTYPE_F32) return EPMOE_OK;
    /* a finite fp32 value that the narrower type cannot hold became Inf: refuse it */
    const uint16_t *bits = (const uint16_t *)out;
    const uint16_t exp_mask = dtype == EPMOE_DTYPE_F16 ? 0x7c00 : 0x7f80;
    for (int64_t i = 0; i < T * H; i++)
        if ((bits[i] & exp_mask) == exp_mask)
            return epmoe_row_value_refused(1, dtype, first_row + i / H, i % H, y[i]);
    return EPMOE_OK;
}
