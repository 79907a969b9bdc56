//! Speculative decoding with DeepSeek-V3's MTP layer as the drafter.
//!
//! Each step: the drafter proposes k tokens; one main-model forward over
//! [last token, draft_1..draft_k] scores them all (s_q = k+1); the longest acceptable prefix is
//! kept (greedy: equal to the argmax; sampling: the speculative-sampling rule, so outputs follow
//! the target distribution exactly); one more token comes from the main model's own logits at
//! the first rejection (or after the last draft). Rejected positions are dropped from the KV
//! cache by shortening the sequence's length, without copying.

use crate::error::{Error, Result};
use crate::model::LogitRows;

use super::sampling::{argmax, distribution, pick, sample, Rng, SamplingParams};
use super::{Engine, FinishReason, Generation, MtpStep, Sequence, Step};

/// What the main model just verified, for the drafter to continue from: the tokens that
/// follow positions `first_pos ..` (one per position) and the main model's final-normed
/// hidden states at those positions.
pub struct Verified<'a> {
    /// The sequence's index in the batch.
    pub index: usize,
    pub first_pos: usize,
    pub next_tokens: &'a [u32],
    pub hidden: &'a [f32],
}

/// A proposed token and, when sampling, the distribution it was drawn from.
#[derive(Debug, Clone)]
pub struct Draft {
    pub token: u32,
    pub dist: Option<Vec<(u32, f64)>>,
}

/// One sequence asking for drafts: what was verified, how many drafts at most, and its
/// sampling settings and generator.
pub struct DraftRequest<'a> {
    pub seq: &'a mut Sequence,
    pub verified: Verified<'a>,
    pub budget: usize,
    pub sampling: &'a SamplingParams,
    pub rng: &'a mut Rng,
}

impl DraftRequest<'_> {
    /// Positions the main model has verified: drafts follow them.
    fn verified_len(&self) -> usize {
        self.verified.first_pos + self.verified.next_tokens.len()
    }
}

pub trait Drafter {
    /// Proposes up to `budget` tokens for each request (in order), to follow its verified
    /// tokens' last one.
    fn propose(
        &mut self,
        engine: &mut Engine,
        requests: &mut [DraftRequest<'_>],
    ) -> Result<Vec<Vec<Draft>>>;
}

/// Drafts with the checkpoint's MTP layer: its own latent cache (sharing the sequence's block
/// table), fed the main model's states for verified positions and, past the first draft, its
/// own output states (k > 1 reuses the one layer on its own output, as vLLM and SGLang do).
/// All requests draft together: one MTP forward per draft position, not per sequence.
pub struct MtpDrafter;

impl Drafter for MtpDrafter {
    fn propose(
        &mut self,
        engine: &mut Engine,
        requests: &mut [DraftRequest<'_>],
    ) -> Result<Vec<Vec<Draft>>> {
        let h = engine.config().hidden_size;
        let mut drafts: Vec<Vec<Draft>> = requests
            .iter()
            .map(|r| Vec::with_capacity(r.budget))
            .collect();
        // The first draft comes from the verified positions; later ones chain on the layer's
        // own output state of the previous draft position.
        let mut active: Vec<usize> = (0..requests.len())
            .filter(|&i| requests[i].budget > 0)
            .collect();
        let mut inputs: Vec<(usize, Vec<u32>, Vec<f32>)> = Vec::new();
        let mut round = 0;
        while !active.is_empty() {
            let mut steps: Vec<MtpStep> = Vec::with_capacity(active.len());
            let mut input_of = inputs.iter();
            for (i, r) in requests.iter_mut().enumerate() {
                if !active.contains(&i) {
                    continue;
                }
                let verified_len = r.verified_len();
                steps.push(if round == 0 {
                    MtpStep {
                        seq: &mut *r.seq,
                        from: r.verified.first_pos,
                        next_tokens: r.verified.next_tokens,
                        hidden: r.verified.hidden,
                    }
                } else {
                    let (_, token, hidden) = input_of
                        .next()
                        .expect("one chained input per active request");
                    MtpStep {
                        seq: &mut *r.seq,
                        from: verified_len + round - 1,
                        next_tokens: token,
                        hidden,
                    }
                });
            }
            let outs = engine.mtp_forward_batch(&mut steps, LogitRows::Last)?;
            drop(steps);
            let mut next_inputs = Vec::new();
            for (&i, out) in active.iter().zip(outs) {
                let r = &mut requests[i];
                let draft = draw(&out.logits, r.sampling, r.rng);
                let token = draft.token;
                drafts[i].push(draft);
                if drafts[i].len() < r.budget {
                    next_inputs.push((i, vec![token], out.hidden[out.hidden.len() - h..].to_vec()));
                }
            }
            active = next_inputs.iter().map(|(i, _, _)| *i).collect();
            inputs = next_inputs;
            round += 1;
        }
        // Chained entries past the verified positions are provisional.
        for r in requests.iter_mut() {
            let verified_len = r.verified_len();
            engine.truncate_mtp(r.seq, verified_len);
        }
        Ok(drafts)
    }
}

fn draw(logits: &[f32], sampling: &SamplingParams, rng: &mut Rng) -> Draft {
    if sampling.temperature == 0.0 {
        return Draft {
            token: argmax(logits),
            dist: None,
        };
    }
    let dist = distribution(logits, sampling);
    let token = pick(&dist, rng);
    Draft {
        token,
        dist: Some(dist),
    }
}

fn prob(dist: &[(u32, f64)], token: u32) -> f64 {
    dist.iter()
        .find(|(t, _)| *t == token)
        .map_or(0.0, |(_, p)| *p)
}

/// The speculative-sampling rule for one draft: accept with probability min(1, p(d)/q(d));
/// on rejection return a token drawn from normalize(max(0, p - q)). `Ok(None)` = accepted.
pub fn accept_or_resample(
    target: &[(u32, f64)],
    draft_dist: &[(u32, f64)],
    draft: u32,
    rng: &mut Rng,
) -> Option<u32> {
    let (p, q) = (prob(target, draft), prob(draft_dist, draft));
    if q > 0.0 && rng.next_f64() < (p / q).min(1.0) {
        return None;
    }
    // A map, not `prob` per token: both distributions may span the whole vocabulary.
    let draft_p: std::collections::HashMap<u32, f64> = draft_dist.iter().copied().collect();
    let residual: Vec<(u32, f64)> = target
        .iter()
        .map(|&(t, pt)| (t, (pt - draft_p.get(&t).copied().unwrap_or(0.0)).max(0.0)))
        .filter(|&(_, r)| r > 0.0)
        .collect();
    let total: f64 = residual.iter().map(|(_, r)| r).sum();
    if total <= 0.0 {
        // p == q: any rejection is a rounding artifact; draw from p itself.
        return Some(pick(target, rng));
    }
    let normalized: Vec<(u32, f64)> = residual.into_iter().map(|(t, r)| (t, r / total)).collect();
    Some(pick(&normalized, rng))
}

/// Counters over a generation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpecStats {
    /// Verify steps (main-model forwards after the prefill).
    pub steps: usize,
    pub drafted: usize,
    pub accepted: usize,
}

/// One sequence's speculative-decoding state between steps.
struct Speculating {
    index: usize,
    seq: Sequence,
    rng: Rng,
    tokens: Vec<u32>,
    /// Tokens following positions `first_pos ..` and the main model's states there: what the
    /// drafter continues from.
    next_tokens: Vec<u32>,
    hidden: Vec<f32>,
    first_pos: usize,
    finish: Option<FinishReason>,
    stats: SpecStats,
    drafts: Vec<Draft>,
}

impl Engine {
    /// Generation with speculative decoding: up to `draft_tokens` drafts per step from
    /// `drafter`. Greedy output is token-identical to [`Engine::generate`]; sampled output
    /// follows the same distribution.
    pub fn generate_speculative(
        &mut self,
        prompt: &[u32],
        max_new_tokens: usize,
        sampling: &SamplingParams,
        drafter: &mut dyn Drafter,
        draft_tokens: usize,
    ) -> Result<(Generation, SpecStats)> {
        let mut out = self.generate_speculative_batch(
            &[prompt],
            max_new_tokens,
            sampling,
            drafter,
            draft_tokens,
        )?;
        Ok(out.remove(0))
    }

    /// Speculative generation for several prompts at once: each verify step is one batched
    /// forward in which every sequence carries its own number of drafts, and each sequence
    /// accepts its own prefix. Results come back in prompt order; timings are the batch's.
    pub fn generate_speculative_batch(
        &mut self,
        prompts: &[&[u32]],
        max_new_tokens: usize,
        sampling: &SamplingParams,
        drafter: &mut dyn Drafter,
        draft_tokens: usize,
    ) -> Result<Vec<(Generation, SpecStats)>> {
        if draft_tokens == 0 {
            return Err(Error::Input("--draft-tokens must be at least 1".into()));
        }
        for prompt in prompts {
            self.check_generation(prompt, max_new_tokens, sampling)?;
        }
        let mut states: Vec<Speculating> = prompts
            .iter()
            .enumerate()
            .map(|(i, _)| Speculating {
                index: i,
                seq: Sequence::default(),
                rng: Rng::new(sampling.seed.wrapping_add(i as u64)),
                tokens: Vec::new(),
                next_tokens: Vec::new(),
                hidden: Vec::new(),
                first_pos: 0,
                finish: None,
                stats: SpecStats::default(),
                drafts: Vec::new(),
            })
            .collect();
        let result = self.speculate(
            &mut states,
            prompts,
            max_new_tokens,
            sampling,
            drafter,
            draft_tokens,
        );
        for st in &mut states {
            self.release(&mut st.seq);
        }
        let (prefill, decode) = result?;
        Ok(states
            .into_iter()
            .map(|st| {
                let generation = Generation {
                    tokens: st.tokens,
                    finish_reason: st.finish.unwrap_or(FinishReason::Length),
                    prefill,
                    decode,
                    decode_steps: st.stats.steps,
                };
                (generation, st.stats)
            })
            .collect())
    }

    fn speculate(
        &mut self,
        states: &mut [Speculating],
        prompts: &[&[u32]],
        max_new_tokens: usize,
        sampling: &SamplingParams,
        drafter: &mut dyn Drafter,
        k: usize,
    ) -> Result<(std::time::Duration, std::time::Duration)> {
        let t0 = std::time::Instant::now();
        let mut steps: Vec<Step> = states
            .iter_mut()
            .zip(prompts)
            .map(|(st, p)| Step {
                seq: &mut st.seq,
                tokens: p,
            })
            .collect();
        let prefilled = self.forward_batch(&mut steps, LogitRows::Last)?;
        let prefill = t0.elapsed();
        let t1 = std::time::Instant::now();
        for ((st, pre), prompt) in states.iter_mut().zip(prefilled).zip(prompts) {
            let first = sample(&pre.logits, sampling, &mut st.rng);
            st.tokens.push(first);
            st.next_tokens = prompt[1..].iter().copied().chain([first]).collect();
            st.hidden = pre.hidden;
            st.finish = self.stop_reason(&st.tokens, max_new_tokens, sampling);
        }
        let (vocab, h) = (self.cfg.vocab_size, self.cfg.hidden_size);
        loop {
            let mut active: Vec<&mut Speculating> =
                states.iter_mut().filter(|st| st.finish.is_none()).collect();
            if active.is_empty() {
                break;
            }
            let mut requests: Vec<DraftRequest> = active
                .iter_mut()
                .map(|st| DraftRequest {
                    budget: (max_new_tokens - st.tokens.len()).saturating_sub(1).min(k),
                    verified: Verified {
                        index: st.index,
                        first_pos: st.first_pos,
                        next_tokens: &st.next_tokens,
                        hidden: &st.hidden,
                    },
                    seq: &mut st.seq,
                    sampling,
                    rng: &mut st.rng,
                })
                .collect();
            let proposed = drafter.propose(self, &mut requests)?;
            drop(requests);
            for (st, drafts) in active.iter_mut().zip(proposed) {
                st.drafts = drafts;
            }
            let inputs: Vec<Vec<u32>> = active
                .iter()
                .map(|st| {
                    let last = st.tokens[st.tokens.len() - 1];
                    std::iter::once(last)
                        .chain(st.drafts.iter().map(|d| d.token))
                        .collect()
                })
                .collect();
            let bases: Vec<usize> = active.iter().map(|st| st.seq.len()).collect();
            let mut steps: Vec<Step> = active
                .iter_mut()
                .zip(&inputs)
                .map(|(st, input)| Step {
                    seq: &mut st.seq,
                    tokens: input,
                })
                .collect();
            let verified = self.forward_batch(&mut steps, LogitRows::All)?;
            for ((st, out), base) in active.into_iter().zip(verified).zip(bases) {
                let (accepted, bonus) =
                    judge(&st.drafts, &out.logits, vocab, sampling, &mut st.rng);
                st.stats.steps += 1;
                st.stats.drafted += st.drafts.len();
                st.stats.accepted += accepted;
                // Keep the last token and the accepted drafts; the bonus is fed next step.
                self.truncate(&mut st.seq, base + 1 + accepted);
                st.hidden = out.hidden[..(accepted + 1) * h].to_vec();
                st.next_tokens = st.drafts[..accepted]
                    .iter()
                    .map(|d| d.token)
                    .chain([bonus])
                    .collect();
                st.first_pos = base;
                for i in 0..st.next_tokens.len() {
                    st.tokens.push(st.next_tokens[i]);
                    st.finish = self.stop_reason(&st.tokens, max_new_tokens, sampling);
                    if st.finish.is_some() {
                        break;
                    }
                }
            }
        }
        Ok((prefill, t1.elapsed()))
    }

    fn stop_reason(
        &self,
        tokens: &[u32],
        max_new_tokens: usize,
        sampling: &SamplingParams,
    ) -> Option<FinishReason> {
        let last = *tokens.last()?;
        if !sampling.ignore_eos && self.cfg.eos_token_ids.contains(&last) {
            Some(FinishReason::Eos)
        } else if tokens.len() >= max_new_tokens {
            Some(FinishReason::Length)
        } else {
            None
        }
    }
}

/// How many drafts the verify logits accept (rows: after the last token, then after each
/// draft) and the token the main model contributes after them.
pub(crate) fn judge(
    drafts: &[Draft],
    logits: &[f32],
    vocab: usize,
    sampling: &SamplingParams,
    rng: &mut Rng,
) -> (usize, u32) {
    for (i, d) in drafts.iter().enumerate() {
        let row = &logits[i * vocab..(i + 1) * vocab];
        let rejected_with = if sampling.temperature == 0.0 {
            Some(argmax(row)).filter(|&want| want != d.token)
        } else {
            // A drafter without a distribution proposed deterministically: q = δ(d).
            let q = d.dist.clone().unwrap_or_else(|| vec![(d.token, 1.0)]);
            accept_or_resample(&distribution(row, sampling), &q, d.token, rng)
        };
        if let Some(t) = rejected_with {
            return (i, t);
        }
    }
    let n = drafts.len();
    (
        n,
        sample(&logits[n * vocab..(n + 1) * vocab], sampling, rng),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whatever the draft distribution, the emitted token follows the target distribution.
    #[test]
    fn speculative_sampling_matches_the_target() {
        let p = vec![(0u32, 0.5), (1, 0.3), (2, 0.2)];
        let q = vec![(0u32, 0.1), (1, 0.2), (2, 0.7)];
        let mut rng = Rng::new(11);
        let n = 200_000;
        let mut counts = [0usize; 3];
        for _ in 0..n {
            let d = pick(&q, &mut rng);
            let t = accept_or_resample(&p, &q, d, &mut rng).unwrap_or(d);
            counts[t as usize] += 1;
        }
        for (t, want) in p {
            let got = counts[t as usize] as f64 / n as f64;
            assert!((got - want).abs() < 0.005, "token {t}: {got} vs {want}");
        }
    }

    #[test]
    fn identical_distributions_always_accept() {
        let p = vec![(0u32, 0.6), (1, 0.4)];
        let mut rng = Rng::new(3);
        for _ in 0..1000 {
            let d = pick(&p, &mut rng);
            assert_eq!(accept_or_resample(&p, &p, d, &mut rng), None);
        }
    }
}
