/* bf16 tensor-core GEMM, batched, with split-K (cuda/bf16_gemm.cu). */
#ifndef R1_PARAMS_BF16_GEMM_H
#define R1_PARAMS_BF16_GEMM_H

#include <stdint.h>

#include "common.h"

/* ---------------------------------------------------------------------------------------
 * bf16_gemm_wgmma  (cuda/bf16_gemm.cu): for b in [0, batch)
 *   D[b][m][n] = sum_k A[b][m][k] * B[b][n][k]     (A bf16 [M][lda], B bf16 [N][ldb] K-major)
 * f32 accumulation on the tensor cores (wgmma m64n128k16, one accumulator over every K-block
 * of a unit, no promotion), D f32 (out_f32 != 0) or bf16 (rounded once, RN) at
 * d + b * d_batch with row stride ldd (elements). The CUDA-core reference is small_gemm_bf16
 * (params/small_ops.h), launched once per batch entry.
 *
 *   CTA: 1 producer warpgroup (one thread issues TMA) + 1 consumer warpgroup (BLOCK_M 64 x
 *   BLOCK_N 128), R1_BF16_GEMM_STAGES-deep mbarrier pipeline of BLOCK_K 64 (128-byte rows,
 *   128-byte swizzle): A 64 x 64 + B 128 x 64 bf16 per stage.
 *   block: (R1_BF16_GEMM_THREADS, 1, 1) = (256, 1, 1)
 *   dynamic smem: R1_BF16_GEMM_SMEM_BYTES (> 48 KiB: set
 *                 CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES first)
 *   grid: (G, 1, 1), any G >= 1. Persistent over units u in [0, tiles * S), CTA i runs
 *         u = i, i + G, ...; tile = u / S, split s = u % S (params/common.h "Split-K", S =
 *         split_k.splits); tiles = batch * ceil(M/64) * ceil(N/128), tile index
 *         t = (b * ceil(M/64) + m_block) * ceil(N/128) + n_block. Use G = min(tiles * S, #SMs).
 *   Split-K over ceil(K/64) K-blocks exactly as params/common.h says, BLOCK_M 64, BLOCK_N 128:
 *         partials f32 [tiles * S][64][128], counters u32 [tiles][4] (zero before the first
 *         launch, left zero by every launch). S == 1: no workspace, every tile stores directly.
 *   The store is predicated: nothing outside [M, N] of each batch entry is written.
 *
 *   Requires: M, N, K, batch >= 1; 1 <= S <= ceil(K/64); K % 8 == 0; lda, ldb % 8 == 0
 *   (16-byte TMA row strides); a, b 16-byte aligned; with batch > 1, a_batch and b_batch
 *   multiples of 8 and non-zero (16-byte TMA strides); d aligned to a pair of outputs (8 bytes
 *   for f32, 4 for bf16), ldd and d_batch even (pairs are stored together).
 *
 *   Tensor maps (cuTensorMapEncodeTiled, rank 3, BFLOAT16, dims/strides innermost first,
 *   elementStrides {1, 1, 1}, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
 *   CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE (out-of-bounds reads as zero: the ragged last K-block,
 *   rows past M or N), L2 promotion CU_TENSOR_MAP_L2_PROMOTION_L2_256B):
 *     tmap_a: globalDim {K, M, batch}, globalStrides {lda * 2, a_batch * 2}, boxDim {64, 64, 1}
 *     tmap_b: globalDim {K, N, batch}, globalStrides {ldb * 2, b_batch * 2}, boxDim {64, 128, 1}
 *   (with batch 1 the batch stride is unused; any valid value, e.g. rows * ld * 2).
 * ------------------------------------------------------------------------------------- */
#define R1_BF16_GEMM_BLOCK_M 64
#define R1_BF16_GEMM_BLOCK_N 128
#define R1_BF16_GEMM_BLOCK_K 64
#define R1_BF16_GEMM_THREADS 256
#define R1_BF16_GEMM_STAGES 9

/* Dynamic shared memory (its base is 1024-byte aligned; the kernel traps otherwise): per stage
 * A tile 64*64*2 + B tile 128*64*2 bytes, then a full and an empty 8-byte mbarrier per stage.
 * (A literal so bindgen exports it; bf16_gemm.cu static_asserts the formula.) */
#define R1_BF16_GEMM_SMEM_BYTES 221328

typedef struct R1Bf16GemmParams {
    R1TensorMap tmap_a;    /* A bf16 [batch][M][lda] (a_batch apart)               */
    R1TensorMap tmap_b;    /* B bf16 [batch][N][ldb] (b_batch apart), K-major      */
    unsigned long long d;  /* D f32 or bf16 [M][ldd] at d + b * d_batch (elements) */
    long long d_batch;     /* elements between batch entries of D                  */
    R1SplitK split_k;      /* split-K workspace and count (params/common.h)        */
    int32_t m;
    int32_t n;
    int32_t k;
    int32_t batch;
    int32_t ldd;
    int32_t out_f32;       /* != 0: D is f32; 0: D is bf16                         */
} R1Bf16GemmParams;

#endif /* R1_PARAMS_BF16_GEMM_H */
