//! Every GEMM of DeepSeek-R1's decode step, as the CUDA backend runs it, at M (tokens) in
//! {1, 8, 32, 64}, on one GPU's share at TP 1 and at TP 8.
//!
//! `cargo bench --bench decode_gemm [-- FILTER]`. Shapes (N x K, D = A · B^T) come from R1's
//! released config.json (tests/fixtures/deepseek-r1-config.json):
//! - FP8 w8a8 (1x128 activation scales, 128x128 weight scales, bf16 out): q_a 1536 x 7168,
//!   kv_a 576 x 7168, q_b 24576 x 1536, o_proj 7168 x 16384, dense gate/up 18432 x 7168 (one
//!   line stands for each of the two), dense down 7168 x 18432, shared-expert gate/up
//!   2048 x 7168 (likewise), shared down 7168 x 2048. TP 8: column-parallel weights (q_b, the
//!   gate/up pairs) keep N/8 rows, row-parallel ones (o_proj, the downs) K/8 columns; q_a and
//!   kv_a stay whole.
//! - bf16: lm_head 129280 x 7168 (f32 out; TP 8: N/8), eh_proj 7168 x 14336 (bf16 out, whole
//!   at TP 8), and MLA's absorption products batched over heads (128; TP 8: 16) on the absorbed
//!   kv_b layout: absorb_q [M x 128] · W_UK^T[h] [512 x 128]^T with A rows strided by
//!   heads * 192 (q) and D rows by heads * 576 (the attention query), absorb_o [M x 512] ·
//!   W_UV[h] [128 x 512]^T.
//!
//! Per shape and M: FP8 `GemmKernel::Auto` with split-K (`split_k`) and without (`no_split`);
//! bf16 `Bf16GemmKernel::Auto` with split-K, without, and the CUDA-core reference
//! (`reference`, one small_gemm_bf16 per batch entry), so what split-K and the tensor cores
//! gain is visible. GB/s = (weights + weight scales + A (+ its scales) + D bytes) / median
//! time, and % of the device-to-device copy bandwidth measured at start in the same run
//! (`copy_gbps`): a decode GEMM is memory-bound, so that copy is its ceiling. No TFLOPS and
//! no criterion sampling: one line per point, the median of `R1_BENCH_ITERS` calls (L2
//! flushed before each). JSON lines (`R1_BENCH_JSON`): gemm, tp, m, n, k, batch, variant,
//! kernel (the kernels launched), ctas (CTAs per call), median_us, gbps, pct_copy. Weights
//! and activations are synthetic, filled on the device (random_fill). A launch that cannot be
//! prepared or fails is reported on its line and fails the bench at the end; the other
//! points still run. Without a GPU: `skipped: no CUDA device (<reason>)`, exit 0. The torch
//! peer on the same shapes is bench/peer_decode_gemm.py.

mod common;

use common::{fail, Harness, Measurement};
use half::bf16;
use r1_runtime::config::ModelConfig;
use r1_runtime::cuda::ops::{
    Bf16GemmDesc, Bf16GemmKernel, Bf16Out, FillElement, MlaAbsorbDesc, QuantizedActivations,
    RandomFill, SplitKWorkspace,
};
use r1_runtime::cuda::{
    act_scale_m_pad, Device, DeviceBuffer, Fp8GemmArgs, Fp8Weight, GemmKernel, Prepared, Region,
    Result,
};

/// The two calls into the kernels under test.
fn fp8_launch<'a>(
    dev: &'a Device,
    a: &'a QuantizedActivations,
    w: &'a Fp8Weight,
    d: &'a mut DeviceBuffer<bf16>,
    split_k: Option<&'a SplitKWorkspace>,
) -> Result<Prepared<'a, GemmKernel>> {
    let args = Fp8GemmArgs::new(a, w, d);
    let args = match split_k {
        Some(ws) => args.with_split_k(ws),
        None => args,
    };
    dev.prepare_fp8_gemm(args, GemmKernel::Auto)
}

fn bf16_launch<'a>(
    dev: &'a Device,
    desc: Bf16GemmDesc,
    reference: bool,
    split_k: Option<&'a SplitKWorkspace>,
) -> Result<Prepared<'a, Bf16GemmKernel>> {
    let kernel = if reference {
        Bf16GemmKernel::Reference
    } else {
        Bf16GemmKernel::Auto
    };
    dev.prepare_bf16_gemm(desc, kernel, split_k)
}

/// Tokens per decode step.
const DECODE_M: [usize; 4] = [1, 8, 32, 64];
/// Tensor-parallel degrees: the whole model on one GPU, and one GPU's share of eight.
const TP: [usize; 2] = [1, 8];
const QB: usize = 128;

/// How tensor parallelism splits a weight `[n][k]` over the ranks (the sharding plan).
#[derive(Debug, Clone, Copy)]
enum Shard {
    Whole,
    /// Column-parallel: N / tp rows per rank.
    N,
    /// Row-parallel: K / tp columns per rank.
    K,
}

impl Shard {
    fn of(self, n: usize, k: usize, tp: usize) -> (usize, usize) {
        match self {
            Shard::Whole => (n, k),
            Shard::N => (n / tp, k),
            Shard::K => (n, k / tp),
        }
    }
}

/// A dense GEMM of the decode step at TP 1.
struct Gemm {
    name: &'static str,
    n: usize,
    k: usize,
    shard: Shard,
}

fn fp8_gemms(c: &ModelConfig) -> Vec<Gemm> {
    let h = c.hidden_size;
    let q_lora = c
        .q_lora_rank
        .unwrap_or_else(|| fail("R1 config", "q_lora_rank is missing"));
    let q_head = c.qk_nope_head_dim + c.qk_rope_head_dim;
    let shared = c.moe_intermediate_size * c.n_shared_experts;
    let g = |name, n, k, shard| Gemm { name, n, k, shard };
    vec![
        g("q_a", q_lora, h, Shard::Whole),
        g("kv_a", c.kv_lora_rank + c.qk_rope_head_dim, h, Shard::Whole),
        g("q_b", c.num_attention_heads * q_head, q_lora, Shard::N),
        g("o_proj", h, c.num_attention_heads * c.v_head_dim, Shard::K),
        g("dense_gate/up", c.intermediate_size, h, Shard::N),
        g("dense_down", h, c.intermediate_size, Shard::K),
        g("shared_gate/up", shared, h, Shard::N),
        g("shared_down", h, shared, Shard::K),
    ]
}

/// The bf16 GEMMs: dense ones, then the absorption over heads.
enum Bf16Gemm {
    Dense { gemm: Gemm, out_f32: bool },
    AbsorbQ,
    AbsorbO,
}

impl Bf16Gemm {
    fn name(&self) -> &'static str {
        match self {
            Bf16Gemm::Dense { gemm, .. } => gemm.name,
            Bf16Gemm::AbsorbQ => "absorb_q",
            Bf16Gemm::AbsorbO => "absorb_o",
        }
    }
}

fn bf16_gemms(c: &ModelConfig) -> Vec<Bf16Gemm> {
    let h = c.hidden_size;
    let dense = |name, n, k, shard, out_f32| Bf16Gemm::Dense {
        gemm: Gemm { name, n, k, shard },
        out_f32,
    };
    vec![
        dense("lm_head", c.vocab_size, h, Shard::N, true),
        dense("eh_proj", h, 2 * h, Shard::Whole, false),
        Bf16Gemm::AbsorbQ,
        Bf16Gemm::AbsorbO,
    ]
}

/// One measured point: a GEMM at one TP degree and M.
struct Point {
    gemm: &'static str,
    tp: usize,
    m: usize,
    n: usize,
    k: usize,
    batch: usize,
    /// Bytes moved per call: weights (+ scales), A (+ scales), D.
    bytes: f64,
}

impl Point {
    fn id(&self) -> String {
        id(self.gemm, self.tp, self.m)
    }
}

fn id(gemm: &str, tp: usize, m: usize) -> String {
    format!("{gemm}_tp{tp}_m{m}")
}

struct Run<'d> {
    dev: &'d Device,
    h: Harness<'d>,
    seed: u64,
    errors: usize,
}

impl<'d> Run<'d> {
    /// A new device buffer of `len` values center +- spread (a fresh seed per buffer).
    fn fill<T: FillElement>(&mut self, len: usize, center: f32, spread: f32) -> DeviceBuffer<T> {
        self.seed += 1;
        let fill = RandomFill {
            seed: self.seed,
            center,
            spread,
        };
        self.dev
            .random_buffer(len, fill)
            .unwrap_or_else(|e| fail("random_fill", e))
    }

    /// The M values of `gemm` at `tp` that the filter selects.
    fn selected(&self, gemm: &str, tp: usize) -> Vec<usize> {
        DECODE_M
            .into_iter()
            .filter(|&m| self.h.selected(&id(gemm, tp, m)))
            .collect()
    }

    /// Times `prep` and prints its line; a launch that could not be prepared or failed gets
    /// an error line instead (and fails the bench at the end).
    fn point<K>(&mut self, p: &Point, variant: &str, prep: Result<Prepared<'_, K>>) {
        let id = p.id();
        let measured = prep.and_then(|prep| Ok((self.h.measure(|| prep.launch())?, prep)));
        let (stats, prep) = match measured {
            Ok(v) => v,
            Err(e) => {
                self.errors += 1;
                println!("decode_gemm: {id} {variant}: error: {e}");
                let line = serde_json::json!({
                    "bench": "decode_gemm", "id": id, "gemm": p.gemm, "variant": variant,
                    "tp": p.tp, "m": p.m, "n": p.n, "k": p.k, "batch": p.batch,
                    "error": e.to_string(),
                });
                self.h.json_line(&line);
                return;
            }
        };
        let mut kernels = prep.kernels();
        kernels.dedup();
        let ctas: u32 = prep
            .launch_configs()
            .iter()
            .map(|c| c.grid_dim.0 * c.grid_dim.1 * c.grid_dim.2)
            .sum();
        self.h.report_with(
            &Measurement {
                id: &id,
                kernel: &kernels.join("+"),
                dims: &[
                    ("tp", p.tp),
                    ("m", p.m),
                    ("n", p.n),
                    ("k", p.k),
                    ("batch", p.batch),
                    ("ctas", ctas as usize),
                ],
                stats,
                flops: 0.0,
                bytes: p.bytes,
            },
            &[("gemm", p.gemm), ("variant", variant)],
        );
    }

    fn fp8(&mut self, cfg: &ModelConfig, ws: &SplitKWorkspace) {
        let dev = self.dev;
        for g in fp8_gemms(cfg) {
            for tp in TP {
                let ms = self.selected(g.name, tp);
                if ms.is_empty() {
                    continue;
                }
                let (n, k) = g.shard.of(g.n, g.k, tp);
                let (nb, kb) = (n.div_ceil(QB), k.div_ceil(QB));
                let w = Fp8Weight {
                    codes: self.fill(n * k, 0.0, 240.0),
                    scales: self.fill(nb * kb, 1e-3, 5e-4),
                    n,
                    k,
                };
                for m in ms {
                    let m_pad = act_scale_m_pad(m);
                    let a = QuantizedActivations {
                        q: self.fill(m * k, 0.0, 240.0),
                        scales: self.fill(kb * m_pad, 1e-2, 5e-3),
                        m,
                        k,
                        m_pad,
                    };
                    let mut d: DeviceBuffer<bf16> =
                        dev.alloc(m * n).unwrap_or_else(|e| fail("alloc D", e));
                    let p = Point {
                        gemm: g.name,
                        tp,
                        m,
                        n,
                        k,
                        batch: 1,
                        bytes: (n * k + 4 * nb * kb + m * k + 4 * m * kb + 2 * m * n) as f64,
                    };
                    for (variant, split_k) in [("split_k", Some(ws)), ("no_split", None)] {
                        let prep = fp8_launch(dev, &a, &w, &mut d, split_k);
                        self.point(&p, variant, prep);
                    }
                }
            }
        }
    }

    fn bf16(&mut self, cfg: &ModelConfig, ws: &SplitKWorkspace) {
        let (nope, rope, v) = (cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim);
        let kv_lora = cfg.kv_lora_rank;
        for g in bf16_gemms(cfg) {
            let name = g.name();
            for tp in TP {
                let ms = self.selected(name, tp);
                if ms.is_empty() {
                    continue;
                }
                let heads = cfg.num_attention_heads / tp;
                // The weight: a dense [n][k], or the absorbed kv_b (per head W_UK^T
                // [kv_lora][nope], then W_UV [v][kv_lora]).
                let (n, k, batch, out_f32) = match &g {
                    Bf16Gemm::Dense { gemm, out_f32 } => {
                        let (n, k) = gemm.shard.of(gemm.n, gemm.k, tp);
                        (n, k, 1, *out_f32)
                    }
                    Bf16Gemm::AbsorbQ => (kv_lora, nope, heads, false),
                    Bf16Gemm::AbsorbO => (v, kv_lora, heads, false),
                };
                let head_block = (nope + v) * kv_lora;
                let w_len = match g {
                    Bf16Gemm::Dense { .. } => n * k,
                    _ => heads * head_block,
                };
                let w: DeviceBuffer<bf16> = self.fill(w_len, 0.0, 0.05);
                for m in ms {
                    // A and D as the backend's buffers lay them out: the absorption reads q's
                    // nope columns (or o_lat) per head and writes the attention query's latent
                    // columns (or the heads' v outputs).
                    let (a_row, d_row) = match g {
                        Bf16Gemm::Dense { .. } => (k, n),
                        Bf16Gemm::AbsorbQ => (heads * (nope + rope), heads * (kv_lora + rope)),
                        Bf16Gemm::AbsorbO => (heads * kv_lora, heads * v),
                    };
                    let a: DeviceBuffer<bf16> = self.fill(m * a_row, 0.0, 1.0);
                    let out_bytes = if out_f32 { 4 } else { 2 };
                    let d_buf: DeviceBuffer<u8> = self
                        .dev
                        .alloc(m * d_row * out_bytes)
                        .unwrap_or_else(|e| fail("alloc D", e));
                    // Elements of the output type.
                    let d = Region {
                        addr: d_buf.addr(),
                        len: m * d_row,
                    };
                    let absorb = MlaAbsorbDesc {
                        tokens: m,
                        heads,
                        nope,
                        rope,
                        v,
                        kv_lora,
                        src: Region::from(&a),
                        kv_b: Region::from(&w),
                        dst: d,
                    };
                    let desc = match g {
                        Bf16Gemm::Dense { .. } => Bf16GemmDesc {
                            m,
                            n,
                            k,
                            batch: 1,
                            a: Region::from(&a),
                            lda: k,
                            a_batch: 0,
                            b: Region::from(&w),
                            ldb: k,
                            b_batch: 0,
                            d,
                            ldd: n,
                            d_batch: 0,
                            out: if out_f32 { Bf16Out::F32 } else { Bf16Out::Bf16 },
                        },
                        Bf16Gemm::AbsorbQ => absorb.q_gemm(),
                        Bf16Gemm::AbsorbO => absorb.o_gemm(),
                    };
                    let p = Point {
                        gemm: name,
                        tp,
                        m,
                        n,
                        k,
                        batch,
                        bytes: (batch * (2 * n * k + 2 * m * k + out_bytes * m * n)) as f64,
                    };
                    for (variant, reference, split_k) in [
                        ("split_k", false, Some(ws)),
                        ("no_split", false, None),
                        ("reference", true, None),
                    ] {
                        let prep = bf16_launch(self.dev, desc, reference, split_k);
                        self.point(&p, variant, prep);
                    }
                }
            }
        }
    }
}

fn main() {
    let cfg = common::gpu_support::deepseek_r1_config();
    let Some(dev) = common::open_device() else {
        return;
    };
    let mut h = common::start(&dev, "decode_gemm");
    h.measure_copy_bandwidth()
        .unwrap_or_else(|e| fail("device-to-device copy bandwidth", e));
    let ws = SplitKWorkspace::for_device(&dev).unwrap_or_else(|e| fail("split-K workspace", e));
    let mut run = Run {
        dev: &dev,
        h,
        seed: 0xDEC0DE,
        errors: 0,
    };
    run.fp8(&cfg, &ws);
    run.bf16(&cfg, &ws);
    let errors = run.errors;
    run.h.finish();
    if errors > 0 {
        eprintln!("decode_gemm: {errors} point(s) failed (error lines above)");
        std::process::exit(1);
    }
}
