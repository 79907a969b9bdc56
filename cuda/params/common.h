/*
 * What every launch-parameter header (cuda/params/*.h, gathered by cuda/launch_params.h)
 * shares: conventions, the quantization layouts and numerics, the opaque tensor map and the
 * register-reallocation budgets.
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
 * w8a8 numerics (docs/design.md, "Numerics contract"):
 *   act_quant:  amax = max_i |x_i| over the 128 channels (exact, bf16 -> f32),
 *               s = max(amax, 1e-4f) / 448.0f                  (f32 IEEE division)
 *               q_i = e4m3(x_i / s)  (f32 IEEE division, round to nearest even, saturate to +-448)
 *   GEMM:       for each K-block kb: part = sum_k fp8(a) * fp8(b) in f32,
 *               acc = fmaf(part, sa[m,kb] * sb[n/128,kb], acc);  D = bf16_rn(acc).
 *   fp8_gemm_ref sums each part sequentially with fmaf (k ascending) and is reproducible
 *   bit-exactly on the CPU in that order; the wgmma kernel sums part on the tensor cores
 *   (different order and reduced internal precision), so compare it with a tolerance.
 */
#ifndef R1_PARAMS_COMMON_H
#define R1_PARAMS_COMMON_H

#include <stdint.h>

#define R1_QUANT_BLOCK 128
#define R1_ACT_SCALE_M_ALIGN 4

/* ---------------------------------------------------------------------------------------
 * CUtensorMap as an opaque blob: the host fills it with cuTensorMapEncodeTiled (driver API)
 * and copies the 128 bytes in. Same size and alignment as CUDA 13's CUtensorMap.
 * ------------------------------------------------------------------------------------- */
typedef struct R1TensorMap {
    __attribute__((aligned(128))) uint64_t opaque[16];
} R1TensorMap;

/* ---------------------------------------------------------------------------------------
 * Split-K (the wgmma GEMMs at decode shapes, cuda/split_k.cuh). A GEMM with fewer output
 * tiles than SMs may split its K-blocks over `splits` CTAs per tile:
 *   split s of S covers K-blocks [s * KB / S, (s + 1) * KB / S)  (KB = K-blocks, S <= KB),
 * computed with the kernel's usual per-block arithmetic into its own f32 accumulator.
 * Units: unit u = tile * S + s for u in [0, tiles * S) (the splits of a tile are adjacent, so
 * they run side by side); a persistent CTA walks units as it walks tiles.
 * Reduction, per 16-row slice of a tile (one consumer warp's rows of the wgmma fragment):
 * every split stores its slice to `partials`, then arrives on the slice's counter; the warp
 * that arrives last sums the S partials in split order, total = p_0 + p_1 + ... + p_{S-1}
 * (f32, left to right, every partial read back from L2, its own included), and
 * stores the output. No float atomics: the result is run-to-run deterministic, and it differs
 * from S = 1 only by the f32 association of the same per-K-block terms (one chain per split,
 * then the chain of split totals, instead of one chain; numerics::block_gemm_w8a8_splits
 * states the bound).
 *   partials: f32 [units][BLOCK_M][BLOCK_N] (row-major per unit; rows past M unwritten)
 *   counters: u32 [tiles][BLOCK_M / 16], all zero before the first launch; the last arrival
 *             resets its counter, so every launch leaves them zero (CUDA-graph replays too).
 * splits == 1: no workspace (partials, counters may be 0), tiles store directly.
 * ------------------------------------------------------------------------------------- */
#define R1_SPLIT_K_SLICE_ROWS 16

typedef struct R1SplitK {
    unsigned long long partials; /* f32 [tiles * splits][BLOCK_M][BLOCK_N], or 0 (splits 1) */
    unsigned long long counters; /* u32 [tiles][BLOCK_M / 16], or 0 (splits 1)             */
    int32_t splits;              /* >= 1                                                    */
    int32_t reserved;            /* set to 0                                                */
} R1SplitK;

/* Register reallocation of the 384-thread kernels (fp8_gemm_wgmma, moe_gemm_contig_wgmma,
 * moe_gemm_masked_wgmma, mla_decode_wgmma): warpgroup 0 (producer) lowers its registers to
 * R1_REALLOC_PRODUCER_REGS with setmaxnreg.dec, the two consumer warpgroups raise theirs to
 * R1_REALLOC_CONSUMER_REGS with setmaxnreg.inc. The CTA's register file is fixed at launch,
 * so the kernel must be launched with at least
 * (128 * PRODUCER + 256 * CONSUMER) / 384 = 168 registers per thread, or the consumers' inc
 * waits forever; the host checks CU_FUNC_ATTRIBUTE_NUM_REGS of each at load. */
#define R1_REALLOC_PRODUCER_REGS 40
#define R1_REALLOC_CONSUMER_REGS 232

#endif /* R1_PARAMS_COMMON_H */
