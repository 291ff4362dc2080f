/* The configuration table: defaults and presets are valid, every setting is checked against
 * its bounds and type, command-line parsing, and --print-config prints every entry. */
#include <check.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/config.h"

START_TEST(defaults_are_in_bounds_and_valid) {
    /* epmoe_config_defaults cannot report a bad default: re-set each one and require success. */
    epmoe_config cfg;
    epmoe_config_defaults(&cfg);
    int n = 0;
    const epmoe_cfg_entry *t = epmoe_config_table(&n);
    ck_assert_int_gt(n, 15);
    for (int i = 0; i < n; i++) {
        ck_assert_msg(t[i].help && strlen(t[i].help) > 5, "%s has no help", t[i].name);
        ck_assert_msg(epmoe_config_set(&cfg, t[i].name, t[i].def) == EPMOE_OK, "default of %s: %s",
                      t[i].name, epmoe_last_error());
        for (int j = 0; j < i; j++) ck_assert_msg(strcmp(t[i].name, t[j].name), "%s twice", t[i].name);
    }
    ck_assert_msg(epmoe_config_validate(&cfg) == EPMOE_OK, "%s", epmoe_last_error());
    ck_assert_int_eq(cfg.n_routed_experts, 256); /* tiny keeps 256 experts (docs/design.md §6) */
}
END_TEST

START_TEST(presets_match_the_design_table) {
    struct {
        const char *name;
        int64_t hidden, inter, experts, top_k, layers, hash;
        double scale, limit;
        int64_t scoring, groups, keep;
    } rows[] = {
        {"dsv4-flash", 4096, 2048, 256, 6, 43, 3, 1.5, 10.0, EPMOE_SCORING_SQRTSOFTPLUS, 1, 1},
        {"dsv4-pro", 7168, 3072, 384, 6, 61, 3, 2.5, 10.0, EPMOE_SCORING_SQRTSOFTPLUS, 1, 1},
        {"dsv3", 7168, 2048, 256, 8, 58, 0, 2.5, 0.0, EPMOE_SCORING_SIGMOID, 8, 4},
    };
    for (size_t i = 0; i < sizeof rows / sizeof rows[0]; i++) {
        epmoe_config c;
        ck_assert(epmoe_config_preset(&c, rows[i].name) == EPMOE_OK);
        ck_assert_msg(epmoe_config_validate(&c) == EPMOE_OK, "%s: %s", rows[i].name,
                      epmoe_last_error());
        ck_assert_str_eq(c.preset, rows[i].name);
        ck_assert_int_eq(c.hidden_size, rows[i].hidden);
        ck_assert_int_eq(c.moe_inter_size, rows[i].inter);
        ck_assert_int_eq(c.n_routed_experts, rows[i].experts);
        ck_assert_int_eq(c.top_k, rows[i].top_k);
        ck_assert_int_eq(c.n_layers, rows[i].layers);
        ck_assert_int_eq(c.n_hash_layers, rows[i].hash);
        ck_assert_double_eq(c.routed_scaling_factor, rows[i].scale);
        ck_assert_double_eq(c.swiglu_limit, rows[i].limit);
        ck_assert_int_eq(c.scoring, rows[i].scoring);
        ck_assert_int_eq(c.n_groups, rows[i].groups);
        ck_assert_int_eq(c.topk_groups, rows[i].keep);
    }
    epmoe_config c;
    ck_assert_int_eq(epmoe_config_preset(&c, "dsv5"), EPMOE_ERR_NOT_FOUND);
    ck_assert_ptr_nonnull(strstr(epmoe_last_error(), "dsv5"));
    /* the DeepSeek presets leave gpt-oss's settings at their defaults */
    ck_assert(epmoe_config_preset(&c, "dsv4-flash") == EPMOE_OK);
    ck_assert_int_eq(c.expert_bias, 0);
    ck_assert_int_eq(c.swiglu_variant, EPMOE_SWIGLU_DSV4);
}
END_TEST

/* gpt-oss (docs/checkpoints.md, "gpt-oss", each number with its source): hidden and
 * intermediate 2880, top-4, limit 7.0, alpha 1.702 (gpt_oss/torch/model.py ModelConfig and
 * swiglu(); transformers' GptOssConfig); 20b: 32 experts, 24 layers; 120b: 128 experts, 36
 * layers; vocabulary 201088. */
START_TEST(gptoss_presets_match_the_release) {
    struct {
        const char *name;
        int64_t hidden, inter, experts, layers, vocab;
    } rows[] = {
        {"gpt-oss-20b", 2880, 2880, 32, 24, 201088},
        {"gpt-oss-120b", 2880, 2880, 128, 36, 201088},
        {"gpt-oss-tiny", 160, 96, 32, 3, 1024},
    };
    for (size_t i = 0; i < sizeof rows / sizeof rows[0]; i++) {
        epmoe_config c;
        ck_assert(epmoe_config_preset(&c, rows[i].name) == EPMOE_OK);
        ck_assert_msg(epmoe_config_validate(&c) == EPMOE_OK, "%s: %s", rows[i].name,
                      epmoe_last_error());
        ck_assert_int_eq(c.hidden_size, rows[i].hidden);
        ck_assert_int_eq(c.moe_inter_size, rows[i].inter);
        ck_assert_int_eq(c.n_routed_experts, rows[i].experts);
        ck_assert_int_eq(c.n_layers, rows[i].layers);
        ck_assert_int_eq(c.vocab_size, rows[i].vocab);
        ck_assert_int_eq(c.top_k, 4);
        ck_assert_int_eq(c.n_shared_experts, 0);
        ck_assert_int_eq(c.n_hash_layers, 0);
        ck_assert_double_eq(c.routed_scaling_factor, 1.0);
        ck_assert_int_eq(c.scoring, EPMOE_SCORING_TOPK_SOFTMAX);
        ck_assert_int_eq(c.swiglu_variant, EPMOE_SWIGLU_GPTOSS);
        ck_assert_double_eq(c.swiglu_limit, 7.0);
        ck_assert_double_eq(c.swiglu_alpha, 1.702);
        ck_assert_int_eq(c.expert_bias, 1);
        ck_assert_int_eq(c.gate_up_order, EPMOE_GATE_UP_INTERLEAVED);
        ck_assert_int_eq(c.weight_format, EPMOE_WEIGHTS_MXFP4);
        /* 2880 = 90 x 32 = 45 x 64: MXFP4 and NVFP4 blocks fit, 128-wide tiles do not (the
         * tiny preset's 160 is not even a multiple of 64) */
        ck_assert_int_eq(c.hidden_size % 32, 0);
        ck_assert_int_ne(c.hidden_size % 128, 0);
    }
}
END_TEST

/* What topk_softmax and the gpt-oss layout cannot have. */
START_TEST(gptoss_validation_rules) {
    epmoe_config c;
    ck_assert(epmoe_config_preset(&c, "gpt-oss-tiny") == EPMOE_OK);
    c.n_groups = 4, c.topk_groups = 2;
    ck_assert_int_eq(epmoe_config_validate(&c), EPMOE_ERR_INVALID_ARG);
    ck_assert_ptr_nonnull(strstr(epmoe_last_error(), "topk_softmax"));
    ck_assert(epmoe_config_preset(&c, "gpt-oss-tiny") == EPMOE_OK);
    c.n_hash_layers = 1;
    ck_assert_int_eq(epmoe_config_validate(&c), EPMOE_ERR_INVALID_ARG);
    ck_assert(epmoe_config_preset(&c, "gpt-oss-tiny") == EPMOE_OK);
    ck_assert_int_eq(epmoe_config_set(&c, "checkpoint_layout", "gpt-oss"), EPMOE_OK);
    ck_assert_int_eq(epmoe_config_validate(&c), EPMOE_OK);
    c.n_shared_experts = 1;
    ck_assert_int_eq(epmoe_config_validate(&c), EPMOE_ERR_INVALID_ARG);
    ck_assert_ptr_nonnull(strstr(epmoe_last_error(), "gpt-oss"));
    c.n_shared_experts = 0, c.expert_bias = 0;
    ck_assert_int_eq(epmoe_config_validate(&c), EPMOE_ERR_INVALID_ARG);
    c.expert_bias = 1, c.weight_format = EPMOE_WEIGHTS_NVFP4;
    ck_assert_int_eq(epmoe_config_validate(&c), EPMOE_ERR_INVALID_ARG);
    /* model defaults reset the family's settings, runtime settings stay */
    c.max_tokens_per_rank = 77;
    epmoe_config_model_defaults(&c);
    ck_assert_int_eq(c.expert_bias, 0);
    ck_assert_int_eq(c.scoring, EPMOE_SCORING_SQRTSOFTPLUS);
    ck_assert_int_eq(c.checkpoint_layout, EPMOE_LAYOUT_EPMOE);
    ck_assert_int_eq(c.max_tokens_per_rank, 77);
}
END_TEST

/* The cuda backend runs every preset, gpt-oss's included (its hidden size 2880 padded to the
 * GEMMs' k step); what it refuses is the fused SwiGLU + NVFP4 kernel's row limit, which
 * act_quant = high does not have. */
START_TEST(cuda_check_refuses_only_what_the_kernels_cannot_run) {
    const char *presets[] = {"tiny", "dsv4-flash", "dsv4-pro", "dsv3", "gpt-oss-20b",
                             "gpt-oss-120b", "gpt-oss-tiny"};
    epmoe_config c;
    for (size_t i = 0; i < sizeof presets / sizeof presets[0]; i++) {
        ck_assert(epmoe_config_preset(&c, presets[i]) == EPMOE_OK);
        ck_assert_msg(epmoe_config_check_cuda(&c) == EPMOE_OK, "%s: %s", presets[i],
                      epmoe_last_error());
    }
    ck_assert(epmoe_config_preset(&c, "tiny") == EPMOE_OK);
    c.moe_inter_size = EPMOE_CUDA_MAX_INTER + 32;
    ck_assert_int_eq(epmoe_config_check_cuda(&c), EPMOE_ERR_UNSUPPORTED);
    ck_assert_ptr_nonnull(strstr(epmoe_last_error(), "backend=cuda"));
    ck_assert_ptr_nonnull(strstr(epmoe_last_error(), "act_quant=high"));
    c.act_quant = EPMOE_ACT_HIGH;
    ck_assert_int_eq(epmoe_config_check_cuda(&c), EPMOE_OK);
}
END_TEST

START_TEST(set_checks_type_bounds_and_names) {
    epmoe_config c;
    epmoe_config_defaults(&c);
    ck_assert_int_eq(epmoe_config_set(&c, "top_k", "7"), EPMOE_OK);
    ck_assert_int_eq(c.top_k, 7);
    ck_assert_int_eq(epmoe_config_set(&c, "top_k", "0"), EPMOE_ERR_INVALID_ARG);
    ck_assert_ptr_nonnull(strstr(epmoe_last_error(), "top_k"));
    ck_assert_int_eq(epmoe_config_set(&c, "top_k", "6x"), EPMOE_ERR_INVALID_ARG);
    /* the whole text is the number: no trailing or leading characters of any kind */
    const char *not_ints[] = {"6 ", " 6", "6.0", "", "0x6", "6e0", "99999999999999999999"};
    for (size_t i = 0; i < sizeof not_ints / sizeof not_ints[0]; i++) {
        ck_assert_msg(epmoe_config_set(&c, "max_tokens_per_rank", not_ints[i]) ==
                          EPMOE_ERR_INVALID_ARG,
                      "max_tokens_per_rank '%s' accepted", not_ints[i]);
        ck_assert_ptr_nonnull(strstr(epmoe_last_error(), "max_tokens_per_rank"));
    }
    const char *not_doubles[] = {"5s", " 5", "5 ", "", "inf", "1e999", "5,0"};
    for (size_t i = 0; i < sizeof not_doubles / sizeof not_doubles[0]; i++)
        ck_assert_msg(epmoe_config_set(&c, "collective_timeout_s", not_doubles[i]) ==
                          EPMOE_ERR_INVALID_ARG,
                      "collective_timeout_s '%s' accepted", not_doubles[i]);
    ck_assert_int_eq(epmoe_config_set(&c, "swiglu_limit", "nan"), EPMOE_ERR_INVALID_ARG);
    ck_assert_int_eq(epmoe_config_set(&c, "swiglu_limit", "-1"), EPMOE_ERR_INVALID_ARG);
    ck_assert_int_eq(epmoe_config_set(&c, "scoring", "softmax"), EPMOE_ERR_INVALID_ARG);
    ck_assert_ptr_nonnull(strstr(epmoe_last_error(), "sqrtsoftplus|sigmoid"));
    ck_assert_int_eq(epmoe_config_set(&c, "swiglu_variant", "step"), EPMOE_OK);
    ck_assert_int_eq(c.swiglu_variant, EPMOE_SWIGLU_STEP);
    ck_assert_int_eq(epmoe_config_set(&c, "no_such_setting", "1"), EPMOE_ERR_NOT_FOUND);
    ck_assert_int_eq(c.top_k, 7); /* failed sets change nothing */
    char buf[64];
    ck_assert_int_eq(epmoe_config_get(&c, "swiglu_variant", buf, sizeof buf), EPMOE_OK);
    ck_assert_str_eq(buf, "step");
}
END_TEST

START_TEST(validate_catches_cross_field_errors) {
    epmoe_config c;
    epmoe_config_defaults(&c);
    c.hidden_size = 48; /* not a multiple of 32 */
    ck_assert_int_eq(epmoe_config_validate(&c), EPMOE_ERR_INVALID_ARG);
    epmoe_config_defaults(&c);
    c.n_routed_experts = 4, c.top_k = 6;
    ck_assert_int_eq(epmoe_config_validate(&c), EPMOE_ERR_INVALID_ARG);
    epmoe_config_defaults(&c);
    c.n_groups = 3; /* does not divide 256 */
    ck_assert_int_eq(epmoe_config_validate(&c), EPMOE_ERR_INVALID_ARG);
    epmoe_config_defaults(&c);
    c.n_hash_layers = c.n_layers + 1;
    ck_assert_int_eq(epmoe_config_validate(&c), EPMOE_ERR_INVALID_ARG);
}
END_TEST

START_TEST(parse_args_consumes_settings_and_keeps_the_rest) {
    char a0[] = "prog", a1[] = "--top_k", a2[] = "4", a3[] = "--input", a4[] = "x.st",
         a5[] = "--preset", a6[] = "dsv4-pro", a7[] = "--swiglu-limit=7.5", a8[] = "--print-config";
    char *argv[] = {a0, a1, a2, a3, a4, a5, a6, a7, a8, NULL};
    int argc = 9, print = 0;
    epmoe_config c;
    epmoe_config_defaults(&c);
    ck_assert_msg(epmoe_config_parse_args(&c, &argc, argv, &print) == EPMOE_OK, "%s",
                  epmoe_last_error());
    /* the preset applies first wherever it stands, so --top_k 4 before it still wins */
    ck_assert_str_eq(c.preset, "dsv4-pro");
    ck_assert_int_eq(c.hidden_size, 7168);
    ck_assert_int_eq(c.top_k, 4);
    ck_assert_double_eq(c.swiglu_limit, 7.5);
    ck_assert_int_eq(print, 1);
    ck_assert_int_eq(argc, 3);
    ck_assert_str_eq(argv[1], "--input");
    ck_assert_str_eq(argv[2], "x.st");
    ck_assert_ptr_null(argv[3]);

    char b0[] = "prog", b1[] = "--top_k";
    char *argv2[] = {b0, b1, NULL};
    argc = 2;
    ck_assert_int_eq(epmoe_config_parse_args(&c, &argc, argv2, &print), EPMOE_ERR_INVALID_ARG);
}
END_TEST

START_TEST(print_config_lists_every_setting) {
    epmoe_config c;
    ck_assert(epmoe_config_preset(&c, "dsv3") == EPMOE_OK);
    char *text = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);
    epmoe_config_print(&c, f);
    fclose(f);
    int n = 0;
    const epmoe_cfg_entry *t = epmoe_config_table(&n);
    for (int i = 0; i < n; i++) { /* every entry starts a line: "name   = value   # help" */
        char line[128];
        snprintf(line, sizeof line, "\n%s ", t[i].name);
        ck_assert_msg(strstr(text, line), "%s missing from --print-config", t[i].name);
    }
    ck_assert_ptr_nonnull(strstr(text, "sigmoid"));
    ck_assert_ptr_nonnull(strstr(text, "7168"));
    /* integer bounds as integers (they printed as "[1..1.04858e+06]") */
    ck_assert_msg(strstr(text, "[1..1048576]"), "max_tokens_per_rank bounds: %s", text);
    ck_assert_msg(strstr(text, "[0..1000000000000000]"), "seed bounds: %s", text);
    ck_assert_msg(strstr(text, "[1..16777216]"), "vocab_size bounds: %s", text);
    free(text);
}
END_TEST

int main(void) {
    Suite *s = suite_create("config");
    TCase *tc = tcase_create("table");
    tcase_add_test(tc, defaults_are_in_bounds_and_valid);
    tcase_add_test(tc, presets_match_the_design_table);
    tcase_add_test(tc, gptoss_presets_match_the_release);
    tcase_add_test(tc, gptoss_validation_rules);
    tcase_add_test(tc, cuda_check_refuses_only_what_the_kernels_cannot_run);
    tcase_add_test(tc, set_checks_type_bounds_and_names);
    tcase_add_test(tc, validate_catches_cross_field_errors);
    tcase_add_test(tc, parse_args_consumes_settings_and_keeps_the_rest);
    tcase_add_test(tc, print_config_lists_every_setting);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? 1 : 0;
}
