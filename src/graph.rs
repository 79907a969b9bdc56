//! A minimal dataflow graph: nodes are operations (one kernel or a short fused sequence on a
//! GPU) over named buffers. Graphs are built once from config.json and are independent of the
//! number of tokens in a step: every buffer is `[rows, width]`, with rows counted in tokens or
//! in rows the step's [`Batch`] selects. A [`Plan`] assigns buffers to reusable slots by
//! liveness; backends execute the nodes in order.

use crate::error::{Error, Result};
use crate::kv_cache::Batch;

/// A weight, as a graph op names it: an index into the model's weight table
/// (`model::weights::ModelWeights`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct WeightId(pub u32);

/// The three projections of a SwiGLU MLP (a dense FFN, one expert, the shared expert).
#[derive(Debug, Clone, Copy)]
pub struct MlpWeights {
    pub gate: WeightId,
    pub up: WeightId,
    pub down: WeightId,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Buf(pub u32);

/// What a buffer's rows are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rows {
    /// One row per token of the step.
    Tokens,
    /// The rows the step selects: each sequence's last `logit_rows` tokens.
    Selected,
}

/// Storage precision of a buffer's values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Storage {
    /// An activation: f32 in exact mode, bf16 in w8a8 mode.
    Activation,
    /// Always f32 (logits).
    F32,
}

#[derive(Debug, Clone)]
pub struct BufferDesc {
    pub name: String,
    pub width: usize,
    pub rows: Rows,
    pub storage: Storage,
}

#[derive(Debug, Clone)]
pub enum Op {
    /// out[t] = table[token[t]].
    Embed {
        table: WeightId,
        out: Buf,
    },
    /// Zeroes the rows of tokens at absolute position 0 (the MTP layer's masked input).
    ZeroPositionZero {
        x: Buf,
    },
    /// RMSNorm with the model's eps.
    RmsNorm {
        x: Buf,
        weight: WeightId,
        out: Buf,
    },
    /// out = x · W^T (FP8 block-scaled or dense weight).
    Linear {
        x: Buf,
        weight: WeightId,
        out: Buf,
    },
    Add {
        a: Buf,
        b: Buf,
        out: Buf,
    },
    /// out = [a | b] per row.
    Concat {
        a: Buf,
        b: Buf,
        out: Buf,
    },
    /// out = silu(gate) * up.
    SiluMul {
        gate: Buf,
        up: Buf,
        out: Buf,
    },
    /// Writes each token's [rmsnorm(c_kv) | rope(k_pe)] into the latent cache of `layer`.
    MlaCacheWrite {
        layer: usize,
        kv: Buf,
        norm: WeightId,
    },
    /// Absorbed multi-head latent attention of q [heads*(nope+rope)] over the latent cache of
    /// `layer` (each token attends to its sequence's positions <= its own); out [heads*v].
    MlaAttention {
        layer: usize,
        q: Buf,
        kv_b: WeightId,
        out: Buf,
    },
    /// Routed experts only (noaux_tc sigmoid routing); the shared expert is ordinary nodes.
    MoeRouted {
        x: Buf,
        router: WeightId,
        bias: WeightId,
        experts: Vec<MlpWeights>,
        out: Buf,
    },
    /// out = the selected rows of x (each sequence's last `logit_rows` tokens).
    SelectRows {
        x: Buf,
        out: Buf,
    },
}

impl Op {
    /// Buffers read and written, in that order.
    pub fn io(&self) -> (Vec<Buf>, Vec<Buf>) {
        match *self {
            Op::Embed { out, .. } => (vec![], vec![out]),
            Op::ZeroPositionZero { x } => (vec![x], vec![x]),
            Op::RmsNorm { x, out, .. }
            | Op::Linear { x, out, .. }
            | Op::SelectRows { x, out }
            | Op::MoeRouted { x, out, .. } => (vec![x], vec![out]),
            Op::Add { a, b, out } | Op::Concat { a, b, out } => (vec![a, b], vec![out]),
            Op::SiluMul { gate, up, out } => (vec![gate, up], vec![out]),
            Op::MlaCacheWrite { kv, .. } => (vec![kv], vec![]),
            Op::MlaAttention { q, out, .. } => (vec![q], vec![out]),
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct Graph {
    pub buffers: Vec<BufferDesc>,
    pub nodes: Vec<Op>,
    /// Buffers the caller fills before running.
    pub inputs: Vec<(String, Buf)>,
    /// Buffers the caller reads after running.
    pub outputs: Vec<(String, Buf)>,
}

impl Graph {
    pub fn buffer(
        &mut self,
        name: impl Into<String>,
        width: usize,
        rows: Rows,
        storage: Storage,
    ) -> Buf {
        self.buffers.push(BufferDesc {
            name: name.into(),
            width,
            rows,
            storage,
        });
        Buf(self.buffers.len() as u32 - 1)
    }

    /// An activation buffer with one row per token.
    pub fn act(&mut self, name: impl Into<String>, width: usize) -> Buf {
        self.buffer(name, width, Rows::Tokens, Storage::Activation)
    }

    pub fn push(&mut self, op: Op) {
        self.nodes.push(op);
    }

    pub fn desc(&self, b: Buf) -> &BufferDesc {
        &self.buffers[b.0 as usize]
    }

    pub fn input(&self, name: &str) -> Option<Buf> {
        self.inputs.iter().find(|(n, _)| n == name).map(|&(_, b)| b)
    }

    pub fn output(&self, name: &str) -> Option<Buf> {
        self.outputs
            .iter()
            .find(|(n, _)| n == name)
            .map(|&(_, b)| b)
    }

    /// Checks a step before any backend runs it: at least one token, segments covering every
    /// token, and each graph input provided with `[tokens, width]` values. Returns the inputs
    /// by buffer.
    pub fn bind_inputs<'a>(
        &self,
        batch: &Batch,
        inputs: &[(&str, &'a [f32])],
    ) -> Result<Vec<(Buf, &'a [f32])>> {
        let tokens = batch.tokens.len();
        let counted: usize = batch.segments.iter().map(|s| s.len).sum();
        if counted != tokens || tokens == 0 {
            return Err(Error::Input(format!(
                "a step needs at least one token and segments covering them all ({tokens} tokens, segments cover {counted})"
            )));
        }
        self.inputs
            .iter()
            .map(|(name, buf)| {
                let (_, data) = inputs.iter().find(|(n, _)| n == name).ok_or_else(|| {
                    Error::Input(format!("graph input `{name}` was not provided"))
                })?;
                let expected = tokens * self.desc(*buf).width;
                if data.len() != expected {
                    return Err(Error::Input(format!(
                        "graph input `{name}` has {} values, expected {expected}",
                        data.len()
                    )));
                }
                Ok((*buf, *data))
            })
            .collect()
    }
}

/// Buffer -> slot assignment: two buffers share a slot when their lifetimes do not overlap.
#[derive(Debug, Clone)]
pub struct Plan {
    pub slot_of: Vec<usize>,
    pub slots: usize,
}

impl Plan {
    pub fn new(graph: &Graph) -> Self {
        let n = graph.buffers.len();
        let end = graph.nodes.len();
        let mut first = vec![usize::MAX; n];
        let mut last = vec![0usize; n];
        for (i, node) in graph.nodes.iter().enumerate() {
            let (reads, writes) = node.io();
            for b in reads.into_iter().chain(writes) {
                let b = b.0 as usize;
                first[b] = first[b].min(i);
                last[b] = last[b].max(i);
            }
        }
        // Inputs live from the start, outputs to the end.
        for &(_, b) in &graph.inputs {
            first[b.0 as usize] = 0;
        }
        for &(_, b) in &graph.outputs {
            last[b.0 as usize] = end;
        }
        let mut order: Vec<usize> = (0..n).filter(|&b| first[b] != usize::MAX).collect();
        order.sort_by_key(|&b| first[b]);
        let mut slot_free_after: Vec<usize> = Vec::new();
        let mut slot_of = vec![usize::MAX; n];
        for b in order {
            // A slot is reusable once its last reader has run before this buffer's first writer.
            let slot = match slot_free_after.iter().position(|&f| f < first[b]) {
                Some(s) => s,
                None => {
                    slot_free_after.push(0);
                    slot_free_after.len() - 1
                }
            };
            slot_free_after[slot] = last[b];
            slot_of[b] = slot;
        }
        Plan {
            slot_of,
            slots: slot_free_after.len(),
        }
    }

    pub fn slot(&self, b: Buf) -> usize {
        self.slot_of[b.0 as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_reuses_dead_buffers_but_never_live_ones() {
        let mut g = Graph::default();
        let w = WeightId(0);
        let a = g.act("a", 4);
        let b = g.act("b", 4);
        let c = g.act("c", 4);
        let d = g.act("d", 4);
        g.push(Op::Embed { table: w, out: a });
        g.push(Op::RmsNorm {
            x: a,
            weight: w,
            out: b,
        });
        g.push(Op::RmsNorm {
            x: b,
            weight: w,
            out: c,
        }); // a is dead from here
        g.push(Op::Add { a: b, b: c, out: d });
        g.outputs.push(("d".into(), d));
        let plan = Plan::new(&g);
        assert_ne!(plan.slot(a), plan.slot(b));
        assert_ne!(plan.slot(b), plan.slot(c));
        assert_eq!(
            plan.slot(c),
            plan.slot(a),
            "a's slot is free once b is computed"
        );
        assert_ne!(plan.slot(d), plan.slot(b));
        assert_ne!(plan.slot(d), plan.slot(c));
        assert_eq!(plan.slots, 3);
    }
}
