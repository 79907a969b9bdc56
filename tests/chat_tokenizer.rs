//! The real DeepSeek-V3/R1 tokenizer (fetched by tools/fetch-test-tokenizer): special token
//! ids, chat templates (the checkpoint's and the built-in one), BOS once, streaming decode.

mod chat_support;

use r1_runtime::chat::{
    ChatFormat, ChatTemplate, FunctionCall, FunctionDef, Message, RenderOptions, Thinking, Tool,
    ToolCall,
};
use r1_runtime::text::Tokenizer;

fn tokenizer() -> Option<(Tokenizer, std::path::PathBuf)> {
    let dir = chat_support::test_tokenizer_dir()?;
    Some((Tokenizer::from_dir(&dir).expect("tokenizer loads"), dir))
}

fn gen() -> RenderOptions<'static> {
    RenderOptions {
        add_generation_prompt: true,
        ..Default::default()
    }
}

#[test]
fn special_token_ids() {
    let Some((tok, _)) = tokenizer() else { return };
    let expect = [
        ("<｜begin▁of▁sentence｜>", 0),
        ("<｜end▁of▁sentence｜>", 1),
        ("<think>", 128798),
        ("</think>", 128799),
        ("<｜User｜>", 128803),
        ("<｜Assistant｜>", 128804),
        ("<｜tool▁calls▁begin｜>", 128806),
        ("<｜tool▁calls▁end｜>", 128807),
        ("<｜tool▁call▁begin｜>", 128808),
        ("<｜tool▁call▁end｜>", 128809),
        ("<｜tool▁outputs▁begin｜>", 128810),
        ("<｜tool▁outputs▁end｜>", 128811),
        ("<｜tool▁output▁begin｜>", 128812),
        ("<｜tool▁output▁end｜>", 128813),
        ("<｜tool▁sep｜>", 128814),
    ];
    for (text, id) in expect {
        assert_eq!(tok.token_to_id(text), Some(id), "{text}");
        assert_eq!(
            tok.encode(text).unwrap(),
            vec![id],
            "{text} encodes to one token"
        );
    }
    assert!(tok.vocab_size() > 128_000 && tok.vocab_size() <= 129_280);
}

#[test]
fn encode_decode_roundtrip() {
    let Some((tok, _)) = tokenizer() else { return };
    for text in [
        "Hello, world! 1234567",
        "def f(x):\n    return x ** 2\n",
        "数学题：求 1+1 的值。答案是 2。",
        "emoji 🌍🚀 and accents café naïve — ok ✓",
    ] {
        let ids = tok.encode(text).unwrap();
        assert!(!ids.contains(&0), "no BOS added by encode");
        assert_eq!(tok.decode(&ids, true).unwrap(), text);
    }
    // Digits split in groups of at most three (DeepSeek's pre-tokenizer).
    let ids = tok.encode("1234567").unwrap();
    assert_eq!(ids.len(), 3);
}

/// Streaming decode: deltas never contain a broken character, multi-byte characters split over
/// tokens are held back, and the concatenation equals the whole decode.
#[test]
fn streaming_decode_emits_only_complete_utf8() {
    let Some((tok, _)) = tokenizer() else { return };
    let text = "Hi 🌍🚀! 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 数学 ẞ̈ — done<think>x</think>";
    let ids = tok.encode(text).unwrap();
    let mut dec = tok.stream(true);
    let mut out = String::new();
    let mut held = 0;
    for &id in &ids {
        let d = dec.step(id).unwrap();
        assert!(
            !d.contains('\u{FFFD}'),
            "delta {d:?} has a broken character"
        );
        if d.is_empty() {
            held += 1;
        }
        out.push_str(&d);
    }
    out.push_str(&dec.finish().unwrap());
    assert_eq!(out, text);
    assert!(
        held > 0,
        "some emoji/CJK character spans several byte-level tokens"
    );
}

#[test]
fn streaming_decode_skips_bos_eos() {
    let Some((tok, _)) = tokenizer() else { return };
    let mut dec = tok.stream(true);
    let mut out = String::new();
    for id in [0, 19923, 1] {
        out.push_str(&dec.step(id).unwrap());
    }
    out.push_str(&dec.finish().unwrap());
    assert_eq!(out, tok.decode(&[19923], true).unwrap());
}

#[test]
fn checkpoint_template_renders_bos_once_and_ends_with_assistant() {
    let Some((_, dir)) = tokenizer() else { return };
    let chat = ChatFormat::from_dir(&dir).unwrap();
    assert!(
        !chat.template.is_builtin(),
        "tokenizer_config.json has a chat_template"
    );
    let msgs = [Message::system("Be brief."), Message::user("What is 2+2?")];
    let p = chat.prompt(&msgs, &gen()).unwrap();
    assert_eq!(
        p.text,
        "<｜begin▁of▁sentence｜>Be brief.<｜User｜>What is 2+2?<｜Assistant｜>"
    );
    assert_eq!(p.ids[0], 0);
    assert_eq!(p.ids.iter().filter(|&&t| t == 0).count(), 1, "BOS once");
    assert!(p.ids.contains(&128803));
    assert_eq!(*p.ids.last().unwrap(), 128804);
    assert!(!p.in_reasoning);
}

#[test]
fn builtin_template_matches_checkpoint_template_on_plain_chats() {
    let Some((_, dir)) = tokenizer() else { return };
    let ckpt = ChatFormat::from_dir(&dir).unwrap();
    let builtin = ChatTemplate::builtin();
    let convs = vec![
        vec![Message::user("hi")],
        vec![
            Message::system("S1"),
            Message::system("S2"),
            Message::user("u"),
        ],
        vec![
            Message::user("a"),
            Message::assistant("b"),
            Message::user("c"),
        ],
    ];
    for msgs in convs {
        assert_eq!(
            builtin.render(&msgs, &gen()).unwrap(),
            ckpt.template.render(&msgs, &gen()).unwrap(),
        );
    }
}

#[test]
fn earlier_turns_lose_their_reasoning_and_forced_thinking_opens_think() {
    let Some((_, dir)) = tokenizer() else { return };
    let chat = ChatFormat::from_dir(&dir).unwrap();
    for template in [&chat.template, &ChatTemplate::builtin()] {
        let msgs = [
            Message::user("first"),
            Message::assistant("<think>\nsecret musing\n</think>\n\nthe answer"),
            Message::user("second"),
        ];
        let text = template.render(&msgs, &gen()).unwrap();
        assert!(!text.contains("secret musing"), "{text}");
        assert!(text.contains("the answer<｜end▁of▁sentence｜><｜User｜>second<｜Assistant｜>"));
        let forced = template
            .render(
                &msgs,
                &RenderOptions {
                    add_generation_prompt: true,
                    thinking: Thinking::Force,
                    ..Default::default()
                },
            )
            .unwrap();
        assert_eq!(forced, format!("{text}<think>\n"));
    }
    let p = chat
        .prompt(
            &[Message::user("q")],
            &RenderOptions {
                add_generation_prompt: true,
                thinking: Thinking::Force,
                ..Default::default()
            },
        )
        .unwrap();
    assert!(p.in_reasoning);
    let n = p.ids.len();
    assert_eq!(&p.ids[n - 3..n - 1], &[128804, 128798]);
}

fn weather_tool() -> Tool {
    Tool {
        kind: "function".into(),
        function: FunctionDef {
            name: "get_weather".into(),
            description: Some("Current weather in a city".into()),
            parameters: Some(serde_json::json!({
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"]
            })),
            strict: None,
        },
    }
}

#[test]
fn tools_and_tool_messages_render_in_deepseek_markers() {
    let Some((tok, _)) = tokenizer() else { return };
    let template = ChatTemplate::builtin();
    let tools = [weather_tool()];
    let call = ToolCall {
        id: "call_1".into(),
        kind: "function".into(),
        function: FunctionCall {
            name: "get_weather".into(),
            arguments: r#"{"city": "Paris"}"#.into(),
        },
    };
    let msgs = [
        Message::system("You help."),
        Message::user("Weather in Paris?"),
        Message {
            content: None,
            tool_calls: Some(vec![call]),
            ..Message::assistant("")
        },
        Message::tool("call_1", r#"{"temp": 21}"#),
    ];
    let opts = RenderOptions {
        tools: Some(&tools),
        add_generation_prompt: true,
        thinking: Thinking::Auto,
    };
    let text = template.render(&msgs, &opts).unwrap();
    assert!(
        text.starts_with("<｜begin▁of▁sentence｜>You help.\n\n## Tools"),
        "{text}"
    );
    assert!(text.contains(r#""name": "get_weather""#), "{text}");
    let tail = "<｜User｜>Weather in Paris?<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{\"city\": \"Paris\"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜><｜end▁of▁sentence｜><｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>{\"temp\": 21}<｜tool▁output▁end｜><｜tool▁outputs▁end｜>";
    assert!(text.ends_with(tail), "{text}");
    let ids = tok.encode(&text).unwrap();
    for id in [
        128806, 128808, 128814, 128809, 128807, 128810, 128812, 128813, 128811,
    ] {
        assert!(ids.contains(&id), "marker {id} is one token");
    }
    assert_eq!(*ids.last().unwrap(), 128811);
}

/// JSON mode's token byte table agrees with the tokenizer's own decoding.
#[test]
fn token_bytes_match_decoding() {
    let Some((tok, _)) = tokenizer() else { return };
    let table = r1_runtime::text::TokenBytes::from_tokenizer(&tok, 129_280);
    assert!(table.get(0).is_none(), "BOS is special");
    assert!(table.get(1).is_none(), "EOS is special");
    assert_eq!(table.get(128798), Some("<think>".as_bytes()));
    let mut checked = 0;
    for id in (3..128_000u32).step_by(97) {
        let bytes = table.get(id).unwrap();
        let text = tok.decode(&[id], false).unwrap();
        if let Ok(s) = std::str::from_utf8(bytes) {
            assert_eq!(s, text, "token {id}");
            checked += 1;
        } else {
            assert!(
                text.contains('\u{FFFD}'),
                "token {id} is a partial character"
            );
        }
    }
    assert!(checked > 1000);
    // Concatenated bytes of a tokenized text are the text.
    let text = "{\"名前\": \"🌍 ok\", \"n\": [1, 2.5]}";
    let ids = tok.encode(text).unwrap();
    let bytes: Vec<u8> = ids
        .iter()
        .flat_map(|&i| table.get(i).unwrap().to_vec())
        .collect();
    assert_eq!(bytes, text.as_bytes());
}

/// A forced tool call writes its markup with the tokenizer's own tokens (each marker one
/// token), not a byte spelling: after the reasoning, the constraint dictates every token up to
/// the arguments and again after them, and the answer is then complete.
#[test]
fn forced_tool_call_markup_uses_marker_tokens() {
    use r1_runtime::text::constrained::{AnswerConstraint, AnswerFormat};
    use r1_runtime::text::TokenBytes;
    use std::sync::Arc;
    let Some((tok, _)) = tokenizer() else { return };
    let table = Arc::new(TokenBytes::from_tokenizer(&tok, 129_280));
    let format = AnswerFormat::ToolCall {
        tools: vec![("get_weather".into(), None)],
    };
    let mut c = AnswerConstraint::new(table, &format, true, &tok);
    for t in tok.encode("Call it.\n</think>").unwrap() {
        assert_eq!(c.forced(), None, "free while reasoning");
        c.accept(t);
    }
    let mut forced = Vec::new();
    while let Some(t) = c.forced() {
        assert!(c.allows(t));
        c.accept(t);
        forced.push(t);
    }
    assert_eq!(forced[0], 128806, "<｜tool▁calls▁begin｜> as one token");
    assert_eq!(forced[1], 128808, "<｜tool▁call▁begin｜> as one token");
    assert_eq!(
        tok.decode(&forced, false).unwrap(),
        "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n"
    );
    for t in tok.encode("{\"city\": \"Paris\"}").unwrap() {
        assert!(c.allows(t));
        c.accept(t);
    }
    let mut tail = Vec::new();
    while let Some(t) = c.forced() {
        c.accept(t);
        tail.push(t);
    }
    assert_eq!(
        tok.decode(&tail, false).unwrap(),
        "\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>"
    );
    assert!(c.complete());
}

/// Output cut inside a multi-byte character (max_tokens) ends at the last whole character:
/// no U+FFFD is made up at the end.
#[test]
fn streaming_decode_cut_inside_a_character_drops_it() {
    let Some((tok, _)) = tokenizer() else { return };
    let text = "ok 🌍𝔘数";
    let ids = tok.encode(text).unwrap();
    for cut in 1..=ids.len() {
        let mut dec = tok.stream(true);
        let mut out = String::new();
        for &id in &ids[..cut] {
            out.push_str(&dec.step(id).unwrap());
        }
        out.push_str(&dec.finish().unwrap());
        assert!(!out.contains('\u{FFFD}'), "cut {cut}: {out:?}");
        assert!(text.starts_with(&out), "cut {cut}: {out:?}");
    }
}
