//! act_quant throughput: bf16 [M, K] -> fp8 + 1x128 scales, for M in {1, 16, 64, 128, 4096}
//! and every K the DeepSeek-V3 FP8 GEMMs take (7168, 1536, 512, 16384, 2048).
//!
//! `cargo bench --bench act_quant [-- FILTER]`. Memory-bound: GB/s = (2MK read + MK written +
//! 4 M K/128 scales) / t, reported against H100 SXM's 3.35 TB/s (the design's anchor is >= 85%
//! of the ~3.0 TB/s a device-to-device copy reaches). L2 is flushed before every timed call.
//! Without a GPU: `skipped: no CUDA device (<reason>)`, exit 0.

mod common;

use common::gpu_support::{to_bf16, Rng};
use common::{fail, Measurement, BENCH_M, H100_SXM_COPY_GBPS};
use r1_runtime::cuda::{act_scale_m_pad, ActQuantArgs};

const KS: [usize; 5] = [7168, 1536, 512, 16384, 2048];

fn main() {
    let Some(dev) = common::open_device() else {
        return;
    };
    let mut h = common::start(&dev, "act_quant");
    println!(
        "act_quant: anchor: >= 85% of a device-to-device copy (~{H100_SXM_COPY_GBPS} GB/s on H100 SXM)"
    );
    let mut rng = Rng::new(0xAC7);
    for &k in &KS {
        for &m in &BENCH_M {
            let id = format!("m{m}_k{k}");
            if !h.selected(&id) {
                continue;
            }
            let x = to_bf16(&rng.uniform(m * k, -8.0, 8.0));
            let x = dev.upload(&x).unwrap_or_else(|e| fail("upload x", e));
            let m_pad = act_scale_m_pad(m);
            let mut q = dev
                .alloc::<u8>(m * k)
                .unwrap_or_else(|e| fail("alloc q", e));
            let mut scales = dev
                .alloc::<f32>(k / 128 * m_pad)
                .unwrap_or_else(|e| fail("alloc scales", e));
            let prep = dev
                .prepare_act_quant(ActQuantArgs {
                    x: &x,
                    ldx: k,
                    q: &mut q,
                    ldq: k,
                    scales: &mut scales,
                    m_pad,
                    m,
                    k,
                })
                .unwrap_or_else(|e| fail(&id, e));
            let stats = h.measure(|| prep.launch()).unwrap_or_else(|e| fail(&id, e));
            h.report(&Measurement {
                id: &id,
                kernel: "act_quant",
                dims: &[("m", m), ("k", k)],
                stats,
                flops: 0.0,
                bytes: (2 * m * k + m * k + 4 * m * (k / 128)) as f64,
            });
            h.criterion_bench(&id, || prep.launch());
        }
    }
    h.finish();
}
