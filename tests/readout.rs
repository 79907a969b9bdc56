//! The backend boundary: a step reads back drawn tokens, logits rows and hidden states only as
//! asked, draws follow the shared sampling rule at the drawn token's position, and sampled
//! speculation emits exactly what plain sampled decoding emits for the same seed.

mod common;

use common::*;
use r1_runtime::engine::sampling::SamplingParams;
use r1_runtime::engine::speculative::MtpDrafter;
use r1_runtime::engine::{Engine, EngineOptions, Readback, Sequence, Step};
use r1_runtime::numerics::sampling::draw;

fn engine(name: &str) -> Engine {
    Engine::load(&fixture(name), &EngineOptions::default()).unwrap()
}

fn sampled(seed: u64) -> SamplingParams {
    SamplingParams {
        temperature: 0.9,
        top_p: 0.95,
        top_k: 40,
        seed,
        ignore_eos: true,
    }
}

/// Tokens drawn on the backend are the shared rule applied to the same step's logits, with the
/// drawn token's position as the counter; nothing else comes back unless asked.
#[test]
fn draws_follow_the_rule_at_the_drawn_position() {
    let r = reference("r1-heads");
    let mut e = engine("r1-heads");
    let p = sampled(7);
    let prompts = [&r.tokens[..], &r.tokens[..5]];
    let mut seqs: Vec<Sequence> = prompts.iter().map(|_| Sequence::default()).collect();
    let mut steps: Vec<Step> = seqs
        .iter_mut()
        .zip(prompts)
        .map(|(seq, tokens)| Step { seq, tokens })
        .collect();
    let reads = [
        Readback {
            rows: 3,
            sample: Some(&p),
            logits: true,
        },
        Readback::sample(1, &p),
    ];
    let out = e.forward_batch_with(&mut steps, &reads, false).unwrap();
    let vocab = r.vocab;
    assert_eq!(out[0].tokens.len(), 3);
    assert_eq!(out[0].logits.len(), 3 * vocab);
    assert!(out[0].hidden.is_empty() && out[1].hidden.is_empty());
    assert!(out[1].logits.is_empty());
    for (j, row) in out[0].logits.chunks(vocab).enumerate() {
        // Row j is token position len - 3 + j; it draws the token at the position after it.
        let position = r.tokens.len() - 3 + j + 1;
        assert_eq!(
            out[0].tokens[j],
            draw(row, &p.draw(position as u64)),
            "row {j}"
        );
    }
    for seq in &mut seqs {
        e.release(seq);
    }
    // The same prompt alone, its logits asked: the second sequence's draw again.
    let mut seq = Sequence::default();
    let alone = e
        .forward_batch_with(
            &mut [Step {
                seq: &mut seq,
                tokens: &r.tokens[..5],
            }],
            &[Readback {
                rows: 1,
                sample: Some(&p),
                logits: true,
            }],
            true,
        )
        .unwrap()
        .remove(0);
    assert_eq!(alone.tokens, out[1].tokens);
    assert_eq!(alone.tokens[0], draw(&alone.logits, &p.draw(5)));
    assert_eq!(alone.hidden.len(), 5 * e.config().hidden_size);
    e.release(&mut seq);
    assert_eq!(e.cache_pages_in_use(), 0);
}

/// A step that reads back nothing (a prefill chunk) returns empty results and still advances
/// the sequence.
#[test]
fn a_step_reads_back_only_what_it_asks() {
    let r = reference("r1-heads");
    let mut e = engine("r1-heads");
    let mut seq = Sequence::default();
    let out = e
        .forward_batch_with(
            &mut [Step {
                seq: &mut seq,
                tokens: &r.tokens[..4],
            }],
            &[Readback::default()],
            false,
        )
        .unwrap();
    assert!(out[0].tokens.is_empty() && out[0].logits.is_empty() && out[0].hidden.is_empty());
    assert_eq!(seq.len(), 4);
    e.release(&mut seq);
}

/// Each emitted token is the main model's own draw at its position, so sampled speculation
/// (any number of drafts, the real MTP drafter) emits what plain sampled decoding emits.
#[test]
fn sampled_speculation_is_token_identical_to_plain_sampling() {
    for (name, _) in FIXTURES {
        let r = reference(name);
        let mut e = engine(name);
        for seed in 0..3 {
            let p = sampled(seed);
            let plain = e.generate(&r.tokens, 12, &p).unwrap();
            for k in 1..=3 {
                let (spec, stats) = e
                    .generate_speculative(&r.tokens, 12, &p, &mut MtpDrafter, k)
                    .unwrap();
                assert_eq!(spec.tokens, plain.tokens, "{name} seed {seed} k={k}");
                assert!(stats.accepted <= stats.drafted);
            }
        }
        assert_eq!(e.cache_pages_in_use(), 0);
    }
}

/// A readback per sequence, or a clear error.
#[test]
fn a_step_needs_one_readback_per_sequence() {
    let r = reference("r1-heads");
    let mut e = engine("r1-heads");
    let mut seq = Sequence::default();
    let err = e
        .forward_batch_with(
            &mut [Step {
                seq: &mut seq,
                tokens: &r.tokens[..4],
            }],
            &[],
            false,
        )
        .expect_err("no readback");
    assert!(err.to_string().contains("one per sequence"), "{err}");
    assert!(seq.is_empty());
}
