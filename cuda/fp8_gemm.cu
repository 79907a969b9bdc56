// FP8 block-scaled GEMM, w8a8: D[M,N] (bf16) = A[M,K] (fp8, 1x128 scales) x B[N,K]^T (fp8,
// 128x128 scales), f32 accumulation promoted every 128 of K.
//   fp8_gemm_ref        CUDA cores, one thread per output: the GPU-side reference, any shape.
//   fp8_gemm_wgmma      Hopper: TMA + mbarrier pipeline + wgmma, warp-specialized, persistent
//                       (cuda/fp8_gemm_pipeline.cuh).
//   fp8_gemm_wgmma_m64  the same with BLOCK_M = 64 (small M, e.g. decode).
// Both wgmma kernels may split K over several CTAs per tile (cuda/split_k.cuh), which sums the
// splits in a fixed order; fp8_gemm_ref follows the same order when given splits.
// Contract (buffers, tensor maps, grid, block, smem): cuda/params/fp8_gemm.h.
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <stdint.h>

#include "fp8_gemm_pipeline.cuh"
#include "params/fp8_gemm.h"
#include "split_k.cuh"

// ============================================================================================
// Reference
// ============================================================================================

extern "C" __global__ void __launch_bounds__(R1_FP8_GEMM_REF_TILE* R1_FP8_GEMM_REF_TILE)
fp8_gemm_ref(const R1Fp8GemmRefParams p) {
    const int col = blockIdx.x * R1_FP8_GEMM_REF_TILE + threadIdx.x;
    const int row = blockIdx.y * R1_FP8_GEMM_REF_TILE + threadIdx.y;
    if (row >= p.m || col >= p.n) return;

    const __nv_fp8_e4m3* a = reinterpret_cast<const __nv_fp8_e4m3*>(p.a) + static_cast<int64_t>(row) * p.lda;
    const __nv_fp8_e4m3* b = reinterpret_cast<const __nv_fp8_e4m3*>(p.b) + static_cast<int64_t>(col) * p.ldb;
    const float* sa = reinterpret_cast<const float*>(p.sa);
    const float* sb = reinterpret_cast<const float*>(p.sb);
    const int kblocks = (p.k + R1_QUANT_BLOCK - 1) / R1_QUANT_BLOCK;
    const int splits = max(p.splits, 1);

    // Each split's K-blocks from zero, then the split totals left to right: the order of the
    // split wgmma kernels' reduction (splits 1: one plain sum over every K-block).
    float total = 0.0f;
    for (int s = 0; s < splits; s++) {
        float acc = 0.0f;
        const int kb_end = r1::splitk::k_begin(kblocks, splits, s + 1);
        for (int kb = r1::splitk::k_begin(kblocks, splits, s); kb < kb_end; kb++) {
            const int k0 = kb * R1_QUANT_BLOCK;
            const int k1 = min(p.k, k0 + R1_QUANT_BLOCK);
            float part = 0.0f;
            for (int k = k0; k < k1; k++) part = fmaf(static_cast<float>(a[k]), static_cast<float>(b[k]), part);
            const float scale = sa[static_cast<int64_t>(kb) * p.m_pad + row] *
                                sb[static_cast<int64_t>(col / R1_QUANT_BLOCK) * kblocks + kb];
            acc = fmaf(part, scale, acc);
        }
        total = s == 0 ? acc : __fadd_rn(total, acc);
    }
    reinterpret_cast<__nv_bfloat16*>(p.d)[static_cast<int64_t>(row) * p.ldd + col] = __float2bfloat16_rn(total);
}

// ============================================================================================
// Hopper wgmma kernels: the pipeline of cuda/fp8_gemm_pipeline.cuh over every M x N tile
// ============================================================================================

namespace {

using r1::gemm::BN;
using r1::gemm::PipeConfig;
static_assert(PipeConfig<R1_FP8_GEMM_BLOCK_M, R1_FP8_GEMM_STAGES>::kSmemBytes == R1_FP8_GEMM_SMEM_BYTES,
              "params/fp8_gemm.h R1_FP8_GEMM_SMEM_BYTES");
static_assert(PipeConfig<R1_FP8_GEMM_M64_BLOCK_M, R1_FP8_GEMM_M64_STAGES>::kSmemBytes ==
                  R1_FP8_GEMM_M64_SMEM_BYTES,
              "params/fp8_gemm.h R1_FP8_GEMM_M64_SMEM_BYTES");
static_assert(PipeConfig<R1_FP8_GEMM_BLOCK_M, R1_FP8_GEMM_STAGES>::kThreads == R1_FP8_GEMM_THREADS, "threads");
static_assert(PipeConfig<R1_FP8_GEMM_M64_BLOCK_M, R1_FP8_GEMM_M64_STAGES>::kThreads == R1_FP8_GEMM_M64_THREADS,
              "threads");

__device__ __forceinline__ void store_bf16_pair(__nv_bfloat16* d, int64_t ldd, int row, int col, int m, int n,
                                                float lo, float hi) {
    if (row >= m) return;
    __nv_bfloat16* dst = d + row * ldd + col;
    if (col + 1 < n) {
        *reinterpret_cast<__nv_bfloat162*>(dst) = __floats2bfloat162_rn(lo, hi);
    } else if (col < n) {
        *dst = __float2bfloat16_rn(lo);
    }
}

// Every tile of D in fp8_gemm's grouped order, each as `splits` units (unit u = tile * splits
// + s, split s covering K-blocks [k_begin(s), k_begin(s + 1))); the epilogue masks to M x N.
template <int BM>
struct DenseTiles {
    struct Tile {
        int mb, nb;
        int index, split;  // output tile (in tile order) and split of K
        int a_row, b_row;
        int64_t sb_block;
        int kb_begin, kb_end;
        __device__ __forceinline__ bool skip() const { return false; }
    };

    const R1Fp8GemmParams* p;
    int m_blocks, n_blocks, kblocks;
    int units;  // tiles * splits

    __device__ __forceinline__ Tile unit(int u) const {
        const int splits = p->split_k.splits;
        Tile out;
        out.index = u / splits;
        out.split = u - out.index * splits;
        r1::gemm::tile_coords(out.index, m_blocks, n_blocks, out.mb, out.nb);
        out.a_row = out.mb * BM;
        out.b_row = out.nb * BN;
        out.sb_block = out.nb;
        out.kb_begin = r1::splitk::k_begin(kblocks, splits, out.split);
        out.kb_end = r1::splitk::k_begin(kblocks, splits, out.split + 1);
        return out;
    }

    __device__ __forceinline__ void store(const Tile& tile, float (&acc)[64], int row0, int col0) const {
        if (p->split_k.splits > 1) {
            // row0 / 16 = consumer warpgroup * 4 + warp: this warp's 16-row slice.
            const int slice = row0 / r1::splitk::kSliceRows;
            const int rows_valid = min(BM, p->m - tile.mb * BM);
            if (!r1::splitk::reduce_slice<BM>(acc, p->split_k, tile.index, tile.split, slice, rows_valid)) return;
        }
        __nv_bfloat16* d = reinterpret_cast<__nv_bfloat16*>(p->d);
        const int64_t ldd = p->ldd;
        const int grow = tile.mb * BM + row0;
        const int gcol = tile.nb * BN + col0;
#pragma unroll
        for (int i = 0; i < 16; i++) {
            store_bf16_pair(d, ldd, grow, gcol + 8 * i, p->m, p->n, acc[4 * i], acc[4 * i + 1]);
            store_bf16_pair(d, ldd, grow + 8, gcol + 8 * i, p->m, p->n, acc[4 * i + 2], acc[4 * i + 3]);
        }
    }
};

template <int BM, int STAGES, bool REALLOC_REGS>
__device__ __forceinline__ void fp8_gemm_wgmma_body(const R1Fp8GemmParams& p) {
    extern __shared__ __align__(1024) uint8_t smem_raw[];
    const r1::gemm::Pipeline<BM, STAGES> pipe(smem_raw);
    DenseTiles<BM> sch;
    sch.p = &p;
    sch.m_blocks = (p.m + BM - 1) / BM;
    sch.n_blocks = (p.n + BN - 1) / BN;
    sch.kblocks = p.k / r1::gemm::BK;
    sch.units = sch.m_blocks * sch.n_blocks * p.split_k.splits;
    if (threadIdx.x == 0) pipe.init_barriers();
    __syncthreads();
    pipe.template run<REALLOC_REGS>(&p.tmap_a, &p.tmap_b, &p.tmap_sa, reinterpret_cast<const float*>(p.sb),
                                    p.k / r1::gemm::BK, sch);
}

}  // namespace

extern "C" __global__ void __launch_bounds__(R1_FP8_GEMM_THREADS, 1)
fp8_gemm_wgmma(const __grid_constant__ R1Fp8GemmParams p) {
    fp8_gemm_wgmma_body<R1_FP8_GEMM_BLOCK_M, R1_FP8_GEMM_STAGES, true>(p);
}

extern "C" __global__ void __launch_bounds__(R1_FP8_GEMM_M64_THREADS, 1)
fp8_gemm_wgmma_m64(const __grid_constant__ R1Fp8GemmParams p) {
    fp8_gemm_wgmma_body<R1_FP8_GEMM_M64_BLOCK_M, R1_FP8_GEMM_M64_STAGES, false>(p);
}
