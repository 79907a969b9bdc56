//! MLA decode throughput on the paged latent cache, FlashMLA's configurations: b = 128,
//! heads in {128, 64, 16}, s_k in {4096, 8192}, s_q in {1, 2}, fixed and variable lengths
//! (variable: s_k[i] = max(N(mean, mean / 2), s_q), as FlashMLA's test draws them).
//!
//! `cargo bench --bench mla_decode [-- FILTER]`. Per shape, the timed call is the whole
//! attention: `mla_decode_wgmma` + `mla_combine` (the split-KV merge is always counted). The
//! scheduler (`mla_schedule`) runs once per batch layout and is shared by every layer of a
//! step, so it is timed on its own line, not inside each call (as FlashMLA's get_mla_metadata).
//! L2 is flushed before every timed call.
//!   GB/s   = (Q + KV once + O bytes) / t = 2 * (b s_q h 576 + sum(s_k) 576 + b s_q h 512) / t
//!   TFLOPS = 2 * h * s_q * sum(s_k) * (576 + 512) / t
//! Anchors (FlashMLA-class): h <= 64, s_q = 1: >= 2.9 TB/s; h = 128, s_q = 2: >= 650 TFLOPS
//! (FlashMLA: 3000 GB/s / 660 TFLOPS on H800). The reference kernel runs once for scale.
//! Without a GPU: `skipped: no CUDA device (<reason>)`, exit 0.

mod common;

use common::gpu_support::{to_bf16, Rng};
use common::{fail, Measurement};
use half::bf16;
use r1_runtime::cuda::{Device, Mla, MlaAttnArgs, MlaCache, MlaKernel, MlaLayout, MlaWorkspace};

const BATCH: usize = 128;
const HEADS: [usize; 3] = [128, 64, 16];
const SK: [usize; 2] = [4096, 8192];
const SQ: [usize; 2] = [1, 2];
const KV_LORA: usize = 512;
const ROPE: usize = 64;
const WIDTH: usize = KV_LORA + ROPE;
/// DeepSeek-V3's softmax scale: 192^-0.5 * (0.1 ln 40 + 1)^2.
const SCALE: f32 = 0.134_872_5;

/// Roughly normal (Irwin-Hall of 12).
fn normal(rng: &mut Rng) -> f64 {
    rng.uniform(12, 0.0, 1.0)
        .iter()
        .map(|&v| f64::from(v))
        .sum::<f64>()
        - 6.0
}

fn lengths(rng: &mut Rng, mean: usize, s_q: usize, varlen: bool) -> Vec<usize> {
    (0..BATCH)
        .map(|_| {
            if varlen {
                let l = mean as f64 + normal(rng) * mean as f64 / 2.0;
                (l.max(s_q as f64) as usize).max(s_q)
            } else {
                mean
            }
        })
        .collect()
}

/// A cache holding every sequence in contiguous pages (FlashMLA's block table). Its values
/// do not change the timing (no data-dependent paths), so it is filled by a memset: every
/// bf16 is 0x3F3F (about 0.746).
fn cache_for(dev: &Device, kv: &[usize]) -> (MlaCache, Vec<Vec<u32>>) {
    let mut tables = Vec::new();
    let mut next = 0u32;
    for &l in kv {
        let n = l.div_ceil(64) as u32;
        tables.push((next..next + n).collect());
        next += n;
    }
    let mut cache =
        MlaCache::new(dev, next as usize, KV_LORA, ROPE).unwrap_or_else(|e| fail("alloc cache", e));
    dev.memset(&mut cache.data, 0x3F)
        .unwrap_or_else(|e| fail("fill cache", e));
    (cache, tables)
}

fn main() {
    let Some(dev) = common::open_device() else {
        return;
    };
    let mla = Mla::new(&dev);
    let mut h = common::start(&dev, "mla_decode");
    println!(
        "mla_decode: anchors: h <= 64, s_q = 1: >= 2900 GB/s; h = 128, s_q = 2: >= 650 TFLOPS \
         (FlashMLA H800: 3000 GB/s, 660 TFLOPS); timed = mla_decode_wgmma + mla_combine"
    );
    let mut rng = Rng::new(0x31A);
    for &s_k in &SK {
        for varlen in [false, true] {
            // The cache depends on the lengths only; s_q shifts nothing but the query count.
            let kv = lengths(&mut rng, s_k, 2, varlen);
            let any = HEADS.iter().any(|&hd| {
                SQ.iter().any(|&sq| {
                    h.selected(&format!(
                        "b{BATCH}_h{hd}_sq{sq}_sk{s_k}_{}",
                        if varlen { "var" } else { "fixed" }
                    ))
                })
            });
            if !any {
                continue;
            }
            let (cache, tables) = cache_for(&dev, &kv);
            let total_k: usize = kv.iter().sum();
            for &heads in &HEADS {
                for &s_q in &SQ {
                    let id = format!(
                        "b{BATCH}_h{heads}_sq{s_q}_sk{s_k}_{}",
                        if varlen { "var" } else { "fixed" }
                    );
                    if !h.selected(&id) {
                        continue;
                    }
                    let layout = MlaLayout::decode(tables.clone(), kv.clone(), s_q);
                    let batch = layout.upload(&dev).unwrap_or_else(|e| fail(&id, e));
                    let rows = BATCH * s_q * heads;
                    let q = to_bf16(&rng.uniform(rows * WIDTH, -1.0, 1.0));
                    let q = dev.upload(&q).unwrap_or_else(|e| fail("upload q", e));
                    let mut out = dev
                        .alloc::<bf16>(rows * KV_LORA)
                        .unwrap_or_else(|e| fail("alloc out", e));
                    let mut lse = dev
                        .alloc::<f32>(rows)
                        .unwrap_or_else(|e| fail("alloc lse", e));
                    let mut ws = MlaWorkspace::new(&dev, BATCH, heads, s_q)
                        .unwrap_or_else(|e| fail("workspace", e));
                    let parts = ws.parts;
                    // Schedule once (as a model step would, for all layers).
                    mla.attention(
                        MlaAttnArgs {
                            q: &q,
                            heads,
                            scale: SCALE,
                            cache: &cache,
                            batch: &batch,
                            out: &mut out,
                            lse: &mut lse,
                            workspace: Some(&mut ws),
                            schedule: true,
                        },
                        MlaKernel::Wgmma,
                    )
                    .unwrap_or_else(|e| fail(&id, e));
                    let bytes = 2.0 * (rows * WIDTH + total_k * WIDTH + rows * KV_LORA) as f64;
                    let flops = 2.0 * (heads * s_q * total_k * (WIDTH + KV_LORA)) as f64;
                    let dims = [
                        ("b", BATCH),
                        ("h", heads),
                        ("s_q", s_q),
                        ("s_k", s_k),
                        ("varlen", usize::from(varlen)),
                        ("total_k", total_k),
                        ("parts", parts),
                    ];
                    {
                        let prep = mla
                            .prepare_attention(
                                MlaAttnArgs {
                                    q: &q,
                                    heads,
                                    scale: SCALE,
                                    cache: &cache,
                                    batch: &batch,
                                    out: &mut out,
                                    lse: &mut lse,
                                    workspace: Some(&mut ws),
                                    schedule: false,
                                },
                                MlaKernel::Wgmma,
                            )
                            .unwrap_or_else(|e| fail(&id, e));
                        let stats = h.measure(|| prep.launch()).unwrap_or_else(|e| fail(&id, e));
                        h.report(&Measurement {
                            id: &id,
                            kernel: "mla_decode_wgmma+combine",
                            dims: &dims,
                            stats,
                            flops,
                            bytes,
                        });
                        h.criterion_bench(&id, || prep.launch());
                    }
                    // The scheduler alone, once per layout (not per layer).
                    if heads == HEADS[0] && s_q == 1 {
                        let prep = mla
                            .prepare_attention(
                                MlaAttnArgs {
                                    q: &q,
                                    heads,
                                    scale: SCALE,
                                    cache: &cache,
                                    batch: &batch,
                                    out: &mut out,
                                    lse: &mut lse,
                                    workspace: Some(&mut ws),
                                    schedule: true,
                                },
                                MlaKernel::Wgmma,
                            )
                            .unwrap_or_else(|e| fail(&id, e));
                        let with = h.measure(|| prep.launch()).unwrap_or_else(|e| fail(&id, e));
                        h.report(&Measurement {
                            id: &format!("{id}_with_schedule"),
                            kernel: "schedule+decode+combine",
                            dims: &dims,
                            stats: with,
                            flops,
                            bytes,
                        });
                    }
                    // The reference kernel once, for scale (slow: it re-reads the cache per head).
                    if heads == 16 && s_q == 1 && s_k == SK[0] && !varlen {
                        let prep = mla
                            .prepare_attention(
                                MlaAttnArgs {
                                    q: &q,
                                    heads,
                                    scale: SCALE,
                                    cache: &cache,
                                    batch: &batch,
                                    out: &mut out,
                                    lse: &mut lse,
                                    workspace: None,
                                    schedule: false,
                                },
                                MlaKernel::Reference,
                            )
                            .unwrap_or_else(|e| fail(&id, e));
                        let stats = h.measure(|| prep.launch()).unwrap_or_else(|e| fail(&id, e));
                        h.report(&Measurement {
                            id: &format!("{id}_ref"),
                            kernel: "mla_attn_ref",
                            dims: &dims,
                            stats,
                            flops,
                            bytes,
                        });
                    }
                }
            }
        }
    }
    h.finish();
}
