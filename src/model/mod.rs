//! DeepSeek-V3 / R1 expressed as graphs: the main model (embedding, decoder blocks with MLA and
//! dense or MoE feed-forward, final norm, lm_head) and the MTP layer.

pub mod weights;

use crate::config::ModelConfig;
use crate::graph::{Buf, Graph, MlpWeights, Op, Rows, Storage};
use weights::{BlockWeights, FfnWeights, ModelWeights, QueryWeights};

/// Graph inputs and outputs by name.
pub const HIDDEN_IN: &str = "hidden_in";
pub const HIDDEN_OUT: &str = "hidden";
pub const LOGITS: &str = "logits";

/// Which rows get logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LogitRows {
    /// Every token (scoring a prompt).
    All,
    /// The rows each sequence selects ([`crate::kv_cache::Segment::logit_rows`]): its last
    /// token by default, its last token and drafts when verifying.
    Last,
}

impl LogitRows {
    /// Rows read back from a sequence's `len` new tokens.
    pub fn count(self, len: usize) -> usize {
        match self {
            LogitRows::All => len,
            LogitRows::Last => len.min(1),
        }
    }
}

/// The main model. Output `hidden` is the final-normed hidden state of every token (what the
/// MTP layer consumes); `logits` covers the rows `rows` asks for.
pub fn main_graph(cfg: &ModelConfig, w: &ModelWeights, rows: LogitRows) -> Graph {
    let mut g = Graph::default();
    let h = cfg.hidden_size;
    let mut x = g.act("embed", h);
    g.push(Op::Embed {
        table: w.embed,
        out: x,
    });
    for (layer, block) in w.blocks.iter().enumerate() {
        x = decoder_block(&mut g, cfg, block, layer, x);
    }
    let hidden = g.act("final_norm", h);
    g.push(Op::RmsNorm {
        x,
        weight: w.norm,
        out: hidden,
    });
    g.outputs.push((HIDDEN_OUT.into(), hidden));
    let logits = head(&mut g, cfg, hidden, w.lm_head, rows);
    g.outputs.push((LOGITS.into(), logits));
    g
}

/// The MTP layer (cache layer `num_hidden_layers`): for each token t_{i+1} with the main model's
/// final-normed state h_i at position i, x = eh_proj([enorm(embed(t_{i+1})) | hnorm(h_i)]),
/// one decoder block, shared_head.norm, shared_head.head -> logits for t_{i+2}. The embedding
/// is zeroed at absolute position 0, as vLLM and SGLang run it. Output `hidden` is the block's
/// output before shared_head.norm: the state a further draft step takes in place of h (as in
/// the MTP paper and vLLM). Returns None without an MTP layer.
pub fn mtp_graph(cfg: &ModelConfig, w: &ModelWeights, rows: LogitRows) -> Option<Graph> {
    let m = w.mtp.as_ref()?;
    let mut g = Graph::default();
    let h = cfg.hidden_size;
    let hidden_in = g.act(HIDDEN_IN, h);
    g.inputs.push((HIDDEN_IN.into(), hidden_in));
    let e = g.act("mtp_embed", h);
    g.push(Op::Embed {
        table: m.embed,
        out: e,
    });
    g.push(Op::ZeroPositionZero { x: e });
    let en = g.act("mtp_enorm", h);
    g.push(Op::RmsNorm {
        x: e,
        weight: m.enorm,
        out: en,
    });
    let hn = g.act("mtp_hnorm", h);
    g.push(Op::RmsNorm {
        x: hidden_in,
        weight: m.hnorm,
        out: hn,
    });
    let cat = g.act("mtp_concat", 2 * h);
    g.push(Op::Concat {
        a: en,
        b: hn,
        out: cat,
    });
    let x = g.act("mtp_eh_proj", h);
    g.push(Op::Linear {
        x: cat,
        weight: m.eh_proj,
        out: x,
    });
    let x = decoder_block(&mut g, cfg, &m.block, cfg.num_hidden_layers, x);
    g.outputs.push((HIDDEN_OUT.into(), x));
    let normed = g.act("mtp_head_norm", h);
    g.push(Op::RmsNorm {
        x,
        weight: m.head_norm,
        out: normed,
    });
    let logits = head(&mut g, cfg, normed, m.head, rows);
    g.outputs.push((LOGITS.into(), logits));
    Some(g)
}

fn head(
    g: &mut Graph,
    cfg: &ModelConfig,
    hidden: Buf,
    weight: weights::WeightId,
    rows: LogitRows,
) -> Buf {
    let (x, out_rows) = match rows {
        LogitRows::All => (hidden, Rows::Tokens),
        LogitRows::Last => {
            let rows = g.buffer(
                "selected_hidden",
                cfg.hidden_size,
                Rows::Selected,
                Storage::Activation,
            );
            g.push(Op::SelectRows {
                x: hidden,
                out: rows,
            });
            (rows, Rows::Selected)
        }
    };
    let logits = g.buffer("logits", cfg.vocab_size, out_rows, Storage::F32);
    g.push(Op::Linear {
        x,
        weight,
        out: logits,
    });
    logits
}

/// x + attn(norm(x)), then + ffn(norm(.)); returns the block's output buffer.
fn decoder_block(g: &mut Graph, cfg: &ModelConfig, b: &BlockWeights, layer: usize, x: Buf) -> Buf {
    let h = cfg.hidden_size;
    let heads = cfg.num_attention_heads;
    let name = |s: &str| format!("l{layer}.{s}");

    let normed = g.act(name("attn_norm"), h);
    g.push(Op::RmsNorm {
        x,
        weight: b.attn_norm,
        out: normed,
    });
    let q = g.act(name("q"), heads * cfg.head_dim_qk());
    match b.attn.q {
        QueryWeights::LowRank { a, norm, b: qb } => {
            let rank = cfg.q_lora_rank.unwrap_or(0);
            let qa = g.act(name("q_a"), rank);
            g.push(Op::Linear {
                x: normed,
                weight: a,
                out: qa,
            });
            let qa_n = g.act(name("q_a_norm"), rank);
            g.push(Op::RmsNorm {
                x: qa,
                weight: norm,
                out: qa_n,
            });
            g.push(Op::Linear {
                x: qa_n,
                weight: qb,
                out: q,
            });
        }
        QueryWeights::Direct(wq) => g.push(Op::Linear {
            x: normed,
            weight: wq,
            out: q,
        }),
    }
    let kv = g.act(name("kv_a"), cfg.kv_cache_width());
    g.push(Op::Linear {
        x: normed,
        weight: b.attn.kv_a,
        out: kv,
    });
    g.push(Op::MlaCacheWrite {
        layer,
        kv,
        norm: b.attn.kv_a_norm,
    });
    let attn = g.act(name("attn"), heads * cfg.v_head_dim);
    g.push(Op::MlaAttention {
        layer,
        q,
        kv_b: b.attn.kv_b,
        out: attn,
    });
    let o = g.act(name("o_proj"), h);
    g.push(Op::Linear {
        x: attn,
        weight: b.attn.o,
        out: o,
    });
    let x1 = g.act(name("resid_attn"), h);
    g.push(Op::Add {
        a: x,
        b: o,
        out: x1,
    });

    let normed = g.act(name("ffn_norm"), h);
    g.push(Op::RmsNorm {
        x: x1,
        weight: b.ffn_norm,
        out: normed,
    });
    let ffn = match &b.ffn {
        FfnWeights::Dense(mlp) => mlp_nodes(g, &name("mlp"), mlp, cfg.intermediate_size, normed),
        FfnWeights::Moe(moe) => {
            let routed = g.act(name("moe_routed"), h);
            g.push(Op::MoeRouted {
                x: normed,
                router: moe.router,
                bias: moe.bias,
                experts: moe.experts.clone(),
                out: routed,
            });
            match &moe.shared {
                Some(shared) => {
                    let inter = cfg.moe_intermediate_size * cfg.n_shared_experts;
                    let s = mlp_nodes(g, &name("shared"), shared, inter, normed);
                    let sum = g.act(name("moe_out"), h);
                    g.push(Op::Add {
                        a: routed,
                        b: s,
                        out: sum,
                    });
                    sum
                }
                None => routed,
            }
        }
    };
    let out = g.act(name("out"), h);
    g.push(Op::Add { a: x1, b: ffn, out });
    out
}

/// down(silu(gate(x)) * up(x)).
fn mlp_nodes(g: &mut Graph, name: &str, w: &MlpWeights, inter: usize, x: Buf) -> Buf {
    let gate = g.act(format!("{name}.gate"), inter);
    g.push(Op::Linear {
        x,
        weight: w.gate,
        out: gate,
    });
    let up = g.act(format!("{name}.up"), inter);
    g.push(Op::Linear {
        x,
        weight: w.up,
        out: up,
    });
    let act = g.act(format!("{name}.act"), inter);
    g.push(Op::SiluMul { gate, up, out: act });
    let down = g.act(format!("{name}.down"), x_width(g, x));
    g.push(Op::Linear {
        x: act,
        weight: w.down,
        out: down,
    });
    down
}

fn x_width(g: &Graph, x: Buf) -> usize {
    g.desc(x).width
}
