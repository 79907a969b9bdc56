//! `r1-run serve`: an OpenAI-compatible HTTP server (axum) over the continuous-batching
//! scheduler. The engine runs on its own thread ([`SchedulerHandle`]); handlers talk to it
//! over channels.
//!
//! Endpoints: `POST /v1/chat/completions` (JSON or SSE stream; DeepSeek `deepseek-reasoner`
//! semantics: `reasoning_content` beside `content`, tool calls), `POST /v1/completions`,
//! `GET /v1/models`, `GET /health`, `GET /metrics` (Prometheus text).

pub mod api;
pub mod error;
mod handlers;
mod metrics;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;

use crate::chat::ChatFormat;
use crate::engine::scheduler::{SchedulerHandle, SchedulerOptions};
use crate::engine::{Engine, EngineOptions};
use crate::error::{Error, Result};
use crate::kv_cache::PAGE_TOKENS;

pub use error::ApiError;

/// Request defaults and limits (DeepSeek's: 32K default, 64K max, both counting the thinking).
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// The model id clients must send (and `/v1/models` lists).
    pub model_name: String,
    pub default_max_tokens: usize,
    pub max_tokens_limit: usize,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            model_name: "deepseek-reasoner".into(),
            default_max_tokens: 32 * 1024,
            max_tokens_limit: 64 * 1024,
        }
    }
}

/// What every handler shares.
pub struct AppState {
    pub scheduler: SchedulerHandle,
    pub chat: ChatFormat,
    pub options: ServerOptions,
    /// BOS id for raw completions (prepended unless the prompt starts with it).
    pub bos_token_id: Option<u32>,
    pub created: u64,
    pub started: Instant,
}

impl AppState {
    pub fn new(
        scheduler: SchedulerHandle,
        chat: ChatFormat,
        options: ServerOptions,
        bos_token_id: Option<u32>,
    ) -> Arc<Self> {
        Arc::new(AppState {
            scheduler,
            chat,
            options,
            bos_token_id,
            created: unix_now(),
            started: Instant::now(),
        })
    }
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The HTTP routes over a shared state.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(handlers::chat_completions))
        .route("/v1/completions", post(handlers::completions))
        .route("/v1/models", get(handlers::models))
        .route("/health", get(handlers::health))
        .route("/metrics", get(metrics::metrics))
        .fallback(handlers::fallback)
        .layer(DefaultBodyLimit::max(64 << 20))
        .with_state(state)
}

/// Everything `r1-run serve` needs.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub model_dir: PathBuf,
    pub host: String,
    pub port: u16,
    /// Defaults to the model directory's name.
    pub model_name: Option<String>,
    pub engine: EngineOptions,
    pub max_running: usize,
    pub step_tokens: usize,
}

/// Loads the tokenizer, template and engine of `dir` and starts the scheduler thread.
pub fn load_state(
    dir: &Path,
    engine: &EngineOptions,
    server: ServerOptions,
    max_running: usize,
    step_tokens: usize,
) -> Result<Arc<AppState>> {
    let chat = ChatFormat::from_dir(dir)?;
    let cfg = crate::config::ModelConfig::from_dir(dir)?;
    if chat.tokenizer.vocab_size() > cfg.vocab_size {
        return Err(Error::Input(format!(
            "{}: the tokenizer has {} tokens but the model's vocab_size is {}",
            dir.display(),
            chat.tokenizer.vocab_size(),
            cfg.vocab_size
        )));
    }
    let opts = SchedulerOptions {
        max_running,
        step_tokens,
        kv_pages: engine.cache_tokens / PAGE_TOKENS,
        tokenizer: Some(chat.tokenizer.clone()),
        // A quarter of the cache may keep finished conversations for prefix reuse.
        prefix_cache_pages: engine.cache_tokens / PAGE_TOKENS / 4,
        draft_tokens: engine.draft_tokens,
    };
    let (dir_owned, engine) = (dir.to_path_buf(), engine.clone());
    let scheduler = SchedulerHandle::spawn(move || Engine::load(&dir_owned, &engine), opts)?;
    Ok(AppState::new(scheduler, chat, server, cfg.bos_token_id))
}

/// Serves `state` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

/// `r1-run serve`: load, bind, print the address, serve until Ctrl-C.
pub fn run(opts: ServeOptions) -> Result<()> {
    let name = opts.model_name.clone().unwrap_or_else(|| {
        opts.model_dir
            .canonicalize()
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "deepseek-reasoner".into())
    });
    let server = ServerOptions {
        model_name: name.clone(),
        ..ServerOptions::default()
    };
    eprintln!("loading {} ...", opts.model_dir.display());
    let state = load_state(
        &opts.model_dir,
        &opts.engine,
        server,
        opts.max_running,
        opts.step_tokens,
    )?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Backend {
            backend: "server".into(),
            message: format!("cannot start the async runtime: {e}"),
        })?;
    runtime.block_on(async move {
        let addr = format!("{}:{}", opts.host, opts.port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .map_err(|e| Error::Input(format!("cannot listen on {addr}: {e}")))?;
        let local: SocketAddr = listener
            .local_addr()
            .map_err(|e| Error::Input(format!("cannot listen on {addr}: {e}")))?;
        eprintln!("serving `{name}` on http://{local} (OpenAI API under /v1)");
        let shutdown = async {
            let _ = tokio::signal::ctrl_c().await;
            eprintln!("shutting down");
        };
        serve(listener, state, shutdown)
            .await
            .map_err(|e| Error::Backend {
                backend: "server".into(),
                message: e.to_string(),
            })
    })
}
