//! What the engine needs from a compute backend: run a graph over one step's tokens, with the
//! latent KV cache the backend owns.

use std::collections::HashMap;

use crate::error::Result;
use crate::graph::{Graph, Plan};
use crate::kv_cache::Batch;

/// Arithmetic recipe (docs/design.md, "Numerics contract").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Precision {
    /// f32 everywhere, FP8 weights dequantized exactly: the golden reference.
    Exact,
    /// The GPU recipe: bf16 activations, per-token 1x128 FP8 activation quantization before
    /// every FP8 GEMM, f32 accumulation promoted every 128 of K; router, softmax, norms'
    /// statistics and logits in f32.
    W8a8,
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "exact" => Ok(Precision::Exact),
            "w8a8" => Ok(Precision::W8a8),
            other => Err(format!(
                "unknown precision `{other}` (expected exact or w8a8)"
            )),
        }
    }
}

/// Named output buffers of one run, row-major `[rows, width]`.
pub type Outputs = HashMap<String, Vec<f32>>;

pub trait Backend: Send {
    fn name(&self) -> &'static str;

    fn precision(&self) -> Precision;

    /// Runs `graph` (with its slot `plan`) over `batch`, reading the graph's inputs from `inputs` (by name, each
    /// `[tokens, width]`) and returning its outputs. Cache pages named by the batch's block
    /// tables are written for every token of the batch.
    fn run(
        &mut self,
        graph: &Graph,
        plan: &Plan,
        batch: &Batch,
        inputs: &[(&str, &[f32])],
    ) -> Result<Outputs>;
}
