//! What the engine needs from a compute backend: run a graph over one step's tokens, with the
//! latent KV cache the backend owns, and read back only what the engine asks for (drawn
//! tokens, and on request logits rows or hidden states).

use crate::error::{Error, Result};
use crate::graph::{Graph, Plan};
use crate::kv_cache::Batch;
use crate::numerics::sampling::{self, Draw};

/// Arithmetic recipe (docs/design.md, "Numerics contract").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Precision {
    /// f32 everywhere, FP8 weights dequantized exactly: the golden reference.
    Exact,
    /// The GPU recipe: bf16 activations, per-token 1x128 FP8 activation quantization before
    /// every FP8 GEMM, f32 accumulation promoted every 128 of K; router, softmax, norms'
    /// statistics and logits in f32.
    W8a8,
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "exact" => Ok(Precision::Exact),
            "w8a8" => Ok(Precision::W8a8),
            other => Err(format!(
                "unknown precision `{other}` (expected exact or w8a8)"
            )),
        }
    }
}

/// What the engine reads back from one selected row (a row the step's batch selects: each
/// segment's last `logit_rows` tokens).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RowRead {
    /// Draw the next token there with the shared sampling rule (on the backend's device).
    pub draw: Option<Draw>,
    /// Return the row's f32 logits (scoring, constrained answers).
    pub logits: bool,
}

/// What one step returns to the engine; everything else stays with the backend.
#[derive(Debug, Clone, Copy)]
pub struct Readout<'a> {
    /// One entry per selected row, in order.
    pub rows: &'a [RowRead],
    /// Return every token's final hidden state (the MTP drafter's input).
    pub hidden: bool,
}

/// A step's results, as its [`Readout`] asked.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepOutput {
    /// One entry per selected row: the drawn token where a draw was asked.
    pub tokens: Vec<Option<u32>>,
    /// The logits of the rows that asked for them, in row order, `[rows, vocab]`.
    pub logits: Vec<f32>,
    /// `[tokens, hidden]` when asked, else empty.
    pub hidden: Vec<f32>,
}

impl Readout<'_> {
    /// Checks the readout against the step: one entry per selected row.
    pub fn check(&self, batch: &Batch) -> Result<()> {
        let selected = batch.selected_rows().len();
        if self.rows.len() != selected {
            return Err(Error::Input(format!(
                "a step's readout names {} rows, but its batch selects {selected}",
                self.rows.len()
            )));
        }
        Ok(())
    }

    /// The step's results from host-side `logits` (`[selected rows, vocab]`) and `hidden`: the
    /// draws run here with the shared rule. A backend whose logits already live on the host
    /// (the CPU) reads out through this.
    pub fn from_host(&self, logits: &[f32], vocab: usize, hidden: Vec<f32>) -> StepOutput {
        let row = |i: usize| &logits[i * vocab..(i + 1) * vocab];
        let mut out = StepOutput {
            tokens: self
                .rows
                .iter()
                .enumerate()
                .map(|(i, r)| r.draw.map(|d| sampling::draw(row(i), &d)))
                .collect(),
            ..StepOutput::default()
        };
        for (i, _) in self.rows.iter().enumerate().filter(|(_, r)| r.logits) {
            out.logits.extend_from_slice(row(i));
        }
        if self.hidden {
            out.hidden = hidden;
        }
        out
    }
}

pub trait Backend: Send {
    fn name(&self) -> &'static str;

    fn precision(&self) -> Precision;

    /// Runs `graph` (with its slot `plan`) over `batch`, reading the graph's inputs from
    /// `inputs` (by name, each `[tokens, width]`). Cache pages named by the batch's block
    /// tables are written for every token of the batch. Returns what `readout` asks for:
    /// drawn tokens, logits rows and hidden states (the graph's `model::LOGITS` and
    /// `model::HIDDEN_OUT` outputs); the rest stays on the backend.
    fn run(
        &mut self,
        graph: &Graph,
        plan: &Plan,
        batch: &Batch,
        inputs: &[(&str, &[f32])],
        readout: &Readout<'_>,
    ) -> Result<StepOutput>;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv_cache::Segment;

    fn batch(segments: &[(usize, usize)]) -> Batch {
        Batch {
            tokens: vec![0; segments.iter().map(|s| s.0).sum()],
            segments: segments
                .iter()
                .map(|&(len, logit_rows)| Segment {
                    blocks: vec![0],
                    start_pos: 0,
                    len,
                    logit_rows,
                })
                .collect(),
            ..Batch::default()
        }
    }

    #[test]
    fn a_readout_names_every_selected_row() {
        let row = RowRead {
            draw: None,
            logits: true,
        };
        let rows = [row; 3];
        let readout = |n| Readout {
            rows: &rows[..n],
            hidden: false,
        };
        assert!(readout(3).check(&batch(&[(4, 2), (1, 1)])).is_ok());
        let err = readout(2).check(&batch(&[(4, 2), (1, 1)])).unwrap_err();
        assert!(err.to_string().contains("names 2 rows"), "{err}");
    }

    /// Host readout: draws where asked, logits of the rows that asked, hidden when asked.
    #[test]
    fn host_readout_returns_what_was_asked() {
        let logits = [0.0f32, 5.0, 1.0, 9.0, 0.0, 0.0];
        let greedy = Draw {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
            counter: 0,
        };
        let rows = [
            RowRead {
                draw: Some(greedy),
                logits: false,
            },
            RowRead {
                draw: Some(greedy),
                logits: true,
            },
        ];
        let readout = Readout {
            rows: &rows,
            hidden: false,
        };
        let out = readout.from_host(&logits, 3, vec![1.0]);
        assert_eq!(out.tokens, vec![Some(1), Some(0)]);
        assert_eq!(out.logits, vec![9.0, 0.0, 0.0]);
        assert!(out.hidden.is_empty());
    }
}
