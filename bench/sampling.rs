//! sample_tokens: one token per row of DeepSeek's 129,280 logits, for 1, 32 and 128 rows, under
//! greedy, plain temperature, top-k + top-p and top-p alone.
//!
//! `cargo bench --bench sampling [-- FILTER]`. GB/s counts one read of the logits (the kernel
//! reads each row several times, the later passes from L2). L2 is flushed before every timed
//! call. Without a GPU: `skipped: no CUDA device (<reason>)`, exit 0.

mod common;

use common::gpu_support::Rng;
use common::{fail, Measurement};
use r1_runtime::cuda::{SampleArgs, SampleRow};
use r1_runtime::numerics::sampling::Draw;

const VOCAB: usize = 129_280;
const ROWS: [usize; 3] = [1, 32, 128];

fn main() {
    let Some(dev) = common::open_device() else {
        return;
    };
    let mut h = common::start(&dev, "sampling");
    let mut rng = Rng::new(0x5A3);
    let settings = [
        ("greedy", 0.0, 0, 1.0),
        ("t1", 1.0, 0, 1.0),
        ("t0.6_k50_p0.95", 0.6, 50, 0.95),
        ("t1_p0.9", 1.0, 0, 0.9),
    ];
    for &rows in &ROWS {
        // Logits like a model's: a few clear leaders above a broad normal body.
        let mut x: Vec<f32> = (0..rows * VOCAB).map(|_| rng.normal() * 2.0).collect();
        for r in 0..rows {
            for _ in 0..8 {
                x[r * VOCAB + rng.below(VOCAB)] = 12.0 + 4.0 * rng.unit();
            }
        }
        let x = dev.upload(&x).unwrap_or_else(|e| fail("upload logits", e));
        let mut tokens = dev
            .alloc::<i32>(rows)
            .unwrap_or_else(|e| fail("alloc tokens", e));
        for &(name, temperature, top_k, top_p) in &settings {
            let id = format!("rows{rows}_{name}");
            if !h.selected(&id) {
                continue;
            }
            let table: Vec<SampleRow> = (0..rows)
                .map(|r| {
                    let d = Draw {
                        temperature,
                        top_k,
                        top_p,
                        seed: 7,
                        counter: r as u64,
                    };
                    SampleRow::new(r, &d)
                })
                .collect();
            let table = dev
                .upload(&table)
                .unwrap_or_else(|e| fail("upload rows", e));
            let prep = dev
                .prepare_sample(SampleArgs {
                    logits: &x,
                    vocab: VOCAB,
                    rows: &table,
                    n_rows: rows,
                    tokens: &mut tokens,
                })
                .unwrap_or_else(|e| fail(&id, e));
            let stats = h.measure(|| prep.launch()).unwrap_or_else(|e| fail(&id, e));
            h.report(&Measurement {
                id: &id,
                kernel: "sample_tokens",
                dims: &[("rows", rows), ("vocab", VOCAB), ("top_k", top_k as usize)],
                stats,
                flops: 0.0,
                bytes: (4 * rows * VOCAB) as f64,
            });
            h.criterion_bench(&id, || prep.launch());
        }
    }
    h.finish();
}
