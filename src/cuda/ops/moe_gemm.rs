//! Grouped FP8 block-scaled GEMM for the MoE experts (w8a8, the numerics of
//! [`super::fp8_gemm`]): D[row] = A[row] x W[expert(row)]^T over the flat rows of a
//! [`MoeLayout`], with the stacked expert weights of a [`GroupedFp8Weight`]. Kernels
//! (cuda/moe_gemm.cu): `moe_gemm_contig_wgmma` (contiguous, BLOCK_M 128),
//! `moe_gemm_masked_wgmma` (masked, BLOCK_M 128), `moe_gemm_masked_wgmma_m64` (masked,
//! BLOCK_M 64) and `moe_gemm_ref` (CUDA cores, entry-driven, any layout and shape: the GPU-side
//! reference and the fallback). The wgmma kernels find their tiles on the device, so the
//! launch needs no host synchronization.

use cudarc::driver::LaunchConfig;
use half::bf16;

use super::fp8_gemm::PipelineOperands;
use super::moe::{MoeGeometry, MoeLayout, MoeOps};
use super::moe_permute::{MoePlanBuffers, PermutedRows};
use super::{Checker, Region, QUANT_BLOCK};
use crate::cuda::error::{CudaError, Result};
use crate::cuda::heuristics::{self, Choice};
use crate::cuda::launch::{KernelLaunch, Prepared};
use crate::cuda::sys::{self, R1MoeGemmParams, R1MoeGemmRefParams};
use crate::cuda::{Device, DeviceBuffer};

/// Which kernel runs a grouped GEMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GroupedGemmKernel {
    /// Contiguous: `ContigWgmma`; masked: `MaskedWgmmaM64` when the average rows per expert
    /// (tokens * top_k / experts) is <= 64, else `MaskedWgmma`; the reference kernel when the
    /// shape is not the fast path's.
    Auto,
    ContigWgmma,
    MaskedWgmma,
    MaskedWgmmaM64,
    Reference,
}

impl GroupedGemmKernel {
    pub fn name(self) -> &'static str {
        match self {
            GroupedGemmKernel::Auto => "moe_gemm",
            GroupedGemmKernel::ContigWgmma => "moe_gemm_contig_wgmma",
            GroupedGemmKernel::MaskedWgmma => "moe_gemm_masked_wgmma",
            GroupedGemmKernel::MaskedWgmmaM64 => "moe_gemm_masked_wgmma_m64",
            GroupedGemmKernel::Reference => "moe_gemm_ref",
        }
    }

    fn block_m(self) -> u32 {
        match self {
            GroupedGemmKernel::MaskedWgmmaM64 => sys::R1_FP8_GEMM_M64_BLOCK_M,
            _ => sys::R1_FP8_GEMM_BLOCK_M,
        }
    }
}

/// A grouped GEMM call as plain numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupedGemmDesc {
    pub geom: MoeGeometry,
    /// Tokens routed by this call (the reference kernel walks their entries).
    pub tokens: usize,
    pub n: usize,
    pub k: usize,
    /// fp8 `[R][lda]` flat rows; SA scales `[ceil(k/128)][r_pad]`.
    pub a: Region,
    pub lda: usize,
    pub sa: Region,
    /// Stacked weights: fp8 `[E][n][k]`, multipliers `[E][ceil(n/128)][ceil(k/128)]`.
    pub b: Region,
    pub sb: Region,
    /// bf16 `[R][ldd]`.
    pub d: Region,
    pub ldd: usize,
    /// moe_plan's outputs.
    pub dest_row: Region,
    pub topk_ids: Region,
    pub counts: Region,
    pub block_expert: Region,
    pub block_rows: Region,
    pub num_blocks: Region,
}

impl GroupedGemmDesc {
    /// The kernel `kernel` resolves to, after checking every requirement it documents.
    pub fn resolve(&self, kernel: GroupedGemmKernel) -> Result<GroupedGemmKernel> {
        use GroupedGemmKernel as K;
        let layout_kernel = |k: K| -> Result<()> {
            let ok = match self.geom.layout {
                MoeLayout::Contiguous => k == K::ContigWgmma,
                MoeLayout::Masked { .. } => matches!(k, K::MaskedWgmma | K::MaskedWgmmaM64),
            };
            Checker { kernel: k.name() }.req(ok, || {
                format!("does not take the {:?} layout", self.geom.layout)
            })
        };
        match kernel {
            K::Auto => {
                self.check_common(K::Reference)?;
                Ok(heuristics::grouped_gemm_kernel(&self.geom, |fast| {
                    self.check_fast(fast).is_ok()
                }))
            }
            K::Reference => {
                self.check_common(kernel)?;
                Ok(kernel)
            }
            _ => {
                layout_kernel(kernel)?;
                self.check_common(kernel)?;
                self.check_fast(kernel)?;
                Ok(kernel)
            }
        }
    }

    fn check_common(&self, kernel: GroupedGemmKernel) -> Result<()> {
        let c = Checker {
            kernel: kernel.name(),
        };
        let g = &self.geom;
        g.check(kernel.name())?;
        let (n, k, e) = (self.n, self.k, g.experts);
        c.req(n >= 1 && k >= 1, || {
            format!("N and K must be >= 1 (N = {n}, K = {k})")
        })?;
        c.req(self.tokens >= 1 && self.tokens <= g.tokens, || {
            format!("tokens = {} must be in 1..={}", self.tokens, g.tokens)
        })?;
        c.fits_i32(&[
            ("N", n),
            ("K", k),
            ("lda", self.lda),
            ("ldd", self.ldd),
            ("E * N", e.saturating_mul(n)),
        ])?;
        c.gemm_strides(k, n, &[("lda", self.lda)], ("ldd", self.ldd))?;
        c.aligned("sa", self.sa, 4)?;
        c.aligned("sb", self.sb, 4)?;
        c.aligned("D", self.d, 2)?;
        let (rows, r_pad) = (g.rows(), g.r_pad());
        let kb = k.div_ceil(QUANT_BLOCK);
        c.holds_matrix("A", self.a, rows, k, self.lda)?;
        c.holds("sa", self.sa, kb * r_pad, "[ceil(K/128)][r_pad]")?;
        c.holds("B", self.b, e * n * k, "[E][N][K]")?;
        c.holds(
            "sb",
            self.sb,
            e * n.div_ceil(QUANT_BLOCK) * kb,
            "[E][ceil(N/128)][ceil(K/128)]",
        )?;
        c.holds_matrix("D", self.d, rows, n, self.ldd)?;
        let entries = self.tokens * g.top_k;
        c.holds("dest_row", self.dest_row, entries, "[tokens * top_k]")?;
        c.holds("topk_ids", self.topk_ids, entries, "[tokens * top_k]")?;
        if kernel == GroupedGemmKernel::Reference {
            c.req(entries.div_ceil(16) <= 65535, || {
                format!("{entries} entries exceed the reference kernel's grid (65535 * 16)")
            })?;
        }
        Ok(())
    }

    fn check_fast(&self, kernel: GroupedGemmKernel) -> Result<()> {
        let c = Checker {
            kernel: kernel.name(),
        };
        let n = self.n;
        c.req(n % 128 == 0, || {
            format!("N must be a multiple of 128 (N = {n})")
        })?;
        match self.geom.layout {
            MoeLayout::Contiguous => {
                let mb = self.geom.max_blocks();
                c.holds("block_expert", self.block_expert, mb, "[max_blocks]")?;
                c.holds("block_rows", self.block_rows, mb, "[max_blocks]")?;
                c.holds("num_blocks", self.num_blocks, 1, "one word")?;
            }
            MoeLayout::Masked { .. } => {
                c.holds("counts", self.counts, self.geom.experts, "[experts]")?;
            }
        }
        self.pipeline_operands(kernel).check(kernel.name())
    }

    /// The flat rows against every expert's weight rows stacked: B `[E * N][K]`.
    fn pipeline_operands(&self, kernel: GroupedGemmKernel) -> PipelineOperands {
        PipelineOperands {
            block_m: kernel.block_m(),
            k: self.k,
            a: self.a,
            a_rows: self.geom.rows(),
            lda: self.lda,
            sa: self.sa,
            sa_pad: self.geom.r_pad(),
            b: self.b,
            b_rows: self.geom.experts * self.n,
            ldb: self.k,
            d: self.d,
            ldd: self.ldd,
        }
    }

    /// Upper bound of the wgmma kernels' tiles (the device finds the real count).
    pub fn max_tiles(&self, kernel: GroupedGemmKernel) -> usize {
        let nb = self.n.div_ceil(128);
        match self.geom.layout {
            MoeLayout::Contiguous => self.geom.max_blocks() * nb,
            MoeLayout::Masked {
                max_tokens_per_expert,
            } => {
                let per_expert = max_tokens_per_expert.div_ceil(kernel.block_m() as usize);
                self.geom.entries().min(self.geom.experts * per_expert) * nb
            }
        }
    }
}

/// Stacked expert weights: codes `[E][n][k]`, multipliers `[E][ceil(n/128)][ceil(k/128)]`.
#[derive(Debug)]
pub struct GroupedFp8Weight {
    pub codes: DeviceBuffer<u8>,
    pub scales: DeviceBuffer<f32>,
    pub experts: usize,
    pub n: usize,
    pub k: usize,
}

/// One expert's weight in the checkpoint layout: codes `[n][k]`, multipliers
/// `[ceil(n/128)][ceil(k/128)]`.
pub type ExpertWeight<'a> = (&'a [u8], &'a [f32]);

impl GroupedFp8Weight {
    /// Host-side stacking of per-expert weights (each `[n][k]`).
    pub fn stack(experts: &[ExpertWeight<'_>], n: usize, k: usize) -> Result<(Vec<u8>, Vec<f32>)> {
        let blocks = n.div_ceil(QUANT_BLOCK) * k.div_ceil(QUANT_BLOCK);
        let mut codes = Vec::with_capacity(experts.len() * n * k);
        let mut scales = Vec::with_capacity(experts.len() * blocks);
        for (i, (c, s)) in experts.iter().enumerate() {
            if c.len() != n * k || s.len() != blocks {
                return Err(CudaError::requirement(
                    "grouped fp8 weight",
                    format!(
                        "expert {i}: codes must be [{n}, {k}] and scales {blocks}; got {} and {}",
                        c.len(),
                        s.len()
                    ),
                ));
            }
            codes.extend_from_slice(c);
            scales.extend_from_slice(s);
        }
        Ok((codes, scales))
    }

    /// Host-side stacking of gate and up (each `[inter][k]`) into one `[2 inter][k]` weight
    /// per expert: rows [0, inter) gate, [inter, 2 inter) up. Needs inter % 128 == 0 (so no
    /// 128-row scale block straddles gate and up).
    pub fn stack_gate_up(
        gate: &[ExpertWeight<'_>],
        up: &[ExpertWeight<'_>],
        inter: usize,
        k: usize,
    ) -> Result<(Vec<u8>, Vec<f32>)> {
        if inter % QUANT_BLOCK != 0 || gate.len() != up.len() {
            return Err(CudaError::requirement(
                "grouped fp8 weight",
                format!(
                    "gate+up stacking needs moe_intermediate % 128 == 0 (got {inter}) and as many \
                     gate as up weights ({} vs {})",
                    gate.len(),
                    up.len()
                ),
            ));
        }
        let mut parts = Vec::with_capacity(2 * gate.len());
        for (g, u) in gate.iter().zip(up) {
            parts.push(*g);
            parts.push(*u);
        }
        // [g0; u0; g1; u1; ...] stacked as experts of `inter` rows = experts of 2*inter rows.
        GroupedFp8Weight::stack(&parts, inter, k)
    }

    pub fn upload(
        dev: &Device,
        codes: &[u8],
        scales: &[f32],
        experts: usize,
        n: usize,
        k: usize,
    ) -> Result<Self> {
        let blocks = n.div_ceil(QUANT_BLOCK) * k.div_ceil(QUANT_BLOCK);
        if codes.len() != experts * n * k || scales.len() != experts * blocks {
            return Err(CudaError::requirement(
                "grouped fp8 weight",
                format!(
                    "codes must be [{experts}][{n}][{k}] and scales [{experts}][{blocks}]; got {} \
                     and {}",
                    codes.len(),
                    scales.len()
                ),
            ));
        }
        Ok(GroupedFp8Weight {
            codes: dev.upload(codes)?,
            scales: dev.upload(scales)?,
            experts,
            n,
            k,
        })
    }
}

/// A grouped GEMM over caller-owned buffers.
pub struct GroupedGemmArgs<'a> {
    pub tokens: usize,
    pub a: &'a PermutedRows,
    pub w: &'a GroupedFp8Weight,
    pub topk_ids: &'a DeviceBuffer<i32>,
    pub plan: &'a MoePlanBuffers,
    pub d: &'a mut DeviceBuffer<bf16>,
    pub ldd: usize,
}

impl GroupedGemmArgs<'_> {
    pub fn desc(&self) -> GroupedGemmDesc {
        GroupedGemmDesc {
            geom: self.plan.geom,
            tokens: self.tokens,
            n: self.w.n,
            k: self.w.k,
            a: Region::from(&self.a.q),
            lda: self.a.k,
            sa: Region::from(&self.a.scales),
            b: Region::from(&self.w.codes),
            sb: Region::from(&self.w.scales),
            d: Region::from(&*self.d),
            ldd: self.ldd,
            dest_row: Region::from(&self.plan.dest_row),
            topk_ids: Region::from(self.topk_ids),
            counts: Region::from(&self.plan.counts),
            block_expert: Region::from(&self.plan.block_expert),
            block_rows: Region::from(&self.plan.block_rows),
            num_blocks: Region::from(&self.plan.num_blocks),
        }
    }
}

/// The reference kernel's launch of a resolved call.
struct RefLaunch(GroupedGemmDesc);

impl KernelLaunch for RefLaunch {
    type Params = R1MoeGemmRefParams;

    fn kernel(&self) -> &'static str {
        GroupedGemmKernel::Reference.name()
    }

    fn params(&self) -> Result<R1MoeGemmRefParams> {
        let d = &self.0;
        Ok(R1MoeGemmRefParams {
            a: d.a.addr,
            b: d.b.addr,
            sa: d.sa.addr,
            sb: d.sb.addr,
            d: d.d.addr,
            dest_row: d.dest_row.addr,
            expert_of: d.topk_ids.addr,
            entries: (d.tokens * d.geom.top_k) as i32,
            experts: d.geom.experts as i32,
            n: d.n as i32,
            k: d.k as i32,
            lda: d.lda as i32,
            ldb: d.k as i32,
            ldd: d.ldd as i32,
            m_pad: d.geom.r_pad() as i32,
        })
    }

    fn launch_config(&self) -> LaunchConfig {
        let d = &self.0;
        LaunchConfig {
            grid_dim: (
                d.n.div_ceil(16) as u32,
                (d.tokens * d.geom.top_k).div_ceil(16) as u32,
                1,
            ),
            block_dim: (16, 16, 1),
            shared_mem_bytes: 0,
        }
    }
}

/// A wgmma kernel's launch of a resolved call on `ctas` persistent CTAs.
struct WgmmaLaunch {
    desc: GroupedGemmDesc,
    kernel: GroupedGemmKernel,
    ctas: usize,
}

impl KernelLaunch for WgmmaLaunch {
    type Params = R1MoeGemmParams;

    fn kernel(&self) -> &'static str {
        self.kernel.name()
    }

    fn params(&self) -> Result<R1MoeGemmParams> {
        let (d, name) = (&self.desc, self.kernel.name());
        let [ta, tb, tsa] = d.pipeline_operands(self.kernel).tensor_maps();
        Ok(R1MoeGemmParams {
            tmap_a: ta.encode(name)?,
            tmap_b: tb.encode(name)?,
            tmap_sa: tsa.encode(name)?,
            sb: d.sb.addr,
            d: d.d.addr,
            block_expert: d.block_expert.addr,
            block_rows: d.block_rows.addr,
            num_blocks: d.num_blocks.addr,
            counts: d.counts.addr,
            n: d.n as i32,
            k: d.k as i32,
            ldd: d.ldd as i32,
            experts: d.geom.experts as i32,
            max_blocks: d.geom.max_blocks() as i32,
            max_tokens_per_expert: d.geom.max_tokens_per_expert() as i32,
        })
    }

    fn launch_config(&self) -> LaunchConfig {
        let (threads, smem) = if self.kernel == GroupedGemmKernel::MaskedWgmmaM64 {
            (
                sys::R1_MOE_GEMM_M64_THREADS,
                sys::R1_MOE_GEMM_M64_SMEM_BYTES,
            )
        } else {
            (sys::R1_MOE_GEMM_THREADS, sys::R1_MOE_GEMM_SMEM_BYTES)
        };
        LaunchConfig {
            grid_dim: (self.ctas as u32, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: smem,
        }
    }
}

impl MoeOps {
    /// Checks `args` for `kernel`, resolves Auto, encodes the tensor maps and builds the
    /// launch (persistent grid = #SMs, capped by the tile bound). No work is queued.
    pub fn prepare_grouped_gemm<'a>(
        &'a self,
        args: GroupedGemmArgs<'a>,
        kernel: GroupedGemmKernel,
    ) -> Result<Prepared<'a, GroupedGemmKernel>> {
        let desc = args.desc();
        let kernel = desc.resolve(kernel)?;
        let choice = |ctas| Choice::GroupedGemm {
            layout: desc.geom.layout,
            tokens: desc.tokens,
            n: desc.n,
            k: desc.k,
            kernel,
            ctas,
        };
        let prepared = Prepared::new(&self.dev, kernel);
        if kernel == GroupedGemmKernel::Reference {
            heuristics::report(&choice(None));
            return prepared.then(&RefLaunch(desc));
        }
        let ctas = heuristics::persistent_ctas(desc.max_tiles(kernel), self.dev.info());
        heuristics::report(&choice(Some(ctas)));
        prepared.then(&WgmmaLaunch { desc, kernel, ctas })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::launch::row_symbol;

    fn desc(layout: MoeLayout, tokens: usize, n: usize, k: usize) -> GroupedGemmDesc {
        let geom = MoeGeometry {
            tokens,
            top_k: 8,
            experts: 256,
            layout,
        };
        let (rows, r_pad) = (geom.rows(), geom.r_pad());
        let r = |addr: u64, len: usize| Region { addr, len };
        let e = geom.entries();
        GroupedGemmDesc {
            geom,
            tokens,
            n,
            k,
            a: r(0x1_0000_0000, rows * k),
            lda: k,
            sa: r(0x2_0000_0000, k.div_ceil(128) * r_pad),
            b: r(0x3_0000_0000, 256 * n * k),
            sb: r(0x4_0000_0000, 256 * n.div_ceil(128) * k.div_ceil(128)),
            d: r(0x5_0000_0000, rows * n),
            ldd: n,
            dest_row: r(0x6000, e),
            topk_ids: r(0x7000, e),
            counts: r(0x8000, 256),
            block_expert: r(0x9000, geom.max_blocks()),
            block_rows: r(0xA000, geom.max_blocks()),
            num_blocks: r(0xB000, 1),
        }
    }

    /// Each resolved kernel's launch pairs with its kernel-table row.
    #[test]
    fn launches_pair_with_their_rows() {
        use GroupedGemmKernel as K;
        let d = desc(MoeLayout::Contiguous, 4, 256, 256);
        assert_eq!(row_symbol(&RefLaunch(d)), K::Reference.name());
        for kernel in [K::ContigWgmma, K::MaskedWgmma, K::MaskedWgmmaM64] {
            let l = WgmmaLaunch {
                desc: d,
                kernel,
                ctas: 132,
            };
            assert_eq!(row_symbol(&l), kernel.name());
        }
    }

    #[test]
    fn auto_picks_by_layout_and_load() {
        use GroupedGemmKernel as K;
        let masked = |m| MoeLayout::Masked {
            max_tokens_per_expert: m,
        };
        assert_eq!(
            desc(MoeLayout::Contiguous, 4096, 4096, 7168)
                .resolve(K::Auto)
                .unwrap(),
            K::ContigWgmma
        );
        assert_eq!(
            desc(masked(128), 128, 4096, 7168).resolve(K::Auto).unwrap(),
            K::MaskedWgmmaM64
        );
        assert_eq!(
            desc(masked(4096), 4096, 7168, 2048)
                .resolve(K::Auto)
                .unwrap(),
            K::MaskedWgmma
        );
        // Ragged N: the reference kernel.
        assert_eq!(
            desc(MoeLayout::Contiguous, 3, 200, 256)
                .resolve(K::Auto)
                .unwrap(),
            K::Reference
        );
        let e = desc(MoeLayout::Contiguous, 3, 200, 256)
            .resolve(K::ContigWgmma)
            .unwrap_err()
            .to_string();
        assert!(e.contains("N must be a multiple of 128"), "{e}");
        let e = desc(masked(4), 4, 256, 256)
            .resolve(K::ContigWgmma)
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not take the Masked"), "{e}");
        let mut d = desc(MoeLayout::Contiguous, 5, 256, 256);
        d.block_rows.len = 1;
        assert!(d
            .resolve(K::ContigWgmma)
            .unwrap_err()
            .to_string()
            .contains("block_rows holds 1"));
        assert_eq!(d.resolve(K::Auto).unwrap(), K::Reference);
        let mut d = desc(MoeLayout::Contiguous, 5, 256, 256);
        d.sb.len -= 1;
        assert!(d
            .resolve(K::Auto)
            .unwrap_err()
            .to_string()
            .contains("sb holds"));
    }

    /// A port of the masked wgmma kernel's schedule (warp 0's prefix over the experts'
    /// M-blocks, each tile's binary search): every (expert, M-block, N-block) with valid rows
    /// is visited exactly once, with the right row range.
    #[test]
    #[allow(clippy::needless_range_loop)] // loops mirror the kernel's lane ids
    fn masked_schedule_covers_every_tile_once() {
        for (counts, m, bm, n_blocks) in [
            (vec![0, 3, 0, 0, 130, 1, 0, 64], 130usize, 64usize, 3usize),
            (vec![1; 256], 1, 64, 32),
            (
                vec![0; 255].into_iter().chain([200]).collect::<Vec<_>>(),
                200,
                128,
                2,
            ),
            ((0..512).map(|i| (i * 7) % 5).collect(), 4, 64, 1),
        ] {
            let e = counts.len();
            // Warp 0: lanes own contiguous runs of experts, then an exclusive scan.
            let per = e.div_ceil(32);
            let mut s_cnt = vec![0usize; e];
            let mut s_pre = vec![0usize; e + 1];
            let mut locals = vec![0usize; 32];
            for lane in 0..32 {
                let (e0, e1) = ((lane * per).min(e), (lane * per + per).min(e));
                for x in e0..e1 {
                    s_cnt[x] = counts[x].min(m);
                    locals[lane] += s_cnt[x].div_ceil(bm);
                }
            }
            let mut run = 0;
            for lane in 0..32 {
                let (e0, e1) = ((lane * per).min(e), (lane * per + per).min(e));
                for x in e0..e1 {
                    s_pre[x] = run;
                    run += s_cnt[x].div_ceil(bm);
                }
                assert_eq!(run, locals[..=lane].iter().sum::<usize>());
            }
            s_pre[e] = run;
            let tiles = s_pre[e] * n_blocks;
            let mut seen = std::collections::HashSet::new();
            for t in 0..tiles {
                let gm = t / n_blocks;
                let (mut lo, mut hi) = (0usize, e - 1);
                while lo < hi {
                    let mid = (lo + hi).div_ceil(2);
                    if s_pre[mid] <= gm {
                        lo = mid;
                    } else {
                        hi = mid - 1;
                    }
                }
                let x = lo;
                let mbe = s_pre[x + 1] - s_pre[x];
                assert!(mbe > 0, "tile {t} mapped to empty expert {x}");
                let l = t - s_pre[x] * n_blocks;
                let (mb, nb) = (l % mbe, l / mbe);
                let rows = bm.min(s_cnt[x] - mb * bm);
                assert!(rows >= 1 && nb < n_blocks);
                assert!(seen.insert((x, mb, nb)), "tile {t} repeats {x} {mb} {nb}");
            }
            let want: usize =
                counts.iter().map(|&c| c.min(m).div_ceil(bm)).sum::<usize>() * n_blocks;
            assert_eq!(seen.len(), want);
        }
    }

    #[test]
    fn gate_up_stacking_interleaves_experts() {
        let (inter, k) = (128, 128);
        let g: Vec<(Vec<u8>, Vec<f32>)> = (0..2)
            .map(|e| (vec![e as u8; inter * k], vec![e as f32]))
            .collect();
        let u: Vec<(Vec<u8>, Vec<f32>)> = (0..2)
            .map(|e| (vec![10 + e as u8; inter * k], vec![10.0 + e as f32]))
            .collect();
        let gr: Vec<ExpertWeight<'_>> = g.iter().map(|(c, s)| (&c[..], &s[..])).collect();
        let ur: Vec<ExpertWeight<'_>> = u.iter().map(|(c, s)| (&c[..], &s[..])).collect();
        let (codes, scales) = GroupedFp8Weight::stack_gate_up(&gr, &ur, inter, k).unwrap();
        assert_eq!(scales, vec![0.0, 10.0, 1.0, 11.0]);
        assert_eq!(codes[0], 0);
        assert_eq!(codes[inter * k], 10);
        assert_eq!(codes[2 * inter * k], 1);
        assert!(GroupedFp8Weight::stack_gate_up(&gr, &ur, 96, k).is_err());
    }
}
