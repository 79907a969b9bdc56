// bf16 tensor-core GEMM, batched: D[b] = A[b] x B[b]^T (B K-major), f32 accumulation, f32 or
// bf16 out, split-K with the fixed-order reduction of cuda/split_k.cuh. The decode path's bf16
// products run on it: lm_head, eh_proj and the MLA absorption products batched over heads.
//   bf16_gemm_wgmma  Hopper: TMA (rank-3 maps: {K, rows, batch}) + mbarrier pipeline + wgmma
//                    m64n128k16, warp-specialized, persistent over (tile, split) units.
// Contract (tensor maps, grid, block, smem, requirements): cuda/params/bf16_gemm.h. The
// CUDA-core reference is small_gemm_bf16 (cuda/small_ops.cu).
//
// CTA = 1 producer warpgroup (one thread issues TMA) + 1 consumer warpgroup (64 x 128 tile).
//   full[s]  : producer's expect_tx + TMA bytes  -> the consumer may read stage s
//   empty[s] : one arrive per consumer warp       -> the producer may refill stage s
// Per K-block the consumer issues 4 wgmma (k16 each) into one accumulator, commits them and
// waits only for the previous K-block's group, so one group is always in flight; that group's
// stage is then released. Nothing is promoted: the accumulator spans every K-block of a unit.
#include <cuda_bf16.h>
#include <stdint.h>

#include "params/bf16_gemm.h"
#include "ptx.cuh"
#include "split_k.cuh"

namespace {

constexpr int BM = R1_BF16_GEMM_BLOCK_M;
constexpr int BN = R1_BF16_GEMM_BLOCK_N;
constexpr int BK = R1_BF16_GEMM_BLOCK_K;
constexpr int STAGES = R1_BF16_GEMM_STAGES;
constexpr int kABytes = BM * BK * 2;
constexpr int kBBytes = BN * BK * 2;
constexpr int kStageBytes = kABytes + kBBytes;
constexpr int kSmemBytes = STAGES * kStageBytes + STAGES * 16;

static_assert(BK * 2 == 128, "one K-block row is one 128-byte swizzle row");
static_assert(BM == 64 && BN == 128, "one m64n128 consumer warpgroup");
static_assert(kABytes % 1024 == 0 && kBBytes % 1024 == 0, "swizzle atoms stay 1024-aligned");
static_assert(kSmemBytes == R1_BF16_GEMM_SMEM_BYTES, "params/bf16_gemm.h R1_BF16_GEMM_SMEM_BYTES");
static_assert(R1_BF16_GEMM_THREADS == 256, "producer + one consumer warpgroup");

struct Unit {
    int tile, split;
    int b, mb, nb;
    int kb_begin, kb_end;
};

__device__ __forceinline__ Unit unit_at(int u, int splits, int m_blocks, int n_blocks, int kblocks) {
    Unit x;
    x.tile = u / splits;
    x.split = u - x.tile * splits;
    const int per_batch = m_blocks * n_blocks;
    x.b = x.tile / per_batch;
    const int r = x.tile - x.b * per_batch;
    x.mb = r / n_blocks;
    x.nb = r - x.mb * n_blocks;
    x.kb_begin = r1::splitk::k_begin(kblocks, splits, x.split);
    x.kb_end = r1::splitk::k_begin(kblocks, splits, x.split + 1);
    return x;
}

// One pair of adjacent outputs (col, col + 1) of row `row`, masked to M x N.
template <bool F32>
__device__ __forceinline__ void store_pair(void* d, int64_t off, int row, int col, int m, int n, float lo, float hi) {
    if (row >= m || col >= n) return;
    if constexpr (F32) {
        float* dst = reinterpret_cast<float*>(d) + off;
        if (col + 1 < n)
            *reinterpret_cast<float2*>(dst) = make_float2(lo, hi);
        else
            *dst = lo;
    } else {
        __nv_bfloat16* dst = reinterpret_cast<__nv_bfloat16*>(d) + off;
        if (col + 1 < n)
            *reinterpret_cast<__nv_bfloat162*>(dst) = __floats2bfloat162_rn(lo, hi);
        else
            *dst = __float2bfloat16_rn(lo);
    }
}

// This thread's fragment (rows row, row + 8; columns col + 8i, +1) of the unit's tile.
template <bool F32>
__device__ __forceinline__ void store_tile(const R1Bf16GemmParams& p, const Unit& x, const float (&acc)[64], int row,
                                           int col) {
    const int64_t base = static_cast<int64_t>(x.b) * p.d_batch;
#pragma unroll
    for (int i = 0; i < 16; i++) {
        const int c = col + 8 * i;
        store_pair<F32>(reinterpret_cast<void*>(p.d), base + static_cast<int64_t>(row) * p.ldd + c, row, c, p.m, p.n,
                        acc[4 * i], acc[4 * i + 1]);
        store_pair<F32>(reinterpret_cast<void*>(p.d), base + static_cast<int64_t>(row + 8) * p.ldd + c, row + 8, c,
                        p.m, p.n, acc[4 * i + 2], acc[4 * i + 3]);
    }
}

}  // namespace

extern "C" __global__ void __launch_bounds__(R1_BF16_GEMM_THREADS, 1)
bf16_gemm_wgmma(const __grid_constant__ R1Bf16GemmParams p) {
    extern __shared__ __align__(1024) uint8_t smem_raw[];
    const uint32_t s_a = r1::aligned_dynamic_smem(smem_raw);
    const uint32_t s_b = s_a + STAGES * kABytes;
    const uint32_t s_full = s_b + STAGES * kBBytes;
    const uint32_t s_empty = s_full + STAGES * 8;

    const int m_blocks = (p.m + BM - 1) / BM;
    const int n_blocks = (p.n + BN - 1) / BN;
    const int kblocks = (p.k + BK - 1) / BK;
    const int splits = p.split_k.splits;
    const int units = p.batch * m_blocks * n_blocks * splits;

    if (threadIdx.x == 0) {
        for (int s = 0; s < STAGES; s++) {
            r1::mbar_init(s_full + 8 * s, 1);
            r1::mbar_init(s_empty + 8 * s, 4);  // one arrival per consumer warp
        }
        r1::fence_mbar_init();
        r1::fence_proxy_async_smem();
    }
    __syncthreads();

    if (threadIdx.x < 128) {
        // -------------------------------------------------------------------- producer
        if (threadIdx.x == 0) {
            r1::tma_prefetch_desc(&p.tmap_a);
            r1::tma_prefetch_desc(&p.tmap_b);
            int stage = 0;
            uint32_t phase = 0;
            for (int u = blockIdx.x; u < units; u += gridDim.x) {
                const Unit x = unit_at(u, splits, m_blocks, n_blocks, kblocks);
                for (int kb = x.kb_begin; kb < x.kb_end; kb++) {
                    const uint32_t full = s_full + 8 * stage;
                    r1::mbar_wait(s_empty + 8 * stage, phase ^ 1);
                    r1::mbar_arrive_expect_tx(full, kStageBytes);
                    r1::tma_load_3d(s_a + stage * kABytes, &p.tmap_a, full, kb * BK, x.mb * BM, x.b);
                    r1::tma_load_3d(s_b + stage * kBBytes, &p.tmap_b, full, kb * BK, x.nb * BN, x.b);
                    if (++stage == STAGES) {
                        stage = 0;
                        phase ^= 1;
                    }
                }
            }
        }
        return;
    }

    // ------------------------------------------------------------------------ consumer
    const int warp = (threadIdx.x % 128) / 32;
    const int lane = threadIdx.x % 32;
    const int row_in_tile = 16 * warp + lane / 4;  // this thread's rows: +0 and +8
    const int col_in_tile = 2 * (lane % 4);        // and columns +8i (+1)

    float acc[64];
#pragma unroll
    for (int j = 0; j < 64; j++) acc[j] = 0.0f;
    int stage = 0;
    uint32_t phase = 0;
    for (int u = blockIdx.x; u < units; u += gridDim.x) {
        const Unit x = unit_at(u, splits, m_blocks, n_blocks, kblocks);
        int prev_stage = -1;
        for (int kb = x.kb_begin; kb < x.kb_end; kb++) {
            r1::mbar_wait(s_full + 8 * stage, phase);
            const uint64_t desc_a = r1::smem_desc_k_sw128(s_a + stage * kABytes);
            const uint64_t desc_b = r1::smem_desc_k_sw128(s_b + stage * kBBytes);
#pragma unroll
            for (int j = 0; j < 64; j++) r1::fence_reg(acc[j]);
            r1::wgmma_fence();
#pragma unroll
            for (int ks = 0; ks < BK / 16; ks++)  // +32 bytes of K = +2 in the descriptor
                r1::wgmma_m64n128k16_bf16(acc, desc_a + 2 * ks, desc_b + 2 * ks, (kb > x.kb_begin || ks > 0) ? 1 : 0);
            r1::wgmma_commit();
            // The previous K-block's group has finished reading its stage: free it.
            r1::wgmma_wait<1>();
            if (prev_stage >= 0) {
                __syncwarp();
                if (lane == 0) r1::mbar_arrive(s_empty + 8 * prev_stage);
            }
            prev_stage = stage;
            if (++stage == STAGES) {
                stage = 0;
                phase ^= 1;
            }
        }
        r1::wgmma_wait<0>();
#pragma unroll
        for (int j = 0; j < 64; j++) r1::fence_reg(acc[j]);
        if (prev_stage >= 0) {
            __syncwarp();
            if (lane == 0) r1::mbar_arrive(s_empty + 8 * prev_stage);
        }

        if (splits > 1) {
            const int rows_valid = min(BM, p.m - x.mb * BM);
            if (!r1::splitk::reduce_slice<BM>(acc, p.split_k, x.tile, x.split, warp, rows_valid)) continue;
        }
        const int row = x.mb * BM + row_in_tile;
        const int col = x.nb * BN + col_in_tile;
        if (p.out_f32)
            store_tile<true>(p, x, acc, row, col);
        else
            store_tile<false>(p, x, acc, row, col);
    }
}
