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
//! Steps are device-resident (docs/design.md, "The decode path"): every workspace is made at
//! construction for the largest step [`CudaOptions`] allows, a step uploads only its metadata
//! (one host-to-device copy), and decode / verification steps replay a CUDA graph captured
//! per batch bucket.
//!
//! Here: options, construction and [`Backend::run`] (one step: pages, metadata, inputs, ops
//! eagerly or as a graph, outputs). Beside it: `weights` (upload and lookup), `pages` (latent
//! caches and their scratch page), `workspace` (persistent buffers, the metadata layout),
//! `graphs` (which steps replay which graph), `moe` (MoeRouted, fused block or fallback),
//! `dispatch` (each graph op as kernels), and `adapters` (config, checkpoint weights and the
//! engine's batch as the kernels' plain numbers).
//!
//! The [`Device`] is opened once per backend; the kernel handles (`Mla`, `MoeOps`, `SmallOps`)
//! hold clones of it, and dropping the backend first waits for its stream.
//! tests/gpu_engine.rs compares it with the CPU w8a8 backend end to end where a device exists.

mod adapters;
mod dispatch;
mod fusion;
mod graphs;
mod moe;
mod pages;
mod weights;
mod workspace;

use std::collections::{HashMap, HashSet};
use std::io::Write as _;
use std::sync::{Arc, OnceLock};

use half::bf16;

pub use adapters::{
    absorbed_kv_b, mla_layout, moe_block_config, router_config, upload_moe_block, upload_rope,
};
use graphs::{fingerprint, graph_step, Counted, GraphEntry, GraphKey, GraphLimits, Graphs};
pub use graphs::{GraphCounters, GraphStats};
use moe::{GpuMoe, MoeSpace};
use weights::{upload, upload_absorbed, upload_dense, upload_f32, upload_fp8, GpuWeight};
use workspace::{
    fill_meta, mla_lens_bound, padded_bf16, MetaLayout, MetaViews, MlaSpace, Padding, QuantSpace,
    StepSizes,
};

use super::ops::{MoeBlockConfig, MoeOps, RouterConfig, SmallOps, SplitKWorkspace};
use super::{
    AllocationCount, Device, DeviceBuffer, Mla, MlaBatch, MlaCache, MlaRope, SampleArgs, SampleRow,
};
use crate::backend::{Backend, Precision, Readout, StepOutput};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::graph::{Graph, Plan, Rows, Storage};
use crate::kv_cache::Batch;
use crate::model::weights::{FfnWeights, ModelWeights, MoeWeights, WeightId};
use crate::model::{main_graph, mtp_graph, LogitRows, HIDDEN_OUT, LOGITS};

/// How the CUDA backend sizes its workspaces and runs decode steps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CudaOptions {
    /// Capture decode and verification steps as CUDA graphs per batch bucket and replay them
    /// (`--no-cuda-graphs` turns it off; so does `R1_NO_CUDA_GRAPHS=1`).
    pub cuda_graphs: bool,
    /// Most tokens of one step the workspaces are made for at load (a larger step grows them).
    pub max_step_tokens: usize,
    /// Most sequences of one step (the largest graph bucket).
    pub max_seqs: usize,
    /// Longest sequence (cache positions) a graph step's block tables hold.
    pub max_seq_len: usize,
}

impl Default for CudaOptions {
    fn default() -> Self {
        CudaOptions {
            cuda_graphs: true,
            max_step_tokens: 512,
            max_seqs: 64,
            max_seq_len: 16384,
        }
    }
}

impl CudaOptions {
    fn check(&self) -> Result<()> {
        for (name, v) in [
            ("max_step_tokens", self.max_step_tokens),
            ("max_seqs", self.max_seqs),
            ("max_seq_len", self.max_seq_len),
        ] {
            if v == 0 {
                return Err(Error::Input(format!(
                    "CUDA backend option {name} must be at least 1"
                )));
            }
        }
        Ok(())
    }
}

/// `R1_CUDA_DEBUG=1` (any value but empty or "0"): the backend says on stderr when and why it
/// grows a workspace or drops its captured graphs.
pub(super) fn debug_log(msg: impl FnOnce() -> String) {
    static ON: OnceLock<bool> = OnceLock::new();
    if *ON.get_or_init(|| super::env_switch("R1_CUDA_DEBUG")) {
        let _ = writeln!(std::io::stderr().lock(), "r1-cuda: {}", msg());
    }
}

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
    /// kv_b_proj dequantized to bf16 in the absorbed layout (per head W_UK^T `[kv_lora][nope]`,
    /// then W_UV `[v][kv_lora]`; [`absorbed_kv_b`]), by its WeightId.
    absorbed: HashMap<WeightId, DeviceBuffer<bf16>>,
    /// Routed experts by the layer's router WeightId.
    moe_layers: HashMap<WeightId, GpuMoe>,
    /// Latent cache layers: the decoder blocks, then the MTP layer's.
    cache_layers: usize,
    /// The step sizes the workspaces were made for, and the graph steps' limits.
    limits: GraphLimits,
    /// Decode and verification steps replay CUDA graphs.
    graphs_on: bool,
    /// Run the decode path's fused kernels (fusion.rs); off with `R1_NO_FUSION=1`.
    fusion: bool,
    /// Partials and counters of every split-K GEMM (one stream runs them one at a time).
    split_k: SplitKWorkspace,
}

/// A graph buffer's storage: bf16 activations or f32 (logits), grown as needed.
#[derive(Default)]
struct Slot {
    bf: Option<DeviceBuffer<bf16>>,
    f: Option<DeviceBuffer<f32>>,
}

/// Makes `buf` hold at least `len` elements: a no-op for every buffer the workspaces made
/// ([`Core::reserve`] runs before each step), a growth (said under `R1_CUDA_DEBUG`) otherwise.
fn ensure<T: bytemuck::Pod>(
    dev: &Device,
    buf: &mut Option<DeviceBuffer<T>>,
    len: usize,
) -> Result<()> {
    workspace::grow(dev, buf, len, "a step buffer")
}

fn missing(what: &str) -> Error {
    Error::Backend {
        backend: "cuda".into(),
        message: format!("internal: {what} was not computed before use"),
    }
}

/// Mutable state: buffers, caches, workspaces, captured graphs.
struct State {
    /// First, so that the graphs are destroyed before the buffers they name.
    graphs: Graphs,
    slots: Vec<Slot>,
    /// Per cache layer (the MTP layer last); all with the same page count, the last page
    /// being the scratch page of graph padding.
    cache: Vec<MlaCache>,
    q_attn: Option<DeviceBuffer<bf16>>,
    o_lat: Option<DeviceBuffer<bf16>>,
    lse: Option<DeviceBuffer<f32>>,
    /// Quantized activations of the graph's FP8 Linears' inputs, per slot.
    quant: dispatch::QuantStore,
    /// Quantized activations of Linears whose input is not a graph buffer (the MoE fallback).
    scratch_quant: QuantSpace,
    /// The MLA fast path's scratch, viewed per split plan.
    mla_space: MlaSpace,
    /// Whether this step's split-KV schedule is already in its workspace (every layer of a
    /// step shares the batch layout, so the first attention schedules for all).
    mla_scheduled: bool,
    moe: MoeSpace,
    /// The step metadata block ([`workspace::MetaLayout`]) and its host staging.
    meta: Option<DeviceBuffer<i32>>,
    staging: Vec<i32>,
    input_staging: Vec<bf16>,
    /// The device's allocation count when the graphs were last known valid.
    seen_allocs: AllocationCount,
    /// Real tokens and selected rows of the last step (what its outputs hold).
    last_rows: (usize, usize),
    /// The draws a step asks for (host staging and device copy) and the tokens drawn.
    sample_staging: Vec<SampleRow>,
    sample_rows: Option<DeviceBuffer<SampleRow>>,
    sampled: Option<DeviceBuffer<i32>>,
}

/// Per-run device data of the step: views of the metadata block.
struct StepData {
    tokens: usize,
    selected: usize,
    ids: DeviceBuffer<i32>,
    select: Option<DeviceBuffer<i32>>,
    mla: MlaBatch,
}

/// A graph output's device buffer ([`CudaBackend::output_buffer`]).
#[derive(Debug)]
pub enum DeviceOutput<'a> {
    /// f32 `[rows][width]` (logits).
    F32(&'a DeviceBuffer<f32>),
    /// bf16 `[rows][width]` (activations such as the final hidden state).
    Bf16(&'a DeviceBuffer<bf16>),
}

/// Where a named output of the last step lies on the device: its first `rows * width`
/// elements (the buffer may be longer).
#[derive(Debug)]
pub struct OutputSlot<'a> {
    pub data: DeviceOutput<'a>,
    pub rows: usize,
    pub width: usize,
}

pub struct CudaBackend {
    core: Core,
    state: State,
    /// Keeps the host weights alive for the backend's lifetime (the graphs name them).
    _host: Arc<ModelWeights>,
    options: CudaOptions,
}

impl CudaBackend {
    /// Opens CUDA device 0, uploads the weights, loads the kernels and makes the workspaces
    /// for the largest step `options` allows. Only the w8a8 recipe runs on the GPU.
    pub fn new(
        cfg: &ModelConfig,
        weights: Arc<ModelWeights>,
        precision: Precision,
        options: &CudaOptions,
    ) -> Result<Self> {
        if precision != Precision::W8a8 {
            return Err(Error::Unsupported(
                "the CUDA backend runs the w8a8 recipe only: pass --precision w8a8".into(),
            ));
        }
        options.check()?;
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
            absorbed.insert(
                b.attn.kv_b,
                upload_absorbed(dev, cfg, weights.get(b.attn.kv_b))?,
            );
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
        // Largest K of any FP8 weight: the quantized activations hold it for a whole step.
        let max_k = gpu
            .values()
            .filter_map(|w| match w {
                GpuWeight::Fp8(w) => Some(w.k),
                GpuWeight::Dense { .. } => None,
            })
            .chain(moe_layers.values().flat_map(|l| match l {
                GpuMoe::Fallback { experts, .. } => {
                    experts.iter().flat_map(|e| e.iter().map(|w| w.k)).collect()
                }
                GpuMoe::Fast(_) => Vec::new(),
            }))
            .max()
            .unwrap_or(1);
        let limits = GraphLimits {
            max_step_tokens: options.max_step_tokens,
            max_seqs: options.max_seqs,
            max_seq_len: options.max_seq_len,
        };
        let capturable = capturable(&moe_layers);
        let split_k = SplitKWorkspace::for_device(&device)?;
        let core = Core {
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
            limits,
            graphs_on: options.cuda_graphs && capturable && !super::env_switch("R1_NO_CUDA_GRAPHS"),
            fusion: !super::env_switch("R1_NO_FUSION"),
            split_k,
        };
        let mut state = State {
            graphs: Graphs::default(),
            slots: Vec::new(),
            cache: Vec::new(),
            q_attn: None,
            o_lat: None,
            lse: None,
            quant: dispatch::QuantStore::default(),
            scratch_quant: QuantSpace {
                q: None,
                scales: None,
                max_k,
            },
            mla_space: MlaSpace::default(),
            mla_scheduled: false,
            moe: MoeSpace::default(),
            meta: None,
            staging: Vec::new(),
            input_staging: Vec::new(),
            seen_allocs: AllocationCount::default(),
            last_rows: (0, 0),
            sample_staging: Vec::new(),
            sample_rows: None,
            sampled: None,
        };
        core.make_workspaces(&mut state, &weights)?;
        Ok(CudaBackend {
            core,
            state,
            _host: weights,
            options: options.clone(),
        })
    }

    /// The device this backend runs on.
    pub fn device(&self) -> &Device {
        &self.core.dev
    }

    /// Runs the fused kernels (the default) or every graph node as its own kernels (what
    /// `R1_NO_FUSION=1` selects at construction); both give the same bits. Graphs captured
    /// the other way are dropped.
    pub fn set_fusion(&mut self, on: bool) -> Result<()> {
        if self.core.fusion != on {
            self.core.dev.synchronize()?;
            self.state.graphs.entries.clear();
            self.core.fusion = on;
        }
        Ok(())
    }

    /// Replays decode and verification steps as CUDA graphs (when the model allows it), or
    /// runs them eagerly (what `--no-cuda-graphs` selects at load). Graphs captured so far
    /// are dropped.
    pub fn set_cuda_graphs(&mut self, on: bool) -> Result<()> {
        let on = on && capturable(&self.core.moe_layers);
        if self.core.graphs_on != on {
            self.core.dev.synchronize()?;
            self.state.graphs.entries.clear();
            self.core.graphs_on = on;
        }
        Ok(())
    }

    /// The options the backend was built with.
    pub fn options(&self) -> &CudaOptions {
        &self.options
    }

    /// Whether decode and verification steps replay CUDA graphs (the option, unless
    /// `R1_NO_CUDA_GRAPHS` is set or a MoE layer takes the fallback, which synchronizes).
    pub fn cuda_graphs(&self) -> bool {
        self.core.graphs_on
    }

    /// The batch buckets decode and verification steps are padded to (1, 2, 4, ..., then
    /// `max_seqs`).
    pub fn graph_buckets(&self) -> Vec<usize> {
        graphs::buckets(self.options.max_seqs)
    }

    /// How steps ran so far (captures, replays, eager steps), as a handle that stays valid
    /// after the backend moves into an engine.
    pub fn graph_counters(&self) -> Arc<GraphCounters> {
        Arc::clone(&self.state.graphs.counters)
    }

    /// The device buffer of the last step's output `name` of `graph` (`logits`, the final
    /// hidden state, ...), with the rows that step produced: what a caller reads or samples
    /// from on the device instead of [`Backend::run`]'s host copy.
    pub fn output_buffer(&self, graph: &Graph, plan: &Plan, name: &str) -> Result<OutputSlot<'_>> {
        output_slot(&self.state.slots, graph, plan, name, self.state.last_rows)
    }
}

impl Core {
    /// The workspaces for the largest step within the limits: the slots of the model's graphs,
    /// the attention, quantization, MLA and MoE buffers, and the metadata block.
    fn make_workspaces(&self, state: &mut State, weights: &ModelWeights) -> Result<()> {
        let l = self.limits;
        let (t, seqs) = (l.max_step_tokens, l.max_seqs.min(l.max_step_tokens));
        for rows in [LogitRows::All, LogitRows::Last] {
            let graphs = [
                Some(main_graph(&self.cfg, weights, rows)),
                mtp_graph(&self.cfg, weights, rows),
            ];
            for g in graphs.iter().flatten() {
                self.reserve_slots(state, g, &Plan::new(g), t, t)?;
            }
        }
        let heads = self.cfg.num_attention_heads;
        let bound = mla_lens_bound(self.dev.info().sm_count, heads, t, seqs);
        state.mla_space.reserve(&self.dev, bound)?;
        let meta = MetaLayout::new(t, t, seqs, l.pages_per_seq());
        self.reserve_rest(
            state,
            StepSizes {
                tokens: t,
                rows: t,
                seqs,
                max_q_len: 1,
                meta_len: meta.len,
            },
        )
    }
}

/// Whether a model's steps can be captured: a captured step may not synchronize, and the MoE
/// fallback reads its flags per layer.
fn capturable(moe_layers: &HashMap<WeightId, GpuMoe>) -> bool {
    moe_layers.values().all(|l| matches!(l, GpuMoe::Fast(_)))
}

/// Output `name` of `graph` as it lies in `slots` after a step whose real sequences brought
/// `tokens` tokens and `selected` selected rows.
fn output_slot<'s>(
    slots: &'s [Slot],
    graph: &Graph,
    plan: &Plan,
    name: &str,
    (tokens, selected): (usize, usize),
) -> Result<OutputSlot<'s>> {
    let b = graph
        .output(name)
        .ok_or_else(|| Error::Input(format!("the graph has no output named `{name}`")))?;
    let desc = graph.desc(b);
    let slot = slots.get(plan.slot(b)).ok_or_else(|| missing(&desc.name))?;
    let data = match desc.storage {
        Storage::F32 => DeviceOutput::F32(slot.f.as_ref().ok_or_else(|| missing(name))?),
        Storage::Activation => DeviceOutput::Bf16(slot.bf.as_ref().ok_or_else(|| missing(name))?),
    };
    Ok(OutputSlot {
        data,
        rows: match desc.rows {
            Rows::Tokens => tokens,
            Rows::Selected => selected,
        },
        width: desc.width,
    })
}

impl OutputSlot<'_> {
    /// Its `rows * width` values, downloaded (bf16 widened to f32; waits for the stream).
    pub fn download(&self, dev: &Device) -> Result<Vec<f32>> {
        let n = self.rows * self.width;
        Ok(match self.data {
            DeviceOutput::F32(b) => dev.download_prefix(b, n)?,
            DeviceOutput::Bf16(b) => dev
                .download_prefix(b, n)?
                .iter()
                .map(|x| x.to_f32())
                .collect(),
        })
    }
}

impl Drop for CudaBackend {
    /// Waits for the work queued on the stream before the buffers it uses are freed.
    fn drop(&mut self) {
        let _ = self.core.dev.synchronize();
        // The graphs go before the weights and buffers they name (`core` drops first).
        self.state.graphs.entries.clear();
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
        readout: &Readout<'_>,
    ) -> Result<StepOutput> {
        readout.check(batch)?;
        let core = &self.core;
        let state = &mut self.state;
        let bound = graph.bind_inputs(batch, inputs)?;
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
        mla_layout(batch).check()?;
        core.prepare_pages(state, batch)?;

        // Decode and verification replay a graph in their bucket, padded with sequences that
        // live in the scratch page; everything else runs as it comes.
        let gstep = if core.graphs_on {
            graph_step(&core.limits, batch)
        } else {
            None
        };
        let pad = match gstep {
            Some(g) => Some(Padding {
                seqs: g.seqs,
                tokens_per_seq: g.shape.tokens_per_seq,
                rows_per_seq: g.shape.rows_per_seq,
                scratch_page: core.scratch_page(state)?,
                bt_stride: core.limits.pages_per_seq(),
            }),
            None => None,
        };
        let mut staging = std::mem::take(&mut state.staging);
        let meta = fill_meta(batch, pad, &mut staging);
        let l = meta.layout;
        core.reserve(
            state,
            graph,
            plan,
            StepSizes {
                tokens: l.tokens,
                rows: l.rows,
                seqs: l.seqs,
                max_q_len: meta.max_q_len,
                meta_len: l.len,
            },
        )?;
        // Graphs name buffers by address: any allocation or free since they were captured
        // (a grown cache or workspace) may have moved one.
        let allocs = core.dev.allocations();
        if allocs != state.seen_allocs {
            if !state.graphs.entries.is_empty() {
                debug_log(|| {
                    format!(
                        "device buffers were reallocated: dropping {} captured graphs",
                        state.graphs.entries.len()
                    )
                });
                core.dev.synchronize()?;
                state.graphs.entries.clear();
            }
            state.seen_allocs = allocs;
        }

        // The step's one metadata upload.
        let block = state
            .meta
            .as_mut()
            .ok_or_else(|| missing("the metadata block"))?;
        core.dev.copy_to_device(&staging, block)?;
        state.staging = staging;
        let views = MetaViews::new(block, &meta)?;
        let step = StepData {
            tokens: l.tokens,
            selected: l.rows,
            ids: views.ids,
            select: views.select,
            mla: views.mla,
        };
        for (buf, data) in bound {
            let width = graph.desc(buf).width;
            let slot = &mut state.slots[plan.slot(buf)];
            match graph.desc(buf).storage {
                Storage::Activation => {
                    padded_bf16(data, width, l.tokens, &mut state.input_staging);
                    let b = slot.bf.as_mut().ok_or_else(|| missing("input buffer"))?;
                    core.dev.copy_to_device(&state.input_staging, b)?;
                }
                Storage::F32 => {
                    let mut v = data.to_vec();
                    v.resize(l.tokens * width, 0.0);
                    let b = slot.f.as_mut().ok_or_else(|| missing("input buffer"))?;
                    core.dev.copy_to_device(&v, b)?;
                }
            }
        }

        state.mla_scheduled = false;
        match gstep {
            Some(g) => {
                let key = GraphKey {
                    graph: fingerprint(graph),
                    step: g,
                };
                core.run_graph(state, graph, plan, &step, key)?;
            }
            None => {
                core.execute_all(graph, plan, &step, state)?;
                state.graphs.counters.count(Counted::Eager);
            }
        }
        state.moe.take_errors(core)?;
        state.last_rows = (meta.real_tokens, meta.real_rows);

        core.read_out(state, graph, plan, readout)
    }
}

impl Core {
    /// What `readout` asks of the step just run (its real sequences' rows, `State::last_rows`;
    /// padding sequences come after them): draws run on the device and only their token ids
    /// come back; logits rows and hidden states are downloaded when asked.
    fn read_out(
        &self,
        state: &mut State,
        graph: &Graph,
        plan: &Plan,
        readout: &Readout<'_>,
    ) -> Result<StepOutput> {
        let vocab = self.cfg.vocab_size;
        let logits = output_slot(&state.slots, graph, plan, LOGITS, state.last_rows)?;
        let rows = logits.rows;
        if readout.rows.len() != rows {
            return Err(missing("a readout row for every selected row"));
        }
        let DeviceOutput::F32(logits) = logits.data else {
            return Err(missing("f32 logits"));
        };
        let mut out = StepOutput {
            tokens: vec![None; rows],
            ..StepOutput::default()
        };
        let mut staging = std::mem::take(&mut state.sample_staging);
        staging.clear();
        staging.extend(
            readout
                .rows
                .iter()
                .enumerate()
                .filter_map(|(i, r)| r.draw.map(|d| SampleRow::new(i, &d))),
        );
        if !staging.is_empty() {
            let n = staging.len();
            let (Some(sample_rows), Some(sampled)) =
                (state.sample_rows.as_mut(), state.sampled.as_mut())
            else {
                return Err(missing("the sampling buffers"));
            };
            self.dev.copy_to_device(&staging, sample_rows)?;
            self.dev.sample_into(SampleArgs {
                logits,
                vocab,
                rows: sample_rows,
                n_rows: n,
                tokens: sampled,
            })?;
            let drawn = self.dev.download_prefix(sampled, n)?;
            for (row, &t) in staging.iter().zip(&drawn) {
                let token = u32::try_from(t).ok().filter(|&t| (t as usize) < vocab);
                out.tokens[row.row as usize] = Some(token.ok_or_else(|| Error::Backend {
                    backend: "cuda".into(),
                    message: format!("the device drew token {t} for row {}", row.row),
                })?);
            }
        }
        state.sample_staging = staging;
        // Logits rows: the rows up to the last one asked come back in one copy.
        if let Some(last) = readout.rows.iter().rposition(|r| r.logits) {
            let all = self.dev.download_prefix(logits, (last + 1) * vocab)?;
            for (i, row) in all.chunks(vocab).enumerate() {
                if readout.rows[i].logits {
                    out.logits.extend_from_slice(row);
                }
            }
        }
        if readout.hidden {
            out.hidden = output_slot(&state.slots, graph, plan, HIDDEN_OUT, state.last_rows)?
                .download(&self.dev)?;
        }
        Ok(out)
    }

    /// Every op of `graph`, queued in order.
    fn execute_all(
        &self,
        graph: &Graph,
        plan: &Plan,
        step: &StepData,
        state: &mut State,
    ) -> Result<()> {
        let fusion = if self.fusion {
            fusion::FusionPlan::new(graph, |w| {
                matches!(self.weights.get(&w), Some(GpuWeight::Fp8(_)))
            })
        } else {
            fusion::FusionPlan::unfused(graph)
        };
        state.quant.begin_step();
        for (i, op) in graph.nodes.iter().enumerate() {
            self.execute(i, op, graph, plan, &fusion, step, state)?;
        }
        Ok(())
    }

    /// A graph step: replays its bucket's graph, or captures it first (then launches it, which
    /// runs this step). A bucket whose capture failed runs eagerly from then on, padded the
    /// same way.
    fn run_graph(
        &self,
        state: &mut State,
        graph: &Graph,
        plan: &Plan,
        step: &StepData,
        key: GraphKey,
    ) -> Result<()> {
        let counters = Arc::clone(&state.graphs.counters);
        match state.graphs.entries.get(&key) {
            Some(GraphEntry::Captured { graph, moe_used }) => {
                graph.launch()?;
                state.moe.used = *moe_used;
                counters.count(Counted::Replayed);
                return Ok(());
            }
            Some(GraphEntry::Failed) => {
                self.execute_all(graph, plan, step, state)?;
                counters.count(Counted::Eager);
                return Ok(());
            }
            None => {}
        }
        let captured = self
            .dev
            .capture(key.label(), || self.execute_all(graph, plan, step, state));
        match captured {
            Ok(g) => {
                g.launch()?;
                let entry = GraphEntry::Captured {
                    graph: g,
                    moe_used: state.moe.used,
                };
                state.graphs.entries.insert(key, entry);
                counters.count(Counted::Captured);
            }
            Err(e) => {
                debug_log(|| format!("graph {} not captured ({e}); it runs eagerly", key.label()));
                state.graphs.entries.insert(key, GraphEntry::Failed);
                counters.count(Counted::Failed);
                state.mla_scheduled = false;
                self.execute_all(graph, plan, step, state)?;
                counters.count(Counted::Eager);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_options_are_the_documented_ones() {
        let o = CudaOptions::default();
        assert!(o.cuda_graphs);
        assert_eq!(
            (o.max_step_tokens, o.max_seqs, o.max_seq_len),
            (512, 64, 16384)
        );
        o.check().unwrap();
        let e = CudaOptions { max_seqs: 0, ..o }
            .check()
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_seqs must be at least 1"), "{e}");
    }

    /// The fixtures the GPU tests run: r1-heads takes the fused MoE block (its steps are
    /// captured), small-odd the fallback (which synchronizes, so it runs without graphs).
    #[test]
    fn fixture_moe_paths_decide_graph_capture() {
        use crate::cuda::heuristics::{moe_routed_path, MoeRoutedPath};
        for (json, path) in [
            (
                include_str!("../../../tests/fixtures/r1-heads/config.json"),
                MoeRoutedPath::Fused,
            ),
            (
                include_str!("../../../tests/fixtures/small-odd/config.json"),
                MoeRoutedPath::PerExpert,
            ),
        ] {
            let cfg = ModelConfig::from_json(json, std::path::Path::new("config.json")).unwrap();
            let block = MoeBlockConfig {
                shared_inter: 0,
                ..moe_block_config(&cfg)
            };
            assert_eq!(moe_routed_path(&block), path);
        }
    }
}
