//! Chat templates: the checkpoint's own `chat_template` (tokenizer_config.json, or a
//! `chat_template.jinja` beside it) rendered with minijinja and its Python-compatibility
//! methods, or a built-in DeepSeek-R1-0528-style template for directories without one.

use std::path::Path;

use minijinja::{Environment, ErrorKind, Value as JValue};
use serde_json::{json, Map, Value};

use super::messages::{Message, Role, Tool};
use crate::error::{Error, Result};
use crate::text::markup::THINK_OPEN;

/// DeepSeek's special-token strings.
pub const BOS: &str = "<｜begin▁of▁sentence｜>";
pub const EOS: &str = "<｜end▁of▁sentence｜>";
pub const USER: &str = "<｜User｜>";
pub const ASSISTANT: &str = "<｜Assistant｜>";

const BUILTIN: &str = include_str!("builtin_template.jinja");

/// How the generation prompt treats thinking.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Thinking {
    /// As the template writes it (R1-0528 opens `<think>` itself in its output).
    #[default]
    Auto,
    /// Append `<think>\n` to the generation prompt (as the original R1 template did) so the
    /// output starts inside the reasoning.
    Force,
}

#[derive(Debug, Clone, Default)]
pub struct RenderOptions<'a> {
    pub tools: Option<&'a [Tool]>,
    pub add_generation_prompt: bool,
    pub thinking: Thinking,
}

/// A compiled chat template and the BOS/EOS strings it is rendered with.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    builtin: bool,
    bos: String,
    eos: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("builtin", &self.builtin)
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .finish()
    }
}

impl ChatTemplate {
    /// The built-in DeepSeek-R1-0528-style template.
    pub fn builtin() -> Self {
        Self::compile(BUILTIN.to_string(), true, BOS.into(), EOS.into())
            .expect("the built-in chat template compiles")
    }

    /// Compiles `source` (Jinja) with the given BOS/EOS strings.
    pub fn from_source(source: &str, bos: &str, eos: &str) -> Result<Self> {
        Self::compile(source.to_string(), false, bos.into(), eos.into())
    }

    /// The template of a model directory: `tokenizer_config.json`'s `chat_template` (a string,
    /// or a list of named templates where `default` wins), else `chat_template.jinja`, else
    /// the built-in one. BOS/EOS strings come from tokenizer_config.json when present.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer_config.json");
        let config: Value = if path.is_file() {
            let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
            serde_json::from_str(&text)
                .map_err(|e| Error::Input(format!("{}: not valid JSON: {e}", path.display())))?
        } else {
            Value::Null
        };
        let token = |key: &str, default: &str| -> String {
            match config.get(key) {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Object(o)) => o
                    .get("content")
                    .and_then(Value::as_str)
                    .unwrap_or(default)
                    .to_string(),
                _ => default.to_string(),
            }
        };
        let (bos, eos) = (token("bos_token", BOS), token("eos_token", EOS));
        let source = match config.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Array(list)) => {
                let named = |n: &str| {
                    list.iter().find_map(|t| {
                        (t.get("name")?.as_str()? == n)
                            .then(|| t.get("template")?.as_str().map(str::to_string))
                            .flatten()
                    })
                };
                named("default").or_else(|| {
                    list.first()
                        .and_then(|t| t.get("template")?.as_str().map(str::to_string))
                })
            }
            _ => None,
        };
        let source = match source {
            Some(s) => Some(s),
            None => {
                let jinja = dir.join("chat_template.jinja");
                if jinja.is_file() {
                    Some(std::fs::read_to_string(&jinja).map_err(|e| Error::io(&jinja, e))?)
                } else {
                    None
                }
            }
        };
        match source {
            Some(s) => Self::compile(s, false, bos, eos),
            None => Self::compile(BUILTIN.to_string(), true, bos, eos),
        }
    }

    fn compile(source: String, builtin: bool, bos: String, eos: String) -> Result<Self> {
        let mut env = Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<JValue, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_function("strftime_now", |_fmt: String| -> String {
            // Templates that ask for the date get a fixed, reproducible one.
            "01 Jan 2025".to_string()
        });
        env.add_template_owned("chat", source.clone())
            .map_err(|e| Error::Input(format!("the chat template does not compile: {e:#}")))?;
        Ok(ChatTemplate {
            env,
            source,
            builtin,
            bos,
            eos,
        })
    }

    pub fn is_builtin(&self) -> bool {
        self.builtin
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn bos(&self) -> &str {
        &self.bos
    }

    pub fn eos(&self) -> &str {
        &self.eos
    }

    /// Renders `messages` to prompt text (BOS included, written by the template).
    pub fn render(&self, messages: &[Message], options: &RenderOptions<'_>) -> Result<String> {
        let messages: Vec<Value> = messages.iter().map(template_message).collect();
        let tools = match options.tools {
            Some(t) if !t.is_empty() => serde_json::to_value(t).unwrap_or(Value::Null),
            _ => Value::Null,
        };
        let force = options.thinking == Thinking::Force;
        let ctx = json!({
            "messages": messages,
            "tools": tools,
            "add_generation_prompt": options.add_generation_prompt,
            "bos_token": self.bos,
            "eos_token": self.eos,
            // For templates (DeepSeek-V3.1 style) that switch thinking with a variable.
            "thinking": force,
            "enable_thinking": force,
        });
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| Error::Input(format!("chat template: {e:#}")))?;
        let mut text = tmpl
            .render(minijinja::value::Serde(&ctx))
            .map_err(|e| Error::Input(format!("cannot render the chat template: {e:#}")))?;
        if force && options.add_generation_prompt && !opens_thinking(&text) {
            text.push_str("<think>\n");
        }
        Ok(text)
    }
}

/// Whether a prompt ends inside an open `<think>` block (the output starts as reasoning).
pub fn opens_thinking(prompt: &str) -> bool {
    prompt.trim_end().ends_with(THINK_OPEN)
}

/// A message as templates see it: `content` a string (null only for an assistant message
/// that carries tool calls and no text), `tool_calls` present only when there are some,
/// reasoning never (earlier turns are rendered without their reasoning).
fn template_message(m: &Message) -> Value {
    let mut o = Map::new();
    o.insert("role".into(), m.role.template_name().into());
    let has_calls = m.tool_calls.as_ref().is_some_and(|c| !c.is_empty());
    let content = match (&m.content, m.role, has_calls) {
        (Some(c), _, _) => Value::String(c.clone()),
        (None, Role::Assistant, true) => Value::Null,
        (None, _, _) => Value::String(String::new()),
    };
    o.insert("content".into(), content);
    if has_calls {
        let calls = m.tool_calls.as_deref().unwrap_or_default();
        o.insert(
            "tool_calls".into(),
            serde_json::to_value(calls).unwrap_or(Value::Null),
        );
    }
    if let Some(id) = &m.tool_call_id {
        o.insert("tool_call_id".into(), id.clone().into());
    }
    if let Some(name) = &m.name {
        o.insert("name".into(), name.clone().into());
    }
    Value::Object(o)
}
