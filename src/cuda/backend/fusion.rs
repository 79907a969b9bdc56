//! Which graph nodes run as one fused kernel, decided once per step by one pass over the graph
//! ([`FusionPlan::new`]); `dispatch` follows the plan node by node. Every fusion gives the same
//! bits as the nodes' own kernels in sequence (docs/design.md, "The decode path"):
//!
//! - `Add` whose output the next node `RmsNorm`s, and `RmsNorm` alone when FP8 Linears read
//!   its output: one small_rms_norm_quant writing the sum, the normed row only when something
//!   other than an FP8 Linear reads it, and the normed row's act_quant when FP8 Linears read
//!   it (q_a and kv_a, or the MLP's gate and up, then share it).
//! - `SiluMul` read by FP8 Linears: small_silu_mul_quant (the product stored only when
//!   something else reads it too).
//! - Any other buffer read by several FP8 Linears is quantized once, by the first.
//! - `MlaAttention`: the q absorption and q RoPE in one kernel.
//!
//! `R1_NO_FUSION=1` (or [`super::CudaBackend::set_fusion`]) runs [`FusionPlan::unfused`]: every
//! node as its own kernels, each FP8 Linear quantizing its input itself.

use crate::graph::{Buf, Graph, Op, WeightId};

/// What the executor does at one node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Step {
    /// The node's own kernels.
    Plain,
    /// One small_rms_norm_quant for the `RmsNorm` at node `norm` (this node, or the node after
    /// this `Add`, whose sum it also writes).
    Norm {
        norm: usize,
        add: bool,
        /// Store the normed row (something other than an FP8 Linear reads it).
        write_normed: bool,
        /// Quantize the normed row for the FP8 Linears that read it.
        quantize: bool,
    },
    /// `SiluMul` + act_quant of its output in one small_silu_mul_quant.
    SiluQuant {
        /// Store the product too (something other than an FP8 Linear reads it).
        write_out: bool,
    },
    /// Done by an earlier node's fused kernel.
    Skip,
}

/// The per-node plan of one graph.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct FusionPlan {
    pub steps: Vec<Step>,
    /// Per buffer: its act_quant, once made, serves every FP8 Linear that reads it.
    pub shared_quant: Vec<bool>,
    /// MlaAttention absorbs q and ropes q_pe in one kernel where the absorption runs on CUDA
    /// cores (the tensor-core GEMM does not take the shapes).
    pub absorb_rope: bool,
}

/// Who reads a buffer.
#[derive(Debug, Clone, Copy, Default)]
struct Readers {
    /// FP8 Linears reading it as their input.
    fp8: usize,
    /// Any other reader (a graph output counts as one).
    other: usize,
    /// Nodes that write it (more than one: modified in place, never shared).
    writers: usize,
}

impl FusionPlan {
    /// Every node as its own kernels.
    pub fn unfused(graph: &Graph) -> Self {
        FusionPlan {
            steps: vec![Step::Plain; graph.nodes.len()],
            shared_quant: vec![false; graph.buffers.len()],
            absorb_rope: false,
        }
    }

    /// The fused plan; `is_fp8` says which weights are FP8 (a Linear on any other weight runs
    /// the dense GEMM, which reads the bf16 input).
    pub fn new(graph: &Graph, is_fp8: impl Fn(WeightId) -> bool) -> Self {
        let mut readers = vec![Readers::default(); graph.buffers.len()];
        for op in &graph.nodes {
            let (reads, writes) = op.io();
            match op {
                Op::Linear { x, weight, .. } if is_fp8(*weight) => readers[x.0 as usize].fp8 += 1,
                _ => reads.iter().for_each(|b| readers[b.0 as usize].other += 1),
            }
            writes
                .iter()
                .for_each(|b| readers[b.0 as usize].writers += 1);
        }
        for (_, b) in &graph.outputs {
            readers[b.0 as usize].other += 1;
        }
        let of = |b: Buf| readers[b.0 as usize];
        // Written once, so a quantization made when it is written stays valid for the step.
        let quantizable = |b: Buf| of(b).fp8 > 0 && of(b).writers == 1;

        let mut plan = FusionPlan::unfused(graph);
        plan.absorb_rope = true;
        for (i, op) in graph.nodes.iter().enumerate() {
            match *op {
                Op::RmsNorm { x, out, .. } => {
                    let quantize = quantizable(out);
                    let add = i > 0
                        && plan.steps[i - 1] == Step::Plain
                        && matches!(graph.nodes[i - 1], Op::Add { out: s, .. } if s == x);
                    if !quantize && !add {
                        continue;
                    }
                    let step = Step::Norm {
                        norm: i,
                        add,
                        write_normed: of(out).other > 0 || !quantize,
                        quantize,
                    };
                    if add {
                        plan.steps[i - 1] = step;
                        plan.steps[i] = Step::Skip;
                    } else {
                        plan.steps[i] = step;
                    }
                    plan.shared_quant[out.0 as usize] = quantize;
                }
                Op::SiluMul { out, .. } if quantizable(out) => {
                    plan.steps[i] = Step::SiluQuant {
                        write_out: of(out).other > 0,
                    };
                    plan.shared_quant[out.0 as usize] = true;
                }
                _ => {}
            }
        }
        // Any other buffer that several FP8 Linears read: quantized once, by the first.
        for (b, r) in readers.iter().enumerate() {
            if r.fp8 >= 2 && r.writers == 1 {
                plan.shared_quant[b] = true;
            }
        }
        plan
    }

    pub fn shares_quant(&self, b: Buf) -> bool {
        self.shared_quant[b.0 as usize]
    }

    /// Kernel launches the plan saves on one run of the graph (tests, diagnostics).
    #[cfg(test)]
    fn launches_saved(&self, graph: &Graph, is_fp8: impl Fn(WeightId) -> bool) -> usize {
        let mut fp8_readers = vec![0usize; graph.buffers.len()];
        for op in &graph.nodes {
            if let Op::Linear { x, weight, .. } = op {
                if is_fp8(*weight) {
                    fp8_readers[x.0 as usize] += 1;
                }
            }
        }
        let mut saved = 0;
        for (i, step) in self.steps.iter().enumerate() {
            match *step {
                Step::Skip => saved += 1,
                Step::SiluQuant { .. } => {
                    let out = graph.nodes[i].io().1[0];
                    saved += fp8_readers[out.0 as usize];
                }
                Step::Norm { norm, quantize, .. } if quantize => {
                    let out = graph.nodes[norm].io().1[0];
                    saved += fp8_readers[out.0 as usize];
                }
                _ => {}
            }
        }
        let others: usize = fp8_readers
            .iter()
            .enumerate()
            .filter(|&(b, _)| self.shared_quant[b] && !self.quantized_by_producer(graph, b))
            .map(|(_, &n)| n - 1)
            .sum();
        let attention = graph
            .nodes
            .iter()
            .filter(|op| matches!(op, Op::MlaAttention { .. }))
            .count();
        saved + others + if self.absorb_rope { attention } else { 0 }
    }

    #[cfg(test)]
    fn quantized_by_producer(&self, graph: &Graph, b: usize) -> bool {
        self.steps.iter().enumerate().any(|(i, s)| match *s {
            Step::SiluQuant { .. } => graph.nodes[i].io().1[0].0 as usize == b,
            Step::Norm { norm, quantize, .. } => {
                quantize && graph.nodes[norm].io().1[0].0 as usize == b
            }
            _ => false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::{MlpWeights, Rows, Storage};

    /// Weights below 100 are FP8, the rest dense.
    fn fp8(w: WeightId) -> bool {
        w.0 < 100
    }

    const DENSE: WeightId = WeightId(100);

    /// One decoder block as model::decoder_block builds it (low-rank q, dense MLP), fed by an
    /// Add like every block after the first, followed by the final norm and a dense head.
    fn block() -> (Graph, Vec<Buf>) {
        let mut g = Graph::default();
        let x0 = g.act("x0", 16);
        let o0 = g.act("o0", 16);
        let x = g.act("x", 16);
        g.push(Op::Embed {
            table: DENSE,
            out: x0,
        });
        g.push(Op::Embed {
            table: DENSE,
            out: o0,
        });
        g.push(Op::Add {
            a: x0,
            b: o0,
            out: x,
        }); // 2
        let normed = g.act("attn_norm", 16);
        g.push(Op::RmsNorm {
            x,
            weight: DENSE,
            out: normed,
        }); // 3
        let qa = g.act("q_a", 8);
        g.push(Op::Linear {
            x: normed,
            weight: WeightId(1),
            out: qa,
        }); // 4
        let qa_n = g.act("q_a_norm", 8);
        g.push(Op::RmsNorm {
            x: qa,
            weight: DENSE,
            out: qa_n,
        }); // 5
        let q = g.act("q", 12);
        g.push(Op::Linear {
            x: qa_n,
            weight: WeightId(2),
            out: q,
        }); // 6
        let kv = g.act("kv_a", 10);
        g.push(Op::Linear {
            x: normed,
            weight: WeightId(3),
            out: kv,
        }); // 7
        g.push(Op::MlaCacheWrite {
            layer: 0,
            kv,
            norm: DENSE,
        }); // 8
        let attn = g.act("attn", 16);
        g.push(Op::MlaAttention {
            layer: 0,
            q,
            kv_b: WeightId(4),
            out: attn,
        }); // 9
        let o = g.act("o_proj", 16);
        g.push(Op::Linear {
            x: attn,
            weight: WeightId(5),
            out: o,
        }); // 10
        let x1 = g.act("resid_attn", 16);
        g.push(Op::Add {
            a: x,
            b: o,
            out: x1,
        }); // 11
        let fnorm = g.act("ffn_norm", 16);
        g.push(Op::RmsNorm {
            x: x1,
            weight: DENSE,
            out: fnorm,
        }); // 12
        let w = MlpWeights {
            gate: WeightId(6),
            up: WeightId(7),
            down: WeightId(8),
        };
        let gate = g.act("gate", 32);
        g.push(Op::Linear {
            x: fnorm,
            weight: w.gate,
            out: gate,
        }); // 13
        let up = g.act("up", 32);
        g.push(Op::Linear {
            x: fnorm,
            weight: w.up,
            out: up,
        }); // 14
        let act = g.act("act", 32);
        g.push(Op::SiluMul { gate, up, out: act }); // 15
        let down = g.act("down", 16);
        g.push(Op::Linear {
            x: act,
            weight: w.down,
            out: down,
        }); // 16
        let out = g.act("out", 16);
        g.push(Op::Add {
            a: x1,
            b: down,
            out,
        }); // 17
        let hidden = g.act("final_norm", 16);
        g.push(Op::RmsNorm {
            x: out,
            weight: DENSE,
            out: hidden,
        }); // 18
        let logits = g.buffer("logits", 20, Rows::Tokens, Storage::F32);
        g.push(Op::Linear {
            x: hidden,
            weight: DENSE,
            out: logits,
        }); // 19
        g.outputs.push(("hidden".into(), hidden));
        g.outputs.push(("logits".into(), logits));
        (g, vec![normed, qa_n, fnorm, act, hidden])
    }

    #[test]
    fn decoder_block_fuses_norms_adds_and_silu() {
        let (g, bufs) = block();
        let [normed, qa_n, fnorm, act, hidden] = bufs[..] else {
            unreachable!()
        };
        let p = FusionPlan::new(&g, fp8);
        let norm = |norm, add, write_normed, quantize| Step::Norm {
            norm,
            add,
            write_normed,
            quantize,
        };
        // Add + attn_norm: only q_a and kv_a (FP8) read the normed row.
        assert_eq!(p.steps[2], norm(3, true, false, true));
        assert_eq!(p.steps[3], Step::Skip);
        assert!(p.shares_quant(normed));
        // q_a_norm (after a Linear, no Add) feeds q_b only.
        assert_eq!(p.steps[5], norm(5, false, false, true));
        assert!(p.shares_quant(qa_n));
        // resid_attn + ffn_norm: gate and up share the quantization.
        assert_eq!(p.steps[11], norm(12, true, false, true));
        assert_eq!(p.steps[12], Step::Skip);
        assert!(p.shares_quant(fnorm));
        assert_eq!(p.steps[15], Step::SiluQuant { write_out: false });
        assert!(p.shares_quant(act));
        // The block's output Add + final norm: a graph output read by a dense head.
        assert_eq!(p.steps[17], norm(18, true, true, false));
        assert_eq!(p.steps[18], Step::Skip);
        assert!(!p.shares_quant(hidden));
        // Everything else runs as it is.
        for i in [0, 1, 4, 6, 7, 8, 9, 10, 13, 14, 16, 19] {
            assert_eq!(p.steps[i], Step::Plain, "node {i}");
        }
        assert!(p.absorb_rope);
        // Add+norm x3 (one launch each), the quantizations of normed (2), q_a_norm (1),
        // ffn_norm (2) and act (1), and the q RoPE.
        assert_eq!(p.launches_saved(&g, fp8), 3 + 6 + 1);
    }

    #[test]
    fn unfused_plan_runs_every_node() {
        let (g, _) = block();
        let p = FusionPlan::unfused(&g);
        assert!(p.steps.iter().all(|s| *s == Step::Plain));
        assert!(p.shared_quant.iter().all(|&s| !s));
        assert!(!p.absorb_rope);
        assert_eq!(p.launches_saved(&g, fp8), 0);
    }

    /// A normed row that something besides FP8 Linears reads is stored as well; a norm whose
    /// readers are all dense is fused only with its Add.
    #[test]
    fn other_readers_keep_the_bf16_row() {
        let mut g = Graph::default();
        let x = g.act("x", 8);
        g.push(Op::Embed {
            table: DENSE,
            out: x,
        });
        let n = g.act("n", 8);
        g.push(Op::RmsNorm {
            x,
            weight: DENSE,
            out: n,
        });
        let routed = g.act("routed", 8);
        g.push(Op::MoeRouted {
            x: n,
            router: DENSE,
            bias: DENSE,
            experts: vec![],
            out: routed,
        });
        let gate = g.act("gate", 8);
        g.push(Op::Linear {
            x: n,
            weight: WeightId(1),
            out: gate,
        });
        let dense_in = g.act("dense_in", 8);
        g.push(Op::RmsNorm {
            x: gate,
            weight: DENSE,
            out: dense_in,
        });
        let y = g.act("y", 8);
        g.push(Op::Linear {
            x: dense_in,
            weight: DENSE,
            out: y,
        });
        g.outputs.push(("y".into(), y));
        let p = FusionPlan::new(&g, fp8);
        assert_eq!(
            p.steps[1],
            Step::Norm {
                norm: 1,
                add: false,
                write_normed: true,
                quantize: true
            }
        );
        assert_eq!(p.steps[4], Step::Plain);
    }

    /// A buffer modified in place after it is written is never quantized ahead of its
    /// readers, and a buffer two FP8 Linears read is shared even without a fused producer.
    #[test]
    fn in_place_buffers_are_not_shared() {
        let mut g = Graph::default();
        let e = g.act("e", 8);
        g.push(Op::Embed {
            table: DENSE,
            out: e,
        });
        g.push(Op::ZeroPositionZero { x: e });
        let (a, b) = (g.act("a", 8), g.act("b", 8));
        g.push(Op::Linear {
            x: e,
            weight: WeightId(1),
            out: a,
        });
        g.push(Op::Linear {
            x: e,
            weight: WeightId(2),
            out: b,
        });
        let c = g.act("c", 8);
        g.push(Op::Linear {
            x: a,
            weight: WeightId(3),
            out: c,
        });
        let d = g.act("d", 8);
        g.push(Op::Linear {
            x: a,
            weight: WeightId(4),
            out: d,
        });
        let p = FusionPlan::new(&g, fp8);
        assert!(!p.shares_quant(e), "e is written twice");
        assert!(p.shares_quant(a));
        assert!(p.steps.iter().all(|s| *s == Step::Plain));
        assert_eq!(p.launches_saved(&g, fp8), 1);
    }

    /// The real graphs: every decoder block of a tiny R1-shaped model fuses as the block
    /// above does, and the MTP graph's inputs stay unfused where nothing applies.
    #[test]
    fn model_graphs_plan_as_expected() {
        use crate::config::ModelConfig;
        use crate::model::weights::ModelWeights;
        use crate::model::{main_graph, mtp_graph, LogitRows};
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/r1-heads");
        let (Ok(cfg), Ok(ckpt)) = (
            ModelConfig::from_dir(&dir),
            crate::checkpoint::Checkpoint::open(&dir),
        ) else {
            panic!("the r1-heads fixture loads");
        };
        let w = ModelWeights::load(&ckpt, &cfg, true).expect("fixture weights");
        let is_fp8 = |id: WeightId| matches!(w.get(id), crate::model::weights::Weight::Fp8(_));
        for graph in [
            main_graph(&cfg, &w, LogitRows::Last),
            mtp_graph(&cfg, &w, LogitRows::Last).expect("the fixture has an MTP layer"),
        ] {
            let p = FusionPlan::new(&graph, is_fp8);
            let norms = graph
                .nodes
                .iter()
                .filter(|op| matches!(op, Op::RmsNorm { .. }))
                .count();
            let fused_norms = p
                .steps
                .iter()
                .filter(|s| matches!(s, Step::Norm { .. }))
                .count();
            let skipped = p.steps.iter().filter(|s| **s == Step::Skip).count();
            // Every skipped node is an RmsNorm its Add ran.
            for (i, s) in p.steps.iter().enumerate() {
                if *s == Step::Skip {
                    assert!(matches!(graph.nodes[i], Op::RmsNorm { .. }));
                    assert!(matches!(
                        p.steps[i - 1],
                        Step::Norm { norm, add: true, .. } if norm == i
                    ));
                }
            }
            assert!(fused_norms >= skipped && fused_norms <= norms);
            assert!(p.launches_saved(&graph, is_fp8) > 0);
        }
    }
}
