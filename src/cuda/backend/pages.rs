//! The paged latent caches: one per cache layer, grown as block ids appear, pages copied for
//! forked sequences. The last page of every cache is the scratch page, which no sequence owns:
//! the padding sequences of a graph step write and read only it.

use super::{debug_log, missing, Core, State};
use crate::cuda::ops::{CopyRowsDesc, Region};
use crate::cuda::MlaCache;
use crate::error::Result;
use crate::kv_cache::{Batch, PAGE_TOKENS};

impl Core {
    /// Grows every layer's cache to hold the batch's block ids and the scratch page after them
    /// (contents kept), then queues the batch's page copies.
    pub(super) fn prepare_pages(&self, state: &mut State, batch: &Batch) -> Result<()> {
        self.ensure_pages(state, batch.pages_needed() + 1)?;
        for cache in &mut state.cache {
            let page = PAGE_TOKENS * cache.width();
            for c in &batch.page_copies {
                self.dev.copy_within(
                    &mut cache.data,
                    c.src as usize * page,
                    c.dst as usize * page,
                    page,
                )?;
            }
        }
        Ok(())
    }

    /// The scratch page: the caches' last, above every block id a step has named (the caches
    /// always hold one page more than the ids need).
    pub(super) fn scratch_page(&self, state: &State) -> Result<u32> {
        let pages = state
            .cache
            .first()
            .map(|c| c.num_pages)
            .filter(|&n| n >= 2)
            .ok_or_else(|| missing("the latent caches"))?;
        Ok((pages - 1) as u32)
    }

    /// Grows every layer's cache to at least `needed` pages (contents kept).
    fn ensure_pages(&self, state: &mut State, needed: usize) -> Result<()> {
        let cfg = &self.cfg;
        let layers = self.cache_layers;
        let (kv_lora, rope) = (cfg.kv_lora_rank, cfg.qk_rope_head_dim);
        let width = kv_lora + rope;
        let have = state.cache.first().map_or(0, |c| c.num_pages);
        if state.cache.len() == layers && have >= needed {
            return Ok(());
        }
        let pages = needed.max(2 * have);
        if have > 0 {
            debug_log(|| format!("growing the latent caches from {have} to {pages} pages"));
        }
        let old = std::mem::take(&mut state.cache);
        for layer in 0..layers {
            let fresh = MlaCache::new(&self.dev, pages, kv_lora, rope)?;
            if let Some(prev) = old.get(layer).filter(|c| c.num_pages > 0) {
                let cols = PAGE_TOKENS * width;
                self.small
                    .prepare_copy_rows(CopyRowsDesc {
                        rows: prev.num_pages,
                        cols,
                        src: Region::from(&prev.data),
                        lds: cols,
                        src_col: 0,
                        src_rows: prev.num_pages,
                        dst: Region::from(&fresh.data),
                        ldd: cols,
                        dst_col: 0,
                        row_map: None,
                    })?
                    .launch()?;
            }
            state.cache.push(fresh);
        }
        // The old pages are freed only after the copies ran.
        self.dev.synchronize()?;
        drop(old);
        Ok(())
    }
}
