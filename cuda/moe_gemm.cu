// Grouped FP8 block-scaled GEMM for the MoE experts, w8a8 (the numerics of cuda/fp8_gemm.cu):
//   moe_gemm_ref               CUDA cores, entry-driven, any layout/shape: the GPU reference.
//   moe_gemm_contig_wgmma      contiguous layout (prefill): TMA + mbarrier pipeline + wgmma,
//                              warp-specialized, persistent, BLOCK_M 128.
//   moe_gemm_masked_wgmma      masked layout (decode), BLOCK_M 128.
//   moe_gemm_masked_wgmma_m64  masked layout, BLOCK_M 64 (few tokens per expert).
// The tiles in use are found on the device (block tables / counts written by moe_plan), so a
// launch needs no host synchronization and can be captured in a CUDA graph.
// Contract (buffers, tensor maps, grid, block, smem): the MoE section of cuda/launch_params.h.
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <stdint.h>

#include "launch_params.h"
#include "ptx.cuh"

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
// Hopper wgmma kernels
// ============================================================================================
//
// The CTA structure, pipeline and promotion are fp8_gemm_wgmma's (see cuda/fp8_gemm.cu): one
// producer warpgroup (one thread issues the TMA loads of A, B and the activation scales per
// K-block and stage) and BLOCK_M/64 consumer warpgroups (4 x wgmma k32 into `part`, then
// acc += part * sa * sb). What is new is the tile -> (expert, rows) mapping, computed
// identically by the producer and the consumers from device-resident tables:
//   contig: tile t -> (M-block b, N-block nb) in fp8_gemm's grouped order over the
//           *num_blocks blocks in use; expert = block_expert[b], valid rows = block_rows[b].
//   masked: a per-CTA prefix over the experts' M-block counts (shared memory, computed by
//           warp 0 at start) enumerates only non-empty (expert, M-block) pairs.
// The B tile of expert e, N-block nb is rows [e N + 128 nb, +128) of the stacked weight.

namespace {

constexpr int BN = R1_FP8_GEMM_BLOCK_N;
constexpr int BK = R1_FP8_GEMM_BLOCK_K;
constexpr int kSchedBytes = 2 * (R1_MOE_MAX_EXPERTS + 1) * 4;

template <int BM, int STAGES>
struct MoeGemmConfig {
    static constexpr int kConsumers = BM / 64;
    static constexpr int kThreads = 128 * (1 + kConsumers);
    static constexpr int kABytes = BM * BK;
    static constexpr int kBBytes = BN * BK;
    static constexpr int kSaBytes = BM * 4;
    static constexpr int kStageTxBytes = kABytes + kBBytes + kSaBytes;
    static constexpr int kPipeBytes = 1024 + STAGES * (kABytes + kBBytes + kSaBytes) + STAGES * 16;
    static constexpr int kSmemBytes = kPipeBytes + kSchedBytes;
    static_assert(kABytes % 1024 == 0 && kBBytes % 1024 == 0, "swizzle atoms stay 1024-aligned");
};

using Cfg128 = MoeGemmConfig<R1_FP8_GEMM_BLOCK_M, R1_FP8_GEMM_STAGES>;
using Cfg64 = MoeGemmConfig<R1_FP8_GEMM_M64_BLOCK_M, R1_FP8_GEMM_M64_STAGES>;
static_assert(Cfg128::kPipeBytes == R1_FP8_GEMM_SMEM_BYTES, "same pipeline as fp8_gemm_wgmma");
static_assert(Cfg64::kPipeBytes == R1_FP8_GEMM_M64_SMEM_BYTES, "same pipeline as fp8_gemm_wgmma_m64");
static_assert(Cfg128::kSmemBytes == R1_MOE_GEMM_SMEM_BYTES, "launch_params.h R1_MOE_GEMM_SMEM_BYTES");
static_assert(Cfg64::kSmemBytes == R1_MOE_GEMM_M64_SMEM_BYTES, "launch_params.h R1_MOE_GEMM_M64_SMEM_BYTES");
static_assert(Cfg128::kThreads == R1_MOE_GEMM_THREADS && Cfg64::kThreads == R1_MOE_GEMM_M64_THREADS, "threads");
static_assert(R1_FP8_GEMM_BLOCK_M == R1_MOE_BLOCK_M, "contiguous padding is the wgmma kernel's BLOCK_M");

struct Tile {
    int expert;
    int row0;  // first flat row of the tile (A, SA and D)
    int rows;  // valid rows (<= BLOCK_M); 0: skip the tile
    int nb;
};

// fp8_gemm's tile order: groups of GROUP_M M-blocks, M-block fastest inside a group.
__device__ __forceinline__ void tile_coords(int t, int m_blocks, int n_blocks, int& mb, int& nb) {
    const int per_group = R1_FP8_GEMM_GROUP_M * n_blocks;
    const int group = t / per_group;
    const int first_m = group * R1_FP8_GEMM_GROUP_M;
    const int group_m = min(m_blocks - first_m, R1_FP8_GEMM_GROUP_M);
    const int r = t - group * per_group;
    mb = first_m + r % group_m;
    nb = r / group_m;
}

template <int BM, bool MASKED>
struct Scheduler {
    const R1MoeGemmParams* p;
    const int* s_pre;  // masked: [E + 1] M-block prefix over experts
    const int* s_cnt;  // masked: [E] valid rows per expert (clamped to M)
    int n_blocks;
    int m_blocks;      // M-blocks in use
    int tiles;

    __device__ __forceinline__ Tile tile(int t) const {
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
            tile_coords(t, m_blocks, n_blocks, mb, nb);
            const int e = __ldg(reinterpret_cast<const int*>(p->block_expert) + mb);
            const int rows = __ldg(reinterpret_cast<const int*>(p->block_rows) + mb);
            const bool ok = e >= 0 && e < p->experts && rows > 0;
            out.expert = ok ? e : 0;
            out.nb = nb;
            out.row0 = mb * BM;
            out.rows = ok ? min(rows, BM) : 0;
        }
        return out;
    }
};

__device__ __forceinline__ void store_bf16_pair(__nv_bfloat16* d, int64_t ldd, int64_t row, int col, float lo,
                                                float hi) {
    *reinterpret_cast<__nv_bfloat162*>(d + row * ldd + col) = __floats2bfloat162_rn(lo, hi);
}

template <int BM, int STAGES, bool REALLOC_REGS, bool MASKED>
__device__ __forceinline__ void moe_gemm_wgmma_body(const R1MoeGemmParams& p) {
    using Cfg = MoeGemmConfig<BM, STAGES>;

    extern __shared__ uint8_t smem_raw[];
    const uint32_t raw = r1::smem_addr(smem_raw);
    const uint32_t base = (raw + 1023u) & ~1023u;
    const uint32_t s_a = base;
    const uint32_t s_b = s_a + STAGES * Cfg::kABytes;
    const uint32_t s_sa = s_b + STAGES * Cfg::kBBytes;
    const uint32_t s_full = s_sa + STAGES * Cfg::kSaBytes;
    const uint32_t s_empty = s_full + STAGES * 8;
    const uint32_t s_sched = s_empty + STAGES * 8;
    const float* sa_smem = reinterpret_cast<const float*>(smem_raw + (s_sa - raw));
    int* sched = reinterpret_cast<int*>(smem_raw + (s_sched - raw));

    const int n_blocks = p.n / BN;
    const int kblocks = p.k / BK;
    const int warpgroup = threadIdx.x / 128;

    Scheduler<BM, MASKED> sch;
    sch.p = &p;
    sch.n_blocks = n_blocks;
    sch.s_pre = sched;
    sch.s_cnt = sched + R1_MOE_MAX_EXPERTS + 1;

    if (threadIdx.x == 0) {
        for (int s = 0; s < STAGES; s++) {
            r1::mbar_init(s_full + 8 * s, 1);
            r1::mbar_init(s_empty + 8 * s, Cfg::kConsumers * 4);
        }
        r1::fence_mbar_init();
    }
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
    sch.tiles = sch.m_blocks * n_blocks;

    if (warpgroup == 0) {
        // ---------------------------------------------------------------- producer
        if constexpr (REALLOC_REGS) r1::setmaxnreg_dec<40>();
        if (threadIdx.x == 0) {
            r1::tma_prefetch_desc(&p.tmap_a);
            r1::tma_prefetch_desc(&p.tmap_b);
            r1::tma_prefetch_desc(&p.tmap_sa);
            int stage = 0;
            uint32_t phase = 0;
            for (int t = blockIdx.x; t < sch.tiles; t += gridDim.x) {
                const Tile tile = sch.tile(t);
                if (tile.rows <= 0) continue;
                const int b_row = tile.expert * p.n + tile.nb * BN;
                for (int kb = 0; kb < kblocks; kb++) {
                    const uint32_t full = s_full + 8 * stage;
                    r1::mbar_wait(s_empty + 8 * stage, phase ^ 1);
                    r1::mbar_arrive_expect_tx(full, Cfg::kStageTxBytes);
                    r1::tma_load_2d(s_a + stage * Cfg::kABytes, &p.tmap_a, full, kb * BK, tile.row0);
                    r1::tma_load_2d(s_b + stage * Cfg::kBBytes, &p.tmap_b, full, kb * BK, b_row);
                    r1::tma_load_2d(s_sa + stage * Cfg::kSaBytes, &p.tmap_sa, full, tile.row0, kb);
                    if (++stage == STAGES) {
                        stage = 0;
                        phase ^= 1;
                    }
                }
            }
        }
    } else {
        // ---------------------------------------------------------------- consumers
        if constexpr (REALLOC_REGS) r1::setmaxnreg_inc<232>();
        const int cw = warpgroup - 1;
        const int warp = (threadIdx.x % 128) / 32;
        const int lane = threadIdx.x % 32;
        const int row0 = 64 * cw + 16 * warp + lane / 4;  // this thread's rows: row0, row0 + 8
        const int col0 = 2 * (lane % 4);                  // and columns col0 + 8*i (+1)
        const float* sb_all = reinterpret_cast<const float*>(p.sb);
        __nv_bfloat16* d = reinterpret_cast<__nv_bfloat16*>(p.d);

        float acc[64];
        float part[64];
#pragma unroll
        for (int j = 0; j < 64; j++) part[j] = 0.0f;
        int stage = 0;
        uint32_t phase = 0;
        for (int t = blockIdx.x; t < sch.tiles; t += gridDim.x) {
            const Tile tile = sch.tile(t);
            if (tile.rows <= 0) continue;
            const float* sb_row = sb_all + (static_cast<int64_t>(tile.expert) * n_blocks + tile.nb) * kblocks;
#pragma unroll
            for (int j = 0; j < 64; j++) acc[j] = 0.0f;

            for (int kb = 0; kb < kblocks; kb++) {
                const float sb = __ldg(sb_row + kb);
                r1::mbar_wait(s_full + 8 * stage, phase);
                const float* sa = sa_smem + stage * BM;
                const float sa0 = sa[row0];
                const float sa1 = sa[row0 + 8];

                const uint64_t desc_a = r1::smem_desc_k_sw128(s_a + stage * Cfg::kABytes + cw * 64 * BK);
                const uint64_t desc_b = r1::smem_desc_k_sw128(s_b + stage * Cfg::kBBytes);
#pragma unroll
                for (int j = 0; j < 64; j++) r1::fence_reg(part[j]);
                r1::wgmma_fence();
#pragma unroll
                for (int ks = 0; ks < BK / 32; ks++)
                    r1::wgmma_m64n128k32_e4m3(part, desc_a + 2 * ks, desc_b + 2 * ks, ks > 0);
                r1::wgmma_commit();
                r1::wgmma_wait<0>();
#pragma unroll
                for (int j = 0; j < 64; j++) r1::fence_reg(part[j]);

                const float scale0 = sa0 * sb;
                const float scale1 = sa1 * sb;
                __syncwarp();
                if (lane == 0) r1::mbar_arrive(s_empty + 8 * stage);
                if (++stage == STAGES) {
                    stage = 0;
                    phase ^= 1;
                }
#pragma unroll
                for (int j = 0; j < 64; j++) acc[j] = fmaf(part[j], (j & 2) ? scale1 : scale0, acc[j]);
            }

            // Epilogue: registers -> bf16 global, only the tile's valid rows (N % 128 == 0).
            const int64_t ldd = p.ldd;
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
    }
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
