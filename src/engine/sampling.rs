//! Choosing the next token from f32 logits: greedy, or temperature with top-k / top-p; and
//! when to stop.

/// Sampling settings; `temperature == 0` is greedy.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    pub temperature: f32,
    /// Keep the `top_k` most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `top_p` (1.0: all).
    pub top_p: f32,
    pub seed: u64,
    /// Keep generating past eos (benchmarks), as vLLM's `ignore_eos`.
    pub ignore_eos: bool,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
            ignore_eos: false,
        }
    }
}

impl SamplingParams {
    pub fn validate(&self) -> Result<(), String> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(format!(
                "temperature must be >= 0, got {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        Ok(())
    }
}

/// Index of the largest logit (the lowest index among equals).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// A small deterministic generator (SplitMix64) so a seed reproduces a sample on any machine.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    /// The next 64 bits of the SplitMix64 sequence.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1): the top 53 bits of [`Rng::next_u64`].
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The distribution sampling draws from: softmax(logits / T) restricted by top-k and top-p,
/// renormalized, as (token, probability) pairs in descending probability.
///
/// Only the part of the vocabulary that can be kept is sorted: the top k, or for top-p a
/// growing prefix (selected in linear time) until it holds the requested mass; a full sort of
/// a 129K vocabulary per token would cost milliseconds.
pub fn distribution(logits: &[f32], p: &SamplingParams) -> Vec<(u32, f64)> {
    let n = logits.len();
    let order = |a: &u32, b: &u32| {
        logits[*b as usize]
            .total_cmp(&logits[*a as usize])
            .then(a.cmp(b))
    };
    let max = logits[argmax(logits) as usize] as f64;
    let t = p.temperature as f64;
    let weight = |i: u32| ((logits[i as usize] as f64 - max) / t).exp();
    let mut idx: Vec<u32> = (0..n as u32).collect();
    let limit = if p.top_k > 0 { p.top_k.min(n) } else { n };
    // Softmax normalizer: over the top k, or over the whole vocabulary.
    let mut total = None;
    // With top-p < 1 the kept set is usually a small head of the vocabulary: try a prefix.
    let mut m = if p.top_k > 0 || p.top_p >= 1.0 {
        limit
    } else {
        256.min(n)
    };
    loop {
        if m < n {
            idx.select_nth_unstable_by(m - 1, order);
        }
        idx[..m].sort_unstable_by(order);
        let total = *total.get_or_insert_with(|| {
            if p.top_k > 0 {
                idx[..limit].iter().map(|&i| weight(i)).sum::<f64>()
            } else {
                (0..n as u32).map(weight).sum::<f64>()
            }
        });
        let mut out = Vec::new();
        let mut mass = 0.0;
        for &i in &idx[..m] {
            let q = weight(i) / total;
            out.push((i, q));
            mass += q;
            if mass >= p.top_p as f64 {
                break;
            }
        }
        if mass >= p.top_p as f64 || m >= limit {
            let kept: f64 = out.iter().map(|(_, q)| q).sum();
            out.iter_mut().for_each(|(_, q)| *q /= kept);
            return out;
        }
        m = (m * 8).min(limit);
    }
}

/// The distribution to draw from, in the cheapest form: with neither top-k nor top-p every
/// token is kept, so the softmax is returned in token order without sorting; otherwise
/// [`distribution`]. Probabilities sum to 1.
pub fn sampling_distribution(logits: &[f32], p: &SamplingParams) -> Vec<(u32, f64)> {
    if p.top_k > 0 || p.top_p < 1.0 {
        return distribution(logits, p);
    }
    let max = logits[argmax(logits) as usize] as f64;
    let t = p.temperature as f64;
    let mut out: Vec<(u32, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, ((l as f64 - max) / t).exp()))
        .collect();
    let total: f64 = out.iter().map(|(_, w)| w).sum();
    out.iter_mut().for_each(|(_, w)| *w /= total);
    out
}

/// One draw from `dist` ((token, probability) pairs summing to 1).
pub fn pick(dist: &[(u32, f64)], rng: &mut Rng) -> u32 {
    let mut u = rng.next_f64();
    for &(tok, q) in dist {
        if u < q {
            return tok;
        }
        u -= q;
    }
    dist[dist.len() - 1].0
}

pub fn sample(logits: &[f32], p: &SamplingParams, rng: &mut Rng) -> u32 {
    if p.temperature == 0.0 {
        return argmax(logits);
    }
    pick(&sampling_distribution(logits, p), rng)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SplitMix64's published sequence for seed 0; next_f64 is the top 53 bits of next_u64.
    #[test]
    fn generator_is_splitmix64() {
        let mut rng = Rng::new(0);
        assert_eq!(rng.next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(rng.next_u64(), 0x6E78_9E6A_A1B9_65F4);
        let (mut a, mut b) = (Rng::new(7), Rng::new(7));
        for _ in 0..100 {
            assert_eq!(
                a.next_f64(),
                (b.next_u64() >> 11) as f64 / (1u64 << 53) as f64
            );
        }
        assert_eq!(Rng::new(7).next_f64(), 0.3898297483912715);
    }

    #[test]
    fn greedy_takes_first_maximum() {
        assert_eq!(argmax(&[0.0, 3.0, 3.0, 1.0]), 1);
    }

    #[test]
    fn top_k_and_top_p_restrict() {
        let logits = [1.0, 4.0, 3.0, 2.0];
        let p = SamplingParams {
            temperature: 1.0,
            top_k: 2,
            ..Default::default()
        };
        let d = distribution(&logits, &p);
        assert_eq!(d.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 2]);
        let p = SamplingParams {
            temperature: 1.0,
            top_p: 0.5,
            ..Default::default()
        };
        assert_eq!(
            distribution(&logits, &p).len(),
            1,
            "token 1 alone has > 50%"
        );
    }

    /// Empirical frequencies over many draws match the distribution.
    #[test]
    fn samples_follow_the_distribution() {
        let logits = [0.0, 1.0, 2.0];
        let p = SamplingParams {
            temperature: 1.0,
            ..Default::default()
        };
        let want = distribution(&logits, &p);
        let mut rng = Rng::new(7);
        let mut counts = [0usize; 3];
        let n = 100_000;
        for _ in 0..n {
            counts[sample(&logits, &p, &mut rng) as usize] += 1;
        }
        for (tok, q) in want {
            let f = counts[tok as usize] as f64 / n as f64;
            assert!((f - q).abs() < 0.01, "token {tok}: {f} vs {q}");
        }
    }
}
