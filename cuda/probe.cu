// Layout probes (cuda/params/probe.h): diagnostics that run one piece of the fast
// kernels' machinery in isolation. tests/gpu_probes.rs reads their raw results.
//
//   probe_wgmma_m64n128k32     one wgmma m64n128k32 e4m3 on hand-swizzled shared memory
//   probe_wgmma_m64n128k32x4   four of them over K = 128 (the GEMM pipeline's k-advance)
//
// No TMA here: the operands are written with generic stores in the 128-byte swizzle that
// TMA's CU_TENSOR_MAP_SWIZZLE_128B produces, so a wrong result points at the descriptor, the
// k-advance or the fragment layout, not at a tensor map.

#include <stdint.h>

#include "params/probe.h"
#include "ptx.cuh"

namespace {

constexpr int ROWS_A = 64;
constexpr int ROWS_B = 128;
constexpr int ROW_BYTES = 128;  // one swizzle row: K up to 128 fp8
constexpr int CHUNKS = ROW_BYTES / 16;
constexpr int A_BYTES = ROWS_A * ROW_BYTES;
constexpr int B_BYTES = ROWS_B * ROW_BYTES;
static_assert(A_BYTES + B_BYTES == R1_PROBE_WGMMA_SMEM_BYTES, "params/probe.h");
static_assert(A_BYTES % 1024 == 0, "the B tile starts on a swizzle atom");

// Byte offset of 16-byte chunk `chunk` of row `row` in a K-major tile as TMA writes it with
// the 128-byte swizzle: rows of 128 bytes, the chunk index XORed with row % 8 (on offsets from
// a 1024-aligned base, this is CUTLASS's Swizzle<3,4,3>: bits 4-6 ^= bits 7-9).
__device__ __forceinline__ int sw128_chunk_offset(int row, int chunk) {
    return row * ROW_BYTES + ((chunk ^ (row % 8)) * 16);
}

// rows x K bytes (row stride K) from global memory into the swizzled tile; chunks past K are
// zeroed so that every byte a descriptor could reach is defined.
template <int K>
__device__ __forceinline__ void stage_tile(uint8_t* tile, const uint8_t* src, int rows) {
    for (int i = threadIdx.x; i < rows * CHUNKS; i += R1_PROBE_WGMMA_THREADS) {
        const int row = i / CHUNKS;
        const int chunk = i % CHUNKS;
        uint4 v = make_uint4(0u, 0u, 0u, 0u);
        if (chunk * 16 < K) v = *reinterpret_cast<const uint4*>(src + row * K + chunk * 16);
        *reinterpret_cast<uint4*>(tile + sw128_chunk_offset(row, chunk)) = v;
    }
}

template <int K_STEPS>
__device__ __forceinline__ void probe_wgmma(const R1ProbeWgmmaParams& p) {
    constexpr int K = 32 * K_STEPS;
    static_assert(K <= ROW_BYTES, "one swizzle row holds the whole K");
    extern __shared__ __align__(1024) uint8_t smem_raw[];
    const uint32_t base = r1::aligned_dynamic_smem(smem_raw);

    stage_tile<K>(smem_raw, reinterpret_cast<const uint8_t*>(p.a), ROWS_A);
    stage_tile<K>(smem_raw + A_BYTES, reinterpret_cast<const uint8_t*>(p.b), ROWS_B);
    r1::fence_proxy_async_smem();  // generic stores -> the tensor cores' (async proxy) reads
    __syncthreads();

    const uint64_t desc_a = r1::smem_desc_k_sw128(base);
    const uint64_t desc_b = r1::smem_desc_k_sw128(base + A_BYTES);
    float d[64];
#pragma unroll
    for (int j = 0; j < 64; j++) {
        d[j] = 0.0f;
        r1::fence_reg(d[j]);
    }
    r1::wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < K_STEPS; ks++)  // +32 bytes of K = +2 in the descriptor
        r1::wgmma_m64n128k32_e4m3(d, desc_a + 2 * ks, desc_b + 2 * ks, ks > 0);
    r1::wgmma_commit();
    r1::wgmma_wait<0>();
#pragma unroll
    for (int j = 0; j < 64; j++) r1::fence_reg(d[j]);

    float4* out = reinterpret_cast<float4*>(p.out) + threadIdx.x * 16;
#pragma unroll
    for (int j = 0; j < 64; j += 4) out[j / 4] = make_float4(d[j], d[j + 1], d[j + 2], d[j + 3]);
}

}  // namespace

extern "C" __global__ void __launch_bounds__(R1_PROBE_WGMMA_THREADS, 1)
probe_wgmma_m64n128k32(const __grid_constant__ R1ProbeWgmmaParams p) {
    probe_wgmma<1>(p);
}

extern "C" __global__ void __launch_bounds__(R1_PROBE_WGMMA_THREADS, 1)
probe_wgmma_m64n128k32x4(const __grid_constant__ R1ProbeWgmmaParams p) {
    probe_wgmma<4>(p);
}
