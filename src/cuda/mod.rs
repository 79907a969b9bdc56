//! The CUDA backend's foundations (Hopper, sm_90a), layered like cudarc's sys/result/safe:
//!
//! - `sys` (private): the generated launch-parameter structs of `cuda/launch_params.h` and the
//!   cubins build.rs embedded.
//! - `launch` (private): the kernel table (every kernel's shared memory, register budget and
//!   parameter struct, declared `DeviceRepr` there), the kernels loaded once per device, and
//!   [`Prepared`], the one launch path.
//! - [`error`]: [`CudaError`], typed: no driver, no device, wrong architecture, built without
//!   kernels, out of memory, a broken kernel requirement (named), or another driver error.
//! - [`Device`] / [`DeviceBuffer`]: presence check, context, one stream, the loaded kernels,
//!   device memory. A `Device` is a cheap clone; kernel handles hold one.
//! - [`ops`]: host-checked launch wrappers: [`Device::act_quant`], [`Device::fp8_gemm`] (wgmma
//!   for large M, the BLOCK_M 64 variant for small M, the reference kernel explicitly and as
//!   the fallback), each also as `prepare_*` + launch for benches and graph capture.
//! - `graph`: CUDA-graph capture and replay over the device's stream ([`Device::capture`],
//!   [`CapturedGraph`]); allocations, host copies and synchronizations are refused while a
//!   capture runs.
//! - [`heuristics`]: every choice made from shapes and device info (kernel, persistent CTAs,
//!   MLA split, MoE layout and path) as pure functions; `R1_PRINT_CHOICES=1` prints each once.
//! - [`timing`]: CUDA-event timing with an L2 flush between calls (benches).
//! - [`backend`]: [`CudaBackend`], the engine's `--backend cuda` (w8a8): every graph op on the
//!   GPU with the kernels above, MLA, MoE and the small ops of cuda/small_ops.cu.
//!
//! cudarc loads libcuda at run time, so a binary built with this module starts on machines
//! without a driver; [`Device::open`] then returns [`CudaError::NoDriver`] (or `NoDevice`, ...).

pub mod backend;
mod buffer;
mod device;
pub mod error;
mod graph;
pub mod heuristics;
mod launch;
pub mod ops;
mod sys;
pub mod timing;
mod tma;

pub use backend::{CudaBackend, CudaOptions};
pub use buffer::DeviceBuffer;
pub use device::{kernels_built, AllocationCount, Device, DeviceInfo};
pub use error::{CudaError, Result};
pub use graph::CapturedGraph;
pub use heuristics::{
    mla_plan_parts, mla_schedule_host, prefill_form_by_cost, MlaSchedule, PrefillForm,
};
pub use launch::{KernelAttributes, Prepared};
pub use ops::{
    act_scale_m_pad, scales_from_sa, scales_to_sa, ActQuantArgs, ActQuantDesc, Fp8GemmArgs,
    Fp8GemmDesc, Fp8Weight, GemmKernel, QuantizedActivations, Region,
};
pub use ops::{
    Mla, MlaAttnArgs, MlaAttnDesc, MlaBatch, MlaCache, MlaCacheWriteArgs, MlaCacheWriteDesc,
    MlaKernel, MlaLayout, MlaQRopeArgs, MlaQRopeDesc, MlaRope, MlaWorkspace, MlaWorkspaceDesc,
    MLA_BLOCK_M, MLA_FAST_KV_LORA, MLA_FAST_ROPE, MLA_PAGE_TOKENS, MLA_SCHED_FIXED_OVERHEAD,
    MLA_SCHED_MAX_BATCH,
};
pub use ops::{SampleArgs, SampleDesc, SampleRow};
pub use tma::{TensorMap2d, TmaElem};

/// The diagnostics switches (`R1_CUDA_TRACE`, `R1_PRINT_CHOICES`) are on for any value but
/// empty or "0".
fn switch_on(value: Option<&std::ffi::OsStr>) -> bool {
    value.is_some_and(|v| !v.is_empty() && v != "0")
}

/// Whether the diagnostics switch `var` is on in this process's environment.
pub(crate) fn env_switch(var: &str) -> bool {
    switch_on(std::env::var_os(var).as_deref())
}

#[cfg(test)]
mod tests {
    use super::switch_on;
    use std::ffi::OsStr;

    #[test]
    fn switches_are_on_for_any_value_but_empty_or_zero() {
        assert!(switch_on(Some(OsStr::new("1"))));
        assert!(switch_on(Some(OsStr::new("yes"))));
        assert!(!switch_on(Some(OsStr::new("0"))));
        assert!(!switch_on(Some(OsStr::new(""))));
        assert!(!switch_on(None));
    }
}
