//! Routed experts on the CPU: noaux_tc routing, then each expert's MLP over the tokens it got.

use crate::backend::Precision;
use crate::error::{Error, Result};
use crate::model::weights::{MlpWeights, ModelWeights, Weight};
use crate::numerics::routing::Router;
use crate::numerics::{dot, round_bf16, silu};

use super::linear::linear;

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
