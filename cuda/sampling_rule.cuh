// The sampling rule's arithmetic on the device: the twin, function for function, of
// src/numerics/sampling.rs (the rule is written there). Every operation is a correctly rounded
// IEEE f32 operation spelled as an `_rn` intrinsic (so nvcc cannot contract or approximate
// it), an exact conversion or bit manipulation, or 64-bit integer arithmetic; constants are
// bit patterns. A change here is a change of the rule: change the Rust twin with it.
#pragma once

#include <stdint.h>

namespace r1_sample {

// Constants (the Rust twin's LOG2E, ROUND_MAGIC, LN2_HI, LN2_LO, SQRT2; EXP_POLY and LN_POLY
// are written where they are used).
constexpr uint32_t kLog2e = 0x3FB8AA3Bu;
constexpr uint32_t kRoundMagic = 0x4B400000u;
constexpr uint32_t kLn2Hi = 0x3F318000u;
constexpr uint32_t kLn2Lo = 0xB95E8083u;
constexpr uint32_t kSqrt2 = 0x3FB504F3u;
constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ull;
// d = z - m below this has no mass; every Gumbel variate is below kGMax.
constexpr float kMassCutoff = -23.0f;
constexpr float kGMax = 23.0f;

__device__ __forceinline__ float c(uint32_t bits) { return __uint_as_float(bits); }

// order_key: IEEE total order as a u32, NaN -> 0.
__device__ __forceinline__ uint32_t order_key(float x) {
    if (isnan(x)) return 0u;
    const uint32_t b = __float_as_uint(x);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// exp_portable: e^d for d in [-23, 0].
__device__ __forceinline__ float exp_portable(float d) {
    const float magic = c(kRoundMagic);
    const float k = __fsub_rn(__fmaf_rn(d, c(kLog2e), magic), magic);
    float r = __fmaf_rn(k, -c(kLn2Hi), d);
    r = __fmaf_rn(k, -c(kLn2Lo), r);
    // Taylor coefficients 1/7! .. 1/2! (EXP_POLY), then 1, 1.
    float p = c(0x39500D01u);
    p = __fmaf_rn(p, r, c(0x3AB60B61u));
    p = __fmaf_rn(p, r, c(0x3C088889u));
    p = __fmaf_rn(p, r, c(0x3D2AAAABu));
    p = __fmaf_rn(p, r, c(0x3E2AAAABu));
    p = __fmaf_rn(p, r, c(0x3F000000u));
    p = __fmaf_rn(p, r, 1.0f);
    p = __fmaf_rn(p, r, 1.0f);
    const float scale = __uint_as_float(static_cast<uint32_t>(__float2int_rz(k) + 127) << 23);
    return __fmul_rn(p, scale);
}

// ln_series: 2 atanh(s) as 2s + s R(s^2).
__device__ __forceinline__ float ln_series(float s) {
    const float z = __fmul_rn(s, s);
    // 2/11, 2/9, 2/7, 2/5, 2/3 (LN_POLY).
    float r = c(0x3E3A2E8Cu);
    r = __fmaf_rn(r, z, c(0x3E638E39u));
    r = __fmaf_rn(r, z, c(0x3E924925u));
    r = __fmaf_rn(r, z, c(0x3ECCCCCDu));
    r = __fmaf_rn(r, z, c(0x3F2AAAABu));
    r = __fmul_rn(r, z);
    return __fmaf_rn(s, r, __fadd_rn(s, s));
}

// ln_portable: ln(y) for a positive normal finite y.
__device__ __forceinline__ float ln_portable(float y) {
    const uint32_t bits = __float_as_uint(y);
    int e = static_cast<int>((bits >> 23) & 0xFFu) - 127;
    uint32_t mbits = (bits & 0x007FFFFFu) | 0x3F800000u;
    if (mbits > kSqrt2) {
        mbits -= 0x00800000u;
        e += 1;
    }
    const float f = __fsub_rn(__uint_as_float(mbits), 1.0f);
    const float s = __fdiv_rn(f, __fadd_rn(2.0f, f));
    const float ef = __int2float_rn(e);
    return __fmaf_rn(ef, c(kLn2Hi), __fmaf_rn(ef, c(kLn2Lo), ln_series(s)));
}

// ln1m_portable: ln(1 - x) for x in (0, 1/2].
__device__ __forceinline__ float ln1m_portable(float x) {
    if (x < 0.25f) return ln_series(__fdiv_rn(-x, __fsub_rn(2.0f, x)));
    return ln_portable(__fsub_rn(1.0f, x));
}

// mass: floor(exp(z - m) 2^32), 0 below the cutoff or for NaN.
__device__ __forceinline__ uint64_t mass(float z, float m) {
    const float d = __fsub_rn(z, m);
    if (!(d >= kMassCutoff)) return 0ull;
    return __float2ull_rz(__fmul_rn(exp_portable(d), 4294967296.0f));
}

// mix64: SplitMix64's output function.
__device__ __forceinline__ uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// row_state: mix64(mix64(seed + golden) ^ counter).
__device__ __forceinline__ uint64_t row_state(uint64_t seed, uint64_t counter) {
    return mix64(mix64(seed + kGolden) ^ counter);
}

// stream_bits: token i's 64 bits, SplitMix64's (i+1)-th output from the row state.
__device__ __forceinline__ uint64_t stream_bits(uint64_t state, uint32_t i) {
    return mix64(state + (static_cast<uint64_t>(i) + 1ull) * kGolden);
}

// gumbel: -ln(-ln u) from the top 32 noise bits, u never 0 or 1.
__device__ __forceinline__ float gumbel(uint64_t bits) {
    const uint32_t h = static_cast<uint32_t>(bits >> 32);
    const float scale = c(0x2F000000u);  // 2^-33
    float e;
    if (h < 0x80000000u) {
        e = -ln1m_portable(__fmul_rn(__uint2float_rn(2u * h + 1u), scale));
    } else {
        e = -ln_portable(__fmul_rn(__uint2float_rn(2u * ~h + 1u), scale));
    }
    return -ln_portable(e);
}

}  // namespace r1_sample
