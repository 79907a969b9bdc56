//! The model's types as the kernels' plain numbers: the routing and MoE-block shapes from
//! config.json, a MoE layer's weights from the loaded checkpoint, the RoPE table, and a step's
//! MLA layout from the engine's batch.

use half::bf16;

use crate::config::ModelConfig;
use crate::cuda::error::{CudaError, Result};
use crate::cuda::ops::{
    Checker, ExpertWeight, Fp8Weight, GroupedFp8Weight, MlaLayout, MlaRope, MoeBlockConfig,
    MoeBlockWeights, RouterConfig, MLA_PAGE_TOKENS,
};
use crate::cuda::Device;
use crate::kv_cache::{Batch, PAGE_TOKENS};
use crate::model::weights::{MlpWeights, ModelWeights, MoeWeights, Weight, WeightId};

// The engine's block ids go to the MLA kernels as page ids: both must page by the same size.
const _: () = assert!(MLA_PAGE_TOKENS == PAGE_TOKENS);

/// Errors of the MoE weight upload name the block as the GPU MoE path.
const BLOCK: &str = "moe_block";

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
        Weight::Dense { .. } => Err(CudaError::requirement(
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
        Weight::Fp8(_) => Err(CudaError::requirement(
            BLOCK,
            format!("`{}` must be a BF16/F32 tensor", weights.name(id)),
        )),
    }
}

/// Uploads a layer's MoE weights from the loaded checkpoint (the router weight was bf16 on
/// disk and is narrowed back exactly).
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv_cache::Segment;

    fn r1() -> ModelConfig {
        let json = include_str!("../../../tests/fixtures/deepseek-r1-config.json");
        ModelConfig::from_json(json, std::path::Path::new("config.json")).unwrap()
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
