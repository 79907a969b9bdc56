//! The w8a8 recipe: per-token 1x128 activation quantization and the 128x128 block-scaled FP8
//! GEMM with FP32 promotion every 128 of K.

use std::ops::Range;

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
    dot_w8a8_blocks(a, a_scales, w, w_scales, 0..a.len().div_ceil(QUANT_BLOCK))
}

/// [`dot_w8a8`] over the K-blocks `blocks` only, accumulated from zero.
#[inline]
fn dot_w8a8_blocks(
    a: &[f32],
    a_scales: &[f32],
    w: &[f32],
    w_scales: &[f32],
    blocks: Range<usize>,
) -> f32 {
    let mut acc = 0f32;
    for kb in blocks {
        let k = kb * QUANT_BLOCK..((kb + 1) * QUANT_BLOCK).min(a.len());
        let partial: f32 = a[k.clone()].iter().zip(&w[k]).map(|(x, y)| x * y).sum();
        acc += partial * a_scales[kb] * w_scales[kb];
    }
    acc
}

/// K-blocks `[s * kblocks / splits, (s + 1) * kblocks / splits)` of split `s` of `splits`:
/// the split-K rule of the GPU kernels ("Split-K" in cuda/params/common.h) and of
/// [`block_gemm_w8a8_splits`]. Every split is non-empty when `splits <= kblocks`, and the
/// lengths differ by at most one.
pub fn split_k_range(kblocks: usize, splits: usize, s: usize) -> Range<usize> {
    s * kblocks / splits..(s + 1) * kblocks / splits
}

/// D[m, n] = sum_k A[m, k] W[n, k] for e4m3 `w_codes` [n, k] with 128x128 block multipliers
/// `w_scales` [ceil(n/128), ceil(k/128)]. f32 result (callers round to bf16). Single-threaded:
/// this is the reference the kernels and the parallel CPU path are checked against.
pub fn block_gemm_w8a8(a: &QuantizedRows, w_codes: &[u8], w_scales: &[f32], n: usize) -> Vec<f32> {
    block_gemm_by(a, w_codes, w_scales, n, dot_w8a8)
}

/// [`block_gemm_w8a8`] in the order of a GEMM that splits K `splits` ways: each split's
/// K-blocks ([`split_k_range`]) accumulated from zero as [`dot_w8a8`] does, then the split
/// totals summed left to right (t_0, then + t_1, ...). `splits == 1` is [`block_gemm_w8a8`]
/// bit for bit; 1 <= splits <= ceil(K/128).
///
/// Both orders sum the same per-K-block contributions c_kb = partial * sa * sb (rounded
/// identically), only associated differently: splits 1 adds them in one chain, a split in one
/// chain per split and then the chain of its totals. Each is a recursive f32 sum with at most
/// KB - 1 roundings on any term's path (ceil(KB/S) - 1 + S - 1 <= KB - 1), so with
/// u = 2^-24 and KB = ceil(K/128):
///
/// |split - unsplit| <= 2 (KB - 1) u / (1 - (KB - 1) u) * sum_kb |c_kb|.
///
/// (A bound in the split totals alone does not hold: with c = [1, u, u] in two splits
/// [1] + [u, u], one chain rounds 1 + u to 1 twice while the split sums u + u exactly and
/// returns 1 + 2u.)
pub fn block_gemm_w8a8_splits(
    a: &QuantizedRows,
    w_codes: &[u8],
    w_scales: &[f32],
    n: usize,
    splits: usize,
) -> Vec<f32> {
    let kblocks = a.cols.div_ceil(QUANT_BLOCK);
    assert!(
        splits >= 1 && splits <= kblocks.max(1),
        "block_gemm_w8a8_splits: splits must be in 1..={kblocks} (K-blocks); got {splits}"
    );
    block_gemm_by(a, w_codes, w_scales, n, |x, xs, w, ws| {
        let mut total = 0f32;
        for s in 0..splits {
            let t = dot_w8a8_blocks(x, xs, w, ws, split_k_range(kblocks, splits, s));
            total = if s == 0 { t } else { total + t };
        }
        total
    })
}

/// Every output of the block GEMM with `dot(a_row, a_scales, w_row, w_scales)`.
fn block_gemm_by(
    a: &QuantizedRows,
    w_codes: &[u8],
    w_scales: &[f32],
    n: usize,
    dot: impl Fn(&[f32], &[f32], &[f32], &[f32]) -> f32,
) -> Vec<f32> {
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
            out[m * n + j] = dot(&a_row, a.row_scales(m), &w_row, ws);
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

    /// Random quantized rows [m, k] and a random weight [n, k] with its block scales.
    fn random_problem(
        m: usize,
        n: usize,
        k: usize,
        seed: u64,
    ) -> (QuantizedRows, Vec<u8>, Vec<f32>) {
        let mut rng = seed | 1;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            ((rng >> 11) as f64 / (1u64 << 53) as f64) as f32 * 2.0 - 1.0
        };
        let x: Vec<f32> = (0..m * k).map(|_| next() * 3.0).collect();
        let w_codes: Vec<u8> = (0..n * k).map(|_| f32_to_e4m3(next() * 200.0)).collect();
        let w_scales: Vec<f32> = (0..n.div_ceil(128) * k.div_ceil(128))
            .map(|_| next().abs() + 0.01)
            .collect();
        (act_quant(&x, k), w_codes, w_scales)
    }

    proptest! {
        /// One split is the unsplit GEMM, bit for bit (ragged K too).
        #[test]
        fn one_split_is_block_gemm(
            m in 1usize..4, n in 1usize..140, kblocks in 1usize..6, tail in 0usize..2,
            seed in any::<u64>(),
        ) {
            let k = kblocks * QUANT_BLOCK - tail * 64;
            let (a, codes, scales) = random_problem(m, n, k, seed);
            let one = block_gemm_w8a8_splits(&a, &codes, &scales, n, 1);
            let plain = block_gemm_w8a8(&a, &codes, &scales, n);
            prop_assert_eq!(
                one.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                plain.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
        }

        /// Any split count stays within the documented re-association bound of the unsplit
        /// sum: 2 (KB - 1) u / (1 - (KB - 1) u) * sum |c_kb|.
        #[test]
        fn splits_differ_within_the_reassociation_bound(
            m in 1usize..3, n in 1usize..40, kblocks in 1usize..40, tail in 0usize..2,
            split_pick in any::<usize>(), seed in any::<u64>(),
        ) {
            let k = kblocks * QUANT_BLOCK - tail * 64;
            let splits = 1 + split_pick % kblocks;
            let (a, codes, scales) = random_problem(m, n, k, seed);
            let split = block_gemm_w8a8_splits(&a, &codes, &scales, n, splits);
            let plain = block_gemm_w8a8(&a, &codes, &scales, n);
            let u = 2f64.powi(-24);
            let chain = (kblocks - 1) as f64;
            let factor = 2.0 * chain * u / (1.0 - chain * u);
            let mut a_row = vec![0f32; k];
            let mut w_row = vec![0f32; k];
            for i in 0..m {
                a.decoded_row(i, &mut a_row);
                for j in 0..n {
                    for (o, &c) in w_row.iter_mut().zip(&codes[j * k..(j + 1) * k]) {
                        *o = e4m3_to_f32(c);
                    }
                    let ws = &scales[(j / 128) * kblocks..][..kblocks];
                    // Each c_kb exactly as both orders round it (0 + c = c).
                    let mag: f64 = (0..kblocks)
                        .map(|kb| {
                            f64::from(dot_w8a8_blocks(&a_row, a.row_scales(i), &w_row, ws, kb..kb + 1))
                                .abs()
                        })
                        .sum();
                    let diff = (f64::from(split[i * n + j]) - f64::from(plain[i * n + j])).abs();
                    prop_assert!(diff <= factor * mag,
                        "[{i},{j}] splits {splits} of {kblocks}: |{} - {}| = {diff:e} > {:e}",
                        split[i * n + j], plain[i * n + j], factor * mag);
                }
            }
        }
    }

    /// The bound must count every K-block contribution, not the split totals: c = [1, u, u]
    /// in splits [1] + [u, u] comes to 1 + 2u, the single chain to 1.
    #[test]
    fn splits_reassociate_block_contributions() {
        let one = f32_to_e4m3(1.0);
        let k = 3 * QUANT_BLOCK;
        let mut codes = vec![0u8; k];
        for kb in 0..3 {
            codes[kb * QUANT_BLOCK] = one;
        }
        let u = 2f32.powi(-24);
        let a = QuantizedRows {
            rows: 1,
            cols: k,
            codes: codes.clone(),
            scales: vec![1.0, u, u],
        };
        let w_scales = [1.0f32; 3];
        assert_eq!(block_gemm_w8a8(&a, &codes, &w_scales, 1), vec![1.0]);
        assert_eq!(
            block_gemm_w8a8_splits(&a, &codes, &w_scales, 1, 2),
            vec![1.0 + 2.0 * u]
        );
        assert_eq!(split_k_range(3, 2, 0), 0..1);
    }

    #[test]
    fn all_zero_group_gets_finite_scale() {
        let q = act_quant(&[0.0; 128], 128);
        assert_eq!(q.scales[0], AMAX_FLOOR / E4M3_MAX);
        assert!(q.codes.iter().all(|&c| c == 0));
    }
}
