//! DeepSeek-V3's noaux_tc expert routing, the rule every backend's router follows: the CPU
//! backend calls it per token and the GPU router kernel is checked against it bit for bit.

use super::sigmoid;

/// Routing hyper-parameters (config.json's `n_routed_experts`, `n_group`, `topk_group`,
/// `num_experts_per_tok`, `norm_topk_prob`, `routed_scaling_factor`).
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
