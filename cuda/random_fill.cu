// random_fill: synthetic weights generated on the device from a counter hash, so a
// real-dimension model needs neither a checkpoint nor a host upload. Contract:
// cuda/params/random_fill.h.
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <stdint.h>

#include "params/random_fill.h"

namespace {

__device__ __forceinline__ uint64_t splitmix64(uint64_t x) {
    x ^= x >> 30;
    x *= 0xBF58476D1CE4E5B9ull;
    x ^= x >> 27;
    x *= 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

// x_i of the header: exact u in [-1, 1), then one fused multiply-add.
__device__ __forceinline__ float value_at(const R1RandomFillParams& p, uint64_t i) {
    const uint64_t z = splitmix64(p.seed + (i + 1) * 0x9E3779B97F4A7C15ull);
    const float u = __fsub_rn(__fmul_rn(static_cast<float>(z >> 40), 1.0f / 8388608.0f), 1.0f);
    return __fmaf_rn(p.spread, u, p.center);
}

}  // namespace

extern "C" __global__ void __launch_bounds__(R1_FILL_THREADS) random_fill(const R1RandomFillParams p) {
    const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < p.n; i += stride) {
        const float v = value_at(p, static_cast<uint64_t>(i));
        if (p.kind == R1_FILL_E4M3) {
            reinterpret_cast<__nv_fp8_storage_t*>(p.out)[i] =
                __nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3);
        } else if (p.kind == R1_FILL_BF16) {
            reinterpret_cast<__nv_bfloat16*>(p.out)[i] = __float2bfloat16_rn(v);
        } else {
            reinterpret_cast<float*>(p.out)[i] = v;
        }
    }
}
