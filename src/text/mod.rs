//! Text over token ids, below the engine: the checkpoint's tokenizer and answer constraints.

pub mod constrained;
pub mod tokenizer;

pub use tokenizer::{IncrementalDecoder, Tokenizer};
