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

    /// Any other driver failure: the call that failed and the driver's message.
    #[error("CUDA driver: {0}")]
    Driver(String),
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
        CudaError::Driver(format!("{call}: {}", describe(e)))
    }
}

/// "CUDA_ERROR_X (description)" for a driver error.
pub(crate) fn describe(e: DriverError) -> String {
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

impl From<CudaError> for crate::Error {
    fn from(e: CudaError) -> Self {
        crate::Error::Backend {
            backend: "cuda".into(),
            message: e.to_string(),
        }
    }
}
