//! Which steps replay a captured CUDA graph (docs/design.md, "The decode path"): pure
//! functions of the step's shape and the backend's limits, and the captured graphs by key.
//!
//! A step is a graph step when every sequence brings the same number of tokens `L` and asks
//! for the same rows: plain decode (`L = 1`, one row) or verification of `L - 1` drafts (all
//! `L` rows), with `L <= MAX_GRAPH_QUERY`. It runs in the smallest batch bucket (1, 2, 4, 8,
//! ..., then `max_seqs`) that holds its sequences, padded with sequences that write and read
//! only the cache's scratch page; the bucket's tokens must be within `max_step_tokens` and
//! every sequence within `max_seq_len` (the block tables are that wide). Everything else
//! (prefill, mixed steps) runs eagerly.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::cuda::CapturedGraph;
use crate::graph::{Graph, Op, Rows, Storage};
use crate::kv_cache::{Batch, PAGE_TOKENS};

/// Most tokens per sequence of a graph step (1 + drafts of a verification).
pub(super) const MAX_GRAPH_QUERY: usize = 8;

/// What the graph steps may be (the backend's limits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct GraphLimits {
    pub max_step_tokens: usize,
    pub max_seqs: usize,
    pub max_seq_len: usize,
}

impl GraphLimits {
    /// Pages of the widest block table (a graph's block tables are this wide).
    pub fn pages_per_seq(&self) -> usize {
        self.max_seq_len.div_ceil(PAGE_TOKENS).max(1)
    }
}

/// Every sequence of the step brings `tokens_per_seq` tokens and asks for `rows_per_seq`
/// logit rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct StepShape {
    pub tokens_per_seq: usize,
    pub rows_per_seq: usize,
}

impl StepShape {
    /// Plain decode.
    pub const DECODE: StepShape = StepShape {
        tokens_per_seq: 1,
        rows_per_seq: 1,
    };
}

#[cfg(test)]
impl StepShape {
    /// Verification of `drafts` draft tokens (every row).
    pub fn verify(drafts: usize) -> StepShape {
        StepShape {
            tokens_per_seq: 1 + drafts,
            rows_per_seq: 1 + drafts,
        }
    }
}

/// The batch buckets for up to `max_seqs` sequences: powers of two below it, then itself.
pub(super) fn buckets(max_seqs: usize) -> Vec<usize> {
    let mut b: Vec<usize> = (0..usize::BITS)
        .map(|i| 1usize << i)
        .take_while(|&n| n < max_seqs)
        .collect();
    b.push(max_seqs.max(1));
    b
}

/// The smallest bucket holding `seqs` sequences (None past `max_seqs`).
pub(super) fn bucket_for(seqs: usize, max_seqs: usize) -> Option<usize> {
    if seqs == 0 || seqs > max_seqs {
        return None;
    }
    Some(seqs.next_power_of_two().min(max_seqs))
}

/// The step's uniform shape, when it is decode or verification.
pub(super) fn step_shape(batch: &Batch) -> Option<StepShape> {
    let first = batch.segments.first()?;
    let shape = StepShape {
        tokens_per_seq: first.len,
        rows_per_seq: first.logit_rows.min(first.len),
    };
    let uniform = batch
        .segments
        .iter()
        .all(|s| s.len == shape.tokens_per_seq && s.logit_rows.min(s.len) == shape.rows_per_seq);
    let decode_or_verify = shape == StepShape::DECODE
        || (shape.rows_per_seq == shape.tokens_per_seq
            && (1..=MAX_GRAPH_QUERY).contains(&shape.tokens_per_seq));
    (uniform && decode_or_verify).then_some(shape)
}

/// A step that replays a graph: its shape and bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct GraphStep {
    pub shape: StepShape,
    pub seqs: usize,
}

impl GraphStep {
    pub fn tokens(&self) -> usize {
        self.seqs * self.shape.tokens_per_seq
    }
}

/// Whether `batch` runs as a graph step under `limits`, and in which bucket.
pub(super) fn graph_step(limits: &GraphLimits, batch: &Batch) -> Option<GraphStep> {
    let shape = step_shape(batch)?;
    let seqs = bucket_for(batch.segments.len(), limits.max_seqs)?;
    let step = GraphStep { shape, seqs };
    let pages = limits.pages_per_seq();
    let fits = step.tokens() <= limits.max_step_tokens
        && batch
            .segments
            .iter()
            .all(|s| s.start_pos + s.len <= limits.max_seq_len && s.blocks.len() <= pages);
    fits.then_some(step)
}

/// A graph's identity for the graph cache: its buffers, ops and weights, hashed (the engine
/// runs a few fixed graphs; a different graph of the same step shape gets its own capture).
pub(super) fn fingerprint(graph: &Graph) -> u64 {
    let mut h = Fx(0);
    h.add(graph.buffers.len() as u64);
    for b in &graph.buffers {
        let rows = match b.rows {
            Rows::Tokens => 0,
            Rows::Selected => 1,
        };
        let storage = match b.storage {
            Storage::Activation => 0,
            Storage::F32 => 2,
        };
        h.add(((b.width as u64) << 2) | rows | storage);
    }
    h.add(graph.nodes.len() as u64);
    for op in &graph.nodes {
        let (reads, writes) = op.io();
        let (kind, id) = match op {
            Op::Embed { table, .. } => (1, u64::from(table.0)),
            Op::ZeroPositionZero { .. } => (2, 0),
            Op::RmsNorm { weight, .. } => (3, u64::from(weight.0)),
            Op::Linear { weight, .. } => (4, u64::from(weight.0)),
            Op::Add { .. } => (5, 0),
            Op::Concat { .. } => (6, 0),
            Op::SiluMul { .. } => (7, 0),
            Op::MlaCacheWrite { layer, norm, .. } => {
                (8, ((*layer as u64) << 32) | u64::from(norm.0))
            }
            Op::MlaAttention { layer, kv_b, .. } => {
                (9, ((*layer as u64) << 32) | u64::from(kv_b.0))
            }
            Op::MoeRouted { router, .. } => (10, u64::from(router.0)),
            Op::SelectRows { .. } => (11, 0),
        };
        h.add(kind);
        h.add(id);
        for b in reads.iter().chain(&writes) {
            h.add(u64::from(b.0));
        }
    }
    for (name, b) in graph.inputs.iter().chain(&graph.outputs) {
        for chunk in name.as_bytes().chunks(8) {
            let mut w = [0u8; 8];
            w[..chunk.len()].copy_from_slice(chunk);
            h.add(u64::from_le_bytes(w));
        }
        h.add(u64::from(b.0));
    }
    h.0
}

/// A small multiplicative hash (the fingerprint runs every step; it need not resist
/// adversaries).
struct Fx(u64);

impl Fx {
    fn add(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(5) ^ v).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

/// The captured graphs' key: the graph, its step shape and bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct GraphKey {
    pub graph: u64,
    pub step: GraphStep,
}

impl GraphKey {
    /// The name traces and errors give the graph.
    pub fn label(&self) -> String {
        let s = self.step.shape;
        let what = if s == StepShape::DECODE {
            "decode".to_string()
        } else {
            format!("verify{}", s.tokens_per_seq - 1)
        };
        format!("{what} x{} ({:016x})", self.step.seqs, self.graph)
    }
}

/// A bucket's graph, or a bucket whose capture failed (it then runs eagerly, padded).
pub(super) enum GraphEntry {
    Captured {
        graph: CapturedGraph,
        /// The MoE workspaces the step uses (whose error flags a replay must read).
        moe_used: [bool; 2],
    },
    Failed,
}

/// Counts of how steps ran, shared with whoever asked for them
/// ([`super::CudaBackend::graph_counters`]).
#[derive(Debug, Default)]
pub struct GraphCounters {
    captured: AtomicU64,
    replayed: AtomicU64,
    failed: AtomicU64,
    eager: AtomicU64,
}

/// A snapshot of [`GraphCounters`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GraphStats {
    /// Graphs captured (each also ran its step once).
    pub captured: u64,
    /// Steps that replayed a captured graph.
    pub replayed: u64,
    /// Captures that failed (the bucket then runs eagerly).
    pub failed: u64,
    /// Steps run without a graph.
    pub eager: u64,
}

impl GraphCounters {
    pub fn stats(&self) -> GraphStats {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        GraphStats {
            captured: l(&self.captured),
            replayed: l(&self.replayed),
            failed: l(&self.failed),
            eager: l(&self.eager),
        }
    }

    pub(super) fn count(&self, what: Counted) {
        let a = match what {
            Counted::Captured => &self.captured,
            Counted::Replayed => &self.replayed,
            Counted::Failed => &self.failed,
            Counted::Eager => &self.eager,
        };
        a.fetch_add(1, Ordering::Relaxed);
    }
}

#[derive(Debug, Clone, Copy)]
pub(super) enum Counted {
    Captured,
    Replayed,
    Failed,
    Eager,
}

/// The captured graphs and their counters.
#[derive(Default)]
pub(super) struct Graphs {
    pub entries: HashMap<GraphKey, GraphEntry>,
    pub counters: Arc<GraphCounters>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv_cache::Segment;

    fn batch(segs: &[(usize, usize, usize)]) -> Batch {
        // (start_pos, len, logit_rows)
        let segments: Vec<Segment> = segs
            .iter()
            .map(|&(start_pos, len, logit_rows)| Segment {
                blocks: (0..(start_pos + len).div_ceil(PAGE_TOKENS) as u32).collect(),
                start_pos,
                len,
                logit_rows,
            })
            .collect();
        Batch {
            tokens: vec![0; segments.iter().map(|s| s.len).sum()],
            segments,
            page_copies: Vec::new(),
        }
    }

    const LIMITS: GraphLimits = GraphLimits {
        max_step_tokens: 512,
        max_seqs: 48,
        max_seq_len: 4096,
    };

    #[test]
    fn buckets_are_powers_of_two_then_the_limit() {
        assert_eq!(buckets(1), vec![1]);
        assert_eq!(buckets(8), vec![1, 2, 4, 8]);
        assert_eq!(buckets(48), vec![1, 2, 4, 8, 16, 32, 48]);
        assert_eq!(buckets(64), vec![1, 2, 4, 8, 16, 32, 64]);
        for n in 1..=48 {
            let b = bucket_for(n, 48).unwrap();
            assert!(buckets(48).contains(&b) && b >= n, "{n} -> {b}");
            assert!(
                b == 1 || b / 2 < n || b == 48,
                "{n} -> {b} is not the smallest"
            );
        }
        assert_eq!(bucket_for(33, 48), Some(48));
        assert_eq!(bucket_for(49, 48), None);
        assert_eq!(bucket_for(0, 48), None);
    }

    #[test]
    fn decode_and_verification_are_graph_steps() {
        let s = |segs: &[(usize, usize, usize)]| step_shape(&batch(segs));
        assert_eq!(s(&[(10, 1, 1), (70, 1, 1)]), Some(StepShape::DECODE));
        assert_eq!(s(&[(10, 3, 3), (70, 3, 3)]), Some(StepShape::verify(2)));
        // Mixed lengths, a prefill (last row of many tokens), rows that differ: eager.
        assert_eq!(s(&[(10, 1, 1), (70, 3, 3)]), None);
        assert_eq!(s(&[(0, 12, 1)]), None);
        assert_eq!(s(&[(10, 3, 3), (70, 3, 1)]), None);
        assert_eq!(s(&[(0, 2, 0)]), None);
        assert_eq!(s(&[(0, MAX_GRAPH_QUERY + 1, MAX_GRAPH_QUERY + 1)]), None);
        assert_eq!(s(&[]), None);
    }

    #[test]
    fn graph_steps_fit_the_limits() {
        let g = |segs: &[(usize, usize, usize)]| graph_step(&LIMITS, &batch(segs));
        let decode3 = g(&[(5, 1, 1), (6, 1, 1), (7, 1, 1)]).unwrap();
        assert_eq!((decode3.seqs, decode3.tokens()), (4, 4));
        assert_eq!(decode3.shape, StepShape::DECODE);
        let verify = g(&[(5, 4, 4); 5]).unwrap();
        assert_eq!((verify.seqs, verify.tokens()), (8, 32));
        assert_eq!(verify.shape, StepShape::verify(3));
        // Past max_seqs, past max_seq_len, or a bucket over max_step_tokens: eager.
        assert_eq!(g(&[(5, 1, 1); 49]), None);
        assert_eq!(g(&[(4095, 2, 2)]), None);
        assert!(g(&[(4094, 2, 2)]).is_some());
        let tight = GraphLimits {
            max_step_tokens: 20,
            ..LIMITS
        };
        assert_eq!(graph_step(&tight, &batch(&[(5, 4, 4); 5])), None);
        assert!(graph_step(&tight, &batch(&[(5, 4, 4); 4])).is_some());
        assert_eq!(LIMITS.pages_per_seq(), 64);
    }

    #[test]
    fn fingerprints_tell_graphs_apart() {
        use crate::graph::Op;
        let mut a = Graph::default();
        let x = a.act("x", 8);
        let y = a.act("y", 8);
        a.push(Op::Add { a: x, b: x, out: y });
        a.outputs.push(("y".into(), y));
        let mut b = a.clone();
        assert_eq!(fingerprint(&a), fingerprint(&b));
        b.buffers[1].rows = Rows::Selected;
        assert_ne!(fingerprint(&a), fingerprint(&b));
        let mut c = a.clone();
        c.outputs[0].0 = "z".into();
        assert_ne!(fingerprint(&a), fingerprint(&c));
        let mut d = a.clone();
        d.buffers[0].width = 16;
        assert_ne!(fingerprint(&a), fingerprint(&d));
    }

    #[test]
    fn labels_name_shape_and_bucket() {
        let key = GraphKey {
            graph: 0xabc,
            step: GraphStep {
                shape: StepShape::verify(2),
                seqs: 8,
            },
        };
        assert_eq!(key.label(), "verify2 x8 (0000000000000abc)");
    }
}
