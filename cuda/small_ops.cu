// Small ops of the model graph that no specialised kernel covers: simple, obviously-correct
// CUDA-core kernels (one thread per element or a block per row), f32 arithmetic, one bf16
// rounding on store; and the decode path's fusions of them (RMSNorm with the residual add
// and act_quant, SiLU*up with act_quant, the q absorption with q RoPE), which share the
// unfused kernels' device code so that both give the same bits.
// Contract (buffers, grids, numerics): cuda/params/small_ops.h.
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <stdint.h>

#include "mla/rope.cuh"
#include "params/small_ops.h"
#include "silu.cuh"

namespace {

typedef __nv_bfloat16 bf16;

__device__ __forceinline__ float ld(const bf16* p, int64_t i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ void st(bf16* p, int64_t i, float v) { p[i] = __float2bfloat16_rn(v); }

// Sum over the block (blockDim.x a multiple of 32, at most 1024).
__device__ float block_sum(float v) {
    __shared__ float partial[32];
    for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    __syncthreads();  // partial[] may still be read by a previous call
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    const int warps = blockDim.x / 32;
    float total = 0.0f;
    for (int i = 0; i < warps; i++) total += partial[i];
    return total;
}

__device__ float block_max(float v) {
    __shared__ float partial[32];
    for (int off = 16; off > 0; off /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    __syncthreads();
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    const int warps = blockDim.x / 32;
    float m = 0.0f;
    for (int i = 0; i < warps; i++) m = fmaxf(m, partial[i]);
    return m;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int off = 16; off > 0; off /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
    return v;
}

// 1 / sqrt(mean(v^2) + eps) of the row whose element c is value(c) (called once per c, by
// the thread c % blockDim.x): per-thread fma sums in column order, then block_sum. The one
// RMSNorm statistic of small_rms_norm and small_rms_norm_quant.
template <typename Value>
__device__ __forceinline__ float row_inv_rms(Value value, int width, float eps) {
    float ss = 0.0f;
    for (int c = threadIdx.x; c < width; c += blockDim.x) {
        const float v = value(c);
        ss = fmaf(v, v, ss);
    }
    const float mean = __fdiv_rn(block_sum(ss), static_cast<float>(width));
    return __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(mean, eps)));
}

// The normalized element as small_rms_norm stores it: bf16((v * inv) * w).
__device__ __forceinline__ float normed(float v, float inv, float w) {
    return r1::round_bf16(__fmul_rn(__fmul_rn(v, inv), w));
}

// act_quant of one 128-channel group held by a warp, four values per lane (channel
// c0 + 32 i + lane; `in[i]` false past the row's end): amax (exact, any order), s =
// max(amax, 1e-4) / 448, q = e4m3(y / s) as act_quant and small_act_quant compute them.
__device__ __forceinline__ void quantize_group(const float (&y)[4], const bool (&in)[4], uint8_t* q, float* scale) {
    float amax = 0.0f;
#pragma unroll
    for (int i = 0; i < 4; i++)
        if (in[i]) amax = fmaxf(amax, fabsf(y[i]));
    amax = warp_max(amax);
    const float s = __fdiv_rn(fmaxf(amax, 1e-4f), 448.0f);
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int i = 0; i < 4; i++)
        if (in[i]) q[32 * i + lane] = __nv_cvt_float_to_fp8(__fdiv_rn(y[i], s), __NV_SATFINITE, __NV_E4M3);
    if (lane == 0) *scale = s;
}

// Columns of W_UK[h]^T (one 64-byte run of a kv_lora row) staged per pass of absorb_q.
constexpr int ABSORB_TILE_I = 32;

// One 128-channel group [c0, c0 + 128) of a row of `width` held by a warp (channel
// c0 + 32 i + lane, values value(c)): stored to `out` when given, then quantized into the group's
// codes `q` and its `scale` (quantize_group).
template <class Value>
__device__ __forceinline__ void store_quantize_group(Value value, int c0, int width, bf16* out, uint8_t* q,
                                                     float* scale) {
    const int lane = threadIdx.x % 32;
    float y[4];
    bool in[4];
#pragma unroll
    for (int i = 0; i < 4; i++) {
        const int c = c0 + 32 * i + lane;
        in[i] = c < width;
        y[i] = in[i] ? value(c) : 0.0f;
        if (in[i] && out) st(out, c, y[i]);
    }
    quantize_group(y, in, q, scale);
}

// q_lat[t][h][0..kv_lora) = q_nope[t][h] . W_UK[h] (small_mla_absorb_q's body), W_UK[h] held
// transposed, [kv_lora][nope] (cuda/params/small_ops.h). Thread l sums i ascending with fmaf,
// one bf16 rounding on store. The transposed rows are staged through shared memory, a
// [blockDim.x rows of l][32 columns of i] tile at a time, so that a warp loads 32 consecutive
// i of one row (coalesced); f32 rows padded to 33 keep both the warp's row write and the
// column read of thread l (bank (l + i) % 32) free of bank conflicts. Every thread of the
// block reaches the barriers (blockDim.x <= R1_SMALL_THREADS, >= ABSORB_TILE_I).
__device__ __forceinline__ void absorb_q(const R1SmallMlaAbsorbParams& p, int t, int h) {
    __shared__ float w[R1_SMALL_THREADS][ABSORB_TILE_I + 1];
    __shared__ float qs[ABSORB_TILE_I];
    const int qk = p.nope + p.rope;
    const bf16* q = reinterpret_cast<const bf16*>(p.src) + (static_cast<int64_t>(t) * p.heads + h) * qk;
    const bf16* wk = reinterpret_cast<const bf16*>(p.kv_b) +
                     static_cast<int64_t>(h) * (p.nope + p.v) * p.kv_lora;
    bf16* out = reinterpret_cast<bf16*>(p.dst) +
                (static_cast<int64_t>(t) * p.heads + h) * (p.kv_lora + p.rope);
    const int nt = blockDim.x;
    for (int l0 = 0; l0 < p.kv_lora; l0 += nt) {
        const int rows = min(nt, p.kv_lora - l0);
        const int l = l0 + static_cast<int>(threadIdx.x);
        float acc = 0.0f;
        for (int i0 = 0; i0 < p.nope; i0 += ABSORB_TILE_I) {
            const int cols = min(ABSORB_TILE_I, p.nope - i0);
            __syncthreads();  // the previous tile is read
            for (int e = threadIdx.x; e < rows * ABSORB_TILE_I; e += nt) {
                const int r = e / ABSORB_TILE_I, c = e % ABSORB_TILE_I;
                if (c < cols) w[r][c] = ld(wk, static_cast<int64_t>(l0 + r) * p.nope + i0 + c);
            }
            if (static_cast<int>(threadIdx.x) < cols) qs[threadIdx.x] = ld(q, i0 + threadIdx.x);
            __syncthreads();
            if (l < p.kv_lora)
                for (int c = 0; c < cols; c++) acc = fmaf(qs[c], w[threadIdx.x][c], acc);
        }
        if (l < p.kv_lora) st(out, l, acc);
    }
}

}  // namespace

extern "C" __global__ void __launch_bounds__(R1_SMALL_THREADS)
small_embed(const R1SmallEmbedParams p) {
    const int r = blockIdx.x;
    if (r >= p.rows) return;
    const int id = reinterpret_cast<const int32_t*>(p.ids)[r];
    const bf16* table = reinterpret_cast<const bf16*>(p.table);
    bf16* out = reinterpret_cast<bf16*>(p.out) + static_cast<int64_t>(r) * p.width;
    const bool ok = id >= 0 && id < p.vocab;
    for (int c = threadIdx.x; c < p.width; c += blockDim.x)
        out[c] = ok ? table[static_cast<int64_t>(id) * p.width + c] : __float2bfloat16_rn(0.0f);
}

extern "C" __global__ void __launch_bounds__(R1_SMALL_THREADS)
small_rms_norm(const R1SmallRmsNormParams p) {
    const int r = blockIdx.x;
    if (r >= p.rows) return;
    const bf16* x = reinterpret_cast<const bf16*>(p.x) + static_cast<int64_t>(r) * p.width;
    const bf16* w = reinterpret_cast<const bf16*>(p.w);
    bf16* out = reinterpret_cast<bf16*>(p.out) + static_cast<int64_t>(r) * p.width;
    const float inv = row_inv_rms([&](int c) { return ld(x, c); }, p.width, p.eps);
    for (int c = threadIdx.x; c < p.width; c += blockDim.x) st(out, c, normed(ld(x, c), inv, ld(w, c)));
}

extern "C" __global__ void __launch_bounds__(R1_SMALL_THREADS)
small_rms_norm_quant(const R1SmallNormQuantParams p) {
    const int r = blockIdx.x;
    if (r >= p.rows) return;
    const int64_t row = static_cast<int64_t>(r) * p.width;
    const bf16* x = reinterpret_cast<const bf16*>(p.x) + row;
    const bf16* res = p.residual ? reinterpret_cast<const bf16*>(p.residual) + row : nullptr;
    bf16* sum = p.residual ? reinterpret_cast<bf16*>(p.sum) + row : nullptr;
    const bf16* w = reinterpret_cast<const bf16*>(p.w);
    bf16* out = p.out ? reinterpret_cast<bf16*>(p.out) + row : nullptr;

    // Pass 1 (small_add, small_rms_norm's statistic): each thread reads x and residual at its
    // own columns before writing sum there, so sum may be x or residual.
    const float inv = row_inv_rms(
        [&](int c) {
            if (!res) return ld(x, c);
            const float s = r1::round_bf16(__fadd_rn(ld(x, c), ld(res, c)));
            st(sum, c, s);
            return s;
        },
        p.width, p.eps);
    // block_sum's barriers make every sum element visible to the whole block from here on;
    // out may alias x or residual, both consumed above.
    const bf16* v = res ? sum : x;

    if (!p.q) {
        for (int c = threadIdx.x; c < p.width; c += blockDim.x) st(out, c, normed(ld(v, c), inv, ld(w, c)));
        return;
    }
    // Pass 2: a warp per 128-channel group (small_rms_norm's values, then act_quant's).
    uint8_t* q = reinterpret_cast<uint8_t*>(p.q) + static_cast<int64_t>(r) * p.ldq;
    float* scales = reinterpret_cast<float*>(p.scales);
    const int warp = threadIdx.x / 32, warps = blockDim.x / 32;
    const int groups = (p.width + R1_QUANT_BLOCK - 1) / R1_QUANT_BLOCK;
    for (int g = warp; g < groups; g += warps) {
        const int c0 = g * R1_QUANT_BLOCK;
        store_quantize_group([&](int c) { return normed(ld(v, c), inv, ld(w, c)); }, c0, p.width, out, q + c0,
                             scales + static_cast<int64_t>(g) * p.m_pad + r);
    }
}

extern "C" __global__ void __launch_bounds__(R1_SMALL_THREADS)
small_add(const R1SmallEltwiseParams p) {
    const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i >= p.n) return;
    st(reinterpret_cast<bf16*>(p.out), i,
       ld(reinterpret_cast<const bf16*>(p.a), i) + ld(reinterpret_cast<const bf16*>(p.b), i));
}

extern "C" __global__ void __launch_bounds__(R1_SMALL_THREADS)
small_silu_mul(const R1SmallEltwiseParams p) {
    const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i >= p.n) return;
    const float g = ld(reinterpret_cast<const bf16*>(p.a), i);
    const float u = ld(reinterpret_cast<const bf16*>(p.b), i);
    st(reinterpret_cast<bf16*>(p.out), i, r1::silu_mul_bf16(g, u));
}

extern "C" __global__ void __launch_bounds__(R1_SMALL_THREADS)
small_silu_mul_quant(const R1SmallSiluQuantParams p) {
    const int groups = (p.width + R1_QUANT_BLOCK - 1) / R1_QUANT_BLOCK;
    const int64_t gi = static_cast<int64_t>(blockIdx.x) * (R1_SMALL_THREADS / 32) + threadIdx.x / 32;
    if (gi >= static_cast<int64_t>(p.rows) * groups) return;  // whole warps leave together
    const int r = static_cast<int>(gi / groups);
    const int g = static_cast<int>(gi - static_cast<int64_t>(r) * groups);
    const int c0 = g * R1_QUANT_BLOCK;
    const int64_t row = static_cast<int64_t>(r) * p.width;
    const bf16* gate = reinterpret_cast<const bf16*>(p.gate) + row;
    const bf16* up = reinterpret_cast<const bf16*>(p.up) + row;
    bf16* out = p.out ? reinterpret_cast<bf16*>(p.out) + row : nullptr;
    store_quantize_group([&](int c) { return r1::silu_mul_bf16(ld(gate, c), ld(up, c)); }, c0, p.width, out,
                         reinterpret_cast<uint8_t*>(p.q) + static_cast<int64_t>(r) * p.ldq + c0,
                         reinterpret_cast<float*>(p.scales) + static_cast<int64_t>(g) * p.m_pad + r);
}

extern "C" __global__ void __launch_bounds__(R1_SMALL_THREADS)
small_f32_to_bf16(const R1SmallEltwiseParams p) {
    const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i >= p.n) return;
    st(reinterpret_cast<bf16*>(p.out), i, reinterpret_cast<const float*>(p.a)[i]);
}

extern "C" __global__ void __launch_bounds__(R1_SMALL_THREADS)
small_copy_rows(const R1SmallCopyRowsParams p) {
    const int r = blockIdx.y;
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= p.rows || c >= p.cols) return;
    const int sr = p.row_map ? reinterpret_cast<const int32_t*>(p.row_map)[r] : r;
    const bf16* src = reinterpret_cast<const bf16*>(p.src);
    bf16* dst = reinterpret_cast<bf16*>(p.dst);
    dst[static_cast<int64_t>(r) * p.ldd + p.dst_col + c] =
        src[static_cast<int64_t>(sr) * p.lds + p.src_col + c];
}

extern "C" __global__ void __launch_bounds__(R1_SMALL_THREADS)
small_zero_pos0(const R1SmallZeroPos0Params p) {
    const int r = blockIdx.x;
    if (r >= p.rows || reinterpret_cast<const int32_t*>(p.positions)[r] != 0) return;
    bf16* x = reinterpret_cast<bf16*>(p.x) + static_cast<int64_t>(r) * p.width;
    for (int c = threadIdx.x; c < p.width; c += blockDim.x) x[c] = __float2bfloat16_rn(0.0f);
}

extern "C" __global__ void __launch_bounds__(R1_SMALL_GEMM_TILE * R1_SMALL_GEMM_TILE)
small_gemm_bf16(const R1SmallGemmBf16Params p) {
    constexpr int T = R1_SMALL_GEMM_TILE;
    __shared__ float xs[T][T + 1];
    __shared__ float ws[T][T + 1];
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int row = blockIdx.y * T + ty;  // m
    const int col = blockIdx.x * T + tx;  // n
    const bf16* x = reinterpret_cast<const bf16*>(p.x);
    const bf16* w = reinterpret_cast<const bf16*>(p.w);
    float acc = 0.0f;
    for (int k0 = 0; k0 < p.k; k0 += T) {
        const int xr = blockIdx.y * T + ty, xc = k0 + tx;
        xs[ty][tx] = (xr < p.m && xc < p.k) ? ld(x, static_cast<int64_t>(xr) * p.ldx + xc) : 0.0f;
        const int wr = blockIdx.x * T + ty, wc = k0 + tx;
        ws[ty][tx] = (wr < p.n && wc < p.k) ? ld(w, static_cast<int64_t>(wr) * p.ldw + wc) : 0.0f;
        __syncthreads();
#pragma unroll
        for (int i = 0; i < T; i++) acc += xs[ty][i] * ws[tx][i];
        __syncthreads();
    }
    if (row >= p.m || col >= p.n) return;
    const int64_t o = static_cast<int64_t>(row) * p.ldo + col;
    if (p.out_f32)
        reinterpret_cast<float*>(p.out)[o] = acc;
    else
        st(reinterpret_cast<bf16*>(p.out), o, acc);
}

extern "C" __global__ void __launch_bounds__(R1_QUANT_BLOCK)
small_act_quant(const R1SmallActQuantParams p) {
    const int kb = blockIdx.x, row = blockIdx.y;
    const int col = kb * R1_QUANT_BLOCK + threadIdx.x;
    const bool in = col < p.k;
    const float x = in ? ld(reinterpret_cast<const bf16*>(p.x), static_cast<int64_t>(row) * p.ldx + col)
                       : 0.0f;
    const float amax = block_max(fabsf(x));
    const float s = __fdiv_rn(fmaxf(amax, 1e-4f), 448.0f);
    if (in) {
        const __nv_fp8_storage_t q = __nv_cvt_float_to_fp8(__fdiv_rn(x, s), __NV_SATFINITE, __NV_E4M3);
        reinterpret_cast<uint8_t*>(p.q)[static_cast<int64_t>(row) * p.ldq + col] = q;
    }
    if (threadIdx.x == 0)
        reinterpret_cast<float*>(p.scales)[static_cast<int64_t>(kb) * p.m_pad + row] = s;
}

extern "C" __global__ void __launch_bounds__(R1_SMALL_THREADS)
small_mla_absorb_q(const R1SmallMlaAbsorbParams p) {
    const int t = blockIdx.x / p.heads, h = blockIdx.x % p.heads;
    if (t >= p.tokens) return;
    absorb_q(p, t, h);
}

extern "C" __global__ void __launch_bounds__(R1_SMALL_THREADS)
small_mla_absorb_q_rope(const R1SmallMlaAbsorbQRopeParams pr) {
    const R1SmallMlaAbsorbParams& p = pr.absorb;
    const int t = blockIdx.x / p.heads, h = blockIdx.x % p.heads;
    if (t >= p.tokens) return;
    absorb_q(p, t, h);
    // mla_q_rope's pair i of (t, h): q_pe from the q_b output, roped after the latent query.
    const int64_t th = static_cast<int64_t>(t) * p.heads + h;
    const bf16* src = reinterpret_cast<const bf16*>(p.src) + th * (p.nope + p.rope) + p.nope;
    bf16* dst = reinterpret_cast<bf16*>(p.dst) + th * (p.kv_lora + p.rope) + p.kv_lora;
    const int pos = reinterpret_cast<const int32_t*>(pr.positions)[t];
    const float* inv_freq = reinterpret_cast<const float*>(pr.inv_freq);
    for (int i = threadIdx.x; i < p.rope / 2; i += blockDim.x) {
        float a, b;
        r1::mla::rope_pair(ld(src, 2 * i), ld(src, 2 * i + 1), inv_freq[i], pos, pr.attention_factor, a, b);
        st(dst, 2 * i, a);
        st(dst, 2 * i + 1, b);
    }
}

extern "C" __global__ void __launch_bounds__(R1_SMALL_THREADS)
small_mla_absorb_o(const R1SmallMlaAbsorbParams p) {
    const int t = blockIdx.x / p.heads, h = blockIdx.x % p.heads;
    if (t >= p.tokens) return;
    const bf16* o = reinterpret_cast<const bf16*>(p.src) +
                    (static_cast<int64_t>(t) * p.heads + h) * p.kv_lora;
    const bf16* wv = reinterpret_cast<const bf16*>(p.kv_b) +
                     (static_cast<int64_t>(h) * (p.nope + p.v) + p.nope) * p.kv_lora;
    bf16* out = reinterpret_cast<bf16*>(p.dst) + (static_cast<int64_t>(t) * p.heads + h) * p.v;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
    for (int d = warp; d < p.v; d += warps) {
        const bf16* row = wv + static_cast<int64_t>(d) * p.kv_lora;
        float acc = 0.0f;
        for (int l = lane; l < p.kv_lora; l += 32) acc += ld(o, l) * ld(row, l);
        for (int off = 16; off > 0; off /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, off);
        if (lane == 0) st(out, d, acc);
    }
}

extern "C" __global__ void __launch_bounds__(R1_SMALL_THREADS)
small_moe_accum(const R1SmallMoeAccumParams p) {
    const int t = blockIdx.y;
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= p.tokens || c >= p.width) return;
    const int32_t* ids = reinterpret_cast<const int32_t*>(p.topk_ids) + static_cast<int64_t>(t) * p.top_k;
    const float* ws = reinterpret_cast<const float*>(p.topk_weights) + static_cast<int64_t>(t) * p.top_k;
    float w = 0.0f;
    bool chosen = false;
    for (int j = 0; j < p.top_k; j++)
        if (ids[j] == p.expert) {
            w = ws[j];
            chosen = true;
        }
    if (!chosen) return;
    const int64_t i = static_cast<int64_t>(t) * p.width + c;
    reinterpret_cast<float*>(p.acc)[i] += w * ld(reinterpret_cast<const bf16*>(p.y), i);
}
