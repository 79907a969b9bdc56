/* sampling (cuda/sampling.cu). */
#ifndef R1_PARAMS_SAMPLING_H
#define R1_PARAMS_SAMPLING_H

#include <stdint.h>

/* ---------------------------------------------------------------------------------------
 * sample_tokens  (cuda/sampling.cu): one token per R1SampleRow, drawn from one row of f32
 * logits by the sampling rule of src/numerics/sampling.rs (bit-identical to its `draw`; the
 * shared arithmetic is cuda/sampling_rule.cuh).
 *   block: R1_SAMPLE_THREADS (1024, 1, 1); dynamic smem: 0
 *   grid:  (n, 1, 1): one CTA per R1SampleRow entry
 *   The CTA reads its logits row several times (the max, up to 4 radix passes for top-k and
 *   4 for top-p, the Gumbel pass; a 129,280-token row is 517 KB and stays in L2). Radix passes
 *   take 8 bits of the order key at a time into 256 shared-memory bins of u64 counts or
 *   integer masses (order-free atomics).
 *   Requires: vocab >= 1; logits 4-byte aligned, holding logit_rows * vocab f32; rows 8-byte
 *             aligned, holding n entries; tokens holding n int32.
 *   A row index outside [0, logit_rows) draws -1.
 * ------------------------------------------------------------------------------------- */
#define R1_SAMPLE_THREADS 1024

/* How one logits row draws its token: `numerics::sampling::Draw` and the row it reads. */
typedef struct R1SampleRow {
    unsigned long long seed;
    unsigned long long counter; /* absolute position the drawn token will take */
    int32_t row;                /* row of the logits buffer */
    float temperature;          /* not > 0: greedy */
    float top_p;                /* >= 1 (or NaN): no top-p */
    uint32_t top_k;             /* 0: no top-k */
} R1SampleRow;

typedef struct R1SampleParams {
    unsigned long long logits; /* in:  f32 [logit_rows][vocab]           */
    unsigned long long rows;   /* in:  R1SampleRow [n]                   */
    unsigned long long tokens; /* out: int32 [n], the drawn token or -1  */
    int32_t vocab;
    int32_t logit_rows;
    int32_t n;
    int32_t reserved; /* set to 0 */
} R1SampleParams;

#endif /* R1_PARAMS_SAMPLING_H */
