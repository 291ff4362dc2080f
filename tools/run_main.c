/* epmoe-run: the batch job.
 *
 *   mpirun -np N epmoe-run --checkpoint CKPT --input IN.safetensors --output OUT.safetensors
 *                          [--layers A:B] [--quiet] [runtime settings...] [--print-config]
 *
 * IN holds `hidden_states` [T, H] (F32, BF16 or F16) and, for hash-routed layers, `token_ids`
 * [T] (I32 or I64). OUT gets `hidden_states` in the input's dtype (an F16 output that overflows
 * F16 is an error naming the element) and the token ids, rows in input order. Layers run in
 * sequence, each layer's output feeding the next. Rank 0 checks the arguments, the output path
 * and the input before any rank loads weights; every rank exits non-zero on any error.
 *
 * A lost peer: the watchdog (collective_timeout_s) ends a wait that a dead or stopped rank never
 * completes; the rank that sees it then asks every other rank whether it is alive (a responder
 * thread answers on each rank, whatever its main thread is doing) and names the ranks that did
 * not answer, before ending the job. When the launcher itself ends the job because a rank died
 * (Open MPI does within about a second), the surviving ranks say what they were running.
 */
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <mpi.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "common/cli.h"
#include "common/config.h"
#include "common/paths.h"
#include "common/user_message.h"
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
            "usage: mpirun -np N epmoe-run --checkpoint CKPT --input IN.safetensors\n"
            "                              --output OUT.safetensors [--layers A:B] [--quiet]\n"
            "                              [--RUNTIME_SETTING VALUE ...] [--print-config]\n"
            "       epmoe-run --print-config [--checkpoint CKPT] [--RUNTIME_SETTING VALUE ...]\n"
            "       epmoe-run -h | --help | --version\n"
            "  --checkpoint CKPT  a checkpoint directory (epmoe-gen --out); its metadata fixes the\n"
            "                     model settings, which the command line may not change\n"
            "  --input FILE       safetensors: hidden_states [T, H] F32|BF16|F16, token_ids [T]\n"
            "                     I32|I64 (needed when a hash-routed layer is in range)\n"
            "  --output FILE      safetensors, written at the end (a regular file or a new name;\n"
            "                     never a device node, symlink or directory); checked first\n"
            "  --layers A:B       run layers A..B-1 (default: all)\n"
            "  --quiet            no progress lines\n"
            "  --print-config     print the effective settings and exit (no job runs)\n"
            "  runtime settings (--name value or --name=value; dashes or underscores):\n");
    int n = 0;
    const epmoe_cfg_entry *t = epmoe_config_table(&n);
    for (int i = 0; i < n; i++)
        if (t[i].scope == EPMOE_CFG_RUNTIME) fprintf(f, "    --%s\n", t[i].name);
    fprintf(f, "  Under Slurm: srun --mpi=pmix epmoe-run ... (deploy/slurm/batch.sbatch).\n");
}

/* "A:B", two non-negative decimal integers and nothing else. */
static epmoe_status parse_layers(const char *text, int64_t *begin, int64_t *end) {
    const char *p = text;
    int64_t v[2] = {0, 0};
    for (int part = 0; part < 2; part++) {
        EPMOE_REQUIRE(*p >= '0' && *p <= '9', EPMOE_ERR_INVALID_ARG,
                      "--layers '%s' is not A:B (two integers, 0 <= A < B)", text);
        while (*p >= '0' && *p <= '9') {
            EPMOE_REQUIRE(v[part] <= (INT64_MAX - 9) / 10, EPMOE_ERR_INVALID_ARG,
                          "--layers '%s': number too large", text);
            v[part] = v[part] * 10 + (*p++ - '0');
        }
        if (part == 0) {
            EPMOE_REQUIRE(*p == ':', EPMOE_ERR_INVALID_ARG,
                          "--layers '%s' is not A:B (two integers, 0 <= A < B)", text);
            p++;
        }
    }
    EPMOE_REQUIRE(*p == '\0', EPMOE_ERR_INVALID_ARG,
                  "--layers '%s': unexpected '%s' after A:B", text, p);
    *begin = v[0];
    *end = v[1];
    return EPMOE_OK;
}

/* Model settings come from the checkpoint's metadata, which replaces them: one given on the
 * command line would be silently ignored, so it is refused. */
static epmoe_status refuse_model_settings(int argc, char **argv) {
    int n = 0;
    const epmoe_cfg_entry *t = epmoe_config_table(&n);
    for (int i = 1; i < argc; i++) {
        if (strncmp(argv[i], "--", 2) != 0) continue;
        char name[64];
        size_t len = strcspn(argv[i] + 2, "=");
        if (len >= sizeof name) continue;
        memcpy(name, argv[i] + 2, len);
        name[len] = '\0';
        for (char *c = name; *c; c++)
            if (*c == '-') *c = '_';
        for (int j = 0; j < n; j++)
            EPMOE_REQUIRE(!(t[j].scope == EPMOE_CFG_MODEL && strcmp(t[j].name, name) == 0),
                          EPMOE_ERR_INVALID_ARG,
                          "%s: '%s' is a model setting: the checkpoint's metadata sets it (see "
                          "epmoe-run --print-config --checkpoint CKPT); only runtime settings "
                          "may be given",
                          argv[i], name);
    }
    return EPMOE_OK;
}

static epmoe_status parse_args(int argc, char **argv, int print_config, run_args *a) {
    memset(a, 0, sizeof *a);
    a->layer_end = -1;
    for (int i = 1; i < argc; i++) {
        const char *arg = argv[i];
        const char *val = i + 1 < argc ? argv[i + 1] : NULL;
        if (strcmp(arg, "--checkpoint") == 0 && val) a->checkpoint = argv[++i];
        else if (strcmp(arg, "--input") == 0 && val) a->input = argv[++i];
        else if (strcmp(arg, "--output") == 0 && val) a->output = argv[++i];
        else if (strcmp(arg, "--quiet") == 0) a->quiet = 1;
        else if (strcmp(arg, "--layers") == 0 && val)
            EPMOE_TRY(parse_layers(argv[++i], &a->layer_begin, &a->layer_end));
        else
            EPMOE_FAIL(EPMOE_ERR_INVALID_ARG, "unknown or incomplete argument '%s'", arg);
    }
    if (print_config) return EPMOE_OK; /* prints and exits: no job, nothing else needed */
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

/* Bytes the output file will take: the tensors plus a generous bound on the JSON header. */
static uint64_t output_bytes(const run_input *in, int64_t H) {
    uint64_t rows = (uint64_t)in->T * (uint64_t)H * epmoe_dtype_size(in->dtype);
    return rows + (in->token_ids ? (uint64_t)in->T * sizeof(int32_t) : 0) + 4096;
}

/* hidden_states and token_ids as they came, plus expert_counts [layers, E] (I64): how many of
 * the tokens each expert received in each layer of the range (routing, visible to the user). */
static epmoe_status write_output(const char *path, const run_input *in, const void *y,
                                 int64_t H, const int64_t *counts, int64_t n_layers, int64_t E) {
    /* again: the path may have changed while the job ran (a symlink or device put there) */
    EPMOE_TRY(epmoe_check_output_file(path, output_bytes(in, H) + (uint64_t)(n_layers * E) * 8));
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

static epmoe_status read_checkpoint_settings(const char *checkpoint, epmoe_config *cfg) {
    epmoe_st_set *ckpt = NULL;
    EPMOE_TRY(epmoe_st_set_open(checkpoint, &ckpt));
    epmoe_status st = epmoe_config_from_checkpoint(ckpt, cfg);
    epmoe_st_set_close(ckpt);
    return st;
}

/* Root: check arguments, output path, checkpoint settings and input before anyone loads
 * weights. */
static epmoe_status prepare_root(const run_args *a, epmoe_config *cfg, int n_ranks,
                                 run_input *in) {
    EPMOE_TRY(epmoe_check_output_file(a->output, 0)); /* before reading anything big */
    EPMOE_TRY(read_checkpoint_settings(a->checkpoint, cfg));
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
    return epmoe_check_output_file(a->output, output_bytes(in, cfg->hidden_size));
}

/* ---- what this rank is doing, for a signal from the launcher ---------------------------------
 * When a rank dies, Open MPI ends the others (SIGTERM, then SIGKILL a second later) before
 * their watchdog can see anything; its own message names the rank that died. Each rank then
 * says what it was running. The note is written by the main thread into one of two buffers and
 * published by index, so the handler never reads a half-written one. */
static char activity[2][256];
static volatile sig_atomic_t activity_current = 0;

static void set_activity(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void set_activity(const char *fmt, ...) {
    int next = !activity_current;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(activity[next], sizeof activity[next], fmt, ap);
    va_end(ap);
    activity_current = next;
}

static void on_termination(int sig) {
    static const char head[] = "epmoe-run: ";
    const char *note = activity[activity_current];
    const char *what = sig == SIGTERM ? ": ended by SIGTERM from the launcher (Open MPI ends "
                                        "every rank when one dies or aborts: its message and "
                                        "the lines above name which); no output written\n"
                                      : ": interrupted (SIGINT); no output written\n";
    ssize_t ignored = write(STDERR_FILENO, head, sizeof head - 1);
    ignored = write(STDERR_FILENO, note, strlen(note));
    ignored = write(STDERR_FILENO, what, strlen(what));
    (void)ignored;
    signal(sig, SIG_DFL);
    raise(sig);
}

/* ---- liveness: which ranks still answer ------------------------------------------------------
 * The watchdog can name a silent peer only for point-to-point waits; a collective (the
 * agreement after every step) cannot tell who did not arrive. So every rank runs a responder
 * thread that answers pings on its own communicator whatever the main thread is doing
 * (computing, or waiting for the lost peer); after a lost peer a rank pings every other one and
 * names those that do not answer within LIVENESS_GRACE_S: killed, or stopped (SIGSTOP, a hung
 * node). A live rank's thread answers within milliseconds; the grace is for a loaded host. */
#define TAG_PING 7001
#define TAG_PONG 7002
#define LIVENESS_GRACE_S 3.0
#define RESPONDER_NAP_NS (20 * 1000 * 1000) /* 20 ms between polls: no core held */

static MPI_Comm liveness_comm = MPI_COMM_NULL;
static pthread_t responder;
static atomic_int responder_stop;

static void *respond_to_pings(void *unused) {
    (void)unused;
    int token = 0;
    MPI_Request req;
    MPI_Irecv(&token, 1, MPI_INT, MPI_ANY_SOURCE, TAG_PING, liveness_comm, &req);
    while (!atomic_load(&responder_stop)) {
        int done = 0;
        MPI_Status status;
        MPI_Test(&req, &done, &status);
        if (done) {
            static int pong = 1;
            MPI_Request sent; /* a tiny eager send; never waited on (the pinger may be gone) */
            MPI_Isend(&pong, 1, MPI_INT, status.MPI_SOURCE, TAG_PONG, liveness_comm, &sent);
            MPI_Request_free(&sent);
            MPI_Irecv(&token, 1, MPI_INT, MPI_ANY_SOURCE, TAG_PING, liveness_comm, &req);
            continue;
        }
        struct timespec nap = {0, RESPONDER_NAP_NS};
        nanosleep(&nap, NULL);
    }
    MPI_Cancel(&req);
    MPI_Wait(&req, MPI_STATUS_IGNORE);
    return NULL;
}

/* Collective: starts the responder when MPI allows threads to call it. */
static void liveness_start(int thread_level) {
    if (thread_level < MPI_THREAD_MULTIPLE) return;
    if (MPI_Comm_dup(MPI_COMM_WORLD, &liveness_comm) != MPI_SUCCESS) return;
    if (pthread_create(&responder, NULL, respond_to_pings, NULL) != 0) {
        MPI_Comm_free(&liveness_comm);
        liveness_comm = MPI_COMM_NULL;
    }
}

static void liveness_stop(void) {
    if (liveness_comm == MPI_COMM_NULL) return;
    atomic_store(&responder_stop, 1);
    pthread_join(responder, NULL);
    MPI_Comm_free(&liveness_comm);
}

/* After a lost peer: pings every other rank and prints which did not answer. */
static void report_silent_ranks(int rank, int n_ranks) {
    if (liveness_comm == MPI_COMM_NULL) {
        fprintf(stderr, "epmoe-run: rank %d: cannot ask which ranks are alive (MPI without "
                        "thread support)\n", rank);
        return;
    }
    MPI_Request *req = calloc((size_t)n_ranks, sizeof *req);
    int *answer = calloc((size_t)n_ranks, sizeof *answer);
    if (!req || !answer) {
        free(req);
        free(answer);
        return;
    }
    static int ping = 1;
    for (int r = 0; r < n_ranks; r++) {
        req[r] = MPI_REQUEST_NULL;
        if (r == rank) continue;
        MPI_Request sent;
        MPI_Isend(&ping, 1, MPI_INT, r, TAG_PING, liveness_comm, &sent);
        MPI_Request_free(&sent);
        MPI_Irecv(&answer[r], 1, MPI_INT, r, TAG_PONG, liveness_comm, &req[r]);
    }
    struct timespec t0, now;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    int missing = n_ranks - 1;
    for (;;) {
        missing = 0;
        for (int r = 0; r < n_ranks; r++) {
            if (r == rank || answer[r]) continue;
            int done = 0;
            MPI_Test(&req[r], &done, MPI_STATUS_IGNORE);
            if (!done) missing++;
        }
        clock_gettime(CLOCK_MONOTONIC, &now);
        double waited = (double)(now.tv_sec - t0.tv_sec) + 1e-9 * (double)(now.tv_nsec - t0.tv_nsec);
        if (missing == 0 || waited > LIVENESS_GRACE_S) break;
        struct timespec nap = {0, 10 * 1000 * 1000};
        nanosleep(&nap, NULL);
    }
    char silent[512] = "", alive[512] = "";
    for (int r = 0; r < n_ranks; r++) {
        if (r == rank) continue;
        char *list = answer[r] ? alive : silent;
        size_t used = strlen(list);
        if (used + 16 < sizeof silent)
            snprintf(list + used, sizeof silent - used, "%s%d", used ? ", " : "", r);
    }
    if (missing)
        fprintf(stderr,
                "epmoe-run: rank %d: lost peer: rank %s did not answer within %.0f s (dead or "
                "hung)%s%s\n",
                rank, silent, LIVENESS_GRACE_S, alive[0] ? "; alive: rank " : "", alive);
    else
        fprintf(stderr, "epmoe-run: rank %d: every other rank still answers (%s): a transport "
                        "failure, not a lost rank\n", rank, alive);
    fflush(stderr);
    /* the requests are abandoned: the job ends with MPI_Abort right after */
}

/* ---- main ------------------------------------------------------------------------------------ */


/* Followers (and a root that lost a peer): say what was lost, then end the whole job: the other
 * ranks may be waiting for the lost one and cannot be released. */
static void end_job_after(epmoe_status st, int rank, int n_ranks) {
    fprintf(stderr, "epmoe-run: rank %d: %s: %s\n", rank, epmoe_status_name(st), epmoe_last_error_for_user());
    fflush(stderr);
    if (st == EPMOE_ERR_PEER_LOST) report_silent_ranks(rank, n_ranks);
    MPI_Abort(MPI_COMM_WORLD, 1);
}

int main(int argc, char **argv) {
    /* before MPI: --help and --version need no launcher */
    if (epmoe_cli_help_or_version(argc, argv, "epmoe-run", EPMOE_VERSION, usage)) return 0;
    int thread_level = MPI_THREAD_SINGLE;
    MPI_Init_thread(&argc, &argv, MPI_THREAD_MULTIPLE, &thread_level);
    int rank = 0, n_ranks = 1;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &n_ranks);

    epmoe_config cfg;
    epmoe_config_defaults(&cfg);
    int print_config = 0;
    run_args a;
    run_input in = {0, EPMOE_DTYPE_F32, NULL, NULL};
    epmoe_status st = refuse_model_settings(argc, argv);
    if (st == EPMOE_OK) st = epmoe_config_parse_args(&cfg, &argc, argv, &print_config);
    if (st == EPMOE_OK) st = parse_args(argc, argv, print_config, &a);
    if (st == EPMOE_OK && print_config) {
        /* print the effective settings and exit: the checkpoint's model settings when one is
         * given, else the defaults (a checkpoint replaces them) */
        if (rank == 0 && a.checkpoint) st = read_checkpoint_settings(a.checkpoint, &cfg);
        if (rank == 0 && st == EPMOE_OK) {
            if (!a.checkpoint)
                printf("# no --checkpoint: the model settings shown are defaults; a checkpoint's "
                       "metadata replaces them\n");
            epmoe_config_print(&cfg, stdout);
        }
        if (rank == 0 && st != EPMOE_OK) fprintf(stderr, "epmoe-run: %s\n", epmoe_last_error_for_user());
        MPI_Finalize();
        return st == EPMOE_OK ? 0 : 2;
    }
    if (st == EPMOE_OK && rank == 0) st = prepare_root(&a, &cfg, n_ranks, &in);
    int ok = st == EPMOE_OK;
    MPI_Bcast(&ok, 1, MPI_INT, 0, MPI_COMM_WORLD);
    if (!ok) {
        if (rank == 0) {
            fprintf(stderr, "epmoe-run: %s\n", epmoe_last_error_for_user());
            fprintf(stderr, "(epmoe-run --help for usage)\n");
        }
        MPI_Finalize();
        return 2;
    }

    liveness_start(thread_level);
    set_activity("rank %d: loading the checkpoint %s", rank, a.checkpoint);
    signal(SIGTERM, on_termination);
    signal(SIGINT, on_termination);

    epmoe_driver *d = NULL;
    double t_load = MPI_Wtime();
    st = epmoe_driver_create(&cfg, a.checkpoint, MPI_COMM_WORLD, a.layer_begin, a.layer_end, &d);
    if (st != EPMOE_OK) {
        fprintf(stderr, "epmoe-run: rank %d: %s\n", rank, epmoe_last_error_for_user());
        liveness_stop();
        MPI_Finalize();
        return 1;
    }
    t_load = MPI_Wtime() - t_load;
    if (rank != 0) {
        epmoe_driver_info finfo;
        epmoe_driver_get_info(d, &finfo);
        set_activity("rank %d: serving the root's forwards of layers [%lld, %lld)", rank,
                     (long long)finfo.layer_begin, (long long)finfo.layer_end);
        st = epmoe_driver_follow(d);
        if (st != EPMOE_OK) end_job_after(st, rank, n_ranks); /* the root may be gone or waiting */
        epmoe_driver_destroy(d);
        liveness_stop();
        MPI_Finalize();
        return 0;
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
        set_activity("rank 0: running batch rows [%lld, %lld) of %lld through layers [%lld, %lld)",
                     (long long)t, (long long)(t + n), (long long)in.T, (long long)begin,
                     (long long)end);
        st = epmoe_driver_forward(d, (const char *)in.x + (size_t)t * row_bytes, in.dtype,
                                  in.token_ids ? in.token_ids + t : NULL, n, begin, end,
                                  y + (size_t)t * row_bytes, &times, chunk_counts);
        for (int64_t i = 0; st == EPMOE_OK && i < (end - begin) * E; i++) counts[i] += chunk_counts[i];
        double now = MPI_Wtime();
        if (st == EPMOE_OK && !a.quiet && (now - last_report > 2.0 || t + n >= in.T) && in.T > 0) {
            fprintf(stderr, "epmoe-run: %lld/%lld tokens through %lld layers, %.0f tokens/s\n",
                    (long long)(t + n), (long long)in.T, (long long)(end - begin),
                    (double)(t + n) / (now - t0));
            last_report = now;
        }
        if (in.T == 0) break;
    }
    double elapsed = MPI_Wtime() - t0;
    if (st == EPMOE_ERR_PEER_LOST) end_job_after(st, rank, n_ranks);
    set_activity("rank 0: writing %s", a.output);
    int exit_code = 0;
    if (st == EPMOE_OK) st = write_output(a.output, &in, y, H, counts, end - begin, E);
    if (st != EPMOE_OK) {
        fprintf(stderr, "epmoe-run: %s: %s\n", epmoe_status_name(st), epmoe_last_error_for_user());
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
    epmoe_status st2 = epmoe_driver_shutdown(d);
    if (st2 != EPMOE_OK && exit_code == 0) {
        fprintf(stderr, "epmoe-run: %s\n", epmoe_last_error_for_user());
        exit_code = 1;
    }
    epmoe_driver_destroy(d);
    free(y);
    free(counts);
    free(chunk_counts);
    free(in.x);
    free(in.token_ids);
    liveness_stop();
    MPI_Finalize();
    return exit_code;
}
