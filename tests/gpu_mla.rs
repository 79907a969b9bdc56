//! MLA kernels (cuda/mla.cu) against the CPU reference (`r1_runtime::cpu::attention`).
//!
//! Without a usable device every GPU test prints `skipped: no CUDA device (<reason>) [<test>]`
//! to stderr (past libtest's capture) and returns; `R1_REQUIRE_GPU=1` (tools/gpu-suite) makes
//! that a failure (the shared harness: tests/gpu_support). Host-only tests (scheduler
//! coverage, host checks, the reference harness itself) run everywhere.
//!
//! The CPU reference computes absorbed attention from (q_nope, q_pe) through kv_b_proj; the
//! tests make it compute the bare latent attention the kernels do by choosing qk_nope = v =
//! kv_lora and W_UK = W_UV = identity for every head (then q_lat = q_nope and out = o_lat,
//! exactly), in W8a8 precision (bf16 cache, bf16 q_lat / q_pe / o_lat, f32 softmax). The
//! GPU gets q_pe already roped by the CPU's own `Rope` and rounded to bf16, so both sides
//! score the same bf16 numbers.
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
use proptest::prelude::*;
use rayon::prelude::*;

use r1_runtime::config::ModelConfig;
use r1_runtime::cpu::attention::{self as cpu_attn, Absorbed, LayerCache, MlaShape, Rope};
use r1_runtime::cuda::{
    mla_plan_parts, mla_schedule_host, prefill_form_by_cost, CudaError, Mla, MlaAttnArgs,
    MlaAttnDesc, MlaCache, MlaCacheWriteArgs, MlaCacheWriteDesc, MlaKernel, MlaLayout,
    MlaQRopeArgs, MlaQRopeDesc, MlaRope, MlaWorkspace, MlaWorkspaceDesc, PrefillForm, Region,
    MLA_SCHED_FIXED_OVERHEAD,
};
use r1_runtime::kv_cache::{Batch, BlockId, Segment, PAGE_TOKENS};
use r1_runtime::numerics::round_bf16;
use r1_runtime::Precision;

use gpu_support::{deepseek_r1_config, err_of, mla_attention_on_gpu, say, to_bf16, MlaRun, Rng};

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
// Host-only: scheduler coverage, checks, the harness
// ------------------------------------------------------------------------------------------

/// What a CTA (head block hb, part) of mla_decode_wgmma does for sequence b, as the kernel's
/// make_seg computes it: None (inactive) or (first block, tiles, slot or None for direct).
#[allow(clippy::too_many_arguments)]
fn model_segment(
    rec: &[i32; 8],
    splits: &[i32],
    nblk: usize,
    b: usize,
    hb: usize,
    heads: usize,
    q_len: usize,
    kv_len: usize,
) -> Option<(usize, usize, Option<usize>)> {
    let (begin_b, end_b) = (rec[0] as i64, rec[2] as i64);
    let bi = b as i64;
    if bi < begin_b || bi > end_b {
        return None;
    }
    let blk0 = if bi == begin_b { rec[1] as usize } else { 0 };
    let blk1 = if bi == end_b { rec[3] as usize } else { nblk }.min(nblk);
    let rows_b = q_len * heads;
    if blk0 >= blk1 || hb * 64 >= rows_b {
        return None;
    }
    let i_max = (q_len - 1).min((hb * 64 + 63) / heads);
    let kv_lim = kv_len as i64 - q_len as i64 + i_max as i64 + 1;
    let blk_lim = if kv_lim > 0 {
        (kv_lim as usize).div_ceil(64)
    } else {
        0
    };
    let ntiles = blk1.min(blk_lim).saturating_sub(blk0);
    let nsplit = (splits[b + 1] - splits[b]) as usize;
    let slot = if bi == begin_b { rec[4] as usize } else { 0 };
    Some((blk0, ntiles, (nsplit > 1).then_some(slot)))
}

/// Every block of every sequence is in exactly one part; split slots of a sequence are
/// 0..nsplit, each used by exactly one part; slots <= batch + parts; and, for every head
/// block with rows, each output row gets exactly one direct write or all its slots written.
fn check_schedule(
    kv_lens: &[usize],
    q_lens: &[usize],
    heads: usize,
    bt_stride: usize,
    parts: usize,
) -> Result<(), String> {
    let seqlens: Vec<i32> = kv_lens.iter().map(|&v| v as i32).collect();
    let s = mla_schedule_host(&seqlens, bt_stride, parts, MLA_SCHED_FIXED_OVERHEAD);
    let batch = kv_lens.len();
    if s.parts.len() != parts.max(1) || s.splits.len() != batch + 1 || s.splits[0] != 0 {
        return Err(format!("malformed schedule {s:?}"));
    }
    if s.slots() > batch + parts {
        return Err(format!(
            "{} slots > batch {batch} + parts {parts}",
            s.slots()
        ));
    }
    let nblk: Vec<usize> = kv_lens
        .iter()
        .map(|&l| l.min(bt_stride * 64).div_ceil(64))
        .collect();
    let mut covered: Vec<Vec<u32>> = nblk.iter().map(|&n| vec![0; n]).collect();
    let mut slot_use: Vec<Vec<u32>> = Vec::new();
    for b in 0..batch {
        let ns = s.splits[b + 1] - s.splits[b];
        if ns < 1 {
            return Err(format!("sequence {b} has {ns} splits"));
        }
        slot_use.push(vec![0; ns as usize]);
    }
    for rec in &s.parts {
        for b in i64::from(rec[0]).max(0)..=i64::from(rec[2]).min(batch as i64 - 1) {
            let b = b as usize;
            let blk0 = if b as i32 == rec[0] {
                rec[1] as usize
            } else {
                0
            };
            let blk1 = if b as i32 == rec[2] {
                rec[3] as usize
            } else {
                nblk[b]
            }
            .min(nblk[b]);
            if blk0 >= blk1 {
                continue;
            }
            for c in &mut covered[b][blk0..blk1] {
                *c += 1;
            }
            let slot = if b as i32 == rec[0] {
                rec[4] as usize
            } else {
                0
            };
            match slot_use[b].get_mut(slot) {
                Some(u) => *u += 1,
                None => {
                    return Err(format!(
                        "sequence {b}: slot {slot} >= nsplit {}",
                        slot_use[b].len()
                    ))
                }
            }
        }
    }
    for b in 0..batch {
        if let Some(blk) = covered[b].iter().position(|&c| c != 1) {
            return Err(format!(
                "sequence {b} block {blk} covered {} times",
                covered[b][blk]
            ));
        }
        if let Some(slot) = slot_use[b].iter().position(|&c| c != 1) {
            return Err(format!(
                "sequence {b} slot {slot} used {} times",
                slot_use[b][slot]
            ));
        }
    }
    // The kernel's view, per head block: writes and the union of tiles it runs.
    let m_blocks = (q_lens.iter().max().unwrap() * heads).div_ceil(64);
    for b in 0..batch {
        for hb in 0..m_blocks {
            if hb * 64 >= q_lens[b] * heads {
                continue;
            }
            let mut direct = 0;
            let mut slots = vec![0u32; slot_use[b].len()];
            let mut tiles = vec![0u32; nblk[b]];
            for rec in &s.parts {
                if let Some((blk0, ntiles, slot)) =
                    model_segment(rec, &s.splits, nblk[b], b, hb, heads, q_lens[b], kv_lens[b])
                {
                    match slot {
                        None => direct += 1,
                        Some(k) => slots[k] += 1,
                    }
                    for t in &mut tiles[blk0..blk0 + ntiles] {
                        *t += 1;
                    }
                }
            }
            let ok_writes = if slots.len() == 1 {
                direct == 1
            } else {
                direct == 0 && slots.iter().all(|&c| c == 1)
            };
            if !ok_writes {
                return Err(format!(
                    "sequence {b} head block {hb}: {direct} direct writes, slots {slots:?}"
                ));
            }
            let i_max = (q_lens[b] - 1).min((hb * 64 + 63) / heads);
            let lim = (kv_lens[b] - q_lens[b] + i_max + 1)
                .div_ceil(64)
                .min(nblk[b]);
            if tiles
                .iter()
                .enumerate()
                .any(|(k, &c)| c != u32::from(k < lim))
            {
                return Err(format!(
                    "sequence {b} head block {hb}: tiles run {tiles:?}, want the first {lim}"
                ));
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, failure_persistence: None, ..ProptestConfig::default() })]

    /// The split-KV schedule covers every block once and every output row is written once.
    #[test]
    fn schedule_covers_every_block_and_row_once(
        lens in prop::collection::vec(
            prop_oneof![Just(1usize), Just(2), Just(63), Just(64), Just(65), Just(129), Just(4097), 1usize..9000],
            1..24),
        s_q in 1usize..4,
        heads in prop_oneof![Just(16usize), Just(32), Just(64), Just(128), 1usize..20],
        parts in prop_oneof![Just(1usize), Just(2), Just(33), Just(66), Just(132), 1usize..400],
        extra in 0usize..3,
    ) {
        let kv: Vec<usize> = lens.iter().map(|&l| l.max(s_q)).collect();
        let q = vec![s_q; kv.len()];
        let bt = kv.iter().map(|l| l.div_ceil(64)).max().unwrap() + extra;
        if let Err(e) = check_schedule(&kv, &q, heads, bt, parts) {
            return Err(TestCaseError::fail(e));
        }
    }

    /// Chunked prefill layouts (varying q_len per sequence) too.
    #[test]
    fn schedule_covers_prefill_layouts(
        seqs in prop::collection::vec((1usize..300, 0usize..3000), 1..8),
        heads in prop_oneof![Just(16usize), Just(128), 1usize..20],
        parts in 1usize..200,
    ) {
        let q: Vec<usize> = seqs.iter().map(|s| s.0).collect();
        let kv: Vec<usize> = seqs.iter().map(|s| s.0 + s.1).collect();
        let bt = kv.iter().map(|l| l.div_ceil(64)).max().unwrap();
        if let Err(e) = check_schedule(&kv, &q, heads, bt, parts) {
            return Err(TestCaseError::fail(e));
        }
    }
}

#[test]
fn schedule_balances_fixed_lengths() {
    // FlashMLA's b = 128, s_k = 4096 on 132 SMs with h = 128, s_q = 1 (2 head blocks).
    let parts = mla_plan_parts(132, 128, 1);
    assert_eq!(parts, 66);
    let s = mla_schedule_host(&[4096; 128], 64, parts, MLA_SCHED_FIXED_OVERHEAD);
    let total = 128 * (64 + MLA_SCHED_FIXED_OVERHEAD);
    let payload = total.div_ceil(parts) + MLA_SCHED_FIXED_OVERHEAD;
    // Each part's blocks (+ overhead per sequence touched) stay within the payload.
    for rec in &s.parts {
        let mut cost = 0;
        for b in rec[0]..=rec[2] {
            let blk0 = if b == rec[0] { rec[1] } else { 0 };
            let blk1 = if b == rec[2] { rec[3] } else { 64 };
            if blk0 < blk1 {
                cost += (blk1 - blk0) as usize + MLA_SCHED_FIXED_OVERHEAD;
            }
        }
        assert!(
            cost <= payload,
            "part {rec:?} costs {cost} > payload {payload}"
        );
    }
    assert!(s.slots() <= 128 + parts);
    check_schedule(&[4096; 128], &[1; 128], 128, 64, parts).unwrap();
    // Prefill-sized head counts leave one part per head block: nothing is split.
    assert_eq!(mla_plan_parts(132, 128, 512), 1);
    let s = mla_schedule_host(&[5000, 3, 700], 80, 1, MLA_SCHED_FIXED_OVERHEAD);
    assert_eq!(s.splits, vec![0, 1, 2, 3]);
}

/// A well-formed fast-path call with fake (aligned) addresses; tests break one thing at a time.
fn attn_desc(
    batch: usize,
    heads: usize,
    s_q: usize,
    bt_stride: usize,
    num_pages: usize,
) -> MlaAttnDesc {
    let total_q = batch * s_q;
    let rows = total_q * heads;
    let parts = mla_plan_parts(132, heads, s_q);
    let [s, sp, o, l] = MlaWorkspace::lens(batch, heads, s_q, parts);
    let r = |addr: u64, len: usize| Region { addr, len };
    MlaAttnDesc {
        batch,
        heads,
        total_q,
        max_q_len: s_q,
        kv_lora: KV_LORA,
        rope: ROPE,
        bt_stride,
        num_pages,
        scale: 0.1352,
        q: r(0x1000_0000, rows * WIDTH),
        cache: r(0x2000_0000, num_pages * 64 * WIDTH),
        block_table: r(0x3000_0000, batch * bt_stride),
        seqlens_k: r(0x3100_0000, batch),
        q_starts: r(0x3200_0000, batch + 1),
        out: r(0x4000_0000, rows * KV_LORA),
        lse: r(0x4100_0000, rows),
        workspace: Some(MlaWorkspaceDesc {
            parts,
            sched: r(0x5000_0000, s),
            splits: r(0x5100_0000, sp),
            o_accum: r(0x5200_0000, o),
            lse_accum: r(0x5300_0000, l),
        }),
    }
}

#[test]
fn host_checks_choose_kernels_and_name_requirements() {
    let d = attn_desc(128, 128, 1, 64, 128 * 64);
    assert_eq!(d.resolve(MlaKernel::Auto).unwrap(), MlaKernel::Wgmma);
    assert_eq!(
        d.resolve(MlaKernel::Reference).unwrap(),
        MlaKernel::Reference
    );
    assert_eq!(d.m_blocks(), 2);
    for heads in [16, 32, 64, 128] {
        for s_q in [1, 2] {
            let d = attn_desc(128, heads, s_q, 128, 128 * 128);
            assert_eq!(
                d.resolve(MlaKernel::Auto).unwrap(),
                MlaKernel::Wgmma,
                "h {heads} s_q {s_q}"
            );
        }
    }

    // Other latent widths: the reference only.
    let mut x = attn_desc(4, 16, 2, 8, 40);
    x.kv_lora = 256;
    x.q.len = 4 * 2 * 16 * (256 + ROPE);
    x.cache.len = 40 * 64 * (256 + ROPE);
    x.out.len = 4 * 2 * 16 * 256;
    assert_eq!(x.resolve(MlaKernel::Auto).unwrap(), MlaKernel::Reference);
    let e = err_of(x.resolve(MlaKernel::Wgmma));
    assert!(
        e.starts_with("mla_decode_wgmma") && e.contains("kv_lora and rope must be 512 and 64"),
        "{e}"
    );

    // No workspace: Auto falls back, Wgmma says why.
    let mut x = attn_desc(4, 16, 1, 8, 40);
    x.workspace = None;
    assert_eq!(x.resolve(MlaKernel::Auto).unwrap(), MlaKernel::Reference);
    assert!(err_of(x.resolve(MlaKernel::Wgmma)).contains("needs an MlaWorkspace"));

    // TMA alignment: Auto falls back to the reference.
    let mut x = attn_desc(4, 16, 1, 8, 40);
    x.q.addr += 8;
    assert_eq!(x.resolve(MlaKernel::Auto).unwrap(), MlaKernel::Reference);
    assert!(err_of(x.resolve(MlaKernel::Wgmma)).contains("tmap_q: global address"));

    // Short buffers name the buffer, for every kernel.
    let mut x = attn_desc(4, 16, 2, 8, 40);
    x.out.len -= 1;
    for k in [MlaKernel::Auto, MlaKernel::Reference, MlaKernel::Wgmma] {
        let e = err_of(x.resolve(k));
        assert!(e.contains("out holds"), "{e}");
    }
    let mut x = attn_desc(4, 16, 2, 8, 40);
    x.block_table.len = 31;
    assert!(err_of(x.resolve(MlaKernel::Auto)).contains("block_table holds 31"));
    let mut x = attn_desc(4, 16, 2, 8, 40);
    if let Some(w) = x.workspace.as_mut() {
        w.o_accum.len = 0;
    }
    assert_eq!(x.resolve(MlaKernel::Auto).unwrap(), MlaKernel::Reference);
    assert!(err_of(x.resolve(MlaKernel::Wgmma)).contains("o_accum holds 0"));

    // An empty cache cannot back a TMA map (nor any sequence).
    let mut x = attn_desc(4, 16, 1, 8, 40);
    x.num_pages = 0;
    assert!(err_of(x.resolve(MlaKernel::Auto)).contains("num_pages (0) must be >= 1"));

    // Bad scalars.
    let mut x = attn_desc(4, 16, 1, 8, 40);
    x.scale = f32::NAN;
    assert!(err_of(x.resolve(MlaKernel::Auto)).contains("scale"));
    let mut x = attn_desc(4, 16, 1, 8, 40);
    x.kv_lora = 1024;
    x.q.len = usize::MAX;
    x.cache.len = usize::MAX;
    x.out.len = usize::MAX;
    assert!(err_of(x.resolve(MlaKernel::Auto)).contains("kv_lora (1024) must be <= 512"));
    let mut x = attn_desc(5000, 16, 1, 8, 40);
    x.workspace = None;
    assert!(err_of(x.resolve(MlaKernel::Wgmma)).contains("batch (5000) must be <= 4096"));
}

#[test]
fn host_checks_cache_write_and_q_rope() {
    let r = |addr: u64, len: usize| Region { addr, len };
    let good = MlaCacheWriteDesc {
        tokens: 3,
        kv_lora: KV_LORA,
        rope: ROPE,
        kv: r(0x1000, 3 * WIDTH),
        ld_kv: WIDTH,
        norm_w: r(0x8000, KV_LORA),
        inv_freq: r(0x9000, ROPE / 2),
        positions: r(0xA000, 3),
        token_seq: r(0xB000, 3),
        block_table: r(0xC000, 2 * 4),
        num_seqs: 2,
        bt_stride: 4,
        cache: r(0x10_0000, 8 * 64 * WIDTH),
        num_pages: 8,
        eps: 1e-6,
        attention_factor: 1.0,
    };
    good.check().unwrap();
    let mut x = good;
    x.rope = 63;
    assert!(err_of(x.check()).contains("rope (63) must be even"));
    let mut x = good;
    x.ld_kv = WIDTH - 1;
    x.kv.len = usize::MAX;
    assert!(err_of(x.check()).contains("ld_kv (575) must be >= kv_lora + rope (576)"));
    let mut x = good;
    x.cache.len -= 1;
    assert!(err_of(x.check()).starts_with("mla_cache_write: cache holds"));
    let mut x = good;
    x.positions.addr += 2;
    assert!(err_of(x.check()).contains("positions"));

    let q = MlaQRopeDesc {
        tokens: 3,
        heads: 16,
        rope: ROPE,
        src: r(0x1000, 3 * 16 * 192),
        src_offset: 128,
        src_ld_token: 16 * 192,
        src_ld_head: 192,
        dst: r(0x10_0000, 3 * 16 * WIDTH),
        dst_offset: KV_LORA,
        dst_ld_token: 16 * WIDTH,
        dst_ld_head: WIDTH,
        positions: r(0x20_0000, 3),
        inv_freq: r(0x30_0000, 32),
        attention_factor: 1.0,
    };
    q.check().unwrap();
    let mut x = q;
    x.src.len -= 1;
    assert!(err_of(x.check()).contains("src holds"));
    let mut x = q;
    x.dst_ld_head = 32;
    assert!(err_of(x.check()).contains("dst: ld_head (32) must be >= rope (64)"));
}

#[test]
fn layout_checks_and_positions() {
    let batch = Batch {
        tokens: vec![0; 5],
        segments: vec![
            Segment {
                blocks: vec![3, 1],
                start_pos: 70,
                len: 2,
                logit_rows: 1,
            },
            Segment {
                blocks: vec![0],
                start_pos: 0,
                len: 3,
                logit_rows: 1,
            },
        ],
        page_copies: Vec::new(),
    };
    let l = MlaLayout::from_batch(&batch);
    assert_eq!(l.kv_lens, vec![72, 3]);
    assert_eq!(l.q_lens, vec![2, 3]);
    assert_eq!(l.total_q(), 5);
    assert_eq!(l.max_q_len(), 3);
    assert_eq!(
        l.token_positions(),
        vec![(0, 70), (0, 71), (1, 0), (1, 1), (1, 2)]
    );
    l.check().unwrap();
    let mut bad = l.clone();
    bad.kv_lens[0] = 129;
    assert!(err_of(bad.check()).contains("2 pages cannot hold 129 positions"));
    let mut bad = l.clone();
    bad.q_lens[1] = 4;
    assert!(err_of(bad.check()).contains("q_len = 4 must be >= 1 and <= kv_len = 3"));
    let decode = MlaLayout::decode(vec![vec![0], vec![1, 2]], vec![10, 100], 2);
    assert_eq!(decode.total_q(), 4);
    decode.check().unwrap();
}

#[test]
fn prefill_form_cost_model() {
    // Decode (1 token over 4096): absorbed. A 4096-token prompt from scratch: expanded.
    let (f, a, e) = prefill_form_by_cost(1, 4096, 128, 512, 64, 128, 128);
    assert_eq!(f, PrefillForm::Absorbed, "{a} vs {e}");
    let (f, a, e) = prefill_form_by_cost(4096, 0, 128, 512, 64, 128, 128);
    assert_eq!(f, PrefillForm::Expanded, "{a} vs {e}");
    // A short chunk over a long prefix stays absorbed.
    assert_eq!(
        prefill_form_by_cost(64, 16384, 128, 512, 64, 128, 128).0,
        PrefillForm::Absorbed
    );
}

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
    let rope = MlaRope::new(dev, &cfg).unwrap();
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
    let rope = MlaRope::new(dev, &cfg).unwrap();
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
    let rope = MlaRope::new(dev, &cfg).unwrap();
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
    let rope = MlaRope::new(dev, &cfg).unwrap();
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
