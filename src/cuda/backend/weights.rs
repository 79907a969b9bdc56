//! Weights on the device: the checkpoint's tensors uploaded once (FP8 as codes + block
//! scales, dense tensors narrowed back to bf16, kv_b_proj dequantized for absorption) and
//! looked up by the graph's weight ids.

use half::bf16;

use super::Core;
use crate::cuda::ops::Fp8Weight;
use crate::cuda::{Device, DeviceBuffer};
use crate::error::{Error, Result};
use crate::model::weights::{ModelWeights, Weight, WeightId};
use crate::numerics::round_bf16;

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

pub(super) fn upload_fp8(dev: &Device, w: &Weight) -> Result<Fp8Weight> {
    match w {
        Weight::Fp8(w) => Ok(Fp8Weight::upload(
            dev,
            w.codes.as_slice(),
            &w.scales,
            w.n,
            w.k,
        )?),
        Weight::Dense { .. } => Err(Error::Unsupported(
            "a dense weight where the CUDA backend expects FP8".into(),
        )),
    }
}

/// A dense (bf16 on disk, f32 on the host) tensor narrowed back to bf16 exactly.
pub(super) fn upload_dense(dev: &Device, w: &Weight) -> Result<(DeviceBuffer<bf16>, usize, usize)> {
    match w {
        Weight::Dense { rows, cols, data } => {
            let v: Vec<bf16> = data.iter().map(|&x| bf16::from_f32(x)).collect();
            Ok((dev.upload(&v)?, *rows, *cols))
        }
        Weight::Fp8(_) => Err(Error::Unsupported(
            "an FP8 weight where the CUDA backend expects a dense tensor".into(),
        )),
    }
}

pub(super) fn dense_f32(weights: &ModelWeights, id: WeightId) -> Result<&[f32]> {
    match weights.get(id) {
        Weight::Dense { data, .. } => Ok(data),
        Weight::Fp8(_) => Err(Error::Unsupported(format!(
            "`{}` is FP8 where a BF16/F32 tensor is expected",
            weights.name(id)
        ))),
    }
}

/// kv_b_proj dequantized (W = q * s per 128x128 block) and rounded to bf16, as the CPU's
/// w8a8 absorption uses it.
pub(super) fn upload_absorbed(dev: &Device, w: &Weight) -> Result<DeviceBuffer<bf16>> {
    let v: Vec<bf16> = match w {
        Weight::Dense { data, .. } => data.iter().map(|&x| bf16::from_f32(x)).collect(),
        Weight::Fp8(w) => w
            .dequantized()
            .into_iter()
            .map(|x| bf16::from_f32(round_bf16(x)))
            .collect(),
    };
    Ok(dev.upload(&v)?)
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
