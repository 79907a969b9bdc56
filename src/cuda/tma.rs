//! TMA tensor maps for the wgmma GEMM, encoded with `cuTensorMapEncodeTiled` using exactly the
//! parameters cuda/launch_params.h documents (rank 2, dims/strides innermost first, element
//! strides {1, 1}, no interleave, OOB fill NONE = zeros, L2 promotion 256B).

use cudarc::driver::sys::{
    self as cu, CUtensorMapDataType as DataType, CUtensorMapFloatOOBfill as OobFill,
    CUtensorMapInterleave as Interleave, CUtensorMapL2promotion as L2Promotion,
    CUtensorMapSwizzle as Swizzle,
};

use super::error::{CudaError, Result};
use super::sys::R1TensorMap;

/// One 2-D tiled tensor map, as plain numbers (so its checks run without a GPU).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TensorMap2d {
    /// Which map (for error messages), e.g. "tmap_a".
    pub name: &'static str,
    pub elem: TmaElem,
    pub addr: u64,
    /// {inner, outer} extent in elements.
    pub dims: [u64; 2],
    /// Byte stride of dimension 1 (dimension 0 is contiguous).
    pub stride_bytes: u64,
    /// {inner, outer} box in elements.
    pub box_dims: [u32; 2],
    pub swizzle_128b: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TmaElem {
    U8,
    F32,
}

impl TmaElem {
    fn bytes(self) -> u64 {
        match self {
            TmaElem::U8 => 1,
            TmaElem::F32 => 4,
        }
    }
}

impl TensorMap2d {
    /// The driver's documented constraints on a tiled map (checked before encoding so a bad
    /// call names the rule instead of returning CUDA_ERROR_INVALID_VALUE).
    pub fn check(&self, kernel: &'static str) -> Result<()> {
        let fail = |what: String| {
            Err(CudaError::requirement(
                kernel,
                format!("{}: {what}", self.name),
            ))
        };
        if self.addr % 16 != 0 {
            return fail(format!(
                "global address {:#x} must be 16-byte aligned",
                self.addr
            ));
        }
        for (i, &d) in self.dims.iter().enumerate() {
            if d == 0 || d > (1u64 << 32) {
                return fail(format!("globalDim[{i}] = {d} must be in 1..=2^32"));
            }
        }
        if self.stride_bytes % 16 != 0 || self.stride_bytes >= (1u64 << 40) {
            return fail(format!(
                "globalStrides[0] = {} bytes must be a multiple of 16 and < 2^40",
                self.stride_bytes
            ));
        }
        if self.stride_bytes < self.dims[0] * self.elem.bytes() {
            return fail(format!(
                "row stride {} bytes is shorter than a row ({} elements)",
                self.stride_bytes, self.dims[0]
            ));
        }
        for (i, &b) in self.box_dims.iter().enumerate() {
            if b == 0 || b > 256 {
                return fail(format!("boxDim[{i}] = {b} must be in 1..=256"));
            }
        }
        let inner_bytes = u64::from(self.box_dims[0]) * self.elem.bytes();
        if inner_bytes % 16 != 0 {
            return fail(format!(
                "inner box of {inner_bytes} bytes must be a multiple of 16"
            ));
        }
        if self.swizzle_128b && inner_bytes > 128 {
            return fail(format!(
                "inner box of {inner_bytes} bytes exceeds the 128-byte swizzle span"
            ));
        }
        Ok(())
    }

    /// Checks and encodes the map (a host-only driver call; needs libcuda, not a context).
    pub(crate) fn encode(&self, kernel: &'static str) -> Result<R1TensorMap> {
        self.check(kernel)?;
        let mut map = cu::CUtensorMap { opaque: [0; 16] };
        let dims = self.dims;
        let strides = [self.stride_bytes];
        let box_dims = self.box_dims;
        let elem_strides = [1u32, 1];
        // SAFETY: every pointer refers to a live local of the documented length (rank 2,
        // rank - 1 strides); the driver only writes `map`.
        let r = unsafe {
            cu::cuTensorMapEncodeTiled(
                &mut map,
                match self.elem {
                    TmaElem::U8 => DataType::CU_TENSOR_MAP_DATA_TYPE_UINT8,
                    TmaElem::F32 => DataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT32,
                },
                2,
                self.addr as *mut std::ffi::c_void,
                dims.as_ptr(),
                strides.as_ptr(),
                box_dims.as_ptr(),
                elem_strides.as_ptr(),
                Interleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
                if self.swizzle_128b {
                    Swizzle::CU_TENSOR_MAP_SWIZZLE_128B
                } else {
                    Swizzle::CU_TENSOR_MAP_SWIZZLE_NONE
                },
                L2Promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                OobFill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
            )
        };
        r.result().map_err(|e| {
            CudaError::driver(
                &format!("cuTensorMapEncodeTiled({kernel} {}: {self:?})", self.name),
                e,
            )
        })?;
        Ok(R1TensorMap { opaque: map.opaque })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensor_map_checks_name_the_rule() {
        let map = TensorMap2d {
            name: "tmap_a",
            elem: TmaElem::U8,
            addr: 0x1000,
            dims: [256, 70],
            stride_bytes: 256,
            box_dims: [128, 128],
            swizzle_128b: true,
        };
        map.check("k").unwrap();
        let e = |m: TensorMap2d| m.check("k").unwrap_err().to_string();
        assert!(e(TensorMap2d {
            stride_bytes: 264,
            ..map
        })
        .contains("multiple of 16"));
        assert!(e(TensorMap2d {
            box_dims: [256, 128],
            ..map
        })
        .contains("128-byte swizzle"));
        assert!(e(TensorMap2d {
            box_dims: [128, 300],
            ..map
        })
        .contains("boxDim[1]"));
        assert!(e(TensorMap2d {
            addr: 0x1001,
            ..map
        })
        .contains("16-byte aligned"));
    }
}
