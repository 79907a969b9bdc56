// act_quant: bf16 activations -> fp8 e4m3 + one f32 scale per row per 128 channels.
// Contract (buffers, grid, block, numerics): cuda/params/act_quant.h, R1ActQuantParams.
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <stdint.h>

#include "params/act_quant.h"
#include "ptx.cuh"

namespace {

constexpr int kThreadsPerGroup = R1_QUANT_BLOCK / 16;  // 16 channels per thread
static_assert(R1_ACT_QUANT_THREADS / kThreadsPerGroup == R1_ACT_QUANT_GROUPS_PER_BLOCK, "layout");

__device__ __forceinline__ float bf16_lo(uint32_t w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float bf16_hi(uint32_t w) { return __uint_as_float(w & 0xFFFF0000u); }

// Two floats -> two e4m3 bytes (round to nearest even, saturating to +-448), `a` in the low byte.
__device__ __forceinline__ uint32_t to_e4m3x2(float a, float b) {
    return __nv_cvt_float2_to_fp8x2(make_float2(a, b), __NV_SATFINITE, __NV_E4M3);
}

}  // namespace

extern "C" __global__ void __launch_bounds__(R1_ACT_QUANT_THREADS)
act_quant(const R1ActQuantParams p) {
    const int kblocks = p.k / R1_QUANT_BLOCK;
    const int64_t groups = static_cast<int64_t>(p.m) * kblocks;
    const int64_t g = static_cast<int64_t>(blockIdx.x) * R1_ACT_QUANT_GROUPS_PER_BLOCK +
                      threadIdx.x / kThreadsPerGroup;
    if (g >= groups) return;  // whole 8-lane groups leave together

    const int sub = threadIdx.x % kThreadsPerGroup;
    const int kb = static_cast<int>(g / p.m);
    const int row = static_cast<int>(g - static_cast<int64_t>(kb) * p.m);
    const int col = kb * R1_QUANT_BLOCK + sub * 16;

    const uint4* src = reinterpret_cast<const uint4*>(
        reinterpret_cast<const __nv_bfloat16*>(p.x) + static_cast<int64_t>(row) * p.ldx + col);
    const uint4 v0 = r1::ld_global_nc_stream_v4(src);  // activations are read once
    const uint4 v1 = r1::ld_global_nc_stream_v4(src + 1);
    const uint32_t w[8] = {v0.x, v0.y, v0.z, v0.w, v1.x, v1.y, v1.z, v1.w};

    float x[16];
#pragma unroll
    for (int i = 0; i < 8; i++) {
        x[2 * i] = bf16_lo(w[i]);
        x[2 * i + 1] = bf16_hi(w[i]);
    }
    float amax = 0.0f;
#pragma unroll
    for (int i = 0; i < 16; i++) amax = fmaxf(amax, fabsf(x[i]));

    // Reduce over the 8 lanes of this group (lanes 8*j .. 8*j+7 of the warp).
    const uint32_t lane = threadIdx.x % 32;
    const uint32_t mask = 0xFFu << (lane & ~7u);
#pragma unroll
    for (int off = kThreadsPerGroup / 2; off > 0; off /= 2)
        amax = fmaxf(amax, __shfl_xor_sync(mask, amax, off));

    const float s = __fdiv_rn(fmaxf(amax, 1e-4f), 448.0f);

    uint32_t packed[4];
#pragma unroll
    for (int i = 0; i < 4; i++) {
        const uint32_t lo = to_e4m3x2(__fdiv_rn(x[4 * i], s), __fdiv_rn(x[4 * i + 1], s));
        const uint32_t hi = to_e4m3x2(__fdiv_rn(x[4 * i + 2], s), __fdiv_rn(x[4 * i + 3], s));
        packed[i] = lo | (hi << 16);
    }
    uint8_t* dst = reinterpret_cast<uint8_t*>(p.q) + static_cast<int64_t>(row) * p.ldq + col;
    *reinterpret_cast<uint4*>(dst) = make_uint4(packed[0], packed[1], packed[2], packed[3]);

    if (sub == 0)
        reinterpret_cast<float*>(p.scales)[static_cast<int64_t>(kb) * p.m_pad + row] = s;
}
