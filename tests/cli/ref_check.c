/* ref_check: compares an epmoe-run output with the float64 reference computed from the
 * checkpoint's own tensors (tests/ref/ref_weights.h reads every layout independently of the
 * loader), layer after layer as epmoe-run chains them (each layer's input is the previous
 * layer's output rounded to fp32, as the engine passes it on).
 *
 *   ref_check CKPT INPUT OUTPUT [A:B] [TOL] [ACT]   exit 0 when rel L2 <= TOL (default 1e-4)
 *
 * ACT is the reference's act_quant (default nvfp4, what epmoe-run does by default): the run's
 * own mode to check it, or high (activations unquantized) to measure what a mode's quantization
 * costs (bench/quant-accuracy.sh). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/checkpoint.h"
#include "common/safetensors.h"
#include "tests/ref/ref_layer.h"

static int die(const char *what) {
    fprintf(stderr, "ref_check: %s: %s\n", what, epmoe_last_error());
    return 2;
}

static float *read_f32(const epmoe_st_file *f, const char *name, int64_t rows, int64_t cols) {
    const epmoe_st_tensor *t = epmoe_st_find(f, name);
    if (!t || t->ndim != 2 || t->shape[0] != rows || t->shape[1] != cols) return NULL;
    float *x = malloc((size_t)(rows * cols + 1) * sizeof(float));
    if (x && epmoe_convert_to_f32(t->dtype, t->data, (size_t)(rows * cols), x) != EPMOE_OK) {
        free(x);
        return NULL;
    }
    return x;
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: ref_check CKPT INPUT OUTPUT [A:B] [TOL] [ACT]\n");
        return 2;
    }
    epmoe_st_set *ckpt = NULL;
    epmoe_config cfg;
    epmoe_config_defaults(&cfg);
    if (epmoe_st_set_open(argv[1], &ckpt) != EPMOE_OK) return die(argv[1]);
    if (epmoe_config_from_checkpoint(ckpt, &cfg) != EPMOE_OK) return die(argv[1]);
    long long begin = 0, end = cfg.n_layers;
    if (argc > 4 && sscanf(argv[4], "%lld:%lld", &begin, &end) != 2) {
        fprintf(stderr, "ref_check: layers '%s' is not A:B\n", argv[4]);
        return 2;
    }
    double tol = argc > 5 ? atof(argv[5]) : 1e-4;
    if (argc > 6 && epmoe_config_set(&cfg, "act_quant", argv[6]) != EPMOE_OK) return die(argv[6]);

    epmoe_st_file *in = NULL, *out = NULL;
    if (epmoe_st_open(argv[2], &in) != EPMOE_OK) return die(argv[2]);
    if (epmoe_st_open(argv[3], &out) != EPMOE_OK) return die(argv[3]);
    const epmoe_st_tensor *hs = epmoe_st_find(in, "hidden_states");
    if (!hs || hs->ndim != 2) {
        fprintf(stderr, "ref_check: %s: no hidden_states [T, H]\n", argv[2]);
        return 2;
    }
    const int64_t T = hs->shape[0], H = cfg.hidden_size;
    float *x = read_f32(in, "hidden_states", T, H), *y = read_f32(out, "hidden_states", T, H);
    if (!x || !y) {
        fprintf(stderr, "ref_check: hidden_states of %s or %s is not [%lld, %lld]\n", argv[2],
                argv[3], (long long)T, (long long)H);
        return 2;
    }
    int32_t *ids = calloc((size_t)T + 1, sizeof *ids);
    const epmoe_st_tensor *tid = epmoe_st_find(in, "token_ids");
    for (int64_t t = 0; tid && t < T; t++) {
        if (tid->dtype == EPMOE_DTYPE_I64) {
            int64_t v;
            memcpy(&v, (const char *)tid->data + 8 * t, 8);
            ids[t] = (int32_t)v;
        } else {
            memcpy(&ids[t], (const char *)tid->data + 4 * t, 4);
        }
    }
    double *ref = malloc((size_t)(T * H + 1) * sizeof(double));
    for (long long layer = begin; layer < end; layer++) {
        epmoe_ref_weights w;
        if (epmoe_ref_weights_read(ckpt, &cfg, layer, &w) != EPMOE_OK) return die("reading weights");
        if (epmoe_ref_forward(&cfg, &w, x, ids, T, ref, NULL, NULL) != EPMOE_OK)
            return die("reference forward");
        epmoe_ref_weights_free(&w);
        for (int64_t i = 0; i < T * H; i++) x[i] = (float)ref[i];
    }
    double num = 0, den = 0;
    int64_t bad = 0;
    for (int64_t i = 0; i < T * H; i++) {
        if (!isfinite(y[i])) bad++;
        double d = (double)y[i] - ref[i];
        num += d * d;
        den += ref[i] * ref[i];
    }
    double rel = bad ? INFINITY : sqrt(num / (den > 0 ? den : 1));
    char act[16];
    epmoe_config_get(&cfg, "act_quant", act, sizeof act);
    printf("ref_check: %s layers [%lld, %lld), %lld x %lld, reference act_quant %s: rel L2 %.3g "
           "(tol %.3g)%s\n", argv[1], begin, end, (long long)T, (long long)H, act, rel, tol,
           bad ? ", non-finite outputs" : "");
    free(x);
    free(y);
    free(ids);
    free(ref);
    epmoe_st_close(in);
    epmoe_st_close(out);
    epmoe_st_set_close(ckpt);
    return rel <= tol ? 0 : 1;
}
