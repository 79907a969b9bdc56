//! The paged latent caches (one per cache layer, grown as block ids appear, pages copied for
//! forked sequences) and the MLA fast path's per-split workspaces.

use std::collections::HashMap;

use super::{missing, Core, State};
use crate::cuda::ops::{CopyRowsDesc, Region};
use crate::cuda::{Device, MlaCache, MlaWorkspace};
use crate::error::Result;
use crate::kv_cache::{Batch, PAGE_TOKENS};

/// The workspace for `parts` splits, grown to hold a step of `batch` sequences with up to
/// `max_q_len` queries of `heads` heads.
pub(super) fn mla_workspace<'s>(
    dev: &Device,
    spaces: &'s mut HashMap<usize, MlaWorkspace>,
    parts: usize,
    (batch, heads, max_q_len): (usize, usize, usize),
) -> Result<&'s mut MlaWorkspace> {
    let have = spaces.get(&parts).filter(|w| w.heads == heads);
    if !have.is_some_and(|w| w.batch >= batch && w.max_q_len >= max_q_len) {
        let (b, q) = have.map_or((batch, max_q_len), |w| {
            (w.batch.max(batch), w.max_q_len.max(max_q_len))
        });
        let ws = MlaWorkspace::with_parts(dev, b, heads, q, parts)?;
        spaces.insert(parts, ws);
    }
    spaces
        .get_mut(&parts)
        .ok_or_else(|| missing("the MLA workspace"))
}

impl Core {
    /// Grows every layer's cache to hold the batch's block ids (contents kept), then queues
    /// the batch's page copies.
    pub(super) fn prepare_pages(&self, state: &mut State, batch: &Batch) -> Result<()> {
        self.ensure_pages(state, batch.pages_needed().max(1))?;
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
