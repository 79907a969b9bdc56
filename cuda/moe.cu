// MoE small kernels: router logits, noaux_tc router, permutation plan, gather, SiLU*up +
// act_quant, weighted un-permutation. Contracts (buffers, grids, numerics):
// cuda/params/moe.h. The grouped GEMMs are in cuda/moe_gemm.cu.
//
// Numerics follow the CPU reference (src/cpu/moe.rs, src/cpu/linear.rs, src/numerics) operation
// by operation: f32 arithmetic is written with __fadd_rn / __fmul_rn / __fdiv_rn so nvcc never
// contracts it into FMAs the CPU does not do. exp() is the only function the CPU takes from its
// libm (expf); here it is exp() in double rounded to float, i.e. the correctly rounded expf
// (glibc's expf is within 0.502 ulp, so the two agree except on rare near-midpoint inputs).
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <stdint.h>

#include "params/moe.h"
#include "ptx.cuh"
#include "silu.cuh"

namespace {

constexpr unsigned kFull = 0xFFFFFFFFu;

using r1::exp_f32;

__device__ __forceinline__ float bf16_lo(uint32_t w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float bf16_hi(uint32_t w) { return __uint_as_float(w & 0xFFFF0000u); }

// f32 -> bf16 bits, round to nearest even (NaN stays NaN).
__device__ __forceinline__ uint32_t bf16_bits(float x) {
    return static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(x)));
}
__device__ __forceinline__ float round_bf16(float x) { return __uint_as_float(bf16_bits(x) << 16); }

// numerics::sigmoid: 1 / (1 + exp(-x)).
__device__ __forceinline__ float sigmoid_ref(float x) { return __fdiv_rn(1.0f, __fadd_rn(1.0f, exp_f32(-x))); }

// IEEE total order (Rust's f32::total_cmp) as an unsigned key.
__device__ __forceinline__ uint32_t order_key(float x) {
    const uint32_t b = __float_as_uint(x);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// Larger value first, then lower index: the max of these keys is Router::route's next pick.
__device__ __forceinline__ unsigned long long pick_key(float v, int idx) {
    return (static_cast<unsigned long long>(order_key(v)) << 32) | (0xFFFFFFFFu - static_cast<uint32_t>(idx));
}
__device__ __forceinline__ int pick_index(unsigned long long key) {
    return static_cast<int>(0xFFFFFFFFu - static_cast<uint32_t>(key));
}

__device__ __forceinline__ unsigned long long warp_max_u64(unsigned long long v) {
#pragma unroll
    for (int off = 16; off > 0; off /= 2) {
        const unsigned long long o = __shfl_xor_sync(kFull, v, off);
        v = o > v ? o : v;
    }
    return v;
}

__device__ __forceinline__ uint4 ldg16(const void* p) { return __ldg(reinterpret_cast<const uint4*>(p)); }

// Two floats -> two e4m3 bytes (round to nearest even, saturating), `a` in the low byte.
__device__ __forceinline__ uint32_t to_e4m3x2(float a, float b) {
    return __nv_cvt_float2_to_fp8x2(make_float2(a, b), __NV_SATFINITE, __NV_E4M3);
}

__device__ void set_flag(uint32_t* flags, uint32_t bit, int counter) {
    atomicOr(flags, bit);
    atomicAdd(flags + counter, 1u);
}

}  // namespace

// ============================================================================================
// moe_router_logits
// ============================================================================================

// Thread (l, e, g) of a CTA (l = tid % 8, e = tid / 8 % EXPERTS, g = tid / (8 * EXPERTS))
// owns partial sum l of expert e for tokens g, g + G, ... (G = THREADS / (8 * EXPERTS)) of the
// CTA's token tile; the eight partial sums of a (token, expert) sit in eight adjacent lanes.
// The expert rows and the token rows are staged through shared memory a chunk of channels at
// a time (cp.async, two stages: the next chunk loads while this one is summed); every
// partial sum still runs over the channels in ascending order, as numerics::dot's does.
namespace {

constexpr int kLogitsExperts = R1_MOE_LOGITS_EXPERTS;
constexpr int kLogitsGroups = R1_MOE_LOGITS_THREADS / (8 * kLogitsExperts);
constexpr int kLogitsPerThread = R1_MOE_LOGITS_TOKENS / kLogitsGroups;
static_assert(kLogitsGroups * 8 * kLogitsExperts == R1_MOE_LOGITS_THREADS, "layout");
static_assert(kLogitsPerThread * kLogitsGroups == R1_MOE_LOGITS_TOKENS, "layout");

// acc[j] += x_j[8 i + l] * w[8 i + l] for the chunk's 8-channel steps i, tokens j < N.
template <int N>
__device__ __forceinline__ void logits_chunk(float (&acc)[kLogitsPerThread], const __nv_bfloat16* w,
                                             const __nv_bfloat16* x, int ld_smem, int steps) {
    const __nv_bfloat16* xr[N];
#pragma unroll
    for (int j = 0; j < N; j++) xr[j] = x + j * kLogitsGroups * ld_smem;
#pragma unroll 4
    for (int i = 0; i < steps; i++) {
        const float wv = __bfloat162float(w[8 * i]);
#pragma unroll
        for (int j = 0; j < N; j++) acc[j] = __fadd_rn(acc[j], __fmul_rn(__bfloat162float(xr[j][8 * i]), wv));
    }
}

}  // namespace

extern "C" __global__ void __launch_bounds__(R1_MOE_LOGITS_THREADS)
moe_router_logits(const R1MoeRouterLogitsParams p) {
    extern __shared__ __align__(16) uint8_t logits_smem[];
    __nv_bfloat16* smem = reinterpret_cast<__nv_bfloat16*>(logits_smem);
    const int tid = threadIdx.x;
    const int l = tid % 8;
    const int el = tid / 8 % kLogitsExperts;
    const int g = tid / (8 * kLogitsExperts);
    const int e0 = blockIdx.x * kLogitsExperts;
    const int t0 = blockIdx.y * R1_MOE_LOGITS_TOKENS;
    const int ne = min(kLogitsExperts, p.experts - e0);
    const int nt = min(R1_MOE_LOGITS_TOKENS, p.tokens - t0);
    // Stage layout (the host sized the shared memory with the same numbers): rows
    // [0, EXPERTS) the expert rows, [EXPERTS, EXPERTS + tile) the token rows, ld_smem apart.
    const int tile = min(R1_MOE_LOGITS_TOKENS, p.tokens);
    const int stage_elems = (kLogitsExperts + tile) * p.ld_smem;
    const int chunks = (p.hidden + p.chunk - 1) / p.chunk;
    const __nv_bfloat16* w = reinterpret_cast<const __nv_bfloat16*>(p.w);
    const __nv_bfloat16* x = reinterpret_cast<const __nv_bfloat16*>(p.x);

    // Queues chunk c's rows (16-byte pieces) into stage c % 2, one commit group per chunk.
    auto load = [&](int c) {
        const int c0 = c * p.chunk;
        const int pieces = min(p.chunk, p.hidden - c0) / 8;
        __nv_bfloat16* stage = smem + (c % 2) * stage_elems;
        for (int i = tid; i < (ne + nt) * pieces; i += R1_MOE_LOGITS_THREADS) {
            const int r = i / pieces, v = i - r * pieces;
            const __nv_bfloat16* src = r < ne ? w + static_cast<int64_t>(e0 + r) * p.hidden + c0 + 8 * v
                                              : x + static_cast<int64_t>(t0 + r - ne) * p.ldx + c0 + 8 * v;
            const int row = r < ne ? r : kLogitsExperts + (r - ne);
            r1::cp_async_16(stage + row * p.ld_smem + 8 * v, src);
        }
        r1::cp_async_commit();
    };

    // Tokens this thread sums: g, g + G, ... below nt (0 for a missing expert).
    const int mine = el < ne && g < nt ? min(kLogitsPerThread, (nt - g + kLogitsGroups - 1) / kLogitsGroups) : 0;
    float acc[kLogitsPerThread];
#pragma unroll
    for (int j = 0; j < kLogitsPerThread; j++) acc[j] = 0.0f;

    load(0);
    for (int c = 0; c < chunks; c++) {
        if (c + 1 < chunks) {
            load(c + 1);
            r1::cp_async_wait<1>();
        } else {
            r1::cp_async_wait<0>();
        }
        __syncthreads();  // chunk c is in shared memory for every thread
        const __nv_bfloat16* stage = smem + (c % 2) * stage_elems;
        const __nv_bfloat16* ws = stage + el * p.ld_smem + l;
        const __nv_bfloat16* xs = stage + (kLogitsExperts + g) * p.ld_smem + l;
        const int steps = min(p.chunk, p.hidden - c * p.chunk) / 8;
        static_assert(kLogitsPerThread == 4, "the dispatch below");
        switch (mine) {
            case 1: logits_chunk<1>(acc, ws, xs, p.ld_smem, steps); break;
            case 2: logits_chunk<2>(acc, ws, xs, p.ld_smem, steps); break;
            case 3: logits_chunk<3>(acc, ws, xs, p.ld_smem, steps); break;
            case 4: logits_chunk<4>(acc, ws, xs, p.ld_smem, steps); break;
            default: break;
        }
        __syncthreads();  // every thread is done with stage c % 2 before chunk c + 2 refills it
    }

    // ((acc0 + acc1) + ...) + acc7 over the eight adjacent lanes, as numerics::dot adds them
    // (its sum starts from -0.0, so the first term is taken as it is). Every lane shuffles.
    const int base = (tid % 32) & ~7;
    float* out = reinterpret_cast<float*>(p.logits);
#pragma unroll
    for (int j = 0; j < kLogitsPerThread; j++) {
        float s = __shfl_sync(kFull, acc[j], base);
#pragma unroll
        for (int i = 1; i < 8; i++) s = __fadd_rn(s, __shfl_sync(kFull, acc[j], base + i));
        if (l == 0 && j < mine) out[static_cast<int64_t>(t0 + g + j * kLogitsGroups) * p.experts + e0 + el] = s;
    }
}

// ============================================================================================
// moe_router
// ============================================================================================

extern "C" __global__ void __launch_bounds__(32 * R1_MOE_ROUTER_WARPS)
moe_router(const R1MoeRouterParams p) {
    extern __shared__ float router_smem[];
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const int t = blockIdx.x * R1_MOE_ROUTER_WARPS + warp;
    if (t >= p.tokens) return;  // whole warps leave together; no block-wide barrier below

    const int E = p.experts;
    const int G = p.n_group;
    const int per_group = E / G;
    float* score = router_smem + warp * (2 * E + 2 * G);
    float* choice = score + E;
    float* group_score = choice + E;
    int* kept = reinterpret_cast<int*>(group_score + G);

    const float* logits = reinterpret_cast<const float*>(p.logits) + static_cast<int64_t>(t) * E;
    const float* bias = reinterpret_cast<const float*>(p.bias);
    int* ids = reinterpret_cast<int*>(p.topk_ids) + static_cast<int64_t>(t) * p.top_k;
    float* weights = reinterpret_cast<float*>(p.topk_weights) + static_cast<int64_t>(t) * p.top_k;

    bool nan = false;
    for (int e = lane; e < E; e += 32) {
        const float l = logits[e];
        const float s = sigmoid_ref(l);
        const float c = bias ? __fadd_rn(s, bias[e]) : s;
        nan |= isnan(l) || isnan(c);
        score[e] = s;
        choice[e] = c;
    }
    if (__any_sync(kFull, nan)) {
        if (lane == 0) {
            uint32_t* flags = reinterpret_cast<uint32_t*>(p.flags);
            set_flag(flags, R1_MOE_FLAG_NAN, 1);
            atomicMax(flags + 2, 0xFFFFFFFFu - static_cast<uint32_t>(t));
        }
        if (lane < p.top_k) {
            ids[lane] = -1;
            weights[lane] = 0.0f;
        }
        return;
    }
    __syncwarp();

    // Group scores: the sum of each group's two best choices (values only, so ties do not
    // matter; no NaN and no -0 can occur here).
    for (int g = lane; g < G; g += 32) {
        float v1 = -INFINITY, v2 = -INFINITY;
        for (int i = 0; i < per_group; i++) {
            const float c = choice[g * per_group + i];
            if (c > v1) {
                v2 = v1;
                v1 = c;
            } else if (c > v2) {
                v2 = c;
            }
        }
        group_score[g] = per_group >= 2 ? __fadd_rn(v1, v2) : v1;
        kept[g] = 0;
    }
    __syncwarp();

    // Keep topk_group groups (total order, lower index on ties). Each lane only touches the
    // groups g == lane (mod 32), so its `kept` marks need no synchronization until used.
    for (int it = 0; it < p.topk_group; it++) {
        unsigned long long best = 0;
        for (int g = lane; g < G; g += 32)
            if (!kept[g]) {
                const unsigned long long k = pick_key(group_score[g], g);
                best = k > best ? k : best;
            }
        best = warp_max_u64(best);
        const int gsel = pick_index(best);
        if (gsel % 32 == lane) kept[gsel] = 1;
    }
    __syncwarp();

    // Top-k experts among the kept groups (others count as -inf, exactly like the CPU's mask).
    // A picked expert's choice is overwritten with NaN, which no live entry holds.
    int my_id = -1;
    for (int it = 0; it < p.top_k; it++) {
        unsigned long long best = 0;
        for (int e = lane; e < E; e += 32) {
            const float c = choice[e];
            if (isnan(c)) continue;
            const unsigned long long k = pick_key(kept[e / per_group] ? c : -INFINITY, e);
            best = k > best ? k : best;
        }
        best = warp_max_u64(best);
        const int esel = pick_index(best);
        if (esel % 32 == lane) choice[esel] = __int_as_float(0x7FFFFFFF);
        if (lane == it) my_id = esel;
    }
    __syncwarp();

    // Weights: the sum of the chosen scores in choice order, then each score normalized.
    const float my_score = my_id >= 0 ? score[my_id] : 0.0f;
    float total = 0.0f;
    for (int j = 0; j < p.top_k; j++) total = __fadd_rn(total, __shfl_sync(kFull, my_score, j));
    if (lane < p.top_k) {
        const float w = p.normalize ? __fdiv_rn(my_score, __fadd_rn(total, 1e-20f)) : my_score;
        ids[lane] = my_id;
        weights[lane] = __fmul_rn(w, p.scaling);
    }
}

// ============================================================================================
// moe_plan
// ============================================================================================

namespace {

// Exclusive scan of one int per thread over the whole (1024-thread) block; `scratch` holds
// 32 ints. Returns the exclusive prefix; *total receives the sum (every thread).
__device__ int block_exclusive_scan(int v, int* scratch, int* total) {
    const int lane = threadIdx.x % 32;
    const int warp = threadIdx.x / 32;
    int inc = v;
#pragma unroll
    for (int off = 1; off < 32; off *= 2) {
        const int o = __shfl_up_sync(kFull, inc, off);
        if (lane >= off) inc += o;
    }
    if (lane == 31) scratch[warp] = inc;
    __syncthreads();
    if (warp == 0) {
        const int nw = blockDim.x / 32;
        int w = lane < nw ? scratch[lane] : 0;
#pragma unroll
        for (int off = 1; off < 32; off *= 2) {
            const int o = __shfl_up_sync(kFull, w, off);
            if (lane >= off) w += o;
        }
        scratch[lane] = w;  // inclusive prefix of warp totals
    }
    __syncthreads();
    const int before = warp > 0 ? scratch[warp - 1] : 0;
    *total = scratch[blockDim.x / 32 - 1];
    __syncthreads();  // scratch may be reused right after
    return before + inc - v;
}

}  // namespace

extern "C" __global__ void __launch_bounds__(R1_MOE_PLAN_THREADS, 1)
moe_plan(const R1MoePlanParams p) {
    extern __shared__ int plan_smem[];
    const int E = p.experts;
    const int tid = threadIdx.x;
    const int lane = tid % 32;
    const int warp = tid / 32;
    int* cnt = plan_smem;            // [E]
    int* begin = cnt + E;            // [E] first flat row of each expert
    int* runbase = begin + E;        // [E] rank base of the current chunk
    int* scratch = runbase + E;      // [32]
    uint16_t* wcnt = reinterpret_cast<uint16_t*>(scratch + 32);  // [32][E]

    const int* ids = reinterpret_cast<const int*>(p.topk_ids);
    int* dest = reinterpret_cast<int*>(p.dest_row);
    uint32_t* flags = reinterpret_cast<uint32_t*>(p.flags);
    const int entries = p.tokens * p.top_k;
    const bool masked = p.layout == R1_MOE_LAYOUT_MASKED;
    const int M = p.max_tokens_per_expert;

    for (int e = tid; e < E; e += blockDim.x) cnt[e] = 0;
    for (int i = tid; i < 32 * E; i += blockDim.x) wcnt[i] = 0;
    __syncthreads();

    // 1. Histogram.
    for (int i = tid; i < entries; i += blockDim.x) {
        const int id = ids[i];
        if (id >= 0 && id < E) {
            atomicAdd(&cnt[id], 1);
        } else if (id != -1) {
            set_flag(flags, R1_MOE_FLAG_BAD_ID, 4);
        }
    }
    __syncthreads();

    // 2. Offsets (thread e owns expert e; E <= 512 < blockDim).
    const int my_count = tid < E ? cnt[tid] : 0;
    const int padded = masked ? 0 : (my_count + R1_MOE_BLOCK_M - 1) / R1_MOE_BLOCK_M * R1_MOE_BLOCK_M;
    int total_rows;
    const int my_begin = block_exclusive_scan(padded, scratch, &total_rows);
    if (tid < E) {
        begin[tid] = masked ? tid * M : my_begin;
        reinterpret_cast<int*>(p.counts)[tid] = masked ? min(my_count, M) : my_count;
    }
    if (!masked) {
        int* block_expert = reinterpret_cast<int*>(p.block_expert);
        int* block_rows = reinterpret_cast<int*>(p.block_rows);
        const int used = min(total_rows / R1_MOE_BLOCK_M, p.max_blocks);
        if (tid < E) {
            const int b0 = my_begin / R1_MOE_BLOCK_M;
            for (int b = 0; b * R1_MOE_BLOCK_M < my_count && b0 + b < p.max_blocks; b++) {
                block_expert[b0 + b] = tid;
                block_rows[b0 + b] = min(R1_MOE_BLOCK_M, my_count - b * R1_MOE_BLOCK_M);
            }
        }
        for (int b = used + tid; b < p.max_blocks; b += blockDim.x) {
            block_expert[b] = -1;
            block_rows[b] = 0;
        }
        if (tid == 0) *reinterpret_cast<int*>(p.num_blocks) = used;
    }
    __syncthreads();

    // 3. Ranks, chunk by chunk in entry order: within a warp by __match_any_sync, across the
    //    chunk's warps by a per-expert scan of the per-warp counts, across chunks by runbase.
    int run = 0;  // thread e: entries of expert e in earlier chunks
    const int max_rows = p.max_blocks * R1_MOE_BLOCK_M;
    for (int base = 0; base < entries; base += blockDim.x) {
        const int i = base + tid;
        const int id = i < entries ? ids[i] : -1;
        const bool valid = id >= 0 && id < E;
        const int key = valid ? id : -1;
        const unsigned mask = __match_any_sync(kFull, key);
        const int leader = __ffs(mask) - 1;
        const int rank_in_warp = __popc(mask & ((1u << lane) - 1u));
        if (valid && lane == leader) wcnt[warp * E + id] = static_cast<uint16_t>(__popc(mask));
        __syncthreads();
        if (tid < E) {
            int acc = 0;
            for (int w = 0; w < 32; w++) {
                // Entries with a count get the warp's base (their leader reads and zeroes it);
                // the others stay 0, so the array is all zero again for the next chunk.
                const int c = wcnt[w * E + tid];
                if (c) wcnt[w * E + tid] = static_cast<uint16_t>(acc);
                acc += c;
            }
            runbase[tid] = run;
            run += acc;
        }
        __syncthreads();
        int b = 0;
        if (valid && lane == leader) {
            b = runbase[id] + wcnt[warp * E + id];
            wcnt[warp * E + id] = 0;
        }
        b = __shfl_sync(kFull, b, leader);
        if (i < entries) {
            int row = -1;
            if (valid) {
                const int rank = b + rank_in_warp;
                if (masked) {
                    if (rank < M) {
                        row = id * M + rank;
                    } else {
                        set_flag(flags, R1_MOE_FLAG_OVERFLOW, 3);
                    }
                } else {
                    row = begin[id] + rank;
                    if (row >= max_rows) {
                        row = -1;
                        set_flag(flags, R1_MOE_FLAG_OVERFLOW, 3);
                    }
                }
            }
            dest[i] = row;
        }
        __syncthreads();
    }
}

// ============================================================================================
// moe_gather
// ============================================================================================

extern "C" __global__ void __launch_bounds__(R1_MOE_GATHER_THREADS)
moe_gather(const R1MoeGatherParams p) {
    const int entry = blockIdx.x * (R1_MOE_GATHER_THREADS / 32) + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (entry >= p.entries) return;
    const int r = reinterpret_cast<const int*>(p.dest_row)[entry];
    if (r < 0) return;
    const int t = entry / p.top_k;
    const uint8_t* src = reinterpret_cast<const uint8_t*>(p.xq) + static_cast<int64_t>(t) * p.ldxq;
    uint8_t* dst = reinterpret_cast<uint8_t*>(p.aq) + static_cast<int64_t>(r) * p.lda;
    for (int c = lane * 16; c < p.k; c += 32 * 16)
        *reinterpret_cast<uint4*>(dst + c) = ldg16(src + c);
    const float* xs = reinterpret_cast<const float*>(p.xs);
    float* as = reinterpret_cast<float*>(p.a_scales);
    for (int kb = lane; kb < p.k / R1_QUANT_BLOCK; kb += 32)
        as[static_cast<int64_t>(kb) * p.as_m_pad + r] = xs[static_cast<int64_t>(kb) * p.xs_m_pad + t];
}

// ============================================================================================
// moe_silu_quant
// ============================================================================================

extern "C" __global__ void __launch_bounds__(R1_MOE_SILU_THREADS)
moe_silu_quant(const R1MoeSiluQuantParams p) {
    constexpr int kThreadsPerGroup = R1_QUANT_BLOCK / 16;
    static_assert(R1_MOE_SILU_THREADS / kThreadsPerGroup == R1_MOE_SILU_GROUPS_PER_BLOCK, "layout");
    const int kblocks = p.inter / R1_QUANT_BLOCK;
    const int64_t groups = static_cast<int64_t>(p.items) * kblocks;
    const int64_t g = static_cast<int64_t>(blockIdx.x) * R1_MOE_SILU_GROUPS_PER_BLOCK + threadIdx.x / kThreadsPerGroup;
    if (g >= groups) return;  // whole 8-lane groups leave together
    const int kb = static_cast<int>(g / p.items);
    const int item = static_cast<int>(g - static_cast<int64_t>(kb) * p.items);
    const int row = p.rows_map ? reinterpret_cast<const int*>(p.rows_map)[item] : item;
    if (row < 0) return;  // same for the whole group

    const int sub = threadIdx.x % kThreadsPerGroup;
    const int col = kb * R1_QUANT_BLOCK + sub * 16;
    const __nv_bfloat16* gate = reinterpret_cast<const __nv_bfloat16*>(p.gu) + static_cast<int64_t>(row) * p.ldg + col;
    const __nv_bfloat16* up = gate + p.up_offset;
    const uint4 g0 = ldg16(gate), g1 = ldg16(gate + 8);
    const uint4 u0 = ldg16(up), u1 = ldg16(up + 8);
    const uint32_t gw[8] = {g0.x, g0.y, g0.z, g0.w, g1.x, g1.y, g1.z, g1.w};
    const uint32_t uw[8] = {u0.x, u0.y, u0.z, u0.w, u1.x, u1.y, u1.z, u1.w};

    float a[16];
    float amax = 0.0f;
#pragma unroll
    for (int i = 0; i < 8; i++) {
        a[2 * i] = r1::silu_mul_bf16(bf16_lo(gw[i]), bf16_lo(uw[i]));
        a[2 * i + 1] = r1::silu_mul_bf16(bf16_hi(gw[i]), bf16_hi(uw[i]));
        amax = fmaxf(amax, fmaxf(fabsf(a[2 * i]), fabsf(a[2 * i + 1])));
    }
    const uint32_t lane = threadIdx.x % 32;
    const uint32_t mask = 0xFFu << (lane & ~7u);
#pragma unroll
    for (int off = kThreadsPerGroup / 2; off > 0; off /= 2) amax = fmaxf(amax, __shfl_xor_sync(mask, amax, off));

    const float s = __fdiv_rn(fmaxf(amax, 1e-4f), 448.0f);
    uint32_t packed[4];
#pragma unroll
    for (int i = 0; i < 4; i++) {
        const uint32_t lo = to_e4m3x2(__fdiv_rn(a[4 * i], s), __fdiv_rn(a[4 * i + 1], s));
        const uint32_t hi = to_e4m3x2(__fdiv_rn(a[4 * i + 2], s), __fdiv_rn(a[4 * i + 3], s));
        packed[i] = lo | (hi << 16);
    }
    uint8_t* dst = reinterpret_cast<uint8_t*>(p.q) + static_cast<int64_t>(row) * p.ldq + col;
    *reinterpret_cast<uint4*>(dst) = make_uint4(packed[0], packed[1], packed[2], packed[3]);
    if (sub == 0) reinterpret_cast<float*>(p.scales)[static_cast<int64_t>(kb) * p.m_pad + row] = s;
}

// ============================================================================================
// moe_unpermute
// ============================================================================================

extern "C" __global__ void __launch_bounds__(R1_MOE_UNPERMUTE_THREADS)
moe_unpermute(const R1MoeUnpermuteParams p) {
    __shared__ int s_id[R1_MOE_MAX_TOP_K];
    __shared__ int s_row[R1_MOE_MAX_TOP_K];
    __shared__ float s_w[R1_MOE_MAX_TOP_K];
    __shared__ int s_n;
    const int t = blockIdx.y;
    if (threadIdx.x == 0) {
        // The token's live entries sorted by expert id (insertion sort; stable).
        const int* ids = reinterpret_cast<const int*>(p.topk_ids) + static_cast<int64_t>(t) * p.top_k;
        const int* dest = reinterpret_cast<const int*>(p.dest_row) + static_cast<int64_t>(t) * p.top_k;
        const float* w = reinterpret_cast<const float*>(p.topk_weights) + static_cast<int64_t>(t) * p.top_k;
        int n = 0;
        for (int k = 0; k < p.top_k; k++) {
            const int r = dest[k];
            if (r < 0) continue;
            const int id = ids[k];
            int j = n++;
            while (j > 0 && s_id[j - 1] > id) {
                s_id[j] = s_id[j - 1];
                s_row[j] = s_row[j - 1];
                s_w[j] = s_w[j - 1];
                j--;
            }
            s_id[j] = id;
            s_row[j] = r;
            s_w[j] = w[k];
        }
        s_n = n;
    }
    __syncthreads();

    const int c0 = (blockIdx.x * R1_MOE_UNPERMUTE_THREADS + threadIdx.x) * 8;
    if (c0 >= p.n) return;
    const __nv_bfloat16* y = reinterpret_cast<const __nv_bfloat16*>(p.y);
    float acc[8];
#pragma unroll
    for (int i = 0; i < 8; i++) acc[i] = 0.0f;
    for (int j = 0; j < s_n; j++) {
        const float w = s_w[j];
        const uint4 v = ldg16(y + static_cast<int64_t>(s_row[j]) * p.ldy + c0);
        const uint32_t vw[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int q = 0; q < 4; q++) {
            acc[2 * q] = __fadd_rn(acc[2 * q], __fmul_rn(w, bf16_lo(vw[q])));
            acc[2 * q + 1] = __fadd_rn(acc[2 * q + 1], __fmul_rn(w, bf16_hi(vw[q])));
        }
    }
    uint32_t sh[4] = {0, 0, 0, 0};
    if (p.shared) {
        const uint4 v = ldg16(reinterpret_cast<const __nv_bfloat16*>(p.shared) + static_cast<int64_t>(t) * p.lds + c0);
        sh[0] = v.x;
        sh[1] = v.y;
        sh[2] = v.z;
        sh[3] = v.w;
    }
    uint32_t out[4];
#pragma unroll
    for (int q = 0; q < 4; q++) {
        float lo = round_bf16(acc[2 * q]);
        float hi = round_bf16(acc[2 * q + 1]);
        if (p.shared) {
            lo = __fadd_rn(lo, bf16_lo(sh[q]));
            hi = __fadd_rn(hi, bf16_hi(sh[q]));
        }
        out[q] = bf16_bits(lo) | (bf16_bits(hi) << 16);
    }
    *reinterpret_cast<uint4*>(reinterpret_cast<__nv_bfloat16*>(p.out) + static_cast<int64_t>(t) * p.ldo + c0) =
        make_uint4(out[0], out[1], out[2], out[3]);
}
