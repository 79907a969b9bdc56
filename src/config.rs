//! `config.json` of a DeepSeek-V3 / R1 checkpoint. Every dimension the runtime uses comes from
//! here; an unsupported or inconsistent value fails with a message naming the field.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use crate::error::{Error, Result};
use crate::numerics::routing::Router;

/// YaRN rope scaling (the only `rope_scaling.type` DeepSeek-V3 uses).
#[derive(Debug, Clone, PartialEq)]
pub struct Yarn {
    pub factor: f64,
    pub original_max_position_embeddings: usize,
    pub beta_fast: f64,
    pub beta_slow: f64,
    pub mscale: f64,
    pub mscale_all_dim: f64,
}

/// The FP8 block quantization the weights are stored in.
#[derive(Debug, Clone, PartialEq)]
pub struct Fp8Quantization {
    /// `weight_block_size`: [rows, cols] of one scale block, [128, 128] in the official checkpoint.
    pub block: [usize; 2],
    /// `activation_scheme`: "dynamic" (per token per 128 channels at run time).
    pub activation_scheme: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    /// Dense MLP width of the first `first_k_dense_replace` layers.
    pub intermediate_size: usize,
    pub moe_intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub first_k_dense_replace: usize,
    pub moe_layer_freq: usize,
    pub num_attention_heads: usize,
    /// None: queries come from one `q_proj` (DeepSeek-V2-Lite style); Some: `q_a_proj` ->
    /// `q_a_layernorm` -> `q_b_proj`.
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
    pub n_routed_experts: usize,
    pub n_shared_experts: usize,
    pub num_experts_per_tok: usize,
    pub n_group: usize,
    pub topk_group: usize,
    pub norm_topk_prob: bool,
    pub routed_scaling_factor: f32,
    pub rms_norm_eps: f32,
    pub rope_theta: f64,
    pub rope_scaling: Option<Yarn>,
    pub max_position_embeddings: usize,
    pub num_nextn_predict_layers: usize,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub quantization: Option<Fp8Quantization>,
}

#[derive(Deserialize)]
struct RawConfig {
    model_type: Option<String>,
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    moe_intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    first_k_dense_replace: Option<usize>,
    moe_layer_freq: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    q_lora_rank: Option<usize>,
    kv_lora_rank: Option<usize>,
    qk_nope_head_dim: Option<usize>,
    qk_rope_head_dim: Option<usize>,
    v_head_dim: Option<usize>,
    n_routed_experts: Option<usize>,
    n_shared_experts: Option<usize>,
    num_experts_per_tok: Option<usize>,
    n_group: Option<usize>,
    topk_group: Option<usize>,
    topk_method: Option<String>,
    scoring_func: Option<String>,
    norm_topk_prob: Option<bool>,
    routed_scaling_factor: Option<f64>,
    hidden_act: Option<String>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<Value>,
    max_position_embeddings: Option<usize>,
    num_nextn_predict_layers: Option<usize>,
    bos_token_id: Option<u32>,
    eos_token_id: Option<Value>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    quantization_config: Option<Value>,
}

impl ModelConfig {
    /// Reads `<dir>/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        Self::from_json(&text, &path)
    }

    /// Parses config.json text; `path` is only used in error messages.
    pub fn from_json(text: &str, path: &Path) -> Result<Self> {
        let fail = |message: String| Error::Config {
            path: path.to_path_buf(),
            message,
        };
        let raw: RawConfig =
            serde_json::from_str(text).map_err(|e| fail(format!("not valid JSON: {e}")))?;
        Parser { path }.parse(raw)
    }

    pub fn head_dim_qk(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }

    /// Width of one cached token: normed c_kv followed by the roped k_pe.
    pub fn kv_cache_width(&self) -> usize {
        self.kv_lora_rank + self.qk_rope_head_dim
    }

    /// Whether decoder layer `layer` uses the MoE block (the MTP layer always does).
    pub fn is_moe_layer(&self, layer: usize) -> bool {
        self.n_routed_experts > 0
            && layer >= self.first_k_dense_replace
            && (layer - self.first_k_dense_replace) % self.moe_layer_freq == 0
    }

    pub fn has_mtp(&self) -> bool {
        self.num_nextn_predict_layers > 0
    }

    /// The YaRN multiplier `0.1 * m * ln(factor) + 1` (1 without scaling).
    fn yarn_mscale(&self, m: f64) -> f64 {
        match &self.rope_scaling {
            Some(y) if y.factor > 1.0 && m != 0.0 => 0.1 * m * y.factor.ln() + 1.0,
            _ => 1.0,
        }
    }

    /// Attention softmax scale: `(nope + rope)^-0.5 * mscale(mscale_all_dim)^2`.
    pub fn softmax_scale(&self) -> f32 {
        let m = self
            .rope_scaling
            .as_ref()
            .map_or(1.0, |y| self.yarn_mscale(y.mscale_all_dim));
        ((self.head_dim_qk() as f64).powf(-0.5) * m * m) as f32
    }

    /// RoPE inverse frequencies, one per rotated pair (YaRN-corrected when configured).
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        let dim = self.qk_rope_head_dim;
        let base = self.rope_theta;
        let extrapolation: Vec<f64> = (0..dim / 2)
            .map(|i| 1.0 / base.powf((2 * i) as f64 / dim as f64))
            .collect();
        let Some(y) = &self.rope_scaling else {
            return extrapolation.iter().map(|&f| f as f32).collect();
        };
        // The dimension whose wavelength completes `rotations` turns over the original context.
        let correction_dim = |rotations: f64| {
            dim as f64
                * (y.original_max_position_embeddings as f64
                    / (rotations * 2.0 * std::f64::consts::PI))
                    .ln()
                / (2.0 * base.ln())
        };
        let low = correction_dim(y.beta_fast).floor().max(0.0);
        let mut high = correction_dim(y.beta_slow).ceil().min(dim as f64 - 1.0);
        if low == high {
            high += 0.001;
        }
        extrapolation
            .iter()
            .enumerate()
            .map(|(i, &extra)| {
                let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                let keep_extrapolated = 1.0 - ramp;
                let interpolated = extra / y.factor;
                (interpolated * (1.0 - keep_extrapolated) + extra * keep_extrapolated) as f32
            })
            .collect()
    }

    /// The MoE routing hyper-parameters.
    pub fn router(&self) -> Router {
        Router {
            n_experts: self.n_routed_experts,
            n_group: self.n_group,
            topk_group: self.topk_group,
            top_k: self.num_experts_per_tok,
            normalize: self.norm_topk_prob,
            scaling: self.routed_scaling_factor,
        }
    }

    /// Multiplier on cos/sin: `mscale(mscale) / mscale(mscale_all_dim)` (1 for R1).
    pub fn rope_attention_factor(&self) -> f32 {
        match &self.rope_scaling {
            Some(y) => (self.yarn_mscale(y.mscale) / self.yarn_mscale(y.mscale_all_dim)) as f32,
            None => 1.0,
        }
    }
}

struct Parser<'a> {
    path: &'a Path,
}

impl Parser<'_> {
    fn fail(&self, message: impl Into<String>) -> Error {
        Error::Config {
            path: PathBuf::from(self.path),
            message: message.into(),
        }
    }

    fn required<T>(&self, value: Option<T>, field: &str) -> Result<T> {
        value.ok_or_else(|| self.fail(format!("missing field `{field}`")))
    }

    fn positive(&self, value: Option<usize>, field: &str) -> Result<usize> {
        match self.required(value, field)? {
            0 => Err(self.fail(format!("`{field}` must be positive, got 0"))),
            v => Ok(v),
        }
    }

    fn parse(&self, raw: RawConfig) -> Result<ModelConfig> {
        if let Some(t) = &raw.model_type {
            if t != "deepseek_v3" && t != "deepseek_v2" {
                return Err(self.fail(format!(
                    "`model_type` is \"{t}\"; only DeepSeek-V3 / R1 (\"deepseek_v3\") is supported"
                )));
            }
        }
        let heads = self.positive(raw.num_attention_heads, "num_attention_heads")?;
        if let Some(kv) = raw.num_key_value_heads {
            if kv != heads {
                return Err(self.fail(format!(
                    "`num_key_value_heads` ({kv}) must equal `num_attention_heads` ({heads}) for MLA"
                )));
            }
        }
        let n_routed_experts = raw.n_routed_experts.unwrap_or(0);
        let num_experts_per_tok = raw.num_experts_per_tok.unwrap_or(0);
        let n_group = raw.n_group.unwrap_or(1);
        let topk_group = raw.topk_group.unwrap_or(n_group);
        if n_routed_experts > 0 {
            if n_group == 0 || n_routed_experts % n_group != 0 {
                return Err(self.fail(format!(
                    "`n_routed_experts` ({n_routed_experts}) must be a multiple of `n_group` ({n_group})"
                )));
            }
            if topk_group == 0 || topk_group > n_group {
                return Err(self.fail(format!(
                    "`topk_group` ({topk_group}) must be in 1..=n_group ({n_group})"
                )));
            }
            let kept = topk_group * (n_routed_experts / n_group);
            if num_experts_per_tok == 0 || num_experts_per_tok > kept {
                return Err(self.fail(format!(
                    "`num_experts_per_tok` ({num_experts_per_tok}) must be in 1..={kept} (experts left after keeping topk_group groups)"
                )));
            }
            if n_routed_experts / n_group < 2 {
                return Err(self.fail(
                    "each expert group needs at least 2 experts (group score = sum of its top-2)",
                ));
            }
            match raw.topk_method.as_deref() {
                None | Some("noaux_tc") => {}
                Some(m) => {
                    return Err(self.fail(format!(
                        "`topk_method` \"{m}\" is not supported (only \"noaux_tc\")"
                    )))
                }
            }
            match raw.scoring_func.as_deref() {
                None | Some("sigmoid") => {}
                Some(f) => {
                    return Err(self.fail(format!(
                        "`scoring_func` \"{f}\" is not supported (only \"sigmoid\")"
                    )))
                }
            }
        }
        if let Some(act) = &raw.hidden_act {
            if act != "silu" {
                return Err(self.fail(format!(
                    "`hidden_act` \"{act}\" is not supported (only \"silu\")"
                )));
            }
        }
        if raw.tie_word_embeddings == Some(true) {
            return Err(self.fail(
                "`tie_word_embeddings: true` is not supported (DeepSeek-V3 has a separate lm_head)",
            ));
        }
        if raw.attention_bias == Some(true) {
            return Err(self.fail("`attention_bias: true` is not supported (DeepSeek-V3 has none)"));
        }
        let qk_rope_head_dim = self.positive(raw.qk_rope_head_dim, "qk_rope_head_dim")?;
        if qk_rope_head_dim % 2 != 0 {
            return Err(self.fail(format!(
                "`qk_rope_head_dim` ({qk_rope_head_dim}) must be even (RoPE rotates pairs)"
            )));
        }
        let moe_layer_freq = raw.moe_layer_freq.unwrap_or(1);
        if moe_layer_freq == 0 {
            return Err(self.fail("`moe_layer_freq` must be positive"));
        }
        let rms_norm_eps = self.required(raw.rms_norm_eps, "rms_norm_eps")?;
        if rms_norm_eps.is_nan() || rms_norm_eps <= 0.0 {
            return Err(self.fail(format!(
                "`rms_norm_eps` must be positive, got {rms_norm_eps}"
            )));
        }
        let eos_token_ids = match raw.eos_token_id {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Number(n)) => vec![self.token_id(&n, "eos_token_id")?],
            Some(Value::Array(ids)) => ids
                .iter()
                .map(|v| match v {
                    Value::Number(n) => self.token_id(n, "eos_token_id"),
                    _ => Err(self.fail("`eos_token_id` must be an integer or a list of integers")),
                })
                .collect::<Result<_>>()?,
            Some(_) => {
                return Err(self.fail("`eos_token_id` must be an integer or a list of integers"))
            }
        };
        let config = ModelConfig {
            vocab_size: self.positive(raw.vocab_size, "vocab_size")?,
            hidden_size: self.positive(raw.hidden_size, "hidden_size")?,
            intermediate_size: self.positive(raw.intermediate_size, "intermediate_size")?,
            moe_intermediate_size: if n_routed_experts > 0 {
                self.positive(raw.moe_intermediate_size, "moe_intermediate_size")?
            } else {
                raw.moe_intermediate_size.unwrap_or(0)
            },
            num_hidden_layers: self.positive(raw.num_hidden_layers, "num_hidden_layers")?,
            first_k_dense_replace: raw.first_k_dense_replace.unwrap_or(0),
            moe_layer_freq,
            num_attention_heads: heads,
            q_lora_rank: raw.q_lora_rank,
            kv_lora_rank: self.positive(raw.kv_lora_rank, "kv_lora_rank")?,
            qk_nope_head_dim: self.positive(raw.qk_nope_head_dim, "qk_nope_head_dim")?,
            qk_rope_head_dim,
            v_head_dim: self.positive(raw.v_head_dim, "v_head_dim")?,
            n_routed_experts,
            n_shared_experts: raw.n_shared_experts.unwrap_or(0),
            num_experts_per_tok,
            n_group,
            topk_group,
            norm_topk_prob: raw.norm_topk_prob.unwrap_or(true),
            routed_scaling_factor: raw.routed_scaling_factor.unwrap_or(1.0) as f32,
            rms_norm_eps: rms_norm_eps as f32,
            rope_theta: raw.rope_theta.unwrap_or(10000.0),
            rope_scaling: raw
                .rope_scaling
                .map(|v| self.yarn(&v))
                .transpose()?
                .flatten(),
            max_position_embeddings: self
                .positive(raw.max_position_embeddings, "max_position_embeddings")?,
            num_nextn_predict_layers: raw.num_nextn_predict_layers.unwrap_or(0),
            bos_token_id: raw.bos_token_id,
            eos_token_ids,
            quantization: raw
                .quantization_config
                .map(|v| self.quantization(&v))
                .transpose()?,
        };
        if config.q_lora_rank == Some(0) {
            return Err(self.fail("`q_lora_rank` must be positive or null"));
        }
        if config.num_nextn_predict_layers > 1 {
            return Err(self.fail(format!(
                "`num_nextn_predict_layers` is {}; only 0 or 1 MTP layer is supported",
                config.num_nextn_predict_layers
            )));
        }
        for &id in config.eos_token_ids.iter().chain(&config.bos_token_id) {
            if id as usize >= config.vocab_size {
                return Err(self.fail(format!(
                    "special token id {id} is outside the vocabulary (vocab_size {})",
                    config.vocab_size
                )));
            }
        }
        Ok(config)
    }

    fn token_id(&self, n: &serde_json::Number, field: &str) -> Result<u32> {
        n.as_u64()
            .and_then(|v| u32::try_from(v).ok())
            .ok_or_else(|| self.fail(format!("`{field}` must be a non-negative integer, got {n}")))
    }

    fn yarn(&self, v: &Value) -> Result<Option<Yarn>> {
        if v.is_null() {
            return Ok(None);
        }
        let kind = v
            .get("type")
            .or_else(|| v.get("rope_type"))
            .and_then(Value::as_str)
            .ok_or_else(|| self.fail("`rope_scaling` needs a `type`"))?;
        if kind != "yarn" {
            return Err(self.fail(format!(
                "`rope_scaling.type` \"{kind}\" is not supported (only \"yarn\")"
            )));
        }
        let num = |key: &str, default: Option<f64>| -> Result<f64> {
            match v.get(key) {
                Some(x) => x
                    .as_f64()
                    .ok_or_else(|| self.fail(format!("`rope_scaling.{key}` must be a number"))),
                None => {
                    default.ok_or_else(|| self.fail(format!("missing field `rope_scaling.{key}`")))
                }
            }
        };
        let factor = num("factor", None)?;
        if factor.is_nan() || factor < 1.0 {
            return Err(self.fail(format!("`rope_scaling.factor` must be >= 1, got {factor}")));
        }
        let original = num("original_max_position_embeddings", None)?;
        if original.is_nan() || original < 1.0 || original.fract() != 0.0 {
            return Err(self.fail(
                "`rope_scaling.original_max_position_embeddings` must be a positive integer",
            ));
        }
        Ok(Some(Yarn {
            factor,
            original_max_position_embeddings: original as usize,
            beta_fast: num("beta_fast", Some(32.0))?,
            beta_slow: num("beta_slow", Some(1.0))?,
            mscale: num("mscale", Some(1.0))?,
            mscale_all_dim: num("mscale_all_dim", Some(0.0))?,
        }))
    }

    fn quantization(&self, v: &Value) -> Result<Fp8Quantization> {
        let method = v.get("quant_method").and_then(Value::as_str).unwrap_or("");
        if method != "fp8" {
            return Err(self.fail(format!(
                "`quantization_config.quant_method` \"{method}\" is not supported (only \"fp8\")"
            )));
        }
        if let Some(fmt) = v.get("fmt").and_then(Value::as_str) {
            if fmt != "e4m3" {
                return Err(self.fail(format!(
                    "`quantization_config.fmt` \"{fmt}\" is not supported (only \"e4m3\")"
                )));
            }
        }
        let block = match v.get("weight_block_size") {
            Some(Value::Array(b)) if b.len() == 2 => [b[0].as_u64(), b[1].as_u64()],
            _ => [None, None],
        };
        let block = match block {
            [Some(128), Some(128)] => [128, 128],
            _ => {
                return Err(self.fail(
                    "`quantization_config.weight_block_size` must be [128, 128] (the block the FP8 kernels use)",
                ))
            }
        };
        let activation_scheme = v
            .get("activation_scheme")
            .and_then(Value::as_str)
            .unwrap_or("dynamic")
            .to_string();
        if activation_scheme != "dynamic" {
            return Err(self.fail(format!(
                "`quantization_config.activation_scheme` \"{activation_scheme}\" is not supported (only \"dynamic\")"
            )));
        }
        Ok(Fp8Quantization {
            block,
            activation_scheme,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The released DeepSeek-R1-0528 config.json (fields that matter here), shared with the
    /// GPU MLA tests.
    pub(crate) const R1_CONFIG: &str = include_str!("../tests/fixtures/deepseek-r1-config.json");

    fn parse(text: &str) -> Result<ModelConfig> {
        ModelConfig::from_json(text, Path::new("config.json"))
    }

    fn with(field: &str, value: &str) -> String {
        let mut v: Value = serde_json::from_str(R1_CONFIG).unwrap();
        v[field] = serde_json::from_str(value).unwrap();
        v.to_string()
    }

    #[test]
    fn parses_r1() {
        let c = parse(R1_CONFIG).unwrap();
        assert_eq!(c.kv_cache_width(), 576);
        assert_eq!(c.head_dim_qk(), 192);
        assert!(!c.is_moe_layer(2) && c.is_moe_layer(3) && c.is_moe_layer(61));
        // 192^-0.5 * (0.1 ln 40 + 1)^2
        let m = 0.1 * 40f64.ln() + 1.0;
        assert!((c.softmax_scale() as f64 - m * m / 192f64.sqrt()).abs() < 1e-6);
        assert_eq!(c.rope_attention_factor(), 1.0);
        let f = c.rope_inv_freq();
        assert_eq!(f.len(), 32);
        // Highest frequency is extrapolated (unchanged), lowest interpolated by 1/factor.
        assert_eq!(f[0], 1.0);
        let last = 1.0 / 10000f64.powf(62.0 / 64.0) / 40.0;
        assert!((f[31] as f64 - last).abs() < 1e-12);
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (with("num_key_value_heads", "64"), "num_key_value_heads"),
            (with("topk_group", "9"), "topk_group"),
            (with("scoring_func", "\"softmax\""), "scoring_func"),
            (with("qk_rope_head_dim", "63"), "qk_rope_head_dim"),
            (
                with("rope_scaling", r#"{"type":"linear","factor":2}"#),
                "rope_scaling.type",
            ),
            (with("eos_token_id", "200000"), "outside the vocabulary"),
            (with("hidden_size", "null"), "hidden_size"),
            (
                with(
                    "quantization_config",
                    r#"{"quant_method":"fp8","weight_block_size":[64,64]}"#,
                ),
                "weight_block_size",
            ),
            (
                with("num_nextn_predict_layers", "2"),
                "num_nextn_predict_layers",
            ),
        ];
        for (text, needle) in cases {
            let err = parse(&text).unwrap_err().to_string();
            assert!(err.contains(needle), "{needle}: {err}");
        }
        let err = parse("{ not json").unwrap_err().to_string();
        assert!(err.contains("not valid JSON"), "{err}");
    }
}
