//! The whole MoE block of a DeepSeek-V3 layer on the GPU for a batch of tokens, the GPU
//! counterpart of the graph's `MoeRouted` + shared-expert MLP + `Add` (the CPU backend's
//! MoeCall and mlp nodes, in w8a8):
//!
//! ```text
//! x (bf16 [T, H]) -> moe_router_logits -> moe_router -> topk ids / weights (+ error flags)
//!                 -> act_quant -> moe_plan -> moe_gather
//!                 -> grouped GEMM gate+up -> moe_silu_quant -> grouped GEMM down  (routed)
//!                 -> fp8_gemm gate+up -> moe_silu_quant -> fp8_gemm down           (shared)
//!                 -> moe_unpermute: out = bf16(bf16(sum_k w * y) + shared)
//! ```
//!
//! [`MoeOps::moe_forward`] queues those ~12 kernels on the device's stream with no host
//! synchronization and no allocation, so it can be captured in a CUDA graph. One
//! [`MoeWorkspace`] (sized for a token capacity and a layout) serves every MoE layer; the
//! per-layer weights are a [`MoeBlockWeights`]. Errors found on the device (NaN router input,
//! dropped entries) are sticky flags read by [`MoeWorkspace::take_errors`] after the step.

use half::bf16;

use super::moe::{MoeGeometry, MoeLayout, MoeOps, RouterConfig};
use super::moe_gemm::{GroupedFp8Weight, GroupedGemmArgs, GroupedGemmKernel};
use super::moe_permute::{
    GatherArgs, MoePlanBuffers, PermutedRows, PlanArgs, SiluQuantArgs, UnpermuteArgs,
};
use super::moe_route::{RouterArgs, RouterLogitsArgs};
use super::{
    act_scale_m_pad, ActQuantArgs, Checker, Fp8GemmArgs, Fp8Weight, GemmKernel,
    QuantizedActivations, QUANT_BLOCK,
};
use crate::cuda::error::Result;
use crate::cuda::{Device, DeviceBuffer};

const BLOCK: &str = "moe_block";

/// A MoE layer's shape (config.json).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MoeBlockConfig {
    pub router: RouterConfig,
    pub hidden: usize,
    /// moe_intermediate_size (per routed expert).
    pub inter: usize,
    /// moe_intermediate_size * n_shared_experts; 0 when the layer has no shared expert.
    pub shared_inter: usize,
}

impl MoeBlockConfig {
    pub fn check(&self) -> Result<()> {
        self.router.check(BLOCK)?;
        let c = Checker { kernel: BLOCK };
        for (name, v) in [("hidden", self.hidden), ("moe_intermediate", self.inter)] {
            c.req(v >= QUANT_BLOCK && v % QUANT_BLOCK == 0, || {
                format!("{name} = {v} must be a positive multiple of 128 (the GPU MoE path)")
            })?;
        }
        c.req(self.shared_inter % QUANT_BLOCK == 0, || {
            format!(
                "shared intermediate = {} must be a multiple of 128",
                self.shared_inter
            )
        })
    }
}

/// Which GEMM kernels the block uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MoeGemmPath {
    /// wgmma kernels (grouped Auto and fp8_gemm Auto).
    Fast,
    /// The CUDA-core reference kernels for every GEMM (tests, fallback).
    Reference,
}

/// One MoE layer's weights on the device.
#[derive(Debug)]
pub struct MoeBlockWeights {
    /// bf16 `[E][H]` (mlp.gate.weight).
    pub router: DeviceBuffer<bf16>,
    /// f32 `[E]` (e_score_correction_bias).
    pub bias: Option<DeviceBuffer<f32>>,
    /// `[E][2I][H]`: gate rows then up rows per expert.
    pub gate_up: GroupedFp8Weight,
    /// `[E][H][I]`.
    pub down: GroupedFp8Weight,
    /// `[2 Is][H]`, `[H][Is]`.
    pub shared: Option<(Fp8Weight, Fp8Weight)>,
}

/// Every intermediate buffer of the block for up to `capacity` tokens (reused across layers).
#[derive(Debug)]
pub struct MoeWorkspace {
    pub cfg: MoeBlockConfig,
    pub capacity: usize,
    pub gemm: MoeGemmPath,
    /// f32 `[capacity][E]`.
    pub logits: DeviceBuffer<f32>,
    /// i32 / f32 `[capacity][top_k]`.
    pub topk_ids: DeviceBuffer<i32>,
    pub topk_weights: DeviceBuffer<f32>,
    /// u32 `[MOE_FLAGS_LEN]`, sticky until [`MoeWorkspace::take_errors`].
    pub flags: DeviceBuffer<u32>,
    /// x quantized: fp8 `[capacity][H]`, SA scales.
    pub xq: QuantizedActivations,
    pub plan: MoePlanBuffers,
    /// Gathered x (k = H), the SiLU output (k = I).
    pub a1: PermutedRows,
    pub a2: PermutedRows,
    /// bf16 `[R][2I]` and `[R][H]`.
    pub gate_up: DeviceBuffer<bf16>,
    pub down: DeviceBuffer<bf16>,
    /// Shared expert: bf16 `[capacity][2 Is]`, its SiLU output quantized, bf16 `[capacity][H]`.
    pub shared: Option<(DeviceBuffer<bf16>, QuantizedActivations, DeviceBuffer<bf16>)>,
}

fn quantized(dev: &Device, m: usize, k: usize) -> Result<QuantizedActivations> {
    let m_pad = act_scale_m_pad(m);
    Ok(QuantizedActivations {
        q: dev.alloc(m * k)?,
        scales: dev.alloc((k / QUANT_BLOCK) * m_pad)?,
        m,
        k,
        m_pad,
    })
}

impl MoeWorkspace {
    pub fn new(
        dev: &Device,
        cfg: MoeBlockConfig,
        capacity: usize,
        layout: MoeLayout,
        gemm: MoeGemmPath,
    ) -> Result<Self> {
        cfg.check()?;
        let geom = MoeGeometry {
            tokens: capacity,
            top_k: cfg.router.top_k,
            experts: cfg.router.experts,
            layout,
        };
        geom.check(BLOCK)?;
        let (e, k, h, i) = (cfg.router.experts, cfg.router.top_k, cfg.hidden, cfg.inter);
        let rows = geom.rows();
        let shared = if cfg.shared_inter > 0 {
            let si = cfg.shared_inter;
            Some((
                dev.alloc(capacity * 2 * si)?,
                quantized(dev, capacity, si)?,
                dev.alloc(capacity * h)?,
            ))
        } else {
            None
        };
        Ok(MoeWorkspace {
            cfg,
            capacity,
            gemm,
            logits: dev.alloc(capacity * e)?,
            topk_ids: dev.alloc(capacity * k)?,
            topk_weights: dev.alloc(capacity * k)?,
            flags: dev.alloc_zeros(super::moe::MOE_FLAGS_LEN)?,
            xq: quantized(dev, capacity, h)?,
            plan: MoePlanBuffers::alloc(dev, geom)?,
            a1: PermutedRows::alloc(dev, &geom, h)?,
            a2: PermutedRows::alloc(dev, &geom, i)?,
            gate_up: dev.alloc(rows * 2 * i)?,
            down: dev.alloc(rows * h)?,
            shared,
        })
    }

    pub fn geometry(&self) -> MoeGeometry {
        self.plan.geom
    }

    /// Device bytes the workspace holds.
    pub fn bytes(&self) -> usize {
        let mut b = self.logits.size_bytes()
            + self.topk_ids.size_bytes()
            + self.topk_weights.size_bytes()
            + self.xq.q.size_bytes()
            + self.xq.scales.size_bytes()
            + self.a1.q.size_bytes()
            + self.a1.scales.size_bytes()
            + self.a2.q.size_bytes()
            + self.a2.scales.size_bytes()
            + self.gate_up.size_bytes()
            + self.down.size_bytes();
        if let Some((g, a, y)) = &self.shared {
            b += g.size_bytes() + a.q.size_bytes() + a.scales.size_bytes() + y.size_bytes();
        }
        b
    }

    /// Reads and clears the sticky error flags (synchronizes: call after the step, outside a
    /// graph capture); an error names what the kernels found.
    pub fn take_errors(&mut self, ops: &MoeOps) -> Result<()> {
        let flags = ops.read_flags(&self.flags)?;
        if !flags.is_clear() {
            ops.clear_flags(&mut self.flags)?;
        }
        flags.into_result()
    }
}

impl MoeOps {
    /// The MoE block for `tokens` rows of `x` (bf16 `[tokens][H]`, contiguous) into `out`
    /// (bf16 `[tokens][H]`): routed experts + shared expert, summed. Queues the kernels on the
    /// stream (no synchronization, no allocation: capturable). Host-side checks run before
    /// anything is queued for the first kernels; a later check failing leaves the earlier
    /// kernels queued (their outputs are workspace-only).
    pub fn moe_forward(
        &self,
        ws: &mut MoeWorkspace,
        w: &MoeBlockWeights,
        x: &DeviceBuffer<bf16>,
        tokens: usize,
        out: &mut DeviceBuffer<bf16>,
    ) -> Result<()> {
        let cfg = ws.cfg;
        let (e, k, h, i) = (cfg.router.experts, cfg.router.top_k, cfg.hidden, cfg.inter);
        let c = Checker { kernel: BLOCK };
        c.req(tokens >= 1 && tokens <= ws.capacity, || {
            format!(
                "tokens = {tokens} must be in 1..={} (the workspace capacity)",
                ws.capacity
            )
        })?;
        c.req(
            w.gate_up.experts == e && w.gate_up.n == 2 * i && w.gate_up.k == h,
            || "gate_up weight does not match the block config".to_string(),
        )?;
        c.req(
            w.down.experts == e && w.down.n == h && w.down.k == i,
            || "down weight does not match the block config".to_string(),
        )?;
        c.req(w.shared.is_some() == ws.shared.is_some(), || {
            "the weights and the workspace disagree about the shared expert".to_string()
        })?;
        c.holds(
            "out",
            super::Region::from(&*out),
            tokens * h,
            "[tokens][hidden]",
        )?;
        let (grouped, dense) = match ws.gemm {
            MoeGemmPath::Fast => (GroupedGemmKernel::Auto, GemmKernel::Auto),
            MoeGemmPath::Reference => (GroupedGemmKernel::Reference, GemmKernel::Reference),
        };

        // Routing.
        self.prepare_router_logits(RouterLogitsArgs {
            x,
            ldx: h,
            w: &w.router,
            logits: &mut ws.logits,
            tokens,
            experts: e,
            hidden: h,
        })?
        .launch()?;
        self.prepare_router(RouterArgs {
            cfg: cfg.router,
            tokens,
            logits: &ws.logits,
            bias: w.bias.as_ref(),
            topk_ids: &mut ws.topk_ids,
            topk_weights: &mut ws.topk_weights,
            flags: &mut ws.flags,
        })?
        .launch()?;

        // Quantize once, permute.
        let m_pad = ws.xq.m_pad;
        self.dev
            .prepare_act_quant(ActQuantArgs {
                x,
                ldx: h,
                q: &mut ws.xq.q,
                ldq: h,
                scales: &mut ws.xq.scales,
                m_pad,
                m: tokens,
                k: h,
            })?
            .launch()?;
        self.prepare_plan(PlanArgs {
            tokens,
            topk_ids: &ws.topk_ids,
            plan: &mut ws.plan,
            flags: &mut ws.flags,
        })?
        .launch()?;
        self.prepare_gather(GatherArgs {
            tokens,
            x: &ws.xq,
            plan: &ws.plan,
            out: &mut ws.a1,
        })?
        .launch()?;

        // Routed experts.
        self.prepare_grouped_gemm(
            GroupedGemmArgs {
                tokens,
                a: &ws.a1,
                w: &w.gate_up,
                topk_ids: &ws.topk_ids,
                plan: &ws.plan,
                d: &mut ws.gate_up,
                ldd: 2 * i,
            },
            grouped,
        )?
        .launch()?;
        let (rows, r_pad) = (ws.a2.rows, ws.a2.r_pad);
        self.prepare_silu_quant(SiluQuantArgs {
            rows,
            items: tokens * k,
            rows_map: Some(&ws.plan.dest_row),
            inter: i,
            gu: &ws.gate_up,
            ldg: 2 * i,
            up_offset: i,
            q: &mut ws.a2.q,
            ldq: i,
            scales: &mut ws.a2.scales,
            m_pad: r_pad,
        })?
        .launch()?;
        self.prepare_grouped_gemm(
            GroupedGemmArgs {
                tokens,
                a: &ws.a2,
                w: &w.down,
                topk_ids: &ws.topk_ids,
                plan: &ws.plan,
                d: &mut ws.down,
                ldd: h,
            },
            grouped,
        )?
        .launch()?;

        // Shared expert (dense GEMMs on the same quantized x).
        if let (Some((sw_gu, sw_down)), Some((s_gu, s_act, s_out))) = (&w.shared, &mut ws.shared) {
            let si = sw_down.k;
            self.dev
                .prepare_fp8_gemm(
                    Fp8GemmArgs {
                        a: &ws.xq.q,
                        lda: h,
                        sa: &ws.xq.scales,
                        m_pad,
                        b: &sw_gu.codes,
                        ldb: h,
                        sb: &sw_gu.scales,
                        d: s_gu,
                        ldd: 2 * si,
                        m: tokens,
                        n: 2 * si,
                        k: h,
                        split_k: None,
                        splits: None,
                    },
                    dense,
                )?
                .launch()?;
            let s_m_pad = s_act.m_pad;
            self.prepare_silu_quant(SiluQuantArgs {
                rows: tokens,
                items: tokens,
                rows_map: None,
                inter: si,
                gu: s_gu,
                ldg: 2 * si,
                up_offset: si,
                q: &mut s_act.q,
                ldq: si,
                scales: &mut s_act.scales,
                m_pad: s_m_pad,
            })?
            .launch()?;
            self.dev
                .prepare_fp8_gemm(
                    Fp8GemmArgs {
                        a: &s_act.q,
                        lda: si,
                        sa: &s_act.scales,
                        m_pad: s_m_pad,
                        b: &sw_down.codes,
                        ldb: si,
                        sb: &sw_down.scales,
                        d: s_out,
                        ldd: h,
                        m: tokens,
                        n: h,
                        k: si,
                        split_k: None,
                        splits: None,
                    },
                    dense,
                )?
                .launch()?;
        }

        // Weighted sum back per token (+ shared).
        self.prepare_unpermute(UnpermuteArgs {
            tokens,
            top_k: k,
            n: h,
            y: &ws.down,
            ldy: h,
            rows,
            dest_row: &ws.plan.dest_row,
            topk_ids: &ws.topk_ids,
            topk_weights: &ws.topk_weights,
            shared: ws.shared.as_ref().map(|(_, _, y)| (y, h)),
            out,
            ldo: h,
        })?
        .launch()
    }
}

/// DeepSeek-R1's MoE block as its config.json gives it (tests of the block, its adapters and
/// the choices made from it).
#[cfg(test)]
impl MoeBlockConfig {
    pub(crate) fn deepseek_r1() -> Self {
        MoeBlockConfig {
            router: RouterConfig {
                experts: 256,
                n_group: 8,
                topk_group: 4,
                top_k: 8,
                normalize: true,
                scaling: 2.5,
            },
            hidden: 7168,
            inter: 2048,
            shared_inter: 2048,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_config_from_deepseek() {
        let cfg = MoeBlockConfig::deepseek_r1();
        cfg.check().unwrap();
        let e = MoeBlockConfig { inter: 96, ..cfg }
            .check()
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("moe_intermediate = 96 must be a positive multiple of 128"),
            "{e}"
        );
    }
}
