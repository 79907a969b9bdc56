//! What one step of a layer reads, counted in the form the CUDA backend stores it (FP8 Linear
//! weights as e4m3 codes + one f32 multiplier per 128x128 block; norms, router and dense heads
//! as bf16; the router bias as f32; kv_b_proj as the bf16 matrix absorption uses; the latent
//! cache as bf16), and each layer's share on one GPU of a TP = 8 / EP = 8 deployment.

use r1_runtime::config::ModelConfig;
use r1_runtime::model::weights::{
    BlockWeights, FfnWeights, MlpWeights, ModelWeights, MtpWeights, QueryWeights, Weight, WeightId,
};

/// Tensor-parallel ranks of attention, the dense MLP, the shared expert and the LM head.
pub const TP: f64 = 8.0;
/// Expert-parallel ranks of the routed experts.
pub const EP: f64 = 8.0;

/// Bytes of one weight on the device.
pub fn weight_bytes(w: &Weight) -> f64 {
    let fp8 = |n: usize, k: usize| (n * k + n.div_ceil(128) * k.div_ceil(128) * 4) as f64;
    match w {
        Weight::Fp8(f) => fp8(f.n, f.k),
        Weight::Dense { rows, cols, .. } => (rows * cols * 2) as f64,
        Weight::Synthetic(s) if s.is_fp8() => fp8(s.rows, s.cols),
        Weight::Synthetic(s) => (s.rows * s.cols * 2) as f64,
    }
}

/// One decoder block's weights by how TP = 8 / EP = 8 places them.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LayerBytes {
    /// On every rank: the norms, q_a_proj, kv_a_proj_with_mqa, the router and its bias.
    pub replicated: f64,
    /// Split by heads or columns over the TP ranks: q_b_proj, kv_b_proj (bf16, absorbed),
    /// o_proj, the dense MLP, the shared expert.
    pub tp_split: f64,
    /// One routed expert (gate + up + down); 0 for a dense layer.
    pub expert: f64,
    pub experts: usize,
    pub top_k: usize,
}

impl LayerBytes {
    pub fn of_block(w: &ModelWeights, cfg: &ModelConfig, b: &BlockWeights) -> Self {
        let bytes = |id: WeightId| weight_bytes(w.get(id));
        let mlp = |m: &MlpWeights| bytes(m.gate) + bytes(m.up) + bytes(m.down);
        let a = &b.attn;
        let (q_a, q_b) = match a.q {
            QueryWeights::LowRank { a, norm, b } => (bytes(a) + bytes(norm), bytes(b)),
            QueryWeights::Direct(q) => (0.0, bytes(q)),
        };
        // The GPU keeps kv_b_proj only as bf16 for absorption.
        let (kv_b_n, kv_b_k) = w.get(a.kv_b).shape();
        let mut l = LayerBytes {
            replicated: bytes(b.attn_norm)
                + bytes(b.ffn_norm)
                + q_a
                + bytes(a.kv_a)
                + bytes(a.kv_a_norm),
            tp_split: q_b + (kv_b_n * kv_b_k * 2) as f64 + bytes(a.o),
            ..LayerBytes::default()
        };
        match &b.ffn {
            FfnWeights::Dense(m) => l.tp_split += mlp(m),
            FfnWeights::Moe(m) => {
                // The bias is f32 on the device, twice its bf16 count.
                l.replicated += bytes(m.router) + 2.0 * bytes(m.bias);
                l.tp_split += m.shared.as_ref().map_or(0.0, mlp);
                l.expert = m.experts.first().map_or(0.0, mlp);
                l.experts = m.experts.len();
                l.top_k = cfg.num_experts_per_tok;
            }
        }
        l
    }

    /// Routed experts `tokens` tokens touch on `experts` experts, expected under uniform
    /// routing: experts * (1 - (1 - top_k / E)^tokens). The synthetic router's random weights
    /// route close to uniformly; the bound is min(experts, top_k * tokens).
    pub fn expected_experts(&self, experts: f64, tokens: usize) -> f64 {
        if self.experts == 0 {
            return 0.0;
        }
        let p = self.top_k as f64 / self.experts as f64;
        experts * (1.0 - (1.0 - p).powi(tokens as i32))
    }

    /// Weights one GPU reads for a step of `tokens` tokens.
    pub fn read(&self, tokens: usize) -> f64 {
        self.replicated
            + self.tp_split
            + self.expert * self.expected_experts(self.experts as f64, tokens)
    }

    /// The same on one rank of TP = 8 / EP = 8: replicated weights whole, split ones by 8,
    /// the experts its E / 8 hold that the step's tokens touch.
    pub fn read_per_rank(&self, tokens: usize) -> f64 {
        self.replicated
            + self.tp_split / TP
            + self.expert * self.expected_experts(self.experts as f64 / EP, tokens)
    }

    /// Every byte of the layer.
    pub fn total(&self) -> f64 {
        self.replicated + self.tp_split + self.expert * self.experts as f64
    }
}

/// The MTP layer's weights outside its decoder block (enorm, hnorm, eh_proj, shared_head's
/// norm; the embedding reads only the step's rows, the head is the probe's).
pub fn mtp_extra(w: &ModelWeights, m: &MtpWeights) -> f64 {
    [m.enorm, m.hnorm, m.eh_proj, m.head_norm]
        .iter()
        .map(|&id| weight_bytes(w.get(id)))
        .sum()
}

/// Latent cache bytes one layer reads in a step: every sequence's positions up to its last
/// new token, bf16 [kv_lora + rope] each (the queries of a sequence share the reads).
pub fn kv_read(cfg: &ModelConfig, seqs: usize, kv_len_after: usize) -> f64 {
    (seqs * kv_len_after * cfg.kv_cache_width() * 2) as f64
}

/// Floating-point operations of a step of `tokens` tokens of one block (2 per multiply-add):
/// every projection, the routed experts each token chose (top_k) and the shared expert, and
/// absorbed attention over `kv_avg` positions on average (scores over kv_lora + rope, values
/// over kv_lora, per head).
pub fn block_flops(cfg: &ModelConfig, l: &LayerBytes, tokens: usize, kv_avg: f64) -> f64 {
    let t = tokens as f64;
    let h = cfg.hidden_size as f64;
    let heads = cfg.num_attention_heads as f64;
    let q_lora = cfg.q_lora_rank.unwrap_or(cfg.hidden_size) as f64;
    let kv_lora = cfg.kv_lora_rank as f64;
    let qk = cfg.head_dim_qk() as f64;
    let (nope, v) = (cfg.qk_nope_head_dim as f64, cfg.v_head_dim as f64);
    let proj = h * q_lora
        + q_lora * heads * qk
        + h * cfg.kv_cache_width() as f64
        + heads * nope * kv_lora // q_nope . W_UK (absorption)
        + heads * kv_lora * v // o_lat . W_UV
        + heads * v * h;
    let ffn = if l.experts == 0 {
        3.0 * h * cfg.intermediate_size as f64
    } else {
        3.0 * h * cfg.moe_intermediate_size as f64 * (l.top_k + cfg.n_shared_experts) as f64
            + h * l.experts as f64
    };
    let attn = heads * kv_avg * (cfg.kv_cache_width() as f64 + kv_lora);
    2.0 * t * (proj + ffn + attn)
}
