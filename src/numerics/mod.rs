//! Number formats and the quantization recipe shared by every backend (docs/design.md, "Numerics
//! contract"): FP8 e4m3 codes, bf16 rounding, per-token activation quantization, the
//! block-scaled FP8 GEMM as a plain loop that GPU kernels are checked against, the f32 dot
//! product's summation order, the MoE routing rule ([`routing`]) and the sampling rule
//! ([`sampling`]).

pub mod fp8;
pub mod quant;
pub mod routing;
pub mod sampling;

pub use fp8::{e4m3_to_f32, f32_to_e4m3};
pub use quant::{
    act_quant, block_gemm_w8a8, block_gemm_w8a8_splits, split_k_range, QuantizedRows, QUANT_BLOCK,
};

/// Rounds to the nearest bf16 (ties to even), returned widened to f32.
#[inline]
pub fn round_bf16(x: f32) -> f32 {
    half::bf16::from_f32(x).to_f32()
}

/// e^-x in f64 rounded to f32: the same value on every libm and in the CUDA kernels, so CPU
/// and GPU routing decisions and SiLU outputs agree bit for bit.
#[inline]
fn exp_neg(x: f32) -> f32 {
    (-f64::from(x)).exp() as f32
}

#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + exp_neg(x))
}

#[inline]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp_neg(x))
}

/// `sum_i a[i] * b[i]` in f32, in a fixed order: eight interleaved partial sums, then the tail.
/// The GPU router-logits kernel reproduces this order, so CPU and GPU logits agree bit for bit.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight independent partial sums let the compiler vectorize.
    let mut acc = [0f32; 8];
    let chunks = a.len() / 8;
    for i in 0..chunks {
        for l in 0..8 {
            acc[l] += a[i * 8 + l] * b[i * 8 + l];
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for i in chunks * 8..a.len() {
        sum += a[i] * b[i];
    }
    sum
}
