// The Hopper pipeline shared by the FP8 block-scaled GEMMs (cuda/fp8_gemm.cu, cuda/moe_gemm.cu):
// what they differ in is only which output tiles exist and where each tile's operands live,
// given by a tile scheduler type.
//
// CTA = 1 producer warpgroup (one thread issues TMA) + BLOCK_M/64 consumer warpgroups (each
// owns 64 rows x 128 columns of the tile). Per K-block (128) and stage: A tile BLOCK_M x 128,
// B tile 128 x 128 (both 128-byte swizzled, K-major), BLOCK_M activation scales.
//   full[s]  : producer's expect_tx + TMA bytes  -> consumers may read stage s
//   empty[s] : one arrive per consumer warp       -> producer may refill stage s
// A consumer issues 4 wgmma (k32 each) into a scratch accumulator `part`, waits for them,
// releases the stage, then promotes: acc += part * (sa[row] * sb). The consumer warpgroups
// interleave, so one's promotion overlaps another's wgmma. Work units (a tile, or one split
// of a tile's K-blocks: "Split-K" in params/common.h) are walked persistently: unit
// blockIdx.x, then + gridDim.x, by the producer and the consumers alike.
#pragma once

#include <stdint.h>

#include "params/fp8_gemm.h"
#include "ptx.cuh"

namespace r1 {
namespace gemm {

constexpr int BN = R1_FP8_GEMM_BLOCK_N;
constexpr int BK = R1_FP8_GEMM_BLOCK_K;
static_assert(BN == R1_QUANT_BLOCK && BK == R1_QUANT_BLOCK, "one weight scale per tile and K-block");

template <int BM, int STAGES>
struct PipeConfig {
    static constexpr int kConsumers = BM / 64;
    static constexpr int kThreads = 128 * (1 + kConsumers);
    static constexpr int kABytes = BM * BK;  // fp8
    static constexpr int kBBytes = BN * BK;
    static constexpr int kSaBytes = BM * 4;
    static constexpr int kStageTxBytes = kABytes + kBBytes + kSaBytes;
    // The stages (from the 1024-aligned dynamic shared memory base), then a full and an empty
    // mbarrier per stage.
    static constexpr int kSmemBytes = STAGES * (kABytes + kBBytes + kSaBytes) + STAGES * 16;
    static_assert(kABytes % 1024 == 0 && kBBytes % 1024 == 0, "swizzle atoms stay 1024-aligned");
};

// Tile t -> (M-block, N-block): groups of GROUP_M M-blocks; inside a group the M-block varies
// fastest, so CTAs running at the same time share B tiles (and A tiles within the group) in L2.
__device__ __forceinline__ void tile_coords(int t, int m_blocks, int n_blocks, int& mb, int& nb) {
    const int per_group = R1_FP8_GEMM_GROUP_M * n_blocks;
    const int group = t / per_group;
    const int first_m = group * R1_FP8_GEMM_GROUP_M;
    const int group_m = min(m_blocks - first_m, R1_FP8_GEMM_GROUP_M);
    const int r = t - group * per_group;
    mb = first_m + r % group_m;
    nb = r / group_m;
}

// The shared-memory layout of one CTA and the pipeline over it.
//
// Sched (the kernel's tile scheduler) provides:
//   int units;                         work units in the whole problem
//   Tile unit(int u) const;            with  bool skip() const  (nothing to compute),
//                                            int a_row          (first row of A and of SA),
//                                            int b_row          (first row of B),
//                                            int64_t sb_block   (the tile's row of 128x128
//                                                                weight scales, kblocks each),
//                                            int kb_begin, kb_end (the K-blocks this unit
//                                                                loads and sums; non-empty)
//   void store(const Tile&, float (&acc)[64], int row0, int col0) const;
//                                      the epilogue: this thread's accumulator (rows row0 and
//                                      row0 + 8, columns col0 + 8i and +1 of the tile, in
//                                      wgmma's m64n128 fragment order), which it may modify.
// The weight scale of K-block kb is sb_all[sb_block * kblocks + kb] whatever the unit's range.
template <int BM, int STAGES>
struct Pipeline {
    using Cfg = PipeConfig<BM, STAGES>;

    uint32_t raw;  // shared address of the dynamic shared memory
    uint32_t s_a, s_b, s_sa, s_full, s_empty;
    const float* sa_smem;

    __device__ __forceinline__ explicit Pipeline(uint8_t* smem_raw) {
        raw = r1::aligned_dynamic_smem(smem_raw);
        s_a = raw;
        s_b = s_a + STAGES * Cfg::kABytes;
        s_sa = s_b + STAGES * Cfg::kBBytes;
        s_full = s_sa + STAGES * Cfg::kSaBytes;
        s_empty = s_full + STAGES * 8;
        sa_smem = reinterpret_cast<const float*>(smem_raw + (s_sa - raw));
    }

    // First byte after the pipeline's shared memory (a kernel's own data may follow).
    __device__ __forceinline__ uint32_t end() const { return s_empty + STAGES * 8; }

    // Thread 0 only, then a __syncthreads before run().
    __device__ __forceinline__ void init_barriers() const {
        for (int s = 0; s < STAGES; s++) {
            r1::mbar_init(s_full + 8 * s, 1);
            r1::mbar_init(s_empty + 8 * s, Cfg::kConsumers * 4);
        }
        r1::fence_mbar_init();
        r1::fence_proxy_async_smem();
    }

    template <bool REALLOC_REGS, class Sched>
    __device__ __forceinline__ void run(const void* tmap_a, const void* tmap_b, const void* tmap_sa,
                                        const float* sb_all, int kblocks,
                                        const Sched& sch) const {
        const int warpgroup = threadIdx.x / 128;
        if (warpgroup == 0) {
            // ---------------------------------------------------------------- producer
            if constexpr (REALLOC_REGS) r1::setmaxnreg_dec<R1_REALLOC_PRODUCER_REGS>();
            if (threadIdx.x == 0) {
                r1::tma_prefetch_desc(tmap_a);
                r1::tma_prefetch_desc(tmap_b);
                r1::tma_prefetch_desc(tmap_sa);
                int stage = 0;
                uint32_t phase = 0;
                for (int u = blockIdx.x; u < sch.units; u += gridDim.x) {
                    const auto tile = sch.unit(u);
                    if (tile.skip()) continue;
                    for (int kb = tile.kb_begin; kb < tile.kb_end; kb++) {
                        const uint32_t full = s_full + 8 * stage;
                        r1::mbar_wait(s_empty + 8 * stage, phase ^ 1);
                        r1::mbar_arrive_expect_tx(full, Cfg::kStageTxBytes);
                        r1::tma_load_2d(s_a + stage * Cfg::kABytes, tmap_a, full, kb * BK, tile.a_row);
                        r1::tma_load_2d(s_b + stage * Cfg::kBBytes, tmap_b, full, kb * BK, tile.b_row);
                        r1::tma_load_2d(s_sa + stage * Cfg::kSaBytes, tmap_sa, full, tile.a_row, kb);
                        if (++stage == STAGES) {
                            stage = 0;
                            phase ^= 1;
                        }
                    }
                }
            }
            return;
        }
        // -------------------------------------------------------------------- consumers
        if constexpr (REALLOC_REGS) r1::setmaxnreg_inc<R1_REALLOC_CONSUMER_REGS>();
        const int cw = warpgroup - 1;  // consumer index: rows [64*cw, 64*cw + 64)
        const int warp = (threadIdx.x % 128) / 32;
        const int lane = threadIdx.x % 32;
        const int row0 = 64 * cw + 16 * warp + lane / 4;  // this thread's rows: row0, row0 + 8
        const int col0 = 2 * (lane % 4);                  // and columns col0 + 8*i (+1)

        float acc[64];
        float part[64];
#pragma unroll
        for (int j = 0; j < 64; j++) part[j] = 0.0f;
        int stage = 0;
        uint32_t phase = 0;
        for (int u = blockIdx.x; u < sch.units; u += gridDim.x) {
            const auto tile = sch.unit(u);
            if (tile.skip()) continue;
            const float* sb_row = sb_all + tile.sb_block * kblocks;
#pragma unroll
            for (int j = 0; j < 64; j++) acc[j] = 0.0f;

            for (int kb = tile.kb_begin; kb < tile.kb_end; kb++) {
                const float sb = __ldg(sb_row + kb);
                r1::mbar_wait(s_full + 8 * stage, phase);
                // Read this stage's activation scales before issuing the MMAs (latency overlaps).
                const float* sa = sa_smem + stage * BM;
                const float sa0 = sa[row0];
                const float sa1 = sa[row0 + 8];

                const uint64_t desc_a = r1::smem_desc_k_sw128(s_a + stage * Cfg::kABytes + cw * 64 * BK);
                const uint64_t desc_b = r1::smem_desc_k_sw128(s_b + stage * Cfg::kBBytes);
#pragma unroll
                for (int j = 0; j < 64; j++) r1::fence_reg(part[j]);
                r1::wgmma_fence();
#pragma unroll
                for (int ks = 0; ks < BK / 32; ks++)  // +32 bytes of K = +2 in the descriptor
                    r1::wgmma_m64n128k32_e4m3(part, desc_a + 2 * ks, desc_b + 2 * ks, ks > 0);
                r1::wgmma_commit();
                r1::wgmma_wait<0>();
#pragma unroll
                for (int j = 0; j < 64; j++) r1::fence_reg(part[j]);

                const float scale0 = sa0 * sb;
                const float scale1 = sa1 * sb;
                __syncwarp();  // every lane's reads of this stage are done before lane 0 frees it
                if (lane == 0) r1::mbar_arrive(s_empty + 8 * stage);
                if (++stage == STAGES) {
                    stage = 0;
                    phase ^= 1;
                }
#pragma unroll
                for (int j = 0; j < 64; j++) acc[j] = fmaf(part[j], (j & 2) ? scale1 : scale0, acc[j]);
            }
            sch.store(tile, acc, row0, col0);
        }
    }
};

}  // namespace gemm
}  // namespace r1
