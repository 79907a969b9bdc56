// The interleaved YaRN RoPE of one pair, rounded as the CPU reference rounds it: shared by
// the kernels that rope (cuda/mla/rope.cu, and small_mla_absorb_q_rope in cuda/small_ops.cu),
// so each gives the same bits.
#pragma once

#include <stdint.h>

namespace r1 {
namespace mla {

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

}  // namespace mla
}  // namespace r1
