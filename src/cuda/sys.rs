//! The generated layer: `$OUT_DIR/launch_params.rs` (bindgen over `cuda/launch_params.h`: the
//! launch-parameter structs and the `R1_*` constants) and `$OUT_DIR/kernels.rs` (the sm_90a
//! cubins that build.rs compiled, or `KERNELS_BUILT = false`). The kernel table of
//! [`super::launch`] declares the structs `DeviceRepr` (kernel arguments by value). Nothing here
//! checks anything: the safe wrappers in [`super::ops`] do.

#[allow(
    non_upper_case_globals,
    non_camel_case_types,
    non_snake_case,
    dead_code,
    unused_qualifications,
    clippy::all,
    clippy::pedantic
)]
mod launch_params {
    include!(concat!(env!("OUT_DIR"), "/launch_params.rs"));
}

#[allow(dead_code, clippy::all)]
mod kernels {
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}

pub(crate) use kernels::{CUBINS, KERNELS, KERNELS_BUILT};
pub(crate) use launch_params::*;

// The header's opaque tensor map must be bit-compatible with the driver's CUtensorMap
// (cuTensorMapEncodeTiled writes the latter; the kernel reads the former).
const _: () = {
    use cudarc::driver::sys::CUtensorMap;
    assert!(std::mem::size_of::<R1TensorMap>() == std::mem::size_of::<CUtensorMap>());
    assert!(std::mem::align_of::<R1TensorMap>() == std::mem::align_of::<CUtensorMap>());
    assert!(std::mem::size_of::<R1TensorMap>() == 128);
    // The header documents R1_FP8_GEMM_BLOCK_N/K as the quantization block.
    assert!(R1_FP8_GEMM_BLOCK_N == R1_QUANT_BLOCK && R1_FP8_GEMM_BLOCK_K == R1_QUANT_BLOCK);
};
