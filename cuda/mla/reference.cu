// MLA reference attention: the simple GPU reference and fallback, any latent and rope width up
// to R1_MLA_REF_MAX_*, one CTA per (head, query, sequence).
// Contracts (buffers, grids, blocks, numerics): cuda/params/mla.h.
#include <cuda_bf16.h>
#include <stdint.h>

#include "params/mla.h"
#include "mla/common.cuh"

using namespace r1::mla;

// CTA (h, i, b): query token i of sequence b, head h. Warp w takes keys w, w + 4, ...: the
// lanes split the dot product (lane owns columns lane + 32u), then keep an online softmax
// (m, l) and the lane's 16 output columns. The four warps merge through shared memory.

extern "C" __global__ void __launch_bounds__(R1_MLA_REF_THREADS) mla_attn_ref(const R1MlaAttnRefParams p) {
    constexpr int WARPS = R1_MLA_REF_THREADS / 32;
    constexpr int PER_LANE = R1_MLA_REF_MAX_KV_LORA / 32;
    __shared__ float s_q[R1_MLA_REF_MAX_WIDTH];
    __shared__ float s_o[WARPS][R1_MLA_REF_MAX_KV_LORA];
    __shared__ float s_m[WARPS];
    __shared__ float s_l[WARPS];

    const int h = blockIdx.x;
    const int i = blockIdx.y;
    const int b = blockIdx.z;
    const SeqInfo si = seq_info(reinterpret_cast<const int*>(p.q_starts), reinterpret_cast<const int*>(p.seqlens_k),
                                b, p.total_q, p.max_q_len, p.bt_stride);
    if (i >= si.q_len) return;  // uniform over the CTA

    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const int kv_lora = p.kv_lora;
    const int width = kv_lora + p.rope;
    const int64_t row = static_cast<int64_t>(si.q_start + i) * p.heads + h;
    const __nv_bfloat16* q = reinterpret_cast<const __nv_bfloat16*>(p.q) + row * width;
    for (int c = threadIdx.x; c < width; c += R1_MLA_REF_THREADS) s_q[c] = bf(q[c]);
    __syncthreads();

    const int* table = reinterpret_cast<const int*>(p.block_table) + static_cast<int64_t>(b) * p.bt_stride;
    const __nv_bfloat16* cache = reinterpret_cast<const __nv_bfloat16*>(p.cache);
    const int last = si.kv_len - si.q_len + i;  // keys 0 ..= last (causal)

    float m = neg_inf();
    float l = 0.0f;
    float o[PER_LANE];
#pragma unroll
    for (int u = 0; u < PER_LANE; u++) o[u] = 0.0f;

    for (int j = warp; j <= last; j += WARPS) {
        const int page = table[j / PAGE];
        float v[PER_LANE];
        float dot = 0.0f;
        if (page >= 0 && page < p.num_pages) {
            const __nv_bfloat16* k = cache + (static_cast<int64_t>(page) * PAGE + j % PAGE) * width;
#pragma unroll
            for (int u = 0; u < PER_LANE; u++) {
                const int c = lane + 32 * u;
                v[u] = c < kv_lora ? bf(k[c]) : 0.0f;
                if (c < kv_lora) dot = fmaf(s_q[c], v[u], dot);
            }
            for (int c = kv_lora + lane; c < width; c += 32) dot = fmaf(s_q[c], bf(k[c]), dot);
        } else {  // an invalid page reads as zeros (as the TMA path does)
#pragma unroll
            for (int u = 0; u < PER_LANE; u++) v[u] = 0.0f;
        }
        const float s = warp_sum(dot) * p.scale;
        const float m_new = fmaxf(m, s);
        const float alpha = expf(m - m_new);  // m = -inf: 0
        const float pj = expf(s - m_new);
        l = fmaf(l, alpha, pj);
#pragma unroll
        for (int u = 0; u < PER_LANE; u++) o[u] = fmaf(o[u], alpha, pj * v[u]);
        m = m_new;
    }

    if (lane == 0) {
        s_m[warp] = m;
        s_l[warp] = l;
    }
#pragma unroll
    for (int u = 0; u < PER_LANE; u++) {
        const int c = lane + 32 * u;
        if (c < kv_lora) s_o[warp][c] = o[u];
    }
    __syncthreads();

    float mx = neg_inf();
#pragma unroll
    for (int w = 0; w < WARPS; w++) mx = fmaxf(mx, s_m[w]);
    float wgt[WARPS];
    float total = 0.0f;
#pragma unroll
    for (int w = 0; w < WARPS; w++) {
        wgt[w] = s_m[w] == neg_inf() ? 0.0f : expf(s_m[w] - mx);
        total = fmaf(s_l[w], wgt[w], total);
    }
    const float inv = total > 0.0f ? 1.0f / total : 0.0f;
    __nv_bfloat16* out = reinterpret_cast<__nv_bfloat16*>(p.out) + row * kv_lora;
    for (int c = threadIdx.x; c < kv_lora; c += R1_MLA_REF_THREADS) {
        float acc = 0.0f;
#pragma unroll
        for (int w = 0; w < WARPS; w++) acc = fmaf(s_o[w][c], wgt[w], acc);
        out[c] = __float2bfloat16_rn(acc * inv);
    }
    if (threadIdx.x == 0) reinterpret_cast<float*>(p.lse)[row] = total > 0.0f ? mx + logf(total) : neg_inf();
}
