// MLA combine (mla_combine): the log-sum-exp merge of the split-KV partial results of the wgmma
// decode (cuda/mla/decode.cu) for sequences whose keys were split over several parts.
// Contract (buffers, grid, block, numerics): cuda/params/mla.h.
#include <cuda_bf16.h>
#include <stdint.h>

#include "params/mla.h"
#include "mla/common.cuh"

using namespace r1::mla;

extern "C" __global__ void __launch_bounds__(R1_MLA_COMBINE_THREADS) mla_combine(const R1MlaCombineParams p) {
    const int b = blockIdx.y;
    const int* splits = reinterpret_cast<const int*>(p.splits);
    const int s0 = splits[b];
    const int ns = splits[b + 1] - s0;
    if (ns <= 1 || s0 < 0 || s0 + ns > p.slots) return;
    int q_start, q_len;
    q_range(reinterpret_cast<const int*>(p.q_starts), b, p.total_q, p.max_q_len, q_start, q_len);
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const int r = blockIdx.x * (R1_MLA_COMBINE_THREADS / 32) + warp;
    if (r >= q_len * p.heads) return;
    const int64_t rows_cap = static_cast<int64_t>(p.max_q_len) * p.heads;
    const float* lacc = reinterpret_cast<const float*>(p.lse_accum) + s0 * rows_cap + r;

    float mx = neg_inf();
    for (int s = lane; s < ns; s += 32) mx = fmaxf(mx, lacc[s * rows_cap]);
    mx = warp_max(mx);

    float4 acc[4];
#pragma unroll
    for (int k = 0; k < 4; k++) acc[k] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    float sum = 0.0f;
    if (mx != neg_inf()) {
        for (int s = 0; s < ns; s++) {
            const float wgt = exp2f(lacc[s * rows_cap] - mx);
            sum += wgt;
            const float4* o =
                reinterpret_cast<const float4*>(reinterpret_cast<const float*>(p.o_accum) + ((s0 + s) * rows_cap + r) * KV);
#pragma unroll
            for (int k = 0; k < 4; k++) {
                const float4 v = o[lane + 32 * k];
                acc[k].x = fmaf(wgt, v.x, acc[k].x);
                acc[k].y = fmaf(wgt, v.y, acc[k].y);
                acc[k].z = fmaf(wgt, v.z, acc[k].z);
                acc[k].w = fmaf(wgt, v.w, acc[k].w);
            }
        }
    }
    const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
    const int64_t grow = static_cast<int64_t>(q_start) * p.heads + r;
    __nv_bfloat16* out = reinterpret_cast<__nv_bfloat16*>(p.out) + grow * KV;
#pragma unroll
    for (int k = 0; k < 4; k++) {
        const int col = 4 * (lane + 32 * k);
        *reinterpret_cast<__nv_bfloat162*>(out + col) = __floats2bfloat162_rn(acc[k].x * inv, acc[k].y * inv);
        *reinterpret_cast<__nv_bfloat162*>(out + col + 2) = __floats2bfloat162_rn(acc[k].z * inv, acc[k].w * inv);
    }
    if (lane == 0) reinterpret_cast<float*>(p.lse)[grow] = sum > 0.0f ? (mx + log2f(sum)) * LN2 : neg_inf();
}
