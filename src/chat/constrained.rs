//! Constrained answers: decoding that only lets tokens through whose bytes keep the answer a
//! valid prefix of what was asked for, and ends generation when it is complete. The reasoning
//! before `</think>` is left free. Two formats:
//! - one JSON object (`response_format: {"type": "json_object"}`);
//! - one R1 tool call (`tool_choice` "required" or naming a function): the call markers, one
//!   of the allowed function names, and JSON-object arguments, in the R1-0528 layout that
//!   [`super::tool_calls`] parses.

use std::sync::Arc;

use super::tool_calls::{CALLS_BEGIN, CALLS_END, CALL_BEGIN, CALL_END, SEP};
use super::Tokenizer;

/// Every token's bytes (byte-level BPE pieces mapped back to raw bytes; added tokens as their
/// text); `None` for special tokens, which never belong in JSON.
#[derive(Debug)]
pub struct TokenBytes(Vec<Option<Vec<u8>>>);

impl TokenBytes {
    pub fn from_tokenizer(tok: &Tokenizer, vocab_size: usize) -> Self {
        let inner = tok.inner();
        let added = inner.get_added_tokens_decoder();
        let unicode_to_byte = byte_level_inverse();
        let table = (0..vocab_size as u32)
            .map(|id| {
                if let Some(t) = added.get(&id) {
                    return (!t.special).then(|| t.content.as_bytes().to_vec());
                }
                let piece = inner.id_to_token(id)?;
                let mut bytes = Vec::with_capacity(piece.len());
                for c in piece.chars() {
                    match unicode_to_byte(c) {
                        Some(b) => bytes.push(b),
                        // Not a byte-level vocabulary: decode the token on its own.
                        None => return tok.decode(&[id], false).ok().map(String::into_bytes),
                    }
                }
                Some(bytes)
            })
            .collect();
        TokenBytes(table)
    }

    pub fn get(&self, id: u32) -> Option<&[u8]> {
        self.0.get(id as usize)?.as_deref()
    }
}

/// The inverse of GPT-2's byte-to-unicode table used by byte-level BPE.
fn byte_level_inverse() -> impl Fn(char) -> Option<u8> {
    let direct =
        |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let shifted: Vec<u8> = (0u32..256)
        .filter(|&b| !direct(b))
        .map(|b| b as u8)
        .collect();
    move |c: char| {
        let u = c as u32;
        if u < 256 && direct(u) {
            Some(u as u8)
        } else if (256..256 + shifted.len() as u32).contains(&u) {
            Some(shifted[(u - 256) as usize])
        } else {
            None
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Num {
    Minus,
    Zero,
    Int,
    Dot,
    Frac,
    E,
    ESign,
    Exp,
}

impl Num {
    fn can_end(self) -> bool {
        matches!(self, Num::Zero | Num::Int | Num::Frac | Num::Exp)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Before the top-level object.
    Start,
    /// Expecting a value.
    Value,
    /// After `{`: a key or `}`.
    KeyOrEnd,
    /// After `,` in an object: a key.
    Key,
    /// After a key: `:`.
    Colon,
    /// After a value: `,` or the closing bracket.
    After,
    /// After `[`: a value or `]`.
    ValueOrEnd,
    /// Inside a string; `esc`: 0 none, 1 after `\`, 2..=5 hex digits of `\u` left + 1.
    Str {
        key: bool,
        esc: u8,
    },
    Number(Num),
    /// Inside `true`/`false`/`null`: the bytes still expected.
    Literal(&'static [u8]),
    /// The top-level object is closed.
    End,
}

/// An incremental JSON validator over bytes: the text fed so far must be a prefix of one JSON
/// object (whitespace around it allowed).
#[derive(Debug, Clone)]
pub struct JsonValidator {
    stack: Vec<u8>,
    mode: Mode,
}

impl Default for JsonValidator {
    fn default() -> Self {
        JsonValidator {
            stack: Vec::new(),
            mode: Mode::Start,
        }
    }
}

fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

impl JsonValidator {
    /// Whether the object is complete.
    pub fn complete(&self) -> bool {
        self.mode == Mode::End
    }

    /// Feeds bytes; false (and an unspecified state) when they cannot continue valid JSON.
    pub fn feed(&mut self, bytes: &[u8]) -> bool {
        bytes.iter().all(|&b| self.byte(b))
    }

    fn close_value(&mut self) {
        self.mode = if self.stack.is_empty() {
            Mode::End
        } else {
            Mode::After
        };
    }

    fn start_value(&mut self, b: u8) -> bool {
        match b {
            b'{' => {
                self.stack.push(b'{');
                self.mode = Mode::KeyOrEnd;
            }
            b'[' => {
                self.stack.push(b'[');
                self.mode = Mode::ValueOrEnd;
            }
            b'"' => self.mode = Mode::Str { key: false, esc: 0 },
            b'-' => self.mode = Mode::Number(Num::Minus),
            b'0' => self.mode = Mode::Number(Num::Zero),
            b'1'..=b'9' => self.mode = Mode::Number(Num::Int),
            b't' => self.mode = Mode::Literal(b"rue"),
            b'f' => self.mode = Mode::Literal(b"alse"),
            b'n' => self.mode = Mode::Literal(b"ull"),
            _ => return false,
        }
        true
    }

    fn byte(&mut self, b: u8) -> bool {
        match self.mode {
            Mode::Start => {
                if is_ws(b) {
                    return true;
                }
                if b != b'{' {
                    return false;
                }
                self.stack.push(b'{');
                self.mode = Mode::KeyOrEnd;
                true
            }
            Mode::End => is_ws(b),
            Mode::Value => is_ws(b) || self.start_value(b),
            Mode::ValueOrEnd => {
                if is_ws(b) {
                    true
                } else if b == b']' {
                    self.stack.pop();
                    self.close_value();
                    true
                } else {
                    self.start_value(b)
                }
            }
            Mode::KeyOrEnd | Mode::Key => {
                if is_ws(b) {
                    true
                } else if b == b'"' {
                    self.mode = Mode::Str { key: true, esc: 0 };
                    true
                } else if b == b'}' && self.mode == Mode::KeyOrEnd {
                    self.stack.pop();
                    self.close_value();
                    true
                } else {
                    false
                }
            }
            Mode::Colon => {
                if is_ws(b) {
                    true
                } else if b == b':' {
                    self.mode = Mode::Value;
                    true
                } else {
                    false
                }
            }
            Mode::After => match b {
                _ if is_ws(b) => true,
                b',' => {
                    self.mode = if self.stack.last() == Some(&b'{') {
                        Mode::Key
                    } else {
                        Mode::Value
                    };
                    true
                }
                b'}' | b']' => {
                    let open = if b == b'}' { b'{' } else { b'[' };
                    if self.stack.last() != Some(&open) {
                        return false;
                    }
                    self.stack.pop();
                    self.close_value();
                    true
                }
                _ => false,
            },
            Mode::Str { key, esc } => {
                match esc {
                    0 => match b {
                        b'"' => {
                            if key {
                                self.mode = Mode::Colon;
                            } else {
                                self.close_value();
                            }
                        }
                        b'\\' => self.mode = Mode::Str { key, esc: 1 },
                        0..=0x1f => return false,
                        _ => {}
                    },
                    1 => match b {
                        b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => {
                            self.mode = Mode::Str { key, esc: 0 }
                        }
                        b'u' => self.mode = Mode::Str { key, esc: 5 },
                        _ => return false,
                    },
                    n => {
                        if !b.is_ascii_hexdigit() {
                            return false;
                        }
                        self.mode = Mode::Str {
                            key,
                            esc: if n == 2 { 0 } else { n - 1 },
                        };
                    }
                }
                true
            }
            Mode::Literal(rest) => {
                if rest.first() != Some(&b) {
                    return false;
                }
                if rest.len() == 1 {
                    self.close_value();
                } else {
                    self.mode = Mode::Literal(&rest[1..]);
                }
                true
            }
            Mode::Number(n) => {
                let next = match (n, b) {
                    (Num::Minus, b'0') => Some(Num::Zero),
                    (Num::Minus, b'1'..=b'9') => Some(Num::Int),
                    (Num::Int, b'0'..=b'9') => Some(Num::Int),
                    (Num::Zero | Num::Int, b'.') => Some(Num::Dot),
                    (Num::Dot | Num::Frac, b'0'..=b'9') => Some(Num::Frac),
                    (Num::Zero | Num::Int | Num::Frac, b'e' | b'E') => Some(Num::E),
                    (Num::E, b'+' | b'-') => Some(Num::ESign),
                    (Num::E | Num::ESign | Num::Exp, b'0'..=b'9') => Some(Num::Exp),
                    _ => None,
                };
                match next {
                    Some(n) => {
                        self.mode = Mode::Number(n);
                        true
                    }
                    None if n.can_end() => {
                        self.close_value();
                        self.byte(b)
                    }
                    None => false,
                }
            }
        }
    }
}

/// What the answer (after any reasoning) must be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AnswerFormat {
    /// One JSON object.
    JsonObject,
    /// One tool call to one of `names` (a single name: that function), arguments a JSON object.
    ToolCall { names: Vec<String> },
}

/// A piece of the answer's grammar.
#[derive(Debug)]
enum Piece {
    Literal(Vec<u8>),
    /// Exactly one of these (none is a prefix of another).
    OneOf(Vec<Vec<u8>>),
    JsonObject,
}

impl AnswerFormat {
    fn pieces(&self) -> Vec<Piece> {
        match self {
            AnswerFormat::JsonObject => vec![Piece::JsonObject],
            AnswerFormat::ToolCall { names } => vec![
                Piece::Literal(format!("{CALLS_BEGIN}{CALL_BEGIN}function{SEP}").into_bytes()),
                // The fence after the name ends it, so no name is a prefix of another.
                Piece::OneOf(
                    names
                        .iter()
                        .map(|n| format!("{n}\n```json\n").into_bytes())
                        .collect(),
                ),
                Piece::JsonObject,
                Piece::Literal(format!("\n```{CALL_END}{CALLS_END}").into_bytes()),
            ],
        }
    }
}

/// Where the answer is in its grammar.
#[derive(Debug, Clone)]
struct Grammar {
    pieces: Arc<[Piece]>,
    /// The current piece; `pieces.len()` when the answer is complete.
    at: usize,
    /// Bytes of the current literal / one-of piece matched so far.
    matched: Vec<u8>,
    json: JsonValidator,
}

impl Grammar {
    fn new(format: &AnswerFormat) -> Self {
        Grammar {
            pieces: format.pieces().into(),
            at: 0,
            matched: Vec::new(),
            json: JsonValidator::default(),
        }
    }

    fn complete(&self) -> bool {
        self.at == self.pieces.len()
    }

    fn next_piece(&mut self) {
        self.at += 1;
        self.matched.clear();
        self.json = JsonValidator::default();
    }

    /// Feeds bytes; false (and an unspecified state) when they cannot continue the answer.
    fn feed(&mut self, bytes: &[u8]) -> bool {
        bytes.iter().all(|&b| self.byte(b))
    }

    fn byte(&mut self, b: u8) -> bool {
        // Whitespace may come before the answer and after it (a closing token often carries
        // trailing newlines), nothing else.
        let Some(piece) = self.pieces.get(self.at) else {
            return is_ws(b);
        };
        match piece {
            // Leading whitespace (a JSON object's is the validator's business).
            Piece::Literal(_) if self.at == 0 && self.matched.is_empty() && is_ws(b) => {}
            Piece::Literal(text) => {
                if text.get(self.matched.len()) != Some(&b) {
                    return false;
                }
                self.matched.push(b);
                if self.matched.len() == text.len() {
                    self.next_piece();
                }
            }
            Piece::OneOf(options) => {
                self.matched.push(b);
                if !options.iter().any(|o| o.starts_with(&self.matched)) {
                    return false;
                }
                if options.contains(&self.matched) {
                    self.next_piece();
                }
            }
            Piece::JsonObject => {
                if !self.json.byte(b) {
                    return false;
                }
                if self.json.complete() {
                    self.next_piece();
                }
            }
        }
        true
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Not yet known whether the output opens with `<think>`.
    Start,
    Reasoning,
    Answer,
}

/// Per-request answer constraint for the scheduler.
#[derive(Debug, Clone)]
pub struct AnswerConstraint {
    table: Arc<TokenBytes>,
    grammar: Grammar,
    phase: Phase,
    think_open: Option<u32>,
    think_close: Option<u32>,
}

impl AnswerConstraint {
    /// `in_reasoning`: the prompt opened `<think>`; reasoning (free text) runs until
    /// `think_close`. An output that starts with `think_open` reasons first too.
    pub fn new(
        table: Arc<TokenBytes>,
        format: &AnswerFormat,
        in_reasoning: bool,
        think_open: Option<u32>,
        think_close: Option<u32>,
    ) -> Self {
        AnswerConstraint {
            table,
            grammar: Grammar::new(format),
            phase: if in_reasoning {
                Phase::Reasoning
            } else {
                Phase::Start
            },
            think_open,
            think_close,
        }
    }

    /// Whether tokens are being constrained now (not inside the reasoning).
    pub fn active(&self) -> bool {
        self.phase != Phase::Reasoning
    }

    pub fn allows(&self, token: u32) -> bool {
        match self.phase {
            Phase::Reasoning => true,
            Phase::Start if Some(token) == self.think_open => true,
            Phase::Start | Phase::Answer => match self.table.get(token) {
                Some(bytes) if !bytes.is_empty() => self.grammar.clone().feed(bytes),
                _ => false,
            },
        }
    }

    pub fn accept(&mut self, token: u32) {
        match self.phase {
            Phase::Reasoning => {
                if Some(token) == self.think_close {
                    self.phase = Phase::Answer;
                }
            }
            Phase::Start if Some(token) == self.think_open => self.phase = Phase::Reasoning,
            Phase::Start | Phase::Answer => {
                self.phase = Phase::Answer;
                if let Some(bytes) = self.table.get(token) {
                    self.grammar.feed(bytes);
                }
            }
        }
    }

    /// The answer is complete: generation should end.
    pub fn complete(&self) -> bool {
        self.grammar.complete()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid_prefix(s: &str) -> bool {
        JsonValidator::default().feed(s.as_bytes())
    }

    #[test]
    fn accepts_json_object_prefixes() {
        let doc = r#" {"a": [1, -2.5e+3, true, null, "x\"\u00e9y"], "b": {"c": {}}, "d": []} "#;
        for i in 0..=doc.len() {
            assert!(valid_prefix(&doc[..i]), "{:?}", &doc[..i]);
        }
        let mut v = JsonValidator::default();
        assert!(v.feed(doc.trim().as_bytes()));
        assert!(v.complete());
    }

    #[test]
    fn rejects_invalid_json() {
        for bad in [
            "[1]",
            "x",
            "{a",
            "{\"a\" 1",
            "{\"a\": tru3",
            "{\"a\": 01",
            "{\"a\": 1]",
            "{} x",
            "{\"a\":\"\u{1}\"}",
            "{\"a\": -}",
            "{,}",
        ] {
            assert!(!valid_prefix(bad), "{bad:?}");
        }
    }

    #[test]
    fn tool_call_grammar_takes_exactly_one_call_to_an_allowed_name() {
        let format = AnswerFormat::ToolCall {
            names: vec!["get".into(), "get_time".into()],
        };
        let call = |name: &str, args: &str| {
            format!("{CALLS_BEGIN}{CALL_BEGIN}function{SEP}{name}\n```json\n{args}\n```{CALL_END}{CALLS_END}")
        };
        for name in ["get", "get_time"] {
            let text = call(name, r#"{"tz": "UTC", "n": [1, 2]}"#);
            let mut g = Grammar::new(&format);
            for (i, b) in text.bytes().enumerate() {
                assert!(!g.complete(), "complete before byte {i}");
                assert!(g.byte(b), "byte {i} of {text:?}");
            }
            assert!(g.complete());
            assert!(!g.clone().feed(b"x"), "nothing after the call");
            assert!(g.clone().feed(b"\n\n"), "but whitespace");
            // The parser reads what the grammar produced.
            let mut p = super::super::tool_calls::ToolCallParser::new("t");
            let mut out = p.push(&text);
            out.calls.extend(p.finish().calls);
            assert_eq!(out.calls[0].name.as_deref(), Some(name));
        }
        for bad in [
            call("got", "{}"),
            call("get_tim", "{}"),
            call("get", "[1]"),
            call("get", "{\"a\": }"),
            "plain text".to_string(),
        ] {
            assert!(!Grammar::new(&format).feed(bad.as_bytes()), "{bad:?}");
        }
    }

    #[test]
    fn json_grammar_completes_at_the_closing_brace() {
        let mut g = Grammar::new(&AnswerFormat::JsonObject);
        assert!(!g.clone().feed(b" {\"a\n"), "a raw newline inside a string");
        assert!(g.feed(b" {\"a\": {\"b\": []}"));
        assert!(!g.complete());
        assert!(g.feed(b"}"));
        assert!(g.complete());
    }

    #[test]
    fn byte_level_inverse_roundtrips() {
        let inv = byte_level_inverse();
        assert_eq!(inv('A'), Some(b'A'));
        assert_eq!(inv('Ġ'), Some(b' '));
        assert_eq!(inv('Ċ'), Some(b'\n'));
        assert_eq!(inv('Ā'), Some(0));
    }
}
