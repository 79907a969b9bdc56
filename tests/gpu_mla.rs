//! MLA kernels (cuda/mla/) against the CPU reference (`r1_runtime::cpu::attention`).
//!
//! Without a usable device every GPU test prints `skipped: no CUDA device (<reason>) [<test>]`
//! to stderr (past libtest's capture) and returns; `R1_REQUIRE_GPU=1` (tools/gpu-suite) makes
//! that a failure (the shared harness: tests/gpu_support). The reference harness's own test
//! runs everywhere; the scheduler's coverage, the kernel choice and the host checks are unit
//! tests beside their code (src/cuda/heuristics.rs, ops/mla_attn.rs, ops/mla.rs).
//!
//! The CPU reference computes absorbed attention from (q_nope, q_pe) through kv_b_proj; the
//! tests make it compute the bare latent attention the kernels do by choosing qk_nope = v =
//! kv_lora and W_UK = W_UV = identity for every head (then q_lat = q_nope and out = o_lat,
//! exactly), in W8a8 precision (bf16 cache, bf16 q_lat / q_pe / o_lat, f32 softmax). The
//! GPU gets q_pe already roped by the CPU's own `Rope` and rounded to bf16, so both sides
//! score the same bf16 numbers.
//!
//! The absorption kernels (small_mla_absorb_q / _o, cuda/small_ops.cu) get their own test:
//! over the absorbed kv_b (W_UK transposed per head, `cuda::backend::absorbed_kv_b`) they must
//! give the products read from kv_b_proj's checkpoint rows, as the CPU backend reads them.
//!
//! Tolerances (stated, not tuned to pass):
//! - cache write and q RoPE: every value within 1 bf16 ulp of the CPU (the norm's sum order
//!   and the last bit of sin/cos may differ), and at least 99% bit-identical.
//! - attention output (bf16): elementwise |gpu - ref| <= 2^-7 |ref| + 2^-8 max|V| (P is
//!   rounded to bf16 before P.V, error <= 2^-9 sum_j p_j |v_j|; both outputs round to bf16),
//!   and rms(gpu - ref) <= 2^-7 rms(ref) per (sequence, query token) (catches one missing key
//!   of 4097 under flat attention).
//! - lse (natural log): |gpu - ref| <= 1e-4 + 1e-6 |ref|, ref in f64.
//! - the reference kernel is deterministic per row, so chunked prefill + decode must equal a
//!   single prefill bit for bit on it; the fast path within the attention tolerance.

mod gpu_support;

use std::sync::OnceLock;

use half::bf16;
use rayon::prelude::*;

use r1_runtime::config::ModelConfig;
use r1_runtime::cpu::attention::{self as cpu_attn, Absorbed, LayerCache, MlaShape, Rope};
use r1_runtime::cuda::backend::{absorbed_kv_b, upload_rope};
use r1_runtime::cuda::ops::{MlaAbsorbDesc, SmallOps};
use r1_runtime::cuda::{
    mla_schedule_host, CudaError, Device, DeviceBuffer, Mla, MlaAttnArgs, MlaCache,
    MlaCacheWriteArgs, MlaKernel, MlaLayout, MlaQRopeArgs, MlaWorkspace, Region,
    MLA_SCHED_FIXED_OVERHEAD,
};
use r1_runtime::kv_cache::{Batch, BlockId, Segment, PAGE_TOKENS};
use r1_runtime::numerics::round_bf16;
use r1_runtime::Precision;

use gpu_support::{deepseek_r1_config, mla_attention_on_gpu, say, to_bf16, MlaRun, Rng};

const KV_LORA: usize = 512;
const ROPE: usize = 64;
const WIDTH: usize = KV_LORA + ROPE;

// ------------------------------------------------------------------------------------------
// Device and skipping
// ------------------------------------------------------------------------------------------

/// The shared device's MLA kernels, or None after printing the skip line.
fn gpu(test: &str) -> Option<&'static Mla> {
    static MLA: OnceLock<Mla> = OnceLock::new();
    let dev = gpu_support::gpu(test)?;
    Some(MLA.get_or_init(|| Mla::new(dev)))
}

// ------------------------------------------------------------------------------------------
// Data
// ------------------------------------------------------------------------------------------

/// The latent-attention shape with identity absorption (see the module docs).
fn latent_shape(cfg: &ModelConfig, heads: usize) -> MlaShape {
    MlaShape {
        heads,
        nope: KV_LORA,
        rope: ROPE,
        v: KV_LORA,
        kv_lora: KV_LORA,
        scale: cfg.softmax_scale(),
        latent_norm_eps: cfg.rms_norm_eps,
    }
}

/// W_UK = W_UV = identity for every head: kv_b rows h*(nope+v) .. as the CPU reads them.
fn identity_absorbed(heads: usize, kv_lora: usize) -> Absorbed {
    let per_head = 2 * kv_lora * kv_lora;
    let mut kv_b = vec![0f32; heads * per_head];
    for h in 0..heads {
        for half in 0..2 {
            for i in 0..kv_lora {
                kv_b[h * per_head + half * kv_lora * kv_lora + i * kv_lora + i] = 1.0;
            }
        }
    }
    Absorbed { kv_b }
}

/// Distance in bf16 ulps (through zero counts the steps on both sides).
fn bf16_ulps(a: bf16, b: bf16) -> i32 {
    let ord = |v: bf16| {
        let bits = i32::from(v.to_bits());
        if bits & 0x8000 != 0 {
            -(bits & 0x7FFF)
        } else {
            bits
        }
    };
    (ord(a) - ord(b)).abs()
}

/// bf16 NaN: what the GPU cache holds where nothing valid was written.
const GARBAGE: u16 = 0x7FC1;

/// One attention problem: a layout, its cache on both sides, queries on both sides.
struct Problem {
    layout: MlaLayout,
    heads: usize,
    num_pages: usize,
    /// CPU cache (f32 of the bf16 values; zero where unused).
    cache_cpu: LayerCache,
    /// GPU cache (NaN where unused, so a kernel reading past a sequence shows).
    cache_gpu: Vec<bf16>,
    /// CPU queries [total_q][heads][576] = q_lat | raw q_pe.
    q_cpu: Vec<f32>,
    /// GPU queries: q_lat | q_pe roped by the CPU's Rope and rounded to bf16.
    q_gpu: Vec<bf16>,
    /// max |cache value| (the tolerance's scale).
    max_v: f32,
}

/// Random pages for `kv_lens` (+ a few unused ones), random cache entries, random queries
/// whose magnitude varies per sequence (flat to peaked attention).
fn problem(
    rng: &mut Rng,
    cfg: &ModelConfig,
    heads: usize,
    kv_lens: &[usize],
    q_lens: &[usize],
) -> Problem {
    let rope = Rope::new(cfg);
    let need: usize = kv_lens.iter().map(|l| l.div_ceil(PAGE_TOKENS)).sum();
    let num_pages = need + 3;
    let mut ids: Vec<BlockId> = (0..num_pages as BlockId).collect();
    rng.shuffle(&mut ids);
    let mut next = ids.into_iter();
    let tables: Vec<Vec<BlockId>> = kv_lens
        .iter()
        .map(|l| {
            (0..l.div_ceil(PAGE_TOKENS))
                .map(|_| next.next().unwrap())
                .collect()
        })
        .collect();
    let layout = MlaLayout {
        tables,
        kv_lens: kv_lens.to_vec(),
        q_lens: q_lens.to_vec(),
    };
    layout.check().unwrap();

    let mut cache_cpu = vec![0f32; num_pages * PAGE_TOKENS * WIDTH];
    let mut cache_gpu = vec![bf16::from_bits(GARBAGE); num_pages * PAGE_TOKENS * WIDTH];
    let mut max_v = 0f32;
    for (b, &kv) in kv_lens.iter().enumerate() {
        let sigma = [0.5f32, 1.0, 2.0][rng.below(3)];
        for pos in 0..kv {
            let page = layout.tables[b][pos / PAGE_TOKENS] as usize;
            let at = (page * PAGE_TOKENS + pos % PAGE_TOKENS) * WIDTH;
            for c in 0..WIDTH {
                let v = round_bf16(rng.normal() * sigma);
                cache_cpu[at + c] = v;
                cache_gpu[at + c] = bf16::from_f32(v);
                max_v = max_v.max(v.abs());
            }
        }
    }

    let mut q_cpu = Vec::new();
    let mut q_gpu = Vec::new();
    for (&kv, &ql) in kv_lens.iter().zip(q_lens) {
        let amp = [0.03f32, 0.3, 1.0][rng.below(3)];
        for i in 0..ql {
            let pos = kv - ql + i;
            for _ in 0..heads {
                let row: Vec<f32> = (0..WIDTH).map(|_| round_bf16(rng.normal() * amp)).collect();
                let mut pe = row[KV_LORA..].to_vec();
                rope.apply(&mut pe, pos);
                q_cpu.extend_from_slice(&row);
                q_gpu.extend(row[..KV_LORA].iter().map(|&v| bf16::from_f32(v)));
                q_gpu.extend(pe.iter().map(|&v| bf16::from_f32(v)));
            }
        }
    }
    Problem {
        layout,
        heads,
        num_pages,
        cache_cpu: LayerCache { data: cache_cpu },
        cache_gpu,
        q_cpu,
        q_gpu,
        max_v,
    }
}

fn cpu_batch(layout: &MlaLayout) -> Batch {
    Batch {
        tokens: vec![0; layout.total_q()],
        segments: (0..layout.batch())
            .map(|b| Segment {
                blocks: layout.tables[b].clone(),
                start_pos: layout.kv_lens[b] - layout.q_lens[b],
                len: layout.q_lens[b],
                logit_rows: 1,
            })
            .collect(),
        page_copies: Vec::new(),
    }
}

/// The CPU reference (W8a8, identity absorption): [total_q][heads][512], bf16 values.
fn cpu_reference(cfg: &ModelConfig, p: &Problem, absorbed: &Absorbed) -> Vec<f32> {
    let shape = latent_shape(cfg, p.heads);
    cpu_attn::attention(
        &p.cache_cpu,
        &shape,
        &Rope::new(cfg),
        absorbed,
        &cpu_batch(&p.layout),
        &p.q_cpu,
        Precision::W8a8,
    )
}

/// f64 lse (natural log) and output of every (token, head) row from the GPU's inputs.
fn f64_reference(cfg: &ModelConfig, p: &Problem) -> (Vec<f64>, Vec<f64>) {
    let scale = f64::from(cfg.softmax_scale());
    // (sequence, index in the sequence's new tokens) of every query token, in order.
    let tokens: Vec<(usize, usize)> = (0..p.layout.batch())
        .flat_map(|b| (0..p.layout.q_lens[b]).map(move |i| (b, i)))
        .collect();
    let rows: Vec<(f64, Vec<f64>)> = (0..tokens.len() * p.heads)
        .into_par_iter()
        .map(|task| {
            let (t, h) = (task / p.heads, task % p.heads);
            let (b, i) = tokens[t];
            let (kv, ql) = (p.layout.kv_lens[b], p.layout.q_lens[b]);
            let q = &p.q_gpu[(t * p.heads + h) * WIDTH..][..WIDTH];
            let keys = kv - ql + i + 1;
            let entry = |j: usize| {
                let page = p.layout.tables[b][j / PAGE_TOKENS] as usize;
                &p.cache_cpu.data[(page * PAGE_TOKENS + j % PAGE_TOKENS) * WIDTH..][..WIDTH]
            };
            let s: Vec<f64> = (0..keys)
                .map(|j| {
                    let e = entry(j);
                    scale
                        * q.iter()
                            .zip(e)
                            .map(|(a, &k)| f64::from(a.to_f32()) * f64::from(k))
                            .sum::<f64>()
                })
                .collect();
            let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = s.iter().map(|v| (v - m).exp()).sum();
            let mut o = vec![0f64; KV_LORA];
            for (j, v) in s.iter().enumerate() {
                let w = (v - m).exp() / z;
                for (oc, &c) in o.iter_mut().zip(&entry(j)[..KV_LORA]) {
                    *oc += w * f64::from(c);
                }
            }
            (m + z.ln(), o)
        })
        .collect();
    let lse = rows.iter().map(|r| r.0).collect();
    let out = rows.into_iter().flat_map(|r| r.1).collect();
    (lse, out)
}

/// The attention tolerance of the module docs, per (sequence, token) block of rows.
fn check_attention(
    what: &str,
    p: &Problem,
    got: &[bf16],
    got_lse: &[f32],
    want: &[f32],
    want_lse: &[f64],
) -> Result<(), String> {
    let row_len = p.heads * KV_LORA;
    let abs_tol = p.max_v / 256.0;
    let mut t = 0;
    for b in 0..p.layout.batch() {
        for i in 0..p.layout.q_lens[b] {
            let g = &got[t * row_len..][..row_len];
            let w = &want[t * row_len..][..row_len];
            let (mut e2, mut r2) = (0f64, 0f64);
            for (k, (gv, &wv)) in g.iter().zip(w).enumerate() {
                let gv = gv.to_f32();
                if !gv.is_finite() {
                    return Err(format!(
                        "{what}: seq {b} token {i} value {k} = {gv} (ref {wv})"
                    ));
                }
                let d = (gv - wv).abs();
                if d > wv.abs() / 128.0 + abs_tol {
                    return Err(format!(
                        "{what}: seq {b} (kv {}, q {}) token {i} head {} col {}: gpu {gv}, ref {wv} \
                         (tolerance 2^-7|ref| + {abs_tol})",
                        p.layout.kv_lens[b],
                        p.layout.q_lens[b],
                        k / KV_LORA,
                        k % KV_LORA
                    ));
                }
                e2 += f64::from(d) * f64::from(d);
                r2 += f64::from(wv) * f64::from(wv);
            }
            if e2.sqrt() > r2.sqrt() / 128.0 {
                return Err(format!(
                    "{what}: seq {b} (kv {}, q {}) token {i}: rms error {:.3e} > 2^-7 x rms ref {:.3e}",
                    p.layout.kv_lens[b],
                    p.layout.q_lens[b],
                    (e2 / row_len as f64).sqrt(),
                    (r2 / row_len as f64).sqrt()
                ));
            }
            for h in 0..p.heads {
                let (gl, wl) = (
                    f64::from(got_lse[t * p.heads + h]),
                    want_lse[t * p.heads + h],
                );
                let close = (gl - wl).abs() <= 1e-4 + 1e-6 * wl.abs();
                if !close {
                    return Err(format!(
                        "{what}: seq {b} (kv {}, q {}) token {i} head {h}: lse gpu {gl}, ref {wl}",
                        p.layout.kv_lens[b], p.layout.q_lens[b]
                    ));
                }
            }
            t += 1;
        }
    }
    Ok(())
}

/// Runs attention on the GPU: (out [total_q][heads][512], lse [total_q][heads]).
fn run_gpu(
    mla: &Mla,
    cfg: &ModelConfig,
    p: &Problem,
    run: MlaRun,
) -> Result<(Vec<bf16>, Vec<f32>), String> {
    let dev = mla.device();
    let e = |e: CudaError| e.to_string();
    let batch = p.layout.upload(dev).map_err(e)?;
    let mut cache = MlaCache::new(dev, p.num_pages, KV_LORA, ROPE).map_err(e)?;
    dev.copy_to_device(&p.cache_gpu, &mut cache.data)
        .map_err(e)?;
    let q = dev.upload(&p.q_gpu).map_err(e)?;
    let got = mla_attention_on_gpu(mla, &q, p.heads, cfg.softmax_scale(), &cache, &batch, run)
        .map_err(e)?;
    // The device scheduler must produce exactly the host mirror's schedule.
    if let Some(ws) = &got.workspace {
        let seqlens: Vec<i32> = p.layout.kv_lens.iter().map(|&v| v as i32).collect();
        let want = mla_schedule_host(
            &seqlens,
            batch.bt_stride,
            ws.parts,
            MLA_SCHED_FIXED_OVERHEAD,
        );
        let schedule = ws.download_schedule(dev, batch.batch).map_err(e)?;
        if schedule != want {
            return Err(format!(
                "device schedule {schedule:?} != host mirror {want:?}"
            ));
        }
    }
    Ok((got.out, got.lse))
}

// ------------------------------------------------------------------------------------------
// Host-only: the harness
// ------------------------------------------------------------------------------------------

/// The harness itself: the CPU reference with identity absorption equals an f64 latent
/// attention over the same bf16 data (within the CPU's own bf16 roundings).
#[test]
fn cpu_identity_absorption_is_latent_attention() {
    let cfg = deepseek_r1_config();
    let mut rng = Rng::new(7);
    let heads = 2;
    let p = problem(&mut rng, &cfg, heads, &[1, 65, 130, 64], &[1, 2, 7, 2]);
    let want = cpu_reference(&cfg, &p, &identity_absorbed(heads, KV_LORA));
    let (_, f64_out) = f64_reference(&cfg, &p);
    assert_eq!(want.len(), f64_out.len());
    for (k, (&c, &f)) in want.iter().zip(&f64_out).enumerate() {
        assert_eq!(c, round_bf16(c), "cpu output is bf16");
        let d = (f64::from(c) - f).abs();
        assert!(
            d <= f.abs() / 128.0 + 1e-6,
            "row {} col {}: cpu {c}, f64 {f}",
            k / KV_LORA,
            k % KV_LORA
        );
    }
}

#[test]
fn device_open_skips_or_loads() {
    // On a GPU machine this loads the kernels; elsewhere it prints the skip line.
    if let Some(mla) = gpu("device_open_skips_or_loads") {
        assert!(mla.device().info().compute_capability == (9, 0));
    }
}

// ------------------------------------------------------------------------------------------
// GPU: cache write and q RoPE
// ------------------------------------------------------------------------------------------

#[test]
fn cache_write_matches_cpu() {
    let Some(mla) = gpu("cache_write_matches_cpu") else {
        return;
    };
    let dev = mla.device();
    let cfg = deepseek_r1_config();
    let mut rng = Rng::new(11);
    // Sequences at short, page-straddling and very long positions (YaRN's full range).
    let specs = [
        (0usize, 5usize),
        (60, 9),
        (4090, 12),
        (163837, 3),
        (131072, 1),
    ];
    let mut next_page = 1u32; // page 0: the dummy every unused table entry points at
    let mut tables = Vec::new();
    for &(start, len) in &specs {
        let kv = start + len;
        let pages = kv.div_ceil(PAGE_TOKENS);
        let mut t = vec![0u32; pages];
        for e in t.iter_mut().skip(start / PAGE_TOKENS) {
            *e = next_page;
            next_page += 1;
        }
        tables.push(t);
    }
    let num_pages = next_page as usize;
    let layout = MlaLayout {
        tables,
        kv_lens: specs.iter().map(|s| s.0 + s.1).collect(),
        q_lens: specs.iter().map(|s| s.1).collect(),
    };
    let tokens = layout.total_q();
    let ld_kv = WIDTH + 8;
    let kv: Vec<f32> = (0..tokens * ld_kv)
        .map(|_| round_bf16(rng.normal() * 3.0))
        .collect();
    let norm: Vec<f32> = (0..KV_LORA).map(|_| round_bf16(0.5 + rng.unit())).collect();

    // CPU: cache_write over an f32 LayerCache.
    let shape = latent_shape(&cfg, 1);
    let mut cpu = LayerCache {
        data: vec![0f32; num_pages * PAGE_TOKENS * WIDTH],
    };
    let kv_dense: Vec<f32> = kv.chunks(ld_kv).flat_map(|r| r[..WIDTH].to_vec()).collect();
    cpu_attn::cache_write(
        &mut cpu,
        &shape,
        &Rope::new(&cfg),
        &cpu_batch(&layout),
        &kv_dense,
        &norm,
        Precision::W8a8,
    );

    // GPU.
    let batch = layout.upload(dev).unwrap();
    let mut cache = MlaCache::new(dev, num_pages, KV_LORA, ROPE).unwrap();
    dev.memset(&mut cache.data, 0xFF).unwrap();
    let kv_d = dev.upload(&to_bf16(&kv)).unwrap();
    let norm_d = dev.upload(&to_bf16(&norm)).unwrap();
    let rope = upload_rope(dev, &cfg).unwrap();
    mla.cache_write(MlaCacheWriteArgs {
        kv: &kv_d,
        ld_kv,
        norm_w: &norm_d,
        eps: cfg.rms_norm_eps,
        rope: &rope,
        batch: &batch,
        cache: &mut cache,
    })
    .unwrap();
    let got = dev.download(&cache.data).unwrap();

    let mut written = vec![false; num_pages * PAGE_TOKENS];
    let (mut exact, mut total) = (0usize, 0usize);
    for (b, pos) in layout.token_positions() {
        let page = layout.tables[b][pos / PAGE_TOKENS] as usize;
        let slot = page * PAGE_TOKENS + pos % PAGE_TOKENS;
        written[slot] = true;
        for c in 0..WIDTH {
            let (g, w) = (
                got[slot * WIDTH + c],
                bf16::from_f32(cpu.data[slot * WIDTH + c]),
            );
            let ulps = bf16_ulps(g, w);
            assert!(ulps <= 1, "seq {b} pos {pos} col {c}: gpu {g}, cpu {w}");
            exact += usize::from(ulps == 0);
            total += 1;
        }
    }
    assert!(
        exact * 100 >= total * 99,
        "only {exact} of {total} values bit-identical"
    );
    for (slot, w) in written.iter().enumerate() {
        if !w {
            assert!(
                got[slot * WIDTH..(slot + 1) * WIDTH]
                    .iter()
                    .all(|v| v.to_bits() == 0xFFFF),
                "slot {slot} was written but belongs to no token"
            );
        }
    }
    say(&format!(
        "cache_write: {exact} of {total} values bit-identical to the CPU"
    ));
}

#[test]
fn q_rope_matches_cpu() {
    let Some(mla) = gpu("q_rope_matches_cpu") else {
        return;
    };
    let dev = mla.device();
    let cfg = deepseek_r1_config();
    let rope_cpu = Rope::new(&cfg);
    let mut rng = Rng::new(12);
    let heads = 16;
    let layout = MlaLayout {
        tables: vec![vec![0; 2], vec![0; 2560]],
        kv_lens: vec![70, 163840],
        q_lens: vec![5, 2],
    };
    let tokens = layout.total_q();
    let qb_w = 128 + ROPE; // q_b_proj output per head: nope | rope
    let qb: Vec<f32> = (0..tokens * heads * qb_w)
        .map(|_| round_bf16(rng.normal()))
        .collect();
    let batch = layout.upload(dev).unwrap();
    let rope = upload_rope(dev, &cfg).unwrap();
    let qb_d = dev.upload(&to_bf16(&qb)).unwrap();
    let mut q = dev.alloc::<bf16>(tokens * heads * WIDTH).unwrap();
    dev.memset(&mut q, 0xFF).unwrap();
    mla.q_rope(MlaQRopeArgs {
        src: Some((&qb_d, 128, heads * qb_w, qb_w)),
        q: &mut q,
        heads,
        kv_lora: KV_LORA,
        rope: &rope,
        batch: &batch,
    })
    .unwrap();
    let got = dev.download(&q).unwrap();
    let (mut exact, mut total) = (0usize, 0usize);
    for (t, (_, pos)) in layout.token_positions().into_iter().enumerate() {
        for h in 0..heads {
            let mut pe = qb[(t * heads + h) * qb_w + 128..][..ROPE].to_vec();
            rope_cpu.apply(&mut pe, pos);
            let row = &got[(t * heads + h) * WIDTH..][..WIDTH];
            assert!(
                row[..KV_LORA].iter().all(|v| v.to_bits() == 0xFFFF),
                "latent columns touched"
            );
            for (c, (&g, &w)) in row[KV_LORA..].iter().zip(&pe).enumerate() {
                let w = bf16::from_f32(w);
                let ulps = bf16_ulps(g, w);
                assert!(
                    ulps <= 1,
                    "token {t} (pos {pos}) head {h} col {c}: gpu {g}, cpu {w}"
                );
                exact += usize::from(ulps == 0);
                total += 1;
            }
        }
    }
    assert!(
        exact * 100 >= total * 99,
        "only {exact} of {total} values bit-identical"
    );
    // In place: roping the (already placed) values again rotates them a second time.
    let mut again = dev.upload(&got).unwrap();
    mla.q_rope(MlaQRopeArgs {
        src: None,
        q: &mut again,
        heads,
        kv_lora: KV_LORA,
        rope: &rope,
        batch: &batch,
    })
    .unwrap();
    let twice = dev.download(&again).unwrap();
    let (_, pos0) = layout.token_positions()[0];
    let mut pe: Vec<f32> = got[KV_LORA..WIDTH].iter().map(|v| v.to_f32()).collect();
    rope_cpu.apply(&mut pe, pos0);
    for (c, (&g, &w)) in twice[KV_LORA..WIDTH].iter().zip(&pe).enumerate() {
        assert!(bf16_ulps(g, bf16::from_f32(w)) <= 1, "in place col {c}");
    }
}

// ------------------------------------------------------------------------------------------
// GPU: absorption against the checkpoint layout
// ------------------------------------------------------------------------------------------

/// small_mla_absorb_q and small_mla_absorb_o over [`absorbed_kv_b`] of a random kv_b_proj at
/// `shape` = (heads, nope, rope, v, kv_lora), against the products read from kv_b_proj's own
/// rows (W_UK\[h\]\[i\]\[l\] = row h*(nope+v) + i, W_UV\[h\]\[d\]\[l\] = row
/// h*(nope+v) + nope + d, as the CPU backend reads them), each value rounded to bf16 first.
/// q_lat bit for bit (the kernel's f32 fma chain over i ascending, one rounding); out within
/// 2^-8 |ref| + 2^-16 sum_l |o_l w_l| (f32 warp sums against f64, then bf16).
fn check_absorb(dev: &Device, shape: (usize, usize, usize, usize, usize), tokens: usize) {
    let (heads, nope, rope, v, kv_lora) = shape;
    let what = format!("absorption {shape:?} tokens {tokens}");
    let ops = SmallOps::new(dev);
    let mut rng = Rng::new((heads * 31 + nope * 7 + kv_lora) as u64);
    let kv_b_proj: Vec<f32> = (0..heads * (nope + v) * kv_lora)
        .map(|_| round_bf16(rng.normal() * 0.05))
        .collect();
    let qk = nope + rope;
    let q: Vec<f32> = (0..tokens * heads * qk)
        .map(|_| round_bf16(rng.normal()))
        .collect();
    let o_lat: Vec<f32> = (0..tokens * heads * kv_lora)
        .map(|_| round_bf16(rng.normal()))
        .collect();
    let kv_b = dev
        .upload(&absorbed_kv_b(&kv_b_proj, heads, nope, v, kv_lora))
        .unwrap();
    let (q_d, o_lat_d) = (
        dev.upload(&to_bf16(&q)).unwrap(),
        dev.upload(&to_bf16(&o_lat)).unwrap(),
    );
    let width = kv_lora + rope;
    let mut q_lat = dev.alloc::<bf16>(tokens * heads * width).unwrap();
    let mut out = dev.alloc::<bf16>(tokens * heads * v).unwrap();
    dev.memset(&mut q_lat, 0xFF).unwrap();
    dev.memset(&mut out, 0xFF).unwrap();
    let desc = |src: &DeviceBuffer<bf16>, dst: &DeviceBuffer<bf16>| MlaAbsorbDesc {
        tokens,
        heads,
        nope,
        rope,
        v,
        kv_lora,
        src: Region::from(src),
        kv_b: Region::from(&kv_b),
        dst: Region::from(dst),
    };
    ops.prepare_mla_absorb(desc(&q_d, &q_lat), true)
        .unwrap()
        .launch()
        .unwrap();
    ops.prepare_mla_absorb(desc(&o_lat_d, &out), false)
        .unwrap()
        .launch()
        .unwrap();
    let (q_lat, out) = (dev.download(&q_lat).unwrap(), dev.download(&out).unwrap());
    let row = |h: usize, r: usize| &kv_b_proj[(h * (nope + v) + r) * kv_lora..][..kv_lora];
    for t in 0..tokens {
        for h in 0..heads {
            let th = t * heads + h;
            let qh = &q[th * qk..][..nope];
            let got = &q_lat[th * width..][..width];
            for (l, g) in got[..kv_lora].iter().enumerate() {
                let acc = (0..nope).fold(0f32, |acc, i| qh[i].mul_add(row(h, i)[l], acc));
                let want = bf16::from_f32(acc);
                assert_eq!(
                    g.to_bits(),
                    want.to_bits(),
                    "{what}: q_lat token {t} head {h} column {l}: gpu {g}, want {want}"
                );
            }
            assert!(
                got[kv_lora..].iter().all(|x| x.to_bits() == 0xFFFF),
                "{what}: q_pe columns touched"
            );
            let oh = &o_lat[th * kv_lora..][..kv_lora];
            for d in 0..v {
                let w_uv = row(h, nope + d);
                let want: f64 = oh.iter().zip(w_uv).map(|(&o, &w)| f64::from(o * w)).sum();
                let mass: f64 = oh
                    .iter()
                    .zip(w_uv)
                    .map(|(&o, &w)| f64::from((o * w).abs()))
                    .sum();
                let g = f64::from(out[th * v + d].to_f32());
                assert!(
                    (g - want).abs() <= want.abs() / 256.0 + mass / 65536.0,
                    "{what}: out token {t} head {h} column {d}: gpu {g}, want {want}"
                );
            }
        }
    }
}

#[test]
fn absorption_matches_checkpoint_layout() {
    let Some(mla) = gpu("absorption_matches_checkpoint_layout") else {
        return;
    };
    let dev = mla.device();
    check_absorb(dev, (128, 128, 64, 128, 512), 2);
    check_absorb(dev, (3, 5, 4, 7, 9), 3);
    check_absorb(dev, (2, 40, 2, 8, 300), 1);
}

// ------------------------------------------------------------------------------------------
// GPU: decode
// ------------------------------------------------------------------------------------------

/// Sequence lengths of a decode batch: the edge lengths (page boundaries) plus random ones.
fn decode_lengths(rng: &mut Rng, s_q: usize) -> Vec<usize> {
    let mut v = vec![63, 64, 65, 4097, 1 + rng.below(300), 1 + rng.below(2000)];
    if s_q == 1 {
        v.push(1);
    } else {
        v.push(2);
        v.push(129); // 64k + 1: the last block holds only the newest token
    }
    v.into_iter().map(|l| l.max(s_q)).collect()
}

#[test]
fn decode_matches_cpu_all_head_counts() {
    let Some(mla) = gpu("decode_matches_cpu_all_head_counts") else {
        return;
    };
    let cfg = deepseek_r1_config();
    let mut rng = Rng::new(21);
    for heads in [128, 64, 32, 16] {
        let absorbed = identity_absorbed(heads, KV_LORA);
        for s_q in [1, 2] {
            let kv = decode_lengths(&mut rng, s_q);
            let q = vec![s_q; kv.len()];
            let p = problem(&mut rng, &cfg, heads, &kv, &q);
            let want = cpu_reference(&cfg, &p, &absorbed);
            let (want_lse, _) = f64_reference(&cfg, &p);
            for run in [
                MlaRun::Reference,
                MlaRun::Fast,
                MlaRun::FastParts(1),
                MlaRun::FastParts(300),
            ] {
                let what = format!("heads {heads} s_q {s_q} {run:?}");
                let (got, lse) =
                    run_gpu(mla, &cfg, &p, run).unwrap_or_else(|e| panic!("{what}: {e}"));
                check_attention(&what, &p, &got, &lse, &want, &want_lse).unwrap();
            }
            say(&format!(
                "decode: heads {heads} s_q {s_q} lengths {kv:?}: reference and wgmma match the CPU"
            ));
        }
    }
}

#[test]
fn decode_random_batches() {
    let Some(mla) = gpu("decode_random_batches") else {
        return;
    };
    let cfg = deepseek_r1_config();
    let mut rng = Rng::new(22);
    for case in 0..6 {
        let heads = [16, 32, 64, 128][case % 4];
        let s_q = 1 + case % 2;
        let n = 1 + rng.below(12);
        let kv: Vec<usize> = (0..n).map(|_| (1 + rng.below(1500)).max(s_q)).collect();
        let p = problem(&mut rng, &cfg, heads, &kv, &vec![s_q; n]);
        let want = cpu_reference(&cfg, &p, &identity_absorbed(heads, KV_LORA));
        let (want_lse, _) = f64_reference(&cfg, &p);
        for run in [MlaRun::Reference, MlaRun::Fast] {
            let what = format!("case {case}: heads {heads} s_q {s_q} {run:?} lengths {kv:?}");
            let (got, lse) = run_gpu(mla, &cfg, &p, run).unwrap_or_else(|e| panic!("{what}: {e}"));
            check_attention(&what, &p, &got, &lse, &want, &want_lse).unwrap();
        }
    }
}

// ------------------------------------------------------------------------------------------
// GPU: prefill
// ------------------------------------------------------------------------------------------

#[test]
fn prefill_chunks_match_cpu() {
    let Some(mla) = gpu("prefill_chunks_match_cpu") else {
        return;
    };
    let cfg = deepseek_r1_config();
    let mut rng = Rng::new(31);
    for (case, heads) in [16usize, 16, 128, 32].into_iter().enumerate() {
        // (chunk, prefix) per sequence: from scratch, over a prefix, page-aligned or not.
        let n = 1 + rng.below(3);
        let mut q = Vec::new();
        let mut kv = Vec::new();
        for _ in 0..n {
            let chunk = 1 + rng.below(if heads == 128 { 40 } else { 200 });
            let prefix = [0, 64, rng.below(600)][rng.below(3)];
            q.push(chunk);
            kv.push(prefix + chunk);
        }
        let p = problem(&mut rng, &cfg, heads, &kv, &q);
        let want = cpu_reference(&cfg, &p, &identity_absorbed(heads, KV_LORA));
        let (want_lse, _) = f64_reference(&cfg, &p);
        for run in [MlaRun::Reference, MlaRun::Fast, MlaRun::FastParts(7)] {
            let what = format!("case {case}: heads {heads} {run:?} q {q:?} kv {kv:?}");
            let (got, lse) = run_gpu(mla, &cfg, &p, run).unwrap_or_else(|e| panic!("{what}: {e}"));
            check_attention(&what, &p, &got, &lse, &want, &want_lse).unwrap();
        }
    }
}

/// One sequence of `n` tokens, its cache written by the GPU step by step: a single prefill
/// of all n tokens, and chunked prefill + decode steps, give the same rows.
#[test]
fn prefill_then_decode_equals_single_prefill() {
    let Some(mla) = gpu("prefill_then_decode_equals_single_prefill") else {
        return;
    };
    let dev = mla.device();
    let cfg = deepseek_r1_config();
    let mut rng = Rng::new(41);
    let heads = 16;
    let n = 230;
    let table: Vec<BlockId> = vec![5, 2, 7, 0];
    let num_pages = 8;
    let kv_in: Vec<f32> = (0..n * WIDTH).map(|_| round_bf16(rng.normal())).collect();
    let norm: Vec<f32> = (0..KV_LORA).map(|_| round_bf16(0.5 + rng.unit())).collect();
    let q_all: Vec<f32> = (0..n * heads * WIDTH)
        .map(|_| round_bf16(rng.normal() * 0.3))
        .collect();
    let rope = upload_rope(dev, &cfg).unwrap();
    let norm_d = dev.upload(&to_bf16(&norm)).unwrap();

    // Steps as (new tokens) lists: [all n] vs [130, 60, 1 x 20, 2 x 10].
    let single = vec![n];
    let mut chunked = vec![130, 60];
    chunked.extend(std::iter::repeat_n(1, 20));
    chunked.extend(std::iter::repeat_n(2, 10));
    assert_eq!(chunked.iter().sum::<usize>(), n);

    for kernel in [MlaKernel::Reference, MlaKernel::Wgmma] {
        let mut results = Vec::new();
        for steps in [&single, &chunked] {
            let mut cache = MlaCache::new(dev, num_pages, KV_LORA, ROPE).unwrap();
            dev.memset(&mut cache.data, 0xFF).unwrap();
            let mut out_rows = Vec::new();
            let mut lse_rows = Vec::new();
            let mut done = 0;
            for &len in steps {
                let layout = MlaLayout {
                    tables: vec![table.clone()],
                    kv_lens: vec![done + len],
                    q_lens: vec![len],
                };
                let batch = layout.upload(dev).unwrap();
                let kv_d = dev
                    .upload(&to_bf16(&kv_in[done * WIDTH..(done + len) * WIDTH]))
                    .unwrap();
                mla.cache_write(MlaCacheWriteArgs {
                    kv: &kv_d,
                    ld_kv: WIDTH,
                    norm_w: &norm_d,
                    eps: cfg.rms_norm_eps,
                    rope: &rope,
                    batch: &batch,
                    cache: &mut cache,
                })
                .unwrap();
                // q_pe roped on the GPU in place.
                let mut q = dev
                    .upload(&to_bf16(
                        &q_all[done * heads * WIDTH..(done + len) * heads * WIDTH],
                    ))
                    .unwrap();
                mla.q_rope(MlaQRopeArgs {
                    src: None,
                    q: &mut q,
                    heads,
                    kv_lora: KV_LORA,
                    rope: &rope,
                    batch: &batch,
                })
                .unwrap();
                let rows = len * heads;
                let mut out = dev.alloc::<bf16>(rows * KV_LORA).unwrap();
                let mut lse = dev.alloc::<f32>(rows).unwrap();
                let mut ws = MlaWorkspace::new(dev, 1, heads, len).unwrap();
                mla.attention(
                    MlaAttnArgs {
                        q: &q,
                        heads,
                        scale: cfg.softmax_scale(),
                        cache: &cache,
                        batch: &batch,
                        out: &mut out,
                        lse: &mut lse,
                        workspace: Some(&mut ws),
                        schedule: true,
                    },
                    kernel,
                )
                .unwrap();
                out_rows.extend(dev.download(&out).unwrap());
                lse_rows.extend(dev.download(&lse).unwrap());
                done += len;
            }
            results.push((out_rows, lse_rows));
        }
        let ((a, la), (b, lb)) = (&results[0], &results[1]);
        if kernel == MlaKernel::Reference {
            assert!(
                a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()),
                "reference: chunked != single"
            );
            assert!(
                la.iter().zip(lb).all(|(x, y)| x.to_bits() == y.to_bits()),
                "reference lse: chunked != single"
            );
        } else {
            let max_v = a
                .iter()
                .fold(0f32, |m, v| m.max(v.to_f32().abs()))
                .max(1e-3);
            for (k, (x, y)) in a.iter().zip(b).enumerate() {
                let (x, y) = (x.to_f32(), y.to_f32());
                assert!(
                    (x - y).abs() <= x.abs() / 128.0 + max_v / 256.0,
                    "wgmma: row {} col {}: single {x}, chunked {y}",
                    k / KV_LORA,
                    k % KV_LORA
                );
            }
            for (k, (x, y)) in la.iter().zip(lb).enumerate() {
                assert!(
                    (x - y).abs() <= 1e-4 + 1e-6 * x.abs(),
                    "wgmma lse row {k}: {x} vs {y}"
                );
            }
        }
    }
}

/// The short case tools/gpu-suite runs under compute-sanitizer: every MLA kernel, splits,
/// partial pages, s_q = 2 causal.
#[test]
fn sanitizer_smoke() {
    let Some(mla) = gpu("sanitizer_smoke") else {
        return;
    };
    let cfg = deepseek_r1_config();
    let mut rng = Rng::new(51);
    let heads = 16;
    let p = problem(&mut rng, &cfg, heads, &[2, 65, 129, 300], &[2; 4]);
    let want = cpu_reference(&cfg, &p, &identity_absorbed(heads, KV_LORA));
    let (want_lse, _) = f64_reference(&cfg, &p);
    for run in [
        MlaRun::Reference,
        MlaRun::FastParts(1),
        MlaRun::FastParts(40),
    ] {
        let (got, lse) = run_gpu(mla, &cfg, &p, run).unwrap();
        check_attention(&format!("{run:?}"), &p, &got, &lse, &want, &want_lse).unwrap();
    }
    // Cache write + q RoPE on the same layout.
    let dev = mla.device();
    let batch = p.layout.upload(dev).unwrap();
    let mut cache = MlaCache::new(dev, p.num_pages, KV_LORA, ROPE).unwrap();
    let kv = dev
        .upload(&to_bf16(&vec![0.5f32; p.layout.total_q() * WIDTH]))
        .unwrap();
    let norm = dev.upload(&to_bf16(&[1.0f32; KV_LORA])).unwrap();
    let rope = upload_rope(dev, &cfg).unwrap();
    mla.cache_write(MlaCacheWriteArgs {
        kv: &kv,
        ld_kv: WIDTH,
        norm_w: &norm,
        eps: cfg.rms_norm_eps,
        rope: &rope,
        batch: &batch,
        cache: &mut cache,
    })
    .unwrap();
    let mut q = dev.upload(&p.q_gpu).unwrap();
    mla.q_rope(MlaQRopeArgs {
        src: None,
        q: &mut q,
        heads,
        kv_lora: KV_LORA,
        rope: &rope,
        batch: &batch,
    })
    .unwrap();
    dev.synchronize().unwrap();
}
