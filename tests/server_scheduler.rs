//! Continuous batching (token level, the committed r1-heads fixture): concurrent requests give
//! exactly what each gives alone, whether they join at once or mid-run and whatever the prefill
//! chunking; running streams keep decoding while a long prompt is prefilled; cancelling or
//! abandoning a request frees its cache pages.

use std::path::{Path, PathBuf};

use r1_runtime::engine::sampling::SamplingParams;
use r1_runtime::engine::scheduler::{
    Event, Finish, Request, Scheduler, SchedulerHandle, SchedulerOptions, StopReason,
};
use r1_runtime::engine::{Engine, EngineOptions};
use tokio::sync::mpsc::UnboundedReceiver;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/r1-heads")
}

fn engine() -> Engine {
    let opts = EngineOptions {
        with_mtp: false,
        ..EngineOptions::default()
    };
    Engine::load(&fixture(), &opts).expect("fixture loads")
}

/// Deterministic, varied prompts (fixture vocab is 512; avoid eos id 1).
fn prompt(i: usize, len: usize) -> Vec<u32> {
    (0..len)
        .map(|j| ((i * 131 + j * 29 + 7) % 500 + 2) as u32)
        .collect()
}

fn requests() -> Vec<Request> {
    let lens = [3, 17, 9, 40, 1, 25];
    lens.iter()
        .enumerate()
        .map(|(i, &len)| Request::new(prompt(i, len), 6 + i % 3))
        .collect()
}

/// Drains a receiver: (tokens announced by Token events, the finish).
fn collect(rx: &mut UnboundedReceiver<Event>) -> (Vec<u32>, Finish) {
    let mut tokens = Vec::new();
    loop {
        match rx.try_recv().expect("request finished with an event") {
            Event::Token { id, .. } => tokens.push(id),
            Event::Finished(f) => return (tokens, f),
            Event::Error(e) => panic!("request failed: {e}"),
        }
    }
}

fn solo(engine: &mut Engine, req: &Request) -> Vec<u32> {
    engine
        .generate(&req.prompt, req.max_tokens, &req.sampling)
        .expect("solo generation")
        .tokens
}

#[test]
fn concurrent_requests_match_solo_runs() {
    let mut e = engine();
    let reqs = requests();
    let want: Vec<Vec<u32>> = reqs.iter().map(|r| solo(&mut e, r)).collect();
    assert_eq!(e.cache_pages_in_use(), 0);
    let total: usize = want.iter().map(Vec::len).sum();
    assert!(
        total >= 2 * want.len(),
        "the fixture generates more than eos: {want:?}"
    );

    for step_tokens in [4, 16, 512] {
        let mut s = Scheduler::new(
            engine(),
            SchedulerOptions {
                step_tokens,
                ..Default::default()
            },
        );
        // Half join at once, the rest while the first ones run.
        let mut rxs = Vec::new();
        for r in &reqs[..3] {
            rxs.push(s.submit(r.clone()).unwrap().1);
        }
        for _ in 0..3 {
            s.step();
        }
        for r in &reqs[3..] {
            rxs.push(s.submit(r.clone()).unwrap().1);
            s.step();
        }
        s.run_until_idle();
        for (i, rx) in rxs.iter_mut().enumerate() {
            let (tokens, finish) = collect(rx);
            assert_eq!(
                finish.tokens, want[i],
                "request {i}, step budget {step_tokens}"
            );
            // Token events cover everything but a final eos.
            let n = if finish.reason == StopReason::Eos {
                finish.tokens.len() - 1
            } else {
                finish.tokens.len()
            };
            assert_eq!(tokens, finish.tokens[..n]);
            assert_eq!(finish.prompt_tokens, reqs[i].prompt.len());
            assert_eq!(finish.cached_tokens, 0);
        }
        assert_eq!(s.engine().cache_pages_in_use(), 0, "all pages back");
        let m = s.metrics();
        assert_eq!(m.running + m.waiting, 0);
        assert_eq!(m.requests_finished, reqs.len() as u64);
        let prompt_total: usize = reqs.iter().map(|r| r.prompt.len()).sum();
        assert_eq!(m.prompt_tokens_total, prompt_total as u64);
    }
}

#[test]
fn seeded_sampling_matches_solo_runs() {
    let mut e = engine();
    let mut reqs = requests();
    for (i, r) in reqs.iter_mut().enumerate() {
        r.sampling = SamplingParams {
            temperature: 0.8 + 0.1 * i as f32,
            top_k: if i % 2 == 0 { 40 } else { 0 },
            top_p: if i % 3 == 0 { 0.9 } else { 1.0 },
            seed: 1000 + i as u64,
            ..Default::default()
        };
    }
    let want: Vec<Vec<u32>> = reqs.iter().map(|r| solo(&mut e, r)).collect();
    let mut s = Scheduler::new(engine(), SchedulerOptions::default());
    let mut rxs: Vec<_> = reqs
        .iter()
        .map(|r| s.submit(r.clone()).unwrap().1)
        .collect();
    s.run_until_idle();
    for (i, rx) in rxs.iter_mut().enumerate() {
        assert_eq!(collect(rx).1.tokens, want[i], "request {i}");
    }
}

/// A long prompt is prefilled a chunk per step while a running stream gains a token per step.
#[test]
fn chunked_prefill_keeps_streams_decoding() {
    let mut s = Scheduler::new(
        engine(),
        SchedulerOptions {
            step_tokens: 8,
            ..Default::default()
        },
    );
    let mut short = Request::new(prompt(1, 4), 40);
    short.sampling.ignore_eos = true;
    let (_, mut rx_short) = s.submit(short).unwrap();
    s.step(); // prefill + first token
    let (_, mut rx_long) = s.submit(Request::new(prompt(2, 60), 2)).unwrap();
    let mut steps_with_token = 0;
    let mut long_steps = 0;
    loop {
        s.step();
        long_steps += 1;
        let mut got = false;
        while let Ok(ev) = rx_short.try_recv() {
            got |= matches!(ev, Event::Token { .. });
        }
        steps_with_token += got as usize;
        if !matches!(
            rx_long.try_recv(),
            Err(tokio::sync::mpsc::error::TryRecvError::Empty)
        ) {
            break;
        }
    }
    // 60 prompt tokens at <= 7 per step (one slot goes to the decoding stream).
    assert!(
        long_steps >= 60 / 7,
        "prefill was chunked ({long_steps} steps)"
    );
    assert_eq!(
        steps_with_token, long_steps,
        "the stream decoded on every step"
    );
}

#[test]
fn cancel_and_abandon_free_pages() {
    let mut s = Scheduler::new(engine(), SchedulerOptions::default());
    let long = |i| {
        let mut r = Request::new(prompt(i, 70), 200);
        r.sampling.ignore_eos = true;
        r
    };
    let (a, mut rx_a) = s.submit(long(1)).unwrap();
    let (_b, rx_b) = s.submit(long(2)).unwrap();
    let (_c, mut rx_c) = s.submit(Request::new(prompt(3, 5), 3)).unwrap();
    for _ in 0..3 {
        s.step();
    }
    let in_use = s.engine().cache_pages_in_use();
    assert!(
        in_use >= 4,
        "two 70+ token sequences hold at least 2 pages each"
    );
    s.cancel(a);
    drop(rx_b);
    s.step();
    assert!(s.engine().cache_pages_in_use() < in_use);
    s.run_until_idle();
    assert_eq!(s.engine().cache_pages_in_use(), 0);
    // The cancelled request ends with an error event; the other one finished normally.
    let mut last = None;
    while let Ok(ev) = rx_a.try_recv() {
        last = Some(ev);
    }
    assert!(matches!(last, Some(Event::Error(_))));
    collect(&mut rx_c);
    assert_eq!(s.metrics().requests_cancelled, 2);
}

#[test]
fn stop_tokens_and_length() {
    let mut e = engine();
    let base = Request::new(prompt(4, 6), 8);
    let free = solo(&mut e, &base);
    let mut s = Scheduler::new(engine(), SchedulerOptions::default());
    let mut r = base.clone();
    r.stop_token_ids = vec![free[2]];
    let (_, mut rx) = s.submit(r).unwrap();
    let (_, mut rx_len) = s.submit(Request::new(prompt(4, 6), 2)).unwrap();
    s.run_until_idle();
    let (_, f) = collect(&mut rx);
    let first = free.iter().position(|&t| t == free[2]).unwrap();
    assert_eq!(f.reason, StopReason::StopToken);
    assert_eq!(f.tokens, free[..=first]);
    let (_, f) = collect(&mut rx_len);
    assert_eq!(f.reason, StopReason::Length);
    assert_eq!(f.tokens.len(), 2);
}

#[test]
fn bad_requests_are_rejected() {
    let mut s = Scheduler::new(engine(), SchedulerOptions::default());
    assert!(s.submit(Request::new(vec![], 4)).is_err());
    assert!(s.submit(Request::new(vec![5], 0)).is_err());
    assert!(s.submit(Request::new(vec![100_000], 4)).is_err());
    let mut r = Request::new(vec![5], 4);
    r.stop = vec!["x".into()];
    assert!(s.submit(r).is_err(), "stop strings need a tokenizer");
    let mut r = Request::new(vec![5], 4);
    r.sampling.top_p = 0.0;
    assert!(s.submit(r).is_err());
    assert!(!s.has_work());
}

/// The threaded handle: concurrent submitters on several threads, each result equal to solo.
#[test]
fn handle_serves_concurrent_threads() {
    let mut e = engine();
    let reqs = requests();
    let want: Vec<Vec<u32>> = reqs.iter().map(|r| solo(&mut e, r)).collect();
    let handle = SchedulerHandle::spawn(
        || Ok(engine()),
        SchedulerOptions {
            step_tokens: 16,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(handle.info().vocab_size, 512);
    let threads: Vec<_> = reqs
        .iter()
        .cloned()
        .map(|r| {
            let h = handle.clone();
            std::thread::spawn(move || {
                let mut sub = h.submit(r).unwrap();
                loop {
                    match sub.events.blocking_recv().expect("an event") {
                        Event::Finished(f) => return f.tokens,
                        Event::Error(e) => panic!("{e}"),
                        Event::Token { .. } => {}
                    }
                }
            })
        })
        .collect();
    for (i, t) in threads.into_iter().enumerate() {
        assert_eq!(t.join().unwrap(), want[i], "request {i}");
    }
    // Pages are released right after the last event; wait for the step to publish.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while handle.metrics().kv_pages_in_use != 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let m = handle.metrics();
    assert_eq!(m.kv_pages_in_use, 0);
    assert_eq!(m.requests_finished, reqs.len() as u64);
    assert!(handle.submit(Request::new(vec![], 1)).is_err());
}

/// Prefix caching: later requests sharing a prefix with a finished sequence fork its cache
/// (two at once here); results equal uncached runs; eviction under capacity pressure;
/// clearing frees all.
#[test]
fn prefix_cache_reuses_finished_sequences() {
    let mut e = engine();
    let base = Request::new(prompt(5, 70), 6);
    let first = solo(&mut e, &base);
    let mut s = Scheduler::new(
        engine(),
        SchedulerOptions {
            prefix_cache_pages: 8,
            kv_pages: 12,
            ..Default::default()
        },
    );
    let (_, mut rx) = s.submit(base.clone()).unwrap();
    s.run_until_idle();
    let (_, f) = collect(&mut rx);
    assert_eq!(f.tokens, first);
    assert_eq!(f.cached_tokens, 0);
    assert!(s.engine().cache_pages_in_use() > 0, "kept for reuse");
    assert_eq!(s.metrics().kv_pages_in_use, 0, "no live sequence");
    assert!(s.metrics().kv_pages_cached > 0);

    // The same prompt twice at once: both share the cached pages (the cached sequence stays)
    // and run everything but the last prompt token from the cache.
    let (_, mut rx1) = s.submit(base.clone()).unwrap();
    let (_, mut rx2) = s.submit(base.clone()).unwrap();
    s.run_until_idle();
    for rx in [&mut rx1, &mut rx2] {
        let (_, f) = collect(rx);
        assert_eq!(f.tokens, first);
        assert_eq!(f.cached_tokens, base.prompt.len() - 1);
    }

    // A continuation of the conversation: prompt + answer + more tokens.
    let mut next = base.prompt.clone();
    next.extend_from_slice(&first);
    next.extend_from_slice(&prompt(9, 5));
    let cont = Request::new(next.clone(), 5);
    let want = solo(&mut e, &cont);
    let (_, mut rx) = s.submit(cont).unwrap();
    s.run_until_idle();
    let (_, f) = collect(&mut rx);
    assert_eq!(f.tokens, want);
    assert_eq!(f.cached_tokens, base.prompt.len() + first.len() - 1);
    assert_eq!(
        s.metrics().prefix_cache_hit_tokens_total,
        (3 * base.prompt.len() + first.len() - 3) as u64
    );

    // Capacity pressure: a request needing most of the cache evicts the cached sequences.
    let big = Request::new(prompt(11, 600), 4);
    let want = solo(&mut e, &big);
    let (_, mut rx) = s.submit(big).unwrap();
    s.run_until_idle();
    assert_eq!(collect(&mut rx).1.tokens, want);
    s.clear_prefix_cache();
    assert_eq!(s.engine().cache_pages_in_use(), 0);
}

/// MTP speculation inside continuous batching: every request, whatever its acceptance and
/// whenever it joins, gets exactly its greedy output without speculation; metrics count the
/// drafts; prefix reuse stays correct with speculation.
#[test]
fn speculative_scheduling_matches_plain_greedy() {
    let mut e = engine();
    let reqs: Vec<Request> = requests()
        .into_iter()
        .map(|mut r| {
            r.max_tokens = 12;
            r.sampling.ignore_eos = true;
            r
        })
        .collect();
    let want: Vec<Vec<u32>> = reqs.iter().map(|r| solo(&mut e, r)).collect();
    for (draft_tokens, step_tokens, prefix_cache_pages) in [(1, 16, 0), (2, 4, 0), (3, 512, 64)] {
        let spec_engine = Engine::load(
            &fixture(),
            &EngineOptions {
                draft_tokens,
                ..EngineOptions::default()
            },
        )
        .unwrap();
        let mut s = Scheduler::new(
            spec_engine,
            SchedulerOptions {
                step_tokens,
                draft_tokens,
                prefix_cache_pages,
                ..Default::default()
            },
        );
        // Twice the same requests: with a prefix cache the second round reuses the first's.
        for round in 0..2 {
            let mut rxs = Vec::new();
            for (i, r) in reqs.iter().enumerate() {
                rxs.push(s.submit(r.clone()).unwrap().1);
                if i % 2 == 0 {
                    s.step();
                }
            }
            s.run_until_idle();
            for (i, rx) in rxs.iter_mut().enumerate() {
                let (tokens, finish) = collect(rx);
                assert_eq!(
                    finish.tokens, want[i],
                    "request {i}, k={draft_tokens}, round {round}"
                );
                assert_eq!(tokens, finish.tokens);
            }
        }
        let m = s.metrics();
        assert!(
            m.draft_tokens_total > 0,
            "k={draft_tokens}: drafts were proposed"
        );
        assert!(m.accepted_draft_tokens_total <= m.draft_tokens_total);
        if prefix_cache_pages > 0 {
            assert!(
                m.prefix_cache_hit_tokens_total > 0,
                "second round reused cached prefixes"
            );
        }
        s.clear_prefix_cache();
        assert_eq!(s.engine().cache_pages_in_use(), 0, "all pages back");
    }
}

#[test]
fn speculation_needs_an_mtp_layer() {
    let tmp = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture()).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), tmp.path().join(entry.file_name())).unwrap();
    }
    let path = tmp.path().join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    cfg["num_nextn_predict_layers"] = 0.into();
    std::fs::write(&path, cfg.to_string()).unwrap();
    let opts = EngineOptions {
        draft_tokens: 2,
        ..EngineOptions::default()
    };
    let err = Engine::load(tmp.path(), &opts)
        .err()
        .expect("refused")
        .to_string();
    assert!(err.contains("num_nextn_predict_layers is 0"), "{err}");
}

/// A cache too small for every request's whole output at once: requests are admitted on
/// their prompts, the newest are pre-empted when decoding runs out of pages and recomputed
/// later, and every request still gets exactly its solo output (greedy and seeded sampling,
/// with and without prefix caching; greedy with speculation, where sampling draws differ by
/// design); all pages come back.
#[test]
fn preempted_requests_resume_exactly() {
    let mut e = engine();
    let reqs: Vec<Request> = (0..6)
        .map(|i| {
            let mut r = Request::new(prompt(i, 20 + 13 * i), 150);
            r.sampling.ignore_eos = true;
            if i % 2 == 1 {
                r.sampling = SamplingParams {
                    temperature: 0.8,
                    top_p: 0.9,
                    seed: 7 + i as u64,
                    ignore_eos: true,
                    ..SamplingParams::default()
                };
            }
            r
        })
        .collect();
    let want: Vec<Vec<u32>> = reqs.iter().map(|r| solo(&mut e, r)).collect();
    for (draft_tokens, prefix_cache_pages) in [(0, 0), (2, 0), (0, 4)] {
        let engine = Engine::load(
            &fixture(),
            &EngineOptions {
                with_mtp: draft_tokens > 0,
                ..EngineOptions::default()
            },
        )
        .unwrap();
        // Each request ends at 170..=235 tokens (3 or 4 pages); 5 pages hold one or two.
        let mut s = Scheduler::new(
            engine,
            SchedulerOptions {
                kv_pages: 5,
                step_tokens: 64,
                draft_tokens,
                prefix_cache_pages,
                ..Default::default()
            },
        );
        let mut rxs: Vec<_> = reqs
            .iter()
            .map(|r| s.submit(r.clone()).unwrap().1)
            .collect();
        s.run_until_idle();
        let what = format!("k={draft_tokens}, prefix cache {prefix_cache_pages}");
        for (i, rx) in rxs.iter_mut().enumerate() {
            let (tokens, finish) = collect(rx);
            assert_eq!(
                tokens, finish.tokens,
                "request {i}: each token streamed once"
            );
            if draft_tokens > 0 && reqs[i].sampling.temperature > 0.0 {
                assert_eq!(
                    finish.tokens.len(),
                    reqs[i].max_tokens,
                    "request {i}, {what}"
                );
            } else {
                assert_eq!(finish.tokens, want[i], "request {i}, {what}");
            }
        }
        let m = s.metrics();
        println!("{what}: {} pre-emptions", m.preemptions_total);
        assert!(
            m.preemptions_total > 0,
            "{what}: the cache forced pre-emptions"
        );
        s.clear_prefix_cache();
        assert_eq!(s.engine().cache_pages_in_use(), 0, "{what}: all pages back");
    }
}

/// With prefix caching on, a request forks the part of a *running* request's prompt that is
/// already prefilled (the same long system prompt arriving several times at once): it reports
/// those tokens as cached, the running request is unaffected, and both equal their solo runs.
#[test]
fn requests_share_a_running_prompt_prefix() {
    let mut e = engine();
    let system = prompt(3, 150);
    let mut first = Request::new(system.clone(), 8);
    first.sampling.ignore_eos = true;
    let mut later = first.clone();
    later.prompt.extend_from_slice(&prompt(4, 10));
    let want_first = solo(&mut e, &first);
    let want_later = solo(&mut e, &later);
    let mut s = Scheduler::new(
        engine(),
        SchedulerOptions {
            step_tokens: 64,
            prefix_cache_pages: 16,
            ..Default::default()
        },
    );
    let (_, mut rx1) = s.submit(first).unwrap();
    s.step();
    s.step();
    // 128 of the first prompt's 150 tokens are in the cache now.
    let (_, mut rx2) = s.submit(later.clone()).unwrap();
    let (_, mut rx3) = s.submit(later).unwrap();
    s.run_until_idle();
    let (_, f1) = collect(&mut rx1);
    assert_eq!(f1.tokens, want_first);
    assert_eq!(f1.cached_tokens, 0);
    let (_, f2) = collect(&mut rx2);
    assert_eq!(f2.tokens, want_later);
    assert_eq!(f2.cached_tokens, 128, "forked from the running request");
    let (_, f3) = collect(&mut rx3);
    assert_eq!(f3.tokens, want_later);
    assert!(f3.cached_tokens >= 128, "{}", f3.cached_tokens);
    s.clear_prefix_cache();
    assert_eq!(s.engine().cache_pages_in_use(), 0);
}
