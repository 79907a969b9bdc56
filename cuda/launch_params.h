/*
 * Launch-parameter structs shared by the CUDA kernels (the .cu files in cuda/) and Rust
 * (build.rs runs bindgen on this file and writes $OUT_DIR/launch_params.rs). Plain C:
 * fixed-width types, device pointers as unsigned long long, no CUDA headers. Every kernel is
 * `extern "C" __global__` and takes exactly one of these structs by value.
 *
 * Conventions
 *   - Matrices are row-major; "ld*" is the row stride in ELEMENTS of the buffer's type.
 *   - bf16 is IEEE bfloat16, fp8 is float8_e4m3fn (OCP E4M3: no inf, max 448).
 *   - Quantization block: R1_QUANT_BLOCK (128) channels along K.
 *
 * Activation-scale layout ("SA layout", written by act_quant, read by both GEMMs):
 *   f32 sa[kb * m_pad + r] = scale of row r, channels [128*kb, 128*kb + 128),
 *   m_pad = M rounded up to a multiple of R1_ACT_SCALE_M_ALIGN (4) so every K-block column is
 *   16-byte aligned for TMA; the buffer holds (K/128) * m_pad floats. Entries r in [M, m_pad)
 *   are never written nor read. (MN-major, i.e. column-major [M, K/128], as DeepGEMM wants.)
 *
 * Weight-scale layout (the checkpoint's weight_scale_inv, a MULTIPLIER):
 *   f32 sb[(n / 128) * ceil(K/128) + kb], shape [ceil(N/128), ceil(K/128)], row-major.
 *
 * w8a8 numerics (DESIGN.md):
 *   act_quant:  amax = max_i |x_i| over the 128 channels (exact, bf16 -> f32),
 *               s = max(amax, 1e-4f) / 448.0f                  (f32 IEEE division)
 *               q_i = e4m3(x_i / s)  (f32 IEEE division, round to nearest even, saturate to +-448)
 *   GEMM:       for each K-block kb: part = sum_k fp8(a) * fp8(b) in f32,
 *               acc = fmaf(part, sa[m,kb] * sb[n/128,kb], acc);  D = bf16_rn(acc).
 *   fp8_gemm_ref sums each part sequentially with fmaf (k ascending) and is reproducible
 *   bit-exactly on the CPU in that order; the wgmma kernel sums part on the tensor cores
 *   (different order and reduced internal precision), so compare it with a tolerance.
 */
#ifndef R1_LAUNCH_PARAMS_H
#define R1_LAUNCH_PARAMS_H

#include <stdint.h>

#define R1_QUANT_BLOCK 128
#define R1_ACT_SCALE_M_ALIGN 4

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

/* ---------------------------------------------------------------------------------------
 * fp8_gemm_ref  (cuda/fp8_gemm.cu): D[M,N] = w8a8(A[M,K], B[N,K]), CUDA cores, any shape
 *   block: (R1_FP8_GEMM_REF_TILE, R1_FP8_GEMM_REF_TILE, 1) = (16, 16, 1); dynamic smem: 0
 *   grid:  (ceil(N/16), ceil(M/16), 1); thread (x, y) computes D[16*by + y][16*bx + x].
 *   Any M, N, K >= 1 (a ragged last K-block is summed over its valid columns). Slow: tests.
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
    int32_t reserved;      /* set to 0 */
} R1Fp8GemmRefParams;

/* ---------------------------------------------------------------------------------------
 * CUtensorMap as an opaque blob: the host fills it with cuTensorMapEncodeTiled (driver API)
 * and copies the 128 bytes in. Same size and alignment as CUDA 13's CUtensorMap.
 * ------------------------------------------------------------------------------------- */
typedef struct R1TensorMap {
    __attribute__((aligned(128))) uint64_t opaque[16];
} R1TensorMap;

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
 *   grid              (G, 1, 1), any G >= 1. Persistent: CTA i runs tiles i, i+G, i+2G, ...
 *                     of T = ceil(M/BLOCK_M) * ceil(N/128) tiles; use G = min(T, #SMs).
 *                     Tile order: groups of R1_FP8_GEMM_GROUP_M M-blocks, M-block fastest.
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

/* Dynamic shared memory: 1024 bytes of alignment slack + per stage (A tile BLOCK_M*128
 * + B tile 128*128 + activation scales BLOCK_M*4) + two 8-byte mbarriers per stage.
 * (Literal values so bindgen exports them; fp8_gemm.cu static_asserts the formula.) */
#define R1_FP8_GEMM_SMEM_BYTES 200800
#define R1_FP8_GEMM_M64_SMEM_BYTES 199808

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
} R1Fp8GemmParams;

#endif /* R1_LAUNCH_PARAMS_H */
