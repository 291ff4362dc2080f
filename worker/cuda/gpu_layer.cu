/* One MoE layer on one GPU: the arena, the device weights and the staged forward
 * (worker/cuda/gpu_layer.h). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common/layout.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/grouped_gemm.h"
#include "kernels/cuda/ops_cuda.h"
#include "worker/cuda/gpu_layer.h"

#define ARENA_ALIGN 256
#define CUBLAS_WORKSPACE_BYTES (32u << 20) /* cuBLAS's recommendation for Hopper */

/* ---- carving one allocation into named buffers ------------------------------------------- */

typedef struct {
    const char *name;
    void **slot;
    size_t bytes;
} carve_entry;

typedef struct {
    carve_entry entries[40];
    int n;
} carve_plan;

static void carve_add(carve_plan *p, const char *name, void *slot, size_t bytes) {
    p->entries[p->n++] = (carve_entry){name, (void **)slot, bytes};
}

static size_t carve_total(const carve_plan *p) {
    size_t total = 0;
    for (int i = 0; i < p->n; i++) total += epmoe_round_up((int64_t)p->entries[i].bytes, ARENA_ALIGN);
    return total;
}

/* Points every slot into base (NULL for zero-sized buffers). */
static void carve_assign(const carve_plan *p, void *base) {
    size_t offset = 0;
    for (int i = 0; i < p->n; i++) {
        *p->entries[i].slot = p->entries[i].bytes ? (char *)base + offset : NULL;
        offset += epmoe_round_up((int64_t)p->entries[i].bytes, ARENA_ALIGN);
    }
}

/* ---- context and arena ------------------------------------------------------------------- */

static epmoe_status plan_arena(const epmoe_gpu_context *ctx, epmoe_gpu_arena *a, int with_y,
                               carve_plan *p) {
    const epmoe_config *c = &ctx->cfg;
    const int64_t T = a->max_tokens, k = c->top_k, E = c->n_routed_experts;
    const int64_t H = c->hidden_size, I = c->moe_inter_size, Is = ctx->shared_inter;
    const int64_t Hp = ctx->hidden_pad, Ip = ctx->inter_pad;
    const int64_t n = ctx->n_local, cap = a->cap_rows, K_max = Hp > Ip ? Hp : Ip;
    const int nvfp4 = c->act_quant == EPMOE_ACT_NVFP4, fp8 = c->act_quant == EPMOE_ACT_FP8;
    memset(p, 0, sizeof *p);
    carve_add(p, "logits [T,E] f32", &a->logits, (size_t)(T * E) * 4);
    carve_add(p, "ids [T,k] i32", &a->ids, (size_t)(T * k) * 4);
    carve_add(p, "weights [T,k] f32", &a->weights, (size_t)(T * k) * 4);
    carve_add(p, "pair_rank [T*k] i32", &a->pair_rank, (size_t)(T * k) * 4);
    carve_add(p, "row_of_pair [T*k] i32", &a->row_of_pair, (size_t)(T * k) * 4);
    carve_add(p, "tokens_per_expert [n_local] i64", &a->tokens_per_expert, (size_t)n * 8);
    carve_add(p, "padded_offsets [n_local+1] i64", &a->padded_offsets, (size_t)(n + 1) * 8);
    carve_add(p, "token_of_row [cap] i32", &a->token_of_row, (size_t)cap * 4);
    a->a_codes_bytes = fp8 ? (size_t)(cap * K_max) : nvfp4 ? (size_t)(cap * K_max / 2) : 0;
    a->a_sf_bytes = fp8 ? (size_t)(cap * K_max / 128) : nvfp4 ? (size_t)(cap * K_max / 16) : 0;
    carve_add(p, fp8 ? "a_codes [cap,max(Hp,Ip)] e4m3" : "a_codes [cap,max(Hp,Ip)/2] e2m1",
              &a->a_codes, a->a_codes_bytes);
    carve_add(p, fp8 ? "a_sf [cap,max(Hp,Ip)/128] ue8m0" : "a_sf [cap,max(Hp,Ip)/16] ue4m3",
              &a->a_sf, a->a_sf_bytes);
    carve_add(p, "a_scale [cap] f32", &a->a_scale, nvfp4 ? (size_t)cap * 4 : 0);
    /* bf16 A: the W4A16 input, or the GEMMs' exact bf16 copy of quantized A: NVFP4 on Hopper
     * (the wgmma kernels dequantize each row once per call instead of once per weight tile),
     * FP8 everywhere (every sm_90-path kernel reads it from there) */
    int major = 0;
    CUDA_TRY(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, ctx->device),
             "reading the compute capability");
    const int want_bf16_a = !nvfp4 || major == 9;
    carve_add(p, "a_bf16 [cap,max(Hp,Ip)] bf16", &a->a_bf16, want_bf16_a ? (size_t)(cap * K_max) * 2 : 0);
    carve_add(p, "h [cap,2I] f32", &a->h, (size_t)(cap * 2 * I) * 4);
    carve_add(p, "y [cap,H] f32", &a->y, with_y ? (size_t)(cap * H) * 4 : 0);
    /* the shared expert runs in whole chunks of EPMOE_SHARED_CHUNK_ROWS (batch invariance) */
    const int64_t Ts = epmoe_round_up(T, EPMOE_SHARED_CHUNK_ROWS);
    carve_add(p, "shared_x [Ts,H] bf16", &a->shared_x_bf16, (size_t)(Ts * H) * 2 * (Is > 0));
    carve_add(p, "shared_h [Ts,2Is] f32", &a->shared_h, (size_t)(Ts * 2 * Is) * 4);
    carve_add(p, "shared_a [Ts,Is] bf16", &a->shared_a_bf16, (size_t)(Ts * Is) * 2);
    carve_add(p, "shared_y [Ts,H] f32", &a->shared_y, (size_t)(Ts * H) * 4 * (Is > 0));
    a->cublas_workspace_bytes = Is > 0 ? CUBLAS_WORKSPACE_BYTES : 0;
    carve_add(p, "cublas workspace", &a->cublas_workspace, a->cublas_workspace_bytes);
    carve_add(p, "error_flags u32", &a->error_flags, 4);
    carve_add(p, "saturated u64", &a->saturated, 8);
    return EPMOE_OK;
}

epmoe_status epmoe_gpu_context_create(const epmoe_config *cfg, int device, int64_t expert_start,
                                      int64_t n_local, int64_t max_expert_rows, int with_y,
                                      FILE *log, epmoe_gpu_context **out) {
    *out = NULL;
    EPMOE_TRY(epmoe_config_validate(cfg));
    EPMOE_REQUIRE(n_local > 0 && expert_start >= 0 && expert_start + n_local <= cfg->n_routed_experts,
                  EPMOE_ERR_INVALID_ARG, "gpu context: slice [%lld, %lld) outside [0, %lld)",
                  (long long)expert_start, (long long)(expert_start + n_local),
                  (long long)cfg->n_routed_experts);
    EPMOE_REQUIRE(cfg->expert_pad_rows % EPMOE_GEMM_PAD_ROWS == 0, EPMOE_ERR_UNSUPPORTED,
                  "gpu context: expert_pad_rows = %lld, the GPU GEMMs need a multiple of %d",
                  (long long)cfg->expert_pad_rows, EPMOE_GEMM_PAD_ROWS);
    EPMOE_REQUIRE(cfg->weight_format == EPMOE_WEIGHTS_NVFP4 || cfg->weight_format == EPMOE_WEIGHTS_MXFP4,
                  EPMOE_ERR_INVALID_ARG, "gpu context: unknown weight format %lld",
                  (long long)cfg->weight_format);
    EPMOE_REQUIRE(max_expert_rows > 0, EPMOE_ERR_INVALID_ARG,
                  "gpu context: max_expert_rows = %lld", (long long)max_expert_rows);
    EPMOE_TRY(epmoe_config_check_cuda(cfg)); /* what the kernels cannot run */

    epmoe_gpu_context *ctx = (epmoe_gpu_context *)calloc(1, sizeof *ctx);
    EPMOE_REQUIRE(ctx, EPMOE_ERR_OOM, "gpu context: out of host memory");
    ctx->cfg = *cfg;
    ctx->device = device;
    ctx->expert_start = expert_start;
    ctx->n_local = n_local;
    ctx->shared_inter = cfg->n_shared_experts * cfg->moe_inter_size;
    ctx->hidden_pad = epmoe_round_up(cfg->hidden_size, EPMOE_GEMM_K_STEP);
    ctx->inter_pad = epmoe_round_up(cfg->moe_inter_size, EPMOE_GEMM_K_STEP);
    epmoe_gpu_arena *a = &ctx->arena;
    a->max_tokens = cfg->max_tokens_per_rank;
    a->max_expert_rows = max_expert_rows;
    a->cap_rows = epmoe_round_up(
        epmoe_padded_capacity(max_expert_rows, n_local, cfg->expert_pad_rows), EPMOE_GEMM_PAD_ROWS);

    epmoe_status st = EPMOE_OK;
    cudaError_t err = cudaSetDevice(device);
    if (err != cudaSuccess) {
        st = epmoe_set_error(EPMOE_ERR_CUDA, __FILE__, __LINE__, "cudaSetDevice(%d) failed: %s",
                             device, cudaGetErrorString(err));
        goto fail;
    }
    carve_plan plan;
    st = plan_arena(ctx, a, with_y, &plan);
    if (st != EPMOE_OK) goto fail;
    a->bytes = carve_total(&plan);
    err = cudaMalloc(&a->base, a->bytes);
    if (err != cudaSuccess) {
        st = epmoe_set_error(EPMOE_ERR_OOM, __FILE__, __LINE__,
                             "gpu arena: cudaMalloc of %zu bytes (%.1f MiB) failed: %s; lower "
                             "max_tokens_per_rank (%lld) or use more ranks",
                             a->bytes, a->bytes / 1048576.0, cudaGetErrorString(err),
                             (long long)cfg->max_tokens_per_rank);
        goto fail;
    }
    carve_assign(&plan, a->base);
    err = cudaMemset(a->base, 0, a->bytes);
    if (err != cudaSuccess) {
        st = epmoe_set_error(EPMOE_ERR_CUDA, __FILE__, __LINE__, "clearing the arena: %s",
                             cudaGetErrorString(err));
        goto fail;
    }
    if (cublasCreate(&ctx->cublas) != CUBLAS_STATUS_SUCCESS) {
        ctx->cublas = NULL;
        st = epmoe_set_error(EPMOE_ERR_CUDA, __FILE__, __LINE__, "cublasCreate failed");
        goto fail;
    }
    if (log) {
        fprintf(log,
                "gpu arena (device %d): %lld tokens, %lld expert rows, %lld padded rows over "
                "%lld local experts\n",
                device, (long long)a->max_tokens, (long long)max_expert_rows,
                (long long)a->cap_rows, (long long)n_local);
        for (int i = 0; i < plan.n; i++)
            if (plan.entries[i].bytes)
                fprintf(log, "  %-34s %14zu bytes\n", plan.entries[i].name, plan.entries[i].bytes);
        fprintf(log, "  %-34s %14zu bytes (%.1f MiB)\n", "total (one cudaMalloc)", a->bytes,
                a->bytes / 1048576.0);
    }
    *out = ctx;
    return EPMOE_OK;
fail:
    epmoe_gpu_context_free(ctx);
    return st;
}

void epmoe_gpu_context_free(epmoe_gpu_context *ctx) {
    if (!ctx) return;
    if (ctx->cublas) cublasDestroy(ctx->cublas);
    if (ctx->arena.base) cudaFree(ctx->arena.base);
    free(ctx);
}

/* ---- layer weights ----------------------------------------------------------------------- */

/* Host row-major codes [rows, K/2] and scales [rows, K/16] -> the device slab layout with K
 * padded to K_pad: rows of K_pad elements in `staging` (rows*K_pad*9/16 bytes at least), the
 * elements [K, K_pad) code 0 with block scale 0, reordered by epmoe_cuda_weights_to_slabs, and
 * (fp8 != NULL) expanded into the FP8 image, inexact groups added to *fp8_inexact. All on the
 * default stream, so a later copy into the same staging waits for both. */
static epmoe_status upload_slabs(const uint8_t *codes, const uint8_t *sf, int64_t rows, int64_t K,
                                 int64_t K_pad, uint8_t *staging, uint8_t *slab_codes,
                                 uint8_t *slab_sf, uint8_t *fp8, uint8_t *fp8_exp,
                                 unsigned long long *fp8_inexact) {
    const size_t code_bytes = (size_t)(rows * K / 2), sf_bytes = (size_t)(rows * K / 16);
    const size_t pad_code_bytes = (size_t)(rows * K_pad / 2);
    if (K_pad == K) {
        CUDA_TRY(cudaMemcpy(staging, codes, code_bytes, cudaMemcpyHostToDevice),
                 "uploading expert codes");
        CUDA_TRY(cudaMemcpy(staging + code_bytes, sf, sf_bytes, cudaMemcpyHostToDevice),
                 "uploading expert block scales");
    } else {
        /* The unpadded rows land in the destination first (it is larger), then move to their
         * padded rows of staging device to device: one contiguous upload from the host instead
         * of a strided one per row. */
        const size_t pad_sf_bytes = (size_t)(rows * K_pad / 16);
        CUDA_TRY(cudaMemcpy(slab_codes, codes, code_bytes, cudaMemcpyHostToDevice),
                 "uploading expert codes");
        CUDA_TRY(cudaMemcpy(slab_sf, sf, sf_bytes, cudaMemcpyHostToDevice),
                 "uploading expert block scales");
        CUDA_TRY(cudaMemset(staging, 0, pad_code_bytes + pad_sf_bytes),
                 "clearing the K padding of expert weights");
        CUDA_TRY(cudaMemcpy2D(staging, (size_t)(K_pad / 2), slab_codes, (size_t)(K / 2),
                              (size_t)(K / 2), (size_t)rows, cudaMemcpyDeviceToDevice),
                 "padding expert codes to the GEMM's k step");
        CUDA_TRY(cudaMemcpy2D(staging + pad_code_bytes, (size_t)(K_pad / 16), slab_sf,
                              (size_t)(K / 16), (size_t)(K / 16), (size_t)rows,
                              cudaMemcpyDeviceToDevice),
                 "padding expert block scales to the GEMM's k step");
    }
    EPMOE_TRY(epmoe_cuda_weights_to_slabs(staging, staging + pad_code_bytes, rows, K_pad,
                                          slab_codes, slab_sf, 0));
    if (!fp8) return EPMOE_OK;
    return epmoe_cuda_weights_to_fp8_slabs(staging, staging + pad_code_bytes, rows, K_pad, fp8,
                                           fp8_exp, fp8_inexact, 0);
}

typedef struct {
    const void *src; /* host source, or NULL: filled another way */
    size_t bytes;
} layer_copy;

/* The device layout of one layer's weights: every buffer carved out of one allocation, and
 * (copies != NULL) the host source of each in carve order. The one place that sizes them. */
static void plan_layer(const epmoe_gpu_context *ctx, const epmoe_layer_weights *w,
                       epmoe_gpu_layer *out, carve_plan *plan, layer_copy *copies,
                       int *n_copies) {
    const epmoe_config *c = &ctx->cfg;
    const int64_t H = c->hidden_size, I = c->moe_inter_size, nl = ctx->n_local;
    const int64_t Hp = ctx->hidden_pad, Ip = ctx->inter_pad;
    const int64_t E = c->n_routed_experts, k = c->top_k, Is = ctx->shared_inter;
    const int static_scale = c->act_scale == EPMOE_ACT_SCALE_STATIC;
    const int hash = w->layer < c->n_hash_layers, bias = c->expert_bias != 0;
    out->layer = w->layer;
    out->hash_routed = hash;
    out->vocab_size = hash ? w->vocab_size : 0;
    memset(plan, 0, sizeof *plan);
    int n = 0;
#define ADD(field, src_ptr, nbytes)                                                             \
    do {                                                                                        \
        carve_add(plan, #field, &out->field, (nbytes));                                         \
        if (copies) copies[n].src = (src_ptr), copies[n].bytes = (nbytes);                      \
        n++;                                                                                    \
    } while (0)
    /* expert codes and scales: carved here, uploaded below through the slab reordering */
    ADD(w13_codes, NULL, (size_t)(nl * 2 * I * Hp / 2));
    ADD(w13_sf, NULL, (size_t)(nl * 2 * I * Hp / 16));
    ADD(w13_scale_2, w->w13_scale_2, (size_t)(nl * 2) * 4);
    ADD(w2_codes, NULL, (size_t)(nl * H * Ip / 2));
    ADD(w2_sf, NULL, (size_t)(nl * H * Ip / 16));
    ADD(w2_scale_2, w->w2_scale_2, (size_t)nl * 4);
    ADD(w13_input_scale, w->w13_input_scale, static_scale ? (size_t)nl * 4 : 0);
    ADD(w2_input_scale, w->w2_input_scale, static_scale ? (size_t)nl * 4 : 0);
    ADD(gate_weight, w->gate_weight, (size_t)(E * H) * 4);
    ADD(gate_bias, w->gate_bias, w->gate_bias && !hash ? (size_t)E * 4 : 0);
    ADD(tid2eid, w->tid2eid, hash ? (size_t)(w->vocab_size * k) * 4 : 0);
    ADD(w13_bias, w->w13_bias, bias ? (size_t)(nl * 2 * I) * 4 : 0);
    ADD(w2_bias, w->w2_bias, bias ? (size_t)(nl * H) * 4 : 0);
#undef ADD
    /* bf16 shared weights, converted on the device from an fp32 staging copy */
    carve_add(plan, "shared_w13", &out->shared_w13, (size_t)(2 * Is * H) * 2);
    carve_add(plan, "shared_w2", &out->shared_w2, (size_t)(H * Is) * 2);
    /* the FP8 image where it can be exact: MXFP4 experts (NVFP4's scales cannot), when asked */
    const int fp8 = c->act_quant == EPMOE_ACT_FP8 && c->weight_format == EPMOE_WEIGHTS_MXFP4 &&
                    c->fp8_tensor_cores;
    carve_add(plan, "w13_fp8", &out->w13_fp8, fp8 ? (size_t)(nl * 2 * I * Hp) : 0);
    carve_add(plan, "w13_fp8_exp", &out->w13_fp8_exp, fp8 ? (size_t)(nl * 2 * I * Hp / 128) : 0);
    carve_add(plan, "w2_fp8", &out->w2_fp8, fp8 ? (size_t)(nl * H * Ip) : 0);
    carve_add(plan, "w2_fp8_exp", &out->w2_fp8_exp, fp8 ? (size_t)(nl * H * Ip / 128) : 0);
    if (n_copies) *n_copies = n;
}

/* Shapes of a layer's host weights against the context. */
static epmoe_status check_layer_weights(const epmoe_gpu_context *ctx,
                                        const epmoe_layer_weights *w) {
    const epmoe_config *c = &ctx->cfg;
    const int64_t H = c->hidden_size, I = c->moe_inter_size, n = ctx->n_local;
    const int64_t E = c->n_routed_experts, Is = ctx->shared_inter;
    EPMOE_REQUIRE(w->hidden_size == H && w->inter_size == I && w->n_local == n &&
                      w->slice.start == ctx->expert_start && w->n_experts == E,
                  EPMOE_ERR_INVALID_ARG,
                  "layer %lld weights (H=%lld I=%lld experts [%lld,+%lld) of %lld) do not match "
                  "the GPU context (H=%lld I=%lld [%lld,+%lld) of %lld)",
                  (long long)w->layer, (long long)w->hidden_size, (long long)w->inter_size,
                  (long long)w->slice.start, (long long)w->n_local, (long long)w->n_experts,
                  (long long)H, (long long)I, (long long)ctx->expert_start, (long long)n,
                  (long long)E);
    EPMOE_REQUIRE(c->expert_bias ? w->w13_bias && w->w2_bias : !w->w13_bias && !w->w2_bias,
                  EPMOE_ERR_INVALID_ARG,
                  "layer %lld: expert biases %s, config says expert_bias = %lld",
                  (long long)w->layer, w->w13_bias && w->w2_bias ? "loaded" : "missing",
                  (long long)c->expert_bias);
    EPMOE_REQUIRE(w->w13_codes && w->w13_sf && w->w13_scale_2 && w->w2_codes && w->w2_sf &&
                      w->w2_scale_2 && w->gate_weight,
                  EPMOE_ERR_INVALID_ARG, "layer %lld: expert or gate weights missing",
                  (long long)w->layer);
    const int static_scale = c->act_scale == EPMOE_ACT_SCALE_STATIC;
    EPMOE_REQUIRE(!static_scale || (w->w13_input_scale && w->w2_input_scale),
                  EPMOE_ERR_INVALID_ARG, "layer %lld: act_scale=static needs input_scale tensors",
                  (long long)w->layer);
    const int hash = w->layer < c->n_hash_layers;
    /* the CPU refuses a non-finite bias on every forward; here it is refused once, at upload,
     * since the routing kernel does not look at it */
    for (int64_t e = 0; w->gate_bias && !hash && e < E; e++)
        EPMOE_REQUIRE(isfinite(w->gate_bias[e]), EPMOE_ERR_NUMERIC,
                      "layer %lld: gate bias of expert %lld is %g (must be finite)",
                      (long long)w->layer, (long long)e, (double)w->gate_bias[e]);
    EPMOE_REQUIRE(!hash || (w->tid2eid && w->vocab_size > 0), EPMOE_ERR_INVALID_ARG,
                  "layer %lld is hash-routed (n_hash_layers=%lld) but has no tid2eid table",
                  (long long)w->layer, (long long)c->n_hash_layers);
    EPMOE_REQUIRE(Is == 0 || (w->shared_inter == Is && w->shared_w13 && w->shared_w2),
                  EPMOE_ERR_INVALID_ARG,
                  "layer %lld: shared expert of %lld columns, config says %lld",
                  (long long)w->layer, (long long)w->shared_inter, (long long)Is);

    return EPMOE_OK;
}

int64_t epmoe_gpu_layer_bytes(const epmoe_gpu_context *ctx, const epmoe_layer_weights *w) {
    epmoe_gpu_layer scratch;
    memset(&scratch, 0, sizeof scratch);
    carve_plan plan;
    plan_layer(ctx, w, &scratch, &plan, NULL, NULL);
    return (int64_t)carve_total(&plan);
}

int64_t epmoe_gpu_layer_staging_bytes(const epmoe_gpu_context *ctx) {
    const int64_t n = ctx->n_local, I = ctx->cfg.moe_inter_size, H = ctx->cfg.hidden_size;
    const int64_t w13 = n * 2 * I * ctx->hidden_pad, w2 = n * H * ctx->inter_pad;
    return (w13 > w2 ? w13 : w2) / 16 * 9; /* codes (1/2 byte) and scales (1/16) per element */
}

epmoe_status epmoe_gpu_layer_upload(epmoe_gpu_context *ctx, const epmoe_layer_weights *w,
                                    epmoe_gpu_layer *out) {
    memset(out, 0, sizeof *out);
    EPMOE_TRY(check_layer_weights(ctx, w));
    const epmoe_config *c = &ctx->cfg;
    const int64_t H = c->hidden_size, I = c->moe_inter_size, n = ctx->n_local;
    const int64_t Hp = ctx->hidden_pad, Ip = ctx->inter_pad;
    const int64_t Is = ctx->shared_inter;
    layer_copy copies[16];
    int n_copies = 0;
    carve_plan plan;
    plan_layer(ctx, w, out, &plan, copies, &n_copies);
    out->bytes = carve_total(&plan);
    CUDA_TRY(cudaSetDevice(ctx->device), "selecting the context's device");
    CUDA_TRY(cudaMalloc(&out->base, out->bytes), "allocating a layer's device weights");
    carve_assign(&plan, out->base);
    for (int i = 0; i < n_copies; i++)
        if (copies[i].bytes && copies[i].src)
            CUDA_TRY(cudaMemcpy(*plan.entries[i].slot, copies[i].src, copies[i].bytes,
                                cudaMemcpyHostToDevice),
                     plan.entries[i].name);
    {
        /* one staging buffer for both expert tensors (sized for the larger) */
        uint8_t *staging = NULL;
        unsigned long long *inexact = NULL, host_inexact[2] = {0, 0};
        const size_t counters = (size_t)epmoe_round_up(epmoe_gpu_layer_staging_bytes(ctx), 16);
        CUDA_TRY(cudaMalloc((void **)&staging, counters + 16), "staging expert weights");
        inexact = (unsigned long long *)(staging + counters); /* W13's, W2's */
        cudaError_t err = cudaMemset(inexact, 0, 16);
        epmoe_status st = err == cudaSuccess ? EPMOE_OK : EPMOE_ERR_CUDA;
        if (st == EPMOE_OK)
            st = upload_slabs(w->w13_codes, w->w13_sf, n * 2 * I, H, Hp, staging, out->w13_codes,
                              out->w13_sf, out->w13_fp8, out->w13_fp8_exp, inexact);
        if (st == EPMOE_OK)
            st = upload_slabs(w->w2_codes, w->w2_sf, n * H, I, Ip, staging, out->w2_codes,
                              out->w2_sf, out->w2_fp8, out->w2_fp8_exp, inexact + 1);
        if (st == EPMOE_OK) err = cudaMemcpy(host_inexact, inexact, 16, cudaMemcpyDeviceToHost);
        cudaFree(staging);
        EPMOE_TRY(st);
        CUDA_TRY(err, "reordering expert weights into the slab layout");
        /* a tensor with an inexact group is not used in FP8: its GEMM keeps the bf16 path */
        if (host_inexact[0]) out->w13_fp8 = out->w13_fp8_exp = NULL;
        if (host_inexact[1]) out->w2_fp8 = out->w2_fp8_exp = NULL;
        out->fp8_inexact_groups = (int64_t)(host_inexact[0] + host_inexact[1]);
    }
    if (Is > 0) {
        size_t n13 = (size_t)(2 * Is * H), n2 = (size_t)(H * Is);
        float *staging = NULL;
        CUDA_TRY(cudaMalloc(&staging, (n13 > n2 ? n13 : n2) * 4), "staging the shared expert");
        epmoe_status st = EPMOE_OK;
        cudaError_t err = cudaMemcpy(staging, w->shared_w13, n13 * 4, cudaMemcpyHostToDevice);
        if (err == cudaSuccess) st = epmoe_cuda_f32_to_bf16(staging, n13, out->shared_w13, 0);
        if (err == cudaSuccess && st == EPMOE_OK)
            err = cudaMemcpy(staging, w->shared_w2, n2 * 4, cudaMemcpyHostToDevice);
        if (err == cudaSuccess && st == EPMOE_OK)
            st = epmoe_cuda_f32_to_bf16(staging, n2, out->shared_w2, 0);
        if (err == cudaSuccess && st == EPMOE_OK) err = cudaDeviceSynchronize();
        cudaFree(staging);
        if (st != EPMOE_OK) return st;
        CUDA_TRY(err, "converting the shared expert to bf16");
    }
    return EPMOE_OK;
}

void epmoe_gpu_layer_free(epmoe_gpu_layer *layer) {
    if (layer->base) cudaFree(layer->base);
    memset(layer, 0, sizeof *layer);
}

/* ---- the forward stages ------------------------------------------------------------------ */

static epmoe_status check_tokens(const epmoe_gpu_context *ctx, int64_t T) {
    EPMOE_REQUIRE(T >= 0 && T <= ctx->arena.max_tokens, EPMOE_ERR_INVALID_ARG,
                  "forward of %lld tokens: the arena holds at most %lld (max_tokens_per_rank)",
                  (long long)T, (long long)ctx->arena.max_tokens);
    EPMOE_REQUIRE(T * ctx->cfg.top_k <= ctx->arena.max_expert_rows, EPMOE_ERR_INVALID_ARG,
                  "forward of %lld tokens x top_k %lld exceeds the arena's %lld expert rows",
                  (long long)T, (long long)ctx->cfg.top_k, (long long)ctx->arena.max_expert_rows);
    return EPMOE_OK;
}

epmoe_status epmoe_gpu_route(epmoe_gpu_context *ctx, const epmoe_gpu_layer *layer,
                             const float *x, const int32_t *token_ids, int64_t T,
                             cudaStream_t stream) {
    EPMOE_TRY(check_tokens(ctx, T));
    const epmoe_config *c = &ctx->cfg;
    epmoe_gpu_arena *a = &ctx->arena;
    epmoe_route_params p = epmoe_route_params_from_config(c);
    EPMOE_TRY(epmoe_cuda_gate_logits(x, layer->gate_weight, T, c->hidden_size,
                                     c->n_routed_experts, a->logits, stream));
    if (layer->hash_routed) {
        EPMOE_REQUIRE(token_ids, EPMOE_ERR_INVALID_ARG,
                      "layer %lld is hash-routed: the forward needs token ids",
                      (long long)layer->layer);
        return epmoe_cuda_route_hash(&p, a->logits, layer->tid2eid, layer->vocab_size, token_ids,
                                     T, a->ids, a->weights, a->error_flags, stream);
    }
    return epmoe_cuda_route(&p, a->logits, layer->gate_bias, T, a->ids, a->weights,
                            a->error_flags, stream);
}

epmoe_status epmoe_gpu_plan(epmoe_gpu_context *ctx, int64_t T, cudaStream_t stream) {
    EPMOE_TRY(check_tokens(ctx, T));
    epmoe_gpu_arena *a = &ctx->arena;
    return epmoe_cuda_plan_layout(a->ids, T, ctx->cfg.top_k, ctx->expert_start, ctx->n_local,
                                  ctx->cfg.expert_pad_rows, a->pair_rank, a->tokens_per_expert,
                                  a->padded_offsets, a->row_of_pair, a->token_of_row, stream);
}

/* Rows of the padded layout for at most `pairs_bound` (row, expert) pairs. Launch shapes follow
 * it rather than the arena's worst case, so a decode-sized batch gets the decode GEMM variants
 * and small grids; the bound is a host value fixed when a graph is captured (capture-safe). */
static int64_t pairs_cap_rows(const epmoe_gpu_context *ctx, int64_t pairs_bound) {
    const epmoe_gpu_arena *a = &ctx->arena;
    int64_t rows = pairs_bound < a->max_expert_rows ? pairs_bound : a->max_expert_rows;
    int64_t cap = epmoe_round_up(epmoe_padded_capacity(rows, ctx->n_local, ctx->cfg.expert_pad_rows),
                                 EPMOE_GEMM_PAD_ROWS);
    return cap < a->cap_rows ? cap : a->cap_rows;
}

epmoe_status epmoe_gpu_experts(epmoe_gpu_context *ctx, const epmoe_gpu_layer *layer,
                               const float *x, int64_t T, cudaStream_t stream) {
    EPMOE_TRY(check_tokens(ctx, T));
    int64_t k = ctx->cfg.top_k < ctx->n_local ? ctx->cfg.top_k : ctx->n_local;
    epmoe_gpu_rows rows;
    memset(&rows, 0, sizeof rows);
    rows.x = x;
    rows.x_stride = ctx->cfg.hidden_size;
    return epmoe_gpu_experts_rows(ctx, layer, &rows, T * k, stream);
}

epmoe_status epmoe_gpu_experts_rows(epmoe_gpu_context *ctx, const epmoe_gpu_layer *layer,
                                    const epmoe_gpu_rows *rows, int64_t pairs_bound,
                                    cudaStream_t stream) {
    const epmoe_config *c = &ctx->cfg;
    epmoe_gpu_arena *a = &ctx->arena;
    const int64_t H = c->hidden_size, I = c->moe_inter_size, n = ctx->n_local;
    const int64_t Hp = ctx->hidden_pad, Ip = ctx->inter_pad;
    const int64_t cap = pairs_cap_rows(ctx, pairs_bound);
    const int nvfp4 = c->act_quant == EPMOE_ACT_NVFP4, fp8 = c->act_quant == EPMOE_ACT_FP8;
    const int static_scale = c->act_scale == EPMOE_ACT_SCALE_STATIC;

    /* Gather the source rows into the padded layout (quantizing them on the way, unless the
     * sender did). */
    if (rows->nvfp4) {
        EPMOE_REQUIRE(nvfp4 && !static_scale, EPMOE_ERR_INVALID_ARG,
                      "experts: rows quantized with per-row scales need act_quant = nvfp4 and "
                      "act_scale = per_row");
        EPMOE_TRY(epmoe_cuda_nvfp4_gather_rows(
            rows->nvfp4, rows->nvfp4_stride, rows->codes_offset, rows->sf_offset,
            rows->inv_gs_offset, H, Hp, a->token_of_row, a->padded_offsets, a->tokens_per_expert,
            n, cap, a->a_codes, a->a_sf, a->a_scale, stream));
    } else if (nvfp4) {
        EPMOE_TRY(epmoe_cuda_nvfp4_quantize_rows(
            rows->x, rows->x_stride, cap, H, Hp, a->token_of_row, a->padded_offsets,
            a->tokens_per_expert, n, static_scale ? layer->w13_input_scale : NULL, a->a_codes,
            a->a_sf, a->a_scale, a->saturated, stream));
    } else if (fp8) {
        EPMOE_TRY(epmoe_cuda_fp8_quantize_rows(rows->x, rows->x_stride, cap, H, Hp,
                                               a->token_of_row, a->padded_offsets,
                                               a->tokens_per_expert, n, a->a_codes, a->a_sf,
                                               stream));
    } else {
        EPMOE_TRY(epmoe_cuda_permute_bf16(rows->x, rows->x_stride, H, Hp, a->token_of_row,
                                          a->padded_offsets, a->tokens_per_expert, n, cap,
                                          a->a_bf16, stream));
    }

    epmoe_grouped_gemm_args g;
    memset(&g, 0, sizeof g);
    g.n_experts = n;
    g.cap_rows = cap;
    g.a_format = nvfp4 ? EPMOE_GEMM_A_NVFP4 : fp8 ? EPMOE_GEMM_A_FP8 : EPMOE_GEMM_A_BF16;
    g.a_codes = a->a_codes;
    g.a_sf = a->a_sf;
    g.a_scale = nvfp4 ? a->a_scale : NULL;
    g.a_bf16 = a->a_bf16;
    g.a_workspace = nvfp4 || fp8 ? a->a_bf16 : NULL;
    g.padded_offsets = a->padded_offsets;
    g.tokens_per_expert = a->tokens_per_expert;

    /* h = x . W13^T, w1 (gate) columns scaled by w13_scale_2[e][0], w3 (up) by [e][1]; over the
     * padded K (zeros past H on both sides) */
    g.N = 2 * I;
    g.K = Hp;
    g.w_slabs = 1; /* both GEMMs' weights, see epmoe_gpu_layer */
    g.w_codes = layer->w13_codes;
    g.w_sf = layer->w13_sf;
    g.w_fp8 = fp8 ? layer->w13_fp8 : NULL;
    g.w_fp8_exp = fp8 ? layer->w13_fp8_exp : NULL;
    g.w_scale = layer->w13_scale_2;
    g.w_scale_groups = 2;
    g.w_scale_split = I;
    g.out = a->h;
    EPMOE_TRY(epmoe_cuda_grouped_gemm(&g, stream));

    /* a = SwiGLU(h + b13), the W2 input, rows of Ip elements */
    const epmoe_cuda_swiglu_act act = epmoe_cuda_swiglu_act_of(c);
    if (nvfp4) {
        EPMOE_TRY(epmoe_cuda_swiglu_nvfp4_quantize(
            a->h, cap, I, Ip, &act, layer->w13_bias, a->padded_offsets, a->tokens_per_expert, n,
            static_scale ? layer->w2_input_scale : NULL, a->a_codes, a->a_sf, a->a_scale,
            a->saturated, stream));
    } else if (fp8) {
        EPMOE_TRY(epmoe_cuda_swiglu_fp8_quantize(a->h, cap, I, Ip, &act, layer->w13_bias,
                                                 a->padded_offsets, a->tokens_per_expert, n,
                                                 a->a_codes, a->a_sf, stream));
    } else {
        EPMOE_TRY(epmoe_cuda_swiglu(a->h, cap, I, &act, layer->w13_bias, a->padded_offsets,
                                    a->tokens_per_expert, n, Ip, NULL, a->a_bf16, stream));
    }

    /* y = a . W2^T, one tensor scale per expert, + its bias (gpt-oss) in the GEMM's epilogue. */
    g.N = H;
    g.K = Ip;
    g.w_codes = layer->w2_codes;
    g.w_sf = layer->w2_sf;
    g.w_fp8 = fp8 ? layer->w2_fp8 : NULL;
    g.w_fp8_exp = fp8 ? layer->w2_fp8_exp : NULL;
    g.w_scale = layer->w2_scale_2;
    g.w_scale_groups = 1;
    g.w_scale_split = H;
    EPMOE_REQUIRE(!rows->out == !rows->out_row, EPMOE_ERR_INVALID_ARG,
                  "experts: an output buffer needs its row map, and a row map its buffer");
    EPMOE_REQUIRE(rows->out || a->y, EPMOE_ERR_INVALID_ARG,
                  "experts: this arena holds no y (made with with_y = 0): name an output");
    g.out = rows->out ? rows->out : a->y;
    g.out_bias = layer->w2_bias;
    g.out_row = rows->out_row;
    EPMOE_TRY(epmoe_cuda_grouped_gemm(&g, stream));
    return EPMOE_OK;
}

epmoe_status epmoe_gpu_shared(epmoe_gpu_context *ctx, const epmoe_gpu_layer *layer,
                              const float *x, int64_t T, cudaStream_t stream) {
    EPMOE_TRY(check_tokens(ctx, T));
    if (ctx->shared_inter == 0) return EPMOE_OK;
    epmoe_gpu_arena *a = &ctx->arena;
    epmoe_cuda_shared_scratch s = {a->shared_x_bf16, a->shared_h, a->shared_a_bf16};
    const epmoe_cuda_swiglu_act act = epmoe_cuda_swiglu_act_of(&ctx->cfg);
    return epmoe_cuda_shared_forward(ctx->cublas, a->cublas_workspace, a->cublas_workspace_bytes,
                                     x, T, ctx->cfg.hidden_size, ctx->shared_inter,
                                     layer->shared_w13, layer->shared_w2, &act, &s, a->shared_y,
                                     stream);
}

epmoe_status epmoe_gpu_combine(epmoe_gpu_context *ctx, const epmoe_gpu_layer *layer, int64_t T,
                               float *out, cudaStream_t stream) {
    (void)layer;
    EPMOE_TRY(check_tokens(ctx, T));
    epmoe_gpu_arena *a = &ctx->arena;
    return epmoe_cuda_combine(a->y, ctx->cfg.hidden_size, a->row_of_pair, a->weights, T,
                              ctx->cfg.top_k, ctx->shared_inter ? a->shared_y : NULL, out,
                              stream);
}

epmoe_status epmoe_gpu_layer_forward(epmoe_gpu_context *ctx, const epmoe_gpu_layer *layer,
                                     const float *x, const int32_t *token_ids, int64_t T,
                                     float *out, cudaStream_t stream) {
    EPMOE_TRY(epmoe_gpu_route(ctx, layer, x, token_ids, T, stream));
    EPMOE_TRY(epmoe_gpu_plan(ctx, T, stream));
    EPMOE_TRY(epmoe_gpu_experts(ctx, layer, x, T, stream));
    EPMOE_TRY(epmoe_gpu_shared(ctx, layer, x, T, stream));
    EPMOE_TRY(epmoe_gpu_combine(ctx, layer, T, out, stream));
    return EPMOE_OK;
}

epmoe_status epmoe_gpu_read_flags(epmoe_gpu_context *ctx, cudaStream_t stream,
                                  unsigned long long *saturated) {
    epmoe_gpu_arena *a = &ctx->arena;
    uint32_t flags = 0;
    unsigned long long sat = 0;
    CUDA_TRY(cudaStreamSynchronize(stream), "waiting for the layer forward");
    CUDA_TRY(cudaMemcpy(&flags, a->error_flags, 4, cudaMemcpyDeviceToHost), "reading error flags");
    CUDA_TRY(cudaMemcpy(&sat, a->saturated, 8, cudaMemcpyDeviceToHost), "reading saturations");
    CUDA_TRY(cudaMemset(a->error_flags, 0, 4), "clearing error flags");
    CUDA_TRY(cudaMemset(a->saturated, 0, 8), "clearing the saturation count");
    if (saturated) *saturated = sat;
    return epmoe_cuda_flags_status(flags, "gpu layer");
}
