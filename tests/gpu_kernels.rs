//! GPU kernels against the CPU reference (`r1_runtime::numerics`).
//!
//! Without a usable device (no libcuda, no GPU, not sm_90, or built without nvcc) every GPU test
//! prints `skipped: no CUDA device (<reason>) [<test>]` straight to stderr (past the test
//! harness's capture, so the skip is visible in `cargo test` output) and returns. Set
//! `R1_REQUIRE_GPU=1` (tools/gpu-suite does) to make that a failure instead. The harness
//! (device, skipping, data, tolerance check) is tests/gpu_support, shared with the other GPU
//! tests and the benches.
//!
//! What is compared, and how strictly:
//! - act_quant: codes and scales bit-identical to `numerics::act_quant` (scales converted from
//!   the GPU's SA layout `sa[kb * m_pad + r]` to the CPU's row-major `[rows][kb]`).
//! - fp8_gemm_ref: bf16 bits identical to a CPU loop in the kernel's order (per K-block a
//!   sequential `fmaf` over k ascending, then `acc = fmaf(part, sa * sb, acc)`), ragged K too.
//! - fp8_gemm_wgmma / _m64: against `numerics::block_gemm_w8a8` rounded to bf16, with
//!   [`TOLERANCE`] (gpu_support): elementwise |gpu - ref| <= 2^-6 |ref| + 5e-3 max|ref| and
//!   rms(gpu - ref) <= 5e-3 rms(ref); every output finite; stores outside [M, N] (padding
//!   columns of ldd, the row after M) untouched.
//! - split-K: both wgmma kernels with every split count from 1 to the most the heuristic
//!   considers, against `numerics::block_gemm_w8a8_splits` with the same splits (same
//!   tolerance); bit-identical across launches, grids and workspace reuse, counters left zero;
//!   fp8_gemm_ref with splits bit-exact against the CPU loop in its split order.
//!
//! The typed "no device" errors run on every machine; the host-side checks (kernel choice,
//! requirements named in errors, tensor maps, the SA layout) are unit tests beside their code
//! (src/cuda/heuristics.rs, ops/fp8_gemm.rs, ops/act_quant.rs, tma.rs, ops/mod.rs).

mod gpu_support;

use half::bf16;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use rayon::prelude::*;

use r1_runtime::cuda::heuristics::{self, SPLIT_K_MIN_KBLOCKS};
use r1_runtime::cuda::ops::SplitKWorkspace;
use r1_runtime::cuda::{
    act_scale_m_pad, scales_to_sa, CudaError, Device, DeviceBuffer, Fp8GemmArgs, Fp8Weight,
    GemmKernel, QuantizedActivations,
};
use r1_runtime::numerics::{self, QuantizedRows, QUANT_BLOCK};

use gpu_support::{
    allow_no_device, check_close_at, fp8_weights, gpu, ref_kernel_dot_splits, skipped,
    w8a8_row_splits, widen, Rng, DEEPSEEK_NK, TOLERANCE,
};

// ------------------------------------------------------------------------------------------
// Data
// ------------------------------------------------------------------------------------------

/// Activations like a model's: per-row magnitude 10^[-3, 3], some all-zero 128-groups, a few
/// outlier channels. Rounded to bf16.
fn activations(rng: &mut Rng, m: usize, k: usize) -> Vec<bf16> {
    let mut x = Vec::with_capacity(m * k);
    for _ in 0..m {
        let mag = 10f32.powf(rng.unit() * 6.0 - 3.0);
        for g in 0..k.div_ceil(QUANT_BLOCK) {
            let len = (k - g * QUANT_BLOCK).min(QUANT_BLOCK);
            let zero = rng.below(16) == 0;
            for _ in 0..len {
                let mut v = if zero { 0.0 } else { rng.normal() * mag };
                if rng.below(512) == 0 {
                    v *= 100.0;
                }
                x.push(bf16::from_f32(v));
            }
        }
    }
    x
}

/// CPU-quantized activations of random values (any K).
fn quantized(rng: &mut Rng, m: usize, k: usize) -> QuantizedRows {
    numerics::act_quant(&widen(&activations(rng, m, k)), k)
}

/// `numerics::block_gemm_w8a8` for the listed rows (in parallel), rounded to bf16:
/// out[i * n + j] for rows[i].
fn cpu_w8a8(a: &QuantizedRows, rows: &[usize], codes: &[u8], scales: &[f32], n: usize) -> Vec<f32> {
    cpu_w8a8_splits(a, rows, codes, scales, n, 1)
}

/// [`cpu_w8a8`] in the order of `splits` splits of K (`numerics::block_gemm_w8a8_splits`).
fn cpu_w8a8_splits(
    a: &QuantizedRows,
    rows: &[usize],
    codes: &[u8],
    scales: &[f32],
    n: usize,
    splits: usize,
) -> Vec<f32> {
    let per_row: Vec<Vec<f32>> = rows
        .par_iter()
        .map(|&r| w8a8_row_splits(a, r, codes, scales, n, splits))
        .collect();
    per_row.concat()
}

/// The reference kernel's arithmetic, in its order, on the CPU: bf16 bits [m][n].
fn cpu_ref_kernel(a: &QuantizedRows, codes: &[u8], scales: &[f32], n: usize) -> Vec<u16> {
    cpu_ref_kernel_splits(a, codes, scales, n, 1)
}

/// [`cpu_ref_kernel`] with `splits` splits of K, as fp8_gemm_ref sums them.
fn cpu_ref_kernel_splits(
    a: &QuantizedRows,
    codes: &[u8],
    scales: &[f32],
    n: usize,
    splits: usize,
) -> Vec<u16> {
    let k = a.cols;
    let kb = k.div_ceil(QUANT_BLOCK);
    let rows: Vec<Vec<u16>> = (0..a.rows)
        .into_par_iter()
        .map(|r| {
            let arow = &a.codes[r * k..(r + 1) * k];
            let sa = &a.scales[r * kb..(r + 1) * kb];
            (0..n)
                .map(|j| {
                    let wrow = &codes[j * k..(j + 1) * k];
                    let sb = &scales[(j / QUANT_BLOCK) * kb..][..kb];
                    bf16::from_f32(ref_kernel_dot_splits(arow, wrow, sa, sb, splits)).to_bits()
                })
                .collect()
        })
        .collect();
    rows.concat()
}

// ------------------------------------------------------------------------------------------
// Running kernels
// ------------------------------------------------------------------------------------------

/// bf16 NaN with all bits set: what unwritten output memory holds.
const SENTINEL: u16 = 0xFFFF;

/// Runs one GEMM into a `[(m + 1), ldd]` buffer pre-filled with SENTINEL, checks that nothing
/// outside [m, n] was written, and returns the kernel that ran and D compacted to [m][n].
fn gemm_on_gpu(
    dev: &Device,
    a: &QuantizedActivations,
    w: &Fp8Weight,
    kernel: GemmKernel,
    ldd: usize,
) -> Result<(GemmKernel, Vec<bf16>), String> {
    gemm_on_gpu_split(dev, a, w, kernel, ldd, Split::None, None)
}

/// How a test GEMM splits K.
#[derive(Clone, Copy)]
enum Split<'a> {
    None,
    /// As the heuristic says, with this workspace.
    Auto(&'a SplitKWorkspace),
    /// Exactly this many splits.
    Forced(&'a SplitKWorkspace, usize),
}

/// [`gemm_on_gpu`] with a split of K and optionally `ctas` persistent CTAs.
fn gemm_on_gpu_split(
    dev: &Device,
    a: &QuantizedActivations,
    w: &Fp8Weight,
    kernel: GemmKernel,
    ldd: usize,
    split: Split<'_>,
    ctas: Option<u32>,
) -> Result<(GemmKernel, Vec<bf16>), String> {
    let (m, n) = (a.m, w.n);
    let mut d: DeviceBuffer<bf16> = dev.alloc((m + 1) * ldd).map_err(|e| e.to_string())?;
    dev.memset(&mut d, 0xFF).map_err(|e| e.to_string())?;
    let args = Fp8GemmArgs {
        ldd,
        ..Fp8GemmArgs::new(a, w, &mut d)
    };
    let args = match split {
        Split::None => args,
        Split::Auto(ws) => args.with_split_k(ws),
        Split::Forced(ws, s) => args.with_splits(ws, s),
    };
    let ran = {
        let mut p = dev
            .prepare_fp8_gemm(args, kernel)
            .map_err(|e| e.to_string())?;
        if let Some(ctas) = ctas {
            p = p.with_persistent_ctas(ctas).map_err(|e| e.to_string())?;
        }
        p.launch().map_err(|e| e.to_string())?;
        p.kernel()
    };
    let all = dev.download(&d).map_err(|e| e.to_string())?;
    let mut out = Vec::with_capacity(m * n);
    for (r, row) in all.chunks(ldd).enumerate() {
        for (c, v) in row.iter().enumerate() {
            let inside = r < m && c < n;
            if inside {
                out.push(*v);
            } else if v.to_bits() != SENTINEL {
                return Err(format!(
                    "{}: wrote outside [M={m}, N={n}] at row {r}, column {c} (ldd {ldd})",
                    ran.name()
                ));
            }
        }
    }
    Ok((ran, out))
}

/// Compares GPU bf16 output with a reference (f32 values already rounded to bf16) under
/// [`TOLERANCE`]. `rows` maps the reference's rows to rows of `got` ([.., n] each).
fn check_close(
    got: &[bf16],
    n: usize,
    rows: &[usize],
    want: &[f32],
    what: &str,
) -> Result<(), String> {
    let got = rows
        .iter()
        .flat_map(|&r| got[r * n..(r + 1) * n].iter().map(|v| v.to_f32()));
    check_close_at(got, want, TOLERANCE, what, |i| {
        format!("D[{}][{}]", rows[i / n], i % n)
    })
}

fn fail(msg: String) -> TestCaseError {
    TestCaseError::fail(msg)
}

fn runner(cases: u32) -> TestRunner {
    TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    })
}

// ------------------------------------------------------------------------------------------
// Typed errors: run everywhere
// ------------------------------------------------------------------------------------------

/// Opening a device never panics: on a machine without one it is a typed error.
#[test]
fn device_open_reports_typed_errors() {
    match Device::open(0) {
        Ok(dev) => {
            assert_eq!(dev.info().compute_capability, (9, 0));
            // An ordinal past the last device is NoDevice with the real count.
            match Device::open(1000) {
                Err(CudaError::NoDevice {
                    ordinal: 1000,
                    count,
                }) => assert!(count >= 1),
                other => panic!("expected NoDevice for ordinal 1000, got {other:?}"),
            }
        }
        Err(e) => {
            allow_no_device(&e);
            assert!(
                matches!(
                    e,
                    CudaError::NoDriver(_)
                        | CudaError::NoDevice { .. }
                        | CudaError::WrongArch { .. }
                        | CudaError::BuiltWithoutKernels
                        | CudaError::Driver { .. }
                        | CudaError::DriverPanic { .. }
                ),
                "{e:?}"
            );
            assert!(!e.to_string().is_empty());
            if !r1_runtime::cuda::kernels_built() && Device::probe(0).is_ok() {
                assert_eq!(e, CudaError::BuiltWithoutKernels);
            }
            if let CudaError::BuiltWithoutKernels = e {
                assert!(e.to_string().contains("tools/install-cuda-toolchain"));
            }
            skipped(&e, "device_open_reports_typed_errors: typed error checked");
        }
    }
}

// ------------------------------------------------------------------------------------------
// act_quant
// ------------------------------------------------------------------------------------------

fn check_act_quant(dev: &Device, x: &[bf16], m: usize, k: usize) -> Result<(), String> {
    let want = numerics::act_quant(&widen(x), k);
    let xd = dev.upload(x).map_err(|e| e.to_string())?;
    let got = dev
        .act_quant(&xd, m, k)
        .and_then(|q| q.download(dev))
        .map_err(|e| e.to_string())?;
    if let Some(i) = (0..want.codes.len()).find(|&i| got.codes[i] != want.codes[i]) {
        let (r, c) = (i / k, i % k);
        return Err(format!(
            "act_quant [M={m}, K={k}]: code [{r}][{c}] = {:#04x}, CPU {:#04x} (x = {})",
            got.codes[i], want.codes[i], x[i]
        ));
    }
    let kb = k / QUANT_BLOCK;
    if let Some(i) =
        (0..want.scales.len()).find(|&i| got.scales[i].to_bits() != want.scales[i].to_bits())
    {
        return Err(format!(
            "act_quant [M={m}, K={k}]: scale [{}][{}] = {:e}, CPU {:e}",
            i / kb,
            i % kb,
            got.scales[i],
            want.scales[i]
        ));
    }
    Ok(())
}

#[test]
fn act_quant_matches_cpu_bit_exact() {
    let Some(dev) = gpu("act_quant_matches_cpu_bit_exact") else {
        return;
    };
    let mut rng = Rng::new(1);
    for (m, k) in [
        (1, 128),
        (3, 256),
        (64, 7168),
        (130, 1536),
        (1000, 512),
        (4096, 2048),
    ] {
        check_act_quant(dev, &activations(&mut rng, m, k), m, k).unwrap();
    }
    runner(16)
        .run(
            &(1usize..300, 1usize..=24, any::<u64>()),
            |(m, kb, seed)| {
                let k = kb * QUANT_BLOCK;
                let x = activations(&mut Rng::new(seed), m, k);
                check_act_quant(dev, &x, m, k).map_err(fail)
            },
        )
        .unwrap();
}

#[test]
fn act_quant_special_values() {
    let Some(dev) = gpu("act_quant_special_values") else {
        return;
    };
    let k = 6 * QUANT_BLOCK;
    let mut x = Vec::new();
    for row in 0..5 {
        for g in 0..6 {
            for i in 0..QUANT_BLOCK {
                let v = match (row + g) % 6 {
                    0 => 0.0, // all zero: amax floor
                    1 => {
                        if i % 2 == 0 {
                            -0.0
                        } else {
                            1e-30
                        }
                    } // below the floor
                    2 => 3.0e38 * if i % 3 == 0 { -1.0 } else { 0.5 }, // near bf16 max
                    3 => (i as f32 - 64.0) * 1e-6, // subnormal e4m3 codes
                    4 => {
                        if i == 7 {
                            1e4
                        } else {
                            1.0
                        }
                    } // one outlier
                    _ => 448.0 * (i as f32 / 127.0) - 224.0, // ties and steps
                };
                x.push(bf16::from_f32(v));
            }
        }
    }
    check_act_quant(dev, &x, 5, k).unwrap();
}

// ------------------------------------------------------------------------------------------
// fp8_gemm_ref: bit-exact
// ------------------------------------------------------------------------------------------

fn check_ref_kernel(dev: &Device, m: usize, n: usize, k: usize, seed: u64) -> Result<(), String> {
    let mut rng = Rng::new(seed);
    let a = quantized(&mut rng, m, k);
    let (codes, scales) = fp8_weights(&mut rng, 1, n, k);
    let ad = QuantizedActivations::upload(dev, &a).map_err(|e| e.to_string())?;
    let wd = Fp8Weight::upload(dev, &codes, &scales, n, k).map_err(|e| e.to_string())?;
    let (ran, got) = gemm_on_gpu(dev, &ad, &wd, GemmKernel::Reference, n)?;
    assert_eq!(ran, GemmKernel::Reference);
    let want = cpu_ref_kernel(&a, &codes, &scales, n);
    if let Some(i) = (0..m * n).find(|&i| got[i].to_bits() != want[i]) {
        return Err(format!(
            "fp8_gemm_ref [M={m}, N={n}, K={k}]: D[{}][{}] = {} ({:#06x}), CPU {} ({:#06x})",
            i / n,
            i % n,
            got[i],
            got[i].to_bits(),
            bf16::from_bits(want[i]),
            want[i]
        ));
    }
    Ok(())
}

#[test]
fn fp8_gemm_ref_bit_exact() {
    let Some(dev) = gpu("fp8_gemm_ref_bit_exact") else {
        return;
    };
    for (m, n, k) in [(1, 1, 1), (17, 129, 129), (5, 300, 100), (64, 256, 1024)] {
        check_ref_kernel(dev, m, n, k, (m * n * k) as u64).unwrap();
    }
    runner(16)
        .run(
            &(1usize..200, 1usize..300, 1usize..700, any::<u64>()),
            |(m, n, k, seed)| check_ref_kernel(dev, m, n, k, seed).map_err(fail),
        )
        .unwrap();
}

// ------------------------------------------------------------------------------------------
// wgmma kernels vs block_gemm_w8a8
// ------------------------------------------------------------------------------------------

/// Runs `kernels` on one random problem (ldd = n rounded up to even, plus `extra_ld`) and
/// compares each with the CPU reference on `rows` (all rows when None).
fn check_fast_kernels(
    dev: &Device,
    (m, n, k): (usize, usize, usize),
    seed: u64,
    kernels: &[GemmKernel],
    extra_ld: usize,
    rows: Option<Vec<usize>>,
) -> Result<(), String> {
    let mut rng = Rng::new(seed);
    let a = quantized(&mut rng, m, k);
    let (codes, scales) = fp8_weights(&mut rng, 1, n, k);
    let ad = QuantizedActivations::upload(dev, &a).map_err(|e| e.to_string())?;
    let wd = Fp8Weight::upload(dev, &codes, &scales, n, k).map_err(|e| e.to_string())?;
    let rows = rows.unwrap_or_else(|| (0..m).collect());
    let want = cpu_w8a8(&a, &rows, &codes, &scales, n);
    let ldd = n.next_multiple_of(2) + extra_ld;
    for &kernel in kernels {
        let (ran, got) = gemm_on_gpu(dev, &ad, &wd, kernel, ldd)?;
        if kernel != GemmKernel::Auto && ran != kernel {
            return Err(format!("asked for {kernel:?}, ran {ran:?}"));
        }
        let what = format!("{} [M={m}, N={n}, K={k}, ldd={ldd}]", ran.name());
        check_close(&got, n, &rows, &want, &what)?;
    }
    Ok(())
}

#[test]
fn fp8_gemm_wgmma_random_shapes() {
    let Some(dev) = gpu("fp8_gemm_wgmma_random_shapes") else {
        return;
    };
    runner(16)
        .run(
            &(
                1usize..300,
                1usize..600,
                1usize..=8,
                0usize..3,
                any::<u64>(),
            ),
            |(m, n, kb, extra, seed)| {
                check_fast_kernels(
                    dev,
                    (m, n, kb * QUANT_BLOCK),
                    seed,
                    &[GemmKernel::Wgmma, GemmKernel::WgmmaM64, GemmKernel::Auto],
                    2 * extra,
                    None,
                )
                .map_err(fail)
            },
        )
        .unwrap();
}

/// Every DeepSeek-V3 FP8 GEMM shape at M = 1, 64, 128, both wgmma kernels, all rows checked.
#[test]
fn fp8_gemm_deepseek_shapes() {
    let Some(dev) = gpu("fp8_gemm_deepseek_shapes") else {
        return;
    };
    for (i, &(n, k)) in DEEPSEEK_NK.iter().enumerate() {
        for m in [1, 64, 128] {
            check_fast_kernels(
                dev,
                (m, n, k),
                (i * 1000 + m) as u64,
                &[GemmKernel::Wgmma, GemmKernel::WgmmaM64],
                0,
                None,
            )
            .unwrap();
        }
    }
}

/// M = 4096 for two shapes (time): both wgmma kernels on a sample of rows against the CPU, and
/// in full against the reference kernel.
#[test]
fn fp8_gemm_deepseek_shapes_m4096() {
    let Some(dev) = gpu("fp8_gemm_deepseek_shapes_m4096") else {
        return;
    };
    let m = 4096;
    for (n, k) in [(7168, 16384), (2112, 7168)] {
        let mut rng = Rng::new(n as u64 ^ k as u64);
        let mut rows = vec![0, 1, 63, 64, 127, 128, 129, 1023, 2047, 2048, 4094, 4095];
        rows.extend((0..28).map(|_| rng.below(m)));
        let a = quantized(&mut rng, m, k);
        let (codes, scales) = fp8_weights(&mut rng, 1, n, k);
        let ad = QuantizedActivations::upload(dev, &a).unwrap();
        let wd = Fp8Weight::upload(dev, &codes, &scales, n, k).unwrap();
        let want = cpu_w8a8(&a, &rows, &codes, &scales, n);
        let (_, reference) = gemm_on_gpu(dev, &ad, &wd, GemmKernel::Reference, n).unwrap();
        let reference: Vec<f32> = reference.iter().map(|v| v.to_f32()).collect();
        let all: Vec<usize> = (0..m).collect();
        for kernel in [GemmKernel::Wgmma, GemmKernel::WgmmaM64] {
            let (_, got) = gemm_on_gpu(dev, &ad, &wd, kernel, n).unwrap();
            let what = format!("{} [M={m}, N={n}, K={k}]", kernel.name());
            check_close(&got, n, &rows, &want, &format!("{what} vs CPU")).unwrap();
            check_close(
                &got,
                n,
                &all,
                &reference,
                &format!("{what} vs fp8_gemm_ref"),
            )
            .unwrap();
        }
    }
}

// ------------------------------------------------------------------------------------------
// Errors and fallbacks on the device
// ------------------------------------------------------------------------------------------

#[test]
fn fp8_gemm_rejects_and_falls_back() {
    let Some(dev) = gpu("fp8_gemm_rejects_and_falls_back") else {
        return;
    };
    let (m, n, k) = (9, 200, 100);
    let mut rng = Rng::new(7);
    let a = quantized(&mut rng, m, k);
    let (codes, scales) = fp8_weights(&mut rng, 1, n, k);
    let ad = QuantizedActivations::upload(dev, &a).unwrap();
    let wd = Fp8Weight::upload(dev, &codes, &scales, n, k).unwrap();
    for kernel in [GemmKernel::Wgmma, GemmKernel::WgmmaM64] {
        let e = dev.fp8_gemm(&ad, &wd, kernel).unwrap_err().to_string();
        assert!(e.contains("K must be a multiple of 128"), "{e}");
    }
    // Auto takes the reference kernel, which is exact.
    let (d, ran) = dev.fp8_gemm(&ad, &wd, GemmKernel::Auto).unwrap();
    assert_eq!(ran, GemmKernel::Reference);
    let got: Vec<u16> = dev
        .download(&d)
        .unwrap()
        .iter()
        .map(|v| v.to_bits())
        .collect();
    assert_eq!(got, cpu_ref_kernel(&a, &codes, &scales, n));

    // act_quant refuses K % 128 != 0 too.
    let x = dev.upload(&activations(&mut rng, m, k)).unwrap();
    let e = dev.act_quant(&x, m, k).unwrap_err().to_string();
    assert!(e.contains("act_quant: K must be a multiple of 128"), "{e}");

    // Mismatched K between activations and weight.
    let a256 = QuantizedActivations::upload(dev, &quantized(&mut rng, m, 256)).unwrap();
    assert!(dev.fp8_gemm(&a256, &wd, GemmKernel::Auto).is_err());

    // A row stride TMA cannot take (lda = K + 8): fast path refuses, Auto falls back.
    let k = 256;
    let lda = k + 8;
    let q = quantized(&mut rng, m, k);
    let mut padded = vec![0u8; m * lda];
    for r in 0..m {
        padded[r * lda..r * lda + k].copy_from_slice(&q.codes[r * k..(r + 1) * k]);
    }
    let a_codes = dev.upload(&padded).unwrap();
    let m_pad = act_scale_m_pad(m);
    let sa = dev.upload(&scales_to_sa(&q.scales, m, 2, m_pad)).unwrap();
    let (codes, scales) = fp8_weights(&mut rng, 1, n, k);
    let wd = Fp8Weight::upload(dev, &codes, &scales, n, k).unwrap();
    let mut d: DeviceBuffer<bf16> = dev.alloc(m * n).unwrap();
    fn args<'a>(
        (a, lda, sa, m_pad): (&'a DeviceBuffer<u8>, usize, &'a DeviceBuffer<f32>, usize),
        w: &'a Fp8Weight,
        d: &'a mut DeviceBuffer<bf16>,
        m: usize,
    ) -> Fp8GemmArgs<'a> {
        Fp8GemmArgs {
            a,
            lda,
            sa,
            m_pad,
            b: &w.codes,
            ldb: w.k,
            sb: &w.scales,
            d,
            ldd: w.n,
            m,
            n: w.n,
            k: w.k,
            split_k: None,
            splits: None,
        }
    }
    let a_in = (&a_codes, lda, &sa, m_pad);
    let e = dev
        .fp8_gemm_into(args(a_in, &wd, &mut d, m), GemmKernel::Wgmma)
        .unwrap_err()
        .to_string();
    assert!(e.contains("lda must be a multiple of 16"), "{e}");
    assert_eq!(
        dev.fp8_gemm_into(args(a_in, &wd, &mut d, m), GemmKernel::Auto)
            .unwrap(),
        GemmKernel::Reference
    );
    let got: Vec<u16> = dev
        .download(&d)
        .unwrap()
        .iter()
        .map(|v| v.to_bits())
        .collect();
    assert_eq!(got, cpu_ref_kernel(&q, &codes, &scales, n));
}

/// The short case tools/gpu-suite runs under compute-sanitizer: act_quant on the GPU feeding
/// every GEMM kernel, ragged M and N (partial tiles, OOB TMA boxes, masked stores).
#[test]
fn sanitizer_smoke() {
    let Some(dev) = gpu("sanitizer_smoke") else {
        return;
    };
    let (m, n, k) = (70, 200, 384);
    let mut rng = Rng::new(42);
    let x = activations(&mut rng, m, k);
    check_act_quant(dev, &x, m, k).unwrap();
    let xd = dev.upload(&x).unwrap();
    let ad = dev.act_quant(&xd, m, k).unwrap();
    let a = numerics::act_quant(&widen(&x), k);
    let (codes, scales) = fp8_weights(&mut rng, 1, n, k);
    let wd = Fp8Weight::upload(dev, &codes, &scales, n, k).unwrap();
    let rows: Vec<usize> = (0..m).collect();
    let want = cpu_w8a8(&a, &rows, &codes, &scales, n);
    for kernel in [
        GemmKernel::Wgmma,
        GemmKernel::WgmmaM64,
        GemmKernel::Reference,
    ] {
        let (_, got) = gemm_on_gpu(dev, &ad, &wd, kernel, n).unwrap();
        check_close(&got, n, &rows, &want, kernel.name()).unwrap();
    }
    let (_, got) = gemm_on_gpu(dev, &ad, &wd, GemmKernel::Reference, n).unwrap();
    let exact: Vec<u16> = got.iter().map(|v| v.to_bits()).collect();
    assert_eq!(exact, cpu_ref_kernel(&a, &codes, &scales, n));
    dev.synchronize().unwrap();
}

// ------------------------------------------------------------------------------------------
// Split-K
// ------------------------------------------------------------------------------------------

const WGMMA_KERNELS: [GemmKernel; 2] = [GemmKernel::Wgmma, GemmKernel::WgmmaM64];

/// R1's decode FP8 GEMMs (N, K) at TP 1 and TP 8 (q_a, kv_a, q_b, o_proj, dense gate/up and
/// down, shared-expert gate/up and down; the table of heuristics' tests).
const R1_DECODE_NK: [(usize, usize); 13] = [
    (1536, 7168),
    (576, 7168),
    (24576, 1536),
    (7168, 16384),
    (18432, 7168),
    (7168, 18432),
    (2048, 7168),
    (7168, 2048),
    (3072, 1536),
    (2304, 7168),
    (7168, 2304),
    (256, 7168),
    (7168, 256),
];

/// The most splits the heuristic considers for `kernel` on this device (at least 1).
fn most_splits(dev: &Device, kernel: GemmKernel, m: usize, n: usize, k: usize) -> usize {
    let t = kernel.tiling().expect("a wgmma kernel");
    heuristics::split_k_most(m, n, k, t, dev.info().sm_count)
}

/// Every split count from 1 to the heuristic's most, for both wgmma kernels, on one problem:
/// each against `block_gemm_w8a8_splits` with the same splits on `rows` (all when None), with
/// nothing written outside [M, N] and every output in it written (finite).
fn check_split_counts(
    dev: &Device,
    ws: &SplitKWorkspace,
    (m, n, k): (usize, usize, usize),
    seed: u64,
    rows: Option<Vec<usize>>,
) -> Result<(), String> {
    let mut rng = Rng::new(seed);
    let a = quantized(&mut rng, m, k);
    let (codes, scales) = fp8_weights(&mut rng, 1, n, k);
    let ad = QuantizedActivations::upload(dev, &a).map_err(|e| e.to_string())?;
    let wd = Fp8Weight::upload(dev, &codes, &scales, n, k).map_err(|e| e.to_string())?;
    let rows = rows.unwrap_or_else(|| (0..m).collect());
    let ldd = n.next_multiple_of(2);
    let most = WGMMA_KERNELS
        .iter()
        .map(|&kernel| most_splits(dev, kernel, m, n, k))
        .max()
        .unwrap_or(1);
    for splits in 1..=most {
        let want = cpu_w8a8_splits(&a, &rows, &codes, &scales, n, splits);
        for kernel in WGMMA_KERNELS {
            if splits > most_splits(dev, kernel, m, n, k) {
                continue;
            }
            let (_, got) =
                gemm_on_gpu_split(dev, &ad, &wd, kernel, ldd, Split::Forced(ws, splits), None)?;
            let what = format!("{} [M={m}, N={n}, K={k}] splits {splits}", kernel.name());
            if let Some(i) = got.iter().position(|v| !v.to_f32().is_finite()) {
                return Err(format!("{what}: D[{}][{}] = {}", i / n, i % n, got[i]));
            }
            check_close(&got, n, &rows, &want, &what)?;
        }
    }
    Ok(())
}

#[test]
fn fp8_gemm_split_k_random_shapes() {
    let Some(dev) = gpu("fp8_gemm_split_k_random_shapes") else {
        return;
    };
    let ws = SplitKWorkspace::for_device(dev).unwrap();
    runner(24)
        .run(
            &(1usize..=130, 1usize..=600, 1usize..=32, any::<u64>()),
            |(m, n, kb, seed)| {
                check_split_counts(dev, &ws, (m, n, kb * QUANT_BLOCK), seed, None).map_err(fail)
            },
        )
        .unwrap();
}

/// R1's decode shapes at M = 1 (all rows) and M = 64 (rows at every 16-row slice edge).
#[test]
fn fp8_gemm_split_k_r1_decode_shapes() {
    let Some(dev) = gpu("fp8_gemm_split_k_r1_decode_shapes") else {
        return;
    };
    let ws = SplitKWorkspace::for_device(dev).unwrap();
    for (i, &(n, k)) in R1_DECODE_NK.iter().enumerate() {
        for (m, rows) in [
            (1, None),
            (64, Some(vec![0, 1, 7, 8, 15, 16, 31, 32, 47, 48, 62, 63])),
        ] {
            check_split_counts(dev, &ws, (m, n, k), (i * 100 + m) as u64, rows).unwrap();
        }
    }
}

/// Split GEMMs are bit-identical run to run, across grids (one CTA walking every unit, a few,
/// the default) and after other split GEMMs on the same workspace; every launch leaves the
/// arrival counters zero (a non-zero counter would make a later launch skip or mis-sum a
/// slice).
#[test]
fn fp8_gemm_split_k_deterministic() {
    let Some(dev) = gpu("fp8_gemm_split_k_deterministic") else {
        return;
    };
    let ws = SplitKWorkspace::for_device(dev).unwrap();
    let mut rng = Rng::new(77);
    let problems: Vec<_> = [
        (1, 1536, 7168),
        (8, 576, 7168),
        (70, 300, 2048),
        (33, 7168, 2048),
    ]
    .into_iter()
    .map(|(m, n, k)| {
        let a = quantized(&mut rng, m, k);
        let (codes, scales) = fp8_weights(&mut rng, 1, n, k);
        (
            QuantizedActivations::upload(dev, &a).unwrap(),
            Fp8Weight::upload(dev, &codes, &scales, n, k).unwrap(),
        )
    })
    .collect();
    let counters_zero = |what: &str| {
        let c = dev.download(ws.counters()).unwrap();
        assert!(
            c.iter().all(|&v| v == 0),
            "{what}: split-K counters left non-zero"
        );
    };
    for kernel in WGMMA_KERNELS {
        for (a, w) in &problems {
            let (m, n, k) = (a.m, w.n, w.k);
            let most = most_splits(dev, kernel, m, n, k);
            for split in [Split::Auto(&ws), Split::Forced(&ws, most)] {
                let what = format!("{} [M={m}, N={n}, K={k}]", kernel.name());
                let bits = |ctas| {
                    let (_, got) = gemm_on_gpu_split(dev, a, w, kernel, n, split, ctas).unwrap();
                    counters_zero(&what);
                    got.iter().map(|v| v.to_bits()).collect::<Vec<u16>>()
                };
                let first = bits(None);
                assert!(
                    first.iter().all(|&b| b != SENTINEL),
                    "{what}: an output was not written"
                );
                for ctas in [None, Some(1), Some(7), None] {
                    assert_eq!(bits(ctas), first, "{what} on {ctas:?} CTAs");
                }
            }
        }
        // Back to back on one stream and one workspace, no sync in between: each equals its
        // own first run.
        let firsts: Vec<Vec<bf16>> = problems
            .iter()
            .map(|(a, w)| {
                let s = most_splits(dev, kernel, a.m, w.n, w.k);
                gemm_on_gpu_split(dev, a, w, kernel, w.n, Split::Forced(&ws, s), None)
                    .unwrap()
                    .1
            })
            .collect();
        let mut ds = Vec::new();
        for (a, w) in &problems {
            let mut d: DeviceBuffer<bf16> = dev.alloc(a.m * w.n).unwrap();
            let s = most_splits(dev, kernel, a.m, w.n, w.k);
            dev.fp8_gemm_into(Fp8GemmArgs::new(a, w, &mut d).with_splits(&ws, s), kernel)
                .unwrap();
            ds.push(d);
        }
        for (d, first) in ds.iter().zip(&firsts) {
            let got = dev.download(d).unwrap();
            assert!(
                got.iter()
                    .zip(first)
                    .all(|(g, f)| g.to_bits() == f.to_bits()),
                "{}: back-to-back split GEMMs differ from single runs",
                kernel.name()
            );
        }
        counters_zero("back to back");
    }
}

/// fp8_gemm_ref with splits: bf16 bits identical to the CPU loop in its split order (ragged K
/// too); splits 1 is the unsplit kernel.
#[test]
fn fp8_gemm_ref_split_k_bit_exact() {
    let Some(dev) = gpu("fp8_gemm_ref_split_k_bit_exact") else {
        return;
    };
    // The reference kernel needs no room in the workspace for its splits.
    let ws = SplitKWorkspace::new(dev, 1, 1).unwrap();
    let check = |m: usize, n: usize, k: usize, pick: usize, seed: u64| -> Result<(), String> {
        let mut rng = Rng::new(seed);
        let a = quantized(&mut rng, m, k);
        let (codes, scales) = fp8_weights(&mut rng, 1, n, k);
        let ad = QuantizedActivations::upload(dev, &a).map_err(|e| e.to_string())?;
        let wd = Fp8Weight::upload(dev, &codes, &scales, n, k).map_err(|e| e.to_string())?;
        let splits = 1 + pick % k.div_ceil(QUANT_BLOCK);
        let (ran, got) = gemm_on_gpu_split(
            dev,
            &ad,
            &wd,
            GemmKernel::Reference,
            n,
            Split::Forced(&ws, splits),
            None,
        )?;
        assert_eq!(ran, GemmKernel::Reference);
        let want = cpu_ref_kernel_splits(&a, &codes, &scales, n, splits);
        if let Some(i) = (0..m * n).find(|&i| got[i].to_bits() != want[i]) {
            return Err(format!(
                "fp8_gemm_ref [M={m}, N={n}, K={k}] splits {splits}: D[{}][{}] = {:#06x}, CPU \
                 {:#06x}",
                i / n,
                i % n,
                got[i].to_bits(),
                want[i]
            ));
        }
        Ok(())
    };
    check(3, 130, 7168, 55, 1).unwrap();
    check(5, 17, 1000, 7, 2).unwrap();
    runner(16)
        .run(
            &(
                1usize..100,
                1usize..300,
                1usize..3000,
                any::<usize>(),
                any::<u64>(),
            ),
            |(m, n, k, pick, seed)| check(m, n, k, pick, seed).map_err(fail),
        )
        .unwrap();
}

/// A workspace too small for the split asked for (or chosen) is refused before any launch,
/// naming what it lacks; splits outside 1..=K-blocks too.
#[test]
fn fp8_gemm_split_k_rejects_small_workspaces() {
    let Some(dev) = gpu("fp8_gemm_split_k_rejects_small_workspaces") else {
        return;
    };
    let (m, n, k) = (1, 1536, 7168);
    let mut rng = Rng::new(5);
    let a = QuantizedActivations::upload(dev, &quantized(&mut rng, m, k)).unwrap();
    let (codes, scales) = fp8_weights(&mut rng, 1, n, k);
    let w = Fp8Weight::upload(dev, &codes, &scales, n, k).unwrap();
    let mut d: DeviceBuffer<bf16> = dev.alloc(m * n).unwrap();
    let kernel = GemmKernel::WgmmaM64;
    let err = |args: Fp8GemmArgs<'_>| match dev.prepare_fp8_gemm(args, kernel) {
        Ok(_) => panic!("a split the workspace cannot hold was accepted"),
        Err(e) => e.to_string(),
    };
    // 12 tiles of [64, 128]: room for 5 units of [128, 128] holds 10 of their units.
    let small = SplitKWorkspace::new(dev, 5, 12).unwrap();
    let e = err(Fp8GemmArgs::new(&a, &w, &mut d).with_splits(&small, 11));
    assert!(e.contains("split-K partials holds"), "{e}");
    let e = err(Fp8GemmArgs::new(&a, &w, &mut d).with_split_k(&small));
    assert!(e.contains("split-K partials holds"), "{e}");
    let few_tiles = SplitKWorkspace::new(dev, 132, 2).unwrap();
    let e = err(Fp8GemmArgs::new(&a, &w, &mut d).with_splits(&few_tiles, 2));
    assert!(e.contains("split-K counters holds"), "{e}");
    let ws = SplitKWorkspace::for_device(dev).unwrap();
    let e = err(Fp8GemmArgs::new(&a, &w, &mut d).with_splits(&ws, 57));
    assert!(e.contains("splits <= K-blocks (56)"), "{e}");
    // The heuristic's choice always fits the device's workspace.
    let p = dev
        .prepare_fp8_gemm(Fp8GemmArgs::new(&a, &w, &mut d).with_split_k(&ws), kernel)
        .unwrap();
    let s = heuristics::split_k(m, n, k, heuristics::FP8_TILING_M64, dev.info().sm_count);
    assert!(s > 1 && (k / QUANT_BLOCK) / s >= SPLIT_K_MIN_KBLOCKS);
    assert_eq!(p.launch_configs()[0].grid_dim.0 as usize, 12 * s);
}
