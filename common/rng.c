#include "common/rng.h"

#include <math.h>

static uint64_t splitmix64(uint64_t *x) {
    uint64_t z = (*x += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

void epmoe_rng_seed(epmoe_rng *r, uint64_t seed) {
    for (int i = 0; i < 4; i++) r->s[i] = splitmix64(&seed);
}

static uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

uint64_t epmoe_rng_next(epmoe_rng *r) {
    uint64_t *s = r->s;
    uint64_t result = rotl(s[1] * 5, 7) * 9;
    uint64_t t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return result;
}

float epmoe_rng_uniform(epmoe_rng *r) { return (float)(epmoe_rng_next(r) >> 40) * 0x1.0p-24f; }

float epmoe_rng_normal(epmoe_rng *r) {
    double u1 = ((double)(epmoe_rng_next(r) >> 11) + 0.5) * 0x1.0p-53;
    double u2 = (double)(epmoe_rng_next(r) >> 11) * 0x1.0p-53;
    return (float)(sqrt(-2.0 * log(u1)) * cos(2.0 * 3.14159265358979323846 * u2));
}

uint64_t epmoe_rng_below(epmoe_rng *r, uint64_t n) { return n ? epmoe_rng_next(r) % n : 0; }
