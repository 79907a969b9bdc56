// SiLU * up as every kernel that computes it rounds it (small_silu_mul, small_silu_mul_quant,
// moe_silu_quant), following the CPU's numerics::silu: f32 arithmetic written with
// __fadd_rn / __fmul_rn / __fdiv_rn so nvcc never contracts it, exp() taken in double and
// rounded to f32 (the correctly rounded expf; glibc's is within 0.502 ulp).
#pragma once

#include <cuda_bf16.h>

namespace r1 {

// exp(x) correctly rounded to f32 (up to double rounding of a <= 1 ulp double result).
__device__ __forceinline__ float exp_f32(float x) { return static_cast<float>(exp(static_cast<double>(x))); }

// numerics::silu: x / (1 + exp(-x)).
__device__ __forceinline__ float silu_ref(float x) { return __fdiv_rn(x, __fadd_rn(1.0f, exp_f32(-x))); }

// f32 -> bf16 -> f32, round to nearest even (NaN stays NaN).
__device__ __forceinline__ float round_bf16(float x) { return __bfloat162float(__float2bfloat16_rn(x)); }

// The activation a = bf16(silu(g) * u), as f32.
__device__ __forceinline__ float silu_mul_bf16(float g, float u) { return round_bf16(__fmul_rn(silu_ref(g), u)); }

}  // namespace r1
