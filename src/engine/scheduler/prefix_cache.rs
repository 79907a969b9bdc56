//! Prefix caching: finished sequences kept (within a page budget) keyed by their tokens, and
//! the longest shared prefix a new request can fork, from the cache or from a running
//! request's prefilled prompt; least recently used entries are evicted first.

use super::pages::pages_for;
use super::{Running, Scheduler};
use crate::engine::Sequence;

/// Where a shared prefix comes from: an index into the prefix cache or the running batch.
#[derive(Debug, Clone, Copy)]
pub(super) enum PrefixSource {
    Cached(usize),
    Running(usize),
}

/// A finished sequence kept for prefix caching: its cache holds `tokens`.
pub(super) struct CachedSeq {
    pub(super) tokens: Vec<u32>,
    pub(super) seq: Sequence,
    pub(super) last_used: u64,
}

impl Scheduler {
    /// The sequence sharing the longest prefix with `context` (leaving at least one token to
    /// run): a cached one, or with prefix caching on a running request's prefilled context.
    /// Returns where it is and the shared length.
    pub(super) fn best_prefix(&self, context: &[u32]) -> Option<(PrefixSource, usize)> {
        let max = context.len().saturating_sub(1);
        let shared = |tokens: &[u32]| {
            let n = tokens
                .iter()
                .zip(context)
                .take_while(|(a, b)| a == b)
                .count();
            n.min(max)
        };
        let cached = self
            .prefix_cache
            .iter()
            .enumerate()
            .map(|(i, c)| ((shared(&c.tokens), c.last_used), PrefixSource::Cached(i)));
        let running = self
            .running
            .iter()
            .enumerate()
            .filter(|_| self.opts.prefix_cache_pages > 0)
            .map(|(i, r)| {
                (
                    (shared(&r.context[..r.prefilled]), 0),
                    PrefixSource::Running(i),
                )
            });
        cached
            .chain(running)
            .filter(|&((n, _), _)| n > 0)
            .max_by_key(|&(key, _)| key)
            .map(|((n, _), source)| (source, n))
    }

    /// Frees the least recently used cached sequence; false when none is left.
    pub(super) fn evict_lru(&mut self) -> bool {
        let victim = self
            .prefix_cache
            .iter()
            .enumerate()
            .min_by_key(|(_, c)| c.last_used)
            .map(|(i, _)| i);
        let Some(i) = victim else {
            return false;
        };
        let mut c = self.prefix_cache.swap_remove(i);
        self.cached_pages -= pages_for(c.tokens.len());
        self.engine.release(&mut c.seq);
        true
    }

    /// Keeps a finished sequence for prefix caching, or frees it.
    pub(super) fn retire(&mut self, mut r: Running) {
        let budget = self.opts.prefix_cache_pages;
        // The cache holds the prompt and every generated token but the last (never fed).
        let mut tokens = r.req.prompt.clone();
        tokens.extend_from_slice(&r.generated[..r.generated.len().saturating_sub(1)]);
        let pages = pages_for(tokens.len());
        if budget == 0 || pages > budget || r.seq.len() != tokens.len() {
            self.engine.release(&mut r.seq);
            return;
        }
        // An entry that is a prefix of this one is redundant.
        let mut i = 0;
        while i < self.prefix_cache.len() {
            let c = &self.prefix_cache[i];
            if tokens.starts_with(&c.tokens) {
                let mut c = self.prefix_cache.swap_remove(i);
                self.cached_pages -= pages_for(c.tokens.len());
                self.engine.release(&mut c.seq);
            } else {
                i += 1;
            }
        }
        while self.cached_pages + pages > budget && self.evict_lru() {}
        self.clock += 1;
        self.cached_pages += pages;
        self.prefix_cache.push(CachedSeq {
            tokens,
            seq: r.seq,
            last_used: self.clock,
        });
    }

    /// Frees every cached sequence.
    pub fn clear_prefix_cache(&mut self) {
        while self.evict_lru() {}
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{fixture_scheduler, prompt, run};
    use super::super::Request;
    use super::*;

    fn cached_starts(s: &Scheduler) -> Vec<u32> {
        let mut firsts: Vec<u32> = s.prefix_cache.iter().map(|c| c.tokens[0]).collect();
        firsts.sort_unstable();
        firsts
    }

    /// A finished sequence stays cached (its prompt and every generated token but the last);
    /// a context sharing a prefix with it hits (leaving one token to run), one that does not
    /// misses; an entry that is a prefix of a newer one is dropped.
    #[test]
    fn hits_share_the_longest_prefix_and_misses_find_none() {
        let mut s = fixture_scheduler(16, 4);
        let p = prompt(5, 70);
        let f = run(&mut s, Request::new(p.clone(), 3));
        let mut kept = p.clone();
        kept.extend_from_slice(&f.tokens[..2]);
        assert_eq!(s.prefix_cache.len(), 1);
        assert_eq!(s.prefix_cache[0].tokens, kept);
        assert_eq!(s.cached_pages, 2);
        assert_eq!(s.engine.cache_pages_in_use(), 2);
        let m = s.metrics();
        assert_eq!((m.kv_pages_cached, m.kv_pages_in_use), (2, 0));

        let mut partial = p[..40].to_vec();
        partial.extend_from_slice(&prompt(6, 10));
        assert!(matches!(
            s.best_prefix(&partial),
            Some((PrefixSource::Cached(0), 40))
        ));
        assert!(s.best_prefix(&prompt(6, 50)).is_none(), "a miss");
        assert!(matches!(
            s.best_prefix(&kept),
            Some((PrefixSource::Cached(0), 71))
        ));

        // A continuation hits the whole entry and then replaces it.
        let mut next = kept.clone();
        next.extend_from_slice(&prompt(7, 5));
        let f = run(&mut s, Request::new(next.clone(), 2));
        assert_eq!(f.cached_tokens, kept.len());
        assert_eq!(s.metrics().prefix_cache_hit_tokens_total, kept.len() as u64);
        assert_eq!(s.prefix_cache.len(), 1);
        assert_eq!(s.prefix_cache[0].tokens.len(), next.len() + 1);
        assert!(s.prefix_cache[0].tokens.starts_with(&kept));
        assert_eq!(s.cached_pages, 2);
        assert_eq!(s.engine.cache_pages_in_use(), 2);
    }

    /// The budget holds: the least recently used entry (a hit counts as use) is evicted to
    /// make room, a sequence larger than the budget is not kept, and clearing frees all pages.
    #[test]
    fn least_recently_used_entries_are_evicted_within_the_budget() {
        let mut s = fixture_scheduler(16, 4);
        let starts = |seeds: &[usize]| {
            let mut firsts: Vec<u32> = seeds.iter().map(|&seed| prompt(seed, 1)[0]).collect();
            firsts.sort_unstable();
            firsts
        };
        for seed in [1, 2] {
            run(&mut s, Request::new(prompt(seed, 70), 3));
        }
        assert_eq!(cached_starts(&s), starts(&[1, 2]));
        assert_eq!(s.cached_pages, 4);

        run(&mut s, Request::new(prompt(3, 70), 3));
        assert_eq!(cached_starts(&s), starts(&[2, 3]), "1 was least recent");
        assert_eq!(s.cached_pages, 4);
        assert_eq!(s.engine.cache_pages_in_use(), 4, "evicted pages are freed");

        // 2 hits, so 3 is now the least recently used.
        let f = run(&mut s, Request::new(prompt(2, 70), 3));
        assert_eq!(f.cached_tokens, 69);
        run(&mut s, Request::new(prompt(4, 70), 3));
        assert_eq!(cached_starts(&s), starts(&[2, 4]));

        // Over the budget on its own: freed, and nothing else is evicted for it.
        run(&mut s, Request::new(prompt(8, 300), 2));
        assert_eq!(cached_starts(&s), starts(&[2, 4]));
        assert_eq!(s.engine.cache_pages_in_use(), 4);

        s.clear_prefix_cache();
        assert!(s.prefix_cache.is_empty());
        assert_eq!(s.cached_pages, 0);
        assert_eq!(s.engine.cache_pages_in_use(), 0);
        assert!(!s.evict_lru());
    }
}
