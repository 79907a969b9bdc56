//! MoeRouted on the GPU: the fused MoE block where its shapes apply, else the fallback (the
//! GPU router, then every expert's MLP over all tokens, accumulated with each token's routing
//! weight).

use half::bf16;

use super::adapters::moe_block_config;
use super::{missing, Core};
use crate::cuda::ops::{
    Fp8Weight, MoeAccumDesc, MoeBlockConfig, MoeBlockWeights, MoeGemmPath, MoeLayout, MoeWorkspace,
    Region, RouterArgs, RouterLogitsArgs,
};
use crate::cuda::DeviceBuffer;
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

impl Core {
    /// Routed experts of one MoE layer: x bf16 `[t][h]` -> out bf16 `[t][h]`.
    pub(super) fn moe_routed(
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
                        ..moe_block_config(&self.cfg)
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
}
