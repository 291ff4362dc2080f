/* epmoe-client: calls epmoe-serve.
 *
 *   epmoe-client --server HOST:PORT --input IN.safetensors --output OUT.safetensors [--layers A:B]
 *   epmoe-client --server HOST:PORT --random-tokens T [--dtype f32|bf16|f16] [--output OUT]
 *   epmoe-client --server HOST:PORT --info | --health
 *   epmoe-client --server HOST:PORT --load --streams N --requests M [--tokens-min A]
 *                [--tokens-max B] [--dtype f32|bf16|f16]
 *
 * Files hold `hidden_states` [T, H] (F32, BF16 or F16) and optional `token_ids` [T] (I32 or
 * I64), as for epmoe-run; the output has the input's dtype. Inputs larger than the server's
 * max_request_tokens go as several requests. --load prints requests/s and p50/p99 latency.
 */
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/cli.h"
#include "common/rng.h"
#include "common/safetensors.h"
#include "common/tensor.h"
#include "coordinator/service/client.h"
#include "common/user_message.h"
#include "coordinator/service/grpc_adapter.h"

typedef struct {
    const char *server, *input, *output;
    int64_t random_tokens;
    epmoe_dtype dtype;
    int64_t layer_begin, layer_end;
    int info, health, load;
    int64_t streams, requests, tokens_min, tokens_max;
    double timeout;
    uint64_t seed;
} client_args;

static void usage(FILE *f) {
    fprintf(f,
            "usage: epmoe-client --server HOST:PORT (--input IN.safetensors | --random-tokens T)\n"
            "                    [--output OUT.safetensors] [--layers A:B] [--dtype f32|bf16|f16]\n"
            "                    [--timeout SECONDS]\n"
            "       epmoe-client --server HOST:PORT --info | --health\n"
            "       epmoe-client --server HOST:PORT --load --streams N --requests M\n"
            "                    [--tokens-min A] [--tokens-max B] [--dtype f32|bf16|f16]\n");
}

static epmoe_status parse_args(int argc, char **argv, client_args *a) {
    memset(a, 0, sizeof *a);
    a->dtype = EPMOE_DTYPE_F32;
    a->streams = 8;
    a->requests = 100;
    a->tokens_min = 1;
    a->tokens_max = 64;
    a->seed = 7;
    for (int i = 1; i < argc; i++) {
        const char *k = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (strcmp(k, "--info") == 0) a->info = 1;
        else if (strcmp(k, "--health") == 0) a->health = 1;
        else if (strcmp(k, "--load") == 0) a->load = 1;
        else if (!v) EPMOE_FAIL(EPMOE_ERR_INVALID_ARG, "unknown or incomplete argument '%s'", k);
        else if (strcmp(k, "--server") == 0) a->server = argv[++i];
        else if (strcmp(k, "--input") == 0) a->input = argv[++i];
        else if (strcmp(k, "--output") == 0) a->output = argv[++i];
        else if (strcmp(k, "--random-tokens") == 0) a->random_tokens = atoll(argv[++i]);
        else if (strcmp(k, "--streams") == 0) a->streams = atoll(argv[++i]);
        else if (strcmp(k, "--requests") == 0) a->requests = atoll(argv[++i]);
        else if (strcmp(k, "--tokens-min") == 0) a->tokens_min = atoll(argv[++i]);
        else if (strcmp(k, "--tokens-max") == 0) a->tokens_max = atoll(argv[++i]);
        else if (strcmp(k, "--timeout") == 0) a->timeout = atof(argv[++i]);
        else if (strcmp(k, "--seed") == 0) a->seed = (uint64_t)atoll(argv[++i]);
        else if (strcmp(k, "--layers") == 0) {
            long long b, e;
            EPMOE_REQUIRE(sscanf(argv[++i], "%lld:%lld", &b, &e) == 2, EPMOE_ERR_INVALID_ARG,
                          "--layers: '%s' is not A:B", argv[i]);
            a->layer_begin = b;
            a->layer_end = e;
        } else if (strcmp(k, "--dtype") == 0) {
            const char *d = argv[++i];
            if (strcmp(d, "f32") == 0) a->dtype = EPMOE_DTYPE_F32;
            else if (strcmp(d, "bf16") == 0) a->dtype = EPMOE_DTYPE_BF16;
            else if (strcmp(d, "f16") == 0) a->dtype = EPMOE_DTYPE_F16;
            else EPMOE_FAIL(EPMOE_ERR_INVALID_ARG, "--dtype '%s' is not f32, bf16 or f16", d);
        } else {
            EPMOE_FAIL(EPMOE_ERR_INVALID_ARG, "unknown argument '%s'", k);
        }
    }
    EPMOE_REQUIRE(a->server != NULL, EPMOE_ERR_INVALID_ARG, "--server HOST:PORT is required");
    EPMOE_REQUIRE(a->info || a->health || a->load || a->input || a->random_tokens > 0,
                  EPMOE_ERR_INVALID_ARG,
                  "nothing to do: give --input, --random-tokens, --info, --health or --load");
    EPMOE_REQUIRE(!a->load || (a->streams >= 1 && a->requests >= 1 && a->tokens_min >= 1 &&
                               a->tokens_max >= a->tokens_min),
                  EPMOE_ERR_INVALID_ARG,
                  "--load needs --streams >= 1, --requests >= 1, 1 <= --tokens-min <= --tokens-max");
    return EPMOE_OK;
}

/* Random hidden states as the server would see them (values survive the chosen dtype). */
static epmoe_status random_rows(epmoe_rng *rng, int64_t T, int64_t H, int64_t vocab,
                                epmoe_dtype dtype, void **rows, int32_t **ids) {
    size_t n = (size_t)(T * H);
    float *x = malloc(n * sizeof(float));
    *rows = malloc(n * epmoe_dtype_size(dtype));
    *ids = malloc((size_t)T * sizeof(int32_t));
    EPMOE_REQUIRE(x && *rows && *ids, EPMOE_ERR_OOM, "random input of %lld tokens: out of memory",
                  (long long)T);
    for (size_t i = 0; i < n; i++) x[i] = epmoe_rng_normal(rng);
    for (int64_t t = 0; t < T; t++) (*ids)[t] = (int32_t)epmoe_rng_below(rng, (uint64_t)vocab);
    epmoe_status st = epmoe_convert_from_f32(x, n, dtype, *rows);
    free(x);
    return st;
}

/* Sends rows in requests of at most max_tokens; writes the reply rows into out (same dtype). */
static epmoe_status forward_all(epmoe_rpc_channel *ch, const client_args *a, int64_t T, int64_t H,
                                epmoe_dtype dtype, const uint8_t *rows, const int32_t *ids,
                                int64_t max_tokens, uint8_t *out) {
    const size_t row_bytes = (size_t)H * epmoe_dtype_size(dtype);
    for (int64_t t = 0; t < T; t += max_tokens) {
        int64_t n = T - t < max_tokens ? T - t : max_tokens;
        char id[64];
        snprintf(id, sizeof id, "rows-%lld-%lld", (long long)t, (long long)(t + n));
        epmoe_forward_args fa = {id, n, H, dtype, rows + (size_t)t * row_bytes,
                                 ids ? ids + t : NULL, a->layer_begin, a->layer_end, a->timeout};
        epmoe_forward_reply r;
        EPMOE_TRY(epmoe_client_forward(ch, &fa, &r));
        if (r.code != EPMOE_RPC_OK) {
            epmoe_forward_reply_free(&r);
            EPMOE_FAIL(EPMOE_ERR_INVALID_ARG, "request %s: %s: %s", id,
                       epmoe_rpc_code_name(r.code), r.message);
        }
        int ok = r.n_tokens == n && r.hidden_size == H && r.dtype == dtype &&
                 strcmp(r.request_id, id) == 0;
        if (ok) memcpy(out + (size_t)t * row_bytes, r.hidden_states, (size_t)n * row_bytes);
        epmoe_forward_reply_free(&r);
        EPMOE_REQUIRE(ok, EPMOE_ERR_FORMAT, "request %s: reply shape, dtype or id mismatch", id);
    }
    return EPMOE_OK;
}

static epmoe_status run_file(epmoe_rpc_channel *ch, const client_args *a,
                             const epmoe_info_reply *info) {
    const int64_t H = info->hidden_size;
    epmoe_st_file *f = NULL;
    int64_t T = a->random_tokens;
    epmoe_dtype dtype = a->dtype;
    const uint8_t *rows = NULL;
    void *owned_rows = NULL;
    int32_t *ids = NULL;
    epmoe_status st = EPMOE_OK;
    if (a->input) {
        EPMOE_TRY(epmoe_st_open(a->input, &f));
        const epmoe_st_tensor *hs = epmoe_st_find(f, "hidden_states");
        const epmoe_st_tensor *ti = epmoe_st_find(f, "token_ids");
        if (!hs || hs->ndim != 2 || hs->shape[1] != H) {
            st = epmoe_set_error(EPMOE_ERR_FORMAT, __FILE__, __LINE__,
                                 "%s: needs hidden_states [T, %lld] (the server's hidden size)",
                                 a->input, (long long)H);
        } else if (ti && (ti->ndim != 1 || ti->shape[0] != hs->shape[0] ||
                          (ti->dtype != EPMOE_DTYPE_I32 && ti->dtype != EPMOE_DTYPE_I64))) {
            st = epmoe_set_error(EPMOE_ERR_FORMAT, __FILE__, __LINE__,
                                 "%s: token_ids must be I32 or I64 [%lld]", a->input,
                                 (long long)hs->shape[0]);
        } else {
            T = hs->shape[0];
            dtype = hs->dtype;
            rows = hs->data;
            if (ti) {
                ids = malloc((size_t)(T ? T : 1) * sizeof(int32_t));
                if (!ids) st = epmoe_set_error(EPMOE_ERR_OOM, __FILE__, __LINE__, "out of memory");
                for (int64_t t = 0; ids && t < T; t++)
                    ids[t] = ti->dtype == EPMOE_DTYPE_I32 ? ((const int32_t *)ti->data)[t]
                                                          : (int32_t)((const int64_t *)ti->data)[t];
            }
        }
    } else {
        epmoe_rng rng;
        epmoe_rng_seed(&rng, a->seed);
        st = random_rows(&rng, T, H, info->vocab_size, dtype, &owned_rows, &ids);
        rows = owned_rows;
    }
    uint8_t *out = NULL;
    if (st == EPMOE_OK) {
        out = malloc((size_t)(T * H) * epmoe_dtype_size(dtype) + 1);
        if (!out) st = epmoe_set_error(EPMOE_ERR_OOM, __FILE__, __LINE__, "out of memory");
    }
    double t0 = epmoe_seconds_now();
    if (st == EPMOE_OK)
        st = forward_all(ch, a, T, H, dtype, rows, ids, info->max_request_tokens, out);
    double seconds = epmoe_seconds_now() - t0;
    if (st == EPMOE_OK) {
        printf("epmoe-client: %lld tokens (%s) through the server in %.3f s\n", (long long)T,
               epmoe_dtype_name(dtype), seconds);
        if (a->output) {
            epmoe_st_writer *w = NULL;
            int64_t shape[2] = {T, H};
            st = epmoe_st_writer_create(&w);
            if (st == EPMOE_OK) st = epmoe_st_writer_add(w, "hidden_states", dtype, 2, shape, out);
            if (st == EPMOE_OK && ids)
                st = epmoe_st_writer_add(w, "token_ids", EPMOE_DTYPE_I32, 1, shape, ids);
            if (st == EPMOE_OK) st = epmoe_st_writer_metadata(w, "producer", "epmoe-client");
            if (st == EPMOE_OK) st = epmoe_st_writer_finish(w, a->output);
            epmoe_st_writer_free(w);
            if (st == EPMOE_OK) printf("epmoe-client: wrote %s\n", a->output);
        }
    }
    free(out);
    free(ids);
    free(owned_rows);
    if (f) epmoe_st_close(f);
    return st;
}

typedef struct {
    epmoe_rpc_channel *ch;
    const client_args *a;
    const epmoe_info_reply *info;
    int stream;
    double *latencies; /* [requests] */
    double *overheads; /* [requests]: latency - server queue - engine forward, OK replies */
    int64_t n_overheads;
    double forward_sum, queue_sum;
    int64_t codes[EPMOE_RPC_CODE_COUNT];
    int64_t tokens;
    epmoe_status st;
    char error[512];
} load_stream;

static void *load_thread(void *arg) {
    load_stream *s = arg;
    const client_args *a = s->a;
    const int64_t H = s->info->hidden_size;
    epmoe_rng rng;
    epmoe_rng_seed(&rng, a->seed * 1000003u + (uint64_t)s->stream);
    int64_t max_t = a->tokens_max < s->info->max_request_tokens ? a->tokens_max
                                                                : s->info->max_request_tokens;
    int64_t min_t = a->tokens_min < max_t ? a->tokens_min : max_t;
    void *rows = NULL;
    int32_t *ids = NULL;
    s->st = random_rows(&rng, max_t, H, s->info->vocab_size, a->dtype, &rows, &ids);
    for (int64_t i = 0; s->st == EPMOE_OK && i < a->requests; i++) {
        int64_t n = min_t + (int64_t)epmoe_rng_below(&rng, (uint64_t)(max_t - min_t + 1));
        char id[64];
        snprintf(id, sizeof id, "load-%d-%lld", s->stream, (long long)i);
        epmoe_forward_args fa = {id, n, H, a->dtype, rows, ids, a->layer_begin, a->layer_end,
                                 a->timeout};
        epmoe_forward_reply r;
        double t0 = epmoe_seconds_now();
        s->st = epmoe_client_forward(s->ch, &fa, &r);
        s->latencies[i] = epmoe_seconds_now() - t0;
        if (s->st != EPMOE_OK) {
            snprintf(s->error, sizeof s->error, "%s", epmoe_last_error_for_user());
            break;
        }
        s->codes[r.code >= 0 && r.code < EPMOE_RPC_CODE_COUNT ? r.code : EPMOE_RPC_UNKNOWN]++;
        if (r.code == EPMOE_RPC_OK) {
            s->tokens += n;
            s->overheads[s->n_overheads++] = s->latencies[i] - r.queue_seconds - r.forward_seconds;
            s->forward_sum += r.forward_seconds;
            s->queue_sum += r.queue_seconds;
        }
        epmoe_forward_reply_free(&r);
    }
    free(rows);
    free(ids);
    return NULL;
}

static int compare_double(const void *x, const void *y) {
    double a = *(const double *)x, b = *(const double *)y;
    return (a > b) - (a < b);
}

static epmoe_status run_load(epmoe_rpc_channel *ch, const client_args *a,
                             const epmoe_info_reply *info) {
    int64_t N = a->streams, M = a->requests;
    load_stream *streams = calloc((size_t)N, sizeof *streams);
    pthread_t *threads = calloc((size_t)N, sizeof *threads);
    double *lat = calloc((size_t)(N * M), sizeof(double));
    double *over = calloc((size_t)(N * M), sizeof(double));
    EPMOE_REQUIRE(streams && threads && lat && over, EPMOE_ERR_OOM, "--load: out of memory");
    double t0 = epmoe_seconds_now();
    int64_t started = 0;
    for (int64_t i = 0; i < N; i++) {
        streams[i] = (load_stream){ch, a, info, (int)i, lat + i * M, over + i * M, 0, 0, 0,
                                   {0}, 0, EPMOE_OK, ""};
        if (pthread_create(&threads[i], NULL, load_thread, &streams[i]) != 0) break;
        started++;
    }
    for (int64_t i = 0; i < started; i++) pthread_join(threads[i], NULL);
    double seconds = epmoe_seconds_now() - t0;
    int64_t codes[EPMOE_RPC_CODE_COUNT] = {0}, tokens = 0, done = 0, n_over = 0;
    double forward_sum = 0, queue_sum = 0;
    epmoe_status st = started == N ? EPMOE_OK : EPMOE_ERR_INTERNAL;
    for (int64_t i = 0; i < started; i++) {
        for (int c = 0; c < EPMOE_RPC_CODE_COUNT; c++) {
            codes[c] += streams[i].codes[c];
            done += streams[i].codes[c];
        }
        tokens += streams[i].tokens;
        for (int64_t k = 0; k < streams[i].n_overheads; k++) over[n_over++] = streams[i].overheads[k];
        forward_sum += streams[i].forward_sum;
        queue_sum += streams[i].queue_sum;
        if (streams[i].st != EPMOE_OK) {
            fprintf(stderr, "epmoe-client: stream %lld: %s\n", (long long)i, streams[i].error);
            st = streams[i].st;
        }
    }
    qsort(lat, (size_t)(N * M), sizeof(double), compare_double);
    int64_t n = N * M;
    double p50 = lat[(n - 1) / 2], p99 = lat[(int64_t)ceil(0.99 * (double)n) - 1];
    printf("epmoe-client load: %lld streams x %lld requests (%lld-%lld tokens, %s) in %.3f s\n",
           (long long)N, (long long)M, (long long)a->tokens_min, (long long)a->tokens_max,
           epmoe_dtype_name(a->dtype), seconds);
    printf("  requests/s %.1f  tokens/s %.0f  latency p50 %.3f ms  p99 %.3f ms  max %.3f ms\n",
           (double)done / seconds, (double)tokens / seconds, p50 * 1e3, p99 * 1e3,
           lat[n - 1] * 1e3);
    if (n_over > 0) {
        qsort(over, (size_t)n_over, sizeof(double), compare_double);
        printf("  server: mean queue %.3f ms, mean engine forward %.3f ms; gRPC path (latency - "
               "queue - forward) p50 %.3f ms p99 %.3f ms\n",
               queue_sum / (double)n_over * 1e3, forward_sum / (double)n_over * 1e3,
               over[(n_over - 1) / 2] * 1e3, over[(int64_t)ceil(0.99 * (double)n_over) - 1] * 1e3);
    }
    printf("  status:");
    for (int c = 0; c < EPMOE_RPC_CODE_COUNT; c++)
        if (codes[c]) printf(" %s=%lld", epmoe_rpc_code_name(c), (long long)codes[c]);
    printf("\n");
    free(streams);
    free(threads);
    free(lat);
    free(over);
    if (st == EPMOE_OK && codes[EPMOE_RPC_OK] != done)
        st = epmoe_set_error(EPMOE_ERR_INVALID_ARG, __FILE__, __LINE__,
                             "%lld of %lld requests failed", (long long)(done - codes[0]),
                             (long long)done);
    return st;
}

/* The last error without the library's source locations: this is a user's program. */
static void print_error(void) { fprintf(stderr, "epmoe-client: %s\n", epmoe_last_error_for_user()); }

int main(int argc, char **argv) {
    if (epmoe_cli_help_or_version(argc, argv, "epmoe-client", EPMOE_VERSION, usage)) return 0;
    client_args a;
    epmoe_status st = parse_args(argc, argv, &a);
    if (st != EPMOE_OK) {
        print_error();
        usage(stderr);
        return 2;
    }
    epmoe_rpc_channel *ch = NULL;
    st = epmoe_rpc_channel_open(a.server, INT32_MAX, &ch);
    epmoe_info_reply info;
    if (st == EPMOE_OK) st = epmoe_client_info(ch, a.timeout > 0 ? a.timeout : 30.0, &info);
    if (st == EPMOE_OK && info.code != EPMOE_RPC_OK)
        st = epmoe_set_error(EPMOE_ERR_IO, __FILE__, __LINE__, "Info from %s: %s: %s", a.server,
                             epmoe_rpc_code_name(info.code), info.message);
    if (st == EPMOE_OK && a.info)
        printf("preset %s\nn_ranks %d\nn_layers %lld\nn_hash_layers %lld\nhidden_size %lld\n"
               "n_routed_experts %lld\ntop_k %lld\nexperts_per_rank %lld..%lld\nvocab_size %lld\n"
               "max_request_tokens %lld\nmax_batch_tokens %lld\nmax_message_bytes %lld\n"
               "weight_bytes_per_rank %lld\nbuffer_bytes_per_rank %lld\nbackend %s\n"
               "device_name %s\ntransport %s\ndecode_tokens %lld\nlayers_loaded %lld:%lld\n",
               info.preset, info.n_ranks, (long long)info.n_layers, (long long)info.n_hash_layers,
               (long long)info.hidden_size, (long long)info.n_routed_experts,
               (long long)info.top_k, (long long)info.experts_per_rank_min,
               (long long)info.experts_per_rank_max, (long long)info.vocab_size,
               (long long)info.max_request_tokens, (long long)info.max_batch_tokens,
               (long long)info.max_message_bytes, (long long)info.weight_bytes_per_rank,
               (long long)info.buffer_bytes_per_rank, info.backend, info.device_name,
               info.transport, (long long)info.decode_tokens, (long long)info.layer_begin,
               (long long)info.layer_end);
    if (st == EPMOE_OK && a.health) {
        int code = 0, serving = 0;
        st = epmoe_client_health(ch, "", 10.0, &code, &serving);
        if (st == EPMOE_OK)
            printf("health: %s %s\n", epmoe_rpc_code_name(code),
                   serving == 1 ? "SERVING" : serving == 2 ? "NOT_SERVING" : "UNKNOWN");
    }
    if (st == EPMOE_OK && (a.input || a.random_tokens > 0)) st = run_file(ch, &a, &info);
    if (st == EPMOE_OK && a.load) st = run_load(ch, &a, &info);
    epmoe_rpc_channel_close(ch);
    if (st != EPMOE_OK) {
        print_error();
        return 1;
    }
    return 0;
}
