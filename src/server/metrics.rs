//! `GET /metrics`: the scheduler's state in the Prometheus text format.

use std::fmt::Write;
use std::sync::Arc;

use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};

use super::AppState;
use crate::engine::scheduler::{Histogram, Metrics, LATENCY_BUCKETS};

pub async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let m = state.scheduler.metrics();
    (
        [(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        render(&m, &state.options.model_name),
    )
        .into_response()
}

/// Prometheus exposition text of a metrics snapshot.
pub fn render(m: &Metrics, model: &str) -> String {
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, value: f64| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        let _ = writeln!(out, "{name}{{model=\"{model}\"}} {value}");
    };
    metric(
        "r1_requests_waiting",
        "gauge",
        "Requests queued, not yet admitted to the running batch.",
        m.waiting as f64,
    );
    metric(
        "r1_requests_running",
        "gauge",
        "Sequences in the running batch (prefilling or decoding).",
        m.running as f64,
    );
    metric(
        "r1_kv_cache_pages_in_use",
        "gauge",
        "KV cache pages (64 tokens each) held by live sequences.",
        m.kv_pages_in_use as f64,
    );
    metric(
        "r1_kv_cache_pages_cached",
        "gauge",
        "KV cache pages kept by the prefix cache.",
        m.kv_pages_cached as f64,
    );
    metric(
        "r1_kv_cache_pages_capacity",
        "gauge",
        "KV cache pages the scheduler may use.",
        m.kv_pages_capacity as f64,
    );
    metric(
        "r1_generation_tokens_per_second",
        "gauge",
        "Generated tokens per second over the last 10 s.",
        m.generation_tokens_per_second,
    );
    metric(
        "r1_prompt_tokens_per_second",
        "gauge",
        "Prompt tokens prefilled per second over the last 10 s.",
        m.prompt_tokens_per_second,
    );
    metric(
        "r1_requests_total",
        "counter",
        "Requests accepted.",
        m.requests_total as f64,
    );
    metric(
        "r1_requests_finished_total",
        "counter",
        "Requests that finished.",
        m.requests_finished as f64,
    );
    metric(
        "r1_requests_cancelled_total",
        "counter",
        "Requests cancelled or abandoned by their client.",
        m.requests_cancelled as f64,
    );
    metric(
        "r1_prompt_tokens_total",
        "counter",
        "Prompt tokens prefilled.",
        m.prompt_tokens_total as f64,
    );
    metric(
        "r1_generation_tokens_total",
        "counter",
        "Tokens generated.",
        m.generation_tokens_total as f64,
    );
    metric(
        "r1_prefix_cache_hit_tokens_total",
        "counter",
        "Prompt tokens served from the prefix cache.",
        m.prefix_cache_hit_tokens_total as f64,
    );
    metric(
        "r1_spec_draft_tokens_total",
        "counter",
        "Speculative decoding: draft tokens proposed by the MTP layer.",
        m.draft_tokens_total as f64,
    );
    metric(
        "r1_spec_accepted_tokens_total",
        "counter",
        "Speculative decoding: draft tokens the main model accepted.",
        m.accepted_draft_tokens_total as f64,
    );
    metric(
        "r1_preemptions_total",
        "counter",
        "Running requests pre-empted to free KV cache pages (recomputed later).",
        m.preemptions_total as f64,
    );
    metric(
        "r1_engine_steps_total",
        "counter",
        "Forward steps run by the scheduler.",
        m.steps_total as f64,
    );
    for (name, help, h) in [
        (
            "r1_time_to_first_token_seconds",
            "Time from submission to the first generated token, finished requests.",
            &m.time_to_first_token,
        ),
        (
            "r1_request_latency_seconds",
            "Time from submission to the last token, finished requests.",
            &m.request_latency,
        ),
        (
            "r1_time_per_output_token_seconds",
            "Mean time per generated token after the first, finished requests.",
            &m.time_per_output_token,
        ),
    ] {
        histogram(&mut out, name, help, h, model);
    }
    out
}

fn histogram(out: &mut String, name: &str, help: &str, h: &Histogram, model: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} histogram");
    let mut cumulative = 0;
    for (le, n) in LATENCY_BUCKETS.iter().zip(h.buckets) {
        cumulative += n;
        let _ = writeln!(
            out,
            "{name}_bucket{{model=\"{model}\",le=\"{le}\"}} {cumulative}"
        );
    }
    let _ = writeln!(
        out,
        "{name}_bucket{{model=\"{model}\",le=\"+Inf\"}} {}",
        h.count
    );
    let _ = writeln!(out, "{name}_sum{{model=\"{model}\"}} {}", h.sum);
    let _ = writeln!(out, "{name}_count{{model=\"{model}\"}} {}", h.count);
}
