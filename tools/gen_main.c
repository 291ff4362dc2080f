/* epmoe-gen: writes a synthetic checkpoint in any of the layouts epmoe reads (common/
 * checkpoint.h, docs/checkpoints.md), and/or a random batch input file.
 *
 *   epmoe-gen --preset tiny --out DIR [--layout epmoe|deepseek|nvidia-nvfp4|gpt-oss] [--n-layers N]
 *             [--weight_format nvfp4|mxfp4] [--seed S] [--skew X] [--threads T]
 *             [--shard-mb M] [--any_setting value ...] [--print-config]
 *   epmoe-gen [--preset P] --input-out FILE --tokens T [--dtype f32|bf16|f16] [--seed S]
 */
#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "common/clock.h"
#include "common/cli.h"
#include "common/user_message.h"
#include "common/checkpoint.h"
#include "common/config.h"
#include "common/paths.h"

static void usage(FILE *out) {
    fprintf(out,
            "usage: epmoe-gen [--preset NAME] --out DIR\n"
            "                 [--layout epmoe|deepseek|nvidia-nvfp4|gpt-oss]\n"
            "                 [--n-layers N] [--skew X] [--threads T] [--shard-mb M]\n"
            "                 [--weight_format nvfp4|mxfp4] [--seed S] [--SETTING VALUE ...]\n"
            "       epmoe-gen [--preset NAME] --input-out FILE --tokens T [--dtype f32|bf16|f16]\n"
            "                 [--seed S]\n"
            "       epmoe-gen ... --print-config   (every setting: see the list it prints)\n"
            "  --out DIR        write the checkpoint into DIR\n"
            "  --layout L       epmoe: one model-LLLLL.safetensors per layer with epmoe.* metadata\n"
            "                   (default); deepseek: a model directory as DeepSeek releases it\n"
            "                   (config.json, index, shards; MXFP4 experts); nvidia-nvfp4: NVIDIA's\n"
            "                   NVFP4 re-quantization of it (+ hf_quant_config.json); gpt-oss:\n"
            "                   OpenAI's gpt-oss release (--preset gpt-oss-20b|gpt-oss-120b|\n"
            "                   gpt-oss-tiny; stacked MXFP4 experts with biases)\n"
            "  --n-layers N     how many MoE layers (a count; epmoe-run's --layers A:B is a range);\n"
            "                   n_hash_layers is capped at N\n"
            "  --skew X         routing skew toward low expert ids (0 = balanced)\n"
            "  --threads T      writer threads (default: one per CPU)\n"
            "  --shard-mb M     model directories: start a new shard past M MiB (default 4096)\n"
            "  --input-out FILE write hidden_states [T, H] and token_ids [T]\n"
            "  --help, --version\n");
}

typedef struct {
    double t0, last_print;
    const char *dir;
} progress;

static double gib(uint64_t bytes) { return (double)bytes / (1024.0 * 1024.0 * 1024.0); }

static void print_plan(void *ctx, const epmoe_gen_plan_info *info) {
    progress *p = ctx;
    printf("epmoe-gen: writing %s: %.2f GiB in %lld files (%lld tensors), %d threads; estimated "
           "%.1f s at %.0f MB/s (one projection timed, times the threads; disk speed not "
           "included)\n",
           p->dir, gib(info->total_bytes), (long long)info->files, (long long)info->tensors,
           info->threads,
           info->bytes_per_second > 0 ? (double)info->total_bytes / info->bytes_per_second : 0.0,
           info->bytes_per_second / 1e6);
    fflush(stdout);
    p->t0 = p->last_print = epmoe_seconds_now();
}

static void print_progress(void *ctx, uint64_t done, uint64_t total) {
    progress *p = ctx;
    double now = epmoe_seconds_now();
    if (done < total && now - p->last_print < 5.0) return;
    p->last_print = now;
    printf("epmoe-gen: %.2f of %.2f GiB (%.0f%%), %.0f MB/s\n", gib(done), gib(total),
           total ? 100.0 * (double)done / (double)total : 100.0,
           now > p->t0 ? (double)done / (now - p->t0) / 1e6 : 0.0);
    fflush(stdout);
}

static int fail(const char *what) {
    fprintf(stderr, "epmoe-gen: %s%s%s\n", what ? what : "", what ? ": " : "", epmoe_last_error_for_user());
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

/* Whether argv sets a config entry explicitly (--name or --name=, dashes or underscores). */
static int sets(int argc, char **argv, const char *underscored, const char *dashed) {
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        for (int form = 0; form < 2; form++) {
            const char *name = form ? dashed : underscored;
            size_t n = strlen(name);
            if (strncmp(a, "--", 2) == 0 && strncmp(a + 2, name, n) == 0 &&
                (a[2 + n] == '\0' || a[2 + n] == '='))
                return 1;
        }
    }
    return 0;
}

int main(int argc, char **argv) {
    if (epmoe_cli_help_or_version(argc, argv, "epmoe-gen", EPMOE_VERSION, usage)) return 0;
    /* --layers was a count here and is a range in epmoe-run: refuse it rather than guess. */
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--layers") == 0 || strncmp(argv[i], "--layers=", 9) == 0) {
            fprintf(stderr, "epmoe-gen: --layers is epmoe-run's layer range (A:B); the number of "
                            "layers to generate is --n-layers N\n");
            return 2;
        }
    }
    const int explicit_format = sets(argc, argv, "weight_format", "weight-format");
    const int explicit_hash = sets(argc, argv, "n_hash_layers", "n-hash-layers");
    epmoe_config cfg;
    epmoe_config_defaults(&cfg);
    int print_config = 0;
    if (epmoe_config_parse_args(&cfg, &argc, argv, &print_config) != EPMOE_OK)
        return fail("arguments");

    const char *out_dir = NULL, *input_out = NULL, *layout = NULL;
    long long tokens = -1, threads = 0, shard_mb = 0;
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
        else if (strcmp(a, "--layout") == 0) layout = v;
        else if (strcmp(a, "--tokens") == 0) {
            if (!parse_int(a, v, &tokens)) return 2;
        } else if (strcmp(a, "--threads") == 0) {
            if (!parse_int(a, v, &threads)) return 2;
            if (threads < 0) {
                fprintf(stderr, "epmoe-gen: --threads %lld: needs 0 (one per CPU) or more\n",
                        threads);
                return 2;
            }
        } else if (strcmp(a, "--shard-mb") == 0) {
            if (!parse_int(a, v, &shard_mb)) return 2;
            if (shard_mb < 1 || shard_mb > ((long long)1 << 40)) {
                fprintf(stderr, "epmoe-gen: --shard-mb %lld: needs a size in [1, 2^40] MiB\n",
                        shard_mb);
                return 2;
            }
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
    if (layout) {
        if (epmoe_config_set(&cfg, "checkpoint_layout", layout) != EPMOE_OK) return fail("--layout");
    }
    /* A real layout fixes the expert format unless the user chose one (then validation says
     * whether the two agree). */
    if (!explicit_format && cfg.checkpoint_layout == EPMOE_LAYOUT_DEEPSEEK)
        cfg.weight_format = EPMOE_WEIGHTS_MXFP4;
    if (!explicit_format && cfg.checkpoint_layout == EPMOE_LAYOUT_NVIDIA_NVFP4)
        cfg.weight_format = EPMOE_WEIGHTS_NVFP4;
    if (!explicit_format && cfg.checkpoint_layout == EPMOE_LAYOUT_GPT_OSS)
        cfg.weight_format = EPMOE_WEIGHTS_MXFP4;
    int64_t room = cfg.n_layers - cfg.n_mtp_layers;
    if (!explicit_hash && cfg.n_hash_layers > room && room >= 0) {
        printf("epmoe-gen: n_hash_layers %lld capped at %lld (n_layers %lld, n_mtp_layers %lld)\n",
               (long long)cfg.n_hash_layers, (long long)room, (long long)cfg.n_layers,
               (long long)cfg.n_mtp_layers);
        cfg.n_hash_layers = room;
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
        progress prog = {epmoe_seconds_now(), 0.0, out_dir};
        opt.threads = threads > 65536 ? 65536 : (int)threads; /* the generator caps it lower */
        opt.shard_bytes = (uint64_t)shard_mb << 20;
        opt.on_plan = print_plan;
        opt.on_progress = print_progress;
        opt.ctx = &prog;
        epmoe_gen_stats stats = {0};
        if (epmoe_ckpt_generate(&cfg, &opt, out_dir, &stats) != EPMOE_OK) return fail("checkpoint");
        char layout_name[32];
        epmoe_config_get(&cfg, "checkpoint_layout", layout_name, sizeof layout_name);
        double dt = epmoe_seconds_now() - prog.t0;
        printf("epmoe-gen: wrote %s: preset %s, layout %s, %s experts, seed %lld, %lld layers, "
               "%lld tensors, %.1f MiB in %.2f s (%.0f MB/s)\n",
               out_dir, cfg.preset, layout_name,
               cfg.weight_format == EPMOE_WEIGHTS_MXFP4 ? "mxfp4" : "nvfp4", (long long)cfg.seed,
               (long long)stats.layers, (long long)stats.tensors,
               (double)stats.bytes / (1024.0 * 1024.0), dt,
               dt > 0 ? (double)stats.bytes / dt / 1e6 : 0.0);
    }
    if (input_out) {
        if (tokens < 1) {
            fprintf(stderr, "epmoe-gen: --input-out needs --tokens T (T >= 1)\n");
            return 2;
        }
        double t0 = epmoe_seconds_now();
        if (epmoe_gen_input_file(&cfg, tokens, input_dtype, (uint64_t)cfg.seed, input_out) !=
            EPMOE_OK)
            return fail("input");
        printf("epmoe-gen: wrote %s: hidden_states %s [%lld, %lld], token_ids I32 [%lld], seed "
               "%lld in %.2f s\n",
               input_out, epmoe_dtype_name(input_dtype), tokens, (long long)cfg.hidden_size,
               tokens, (long long)cfg.seed, epmoe_seconds_now() - t0);
    }
    return 0;
}
