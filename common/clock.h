/* The one monotonic clock every part of epmoe measures durations and deadlines with. */
#ifndef EPMOE_CLOCK_H
#define EPMOE_CLOCK_H

#include <sched.h>
#include <time.h>

/* Seconds on CLOCK_MONOTONIC (not wall time: never jumps). */
static inline double epmoe_seconds_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* Between two polls of a wait that began at `start` (every watchdog-guarded wait): yield only
 * for the first 2 ms (a collective usually completes within that, and nanosleep's timer slack
 * would add ~50 us to every transfer: the dispatch all-to-all once took 3x the raw NCCL time
 * with a sleep here), then sleep 20 us per poll so that a long wait does not hold a core. */
static inline void epmoe_pause_since(double start) {
    if (epmoe_seconds_now() - start < 2e-3) {
        sched_yield();
        return;
    }
    struct timespec nap = {0, 20000};
    nanosleep(&nap, NULL);
}

#endif
