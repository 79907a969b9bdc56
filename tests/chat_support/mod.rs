//! Helpers for the chat and server tests: where the fetched test tokenizer lives.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// The DeepSeek-V3/R1 tokenizer folder (tokenizer.json + tokenizer_config.json) from env
/// `R1_TEST_TOKENIZER` or `tools/fetch-test-tokenizer`'s default folder; None (after printing
/// a visible skip line) when it was not fetched.
pub fn test_tokenizer_dir() -> Option<PathBuf> {
    let dir = match std::env::var_os("R1_TEST_TOKENIZER") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join(".test-tokenizer"),
    };
    if dir.join("tokenizer.json").is_file() {
        Some(dir)
    } else {
        println!("skipped: test tokenizer not fetched (run tools/fetch-test-tokenizer)");
        None
    }
}

/// Returns early from a test when the tokenizer is missing.
#[macro_export]
macro_rules! need_tokenizer {
    () => {
        match chat_support::test_tokenizer_dir() {
            Some(d) => d,
            None => return,
        }
    };
}
