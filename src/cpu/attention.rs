//! Multi-head latent attention on the CPU, in the absorbed form DeepSeek decodes with:
//! q_nope · W_UK gives a latent query scored directly against the cached c_kv, and the
//! attention-weighted latent is mapped back per head by W_UV.

use rayon::prelude::*;

use crate::backend::Precision;
use crate::config::ModelConfig;
use crate::kv_cache::{slot, Batch, PAGE_TOKENS};
use crate::numerics::{dot, round_bf16};

/// cos/sin of every rotated pair at a position, YaRN-corrected.
pub struct Rope {
    inv_freq: Vec<f32>,
    attention_factor: f32,
}

impl Rope {
    pub fn new(cfg: &ModelConfig) -> Self {
        Rope {
            inv_freq: cfg.rope_inv_freq(),
            attention_factor: cfg.rope_attention_factor(),
        }
    }

    /// Rotates interleaved pairs (x[2i], x[2i+1]) by position * inv_freq[i], the layout of the
    /// official weights. Scores only need q and k in the same order, so values stay in place.
    pub fn apply(&self, x: &mut [f32], pos: usize) {
        for (pair, &f) in x.chunks_exact_mut(2).zip(&self.inv_freq) {
            let angle = pos as f32 * f;
            let (cos, sin) = (
                angle.cos() * self.attention_factor,
                angle.sin() * self.attention_factor,
            );
            let (a, b) = (pair[0], pair[1]);
            pair[0] = a * cos - b * sin;
            pair[1] = b * cos + a * sin;
        }
    }
}

/// One layer's latent cache pages: [block][PAGE_TOKENS][kv_lora + rope] f32.
#[derive(Default)]
pub struct LayerCache {
    pub data: Vec<f32>,
}

/// kv_b_proj dequantized once for absorption: rows h*(nope+v) .. +nope are W_UK of head h,
/// the next v rows W_UV, each row `kv_lora` wide.
pub struct Absorbed {
    pub kv_b: Vec<f32>,
}

pub struct MlaShape {
    pub heads: usize,
    pub nope: usize,
    pub rope: usize,
    pub v: usize,
    pub kv_lora: usize,
    pub scale: f32,
    /// eps of kv_a_layernorm, the norm of the cached latent.
    pub latent_norm_eps: f32,
}

impl MlaShape {
    pub fn new(cfg: &ModelConfig) -> Self {
        MlaShape {
            heads: cfg.num_attention_heads,
            nope: cfg.qk_nope_head_dim,
            rope: cfg.qk_rope_head_dim,
            v: cfg.v_head_dim,
            kv_lora: cfg.kv_lora_rank,
            scale: cfg.softmax_scale(),
            latent_norm_eps: cfg.rms_norm_eps,
        }
    }

    fn width(&self) -> usize {
        self.kv_lora + self.rope
    }
}

/// Writes [rmsnorm(c_kv) * norm | rope(k_pe)] of every token at its position.
pub fn cache_write(
    cache: &mut LayerCache,
    shape: &MlaShape,
    rope: &Rope,
    batch: &Batch,
    kv: &[f32],
    norm: &[f32],
    precision: Precision,
) {
    let width = shape.width();
    for (t, (s, pos)) in batch.token_positions().into_iter().enumerate() {
        let (block, off) = slot(&batch.segments[s].blocks, pos);
        let dst = &mut cache.data[(block as usize * PAGE_TOKENS + off) * width..][..width];
        let src = &kv[t * width..(t + 1) * width];
        super::rms_norm_row(
            &src[..shape.kv_lora],
            norm,
            shape.latent_norm_eps,
            &mut dst[..shape.kv_lora],
        );
        dst[shape.kv_lora..].copy_from_slice(&src[shape.kv_lora..]);
        rope.apply(&mut dst[shape.kv_lora..], pos);
        if precision == Precision::W8a8 {
            dst.iter_mut().for_each(|v| *v = round_bf16(*v));
        }
    }
}

/// Attention of every token of the batch over its sequence's cached positions <= its own.
/// `q` is [tokens, heads*(nope+rope)]; returns [tokens, heads*v].
pub fn attention(
    cache: &LayerCache,
    shape: &MlaShape,
    rope: &Rope,
    absorbed: &Absorbed,
    batch: &Batch,
    q: &[f32],
    precision: Precision,
) -> Vec<f32> {
    let (heads, qk, width) = (shape.heads, shape.nope + shape.rope, shape.width());
    let round = |x: f32| match precision {
        Precision::Exact => x,
        Precision::W8a8 => round_bf16(x),
    };
    let positions = batch.token_positions();
    let mut out = vec![0f32; positions.len() * heads * shape.v];
    out.par_chunks_mut(shape.v)
        .enumerate()
        .for_each(|(task, out)| {
            let (t, h) = (task / heads, task % heads);
            let (s, pos) = positions[t];
            let blocks = &batch.segments[s].blocks;
            let qh = &q[(t * heads + h) * qk..][..qk];
            let w_uk = &absorbed.kv_b[h * (shape.nope + shape.v) * shape.kv_lora..];
            let w_uv = &w_uk[shape.nope * shape.kv_lora..];
            // Latent query: q_nope (nope) x W_UK (nope x kv_lora).
            let mut q_lat = vec![0f32; shape.kv_lora];
            for (i, &qv) in qh[..shape.nope].iter().enumerate() {
                for (l, &w) in q_lat
                    .iter_mut()
                    .zip(&w_uk[i * shape.kv_lora..][..shape.kv_lora])
                {
                    *l += qv * w;
                }
            }
            q_lat.iter_mut().for_each(|v| *v = round(*v));
            let mut q_pe = qh[shape.nope..].to_vec();
            rope.apply(&mut q_pe, pos);
            q_pe.iter_mut().for_each(|v| *v = round(*v));

            let entry = |j: usize| {
                let (block, off) = slot(blocks, j);
                &cache.data[(block as usize * PAGE_TOKENS + off) * width..][..width]
            };
            let mut scores: Vec<f32> = (0..=pos)
                .map(|j| {
                    let e = entry(j);
                    (dot(&q_lat, &e[..shape.kv_lora]) + dot(&q_pe, &e[shape.kv_lora..]))
                        * shape.scale
                })
                .collect();
            let max = scores.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            let mut sum = 0f32;
            for v in scores.iter_mut() {
                *v = (*v - max).exp();
                sum += *v;
            }
            let mut o_lat = vec![0f32; shape.kv_lora];
            for (j, p) in scores.iter().enumerate() {
                let p = p / sum;
                for (o, &c) in o_lat.iter_mut().zip(&entry(j)[..shape.kv_lora]) {
                    *o += p * c;
                }
            }
            o_lat.iter_mut().for_each(|v| *v = round(*v));
            for (d, o) in out.iter_mut().enumerate() {
                *o = dot(&o_lat, &w_uv[d * shape.kv_lora..][..shape.kv_lora]);
            }
        });
    out
}
