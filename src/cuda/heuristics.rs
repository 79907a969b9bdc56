//! Every choice the CUDA backend makes from shapes and device info, as pure functions: which
//! kernel runs a GEMM or an attention call, how many persistent CTAs it gets, how MLA splits
//! the keys over the SMs (and the scheduler's host mirror), which prefill form is cheaper, the
//! MoE rows' layout and whether a MoE layer takes the fused block. The launch wrappers only
//! consume the results: their `*Desc::resolve` checks a kernel's requirements and asks here
//! which kernel `Auto` means.
//!
//! `R1_PRINT_CHOICES=1` prints each distinct choice once to stderr, e.g.
//! `r1-choice: fp8_gemm m=1 n=2112 k=7168 -> fp8_gemm_wgmma_m64 (persistent ctas 17)`.

use std::collections::HashSet;
use std::sync::{Mutex, OnceLock};

use super::ops::{
    GemmKernel, GroupedGemmKernel, MlaKernel, MoeBlockConfig, MoeGeometry, MoeLayout, MLA_BLOCK_M,
    MLA_PAGE_TOKENS,
};
use super::{sys, DeviceInfo};

// ------------------------------------------------------------------------------------------
// GEMMs
// ------------------------------------------------------------------------------------------

/// Auto picks the BLOCK_M 64 kernel up to this M.
pub const AUTO_M64_MAX_M: usize = sys::R1_FP8_GEMM_M64_BLOCK_M as usize;

/// The dense GEMM kernel for `m` rows: `WgmmaM64` up to [`AUTO_M64_MAX_M`] (half the padding
/// waste of BLOCK_M 128 at decode sizes), else `Wgmma`; the reference kernel when the chosen
/// wgmma kernel's requirements do not hold (`meets`).
pub fn fp8_gemm_kernel(m: usize, meets: impl FnOnce(GemmKernel) -> bool) -> GemmKernel {
    let fast = if m <= AUTO_M64_MAX_M {
        GemmKernel::WgmmaM64
    } else {
        GemmKernel::Wgmma
    };
    if meets(fast) {
        fast
    } else {
        GemmKernel::Reference
    }
}

/// The grouped GEMM kernel for a MoE geometry: contiguous rows take `ContigWgmma`; masked rows
/// take `MaskedWgmmaM64` when the average rows per expert (tokens * top_k / experts) is <= 64,
/// else `MaskedWgmma`; the reference kernel when the choice's requirements do not hold.
pub fn grouped_gemm_kernel(
    geom: &MoeGeometry,
    meets: impl FnOnce(GroupedGemmKernel) -> bool,
) -> GroupedGemmKernel {
    let fast = match geom.layout {
        MoeLayout::Contiguous => GroupedGemmKernel::ContigWgmma,
        MoeLayout::Masked { .. } => {
            if geom.entries().div_ceil(geom.experts) <= 64 {
                GroupedGemmKernel::MaskedWgmmaM64
            } else {
                GroupedGemmKernel::MaskedWgmma
            }
        }
    };
    if meets(fast) {
        fast
    } else {
        GroupedGemmKernel::Reference
    }
}

/// CTAs of a persistent wgmma grid over `tiles` output tiles: one per SM, never more than the
/// tiles (an idle CTA only costs a launch slot), at least one.
pub fn persistent_ctas(tiles: usize, dev: &DeviceInfo) -> usize {
    tiles.min(dev.sm_count).max(1)
}

// ------------------------------------------------------------------------------------------
// MLA attention
// ------------------------------------------------------------------------------------------

const SCHED_FIELDS: usize = sys::R1_MLA_SCHED_FIELDS as usize;

/// The attention kernel: the split-KV wgmma path whenever its requirements hold (`meets`),
/// else the reference kernel.
pub fn mla_kernel(meets: impl FnOnce(MlaKernel) -> bool) -> MlaKernel {
    if meets(MlaKernel::Wgmma) {
        MlaKernel::Wgmma
    } else {
        MlaKernel::Reference
    }
}

/// Parts (CTAs per 64-row head block) the fast path splits the keys over: every SM busy,
/// as FlashMLA sizes it (`sm_count / head blocks`, at least 1).
pub fn mla_plan_parts(sm_count: usize, heads: usize, max_q_len: usize) -> usize {
    let m_blocks = (max_q_len * heads).div_ceil(MLA_BLOCK_M).max(1);
    (sm_count / m_blocks).max(1)
}

/// What `mla_schedule` writes: per part `[begin_b, begin_blk, end_b, end_blk, begin_split,
/// 0, 0, 0]` and the per-sequence split prefix sums (launch_params.h).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MlaSchedule {
    pub parts: Vec<[i32; SCHED_FIELDS]>,
    pub splits: Vec<i32>,
}

impl MlaSchedule {
    /// Partial-result slots used (<= batch + parts).
    pub fn slots(&self) -> usize {
        self.splits.last().copied().unwrap_or(0) as usize
    }
}

/// The device scheduler's loop on the host, statement for statement (same clamps), so that
/// its coverage can be tested without a GPU and a host-known layout can skip the kernel
/// ([`super::MlaWorkspace::upload_schedule`]).
pub fn mla_schedule_host(
    seqlens_k: &[i32],
    bt_stride: usize,
    parts: usize,
    overhead: usize,
) -> MlaSchedule {
    let cap = (bt_stride * MLA_PAGE_TOKENS) as i64;
    let nblk: Vec<i64> = seqlens_k
        .iter()
        .map(|&l| {
            (i64::from(l).clamp(0, cap) + MLA_PAGE_TOKENS as i64 - 1) / MLA_PAGE_TOKENS as i64
        })
        .collect();
    let batch = nblk.len();
    let overhead = overhead as i64;
    let total: i64 = nblk.iter().map(|n| n + overhead).sum();
    let nparts = parts.max(1) as i64;
    let payload = (total + nparts - 1) / nparts + overhead;
    let mut splits = vec![0i32; batch + 1];
    let mut out = Vec::with_capacity(nparts as usize);
    let (mut cur_b, mut cur_blk, mut cur_split, mut cum) = (0usize, 0i64, 0i32, 0i32);
    for _ in 0..nparts {
        let mut rec = [0i32; SCHED_FIELDS];
        rec[0] = cur_b as i32;
        rec[1] = cur_blk as i32;
        rec[4] = cur_split;
        let mut remain = payload;
        while cur_b < batch {
            let left = nblk[cur_b] - cur_blk;
            if remain >= left + overhead {
                cum += cur_split + 1;
                splits[cur_b + 1] = cum;
                remain -= left + overhead;
                cur_b += 1;
                cur_blk = 0;
                cur_split = 0;
            } else {
                let take = remain - overhead;
                if take > 0 {
                    cur_blk += take;
                    cur_split += 1;
                }
                break;
            }
        }
        if cur_blk > 0 {
            rec[2] = cur_b as i32;
            rec[3] = cur_blk as i32;
        } else {
            rec[2] = cur_b as i32 - 1;
            rec[3] = if cur_b > 0 { nblk[cur_b - 1] as i32 } else { 0 };
        }
        out.push(rec);
    }
    while cur_b < batch {
        cum += cur_split + 1;
        cur_split = 0;
        splits[cur_b + 1] = cum;
        cur_b += 1;
    }
    MlaSchedule { parts: out, splits }
}

/// Prefill form with the lower cost for a chunk of `chunk` new tokens over `prefix` cached
/// ones (per layer, multiply-accumulates):
/// absorbed = chunk * heads * (kv_lora + rope + kv_lora) * keys_avg, plus W_UK / W_UV on the
/// chunk (2 * chunk * heads * nope_or_v * kv_lora); expanded = chunk * heads * (qk + v) *
/// keys_avg plus kv_b_proj over every key (keys * heads * (nope + v) * kv_lora).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrefillForm {
    Absorbed,
    Expanded,
}

#[allow(clippy::too_many_arguments)]
pub fn prefill_form_by_cost(
    chunk: usize,
    prefix: usize,
    heads: usize,
    kv_lora: usize,
    rope: usize,
    nope: usize,
    v: usize,
) -> (PrefillForm, f64, f64) {
    let (c, p, h) = (chunk as f64, prefix as f64, heads as f64);
    let keys = p + c;
    // Average keys per query under the causal mask: prefix + (chunk + 1) / 2.
    let pairs = c * (p + (c + 1.0) / 2.0);
    let absorbed =
        pairs * h * (2 * kv_lora + rope) as f64 + c * h * (nope + v) as f64 * kv_lora as f64;
    let expanded =
        pairs * h * (nope + rope + v) as f64 + keys * h * (nope + v) as f64 * kv_lora as f64;
    let form = if absorbed <= expanded {
        PrefillForm::Absorbed
    } else {
        PrefillForm::Expanded
    };
    (form, absorbed, expanded)
}

// ------------------------------------------------------------------------------------------
// MoE
// ------------------------------------------------------------------------------------------

/// Most tokens for which the MoE rows take the masked (decode) layout.
pub const MOE_MASKED_MAX_TOKENS: usize = 128;

impl MoeLayout {
    /// Masked (decode) for up to [`MOE_MASKED_MAX_TOKENS`] tokens, else contiguous (prefill);
    /// masked rows hold `capacity` tokens per expert, so no routing can overflow them.
    pub fn auto(capacity: usize) -> MoeLayout {
        let layout = if capacity <= MOE_MASKED_MAX_TOKENS {
            MoeLayout::Masked {
                max_tokens_per_expert: capacity,
            }
        } else {
            MoeLayout::Contiguous
        };
        report(&Choice::MoeLayout { capacity, layout });
        layout
    }
}

/// How a MoE layer's routed experts run on the GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MoeRoutedPath {
    /// The fused block (`MoeOps::moe_forward`: grouped GEMMs over permuted rows).
    Fused,
    /// The router, then every expert's MLP over all tokens with dense GEMMs (any shape the
    /// dense kernels take).
    PerExpert,
}

/// The fused block wherever its shape rules hold (hidden and moe_intermediate positive
/// multiples of 128, a router the kernels take), else the per-expert fallback.
pub fn moe_routed_path(cfg: &MoeBlockConfig) -> MoeRoutedPath {
    let path = if cfg.check().is_ok() {
        MoeRoutedPath::Fused
    } else {
        MoeRoutedPath::PerExpert
    };
    report(&Choice::MoeRouted {
        hidden: cfg.hidden,
        inter: cfg.inter,
        experts: cfg.router.experts,
        path,
    });
    path
}

// ------------------------------------------------------------------------------------------
// Printing the choices
// ------------------------------------------------------------------------------------------

/// One decision, as `R1_PRINT_CHOICES` prints it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Choice {
    Fp8Gemm {
        m: usize,
        n: usize,
        k: usize,
        kernel: GemmKernel,
        /// Persistent CTAs (the wgmma kernels).
        ctas: Option<usize>,
    },
    GroupedGemm {
        layout: MoeLayout,
        tokens: usize,
        n: usize,
        k: usize,
        kernel: GroupedGemmKernel,
        ctas: Option<usize>,
    },
    MlaAttn {
        batch: usize,
        heads: usize,
        max_q_len: usize,
        kernel: MlaKernel,
        /// Split-KV parts (the wgmma path).
        parts: Option<usize>,
    },
    MoeLayout {
        capacity: usize,
        layout: MoeLayout,
    },
    MoeRouted {
        hidden: usize,
        inter: usize,
        experts: usize,
        path: MoeRoutedPath,
    },
}

impl Choice {
    /// `r1-choice: <what> <shape> -> <decision>`.
    pub fn line(&self) -> String {
        let ctas =
            |c: &Option<usize>| c.map_or(String::new(), |c| format!(" (persistent ctas {c})"));
        let layout = |l: &MoeLayout| match l {
            MoeLayout::Contiguous => "contiguous".to_string(),
            MoeLayout::Masked {
                max_tokens_per_expert,
            } => format!("masked ({max_tokens_per_expert} rows per expert)"),
        };
        let body = match self {
            Choice::Fp8Gemm {
                m,
                n,
                k,
                kernel,
                ctas: c,
            } => format!("fp8_gemm m={m} n={n} k={k} -> {}{}", kernel.name(), ctas(c)),
            Choice::GroupedGemm {
                layout: l,
                tokens,
                n,
                k,
                kernel,
                ctas: c,
            } => format!(
                "moe_gemm {} tokens={tokens} n={n} k={k} -> {}{}",
                layout(l),
                kernel.name(),
                ctas(c)
            ),
            Choice::MlaAttn {
                batch,
                heads,
                max_q_len,
                kernel,
                parts,
            } => format!(
                "mla_attn batch={batch} heads={heads} max_q_len={max_q_len} -> {}{}",
                kernel.name(),
                parts.map_or(String::new(), |p| format!(" (split-kv parts {p})"))
            ),
            Choice::MoeLayout {
                capacity,
                layout: l,
            } => format!("moe_layout capacity={capacity} -> {}", layout(l)),
            Choice::MoeRouted {
                hidden,
                inter,
                experts,
                path,
            } => format!(
                "moe_routed hidden={hidden} moe_intermediate={inter} experts={experts} -> {}",
                match path {
                    MoeRoutedPath::Fused => "fused moe block",
                    MoeRoutedPath::PerExpert => "per-expert fallback",
                }
            ),
        };
        format!("r1-choice: {body}")
    }
}

/// The line to print for `choice` when it is new to `seen` (then remembered), else None.
fn first_time(seen: &mut HashSet<String>, choice: &Choice) -> Option<String> {
    let line = choice.line();
    seen.insert(line.clone()).then_some(line)
}

/// True when `R1_PRINT_CHOICES` asks for the choices (any value but empty or "0").
fn printing_enabled(value: Option<&str>) -> bool {
    value.is_some_and(|v| !v.is_empty() && v != "0")
}

/// Prints `choice` to stderr the first time it is made, when `R1_PRINT_CHOICES` is set.
pub fn report(choice: &Choice) {
    static ENABLED: OnceLock<bool> = OnceLock::new();
    static SEEN: OnceLock<Mutex<HashSet<String>>> = OnceLock::new();
    let enabled = *ENABLED
        .get_or_init(|| printing_enabled(std::env::var("R1_PRINT_CHOICES").ok().as_deref()));
    if !enabled {
        return;
    }
    let mut seen = SEEN
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if let Some(line) = first_time(&mut seen, choice) {
        eprintln!("{line}");
    }
}
