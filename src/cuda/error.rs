//! Typed errors of the CUDA backend: every failure says what is missing or which documented
//! requirement a call broke, so a GPU-less machine reports a reason instead of panicking.

use cudarc::driver::{sys::CUresult, DriverError};

pub type Result<T, E = CudaError> = std::result::Result<T, E>;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CudaError {
    /// libcuda (the NVIDIA driver's user-space library) could not be loaded or is a stub.
    #[error("no CUDA driver: {0}")]
    NoDriver(String),

    /// The driver loaded but there is no device with this ordinal.
    #[error("no CUDA device {ordinal} (the driver reports {count} device(s))")]
    NoDevice { ordinal: usize, count: usize },

    /// The kernels are sm_90a cubins: they load only on compute capability 9.0 (H100/H200).
    #[error(
        "device has compute capability {}.{}; these kernels are built for sm_90a (Hopper: H100/H200)",
        found.0, found.1
    )]
    WrongArch { found: (i32, i32) },

    /// build.rs found no nvcc, so no cubins are embedded.
    #[error(
        "built without CUDA kernels: install the toolchain with tools/install-cuda-toolchain and rebuild"
    )]
    BuiltWithoutKernels,

    /// A device allocation failed for lack of memory.
    #[error("out of device memory allocating {bytes} bytes")]
    OutOfMemory { bytes: usize },

    /// A host-side check of a kernel's documented requirement (cuda/launch_params.h) failed.
    #[error("{kernel}: {requirement}")]
    Requirement {
        kernel: &'static str,
        requirement: String,
    },

    /// A kernel that reallocates registers (setmaxnreg) was built with fewer registers per
    /// thread than its budget needs: launched, its consumers would wait forever.
    #[error(
        "{kernel} has {registers} registers per thread but its setmaxnreg budget needs at least \
         {needed} (cuda/launch_params.h R1_REALLOC_*): launching it would hang; rebuild with \
         matching __launch_bounds__ or change the budget"
    )]
    RegisterBudget {
        kernel: String,
        registers: u32,
        needed: u32,
    },

    /// A host-side copy or download outside a buffer's length.
    #[error("out of bounds: {0}")]
    OutOfBounds(String),

    /// A CUDA-graph capture could not record the step (something in it is not capturable,
    /// e.g. an allocation or a host synchronization); the step runs without a graph.
    #[error("CUDA graph capture: {0}")]
    Capture(String),

    /// A kernel (or its cuda/ source) the build did not embed.
    #[error("{what} is not among the embedded kernels (rebuild the crate)")]
    NotEmbedded { what: String },

    /// The driver library panicked inside cudarc (e.g. a symbol missing from an old libcuda).
    #[error("CUDA driver: {call}: {message}")]
    DriverPanic { call: String, message: String },

    /// Any other driver failure: the call that failed and the driver's result code.
    #[error("CUDA driver: {call}: {}", describe(*.source))]
    Driver {
        call: String,
        #[source]
        source: DriverError,
    },
}

impl CudaError {
    pub(crate) fn requirement(kernel: &'static str, requirement: impl Into<String>) -> Self {
        CudaError::Requirement {
            kernel,
            requirement: requirement.into(),
        }
    }

    /// Wraps a driver error with the call that returned it.
    pub(crate) fn driver(call: &str, e: DriverError) -> Self {
        CudaError::Driver {
            call: call.to_string(),
            source: e,
        }
    }

    /// The driver's result code, for a driver error.
    pub fn driver_result(&self) -> Option<CUresult> {
        match self {
            CudaError::Driver { source, .. } => Some(source.0),
            _ => None,
        }
    }

    /// Device memory ran out: an allocation, or any driver call answering
    /// CUDA_ERROR_OUT_OF_MEMORY (module loads, launches).
    pub fn is_out_of_memory(&self) -> bool {
        matches!(self, CudaError::OutOfMemory { .. })
            || self.driver_result() == Some(CUresult::CUDA_ERROR_OUT_OF_MEMORY)
    }

    /// A host-side check caught a call that breaks a kernel's rules, or a kernel was built
    /// against its register budget: a bug in this crate or its caller, not a device state.
    pub fn is_broken_requirement(&self) -> bool {
        matches!(
            self,
            CudaError::Requirement { .. }
                | CudaError::RegisterBudget { .. }
                | CudaError::OutOfBounds(_)
        )
    }
}

/// "CUDA_ERROR_X (description)" for a driver error (the bare code name when no driver library
/// is loaded to describe it).
pub(crate) fn describe(e: DriverError) -> String {
    // SAFETY: only tries dlopen on the usual libcuda names.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return format!("{:?}", e.0);
    }
    let name = e
        .error_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|_| format!("{:?}", e.0));
    match e.error_string() {
        Ok(s) => format!("{name} ({})", s.to_string_lossy()),
        Err(_) => name,
    }
}

/// Maps a driver error from an allocation of `bytes`.
pub(crate) fn alloc_error(bytes: usize, e: DriverError) -> CudaError {
    if e.0 == CUresult::CUDA_ERROR_OUT_OF_MEMORY {
        CudaError::OutOfMemory { bytes }
    } else {
        CudaError::driver(&format!("cuMemAlloc({bytes} bytes)"), e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn driver_errors_keep_their_code_and_call() {
        let e = CudaError::driver(
            "cuLaunchKernel(fp8_gemm_wgmma)",
            DriverError(CUresult::CUDA_ERROR_ILLEGAL_ADDRESS),
        );
        assert_eq!(
            e.driver_result(),
            Some(CUresult::CUDA_ERROR_ILLEGAL_ADDRESS)
        );
        let msg = e.to_string();
        assert!(
            msg.starts_with(
                "CUDA driver: cuLaunchKernel(fp8_gemm_wgmma): CUDA_ERROR_ILLEGAL_ADDRESS"
            ),
            "{msg}"
        );
        assert!(std::error::Error::source(&e).is_some());
        assert!(!e.is_out_of_memory() && !e.is_broken_requirement());
    }

    #[test]
    fn out_of_memory_stays_recognizable() {
        let oom = DriverError(CUresult::CUDA_ERROR_OUT_OF_MEMORY);
        assert_eq!(
            alloc_error(4096, oom),
            CudaError::OutOfMemory { bytes: 4096 }
        );
        assert!(alloc_error(4096, oom).is_out_of_memory());
        assert!(CudaError::driver("cuModuleLoadData(mla.cubin)", oom).is_out_of_memory());
        let other = alloc_error(4096, DriverError(CUresult::CUDA_ERROR_INVALID_VALUE));
        assert!(!other.is_out_of_memory());
        assert!(
            other.to_string().contains("cuMemAlloc(4096 bytes)"),
            "{other}"
        );
    }

    #[test]
    fn our_bugs_are_told_apart_from_device_states() {
        assert!(
            CudaError::requirement("act_quant", "K must be a multiple of 128")
                .is_broken_requirement()
        );
        assert!(CudaError::RegisterBudget {
            kernel: "fp8_gemm_wgmma".into(),
            registers: 90,
            needed: 240,
        }
        .is_broken_requirement());
        assert!(
            CudaError::OutOfBounds("download of 5 elements from a buffer of 4".into())
                .is_broken_requirement()
        );
        for e in [
            CudaError::OutOfMemory { bytes: 1 },
            CudaError::BuiltWithoutKernels,
            CudaError::NotEmbedded {
                what: "cubin mla_decode".into(),
            },
            CudaError::DriverPanic {
                call: "cuInit".into(),
                message: "symbol missing".into(),
            },
        ] {
            assert!(!e.is_broken_requirement(), "{e}");
        }
        assert_eq!(
            CudaError::NotEmbedded {
                what: "kernel mla_decode_wgmma".into()
            }
            .to_string(),
            "kernel mla_decode_wgmma is not among the embedded kernels (rebuild the crate)"
        );
    }
}
