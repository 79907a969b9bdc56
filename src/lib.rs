//! r1-runtime: DeepSeek-R1 / DeepSeek-V3 inference from the official FP8 checkpoint.
//!
//! Layers, bottom up (each uses only layers below it; [`MODULE_RULES`] lists the edges):
//! - [`error`], then [`numerics`]: FP8/bf16 formats and the w8a8 recipe.
//! - [`config`] and [`checkpoint`] (what is on disk), [`kv_cache`] (page bookkeeping and the
//!   step's [`Batch`](kv_cache::Batch)).
//! - [`graph`]: the dataflow graph backends execute, and the weight ids its ops name.
//! - [`model`]: the network as graphs, and its weights.
//! - [`backend`]: the trait the engine runs graphs through; [`cpu`] and [`cuda`] implement it
//!   as siblings that never import each other. Inside `cuda`, the launch wrappers of
//!   `cuda::ops` stand on the CUDA core (device, buffers, launches, kernel choices) and
//!   `numerics` only; the model-aware adapters sit above them in the backend.
//! - [`text`]: tokenizer, streaming decode, answer constraints, stop matching.
//! - [`engine`]: forward steps over sequences, sampling, speculative decoding, and the
//!   continuous-batching scheduler.
//! - [`chat`]: templates, messages, output parsing, tool calls, the terminal chat.
//! - Front ends: [`server`] (OpenAI-compatible HTTP), [`capi`] (the C ABI of
//!   `include/r1_runtime.h`) and the `r1-run` binary.

pub mod backend;
pub mod capi;
pub mod chat;
pub mod checkpoint;
pub mod config;
pub mod cpu;
pub mod cuda;
pub mod engine;
pub mod error;
pub mod graph;
pub mod kv_cache;
pub mod model;
pub mod numerics;
pub mod server;
pub mod text;

pub use backend::{Backend, Precision};
pub use error::{Error, Result};

/// The module rules: each module and the modules it may use directly, and through them
/// whatever those may use. A module's own submodules are its business, except `cuda::ops`
/// and `cuda::error`, which have rules of their own. `tests/layering.rs` checks every `crate::` and `super::` path
/// under src/ against this table.
pub const MODULE_RULES: &[(&str, &[&str])] = &[
    // The driver's errors, kept typed inside the crate's error: a leaf that uses nothing here.
    ("cuda::error", &[]),
    ("error", &["cuda::error"]),
    ("numerics", &["error"]),
    ("config", &["numerics"]),
    ("checkpoint", &["numerics"]),
    ("kv_cache", &["error"]),
    ("graph", &["config", "checkpoint", "kv_cache"]),
    ("model", &["graph"]),
    ("backend", &["model"]),
    ("cpu", &["backend"]),
    ("cuda", &["backend"]),
    (
        "cuda::ops",
        &[
            "numerics",
            "cuda::sys",
            "cuda::device",
            "cuda::buffer",
            "cuda::error",
            "cuda::launch",
            "cuda::tma",
            "cuda::timing",
            "cuda::heuristics",
        ],
    ),
    ("text", &["error"]),
    ("engine", &["cpu", "cuda", "text"]),
    ("chat", &["engine"]),
    ("server", &["chat"]),
    ("capi", &["chat"]),
];
