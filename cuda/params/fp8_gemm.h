/* Dense FP8 block-scaled GEMMs (cuda/fp8_gemm.cu). */
#ifndef R1_PARAMS_FP8_GEMM_H
#define R1_PARAMS_FP8_GEMM_H

#include <stdint.h>

#include "common.h"

/* ---------------------------------------------------------------------------------------
 * fp8_gemm_ref  (cuda/fp8_gemm.cu): D[M,N] = w8a8(A[M,K], B[N,K]), CUDA cores, any shape
 *   block: (R1_FP8_GEMM_REF_TILE, R1_FP8_GEMM_REF_TILE, 1) = (16, 16, 1); dynamic smem: 0
 *   grid:  (ceil(N/16), ceil(M/16), 1); thread (x, y) computes D[16*by + y][16*bx + x].
 *   Any M, N, K >= 1 (a ragged last K-block is summed over its valid columns). Slow: tests.
 *   splits (1 <= splits <= ceil(K/128)): the order of the split wgmma kernels ("Split-K" in
 *   common.h): each split's K-blocks summed from zero as above, then the split totals added
 *   left to right (total = t_0, total += t_1, ...). splits 1 is the plain sum; no workspace.
 * ------------------------------------------------------------------------------------- */
#define R1_FP8_GEMM_REF_TILE 16

typedef struct R1Fp8GemmRefParams {
    unsigned long long a;  /* fp8  [m][lda]                                   */
    unsigned long long b;  /* fp8  [n][ldb]  (weights, K-major)               */
    unsigned long long sa; /* f32  [ceil(k/128)][m_pad] (SA layout)           */
    unsigned long long sb; /* f32  [ceil(n/128)][ceil(k/128)]                 */
    unsigned long long d;  /* bf16 [m][ldd]                                   */
    int32_t m;
    int32_t n;
    int32_t k;
    int32_t lda;
    int32_t ldb;
    int32_t ldd;
    int32_t m_pad;
    int32_t splits;        /* >= 1 (1: no split)                             */
} R1Fp8GemmRefParams;

/* ---------------------------------------------------------------------------------------
 * fp8_gemm_wgmma / fp8_gemm_wgmma_m64  (cuda/fp8_gemm.cu): same math as fp8_gemm_ref,
 * Hopper (sm_90a) path: TMA -> R1_FP8_GEMM*_STAGES-deep mbarrier pipeline -> wgmma
 * m64n128k32 e4m3, one producer warpgroup + BLOCK_M/64 consumer warpgroups, f32 promotion
 * every 128 of K, bf16 output (predicated: any M, any N).
 *
 *                     fp8_gemm_wgmma         fp8_gemm_wgmma_m64 (for M <= 64, decode)
 *   BLOCK_M           128                    64
 *   block             (384, 1, 1)            (256, 1, 1)
 *   dynamic smem      R1_FP8_GEMM_SMEM_BYTES R1_FP8_GEMM_M64_SMEM_BYTES
 *                     (> 48 KiB: set CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES first)
 *   grid              (G, 1, 1), any G >= 1. Persistent: CTA i runs units i, i+G, i+2G, ...
 *                     of U = T * S units, T = ceil(M/BLOCK_M) * ceil(N/128) tiles and
 *                     S = split_k.splits; use G = min(U, #SMs).
 *                     Tile order: groups of R1_FP8_GEMM_GROUP_M M-blocks, M-block fastest;
 *                     unit u is split u % S of tile u / S.
 *
 *   Split-K ("Split-K" in common.h): 1 <= S <= K/128. S == 1: split_k.partials and
 *   split_k.counters may be 0 and every tile stores directly. S > 1: partials holds
 *   f32 [U][BLOCK_M][128] (8-byte aligned), counters u32 [T][BLOCK_M / 16] (4-byte aligned),
 *   zero before the first launch and left zero by every launch; one workspace serves the
 *   launches of one stream (they must not overlap). The output differs from S == 1 only by
 *   the f32 summation order of the S split totals, and is run-to-run deterministic.
 *
 *   Requires: K % 128 == 0, K >= 128; lda % 16 == 0 and ldb % 16 == 0 (TMA strides, in bytes
 *   = elements); a, b, sa 16-byte aligned; d 4-byte aligned and ldd even.
 *
 *   Tensor maps (cuTensorMapEncodeTiled, rank 2, dims/strides innermost first,
 *   elementStrides {1, 1}, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE
 *   (out-of-bounds reads as zero), L2 promotion CU_TENSOR_MAP_L2_PROMOTION_L2_256B):
 *     tmap_a : UINT8,   globalDim {K, M},    globalStrides {lda},       boxDim {128, BLOCK_M},
 *              CU_TENSOR_MAP_SWIZZLE_128B
 *     tmap_b : UINT8,   globalDim {K, N},    globalStrides {ldb},       boxDim {128, 128},
 *              CU_TENSOR_MAP_SWIZZLE_128B
 *     tmap_sa: FLOAT32, globalDim {M, K/128}, globalStrides {m_pad * 4}, boxDim {BLOCK_M, 1},
 *              CU_TENSOR_MAP_SWIZZLE_NONE
 *   (globalStrides lists the stride of dimension 1 in bytes; dimension 0 is contiguous.)
 *   The maps hold the buffer addresses, so re-encode them when a buffer moves; they can be
 *   built once per (buffer, shape) and reused across launches and CUDA-graph replays.
 * ------------------------------------------------------------------------------------- */
#define R1_FP8_GEMM_BLOCK_N 128
#define R1_FP8_GEMM_BLOCK_K 128
#define R1_FP8_GEMM_GROUP_M 8

#define R1_FP8_GEMM_BLOCK_M 128
#define R1_FP8_GEMM_THREADS 384
#define R1_FP8_GEMM_STAGES 6

#define R1_FP8_GEMM_M64_BLOCK_M 64
#define R1_FP8_GEMM_M64_THREADS 256
#define R1_FP8_GEMM_M64_STAGES 8

/* Dynamic shared memory (its base is 1024-byte aligned; the kernels trap otherwise): per
 * stage (A tile BLOCK_M*128 + B tile 128*128 + activation scales BLOCK_M*4) + two 8-byte
 * mbarriers per stage. (Literal values so bindgen exports them; fp8_gemm.cu static_asserts
 * the formula.) */
#define R1_FP8_GEMM_SMEM_BYTES 199776
#define R1_FP8_GEMM_M64_SMEM_BYTES 198784

typedef struct R1Fp8GemmParams {
    R1TensorMap tmap_a;    /* A  fp8 [m][lda]                                   */
    R1TensorMap tmap_b;    /* B  fp8 [n][ldb]                                   */
    R1TensorMap tmap_sa;   /* sa f32 [k/128][m_pad] (SA layout)                 */
    unsigned long long sb; /* f32  [ceil(n/128)][k/128]                         */
    unsigned long long d;  /* bf16 [m][ldd]                                     */
    int32_t m;
    int32_t n;
    int32_t k;
    int32_t ldd;
    R1SplitK split_k;      /* splits >= 1; the workspace when splits > 1      */
} R1Fp8GemmParams;

#endif /* R1_PARAMS_FP8_GEMM_H */
