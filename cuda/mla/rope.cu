// MLA cache write and q RoPE: the two kernels that put a step's new tokens into the form the
// attention kernels read, sharing the interleaved YaRN RoPE rounded as the CPU reference does.
//   mla_cache_write   rmsnorm(c_kv) * w | rope(k_pe) -> bf16 cache page slot, one warp per token
//   mla_q_rope        interleaved YaRN RoPE of q_pe (bf16 -> bf16, in place or into the q buffer)
// Contracts (buffers, grids, blocks, numerics): cuda/params/mla.h.
#include <cuda_bf16.h>
#include <stdint.h>

#include "params/mla.h"
#include "mla/common.cuh"
#include "mla/rope.cuh"

using namespace r1::mla;

extern "C" __global__ void __launch_bounds__(R1_MLA_CACHE_WRITE_THREADS)
mla_cache_write(const R1MlaCacheWriteParams p) {
    const int lane = threadIdx.x % 32;
    const int t = blockIdx.x * (R1_MLA_CACHE_WRITE_THREADS / 32) + threadIdx.x / 32;
    if (t >= p.tokens) return;
    const int seq = reinterpret_cast<const int*>(p.token_seq)[t];
    const int pos = reinterpret_cast<const int*>(p.positions)[t];
    if (seq < 0 || seq >= p.num_seqs || pos < 0 || pos / PAGE >= p.bt_stride) return;
    const int page = reinterpret_cast<const int*>(p.block_table)[static_cast<int64_t>(seq) * p.bt_stride + pos / PAGE];
    if (page < 0 || page >= p.num_pages) return;

    const int width = p.kv_lora + p.rope;
    const __nv_bfloat16* src = reinterpret_cast<const __nv_bfloat16*>(p.kv) + static_cast<int64_t>(t) * p.ld_kv;
    const __nv_bfloat16* w = reinterpret_cast<const __nv_bfloat16*>(p.norm_w);
    __nv_bfloat16* dst =
        reinterpret_cast<__nv_bfloat16*>(p.cache) + (static_cast<int64_t>(page) * PAGE + pos % PAGE) * width;

    float ss = 0.0f;
    for (int c = lane; c < p.kv_lora; c += 32) {
        const float v = bf(src[c]);
        ss = fmaf(v, v, ss);
    }
    ss = warp_sum(ss);
    const float mean = __fdiv_rn(ss, static_cast<float>(p.kv_lora));
    const float inv = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(mean, p.eps)));
    for (int c = lane; c < p.kv_lora; c += 32) {
        dst[c] = __float2bfloat16_rn(__fmul_rn(__fmul_rn(bf(src[c]), inv), bf(w[c])));
    }

    const float* inv_freq = reinterpret_cast<const float*>(p.inv_freq);
    for (int i = lane; i < p.rope / 2; i += 32) {
        float a, b;
        rope_pair(bf(src[p.kv_lora + 2 * i]), bf(src[p.kv_lora + 2 * i + 1]), inv_freq[i], pos,
                  p.attention_factor, a, b);
        dst[p.kv_lora + 2 * i] = __float2bfloat16_rn(a);
        dst[p.kv_lora + 2 * i + 1] = __float2bfloat16_rn(b);
    }
}

extern "C" __global__ void __launch_bounds__(R1_MLA_Q_ROPE_THREADS) mla_q_rope(const R1MlaQRopeParams p) {
    const int half = p.rope / 2;
    const int64_t idx = static_cast<int64_t>(blockIdx.x) * R1_MLA_Q_ROPE_THREADS + threadIdx.x;
    if (half <= 0 || idx >= static_cast<int64_t>(p.tokens) * p.heads * half) return;
    const int i = static_cast<int>(idx % half);
    const int64_t th = idx / half;
    const int h = static_cast<int>(th % p.heads);
    const int t = static_cast<int>(th / p.heads);
    const int pos = reinterpret_cast<const int*>(p.positions)[t];
    const __nv_bfloat16* src = reinterpret_cast<const __nv_bfloat16*>(p.src) +
                               static_cast<int64_t>(t) * p.src_ld_token + static_cast<int64_t>(h) * p.src_ld_head + 2 * i;
    __nv_bfloat16* dst = reinterpret_cast<__nv_bfloat16*>(p.dst) + static_cast<int64_t>(t) * p.dst_ld_token +
                         static_cast<int64_t>(h) * p.dst_ld_head + 2 * i;
    float a, b;
    rope_pair(bf(src[0]), bf(src[1]), reinterpret_cast<const float*>(p.inv_freq)[i], pos, p.attention_factor, a, b);
    dst[0] = __float2bfloat16_rn(a);
    dst[1] = __float2bfloat16_rn(b);
}
