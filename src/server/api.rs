//! Request bodies of the OpenAI-compatible endpoints (responses are built as JSON directly).

use serde::Deserialize;
use serde_json::Value;

use crate::chat::{Message, Tool};

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ResponseFormat {
    #[serde(rename = "type")]
    pub kind: String,
    /// With `type: json_schema`: `{"name": ..., "schema": {...}, "strict": ...}`.
    pub json_schema: Option<Value>,
}

/// Sampling and limits shared by both endpoints.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct CommonParams {
    pub max_tokens: Option<usize>,
    /// OpenAI's newer name for `max_tokens`.
    pub max_completion_tokens: Option<usize>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    /// Extension (vLLM style).
    pub top_k: Option<i64>,
    pub seed: Option<u64>,
    pub stop: Option<OneOrMany>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub n: Option<usize>,
    /// Accepted and ignored (deepseek-reasoner ignores penalties too).
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    /// Extension: keep generating past eos.
    #[serde(default)]
    pub ignore_eos: bool,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ChatCompletionRequest {
    pub model: String,
    pub messages: Vec<Message>,
    #[serde(flatten)]
    pub common: CommonParams,
    pub tools: Option<Vec<Tool>>,
    pub tool_choice: Option<Value>,
    pub response_format: Option<ResponseFormat>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<u32>,
    /// Extension: `true` appends `<think>\n` to the prompt (output starts inside the
    /// reasoning, as the original R1 template did).
    pub thinking: Option<bool>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum CompletionPrompt {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    pub model: String,
    pub prompt: CompletionPrompt,
    #[serde(flatten)]
    pub common: CommonParams,
    pub logprobs: Option<Value>,
    pub echo: Option<bool>,
    pub suffix: Option<String>,
    pub best_of: Option<usize>,
}
