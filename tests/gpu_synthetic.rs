//! Synthetic weights (`ModelWeights::synthetic`): the device fill (`random_fill`) against its
//! host stream bit for bit, synthetic models through the engine on the CUDA backend (finite
//! logits and hidden states of order one, at R1's real dimensions too: what the decode_layer
//! bench relies on), and the CPU backend's refusal (runs everywhere). Without a device the GPU
//! tests print `skipped: no CUDA device (...)` (a failure under R1_REQUIRE_GPU).

mod common;
mod gpu_support;

use std::sync::Arc;

use common::fixture;
use half::bf16;
use r1_runtime::config::ModelConfig;
use r1_runtime::cpu::CpuBackend;
use r1_runtime::cuda::ops::{random_fill_host, FillElement, RandomFill, RandomFillArgs};
use r1_runtime::cuda::{CudaBackend, CudaOptions, Device};
use r1_runtime::engine::{Engine, Sequence};
use r1_runtime::model::weights::ModelWeights;
use r1_runtime::model::LogitRows;
use r1_runtime::{Error, Precision};

/// Fills elements `offset .. offset + n` of a buffer whose other elements hold a sentinel
/// byte, and compares the whole buffer with the host stream and the sentinel.
fn fill_matches<T: FillElement + PartialEq + std::fmt::Debug>(
    dev: &Device,
    what: &str,
    offset: usize,
    n: usize,
    fill: RandomFill,
) {
    let len = offset + n + 5;
    let mut buf = dev.alloc::<T>(len).unwrap();
    dev.memset(&mut buf, 0x5A).unwrap();
    dev.prepare_random_fill(RandomFillArgs {
        out: &mut buf,
        range: offset..offset + n,
        fill,
    })
    .unwrap()
    .launch()
    .unwrap();
    let got = dev.download(&buf).unwrap();
    let sentinel: T = bytemuck::pod_read_unaligned(&vec![0x5Au8; std::mem::size_of::<T>()]);
    assert!(
        got[..offset]
            .iter()
            .chain(&got[offset + n..])
            .all(|v| *v == sentinel),
        "{what}: wrote outside its range"
    );
    let want: Vec<T> = random_fill_host(n, &fill);
    if let Some(i) = (0..n).find(|&i| got[offset + i] != want[i]) {
        panic!(
            "{what}: element {i} is {:?}, the host stream says {:?}",
            got[offset + i],
            want[i]
        );
    }
}

/// Small ragged fills of every kind (the memcheck run's test).
#[test]
fn sanitizer_smoke() {
    let Some(dev) = gpu_support::gpu("gpu_synthetic::sanitizer_smoke") else {
        return;
    };
    let fill = RandomFill {
        seed: 11,
        center: 0.5,
        spread: 3.0,
    };
    fill_matches::<u8>(dev, "e4m3", 3, 1001, fill);
    fill_matches::<bf16>(dev, "bf16", 1, 777, fill);
    fill_matches::<f32>(dev, "f32", 0, 513, fill);
}

/// Past the grid cap (65536 blocks x 256 threads), so the grid-stride loop runs, and with
/// the synthetic Linear weights' spread (saturation never reached) and a saturating one.
#[test]
fn random_fill_matches_the_host_stream() {
    let Some(dev) = gpu_support::gpu("gpu_synthetic::random_fill_matches_the_host_stream") else {
        return;
    };
    let n = 65536 * 256 + 4097;
    let codes = RandomFill {
        seed: 0xC0DE,
        center: 0.0,
        spread: 64.0,
    };
    fill_matches::<u8>(dev, "e4m3 codes", 7, n, codes);
    let saturating = RandomFill {
        spread: 1000.0,
        ..codes
    };
    fill_matches::<u8>(dev, "saturating e4m3", 0, 100_003, saturating);
    let norm = RandomFill {
        seed: 3,
        center: 1.0,
        spread: 0.05,
    };
    fill_matches::<bf16>(dev, "bf16", 5, 1 << 20, norm);
    fill_matches::<f32>(dev, "f32", 2, 300_001, norm);
}

/// Prefill, decode and MTP steps of `cfg`'s synthetic model on the GPU: every logit finite,
/// every final-normed hidden state of RMS within [0.1, 10] (its norm's weights are near 1:
/// a NaN, an overflow or an all-zero residual stream fails), the MTP layer's output finite.
fn run_synthetic(cfg: &ModelConfig, prompt: usize, test: &str) {
    if gpu_support::gpu(test).is_none() {
        return;
    }
    let weights = Arc::new(ModelWeights::synthetic(cfg, true, 0x5EED));
    let backend = CudaBackend::new(
        cfg,
        Arc::clone(&weights),
        Precision::W8a8,
        &CudaOptions::default(),
    )
    .unwrap_or_else(|e| panic!("{test}: the synthetic model does not materialize: {e}"));
    let mut engine = Engine::with_backend(cfg.clone(), weights, Box::new(backend), 1 << 16);
    let v = cfg.vocab_size;
    let tokens: Vec<u32> = (0..prompt).map(|i| ((i * 7919 + 3) % v) as u32).collect();
    let h = cfg.hidden_size;
    let check = |what: &str, logits: &[f32], hidden: &[f32]| {
        assert!(
            logits.iter().all(|x| x.is_finite()),
            "{test}: {what}: non-finite logits"
        );
        for (i, row) in hidden.chunks(h).enumerate() {
            let rms = (row.iter().map(|x| x * x).sum::<f32>() / h as f32).sqrt();
            assert!(
                (0.1..=10.0).contains(&rms),
                "{test}: {what}: hidden row {i} has RMS {rms}"
            );
        }
    };
    let mut seq = Sequence::default();
    let out = engine.forward(&mut seq, &tokens, LogitRows::Last).unwrap();
    check("prefill", &out.logits, &out.hidden);
    let mut hidden = out.hidden;
    for step in 0..3 {
        let out = engine
            .forward(
                &mut seq,
                &[(step * 31 + 7) as u32 % v as u32],
                LogitRows::Last,
            )
            .unwrap();
        check("decode", &out.logits, &out.hidden);
        hidden = out.hidden;
    }
    let at = seq.len() - 1;
    let mtp = engine
        .mtp_forward(
            &mut seq,
            0,
            &tokens[1..],
            &vec![0.0; (prompt - 1) * h],
            LogitRows::Last,
        )
        .unwrap();
    assert!(
        mtp.logits.iter().chain(&mtp.hidden).all(|x| x.is_finite()),
        "{test}: non-finite MTP output"
    );
    let mtp = engine
        .mtp_forward(&mut seq, prompt - 1, &[5], &hidden[..h], LogitRows::Last)
        .unwrap();
    assert!(
        mtp.logits.iter().all(|x| x.is_finite()),
        "{test}: non-finite MTP logits at position {at}"
    );
    println!("{test}: {prompt}-token prefill, 3 decode steps and MTP steps finite");
}

/// The r1-heads fixture's dimensions (real head sizes, small everything else).
#[test]
fn small_synthetic_model_runs_on_the_gpu() {
    let cfg = ModelConfig::from_dir(&fixture("r1-heads")).unwrap();
    run_synthetic(
        &cfg,
        40,
        "gpu_synthetic::small_synthetic_model_runs_on_the_gpu",
    );
}

/// R1's released dimensions: a dense and a MoE layer and the MTP layer (~24 GB of synthetic
/// weights filled on the device), vocabulary cut to 1024.
#[test]
fn r1_dimension_layers_stay_finite() {
    let mut cfg = gpu_support::deepseek_r1_config();
    cfg.num_hidden_layers = 2;
    cfg.first_k_dense_replace = 1;
    cfg.vocab_size = 1024;
    run_synthetic(&cfg, 100, "gpu_synthetic::r1_dimension_layers_stay_finite");
}

/// No host values: the CPU backend refuses a synthetic model with an error that says so,
/// and the refused step caches nothing.
#[test]
fn the_cpu_backend_refuses_synthetic_weights() {
    let cfg = ModelConfig::from_dir(&fixture("r1-heads")).unwrap();
    let weights = Arc::new(ModelWeights::synthetic(&cfg, true, 1));
    for precision in [Precision::Exact, Precision::W8a8] {
        let backend = CpuBackend::new(&cfg, Arc::clone(&weights), precision);
        let mut engine =
            Engine::with_backend(cfg.clone(), Arc::clone(&weights), Box::new(backend), 4096);
        let mut seq = Sequence::default();
        let err = engine
            .forward(&mut seq, &[0, 5, 6], LogitRows::Last)
            .expect_err("the CPU backend must refuse synthetic weights");
        assert!(matches!(err, Error::Unsupported(_)), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains("synthetic") && msg.contains("CUDA backend"),
            "{msg}"
        );
        assert!(seq.is_empty(), "a refused step caches nothing");
    }
}
