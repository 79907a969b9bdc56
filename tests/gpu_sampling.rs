//! The device sampler (`sample_tokens`, cuda/sampling.cu) against the CPU rule
//! (`r1_runtime::numerics::sampling::draw`): the same token, exactly, for every row.
//!
//! Without a usable device every GPU test prints `skipped: no CUDA device (<reason>) [<test>]`
//! and returns (`R1_REQUIRE_GPU=1` makes that a failure); the harness is tests/gpu_support.
//!
//! Rows: DeepSeek's vocabulary (129,280) and small ones (1, 7, 1003, 4096), normal logits at three
//! scales, rows rounded to a coarse grid (many ties, also at the top-k and top-p boundaries),
//! rows with NaN and -inf, rows with +inf and all -inf; draws at temperature 0 / 0.6 / 1.5,
//! top_k 0 / 1 / 50, top_p 1 / 0.95 / 0.5, many seeds and counters, 64 or more rows a launch.
//! `sanitizer_smoke` is the small launch the suite runs under memcheck.

mod gpu_support;

use rayon::prelude::*;

use r1_runtime::cuda::{Device, SampleArgs, SampleRow};
use r1_runtime::numerics::sampling::{draw, Draw};

use gpu_support::{gpu, Rng};

/// Logits `[rows][vocab]` of varied kinds (see the module docs).
fn logits(rng: &mut Rng, rows: usize, vocab: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(rows * vocab);
    for r in 0..rows {
        let scale = [1.0, 3.0, 8.0][r % 3];
        let mut row: Vec<f32> = (0..vocab).map(|_| rng.normal() * scale).collect();
        match r % 8 {
            // Coarse grid: many equal values, at every boundary.
            3 => row.iter_mut().for_each(|v| *v = (*v * 2.0).round() / 2.0),
            5 if vocab > 4 => {
                row[0] = f32::NAN;
                row[vocab / 2] = f32::NEG_INFINITY;
                row[vocab - 1] = f32::NAN;
            }
            6 if vocab > 4 && r % 16 == 6 => row[vocab / 3] = f32::INFINITY,
            7 if r % 32 == 7 => row.iter_mut().for_each(|v| *v = f32::NEG_INFINITY),
            _ => {}
        }
        out.extend(row);
    }
    out
}

/// Every combination of the settings, with a random seed and counter each.
fn draws(rng: &mut Rng, n: usize) -> Vec<Draw> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        for temperature in [0.0, 0.6, 1.5] {
            for top_k in [0, 1, 50] {
                for top_p in [1.0, 0.95, 0.5] {
                    out.push(Draw {
                        temperature,
                        top_k,
                        top_p,
                        seed: rng.next_u64(),
                        counter: rng.next_u64() % 200_000,
                    });
                }
            }
        }
    }
    out.truncate(n);
    out
}

/// Draws `rows` on the device, one launch; returns the tokens.
fn sample_on_gpu(
    dev: &Device,
    logits: &[f32],
    vocab: usize,
    rows: &[SampleRow],
) -> Result<Vec<i32>, String> {
    let e = |e: r1_runtime::cuda::CudaError| e.to_string();
    let x = dev.upload(logits).map_err(e)?;
    let r = dev.upload(rows).map_err(e)?;
    let mut tokens = dev.alloc_zeros::<i32>(rows.len()).map_err(e)?;
    dev.sample_into(SampleArgs {
        logits: &x,
        vocab,
        rows: &r,
        n_rows: rows.len(),
        tokens: &mut tokens,
    })
    .map_err(e)?;
    dev.download(&tokens).map_err(e)
}

/// `batches` launches of `per_launch` draws over `n_rows` rows of `vocab`: GPU == CPU.
fn check(dev: &Device, seed: u64, n_rows: usize, vocab: usize, batches: usize, per_launch: usize) {
    let mut rng = Rng::new(seed);
    let x = logits(&mut rng, n_rows, vocab);
    for batch in 0..batches {
        let ds = draws(&mut rng, per_launch);
        let rows: Vec<SampleRow> = ds
            .iter()
            .enumerate()
            .map(|(i, d)| SampleRow::new((i * 7 + batch) % n_rows, d))
            .collect();
        let got = sample_on_gpu(dev, &x, vocab, &rows).unwrap();
        let want: Vec<i32> = rows
            .par_iter()
            .zip(&ds)
            .map(|(r, d)| {
                let row = r.row as usize;
                draw(&x[row * vocab..(row + 1) * vocab], d) as i32
            })
            .collect();
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(
                g, w,
                "vocab {vocab}, batch {batch}, entry {i}: row {} {:?}: GPU drew {g}, CPU {w}",
                rows[i].row, ds[i]
            );
        }
    }
}

#[test]
fn deepseek_vocab_matches_cpu_exactly() {
    let Some(dev) = gpu("deepseek_vocab_matches_cpu_exactly") else {
        return;
    };
    check(dev, 1, 32, 129_280, 3, 81);
}

#[test]
fn small_vocabs_match_cpu_exactly() {
    let Some(dev) = gpu("small_vocabs_match_cpu_exactly") else {
        return;
    };
    for (seed, vocab) in [(2, 1), (3, 7), (4, 1003), (5, 4096)] {
        check(dev, seed, 64, vocab, 4, 128);
    }
}

/// Many counters on one row: the noise stream, not only the selection, agrees.
#[test]
fn many_counters_match_cpu_exactly() {
    let Some(dev) = gpu("many_counters_match_cpu_exactly") else {
        return;
    };
    let mut rng = Rng::new(6);
    let vocab = 129_280;
    let x = logits(&mut rng, 1, vocab);
    for (temperature, top_k, top_p) in [(1.0, 0, 1.0), (0.6, 50, 0.95), (1.5, 0, 0.5)] {
        let ds: Vec<Draw> = (0..256)
            .map(|counter| Draw {
                temperature,
                top_k,
                top_p,
                seed: 42,
                counter,
            })
            .collect();
        let rows: Vec<SampleRow> = ds.iter().map(|d| SampleRow::new(0, d)).collect();
        let got = sample_on_gpu(dev, &x, vocab, &rows).unwrap();
        let want: Vec<i32> = ds.par_iter().map(|d| draw(&x, d) as i32).collect();
        assert_eq!(got, want, "T {temperature} top_k {top_k} top_p {top_p}");
    }
}

/// A row index outside the logits buffer draws -1; zero rows launch nothing.
#[test]
fn out_of_range_rows_draw_minus_one() {
    let Some(dev) = gpu("out_of_range_rows_draw_minus_one") else {
        return;
    };
    let d = Draw {
        temperature: 1.0,
        top_k: 0,
        top_p: 1.0,
        seed: 0,
        counter: 0,
    };
    let x = [0.0f32, 1.0, 2.0, 3.0, 4.0, 5.0];
    let rows = [
        SampleRow::new(2, &d),
        SampleRow::new(0, &d),
        SampleRow::new(usize::MAX, &d),
    ];
    let got = sample_on_gpu(dev, &x, 3, &rows).unwrap();
    assert_eq!(got[0], -1);
    assert_eq!(got[1], draw(&x[..3], &d) as i32);
    assert_eq!(got[2], -1);
    let buf = dev.upload(&x).unwrap();
    let r = dev.upload(&rows).unwrap();
    let mut tokens = dev.alloc_zeros::<i32>(1).unwrap();
    let prepared = dev
        .prepare_sample(SampleArgs {
            logits: &buf,
            vocab: 3,
            rows: &r,
            n_rows: 0,
            tokens: &mut tokens,
        })
        .unwrap();
    assert!(prepared.kernels().is_empty());
}

/// The suite's memcheck run (tools/gpu-runner): one small launch through every pass.
#[test]
fn sanitizer_smoke() {
    let Some(dev) = gpu("sanitizer_smoke") else {
        return;
    };
    check(dev, 7, 4, 1003, 1, 8);
}
