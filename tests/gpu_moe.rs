//! MoE kernels on the GPU against the CPU reference (`cpu::moe`, `numerics`) and the host
//! models of `r1_runtime::cuda::ops` (`route_host`, `plan_host`, `silu_quant_host`,
//! `unpermute_host`, `router_logits_host`).
//!
//! Without a usable device every GPU test prints `skipped: no CUDA device (<reason>) [<test>]`
//! to stderr and returns; `R1_REQUIRE_GPU=1` (tools/gpu-suite) turns that into a failure (the
//! shared harness: tests/gpu_support).
//! The host-side model tests run everywhere (they are in the crate's unit tests and at the end
//! of this file).
//!
//! What is compared, and how strictly:
//! - moe_router_logits: bit-identical to `numerics::dot` (the CPU router's logits).
//! - moe_router: expert ids identical to `numerics::routing::Router::route` (ties: lowest
//!   index), in the same order; weights within 4 ulp (the GPU's exp is exp(double) rounded to
//!   f32, the CPU's is libm's expf); a NaN token: ids -1, weights 0, flags -> an error naming
//!   it.
//! - moe_plan, moe_gather, moe_silu_quant, moe_unpermute, moe_gemm_ref: bit-identical to the
//!   host models / a CPU loop in the kernel's order; rows the layout leaves unused untouched.
//! - wgmma grouped GEMMs: against `numerics::block_gemm_w8a8` rounded to bf16 with
//!   [`TOLERANCE`] (gpu_support, as tests/gpu_kernels.rs): |gpu - ref| <= 2^-6 |ref| + 5e-3
//!   max|ref|, rms(gpu - ref) <= 5e-3 rms(ref).
//! - the whole block (routed + shared): against the CPU w8a8 `MoeCall` + shared MLP + add on
//!   the r1-heads fixture's MoE layer, routing identical, outputs within [`BLOCK_TOLERANCE`]:
//!   |gpu - ref| <= 2^-5 |ref| + 2e-2 max|ref| per token, rms <= 1e-2 rms(ref) (two GEMMs,
//!   SiLU and three bf16 roundings: a 1-ulp bf16 difference before act_quant can move a code).
//! - the block at DeepSeek-V3's routing scale (4096 tokens, 256 experts, one expert chosen by
//!   every token; random weights): every token's routing identical to the CPU router, 64
//!   tokens within [`BLOCK_TOLERANCE`] of the same w8a8 recipe on the CPU.

mod common;
mod gpu_support;

use std::sync::OnceLock;

use half::bf16;
use rayon::prelude::*;

use r1_runtime::backend::Precision;
use r1_runtime::checkpoint::Checkpoint;
use r1_runtime::config::ModelConfig;
use r1_runtime::cpu::linear::linear;
use r1_runtime::cpu::moe::MoeCall;
use r1_runtime::cuda::backend::{moe_block_config, upload_moe_block};
use r1_runtime::cuda::ops::{
    plan_host, route_host, router_logits_host, silu_quant_host, unpermute_host, GatherArgs,
    GroupedFp8Weight, GroupedGemmArgs, GroupedGemmKernel, MoeBlockConfig, MoeBlockWeights,
    MoeGemmPath, MoeGeometry, MoeLayout, MoeOps, MoePlanBuffers, MoeWorkspace, PermutedRows,
    PlanArgs, RouterArgs, RouterConfig, RouterLogitsArgs, SiluQuantArgs, UnpermuteArgs,
};
use r1_runtime::cuda::{
    act_scale_m_pad, CudaError, Device, DeviceBuffer, Fp8Weight, QuantizedActivations,
};
use r1_runtime::model::weights::{FfnWeights, ModelWeights, Weight};
use r1_runtime::numerics::{self, round_bf16, QuantizedRows, QUANT_BLOCK};

use gpu_support::{
    allow_no_device, check_close, deepseek_router, fp8_weights, or_skip, ref_kernel_dot, route_ids,
    skipped, to_bf16, w8a8_row, widen, Rng, Tolerance, TOLERANCE,
};

/// The whole block's tolerance: (relative, of the token's max|ref|, rms).
const BLOCK_TOLERANCE: Tolerance = (1.0 / 32.0, 2e-2, 1e-2);

// ------------------------------------------------------------------------------------------
// Device and skipping
// ------------------------------------------------------------------------------------------

/// The MoE kernels on the shared device, or None after printing the skip line.
fn gpu(test: &str) -> Option<&'static MoeOps> {
    static OPS: OnceLock<MoeOps> = OnceLock::new();
    let ops = gpu_support::device().map(|dev| OPS.get_or_init(|| MoeOps::new(dev)));
    or_skip(ops, test)
}

// ------------------------------------------------------------------------------------------
// Data
// ------------------------------------------------------------------------------------------

/// bf16 activations with per-row magnitude 10^[-2, 2].
fn activations(rng: &mut Rng, m: usize, k: usize) -> Vec<bf16> {
    let mut x = Vec::with_capacity(m * k);
    for _ in 0..m {
        let mag = 10f32.powf(rng.unit() * 4.0 - 2.0);
        x.extend((0..k).map(|_| bf16::from_f32(rng.normal() * mag)));
    }
    x
}

/// Expert `e`'s codes `[n][k]` and multipliers of stacked weights (`fp8_weights` layout).
fn expert_weight<'a>(
    codes: &'a [u8],
    scales: &'a [f32],
    e: usize,
    n: usize,
    k: usize,
) -> (&'a [u8], &'a [f32]) {
    let blocks = n.div_ceil(QUANT_BLOCK) * k.div_ceil(QUANT_BLOCK);
    (
        &codes[e * n * k..(e + 1) * n * k],
        &scales[e * blocks..(e + 1) * blocks],
    )
}

fn s<T: std::fmt::Display>(e: T) -> String {
    e.to_string()
}

// ------------------------------------------------------------------------------------------
// Router
// ------------------------------------------------------------------------------------------

/// (ids, weights, the flags as a result).
type GpuRouting = (Vec<i32>, Vec<f32>, Result<(), CudaError>);

/// Runs moe_router on `logits` ([tokens][E]) and returns (ids, weights, flags result).
fn route_on_gpu(
    ops: &MoeOps,
    cfg: &RouterConfig,
    logits: &[f32],
    bias: Option<&[f32]>,
    tokens: usize,
) -> Result<GpuRouting, String> {
    let dev = ops.device();
    let l = dev.upload(logits).map_err(s)?;
    let b = match bias {
        Some(b) => Some(dev.upload(b).map_err(s)?),
        None => None,
    };
    let mut ids: DeviceBuffer<i32> = dev.alloc(tokens * cfg.top_k).map_err(s)?;
    let mut w: DeviceBuffer<f32> = dev.alloc(tokens * cfg.top_k).map_err(s)?;
    let mut flags = ops.alloc_flags().map_err(s)?;
    ops.prepare_router(RouterArgs {
        cfg: *cfg,
        tokens,
        logits: &l,
        bias: b.as_ref(),
        topk_ids: &mut ids,
        topk_weights: &mut w,
        flags: &mut flags,
    })
    .and_then(|p| p.launch())
    .map_err(s)?;
    let flags = ops.read_flags(&flags).map_err(s)?;
    Ok((
        dev.download(&ids).map_err(s)?,
        dev.download(&w).map_err(s)?,
        flags.into_result(),
    ))
}

/// GPU routing == route_host: ids exactly, weights within 4 ulp.
fn check_routing(
    ops: &MoeOps,
    cfg: &RouterConfig,
    logits: &[f32],
    bias: Option<&[f32]>,
    tokens: usize,
    what: &str,
) -> Result<(), String> {
    let (ids, w, flags) = route_on_gpu(ops, cfg, logits, bias, tokens)?;
    let want = route_host(cfg, logits, bias, tokens);
    assert_eq!(
        flags.is_ok(),
        want.flags.is_clear(),
        "{what}: flags {flags:?} vs {:?}",
        want.flags
    );
    for t in 0..tokens {
        let r = t * cfg.top_k..(t + 1) * cfg.top_k;
        if ids[r.clone()] != want.ids[r.clone()] {
            return Err(format!(
                "{what}: token {t}: GPU chose {:?}, CPU {:?}",
                &ids[r.clone()],
                &want.ids[r]
            ));
        }
        for i in r {
            let tol = 4.0 * f32::EPSILON * want.weights[i].abs();
            if (w[i] - want.weights[i]).abs() > tol {
                return Err(format!(
                    "{what}: token {t}: weight {} vs CPU {}",
                    w[i], want.weights[i]
                ));
            }
        }
    }
    Ok(())
}

#[test]
fn router_matches_cpu_on_random_logits() {
    let Some(ops) = gpu("router_matches_cpu_on_random_logits") else {
        return;
    };
    let configs = [
        deepseek_router(),
        // r1-heads and small-odd fixtures.
        RouterConfig {
            experts: 8,
            n_group: 4,
            topk_group: 2,
            top_k: 2,
            normalize: true,
            scaling: 2.5,
        },
        RouterConfig {
            experts: 16,
            n_group: 4,
            topk_group: 2,
            top_k: 4,
            normalize: true,
            scaling: 2.5,
        },
        // One group, no normalization, odd sizes.
        RouterConfig {
            experts: 60,
            n_group: 1,
            topk_group: 1,
            top_k: 6,
            normalize: false,
            scaling: 1.0,
        },
        RouterConfig {
            experts: 512,
            n_group: 16,
            topk_group: 3,
            top_k: 32,
            normalize: true,
            scaling: 16.0,
        },
    ];
    let mut rng = Rng::new(11);
    for cfg in configs {
        for tokens in [1, 3, 300] {
            let logits: Vec<f32> = (0..tokens * cfg.experts)
                .map(|_| rng.normal() * 3.0)
                .collect();
            let bias: Vec<f32> = (0..cfg.experts).map(|_| rng.normal() * 0.05).collect();
            let what = format!("{cfg:?} x {tokens}");
            check_routing(ops, &cfg, &logits, Some(&bias), tokens, &what).unwrap();
            check_routing(
                ops,
                &cfg,
                &logits,
                None,
                tokens,
                &format!("{what}, no bias"),
            )
            .unwrap();
        }
    }
}

#[test]
fn router_adversarial_ties() {
    let Some(ops) = gpu("router_adversarial_ties") else {
        return;
    };
    let cfg = deepseek_router();
    let e = cfg.experts;
    let mut cases: Vec<(String, Vec<f32>, Vec<f32>)> = Vec::new();
    cases.push(("all equal".into(), vec![0.0; e], vec![0.0; e]));
    cases.push((
        "all saturated (sigmoid == 1)".into(),
        vec![60.0; e],
        vec![0.0; e],
    ));
    cases.push(("all -inf".into(), vec![f32::NEG_INFINITY; e], vec![0.0; e]));
    cases.push((
        "+inf and -inf".into(),
        (0..e)
            .map(|i| {
                if i % 3 == 0 {
                    f32::INFINITY
                } else {
                    f32::NEG_INFINITY
                }
            })
            .collect(),
        vec![0.0; e],
    ));
    // Equal groups, duplicated values inside groups, bias exactly cancelling differences.
    cases.push((
        "periodic groups".into(),
        (0..e).map(|i| (i % 32) as f32 * 0.25 - 4.0).collect(),
        vec![0.0; e],
    ));
    cases.push((
        "pairs".into(),
        (0..e).map(|i| ((i / 2) % 5) as f32).collect(),
        vec![0.0; e],
    ));
    let logits: Vec<f32> = (0..e).map(|i| (i % 7) as f32 * 0.5).collect();
    let bias: Vec<f32> = logits
        .iter()
        .map(|&l| -numerics::sigmoid(l) + 0.25)
        .collect();
    cases.push(("bias flattens choice".into(), logits, bias));
    // Group scores tie but single experts do not.
    cases.push((
        "tied group sums".into(),
        (0..e)
            .map(|i| {
                if i % 32 == 0 {
                    2.0
                } else if i % 32 == 1 {
                    -2.0
                } else {
                    -9.0
                }
            })
            .collect(),
        vec![0.0; e],
    ));
    for (name, logits, bias) in &cases {
        check_routing(ops, &cfg, logits, Some(bias), 1, name).unwrap();
        let (ids, _, _) = route_on_gpu(ops, &cfg, logits, Some(bias), 1).unwrap();
        let mut sorted = ids.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), cfg.top_k, "{name}: duplicate experts {ids:?}");
    }
    // All equal: the lowest indices of the lowest groups.
    let (ids, w, _) = route_on_gpu(ops, &cfg, &vec![0.0; e], None, 1).unwrap();
    assert_eq!(ids, (0..8).collect::<Vec<i32>>());
    assert!(w.iter().all(|&x| x == 2.5 / 8.0), "{w:?}");
    // top_k larger than the kept groups hold: the rest come from -inf in index order.
    let narrow = RouterConfig {
        experts: 16,
        n_group: 8,
        topk_group: 1,
        top_k: 4,
        normalize: true,
        scaling: 1.0,
    };
    let l: Vec<f32> = (0..16).map(|i| if i == 9 { 3.0 } else { 0.0 }).collect();
    check_routing(ops, &narrow, &l, None, 1, "top_k > kept experts").unwrap();
    let (ids, _, _) = route_on_gpu(ops, &narrow, &l, None, 1).unwrap();
    assert_eq!(&ids[..2], &[9, 8]);
}

#[test]
fn router_nan_is_an_error_not_garbage() {
    let Some(ops) = gpu("router_nan_is_an_error_not_garbage") else {
        return;
    };
    let cfg = deepseek_router();
    let mut rng = Rng::new(5);
    let tokens = 6;
    let mut logits: Vec<f32> = (0..tokens * cfg.experts).map(|_| rng.normal()).collect();
    logits[2 * cfg.experts + 77] = f32::NAN;
    logits[4 * cfg.experts] = f32::NAN;
    let (ids, w, flags) = route_on_gpu(ops, &cfg, &logits, None, tokens).unwrap();
    let err = flags.unwrap_err().to_string();
    assert!(
        err.contains("NaN in the MoE router input of 2 token(s) (first: token 2)"),
        "{err}"
    );
    for t in [2, 4] {
        assert!(ids[t * 8..t * 8 + 8].iter().all(|&i| i == -1));
        assert!(w[t * 8..t * 8 + 8].iter().all(|&x| x == 0.0));
    }
    check_routing(ops, &cfg, &logits, None, tokens, "NaN tokens").unwrap();
    // A NaN bias entry poisons every token's choice.
    let mut bias = vec![0.0; cfg.experts];
    bias[3] = f32::NAN;
    let (_, _, flags) = route_on_gpu(ops, &cfg, &logits[..cfg.experts], Some(&bias), 1).unwrap();
    assert!(flags.is_err());
}

#[test]
fn router_logits_bit_exact() {
    let Some(ops) = gpu("router_logits_bit_exact") else {
        return;
    };
    let dev = ops.device();
    let mut rng = Rng::new(3);
    for (tokens, experts, hidden) in [(1, 256, 7168), (5, 8, 256), (130, 256, 1024), (3, 100, 64)] {
        let x = activations(&mut rng, tokens, hidden);
        let w: Vec<bf16> = (0..experts * hidden)
            .map(|_| bf16::from_f32(rng.normal() * 0.02))
            .collect();
        let xd = dev.upload(&x).unwrap();
        let wd = dev.upload(&w).unwrap();
        let mut l: DeviceBuffer<f32> = dev.alloc(tokens * experts).unwrap();
        ops.prepare_router_logits(RouterLogitsArgs {
            x: &xd,
            ldx: hidden,
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
        let want = router_logits_host(&x, &w, tokens, hidden);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(
                g.to_bits(),
                w.to_bits(),
                "[{tokens}x{experts}x{hidden}] logit {i}: {g} vs CPU {w}"
            );
        }
    }
}

// ------------------------------------------------------------------------------------------
// Permutation
// ------------------------------------------------------------------------------------------

fn plan_on_gpu(
    ops: &MoeOps,
    ids: &[i32],
    geom: MoeGeometry,
    tokens: usize,
) -> (
    MoePlanBuffers,
    r1_runtime::cuda::ops::PlanHost,
    DeviceBuffer<i32>,
) {
    let dev = ops.device();
    let ids_d = dev.upload(ids).unwrap();
    let mut plan = MoePlanBuffers::alloc(dev, geom).unwrap();
    let mut flags = ops.alloc_flags().unwrap();
    ops.prepare_plan(PlanArgs {
        tokens,
        topk_ids: &ids_d,
        plan: &mut plan,
        flags: &mut flags,
    })
    .unwrap()
    .launch()
    .unwrap();
    let mut host = plan.download(dev).unwrap();
    host.flags = ops.read_flags(&flags).unwrap();
    (plan, host, ids_d)
}

#[test]
fn plan_matches_host_model() {
    let Some(ops) = gpu("plan_matches_host_model") else {
        return;
    };
    let mut rng = Rng::new(21);
    let mut cases: Vec<(usize, usize, usize, Vec<i32>)> = Vec::new();
    for (tokens, top_k, experts) in [
        (1, 8, 256),
        (32, 8, 256),
        (128, 8, 256),
        (1000, 8, 256),
        (7, 2, 8),
        (300, 4, 16),
    ] {
        cases.push((
            tokens,
            top_k,
            experts,
            route_ids(&mut rng, tokens, top_k, experts, None),
        ));
        cases.push((
            tokens,
            top_k,
            experts,
            route_ids(&mut rng, tokens, top_k, experts / 2, Some(experts - 1)),
        ));
    }
    // Every token on experts 0..top_k (one hot block, many empty experts).
    cases.push((200, 8, 256, (0..200 * 8).map(|i| i % 8).collect()));
    for (tokens, top_k, experts, ids) in &cases {
        let layouts = [
            MoeLayout::Contiguous,
            MoeLayout::Masked {
                max_tokens_per_expert: *tokens,
            },
        ];
        for layout in layouts {
            let geom = MoeGeometry {
                tokens: *tokens,
                top_k: *top_k,
                experts: *experts,
                layout,
            };
            for t in [*tokens, tokens.div_ceil(2)] {
                let (_, got, _) = plan_on_gpu(ops, ids, geom, t);
                let want = plan_host(ids, &geom, t);
                assert_eq!(got.counts, want.counts, "{geom:?} tokens {t}: counts");
                assert_eq!(
                    got.dest_row[..t * top_k],
                    want.dest_row[..],
                    "{geom:?} tokens {t}: dest_row"
                );
                assert_eq!(
                    got.block_expert, want.block_expert,
                    "{geom:?}: block_expert"
                );
                assert_eq!(got.block_rows, want.block_rows, "{geom:?}: block_rows");
                assert_eq!(got.num_blocks, want.num_blocks, "{geom:?}: num_blocks");
                assert!(got.flags.is_clear(), "{:?}", got.flags);
            }
        }
    }
    // Masked overflow and bad ids are flagged, never written out of bounds.
    let geom = MoeGeometry {
        tokens: 64,
        top_k: 2,
        experts: 4,
        layout: MoeLayout::Masked {
            max_tokens_per_expert: 8,
        },
    };
    let mut ids = route_ids(&mut rng, 64, 2, 4, Some(0));
    ids[5] = 99;
    let (_, got, _) = plan_on_gpu(ops, &ids, geom, 64);
    let want = plan_host(&ids, &geom, 64);
    assert_eq!(got.dest_row, want.dest_row);
    assert_eq!(
        (got.flags.dropped, got.flags.bad_ids),
        (want.flags.dropped, want.flags.bad_ids)
    );
    let e = got.flags.into_result().unwrap_err().to_string();
    assert!(
        e.contains("dropped") && e.contains("outside the layer"),
        "{e}"
    );
}

/// gather puts every token's codes and scales on its entries' rows; unpermute of rows holding
/// x[t] with weights 1/K gives x back exactly (K a power of two); both match the host models.
#[test]
fn permutation_round_trip() {
    let Some(ops) = gpu("permutation_round_trip") else {
        return;
    };
    let dev = ops.device();
    let mut rng = Rng::new(8);
    for (tokens, top_k, experts, hidden, masked) in [
        (1, 8, 256, 7168, true),
        (37, 4, 16, 512, false),
        (300, 8, 256, 256, false),
        (64, 2, 8, 384, true),
    ] {
        let layout = if masked {
            MoeLayout::Masked {
                max_tokens_per_expert: tokens,
            }
        } else {
            MoeLayout::Contiguous
        };
        let geom = MoeGeometry {
            tokens,
            top_k,
            experts,
            layout,
        };
        let ids = route_ids(&mut rng, tokens, top_k, experts, (tokens > 10).then_some(3));
        let (plan, host, ids_d) = plan_on_gpu(ops, &ids, geom, tokens);
        let x = activations(&mut rng, tokens, hidden);
        let q = numerics::act_quant(&widen(&x), hidden);
        let xq = QuantizedActivations::upload(dev, &q).unwrap();
        let mut rows = PermutedRows::alloc(dev, &geom, hidden).unwrap();
        dev.memset(&mut rows.q, 0x7F).unwrap();
        ops.prepare_gather(GatherArgs {
            tokens,
            x: &xq,
            plan: &plan,
            out: &mut rows,
        })
        .unwrap()
        .launch()
        .unwrap();
        let aq = dev.download(&rows.q).unwrap();
        let sa = dev.download(&rows.scales).unwrap();
        let kb = hidden / QUANT_BLOCK;
        let mut used = vec![false; geom.rows()];
        for (i, &r) in host.dest_row.iter().enumerate() {
            let (t, r) = (i / top_k, r as usize);
            used[r] = true;
            assert_eq!(
                &aq[r * hidden..(r + 1) * hidden],
                &q.codes[t * hidden..(t + 1) * hidden],
                "entry {i} row {r}"
            );
            for b in 0..kb {
                assert_eq!(
                    sa[b * geom.r_pad() + r],
                    q.scales[t * kb + b],
                    "entry {i} scale {b}"
                );
            }
        }
        for (r, u) in used.iter().enumerate() {
            if !u {
                assert!(
                    aq[r * hidden..(r + 1) * hidden].iter().all(|&c| c == 0x7F),
                    "unused row {r} written"
                );
            }
        }
        // Back: y rows = x of the entry's token, weights 1/K.
        let mut y = vec![bf16::from_f32(f32::NAN); geom.rows() * hidden];
        for (i, &r) in host.dest_row.iter().enumerate() {
            let t = i / top_k;
            y[r as usize * hidden..(r as usize + 1) * hidden]
                .copy_from_slice(&x[t * hidden..(t + 1) * hidden]);
        }
        let w = vec![1.0 / top_k as f32; tokens * top_k];
        let yd = dev.upload(&y).unwrap();
        let wd = dev.upload(&w).unwrap();
        let shared: Vec<bf16> = activations(&mut rng, tokens, hidden);
        let sd = dev.upload(&shared).unwrap();
        for with_shared in [false, true] {
            let mut out: DeviceBuffer<bf16> = dev.alloc(tokens * hidden).unwrap();
            ops.prepare_unpermute(UnpermuteArgs {
                tokens,
                top_k,
                n: hidden,
                y: &yd,
                ldy: hidden,
                rows: geom.rows(),
                dest_row: &plan.dest_row,
                topk_ids: &ids_d,
                topk_weights: &wd,
                shared: with_shared.then_some((&sd, hidden)),
                out: &mut out,
                ldo: hidden,
            })
            .unwrap()
            .launch()
            .unwrap();
            let got = widen(&dev.download(&out).unwrap());
            let sf = widen(&shared);
            let want = unpermute_host(
                |r, c| y[r * hidden + c].to_f32(),
                &host.dest_row,
                &ids,
                &w,
                with_shared.then_some(&sf[..]),
                tokens,
                top_k,
                hidden,
            );
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(
                    g.to_bits(),
                    w.to_bits(),
                    "unpermute (shared {with_shared}) [{i}]: {g} vs {w}"
                );
            }
            if !with_shared {
                assert_eq!(got, widen(&x), "round trip");
            }
        }
    }
}

#[test]
fn silu_quant_matches_host_model() {
    let Some(ops) = gpu("silu_quant_matches_host_model") else {
        return;
    };
    let dev = ops.device();
    let mut rng = Rng::new(4);
    for (rows, inter, mapped) in [
        (1, 2048, false),
        (70, 256, false),
        (300, 128, true),
        (40, 2048, true),
    ] {
        let ldg = 2 * inter;
        let mut gu = activations(&mut rng, rows, ldg);
        // SiLU's interesting range: large negative/positive gates, exact zeros.
        for (i, v) in gu.iter_mut().enumerate().step_by(7) {
            *v = bf16::from_f32(match i % 3 {
                0 => -30.0,
                1 => 0.0,
                _ => 17.0,
            });
        }
        let map: Vec<i32> = if mapped {
            (0..rows as i32).rev().filter(|r| r % 3 != 1).collect()
        } else {
            (0..rows as i32).collect()
        };
        let items = map.len();
        let gud = dev.upload(&gu).unwrap();
        let mapd = dev.upload(&map).unwrap();
        let m_pad = act_scale_m_pad(rows);
        let mut q: DeviceBuffer<u8> = dev.alloc(rows * inter).unwrap();
        dev.memset(&mut q, 0x7F).unwrap();
        let mut sc: DeviceBuffer<f32> = dev.alloc_zeros((inter / 128) * m_pad).unwrap();
        ops.prepare_silu_quant(SiluQuantArgs {
            rows,
            items,
            rows_map: mapped.then_some(&mapd),
            inter,
            gu: &gud,
            ldg,
            up_offset: inter,
            q: &mut q,
            ldq: inter,
            scales: &mut sc,
            m_pad,
        })
        .unwrap()
        .launch()
        .unwrap();
        let got_q = dev.download(&q).unwrap();
        let got_s = dev.download(&sc).unwrap();
        let want = silu_quant_host(&gu, rows, inter, ldg, inter);
        let kb = inter / 128;
        for r in 0..rows {
            let live = map.contains(&(r as i32));
            let row = &got_q[r * inter..(r + 1) * inter];
            if live {
                assert_eq!(
                    row,
                    &want.codes[r * inter..(r + 1) * inter],
                    "row {r} codes"
                );
                for b in 0..kb {
                    assert_eq!(
                        got_s[b * m_pad + r].to_bits(),
                        want.scales[r * kb + b].to_bits(),
                        "row {r} scale {b}"
                    );
                }
            } else {
                assert!(row.iter().all(|&c| c == 0x7F), "unmapped row {r} written");
            }
        }
    }
}

// ------------------------------------------------------------------------------------------
// Grouped GEMMs
// ------------------------------------------------------------------------------------------

/// One grouped GEMM problem on the device: ids -> plan -> gather -> GEMM.
struct GroupedProblem {
    geom: MoeGeometry,
    tokens: usize,
    ids: Vec<i32>,
    a: QuantizedRows,
    codes: Vec<u8>,
    scales: Vec<f32>,
    n: usize,
    k: usize,
}

impl GroupedProblem {
    #[allow(clippy::too_many_arguments)]
    fn new(
        rng: &mut Rng,
        tokens: usize,
        top_k: usize,
        experts: usize,
        n: usize,
        k: usize,
        layout: MoeLayout,
        live: usize,
        hot: Option<usize>,
    ) -> Self {
        let ids = route_ids(rng, tokens, top_k, live, hot);
        let a = numerics::act_quant(&widen(&activations(rng, tokens, k)), k);
        let (codes, scales) = fp8_weights(rng, experts, n, k);
        GroupedProblem {
            geom: MoeGeometry {
                tokens,
                top_k,
                experts,
                layout,
            },
            tokens,
            ids,
            a,
            codes,
            scales,
            n,
            k,
        }
    }

    fn expert(&self, e: usize) -> (&[u8], &[f32]) {
        expert_weight(&self.codes, &self.scales, e, self.n, self.k)
    }

    /// Runs `kernel`; returns (kernel that ran, D [R][n] downloaded, dest_row).
    fn run(
        &self,
        ops: &MoeOps,
        kernel: GroupedGemmKernel,
    ) -> (GroupedGemmKernel, Vec<bf16>, Vec<i32>) {
        let dev = ops.device();
        let (plan, host, ids_d) = plan_on_gpu(ops, &self.ids, self.geom, self.tokens);
        let xq = QuantizedActivations::upload(dev, &self.a).unwrap();
        let mut rows = PermutedRows::alloc(dev, &self.geom, self.k).unwrap();
        ops.prepare_gather(GatherArgs {
            tokens: self.tokens,
            x: &xq,
            plan: &plan,
            out: &mut rows,
        })
        .unwrap()
        .launch()
        .unwrap();
        let w = GroupedFp8Weight::upload(
            dev,
            &self.codes,
            &self.scales,
            self.geom.experts,
            self.n,
            self.k,
        )
        .unwrap();
        let mut d: DeviceBuffer<bf16> = dev.alloc(self.geom.rows() * self.n).unwrap();
        dev.memset(&mut d, 0xFF).unwrap();
        let p = ops
            .prepare_grouped_gemm(
                GroupedGemmArgs {
                    tokens: self.tokens,
                    a: &rows,
                    w: &w,
                    topk_ids: &ids_d,
                    plan: &plan,
                    d: &mut d,
                    ldd: self.n,
                },
                kernel,
            )
            .unwrap();
        let ran = p.kernel();
        p.launch().unwrap();
        (ran, dev.download(&d).unwrap(), host.dest_row)
    }

    /// Every row not used by an entry still holds the 0xFFFF sentinel.
    fn check_unused_rows(&self, d: &[bf16], dest: &[i32], what: &str) {
        let mut used = vec![false; self.geom.rows()];
        for &r in dest {
            used[r as usize] = true;
        }
        for (r, u) in used.iter().enumerate() {
            if !u {
                assert!(
                    d[r * self.n..(r + 1) * self.n]
                        .iter()
                        .all(|v| v.to_bits() == 0xFFFF),
                    "{what}: unused row {r} written"
                );
            }
        }
    }
}

/// moe_gemm_ref == a CPU loop in its order (per K-block sequential fmaf, acc = fmaf(part,
/// sa * sb, acc)), every entry's row; unused rows untouched.
#[test]
fn grouped_gemm_ref_bit_exact() {
    let Some(ops) = gpu("grouped_gemm_ref_bit_exact") else {
        return;
    };
    let mut rng = Rng::new(31);
    for (tokens, top_k, experts, n, k, masked) in [
        (9, 2, 8, 200, 300, false),
        (50, 4, 16, 256, 256, true),
        (1, 8, 256, 128, 128, true),
    ] {
        let layout = if masked {
            MoeLayout::Masked {
                max_tokens_per_expert: tokens,
            }
        } else {
            MoeLayout::Contiguous
        };
        let p = GroupedProblem::new(
            &mut rng,
            tokens,
            top_k,
            experts,
            n,
            k,
            layout,
            experts / 2,
            Some(1),
        );
        let (ran, d, dest) = p.run(ops, GroupedGemmKernel::Reference);
        assert_eq!(ran, GroupedGemmKernel::Reference);
        p.check_unused_rows(&d, &dest, "moe_gemm_ref");
        let kb = k.div_ceil(128);
        for (i, &r) in dest.iter().enumerate() {
            let (t, e) = (i / top_k, p.ids[i] as usize);
            let (wc, ws) = p.expert(e);
            let (arow, sa) = (&p.a.codes[t * k..][..k], &p.a.scales[t * kb..][..kb]);
            for j in 0..n {
                let acc = ref_kernel_dot(arow, &wc[j * k..][..k], sa, &ws[(j / 128) * kb..][..kb]);
                let g = d[r as usize * n + j];
                assert_eq!(
                    g.to_bits(),
                    bf16::from_f32(acc).to_bits(),
                    "entry {i} (token {t}, expert {e}) col {j}"
                );
            }
        }
    }
}

/// The wgmma grouped GEMMs vs `block_gemm_w8a8` on every entry (or a sample for big shapes).
fn check_grouped_fast(
    ops: &MoeOps,
    p: &GroupedProblem,
    kernel: GroupedGemmKernel,
    sample: Option<usize>,
    what: &str,
) {
    let (ran, d, dest) = p.run(ops, kernel);
    if kernel != GroupedGemmKernel::Auto {
        assert_eq!(ran, kernel, "{what}");
    }
    p.check_unused_rows(&d, &dest, what);
    let entries: Vec<usize> = match sample {
        Some(s) => (0..dest.len())
            .step_by(dest.len().div_ceil(s).max(1))
            .collect(),
        None => (0..dest.len()).collect(),
    };
    let n = p.n;
    let results: Vec<Result<(), String>> = entries
        .par_iter()
        .map(|&i| {
            let (t, e) = (i / p.geom.top_k, p.ids[i] as usize);
            let (wc, ws) = p.expert(e);
            let want = w8a8_row(&p.a, t, wc, ws, n);
            let r = dest[i] as usize;
            let got = widen(&d[r * n..(r + 1) * n]);
            check_close(
                &got,
                &want,
                TOLERANCE,
                &format!("{what} ({}) entry {i} token {t} expert {e}", ran.name()),
            )
        })
        .collect();
    for r in results {
        r.unwrap();
    }
}

#[test]
fn grouped_gemm_wgmma_vs_cpu_w8a8() {
    let Some(ops) = gpu("grouped_gemm_wgmma_vs_cpu_w8a8") else {
        return;
    };
    use GroupedGemmKernel as K;
    let mut rng = Rng::new(77);
    // (tokens, top_k, experts, n, k, live experts, hot expert)
    let shapes = [
        (1, 8, 256, 256, 256, 256, None),
        (7, 2, 8, 256, 384, 8, None),
        (100, 4, 16, 512, 256, 8, Some(15)), // experts 8..14 empty, 15 hot
        (300, 8, 32, 384, 512, 32, Some(0)), // hot expert spans 3 blocks
        (64, 1, 4, 128, 128, 1, None),       // one expert takes everything
    ];
    for (tokens, top_k, experts, n, k, live, hot) in shapes {
        let what =
            format!("[T={tokens} K={top_k} E={experts} N={n} K={k} live={live} hot={hot:?}]");
        let p = GroupedProblem::new(
            &mut rng,
            tokens,
            top_k,
            experts,
            n,
            k,
            MoeLayout::Contiguous,
            live,
            hot,
        );
        check_grouped_fast(ops, &p, K::ContigWgmma, None, &format!("contig {what}"));
        let masked = MoeLayout::Masked {
            max_tokens_per_expert: tokens,
        };
        let p = GroupedProblem {
            geom: MoeGeometry {
                layout: masked,
                ..p.geom
            },
            ..p
        };
        for kernel in [K::MaskedWgmma, K::MaskedWgmmaM64, K::Auto] {
            check_grouped_fast(ops, &p, kernel, None, &format!("masked {what}"));
        }
    }
}

/// DeepSeek-V3's expert shapes, gate+up (4096, 7168) and down (7168, 2048), on 8 experts.
#[test]
fn grouped_gemm_deepseek_shapes() {
    let Some(ops) = gpu("grouped_gemm_deepseek_shapes") else {
        return;
    };
    use GroupedGemmKernel as K;
    let mut rng = Rng::new(99);
    for (n, k) in [(4096, 7168), (7168, 2048)] {
        let p = GroupedProblem::new(&mut rng, 96, 2, 8, n, k, MoeLayout::Contiguous, 6, Some(2));
        check_grouped_fast(
            ops,
            &p,
            K::ContigWgmma,
            Some(24),
            &format!("contig N={n} K={k}"),
        );
        let p = GroupedProblem {
            geom: MoeGeometry {
                layout: MoeLayout::Masked {
                    max_tokens_per_expert: 96,
                },
                ..p.geom
            },
            ..p
        };
        check_grouped_fast(
            ops,
            &p,
            K::MaskedWgmmaM64,
            Some(24),
            &format!("masked m64 N={n} K={k}"),
        );
        check_grouped_fast(
            ops,
            &p,
            K::MaskedWgmma,
            Some(24),
            &format!("masked N={n} K={k}"),
        );
    }
}

// ------------------------------------------------------------------------------------------
// The whole block vs cpu::moe::MoeCall (+ shared expert) on the r1-heads fixture
// ------------------------------------------------------------------------------------------

struct Fixture {
    cfg: ModelConfig,
    weights: ModelWeights,
    layer: usize,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = common::fixture("r1-heads");
        let cfg = ModelConfig::from_dir(&dir).expect("fixture config");
        let ckpt = Checkpoint::open(&dir).expect("fixture checkpoint");
        let weights = ModelWeights::load(&ckpt, &cfg, false).expect("fixture weights");
        let layer = (0..cfg.num_hidden_layers)
            .find(|&l| cfg.is_moe_layer(l))
            .expect("a MoE layer");
        Fixture {
            cfg,
            weights,
            layer,
        }
    })
}

/// The CPU w8a8 block: bf16(bf16(MoeCall) + shared MLP) as the graph computes it, and the
/// CPU's routing of each token.
fn cpu_block(f: &Fixture, x: &[f32]) -> (Vec<f32>, Vec<Vec<usize>>) {
    let FfnWeights::Moe(moe) = &f.weights.blocks[f.layer].ffn else {
        unreachable!()
    };
    let h = f.cfg.hidden_size;
    let router = f.cfg.router();
    let Weight::Dense { data: bias, .. } = f.weights.get(moe.bias) else {
        unreachable!()
    };
    let Weight::Dense { data: rw, .. } = f.weights.get(moe.router) else {
        unreachable!()
    };
    let call = MoeCall {
        weights: &f.weights,
        router: &router,
        router_weight: f.weights.get(moe.router),
        bias,
        experts: &moe.experts,
        hidden: h,
        precision: Precision::W8a8,
    };
    let routed: Vec<f32> = call
        .run(x)
        .expect("cpu moe")
        .into_iter()
        .map(round_bf16)
        .collect();
    let round = |v: Vec<f32>| -> Vec<f32> { v.into_iter().map(round_bf16).collect() };
    let out = match &moe.shared {
        Some(s) => {
            let g = round(linear(x, f.weights.get(s.gate), Precision::W8a8));
            let u = round(linear(x, f.weights.get(s.up), Precision::W8a8));
            let act = round(
                g.iter()
                    .zip(&u)
                    .map(|(&g, &u)| numerics::silu(g) * u)
                    .collect(),
            );
            let d = round(linear(&act, f.weights.get(s.down), Precision::W8a8));
            routed
                .iter()
                .zip(&d)
                .map(|(&a, &b)| round_bf16(a + b))
                .collect()
        }
        None => routed,
    };
    let routes = x
        .chunks(h)
        .map(|xt| {
            let logits: Vec<f32> = rw.chunks(h).map(|w| numerics::dot(xt, w)).collect();
            router
                .route(&logits, bias)
                .into_iter()
                .map(|(e, _)| e)
                .collect()
        })
        .collect();
    (out, routes)
}

fn block_weights(ops: &MoeOps) -> (MoeBlockConfig, MoeBlockWeights) {
    let f = fixture();
    let FfnWeights::Moe(moe) = &f.weights.blocks[f.layer].ffn else {
        unreachable!()
    };
    let cfg = moe_block_config(&f.cfg);
    let w = upload_moe_block(ops.device(), &cfg, &f.weights, moe).unwrap();
    (cfg, w)
}

/// Runs the block; returns (out bf16 as f32, GPU routing per token, take_errors result).
fn gpu_block(
    ops: &MoeOps,
    cfg: MoeBlockConfig,
    w: &MoeBlockWeights,
    x: &[bf16],
    tokens: usize,
    layout: MoeLayout,
    path: MoeGemmPath,
) -> (Vec<f32>, Vec<Vec<usize>>, Result<(), CudaError>) {
    let dev = ops.device();
    let h = cfg.hidden;
    let mut ws = MoeWorkspace::new(dev, cfg, tokens, layout, path).unwrap();
    let xd = dev.upload(x).unwrap();
    let mut out: DeviceBuffer<bf16> = dev.alloc(tokens * h).unwrap();
    ops.moe_forward(&mut ws, w, &xd, tokens, &mut out).unwrap();
    let got = widen(&dev.download(&out).unwrap());
    let ids = dev.download(&ws.topk_ids).unwrap();
    let k = cfg.router.top_k;
    let routes = (0..tokens)
        .map(|t| {
            ids[t * k..(t + 1) * k]
                .iter()
                .map(|&e| e as usize)
                .collect()
        })
        .collect();
    let errors = ws.take_errors(ops);
    (got, routes, errors)
}

#[test]
fn moe_block_matches_cpu_moecall() {
    let Some(ops) = gpu("moe_block_matches_cpu_moecall") else {
        return;
    };
    let f = fixture();
    let (cfg, w) = block_weights(ops);
    let h = cfg.hidden;
    let mut rng = Rng::new(2024);
    for tokens in [1, 5, 40, 200] {
        let x = activations(&mut rng, tokens, h);
        let (want, cpu_routes) = cpu_block(f, &widen(&x));
        let layouts = [
            MoeLayout::Contiguous,
            MoeLayout::Masked {
                max_tokens_per_expert: tokens,
            },
        ];
        for layout in layouts {
            for path in [MoeGemmPath::Fast, MoeGemmPath::Reference] {
                let what = format!("tokens {tokens} {layout:?} {path:?}");
                let (got, routes, errors) = gpu_block(ops, cfg, &w, &x, tokens, layout, path);
                errors.unwrap();
                assert_eq!(routes, cpu_routes, "{what}: routing");
                for t in 0..tokens {
                    check_close(
                        &got[t * h..(t + 1) * h],
                        &want[t * h..(t + 1) * h],
                        BLOCK_TOLERANCE,
                        &format!("{what} token {t}"),
                    )
                    .unwrap();
                }
            }
        }
    }
}

/// A MoE layer of random weights, host copies kept for the CPU reference: router bf16 `[E][H]`,
/// bias, experts' gate+up `[E][2I][H]` (gate rows then up rows) and down `[E][H][I]`, one
/// shared expert (`[2 Is][H]`, `[H][Is]`).
struct RandomMoeLayer {
    cfg: MoeBlockConfig,
    router: Vec<bf16>,
    bias: Vec<f32>,
    gate_up: (Vec<u8>, Vec<f32>),
    down: (Vec<u8>, Vec<f32>),
    shared_gate_up: (Vec<u8>, Vec<f32>),
    shared_down: (Vec<u8>, Vec<f32>),
}

impl RandomMoeLayer {
    fn new(rng: &mut Rng, cfg: MoeBlockConfig, bias: Vec<f32>) -> Self {
        let (e, h, i, si) = (cfg.router.experts, cfg.hidden, cfg.inter, cfg.shared_inter);
        let router = (0..e * h)
            .map(|_| bf16::from_f32(rng.normal() * 0.05))
            .collect();
        RandomMoeLayer {
            cfg,
            router,
            bias,
            gate_up: fp8_weights(rng, e, 2 * i, h),
            down: fp8_weights(rng, e, h, i),
            shared_gate_up: fp8_weights(rng, 1, 2 * si, h),
            shared_down: fp8_weights(rng, 1, h, si),
        }
    }

    fn upload(&self, dev: &Device) -> MoeBlockWeights {
        let (e, h, i, si) = (
            self.cfg.router.experts,
            self.cfg.hidden,
            self.cfg.inter,
            self.cfg.shared_inter,
        );
        let grouped = |(codes, scales): &(Vec<u8>, Vec<f32>), n, k| {
            GroupedFp8Weight::upload(dev, codes, scales, e, n, k).unwrap()
        };
        let dense = |(codes, scales): &(Vec<u8>, Vec<f32>), n, k| {
            Fp8Weight::upload(dev, codes, scales, n, k).unwrap()
        };
        MoeBlockWeights {
            router: dev.upload(&self.router).unwrap(),
            bias: Some(dev.upload(&self.bias).unwrap()),
            gate_up: grouped(&self.gate_up, 2 * i, h),
            down: grouped(&self.down, h, i),
            shared: Some((
                dense(&self.shared_gate_up, 2 * si, h),
                dense(&self.shared_down, h, si),
            )),
        }
    }

    /// The CPU w8a8 block of one token as `cpu_block` computes it (`MoeCall`'s steps: per
    /// expert act_quant -> GEMM -> bf16 for gate and up, bf16(silu(gate) * up), act_quant ->
    /// down -> bf16; the weighted sum over experts in ascending order, bf16; + the shared
    /// expert's MLP, bf16), on this layer's weights and the token's CPU routing.
    fn cpu_token(&self, x: &[f32], route: &[(usize, f32)]) -> Vec<f32> {
        let (h, i, si) = (self.cfg.hidden, self.cfg.inter, self.cfg.shared_inter);
        let xq = numerics::act_quant(x, h);
        let mlp = |gate_up: (&[u8], &[f32]), down: (&[u8], &[f32]), inter: usize| {
            let gu = w8a8_row(&xq, 0, gate_up.0, gate_up.1, 2 * inter);
            let act: Vec<f32> = gu[..inter]
                .iter()
                .zip(&gu[inter..])
                .map(|(&g, &u)| round_bf16(numerics::silu(g) * u))
                .collect();
            w8a8_row(&numerics::act_quant(&act, inter), 0, down.0, down.1, h)
        };
        let mut by_expert = route.to_vec();
        by_expert.sort_by_key(|&(e, _)| e);
        let mut routed = vec![0f32; h];
        for (e, w) in by_expert {
            let y = mlp(
                expert_weight(&self.gate_up.0, &self.gate_up.1, e, 2 * i, h),
                expert_weight(&self.down.0, &self.down.1, e, h, i),
                i,
            );
            for (r, v) in routed.iter_mut().zip(y) {
                *r += w * v;
            }
        }
        let shared = mlp(
            (&self.shared_gate_up.0, &self.shared_gate_up.1),
            (&self.shared_down.0, &self.shared_down.1),
            si,
        );
        routed
            .iter()
            .zip(shared)
            .map(|(&r, s)| round_bf16(round_bf16(r) + s))
            .collect()
    }
}

/// DeepSeek-V3's routing at prefill scale on the contiguous layout: 4096 tokens, 256 experts in
/// 8 groups, top-4 groups, top-8, and expert 7 chosen by every token (its bias outweighs any
/// score), so one expert holds 4096 rows: the per-expert padding and the tile scheduler at
/// their extreme. GEMM dims are moderate (hidden 512, moe_intermediate 256, one shared expert)
/// so the CPU side stays short. Every token's routing equals the CPU router's; 64 tokens spread
/// over the batch match the CPU w8a8 block within [`BLOCK_TOLERANCE`].
#[test]
fn moe_deepseek_scale_contiguous() {
    let Some(ops) = gpu("moe_deepseek_scale_contiguous") else {
        return;
    };
    const TOKENS: usize = 4096;
    const HOT: usize = 7;
    let cfg = MoeBlockConfig {
        router: deepseek_router(),
        hidden: 512,
        inter: 256,
        shared_inter: 256,
    };
    let (e, h) = (cfg.router.experts, cfg.hidden);
    let mut rng = Rng::new(4096);
    // Choices are sigmoid + bias <= 1 + 0.01 elsewhere: +2 puts expert 7 first and its group
    // (experts 0..31) among the kept ones for every token.
    let mut bias: Vec<f32> = (0..e).map(|_| rng.normal() * 0.01).collect();
    bias[HOT] = 2.0;
    let layer = RandomMoeLayer::new(&mut rng, cfg, bias);
    // Logits of unit spread (router weights 0.05 x sqrt(512)): routing varies per token.
    let x = to_bf16(&(0..TOKENS * h).map(|_| rng.normal()).collect::<Vec<_>>());

    let w = layer.upload(ops.device());
    let (got, routes, errors) = gpu_block(
        ops,
        cfg,
        &w,
        &x,
        TOKENS,
        MoeLayout::Contiguous,
        MoeGemmPath::Fast,
    );
    errors.unwrap();

    let logits = router_logits_host(&x, &layer.router, TOKENS, h);
    let router = cfg.router.host();
    let cpu_routes: Vec<Vec<(usize, f32)>> = logits
        .par_chunks(e)
        .map(|l| router.route(l, &layer.bias))
        .collect();
    for (t, (gpu, cpu)) in routes.iter().zip(&cpu_routes).enumerate() {
        let cpu: Vec<usize> = cpu.iter().map(|&(e, _)| e).collect();
        assert_eq!(gpu, &cpu, "token {t}: routing");
        assert_eq!(cpu[0], HOT, "token {t}: the hot expert comes first");
    }

    let sample: Vec<usize> = (0..64).map(|s| s * (TOKENS - 1) / 63).collect();
    let results: Vec<Result<(), String>> = sample
        .par_iter()
        .map(|&t| {
            let want = layer.cpu_token(&widen(&x[t * h..(t + 1) * h]), &cpu_routes[t]);
            check_close(
                &got[t * h..(t + 1) * h],
                &want,
                BLOCK_TOLERANCE,
                &format!("DeepSeek routing scale, token {t}"),
            )
        })
        .collect();
    for r in results {
        r.unwrap();
    }
}

#[test]
fn moe_block_nan_input_is_an_error() {
    let Some(ops) = gpu("moe_block_nan_input_is_an_error") else {
        return;
    };
    let (cfg, w) = block_weights(ops);
    let mut x = activations(&mut Rng::new(6), 4, cfg.hidden);
    x[2 * cfg.hidden + 10] = bf16::from_f32(f32::NAN);
    for layout in [
        MoeLayout::Contiguous,
        MoeLayout::Masked {
            max_tokens_per_expert: 4,
        },
    ] {
        let (got, routes, errors) = gpu_block(ops, cfg, &w, &x, 4, layout, MoeGemmPath::Fast);
        let e = errors.unwrap_err().to_string();
        assert!(e.contains("first: token 2"), "{e}");
        assert!(
            routes[2].iter().all(|&r| r == usize::MAX),
            "token 2 routed to {:?}",
            routes[2]
        ); // ids -1
           // The other tokens are unaffected.
        for t in [0, 1, 3] {
            assert!(
                got[t * cfg.hidden..(t + 1) * cfg.hidden]
                    .iter()
                    .all(|v| v.is_finite()),
                "token {t}"
            );
        }
    }
}

/// moe_forward recorded into a CUDA graph and replayed equals the eager run bit for bit.
///
/// The capture runs on a `Device` of its own (`Device::open(0)` again: its own stream in the
/// same primary context). The other tests of this binary run on other threads and queue work on
/// the shared device's stream: a capture there would record their kernels into this graph, and
/// their synchronizations would break the capture. Thread-local capture mode keeps their driver
/// calls, on their own stream, legal while this thread captures.
#[test]
fn moe_block_is_capture_safe() {
    let Some(dev) = or_skip(Device::open(0), "moe_block_is_capture_safe") else {
        return;
    };
    let ops = &MoeOps::new(&dev);
    let (cfg, w) = block_weights(ops);
    let tokens = 16;
    let x = activations(&mut Rng::new(12), tokens, cfg.hidden);
    for layout in [
        MoeLayout::Contiguous,
        MoeLayout::Masked {
            max_tokens_per_expert: tokens,
        },
    ] {
        let (eager, _, errors) = gpu_block(ops, cfg, &w, &x, tokens, layout, MoeGemmPath::Fast);
        errors.unwrap();
        let mut ws = MoeWorkspace::new(&dev, cfg, tokens, layout, MoeGemmPath::Fast).unwrap();
        let xd = dev.upload(&x).unwrap();
        let mut out: DeviceBuffer<bf16> = dev.alloc_zeros(tokens * cfg.hidden).unwrap();
        dev.synchronize().unwrap();
        let stream = dev.stream();
        stream
            .begin_capture(
                cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
            )
            .unwrap();
        let queued = ops.moe_forward(&mut ws, &w, &xd, tokens, &mut out);
        let graph = stream
            .end_capture(cudarc::driver::sys::CUgraphInstantiate_flags(0))
            .unwrap()
            .expect("a graph");
        queued.unwrap();
        for _ in 0..3 {
            graph.launch().unwrap();
        }
        let replayed = widen(&dev.download(&out).unwrap());
        assert_eq!(
            replayed, eager,
            "{layout:?}: graph replay differs from the eager run"
        );
        ws.take_errors(ops).unwrap();
    }
}

/// The short case tools/gpu-suite runs under compute-sanitizer: the whole block, both layouts,
/// fast path, odd token count.
#[test]
fn sanitizer_smoke() {
    let Some(ops) = gpu("sanitizer_smoke") else {
        return;
    };
    let (cfg, w) = block_weights(ops);
    let tokens = 13;
    let x = activations(&mut Rng::new(13), tokens, cfg.hidden);
    let (want, _) = cpu_block(fixture(), &widen(&x));
    for layout in [
        MoeLayout::Contiguous,
        MoeLayout::Masked {
            max_tokens_per_expert: tokens,
        },
    ] {
        let (got, _, errors) = gpu_block(ops, cfg, &w, &x, tokens, layout, MoeGemmPath::Fast);
        errors.unwrap();
        check_close(
            &got,
            &want,
            BLOCK_TOLERANCE,
            &format!("sanitizer_smoke {layout:?}"),
        )
        .unwrap();
    }
    ops.device().synchronize().unwrap();
}

// ------------------------------------------------------------------------------------------
// Host side: runs everywhere
// ------------------------------------------------------------------------------------------

/// The fixture's MoE weights stack as the GPU wants them, and the block config checks pass.
#[test]
fn fixture_moe_layer_fits_the_gpu_path() {
    let f = fixture();
    let cfg = moe_block_config(&f.cfg);
    cfg.check().unwrap();
    let FfnWeights::Moe(moe) = &f.weights.blocks[f.layer].ffn else {
        unreachable!()
    };
    assert_eq!(moe.experts.len(), cfg.router.experts);
    // The CPU block runs (reference for the GPU test) and routes like the host model.
    let x: Vec<f32> = widen(&activations(&mut Rng::new(1), 3, cfg.hidden));
    let (out, routes) = cpu_block(f, &x);
    assert_eq!(out.len(), 3 * cfg.hidden);
    assert!(out.iter().all(|v| v.is_finite()));
    assert!(routes.iter().all(|r| r.len() == cfg.router.top_k));
}

/// Opening the MoE kernels never panics: without a device it is a typed error.
#[test]
fn moe_ops_report_typed_errors() {
    match Device::open(0) {
        Ok(dev) => {
            MoeOps::new(&dev);
        }
        Err(e) => {
            allow_no_device(&e);
            skipped(&e, "moe_ops_report_typed_errors: typed error checked");
        }
    }
}
