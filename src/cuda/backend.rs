//! The CUDA [`Backend`]: runs the model graphs on one Hopper GPU with the w8a8 recipe
//! (DESIGN.md "numerics contract"), mirroring the CPU backend's w8a8 semantics op by op:
//!
//! - Embed / RmsNorm / Add / Concat / SiluMul / ZeroPositionZero / SelectRows: the simple
//!   kernels of cuda/small_ops.cu (bf16 buffers, f32 arithmetic, one rounding per op).
//! - Linear on an FP8 weight: act_quant (cuda/act_quant.cu when K % 128 == 0, else the small
//!   ragged-K kernel) + fp8_gemm (Auto: wgmma where it applies, the reference kernel
//!   otherwise); on a dense weight (lm_head, eh_proj): the small bf16 GEMM (f32 logits).
//! - MlaCacheWrite / MlaAttention: cuda/mla.cu's cache write, q RoPE and attention (the
//!   split-KV wgmma fast path, scheduled once per step, where the shapes apply; the reference
//!   kernel otherwise) over this backend's paged latent caches (grown as block ids appear,
//!   pages copied when a forked sequence writes into a shared one), with the absorption GEMMs
//!   (q_nope · W_UK, o_lat · W_UV^T) against kv_b_proj dequantized to bf16.
//! - MoeRouted: the fused MoE block (routed experts only; the shared expert is graph nodes)
//!   where its shapes apply (hidden and moe_intermediate multiples of 128); otherwise a
//!   simple fallback: the GPU router, then every expert's MLP over all tokens, accumulated
//!   with each token's routing weight (zero for experts it did not choose).
//!
//! The [`Device`] is opened once per backend; the kernel handles (`Mla`, `MoeOps`, `SmallOps`)
//! hold clones of it, and dropping the backend first waits for its stream.
//! Status: compiled here, not yet run on a GPU (tests/gpu_engine.rs compares it with the CPU
//! w8a8 backend end to end where a device exists).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use half::bf16;

use super::ops::{
    act_scale_m_pad, ActQuantArgs, ActQuantDesc, CopyRowsDesc, Fp8GemmArgs, Fp8Weight,
    GemmBf16Desc, GemmKernel, MlaAbsorbDesc, MoeAccumDesc, MoeBlockConfig, MoeBlockWeights,
    MoeGemmPath, MoeLayout, MoeOps, MoeWorkspace, QuantizedActivations, Region, RouterArgs,
    RouterConfig, RouterLogitsArgs, SmallOps, QUANT_BLOCK,
};
use super::{
    mla_plan_parts, Device, DeviceBuffer, Mla, MlaAttnArgs, MlaBatch, MlaCache, MlaCacheWriteArgs,
    MlaKernel, MlaLayout, MlaQRopeArgs, MlaRope, MlaWorkspace,
};
use crate::backend::{Backend, Outputs, Precision};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::graph::{Buf, Graph, Op, Plan, Rows, Storage};
use crate::kv_cache::{Batch, PAGE_TOKENS};
use crate::model::weights::{FfnWeights, ModelWeights, MoeWeights, Weight, WeightId};
use crate::numerics::{e4m3_to_f32, round_bf16};

/// A weight on the device as the graph's ops use it.
enum GpuWeight {
    Fp8(Fp8Weight),
    /// A BF16 tensor (norms, embeddings, dense heads), bf16 `[rows][cols]`.
    Dense {
        data: DeviceBuffer<bf16>,
        rows: usize,
        cols: usize,
    },
}

/// One MoE layer's routed experts on the device.
enum GpuMoe {
    Fast(Box<MoeBlockWeights>),
    Fallback {
        router: DeviceBuffer<bf16>,
        bias: DeviceBuffer<f32>,
        experts: Vec<[Fp8Weight; 3]>,
    },
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

/// The workspace for `parts` splits, grown to hold a step of `batch` sequences with up to
/// `max_q_len` queries of `heads` heads.
fn mla_workspace<'s>(
    dev: &Device,
    spaces: &'s mut HashMap<usize, MlaWorkspace>,
    parts: usize,
    (batch, heads, max_q_len): (usize, usize, usize),
) -> Result<&'s mut MlaWorkspace> {
    let have = spaces.get(&parts).filter(|w| w.heads == heads);
    if !have.is_some_and(|w| w.batch >= batch && w.max_q_len >= max_q_len) {
        let (b, q) = have.map_or((batch, max_q_len), |w| {
            (w.batch.max(batch), w.max_q_len.max(max_q_len))
        });
        let ws = MlaWorkspace::with_parts(dev, b, heads, q, parts)?;
        spaces.insert(parts, ws);
    }
    spaces
        .get_mut(&parts)
        .ok_or_else(|| missing("the MLA workspace"))
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
        let rope = MlaRope::new(dev, cfg)?;
        let router = RouterConfig::from_model(cfg);

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
            ..MoeBlockConfig::from_model(cfg)
        };
        let fast = fast_cfg.check().is_ok();
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
                    GpuMoe::Fast(Box::new(MoeBlockWeights::from_model(
                        dev, &fast_cfg, &weights, &routed,
                    )?))
                } else {
                    router.check("moe_router")?;
                    GpuMoe::Fallback {
                        router: upload_dense(dev, weights.get(m.router))?.0,
                        bias: dev.upload(dense_f32(&weights, m.bias)?)?,
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
            let w = match weights.get(id) {
                Weight::Fp8(_) => GpuWeight::Fp8(upload_fp8(dev, weights.get(id))?),
                w @ Weight::Dense { .. } => {
                    let (data, rows, cols) = upload_dense(dev, w)?;
                    GpuWeight::Dense { data, rows, cols }
                }
            };
            gpu.insert(id, w);
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

fn upload_fp8(dev: &Device, w: &Weight) -> Result<Fp8Weight> {
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
fn upload_dense(dev: &Device, w: &Weight) -> Result<(DeviceBuffer<bf16>, usize, usize)> {
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

fn dense_f32(weights: &ModelWeights, id: WeightId) -> Result<&[f32]> {
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
fn upload_absorbed(dev: &Device, w: &Weight) -> Result<DeviceBuffer<bf16>> {
    let v: Vec<bf16> = match w {
        Weight::Dense { data, .. } => data.iter().map(|&x| bf16::from_f32(x)).collect(),
        Weight::Fp8(w) => {
            let kb = w.k.div_ceil(QUANT_BLOCK);
            w.codes
                .as_slice()
                .iter()
                .enumerate()
                .map(|(i, &c)| {
                    let (n, k) = (i / w.k, i % w.k);
                    let x = e4m3_to_f32(c) * w.scales[(n / QUANT_BLOCK) * kb + k / QUANT_BLOCK];
                    bf16::from_f32(round_bf16(x))
                })
                .collect()
        }
    };
    Ok(dev.upload(&v)?)
}

impl Core {
    fn weight(&self, id: WeightId) -> Result<&GpuWeight> {
        self.weights.get(&id).ok_or_else(|| Error::Backend {
            backend: "cuda".into(),
            message: format!("weight {} was not uploaded for this use", id.0),
        })
    }

    fn dense(&self, id: WeightId) -> Result<(&DeviceBuffer<bf16>, usize, usize)> {
        match self.weight(id)? {
            GpuWeight::Dense { data, rows, cols } => Ok((data, *rows, *cols)),
            GpuWeight::Fp8(_) => Err(Error::Unsupported(format!(
                "weight {} is FP8 where a dense tensor is expected",
                id.0
            ))),
        }
    }

    /// x (bf16 `[m][k]`, contiguous) quantized per token per 128 channels.
    fn quantize(&self, x: &DeviceBuffer<bf16>, m: usize, k: usize) -> Result<QuantizedActivations> {
        let m_pad = act_scale_m_pad(m);
        let mut q = self.dev.alloc::<u8>(m * k)?;
        // Zeroed: the SA layout's padding rows are read (never stored) by the GEMMs.
        let mut scales = self
            .dev
            .alloc_zeros::<f32>(k.div_ceil(QUANT_BLOCK) * m_pad)?;
        if k % QUANT_BLOCK == 0 {
            self.dev
                .prepare_act_quant(ActQuantArgs {
                    x,
                    ldx: k,
                    q: &mut q,
                    ldq: k,
                    scales: &mut scales,
                    m_pad,
                    m,
                    k,
                })?
                .launch()?;
        } else {
            self.small
                .prepare_act_quant(ActQuantDesc {
                    m,
                    k,
                    x: x.into(),
                    ldx: k,
                    q: Region::from(&q),
                    ldq: k,
                    scales: Region::from(&scales),
                    m_pad,
                })?
                .launch()?;
        }
        Ok(QuantizedActivations {
            q,
            scales,
            m,
            k,
            m_pad,
        })
    }

    /// d (bf16 `[m][w.n]`) = x · W^T in w8a8.
    fn fp8_linear(
        &self,
        x: &DeviceBuffer<bf16>,
        m: usize,
        w: &Fp8Weight,
        d: &mut DeviceBuffer<bf16>,
    ) -> Result<()> {
        let a = self.quantize(x, m, w.k)?;
        self.dev
            .prepare_fp8_gemm(
                Fp8GemmArgs {
                    a: &a.q,
                    lda: w.k,
                    sa: &a.scales,
                    m_pad: a.m_pad,
                    b: &w.codes,
                    ldb: w.k,
                    sb: &w.scales,
                    d,
                    ldd: w.n,
                    m,
                    n: w.n,
                    k: w.k,
                },
                GemmKernel::Auto,
            )?
            .launch()?;
        Ok(())
    }

    /// Routed experts of one MoE layer: x bf16 `[t][h]` -> out bf16 `[t][h]`.
    fn moe_routed(
        &self,
        layer: &GpuMoe,
        ws: &mut Option<MoeWorkspace>,
        x: &DeviceBuffer<bf16>,
        t: usize,
        out: &mut DeviceBuffer<bf16>,
    ) -> Result<()> {
        let h = self.cfg.hidden_size;
        match layer {
            GpuMoe::Fast(w) => {
                if ws.as_ref().is_none_or(|ws| ws.capacity < t) {
                    *ws = None;
                    let cfg = MoeBlockConfig {
                        shared_inter: 0,
                        ..MoeBlockConfig::from_model(&self.cfg)
                    };
                    *ws = Some(MoeWorkspace::new(
                        &self.dev,
                        cfg,
                        t,
                        MoeLayout::auto(t),
                        MoeGemmPath::Fast,
                    )?);
                }
                let ws = ws.as_mut().ok_or_else(|| missing("the MoE workspace"))?;
                self.moe.moe_forward(ws, w, x, t, out)?;
                Ok(())
            }
            GpuMoe::Fallback {
                router,
                bias,
                experts,
            } => {
                let (e, k) = (self.router.experts, self.router.top_k);
                let dev = &self.dev;
                let mut logits = dev.alloc::<f32>(t * e)?;
                let mut ids = dev.alloc::<i32>(t * k)?;
                let mut wts = dev.alloc::<f32>(t * k)?;
                let mut flags = self.moe.alloc_flags()?;
                self.moe
                    .prepare_router_logits(RouterLogitsArgs {
                        x,
                        ldx: h,
                        w: router,
                        logits: &mut logits,
                        tokens: t,
                        experts: e,
                        hidden: h,
                    })?
                    .launch()?;
                self.moe
                    .prepare_router(RouterArgs {
                        cfg: self.router,
                        tokens: t,
                        logits: &logits,
                        bias: Some(bias),
                        topk_ids: &mut ids,
                        topk_weights: &mut wts,
                        flags: &mut flags,
                    })?
                    .launch()?;
                let acc = dev.alloc_zeros::<f32>(t * h)?;
                let mut y = dev.alloc::<bf16>(t * h)?;
                for (ei, [gate, up, down]) in experts.iter().enumerate() {
                    let inter = gate.n;
                    let mut g = dev.alloc::<bf16>(t * inter)?;
                    let mut u = dev.alloc::<bf16>(t * inter)?;
                    let mut a = dev.alloc::<bf16>(t * inter)?;
                    self.fp8_linear(x, t, gate, &mut g)?;
                    self.fp8_linear(x, t, up, &mut u)?;
                    self.small
                        .prepare_silu_mul(&g, &u, &mut a, t * inter)?
                        .launch()?;
                    self.fp8_linear(&a, t, down, &mut y)?;
                    self.small
                        .prepare_moe_accum(MoeAccumDesc {
                            tokens: t,
                            width: h,
                            top_k: k,
                            expert: ei,
                            y: Region::from(&y),
                            acc: Region::from(&acc),
                            topk_ids: Region::from(&ids),
                            topk_weights: Region::from(&wts),
                        })?
                        .launch()?;
                }
                self.small.prepare_f32_to_bf16(&acc, out, t * h)?.launch()?;
                // Synchronizes: surfaces NaN router inputs as the CPU does.
                self.moe.read_flags(&flags)?.into_result()?;
                Ok(())
            }
        }
    }

    /// Grows every layer's cache to hold the batch's block ids (contents kept), then queues
    /// the batch's page copies.
    fn prepare_pages(&self, state: &mut State, batch: &Batch) -> Result<()> {
        self.ensure_pages(state, batch.pages_needed().max(1))?;
        for cache in &mut state.cache {
            let page = PAGE_TOKENS * cache.width();
            for c in &batch.page_copies {
                self.dev.copy_within(
                    &mut cache.data,
                    c.src as usize * page,
                    c.dst as usize * page,
                    page,
                )?;
            }
        }
        Ok(())
    }

    /// Grows every layer's cache to at least `needed` pages (contents kept).
    fn ensure_pages(&self, state: &mut State, needed: usize) -> Result<()> {
        let cfg = &self.cfg;
        let layers = self.cache_layers;
        let (kv_lora, rope) = (cfg.kv_lora_rank, cfg.qk_rope_head_dim);
        let width = kv_lora + rope;
        let have = state.cache.first().map_or(0, |c| c.num_pages);
        if state.cache.len() == layers && have >= needed {
            return Ok(());
        }
        let pages = needed.max(2 * have);
        let old = std::mem::take(&mut state.cache);
        for layer in 0..layers {
            let fresh = MlaCache::new(&self.dev, pages, kv_lora, rope)?;
            if let Some(prev) = old.get(layer).filter(|c| c.num_pages > 0) {
                let cols = PAGE_TOKENS * width;
                self.small
                    .prepare_copy_rows(CopyRowsDesc {
                        rows: prev.num_pages,
                        cols,
                        src: Region::from(&prev.data),
                        lds: cols,
                        src_col: 0,
                        src_rows: prev.num_pages,
                        dst: Region::from(&fresh.data),
                        ldd: cols,
                        dst_col: 0,
                        row_map: None,
                    })?
                    .launch()?;
            }
            state.cache.push(fresh);
        }
        // The old pages are freed only after the copies ran.
        self.dev.synchronize()?;
        drop(old);
        Ok(())
    }

    fn execute(
        &self,
        op: &Op,
        graph: &Graph,
        plan: &Plan,
        step: &StepData,
        state: &mut State,
    ) -> Result<()> {
        let rows_of = |b: Buf| match graph.desc(b).rows {
            Rows::Tokens => step.tokens,
            Rows::Selected => step.selected,
        };
        let width = |b: Buf| graph.desc(b).width;
        let dev = &self.dev;
        let eps = self.cfg.rms_norm_eps;

        // Ops without a single freshly written output first.
        match op {
            Op::ZeroPositionZero { x } => {
                let slot = &mut state.slots[plan.slot(*x)];
                let xb = slot
                    .bf
                    .as_mut()
                    .ok_or_else(|| missing("ZeroPositionZero input"))?;
                return Ok(self
                    .small
                    .prepare_zero_pos0(xb, &step.mla.positions, step.tokens, width(*x))?
                    .launch()?);
            }
            Op::MlaCacheWrite { layer, kv, norm } => {
                let (norm_w, _, _) = self.dense(*norm)?;
                let kvb = state.slots[plan.slot(*kv)]
                    .bf
                    .as_ref()
                    .ok_or_else(|| missing("MlaCacheWrite input"))?;
                let cache = state
                    .cache
                    .get_mut(*layer)
                    .ok_or_else(|| missing("the layer's latent cache"))?;
                return Ok(self.mla.cache_write(MlaCacheWriteArgs {
                    kv: kvb,
                    ld_kv: width(*kv),
                    norm_w,
                    eps,
                    rope: &self.rope,
                    batch: &step.mla,
                    cache,
                })?);
            }
            _ => {}
        }

        let out = op.io().1[0];
        let out_rows = rows_of(out);
        if out_rows == 0 {
            return Ok(()); // e.g. logits of a prefill chunk that selects no rows
        }
        let n_out = out_rows * width(out);
        let out_f32 = graph.desc(out).storage == Storage::F32;
        let mut slot = std::mem::take(&mut state.slots[plan.slot(out)]);
        if out_f32 {
            ensure(dev, &mut slot.f, n_out)?;
        } else {
            ensure(dev, &mut slot.bf, n_out)?;
        }
        let result = self.execute_into(op, graph, plan, step, state, &mut slot, out_rows);
        state.slots[plan.slot(out)] = slot;
        result
    }

    #[allow(clippy::too_many_arguments)]
    fn execute_into(
        &self,
        op: &Op,
        graph: &Graph,
        plan: &Plan,
        step: &StepData,
        state: &mut State,
        out: &mut Slot,
        out_rows: usize,
    ) -> Result<()> {
        let width = |b: Buf| graph.desc(b).width;
        let t = step.tokens;
        let dev = &self.dev;
        let input = |b: Buf| -> Result<&DeviceBuffer<bf16>> {
            state.slots[plan.slot(b)]
                .bf
                .as_ref()
                .ok_or_else(|| missing(&graph.desc(b).name))
        };
        match op {
            Op::Embed { table, out: o } => {
                let (tab, vocab, _) = self.dense(*table)?;
                let ob = out.bf.as_mut().ok_or_else(|| missing("Embed output"))?;
                self.small
                    .prepare_embed(tab, vocab, &step.ids, ob, t, width(*o))?
                    .launch()?;
            }
            Op::RmsNorm { x, weight, out: o } => {
                let (w, _, _) = self.dense(*weight)?;
                let ob = out.bf.as_mut().ok_or_else(|| missing("RmsNorm output"))?;
                self.small
                    .prepare_rms_norm(
                        input(*x)?,
                        w,
                        ob,
                        out_rows,
                        width(*o),
                        self.cfg.rms_norm_eps,
                    )?
                    .launch()?;
            }
            Op::Linear { x, weight, out: o } => {
                let (k, n) = (width(*x), width(*o));
                let xb = input(*x)?;
                match self.weight(*weight)? {
                    GpuWeight::Fp8(w) => {
                        if w.k != k || w.n != n {
                            return Err(Error::Backend {
                                backend: "cuda".into(),
                                message: format!(
                                    "Linear [{out_rows}, {k}] x weight [{}, {}] -> width {n}",
                                    w.n, w.k
                                ),
                            });
                        }
                        let ob = out.bf.as_mut().ok_or_else(|| {
                            Error::Unsupported("an FP8 Linear with an f32 output".into())
                        })?;
                        self.fp8_linear(xb, out_rows, w, ob)?;
                    }
                    GpuWeight::Dense { data, rows, cols } => {
                        if *cols != k || *rows != n {
                            return Err(Error::Backend {
                                backend: "cuda".into(),
                                message: format!(
                                    "Linear [{out_rows}, {k}] x weight [{rows}, {cols}] -> width {n}"
                                ),
                            });
                        }
                        let (region, out_f32) = match (&out.f, &out.bf) {
                            (Some(f), _) if graph.desc(*o).storage == Storage::F32 => {
                                (Region::from(f), true)
                            }
                            (_, Some(b)) => (Region::from(b), false),
                            _ => return Err(missing("Linear output")),
                        };
                        self.small
                            .prepare_gemm_bf16(GemmBf16Desc {
                                m: out_rows,
                                n,
                                k,
                                x: xb.into(),
                                ldx: k,
                                w: data.into(),
                                ldw: k,
                                out: region,
                                ldo: n,
                                out_f32,
                            })?
                            .launch()?;
                    }
                }
            }
            Op::Add { a, b, out: o } => {
                let ob = out.bf.as_mut().ok_or_else(|| missing("Add output"))?;
                self.small
                    .prepare_add(input(*a)?, input(*b)?, ob, out_rows * width(*o))?
                    .launch()?;
            }
            Op::SiluMul { gate, up, out: o } => {
                let ob = out.bf.as_mut().ok_or_else(|| missing("SiluMul output"))?;
                self.small
                    .prepare_silu_mul(input(*gate)?, input(*up)?, ob, out_rows * width(*o))?
                    .launch()?;
            }
            Op::Concat { a, b, out: o } => {
                let (wa, wb, wo) = (width(*a), width(*b), width(*o));
                let ob = out.bf.as_ref().ok_or_else(|| missing("Concat output"))?;
                for (src, cols, dst_col) in [(*a, wa, 0), (*b, wb, wa)] {
                    self.small
                        .prepare_copy_rows(CopyRowsDesc {
                            rows: out_rows,
                            cols,
                            src: input(src)?.into(),
                            lds: cols,
                            src_col: 0,
                            src_rows: out_rows,
                            dst: Region::from(ob),
                            ldd: wo,
                            dst_col,
                            row_map: None,
                        })?
                        .launch()?;
                }
            }
            Op::SelectRows { x, .. } => {
                let w = width(*x);
                let ob = out
                    .bf
                    .as_ref()
                    .ok_or_else(|| missing("SelectRows output"))?;
                let map = step
                    .select
                    .as_ref()
                    .ok_or_else(|| missing("selected rows"))?;
                self.small
                    .prepare_copy_rows(CopyRowsDesc {
                        rows: out_rows,
                        cols: w,
                        src: input(*x)?.into(),
                        lds: w,
                        src_col: 0,
                        src_rows: t,
                        dst: Region::from(ob),
                        ldd: w,
                        dst_col: 0,
                        row_map: Some(map.into()),
                    })?
                    .launch()?;
            }
            Op::MlaAttention { layer, q, kv_b, .. } => {
                let c = &self.cfg;
                let (heads, nope, rope, v, kv_lora) = (
                    c.num_attention_heads,
                    c.qk_nope_head_dim,
                    c.qk_rope_head_dim,
                    c.v_head_dim,
                    c.kv_lora_rank,
                );
                let kvb = self
                    .absorbed
                    .get(kv_b)
                    .ok_or_else(|| missing("the absorbed kv_b_proj"))?;
                let qb = state.slots[plan.slot(*q)]
                    .bf
                    .as_ref()
                    .ok_or_else(|| missing("MlaAttention input"))?;
                ensure(dev, &mut state.q_attn, t * heads * (kv_lora + rope))?;
                ensure(dev, &mut state.o_lat, t * heads * kv_lora)?;
                ensure(dev, &mut state.lse, t * heads)?;
                let (Some(q_attn), Some(o_lat), Some(lse)) = (
                    state.q_attn.as_mut(),
                    state.o_lat.as_mut(),
                    state.lse.as_mut(),
                ) else {
                    return Err(missing("the attention scratch"));
                };
                let shape = MlaAbsorbDesc {
                    tokens: t,
                    heads,
                    nope,
                    rope,
                    v,
                    kv_lora,
                    src: qb.into(),
                    kv_b: kvb.into(),
                    dst: Region::from(&*q_attn),
                };
                self.small.prepare_mla_absorb(shape, true)?.launch()?;
                let qk = nope + rope;
                self.mla.q_rope(MlaQRopeArgs {
                    src: Some((qb, nope, heads * qk, qk)),
                    q: q_attn,
                    heads,
                    kv_lora,
                    rope: &self.rope,
                    batch: &step.mla,
                })?;
                let cache = state
                    .cache
                    .get(*layer)
                    .ok_or_else(|| missing("the layer's latent cache"))?;
                let parts = mla_plan_parts(dev.info().sm_count, heads, step.mla.max_q_len);
                let workspace = mla_workspace(
                    dev,
                    &mut state.mla_ws,
                    parts,
                    (step.mla.batch, heads, step.mla.max_q_len),
                )?;
                // The fast path where its shapes apply (kv_lora 512, rope 64, batch within
                // the scheduler's limit), else the reference kernel.
                self.mla.attention(
                    MlaAttnArgs {
                        q: q_attn,
                        heads,
                        scale: c.softmax_scale(),
                        cache,
                        batch: &step.mla,
                        out: o_lat,
                        lse,
                        workspace: Some(workspace),
                        schedule: !state.mla_scheduled,
                    },
                    MlaKernel::Auto,
                )?;
                state.mla_scheduled = true;
                let ob = out
                    .bf
                    .as_ref()
                    .ok_or_else(|| missing("MlaAttention output"))?;
                self.small
                    .prepare_mla_absorb(
                        MlaAbsorbDesc {
                            src: Region::from(&*o_lat),
                            dst: Region::from(ob),
                            ..shape
                        },
                        false,
                    )?
                    .launch()?;
            }
            Op::MoeRouted { x, router, .. } => {
                let layer = self
                    .moe_layers
                    .get(router)
                    .ok_or_else(|| missing("the MoE layer's experts"))?;
                let xb = state.slots[plan.slot(*x)]
                    .bf
                    .as_ref()
                    .ok_or_else(|| missing("MoeRouted input"))?;
                let ob = out.bf.as_mut().ok_or_else(|| missing("MoeRouted output"))?;
                self.moe_routed(layer, &mut state.moe_ws, xb, t, ob)?;
            }
            Op::ZeroPositionZero { .. } | Op::MlaCacheWrite { .. } => {
                unreachable!("handled by execute")
            }
        }
        Ok(())
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
            mla: MlaLayout::from_batch(batch).upload(&core.dev)?,
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
