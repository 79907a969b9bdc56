//! Kernel timing for benches: CUDA events recorded on the device's stream around each call,
//! with the L2 cache flushed before each timed call (a memset over a buffer several times the
//! L2 size), so operands come from HBM as they do in a model: a harness that lets
//! operands stay in L2 flatters small GEMMs.

use cudarc::driver::sys::CUevent_flags;

use super::error::{CudaError, Result};
use super::{Device, DeviceBuffer};

/// Evicts the L2 cache by writing a buffer of `max(4 x L2, 64 MiB)` bytes.
pub struct L2Flush {
    buf: DeviceBuffer<u8>,
    calls: u8,
}

impl L2Flush {
    pub fn new(dev: &Device) -> Result<Self> {
        let bytes = (4 * dev.info().l2_bytes).max(64 << 20);
        Ok(L2Flush {
            buf: dev.alloc(bytes)?,
            calls: 0,
        })
    }

    pub fn bytes(&self) -> usize {
        self.buf.len()
    }

    /// Queues the flush on the device's stream.
    pub fn flush(&mut self, dev: &Device) -> Result<()> {
        self.calls = self.calls.wrapping_add(1);
        dev.memset(&mut self.buf, self.calls)
    }
}

/// Times `iters` calls of `f` (each one queueing GPU work on `dev`'s stream), flushing L2
/// before each when `flush` is given. Returns each call's GPU time in microseconds, measured
/// by events recorded right before and after it (the flush is outside the interval).
pub fn time_calls(
    dev: &Device,
    mut flush: Option<&mut L2Flush>,
    iters: usize,
    mut f: impl FnMut() -> Result<()>,
) -> Result<Vec<f64>> {
    let ctx = dev.context();
    let stream = dev.stream();
    let ev = |_| {
        ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(|e| CudaError::driver("cuEventCreate", e))
    };
    let starts = (0..iters).map(ev).collect::<Result<Vec<_>>>()?;
    let ends = (0..iters).map(ev).collect::<Result<Vec<_>>>()?;
    for (s, e) in starts.iter().zip(&ends) {
        if let Some(fl) = flush.as_deref_mut() {
            fl.flush(dev)?;
        }
        s.record(stream)
            .map_err(|e| CudaError::driver("cuEventRecord", e))?;
        f()?;
        e.record(stream)
            .map_err(|e| CudaError::driver("cuEventRecord", e))?;
    }
    dev.synchronize()?;
    starts
        .iter()
        .zip(&ends)
        .map(|(s, e)| {
            s.elapsed_ms(e)
                .map(|ms| f64::from(ms) * 1e3)
                .map_err(|e| CudaError::driver("cuEventElapsedTime", e))
        })
        .collect()
}

/// Summary statistics of a set of timings (microseconds).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stats {
    pub median_us: f64,
    pub min_us: f64,
    pub mean_us: f64,
    pub max_us: f64,
    pub n: usize,
}

impl Stats {
    /// Panics on an empty slice.
    pub fn of(times_us: &[f64]) -> Stats {
        assert!(!times_us.is_empty(), "no timings");
        let mut t = times_us.to_vec();
        t.sort_by(f64::total_cmp);
        let n = t.len();
        let median_us = if n % 2 == 1 {
            t[n / 2]
        } else {
            (t[n / 2 - 1] + t[n / 2]) / 2.0
        };
        Stats {
            median_us,
            min_us: t[0],
            mean_us: t.iter().sum::<f64>() / n as f64,
            max_us: t[n - 1],
            n,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Stats;

    #[test]
    fn stats_median_min_max() {
        let s = Stats::of(&[3.0, 1.0, 2.0, 10.0]);
        assert_eq!((s.median_us, s.min_us, s.max_us, s.n), (2.5, 1.0, 10.0, 4));
        assert_eq!(Stats::of(&[5.0, 1.0, 3.0]).median_us, 3.0);
    }
}
