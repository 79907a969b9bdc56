//! The chat layer, above the engine: the checkpoint's chat template, messages, and parsing
//! generated text back into reasoning, answer and tool calls (incrementally, for streaming);
//! the terminal chat. The tokenizer and decoding are the [`text`](crate::text) layer's.
//!
//! ```no_run
//! # use r1_runtime::chat::{ChatFormat, Message, RenderOptions};
//! let chat = ChatFormat::from_dir("model-dir".as_ref())?;
//! let prompt = chat.prompt(&[Message::user("Hi")], &RenderOptions {
//!     add_generation_prompt: true,
//!     ..Default::default()
//! })?;
//! // prompt.ids go to the engine; generated ids come back through
//! // chat.tokenizer.stream(true) and an OutputParser::new(prompt.in_reasoning, None).
//! # Ok::<(), r1_runtime::Error>(())
//! ```

pub mod messages;
pub mod output;
pub mod reasoning;
pub mod template;
pub mod terminal;
pub mod tool_calls;

use std::path::Path;

pub use messages::{FunctionCall, FunctionDef, Message, Role, Tool, ToolCall};
pub use output::{Delta, OutputParser, ParsedOutput};
pub use template::{ChatTemplate, RenderOptions, Thinking};
pub use tool_calls::ToolCallDelta;

use crate::error::Result;
use crate::text::Tokenizer;

/// A rendered and tokenized chat prompt.
#[derive(Debug, Clone)]
pub struct Prompt {
    pub text: String,
    pub ids: Vec<u32>,
    /// The prompt ends inside `<think>`: the output starts as reasoning.
    pub in_reasoning: bool,
}

/// A model directory's tokenizer and chat template.
#[derive(Debug)]
pub struct ChatFormat {
    pub tokenizer: Tokenizer,
    pub template: ChatTemplate,
}

impl ChatFormat {
    /// `tokenizer.json` (required) and the chat template (tokenizer_config.json's, else the
    /// built-in one) of `dir`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        Ok(ChatFormat {
            tokenizer: Tokenizer::from_dir(dir)?,
            template: ChatTemplate::from_dir(dir)?,
        })
    }

    /// Renders and tokenizes a conversation. The template writes BOS; nothing is added again.
    pub fn prompt(&self, messages: &[Message], options: &RenderOptions<'_>) -> Result<Prompt> {
        let text = self.template.render(messages, options)?;
        let ids = self.tokenizer.encode(&text)?;
        Ok(Prompt {
            in_reasoning: options.add_generation_prompt && template::opens_thinking(&text),
            text,
            ids,
        })
    }
}
