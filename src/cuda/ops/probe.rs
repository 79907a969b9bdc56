//! Layout probes (cuda/probe.cu): diagnostics, not part of inference. Each runs one piece of
//! the fast kernels' Hopper machinery in isolation so that a wrong result names the piece;
//! tests/gpu_probes.rs checks them and explains what a mismatch points to.

use cudarc::driver::LaunchConfig;

use super::{Checker, Region};
use crate::cuda::error::Result;
use crate::cuda::launch::{KernelLaunch, Prepared};
use crate::cuda::sys::{self, R1ProbeWgmmaParams};
use crate::cuda::Device;

/// Rows of the wgmma probe's A (M of m64n128k32).
pub const WGMMA_PROBE_M: usize = 64;
/// Rows of the wgmma probe's B (N of m64n128k32).
pub const WGMMA_PROBE_N: usize = 128;
/// Threads of the probe's warpgroup, each holding [`WGMMA_PROBE_REGS`] accumulators.
pub const WGMMA_PROBE_THREADS: usize = sys::R1_PROBE_WGMMA_THREADS as usize;
/// f32 accumulator registers per thread of one m64n128 wgmma.
pub const WGMMA_PROBE_REGS: usize = WGMMA_PROBE_M * WGMMA_PROBE_N / WGMMA_PROBE_THREADS;

/// Which wgmma probe runs: the same hand-swizzled operands, one or four k32 steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WgmmaProbe {
    /// `probe_wgmma_m64n128k32`: K = 32, one wgmma (descriptors and fragment layout).
    K32,
    /// `probe_wgmma_m64n128k32x4`: K = 128 as four wgmma, descriptors advanced by 32 bytes
    /// per step as the GEMM pipeline does (the k-advance).
    K128,
}

impl WgmmaProbe {
    pub fn name(self) -> &'static str {
        match self {
            WgmmaProbe::K32 => "probe_wgmma_m64n128k32",
            WgmmaProbe::K128 => "probe_wgmma_m64n128k32x4",
        }
    }

    pub fn k(self) -> usize {
        match self {
            WgmmaProbe::K32 => 32,
            WgmmaProbe::K128 => 128,
        }
    }
}

/// One probe over A, B and out at these addresses.
struct ProbeLaunch {
    probe: WgmmaProbe,
    a: u64,
    b: u64,
    out: u64,
}

impl KernelLaunch for ProbeLaunch {
    type Params = R1ProbeWgmmaParams;

    fn kernel(&self) -> &'static str {
        self.probe.name()
    }

    fn params(&self) -> Result<R1ProbeWgmmaParams> {
        Ok(R1ProbeWgmmaParams {
            a: self.a,
            b: self.b,
            out: self.out,
        })
    }

    fn launch_config(&self) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (sys::R1_PROBE_WGMMA_THREADS, 1, 1),
            shared_mem_bytes: sys::R1_PROBE_WGMMA_SMEM_BYTES,
        }
    }
}

impl Device {
    /// Runs `probe` on A fp8 `[64][K]` and B fp8 `[128][K]` (row-major, K = `probe.k()`) and
    /// returns the warpgroup's raw accumulators in register order: `out[t * 64 + j]` is
    /// register j of thread t, which cuda/ptx.cuh's fragment layout places at
    /// D[row][col] of D = A B^T. Waits for the result.
    pub fn probe_wgmma(&self, probe: WgmmaProbe, a: &[u8], b: &[u8]) -> Result<Vec<f32>> {
        let c = Checker {
            kernel: probe.name(),
        };
        let k = probe.k();
        c.req(
            a.len() == WGMMA_PROBE_M * k && b.len() == WGMMA_PROBE_N * k,
            || {
                format!(
                    "A must be [64][{k}] and B [128][{k}]; got {} and {} bytes",
                    a.len(),
                    b.len()
                )
            },
        )?;
        let a = self.upload(a)?;
        let b = self.upload(b)?;
        let out = self.alloc_zeros::<f32>(WGMMA_PROBE_THREADS * WGMMA_PROBE_REGS)?;
        for (name, r) in [
            ("A", Region::from(&a)),
            ("B", Region::from(&b)),
            ("out", Region::from(&out)),
        ] {
            c.aligned(name, r, 16)?;
        }
        // a, b and out were allocated here with exactly the lengths the kernel reads and
        // writes (launch_params.h PROBE SECTION) and live until the download below has waited
        // for the kernel.
        Prepared::single(
            self,
            &ProbeLaunch {
                probe,
                a: a.addr(),
                b: b.addr(),
                out: out.addr(),
            },
        )?
        .launch()?;
        self.download(&out)
    }
}
