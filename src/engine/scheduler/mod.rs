//! Continuous batching over [`Engine::forward_batch`]: requests join and leave the running
//! batch between steps; a long prompt is prefilled in chunks (a token budget per step) so
//! running streams keep decoding; each request has its own sampling settings, stop strings,
//! stop tokens and length limit; a cancelled (or abandoned) request frees its cache pages.
//!
//! Cache pages are taken as sequences grow, not reserved for `max_tokens` up front: a request
//! is admitted when its prompt fits, and when the running batch needs more pages than are
//! free the newest requests are pre-empted (pages freed, prompt + generated tokens
//! recomputed on re-admission) so that the oldest always make progress.
//!
//! [`Scheduler`] is the single-threaded core (deterministic, testable step by step);
//! [`SchedulerHandle::spawn`] runs one on a dedicated thread (the engine is not `Sync`, and a
//! GPU context belongs to one thread) and talks to it over channels, so any number of threads
//! or async tasks can submit requests and receive their events.
//!
//! Prefix caching (opt-in, [`SchedulerOptions::prefix_cache_pages`]): a finished sequence's
//! cache stays behind, keyed by its tokens; a later request whose prompt shares a prefix with
//! one forks it ([`Engine::fork`]: the pages are shared, and the page the request first
//! writes to is copied) and prefills only the rest. Any number of running requests can share
//! one cached sequence, which stays cached; a request can also fork the prefilled part of a
//! running request's prompt (the same system prompt arriving many times at once). Multi-turn chats, repeated prompts and common
//! system prompts hit; least recently used entries are evicted when the budget or the KV
//! capacity needs room.

use std::collections::VecDeque;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use super::sampling::{pick, sample, sampling_distribution, Rng, SamplingParams};
use super::speculative::{judge, Draft, DraftRequest, Drafter, MtpDrafter, Verified};
use super::{Engine, Sequence, Step};
use crate::error::{Error, Result};
use crate::kv_cache::PAGE_TOKENS;
use crate::text::constrained::{AnswerConstraint, AnswerFormat};
use crate::text::stop::{earliest_stop, partial_suffix};
use crate::text::{IncrementalDecoder, TokenBytes, Tokenizer};

pub type RequestId = u64;

/// One generation request (token level; text in and out is the chat layer's business, except
/// for stop strings, which need the tokenizer the scheduler was given).
#[derive(Debug, Clone)]
pub struct Request {
    pub prompt: Vec<u32>,
    /// Tokens to generate at most (capped by the model's context).
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Stop strings: generation ends before the first occurrence, which is not returned.
    pub stop: Vec<String>,
    /// Extra token ids that end generation (like eos; the token counts but has no text).
    pub stop_token_ids: Vec<u32>,
    /// A constrained answer (JSON mode, a forced tool call; needs the tokenizer).
    pub answer: Option<AnswerMode>,
}

/// What the answer must be, and where it starts.
#[derive(Debug, Clone)]
pub struct AnswerMode {
    pub format: AnswerFormat,
    /// The prompt opened `<think>`: the output reasons (unconstrained) until `</think>`.
    pub in_reasoning: bool,
}

impl Request {
    pub fn new(prompt: Vec<u32>, max_tokens: usize) -> Self {
        Request {
            prompt,
            max_tokens,
            sampling: SamplingParams::default(),
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            answer: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// The model's eos token.
    Eos,
    /// One of the request's stop token ids.
    StopToken,
    /// One of the request's stop strings.
    StopString,
    /// A constrained answer (JSON object, tool call) is complete.
    AnswerComplete,
    /// `max_tokens` or the model's context.
    Length,
}

/// The end of a request.
#[derive(Debug, Clone)]
pub struct Finish {
    pub reason: StopReason,
    /// Text still held back at the end (the last incomplete characters, a stop-string prefix
    /// that did not complete); empty without a tokenizer.
    pub text: String,
    /// Every generated token, the final eos/stop token included.
    pub tokens: Vec<u32>,
    pub prompt_tokens: usize,
    /// Prompt tokens whose cache came from an earlier request (prefix caching).
    pub cached_tokens: usize,
    pub time_to_first_token: Duration,
    pub total_time: Duration,
}

impl Finish {
    /// Mean seconds per generated token after the first (None with fewer than two tokens).
    pub fn time_per_output_token(&self) -> Option<f64> {
        let after_first = self.total_time.as_secs_f64() - self.time_to_first_token.as_secs_f64();
        (self.tokens.len() > 1).then(|| after_first / (self.tokens.len() - 1) as f64)
    }
}

/// What a request's receiver gets, in order: tokens, then exactly one `Finished` or `Error`.
#[derive(Debug, Clone)]
pub enum Event {
    /// A generated token and the text that became final with it (possibly empty: incomplete
    /// characters and possible stop-string prefixes wait). Eos/stop tokens send no `Token`.
    Token {
        id: u32,
        text: String,
    },
    Finished(Finish),
    Error(String),
}

#[derive(Debug, Clone)]
pub struct SchedulerOptions {
    /// Sequences decoding at once, at most.
    pub max_running: usize,
    /// Tokens per forward step: decode tokens first, the rest of the budget for prefill
    /// chunks (at least one prompt token per step while a prompt waits).
    pub step_tokens: usize,
    /// KV cache pages the scheduler may use (capped by the engine's `cache_tokens /
    /// PAGE_TOKENS`). A request is admitted when its prompt fits beside the running ones;
    /// when decoding needs more pages than are free, the newest running requests are
    /// pre-empted (their pages freed, their context recomputed later) so older ones finish.
    /// One request must fit alone: prompt + `max_tokens` within this.
    pub kv_pages: usize,
    /// Needed for text in `Event::Token` and for stop strings.
    pub tokenizer: Option<Tokenizer>,
    /// KV pages finished sequences may keep for prefix caching (0: off). Counted within
    /// `kv_pages`.
    pub prefix_cache_pages: usize,
    /// MTP speculative decoding: drafts per step (0: off). Needs an engine loaded with its
    /// MTP layer. JSON-mode requests decode without drafts.
    pub draft_tokens: usize,
}

impl Default for SchedulerOptions {
    fn default() -> Self {
        SchedulerOptions {
            max_running: 64,
            step_tokens: 512,
            kv_pages: (1 << 20) / PAGE_TOKENS,
            tokenizer: None,
            prefix_cache_pages: 0,
            draft_tokens: 0,
        }
    }
}

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

/// Facts about the model that front ends need to validate requests.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub vocab_size: usize,
    pub max_context: usize,
    pub eos_token_ids: Vec<u32>,
}

struct Running {
    id: RequestId,
    req: Request,
    /// `max_tokens` capped by the context.
    limit: usize,
    seq: Sequence,
    /// The tokens to prefill: the prompt, or after a pre-emption the prompt and every
    /// generated token but the last (which the next decode step feeds).
    context: Vec<u32>,
    /// Context tokens already in the cache.
    prefilled: usize,
    /// Prompt tokens that came from the prefix cache.
    cached: usize,
    generated: Vec<u32>,
    rng: Rng,
    decoder: Option<IncrementalDecoder>,
    /// Decoded text held back because it might begin a stop string.
    pending: String,
    events: UnboundedSender<Event>,
    submitted: Instant,
    first_token: Option<Duration>,
    cancelled: bool,
    answer: Option<AnswerConstraint>,
    /// Speculative decoding state (None: this request decodes without drafts).
    spec: Option<SpecState>,
}

/// What the MTP drafter has not yet seen: the tokens following positions `from ..` and the
/// main model's final-normed states there, plus the drafts of the step in flight.
#[derive(Default)]
struct SpecState {
    from: usize,
    next_tokens: Vec<u32>,
    hidden: Vec<f32>,
    drafts: Vec<Draft>,
}

impl Running {
    fn decoding(&self) -> bool {
        self.prefilled == self.context.len()
    }
}

/// The scheduling core: owns the engine and every request's state.
pub struct Scheduler {
    engine: Engine,
    opts: SchedulerOptions,
    info: ModelInfo,
    waiting: VecDeque<Running>,
    running: Vec<Running>,
    next_id: RequestId,
    metrics: Arc<Mutex<Metrics>>,
    /// (time, generated, prefilled) per step, for the rates.
    recent: VecDeque<(Instant, usize, usize)>,
    prefix_cache: Vec<CachedSeq>,
    cached_pages: usize,
    clock: u64,
    /// Token bytes for JSON mode, built on first use.
    token_bytes: Option<Arc<TokenBytes>>,
}

/// Where a shared prefix comes from: an index into the prefix cache or the running batch.
#[derive(Debug, Clone, Copy)]
enum PrefixSource {
    Cached(usize),
    Running(usize),
}

/// A finished sequence kept for prefix caching: its cache holds `tokens`.
struct CachedSeq {
    tokens: Vec<u32>,
    seq: Sequence,
    last_used: u64,
}

fn pages_for(tokens: usize) -> usize {
    tokens.div_ceil(PAGE_TOKENS)
}

const RATE_WINDOW: Duration = Duration::from_secs(10);

impl Scheduler {
    pub fn new(engine: Engine, mut opts: SchedulerOptions) -> Self {
        opts.kv_pages = opts.kv_pages.min(engine.cache_pages_capacity());
        let cfg = engine.config();
        let info = ModelInfo {
            vocab_size: cfg.vocab_size,
            max_context: cfg.max_position_embeddings,
            eos_token_ids: cfg.eos_token_ids.clone(),
        };
        let metrics = Metrics {
            kv_pages_capacity: opts.kv_pages,
            ..Metrics::default()
        };
        Scheduler {
            engine,
            opts,
            info,
            waiting: VecDeque::new(),
            running: Vec::new(),
            next_id: 1,
            metrics: Arc::new(Mutex::new(metrics)),
            recent: VecDeque::new(),
            prefix_cache: Vec::new(),
            cached_pages: 0,
            clock: 0,
            token_bytes: None,
        }
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Checks a request and queues it; its events go to `events`.
    pub fn submit_with(
        &mut self,
        req: Request,
        events: UnboundedSender<Event>,
    ) -> Result<RequestId> {
        let limit = validate(&self.info, &self.opts, &req)?;
        let id = self.next_id;
        self.next_id += 1;
        let decoder = self.opts.tokenizer.as_ref().map(|t| t.stream(true));
        let answer = match (&req.answer, &self.opts.tokenizer) {
            (Some(mode), Some(tok)) => {
                let vocab = self.info.vocab_size;
                let table = self
                    .token_bytes
                    .get_or_insert_with(|| Arc::new(TokenBytes::from_tokenizer(tok, vocab)));
                Some(AnswerConstraint::new(
                    Arc::clone(table),
                    &mode.format,
                    mode.in_reasoning,
                    tok,
                ))
            }
            _ => None,
        };
        let rng = Rng::new(req.sampling.seed);
        let context = req.prompt.clone();
        self.waiting.push_back(Running {
            id,
            req,
            limit,
            seq: Sequence::default(),
            context,
            prefilled: 0,
            cached: 0,
            generated: Vec::new(),
            rng,
            decoder,
            pending: String::new(),
            events,
            submitted: Instant::now(),
            first_token: None,
            cancelled: false,
            spec: (self.opts.draft_tokens > 0 && answer.is_none()).then(SpecState::default),
            answer,
        });
        let mut m = self.metrics.lock().unwrap_or_else(|e| e.into_inner());
        m.requests_total += 1;
        m.waiting = self.waiting.len();
        Ok(id)
    }

    /// Queues a request; returns its id and its event receiver.
    pub fn submit(&mut self, req: Request) -> Result<(RequestId, UnboundedReceiver<Event>)> {
        let (tx, rx) = unbounded_channel();
        let id = self.submit_with(req, tx)?;
        Ok((id, rx))
    }

    /// Cancels a request (waiting or running); its cache pages are freed at the next step.
    /// Dropping a request's receiver has the same effect.
    pub fn cancel(&mut self, id: RequestId) {
        for r in self.waiting.iter_mut().chain(self.running.iter_mut()) {
            if r.id == id {
                r.cancelled = true;
            }
        }
    }

    pub fn has_work(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty()
    }

    pub fn metrics(&self) -> Metrics {
        self.metrics
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn metrics_handle(&self) -> Arc<Mutex<Metrics>> {
        Arc::clone(&self.metrics)
    }

    /// Drops cancelled requests and those whose receiver is gone, freeing their pages.
    fn reap(&mut self) -> u64 {
        let mut reaped = 0;
        let mut i = 0;
        while i < self.running.len() {
            let r = &self.running[i];
            if r.cancelled || r.events.is_closed() {
                let mut r = self.running.remove(i);
                self.engine.release(&mut r.seq);
                let _ = r.events.send(Event::Error("cancelled".into()));
                reaped += 1;
            } else {
                i += 1;
            }
        }
        let before = self.waiting.len();
        self.waiting.retain(|r| {
            let keep = !(r.cancelled || r.events.is_closed());
            if !keep {
                let _ = r.events.send(Event::Error("cancelled".into()));
            }
            keep
        });
        reaped + (before - self.waiting.len()) as u64
    }

    /// Moves waiting requests into the batch while there is room (FIFO: a request that does
    /// not fit blocks the ones behind it, so large requests are not starved; pre-empted
    /// requests wait at the front). Room means free pages for the request's whole context
    /// beside what the running requests still need for theirs, plus one page per running
    /// sequence for decoding. A request forks the cached sequence sharing the longest prefix
    /// with its context, if any: it shares that sequence's pages (which stays cached for
    /// others) and copies only a page it writes to.
    fn admit(&mut self) {
        while self.running.len() < self.opts.max_running {
            let Some(front) = self.waiting.front() else {
                break;
            };
            let speculative = front.spec.is_some();
            let hit = self.best_prefix(&front.context).and_then(|(source, len)| {
                let seq = match source {
                    PrefixSource::Cached(i) => {
                        self.clock += 1;
                        self.prefix_cache[i].last_used = self.clock;
                        &self.prefix_cache[i].seq
                    }
                    PrefixSource::Running(i) => &self.running[i].seq,
                };
                // With speculation the MTP layer must cover the reused positions too.
                let len = if speculative {
                    len.min(seq.mtp_len())
                } else {
                    len
                };
                (len > 0).then(|| (self.engine.fork(seq, len), len))
            });
            let context = front.context.len();
            let need = match &hit {
                Some((seq, len)) => self.engine.pages_to_write(seq, *len, context),
                None => context.div_ceil(PAGE_TOKENS),
            } + self.prefill_pages()
                + self.running.len()
                + 1;
            while self.free_pages() < need && self.evict_lru() {}
            if self.free_pages() < need {
                if let Some((mut seq, _)) = hit {
                    self.engine.release(&mut seq);
                }
                break;
            }
            let mut r = self.waiting.pop_front().expect("front exists");
            if let Some((seq, len)) = hit {
                if r.spec.is_some() {
                    r.spec = Some(SpecState {
                        from: len,
                        ..SpecState::default()
                    });
                }
                r.seq = seq;
                r.prefilled = len;
                if r.generated.is_empty() {
                    r.cached = len;
                    let mut m = self.metrics.lock().unwrap_or_else(|e| e.into_inner());
                    m.prefix_cache_hit_tokens_total += len as u64;
                }
            }
            self.running.push(r);
        }
    }

    /// Pages of the cache no sequence holds.
    fn free_pages(&self) -> usize {
        self.opts
            .kv_pages
            .saturating_sub(self.engine.cache_pages_in_use())
    }

    /// Pages the running requests still need to prefill the rest of their contexts.
    fn prefill_pages(&self) -> usize {
        self.running.iter().map(|r| self.rest_of_context(r)).sum()
    }

    /// Pages writing the rest of `r`'s context takes (copies of shared pages included).
    fn rest_of_context(&self, r: &Running) -> usize {
        self.engine
            .pages_to_write(&r.seq, r.seq.len(), r.context.len())
    }

    /// Pages this step may take: the rest of every prefill, and for every decoding request
    /// its next token and drafts (the MTP layer may write from behind the main model).
    fn step_pages(&self) -> usize {
        let k = self.opts.draft_tokens;
        self.running
            .iter()
            .map(|r| {
                let len = r.seq.len();
                if r.decoding() {
                    let from = if r.spec.is_some() {
                        len.min(r.seq.mtp_len())
                    } else {
                        len
                    };
                    let drafts = if r.spec.is_some() { k } else { 0 };
                    self.engine.pages_to_write(&r.seq, from, len + 1 + drafts)
                } else {
                    self.rest_of_context(r)
                }
            })
            .sum()
    }

    /// Makes room for this step: evicts cached sequences, then pre-empts the newest running
    /// requests (never the oldest, so the batch always makes progress). A pre-empted request
    /// frees its pages and waits at the front of the queue; when re-admitted it prefills its
    /// prompt and generated tokens again (or forks them from the prefix cache) and goes on
    /// where it stopped: its stream sees nothing of this.
    fn make_room(&mut self) {
        while self.step_pages() > self.free_pages() {
            if self.evict_lru() {
                continue;
            }
            if self.running.len() < 2 {
                break;
            }
            let Some(mut r) = self.running.pop() else {
                break;
            };
            self.engine.release(&mut r.seq);
            let n = r.generated.len();
            r.context = r.req.prompt.clone();
            r.context
                .extend_from_slice(&r.generated[..n.saturating_sub(1)]);
            r.prefilled = 0;
            if r.spec.is_some() {
                r.spec = Some(SpecState::default());
            }
            self.waiting.push_front(r);
            let mut m = self.metrics.lock().unwrap_or_else(|e| e.into_inner());
            m.preemptions_total += 1;
        }
    }

    /// The sequence sharing the longest prefix with `context` (leaving at least one token to
    /// run): a cached one, or with prefix caching on a running request's prefilled context.
    /// Returns where it is and the shared length.
    fn best_prefix(&self, context: &[u32]) -> Option<(PrefixSource, usize)> {
        let max = context.len().saturating_sub(1);
        let shared = |tokens: &[u32]| {
            let n = tokens
                .iter()
                .zip(context)
                .take_while(|(a, b)| a == b)
                .count();
            n.min(max)
        };
        let cached = self
            .prefix_cache
            .iter()
            .enumerate()
            .map(|(i, c)| ((shared(&c.tokens), c.last_used), PrefixSource::Cached(i)));
        let running = self
            .running
            .iter()
            .enumerate()
            .filter(|_| self.opts.prefix_cache_pages > 0)
            .map(|(i, r)| {
                (
                    (shared(&r.context[..r.prefilled]), 0),
                    PrefixSource::Running(i),
                )
            });
        cached
            .chain(running)
            .filter(|&((n, _), _)| n > 0)
            .max_by_key(|&(key, _)| key)
            .map(|((n, _), source)| (source, n))
    }

    /// Frees the least recently used cached sequence; false when none is left.
    fn evict_lru(&mut self) -> bool {
        let victim = self
            .prefix_cache
            .iter()
            .enumerate()
            .min_by_key(|(_, c)| c.last_used)
            .map(|(i, _)| i);
        let Some(i) = victim else {
            return false;
        };
        let mut c = self.prefix_cache.swap_remove(i);
        self.cached_pages -= pages_for(c.tokens.len());
        self.engine.release(&mut c.seq);
        true
    }

    /// Keeps a finished sequence for prefix caching, or frees it.
    fn retire(&mut self, mut r: Running) {
        let budget = self.opts.prefix_cache_pages;
        // The cache holds the prompt and every generated token but the last (never fed).
        let mut tokens = r.req.prompt.clone();
        tokens.extend_from_slice(&r.generated[..r.generated.len().saturating_sub(1)]);
        let pages = pages_for(tokens.len());
        if budget == 0 || pages > budget || r.seq.len() != tokens.len() {
            self.engine.release(&mut r.seq);
            return;
        }
        // An entry that is a prefix of this one is redundant.
        let mut i = 0;
        while i < self.prefix_cache.len() {
            let c = &self.prefix_cache[i];
            if tokens.starts_with(&c.tokens) {
                let mut c = self.prefix_cache.swap_remove(i);
                self.cached_pages -= pages_for(c.tokens.len());
                self.engine.release(&mut c.seq);
            } else {
                i += 1;
            }
        }
        while self.cached_pages + pages > budget && self.evict_lru() {}
        self.clock += 1;
        self.cached_pages += pages;
        self.prefix_cache.push(CachedSeq {
            tokens,
            seq: r.seq,
            last_used: self.clock,
        });
    }

    /// Frees every cached sequence.
    pub fn clear_prefix_cache(&mut self) {
        while self.evict_lru() {}
    }

    /// One forward step over the running batch. Returns whether work remains.
    pub fn step(&mut self) -> bool {
        let cancelled = self.reap();
        self.admit();
        self.make_room();
        if self.running.is_empty() {
            self.publish(cancelled, 0, 0, 0);
            return self.has_work();
        }
        if let Err(e) = self.draft() {
            self.fail_running(&e.to_string(), &(0..self.running.len()).collect::<Vec<_>>());
            self.publish(cancelled, 0, 0, 0);
            return self.has_work();
        }
        let decodes = self.running.iter().filter(|r| r.decoding()).count();
        let mut prefill_budget = self.opts.step_tokens.saturating_sub(decodes).max(1);
        // Each running request's tokens for this step (a prefill chunk, or the last token and
        // its drafts) and how many trailing logit rows it needs.
        let mut inputs: Vec<(usize, Vec<u32>, usize)> = Vec::with_capacity(self.running.len());
        for (i, r) in self.running.iter().enumerate() {
            if r.decoding() {
                let last = r.generated[r.generated.len() - 1];
                let drafts = r.spec.as_ref().map_or(&[][..], |s| &s.drafts[..]);
                let tokens: Vec<u32> = std::iter::once(last)
                    .chain(drafts.iter().map(|d| d.token))
                    .collect();
                let rows = tokens.len();
                inputs.push((i, tokens, rows));
            } else {
                let n = (r.context.len() - r.prefilled).min(prefill_budget);
                if n == 0 {
                    continue;
                }
                prefill_budget -= n;
                let end = r.prefilled + n;
                // Logits for the last prompt token; a recomputed context already knows its
                // next token (the last one generated).
                let rows = usize::from(end == r.context.len() && r.generated.is_empty());
                inputs.push((i, r.context[r.prefilled..end].to_vec(), rows));
            }
        }
        let members: Vec<usize> = inputs.iter().map(|(i, _, _)| *i).collect();
        let rows: Vec<usize> = inputs.iter().map(|(_, _, n)| *n).collect();
        let bases: Vec<usize> = members.iter().map(|&i| self.running[i].seq.len()).collect();
        let result = {
            let mut seqs: Vec<&mut Sequence> = self
                .running
                .iter_mut()
                .enumerate()
                .filter(|(i, _)| members.contains(i))
                .map(|(_, r)| &mut r.seq)
                .collect();
            let mut steps: Vec<Step<'_>> = seqs
                .iter_mut()
                .zip(&inputs)
                .map(|(seq, (_, tokens, _))| Step { seq, tokens })
                .collect();
            self.engine.forward_batch_rows(&mut steps, &rows)
        };
        let outputs = match result {
            Ok(o) => o,
            Err(e) => {
                // The step failed as a whole: fail its members, free their pages.
                self.fail_running(&e.to_string(), &members);
                self.publish(cancelled, 0, 0, 0);
                return self.has_work();
            }
        };
        let (mut generated, mut prefilled) = (0, 0);
        let mut done: Vec<usize> = Vec::new();
        let vocab = self.info.vocab_size;
        let h = self.engine.config().hidden_size;
        for (((&i, out), (_, tokens, _)), base) in
            members.iter().zip(outputs).zip(&inputs).zip(bases)
        {
            let r = &mut self.running[i];
            if !r.decoding() {
                let n = tokens.len();
                if let Some(spec) = r.spec.as_mut() {
                    // Prompt positions whose next token is known go to the drafter now; the
                    // last one waits for the first generated token.
                    let end = (r.prefilled + n + 1).min(r.context.len());
                    spec.next_tokens
                        .extend_from_slice(&r.context[r.prefilled + 1..end]);
                    spec.hidden.extend_from_slice(&out.hidden);
                }
                r.prefilled += n;
                prefilled += n;
                if !r.decoding() {
                    continue;
                }
                if let Some(&last) = r.generated.last() {
                    // A recomputed context: decoding resumes with the last generated token.
                    if let Some(spec) = r.spec.as_mut() {
                        spec.next_tokens.push(last);
                    }
                    continue;
                }
            }
            let finish = match r.spec.as_mut() {
                None => {
                    generated += 1;
                    self.advance(i, &out.logits)
                }
                Some(spec) => {
                    let drafts = std::mem::take(&mut spec.drafts);
                    let (accepted, bonus) =
                        judge(&drafts, &out.logits, vocab, &r.req.sampling, &mut r.rng);
                    let emitted: Vec<u32> = drafts[..accepted]
                        .iter()
                        .map(|d| d.token)
                        .chain([bonus])
                        .collect();
                    if r.generated.is_empty() {
                        // First token after the prefill: the drafter's pending input completes.
                        spec.next_tokens.push(bonus);
                    } else {
                        if !drafts.is_empty() {
                            // The drafter consumed its input; rejected drafts leave the cache.
                            spec.from = base;
                            spec.next_tokens.clear();
                            spec.hidden.clear();
                        }
                        self.engine.truncate(&mut r.seq, base + 1 + accepted);
                        spec.next_tokens.extend_from_slice(&emitted);
                        spec.hidden
                            .extend_from_slice(&out.hidden[..(accepted + 1) * h]);
                    }
                    {
                        let mut m = self.metrics.lock().unwrap_or_else(|e| e.into_inner());
                        m.draft_tokens_total += drafts.len() as u64;
                        m.accepted_draft_tokens_total += accepted as u64;
                    }
                    let mut finish = None;
                    for token in emitted {
                        generated += 1;
                        finish = self.emit(i, token);
                        if finish.is_some() {
                            break;
                        }
                    }
                    finish
                }
            };
            if let Some(finish) = finish {
                {
                    let mut m = self.metrics.lock().unwrap_or_else(|e| e.into_inner());
                    m.time_to_first_token
                        .observe(finish.time_to_first_token.as_secs_f64());
                    m.request_latency.observe(finish.total_time.as_secs_f64());
                    if let Some(t) = finish.time_per_output_token() {
                        m.time_per_output_token.observe(t);
                    }
                }
                let r = &mut self.running[i];
                let _ = r.events.send(Event::Finished(finish));
                done.push(i);
            }
        }
        let finished = done.len();
        for &i in done.iter().rev() {
            let r = self.running.remove(i);
            self.retire(r);
        }
        self.publish(cancelled, finished, generated, prefilled);
        self.has_work()
    }

    /// Proposes drafts for every decoding request that speculates, within its length limit.
    fn draft(&mut self) -> Result<()> {
        let k = self.opts.draft_tokens;
        let mut drafting: Vec<usize> = Vec::new();
        let mut requests: Vec<DraftRequest> = Vec::new();
        for (i, r) in self.running.iter_mut().enumerate() {
            let budget = r.limit.saturating_sub(r.generated.len() + 1).min(k);
            if !r.decoding() || r.generated.is_empty() || budget == 0 {
                continue;
            }
            let Running {
                spec: Some(spec),
                seq,
                req,
                rng,
                ..
            } = r
            else {
                continue;
            };
            drafting.push(i);
            requests.push(DraftRequest {
                seq,
                verified: Verified {
                    index: i,
                    first_pos: spec.from,
                    next_tokens: &spec.next_tokens,
                    hidden: &spec.hidden,
                },
                budget,
                sampling: &req.sampling,
                rng,
            });
        }
        let proposed = MtpDrafter.propose(&mut self.engine, &mut requests)?;
        drop(requests);
        for (i, drafts) in drafting.into_iter().zip(proposed) {
            if let Some(spec) = self.running[i].spec.as_mut() {
                spec.drafts = drafts;
            }
        }
        Ok(())
    }

    /// Ends the given running requests with an error and frees their pages.
    fn fail_running(&mut self, msg: &str, members: &[usize]) {
        for &i in members.iter().rev() {
            let mut r = self.running.remove(i);
            self.engine.release(&mut r.seq);
            let _ = r.events.send(Event::Error(msg.to_string()));
        }
    }

    /// Samples request `i`'s next token from `logits`; returns its finish when it is done.
    fn advance(&mut self, i: usize, logits: &[f32]) -> Option<Finish> {
        let eos = &self.info.eos_token_ids;
        let r = &mut self.running[i];
        let token = match &r.answer {
            Some(c) if c.active() => {
                // The model's own choice where it fits; where it does not, fixed text (markup)
                // continues with its own tokens, anything else with a constrained draw.
                let own = sample(logits, &r.req.sampling, &mut r.rng);
                if c.allows(own) {
                    own
                } else {
                    c.forced()
                        .or_else(|| {
                            constrained_sample(logits, &r.req.sampling, &mut r.rng, |t| c.allows(t))
                        })
                        .unwrap_or_else(|| eos.first().copied().unwrap_or(0))
                }
            }
            _ => sample(logits, &r.req.sampling, &mut r.rng),
        };
        self.emit(i, token)
    }

    /// Appends `token` to request `i`'s output and streams it; returns the request's finish
    /// when it is done.
    fn emit(&mut self, i: usize, token: u32) -> Option<Finish> {
        let eos = &self.info.eos_token_ids;
        let r = &mut self.running[i];
        if let Some(c) = r.answer.as_mut() {
            c.accept(token);
        }
        r.generated.push(token);
        if r.first_token.is_none() {
            r.first_token = Some(r.submitted.elapsed());
        }
        let stop_reason = if !r.req.sampling.ignore_eos && eos.contains(&token) {
            Some(StopReason::Eos)
        } else if r.req.stop_token_ids.contains(&token) {
            Some(StopReason::StopToken)
        } else {
            None
        };
        if let Some(reason) = stop_reason {
            let text = r.flush_text();
            return Some(r.finish(reason, text));
        }
        let mut text = match r.decoder.as_mut().map(|d| d.step(token)) {
            Some(Ok(t)) => t,
            Some(Err(e)) => {
                let _ = r.events.send(Event::Error(e.to_string()));
                r.cancelled = true;
                return None;
            }
            None => String::new(),
        };
        let mut stopped = false;
        if !r.req.stop.is_empty() {
            r.pending.push_str(&text);
            if let Some(pos) = earliest_stop(&r.pending, &r.req.stop) {
                r.pending.truncate(pos);
                text = std::mem::take(&mut r.pending);
                stopped = true;
            } else {
                let hold = r
                    .req
                    .stop
                    .iter()
                    .map(|s| partial_suffix(&r.pending, s))
                    .max()
                    .unwrap_or(0);
                let cut = r.pending.len() - hold;
                text = r.pending[..cut].to_string();
                r.pending.drain(..cut);
            }
        }
        let _ = r.events.send(Event::Token { id: token, text });
        if stopped {
            return Some(r.finish(StopReason::StopString, String::new()));
        }
        if r.answer.as_ref().is_some_and(AnswerConstraint::complete) {
            let text = r.flush_text();
            return Some(r.finish(StopReason::AnswerComplete, text));
        }
        if r.generated.len() >= r.limit {
            let text = r.flush_text();
            return Some(r.finish(StopReason::Length, text));
        }
        None
    }

    fn publish(&mut self, cancelled: u64, finished: usize, generated: usize, prefilled: usize) {
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

    /// Steps until every request has finished.
    pub fn run_until_idle(&mut self) {
        while self.step() {}
    }
}

impl Running {
    /// Text still held back (incomplete characters, stop-string prefixes).
    fn flush_text(&mut self) -> String {
        let mut text = std::mem::take(&mut self.pending);
        if let Some(d) = self.decoder.as_mut() {
            text.push_str(&d.finish().unwrap_or_default());
        }
        if let Some(pos) = earliest_stop(&text, &self.req.stop) {
            text.truncate(pos);
        }
        text
    }

    fn finish(&mut self, reason: StopReason, text: String) -> Finish {
        Finish {
            reason,
            text,
            tokens: self.generated.clone(),
            prompt_tokens: self.req.prompt.len(),
            cached_tokens: self.cached,
            time_to_first_token: self.first_token.unwrap_or_default(),
            total_time: self.submitted.elapsed(),
        }
    }
}

/// Samples among the tokens `allowed` accepts: greedy takes the best allowed token; sampling
/// draws from the request's distribution restricted to allowed tokens (the best allowed token
/// when none of the distribution's tokens is allowed). None when nothing is allowed.
fn constrained_sample(
    logits: &[f32],
    p: &SamplingParams,
    rng: &mut Rng,
    allowed: impl Fn(u32) -> bool,
) -> Option<u32> {
    let best_allowed = || {
        // The best few first (selected in linear time), then the rest in order.
        let order = |a: &u32, b: &u32| {
            logits[*b as usize]
                .total_cmp(&logits[*a as usize])
                .then(a.cmp(b))
        };
        let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
        let head = 64.min(idx.len());
        if head < idx.len() {
            idx.select_nth_unstable_by(head - 1, order);
        }
        idx[..head].sort_unstable_by(order);
        if let Some(t) = idx[..head].iter().copied().find(|&t| allowed(t)) {
            return Some(t);
        }
        idx[head..].sort_unstable_by(order);
        idx[head..].iter().copied().find(|&t| allowed(t))
    };
    if p.temperature == 0.0 {
        return best_allowed();
    }
    let dist = sampling_distribution(logits, p);
    // Rejection sampling: an allowed draw from the distribution is a draw from the
    // distribution restricted to allowed tokens. After a few refusals the restriction is
    // built and drawn from directly (exact either way, and cheap when most mass is allowed).
    for _ in 0..8 {
        let t = pick(&dist, rng);
        if allowed(t) {
            return Some(t);
        }
    }
    let kept: Vec<(u32, f64)> = dist.into_iter().filter(|&(t, _)| allowed(t)).collect();
    let total: f64 = kept.iter().map(|(_, q)| q).sum();
    if kept.is_empty() || total <= 0.0 {
        return best_allowed();
    }
    let kept: Vec<(u32, f64)> = kept.into_iter().map(|(t, q)| (t, q / total)).collect();
    Some(pick(&kept, rng))
}

/// Checks a request against the model; returns its effective token limit.
fn validate(info: &ModelInfo, opts: &SchedulerOptions, req: &Request) -> Result<usize> {
    req.sampling.validate().map_err(Error::Input)?;
    if req.prompt.is_empty() {
        return Err(Error::Input("the prompt is empty".into()));
    }
    if req.max_tokens == 0 {
        return Err(Error::Input("max_tokens must be at least 1".into()));
    }
    if let Some(&bad) = req.prompt.iter().find(|&&t| t as usize >= info.vocab_size) {
        return Err(Error::Input(format!(
            "token id {bad} is outside the vocabulary (vocab_size {})",
            info.vocab_size
        )));
    }
    if req.prompt.len() >= info.max_context {
        return Err(Error::Input(format!(
            "the prompt has {} tokens; the model's context is {} tokens and must leave room for at least one generated token",
            req.prompt.len(),
            info.max_context
        )));
    }
    if !req.stop.is_empty() && opts.tokenizer.is_none() {
        return Err(Error::Input(
            "stop strings need a tokenizer (this scheduler has none)".into(),
        ));
    }
    if req.answer.is_some() && opts.tokenizer.is_none() {
        return Err(Error::Input(
            "a constrained answer (JSON mode, tool_choice) needs a tokenizer (this scheduler has none)".into(),
        ));
    }
    let limit = req.max_tokens.min(info.max_context - req.prompt.len());
    let pages = (req.prompt.len() + limit).div_ceil(PAGE_TOKENS);
    if pages > opts.kv_pages {
        return Err(Error::Input(format!(
            "the request needs {} KV cache pages (prompt {} + up to {limit} new tokens) but the cache has {}",
            pages,
            req.prompt.len(),
            opts.kv_pages
        )));
    }
    Ok(limit)
}

enum Command {
    Submit(
        Request,
        UnboundedSender<Event>,
        mpsc::Sender<Result<RequestId>>,
    ),
    Cancel(RequestId),
}

/// A submitted request: its id and its events.
pub struct Submission {
    pub id: RequestId,
    pub events: UnboundedReceiver<Event>,
}

/// A scheduler running on its own thread; cheap to clone, usable from any thread or task.
#[derive(Clone)]
pub struct SchedulerHandle {
    tx: mpsc::Sender<Command>,
    metrics: Arc<Mutex<Metrics>>,
    info: ModelInfo,
}

impl SchedulerHandle {
    /// Starts the engine thread: `load` builds the engine there (backends may bind resources
    /// to the thread that creates them). Returns once the engine is loaded, or its error.
    pub fn spawn<F>(load: F, opts: SchedulerOptions) -> Result<Self>
    where
        F: FnOnce() -> Result<Engine> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel::<Command>();
        let (ready_tx, ready_rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("r1-engine".into())
            .spawn(move || {
                let engine = match load() {
                    Ok(e) => e,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let sched = Scheduler::new(engine, opts);
                let _ = ready_tx.send(Ok((sched.metrics_handle(), sched.info.clone())));
                engine_loop(sched, rx);
            })
            .map_err(|e| Error::Backend {
                backend: "scheduler".into(),
                message: format!("cannot start the engine thread: {e}"),
            })?;
        let (metrics, info) = ready_rx.recv().map_err(|_| Error::Backend {
            backend: "scheduler".into(),
            message: "the engine thread died while loading".into(),
        })??;
        Ok(SchedulerHandle { tx, metrics, info })
    }

    /// Queues a request. Errors (bad input) come back here; after that everything arrives on
    /// the receiver. Dropping the receiver cancels the request.
    pub fn submit(&self, req: Request) -> Result<Submission> {
        let (etx, erx) = unbounded_channel();
        let (rtx, rrx) = mpsc::channel();
        let gone = || Error::Backend {
            backend: "scheduler".into(),
            message: "the engine thread has stopped".into(),
        };
        self.tx
            .send(Command::Submit(req, etx, rtx))
            .map_err(|_| gone())?;
        let id = rrx.recv().map_err(|_| gone())??;
        Ok(Submission { id, events: erx })
    }

    pub fn cancel(&self, id: RequestId) {
        let _ = self.tx.send(Command::Cancel(id));
    }

    pub fn metrics(&self) -> Metrics {
        self.metrics
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }
}

fn engine_loop(mut sched: Scheduler, rx: mpsc::Receiver<Command>) {
    let handle = |sched: &mut Scheduler, cmd: Command| match cmd {
        Command::Submit(req, events, reply) => {
            let _ = reply.send(sched.submit_with(req, events));
        }
        Command::Cancel(id) => sched.cancel(id),
    };
    loop {
        if !sched.has_work() {
            match rx.recv() {
                Ok(cmd) => handle(&mut sched, cmd),
                Err(_) => return, // every handle dropped and nothing left to do
            }
        }
        while let Ok(cmd) = rx.try_recv() {
            handle(&mut sched, cmd);
        }
        sched.step();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Constrained sampling draws from the request's distribution restricted to the allowed
    /// tokens, whether rejection sampling succeeds (most mass allowed) or falls back (little).
    #[test]
    fn constrained_sampling_follows_the_restricted_distribution() {
        let logits = [0.0f32, 1.0, 2.0, 3.0, -1.0];
        let p = SamplingParams {
            temperature: 1.0,
            top_p: 0.99,
            ..Default::default()
        };
        let full = crate::engine::sampling::distribution(&logits, &p);
        for allowed in [vec![0u32, 1, 2], vec![0, 4], vec![3]] {
            let mass: f64 = full
                .iter()
                .filter(|(t, _)| allowed.contains(t))
                .map(|(_, q)| q)
                .sum();
            let mut rng = Rng::new(11);
            let mut counts = [0usize; 5];
            let n = 100_000;
            for _ in 0..n {
                let t = constrained_sample(&logits, &p, &mut rng, |t| allowed.contains(&t));
                counts[t.unwrap() as usize] += 1;
            }
            for &(t, q) in &full {
                let want = if allowed.contains(&t) { q / mass } else { 0.0 };
                let got = counts[t as usize] as f64 / n as f64;
                assert!(
                    (got - want).abs() < 0.01,
                    "{allowed:?} token {t}: {got} vs {want}"
                );
            }
        }
        // Greedy: the best allowed token.
        let greedy = SamplingParams::default();
        let mut rng = Rng::new(1);
        assert_eq!(
            constrained_sample(&logits, &greedy, &mut rng, |t| t < 2),
            Some(1)
        );
        assert_eq!(
            constrained_sample(&logits, &greedy, &mut rng, |_| false),
            None
        );
    }
}
