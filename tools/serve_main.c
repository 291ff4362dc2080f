/* epmoe-serve: the long-running service (docs/design.md §4.6).
 *
 *   mpirun -np N epmoe-serve --checkpoint CKPT [--listen 127.0.0.1:50051]
 *        [--metrics-listen 127.0.0.1:9464] [--max-batch-tokens T] [--max-queue-delay-us U]
 *        [--max-queue N] [--ready-file F] [--<setting> value ...] [--print-config]
 *
 * Every rank loads its expert slice; rank 0 serves gRPC and feeds batches to the driver from
 * its batcher thread while the other ranks follow. SIGTERM (or SIGINT) to rank 0 drains: health
 * turns NOT_SERVING, new calls get UNAVAILABLE, queued and in-flight calls are answered, then
 * rank 0 releases the followers and every rank exits 0.
 *
 * A lost or hung rank (collective_timeout_s, DESIGN §9): the root's service turns NOT_SERVING
 * and answers every waiting call UNAVAILABLE naming the rank, then drains and ends the whole job
 * with MPI_Abort (the other ranks may be stuck: nothing else can stop them), so mpirun / srun
 * exit non-zero and the scheduler restarts the service. A follower that detects the loss first
 * gives the root collective_timeout_s + 5 s to answer its callers, then aborts the job itself
 * (the root may be the rank that hung).
 */
#include <errno.h>
#include <mpi.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "common/cli.h"
#include "common/config.h"
#include "common/user_message.h"
#include "coordinator/engine/driver.h"
#include "coordinator/service/serve_config.h"
#include "coordinator/service/server.h"

static void usage(FILE *f) {
    fprintf(f,
            "usage: mpirun -np N epmoe-serve --checkpoint CKPT [--listen HOST:PORT]\n"
            "       [--metrics-listen HOST:PORT] [--max-batch-tokens T] [--max-queue-delay-us U]\n"
            "       [--max-queue N] [--ready-file F] [--<setting> value ...] [--print-config]\n"
            "SIGTERM or SIGINT to rank 0 drains the service and stops every rank.\n");
}

static epmoe_status driver_forward(void *ctx, const float *x, const int32_t *token_ids,
                                   int64_t n_tokens, int64_t layer_begin, int64_t layer_end,
                                   float *out, epmoe_stage_times *times, int64_t *expert_counts) {
    return epmoe_driver_forward(ctx, x, EPMOE_DTYPE_F32, token_ids, n_tokens, layer_begin,
                                layer_end, out, times, expert_counts);
}

/* "<grpc port> <metrics port> <pid>\n<pid of rank 0> <pid of rank 1> ...\n", written to a
 * temporary name and renamed so a reader never sees half of it. */
static epmoe_status write_ready_file(const char *path, int port, int metrics_port,
                                     const long *pids, int n_ranks) {
    char tmp[1100];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE *f = fopen(tmp, "w");
    EPMOE_REQUIRE(f != NULL, EPMOE_ERR_IO, "--ready-file %s: %s", tmp, strerror(errno));
    fprintf(f, "%d %d %ld\n", port, metrics_port, (long)getpid());
    for (int r = 0; r < n_ranks; r++) fprintf(f, "%s%ld", r ? " " : "", pids[r]);
    fprintf(f, "\n");
    int bad = fclose(f) != 0;
    EPMOE_REQUIRE(!bad && rename(tmp, path) == 0, EPMOE_ERR_IO, "--ready-file %s: %s", path,
                  strerror(errno));
    return EPMOE_OK;
}

static epmoe_status parse_rest(int argc, char **argv, const char **checkpoint, int *help) {
    *checkpoint = NULL;
    *help = 0;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--checkpoint") == 0 && i + 1 < argc) {
            *checkpoint = argv[++i];
        } else if (strncmp(argv[i], "--checkpoint=", 13) == 0) {
            *checkpoint = argv[i] + 13;
        } else if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            *help = 1;
        } else {
            EPMOE_FAIL(EPMOE_ERR_INVALID_ARG, "unknown or incomplete argument '%s'", argv[i]);
        }
    }
    EPMOE_REQUIRE(*checkpoint || *help, EPMOE_ERR_INVALID_ARG, "--checkpoint is required");
    return EPMOE_OK;
}

/* The service's on_fatal: wake the main thread (it waits in sigwait for these signals). */
static void on_fatal(void *ctx, epmoe_status st, const char *message) {
    (void)ctx;
    (void)st;
    (void)message; /* the service has logged it */
    kill(getpid(), SIGUSR1);
}

/* A follower that lost a peer: the job cannot go on. */
static int follower_lost(int rank, double timeout_s) {
    fprintf(stderr,
            "epmoe-serve: rank %d: %s; ending the job in %.0f s unless rank 0 does first\n",
            rank, epmoe_last_error_for_user(), timeout_s + 5);
    fflush(stderr);
    struct timespec t = {(time_t)(timeout_s + 5), 0};
    while (nanosleep(&t, &t) != 0) {
    }
    MPI_Abort(MPI_COMM_WORLD, 1);
    return 1;
}

int main(int argc, char **argv) {
    if (epmoe_cli_help_or_version(argc, argv, "epmoe-serve", EPMOE_VERSION, usage)) return 0;
    /* Signals are blocked in every thread (MPI's, gRPC's, ours, all created later inherit the
     * mask); rank 0's main thread takes them with sigwait. Other ranks never act on them: the
     * root releases them once drained. */
    sigset_t stop_signals;
    sigemptyset(&stop_signals);
    sigaddset(&stop_signals, SIGTERM);
    sigaddset(&stop_signals, SIGINT);
    sigaddset(&stop_signals, SIGUSR1); /* the service's on_fatal */
    pthread_sigmask(SIG_BLOCK, &stop_signals, NULL);

    /* The batcher thread, not the main thread, calls the driver (one thread at a time). */
    int provided = MPI_THREAD_SINGLE;
    MPI_Init_thread(&argc, &argv, MPI_THREAD_SERIALIZED, &provided);
    int rank = 0, n_ranks = 1;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &n_ranks);

    /* Every rank parses the same arguments, so every rank reaches the same verdict. */
    epmoe_config cfg;
    epmoe_config_defaults(&cfg);
    epmoe_serve_config sc;
    epmoe_serve_config_defaults(&sc);
    int print_config = 0, help = 0;
    const char *checkpoint = NULL;
    epmoe_status st = epmoe_config_parse_args(&cfg, &argc, argv, &print_config);
    if (st == EPMOE_OK) st = epmoe_serve_config_parse_args(&sc, &argc, argv);
    if (st == EPMOE_OK) st = parse_rest(argc, argv, &checkpoint, &help);
    if (st == EPMOE_OK && provided < MPI_THREAD_SERIALIZED)
        st = epmoe_set_error(EPMOE_ERR_MPI, __FILE__, __LINE__,
                             "the MPI library gives thread level %d; epmoe-serve needs "
                             "MPI_THREAD_SERIALIZED",
                             provided);
    if (st != EPMOE_OK || help) {
        if (rank == 0) {
            if (st != EPMOE_OK) fprintf(stderr, "epmoe-serve: %s\n", epmoe_last_error_for_user());
            usage(st != EPMOE_OK ? stderr : stdout);
        }
        MPI_Finalize();
        return st != EPMOE_OK ? 2 : 0;
    }

    epmoe_driver *d = NULL;
    st = epmoe_driver_create(&cfg, checkpoint, MPI_COMM_WORLD, 0, -1, &d);
    if (st != EPMOE_OK) {
        fprintf(stderr, "epmoe-serve: rank %d: %s\n", rank, epmoe_last_error_for_user());
        MPI_Finalize();
        return 1;
    }
    /* Every rank's pid, for the ready file (operators and tests signal single ranks). */
    long pid = (long)getpid();
    long *pids = rank == 0 ? calloc((size_t)n_ranks, sizeof *pids) : NULL;
    if (rank == 0 && !pids) {
        fprintf(stderr, "epmoe-serve: out of memory\n");
        MPI_Abort(MPI_COMM_WORLD, 1);
    }
    MPI_Gather(&pid, 1, MPI_LONG, pids, 1, MPI_LONG, 0, MPI_COMM_WORLD);
    if (rank != 0) {
        st = epmoe_driver_follow(d);
        if (st == EPMOE_ERR_PEER_LOST || st == EPMOE_ERR_MPI || st == EPMOE_ERR_NCCL)
            return follower_lost(rank, epmoe_driver_config(d)->collective_timeout_s);
        if (st != EPMOE_OK) fprintf(stderr, "epmoe-serve: rank %d: %s\n", rank, epmoe_last_error_for_user());
        epmoe_driver_destroy(d);
        MPI_Finalize();
        return st == EPMOE_OK ? 0 : 1;
    }

    const epmoe_config *mc = epmoe_driver_config(d);
    if (print_config) {
        epmoe_config_print(mc, stdout);
        epmoe_serve_config_print(&sc, stdout);
    }
    epmoe_service_options so;
    memset(&so, 0, sizeof so);
    so.cfg = sc;
    epmoe_driver_get_info(d, &so.info);
    so.vocab_size = mc->vocab_size;
    so.forward = driver_forward;
    so.forward_ctx = d;
    so.on_fatal = on_fatal;
    epmoe_service *svc = NULL;
    st = epmoe_service_start(&so, &svc);
    if (st == EPMOE_OK && sc.ready_file[0])
        st = write_ready_file(sc.ready_file, epmoe_service_port(svc),
                              epmoe_service_metrics_port(svc), pids, n_ranks);
    free(pids);
    if (st != EPMOE_OK) {
        fprintf(stderr, "epmoe-serve: %s\n", epmoe_last_error_for_user());
        if (svc) epmoe_service_drain(svc);
        epmoe_driver_shutdown(d);
        epmoe_driver_destroy(d);
        MPI_Finalize();
        return 1;
    }
    printf("epmoe-serve: %s, %d ranks, %lld experts (%lld-%lld per rank), hidden %lld, %lld "
           "layers; gRPC on port %d",
           so.info.preset, so.info.n_ranks, (long long)so.info.n_routed_experts,
           (long long)so.info.experts_per_rank_min, (long long)so.info.experts_per_rank_max,
           (long long)so.info.hidden_size, (long long)so.info.n_layers, epmoe_service_port(svc));
    if (epmoe_service_metrics_port(svc))
        printf(", metrics on port %d", epmoe_service_metrics_port(svc));
    printf("; max batch %lld tokens, max request %lld tokens\n",
           (long long)epmoe_service_max_batch_tokens(svc),
           (long long)epmoe_service_max_request_tokens(svc));
    fflush(stdout);

    int sig = 0;
    while (sigwait(&stop_signals, &sig) != 0) {
    }
    if (sig == SIGUSR1 || epmoe_service_failed(svc)) {
        /* Callers have been answered UNAVAILABLE; let the replies go out, then end every rank
         * (the followers may be hung in a collective: only an abort reaches them). */
        fprintf(stderr, "epmoe-serve: the engine failed: answering the waiting calls, then "
                        "aborting the job so that it is restarted\n");
        epmoe_service_drain(svc);
        MPI_Abort(MPI_COMM_WORLD, 1);
        return 1;
    }
    printf("epmoe-serve: %s: draining\n", sig == SIGTERM ? "SIGTERM" : "SIGINT");
    fflush(stdout);
    epmoe_service_drain(svc);
    st = epmoe_driver_shutdown(d);
    if (st != EPMOE_OK) fprintf(stderr, "epmoe-serve: shutdown: %s\n", epmoe_last_error_for_user());
    epmoe_driver_destroy(d);
    printf("epmoe-serve: stopped\n");
    fflush(stdout);
    MPI_Finalize();
    return st == EPMOE_OK ? 0 : 1;
}
