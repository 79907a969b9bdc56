//! Continuous batching over [`Engine::forward_batch_with`]: requests join and leave the running
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
//! running request's prompt (the same system prompt arriving many times at once). Multi-turn
//! chats, repeated prompts and common system prompts hit; least recently used entries are
//! evicted when the budget or the KV capacity needs room.
//!
//! The parts: the step loop (here: admission, the batched forward step, drafts, sampling),
//! `request` (requests and their checks), `pages` (page budget and pre-emption),
//! `prefix_cache`, `output` (decoding, stops, events), `metrics`, and `handle` (the engine
//! thread).

mod handle;
mod metrics;
mod output;
mod pages;
mod prefix_cache;
mod request;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

pub use handle::{SchedulerHandle, Submission};
pub use metrics::{Histogram, Metrics, LATENCY_BUCKETS};
pub use output::{Event, Finish, StopReason};
pub use request::{AnswerMode, Request, RequestId};

use super::speculative::{judge, DraftRequest, Drafter, MtpDrafter, Verified};
use super::{Engine, Forward, Readback, Sequence, Step};
use crate::error::Result;
use crate::kv_cache::PAGE_TOKENS;
use crate::numerics::sampling::draw_allowed;
use crate::text::constrained::AnswerConstraint;
use crate::text::{IncrementalDecoder, StopStrings, TokenBytes, Tokenizer};
use prefix_cache::CachedSeq;
use request::validate;

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
    decoder: Option<IncrementalDecoder>,
    /// The request's stop strings over the decoded text.
    stops: StopStrings,
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
    drafts: Vec<u32>,
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
        let context = req.prompt.clone();
        let stops = StopStrings::new(req.stop.clone());
        self.waiting.push_back(Running {
            id,
            req,
            limit,
            seq: Sequence::default(),
            context,
            prefilled: 0,
            cached: 0,
            generated: Vec::new(),
            decoder,
            stops,
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
                    .chain(drafts.iter().copied())
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
        // Hidden states when a member speculates (the drafter's input).
        let hidden = inputs
            .iter()
            .any(|&(i, _, _)| self.running[i].spec.is_some());
        let bases: Vec<usize> = members.iter().map(|&i| self.running[i].seq.len()).collect();
        let result = {
            let mut steps: Vec<Step<'_>> = Vec::with_capacity(inputs.len());
            let mut reads: Vec<Readback<'_>> = Vec::with_capacity(inputs.len());
            let running = self
                .running
                .iter_mut()
                .enumerate()
                .filter(|(i, _)| members.contains(i));
            for ((_, r), (_, tokens, rows)) in running.zip(&inputs) {
                let Running {
                    seq, req, answer, ..
                } = r;
                // A drawn token for every row; its logits too where an answer constraint may
                // refuse the draw.
                reads.push(Readback {
                    rows: *rows,
                    sample: Some(&req.sampling),
                    logits: answer.as_ref().is_some_and(|c| c.active()),
                });
                steps.push(Step { seq, tokens });
            }
            self.engine.forward_batch_with(&mut steps, &reads, hidden)
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
                    self.advance(i, &out)
                }
                Some(spec) => {
                    let drafts = std::mem::take(&mut spec.drafts);
                    let (accepted, bonus) = judge(&drafts, &out.tokens);
                    let emitted: Vec<u32> =
                        drafts[..accepted].iter().copied().chain([bonus]).collect();
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

    /// Emits request `i`'s next token, drawn by the backend in `out` (or, where an answer
    /// constraint refuses it, drawn again among the tokens it allows, with the same draw, from
    /// the logits read back for it); returns its finish when it is done.
    fn advance(&mut self, i: usize, out: &Forward) -> Option<Finish> {
        let eos = &self.info.eos_token_ids;
        let r = &mut self.running[i];
        // The engine returns one drawn token per row asked.
        let own = out.tokens[0];
        let token = match &r.answer {
            Some(c) if c.active() && !c.allows(own) => {
                // Fixed text (markup) continues with its own tokens, anything else with a
                // constrained draw at the same position.
                let draw = r.req.sampling.draw(r.seq.len() as u64);
                c.forced()
                    .or_else(|| draw_allowed(&out.logits, &draw, |t| c.allows(t)))
                    .unwrap_or_else(|| eos.first().copied().unwrap_or(0))
            }
            _ => own,
        };
        self.emit(i, token)
    }

    /// Steps until every request has finished.
    pub fn run_until_idle(&mut self) {
        while self.step() {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::EngineOptions;

    /// A scheduler over the committed r1-heads fixture (CPU, exact, no MTP layer).
    pub(super) fn fixture_scheduler(kv_pages: usize, prefix_cache_pages: usize) -> Scheduler {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/r1-heads");
        let opts = EngineOptions {
            with_mtp: false,
            ..EngineOptions::default()
        };
        let engine = Engine::load(&dir, &opts).expect("fixture loads");
        Scheduler::new(
            engine,
            SchedulerOptions {
                kv_pages,
                prefix_cache_pages,
                ..SchedulerOptions::default()
            },
        )
    }

    /// A deterministic prompt (the fixture's vocabulary is 512; eos is 1); different seeds
    /// differ in their first token.
    pub(super) fn prompt(seed: usize, len: usize) -> Vec<u32> {
        (0..len)
            .map(|j| ((seed * 131 + j * 29 + 7) % 500 + 2) as u32)
            .collect()
    }

    /// Runs one request to its end.
    pub(super) fn run(s: &mut Scheduler, req: Request) -> Finish {
        let (_, mut rx) = s.submit(req).expect("request accepted");
        s.run_until_idle();
        finished(&mut rx)
    }

    /// The finish of an ended request.
    pub(super) fn finished(rx: &mut UnboundedReceiver<Event>) -> Finish {
        loop {
            match rx.try_recv().expect("the request ended with an event") {
                Event::Token { .. } => {}
                Event::Finished(f) => return f,
                Event::Error(e) => panic!("request failed: {e}"),
            }
        }
    }
}
