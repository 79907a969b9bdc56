//! Constrained answers: decoding that only lets tokens through whose bytes keep the answer a
//! valid prefix of what was asked for, and ends generation when it is complete. The reasoning
//! before `</think>` is left free. Two formats:
//! - one JSON object (`response_format: {"type": "json_object"}`);
//! - one R1 tool call (`tool_choice` "required" or naming a function): the call markers, one
//!   of the allowed function names, and JSON-object arguments, in the R1-0528 layout that
//!   `chat::tool_calls` parses.

use std::sync::Arc;

use super::markup::{CALLS_BEGIN, CALLS_END, CALL_BEGIN, CALL_END, SEP, THINK_CLOSE, THINK_OPEN};
use super::token_bytes::TokenBytes;
use super::Tokenizer;

mod json;
mod schema;

pub use json::JsonValidator;
use json::{is_ws, WsRun};
pub use schema::{Schema, SchemaValidator};

/// What the answer (after any reasoning) must be.
#[derive(Debug, Clone)]
pub enum AnswerFormat {
    /// One JSON object.
    JsonObject,
    /// One JSON value conforming to a schema (whose root is an object).
    JsonSchema(Arc<Schema>),
    /// One tool call to one of `tools` (a single one: that function); the arguments are a
    /// JSON object, conforming to the tool's schema where it has one.
    ToolCall {
        tools: Vec<(String, Option<Arc<Schema>>)>,
    },
}

/// A piece of the answer's grammar.
#[derive(Debug)]
enum Piece {
    Literal(Vec<u8>),
    /// Exactly one of these (none is a prefix of another); which one picks the schema of a
    /// later `Arguments` piece.
    OneOf(Vec<Vec<u8>>),
    /// A JSON object, or a value of the schema: one per option of the last `OneOf`, or one.
    Value(Vec<Option<Arc<Schema>>>),
}

impl Piece {
    /// The fixed texts a piece may be (none for a value).
    fn texts(&self) -> &[Vec<u8>] {
        match self {
            Piece::Literal(text) => std::slice::from_ref(text),
            Piece::OneOf(options) => options,
            Piece::Value(_) => &[],
        }
    }
}

impl AnswerFormat {
    fn pieces(&self) -> Vec<Piece> {
        match self {
            AnswerFormat::JsonObject => vec![Piece::Value(vec![None])],
            AnswerFormat::JsonSchema(schema) => vec![Piece::Value(vec![Some(Arc::clone(schema))])],
            AnswerFormat::ToolCall { tools } => vec![
                Piece::Literal(format!("{CALLS_BEGIN}{CALL_BEGIN}function{SEP}").into_bytes()),
                // The fence after the name ends it, so no name is a prefix of another.
                Piece::OneOf(
                    tools
                        .iter()
                        .map(|(n, _)| format!("{n}\n```json\n").into_bytes())
                        .collect(),
                ),
                Piece::Value(tools.iter().map(|(_, s)| s.clone()).collect()),
                Piece::Literal(format!("\n```{CALL_END}{CALLS_END}").into_bytes()),
            ],
        }
    }
}

/// The value being read in a `Value` piece.
#[derive(Debug, Clone)]
enum ValueState {
    Json(JsonValidator),
    Schema(SchemaValidator),
}

/// Where the answer is in its grammar.
#[derive(Debug, Clone)]
struct Grammar {
    pieces: Arc<[Piece]>,
    /// The current piece; `pieces.len()` when the answer is complete.
    at: usize,
    /// Bytes of the current literal / one-of piece matched so far.
    matched: Vec<u8>,
    /// The option the last one-of piece matched.
    chosen: usize,
    /// The value being read (in a `Value` piece).
    value: Option<ValueState>,
    /// Whitespace before the first literal.
    ws: WsRun,
}

impl Grammar {
    fn new(format: &AnswerFormat) -> Self {
        let mut g = Grammar {
            pieces: format.pieces().into(),
            at: 0,
            matched: Vec::new(),
            chosen: 0,
            value: None,
            ws: WsRun::default(),
        };
        g.enter_piece();
        g
    }

    fn complete(&self) -> bool {
        self.at == self.pieces.len()
    }

    fn next_piece(&mut self) {
        self.at += 1;
        self.matched.clear();
        self.enter_piece();
    }

    fn enter_piece(&mut self) {
        self.value = match self.pieces.get(self.at) {
            Some(Piece::Value(schemas)) => Some(
                match schemas
                    .get(self.chosen)
                    .or(schemas.first())
                    .cloned()
                    .flatten()
                {
                    Some(schema) => ValueState::Schema(SchemaValidator::new(schema)),
                    None => ValueState::Json(JsonValidator::default()),
                },
            ),
            _ => None,
        };
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
            // Leading whitespace (a JSON value's is the validator's business).
            Piece::Literal(_) if self.at == 0 && self.matched.is_empty() && is_ws(b) => {
                return self.ws.admit(b, true);
            }
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
                if let Some(i) = options.iter().position(|o| *o == self.matched) {
                    self.chosen = i;
                    self.next_piece();
                }
            }
            Piece::Value(_) => {
                let complete = match &mut self.value {
                    Some(ValueState::Json(v)) => v.byte(b).then(|| v.complete()),
                    Some(ValueState::Schema(v)) => v.byte(b).then(|| v.complete()),
                    None => None,
                };
                match complete {
                    None => return false,
                    Some(true) => self.next_piece(),
                    Some(false) => {}
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
    /// Per piece, per option of its fixed text: the tokenizer's own tokens for it (empty where
    /// the piece is not fixed text or the tokens do not spell it exactly).
    spellings: Arc<[Vec<Vec<u32>>]>,
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
        tokenizer: &Tokenizer,
    ) -> Self {
        let grammar = Grammar::new(format);
        let spell = |text: &[u8]| -> Vec<u32> {
            let Some(tokens) = std::str::from_utf8(text)
                .ok()
                .and_then(|t| tokenizer.encode(t).ok())
            else {
                return Vec::new();
            };
            let spelled: Option<Vec<u8>> = tokens
                .iter()
                .map(|&t| table.get(t).map(<[u8]>::to_vec))
                .collect::<Option<Vec<_>>>()
                .map(|parts| parts.concat());
            if spelled.as_deref() == Some(text) {
                tokens
            } else {
                Vec::new()
            }
        };
        let spellings: Arc<[Vec<Vec<u32>>]> = grammar
            .pieces
            .iter()
            .map(|p| p.texts().iter().map(|t| spell(t)).collect())
            .collect();
        AnswerConstraint {
            table,
            spellings,
            grammar,
            phase: if in_reasoning {
                Phase::Reasoning
            } else {
                Phase::Start
            },
            think_open: tokenizer.token_to_id(THINK_OPEN),
            think_close: tokenizer.token_to_id(THINK_CLOSE),
        }
    }

    /// The token fixed text (tool-call markers, a forced function's name) continues with, at
    /// a boundary of that text's own tokenization: where the model's choice does not fit, the
    /// markup is written as the model would write it (a marker is one token) rather than
    /// sampled among byte spellings it would never use.
    pub fn forced(&self) -> Option<u32> {
        if self.phase != Phase::Answer {
            return None;
        }
        let g = &self.grammar;
        let texts = g.pieces.get(g.at)?.texts();
        let spellings = self.spellings.get(g.at)?;
        let mut candidates = texts
            .iter()
            .zip(spellings)
            .filter(|(text, _)| text.starts_with(&g.matched));
        let (_, tokens) = candidates.next()?;
        if candidates.next().is_some() {
            return None;
        }
        let mut at = 0;
        for &t in tokens {
            if at == g.matched.len() {
                return Some(t);
            }
            at += self.table.get(t)?.len();
        }
        None
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

    #[test]
    fn tool_call_grammar_takes_exactly_one_call_to_an_allowed_name() {
        let format = AnswerFormat::ToolCall {
            tools: vec![("get".into(), None), ("get_time".into(), None)],
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
}
