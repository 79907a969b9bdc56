//! The OpenAI-compatible server on a tiny random checkpoint with DeepSeek's real vocabulary
//! (generated here; outputs are gibberish, the protocol is what is tested): response shapes,
//! streaming == whole, deepseek-reasoner rules, error statuses, 16 concurrent streams equal to
//! solo runs, a mid-stream disconnect freeing its pages, metrics.

mod chat_support;
mod server_support;

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use server_support::{open_stream, request, TestServer, MODEL};

const CONTEXT: usize = 4096;

fn server() -> Option<(tempfile::TempDir, TestServer)> {
    let (tmp, dir) = server_support::checkpoint(CONTEXT, false)?;
    let s = TestServer::start(&dir);
    Some((tmp, s))
}

fn chat_body(user: &str, max_tokens: usize) -> Value {
    json!({
        "model": MODEL,
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": user}
        ],
        "max_tokens": max_tokens,
        "temperature": 0,
    })
}

/// Assembles a streamed chat completion: (reasoning, content, finish_reason, usage).
fn assemble(data: &[String]) -> (String, String, String, Option<Value>) {
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{data:?}");
    let (mut reasoning, mut content, mut finish, mut usage) =
        (String::new(), String::new(), String::new(), None);
    for d in &data[..data.len() - 1] {
        let v: Value = serde_json::from_str(d).unwrap();
        assert_eq!(v["object"], "chat.completion.chunk");
        if let Some(u) = v.get("usage") {
            usage = Some(u.clone());
        }
        let Some(choice) = v["choices"].get(0) else {
            continue;
        };
        if let Some(r) = choice["delta"]["reasoning_content"].as_str() {
            reasoning.push_str(r);
        }
        if let Some(c) = choice["delta"]["content"].as_str() {
            content.push_str(c);
        }
        if let Some(f) = choice["finish_reason"].as_str() {
            finish = f.to_string();
        }
    }
    (reasoning, content, finish, usage)
}

#[test]
fn health_models_metrics() {
    let Some((_tmp, s)) = server() else { return };
    let r = s.get("/health");
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["status"], "ok");
    let m = s.get("/v1/models").json();
    assert_eq!(m["object"], "list");
    assert_eq!(m["data"][0]["id"], MODEL);
    assert_eq!(m["data"][0]["max_model_len"], CONTEXT);
    let r = s.get("/metrics");
    assert_eq!(r.status, 200);
    assert!(r.header("content-type").unwrap().starts_with("text/plain"));
    for name in [
        "r1_requests_waiting",
        "r1_requests_running",
        "r1_generation_tokens_per_second",
        "r1_kv_cache_pages_in_use",
    ] {
        assert!(r.body.contains(&format!("# TYPE {name} gauge")), "{name}");
        assert!(
            r.body.contains(&format!("{name}{{model=\"{MODEL}\"}} ")),
            "{name}"
        );
    }
    for name in ["r1_preemptions_total", "r1_prefix_cache_hit_tokens_total"] {
        assert!(r.body.contains(&format!("# TYPE {name} counter")), "{name}");
    }
    let r = s.get("/v1/nothing");
    assert_eq!(r.status, 404);
    assert!(r.json()["error"]["message"].is_string());
}

#[test]
fn chat_completion_whole_and_streamed_agree() {
    let Some((_tmp, s)) = server() else { return };
    for thinking in [false, true] {
        let mut body = chat_body("Say something.", 12);
        body["thinking"] = json!(thinking);
        let r = s.post_json("/v1/chat/completions", &body);
        assert_eq!(r.status, 200, "{}", r.body);
        let v = r.json();
        assert_eq!(v["object"], "chat.completion");
        assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
        assert_eq!(v["model"], MODEL);
        let msg = &v["choices"][0]["message"];
        assert_eq!(msg["role"], "assistant");
        let (reasoning, content) = (
            msg["reasoning_content"].as_str().unwrap().to_string(),
            msg["content"].as_str().unwrap().to_string(),
        );
        let u = &v["usage"];
        let completion = u["completion_tokens"].as_u64().unwrap();
        assert!((1..=12).contains(&completion));
        let prompt = u["prompt_tokens"].as_u64().unwrap();
        assert_eq!(u["total_tokens"].as_u64().unwrap(), prompt + completion);
        let hit = u["prompt_cache_hit_tokens"].as_u64().unwrap();
        assert_eq!(
            u["prompt_cache_miss_tokens"].as_u64().unwrap(),
            prompt - hit
        );
        assert_eq!(
            u["prompt_tokens_details"]["cached_tokens"]
                .as_u64()
                .unwrap(),
            hit
        );
        let reasoning_tokens = u["completion_tokens_details"]["reasoning_tokens"]
            .as_u64()
            .unwrap();
        let finish = v["choices"][0]["finish_reason"]
            .as_str()
            .unwrap()
            .to_string();
        if thinking {
            // Forced thinking: gibberish never closes </think>, so it is all reasoning.
            assert_eq!(reasoning_tokens, completion);
            assert!(content.is_empty());
        } else {
            assert_eq!(reasoning_tokens, 0);
            assert!(reasoning.is_empty());
        }

        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
        let r = s.post_json("/v1/chat/completions", &body);
        assert_eq!(r.status, 200);
        assert!(r
            .header("content-type")
            .unwrap()
            .starts_with("text/event-stream"));
        let (sr, sc, sf, su) = assemble(&r.sse_data());
        assert_eq!(sr, reasoning, "streamed reasoning == whole");
        assert_eq!(sc, content, "streamed content == whole");
        assert_eq!(sf, finish);
        // Equal usage, up to prefix-cache hits (the repeat may reuse the first one's cache).
        let su = su.unwrap();
        for k in [
            "prompt_tokens",
            "completion_tokens",
            "completion_tokens_details",
        ] {
            assert_eq!(su[k], u[k], "{k}");
        }
    }
    s.wait_idle();
}

#[test]
fn completions_endpoint() {
    let Some((_tmp, s)) = server() else { return };
    let body = json!({"model": MODEL, "prompt": "The capital of France is", "max_tokens": 5, "temperature": 0});
    let r = s.post_json("/v1/completions", &body);
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(v["object"], "text_completion");
    let text = v["choices"][0]["text"].as_str().unwrap().to_string();
    assert!(v["usage"]["completion_tokens"].as_u64().unwrap() <= 5);
    let mut sb = body.clone();
    sb["stream"] = json!(true);
    let r = s.post_json("/v1/completions", &sb);
    let data = r.sse_data();
    assert_eq!(data.last().unwrap(), "[DONE]");
    let streamed: String = data[..data.len() - 1]
        .iter()
        .map(|d| {
            serde_json::from_str::<Value>(d).unwrap()["choices"][0]["text"]
                .as_str()
                .unwrap_or("")
                .to_string()
        })
        .collect();
    assert_eq!(streamed, text);
    // Token-id prompts work too.
    let r = s.post_json(
        "/v1/completions",
        &json!({"model": MODEL, "prompt": [0, 100, 200], "max_tokens": 2}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
}

fn assert_error(r: &server_support::Response, status: u16) -> Value {
    assert_eq!(r.status, status, "{}", r.body);
    let v = r.json();
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{v}"
    );
    assert!(v["error"]["type"].is_string(), "{v}");
    v
}

#[test]
fn bad_requests_get_openai_errors_and_the_server_keeps_serving() {
    let Some((_tmp, s)) = server() else { return };
    // deepseek-reasoner: reasoning_content must not be sent back.
    let mut body = chat_body("hi", 4);
    body["messages"] = json!([
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello", "reasoning_content": "thought"},
        {"role": "user", "content": "again"}
    ]);
    let v = assert_error(&s.post_json("/v1/chat/completions", &body), 400);
    assert_eq!(v["error"]["type"], "invalid_request_error");
    // Malformed JSON.
    assert_error(&s.post("/v1/chat/completions", "{\"model\": "), 400);
    assert_error(&s.post("/v1/completions", "not json"), 400);
    // Missing fields, bad role.
    assert_error(
        &s.post_json("/v1/chat/completions", &json!({"model": MODEL})),
        400,
    );
    let mut b = chat_body("x", 4);
    b["messages"][0]["role"] = json!("wizard");
    assert_error(&s.post_json("/v1/chat/completions", &b), 400);
    // Unknown model.
    let mut b = chat_body("x", 4);
    b["model"] = json!("gpt-5");
    let v = assert_error(&s.post_json("/v1/chat/completions", &b), 404);
    assert_eq!(v["error"]["code"], "model_not_found");
    // Prompt longer than the context.
    let long = "word ".repeat(CONTEXT + 100);
    let v = assert_error(
        &s.post_json("/v1/chat/completions", &chat_body(&long, 4)),
        400,
    );
    assert_eq!(v["error"]["code"], "context_length_exceeded");
    // logprobs are not supported.
    let mut b = chat_body("x", 4);
    b["logprobs"] = json!(true);
    assert_error(&s.post_json("/v1/chat/completions", &b), 400);
    let b = json!({"model": MODEL, "prompt": "x", "logprobs": 3});
    assert_error(&s.post_json("/v1/completions", &b), 400);
    // Limits: max_tokens above 64K, n outside [1, 16], bad temperature.
    assert_error(
        &s.post_json("/v1/chat/completions", &chat_body("x", 65537)),
        400,
    );
    for n in [0, 17] {
        let mut b = chat_body("x", 4);
        b["n"] = json!(n);
        let e = assert_error(&s.post_json("/v1/chat/completions", &b), 400);
        assert_eq!(e["error"]["param"], "n");
    }
    let mut b = chat_body("x", 4);
    b["temperature"] = json!(3.5);
    assert_error(&s.post_json("/v1/chat/completions", &b), 400);
    // Still serving.
    assert_eq!(s.get("/health").status, 200);
    let r = s.post_json("/v1/chat/completions", &chat_body("ok?", 3));
    assert_eq!(r.status, 200, "{}", r.body);
    // max_tokens up to 64K is accepted and capped by the context.
    let r = s.post_json("/v1/chat/completions", &chat_body("ok?", 65536));
    assert_eq!(r.status, 200, "{}", r.body);
    let m = s.wait_idle();
    assert_eq!(m.kv_pages_in_use, 0);
}

#[test]
fn stop_strings_end_generation() {
    let Some((_tmp, s)) = server() else { return };
    let body = json!({"model": MODEL, "prompt": "Once upon", "max_tokens": 24, "temperature": 0});
    let text = s.post_json("/v1/completions", &body).json()["choices"][0]["text"]
        .as_str()
        .unwrap()
        .to_string();
    // Stop on a piece of the free-running output: the text ends right before it.
    let chars: Vec<char> = text.chars().collect();
    assert!(chars.len() >= 6, "24 tokens of gibberish: {text:?}");
    let stop: String = chars[3..5].iter().collect();
    let mut b = body.clone();
    b["stop"] = json!([stop.clone()]);
    let v = s.post_json("/v1/completions", &b).json();
    let cut = v["choices"][0]["text"].as_str().unwrap();
    assert_eq!(cut, &text[..text.find(&stop).unwrap()]);
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
}

/// 16 concurrent streaming clients each get exactly what the same request gives alone.
#[test]
fn sixteen_concurrent_streams_match_solo_requests() {
    let Some((_tmp, s)) = server() else { return };
    let n = 16;
    let max_tokens = 16;
    let bodies: Vec<Value> = (0..n)
        .map(|i| {
            let mut b = chat_body(
                &format!("Request number {i}: tell me about item {}", i * 7),
                max_tokens,
            );
            b["stream"] = json!(true);
            b["stream_options"] = json!({"include_usage": true});
            b["thinking"] = json!(i % 2 == 0);
            b
        })
        .collect();
    let solo: Vec<_> = bodies
        .iter()
        .map(|b| {
            assemble(
                &request(s.addr, "POST", "/v1/chat/completions", Some(&b.to_string())).sse_data(),
            )
        })
        .collect();
    let t0 = Instant::now();
    let addr = s.addr;
    let threads: Vec<_> = bodies
        .iter()
        .cloned()
        .map(|b| {
            std::thread::spawn(move || {
                assemble(
                    &request(addr, "POST", "/v1/chat/completions", Some(&b.to_string())).sse_data(),
                )
            })
        })
        .collect();
    let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let elapsed = t0.elapsed().as_secs_f64();
    let mut tokens = 0;
    for (i, (got, want)) in results.iter().zip(&solo).enumerate() {
        assert_eq!(got.0, want.0, "client {i} reasoning");
        assert_eq!(got.1, want.1, "client {i} content");
        assert_eq!(got.2, want.2, "client {i} finish");
        let (gu, wu) = (got.3.as_ref().unwrap(), want.3.as_ref().unwrap());
        assert_eq!(gu["completion_tokens"], wu["completion_tokens"]);
        tokens += gu["completion_tokens"].as_u64().unwrap();
    }
    println!(
        "16 concurrent streaming clients: {n} requests in {elapsed:.2} s = {:.2} requests/s, {tokens} tokens = {:.1} tokens/s (CPU, tiny random model)",
        n as f64 / elapsed,
        tokens as f64 / elapsed
    );
    let m = s.wait_idle();
    assert_eq!(m.kv_pages_in_use, 0);
}

/// A client that disconnects mid-stream frees its sequence and pages.
#[test]
fn disconnect_mid_stream_frees_pages() {
    let Some((_tmp, s)) = server() else { return };
    let mut body = chat_body("Write a very long story.", 3000);
    body["stream"] = json!(true);
    body["ignore_eos"] = json!(true);
    let conn = open_stream(s.addr, "/v1/chat/completions", &body, 4);
    let m = s.state.scheduler.metrics();
    assert_eq!(m.running, 1);
    assert!(m.kv_pages_in_use > 0);
    drop(conn);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let m = s.state.scheduler.metrics();
        if m.running == 0 && m.kv_pages_in_use == 0 {
            assert_eq!(m.requests_cancelled, 1);
            assert!(m.generation_tokens_total < 3000);
            break;
        }
        assert!(Instant::now() < deadline, "sequence not freed: {m:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let metrics = s.get("/metrics").body;
    assert!(metrics.contains(&format!("r1_kv_cache_pages_in_use{{model=\"{MODEL}\"}} 0")));
}

/// A repeated conversation reuses the cached prefix (usage reports the hit) and answers the same.
#[test]
fn repeated_prompt_hits_the_prefix_cache() {
    let Some((_tmp, s)) = server() else { return };
    let body = chat_body("Tell me something about caches.", 6);
    let a = s.post_json("/v1/chat/completions", &body).json();
    let b = s.post_json("/v1/chat/completions", &body).json();
    assert_eq!(a["choices"][0]["message"], b["choices"][0]["message"]);
    let (ua, ub) = (&a["usage"], &b["usage"]);
    assert_eq!(ua["prompt_cache_hit_tokens"], 0);
    let prompt = ub["prompt_tokens"].as_u64().unwrap();
    let hit = ub["prompt_cache_hit_tokens"].as_u64().unwrap();
    assert_eq!(hit, prompt - 1);
    assert_eq!(
        ub["prompt_cache_miss_tokens"].as_u64().unwrap(),
        prompt - hit
    );
    assert_eq!(
        ub["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap(),
        hit
    );
    let metrics = s.get("/metrics").body;
    assert!(metrics.contains("r1_prefix_cache_hit_tokens_total"));
    assert!(!metrics.contains(&format!(
        "r1_prefix_cache_hit_tokens_total{{model=\"{MODEL}\"}} 0\n"
    )));
    // Both requests are in the latency histograms, the +Inf bucket equal to the count.
    for name in [
        "r1_time_to_first_token_seconds",
        "r1_request_latency_seconds",
        "r1_time_per_output_token_seconds",
    ] {
        assert!(
            metrics.contains(&format!("# TYPE {name} histogram")),
            "{name}"
        );
        for line in [
            format!("{name}_count{{model=\"{MODEL}\"}} 2"),
            format!("{name}_bucket{{model=\"{MODEL}\",le=\"+Inf\"}} 2"),
            format!("{name}_bucket{{model=\"{MODEL}\",le=\"600\"}} 2"),
        ] {
            assert!(metrics.contains(&line), "{line}\n{metrics}");
        }
    }
}

/// JSON mode on the random model: the answer is always a valid JSON prefix, and a whole object
/// when generation stopped by itself.
#[test]
fn json_mode_on_random_weights() {
    let Some((_tmp, s)) = server() else { return };
    for (i, temperature) in [0.0, 1.0].into_iter().enumerate() {
        let mut body = chat_body("Give me a JSON object.", 48);
        body["temperature"] = json!(temperature);
        body["seed"] = json!(i);
        body["response_format"] = json!({"type": "json_object"});
        let r = s.post_json("/v1/chat/completions", &body);
        assert_eq!(r.status, 200, "{}", r.body);
        let v = r.json();
        let content = v["choices"][0]["message"]["content"].as_str().unwrap();
        assert!(
            r1_runtime::text::constrained::JsonValidator::default().feed(content.as_bytes()),
            "{content:?}"
        );
        if v["choices"][0]["finish_reason"] == "stop" {
            assert!(serde_json::from_str::<Value>(content).unwrap().is_object());
        }
    }
    let mut body = chat_body("x", 4);
    body["response_format"] = json!({"type": "json_schema"});
    assert_eq!(s.post_json("/v1/chat/completions", &body).status, 400);
}

/// A client that gives up on a non-streamed request also frees its sequence.
#[test]
fn disconnect_while_waiting_for_a_whole_response_frees_pages() {
    use std::io::Write;
    let Some((_tmp, s)) = server() else { return };
    let mut body = chat_body("Write a very long story.", 3000);
    body["ignore_eos"] = json!(true);
    let body = body.to_string();
    let mut c = std::net::TcpStream::connect(s.addr).unwrap();
    write!(
        c,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while s.state.scheduler.metrics().generation_tokens_total < 3 {
        assert!(Instant::now() < deadline, "never started");
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(c);
    loop {
        let m = s.state.scheduler.metrics();
        if m.running == 0 && m.kv_pages_in_use == 0 {
            assert_eq!(m.requests_cancelled, 1);
            assert!(m.generation_tokens_total < 3000);
            break;
        }
        assert!(Instant::now() < deadline, "sequence not freed: {m:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `n` choices: greedy choices equal the single answer; sampled choice i equals a single
/// request with seed + i; streamed choices (deltas tagged by index) equal the whole ones;
/// usage counts the prompt once and sums the completions; the completions endpoint too.
#[test]
fn n_choices() {
    let Some((_tmp, s)) = server() else { return };
    let single = s
        .post_json("/v1/chat/completions", &chat_body("Pick a word.", 8))
        .json();
    let mut body = chat_body("Pick a word.", 8);
    body["n"] = json!(3);
    let hits = s.state.scheduler.metrics().prefix_cache_hit_tokens_total;
    let v = s.post_json("/v1/chat/completions", &body).json();
    // Every choice forks the prompt (all but its last token) instead of prefilling it.
    let prompt = v["usage"]["prompt_tokens"].as_u64().unwrap();
    let hits = s.state.scheduler.metrics().prefix_cache_hit_tokens_total - hits;
    assert!(
        hits >= 3 * (prompt - 1),
        "{hits} prefix-cache hits for 3 x {prompt}"
    );
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3);
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i);
        assert_eq!(
            c["message"], single["choices"][0]["message"],
            "greedy choice {i}"
        );
    }
    let one = single["usage"]["completion_tokens"].as_u64().unwrap();
    assert_eq!(v["usage"]["completion_tokens"].as_u64().unwrap(), 3 * one);
    assert_eq!(
        v["usage"]["prompt_tokens"],
        single["usage"]["prompt_tokens"]
    );

    let mut sampled = chat_body("Pick a word.", 8);
    sampled["temperature"] = json!(1.0);
    sampled["seed"] = json!(41);
    sampled["n"] = json!(2);
    let v = s.post_json("/v1/chat/completions", &sampled).json();
    for i in 0..2 {
        let mut alone = sampled.clone();
        alone["n"] = json!(1);
        alone["seed"] = json!(41 + i);
        let a = s.post_json("/v1/chat/completions", &alone).json();
        assert_eq!(
            v["choices"][i]["message"],
            a["choices"][0]["message"],
            "choice {i} = seed {}",
            41 + i
        );
    }
    sampled["stream"] = json!(true);
    sampled["stream_options"] = json!({"include_usage": true});
    let data = s.post_json("/v1/chat/completions", &sampled).sse_data();
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let mut text = [String::new(), String::new()];
    let mut finished = [false, false];
    let mut usage = None;
    for d in &data[..data.len() - 1] {
        let c: Value = serde_json::from_str(d).unwrap();
        if !c["usage"].is_null() {
            usage = Some(c["usage"].clone());
        }
        for ch in c["choices"].as_array().unwrap() {
            let i = ch["index"].as_u64().unwrap() as usize;
            for k in ["reasoning_content", "content"] {
                text[i].push_str(ch["delta"][k].as_str().unwrap_or(""));
            }
            finished[i] |= ch["finish_reason"].is_string();
        }
    }
    assert_eq!(finished, [true, true]);
    for (i, t) in text.iter().enumerate() {
        let m = &v["choices"][i]["message"];
        let whole = format!(
            "{}{}",
            m["reasoning_content"].as_str().unwrap_or(""),
            m["content"].as_str().unwrap_or("")
        );
        assert_eq!(t, &whole, "streamed choice {i}");
    }
    assert_eq!(
        usage.unwrap()["completion_tokens"],
        v["usage"]["completion_tokens"]
    );

    let body = json!({"model": MODEL, "prompt": "Once", "max_tokens": 4, "temperature": 0, "n": 2});
    let v = s.post_json("/v1/completions", &body).json();
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 2);
    assert_eq!(choices[0]["text"], choices[1]["text"]);
    assert_eq!(choices[1]["index"], 1);
    s.wait_idle();
}
