//! The CUDA [`Backend`]: runs the model graphs on one Hopper GPU with the w8a8 recipe
//! (docs/design.md, "Numerics contract"), mirroring the CPU backend's w8a8 semantics op by op:
//!
//! - Embed / RmsNorm / Add / Concat / SiluMul / ZeroPositionZero / SelectRows: the simple
//!   kernels of cuda/small_ops.cu (bf16 buffers, f32 arithmetic, one rounding per op).
//! - Linear on an FP8 weight: act_quant (cuda/act_quant.cu when K % 128 == 0, else the small
//!   ragged-K kernel) + fp8_gemm (Auto: wgmma where it applies, the reference kernel
//!   otherwise); on a dense weight (lm_head, eh_proj): the small bf16 GEMM (f32 logits).
//! - MlaCacheWrite / MlaAttention: cuda/mla/'s cache write, q RoPE and attention (the
//!   split-KV wgmma fast path, scheduled once per step, where the shapes apply; the reference
//!   kernel otherwise) over this backend's paged latent caches (grown as block ids appear,
//!   pages copied when a forked sequence writes into a shared one), with the absorption GEMMs
//!   (q_nope · W_UK, o_lat · W_UV^T) against kv_b_proj dequantized to bf16.
//! - MoeRouted: the fused MoE block (routed experts only; the shared expert is graph nodes)
//!   where its shapes apply (hidden and moe_intermediate multiples of 128); otherwise a
//!   simple fallback: the GPU router, then every expert's MLP over all tokens, accumulated
//!   with each token's routing weight (zero for experts it did not choose).
//!
//! Here: construction and [`Backend::run`] (one step: pages, inputs, ops, outputs). Beside it:
//! `weights` (upload and lookup), `pages` (latent caches, MLA workspaces), `moe` (MoeRouted,
//! fused block or fallback), `dispatch` (each graph op as kernels), and `adapters` (config,
//! checkpoint weights and the engine's batch as the kernels' plain numbers).
//!
//! The [`Device`] is opened once per backend; the kernel handles (`Mla`, `MoeOps`, `SmallOps`)
//! hold clones of it, and dropping the backend first waits for its stream.
//! tests/gpu_engine.rs compares it with the CPU w8a8 backend end to end where a device exists.

mod adapters;
mod dispatch;
mod moe;
mod pages;
mod weights;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use half::bf16;

pub use adapters::{mla_layout, moe_block_config, router_config, upload_moe_block, upload_rope};
use moe::GpuMoe;
use weights::{upload, upload_absorbed, upload_dense, upload_f32, upload_fp8, GpuWeight};

use super::ops::{MoeBlockConfig, MoeOps, MoeWorkspace, RouterConfig, SmallOps};
use super::{Device, DeviceBuffer, Mla, MlaBatch, MlaCache, MlaRope, MlaWorkspace};
use crate::backend::{Backend, Outputs, Precision};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::graph::{Graph, Plan, Rows, Storage};
use crate::kv_cache::Batch;
use crate::model::weights::{FfnWeights, ModelWeights, MoeWeights, WeightId};

/// What never changes after construction.
struct Core {
    cfg: ModelConfig,
    dev: Device,
    small: SmallOps,
    mla: Mla,
    moe: MoeOps,
    rope: MlaRope,
    router: RouterConfig,
    weights: HashMap<WeightId, GpuWeight>,
    /// kv_b_proj dequantized to bf16 `[heads * (nope + v)][kv_lora]`, by its WeightId.
    absorbed: HashMap<WeightId, DeviceBuffer<bf16>>,
    /// Routed experts by the layer's router WeightId.
    moe_layers: HashMap<WeightId, GpuMoe>,
    /// Latent cache layers: the decoder blocks, then the MTP layer's.
    cache_layers: usize,
}

/// A graph buffer's storage: bf16 activations or f32 (logits), grown as needed.
#[derive(Default)]
struct Slot {
    bf: Option<DeviceBuffer<bf16>>,
    f: Option<DeviceBuffer<f32>>,
}

fn ensure<T: bytemuck::Pod>(
    dev: &Device,
    buf: &mut Option<DeviceBuffer<T>>,
    len: usize,
) -> Result<()> {
    if buf.as_ref().is_none_or(|b| b.len() < len) {
        *buf = None; // free before allocating the larger one
        *buf = Some(dev.alloc(len.max(1))?);
    }
    Ok(())
}

fn missing(what: &str) -> Error {
    Error::Backend {
        backend: "cuda".into(),
        message: format!("internal: {what} was not computed before use"),
    }
}

/// Mutable state: buffers, caches, workspaces.
#[derive(Default)]
struct State {
    slots: Vec<Slot>,
    /// Per cache layer (the MTP layer last); all with the same page count.
    cache: Vec<MlaCache>,
    q_attn: Option<DeviceBuffer<bf16>>,
    o_lat: Option<DeviceBuffer<bf16>>,
    lse: Option<DeviceBuffer<f32>>,
    /// The MLA fast path's scratch, one per split count (decode and prefill steps plan
    /// different splits); each grows to the largest step seen.
    mla_ws: HashMap<usize, MlaWorkspace>,
    /// Whether this step's split-KV schedule is already in its workspace (every layer of a
    /// step shares the batch layout, so the first attention schedules for all).
    mla_scheduled: bool,
    moe_ws: Option<MoeWorkspace>,
}

/// Per-run device data of the step.
struct StepData {
    tokens: usize,
    selected: usize,
    ids: DeviceBuffer<i32>,
    select: Option<DeviceBuffer<i32>>,
    mla: MlaBatch,
}

pub struct CudaBackend {
    core: Core,
    state: State,
    /// Keeps the host weights alive for the backend's lifetime (the graphs name them).
    _host: Arc<ModelWeights>,
}

impl CudaBackend {
    /// Opens CUDA device 0, uploads the weights and loads the kernels. Only the w8a8 recipe
    /// runs on the GPU.
    pub fn new(
        cfg: &ModelConfig,
        weights: Arc<ModelWeights>,
        precision: Precision,
    ) -> Result<Self> {
        if precision != Precision::W8a8 {
            return Err(Error::Unsupported(
                "the CUDA backend runs the w8a8 recipe only: pass --precision w8a8".into(),
            ));
        }
        let device = Device::open(0)?;
        let dev = &device;
        let small = SmallOps::new(dev);
        let mla = Mla::new(dev);
        let moe = MoeOps::new(dev);
        let rope = upload_rope(dev, cfg)?;
        let router = router_config(cfg);

        let blocks: Vec<_> = weights
            .blocks
            .iter()
            .chain(weights.mtp.as_ref().map(|m| &m.block))
            .collect();
        let mut special = HashSet::new();
        let mut absorbed = HashMap::new();
        let mut moe_layers = HashMap::new();
        let fast_cfg = MoeBlockConfig {
            shared_inter: 0,
            ..moe_block_config(cfg)
        };
        let fast = super::heuristics::moe_routed_path(&fast_cfg)
            == super::heuristics::MoeRoutedPath::Fused;
        for b in &blocks {
            special.insert(b.attn.kv_b);
            absorbed.insert(b.attn.kv_b, upload_absorbed(dev, weights.get(b.attn.kv_b))?);
            if let FfnWeights::Moe(m) = &b.ffn {
                special.insert(m.router);
                special.insert(m.bias);
                for e in &m.experts {
                    special.extend([e.gate, e.up, e.down]);
                }
                let routed = MoeWeights {
                    router: m.router,
                    bias: m.bias,
                    experts: m.experts.clone(),
                    shared: None,
                };
                let layer = if fast {
                    GpuMoe::Fast(Box::new(upload_moe_block(
                        dev, &fast_cfg, &weights, &routed,
                    )?))
                } else {
                    router.check("moe_router")?;
                    GpuMoe::Fallback {
                        router: upload_dense(dev, weights.get(m.router))?.0,
                        bias: upload_f32(dev, weights.get(m.bias))?,
                        experts: m
                            .experts
                            .iter()
                            .map(|e| {
                                Ok([
                                    upload_fp8(dev, weights.get(e.gate))?,
                                    upload_fp8(dev, weights.get(e.up))?,
                                    upload_fp8(dev, weights.get(e.down))?,
                                ])
                            })
                            .collect::<Result<Vec<_>>>()?,
                    }
                };
                moe_layers.insert(m.router, layer);
            }
        }
        let mut gpu = HashMap::new();
        for i in 0..weights.len() {
            let id = WeightId(i as u32);
            if special.contains(&id) {
                continue;
            }
            gpu.insert(id, upload(dev, weights.get(id))?);
        }
        Ok(CudaBackend {
            core: Core {
                cfg: cfg.clone(),
                dev: device,
                small,
                mla,
                moe,
                rope,
                router,
                weights: gpu,
                absorbed,
                moe_layers,
                cache_layers: blocks.len(),
            },
            state: State::default(),
            _host: weights,
        })
    }

    /// The device this backend runs on.
    pub fn device(&self) -> &Device {
        &self.core.dev
    }
}

impl Drop for CudaBackend {
    /// Waits for the work queued on the stream before the buffers it uses are freed.
    fn drop(&mut self) {
        let _ = self.core.dev.synchronize();
    }
}

impl Backend for CudaBackend {
    fn name(&self) -> &'static str {
        "cuda"
    }

    fn precision(&self) -> Precision {
        Precision::W8a8
    }

    fn run(
        &mut self,
        graph: &Graph,
        plan: &Plan,
        batch: &Batch,
        inputs: &[(&str, &[f32])],
    ) -> Result<Outputs> {
        let core = &self.core;
        let state = &mut self.state;
        let bound = graph.bind_inputs(batch, inputs)?;
        let tokens = batch.tokens.len();
        if let Some(&bad) = batch
            .tokens
            .iter()
            .find(|&&t| t as usize >= core.cfg.vocab_size)
        {
            return Err(Error::Input(format!(
                "token id {bad} is outside the vocabulary (vocab_size {})",
                core.cfg.vocab_size
            )));
        }
        core.prepare_pages(state, batch)?;
        state.mla_scheduled = false;
        let selected_rows = batch.selected_rows();
        let ids: Vec<i32> = batch.tokens.iter().map(|&t| t as i32).collect();
        let select: Vec<i32> = selected_rows.iter().map(|&r| r as i32).collect();
        let step = StepData {
            tokens,
            selected: select.len(),
            ids: core.dev.upload(&ids)?,
            select: if select.is_empty() {
                None
            } else {
                Some(core.dev.upload(&select)?)
            },
            mla: mla_layout(batch).upload(&core.dev)?,
        };
        state
            .slots
            .resize_with(plan.slots.max(state.slots.len()), Slot::default);
        for (buf, data) in bound {
            let slot = &mut state.slots[plan.slot(buf)];
            match graph.desc(buf).storage {
                Storage::Activation => {
                    let v: Vec<bf16> = data.iter().map(|&x| bf16::from_f32(x)).collect();
                    ensure(&core.dev, &mut slot.bf, v.len())?;
                    let b = slot.bf.as_mut().ok_or_else(|| missing("input buffer"))?;
                    core.dev.copy_to_device(&v, b)?;
                }
                Storage::F32 => {
                    ensure(&core.dev, &mut slot.f, data.len())?;
                    let b = slot.f.as_mut().ok_or_else(|| missing("input buffer"))?;
                    core.dev.copy_to_device(data, b)?;
                }
            }
        }
        for op in &graph.nodes {
            core.execute(op, graph, plan, &step, state)?;
        }
        if let Some(ws) = state.moe_ws.as_mut() {
            ws.take_errors(&core.moe)?;
        }
        let mut outputs = Outputs::new();
        for (name, b) in &graph.outputs {
            let desc = graph.desc(*b);
            let rows = match desc.rows {
                Rows::Tokens => tokens,
                Rows::Selected => step.selected,
            };
            let n = rows * desc.width;
            let slot = &state.slots[plan.slot(*b)];
            let data = if n == 0 {
                Vec::new()
            } else {
                match desc.storage {
                    // Only the rows this step produced: the slot may have grown for an
                    // earlier, longer step (a long prefill before many decode steps).
                    Storage::F32 => {
                        let buf = slot.f.as_ref().ok_or_else(|| missing(&desc.name))?;
                        core.dev.download_prefix(buf, n)?
                    }
                    Storage::Activation => {
                        let buf = slot.bf.as_ref().ok_or_else(|| missing(&desc.name))?;
                        let v = core.dev.download_prefix(buf, n)?;
                        v.iter().map(|x| x.to_f32()).collect()
                    }
                }
            };
            outputs.insert(name.clone(), data);
        }
        Ok(outputs)
    }
}
