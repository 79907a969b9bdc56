/* Layout probes (cuda/probe.cu). */
#ifndef R1_PARAMS_PROBE_H
#define R1_PARAMS_PROBE_H

#include <stdint.h>

#include "common.h"

/* PROBE SECTION ==========================================================================
 * cuda/probe.cu: layout probes, diagnostics only (src/cuda/ops/probe.rs, tests/gpu_probes.rs).
 * Each runs one piece of the fast kernels' Hopper machinery in isolation, so that a wrong
 * result names the piece instead of "the GEMM is wrong".
 *
 * probe_wgmma_m64n128k32 / probe_wgmma_m64n128k32x4: the wgmma path without TMA.
 *   One warpgroup copies A fp8 [64][K] and B fp8 [128][K] (row-major, row stride K) from
 *   global into shared memory in the layout TMA writes with CU_TENSOR_MAP_SWIZZLE_128B:
 *   tiles 1024-byte aligned, rows of 128 bytes (bytes of K past K zero), 16-byte chunk c of
 *   row r stored at chunk c ^ (r % 8), so 8 rows form one 1024-byte swizzle atom. It builds
 *   the descriptors with r1::smem_desc_k_sw128 (cuda/ptx.cuh) and runs wgmma m64n128k32 e4m3:
 *     probe_wgmma_m64n128k32     K = 32:  one wgmma
 *     probe_wgmma_m64n128k32x4   K = 128: four, descriptors advanced by 32 bytes per step
 *                                (+2 encoded) exactly as the GEMM pipeline does
 *   then writes the raw accumulators in register order, no layout transformation:
 *     out[t * 64 + j] = register j of thread t = D[row][col] of D = A B^T (f32),
 *     row = 16*(t/32) + (t%32)/4 + 8*((j/2)%2), col = 8*(j/4) + 2*(t%4) + (j%2) (ptx.cuh).
 *   block: (R1_PROBE_WGMMA_THREADS, 1, 1) = 128; grid (1, 1, 1);
 *   dynamic smem R1_PROBE_WGMMA_SMEM_BYTES (A tile 64 x 128 + B tile 128 x 128 bytes).
 *   Requires: a, b, out 16-byte aligned; a holds 64*K bytes, b 128*K, out 128*64 floats.
 * ------------------------------------------------------------------------------------- */
#define R1_PROBE_WGMMA_THREADS 128
#define R1_PROBE_WGMMA_SMEM_BYTES 24576

typedef struct R1ProbeWgmmaParams {
    unsigned long long a;   /* in:  fp8 [64][K]            */
    unsigned long long b;   /* in:  fp8 [128][K]           */
    unsigned long long out; /* out: f32 [128 threads][64]  */
} R1ProbeWgmmaParams;
/* END PROBE SECTION ===================================================================== */

#endif /* R1_PARAMS_PROBE_H */
