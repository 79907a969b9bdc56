//! Splitting R1's output into reasoning (up to `</think>`) and answer, incrementally: text
//! arrives in arbitrary pieces (a tag may be split across them) and each piece yields what is
//! certain so far. The tags themselves never appear in either part; whitespace right inside
//! the reasoning block and right after `</think>` is dropped.

use crate::text::markup::{THINK_CLOSE, THINK_OPEN};
use crate::text::stop::partial_suffix;

/// Text decided by one [`ReasoningSplitter::push`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Split {
    pub reasoning: String,
    pub content: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Not yet known whether the output opens with `<think>`.
    Start,
    /// Inside the reasoning; `lead`: leading whitespace still to drop.
    Reasoning { lead: bool },
    /// The answer; `lead`: leading whitespace still to drop (after `</think>`).
    Content { lead: bool },
}

#[derive(Debug, Clone)]
pub struct ReasoningSplitter {
    phase: Phase,
    buf: String,
}

impl ReasoningSplitter {
    /// `in_reasoning`: the prompt already opened `<think>` (forced thinking), so the output
    /// starts as reasoning. Otherwise reasoning is whatever follows a leading `<think>`, and an
    /// output that does not open with one is all answer.
    pub fn new(in_reasoning: bool) -> Self {
        ReasoningSplitter {
            phase: if in_reasoning {
                Phase::Reasoning { lead: true }
            } else {
                Phase::Start
            },
            buf: String::new(),
        }
    }

    /// Whether the output is (still) inside the reasoning block.
    pub fn in_reasoning(&self) -> bool {
        matches!(self.phase, Phase::Reasoning { .. })
    }

    pub fn push(&mut self, text: &str) -> Split {
        self.buf.push_str(text);
        let mut out = Split::default();
        loop {
            match self.phase {
                Phase::Start => {
                    let t = self.buf.trim_start();
                    if let Some(rest) = t.strip_prefix(THINK_OPEN) {
                        self.buf = rest.to_string();
                        self.phase = Phase::Reasoning { lead: true };
                    } else if THINK_OPEN.starts_with(t) {
                        return out;
                    } else {
                        self.phase = Phase::Content { lead: false };
                    }
                }
                Phase::Reasoning { lead } => {
                    if lead {
                        let t = self.buf.trim_start();
                        if t.is_empty() {
                            self.buf.clear();
                            return out;
                        }
                        self.buf = t.to_string();
                        self.phase = Phase::Reasoning { lead: false };
                    }
                    if let Some(i) = self.buf.find(THINK_CLOSE) {
                        out.reasoning.push_str(self.buf[..i].trim_end());
                        self.buf.drain(..i + THINK_CLOSE.len());
                        self.phase = Phase::Content { lead: true };
                        continue;
                    }
                    let safe = self.buf.len() - partial_suffix(&self.buf, THINK_CLOSE);
                    // Trailing whitespace waits: it is dropped if `</think>` follows.
                    let cut = self.buf[..safe].trim_end().len();
                    out.reasoning.push_str(&self.buf[..cut]);
                    self.buf.drain(..cut);
                    return out;
                }
                Phase::Content { lead } => {
                    if lead {
                        let t = self.buf.trim_start();
                        if t.is_empty() {
                            self.buf.clear();
                            return out;
                        }
                        self.buf = t.to_string();
                        self.phase = Phase::Content { lead: false };
                    }
                    out.content.push_str(&self.buf);
                    self.buf.clear();
                    return out;
                }
            }
        }
    }

    /// The end of the output: whatever was held back is decided.
    pub fn finish(&mut self) -> Split {
        let mut out = Split::default();
        let rest = std::mem::take(&mut self.buf);
        match self.phase {
            Phase::Start => out.content = rest,
            Phase::Reasoning { .. } => out.reasoning = rest.trim_end().to_string(),
            Phase::Content { .. } => out.content = rest,
        }
        out
    }
}
