//! The C ABI (`include/r1_runtime.h`): for engines and programs that link r1-runtime as a
//! backend. It exposes the [`Engine`] at the token level: load a checkpoint, own sequences
//! (KV cache state, forkable), run batched forward steps into caller buffers, generate.
//!
//! Conventions, all checked here rather than trusted:
//! - Every fallible call returns an [`R1Status`]; on failure [`r1_last_error`] gives the
//!   message (per thread, valid until the thread's next call).
//! - Null pointers, too-small buffers, a sequence passed twice in one batch or used with an
//!   engine that did not create it are `R1_ERR_ARGUMENT`, never undefined behaviour.
//! - An engine is locked for the duration of each call: calls from several threads are safe
//!   and run one at a time.
//! - A panic inside the library is caught and reported as `R1_ERR_PANIC`; the engine it
//!   happened in reports the same on every later call.

use std::cell::RefCell;
use std::ffi::{c_char, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use crate::engine::sampling::SamplingParams;
use crate::engine::{BackendKind, Engine, EngineOptions, Readback, Sequence, Step};
use crate::{Error, Precision};

/// Result of a C ABI call (`R1_OK` is 0).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum R1Status {
    Ok = 0,
    /// A null pointer, a buffer too small, a sequence of another engine, an unknown enum value.
    ErrArgument = 1,
    /// Input the model cannot take (token ids, lengths, sampling settings).
    ErrInput = 2,
    /// Valid but not supported (a checkpoint shape, a backend/precision pair).
    ErrUnsupported = 3,
    /// The checkpoint: missing or malformed files, tensors, config.
    ErrCheckpoint = 4,
    /// The compute backend (device errors, out of memory).
    ErrBackend = 5,
    /// A bug: the library panicked (the message says where).
    ErrPanic = 6,
}

/// `r1_engine_options_default` fills in the defaults of [`EngineOptions`].
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct R1EngineOptions {
    /// 0: CPU, 1: CUDA (one Hopper GPU).
    pub backend: i32,
    /// 0: exact (f32, the reference), 1: w8a8 (the GPU recipe).
    pub precision: i32,
    /// Load the MTP layer (non-zero) when the checkpoint has one.
    pub with_mtp: i32,
    /// KV cache capacity in tokens, over all sequences.
    pub cache_tokens: u64,
}

#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct R1ModelInfo {
    pub vocab_size: u64,
    pub hidden_size: u64,
    pub max_context: u64,
    /// The first end-of-sequence token id (`UINT32_MAX` when the config names none).
    pub eos_token_id: u32,
    pub has_mtp: i32,
    pub cache_pages_capacity: u64,
    pub cache_pages_in_use: u64,
    /// Tokens per KV cache page.
    pub page_tokens: u64,
}

#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct R1Sampling {
    /// 0: greedy.
    pub temperature: f32,
    /// 0: all tokens.
    pub top_k: u32,
    /// 1.0: all tokens.
    pub top_p: f32,
    pub seed: u64,
    /// Non-zero: keep generating past end-of-sequence tokens.
    pub ignore_eos: i32,
}

/// An engine: a loaded checkpoint, its backend and KV cache.
pub struct R1Engine {
    engine: Mutex<Engine>,
}

/// A sequence's KV cache state in the engine that created it.
pub struct R1Sequence {
    seq: Sequence,
    /// The engine that owns this sequence's pages.
    owner: *const R1Engine,
}

thread_local! {
    static LAST_ERROR: RefCell<Option<CString>> = const { RefCell::new(None) };
}

struct Failure(R1Status, String);

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        let status = match &e {
            Error::Input(_) => R1Status::ErrInput,
            Error::Unsupported(_) => R1Status::ErrUnsupported,
            Error::Backend { .. } | Error::Cuda(_) => R1Status::ErrBackend,
            Error::Io { .. }
            | Error::Config { .. }
            | Error::Checkpoint { .. }
            | Error::Tensor { .. }
            | Error::MissingTensor { .. }
            | Error::Output { .. } => R1Status::ErrCheckpoint,
        };
        Failure(status, e.to_string())
    }
}

fn argument(msg: impl Into<String>) -> Failure {
    Failure(R1Status::ErrArgument, msg.into())
}

/// Runs `f`, recording its error for `r1_last_error` and turning a panic into `ErrPanic`.
fn call(f: impl FnOnce() -> Result<(), Failure>) -> R1Status {
    let (status, message) = match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => (R1Status::Ok, None),
        Ok(Err(Failure(status, msg))) => (status, Some(msg)),
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            (R1Status::ErrPanic, Some(format!("internal error: {what}")))
        }
    };
    LAST_ERROR.with(|slot| {
        *slot.borrow_mut() = message.map(|m| {
            CString::new(m.replace('\0', " ")).unwrap_or_else(|_| CString::from(c"error"))
        });
    });
    status
}

fn lock(engine: &R1Engine) -> Result<MutexGuard<'_, Engine>, Failure> {
    engine.engine.lock().map_err(|_| {
        Failure(
            R1Status::ErrPanic,
            "this engine is unusable: an earlier call panicked inside it".into(),
        )
    })
}

/// `ptr` as a reference, or an argument error naming `what`.
unsafe fn non_null<'a, T>(ptr: *const T, what: &str) -> Result<&'a T, Failure> {
    // SAFETY: the caller passes a pointer that is null or valid for reads (header contract).
    unsafe { ptr.as_ref() }.ok_or_else(|| argument(format!("{what} is NULL")))
}

unsafe fn non_null_mut<'a, T>(ptr: *mut T, what: &str) -> Result<&'a mut T, Failure> {
    // SAFETY: as `non_null`, for writes, and not aliased for the call's duration.
    unsafe { ptr.as_mut() }.ok_or_else(|| argument(format!("{what} is NULL")))
}

/// `len` elements at `ptr` (which may be NULL when `len` is 0).
unsafe fn slice<'a, T>(ptr: *const T, len: u64, what: &str) -> Result<&'a [T], Failure> {
    if len == 0 {
        return Ok(&[]);
    }
    if ptr.is_null() {
        return Err(argument(format!("{what} is NULL but its length is {len}")));
    }
    let len = usize::try_from(len).map_err(|_| argument(format!("{what}: length {len}")))?;
    // SAFETY: the caller guarantees `len` readable elements at `ptr`.
    Ok(unsafe { std::slice::from_raw_parts(ptr, len) })
}

unsafe fn slice_mut<'a, T>(ptr: *mut T, len: u64, what: &str) -> Result<&'a mut [T], Failure> {
    if len == 0 {
        return Ok(&mut []);
    }
    if ptr.is_null() {
        return Err(argument(format!("{what} is NULL but its length is {len}")));
    }
    let len = usize::try_from(len).map_err(|_| argument(format!("{what}: length {len}")))?;
    // SAFETY: the caller guarantees `len` writable elements at `ptr`, not aliased.
    Ok(unsafe { std::slice::from_raw_parts_mut(ptr, len) })
}

fn owned_by(seq: &R1Sequence, engine: &R1Engine) -> Result<(), Failure> {
    if std::ptr::eq(seq.owner, engine) {
        Ok(())
    } else {
        Err(argument("the sequence belongs to another engine"))
    }
}

fn to_u64(n: usize) -> u64 {
    n as u64
}

/// The library version ("0.1.0"); a static string.
#[no_mangle]
pub extern "C" fn r1_version() -> *const c_char {
    static VERSION: &CStr =
        match CStr::from_bytes_with_nul(concat!(env!("CARGO_PKG_VERSION"), "\0").as_bytes()) {
            Ok(v) => v,
            Err(_) => c"unknown",
        };
    VERSION.as_ptr()
}

/// The message of this thread's last failed call, or NULL after a successful one.
#[no_mangle]
pub extern "C" fn r1_last_error() -> *const c_char {
    LAST_ERROR.with(|slot| {
        slot.borrow()
            .as_ref()
            .map_or(std::ptr::null(), |m| m.as_ptr())
    })
}

/// # Safety
/// `out` is NULL or valid for writes.
#[no_mangle]
pub unsafe extern "C" fn r1_engine_options_default(out: *mut R1EngineOptions) -> R1Status {
    call(|| {
        let d = EngineOptions::default();
        // SAFETY: header contract.
        *unsafe { non_null_mut(out, "out") }? = R1EngineOptions {
            backend: 0,
            precision: 0,
            with_mtp: i32::from(d.with_mtp),
            cache_tokens: to_u64(d.cache_tokens),
        };
        Ok(())
    })
}

/// Loads the checkpoint in `model_dir` (config.json + safetensors); `*out` receives the engine.
///
/// # Safety
/// `model_dir` is a NUL-terminated UTF-8 path; `options` is NULL (defaults) or valid; `out` is
/// valid for writes.
#[no_mangle]
pub unsafe extern "C" fn r1_engine_load(
    model_dir: *const c_char,
    options: *const R1EngineOptions,
    out: *mut *mut R1Engine,
) -> R1Status {
    call(|| {
        // SAFETY: header contract.
        let out = unsafe { non_null_mut(out, "out") }?;
        *out = std::ptr::null_mut();
        if model_dir.is_null() {
            return Err(argument("model_dir is NULL"));
        }
        // SAFETY: a NUL-terminated string (header contract).
        let dir = unsafe { CStr::from_ptr(model_dir) }
            .to_str()
            .map_err(|_| argument("model_dir is not valid UTF-8"))?;
        let mut opts = EngineOptions::default();
        // SAFETY: header contract.
        if let Some(o) = unsafe { options.as_ref() } {
            opts.backend = match o.backend {
                0 => BackendKind::Cpu,
                1 => BackendKind::Cuda,
                b => return Err(argument(format!("backend {b} (0: CPU, 1: CUDA)"))),
            };
            opts.precision = match o.precision {
                0 => Precision::Exact,
                1 => Precision::W8a8,
                p => return Err(argument(format!("precision {p} (0: exact, 1: w8a8)"))),
            };
            opts.with_mtp = o.with_mtp != 0;
            opts.cache_tokens = usize::try_from(o.cache_tokens)
                .map_err(|_| argument(format!("cache_tokens {}", o.cache_tokens)))?;
        }
        let engine = Engine::load(Path::new(dir), &opts)?;
        *out = Box::into_raw(Box::new(R1Engine {
            engine: Mutex::new(engine),
        }));
        Ok(())
    })
}

/// Frees an engine (NULL is ignored). Free its sequences first.
///
/// # Safety
/// `engine` is NULL or from `r1_engine_load`, and not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn r1_engine_free(engine: *mut R1Engine) {
    if !engine.is_null() {
        // SAFETY: created by Box::into_raw in r1_engine_load (header contract).
        drop(unsafe { Box::from_raw(engine) });
    }
}

/// # Safety
/// `engine` and `out` are valid.
#[no_mangle]
pub unsafe extern "C" fn r1_engine_info(
    engine: *const R1Engine,
    out: *mut R1ModelInfo,
) -> R1Status {
    call(|| {
        // SAFETY: header contract.
        let (engine, out) = unsafe { (non_null(engine, "engine")?, non_null_mut(out, "out")?) };
        let e = lock(engine)?;
        let c = e.config();
        *out = R1ModelInfo {
            vocab_size: to_u64(c.vocab_size),
            hidden_size: to_u64(c.hidden_size),
            max_context: to_u64(c.max_position_embeddings),
            eos_token_id: c.eos_token_ids.first().copied().unwrap_or(u32::MAX),
            has_mtp: i32::from(e.has_mtp()),
            cache_pages_capacity: to_u64(e.cache_pages_capacity()),
            cache_pages_in_use: to_u64(e.cache_pages_in_use()),
            page_tokens: to_u64(crate::kv_cache::PAGE_TOKENS),
        };
        Ok(())
    })
}

/// A new, empty sequence of `engine`.
///
/// # Safety
/// `engine` and `out` are valid.
#[no_mangle]
pub unsafe extern "C" fn r1_sequence_new(
    engine: *const R1Engine,
    out: *mut *mut R1Sequence,
) -> R1Status {
    call(|| {
        // SAFETY: header contract.
        let (engine, out) = unsafe { (non_null(engine, "engine")?, non_null_mut(out, "out")?) };
        *out = Box::into_raw(Box::new(R1Sequence {
            seq: Sequence::default(),
            owner: engine,
        }));
        Ok(())
    })
}

/// Frees a sequence and returns its cache pages to `engine` (NULL `seq` is ignored).
///
/// # Safety
/// `engine` is valid; `seq` is NULL or from `r1_sequence_new`/`r1_sequence_fork` of this engine
/// and not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn r1_sequence_free(
    engine: *const R1Engine,
    seq: *mut R1Sequence,
) -> R1Status {
    call(|| {
        if seq.is_null() {
            return Ok(());
        }
        // SAFETY: header contract.
        let engine = unsafe { non_null(engine, "engine") }?;
        // SAFETY: header contract (a live sequence, not aliased).
        owned_by(unsafe { &*seq }, engine)?;
        // SAFETY: created by Box::into_raw (header contract).
        let mut s = unsafe { Box::from_raw(seq) };
        lock(engine)?.release(&mut s.seq);
        Ok(())
    })
}

/// Positions the sequence holds in the cache (0 for NULL).
///
/// # Safety
/// `seq` is NULL or valid.
#[no_mangle]
pub unsafe extern "C" fn r1_sequence_len(seq: *const R1Sequence) -> u64 {
    // SAFETY: header contract.
    unsafe { seq.as_ref() }.map_or(0, |s| to_u64(s.seq.len()))
}

/// A new sequence holding the first `len` positions of `seq` (at most its length), sharing
/// its cache pages until either one writes into a shared page.
///
/// # Safety
/// `engine`, `seq` and `out` are valid.
#[no_mangle]
pub unsafe extern "C" fn r1_sequence_fork(
    engine: *const R1Engine,
    seq: *const R1Sequence,
    len: u64,
    out: *mut *mut R1Sequence,
) -> R1Status {
    call(|| {
        // SAFETY: header contract.
        let (engine, seq, out) = unsafe {
            (
                non_null(engine, "engine")?,
                non_null(seq, "seq")?,
                non_null_mut(out, "out")?,
            )
        };
        owned_by(seq, engine)?;
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        let forked = lock(engine)?.fork(&seq.seq, len);
        *out = Box::into_raw(Box::new(R1Sequence {
            seq: forked,
            owner: engine,
        }));
        Ok(())
    })
}

/// Forgets the sequence's positions from `len` on (e.g. rejected draft tokens).
///
/// # Safety
/// `engine` and `seq` are valid.
#[no_mangle]
pub unsafe extern "C" fn r1_sequence_truncate(
    engine: *const R1Engine,
    seq: *mut R1Sequence,
    len: u64,
) -> R1Status {
    call(|| {
        // SAFETY: header contract.
        let (engine, seq) = unsafe { (non_null(engine, "engine")?, non_null_mut(seq, "seq")?) };
        owned_by(seq, engine)?;
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        lock(engine)?.truncate(&mut seq.seq, len);
        Ok(())
    })
}

/// One forward step over `n` sequences at once: sequence `i` appends `counts[i]` tokens from
/// `tokens[i]`, and the logits of its last token go to `logits[i * vocab_size ..]` (f32,
/// `logits_len` >= n * vocab_size).
///
/// # Safety
/// `engine` is valid; `seqs`, `tokens` and `counts` hold `n` elements; `tokens[i]` holds
/// `counts[i]` ids; `logits` holds `logits_len` floats.
#[no_mangle]
pub unsafe extern "C" fn r1_forward(
    engine: *const R1Engine,
    seqs: *const *mut R1Sequence,
    tokens: *const *const u32,
    counts: *const u64,
    n: u64,
    logits: *mut f32,
    logits_len: u64,
) -> R1Status {
    // SAFETY: the same contract, with one logit row per sequence.
    unsafe { forward(engine, seqs, tokens, counts, None, n, logits, logits_len) }
}

/// [`r1_forward`] with logits for the last `rows[i]` tokens of sequence `i` (1 <= rows[i] <=
/// counts[i]; e.g. 1 + drafts when verifying speculative tokens), packed in order:
/// `logits_len` >= (sum of rows) * vocab_size.
///
/// # Safety
/// As [`r1_forward`]; `rows` holds `n` elements.
#[no_mangle]
pub unsafe extern "C" fn r1_forward_rows(
    engine: *const R1Engine,
    seqs: *const *mut R1Sequence,
    tokens: *const *const u32,
    counts: *const u64,
    rows: *const u64,
    n: u64,
    logits: *mut f32,
    logits_len: u64,
) -> R1Status {
    // SAFETY: the caller's contract, forwarded.
    unsafe {
        forward(
            engine,
            seqs,
            tokens,
            counts,
            Some(rows),
            n,
            logits,
            logits_len,
        )
    }
}

#[allow(clippy::too_many_arguments)]
unsafe fn forward(
    engine: *const R1Engine,
    seqs: *const *mut R1Sequence,
    tokens: *const *const u32,
    counts: *const u64,
    rows: Option<*const u64>,
    n: u64,
    logits: *mut f32,
    logits_len: u64,
) -> R1Status {
    call(|| {
        // SAFETY: header contract for every pointer below.
        let engine = unsafe { non_null(engine, "engine") }?;
        let rows = match rows {
            Some(p) => Some(unsafe { slice(p, n, "rows") }?),
            None => None,
        };
        let seq_ptrs = unsafe { slice(seqs, n, "seqs") }?;
        let token_ptrs = unsafe { slice(tokens, n, "tokens") }?;
        let counts = unsafe { slice(counts, n, "counts") }?;
        let logits = unsafe { slice_mut(logits, logits_len, "logits") }?;
        if seq_ptrs.is_empty() {
            return Err(argument("n is 0: no sequence to run"));
        }
        for (i, p) in seq_ptrs.iter().enumerate() {
            if seq_ptrs[..i].contains(p) {
                return Err(argument(format!("seqs[{i}] appears twice in one step")));
            }
        }
        let mut steps = Vec::with_capacity(seq_ptrs.len());
        let mut logit_rows = Vec::with_capacity(seq_ptrs.len());
        for (i, ((&s, &t), &c)) in seq_ptrs.iter().zip(token_ptrs).zip(counts).enumerate() {
            // SAFETY: distinct (checked above) live sequences, per the header contract.
            let s = unsafe { non_null_mut(s, &format!("seqs[{i}]")) }?;
            owned_by(s, engine)?;
            let tokens = unsafe { slice(t, c, &format!("tokens[{i}]")) }?;
            let r = rows.map_or(1, |r| r[i]);
            if r == 0 || r > c {
                return Err(argument(format!(
                    "rows[{i}] = {r} must be in 1..=counts[{i}] ({c})"
                )));
            }
            logit_rows.push(r as usize);
            steps.push(Step {
                seq: &mut s.seq,
                tokens,
            });
        }
        let mut e = lock(engine)?;
        let vocab = e.config().vocab_size;
        let need = logit_rows.iter().sum::<usize>() * vocab;
        if logits.len() < need {
            return Err(argument(format!(
                "logits holds {} floats; {} rows x vocab {vocab} need {need}",
                logits.len(),
                need / vocab
            )));
        }
        let reads: Vec<Readback> = logit_rows.iter().map(|&r| Readback::logits(r)).collect();
        let out = e.forward_batch_with(&mut steps, &reads, false)?;
        let mut at = 0;
        for f in out {
            logits[at..at + f.logits.len()].copy_from_slice(&f.logits);
            at += f.logits.len();
        }
        Ok(())
    })
}

/// # Safety
/// `out` is NULL or valid for writes.
#[no_mangle]
pub unsafe extern "C" fn r1_sampling_default(out: *mut R1Sampling) -> R1Status {
    call(|| {
        let d = SamplingParams::default();
        // SAFETY: header contract.
        *unsafe { non_null_mut(out, "out") }? = R1Sampling {
            temperature: d.temperature,
            top_k: u32::try_from(d.top_k).unwrap_or(u32::MAX),
            top_p: d.top_p,
            seed: d.seed,
            ignore_eos: i32::from(d.ignore_eos),
        };
        Ok(())
    })
}

/// Generates up to `max_new_tokens` after `prompt` (stopping after an end-of-sequence token,
/// which is included) into `out_tokens`; `*out_len` receives the count.
///
/// # Safety
/// `engine` is valid; `prompt` holds `prompt_len` ids; `sampling` is NULL (greedy) or valid;
/// `out_tokens` holds `out_cap` ids; `out_len` is valid for writes.
#[no_mangle]
pub unsafe extern "C" fn r1_generate(
    engine: *const R1Engine,
    prompt: *const u32,
    prompt_len: u64,
    max_new_tokens: u64,
    sampling: *const R1Sampling,
    out_tokens: *mut u32,
    out_cap: u64,
    out_len: *mut u64,
) -> R1Status {
    call(|| {
        // SAFETY: header contract for every pointer below.
        let engine = unsafe { non_null(engine, "engine") }?;
        let prompt = unsafe { slice(prompt, prompt_len, "prompt") }?;
        let out = unsafe { slice_mut(out_tokens, out_cap, "out_tokens") }?;
        let out_len = unsafe { non_null_mut(out_len, "out_len") }?;
        *out_len = 0;
        if out_cap < max_new_tokens {
            return Err(argument(format!(
                "out_tokens holds {out_cap} ids; max_new_tokens is {max_new_tokens}"
            )));
        }
        let params = match unsafe { sampling.as_ref() } {
            None => SamplingParams::default(),
            Some(s) => SamplingParams {
                temperature: s.temperature,
                top_k: s.top_k as usize,
                top_p: s.top_p,
                seed: s.seed,
                ignore_eos: s.ignore_eos != 0,
            },
        };
        let max_new = usize::try_from(max_new_tokens).unwrap_or(usize::MAX);
        let g = lock(engine)?.generate(prompt, max_new, &params)?;
        out[..g.tokens.len()].copy_from_slice(&g.tokens);
        *out_len = to_u64(g.tokens.len());
        Ok(())
    })
}
