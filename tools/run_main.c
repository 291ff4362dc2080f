/* epmoe-run: the batch job.
 *
 *   mpirun -np N epmoe-run --checkpoint CKPT --input IN.safetensors --output OUT.safetensors
 *                          [--layers A:B] [--quiet] [settings...] [--print-config]
 *
 * IN holds `hidden_states` [T, H] (F32, BF16 or F16) and, for hash-routed layers, `token_ids`
 * [T] (I32 or I64). OUT gets `hidden_states` in the input's dtype (F32 for F16 input is not
 * done: F16 comes back as F16) and the token ids, rows in input order. Layers run in sequence,
 * each layer's output feeding the next. Rank 0 reads and checks the input before any rank
 * works; every rank exits non-zero on any error.
 */
#include <inttypes.h>
#include <math.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/config.h"
#include "common/safetensors.h"
#include "coordinator/engine/driver.h"
#include "worker/expert_weights.h"

typedef struct {
    const char *checkpoint, *input, *output;
    int64_t layer_begin, layer_end; /* end -1 = all */
    int quiet;
} run_args;

static void usage(FILE *f) {
    fprintf(f,
            "usage: mpirun -np N epmoe-run --checkpoint CKPT --input IN.safetensors --output "
            "OUT.safetensors [--layers A:B] [--quiet] [--print-config] [--<setting> value]\n");
}

static epmoe_status parse_args(int argc, char **argv, run_args *a) {
    memset(a, 0, sizeof *a);
    a->layer_end = -1;
    for (int i = 1; i < argc; i++) {
        const char *arg = argv[i];
        const char *val = i + 1 < argc ? argv[i + 1] : NULL;
        if (strcmp(arg, "--checkpoint") == 0 && val) a->checkpoint = argv[++i];
        else if (strcmp(arg, "--input") == 0 && val) a->input = argv[++i];
        else if (strcmp(arg, "--output") == 0 && val) a->output = argv[++i];
        else if (strcmp(arg, "--quiet") == 0) a->quiet = 1;
        else if (strcmp(arg, "--layers") == 0 && val) {
            long long b = 0, e = 0;
            EPMOE_REQUIRE(sscanf(argv[++i], "%lld:%lld", &b, &e) == 2, EPMOE_ERR_INVALID_ARG,
                          "--layers: '%s' is not A:B", argv[i]);
            a->layer_begin = b;
            a->layer_end = e;
        } else {
            EPMOE_FAIL(EPMOE_ERR_INVALID_ARG, "unknown or incomplete argument '%s'", arg);
        }
    }
    EPMOE_REQUIRE(a->checkpoint && a->input && a->output, EPMOE_ERR_INVALID_ARG,
                  "--checkpoint, --input and --output are required");
    return EPMOE_OK;
}

typedef struct {
    int64_t T;
    epmoe_dtype dtype; /* of x and of the output */
    void *x;           /* [T, H] as read: the backend converts (on the device for cuda) */
    int32_t *token_ids;
} run_input;

/* Root: read and check the input against the checkpoint's model settings. */
static epmoe_status read_input(const char *path, const epmoe_config *cfg, run_input *in) {
    epmoe_st_file *f = NULL;
    EPMOE_TRY(epmoe_st_open(path, &f));
    epmoe_status st = EPMOE_OK;
    const epmoe_st_tensor *hs = epmoe_st_find(f, "hidden_states");
    const epmoe_st_tensor *ids = epmoe_st_find(f, "token_ids");
    if (!hs) {
        st = epmoe_set_error(EPMOE_ERR_FORMAT, __FILE__, __LINE__,
                             "%s: no tensor 'hidden_states'", path);
    } else if (hs->ndim != 2 || hs->shape[1] != cfg->hidden_size) {
        st = epmoe_set_error(EPMOE_ERR_FORMAT, __FILE__, __LINE__,
                             "%s: hidden_states has %d dims with last dim %lld; expected [T, %lld] "
                             "(the checkpoint's hidden_size)",
                             path, hs->ndim, hs->ndim > 0 ? (long long)hs->shape[hs->ndim - 1] : 0LL,
                             (long long)cfg->hidden_size);
    } else if (hs->dtype != EPMOE_DTYPE_F32 && hs->dtype != EPMOE_DTYPE_BF16 &&
               hs->dtype != EPMOE_DTYPE_F16) {
        st = epmoe_set_error(EPMOE_ERR_FORMAT, __FILE__, __LINE__,
                             "%s: hidden_states dtype %s; expected F32, BF16 or F16", path,
                             epmoe_dtype_name(hs->dtype));
    } else if (ids && (ids->ndim != 1 || ids->shape[0] != hs->shape[0] ||
                       (ids->dtype != EPMOE_DTYPE_I32 && ids->dtype != EPMOE_DTYPE_I64))) {
        st = epmoe_set_error(EPMOE_ERR_FORMAT, __FILE__, __LINE__,
                             "%s: token_ids must be I32 or I64 of shape [%lld]", path,
                             (long long)hs->shape[0]);
    }
    if (st == EPMOE_OK) {
        in->T = hs->shape[0];
        in->dtype = hs->dtype;
        size_t bytes = (size_t)(in->T * cfg->hidden_size) * epmoe_dtype_size(hs->dtype);
        in->x = malloc(bytes ? bytes : 1);
        in->token_ids = ids ? malloc((size_t)(in->T ? in->T : 1) * sizeof(int32_t)) : NULL;
        if (!in->x || (ids && !in->token_ids))
            st = epmoe_set_error(EPMOE_ERR_OOM, __FILE__, __LINE__, "input: out of memory");
        else
            memcpy(in->x, hs->data, bytes);
    }
    if (st == EPMOE_OK && ids) {
        for (int64_t t = 0; t < in->T; t++) {
            int64_t v = ids->dtype == EPMOE_DTYPE_I32 ? ((const int32_t *)ids->data)[t]
                                                      : ((const int64_t *)ids->data)[t];
            if (v < 0 || v >= cfg->vocab_size) {
                st = epmoe_set_error(EPMOE_ERR_RANGE, __FILE__, __LINE__,
                                     "%s: token_ids[%lld] = %lld outside the vocabulary [0, %lld)",
                                     path, (long long)t, (long long)v, (long long)cfg->vocab_size);
                break;
            }
            in->token_ids[t] = (int32_t)v;
        }
    }
    epmoe_st_close(f);
    return st;
}

/* hidden_states and token_ids as they came, plus expert_counts [layers, E] (I64): how many of
 * the tokens each expert received in each layer of the range (routing, visible to the user). */
static epmoe_status write_output(const char *path, const run_input *in, const void *y,
                                 int64_t H, const int64_t *counts, int64_t n_layers, int64_t E) {
    epmoe_st_writer *w = NULL;
    epmoe_status st = epmoe_st_writer_create(&w);
    int64_t shape[2] = {in->T, H};
    if (st == EPMOE_OK) st = epmoe_st_writer_add(w, "hidden_states", in->dtype, 2, shape, y);
    if (st == EPMOE_OK && in->token_ids)
        st = epmoe_st_writer_add(w, "token_ids", EPMOE_DTYPE_I32, 1, shape, in->token_ids);
    int64_t counts_shape[2] = {n_layers, E};
    if (st == EPMOE_OK)
        st = epmoe_st_writer_add(w, "expert_counts", EPMOE_DTYPE_I64, 2, counts_shape, counts);
    if (st == EPMOE_OK) st = epmoe_st_writer_metadata(w, "producer", "epmoe-run");
    if (st == EPMOE_OK) st = epmoe_st_writer_finish(w, path);
    epmoe_st_writer_free(w);
    return st;
}

/* Root: check arguments, checkpoint settings and input before anyone loads weights. */
static epmoe_status prepare_root(const run_args *a, epmoe_config *cfg, int n_ranks,
                                 run_input *in) {
    epmoe_st_set *ckpt = NULL;
    EPMOE_TRY(epmoe_st_set_open(a->checkpoint, &ckpt));
    epmoe_status st = epmoe_config_from_checkpoint(ckpt, cfg);
    epmoe_st_set_close(ckpt);
    EPMOE_TRY(st);
    EPMOE_REQUIRE(n_ranks <= cfg->n_routed_experts, EPMOE_ERR_INVALID_ARG,
                  "%d ranks for %lld routed experts: use at most %lld ranks", n_ranks,
                  (long long)cfg->n_routed_experts, (long long)cfg->n_routed_experts);
    int64_t end = a->layer_end < 0 ? cfg->n_layers : a->layer_end;
    EPMOE_REQUIRE(a->layer_begin >= 0 && a->layer_begin < end && end <= cfg->n_layers,
                  EPMOE_ERR_INVALID_ARG, "--layers %lld:%lld outside the checkpoint's %lld layers",
                  (long long)a->layer_begin, (long long)end, (long long)cfg->n_layers);
    EPMOE_TRY(read_input(a->input, cfg, in));
    if (a->layer_begin < cfg->n_hash_layers)
        EPMOE_REQUIRE(in->token_ids != NULL || in->T == 0, EPMOE_ERR_INVALID_ARG,
                      "%s: no token_ids, but layer %lld is hash-routed (the first %lld layers are)",
                      a->input, (long long)a->layer_begin, (long long)cfg->n_hash_layers);
    return EPMOE_OK;
}

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    int rank = 0, n_ranks = 1;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &n_ranks);

    epmoe_config cfg;
    epmoe_config_defaults(&cfg);
    int print_config = 0;
    run_args a;
    run_input in = {0, EPMOE_DTYPE_F32, NULL, NULL};
    epmoe_status st = epmoe_config_parse_args(&cfg, &argc, argv, &print_config);
    if (st == EPMOE_OK) st = parse_args(argc, argv, &a);
    if (st == EPMOE_OK && rank == 0) st = prepare_root(&a, &cfg, n_ranks, &in);
    int ok = st == EPMOE_OK;
    MPI_Bcast(&ok, 1, MPI_INT, 0, MPI_COMM_WORLD);
    if (!ok) {
        if (rank == 0) {
            fprintf(stderr, "epmoe-run: %s\n", epmoe_last_error());
            usage(stderr);
        }
        MPI_Finalize();
        return 2;
    }
    if (print_config && rank == 0) epmoe_config_print(&cfg, stdout);

    epmoe_driver *d = NULL;
    double t_load = MPI_Wtime();
    st = epmoe_driver_create(&cfg, a.checkpoint, MPI_COMM_WORLD, a.layer_begin, a.layer_end, &d);
    if (st != EPMOE_OK) {
        fprintf(stderr, "epmoe-run: rank %d: %s\n", rank, epmoe_last_error());
        MPI_Finalize();
        return 1;
    }
    t_load = MPI_Wtime() - t_load;
    if (rank != 0) {
        st = epmoe_driver_follow(d);
        if (st != EPMOE_OK) fprintf(stderr, "epmoe-run: rank %d: %s\n", rank, epmoe_last_error());
        if (st != EPMOE_OK) MPI_Abort(MPI_COMM_WORLD, 1); /* the root may be gone or waiting */
        epmoe_driver_destroy(d);
        MPI_Finalize();
        return st == EPMOE_OK ? 0 : 1;
    }

    const epmoe_config *mc = epmoe_driver_config(d);
    epmoe_driver_info info;
    epmoe_driver_get_info(d, &info);
    const int64_t H = mc->hidden_size, E = mc->n_routed_experts;
    const int64_t begin = a.layer_begin, end = a.layer_end < 0 ? mc->n_layers : a.layer_end;
    const int64_t chunk = info.max_tokens_per_forward;
    const size_t row_bytes = (size_t)H * epmoe_dtype_size(in.dtype);
    char *y = malloc((size_t)in.T * row_bytes + 1);
    int64_t *counts = calloc((size_t)((end - begin) * E), sizeof(int64_t));
    int64_t *chunk_counts = calloc((size_t)((end - begin) * E), sizeof(int64_t));
    epmoe_stage_times times = {0};
    double t0 = MPI_Wtime(), last_report = t0;
    for (int64_t t = 0; st == EPMOE_OK && (t < in.T || (in.T == 0 && t == 0)); t += chunk) {
        int64_t n = in.T - t < chunk ? in.T - t : chunk;
        st = epmoe_driver_forward(d, (const char *)in.x + (size_t)t * row_bytes, in.dtype,
                                  in.token_ids ? in.token_ids + t : NULL, n, begin, end,
                                  y + (size_t)t * row_bytes, &times, chunk_counts);
        for (int64_t i = 0; st == EPMOE_OK && i < (end - begin) * E; i++) counts[i] += chunk_counts[i];
        double now = MPI_Wtime();
        if (!a.quiet && (now - last_report > 2.0 || t + n >= in.T) && in.T > 0) {
            fprintf(stderr, "epmoe-run: %lld/%lld tokens through %lld layers, %.0f tokens/s\n",
                    (long long)(t + n), (long long)in.T, (long long)(end - begin),
                    (double)(t + n) / (now - t0));
            last_report = now;
        }
        if (in.T == 0) break;
    }
    double elapsed = MPI_Wtime() - t0;
    int exit_code = 0;
    if (st == EPMOE_OK) st = write_output(a.output, &in, y, H, counts, end - begin, E);
    if (st != EPMOE_OK) {
        fprintf(stderr, "epmoe-run: %s: %s\n", epmoe_status_name(st), epmoe_last_error());
        exit_code = 1;
    } else {
        int64_t hit = 0, max_load = 0;
        for (int64_t i = 0; i < (end - begin) * E; i++) {
            if (counts[i] > 0) hit++;
            if (counts[i] > max_load) max_load = counts[i];
        }
        printf("epmoe-run: %lld tokens x layers [%lld, %lld) of %s on %d ranks, backend %s "
               "(%s) (%lld experts, top-%lld)\n",
               (long long)in.T, (long long)begin, (long long)end, mc->preset, n_ranks,
               info.backend.name, info.backend.device_name, (long long)E, (long long)mc->top_k);
        printf("  experts hit: %lld of %lld (expert, layer) pairs; busiest expert got %lld tokens\n",
               (long long)hit, (long long)((end - begin) * E), (long long)max_load);
        printf("  time: load %.3f s, forward %.3f s (%.0f tokens/s); rank 0 stages: route %.3f, "
               "dispatch %.3f, experts %.3f, combine %.3f, shared %.3f s\n",
               t_load, elapsed, elapsed > 0 ? (double)in.T / elapsed : 0.0, times.route,
               times.dispatch, times.experts, times.combine, times.shared);
        printf("  output: %s\n", a.output);
    }
    if (st == EPMOE_ERR_PEER_LOST) /* the followers cannot be released: end the whole job */
        MPI_Abort(MPI_COMM_WORLD, 1);
    epmoe_status st2 = epmoe_driver_shutdown(d);
    if (st2 != EPMOE_OK && exit_code == 0) {
        fprintf(stderr, "epmoe-run: %s\n", epmoe_last_error());
        exit_code = 1;
    }
    epmoe_driver_destroy(d);
    free(y);
    free(counts);
    free(chunk_counts);
    free(in.x);
    free(in.token_ids);
    MPI_Finalize();
    return exit_code;
}
