/* Device fill of synthetic weights (cuda/random_fill.cu). */
#ifndef R1_PARAMS_RANDOM_FILL_H
#define R1_PARAMS_RANDOM_FILL_H

#include <stdint.h>

#include "common.h"

/* RANDOM FILL SECTION =====================================================================
 * random_fill: n elements of a counter-hash random stream, for weights generated on the
 * device (benchmarks of real-dimension models without a checkpoint). Element i is
 *     z   = splitmix64(seed + (i + 1) * 0x9E3779B97F4A7C15)
 *     u   = (float)(z >> 40) * 2^-23 - 1        exactly, uniform in [-1, 1) (24 bits)
 *     x_i = fmaf(spread, u, center)             (one IEEE rounding)
 * stored as `kind`: R1_FILL_E4M3 (the e4m3 code of x_i, round to nearest even, saturating to
 * +-448), R1_FILL_BF16 (round to nearest even) or R1_FILL_F32. splitmix64(x): x ^= x >> 30;
 * x *= 0xBF58476D1CE4E5B9; x ^= x >> 27; x *= 0x94D049BB133111EB; x ^= x >> 31 (mod 2^64).
 * Bit-identical to the host's `random_fill_host` (src/cuda/ops/random_fill.rs). Any
 * alignment of `out`; n >= 1; grid-stride over a grid of at most R1_FILL_MAX_BLOCKS blocks
 * of R1_FILL_THREADS threads.
 * ------------------------------------------------------------------------------------- */
#define R1_FILL_E4M3 0
#define R1_FILL_BF16 1
#define R1_FILL_F32 2
#define R1_FILL_THREADS 256
#define R1_FILL_MAX_BLOCKS 65536

typedef struct R1RandomFillParams {
    unsigned long long out; /* [n] of the kind's element type */
    long long n;
    unsigned long long seed;
    float center;
    float spread;
    int32_t kind;
    int32_t reserved;
} R1RandomFillParams;

#endif /* R1_PARAMS_RANDOM_FILL_H */
