//! The checkpoint's `tokenizer.json` (Hugging Face `tokenizers`), plus decoding that streams
//! only complete UTF-8: bytes of a multi-byte character split over several tokens (byte-level
//! BPE, byte-fallback pieces) are held back until the character is whole.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, Result};

/// A loaded tokenizer; cheap to clone (shared).
#[derive(Clone)]
pub struct Tokenizer {
    inner: Arc<tokenizers::Tokenizer>,
    path: PathBuf,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("path", &self.path)
            .field("vocab", &self.vocab_size())
            .finish()
    }
}

impl Tokenizer {
    /// Reads `<dir>/tokenizer.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        Self::from_file(&dir.join("tokenizer.json"))
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        if !path.is_file() {
            return Err(Error::Input(format!(
                "{}: no tokenizer.json (the model directory must hold the checkpoint's tokenizer.json)",
                path.display()
            )));
        }
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| {
            Error::Input(format!(
                "{}: cannot load the tokenizer: {e}",
                path.display()
            ))
        })?;
        Ok(Tokenizer {
            inner: Arc::new(inner),
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tokens including the added ones (the model's vocab_size may be larger: padding rows).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Encodes text as it is: special-token strings in it (BOS, `<｜User｜>`, …) become their ids,
    /// and nothing is added (chat templates write BOS themselves).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::Input(format!("cannot tokenize the prompt: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Decodes ids to text. With `skip_special`, tokens marked special (BOS, EOS, padding) are
    /// dropped; `<think>` and the tool-call markers are not special in DeepSeek's tokenizer and
    /// stay.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| Error::Input(format!("cannot decode tokens: {e}")))
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// A streaming decoder for one sequence of generated tokens.
    pub fn stream(&self, skip_special: bool) -> IncrementalDecoder {
        IncrementalDecoder::new(self.clone(), skip_special)
    }

    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

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
        let before = self
            .tokenizer
            .decode(&self.ids[self.prefix..self.read], self.skip_special)?;
        let after = self
            .tokenizer
            .decode(&self.ids[self.prefix..], self.skip_special)?;
        if after.len() > before.len() && !after.ends_with('\u{FFFD}') {
            let delta = match after.strip_prefix(before.as_str()) {
                Some(rest) => rest.to_string(),
                None => after[common_prefix(&before, &after)..].to_string(),
            };
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
        let before = self
            .tokenizer
            .decode(&self.ids[self.prefix..self.read], self.skip_special)?;
        let after = self
            .tokenizer
            .decode(&self.ids[self.prefix..], self.skip_special)?;
        self.prefix = self.read;
        self.read = self.ids.len();
        let rest = match after.strip_prefix(before.as_str()) {
            Some(rest) => rest,
            None => &after[common_prefix(&before, &after)..],
        };
        Ok(rest.trim_end_matches('\u{FFFD}').to_string())
    }
}

/// Byte length of the longest common prefix of `a` and `b` that ends on a char boundary.
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
