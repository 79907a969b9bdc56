//! The endpoint handlers: request checks, prompt building, and turning scheduler events into
//! OpenAI responses (whole, or server-sent events).

use std::collections::hash_map::RandomState;
use std::convert::Infallible;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::Uri;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::{StreamExt, StreamMap};

use super::api::{ChatCompletionRequest, CommonParams, CompletionPrompt, CompletionRequest};
use super::error::ApiError;
use super::{unix_now, AppState};
use crate::chat::Tool;
use crate::chat::{Delta, OutputParser, RenderOptions, Thinking, ToolCallDelta};
use crate::engine::sampling::SamplingParams;
use crate::engine::scheduler::Submission;
use crate::engine::scheduler::{AnswerMode, Event, Finish, Request, StopReason};
use crate::text::constrained::{AnswerFormat, Schema};

type ApiResult<T> = std::result::Result<T, ApiError>;

/// Most choices (`n`) one request may ask for.
const MAX_CHOICES: usize = 16;

fn random_u64() -> u64 {
    let mut h = RandomState::new().build_hasher();
    h.write_u64(unix_now());
    h.finish()
}

fn random_id(prefix: &str) -> String {
    format!("{prefix}{:016x}{:08x}", random_u64(), random_u64() as u32)
}

/// Parses a JSON body, answering malformed input with a 400 in OpenAI's format.
fn parse_body<T: DeserializeOwned>(body: &Bytes) -> ApiResult<T> {
    serde_json::from_slice(body).map_err(|e| {
        let what = if e.is_syntax() || e.is_eof() {
            "the request body is not valid JSON"
        } else {
            "invalid request"
        };
        ApiError::invalid(format!("{what}: {e}"))
    })
}

fn check_model(state: &AppState, model: &str) -> ApiResult<()> {
    if model == state.options.model_name {
        Ok(())
    } else {
        Err(ApiError::unknown_model(model, &state.options.model_name))
    }
}

/// Sampling settings, stop strings and the token budget of a request.
fn build_request(
    state: &AppState,
    common: &CommonParams,
    prompt: Vec<u32>,
    default_max: usize,
) -> ApiResult<Request> {
    let temperature = common.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(
            ApiError::invalid(format!("temperature must be in [0, 2], got {temperature}"))
                .param("temperature"),
        );
    }
    let top_p = common.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(
            ApiError::invalid(format!("top_p must be in (0, 1], got {top_p}")).param("top_p"),
        );
    }
    let top_k = match common.top_k {
        None | Some(-1) | Some(0) => 0,
        Some(k) if k > 0 => k as usize,
        Some(k) => {
            return Err(
                ApiError::invalid(format!("top_k must be -1, 0 or positive, got {k}"))
                    .param("top_k"),
            )
        }
    };
    let requested = common
        .max_completion_tokens
        .or(common.max_tokens)
        .unwrap_or(default_max);
    let limit = state.options.max_tokens_limit;
    if requested == 0 || requested > limit {
        return Err(ApiError::invalid(format!(
            "max_tokens must be in [1, {limit}], got {requested}"
        ))
        .param("max_tokens"));
    }
    let context = state.scheduler.info().max_context;
    if prompt.len() >= context {
        return Err(ApiError::invalid(format!(
            "This model's maximum context length is {context} tokens; the prompt has {} tokens",
            prompt.len()
        ))
        .param("messages")
        .code("context_length_exceeded"));
    }
    let stop = common
        .stop
        .clone()
        .map(|s| s.into_vec())
        .unwrap_or_default();
    if stop.len() > 16 {
        return Err(ApiError::invalid("at most 16 stop sequences").param("stop"));
    }
    Ok(Request {
        max_tokens: requested.min(context - prompt.len()),
        prompt,
        sampling: SamplingParams {
            temperature,
            top_k,
            top_p,
            seed: common.seed.unwrap_or_else(random_u64),
            ignore_eos: common.ignore_eos,
        },
        stop,
        stop_token_ids: Vec::new(),
        answer: None,
    })
}

/// The functions a `tool_choice` forces the answer to call: None for "auto", "none" or no
/// tool_choice; every tool for "required"; the one named by `{"type": "function",
/// "function": {"name": ...}}`.
fn forced_tool_call(
    choice: Option<&Value>,
    tools: Option<&[Tool]>,
) -> ApiResult<Option<ForcedTools>> {
    let bad = |msg: String| Err(ApiError::invalid(msg).param("tool_choice"));
    let tools = tools.unwrap_or_default();
    match choice {
        None => Ok(None),
        Some(Value::String(s)) if s == "auto" || s == "none" => Ok(None),
        Some(Value::String(s)) if s == "required" => {
            if tools.is_empty() {
                bad("tool_choice \"required\" needs at least one tool in `tools`".into())
            } else {
                tools.iter().map(tool_grammar).collect::<ApiResult<_>>().map(Some)
            }
        }
        Some(v) => match v["function"]["name"].as_str() {
            Some(name) if v["type"] == "function" => {
                match tools.iter().find(|t| t.function.name == name) {
                    Some(t) => Ok(Some(vec![tool_grammar(t)?])),
                    None => bad(format!("tool_choice names `{name}`, which is not in `tools`")),
                }
            }
            _ => bad(format!(
                "tool_choice must be \"none\", \"auto\", \"required\" or {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}, got {v}"
            )),
        },
    }
}

/// The functions a forced call may name, each with the schema its arguments must match.
type ForcedTools = Vec<(String, Option<Arc<Schema>>)>;

/// A tool's name and, for a `strict` function, its compiled `parameters` schema (the
/// arguments of a forced call then conform to it; other tools' arguments are any JSON object).
fn tool_grammar(t: &Tool) -> ApiResult<(String, Option<Arc<Schema>>)> {
    let f = &t.function;
    let schema = match (&f.parameters, f.strict) {
        (Some(p), Some(true)) => Some(Schema::compile(p).map_err(|e| {
            ApiError::invalid(format!("tools: function `{}` parameters: {e}", f.name))
                .param("tools")
        })?),
        _ => None,
    };
    Ok((f.name.clone(), schema))
}

/// A `response_format` as an answer constraint: None for text.
fn answer_format(f: &super::api::ResponseFormat) -> ApiResult<Option<AnswerFormat>> {
    let bad = |msg: String| Err(ApiError::invalid(msg).param("response_format"));
    match f.kind.as_str() {
        "text" => Ok(None),
        "json_object" => Ok(Some(AnswerFormat::JsonObject)),
        "json_schema" => {
            let Some(schema) = f.json_schema.as_ref().and_then(|j| j.get("schema")) else {
                return bad("response_format json_schema needs `json_schema.schema`".into());
            };
            match Schema::compile(schema) {
                Ok(s) => Ok(Some(AnswerFormat::JsonSchema(s))),
                Err(e) => bad(format!("response_format json_schema: {e}")),
            }
        }
        other => bad(format!(
            "response_format type `{other}` is not supported (text, json_object or json_schema)"
        )),
    }
}

/// The number of choices asked for (`n`, 1 by default).
fn choice_count(common: &CommonParams) -> ApiResult<usize> {
    match common.n.unwrap_or(1) {
        n @ 1..=MAX_CHOICES => Ok(n),
        n => Err(ApiError::invalid(format!("n must be in [1, {MAX_CHOICES}], got {n}")).param("n")),
    }
}

/// Events of the `n` choices of one request, tagged with the choice index.
type ChoiceEvents = UnboundedReceiver<(usize, Event)>;

/// Submits the `n` choices of `request` (choice i samples with seed + i) and merges their
/// events. Choice 0 goes first; the others once its first event arrives, when its prompt is in
/// the KV cache: they fork it through the prefix cache instead of prefilling it again.
/// Dropping the receiver cancels every choice.
fn submit_choices(state: &Arc<AppState>, request: Request, n: usize) -> ApiResult<ChoiceEvents> {
    let choice = |i: usize| {
        let mut r = request.clone();
        r.sampling.seed = r.sampling.seed.wrapping_add(i as u64);
        r
    };
    let Submission { events, .. } = state.scheduler.submit(choice(0))?;
    let (tx, rx) = unbounded_channel();
    let mut streams = StreamMap::new();
    streams.insert(0, UnboundedReceiverStream::new(events));
    let mut later: Vec<Request> = (1..n).map(choice).collect();
    let state = Arc::clone(state);
    tokio::spawn(async move {
        loop {
            let next = tokio::select! {
                next = streams.next() => next,
                _ = tx.closed() => return,
            };
            // Every choice has sent its last event.
            let Some((i, event)) = next else { return };
            if i == 0 && !matches!(event, Event::Error(_)) {
                for (c, req) in later.drain(..).enumerate() {
                    match state.scheduler.submit(req) {
                        Ok(sub) => {
                            streams.insert(c + 1, UnboundedReceiverStream::new(sub.events));
                        }
                        Err(e) => {
                            let _ = tx.send((c + 1, Event::Error(e.to_string())));
                        }
                    }
                }
            }
            if tx.send((i, event)).is_err() {
                return;
            }
        }
    });
    Ok(rx)
}

fn finish_reason(reason: StopReason, tool_calls: bool) -> &'static str {
    match reason {
        StopReason::Length => "length",
        _ if tool_calls => "tool_calls",
        _ => "stop",
    }
}

/// Usage of a request's choices: the prompt counted once (as the first choice saw it), the
/// completions summed.
fn usage(finishes: &[Finish], reasoning_tokens: usize) -> Value {
    let (prompt, cached) = finishes
        .first()
        .map_or((0, 0), |f| (f.prompt_tokens, f.cached_tokens));
    let completion: usize = finishes.iter().map(|f| f.tokens.len()).sum();
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
        "completion_tokens_details": {"reasoning_tokens": reasoning_tokens},
        "prompt_cache_hit_tokens": cached,
        "prompt_cache_miss_tokens": prompt - cached,
    })
}

/// Waits for every choice: (per-choice callback on each event), then the finishes in order.
async fn collect_choices(
    events: &mut ChoiceEvents,
    n: usize,
    mut on_text: impl FnMut(usize, &str, bool),
) -> ApiResult<Vec<Finish>> {
    let mut finishes: Vec<Option<Finish>> = (0..n).map(|_| None).collect();
    let mut left = n;
    while left > 0 {
        match events.recv().await {
            Some((i, Event::Token { text, .. })) => on_text(i, &text, false),
            Some((i, Event::Finished(f))) => {
                on_text(i, &f.text, true);
                finishes[i] = Some(f);
                left -= 1;
            }
            Some((_, Event::Error(e))) => return Err(engine_error(e)),
            None => return Err(ApiError::unavailable("the engine stopped")),
        }
    }
    Ok(finishes.into_iter().flatten().collect())
}

/// Scheduler events to chat deltas, counting reasoning tokens.
struct ChatOutput {
    parser: OutputParser,
    reasoning_tokens: usize,
}

impl ChatOutput {
    fn token(&mut self, text: &str) -> Delta {
        if self.parser.in_reasoning() {
            self.reasoning_tokens += 1;
        }
        self.parser.push(text)
    }

    fn finish(&mut self, text: &str) -> Delta {
        let mut d = self.parser.push(text);
        let end = self.parser.finish();
        d.reasoning.push_str(&end.reasoning);
        d.content.push_str(&end.content);
        d.tool_calls.extend(end.tool_calls);
        d
    }
}

fn engine_error(message: String) -> ApiError {
    if message == "cancelled" {
        ApiError::unavailable("the request was cancelled")
    } else {
        ApiError::internal(message)
    }
}

pub async fn chat_completions(State(state): State<Arc<AppState>>, body: Bytes) -> Response {
    match chat_inner(state, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn chat_inner(state: Arc<AppState>, body: Bytes) -> ApiResult<Response> {
    let req: ChatCompletionRequest = parse_body(&body)?;
    check_model(&state, &req.model)?;
    if req.messages.is_empty() {
        return Err(ApiError::invalid("messages must not be empty").param("messages"));
    }
    if let Some(i) = req
        .messages
        .iter()
        .position(|m| m.reasoning_content.is_some())
    {
        return Err(ApiError::invalid(format!(
            "messages[{i}] carries `reasoning_content`: remove the reasoning of earlier turns before sending them back"
        ))
        .param("messages")
        .code("invalid_request_error"));
    }
    if req.logprobs == Some(true) || req.top_logprobs.is_some() {
        return Err(
            ApiError::invalid("logprobs are not supported by this model")
                .param("logprobs")
                .code("unsupported_parameter"),
        );
    }
    let response_format = match &req.response_format {
        None => None,
        Some(f) => answer_format(f)?,
    };
    let tools_off = matches!(&req.tool_choice, Some(Value::String(s)) if s == "none");
    let tools = req.tools.as_deref().filter(|t| !t.is_empty() && !tools_off);
    let forced_call = forced_tool_call(req.tool_choice.as_ref(), tools)?;
    if response_format.is_some() && forced_call.is_some() {
        return Err(ApiError::invalid(
            "a JSON response_format and a tool_choice that forces a call cannot be combined",
        )
        .param("tool_choice"));
    }
    let options = RenderOptions {
        tools,
        add_generation_prompt: true,
        thinking: if req.thinking == Some(true) {
            Thinking::Force
        } else {
            Thinking::Auto
        },
    };
    let prompt = state.chat.prompt(&req.messages, &options)?;
    let mut request = build_request(
        &state,
        &req.common,
        prompt.ids,
        state.options.default_max_tokens,
    )?;
    let format = match forced_call {
        Some(tools) => Some(AnswerFormat::ToolCall { tools }),
        None => response_format,
    };
    request.answer = format.map(|format| AnswerMode {
        format,
        in_reasoning: prompt.in_reasoning,
    });
    let id = random_id("chatcmpl-");
    let n = choice_count(&req.common)?;
    let outputs: Vec<ChatOutput> = (0..n)
        .map(|_| {
            let call_prefix = format!("{:08x}", random_u64() as u32);
            ChatOutput {
                parser: OutputParser::new(prompt.in_reasoning, tools.map(|_| call_prefix.as_str())),
                reasoning_tokens: 0,
            }
        })
        .collect();
    let events = submit_choices(&state, request, n)?;
    let include_usage = req
        .common
        .stream_options
        .as_ref()
        .is_some_and(|o| o.include_usage);
    let meta = Meta {
        id,
        model: state.options.model_name.clone(),
        created: unix_now(),
    };
    if req.common.stream {
        Ok(stream_chat(meta, events, outputs, include_usage).into_response())
    } else {
        whole_chat(meta, events, outputs).await
    }
}

struct Meta {
    id: String,
    model: String,
    created: u64,
}

async fn whole_chat(
    meta: Meta,
    mut events: ChoiceEvents,
    mut outs: Vec<ChatOutput>,
) -> ApiResult<Response> {
    let finishes = collect_choices(&mut events, outs.len(), |i, text, last| {
        if last {
            outs[i].finish(text);
        } else {
            outs[i].token(text);
        }
    })
    .await?;
    let choices: Vec<Value> = outs
        .iter()
        .zip(&finishes)
        .enumerate()
        .map(|(i, (out, finish))| {
            let parsed = out.parser.parsed().clone();
            let has_calls = !parsed.tool_calls.is_empty();
            let mut message = json!({
                "role": "assistant",
                "content": if has_calls && parsed.content.is_empty() { Value::Null } else { parsed.content.into() },
                "reasoning_content": parsed.reasoning,
            });
            if has_calls {
                message["tool_calls"] =
                    serde_json::to_value(&parsed.tool_calls).unwrap_or(Value::Null);
            }
            json!({
                "index": i,
                "message": message,
                "logprobs": null,
                "finish_reason": finish_reason(finish.reason, has_calls),
            })
        })
        .collect();
    let reasoning = outs.iter().map(|o| o.reasoning_tokens).sum();
    let body = json!({
        "id": meta.id,
        "object": "chat.completion",
        "created": meta.created,
        "model": meta.model,
        "system_fingerprint": concat!("r1-runtime-", env!("CARGO_PKG_VERSION")),
        "choices": choices,
        "usage": usage(&finishes, reasoning),
    });
    Ok(Json(body).into_response())
}

fn tool_call_json(d: &ToolCallDelta) -> Value {
    let mut v = json!({"index": d.index, "function": {"arguments": d.arguments}});
    if let Some(id) = &d.id {
        v["id"] = id.clone().into();
        v["type"] = "function".into();
    }
    if let Some(name) = &d.name {
        v["function"]["name"] = name.clone().into();
    }
    v
}

fn chunk(meta: &Meta, object: &str, choice: Value) -> SseEvent {
    let v = json!({
        "id": meta.id,
        "object": object,
        "created": meta.created,
        "model": meta.model,
        "system_fingerprint": concat!("r1-runtime-", env!("CARGO_PKG_VERSION")),
        "choices": [choice],
    });
    SseEvent::default().data(v.to_string())
}

/// The streamed usage chunk (no choices) once every choice has finished; `finishes` in the
/// order they finished, tagged with their choice index.
fn usage_chunk(
    meta: &Meta,
    object: &str,
    mut finishes: Vec<(usize, Finish)>,
    reasoning_tokens: usize,
) -> SseEvent {
    finishes.sort_by_key(|(i, _)| *i);
    let finishes: Vec<Finish> = finishes.into_iter().map(|(_, f)| f).collect();
    let v = json!({
        "id": meta.id,
        "object": object,
        "created": meta.created,
        "model": meta.model,
        "choices": [],
        "usage": usage(&finishes, reasoning_tokens),
    });
    SseEvent::default().data(v.to_string())
}

fn delta_json(d: &Delta) -> Value {
    let mut v = json!({
        "content": if d.content.is_empty() { Value::Null } else { d.content.clone().into() },
        "reasoning_content": if d.reasoning.is_empty() { Value::Null } else { d.reasoning.clone().into() },
    });
    if !d.tool_calls.is_empty() {
        v["tool_calls"] = d.tool_calls.iter().map(tool_call_json).collect();
    }
    v
}

type SseSender = UnboundedSender<Result<SseEvent, Infallible>>;

/// Streams a chat completion (each chunk carries one choice's delta, tagged with its index).
/// A task forwards scheduler events as SSE chunks; when the client goes away the stream is
/// dropped, the task stops, and dropping its receiver cancels the choices in the scheduler
/// (their cache pages are freed).
fn stream_chat(
    meta: Meta,
    mut events: ChoiceEvents,
    mut outs: Vec<ChatOutput>,
    include_usage: bool,
) -> impl IntoResponse {
    let (tx, rx): (SseSender, _) = unbounded_channel();
    tokio::spawn(async move {
        let object = "chat.completion.chunk";
        let n = outs.len();
        for i in 0..n {
            let first = json!({
                "index": i,
                "delta": {"role": "assistant", "content": "", "reasoning_content": null},
                "logprobs": null,
                "finish_reason": null,
            });
            if tx.send(Ok(chunk(&meta, object, first))).is_err() {
                return;
            }
        }
        let mut calls = vec![false; n];
        let mut finishes = Vec::with_capacity(n);
        loop {
            let ev = tokio::select! {
                ev = events.recv() => ev,
                _ = tx.closed() => return,
            };
            match ev {
                Some((i, Event::Token { text, .. })) => {
                    let d = outs[i].token(&text);
                    if d.is_empty() {
                        continue;
                    }
                    calls[i] |= !d.tool_calls.is_empty();
                    let c = json!({"index": i, "delta": delta_json(&d), "logprobs": null, "finish_reason": null});
                    if tx.send(Ok(chunk(&meta, object, c))).is_err() {
                        return;
                    }
                }
                Some((i, Event::Finished(f))) => {
                    let d = outs[i].finish(&f.text);
                    calls[i] |= !d.tool_calls.is_empty();
                    if !d.is_empty() {
                        let c = json!({"index": i, "delta": delta_json(&d), "logprobs": null, "finish_reason": null});
                        let _ = tx.send(Ok(chunk(&meta, object, c)));
                    }
                    let c = json!({
                        "index": i,
                        "delta": {},
                        "logprobs": null,
                        "finish_reason": finish_reason(f.reason, calls[i]),
                    });
                    let _ = tx.send(Ok(chunk(&meta, object, c)));
                    finishes.push((i, f));
                    if finishes.len() < n {
                        continue;
                    }
                    if include_usage {
                        let reasoning = outs.iter().map(|o| o.reasoning_tokens).sum();
                        let _ = tx.send(Ok(usage_chunk(&meta, object, finishes, reasoning)));
                    }
                    let _ = tx.send(Ok(SseEvent::default().data("[DONE]")));
                    return;
                }
                Some((_, Event::Error(e))) => {
                    let _ = tx.send(Ok(
                        SseEvent::default().data(engine_error(e).body().to_string())
                    ));
                    let _ = tx.send(Ok(SseEvent::default().data("[DONE]")));
                    return;
                }
                None => return,
            }
        }
    });
    Sse::new(UnboundedReceiverStream::new(rx)).keep_alive(KeepAlive::default())
}

pub async fn completions(State(state): State<Arc<AppState>>, body: Bytes) -> Response {
    match completions_inner(state, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn completions_inner(state: Arc<AppState>, body: Bytes) -> ApiResult<Response> {
    let req: CompletionRequest = parse_body(&body)?;
    check_model(&state, &req.model)?;
    if req.logprobs.as_ref().is_some_and(|v| !v.is_null()) {
        return Err(
            ApiError::invalid("logprobs are not supported by this model")
                .param("logprobs")
                .code("unsupported_parameter"),
        );
    }
    if req.echo == Some(true) {
        return Err(ApiError::invalid("echo is not supported").param("echo"));
    }
    if req.suffix.is_some() {
        return Err(ApiError::invalid("suffix is not supported").param("suffix"));
    }
    if req.best_of.is_some_and(|b| b != 1) {
        return Err(ApiError::invalid("only best_of = 1 is supported").param("best_of"));
    }
    let one = |n: usize| {
        if n == 1 {
            Ok(())
        } else {
            Err(ApiError::invalid("exactly one prompt per request is supported").param("prompt"))
        }
    };
    let mut ids = match req.prompt {
        CompletionPrompt::Text(t) => state.chat.tokenizer.encode(&t)?,
        CompletionPrompt::Texts(v) => {
            one(v.len())?;
            state.chat.tokenizer.encode(&v[0])?
        }
        CompletionPrompt::Tokens(t) => t,
        CompletionPrompt::TokenLists(v) => {
            one(v.len())?;
            v.into_iter().next().unwrap_or_default()
        }
    };
    if let Some(bos) = state.bos_token_id {
        if ids.first() != Some(&bos) {
            ids.insert(0, bos);
        }
    }
    let request = build_request(&state, &req.common, ids, 16)?;
    let n = choice_count(&req.common)?;
    let mut events = submit_choices(&state, request, n)?;
    let meta = Meta {
        id: random_id("cmpl-"),
        model: state.options.model_name.clone(),
        created: unix_now(),
    };
    let include_usage = req
        .common
        .stream_options
        .as_ref()
        .is_some_and(|o| o.include_usage);
    if !req.common.stream {
        let mut texts = vec![String::new(); n];
        let finishes =
            collect_choices(&mut events, n, |i, text, _| texts[i].push_str(text)).await?;
        let choices: Vec<Value> = texts
            .into_iter()
            .zip(&finishes)
            .enumerate()
            .map(|(i, (text, f))| {
                json!({
                    "text": text,
                    "index": i,
                    "logprobs": null,
                    "finish_reason": finish_reason(f.reason, false),
                })
            })
            .collect();
        return Ok(Json(json!({
            "id": meta.id,
            "object": "text_completion",
            "created": meta.created,
            "model": meta.model,
            "choices": choices,
            "usage": usage(&finishes, 0),
        }))
        .into_response());
    }
    let (tx, rx): (SseSender, _) = unbounded_channel();
    tokio::spawn(async move {
        let object = "text_completion";
        let piece = |i: usize, text: &str, finish: Option<&str>| json!({"text": text, "index": i, "logprobs": null, "finish_reason": finish});
        let mut finishes = Vec::with_capacity(n);
        loop {
            let ev = tokio::select! {
                ev = events.recv() => ev,
                _ = tx.closed() => return,
            };
            match ev {
                Some((i, Event::Token { text, .. })) => {
                    if !text.is_empty()
                        && tx
                            .send(Ok(chunk(&meta, object, piece(i, &text, None))))
                            .is_err()
                    {
                        return;
                    }
                }
                Some((i, Event::Finished(f))) => {
                    let reason = finish_reason(f.reason, false);
                    let _ = tx.send(Ok(chunk(&meta, object, piece(i, &f.text, Some(reason)))));
                    finishes.push((i, f));
                    if finishes.len() < n {
                        continue;
                    }
                    if include_usage {
                        let _ = tx.send(Ok(usage_chunk(&meta, object, finishes, 0)));
                    }
                    let _ = tx.send(Ok(SseEvent::default().data("[DONE]")));
                    return;
                }
                Some((_, Event::Error(e))) => {
                    let _ = tx.send(Ok(
                        SseEvent::default().data(engine_error(e).body().to_string())
                    ));
                    let _ = tx.send(Ok(SseEvent::default().data("[DONE]")));
                    return;
                }
                None => return,
            }
        }
    });
    Ok(Sse::new(UnboundedReceiverStream::new(rx))
        .keep_alive(KeepAlive::default())
        .into_response())
}

pub async fn models(State(state): State<Arc<AppState>>) -> Response {
    let info = state.scheduler.info();
    Json(json!({
        "object": "list",
        "data": [{
            "id": state.options.model_name,
            "object": "model",
            "created": state.created,
            "owned_by": "r1-runtime",
            "max_model_len": info.max_context,
        }],
    }))
    .into_response()
}

pub async fn health(State(state): State<Arc<AppState>>) -> Response {
    Json(json!({
        "status": "ok",
        "model": state.options.model_name,
        "uptime_s": state.started.elapsed().as_secs(),
    }))
    .into_response()
}

pub async fn fallback(uri: Uri) -> Response {
    ApiError::not_found(uri.path()).into_response()
}
