//! MLA attention, absorbed form, over the paged latent cache: decode (s_q 1-2) and chunked
//! prefill with one call shape. Kernels (cuda/mla/):
//!
//! - `mla_attn_ref`: the simple GPU reference and fallback (any kv_lora <= 512, any rope).
//! - the fast path (kv_lora 512, rope 64): `mla_schedule` (split-KV tile scheduler, run once
//!   per step layout: [`MlaAttnArgs::schedule`]), `mla_decode_wgmma` (TMA + wgmma, split-KV
//!   over every SM), `mla_combine` (log-sum-exp merge; only when the plan splits at all).
//!
//! Prefill form: this module runs prefill in the absorbed form too (scores over the 576-wide
//! latent, 1088 MACs per (query, key, head) vs 320 for the expanded form with
//! qk 192 / v 128 after kv_b_proj). [`heuristics::prefill_form_by_cost`] says which form is
//! cheaper for a chunk; only the absorbed form is implemented here (the expanded form needs the kv_b GEMM
//! over the prefix, a separate kernel).

use cudarc::driver::LaunchConfig;
use half::bf16;

use super::mla::{Mla, MlaBatch, MlaCache, MLA_PAGE_TOKENS};
use super::{Checker, Region};
use crate::cuda::error::Result;
use crate::cuda::heuristics::{self, mla_plan_parts, Choice, MlaSchedule};
use crate::cuda::launch::{KernelLaunch, Prepared};
use crate::cuda::sys::{
    self, R1MlaAttnRefParams, R1MlaCombineParams, R1MlaDecodeParams, R1MlaScheduleParams,
};
use crate::cuda::tma::{TensorMap2d, TmaElem};
use crate::cuda::{Device, DeviceBuffer};

/// Latent width and rope width of the fast path.
pub const MLA_FAST_KV_LORA: usize = sys::R1_MLA_KV_LORA as usize;
pub const MLA_FAST_ROPE: usize = sys::R1_MLA_ROPE as usize;
/// Rows (query token x head) per CTA of the fast path.
pub const MLA_BLOCK_M: usize = sys::R1_MLA_BLOCK_M as usize;
/// Scheduler cost of starting a sequence in a part, in 64-token blocks (FlashMLA's value).
pub const MLA_SCHED_FIXED_OVERHEAD: usize = sys::R1_MLA_SCHED_FIXED_OVERHEAD as usize;
/// Largest batch the device scheduler takes.
pub const MLA_SCHED_MAX_BATCH: usize = sys::R1_MLA_SCHED_MAX_BATCH as usize;
const SCHED_FIELDS: usize = sys::R1_MLA_SCHED_FIELDS as usize;

/// Which kernel runs an attention call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MlaKernel {
    /// The fast path when the shapes and buffers allow it (and a workspace is given), else
    /// the reference kernel.
    Auto,
    /// `mla_decode_wgmma` (+ `mla_schedule`, `mla_combine`).
    Wgmma,
    /// `mla_attn_ref`.
    Reference,
}

impl MlaKernel {
    pub fn name(self) -> &'static str {
        match self {
            MlaKernel::Auto => "mla_attn",
            MlaKernel::Wgmma => "mla_decode_wgmma",
            MlaKernel::Reference => "mla_attn_ref",
        }
    }
}

// ------------------------------------------------------------------------------------------
// Workspace (the schedule's host mirror is heuristics::mla_schedule_host)
// ------------------------------------------------------------------------------------------

/// Scratch of the fast path for up to `batch` sequences of up to `max_q_len` new tokens and
/// `heads` heads: the schedule and the split-KV partial results.
#[derive(Debug)]
pub struct MlaWorkspace {
    pub sched: DeviceBuffer<i32>,
    pub splits: DeviceBuffer<i32>,
    pub o_accum: DeviceBuffer<f32>,
    pub lse_accum: DeviceBuffer<f32>,
    pub parts: usize,
    pub batch: usize,
    pub heads: usize,
    pub max_q_len: usize,
}

impl MlaWorkspace {
    /// Sizes for a plan of `parts` ([`mla_plan_parts`]): partial slots `batch + parts`, each
    /// `max_q_len * heads` rows of 512 f32 (none when `parts == 1`: nothing is ever split).
    pub fn lens(batch: usize, heads: usize, max_q_len: usize, parts: usize) -> [usize; 4] {
        let rows = if parts > 1 {
            (batch + parts) * max_q_len * heads
        } else {
            0
        };
        [
            parts * SCHED_FIELDS,
            batch + 1,
            rows * MLA_FAST_KV_LORA,
            rows,
        ]
    }

    /// A workspace planned for this device (every SM busy).
    pub fn new(dev: &Device, batch: usize, heads: usize, max_q_len: usize) -> Result<Self> {
        let parts = mla_plan_parts(dev.info().sm_count, heads, max_q_len);
        Self::with_parts(dev, batch, heads, max_q_len, parts)
    }

    /// A workspace with an explicit number of parts (tests: force splits or none).
    pub fn with_parts(
        dev: &Device,
        batch: usize,
        heads: usize,
        max_q_len: usize,
        parts: usize,
    ) -> Result<Self> {
        let parts = parts.max(1);
        let [s, sp, o, l] = Self::lens(batch, heads, max_q_len, parts);
        Ok(MlaWorkspace {
            sched: dev.alloc_zeros(s)?,
            splits: dev.alloc_zeros(sp)?,
            o_accum: dev.alloc(o)?,
            lse_accum: dev.alloc(l)?,
            parts,
            batch,
            heads,
            max_q_len,
        })
    }

    /// Writes a host-computed schedule (instead of running `mla_schedule`).
    pub fn upload_schedule(&mut self, dev: &Device, s: &MlaSchedule) -> Result<()> {
        let flat: Vec<i32> = s.parts.iter().flatten().copied().collect();
        let c = Checker {
            kernel: "mla_schedule",
        };
        c.req(
            s.parts.len() == self.parts && s.splits.len() <= self.splits.len(),
            || {
                format!(
                "schedule for {} parts / {} sequences does not fit a workspace of {} parts / {}",
                s.parts.len(),
                s.splits.len().saturating_sub(1),
                self.parts,
                self.batch
            )
            },
        )?;
        dev.copy_to_device(&flat, &mut self.sched)?;
        dev.copy_to_device(&s.splits, &mut self.splits)
    }

    /// Reads the schedule back (tests).
    pub fn download_schedule(&self, dev: &Device, batch: usize) -> Result<MlaSchedule> {
        let flat = dev.download(&self.sched)?;
        let splits = dev.download(&self.splits)?;
        Ok(MlaSchedule {
            parts: flat
                .chunks_exact(SCHED_FIELDS)
                .take(self.parts)
                .map(|c| c.try_into().unwrap_or([0; SCHED_FIELDS]))
                .collect(),
            splits: splits[..batch + 1].to_vec(),
        })
    }
}

// ------------------------------------------------------------------------------------------
// Desc and checks
// ------------------------------------------------------------------------------------------

/// The fast path's workspace as plain numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MlaWorkspaceDesc {
    pub parts: usize,
    pub sched: Region,
    pub splits: Region,
    pub o_accum: Region,
    pub lse_accum: Region,
}

/// An attention call as plain numbers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MlaAttnDesc {
    pub batch: usize,
    pub heads: usize,
    pub total_q: usize,
    pub max_q_len: usize,
    pub kv_lora: usize,
    pub rope: usize,
    pub bt_stride: usize,
    pub num_pages: usize,
    pub scale: f32,
    /// bf16 `[total_q][heads][kv_lora + rope]`.
    pub q: Region,
    /// bf16 `[num_pages][64][kv_lora + rope]`.
    pub cache: Region,
    /// i32 `[batch][bt_stride]`, `[batch]`, `[batch + 1]`.
    pub block_table: Region,
    pub seqlens_k: Region,
    pub q_starts: Region,
    /// bf16 `[total_q][heads][kv_lora]`, f32 `[total_q][heads]`.
    pub out: Region,
    pub lse: Region,
    /// Needed by the fast path.
    pub workspace: Option<MlaWorkspaceDesc>,
}

impl MlaAttnDesc {
    /// The kernel `kernel` resolves to, after checking every requirement it documents.
    pub fn resolve(&self, kernel: MlaKernel) -> Result<MlaKernel> {
        match kernel {
            MlaKernel::Auto => {
                self.check_common(MlaKernel::Reference)?;
                let kernel = heuristics::mla_kernel(|_| self.check_fast().is_ok());
                if kernel == MlaKernel::Reference {
                    self.check_ref()?;
                }
                Ok(kernel)
            }
            MlaKernel::Reference => {
                self.check_common(kernel)?;
                self.check_ref()?;
                Ok(kernel)
            }
            MlaKernel::Wgmma => {
                self.check_common(kernel)?;
                self.check_fast()?;
                Ok(kernel)
            }
        }
    }

    fn width(&self) -> usize {
        self.kv_lora + self.rope
    }

    fn check_common(&self, kernel: MlaKernel) -> Result<()> {
        let c = Checker {
            kernel: kernel.name(),
        };
        let (b, h, tq, mq) = (self.batch, self.heads, self.total_q, self.max_q_len);
        c.req(b >= 1 && h >= 1 && tq >= 1 && mq >= 1, || {
            format!("batch ({b}), heads ({h}), total_q ({tq}) and max_q_len ({mq}) must be >= 1")
        })?;
        c.req(
            self.kv_lora >= 1 && self.bt_stride >= 1 && self.num_pages >= 1,
            || {
                format!(
                    "kv_lora ({}), bt_stride ({}) and num_pages ({}) must be >= 1",
                    self.kv_lora, self.bt_stride, self.num_pages
                )
            },
        )?;
        c.req(self.scale.is_finite() && self.scale > 0.0, || {
            format!("scale ({}) must be finite and > 0", self.scale)
        })?;
        c.fits_i32(&[
            ("batch", b),
            ("heads", h),
            ("total_q * heads", tq.saturating_mul(h)),
            ("max_q_len * heads", mq.saturating_mul(h)),
            (
                "bt_stride * 64",
                self.bt_stride.saturating_mul(MLA_PAGE_TOKENS),
            ),
            ("num_pages", self.num_pages),
            ("kv_lora + rope", self.width()),
        ])?;
        c.aligned("q", self.q, 2)?;
        c.aligned("cache", self.cache, 2)?;
        c.aligned("out", self.out, 2)?;
        for (name, r) in [
            ("block_table", self.block_table),
            ("seqlens_k", self.seqlens_k),
            ("q_starts", self.q_starts),
            ("lse", self.lse),
        ] {
            c.aligned(name, r, 4)?;
        }
        let rows = tq * h;
        c.holds(
            "q",
            self.q,
            rows * self.width(),
            "[total_q][heads][kv_lora + rope]",
        )?;
        c.holds(
            "cache",
            self.cache,
            self.num_pages * MLA_PAGE_TOKENS * self.width(),
            "[num_pages][64][kv_lora + rope]",
        )?;
        c.holds(
            "block_table",
            self.block_table,
            b * self.bt_stride,
            "[batch][bt_stride]",
        )?;
        c.holds("seqlens_k", self.seqlens_k, b, "[batch]")?;
        c.holds("q_starts", self.q_starts, b + 1, "[batch + 1]")?;
        c.holds(
            "out",
            self.out,
            rows * self.kv_lora,
            "[total_q][heads][kv_lora]",
        )?;
        c.holds("lse", self.lse, rows, "[total_q][heads]")
    }

    fn check_ref(&self) -> Result<()> {
        let c = Checker {
            kernel: MlaKernel::Reference.name(),
        };
        let max_kv = sys::R1_MLA_REF_MAX_KV_LORA as usize;
        let max_w = sys::R1_MLA_REF_MAX_WIDTH as usize;
        c.req(self.kv_lora <= max_kv, || {
            format!("kv_lora ({}) must be <= {max_kv}", self.kv_lora)
        })?;
        c.req(self.width() <= max_w, || {
            format!("kv_lora + rope ({}) must be <= {max_w}", self.width())
        })?;
        c.req(self.max_q_len <= 65535 && self.batch <= 65535, || {
            format!(
                "max_q_len ({}) and batch ({}) must be <= 65535 (grid y, z)",
                self.max_q_len, self.batch
            )
        })
    }

    fn check_fast(&self) -> Result<()> {
        let c = Checker {
            kernel: MlaKernel::Wgmma.name(),
        };
        c.req(
            self.kv_lora == MLA_FAST_KV_LORA && self.rope == MLA_FAST_ROPE,
            || {
                format!(
                    "kv_lora and rope must be {MLA_FAST_KV_LORA} and {MLA_FAST_ROPE} (got {} and {})",
                    self.kv_lora, self.rope
                )
            },
        )?;
        c.req(self.batch <= MLA_SCHED_MAX_BATCH, || {
            format!(
                "batch ({}) must be <= {MLA_SCHED_MAX_BATCH} (scheduler)",
                self.batch
            )
        })?;
        c.req(
            (self.num_pages as u64 + 1) * MLA_PAGE_TOKENS as u64 <= i32::MAX as u64,
            || {
                format!(
                    "num_pages ({}) * 64 + 64 must fit in a 32-bit int (TMA row coordinate)",
                    self.num_pages
                )
            },
        )?;
        c.aligned("out", self.out, 16)?;
        let Some(ws) = self.workspace else {
            return c.req(false, || "needs an MlaWorkspace".into());
        };
        let rows_cap = self.max_q_len * self.heads;
        c.req(ws.parts >= 1 && ws.parts <= 65535, || {
            format!(
                "workspace parts ({}) must be in 1..=65535 (grid y)",
                ws.parts
            )
        })?;
        c.req(self.batch <= 65535, || {
            format!("batch ({}) must be <= 65535 (combine grid y)", self.batch)
        })?;
        let [s, sp, o, l] = MlaWorkspace::lens(self.batch, self.heads, self.max_q_len, ws.parts);
        c.aligned("sched", ws.sched, 4)?;
        c.aligned("splits", ws.splits, 4)?;
        c.aligned("o_accum", ws.o_accum, 16)?;
        c.aligned("lse_accum", ws.lse_accum, 4)?;
        c.holds("sched", ws.sched, s, "[parts][8]")?;
        c.holds("splits", ws.splits, sp, "[batch + 1]")?;
        c.holds(
            "o_accum",
            ws.o_accum,
            o,
            "[batch + parts][max_q_len * heads][512] (parts > 1)",
        )?;
        c.holds(
            "lse_accum",
            ws.lse_accum,
            l,
            "[batch + parts][max_q_len * heads] (parts > 1)",
        )?;
        c.req(
            (self.batch + ws.parts).saturating_mul(rows_cap) <= i32::MAX as usize,
            || "(batch + parts) * max_q_len * heads must fit in a 32-bit int".into(),
        )?;
        for map in self.tensor_maps() {
            map.check(MlaKernel::Wgmma.name())?;
        }
        Ok(())
    }

    /// tmap_q and tmap_cache exactly as launch_params.h documents them.
    fn tensor_maps(&self) -> [TensorMap2d; 2] {
        let row = (self.width() * 2) as u64;
        [
            TensorMap2d {
                name: "tmap_q",
                elem: TmaElem::U8,
                addr: self.q.addr,
                dims: [row, (self.total_q * self.heads) as u64],
                stride_bytes: row,
                box_dims: [128, MLA_BLOCK_M as u32],
                swizzle_128b: true,
            },
            TensorMap2d {
                name: "tmap_cache",
                elem: TmaElem::U8,
                addr: self.cache.addr,
                dims: [row, (self.num_pages * MLA_PAGE_TOKENS) as u64],
                stride_bytes: row,
                box_dims: [128, MLA_PAGE_TOKENS as u32],
                swizzle_128b: true,
            },
        ]
    }

    /// Head blocks of the fast path: ceil(max_q_len * heads / 64).
    pub fn m_blocks(&self) -> usize {
        (self.max_q_len * self.heads).div_ceil(MLA_BLOCK_M)
    }
}

// ------------------------------------------------------------------------------------------
// Args and launches
// ------------------------------------------------------------------------------------------

/// Attention of the step's new tokens over `cache` (which already holds them: run the cache
/// write first).
pub struct MlaAttnArgs<'a> {
    /// bf16 `[total_q][heads][kv_lora + rope]`: latent query (q_nope . W_UK) | roped q_pe.
    pub q: &'a DeviceBuffer<bf16>,
    pub heads: usize,
    /// Softmax scale (the model config's `softmax_scale`: 192^-0.5 * mscale^2).
    pub scale: f32,
    pub cache: &'a MlaCache,
    pub batch: &'a MlaBatch,
    /// bf16 `[total_q][heads][kv_lora]`.
    pub out: &'a mut DeviceBuffer<bf16>,
    /// f32 `[total_q][heads]`: natural-log sum of exp of the scaled scores.
    pub lse: &'a mut DeviceBuffer<f32>,
    /// The fast path's scratch (None: reference kernel only).
    pub workspace: Option<&'a mut MlaWorkspace>,
    /// Run `mla_schedule` before the attention (false: the workspace already holds the
    /// schedule of this exact batch layout, e.g. from an earlier layer of the same step).
    pub schedule: bool,
}

impl MlaAttnArgs<'_> {
    pub fn desc(&self) -> MlaAttnDesc {
        MlaAttnDesc {
            batch: self.batch.batch,
            heads: self.heads,
            total_q: self.batch.total_q,
            max_q_len: self.batch.max_q_len,
            kv_lora: self.cache.kv_lora,
            rope: self.cache.rope,
            bt_stride: self.batch.bt_stride,
            num_pages: self.cache.num_pages,
            scale: self.scale,
            q: Region::from(self.q),
            cache: Region::from(&self.cache.data),
            block_table: Region::from(&self.batch.block_table),
            seqlens_k: Region::from(&self.batch.seqlens_k),
            q_starts: Region::from(&self.batch.q_starts),
            out: Region::from(&*self.out),
            lse: Region::from(&*self.lse),
            workspace: self.workspace.as_deref().map(|w| {
                // A workspace planned for a smaller batch / fewer rows fails the length checks.
                let fits = w.batch >= self.batch.batch
                    && w.heads == self.heads
                    && w.max_q_len >= self.batch.max_q_len;
                let r = |b: &DeviceBuffer<f32>| Region {
                    addr: b.addr(),
                    len: if fits { b.len() } else { 0 },
                };
                MlaWorkspaceDesc {
                    parts: w.parts,
                    sched: Region::from(&w.sched),
                    splits: Region::from(&w.splits),
                    o_accum: r(&w.o_accum),
                    lse_accum: r(&w.lse_accum),
                }
            }),
        }
    }
}

/// The reference kernel's launch of a resolved call.
struct RefLaunch(MlaAttnDesc);

impl KernelLaunch for RefLaunch {
    type Params = R1MlaAttnRefParams;

    fn kernel(&self) -> &'static str {
        MlaKernel::Reference.name()
    }

    fn params(&self) -> Result<R1MlaAttnRefParams> {
        let d = &self.0;
        Ok(R1MlaAttnRefParams {
            q: d.q.addr,
            cache: d.cache.addr,
            block_table: d.block_table.addr,
            seqlens_k: d.seqlens_k.addr,
            q_starts: d.q_starts.addr,
            out: d.out.addr,
            lse: d.lse.addr,
            batch: d.batch as i32,
            heads: d.heads as i32,
            kv_lora: d.kv_lora as i32,
            rope: d.rope as i32,
            bt_stride: d.bt_stride as i32,
            num_pages: d.num_pages as i32,
            total_q: d.total_q as i32,
            max_q_len: d.max_q_len as i32,
            scale: d.scale,
            reserved: 0,
        })
    }

    fn launch_config(&self) -> LaunchConfig {
        let d = &self.0;
        LaunchConfig {
            grid_dim: (d.heads as u32, d.max_q_len as u32, d.batch as u32),
            block_dim: (sys::R1_MLA_REF_THREADS, 1, 1),
            shared_mem_bytes: 0,
        }
    }
}

/// The fast path of a resolved call: its workspace and the partial-result slots the workspace
/// holds at the call's row stride (the kernels are told, so that a corrupt schedule cannot
/// send an access past them).
#[derive(Clone, Copy)]
struct FastPath {
    desc: MlaAttnDesc,
    ws: MlaWorkspaceDesc,
    slots: usize,
}

impl FastPath {
    fn new(desc: MlaAttnDesc) -> Self {
        let ws = desc
            .workspace
            .expect("resolve() checked that the fast path has a workspace");
        let rows = (desc.max_q_len * desc.heads).max(1);
        let slots = (ws.lse_accum.len / rows)
            .min(ws.o_accum.len / (rows * MLA_FAST_KV_LORA))
            .min(i32::MAX as usize);
        FastPath { desc, ws, slots }
    }
}

/// `mla_schedule`: the split-KV schedule of the step layout into the workspace.
struct ScheduleLaunch(FastPath);

impl KernelLaunch for ScheduleLaunch {
    type Params = R1MlaScheduleParams;

    fn kernel(&self) -> &'static str {
        "mla_schedule"
    }

    fn params(&self) -> Result<R1MlaScheduleParams> {
        let FastPath { desc, ws, .. } = self.0;
        Ok(R1MlaScheduleParams {
            seqlens_k: desc.seqlens_k.addr,
            sched: ws.sched.addr,
            splits: ws.splits.addr,
            batch: desc.batch as i32,
            bt_stride: desc.bt_stride as i32,
            num_parts: ws.parts as i32,
            fixed_overhead: sys::R1_MLA_SCHED_FIXED_OVERHEAD as i32,
        })
    }

    fn launch_config(&self) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (32, 1, 1),
            shared_mem_bytes: 0,
        }
    }
}

/// `mla_decode_wgmma`: attention over every part of the schedule.
struct DecodeLaunch(FastPath);

impl KernelLaunch for DecodeLaunch {
    type Params = R1MlaDecodeParams;

    fn kernel(&self) -> &'static str {
        MlaKernel::Wgmma.name()
    }

    fn params(&self) -> Result<R1MlaDecodeParams> {
        let FastPath { desc, ws, slots } = self.0;
        let [tq, tc] = desc.tensor_maps();
        let name = self.kernel();
        Ok(R1MlaDecodeParams {
            tmap_q: tq.encode(name)?,
            tmap_cache: tc.encode(name)?,
            block_table: desc.block_table.addr,
            seqlens_k: desc.seqlens_k.addr,
            q_starts: desc.q_starts.addr,
            out: desc.out.addr,
            lse: desc.lse.addr,
            sched: ws.sched.addr,
            splits: ws.splits.addr,
            o_accum: ws.o_accum.addr,
            lse_accum: ws.lse_accum.addr,
            batch: desc.batch as i32,
            heads: desc.heads as i32,
            bt_stride: desc.bt_stride as i32,
            num_pages: desc.num_pages as i32,
            total_q: desc.total_q as i32,
            max_q_len: desc.max_q_len as i32,
            num_parts: ws.parts as i32,
            scale_log2: desc.scale * std::f32::consts::LOG2_E,
            slots: slots as i32,
        })
    }

    fn launch_config(&self) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (self.0.desc.m_blocks() as u32, self.0.ws.parts as u32, 1),
            block_dim: (sys::R1_MLA_DECODE_THREADS, 1, 1),
            shared_mem_bytes: sys::R1_MLA_DECODE_SMEM_BYTES,
        }
    }
}

/// `mla_combine`: the log-sum-exp merge of the split partial results.
struct CombineLaunch(FastPath);

impl KernelLaunch for CombineLaunch {
    type Params = R1MlaCombineParams;

    fn kernel(&self) -> &'static str {
        "mla_combine"
    }

    fn params(&self) -> Result<R1MlaCombineParams> {
        let FastPath { desc, ws, slots } = self.0;
        Ok(R1MlaCombineParams {
            q_starts: desc.q_starts.addr,
            splits: ws.splits.addr,
            o_accum: ws.o_accum.addr,
            lse_accum: ws.lse_accum.addr,
            out: desc.out.addr,
            lse: desc.lse.addr,
            batch: desc.batch as i32,
            heads: desc.heads as i32,
            total_q: desc.total_q as i32,
            max_q_len: desc.max_q_len as i32,
            slots: slots as i32,
        })
    }

    fn launch_config(&self) -> LaunchConfig {
        let d = &self.0.desc;
        let per_cta = (sys::R1_MLA_COMBINE_THREADS / 32) as usize;
        LaunchConfig {
            grid_dim: (
                (d.max_q_len * d.heads).div_ceil(per_cta) as u32,
                d.batch as u32,
                1,
            ),
            block_dim: (sys::R1_MLA_COMBINE_THREADS, 1, 1),
            shared_mem_bytes: 0,
        }
    }
}

impl Mla {
    /// Checks `args` for `kernel`, resolves Auto, encodes the tensor maps; queues nothing.
    /// The fast path queues `mla_schedule` (when `args.schedule`), `mla_decode_wgmma`, then
    /// `mla_combine` (when the plan splits at all).
    pub fn prepare_attention<'a>(
        &'a self,
        args: MlaAttnArgs<'a>,
        kernel: MlaKernel,
    ) -> Result<Prepared<'a, MlaKernel>> {
        let run_schedule = args.schedule;
        let desc = args.desc();
        let kernel = desc.resolve(kernel)?;
        heuristics::report(&Choice::MlaAttn {
            batch: desc.batch,
            heads: desc.heads,
            max_q_len: desc.max_q_len,
            kernel,
            parts: desc
                .workspace
                .filter(|_| kernel == MlaKernel::Wgmma)
                .map(|w| w.parts),
        });
        let prepared = Prepared::new(&self.dev, kernel);
        match kernel {
            MlaKernel::Reference => prepared.then(&RefLaunch(desc)),
            MlaKernel::Wgmma => {
                let fast = FastPath::new(desc);
                let mut prepared = prepared;
                if run_schedule {
                    prepared = prepared.then(&ScheduleLaunch(fast))?;
                }
                prepared = prepared.then(&DecodeLaunch(fast))?;
                if fast.ws.parts > 1 {
                    prepared = prepared.then(&CombineLaunch(fast))?;
                }
                Ok(prepared)
            }
            MlaKernel::Auto => unreachable!("resolve() returns a concrete kernel"),
        }
    }

    /// Attention into caller-owned buffers (queued); returns the kernel that ran.
    pub fn attention(&self, args: MlaAttnArgs<'_>, kernel: MlaKernel) -> Result<MlaKernel> {
        let p = self.prepare_attention(args, kernel)?;
        p.launch()?;
        Ok(p.kernel())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::heuristics::tests::{mla_attn_desc as attn_desc, ROPE};
    use crate::cuda::launch::row_symbol;
    use crate::cuda::ops::err_of;

    /// Every requirement the kernels document, named in the error, for every kernel that has
    /// it (Auto included); which kernel Auto picks is heuristics' test.
    #[test]
    fn host_checks_name_requirements() {
        let d = attn_desc(128, 128, 1, 64, 128 * 64);
        assert_eq!(
            d.resolve(MlaKernel::Reference).unwrap(),
            MlaKernel::Reference
        );
        assert_eq!(d.m_blocks(), 2);

        // Other latent widths: the fast path says why not.
        let mut x = attn_desc(4, 16, 2, 8, 40);
        x.kv_lora = 256;
        x.q.len = 4 * 2 * 16 * (256 + ROPE);
        x.cache.len = 40 * 64 * (256 + ROPE);
        x.out.len = 4 * 2 * 16 * 256;
        let e = err_of(x.resolve(MlaKernel::Wgmma));
        assert!(
            e.starts_with("mla_decode_wgmma") && e.contains("kv_lora and rope must be 512 and 64"),
            "{e}"
        );

        // No workspace: Wgmma says why.
        let mut x = attn_desc(4, 16, 1, 8, 40);
        x.workspace = None;
        assert!(err_of(x.resolve(MlaKernel::Wgmma)).contains("needs an MlaWorkspace"));

        // TMA alignment.
        let mut x = attn_desc(4, 16, 1, 8, 40);
        x.q.addr += 8;
        assert!(err_of(x.resolve(MlaKernel::Wgmma)).contains("tmap_q: global address"));

        // Short buffers name the buffer, for every kernel.
        let mut x = attn_desc(4, 16, 2, 8, 40);
        x.out.len -= 1;
        for k in [MlaKernel::Auto, MlaKernel::Reference, MlaKernel::Wgmma] {
            let e = err_of(x.resolve(k));
            assert!(e.contains("out holds"), "{e}");
        }
        let mut x = attn_desc(4, 16, 2, 8, 40);
        x.block_table.len = 31;
        assert!(err_of(x.resolve(MlaKernel::Auto)).contains("block_table holds 31"));
        let mut x = attn_desc(4, 16, 2, 8, 40);
        if let Some(w) = x.workspace.as_mut() {
            w.o_accum.len = 0;
        }
        assert!(err_of(x.resolve(MlaKernel::Wgmma)).contains("o_accum holds 0"));

        // An empty cache cannot back a TMA map (nor any sequence).
        let mut x = attn_desc(4, 16, 1, 8, 40);
        x.num_pages = 0;
        assert!(err_of(x.resolve(MlaKernel::Auto)).contains("num_pages (0) must be >= 1"));

        // Bad scalars.
        let mut x = attn_desc(4, 16, 1, 8, 40);
        x.scale = f32::NAN;
        assert!(err_of(x.resolve(MlaKernel::Auto)).contains("scale"));
        let mut x = attn_desc(4, 16, 1, 8, 40);
        x.kv_lora = 1024;
        x.q.len = usize::MAX;
        x.cache.len = usize::MAX;
        x.out.len = usize::MAX;
        assert!(err_of(x.resolve(MlaKernel::Auto)).contains("kv_lora (1024) must be <= 512"));
        let mut x = attn_desc(5000, 16, 1, 8, 40);
        x.workspace = None;
        assert!(err_of(x.resolve(MlaKernel::Wgmma)).contains("batch (5000) must be <= 4096"));
    }

    /// Each kernel of the reference launch and of the fast path's sequence pairs with its
    /// kernel-table row.
    #[test]
    fn launches_pair_with_their_rows() {
        let r = |len| Region { addr: 256, len };
        let ws = MlaWorkspaceDesc {
            parts: 2,
            sched: r(16),
            splits: r(2),
            o_accum: r(3 * 64 * MLA_FAST_KV_LORA),
            lse_accum: r(3 * 64),
        };
        let desc = MlaAttnDesc {
            batch: 1,
            heads: 64,
            total_q: 1,
            max_q_len: 1,
            kv_lora: MLA_FAST_KV_LORA,
            rope: MLA_FAST_ROPE,
            bt_stride: 1,
            num_pages: 1,
            scale: 0.1,
            q: r(64 * 576),
            cache: r(64 * 576),
            block_table: r(1),
            seqlens_k: r(1),
            q_starts: r(2),
            out: r(64 * 512),
            lse: r(64),
            workspace: Some(ws),
        };
        assert_eq!(row_symbol(&RefLaunch(desc)), "mla_attn_ref");
        let fast = FastPath::new(desc);
        assert_eq!(fast.slots, 3);
        assert_eq!(row_symbol(&ScheduleLaunch(fast)), "mla_schedule");
        assert_eq!(row_symbol(&DecodeLaunch(fast)), "mla_decode_wgmma");
        assert_eq!(row_symbol(&CombineLaunch(fast)), "mla_combine");
    }
}
