//! The model's types as the kernels' plain numbers: the routing and MoE-block shapes from
//! config.json, a MoE layer's weights from the loaded checkpoint, the RoPE table, a step's
//! MLA layout from the engine's batch, and synthetic weights as device fills.

use half::bf16;

use crate::config::ModelConfig;
use crate::cuda::error::{CudaError, Result};
use crate::cuda::ops::{
    Checker, ExpertWeight, Fp8Weight, GroupedFp8Weight, MlaLayout, MlaRope, MoeBlockConfig,
    MoeBlockWeights, RandomFill, RandomFillArgs, RouterConfig, MLA_PAGE_TOKENS, QUANT_BLOCK,
};
use crate::cuda::{Device, DeviceBuffer};
use crate::kv_cache::{Batch, PAGE_TOKENS};
use crate::model::weights::{
    MlpWeights, ModelWeights, MoeWeights, SyntheticValues, SyntheticWeight, Weight, WeightId,
    SCALE_STREAM,
};

// The engine's block ids go to the MLA kernels as page ids: both must page by the same size.
const _: () = assert!(MLA_PAGE_TOKENS == PAGE_TOKENS);

/// Errors of the MoE weight upload name the block as the GPU MoE path.
const BLOCK: &str = "moe_block";
/// Errors of synthetic weights name them.
const SYNTHETIC: &str = "synthetic weight";

/// DeepSeek-V3 / R1 routing from a parsed config.json.
pub fn router_config(cfg: &ModelConfig) -> RouterConfig {
    RouterConfig::from(&cfg.router())
}

/// A MoE layer's shape from a parsed config.json.
pub fn moe_block_config(cfg: &ModelConfig) -> MoeBlockConfig {
    MoeBlockConfig {
        router: router_config(cfg),
        hidden: cfg.hidden_size,
        inter: cfg.moe_intermediate_size,
        shared_inter: cfg.moe_intermediate_size * cfg.n_shared_experts,
    }
}

/// The model's RoPE table (YaRN-corrected inverse frequencies and cos/sin multiplier) on the
/// device.
pub fn upload_rope(dev: &Device, cfg: &ModelConfig) -> Result<MlaRope> {
    MlaRope::new(dev, &cfg.rope_inv_freq(), cfg.rope_attention_factor())
}

/// The MLA layout of an engine [`Batch`]: segment `s` brings `len` tokens at positions
/// `start_pos ..`, so its cache holds `start_pos + len` positions afterwards.
pub fn mla_layout(batch: &Batch) -> MlaLayout {
    MlaLayout {
        tables: batch.segments.iter().map(|s| s.blocks.clone()).collect(),
        kv_lens: batch.segments.iter().map(|s| s.start_pos + s.len).collect(),
        q_lens: batch.segments.iter().map(|s| s.len).collect(),
    }
}

fn fp8_parts<'a>(weights: &'a ModelWeights, id: WeightId) -> Result<ExpertWeight<'a>> {
    match weights.get(id) {
        Weight::Fp8(w) => Ok((w.codes.as_slice(), &w.scales)),
        Weight::Dense { .. } | Weight::Synthetic(_) => Err(CudaError::requirement(
            BLOCK,
            format!(
                "`{}` must be an FP8 weight for the GPU MoE path",
                weights.name(id)
            ),
        )),
    }
}

fn dense(weights: &ModelWeights, id: WeightId) -> Result<&[f32]> {
    match weights.get(id) {
        Weight::Dense { data, .. } => Ok(data),
        Weight::Fp8(_) | Weight::Synthetic(_) => Err(CudaError::requirement(
            BLOCK,
            format!("`{}` must be a BF16/F32 tensor", weights.name(id)),
        )),
    }
}

/// Uploads a layer's MoE weights from the loaded checkpoint (the router weight was bf16 on
/// disk and is narrowed back exactly), or fills them on the device for a synthetic model.
pub fn upload_moe_block(
    dev: &Device,
    cfg: &MoeBlockConfig,
    weights: &ModelWeights,
    moe: &MoeWeights,
) -> Result<MoeBlockWeights> {
    cfg.check()?;
    let (e, h, i) = (cfg.router.experts, cfg.hidden, cfg.inter);
    let c = Checker { kernel: BLOCK };
    c.req(moe.experts.len() == e, || {
        format!(
            "the layer has {} experts; the config says {e}",
            moe.experts.len()
        )
    })?;
    if weights.is_synthetic() {
        return synthetic_moe_block(dev, cfg, weights, moe);
    }
    let router: Vec<bf16> = dense(weights, moe.router)?
        .iter()
        .map(|&v| bf16::from_f32(v))
        .collect();
    c.req(router.len() == e * h, || {
        format!(
            "mlp.gate.weight has {} values, not [{e}, {h}]",
            router.len()
        )
    })?;
    let bias = dense(weights, moe.bias)?;
    c.req(bias.len() == e, || {
        format!("e_score_correction_bias has {} values, not {e}", bias.len())
    })?;
    let parts = |f: fn(&MlpWeights) -> WeightId| {
        moe.experts
            .iter()
            .map(|m| fp8_parts(weights, f(m)))
            .collect::<Result<Vec<_>>>()
    };
    let (gate, up, down) = (parts(|m| m.gate)?, parts(|m| m.up)?, parts(|m| m.down)?);
    let (gu_codes, gu_scales) = GroupedFp8Weight::stack_gate_up(&gate, &up, i, h)?;
    let (d_codes, d_scales) = GroupedFp8Weight::stack(&down, h, i)?;
    let shared = match (&moe.shared, cfg.shared_inter) {
        (Some(s), si) if si > 0 => {
            let g = fp8_parts(weights, s.gate)?;
            let u = fp8_parts(weights, s.up)?;
            let (codes, scales) = GroupedFp8Weight::stack_gate_up(&[g], &[u], si, h)?;
            let (dc, ds) = fp8_parts(weights, s.down)?;
            Some((
                Fp8Weight::upload(dev, &codes, &scales, 2 * si, h)?,
                Fp8Weight::upload(dev, dc, ds, h, si)?,
            ))
        }
        _ => None,
    };
    Ok(MoeBlockWeights {
        router: dev.upload(&router)?,
        bias: Some(dev.upload(bias)?),
        gate_up: GroupedFp8Weight::upload(dev, &gu_codes, &gu_scales, e, 2 * i, h)?,
        down: GroupedFp8Weight::upload(dev, &d_codes, &d_scales, e, h, i)?,
        shared,
    })
}

/// The fills of a synthetic FP8 weight: its e4m3 codes and its block multipliers.
fn fp8_fills(w: &SyntheticWeight) -> Result<(RandomFill, RandomFill)> {
    match w.values {
        SyntheticValues::Fp8 { code_max, scale } => Ok((
            RandomFill {
                seed: w.seed,
                center: 0.0,
                spread: code_max,
            },
            RandomFill {
                seed: w.seed ^ SCALE_STREAM,
                center: scale,
                spread: 0.25 * scale,
            },
        )),
        SyntheticValues::Dense { .. } => Err(CudaError::requirement(
            SYNTHETIC,
            format!(
                "a dense [{}, {}] weight where an FP8 one is expected",
                w.rows, w.cols
            ),
        )),
    }
}

/// The fill of a synthetic dense tensor.
fn dense_fill(w: &SyntheticWeight) -> Result<RandomFill> {
    match w.values {
        SyntheticValues::Dense { center, spread } => Ok(RandomFill {
            seed: w.seed,
            center,
            spread,
        }),
        SyntheticValues::Fp8 { .. } => Err(CudaError::requirement(
            SYNTHETIC,
            format!(
                "an FP8 [{}, {}] weight where a dense one is expected",
                w.rows, w.cols
            ),
        )),
    }
}

/// A synthetic FP8 Linear weight filled on the device.
pub(super) fn synthetic_fp8(dev: &Device, w: &SyntheticWeight) -> Result<Fp8Weight> {
    let (codes, scales) = fp8_fills(w)?;
    let blocks = w.rows.div_ceil(QUANT_BLOCK) * w.cols.div_ceil(QUANT_BLOCK);
    Ok(Fp8Weight {
        codes: dev.random_buffer(w.rows * w.cols, codes)?,
        scales: dev.random_buffer(blocks, scales)?,
        n: w.rows,
        k: w.cols,
    })
}

/// A synthetic dense tensor filled on the device as bf16.
pub(super) fn synthetic_dense(dev: &Device, w: &SyntheticWeight) -> Result<DeviceBuffer<bf16>> {
    dev.random_buffer(w.rows * w.cols, dense_fill(w)?)
}

/// A synthetic dense tensor filled on the device as f32.
pub(super) fn synthetic_f32(dev: &Device, w: &SyntheticWeight) -> Result<DeviceBuffer<f32>> {
    dev.random_buffer(w.rows * w.cols, dense_fill(w)?)
}

/// kv_b_proj in the absorbed bf16 layout the MLA absorption kernels read (cuda/params/
/// small_ops.h): per head h, the `(nope + v) * kv_lora` elements at `h * (nope + v) * kv_lora`
/// hold W_UK\[h\] transposed, `[kv_lora][nope]` (element (i, l) of W_UK\[h\] at `l * nope + i`),
/// then W_UV\[h\] `[v][kv_lora]` as in the checkpoint. The transposition makes W_UK K-major for
/// q_nope · W_UK. `kv_b` is the checkpoint's `[heads * (nope + v)][kv_lora]` in f32 (FP8
/// dequantized); each value is rounded to bf16 (round to nearest even), as the CPU's w8a8
/// absorption rounds it.
///
/// # Panics
///
/// If `kv_b` does not hold `heads * (nope + v) * kv_lora` values.
pub fn absorbed_kv_b(
    kv_b: &[f32],
    heads: usize,
    nope: usize,
    v: usize,
    kv_lora: usize,
) -> Vec<bf16> {
    let per_head = (nope + v) * kv_lora;
    assert_eq!(
        kv_b.len(),
        heads * per_head,
        "kv_b_proj must be [heads * (nope + v)][kv_lora] = [{heads} * ({nope} + {v})][{kv_lora}]"
    );
    let mut out = Vec::with_capacity(kv_b.len());
    for h in 0..heads {
        let (uk, uv) = kv_b[h * per_head..][..per_head].split_at(nope * kv_lora);
        out.extend(
            (0..kv_lora).flat_map(|l| (0..nope).map(move |i| bf16::from_f32(uk[i * kv_lora + l]))),
        );
        out.extend(uv.iter().map(|&x| bf16::from_f32(x)));
    }
    out
}

/// A synthetic kv_b_proj in its absorbed bf16 form: values uniform in +-(code_max * scale),
/// the magnitude of its FP8 form (the GPU never holds that form). The values are independent
/// draws, so filling the absorbed layout directly needs no transposition of W_UK: it is as
/// random as the transpose of a random checkpoint-layout fill would be.
pub(super) fn synthetic_absorbed(dev: &Device, w: &SyntheticWeight) -> Result<DeviceBuffer<bf16>> {
    let fill = match w.values {
        SyntheticValues::Fp8 { code_max, scale } => RandomFill {
            seed: w.seed,
            center: 0.0,
            spread: code_max * scale,
        },
        SyntheticValues::Dense { .. } => dense_fill(w)?,
    };
    dev.random_buffer(w.rows * w.cols, fill)
}

/// Fills rows `row0 .. row0 + w.rows` of expert `expert` of a stacked weight (codes
/// `[E][n][k]`, multipliers `[E][ceil(n/128)][ceil(k/128)]`) with the synthetic weight `w`,
/// as [`GroupedFp8Weight::stack_gate_up`] places gate (row 0) and up (row `inter`).
fn fill_stacked(
    dev: &Device,
    w: &SyntheticWeight,
    into: &mut GroupedFp8Weight,
    expert: usize,
    row0: usize,
) -> Result<()> {
    let (n, k) = (into.n, into.k);
    let c = Checker { kernel: SYNTHETIC };
    c.req(
        w.cols == k && row0 % QUANT_BLOCK == 0 && row0 + w.rows <= n && expert < into.experts,
        || {
            format!(
                "[{}, {}] does not fit rows {row0}.. of expert {expert} of a [{}][{n}][{k}] stack",
                w.rows, w.cols, into.experts
            )
        },
    )?;
    let (codes, scales) = fp8_fills(w)?;
    let kb = k.div_ceil(QUANT_BLOCK);
    let code0 = (expert * n + row0) * k;
    let scale0 = (expert * n.div_ceil(QUANT_BLOCK) + row0 / QUANT_BLOCK) * kb;
    dev.prepare_random_fill(RandomFillArgs {
        out: &mut into.codes,
        range: code0..code0 + w.rows * k,
        fill: codes,
    })?
    .launch()?;
    dev.prepare_random_fill(RandomFillArgs {
        out: &mut into.scales,
        range: scale0..scale0 + w.rows.div_ceil(QUANT_BLOCK) * kb,
        fill: scales,
    })?
    .launch()
}

/// An unfilled stacked weight of `experts` experts `[n][k]`.
fn stack_alloc(dev: &Device, experts: usize, n: usize, k: usize) -> Result<GroupedFp8Weight> {
    let blocks = n.div_ceil(QUANT_BLOCK) * k.div_ceil(QUANT_BLOCK);
    Ok(GroupedFp8Weight {
        codes: dev.alloc(experts * n * k)?,
        scales: dev.alloc(experts * blocks)?,
        experts,
        n,
        k,
    })
}

/// A synthetic MoE layer filled on the device in the layout [`upload_moe_block`] uploads:
/// each expert's gate, up and down from its own weight's stream.
fn synthetic_moe_block(
    dev: &Device,
    cfg: &MoeBlockConfig,
    weights: &ModelWeights,
    moe: &MoeWeights,
) -> Result<MoeBlockWeights> {
    let (e, h, i) = (cfg.router.experts, cfg.hidden, cfg.inter);
    let c = Checker { kernel: BLOCK };
    let syn = |id: WeightId| match weights.get(id) {
        Weight::Synthetic(w) => Ok(w),
        Weight::Fp8(_) | Weight::Dense { .. } => Err(CudaError::requirement(
            SYNTHETIC,
            format!("`{}` has host data in a synthetic table", weights.name(id)),
        )),
    };
    let router = syn(moe.router)?;
    c.req((router.rows, router.cols) == (e, h), || {
        format!(
            "mlp.gate.weight is [{}, {}], not [{e}, {h}]",
            router.rows, router.cols
        )
    })?;
    let bias = syn(moe.bias)?;
    c.req(bias.rows * bias.cols == e, || {
        format!(
            "e_score_correction_bias has {} values, not {e}",
            bias.rows * bias.cols
        )
    })?;
    let mut gate_up = stack_alloc(dev, e, 2 * i, h)?;
    let mut down = stack_alloc(dev, e, h, i)?;
    for (x, m) in moe.experts.iter().enumerate() {
        fill_stacked(dev, syn(m.gate)?, &mut gate_up, x, 0)?;
        fill_stacked(dev, syn(m.up)?, &mut gate_up, x, i)?;
        fill_stacked(dev, syn(m.down)?, &mut down, x, 0)?;
    }
    let shared = match (&moe.shared, cfg.shared_inter) {
        (Some(s), si) if si > 0 => {
            let mut gu = stack_alloc(dev, 1, 2 * si, h)?;
            fill_stacked(dev, syn(s.gate)?, &mut gu, 0, 0)?;
            fill_stacked(dev, syn(s.up)?, &mut gu, 0, si)?;
            let gu = Fp8Weight {
                codes: gu.codes,
                scales: gu.scales,
                n: 2 * si,
                k: h,
            };
            Some((gu, synthetic_fp8(dev, syn(s.down)?)?))
        }
        _ => None,
    };
    Ok(MoeBlockWeights {
        router: synthetic_dense(dev, router)?,
        bias: Some(synthetic_f32(dev, bias)?),
        gate_up,
        down,
        shared,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv_cache::Segment;

    fn r1() -> ModelConfig {
        let json = include_str!("../../../tests/fixtures/deepseek-r1-config.json");
        ModelConfig::from_json(json, std::path::Path::new("config.json")).unwrap()
    }

    /// W_UK of each head lands transposed, W_UV in place, every value rounded to bf16 once.
    #[test]
    fn absorbed_kv_b_transposes_w_uk_per_head() {
        let (heads, nope, v, kv_lora) = (3, 2, 4, 5);
        let per_head = (nope + v) * kv_lora;
        // Element k is k + 1 (exact in bf16 below 256) pushed off bf16's grid by a relative
        // 2^-9, under half an ulp: rounding gives back k + 1, so placement and rounding show.
        let kv_b: Vec<f32> = (0..heads * per_head)
            .map(|k| (k + 1) as f32 * (1.0 + 1.0 / 512.0))
            .collect();
        let got: Vec<f32> = absorbed_kv_b(&kv_b, heads, nope, v, kv_lora)
            .iter()
            .map(|x| x.to_f32())
            .collect();
        assert_eq!(got.len(), kv_b.len());
        let want = |k: usize| (k + 1) as f32;
        for h in 0..heads {
            for i in 0..nope {
                for l in 0..kv_lora {
                    let src = (h * (nope + v) + i) * kv_lora + l;
                    let dst = h * per_head + l * nope + i;
                    assert_eq!(got[dst], want(src), "W_UK h {h} i {i} l {l}");
                }
            }
            for d in 0..v {
                for l in 0..kv_lora {
                    let at = (h * (nope + v) + nope + d) * kv_lora + l;
                    assert_eq!(got[at], want(at), "W_UV h {h} d {d} l {l}");
                }
            }
        }
        assert!(absorbed_kv_b(&[], 0, nope, v, kv_lora).is_empty());
    }

    #[test]
    #[should_panic(expected = "kv_b_proj must be")]
    fn absorbed_kv_b_refuses_a_wrong_length() {
        absorbed_kv_b(&[0.0; 7], 1, 1, 1, 4);
    }

    #[test]
    fn deepseek_r1_shapes_fit_the_moe_block() {
        let cfg = moe_block_config(&r1());
        assert_eq!(cfg, MoeBlockConfig::deepseek_r1());
        cfg.check().unwrap();
        assert_eq!(cfg.router.host().n_experts, 256);
    }

    #[test]
    fn batch_segments_become_sequences() {
        let segment = |blocks: Vec<u32>, start_pos, len| Segment {
            blocks,
            start_pos,
            len,
            logit_rows: 1,
        };
        let batch = Batch {
            tokens: vec![0; 5],
            segments: vec![segment(vec![3, 1], 70, 2), segment(vec![0], 0, 3)],
            page_copies: Vec::new(),
        };
        let l = mla_layout(&batch);
        assert_eq!(l.tables, vec![vec![3, 1], vec![0]]);
        assert_eq!((l.kv_lens, l.q_lens), (vec![72, 3], vec![2, 3]));
    }
}
