//! The model's weights resolved from a checkpoint: every tensor checked against config.json once,
//! then addressed by [`WeightId`] from the graph. FP8 Linear weights stay in the memory map;
//! BF16/F32 tensors (norms, embeddings, router, heads) are widened to f32.
//!
//! [`ModelWeights::synthetic`] describes the same table (ids, names, shapes, FP8 block
//! scales) without host data: every weight is [`Weight::Synthetic`], generated where it is
//! materialized (the CUDA backend fills it on the device). Real-dimension models then run
//! without a checkpoint, for benchmarks; backends that compute from host values refuse them.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};

use crate::checkpoint::{Checkpoint, Fp8Weight};
use crate::config::ModelConfig;
use crate::error::Result;
use crate::numerics::sampling::SplitMix64;
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
    /// A weight described by its shape and value distribution only (no host data).
    Synthetic(SyntheticWeight),
}

impl Weight {
    /// [rows, cols] of the matrix (for a Linear: [out_features, in_features]).
    pub fn shape(&self) -> (usize, usize) {
        match self {
            Weight::Fp8(w) => (w.n, w.k),
            Weight::Dense { rows, cols, .. } => (*rows, *cols),
            Weight::Synthetic(w) => (w.rows, w.cols),
        }
    }
}

/// A weight without host data: its shape, how its values are drawn, and the seed of its
/// stream. Materialized by the CUDA backend with its device fill (`random_fill`, see
/// cuda/params/random_fill.h); the values are random but keep activations finite and of
/// order one through a layer (Linear entries of standard deviation about 1/sqrt(in_features),
/// norms near 1).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SyntheticWeight {
    pub rows: usize,
    pub cols: usize,
    pub values: SyntheticValues,
    /// The stream's seed (distinct for every weight of a table).
    pub seed: u64,
}

/// How a synthetic weight's values are drawn.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SyntheticValues {
    /// An FP8 Linear weight [n, k]: e4m3 codes of values uniform in `+-code_max`; each
    /// 128x128 block multiplier (W = q * s) uniform in `scale * [3/4, 5/4]`, drawn from the
    /// stream of `seed ^ SCALE_STREAM`.
    Fp8 { code_max: f32, scale: f32 },
    /// A BF16/F32 tensor: values uniform in `center +- spread`.
    Dense { center: f32, spread: f32 },
}

/// XORed into an FP8 synthetic weight's seed for the stream of its block multipliers.
pub const SCALE_STREAM: u64 = 0x5CA1_E5CA_1E5C_A1E5;

/// Largest |value| the e4m3 codes of a synthetic Linear weight are drawn from.
pub const SYNTHETIC_CODE_MAX: f32 = 64.0;

/// What a BF16/F32 tensor is for: how its synthetic values are drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// RMSNorm weights: near 1.
    Norm,
    /// The router's score-correction bias: near 0.
    Bias,
    /// Embedding tables: standard deviation 1 (the first RMSNorm rescales them anyway).
    Embedding,
    /// A dense Linear (router, eh_proj, LM heads): standard deviation 1/sqrt(cols).
    Matrix,
}

impl SyntheticWeight {
    /// An FP8 Linear [n, k] whose entries have standard deviation about 1/sqrt(k).
    pub fn linear(n: usize, k: usize, seed: u64) -> Self {
        // Codes uniform in +-C have standard deviation C/sqrt(3).
        let scale = 3f32.sqrt() / (SYNTHETIC_CODE_MAX * (k.max(1) as f32).sqrt());
        SyntheticWeight {
            rows: n,
            cols: k,
            values: SyntheticValues::Fp8 {
                code_max: SYNTHETIC_CODE_MAX,
                scale,
            },
            seed,
        }
    }

    fn dense(rows: usize, cols: usize, role: Role, seed: u64) -> Self {
        let (center, spread) = match role {
            Role::Norm => (1.0, 0.05),
            Role::Bias => (0.0, 0.01),
            Role::Embedding => (0.0, 3f32.sqrt()),
            Role::Matrix => (0.0, (3.0 / cols.max(1) as f32).sqrt()),
        };
        SyntheticWeight {
            rows,
            cols,
            values: SyntheticValues::Dense { center, spread },
            seed,
        }
    }

    /// Whether it stands for an FP8 Linear weight.
    pub fn is_fp8(&self) -> bool {
        matches!(self.values, SyntheticValues::Fp8 { .. })
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
    /// Every weight is [`Weight::Synthetic`] ([`ModelWeights::synthetic`]).
    synthetic: bool,
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

    /// Whether the weights have no host data ([`ModelWeights::synthetic`]).
    pub fn is_synthetic(&self) -> bool {
        self.synthetic
    }

    /// The table of the model `cfg` describes, exactly as [`ModelWeights::load`] would
    /// resolve it from a checkpoint (same ids, names, shapes and MTP layer when `with_mtp` and
    /// config.json declares one), with every weight [`Weight::Synthetic`]: weight `i` draws
    /// from the stream of a seed mixed from `seed` and `i`. Nothing is allocated for values.
    pub fn synthetic(cfg: &ModelConfig, with_mtp: bool, seed: u64) -> Self {
        let mut builder = Builder {
            source: Synthetic {
                seeds: SplitMix64::new(seed),
            },
            cfg,
            table: Vec::new(),
        };
        match builder.model(with_mtp && cfg.has_mtp()) {
            Ok(mut weights) => {
                weights.synthetic = true;
                weights
            }
            Err(e) => unreachable!("describing synthetic weights cannot fail: {e}"),
        }
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
        let mut builder = Builder {
            source: FromCheckpoint {
                ckpt,
                progress: &progress,
            },
            cfg,
            table: Vec::new(),
        };
        let weights = builder.model(load_mtp)?;
        progress.finish_and_clear();
        Ok(weights)
    }
}

fn is_mtp_tensor(name: &str, cfg: &ModelConfig) -> bool {
    (cfg.num_hidden_layers..cfg.num_hidden_layers + cfg.num_nextn_predict_layers)
        .any(|l| name.starts_with(&format!("model.layers.{l}.")))
}

/// Where the weights' values come from.
trait Source {
    /// A BF16/F32 tensor of shape [rows, cols] ([cols] when rows == 1).
    fn dense(&mut self, name: &str, rows: usize, cols: usize, role: Role) -> Result<Weight>;
    /// An FP8 Linear `<prefix>.weight` [n, k] with its block multipliers.
    fn fp8(&mut self, prefix: &str, n: usize, k: usize) -> Result<Weight>;
    /// Whether the source holds tensor `name` (optional tensors).
    fn contains(&self, name: &str) -> bool;
}

struct FromCheckpoint<'a> {
    ckpt: &'a Checkpoint,
    progress: &'a ProgressBar,
}

impl Source for FromCheckpoint<'_> {
    fn dense(&mut self, name: &str, rows: usize, cols: usize, _role: Role) -> Result<Weight> {
        let shape: &[usize] = if rows == 1 { &[cols] } else { &[rows, cols] };
        let data = self.ckpt.read_f32(name, shape)?;
        self.progress.inc(self.ckpt.info(name)?.bytes() as u64);
        Ok(Weight::Dense { rows, cols, data })
    }

    /// Its pages are touched so the load, not the first forward pass, pays for reading them.
    fn fp8(&mut self, prefix: &str, n: usize, k: usize) -> Result<Weight> {
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
        Ok(Weight::Fp8(w))
    }

    fn contains(&self, name: &str) -> bool {
        self.ckpt.contains(name)
    }
}

/// Shapes only; each weight's seed is the next output of a SplitMix64 seeded with the table's
/// seed (unrelated 64-bit seeds, so no two weights' streams, which advance by a fixed odd step
/// per element, overlap in practice).
struct Synthetic {
    seeds: SplitMix64,
}

impl Source for Synthetic {
    fn dense(&mut self, _name: &str, rows: usize, cols: usize, role: Role) -> Result<Weight> {
        let seed = self.seeds.next_u64();
        Ok(Weight::Synthetic(SyntheticWeight::dense(
            rows, cols, role, seed,
        )))
    }

    fn fp8(&mut self, _prefix: &str, n: usize, k: usize) -> Result<Weight> {
        Ok(Weight::Synthetic(SyntheticWeight::linear(
            n,
            k,
            self.seeds.next_u64(),
        )))
    }

    /// The official layout: the MTP layer carries its own embedding.
    fn contains(&self, _name: &str) -> bool {
        true
    }
}

/// Resolves every weight of the model in table order: the embedding, the decoder blocks,
/// the final norm and LM head, then the MTP layer.
struct Builder<'a, S> {
    source: S,
    cfg: &'a ModelConfig,
    table: Vec<(String, Weight)>,
}

impl<S: Source> Builder<'_, S> {
    fn model(&mut self, with_mtp: bool) -> Result<ModelWeights> {
        let cfg = self.cfg;
        let (h, v) = (cfg.hidden_size, cfg.vocab_size);
        let embed = self.dense("model.embed_tokens.weight", v, h, Role::Embedding)?;
        let blocks = (0..cfg.num_hidden_layers)
            .map(|layer| self.block(layer))
            .collect::<Result<Vec<_>>>()?;
        let norm = self.dense("model.norm.weight", 1, h, Role::Norm)?;
        let lm_head = self.dense("lm_head.weight", v, h, Role::Matrix)?;
        let mtp = if with_mtp {
            Some(self.mtp(cfg.num_hidden_layers)?)
        } else {
            None
        };
        Ok(ModelWeights {
            table: std::mem::take(&mut self.table),
            synthetic: false,
            embed,
            blocks,
            norm,
            lm_head,
            mtp,
        })
    }

    fn push(&mut self, name: String, weight: Weight) -> WeightId {
        self.table.push((name, weight));
        WeightId(self.table.len() as u32 - 1)
    }

    fn dense(&mut self, name: &str, rows: usize, cols: usize, role: Role) -> Result<WeightId> {
        let w = self.source.dense(name, rows, cols, role)?;
        Ok(self.push(name.to_string(), w))
    }

    fn fp8(&mut self, prefix: &str, n: usize, k: usize) -> Result<WeightId> {
        let w = self.source.fp8(prefix, n, k)?;
        Ok(self.push(format!("{prefix}.weight"), w))
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
                norm: self.dense(&format!("{p}.q_a_layernorm.weight"), 1, rank, Role::Norm)?,
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
            kv_a_norm: self.dense(
                &format!("{p}.kv_a_layernorm.weight"),
                1,
                c.kv_lora_rank,
                Role::Norm,
            )?,
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
        let attn_norm = self.dense(
            &format!("{p}.input_layernorm.weight"),
            1,
            c.hidden_size,
            Role::Norm,
        )?;
        let attn = self.attention(&format!("{p}.self_attn"))?;
        let ffn_norm = self.dense(
            &format!("{p}.post_attention_layernorm.weight"),
            1,
            c.hidden_size,
            Role::Norm,
        )?;
        let ffn = if c.is_moe_layer(layer) || layer >= c.num_hidden_layers {
            let router = self.dense(
                &format!("{p}.mlp.gate.weight"),
                c.n_routed_experts,
                c.hidden_size,
                Role::Matrix,
            )?;
            let bias = self.dense(
                &format!("{p}.mlp.gate.e_score_correction_bias"),
                1,
                c.n_routed_experts,
                Role::Bias,
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
        let embed_name = if self.source.contains(&own_embed) {
            own_embed
        } else {
            "model.embed_tokens.weight".to_string()
        };
        Ok(MtpWeights {
            embed: self.dense(&embed_name, v, h, Role::Embedding)?,
            enorm: self.dense(&format!("{p}.enorm.weight"), 1, h, Role::Norm)?,
            hnorm: self.dense(&format!("{p}.hnorm.weight"), 1, h, Role::Norm)?,
            eh_proj: self.dense(&format!("{p}.eh_proj.weight"), h, 2 * h, Role::Matrix)?,
            block: self.block(layer)?,
            head_norm: self.dense(&format!("{p}.shared_head.norm.weight"), 1, h, Role::Norm)?,
            head: self.dense(&format!("{p}.shared_head.head.weight"), v, h, Role::Matrix)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::Plan;
    use crate::model::{main_graph, mtp_graph, LogitRows};
    use std::path::{Path, PathBuf};

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name)
    }

    fn r1() -> ModelConfig {
        let json = include_str!("../../tests/fixtures/deepseek-r1-config.json");
        ModelConfig::from_json(json, Path::new("config.json")).unwrap()
    }

    fn synthetic(w: &Weight) -> &SyntheticWeight {
        match w {
            Weight::Synthetic(s) => s,
            other => panic!("not synthetic: {other:?}"),
        }
    }

    /// Same ids, names and shapes as the loaded checkpoint, FP8 exactly where it is FP8.
    #[test]
    fn synthetic_tables_match_the_loaded_fixtures() {
        for name in ["r1-heads", "small-odd"] {
            let dir = fixture(name);
            let cfg = ModelConfig::from_dir(&dir).unwrap();
            let ckpt = Checkpoint::open(&dir).unwrap();
            let loaded = ModelWeights::load(&ckpt, &cfg, true).unwrap();
            let syn = ModelWeights::synthetic(&cfg, true, 1);
            assert!(syn.is_synthetic() && !loaded.is_synthetic());
            assert_eq!(syn.len(), loaded.len(), "{name}");
            for i in 0..loaded.len() {
                let id = WeightId(i as u32);
                assert_eq!(syn.name(id), loaded.name(id), "{name}");
                let (l, s) = (loaded.get(id), syn.get(id));
                assert_eq!(s.shape(), l.shape(), "{name}: {}", loaded.name(id));
                assert_eq!(
                    synthetic(s).is_fp8(),
                    matches!(l, Weight::Fp8(_)),
                    "{name}: {}",
                    loaded.name(id)
                );
            }
            assert_eq!(syn.embed, loaded.embed);
            assert_eq!(syn.lm_head, loaded.lm_head);
            assert_eq!(syn.blocks.len(), loaded.blocks.len());
            assert_eq!(syn.mtp.is_some(), loaded.mtp.is_some());
        }
    }

    #[test]
    fn deepseek_r1_synthetic_table() {
        let cfg = r1();
        let w = ModelWeights::synthetic(&cfg, true, 7);
        // Per block: 2 norms, q_a, q_a_norm, q_b, kv_a, kv_a_norm, kv_b, o = 9, then the FFN:
        // 3 dense projections, or router + bias + 256 x 3 experts + 3 shared.
        let moe = 9 + 2 + 256 * 3 + 3;
        let main = 1 + 3 * (9 + 3) + 58 * moe + 2;
        let mtp = 4 + moe + 2;
        assert_eq!(w.len(), main + mtp);
        assert_eq!(w.blocks.len(), 61);
        assert!(matches!(w.blocks[2].ffn, FfnWeights::Dense(_)));
        let FfnWeights::Moe(m) = &w.blocks[3].ffn else {
            panic!("layer 3 is MoE")
        };
        let down = m.experts[255].down;
        assert_eq!(
            w.name(down),
            "model.layers.3.mlp.experts.255.down_proj.weight"
        );
        assert_eq!(w.get(down).shape(), (7168, 2048));
        let mtp_w = w.mtp.as_ref().unwrap();
        assert_eq!(w.name(mtp_w.eh_proj), "model.layers.61.eh_proj.weight");
        assert_eq!(w.get(mtp_w.eh_proj).shape(), (7168, 14336));
        assert_eq!(
            w.name(mtp_w.embed),
            "model.layers.61.embed_tokens.weight",
            "the official layout's own MTP embedding"
        );
        // FP8 Linear weights: entries of standard deviation ~ 1/sqrt(k), positive multipliers.
        let q_b = synthetic(w.get(match w.blocks[0].attn.q {
            QueryWeights::LowRank { b, .. } => b,
            QueryWeights::Direct(q) => q,
        }));
        assert_eq!((q_b.rows, q_b.cols), (128 * 192, 1536));
        let SyntheticValues::Fp8 { code_max, scale } = q_b.values else {
            panic!("q_b_proj is FP8")
        };
        assert!(code_max <= 448.0 && scale > 0.0);
        let sd = scale * code_max / 3f32.sqrt();
        assert!((sd * 1536f32.sqrt() - 1.0).abs() < 1e-5, "sd {sd}");
        // Norms near 1, the router's matrix of sd 1/sqrt(hidden).
        let norm = synthetic(w.get(w.norm));
        assert_eq!(
            norm.values,
            SyntheticValues::Dense {
                center: 1.0,
                spread: 0.05
            }
        );
        let SyntheticValues::Dense { center, spread } = synthetic(w.get(m.router)).values else {
            panic!("the router is dense")
        };
        assert_eq!(center, 0.0);
        assert!((spread / 3f32.sqrt() * 7168f32.sqrt() - 1.0).abs() < 1e-5);
        // Every weight its own stream; the table's seed changes them all.
        let seeds: std::collections::HashSet<u64> = (0..w.len())
            .map(|i| synthetic(w.get(WeightId(i as u32))).seed)
            .collect();
        assert_eq!(seeds.len(), w.len());
        let other = ModelWeights::synthetic(&cfg, true, 8);
        assert_ne!(synthetic(other.get(down)).seed, synthetic(w.get(down)).seed);
        assert_eq!(
            ModelWeights::synthetic(&cfg, false, 7).len(),
            main,
            "no MTP layer unless asked"
        );
    }

    #[test]
    fn graphs_build_from_a_synthetic_table() {
        let mut cfg = r1();
        cfg.num_hidden_layers = 4;
        let w = ModelWeights::synthetic(&cfg, true, 3);
        for rows in [LogitRows::All, LogitRows::Last] {
            let g = main_graph(&cfg, &w, rows);
            assert!(g.output(crate::model::LOGITS).is_some());
            assert!(Plan::new(&g).slots > 0);
            let m = mtp_graph(&cfg, &w, rows).expect("an MTP layer");
            assert!(m.input(crate::model::HIDDEN_IN).is_some());
            assert!(Plan::new(&m).slots > 0);
        }
        // A model of the MTP layer alone (no main blocks) still has both graphs.
        cfg.num_hidden_layers = 0;
        let w = ModelWeights::synthetic(&cfg, true, 3);
        assert!(w.blocks.is_empty());
        assert_eq!(
            w.name(w.mtp.as_ref().unwrap().eh_proj),
            "model.layers.0.eh_proj.weight"
        );
        assert!(mtp_graph(&cfg, &w, LogitRows::Last).is_some());
    }
}
