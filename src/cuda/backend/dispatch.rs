//! One graph op at a time: each [`Op`] as the kernels that compute it, reading and writing the
//! step's slots.

use half::bf16;

use super::weights::GpuWeight;
use super::workspace::QuantSpace;
use super::{ensure, missing, Core, Slot, State, StepData};
use crate::cuda::heuristics::{act_quant_kernel, ActQuantKernel};
use crate::cuda::ops::{
    ActQuantArgs, ActQuantDesc, CopyRowsDesc, Fp8GemmArgs, Fp8Weight, GemmBf16Desc, GemmKernel,
    MlaAbsorbDesc, QuantizedActivations, Region,
};
use crate::cuda::{
    mla_plan_parts, DeviceBuffer, MlaAttnArgs, MlaCacheWriteArgs, MlaKernel, MlaQRopeArgs,
};
use crate::error::{Error, Result};
use crate::graph::{Buf, Graph, Op, Plan, Rows, Storage};

impl Core {
    /// x (bf16 `[m][k]`, contiguous) quantized per token per 128 channels into the
    /// workspace's quantized-activation buffers.
    fn quantize(
        &self,
        quant: &QuantSpace,
        x: &DeviceBuffer<bf16>,
        m: usize,
        k: usize,
    ) -> Result<QuantizedActivations> {
        let QuantizedActivations {
            mut q,
            mut scales,
            m_pad,
            ..
        } = quant.view(m, k)?;
        if act_quant_kernel(m, k) == ActQuantKernel::Vectorized {
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
            .prepare_fp8_gemm(Fp8GemmArgs::new(&a, w, d), GemmKernel::Auto)?
            .launch()?;
        Ok(())
    }

    pub(super) fn execute(
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
                        self.fp8_linear(&state.quant, xb, out_rows, w, ob)?;
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
                self.moe_routed(layer, &mut state.moe, &state.quant, xb, t, ob)?;
            }
            Op::ZeroPositionZero { .. } | Op::MlaCacheWrite { .. } => {
                unreachable!("handled by execute")
            }
        }
        Ok(())
    }
}
