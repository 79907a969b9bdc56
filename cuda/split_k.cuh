// Split-K for the wgmma GEMMs (the contract: "Split-K" in cuda/params/common.h): which K-blocks
// a split covers, and the epilogue that turns the splits' f32 accumulators into one output
// tile in a fixed order, without float atomics and without any CTA waiting for another.
//
// Each consumer warp reduces its own 16-row slice of the m64n128 fragment (wgmma's register
// layout, cuda/ptx.cuh): thread (warp w, lane l) holds rows 16 w + l/4 (+ 8) and columns
// 2 (l % 4) + 8 i (+ 1). The last split to arrive on a slice's counter does the sum, so the
// reduction is spread over whichever CTAs finish last rather than serialized in one.
#pragma once

#include <stdint.h>

#include "params/common.h"

namespace r1 {
namespace splitk {

constexpr int kSliceRows = R1_SPLIT_K_SLICE_ROWS;

// First K-block of split s of `splits` over `kblocks` (split s ends where s + 1 begins).
__device__ __forceinline__ int k_begin(int kblocks, int splits, int s) {
    return static_cast<int>(static_cast<int64_t>(s) * kblocks / splits);
}

// The epilogue of one consumer warp for unit (tile, split), its slice `slice` of a BM x 128
// tile of which the first `rows_valid` rows exist. Returns true when the caller must store
// `acc` (which then holds p_0 + ... + p_{S-1} in split order); false when another split will
// (or when the slice holds no valid row). Call with every lane of the warp.
template <int BM>
__device__ __forceinline__ bool reduce_slice(float (&acc)[64], const R1SplitK& sk, int tile, int split, int slice,
                                             int rows_valid) {
    constexpr int BN = 128;
    static_assert(BM % kSliceRows == 0, "whole slices per tile");
    if (slice * kSliceRows >= rows_valid) return false;  // warp-uniform

    const int lane = threadIdx.x % 32;
    const int r_lo = slice * kSliceRows + lane / 4;  // tile-relative rows of this thread
    const int r_hi = r_lo + 8;
    const bool lo_in = r_lo < rows_valid;
    const bool hi_in = r_hi < rows_valid;
    const int col0 = 2 * (lane % 4);
    constexpr int64_t kUnitFloats = static_cast<int64_t>(BM) * BN;
    float* partials = reinterpret_cast<float*>(sk.partials);
    const int64_t first_unit = static_cast<int64_t>(tile) * sk.splits;

    float* mine = partials + (first_unit + split) * kUnitFloats;
#pragma unroll
    for (int i = 0; i < 16; i++) {
        if (lo_in) *reinterpret_cast<float2*>(mine + r_lo * BN + col0 + 8 * i) = make_float2(acc[4 * i], acc[4 * i + 1]);
        if (hi_in)
            *reinterpret_cast<float2*>(mine + r_hi * BN + col0 + 8 * i) = make_float2(acc[4 * i + 2], acc[4 * i + 3]);
    }
    // Release: the warp's stores are ordered before lane 0's fence (__syncwarp orders memory
    // among its lanes), and the fence before the arrival; acquire: lane 0's second fence after
    // it, and __syncwarp hands that on to every lane's loads.
    __syncwarp();
    unsigned int* counter = reinterpret_cast<unsigned int*>(sk.counters) +
                            static_cast<int64_t>(tile) * (BM / kSliceRows) + slice;
    unsigned int arrived = 0;
    if (lane == 0) {
        __threadfence();
        arrived = atomicAdd(counter, 1u);
        __threadfence();
    }
    arrived = __shfl_sync(0xffffffffu, arrived, 0);
    if (arrived != static_cast<unsigned int>(sk.splits - 1)) return false;
    __syncwarp();
    // Every split has arrived: nobody touches the counter again in this launch.
    if (lane == 0) *counter = 0u;

    // Sum p_0 + p_1 + ... in split order, every split (this one's too: the same f32 values it
    // stored) read back from L2 (__ldcg: other SMs wrote them). A row past M reads a valid
    // row of the slice instead (never stored), so each split's 32 loads issue back to back
    // without branches.
    const int rl = lo_in ? r_lo : slice * kSliceRows;
    const int rh = hi_in ? r_hi : slice * kSliceRows;
    for (int s = 0; s < sk.splits; s++) {
        const float* src = partials + (first_unit + s) * kUnitFloats;
        float2 lo[16], hi[16];
#pragma unroll
        for (int i = 0; i < 16; i++) {
            lo[i] = __ldcg(reinterpret_cast<const float2*>(src + rl * BN + col0 + 8 * i));
            hi[i] = __ldcg(reinterpret_cast<const float2*>(src + rh * BN + col0 + 8 * i));
        }
#pragma unroll
        for (int i = 0; i < 16; i++) {
            if (s == 0) {
                acc[4 * i] = lo[i].x;
                acc[4 * i + 1] = lo[i].y;
                acc[4 * i + 2] = hi[i].x;
                acc[4 * i + 3] = hi[i].y;
            } else {
                acc[4 * i] = __fadd_rn(acc[4 * i], lo[i].x);
                acc[4 * i + 1] = __fadd_rn(acc[4 * i + 1], lo[i].y);
                acc[4 * i + 2] = __fadd_rn(acc[4 * i + 2], hi[i].x);
                acc[4 * i + 3] = __fadd_rn(acc[4 * i + 3], hi[i].y);
            }
        }
    }
    return true;
}

}  // namespace splitk
}  // namespace r1
