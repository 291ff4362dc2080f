#include "tests/support/test_support.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

float epmoe_poison_value(void) {
    uint32_t bits = EPMOE_POISON_BITS;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

void epmoe_poison_f32(float *x, size_t n) {
    float p = epmoe_poison_value();
    for (size_t i = 0; i < n; i++) x[i] = p;
}

void epmoe_poison_f64(double *x, size_t n) {
    for (size_t i = 0; i < n; i++) x[i] = NAN;
}

size_t epmoe_count_unwritten_f32(const float *x, size_t n) {
    size_t bad = 0;
    for (size_t i = 0; i < n; i++)
        if (isnan(x[i])) bad++;
    return bad;
}

void epmoe_fill_normal(epmoe_rng *r, float *x, size_t n, float stddev) {
    for (size_t i = 0; i < n; i++) x[i] = epmoe_rng_normal(r) * stddev;
}

void epmoe_fill_uniform(epmoe_rng *r, float *x, size_t n, float lo, float hi) {
    for (size_t i = 0; i < n; i++) x[i] = lo + (hi - lo) * epmoe_rng_uniform(r);
}

double epmoe_rel_l2_f32_f64(const float *a, const double *b, size_t n) {
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        if (isnan(a[i]) || isnan(b[i])) return INFINITY;
        double d = (double)a[i] - b[i];
        num += d * d;
        den += b[i] * b[i];
    }
    return den > 0 ? sqrt(num / den) : sqrt(num);
}

double epmoe_rel_l2_f32_f32(const float *a, const float *b, size_t n) {
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        if (isnan(a[i]) || isnan(b[i])) return INFINITY;
        double d = (double)a[i] - (double)b[i];
        num += d * d;
        den += (double)b[i] * b[i];
    }
    return den > 0 ? sqrt(num / den) : sqrt(num);
}

double epmoe_max_rel_err(const float *a, const double *b, size_t n, double abs_floor) {
    double worst = 0;
    for (size_t i = 0; i < n; i++) {
        if (isnan(a[i]) || isnan(b[i])) return INFINITY;
        double e = fabs((double)a[i] - b[i]) / (fabs(b[i]) + abs_floor);
        if (e > worst) worst = e;
    }
    return worst;
}

const char *epmoe_test_data_path(const char *name) {
    static char buf[4096];
    const char *dir = getenv("EPMOE_TEST_DATA");
    snprintf(buf, sizeof buf, "%s/%s", dir ? dir : ".", name);
    return buf;
}
