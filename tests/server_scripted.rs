//! The server over a scripted engine (the random checkpoint's config and weights, a backend
//! that emits a chosen token sequence after `<｜Assistant｜>`): reasoning split, tool calls
//! (whole and streamed, OpenAI shapes, finish_reason "tool_calls"), tool results fed back,
//! multi-byte characters in streams.

mod chat_support;
mod server_support;

use r1_runtime::text::Tokenizer;
use serde_json::{json, Value};
use server_support::{scripted_engine, TestServer, MODEL};

const ASSISTANT: u32 = 128804;

fn scripted(text: &str) -> Option<(tempfile::TempDir, TestServer)> {
    let (tmp, dir) = server_support::checkpoint(4096, false)?;
    let tok = Tokenizer::from_dir(&dir).unwrap();
    let script = tok.encode(text).unwrap();
    let d = dir.clone();
    let s = TestServer::with_engine(&dir, move || Ok(scripted_engine(&d, ASSISTANT, script)));
    Some((tmp, s))
}

fn tools() -> Value {
    json!([
        {"type": "function", "function": {
            "name": "get_weather", "description": "Weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string"}}, "required": ["city"]}}},
        {"type": "function", "function": {
            "name": "get_time", "description": "Time in a zone",
            "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}}}}
    ])
}

struct Streamed {
    reasoning: String,
    content: String,
    calls: Vec<Value>,
    finish: String,
    chunks: Vec<Value>,
}

fn assemble(data: &[String]) -> Streamed {
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let mut s = Streamed {
        reasoning: String::new(),
        content: String::new(),
        calls: Vec::new(),
        finish: String::new(),
        chunks: Vec::new(),
    };
    for d in &data[..data.len() - 1] {
        let v: Value = serde_json::from_str(d).unwrap();
        s.chunks.push(v.clone());
        let Some(c) = v["choices"].get(0) else {
            continue;
        };
        let delta = &c["delta"];
        if let Some(r) = delta["reasoning_content"].as_str() {
            assert!(!r.contains('\u{FFFD}'));
            s.reasoning.push_str(r);
        }
        if let Some(t) = delta["content"].as_str() {
            assert!(!t.contains('\u{FFFD}'), "{t:?}");
            s.content.push_str(t);
        }
        if let Some(calls) = delta["tool_calls"].as_array() {
            for tc in calls {
                let i = tc["index"].as_u64().unwrap() as usize;
                if i == s.calls.len() {
                    assert!(
                        tc["id"].is_string(),
                        "a call's first delta has its id: {tc}"
                    );
                    assert_eq!(tc["type"], "function");
                    s.calls.push(json!({"id": tc["id"], "type": "function",
                        "function": {"name": tc["function"]["name"], "arguments": ""}}));
                }
                let args = tc["function"]["arguments"].as_str().unwrap_or("");
                let cur = s.calls[i]["function"]["arguments"]
                    .as_str()
                    .unwrap()
                    .to_string();
                s.calls[i]["function"]["arguments"] = json!(cur + args);
            }
        }
        if let Some(f) = c["finish_reason"].as_str() {
            s.finish = f.into();
        }
    }
    s
}

#[test]
fn reasoning_and_answer_are_split() {
    let text = "<think>\nLet me think about 6 × 7 — it is 42 🌍.\n</think>\n\nThe answer is **42** 🚀 数学.";
    let Some((_tmp, s)) = scripted(text) else {
        return;
    };
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "6*7?"}]});
    let v = s.post_json("/v1/chat/completions", &body).json();
    let msg = &v["choices"][0]["message"];
    assert_eq!(
        msg["reasoning_content"],
        "Let me think about 6 × 7 — it is 42 🌍."
    );
    assert_eq!(msg["content"], "The answer is **42** 🚀 数学.");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let u = &v["usage"];
    let reasoning = u["completion_tokens_details"]["reasoning_tokens"]
        .as_u64()
        .unwrap();
    let completion = u["completion_tokens"].as_u64().unwrap();
    assert!(reasoning > 5 && reasoning < completion, "{u}");

    let mut sb = body.clone();
    sb["stream"] = json!(true);
    let st = assemble(&s.post_json("/v1/chat/completions", &sb).sse_data());
    assert_eq!(st.reasoning, msg["reasoning_content"].as_str().unwrap());
    assert_eq!(st.content, msg["content"].as_str().unwrap());
    assert_eq!(st.finish, "stop");
    assert!(st.chunks.len() > 10, "streamed in many chunks");
    for c in &st.chunks {
        let d = &c["choices"][0]["delta"];
        for part in ["content", "reasoning_content"] {
            if let Some(t) = d[part].as_str() {
                assert!(!t.contains("think>"), "tag leaked: {c}");
            }
        }
    }
}

const CALLS: &str = "<think>\nThe user wants the weather; call the tools.\n</think>\n\n<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{\"city\": \"Paris\", \"unit\": \"celsius\"}\n```<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_time\n```json\n{\"tz\": \"Europe/Paris\"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>";

#[test]
fn tool_calls_whole_and_streamed() {
    let Some((_tmp, s)) = scripted(CALLS) else {
        return;
    };
    let body = json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": "Weather and time in Paris?"}],
        "tools": tools(),
    });
    let r = s.post_json("/v1/chat/completions", &body);
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    let choice = &v["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls");
    let msg = &choice["message"];
    assert!(msg["content"].is_null());
    assert_eq!(
        msg["reasoning_content"],
        "The user wants the weather; call the tools."
    );
    let calls = msg["tool_calls"].as_array().unwrap();
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[0]["type"], "function");
    assert_eq!(calls[0]["function"]["name"], "get_weather");
    let args: Value =
        serde_json::from_str(calls[0]["function"]["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(args, json!({"city": "Paris", "unit": "celsius"}));
    assert_eq!(calls[1]["function"]["name"], "get_time");
    assert_ne!(calls[0]["id"], calls[1]["id"]);

    let mut sb = body.clone();
    sb["stream"] = json!(true);
    let st = assemble(&s.post_json("/v1/chat/completions", &sb).sse_data());
    assert_eq!(st.finish, "tool_calls");
    assert_eq!(st.content, "");
    assert_eq!(st.calls.len(), 2);
    for (a, b) in st.calls.iter().zip(calls) {
        assert_eq!(a["function"], b["function"]);
    }

    // Without tools in the request the markup stays plain content.
    let r = s.post_json(
        "/v1/chat/completions",
        &json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}]}),
    );
    let v = r.json();
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert!(v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .contains("get_weather"));

    // The calls and their results go back as messages (role "tool").
    let follow = json!({
        "model": MODEL,
        "tools": tools(),
        "messages": [
            {"role": "user", "content": "Weather and time in Paris?"},
            {"role": "assistant", "content": null, "tool_calls": calls},
            {"role": "tool", "tool_call_id": calls[0]["id"], "content": "{\"temp\": 21}"},
            {"role": "tool", "tool_call_id": calls[1]["id"], "content": "{\"time\": \"12:00\"}"}
        ],
    });
    let r = s.post_json("/v1/chat/completions", &follow);
    assert_eq!(r.status, 200, "{}", r.body);
    let u = &r.json()["usage"];
    assert!(u["prompt_tokens"].as_u64().unwrap() > v["usage"]["prompt_tokens"].as_u64().unwrap());
}

fn json_body(response_format: bool) -> Value {
    let mut b = json!({"model": MODEL, "messages": [{"role": "user", "content": "Reply in JSON."}], "max_tokens": 40, "seed": seed()});
    if response_format {
        b["response_format"] = json!({"type": "json_object"});
    }
    b
}

fn is_json_prefix(s: &str) -> bool {
    r1_runtime::text::constrained::JsonValidator::default().feed(s.as_bytes())
}

/// JSON mode passes a valid object through and stops when it closes.
#[test]
fn json_mode_stops_at_the_end_of_the_object() {
    let Some((_tmp, s)) = scripted(
        "<think>\nThey want JSON.\n</think>\n\n{\"answer\": 42, \"ok\": true}\n\nAnything else?",
    ) else {
        return;
    };
    let v = s.post_json("/v1/chat/completions", &json_body(true)).json();
    let msg = &v["choices"][0]["message"];
    assert_eq!(msg["reasoning_content"], "They want JSON.");
    // The closing token may carry trailing whitespace ("}\n\n" is one token).
    let content = msg["content"].as_str().unwrap();
    assert_eq!(content.trim_end(), "{\"answer\": 42, \"ok\": true}");
    assert_eq!(
        serde_json::from_str::<Value>(content).unwrap()["answer"],
        42
    );
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    // Without JSON mode the trailing text comes through.
    let v = s
        .post_json("/v1/chat/completions", &json_body(false))
        .json();
    assert!(v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .ends_with("Anything else?"));
}

/// JSON mode steers an output that is not JSON into a valid JSON prefix.
#[test]
fn json_mode_constrains_non_json_output() {
    let Some((_tmp, s)) = scripted("Sure! Here it is: {answer: 'forty two'} and more text") else {
        return;
    };
    let mut body = json_body(true);
    body["stream"] = json!(true);
    // Greedy: a sampled fallback may also open <think> (allowed before the answer).
    body["temperature"] = json!(0);
    let st = assemble(&s.post_json("/v1/chat/completions", &body).sse_data());
    assert!(is_json_prefix(&st.content), "{:?}", st.content);
    assert!(st.content.trim_start().starts_with('{'));
    if st.finish == "stop" {
        let v: Value = serde_json::from_str(&st.content).unwrap();
        assert!(v.is_object());
    }
}

const ONE_CALL: &str = "<think>\nCall it.\n</think>\n\n<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{\"city\": \"Paris\"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>";

/// Sampling seed of the constrained-decoding tests (R1_TEST_SEED overrides it, to sweep).
fn seed() -> u64 {
    std::env::var("R1_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(7)
}

fn forced_body(tool_choice: Value) -> Value {
    json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": "Weather in Paris?"}],
        "tools": tools(),
        "tool_choice": tool_choice,
        "max_tokens": 200,
        "seed": seed(),
    })
}

/// The call a constrained answer produced: its name and whether its arguments are a JSON
/// object (checked whole when the call completed, as a prefix when max_tokens cut it).
fn forced_call(v: &Value) -> String {
    let choice = &v["choices"][0];
    let calls = choice["message"]["tool_calls"]
        .as_array()
        .unwrap_or_else(|| panic!("a forced tool call: {v}"));
    assert_eq!(calls.len(), 1, "{v}");
    let args = calls[0]["function"]["arguments"].as_str().unwrap();
    assert!(is_json_prefix(args), "{args:?}");
    if choice["finish_reason"] == "tool_calls" {
        assert!(serde_json::from_str::<Value>(args).unwrap().is_object());
    } else {
        assert_eq!(choice["finish_reason"], "length", "{v}");
    }
    calls[0]["function"]["name"].as_str().unwrap().to_string()
}

/// tool_choice naming a function or "required": a model that calls it anyway passes through
/// unchanged; a model that answers in prose is steered into one call of the named (or an
/// allowed) function with JSON-object arguments; bad tool_choice values are 400s.
#[test]
fn tool_choice_forces_a_call() {
    let named = json!({"type": "function", "function": {"name": "get_weather"}});
    let Some((_tmp, s)) = scripted(ONE_CALL) else {
        return;
    };
    for choice in [named.clone(), json!("required")] {
        let v = s
            .post_json("/v1/chat/completions", &forced_body(choice))
            .json();
        assert_eq!(v["choices"][0]["finish_reason"], "tool_calls", "{v}");
        assert_eq!(v["choices"][0]["message"]["reasoning_content"], "Call it.");
        let call = &v["choices"][0]["message"]["tool_calls"][0]["function"];
        assert_eq!(call["name"], "get_weather");
        assert_eq!(call["arguments"], "{\"city\": \"Paris\"}");
    }
    drop(s);

    let Some((_tmp, s)) = scripted("<think>\nNo tools today.\n</think>\n\nIt is sunny in Paris.")
    else {
        return;
    };
    let prose = s
        .post_json("/v1/chat/completions", &forced_body(json!("auto")))
        .json();
    assert_eq!(
        prose["choices"][0]["message"]["content"],
        "It is sunny in Paris."
    );
    let time = json!({"type": "function", "function": {"name": "get_time"}});
    let v = s
        .post_json("/v1/chat/completions", &forced_body(time))
        .json();
    assert_eq!(forced_call(&v), "get_time");
    assert_eq!(
        v["choices"][0]["message"]["reasoning_content"],
        "No tools today."
    );
    let v = s
        .post_json("/v1/chat/completions", &forced_body(json!("required")))
        .json();
    assert!(["get_weather", "get_time"].contains(&forced_call(&v).as_str()));
    let mut streamed = forced_body(json!({"type": "function", "function": {"name": "get_time"}}));
    streamed["stream"] = json!(true);
    let st = assemble(&s.post_json("/v1/chat/completions", &streamed).sse_data());
    assert_eq!(st.calls.len(), 1);
    assert_eq!(st.calls[0]["function"]["name"], "get_time");
    assert_eq!(st.content, "");

    for (choice, what) in [
        (
            json!({"type": "function", "function": {"name": "launch"}}),
            "not in `tools`",
        ),
        (json!("always"), "tool_choice must be"),
    ] {
        let r = s.post_json("/v1/chat/completions", &forced_body(choice));
        assert_eq!(r.status, 400, "{}", r.body);
        assert!(r.body.contains(what), "{}", r.body);
    }
    let mut no_tools = forced_body(json!("required"));
    no_tools.as_object_mut().unwrap().remove("tools");
    assert_eq!(s.post_json("/v1/chat/completions", &no_tools).status, 400);
    let mut both = forced_body(json!("required"));
    both["response_format"] = json!({"type": "json_object"});
    assert_eq!(s.post_json("/v1/chat/completions", &both).status, 400);
}

fn person_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "age": {"type": "integer"},
            "tags": {"type": "array", "items": {"enum": ["a", "b"]}}
        },
        "required": ["name", "age"],
        "additionalProperties": false
    })
}

/// The text is a prefix of a value the schema accepts (and the whole value when `complete`).
fn conforms(schema: &Value, text: &str, complete: bool) -> bool {
    use r1_runtime::text::constrained::{Schema, SchemaValidator};
    let mut v = SchemaValidator::new(Schema::compile(schema).unwrap());
    v.feed(text.as_bytes()) && (!complete || v.complete())
}

/// response_format json_schema: a conforming answer passes unchanged and stops when the value
/// closes; prose is steered into the schema; a strict tool's forced arguments follow its
/// parameters; schemas the server cannot enforce are 400s naming the keyword.
#[test]
fn json_schema_constrains_the_answer() {
    let format = json!({"type": "json_schema", "json_schema": {"name": "person", "schema": person_schema(), "strict": true}});
    let body = |format: &Value| json!({"model": MODEL, "messages": [{"role": "user", "content": "Who?"}], "max_tokens": 80, "temperature": 0, "response_format": format});
    let Some((_tmp, s)) = scripted(
        "<think>\nA person.\n</think>\n\n{\"name\": \"Ada\", \"age\": 36, \"tags\": [\"a\"]}\n\nDone.",
    ) else {
        return;
    };
    let v = s.post_json("/v1/chat/completions", &body(&format)).json();
    let content = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(
        content.trim_end(),
        "{\"name\": \"Ada\", \"age\": 36, \"tags\": [\"a\"]}"
    );
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert!(conforms(&person_schema(), content.trim_end(), true));
    drop(s);

    let Some((_tmp, s)) = scripted("Ada is 36 and likes tags a and c.") else {
        return;
    };
    let v = s.post_json("/v1/chat/completions", &body(&format)).json();
    let content = v["choices"][0]["message"]["content"].as_str().unwrap();
    let complete = v["choices"][0]["finish_reason"] == "stop";
    // Steered: the prose became (a prefix of) a value of the schema.
    assert!(content.trim_start().starts_with('{'), "{content:?}");
    assert!(content.contains("\"name\""), "{content:?}");
    assert!(conforms(&person_schema(), content, complete), "{content:?}");

    let tools = json!([{"type": "function", "function": {"name": "get_person", "strict": true, "parameters": person_schema()}}]);
    let call = json!({"model": MODEL, "messages": [{"role": "user", "content": "Who?"}], "max_tokens": 120,
        "temperature": 0, "tools": tools, "tool_choice": "required"});
    let v = s.post_json("/v1/chat/completions", &call).json();
    let f = &v["choices"][0]["message"]["tool_calls"][0]["function"];
    assert_eq!(f["name"], "get_person", "{v}");
    let complete = v["choices"][0]["finish_reason"] == "tool_calls";
    assert!(
        conforms(&person_schema(), f["arguments"].as_str().unwrap(), complete),
        "{f}"
    );

    for (schema, what) in [
        (
            json!({"type": "object", "properties": {"n": {"type": "integer", "minimum": 0}}}),
            "minimum",
        ),
        (json!({"type": "string"}), "root must be an object"),
    ] {
        let f = json!({"type": "json_schema", "json_schema": {"name": "x", "schema": schema}});
        let r = s.post_json("/v1/chat/completions", &body(&f));
        assert_eq!(r.status, 400, "{}", r.body);
        assert!(r.body.contains(what), "{}", r.body);
    }
    let r = s.post_json(
        "/v1/chat/completions",
        &body(&json!({"type": "json_schema"})),
    );
    assert_eq!(r.status, 400);
}
