// FP8 block-scaled GEMM, w8a8: D[M,N] (bf16) = A[M,K] (fp8, 1x128 scales) x B[N,K]^T (fp8,
// 128x128 scales), f32 accumulation promoted every 128 of K.
//   fp8_gemm_ref        CUDA cores, one thread per output: the GPU-side reference, any shape.
//   fp8_gemm_wgmma      Hopper: TMA + mbarrier pipeline + wgmma, warp-specialized, persistent.
//   fp8_gemm_wgmma_m64  the same with BLOCK_M = 64 (small M, e.g. decode).
// Contract (buffers, tensor maps, grid, block, smem): cuda/launch_params.h.
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <stdint.h>

#include "launch_params.h"
#include "ptx.cuh"

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

    float acc = 0.0f;
    for (int kb = 0; kb < kblocks; kb++) {
        const int k0 = kb * R1_QUANT_BLOCK;
        const int k1 = min(p.k, k0 + R1_QUANT_BLOCK);
        float part = 0.0f;
        for (int k = k0; k < k1; k++) part = fmaf(static_cast<float>(a[k]), static_cast<float>(b[k]), part);
        const float scale = sa[static_cast<int64_t>(kb) * p.m_pad + row] *
                            sb[static_cast<int64_t>(col / R1_QUANT_BLOCK) * kblocks + kb];
        acc = fmaf(part, scale, acc);
    }
    reinterpret_cast<__nv_bfloat16*>(p.d)[static_cast<int64_t>(row) * p.ldd + col] = __float2bfloat16_rn(acc);
}

// ============================================================================================
// Hopper wgmma kernel
// ============================================================================================
//
// CTA = 1 producer warpgroup (one thread issues TMA) + BLOCK_M/64 consumer warpgroups (each
// owns 64 rows x 128 columns of the tile). Per K-block (128) and stage: A tile BLOCK_M x 128,
// B tile 128 x 128 (both 128-byte swizzled, K-major), BLOCK_M activation scales.
//   full[s]  : producer's expect_tx + TMA bytes  -> consumers may read stage s
//   empty[s] : one arrive per consumer warp       -> producer may refill stage s
// A consumer issues 4 wgmma (k32 each) into a scratch accumulator `part`, waits for them,
// releases the stage, then promotes: acc += part * (sa[row] * sb). The two consumer
// warpgroups interleave, so one's promotion overlaps the other's wgmma.

namespace {

constexpr int BN = R1_FP8_GEMM_BLOCK_N;
constexpr int BK = R1_FP8_GEMM_BLOCK_K;
static_assert(BN == R1_QUANT_BLOCK && BK == R1_QUANT_BLOCK, "one weight scale per tile and K-block");

template <int BM, int STAGES>
struct GemmConfig {
    static constexpr int kConsumers = BM / 64;
    static constexpr int kThreads = 128 * (1 + kConsumers);
    static constexpr int kABytes = BM * BK;  // fp8
    static constexpr int kBBytes = BN * BK;
    static constexpr int kSaBytes = BM * 4;
    static constexpr int kStageTxBytes = kABytes + kBBytes + kSaBytes;
    static constexpr int kSmemBytes = 1024 + STAGES * (kABytes + kBBytes + kSaBytes) + STAGES * 16;
    static_assert(kABytes % 1024 == 0 && kBBytes % 1024 == 0, "swizzle atoms stay 1024-aligned");
};
static_assert(GemmConfig<R1_FP8_GEMM_BLOCK_M, R1_FP8_GEMM_STAGES>::kSmemBytes == R1_FP8_GEMM_SMEM_BYTES,
              "launch_params.h R1_FP8_GEMM_SMEM_BYTES");
static_assert(GemmConfig<R1_FP8_GEMM_M64_BLOCK_M, R1_FP8_GEMM_M64_STAGES>::kSmemBytes ==
                  R1_FP8_GEMM_M64_SMEM_BYTES,
              "launch_params.h R1_FP8_GEMM_M64_SMEM_BYTES");
static_assert(GemmConfig<R1_FP8_GEMM_BLOCK_M, R1_FP8_GEMM_STAGES>::kThreads == R1_FP8_GEMM_THREADS, "threads");
static_assert(GemmConfig<R1_FP8_GEMM_M64_BLOCK_M, R1_FP8_GEMM_M64_STAGES>::kThreads == R1_FP8_GEMM_M64_THREADS,
              "threads");

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

template <int BM, int STAGES, bool REALLOC_REGS>
__device__ __forceinline__ void fp8_gemm_wgmma_body(const R1Fp8GemmParams& p) {
    using Cfg = GemmConfig<BM, STAGES>;

    extern __shared__ uint8_t smem_raw[];
    // TMA's 128-byte swizzle pattern and the wgmma descriptors assume 1024-byte aligned tiles.
    const uint32_t base = (r1::smem_addr(smem_raw) + 1023u) & ~1023u;
    const uint32_t s_a = base;
    const uint32_t s_b = s_a + STAGES * Cfg::kABytes;
    const uint32_t s_sa = s_b + STAGES * Cfg::kBBytes;
    const uint32_t s_full = s_sa + STAGES * Cfg::kSaBytes;
    const uint32_t s_empty = s_full + STAGES * 8;
    const float* sa_smem = reinterpret_cast<const float*>(smem_raw + (s_sa - r1::smem_addr(smem_raw)));

    const int m_blocks = (p.m + BM - 1) / BM;
    const int n_blocks = (p.n + BN - 1) / BN;
    const int tiles = m_blocks * n_blocks;
    const int kblocks = p.k / BK;
    const int warpgroup = threadIdx.x / 128;

    if (threadIdx.x == 0) {
        for (int s = 0; s < STAGES; s++) {
            r1::mbar_init(s_full + 8 * s, 1);
            r1::mbar_init(s_empty + 8 * s, Cfg::kConsumers * 4);
        }
        r1::fence_mbar_init();
    }
    __syncthreads();

    if (warpgroup == 0) {
        // ---------------------------------------------------------------- producer
        if constexpr (REALLOC_REGS) r1::setmaxnreg_dec<40>();
        if (threadIdx.x == 0) {
            r1::tma_prefetch_desc(&p.tmap_a);
            r1::tma_prefetch_desc(&p.tmap_b);
            r1::tma_prefetch_desc(&p.tmap_sa);
            int stage = 0;
            uint32_t phase = 0;
            for (int t = blockIdx.x; t < tiles; t += gridDim.x) {
                int mb, nb;
                tile_coords(t, m_blocks, n_blocks, mb, nb);
                for (int kb = 0; kb < kblocks; kb++) {
                    const uint32_t full = s_full + 8 * stage;
                    r1::mbar_wait(s_empty + 8 * stage, phase ^ 1);
                    r1::mbar_arrive_expect_tx(full, Cfg::kStageTxBytes);
                    r1::tma_load_2d(s_a + stage * Cfg::kABytes, &p.tmap_a, full, kb * BK, mb * BM);
                    r1::tma_load_2d(s_b + stage * Cfg::kBBytes, &p.tmap_b, full, kb * BK, nb * BN);
                    r1::tma_load_2d(s_sa + stage * Cfg::kSaBytes, &p.tmap_sa, full, mb * BM, kb);
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
        const int cw = warpgroup - 1;             // consumer index: rows [64*cw, 64*cw + 64)
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
        for (int t = blockIdx.x; t < tiles; t += gridDim.x) {
            int mb, nb;
            tile_coords(t, m_blocks, n_blocks, mb, nb);
            const float* sb_row = sb_all + static_cast<int64_t>(nb) * kblocks;
#pragma unroll
            for (int j = 0; j < 64; j++) acc[j] = 0.0f;

            for (int kb = 0; kb < kblocks; kb++) {
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

            // Epilogue: registers -> bf16 global, masked to M x N.
            const int64_t ldd = p.ldd;
            const int grow = mb * BM + row0;
            const int gcol = nb * BN + col0;
#pragma unroll
            for (int i = 0; i < 16; i++) {
                store_bf16_pair(d, ldd, grow, gcol + 8 * i, p.m, p.n, acc[4 * i], acc[4 * i + 1]);
                store_bf16_pair(d, ldd, grow + 8, gcol + 8 * i, p.m, p.n, acc[4 * i + 2], acc[4 * i + 3]);
            }
        }
    }
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
