//! The harness shared by the GPU tests (tests/gpu_kernels.rs, gpu_mla.rs, gpu_moe.rs: `mod
//! gpu_support;`) and the GPU benches (bench/common includes this file by path): opening the
//! device once and skipping visibly without one, the deterministic generator, test data, CPU
//! models of the kernels' arithmetic, and the elementwise + rms tolerance check.
//!
//! Skipping: without a usable device (no libcuda, no GPU, not sm_90, or built without nvcc) a
//! GPU test prints `skipped: no CUDA device (<reason>) [<test>]` straight to stderr (past
//! libtest's capture, so the skip is visible in `cargo test` output) and returns. With
//! `R1_REQUIRE_GPU` set (non-empty and not "0"; tools/gpu-suite sets it) that is a failure.
#![allow(dead_code)]

use std::fmt::{Debug, Display};
use std::io::Write as _;
use std::sync::OnceLock;

use half::bf16;
use r1_runtime::config::ModelConfig;
use r1_runtime::cuda::ops::RouterConfig;
use r1_runtime::cuda::{
    CudaError, Device, DeviceBuffer, Mla, MlaAttnArgs, MlaBatch, MlaCache, MlaKernel, MlaWorkspace,
    MLA_FAST_KV_LORA,
};
use r1_runtime::numerics::sampling::SplitMix64;
use r1_runtime::numerics::{self, e4m3_to_f32, f32_to_e4m3, QuantizedRows, QUANT_BLOCK};

// ------------------------------------------------------------------------------------------
// Device and skipping
// ------------------------------------------------------------------------------------------

/// `R1_REQUIRE_GPU` is set: a missing device fails instead of skipping.
pub fn require_gpu() -> bool {
    std::env::var_os("R1_REQUIRE_GPU").is_some_and(|v| !v.is_empty() && v != "0")
}

/// Writes to the process's stderr directly: libtest captures `eprintln!`, not this.
pub fn say(line: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// Device 0, opened once per test binary. The first successful open prints one line naming the
/// GPU, prefixed by the binary's name (`gpu_kernels: NVIDIA H100 ... (sm_90, ...)`).
pub fn device() -> Result<&'static Device, &'static CudaError> {
    static DEVICE: OnceLock<Result<Device, CudaError>> = OnceLock::new();
    DEVICE
        .get_or_init(|| {
            let r = Device::open(0);
            if let Ok(d) = &r {
                let i = d.info();
                say(&format!(
                    "{}: {} (sm_{}{}, {} SMs, {} MiB L2, driver {})",
                    env!("CARGO_CRATE_NAME"),
                    i.name,
                    i.compute_capability.0,
                    i.compute_capability.1,
                    i.sm_count,
                    i.l2_bytes >> 20,
                    i.driver_version
                ));
            }
            r
        })
        .as_ref()
}

/// Prints the skip line of `test`.
pub fn skipped(e: &dyn Display, test: &str) {
    say(&format!("skipped: no CUDA device ({e}) [{test}]"));
}

/// `Some` of what the GPU test `test` needs, or `None` after printing its skip line (a failure
/// under `R1_REQUIRE_GPU`).
pub fn or_skip<T, E: Display>(r: Result<T, E>, test: &str) -> Option<T> {
    match r {
        Ok(v) => Some(v),
        Err(e) => {
            assert!(
                !require_gpu(),
                "R1_REQUIRE_GPU is set but the GPU tests cannot run: {e}"
            );
            skipped(&e, test);
            None
        }
    }
}

/// The shared device, or None after printing the skip line.
pub fn gpu(test: &str) -> Option<&'static Device> {
    or_skip(device(), test)
}

/// For the tests that check the typed error of a failed `Device::open(0)`: that failure is a
/// test failure under `R1_REQUIRE_GPU`.
pub fn allow_no_device(e: &CudaError) {
    assert!(
        !require_gpu(),
        "R1_REQUIRE_GPU is set but Device::open(0) failed: {e}"
    );
}

// ------------------------------------------------------------------------------------------
// Data
// ------------------------------------------------------------------------------------------

/// DeepSeek-V3's FP8 GEMM shapes (N, K): q_a+kv_a (fused), q_b, kv_b, dense/shared down,
/// o_proj... (hidden 7168, q_lora 1536, kv_lora 512, 128 heads, moe_intermediate 2048).
pub const DEEPSEEK_NK: [(usize, usize); 6] = [
    (2112, 7168),
    (24576, 1536),
    (32768, 512),
    (7168, 16384),
    (4096, 7168),
    (7168, 2048),
];

/// DeepSeek-V3's router: 256 experts in 8 groups, top-4 groups, top-8 experts, normalized,
/// scaled by 2.5.
pub fn deepseek_router() -> RouterConfig {
    RouterConfig {
        experts: 256,
        n_group: 8,
        topk_group: 4,
        top_k: 8,
        normalize: true,
        scaling: 2.5,
    }
}

/// The released DeepSeek-R1 config.json (tests/fixtures/deepseek-r1-config.json, compiled in).
pub fn deepseek_r1_config() -> ModelConfig {
    const R1: &str = include_str!("../fixtures/deepseek-r1-config.json");
    ModelConfig::from_json(R1, std::path::Path::new("config.json")).expect("R1 config parses")
}

/// Deterministic test data: the runtime's SplitMix64 (`numerics::sampling`) with helpers.
pub struct Rng(SplitMix64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(SplitMix64::new(seed))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// Uniform in [0, 1) (24 bits).
    pub fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// Roughly normal (Irwin-Hall of 4), mean 0, sd 1.
    pub fn normal(&mut self) -> f32 {
        let s: f32 = (0..4).map(|_| self.unit()).sum();
        (s - 2.0) * 3f32.sqrt()
    }

    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, self.below(i + 1));
        }
    }

    /// `len` values uniform in [lo, hi).
    pub fn uniform(&mut self, len: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..len).map(|_| lo + (hi - lo) * self.unit()).collect()
    }

    /// Random finite e4m3 codes (never the NaN codes 0x7F / 0xFF), 8 per draw.
    pub fn fp8_codes(&mut self, len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            for b in self.next_u64().to_le_bytes() {
                out.push(if b & 0x7F == 0x7F { b ^ 1 } else { b });
            }
        }
        out.truncate(len);
        out
    }
}

pub fn widen(x: &[bf16]) -> Vec<f32> {
    x.iter().map(|v| v.to_f32()).collect()
}

pub fn to_bf16(x: &[f32]) -> Vec<bf16> {
    x.iter().map(|&v| bf16::from_f32(v)).collect()
}

/// Random FP8 weights of `experts` experts in the checkpoint layout, stacked: codes [n][k]
/// (finite) and multipliers [ceil(n/128)][ceil(k/128)] per expert.
pub fn fp8_weights(rng: &mut Rng, experts: usize, n: usize, k: usize) -> (Vec<u8>, Vec<f32>) {
    let codes = (0..experts * n * k)
        .map(|_| f32_to_e4m3(rng.normal() * 64.0))
        .collect();
    let scales = (0..experts * n.div_ceil(QUANT_BLOCK) * k.div_ceil(QUANT_BLOCK))
        .map(|_| 1e-3 * (0.5 + rng.unit()))
        .collect();
    (codes, scales)
}

/// Router-like ids: each token picks `top_k` distinct experts among the first `live` (the
/// others get no token), expert `hot` (if any) by every token.
pub fn route_ids(
    rng: &mut Rng,
    tokens: usize,
    top_k: usize,
    live: usize,
    hot: Option<usize>,
) -> Vec<i32> {
    let mut out = Vec::with_capacity(tokens * top_k);
    for _ in 0..tokens {
        let mut chosen: Vec<i32> = hot.map(|h| vec![h as i32]).unwrap_or_default();
        while chosen.len() < top_k {
            let e = rng.below(live) as i32;
            if !chosen.contains(&e) {
                chosen.push(e);
            }
        }
        out.extend(chosen);
    }
    out
}

// ------------------------------------------------------------------------------------------
// CPU references
// ------------------------------------------------------------------------------------------

/// One activation row as its own QuantizedRows.
pub fn row_of(a: &QuantizedRows, r: usize) -> QuantizedRows {
    let kb = a.blocks_per_row();
    QuantizedRows {
        rows: 1,
        cols: a.cols,
        codes: a.codes[r * a.cols..(r + 1) * a.cols].to_vec(),
        scales: a.scales[r * kb..(r + 1) * kb].to_vec(),
    }
}

/// `numerics::block_gemm_w8a8` of row `r` of `a` against a weight [n][k], rounded to bf16.
pub fn w8a8_row(a: &QuantizedRows, r: usize, codes: &[u8], scales: &[f32], n: usize) -> Vec<f32> {
    w8a8_row_splits(a, r, codes, scales, n, 1)
}

/// `numerics::block_gemm_w8a8_splits` of row `r` of `a` (splits 1: [`w8a8_row`]), rounded to
/// bf16.
pub fn w8a8_row_splits(
    a: &QuantizedRows,
    r: usize,
    codes: &[u8],
    scales: &[f32],
    n: usize,
    splits: usize,
) -> Vec<f32> {
    numerics::block_gemm_w8a8_splits(&row_of(a, r), codes, scales, n, splits)
        .into_iter()
        .map(numerics::round_bf16)
        .collect()
}

/// One output of the reference GEMM kernels (fp8_gemm_ref, moe_gemm_ref) in their order: per
/// K-block a sequential `fmaf` over k ascending, then `acc = fmaf(part, sa * sb, acc)`.
/// `a_row` and `w_row` are K codes; `sa` and `sb` the row's and the weight row's K-block
/// scales.
pub fn ref_kernel_dot(a_row: &[u8], w_row: &[u8], sa: &[f32], sb: &[f32]) -> f32 {
    ref_kernel_dot_splits(a_row, w_row, sa, sb, 1)
}

/// [`ref_kernel_dot`] as fp8_gemm_ref computes it with `splits` splits of K: each split's
/// K-blocks (`numerics::split_k_range`) accumulated from zero, then the split totals added
/// left to right. One split is [`ref_kernel_dot`].
pub fn ref_kernel_dot_splits(
    a_row: &[u8],
    w_row: &[u8],
    sa: &[f32],
    sb: &[f32],
    splits: usize,
) -> f32 {
    let k = a_row.len();
    let kblocks = k.div_ceil(QUANT_BLOCK);
    let mut total = 0f32;
    for s in 0..splits {
        let mut acc = 0f32;
        for b in numerics::split_k_range(kblocks, splits, s) {
            let mut part = 0f32;
            for kk in b * QUANT_BLOCK..((b + 1) * QUANT_BLOCK).min(k) {
                part = e4m3_to_f32(a_row[kk]).mul_add(e4m3_to_f32(w_row[kk]), part);
            }
            acc = part.mul_add(sa[b] * sb[b], acc);
        }
        total = if s == 0 { acc } else { total + acc };
    }
    total
}

// ------------------------------------------------------------------------------------------
// Tolerance
// ------------------------------------------------------------------------------------------

/// A tolerance (relative, of max|ref|, rms): |got - want| <= rel |want| + of_max max|want|
/// elementwise and rms(got - want) <= rms rms(want).
pub type Tolerance = (f32, f32, f32);

/// The tolerance of the wgmma GEMMs (dense and grouped) against `block_gemm_w8a8` rounded to
/// bf16: 2^-6 |ref| + 5e-3 max|ref| elementwise, rms error <= 5e-3 rms(ref).
pub const TOLERANCE: Tolerance = (1.0 / 64.0, 5e-3, 5e-3);

/// `got` (one value per `want`) within `tol` of `want`, every value finite; `at(i)` names
/// element i in the error, which reports the worst elementwise violation.
pub fn check_close_at(
    got: impl IntoIterator<Item = f32>,
    want: &[f32],
    tol: Tolerance,
    what: &str,
    at: impl Fn(usize) -> String,
) -> Result<(), String> {
    let (rel, of_max, rms_rel) = tol;
    let max_ref = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let (mut err2, mut ref2) = (0f64, 0f64);
    let mut count = 0usize;
    let mut worst: Option<(f32, usize, f32, f32)> = None;
    for (i, (g, &w)) in got.into_iter().zip(want).enumerate() {
        if !g.is_finite() {
            return Err(format!("{what}: {} = {g} is not finite (ref {w})", at(i)));
        }
        let d = (g - w).abs();
        err2 += f64::from(d) * f64::from(d);
        ref2 += f64::from(w) * f64::from(w);
        count += 1;
        let excess = d - (rel * w.abs() + of_max * max_ref);
        if excess > 0.0 && worst.is_none_or(|x| excess > x.0) {
            worst = Some((excess, i, g, w));
        }
    }
    assert_eq!(count, want.len(), "{what}: got and want differ in length");
    if let Some((_, i, g, w)) = worst {
        return Err(format!(
            "{what}: {} = {g}, reference {w} (max|ref| {max_ref}; tolerance \
             {rel}|ref| + {of_max} max|ref|)",
            at(i)
        ));
    }
    let (e, s) = (err2.sqrt(), ref2.sqrt());
    if e > f64::from(rms_rel) * s {
        let n = count as f64;
        return Err(format!(
            "{what}: rms error {:.3e} exceeds {rms_rel} x rms reference {:.3e}",
            (err2 / n).sqrt(),
            (ref2 / n).sqrt()
        ));
    }
    Ok(())
}

/// [`check_close_at`] of two equally long slices.
pub fn check_close(got: &[f32], want: &[f32], tol: Tolerance, what: &str) -> Result<(), String> {
    assert_eq!(got.len(), want.len());
    check_close_at(got.iter().copied(), want, tol, what, |i| format!("[{i}]"))
}

// ------------------------------------------------------------------------------------------
// MLA attention on the GPU
// ------------------------------------------------------------------------------------------

/// Which MLA kernels a GPU attention call runs.
#[derive(Debug, Clone, Copy)]
pub enum MlaRun {
    Reference,
    /// The fast path with the device's plan (every SM busy).
    Fast,
    /// The fast path with this many parts per head block (1: no split; many: tiny splits).
    FastParts(usize),
}

/// What [`mla_attention_on_gpu`] read back.
pub struct MlaAttention {
    /// bf16 `[total_q][heads][512]`.
    pub out: Vec<bf16>,
    /// f32 `[total_q][heads]`.
    pub lse: Vec<f32>,
    /// The fast path's workspace, for a look at its schedule.
    pub workspace: Option<MlaWorkspace>,
}

/// One attention call of `run`'s kernels into outputs filled with 0xFF first (a row the
/// kernel leaves unwritten reads as NaN).
pub fn mla_attention_on_gpu(
    mla: &Mla,
    q: &DeviceBuffer<bf16>,
    heads: usize,
    scale: f32,
    cache: &MlaCache,
    batch: &MlaBatch,
    run: MlaRun,
) -> Result<MlaAttention, CudaError> {
    let dev = mla.device();
    let rows = batch.total_q * heads;
    let mut out = dev.alloc::<bf16>(rows * MLA_FAST_KV_LORA)?;
    dev.memset(&mut out, 0xFF)?;
    let mut lse = dev.alloc::<f32>(rows)?;
    dev.memset(&mut lse, 0xFF)?;
    let (b, mq) = (batch.batch, batch.max_q_len);
    let (kernel, mut ws) = match run {
        MlaRun::Reference => (MlaKernel::Reference, None),
        MlaRun::Fast => (
            MlaKernel::Wgmma,
            Some(MlaWorkspace::new(dev, b, heads, mq)?),
        ),
        MlaRun::FastParts(parts) => (
            MlaKernel::Wgmma,
            Some(MlaWorkspace::with_parts(dev, b, heads, mq, parts)?),
        ),
    };
    let ran = mla.attention(
        MlaAttnArgs {
            q,
            heads,
            scale,
            cache,
            batch,
            out: &mut out,
            lse: &mut lse,
            workspace: ws.as_mut(),
            schedule: true,
        },
        kernel,
    )?;
    assert_eq!(ran, kernel);
    Ok(MlaAttention {
        out: dev.download(&out)?,
        lse: dev.download(&lse)?,
        workspace: ws,
    })
}
