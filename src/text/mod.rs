//! Text over token ids, below the engine: the checkpoint's tokenizer, streaming decode that
//! yields only complete characters, every token's bytes, answer constraints that decoding
//! checks tokens against (JSON, schemas, one R1 tool call), and stop matching over streamed
//! text. Chat templates, messages and parsing the output back into reasoning, answer and
//! tool calls are the [`chat`](crate::chat) layer's, above the engine.

pub mod constrained;
pub mod decoder;
pub mod markup;
pub mod stop;
pub mod token_bytes;
pub mod tokenizer;

pub use decoder::IncrementalDecoder;
pub use stop::StopStrings;
pub use token_bytes::TokenBytes;
pub use tokenizer::Tokenizer;
