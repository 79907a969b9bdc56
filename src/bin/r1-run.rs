//! `r1-run`: the command-line front end. Parsing and printing only; the work is in the library.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use r1_runtime::checkpoint::{dtype_summary, write_f32_tensors, Checkpoint};
use r1_runtime::config::ModelConfig;
use r1_runtime::engine::sampling::SamplingParams;
use r1_runtime::engine::speculative::MtpDrafter;
use r1_runtime::engine::{BackendKind, Engine, EngineOptions, FinishReason};
use r1_runtime::{Precision, Result};

#[derive(Parser)]
#[command(
    name = "r1-run",
    version,
    about = "DeepSeek-R1 / V3 inference from the official FP8 checkpoint"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the config summary, parameter counts by dtype and whether an MTP layer is present.
    Info {
        #[arg(long)]
        model: PathBuf,
    },
    /// Write the logits of a token sequence (and the MTP layer's) to a safetensors file.
    Logits {
        #[command(flatten)]
        run: RunArgs,
        /// Comma-separated token ids.
        #[arg(long, value_parser = parse_tokens)]
        tokens: Tokens,
        #[arg(long)]
        out: PathBuf,
    },
    /// Generate a continuation of a token sequence through the KV cache.
    Generate {
        #[command(flatten)]
        run: RunArgs,
        /// Comma-separated prompt token ids.
        #[arg(long, value_parser = parse_tokens)]
        tokens: Tokens,
        #[arg(long, default_value_t = 32)]
        max_new_tokens: usize,
        /// 0 is greedy.
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        #[arg(long, default_value_t = 0)]
        top_k: usize,
        #[arg(long, default_value_t = 1.0)]
        top_p: f32,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Keep generating past eos (for measuring decode speed).
        #[arg(long)]
        ignore_eos: bool,
        #[command(flatten)]
        spec: SpecArgs,
        /// Print one JSON object (last stdout line) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Chat in the terminal: streams the thinking (dimmed) and then the answer.
    Chat(ChatArgs),
    /// Serve the OpenAI-compatible API (/v1/chat/completions, /v1/completions, /v1/models,
    /// /health, /metrics).
    Serve(ServeArgs),
    /// Offline serving benchmark: synthetic requests through the continuous-batching
    /// scheduler; request and token throughput, latency percentiles.
    Bench(BenchArgs),
}

#[derive(Args)]
struct BenchArgs {
    #[command(flatten)]
    run: RunArgs,
    #[command(flatten)]
    spec: SpecArgs,
    #[arg(long, default_value_t = 64)]
    requests: usize,
    /// Prompt tokens per request (random ids).
    #[arg(long, default_value_t = 256)]
    input_len: usize,
    /// Generated tokens per request (eos ignored).
    #[arg(long, default_value_t = 128)]
    output_len: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[command(flatten)]
    sched: SchedulerArgs,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ChatArgs {
    #[command(flatten)]
    run: RunArgs,
    #[command(flatten)]
    spec: SpecArgs,
    /// Answer this one prompt and exit (otherwise read turns from stdin).
    #[arg(long)]
    prompt: Option<String>,
    #[arg(long)]
    system: Option<String>,
    /// Tokens per answer, thinking included.
    #[arg(long, default_value_t = 8192)]
    max_tokens: usize,
    /// 0 is greedy (DeepSeek recommends 0.6 for R1).
    #[arg(long, default_value_t = 0.6)]
    temperature: f32,
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Start every answer inside <think> (as the original R1 template did).
    #[arg(long)]
    think: bool,
    /// Print only the answers.
    #[arg(long)]
    hide_thinking: bool,
    /// No ANSI styling (the default when stdout is not a terminal).
    #[arg(long)]
    no_color: bool,
    /// Print token counts and tokens/s after each answer (stderr).
    #[arg(long)]
    stats: bool,
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    run: RunArgs,
    #[command(flatten)]
    spec: SpecArgs,
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// 0 picks a free port (printed on stderr).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Model id clients send (default: the model directory's name).
    #[arg(long)]
    served_model_name: Option<String>,
    #[command(flatten)]
    sched: SchedulerArgs,
}

/// The continuous-batching scheduler's limits (serve, bench).
#[derive(Args)]
struct SchedulerArgs {
    /// Sequences decoding at once, at most.
    #[arg(long, default_value_t = 64)]
    max_running: usize,
    /// Tokens per engine step (decode tokens plus chunked prefill).
    #[arg(long, default_value_t = 512)]
    step_tokens: usize,
    /// KV cache capacity in tokens, over all sequences.
    #[arg(long, default_value_t = 1 << 20)]
    cache_tokens: usize,
}

#[derive(Args)]
struct SpecArgs {
    /// Speculative decoding: `mtp` drafts with the checkpoint's MTP layer.
    #[arg(long, value_parser = ["mtp"])]
    speculative: Option<String>,
    /// Drafts per step with --speculative.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=8))]
    draft_tokens: u32,
}

impl SpecArgs {
    /// Drafts per step; 0 without --speculative.
    fn drafts(&self) -> usize {
        if self.speculative.is_some() {
            self.draft_tokens as usize
        } else {
            0
        }
    }
}

#[derive(Args)]
struct RunArgs {
    /// Checkpoint directory (config.json + safetensors shards).
    #[arg(long)]
    model: PathBuf,
    /// cpu (rayon reference) or cuda (one Hopper GPU; needs --precision w8a8).
    #[arg(long, default_value = "cpu")]
    backend: BackendKind,
    /// exact (f32 reference) or w8a8 (the GPU recipe).
    #[arg(long, default_value = "exact")]
    precision: Precision,
    /// Run every step eagerly on the CUDA backend instead of replaying decode steps as
    /// captured CUDA graphs.
    #[arg(long)]
    no_cuda_graphs: bool,
}

#[derive(Clone)]
struct Tokens(Vec<u32>);

fn parse_tokens(s: &str) -> std::result::Result<Tokens, String> {
    let ids = s
        .split(',')
        .map(|t| {
            let t = t.trim();
            t.parse::<u32>()
                .map_err(|_| format!("`{t}` is not a token id (expected comma-separated integers)"))
        })
        .collect::<std::result::Result<Vec<_>, _>>()?;
    if ids.is_empty() {
        return Err("no token ids given".into());
    }
    Ok(Tokens(ids))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn load(args: &RunArgs, with_mtp: bool, draft_tokens: usize) -> Result<Engine> {
    let options = EngineOptions {
        backend: args.backend,
        precision: args.precision,
        with_mtp,
        draft_tokens,
        cuda_graphs: !args.no_cuda_graphs,
        ..EngineOptions::default()
    };
    Engine::load(&args.model, &options)
}

fn run(command: Command) -> Result<()> {
    match command {
        Command::Info { model } => info(&model),
        Command::Chat(a) => r1_runtime::chat::terminal::run(&chat_options(a)),
        Command::Serve(a) => r1_runtime::server::run(serve_options(a)),
        Command::Bench(a) => bench(a),
        Command::Logits { run, tokens, out } => {
            let mut engine = load(&run, true, 0)?;
            let vocab = engine.config().vocab_size;
            let (logits, mtp) = engine.score(&tokens.0)?;
            let t = tokens.0.len();
            let mut tensors = vec![("logits", vec![t, vocab], logits.as_slice())];
            if let Some(mtp) = &mtp {
                tensors.push(("mtp_logits", vec![t - 1, vocab], mtp.as_slice()));
            }
            write_f32_tensors(&out, &tensors)?;
            eprintln!(
                "wrote {} ({}logits [{t}, {vocab}])",
                out.display(),
                if mtp.is_some() { "mtp_logits and " } else { "" }
            );
            Ok(())
        }
        Command::Generate {
            run,
            tokens,
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            seed,
            ignore_eos,
            spec,
            json,
        } => {
            let mut engine = load(&run, false, spec.drafts())?;
            let sampling = SamplingParams {
                temperature,
                top_k,
                top_p,
                seed,
                ignore_eos,
            };
            let (g, spec_stats) = match spec.drafts() {
                0 => (engine.generate(&tokens.0, max_new_tokens, &sampling)?, None),
                draft_tokens => {
                    let (g, s) = engine.generate_speculative(
                        &tokens.0,
                        max_new_tokens,
                        &sampling,
                        &mut MtpDrafter,
                        draft_tokens,
                    )?;
                    (g, Some(s))
                }
            };
            let prefill_s = g.prefill.as_secs_f64();
            let decode_s = g.decode.as_secs_f64();
            let prefill_tps = tokens.0.len() as f64 / prefill_s.max(1e-9);
            // Tokens after the first (which the prefill produced) per second of decoding.
            let decode_tps = g.tokens.len().saturating_sub(1) as f64 / decode_s.max(1e-9);
            let finish = match g.finish_reason {
                FinishReason::Eos => "eos",
                FinishReason::Length => "length",
            };
            if json {
                let mut value = serde_json::json!({
                    "tokens": g.tokens,
                    "finish_reason": finish,
                    "prompt_tokens": tokens.0.len(),
                    "prefill_ms": prefill_s * 1e3,
                    "prefill_tokens_per_s": prefill_tps,
                    "decode_steps": g.decode_steps,
                    "decode_ms": decode_s * 1e3,
                    "decode_tokens_per_s": decode_tps,
                    "backend": engine.backend().name(),
                    "precision": format!("{:?}", engine.backend().precision()).to_lowercase(),
                });
                if let Some(s) = spec_stats {
                    value["spec"] = serde_json::json!({
                        "steps": s.steps,
                        "drafted": s.drafted,
                        "accepted": s.accepted,
                    });
                }
                println!("{value}");
            } else {
                let ids: Vec<String> = g.tokens.iter().map(u32::to_string).collect();
                println!("{}", ids.join(","));
                eprintln!(
                    "finish: {finish}; prefill {} tokens at {prefill_tps:.1} tok/s; decode {} steps at {decode_tps:.1} tok/s",
                    tokens.0.len(),
                    g.decode_steps
                );
            }
            Ok(())
        }
    }
}

fn bench(a: BenchArgs) -> Result<()> {
    use r1_runtime::engine::scheduler::SchedulerOptions;
    use r1_runtime::engine::throughput::{self, BenchOptions};
    let options = engine_options(&a.run, &a.spec, Some(&a.sched));
    let engine = Engine::load(&a.run.model, &options)?;
    let opts = BenchOptions {
        requests: a.requests,
        input_len: a.input_len,
        output_len: a.output_len,
        seed: a.seed,
        sampling: SamplingParams {
            temperature: a.temperature,
            seed: a.seed,
            ..SamplingParams::default()
        },
        scheduler: SchedulerOptions {
            max_running: a.sched.max_running,
            step_tokens: a.sched.step_tokens,
            kv_pages: a.sched.cache_tokens / r1_runtime::kv_cache::PAGE_TOKENS,
            draft_tokens: a.spec.drafts(),
            ..SchedulerOptions::default()
        },
    };
    let r = throughput::run(engine, &opts)?;
    let ms = |p: throughput::Percentiles| [p.p50 * 1e3, p.p90 * 1e3, p.p99 * 1e3];
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "requests": r.requests,
                "input_len": a.input_len,
                "output_len": a.output_len,
                "input_tokens": r.input_tokens,
                "output_tokens": r.output_tokens,
                "wall_s": r.wall.as_secs_f64(),
                "requests_per_s": r.requests_per_s(),
                "output_tokens_per_s": r.output_tokens_per_s(),
                "total_tokens_per_s": r.total_tokens_per_s(),
                "ttft_ms_p50_p90_p99": ms(r.time_to_first_token),
                "tpot_ms_p50_p90_p99": ms(r.time_per_output_token),
                "latency_ms_p50_p90_p99": ms(r.request_latency),
                "preemptions": r.preemptions,
                "draft_tokens": r.draft_tokens,
                "accepted_draft_tokens": r.accepted_draft_tokens,
                "backend": format!("{:?}", a.run.backend).to_lowercase(),
                "precision": format!("{:?}", a.run.precision).to_lowercase(),
            })
        );
    } else {
        println!(
            "{} requests x ({} in, {} out) in {:.2} s: {:.2} req/s, {:.1} output tok/s, {:.1} total tok/s",
            r.requests,
            a.input_len,
            a.output_len,
            r.wall.as_secs_f64(),
            r.requests_per_s(),
            r.output_tokens_per_s(),
            r.total_tokens_per_s()
        );
        for (name, p) in [
            ("time to first token", r.time_to_first_token),
            ("time per output token", r.time_per_output_token),
            ("request latency", r.request_latency),
        ] {
            let [p50, p90, p99] = ms(p);
            println!("{name:>22}: p50 {p50:.1} ms, p90 {p90:.1} ms, p99 {p99:.1} ms");
        }
        if r.preemptions > 0 {
            println!("{:>22}: {}", "pre-emptions", r.preemptions);
        }
        if r.draft_tokens > 0 {
            println!(
                "{:>22}: {} of {} drafts accepted",
                "speculation", r.accepted_draft_tokens, r.draft_tokens
            );
        }
    }
    Ok(())
}

fn info(model: &Path) -> Result<()> {
    let cfg = ModelConfig::from_dir(model)?;
    let ckpt = Checkpoint::open(model)?;
    println!("model: {}", model.display());
    println!(
        "layers: {} ({} dense, {} MoE) | hidden {} | vocab {} | context {}",
        cfg.num_hidden_layers,
        (0..cfg.num_hidden_layers)
            .filter(|&l| !cfg.is_moe_layer(l))
            .count(),
        (0..cfg.num_hidden_layers)
            .filter(|&l| cfg.is_moe_layer(l))
            .count(),
        cfg.hidden_size,
        cfg.vocab_size,
        cfg.max_position_embeddings
    );
    println!(
        "attention: MLA, {} heads, q_lora {:?}, kv_lora {}, qk nope {} + rope {}, v {}, softmax scale {:.6}",
        cfg.num_attention_heads,
        cfg.q_lora_rank,
        cfg.kv_lora_rank,
        cfg.qk_nope_head_dim,
        cfg.qk_rope_head_dim,
        cfg.v_head_dim,
        cfg.softmax_scale()
    );
    println!(
        "moe: {} routed + {} shared experts (width {}), top-{} of {} groups keeping {}, scaling {}",
        cfg.n_routed_experts,
        cfg.n_shared_experts,
        cfg.moe_intermediate_size,
        cfg.num_experts_per_tok,
        cfg.n_group,
        cfg.topk_group,
        cfg.routed_scaling_factor
    );
    if let Some(y) = &cfg.rope_scaling {
        println!(
            "rope: theta {}, YaRN factor {} over {} (beta {}/{}, mscale {}/{})",
            cfg.rope_theta,
            y.factor,
            y.original_max_position_embeddings,
            y.beta_fast,
            y.beta_slow,
            y.mscale,
            y.mscale_all_dim
        );
    }
    let mtp_present = cfg.has_mtp()
        && ckpt
            .tensors()
            .any(|(n, _)| n.starts_with(&format!("model.layers.{}.", cfg.num_hidden_layers)));
    println!(
        "mtp: {}",
        match (cfg.has_mtp(), mtp_present) {
            (true, true) => format!("present (layer {})", cfg.num_hidden_layers),
            (true, false) => "declared in config.json but its tensors are missing".into(),
            _ => "absent".into(),
        }
    );
    let mut total = (0usize, 0usize);
    for (dtype, (params, bytes)) in dtype_summary(&ckpt) {
        println!(
            "  {dtype:>8}: {params:>16} values {:>12}",
            human_bytes(bytes)
        );
        total = (total.0 + params, total.1 + bytes);
    }
    println!(
        "  {:>8}: {:>16} values {:>12}",
        "total",
        total.0,
        human_bytes(total.1)
    );
    Ok(())
}

fn human_bytes(b: usize) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", UNITS[u])
}

/// Engine options for a front end; `sched` sets the step limits (interactive chat runs one
/// sequence with the defaults).
fn engine_options(run: &RunArgs, spec: &SpecArgs, sched: Option<&SchedulerArgs>) -> EngineOptions {
    let defaults = EngineOptions::default();
    EngineOptions {
        backend: run.backend,
        precision: run.precision,
        with_mtp: false,
        cache_tokens: sched.map_or(defaults.cache_tokens, |s| s.cache_tokens),
        draft_tokens: spec.drafts(),
        max_seqs: sched.map_or(defaults.max_seqs, |s| s.max_running),
        max_step_tokens: sched.map_or(defaults.max_step_tokens, |s| s.step_tokens),
        cuda_graphs: !run.no_cuda_graphs,
    }
}

fn chat_options(a: ChatArgs) -> r1_runtime::chat::terminal::ChatOptions {
    r1_runtime::chat::terminal::ChatOptions {
        engine: engine_options(&a.run, &a.spec, None),
        model_dir: a.run.model,
        prompt: a.prompt,
        system: a.system,
        max_tokens: a.max_tokens,
        sampling: SamplingParams {
            temperature: a.temperature,
            top_k: a.top_k,
            top_p: a.top_p,
            seed: a.seed,
            ..SamplingParams::default()
        },
        force_thinking: a.think,
        hide_thinking: a.hide_thinking,
        color: a.no_color.then_some(false),
        stats: a.stats,
    }
}

fn serve_options(a: ServeArgs) -> r1_runtime::server::ServeOptions {
    r1_runtime::server::ServeOptions {
        engine: engine_options(&a.run, &a.spec, Some(&a.sched)),
        model_dir: a.run.model,
        host: a.host,
        port: a.port,
        model_name: a.served_model_name,
        max_running: a.sched.max_running,
        step_tokens: a.sched.step_tokens,
    }
}
