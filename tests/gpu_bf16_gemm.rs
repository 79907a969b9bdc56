//! The bf16 tensor-core GEMM (bf16_gemm_wgmma, cuda/bf16_gemm.cu) against a CPU f64 reference
//! and against small_gemm_bf16 (the GPU-side reference kernel).
//!
//! Without a usable device every GPU test prints `skipped: no CUDA device (<reason>) [<test>]`
//! to stderr (past libtest's capture) and returns; `R1_REQUIRE_GPU=1` (tools/gpu-suite) makes
//! that a failure (the shared harness: tests/gpu_support). The host checks, the kernel choice
//! and the split choice are unit tests beside their code (src/cuda/ops/bf16_gemm.rs,
//! src/cuda/heuristics.rs).
//!
//! Tolerance (stated, not tuned to pass): with S = sum_k |a_k b_k| of an output,
//! |gpu - ref| <= 2^-12 S (f32 accumulation in the tensor cores' order, plus the split totals
//! added in f32) + 2^-8 |ref| when D is bf16 (one rounding). Products of bf16 are exact in
//! f32, so a wrong K-block, row or column costs far more than that. B is uniform in [-1, 1).
//! Every value outside [M, N] of each batch entry (row and batch padding, the next entry's
//! gaps) is filled with all-ones bits first and must still hold them, and the padding of A
//! and B past K is NaN, so a read past K shows up as a NaN output.

mod gpu_support;

use half::bf16;
use rayon::prelude::*;

use r1_runtime::cuda::ops::{Bf16GemmDesc, Bf16GemmKernel, Bf16Out, Prepared, SplitKWorkspace};
use r1_runtime::cuda::{Device, DeviceBuffer, Region};

use gpu_support::{gpu, say, Rng};

// ------------------------------------------------------------------------------------------
// Problems on the host
// ------------------------------------------------------------------------------------------

/// A batched GEMM call with its host operands (strides in elements).
#[derive(Clone)]
struct Problem {
    m: usize,
    n: usize,
    k: usize,
    batch: usize,
    lda: usize,
    a_batch: usize,
    ldb: usize,
    b_batch: usize,
    ldd: usize,
    d_batch: usize,
    out: Bf16Out,
    /// bf16 buffers as uploaded (padding included).
    a: Vec<bf16>,
    b: Vec<bf16>,
    /// Elements of D's buffer.
    d_len: usize,
}

/// Elements a batched operand spans.
fn span(batch: usize, stride: usize, rows: usize, ld: usize, cols: usize) -> usize {
    (batch - 1) * stride + (rows - 1) * ld + cols
}

/// Roughly normal values of magnitude `scale`, rounded to bf16.
fn normal_bf16(rng: &mut Rng, len: usize, scale: f32) -> Vec<bf16> {
    (0..len)
        .map(|_| bf16::from_f32(rng.normal() * scale))
        .collect()
}

/// Uniform in [-1, 1) (16-bit steps, exact in bf16 after rounding), in parallel chunks each
/// with its own generator.
fn uniform_bf16(seed: u64, len: usize) -> Vec<bf16> {
    const CHUNK: usize = 1 << 20;
    let mut out = vec![bf16::ZERO; len];
    out.par_chunks_mut(CHUNK).enumerate().for_each(|(i, c)| {
        let mut rng = Rng::new(seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        for group in c.chunks_mut(4) {
            let bits = rng.next_u64();
            for (j, v) in group.iter_mut().enumerate() {
                let h = (bits >> (16 * j)) as u16 as i16;
                *v = bf16::from_f32(f32::from(h) / 32768.0);
            }
        }
    });
    out
}

impl Problem {
    /// Operands with the given strides: A roughly normal, B uniform in [-1, 1), every
    /// element that is no operand's (row padding past K, batch gaps) NaN.
    #[allow(clippy::too_many_arguments)]
    fn new(
        rng: &mut Rng,
        (m, n, k, batch): (usize, usize, usize, usize),
        (lda, a_batch): (usize, usize),
        (ldb, b_batch): (usize, usize),
        (ldd, d_batch): (usize, usize),
        out: Bf16Out,
    ) -> Problem {
        let nan = bf16::from_f32(f32::NAN);
        let mut a = vec![nan; span(batch, a_batch, m, lda, k)];
        let mut b = vec![nan; span(batch, b_batch, n, ldb, k)];
        let vals_a = normal_bf16(rng, batch * m * k, 1.0);
        let vals_b = uniform_bf16(rng.next_u64(), batch * n * k);
        for e in 0..batch {
            for i in 0..m {
                let src = &vals_a[(e * m + i) * k..][..k];
                a[e * a_batch + i * lda..][..k].copy_from_slice(src);
            }
            for j in 0..n {
                let src = &vals_b[(e * n + j) * k..][..k];
                b[e * b_batch + j * ldb..][..k].copy_from_slice(src);
            }
        }
        Problem {
            m,
            n,
            k,
            batch,
            lda,
            a_batch,
            ldb,
            b_batch,
            ldd,
            d_batch,
            out,
            a,
            b,
            d_len: span(batch, d_batch, m, ldd, n) + ldd,
        }
    }

    /// The exact product and S = sum |a_k b_k| of output (e, i, j).
    fn exact(&self, e: usize, i: usize, j: usize) -> (f64, f64) {
        let a = &self.a[e * self.a_batch + i * self.lda..][..self.k];
        let b = &self.b[e * self.b_batch + j * self.ldb..][..self.k];
        a.iter().zip(b).fold((0.0, 0.0), |(sum, abs), (x, y)| {
            let p = f64::from(x.to_f32()) * f64::from(y.to_f32());
            (sum + p, abs + p.abs())
        })
    }

    /// The exact products of every output, [batch][m][n].
    fn exact_all(&self) -> Vec<(f64, f64)> {
        (0..self.batch * self.m)
            .into_par_iter()
            .flat_map_iter(|r| {
                let (e, i) = (r / self.m, r % self.m);
                (0..self.n).map(move |j| self.exact(e, i, j))
            })
            .collect()
    }

    /// Where output (e, i, j) is in D's buffer.
    fn d_index(&self, e: usize, i: usize, j: usize) -> usize {
        e * self.d_batch + i * self.ldd + j
    }

    fn tiles(&self) -> usize {
        self.batch * self.m.div_ceil(64) * self.n.div_ceil(128)
    }

    fn kblocks(&self) -> usize {
        self.k.div_ceil(64)
    }

    fn shape(&self) -> String {
        format!(
            "batch {} x [M {} N {} K {}] (lda {} a_batch {} ldb {} b_batch {} ldd {} d_batch \
             {}, {:?} out)",
            self.batch,
            self.m,
            self.n,
            self.k,
            self.lda,
            self.a_batch,
            self.ldb,
            self.b_batch,
            self.ldd,
            self.d_batch,
            self.out
        )
    }
}

/// Within the stated tolerance of the exact value.
fn within(got: f32, (want, abs): (f64, f64), out: Bf16Out) -> bool {
    let round = match out {
        Bf16Out::F32 => 0.0,
        Bf16Out::Bf16 => want.abs() / 256.0,
    };
    got.is_finite() && (f64::from(got) - want).abs() <= abs / 4096.0 + round
}

// ------------------------------------------------------------------------------------------
// Problems on the device
// ------------------------------------------------------------------------------------------

/// D's buffer in its element type.
enum DBuf {
    F32(DeviceBuffer<f32>),
    Bf16(DeviceBuffer<bf16>),
}

/// A problem's operands on the device and its output buffer.
struct OnDevice {
    a: DeviceBuffer<bf16>,
    b: DeviceBuffer<bf16>,
    d: DBuf,
}

type R<T> = Result<T, String>;

fn s<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}

impl OnDevice {
    fn upload(dev: &Device, p: &Problem) -> R<OnDevice> {
        let d = match p.out {
            Bf16Out::F32 => DBuf::F32(dev.alloc(p.d_len).map_err(s)?),
            Bf16Out::Bf16 => DBuf::Bf16(dev.alloc(p.d_len).map_err(s)?),
        };
        Ok(OnDevice {
            a: dev.upload(&p.a).map_err(s)?,
            b: dev.upload(&p.b).map_err(s)?,
            d,
        })
    }

    fn desc(&self, p: &Problem) -> Bf16GemmDesc {
        Bf16GemmDesc {
            m: p.m,
            n: p.n,
            k: p.k,
            batch: p.batch,
            a: Region::from(&self.a),
            lda: p.lda,
            a_batch: p.a_batch,
            b: Region::from(&self.b),
            ldb: p.ldb,
            b_batch: p.b_batch,
            d: match &self.d {
                DBuf::F32(d) => Region::from(d),
                DBuf::Bf16(d) => Region::from(d),
            },
            ldd: p.ldd,
            d_batch: p.d_batch,
            out: p.out,
        }
    }

    /// Fills D with all-ones bits, launches, and reads D back: None where the bits are
    /// still all ones.
    fn run(&mut self, dev: &Device, launch: &Prepared<'_, Bf16GemmKernel>) -> R<Vec<Option<f32>>> {
        match &mut self.d {
            DBuf::F32(d) => dev.memset(d, 0xFF).map_err(s)?,
            DBuf::Bf16(d) => dev.memset(d, 0xFF).map_err(s)?,
        }
        launch.launch().map_err(s)?;
        Ok(match &self.d {
            DBuf::F32(d) => dev
                .download(d)
                .map_err(s)?
                .into_iter()
                .map(|v| (v.to_bits() != u32::MAX).then_some(v))
                .collect(),
            DBuf::Bf16(d) => dev
                .download(d)
                .map_err(s)?
                .into_iter()
                .map(|v| (v.to_bits() != u16::MAX).then_some(v.to_f32()))
                .collect(),
        })
    }
}

/// Every output of `got` (D's buffer) within tolerance of `want` ([batch][m][n]), and every
/// other element of the buffer untouched.
fn check_all(p: &Problem, got: &[Option<f32>], want: &[(f64, f64)], what: &str) -> R<()> {
    let mut inside = vec![false; got.len()];
    for e in 0..p.batch {
        for i in 0..p.m {
            for j in 0..p.n {
                let at = p.d_index(e, i, j);
                inside[at] = true;
                let w = want[(e * p.m + i) * p.n + j];
                match got[at] {
                    Some(g) if within(g, w, p.out) => {}
                    g => {
                        return Err(format!(
                            "{what}: {}: D[{e}][{i}][{j}] = {g:?}, exact {} (sum |a b| {})",
                            p.shape(),
                            w.0,
                            w.1
                        ))
                    }
                }
            }
        }
    }
    if let Some(at) = (0..got.len()).find(|&at| !inside[at] && got[at].is_some()) {
        return Err(format!(
            "{what}: {}: wrote outside [M, N] of every batch entry at element {at} of D",
            p.shape()
        ));
    }
    Ok(())
}

/// A workspace for every split count of `p`.
fn workspace_for(dev: &Device, p: &Problem) -> R<SplitKWorkspace> {
    SplitKWorkspace::new(dev, p.tiles() * p.kblocks(), p.tiles()).map_err(s)
}

/// `p` with every split count from 1 to its K-blocks, each launched twice (bit-identical: a
/// counter left non-zero by the first launch would leave slices of the second unstored).
fn sweep_splits(dev: &Device, p: &Problem) -> R<()> {
    let want = p.exact_all();
    let mut on = OnDevice::upload(dev, p)?;
    let ws = workspace_for(dev, p)?;
    for splits in 1..=p.kblocks() {
        let launch = dev
            .prepare_bf16_gemm_splits(on.desc(p), Bf16GemmKernel::Wgmma, &ws, splits)
            .map_err(s)?;
        let what = format!("wgmma, {splits} splits");
        let first = on.run(dev, &launch)?;
        check_all(p, &first, &want, &what)?;
        let second = on.run(dev, &launch)?;
        if !same_bits(&first, &second) {
            return Err(format!("{what}: {}: two launches differ", p.shape()));
        }
    }
    Ok(())
}

fn same_bits(x: &[Option<f32>], y: &[Option<f32>]) -> bool {
    x.len() == y.len()
        && x.iter()
            .zip(y)
            .all(|(a, b)| a.map(f32::to_bits) == b.map(f32::to_bits))
}

// ------------------------------------------------------------------------------------------
// Tests
// ------------------------------------------------------------------------------------------

/// The harness itself (no device): the CPU reference reads only the operands (the NaN
/// padding never reaches it), exact outputs pass, and a wrong value, a missing one or a stray
/// write is caught.
#[test]
fn harness_catches_wrong_values_and_stray_writes() {
    let mut rng = Rng::new(7);
    let p = Problem::new(
        &mut rng,
        (3, 5, 24, 2),
        (32, 3 * 32 + 8),
        (24, 5 * 24),
        (6, 3 * 6 + 2),
        Bf16Out::Bf16,
    );
    assert!(p.a[24].to_f32().is_nan() && p.a[3 * 32].to_f32().is_nan());
    let want = p.exact_all();
    assert!(want.iter().all(|(v, s)| v.is_finite() && *s > 0.0));
    let mut got = vec![None; p.d_len];
    for e in 0..p.batch {
        for i in 0..p.m {
            for j in 0..p.n {
                let w = want[(e * p.m + i) * p.n + j].0;
                got[p.d_index(e, i, j)] = Some(bf16::from_f64(w).to_f32());
            }
        }
    }
    check_all(&p, &got, &want, "exact").unwrap();
    let at = p.d_index(1, 2, 4);
    let mut wrong = got.clone();
    wrong[at] = wrong[at].map(|v| v + 1.0);
    assert!(check_all(&p, &wrong, &want, "t")
        .unwrap_err()
        .contains("D[1][2][4]"));
    wrong[at] = None;
    assert!(check_all(&p, &wrong, &want, "t")
        .unwrap_err()
        .contains("D[1][2][4] = None"));
    let mut stray = got.clone();
    stray[p.d_index(0, 0, 5)] = Some(0.0); // the padding column of row 0 (ldd 6)
    assert!(check_all(&p, &stray, &want, "t")
        .unwrap_err()
        .contains("wrote outside"));
    let mut stray = got;
    stray[p.d_index(0, 3, 0)] = Some(0.0); // the gap between batch entries
    assert!(check_all(&p, &stray, &want, "t")
        .unwrap_err()
        .contains("wrote outside"));
}

/// Random shapes (M 1..=130, N 1..=600, K a multiple of 8 up to 2048, batch 1..=4), padded
/// row and batch strides, f32 and bf16 out, every split count.
#[test]
fn wgmma_matches_cpu_on_random_shapes_and_every_split() {
    let Some(dev) = gpu("wgmma_matches_cpu_on_random_shapes_and_every_split") else {
        return;
    };
    let mut rng = Rng::new(0xB16_6E33);
    let mut cases: Vec<(usize, usize, usize, usize)> = vec![
        (1, 1, 8, 1),
        (64, 128, 64, 1),
        (65, 129, 72, 3),
        (130, 600, 2048, 2),
    ];
    for _ in 0..20 {
        cases.push((
            1 + rng.below(130),
            1 + rng.below(600),
            8 * (1 + rng.below(256)),
            1 + rng.below(4),
        ));
    }
    for (c, &(m, n, k, batch)) in cases.iter().enumerate() {
        let pad = |rng: &mut Rng, unit: usize| unit * rng.below(4);
        let lda = k + pad(&mut rng, 8);
        let ldb = k + pad(&mut rng, 8);
        let ldd = n + n % 2 + pad(&mut rng, 2);
        let a_batch = m * lda + pad(&mut rng, 8);
        let b_batch = n * ldb + pad(&mut rng, 8);
        let d_batch = m * ldd + pad(&mut rng, 2);
        let out = if c % 2 == 0 {
            Bf16Out::F32
        } else {
            Bf16Out::Bf16
        };
        let p = Problem::new(
            &mut rng,
            (m, n, k, batch),
            (lda, a_batch),
            (ldb, b_batch),
            (ldd, d_batch),
            out,
        );
        sweep_splits(dev, &p).unwrap();
    }
}

/// The split a decode call gets (Auto with a workspace), on eh_proj's shape: any persistent
/// grid gives the same bits (the reduction order is the splits', not the CTAs'), and so do
/// repeated launches.
#[test]
fn split_k_is_deterministic_over_grids_and_launches() {
    let Some(dev) = gpu("split_k_is_deterministic_over_grids_and_launches") else {
        return;
    };
    let mut rng = Rng::new(0xE4_970);
    let (m, n, k) = (4, 7168, 14336);
    let p = Problem::new(
        &mut rng,
        (m, n, k, 1),
        (k, m * k),
        (k, n * k),
        (n, m * n),
        Bf16Out::Bf16,
    );
    let mut on = OnDevice::upload(dev, &p).unwrap();
    let ws = SplitKWorkspace::for_device(dev).unwrap();
    let auto = dev
        .prepare_bf16_gemm(on.desc(&p), Bf16GemmKernel::Auto, Some(&ws))
        .unwrap();
    assert_eq!(auto.kernel(), Bf16GemmKernel::Wgmma);
    let base = on.run(dev, &auto).unwrap();
    // The CPU on a sample of columns of every row (the whole product is 411M terms).
    let cols: Vec<usize> = (0..n).step_by(37).chain([127, 128, n - 1]).collect();
    for i in 0..m {
        for &j in &cols {
            let w = p.exact(0, i, j);
            let g = base[p.d_index(0, i, j)];
            assert!(
                g.is_some_and(|g| within(g, w, p.out)),
                "D[{i}][{j}] = {g:?}, exact {w:?}"
            );
        }
    }
    // Forced splits beyond what the device-sized workspace holds (56 tiles x 7 units).
    let big = SplitKWorkspace::new(dev, p.tiles() * 7, p.tiles()).unwrap();
    for splits in [3, 7] {
        let forced = dev
            .prepare_bf16_gemm_splits(on.desc(&p), Bf16GemmKernel::Wgmma, &big, splits)
            .unwrap();
        let want = on.run(dev, &forced).unwrap();
        for ctas in [1, 5, 131] {
            let launch = dev
                .prepare_bf16_gemm_splits(on.desc(&p), Bf16GemmKernel::Wgmma, &big, splits)
                .unwrap()
                .with_persistent_ctas(ctas)
                .unwrap();
            for round in 0..2 {
                let got = on.run(dev, &launch).unwrap();
                assert!(
                    same_bits(&got, &want),
                    "{splits} splits on {ctas} CTAs (launch {round}) differ from the default grid"
                );
            }
        }
    }
    for round in 0..3 {
        assert!(
            same_bits(&on.run(dev, &auto).unwrap(), &base),
            "Auto launch {round} differs from the first"
        );
    }
}

/// lm_head at decode: 129,280 x 7168, f32 logits, M 1 and 64: the wgmma kernel (Auto, with the
/// decode path's workspace) against small_gemm_bf16 on every logit, with S from the
/// reference kernel run on |A| and |B|; a sample of columns against the CPU.
#[test]
fn lm_head_matches_the_reference_kernel() {
    let Some(dev) = gpu("lm_head_matches_the_reference_kernel") else {
        return;
    };
    let (n, k) = (129_280, 7168);
    let mut rng = Rng::new(0x1A_EAD);
    let b = uniform_bf16(rng.next_u64(), n * k);
    let b_abs: Vec<bf16> = b
        .par_iter()
        .map(|v| bf16::from_f32(v.to_f32().abs()))
        .collect();
    let b_dev = dev.upload(&b).unwrap();
    let b_abs_dev = dev.upload(&b_abs).unwrap();
    drop(b_abs);
    let ws = SplitKWorkspace::for_device(dev).unwrap();
    for m in [1, 64] {
        let a = normal_bf16(&mut rng, m * k, 1.0);
        let a_abs: Vec<bf16> = a.iter().map(|v| bf16::from_f32(v.to_f32().abs())).collect();
        let a_dev = dev.upload(&a).unwrap();
        let a_abs_dev = dev.upload(&a_abs).unwrap();
        let mut out: DeviceBuffer<f32> = dev.alloc(m * n).unwrap();
        let desc =
            |a: &DeviceBuffer<bf16>, b: &DeviceBuffer<bf16>, d: &DeviceBuffer<f32>| Bf16GemmDesc {
                m,
                n,
                k,
                batch: 1,
                a: Region::from(a),
                lda: k,
                a_batch: 0,
                b: Region::from(b),
                ldb: k,
                b_batch: 0,
                d: Region::from(d),
                ldd: n,
                d_batch: 0,
                out: Bf16Out::F32,
            };
        let auto = dev
            .prepare_bf16_gemm(desc(&a_dev, &b_dev, &out), Bf16GemmKernel::Auto, Some(&ws))
            .unwrap()
            .kernel();
        assert_eq!(auto, Bf16GemmKernel::Wgmma, "M {m}");
        let mut run =
            |a: &DeviceBuffer<bf16>, b: &DeviceBuffer<bf16>, kernel: Bf16GemmKernel| -> Vec<f32> {
                let launch = dev
                    .prepare_bf16_gemm(desc(a, b, &out), kernel, Some(&ws))
                    .unwrap();
                assert_eq!(launch.kernel(), kernel, "M {m}");
                dev.memset(&mut out, 0xFF).unwrap();
                launch.launch().unwrap();
                dev.download(&out).unwrap()
            };
        let reference = run(&a_dev, &b_dev, Bf16GemmKernel::Reference);
        let abs = run(&a_abs_dev, &b_abs_dev, Bf16GemmKernel::Reference);
        let fast = run(&a_dev, &b_dev, Bf16GemmKernel::Wgmma);
        // Both kernels within the tolerance of the exact value: within twice it of each other.
        let bad = (0..m * n).into_par_iter().find_first(|&x| {
            !(fast[x].is_finite()
                && (fast[x] - reference[x]).abs() <= 2.0 * f32::max(abs[x], 1e-30) / 4096.0)
        });
        if let Some(x) = bad {
            panic!(
                "M {m}: logit [{}][{}]: wgmma {}, small_gemm_bf16 {}, sum |a b| {}",
                x / n,
                x % n,
                fast[x],
                reference[x],
                abs[x]
            );
        }
        let mut cols: Vec<usize> = (0..200).map(|_| rng.below(n)).collect();
        cols.extend([0, 127, 128, n - 128, n - 1]);
        for &j in &cols {
            for i in 0..m {
                let row = &a[i * k..][..k];
                let col = &b[j * k..][..k];
                let (mut sum, mut sabs) = (0f64, 0f64);
                for (x, y) in row.iter().zip(col) {
                    let t = f64::from(x.to_f32()) * f64::from(y.to_f32());
                    sum += t;
                    sabs += t.abs();
                }
                let g = fast[i * n + j];
                assert!(
                    within(g, (sum, sabs), Bf16Out::F32),
                    "M {m}: logit [{i}][{j}] = {g}, exact {sum} (sum |a b| {sabs})"
                );
            }
        }
        say(&format!(
            "gpu_bf16_gemm: lm_head M {m}: {} logits checked",
            m * n
        ));
    }
}

/// R1's absorption products batched over its 128 heads, in the absorbed kv_b layout (per
/// head: W_UK^T [kv_lora][nope], then W_UV [v][kv_lora]):
/// - absorb_q: q_lat[t][h][l] = q_nope[t][h] · W_UK^T[h][l], A = q [T][heads * (nope + rope)]
///   (entry h at h * (nope + rope)), D bf16 into [T][heads][kv_lora + rope] (the rope columns
///   must stay untouched);
/// - absorb_o: out[t][h * v + d] = o_lat[t][h] · W_UV[h][d], A = o_lat [T][heads][kv_lora].
///
/// Each with Auto and the decode path's workspace, and with every split count.
#[test]
fn mla_absorption_shapes_match_cpu() {
    let Some(dev) = gpu("mla_absorption_shapes_match_cpu") else {
        return;
    };
    let (heads, nope, rope, v, kv_lora) = (128, 128, 64, 128, 512);
    let qk = nope + rope;
    let head_block = (nope + v) * kv_lora;
    let mut rng = Rng::new(0xAB_5012B);
    let kv_b = uniform_bf16(rng.next_u64(), heads * head_block);
    let ws = SplitKWorkspace::for_device(dev).unwrap();
    for tokens in [1, 5, 64] {
        let q = normal_bf16(&mut rng, tokens * heads * qk, 1.0);
        let o_lat = normal_bf16(&mut rng, tokens * heads * kv_lora, 1.0);
        let absorb_q = Problem {
            m: tokens,
            n: kv_lora,
            k: nope,
            batch: heads,
            lda: heads * qk,
            a_batch: qk,
            ldb: nope,
            b_batch: head_block,
            ldd: heads * (kv_lora + rope),
            d_batch: kv_lora + rope,
            out: Bf16Out::Bf16,
            a: q,
            b: kv_b[..heads * head_block].to_vec(),
            d_len: tokens * heads * (kv_lora + rope),
        };
        // W_UV[h] follows W_UK^T[h]: B starts nope * kv_lora elements into kv_b.
        let absorb_o = Problem {
            m: tokens,
            n: v,
            k: kv_lora,
            batch: heads,
            lda: heads * kv_lora,
            a_batch: kv_lora,
            ldb: kv_lora,
            b_batch: head_block,
            ldd: heads * v,
            d_batch: v,
            out: Bf16Out::Bf16,
            a: o_lat,
            b: kv_b[nope * kv_lora..].to_vec(),
            d_len: tokens * heads * v,
        };
        for (name, p) in [("absorb_q", &absorb_q), ("absorb_o", &absorb_o)] {
            let want = p.exact_all();
            let mut on = OnDevice::upload(dev, p).unwrap();
            let auto = dev
                .prepare_bf16_gemm(on.desc(p), Bf16GemmKernel::Auto, Some(&ws))
                .unwrap();
            assert_eq!(auto.kernel(), Bf16GemmKernel::Wgmma, "{name}");
            let got = on.run(dev, &auto).unwrap();
            check_all(p, &got, &want, &format!("{name} T {tokens} (Auto)")).unwrap();
            let reference = dev
                .prepare_bf16_gemm(on.desc(p), Bf16GemmKernel::Reference, None)
                .unwrap();
            let got = on.run(dev, &reference).unwrap();
            check_all(
                p,
                &got,
                &want,
                &format!("{name} T {tokens} (small_gemm_bf16)"),
            )
            .unwrap();
            sweep_splits(dev, p)
                .map_err(|e| format!("{name} T {tokens}: {e}"))
                .unwrap();
        }
    }
}
