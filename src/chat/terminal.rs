//! `r1-run chat`: a terminal chat. Streams the reasoning (dimmed on a terminal) and then the
//! answer, keeps the conversation the way the template expects (answers only, no reasoning),
//! or answers one `--prompt` and exits.
//!
//! Commands at the prompt: `/reset` forgets the conversation, `/exit` (or end of input) quits.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::time::Instant;

use super::{ChatFormat, Message, OutputParser, RenderOptions, Thinking};
use crate::engine::sampling::SamplingParams;
use crate::engine::scheduler::{Event, Request, Scheduler, SchedulerOptions, StopReason};
use crate::engine::{Engine, EngineOptions};
use crate::error::{Error, Result};
use crate::kv_cache::PAGE_TOKENS;

#[derive(Debug, Clone)]
pub struct ChatOptions {
    pub model_dir: PathBuf,
    pub engine: EngineOptions,
    /// One-shot: answer this and exit.
    pub prompt: Option<String>,
    pub system: Option<String>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Append `<think>\n` to every generation prompt.
    pub force_thinking: bool,
    /// Print only answers.
    pub hide_thinking: bool,
    /// ANSI styling (defaults to whether stdout is a terminal).
    pub color: Option<bool>,
    /// Tokens/s and counts on stderr after each answer.
    pub stats: bool,
}

const DIM: &str = "\x1b[2m";
const RESET: &str = "\x1b[0m";

/// Runs the chat on stdin/stdout.
pub fn run(opts: &ChatOptions) -> Result<()> {
    let chat = ChatFormat::from_dir(&opts.model_dir)?;
    let engine = Engine::load(&opts.model_dir, &opts.engine)?;
    let mut sched = Scheduler::new(
        engine,
        SchedulerOptions {
            max_running: 1,
            kv_pages: opts.engine.cache_tokens / PAGE_TOKENS,
            tokenizer: Some(chat.tokenizer.clone()),
            // Later turns reuse the conversation's cache.
            prefix_cache_pages: opts.engine.cache_tokens / PAGE_TOKENS / 2,
            draft_tokens: opts.engine.draft_tokens,
            ..SchedulerOptions::default()
        },
    );
    let color = opts
        .color
        .unwrap_or_else(|| std::io::stdout().is_terminal());
    let mut out = std::io::stdout();
    let mut history: Vec<Message> = opts.system.iter().map(Message::system).collect();
    if let Some(p) = &opts.prompt {
        history.push(Message::user(p.clone()));
        turn(&chat, &mut sched, &history, opts, color, &mut out)?;
        return Ok(());
    }
    let stdin = std::io::stdin();
    let interactive = stdin.is_terminal();
    if interactive {
        eprintln!("r1-run chat: /reset forgets the conversation, /exit quits.");
    }
    let mut lines = stdin.lock().lines();
    loop {
        if interactive {
            eprint!("\n> ");
            let _ = std::io::stderr().flush();
        }
        let Some(line) = lines.next() else { break };
        let line = line.map_err(|e| Error::io("<stdin>", e))?;
        let text = line.trim();
        match text {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                history.retain(|m| m.role == super::Role::System);
                eprintln!("(conversation reset)");
                continue;
            }
            _ => {}
        }
        history.push(Message::user(text));
        let answer = turn(&chat, &mut sched, &history, opts, color, &mut out)?;
        history.push(Message::assistant(answer));
    }
    Ok(())
}

/// Generates one assistant turn, streaming it to `out`; returns the answer (no reasoning).
fn turn(
    chat: &ChatFormat,
    sched: &mut Scheduler,
    history: &[Message],
    opts: &ChatOptions,
    color: bool,
    out: &mut impl Write,
) -> Result<String> {
    let prompt = chat.prompt(
        history,
        &RenderOptions {
            add_generation_prompt: true,
            thinking: if opts.force_thinking {
                Thinking::Force
            } else {
                Thinking::Auto
            },
            ..Default::default()
        },
    )?;
    let mut req = Request::new(prompt.ids, opts.max_tokens);
    req.sampling = opts.sampling.clone();
    let (_, mut rx) = sched.submit(req)?;
    let mut parser = OutputParser::new(prompt.in_reasoning, None);
    let mut printer = Printer {
        out,
        color,
        hide_thinking: opts.hide_thinking,
        in_reasoning: false,
    };
    let t0 = Instant::now();
    let io = |e| Error::io("<stdout>", e);
    let finish = 'outer: loop {
        sched.step();
        while let Ok(ev) = rx.try_recv() {
            match ev {
                Event::Token { text, .. } => {
                    let d = parser.push(&text);
                    printer.show(&d.reasoning, &d.content).map_err(io)?;
                }
                Event::Finished(f) => {
                    let mut d = parser.push(&f.text);
                    let end = parser.finish();
                    d.reasoning.push_str(&end.reasoning);
                    d.content.push_str(&end.content);
                    printer.show(&d.reasoning, &d.content).map_err(io)?;
                    break 'outer f;
                }
                Event::Error(e) => return Err(Error::Input(e)),
            }
        }
    };
    printer.end().map_err(io)?;
    if opts.stats {
        let s = t0.elapsed().as_secs_f64();
        let decode = (s - finish.time_to_first_token.as_secs_f64()).max(1e-9);
        eprintln!(
            "[{} prompt + {} generated tokens; first token {:.2} s; {:.1} tokens/s{}]",
            finish.prompt_tokens,
            finish.tokens.len(),
            finish.time_to_first_token.as_secs_f64(),
            finish.tokens.len().saturating_sub(1) as f64 / decode,
            if finish.reason == StopReason::Length {
                "; stopped at max tokens"
            } else {
                ""
            }
        );
    }
    Ok(parser.parsed().content.clone())
}

struct Printer<'a, W: Write> {
    out: &'a mut W,
    color: bool,
    hide_thinking: bool,
    in_reasoning: bool,
}

impl<W: Write> Printer<'_, W> {
    fn show(&mut self, reasoning: &str, content: &str) -> std::io::Result<()> {
        if !reasoning.is_empty() && !self.hide_thinking {
            if !self.in_reasoning {
                if self.color {
                    write!(self.out, "{DIM}")?;
                } else {
                    writeln!(self.out, "<think>")?;
                }
                self.in_reasoning = true;
            }
            write!(self.out, "{reasoning}")?;
        }
        if !content.is_empty() {
            self.close_reasoning()?;
            write!(self.out, "{content}")?;
        }
        self.out.flush()
    }

    fn close_reasoning(&mut self) -> std::io::Result<()> {
        if self.in_reasoning {
            if self.color {
                write!(self.out, "{RESET}\n\n")?;
            } else {
                write!(self.out, "\n</think>\n\n")?;
            }
            self.in_reasoning = false;
        }
        Ok(())
    }

    fn end(&mut self) -> std::io::Result<()> {
        self.close_reasoning()?;
        writeln!(self.out)?;
        self.out.flush()
    }
}
