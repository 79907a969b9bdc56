//! Token permutation for the MoE experts, on the device with no host synchronization:
//! `moe_plan` (counts, each entry's row, the contiguous layout's block tables), `moe_gather`
//! (quantized token rows into expert order), `moe_silu_quant` (SiLU(gate) * up + act_quant
//! between the two grouped GEMMs) and `moe_unpermute` (weighted sum back per token, plus the
//! shared expert). Contracts: cuda/launch_params.h, MoE section. Each kernel has a host model
//! here (`*_host`) that the GPU tests compare with bit for bit.

use cudarc::driver::LaunchConfig;
use half::bf16;

use super::moe::{MoeFlags, MoeGeometry, MoeLayout, MoeOps, MOE_BLOCK_M};
use super::moe::{MOE_FLAGS_LEN, MOE_MAX_TOP_K};
use super::{Checker, QuantizedActivations, Region, QUANT_BLOCK};
use crate::cuda::error::Result;
use crate::cuda::launch::{KernelLaunch, Prepared};
use crate::cuda::sys::{self, R1MoeGatherParams, R1MoePlanParams};
use crate::cuda::sys::{R1MoeSiluQuantParams, R1MoeUnpermuteParams};
use crate::cuda::{Device, DeviceBuffer};
use crate::numerics::{act_quant, round_bf16, QuantizedRows};

const PLAN: &str = "moe_plan";
const GATHER: &str = "moe_gather";
const SILU: &str = "moe_silu_quant";
const UNPERMUTE: &str = "moe_unpermute";

// ------------------------------------------------------------------------------------------
// Device buffers
// ------------------------------------------------------------------------------------------

/// moe_plan's outputs for a geometry (the block tables hold one unused word when masked).
#[derive(Debug)]
pub struct MoePlanBuffers {
    pub geom: MoeGeometry,
    /// i32 `[tokens * top_k]`.
    pub dest_row: DeviceBuffer<i32>,
    /// i32 `[experts]`.
    pub counts: DeviceBuffer<i32>,
    /// i32 `[max_blocks]` (contiguous).
    pub block_expert: DeviceBuffer<i32>,
    /// i32 `[max_blocks]` (contiguous).
    pub block_rows: DeviceBuffer<i32>,
    /// i32 `[1]` (contiguous).
    pub num_blocks: DeviceBuffer<i32>,
}

impl MoePlanBuffers {
    pub fn alloc(dev: &Device, geom: MoeGeometry) -> Result<Self> {
        geom.check(PLAN)?;
        let blocks = geom.max_blocks().max(1);
        Ok(MoePlanBuffers {
            geom,
            dest_row: dev.alloc(geom.entries())?,
            counts: dev.alloc_zeros(geom.experts)?,
            block_expert: dev.alloc(blocks)?,
            block_rows: dev.alloc_zeros(blocks)?,
            num_blocks: dev.alloc_zeros(1)?,
        })
    }

    /// Downloads everything (waits for the stream).
    pub fn download(&self, dev: &Device) -> Result<PlanHost> {
        let contiguous = self.geom.layout == MoeLayout::Contiguous;
        let blocks = self.geom.max_blocks();
        Ok(PlanHost {
            counts: dev.download(&self.counts)?,
            dest_row: dev.download(&self.dest_row)?,
            block_expert: if contiguous {
                dev.download(&self.block_expert)?[..blocks].to_vec()
            } else {
                Vec::new()
            },
            block_rows: if contiguous {
                dev.download(&self.block_rows)?[..blocks].to_vec()
            } else {
                Vec::new()
            },
            num_blocks: if contiguous {
                dev.download(&self.num_blocks)?[0]
            } else {
                0
            },
            flags: MoeFlags::default(),
        })
    }
}

/// Activations in flat-row order: fp8 `[rows][k]` and SA scales `[k/128][r_pad]`.
#[derive(Debug)]
pub struct PermutedRows {
    pub q: DeviceBuffer<u8>,
    pub scales: DeviceBuffer<f32>,
    pub rows: usize,
    pub r_pad: usize,
    pub k: usize,
}

impl PermutedRows {
    pub fn alloc(dev: &Device, geom: &MoeGeometry, k: usize) -> Result<Self> {
        let (rows, r_pad) = (geom.rows(), geom.r_pad());
        Ok(PermutedRows {
            q: dev.alloc(rows * k)?,
            scales: dev.alloc(k.div_ceil(QUANT_BLOCK) * r_pad)?,
            rows,
            r_pad,
            k,
        })
    }
}

// ------------------------------------------------------------------------------------------
// moe_plan
// ------------------------------------------------------------------------------------------

/// A moe_plan call as plain numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlanDesc {
    pub geom: MoeGeometry,
    /// Tokens routed by this call (<= geom.tokens).
    pub tokens: usize,
    pub topk_ids: Region,
    pub dest_row: Region,
    pub counts: Region,
    pub block_expert: Region,
    pub block_rows: Region,
    pub num_blocks: Region,
    pub flags: Region,
}

impl PlanDesc {
    pub fn smem_bytes(&self) -> usize {
        sys::R1_MOE_PLAN_SMEM_PER_EXPERT as usize * self.geom.experts + 128
    }

    pub fn check(&self) -> Result<()> {
        self.geom.check(PLAN)?;
        let c = Checker { kernel: PLAN };
        let g = &self.geom;
        c.req(self.tokens >= 1 && self.tokens <= g.tokens, || {
            format!(
                "tokens = {} must be in 1..={} (the geometry's capacity)",
                self.tokens, g.tokens
            )
        })?;
        let n = self.tokens * g.top_k;
        for (name, r) in [
            ("topk_ids", self.topk_ids),
            ("dest_row", self.dest_row),
            ("counts", self.counts),
            ("flags", self.flags),
        ] {
            c.aligned(name, r, 4)?;
        }
        c.holds("topk_ids", self.topk_ids, n, "[tokens * top_k]")?;
        c.holds("dest_row", self.dest_row, n, "[tokens * top_k]")?;
        c.holds("counts", self.counts, g.experts, "[experts]")?;
        c.holds("flags", self.flags, MOE_FLAGS_LEN, "the MoE error words")?;
        if g.layout == MoeLayout::Contiguous {
            let mb = g.max_blocks();
            c.holds("block_expert", self.block_expert, mb, "[max_blocks]")?;
            c.holds("block_rows", self.block_rows, mb, "[max_blocks]")?;
            c.holds("num_blocks", self.num_blocks, 1, "one word")?;
        }
        Ok(())
    }
}

impl KernelLaunch for PlanDesc {
    type Params = R1MoePlanParams;

    fn kernel(&self) -> &'static str {
        PLAN
    }

    fn params(&self) -> Result<R1MoePlanParams> {
        Ok(R1MoePlanParams {
            topk_ids: self.topk_ids.addr,
            dest_row: self.dest_row.addr,
            counts: self.counts.addr,
            block_expert: self.block_expert.addr,
            block_rows: self.block_rows.addr,
            num_blocks: self.num_blocks.addr,
            flags: self.flags.addr,
            tokens: self.tokens as i32,
            top_k: self.geom.top_k as i32,
            experts: self.geom.experts as i32,
            layout: self.geom.layout_code(),
            max_blocks: self.geom.max_blocks() as i32,
            max_tokens_per_expert: self.geom.max_tokens_per_expert() as i32,
        })
    }

    fn launch_config(&self) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (sys::R1_MOE_PLAN_THREADS, 1, 1),
            shared_mem_bytes: self.smem_bytes() as u32,
        }
    }
}

pub struct PlanArgs<'a> {
    pub tokens: usize,
    pub topk_ids: &'a DeviceBuffer<i32>,
    pub plan: &'a mut MoePlanBuffers,
    pub flags: &'a mut DeviceBuffer<u32>,
}

impl PlanArgs<'_> {
    pub fn desc(&self) -> PlanDesc {
        PlanDesc {
            geom: self.plan.geom,
            tokens: self.tokens,
            topk_ids: Region::from(self.topk_ids),
            dest_row: Region::from(&self.plan.dest_row),
            counts: Region::from(&self.plan.counts),
            block_expert: Region::from(&self.plan.block_expert),
            block_rows: Region::from(&self.plan.block_rows),
            num_blocks: Region::from(&self.plan.num_blocks),
            flags: Region::from(&*self.flags),
        }
    }
}

/// moe_plan's results (and flags) as the host model computes them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PlanHost {
    pub counts: Vec<i32>,
    pub dest_row: Vec<i32>,
    /// Contiguous: `[max_blocks]` (-1 past num_blocks); empty when masked.
    pub block_expert: Vec<i32>,
    pub block_rows: Vec<i32>,
    pub num_blocks: i32,
    pub flags: MoeFlags,
}

/// What moe_plan computes for `ids` (`[tokens * top_k]`) under `geom`.
pub fn plan_host(ids: &[i32], geom: &MoeGeometry, tokens: usize) -> PlanHost {
    let e = geom.experts;
    let n = tokens * geom.top_k;
    let mut counts = vec![0i32; e];
    let mut flags = MoeFlags::default();
    for &id in &ids[..n] {
        if (0..e as i32).contains(&id) {
            counts[id as usize] += 1;
        } else if id != -1 {
            flags.bits |= sys::R1_MOE_FLAG_BAD_ID;
            flags.bad_ids += 1;
        }
    }
    let mut out = PlanHost::default();
    let mut begin = vec![0usize; e];
    match geom.layout {
        MoeLayout::Contiguous => {
            let max_blocks = geom.max_blocks();
            let mut rows = 0;
            for (x, &c) in counts.iter().enumerate() {
                begin[x] = rows;
                rows += (c as usize).div_ceil(MOE_BLOCK_M) * MOE_BLOCK_M;
            }
            let used = (rows / MOE_BLOCK_M).min(max_blocks);
            out.block_expert = vec![-1; max_blocks];
            out.block_rows = vec![0; max_blocks];
            for (x, &c) in counts.iter().enumerate() {
                let b0 = begin[x] / MOE_BLOCK_M;
                for b in 0..(c as usize).div_ceil(MOE_BLOCK_M) {
                    if b0 + b < max_blocks {
                        out.block_expert[b0 + b] = x as i32;
                        out.block_rows[b0 + b] =
                            (c as usize - b * MOE_BLOCK_M).min(MOE_BLOCK_M) as i32;
                    }
                }
            }
            out.num_blocks = used as i32;
            out.counts = counts.clone();
        }
        MoeLayout::Masked {
            max_tokens_per_expert: m,
        } => {
            for (x, b) in begin.iter_mut().enumerate() {
                *b = x * m;
            }
            out.counts = counts.iter().map(|&c| c.min(m as i32)).collect();
        }
    }
    let max_rows = geom.max_blocks() * MOE_BLOCK_M;
    let mut rank = vec![0usize; e];
    out.dest_row = ids[..n]
        .iter()
        .map(|&id| {
            if !(0..e as i32).contains(&id) {
                return -1;
            }
            let x = id as usize;
            let r = rank[x];
            rank[x] += 1;
            let row = match geom.layout {
                MoeLayout::Contiguous => (begin[x] + r < max_rows).then_some(begin[x] + r),
                MoeLayout::Masked {
                    max_tokens_per_expert: m,
                } => (r < m).then_some(begin[x] + r),
            };
            row.map_or_else(
                || {
                    flags.bits |= sys::R1_MOE_FLAG_OVERFLOW;
                    flags.dropped += 1;
                    -1
                },
                |r| r as i32,
            )
        })
        .collect();
    out.flags = flags;
    out
}

// ------------------------------------------------------------------------------------------
// moe_gather
// ------------------------------------------------------------------------------------------

/// A moe_gather call as plain numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GatherDesc {
    pub geom: MoeGeometry,
    pub tokens: usize,
    /// Channels per row (hidden).
    pub k: usize,
    /// fp8 `[tokens][ldxq]`, SA scales `[k/128][xs_m_pad]`.
    pub xq: Region,
    pub ldxq: usize,
    pub xs: Region,
    pub xs_m_pad: usize,
    pub dest_row: Region,
    /// fp8 `[R][lda]`, SA scales `[k/128][r_pad]`.
    pub aq: Region,
    pub lda: usize,
    pub a_scales: Region,
}

impl GatherDesc {
    pub fn check(&self) -> Result<()> {
        self.geom.check(GATHER)?;
        let c = Checker { kernel: GATHER };
        let (t, k) = (self.tokens, self.k);
        c.req(t >= 1 && t <= self.geom.tokens, || {
            format!("tokens = {t} must be in 1..={}", self.geom.tokens)
        })?;
        c.req(k >= QUANT_BLOCK && k % QUANT_BLOCK == 0, || {
            format!("K must be a positive multiple of 128 (K = {k})")
        })?;
        c.fits_i32(&[
            ("K", k),
            ("ldxq", self.ldxq),
            ("lda", self.lda),
            ("xs_m_pad", self.xs_m_pad),
        ])?;
        c.req(self.ldxq >= k && self.ldxq % 16 == 0, || {
            format!("ldxq ({}) must be >= K and a multiple of 16", self.ldxq)
        })?;
        c.req(self.lda >= k && self.lda % 16 == 0, || {
            format!("lda ({}) must be >= K and a multiple of 16", self.lda)
        })?;
        c.sa_pad("xs_m_pad", self.xs_m_pad, t, "tokens")?;
        c.aligned("xq", self.xq, 16)?;
        c.aligned("aq", self.aq, 16)?;
        c.aligned("xs", self.xs, 4)?;
        c.aligned("a_scales", self.a_scales, 4)?;
        c.aligned("dest_row", self.dest_row, 4)?;
        let kb = k / QUANT_BLOCK;
        c.holds_matrix("xq", self.xq, t, k, self.ldxq)?;
        c.holds("xs", self.xs, kb * self.xs_m_pad, "[K/128][xs_m_pad]")?;
        c.holds(
            "dest_row",
            self.dest_row,
            t * self.geom.top_k,
            "[tokens * top_k]",
        )?;
        c.holds_matrix("aq", self.aq, self.geom.rows(), k, self.lda)?;
        c.holds(
            "a_scales",
            self.a_scales,
            kb * self.geom.r_pad(),
            "[K/128][r_pad]",
        )
    }
}

impl KernelLaunch for GatherDesc {
    type Params = R1MoeGatherParams;

    fn kernel(&self) -> &'static str {
        GATHER
    }

    fn params(&self) -> Result<R1MoeGatherParams> {
        Ok(R1MoeGatherParams {
            xq: self.xq.addr,
            xs: self.xs.addr,
            dest_row: self.dest_row.addr,
            aq: self.aq.addr,
            a_scales: self.a_scales.addr,
            entries: (self.tokens * self.geom.top_k) as i32,
            top_k: self.geom.top_k as i32,
            k: self.k as i32,
            ldxq: self.ldxq as i32,
            lda: self.lda as i32,
            xs_m_pad: self.xs_m_pad as i32,
            as_m_pad: self.geom.r_pad() as i32,
            reserved: 0,
        })
    }

    fn launch_config(&self) -> LaunchConfig {
        let per_block = sys::R1_MOE_GATHER_THREADS as usize / 32;
        LaunchConfig {
            grid_dim: (
                (self.tokens * self.geom.top_k).div_ceil(per_block) as u32,
                1,
                1,
            ),
            block_dim: (sys::R1_MOE_GATHER_THREADS, 1, 1),
            shared_mem_bytes: 0,
        }
    }
}

pub struct GatherArgs<'a> {
    pub tokens: usize,
    /// The tokens quantized by act_quant (`x.m >= tokens`).
    pub x: &'a QuantizedActivations,
    pub plan: &'a MoePlanBuffers,
    pub out: &'a mut PermutedRows,
}

impl GatherArgs<'_> {
    pub fn desc(&self) -> GatherDesc {
        GatherDesc {
            geom: self.plan.geom,
            tokens: self.tokens,
            k: self.x.k,
            xq: Region::from(&self.x.q),
            ldxq: self.x.k,
            xs: Region::from(&self.x.scales),
            xs_m_pad: self.x.m_pad,
            dest_row: Region::from(&self.plan.dest_row),
            aq: Region::from(&self.out.q),
            lda: self.out.k,
            a_scales: Region::from(&self.out.scales),
        }
    }
}

// ------------------------------------------------------------------------------------------
// moe_silu_quant
// ------------------------------------------------------------------------------------------

/// A moe_silu_quant call as plain numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SiluQuantDesc {
    /// Rows the buffers hold.
    pub rows: usize,
    /// Items processed: each maps to a row through `rows_map`, or is the row itself.
    pub items: usize,
    pub rows_map: Option<Region>,
    pub inter: usize,
    /// bf16 `[rows][ldg]`: gate at [0, inter), up at [up_offset, up_offset + inter).
    pub gu: Region,
    pub ldg: usize,
    pub up_offset: usize,
    /// fp8 `[rows][ldq]`, SA scales `[inter/128][m_pad]`.
    pub q: Region,
    pub ldq: usize,
    pub scales: Region,
    pub m_pad: usize,
}

impl SiluQuantDesc {
    pub fn check(&self) -> Result<()> {
        let c = Checker { kernel: SILU };
        let (rows, i) = (self.rows, self.inter);
        c.req(rows >= 1 && self.items >= 1, || {
            format!("rows ({rows}) and items ({}) must be >= 1", self.items)
        })?;
        c.req(i >= QUANT_BLOCK && i % QUANT_BLOCK == 0, || {
            format!("inter must be a positive multiple of 128 (inter = {i})")
        })?;
        c.fits_i32(&[
            ("rows", rows),
            ("items", self.items),
            ("ldg", self.ldg),
            ("ldq", self.ldq),
            ("m_pad", self.m_pad),
            ("items * inter/128", self.items * (i / QUANT_BLOCK)),
        ])?;
        c.req(self.ldg % 8 == 0 && self.up_offset % 8 == 0, || {
            format!(
                "ldg ({}) and up_offset ({}) must be multiples of 8",
                self.ldg, self.up_offset
            )
        })?;
        c.req(
            self.up_offset >= i && self.up_offset + i <= self.ldg,
            || {
                format!(
                    "gate [0, {i}) and up [{}, {}) must be disjoint and inside a row of ldg {}",
                    self.up_offset,
                    self.up_offset + i,
                    self.ldg
                )
            },
        )?;
        c.req(self.ldq >= i && self.ldq % 16 == 0, || {
            format!("ldq ({}) must be >= inter and a multiple of 16", self.ldq)
        })?;
        c.sa_pad("m_pad", self.m_pad, rows, "rows")?;
        c.aligned("gu", self.gu, 16)?;
        c.aligned("q", self.q, 16)?;
        c.aligned("scales", self.scales, 16)?;
        c.holds_matrix("gu", self.gu, rows, self.up_offset + i, self.ldg)?;
        c.holds_matrix("q", self.q, rows, i, self.ldq)?;
        c.holds(
            "scales",
            self.scales,
            (i / QUANT_BLOCK) * self.m_pad,
            "[inter/128][m_pad]",
        )?;
        match self.rows_map {
            Some(m) => {
                c.aligned("rows_map", m, 4)?;
                c.holds("rows_map", m, self.items, "[items]")
            }
            None => c.req(self.items <= rows, || {
                format!(
                    "items ({}) must be <= rows ({rows}) without a rows_map",
                    self.items
                )
            }),
        }
    }
}

impl KernelLaunch for SiluQuantDesc {
    type Params = R1MoeSiluQuantParams;

    fn kernel(&self) -> &'static str {
        SILU
    }

    fn params(&self) -> Result<R1MoeSiluQuantParams> {
        Ok(R1MoeSiluQuantParams {
            gu: self.gu.addr,
            q: self.q.addr,
            scales: self.scales.addr,
            rows_map: super::opt_addr(self.rows_map),
            items: self.items as i32,
            inter: self.inter as i32,
            ldg: self.ldg as i32,
            up_offset: self.up_offset as i32,
            ldq: self.ldq as i32,
            m_pad: self.m_pad as i32,
        })
    }

    fn launch_config(&self) -> LaunchConfig {
        let groups = self.items * (self.inter / QUANT_BLOCK);
        LaunchConfig {
            grid_dim: (
                groups.div_ceil(sys::R1_MOE_SILU_GROUPS_PER_BLOCK as usize) as u32,
                1,
                1,
            ),
            block_dim: (sys::R1_MOE_SILU_THREADS, 1, 1),
            shared_mem_bytes: 0,
        }
    }
}

pub struct SiluQuantArgs<'a> {
    pub rows: usize,
    pub items: usize,
    pub rows_map: Option<&'a DeviceBuffer<i32>>,
    pub inter: usize,
    pub gu: &'a DeviceBuffer<bf16>,
    pub ldg: usize,
    pub up_offset: usize,
    pub q: &'a mut DeviceBuffer<u8>,
    pub ldq: usize,
    pub scales: &'a mut DeviceBuffer<f32>,
    pub m_pad: usize,
}

impl SiluQuantArgs<'_> {
    pub fn desc(&self) -> SiluQuantDesc {
        SiluQuantDesc {
            rows: self.rows,
            items: self.items,
            rows_map: self.rows_map.map(Region::from),
            inter: self.inter,
            gu: Region::from(self.gu),
            ldg: self.ldg,
            up_offset: self.up_offset,
            q: Region::from(&*self.q),
            ldq: self.ldq,
            scales: Region::from(&*self.scales),
            m_pad: self.m_pad,
        }
    }
}

/// SiLU as moe_silu_quant computes it: x / (1 + e), e = exp(-x) in f64 rounded to f32.
/// ([`crate::numerics::silu`] takes e from libm's expf; the two agree unless expf misrounds.)
pub fn silu_gpu(x: f32) -> f32 {
    let e = (-f64::from(x)).exp() as f32;
    x / (1.0 + e)
}

/// sigmoid as moe_router computes it (same e as [`silu_gpu`]).
pub fn sigmoid_gpu(x: f32) -> f32 {
    let e = (-f64::from(x)).exp() as f32;
    1.0 / (1.0 + e)
}

/// What moe_silu_quant computes for rows of `[gate (inter) | ... up at up_offset]` (stride
/// `ldg`): act = bf16(silu(gate) * up), then act_quant.
pub fn silu_quant_host(
    gu: &[bf16],
    rows: usize,
    inter: usize,
    ldg: usize,
    up_offset: usize,
) -> QuantizedRows {
    let mut act = Vec::with_capacity(rows * inter);
    for r in 0..rows {
        let row = &gu[r * ldg..];
        for c in 0..inter {
            let (g, u) = (row[c].to_f32(), row[up_offset + c].to_f32());
            act.push(round_bf16(silu_gpu(g) * u));
        }
    }
    act_quant(&act, inter)
}

// ------------------------------------------------------------------------------------------
// moe_unpermute
// ------------------------------------------------------------------------------------------

/// A moe_unpermute call as plain numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnpermuteDesc {
    pub tokens: usize,
    pub top_k: usize,
    /// Columns (hidden).
    pub n: usize,
    /// bf16 `[rows][ldy]`: the down GEMM's output in flat rows.
    pub y: Region,
    pub ldy: usize,
    pub rows: usize,
    pub dest_row: Region,
    pub topk_ids: Region,
    pub topk_weights: Region,
    /// bf16 `[tokens][lds]`: the shared expert's output, if any.
    pub shared: Option<Region>,
    pub lds: usize,
    /// bf16 `[tokens][ldo]`.
    pub out: Region,
    pub ldo: usize,
}

impl UnpermuteDesc {
    pub fn check(&self) -> Result<()> {
        let c = Checker { kernel: UNPERMUTE };
        let (t, n) = (self.tokens, self.n);
        c.req(t >= 1 && n >= 1 && self.rows >= 1, || {
            format!(
                "tokens ({t}), n ({n}) and rows ({}) must be >= 1",
                self.rows
            )
        })?;
        c.req((1..=MOE_MAX_TOP_K).contains(&self.top_k), || {
            format!("top_k = {} must be in 1..={MOE_MAX_TOP_K}", self.top_k)
        })?;
        c.req(n % 8 == 0, || {
            format!("n must be a multiple of 8 (n = {n})")
        })?;
        c.fits_i32(&[
            ("tokens * top_k", t * self.top_k),
            ("n", n),
            ("ldy", self.ldy),
            ("lds", self.lds),
            ("ldo", self.ldo),
        ])?;
        c.req(t <= 65535, || {
            format!("tokens = {t} exceed the grid's y limit (65535)")
        })?;
        c.req(self.ldy >= n && self.ldy % 8 == 0, || {
            format!("ldy ({}) must be >= n and a multiple of 8", self.ldy)
        })?;
        c.req(self.ldo >= n && self.ldo % 8 == 0, || {
            format!("ldo ({}) must be >= n and a multiple of 8", self.ldo)
        })?;
        c.aligned("y", self.y, 16)?;
        c.aligned("out", self.out, 16)?;
        for (name, r) in [
            ("dest_row", self.dest_row),
            ("topk_ids", self.topk_ids),
            ("topk_weights", self.topk_weights),
        ] {
            c.aligned(name, r, 4)?;
            c.holds(name, r, t * self.top_k, "[tokens * top_k]")?;
        }
        c.holds_matrix("y", self.y, self.rows, n, self.ldy)?;
        c.holds_matrix("out", self.out, t, n, self.ldo)?;
        if let Some(s) = self.shared {
            c.req(self.lds >= n && self.lds % 8 == 0, || {
                format!("lds ({}) must be >= n and a multiple of 8", self.lds)
            })?;
            c.aligned("shared", s, 16)?;
            c.holds_matrix("shared", s, t, n, self.lds)?;
        }
        Ok(())
    }
}

impl KernelLaunch for UnpermuteDesc {
    type Params = R1MoeUnpermuteParams;

    fn kernel(&self) -> &'static str {
        UNPERMUTE
    }

    fn params(&self) -> Result<R1MoeUnpermuteParams> {
        Ok(R1MoeUnpermuteParams {
            y: self.y.addr,
            dest_row: self.dest_row.addr,
            topk_ids: self.topk_ids.addr,
            topk_weights: self.topk_weights.addr,
            shared: super::opt_addr(self.shared),
            out: self.out.addr,
            tokens: self.tokens as i32,
            top_k: self.top_k as i32,
            n: self.n as i32,
            ldy: self.ldy as i32,
            lds: self.lds as i32,
            ldo: self.ldo as i32,
        })
    }

    fn launch_config(&self) -> LaunchConfig {
        let cols = 8 * sys::R1_MOE_UNPERMUTE_THREADS as usize;
        LaunchConfig {
            grid_dim: (self.n.div_ceil(cols) as u32, self.tokens as u32, 1),
            block_dim: (sys::R1_MOE_UNPERMUTE_THREADS, 1, 1),
            shared_mem_bytes: 0,
        }
    }
}

pub struct UnpermuteArgs<'a> {
    pub tokens: usize,
    pub top_k: usize,
    pub n: usize,
    pub y: &'a DeviceBuffer<bf16>,
    pub ldy: usize,
    pub rows: usize,
    pub dest_row: &'a DeviceBuffer<i32>,
    pub topk_ids: &'a DeviceBuffer<i32>,
    pub topk_weights: &'a DeviceBuffer<f32>,
    pub shared: Option<(&'a DeviceBuffer<bf16>, usize)>,
    pub out: &'a mut DeviceBuffer<bf16>,
    pub ldo: usize,
}

impl UnpermuteArgs<'_> {
    pub fn desc(&self) -> UnpermuteDesc {
        UnpermuteDesc {
            tokens: self.tokens,
            top_k: self.top_k,
            n: self.n,
            y: Region::from(self.y),
            ldy: self.ldy,
            rows: self.rows,
            dest_row: Region::from(self.dest_row),
            topk_ids: Region::from(self.topk_ids),
            topk_weights: Region::from(self.topk_weights),
            shared: self.shared.map(|(s, _)| Region::from(s)),
            lds: self.shared.map_or(0, |(_, ld)| ld),
            out: Region::from(&*self.out),
            ldo: self.ldo,
        }
    }
}

/// What moe_unpermute computes: per token, over its entries with a row, in ascending expert
/// order, acc += w * y (f32), routed = bf16(acc), out = bf16(routed + shared) (or routed).
/// `y(row, c)` reads the down GEMM's output; the result is `[tokens][n]` as f32 of bf16.
#[allow(clippy::too_many_arguments)]
pub fn unpermute_host(
    y: impl Fn(usize, usize) -> f32,
    dest_row: &[i32],
    ids: &[i32],
    weights: &[f32],
    shared: Option<&[f32]>,
    tokens: usize,
    top_k: usize,
    n: usize,
) -> Vec<f32> {
    let mut out = Vec::with_capacity(tokens * n);
    for t in 0..tokens {
        let mut live: Vec<(i32, usize, f32)> = (0..top_k)
            .map(|k| t * top_k + k)
            .filter(|&i| dest_row[i] >= 0)
            .map(|i| (ids[i], dest_row[i] as usize, weights[i]))
            .collect();
        live.sort_by_key(|&(id, _, _)| id); // stable, like the kernel's insertion sort
        for c in 0..n {
            let mut acc = 0f32;
            for &(_, row, w) in &live {
                acc += w * y(row, c);
            }
            let routed = round_bf16(acc);
            out.push(match shared {
                Some(s) => round_bf16(routed + s[t * n + c]),
                None => routed,
            });
        }
    }
    out
}

// ------------------------------------------------------------------------------------------
// Launches
// ------------------------------------------------------------------------------------------

impl MoeOps {
    pub fn prepare_plan<'a>(&'a self, args: PlanArgs<'a>) -> Result<Prepared<'a>> {
        let d = args.desc();
        d.check()?;
        Prepared::single(&self.dev, &d)
    }

    pub fn prepare_gather<'a>(&'a self, args: GatherArgs<'a>) -> Result<Prepared<'a>> {
        let d = args.desc();
        d.check()?;
        Prepared::single(&self.dev, &d)
    }

    pub fn prepare_silu_quant<'a>(&'a self, args: SiluQuantArgs<'a>) -> Result<Prepared<'a>> {
        let d = args.desc();
        d.check()?;
        Prepared::single(&self.dev, &d)
    }

    pub fn prepare_unpermute<'a>(&'a self, args: UnpermuteArgs<'a>) -> Result<Prepared<'a>> {
        let d = args.desc();
        d.check()?;
        Prepared::single(&self.dev, &d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geom(tokens: usize, top_k: usize, experts: usize, layout: MoeLayout) -> MoeGeometry {
        MoeGeometry {
            tokens,
            top_k,
            experts,
            layout,
        }
    }

    /// Router-like ids: each token picks `top_k` distinct experts.
    fn ids(tokens: usize, top_k: usize, experts: usize, seed: u64, hot: Option<usize>) -> Vec<i32> {
        let mut s = seed;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        let mut out = Vec::new();
        for _ in 0..tokens {
            let mut chosen: Vec<i32> = hot.map(|h| vec![h as i32]).unwrap_or_default();
            while chosen.len() < top_k {
                let e = (next() % experts as u64) as i32;
                if !chosen.contains(&e) {
                    chosen.push(e);
                }
            }
            out.extend(chosen);
        }
        out
    }

    /// Every entry lands on a distinct valid row of its expert, in entry order; the block
    /// tables describe exactly the rows in use.
    fn check_plan(ids: &[i32], g: &MoeGeometry, tokens: usize) {
        let p = plan_host(ids, g, tokens);
        assert!(p.flags.is_clear(), "{:?}", p.flags);
        let mut seen = std::collections::HashSet::new();
        let mut last_row = vec![-1i64; g.experts];
        for (i, &r) in p.dest_row.iter().enumerate() {
            assert!(r >= 0 && (r as usize) < g.rows(), "entry {i} row {r}");
            assert!(seen.insert(r), "row {r} used twice");
            let e = ids[i] as usize;
            assert!(
                i64::from(r) > last_row[e],
                "expert {e}: rows not in entry order"
            );
            last_row[e] = i64::from(r);
            match g.layout {
                MoeLayout::Contiguous => {
                    let b = r as usize / MOE_BLOCK_M;
                    assert_eq!(p.block_expert[b], e as i32);
                    assert!((r as usize % MOE_BLOCK_M) < p.block_rows[b] as usize);
                }
                MoeLayout::Masked {
                    max_tokens_per_expert: m,
                } => {
                    assert_eq!(r as usize / m, e);
                    assert!((r as usize % m) < p.counts[e] as usize);
                }
            }
        }
        let total: i32 = p.counts.iter().sum();
        assert_eq!(total as usize, tokens * g.top_k);
        if g.layout == MoeLayout::Contiguous {
            let rows: i32 = p.block_rows.iter().sum();
            assert_eq!(rows, total);
            assert!(p.block_expert[p.num_blocks as usize..]
                .iter()
                .all(|&e| e == -1));
            assert!(p.block_rows[..p.num_blocks as usize].iter().all(|&r| r > 0));
        }
    }

    #[test]
    fn plan_round_trips_on_the_host() {
        for (tokens, k, e) in [
            (1, 8, 256),
            (7, 2, 8),
            (300, 8, 256),
            (64, 4, 16),
            (5, 1, 1),
        ] {
            for hot in [None, Some(0), Some(e - 1)] {
                let ids = ids(tokens, k, e, tokens as u64 * 31 + 7, hot);
                check_plan(&ids, &geom(tokens, k, e, MoeLayout::Contiguous), tokens);
                let masked = MoeLayout::Masked {
                    max_tokens_per_expert: tokens,
                };
                check_plan(&ids, &geom(tokens, k, e, masked), tokens);
                // Fewer tokens than the capacity.
                if tokens > 1 {
                    check_plan(&ids, &geom(tokens, k, e, MoeLayout::Contiguous), tokens - 1);
                }
            }
        }
    }

    /// A step-by-step port of moe_plan's phase 3 (ranks), with the 1024 threads as 32 warps
    /// of 32 lanes, __match_any_sync as a lane scan and the u16 per-warp counts reused across
    /// chunks exactly as the kernel does (the "write the base only where the count is
    /// non-zero, the leader zeroes it" trick): the ranks must be plan_host's.
    #[allow(clippy::needless_range_loop)] // loops mirror the kernel's thread / lane ids
    fn simulate_plan_ranks(ids: &[i32], experts: usize) -> Vec<i64> {
        const THREADS: usize = 1024;
        let mut wcnt = vec![0u16; 32 * experts];
        let mut runbase = vec![0i64; experts];
        let mut run = vec![0i64; experts];
        let mut ranks = vec![-1i64; ids.len()];
        for base in (0..ids.len()).step_by(THREADS) {
            let key = |tid: usize| -> i32 {
                let i = base + tid;
                let id = if i < ids.len() { ids[i] } else { -1 };
                if (0..experts as i32).contains(&id) {
                    id
                } else {
                    -1
                }
            };
            // Lanes: mask, leader, rank in warp; leaders write their counts.
            let mut lane_info = vec![(0u32, 0usize, 0u32); THREADS];
            for tid in 0..THREADS {
                let (warp, lane) = (tid / 32, tid % 32);
                let mask: u32 = (0..32)
                    .filter(|&l| key(warp * 32 + l) == key(tid))
                    .fold(0, |m, l| m | (1 << l));
                let leader = mask.trailing_zeros() as usize;
                let rank = (mask & ((1u32 << lane) - 1)).count_ones();
                lane_info[tid] = (mask, leader, rank);
                if key(tid) >= 0 && lane == leader {
                    wcnt[warp * experts + key(tid) as usize] = mask.count_ones() as u16;
                }
            }
            // Expert threads: per-warp bases.
            for e in 0..experts {
                let mut acc = 0u16;
                for w in 0..32 {
                    let c = wcnt[w * experts + e];
                    if c != 0 {
                        wcnt[w * experts + e] = acc;
                    }
                    acc += c;
                }
                runbase[e] = run[e];
                run[e] += i64::from(acc);
            }
            // Leaders read and zero; lanes add their rank.
            let mut leader_b = vec![0i64; THREADS];
            for tid in 0..THREADS {
                let (warp, lane) = (tid / 32, tid % 32);
                let k = key(tid);
                if k >= 0 && lane == lane_info[tid].1 {
                    leader_b[tid] =
                        runbase[k as usize] + i64::from(wcnt[warp * experts + k as usize]);
                    wcnt[warp * experts + k as usize] = 0;
                }
            }
            for tid in 0..THREADS {
                let i = base + tid;
                if i < ids.len() && key(tid) >= 0 {
                    let leader_tid = (tid / 32) * 32 + lane_info[tid].1;
                    ranks[i] = leader_b[leader_tid] + i64::from(lane_info[tid].2);
                }
            }
            assert!(
                wcnt.iter().all(|&c| c == 0),
                "per-warp counts not all zero after a chunk"
            );
        }
        ranks
    }

    #[test]
    fn plan_kernel_rank_algorithm_matches_host_model() {
        for (tokens, k, e, hot) in [
            (1, 8, 256, None),
            (300, 8, 256, Some(7)),
            (2000, 4, 16, None),
            (129, 8, 8, Some(0)),
        ] {
            let mut ids = ids(tokens, k, e, tokens as u64 + 3, hot);
            ids[5] = -1;
            let m = tokens;
            let g = geom(
                tokens,
                k,
                e,
                MoeLayout::Masked {
                    max_tokens_per_expert: m,
                },
            );
            let want = plan_host(&ids, &g, tokens);
            let ranks = simulate_plan_ranks(&ids, e);
            for (i, (&r, &d)) in ranks.iter().zip(&want.dest_row).enumerate() {
                let expect = if d < 0 {
                    -1
                } else {
                    i64::from(d) - ids[i] as i64 * m as i64
                };
                assert_eq!(r, expect, "entry {i}");
            }
        }
    }

    #[test]
    fn plan_flags_overflow_and_bad_ids() {
        let g = geom(
            4,
            2,
            4,
            MoeLayout::Masked {
                max_tokens_per_expert: 2,
            },
        );
        // Expert 0 gets 4 entries; its rows hold 2.
        let ids = [0, 1, 0, 2, 0, 3, 0, -1];
        let p = plan_host(&ids, &g, 4);
        assert_eq!(p.dest_row, vec![0, 2, 1, 4, -1, 6, -1, -1]);
        assert_eq!(p.counts, vec![2, 1, 1, 1]);
        assert_eq!((p.flags.dropped, p.flags.bad_ids), (2, 0));
        let p = plan_host(&[0, 9, 1, 2], &geom(2, 2, 4, MoeLayout::Contiguous), 2);
        assert_eq!(p.flags.bad_ids, 1);
        assert_eq!(p.dest_row, vec![0, -1, 128, 256]);
        assert_eq!(p.num_blocks, 3);
    }

    #[test]
    fn unpermute_host_sums_in_expert_order() {
        // Token 0: experts 5 (row 0) and 2 (row 1); expert 2 is added first.
        let y = |row: usize, _c: usize| if row == 0 { 3.0e-3 } else { 1.0e4 };
        let out = unpermute_host(y, &[0, 1], &[5, 2], &[1.0, 1.0], Some(&[1.0; 8]), 1, 2, 8);
        let want = round_bf16(round_bf16(1.0e4 + 3.0e-3) + 1.0);
        assert!(out.iter().all(|&v| v == want));
    }

    #[test]
    fn silu_host_model_agrees_with_numerics() {
        let mut differ = 0;
        for i in 0..20000 {
            let x = (i as f32 - 10000.0) * 1.37e-3;
            let (a, b) = (silu_gpu(x), crate::numerics::silu(x));
            assert!(
                (a - b).abs() <= f32::EPSILON * 2.0 * a.abs().max(1e-30),
                "{x}: {a} vs {b}"
            );
            differ += usize::from(a != b);
        }
        assert!(differ < 200, "{differ} of 20000 differ in the last bit");
    }

    #[test]
    fn descs_check_requirements() {
        let g = geom(3, 2, 8, MoeLayout::Contiguous);
        let r = |addr: u64, len: usize| Region { addr, len };
        let plan = PlanDesc {
            geom: g,
            tokens: 3,
            topk_ids: r(0x1000, 6),
            dest_row: r(0x2000, 6),
            counts: r(0x3000, 8),
            block_expert: r(0x4000, g.max_blocks()),
            block_rows: r(0x5000, g.max_blocks()),
            num_blocks: r(0x6000, 1),
            flags: r(0x7000, 8),
        };
        plan.check().unwrap();
        assert_eq!(crate::cuda::launch::row_symbol(&plan), PLAN);
        let e = |d: PlanDesc| d.check().unwrap_err().to_string();
        assert!(e(PlanDesc { tokens: 4, ..plan }).contains("tokens = 4 must be in 1..=3"));
        assert!(e(PlanDesc {
            block_rows: r(0x5000, 1),
            ..plan
        })
        .contains("block_rows holds 1"));
        assert_eq!(plan.smem_bytes(), 76 * 8 + 128);

        let gather = GatherDesc {
            geom: g,
            tokens: 3,
            k: 256,
            xq: r(0x10000, 3 * 256),
            ldxq: 256,
            xs: r(0x20000, 2 * 4),
            xs_m_pad: 4,
            dest_row: r(0x2000, 6),
            aq: r(0x30000, g.rows() * 256),
            lda: 256,
            a_scales: r(0x40000, 2 * g.r_pad()),
        };
        gather.check().unwrap();
        assert_eq!(crate::cuda::launch::row_symbol(&gather), GATHER);
        let e = |d: GatherDesc| d.check().unwrap_err().to_string();
        assert!(e(GatherDesc { k: 200, ..gather }).contains("multiple of 128"));
        assert!(e(GatherDesc {
            aq: r(0x30000, 10),
            ..gather
        })
        .contains("aq holds 10"));
        assert!(e(GatherDesc {
            xs_m_pad: 2,
            ..gather
        })
        .contains("xs_m_pad"));

        let silu = SiluQuantDesc {
            rows: 10,
            items: 6,
            rows_map: Some(r(0x2000, 6)),
            inter: 256,
            gu: r(0x10000, 10 * 512),
            ldg: 512,
            up_offset: 256,
            q: r(0x20000, 10 * 256),
            ldq: 256,
            scales: r(0x30000, 2 * 12),
            m_pad: 12,
        };
        silu.check().unwrap();
        assert_eq!(crate::cuda::launch::row_symbol(&silu), SILU);
        let e = |d: SiluQuantDesc| d.check().unwrap_err().to_string();
        assert!(e(SiluQuantDesc {
            up_offset: 128,
            ..silu
        })
        .contains("disjoint"));
        assert!(e(SiluQuantDesc {
            rows_map: None,
            items: 11,
            ..silu
        })
        .contains("items (11) must be <= rows"));
        assert!(e(SiluQuantDesc { m_pad: 10, ..silu }).contains("multiple of 4"));

        let un = UnpermuteDesc {
            tokens: 3,
            top_k: 2,
            n: 256,
            y: r(0x10000, 10 * 256),
            ldy: 256,
            rows: 10,
            dest_row: r(0x2000, 6),
            topk_ids: r(0x3000, 6),
            topk_weights: r(0x4000, 6),
            shared: Some(r(0x50000, 3 * 256)),
            lds: 256,
            out: r(0x60000, 3 * 256),
            ldo: 256,
        };
        un.check().unwrap();
        assert_eq!(crate::cuda::launch::row_symbol(&un), UNPERMUTE);
        let e = |d: UnpermuteDesc| d.check().unwrap_err().to_string();
        assert!(e(UnpermuteDesc { n: 100, ..un }).contains("multiple of 8"));
        assert!(e(UnpermuteDesc {
            shared: Some(r(0x50008, 3 * 256)),
            ..un
        })
        .contains("16-byte aligned"));
        assert!(e(UnpermuteDesc { top_k: 33, ..un }).contains("top_k = 33"));
    }
}
