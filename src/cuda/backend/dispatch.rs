//! One graph op at a time: each [`Op`] as the kernels that compute it, reading and writing the
//! step's slots, or, where the step's [`FusionPlan`] says so, several ops as one fused kernel.

use half::bf16;

use super::fusion::{FusionPlan, Step};
use super::weights::GpuWeight;
use super::workspace::QuantSpace;
use super::{ensure, missing, Core, Slot, State, StepData};
use crate::cuda::heuristics::{act_quant_kernel, ActQuantKernel};
use crate::cuda::ops::{
    ActQuantArgs, ActQuantDesc, Bf16GemmDesc, Bf16GemmKernel, Bf16Out, CopyRowsDesc, Fp8GemmArgs,
    Fp8Weight, GemmKernel, MlaAbsorbDesc, MlaAbsorbQRopeDesc, NormQuantDesc, QuantOut,
    QuantizedActivations, Region, SiluMulQuantDesc,
};
use crate::cuda::{
    mla_plan_parts, Device, DeviceBuffer, MlaAttnArgs, MlaCacheWriteArgs, MlaKernel, MlaQRopeArgs,
};
use crate::error::{Error, Result};
use crate::graph::{Buf, Graph, Op, Plan, Rows, Storage};

/// The step's quantized activations for FP8 Linears: room per plan slot (a buffer's slot is
/// live as long as its act_quant is needed, and [`Core::reserve`] sizes it for the largest
/// step), the act_quant each slot holds now, and which buffer that is.
#[derive(Default)]
pub(super) struct QuantStore {
    spaces: Vec<QuantSpace>,
    acts: Vec<Option<QuantizedActivations>>,
    holds: Vec<Option<Buf>>,
}

impl QuantStore {
    /// Forgets what the slots held: a new step writes every buffer anew.
    pub(super) fn begin_step(&mut self) {
        self.holds.iter_mut().for_each(|h| *h = None);
    }

    /// Room in slot `slot` for `m` rows of `k` channels (grown, never shrunk).
    pub(super) fn reserve(&mut self, dev: &Device, slot: usize, m: usize, k: usize) -> Result<()> {
        if self.spaces.len() <= slot {
            self.spaces.resize_with(slot + 1, QuantSpace::default);
            self.acts.resize_with(slot + 1, || None);
            self.holds.resize(slot + 1, None);
        }
        let room = |s: &QuantSpace| {
            (
                s.q.as_ref().map(|b| b.addr()),
                s.scales.as_ref().map(|b| b.addr()),
            )
        };
        let before = room(&self.spaces[slot]);
        self.spaces[slot].reserve_for(dev, m, k)?;
        if room(&self.spaces[slot]) != before {
            // Views of the old room would keep it alive until the slot's next rewrite.
            self.acts[slot] = None;
            self.holds[slot] = None;
        }
        Ok(())
    }

    fn holds(&self, slot: usize) -> Option<Buf> {
        self.holds.get(slot).copied().flatten()
    }

    fn get(&self, slot: usize) -> Result<&QuantizedActivations> {
        self.acts
            .get(slot)
            .and_then(Option::as_ref)
            .ok_or_else(|| missing("quantized activations"))
    }
}

/// The act_quant buffers of plan slot `slot` for `m` rows of `k` channels, about to be
/// rewritten: views of the slot's room (grown first only for a step beyond the limits the
/// workspaces were made for).
fn quant_buffers<'s>(
    dev: &Device,
    store: &'s mut QuantStore,
    slot: usize,
    m: usize,
    k: usize,
) -> Result<&'s mut QuantizedActivations> {
    store.reserve(dev, slot, m, k)?;
    store.holds[slot] = None;
    let a = store.spaces[slot].view(m, k)?;
    Ok(store.acts[slot].insert(a))
}

/// Buffer `b`'s bf16 slot as a kernel region.
fn bf16_region(state: &State, graph: &Graph, plan: &Plan, b: Buf) -> Result<Region> {
    state.slots[plan.slot(b)]
        .bf
        .as_ref()
        .map(Region::from)
        .ok_or_else(|| missing(&graph.desc(b).name))
}

fn rows_of(graph: &Graph, step: &StepData, b: Buf) -> usize {
    match graph.desc(b).rows {
        Rows::Tokens => step.tokens,
        Rows::Selected => step.selected,
    }
}

impl Core {
    /// x (bf16 `[m][k]`, contiguous) quantized per token per 128 channels into the scratch
    /// quantized-activation buffers (a Linear whose input is not a graph buffer: the MoE
    /// fallback's experts).
    fn quantize(
        &self,
        quant: &QuantSpace,
        x: &DeviceBuffer<bf16>,
        m: usize,
        k: usize,
    ) -> Result<QuantizedActivations> {
        let mut a = quant.view(m, k)?;
        self.quantize_into(x, &mut a)?;
        Ok(a)
    }

    /// x (bf16 `[a.m][a.k]`, contiguous) quantized into `a`'s buffers.
    fn quantize_into(&self, x: &DeviceBuffer<bf16>, a: &mut QuantizedActivations) -> Result<()> {
        let (m, k, m_pad) = (a.m, a.k, a.m_pad);
        if act_quant_kernel(m, k) == ActQuantKernel::Vectorized {
            self.dev
                .prepare_act_quant(ActQuantArgs {
                    x,
                    ldx: k,
                    q: &mut a.q,
                    ldq: k,
                    scales: &mut a.scales,
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
                    q: Region::from(&a.q),
                    ldq: k,
                    scales: Region::from(&a.scales),
                    m_pad,
                })?
                .launch()?;
        }
        Ok(())
    }

    /// d (bf16 `[m][w.n]`) = x · W^T in w8a8 for a graph Linear reading buffer `x`: its
    /// act_quant is the step's shared one when the plan shares it and a fused producer (or an
    /// earlier Linear) made it, else it is made here (and kept for the next reader when shared).
    #[allow(clippy::too_many_arguments)]
    fn linear_fp8(
        &self,
        x: Buf,
        m: usize,
        w: &Fp8Weight,
        graph: &Graph,
        plan: &Plan,
        fusion: &FusionPlan,
        state: &mut State,
        d: &mut DeviceBuffer<bf16>,
    ) -> Result<()> {
        let slot = plan.slot(x);
        let shared = fusion.shares_quant(x);
        if !shared || state.quant.holds(slot) != Some(x) {
            let xb = state.slots[slot]
                .bf
                .as_ref()
                .ok_or_else(|| missing(&graph.desc(x).name))?;
            let a = quant_buffers(&self.dev, &mut state.quant, slot, m, w.k)?;
            self.quantize_into(xb, a)?;
            if shared {
                state.quant.holds[slot] = Some(x);
            }
        }
        let a = state.quant.get(slot)?;
        if a.m != m || a.k != w.k {
            return Err(missing("the Linear's quantized input"));
        }
        self.dev
            .prepare_fp8_gemm(
                Fp8GemmArgs::new(a, w, d).with_split_k(&self.split_k),
                GemmKernel::Auto,
            )?
            .launch()?;
        Ok(())
    }

    /// The fused RmsNorm at node `norm` (and, with `add`, the Add at `node` before it): one
    /// small_rms_norm_quant writing the sum, the normed row and/or its act_quant as the plan
    /// says.
    #[allow(clippy::too_many_arguments)]
    fn norm_fused(
        &self,
        node: usize,
        norm: usize,
        add: bool,
        write_normed: bool,
        quantize: bool,
        graph: &Graph,
        plan: &Plan,
        step: &StepData,
        state: &mut State,
    ) -> Result<()> {
        let Op::RmsNorm { x, weight, out } = graph.nodes[norm] else {
            return Err(missing("the fused RmsNorm"));
        };
        let rows = rows_of(graph, step, out);
        if rows == 0 {
            return Ok(());
        }
        let width = graph.desc(out).width;
        let n = rows * width;
        let dev = &self.dev;
        // Outputs first (growing a slot replaces its buffer); an output that shares an input's
        // slot never grows, the input already holding as many rows.
        let add_io = match (add, &graph.nodes[node]) {
            (false, _) => None,
            (true, &Op::Add { a, b, out: s }) => {
                ensure(dev, &mut state.slots[plan.slot(s)].bf, n)?;
                Some((a, b, s))
            }
            (true, _) => return Err(missing("the fused Add")),
        };
        if write_normed {
            ensure(dev, &mut state.slots[plan.slot(out)].bf, n)?;
        }
        let quant = if quantize {
            let a = quant_buffers(dev, &mut state.quant, plan.slot(out), rows, width)?;
            Some(QuantOut::of(a))
        } else {
            None
        };
        let region = |b: Buf| bf16_region(state, graph, plan, b);
        let (xr, residual) = match add_io {
            Some((a, b, s)) => (region(a)?, Some((region(b)?, region(s)?))),
            None => (region(x)?, None),
        };
        let (w, _, _) = self.dense(weight)?;
        self.small
            .prepare_rms_norm_quant(NormQuantDesc {
                rows,
                width,
                eps: self.cfg.rms_norm_eps,
                x: xr,
                residual,
                w: w.into(),
                out: if write_normed {
                    Some(region(out)?)
                } else {
                    None
                },
                quant,
            })?
            .launch()?;
        if quantize {
            state.quant.holds[plan.slot(out)] = Some(out);
        }
        Ok(())
    }

    /// SiluMul and the act_quant of its output in one small_silu_mul_quant.
    fn silu_quant(
        &self,
        op: &Op,
        write_out: bool,
        graph: &Graph,
        plan: &Plan,
        step: &StepData,
        state: &mut State,
    ) -> Result<()> {
        let &Op::SiluMul { gate, up, out } = op else {
            return Err(missing("the fused SiluMul"));
        };
        let rows = rows_of(graph, step, out);
        if rows == 0 {
            return Ok(());
        }
        let width = graph.desc(out).width;
        let dev = &self.dev;
        if write_out {
            ensure(dev, &mut state.slots[plan.slot(out)].bf, rows * width)?;
        }
        let quant = QuantOut::of(quant_buffers(
            dev,
            &mut state.quant,
            plan.slot(out),
            rows,
            width,
        )?);
        let region = |b: Buf| bf16_region(state, graph, plan, b);
        self.small
            .prepare_silu_mul_quant(SiluMulQuantDesc {
                rows,
                width,
                gate: region(gate)?,
                up: region(up)?,
                out: if write_out { Some(region(out)?) } else { None },
                quant,
            })?
            .launch()?;
        state.quant.holds[plan.slot(out)] = Some(out);
        Ok(())
    }

    /// A bf16 GEMM on tensor cores where the wgmma kernel takes it (split over K where its
    /// tiles leave SMs idle), else on the reference kernel.
    fn bf16_gemm(&self, desc: Bf16GemmDesc) -> Result<()> {
        self.dev
            .prepare_bf16_gemm(desc, Bf16GemmKernel::Auto, Some(&self.split_k))?
            .launch()?;
        Ok(())
    }

    /// d (bf16 `[m][w.n]`) = x · W^T in w8a8.
    pub(super) fn fp8_linear(
        &self,
        quant: &QuantSpace,
        x: &DeviceBuffer<bf16>,
        m: usize,
        w: &Fp8Weight,
        d: &mut DeviceBuffer<bf16>,
    ) -> Result<()> {
        let a = self.quantize(quant, x, m, w.k)?;
        self.dev
            .prepare_fp8_gemm(
                Fp8GemmArgs::new(&a, w, d).with_split_k(&self.split_k),
                GemmKernel::Auto,
            )?
            .launch()?;
        Ok(())
    }

    /// Node `node` (`op`) as the step's fusion plan says: its own kernels, a fused kernel
    /// covering it (and the next node), or nothing when an earlier fused kernel covered it.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn execute(
        &self,
        node: usize,
        op: &Op,
        graph: &Graph,
        plan: &Plan,
        fusion: &FusionPlan,
        step: &StepData,
        state: &mut State,
    ) -> Result<()> {
        match fusion.steps[node] {
            Step::Plain => {}
            Step::Skip => return Ok(()),
            Step::Norm {
                norm,
                add,
                write_normed,
                quantize,
            } => {
                return self.norm_fused(
                    node,
                    norm,
                    add,
                    write_normed,
                    quantize,
                    graph,
                    plan,
                    step,
                    state,
                )
            }
            Step::SiluQuant { write_out } => {
                return self.silu_quant(op, write_out, graph, plan, step, state)
            }
        }
        let rows_of = |b: Buf| rows_of(graph, step, b);
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
        let result = self.execute_into(op, graph, plan, fusion, step, state, &mut slot, out_rows);
        state.slots[plan.slot(out)] = slot;
        result
    }

    #[allow(clippy::too_many_arguments)]
    fn execute_into(
        &self,
        op: &Op,
        graph: &Graph,
        plan: &Plan,
        fusion: &FusionPlan,
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
                        self.linear_fp8(*x, out_rows, w, graph, plan, fusion, state, ob)?;
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
                        let (region, out) = match (&out.f, &out.bf) {
                            (Some(f), _) if graph.desc(*o).storage == Storage::F32 => {
                                (Region::from(f), Bf16Out::F32)
                            }
                            (_, Some(b)) => (Region::from(b), Bf16Out::Bf16),
                            _ => return Err(missing("Linear output")),
                        };
                        // lm_head, eh_proj: the tensor-core GEMM where it takes the shape.
                        self.bf16_gemm(Bf16GemmDesc {
                            m: out_rows,
                            n,
                            k,
                            batch: 1,
                            a: input(*x)?.into(),
                            lda: k,
                            a_batch: 0,
                            b: data.into(),
                            ldb: k,
                            b_batch: 0,
                            d: region,
                            ldd: n,
                            d_batch: 0,
                            out,
                        })?;
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
                // Each absorption product on tensor cores (batched over heads, split over K
                // where the tiles leave SMs idle) wherever the wgmma GEMM takes its shapes, and
                // q RoPE after it; else the CUDA-core kernels, q RoPE fused when the plan says so.
                let q_gemm = shape.q_gemm();
                let tensor_q = q_gemm.resolve(Bf16GemmKernel::Auto)? == Bf16GemmKernel::Wgmma;
                if tensor_q || !fusion.absorb_rope {
                    if tensor_q {
                        self.bf16_gemm(q_gemm)?;
                    } else {
                        self.small.prepare_mla_absorb(shape, true)?.launch()?;
                    }
                    let qk = nope + rope;
                    self.mla.q_rope(MlaQRopeArgs {
                        src: Some((qb, nope, heads * qk, qk)),
                        q: q_attn,
                        heads,
                        kv_lora,
                        rope: &self.rope,
                        batch: &step.mla,
                    })?;
                } else {
                    self.small
                        .prepare_mla_absorb_q_rope(MlaAbsorbQRopeDesc {
                            absorb: shape,
                            positions: Region::from(&step.mla.positions),
                            inv_freq: Region::from(&self.rope.inv_freq),
                            attention_factor: self.rope.attention_factor,
                        })?
                        .launch()?;
                }
                let cache = state
                    .cache
                    .get(*layer)
                    .ok_or_else(|| missing("the layer's latent cache"))?;
                let parts = mla_plan_parts(dev.info().sm_count, heads, step.mla.max_q_len);
                let mut workspace = state.mla_space.workspace(
                    dev,
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
                        workspace: Some(&mut workspace),
                        schedule: !state.mla_scheduled,
                    },
                    MlaKernel::Auto,
                )?;
                state.mla_scheduled = true;
                let ob = out
                    .bf
                    .as_ref()
                    .ok_or_else(|| missing("MlaAttention output"))?;
                let absorb_o = MlaAbsorbDesc {
                    src: Region::from(&*o_lat),
                    dst: Region::from(ob),
                    ..shape
                };
                let o_gemm = absorb_o.o_gemm();
                if o_gemm.resolve(Bf16GemmKernel::Auto)? == Bf16GemmKernel::Wgmma {
                    self.bf16_gemm(o_gemm)?;
                } else {
                    self.small.prepare_mla_absorb(absorb_o, false)?.launch()?;
                }
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
                self.moe_routed(layer, &mut state.moe, &state.scratch_quant, xb, t, ob)?;
            }
            Op::ZeroPositionZero { .. } | Op::MlaCacheWrite { .. } => {
                unreachable!("handled by execute")
            }
        }
        Ok(())
    }
}
