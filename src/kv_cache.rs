//! Paged latent KV cache bookkeeping shared by every backend: pages of [`PAGE_TOKENS`] tokens,
//! a free-list allocator and per-sequence block tables. One block id addresses the same page
//! in every layer's storage (the MTP layer included); the storage itself belongs to a backend.

use crate::error::{Error, Result};

/// Tokens per cache page (FlashMLA's block size).
pub const PAGE_TOKENS: usize = 64;

pub type BlockId = u32;

#[derive(Debug, Clone)]
pub struct BlockAllocator {
    free: Vec<BlockId>,
    next: BlockId,
    capacity: usize,
}

impl BlockAllocator {
    /// An allocator handing out at most `capacity` blocks.
    pub fn new(capacity: usize) -> Self {
        BlockAllocator {
            free: Vec::new(),
            next: 0,
            capacity,
        }
    }

    pub fn allocate(&mut self) -> Result<BlockId> {
        if let Some(b) = self.free.pop() {
            return Ok(b);
        }
        if (self.next as usize) < self.capacity {
            self.next += 1;
            return Ok(self.next - 1);
        }
        Err(Error::Input(format!(
            "KV cache is full: all {} pages of {PAGE_TOKENS} tokens are in use",
            self.capacity
        )))
    }

    pub fn release(&mut self, block: BlockId) {
        debug_assert!(!self.free.contains(&block), "block {block} freed twice");
        self.free.push(block);
    }

    pub fn in_use(&self) -> usize {
        self.next as usize - self.free.len()
    }

    /// Blocks ever handed out: storage must cover ids below this.
    pub fn high_water(&self) -> usize {
        self.next as usize
    }
}

/// A sequence's block table and how many of its positions hold valid cache entries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SeqBlocks {
    pub blocks: Vec<BlockId>,
    pub len: usize,
}

impl SeqBlocks {
    /// Makes room for positions `0..len` (allocating pages as needed).
    pub fn reserve(&mut self, alloc: &mut BlockAllocator, len: usize) -> Result<()> {
        while self.blocks.len() * PAGE_TOKENS < len {
            self.blocks.push(alloc.allocate()?);
        }
        Ok(())
    }

    /// Forgets positions `len..` (e.g. rejected draft tokens), freeing pages no longer needed.
    pub fn truncate(&mut self, alloc: &mut BlockAllocator, len: usize) {
        self.len = self.len.min(len);
        while self.blocks.len() > len.div_ceil(PAGE_TOKENS) {
            if let Some(b) = self.blocks.pop() {
                alloc.release(b);
            }
        }
    }

    pub fn release(&mut self, alloc: &mut BlockAllocator) {
        self.truncate(alloc, 0);
    }
}

/// Physical slot (block, offset) of position `pos` in a block table.
#[inline]
pub fn slot(blocks: &[BlockId], pos: usize) -> (BlockId, usize) {
    (blocks[pos / PAGE_TOKENS], pos % PAGE_TOKENS)
}

/// One sequence's tokens in a step: positions `start_pos .. start_pos + len`.
#[derive(Debug, Clone)]
pub struct Segment {
    pub blocks: Vec<BlockId>,
    pub start_pos: usize,
    pub len: usize,
    /// How many of its last tokens need logits in graphs that select rows (1 when decoding
    /// or finishing a prefill, 1 + drafts when verifying, 0 for a prefill chunk mid-prompt).
    pub logit_rows: usize,
}

/// The tokens of one forward step, grouped by sequence (consecutive in `tokens`).
#[derive(Debug, Clone, Default)]
pub struct Batch {
    pub tokens: Vec<u32>,
    pub segments: Vec<Segment>,
}

impl Batch {
    /// (segment index, absolute position) of every token, in order.
    pub fn token_positions(&self) -> Vec<(usize, usize)> {
        self.segments
            .iter()
            .enumerate()
            .flat_map(|(s, seg)| (0..seg.len).map(move |i| (s, seg.start_pos + i)))
            .collect()
    }

    /// Token indices whose rows are selected: each segment's last `logit_rows` tokens.
    pub fn selected_rows(&self) -> Vec<usize> {
        let mut end = 0;
        let mut rows = Vec::new();
        for s in &self.segments {
            end += s.len;
            rows.extend(end - s.logit_rows.min(s.len)..end);
        }
        rows
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    proptest! {
        /// Random grow/shrink/free sequences never share a block, and freeing all returns all.
        #[test]
        fn blocks_are_owned_once_and_all_return(ops in prop::collection::vec((0usize..4, 0usize..300), 1..60)) {
            let mut alloc = BlockAllocator::new(64);
            let mut seqs = vec![SeqBlocks::default(); 4];
            for (s, len) in ops {
                if len % 3 == 0 {
                    seqs[s].truncate(&mut alloc, len / 2);
                } else if seqs[s].reserve(&mut alloc, len).is_ok() {
                    seqs[s].len = len;
                }
                let mut seen = HashSet::new();
                for seq in &seqs {
                    prop_assert!(seq.blocks.len() * PAGE_TOKENS >= seq.len);
                    for &b in &seq.blocks {
                        prop_assert!(seen.insert(b), "block {} owned twice", b);
                    }
                }
                prop_assert_eq!(seen.len(), alloc.in_use());
            }
            for seq in &mut seqs {
                seq.release(&mut alloc);
            }
            prop_assert_eq!(alloc.in_use(), 0);
        }
    }

    #[test]
    fn full_cache_is_an_error_not_a_panic() {
        let mut alloc = BlockAllocator::new(2);
        let mut seq = SeqBlocks::default();
        assert!(seq.reserve(&mut alloc, 128).is_ok());
        let err = seq.reserve(&mut alloc, 129).unwrap_err().to_string();
        assert!(err.contains("KV cache is full"), "{err}");
    }
}
