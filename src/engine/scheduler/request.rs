//! Requests as the scheduler takes them, and their validation against the model.

use super::{ModelInfo, SchedulerOptions};
use crate::engine::sampling::SamplingParams;
use crate::error::{Error, Result};
use crate::kv_cache::PAGE_TOKENS;
use crate::text::constrained::AnswerFormat;

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

/// Checks a request against the model; returns its effective token limit.
pub(super) fn validate(info: &ModelInfo, opts: &SchedulerOptions, req: &Request) -> Result<usize> {
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
