//! The checkpoint's `tokenizer.json` (Hugging Face `tokenizers`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::decoder::IncrementalDecoder;
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
