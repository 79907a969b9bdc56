//! x · W^T on the CPU for every weight kind and precision, parallel over output features.

use rayon::prelude::*;

use crate::backend::Precision;
use crate::checkpoint::Fp8Weight;
use crate::model::weights::Weight;
use crate::numerics::quant::{dot_w8a8, QuantizedRows};
use crate::numerics::{act_quant, dot, e4m3_to_f32, QUANT_BLOCK};

/// Output features computed per rayon task.
const FEATURES_PER_TASK: usize = 16;

/// out[t, n] = sum_k x[t, k] W[n, k] for `x` with `k` columns; f32 result, not rounded.
pub fn linear(x: &[f32], w: &Weight, precision: Precision) -> Vec<f32> {
    let (n, k) = w.shape();
    let rows = x.len() / k;
    if rows == 0 {
        // A step may select no rows (prefill chunks that need no logits).
        return Vec::new();
    }
    // Computed feature-major ([n, rows]) so each task owns contiguous output, then transposed.
    let mut out_t = vec![0f32; n * rows];
    match w {
        Weight::Dense { data, .. } => for_each_feature(&mut out_t, rows, k, |nn, _, col| {
            let row = &data[nn * k..(nn + 1) * k];
            for (t, o) in col.iter_mut().enumerate() {
                *o = dot(&x[t * k..(t + 1) * k], row);
            }
        }),
        Weight::Fp8(w) => match precision {
            Precision::Exact => fp8_exact(x, w, rows, &mut out_t),
            Precision::W8a8 => fp8_w8a8(&act_quant(x, k), w, &mut out_t),
        },
        Weight::Synthetic(_) => {
            unreachable!("synthetic weights have no host values (CpuBackend::run refuses them)")
        }
    }
    transpose(&out_t, n, rows)
}

/// Runs `f(feature, scratch, column)` for every output feature in parallel; `column` is the
/// feature's `rows` outputs and `scratch` a reusable buffer of `k` values per task.
fn for_each_feature(
    out_t: &mut [f32],
    rows: usize,
    k: usize,
    f: impl Fn(usize, &mut [f32], &mut [f32]) + Sync,
) {
    out_t
        .par_chunks_mut(rows * FEATURES_PER_TASK)
        .enumerate()
        .for_each_init(
            || vec![0f32; k],
            |scratch, (task, out)| {
                for (j, col) in out.chunks_mut(rows).enumerate() {
                    f(task * FEATURES_PER_TASK + j, scratch, col);
                }
            },
        );
}

/// Exact mode: W = e4m3(q) * scale in f32, then an f32 dot product.
fn fp8_exact(x: &[f32], w: &Fp8Weight, rows: usize, out_t: &mut [f32]) {
    let (k, kb) = (w.k, w.k.div_ceil(QUANT_BLOCK));
    let codes = w.codes.as_slice();
    for_each_feature(out_t, rows, k, |nn, wrow, col| {
        let scales = &w.scales[(nn / QUANT_BLOCK) * kb..][..kb];
        for (i, (dst, &c)) in wrow
            .iter_mut()
            .zip(&codes[nn * k..(nn + 1) * k])
            .enumerate()
        {
            *dst = e4m3_to_f32(c) * scales[i / QUANT_BLOCK];
        }
        for (t, o) in col.iter_mut().enumerate() {
            *o = dot(&x[t * k..(t + 1) * k], wrow);
        }
    });
}

/// w8a8: both operands as e4m3 codes, block partial sums promoted with both scales.
fn fp8_w8a8(a: &QuantizedRows, w: &Fp8Weight, out_t: &mut [f32]) {
    let (k, kb, rows) = (w.k, w.k.div_ceil(QUANT_BLOCK), a.rows);
    let mut a_decoded = vec![0f32; rows * k];
    for (r, row) in a_decoded.chunks_mut(k).enumerate() {
        a.decoded_row(r, row);
    }
    let codes = w.codes.as_slice();
    for_each_feature(out_t, rows, k, |nn, wrow, col| {
        for (dst, &c) in wrow.iter_mut().zip(&codes[nn * k..(nn + 1) * k]) {
            *dst = e4m3_to_f32(c);
        }
        let w_scales = &w.scales[(nn / QUANT_BLOCK) * kb..][..kb];
        for (t, o) in col.iter_mut().enumerate() {
            *o = dot_w8a8(
                &a_decoded[t * k..(t + 1) * k],
                a.row_scales(t),
                wrow,
                w_scales,
            );
        }
    });
}

fn transpose(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = x[r * cols + c];
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::numerics::{block_gemm_w8a8, f32_to_e4m3};

    /// The parallel w8a8 path equals the single-threaded reference bit for bit.
    #[test]
    fn parallel_w8a8_equals_reference() {
        let (m, n, k) = (3, 200, 384);
        let x: Vec<f32> = (0..m * k)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        let codes: Vec<u8> = (0..n * k)
            .map(|i| f32_to_e4m3(((i * 13 % 97) as f32 - 48.0) / 3.0))
            .collect();
        let scales: Vec<f32> = (0..2 * 3).map(|i| 0.01 * (i + 1) as f32).collect();
        let w = Weight::Fp8(crate::checkpoint::Fp8Weight::from_parts(
            n,
            k,
            codes.clone(),
            scales.clone(),
        ));
        let got = linear(&x, &w, Precision::W8a8);
        let want = block_gemm_w8a8(&act_quant(&x, k), &codes, &scales, n);
        assert_eq!(got, want);
    }
}
