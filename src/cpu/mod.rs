//! The CPU reference backend (rayon): executes the model graph exactly in f32, or with the
//! GPU's w8a8 recipe so GPU results can be compared op by op.

pub mod attention;
pub mod linear;
pub mod moe;

use std::sync::Arc;

use crate::backend::{Backend, Precision, Readout, StepOutput};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::graph::{Buf, Graph, Op, Plan, Storage};
use crate::kv_cache::{Batch, PAGE_TOKENS};
use crate::model::weights::{ModelWeights, Weight, WeightId};
use crate::model::{HIDDEN_OUT, LOGITS};
use crate::numerics::routing::Router;
use crate::numerics::{round_bf16, silu};

use attention::{Absorbed, LayerCache, MlaShape, Rope};
use moe::MoeCall;

pub struct CpuBackend {
    cfg: ModelConfig,
    weights: Arc<ModelWeights>,
    precision: Precision,
    rope: Rope,
    mla: MlaShape,
    router: Router,
    /// Latent cache per layer (the MTP layer last).
    cache: Vec<LayerCache>,
    /// kv_b_proj of each layer, dequantized once for absorption.
    absorbed: Vec<(WeightId, Absorbed)>,
    slots: Vec<Vec<f32>>,
}

impl CpuBackend {
    pub fn new(cfg: &ModelConfig, weights: Arc<ModelWeights>, precision: Precision) -> Self {
        let kv_bs = weights
            .blocks
            .iter()
            .chain(weights.mtp.as_ref().map(|m| &m.block))
            .map(|b| b.attn.kv_b);
        let absorbed = kv_bs
            .map(|id| (id, dequantize(weights.get(id), precision)))
            .collect::<Vec<_>>();
        CpuBackend {
            cfg: cfg.clone(),
            precision,
            rope: Rope::new(cfg),
            mla: MlaShape::new(cfg),
            router: cfg.router(),
            cache: (0..absorbed.len()).map(|_| LayerCache::default()).collect(),
            absorbed,
            weights,
            slots: Vec::new(),
        }
    }

    fn round(&self, storage: Storage, v: &mut [f32]) {
        if self.precision == Precision::W8a8 && storage == Storage::Activation {
            v.iter_mut().for_each(|x| *x = round_bf16(*x));
        }
    }

    /// Grows every layer's page storage to cover the block ids the batch uses, then makes
    /// the batch's page copies.
    fn prepare_pages(&mut self, batch: &Batch) {
        let page = PAGE_TOKENS * self.cfg.kv_cache_width();
        let len = batch.pages_needed() * page;
        for layer in &mut self.cache {
            if layer.data.len() < len {
                layer.data.resize(len, 0.0);
            }
            for c in &batch.page_copies {
                let src = c.src as usize * page;
                layer
                    .data
                    .copy_within(src..src + page, c.dst as usize * page);
            }
        }
    }

    fn execute(&mut self, op: &Op, graph: &Graph, plan: &Plan, batch: &Batch) -> Result<()> {
        let eps = self.cfg.rms_norm_eps;
        let positions = || batch.token_positions();
        let width = |b: Buf| graph.desc(b).width;
        let mut result: Vec<f32> = match op {
            Op::Embed { table, out } => {
                let table = dense(&self.weights, *table)?;
                let h = width(*out);
                let mut v = Vec::with_capacity(batch.tokens.len() * h);
                for &t in &batch.tokens {
                    let row = table
                        .get(t as usize * h..(t as usize + 1) * h)
                        .ok_or_else(|| {
                            Error::Input(format!(
                                "token id {t} is outside the vocabulary (vocab_size {})",
                                self.cfg.vocab_size
                            ))
                        })?;
                    v.extend_from_slice(row);
                }
                v
            }
            Op::ZeroPositionZero { x } => {
                let mut v = std::mem::take(&mut self.slots[plan.slot(*x)]);
                let h = width(*x);
                for (t, (_, pos)) in positions().into_iter().enumerate() {
                    if pos == 0 {
                        v[t * h..(t + 1) * h].fill(0.0);
                    }
                }
                v
            }
            Op::RmsNorm { x, weight, .. } => {
                let w = dense(&self.weights, *weight)?;
                let xs = &self.slots[plan.slot(*x)];
                let mut v = vec![0f32; xs.len()];
                for (src, dst) in xs.chunks(w.len()).zip(v.chunks_mut(w.len())) {
                    rms_norm_row(src, w, eps, dst);
                }
                v
            }
            Op::Linear { x, weight, .. } => linear::linear(
                &self.slots[plan.slot(*x)],
                self.weights.get(*weight),
                self.precision,
            ),
            Op::Add { a, b, .. } => {
                let (a, b) = (&self.slots[plan.slot(*a)], &self.slots[plan.slot(*b)]);
                a.iter().zip(b).map(|(x, y)| x + y).collect()
            }
            Op::Concat { a, b, .. } => {
                let (wa, wb) = (width(*a), width(*b));
                let (a, b) = (&self.slots[plan.slot(*a)], &self.slots[plan.slot(*b)]);
                a.chunks(wa)
                    .zip(b.chunks(wb))
                    .flat_map(|(x, y)| x.iter().chain(y).copied())
                    .collect()
            }
            Op::SiluMul { gate, up, .. } => {
                let (g, u) = (&self.slots[plan.slot(*gate)], &self.slots[plan.slot(*up)]);
                g.iter().zip(u).map(|(&g, &u)| silu(g) * u).collect()
            }
            Op::MlaCacheWrite { layer, kv, norm } => {
                attention::cache_write(
                    &mut self.cache[*layer],
                    &self.mla,
                    &self.rope,
                    batch,
                    &self.slots[plan.slot(*kv)],
                    dense(&self.weights, *norm)?,
                    self.precision,
                );
                return Ok(());
            }
            Op::MlaAttention { layer, q, kv_b, .. } => {
                let absorbed = &self.absorbed[*layer];
                debug_assert_eq!(absorbed.0, *kv_b);
                attention::attention(
                    &self.cache[*layer],
                    &self.mla,
                    &self.rope,
                    &absorbed.1,
                    batch,
                    &self.slots[plan.slot(*q)],
                    self.precision,
                )
            }
            Op::MoeRouted {
                x,
                router,
                bias,
                experts,
                ..
            } => MoeCall {
                weights: &self.weights,
                router: &self.router,
                router_weight: self.weights.get(*router),
                bias: dense(&self.weights, *bias)?,
                experts,
                hidden: self.cfg.hidden_size,
                precision: self.precision,
            }
            .run(&self.slots[plan.slot(*x)])?,
            Op::SelectRows { x, .. } => {
                let h = width(*x);
                let xs = &self.slots[plan.slot(*x)];
                batch
                    .selected_rows()
                    .into_iter()
                    .flat_map(|r| xs[r * h..(r + 1) * h].iter().copied())
                    .collect()
            }
        };
        // Every op but the cache write (returned above) writes exactly one buffer.
        let out = op.io().1[0];
        self.round(graph.desc(out).storage, &mut result);
        self.slots[plan.slot(out)] = result;
        Ok(())
    }
}

fn dense(weights: &ModelWeights, id: WeightId) -> Result<&[f32]> {
    match weights.get(id) {
        Weight::Dense { data, .. } => Ok(data),
        Weight::Fp8(_) => Err(Error::Unsupported(format!(
            "`{}` is FP8 where a BF16/F32 tensor is expected",
            weights.name(id)
        ))),
        Weight::Synthetic(_) => Err(synthetic_refused()),
    }
}

/// Synthetic weights have no host values to compute with.
fn synthetic_refused() -> Error {
    Error::Unsupported(
        "the model's weights are synthetic (shapes only, generated on the device): the CPU \
         backend computes from host values; run synthetic models on the CUDA backend"
            .into(),
    )
}

impl Backend for CpuBackend {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn precision(&self) -> Precision {
        self.precision
    }

    fn run(
        &mut self,
        graph: &Graph,
        plan: &Plan,
        batch: &Batch,
        inputs: &[(&str, &[f32])],
        readout: &Readout<'_>,
    ) -> Result<StepOutput> {
        if self.weights.is_synthetic() {
            return Err(synthetic_refused());
        }
        let bound = graph.bind_inputs(batch, inputs)?;
        readout.check(batch)?;
        self.prepare_pages(batch);
        self.slots.resize_with(plan.slots, Vec::new);
        for (buf, data) in bound {
            let mut v = data.to_vec();
            self.round(graph.desc(buf).storage, &mut v);
            self.slots[plan.slot(buf)] = v;
        }
        for op in &graph.nodes {
            self.execute(op, graph, plan, batch)?;
        }
        let slot = |name: &str| {
            graph
                .output(name)
                .map(|b| &self.slots[plan.slot(b)])
                .ok_or_else(|| Error::Backend {
                    backend: "cpu".into(),
                    message: format!("the graph has no `{name}` output"),
                })
        };
        let hidden = if readout.hidden {
            slot(HIDDEN_OUT)?.clone()
        } else {
            Vec::new()
        };
        Ok(readout.from_host(slot(LOGITS)?, self.cfg.vocab_size, hidden))
    }
}

/// y = x / sqrt(mean(x^2) + eps) * w.
pub(crate) fn rms_norm_row(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let mean_sq = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let inv = 1.0 / (mean_sq + eps).sqrt();
    for ((o, &v), &g) in out.iter_mut().zip(x).zip(w) {
        *o = v * inv * g;
    }
}

/// kv_b_proj as f32 rows for absorption (rounded to bf16 in w8a8, as the GPU stores it).
fn dequantize(w: &Weight, precision: Precision) -> Absorbed {
    let kv_b = match w {
        Weight::Dense { data, .. } => data.clone(),
        Weight::Fp8(w) => w.dequantized(),
        // Never read: `run` refuses synthetic weights.
        Weight::Synthetic(_) => Vec::new(),
    };
    let kv_b = match precision {
        Precision::Exact => kv_b,
        Precision::W8a8 => kv_b.into_iter().map(round_bf16).collect(),
    };
    Absorbed { kv_b }
}
