//! random_fill: counter-hash random values written on the device, so a synthetic
//! real-dimension model (`model::weights::Weight::Synthetic`) is generated where it is used
//! instead of being built and uploaded from the host. The exact stream:
//! cuda/params/random_fill.h; [`random_fill_host`] computes the same elements on the host
//! (tests/gpu_synthetic.rs compares them bit for bit).

use std::ops::Range;

use bytemuck::Pod;
use cudarc::driver::LaunchConfig;
use half::bf16;

use super::{Checker, Region};
use crate::cuda::error::Result;
use crate::cuda::launch::{KernelLaunch, Prepared};
use crate::cuda::sys::{self, R1RandomFillParams};
use crate::cuda::{Device, DeviceBuffer};
use crate::numerics::f32_to_e4m3;
use crate::numerics::sampling::SplitMix64;

const KERNEL: &str = "random_fill";
const THREADS: u32 = sys::R1_FILL_THREADS;
const MAX_BLOCKS: usize = sys::R1_FILL_MAX_BLOCKS as usize;

/// An element type the fill writes: `u8` buffers hold FP8 e4m3 codes.
pub trait FillElement: Pod {
    /// The header's `R1_FILL_*` kind.
    const KIND: i32;
    /// The stored form of a value, rounded as the kernel rounds it.
    fn store(v: f32) -> Self;
}

impl FillElement for u8 {
    const KIND: i32 = sys::R1_FILL_E4M3 as i32;
    fn store(v: f32) -> Self {
        f32_to_e4m3(v)
    }
}

impl FillElement for bf16 {
    const KIND: i32 = sys::R1_FILL_BF16 as i32;
    fn store(v: f32) -> Self {
        bf16::from_f32(v)
    }
}

impl FillElement for f32 {
    const KIND: i32 = sys::R1_FILL_F32 as i32;
    fn store(v: f32) -> Self {
        v
    }
}

/// What a fill writes: element i is `center + spread * u_i` (one rounding), u_i uniform in
/// [-1, 1) from the counter hash of (`seed`, i).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RandomFill {
    pub seed: u64,
    pub center: f32,
    pub spread: f32,
}

impl RandomFill {
    /// Element `i` before it is stored (cuda/params/random_fill.h).
    pub fn value(&self, i: u64) -> f32 {
        let z = SplitMix64::nth(self.seed, i + 1);
        // Exact: a 24-bit integer times a power of two, minus one.
        let u = (z >> 40) as f32 * (1.0 / 8_388_608.0) - 1.0;
        self.spread.mul_add(u, self.center)
    }
}

/// The first `n` elements of `fill` as the kernel stores them.
pub fn random_fill_host<T: FillElement>(n: usize, fill: &RandomFill) -> Vec<T> {
    (0..n as u64).map(|i| T::store(fill.value(i))).collect()
}

/// A random_fill call as plain numbers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RandomFillDesc {
    /// `R1_FILL_*`.
    pub kind: i32,
    /// `n` elements of the kind's type.
    pub out: Region,
    pub n: usize,
    pub fill: RandomFill,
}

impl RandomFillDesc {
    /// Every requirement of random_fill.h, checked on the host.
    pub fn check(&self) -> Result<()> {
        let c = Checker { kernel: KERNEL };
        c.req(self.n >= 1, || "n must be >= 1".into())?;
        c.req(
            [sys::R1_FILL_E4M3, sys::R1_FILL_BF16, sys::R1_FILL_F32]
                .iter()
                .any(|&k| k as i32 == self.kind),
            || format!("kind {} is not an R1_FILL_* kind", self.kind),
        )?;
        c.req(
            self.fill.center.is_finite() && self.fill.spread.is_finite(),
            || {
                format!(
                    "center ({}) and spread ({}) must be finite",
                    self.fill.center, self.fill.spread
                )
            },
        )?;
        c.holds("out", self.out, self.n, "[n]")
    }
}

impl KernelLaunch for RandomFillDesc {
    type Params = R1RandomFillParams;

    fn kernel(&self) -> &'static str {
        KERNEL
    }

    fn params(&self) -> Result<R1RandomFillParams> {
        Ok(R1RandomFillParams {
            out: self.out.addr,
            n: self.n as i64,
            seed: self.fill.seed,
            center: self.fill.center,
            spread: self.fill.spread,
            kind: self.kind,
            reserved: 0,
        })
    }

    fn launch_config(&self) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (
                self.n.div_ceil(THREADS as usize).min(MAX_BLOCKS) as u32,
                1,
                1,
            ),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        }
    }
}

/// A fill of elements `range` of `out` (element `range.start + i` gets the stream's
/// element i).
#[derive(Debug)]
pub struct RandomFillArgs<'a, T> {
    pub out: &'a mut DeviceBuffer<T>,
    pub range: Range<usize>,
    pub fill: RandomFill,
}

impl Device {
    /// Checks `args` and builds the launch; no work is queued.
    pub fn prepare_random_fill<'a, T: FillElement>(
        &'a self,
        args: RandomFillArgs<'a, T>,
    ) -> Result<Prepared<'a>> {
        let Range { start, end } = args.range;
        let c = Checker { kernel: KERNEL };
        c.req(start <= end && end <= args.out.len(), || {
            format!(
                "elements {start}..{end} do not lie in a buffer of {}",
                args.out.len()
            )
        })?;
        let desc = RandomFillDesc {
            kind: T::KIND,
            out: Region {
                addr: args.out.addr() + (start * std::mem::size_of::<T>()) as u64,
                len: end - start,
            },
            n: end - start,
            fill: args.fill,
        };
        desc.check()?;
        Prepared::single(self, &desc)
    }

    /// A new buffer of `len` elements filled by `fill` (queued on the stream).
    pub fn random_buffer<T: FillElement>(
        &self,
        len: usize,
        fill: RandomFill,
    ) -> Result<DeviceBuffer<T>> {
        let mut buf = self.alloc(len)?;
        if len > 0 {
            self.prepare_random_fill(RandomFillArgs {
                out: &mut buf,
                range: 0..len,
                fill,
            })?
            .launch()?;
        }
        Ok(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::launch::row_symbol;

    #[test]
    fn values_are_uniform_in_center_plus_minus_spread() {
        let fill = RandomFill {
            seed: 7,
            center: 1.0,
            spread: 0.25,
        };
        let v: Vec<f32> = random_fill_host(10_000, &fill);
        assert!(v.iter().all(|&x| (0.75..1.25).contains(&x)), "out of range");
        let mean = v.iter().sum::<f32>() / v.len() as f32;
        assert!((mean - 1.0).abs() < 0.01, "mean {mean}");
        let other = RandomFill { seed: 8, ..fill };
        assert_ne!(v[..16], random_fill_host::<f32>(16, &other)[..]);
        // Stored forms round the same value.
        let codes: Vec<u8> = random_fill_host(4, &fill);
        assert_eq!(codes[0], f32_to_e4m3(fill.value(0)));
    }

    #[test]
    fn the_desc_checks_its_operands() {
        let desc = RandomFillDesc {
            kind: sys::R1_FILL_BF16 as i32,
            out: Region {
                addr: 256,
                len: 100,
            },
            n: 100,
            fill: RandomFill {
                seed: 0,
                center: 0.0,
                spread: 1.0,
            },
        };
        desc.check().unwrap();
        assert_eq!(row_symbol(&desc), "random_fill");
        let e = RandomFillDesc { n: 101, ..desc }.check().unwrap_err();
        assert!(e.to_string().contains("out holds 100"), "{e}");
        let e = RandomFillDesc { kind: 9, ..desc }.check().unwrap_err();
        assert!(e.to_string().contains("kind 9"), "{e}");
        let bad = RandomFill {
            spread: f32::NAN,
            ..desc.fill
        };
        assert!(RandomFillDesc { fill: bad, ..desc }.check().is_err());
        let cfg = RandomFillDesc { n: 1 << 40, ..desc }.launch_config();
        assert_eq!(cfg.grid_dim.0 as usize, MAX_BLOCKS);
    }
}
