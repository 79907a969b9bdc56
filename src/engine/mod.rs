//! Drives a backend: loads a checkpoint, keeps the graphs and the KV cache block tables, runs
//! forward passes for sequences, and generates.

pub mod sampling;
pub mod scheduler;
pub mod speculative;
pub mod throughput;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::backend::{Backend, Precision, Readout, RowRead};
use crate::checkpoint::Checkpoint;
use crate::config::ModelConfig;
use crate::cpu::CpuBackend;
use crate::error::{Error, Result};
use crate::graph::{Graph, Plan};
use crate::kv_cache::{Batch, BlockAllocator, PageCopy, Segment, SeqBlocks, PAGE_TOKENS};
use crate::model::weights::ModelWeights;
use crate::model::{self, LogitRows, HIDDEN_IN};
use sampling::SamplingParams;

/// Which backend executes the graphs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    Cpu,
    /// One Hopper GPU (w8a8 only).
    Cuda,
}

impl std::str::FromStr for BackendKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cpu" => Ok(BackendKind::Cpu),
            "cuda" => Ok(BackendKind::Cuda),
            other => Err(format!("unknown backend `{other}` (available: cpu, cuda)")),
        }
    }
}

#[derive(Debug, Clone)]
pub struct EngineOptions {
    pub backend: BackendKind,
    pub precision: Precision,
    /// Load the MTP layer when the checkpoint has one.
    pub with_mtp: bool,
    /// KV cache capacity in tokens, over all sequences.
    pub cache_tokens: usize,
    /// MTP speculative decoding: drafts per step for front ends that decode with the
    /// scheduler or `generate` (0: off). Loads the MTP layer; an error without one.
    pub draft_tokens: usize,
    /// The largest step the engine will run: sequences in it, and tokens over them. A GPU
    /// backend sizes its workspaces for it at load.
    pub max_seqs: usize,
    pub max_step_tokens: usize,
    /// Replay decode steps as captured CUDA graphs (the CUDA backend).
    pub cuda_graphs: bool,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            backend: BackendKind::Cpu,
            precision: Precision::Exact,
            with_mtp: true,
            cache_tokens: 1 << 20,
            draft_tokens: 0,
            max_seqs: 64,
            max_step_tokens: 512,
            cuda_graphs: true,
        }
    }
}

struct Compiled {
    graph: Graph,
    plan: Plan,
}

impl Compiled {
    fn new(graph: Graph) -> Self {
        let plan = Plan::new(&graph);
        Compiled { graph, plan }
    }
}

/// A sequence's cache state: positions `0..blocks.len` of the main model are cached, and
/// `mtp_len` positions of the MTP layer (which shares the block table).
#[derive(Debug, Default)]
pub struct Sequence {
    blocks: SeqBlocks,
    mtp_len: usize,
}

impl Sequence {
    /// Positions cached by the main model.
    pub fn len(&self) -> usize {
        self.blocks.len
    }

    pub fn is_empty(&self) -> bool {
        self.blocks.len == 0
    }

    /// Positions cached by the MTP layer.
    pub fn mtp_len(&self) -> usize {
        self.mtp_len
    }
}

/// One sequence's part of a batched forward step.
pub struct Step<'a> {
    pub seq: &'a mut Sequence,
    pub tokens: &'a [u32],
}

impl AsMut<Sequence> for Step<'_> {
    fn as_mut(&mut self) -> &mut Sequence {
        self.seq
    }
}

/// One sequence's part of a batched MTP step (see [`Engine::mtp_forward`]).
pub struct MtpStep<'a> {
    pub seq: &'a mut Sequence,
    pub from: usize,
    pub next_tokens: &'a [u32],
    pub hidden: &'a [f32],
}

impl AsMut<Sequence> for MtpStep<'_> {
    fn as_mut(&mut self) -> &mut Sequence {
        self.seq
    }
}

/// What one sequence of a step reads back: its last `rows` token rows.
#[derive(Debug, Clone, Copy, Default)]
pub struct Readback<'a> {
    pub rows: usize,
    /// Draw the token after each of those rows with these settings, on the backend. A draw's
    /// counter is the position the drawn token takes, so a seed draws the same tokens whether
    /// or not speculation runs ahead of it.
    pub sample: Option<&'a SamplingParams>,
    /// Return those rows' f32 logits.
    pub logits: bool,
}

impl<'a> Readback<'a> {
    /// The logits of the last `rows` rows.
    pub fn logits(rows: usize) -> Self {
        Readback {
            rows,
            sample: None,
            logits: true,
        }
    }

    /// A token drawn after each of the last `rows` rows.
    pub fn sample(rows: usize, params: &'a SamplingParams) -> Self {
        Readback {
            rows,
            sample: Some(params),
            logits: false,
        }
    }
}

/// What one sequence read back from a forward, as its [`Readback`] asked: drawn tokens (one
/// per row), logits rows, and (when the step asked) final-normed hidden states of every token.
#[derive(Debug, Clone, Default)]
pub struct Forward {
    pub tokens: Vec<u32>,
    pub logits: Vec<f32>,
    pub hidden: Vec<f32>,
}

pub struct Engine {
    cfg: ModelConfig,
    weights: Arc<ModelWeights>,
    backend: Box<dyn Backend>,
    alloc: BlockAllocator,
    main_all: Compiled,
    main_last: Compiled,
    mtp_all: Option<Compiled>,
    mtp_last: Option<Compiled>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Eos,
    Length,
}

#[derive(Debug, Clone)]
pub struct Generation {
    pub tokens: Vec<u32>,
    pub finish_reason: FinishReason,
    pub prefill: Duration,
    pub decode: Duration,
    /// Forward passes after the prefill (one token each).
    pub decode_steps: usize,
}

impl Engine {
    /// Opens `dir` (config.json + safetensors) and builds the backend.
    pub fn load(dir: &Path, options: &EngineOptions) -> Result<Self> {
        let cfg = ModelConfig::from_dir(dir)?;
        if options.draft_tokens > 0 && !cfg.has_mtp() {
            return Err(Error::Unsupported(format!(
                "speculative decoding drafts with the MTP layer, but {} declares none (num_nextn_predict_layers is 0)",
                dir.join("config.json").display()
            )));
        }
        if options.backend == BackendKind::Cuda {
            // Fail fast, before reading the weights: the recipe and the device.
            if options.precision != Precision::W8a8 {
                return Err(Error::Unsupported(
                    "the CUDA backend runs the w8a8 recipe only: pass --precision w8a8".into(),
                ));
            }
            crate::cuda::Device::probe(0)?;
        }
        let ckpt = Checkpoint::open(dir)?;
        let with_mtp = options.with_mtp || options.draft_tokens > 0;
        let weights = Arc::new(ModelWeights::load(&ckpt, &cfg, with_mtp)?);
        let backend: Box<dyn Backend> = match options.backend {
            BackendKind::Cpu => Box::new(CpuBackend::new(
                &cfg,
                Arc::clone(&weights),
                options.precision,
            )),
            BackendKind::Cuda => Box::new(crate::cuda::CudaBackend::new(
                &cfg,
                Arc::clone(&weights),
                options.precision,
                &crate::cuda::CudaOptions {
                    cuda_graphs: options.cuda_graphs,
                    max_step_tokens: options.max_step_tokens,
                    max_seqs: options.max_seqs,
                    // A graph step's block tables hold the longest sequence the cache can.
                    max_seq_len: cfg.max_position_embeddings.min(options.cache_tokens),
                },
            )?),
        };
        Ok(Self::with_backend(
            cfg,
            weights,
            backend,
            options.cache_tokens,
        ))
    }

    pub fn with_backend(
        cfg: ModelConfig,
        weights: Arc<ModelWeights>,
        backend: Box<dyn Backend>,
        cache_tokens: usize,
    ) -> Self {
        let compile = |rows| Compiled::new(model::main_graph(&cfg, &weights, rows));
        let compile_mtp = |rows| model::mtp_graph(&cfg, &weights, rows).map(Compiled::new);
        Engine {
            main_all: compile(LogitRows::All),
            main_last: compile(LogitRows::Last),
            mtp_all: compile_mtp(LogitRows::All),
            mtp_last: compile_mtp(LogitRows::Last),
            alloc: BlockAllocator::new(cache_tokens.div_ceil(PAGE_TOKENS)),
            cfg,
            weights,
            backend,
        }
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    pub fn weights(&self) -> &ModelWeights {
        &self.weights
    }

    pub fn backend(&self) -> &dyn Backend {
        self.backend.as_ref()
    }

    pub fn has_mtp(&self) -> bool {
        self.mtp_all.is_some()
    }

    /// Frees a finished sequence's cache pages.
    pub fn release(&mut self, seq: &mut Sequence) {
        seq.blocks.release(&mut self.alloc);
        seq.mtp_len = 0;
    }

    fn check_tokens(&self, seq_len: usize, tokens: &[u32]) -> Result<()> {
        if tokens.is_empty() {
            return Err(Error::Input("no tokens to run".into()));
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= self.cfg.vocab_size) {
            return Err(Error::Input(format!(
                "token id {bad} is outside the vocabulary (vocab_size {})",
                self.cfg.vocab_size
            )));
        }
        let end = seq_len + tokens.len();
        if end > self.cfg.max_position_embeddings {
            return Err(Error::Input(format!(
                "{end} tokens exceed the model's context of {} (max_position_embeddings)",
                self.cfg.max_position_embeddings
            )));
        }
        Ok(())
    }

    /// Appends `tokens` to `seq` through the main model. Logits come for every new token
    /// (`LogitRows::All`) or the last one, with the hidden states of every token.
    pub fn forward(
        &mut self,
        seq: &mut Sequence,
        tokens: &[u32],
        rows: LogitRows,
    ) -> Result<Forward> {
        let mut step = [Step { seq, tokens }];
        let mut out = self.forward_batch(&mut step, rows)?;
        Ok(out.remove(0))
    }

    /// One forward step over several sequences at once (continuous batching): each appends
    /// its tokens; results come back in the same order, with logits for every token
    /// (`LogitRows::All`) or each sequence's last token, and every token's hidden state.
    pub fn forward_batch(
        &mut self,
        steps: &mut [Step<'_>],
        rows: LogitRows,
    ) -> Result<Vec<Forward>> {
        let reads: Vec<Readback> = steps
            .iter()
            .map(|s| Readback::logits(rows.count(s.tokens.len())))
            .collect();
        self.forward_batch_with(steps, &reads, true)
    }

    /// [`Engine::forward_batch`] reading back what `reads[i]` asks of step i (nothing for a
    /// prefill chunk, a drawn token for a decode, 1 + drafts draws when verifying
    /// speculation) and, with `hidden`, every token's final hidden state.
    pub fn forward_batch_with(
        &mut self,
        steps: &mut [Step<'_>],
        reads: &[Readback<'_>],
        hidden: bool,
    ) -> Result<Vec<Forward>> {
        check_reads(steps.len(), reads)?;
        if steps.is_empty() {
            return Ok(Vec::new());
        }
        let mut batch = Batch::default();
        let mut copies = Vec::with_capacity(steps.len());
        for (step, read) in steps.iter_mut().zip(reads) {
            let start = step.seq.len();
            let unshared = self.check_tokens(start, step.tokens).and_then(|()| {
                Self::make_writable(&mut self.alloc, step.seq, start, start + step.tokens.len())
            });
            match unshared {
                Ok(c) => copies.push(c),
                Err(e) => {
                    Self::undo_unshare(&mut self.alloc, steps, &copies);
                    return Err(e);
                }
            }
            batch.tokens.extend_from_slice(step.tokens);
            batch.segments.push(Segment {
                blocks: step.seq.blocks.blocks.clone(),
                start_pos: start,
                len: step.tokens.len(),
                logit_rows: read.rows.min(step.tokens.len()),
            });
        }
        let every_token = batch.segments.iter().all(|s| s.logit_rows == s.len);
        let compiled = if every_token {
            &self.main_all
        } else {
            &self.main_last
        };
        batch.page_copies = copies.iter().flatten().copied().collect();
        let read = read_step(
            self.backend.as_mut(),
            compiled,
            &batch,
            &[],
            reads,
            hidden,
            Predicts::NextPosition,
            self.cfg.hidden_size,
            self.cfg.vocab_size,
        );
        let results = match read {
            Ok(r) => r,
            Err(e) => {
                Self::undo_unshare(&mut self.alloc, steps, &copies);
                return Err(e);
            }
        };
        for step in steps.iter_mut() {
            step.seq.blocks.len += step.tokens.len();
        }
        Ok(results)
    }

    /// Makes room for positions `..end` of `seq` and gives it its own copy of every shared
    /// page holding a position from `from` on (see [`Engine::fork`]); returns the copies the
    /// step's backend must make.
    fn make_writable(
        alloc: &mut BlockAllocator,
        seq: &mut Sequence,
        from: usize,
        end: usize,
    ) -> Result<Vec<PageCopy>> {
        seq.blocks.reserve(alloc, end)?;
        seq.blocks.unshare_from(alloc, from)
    }

    /// Takes back the page copies of a step that did not run (`copies[i]` belongs to
    /// `steps[i]`).
    fn undo_unshare<S: AsMut<Sequence>>(
        alloc: &mut BlockAllocator,
        steps: &mut [S],
        copies: &[Vec<PageCopy>],
    ) {
        for (step, c) in steps.iter_mut().zip(copies) {
            step.as_mut().blocks.undo_unshare(alloc, c);
        }
    }

    /// A new sequence holding positions `0..len` of `seq` (main model and MTP layer alike)
    /// without copying them: the two share cache pages until one of them writes into a
    /// shared page, which then gets its own copy. Prefix caching forks cached sequences.
    pub fn fork(&mut self, seq: &Sequence, len: usize) -> Sequence {
        let blocks = seq.blocks.fork(&mut self.alloc, len);
        Sequence {
            mtp_len: seq.mtp_len.min(blocks.len),
            blocks,
        }
    }

    /// Forgets a sequence's positions from `len` on (main model and MTP layer), e.g. draft
    /// tokens that verification rejected; the freed pages return to the pool.
    pub fn truncate(&mut self, seq: &mut Sequence, len: usize) {
        seq.blocks.truncate(&mut self.alloc, len);
        seq.mtp_len = seq.mtp_len.min(len);
    }

    /// Forgets the MTP layer's positions from `len` on (provisional draft entries); the main
    /// model's positions stay.
    pub fn truncate_mtp(&mut self, seq: &mut Sequence, len: usize) {
        seq.mtp_len = seq.mtp_len.min(len);
    }

    /// Pages of the KV cache in use, over all sequences.
    pub fn cache_pages_in_use(&self) -> usize {
        self.alloc.in_use()
    }

    /// Pages the KV cache holds at most (`cache_tokens` / [`PAGE_TOKENS`]).
    pub fn cache_pages_capacity(&self) -> usize {
        self.alloc.capacity()
    }

    /// Pages that writing `seq`'s positions `from..end` (main model or MTP layer) would take
    /// from the cache: pages past its end plus copies of pages it shares.
    pub fn pages_to_write(&self, seq: &Sequence, from: usize, end: usize) -> usize {
        seq.blocks.pages_to_write(&self.alloc, from, end)
    }

    /// Runs the MTP layer for positions `from ..` (forgetting any MTP cache entries at or past
    /// `from`, e.g. earlier drafts): `next_tokens[i]` is the token after position `from + i`
    /// and `hidden` holds the state at that position — the main model's final-normed state,
    /// or, when drafting several tokens ahead, the MTP layer's own output for the previous
    /// position. Returns logits predicting the token two ahead of each position (rows as
    /// asked) and the layer's output states for chaining.
    pub fn mtp_forward(
        &mut self,
        seq: &mut Sequence,
        from: usize,
        next_tokens: &[u32],
        hidden: &[f32],
        rows: LogitRows,
    ) -> Result<Forward> {
        let mut step = [MtpStep {
            seq,
            from,
            next_tokens,
            hidden,
        }];
        let mut out = self.mtp_forward_batch(&mut step, rows)?;
        Ok(out.remove(0))
    }

    /// [`Engine::mtp_forward`] for several sequences in one MTP forward.
    pub fn mtp_forward_batch(
        &mut self,
        steps: &mut [MtpStep<'_>],
        rows: LogitRows,
    ) -> Result<Vec<Forward>> {
        let reads: Vec<Readback> = steps
            .iter()
            .map(|s| Readback::logits(rows.count(s.next_tokens.len())))
            .collect();
        self.mtp_forward_batch_with(steps, &reads, true)
    }

    /// [`Engine::mtp_forward_batch`] reading back what `reads[i]` asks of step i; a draw after
    /// the row of position p is the token at p + 2 (the MTP layer predicts two ahead).
    pub fn mtp_forward_batch_with(
        &mut self,
        steps: &mut [MtpStep<'_>],
        reads: &[Readback<'_>],
        hidden: bool,
    ) -> Result<Vec<Forward>> {
        check_reads(steps.len(), reads)?;
        if steps.is_empty() {
            return Ok(Vec::new());
        }
        let every_token = steps
            .iter()
            .zip(reads)
            .all(|(s, r)| r.rows >= s.next_tokens.len());
        let compiled = if every_token {
            self.mtp_all.as_ref()
        } else {
            self.mtp_last.as_ref()
        }
        .ok_or_else(|| {
            Error::Unsupported(
                "this checkpoint has no MTP layer (num_nextn_predict_layers is 0 or it was not loaded)".into(),
            )
        })?;
        let h = self.cfg.hidden_size;
        let mut batch = Batch::default();
        let mut hidden_in = Vec::new();
        let mut copies = Vec::with_capacity(steps.len());
        for (step, read) in steps.iter_mut().zip(reads) {
            if step.from > step.seq.mtp_len {
                return Err(Error::Input(format!(
                    "MTP positions must be contiguous: {} cached, asked to start at {}",
                    step.seq.mtp_len, step.from
                )));
            }
            if step.hidden.len() != step.next_tokens.len() * h {
                return Err(Error::Input(format!(
                    "the MTP layer needs one hidden state per token: {} values for {} tokens of width {h}",
                    step.hidden.len(),
                    step.next_tokens.len()
                )));
            }
            // Draft positions may run ahead of the main model: make room in the shared table.
            let end = step.from + step.next_tokens.len();
            let unshared = self
                .check_tokens(step.from, step.next_tokens)
                .and_then(|()| Self::make_writable(&mut self.alloc, step.seq, step.from, end));
            match unshared {
                Ok(c) => copies.push(c),
                Err(e) => {
                    Self::undo_unshare(&mut self.alloc, steps, &copies);
                    return Err(e);
                }
            }
            batch.tokens.extend_from_slice(step.next_tokens);
            hidden_in.extend_from_slice(step.hidden);
            batch.segments.push(Segment {
                blocks: step.seq.blocks.blocks.clone(),
                start_pos: step.from,
                len: step.next_tokens.len(),
                logit_rows: read.rows.min(step.next_tokens.len()),
            });
        }
        batch.page_copies = copies.iter().flatten().copied().collect();
        let read = read_step(
            self.backend.as_mut(),
            compiled,
            &batch,
            &[(HIDDEN_IN, &hidden_in)],
            reads,
            hidden,
            Predicts::TwoAhead,
            h,
            self.cfg.vocab_size,
        );
        let results = match read {
            Ok(r) => r,
            Err(e) => {
                Self::undo_unshare(&mut self.alloc, steps, &copies);
                return Err(e);
            }
        };
        for step in steps.iter_mut() {
            step.seq.mtp_len = step.from + step.next_tokens.len();
        }
        Ok(results)
    }

    /// Scores a prompt: logits of every position and, with an MTP layer and at least two
    /// tokens, the MTP logits [T-1, vocab] (row i predicts token i+2 from token i+1 and the
    /// main model's state at i).
    pub fn score(&mut self, tokens: &[u32]) -> Result<(Vec<f32>, Option<Vec<f32>>)> {
        let mut seq = Sequence::default();
        let result = self.score_in(&mut seq, tokens);
        self.release(&mut seq);
        result
    }

    fn score_in(
        &mut self,
        seq: &mut Sequence,
        tokens: &[u32],
    ) -> Result<(Vec<f32>, Option<Vec<f32>>)> {
        let main = self.forward(seq, tokens, LogitRows::All)?;
        let mtp = if self.has_mtp() && tokens.len() >= 2 {
            let h = self.cfg.hidden_size;
            let hidden = &main.hidden[..(tokens.len() - 1) * h];
            Some(
                self.mtp_forward(seq, 0, &tokens[1..], hidden, LogitRows::All)?
                    .logits,
            )
        } else {
            None
        };
        Ok((main.logits, mtp))
    }

    /// Greedy or sampled generation for one prompt through the KV cache (one token per decode
    /// step). Stops after `max_new_tokens` or right after an eos token (which is included).
    pub fn generate(
        &mut self,
        prompt: &[u32],
        max_new_tokens: usize,
        sampling: &SamplingParams,
    ) -> Result<Generation> {
        self.check_generation(prompt, max_new_tokens, sampling)?;
        let mut seq = Sequence::default();
        let result = self.generate_in(&mut seq, prompt, max_new_tokens, sampling);
        self.release(&mut seq);
        result
    }

    fn check_generation(
        &self,
        prompt: &[u32],
        max_new_tokens: usize,
        sampling: &SamplingParams,
    ) -> Result<()> {
        sampling.validate().map_err(Error::Input)?;
        if max_new_tokens == 0 {
            return Err(Error::Input("max_new_tokens must be at least 1".into()));
        }
        self.check_tokens(0, prompt)?;
        if prompt.len() + max_new_tokens > self.cfg.max_position_embeddings {
            return Err(Error::Input(format!(
                "prompt ({}) + max_new_tokens ({max_new_tokens}) exceed the context of {} tokens",
                prompt.len(),
                self.cfg.max_position_embeddings
            )));
        }
        Ok(())
    }

    /// Appends `tokens` to `seq` and draws the token after them on the backend.
    pub fn sample_next(
        &mut self,
        seq: &mut Sequence,
        tokens: &[u32],
        sampling: &SamplingParams,
    ) -> Result<u32> {
        let mut step = [Step { seq, tokens }];
        let out = self.forward_batch_with(&mut step, &[Readback::sample(1, sampling)], false)?;
        out.first()
            .and_then(|f| f.tokens.first().copied())
            .ok_or_else(|| Error::Backend {
                backend: self.backend.name().into(),
                message: "a step asked for a drawn token returned none".into(),
            })
    }

    fn generate_in(
        &mut self,
        seq: &mut Sequence,
        prompt: &[u32],
        max_new_tokens: usize,
        sampling: &SamplingParams,
    ) -> Result<Generation> {
        let t0 = Instant::now();
        let mut next = self.sample_next(seq, prompt, sampling)?;
        let prefill = t0.elapsed();
        let t1 = Instant::now();
        let mut tokens = Vec::new();
        let mut decode_steps = 0;
        let finish_reason = loop {
            tokens.push(next);
            if !sampling.ignore_eos && self.cfg.eos_token_ids.contains(&next) {
                break FinishReason::Eos;
            }
            if tokens.len() == max_new_tokens {
                break FinishReason::Length;
            }
            next = self.sample_next(seq, &[next], sampling)?;
            decode_steps += 1;
        };
        Ok(Generation {
            tokens,
            finish_reason,
            prefill,
            decode: t1.elapsed(),
            decode_steps,
        })
    }
}

/// One readback per step.
fn check_reads(steps: usize, reads: &[Readback<'_>]) -> Result<()> {
    if reads.len() != steps {
        return Err(Error::Input(format!(
            "{} readbacks for a step of {steps} sequences: one per sequence",
            reads.len()
        )));
    }
    Ok(())
}

/// What the rows of a graph predict: the main model the next position, the MTP layer the one
/// after (a draw's counter is the position of the token it draws).
#[derive(Clone, Copy)]
enum Predicts {
    NextPosition,
    TwoAhead,
}

/// Runs one step on `backend` and splits what it read back among the batch's sequences.
#[allow(clippy::too_many_arguments)]
fn read_step(
    backend: &mut dyn Backend,
    compiled: &Compiled,
    batch: &Batch,
    inputs: &[(&str, &[f32])],
    reads: &[Readback<'_>],
    hidden: bool,
    predicts: Predicts,
    width: usize,
    vocab: usize,
) -> Result<Vec<Forward>> {
    let ahead = match predicts {
        Predicts::NextPosition => 1,
        Predicts::TwoAhead => 2,
    };
    let mut rows = Vec::new();
    for (seg, read) in batch.segments.iter().zip(reads) {
        let first = seg.start_pos + seg.len - seg.logit_rows;
        rows.extend((0..seg.logit_rows).map(|j| RowRead {
            draw: read.sample.map(|p| p.draw((first + j + ahead) as u64)),
            logits: read.logits,
        }));
    }
    let readout = Readout {
        rows: &rows,
        hidden,
    };
    let out = backend.run(&compiled.graph, &compiled.plan, batch, inputs, &readout)?;
    let logit_rows = rows.iter().filter(|r| r.logits).count();
    let hidden_len = if hidden {
        batch.tokens.len() * width
    } else {
        0
    };
    if out.tokens.len() != rows.len()
        || out.logits.len() != logit_rows * vocab
        || out.hidden.len() != hidden_len
    {
        return Err(Error::Backend {
            backend: backend.name().into(),
            message: format!(
                "a step read back {} rows, {} logits and {} hidden values; {} rows, {} logits and {hidden_len} hidden values were asked",
                out.tokens.len(),
                out.logits.len(),
                out.hidden.len(),
                rows.len(),
                logit_rows * vocab
            ),
        });
    }
    let (mut row, mut logit_row, mut token_row) = (0, 0, 0);
    let mut results = Vec::with_capacity(batch.segments.len());
    for (seg, read) in batch.segments.iter().zip(reads) {
        let n = seg.logit_rows;
        let tokens: Vec<u32> = out.tokens[row..row + n].iter().flatten().copied().collect();
        if read.sample.is_some() && tokens.len() != n {
            return Err(Error::Backend {
                backend: backend.name().into(),
                message: format!("{} of {n} asked draws came back", tokens.len()),
            });
        }
        let logit_rows = if read.logits { n } else { 0 };
        results.push(Forward {
            tokens,
            logits: out.logits[logit_row * vocab..(logit_row + logit_rows) * vocab].to_vec(),
            hidden: if hidden {
                out.hidden[token_row * width..(token_row + seg.len) * width].to_vec()
            } else {
                Vec::new()
            },
        });
        row += n;
        logit_row += logit_rows;
        token_row += seg.len;
    }
    Ok(results)
}
