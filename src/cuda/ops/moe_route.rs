//! MoE routing on the GPU: `moe_router_logits` (bf16 x . bf16 Wg^T in the CPU's exact
//! summation order) and `moe_router` (noaux_tc: sigmoid, bias for choice only, group top-2
//! sums, topk_group groups, top-k with lowest-index ties, normalized weights x scaling).
//! Contracts: cuda/launch_params.h, MoE section. [`route_host`] is the host model the GPU
//! output is compared with ([`crate::numerics::routing::Router`] plus the NaN rule).

use cudarc::driver::LaunchConfig;
use half::bf16;

use super::moe::{MoeFlags, MoeOps, RouterConfig, MOE_FLAGS_LEN};
use super::opt_addr;
use super::{Checker, Region};
use crate::cuda::error::Result;
use crate::cuda::launch::{KernelLaunch, Prepared};
use crate::cuda::sys::{self, R1MoeRouterLogitsParams, R1MoeRouterParams};
use crate::cuda::DeviceBuffer;
use crate::numerics::dot;

const LOGITS: &str = "moe_router_logits";
const ROUTER: &str = "moe_router";

/// A moe_router_logits call as plain numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouterLogitsDesc {
    pub tokens: usize,
    pub experts: usize,
    pub hidden: usize,
    /// bf16 `[tokens][ldx]`.
    pub x: Region,
    pub ldx: usize,
    /// bf16 `[experts][hidden]`.
    pub w: Region,
    /// f32 `[tokens][experts]`.
    pub logits: Region,
}

impl RouterLogitsDesc {
    pub fn check(&self) -> Result<()> {
        let c = Checker { kernel: LOGITS };
        let (t, e, h) = (self.tokens, self.experts, self.hidden);
        c.req(t >= 1 && e >= 1 && h >= 1, || {
            format!("tokens ({t}), experts ({e}) and hidden ({h}) must be >= 1")
        })?;
        c.fits_i32(&[
            ("tokens", t),
            ("experts", e),
            ("hidden", h),
            ("ldx", self.ldx),
        ])?;
        c.req(h % 8 == 0, || {
            format!("hidden must be a multiple of 8 (hidden = {h})")
        })?;
        c.req(self.ldx >= h && self.ldx % 8 == 0, || {
            format!("ldx ({}) must be >= hidden and a multiple of 8", self.ldx)
        })?;
        c.aligned("x", self.x, 16)?;
        c.aligned("w", self.w, 16)?;
        c.aligned("logits", self.logits, 4)?;
        c.holds_matrix("x", self.x, t, h, self.ldx)?;
        c.holds("w", self.w, e * h, "[experts][hidden]")?;
        c.holds("logits", self.logits, t * e, "[tokens][experts]")?;
        let by = t.div_ceil(sys::R1_MOE_LOGITS_TOKENS as usize);
        c.req(by <= 65535, || {
            format!("tokens = {t} exceed the grid's y limit")
        })
    }

    /// How the CTA stages its rows (cuda/params/moe.h): the whole hidden width at once when
    /// two stages of it fit (every decode step of R1: one chunk, all loads in flight at
    /// once), else the widest chunk that does.
    pub fn staging(&self) -> LogitsStaging {
        logits_staging(self.tokens, self.hidden)
    }
}

/// The shared-memory staging of one moe_router_logits launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogitsStaging {
    /// Channels staged per step (a multiple of 8).
    pub chunk: usize,
    /// Staged row stride in elements (a multiple of 8, >= the chunk).
    pub ld_smem: usize,
    /// Dynamic shared memory of the launch.
    pub smem_bytes: usize,
}

/// The staged row stride for a chunk: 16 bytes of padding, 32 when that would put the rows a
/// multiple of 128 bytes apart (the two expert rows, and neighbouring token rows, that a warp
/// reads at once would then share banks).
fn staged_ld(chunk: usize) -> usize {
    let ld = chunk + 8;
    if (ld / 8) % 8 == 0 {
        ld + 8
    } else {
        ld
    }
}

/// [`LogitsStaging`] for `tokens` x `hidden` (hidden a multiple of 8, >= 8).
pub fn logits_staging(tokens: usize, hidden: usize) -> LogitsStaging {
    let experts = sys::R1_MOE_LOGITS_EXPERTS as usize;
    let rows = experts + tokens.clamp(1, sys::R1_MOE_LOGITS_TOKENS as usize);
    let budget = sys::R1_MOE_LOGITS_SMEM_BYTES as usize;
    let ld = staged_ld;
    let fits = |chunk: usize, stages: usize| stages * rows * ld(chunk) * 2 <= budget;
    let whole = hidden.max(8);
    let chunk = if fits(whole, 1) {
        whole
    } else {
        // The largest multiple of 8 with two stages in the budget (66 rows of 8 channels and
        // 32 bytes of padding always fit: chunk >= 8).
        let mut chunk = (budget / (2 * rows * 2)).saturating_sub(8) / 8 * 8;
        while chunk > 8 && !fits(chunk, 2) {
            chunk -= 8;
        }
        chunk.max(8)
    };
    let stages = hidden.div_ceil(chunk).min(2);
    let ld_smem = ld(chunk);
    LogitsStaging {
        chunk,
        ld_smem,
        smem_bytes: stages * rows * ld_smem * 2,
    }
}

impl KernelLaunch for RouterLogitsDesc {
    type Params = R1MoeRouterLogitsParams;

    fn kernel(&self) -> &'static str {
        LOGITS
    }

    fn params(&self) -> Result<R1MoeRouterLogitsParams> {
        let st = self.staging();
        Ok(R1MoeRouterLogitsParams {
            x: self.x.addr,
            w: self.w.addr,
            logits: self.logits.addr,
            tokens: self.tokens as i32,
            experts: self.experts as i32,
            hidden: self.hidden as i32,
            ldx: self.ldx as i32,
            chunk: st.chunk as i32,
            ld_smem: st.ld_smem as i32,
        })
    }

    fn launch_config(&self) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (
                self.experts.div_ceil(sys::R1_MOE_LOGITS_EXPERTS as usize) as u32,
                self.tokens.div_ceil(sys::R1_MOE_LOGITS_TOKENS as usize) as u32,
                1,
            ),
            block_dim: (sys::R1_MOE_LOGITS_THREADS, 1, 1),
            shared_mem_bytes: self.staging().smem_bytes as u32,
        }
    }
}

/// A moe_router call as plain numbers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RouterDesc {
    pub cfg: RouterConfig,
    pub tokens: usize,
    /// f32 `[tokens][experts]`.
    pub logits: Region,
    /// f32 `[experts]` (e_score_correction_bias), if the layer has one.
    pub bias: Option<Region>,
    /// i32 `[tokens][top_k]`.
    pub topk_ids: Region,
    /// f32 `[tokens][top_k]`.
    pub topk_weights: Region,
    /// u32 `[MOE_FLAGS_LEN]`.
    pub flags: Region,
}

impl RouterDesc {
    /// Dynamic shared memory: per warp (2E + 2G) words.
    pub fn smem_bytes(&self) -> usize {
        sys::R1_MOE_ROUTER_WARPS as usize * (2 * self.cfg.experts + 2 * self.cfg.n_group) * 4
    }

    pub fn check(&self) -> Result<()> {
        self.cfg.check(ROUTER)?;
        let c = Checker { kernel: ROUTER };
        let (t, e, k) = (self.tokens, self.cfg.experts, self.cfg.top_k);
        c.req(t >= 1, || "tokens must be >= 1".to_string())?;
        c.fits_i32(&[("tokens * experts", t.saturating_mul(e))])?;
        let smem = self.smem_bytes();
        c.req(smem <= 48 << 10, || {
            format!("needs {smem} bytes of shared memory (experts + n_group too large; max 48 KiB)")
        })?;
        for (name, r) in [
            ("logits", self.logits),
            ("topk_ids", self.topk_ids),
            ("topk_weights", self.topk_weights),
            ("flags", self.flags),
        ] {
            c.aligned(name, r, 4)?;
        }
        c.holds("logits", self.logits, t * e, "[tokens][experts]")?;
        c.holds("topk_ids", self.topk_ids, t * k, "[tokens][top_k]")?;
        c.holds("topk_weights", self.topk_weights, t * k, "[tokens][top_k]")?;
        c.holds("flags", self.flags, MOE_FLAGS_LEN, "the MoE error words")?;
        if let Some(b) = self.bias {
            c.aligned("bias", b, 4)?;
            c.holds("bias", b, e, "[experts]")?;
        }
        Ok(())
    }
}

impl KernelLaunch for RouterDesc {
    type Params = R1MoeRouterParams;

    fn kernel(&self) -> &'static str {
        ROUTER
    }

    fn params(&self) -> Result<R1MoeRouterParams> {
        Ok(R1MoeRouterParams {
            logits: self.logits.addr,
            bias: opt_addr(self.bias),
            topk_ids: self.topk_ids.addr,
            topk_weights: self.topk_weights.addr,
            flags: self.flags.addr,
            tokens: self.tokens as i32,
            experts: self.cfg.experts as i32,
            n_group: self.cfg.n_group as i32,
            topk_group: self.cfg.topk_group as i32,
            top_k: self.cfg.top_k as i32,
            normalize: i32::from(self.cfg.normalize),
            scaling: self.cfg.scaling,
            reserved: 0,
        })
    }

    fn launch_config(&self) -> LaunchConfig {
        let warps = sys::R1_MOE_ROUTER_WARPS as usize;
        LaunchConfig {
            grid_dim: (self.tokens.div_ceil(warps) as u32, 1, 1),
            block_dim: (32 * warps as u32, 1, 1),
            shared_mem_bytes: self.smem_bytes() as u32,
        }
    }
}

/// moe_router_logits over caller-owned buffers (contiguous `[tokens][hidden]` x unless `ldx`).
pub struct RouterLogitsArgs<'a> {
    pub x: &'a DeviceBuffer<bf16>,
    pub ldx: usize,
    pub w: &'a DeviceBuffer<bf16>,
    pub logits: &'a mut DeviceBuffer<f32>,
    pub tokens: usize,
    pub experts: usize,
    pub hidden: usize,
}

impl RouterLogitsArgs<'_> {
    pub fn desc(&self) -> RouterLogitsDesc {
        RouterLogitsDesc {
            tokens: self.tokens,
            experts: self.experts,
            hidden: self.hidden,
            x: Region::from(self.x),
            ldx: self.ldx,
            w: Region::from(self.w),
            logits: Region::from(&*self.logits),
        }
    }
}

/// moe_router over caller-owned buffers.
pub struct RouterArgs<'a> {
    pub cfg: RouterConfig,
    pub tokens: usize,
    pub logits: &'a DeviceBuffer<f32>,
    pub bias: Option<&'a DeviceBuffer<f32>>,
    pub topk_ids: &'a mut DeviceBuffer<i32>,
    pub topk_weights: &'a mut DeviceBuffer<f32>,
    pub flags: &'a mut DeviceBuffer<u32>,
}

impl RouterArgs<'_> {
    pub fn desc(&self) -> RouterDesc {
        RouterDesc {
            cfg: self.cfg,
            tokens: self.tokens,
            logits: Region::from(self.logits),
            bias: self.bias.map(Region::from),
            topk_ids: Region::from(&*self.topk_ids),
            topk_weights: Region::from(&*self.topk_weights),
            flags: Region::from(&*self.flags),
        }
    }
}

impl MoeOps {
    pub fn prepare_router_logits<'a>(&'a self, args: RouterLogitsArgs<'a>) -> Result<Prepared<'a>> {
        let d = args.desc();
        d.check()?;
        Prepared::single(&self.dev, &d)
    }

    pub fn prepare_router<'a>(&'a self, args: RouterArgs<'a>) -> Result<Prepared<'a>> {
        let d = args.desc();
        d.check()?;
        Prepared::single(&self.dev, &d)
    }
}

// ------------------------------------------------------------------------------------------
// Host models
// ------------------------------------------------------------------------------------------

/// What moe_router_logits computes: [`dot`] of each token row with each router
/// row (bf16 widened to f32), `[tokens][experts]`.
pub fn router_logits_host(x: &[bf16], w: &[bf16], tokens: usize, hidden: usize) -> Vec<f32> {
    let wf: Vec<f32> = w.iter().map(|v| v.to_f32()).collect();
    let mut out = Vec::with_capacity(tokens * (w.len() / hidden));
    for t in 0..tokens {
        let xt: Vec<f32> = x[t * hidden..(t + 1) * hidden]
            .iter()
            .map(|v| v.to_f32())
            .collect();
        out.extend(wf.chunks(hidden).map(|row| dot(&xt, row)));
    }
    out
}

/// moe_router's outputs for a batch.
#[derive(Debug, Clone, PartialEq)]
pub struct RoutedHost {
    /// `[tokens][top_k]`, -1 for a NaN token.
    pub ids: Vec<i32>,
    /// `[tokens][top_k]`, 0 for a NaN token.
    pub weights: Vec<f32>,
    pub flags: MoeFlags,
}

/// What moe_router computes, on the host: [`crate::numerics::routing::Router::route`] per
/// token, and for a token whose logits (or logit + bias) hold a NaN: ids -1, weights 0, flagged.
/// (Both sigmoids take exp in f64 rounded to f32 (`numerics::sigmoid`), so the routing
/// decisions agree bit for bit.)
pub fn route_host(
    cfg: &RouterConfig,
    logits: &[f32],
    bias: Option<&[f32]>,
    tokens: usize,
) -> RoutedHost {
    let (e, k) = (cfg.experts, cfg.top_k);
    let zero = vec![0f32; e];
    let bias = bias.unwrap_or(&zero);
    let router = cfg.host();
    let mut out = RoutedHost {
        ids: Vec::with_capacity(tokens * k),
        weights: Vec::with_capacity(tokens * k),
        flags: MoeFlags::default(),
    };
    for t in 0..tokens {
        let l = &logits[t * e..(t + 1) * e];
        let nan = l
            .iter()
            .zip(bias)
            .any(|(&x, &b)| x.is_nan() || (crate::numerics::sigmoid(x) + b).is_nan());
        if nan {
            out.flags.bits |= sys::R1_MOE_FLAG_NAN;
            out.flags.nan_tokens += 1;
            out.flags.first_nan_token.get_or_insert(t as u32);
            out.ids.extend(std::iter::repeat_n(-1, k));
            out.weights.extend(std::iter::repeat_n(0.0, k));
            continue;
        }
        for (id, w) in router.route(l, bias) {
            out.ids.push(id as i32);
            out.weights.push(w);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> RouterConfig {
        RouterConfig {
            experts: 16,
            n_group: 4,
            topk_group: 2,
            top_k: 4,
            normalize: true,
            scaling: 2.5,
        }
    }

    fn desc() -> RouterDesc {
        RouterDesc {
            cfg: cfg(),
            tokens: 3,
            logits: Region {
                addr: 0x1000,
                len: 48,
            },
            bias: Some(Region {
                addr: 0x2000,
                len: 16,
            }),
            topk_ids: Region {
                addr: 0x3000,
                len: 12,
            },
            topk_weights: Region {
                addr: 0x4000,
                len: 12,
            },
            flags: Region {
                addr: 0x5000,
                len: 8,
            },
        }
    }

    #[test]
    fn router_checks() {
        let d = desc();
        d.check().unwrap();
        assert_eq!(crate::cuda::launch::row_symbol(&d), ROUTER);
        assert_eq!(d.smem_bytes(), 4 * (32 + 8) * 4);
        let e = |d: RouterDesc| d.check().unwrap_err().to_string();
        let mut bad = d;
        bad.topk_ids.len = 11;
        assert!(e(bad).contains("topk_ids holds 11"));
        let mut bad = d;
        bad.bias = Some(Region {
            addr: 0x2000,
            len: 15,
        });
        assert!(e(bad).contains("bias holds 15"));
        let mut bad = d;
        bad.flags.len = 4;
        assert!(e(bad).contains("flags holds 4"));
        // The largest config still fits the 48 KiB of shared memory.
        let mut big = d;
        big.cfg.experts = 512;
        big.cfg.n_group = 512;
        big.cfg.topk_group = 512;
        assert_eq!(big.smem_bytes(), 32 << 10);
        let mut bad = d;
        bad.cfg.topk_group = 5;
        assert!(e(bad).starts_with("moe_router: topk_group = 5"));
    }

    #[test]
    fn router_logits_checks() {
        let ok = RouterLogitsDesc {
            tokens: 5,
            experts: 256,
            hidden: 7168,
            x: Region {
                addr: 0x1000,
                len: 5 * 7168,
            },
            ldx: 7168,
            w: Region {
                addr: 0x10_0000,
                len: 256 * 7168,
            },
            logits: Region {
                addr: 0x20_0000,
                len: 5 * 256,
            },
        };
        ok.check().unwrap();
        assert_eq!(crate::cuda::launch::row_symbol(&ok), LOGITS);
        let e = |d: RouterLogitsDesc| d.check().unwrap_err().to_string();
        assert!(e(RouterLogitsDesc { hidden: 100, ..ok }).contains("multiple of 8"));
        assert!(e(RouterLogitsDesc {
            x: Region {
                addr: 0x1008,
                len: 5 * 7168
            },
            ..ok
        })
        .contains("16-byte aligned"));
        assert_eq!(ok.launch_config().grid_dim, (128, 1, 1));
        let many = RouterLogitsDesc { tokens: 65, ..ok };
        assert_eq!(many.launch_config().grid_dim, (128, 2, 1));
    }

    /// R1's decode steps stage the whole hidden width in one chunk; larger token tiles chunk
    /// it; every layout keeps its rows 16-byte aligned, off the 128-byte bank period, and
    /// within the kernel-table row's shared memory.
    #[test]
    fn logits_staging_fits_and_aligns() {
        let budget = sys::R1_MOE_LOGITS_SMEM_BYTES as usize;
        let one = logits_staging(1, 7168);
        assert_eq!(one.chunk, 7168);
        assert_eq!(one.smem_bytes, 3 * one.ld_smem * 2);
        for tokens in [1, 2, 7, 8, 16, 33, 64, 65, 512] {
            for hidden in [8, 16, 120, 512, 1536, 2048, 7168, 16384] {
                let s = logits_staging(tokens, hidden);
                let rows = 2 + tokens.min(64);
                assert!(s.chunk >= 8 && s.chunk % 8 == 0, "{s:?}");
                assert!(
                    s.ld_smem >= s.chunk.min(hidden) && s.ld_smem % 8 == 0,
                    "{s:?}"
                );
                assert_ne!((s.ld_smem / 8) % 8, 0, "{s:?}: rows 128 bytes apart");
                let stages = hidden.div_ceil(s.chunk).min(2);
                assert_eq!(s.smem_bytes, stages * rows * s.ld_smem * 2);
                assert!(s.smem_bytes <= budget, "{tokens} x {hidden}: {s:?}");
                if hidden.div_ceil(s.chunk) > 1 {
                    // Nothing wider would have fit.
                    let wider = s.chunk + 8;
                    assert!(2 * rows * staged_ld(wider) * 2 > budget, "{s:?}");
                }
            }
        }
        assert_eq!(logits_staging(64, 7168).chunk, 752);
    }

    #[test]
    fn host_model_flags_nan_tokens_and_matches_cpu_router() {
        let c = cfg();
        let mut logits: Vec<f32> = (0..3 * 16)
            .map(|i| ((i * 7919) % 23) as f32 / 7.0 - 1.5)
            .collect();
        logits[16 + 5] = f32::NAN;
        let r = route_host(&c, &logits, None, 3);
        assert_eq!(&r.ids[4..8], &[-1; 4]);
        assert_eq!(&r.weights[4..8], &[0.0; 4]);
        assert_eq!(r.flags.first_nan_token, Some(1));
        assert!(r.flags.into_result().is_err());
        let cpu = c.host().route(&logits[32..48], &[0.0; 16]);
        let ids: Vec<i32> = cpu.iter().map(|&(e, _)| e as i32).collect();
        assert_eq!(&r.ids[8..12], &ids[..]);
        // Normalized weights sum to the scaling factor.
        let s: f32 = r.weights[0..4].iter().sum();
        assert!((s - 2.5).abs() < 1e-5);
    }

    #[test]
    fn logits_host_model_is_cpu_dot() {
        let (t, e, h) = (2, 3, 24);
        let x: Vec<bf16> = (0..t * h)
            .map(|i| bf16::from_f32(i as f32 * 0.37 - 3.0))
            .collect();
        let w: Vec<bf16> = (0..e * h)
            .map(|i| bf16::from_f32(1.0 / (i as f32 + 1.0)))
            .collect();
        let got = router_logits_host(&x, &w, t, h);
        let xf: Vec<f32> = x[h..2 * h].iter().map(|v| v.to_f32()).collect();
        let wf: Vec<f32> = w[2 * h..3 * h].iter().map(|v| v.to_f32()).collect();
        assert_eq!(got[e + 2], dot(&xf, &wf));
    }
}
