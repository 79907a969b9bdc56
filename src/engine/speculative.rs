//! Speculative decoding with DeepSeek-V3's MTP layer as the drafter.
//!
//! Each step: the drafter proposes k tokens; one main-model forward over
//! [last token, draft_1..draft_k] draws the main model's own token at each of those k + 1
//! positions, on the backend; drafts are kept while they equal those draws, and the first draw
//! that differs (or the one after the last draft) is emitted after them. Rejected positions are
//! dropped from the KV cache by shortening the sequence's length, without copying.
//!
//! A draw's randomness depends only on the request's seed and the position drawn (the shared
//! sampling rule, `numerics::sampling`), so every emitted token is exactly the main model's
//! own draw at its position: sampled output follows the target distribution and is the same,
//! token for token, as without speculation. The drafter draws with the same noise at the same
//! positions, so a drafter close to the main model agrees with it often.

use crate::error::{Error, Result};

use super::sampling::SamplingParams;
use super::{Engine, FinishReason, Generation, MtpStep, Readback, Sequence, Step};

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

/// One sequence asking for drafts: what was verified, how many drafts at most, and its
/// sampling settings.
pub struct DraftRequest<'a> {
    pub seq: &'a mut Sequence,
    pub verified: Verified<'a>,
    pub budget: usize,
    pub sampling: &'a SamplingParams,
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
    ) -> Result<Vec<Vec<u32>>>;
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
    ) -> Result<Vec<Vec<u32>>> {
        let h = engine.config().hidden_size;
        let mut drafts: Vec<Vec<u32>> = requests
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
            let reads: Vec<Readback> = active
                .iter()
                .map(|&i| Readback::sample(1, requests[i].sampling))
                .collect();
            // The layer's output states are read back only when a draft chains on them.
            let chains = active
                .iter()
                .any(|&i| drafts[i].len() + 1 < requests[i].budget);
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
            let outs = engine.mtp_forward_batch_with(&mut steps, &reads, chains)?;
            drop(steps);
            let mut next_inputs = Vec::new();
            for (&i, out) in active.iter().zip(outs) {
                let r = &mut requests[i];
                let token = *out.tokens.first().ok_or_else(|| Error::Backend {
                    backend: "engine".into(),
                    message: "an MTP step asked for a drawn token returned none".into(),
                })?;
                drafts[i].push(token);
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
    /// This sequence's settings (the batch's, with its own seed).
    sampling: SamplingParams,
    tokens: Vec<u32>,
    /// Tokens following positions `first_pos ..` and the main model's states there: what the
    /// drafter continues from.
    next_tokens: Vec<u32>,
    hidden: Vec<f32>,
    first_pos: usize,
    finish: Option<FinishReason>,
    stats: SpecStats,
    drafts: Vec<u32>,
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
                sampling: SamplingParams {
                    seed: sampling.seed.wrapping_add(i as u64),
                    ..sampling.clone()
                },
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
        let (mut steps, reads): (Vec<Step>, Vec<Readback>) = states
            .iter_mut()
            .zip(prompts)
            .map(|(st, p)| {
                let step = Step {
                    seq: &mut st.seq,
                    tokens: p,
                };
                (step, Readback::sample(1, &st.sampling))
            })
            .unzip();
        let prefilled = self.forward_batch_with(&mut steps, &reads, true)?;
        let prefill = t0.elapsed();
        let t1 = std::time::Instant::now();
        for ((st, pre), prompt) in states.iter_mut().zip(prefilled).zip(prompts) {
            let first = pre.tokens[0];
            st.tokens.push(first);
            st.next_tokens = prompt[1..].iter().copied().chain([first]).collect();
            st.hidden = pre.hidden;
            st.finish = self.stop_reason(&st.tokens, max_new_tokens, sampling);
        }
        let h = self.cfg.hidden_size;
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
                    sampling: &st.sampling,
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
                        .chain(st.drafts.iter().copied())
                        .collect()
                })
                .collect();
            let bases: Vec<usize> = active.iter().map(|st| st.seq.len()).collect();
            let (mut steps, reads): (Vec<Step>, Vec<Readback>) = active
                .iter_mut()
                .zip(&inputs)
                .map(|(st, input)| {
                    let step = Step {
                        seq: &mut st.seq,
                        tokens: input,
                    };
                    (step, Readback::sample(input.len(), &st.sampling))
                })
                .unzip();
            let verified = self.forward_batch_with(&mut steps, &reads, true)?;
            for ((st, out), base) in active.into_iter().zip(verified).zip(bases) {
                let (accepted, bonus) = judge(&st.drafts, &out.tokens);
                st.stats.steps += 1;
                st.stats.drafted += st.drafts.len();
                st.stats.accepted += accepted;
                // Keep the last token and the accepted drafts; the bonus is fed next step.
                self.truncate(&mut st.seq, base + 1 + accepted);
                st.hidden = out.hidden[..(accepted + 1) * h].to_vec();
                st.next_tokens = st.drafts[..accepted]
                    .iter()
                    .copied()
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

/// How many drafts the main model's draws at the verified positions accept (`drawn`: after
/// the last token, then after each draft, so one more than the drafts) and the token the main
/// model contributes after them.
pub(crate) fn judge(drafts: &[u32], drawn: &[u32]) -> (usize, u32) {
    let accepted = drafts.iter().zip(drawn).take_while(|(d, t)| d == t).count();
    (accepted, drawn[accepted])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drafts_are_kept_while_they_equal_the_draws() {
        assert_eq!(judge(&[5, 6, 7], &[5, 6, 9, 1]), (2, 9));
        assert_eq!(judge(&[5, 6], &[5, 6, 8]), (2, 8));
        assert_eq!(judge(&[4], &[5, 6]), (0, 5));
        assert_eq!(judge(&[], &[3]), (0, 3));
    }
}
