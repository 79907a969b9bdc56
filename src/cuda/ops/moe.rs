//! MoE on the GPU: the shared pieces of the `moe_*` launch wrappers.
//!
//! - [`MoeOps`]: launches the MoE kernels (cuda/moe.cu, cuda/moe_gemm.cu) on a [`Device`];
//!   every `prepare_*` / `moe_*` method lives on it.
//! - [`RouterConfig`], [`MoeLayout`] and [`MoeGeometry`]: routing hyper-parameters and the
//!   permuted ("flat rows") buffers' shapes, as launch_params.h's MoE section defines them.
//! - [`MoeFlags`]: the kernels' sticky error words, and the error they turn into.
//! - Each `prepare_*` returns a [`crate::cuda::Prepared`]: one checked launch of one kernel
//!   (launch any number of times; safe to record in a CUDA graph: it queues one kernel node).
//!
//! The kernels themselves: `moe_route.rs` (router logits, router), `moe_permute.rs` (plan,
//! gather, SiLU*up + quant, unpermute, with host models of each), `moe_gemm.rs` (grouped FP8
//! GEMMs) and `moe_block.rs` (the whole routed + shared MoE block).

use super::Checker;
use crate::cuda::error::{CudaError, Result};
use crate::cuda::sys;
use crate::cuda::Device;
use crate::numerics::routing::Router;

/// Most experts the kernels take (R1_MOE_MAX_EXPERTS).
pub const MOE_MAX_EXPERTS: usize = sys::R1_MOE_MAX_EXPERTS as usize;
/// Most routed experts per token (R1_MOE_MAX_TOP_K).
pub const MOE_MAX_TOP_K: usize = sys::R1_MOE_MAX_TOP_K as usize;
/// The contiguous layout pads each expert's rows to this (R1_MOE_BLOCK_M).
pub const MOE_BLOCK_M: usize = sys::R1_MOE_BLOCK_M as usize;
/// Words in the error-flag buffer (R1_MOE_FLAGS_LEN).
pub const MOE_FLAGS_LEN: usize = sys::R1_MOE_FLAGS_LEN as usize;

/// Routing hyper-parameters (config.json), as [`Router`] holds them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RouterConfig {
    pub experts: usize,
    pub n_group: usize,
    pub topk_group: usize,
    pub top_k: usize,
    pub normalize: bool,
    pub scaling: f32,
}

impl From<&Router> for RouterConfig {
    fn from(r: &Router) -> Self {
        RouterConfig {
            experts: r.n_experts,
            n_group: r.n_group,
            topk_group: r.topk_group,
            top_k: r.top_k,
            normalize: r.normalize,
            scaling: r.scaling,
        }
    }
}

impl RouterConfig {
    /// The host routing rule with the same parameters.
    pub fn host(&self) -> Router {
        Router {
            n_experts: self.experts,
            n_group: self.n_group,
            topk_group: self.topk_group,
            top_k: self.top_k,
            normalize: self.normalize,
            scaling: self.scaling,
        }
    }

    /// launch_params.h's moe_router requirements.
    pub fn check(&self, kernel: &'static str) -> Result<()> {
        let c = Checker { kernel };
        let (e, g) = (self.experts, self.n_group);
        c.req((1..=MOE_MAX_EXPERTS).contains(&e), || {
            format!("experts = {e} must be in 1..={MOE_MAX_EXPERTS}")
        })?;
        c.req(g >= 1 && e % g == 0, || {
            format!("n_group = {g} must divide experts = {e}")
        })?;
        c.req((1..=g).contains(&self.topk_group), || {
            format!(
                "topk_group = {} must be in 1..=n_group ({g})",
                self.topk_group
            )
        })?;
        c.req((1..=e.min(MOE_MAX_TOP_K)).contains(&self.top_k), || {
            format!(
                "top_k = {} must be in 1..=min(experts, {MOE_MAX_TOP_K})",
                self.top_k
            )
        })?;
        c.req(self.scaling.is_finite(), || {
            format!("routed_scaling_factor = {} must be finite", self.scaling)
        })
    }
}

/// How the routed rows are laid out (launch_params.h, "Flat rows").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MoeLayout {
    /// Prefill: experts in order, each padded to [`MOE_BLOCK_M`] rows; block tables on device.
    Contiguous,
    /// Decode: `[experts][max_tokens_per_expert]` rows with per-expert counts on device.
    Masked { max_tokens_per_expert: usize },
}

/// The permuted buffers' geometry for `tokens` tokens (a capacity: a call may route fewer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MoeGeometry {
    pub tokens: usize,
    pub top_k: usize,
    pub experts: usize,
    pub layout: MoeLayout,
}

impl MoeGeometry {
    pub fn entries(&self) -> usize {
        self.tokens * self.top_k
    }

    /// Contiguous layout: enough blocks for any routing of `tokens` tokens:
    /// ceil(T*K / 128) + min(E, T*K). (0 for the masked layout.)
    pub fn max_blocks(&self) -> usize {
        match self.layout {
            MoeLayout::Contiguous => {
                let n = self.entries();
                n.div_ceil(MOE_BLOCK_M) + self.experts.min(n)
            }
            MoeLayout::Masked { .. } => 0,
        }
    }

    /// Flat rows R of the permuted buffers.
    pub fn rows(&self) -> usize {
        match self.layout {
            MoeLayout::Contiguous => self.max_blocks() * MOE_BLOCK_M,
            MoeLayout::Masked {
                max_tokens_per_expert,
            } => self.experts * max_tokens_per_expert,
        }
    }

    /// R rounded up to the SA layout's 4 (the scales' row stride).
    pub fn r_pad(&self) -> usize {
        super::act_scale_m_pad(self.rows().max(1))
    }

    pub(crate) fn layout_code(&self) -> i32 {
        match self.layout {
            MoeLayout::Contiguous => sys::R1_MOE_LAYOUT_CONTIGUOUS as i32,
            MoeLayout::Masked { .. } => sys::R1_MOE_LAYOUT_MASKED as i32,
        }
    }

    pub(crate) fn max_tokens_per_expert(&self) -> usize {
        match self.layout {
            MoeLayout::Contiguous => 0,
            MoeLayout::Masked {
                max_tokens_per_expert,
            } => max_tokens_per_expert,
        }
    }

    /// Shape rules shared by every kernel that uses the geometry.
    pub fn check(&self, kernel: &'static str) -> Result<()> {
        let c = Checker { kernel };
        c.req(self.tokens >= 1 && self.top_k >= 1, || {
            format!(
                "tokens ({}) and top_k ({}) must be >= 1",
                self.tokens, self.top_k
            )
        })?;
        c.req((1..=MOE_MAX_EXPERTS).contains(&self.experts), || {
            format!(
                "experts = {} must be in 1..={MOE_MAX_EXPERTS}",
                self.experts
            )
        })?;
        c.req(self.top_k <= MOE_MAX_TOP_K, || {
            format!("top_k = {} must be <= {MOE_MAX_TOP_K}", self.top_k)
        })?;
        if let MoeLayout::Masked {
            max_tokens_per_expert,
        } = self.layout
        {
            c.req(max_tokens_per_expert >= 1, || {
                "max_tokens_per_expert must be >= 1".to_string()
            })?;
        }
        let rows = self
            .tokens
            .checked_mul(self.top_k)
            .and_then(|_| self.experts.checked_mul(self.max_tokens_per_expert()))
            .map(|_| self.r_pad());
        c.req(rows.is_some_and(|r| r <= i32::MAX as usize), || {
            "tokens * top_k and the flat rows must fit in a 32-bit int".to_string()
        })
    }
}

/// The kernels' error words (launch_params.h, "Error flags").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MoeFlags {
    /// OR of the `R1_MOE_FLAG_*` bits.
    pub bits: u32,
    /// Tokens whose router input held a NaN.
    pub nan_tokens: u32,
    /// The lowest such token.
    pub first_nan_token: Option<u32>,
    /// Entries dropped because an expert's masked rows were full.
    pub dropped: u32,
    /// Entries whose expert id was outside [-1, experts).
    pub bad_ids: u32,
}

impl MoeFlags {
    pub fn from_words(w: &[u32]) -> MoeFlags {
        assert!(w.len() >= 5, "MoE flags hold {} words", w.len());
        MoeFlags {
            bits: w[0],
            nan_tokens: w[1],
            first_nan_token: (w[2] != 0).then(|| u32::MAX - w[2]),
            dropped: w[3],
            bad_ids: w[4],
        }
    }

    pub fn is_clear(&self) -> bool {
        self.bits == 0
    }

    /// Ok when no flag is set; else the error the host reports.
    pub fn into_result(self) -> Result<()> {
        if self.is_clear() {
            return Ok(());
        }
        let mut what = Vec::new();
        if self.bits & sys::R1_MOE_FLAG_NAN != 0 {
            what.push(format!(
                "NaN in the MoE router input of {} token(s) (first: token {}): the hidden \
                 state diverged",
                self.nan_tokens,
                self.first_nan_token.map_or("?".into(), |t| t.to_string())
            ));
        }
        if self.bits & sys::R1_MOE_FLAG_OVERFLOW != 0 {
            what.push(format!(
                "{} routed entries dropped: an expert received more tokens than its rows hold",
                self.dropped
            ));
        }
        if self.bits & sys::R1_MOE_FLAG_BAD_ID != 0 {
            what.push(format!(
                "{} routed entries name an expert outside the layer",
                self.bad_ids
            ));
        }
        Err(CudaError::requirement("moe", what.join("; ")))
    }
}

/// Launches the MoE kernels on one [`Device`] (all launches go on its stream).
#[derive(Clone)]
pub struct MoeOps {
    pub(crate) dev: Device,
}

impl std::fmt::Debug for MoeOps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MoeOps")
            .field("device", &self.dev.info().name)
            .finish()
    }
}

impl MoeOps {
    pub fn new(dev: &Device) -> Self {
        MoeOps { dev: dev.clone() }
    }

    pub fn device(&self) -> &Device {
        &self.dev
    }

    /// Reads the error words (waits for the stream: not inside a CUDA-graph capture).
    pub fn read_flags(&self, flags: &crate::cuda::DeviceBuffer<u32>) -> Result<MoeFlags> {
        Ok(MoeFlags::from_words(&self.dev.download(flags)?))
    }

    /// Zeroes the error words (asynchronously; capturable).
    pub fn clear_flags(&self, flags: &mut crate::cuda::DeviceBuffer<u32>) -> Result<()> {
        self.dev.memset(flags, 0)
    }

    /// A new zeroed flag buffer.
    pub fn alloc_flags(&self) -> Result<crate::cuda::DeviceBuffer<u32>> {
        self.dev.alloc_zeros(MOE_FLAGS_LEN)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geometry(tokens: usize, layout: MoeLayout) -> MoeGeometry {
        MoeGeometry {
            tokens,
            top_k: 8,
            experts: 256,
            layout,
        }
    }

    #[test]
    fn contiguous_bound_covers_any_routing() {
        // Worst case: every entry alone in its expert (padding 127 each) or all in one expert.
        for tokens in [1, 2, 31, 32, 33, 100, 4096] {
            let g = geometry(tokens, MoeLayout::Contiguous);
            let n = g.entries();
            let worst_spread = (n.min(256)) + (n.saturating_sub(256)).div_ceil(MOE_BLOCK_M);
            let worst_hot = n.div_ceil(MOE_BLOCK_M);
            assert!(g.max_blocks() >= worst_spread.max(worst_hot), "{tokens}");
            assert_eq!(g.rows(), g.max_blocks() * MOE_BLOCK_M);
            assert_eq!(g.r_pad() % 4, 0);
        }
        let g = geometry(
            128,
            MoeLayout::Masked {
                max_tokens_per_expert: 128,
            },
        );
        assert_eq!((g.rows(), g.max_blocks()), (256 * 128, 0));
        g.check("t").unwrap();
    }

    #[test]
    fn router_config_checks_name_the_rule() {
        let ok = RouterConfig {
            experts: 256,
            n_group: 8,
            topk_group: 4,
            top_k: 8,
            normalize: true,
            scaling: 2.5,
        };
        ok.check("moe_router").unwrap();
        let e = |c: RouterConfig| c.check("moe_router").unwrap_err().to_string();
        assert!(e(RouterConfig { n_group: 7, ..ok }).contains("n_group = 7 must divide"));
        assert!(e(RouterConfig {
            topk_group: 9,
            ..ok
        })
        .contains("topk_group = 9"));
        assert!(e(RouterConfig { top_k: 33, ..ok }).contains("top_k = 33"));
        assert!(e(RouterConfig {
            experts: 1024,
            n_group: 8,
            ..ok
        })
        .contains("experts = 1024"));
        assert_eq!(ok.host().n_experts, 256);
    }

    #[test]
    fn flags_turn_into_errors() {
        assert!(MoeFlags::from_words(&[0; 8]).into_result().is_ok());
        let f = MoeFlags::from_words(&[1, 2, u32::MAX - 3, 0, 0, 0, 0, 0]);
        assert_eq!(f.first_nan_token, Some(3));
        let e = f.into_result().unwrap_err().to_string();
        assert!(
            e.contains("NaN in the MoE router input of 2 token(s) (first: token 3)"),
            "{e}"
        );
        let e = MoeFlags::from_words(&[6, 0, 0, 5, 1, 0, 0, 0])
            .into_result()
            .unwrap_err()
            .to_string();
        assert!(e.contains("5 routed entries dropped") && e.contains("1 routed entries name"));
    }
}
