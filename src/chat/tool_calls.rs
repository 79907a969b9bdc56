//! DeepSeek-R1-0528 tool calls in the answer text, parsed incrementally into OpenAI
//! `tool_calls`:
//!
//! ```text
//! <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME
//! ```json
//! {"arg": 1}
//! ```<｜tool▁call▁end｜>
//! <｜tool▁call▁begin｜>…<｜tool▁call▁end｜><｜tool▁calls▁end｜>
//! ```
//!
//! Text before the calls block is ordinary content. While streaming, a call's first delta
//! carries its index, id and name; later ones carry pieces of its arguments.

use super::messages::{FunctionCall, ToolCall};
use crate::text::markup::{CALLS_BEGIN, CALLS_END, CALL_BEGIN, CALL_END, SEP};
use crate::text::stop::partial_suffix;

/// One streamed piece of a tool call (OpenAI `delta.tool_calls[i]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolCallDelta {
    pub index: usize,
    /// Present on a call's first delta.
    pub id: Option<String>,
    /// Present on a call's first delta.
    pub name: Option<String>,
    pub arguments: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContentDelta {
    pub content: String,
    pub calls: Vec<ToolCallDelta>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Ordinary content.
    Text,
    /// Inside the calls block, between calls.
    Between,
    /// After `<｜tool▁call▁begin｜>`, reading the type up to `<｜tool▁sep｜>`.
    Header,
    /// Reading the function name up to the end of the line.
    Name,
    /// Expecting the opening fence (```` ```json ````) of the arguments.
    Fence,
    /// Reading the arguments; `emitted` bytes of them were already streamed.
    Args { emitted: usize },
    /// After `<｜tool▁calls▁end｜>`; `text`: non-whitespace text has come (whitespace right
    /// after the calls is layout and dropped).
    After { text: bool },
}

#[derive(Debug, Clone)]
pub struct ToolCallParser {
    state: State,
    buf: String,
    id_prefix: String,
    /// Index of the call being parsed (= calls started so far, once one has).
    index: usize,
}

impl ToolCallParser {
    /// Call ids are `call_<id_prefix><index>`.
    pub fn new(id_prefix: &str) -> Self {
        ToolCallParser {
            state: State::Text,
            buf: String::new(),
            id_prefix: id_prefix.to_string(),
            index: 0,
        }
    }

    /// Calls started so far.
    pub fn calls_started(&self) -> usize {
        match self.state {
            State::Fence | State::Args { .. } => self.index + 1,
            _ => self.index,
        }
    }

    fn start_call(&mut self, name: &str, out: &mut ContentDelta) {
        out.calls.push(ToolCallDelta {
            index: self.index,
            id: Some(format!("call_{}{}", self.id_prefix, self.index)),
            name: Some(name.trim().to_string()),
            arguments: String::new(),
        });
    }

    fn args_delta(&mut self, text: &str, out: &mut ContentDelta) {
        if text.is_empty() {
            return;
        }
        match out.calls.last_mut() {
            Some(d) if d.index == self.index => d.arguments.push_str(text),
            _ => out.calls.push(ToolCallDelta {
                index: self.index,
                id: None,
                name: None,
                arguments: text.to_string(),
            }),
        }
    }

    pub fn push(&mut self, text: &str) -> ContentDelta {
        self.buf.push_str(text);
        let mut out = ContentDelta::default();
        self.run(&mut out, false);
        out
    }

    /// The end of the output: an unfinished call is closed with what it has.
    pub fn finish(&mut self) -> ContentDelta {
        let mut out = ContentDelta::default();
        self.run(&mut out, true);
        out
    }

    fn run(&mut self, out: &mut ContentDelta, end: bool) {
        loop {
            match self.state {
                State::Text => {
                    let found = [CALLS_BEGIN, CALL_BEGIN]
                        .iter()
                        .filter_map(|m| self.buf.find(m).map(|i| (i, *m)))
                        .min();
                    if let Some((i, marker)) = found {
                        // Whitespace right before the calls is layout, not content.
                        out.content.push_str(self.buf[..i].trim_end());
                        self.buf.drain(..i + marker.len());
                        self.state = if marker == CALLS_BEGIN {
                            State::Between
                        } else {
                            State::Header
                        };
                        continue;
                    }
                    let hold = if end {
                        0
                    } else {
                        // A possible marker start, and the whitespace before it (held until
                        // text follows: it is dropped if the calls begin).
                        let marker = partial_suffix(&self.buf, CALLS_BEGIN)
                            .max(partial_suffix(&self.buf, CALL_BEGIN));
                        let before = &self.buf[..self.buf.len() - marker];
                        marker + (before.len() - before.trim_end().len())
                    };
                    let cut = self.buf.len() - hold;
                    out.content.push_str(&self.buf[..cut]);
                    self.buf.drain(..cut);
                    return;
                }
                State::Between => {
                    let t = self.buf.trim_start();
                    if let Some(rest) = t.strip_prefix(CALL_BEGIN) {
                        self.buf = rest.to_string();
                        self.state = State::Header;
                    } else if let Some(rest) = t.strip_prefix(CALLS_END) {
                        self.buf = rest.to_string();
                        self.state = State::After { text: false };
                    } else if t.is_empty()
                        || (!end && (CALL_BEGIN.starts_with(t) || CALLS_END.starts_with(t)))
                    {
                        self.buf = t.to_string();
                        return;
                    } else {
                        // Stray text between calls: skip to the next marker candidate.
                        let first = t.chars().next().map_or(1, char::len_utf8);
                        let skip = t[first..].find('<').map_or(t.len(), |i| i + first);
                        self.buf = t[skip..].to_string();
                    }
                }
                State::Header => match self.buf.find(SEP) {
                    Some(i) => {
                        self.buf.drain(..i + SEP.len());
                        self.state = State::Name;
                    }
                    None => {
                        if end {
                            self.buf.clear();
                        }
                        return;
                    }
                },
                State::Name => {
                    let newline = self.buf.find('\n');
                    let call_end = self.buf.find(CALL_END);
                    match (newline, call_end) {
                        (_, Some(j)) if newline.is_none_or(|i| j < i) => {
                            // A call without arguments.
                            let name = self.buf[..j].to_string();
                            self.start_call(&name, out);
                            self.buf.drain(..j + CALL_END.len());
                            self.index += 1;
                            self.state = State::Between;
                        }
                        (Some(i), _) => {
                            let name = self.buf[..i].to_string();
                            self.start_call(&name, out);
                            self.buf.drain(..i + 1);
                            self.state = State::Fence;
                        }
                        _ => {
                            if end && !self.buf.trim().is_empty() {
                                let name = std::mem::take(&mut self.buf);
                                self.start_call(&name, out);
                                self.index += 1;
                            }
                            return;
                        }
                    }
                }
                State::Fence => {
                    let t = self.buf.trim_start_matches([' ', '\t', '\r', '\n']);
                    if t.starts_with("```") {
                        match t.find('\n') {
                            Some(i) => {
                                self.buf = t[i + 1..].to_string();
                                self.state = State::Args { emitted: 0 };
                            }
                            None if end => {
                                self.buf.clear();
                                self.state = State::Args { emitted: 0 };
                            }
                            None => return,
                        }
                    } else if t.is_empty() || (!end && "```".starts_with(t)) {
                        if end {
                            self.buf.clear();
                            self.state = State::Args { emitted: 0 };
                            continue;
                        }
                        return;
                    } else {
                        self.buf = t.to_string();
                        self.state = State::Args { emitted: 0 };
                    }
                }
                State::Args { emitted } => {
                    if emitted == 0 {
                        // Whitespace before the arguments is layout.
                        let t = self.buf.trim_start();
                        if t.len() != self.buf.len() {
                            self.buf = t.to_string();
                        }
                    }
                    let close = self.buf.find(CALL_END);
                    if close.is_some() || end {
                        let body = &self.buf[..close.unwrap_or(self.buf.len())];
                        let args = strip_fence(body);
                        let rest = args.get(emitted..).unwrap_or("").to_string();
                        self.args_delta(&rest, out);
                        self.buf
                            .drain(..close.map_or(self.buf.len(), |i| i + CALL_END.len()));
                        self.index += 1;
                        self.state = State::Between;
                        if end {
                            self.buf.clear();
                            return;
                        }
                        continue;
                    }
                    let safe = self.buf.len() - terminator_hold(&self.buf);
                    if safe > emitted {
                        let piece = self.buf[emitted..safe].to_string();
                        self.args_delta(&piece, out);
                        self.state = State::Args { emitted: safe };
                    }
                    return;
                }
                State::After { text } => {
                    let t = if text {
                        self.buf.as_str()
                    } else {
                        self.buf.trim_start()
                    };
                    if !t.is_empty() {
                        out.content.push_str(t);
                        self.state = State::After { text: true };
                    }
                    self.buf.clear();
                    return;
                }
            }
        }
    }
}

/// Arguments text without the closing fence and surrounding whitespace.
fn strip_fence(body: &str) -> &str {
    let t = body.trim_end();
    t.strip_suffix("```").unwrap_or(t).trim_end()
}

/// How many trailing bytes of an arguments buffer might belong to its terminator
/// (whitespace, the closing fence, a partial `<｜tool▁call▁end｜>`), so must wait.
fn terminator_hold(buf: &str) -> usize {
    let mut end = buf.len() - partial_suffix(buf, CALL_END);
    end = buf[..end].trim_end().len();
    let ticks = buf[..end].len() - buf[..end].trim_end_matches('`').len();
    if ticks <= 3 {
        end -= ticks;
        end = buf[..end].trim_end().len();
    }
    buf.len() - end
}

/// Accumulates streamed tool-call deltas into whole calls.
pub fn merge_call_deltas(calls: &mut Vec<ToolCall>, deltas: &[ToolCallDelta]) {
    for d in deltas {
        while calls.len() <= d.index {
            calls.push(ToolCall {
                id: String::new(),
                kind: "function".into(),
                function: FunctionCall {
                    name: String::new(),
                    arguments: String::new(),
                },
            });
        }
        let c = &mut calls[d.index];
        if let Some(id) = &d.id {
            c.id = id.clone();
        }
        if let Some(name) = &d.name {
            c.function.name = name.clone();
        }
        c.function.arguments.push_str(&d.arguments);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The layout a constrained tool-call answer is written in (text::constrained's grammar
    /// accepts exactly this) parses back into the call.
    #[test]
    fn parses_the_constrained_call_layout() {
        for name in ["get", "get_time"] {
            let args = r#"{"tz": "UTC", "n": [1, 2]}"#;
            let text = format!(
                "{CALLS_BEGIN}{CALL_BEGIN}function{SEP}{name}\n```json\n{args}\n```{CALL_END}{CALLS_END}"
            );
            let mut p = ToolCallParser::new("t");
            let mut out = p.push(&text);
            out.calls.extend(p.finish().calls);
            assert_eq!(out.calls[0].name.as_deref(), Some(name));
            let mut calls = Vec::new();
            merge_call_deltas(&mut calls, &out.calls);
            assert_eq!(calls.len(), 1);
            assert_eq!(calls[0].function.arguments, args);
        }
    }
}
