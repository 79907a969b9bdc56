//! MTP speculative decoding: greedy output equals plain greedy output, and the accept/rollback
//! logic counts exactly with scripted drafters.

mod common;

use common::*;
use r1_runtime::engine::sampling::SamplingParams;
use r1_runtime::engine::speculative::{DraftRequest, Drafter, MtpDrafter, Verified};
use r1_runtime::engine::{Engine, EngineOptions, Readback, Sequence, Step};
use r1_runtime::Result;

fn engine(name: &str) -> Engine {
    Engine::load(&fixture(name), &EngineOptions::default()).unwrap()
}

/// Greedy, past eos, so every run has the same length.
fn greedy() -> SamplingParams {
    SamplingParams {
        ignore_eos: true,
        ..SamplingParams::default()
    }
}

#[test]
fn mtp_speculation_is_token_identical_under_greedy() {
    for (name, _) in FIXTURES {
        let r = reference(name);
        let mut e = engine(name);
        let max_new = 16;
        let plain = e.generate(&r.tokens, max_new, &greedy()).unwrap();
        for k in 1..=3 {
            let (spec, stats) = e
                .generate_speculative(&r.tokens, max_new, &greedy(), &mut MtpDrafter, k)
                .unwrap();
            assert_eq!(spec.tokens, plain.tokens, "{name} k={k}");
            assert!(stats.accepted <= stats.drafted);
            assert_eq!(
                stats.steps + stats.accepted + 1,
                max_new,
                "{name} k={k}: every step emits accepted + 1"
            );
            println!(
                "{name} k={k}: {} steps, {} drafted, {} accepted ({:.0}%)",
                stats.steps,
                stats.drafted,
                stats.accepted,
                100.0 * stats.accepted as f64 / stats.drafted.max(1) as f64
            );
        }
        assert_eq!(e.cache_pages_in_use(), 0, "all pages returned");
    }
}

#[derive(Clone, Copy)]
enum Script {
    Right,
    Wrong,
    /// First draft of each step right, the rest wrong.
    FirstRight,
}

/// Drafts from the known greedy continuation.
struct Scripted {
    truth: Vec<u32>,
    prompt_len: usize,
    vocab: u32,
    script: Script,
    calls_with_drafts: usize,
}

impl Scripted {
    /// Up to `k` drafts after the verified tokens, right or wrong as scripted.
    fn drafts(&mut self, v: &Verified<'_>, k: usize) -> Vec<u32> {
        self.calls_with_drafts += (k > 0) as usize;
        // The last verified token sits at position first_pos + len; drafts follow it.
        let next_pos = v.first_pos + v.next_tokens.len() + 1;
        (0..k)
            .map(|i| {
                let truth = self.truth[next_pos + i - self.prompt_len];
                let right = match self.script {
                    Script::Right => true,
                    Script::Wrong => false,
                    Script::FirstRight => i == 0,
                };
                if right {
                    truth
                } else {
                    (truth + 1) % self.vocab
                }
            })
            .collect()
    }
}

impl Drafter for Scripted {
    fn propose(
        &mut self,
        _: &mut Engine,
        requests: &mut [DraftRequest<'_>],
    ) -> Result<Vec<Vec<u32>>> {
        Ok(requests
            .iter()
            .map(|r| self.drafts(&r.verified, r.budget))
            .collect())
    }
}

#[test]
fn scripted_drafters_accept_and_roll_back_exactly() {
    let name = "small-odd";
    let r = reference(name);
    let mut e = engine(name);
    let max_new = 14;
    let truth = e.generate(&r.tokens, max_new, &greedy()).unwrap().tokens;
    for script in [Script::Right, Script::Wrong, Script::FirstRight] {
        for k in 1..=3 {
            let mut d = Scripted {
                truth: truth.clone(),
                prompt_len: r.tokens.len(),
                vocab: r.vocab as u32,
                script,
                calls_with_drafts: 0,
            };
            let (g, s) = e
                .generate_speculative(&r.tokens, max_new, &greedy(), &mut d, k)
                .unwrap();
            assert_eq!(g.tokens, truth, "k={k}");
            match script {
                Script::Right => assert_eq!(s.accepted, s.drafted, "k={k}"),
                Script::Wrong => assert_eq!(s.accepted, 0, "k={k}"),
                Script::FirstRight => assert_eq!(s.accepted, d.calls_with_drafts, "k={k}"),
            }
            assert_eq!(e.cache_pages_in_use(), 0);
        }
    }
}

/// A batch whose sequences accept different numbers of drafts in the same verify steps gives
/// each sequence exactly its own greedy output.
#[test]
fn mixed_batch_speculation_matches_each_sequence_alone() {
    let name = "r1-heads";
    let r = reference(name);
    let mut e = engine(name);
    let max_new = 10;
    let prompts: Vec<Vec<u32>> = vec![
        r.tokens.clone(),
        r.tokens[..7].to_vec(),
        r.tokens[3..].to_vec(),
    ];
    let truths: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| e.generate(p, max_new, &greedy()).unwrap().tokens)
        .collect();
    // Sequence 0 always right, 1 always wrong, 2 first-right: mixed acceptance every step.
    struct PerSequence(Vec<Scripted>);
    impl Drafter for PerSequence {
        fn propose(
            &mut self,
            _: &mut Engine,
            requests: &mut [DraftRequest<'_>],
        ) -> Result<Vec<Vec<u32>>> {
            Ok(requests
                .iter()
                .map(|r| self.0[r.verified.index].drafts(&r.verified, r.budget))
                .collect())
        }
    }
    let scripts = [Script::Right, Script::Wrong, Script::FirstRight];
    let mut drafter = PerSequence(
        prompts
            .iter()
            .zip(&truths)
            .zip(scripts)
            .map(|((p, t), script)| Scripted {
                truth: t.clone(),
                prompt_len: p.len(),
                vocab: r.vocab as u32,
                script,
                calls_with_drafts: 0,
            })
            .collect(),
    );
    let refs: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
    let out = e
        .generate_speculative_batch(&refs, max_new, &greedy(), &mut drafter, 3)
        .unwrap();
    for (i, ((g, s), truth)) in out.iter().zip(&truths).enumerate() {
        assert_eq!(&g.tokens, truth, "sequence {i}");
        match scripts[i] {
            Script::Right => assert_eq!(s.accepted, s.drafted),
            Script::Wrong => assert_eq!(s.accepted, 0),
            Script::FirstRight => assert_eq!(s.accepted, drafter.0[i].calls_with_drafts),
        }
    }
    // And with the real MTP drafter, mixed batch == alone.
    let out = e
        .generate_speculative_batch(&refs, max_new, &greedy(), &mut MtpDrafter, 2)
        .unwrap();
    for ((g, _), truth) in out.iter().zip(&truths) {
        assert_eq!(&g.tokens, truth);
    }
    assert_eq!(e.cache_pages_in_use(), 0);
}

/// The MTP drafter proposes the same tokens for a sequence whether it drafts alone or in a
/// batch with others of different lengths (k = 3 chains on the layer's own states).
#[test]
fn mtp_drafts_are_the_same_batched_or_alone() {
    let r = reference("r1-heads");
    let mut e = engine("r1-heads");
    let prompts = [r.tokens.clone(), r.tokens[..7].to_vec()];
    let mut seqs: Vec<Sequence> = prompts.iter().map(|_| Sequence::default()).collect();
    let mut verified_inputs = Vec::new();
    let sampling = greedy();
    for (seq, p) in seqs.iter_mut().zip(&prompts) {
        let reads = [Readback::sample(1, &sampling)];
        let mut step = [Step { seq, tokens: p }];
        let out = e
            .forward_batch_with(&mut step, &reads, true)
            .unwrap()
            .remove(0);
        let next: Vec<u32> = p[1..].iter().copied().chain(out.tokens).collect();
        verified_inputs.push((next, out.hidden));
    }
    let propose = |e: &mut Engine, seqs: &mut [Sequence], which: &[usize]| -> Vec<Vec<u32>> {
        let mut requests: Vec<DraftRequest> = seqs
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| which.contains(i))
            .map(|(i, seq)| DraftRequest {
                seq,
                verified: Verified {
                    index: i,
                    first_pos: 0,
                    next_tokens: &verified_inputs[i].0,
                    hidden: &verified_inputs[i].1,
                },
                budget: 3,
                sampling: &sampling,
            })
            .collect();
        MtpDrafter.propose(e, &mut requests).unwrap()
    };
    let alone: Vec<Vec<u32>> = (0..2)
        .map(|i| propose(&mut e, &mut seqs, &[i]).remove(0))
        .collect();
    let together = propose(&mut e, &mut seqs, &[0, 1]);
    assert_eq!(together, alone);
    assert!(alone.iter().all(|d| d.len() == 3));
    for seq in &mut seqs {
        assert_eq!(
            seq.mtp_len(),
            seq.len(),
            "provisional draft entries rolled back"
        );
        e.release(seq);
    }
}
