/* Helpers shared by the test suites: random inputs, poisoning, error norms, oracle files. */
#ifndef EPMOE_TEST_SUPPORT_H
#define EPMOE_TEST_SUPPORT_H

#include <stddef.h>
#include <stdint.h>

#include "common/rng.h"

/* A quiet NaN with a recognizable payload: outputs are filled with it before a kernel runs,
 * so any element the kernel did not write fails the comparison (rule 1). */
#define EPMOE_POISON_BITS 0x7fc0dead
float epmoe_poison_value(void);
void epmoe_poison_f32(float *x, size_t n);
void epmoe_poison_f64(double *x, size_t n);
/* Number of elements that still hold the poison bit pattern (or any NaN). */
size_t epmoe_count_unwritten_f32(const float *x, size_t n);

void epmoe_fill_normal(epmoe_rng *r, float *x, size_t n, float stddev);
void epmoe_fill_uniform(epmoe_rng *r, float *x, size_t n, float lo, float hi);

/* ||a - b|| / ||b|| in float64; NaN anywhere gives +Inf. */
double epmoe_rel_l2_f32_f64(const float *a, const double *b, size_t n);
double epmoe_rel_l2_f32_f32(const float *a, const float *b, size_t n);
/* Largest |a-b| / (|b| + abs_floor). */
double epmoe_max_rel_err(const float *a, const double *b, size_t n, double abs_floor);

/* Path to a file in the test data folder (EPMOE_TEST_DATA), in a static buffer. */
const char *epmoe_test_data_path(const char *name);

#endif
