// MLA (DeepSeek-V3 multi-head latent attention) on a paged latent KV cache, absorbed form.
//   mla_cache_write   rmsnorm(c_kv) * w | rope(k_pe) -> bf16 cache page slot, one warp per token
//   mla_q_rope        interleaved YaRN RoPE of q_pe (bf16 -> bf16, in place or into the q buffer)
//   mla_attn_ref      the simple GPU reference / fallback: one CTA per (head, query, sequence)
//   mla_schedule      split-KV tile scheduler (balances variable lengths over the SMs)
//   mla_decode_wgmma  the fast path: TMA + wgmma, split-KV, decode and chunked prefill
//   mla_combine       log-sum-exp merge of the split-KV partial results
// Contracts (buffers, grids, blocks, shared memory, numerics): cuda/launch_params.h, MLA section.
#include <cuda_bf16.h>
#include <stdint.h>

#include "launch_params.h"
#include "mla_wgmma.cuh"
#include "ptx.cuh"

namespace {

constexpr int PAGE = R1_MLA_PAGE_TOKENS;
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

// sin and cos of the f32 value `a`, rounded to f32 from a double evaluation: a is reduced by
// 2*pi in double (Cody-Waite, two-part constant; |a| < 2^24 keeps k exact), then sincospi
// runs on the reduced argument. Nearly always the correctly rounded f32 result (what the CPU's
// libm sinf/cosf return), without the local-memory Payne-Hanek path of sincosf for the large
// angles long contexts produce (position 163839 x inv_freq 1.0).
__device__ __forceinline__ void sincos_of_f32(float a, float& s, float& c) {
    constexpr double kTwoPiHi = 6.283185307179586;        // fl64(2 pi)
    constexpr double kTwoPiLo = 2.4492935982947064e-16;   // 2 pi - fl64(2 pi)
    constexpr double kInvTwoPi = 0.15915494309189535;
    constexpr double kInvPi = 0.3183098861837907;
    const double x = static_cast<double>(a);
    const double k = rint(x * kInvTwoPi);
    double r = fma(-k, kTwoPiHi, x);
    r = fma(-k, kTwoPiLo, r);
    double sd, cd;
    sincospi(r * kInvPi, &sd, &cd);
    s = static_cast<float>(sd);
    c = static_cast<float>(cd);
}

// Interleaved-pair RoPE of (a, b) at `pos`, exactly as the CPU reference rounds it: every
// product and sum rounded on its own (no FMA contraction).
__device__ __forceinline__ void rope_pair(float a, float b, float inv_freq, int pos, float attention_factor,
                                          float& out_a, float& out_b) {
    const float angle = __fmul_rn(static_cast<float>(pos), inv_freq);
    float s, c;
    sincos_of_f32(angle, s, c);
    c = __fmul_rn(c, attention_factor);
    s = __fmul_rn(s, attention_factor);
    out_a = __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s));
    out_b = __fadd_rn(__fmul_rn(b, c), __fmul_rn(a, s));
}

// A sequence's query range and key count, clamped so that no device value can send an
// access out of bounds (launch_params.h: "Device data are never trusted").
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

}  // namespace

// ============================================================================================
// Cache write and q RoPE
// ============================================================================================

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

// ============================================================================================
// Reference attention
// ============================================================================================
//
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

// ============================================================================================
// Split-KV scheduler
// ============================================================================================
//
// One thread walks the sequences (their block counts staged in shared memory by the warp):
// every part gets `payload` block-equivalents, a sequence costing its blocks plus a fixed
// overhead each time a part starts (or resumes) it. See launch_params.h for the outputs; the
// host mirror (src/cuda/ops/mla.rs, `mla_schedule_host`) is the same loop, and the host tests
// check that every block of every sequence is covered exactly once.

extern "C" __global__ void __launch_bounds__(32) mla_schedule(const R1MlaScheduleParams p) {
    __shared__ int nblk[R1_MLA_SCHED_MAX_BATCH];
    const int lane = threadIdx.x;
    const int batch = min(p.batch, R1_MLA_SCHED_MAX_BATCH);
    const int* seqlens = reinterpret_cast<const int*>(p.seqlens_k);
    for (int b = lane; b < batch; b += 32) nblk[b] = (kv_len_of(seqlens, b, p.bt_stride) + PAGE - 1) / PAGE;
    __syncwarp();
    if (lane != 0) return;

    const int64_t overhead = p.fixed_overhead;
    int64_t total = 0;
    for (int b = 0; b < batch; b++) total += nblk[b] + overhead;
    const int64_t parts = max(p.num_parts, 1);
    const int64_t payload = (total + parts - 1) / parts + overhead;

    int* sched = reinterpret_cast<int*>(p.sched);
    int* splits = reinterpret_cast<int*>(p.splits);
    splits[0] = 0;
    int cur_b = 0, cur_blk = 0, cur_split = 0, cum = 0;
    for (int part = 0; part < parts; part++) {
        int* out = sched + part * R1_MLA_SCHED_FIELDS;
        out[0] = cur_b;
        out[1] = cur_blk;
        out[4] = cur_split;
        out[5] = 0;
        out[6] = 0;
        out[7] = 0;
        int64_t remain = payload;
        while (cur_b < batch) {
            const int left = nblk[cur_b] - cur_blk;
            if (remain >= left + overhead) {  // the rest of cur_b fits in this part
                cum += cur_split + 1;
                splits[cur_b + 1] = cum;
                remain -= left + overhead;
                cur_b++;
                cur_blk = 0;
                cur_split = 0;
            } else {  // take what fits; the next part resumes cur_b with the next split index
                const int64_t take = remain - overhead;
                if (take > 0) {
                    cur_blk += static_cast<int>(take);
                    cur_split++;
                }
                break;
            }
        }
        if (cur_blk > 0) {
            out[2] = cur_b;
            out[3] = cur_blk;
        } else {
            out[2] = cur_b - 1;
            out[3] = cur_b > 0 ? nblk[cur_b - 1] : 0;
        }
    }
    // Never reached when the payload covers every sequence (it always does); keeps `splits`
    // well formed regardless.
    for (; cur_b < batch; cur_b++) {
        cum += cur_split + 1;
        cur_split = 0;
        splits[cur_b + 1] = cum;
    }
}

// ============================================================================================
// Fast path: TMA + wgmma
// ============================================================================================
//
// Shared memory (from the 1024-byte aligned dynamic base; every tile in 128-byte swizzle atoms of
// 8 rows x 128 bytes, as TMA writes them with CU_TENSOR_MAP_SWIZZLE_128B):
//   sQ       9 column blocks x (64 rows x 128 bytes): Q rows [c_kv latent 512 | rope 64]
//   sK[2]    the same for a 64-token cache page (two stages)
//   sP       64 rows x 64 keys bf16 (one column block): softmax numerators
//   stats    row maxima [2][64] and row sums [2][64] (f32) exchanged between warpgroups
//   bars     q_full, q_empty, k_full[2], k_empty[2]
// Warpgroup 0 = producer (thread 0 issues every TMA; registers lowered to
// R1_REALLOC_PRODUCER_REGS), warpgroups 1 and 2 = compute warpgroups c = 0 and 1 (registers
// raised to R1_REALLOC_CONSUMER_REGS).
//
// Operands of the tensor cores:
//   S = Q K^T   A = sQ   K-major (K = feature), B = sK K-major: wgmma m64n32k16, 36 steps of
//               16 features; warpgroup c takes keys [32c, 32c + 32) (B start + 32c rows).
//   O += P V    A = sP   K-major (K = key), B = sK's c_kv columns read N-major (N = feature,
//               consecutive within a 128-byte row): wgmma m64n256k16 with imm-trans-b = 1,
//               4 steps of 16 keys; warpgroup c takes features [256c, 256c + 256).
//   Descriptors (PTX ISA "matrix descriptor"): 128-byte swizzle; K-major: SBO = 1024 (next
//   8 rows), LBO unused; N-major: LBO = 8192 (next 64 features = next column block),
//   SBO = 1024 (next 8 keys). A K step of 16 bf16 inside a 128-byte row adds 32 bytes.

namespace {

constexpr int BM = R1_MLA_BLOCK_M;            // rows (query token, head) per CTA
constexpr int BN = PAGE;                      // keys per tile = one page
constexpr int KV = R1_MLA_KV_LORA;            // 512
constexpr int WIDTH = R1_MLA_KV_LORA + R1_MLA_ROPE;  // 576
constexpr int ROW_BYTES = WIDTH * 2;          // 1152
constexpr int CBLKS = WIDTH / 64;             // 9 column blocks of 64 bf16 = 128 bytes
constexpr int CB_BYTES = 64 * 128;            // one column block of a 64-row tile
constexpr int TILE_BYTES = CBLKS * CB_BYTES;  // 73728
constexpr int STAGES = 2;
constexpr int OFF_Q = 0;
constexpr int OFF_K = OFF_Q + TILE_BYTES;
constexpr int OFF_P = OFF_K + STAGES * TILE_BYTES;
constexpr int OFF_STATS = OFF_P + 64 * 128;
constexpr int OFF_BARS = OFF_STATS + 4 * 64 * 4;
constexpr int SMEM_BYTES = OFF_BARS + 64;
static_assert(SMEM_BYTES == R1_MLA_DECODE_SMEM_BYTES, "launch_params.h R1_MLA_DECODE_SMEM_BYTES");
static_assert(R1_MLA_DECODE_THREADS == 3 * 128, "one producer warpgroup + two compute warpgroups");
static_assert(WIDTH % 64 == 0 && KV == 512 && BM == 64 && BN == 64, "tile shapes");
static_assert(ROW_BYTES == 1152, "tensor-map rows (launch_params.h)");
constexpr int K_STEPS_QK = WIDTH / 16;  // 36
constexpr int K_STEPS_PV = BN / 16;     // 4
constexpr uint32_t CONSUMER_WARPS = 8;
constexpr uint32_t NAMED_BAR = 1;       // bar.sync id for the 256 compute threads

__device__ __forceinline__ void compute_bar() {
    asm volatile("bar.sync %0, %1;" ::"n"(NAMED_BAR), "n"(256) : "memory");
}

__device__ __forceinline__ uint64_t desc_sw128(uint32_t addr, uint32_t lbo_bytes, uint32_t sbo_bytes) {
    uint64_t desc = 0;
    desc |= static_cast<uint64_t>((addr & 0x3FFFF) >> 4);
    desc |= static_cast<uint64_t>((lbo_bytes & 0x3FFFF) >> 4) << 16;
    desc |= static_cast<uint64_t>((sbo_bytes & 0x3FFFF) >> 4) << 32;
    desc |= static_cast<uint64_t>(1) << 62;  // 128-byte swizzle
    return desc;
}
__device__ __forceinline__ uint64_t desc_k_major(uint32_t addr) { return desc_sw128(addr, 16, 1024); }
__device__ __forceinline__ uint64_t desc_n_major(uint32_t addr) { return desc_sw128(addr, CB_BYTES, 1024); }

// One (sequence, block range) of a part, as both roles see it.
struct Seg {
    bool active;  // this part has blocks of b and this head block has rows in b
    int blk0;     // first key block
    int ntiles;   // key blocks to run (after the causal limit of this head block; may be 0)
    int q_start;
    int q_len;
    int kv_len;
    int rows;     // valid rows of this head block (1..64)
    int split;    // partial-result slot (when nsplit > 1)
    int nsplit;
};

struct Part {
    int begin_b, begin_blk, end_b, end_blk, begin_split;
};

__device__ __forceinline__ Seg make_seg(const R1MlaDecodeParams& p, const Part& part, int b, int hb) {
    Seg s;
    s.active = false;
    const SeqInfo si = seq_info(reinterpret_cast<const int*>(p.q_starts), reinterpret_cast<const int*>(p.seqlens_k),
                                b, p.total_q, p.max_q_len, p.bt_stride);
    const int nblk = (si.kv_len + BN - 1) / BN;
    const int blk0 = b == part.begin_b ? part.begin_blk : 0;
    const int blk1 = min(b == part.end_b ? part.end_blk : nblk, nblk);
    const int rows_b = si.q_len * p.heads;
    const int row0 = hb * BM;
    if (blk0 >= blk1 || row0 >= rows_b) return s;
    s.active = true;
    s.q_start = si.q_start;
    s.q_len = si.q_len;
    s.kv_len = si.kv_len;
    s.rows = min(BM, rows_b - row0);
    // Causal: the last query token of this head block sees keys [0, kv_len - q_len + i_max].
    const int i_max = min(si.q_len - 1, (row0 + BM - 1) / p.heads);
    const int kv_lim = si.kv_len - si.q_len + i_max + 1;
    const int blk_lim = kv_lim > 0 ? (kv_lim + BN - 1) / BN : 0;
    s.blk0 = blk0;
    s.ntiles = max(0, min(blk1, blk_lim) - blk0);
    const int* splits = reinterpret_cast<const int*>(p.splits);
    const int first = splits[b];
    s.nsplit = splits[b + 1] - first;
    s.split = first + (b == part.begin_b ? part.begin_split : 0);
    // A sequence with several splits writes partial-result slot s.split: it must lie inside
    // the sequence's own slots and the workspace (a corrupt schedule writes nothing).
    if (s.nsplit > 1 && !(first >= 0 && s.split >= first && s.split < first + s.nsplit &&
                          first + s.nsplit <= p.slots))
        s.active = false;
    return s;
}

// Part `part` of the schedule, its sequence range clamped to the batch (device data are
// never trusted: a corrupt schedule may compute garbage but never reads or writes outside).
__device__ __forceinline__ Part read_part(const R1MlaDecodeParams& p, int part) {
    const int* f = reinterpret_cast<const int*>(p.sched) + static_cast<int64_t>(part) * R1_MLA_SCHED_FIELDS;
    return Part{max(f[0], 0), max(f[1], 0), min(f[2], p.batch - 1), f[3], max(f[4], 0)};
}

}  // namespace

extern "C" __global__ void __launch_bounds__(R1_MLA_DECODE_THREADS, 1)
mla_decode_wgmma(const __grid_constant__ R1MlaDecodeParams p) {
    extern __shared__ __align__(1024) uint8_t smem_raw[];
    const uint32_t base = r1::aligned_dynamic_smem(smem_raw);
    const uint32_t s_q = base + OFF_Q;
    const uint32_t s_k = base + OFF_K;
    const uint32_t s_p = base + OFF_P;
    float* s_max = reinterpret_cast<float*>(smem_raw + OFF_STATS);  // [2][64]
    float* s_sum = s_max + 2 * 64;                                // [2][64]
    const uint32_t bar_q_full = base + OFF_BARS;
    const uint32_t bar_q_empty = bar_q_full + 8;
    const uint32_t bar_k_full = bar_q_full + 16;   // + 8 * stage
    const uint32_t bar_k_empty = bar_q_full + 32;  // + 8 * stage

    const int hb = blockIdx.x;
    const Part part = read_part(p, blockIdx.y);
    const int warp_idx = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;

    if (threadIdx.x == 0) {
        r1::mbar_init(bar_q_full, 1);
        r1::mbar_init(bar_q_empty, CONSUMER_WARPS);
        for (int s = 0; s < STAGES; s++) {
            r1::mbar_init(bar_k_full + 8 * s, 1);
            r1::mbar_init(bar_k_empty + 8 * s, CONSUMER_WARPS);
        }
        r1::fence_mbar_init();
        r1::fence_proxy_async_smem();
    }
    __syncthreads();

    if (warp_idx < 4) {
        // ------------------------------------------------------------------ producer
        r1::setmaxnreg_dec<R1_REALLOC_PRODUCER_REGS>();
        if (threadIdx.x != 0) return;
        r1::tma_prefetch_desc(&p.tmap_q);
        r1::tma_prefetch_desc(&p.tmap_cache);
        int stage = 0;
        uint32_t kphase = 0;
        uint32_t qphase = 0;
        for (int b = part.begin_b; b <= part.end_b; b++) {
            const Seg s = make_seg(p, part, b, hb);
            if (!s.active || s.ntiles == 0) continue;
            const int* table = reinterpret_cast<const int*>(p.block_table) + static_cast<int64_t>(b) * p.bt_stride;
            auto load_k = [&](int t) {
                const int page = table[s.blk0 + t];
                // An invalid page id becomes the first row past the cache: TMA fills zeros.
                const int row = (page >= 0 && page < p.num_pages) ? page * PAGE : p.num_pages * PAGE;
                r1::mbar_wait(bar_k_empty + 8 * stage, kphase ^ 1);
                const uint32_t full = bar_k_full + 8 * stage;
                r1::mbar_arrive_expect_tx(full, TILE_BYTES);
                const uint32_t dst = s_k + stage * TILE_BYTES;
#pragma unroll
                for (int cb = 0; cb < CBLKS; cb++) r1::tma_load_2d(dst + cb * CB_BYTES, &p.tmap_cache, full, cb * 128, row);
                if (++stage == STAGES) {
                    stage = 0;
                    kphase ^= 1;
                }
            };
            // The first page goes out before Q so that it overlaps the previous sequence's tail.
            load_k(0);
            r1::mbar_wait(bar_q_empty, qphase ^ 1);
            r1::mbar_arrive_expect_tx(bar_q_full, TILE_BYTES);
            const int qrow = s.q_start * p.heads + hb * BM;
#pragma unroll
            for (int cb = 0; cb < CBLKS; cb++) r1::tma_load_2d(s_q + cb * CB_BYTES, &p.tmap_q, bar_q_full, cb * 128, qrow);
            qphase ^= 1;
            for (int t = 1; t < s.ntiles; t++) load_k(t);
        }
        return;
    }

    // ---------------------------------------------------------------------- compute
    r1::setmaxnreg_inc<R1_REALLOC_CONSUMER_REGS>();
    const int c = warp_idx / 4 - 1;      // keys [32c, 32c+32) of S, features [256c, 256c+256) of O
    const int w = warp_idx % 4;
    const int r0 = 16 * w + lane / 4;    // this thread's rows: r0 and r0 + 8
    const int quad = lane % 4;
    const int rows_cap = p.max_q_len * p.heads;
    int stage = 0;
    uint32_t kphase = 0;
    uint32_t qphase = 0;

    for (int b = part.begin_b; b <= part.end_b; b++) {
        const Seg s = make_seg(p, part, b, hb);
        if (!s.active) continue;

        // Last visible key of rows r0 and r0 + 8 (padding rows reuse the last query token).
        int lim[2];
#pragma unroll
        for (int i = 0; i < 2; i++) {
            const int qi = min((hb * BM + r0 + 8 * i) / p.heads, s.q_len - 1);
            lim[i] = s.kv_len - s.q_len + qi;
        }

        float o[128];
#pragma unroll
        for (int j = 0; j < 128; j++) o[j] = 0.0f;
        float m[2] = {neg_inf(), neg_inf()};
        float l[2] = {0.0f, 0.0f};

        if (s.ntiles > 0) {
            r1::mbar_wait(bar_q_full, qphase);
            qphase ^= 1;
            for (int t = 0; t < s.ntiles; t++) {
                const int blk = s.blk0 + t;
                const uint32_t sk = s_k + stage * TILE_BYTES;
                r1::mbar_wait(bar_k_full + 8 * stage, kphase);

                // ---- S = Q K^T for keys [32c, 32c + 32) of the tile
                float sc[16];
#pragma unroll
                for (int j = 0; j < 16; j++) {
                    sc[j] = 0.0f;
                    r1::fence_reg(sc[j]);
                }
                r1::wgmma_fence();
#pragma unroll
                for (int ks = 0; ks < K_STEPS_QK; ks++) {
                    const uint32_t koff = (ks / 4) * CB_BYTES + (ks % 4) * 32;
                    r1::mla::wgmma_m64n32k16_bf16(sc, desc_k_major(s_q + koff),
                                                  desc_k_major(sk + koff + c * 32 * 128), ks > 0);
                }
                r1::wgmma_commit();
                r1::wgmma_wait<0>();
#pragma unroll
                for (int j = 0; j < 16; j++) r1::fence_reg(sc[j]);

                // ---- scale (log2 domain), causal / length mask, row maxima
                const int key0 = blk * BN + 32 * c + 2 * quad;
                float mx[2] = {neg_inf(), neg_inf()};
#pragma unroll
                for (int j = 0; j < 16; j++) {
                    const int i = (j / 2) % 2;
                    const int key = key0 + 8 * (j / 4) + (j % 2);
                    sc[j] = key <= lim[i] ? sc[j] * p.scale_log2 : neg_inf();
                    mx[i] = fmaxf(mx[i], sc[j]);
                }
#pragma unroll
                for (int i = 0; i < 2; i++) {
                    mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 1));
                    mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 2));
                }
                if (quad == 0) {
                    s_max[c * 64 + r0] = mx[0];
                    s_max[c * 64 + r0 + 8] = mx[1];
                }
                compute_bar();  // both halves' maxima written; both warpgroups' S reads of sK done

                float alpha[2], m_use[2];
#pragma unroll
                for (int i = 0; i < 2; i++) {
                    const int rr = r0 + 8 * i;
                    const float m_new = fmaxf(m[i], fmaxf(s_max[rr], s_max[64 + rr]));
                    alpha[i] = m_new == neg_inf() ? 1.0f : exp2f(m[i] - m_new);
                    m_use[i] = m_new == neg_inf() ? 0.0f : m_new;
                    m[i] = m_new;
                }

                // ---- keys past the sequence: zero their V rows (this warpgroup's features) so
                // that stale cache contents (even NaN) cannot reach O through P = 0.
                const int nvalid = s.kv_len - blk * BN;
                if (nvalid < BN) {
                    const int tid = threadIdx.x % 128;
                    const int nzero = BN - nvalid;
                    uint8_t* tile = smem_raw + OFF_K + stage * TILE_BYTES;
                    for (int idx = tid; idx < 4 * nzero * 8; idx += 128) {
                        const int cb = 4 * c + idx / (nzero * 8);
                        const int rem = idx % (nzero * 8);
                        const int key = nvalid + rem / 8;
                        *reinterpret_cast<uint4*>(tile + cb * CB_BYTES + key * 128 + (rem % 8) * 16) =
                            make_uint4(0u, 0u, 0u, 0u);
                    }
                }

                // ---- P = exp2(S - m) -> bf16 into sP (128-byte swizzle), row sums
                float rs[2] = {0.0f, 0.0f};
                uint8_t* sp = smem_raw + OFF_P;
#pragma unroll
                for (int j = 0; j < 16; j += 2) {
                    const int i = (j / 2) % 2;
                    const float p0 = exp2f(sc[j] - m_use[i]);
                    const float p1 = exp2f(sc[j + 1] - m_use[i]);
                    rs[i] += p0 + p1;
                    const int row = r0 + 8 * i;
                    const int key = 32 * c + 8 * (j / 4) + 2 * quad;
                    *reinterpret_cast<__nv_bfloat162*>(sp + row * 128 + (((key >> 3) ^ (row & 7)) << 4) + (key & 7) * 2) =
                        __floats2bfloat162_rn(p0, p1);
                }
#pragma unroll
                for (int i = 0; i < 2; i++) l[i] = fmaf(l[i], alpha[i], rs[i]);
#pragma unroll
                for (int j = 0; j < 128; j++) o[j] *= alpha[(j / 2) % 2];
                r1::fence_proxy_async_smem();  // sP (and zeroed V rows) visible to the tensor cores
                compute_bar();        // both halves of P written

                // ---- O[:, 256c .. 256c + 256) += P V
#pragma unroll
                for (int j = 0; j < 128; j++) r1::fence_reg(o[j]);
                r1::wgmma_fence();
#pragma unroll
                for (int ks = 0; ks < K_STEPS_PV; ks++) {
                    r1::mla::wgmma_m64n256k16_bf16_bt(o, desc_k_major(s_p + ks * 32),
                                                      desc_n_major(sk + 4 * c * CB_BYTES + ks * 16 * 128), 1);
                }
                r1::wgmma_commit();
                r1::wgmma_wait<0>();
#pragma unroll
                for (int j = 0; j < 128; j++) r1::fence_reg(o[j]);

                __syncwarp();
                if (lane == 0) r1::mbar_arrive(bar_k_empty + 8 * stage);
                if (++stage == STAGES) {
                    stage = 0;
                    kphase ^= 1;
                }
            }
            __syncwarp();
            if (lane == 0) r1::mbar_arrive(bar_q_empty);
        }

        // ---- epilogue: total row sums across the quad and the two warpgroups
#pragma unroll
        for (int i = 0; i < 2; i++) {
            l[i] += __shfl_xor_sync(0xffffffffu, l[i], 1);
            l[i] += __shfl_xor_sync(0xffffffffu, l[i], 2);
        }
        if (quad == 0) {
            s_sum[c * 64 + r0] = l[0];
            s_sum[c * 64 + r0 + 8] = l[1];
        }
        compute_bar();
        float inv[2], lse2[2];
#pragma unroll
        for (int i = 0; i < 2; i++) {
            const int rr = r0 + 8 * i;
            const float total = s_sum[rr] + s_sum[64 + rr];
            inv[i] = total > 0.0f ? 1.0f / total : 0.0f;
            lse2[i] = total > 0.0f ? m[i] + log2f(total) : neg_inf();
        }
        compute_bar();  // s_sum reads done before the next sequence writes it

        const int local0 = hb * BM;  // row of this head block within the sequence's rows
        if (s.nsplit <= 1) {
            __nv_bfloat16* out = reinterpret_cast<__nv_bfloat16*>(p.out);
            float* lse = reinterpret_cast<float*>(p.lse);
            const int64_t grow0 = static_cast<int64_t>(s.q_start) * p.heads + local0;
#pragma unroll
            for (int i = 0; i < 2; i++) {
                const int row = r0 + 8 * i;
                if (row >= s.rows) continue;
                __nv_bfloat16* dst = out + (grow0 + row) * KV + 256 * c + 2 * quad;
#pragma unroll
                for (int n = 0; n < 32; n++) {
                    const int j = 4 * n + 2 * i;
                    *reinterpret_cast<__nv_bfloat162*>(dst + 8 * n) =
                        __floats2bfloat162_rn(o[j] * inv[i], o[j + 1] * inv[i]);
                }
                if (c == 0 && quad == 0) lse[grow0 + row] = lse2[i] * LN2;
            }
        } else {
            float* oacc = reinterpret_cast<float*>(p.o_accum);
            float* lacc = reinterpret_cast<float*>(p.lse_accum);
            const int64_t srow0 = static_cast<int64_t>(s.split) * rows_cap + local0;
#pragma unroll
            for (int i = 0; i < 2; i++) {
                const int row = r0 + 8 * i;
                if (row >= s.rows) continue;
                float* dst = oacc + (srow0 + row) * KV + 256 * c + 2 * quad;
#pragma unroll
                for (int n = 0; n < 32; n++) {
                    const int j = 4 * n + 2 * i;
                    *reinterpret_cast<float2*>(dst + 8 * n) = make_float2(o[j] * inv[i], o[j + 1] * inv[i]);
                }
                if (c == 0 && quad == 0) lacc[srow0 + row] = lse2[i];
            }
        }
    }
}

// ============================================================================================
// Combine
// ============================================================================================

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
