//! Split-K for the wgmma GEMMs ("Split-K" in cuda/params/common.h): which K-blocks a split
//! covers (the CPU reference follows the same ranges and order), the workspace a split GEMM
//! writes its partials and arrival counters to, and the launch fields.

use super::{Checker, Region};
use crate::cuda::error::Result;
use crate::cuda::{sys, Device, DeviceBuffer, DeviceInfo};

/// Rows of the slice one consumer warp reduces (R1_SPLIT_K_SLICE_ROWS).
pub const SPLIT_K_SLICE_ROWS: usize = sys::R1_SPLIT_K_SLICE_ROWS as usize;

/// The largest BLOCK_M and BLOCK_N of a kernel that splits K: a workspace unit holds one such
/// f32 tile.
const MAX_TILE_ROWS: usize = 128;
const MAX_TILE_COLS: usize = 128;

/// K-blocks of split `s` of `splits`: the kernels' rule, defined beside the CPU reference
/// that follows it.
pub use crate::numerics::split_k_range;

/// Partials and arrival counters for split GEMMs. One workspace serves every GEMM queued on
/// one stream (they run one after another, and each leaves the counters zero).
#[derive(Debug)]
pub struct SplitKWorkspace {
    partials: DeviceBuffer<f32>,
    counters: DeviceBuffer<u32>,
    max_units: usize,
    max_tiles: usize,
}

impl SplitKWorkspace {
    /// Room for `max_units` (tile, split) units and `max_tiles` output tiles of any kernel
    /// that splits (tiles up to 128 x 128). Counters start at zero.
    pub fn new(dev: &Device, max_units: usize, max_tiles: usize) -> Result<Self> {
        let (max_units, max_tiles) = (max_units.max(1), max_tiles.max(1));
        let [partials, counters] = Self::lens(max_units, max_tiles);
        Ok(SplitKWorkspace {
            partials: dev.alloc(partials)?,
            counters: dev.alloc_zeros(counters)?,
            max_units,
            max_tiles,
        })
    }

    /// Elements of the partials (f32) and counters (u32) of [`SplitKWorkspace::new`].
    pub fn lens(max_units: usize, max_tiles: usize) -> [usize; 2] {
        [
            max_units * MAX_TILE_ROWS * MAX_TILE_COLS,
            max_tiles * MAX_TILE_ROWS / SPLIT_K_SLICE_ROWS,
        ]
    }

    /// The (units, tiles) [`SplitKWorkspace::for_device`] makes room for on `info`.
    pub fn device_capacity(info: &DeviceInfo) -> (usize, usize) {
        (info.sm_count, info.sm_count)
    }

    /// Enough for every split [`crate::cuda::heuristics::split_k`] chooses on `dev`: it splits
    /// only while tiles * splits <= SMs.
    pub fn for_device(dev: &Device) -> Result<Self> {
        let (units, tiles) = Self::device_capacity(dev.info());
        Self::new(dev, units, tiles)
    }

    /// Units (tile, split) this workspace holds.
    pub fn max_units(&self) -> usize {
        self.max_units
    }

    /// The arrival counters (zero between launches).
    pub fn counters(&self) -> &DeviceBuffer<u32> {
        &self.counters
    }

    /// Output tiles this workspace has counters for.
    pub fn max_tiles(&self) -> usize {
        self.max_tiles
    }

    /// The launch description of `splits` over this workspace.
    pub fn desc(&self, splits: usize) -> SplitKDesc {
        SplitKDesc {
            splits,
            partials: Region::from(&self.partials),
            counters: Region::from(&self.counters),
        }
    }
}

/// A GEMM's split of K as the checks see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SplitKDesc {
    pub splits: usize,
    /// f32 `[tiles * splits][block_m][block_n]`.
    pub partials: Region,
    /// u32 `[tiles][block_m / 16]`, zero between launches.
    pub counters: Region,
}

impl SplitKDesc {
    /// No split: every tile stores directly, no workspace.
    pub const NONE: SplitKDesc = SplitKDesc {
        splits: 1,
        partials: Region { addr: 0, len: 0 },
        counters: Region { addr: 0, len: 0 },
    };

    /// 1 <= splits <= kblocks, and (when splitting) the workspace holds `tiles * splits`
    /// units of `block_m x block_n` f32 and `tiles * block_m / 16` counters.
    pub fn check(
        &self,
        kernel: &'static str,
        tiles: usize,
        kblocks: usize,
        block_m: usize,
        block_n: usize,
    ) -> Result<()> {
        let c = Checker { kernel };
        let splits = self.splits;
        c.req(splits >= 1 && splits <= kblocks, || {
            format!("split-K needs 1 <= splits <= K-blocks ({kblocks}); asked for {splits}")
        })?;
        if splits == 1 {
            return Ok(());
        }
        c.fits_i32(&[("splits", splits), ("tiles * splits", tiles * splits)])?;
        c.aligned("split-K partials", self.partials, 8)?;
        c.aligned("split-K counters", self.counters, 4)?;
        c.holds(
            "split-K partials",
            self.partials,
            tiles * splits * block_m * block_n,
            &format!("{tiles} tiles x {splits} splits of [{block_m}, {block_n}] f32"),
        )?;
        c.holds(
            "split-K counters",
            self.counters,
            tiles * block_m / SPLIT_K_SLICE_ROWS,
            &format!("{tiles} tiles x {} slices", block_m / SPLIT_K_SLICE_ROWS),
        )
    }

    /// The kernel's fields.
    pub fn params(&self) -> sys::R1SplitK {
        let split = self.splits > 1;
        sys::R1SplitK {
            partials: if split { self.partials.addr } else { 0 },
            counters: if split { self.counters.addr } else { 0 },
            splits: self.splits as i32,
            reserved: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ranges tile 0..kblocks in order, each non-empty while splits <= kblocks, and differ
    /// in length by at most one.
    #[test]
    fn ranges_tile_the_k_blocks() {
        for kblocks in 1..40 {
            for splits in 1..=kblocks {
                let ranges: Vec<_> = (0..splits)
                    .map(|s| split_k_range(kblocks, splits, s))
                    .collect();
                assert_eq!(ranges[0].start, 0);
                assert_eq!(ranges[splits - 1].end, kblocks);
                for w in ranges.windows(2) {
                    assert_eq!(w[0].end, w[1].start);
                }
                let lens: Vec<usize> = ranges.iter().map(|r| r.len()).collect();
                let (lo, hi) = (lens.iter().min().unwrap(), lens.iter().max().unwrap());
                assert!(*lo >= 1 && hi - lo <= 1, "{kblocks} / {splits}: {lens:?}");
            }
        }
    }

    #[test]
    fn checks_name_the_workspace() {
        let region = |addr, len| Region { addr, len };
        let d = SplitKDesc {
            splits: 4,
            partials: region(0x1000, 4 * 3 * 64 * 128),
            counters: region(0x2000, 3 * 4),
        };
        assert!(d.check("k", 3, 8, 64, 128).is_ok());
        assert!(d.params().partials == 0x1000 && d.params().splits == 4);
        let e = d.check("k", 4, 8, 64, 128).unwrap_err().to_string();
        assert!(e.contains("split-K partials holds"), "{e}");
        let e = d.check("k", 3, 3, 64, 128).unwrap_err().to_string();
        assert!(e.contains("splits <= K-blocks (3)"), "{e}");
        let e = SplitKDesc {
            counters: region(0x2000, 11),
            ..d
        }
        .check("k", 3, 8, 64, 128)
        .unwrap_err()
        .to_string();
        assert!(e.contains("split-K counters holds 11"), "{e}");
        assert!(SplitKDesc::NONE.check("k", 1000, 1, 128, 128).is_ok());
        assert_eq!(SplitKDesc::NONE.params().partials, 0);
    }
}
