//! Offline serving benchmark (`r1-run bench`): synthetic requests of fixed prompt and output
//! length, all submitted at once to the continuous-batching scheduler and run to completion,
//! as vLLM's and SGLang's offline throughput benchmarks do. Throughput comes from the wall
//! time; latencies from each request's own timings.

use std::time::{Duration, Instant};

use super::sampling::SamplingParams;
use super::scheduler::{Event, Finish, Request, Scheduler, SchedulerOptions};
use super::Engine;
use crate::error::{Error, Result};
use crate::numerics::sampling::SplitMix64;

#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub requests: usize,
    /// Prompt tokens per request (random ids; every request different).
    pub input_len: usize,
    /// Generated tokens per request (end-of-sequence is ignored).
    pub output_len: usize,
    pub seed: u64,
    /// Greedy by default; `ignore_eos` is always set.
    pub sampling: SamplingParams,
    pub scheduler: SchedulerOptions,
}

/// p50 / p90 / p99 of a latency, seconds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
}

impl Percentiles {
    fn of(mut v: Vec<f64>) -> Self {
        if v.is_empty() {
            return Percentiles::default();
        }
        v.sort_by(f64::total_cmp);
        let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
        Percentiles {
            p50: at(0.5),
            p90: at(0.9),
            p99: at(0.99),
        }
    }
}

#[derive(Debug, Clone)]
pub struct BenchReport {
    pub requests: usize,
    pub input_tokens: usize,
    pub output_tokens: usize,
    pub wall: Duration,
    pub time_to_first_token: Percentiles,
    /// Per request: time per output token after the first.
    pub time_per_output_token: Percentiles,
    pub request_latency: Percentiles,
    pub preemptions: u64,
    pub draft_tokens: u64,
    pub accepted_draft_tokens: u64,
}

impl BenchReport {
    pub fn requests_per_s(&self) -> f64 {
        self.requests as f64 / self.wall.as_secs_f64().max(1e-9)
    }

    pub fn output_tokens_per_s(&self) -> f64 {
        self.output_tokens as f64 / self.wall.as_secs_f64().max(1e-9)
    }

    pub fn total_tokens_per_s(&self) -> f64 {
        (self.input_tokens + self.output_tokens) as f64 / self.wall.as_secs_f64().max(1e-9)
    }
}

/// Runs the benchmark on `engine`.
pub fn run(engine: Engine, opts: &BenchOptions) -> Result<BenchReport> {
    if opts.requests == 0 || opts.input_len == 0 || opts.output_len == 0 {
        return Err(Error::Input(
            "bench needs at least one request, one prompt token and one output token".into(),
        ));
    }
    let vocab = engine.config().vocab_size as u64;
    let eos = engine.config().eos_token_ids.clone();
    let mut rng = SplitMix64::new(opts.seed);
    let mut scheduler = Scheduler::new(engine, opts.scheduler.clone());
    let mut receivers = Vec::with_capacity(opts.requests);
    let start = Instant::now();
    for i in 0..opts.requests {
        let prompt: Vec<u32> = (0..opts.input_len)
            .map(|_| loop {
                // Ids from the upper 90% of the vocabulary: ordinary tokens, never eos.
                let t = (vocab / 10 + rng.next_u64() % (vocab - vocab / 10)) as u32;
                if !eos.contains(&t) {
                    break t;
                }
            })
            .collect();
        let mut req = Request::new(prompt, opts.output_len);
        req.sampling = SamplingParams {
            ignore_eos: true,
            seed: opts.sampling.seed.wrapping_add(i as u64),
            ..opts.sampling.clone()
        };
        receivers.push(scheduler.submit(req)?.1);
    }
    scheduler.run_until_idle();
    let wall = start.elapsed();
    let mut finishes: Vec<Finish> = Vec::with_capacity(opts.requests);
    for mut rx in receivers {
        loop {
            match rx.try_recv() {
                Ok(Event::Token { .. }) => {}
                Ok(Event::Finished(f)) => {
                    finishes.push(f);
                    break;
                }
                Ok(Event::Error(e)) => {
                    return Err(Error::Input(format!("a bench request failed: {e}")))
                }
                Err(_) => return Err(Error::Input("a bench request never finished".into())),
            }
        }
    }
    let m = scheduler.metrics();
    let secs = |d: Duration| d.as_secs_f64();
    Ok(BenchReport {
        requests: finishes.len(),
        input_tokens: finishes.iter().map(|f| f.prompt_tokens).sum(),
        output_tokens: finishes.iter().map(|f| f.tokens.len()).sum(),
        wall,
        time_to_first_token: Percentiles::of(
            finishes
                .iter()
                .map(|f| secs(f.time_to_first_token))
                .collect(),
        ),
        time_per_output_token: Percentiles::of(
            finishes
                .iter()
                .filter_map(Finish::time_per_output_token)
                .collect(),
        ),
        request_latency: Percentiles::of(finishes.iter().map(|f| secs(f.total_time)).collect()),
        preemptions: m.preemptions_total,
        draft_tokens: m.draft_tokens_total,
        accepted_draft_tokens: m.accepted_draft_tokens_total,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_pick_ranks() {
        let p = Percentiles::of((1..=100).map(f64::from).collect());
        assert_eq!((p.p50, p.p90, p.p99), (51.0, 90.0, 99.0));
        assert_eq!(Percentiles::of(vec![]), Percentiles::default());
    }
}
