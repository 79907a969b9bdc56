//! The graph's small ops on the GPU (cuda/small_ops.cu): embedding gather, RMSNorm, add,
//! silu * up, row copies (concat, select rows, cache growth), zeroing position-0 rows, a bf16
//! GEMM for dense weights (lm_head, eh_proj), act_quant for any K, the MLA absorption GEMMs
//! and the MoE fallback's weighted accumulation. Simple, obviously-correct CUDA-core kernels.
//! Beside them, the decode path's fusions, each bit-identical to the unfused kernels in
//! sequence: [`NormQuantDesc`] (residual add + RMSNorm + act_quant), [`SiluMulQuantDesc`]
//! (silu * up + act_quant) and [`MlaAbsorbQRopeDesc`] (q absorption + q RoPE).
//!
//! Each launch has a `*Desc` (plain numbers; `check` names the rule of cuda/launch_params.h's
//! SMALL OPS section that fails) built by a method of [`SmallOps`], which checks it and
//! returns a [`Prepared`] launch (launch any number of times).

use cudarc::driver::LaunchConfig;
use half::bf16;

use super::{
    ActQuantDesc, Bf16GemmDesc, Bf16Out, Checker, QuantizedActivations, Region, QUANT_BLOCK,
};
use crate::cuda::error::Result;
use crate::cuda::launch::{KernelLaunch, Prepared};
use crate::cuda::sys::{
    self, R1SmallActQuantParams, R1SmallCopyRowsParams, R1SmallEltwiseParams, R1SmallEmbedParams,
    R1SmallGemmBf16Params, R1SmallMlaAbsorbParams, R1SmallMlaAbsorbQRopeParams,
    R1SmallMoeAccumParams, R1SmallNormQuantParams, R1SmallRmsNormParams, R1SmallSiluQuantParams,
    R1SmallZeroPos0Params,
};
use crate::cuda::{Device, DeviceBuffer};

const THREADS: u32 = sys::R1_SMALL_THREADS;
/// The fused quantizing kernels run a warp per 128-channel group.
const WARPS_PER_BLOCK: usize = THREADS as usize / 32;
const TILE: u32 = sys::R1_SMALL_GEMM_TILE;

/// Launches cuda/small_ops.cu's kernels on one [`Device`].
#[derive(Clone)]
pub struct SmallOps {
    dev: Device,
}

impl std::fmt::Debug for SmallOps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmallOps")
            .field("device", &self.dev)
            .finish()
    }
}

fn grid_1d(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(THREADS as usize) as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn per_row(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Grid x / y limits every small op checks.
const GRID_X: usize = i32::MAX as usize;
const GRID_Y: usize = 65535;

// ------------------------------------------------------------------------------------------
// Descs
// ------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EmbedDesc {
    pub rows: usize,
    pub width: usize,
    pub vocab: usize,
    pub table: Region,
    pub ids: Region,
    pub out: Region,
}

impl EmbedDesc {
    pub fn check(&self) -> Result<()> {
        let c = Checker {
            kernel: "small_embed",
        };
        c.req(self.rows >= 1 && self.width >= 1 && self.vocab >= 1, || {
            format!(
                "rows ({}), width ({}) and vocab ({}) must be >= 1",
                self.rows, self.width, self.vocab
            )
        })?;
        c.fits_i32(&[
            ("rows", self.rows),
            ("width", self.width),
            ("vocab", self.vocab),
        ])?;
        c.holds(
            "table",
            self.table,
            self.vocab * self.width,
            "[vocab][width]",
        )?;
        c.holds("ids", self.ids, self.rows, "[rows]")?;
        c.holds("out", self.out, self.rows * self.width, "[rows][width]")
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RmsNormDesc {
    pub rows: usize,
    pub width: usize,
    pub eps: f32,
    pub x: Region,
    pub w: Region,
    pub out: Region,
}

impl RmsNormDesc {
    pub fn check(&self) -> Result<()> {
        let c = Checker {
            kernel: "small_rms_norm",
        };
        c.req(self.rows >= 1 && self.width >= 1, || {
            format!(
                "rows ({}) and width ({}) must be >= 1",
                self.rows, self.width
            )
        })?;
        c.req(self.eps.is_finite() && self.eps >= 0.0, || {
            format!("eps ({}) must be finite and >= 0", self.eps)
        })?;
        c.fits_i32(&[("rows", self.rows), ("width", self.width)])?;
        c.holds("x", self.x, self.rows * self.width, "[rows][width]")?;
        c.holds("w", self.w, self.width, "[width]")?;
        c.holds("out", self.out, self.rows * self.width, "[rows][width]")
    }
}

/// add, silu_mul, f32_to_bf16 over `n` elements.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EltwiseDesc {
    pub n: usize,
    pub a: Region,
    /// None for f32_to_bf16.
    pub b: Option<Region>,
    pub out: Region,
}

impl EltwiseDesc {
    pub fn check(&self, kernel: &'static str) -> Result<()> {
        let c = Checker { kernel };
        c.req(self.n >= 1, || "n must be >= 1".into())?;
        c.req(self.n.div_ceil(THREADS as usize) <= GRID_X, || {
            format!("n = {} exceeds the grid limit", self.n)
        })?;
        c.holds("a", self.a, self.n, "[n]")?;
        if let Some(b) = self.b {
            c.holds("b", b, self.n, "[n]")?;
        }
        c.holds("out", self.out, self.n, "[n]")
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CopyRowsDesc {
    pub rows: usize,
    pub cols: usize,
    pub src: Region,
    pub lds: usize,
    pub src_col: usize,
    /// Rows of `src` (bounds for the map's entries, checked on the host by the caller's map).
    pub src_rows: usize,
    pub dst: Region,
    pub ldd: usize,
    pub dst_col: usize,
    pub row_map: Option<Region>,
}

impl CopyRowsDesc {
    pub fn check(&self) -> Result<()> {
        let c = Checker {
            kernel: "small_copy_rows",
        };
        c.req(self.rows >= 1 && self.cols >= 1, || {
            format!("rows ({}) and cols ({}) must be >= 1", self.rows, self.cols)
        })?;
        c.req(self.rows <= GRID_Y, || {
            format!("rows = {} exceed the grid's y limit", self.rows)
        })?;
        c.fits_i32(&[
            ("cols", self.cols),
            ("lds", self.lds),
            ("ldd", self.ldd),
            ("src_col", self.src_col),
            ("dst_col", self.dst_col),
        ])?;
        c.req(self.src_col + self.cols <= self.lds, || {
            format!(
                "src_col ({}) + cols ({}) must be <= lds ({})",
                self.src_col, self.cols, self.lds
            )
        })?;
        c.req(self.dst_col + self.cols <= self.ldd, || {
            format!(
                "dst_col ({}) + cols ({}) must be <= ldd ({})",
                self.dst_col, self.cols, self.ldd
            )
        })?;
        let src_rows = if self.row_map.is_some() {
            self.src_rows
        } else {
            self.rows
        };
        c.req(src_rows >= 1, || "src has no rows".into())?;
        c.holds_matrix("src", self.src, src_rows, self.lds, self.lds)?;
        c.holds_matrix("dst", self.dst, self.rows, self.ldd, self.ldd)?;
        if let Some(m) = self.row_map {
            c.holds("row_map", m, self.rows, "[rows]")?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GemmBf16Desc {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub x: Region,
    pub ldx: usize,
    pub w: Region,
    pub ldw: usize,
    pub out: Region,
    pub ldo: usize,
    pub out_f32: bool,
}

impl GemmBf16Desc {
    pub fn check(&self) -> Result<()> {
        let c = Checker {
            kernel: "small_gemm_bf16",
        };
        let (m, n, k) = (self.m, self.n, self.k);
        c.req(m >= 1 && n >= 1 && k >= 1, || {
            format!("M, N and K must be >= 1 (M = {m}, N = {n}, K = {k})")
        })?;
        c.fits_i32(&[
            ("M", m),
            ("N", n),
            ("K", k),
            ("ldx", self.ldx),
            ("ldw", self.ldw),
            ("ldo", self.ldo),
        ])?;
        c.req(m.div_ceil(TILE as usize) <= GRID_Y, || {
            format!("M = {m} exceeds the grid's y limit")
        })?;
        c.req(self.ldx >= k && self.ldw >= k && self.ldo >= n, || {
            format!(
                "ldx ({}) and ldw ({}) must be >= K ({k}), ldo ({}) >= N ({n})",
                self.ldx, self.ldw, self.ldo
            )
        })?;
        c.holds_matrix("x", self.x, m, k, self.ldx)?;
        c.holds_matrix("w", self.w, n, k, self.ldw)?;
        c.holds_matrix("out", self.out, m, n, self.ldo)
    }
}

/// The small act_quant kernel's requirements: act_quant's operands (any K), one grid row per
/// token.
fn check_small_act_quant(d: &ActQuantDesc) -> Result<()> {
    let c = Checker {
        kernel: "small_act_quant",
    };
    c.req(d.m <= GRID_Y, || {
        format!("M = {} exceeds the grid's y limit", d.m)
    })?;
    d.check_operands(&c)
}

/// Both MLA absorption GEMMs (shapes as config.json gives them): q_lat = q_nope · W_UK and
/// out = o_lat · W_UV^T per head.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MlaAbsorbDesc {
    pub tokens: usize,
    pub heads: usize,
    pub nope: usize,
    pub rope: usize,
    pub v: usize,
    pub kv_lora: usize,
    /// bf16 q `[tokens][heads][nope + rope]` (absorb_q) or o_lat `[tokens][heads][kv_lora]`
    /// (absorb_o).
    pub src: Region,
    /// bf16 kv_b_proj in the absorbed layout (cuda/params/small_ops.h): per head h, at
    /// `h * (nope + v) * kv_lora`, W_UK\[h\] transposed `[kv_lora][nope]`, then W_UV\[h\]
    /// `[v][kv_lora]`. `cuda::backend::absorbed_kv_b` builds it from the checkpoint's
    /// `[heads * (nope + v)][kv_lora]`.
    pub kv_b: Region,
    /// bf16 q_attn `[tokens][heads][kv_lora + rope]` (absorb_q; its latent part) or out
    /// `[tokens][heads * v]` (absorb_o).
    pub dst: Region,
}

impl MlaAbsorbDesc {
    /// absorb_q as one tensor-core GEMM batched over heads: per head h, the q rows' nope part
    /// (row stride heads * (nope + rope)) times W_UK\[h\]^T `[kv_lora][nope]` (K-major) into
    /// dst's latent columns. The same products as small_mla_absorb_q, summed on tensor cores.
    pub fn q_gemm(&self) -> Bf16GemmDesc {
        let (h, qk, kv) = (self.heads, self.nope + self.rope, self.kv_lora);
        Bf16GemmDesc {
            m: self.tokens,
            n: kv,
            k: self.nope,
            batch: h,
            a: self.src,
            lda: h * qk,
            a_batch: qk,
            b: self.kv_b,
            ldb: self.nope,
            b_batch: (self.nope + self.v) * kv,
            d: self.dst,
            ldd: h * (kv + self.rope),
            d_batch: kv + self.rope,
            out: Bf16Out::Bf16,
        }
    }

    /// absorb_o as one tensor-core GEMM batched over heads: per head h, o_lat `[tokens][kv_lora]`
    /// (row stride heads * kv_lora) times W_UV\[h\] `[v][kv_lora]` (after W_UK^T in the head's
    /// block) into dst's `[tokens][h * v ..]`.
    pub fn o_gemm(&self) -> Bf16GemmDesc {
        let (h, kv) = (self.heads, self.kv_lora);
        let skip = self.nope * kv;
        Bf16GemmDesc {
            m: self.tokens,
            n: self.v,
            k: kv,
            batch: h,
            a: self.src,
            lda: h * kv,
            a_batch: kv,
            b: Region {
                addr: self.kv_b.addr + (skip * std::mem::size_of::<bf16>()) as u64,
                len: self.kv_b.len.saturating_sub(skip),
            },
            ldb: kv,
            b_batch: (self.nope + self.v) * kv,
            d: self.dst,
            ldd: h * self.v,
            d_batch: self.v,
            out: Bf16Out::Bf16,
        }
    }

    /// `q`: true for small_mla_absorb_q, false for small_mla_absorb_o.
    pub fn check(&self, q: bool) -> Result<()> {
        self.check_as(
            &Checker {
                kernel: if q {
                    "small_mla_absorb_q"
                } else {
                    "small_mla_absorb_o"
                },
            },
            q,
        )
    }

    fn check_as(&self, c: &Checker, q: bool) -> Result<()> {
        let (t, h) = (self.tokens, self.heads);
        c.req(
            t >= 1 && h >= 1 && self.nope >= 1 && self.v >= 1 && self.kv_lora >= 1,
            || "tokens, heads, nope, v and kv_lora must be >= 1".into(),
        )?;
        c.fits_i32(&[
            ("tokens * heads", t * h),
            ("kv_lora", self.kv_lora),
            (
                "heads * (nope + v) * kv_lora",
                h * (self.nope + self.v) * self.kv_lora,
            ),
        ])?;
        c.holds(
            "kv_b",
            self.kv_b,
            h * (self.nope + self.v) * self.kv_lora,
            "heads x ([kv_lora][nope] W_UK^T, [v][kv_lora] W_UV)",
        )?;
        if q {
            c.holds(
                "q",
                self.src,
                t * h * (self.nope + self.rope),
                "[tokens][heads][nope + rope]",
            )?;
            c.holds(
                "q_attn",
                self.dst,
                t * h * (self.kv_lora + self.rope),
                "[tokens][heads][kv_lora + rope]",
            )
        } else {
            c.holds(
                "o_lat",
                self.src,
                t * h * self.kv_lora,
                "[tokens][heads][kv_lora]",
            )?;
            c.holds("out", self.dst, t * h * self.v, "[tokens][heads * v]")
        }
    }
}

/// Where a fused kernel puts its act_quant output: fp8 codes `[rows][ldq]` and f32 scales in
/// the SA layout `[ceil(width/128)][m_pad]` (what [`QuantizedActivations`] holds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuantOut {
    pub q: Region,
    pub ldq: usize,
    pub scales: Region,
    pub m_pad: usize,
}

impl QuantOut {
    /// The codes and scales of `a` (rows of `a.k` bytes).
    pub fn of(a: &QuantizedActivations) -> Self {
        QuantOut {
            q: Region::from(&a.q),
            ldq: a.k,
            scales: Region::from(&a.scales),
            m_pad: a.m_pad,
        }
    }

    fn check(&self, c: &Checker, rows: usize, width: usize) -> Result<()> {
        c.fits_i32(&[("ldq", self.ldq), ("m_pad", self.m_pad)])?;
        c.req(self.ldq >= width, || {
            format!("ldq ({}) must be >= width ({width})", self.ldq)
        })?;
        c.sa_pad("m_pad", self.m_pad, rows, "rows")?;
        c.holds_matrix("q", self.q, rows, width, self.ldq)?;
        c.aligned("scales", self.scales, 4)?;
        c.holds(
            "scales",
            self.scales,
            width.div_ceil(QUANT_BLOCK) * self.m_pad,
            "[ceil(width/128)][m_pad]",
        )
    }
}

/// small_rms_norm_quant: RMSNorm of `x` (or of bf16(x + residual), stored to `sum`) into
/// `out` and/or act_quant codes and scales, bit for bit what small_add, small_rms_norm and
/// act_quant give in sequence.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NormQuantDesc {
    pub rows: usize,
    pub width: usize,
    pub eps: f32,
    /// bf16 `[rows][width]`.
    pub x: Region,
    /// `(residual, sum)`: normalize bf16(x + residual) and store it to `sum` (which may be
    /// `x` or `residual`).
    pub residual: Option<(Region, Region)>,
    /// bf16 `[width]`.
    pub w: Region,
    /// bf16 `[rows][width]` normed rows (may alias x or residual when there is a residual).
    pub out: Option<Region>,
    pub quant: Option<QuantOut>,
}

impl NormQuantDesc {
    pub fn check(&self) -> Result<()> {
        let c = Checker {
            kernel: "small_rms_norm_quant",
        };
        let (rows, width) = (self.rows, self.width);
        c.req(rows >= 1 && width >= 1, || {
            format!("rows ({rows}) and width ({width}) must be >= 1")
        })?;
        c.req(rows <= GRID_X, || {
            format!("rows = {rows} exceed the grid limit")
        })?;
        c.req(self.eps.is_finite() && self.eps >= 0.0, || {
            format!("eps ({}) must be finite and >= 0", self.eps)
        })?;
        c.req(self.out.is_some() || self.quant.is_some(), || {
            "needs a normed output, a quantized one, or both".into()
        })?;
        c.fits_i32(&[("rows", rows), ("width", width)])?;
        let n = rows * width;
        c.holds("x", self.x, n, "[rows][width]")?;
        if let Some((residual, sum)) = self.residual {
            c.holds("residual", residual, n, "[rows][width]")?;
            c.holds("sum", sum, n, "[rows][width]")?;
        }
        c.holds("w", self.w, width, "[width]")?;
        if let Some(out) = self.out {
            c.holds("out", out, n, "[rows][width]")?;
        }
        if let Some(q) = &self.quant {
            q.check(&c, rows, width)?;
        }
        Ok(())
    }
}

impl KernelLaunch for NormQuantDesc {
    type Params = R1SmallNormQuantParams;

    fn kernel(&self) -> &'static str {
        "small_rms_norm_quant"
    }

    fn params(&self) -> Result<R1SmallNormQuantParams> {
        let q = self.quant;
        Ok(R1SmallNormQuantParams {
            x: self.x.addr,
            residual: super::opt_addr(self.residual.map(|(r, _)| r)),
            sum: super::opt_addr(self.residual.map(|(_, s)| s)),
            w: self.w.addr,
            out: super::opt_addr(self.out),
            q: super::opt_addr(q.map(|q| q.q)),
            scales: super::opt_addr(q.map(|q| q.scales)),
            rows: self.rows as i32,
            width: self.width as i32,
            ldq: q.map_or(0, |q| q.ldq as i32),
            m_pad: q.map_or(0, |q| q.m_pad as i32),
            eps: self.eps,
            reserved: 0,
        })
    }

    fn launch_config(&self) -> LaunchConfig {
        per_row(self.rows)
    }
}

/// small_silu_mul_quant: a = bf16(silu(gate) * up) (stored to `out` when given) quantized into
/// `quant`, bit for bit what small_silu_mul and act_quant give in sequence.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SiluMulQuantDesc {
    pub rows: usize,
    pub width: usize,
    /// bf16 `[rows][width]` each.
    pub gate: Region,
    pub up: Region,
    pub out: Option<Region>,
    pub quant: QuantOut,
}

impl SiluMulQuantDesc {
    fn groups(&self) -> usize {
        self.rows * self.width.div_ceil(QUANT_BLOCK)
    }

    pub fn check(&self) -> Result<()> {
        let c = Checker {
            kernel: "small_silu_mul_quant",
        };
        let (rows, width) = (self.rows, self.width);
        c.req(rows >= 1 && width >= 1, || {
            format!("rows ({rows}) and width ({width}) must be >= 1")
        })?;
        c.fits_i32(&[("rows", rows), ("width", width)])?;
        c.req(self.groups().div_ceil(WARPS_PER_BLOCK) <= GRID_X, || {
            format!(
                "rows * ceil(width/128) = {} exceed the grid limit",
                self.groups()
            )
        })?;
        let n = rows * width;
        c.holds("gate", self.gate, n, "[rows][width]")?;
        c.holds("up", self.up, n, "[rows][width]")?;
        if let Some(out) = self.out {
            c.holds("out", out, n, "[rows][width]")?;
        }
        self.quant.check(&c, rows, width)
    }
}

impl KernelLaunch for SiluMulQuantDesc {
    type Params = R1SmallSiluQuantParams;

    fn kernel(&self) -> &'static str {
        "small_silu_mul_quant"
    }

    fn params(&self) -> Result<R1SmallSiluQuantParams> {
        Ok(R1SmallSiluQuantParams {
            gate: self.gate.addr,
            up: self.up.addr,
            out: super::opt_addr(self.out),
            q: self.quant.q.addr,
            scales: self.quant.scales.addr,
            rows: self.rows as i32,
            width: self.width as i32,
            ldq: self.quant.ldq as i32,
            m_pad: self.quant.m_pad as i32,
        })
    }

    fn launch_config(&self) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (self.groups().div_ceil(WARPS_PER_BLOCK) as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        }
    }
}

/// small_mla_absorb_q_rope: small_mla_absorb_q and mla_q_rope in one launch (the latent query
/// and the roped q_pe of each (token, head) written by one CTA).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MlaAbsorbQRopeDesc {
    pub absorb: MlaAbsorbDesc,
    /// i32 `[tokens]`: each token's position.
    pub positions: Region,
    /// f32 `[rope / 2]`: YaRN-corrected inverse frequencies.
    pub inv_freq: Region,
    pub attention_factor: f32,
}

impl MlaAbsorbQRopeDesc {
    pub fn check(&self) -> Result<()> {
        let c = Checker {
            kernel: "small_mla_absorb_q_rope",
        };
        let a = &self.absorb;
        a.check_as(&c, true)?;
        c.req(a.rope >= 2 && a.rope % 2 == 0, || {
            format!("rope ({}) must be even and >= 2", a.rope)
        })?;
        c.req(self.attention_factor.is_finite(), || {
            format!(
                "attention_factor ({}) must be finite",
                self.attention_factor
            )
        })?;
        c.aligned("positions", self.positions, 4)?;
        c.aligned("inv_freq", self.inv_freq, 4)?;
        c.holds("positions", self.positions, a.tokens, "[tokens]")?;
        c.holds("inv_freq", self.inv_freq, a.rope / 2, "[rope / 2]")
    }
}

impl KernelLaunch for MlaAbsorbQRopeDesc {
    type Params = R1SmallMlaAbsorbQRopeParams;

    fn kernel(&self) -> &'static str {
        "small_mla_absorb_q_rope"
    }

    fn params(&self) -> Result<R1SmallMlaAbsorbQRopeParams> {
        Ok(R1SmallMlaAbsorbQRopeParams {
            absorb: Absorb {
                desc: self.absorb,
                q: true,
            }
            .params()?,
            positions: self.positions.addr,
            inv_freq: self.inv_freq.addr,
            attention_factor: self.attention_factor,
            reserved: 0,
        })
    }

    fn launch_config(&self) -> LaunchConfig {
        per_row(self.absorb.tokens * self.absorb.heads)
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MoeAccumDesc {
    pub tokens: usize,
    pub width: usize,
    pub top_k: usize,
    pub expert: usize,
    pub y: Region,
    pub acc: Region,
    pub topk_ids: Region,
    pub topk_weights: Region,
}

impl MoeAccumDesc {
    pub fn check(&self) -> Result<()> {
        let c = Checker {
            kernel: "small_moe_accum",
        };
        c.req(
            self.tokens >= 1 && self.width >= 1 && self.top_k >= 1,
            || "tokens, width and top_k must be >= 1".into(),
        )?;
        c.req(self.tokens <= GRID_Y, || {
            format!("tokens = {} exceed the grid's y limit", self.tokens)
        })?;
        c.fits_i32(&[
            ("width", self.width),
            ("top_k", self.top_k),
            ("expert", self.expert),
        ])?;
        let n = self.tokens * self.width;
        c.holds("y", self.y, n, "[tokens][width]")?;
        c.holds("acc", self.acc, n, "[tokens][width]")?;
        c.holds(
            "topk_ids",
            self.topk_ids,
            self.tokens * self.top_k,
            "[tokens][top_k]",
        )?;
        c.holds(
            "topk_weights",
            self.topk_weights,
            self.tokens * self.top_k,
            "[tokens][top_k]",
        )
    }
}

// ------------------------------------------------------------------------------------------
// Launches
// ------------------------------------------------------------------------------------------

impl KernelLaunch for EmbedDesc {
    type Params = R1SmallEmbedParams;

    fn kernel(&self) -> &'static str {
        "small_embed"
    }

    fn params(&self) -> Result<R1SmallEmbedParams> {
        Ok(R1SmallEmbedParams {
            table: self.table.addr,
            ids: self.ids.addr,
            out: self.out.addr,
            rows: self.rows as i32,
            width: self.width as i32,
            vocab: self.vocab as i32,
            reserved: 0,
        })
    }

    fn launch_config(&self) -> LaunchConfig {
        per_row(self.rows)
    }
}

impl KernelLaunch for RmsNormDesc {
    type Params = R1SmallRmsNormParams;

    fn kernel(&self) -> &'static str {
        "small_rms_norm"
    }

    fn params(&self) -> Result<R1SmallRmsNormParams> {
        Ok(R1SmallRmsNormParams {
            x: self.x.addr,
            w: self.w.addr,
            out: self.out.addr,
            rows: self.rows as i32,
            width: self.width as i32,
            eps: self.eps,
            reserved: 0,
        })
    }

    fn launch_config(&self) -> LaunchConfig {
        per_row(self.rows)
    }
}

/// One of the element-wise kernels over an [`EltwiseDesc`].
struct Eltwise {
    kernel: &'static str,
    desc: EltwiseDesc,
}

impl KernelLaunch for Eltwise {
    type Params = R1SmallEltwiseParams;

    fn kernel(&self) -> &'static str {
        self.kernel
    }

    fn params(&self) -> Result<R1SmallEltwiseParams> {
        let d = &self.desc;
        Ok(R1SmallEltwiseParams {
            a: d.a.addr,
            b: super::opt_addr(d.b),
            out: d.out.addr,
            n: d.n as i64,
        })
    }

    fn launch_config(&self) -> LaunchConfig {
        grid_1d(self.desc.n)
    }
}

impl KernelLaunch for CopyRowsDesc {
    type Params = R1SmallCopyRowsParams;

    fn kernel(&self) -> &'static str {
        "small_copy_rows"
    }

    fn params(&self) -> Result<R1SmallCopyRowsParams> {
        Ok(R1SmallCopyRowsParams {
            src: self.src.addr,
            dst: self.dst.addr,
            row_map: super::opt_addr(self.row_map),
            rows: self.rows as i32,
            cols: self.cols as i32,
            lds: self.lds as i32,
            ldd: self.ldd as i32,
            src_col: self.src_col as i32,
            dst_col: self.dst_col as i32,
        })
    }

    fn launch_config(&self) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (
                self.cols.div_ceil(THREADS as usize) as u32,
                self.rows as u32,
                1,
            ),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        }
    }
}

/// small_zero_pos0 over `rows` rows of `width`.
struct ZeroPos0 {
    x: u64,
    positions: u64,
    rows: usize,
    width: usize,
}

impl KernelLaunch for ZeroPos0 {
    type Params = R1SmallZeroPos0Params;

    fn kernel(&self) -> &'static str {
        "small_zero_pos0"
    }

    fn params(&self) -> Result<R1SmallZeroPos0Params> {
        Ok(R1SmallZeroPos0Params {
            x: self.x,
            positions: self.positions,
            rows: self.rows as i32,
            width: self.width as i32,
        })
    }

    fn launch_config(&self) -> LaunchConfig {
        per_row(self.rows)
    }
}

impl KernelLaunch for GemmBf16Desc {
    type Params = R1SmallGemmBf16Params;

    fn kernel(&self) -> &'static str {
        "small_gemm_bf16"
    }

    fn params(&self) -> Result<R1SmallGemmBf16Params> {
        Ok(R1SmallGemmBf16Params {
            x: self.x.addr,
            w: self.w.addr,
            out: self.out.addr,
            m: self.m as i32,
            n: self.n as i32,
            k: self.k as i32,
            ldx: self.ldx as i32,
            ldw: self.ldw as i32,
            ldo: self.ldo as i32,
            out_f32: i32::from(self.out_f32),
            reserved: 0,
        })
    }

    fn launch_config(&self) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (
                self.n.div_ceil(TILE as usize) as u32,
                self.m.div_ceil(TILE as usize) as u32,
                1,
            ),
            block_dim: (TILE, TILE, 1),
            shared_mem_bytes: 0,
        }
    }
}

/// small_act_quant over an [`ActQuantDesc`] (any K).
struct SmallActQuant(ActQuantDesc);

impl KernelLaunch for SmallActQuant {
    type Params = R1SmallActQuantParams;

    fn kernel(&self) -> &'static str {
        "small_act_quant"
    }

    fn params(&self) -> Result<R1SmallActQuantParams> {
        let d = &self.0;
        Ok(R1SmallActQuantParams {
            x: d.x.addr,
            q: d.q.addr,
            scales: d.scales.addr,
            m: d.m as i32,
            k: d.k as i32,
            ldx: d.ldx as i32,
            ldq: d.ldq as i32,
            m_pad: d.m_pad as i32,
            reserved: 0,
        })
    }

    fn launch_config(&self) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (self.0.k.div_ceil(QUANT_BLOCK) as u32, self.0.m as u32, 1),
            block_dim: (QUANT_BLOCK as u32, 1, 1),
            shared_mem_bytes: 0,
        }
    }
}

/// small_mla_absorb_q (`q`) or small_mla_absorb_o over an [`MlaAbsorbDesc`].
struct Absorb {
    desc: MlaAbsorbDesc,
    q: bool,
}

impl KernelLaunch for Absorb {
    type Params = R1SmallMlaAbsorbParams;

    fn kernel(&self) -> &'static str {
        if self.q {
            "small_mla_absorb_q"
        } else {
            "small_mla_absorb_o"
        }
    }

    fn params(&self) -> Result<R1SmallMlaAbsorbParams> {
        let d = &self.desc;
        Ok(R1SmallMlaAbsorbParams {
            src: d.src.addr,
            kv_b: d.kv_b.addr,
            dst: d.dst.addr,
            tokens: d.tokens as i32,
            heads: d.heads as i32,
            nope: d.nope as i32,
            rope: d.rope as i32,
            v: d.v as i32,
            kv_lora: d.kv_lora as i32,
        })
    }

    fn launch_config(&self) -> LaunchConfig {
        per_row(self.desc.tokens * self.desc.heads)
    }
}

impl KernelLaunch for MoeAccumDesc {
    type Params = R1SmallMoeAccumParams;

    fn kernel(&self) -> &'static str {
        "small_moe_accum"
    }

    fn params(&self) -> Result<R1SmallMoeAccumParams> {
        Ok(R1SmallMoeAccumParams {
            y: self.y.addr,
            acc: self.acc.addr,
            topk_ids: self.topk_ids.addr,
            topk_weights: self.topk_weights.addr,
            tokens: self.tokens as i32,
            width: self.width as i32,
            top_k: self.top_k as i32,
            expert: self.expert as i32,
        })
    }

    fn launch_config(&self) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (
                self.width.div_ceil(THREADS as usize) as u32,
                self.tokens as u32,
                1,
            ),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        }
    }
}

impl SmallOps {
    pub fn new(dev: &Device) -> Self {
        SmallOps { dev: dev.clone() }
    }

    pub fn device(&self) -> &Device {
        &self.dev
    }

    /// out[r] = table[ids[r]] (bf16 table `[vocab][width]`).
    pub fn prepare_embed<'a>(
        &'a self,
        table: &'a DeviceBuffer<bf16>,
        vocab: usize,
        ids: &'a DeviceBuffer<i32>,
        out: &'a mut DeviceBuffer<bf16>,
        rows: usize,
        width: usize,
    ) -> Result<Prepared<'a>> {
        let d = EmbedDesc {
            rows,
            width,
            vocab,
            table: table.into(),
            ids: ids.into(),
            out: Region::from(&*out),
        };
        d.check()?;
        Prepared::single(&self.dev, &d)
    }

    /// RMSNorm of `rows` rows of `width` (f32 statistics).
    pub fn prepare_rms_norm<'a>(
        &'a self,
        x: &'a DeviceBuffer<bf16>,
        w: &'a DeviceBuffer<bf16>,
        out: &'a mut DeviceBuffer<bf16>,
        rows: usize,
        width: usize,
        eps: f32,
    ) -> Result<Prepared<'a>> {
        let d = RmsNormDesc {
            rows,
            width,
            eps,
            x: x.into(),
            w: w.into(),
            out: Region::from(&*out),
        };
        d.check()?;
        Prepared::single(&self.dev, &d)
    }

    fn eltwise(&self, kernel: &'static str, desc: EltwiseDesc) -> Result<Prepared<'_>> {
        desc.check(kernel)?;
        Prepared::single(&self.dev, &Eltwise { kernel, desc })
    }

    /// out = a + b over `n` bf16 elements.
    pub fn prepare_add<'a>(
        &'a self,
        a: &'a DeviceBuffer<bf16>,
        b: &'a DeviceBuffer<bf16>,
        out: &'a mut DeviceBuffer<bf16>,
        n: usize,
    ) -> Result<Prepared<'a>> {
        let d = EltwiseDesc {
            n,
            a: a.into(),
            b: Some(b.into()),
            out: Region::from(&*out),
        };
        self.eltwise("small_add", d)
    }

    /// out = silu(gate) * up over `n` bf16 elements.
    pub fn prepare_silu_mul<'a>(
        &'a self,
        gate: &'a DeviceBuffer<bf16>,
        up: &'a DeviceBuffer<bf16>,
        out: &'a mut DeviceBuffer<bf16>,
        n: usize,
    ) -> Result<Prepared<'a>> {
        let d = EltwiseDesc {
            n,
            a: gate.into(),
            b: Some(up.into()),
            out: Region::from(&*out),
        };
        self.eltwise("small_silu_mul", d)
    }

    /// out = bf16(a) over `n` elements.
    pub fn prepare_f32_to_bf16<'a>(
        &'a self,
        a: &'a DeviceBuffer<f32>,
        out: &'a mut DeviceBuffer<bf16>,
        n: usize,
    ) -> Result<Prepared<'a>> {
        let d = EltwiseDesc {
            n,
            a: a.into(),
            b: None,
            out: Region::from(&*out),
        };
        self.eltwise("small_f32_to_bf16", d)
    }

    /// Copies `cols` columns of rows of `src` into `dst` (a row map selects source rows).
    pub fn prepare_copy_rows(&self, d: CopyRowsDesc) -> Result<Prepared<'_>> {
        d.check()?;
        Prepared::single(&self.dev, &d)
    }

    /// Zeroes the rows whose position is 0.
    pub fn prepare_zero_pos0<'a>(
        &'a self,
        x: &'a mut DeviceBuffer<bf16>,
        positions: &'a DeviceBuffer<i32>,
        rows: usize,
        width: usize,
    ) -> Result<Prepared<'a>> {
        let c = Checker {
            kernel: "small_zero_pos0",
        };
        c.req(rows >= 1 && width >= 1, || {
            format!("rows ({rows}) and width ({width}) must be >= 1")
        })?;
        c.fits_i32(&[("rows", rows), ("width", width)])?;
        c.holds("x", Region::from(&*x), rows * width, "[rows][width]")?;
        c.holds("positions", positions.into(), rows, "[rows]")?;
        let launch = ZeroPos0 {
            x: x.addr(),
            positions: positions.addr(),
            rows,
            width,
        };
        Prepared::single(&self.dev, &launch)
    }

    /// out = x · w^T with f32 accumulation; `out` is f32 or bf16 by the Desc.
    pub fn prepare_gemm_bf16(&self, d: GemmBf16Desc) -> Result<Prepared<'_>> {
        d.check()?;
        Prepared::single(&self.dev, &d)
    }

    /// act_quant for any K (ragged last group) into q `[m][ldq]` and SA scales.
    pub fn prepare_act_quant(&self, d: ActQuantDesc) -> Result<Prepared<'_>> {
        check_small_act_quant(&d)?;
        Prepared::single(&self.dev, &SmallActQuant(d))
    }

    /// q_lat = q_nope · W_UK per head (`q`: true; W_UK read transposed from the absorbed
    /// kv_b) or out = o_lat · W_UV^T (`q`: false).
    pub fn prepare_mla_absorb(&self, d: MlaAbsorbDesc, q: bool) -> Result<Prepared<'_>> {
        d.check(q)?;
        Prepared::single(&self.dev, &Absorb { desc: d, q })
    }

    /// [residual add +] RMSNorm [+ act_quant] in one launch.
    pub fn prepare_rms_norm_quant(&self, d: NormQuantDesc) -> Result<Prepared<'_>> {
        d.check()?;
        Prepared::single(&self.dev, &d)
    }

    /// silu(gate) * up quantized (and stored, with `out`) in one launch.
    pub fn prepare_silu_mul_quant(&self, d: SiluMulQuantDesc) -> Result<Prepared<'_>> {
        d.check()?;
        Prepared::single(&self.dev, &d)
    }

    /// q_lat = q_nope · W_UK and the roped q_pe into the attention query buffer, one launch.
    pub fn prepare_mla_absorb_q_rope(&self, d: MlaAbsorbQRopeDesc) -> Result<Prepared<'_>> {
        d.check()?;
        Prepared::single(&self.dev, &d)
    }

    /// acc += w * y for the tokens that chose `expert`.
    pub fn prepare_moe_accum(&self, d: MoeAccumDesc) -> Result<Prepared<'_>> {
        d.check()?;
        Prepared::single(&self.dev, &d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::launch::row_symbol;

    fn r(len: usize) -> Region {
        Region { addr: 256, len }
    }

    /// At R1's attention shape both absorption products take the tensor-core GEMM, over the
    /// same buffers the CUDA-core kernels accept: W_UK^T at each head's block start, W_UV
    /// after it, q's nope columns and the query's latent columns per head.
    #[test]
    fn absorption_gemms_take_the_tensor_cores_at_r1_shapes() {
        use crate::cuda::ops::Bf16GemmKernel;
        let (t, h, nope, rope, v, kv) = (5, 128, 128, 64, 128, 512);
        let at = |addr, len| Region { addr, len };
        let kv_b = at(0x1000_0000, h * (nope + v) * kv);
        let q = MlaAbsorbDesc {
            tokens: t,
            heads: h,
            nope,
            rope,
            v,
            kv_lora: kv,
            src: at(0x2000_0000, t * h * (nope + rope)),
            kv_b,
            dst: at(0x3000_0000, t * h * (kv + rope)),
        };
        let o = MlaAbsorbDesc {
            src: at(0x4000_0000, t * h * kv),
            dst: at(0x5000_0000, t * h * v),
            ..q
        };
        q.check(true).unwrap();
        o.check(false).unwrap();
        let (qg, og) = (q.q_gemm(), o.o_gemm());
        for g in [qg, og] {
            assert_eq!(
                g.resolve(Bf16GemmKernel::Auto).unwrap(),
                Bf16GemmKernel::Wgmma
            );
        }
        assert_eq!((qg.m, qg.n, qg.k, qg.batch), (t, kv, nope, h));
        assert_eq!(
            (qg.lda, qg.a_batch, qg.ldd, qg.d_batch),
            (h * 192, 192, h * 576, 576)
        );
        assert_eq!((og.m, og.n, og.k, og.batch), (t, v, kv, h));
        assert_eq!(og.b.addr, kv_b.addr + (2 * nope * kv) as u64);
        assert_eq!(og.b_batch, (nope + v) * kv);
        // The last head's W_UV ends where the absorbed kv_b ends.
        assert_eq!(
            (og.b_batch * (h - 1) + (og.n - 1) * og.ldb + og.k),
            og.b.len
        );
    }

    /// Each launch's kernel has a row naming its parameter struct.
    #[test]
    fn every_launch_pairs_with_its_row() {
        let elt = EltwiseDesc {
            n: 8,
            a: r(8),
            b: None,
            out: r(8),
        };
        for kernel in ["small_add", "small_silu_mul", "small_f32_to_bf16"] {
            assert_eq!(row_symbol(&Eltwise { kernel, desc: elt }), kernel);
        }
        let absorb = MlaAbsorbDesc {
            tokens: 1,
            heads: 1,
            nope: 1,
            rope: 1,
            v: 1,
            kv_lora: 1,
            src: r(2),
            kv_b: r(2),
            dst: r(2),
        };
        assert_eq!(
            row_symbol(&Absorb {
                desc: absorb,
                q: true
            }),
            "small_mla_absorb_q"
        );
        assert_eq!(
            row_symbol(&Absorb {
                desc: absorb,
                q: false
            }),
            "small_mla_absorb_o"
        );
        let aq = ActQuantDesc {
            m: 1,
            k: 128,
            x: r(128),
            ldx: 128,
            q: r(128),
            ldq: 128,
            scales: r(4),
            m_pad: 4,
        };
        assert_eq!(row_symbol(&SmallActQuant(aq)), "small_act_quant");
        assert_eq!(row_symbol(&aq), "act_quant");
        let zero = ZeroPos0 {
            x: 256,
            positions: 256,
            rows: 1,
            width: 1,
        };
        assert_eq!(row_symbol(&zero), "small_zero_pos0");
        let (rows, width) = (2, 4);
        assert_eq!(
            row_symbol(&EmbedDesc {
                rows,
                width,
                vocab: 3,
                table: r(12),
                ids: r(2),
                out: r(8),
            }),
            "small_embed"
        );
        assert_eq!(
            row_symbol(&RmsNormDesc {
                rows,
                width,
                eps: 1e-6,
                x: r(8),
                w: r(4),
                out: r(8),
            }),
            "small_rms_norm"
        );
        assert_eq!(
            row_symbol(&MoeAccumDesc {
                tokens: 1,
                width: 4,
                top_k: 1,
                expert: 0,
                y: r(4),
                acc: r(4),
                topk_ids: r(1),
                topk_weights: r(1),
            }),
            "small_moe_accum"
        );
    }

    #[test]
    fn fused_launches_pair_with_their_rows_and_check() {
        let quant = QuantOut {
            q: r(3 * 200),
            ldq: 200,
            scales: r(2 * 4),
            m_pad: 4,
        };
        let norm = NormQuantDesc {
            rows: 3,
            width: 200,
            eps: 1e-6,
            x: r(600),
            residual: Some((r(600), r(600))),
            w: r(200),
            out: None,
            quant: Some(quant),
        };
        norm.check().unwrap();
        assert_eq!(row_symbol(&norm), "small_rms_norm_quant");
        let p = norm.params().unwrap();
        assert_eq!((p.out, p.ldq, p.m_pad), (0, 200, 4));
        let e = NormQuantDesc {
            quant: None,
            ..norm
        }
        .check()
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("small_rms_norm_quant") && e.contains("needs a normed output"),
            "{e}"
        );
        let e = NormQuantDesc {
            quant: Some(QuantOut {
                scales: r(7),
                ..quant
            }),
            ..norm
        }
        .check()
        .unwrap_err()
        .to_string();
        assert!(e.contains("scales holds 7"), "{e}");
        let silu = SiluMulQuantDesc {
            rows: 3,
            width: 200,
            gate: r(600),
            up: r(600),
            out: Some(r(600)),
            quant,
        };
        silu.check().unwrap();
        assert_eq!(row_symbol(&silu), "small_silu_mul_quant");
        // 3 rows x 2 groups, a warp per group: one block.
        assert_eq!(silu.launch_config().grid_dim, (1, 1, 1));
        let e = SiluMulQuantDesc { up: r(599), ..silu }
            .check()
            .unwrap_err()
            .to_string();
        assert!(e.contains("up holds 599"), "{e}");
        let rope = MlaAbsorbQRopeDesc {
            absorb: MlaAbsorbDesc {
                tokens: 2,
                heads: 2,
                nope: 4,
                rope: 2,
                v: 4,
                kv_lora: 8,
                src: r(2 * 2 * 6),
                kv_b: r(2 * 8 * 8),
                dst: r(2 * 2 * 10),
            },
            positions: r(2),
            inv_freq: r(1),
            attention_factor: 1.0,
        };
        rope.check().unwrap();
        assert_eq!(row_symbol(&rope), "small_mla_absorb_q_rope");
        assert_eq!(rope.launch_config().grid_dim, (4, 1, 1));
        let mut odd = rope;
        odd.absorb.rope = 3;
        let e = odd.check().unwrap_err().to_string();
        assert!(e.contains("small_mla_absorb_q_rope"), "{e}");
    }

    #[test]
    fn checks_name_the_broken_rule() {
        let g = GemmBf16Desc {
            m: 2,
            n: 3,
            k: 4,
            x: r(8),
            ldx: 4,
            w: r(11),
            ldw: 4,
            out: r(6),
            ldo: 3,
            out_f32: true,
        };
        let e = g.check().unwrap_err().to_string();
        assert!(
            e.contains("small_gemm_bf16") && e.contains("w holds 11"),
            "{e}"
        );
        assert!(GemmBf16Desc { w: r(12), ..g }.check().is_ok());
        let c = CopyRowsDesc {
            rows: 2,
            cols: 4,
            src: r(8),
            lds: 4,
            src_col: 1,
            src_rows: 2,
            dst: r(16),
            ldd: 8,
            dst_col: 4,
            row_map: None,
        };
        let e = c.check().unwrap_err().to_string();
        assert!(
            e.contains("src_col (1) + cols (4) must be <= lds (4)"),
            "{e}"
        );
        assert!(CopyRowsDesc { src_col: 0, ..c }.check().is_ok());
        let q = ActQuantDesc {
            m: 3,
            k: 200,
            x: r(600),
            ldx: 200,
            q: r(600),
            ldq: 200,
            scales: r(8),
            m_pad: 4,
        };
        assert!(check_small_act_quant(&q).is_ok());
        let e = check_small_act_quant(&ActQuantDesc { m_pad: 3, ..q })
            .unwrap_err()
            .to_string();
        assert!(e.contains("multiple of 4"), "{e}");
    }
}
