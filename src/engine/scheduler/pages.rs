//! The KV page budget: admitting waiting requests when their context fits, and pre-empting
//! the newest running requests when a step needs more pages than are free.

use super::prefix_cache::PrefixSource;
use super::{Running, Scheduler, SpecState};
use crate::kv_cache::PAGE_TOKENS;

pub(super) fn pages_for(tokens: usize) -> usize {
    tokens.div_ceil(PAGE_TOKENS)
}

impl Scheduler {
    /// Moves waiting requests into the batch while there is room (FIFO: a request that does
    /// not fit blocks the ones behind it, so large requests are not starved; pre-empted
    /// requests wait at the front). Room means free pages for the request's whole context
    /// beside what the running requests still need for theirs, plus one page per running
    /// sequence for decoding. A request forks the cached sequence sharing the longest prefix
    /// with its context, if any: it shares that sequence's pages (which stays cached for
    /// others) and copies only a page it writes to.
    pub(super) fn admit(&mut self) {
        while self.running.len() < self.opts.max_running {
            let Some(front) = self.waiting.front() else {
                break;
            };
            let speculative = front.spec.is_some();
            let hit = self.best_prefix(&front.context).and_then(|(source, len)| {
                let seq = match source {
                    PrefixSource::Cached(i) => {
                        self.clock += 1;
                        self.prefix_cache[i].last_used = self.clock;
                        &self.prefix_cache[i].seq
                    }
                    PrefixSource::Running(i) => &self.running[i].seq,
                };
                // With speculation the MTP layer must cover the reused positions too.
                let len = if speculative {
                    len.min(seq.mtp_len())
                } else {
                    len
                };
                (len > 0).then(|| (self.engine.fork(seq, len), len))
            });
            let context = front.context.len();
            let need = match &hit {
                Some((seq, len)) => self.engine.pages_to_write(seq, *len, context),
                None => context.div_ceil(PAGE_TOKENS),
            } + self.prefill_pages()
                + self.running.len()
                + 1;
            while self.free_pages() < need && self.evict_lru() {}
            if self.free_pages() < need {
                if let Some((mut seq, _)) = hit {
                    self.engine.release(&mut seq);
                }
                break;
            }
            let mut r = self.waiting.pop_front().expect("front exists");
            if let Some((seq, len)) = hit {
                if r.spec.is_some() {
                    r.spec = Some(SpecState {
                        from: len,
                        ..SpecState::default()
                    });
                }
                r.seq = seq;
                r.prefilled = len;
                if r.generated.is_empty() {
                    r.cached = len;
                    let mut m = self.metrics.lock().unwrap_or_else(|e| e.into_inner());
                    m.prefix_cache_hit_tokens_total += len as u64;
                }
            }
            self.running.push(r);
        }
    }

    /// Pages of the cache no sequence holds.
    fn free_pages(&self) -> usize {
        self.opts
            .kv_pages
            .saturating_sub(self.engine.cache_pages_in_use())
    }

    /// Pages the running requests still need to prefill the rest of their contexts.
    fn prefill_pages(&self) -> usize {
        self.running.iter().map(|r| self.rest_of_context(r)).sum()
    }

    /// Pages writing the rest of `r`'s context takes (copies of shared pages included).
    fn rest_of_context(&self, r: &Running) -> usize {
        self.engine
            .pages_to_write(&r.seq, r.seq.len(), r.context.len())
    }

    /// Pages this step may take: the rest of every prefill, and for every decoding request
    /// its next token and drafts (the MTP layer may write from behind the main model).
    fn step_pages(&self) -> usize {
        let k = self.opts.draft_tokens;
        self.running
            .iter()
            .map(|r| {
                let len = r.seq.len();
                if r.decoding() {
                    let from = if r.spec.is_some() {
                        len.min(r.seq.mtp_len())
                    } else {
                        len
                    };
                    let drafts = if r.spec.is_some() { k } else { 0 };
                    self.engine.pages_to_write(&r.seq, from, len + 1 + drafts)
                } else {
                    self.rest_of_context(r)
                }
            })
            .sum()
    }

    /// Makes room for this step: evicts cached sequences, then pre-empts the newest running
    /// requests (never the oldest, so the batch always makes progress). A pre-empted request
    /// frees its pages and waits at the front of the queue; when re-admitted it prefills its
    /// prompt and generated tokens again (or forks them from the prefix cache) and goes on
    /// where it stopped: its stream sees nothing of this.
    pub(super) fn make_room(&mut self) {
        while self.step_pages() > self.free_pages() {
            if self.evict_lru() {
                continue;
            }
            if self.running.len() < 2 {
                break;
            }
            let Some(mut r) = self.running.pop() else {
                break;
            };
            self.engine.release(&mut r.seq);
            let n = r.generated.len();
            r.context = r.req.prompt.clone();
            r.context
                .extend_from_slice(&r.generated[..n.saturating_sub(1)]);
            r.prefilled = 0;
            if r.spec.is_some() {
                r.spec = Some(SpecState::default());
            }
            self.waiting.push_front(r);
            let mut m = self.metrics.lock().unwrap_or_else(|e| e.into_inner());
            m.preemptions_total += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{finished, fixture_scheduler, prompt};
    use super::super::{Event, Request};
    use super::*;

    /// A request is admitted when its whole context fits beside what the running ones still
    /// need plus a decode page each; pages are taken as sequences grow and all come back.
    #[test]
    fn admission_counts_whole_contexts_and_pages_come_back() {
        let mut s = fixture_scheduler(5, 0);
        let (_, mut a) = s.submit(Request::new(prompt(0, 100), 4)).unwrap();
        let (_, mut b) = s.submit(Request::new(prompt(1, 100), 4)).unwrap();
        s.admit();
        // a: 2 pages + 1 to decode; b would need 2 + a's 2 + 2 more than its own.
        assert_eq!((s.running.len(), s.waiting.len()), (1, 1));
        assert_eq!(s.free_pages(), 5, "admission reserves nothing");
        assert_eq!(s.step_pages(), 2, "a's prompt");
        s.step();
        assert_eq!(s.engine.cache_pages_in_use(), 2);
        assert_eq!(s.free_pages(), 3);
        // b (2 pages, a decoding, b decoding) still does not fit beside a.
        assert_eq!((s.running.len(), s.waiting.len()), (1, 1));
        s.run_until_idle();
        assert_eq!(finished(&mut a).tokens.len(), 4);
        assert_eq!(finished(&mut b).tokens.len(), 4);
        assert_eq!(
            s.engine.cache_pages_in_use(),
            0,
            "finished requests free their pages"
        );

        // A cancelled running request frees its pages at the next step.
        let (id, mut c) = s.submit(Request::new(prompt(2, 70), 20)).unwrap();
        s.step();
        assert_eq!(s.engine.cache_pages_in_use(), 2);
        s.cancel(id);
        s.step();
        assert_eq!(s.engine.cache_pages_in_use(), 0);
        assert!(matches!(c.try_recv(), Ok(Event::Token { .. })));
        assert!(matches!(c.try_recv(), Ok(Event::Error(m)) if m == "cancelled"));
        assert_eq!(s.metrics().requests_cancelled, 1);
    }

    /// When a step needs more pages than are free, the newest running request is pre-empted:
    /// its pages are freed and it waits at the front with its context to recompute. The
    /// oldest is never pre-empted. A pre-empted request still finishes in full.
    #[test]
    fn preemption_frees_the_newest_and_requeues_it() {
        let mut s = fixture_scheduler(8, 0);
        let (ida, mut a) = s.submit(Request::new(prompt(3, 128), 4)).unwrap();
        let (idb, mut b) = s.submit(Request::new(prompt(4, 128), 4)).unwrap();
        s.step();
        // Both prompts prefilled (2 full pages each), one token generated each.
        assert_eq!(s.running.len(), 2);
        assert_eq!(s.engine.cache_pages_in_use(), 4);
        assert_eq!(s.step_pages(), 2, "the next decode starts a page for each");

        s.opts.kv_pages = 5;
        s.make_room();
        assert_eq!(s.running.len(), 1);
        assert_eq!(s.running[0].id, ida);
        let w = s.waiting.front().expect("pre-empted request waits");
        assert_eq!(w.id, idb);
        assert_eq!(w.generated.len(), 1);
        // The generated token is not in the context: the next decode step feeds it.
        assert_eq!(w.context, prompt(4, 128));
        assert_eq!((w.prefilled, w.seq.len()), (0, 0));
        assert_eq!(s.engine.cache_pages_in_use(), 2);
        assert_eq!(s.metrics().preemptions_total, 1);

        // Not even room for the oldest: it stays (the batch must make progress).
        s.opts.kv_pages = 2;
        s.make_room();
        assert_eq!(s.running.len(), 1);
        assert_eq!(s.metrics().preemptions_total, 1);

        s.opts.kv_pages = 8;
        s.run_until_idle();
        assert_eq!(finished(&mut a).tokens.len(), 4);
        let fb = finished(&mut b);
        assert_eq!(fb.tokens.len(), 4);
        assert_eq!(fb.prompt_tokens, 128);
        assert_eq!(s.engine.cache_pages_in_use(), 0);
        assert_eq!(pages_for(128), 2);
        assert_eq!(pages_for(129), 3);
    }
}
