//! The w8a8 recipe: per-token 1x128 activation quantization and the 128x128 block-scaled FP8
//! GEMM with FP32 promotion every 128 of K.

use super::fp8::{e4m3_to_f32, f32_to_e4m3};

/// Channels (K) per activation scale and per weight-scale block side.
pub const QUANT_BLOCK: usize = 128;
/// Floor on a group's amax so an all-zero group gets a finite scale instead of NaN.
const AMAX_FLOOR: f32 = 1e-4;
const E4M3_MAX: f32 = 448.0;

/// Activations quantized per row and per 128 channels.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizedRows {
    pub rows: usize,
    pub cols: usize,
    /// e4m3 codes, row-major [rows, cols].
    pub codes: Vec<u8>,
    /// Multipliers, row-major [rows, ceil(cols / 128)]: x ~= e4m3(code) * scale.
    pub scales: Vec<f32>,
}

impl QuantizedRows {
    pub fn blocks_per_row(&self) -> usize {
        self.cols.div_ceil(QUANT_BLOCK)
    }

    /// Row `r` with its codes decoded to f32 (not yet multiplied by the scales).
    pub fn decoded_row(&self, r: usize, out: &mut [f32]) {
        let codes = &self.codes[r * self.cols..(r + 1) * self.cols];
        for (o, &c) in out.iter_mut().zip(codes) {
            *o = e4m3_to_f32(c);
        }
    }

    pub fn row_scales(&self, r: usize) -> &[f32] {
        let b = self.blocks_per_row();
        &self.scales[r * b..(r + 1) * b]
    }
}

/// Quantizes one row: for each 128-channel group s = max(amax, 1e-4) / 448, q = e4m3(x / s).
pub fn quantize_row(x: &[f32], codes: &mut [u8], scales: &mut [f32]) {
    for ((group, out), scale) in x
        .chunks(QUANT_BLOCK)
        .zip(codes.chunks_mut(QUANT_BLOCK))
        .zip(scales.iter_mut())
    {
        let amax = group.iter().fold(0f32, |m, v| m.max(v.abs()));
        let s = amax.max(AMAX_FLOOR) / E4M3_MAX;
        for (q, &v) in out.iter_mut().zip(group) {
            *q = f32_to_e4m3(v / s);
        }
        *scale = s;
    }
}

/// Quantizes a row-major [rows, cols] matrix.
pub fn act_quant(x: &[f32], cols: usize) -> QuantizedRows {
    assert!(
        cols > 0 && x.len() % cols == 0,
        "act_quant: {} values are not rows of {cols}",
        x.len()
    );
    let rows = x.len() / cols;
    let blocks = cols.div_ceil(QUANT_BLOCK);
    let mut codes = vec![0u8; rows * cols];
    let mut scales = vec![0f32; rows * blocks];
    for ((row, c), s) in x
        .chunks(cols)
        .zip(codes.chunks_mut(cols))
        .zip(scales.chunks_mut(blocks))
    {
        quantize_row(row, c, s);
    }
    QuantizedRows {
        rows,
        cols,
        codes,
        scales,
    }
}

/// One output of the block-scaled GEMM: a decoded activation row times a decoded weight row.
/// Each 128-wide block's partial sum is formed in f32 and promoted into the f32 accumulator
/// with both scales, as the wgmma kernels do.
#[inline]
pub fn dot_w8a8(a: &[f32], a_scales: &[f32], w: &[f32], w_scales: &[f32]) -> f32 {
    let mut acc = 0f32;
    for (kb, (ab, wb)) in a.chunks(QUANT_BLOCK).zip(w.chunks(QUANT_BLOCK)).enumerate() {
        let partial: f32 = ab.iter().zip(wb).map(|(x, y)| x * y).sum();
        acc += partial * a_scales[kb] * w_scales[kb];
    }
    acc
}

/// D[m, n] = sum_k A[m, k] W[n, k] for e4m3 `w_codes` [n, k] with 128x128 block multipliers
/// `w_scales` [ceil(n/128), ceil(k/128)]. f32 result (callers round to bf16). Single-threaded:
/// this is the reference the kernels and the parallel CPU path are checked against.
pub fn block_gemm_w8a8(a: &QuantizedRows, w_codes: &[u8], w_scales: &[f32], n: usize) -> Vec<f32> {
    let k = a.cols;
    let kb = k.div_ceil(QUANT_BLOCK);
    assert_eq!(w_codes.len(), n * k, "weight codes are not [{n}, {k}]");
    assert_eq!(
        w_scales.len(),
        n.div_ceil(QUANT_BLOCK) * kb,
        "weight scales shape"
    );
    let mut out = vec![0f32; a.rows * n];
    let mut a_row = vec![0f32; k];
    let mut w_row = vec![0f32; k];
    for m in 0..a.rows {
        a.decoded_row(m, &mut a_row);
        for j in 0..n {
            for (o, &c) in w_row.iter_mut().zip(&w_codes[j * k..(j + 1) * k]) {
                *o = e4m3_to_f32(c);
            }
            let ws = &w_scales[(j / QUANT_BLOCK) * kb..(j / QUANT_BLOCK + 1) * kb];
            out[m * n + j] = dot_w8a8(&a_row, a.row_scales(m), &w_row, ws);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn act_quant_error_is_bounded(row in prop::collection::vec(-100f32..100f32, 1..300)) {
            let q = act_quant(&row, row.len());
            for (b, group) in row.chunks(QUANT_BLOCK).enumerate() {
                let amax = group.iter().fold(0f32, |m, v| m.max(v.abs()));
                let s = q.scales[b];
                prop_assert_eq!(s, amax.max(AMAX_FLOOR) / E4M3_MAX);
                for (i, &v) in group.iter().enumerate() {
                    let back = e4m3_to_f32(q.codes[b * QUANT_BLOCK + i]) * s;
                    // e4m3 has 3 mantissa bits: relative error <= 2^-4, absolute <= half a
                    // subnormal step near zero.
                    prop_assert!((back - v).abs() <= v.abs() / 16.0 + s * 2f32.powi(-10) + 1e-6,
                        "{v} came back as {back}");
                }
            }
        }

        /// The block GEMM equals a naive f64 loop over dequantized values up to f32 rounding.
        #[test]
        fn block_gemm_matches_naive(
            m in 1usize..4, n in 1usize..140, kblocks in 1usize..3, tail in 0usize..2,
            seed in any::<u64>(),
        ) {
            let k = kblocks * QUANT_BLOCK - tail * 64;
            let mut rng = seed;
            let mut next = || {
                rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17;
                ((rng >> 11) as f64 / (1u64 << 53) as f64) as f32 * 2.0 - 1.0
            };
            let x: Vec<f32> = (0..m * k).map(|_| next() * 3.0).collect();
            let w_codes: Vec<u8> = (0..n * k).map(|_| f32_to_e4m3(next() * 200.0)).collect();
            let w_scales: Vec<f32> = (0..n.div_ceil(128) * k.div_ceil(128)).map(|_| next().abs() + 0.01).collect();
            let a = act_quant(&x, k);
            let got = block_gemm_w8a8(&a, &w_codes, &w_scales, n);
            let kb = k.div_ceil(128);
            for i in 0..m {
                for j in 0..n {
                    let mut want = 0f64;
                    let mut mag = 0f64;
                    for kk in 0..k {
                        let av = e4m3_to_f32(a.codes[i * k + kk]) as f64 * a.scales[i * kb + kk / 128] as f64;
                        let wv = e4m3_to_f32(w_codes[j * k + kk]) as f64 * w_scales[(j / 128) * kb + kk / 128] as f64;
                        want += av * wv;
                        mag += (av * wv).abs();
                    }
                    let g = got[i * n + j] as f64;
                    prop_assert!((g - want).abs() <= 1e-5 * mag + 1e-30, "[{i},{j}] {g} vs {want}");
                }
            }
        }
    }

    #[test]
    fn all_zero_group_gets_finite_scale() {
        let q = act_quant(&[0.0; 128], 128);
        assert_eq!(q.scales[0], AMAX_FLOOR / E4M3_MAX);
        assert!(q.codes.iter().all(|&c| c == 0));
    }
}
