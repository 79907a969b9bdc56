//! The model's weights resolved from a checkpoint: every tensor checked against config.json once,
//! then addressed by [`WeightId`] from the graph. FP8 Linear weights stay in the memory map;
//! BF16/F32 tensors (norms, embeddings, router, heads) are widened to f32.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};

use crate::checkpoint::{Checkpoint, Fp8Weight};
use crate::config::ModelConfig;
use crate::error::Result;
// The ids are the graph's (its ops name weights by them); they stay reachable here, where
// the weights they address live.
pub use crate::graph::{MlpWeights, WeightId};

#[derive(Debug)]
pub enum Weight {
    /// An FP8 Linear weight [n, k] with 128x128 block multipliers.
    Fp8(Fp8Weight),
    /// A BF16/F32 tensor widened to f32, as a [rows, cols] matrix (vectors have one row).
    Dense {
        rows: usize,
        cols: usize,
        data: Vec<f32>,
    },
}

impl Weight {
    /// [rows, cols] of the matrix (for a Linear: [out_features, in_features]).
    pub fn shape(&self) -> (usize, usize) {
        match self {
            Weight::Fp8(w) => (w.n, w.k),
            Weight::Dense { rows, cols, .. } => (*rows, *cols),
        }
    }
}

#[derive(Debug, Clone)]
pub enum QueryWeights {
    /// q_a_proj -> q_a_layernorm -> q_b_proj (DeepSeek-V3).
    LowRank {
        a: WeightId,
        norm: WeightId,
        b: WeightId,
    },
    /// One q_proj (checkpoints with `q_lora_rank: null`).
    Direct(WeightId),
}

#[derive(Debug, Clone)]
pub struct AttentionWeights {
    pub q: QueryWeights,
    pub kv_a: WeightId,
    pub kv_a_norm: WeightId,
    pub kv_b: WeightId,
    pub o: WeightId,
}

#[derive(Debug, Clone)]
pub struct MoeWeights {
    pub router: WeightId,
    pub bias: WeightId,
    pub experts: Vec<MlpWeights>,
    pub shared: Option<MlpWeights>,
}

#[derive(Debug, Clone)]
pub enum FfnWeights {
    Dense(MlpWeights),
    Moe(MoeWeights),
}

#[derive(Debug, Clone)]
pub struct BlockWeights {
    pub attn_norm: WeightId,
    pub attn: AttentionWeights,
    pub ffn_norm: WeightId,
    pub ffn: FfnWeights,
}

#[derive(Debug, Clone)]
pub struct MtpWeights {
    pub embed: WeightId,
    pub enorm: WeightId,
    pub hnorm: WeightId,
    pub eh_proj: WeightId,
    pub block: BlockWeights,
    pub head_norm: WeightId,
    pub head: WeightId,
}

pub struct ModelWeights {
    table: Vec<(String, Weight)>,
    pub embed: WeightId,
    pub blocks: Vec<BlockWeights>,
    pub norm: WeightId,
    pub lm_head: WeightId,
    pub mtp: Option<MtpWeights>,
}

impl ModelWeights {
    pub fn get(&self, id: WeightId) -> &Weight {
        &self.table[id.0 as usize].1
    }

    /// The checkpoint name of a weight (for messages).
    pub fn name(&self, id: WeightId) -> &str {
        &self.table[id.0 as usize].0
    }

    pub fn len(&self) -> usize {
        self.table.len()
    }

    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    /// Resolves and checks every tensor the model uses; `with_mtp` also loads the MTP layer
    /// (`model.layers.<num_hidden_layers>.*`) when config.json declares one. A progress bar on
    /// stderr (terminals only) follows the bytes materialized.
    pub fn load(ckpt: &Checkpoint, cfg: &ModelConfig, with_mtp: bool) -> Result<Self> {
        let load_mtp = with_mtp && cfg.has_mtp();
        let total: usize = ckpt
            .tensors()
            .filter(|(name, _)| load_mtp || !is_mtp_tensor(name, cfg))
            .map(|(_, info)| info.bytes())
            .sum();
        let progress = if std::io::stderr().is_terminal() {
            let bar = ProgressBar::new(total as u64);
            bar.set_style(
                ProgressStyle::with_template(
                    "loading weights {bar:40} {binary_bytes}/{binary_total_bytes} ({eta})",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            bar
        } else {
            ProgressBar::hidden()
        };
        let mut loader = Loader {
            ckpt,
            cfg,
            table: Vec::new(),
            progress: &progress,
        };
        let (h, v) = (cfg.hidden_size, cfg.vocab_size);
        let embed = loader.dense("model.embed_tokens.weight", v, h)?;
        let blocks = (0..cfg.num_hidden_layers)
            .map(|layer| loader.block(layer))
            .collect::<Result<Vec<_>>>()?;
        let norm = loader.dense("model.norm.weight", 1, h)?;
        let lm_head = loader.dense("lm_head.weight", v, h)?;
        let mtp = if load_mtp {
            Some(loader.mtp(cfg.num_hidden_layers)?)
        } else {
            None
        };
        progress.finish_and_clear();
        Ok(ModelWeights {
            table: loader.table,
            embed,
            blocks,
            norm,
            lm_head,
            mtp,
        })
    }
}

fn is_mtp_tensor(name: &str, cfg: &ModelConfig) -> bool {
    (cfg.num_hidden_layers..cfg.num_hidden_layers + cfg.num_nextn_predict_layers)
        .any(|l| name.starts_with(&format!("model.layers.{l}.")))
}

struct Loader<'a> {
    ckpt: &'a Checkpoint,
    cfg: &'a ModelConfig,
    table: Vec<(String, Weight)>,
    progress: &'a ProgressBar,
}

impl Loader<'_> {
    fn push(&mut self, name: String, weight: Weight) -> WeightId {
        self.table.push((name, weight));
        WeightId(self.table.len() as u32 - 1)
    }

    /// A BF16/F32 tensor of shape [rows, cols] ([cols] when rows == 1).
    fn dense(&mut self, name: &str, rows: usize, cols: usize) -> Result<WeightId> {
        let shape: &[usize] = if rows == 1 { &[cols] } else { &[rows, cols] };
        let data = self.ckpt.read_f32(name, shape)?;
        self.progress.inc(self.ckpt.info(name)?.bytes() as u64);
        Ok(self.push(name.to_string(), Weight::Dense { rows, cols, data }))
    }

    /// An FP8 Linear `<prefix>.weight` [n, k]; its pages are touched so the load, not the
    /// first forward pass, pays for reading them.
    fn fp8(&mut self, prefix: &str, n: usize, k: usize) -> Result<WeightId> {
        let w = self.ckpt.fp8_weight(prefix, n, k)?;
        let touched = w
            .codes
            .as_slice()
            .iter()
            .step_by(4096)
            .fold(0u8, |a, &b| a ^ b);
        std::hint::black_box(touched);
        self.progress
            .inc((w.codes.len() + w.scales.len() * 4) as u64);
        Ok(self.push(format!("{prefix}.weight"), Weight::Fp8(w)))
    }

    fn mlp(&mut self, prefix: &str, inter: usize) -> Result<MlpWeights> {
        let h = self.cfg.hidden_size;
        Ok(MlpWeights {
            gate: self.fp8(&format!("{prefix}.gate_proj"), inter, h)?,
            up: self.fp8(&format!("{prefix}.up_proj"), inter, h)?,
            down: self.fp8(&format!("{prefix}.down_proj"), h, inter)?,
        })
    }

    fn attention(&mut self, p: &str) -> Result<AttentionWeights> {
        let c = self.cfg;
        let heads = c.num_attention_heads;
        let q_out = heads * c.head_dim_qk();
        let q = match c.q_lora_rank {
            Some(rank) => QueryWeights::LowRank {
                a: self.fp8(&format!("{p}.q_a_proj"), rank, c.hidden_size)?,
                norm: self.dense(&format!("{p}.q_a_layernorm.weight"), 1, rank)?,
                b: self.fp8(&format!("{p}.q_b_proj"), q_out, rank)?,
            },
            None => QueryWeights::Direct(self.fp8(&format!("{p}.q_proj"), q_out, c.hidden_size)?),
        };
        Ok(AttentionWeights {
            q,
            kv_a: self.fp8(
                &format!("{p}.kv_a_proj_with_mqa"),
                c.kv_cache_width(),
                c.hidden_size,
            )?,
            kv_a_norm: self.dense(&format!("{p}.kv_a_layernorm.weight"), 1, c.kv_lora_rank)?,
            kv_b: self.fp8(
                &format!("{p}.kv_b_proj"),
                heads * (c.qk_nope_head_dim + c.v_head_dim),
                c.kv_lora_rank,
            )?,
            o: self.fp8(&format!("{p}.o_proj"), c.hidden_size, heads * c.v_head_dim)?,
        })
    }

    fn block(&mut self, layer: usize) -> Result<BlockWeights> {
        let c = self.cfg;
        let p = format!("model.layers.{layer}");
        let attn_norm = self.dense(&format!("{p}.input_layernorm.weight"), 1, c.hidden_size)?;
        let attn = self.attention(&format!("{p}.self_attn"))?;
        let ffn_norm = self.dense(
            &format!("{p}.post_attention_layernorm.weight"),
            1,
            c.hidden_size,
        )?;
        let ffn = if c.is_moe_layer(layer) || layer >= c.num_hidden_layers {
            let router = self.dense(
                &format!("{p}.mlp.gate.weight"),
                c.n_routed_experts,
                c.hidden_size,
            )?;
            let bias = self.dense(
                &format!("{p}.mlp.gate.e_score_correction_bias"),
                1,
                c.n_routed_experts,
            )?;
            let experts = (0..c.n_routed_experts)
                .map(|e| self.mlp(&format!("{p}.mlp.experts.{e}"), c.moe_intermediate_size))
                .collect::<Result<Vec<_>>>()?;
            let shared = if c.n_shared_experts > 0 {
                Some(self.mlp(
                    &format!("{p}.mlp.shared_experts"),
                    c.moe_intermediate_size * c.n_shared_experts,
                )?)
            } else {
                None
            };
            FfnWeights::Moe(MoeWeights {
                router,
                bias,
                experts,
                shared,
            })
        } else {
            FfnWeights::Dense(self.mlp(&format!("{p}.mlp"), c.intermediate_size)?)
        };
        Ok(BlockWeights {
            attn_norm,
            attn,
            ffn_norm,
            ffn,
        })
    }

    fn mtp(&mut self, layer: usize) -> Result<MtpWeights> {
        let (h, v) = (self.cfg.hidden_size, self.cfg.vocab_size);
        let p = format!("model.layers.{layer}");
        // The official checkpoint repeats the embedding inside the MTP layer; fall back to the
        // main one where a converted checkpoint dropped the copy.
        let own_embed = format!("{p}.embed_tokens.weight");
        let embed_name = if self.ckpt.contains(&own_embed) {
            own_embed
        } else {
            "model.embed_tokens.weight".to_string()
        };
        Ok(MtpWeights {
            embed: self.dense(&embed_name, v, h)?,
            enorm: self.dense(&format!("{p}.enorm.weight"), 1, h)?,
            hnorm: self.dense(&format!("{p}.hnorm.weight"), 1, h)?,
            eh_proj: self.dense(&format!("{p}.eh_proj.weight"), h, 2 * h)?,
            block: self.block(layer)?,
            head_norm: self.dense(&format!("{p}.shared_head.norm.weight"), 1, h)?,
            head: self.dense(&format!("{p}.shared_head.head.weight"), v, h)?,
        })
    }
}
