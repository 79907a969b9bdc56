//! Paged latent KV cache bookkeeping shared by every backend: pages of [`PAGE_TOKENS`] tokens,
//! a free-list allocator and per-sequence block tables. One block id addresses the same page
//! in every layer's storage (the MTP layer included); the storage itself belongs to a backend.

use crate::error::{Error, Result};

/// Tokens per cache page (FlashMLA's block size).
pub const PAGE_TOKENS: usize = 64;

pub type BlockId = u32;

/// Hands out page ids and counts each page's owners: a page forked into several block tables
/// ([`SeqBlocks::fork`]) returns to the free list when its last owner lets go.
#[derive(Debug, Clone)]
pub struct BlockAllocator {
    free: Vec<BlockId>,
    /// Owners of every id handed out so far (0: on the free list).
    refs: Vec<u32>,
    capacity: usize,
}

impl BlockAllocator {
    /// An allocator handing out at most `capacity` blocks.
    pub fn new(capacity: usize) -> Self {
        BlockAllocator {
            free: Vec::new(),
            refs: Vec::new(),
            capacity,
        }
    }

    /// A page with one owner.
    pub fn allocate(&mut self) -> Result<BlockId> {
        let block = match self.free.pop() {
            Some(b) => b,
            None if self.refs.len() < self.capacity => {
                self.refs.push(0);
                (self.refs.len() - 1) as BlockId
            }
            None => {
                return Err(Error::Input(format!(
                    "KV cache is full: all {} pages of {PAGE_TOKENS} tokens are in use",
                    self.capacity
                )))
            }
        };
        self.refs[block as usize] = 1;
        Ok(block)
    }

    /// One more owner of a page in use.
    pub fn share(&mut self, block: BlockId) {
        let refs = &mut self.refs[block as usize];
        debug_assert!(*refs > 0, "block {block} shared while free");
        *refs += 1;
    }

    /// One owner fewer; the page is free when none is left.
    pub fn release(&mut self, block: BlockId) {
        let refs = &mut self.refs[block as usize];
        debug_assert!(*refs > 0, "block {block} freed twice");
        *refs -= 1;
        if *refs == 0 {
            self.free.push(block);
        }
    }

    /// How many block tables hold `block`.
    pub fn owners(&self, block: BlockId) -> u32 {
        self.refs.get(block as usize).copied().unwrap_or(0)
    }

    /// Most pages this allocator hands out.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Pages with at least one owner.
    pub fn in_use(&self) -> usize {
        self.refs.len() - self.free.len()
    }

    /// Blocks ever handed out: storage must cover ids below this.
    pub fn high_water(&self) -> usize {
        self.refs.len()
    }
}

/// Copy page `src` into page `dst`, in every layer (copy-on-write of a shared page).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageCopy {
    pub src: BlockId,
    pub dst: BlockId,
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

    /// A new block table for positions `0..len` of this one, sharing its pages (no copy):
    /// a page is copied only when one of its owners writes to it ([`SeqBlocks::unshare_from`]).
    pub fn fork(&self, alloc: &mut BlockAllocator, len: usize) -> SeqBlocks {
        let len = len.min(self.len);
        let blocks = self.blocks[..len.div_ceil(PAGE_TOKENS)].to_vec();
        for &b in &blocks {
            alloc.share(b);
        }
        SeqBlocks { blocks, len }
    }

    /// Pages a write of positions `from..end` takes from the allocator: new pages past the
    /// table's end plus copies of shared pages ([`SeqBlocks::unshare_from`]).
    pub fn pages_to_write(&self, alloc: &BlockAllocator, from: usize, end: usize) -> usize {
        let grow = end.div_ceil(PAGE_TOKENS).saturating_sub(self.blocks.len());
        let shared = self
            .blocks
            .iter()
            .skip(from / PAGE_TOKENS)
            .filter(|&&b| alloc.owners(b) > 1)
            .count();
        grow + shared
    }

    /// Before writing positions `pos..`: gives this table its own copy of every page it
    /// shares that holds such a position. Returns the copies the backend must make (in every
    /// layer) before the write; the table already names the new pages.
    pub fn unshare_from(
        &mut self,
        alloc: &mut BlockAllocator,
        pos: usize,
    ) -> Result<Vec<PageCopy>> {
        let mut copies = Vec::new();
        for i in pos / PAGE_TOKENS..self.blocks.len() {
            let src = self.blocks[i];
            if alloc.owners(src) < 2 {
                continue;
            }
            match alloc.allocate() {
                Ok(dst) => {
                    alloc.release(src);
                    self.blocks[i] = dst;
                    copies.push(PageCopy { src, dst });
                }
                Err(e) => {
                    // Out of pages: keep sharing what was shared, as before the call.
                    self.undo_unshare(alloc, &copies);
                    return Err(e);
                }
            }
        }
        Ok(copies)
    }

    /// Takes back [`SeqBlocks::unshare_from`]'s copies that were never made (a step that
    /// failed): the table shares the original pages again and the new ones are freed.
    pub fn undo_unshare(&mut self, alloc: &mut BlockAllocator, copies: &[PageCopy]) {
        for c in copies {
            if let Some(b) = self.blocks.iter_mut().find(|b| **b == c.dst) {
                alloc.share(c.src);
                alloc.release(c.dst);
                *b = c.src;
            }
        }
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
    /// Pages the backend copies (in every layer) before the step writes anything: the
    /// segments' tables already name the copies ([`SeqBlocks::unshare_from`]).
    pub page_copies: Vec<PageCopy>,
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

    /// Pages the step touches: storage must cover ids below this.
    pub fn pages_needed(&self) -> usize {
        let tables = self.segments.iter().flat_map(|s| s.blocks.iter().copied());
        let copies = self.page_copies.iter().flat_map(|c| [c.src, c.dst]);
        tables
            .chain(copies)
            .map(|b| b as usize + 1)
            .max()
            .unwrap_or(0)
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
    use std::collections::HashMap;

    /// Page storage of the model below: one value per slot, the writer's (table, position).
    type Pages = HashMap<BlockId, [Option<(usize, usize)>; PAGE_TOKENS]>;

    /// Appends `n` positions to table `t` the way the engine does: reserve, copy-on-write,
    /// then write each slot.
    fn append(
        alloc: &mut BlockAllocator,
        pages: &mut Pages,
        seq: &mut SeqBlocks,
        t: usize,
        n: usize,
    ) -> Result<()> {
        let end = seq.len + n;
        let (want, before) = (seq.pages_to_write(alloc, seq.len, end), alloc.in_use());
        seq.reserve(alloc, end)?;
        for c in seq.unshare_from(alloc, seq.len)? {
            let page = pages.get(&c.src).copied().unwrap_or([None; PAGE_TOKENS]);
            pages.insert(c.dst, page);
        }
        assert_eq!(alloc.in_use() - before, want, "pages_to_write");
        for pos in seq.len..end {
            let (b, off) = slot(&seq.blocks, pos);
            pages.entry(b).or_insert([None; PAGE_TOKENS])[off] = Some((t, pos));
        }
        seq.len = end;
        Ok(())
    }

    proptest! {
        /// Random appends, truncations, forks and frees over several tables, against a model
        /// of the page storage: every table always reads back what was written for it (a
        /// fork reads its parent's writes below the fork point), each page's owner count is
        /// the number of tables holding it, and freeing everything returns every page.
        #[test]
        fn shared_pages_are_copied_before_a_write(
            ops in prop::collection::vec((0usize..4, 0usize..4, 0usize..4, 0usize..200), 1..80)
        ) {
            let mut alloc = BlockAllocator::new(48);
            let mut pages = Pages::new();
            let mut seqs = vec![SeqBlocks::default(); 4];
            // Who wrote each position of each table: (table, position).
            let mut want: Vec<Vec<(usize, usize)>> = vec![Vec::new(); 4];
            for (kind, t, other, n) in ops {
                match kind {
                    0 | 1 => {
                        if append(&mut alloc, &mut pages, &mut seqs[t], t, n % 90).is_ok() {
                            let len = want[t].len();
                            want[t].extend((len..len + n % 90).map(|p| (t, p)));
                        } else {
                            // A full cache leaves the table as it was, plus reserved pages.
                            seqs[t].truncate(&mut alloc, want[t].len());
                        }
                    }
                    2 => {
                        seqs[t].truncate(&mut alloc, n);
                        want[t].truncate(n);
                    }
                    _ if t != other => {
                        let mut fork = seqs[other].fork(&mut alloc, n);
                        std::mem::swap(&mut seqs[t], &mut fork);
                        fork.release(&mut alloc);
                        want[t] = want[other][..seqs[t].len].to_vec();
                    }
                    _ => seqs[t].release(&mut alloc),
                }
                if kind == 3 && t == other {
                    want[t].clear();
                }
                let mut holders: HashMap<BlockId, u32> = HashMap::new();
                for (i, seq) in seqs.iter().enumerate() {
                    prop_assert_eq!(seq.len, want[i].len());
                    prop_assert!(seq.blocks.len() * PAGE_TOKENS >= seq.len);
                    for &b in &seq.blocks {
                        *holders.entry(b).or_default() += 1;
                    }
                    for (pos, w) in want[i].iter().enumerate() {
                        let (b, off) = slot(&seq.blocks, pos);
                        prop_assert_eq!(pages[&b][off], Some(*w), "table {} position {}", i, pos);
                    }
                }
                for (&b, &n) in &holders {
                    prop_assert_eq!(alloc.owners(b), n, "owners of block {}", b);
                }
                prop_assert_eq!(holders.len(), alloc.in_use());
            }
            for seq in &mut seqs {
                seq.release(&mut alloc);
            }
            prop_assert_eq!(alloc.in_use(), 0);
        }
    }

    #[test]
    fn unshare_without_room_keeps_the_table_as_it_was() {
        // Room for one copy of the three shared pages: the second fails, the first is undone.
        let mut alloc = BlockAllocator::new(4);
        let mut parent = SeqBlocks::default();
        parent.reserve(&mut alloc, 130).unwrap();
        parent.len = 130;
        let mut fork = parent.fork(&mut alloc, 130);
        let before = fork.clone();
        let err = fork.unshare_from(&mut alloc, 0).unwrap_err().to_string();
        assert!(err.contains("KV cache is full"), "{err}");
        assert_eq!(fork, before);
        assert!(fork.blocks.iter().all(|&b| alloc.owners(b) == 2));
        fork.release(&mut alloc);
        parent.release(&mut alloc);
        assert_eq!(alloc.in_use(), 0);
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
