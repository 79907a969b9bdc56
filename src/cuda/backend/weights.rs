//! Weights on the device: the checkpoint's tensors uploaded once (FP8 as codes + block
//! scales, dense tensors narrowed back to bf16, kv_b_proj dequantized for absorption), or
//! synthetic ones filled in place by the device (adapters.rs), and looked up by the graph's
//! weight ids.

use std::borrow::Cow;

use half::bf16;

use super::adapters::{
    absorbed_kv_b, synthetic_absorbed, synthetic_dense, synthetic_f32, synthetic_fp8,
};
use super::Core;
use crate::config::ModelConfig;
use crate::cuda::ops::Fp8Weight;
use crate::cuda::{Device, DeviceBuffer};
use crate::error::{Error, Result};
use crate::model::weights::{Weight, WeightId};

/// A weight on the device as the graph's ops use it.
pub(super) enum GpuWeight {
    Fp8(Fp8Weight),
    /// A BF16 tensor (norms, embeddings, dense heads), bf16 `[rows][cols]`.
    Dense {
        data: DeviceBuffer<bf16>,
        rows: usize,
        cols: usize,
    },
}

/// A weight as the graph's ops use it: FP8 Linear weights as codes + block multipliers, the
/// rest as bf16.
pub(super) fn upload(dev: &Device, w: &Weight) -> Result<GpuWeight> {
    let fp8 = match w {
        Weight::Fp8(_) => true,
        Weight::Dense { .. } => false,
        Weight::Synthetic(s) => s.is_fp8(),
    };
    if fp8 {
        Ok(GpuWeight::Fp8(upload_fp8(dev, w)?))
    } else {
        let (data, rows, cols) = upload_dense(dev, w)?;
        Ok(GpuWeight::Dense { data, rows, cols })
    }
}

pub(super) fn upload_fp8(dev: &Device, w: &Weight) -> Result<Fp8Weight> {
    match w {
        Weight::Fp8(w) => Ok(Fp8Weight::upload(
            dev,
            w.codes.as_slice(),
            &w.scales,
            w.n,
            w.k,
        )?),
        Weight::Synthetic(s) if s.is_fp8() => Ok(synthetic_fp8(dev, s)?),
        Weight::Dense { .. } | Weight::Synthetic(_) => Err(Error::Unsupported(
            "a dense weight where the CUDA backend expects FP8".into(),
        )),
    }
}

/// A dense (bf16 on disk, f32 on the host) tensor narrowed back to bf16 exactly, or a
/// synthetic one filled as bf16.
pub(super) fn upload_dense(dev: &Device, w: &Weight) -> Result<(DeviceBuffer<bf16>, usize, usize)> {
    match w {
        Weight::Dense { rows, cols, data } => {
            let v: Vec<bf16> = data.iter().map(|&x| bf16::from_f32(x)).collect();
            Ok((dev.upload(&v)?, *rows, *cols))
        }
        Weight::Synthetic(s) if !s.is_fp8() => Ok((synthetic_dense(dev, s)?, s.rows, s.cols)),
        Weight::Fp8(_) | Weight::Synthetic(_) => Err(Error::Unsupported(
            "an FP8 weight where the CUDA backend expects a dense tensor".into(),
        )),
    }
}

/// A dense tensor as f32 on the device (the router's score-correction bias).
pub(super) fn upload_f32(dev: &Device, w: &Weight) -> Result<DeviceBuffer<f32>> {
    match w {
        Weight::Dense { data, .. } => Ok(dev.upload(data)?),
        Weight::Synthetic(s) if !s.is_fp8() => Ok(synthetic_f32(dev, s)?),
        Weight::Fp8(_) | Weight::Synthetic(_) => Err(Error::Unsupported(
            "an FP8 weight where the CUDA backend expects an f32 tensor".into(),
        )),
    }
}

/// kv_b_proj dequantized (W = q * s per 128x128 block) and rounded to bf16, as the CPU's
/// w8a8 absorption uses it, in the absorbed layout ([`absorbed_kv_b`]: W_UK transposed per
/// head). The GPU keeps kv_b_proj in this form only, so a synthetic one is filled as bf16
/// directly, with the spread its FP8 form would have.
pub(super) fn upload_absorbed(
    dev: &Device,
    cfg: &ModelConfig,
    w: &Weight,
) -> Result<DeviceBuffer<bf16>> {
    let (heads, nope, v, kv_lora) = (
        cfg.num_attention_heads,
        cfg.qk_nope_head_dim,
        cfg.v_head_dim,
        cfg.kv_lora_rank,
    );
    let fail = |message: String| Error::Backend {
        backend: "cuda".into(),
        message,
    };
    let (rows, cols) = w.shape();
    if rows != heads * (nope + v) || cols != kv_lora {
        return Err(fail(format!(
            "kv_b_proj is [{rows}, {cols}]; config.json's attention needs \
             [num_attention_heads * (qk_nope_head_dim + v_head_dim), kv_lora_rank] = \
             [{heads} * ({nope} + {v}), {kv_lora}]"
        )));
    }
    let values: Cow<'_, [f32]> = match w {
        Weight::Dense { data, .. } => Cow::Borrowed(data),
        Weight::Fp8(w) => Cow::Owned(w.dequantized()),
        Weight::Synthetic(s) => return Ok(synthetic_absorbed(dev, s)?),
    };
    if values.len() != rows * cols {
        return Err(fail(format!(
            "kv_b_proj [{rows}, {cols}] holds {} values",
            values.len()
        )));
    }
    Ok(dev.upload(&absorbed_kv_b(&values, heads, nope, v, kv_lora))?)
}

impl Core {
    pub(super) fn weight(&self, id: WeightId) -> Result<&GpuWeight> {
        self.weights.get(&id).ok_or_else(|| Error::Backend {
            backend: "cuda".into(),
            message: format!("weight {} was not uploaded for this use", id.0),
        })
    }

    pub(super) fn dense(&self, id: WeightId) -> Result<(&DeviceBuffer<bf16>, usize, usize)> {
        match self.weight(id)? {
            GpuWeight::Dense { data, rows, cols } => Ok((data, *rows, *cols)),
            GpuWeight::Fp8(_) => Err(Error::Unsupported(format!(
                "weight {} is FP8 where a dense tensor is expected",
                id.0
            ))),
        }
    }
}
