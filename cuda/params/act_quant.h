/* act_quant (cuda/act_quant.cu). */
#ifndef R1_PARAMS_ACT_QUANT_H
#define R1_PARAMS_ACT_QUANT_H

#include <stdint.h>

#include "common.h"

/* ---------------------------------------------------------------------------------------
 * act_quant  (cuda/act_quant.cu): bf16 [M, K] -> fp8 [M, K] + f32 scales (SA layout)
 *   block: R1_ACT_QUANT_THREADS (256, 1, 1); dynamic smem: 0
 *   grid:  (ceil(M * (K/128) / R1_ACT_QUANT_GROUPS_PER_BLOCK), 1, 1)
 *   8 threads quantize one 128-channel group (16 channels each: two 16-byte loads, one
 *   16-byte store); groups are numbered g = kb * M + r (row fastest).
 *   Requires: K % 128 == 0; x, q 16-byte aligned; ldx % 8 == 0; ldq % 16 == 0;
 *             m_pad >= M, m_pad % 4 == 0; scales 16-byte aligned.
 * ------------------------------------------------------------------------------------- */
#define R1_ACT_QUANT_THREADS 256
#define R1_ACT_QUANT_GROUPS_PER_BLOCK 32

typedef struct R1ActQuantParams {
    unsigned long long x;      /* in:  bf16 [m][ldx]; columns [0, k) are quantized        */
    unsigned long long q;      /* out: fp8  [m][ldq]                                        */
    unsigned long long scales; /* out: f32  [k/128][m_pad] (SA layout)                      */
    int32_t m;
    int32_t k;
    int32_t ldx;
    int32_t ldq;
    int32_t m_pad;
    int32_t reserved;          /* set to 0 */
} R1ActQuantParams;

#endif /* R1_PARAMS_ACT_QUANT_H */
