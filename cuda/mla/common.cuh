// Device code shared by the MLA kernels (cuda/mla/*.cu): the cache page size, warp reductions,
// and the clamped reading of a sequence's query range and key count.
#pragma once

#include <cuda_bf16.h>
#include <stdint.h>

#include "params/mla.h"

namespace r1 {
namespace mla {

constexpr int PAGE = R1_MLA_PAGE_TOKENS;
constexpr int KV = R1_MLA_KV_LORA;  // latent width of the fast path (512)
constexpr float LN2 = 0.693147180559945309f;

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

__device__ __forceinline__ float bf(const __nv_bfloat16 v) { return __bfloat162float(v); }

// A sequence's query range and key count, clamped so that no device value can send an
// access out of bounds (cuda/params/mla.h: "Device data are never trusted").
struct SeqInfo {
    int q_start;
    int q_len;
    int kv_len;
};

__device__ __forceinline__ void q_range(const int* q_starts, int b, int total_q, int max_q_len, int& q_start,
                                        int& q_len) {
    const int q0 = q_starts[b];
    const int q1 = q_starts[b + 1];
    if (q0 < 0 || q1 < q0 || q1 > total_q) {
        q_start = 0;
        q_len = 0;
    } else {
        q_start = q0;
        q_len = min(q1 - q0, max_q_len);
    }
}

__device__ __forceinline__ int kv_len_of(const int* seqlens_k, int b, int bt_stride) {
    return min(max(seqlens_k[b], 0), bt_stride * PAGE);
}

__device__ __forceinline__ SeqInfo seq_info(const int* q_starts, const int* seqlens_k, int b, int total_q,
                                            int max_q_len, int bt_stride) {
    SeqInfo s;
    q_range(q_starts, b, total_q, max_q_len, s.q_start, s.q_len);
    s.kv_len = kv_len_of(seqlens_k, b, bt_stride);
    return s;
}

}  // namespace mla
}  // namespace r1
