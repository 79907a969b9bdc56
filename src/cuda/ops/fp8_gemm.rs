//! FP8 block-scaled GEMM, w8a8: D[M,N] (bf16) = A[M,K] (fp8, 1x128 scales, SA layout) x
//! B[N,K]^T (fp8, 128x128 scales), f32 promotion every 128 of K. Three kernels
//! (cuda/fp8_gemm.cu): `fp8_gemm_wgmma` (BLOCK_M 128, large M), `fp8_gemm_wgmma_m64`
//! (BLOCK_M 64, small M / decode) and `fp8_gemm_ref` (CUDA cores, any shape: the GPU-side
//! reference and the fallback). [`GemmKernel::Auto`] picks a wgmma kernel when the shape meets
//! the fast path's requirements and the reference kernel otherwise.
//!
//! Split-K: with a [`SplitKWorkspace`] ([`Fp8GemmArgs::with_split_k`]) the wgmma kernels split
//! each tile's K-blocks over several CTAs where [`heuristics::split_k`] says the tiles leave
//! SMs idle (decode shapes), and reduce the splits in a fixed order: deterministic, no float
//! atomics ("Split-K" in cuda/params/common.h). [`Fp8GemmArgs::with_splits`] forces a count;
//! the reference kernel then sums in the same order, bit-exact with
//! [`crate::numerics::block_gemm_w8a8_splits`]'s order of the split totals.

use cudarc::driver::LaunchConfig;
use half::bf16;

use super::{Checker, QuantizedActivations, Region, SplitKDesc, SplitKWorkspace, QUANT_BLOCK};
use crate::cuda::error::{CudaError, Result};
use crate::cuda::heuristics::{self, Choice, GemmTiling};
use crate::cuda::launch::{KernelLaunch, Prepared};
use crate::cuda::sys::{self, R1Fp8GemmParams, R1Fp8GemmRefParams};
use crate::cuda::tma::{TensorMap2d, TmaElem};
use crate::cuda::{Device, DeviceBuffer};

/// Which kernel runs a GEMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GemmKernel {
    /// wgmma when the shape allows it (`WgmmaM64` for M <= 64, else `Wgmma`), else `Reference`.
    Auto,
    /// `fp8_gemm_wgmma`: TMA + wgmma, BLOCK_M 128, persistent.
    Wgmma,
    /// `fp8_gemm_wgmma_m64`: the same with BLOCK_M 64.
    WgmmaM64,
    /// `fp8_gemm_ref`: one thread per output, sequential fmaf; any shape.
    Reference,
}

impl GemmKernel {
    /// The kernel's name in cuda/fp8_gemm.cu ("fp8_gemm" for Auto).
    pub fn name(self) -> &'static str {
        match self {
            GemmKernel::Auto => "fp8_gemm",
            GemmKernel::Wgmma => "fp8_gemm_wgmma",
            GemmKernel::WgmmaM64 => "fp8_gemm_wgmma_m64",
            GemmKernel::Reference => "fp8_gemm_ref",
        }
    }

    fn block_m(self) -> usize {
        match self {
            GemmKernel::WgmmaM64 => sys::R1_FP8_GEMM_M64_BLOCK_M as usize,
            _ => sys::R1_FP8_GEMM_BLOCK_M as usize,
        }
    }

    /// The tiling of a wgmma kernel (what split-K is chosen and sized by); None otherwise.
    pub fn tiling(self) -> Option<GemmTiling> {
        match self {
            GemmKernel::Wgmma => Some(heuristics::FP8_TILING),
            GemmKernel::WgmmaM64 => Some(heuristics::FP8_TILING_M64),
            GemmKernel::Auto | GemmKernel::Reference => None,
        }
    }
}

/// The operands of the wgmma pipeline (cuda/fp8_gemm_pipeline.cuh), shared by the dense and
/// the grouped MoE kernels: A `[a_rows][lda]` fp8 with SA scales `[K/128][sa_pad]`, B
/// `[b_rows][ldb]` fp8 (K-major), D bf16 with row stride `ldd`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PipelineOperands {
    pub block_m: u32,
    pub k: usize,
    pub a: Region,
    pub a_rows: usize,
    pub lda: usize,
    pub sa: Region,
    pub sa_pad: usize,
    pub b: Region,
    pub b_rows: usize,
    pub ldb: usize,
    pub d: Region,
    pub ldd: usize,
}

impl PipelineOperands {
    /// K in whole 128-blocks, TMA strides and alignments, paired bf16 stores, and the tensor
    /// maps themselves.
    pub fn check(&self, kernel: &'static str) -> Result<()> {
        let c = Checker { kernel };
        let k = self.k;
        c.req(k % QUANT_BLOCK == 0, || {
            format!("K must be a multiple of 128 (K = {k})")
        })?;
        for (name, ld) in [("lda", self.lda), ("ldb", self.ldb)] {
            c.req(ld % 16 == 0, || {
                format!("{name} must be a multiple of 16 (TMA row stride in bytes; {name} = {ld})")
            })?;
        }
        c.aligned("A", self.a, 16)?;
        c.aligned("B", self.b, 16)?;
        c.aligned("sa", self.sa, 16)?;
        c.aligned("D", self.d, 4)?;
        c.req(self.ldd % 2 == 0, || {
            format!(
                "ldd must be even (bf16 pairs are stored together; ldd = {})",
                self.ldd
            )
        })?;
        for map in self.tensor_maps() {
            map.check(kernel)?;
        }
        Ok(())
    }

    /// tmap_a, tmap_b, tmap_sa exactly as launch_params.h documents them.
    pub fn tensor_maps(&self) -> [TensorMap2d; 3] {
        let (k, a_rows) = (self.k as u64, self.a_rows as u64);
        [
            TensorMap2d {
                name: "tmap_a",
                elem: TmaElem::U8,
                addr: self.a.addr,
                dims: [k, a_rows],
                stride_bytes: self.lda as u64,
                box_dims: [sys::R1_FP8_GEMM_BLOCK_K, self.block_m],
                swizzle_128b: true,
            },
            TensorMap2d {
                name: "tmap_b",
                elem: TmaElem::U8,
                addr: self.b.addr,
                dims: [k, self.b_rows as u64],
                stride_bytes: self.ldb as u64,
                box_dims: [sys::R1_FP8_GEMM_BLOCK_K, sys::R1_FP8_GEMM_BLOCK_N],
                swizzle_128b: true,
            },
            TensorMap2d {
                name: "tmap_sa",
                elem: TmaElem::F32,
                addr: self.sa.addr,
                dims: [a_rows, k / QUANT_BLOCK as u64],
                stride_bytes: self.sa_pad as u64 * 4,
                box_dims: [self.block_m, 1],
                swizzle_128b: false,
            },
        ]
    }
}

/// A GEMM call as plain numbers (checkable without a GPU).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fp8GemmDesc {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    /// fp8 `[m][lda]`.
    pub a: Region,
    pub lda: usize,
    /// f32 activation scales, SA layout `[ceil(k/128)][m_pad]`.
    pub sa: Region,
    pub m_pad: usize,
    /// fp8 weights `[n][ldb]` (K-major).
    pub b: Region,
    pub ldb: usize,
    /// f32 weight scales `[ceil(n/128)][ceil(k/128)]`.
    pub sb: Region,
    /// bf16 output `[m][ldd]`.
    pub d: Region,
    pub ldd: usize,
}

impl Fp8GemmDesc {
    /// The kernel `kernel` resolves to for this call, after checking every requirement that
    /// kernel documents (Auto: the reference kernel's requirements must hold; the fast path is
    /// taken when its own hold too).
    pub fn resolve(&self, kernel: GemmKernel) -> Result<GemmKernel> {
        match kernel {
            GemmKernel::Auto => {
                self.check_common(GemmKernel::Reference)?;
                Ok(heuristics::fp8_gemm_kernel(self.m, |fast| {
                    self.check_fast(fast).is_ok()
                }))
            }
            GemmKernel::Reference => {
                self.check_common(kernel)?;
                Ok(kernel)
            }
            GemmKernel::Wgmma | GemmKernel::WgmmaM64 => {
                self.check_common(kernel)?;
                self.check_fast(kernel)?;
                Ok(kernel)
            }
        }
    }

    /// Shapes, strides, natural alignment and buffer lengths (every kernel).
    fn check_common(&self, kernel: GemmKernel) -> Result<()> {
        let c = Checker {
            kernel: kernel.name(),
        };
        let (m, n, k) = (self.m, self.n, self.k);
        c.req(m >= 1 && n >= 1 && k >= 1, || {
            format!("M, N and K must be >= 1 (M = {m}, N = {n}, K = {k})")
        })?;
        c.fits_i32(&[
            ("M", m),
            ("N", n),
            ("K", k),
            ("lda", self.lda),
            ("ldb", self.ldb),
            ("ldd", self.ldd),
            ("m_pad", self.m_pad),
        ])?;
        c.gemm_strides(
            k,
            n,
            &[("lda", self.lda), ("ldb", self.ldb)],
            ("ldd", self.ldd),
        )?;
        c.sa_pad("m_pad", self.m_pad, m, "M")?;
        c.aligned("sa", self.sa, 4)?;
        c.aligned("sb", self.sb, 4)?;
        c.aligned("D", self.d, 2)?;
        let kb = k.div_ceil(QUANT_BLOCK);
        c.holds_matrix("A", self.a, m, k, self.lda)?;
        c.holds_matrix("B", self.b, n, k, self.ldb)?;
        c.holds_matrix("D", self.d, m, n, self.ldd)?;
        c.holds("sa", self.sa, kb * self.m_pad, "[ceil(K/128)][m_pad]")?;
        c.holds(
            "sb",
            self.sb,
            n.div_ceil(QUANT_BLOCK) * kb,
            "[ceil(N/128)][ceil(K/128)]",
        )?;
        if kernel == GemmKernel::Reference {
            let tile = sys::R1_FP8_GEMM_REF_TILE as usize;
            c.req(m.div_ceil(tile) <= 65535, || {
                format!("M = {m} exceeds the grid's y limit (65535 * {tile} rows)")
            })?;
        }
        Ok(())
    }

    /// The wgmma kernels' extra requirements (launch_params.h), tensor maps included.
    fn check_fast(&self, kernel: GemmKernel) -> Result<()> {
        self.pipeline_operands(kernel).check(kernel.name())
    }

    fn pipeline_operands(&self, kernel: GemmKernel) -> PipelineOperands {
        PipelineOperands {
            block_m: kernel.block_m() as u32,
            k: self.k,
            a: self.a,
            a_rows: self.m,
            lda: self.lda,
            sa: self.sa,
            sa_pad: self.m_pad,
            b: self.b,
            b_rows: self.n,
            ldb: self.ldb,
            d: self.d,
            ldd: self.ldd,
        }
    }

    /// Output tiles of a wgmma kernel: ceil(M/BLOCK_M) * ceil(N/128).
    pub fn tiles(&self, kernel: GemmKernel) -> usize {
        self.m.div_ceil(kernel.block_m()) * self.n.div_ceil(sys::R1_FP8_GEMM_BLOCK_N as usize)
    }

    /// The split of K the resolved `kernel` runs with, checked: `forced` splits when given,
    /// else for a wgmma kernel with a workspace [`heuristics::split_k`] on `sm_count` SMs, else
    /// one. `workspace` is the workspace's description (its `splits` is replaced). The
    /// reference kernel needs no workspace for its splits and never asks the heuristic.
    pub fn split_k(
        &self,
        kernel: GemmKernel,
        forced: Option<usize>,
        workspace: Option<SplitKDesc>,
        sm_count: usize,
    ) -> Result<SplitKDesc> {
        let name = kernel.name();
        let kblocks = self.k.div_ceil(QUANT_BLOCK);
        let Some(tiling) = kernel.tiling() else {
            let splits = forced.unwrap_or(1);
            Checker { kernel: name }.req(splits >= 1 && splits <= kblocks, || {
                format!(
                    "splits must be in 1..={kblocks} (K = {} has {kblocks} K-blocks); asked for \
                     {splits}",
                    self.k
                )
            })?;
            return Ok(SplitKDesc {
                splits,
                ..SplitKDesc::NONE
            });
        };
        let splits = match (forced, workspace) {
            (Some(s), _) => s,
            (None, Some(_)) => heuristics::split_k(self.m, self.n, self.k, tiling, sm_count),
            (None, None) => 1,
        };
        let desc = match workspace {
            Some(ws) => SplitKDesc { splits, ..ws },
            None => {
                Checker { kernel: name }.req(splits <= 1, || {
                    format!("{splits} splits of K need a split-K workspace (none was given)")
                })?;
                SplitKDesc {
                    splits,
                    ..SplitKDesc::NONE
                }
            }
        };
        desc.check(
            name,
            self.tiles(kernel),
            kblocks,
            tiling.block_m,
            tiling.block_n,
        )?;
        Ok(desc)
    }
}

/// A GEMM over caller-owned buffers.
pub struct Fp8GemmArgs<'a> {
    pub a: &'a DeviceBuffer<u8>,
    pub lda: usize,
    pub sa: &'a DeviceBuffer<f32>,
    pub m_pad: usize,
    pub b: &'a DeviceBuffer<u8>,
    pub ldb: usize,
    pub sb: &'a DeviceBuffer<f32>,
    pub d: &'a mut DeviceBuffer<bf16>,
    pub ldd: usize,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    /// Where a split GEMM keeps its partials and counters; None: never split.
    pub split_k: Option<&'a SplitKWorkspace>,
    /// Exactly this many splits; None: as [`heuristics::split_k`] says (with a workspace).
    pub splits: Option<usize>,
}

impl<'a> Fp8GemmArgs<'a> {
    /// Quantized activations times a weight into `d` (contiguous `[m][n]`).
    pub fn new(
        a: &'a QuantizedActivations,
        w: &'a Fp8Weight,
        d: &'a mut DeviceBuffer<bf16>,
    ) -> Self {
        Fp8GemmArgs {
            a: &a.q,
            lda: a.k,
            sa: &a.scales,
            m_pad: a.m_pad,
            b: &w.codes,
            ldb: w.k,
            sb: &w.scales,
            d,
            ldd: w.n,
            m: a.m,
            n: w.n,
            k: a.k,
            split_k: None,
            splits: None,
        }
    }

    /// Split K where heuristics::split_k says so, with `ws` as the workspace.
    pub fn with_split_k(self, ws: &'a SplitKWorkspace) -> Self {
        Fp8GemmArgs {
            split_k: Some(ws),
            ..self
        }
    }

    /// Exactly `splits` splits (test and bench hook); needs a workspace that holds them.
    pub fn with_splits(self, ws: &'a SplitKWorkspace, splits: usize) -> Self {
        Fp8GemmArgs {
            split_k: Some(ws),
            splits: Some(splits),
            ..self
        }
    }

    pub fn desc(&self) -> Fp8GemmDesc {
        Fp8GemmDesc {
            m: self.m,
            n: self.n,
            k: self.k,
            a: Region::from(self.a),
            lda: self.lda,
            sa: Region::from(self.sa),
            m_pad: self.m_pad,
            b: Region::from(self.b),
            ldb: self.ldb,
            sb: Region::from(self.sb),
            d: Region::from(&*self.d),
            ldd: self.ldd,
        }
    }
}

/// The reference kernel's launch of a resolved call, summing `splits` split totals.
struct RefLaunch(Fp8GemmDesc, usize);

impl KernelLaunch for RefLaunch {
    type Params = R1Fp8GemmRefParams;

    fn kernel(&self) -> &'static str {
        GemmKernel::Reference.name()
    }

    fn params(&self) -> Result<R1Fp8GemmRefParams> {
        let d = &self.0;
        Ok(R1Fp8GemmRefParams {
            a: d.a.addr,
            b: d.b.addr,
            sa: d.sa.addr,
            sb: d.sb.addr,
            d: d.d.addr,
            m: d.m as i32,
            n: d.n as i32,
            k: d.k as i32,
            lda: d.lda as i32,
            ldb: d.ldb as i32,
            ldd: d.ldd as i32,
            m_pad: d.m_pad as i32,
            splits: self.1 as i32,
        })
    }

    fn launch_config(&self) -> LaunchConfig {
        let tile = sys::R1_FP8_GEMM_REF_TILE;
        LaunchConfig {
            grid_dim: (
                self.0.n.div_ceil(tile as usize) as u32,
                self.0.m.div_ceil(tile as usize) as u32,
                1,
            ),
            block_dim: (tile, tile, 1),
            shared_mem_bytes: 0,
        }
    }
}

/// A wgmma kernel's launch of a resolved call on `ctas` persistent CTAs.
struct WgmmaLaunch {
    desc: Fp8GemmDesc,
    kernel: GemmKernel,
    split_k: SplitKDesc,
    ctas: usize,
}

impl KernelLaunch for WgmmaLaunch {
    type Params = R1Fp8GemmParams;

    fn kernel(&self) -> &'static str {
        self.kernel.name()
    }

    fn params(&self) -> Result<R1Fp8GemmParams> {
        let (d, name) = (&self.desc, self.kernel.name());
        let [ta, tb, tsa] = d.pipeline_operands(self.kernel).tensor_maps();
        Ok(R1Fp8GemmParams {
            tmap_a: ta.encode(name)?,
            tmap_b: tb.encode(name)?,
            tmap_sa: tsa.encode(name)?,
            sb: d.sb.addr,
            d: d.d.addr,
            m: d.m as i32,
            n: d.n as i32,
            k: d.k as i32,
            ldd: d.ldd as i32,
            split_k: self.split_k.params(),
        })
    }

    fn launch_config(&self) -> LaunchConfig {
        let (threads, smem) = if self.kernel == GemmKernel::WgmmaM64 {
            (
                sys::R1_FP8_GEMM_M64_THREADS,
                sys::R1_FP8_GEMM_M64_SMEM_BYTES,
            )
        } else {
            (sys::R1_FP8_GEMM_THREADS, sys::R1_FP8_GEMM_SMEM_BYTES)
        };
        LaunchConfig {
            grid_dim: (self.ctas as u32, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: smem,
        }
    }
}

/// A checked GEMM launch (tensor maps encoded once) reports the kernel it resolved to.
impl Prepared<'_, GemmKernel> {
    /// The same launch on `ctas` persistent CTAs instead of min(units, SMs): any count >= 1
    /// is valid (CTA i runs units i, i + ctas, ...; no unit waits for another, split or not),
    /// e.g. one CTA walking every unit. The reference kernel's grid is its output tiling, so it
    /// has no such choice.
    pub fn with_persistent_ctas(mut self, ctas: u32) -> Result<Self> {
        let kernel = self.kernel();
        let c = Checker {
            kernel: kernel.name(),
        };
        c.req(kernel != GemmKernel::Reference && ctas >= 1, || {
            format!("a persistent grid needs a wgmma kernel and >= 1 CTA (asked for {ctas})")
        })?;
        self.set_grid_x(ctas);
        Ok(self)
    }
}

/// An FP8 weight on the device in the checkpoint's layout: codes `[n][k]`, `weight_scale_inv`
/// `[ceil(n/128)][ceil(k/128)]` (multipliers).
#[derive(Debug)]
pub struct Fp8Weight {
    pub codes: DeviceBuffer<u8>,
    pub scales: DeviceBuffer<f32>,
    pub n: usize,
    pub k: usize,
}

impl Fp8Weight {
    pub fn upload(dev: &Device, codes: &[u8], scales: &[f32], n: usize, k: usize) -> Result<Self> {
        let blocks = n.div_ceil(QUANT_BLOCK) * k.div_ceil(QUANT_BLOCK);
        if codes.len() != n * k || scales.len() != blocks {
            return Err(CudaError::requirement(
                "fp8 weight",
                format!(
                    "codes must be [{n}, {k}] and scales [ceil({n}/128), ceil({k}/128)] = {blocks}; \
                     got {} codes and {} scales",
                    codes.len(),
                    scales.len()
                ),
            ));
        }
        Ok(Fp8Weight {
            codes: dev.upload(codes)?,
            scales: dev.upload(scales)?,
            n,
            k,
        })
    }
}

impl Device {
    /// Checks `args` for `kernel`, resolves Auto, chooses the split of K
    /// ([`Fp8GemmDesc::split_k`]), encodes the tensor maps and builds the launch (grid =
    /// min(tiles * splits, SMs) for the persistent wgmma kernels). No work is queued.
    pub fn prepare_fp8_gemm<'a>(
        &'a self,
        args: Fp8GemmArgs<'a>,
        kernel: GemmKernel,
    ) -> Result<Prepared<'a, GemmKernel>> {
        let desc = args.desc();
        let kernel = desc.resolve(kernel)?;
        let split_k = desc.split_k(
            kernel,
            args.splits,
            args.split_k.map(|ws| ws.desc(1)),
            self.info().sm_count,
        )?;
        let splits = split_k.splits;
        let prepared = Prepared::new(self, kernel);
        let (prepared, ctas) = match kernel {
            GemmKernel::Reference => (prepared.then(&RefLaunch(desc, splits))?, None),
            GemmKernel::Wgmma | GemmKernel::WgmmaM64 => {
                let units = desc.tiles(kernel) * splits;
                let ctas = heuristics::persistent_ctas(units, self.info());
                let launch = WgmmaLaunch {
                    desc,
                    kernel,
                    split_k,
                    ctas,
                };
                (prepared.then(&launch)?, Some(ctas))
            }
            GemmKernel::Auto => unreachable!("resolve() returns a concrete kernel"),
        };
        heuristics::report(&Choice::Fp8Gemm {
            m: desc.m,
            n: desc.n,
            k: desc.k,
            kernel,
            ctas,
            splits,
        });
        Ok(prepared)
    }

    /// GEMM into caller-owned buffers (queued on the stream); returns the kernel that ran.
    pub fn fp8_gemm_into(&self, args: Fp8GemmArgs<'_>, kernel: GemmKernel) -> Result<GemmKernel> {
        let p = self.prepare_fp8_gemm(args, kernel)?;
        p.launch()?;
        Ok(p.kernel())
    }

    /// D = A x W^T into a new contiguous bf16 `[m][n]`; returns D and the kernel that ran.
    pub fn fp8_gemm(
        &self,
        a: &QuantizedActivations,
        w: &Fp8Weight,
        kernel: GemmKernel,
    ) -> Result<(DeviceBuffer<bf16>, GemmKernel)> {
        if a.k != w.k {
            return Err(CudaError::requirement(
                kernel.name(),
                format!(
                    "activations have K = {} but the weight has K = {}",
                    a.k, w.k
                ),
            ));
        }
        let mut d = self.alloc::<bf16>(a.m * w.n)?;
        let ran = self.fp8_gemm_into(Fp8GemmArgs::new(a, w, &mut d), kernel)?;
        Ok((d, ran))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::heuristics::tests::fp8_gemm_desc as desc;
    use crate::cuda::launch::row_symbol;
    use crate::cuda::ops::err_of;

    /// Every requirement the kernels document, named in the error, for every kernel that has
    /// it (Auto included); the choice among the kernels is heuristics' test.
    #[test]
    fn host_checks_name_requirements() {
        assert_eq!(
            desc(3, 5, 100).resolve(GemmKernel::Reference).unwrap(),
            GemmKernel::Reference
        );

        // K % 128 != 0 on the fast path: the message names the requirement.
        for kernel in [GemmKernel::Wgmma, GemmKernel::WgmmaM64] {
            let e = err_of(desc(3, 5, 100).resolve(kernel));
            assert!(e.contains("K must be a multiple of 128"), "{e}");
            assert!(e.starts_with(kernel.name()), "{e}");
        }

        // Strides: TMA needs 16-byte rows.
        let mut d = desc(70, 300, 256);
        d.lda = 264;
        d.a.len = 70 * 264;
        assert!(err_of(d.resolve(GemmKernel::Wgmma)).contains("lda must be a multiple of 16"));
        let mut d = desc(70, 300, 256);
        d.ldd = 301;
        d.d.len = 70 * 301;
        assert!(err_of(d.resolve(GemmKernel::Wgmma)).contains("ldd must be even"));
        let mut d = desc(70, 300, 256);
        d.a.addr += 8;
        assert!(err_of(d.resolve(GemmKernel::WgmmaM64))
            .contains("A (0x10000008) must be 16-byte aligned"));

        // Common requirements fail for every kernel, Auto included.
        let mut d = desc(70, 300, 256);
        d.b.len -= 1;
        for kernel in [GemmKernel::Auto, GemmKernel::Reference, GemmKernel::Wgmma] {
            assert!(err_of(d.resolve(kernel)).contains("B holds"), "{kernel:?}");
        }
        let mut d = desc(70, 300, 256);
        d.m_pad = 70;
        assert!(err_of(d.resolve(GemmKernel::Reference)).contains("multiple of 4 (SA layout)"));
        let mut d = desc(70, 300, 256);
        d.sb.len -= 1;
        assert!(err_of(d.resolve(GemmKernel::Auto)).contains("sb holds"));
        let mut d = desc(70, 300, 256);
        d.ldb = 128;
        assert!(err_of(d.resolve(GemmKernel::Auto)).contains("ldb (128) must be >= K (256)"));
        assert!(err_of(desc(0, 1, 128).resolve(GemmKernel::Auto)).contains("must be >= 1"));

        // Tiles for the persistent grid.
        assert_eq!(desc(4096, 7168, 128).tiles(GemmKernel::Wgmma), 32 * 56);
        assert_eq!(desc(1, 2112, 128).tiles(GemmKernel::WgmmaM64), 17);
    }

    /// The split of K: forced, heuristic (wgmma with a workspace), or none; the reference
    /// kernel takes forced splits without a workspace; every refusal names what to change.
    #[test]
    fn split_k_choice_and_checks() {
        let ws = |units: usize, tiles: usize| {
            let [p, c] = SplitKWorkspace::lens(units, tiles);
            SplitKDesc {
                splits: 1,
                partials: Region {
                    addr: 0x6000_0000,
                    len: p,
                },
                counters: Region {
                    addr: 0x7000_0000,
                    len: c,
                },
            }
        };
        let (m64, big, reference) = (
            GemmKernel::WgmmaM64,
            GemmKernel::Wgmma,
            GemmKernel::Reference,
        );
        let d = desc(1, 1536, 7168); // 12 tiles, 56 K-blocks
        let splits = |k, forced, w| d.split_k(k, forced, w, 132).map(|s| s.splits);
        assert_eq!(splits(m64, None, None).unwrap(), 1);
        assert_eq!(splits(m64, None, Some(ws(132, 132))).unwrap(), 10);
        assert_eq!(
            splits(big, None, Some(ws(132, 132))).unwrap(),
            heuristics::split_k(1, 1536, 7168, heuristics::FP8_TILING, 132)
        );
        assert_eq!(splits(m64, Some(56), Some(ws(12 * 56, 12))).unwrap(), 56);
        let sk = d.split_k(m64, Some(3), Some(ws(132, 132)), 132).unwrap();
        assert_eq!((sk.params().splits, sk.params().partials), (3, 0x6000_0000));
        // Reference: forced splits, no workspace, never the heuristic.
        assert_eq!(splits(reference, Some(7), None).unwrap(), 7);
        assert_eq!(splits(reference, None, Some(ws(132, 132))).unwrap(), 1);
        assert_eq!(
            d.split_k(reference, Some(7), None, 132)
                .unwrap()
                .params()
                .partials,
            0
        );
        // Refusals.
        let e = err_of(splits(m64, Some(57), Some(ws(1000, 100))));
        assert!(
            e.starts_with("fp8_gemm_wgmma_m64") && e.contains("splits <= K-blocks (56)"),
            "{e}"
        );
        let e = err_of(splits(m64, Some(0), Some(ws(132, 132))));
        assert!(e.contains("asked for 0"), "{e}");
        let e = err_of(splits(m64, Some(23), Some(ws(132, 132))));
        assert!(
            e.contains("split-K partials holds") && e.contains("12 tiles x 23 splits"),
            "{e}"
        );
        let e = err_of(splits(m64, Some(2), Some(ws(1000, 5))));
        assert!(e.contains("split-K counters holds"), "{e}");
        let e = err_of(splits(m64, Some(2), None));
        assert!(e.contains("need a split-K workspace"), "{e}");
        assert_eq!(splits(m64, Some(1), None).unwrap(), 1);
        let e = err_of(desc(3, 5, 100).split_k(reference, Some(2), None, 132));
        assert!(e.contains("splits must be in 1..=1"), "{e}");
    }

    /// Each resolved kernel's launch pairs with its kernel-table row.
    #[test]
    fn launches_pair_with_their_rows() {
        let desc = desc(64, 128, 128);
        assert_eq!(row_symbol(&RefLaunch(desc, 1)), "fp8_gemm_ref");
        for kernel in [GemmKernel::Wgmma, GemmKernel::WgmmaM64] {
            let l = WgmmaLaunch {
                desc,
                kernel,
                split_k: SplitKDesc::NONE,
                ctas: 1,
            };
            assert_eq!(row_symbol(&l), kernel.name());
        }
    }
}
