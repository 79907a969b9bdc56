//! Routed experts on the CPU: noaux_tc routing, then each expert's MLP over the tokens it got.

use crate::backend::Precision;
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::model::weights::{MlpWeights, ModelWeights, Weight};
use crate::numerics::{round_bf16, sigmoid, silu};

use super::linear::{dot, linear};

/// Routing hyper-parameters from config.json.
#[derive(Debug, Clone)]
pub struct Router {
    pub n_experts: usize,
    pub n_group: usize,
    pub topk_group: usize,
    pub top_k: usize,
    pub normalize: bool,
    pub scaling: f32,
}

impl Router {
    pub fn new(cfg: &ModelConfig) -> Self {
        Router {
            n_experts: cfg.n_routed_experts,
            n_group: cfg.n_group,
            topk_group: cfg.topk_group,
            top_k: cfg.num_experts_per_tok,
            normalize: cfg.norm_topk_prob,
            scaling: cfg.routed_scaling_factor,
        }
    }

    /// Chosen experts and their weights for one token's router logits. s = sigmoid(logits);
    /// choice = s + bias; a group scores the sum of its two best choices; the best
    /// `topk_group` groups stay; the `top_k` best choices among them win, weighted by
    /// s / sum(s) * scaling. Ties go to the lower index.
    pub fn route(&self, logits: &[f32], bias: &[f32]) -> Vec<(usize, f32)> {
        let scores: Vec<f32> = logits.iter().map(|&l| sigmoid(l)).collect();
        let choice: Vec<f32> = scores.iter().zip(bias).map(|(s, b)| s + b).collect();
        let per_group = self.n_experts / self.n_group;
        let group_scores: Vec<f32> = choice
            .chunks(per_group)
            .map(|g| {
                let best = top_indices(g, 2);
                best.iter().map(|&i| g[i]).sum()
            })
            .collect();
        let kept = top_indices(&group_scores, self.topk_group);
        let masked: Vec<f32> = choice
            .iter()
            .enumerate()
            .map(|(e, &c)| {
                if kept.contains(&(e / per_group)) {
                    c
                } else {
                    f32::NEG_INFINITY
                }
            })
            .collect();
        let chosen = top_indices(&masked, self.top_k);
        let total: f32 = chosen.iter().map(|&e| scores[e]).sum();
        chosen
            .into_iter()
            .map(|e| {
                let w = if self.normalize {
                    scores[e] / (total + 1e-20)
                } else {
                    scores[e]
                };
                (e, w * self.scaling)
            })
            .collect()
    }
}

/// Indices of the `k` largest values, largest first; equal values keep index order.
fn top_indices(values: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..values.len()).collect();
    idx.sort_by(|&a, &b| values[b].total_cmp(&values[a]).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

pub struct MoeCall<'a> {
    pub weights: &'a ModelWeights,
    pub router: &'a Router,
    pub router_weight: &'a Weight,
    pub bias: &'a [f32],
    pub experts: &'a [MlpWeights],
    pub hidden: usize,
    pub precision: Precision,
}

impl MoeCall<'_> {
    /// Sum over each token's chosen experts of weight * expert(x), f32 [tokens, hidden].
    pub fn run(&self, x: &[f32]) -> Result<Vec<f32>> {
        let h = self.hidden;
        let tokens = x.len() / h;
        let Weight::Dense { data: router_w, .. } = self.router_weight else {
            return Err(Error::Unsupported(
                "an FP8 MoE router (mlp.gate) weight".into(),
            ));
        };
        let mut assigned: Vec<Vec<(usize, f32)>> = vec![Vec::new(); self.experts.len()];
        for t in 0..tokens {
            let xt = &x[t * h..(t + 1) * h];
            let logits: Vec<f32> = router_w.chunks(h).map(|w| dot(xt, w)).collect();
            if logits.iter().any(|l| l.is_nan()) {
                return Err(Error::Backend {
                    backend: "cpu".into(),
                    message: format!(
                        "NaN in MoE router logits of token {t}: the hidden state diverged"
                    ),
                });
            }
            for (e, w) in self.router.route(&logits, self.bias) {
                assigned[e].push((t, w));
            }
        }
        let mut out = vec![0f32; tokens * h];
        for (expert, tokens_of) in self.experts.iter().zip(&assigned) {
            if tokens_of.is_empty() {
                continue;
            }
            let rows: Vec<f32> = tokens_of
                .iter()
                .flat_map(|&(t, _)| x[t * h..(t + 1) * h].iter().copied())
                .collect();
            let y = self.mlp(expert, &rows);
            for (r, &(t, w)) in tokens_of.iter().enumerate() {
                for (o, &v) in out[t * h..(t + 1) * h]
                    .iter_mut()
                    .zip(&y[r * h..(r + 1) * h])
                {
                    *o += w * v;
                }
            }
        }
        Ok(out)
    }

    /// down(silu(gate(x)) * up(x)) with the backend's rounding between steps.
    fn mlp(&self, w: &MlpWeights, x: &[f32]) -> Vec<f32> {
        let round = |mut v: Vec<f32>| {
            if self.precision == Precision::W8a8 {
                v.iter_mut().for_each(|x| *x = round_bf16(*x));
            }
            v
        };
        let gate = round(linear(x, self.weights.get(w.gate), self.precision));
        let up = round(linear(x, self.weights.get(w.up), self.precision));
        let act = round(gate.iter().zip(&up).map(|(&g, &u)| silu(g) * u).collect());
        round(linear(&act, self.weights.get(w.down), self.precision))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router() -> Router {
        Router {
            n_experts: 8,
            n_group: 4,
            topk_group: 2,
            top_k: 2,
            normalize: true,
            scaling: 2.5,
        }
    }

    #[test]
    fn routes_within_the_best_groups() {
        // Groups: {0,1} {2,3} {4,5} {6,7}; expert 7 alone is strongest but its group's top-2
        // sum loses to groups {0,1} and {4,5}.
        let logits = [2.0, 1.4, -3.0, -3.0, 1.5, 1.6, -3.0, 3.0];
        let bias = [0.0; 8];
        let r = router().route(&logits, &bias);
        let experts: Vec<usize> = r.iter().map(|&(e, _)| e).collect();
        assert_eq!(experts, vec![0, 5]);
        let (s0, s5) = (sigmoid(2.0), sigmoid(1.6));
        assert!((r[0].1 - s0 / (s0 + s5) * 2.5).abs() < 1e-6);
    }

    #[test]
    fn bias_changes_choice_not_weights() {
        let logits = [0.0; 8];
        let mut bias = [0.0; 8];
        bias[5] = 0.3;
        bias[4] = 0.2;
        let r = router().route(&logits, &bias);
        assert_eq!(r.iter().map(|&(e, _)| e).collect::<Vec<_>>(), vec![5, 4]);
        assert!(r.iter().all(|&(_, w)| (w - 1.25).abs() < 1e-6), "{r:?}");
    }

    #[test]
    fn ties_pick_the_lowest_index() {
        let r = router().route(&[0.5; 8], &[0.0; 8]);
        assert_eq!(r.iter().map(|&(e, _)| e).collect::<Vec<_>>(), vec![0, 1]);
    }
}
