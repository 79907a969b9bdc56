//! The CUDA backend end to end against the CPU backend in the same w8a8 recipe, on the
//! committed fixtures: `score` (logits + MTP logits of every prompt position) and greedy
//! generation through the GPU's paged latent cache; then the device-resident step itself:
//! decode steps allocate no device memory, CUDA-graph replays equal eager steps bit for bit,
//! and steps beyond the workspace limits grow them once. Without a device the GPU tests print
//! `skipped: no CUDA device (...)` (a failure under R1_REQUIRE_GPU); the typed-error test runs
//! everywhere.

mod common;
mod gpu_support;

use common::*;
use r1_runtime::engine::sampling::SamplingParams;
use r1_runtime::engine::{BackendKind, Engine, EngineOptions};
use r1_runtime::{Error, Precision};

fn options(backend: BackendKind, precision: Precision) -> EngineOptions {
    EngineOptions {
        backend,
        precision,
        ..EngineOptions::default()
    }
}

fn cpu_w8a8(name: &str) -> Engine {
    Engine::load(&fixture(name), &options(BackendKind::Cpu, Precision::W8a8))
        .expect("fixture loads")
}

/// The fixture on the GPU, or None after the visible skip line.
fn cuda(name: &str, test: &str) -> Option<Engine> {
    gpu_support::or_skip(gpu_support::device(), test)?;
    Some(
        Engine::load(&fixture(name), &options(BackendKind::Cuda, Precision::W8a8))
            .unwrap_or_else(|e| panic!("{name}: the CUDA backend does not load: {e}")),
    )
}

/// Per-row statistics of GPU vs CPU logits: cosine mean / min, argmax agreement, and the rows
/// whose CPU top-1/top-2 margin exceeds twice the row's max |gpu - cpu| (decidable rows),
/// where the argmax must agree.
fn compare(what: &str, gpu: &[f32], cpu: &[f32], vocab: usize) -> (f64, f64) {
    assert_eq!(gpu.len(), cpu.len(), "{what}: shapes differ");
    let rows = cpu.len() / vocab;
    let (mut min_cos, mut sum_cos, mut agree, mut decidable) = (1f64, 0f64, 0, 0);
    for (row, (g, c)) in gpu.chunks(vocab).zip(cpu.chunks(vocab)).enumerate() {
        assert!(
            g.iter().all(|v| v.is_finite()),
            "{what} row {row}: non-finite GPU logits"
        );
        let cos = cosine(g, c);
        min_cos = min_cos.min(cos);
        sum_cos += cos;
        let (noise, _) = max_err(g, c);
        let same = argmax(g) == argmax(c);
        agree += same as usize;
        if margin(c) > 2.0 * noise {
            decidable += 1;
            assert!(same, "{what} row {row}: argmax differs beyond the noise");
        }
    }
    let mean = sum_cos / rows as f64;
    println!(
        "{what}: cuda vs cpu w8a8 cosine mean {mean:.5} min {min_cos:.5}, argmax agreement {agree}/{rows} ({decidable} rows decidable, all agree)"
    );
    (mean, min_cos)
}

fn margin(row: &[f32]) -> f32 {
    let mut sorted = row.to_vec();
    sorted.sort_by(|a, b| b.total_cmp(a));
    sorted[0] - sorted[1]
}

/// Same recipe, different summation orders: per-row cosine mean >= 0.99 and min >= 0.95 (a
/// flipped MoE routing decision on these random-weight models moves a row by a few percent),
/// and argmax agreement on every decidable row.
#[test]
fn cuda_score_matches_cpu_w8a8() {
    const TEST: &str = "gpu_engine::cuda_score_matches_cpu_w8a8";
    for (name, _) in FIXTURES {
        let Some(mut gpu) = cuda(name, TEST) else {
            return;
        };
        let r = reference(name);
        let mut cpu = cpu_w8a8(name);
        let (lg, mg) = gpu.score(&r.tokens).expect("cuda score");
        let (lc, mc) = cpu.score(&r.tokens).expect("cpu score");
        let (mg, mc) = (mg.expect("MTP logits"), mc.expect("MTP logits"));
        for (what, g, c) in [("logits", &lg, &lc), ("mtp", &mg, &mc)] {
            let what = format!("{name} {what}");
            let (mean, min) = compare(&what, g, c, r.vocab);
            assert!(
                mean >= 0.99 && min >= 0.95,
                "{what}: cosine mean {mean} min {min}"
            );
        }
    }
}

/// Greedy generation through the GPU cache equals the CPU's wherever the choice is decidable:
/// the first differing token must come at a step whose CPU top-1/top-2 margin is within twice
/// the max |gpu - cpu| of that step's logits.
#[test]
fn cuda_greedy_matches_cpu_w8a8_where_decidable() {
    const TEST: &str = "gpu_engine::cuda_greedy_matches_cpu_w8a8_where_decidable";
    for (name, max_new) in FIXTURES {
        let Some(mut gpu) = cuda(name, TEST) else {
            return;
        };
        let r = reference(name);
        let mut cpu = cpu_w8a8(name);
        let params = SamplingParams::default();
        let g = gpu
            .generate(&r.tokens, max_new, &params)
            .expect("cuda generate");
        let c = cpu
            .generate(&r.tokens, max_new, &params)
            .expect("cpu generate");
        let same = g
            .tokens
            .iter()
            .zip(&c.tokens)
            .take_while(|(a, b)| a == b)
            .count();
        println!(
            "{name}: greedy cuda {:?} cpu {:?} ({same} equal)",
            g.tokens, c.tokens
        );
        if same == g.tokens.len().min(c.tokens.len()) {
            assert_eq!(g.tokens, c.tokens, "{name}: one greedy run stopped early");
            continue;
        }
        // Both score the common prefix; the next choice must be undecidable.
        let prefix: Vec<u32> = r.tokens.iter().chain(&c.tokens[..same]).copied().collect();
        let (lg, _) = gpu.score(&prefix).expect("cuda score");
        let (lc, _) = cpu.score(&prefix).expect("cpu score");
        let last = |l: &[f32]| l[l.len() - r.vocab..].to_vec();
        let (gr, cr) = (last(&lg), last(&lc));
        let (noise, _) = max_err(&gr, &cr);
        assert!(
            margin(&cr) <= 2.0 * noise,
            "{name}: greedy token {same} differs (cuda {} cpu {}) although the CPU margin {} exceeds twice the noise {noise}",
            g.tokens[same],
            c.tokens[same],
            margin(&cr)
        );
    }
}

/// Runs everywhere: the CUDA backend's errors are typed and say what to do, never a panic.
#[test]
fn cuda_backend_errors_are_typed() {
    assert_eq!("cuda".parse::<BackendKind>(), Ok(BackendKind::Cuda));
    let dir = fixture("small-odd");
    let err = Engine::load(&dir, &options(BackendKind::Cuda, Precision::Exact))
        .err()
        .expect("exact precision on cuda is refused");
    assert!(
        matches!(&err, Error::Unsupported(m) if m.contains("--precision w8a8")),
        "{err}"
    );
    match gpu_support::device() {
        Ok(_) => gpu_support::say(
            "gpu_engine: a CUDA device exists, so the no-device error is not exercised here",
        ),
        Err(reason) => {
            let err = Engine::load(&dir, &options(BackendKind::Cuda, Precision::W8a8))
                .err()
                .expect("no device: loading the CUDA backend fails");
            match &err {
                Error::Cuda(cause) => {
                    assert_eq!(cause, reason, "the device's own reason");
                    assert_eq!(err.to_string(), format!("backend `cuda`: {reason}"));
                }
                other => panic!("expected the typed CUDA error, got {other:?}"),
            }
            println!("no device, as expected: {err}");
        }
    }
}

/// A decode step reads back the rows it produced, whatever earlier steps grew the buffers to:
/// one token after a 256-token prefill costs the host link exactly what one token after a
/// 2-token prefill does (a whole grown buffer would be about 128 times more).
#[test]
fn cuda_decode_step_downloads_only_its_rows() {
    use r1_runtime::checkpoint::Checkpoint;
    use r1_runtime::config::ModelConfig;
    use r1_runtime::cuda::{CudaBackend, CudaOptions};
    use r1_runtime::engine::Sequence;
    use r1_runtime::model::weights::ModelWeights;
    use r1_runtime::model::LogitRows;
    use std::sync::Arc;
    const TEST: &str = "gpu_engine::cuda_decode_step_downloads_only_its_rows";
    if gpu_support::or_skip(gpu_support::device(), TEST).is_none() {
        return;
    }
    let dir = fixture("r1-heads");
    let cfg = ModelConfig::from_dir(&dir).expect("fixture config");
    let ckpt = Checkpoint::open(&dir).expect("fixture checkpoint");
    let weights = Arc::new(ModelWeights::load(&ckpt, &cfg, false).expect("fixture weights"));
    let backend = CudaBackend::new(
        &cfg,
        weights.clone(),
        Precision::W8a8,
        &CudaOptions::default(),
    )
    .expect("backend");
    let dev = backend.device().clone();
    let vocab = cfg.vocab_size as u32;
    let mut e = Engine::with_backend(cfg, weights, Box::new(backend), 1 << 14);
    let mut decode_bytes_after = |prefill: usize| {
        let tokens: Vec<u32> = (0..=prefill as u32)
            .map(|i| (i * 37 + 11) % vocab)
            .collect();
        let mut s = Sequence::default();
        e.forward(&mut s, &tokens[..prefill], LogitRows::All)
            .expect("cuda prefill");
        let before = dev.bytes_downloaded();
        e.forward(&mut s, &tokens[prefill..], LogitRows::Last)
            .expect("cuda decode");
        e.release(&mut s);
        dev.bytes_downloaded() - before
    };
    // Short first: the long prefill then grows the step buffers past what the short had.
    let short = decode_bytes_after(2);
    let long = decode_bytes_after(256);
    println!("one decode step downloads {long} bytes after 256 tokens, {short} after 2");
    assert!(short > 0, "a decode step downloaded nothing");
    assert_eq!(
        long, short,
        "a decode step's download depends on earlier steps"
    );
}

/// Copy-on-write of shared cache pages on the device: a fork of a GPU sequence continues into
/// the partly filled page it shares, the parent continues after it, and each gets the logits
/// of a GPU sequence that never shared anything (same kernels, same batch layouts).
#[test]
fn cuda_forked_sequences_continue_independently() {
    use r1_runtime::engine::Sequence;
    use r1_runtime::model::LogitRows;
    const TEST: &str = "gpu_engine::cuda_forked_sequences_continue_independently";
    let Some(mut e) = cuda("r1-heads", TEST) else {
        return;
    };
    let vocab = e.config().vocab_size;
    let tokens: Vec<u32> = (0..190u32).map(|i| (i * 37 + 11) % vocab as u32).collect();
    let (prompt, fork_at) = (&tokens[..150], 100);
    let (fork_more, parent_more) = (&tokens[150..180], &tokens[180..190]);
    let solo = |e: &mut Engine, head: &[u32], tail: &[u32]| {
        let mut s = Sequence::default();
        e.forward(&mut s, head, LogitRows::Last)
            .expect("cuda forward");
        let out = e
            .forward(&mut s, tail, LogitRows::All)
            .expect("cuda forward");
        e.release(&mut s);
        out.logits
    };
    let want_fork = solo(&mut e, &prompt[..fork_at], fork_more);
    let want_parent = solo(&mut e, prompt, parent_more);
    let mut parent = Sequence::default();
    e.forward(&mut parent, prompt, LogitRows::Last)
        .expect("cuda forward");
    let mut fork = e.fork(&parent, fork_at);
    let got_fork = e.forward(&mut fork, fork_more, LogitRows::All).unwrap();
    let got_parent = e.forward(&mut parent, parent_more, LogitRows::All).unwrap();
    for (what, got, want) in [
        ("fork", &got_fork.logits, &want_fork),
        ("parent", &got_parent.logits, &want_parent),
    ] {
        let (err, mag) = max_err(got, want);
        println!("{what}: max|d| {err:.3e} of max|ref| {mag:.3}");
        assert!(err <= 1e-3 * mag, "{what}: max|d| {err} > 1e-3 * {mag}");
    }
    e.release(&mut parent);
    e.release(&mut fork);
    assert_eq!(e.cache_pages_in_use(), 0);
}

/// A fixture's config and weights (the MTP layer too when `with_mtp`) and a CUDA engine over
/// them built with `options`, with the backend's step counters.
fn cuda_engine(
    name: &str,
    options: &r1_runtime::cuda::CudaOptions,
    with_mtp: bool,
) -> (
    Engine,
    r1_runtime::cuda::Device,
    std::sync::Arc<r1_runtime::cuda::backend::GraphCounters>,
    bool,
) {
    use r1_runtime::checkpoint::Checkpoint;
    use r1_runtime::config::ModelConfig;
    use r1_runtime::cuda::CudaBackend;
    use r1_runtime::model::weights::ModelWeights;
    use std::sync::Arc;
    let dir = fixture(name);
    let cfg = ModelConfig::from_dir(&dir).expect("fixture config");
    let ckpt = Checkpoint::open(&dir).expect("fixture checkpoint");
    let weights = Arc::new(ModelWeights::load(&ckpt, &cfg, with_mtp).expect("fixture weights"));
    let backend = CudaBackend::new(&cfg, weights.clone(), Precision::W8a8, options)
        .unwrap_or_else(|e| panic!("{name}: the CUDA backend does not load: {e}"));
    let (dev, counters, graphs) = (
        backend.device().clone(),
        backend.graph_counters(),
        backend.cuda_graphs(),
    );
    let engine = Engine::with_backend(cfg, weights, Box::new(backend), 1 << 14);
    (engine, dev, counters, graphs)
}

/// A deterministic token stream (`seed` picks it) within the vocabulary.
fn stream(seed: u32, len: usize, vocab: usize) -> Vec<u32> {
    (0..len as u32)
        .map(|i| (i * 37 + seed * 101 + 11) % vocab as u32)
        .collect()
}

/// One batched forward of `tokens[i]` appended to `seqs[i]`.
fn step(
    e: &mut Engine,
    seqs: &mut [r1_runtime::engine::Sequence],
    tokens: &[Vec<u32>],
    rows: r1_runtime::model::LogitRows,
) -> Vec<r1_runtime::engine::Forward> {
    use r1_runtime::engine::Step;
    let mut steps: Vec<Step> = seqs
        .iter_mut()
        .zip(tokens)
        .map(|(seq, t)| Step { seq, tokens: t })
        .collect();
    e.forward_batch(&mut steps, rows).expect("cuda step")
}

/// One batched MTP forward: sequence i continues its MTP positions at `from[i]` with
/// `next[i]` and the hidden states `hidden[i]`.
fn mtp_step(
    e: &mut Engine,
    seqs: &mut [r1_runtime::engine::Sequence],
    from: &[usize],
    next: &[Vec<u32>],
    hidden: &[Vec<f32>],
) -> Vec<r1_runtime::engine::Forward> {
    use r1_runtime::engine::MtpStep;
    let mut steps: Vec<MtpStep> = seqs
        .iter_mut()
        .zip(from)
        .zip(next)
        .zip(hidden)
        .map(|(((seq, &from), next_tokens), hidden)| MtpStep {
            seq,
            from,
            next_tokens,
            hidden,
        })
        .collect();
    e.mtp_forward_batch(&mut steps, r1_runtime::model::LogitRows::Last)
        .expect("cuda MTP step")
}

/// Bit-for-bit equality of two f32 vectors, naming the first difference.
fn assert_bits_equal(what: &str, a: &[f32], b: &[f32]) {
    assert_eq!(a.len(), b.len(), "{what}: lengths differ");
    if let Some(i) = (0..a.len()).find(|&i| a[i].to_bits() != b[i].to_bits()) {
        panic!("{what}: element {i} differs: {} vs {}", a[i], b[i]);
    }
}

/// The steady state of decoding allocates nothing on the device: after a prefill and one
/// warm-up decode step (which captures the bucket's graph when graphs are on), 16 more decode
/// steps of three sequences (padded to the bucket of 4) make no device allocation and free
/// nothing, with graphs on and off, on both fixtures (small-odd's MoE takes the fallback,
/// which runs without graphs). With graphs on, r1-heads replays a graph for every one of the
/// 16 steps.
#[test]
fn cuda_decode_steps_allocate_nothing() {
    use r1_runtime::cuda::CudaOptions;
    use r1_runtime::engine::Sequence;
    use r1_runtime::model::LogitRows;
    const TEST: &str = "gpu_engine::cuda_decode_steps_allocate_nothing";
    if gpu_support::or_skip(gpu_support::device(), TEST).is_none() {
        return;
    }
    for (name, _) in FIXTURES {
        for cuda_graphs in [true, false] {
            let options = CudaOptions {
                cuda_graphs,
                ..CudaOptions::default()
            };
            let (mut e, dev, counters, graphs) = cuda_engine(name, &options, false);
            let vocab = e.config().vocab_size;
            let mut seqs: Vec<Sequence> = (0..3).map(|_| Sequence::default()).collect();
            let mut next: Vec<Vec<u32>> = Vec::new();
            for (i, s) in seqs.iter_mut().enumerate() {
                let prompt = stream(i as u32, 8 + i, vocab);
                let out = e
                    .forward(s, &prompt, LogitRows::Last)
                    .expect("cuda prefill");
                next.push(vec![argmax(&out.logits) as u32]);
            }
            let mut decode = |e: &mut Engine, next: &mut Vec<Vec<u32>>| {
                let out = step(e, &mut seqs, next, LogitRows::Last);
                *next = out.iter().map(|f| vec![argmax(&f.logits) as u32]).collect();
            };
            decode(&mut e, &mut next); // warm-up (captures with graphs on)
            let (before, stats_before) = (dev.allocations(), counters.stats());
            for _ in 0..16 {
                decode(&mut e, &mut next);
            }
            let (after, stats) = (dev.allocations(), counters.stats());
            println!(
                "{name}, graphs {graphs}: 16 decode steps, allocations {before:?} -> {after:?}, steps {stats_before:?} -> {stats:?}"
            );
            assert_eq!(
                after, before,
                "{name} (graphs {graphs}): decode steps allocated or freed device memory"
            );
            if graphs {
                assert_eq!(
                    stats.replayed - stats_before.replayed,
                    16,
                    "{name}: {stats:?}"
                );
                assert_eq!(stats.failed, 0, "{name}: a capture failed: {stats:?}");
            }
            assert_eq!(graphs, cuda_graphs && name == "r1-heads", "{name}");
        }
    }
}

/// A replayed graph computes exactly what the eager step computes: two r1-heads backends,
/// graphs on and off, run the same prefills, an MTP catch-up and one MTP decode step (the
/// MTP graph, whose hidden-state input is uploaded into its slot before the replay), three
/// decode steps and one verification step (1 + 2 drafts, every row) over 1, 2, 3 and 4
/// sequences; every logit and hidden value of every step is bit-identical. Three sequences run in the bucket of 4 (one padding
/// sequence in the scratch page), so the steps after it also show that padding leaves the
/// real sequences' caches alone. (The sequences stay under 64 positions: one key block each,
/// which the split-KV schedule never splits, so the padding sequence cannot move a split
/// boundary.) The counters say each bucket was captured once and replayed afterwards.
#[test]
fn cuda_graph_replay_equals_eager() {
    use r1_runtime::cuda::CudaOptions;
    use r1_runtime::engine::Sequence;
    use r1_runtime::model::LogitRows;
    const TEST: &str = "gpu_engine::cuda_graph_replay_equals_eager";
    if gpu_support::or_skip(gpu_support::device(), TEST).is_none() {
        return;
    }
    let opts = |cuda_graphs| CudaOptions {
        cuda_graphs,
        ..CudaOptions::default()
    };
    let (mut on, _, counters, graphs) = cuda_engine("r1-heads", &opts(true), true);
    assert!(graphs, "r1-heads runs with CUDA graphs");
    let (mut off, _, off_counters, _) = cuda_engine("r1-heads", &opts(false), true);
    let vocab = on.config().vocab_size;
    // Grow the caches to the pages four sequences take first: a cache that grows drops the
    // captured graphs, which would make the capture counts below depend on when it grew.
    for e in [&mut on, &mut off] {
        let mut warm: Vec<Sequence> = (0..4).map(|_| Sequence::default()).collect();
        let prompts: Vec<Vec<u32>> = (0..4).map(|i| stream(i, 20, vocab)).collect();
        step(e, &mut warm, &prompts, LogitRows::Last);
        for s in &mut warm {
            e.release(s);
        }
    }
    for n in [1usize, 2, 3, 4] {
        let mut s_on: Vec<Sequence> = (0..n).map(|_| Sequence::default()).collect();
        let mut s_off: Vec<Sequence> = (0..n).map(|_| Sequence::default()).collect();
        let prompts: Vec<Vec<u32>> = (0..n)
            .map(|i| stream(i as u32 + 7, 5 + 3 * i, vocab))
            .collect();
        let a = step(&mut on, &mut s_on, &prompts, LogitRows::Last);
        let b = step(&mut off, &mut s_off, &prompts, LogitRows::Last);
        for (i, (a, b)) in a.iter().zip(&b).enumerate() {
            assert_bits_equal(
                &format!("n {n} prefill seq {i} logits"),
                &a.logits,
                &b.logits,
            );
        }
        // MTP: catch up positions 0..P-1 (eager: lengths differ or many tokens), then one
        // position per sequence (a graph step).
        let h = on.config().hidden_size;
        let lens: Vec<usize> = prompts.iter().map(Vec::len).collect();
        let next: Vec<Vec<u32>> = prompts.iter().map(|p| p[1..].to_vec()).collect();
        let hidden: Vec<Vec<f32>> = a
            .iter()
            .zip(&lens)
            .map(|(f, &p)| f.hidden[..(p - 1) * h].to_vec())
            .collect();
        let zeros = vec![0; n];
        mtp_step(&mut on, &mut s_on, &zeros, &next, &hidden);
        mtp_step(&mut off, &mut s_off, &zeros, &next, &hidden);
        let from: Vec<usize> = lens.iter().map(|p| p - 1).collect();
        let next: Vec<Vec<u32>> = (0..n as u32).map(|i| stream(i + 60, 1, vocab)).collect();
        let hidden: Vec<Vec<f32>> = a
            .iter()
            .zip(&lens)
            .map(|(f, &p)| f.hidden[(p - 1) * h..p * h].to_vec())
            .collect();
        let ma = mtp_step(&mut on, &mut s_on, &from, &next, &hidden);
        let mb = mtp_step(&mut off, &mut s_off, &from, &next, &hidden);
        for (i, (a, b)) in ma.iter().zip(&mb).enumerate() {
            assert_bits_equal(&format!("n {n} mtp seq {i} logits"), &a.logits, &b.logits);
            assert_bits_equal(&format!("n {n} mtp seq {i} hidden"), &a.hidden, &b.hidden);
        }
        let mut check = |what: &str, tokens: Vec<Vec<u32>>, rows| {
            let a = step(&mut on, &mut s_on, &tokens, rows);
            let b = step(&mut off, &mut s_off, &tokens, rows);
            for (i, (a, b)) in a.iter().zip(&b).enumerate() {
                assert!(a.logits.iter().all(|v| v.is_finite()), "{what}: non-finite");
                assert_bits_equal(
                    &format!("n {n} {what} seq {i} logits"),
                    &a.logits,
                    &b.logits,
                );
                assert_bits_equal(
                    &format!("n {n} {what} seq {i} hidden"),
                    &a.hidden,
                    &b.hidden,
                );
            }
        };
        for d in 0..3u32 {
            let tokens = (0..n as u32).map(|i| stream(d * 5 + i, 1, vocab)).collect();
            check(&format!("decode {d}"), tokens, LogitRows::Last);
        }
        let drafts = (0..n as u32).map(|i| stream(i + 40, 3, vocab)).collect();
        check("verify", drafts, LogitRows::All);
        for s in &mut s_on {
            on.release(s);
        }
        for s in &mut s_off {
            off.release(s);
        }
        println!("n {n}: graph steps {:?}", counters.stats());
    }
    // Captures: MTP decode, decode and verify in buckets 1, 2 and 4; the rest replays (the
    // last MTP step and verify once, decode twice per n after its capture, three times at 4).
    let stats = counters.stats();
    assert_eq!(stats.failed, 0, "{stats:?}");
    assert_eq!(stats.captured, 9, "{stats:?}");
    assert_eq!(stats.replayed, 2 + 2 + 2 + (3 + 1 + 1), "{stats:?}");
    let eager = off_counters.stats();
    assert_eq!((eager.captured, eager.replayed), (0, 0), "{eager:?}");
}

/// A step larger than the workspaces were made for still runs: with room for 16 tokens and 2
/// sequences, a 40-token prefill grows what it needs (once: the same prefill again allocates
/// nothing and gives the same logits bit for bit), and its logits match those of a backend
/// made for 512 tokens to bf16 rounding.
#[test]
fn cuda_steps_beyond_the_limits_grow_once() {
    use r1_runtime::cuda::CudaOptions;
    use r1_runtime::engine::Sequence;
    use r1_runtime::model::LogitRows;
    const TEST: &str = "gpu_engine::cuda_steps_beyond_the_limits_grow_once";
    if gpu_support::or_skip(gpu_support::device(), TEST).is_none() {
        return;
    }
    let small = CudaOptions {
        cuda_graphs: true,
        max_step_tokens: 16,
        max_seqs: 2,
        max_seq_len: 128,
    };
    let (mut e, dev, _, _) = cuda_engine("r1-heads", &small, false);
    let (mut big, _, _, _) = cuda_engine("r1-heads", &CudaOptions::default(), false);
    let vocab = e.config().vocab_size;
    let prompt = stream(3, 40, vocab);
    let run = |e: &mut Engine| {
        let mut s = Sequence::default();
        let out = e
            .forward(&mut s, &prompt, LogitRows::All)
            .expect("cuda prefill");
        e.release(&mut s);
        out.logits
    };
    let first = run(&mut e);
    let grown = dev.allocations();
    let again = run(&mut e);
    assert_eq!(
        dev.allocations(),
        grown,
        "the second 40-token step allocated again"
    );
    assert_bits_equal("the same prefill twice", &first, &again);
    let want = run(&mut big);
    let (err, mag) = max_err(&first, &want);
    println!("40 tokens through 16-token workspaces: max|d| {err:.3e} of max|ref| {mag:.3}");
    assert!(err <= 1e-2 * mag, "max|d| {err} > 1e-2 * {mag}");
}

/// `CudaBackend::output_buffer` names the device buffers a step's outputs were read from: the
/// logits (f32) and final hidden states (bf16) of a two-sequence step, downloaded from there,
/// equal `Backend::run`'s outputs bit for bit.
#[test]
fn cuda_output_buffers_hold_the_step_outputs() {
    use r1_runtime::backend::{Readout, RowRead};
    use r1_runtime::checkpoint::Checkpoint;
    use r1_runtime::config::ModelConfig;
    use r1_runtime::cuda::{CudaBackend, CudaOptions};
    use r1_runtime::graph::Plan;
    use r1_runtime::kv_cache::{Batch, Segment};
    use r1_runtime::model::weights::ModelWeights;
    use r1_runtime::model::{main_graph, LogitRows, HIDDEN_OUT, LOGITS};
    use r1_runtime::Backend;
    use std::sync::Arc;
    const TEST: &str = "gpu_engine::cuda_output_buffers_hold_the_step_outputs";
    if gpu_support::or_skip(gpu_support::device(), TEST).is_none() {
        return;
    }
    let dir = fixture("r1-heads");
    let cfg = ModelConfig::from_dir(&dir).expect("fixture config");
    let ckpt = Checkpoint::open(&dir).expect("fixture checkpoint");
    let weights = Arc::new(ModelWeights::load(&ckpt, &cfg, false).expect("fixture weights"));
    let mut backend = CudaBackend::new(
        &cfg,
        weights.clone(),
        Precision::W8a8,
        &CudaOptions::default(),
    )
    .expect("backend");
    let graph = main_graph(&cfg, &weights, LogitRows::Last);
    let plan = Plan::new(&graph);
    let vocab = cfg.vocab_size;
    let segment = |block, len| Segment {
        blocks: vec![block],
        start_pos: 0,
        len,
        logit_rows: 1,
    };
    let batch = Batch {
        tokens: [stream(1, 5, vocab), stream(2, 3, vocab)].concat(),
        segments: vec![segment(0, 5), segment(1, 3)],
        page_copies: Vec::new(),
    };
    let rows = [RowRead {
        draw: None,
        logits: true,
    }; 2];
    let readout = Readout {
        rows: &rows,
        hidden: true,
    };
    let out = backend
        .run(&graph, &plan, &batch, &[], &readout)
        .expect("cuda step");
    let dev = backend.device().clone();
    for name in [LOGITS, HIDDEN_OUT] {
        let slot = backend
            .output_buffer(&graph, &plan, name)
            .expect("named output");
        let got = slot.download(&dev).expect("download");
        let want = if name == LOGITS {
            &out.logits
        } else {
            &out.hidden
        };
        println!("{name}: {} rows of {}", slot.rows, slot.width);
        assert_bits_equal(name, &got, want);
    }
    assert!(backend.output_buffer(&graph, &plan, "nope").is_err());
}

/// Draws run on the device: they equal the shared rule applied on the host to the same step's
/// logits (greedy and sampled rows, one step over two sequences), and a decode step that asks
/// only for its token downloads no logits.
#[test]
fn cuda_draws_are_the_rule_on_the_step_logits_and_only_tokens_come_back() {
    use r1_runtime::cuda::CudaOptions;
    use r1_runtime::engine::{Readback, Sequence, Step};
    use r1_runtime::numerics::sampling::draw;
    const TEST: &str =
        "gpu_engine::cuda_draws_are_the_rule_on_the_step_logits_and_only_tokens_come_back";
    if gpu_support::or_skip(gpu_support::device(), TEST).is_none() {
        return;
    }
    let (mut e, dev, _, _) = cuda_engine("r1-heads", &CudaOptions::default(), false);
    let vocab = e.config().vocab_size;
    let sampled = SamplingParams {
        temperature: 0.8,
        top_k: 50,
        top_p: 0.9,
        seed: 5,
        ignore_eos: true,
    };
    let greedy = SamplingParams::default();
    let prompts = [stream(3, 9, vocab), stream(4, 4, vocab)];
    let mut seqs = [Sequence::default(), Sequence::default()];
    let mut steps: Vec<Step> = seqs
        .iter_mut()
        .zip(&prompts)
        .map(|(seq, tokens)| Step { seq, tokens })
        .collect();
    let reads = [
        Readback {
            rows: 3,
            sample: Some(&sampled),
            logits: true,
        },
        Readback {
            rows: 1,
            sample: Some(&greedy),
            logits: true,
        },
    ];
    let out = e
        .forward_batch_with(&mut steps, &reads, false)
        .expect("cuda step");
    drop(steps);
    for (j, row) in out[0].logits.chunks(vocab).enumerate() {
        let position = prompts[0].len() - 3 + j + 1;
        assert_eq!(
            out[0].tokens[j],
            draw(row, &sampled.draw(position as u64)),
            "sampled row {j}"
        );
    }
    let position = prompts[1].len() as u64;
    assert_eq!(
        out[1].tokens[0],
        draw(&out[1].logits, &greedy.draw(position))
    );
    assert_eq!(out[1].tokens[0] as usize, argmax(&out[1].logits));
    // A decode step that asks for its token alone.
    let next = out[0].tokens[2];
    let before = dev.bytes_downloaded();
    let t = e
        .sample_next(&mut seqs[0], &[next], &sampled)
        .expect("cuda decode");
    let bytes = dev.bytes_downloaded() - before;
    println!("a decode step that draws its token downloads {bytes} bytes (vocab {vocab})");
    // Its token (4 bytes) and the MoE blocks' error words; never a logits row.
    assert!(bytes >= 4 && bytes < 4 * vocab as u64, "{bytes} bytes");
    assert!((t as usize) < vocab);
    for seq in &mut seqs {
        e.release(seq);
    }
}
