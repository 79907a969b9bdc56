//! r1-runtime: DeepSeek-R1 / DeepSeek-V3 inference from the official FP8 checkpoint.
//!
//! Layers, bottom up: [`numerics`] (FP8/bf16 formats, the w8a8 recipe), [`config`] and
//! [`checkpoint`] (what is on disk), [`model`] (the network as a [`graph`]), backends that
//! execute graphs ([`cpu`]), [`kv_cache`] bookkeeping, and the [`engine`] that drives
//! generation. Front ends: [`chat`], [`server`], and [`capi`] (the C ABI of
//! `include/r1_runtime.h`).

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
