//! MoeRouted on the GPU: the fused MoE block where its shapes apply, else the fallback (the
//! GPU router, then every expert's MLP over all tokens, accumulated with each token's routing
//! weight). Both run in workspaces made when the backend is built ([`MoeSpace`]).

use half::bf16;

use super::adapters::moe_block_config;
use super::workspace::QuantSpace;
use super::{debug_log, missing, Core};
use crate::cuda::heuristics::MOE_MASKED_MAX_TOKENS;
use crate::cuda::ops::{
    Fp8Weight, MoeAccumDesc, MoeBlockConfig, MoeBlockWeights, MoeGemmPath, MoeLayout, MoeWorkspace,
    Region, RouterArgs, RouterLogitsArgs,
};
use crate::cuda::{Device, DeviceBuffer};
use crate::error::Result;

/// One MoE layer's routed experts on the device.
pub(super) enum GpuMoe {
    Fast(Box<MoeBlockWeights>),
    Fallback {
        router: DeviceBuffer<bf16>,
        bias: DeviceBuffer<f32>,
        experts: Vec<[Fp8Weight; 3]>,
    },
}

/// The fallback's buffers for up to `capacity` tokens.
pub(super) struct FallbackSpace {
    capacity: usize,
    logits: DeviceBuffer<f32>,
    ids: DeviceBuffer<i32>,
    wts: DeviceBuffer<f32>,
    flags: DeviceBuffer<u32>,
    acc: DeviceBuffer<f32>,
    y: DeviceBuffer<bf16>,
    /// Gate, up and SiLU·up of one expert, `[capacity][largest intermediate]` each.
    g: DeviceBuffer<bf16>,
    u: DeviceBuffer<bf16>,
    a: DeviceBuffer<bf16>,
}

/// The MoE workspaces, shared by every MoE layer: the fused block's in the masked layout
/// (steps of up to [`MOE_MASKED_MAX_TOKENS`] tokens: decode, verification) and in the
/// contiguous layout (larger steps), or the fallback's.
#[derive(Default)]
pub(super) struct MoeSpace {
    masked: Option<MoeWorkspace>,
    contiguous: Option<MoeWorkspace>,
    fallback: Option<FallbackSpace>,
    /// Whether the masked / contiguous workspace ran in this step (their error flags are read
    /// after it); a graph replay sets what its capture used.
    pub used: [bool; 2],
}

impl MoeSpace {
    /// Reads and clears the error flags of the fused block's workspaces this step used
    /// (synchronizes; after the step).
    pub fn take_errors(&mut self, core: &Core) -> Result<()> {
        let used = std::mem::take(&mut self.used);
        for (ws, used) in [&mut self.masked, &mut self.contiguous]
            .into_iter()
            .zip(used)
        {
            if let (Some(ws), true) = (ws, used) {
                ws.take_errors(&core.moe)?;
            }
        }
        Ok(())
    }
}

impl Core {
    /// The fused block's configuration (routed experts only: the shared expert is graph
    /// nodes).
    fn routed_block_config(&self) -> MoeBlockConfig {
        MoeBlockConfig {
            shared_inter: 0,
            ..moe_block_config(&self.cfg)
        }
    }

    /// Makes the workspaces the model's MoE layers need hold a step of `t` tokens.
    pub(super) fn reserve_moe(&self, space: &mut MoeSpace, t: usize) -> Result<()> {
        let (fast, fallback) = self.moe_layers.values().fold((false, false), |(f, s), l| {
            (
                f || matches!(l, GpuMoe::Fast(_)),
                s || matches!(l, GpuMoe::Fallback { .. }),
            )
        });
        if fast {
            let masked_cap = self.limits.max_step_tokens.min(MOE_MASKED_MAX_TOKENS);
            if space.masked.is_none() {
                space.masked = Some(self.moe_workspace(masked_cap)?);
            }
            let fits_masked = space.masked.as_ref().is_some_and(|w| w.capacity >= t);
            if !fits_masked && space.contiguous.as_ref().is_none_or(|w| w.capacity < t) {
                if let Some(w) = &space.contiguous {
                    debug_log(|| {
                        format!(
                            "growing the MoE workspace from {} to {t} tokens",
                            w.capacity
                        )
                    });
                }
                space.contiguous = None;
                space.contiguous = Some(self.moe_workspace(t.max(MOE_MASKED_MAX_TOKENS + 1))?);
            }
        }
        if fallback && space.fallback.as_ref().is_none_or(|f| f.capacity < t) {
            if let Some(f) = &space.fallback {
                debug_log(|| {
                    format!(
                        "growing the MoE fallback's buffers from {} to {t} tokens",
                        f.capacity
                    )
                });
            }
            space.fallback = None;
            space.fallback = Some(self.fallback_space(t)?);
        }
        Ok(())
    }

    /// The fused block's workspace for `capacity` tokens, in the layout that capacity takes.
    fn moe_workspace(&self, capacity: usize) -> Result<MoeWorkspace> {
        Ok(MoeWorkspace::new(
            &self.dev,
            self.routed_block_config(),
            capacity,
            MoeLayout::auto(capacity),
            MoeGemmPath::Fast,
        )?)
    }

    fn fallback_space(&self, capacity: usize) -> Result<FallbackSpace> {
        let dev: &Device = &self.dev;
        let (e, k, h) = (self.router.experts, self.router.top_k, self.cfg.hidden_size);
        let inter = self
            .moe_layers
            .values()
            .flat_map(|l| match l {
                GpuMoe::Fallback { experts, .. } => experts.iter().map(|[g, ..]| g.n).max(),
                GpuMoe::Fast(_) => None,
            })
            .max()
            .unwrap_or(1);
        let c = capacity;
        Ok(FallbackSpace {
            capacity: c,
            logits: dev.alloc(c * e)?,
            ids: dev.alloc(c * k)?,
            wts: dev.alloc(c * k)?,
            flags: self.moe.alloc_flags()?,
            acc: dev.alloc(c * h)?,
            y: dev.alloc(c * h)?,
            g: dev.alloc(c * inter)?,
            u: dev.alloc(c * inter)?,
            a: dev.alloc(c * inter)?,
        })
    }

    /// Routed experts of one MoE layer: x bf16 `[t][h]` -> out bf16 `[t][h]`.
    pub(super) fn moe_routed(
        &self,
        layer: &GpuMoe,
        space: &mut MoeSpace,
        quant: &QuantSpace,
        x: &DeviceBuffer<bf16>,
        t: usize,
        out: &mut DeviceBuffer<bf16>,
    ) -> Result<()> {
        let h = self.cfg.hidden_size;
        match layer {
            GpuMoe::Fast(w) => {
                self.reserve_moe(space, t)?;
                let fits_masked = space.masked.as_ref().is_some_and(|w| w.capacity >= t);
                let (ws, i) = if fits_masked {
                    (space.masked.as_mut(), 0)
                } else {
                    (space.contiguous.as_mut(), 1)
                };
                let ws = ws.ok_or_else(|| missing("the MoE workspace"))?;
                space.used[i] = true;
                self.moe.moe_forward(ws, w, x, t, out)?;
                Ok(())
            }
            GpuMoe::Fallback {
                router,
                bias,
                experts,
            } => {
                self.reserve_moe(space, t)?;
                let fb = space
                    .fallback
                    .as_mut()
                    .ok_or_else(|| missing("the MoE fallback's buffers"))?;
                let (e, k) = (self.router.experts, self.router.top_k);
                self.moe
                    .prepare_router_logits(RouterLogitsArgs {
                        x,
                        ldx: h,
                        w: router,
                        logits: &mut fb.logits,
                        tokens: t,
                        experts: e,
                        hidden: h,
                    })?
                    .launch()?;
                self.moe
                    .prepare_router(RouterArgs {
                        cfg: self.router,
                        tokens: t,
                        logits: &fb.logits,
                        bias: Some(bias),
                        topk_ids: &mut fb.ids,
                        topk_weights: &mut fb.wts,
                        flags: &mut fb.flags,
                    })?
                    .launch()?;
                self.dev.memset_bytes(fb.acc.addr(), t * h * 4, 0)?;
                for (ei, [gate, up, down]) in experts.iter().enumerate() {
                    let inter = gate.n;
                    let mut g = fb.g.view(0, t * inter)?;
                    let mut u = fb.u.view(0, t * inter)?;
                    let mut a = fb.a.view(0, t * inter)?;
                    let mut y = fb.y.view(0, t * h)?;
                    self.fp8_linear(quant, x, t, gate, &mut g)?;
                    self.fp8_linear(quant, x, t, up, &mut u)?;
                    self.small
                        .prepare_silu_mul(&g, &u, &mut a, t * inter)?
                        .launch()?;
                    self.fp8_linear(quant, &a, t, down, &mut y)?;
                    self.small
                        .prepare_moe_accum(MoeAccumDesc {
                            tokens: t,
                            width: h,
                            top_k: k,
                            expert: ei,
                            y: Region::from(&y),
                            acc: Region::from(&fb.acc),
                            topk_ids: Region::from(&fb.ids),
                            topk_weights: Region::from(&fb.wts),
                        })?
                        .launch()?;
                }
                self.small
                    .prepare_f32_to_bf16(&fb.acc, out, t * h)?
                    .launch()?;
                // Synchronizes: surfaces NaN router inputs as the CPU does (this path is never
                // captured into a graph).
                let flags = self.moe.read_flags(&fb.flags)?;
                if !flags.is_clear() {
                    self.moe.clear_flags(&mut fb.flags)?;
                }
                flags.into_result()?;
                Ok(())
            }
        }
    }
}
