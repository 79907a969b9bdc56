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
    Bf16GemmKernel, GemmKernel, GroupedGemmKernel, MlaKernel, MoeBlockConfig, MoeGeometry,
    MoeLayout, MLA_BLOCK_M, MLA_PAGE_TOKENS, QUANT_BLOCK,
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

/// A wgmma GEMM's tile and operand width, as the split-K choice sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GemmTiling {
    pub block_m: usize,
    pub block_n: usize,
    pub block_k: usize,
    /// Bytes per A and B element (1 for fp8, 2 for bf16).
    pub elem_bytes: usize,
}

/// `fp8_gemm_wgmma` (and the grouped BLOCK_M 128 kernels): 128 x 128 tiles, 128-deep K-blocks, fp8.
pub const FP8_TILING: GemmTiling = GemmTiling {
    block_m: sys::R1_FP8_GEMM_BLOCK_M as usize,
    block_n: sys::R1_FP8_GEMM_BLOCK_N as usize,
    block_k: sys::R1_FP8_GEMM_BLOCK_K as usize,
    elem_bytes: 1,
};

/// `fp8_gemm_wgmma_m64`: 64 x 128 tiles.
pub const FP8_TILING_M64: GemmTiling = GemmTiling {
    block_m: sys::R1_FP8_GEMM_M64_BLOCK_M as usize,
    ..FP8_TILING
};

/// The fewest K-blocks a split gets: below this, filling the pipeline costs more than the
/// split saves.
pub const SPLIT_K_MIN_KBLOCKS: usize = 4;

/// The most splits [`split_k`] considers (at least 1): every unit on its own SM and at least
/// [`SPLIT_K_MIN_KBLOCKS`] K-blocks per split.
pub fn split_k_most(m: usize, n: usize, k: usize, t: GemmTiling, sm_count: usize) -> usize {
    let tiles = m.div_ceil(t.block_m) * n.div_ceil(t.block_n);
    let kblocks = k.div_ceil(t.block_k);
    (sm_count / tiles.max(1))
        .min(kblocks / SPLIT_K_MIN_KBLOCKS)
        .max(1)
}

/// Splits of K for an `m x n x k` GEMM on `sm_count` SMs: 1 when the output tiles alone fill
/// the SMs; else the count that minimizes the bytes the busiest SM moves, with every split on
/// its own SM (tiles * splits <= SMs) and at least [`SPLIT_K_MIN_KBLOCKS`] K-blocks each.
///
/// Per split: its K-blocks' B tiles (block_n rows) and A rows (min(m, block_m), what TMA
/// reads), then the f32 partial it stores; the slice's last split also reads the others'
/// partials. A decode GEMM is memory-bound, so those bytes are its time. (Stream-K would also
/// balance a last partial wave; here splitting is only chosen while one wave holds every
/// unit, so there is none.)
pub fn split_k(m: usize, n: usize, k: usize, t: GemmTiling, sm_count: usize) -> usize {
    let kblocks = k.div_ceil(t.block_k);
    let most = split_k_most(m, n, k, t, sm_count);
    if most <= 1 {
        return 1;
    }
    let rows = m.min(t.block_m);
    let per_kblock = (t.block_n + rows) * t.block_k * t.elem_bytes;
    let partial = rows * t.block_n * 4;
    let cost = |s: usize| {
        // Its own partial stored, then the other splits' read back by the last to arrive.
        let reduce = if s > 1 { partial * s } else { 0 };
        kblocks.div_ceil(s) * per_kblock + reduce
    };
    (1..=most).min_by_key(|&s| (cost(s), s)).unwrap_or(1)
}

// ------------------------------------------------------------------------------------------
// bf16 GEMM
// ------------------------------------------------------------------------------------------

/// bf16_gemm_wgmma's tile and operand width.
pub const BF16_TILING: GemmTiling = GemmTiling {
    block_m: sys::R1_BF16_GEMM_BLOCK_M as usize,
    block_n: sys::R1_BF16_GEMM_BLOCK_N as usize,
    block_k: sys::R1_BF16_GEMM_BLOCK_K as usize,
    elem_bytes: 2,
};

/// The bf16 GEMM kernel: `Wgmma` when the call meets its requirements (`meets`), else the
/// reference kernel.
pub fn bf16_gemm_kernel(meets: impl FnOnce(Bf16GemmKernel) -> bool) -> Bf16GemmKernel {
    if meets(Bf16GemmKernel::Wgmma) {
        Bf16GemmKernel::Wgmma
    } else {
        Bf16GemmKernel::Reference
    }
}

/// [`split_k`] of a batched bf16 GEMM, whose tiles are batch * ceil(M/64) * ceil(N/128): the
/// entries share the SMs, so each gets sm_count / batch of them (split_k only divides the SMs
/// by the tiles, and floor(floor(s / b) / t) = floor(s / (b t))).
pub fn bf16_gemm_splits(batch: usize, m: usize, n: usize, k: usize, sm_count: usize) -> usize {
    split_k(m, n, k, BF16_TILING, sm_count / batch.max(1))
}

/// `chosen` splits cut to what a workspace of `max_units` units and `max_tiles` tiles holds
/// for `tiles` tiles (1: no workspace needed).
pub fn splits_within(chosen: usize, tiles: usize, max_units: usize, max_tiles: usize) -> usize {
    if tiles > max_tiles {
        return 1;
    }
    chosen.min(max_units / tiles.max(1)).max(1)
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

/// Which kernel quantizes a linear layer's activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ActQuantKernel {
    /// cuda/act_quant.cu: 16-byte loads, 8 threads per 128-channel group (K % 128 == 0).
    Vectorized,
    /// The small-ops kernel, which also takes a last group shorter than 128 channels.
    RaggedK,
}

/// The vectorized kernel wherever every 128-channel group is whole, else the ragged-K one.
pub fn act_quant_kernel(m: usize, k: usize) -> ActQuantKernel {
    let kernel = if k % QUANT_BLOCK == 0 {
        ActQuantKernel::Vectorized
    } else {
        ActQuantKernel::RaggedK
    };
    report(&Choice::ActQuant { m, k, kernel });
    kernel
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
    ActQuant {
        m: usize,
        k: usize,
        kernel: ActQuantKernel,
    },
    Fp8Gemm {
        m: usize,
        n: usize,
        k: usize,
        kernel: GemmKernel,
        /// Persistent CTAs (the wgmma kernels).
        ctas: Option<usize>,
        /// Splits of K (1: none).
        splits: usize,
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
    Bf16Gemm {
        batch: usize,
        m: usize,
        n: usize,
        k: usize,
        kernel: Bf16GemmKernel,
        /// Persistent CTAs and split-K splits (the wgmma kernel).
        ctas: Option<usize>,
        splits: Option<usize>,
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
            Choice::ActQuant { m, k, kernel } => format!(
                "act_quant m={m} k={k} -> {}",
                match kernel {
                    ActQuantKernel::Vectorized => "act_quant",
                    ActQuantKernel::RaggedK => "small_act_quant (ragged K)",
                }
            ),
            Choice::Fp8Gemm {
                m,
                n,
                k,
                kernel,
                ctas,
                splits,
            } => {
                let mut notes = Vec::new();
                if let Some(c) = ctas {
                    notes.push(format!("persistent ctas {c}"));
                }
                if *splits > 1 {
                    notes.push(format!("split-k {splits}"));
                }
                let notes = if notes.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", notes.join(", "))
                };
                format!("fp8_gemm m={m} n={n} k={k} -> {}{notes}", kernel.name())
            }
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
            Choice::Bf16Gemm {
                batch,
                m,
                n,
                k,
                kernel,
                ctas: c,
                splits,
            } => format!(
                "bf16_gemm batch={batch} m={m} n={n} k={k} -> {}{}{}",
                kernel.name(),
                ctas(c),
                splits.map_or(String::new(), |s| format!(" (split-k {s})"))
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

/// Prints `choice` to stderr the first time it is made, when `R1_PRINT_CHOICES` is set.
pub fn report(choice: &Choice) {
    static ENABLED: OnceLock<bool> = OnceLock::new();
    static SEEN: OnceLock<Mutex<HashSet<String>>> = OnceLock::new();
    let enabled = *ENABLED.get_or_init(|| super::env_switch("R1_PRINT_CHOICES"));
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

#[cfg(test)]
pub(crate) mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::cuda::ops::{
        act_scale_m_pad, Bf16GemmDesc, Bf16Out, Fp8GemmDesc, MlaAttnDesc, MlaWorkspace,
        MlaWorkspaceDesc, Region, RouterConfig, SplitKDesc, SplitKWorkspace,
        MLA_SCHED_FIXED_OVERHEAD,
    };

    /// H200 / H100 SXM: 132 SMs.
    fn hopper() -> DeviceInfo {
        DeviceInfo {
            ordinal: 0,
            name: "test".into(),
            compute_capability: (9, 0),
            sm_count: 132,
            l2_bytes: 50 << 20,
            max_smem_per_block_optin: 227 << 10,
            total_mem_bytes: 141 << 30,
            sm_clock_khz: 0,
            mem_clock_khz: 0,
            mem_bus_width_bits: 0,
            driver_version: 13000,
        }
    }

    /// A well-formed fast-path GEMM call with fake (aligned) addresses; tests break one thing
    /// at a time.
    pub(crate) fn fp8_gemm_desc(m: usize, n: usize, k: usize) -> Fp8GemmDesc {
        let kb = k.div_ceil(QUANT_BLOCK);
        let m_pad = act_scale_m_pad(m);
        let r = |addr: u64, len: usize| Region { addr, len };
        Fp8GemmDesc {
            m,
            n,
            k,
            a: r(0x1000_0000, m * k),
            lda: k,
            sa: r(0x2000_0000, kb * m_pad),
            m_pad,
            b: r(0x3000_0000, n * k),
            ldb: k,
            sb: r(0x4000_0000, n.div_ceil(QUANT_BLOCK) * kb),
            d: r(0x5000_0000, m * n),
            ldd: n,
        }
    }

    pub(crate) const KV_LORA: usize = 512;
    pub(crate) const ROPE: usize = 64;
    pub(crate) const WIDTH: usize = KV_LORA + ROPE;

    /// A well-formed fast-path attention call with fake (aligned) addresses, its workspace
    /// planned for 132 SMs.
    pub(crate) fn mla_attn_desc(
        batch: usize,
        heads: usize,
        s_q: usize,
        bt_stride: usize,
        num_pages: usize,
    ) -> MlaAttnDesc {
        let total_q = batch * s_q;
        let rows = total_q * heads;
        let parts = mla_plan_parts(132, heads, s_q);
        let [s, sp, o, l] = MlaWorkspace::lens(batch, heads, s_q, parts);
        let r = |addr: u64, len: usize| Region { addr, len };
        MlaAttnDesc {
            batch,
            heads,
            total_q,
            max_q_len: s_q,
            kv_lora: KV_LORA,
            rope: ROPE,
            bt_stride,
            num_pages,
            scale: 0.1352,
            q: r(0x1000_0000, rows * WIDTH),
            cache: r(0x2000_0000, num_pages * 64 * WIDTH),
            block_table: r(0x3000_0000, batch * bt_stride),
            seqlens_k: r(0x3100_0000, batch),
            q_starts: r(0x3200_0000, batch + 1),
            out: r(0x4000_0000, rows * KV_LORA),
            lse: r(0x4100_0000, rows),
            workspace: Some(MlaWorkspaceDesc {
                parts,
                sched: r(0x5000_0000, s),
                splits: r(0x5100_0000, sp),
                o_accum: r(0x5200_0000, o),
                lse_accum: r(0x5300_0000, l),
            }),
        }
    }

    // --------------------------------------------------------------------------------------
    // GEMMs
    // --------------------------------------------------------------------------------------

    /// Split-K only while the tiles leave SMs idle, never past one unit per SM, never below
    /// the minimum K-blocks per split; more rows (bigger partials) split less.
    #[test]
    fn split_k_fills_idle_sms_within_its_bounds() {
        let fp8 = FP8_TILING_M64;
        assert_eq!(
            (fp8.block_m, fp8.block_n, fp8.block_k, FP8_TILING.block_m),
            (64, 128, 128, 128)
        );
        // q_a at M = 1: 12 tiles, 56 K-blocks -> 10 splits of 5-6 K-blocks (11 would not
        // shorten the longest split).
        assert_eq!(split_k(1, 1536, 7168, fp8, 132), 10);
        // Enough tiles: no split.
        assert_eq!(split_k(1, 129_280, 7168, fp8, 132), 1);
        // Too few K-blocks to split.
        assert_eq!(split_k(1, 128, 512, fp8, 132), 1);
        for (m, n, k) in [
            (1, 1536, 7168),
            (64, 1536, 7168),
            (8, 7168, 2048),
            (32, 512, 16384),
        ] {
            let s = split_k(m, n, k, fp8, 132);
            let tiles = m.div_ceil(64) * n.div_ceil(128);
            assert!(
                tiles * s <= 132 && (k / 128) / s >= SPLIT_K_MIN_KBLOCKS,
                "{m} {n} {k}: {s}"
            );
        }
        assert!(split_k(64, 1536, 7168, fp8, 132) < split_k(1, 1536, 7168, fp8, 132));
    }

    /// R1's decode FP8 GEMMs (N x K, D = A·B^T) as the CUDA backend runs them, at TP 1 and
    /// TP 8 (column-parallel layers split N, row-parallel ones K; q_a and kv_a whole).
    const R1_DECODE_GEMMS: [(&str, [usize; 2], [usize; 2]); 8] = [
        // name, TP 1 (N, K), TP 8 (N, K)
        ("q_a", [1536, 7168], [1536, 7168]),
        ("kv_a", [576, 7168], [576, 7168]),
        ("q_b", [24576, 1536], [3072, 1536]),
        ("o_proj", [7168, 16384], [7168, 2048]),
        ("dense gate/up", [18432, 7168], [2304, 7168]),
        ("dense down", [7168, 18432], [7168, 2304]),
        ("shared gate/up", [2048, 7168], [256, 7168]),
        ("shared down", [7168, 2048], [7168, 256]),
    ];

    /// The splits `split_k` chooses for every R1 decode GEMM on 132 SMs with the kernel Auto
    /// takes at M <= 64 (`fp8_gemm_wgmma_m64`), at M = 1, 8, 32, 64. Shapes whose tiles fill
    /// the SMs (q_b and dense gate/up at TP 1: 192 and 144 tiles) and K too short to split
    /// (shared down at TP 8: 2 K-blocks) stay whole; 56-tile GEMMs take 2 splits (112 units);
    /// the few-tile ones split down to SPLIT_K_MIN_KBLOCKS K-blocks at M = 1 and 8 and a little
    /// less at M = 32 and 64, where each split's partial costs more.
    #[test]
    fn split_k_r1_decode_table() {
        #[rustfmt::skip]
        let want: [(&str, [[usize; 4]; 2]); 8] = [
            // name,             TP 1 at M = 1, 8, 32, 64   TP 8 at M = 1, 8, 32, 64
            ("q_a",            [[10, 10, 8, 7],           [10, 10, 8, 7]]),
            ("kv_a",           [[14, 14, 8, 7],           [14, 14, 8, 7]]),
            ("q_b",            [[1, 1, 1, 1],             [3, 3, 3, 3]]),
            ("o_proj",         [[2, 2, 2, 2],             [2, 2, 2, 2]]),
            ("dense gate/up",  [[1, 1, 1, 1],             [7, 7, 7, 7]]),
            ("dense down",     [[2, 2, 2, 2],             [2, 2, 2, 2]]),
            ("shared gate/up", [[8, 8, 8, 7],             [14, 14, 8, 7]]),
            ("shared down",    [[2, 2, 2, 2],             [1, 1, 1, 1]]),
        ];
        let sms = hopper().sm_count;
        for ((name, tp1, tp8), (want_name, want)) in R1_DECODE_GEMMS.iter().zip(want) {
            assert_eq!(*name, want_name);
            for (tp, [n, k], want) in [(1, tp1, want[0]), (8, tp8, want[1])] {
                for (m, want) in [1, 8, 32, 64].into_iter().zip(want) {
                    let got = split_k(m, *n, *k, FP8_TILING_M64, sms);
                    assert_eq!(got, want, "{name} TP {tp} [{n} x {k}] at M = {m}");
                    let tiles = m.div_ceil(64) * n.div_ceil(128);
                    let kblocks = k / 128;
                    assert!(
                        got == 1 || tiles * got <= sms,
                        "{name} TP {tp} M {m}: {tiles} x {got}"
                    );
                    assert!(
                        got == 1 || kblocks / got >= SPLIT_K_MIN_KBLOCKS,
                        "{name} TP {tp} M {m}: {kblocks} K-blocks in {got} splits"
                    );
                }
            }
        }
    }

    proptest! {
        /// Whatever it chooses fits the workspace `SplitKWorkspace::for_device` allocates,
        /// for both wgmma tilings, as `SplitKDesc::check` (the launch's check) sees it.
        #[test]
        fn split_k_fits_the_device_workspace(
            m in prop_oneof![1usize..=64, 1usize..600],
            n in prop_oneof![1usize..2048, 1usize..40000],
            kb in 1usize..200,
            sms in prop_oneof![Just(132usize), 1usize..200],
        ) {
            let dev = DeviceInfo { sm_count: sms, ..hopper() };
            let (units, tiles_cap) = SplitKWorkspace::device_capacity(&dev);
            let [partials, counters] = SplitKWorkspace::lens(units, tiles_cap);
            for t in [FP8_TILING, FP8_TILING_M64] {
                let s = split_k(m, n, kb * 128, t, dev.sm_count);
                let tiles = m.div_ceil(t.block_m) * n.div_ceil(t.block_n);
                prop_assert!(s >= 1 && s <= kb);
                prop_assert!(s == 1 || tiles * s <= units, "{m} {n} {kb}: {tiles} x {s}");
                let desc = SplitKDesc {
                    splits: s,
                    partials: Region { addr: 0x1000_0000, len: partials },
                    counters: Region { addr: 0x2000_0000, len: counters },
                };
                if let Err(e) = desc.check("fp8_gemm", tiles, kb, t.block_m, t.block_n) {
                    return Err(TestCaseError::fail(e.to_string()));
                }
            }
        }
    }

    #[test]
    fn fp8_gemm_kernel_by_m_then_requirements() {
        let all = |_| true;
        assert_eq!(fp8_gemm_kernel(1, all), GemmKernel::WgmmaM64);
        assert_eq!(fp8_gemm_kernel(AUTO_M64_MAX_M, all), GemmKernel::WgmmaM64);
        assert_eq!(fp8_gemm_kernel(AUTO_M64_MAX_M + 1, all), GemmKernel::Wgmma);
        assert_eq!(fp8_gemm_kernel(4096, all), GemmKernel::Wgmma);
        // Only the chosen kernel is asked about; refused, the reference kernel runs.
        let mut asked = Vec::new();
        let k = fp8_gemm_kernel(65, |k| {
            asked.push(k);
            false
        });
        assert_eq!((k, asked), (GemmKernel::Reference, vec![GemmKernel::Wgmma]));
        assert_eq!(
            fp8_gemm_kernel(3, |k| k == GemmKernel::Wgmma),
            GemmKernel::Reference
        );
    }

    /// `Fp8GemmDesc::resolve(Auto)`: m64 for small M, BLOCK_M 128 above, the reference for
    /// what the fast path refuses.
    #[test]
    fn fp8_gemm_auto_resolves_by_shape() {
        let auto = |d: Fp8GemmDesc| d.resolve(GemmKernel::Auto).unwrap();
        assert_eq!(auto(fp8_gemm_desc(1, 2112, 7168)), GemmKernel::WgmmaM64);
        assert_eq!(auto(fp8_gemm_desc(64, 256, 128)), GemmKernel::WgmmaM64);
        assert_eq!(auto(fp8_gemm_desc(65, 256, 128)), GemmKernel::Wgmma);
        assert_eq!(auto(fp8_gemm_desc(4096, 7168, 16384)), GemmKernel::Wgmma);
        // K % 128 != 0.
        assert_eq!(auto(fp8_gemm_desc(3, 5, 100)), GemmKernel::Reference);
        // Strides: TMA needs 16-byte rows.
        let mut d = fp8_gemm_desc(70, 300, 256);
        d.lda = 264;
        d.a.len = 70 * 264;
        assert_eq!(auto(d), GemmKernel::Reference);
        // Alignment.
        let mut d = fp8_gemm_desc(70, 300, 256);
        d.a.addr += 8;
        assert_eq!(auto(d), GemmKernel::Reference);
    }

    #[test]
    fn grouped_gemm_kernel_by_layout_and_load() {
        use GroupedGemmKernel as K;
        let geom = |tokens, layout| MoeGeometry {
            tokens,
            top_k: 8,
            experts: 256,
            layout,
        };
        let masked = |m| MoeLayout::Masked {
            max_tokens_per_expert: m,
        };
        let all = |_| true;
        assert_eq!(
            grouped_gemm_kernel(&geom(4096, MoeLayout::Contiguous), all),
            K::ContigWgmma
        );
        assert_eq!(
            grouped_gemm_kernel(&geom(128, masked(128)), all),
            K::MaskedWgmmaM64
        );
        // 64 average rows per expert (2048 * 8 / 256) still take BLOCK_M 64; 65 do not.
        assert_eq!(
            grouped_gemm_kernel(&geom(2048, masked(2048)), all),
            K::MaskedWgmmaM64
        );
        assert_eq!(
            grouped_gemm_kernel(&geom(2049, masked(2049)), all),
            K::MaskedWgmma
        );
        assert_eq!(
            grouped_gemm_kernel(&geom(4096, masked(4096)), all),
            K::MaskedWgmma
        );
        assert_eq!(
            grouped_gemm_kernel(&geom(4096, MoeLayout::Contiguous), |k| k != K::ContigWgmma),
            K::Reference
        );
    }

    #[test]
    fn persistent_ctas_fill_the_sms_not_more() {
        let dev = hopper();
        assert_eq!(persistent_ctas(17, &dev), 17);
        assert_eq!(persistent_ctas(132, &dev), 132);
        assert_eq!(persistent_ctas(32 * 56, &dev), 132);
        assert_eq!(persistent_ctas(0, &dev), 1);
        // The tile counts the dense GEMMs hand in.
        assert_eq!(
            persistent_ctas(
                fp8_gemm_desc(1, 2112, 128).tiles(GemmKernel::WgmmaM64),
                &dev
            ),
            17
        );
        assert_eq!(
            persistent_ctas(
                fp8_gemm_desc(4096, 7168, 128).tiles(GemmKernel::Wgmma),
                &dev
            ),
            132
        );
    }

    // --------------------------------------------------------------------------------------
    // MLA
    // --------------------------------------------------------------------------------------

    /// `MlaAttnDesc::resolve(Auto)`: the fast path wherever it applies, else the reference.
    #[test]
    fn mla_auto_resolves_to_the_fast_path_where_it_applies() {
        assert_eq!(mla_kernel(|_| true), MlaKernel::Wgmma);
        assert_eq!(mla_kernel(|_| false), MlaKernel::Reference);
        let auto = |d: MlaAttnDesc| d.resolve(MlaKernel::Auto).unwrap();
        assert_eq!(
            auto(mla_attn_desc(128, 128, 1, 64, 128 * 64)),
            MlaKernel::Wgmma
        );
        for heads in [16, 32, 64, 128] {
            for s_q in [1, 2] {
                assert_eq!(
                    auto(mla_attn_desc(128, heads, s_q, 128, 128 * 128)),
                    MlaKernel::Wgmma,
                    "h {heads} s_q {s_q}"
                );
            }
        }
        // Other latent widths: the reference only.
        let mut x = mla_attn_desc(4, 16, 2, 8, 40);
        x.kv_lora = 256;
        x.q.len = 4 * 2 * 16 * (256 + ROPE);
        x.cache.len = 40 * 64 * (256 + ROPE);
        x.out.len = 4 * 2 * 16 * 256;
        assert_eq!(auto(x), MlaKernel::Reference);
        // No workspace.
        let mut x = mla_attn_desc(4, 16, 1, 8, 40);
        x.workspace = None;
        assert_eq!(auto(x), MlaKernel::Reference);
        // TMA alignment.
        let mut x = mla_attn_desc(4, 16, 1, 8, 40);
        x.q.addr += 8;
        assert_eq!(auto(x), MlaKernel::Reference);
        // A workspace too small for the call.
        let mut x = mla_attn_desc(4, 16, 2, 8, 40);
        if let Some(w) = x.workspace.as_mut() {
            w.o_accum.len = 0;
        }
        assert_eq!(auto(x), MlaKernel::Reference);
    }

    /// What a CTA (head block hb, part) of mla_decode_wgmma does for sequence b, as the
    /// kernel's make_seg computes it: None (inactive) or (first block, tiles, slot or None for
    /// direct).
    #[allow(clippy::too_many_arguments)]
    fn model_segment(
        rec: &[i32; 8],
        splits: &[i32],
        nblk: usize,
        b: usize,
        hb: usize,
        heads: usize,
        q_len: usize,
        kv_len: usize,
    ) -> Option<(usize, usize, Option<usize>)> {
        let (begin_b, end_b) = (rec[0] as i64, rec[2] as i64);
        let bi = b as i64;
        if bi < begin_b || bi > end_b {
            return None;
        }
        let blk0 = if bi == begin_b { rec[1] as usize } else { 0 };
        let blk1 = if bi == end_b { rec[3] as usize } else { nblk }.min(nblk);
        let rows_b = q_len * heads;
        if blk0 >= blk1 || hb * 64 >= rows_b {
            return None;
        }
        let i_max = (q_len - 1).min((hb * 64 + 63) / heads);
        let kv_lim = kv_len as i64 - q_len as i64 + i_max as i64 + 1;
        let blk_lim = if kv_lim > 0 {
            (kv_lim as usize).div_ceil(64)
        } else {
            0
        };
        let ntiles = blk1.min(blk_lim).saturating_sub(blk0);
        let nsplit = (splits[b + 1] - splits[b]) as usize;
        let slot = if bi == begin_b { rec[4] as usize } else { 0 };
        Some((blk0, ntiles, (nsplit > 1).then_some(slot)))
    }

    /// Every block of every sequence is in exactly one part; split slots of a sequence are
    /// 0..nsplit, each used by exactly one part; slots <= batch + parts; and, for every head
    /// block with rows, each output row gets exactly one direct write or all its slots written.
    fn check_schedule(
        kv_lens: &[usize],
        q_lens: &[usize],
        heads: usize,
        bt_stride: usize,
        parts: usize,
    ) -> Result<(), String> {
        let seqlens: Vec<i32> = kv_lens.iter().map(|&v| v as i32).collect();
        let s = mla_schedule_host(&seqlens, bt_stride, parts, MLA_SCHED_FIXED_OVERHEAD);
        let batch = kv_lens.len();
        if s.parts.len() != parts.max(1) || s.splits.len() != batch + 1 || s.splits[0] != 0 {
            return Err(format!("malformed schedule {s:?}"));
        }
        if s.slots() > batch + parts {
            return Err(format!(
                "{} slots > batch {batch} + parts {parts}",
                s.slots()
            ));
        }
        let nblk: Vec<usize> = kv_lens
            .iter()
            .map(|&l| l.min(bt_stride * 64).div_ceil(64))
            .collect();
        let mut covered: Vec<Vec<u32>> = nblk.iter().map(|&n| vec![0; n]).collect();
        let mut slot_use: Vec<Vec<u32>> = Vec::new();
        for b in 0..batch {
            let ns = s.splits[b + 1] - s.splits[b];
            if ns < 1 {
                return Err(format!("sequence {b} has {ns} splits"));
            }
            slot_use.push(vec![0; ns as usize]);
        }
        for rec in &s.parts {
            for b in i64::from(rec[0]).max(0)..=i64::from(rec[2]).min(batch as i64 - 1) {
                let b = b as usize;
                let blk0 = if b as i32 == rec[0] {
                    rec[1] as usize
                } else {
                    0
                };
                let blk1 = if b as i32 == rec[2] {
                    rec[3] as usize
                } else {
                    nblk[b]
                }
                .min(nblk[b]);
                if blk0 >= blk1 {
                    continue;
                }
                for c in &mut covered[b][blk0..blk1] {
                    *c += 1;
                }
                let slot = if b as i32 == rec[0] {
                    rec[4] as usize
                } else {
                    0
                };
                match slot_use[b].get_mut(slot) {
                    Some(u) => *u += 1,
                    None => {
                        return Err(format!(
                            "sequence {b}: slot {slot} >= nsplit {}",
                            slot_use[b].len()
                        ))
                    }
                }
            }
        }
        for b in 0..batch {
            if let Some(blk) = covered[b].iter().position(|&c| c != 1) {
                return Err(format!(
                    "sequence {b} block {blk} covered {} times",
                    covered[b][blk]
                ));
            }
            if let Some(slot) = slot_use[b].iter().position(|&c| c != 1) {
                return Err(format!(
                    "sequence {b} slot {slot} used {} times",
                    slot_use[b][slot]
                ));
            }
        }
        // The kernel's view, per head block: writes and the union of tiles it runs.
        let m_blocks = (q_lens.iter().max().unwrap() * heads).div_ceil(64);
        for b in 0..batch {
            for hb in 0..m_blocks {
                if hb * 64 >= q_lens[b] * heads {
                    continue;
                }
                let mut direct = 0;
                let mut slots = vec![0u32; slot_use[b].len()];
                let mut tiles = vec![0u32; nblk[b]];
                for rec in &s.parts {
                    if let Some((blk0, ntiles, slot)) =
                        model_segment(rec, &s.splits, nblk[b], b, hb, heads, q_lens[b], kv_lens[b])
                    {
                        match slot {
                            None => direct += 1,
                            Some(k) => slots[k] += 1,
                        }
                        for t in &mut tiles[blk0..blk0 + ntiles] {
                            *t += 1;
                        }
                    }
                }
                let ok_writes = if slots.len() == 1 {
                    direct == 1
                } else {
                    direct == 0 && slots.iter().all(|&c| c == 1)
                };
                if !ok_writes {
                    return Err(format!(
                        "sequence {b} head block {hb}: {direct} direct writes, slots {slots:?}"
                    ));
                }
                let i_max = (q_lens[b] - 1).min((hb * 64 + 63) / heads);
                let lim = (kv_lens[b] - q_lens[b] + i_max + 1)
                    .div_ceil(64)
                    .min(nblk[b]);
                if tiles
                    .iter()
                    .enumerate()
                    .any(|(k, &c)| c != u32::from(k < lim))
                {
                    return Err(format!(
                        "sequence {b} head block {hb}: tiles run {tiles:?}, want the first {lim}"
                    ));
                }
            }
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 400, failure_persistence: None, ..ProptestConfig::default() })]

        /// The split-KV schedule covers every block once and every output row is written once.
        #[test]
        fn schedule_covers_every_block_and_row_once(
            lens in prop::collection::vec(
                prop_oneof![Just(1usize), Just(2), Just(63), Just(64), Just(65), Just(129), Just(4097), 1usize..9000],
                1..24),
            s_q in 1usize..4,
            heads in prop_oneof![Just(16usize), Just(32), Just(64), Just(128), 1usize..20],
            parts in prop_oneof![Just(1usize), Just(2), Just(33), Just(66), Just(132), 1usize..400],
            extra in 0usize..3,
        ) {
            let kv: Vec<usize> = lens.iter().map(|&l| l.max(s_q)).collect();
            let q = vec![s_q; kv.len()];
            let bt = kv.iter().map(|l| l.div_ceil(64)).max().unwrap() + extra;
            if let Err(e) = check_schedule(&kv, &q, heads, bt, parts) {
                return Err(TestCaseError::fail(e));
            }
        }

        /// Chunked prefill layouts (varying q_len per sequence) too.
        #[test]
        fn schedule_covers_prefill_layouts(
            seqs in prop::collection::vec((1usize..300, 0usize..3000), 1..8),
            heads in prop_oneof![Just(16usize), Just(128), 1usize..20],
            parts in 1usize..200,
        ) {
            let q: Vec<usize> = seqs.iter().map(|s| s.0).collect();
            let kv: Vec<usize> = seqs.iter().map(|s| s.0 + s.1).collect();
            let bt = kv.iter().map(|l| l.div_ceil(64)).max().unwrap();
            if let Err(e) = check_schedule(&kv, &q, heads, bt, parts) {
                return Err(TestCaseError::fail(e));
            }
        }
    }

    #[test]
    fn schedule_balances_fixed_lengths() {
        // FlashMLA's b = 128, s_k = 4096 on 132 SMs with h = 128, s_q = 1 (2 head blocks).
        let parts = mla_plan_parts(132, 128, 1);
        assert_eq!(parts, 66);
        let s = mla_schedule_host(&[4096; 128], 64, parts, MLA_SCHED_FIXED_OVERHEAD);
        let total = 128 * (64 + MLA_SCHED_FIXED_OVERHEAD);
        let payload = total.div_ceil(parts) + MLA_SCHED_FIXED_OVERHEAD;
        // Each part's blocks (+ overhead per sequence touched) stay within the payload.
        for rec in &s.parts {
            let mut cost = 0;
            for b in rec[0]..=rec[2] {
                let blk0 = if b == rec[0] { rec[1] } else { 0 };
                let blk1 = if b == rec[2] { rec[3] } else { 64 };
                if blk0 < blk1 {
                    cost += (blk1 - blk0) as usize + MLA_SCHED_FIXED_OVERHEAD;
                }
            }
            assert!(
                cost <= payload,
                "part {rec:?} costs {cost} > payload {payload}"
            );
        }
        assert!(s.slots() <= 128 + parts);
        check_schedule(&[4096; 128], &[1; 128], 128, 64, parts).unwrap();
        // Prefill-sized head counts leave one part per head block: nothing is split.
        assert_eq!(mla_plan_parts(132, 128, 512), 1);
        let s = mla_schedule_host(&[5000, 3, 700], 80, 1, MLA_SCHED_FIXED_OVERHEAD);
        assert_eq!(s.splits, vec![0, 1, 2, 3]);
    }

    #[test]
    fn prefill_form_cost_model() {
        // Decode (1 token over 4096): absorbed. A 4096-token prompt from scratch: expanded.
        let (f, a, e) = prefill_form_by_cost(1, 4096, 128, 512, 64, 128, 128);
        assert_eq!(f, PrefillForm::Absorbed, "{a} vs {e}");
        let (f, a, e) = prefill_form_by_cost(4096, 0, 128, 512, 64, 128, 128);
        assert_eq!(f, PrefillForm::Expanded, "{a} vs {e}");
        // A short chunk over a long prefix stays absorbed.
        assert_eq!(
            prefill_form_by_cost(64, 16384, 128, 512, 64, 128, 128).0,
            PrefillForm::Absorbed
        );
    }

    // --------------------------------------------------------------------------------------
    // MoE
    // --------------------------------------------------------------------------------------

    #[test]
    fn moe_layout_masked_up_to_128_tokens() {
        assert_eq!(
            MoeLayout::auto(1),
            MoeLayout::Masked {
                max_tokens_per_expert: 1
            }
        );
        assert_eq!(
            MoeLayout::auto(MOE_MASKED_MAX_TOKENS),
            MoeLayout::Masked {
                max_tokens_per_expert: 128
            }
        );
        assert_eq!(MoeLayout::auto(129), MoeLayout::Contiguous);
        assert_eq!(MoeLayout::auto(4096), MoeLayout::Contiguous);
    }

    #[test]
    fn act_quant_vectorized_for_whole_groups_only() {
        assert_eq!(act_quant_kernel(1, 7168), ActQuantKernel::Vectorized);
        assert_eq!(act_quant_kernel(5, 128), ActQuantKernel::Vectorized);
        for k in [1, 64, 7000, 7168 + 64] {
            assert_eq!(act_quant_kernel(1, k), ActQuantKernel::RaggedK, "k={k}");
        }
        assert_eq!(
            Choice::ActQuant {
                m: 3,
                k: 100,
                kernel: ActQuantKernel::RaggedK
            }
            .line(),
            "r1-choice: act_quant m=3 k=100 -> small_act_quant (ragged K)"
        );
    }

    #[test]
    fn moe_routed_path_fused_where_the_block_applies() {
        let deepseek = MoeBlockConfig {
            shared_inter: 0,
            ..MoeBlockConfig::deepseek_r1()
        };
        assert_eq!(moe_routed_path(&deepseek), MoeRoutedPath::Fused);
        for odd in [
            MoeBlockConfig {
                inter: 96,
                ..deepseek
            },
            MoeBlockConfig {
                hidden: 7000,
                ..deepseek
            },
            MoeBlockConfig {
                router: RouterConfig {
                    experts: 1024,
                    ..deepseek.router
                },
                ..deepseek
            },
        ] {
            assert_eq!(moe_routed_path(&odd), MoeRoutedPath::PerExpert, "{odd:?}");
        }
    }

    // --------------------------------------------------------------------------------------
    // Printing
    // --------------------------------------------------------------------------------------

    #[test]
    fn choice_lines_name_shape_and_decision() {
        let line = Choice::Fp8Gemm {
            m: 1,
            n: 2112,
            k: 7168,
            kernel: GemmKernel::WgmmaM64,
            ctas: Some(17),
            splits: 1,
        }
        .line();
        assert_eq!(
            line,
            "r1-choice: fp8_gemm m=1 n=2112 k=7168 -> fp8_gemm_wgmma_m64 (persistent ctas 17)"
        );
        assert_eq!(
            Choice::Fp8Gemm {
                m: 1,
                n: 1536,
                k: 7168,
                kernel: GemmKernel::WgmmaM64,
                ctas: Some(120),
                splits: 10,
            }
            .line(),
            "r1-choice: fp8_gemm m=1 n=1536 k=7168 -> fp8_gemm_wgmma_m64 (persistent ctas 120, \
             split-k 10)"
        );
        assert_eq!(
            Choice::Fp8Gemm {
                m: 3,
                n: 5,
                k: 100,
                kernel: GemmKernel::Reference,
                ctas: None,
                splits: 1,
            }
            .line(),
            "r1-choice: fp8_gemm m=3 n=5 k=100 -> fp8_gemm_ref"
        );
        assert_eq!(
            Choice::GroupedGemm {
                layout: MoeLayout::Masked {
                    max_tokens_per_expert: 4
                },
                tokens: 4,
                n: 4096,
                k: 7168,
                kernel: GroupedGemmKernel::MaskedWgmmaM64,
                ctas: Some(132),
            }
            .line(),
            "r1-choice: moe_gemm masked (4 rows per expert) tokens=4 n=4096 k=7168 -> \
             moe_gemm_masked_wgmma_m64 (persistent ctas 132)"
        );
        assert_eq!(
            Choice::MlaAttn {
                batch: 128,
                heads: 128,
                max_q_len: 1,
                kernel: MlaKernel::Wgmma,
                parts: Some(66),
            }
            .line(),
            "r1-choice: mla_attn batch=128 heads=128 max_q_len=1 -> mla_decode_wgmma \
             (split-kv parts 66)"
        );
        assert_eq!(
            Choice::MlaAttn {
                batch: 2,
                heads: 16,
                max_q_len: 3,
                kernel: MlaKernel::Reference,
                parts: None,
            }
            .line(),
            "r1-choice: mla_attn batch=2 heads=16 max_q_len=3 -> mla_attn_ref"
        );
        assert_eq!(
            Choice::MoeLayout {
                capacity: 4096,
                layout: MoeLayout::Contiguous
            }
            .line(),
            "r1-choice: moe_layout capacity=4096 -> contiguous"
        );
        assert_eq!(
            Choice::MoeRouted {
                hidden: 7168,
                inter: 2048,
                experts: 256,
                path: MoeRoutedPath::PerExpert,
            }
            .line(),
            "r1-choice: moe_routed hidden=7168 moe_intermediate=2048 experts=256 -> \
             per-expert fallback"
        );
    }

    #[test]
    fn each_distinct_choice_prints_once() {
        let mut seen = HashSet::new();
        let a = Choice::MoeLayout {
            capacity: 8,
            layout: MoeLayout::auto(8),
        };
        let b = Choice::MoeLayout {
            capacity: 9,
            layout: MoeLayout::auto(9),
        };
        assert_eq!(first_time(&mut seen, &a), Some(a.line()));
        assert_eq!(first_time(&mut seen, &a), None);
        assert_eq!(first_time(&mut seen, &b), Some(b.line()));
        assert_eq!(first_time(&mut seen, &a.clone()), None);
    }

    // -------------------------------------------------------------------------- bf16 GEMM

    /// A well-formed wgmma bf16 GEMM call with fake (aligned) addresses and contiguous batch
    /// entries (f32 out); tests break one thing at a time.
    pub(crate) fn bf16_gemm_desc(m: usize, n: usize, k: usize, batch: usize) -> Bf16GemmDesc {
        let r = |addr: u64, len: usize| Region { addr, len };
        let b = batch.max(1);
        Bf16GemmDesc {
            m,
            n,
            k,
            batch,
            a: r(0x1000_0000, b * m * k),
            lda: k,
            a_batch: m * k,
            b: r(0x3000_0000, b * n * k),
            ldb: k,
            b_batch: n * k,
            d: r(0x5000_0000, b * m * n),
            ldd: n,
            d_batch: m * n,
            out: Bf16Out::F32,
        }
    }

    #[test]
    fn bf16_gemm_kernel_by_requirements() {
        assert_eq!(bf16_gemm_kernel(|_| true), Bf16GemmKernel::Wgmma);
        assert_eq!(bf16_gemm_kernel(|_| false), Bf16GemmKernel::Reference);
        let d = bf16_gemm_desc(1, 129_280, 7168, 1);
        assert_eq!(
            d.resolve(Bf16GemmKernel::Auto).unwrap(),
            Bf16GemmKernel::Wgmma
        );
        assert_eq!(
            bf16_gemm_desc(1, 100, 60, 1)
                .resolve(Bf16GemmKernel::Auto)
                .unwrap(),
            Bf16GemmKernel::Reference
        );
    }

    /// The batched split is split_k over batch * ceil(M/64) * ceil(N/128) tiles: every unit
    /// on its own SM, each split at least SPLIT_K_MIN_KBLOCKS K-blocks of 64.
    #[test]
    fn bf16_splits_cover_the_batch() {
        // lm_head: 1010 tiles fill the SMs.
        assert_eq!(bf16_gemm_splits(1, 1, 129_280, 7168, 132), 1);
        // eh_proj at decode: 56 tiles, 224 K-blocks -> 2 splits.
        assert_eq!(bf16_gemm_splits(1, 1, 7168, 14336, 132), 2);
        // The absorption products: 128 heads of 4 (q) or 1 (o) tiles, 2 or 8 K-blocks.
        assert_eq!(bf16_gemm_splits(128, 1, 512, 128, 132), 1);
        assert_eq!(bf16_gemm_splits(128, 1, 128, 512, 132), 1);
        assert_eq!(bf16_gemm_splits(200, 1, 128, 4096, 132), 1);
        for batch in 1..=8 {
            for (m, n, k) in [
                (1, 1536, 7168),
                (64, 512, 16384),
                (3, 600, 2048),
                (1, 128, 512),
            ] {
                let s = bf16_gemm_splits(batch, m, n, k, 132);
                let tiles = batch * m.div_ceil(64) * n.div_ceil(128);
                let kblocks = k.div_ceil(64);
                assert!(
                    s == 1 || (tiles * s <= 132 && kblocks / s >= SPLIT_K_MIN_KBLOCKS),
                    "{batch} x {m} {n} {k}: {s}"
                );
                // Same as split_k asked about that many tiles directly (batch folded into N
                // when N is whole tiles).
                if n % 128 == 0 {
                    assert_eq!(s, split_k(m, n * batch, k, BF16_TILING, 132), "{batch} {n}");
                }
            }
        }
        // A workspace smaller than the choice cuts it, never below 1.
        assert_eq!(splits_within(8, 12, 132, 132), 8);
        assert_eq!(splits_within(8, 12, 50, 132), 4);
        assert_eq!(splits_within(8, 12, 5, 132), 1);
        assert_eq!(splits_within(8, 200, 400, 132), 1);
    }

    /// The splits of R1's decode-path bf16 GEMMs at M = 1, 8, 32, 64, TP 1 and TP 8 (lm_head
    /// vocab-parallel, the absorption over the rank's 16 heads, eh_proj whole): lm_head and
    /// absorb_q fill the SMs or are too short to split, eh_proj (56 tiles) and absorb_o at TP 8
    /// (16 tiles of 8 K-blocks) take 2.
    #[test]
    fn bf16_r1_decode_table() {
        /// [batch, n, k] at TP 1 and at TP 8.
        type Shapes = [[usize; 3]; 2];
        #[rustfmt::skip]
        let want: [(&str, Shapes, [usize; 2]); 4] = [
            // name,       TP 1,                 TP 8,                 splits at TP 1, TP 8
            ("lm_head",  [[1, 129_280, 7168], [1, 16_160, 7168]], [1, 1]),
            ("eh_proj",  [[1, 7168, 14_336],  [1, 7168, 14_336]], [2, 2]),
            ("absorb_q", [[128, 512, 128],    [16, 512, 128]],    [1, 1]),
            ("absorb_o", [[128, 128, 512],    [16, 128, 512]],    [1, 2]),
        ];
        for (name, [tp1, tp8], splits) in want {
            for ([batch, n, k], want) in [(tp1, splits[0]), (tp8, splits[1])] {
                for m in [1, 8, 32, 64] {
                    assert_eq!(
                        bf16_gemm_splits(batch, m, n, k, 132),
                        want,
                        "{name} batch {batch} [{n} x {k}] at M = {m}"
                    );
                }
            }
        }
    }

    #[test]
    fn bf16_choice_lines_name_shape_kernel_ctas_and_splits() {
        let line = Choice::Bf16Gemm {
            batch: 1,
            m: 1,
            n: 7168,
            k: 14336,
            kernel: Bf16GemmKernel::Wgmma,
            ctas: Some(112),
            splits: Some(2),
        }
        .line();
        assert_eq!(
            line,
            "r1-choice: bf16_gemm batch=1 m=1 n=7168 k=14336 -> bf16_gemm_wgmma \
             (persistent ctas 112) (split-k 2)"
        );
        let line = Choice::Bf16Gemm {
            batch: 128,
            m: 3,
            n: 5,
            k: 60,
            kernel: Bf16GemmKernel::Reference,
            ctas: None,
            splits: None,
        }
        .line();
        assert_eq!(
            line,
            "r1-choice: bf16_gemm batch=128 m=3 n=5 k=60 -> small_gemm_bf16"
        );
    }
}
