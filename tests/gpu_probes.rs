//! Layout probes: when a fast kernel is wrong, these say where. Each isolates one piece of the
//! Hopper machinery with data whose every value tells where it came from, and checks it
//! exactly (no tolerance, except where two kernels legitimately round differently).
//!
//! - `wgmma_fragment_layout_k32`, `wgmma_k_advance_k128` (cuda/probe.cu, no TMA): operands
//!   swizzled by hand, `smem_desc_k_sw128` descriptors, one or four k32 wgmma, the raw
//!   accumulator registers checked against cuda/ptx.cuh's fragment layout. The data make
//!   D[m][n] = 128 m + n, so a wrong value names the entry it belongs to; the verdict says
//!   "permutation of D" (fragment layout) or not (descriptor, swizzle, k-advance), and which
//!   16-byte K chunks the wrong bits come from (each chunk carries its own bits of the code).
//! - `fp8_gemm_identity_b`, `fp8_gemm_identity_a`, `fp8_gemm_single_cta_partial_tiles`: the
//!   real GEMM API (tensor maps, TMA, pipeline, scales, epilogue) with an identity operand,
//!   power-of-two scales and values exact in e4m3 and bf16: bit-exact, plus nothing written
//!   outside [M, N] of a padded output (rows past M, columns past N up to ldd).
//! - `mla_v_transpose_one_hot`: softmax made exactly one-hot per head on a known key of one
//!   page, V values naming their (key, feature): the output must be that key's V row, bit for
//!   bit, and a wrong value says whether the key (S, P) or the feature (the transposed V
//!   read of P·V) is off. `mla_invalid_page_ids`: page ids -1 and num_pages + 5 in the block
//!   table read as zeros (launch_params.h) on every kernel, without hanging.
//!
//! Without a usable device every GPU test prints `skipped: no CUDA device (<reason>) [<test>]`
//! and returns (tests/gpu_support); the host-side helpers are tested everywhere.

mod gpu_support;

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use half::bf16;
use r1_runtime::cuda::ops::{
    WgmmaProbe, WGMMA_PROBE_M, WGMMA_PROBE_N, WGMMA_PROBE_REGS, WGMMA_PROBE_THREADS,
};
use r1_runtime::cuda::{
    CudaError, Device, Fp8GemmArgs, Fp8Weight, GemmKernel, Mla, MlaCache, MlaLayout,
    QuantizedActivations, MLA_FAST_KV_LORA, MLA_FAST_ROPE, MLA_PAGE_TOKENS,
};
use r1_runtime::numerics::{e4m3_to_f32, f32_to_e4m3, QuantizedRows, QUANT_BLOCK};

use gpu_support::{gpu, mla_attention_on_gpu, say, MlaRun, Rng};

// ------------------------------------------------------------------------------------------
// Bare wgmma: data, fragment layout, diagnosis
// ------------------------------------------------------------------------------------------

/// The probe's D[m][n] = 128 m + n has 13 bits: 7 of n, then 6 of m.
const N_BITS: usize = 7;
const CODE_BITS: usize = N_BITS + 6;
const CODES: usize = WGMMA_PROBE_M * WGMMA_PROBE_N;

/// The K column carrying code bit `s` in a probe of `k` columns: bits go round-robin over
/// every 16-byte chunk (so every chunk, hence every k32 step, carries bits) at a different
/// byte of the chunk each.
fn bit_column(s: usize, k: usize) -> usize {
    16 * (s % (k / 16)) + (5 * s + 3) % 16
}

/// A fp8 `[64][k]` and B fp8 `[128][k]` with D = A B^T = 128 m + n exactly: column
/// `bit_column(s)` holds A = 2^s, B = bit s of n for the bits of n, and A = bit of m times
/// 2^(s/2), B = 2^(s - s/2) for the bits of m (powers of two: exact in e4m3, integer sums
/// below 2^13 exact in the tensor cores). Every other column is zero.
fn coded_operands(k: usize) -> (Vec<u8>, Vec<u8>) {
    let pow2 = |e: usize| f32_to_e4m3((1u32 << e) as f32);
    let mut a = vec![0u8; WGMMA_PROBE_M * k];
    let mut b = vec![0u8; WGMMA_PROBE_N * k];
    for s in 0..CODE_BITS {
        let col = bit_column(s, k);
        let (a_exp, b_exp) = if s < N_BITS {
            (s, 0)
        } else {
            (s / 2, s - s / 2)
        };
        for m in 0..WGMMA_PROBE_M {
            if s < N_BITS || (m >> (s - N_BITS)) & 1 == 1 {
                a[m * k + col] = pow2(a_exp);
            }
        }
        for n in 0..WGMMA_PROBE_N {
            if s >= N_BITS || (n >> s) & 1 == 1 {
                b[n * k + col] = pow2(b_exp);
            }
        }
    }
    (a, b)
}

/// (row, col) of D held by accumulator register `j` of thread `t` (cuda/ptx.cuh).
fn fragment_position(t: usize, j: usize) -> (usize, usize) {
    let (w, l) = (t / 32, t % 32);
    (
        16 * w + l / 4 + 8 * ((j / 2) % 2),
        8 * (j / 4) + 2 * (l % 4) + (j % 2),
    )
}

/// (thread, register) holding D[row][col]: the inverse of [`fragment_position`].
fn fragment_register(row: usize, col: usize) -> (usize, usize) {
    let (w, r) = (row / 16, row % 16);
    (
        32 * w + 4 * (r % 8) + (col % 8) / 2,
        4 * (col / 8) + 2 * (r / 8) + col % 2,
    )
}

/// The entry of D a probe value is, if it is one (an integer code 128 m + n).
fn entry_of(v: f32) -> Option<usize> {
    (v >= 0.0 && v < CODES as f32 && v.fract() == 0.0).then_some(v as usize)
}

/// Checks a wgmma probe's raw accumulators against the fragment layout. On a mismatch the
/// error says whether the values are a permutation of D (each right but in the wrong register:
/// the layout) or not (the tensor cores read wrong bytes), lists the first mismatches with
/// where each found value belongs, and the K chunks / k32 steps the wrong bits come from.
fn check_fragments(out: &[f32], k: usize) -> Result<(), String> {
    assert_eq!(out.len(), CODES);
    let wrong: Vec<(usize, usize, f32)> = (0..WGMMA_PROBE_THREADS)
        .flat_map(|t| (0..WGMMA_PROBE_REGS).map(move |j| (t, j)))
        .filter_map(|(t, j)| {
            let (row, col) = fragment_position(t, j);
            let got = out[t * WGMMA_PROBE_REGS + j];
            (got.to_bits() != ((128 * row + col) as f32).to_bits()).then_some((t, j, got))
        })
        .collect();
    if wrong.is_empty() {
        return Ok(());
    }
    let mut seen = vec![false; CODES];
    let permutation = out.iter().all(|&v| match entry_of(v) {
        Some(e) if !seen[e] => {
            seen[e] = true;
            true
        }
        _ => false,
    });
    let verdict = if permutation {
        "the values are a permutation of D: each is computed right but sits in another register \
         than cuda/ptx.cuh's fragment layout says (the layout formula is wrong)"
    } else {
        "the values are not a permutation of D: the tensor cores read wrong shared-memory bytes \
         (descriptor fields, the 128-byte swizzle, or the k-advance); if only the lowest bits \
         (1, 2) of the codes differ, suspect the FP8 accumulator's precision (13 bits are \
         summed in one k32 step) rather than the layout"
    };
    let mut msg = format!(
        "{} of {CODES} accumulators wrong (K = {k}); {verdict}.",
        wrong.len()
    );
    let mut chunks: BTreeSet<usize> = BTreeSet::new();
    for (i, &(t, j, got)) in wrong.iter().enumerate() {
        let (row, col) = fragment_position(t, j);
        let want = 128 * row + col;
        let found = entry_of(got);
        let bad_chunks: BTreeSet<usize> = found
            .map(|e| {
                (0..CODE_BITS)
                    .filter(|s| ((e ^ want) >> s) & 1 == 1)
                    .map(|s| bit_column(s, k) / 16)
                    .collect()
            })
            .unwrap_or_default();
        chunks.extend(&bad_chunks);
        if i >= 8 {
            continue;
        }
        let _ = write!(
            msg,
            "\n  thread {t} (warp {}, lane {}) register {j}: D[{row}][{col}] = {want} expected, \
             found {got}",
            t / 32,
            t % 32
        );
        match found {
            Some(e) => {
                let (r, c) = (e / 128, e % 128);
                let (t2, j2) = fragment_register(r, c);
                let _ = write!(msg, " = D[{r}][{c}] (thread {t2} register {j2})");
                if !permutation {
                    let _ = write!(msg, "; differing bits from K chunks {bad_chunks:?}");
                }
            }
            None => msg.push_str(" (not an entry of D)"),
        }
    }
    // A swizzle fault spares the rows of A (rows of D) or of B (columns of D) at phase 0 of
    // their 8-row atom: count the mismatches per phase.
    let mut phases = [[0usize; 8]; 2];
    for &(t, j, _) in &wrong {
        let (row, col) = fragment_position(t, j);
        phases[0][row % 8] += 1;
        phases[1][col % 8] += 1;
    }
    let _ = write!(
        msg,
        "\n  mismatches per row % 8 (A's swizzle phase) {:?}, per column % 8 (B's) {:?}",
        phases[0], phases[1]
    );
    if !permutation && !chunks.is_empty() {
        let steps: BTreeSet<usize> = chunks.iter().map(|c| c / 2).collect();
        let _ = write!(
            msg,
            "\n  over all mismatches the wrong bits come from 16-byte K chunks {chunks:?} \
             (k32 steps {steps:?})"
        );
    }
    Err(msg)
}

/// The host mirror of cuda/probe.cu's hand-written swizzle: byte `byte` of row `row` of a
/// K-major tile with 128-byte rows, 16-byte chunk index XOR row % 8.
fn sw128_offset(row: usize, byte: usize) -> usize {
    row * 128 + ((byte / 16) ^ (row % 8)) * 16 + byte % 16
}

fn run_wgmma_probe(test: &str, probe: WgmmaProbe) {
    let Some(dev) = gpu(test) else {
        return;
    };
    let (a, b) = coded_operands(probe.k());
    let out = dev
        .probe_wgmma(probe, &a, &b)
        .unwrap_or_else(|e| panic!("{}: {e}", probe.name()));
    if let Err(e) = check_fragments(&out, probe.k()) {
        panic!("{}: {e}", probe.name());
    }
}

/// One wgmma m64n128k32 on hand-swizzled operands: descriptors, swizzle, fragment layout.
#[test]
fn wgmma_fragment_layout_k32() {
    run_wgmma_probe("wgmma_fragment_layout_k32", WgmmaProbe::K32);
}

/// K = 128 as four k32 wgmma, descriptors advanced 32 bytes per step: the k-advance.
#[test]
fn wgmma_k_advance_k128() {
    run_wgmma_probe("wgmma_k_advance_k128", WgmmaProbe::K128);
}

// ------------------------------------------------------------------------------------------
// FP8 GEMM with an identity operand: bit-exact through the real API
// ------------------------------------------------------------------------------------------

/// bf16 NaN with all bits set: what unwritten output memory holds.
const SENTINEL: u16 = 0xFFFF;
/// Output rows past M that must stay untouched.
const EXTRA_ROWS: usize = 3;

/// Value number i (mod 128): ±(1 + (i % 8) / 8) · 2^((i / 8) % 8 - 3), negative from 64 on.
/// The 128 values are distinct and exact in e4m3 and bf16, so a value says its number.
fn numbered_value(i: usize) -> f32 {
    let i = i % 128;
    let sign = if i >= 64 { -1.0 } else { 1.0 };
    sign * (1.0 + (i % 8) as f32 / 8.0) * 2f32.powi(((i / 8) % 8) as i32 - 3)
}

/// A power of two in 2^-8 ..= 2^8 that changes with each index (block scales).
fn pow2_scale(a: usize, b: usize) -> f32 {
    2f32.powi(4 * ((a + 3 * b) % 5) as i32 - 8)
}

/// A GEMM whose result is exact: one nonzero product per output, fp8 values and power-of-two
/// scales whose products are exact in bf16, so every summation order gives the same bits.
struct ExactGemm {
    m: usize,
    n: usize,
    k: usize,
    a: QuantizedRows,
    w_codes: Vec<u8>,
    w_scales: Vec<f32>,
    /// D [m][n].
    want: Vec<f32>,
}

impl ExactGemm {
    /// Codes `[rows][k]` of an identity (row r has 1.0 at column r) or of numbered values
    /// (row r, column c: value number c + 37 r, so rows and columns both change it).
    fn codes(rows: usize, k: usize, identity: bool) -> Vec<u8> {
        let one = f32_to_e4m3(1.0);
        (0..rows * k)
            .map(|i| {
                let (r, c) = (i / k, i % k);
                if !identity {
                    f32_to_e4m3(numbered_value(c + 37 * r))
                } else if r == c {
                    one
                } else {
                    0
                }
            })
            .collect()
    }

    fn new(m: usize, n: usize, k: usize, identity_a: bool) -> Self {
        assert!(if identity_a { m <= k } else { n <= k });
        let kb = k.div_ceil(QUANT_BLOCK);
        let a = QuantizedRows {
            rows: m,
            cols: k,
            codes: Self::codes(m, k, identity_a),
            scales: (0..m * kb).map(|i| pow2_scale(i / kb, i % kb)).collect(),
        };
        let w_codes = Self::codes(n, k, !identity_a);
        let w_scales: Vec<f32> = (0..n.div_ceil(QUANT_BLOCK) * kb)
            .map(|i| pow2_scale(i / kb, i % kb))
            .collect();
        // The one k with a nonzero product: the identity's column.
        let want = (0..m * n)
            .map(|i| {
                let (r, c) = (i / n, i % n);
                let kk = if identity_a { r } else { c };
                e4m3_to_f32(a.codes[r * k + kk])
                    * e4m3_to_f32(w_codes[c * k + kk])
                    * a.scales[r * kb + kk / QUANT_BLOCK]
                    * w_scales[(c / QUANT_BLOCK) * kb + kk / QUANT_BLOCK]
            })
            .collect();
        ExactGemm {
            m,
            n,
            k,
            a,
            w_codes,
            w_scales,
            want,
        }
    }

    /// B = I (N <= K): D[m][n] = A[m][n] · sa[m][n/128] · sb[n/128][n/128].
    fn identity_b(m: usize, n: usize, k: usize) -> Self {
        Self::new(m, n, k, false)
    }

    /// A = I (M <= K): D[m][n] = B[n][m] · sa[m][m/128] · sb[n/128][m/128], i.e. D = B^T.
    fn identity_a(m: usize, n: usize, k: usize) -> Self {
        Self::new(m, n, k, true)
    }
}

fn block_m(kernel: GemmKernel) -> usize {
    if kernel == GemmKernel::WgmmaM64 {
        64
    } else {
        128
    }
}

/// Compares a downloaded `[m + EXTRA_ROWS][ldd]` output with `g`: every bit of D, and the
/// sentinel everywhere else. The error lists the first mismatches, where each found value is
/// expected (the nearest entry of D with those bits), and the output tiles involved.
fn check_exact_gemm(
    g: &ExactGemm,
    kernel: GemmKernel,
    all: &[bf16],
    ldd: usize,
) -> Result<(), String> {
    let (m, n) = (g.m, g.n);
    let want_bits: Vec<u16> = g
        .want
        .iter()
        .map(|&v| bf16::from_f32(v).to_bits())
        .collect();
    let mut outside = Vec::new();
    let mut wrong = Vec::new();
    for (i, v) in all.iter().enumerate() {
        let (r, c) = (i / ldd, i % ldd);
        if r < m && c < n {
            if v.to_bits() != want_bits[r * n + c] {
                wrong.push((r, c, *v));
            }
        } else if v.to_bits() != SENTINEL {
            outside.push((r, c));
        }
    }
    if wrong.is_empty() && outside.is_empty() {
        return Ok(());
    }
    let name = kernel.name();
    let mut msg = format!(
        "{name} [M={m}, N={n}, K={}, ldd={ldd}]: {} of {} outputs wrong, {} writes outside \
         [M, N]",
        g.k,
        wrong.len(),
        m * n,
        outside.len()
    );
    if let Some((r, c)) = outside.first() {
        let _ = write!(msg, " (first at row {r}, column {c})");
    }
    let bm = block_m(kernel);
    let tiles: BTreeSet<(usize, usize)> =
        wrong.iter().map(|&(r, c, _)| (r / bm, c / 128)).collect();
    if !tiles.is_empty() {
        let _ = write!(
            msg,
            "\n  output tiles (M-block, N-block) with wrong values: {tiles:?}"
        );
    }
    for &(r, c, v) in wrong.iter().take(8) {
        let _ = write!(
            msg,
            "\n  D[{r}][{c}] = {v} ({:#06x}), expected {}",
            v.to_bits(),
            bf16::from_bits(want_bits[r * n + c])
        );
        if v.to_bits() == SENTINEL {
            msg.push_str(" (never written)");
        } else if let Some(at) = (0..m * n)
            .filter(|&i| want_bits[i] == v.to_bits())
            .min_by_key(|&i| (i / n).abs_diff(r) + (i % n).abs_diff(c))
        {
            let _ = write!(msg, " (the value expected at D[{}][{}])", at / n, at % n);
        }
    }
    Err(msg)
}

/// Runs `g` on `kernel` through the public API into a `[m + EXTRA_ROWS][ldd]` output filled
/// with SENTINEL, on `ctas` persistent CTAs when given (else the API's own grid), and checks it.
fn run_exact_gemm(
    dev: &Device,
    g: &ExactGemm,
    kernel: GemmKernel,
    ldd: usize,
    ctas: Option<u32>,
) -> Result<(), String> {
    let e = |e: CudaError| format!("{}: {e}", kernel.name());
    let a = QuantizedActivations::upload(dev, &g.a).map_err(e)?;
    let w = Fp8Weight::upload(dev, &g.w_codes, &g.w_scales, g.n, g.k).map_err(e)?;
    let mut d = dev.alloc::<bf16>((g.m + EXTRA_ROWS) * ldd).map_err(e)?;
    dev.memset(&mut d, 0xFF).map_err(e)?;
    {
        let args = Fp8GemmArgs {
            ldd,
            ..Fp8GemmArgs::new(&a, &w, &mut d)
        };
        let mut prepared = dev.prepare_fp8_gemm(args, kernel).map_err(e)?;
        if let Some(ctas) = ctas {
            prepared = prepared.with_persistent_ctas(ctas).map_err(e)?;
        }
        assert_eq!(prepared.kernel(), kernel);
        prepared.launch().map_err(e)?;
    }
    let all = dev.download(&d).map_err(e)?;
    check_exact_gemm(g, kernel, &all, ldd)
}

const WGMMA_KERNELS: [GemmKernel; 2] = [GemmKernel::Wgmma, GemmKernel::WgmmaM64];

/// B = I: D = A (scaled) over 2 x 3 tiles of 128, K = 384 (the stage ring wraps).
#[test]
fn fp8_gemm_identity_b() {
    let Some(dev) = gpu("fp8_gemm_identity_b") else {
        return;
    };
    let g = ExactGemm::identity_b(256, 384, 384);
    for kernel in WGMMA_KERNELS {
        run_exact_gemm(dev, &g, kernel, g.n + 8, None).unwrap();
    }
}

/// A = I: D = B^T (scaled): each output row is one column of the weights.
#[test]
fn fp8_gemm_identity_a() {
    let Some(dev) = gpu("fp8_gemm_identity_a") else {
        return;
    };
    let g = ExactGemm::identity_a(384, 256, 384);
    for kernel in WGMMA_KERNELS {
        run_exact_gemm(dev, &g, kernel, g.n + 8, None).unwrap();
    }
}

/// One persistent CTA walks every tile (6 of BLOCK_M 128, 12 of 64) of a problem whose last
/// M and N tiles are partial: TMA's zero fill at the edges, the masked epilogue, and the
/// phases of a stage ring reused across tiles.
#[test]
fn fp8_gemm_single_cta_partial_tiles() {
    let Some(dev) = gpu("fp8_gemm_single_cta_partial_tiles") else {
        return;
    };
    let g = ExactGemm::identity_b(200, 300, 384);
    for kernel in WGMMA_KERNELS {
        run_exact_gemm(dev, &g, kernel, 310, Some(1)).unwrap();
    }
}

// ------------------------------------------------------------------------------------------
// MLA
// ------------------------------------------------------------------------------------------

const KV_LORA: usize = MLA_FAST_KV_LORA;
const ROPE: usize = MLA_FAST_ROPE;
const WIDTH: usize = KV_LORA + ROPE;
const PAGE: usize = MLA_PAGE_TOKENS;
/// Softmax scale of the probes (a power of two: scores stay exact).
const SCALE: f32 = 0.125;
/// bf16 NaN filling cache pages no sequence owns: reading one shows as NaN.
const GARBAGE: u16 = 0x7FC1;
/// A kernel call that takes longer than this hangs.
const DEADLINE: Duration = Duration::from_secs(10);

/// An attention problem as host data (moved into the thread that runs it).
struct MlaProbe {
    /// Lengths of the step; its tables only size the upload (`block_table` replaces them).
    layout: MlaLayout,
    /// i32 `[batch][bt_stride]` as the kernels get it (may hold invalid ids).
    block_table: Vec<i32>,
    num_pages: usize,
    cache: Vec<bf16>,
    q: Vec<bf16>,
    heads: usize,
}

/// Runs `f` on its own thread and waits at most [`DEADLINE`] for it, so that a hanging
/// kernel fails the test with a message naming `what` before the runner's watchdog fires.
fn within_deadline<T: Send + 'static>(
    what: &str,
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> T {
    let (tx, rx) = mpsc::channel();
    let start = Instant::now();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(DEADLINE) {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => panic!("{what}: {e}"),
        Err(RecvTimeoutError::Timeout) => {
            let msg = format!(
                "{what}: no result after {:.1} s: a kernel hangs",
                start.elapsed().as_secs_f64()
            );
            say(&msg);
            panic!("{msg}");
        }
        Err(RecvTimeoutError::Disconnected) => panic!("{what}: the thread running it panicked"),
    }
}

/// Attention of `p` on `dev` with `run`'s kernels: (out `[total_q][heads][512]`, lse).
fn mla_on_gpu(dev: &Device, p: &MlaProbe, run: MlaRun) -> Result<(Vec<bf16>, Vec<f32>), String> {
    let e = |e: CudaError| format!("{run:?}: {e}");
    let mut batch = p.layout.upload(dev).map_err(e)?;
    dev.copy_to_device(&p.block_table, &mut batch.block_table)
        .map_err(e)?;
    let mla = Mla::new(dev);
    let mut cache = MlaCache::new(dev, p.num_pages, KV_LORA, ROPE).map_err(e)?;
    dev.copy_to_device(&p.cache, &mut cache.data).map_err(e)?;
    let q = dev.upload(&p.q).map_err(e)?;
    let got = mla_attention_on_gpu(&mla, &q, p.heads, SCALE, &cache, &batch, run).map_err(e)?;
    Ok((got.out, got.lse))
}

/// [`mla_on_gpu`] under the deadline.
fn run_mla(dev: &'static Device, p: &Arc<MlaProbe>, run: MlaRun) -> (Vec<bf16>, Vec<f32>) {
    let p = p.clone();
    within_deadline(&format!("MLA {run:?}"), move || mla_on_gpu(dev, &p, run))
}

// ---- V transpose: one-hot softmax

/// bf16 bits of V[t][f] (key t < 64 of the page, feature f < 512): sign f / 256, exponent
/// 2t + (f / 128) % 2 - 64, mantissa f % 128. All distinct and exact: a value names its
/// (key, feature).
fn v_code(t: usize, f: usize) -> u16 {
    let biased_exp = 2 * t + (f / 128) % 2 + 127 - 64;
    (((f / 256) << 15) | (biased_exp << 7) | (f % 128)) as u16
}

/// (key, feature) of a [`v_code`] value.
fn v_decode(bits: u16) -> Option<(usize, usize)> {
    let e = usize::from((bits >> 7) & 0xFF);
    let x = e.checked_sub(63).filter(|&x| x < 128)?;
    let f = 256 * usize::from(bits >> 15) + 128 * (x % 2) + usize::from(bits & 0x7F);
    Some((x / 2, f))
}

/// The key head h's softmax is one-hot on: a permutation of the page's 64 positions (so every
/// swizzle row and k16 step of P·V is some head's key, and P is not symmetric).
fn one_hot_key(h: usize) -> usize {
    (37 * h + 5) % PAGE
}

/// Query and key spikes on the rope part: scores are SCALE * 64 * 64 = 512 for the chosen
/// key and exactly 0 for the others, so exp(-512) = 0 in f32 and P is exactly one-hot.
const SPIKE: f32 = 64.0;

/// One sequence of 64 keys in page 1 of 3 (pages 0 and 2 NaN), 64 heads, one query token:
/// head h's query is a spike on rope dimension one_hot_key(h), key t has its spike on rope
/// dimension t, the latent query is zero, key t's latent is V[t] = v_code(t, ..).
fn one_hot_problem() -> MlaProbe {
    let (heads, num_pages, page) = (64, 3, 1);
    let mut cache = vec![bf16::from_bits(GARBAGE); num_pages * PAGE * WIDTH];
    for t in 0..PAGE {
        let row = &mut cache[(page * PAGE + t) * WIDTH..][..WIDTH];
        for (f, v) in row[..KV_LORA].iter_mut().enumerate() {
            *v = bf16::from_bits(v_code(t, f));
        }
        for (i, v) in row[KV_LORA..].iter_mut().enumerate() {
            *v = bf16::from_f32(if i == t { SPIKE } else { 0.0 });
        }
    }
    let mut q = vec![bf16::ZERO; heads * WIDTH];
    for h in 0..heads {
        q[h * WIDTH + KV_LORA + one_hot_key(h)] = bf16::from_f32(SPIKE);
    }
    MlaProbe {
        layout: MlaLayout {
            tables: vec![vec![page as u32]],
            kv_lens: vec![PAGE],
            q_lens: vec![1],
        },
        block_table: vec![page as i32],
        num_pages,
        cache,
        q,
        heads,
    }
}

/// Output of [`one_hot_problem`]: head h must be V[one_hot_key(h)] bit for bit, lse 512.
/// A wrong value is classified by what it is: another key's V (P picks the wrong key: S or
/// P's layout), another feature of the right key (the transposed V read of P·V: its N-major
/// descriptor or column blocks), or no V value at all.
fn check_one_hot(what: &str, out: &[bf16], lse: &[f32], heads: usize) -> Result<(), String> {
    let lse_want = SCALE * SPIKE * SPIKE;
    let bad_lse: Vec<usize> = (0..heads)
        .filter(|&h| (lse[h] - lse_want).abs() > 1e-3)
        .collect();
    let mut examples = String::new();
    let (mut wrong, mut other_key, mut other_feature, mut neither, mut not_v) = (0, 0, 0, 0, 0);
    for h in 0..heads {
        let key = one_hot_key(h);
        for f in 0..KV_LORA {
            let got = out[h * KV_LORA + f].to_bits();
            if got == v_code(key, f) {
                continue;
            }
            wrong += 1;
            let found = v_decode(got);
            match found {
                Some((_, ff)) if ff == f => other_key += 1,
                Some((t, _)) if t == key => other_feature += 1,
                Some(_) => neither += 1,
                None => not_v += 1,
            }
            if wrong <= 8 {
                let _ = write!(
                    examples,
                    "\n  head {h} feature {f}: expected V[{key}][{f}], found {} ({got:#06x}){}",
                    bf16::from_bits(got),
                    match found {
                        Some((t, ff)) => format!(" = V[{t}][{ff}]"),
                        None => " (not a V value)".into(),
                    }
                );
            }
        }
    }
    if wrong == 0 && bad_lse.is_empty() {
        return Ok(());
    }
    let stage = if bad_lse.is_empty() {
        "lse is right for every head, so S and the softmax are: the fault is in P·V".to_string()
    } else {
        let h = bad_lse[0];
        format!(
            "lse wrong for heads {bad_lse:?} (head {h}: {}, expected {lse_want}): the scores \
             S = Q K^T are wrong already",
            lse[h]
        )
    };
    Err(format!(
        "{what}: {wrong} of {} outputs wrong: {other_key} are another key's V at the right \
         feature (P not one-hot on the right key), {other_feature} another feature of the \
         right key (V read transposed or from the wrong column block), {neither} another key's \
         other feature, {not_v} no V value (NaN: a garbage page was read); {stage}.{examples}",
        heads * KV_LORA
    ))
}

/// P one-hot on every key of a page (one head each): the output is that key's V row exactly.
#[test]
fn mla_v_transpose_one_hot() {
    let Some(dev) = gpu("mla_v_transpose_one_hot") else {
        return;
    };
    let p = Arc::new(one_hot_problem());
    for run in [MlaRun::Reference, MlaRun::FastParts(1), MlaRun::Fast] {
        let (out, lse) = run_mla(dev, &p, run);
        check_one_hot(&format!("{run:?}"), &out, &lse, p.heads).unwrap();
    }
}

// ---- invalid page ids

/// Attention as the contract defines it, in f64 from the bf16 inputs: keys on an invalid page
/// (id outside [0, num_pages)) are zero rows. (out `[total_q][heads][512]`, lse.)
fn attention_f64(p: &MlaProbe) -> (Vec<f64>, Vec<f64>) {
    let bt_stride = p.block_table.len() / p.layout.batch();
    let scale = f64::from(SCALE);
    let zero = [bf16::ZERO; WIDTH];
    let (mut out, mut lse) = (Vec::new(), Vec::new());
    let mut t = 0;
    for b in 0..p.layout.batch() {
        let (kv, ql) = (p.layout.kv_lens[b], p.layout.q_lens[b]);
        let key = |j: usize| {
            let page = p.block_table[b * bt_stride + j / PAGE];
            match usize::try_from(page) {
                Ok(page) if page < p.num_pages => {
                    &p.cache[(page * PAGE + j % PAGE) * WIDTH..][..WIDTH]
                }
                _ => &zero[..],
            }
        };
        for i in 0..ql {
            for h in 0..p.heads {
                let q = &p.q[(t * p.heads + h) * WIDTH..][..WIDTH];
                let s: Vec<f64> = (0..=kv - ql + i)
                    .map(|j| {
                        let dot: f64 = q
                            .iter()
                            .zip(key(j))
                            .map(|(a, k)| f64::from(a.to_f32()) * f64::from(k.to_f32()))
                            .sum();
                        scale * dot
                    })
                    .collect();
                let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = s.iter().map(|v| (v - m).exp()).sum();
                let mut o = vec![0f64; KV_LORA];
                for (j, v) in s.iter().enumerate() {
                    let w = (v - m).exp() / z;
                    for (oc, c) in o.iter_mut().zip(&key(j)[..KV_LORA]) {
                        *oc += w * f64::from(c.to_f32());
                    }
                }
                out.extend(o);
                lse.push(m + z.ln());
            }
            t += 1;
        }
    }
    (out, lse)
}

/// Elementwise within 2^-7 |want| + max|V| / 256 (P and the output are rounded to bf16) and
/// lse within 1e-4 + 1e-6 |want|; a NaN means a page that should read as zeros was read.
fn check_close_attention(
    what: &str,
    got: &[bf16],
    got_lse: &[f32],
    want: &[f64],
    want_lse: &[f64],
    max_v: f64,
) -> Result<(), String> {
    for (i, (g, &w)) in got.iter().zip(want).enumerate() {
        let g = f64::from(g.to_f32());
        let (row, col) = (i / KV_LORA, i % KV_LORA);
        if g.is_nan() {
            return Err(format!(
                "{what}: row {row} (token x head) column {col} is NaN: a garbage page was read \
                 where an invalid page id must read as zeros"
            ));
        }
        if (g - w).abs() > w.abs() / 128.0 + max_v / 256.0 {
            return Err(format!(
                "{what}: row {row} column {col} = {g}, expected {w}"
            ));
        }
    }
    for (row, (&g, &w)) in got_lse.iter().zip(want_lse).enumerate() {
        let g = f64::from(g);
        let close = (g - w).abs() <= 1e-4 + 1e-6 * w.abs();
        if !close {
            return Err(format!("{what}: lse of row {row} = {g}, expected {w}"));
        }
    }
    Ok(())
}

/// Two sequences whose block tables hold -1 and num_pages + 5: as the first page of one, a
/// middle page and the last (partial) page of the other; s_q 1 and 2. The pages no sequence
/// owns hold NaN.
fn invalid_pages_problem() -> MlaProbe {
    let mut rng = Rng::new(61);
    let (heads, num_pages) = (16, 6);
    let past_end = num_pages as i32 + 5;
    let tables: [[i32; 4]; 2] = [[3, -1, 0, past_end], [past_end, 5, -1, -1]];
    let (kv_lens, q_lens) = (vec![200, 130], vec![1, 2]);
    let mut cache = vec![bf16::from_bits(GARBAGE); num_pages * PAGE * WIDTH];
    for (b, table) in tables.iter().enumerate() {
        for pos in 0..kv_lens[b] {
            if let Ok(page) = usize::try_from(table[pos / PAGE]) {
                if page < num_pages {
                    let row = &mut cache[(page * PAGE + pos % PAGE) * WIDTH..][..WIDTH];
                    row.iter_mut()
                        .for_each(|v| *v = bf16::from_f32(rng.normal()));
                }
            }
        }
    }
    let total_q: usize = q_lens.iter().sum();
    let q = (0..total_q * heads * WIDTH)
        .map(|_| bf16::from_f32(0.3 * rng.normal()))
        .collect();
    MlaProbe {
        layout: MlaLayout {
            // Placeholders of the right length: `block_table` replaces them on the device.
            tables: vec![vec![0; 4]; 2],
            kv_lens,
            q_lens,
        },
        block_table: tables.concat(),
        num_pages,
        cache,
        q,
        heads,
    }
}

/// Invalid page ids read as zeros: the reference kernel agrees with the f64 contract, the fast
/// path (1 and 3 parts) with the reference kernel, and nothing hangs.
#[test]
fn mla_invalid_page_ids() {
    let Some(dev) = gpu("mla_invalid_page_ids") else {
        return;
    };
    let p = Arc::new(invalid_pages_problem());
    let max_v = p
        .cache
        .iter()
        .map(|v| f64::from(v.to_f32()))
        .filter(|v| v.is_finite())
        .fold(0f64, |m, v| m.max(v.abs()));
    let (want, want_lse) = attention_f64(&p);
    let (reference, reference_lse) = run_mla(dev, &p, MlaRun::Reference);
    check_close_attention(
        "mla_attn_ref vs the contract (invalid page = zeros, f64 on the host)",
        &reference,
        &reference_lse,
        &want,
        &want_lse,
        max_v,
    )
    .unwrap();
    let reference: Vec<f64> = reference.iter().map(|v| f64::from(v.to_f32())).collect();
    let reference_lse: Vec<f64> = reference_lse.iter().map(|&v| f64::from(v)).collect();
    for parts in [1, 3] {
        let (got, got_lse) = run_mla(dev, &p, MlaRun::FastParts(parts));
        check_close_attention(
            &format!("mla_decode_wgmma ({parts} parts) vs mla_attn_ref"),
            &got,
            &got_lse,
            &reference,
            &reference_lse,
            max_v,
        )
        .unwrap();
    }
}

// ------------------------------------------------------------------------------------------
// Host-side: the probes' data and diagnoses (run everywhere)
// ------------------------------------------------------------------------------------------

#[test]
fn swizzle_mirror_is_tmas_128b_pattern() {
    let rows = WGMMA_PROBE_N;
    let mut hit = vec![false; rows * 128];
    for row in 0..rows {
        for byte in 0..128 {
            let o = sw128_offset(row, byte);
            // CUTLASS's Swizzle<3,4,3> on the unswizzled offset: bits 4-6 ^= bits 7-9.
            let plain = row * 128 + byte;
            assert_eq!(o, plain ^ ((plain >> 3) & 0x70), "row {row} byte {byte}");
            assert_eq!(o / 128, row, "a row stays in its 128 bytes");
            assert_eq!(o % 16, byte % 16, "16-byte chunks move whole");
            assert!(!hit[o], "offset {o} written twice");
            hit[o] = true;
        }
        // Row 0 of every atom is unswizzled; row r's chunk 0 lands on chunk r % 8.
        assert_eq!(sw128_offset(row, 0), row * 128 + (row % 8) * 16);
    }
}

#[test]
fn fragment_layout_is_a_bijection_and_its_inverse() {
    let mut seen = vec![false; CODES];
    for t in 0..WGMMA_PROBE_THREADS {
        for j in 0..WGMMA_PROBE_REGS {
            let (row, col) = fragment_position(t, j);
            assert!(row < WGMMA_PROBE_M && col < WGMMA_PROBE_N);
            assert!(!seen[row * WGMMA_PROBE_N + col]);
            seen[row * WGMMA_PROBE_N + col] = true;
            assert_eq!(fragment_register(row, col), (t, j));
        }
    }
    // The layout the GEMM epilogue assumes: thread rows row0 and row0 + 8, columns 2 (t % 4) + 8 i.
    assert_eq!(fragment_position(0, 0), (0, 0));
    assert_eq!(fragment_position(5, 3), (9, 3));
    assert_eq!(fragment_position(127, 63), (63, 127));
}

/// The coded operands multiply to D = 128 m + n exactly, and every 16-byte chunk of K carries
/// bits (so a misread chunk cannot go unnoticed).
#[test]
fn wgmma_probe_data_code_every_entry() {
    for k in [32, 128] {
        let columns: BTreeSet<usize> = (0..CODE_BITS).map(|s| bit_column(s, k)).collect();
        assert_eq!(columns.len(), CODE_BITS, "K = {k}: one column per bit");
        let chunks: BTreeSet<usize> = columns.iter().map(|c| c / 16).collect();
        assert_eq!(chunks.len(), k / 16, "K = {k}: every chunk carries bits");
        let (a, b) = coded_operands(k);
        for m in 0..WGMMA_PROBE_M {
            for n in 0..WGMMA_PROBE_N {
                let d: f32 = (0..k)
                    .map(|kk| e4m3_to_f32(a[m * k + kk]) * e4m3_to_f32(b[n * k + kk]))
                    .sum();
                assert_eq!(d, (128 * m + n) as f32, "K = {k}: D[{m}][{n}]");
            }
        }
    }
}

/// The expected registers pass; a transposed layout reads as a permutation; a k32 step that
/// contributes nothing is named by its chunks.
#[test]
fn fragment_check_tells_layout_from_operand_faults() {
    let k = 128;
    let ideal: Vec<f32> = (0..CODES)
        .map(|i| {
            let (r, c) = fragment_position(i / WGMMA_PROBE_REGS, i % WGMMA_PROBE_REGS);
            (128 * r + c) as f32
        })
        .collect();
    check_fragments(&ideal, k).unwrap();

    // Registers j and j ^ 2 swapped (rows r and r + 8 exchanged): every value still present.
    let swapped: Vec<f32> = (0..CODES).map(|i| ideal[i ^ 2]).collect();
    let e = check_fragments(&swapped, k).unwrap_err();
    assert!(e.contains("a permutation of D"), "{e}");
    assert!(e.contains("thread 0 (warp 0, lane 0) register 0: D[0][0] = 0 expected, found 1024 = D[8][0] (thread 0 register 2)"), "{e}");

    // The third k32 step (K chunks 4 and 5) read as zeros: its bits vanish.
    let (a, b) = coded_operands(k);
    let step_missing: Vec<f32> = (0..CODES)
        .map(|i| {
            let (m, n) = fragment_position(i / WGMMA_PROBE_REGS, i % WGMMA_PROBE_REGS);
            (0..k)
                .filter(|kk| kk / 32 != 2)
                .map(|kk| e4m3_to_f32(a[m * k + kk]) * e4m3_to_f32(b[n * k + kk]))
                .sum()
        })
        .collect();
    let e = check_fragments(&step_missing, k).unwrap_err();
    assert!(e.contains("not a permutation of D"), "{e}");
    assert!(e.contains("K chunks {4, 5} (k32 steps {2})"), "{e}");
}

#[test]
fn exact_gemm_values_are_exact_and_numbered() {
    let values: BTreeSet<u32> = (0..128).map(|i| numbered_value(i).to_bits()).collect();
    assert_eq!(values.len(), 128);
    for i in 0..128 {
        let v = numbered_value(i);
        assert_eq!(e4m3_to_f32(f32_to_e4m3(v)), v, "value {i} is exact in e4m3");
    }
    for g in [
        ExactGemm::identity_b(200, 300, 384),
        ExactGemm::identity_a(384, 256, 384),
    ] {
        for (i, &v) in g.want.iter().enumerate() {
            assert!(v != 0.0 && v.is_finite(), "D[{i}] = {v}");
            assert_eq!(
                bf16::from_f32(v).to_f32(),
                v,
                "D[{i}] = {v} is exact in bf16"
            );
        }
    }
    // A = I gives the weights transposed (times the scales): D[m][n] is B[n][m]'s number.
    let g = ExactGemm::identity_a(384, 256, 384);
    let (m, n) = (5, 130);
    let scales = g.a.scales[m * 3] * g.w_scales[3];
    assert_eq!(g.want[m * 256 + n], numbered_value(m + 37 * n) * scales);
}

#[test]
fn exact_gemm_check_reports_where_values_belong() {
    let g = ExactGemm::identity_b(4, 6, 128);
    let ldd = 8;
    let mut all = vec![bf16::from_bits(SENTINEL); (g.m + EXTRA_ROWS) * ldd];
    for r in 0..g.m {
        for c in 0..g.n {
            all[r * ldd + c] = bf16::from_f32(g.want[r * g.n + c]);
        }
    }
    check_exact_gemm(&g, GemmKernel::Wgmma, &all, ldd).unwrap();
    let mut shifted = all.clone();
    shifted[ldd + 2] = bf16::from_f32(g.want[g.n + 3]);
    shifted[g.m * ldd + 1] = bf16::ZERO;
    let e = check_exact_gemm(&g, GemmKernel::Wgmma, &shifted, ldd).unwrap_err();
    assert!(
        e.contains("1 of 24 outputs wrong, 1 writes outside [M, N] (first at row 4, column 1)"),
        "{e}"
    );
    assert!(e.contains("(the value expected at D[1][3])"), "{e}");
}

#[test]
fn v_codes_name_key_and_feature() {
    let mut seen = BTreeSet::new();
    for t in 0..PAGE {
        for f in 0..KV_LORA {
            let bits = v_code(t, f);
            let v = bf16::from_bits(bits).to_f32();
            assert!(v.is_finite() && v != 0.0, "V[{t}][{f}] = {v}");
            assert_eq!(bf16::from_f32(v).to_bits(), bits);
            assert_eq!(v_decode(bits), Some((t, f)));
            assert!(seen.insert(bits));
        }
    }
    assert_eq!(v_decode(GARBAGE), None);
    let keys: BTreeSet<usize> = (0..PAGE).map(one_hot_key).collect();
    assert_eq!(keys.len(), PAGE, "every key is some head's");
    assert!(
        (0..PAGE).any(|h| one_hot_key(one_hot_key(h)) != h),
        "P is not symmetric"
    );
}

#[test]
fn one_hot_check_names_the_faulty_stage() {
    let heads = 64;
    let lse = vec![SCALE * SPIKE * SPIKE; heads];
    let ideal: Vec<bf16> = (0..heads * KV_LORA)
        .map(|i| bf16::from_bits(v_code(one_hot_key(i / KV_LORA), i % KV_LORA)))
        .collect();
    check_one_hot("ideal", &ideal, &lse, heads).unwrap();
    // V read transposed within a column block: features f and f ^ 1 swapped.
    let transposed: Vec<bf16> = (0..heads * KV_LORA).map(|i| ideal[i ^ 1]).collect();
    let e = check_one_hot("t", &transposed, &lse, heads).unwrap_err();
    assert!(e.contains("32768 of 32768 outputs wrong: 0 are another key's V at the right feature (P not one-hot on the right key), 32768 another feature"), "{e}");
    assert!(e.contains("the fault is in P·V"), "{e}");
    let mut bad_lse = lse.clone();
    bad_lse[3] = 0.0;
    let e = check_one_hot("s", &ideal, &bad_lse, heads).unwrap_err();
    assert!(e.contains("lse wrong for heads [3]"), "{e}");
}

/// The host contract: a sequence whose only page id is invalid has zero keys, so every score
/// is 0: the output is 0 and the lse ln(keys).
#[test]
fn invalid_pages_read_as_zero_keys_on_the_host() {
    let keys = 10;
    let p = MlaProbe {
        layout: MlaLayout {
            tables: vec![vec![0]],
            kv_lens: vec![keys],
            q_lens: vec![1],
        },
        block_table: vec![-1],
        num_pages: 1,
        cache: vec![bf16::from_bits(GARBAGE); PAGE * WIDTH],
        q: vec![bf16::ONE; 2 * WIDTH],
        heads: 2,
    };
    let (out, lse) = attention_f64(&p);
    assert!(out.iter().all(|&v| v == 0.0));
    assert!(
        lse.iter().all(|&v| (v - (keys as f64).ln()).abs() < 1e-12),
        "{lse:?}"
    );
    let p = invalid_pages_problem();
    p.layout.check().unwrap();
    let (out, lse) = attention_f64(&p);
    assert_eq!(out.len(), 3 * p.heads * KV_LORA);
    assert!(out.iter().chain(&lse).all(|v| v.is_finite()));
}
