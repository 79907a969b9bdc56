//! Monitoring: the counters, rates and latency histograms a scheduler publishes after each
//! step (`/metrics`).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::Scheduler;

/// A snapshot for monitoring (`/metrics`).
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    /// Requests waiting to be admitted.
    pub waiting: usize,
    /// Requests in the running batch (prefilling or decoding).
    pub running: usize,
    /// Pages held by live sequences.
    pub kv_pages_in_use: usize,
    /// Pages held by the prefix cache (finished sequences kept for reuse).
    pub kv_pages_cached: usize,
    pub kv_pages_capacity: usize,
    pub requests_total: u64,
    pub requests_finished: u64,
    pub requests_cancelled: u64,
    pub prompt_tokens_total: u64,
    pub generation_tokens_total: u64,
    pub prefix_cache_hit_tokens_total: u64,
    pub steps_total: u64,
    /// Generated tokens per second over the last few seconds.
    pub generation_tokens_per_second: f64,
    /// Prompt tokens prefilled per second over the last few seconds.
    pub prompt_tokens_per_second: f64,
    /// Speculative decoding: draft tokens proposed and accepted.
    pub draft_tokens_total: u64,
    pub accepted_draft_tokens_total: u64,
    /// Running requests pre-empted to free cache pages (recomputed later).
    pub preemptions_total: u64,
    /// Finished requests: time to first token, whole request, and per output token after
    /// the first (seconds).
    pub time_to_first_token: Histogram,
    pub request_latency: Histogram,
    pub time_per_output_token: Histogram,
}

/// Latency histogram buckets (upper bounds, seconds), from per-token to whole long requests.
pub const LATENCY_BUCKETS: [f64; 17] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
    600.0,
];

/// A Prometheus histogram over [`LATENCY_BUCKETS`]: observations per bucket (not
/// cumulative), their sum and count.
#[derive(Debug, Clone, Default)]
pub struct Histogram {
    pub buckets: [u64; LATENCY_BUCKETS.len()],
    pub sum: f64,
    pub count: u64,
}

impl Histogram {
    pub fn observe(&mut self, seconds: f64) {
        if let Some(i) = LATENCY_BUCKETS.iter().position(|&b| seconds <= b) {
            self.buckets[i] += 1;
        }
        self.sum += seconds;
        self.count += 1;
    }
}

const RATE_WINDOW: Duration = Duration::from_secs(10);

impl Scheduler {
    pub fn metrics(&self) -> Metrics {
        self.metrics
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(super) fn metrics_handle(&self) -> Arc<Mutex<Metrics>> {
        Arc::clone(&self.metrics)
    }

    pub(super) fn publish(
        &mut self,
        cancelled: u64,
        finished: usize,
        generated: usize,
        prefilled: usize,
    ) {
        let now = Instant::now();
        if generated + prefilled > 0 {
            self.recent.push_back((now, generated, prefilled));
        }
        while self
            .recent
            .front()
            .is_some_and(|(t, _, _)| now.duration_since(*t) > RATE_WINDOW)
        {
            self.recent.pop_front();
        }
        let span = self
            .recent
            .front()
            .map_or(0.0, |(t, _, _)| now.duration_since(*t).as_secs_f64())
            .max(1.0);
        let (g, p) = self
            .recent
            .iter()
            .fold((0, 0), |(g, p), &(_, a, b)| (g + a, p + b));
        let mut m = self.metrics.lock().unwrap_or_else(|e| e.into_inner());
        m.waiting = self.waiting.len();
        m.running = self.running.len();
        m.kv_pages_cached = self.cached_pages;
        m.kv_pages_in_use = self
            .engine
            .cache_pages_in_use()
            .saturating_sub(self.cached_pages);
        m.requests_finished += finished as u64;
        m.requests_cancelled += cancelled;
        m.generation_tokens_total += generated as u64;
        m.prompt_tokens_total += prefilled as u64;
        m.steps_total += 1;
        m.generation_tokens_per_second = g as f64 / span;
        m.prompt_tokens_per_second = p as f64 / span;
    }
}
