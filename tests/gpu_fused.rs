//! The decode path's fused kernels against the unfused kernels they replace, bit for bit, and
//! the CUDA backend with fusion on against fusion off, bit for bit.
//!
//! - small_rms_norm_quant == small_add, then small_rms_norm, then act_quant (act_quant for
//!   widths that are multiples of 128, small_act_quant otherwise): the sum, the normed row,
//!   the fp8 codes and the SA scales, at R1's widths (7168, 1536) and odd ones, with and
//!   without the residual, with the normed row or the quantized one alone, and with the
//!   normed row written over the input (as the backend's slots may share).
//! - small_silu_mul_quant == small_silu_mul, then act_quant, at the MLP's widths (18432,
//!   2048) and odd ones.
//! - small_mla_absorb_q_rope == small_mla_absorb_q, then mla_q_rope, at R1's attention shape
//!   (128 heads, nope 128, rope 64, v 128, kv_lora 512) and an odd one.
//! - moe_router_logits at R1's router (256 x 7168) for T = 1, 8, 64 and 65 (two token tiles)
//!   == numerics::dot, the CPU router's logits.
//! - CudaBackend with fusion (the default) == CudaBackend::set_fusion(false): logits, MTP
//!   logits and greedy tokens of the committed fixtures, bit for bit.
//!
//! Without a device every test prints its skip line (a failure under R1_REQUIRE_GPU).

mod common;
mod gpu_support;

use half::bf16;

use r1_runtime::cuda::backend::absorbed_kv_b;
use r1_runtime::cuda::ops::{
    router_logits_host, MlaAbsorbDesc, MlaAbsorbQRopeDesc, MoeOps, NormQuantDesc, QuantOut,
    RouterLogitsArgs, SiluMulQuantDesc, SmallOps,
};
use r1_runtime::cuda::{
    act_scale_m_pad, ActQuantArgs, ActQuantDesc, Device, DeviceBuffer, Mla, MlaLayout,
    MlaQRopeArgs, MlaRope, QuantizedActivations, Region,
};
use r1_runtime::numerics::QUANT_BLOCK;

use gpu_support::{gpu, Rng};

/// bf16 values with per-row magnitude 10^[-2, 2], some all-zero 128-groups.
fn values(rng: &mut Rng, m: usize, k: usize) -> Vec<bf16> {
    let mut x = Vec::with_capacity(m * k);
    for _ in 0..m {
        let mag = 10f32.powf(rng.unit() * 4.0 - 2.0);
        for g in 0..k.div_ceil(QUANT_BLOCK) {
            let zero = rng.below(8) == 0;
            let len = (k - g * QUANT_BLOCK).min(QUANT_BLOCK);
            x.extend((0..len).map(|_| bf16::from_f32(if zero { 0.0 } else { rng.normal() * mag })));
        }
    }
    x
}

fn bits(v: &[bf16]) -> Vec<u16> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Quantized-activation buffers for `m` x `k`, codes filled with 0xAB and scales with NaN
/// bits, so that two runs agree only where both wrote.
fn quant_buffers(dev: &Device, m: usize, k: usize) -> QuantizedActivations {
    let m_pad = act_scale_m_pad(m);
    let mut q = dev.alloc::<u8>(m * k).unwrap();
    let mut scales = dev.alloc::<f32>(k.div_ceil(QUANT_BLOCK) * m_pad).unwrap();
    dev.memset(&mut q, 0xAB).unwrap();
    dev.memset(&mut scales, 0xFF).unwrap();
    QuantizedActivations {
        q,
        scales,
        m,
        k,
        m_pad,
    }
}

/// The unfused act_quant of `x` into `a`: the vectorized kernel where it applies (K a
/// multiple of 128), the any-K kernel otherwise, as the backend picks.
fn act_quant_unfused(
    dev: &Device,
    small: &SmallOps,
    x: &DeviceBuffer<bf16>,
    a: &mut QuantizedActivations,
) {
    let (m, k, m_pad) = (a.m, a.k, a.m_pad);
    if k % QUANT_BLOCK == 0 {
        dev.act_quant_into(ActQuantArgs {
            x,
            ldx: k,
            q: &mut a.q,
            ldq: k,
            scales: &mut a.scales,
            m_pad,
            m,
            k,
        })
        .unwrap();
    } else {
        small
            .prepare_act_quant(ActQuantDesc {
                m,
                k,
                x: x.into(),
                ldx: k,
                q: Region::from(&a.q),
                ldq: k,
                scales: Region::from(&a.scales),
                m_pad,
            })
            .unwrap()
            .launch()
            .unwrap();
    }
}

/// Compares two quantizations: codes of every row, scales of every row (padding rows of the
/// SA layout excluded).
fn same_quant(dev: &Device, got: &QuantizedActivations, want: &QuantizedActivations, what: &str) {
    let (gq, wq) = (
        dev.download(&got.q).unwrap(),
        dev.download(&want.q).unwrap(),
    );
    assert_eq!(gq, wq, "{what}: fp8 codes differ");
    let (gs, ws) = (
        dev.download(&got.scales).unwrap(),
        dev.download(&want.scales).unwrap(),
    );
    for kb in 0..got.k.div_ceil(QUANT_BLOCK) {
        for r in 0..got.m {
            let i = kb * got.m_pad + r;
            assert_eq!(
                gs[i].to_bits(),
                ws[i].to_bits(),
                "{what}: scale of row {r}, group {kb}: {} vs {}",
                gs[i],
                ws[i]
            );
        }
    }
}

fn small(dev: &Device) -> SmallOps {
    SmallOps::new(dev)
}

/// A bf16 buffer of `n` elements filled with NaN bits (0xFFFF).
fn sentinel(dev: &Device, n: usize) -> DeviceBuffer<bf16> {
    let mut b = dev.alloc::<bf16>(n).unwrap();
    dev.memset(&mut b, 0xFF).unwrap();
    b
}

// ------------------------------------------------------------------------------------------
// Residual add + RMSNorm + act_quant
// ------------------------------------------------------------------------------------------

/// Which outputs a fused norm writes.
#[derive(Clone, Copy, Debug)]
struct NormCase {
    residual: bool,
    normed: bool,
    quant: bool,
    /// The normed row written over x (only with a residual: x is consumed first).
    over_x: bool,
}

fn check_norm(dev: &Device, rows: usize, width: usize, case: NormCase, seed: u64) {
    let ops = small(dev);
    let what = format!("small_rms_norm_quant [{rows} x {width}] {case:?}");
    let mut rng = Rng::new(seed);
    let x = values(&mut rng, rows, width);
    let res = values(&mut rng, rows, width);
    let w: Vec<bf16> = (0..width)
        .map(|_| bf16::from_f32(1.0 + 0.25 * rng.normal()))
        .collect();
    let eps = 1e-6;
    let n = rows * width;
    let (xd, rd, wd) = (
        dev.upload(&x).unwrap(),
        dev.upload(&res).unwrap(),
        dev.upload(&w).unwrap(),
    );

    // Unfused: small_add, small_rms_norm, act_quant.
    let mut sum_u = sentinel(dev, n);
    let normed_in = if case.residual {
        ops.prepare_add(&xd, &rd, &mut sum_u, n)
            .unwrap()
            .launch()
            .unwrap();
        &sum_u
    } else {
        &xd
    };
    let mut normed_u = sentinel(dev, n);
    ops.prepare_rms_norm(normed_in, &wd, &mut normed_u, rows, width, eps)
        .unwrap()
        .launch()
        .unwrap();
    let mut quant_u = quant_buffers(dev, rows, width);
    act_quant_unfused(dev, &ops, &normed_u, &mut quant_u);

    // Fused.
    let xf = dev.upload(&x).unwrap();
    let sum_f = sentinel(dev, n);
    let normed_f = sentinel(dev, n);
    let quant_f = quant_buffers(dev, rows, width);
    let out = match (case.normed, case.over_x) {
        (false, _) => None,
        (true, false) => Some(Region::from(&normed_f)),
        (true, true) => Some(Region::from(&xf)),
    };
    ops.prepare_rms_norm_quant(NormQuantDesc {
        rows,
        width,
        eps,
        x: Region::from(&xf),
        residual: case
            .residual
            .then(|| (Region::from(&rd), Region::from(&sum_f))),
        w: Region::from(&wd),
        out,
        quant: case.quant.then(|| QuantOut::of(&quant_f)),
    })
    .unwrap()
    .launch()
    .unwrap();

    if case.residual {
        assert_eq!(
            bits(&dev.download(&sum_f).unwrap()),
            bits(&dev.download(&sum_u).unwrap()),
            "{what}: sum"
        );
    }
    if case.normed {
        let got = if case.over_x { &xf } else { &normed_f };
        assert_eq!(
            bits(&dev.download(got).unwrap()),
            bits(&dev.download(&normed_u).unwrap()),
            "{what}: normed rows"
        );
    } else {
        assert!(
            bits(&dev.download(&normed_f).unwrap())
                .iter()
                .all(|&b| b == 0xFFFF),
            "{what}: wrote the normed row it was not asked for"
        );
    }
    if case.quant {
        same_quant(dev, &quant_f, &quant_u, &what);
    }
}

#[test]
fn rms_norm_quant_matches_unfused() {
    let Some(dev) = gpu("gpu_fused::rms_norm_quant_matches_unfused") else {
        return;
    };
    let all = |residual, normed, quant, over_x| NormCase {
        residual,
        normed,
        quant,
        over_x,
    };
    let cases = [
        all(false, false, true, false), // q_a_norm feeding q_b
        all(false, true, true, false),  // a norm read by the router and the shared expert
        all(true, false, true, false),  // Add + attn_norm feeding q_a and kv_a
        all(true, true, true, false),
        all(true, true, false, false), // Add + final norm
        all(true, true, true, true),   // the normed row in x's slot
    ];
    let mut seed = 0;
    for width in [7168, 1536, 512, 384, 200, 130, 7] {
        for rows in [1, 3, 64] {
            for case in cases {
                seed += 1;
                check_norm(dev, rows, width, case, seed);
            }
        }
    }
}

// ------------------------------------------------------------------------------------------
// SiLU * up + act_quant
// ------------------------------------------------------------------------------------------

#[test]
fn silu_mul_quant_matches_unfused() {
    let Some(dev) = gpu("gpu_fused::silu_mul_quant_matches_unfused") else {
        return;
    };
    let ops = small(dev);
    let mut seed = 100;
    for width in [18432, 2048, 256, 200, 5] {
        for rows in [1, 5, 64] {
            for write_out in [false, true] {
                seed += 1;
                let what = format!("small_silu_mul_quant [{rows} x {width}] out {write_out}");
                let mut rng = Rng::new(seed);
                let n = rows * width;
                let mut gate = values(&mut rng, rows, width);
                // Large gates too: exp(-g) under- and overflows.
                for (i, g) in gate.iter_mut().enumerate().take(8) {
                    *g = bf16::from_f32([90.0, -90.0, 20.0, -20.0, 0.0, -0.0, 1e-3, -1e-3][i]);
                }
                let up = values(&mut rng, rows, width);
                let (gd, ud) = (dev.upload(&gate).unwrap(), dev.upload(&up).unwrap());
                let mut act_u = sentinel(dev, n);
                ops.prepare_silu_mul(&gd, &ud, &mut act_u, n)
                    .unwrap()
                    .launch()
                    .unwrap();
                let mut quant_u = quant_buffers(dev, rows, width);
                act_quant_unfused(dev, &ops, &act_u, &mut quant_u);

                let act_f = sentinel(dev, n);
                let quant_f = quant_buffers(dev, rows, width);
                ops.prepare_silu_mul_quant(SiluMulQuantDesc {
                    rows,
                    width,
                    gate: Region::from(&gd),
                    up: Region::from(&ud),
                    out: write_out.then(|| Region::from(&act_f)),
                    quant: QuantOut::of(&quant_f),
                })
                .unwrap()
                .launch()
                .unwrap();
                same_quant(dev, &quant_f, &quant_u, &what);
                let got = bits(&dev.download(&act_f).unwrap());
                if write_out {
                    assert_eq!(got, bits(&dev.download(&act_u).unwrap()), "{what}: product");
                } else {
                    assert!(
                        got.iter().all(|&b| b == 0xFFFF),
                        "{what}: wrote the product"
                    );
                }
            }
        }
    }
}

// ------------------------------------------------------------------------------------------
// q absorption + q RoPE
// ------------------------------------------------------------------------------------------

/// (heads, nope, rope, v, kv_lora)
type AttnShape = (usize, usize, usize, usize, usize);

fn check_absorb_rope(dev: &Device, shape: AttnShape, q_lens: &[usize], seed: u64) {
    let (heads, nope, rope, v, kv_lora) = shape;
    let ops = small(dev);
    let mla = Mla::new(dev);
    let what = format!("small_mla_absorb_q_rope {shape:?} q_lens {q_lens:?}");
    let mut rng = Rng::new(seed);
    // Sequences at long and short positions (the RoPE angles of a long context).
    let kv_lens: Vec<usize> = q_lens
        .iter()
        .enumerate()
        .map(|(i, &q)| q + [0, 5, 4000, 163_000][i % 4])
        .collect();
    let tables: Vec<Vec<u32>> = kv_lens
        .iter()
        .map(|&kv| (0..kv.div_ceil(64) as u32).collect())
        .collect();
    let batch = MlaLayout {
        tables,
        kv_lens,
        q_lens: q_lens.to_vec(),
    }
    .upload(dev)
    .unwrap();
    let tokens: usize = q_lens.iter().sum();
    let inv_freq: Vec<f32> = (0..rope / 2)
        .map(|i| 10000f32.powf(-2.0 * i as f32 / rope as f32))
        .collect();
    let rope_table = MlaRope::new(dev, &inv_freq, 1.17).unwrap();
    let q = values(&mut rng, tokens, heads * (nope + rope));
    let kv_b_proj: Vec<f32> = (0..heads * (nope + v) * kv_lora)
        .map(|_| rng.normal() * 0.05)
        .collect();
    let kv_b = absorbed_kv_b(&kv_b_proj, heads, nope, v, kv_lora);
    let (qd, kvd) = (dev.upload(&q).unwrap(), dev.upload(&kv_b).unwrap());
    let width = kv_lora + rope;
    let absorb = |dst: &DeviceBuffer<bf16>| MlaAbsorbDesc {
        tokens,
        heads,
        nope,
        rope,
        v,
        kv_lora,
        src: Region::from(&qd),
        kv_b: Region::from(&kvd),
        dst: Region::from(dst),
    };

    let mut q_u = sentinel(dev, tokens * heads * width);
    ops.prepare_mla_absorb(absorb(&q_u), true)
        .unwrap()
        .launch()
        .unwrap();
    let qk = nope + rope;
    mla.q_rope(MlaQRopeArgs {
        src: Some((&qd, nope, heads * qk, qk)),
        q: &mut q_u,
        heads,
        kv_lora,
        rope: &rope_table,
        batch: &batch,
    })
    .unwrap();

    let q_f = sentinel(dev, tokens * heads * width);
    ops.prepare_mla_absorb_q_rope(MlaAbsorbQRopeDesc {
        absorb: absorb(&q_f),
        positions: Region::from(&batch.positions),
        inv_freq: Region::from(&rope_table.inv_freq),
        attention_factor: rope_table.attention_factor,
    })
    .unwrap()
    .launch()
    .unwrap();
    let (got, want) = (
        bits(&dev.download(&q_f).unwrap()),
        bits(&dev.download(&q_u).unwrap()),
    );
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(
            g,
            w,
            "{what}: token {}, head {}, column {}",
            i / (heads * width),
            i / width % heads,
            i % width
        );
    }
}

#[test]
fn absorb_q_rope_matches_unfused() {
    let Some(dev) = gpu("gpu_fused::absorb_q_rope_matches_unfused") else {
        return;
    };
    let r1 = (128, 128, 64, 128, 512);
    check_absorb_rope(dev, r1, &[1], 1);
    check_absorb_rope(dev, r1, &[1, 1, 1, 1], 2);
    check_absorb_rope(dev, r1, &[2, 1, 3], 3);
    check_absorb_rope(dev, (3, 5, 4, 7, 9), &[1, 4], 4);
    check_absorb_rope(dev, (1, 16, 2, 8, 300), &[3], 5);
}

// ------------------------------------------------------------------------------------------
// Router logits at R1's shape
// ------------------------------------------------------------------------------------------

#[test]
fn router_logits_r1_shape_bit_exact() {
    let Some(dev) = gpu("gpu_fused::router_logits_r1_shape_bit_exact") else {
        return;
    };
    let ops = MoeOps::new(dev);
    let (experts, hidden) = (256, 7168);
    let mut rng = Rng::new(11);
    let w: Vec<bf16> = (0..experts * hidden)
        .map(|_| bf16::from_f32(rng.normal() * 0.02))
        .collect();
    let wd = dev.upload(&w).unwrap();
    for (tokens, ldx) in [
        (1, hidden),
        (8, hidden),
        (64, hidden),
        (65, hidden),
        (3, hidden + 8),
    ] {
        let rows = values(&mut rng, tokens, hidden);
        // Rows of stride ldx (the padding holds NaN, which must never be read).
        let mut x = vec![bf16::from_bits(0xFFFF); tokens * ldx];
        for t in 0..tokens {
            x[t * ldx..t * ldx + hidden].copy_from_slice(&rows[t * hidden..(t + 1) * hidden]);
        }
        let xd = dev.upload(&x).unwrap();
        let mut l: DeviceBuffer<f32> = dev.alloc(tokens * experts).unwrap();
        ops.prepare_router_logits(RouterLogitsArgs {
            x: &xd,
            ldx,
            w: &wd,
            logits: &mut l,
            tokens,
            experts,
            hidden,
        })
        .unwrap()
        .launch()
        .unwrap();
        let got = dev.download(&l).unwrap();
        let want = router_logits_host(&rows, &w, tokens, hidden);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(
                g.to_bits(),
                w.to_bits(),
                "[T={tokens}, ldx {ldx}] token {}, expert {}: {g} vs CPU {w}",
                i / experts,
                i % experts
            );
        }
    }
}

// ------------------------------------------------------------------------------------------
// The backend: fusion on == fusion off
// ------------------------------------------------------------------------------------------

/// Scores the fixture's prompt and generates greedily with the fused and the unfused backend:
/// every logit, MTP logit and token identical.
#[test]
fn backend_fusion_is_bit_identical() {
    use r1_runtime::checkpoint::Checkpoint;
    use r1_runtime::config::ModelConfig;
    use r1_runtime::cuda::{CudaBackend, CudaOptions};
    use r1_runtime::engine::sampling::SamplingParams;
    use r1_runtime::engine::Engine;
    use r1_runtime::model::weights::ModelWeights;
    use r1_runtime::Precision;
    use std::sync::Arc;
    const TEST: &str = "gpu_fused::backend_fusion_is_bit_identical";
    if gpu_support::or_skip(gpu_support::device(), TEST).is_none() {
        return;
    }
    for (name, max_new) in common::FIXTURES {
        let dir = common::fixture(name);
        let cfg = ModelConfig::from_dir(&dir).expect("fixture config");
        let ckpt = Checkpoint::open(&dir).expect("fixture checkpoint");
        let weights = Arc::new(ModelWeights::load(&ckpt, &cfg, true).expect("fixture weights"));
        let engine = |fused: bool| {
            let mut b = CudaBackend::new(
                &cfg,
                weights.clone(),
                Precision::W8a8,
                &CudaOptions::default(),
            )
            .expect("backend");
            b.set_fusion(fused).expect("fusion switch");
            Engine::with_backend(cfg.clone(), weights.clone(), Box::new(b), 1 << 14)
        };
        let (mut fused, mut plain) = (engine(true), engine(false));
        let r = common::reference(name);
        let (lf, mf) = fused.score(&r.tokens).expect("fused score");
        let (lp, mp) = plain.score(&r.tokens).expect("unfused score");
        let fbits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
        assert_eq!(fbits(&lf), fbits(&lp), "{name}: logits differ");
        assert_eq!(
            fbits(&mf.expect("MTP logits")),
            fbits(&mp.expect("MTP logits")),
            "{name}: MTP logits differ"
        );
        let params = SamplingParams::default();
        let gf = fused.generate(&r.tokens, max_new, &params).expect("fused");
        let gp = plain
            .generate(&r.tokens, max_new, &params)
            .expect("unfused");
        assert_eq!(gf.tokens, gp.tokens, "{name}: greedy tokens differ");
        println!(
            "{name}: fused == unfused ({} logits, {} tokens)",
            lf.len(),
            gf.tokens.len()
        );
    }
}
