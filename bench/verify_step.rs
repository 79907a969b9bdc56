//! Issue "MTP speculative decoding": the cost of one verify step (s_q = 2, 3, 4 tokens per
//! sequence) relative to one plain decode step (s_q = 1), at batch 1/8/32, plus one MTP draft
//! step, on the CPU backend with the `r1-heads` fixture (real head dims). Every timed step is
//! rolled back, so each iteration sees the same 64-token context.
//!
//! From these: tokens/s speedup with k = 1 draft at acceptance a is
//!   (1 + a) * t_decode / (t_verify(s_q = 2) + t_draft).

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use r1_runtime::engine::{Engine, EngineOptions, Sequence, Step};
use r1_runtime::model::LogitRows;

const CONTEXT: usize = 64;

fn engine() -> Engine {
    Engine::load(&common::fixture("r1-heads"), &EngineOptions::default()).expect("fixture loads")
}

fn prompt(seed: usize) -> Vec<u32> {
    (0..CONTEXT)
        .map(|i| ((i * 31 + seed * 17) % 500 + 2) as u32)
        .collect()
}

/// One forward of `s_q` tokens for each of `seqs`, then rolled back.
fn step(e: &mut Engine, seqs: &mut [Sequence], s_q: usize) -> Duration {
    let tokens: Vec<u32> = (0..s_q as u32).map(|t| t + 7).collect();
    let mut steps: Vec<Step> = seqs
        .iter_mut()
        .map(|seq| Step {
            seq,
            tokens: &tokens,
        })
        .collect();
    let t = Instant::now();
    e.forward_batch(&mut steps, LogitRows::All)
        .expect("step runs");
    let elapsed = t.elapsed();
    for seq in seqs.iter_mut() {
        e.truncate(seq, CONTEXT);
    }
    elapsed
}

fn verify_steps(c: &mut Criterion) {
    let mut e = engine();
    let mut group = c.benchmark_group("cpu_verify_step");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(2));
    for batch in [1usize, 8, 32] {
        let mut seqs: Vec<Sequence> = (0..batch).map(|_| Sequence::default()).collect();
        for (i, seq) in seqs.iter_mut().enumerate() {
            e.forward(seq, &prompt(i), LogitRows::Last)
                .expect("prefill");
        }
        for s_q in 1..=4 {
            group.bench_with_input(
                BenchmarkId::new(format!("batch{batch}"), format!("s_q{s_q}")),
                &s_q,
                |b, &s_q| {
                    b.iter_custom(|iters| (0..iters).map(|_| step(&mut e, &mut seqs, s_q)).sum())
                },
            );
        }
        for seq in seqs.iter_mut() {
            e.release(seq);
        }
    }
    group.finish();

    // One MTP draft step (batch 1): the drafter's cost per proposed token.
    let mut seq = Sequence::default();
    let p = prompt(0);
    let fwd = e.forward(&mut seq, &p, LogitRows::Last).expect("prefill");
    let h = e.config().hidden_size;
    e.mtp_forward(
        &mut seq,
        0,
        &p[1..],
        &fwd.hidden[..(CONTEXT - 1) * h],
        LogitRows::Last,
    )
    .expect("mtp prefill");
    let last_hidden = fwd.hidden[(CONTEXT - 1) * h..].to_vec();
    c.bench_function("cpu_mtp_draft_step/batch1", |b| {
        b.iter(|| {
            e.mtp_forward(&mut seq, CONTEXT - 1, &[9], &last_hidden, LogitRows::Last)
                .expect("draft")
        })
    });
    e.release(&mut seq);
}

criterion_group!(benches, verify_steps);
criterion_main!(benches);
