// sample_tokens: one token per R1SampleRow from a row of f32 logits, by the sampling rule of
// src/numerics/sampling.rs, bit-identical to its `draw`.
// Contract (buffers, grid, block): cuda/params/sampling.h, R1SampleParams.
//
// One CTA per row. Every pass re-reads the row (L2-resident) and recomputes z = logit / T and
// its order key, so nothing per token is stored:
//   1. the largest key (greedy rows stop here, on the logits themselves);
//   2. top-k: the largest t with count(key >= t) >= K, by radix select over 8-bit digits;
//   3. top-p: the largest t with mass(key >= t, key >= t_k) >= T, the same select on masses;
//   4. Gumbel-max over key >= t: the largest (key(z + g), -index).
// Counts and masses are integers, so the shared-memory atomics give the same sums in any
// order; the reductions are max over (key, -index) packed in a u64, also order-free.
#include <stdint.h>

#include "params/sampling.h"
#include "sampling_rule.cuh"

namespace {

using namespace r1_sample;

constexpr int kThreads = R1_SAMPLE_THREADS;
constexpr int kWarps = kThreads / 32;
constexpr int kBins = 256;
constexpr int kBinsPerLane = kBins / 32;

struct Shared {
    unsigned long long hist[kBins];
    unsigned long long warp_val[kWarps];
    uint32_t prefix;
    unsigned long long need;
    bool short_total;  // fewer than the target in all: the floor is the threshold
};

// (key, index) -> u64 whose max is the largest key, lowest index among equals.
__device__ __forceinline__ unsigned long long pack(uint32_t key, uint32_t i) {
    return (static_cast<unsigned long long>(key) << 32) | (0xFFFFFFFFu - i);
}
__device__ __forceinline__ uint32_t unpack_index(unsigned long long v) {
    return 0xFFFFFFFFu - static_cast<uint32_t>(v);
}

// The CTA-wide max of `v` (every thread gets it).
__device__ unsigned long long block_max(unsigned long long v, Shared& sh) {
#pragma unroll
    for (int off = 16; off > 0; off /= 2) {
        const unsigned long long o = __shfl_xor_sync(0xFFFFFFFFu, v, off);
        v = o > v ? o : v;
    }
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) sh.warp_val[warp] = v;
    __syncthreads();
    v = sh.warp_val[lane];  // kWarps == 32
#pragma unroll
    for (int off = 16; off > 0; off /= 2) {
        const unsigned long long o = __shfl_xor_sync(0xFFFFFFFFu, v, off);
        v = o > v ? o : v;
    }
    __syncthreads();  // warp_val is reused
    return v;
}
static_assert(kWarps == 32, "block_max reads one warp value per lane");

__device__ __forceinline__ float load(const float* x, int i) { return __ldg(x + i); }

// Adds w to a 64-bit shared-memory bin with two native 32-bit atomics (a 64-bit shared
// atomicAdd compiles to a compare-and-swap loop, which contended bins retry). Exact in any
// order: each wrap of the low word is carried by the add that caused it.
__device__ __forceinline__ void hist_add(unsigned long long* bin, unsigned long long w) {
    unsigned* words = reinterpret_cast<unsigned*>(bin);  // little-endian: [0] low, [1] high
    const unsigned lo = static_cast<unsigned>(w);
    const unsigned old = atomicAdd(words, lo);
    const unsigned hi = static_cast<unsigned>(w >> 32) + (old + lo < old ? 1u : 0u);
    if (hi != 0) atomicAdd(words + 1, hi);
}

// The largest t >= floor such that the measure (count, or mass when by_mass) of the tokens
// with key >= t and key >= floor reaches the target: K, or max(1, ceil(top_p * total)) with
// total the measure of all tokens with key >= floor. `floor` when the total falls short.
__device__ uint32_t select_threshold(const float* x, int vocab, float temp, float m,
                                     uint32_t floor, bool by_mass, uint32_t top_k,
                                     float top_p, Shared& sh) {
    const int lane = threadIdx.x % 32;
    uint32_t prefix = 0, mask = 0;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int b = threadIdx.x; b < kBins; b += kThreads) sh.hist[b] = 0;
        __syncthreads();
        // Run-length aggregation: consecutive tokens of a thread in the same bin add once.
        int run_bin = -1;
        unsigned long long run = 0;
        for (int i = threadIdx.x; i < vocab; i += kThreads) {
            const float z = __fdiv_rn(load(x, i), temp);
            const uint32_t key = order_key(z);
            if (key < floor || (key & mask) != prefix) continue;
            const unsigned long long w = by_mass ? mass(z, m) : 1ull;
            if (w == 0) continue;
            const int bin = static_cast<int>((key >> shift) & 0xFFu);
            if (bin != run_bin) {
                if (run != 0) hist_add(&sh.hist[run_bin], run);
                run_bin = bin;
                run = 0;
            }
            run += w;
        }
        if (run != 0) hist_add(&sh.hist[run_bin], run);
        __syncthreads();
        if (threadIdx.x < 32) {
            unsigned long long need = shift == 24 ? 0ull : sh.need;
            __syncwarp();  // every lane has read sh.need before one rewrites it
            // Lane l holds bins 255 - 8l .. 248 - 8l (descending); suffix sums from the top.
            unsigned long long own = 0;
#pragma unroll
            for (int j = 0; j < kBinsPerLane; j++) own += sh.hist[kBins - 1 - kBinsPerLane * lane - j];
            unsigned long long incl = own;
#pragma unroll
            for (int off = 1; off < 32; off *= 2) {
                const unsigned long long o = __shfl_up_sync(0xFFFFFFFFu, incl, off);
                if (lane >= off) incl += o;
            }
            if (shift == 24) {
                const unsigned long long total = __shfl_sync(0xFFFFFFFFu, incl, 31);
                if (by_mass) {
                    const double t = ceil(__dmul_rn(static_cast<double>(top_p),
                                                    static_cast<double>(total)));
                    // A negative product counts as 0 (Rust's saturating `as u64`).
                    need = t > 0.0 ? static_cast<unsigned long long>(t) : 0ull;
                    need = need < 1ull ? 1ull : need;
                } else {
                    need = top_k;
                }
                if (lane == 0) sh.short_total = total < need;
            }
            const unsigned long long excl = incl - own;
            const bool here = excl < need && need <= incl;
            if (here) {
                unsigned long long acc = excl;
#pragma unroll 1
                for (int j = 0; j < kBinsPerLane; j++) {
                    const int b = kBins - 1 - kBinsPerLane * lane - j;
                    const unsigned long long before = acc;
                    acc += sh.hist[b];
                    if (acc >= need) {
                        sh.prefix = prefix | (static_cast<uint32_t>(b) << shift);
                        sh.need = need - before;
                        break;
                    }
                }
            }
        }
        __syncthreads();
        if (sh.short_total) return floor;  // uniform: every thread read the same flag
        prefix = sh.prefix;
        mask |= 0xFFu << shift;
        __syncthreads();  // sh.prefix / sh.need are rewritten by the next pass
    }
    return prefix < floor ? floor : prefix;
}

}  // namespace

extern "C" __global__ void __launch_bounds__(R1_SAMPLE_THREADS, 1)
sample_tokens(const R1SampleParams p) {
    __shared__ Shared sh;
    if (static_cast<int>(blockIdx.x) >= p.n) return;
    const R1SampleRow s = reinterpret_cast<const R1SampleRow*>(p.rows)[blockIdx.x];
    int32_t* out = reinterpret_cast<int32_t*>(p.tokens) + blockIdx.x;
    if (s.row < 0 || s.row >= p.logit_rows) {
        if (threadIdx.x == 0) *out = -1;
        return;
    }
    const int vocab = p.vocab;
    const float* x = reinterpret_cast<const float*>(p.logits) + static_cast<int64_t>(s.row) * vocab;
    const float temp = s.temperature;
    const bool greedy = !(temp > 0.0f);

    // 1. The largest key: of the logits (greedy) or of z.
    unsigned long long best = 0;
    for (int i = threadIdx.x; i < vocab; i += kThreads) {
        const float v = greedy ? load(x, i) : __fdiv_rn(load(x, i), temp);
        const unsigned long long k = pack(order_key(v), static_cast<uint32_t>(i));
        best = k > best ? k : best;
    }
    best = block_max(best, sh);
    const uint32_t top = unpack_index(best);
    if (greedy) {
        if (threadIdx.x == 0) *out = static_cast<int32_t>(top);
        return;
    }
    const float m = __fdiv_rn(load(x, top), temp);
    if (!isfinite(m)) {
        if (threadIdx.x == 0) *out = static_cast<int32_t>(top);
        return;
    }

    // 2-3. The kept set: key >= t.
    uint32_t t = 1;
    if (s.top_k != 0 && s.top_k <= static_cast<uint32_t>(vocab))
        t = select_threshold(x, vocab, temp, m, 1, false, s.top_k, 1.0f, sh);
    if (s.top_p < 1.0f) t = select_threshold(x, vocab, temp, m, t, true, 0, s.top_p, sh);

    // 4. Gumbel-max, starting from the largest token's score (always kept) so that tokens
    // that cannot reach it are skipped (z + 23 below it).
    const uint64_t state = row_state(s.seed, s.counter);
    float best_score = __fadd_rn(m, gumbel(stream_bits(state, top)));
    best = pack(order_key(best_score), top);
    for (int i = threadIdx.x; i < vocab; i += kThreads) {
        const float z = __fdiv_rn(load(x, i), temp);
        if (order_key(z) < t || __fadd_rn(z, kGMax) < best_score) continue;
        const float score = __fadd_rn(z, gumbel(stream_bits(state, static_cast<uint32_t>(i))));
        const unsigned long long k = pack(order_key(score), static_cast<uint32_t>(i));
        if (k > best) {
            best = k;
            best_score = score;
        }
    }
    best = block_max(best, sh);
    if (threadIdx.x == 0) *out = static_cast<int32_t>(unpack_index(best));
}
