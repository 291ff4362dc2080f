/* Deterministic pseudo-random numbers (splitmix64 seeding a xoshiro256** stream): the same seed
 * gives the same synthetic checkpoint and the same test inputs on every machine. */
#ifndef EPMOE_RNG_H
#define EPMOE_RNG_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    uint64_t s[4];
} epmoe_rng;

void epmoe_rng_seed(epmoe_rng *r, uint64_t seed);
uint64_t epmoe_rng_next(epmoe_rng *r);
/* Uniform in [0, 1) with 24 random bits (exact in fp32). */
float epmoe_rng_uniform(epmoe_rng *r);
/* Standard normal (Box-Muller, fp64 internally). */
float epmoe_rng_normal(epmoe_rng *r);
/* Uniform integer in [0, n). */
uint64_t epmoe_rng_below(epmoe_rng *r, uint64_t n);

#ifdef __cplusplus
}
#endif
#endif
