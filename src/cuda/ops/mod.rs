//! Safe launch wrappers. Each kernel has a `*Desc` (the call as plain numbers: shape, strides,
//! buffer addresses and lengths) whose `check` enforces every requirement that
//! cuda/launch_params.h documents and names the one that fails; `*Args` borrow the buffers,
//! `prepare_*` checks and builds the parameter struct once (tensor maps included) into a
//! [`Prepared`] launch (src/cuda/launch.rs) that launches any number of times (benches,
//! CUDA-graph capture).

mod act_quant;
mod bf16_gemm;
mod fp8_gemm;
mod mla;
mod mla_attn;
mod moe;
mod moe_block;
mod moe_gemm;
mod moe_permute;
mod moe_route;
mod probe;
mod random_fill;
mod sampling;
mod small_ops;
mod split_k;

pub use super::launch::Prepared;
pub use act_quant::{ActQuantArgs, ActQuantDesc, QuantizedActivations};
pub use bf16_gemm::{Bf16GemmDesc, Bf16GemmKernel, Bf16Out};
pub use fp8_gemm::{Fp8GemmArgs, Fp8GemmDesc, Fp8Weight, GemmKernel};
pub use mla::{
    Mla, MlaBatch, MlaCache, MlaCacheWriteArgs, MlaCacheWriteDesc, MlaLayout, MlaQRopeArgs,
    MlaQRopeDesc, MlaRope, MLA_PAGE_TOKENS,
};
pub use mla_attn::{
    MlaAttnArgs, MlaAttnDesc, MlaKernel, MlaWorkspace, MlaWorkspaceDesc, MLA_BLOCK_M,
    MLA_FAST_KV_LORA, MLA_FAST_ROPE, MLA_SCHED_FIXED_OVERHEAD, MLA_SCHED_MAX_BATCH,
};
pub use moe::{
    MoeFlags, MoeGeometry, MoeLayout, MoeOps, RouterConfig, MOE_BLOCK_M, MOE_FLAGS_LEN,
    MOE_MAX_EXPERTS, MOE_MAX_TOP_K,
};
pub use moe_block::{MoeBlockConfig, MoeBlockWeights, MoeGemmPath, MoeWorkspace};
pub use moe_gemm::{
    ExpertWeight, GroupedFp8Weight, GroupedGemmArgs, GroupedGemmDesc, GroupedGemmKernel,
};
pub use moe_permute::{
    plan_host, sigmoid_gpu, silu_gpu, silu_quant_host, unpermute_host, GatherArgs, GatherDesc,
    MoePlanBuffers, PermutedRows, PlanArgs, PlanDesc, PlanHost, SiluQuantArgs, SiluQuantDesc,
    UnpermuteArgs, UnpermuteDesc,
};
pub use moe_route::{
    logits_staging, route_host, router_logits_host, LogitsStaging, RoutedHost, RouterArgs,
    RouterDesc, RouterLogitsArgs, RouterLogitsDesc,
};
pub use probe::{WgmmaProbe, WGMMA_PROBE_M, WGMMA_PROBE_N, WGMMA_PROBE_REGS, WGMMA_PROBE_THREADS};
pub use random_fill::{random_fill_host, FillElement, RandomFill, RandomFillArgs, RandomFillDesc};
pub use sampling::{SampleArgs, SampleDesc, SampleRow};
pub use small_ops::{
    CopyRowsDesc, EltwiseDesc, EmbedDesc, GemmBf16Desc, MlaAbsorbDesc, MlaAbsorbQRopeDesc,
    MoeAccumDesc, NormQuantDesc, QuantOut, RmsNormDesc, SiluMulQuantDesc, SmallOps,
};
pub use split_k::{split_k_range, SplitKDesc, SplitKWorkspace, SPLIT_K_SLICE_ROWS};

use super::error::{CudaError, Result};
use super::sys;

/// Channels per activation scale and per weight-scale block side (R1_QUANT_BLOCK).
pub const QUANT_BLOCK: usize = sys::R1_QUANT_BLOCK as usize;
/// The SA layout pads M to a multiple of this (R1_ACT_SCALE_M_ALIGN).
pub const ACT_SCALE_M_ALIGN: usize = sys::R1_ACT_SCALE_M_ALIGN as usize;

/// A buffer as the checks see it: device address and length in elements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Region {
    pub addr: u64,
    pub len: usize,
}

/// The address a kernel reads for an optional buffer: 0 when absent.
pub(crate) fn opt_addr(r: Option<Region>) -> u64 {
    r.map_or(0, |r| r.addr)
}

impl<T> From<&super::DeviceBuffer<T>> for Region {
    fn from(b: &super::DeviceBuffer<T>) -> Self {
        Region {
            addr: b.addr(),
            len: b.len(),
        }
    }
}

impl<T> From<&mut super::DeviceBuffer<T>> for Region {
    fn from(b: &mut super::DeviceBuffer<T>) -> Self {
        Region::from(&*b)
    }
}

/// M rounded up to the SA layout's row alignment (4).
pub fn act_scale_m_pad(m: usize) -> usize {
    m.div_ceil(ACT_SCALE_M_ALIGN) * ACT_SCALE_M_ALIGN
}

/// Row-major scales `[rows][kb]` (the CPU reference's layout) -> SA layout
/// `sa[b * m_pad + r]` (padding rows are zero).
pub fn scales_to_sa(row_major: &[f32], rows: usize, kb: usize, m_pad: usize) -> Vec<f32> {
    assert!(m_pad >= rows && row_major.len() >= rows * kb);
    let mut sa = vec![0f32; kb * m_pad];
    for r in 0..rows {
        for b in 0..kb {
            sa[b * m_pad + r] = row_major[r * kb + b];
        }
    }
    sa
}

/// SA layout -> row-major `[rows][kb]`.
pub fn scales_from_sa(sa: &[f32], rows: usize, kb: usize, m_pad: usize) -> Vec<f32> {
    assert!(m_pad >= rows && sa.len() >= kb * m_pad);
    let mut out = vec![0f32; rows * kb];
    for r in 0..rows {
        for b in 0..kb {
            out[r * kb + b] = sa[b * m_pad + r];
        }
    }
    out
}

/// Shared helpers for the checks.
pub(crate) struct Checker {
    pub kernel: &'static str,
}

impl Checker {
    pub fn req(&self, ok: bool, what: impl FnOnce() -> String) -> Result<()> {
        if ok {
            Ok(())
        } else {
            Err(CudaError::requirement(self.kernel, what()))
        }
    }

    pub fn fits_i32(&self, pairs: &[(&str, usize)]) -> Result<()> {
        for &(name, v) in pairs {
            self.req(v <= i32::MAX as usize, || {
                format!("{name} = {v} must fit in a 32-bit int")
            })?;
        }
        Ok(())
    }

    /// Leading dimensions of a GEMM D = A · B^T: each `(name, ld)` of A or B at least K, D's
    /// at least N.
    pub fn gemm_strides(
        &self,
        k: usize,
        n: usize,
        operands: &[(&str, usize)],
        (d_name, ldd): (&str, usize),
    ) -> Result<()> {
        for &(name, ld) in operands {
            self.req(ld >= k, || format!("{name} ({ld}) must be >= K ({k})"))?;
        }
        self.req(ldd >= n, || format!("{d_name} ({ldd}) must be >= N ({n})"))
    }

    pub fn aligned(&self, name: &str, r: Region, align: u64) -> Result<()> {
        self.req(r.addr % align == 0, || {
            format!("{name} ({:#x}) must be {align}-byte aligned", r.addr)
        })
    }

    /// A row-major `[rows][ld]` matrix whose rows use `cols` elements.
    pub fn holds_matrix(
        &self,
        name: &str,
        r: Region,
        rows: usize,
        cols: usize,
        ld: usize,
    ) -> Result<()> {
        let need = (rows - 1)
            .checked_mul(ld)
            .and_then(|v| v.checked_add(cols))
            .unwrap_or(usize::MAX);
        self.req(r.len >= need, || {
            format!(
                "{name} holds {} elements; [{rows} rows, stride {ld}] x {cols} columns needs {need}",
                r.len
            )
        })
    }

    /// The SA scale layout's padded row count: at least the rows and a multiple of 4.
    pub fn sa_pad(&self, name: &str, pad: usize, rows: usize, rows_name: &str) -> Result<()> {
        self.req(pad >= rows && pad % 4 == 0, || {
            format!(
                "{name} ({pad}) must be >= {rows_name} ({rows}) and a multiple of 4 (SA layout)"
            )
        })
    }

    pub fn holds(&self, name: &str, r: Region, need: usize, what: &str) -> Result<()> {
        self.req(r.len >= need, || {
            format!("{name} holds {} elements; {what} needs {need}", r.len)
        })
    }
}

/// A check's error message (the tests of the ops' requirements).
#[cfg(test)]
pub(crate) fn err_of<T: std::fmt::Debug>(r: Result<T>) -> String {
    r.unwrap_err().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sa_layout_round_trips() {
        let (rows, kb) = (5, 3);
        let m_pad = act_scale_m_pad(rows);
        assert_eq!(m_pad, 8);
        let row_major: Vec<f32> = (0..rows * kb).map(|i| i as f32).collect();
        let sa = scales_to_sa(&row_major, rows, kb, m_pad);
        assert_eq!(sa.len(), kb * m_pad);
        assert_eq!(sa[m_pad + 2], row_major[2 * kb + 1]); // row 2, block 1
        assert_eq!(scales_from_sa(&sa, rows, kb, m_pad), row_major);
    }
}
