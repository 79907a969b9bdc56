//! A request's output: generated tokens decoded to text, stop tokens and stop strings,
//! constrained answers completing, the length limit, and the events that carry it all.

use std::time::Duration;

use super::{Running, Scheduler};
use crate::text::constrained::AnswerConstraint;

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

impl Scheduler {
    /// Appends `token` to request `i`'s output and streams it; returns the request's finish
    /// when it is done.
    pub(super) fn emit(&mut self, i: usize, token: u32) -> Option<Finish> {
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
        let text = match r.decoder.as_mut().map(|d| d.step(token)) {
            Some(Ok(t)) => t,
            Some(Err(e)) => {
                let _ = r.events.send(Event::Error(e.to_string()));
                r.cancelled = true;
                return None;
            }
            None => String::new(),
        };
        let (text, stopped) = r.stops.push(text);
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
}

impl Running {
    /// Text still held back (incomplete characters, stop-string prefixes).
    pub(super) fn flush_text(&mut self) -> String {
        let rest = match self.decoder.as_mut() {
            Some(d) => d.finish().unwrap_or_default(),
            None => String::new(),
        };
        self.stops.finish(&rest)
    }

    pub(super) fn finish(&mut self, reason: StopReason, text: String) -> Finish {
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
