//! Generated text to an OpenAI-style assistant message, incrementally: reasoning split off at
//! `</think>`, then (when the request offered tools) tool calls parsed out of the answer.

use super::messages::ToolCall;
use super::reasoning::ReasoningSplitter;
use super::tool_calls::{merge_call_deltas, ToolCallDelta, ToolCallParser};

/// What one piece of generated text contributes (a stream delta may carry several parts).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Delta {
    pub reasoning: String,
    pub content: String,
    pub tool_calls: Vec<ToolCallDelta>,
}

impl Delta {
    pub fn is_empty(&self) -> bool {
        self.reasoning.is_empty() && self.content.is_empty() && self.tool_calls.is_empty()
    }

    fn append(&mut self, other: Delta) {
        self.reasoning.push_str(&other.reasoning);
        self.content.push_str(&other.content);
        self.tool_calls.extend(other.tool_calls);
    }
}

/// A whole parsed response.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ParsedOutput {
    pub reasoning: String,
    pub content: String,
    pub tool_calls: Vec<ToolCall>,
}

impl ParsedOutput {
    pub fn add(&mut self, d: &Delta) {
        self.reasoning.push_str(&d.reasoning);
        self.content.push_str(&d.content);
        merge_call_deltas(&mut self.tool_calls, &d.tool_calls);
    }
}

#[derive(Debug, Clone)]
pub struct OutputParser {
    reasoning: ReasoningSplitter,
    tools: Option<ToolCallParser>,
    parsed: ParsedOutput,
}

impl OutputParser {
    /// `in_reasoning`: the prompt opened `<think>` already. `tool_ids`: parse tool calls (the
    /// request offered tools), naming them `call_<prefix><index>`.
    pub fn new(in_reasoning: bool, tool_ids: Option<&str>) -> Self {
        OutputParser {
            reasoning: ReasoningSplitter::new(in_reasoning),
            tools: tool_ids.map(ToolCallParser::new),
            parsed: ParsedOutput::default(),
        }
    }

    /// Whether the output is still inside its reasoning block.
    pub fn in_reasoning(&self) -> bool {
        self.reasoning.in_reasoning()
    }

    pub fn push(&mut self, text: &str) -> Delta {
        let split = self.reasoning.push(text);
        let d = self.route(split.reasoning, split.content, false);
        self.parsed.add(&d);
        d
    }

    /// Decides everything held back; call once at the end.
    pub fn finish(&mut self) -> Delta {
        let split = self.reasoning.finish();
        let d = self.route(split.reasoning, split.content, true);
        self.parsed.add(&d);
        d
    }

    fn route(&mut self, reasoning: String, content: String, end: bool) -> Delta {
        let mut d = Delta {
            reasoning,
            ..Delta::default()
        };
        match &mut self.tools {
            None => d.content = content,
            Some(p) => {
                let c = p.push(&content);
                d.append(Delta {
                    content: c.content,
                    tool_calls: c.calls,
                    ..Delta::default()
                });
                if end {
                    let c = p.finish();
                    d.append(Delta {
                        content: c.content,
                        tool_calls: c.calls,
                        ..Delta::default()
                    });
                }
            }
        }
        d.tool_calls = coalesce(d.tool_calls);
        d
    }

    /// Everything parsed so far.
    pub fn parsed(&self) -> &ParsedOutput {
        &self.parsed
    }

    /// Parses a whole output at once.
    pub fn parse_all(text: &str, in_reasoning: bool, tool_ids: Option<&str>) -> ParsedOutput {
        let mut p = OutputParser::new(in_reasoning, tool_ids);
        p.push(text);
        p.finish();
        p.parsed
    }
}

/// Merges consecutive deltas of the same call.
fn coalesce(deltas: Vec<ToolCallDelta>) -> Vec<ToolCallDelta> {
    let mut out: Vec<ToolCallDelta> = Vec::new();
    for d in deltas {
        match out.last_mut() {
            Some(last) if last.index == d.index && d.id.is_none() => {
                last.arguments.push_str(&d.arguments)
            }
            _ => out.push(d),
        }
    }
    out
}
