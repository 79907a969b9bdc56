//! bf16 GEMM, batched: D[b] = A[b] · B[b]^T for b in 0..batch (A bf16 `[m][lda]`, B bf16
//! `[n][ldb]` K-major), f32 accumulation, D f32 or bf16. Two kernels: `bf16_gemm_wgmma`
//! (cuda/bf16_gemm.cu: TMA + wgmma, persistent, split-K) and `small_gemm_bf16` (CUDA cores,
//! cuda/small_ops.cu: the GPU-side reference, launched once per batch entry).
//! [`Bf16GemmKernel::Auto`] picks the wgmma kernel when the call meets its requirements
//! (cuda/params/bf16_gemm.h) and the reference kernel otherwise. The decode path's bf16
//! products run here: lm_head, eh_proj and the MLA absorption products batched over heads.

use cudarc::driver::LaunchConfig;

use super::split_k::{SplitKDesc, SplitKWorkspace};
use super::{Checker, GemmBf16Desc, Region};
use crate::cuda::error::Result;
use crate::cuda::heuristics::{self, Choice};
use crate::cuda::launch::{KernelLaunch, Prepared};
use crate::cuda::sys::{self, R1Bf16GemmParams};
use crate::cuda::tma::{TensorMap3d, TmaElem};
use crate::cuda::Device;

const BLOCK_M: usize = sys::R1_BF16_GEMM_BLOCK_M as usize;
const BLOCK_N: usize = sys::R1_BF16_GEMM_BLOCK_N as usize;
const BLOCK_K: usize = sys::R1_BF16_GEMM_BLOCK_K as usize;

/// Which kernel runs a bf16 GEMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Bf16GemmKernel {
    /// `Wgmma` when the call meets its requirements, else `Reference`.
    Auto,
    /// `small_gemm_bf16`: CUDA cores, once per batch entry; any shape and stride.
    Reference,
    /// `bf16_gemm_wgmma`: TMA + wgmma m64n128k16, persistent, split-K.
    Wgmma,
}

impl Bf16GemmKernel {
    /// The kernel's symbol ("bf16_gemm" for Auto).
    pub fn name(self) -> &'static str {
        match self {
            Bf16GemmKernel::Auto => "bf16_gemm",
            Bf16GemmKernel::Reference => "small_gemm_bf16",
            Bf16GemmKernel::Wgmma => "bf16_gemm_wgmma",
        }
    }
}

/// The element type of D.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bf16Out {
    F32,
    Bf16,
}

impl Bf16Out {
    fn bytes(self) -> u64 {
        match self {
            Bf16Out::F32 => 4,
            Bf16Out::Bf16 => 2,
        }
    }
}

/// D[b] = A[b] · B[b]^T for b in 0..batch: A bf16 [m][lda] at a + b*a_batch, B bf16 [n][ldb]
/// (K-major) at b + b*b_batch, D [m][ldd] at d + b*d_batch (strides in elements).
///
/// Regions count elements of their own type: bf16 for A and B, `out`'s type for D.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bf16GemmDesc {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub batch: usize,
    pub a: Region,
    pub lda: usize,
    pub a_batch: usize,
    pub b: Region,
    pub ldb: usize,
    pub b_batch: usize,
    pub d: Region,
    pub ldd: usize,
    pub d_batch: usize,
    pub out: Bf16Out,
}

/// Elements a batched row-major operand spans: the last entry's last row ends the span.
fn batched_span(batch: usize, batch_stride: usize, rows: usize, ld: usize, cols: usize) -> usize {
    (batch - 1)
        .checked_mul(batch_stride)
        .and_then(|v| (rows - 1).checked_mul(ld).and_then(|r| v.checked_add(r)))
        .and_then(|v| v.checked_add(cols))
        .unwrap_or(usize::MAX)
}

impl Bf16GemmDesc {
    /// The kernel `kernel` resolves to for this call, after checking every requirement that
    /// kernel documents (Auto: the common ones, then the wgmma kernel's, else the reference
    /// kernel's).
    pub fn resolve(&self, kernel: Bf16GemmKernel) -> Result<Bf16GemmKernel> {
        match kernel {
            Bf16GemmKernel::Auto => {
                self.check_common(kernel)?;
                let chosen = heuristics::bf16_gemm_kernel(|fast| self.check_fast(fast).is_ok());
                if chosen == Bf16GemmKernel::Reference {
                    self.reference_entry(0).check()?;
                }
                Ok(chosen)
            }
            Bf16GemmKernel::Reference => {
                self.check_common(kernel)?;
                self.reference_entry(0).check()?;
                Ok(kernel)
            }
            Bf16GemmKernel::Wgmma => {
                self.check_common(kernel)?;
                self.check_fast(kernel)?;
                Ok(kernel)
            }
        }
    }

    /// Shapes, strides, natural alignment and buffer lengths, the last batch entry included
    /// (every kernel).
    fn check_common(&self, kernel: Bf16GemmKernel) -> Result<()> {
        let c = Checker {
            kernel: kernel.name(),
        };
        let (m, n, k, batch) = (self.m, self.n, self.k, self.batch);
        c.req(m >= 1 && n >= 1 && k >= 1 && batch >= 1, || {
            format!("M, N, K and batch must be >= 1 (M = {m}, N = {n}, K = {k}, batch = {batch})")
        })?;
        c.fits_i32(&[
            ("M", m),
            ("N", n),
            ("K", k),
            ("batch", batch),
            ("lda", self.lda),
            ("ldb", self.ldb),
            ("ldd", self.ldd),
        ])?;
        c.gemm_strides(
            k,
            n,
            &[("lda", self.lda), ("ldb", self.ldb)],
            ("ldd", self.ldd),
        )?;
        c.aligned("A", self.a, 2)?;
        c.aligned("B", self.b, 2)?;
        c.aligned("D", self.d, self.out.bytes())?;
        let operands = [
            ("A", self.a, self.a_batch, m, self.lda, k, "a_batch"),
            ("B", self.b, self.b_batch, n, self.ldb, k, "b_batch"),
            ("D", self.d, self.d_batch, m, self.ldd, n, "d_batch"),
        ];
        for (name, r, stride, rows, ld, cols, stride_name) in operands {
            let need = batched_span(batch, stride, rows, ld, cols);
            c.req(r.len >= need, || {
                format!(
                    "{name} holds {} elements; {batch} batch entries ({stride_name} {stride}) of \
                     [{rows} rows, stride {ld}] x {cols} columns need {need}",
                    r.len
                )
            })?;
        }
        Ok(())
    }

    /// The wgmma kernel's extra requirements (cuda/params/bf16_gemm.h), tensor maps included.
    fn check_fast(&self, kernel: Bf16GemmKernel) -> Result<()> {
        let c = Checker {
            kernel: kernel.name(),
        };
        let k = self.k;
        c.req(k % 8 == 0, || {
            format!("K must be a multiple of 8 (K = {k})")
        })?;
        for (name, ld) in [("lda", self.lda), ("ldb", self.ldb)] {
            c.req(ld % 8 == 0, || {
                format!("{name} must be a multiple of 8 (16-byte TMA row stride; {name} = {ld})")
            })?;
        }
        c.aligned("A", self.a, 16)?;
        c.aligned("B", self.b, 16)?;
        if self.batch > 1 {
            for (name, s) in [("a_batch", self.a_batch), ("b_batch", self.b_batch)] {
                c.req(s > 0 && s % 8 == 0, || {
                    format!(
                        "{name} must be a non-zero multiple of 8 with batch > 1 (16-byte TMA \
                         batch stride; {name} = {s})"
                    )
                })?;
            }
            c.req(self.d_batch % 2 == 0, || {
                format!(
                    "d_batch must be even (output pairs are stored together; d_batch = {})",
                    self.d_batch
                )
            })?;
        }
        c.aligned("D", self.d, 2 * self.out.bytes())?;
        c.req(self.ldd % 2 == 0, || {
            format!(
                "ldd must be even (output pairs are stored together; ldd = {})",
                self.ldd
            )
        })?;
        c.fits_i32(&[("tiles", self.tiles())])?;
        for map in self.tensor_maps() {
            map.check(kernel.name())?;
        }
        Ok(())
    }

    /// tmap_a, tmap_b exactly as cuda/params/bf16_gemm.h documents them.
    fn tensor_maps(&self) -> [TensorMap3d; 2] {
        let batch = self.batch as u64;
        // With one entry the batch stride is never followed: any valid value will do.
        let batch_stride = |stride: usize, rows: usize, ld: usize| {
            2 * if self.batch > 1 {
                stride as u64
            } else {
                (rows * ld) as u64
            }
        };
        [
            TensorMap3d {
                name: "tmap_a",
                elem: TmaElem::Bf16,
                addr: self.a.addr,
                dims: [self.k as u64, self.m as u64, batch],
                stride_bytes: [
                    2 * self.lda as u64,
                    batch_stride(self.a_batch, self.m, self.lda),
                ],
                box_dims: [BLOCK_K as u32, BLOCK_M as u32, 1],
                swizzle_128b: true,
            },
            TensorMap3d {
                name: "tmap_b",
                elem: TmaElem::Bf16,
                addr: self.b.addr,
                dims: [self.k as u64, self.n as u64, batch],
                stride_bytes: [
                    2 * self.ldb as u64,
                    batch_stride(self.b_batch, self.n, self.ldb),
                ],
                box_dims: [BLOCK_K as u32, BLOCK_N as u32, 1],
                swizzle_128b: true,
            },
        ]
    }

    /// Output tiles of the wgmma kernel: batch * ceil(M/64) * ceil(N/128).
    pub fn tiles(&self) -> usize {
        self.batch * self.m.div_ceil(BLOCK_M) * self.n.div_ceil(BLOCK_N)
    }

    /// K-blocks of the wgmma kernel (64 of K each): the most splits a call may ask for.
    pub fn kblocks(&self) -> usize {
        self.k.div_ceil(BLOCK_K)
    }

    /// small_gemm_bf16's call for batch entry `i` (its regions start at the entry).
    fn reference_entry(&self, i: usize) -> GemmBf16Desc {
        let at = |r: Region, stride: usize, elem: u64| {
            let skip = i * stride;
            Region {
                addr: r.addr + skip as u64 * elem,
                len: r.len.saturating_sub(skip),
            }
        };
        GemmBf16Desc {
            m: self.m,
            n: self.n,
            k: self.k,
            x: at(self.a, self.a_batch, 2),
            ldx: self.lda,
            w: at(self.b, self.b_batch, 2),
            ldw: self.ldb,
            out: at(self.d, self.d_batch, self.out.bytes()),
            ldo: self.ldd,
            out_f32: self.out == Bf16Out::F32,
        }
    }
}

/// The wgmma kernel's launch of a resolved call: `splits` over the workspace, `ctas`
/// persistent CTAs.
struct WgmmaLaunch {
    desc: Bf16GemmDesc,
    split_k: SplitKDesc,
    ctas: usize,
}

impl KernelLaunch for WgmmaLaunch {
    type Params = R1Bf16GemmParams;

    fn kernel(&self) -> &'static str {
        Bf16GemmKernel::Wgmma.name()
    }

    fn params(&self) -> Result<R1Bf16GemmParams> {
        let (d, name) = (&self.desc, self.kernel());
        let [ta, tb] = d.tensor_maps();
        Ok(R1Bf16GemmParams {
            tmap_a: ta.encode(name)?,
            tmap_b: tb.encode(name)?,
            d: d.d.addr,
            d_batch: d.d_batch as i64,
            split_k: self.split_k.params(),
            m: d.m as i32,
            n: d.n as i32,
            k: d.k as i32,
            batch: d.batch as i32,
            ldd: d.ldd as i32,
            out_f32: i32::from(d.out == Bf16Out::F32),
        })
    }

    fn launch_config(&self) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (self.ctas as u32, 1, 1),
            block_dim: (sys::R1_BF16_GEMM_THREADS, 1, 1),
            shared_mem_bytes: sys::R1_BF16_GEMM_SMEM_BYTES,
        }
    }
}

/// A checked bf16 GEMM launch reports the kernel it resolved to.
impl Prepared<'_, Bf16GemmKernel> {
    /// The same launch on `ctas` persistent CTAs instead of min(units, SMs): any count >= 1
    /// is valid (CTA i runs units i, i + ctas, ...). The reference kernel's grid is its output
    /// tiling, so it has no such choice.
    pub fn with_persistent_ctas(mut self, ctas: u32) -> Result<Self> {
        let kernel = self.kernel();
        let c = Checker {
            kernel: kernel.name(),
        };
        c.req(kernel == Bf16GemmKernel::Wgmma && ctas >= 1, || {
            format!("a persistent grid needs the wgmma kernel and >= 1 CTA (asked for {ctas})")
        })?;
        self.set_grid_x(ctas);
        Ok(self)
    }
}

/// How a prepare call asks for split-K.
#[derive(Clone, Copy)]
enum Splits<'a> {
    /// No workspace: never split.
    None,
    /// heuristics' choice over this workspace.
    Auto(&'a SplitKWorkspace),
    /// Exactly this many over this workspace.
    Exactly(&'a SplitKWorkspace, usize),
}

impl Device {
    /// Checks, resolves Auto (wgmma where its requirements hold), chooses splits with
    /// heuristics::split_k when `split_k` is Some; no work queued.
    pub fn prepare_bf16_gemm(
        &self,
        d: Bf16GemmDesc,
        kernel: Bf16GemmKernel,
        split_k: Option<&SplitKWorkspace>,
    ) -> Result<Prepared<'_, Bf16GemmKernel>> {
        let splits = split_k.map_or(Splits::None, Splits::Auto);
        self.prepare_bf16_gemm_with(d, kernel, splits)
    }

    /// The same with exactly `splits` (test and bench hook): 1 <= splits <= ceil(K/64), the
    /// workspace holding tiles * splits units; splits > 1 need the wgmma kernel.
    pub fn prepare_bf16_gemm_splits(
        &self,
        d: Bf16GemmDesc,
        kernel: Bf16GemmKernel,
        split_k: &SplitKWorkspace,
        splits: usize,
    ) -> Result<Prepared<'_, Bf16GemmKernel>> {
        self.prepare_bf16_gemm_with(d, kernel, Splits::Exactly(split_k, splits))
    }

    fn prepare_bf16_gemm_with(
        &self,
        desc: Bf16GemmDesc,
        kernel: Bf16GemmKernel,
        splits: Splits<'_>,
    ) -> Result<Prepared<'_, Bf16GemmKernel>> {
        let kernel = desc.resolve(kernel)?;
        let prepared = Prepared::new(self, kernel);
        let (prepared, ctas, split_count) = match kernel {
            Bf16GemmKernel::Reference => {
                if let Splits::Exactly(_, s) = splits {
                    Checker {
                        kernel: kernel.name(),
                    }
                    .req(s == 1, || {
                        format!("splits > 1 need the wgmma kernel (asked for {s})")
                    })?;
                }
                let mut prepared = prepared;
                for i in 0..desc.batch {
                    prepared = prepared.then(&desc.reference_entry(i))?;
                }
                (prepared, None, None)
            }
            Bf16GemmKernel::Wgmma => {
                let tiles = desc.tiles();
                let split_k = match splits {
                    Splits::None => SplitKDesc::NONE,
                    Splits::Auto(ws) => {
                        let info = self.info();
                        let chosen = heuristics::bf16_gemm_splits(
                            desc.batch,
                            desc.m,
                            desc.n,
                            desc.k,
                            info.sm_count,
                        );
                        ws.desc(heuristics::splits_within(
                            chosen,
                            tiles,
                            ws.max_units(),
                            ws.max_tiles(),
                        ))
                    }
                    Splits::Exactly(ws, s) => ws.desc(s),
                };
                split_k.check(kernel.name(), tiles, desc.kblocks(), BLOCK_M, BLOCK_N)?;
                let ctas = heuristics::persistent_ctas(tiles * split_k.splits, self.info());
                let launch = WgmmaLaunch {
                    desc,
                    split_k,
                    ctas,
                };
                (prepared.then(&launch)?, Some(ctas), Some(split_k.splits))
            }
            Bf16GemmKernel::Auto => unreachable!("resolve() returns a concrete kernel"),
        };
        heuristics::report(&Choice::Bf16Gemm {
            batch: desc.batch,
            m: desc.m,
            n: desc.n,
            k: desc.k,
            kernel,
            ctas,
            splits: split_count,
        });
        Ok(prepared)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::heuristics::tests::bf16_gemm_desc as desc;
    use crate::cuda::launch::row_symbol;
    use crate::cuda::ops::err_of;

    /// Every requirement the kernels document, named in the error, for every kernel that has
    /// it (Auto included).
    #[test]
    fn host_checks_name_requirements() {
        use Bf16GemmKernel::{Auto, Reference, Wgmma};
        let ok = desc(1, 129_280, 7168, 1);
        assert_eq!(ok.resolve(Auto).unwrap(), Wgmma);
        assert_eq!(ok.resolve(Reference).unwrap(), Reference);
        assert_eq!(ok.tiles(), 1010);
        assert_eq!(ok.kblocks(), 112);

        // Shapes.
        for kernel in [Auto, Reference, Wgmma] {
            let e = err_of(desc(0, 5, 8, 1).resolve(kernel));
            assert!(
                e.contains("must be >= 1") && e.starts_with(kernel.name()),
                "{e}"
            );
            assert!(err_of(desc(3, 5, 8, 0).resolve(kernel)).contains("batch = 0"));
        }
        let mut d = desc(3, 5, 64, 2);
        d.ldb = 32;
        assert!(err_of(d.resolve(Auto)).contains("ldb (32) must be >= K (64)"));
        let mut d = desc(3, 5, 64, 2);
        d.ldd = 4;
        assert!(err_of(d.resolve(Reference)).contains("ldd (4) must be >= N (5)"));
        let mut d = desc(3, 5, 64, 2);
        d.lda = 1 << 31;
        assert!(err_of(d.resolve(Auto)).contains("lda = 2147483648 must fit in a 32-bit int"));

        // Buffer lengths count the last batch entry.
        for (name, mut d) in [
            ("A", desc(3, 5, 64, 4)),
            ("B", desc(3, 5, 64, 4)),
            ("D", desc(3, 5, 64, 4)),
        ] {
            match name {
                "A" => d.a.len -= 1,
                "B" => d.b.len -= 1,
                _ => d.d.len -= 1,
            }
            for kernel in [Auto, Reference, Wgmma] {
                let e = err_of(d.resolve(kernel));
                assert!(
                    e.contains(&format!("{name} holds")) && e.contains("4 batch entries"),
                    "{e}"
                );
            }
        }
        // Natural alignment, every kernel.
        let mut d = desc(3, 5, 64, 1);
        d.b.addr += 1;
        assert!(err_of(d.resolve(Reference)).contains("B (0x30000001) must be 2-byte aligned"));
        let mut d = desc(3, 5, 64, 1);
        d.d.addr += 2;
        assert!(err_of(d.resolve(Auto)).contains("D (0x50000002) must be 4-byte aligned"));

        // The wgmma kernel's own requirements; Auto falls back to the reference kernel.
        let mut cases: Vec<(Bf16GemmDesc, &str)> = Vec::new();
        cases.push((desc(3, 5, 60, 1), "K must be a multiple of 8"));
        let mut d = desc(3, 5, 64, 1);
        d.lda = 68;
        d.a.len = 3 * 68;
        cases.push((d, "lda must be a multiple of 8"));
        let mut d = desc(3, 5, 64, 2);
        d.ldb = 65;
        d.b_batch = 5 * 65;
        d.b.len = 2 * 5 * 65;
        cases.push((d, "ldb must be a multiple of 8"));
        let mut d = desc(3, 5, 64, 1);
        d.a.addr += 8;
        cases.push((d, "A (0x10000008) must be 16-byte aligned"));
        let mut d = desc(3, 5, 64, 2);
        d.a_batch = 196;
        d.a.len = 2 * 196;
        cases.push((d, "a_batch must be a non-zero multiple of 8"));
        let mut d = desc(3, 5, 64, 2);
        d.b_batch = 0;
        cases.push((d, "b_batch must be a non-zero multiple of 8"));
        let mut d = desc(3, 5, 64, 2);
        d.d_batch = 15;
        d.d.len = 30;
        cases.push((d, "d_batch must be even"));
        let mut d = desc(3, 5, 64, 1);
        d.ldd = 7;
        d.d.len = 3 * 7;
        cases.push((d, "ldd must be even"));
        let mut d = desc(3, 5, 64, 1);
        d.d.addr += 4;
        cases.push((d, "D (0x50000004) must be 8-byte aligned"));
        let mut d = desc(3, 5, 64, 1);
        d.out = Bf16Out::Bf16;
        d.d.addr += 2;
        cases.push((d, "D (0x50000002) must be 4-byte aligned"));
        for (d, want) in cases {
            let e = err_of(d.resolve(Wgmma));
            assert!(
                e.starts_with("bf16_gemm_wgmma") && e.contains(want),
                "{want}: {e}"
            );
            assert_eq!(d.resolve(Auto).unwrap(), Reference, "{want}");
        }

        // With one entry the batch strides are never followed.
        let mut d = desc(3, 6, 64, 1);
        (d.a_batch, d.b_batch, d.d_batch) = (0, 3, 7);
        assert_eq!(d.resolve(Auto).unwrap(), Wgmma);
        // The reference kernel's grid limit (every batch entry has the same shape), which
        // Auto meets only when it falls back.
        let mut d = desc(65535 * 16 + 1, 6, 64, 1);
        d.a.len = d.m * 64;
        d.d.len = d.m * 6;
        assert!(err_of(d.resolve(Reference)).contains("grid's y limit"));
        assert_eq!(d.resolve(Auto).unwrap(), Wgmma);
        d.k = 60;
        assert!(err_of(d.resolve(Auto)).contains("grid's y limit"));
    }

    /// The maps follow the strides given, including a batch stride below a matrix (per-head
    /// slices of one row).
    #[test]
    fn tensor_maps_are_rank_3_over_the_batch() {
        let [a, b] = desc(1, 5, 64, 1).tensor_maps();
        assert_eq!((a.dims, a.stride_bytes), ([64, 1, 1], [128, 128]));
        assert_eq!((b.dims, b.box_dims), ([64, 5, 1], [64, 128, 1]));
        // absorb_q: A = q_nope of head h at t * heads * 192 + h * 192.
        let mut d = desc(4, 512, 128, 128);
        (d.lda, d.a_batch) = (128 * 192, 192);
        d.a.len = 4 * 128 * 192;
        assert_eq!(
            d.resolve(Bf16GemmKernel::Auto).unwrap(),
            Bf16GemmKernel::Wgmma
        );
        let [a, _] = d.tensor_maps();
        assert_eq!(a.stride_bytes, [2 * 128 * 192, 2 * 192]);
        assert_eq!(a.dims, [128, 4, 128]);
    }

    /// Each launch pairs with its kernel-table row: the wgmma kernel, and the reference
    /// kernel's per-entry launches.
    #[test]
    fn launches_pair_with_their_rows() {
        let desc = desc(64, 128, 128, 2);
        let l = WgmmaLaunch {
            desc,
            split_k: SplitKDesc::NONE,
            ctas: 1,
        };
        assert_eq!(row_symbol(&l), Bf16GemmKernel::Wgmma.name());
        for i in 0..desc.batch {
            assert_eq!(
                row_symbol(&desc.reference_entry(i)),
                Bf16GemmKernel::Reference.name()
            );
        }
    }

    /// The reference kernel's entries start at each batch entry, lengths to the buffer's end.
    #[test]
    fn reference_entries_step_through_the_batch() {
        let mut d = desc(3, 5, 64, 3);
        d.out = Bf16Out::Bf16;
        let e = d.reference_entry(2);
        assert_eq!(e.x.addr, d.a.addr + 2 * d.a_batch as u64 * 2);
        assert_eq!(e.w.len, d.b.len - 2 * d.b_batch);
        assert_eq!(e.out.addr, d.d.addr + 2 * d.d_batch as u64 * 2);
        assert!(!e.out_f32);
        for i in 0..3 {
            d.reference_entry(i).check().unwrap();
        }
    }
}
