/* epmoe-gen: writes a synthetic checkpoint (one safetensors file per layer) in exactly the
 * layout a real one has (common/checkpoint.h), and/or a random batch input file.
 *
 *   epmoe-gen --preset tiny --out DIR [--layers N] [--weight_format nvfp4|mxfp4] [--seed S]
 *             [--skew X] [--any_setting value ...] [--print-config]
 *   epmoe-gen [--preset P] --input-out FILE --tokens T [--dtype f32|bf16|f16] [--seed S]
 */
#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include "common/checkpoint.h"
#include "common/config.h"
#include "common/paths.h"

static void usage(FILE *out) {
    fprintf(out,
            "usage: epmoe-gen [--preset NAME] --out DIR [--layers N] [--skew X]\n"
            "                 [--weight_format nvfp4|mxfp4] [--seed S] [--SETTING VALUE ...]\n"
            "       epmoe-gen [--preset NAME] --input-out FILE --tokens T [--dtype f32|bf16|f16]\n"
            "                 [--seed S]\n"
            "       epmoe-gen ... --print-config   (every setting: see the list it prints)\n"
            "  --out DIR        write model-LLLLL.safetensors for every layer into DIR\n"
            "  --layers N       shorthand for --n_layers N (n_hash_layers is capped at N)\n"
            "  --skew X         routing skew toward low expert ids (0 = balanced)\n"
            "  --input-out FILE write hidden_states [T, H] and token_ids [T]\n");
}

static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

typedef struct {
    double t0;
    int64_t n_layers;
} progress;

static void print_layer(void *ctx, int64_t layer, const char *path) {
    const progress *p = ctx;
    printf("epmoe-gen: layer %lld/%lld -> %s (%.2f s)\n", (long long)layer + 1,
           (long long)p->n_layers, path, now_seconds() - p->t0);
    fflush(stdout);
}

static int fail(const char *what) {
    fprintf(stderr, "epmoe-gen: %s%s%s\n", what ? what : "", what ? ": " : "", epmoe_last_error());
    return 1;
}

static int parse_int(const char *flag, const char *text, long long *out) {
    char *end = NULL;
    errno = 0;
    long long v = strtoll(text, &end, 10);
    if (errno != 0 || end == text || *end != '\0' || isspace((unsigned char)text[0])) {
        fprintf(stderr, "epmoe-gen: %s '%s' is not an integer\n", flag, text);
        return 0;
    }
    *out = v;
    return 1;
}

static int parse_dtype(const char *text, epmoe_dtype *out) {
    if (strcasecmp(text, "f32") == 0 || strcasecmp(text, "float32") == 0) *out = EPMOE_DTYPE_F32;
    else if (strcasecmp(text, "bf16") == 0 || strcasecmp(text, "bfloat16") == 0)
        *out = EPMOE_DTYPE_BF16;
    else if (strcasecmp(text, "f16") == 0 || strcasecmp(text, "float16") == 0)
        *out = EPMOE_DTYPE_F16;
    else {
        fprintf(stderr, "epmoe-gen: --dtype '%s' is not one of f32, bf16, f16\n", text);
        return 0;
    }
    return 1;
}

int main(int argc, char **argv) {
    /* --help and --version before anything else */
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            usage(stdout);
            return 0;
        }
        if (strcmp(argv[i], "--version") == 0) {
            printf("epmoe-gen %s\n", EPMOE_VERSION);
            return 0;
        }
    }
    epmoe_config cfg;
    epmoe_config_defaults(&cfg);
    int print_config = 0;
    if (epmoe_config_parse_args(&cfg, &argc, argv, &print_config) != EPMOE_OK)
        return fail("arguments");

    const char *out_dir = NULL, *input_out = NULL;
    long long layers = -1, tokens = -1;
    epmoe_dtype input_dtype = EPMOE_DTYPE_F32;
    epmoe_gen_options opt = {0};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            usage(stdout);
            return 0;
        }
        if (i + 1 >= argc) {
            fprintf(stderr, "epmoe-gen: unknown argument or missing value: %s\n", a);
            usage(stderr);
            return 2;
        }
        const char *v = argv[++i];
        if (strcmp(a, "--out") == 0) out_dir = v;
        else if (strcmp(a, "--input-out") == 0) input_out = v;
        else if (strcmp(a, "--layers") == 0) {
            if (!parse_int(a, v, &layers)) return 2;
        } else if (strcmp(a, "--tokens") == 0) {
            if (!parse_int(a, v, &tokens)) return 2;
        } else if (strcmp(a, "--dtype") == 0) {
            if (!parse_dtype(v, &input_dtype)) return 2;
        } else if (strcmp(a, "--skew") == 0) {
            char *end = NULL;
            opt.skew = strtod(v, &end);
            if (end == v || *end != '\0') {
                fprintf(stderr, "epmoe-gen: --skew '%s' is not a number\n", v);
                return 2;
            }
        } else {
            fprintf(stderr, "epmoe-gen: unknown argument %s\n", a);
            usage(stderr);
            return 2;
        }
    }
    if (layers >= 0) {
        char text[32];
        snprintf(text, sizeof text, "%lld", layers);
        if (epmoe_config_set(&cfg, "n_layers", text) != EPMOE_OK) return fail("--layers");
        if (cfg.n_hash_layers > cfg.n_layers) {
            printf("epmoe-gen: n_hash_layers %lld capped at --layers %lld\n",
                   (long long)cfg.n_hash_layers, layers);
            cfg.n_hash_layers = cfg.n_layers;
        }
    }
    if (epmoe_config_validate(&cfg) != EPMOE_OK) return fail("settings");
    if (print_config) epmoe_config_print(&cfg, stdout);
    if (!out_dir && !input_out) {
        if (print_config) return 0;
        fprintf(stderr, "epmoe-gen: nothing to do: give --out DIR and/or --input-out FILE\n");
        usage(stderr);
        return 2;
    }

    /* output paths checked before any work: never a device node, symlink or directory */
    if (out_dir && epmoe_check_output_dir(out_dir) != EPMOE_OK) return fail("--out");
    if (input_out && tokens >= 1 &&
        epmoe_check_output_file(input_out, (uint64_t)tokens * ((uint64_t)cfg.hidden_size *
                                                                    epmoe_dtype_size(input_dtype) +
                                                                4) + 4096) != EPMOE_OK)
        return fail("--input-out");
    if (out_dir) {
        double t0 = now_seconds();
        progress prog = {t0, cfg.n_layers};
        opt.on_layer = print_layer;
        opt.on_layer_ctx = &prog;
        epmoe_gen_stats stats = {0};
        if (epmoe_ckpt_generate(&cfg, &opt, out_dir, &stats) != EPMOE_OK)
            return fail("checkpoint");
        printf("epmoe-gen: wrote %s: preset %s, %s weights, seed %lld, %lld layers, %lld "
               "tensors, %.1f MiB in %.2f s\n",
               out_dir, cfg.preset, cfg.weight_format == EPMOE_WEIGHTS_MXFP4 ? "mxfp4" : "nvfp4",
               (long long)cfg.seed, (long long)stats.layers, (long long)stats.tensors,
               (double)stats.bytes / (1024.0 * 1024.0), now_seconds() - t0);
    }
    if (input_out) {
        if (tokens < 1) {
            fprintf(stderr, "epmoe-gen: --input-out needs --tokens T (T >= 1)\n");
            return 2;
        }
        double t0 = now_seconds();
        if (epmoe_gen_input_file(&cfg, tokens, input_dtype, (uint64_t)cfg.seed, input_out) !=
            EPMOE_OK)
            return fail("input");
        printf("epmoe-gen: wrote %s: hidden_states %s [%lld, %lld], token_ids I32 [%lld], seed "
               "%lld in %.2f s\n",
               input_out, epmoe_dtype_name(input_dtype), tokens, (long long)cfg.hidden_size,
               tokens, (long long)cfg.seed, now_seconds() - t0);
    }
    return 0;
}
