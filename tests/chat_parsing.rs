//! Reasoning split and tool-call parsing, whole and streamed in every chunking: streamed
//! deltas add up to the whole parse, tags never leak, tool calls become OpenAI tool_calls.

use r1_runtime::chat::{Delta, OutputParser, ParsedOutput, ToolCallDelta};

/// Streams `text` in pieces of the given sizes (in chars, cycling) and returns the deltas.
fn stream(text: &str, in_reasoning: bool, tools: bool, sizes: &[usize]) -> Vec<Delta> {
    let mut p = OutputParser::new(in_reasoning, tools.then_some("x"));
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let (mut i, mut k) = (0, 0);
    while i < chars.len() {
        let n = sizes[k % sizes.len()].max(1).min(chars.len() - i);
        let piece: String = chars[i..i + n].iter().collect();
        out.push(p.push(&piece));
        i += n;
        k += 1;
    }
    out.push(p.finish());
    out
}

fn fold(deltas: &[Delta]) -> ParsedOutput {
    let mut p = ParsedOutput::default();
    for d in deltas {
        p.add(d);
    }
    p
}

/// Every chunking gives the same result as the whole parse.
fn check_all_chunkings(text: &str, in_reasoning: bool, tools: bool) -> ParsedOutput {
    let whole = OutputParser::parse_all(text, in_reasoning, tools.then_some("x"));
    for sizes in [
        vec![1],
        vec![2],
        vec![3],
        vec![5, 1, 7],
        vec![1, 13, 2],
        vec![1000],
    ] {
        let deltas = stream(text, in_reasoning, tools, &sizes);
        for d in &deltas {
            for leak in ["<think>", "</think>", "｜tool▁"] {
                assert!(!d.reasoning.contains(leak), "{leak} leaked into {d:?}");
                assert!(!d.content.contains(leak), "{leak} leaked into {d:?}");
            }
        }
        assert_eq!(fold(&deltas), whole, "chunks {sizes:?} of {text:?}");
    }
    whole
}

#[test]
fn reasoning_then_answer() {
    let p = check_all_chunkings(
        "<think>\nLet me think: 2+2.\nIt is 4.\n</think>\n\nThe answer is **4**.",
        false,
        false,
    );
    assert_eq!(p.reasoning, "Let me think: 2+2.\nIt is 4.");
    assert_eq!(p.content, "The answer is **4**.");
    assert!(p.tool_calls.is_empty());
}

#[test]
fn forced_thinking_starts_inside_reasoning() {
    let p = check_all_chunkings("Hmm, so x.\n</think>\n\nx", true, false);
    assert_eq!(p.reasoning, "Hmm, so x.");
    assert_eq!(p.content, "x");
}

#[test]
fn output_without_think_is_all_answer() {
    let p = check_all_chunkings("Just an answer, <b>bold</b>.", false, false);
    assert_eq!(p.reasoning, "");
    assert_eq!(p.content, "Just an answer, <b>bold</b>.");
    // A lone "<" at the start waits for more text, then turns out to be content.
    let p = check_all_chunkings("<thunk>", false, false);
    assert_eq!(p.content, "<thunk>");
}

#[test]
fn unfinished_reasoning_is_reasoning() {
    let p = check_all_chunkings("<think>still going and </thi", false, false);
    assert_eq!(p.reasoning, "still going and </thi");
    assert_eq!(p.content, "");
}

#[test]
fn a_delta_may_carry_both_parts() {
    let mut p = OutputParser::new(true, None);
    let d = p.push("end of thought</think>\n\nanswer");
    assert_eq!(d.reasoning, "end of thought");
    assert_eq!(d.content, "answer");
}

#[test]
fn reasoning_streams_before_the_close_tag() {
    let mut p = OutputParser::new(false, None);
    assert_eq!(p.push("<think>").reasoning, "");
    assert!(p.in_reasoning());
    assert_eq!(p.push("\nabc ").reasoning, "abc");
    assert_eq!(p.push("def</").reasoning, " def");
    let d = p.push("think>ok");
    assert_eq!((d.reasoning.as_str(), d.content.as_str()), ("", "ok"));
}

const TWO_CALLS: &str = "<think>\nI should call tools.\n</think>\n\nChecking.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{\"city\": \"Paris\", \"note\": \"a `b` c\"}\n```<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_time\n```json\n{\"tz\": \"CET\"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>";

#[test]
fn tool_calls_parse_whole_and_streamed() {
    let p = check_all_chunkings(TWO_CALLS, false, true);
    assert_eq!(p.reasoning, "I should call tools.");
    assert_eq!(p.content, "Checking.");
    assert_eq!(p.tool_calls.len(), 2);
    assert_eq!(p.tool_calls[0].id, "call_x0");
    assert_eq!(p.tool_calls[0].kind, "function");
    assert_eq!(p.tool_calls[0].function.name, "get_weather");
    assert_eq!(
        p.tool_calls[0].function.arguments,
        r#"{"city": "Paris", "note": "a `b` c"}"#
    );
    let args: serde_json::Value =
        serde_json::from_str(&p.tool_calls[0].function.arguments).unwrap();
    assert_eq!(args["city"], "Paris");
    assert_eq!(p.tool_calls[1].id, "call_x1");
    assert_eq!(p.tool_calls[1].function.name, "get_time");
    assert_eq!(p.tool_calls[1].function.arguments, r#"{"tz": "CET"}"#);
}

#[test]
fn tool_call_deltas_follow_openai_shape() {
    let deltas = stream(TWO_CALLS, false, true, &[1]);
    let calls: Vec<&ToolCallDelta> = deltas.iter().flat_map(|d| &d.tool_calls).collect();
    // The first delta of each call names it; the rest only add arguments.
    let firsts: Vec<_> = calls.iter().filter(|c| c.id.is_some()).collect();
    assert_eq!(firsts.len(), 2);
    assert_eq!(firsts[0].name.as_deref(), Some("get_weather"));
    assert_eq!(firsts[0].index, 0);
    assert_eq!(firsts[1].index, 1);
    let arg_pieces = calls
        .iter()
        .filter(|c| c.id.is_none() && c.index == 0)
        .count();
    assert!(arg_pieces > 5, "arguments stream in pieces");
}

#[test]
fn tool_markup_is_plain_content_without_tools() {
    let text = "a<｜tool▁calls▁begin｜>b";
    let p = OutputParser::parse_all(text, false, None);
    assert_eq!(p.content, text);
    assert!(p.tool_calls.is_empty());
}

#[test]
fn truncated_tool_call_keeps_what_it_has() {
    let text =
        "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>f\n```json\n{\"a\": 1";
    let p = check_all_chunkings(text, false, true);
    assert_eq!(p.tool_calls.len(), 1);
    assert_eq!(p.tool_calls[0].function.name, "f");
    assert_eq!(p.tool_calls[0].function.arguments, "{\"a\": 1");
}

#[test]
fn tool_call_without_fences() {
    let text = "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>f\n{\"a\": [1, 2]}<｜tool▁call▁end｜><｜tool▁calls▁end｜>";
    let p = check_all_chunkings(text, false, true);
    assert_eq!(p.tool_calls[0].function.arguments, "{\"a\": [1, 2]}");
    assert_eq!(p.content, "");
}

/// Whitespace around a calls block is layout: none of it becomes content, in any chunking;
/// text after the block does, and whitespace inside the answer text stays.
#[test]
fn whitespace_around_tool_calls_is_not_content() {
    let call = "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>f\n```json\n{}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>";
    let p = check_all_chunkings(
        &format!("<think>\nx\n</think>\n\n \n{call}\n\n"),
        false,
        true,
    );
    assert_eq!(p.content, "");
    assert_eq!(p.tool_calls.len(), 1);
    let p = check_all_chunkings(&format!("a  b\n\n{call}\n\nc  d\n"), false, true);
    assert_eq!(p.content, "a  bc  d\n");
    let p = check_all_chunkings("plain answer \n\n", false, true);
    assert_eq!(p.content, "plain answer \n\n");
}

#[test]
fn whitespace_before_arguments_is_not_part_of_them() {
    let text = "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>f\n```json\n\n  {\"a\": 1}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>";
    let p = check_all_chunkings(text, false, true);
    assert_eq!(p.tool_calls[0].function.arguments, "{\"a\": 1}");
}
