// Grouped FP8 block-scaled GEMM for the MoE experts, w8a8 (the numerics of cuda/fp8_gemm.cu):
//   moe_gemm_ref               CUDA cores, entry-driven, any layout/shape: the GPU reference.
//   moe_gemm_contig_wgmma      contiguous layout (prefill): TMA + mbarrier pipeline + wgmma,
//                              warp-specialized, persistent, BLOCK_M 128.
//   moe_gemm_masked_wgmma      masked layout (decode), BLOCK_M 128.
//   moe_gemm_masked_wgmma_m64  masked layout, BLOCK_M 64 (few tokens per expert).
// The tiles in use are found on the device (block tables / counts written by moe_plan), so a
// launch needs no host synchronization and can be captured in a CUDA graph.
// Contract (buffers, tensor maps, grid, block, smem): cuda/params/moe.h.
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <stdint.h>

#include "fp8_gemm_pipeline.cuh"
#include "params/moe.h"

// ============================================================================================
// Reference
// ============================================================================================

extern "C" __global__ void __launch_bounds__(256) moe_gemm_ref(const R1MoeGemmRefParams p) {
    const int col = blockIdx.x * 16 + threadIdx.x;
    const int entry = blockIdx.y * 16 + threadIdx.y;
    if (entry >= p.entries || col >= p.n) return;
    const int row = reinterpret_cast<const int*>(p.dest_row)[entry];
    const int e = reinterpret_cast<const int*>(p.expert_of)[entry];
    if (row < 0 || e < 0 || e >= p.experts) return;

    const int kblocks = (p.k + R1_QUANT_BLOCK - 1) / R1_QUANT_BLOCK;
    const int nblocks = (p.n + R1_QUANT_BLOCK - 1) / R1_QUANT_BLOCK;
    const __nv_fp8_e4m3* a = reinterpret_cast<const __nv_fp8_e4m3*>(p.a) + static_cast<int64_t>(row) * p.lda;
    const __nv_fp8_e4m3* b =
        reinterpret_cast<const __nv_fp8_e4m3*>(p.b) + (static_cast<int64_t>(e) * p.n + col) * p.ldb;
    const float* sa = reinterpret_cast<const float*>(p.sa);
    const float* sb = reinterpret_cast<const float*>(p.sb) +
                      (static_cast<int64_t>(e) * nblocks + col / R1_QUANT_BLOCK) * kblocks;

    float acc = 0.0f;
    for (int kb = 0; kb < kblocks; kb++) {
        const int k0 = kb * R1_QUANT_BLOCK;
        const int k1 = min(p.k, k0 + R1_QUANT_BLOCK);
        float part = 0.0f;
        for (int k = k0; k < k1; k++) part = fmaf(static_cast<float>(a[k]), static_cast<float>(b[k]), part);
        acc = fmaf(part, sa[static_cast<int64_t>(kb) * p.m_pad + row] * sb[kb], acc);
    }
    reinterpret_cast<__nv_bfloat16*>(p.d)[static_cast<int64_t>(row) * p.ldd + col] = __float2bfloat16_rn(acc);
}

// ============================================================================================
// Hopper wgmma kernels: the pipeline of cuda/fp8_gemm_pipeline.cuh over the experts' tiles
// ============================================================================================
//
// What is MoE-specific is the tile -> (expert, rows) mapping, computed identically by the
// producer and the consumers from device-resident tables:
//   contig: tile t -> (M-block b, N-block nb) in fp8_gemm's grouped order over the
//           *num_blocks blocks in use; expert = block_expert[b], valid rows = block_rows[b].
//   masked: a per-CTA prefix over the experts' M-block counts (shared memory, computed by
//           warp 0 at start) enumerates only non-empty (expert, M-block) pairs.
// The B tile of expert e, N-block nb is rows [e N + 128 nb, +128) of the stacked weight.

namespace {

using r1::gemm::BN;
using r1::gemm::BK;
constexpr int kSchedBytes = 2 * (R1_MOE_MAX_EXPERTS + 1) * 4;

using Pipe128 = r1::gemm::PipeConfig<R1_FP8_GEMM_BLOCK_M, R1_FP8_GEMM_STAGES>;
using Pipe64 = r1::gemm::PipeConfig<R1_FP8_GEMM_M64_BLOCK_M, R1_FP8_GEMM_M64_STAGES>;
static_assert(Pipe128::kSmemBytes + kSchedBytes == R1_MOE_GEMM_SMEM_BYTES, "params/moe.h R1_MOE_GEMM_SMEM_BYTES");
static_assert(Pipe64::kSmemBytes + kSchedBytes == R1_MOE_GEMM_M64_SMEM_BYTES,
              "params/moe.h R1_MOE_GEMM_M64_SMEM_BYTES");
static_assert(Pipe128::kThreads == R1_MOE_GEMM_THREADS && Pipe64::kThreads == R1_MOE_GEMM_M64_THREADS, "threads");
static_assert(R1_FP8_GEMM_BLOCK_M == R1_MOE_BLOCK_M, "contiguous padding is the wgmma kernel's BLOCK_M");

__device__ __forceinline__ void store_bf16_pair(__nv_bfloat16* d, int64_t ldd, int64_t row, int col, float lo,
                                                float hi) {
    *reinterpret_cast<__nv_bfloat162*>(d + row * ldd + col) = __floats2bfloat162_rn(lo, hi);
}

template <int BM, bool MASKED>
struct ExpertTiles {
    struct Tile {
        int expert;
        int row0;  // first flat row of the tile (A, SA and D)
        int rows;  // valid rows (<= BLOCK_M); 0: skip the tile
        int nb;
        int a_row, b_row;
        int64_t sb_block;
        int kb_begin, kb_end;  // every K-block: grouped GEMMs do not split K
        __device__ __forceinline__ bool skip() const { return rows <= 0; }
    };

    const R1MoeGemmParams* p;
    const int* s_pre;  // masked: [E + 1] M-block prefix over experts
    const int* s_cnt;  // masked: [E] valid rows per expert (clamped to M)
    int n_blocks;
    int m_blocks;      // M-blocks in use
    int units;         // one per tile

    __device__ __forceinline__ Tile unit(int t) const {
        Tile out;
        if constexpr (MASKED) {
            const int gm = t / n_blocks;
            int lo = 0, hi = p->experts - 1;  // largest e with s_pre[e] <= gm
            while (lo < hi) {
                const int mid = (lo + hi + 1) / 2;
                if (s_pre[mid] <= gm) {
                    lo = mid;
                } else {
                    hi = mid - 1;
                }
            }
            const int e = lo;
            const int mbe = s_pre[e + 1] - s_pre[e];
            const int l = t - s_pre[e] * n_blocks;
            const int mb = l % mbe;
            out.expert = e;
            out.nb = l / mbe;
            out.row0 = e * p->max_tokens_per_expert + mb * BM;
            out.rows = min(BM, s_cnt[e] - mb * BM);
        } else {
            int mb, nb;
            r1::gemm::tile_coords(t, m_blocks, n_blocks, mb, nb);
            const int e = __ldg(reinterpret_cast<const int*>(p->block_expert) + mb);
            const int rows = __ldg(reinterpret_cast<const int*>(p->block_rows) + mb);
            const bool ok = e >= 0 && e < p->experts && rows > 0;
            out.expert = ok ? e : 0;
            out.nb = nb;
            out.row0 = mb * BM;
            out.rows = ok ? min(rows, BM) : 0;
        }
        out.a_row = out.row0;
        out.b_row = out.expert * p->n + out.nb * BN;
        out.sb_block = static_cast<int64_t>(out.expert) * n_blocks + out.nb;
        out.kb_begin = 0;
        out.kb_end = p->k / BK;
        return out;
    }

    // Only the tile's valid rows (N % 128 == 0).
    __device__ __forceinline__ void store(const Tile& tile, const float (&acc)[64], int row0, int col0) const {
        __nv_bfloat16* d = reinterpret_cast<__nv_bfloat16*>(p->d);
        const int64_t ldd = p->ldd;
        const int gcol = tile.nb * BN + col0;
        const int64_t grow = tile.row0 + row0;
        const bool lo_ok = row0 < tile.rows;
        const bool hi_ok = row0 + 8 < tile.rows;
#pragma unroll
        for (int i = 0; i < 16; i++) {
            if (lo_ok) store_bf16_pair(d, ldd, grow, gcol + 8 * i, acc[4 * i], acc[4 * i + 1]);
            if (hi_ok) store_bf16_pair(d, ldd, grow + 8, gcol + 8 * i, acc[4 * i + 2], acc[4 * i + 3]);
        }
    }
};

template <int BM, int STAGES, bool REALLOC_REGS, bool MASKED>
__device__ __forceinline__ void moe_gemm_wgmma_body(const R1MoeGemmParams& p) {
    extern __shared__ __align__(1024) uint8_t smem_raw[];
    const r1::gemm::Pipeline<BM, STAGES> pipe(smem_raw);
    int* sched = reinterpret_cast<int*>(smem_raw + (pipe.end() - pipe.raw));

    ExpertTiles<BM, MASKED> sch;
    sch.p = &p;
    sch.n_blocks = p.n / BN;
    sch.s_pre = sched;
    sch.s_cnt = sched + R1_MOE_MAX_EXPERTS + 1;

    if (threadIdx.x == 0) pipe.init_barriers();
    if constexpr (MASKED) {
        // Warp 0: s_cnt[e] = min(counts[e], M), s_pre = exclusive prefix of ceil(s_cnt / BM)
        // (each lane a contiguous run of experts, then a warp scan of the run totals).
        if (threadIdx.x < 32) {
            const int lane = threadIdx.x;
            const int E = p.experts;
            const int per = (E + 31) / 32;
            const int e0 = min(E, lane * per), e1 = min(E, e0 + per);
            const int* counts = reinterpret_cast<const int*>(p.counts);
            int* s_pre = sched;
            int* s_cnt = sched + R1_MOE_MAX_EXPERTS + 1;
            int local = 0;
            for (int e = e0; e < e1; e++) {
                const int c = min(max(__ldg(counts + e), 0), p.max_tokens_per_expert);
                s_cnt[e] = c;
                local += (c + BM - 1) / BM;
            }
            int inc = local;
#pragma unroll
            for (int off = 1; off < 32; off *= 2) {
                const int o = __shfl_up_sync(0xFFFFFFFFu, inc, off);
                if (lane >= off) inc += o;
            }
            int run = inc - local;
            for (int e = e0; e < e1; e++) {
                s_pre[e] = run;
                run += (s_cnt[e] + BM - 1) / BM;
            }
            if (lane == 31) s_pre[E] = inc;
        }
    }
    __syncthreads();
    if constexpr (MASKED) {
        sch.m_blocks = sched[p.experts];
    } else {
        sch.m_blocks = min(max(__ldg(reinterpret_cast<const int*>(p.num_blocks)), 0), p.max_blocks);
    }
    sch.units = sch.m_blocks * sch.n_blocks;
    pipe.template run<REALLOC_REGS>(&p.tmap_a, &p.tmap_b, &p.tmap_sa, reinterpret_cast<const float*>(p.sb),
                                    p.k / BK, sch);
}

}  // namespace

extern "C" __global__ void __launch_bounds__(R1_MOE_GEMM_THREADS, 1)
moe_gemm_contig_wgmma(const __grid_constant__ R1MoeGemmParams p) {
    moe_gemm_wgmma_body<R1_FP8_GEMM_BLOCK_M, R1_FP8_GEMM_STAGES, true, false>(p);
}

extern "C" __global__ void __launch_bounds__(R1_MOE_GEMM_THREADS, 1)
moe_gemm_masked_wgmma(const __grid_constant__ R1MoeGemmParams p) {
    moe_gemm_wgmma_body<R1_FP8_GEMM_BLOCK_M, R1_FP8_GEMM_STAGES, true, true>(p);
}

extern "C" __global__ void __launch_bounds__(R1_MOE_GEMM_M64_THREADS, 1)
moe_gemm_masked_wgmma_m64(const __grid_constant__ R1MoeGemmParams p) {
    moe_gemm_wgmma_body<R1_FP8_GEMM_M64_BLOCK_M, R1_FP8_GEMM_M64_STAGES, false, true>(p);
}
