//! Decode-layer benchmark: DeepSeek-R1's real layers, without a checkpoint, through the
//! engine's own code path on one GPU.
//!
//! `cargo bench --bench decode_layer [-- OPTIONS]`. The dimensions are R1's released
//! config.json (tests/fixtures/deepseek-r1-config.json: hidden 7168, 128 heads, q_lora 1536,
//! kv_lora 512, rope 64, 256 routed experts top-8 in 8 groups, ...); the weights are
//! synthetic (`ModelWeights::synthetic`), generated on the device by the CUDA backend's fill
//! kernel: random FP8 codes and block multipliers sized so activations stay of order one.
//!
//! **Layer mode** (default). Small models built around one layer each, run by
//! `Engine::with_backend` + `forward_batch` (or `mtp_forward_batch`) on the CUDA backend:
//! - `dense`: one dense decoder layer (as R1's first 3); `moe`: one MoE layer (~11.5 GB);
//!   `mtp`: the MTP layer (embedding, norms, eh_proj, a MoE block) of the `moe` model, timed
//!   through `mtp_forward_batch` on an engine of its own. Their vocabulary is cut to 1024 (the
//!   embedding and head are not layers);
//! - `baseline`: no layer at all (embedding, final norm, the 1024-row head, the step's
//!   uploads and downloads), measured at every step shape and subtracted from the probes:
//!   a layer's time is its probe's minus the baseline's;
//! - `head`: no layer, the real vocabulary (129,280): the LM head at every batch, with the
//!   device-side draw over its logits (only token ids come back, as the engine decodes).
//!
//! Shapes: decode at batch 1, 8, 32, 128 over KV lengths 1K, 8K, 32K; verify steps (1 + d
//! tokens per sequence, d = 1..3 drafts) at batch 1..128 over 8K; a 4096-token prefill. For
//! the MTP layer a "verify" step is its catch-up after d accepted drafts (1 + d tokens).
//! Every point: 2 untimed steps, then `--steps` (10) timed ones, each after an L2 flush and a
//! synchronization; medians reported. Decode and verify steps replay CUDA graphs as the engine
//! runs them; up to batch 8 they run a second time eagerly (`no graphs` columns), which shows
//! what capture saves in launch gaps. Points run in increasing step size: the backend sizes
//! its MoE workspace (and its layout) by the largest step seen, so each point runs with the
//! workspace its own size creates; the prefill runs last.
//!
//! **The KV cache is filled by bookkeeping, not by a prefill**: a prefill of 128 sequences x
//! 32K tokens would take minutes per layer. The bench's backend (`decode_layer/probe.rs`)
//! answers fill steps with zeros and runs nothing, so the engine reserves pages as for a real
//! prefill; one filled sequence is forked per batch slot (pages shared), and a one-token MTP
//! step at position 0 of every fork (also skipped) makes the engine give each fork its own
//! copy of every page, as copy-on-write does for any write into shared pages (this is why the
//! `dense` model carries an MTP layer too). Each sequence of a batch thus reads its own pages,
//! from HBM, at its full length; the pages hold zeros (or values of earlier steps), which the
//! attention kernels take the same time over. The MTP layer's cache only advances through MTP
//! steps, so its fill costs host time per token (~84 KB): MTP points with batch x KV above
//! `R1_DECODE_LAYER_MTP_FILL` (131072) tokens are skipped, saying so.
//!
//! **Columns.** `gpu`: CUDA events on the backend's stream around the step's `run` (gaps
//! where the GPU waits for the host included); `step`: host wall time of the engine call;
//! `host = step - gpu`: launch and host overhead (batch building, the metadata upload, the
//! drawn tokens' download, the engine's bookkeeping). `layer`: probe gpu - baseline gpu at the same
//! shape. `W`/`KV`: bytes of weights and latent cache the layer reads, as the backend stores
//! them (FP8 codes + f32 block multipliers, bf16 norms/router/absorbed kv_b, f32 router bias,
//! bf16 cache); a MoE layer at T tokens reads attention + shared expert + the routed experts
//! touched, E * (1 - (1 - 8/256)^T) expected under uniform routing (the synthetic router's
//! random weights route close to that; bound min(256, 8T)): the bench cannot see the routing
//! inside the fused MoE block. `roof`: (W + KV) / the device-to-device copy bandwidth
//! measured at start (1 GiB cuMemcpyDtoD, read + write bytes over time); `%roof` = roof /
//! layer. Prefill rows also give their FLOPs.
//!
//! **Projection** (all-reduces and the expert all-to-all excluded): per-token decode latency
//! of the whole model on one GPU's share under TP = 8 (attention heads, dense MLP, shared
//! expert, vocab-parallel head) and EP = 8 (32 routed experts per GPU), at each (batch, KV):
//! `T = 3 * s_dense * L_dense + 58 * s_moe * L_moe + H / 8`, where `L_X` is a layer's measured
//! time, `s_X` = (its bytes on one rank) / (its bytes on one GPU) with q_a/kv_a/norms/router
//! replicated, q_b/kv_b/o_proj/MLPs split by 8, the rank's expected experts of its 32, and the
//! whole latent cache (MLA's latent is shared by all heads, so every TP rank reads all of it),
//! i.e. the same achieved bandwidth on a smaller share; `H` is the LM head's measured time.
//! With MTP drafting, `+ s_mtp * L_mtp`. Tokens/s: 1 / T per sequence, batch / T per group of
//! 8 GPUs. Host overhead is not in T: the engine mode measures it.
//!
//! **Engine mode** (`--engine`, or `--mode all` after the layers): the whole engine on a
//! 4-layer real-dimension model (dense, MoE, MoE, MTP; vocabulary 129,280) through the
//! continuous-batching scheduler (`engine::throughput::run`: random prompts, greedy
//! sampling, `ignore_eos`): wall time, TTFT, time per output token, and the split of the wall
//! time into GPU (events), backend host and engine + scheduler + sampling host time.
//!
//! Options: `--mode layers|engine|all`, `--engine` (= `--mode engine`), `--quick` (batch 1
//! and 32 over 1K, no verify or prefill; engine mode 2 runs), `--steps N`, `--budget-s S`
//! (start nothing after S seconds; what was measured is still reported), `--json PATH`,
//! `--dry-run` (the byte accounting and projection shares, no device). Without `--bench`
//! (`cargo test --benches`) it runs the quick grid with one timed step, a smoke test. Results:
//! the printed tables and a JSON document at `--json`, `R1_DECODE_LAYER_JSON` or
//! bench/results/decode_layer.json; with `R1_BENCH_JSON` one JSON line per row is appended
//! there too (the GPU suite's bench.jsonl). Sizes that do not fit the free device memory are
//! skipped with the reason. Without a GPU: `skipped: no CUDA device (<reason>)`, exit 0.

#[path = "decode_layer/bytes.rs"]
mod bytes;
mod common;
#[path = "decode_layer/probe.rs"]
mod probe;

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use bytes::{block_flops, kv_read, mtp_extra, weight_bytes, LayerBytes, EP, TP};
use probe::{Control, Probe};
use r1_runtime::backend::Precision;
use r1_runtime::config::ModelConfig;
use r1_runtime::cuda::timing::Stats;
use r1_runtime::cuda::{CudaBackend, CudaOptions, Device};
use r1_runtime::engine::sampling::SamplingParams;
use r1_runtime::engine::scheduler::SchedulerOptions;
use r1_runtime::engine::throughput::{self, BenchOptions};
use r1_runtime::engine::{Engine, MtpStep, Readback, Sequence, Step};
use r1_runtime::model::weights::{ModelWeights, WeightId};
use r1_runtime::model::LogitRows;
use r1_runtime::{Error, Result};
use serde_json::{json, Value};

const SEED: u64 = 0xDEC0DE;
/// The probes draw greedily (the sampling kernel runs either way).
const GREEDY: SamplingParams = SamplingParams {
    temperature: 0.0,
    top_k: 0,
    top_p: 1.0,
    seed: 0,
    ignore_eos: true,
};
/// The probes' vocabulary (the embedding and head are not layers).
const PROBE_VOCAB: usize = 1024;
const WARMUP: usize = 2;
const PREFILL_RUNS: usize = 3;
const GIB: f64 = (1u64 << 30) as f64;
/// Tokens per bookkeeping-only fill call (bounds the zero outputs it allocates).
const FILL_CHUNK: usize = 4096;
/// Decode and verify steps up to this batch are also measured without CUDA graphs.
const EAGER_MAX_BATCH: usize = 8;

/// The one place the bench builds the CUDA backend. The grid needs one that holds 128
/// sequences of up to 32K + 64 positions and steps of up to 4096 tokens (the prefill; verify
/// steps reach 512), and the engine mode 32 sequences of about 300 positions.
fn cuda_backend(cfg: &ModelConfig, weights: Arc<ModelWeights>) -> Result<CudaBackend> {
    let options = CudaOptions {
        cuda_graphs: true,
        max_step_tokens: 4096,
        max_seqs: 128,
        max_seq_len: 32 * 1024 + 128,
    };
    CudaBackend::new(cfg, weights, Precision::W8a8, &options)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Layers,
    Engine,
    All,
}

struct Args {
    mode: Mode,
    quick: bool,
    /// `--bench` was passed (cargo bench); else a smoke run.
    bench_mode: bool,
    steps: usize,
    budget_s: Option<f64>,
    json: PathBuf,
    dry_run: bool,
}

fn parse_args() -> std::result::Result<Args, String> {
    let mut a = Args {
        mode: Mode::Layers,
        quick: false,
        bench_mode: false,
        steps: 10,
        budget_s: std::env::var("R1_DECODE_LAYER_BUDGET_S")
            .ok()
            .and_then(|v| v.parse().ok()),
        json: std::env::var_os("R1_DECODE_LAYER_JSON")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("bench/results/decode_layer.json")),
        dry_run: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().ok_or(format!("{name} needs a value"));
        match arg.as_str() {
            "--bench" => a.bench_mode = true,
            "--quick" => a.quick = true,
            "--engine" => a.mode = Mode::Engine,
            "--dry-run" => a.dry_run = true,
            "--mode" => {
                a.mode = match value("--mode")?.as_str() {
                    "layers" => Mode::Layers,
                    "engine" => Mode::Engine,
                    "all" => Mode::All,
                    other => return Err(format!("--mode {other}: expected layers, engine or all")),
                }
            }
            "--steps" => {
                a.steps = value("--steps")?
                    .parse()
                    .ok()
                    .filter(|&n| n > 0)
                    .ok_or("--steps needs a positive integer")?
            }
            "--budget-s" => {
                a.budget_s = Some(
                    value("--budget-s")?
                        .parse()
                        .map_err(|_| "--budget-s needs a number of seconds")?,
                )
            }
            "--json" => a.json = PathBuf::from(value("--json")?),
            other => {
                return Err(format!(
                    "unknown argument {other} (options: --mode layers|engine|all, --engine, \
                     --quick, --steps N, --budget-s S, --json PATH, --dry-run)"
                ))
            }
        }
    }
    if !a.bench_mode {
        a.quick = true;
        a.steps = 1;
    }
    Ok(a)
}

/// What a layer probe's step looks like.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    Decode,
    /// 1 + drafts tokens per sequence (the MTP layer: its catch-up after `drafts` accepted).
    Verify,
    Prefill,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Decode => "decode",
            Kind::Verify => "verify",
            Kind::Prefill => "prefill",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Shape {
    kind: Kind,
    batch: usize,
    /// Positions cached before the step.
    kv: usize,
    /// New tokens per sequence.
    q: usize,
}

impl Shape {
    fn tokens(&self) -> usize {
        self.batch * self.q
    }

    fn id(&self) -> String {
        match self.kind {
            Kind::Decode => format!("decode_b{}_kv{}", self.batch, self.kv),
            Kind::Verify => format!("verify_b{}_kv{}_d{}", self.batch, self.kv, self.q - 1),
            Kind::Prefill => format!("prefill_{}", self.q),
        }
    }
}

/// Every shape of the grid, in increasing step size (prefill last).
fn grid(quick: bool) -> Vec<Shape> {
    let (batches, kvs): (&[usize], &[usize]) = if quick {
        (&[1, 32], &[1024])
    } else {
        (&[1, 8, 32, 128], &[1024, 8192, 32768])
    };
    let mut shapes = Vec::new();
    for &batch in batches {
        for &kv in kvs {
            shapes.push(Shape {
                kind: Kind::Decode,
                batch,
                kv,
                q: 1,
            });
        }
        if !quick {
            for d in 1..=3 {
                shapes.push(Shape {
                    kind: Kind::Verify,
                    batch,
                    kv: 8192,
                    q: 1 + d,
                });
            }
        }
    }
    shapes.sort_by_key(|s| (s.tokens(), s.kv));
    if !quick {
        shapes.push(Shape {
            kind: Kind::Prefill,
            batch: 1,
            kv: 0,
            q: 4096,
        });
    }
    shapes
}

/// R1's config cut to a probe: `layers` main layers (`dense` of them first), the MTP layer or
/// not, and a vocabulary.
fn probe_config(
    r1: &ModelConfig,
    layers: usize,
    dense: usize,
    mtp: bool,
    vocab: usize,
) -> ModelConfig {
    let mut c = r1.clone();
    c.num_hidden_layers = layers;
    c.first_k_dense_replace = dense;
    c.num_nextn_predict_layers = usize::from(mtp);
    c.vocab_size = vocab;
    c
}

/// Device bytes of every weight of a table.
fn table_bytes(w: &ModelWeights) -> f64 {
    (0..w.len())
        .map(|i| weight_bytes(w.get(WeightId(i as u32))))
        .sum()
}

/// Free and total device memory.
fn mem_info(dev: &Device) -> Result<(f64, f64)> {
    dev.context()
        .bind_to_thread()
        .map_err(driver_error("cuCtxSetCurrent"))?;
    let (free, total) =
        cudarc::driver::result::mem_get_info().map_err(driver_error("cuMemGetInfo"))?;
    Ok((free as f64, total as f64))
}

fn driver_error(call: &str) -> impl Fn(cudarc::driver::DriverError) -> Error + '_ {
    move |source| {
        Error::from(r1_runtime::cuda::CudaError::Driver {
            call: call.into(),
            source,
        })
    }
}

/// One engine around a probe model.
struct ProbeEngine {
    name: &'static str,
    cfg: ModelConfig,
    weights: Arc<ModelWeights>,
    engine: Engine,
    control: Arc<Control>,
    /// One sequence per KV length, filled by bookkeeping, forked per batch slot.
    sources: HashMap<usize, Sequence>,
}

impl ProbeEngine {
    fn build(name: &'static str, cfg: ModelConfig, cache_tokens: usize) -> Result<Self> {
        let weights = Arc::new(ModelWeights::synthetic(&cfg, cfg.has_mtp(), SEED));
        let control = Arc::new(Control::default());
        let backend = Probe::new(
            cuda_backend(&cfg, Arc::clone(&weights))?,
            Arc::clone(&control),
        )?;
        let engine = Engine::with_backend(
            cfg.clone(),
            Arc::clone(&weights),
            Box::new(backend),
            cache_tokens,
        );
        Ok(ProbeEngine {
            name,
            cfg,
            weights,
            engine,
            control,
            sources: HashMap::new(),
        })
    }

    fn tokens(&self, n: usize, salt: usize) -> Vec<u32> {
        let v = self.cfg.vocab_size;
        (0..n)
            .map(|i| ((i * 7919 + salt * 104_729 + 3) % v) as u32)
            .collect()
    }

    /// Appends `n` positions to `seq` by bookkeeping (nothing runs).
    fn fill_main(&mut self, seq: &mut Sequence, n: usize) -> Result<()> {
        self.control.set_skip(true);
        let mut left = n;
        let result = (|| {
            while left > 0 {
                let chunk = left.min(FILL_CHUNK);
                let tokens = self.tokens(chunk, left);
                self.engine.forward_batch(
                    &mut [Step {
                        seq: &mut *seq,
                        tokens: &tokens,
                    }],
                    LogitRows::Last,
                )?;
                left -= chunk;
            }
            Ok(())
        })();
        self.control.set_skip(false);
        result
    }

    /// `batch` sequences of `kv` positions, each with its own cache pages (see the module
    /// docs): forks of one filled source, un-shared by a skipped one-token MTP step at
    /// position 0. For the MTP layer (`mtp`), the MTP cache is filled to `kv` by skipped MTP
    /// steps instead, which also un-share the pages.
    fn sequences(&mut self, batch: usize, kv: usize, mtp: bool) -> Result<Vec<Sequence>> {
        if !self.sources.contains_key(&kv) {
            let mut src = Sequence::default();
            self.fill_main(&mut src, kv)?;
            self.sources.insert(kv, src);
        }
        let src = &self.sources[&kv];
        let mut seqs: Vec<Sequence> = (0..batch).map(|_| self.engine.fork(src, kv)).collect();
        let h = self.cfg.hidden_size;
        self.control.set_skip(true);
        let result = (|| {
            if mtp {
                let chunk = (FILL_CHUNK / batch).clamp(1, kv);
                let zeros = vec![0.0f32; chunk * h];
                let mut from = 0;
                while from < kv {
                    let n = chunk.min(kv - from);
                    let tokens = self.tokens(n, from);
                    let mut steps: Vec<MtpStep> = seqs
                        .iter_mut()
                        .map(|seq| MtpStep {
                            seq,
                            from,
                            next_tokens: &tokens,
                            hidden: &zeros[..n * h],
                        })
                        .collect();
                    self.engine.mtp_forward_batch(&mut steps, LogitRows::Last)?;
                    from += n;
                }
            } else {
                let zeros = vec![0.0f32; h];
                let mut steps: Vec<MtpStep> = seqs
                    .iter_mut()
                    .map(|seq| MtpStep {
                        seq,
                        from: 0,
                        next_tokens: &[1],
                        hidden: &zeros,
                    })
                    .collect();
                self.engine.mtp_forward_batch(&mut steps, LogitRows::Last)?;
            }
            Ok(())
        })();
        self.control.set_skip(false);
        if let Err(e) = result {
            self.release(&mut seqs);
            return Err(e);
        }
        Ok(seqs)
    }

    fn release(&mut self, seqs: &mut [Sequence]) {
        for s in seqs {
            self.engine.release(s);
        }
    }

    /// One step of `shape` over `seqs` (main model, or the MTP layer); returns the engine
    /// call's wall time in microseconds.
    fn step(
        &mut self,
        seqs: &mut [Sequence],
        shape: &Shape,
        mtp: bool,
        salt: usize,
    ) -> Result<f64> {
        let tokens = self.tokens(shape.q, salt);
        let h = self.cfg.hidden_size;
        let t0 = Instant::now();
        if mtp {
            let hidden = vec![0.0f32; shape.q * h];
            let mut steps: Vec<MtpStep> = seqs
                .iter_mut()
                .map(|seq| MtpStep {
                    from: seq.mtp_len(),
                    seq,
                    next_tokens: &tokens,
                    hidden: &hidden,
                })
                .collect();
            // The drafter's step: one draw per sequence.
            let reads = vec![Readback::sample(1, &GREEDY); steps.len()];
            self.engine
                .mtp_forward_batch_with(&mut steps, &reads, false)?;
        } else {
            let mut steps: Vec<Step> = seqs
                .iter_mut()
                .map(|seq| Step {
                    seq,
                    tokens: &tokens,
                })
                .collect();
            // Decode and verify steps draw a token after every new one (on the device, only
            // the ids come back), a prefill after its last.
            let rows = if shape.kind == Kind::Prefill {
                1
            } else {
                shape.q
            };
            let reads = vec![Readback::sample(rows, &GREEDY); steps.len()];
            self.engine.forward_batch_with(&mut steps, &reads, false)?;
        }
        Ok(t0.elapsed().as_secs_f64() * 1e6)
    }
}

/// Medians of a point's timed steps.
#[derive(Debug, Clone, Copy)]
struct Timed {
    gpu: Stats,
    run_us: f64,
    step_us: f64,
    /// GPU and step time of the same steps run eagerly (decode-sized steps only).
    eager: Option<(f64, f64)>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

struct Bench {
    args: Args,
    start: Instant,
    copy_gbps: f64,
    dev: Device,
    r1: ModelConfig,
    rows: Vec<Value>,
    skipped: Vec<Value>,
    /// Baseline gpu time by (batch, tokens per sequence).
    baseline: HashMap<(usize, usize), f64>,
    /// Layer gpu time by (probe, kind, batch, kv, q).
    layer_us: HashMap<(&'static str, Shape), f64>,
    bytes: HashMap<&'static str, (LayerBytes, f64)>,
    jsonl: Option<std::fs::File>,
    mtp_fill_tokens: usize,
}

impl Bench {
    fn out_of_time(&self) -> bool {
        self.args
            .budget_s
            .is_some_and(|b| self.start.elapsed().as_secs_f64() > b)
    }

    fn skip(&mut self, probe: &str, what: &str, reason: String) {
        println!("decode_layer: skipped {probe} {what}: {reason}");
        self.skipped
            .push(json!({"probe": probe, "point": what, "reason": reason}));
    }

    fn line(&mut self, mut obj: Value) {
        obj["bench"] = json!("decode_layer");
        if let Some(f) = &mut self.jsonl {
            if let Err(e) = writeln!(f, "{obj}") {
                eprintln!("decode_layer: cannot append to R1_BENCH_JSON: {e}");
                self.jsonl = None;
            }
        }
    }

    /// Whether `bytes` of new device memory fit beside what is allocated (with 2 GiB spare).
    fn fits(&mut self, probe: &str, what: &str, bytes: f64) -> bool {
        match mem_info(&self.dev) {
            Ok((free, _)) if free >= bytes + 2.0 * GIB => true,
            Ok((free, _)) => {
                self.skip(
                    probe,
                    what,
                    format!(
                        "needs about {:.1} GiB of device memory, {:.1} GiB free",
                        bytes / GIB,
                        free / GIB
                    ),
                );
                false
            }
            Err(e) => {
                self.skip(probe, what, format!("cannot query free memory: {e}"));
                false
            }
        }
    }

    /// Times `shape` on a probe (layer gpu = probe - baseline, unless this is the baseline).
    fn point(&mut self, pe: &mut ProbeEngine, shape: Shape, mtp: bool) -> Result<()> {
        let probe = pe.name;
        let what = shape.id();
        if self.out_of_time() {
            self.skip(probe, &what, "the time budget (--budget-s) ran out".into());
            return Ok(());
        }
        if mtp && shape.kind != Kind::Prefill && shape.batch * shape.kv > self.mtp_fill_tokens {
            self.skip(
                probe,
                &what,
                format!(
                    "the MTP cache fills through MTP steps at ~84 KB of host traffic per token; \
                     batch x KV = {} exceeds R1_DECODE_LAYER_MTP_FILL = {}",
                    shape.batch * shape.kv,
                    self.mtp_fill_tokens
                ),
            );
            return Ok(());
        }
        let steps = if shape.kind == Kind::Prefill {
            PREFILL_RUNS.min(self.args.steps)
        } else {
            self.args.steps
        };
        // Decode-sized steps run a second time without CUDA graphs.
        let eager_too = shape.kind != Kind::Prefill && shape.batch <= EAGER_MAX_BATCH;
        let passes = 1 + usize::from(eager_too);
        let cache_layers = pe.weights.blocks.len() + usize::from(pe.weights.mtp.is_some());
        let pages =
            shape.batch * (shape.kv + passes * (WARMUP + steps) * shape.q + 64).div_ceil(64);
        let kv_bytes = (pages * 64 * pe.cfg.kv_cache_width() * 2 * cache_layers) as f64;
        // The cache grows by reallocation: the new size while the old one still exists.
        if !self.fits(probe, &what, 2.0 * kv_bytes) {
            return Ok(());
        }
        let mut gpu = Vec::new();
        let mut run = Vec::new();
        let mut wall = Vec::new();
        let (mut eager_gpu, mut eager_wall) = (Vec::new(), Vec::new());
        let timed = (|| -> Result<()> {
            if shape.kind == Kind::Prefill {
                for i in 0..1 + steps {
                    let mut seqs = vec![Sequence::default()];
                    let r = pe.step(&mut seqs, &shape, mtp, i);
                    pe.release(&mut seqs);
                    let us = r?;
                    if i > 0 {
                        let t = pe.control.timing();
                        gpu.push(t.last_gpu_us);
                        run.push(t.last_run_us);
                        wall.push(us);
                    }
                }
                return Ok(());
            }
            let mut seqs = if shape.kv == 0 {
                (0..shape.batch).map(|_| Sequence::default()).collect()
            } else {
                pe.sequences(shape.batch, shape.kv, mtp)?
            };
            let r = (|| {
                for i in 0..WARMUP + steps {
                    let us = pe.step(&mut seqs, &shape, mtp, i)?;
                    if i >= WARMUP {
                        let t = pe.control.timing();
                        gpu.push(t.last_gpu_us);
                        run.push(t.last_run_us);
                        wall.push(us);
                    }
                }
                if !eager_too {
                    return Ok(());
                }
                // The same steps without CUDA graphs: what capture saves in launches.
                pe.control.set_eager(true);
                let r = (|| {
                    for i in 0..WARMUP + steps {
                        let us = pe.step(&mut seqs, &shape, mtp, i)?;
                        if i >= WARMUP {
                            eager_gpu.push(pe.control.timing().last_gpu_us);
                            eager_wall.push(us);
                        }
                    }
                    Ok(())
                })();
                pe.control.set_eager(false);
                r
            })();
            pe.release(&mut seqs);
            r
        })();
        if let Err(e) = timed {
            self.skip(probe, &what, format!("failed: {e}"));
            return Err(e);
        }
        let t = Timed {
            gpu: Stats::of(&gpu),
            run_us: median(run),
            step_us: median(wall),
            eager: (!eager_gpu.is_empty()).then(|| (median(eager_gpu), median(eager_wall))),
        };
        self.report(pe, probe, shape, mtp, t);
        Ok(())
    }

    fn report(&mut self, pe: &ProbeEngine, probe: &'static str, shape: Shape, mtp: bool, t: Timed) {
        let gpu = t.gpu.median_us;
        let host = t.step_us - gpu;
        let mut obj = json!({
            "id": format!("{probe}_{}", shape.id()),
            "probe": probe,
            "kind": shape.kind.name(),
            "batch": shape.batch,
            "kv": shape.kv,
            "tokens_per_seq": shape.q,
            "drafts": if shape.kind == Kind::Verify { shape.q - 1 } else { 0 },
            "steps": t.gpu.n,
            "gpu_us": gpu,
            "gpu_min_us": t.gpu.min_us,
            "gpu_max_us": t.gpu.max_us,
            "run_us": t.run_us,
            "step_us": t.step_us,
            "host_us": host,
        });
        let mut line = format!(
            "decode_layer {probe:<8} {:<22} gpu {gpu:9.1} us  step {:9.1} us  host {host:8.1} us",
            shape.id(),
            t.step_us
        );
        if let Some((eager_gpu, eager_step)) = t.eager {
            obj["eager_gpu_us"] = json!(eager_gpu);
            obj["eager_step_us"] = json!(eager_step);
            line += &format!("  (no graphs: gpu {eager_gpu:9.1} us  step {eager_step:9.1} us)");
        }
        if probe == "baseline" {
            self.baseline.insert((shape.batch, shape.q), gpu);
        } else if probe == "head" {
            if let Some(&base) = self.baseline.get(&(shape.batch, shape.q)) {
                // The head's bf16 rows beyond the baseline's, and the draw over its logits.
                let layer = gpu - base;
                let w = ((pe.cfg.vocab_size - PROBE_VOCAB) * pe.cfg.hidden_size * 2) as f64;
                let roof = w / (self.copy_gbps * 1e9) * 1e6;
                self.layer_us.insert((probe, shape), layer);
                obj["layer_us"] = json!(layer);
                obj["weight_bytes"] = json!(w);
                obj["roofline_us"] = json!(roof);
                obj["roofline_fraction"] = json!(roof / layer);
                line += &format!(
                    "  lm_head {layer:9.1} us  W {:7.3} GB  roof {roof:8.1} us  {:5.1}% roof",
                    w / 1e9,
                    100.0 * roof / layer
                );
            }
        } else if let Some(&base) = self.baseline.get(&(shape.batch, shape.q)) {
            let layer = gpu - base;
            self.layer_us.insert((probe, shape), layer);
            let block = if mtp {
                pe.weights.mtp.as_ref().map(|m| &m.block)
            } else {
                pe.weights.blocks.first()
            };
            if let Some(b) = block {
                let lb = LayerBytes::of_block(&pe.weights, &pe.cfg, b);
                let extra = match (&pe.weights.mtp, mtp) {
                    (Some(m), true) => mtp_extra(&pe.weights, m),
                    _ => 0.0,
                };
                self.bytes.insert(probe, (lb, extra));
                let tokens = shape.tokens();
                let w = lb.read(tokens) + extra;
                let kv = kv_read(&pe.cfg, shape.batch, shape.kv + shape.q);
                let roof = (w + kv) / (self.copy_gbps * 1e9) * 1e6;
                let experts = lb.expected_experts(lb.experts as f64, tokens);
                obj["layer_us"] = json!(layer);
                obj["weight_bytes"] = json!(w);
                obj["kv_bytes"] = json!(kv);
                obj["experts_expected"] = json!(experts);
                obj["experts_bound"] = json!(lb.experts.min(lb.top_k * tokens));
                obj["roofline_us"] = json!(roof);
                obj["roofline_fraction"] = json!(roof / layer);
                line += &format!(
                    "  layer {layer:9.1} us  W {:7.3} GB  KV {:7.3} GB  roof {roof:8.1} us  {:5.1}% roof",
                    w / 1e9,
                    kv / 1e9,
                    100.0 * roof / layer
                );
                if lb.experts > 0 {
                    line += &format!("  experts ~{experts:.1}");
                }
                if shape.kind == Kind::Prefill {
                    let flops = block_flops(&pe.cfg, &lb, tokens, tokens as f64 / 2.0);
                    obj["flops"] = json!(flops);
                    obj["tflops"] = json!(flops / layer / 1e6);
                    line += &format!("  {:.1} TFLOPS", flops / layer / 1e6);
                }
            }
        }
        println!("{line}");
        self.line(obj.clone());
        self.rows.push(obj);
    }

    /// Measures every shape of the grid on one probe model (built here, dropped after): its
    /// main model, or its MTP layer (`mtp`).
    fn probe(&mut self, name: &'static str, cfg: ModelConfig, shapes: &[Shape], mtp: bool) {
        if self.out_of_time() {
            self.skip(name, "all", "the time budget (--budget-s) ran out".into());
            return;
        }
        let need = table_bytes(&ModelWeights::synthetic(&cfg, cfg.has_mtp(), SEED));
        if !self.fits(name, "the model", need) {
            return;
        }
        let cache_tokens = shapes
            .iter()
            .map(|s| s.batch * (s.kv + (WARMUP + self.args.steps.max(PREFILL_RUNS)) * s.q + 128))
            .max()
            .unwrap_or(0)
            + 2 * 65536;
        let t0 = Instant::now();
        let mut pe = match ProbeEngine::build(name, cfg, cache_tokens) {
            Ok(pe) => pe,
            Err(e) => {
                self.skip(name, "the model", format!("cannot build it: {e}"));
                return;
            }
        };
        pe.control.set_flush(true);
        println!(
            "decode_layer: {name}: {} weights, {:.2} GB on the device, built in {:.1} s",
            pe.weights.len(),
            need / 1e9,
            t0.elapsed().as_secs_f64()
        );
        for &shape in shapes {
            if self.point(&mut pe, shape, mtp).is_err() {
                break;
            }
        }
        let mut sources: Vec<Sequence> = pe.sources.drain().map(|(_, s)| s).collect();
        pe.release(&mut sources);
    }

    fn layers(&mut self) {
        let shapes = grid(self.args.quick);
        let r1 = self.r1.clone();
        // Baseline at every (batch, tokens per sequence) the probes use, KV irrelevant.
        let mut base: Vec<Shape> = Vec::new();
        for s in &shapes {
            let b = Shape { kv: 0, ..*s };
            if !base.contains(&b) {
                base.push(b);
            }
        }
        self.probe(
            "baseline",
            probe_config(&r1, 0, 0, false, PROBE_VOCAB),
            &base,
            false,
        );
        let decode: Vec<Shape> = base
            .iter()
            .filter(|s| s.kind == Kind::Decode)
            .copied()
            .collect();
        self.probe(
            "head",
            probe_config(&r1, 0, 0, false, r1.vocab_size),
            &decode,
            false,
        );
        // In the order the projection needs them; the MTP layer (the MoE model's own, on a
        // fresh engine so its points also start from a workspace of their own size) last.
        let moe = probe_config(&r1, 1, 0, true, PROBE_VOCAB);
        self.probe("moe", moe.clone(), &shapes, false);
        self.probe(
            "dense",
            probe_config(&r1, 1, 1, true, PROBE_VOCAB),
            &shapes,
            false,
        );
        self.probe("mtp", moe, &shapes, true);
    }

    /// The whole-model projection from the layer figures (see the module docs).
    fn projection(&mut self) -> Vec<Value> {
        let (Some(&(dense, _)), Some(&(moe, _))) = (self.bytes.get("dense"), self.bytes.get("moe"))
        else {
            println!("decode_layer: no projection: the dense or MoE layer was not measured");
            return Vec::new();
        };
        let mtp = self.bytes.get("mtp").copied();
        let n_dense = self.r1.first_k_dense_replace;
        let n_moe = self.r1.num_hidden_layers - n_dense;
        println!();
        println!(
            "projection: per-token decode on one GPU's share, TP = {TP} / EP = {EP}, all-reduces and \
             the expert all-to-all excluded, host overhead excluded (see --engine):"
        );
        println!(
            "  T = {n_dense} * s_dense * L_dense + {n_moe} * s_moe * L_moe + H / {TP}   [+ s_mtp * L_mtp when drafting]"
        );
        println!(
            "  L: measured layer time (probe - baseline); H: measured LM head (vocab {}); s = bytes on one rank / bytes on one GPU",
            self.r1.vocab_size
        );
        println!(
            "  one rank: replicated (norms, q_a, kv_a, router) whole; q_b, kv_b, o_proj, MLPs / {TP}; \
             its {} experts' expected share; the whole latent cache",
            (moe.experts as f64 / EP) as usize
        );
        println!(
            "  {:>5} {:>6} | {:>9} {:>6} | {:>9} {:>6} | {:>8} | {:>9} {:>9} {:>10} | {:>9}",
            "batch",
            "kv",
            "L_dense",
            "s",
            "L_moe",
            "s",
            "H",
            "T ms",
            "tok/s/seq",
            "tok/s grp",
            "+MTP ms"
        );
        let share = |l: &LayerBytes, extra: f64, b: usize, kv: f64| {
            (l.read_per_rank(b) + extra + kv) / (l.read(b) + extra + kv)
        };
        let mut out = Vec::new();
        let shapes: Vec<Shape> = grid(self.args.quick)
            .into_iter()
            .filter(|s| s.kind == Kind::Decode)
            .collect();
        for s in shapes {
            let (Some(&ld), Some(&lm)) = (
                self.layer_us.get(&("dense", s)),
                self.layer_us.get(&("moe", s)),
            ) else {
                continue;
            };
            let head = self
                .layer_us
                .get(&("head", Shape { kv: 0, ..s }))
                .copied()
                .unwrap_or(0.0);
            let kv = kv_read(&self.r1, s.batch, s.kv + 1);
            let (sd, sm) = (
                share(&dense, 0.0, s.batch, kv),
                share(&moe, 0.0, s.batch, kv),
            );
            let t_us = n_dense as f64 * sd * ld + n_moe as f64 * sm * lm + head / TP;
            let mtp_us = match (mtp, self.layer_us.get(&("mtp", s))) {
                (Some((l, extra)), Some(&lt)) => Some(share(&l, extra, s.batch, kv) * lt),
                _ => None,
            };
            let per_seq = 1e6 / t_us;
            println!(
                "  {:>5} {:>6} | {:>9.1} {:>6.3} | {:>9.1} {:>6.3} | {:>8.1} | {:>9.3} {:>9.1} {:>10.1} | {:>9}",
                s.batch,
                s.kv,
                ld,
                sd,
                lm,
                sm,
                head,
                t_us / 1e3,
                per_seq,
                per_seq * s.batch as f64,
                mtp_us.map_or("-".into(), |m| format!("{:.3}", (t_us + m) / 1e3))
            );
            let obj = json!({
                "id": format!("projection_b{}_kv{}", s.batch, s.kv),
                "kind": "projection",
                "batch": s.batch,
                "kv": s.kv,
                "formula": format!("{n_dense} * s_dense * L_dense + {n_moe} * s_moe * L_moe + H / {TP}"),
                "l_dense_us": ld, "s_dense": sd, "l_moe_us": lm, "s_moe": sm, "lm_head_us": head,
                "per_token_us": t_us,
                "tokens_per_s_per_seq": per_seq,
                "tokens_per_s_group": per_seq * s.batch as f64,
                "with_mtp_us": mtp_us.map(|m| t_us + m),
            });
            self.line(obj.clone());
            out.push(obj);
        }
        out
    }

    /// The whole engine on a 4-layer real-dimension model through the scheduler.
    fn engine_mode(&mut self) -> Vec<Value> {
        let cfg = probe_config(&self.r1, 3, 1, true, self.r1.vocab_size);
        let runs: &[(usize, usize)] = if self.args.quick {
            &[(1, 0), (8, 0)]
        } else {
            &[(1, 0), (8, 0), (32, 0), (8, 1)]
        };
        let (input_len, output_len) = if self.args.quick { (64, 8) } else { (256, 32) };
        println!();
        println!(
            "engine: dense, MoE, MoE + MTP at R1's dimensions (vocab {}), the scheduler, greedy sampling; \
             {input_len} prompt tokens, {output_len} output tokens per request",
            cfg.vocab_size
        );
        let need = table_bytes(&ModelWeights::synthetic(&cfg, true, SEED));
        let mut out = Vec::new();
        for &(requests, drafts) in runs {
            let what = format!("engine_r{requests}_d{drafts}");
            if self.out_of_time() {
                self.skip(
                    "engine",
                    &what,
                    "the time budget (--budget-s) ran out".into(),
                );
                continue;
            }
            if !self.fits("engine", &what, need) {
                continue;
            }
            let weights = Arc::new(ModelWeights::synthetic(&cfg, true, SEED));
            let control = Arc::new(Control::default());
            let built = cuda_backend(&cfg, Arc::clone(&weights))
                .and_then(|b| Probe::new(b, Arc::clone(&control)));
            let backend = match built {
                Ok(b) => b,
                Err(e) => {
                    self.skip("engine", &what, format!("cannot build it: {e}"));
                    continue;
                }
            };
            let cache_tokens = requests * (input_len + output_len + 64) + 65536;
            let engine =
                Engine::with_backend(cfg.clone(), weights, Box::new(backend), cache_tokens);
            let opts = BenchOptions {
                requests,
                input_len,
                output_len,
                seed: SEED,
                sampling: SamplingParams::default(),
                scheduler: SchedulerOptions {
                    max_running: requests,
                    draft_tokens: drafts,
                    ..SchedulerOptions::default()
                },
            };
            let report = match throughput::run(engine, &opts) {
                Ok(r) => r,
                Err(e) => {
                    self.skip("engine", &what, format!("failed: {e}"));
                    continue;
                }
            };
            let t = control.timing();
            let wall_us = report.wall.as_secs_f64() * 1e6;
            let tpot = report.time_per_output_token;
            println!(
                "decode_layer engine   requests {requests:>3} drafts {drafts}  wall {:8.1} ms  {:8.1} output tok/s  \
                 TTFT p50 {:7.1} ms  TPOT p50 {:7.2} p90 {:7.2} p99 {:7.2} ms  steps {}  GPU {:5.1}%  backend host {:5.1}%  \
                 engine+scheduler host {:5.1}%",
                wall_us / 1e3,
                report.output_tokens_per_s(),
                report.time_to_first_token.p50 * 1e3,
                tpot.p50 * 1e3,
                tpot.p90 * 1e3,
                tpot.p99 * 1e3,
                t.runs,
                100.0 * t.gpu_us / wall_us,
                100.0 * (t.run_us - t.gpu_us).max(0.0) / wall_us,
                100.0 * (wall_us - t.run_us) / wall_us,
            );
            let obj = json!({
                "id": what,
                "kind": "engine",
                "requests": requests,
                "drafts": drafts,
                "input_len": input_len,
                "output_len": output_len,
                "wall_us": wall_us,
                "output_tokens": report.output_tokens,
                "output_tokens_per_s": report.output_tokens_per_s(),
                "ttft_p50_us": report.time_to_first_token.p50 * 1e6,
                "tpot_p50_us": tpot.p50 * 1e6,
                "tpot_p90_us": tpot.p90 * 1e6,
                "tpot_p99_us": tpot.p99 * 1e6,
                "backend_runs": t.runs,
                "gpu_us": t.gpu_us,
                "backend_run_us": t.run_us,
                "engine_host_us": wall_us - t.run_us,
                "accepted_drafts": report.accepted_draft_tokens,
                "drafted": report.draft_tokens,
            });
            self.line(obj.clone());
            out.push(obj);
        }
        out
    }
}

/// The byte accounting and projection shares, without a device.
fn dry_run(r1: &ModelConfig, quick: bool) {
    let moe_cfg = probe_config(r1, 1, 0, true, PROBE_VOCAB);
    let dense_cfg = probe_config(r1, 1, 1, true, PROBE_VOCAB);
    let moe_w = ModelWeights::synthetic(&moe_cfg, true, SEED);
    let dense_w = ModelWeights::synthetic(&dense_cfg, true, SEED);
    let moe = LayerBytes::of_block(&moe_w, &moe_cfg, &moe_w.blocks[0]);
    let dense = LayerBytes::of_block(&dense_w, &dense_cfg, &dense_w.blocks[0]);
    let mtp_extra_b = moe_w.mtp.as_ref().map_or(0.0, |m| mtp_extra(&moe_w, m));
    println!(
        "decode_layer --dry-run: dense layer {:.3} GB, MoE layer {:.3} GB ({} experts of {:.1} MB), MTP extras {:.3} GB, \
         LM head {:.3} GB",
        dense.total() / 1e9,
        moe.total() / 1e9,
        moe.experts,
        moe.expert / 1e6,
        mtp_extra_b / 1e9,
        (r1.vocab_size * r1.hidden_size * 2) as f64 / 1e9
    );
    println!(
        "  {:<22} {:>10} {:>10} {:>10} {:>8} {:>8} {:>8}",
        "shape", "W dense GB", "W MoE GB", "KV GB", "experts", "s_dense", "s_moe"
    );
    for s in grid(quick) {
        let t = s.tokens();
        let kv = kv_read(r1, s.batch, s.kv + s.q);
        let share = |l: &LayerBytes| (l.read_per_rank(t) + kv) / (l.read(t) + kv);
        println!(
            "  {:<22} {:>10.3} {:>10.3} {:>10.3} {:>8.1} {:>8.3} {:>8.3}",
            s.id(),
            dense.read(t) / 1e9,
            moe.read(t) / 1e9,
            kv / 1e9,
            moe.expected_experts(moe.experts as f64, t),
            share(&dense),
            share(&moe)
        );
    }
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("decode_layer: {e}");
            std::process::exit(2);
        }
    };
    let r1 = common::gpu_support::deepseek_r1_config();
    if args.dry_run {
        dry_run(&r1, args.quick);
        return;
    }
    let Some(dev) = common::open_device() else {
        return;
    };
    let copy_gbps = match common::copy_bandwidth(&dev) {
        Ok(b) => b,
        Err(e) => common::fail("device-to-device copy bandwidth", e),
    };
    let (free, total) = mem_info(&dev).unwrap_or((f64::NAN, f64::NAN));
    let i = dev.info();
    println!(
        "decode_layer: {} | {} SMs | L2 {} MiB | memory {:.1} GiB free of {:.1} | driver {} | copy {:.0} GB/s \
         (read + write, 1 GiB cuMemcpyDtoD) | {} timed steps per point{}",
        i.name,
        i.sm_count,
        i.l2_bytes >> 20,
        free / GIB,
        total / GIB,
        i.driver_version,
        copy_gbps,
        args.steps,
        if args.bench_mode { "" } else { " | no --bench: smoke run, no timing claims" }
    );
    let jsonl = std::env::var("R1_BENCH_JSON").ok().and_then(|path| {
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| eprintln!("decode_layer: R1_BENCH_JSON={path}: {e}"))
            .ok()
    });
    let mode = args.mode;
    let mut b = Bench {
        start: Instant::now(),
        copy_gbps,
        r1,
        rows: Vec::new(),
        skipped: Vec::new(),
        baseline: HashMap::new(),
        layer_us: HashMap::new(),
        bytes: HashMap::new(),
        jsonl,
        mtp_fill_tokens: std::env::var("R1_DECODE_LAYER_MTP_FILL")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(131_072),
        dev: dev.clone(),
        args,
    };
    b.line(json!({"id": "copy_bandwidth", "kind": "copy", "gbps": copy_gbps, "gpu": i.name}));
    let mut projection = Vec::new();
    if mode != Mode::Engine {
        b.layers();
        projection = b.projection();
    }
    let engine = if mode != Mode::Layers {
        b.engine_mode()
    } else {
        Vec::new()
    };
    let doc = json!({
        "bench": "decode_layer",
        "gpu": i.name,
        "sm_count": i.sm_count,
        "driver_version": i.driver_version,
        "memory_total_bytes": total,
        "copy_gbps": copy_gbps,
        "bench_mode": b.args.bench_mode,
        "quick": b.args.quick,
        "steps": b.args.steps,
        "model": {
            "hidden": b.r1.hidden_size, "heads": b.r1.num_attention_heads,
            "q_lora": b.r1.q_lora_rank, "kv_lora": b.r1.kv_lora_rank,
            "rope": b.r1.qk_rope_head_dim, "nope": b.r1.qk_nope_head_dim, "v": b.r1.v_head_dim,
            "experts": b.r1.n_routed_experts, "top_k": b.r1.num_experts_per_tok,
            "moe_intermediate": b.r1.moe_intermediate_size,
            "intermediate": b.r1.intermediate_size, "vocab": b.r1.vocab_size,
            "layers": b.r1.num_hidden_layers, "dense_layers": b.r1.first_k_dense_replace,
        },
        "kv_fill": "bookkeeping: skipped fill steps, forks un-shared by a skipped MTP step (zeros in the pages)",
        "rows": b.rows,
        "projection": projection,
        "engine": engine,
        "skipped": b.skipped,
        "seconds": b.start.elapsed().as_secs_f64(),
    });
    let path = &b.args.json;
    let written = path
        .parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .and_then(|()| std::fs::write(path, format!("{doc:#}\n")));
    match written {
        Ok(()) => println!("decode_layer: results written to {}", path.display()),
        Err(e) => {
            eprintln!("decode_layer: cannot write {}: {e}", path.display());
            std::process::exit(1);
        }
    }
}
