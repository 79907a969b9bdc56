//! Decoding that streams only complete UTF-8: bytes of a multi-byte character split over
//! several tokens (byte-level BPE, byte-fallback pieces) are held back until the character is
//! whole.

use super::tokenizer::Tokenizer;
use crate::error::Result;

/// Turns tokens into text deltas one at a time. Each delta is valid UTF-8 and concatenated
/// deltas (plus [`IncrementalDecoder::finish`]) equal decoding all tokens at once.
///
/// It decodes a short window of recent tokens twice (with and without the newest) and emits
/// the difference once it does not end in U+FFFD (an incomplete character); the window keeps
/// decoders that strip a leading space (SentencePiece) honest.
#[derive(Debug, Clone)]
pub struct IncrementalDecoder {
    tokenizer: Tokenizer,
    skip_special: bool,
    ids: Vec<u32>,
    /// Start of the window used as left context.
    prefix: usize,
    /// Tokens before this have been emitted.
    read: usize,
}

impl IncrementalDecoder {
    pub fn new(tokenizer: Tokenizer, skip_special: bool) -> Self {
        IncrementalDecoder {
            tokenizer,
            skip_special,
            ids: Vec::new(),
            prefix: 0,
            read: 0,
        }
    }

    /// Adds one token; returns the text that became complete (possibly empty).
    pub fn step(&mut self, id: u32) -> Result<String> {
        self.ids.push(id);
        let (before, after) = self.window()?;
        if after.len() > before.len() && !after.ends_with('\u{FFFD}') {
            let delta = after[common_prefix(&before, &after)..].to_string();
            self.prefix = self.read;
            self.read = self.ids.len();
            // Keep the buffer short: only the window is ever decoded again.
            if self.prefix > 64 {
                self.ids.drain(..self.prefix);
                self.read -= self.prefix;
                self.prefix = 0;
            }
            Ok(delta)
        } else {
            Ok(String::new())
        }
    }

    /// Whatever is still held back. An incomplete character at the very end (the output was
    /// cut inside it) is dropped rather than turned into U+FFFD.
    pub fn finish(&mut self) -> Result<String> {
        if self.read == self.ids.len() {
            return Ok(String::new());
        }
        let (before, after) = self.window()?;
        self.prefix = self.read;
        self.read = self.ids.len();
        let rest = &after[common_prefix(&before, &after)..];
        Ok(rest.trim_end_matches('\u{FFFD}').to_string())
    }

    /// The window's text without and with the tokens not yet returned.
    fn window(&self) -> Result<(String, String)> {
        let before = self
            .tokenizer
            .decode(&self.ids[self.prefix..self.read], self.skip_special)?;
        let after = self
            .tokenizer
            .decode(&self.ids[self.prefix..], self.skip_special)?;
        Ok((before, after))
    }
}

/// Byte length of the longest common prefix of `a` and `b` that ends on a char boundary (all of
/// `a` when `b` extends it, the usual case).
fn common_prefix(a: &str, b: &str) -> usize {
    let mut n = 0;
    for ((i, ca), cb) in a.char_indices().zip(b.chars()) {
        if ca != cb {
            return i;
        }
        n = i + ca.len_utf8();
    }
    n
}
