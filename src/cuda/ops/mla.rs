//! MLA on the GPU (cuda/mla/): the paged latent cache, its write kernel, q RoPE, and the
//! device-side step layout shared by every MLA kernel. Attention itself (reference kernel,
//! split-KV wgmma fast path, scheduler, combine) is in [`super::mla_attn`].
//!
//! An [`Mla`] handle (from [`Mla::new`]; it holds a clone of its [`Device`]) launches the
//! kernels, which the device loaded when it opened. Each launch follows the crate's pattern: a `*Desc`
//! (plain numbers, `check` names the broken rule of cuda/launch_params.h's MLA section), `*Args`
//! borrowing the buffers, `prepare_*` (checked once, launch many times: benches, graph capture).
//!
//! Layouts (launch_params.h): cache `bf16 [num_pages][64][kv_lora + rope]`, one page id per 64
//! positions of a sequence's block table (the engine's KV-cache block ids); queries and
//! outputs packed by token, sequence `b` owning tokens `q_starts[b] .. q_starts[b + 1]` whose
//! last one sits at position `kv_len[b] - 1` (the cache holds the new tokens too).

use cudarc::driver::LaunchConfig;
use half::bf16;

use super::{Checker, Region};
use crate::cuda::error::{CudaError, Result};
use crate::cuda::launch::{KernelLaunch, Prepared};
use crate::cuda::sys::{self, R1MlaCacheWriteParams, R1MlaQRopeParams};
use crate::cuda::{Device, DeviceBuffer};

/// Tokens per cache page (R1_MLA_PAGE_TOKENS), the same as the engine's KV-cache pages (the
/// CUDA backend asserts it).
pub const MLA_PAGE_TOKENS: usize = sys::R1_MLA_PAGE_TOKENS as usize;

/// Launches the MLA kernels (cuda/mla/) on one [`Device`].
#[derive(Clone)]
pub struct Mla {
    pub(crate) dev: Device,
}

impl std::fmt::Debug for Mla {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mla").field("device", &self.dev).finish()
    }
}

impl Mla {
    pub fn new(dev: &Device) -> Self {
        Mla { dev: dev.clone() }
    }

    pub fn device(&self) -> &Device {
        &self.dev
    }
}

// ------------------------------------------------------------------------------------------
// Step layout, cache, RoPE table
// ------------------------------------------------------------------------------------------

/// One forward step's sequences on the host: per sequence its block table (page ids), its
/// cached length after this step (`kv_len`, new tokens included) and how many new tokens it
/// brings (`q_len`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MlaLayout {
    pub tables: Vec<Vec<u32>>,
    pub kv_lens: Vec<usize>,
    pub q_lens: Vec<usize>,
}

impl MlaLayout {
    /// Uniform decode: every sequence brings `s_q` tokens.
    pub fn decode(tables: Vec<Vec<u32>>, kv_lens: Vec<usize>, s_q: usize) -> Self {
        let q_lens = vec![s_q; kv_lens.len()];
        MlaLayout {
            tables,
            kv_lens,
            q_lens,
        }
    }

    pub fn batch(&self) -> usize {
        self.kv_lens.len()
    }

    pub fn total_q(&self) -> usize {
        self.q_lens.iter().sum()
    }

    pub fn max_q_len(&self) -> usize {
        self.q_lens.iter().copied().max().unwrap_or(0)
    }

    /// Absolute position of every new token, in order, and its sequence index.
    pub fn token_positions(&self) -> Vec<(usize, usize)> {
        self.kv_lens
            .iter()
            .zip(&self.q_lens)
            .enumerate()
            .flat_map(|(b, (&kv, &q))| (kv - q..kv).map(move |pos| (b, pos)))
            .collect()
    }

    /// The host-side rules the kernels rely on (they stay memory-safe without them, but
    /// results would be unspecified).
    pub fn check(&self) -> Result<()> {
        let c = Checker { kernel: "mla" };
        let n = self.kv_lens.len();
        c.req(n >= 1, || "the batch has no sequence".into())?;
        c.req(self.tables.len() == n && self.q_lens.len() == n, || {
            format!(
                "{} block tables, {} kv lengths and {} query lengths must agree",
                self.tables.len(),
                n,
                self.q_lens.len()
            )
        })?;
        for b in 0..n {
            let (kv, q) = (self.kv_lens[b], self.q_lens[b]);
            c.req(q >= 1 && kv >= q, || {
                format!("sequence {b}: q_len = {q} must be >= 1 and <= kv_len = {kv}")
            })?;
            c.req(self.tables[b].len() * MLA_PAGE_TOKENS >= kv, || {
                format!(
                    "sequence {b}: {} pages cannot hold {kv} positions",
                    self.tables[b].len()
                )
            })?;
            c.req(kv <= i32::MAX as usize, || {
                format!("sequence {b}: kv_len = {kv} must fit in a 32-bit int")
            })?;
        }
        let total = self.total_q();
        c.req(total <= i32::MAX as usize, || {
            format!("{total} query tokens must fit in a 32-bit int")
        })?;
        let max_block = self.tables.iter().flatten().copied().max().unwrap_or(0);
        c.req(max_block <= i32::MAX as u32, || {
            format!("block id {max_block} must fit in a 32-bit int")
        })
    }

    /// Copies the layout to the device (block tables padded to the longest with -1).
    pub fn upload(&self, dev: &Device) -> Result<MlaBatch> {
        self.check()?;
        let batch = self.batch();
        let bt_stride = self.tables.iter().map(Vec::len).max().unwrap_or(0).max(1);
        let mut table = vec![-1i32; batch * bt_stride];
        for (b, t) in self.tables.iter().enumerate() {
            for (i, &id) in t.iter().enumerate() {
                table[b * bt_stride + i] = id as i32;
            }
        }
        let mut q_starts = Vec::with_capacity(batch + 1);
        q_starts.push(0i32);
        for &q in &self.q_lens {
            q_starts.push(q_starts.last().copied().unwrap_or(0) + q as i32);
        }
        let (token_seq, positions): (Vec<i32>, Vec<i32>) = self
            .token_positions()
            .into_iter()
            .map(|(b, pos)| (b as i32, pos as i32))
            .unzip();
        let kv: Vec<i32> = self.kv_lens.iter().map(|&v| v as i32).collect();
        Ok(MlaBatch {
            block_table: dev.upload(&table)?,
            bt_stride,
            seqlens_k: dev.upload(&kv)?,
            q_starts: dev.upload(&q_starts)?,
            positions: dev.upload(&positions)?,
            token_seq: dev.upload(&token_seq)?,
            batch,
            total_q: self.total_q(),
            max_q_len: self.max_q_len(),
        })
    }
}

/// A step layout on the device (from [`MlaLayout::upload`]): int32 block tables
/// `[batch][bt_stride]`, `seqlens_k[batch]`, `q_starts[batch + 1]`, and per new token its
/// position and sequence (for the cache write and q RoPE).
#[derive(Debug)]
pub struct MlaBatch {
    pub block_table: DeviceBuffer<i32>,
    pub bt_stride: usize,
    pub seqlens_k: DeviceBuffer<i32>,
    pub q_starts: DeviceBuffer<i32>,
    pub positions: DeviceBuffer<i32>,
    pub token_seq: DeviceBuffer<i32>,
    pub batch: usize,
    pub total_q: usize,
    pub max_q_len: usize,
}

/// One layer's paged latent cache: bf16 `[num_pages][64][kv_lora + rope]`.
#[derive(Debug)]
pub struct MlaCache {
    pub data: DeviceBuffer<bf16>,
    pub num_pages: usize,
    pub kv_lora: usize,
    pub rope: usize,
}

impl MlaCache {
    /// A zeroed cache of `num_pages` pages.
    pub fn new(dev: &Device, num_pages: usize, kv_lora: usize, rope: usize) -> Result<Self> {
        let len = num_pages
            .checked_mul(MLA_PAGE_TOKENS * (kv_lora + rope))
            .ok_or(CudaError::OutOfMemory { bytes: usize::MAX })?;
        Ok(MlaCache {
            data: dev.alloc_zeros(len)?,
            num_pages,
            kv_lora,
            rope,
        })
    }

    pub fn width(&self) -> usize {
        self.kv_lora + self.rope
    }
}

/// The RoPE table of a model on the device: YaRN-corrected `inv_freq[rope / 2]` (f32) and the
/// cos/sin multiplier, both derived from config.json (the model config's `rope_inv_freq` and
/// `rope_attention_factor`).
#[derive(Debug)]
pub struct MlaRope {
    pub inv_freq: DeviceBuffer<f32>,
    pub rope: usize,
    pub attention_factor: f32,
}

impl MlaRope {
    pub fn new(dev: &Device, inv_freq: &[f32], attention_factor: f32) -> Result<Self> {
        Ok(MlaRope {
            rope: 2 * inv_freq.len(),
            inv_freq: dev.upload(inv_freq)?,
            attention_factor,
        })
    }
}

// ------------------------------------------------------------------------------------------
// mla_cache_write
// ------------------------------------------------------------------------------------------

const CACHE_WRITE: &str = "mla_cache_write";

/// A cache write as plain numbers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MlaCacheWriteDesc {
    pub tokens: usize,
    pub kv_lora: usize,
    pub rope: usize,
    /// bf16 `[tokens][ld_kv]`: c_kv then k_pe.
    pub kv: Region,
    pub ld_kv: usize,
    /// bf16 `[kv_lora]`.
    pub norm_w: Region,
    /// f32 `[rope / 2]`.
    pub inv_freq: Region,
    /// i32 `[tokens]` each.
    pub positions: Region,
    pub token_seq: Region,
    /// i32 `[num_seqs][bt_stride]`.
    pub block_table: Region,
    pub num_seqs: usize,
    pub bt_stride: usize,
    /// bf16 `[num_pages][64][kv_lora + rope]`.
    pub cache: Region,
    pub num_pages: usize,
    pub eps: f32,
    pub attention_factor: f32,
}

impl MlaCacheWriteDesc {
    pub fn check(&self) -> Result<()> {
        let c = Checker {
            kernel: CACHE_WRITE,
        };
        let width = self.kv_lora + self.rope;
        c.req(self.tokens >= 1 && self.kv_lora >= 1, || {
            format!(
                "tokens ({}) and kv_lora ({}) must be >= 1",
                self.tokens, self.kv_lora
            )
        })?;
        c.req(self.rope % 2 == 0, || {
            format!("rope ({}) must be even (interleaved pairs)", self.rope)
        })?;
        c.req(self.ld_kv >= width, || {
            format!("ld_kv ({}) must be >= kv_lora + rope ({width})", self.ld_kv)
        })?;
        c.req(self.num_seqs >= 1 && self.bt_stride >= 1, || {
            format!(
                "num_seqs ({}) and bt_stride ({}) must be >= 1",
                self.num_seqs, self.bt_stride
            )
        })?;
        c.req(self.eps.is_finite() && self.eps >= 0.0, || {
            format!("eps ({}) must be finite and >= 0", self.eps)
        })?;
        c.req(self.attention_factor.is_finite(), || {
            format!(
                "attention_factor ({}) must be finite",
                self.attention_factor
            )
        })?;
        c.fits_i32(&[
            ("tokens", self.tokens),
            ("ld_kv", self.ld_kv),
            ("num_seqs", self.num_seqs),
            ("num_pages", self.num_pages),
            (
                "bt_stride * 64",
                self.bt_stride.saturating_mul(MLA_PAGE_TOKENS),
            ),
            ("kv_lora + rope", width),
        ])?;
        c.aligned("kv", self.kv, 2)?;
        c.aligned("norm_w", self.norm_w, 2)?;
        c.aligned("cache", self.cache, 2)?;
        for (name, r) in [
            ("inv_freq", self.inv_freq),
            ("positions", self.positions),
            ("token_seq", self.token_seq),
            ("block_table", self.block_table),
        ] {
            c.aligned(name, r, 4)?;
        }
        c.holds_matrix("kv", self.kv, self.tokens, width, self.ld_kv)?;
        c.holds("norm_w", self.norm_w, self.kv_lora, "[kv_lora]")?;
        c.holds("inv_freq", self.inv_freq, self.rope / 2, "[rope / 2]")?;
        c.holds("positions", self.positions, self.tokens, "[tokens]")?;
        c.holds("token_seq", self.token_seq, self.tokens, "[tokens]")?;
        c.holds(
            "block_table",
            self.block_table,
            self.num_seqs * self.bt_stride,
            "[num_seqs][bt_stride]",
        )?;
        c.holds(
            "cache",
            self.cache,
            self.num_pages * MLA_PAGE_TOKENS * width,
            "[num_pages][64][kv_lora + rope]",
        )
    }
}

impl KernelLaunch for MlaCacheWriteDesc {
    type Params = R1MlaCacheWriteParams;

    fn kernel(&self) -> &'static str {
        CACHE_WRITE
    }

    fn params(&self) -> Result<R1MlaCacheWriteParams> {
        Ok(R1MlaCacheWriteParams {
            kv: self.kv.addr,
            norm_w: self.norm_w.addr,
            inv_freq: self.inv_freq.addr,
            positions: self.positions.addr,
            token_seq: self.token_seq.addr,
            block_table: self.block_table.addr,
            cache: self.cache.addr,
            tokens: self.tokens as i32,
            kv_lora: self.kv_lora as i32,
            rope: self.rope as i32,
            ld_kv: self.ld_kv as i32,
            num_seqs: self.num_seqs as i32,
            bt_stride: self.bt_stride as i32,
            num_pages: self.num_pages as i32,
            eps: self.eps,
            attention_factor: self.attention_factor,
            reserved: 0,
        })
    }

    fn launch_config(&self) -> LaunchConfig {
        let per_block = (sys::R1_MLA_CACHE_WRITE_THREADS / 32) as usize;
        LaunchConfig {
            grid_dim: (self.tokens.div_ceil(per_block) as u32, 1, 1),
            block_dim: (sys::R1_MLA_CACHE_WRITE_THREADS, 1, 1),
            shared_mem_bytes: 0,
        }
    }
}

/// Writes the step's new tokens (`batch.total_q` rows of `kv`) into `cache`.
pub struct MlaCacheWriteArgs<'a> {
    /// kv_a_proj output, bf16 `[tokens][ld_kv]`: c_kv (kv_lora) then k_pe (rope), un-normed
    /// and un-roped.
    pub kv: &'a DeviceBuffer<bf16>,
    pub ld_kv: usize,
    /// kv_a_layernorm.weight, bf16 `[kv_lora]`.
    pub norm_w: &'a DeviceBuffer<bf16>,
    /// rms_norm_eps.
    pub eps: f32,
    pub rope: &'a MlaRope,
    pub batch: &'a MlaBatch,
    pub cache: &'a mut MlaCache,
}

impl MlaCacheWriteArgs<'_> {
    pub fn desc(&self) -> MlaCacheWriteDesc {
        MlaCacheWriteDesc {
            tokens: self.batch.total_q,
            kv_lora: self.cache.kv_lora,
            rope: self.cache.rope,
            kv: Region::from(self.kv),
            ld_kv: self.ld_kv,
            norm_w: Region::from(self.norm_w),
            inv_freq: Region {
                addr: self.rope.inv_freq.addr(),
                // A table for a different rope width fails the holds() check by length.
                len: if self.rope.rope == self.cache.rope {
                    self.rope.inv_freq.len()
                } else {
                    0
                },
            },
            positions: Region::from(&self.batch.positions),
            token_seq: Region::from(&self.batch.token_seq),
            block_table: Region::from(&self.batch.block_table),
            num_seqs: self.batch.batch,
            bt_stride: self.batch.bt_stride,
            cache: Region::from(&self.cache.data),
            num_pages: self.cache.num_pages,
            eps: self.eps,
            attention_factor: self.rope.attention_factor,
        }
    }
}

// ------------------------------------------------------------------------------------------
// mla_q_rope
// ------------------------------------------------------------------------------------------

const Q_ROPE: &str = "mla_q_rope";

/// A q RoPE as plain numbers: element `(t, h, i)` of src/dst at
/// `region.addr + 2 * (offset + t * ld_token + h * ld_head + i)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MlaQRopeDesc {
    pub tokens: usize,
    pub heads: usize,
    pub rope: usize,
    pub src: Region,
    pub src_offset: usize,
    pub src_ld_token: usize,
    pub src_ld_head: usize,
    pub dst: Region,
    pub dst_offset: usize,
    pub dst_ld_token: usize,
    pub dst_ld_head: usize,
    pub positions: Region,
    pub inv_freq: Region,
    pub attention_factor: f32,
}

impl MlaQRopeDesc {
    pub fn check(&self) -> Result<()> {
        let c = Checker { kernel: Q_ROPE };
        let (t, h, r) = (self.tokens, self.heads, self.rope);
        c.req(t >= 1 && h >= 1 && r >= 2 && r % 2 == 0, || {
            format!("tokens ({t}) and heads ({h}) must be >= 1 and rope ({r}) even and >= 2")
        })?;
        c.req(self.attention_factor.is_finite(), || {
            format!(
                "attention_factor ({}) must be finite",
                self.attention_factor
            )
        })?;
        c.fits_i32(&[
            ("tokens", t),
            ("heads", h),
            ("src_ld_token", self.src_ld_token),
            ("src_ld_head", self.src_ld_head),
            ("dst_ld_token", self.dst_ld_token),
            ("dst_ld_head", self.dst_ld_head),
        ])?;
        let pairs = t * h * (r / 2);
        c.req(
            pairs.div_ceil(sys::R1_MLA_Q_ROPE_THREADS as usize) <= i32::MAX as usize,
            || format!("{pairs} pairs exceed the grid limit"),
        )?;
        for (name, region, offset, ldt, ldh) in [
            (
                "src",
                self.src,
                self.src_offset,
                self.src_ld_token,
                self.src_ld_head,
            ),
            (
                "dst",
                self.dst,
                self.dst_offset,
                self.dst_ld_token,
                self.dst_ld_head,
            ),
        ] {
            c.aligned(name, region, 2)?;
            c.req(ldh >= r || h == 1, || {
                format!("{name}: ld_head ({ldh}) must be >= rope ({r}) with several heads")
            })?;
            let need = offset + (t - 1) * ldt + (h - 1) * ldh + r;
            c.holds(
                name,
                region,
                need,
                "offset + [tokens, heads, rope] at its strides",
            )?;
        }
        c.aligned("positions", self.positions, 4)?;
        c.aligned("inv_freq", self.inv_freq, 4)?;
        c.holds("positions", self.positions, t, "[tokens]")?;
        c.holds("inv_freq", self.inv_freq, r / 2, "[rope / 2]")
    }
}

impl KernelLaunch for MlaQRopeDesc {
    type Params = R1MlaQRopeParams;

    fn kernel(&self) -> &'static str {
        Q_ROPE
    }

    fn params(&self) -> Result<R1MlaQRopeParams> {
        Ok(R1MlaQRopeParams {
            src: self.src.addr + 2 * self.src_offset as u64,
            dst: self.dst.addr + 2 * self.dst_offset as u64,
            positions: self.positions.addr,
            inv_freq: self.inv_freq.addr,
            tokens: self.tokens as i32,
            heads: self.heads as i32,
            rope: self.rope as i32,
            src_ld_token: self.src_ld_token as i32,
            src_ld_head: self.src_ld_head as i32,
            dst_ld_token: self.dst_ld_token as i32,
            dst_ld_head: self.dst_ld_head as i32,
            attention_factor: self.attention_factor,
        })
    }

    fn launch_config(&self) -> LaunchConfig {
        let pairs = self.tokens * self.heads * (self.rope / 2);
        LaunchConfig {
            grid_dim: (
                pairs.div_ceil(sys::R1_MLA_Q_ROPE_THREADS as usize) as u32,
                1,
                1,
            ),
            block_dim: (sys::R1_MLA_Q_ROPE_THREADS, 1, 1),
            shared_mem_bytes: 0,
        }
    }
}

/// Ropes q_pe of the step's new tokens into the attention query buffer
/// `q [total_q][heads][kv_lora + rope]` (columns kv_lora..): from `src` or, with
/// `src: None`, in place.
pub struct MlaQRopeArgs<'a> {
    /// `(buffer, offset, ld_token, ld_head)`: element (t, h, i) of the un-roped q_pe at
    /// `offset + t * ld_token + h * ld_head + i`; for q_b_proj's output `[tokens][heads][192]`
    /// that is `(qb, qk_nope, heads * 192, 192)`.
    pub src: Option<(&'a DeviceBuffer<bf16>, usize, usize, usize)>,
    pub q: &'a mut DeviceBuffer<bf16>,
    pub heads: usize,
    pub kv_lora: usize,
    pub rope: &'a MlaRope,
    pub batch: &'a MlaBatch,
}

impl MlaQRopeArgs<'_> {
    pub fn desc(&self) -> MlaQRopeDesc {
        let r = self.rope.rope;
        let width = self.kv_lora + r;
        let q = Region::from(&*self.q);
        let (src, src_offset, src_ld_token, src_ld_head) = match self.src {
            Some((buf, offset, ld_token, ld_head)) => {
                (Region::from(buf), offset, ld_token, ld_head)
            }
            None => (q, self.kv_lora, self.heads * width, width),
        };
        MlaQRopeDesc {
            tokens: self.batch.total_q,
            heads: self.heads,
            rope: r,
            src,
            src_offset,
            src_ld_token,
            src_ld_head,
            dst: q,
            dst_offset: self.kv_lora,
            dst_ld_token: self.heads * width,
            dst_ld_head: width,
            positions: Region::from(&self.batch.positions),
            inv_freq: Region::from(&self.rope.inv_freq),
            attention_factor: self.rope.attention_factor,
        }
    }
}

impl Mla {
    pub fn prepare_cache_write<'a>(&'a self, args: MlaCacheWriteArgs<'a>) -> Result<Prepared<'a>> {
        let desc = args.desc();
        desc.check()?;
        Prepared::single(&self.dev, &desc)
    }

    /// rmsnorm(c_kv) * w | rope(k_pe) of every new token into its cache slot (queued).
    pub fn cache_write(&self, args: MlaCacheWriteArgs<'_>) -> Result<()> {
        self.prepare_cache_write(args)?.launch()
    }

    pub fn prepare_q_rope<'a>(&'a self, args: MlaQRopeArgs<'a>) -> Result<Prepared<'a>> {
        let desc = args.desc();
        desc.check()?;
        Prepared::single(&self.dev, &desc)
    }

    /// RoPE of q_pe into the query buffer (queued).
    pub fn q_rope(&self, args: MlaQRopeArgs<'_>) -> Result<()> {
        self.prepare_q_rope(args)?.launch()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::ops::err_of;

    const KV_LORA: usize = 512;
    const ROPE: usize = 64;
    const WIDTH: usize = KV_LORA + ROPE;

    #[test]
    fn host_checks_cache_write_and_q_rope() {
        let r = |addr: u64, len: usize| Region { addr, len };
        let good = MlaCacheWriteDesc {
            tokens: 3,
            kv_lora: KV_LORA,
            rope: ROPE,
            kv: r(0x1000, 3 * WIDTH),
            ld_kv: WIDTH,
            norm_w: r(0x8000, KV_LORA),
            inv_freq: r(0x9000, ROPE / 2),
            positions: r(0xA000, 3),
            token_seq: r(0xB000, 3),
            block_table: r(0xC000, 2 * 4),
            num_seqs: 2,
            bt_stride: 4,
            cache: r(0x10_0000, 8 * 64 * WIDTH),
            num_pages: 8,
            eps: 1e-6,
            attention_factor: 1.0,
        };
        good.check().unwrap();
        let mut x = good;
        x.rope = 63;
        assert!(err_of(x.check()).contains("rope (63) must be even"));
        let mut x = good;
        x.ld_kv = WIDTH - 1;
        x.kv.len = usize::MAX;
        assert!(err_of(x.check()).contains("ld_kv (575) must be >= kv_lora + rope (576)"));
        let mut x = good;
        x.cache.len -= 1;
        assert!(err_of(x.check()).starts_with("mla_cache_write: cache holds"));
        let mut x = good;
        x.positions.addr += 2;
        assert!(err_of(x.check()).contains("positions"));

        let q = MlaQRopeDesc {
            tokens: 3,
            heads: 16,
            rope: ROPE,
            src: r(0x1000, 3 * 16 * 192),
            src_offset: 128,
            src_ld_token: 16 * 192,
            src_ld_head: 192,
            dst: r(0x10_0000, 3 * 16 * WIDTH),
            dst_offset: KV_LORA,
            dst_ld_token: 16 * WIDTH,
            dst_ld_head: WIDTH,
            positions: r(0x20_0000, 3),
            inv_freq: r(0x30_0000, 32),
            attention_factor: 1.0,
        };
        q.check().unwrap();
        let mut x = q;
        x.src.len -= 1;
        assert!(err_of(x.check()).contains("src holds"));
        let mut x = q;
        x.dst_ld_head = 32;
        assert!(err_of(x.check()).contains("dst: ld_head (32) must be >= rope (64)"));
    }

    #[test]
    fn layout_checks_and_positions() {
        // Sequence 0 continues at position 70 with 2 tokens, sequence 1 starts with 3.
        let l = MlaLayout {
            tables: vec![vec![3, 1], vec![0]],
            kv_lens: vec![72, 3],
            q_lens: vec![2, 3],
        };
        assert_eq!(l.kv_lens, vec![72, 3]);
        assert_eq!(l.q_lens, vec![2, 3]);
        assert_eq!(l.total_q(), 5);
        assert_eq!(l.max_q_len(), 3);
        assert_eq!(
            l.token_positions(),
            vec![(0, 70), (0, 71), (1, 0), (1, 1), (1, 2)]
        );
        l.check().unwrap();
        let mut bad = l.clone();
        bad.kv_lens[0] = 129;
        assert!(err_of(bad.check()).contains("2 pages cannot hold 129 positions"));
        let mut bad = l.clone();
        bad.q_lens[1] = 4;
        assert!(err_of(bad.check()).contains("q_len = 4 must be >= 1 and <= kv_len = 3"));
        let decode = MlaLayout::decode(vec![vec![0], vec![1, 2]], vec![10, 100], 2);
        assert_eq!(decode.total_q(), 4);
        decode.check().unwrap();
    }
}
