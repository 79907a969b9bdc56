//! TMA tensor maps for the wgmma kernels, encoded with `cuTensorMapEncodeTiled` using exactly the
//! parameters cuda/launch_params.h documents (rank 2, or rank 3 for the batched bf16 GEMM;
//! dims/strides innermost first, element strides 1, no interleave, OOB fill NONE = zeros, L2
//! promotion 256B).

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
    Bf16,
}

impl TmaElem {
    fn bytes(self) -> u64 {
        match self {
            TmaElem::U8 => 1,
            TmaElem::F32 => 4,
            TmaElem::Bf16 => 2,
        }
    }

    fn data_type(self) -> DataType {
        match self {
            TmaElem::U8 => DataType::CU_TENSOR_MAP_DATA_TYPE_UINT8,
            TmaElem::F32 => DataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT32,
            TmaElem::Bf16 => DataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
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
        encode_tiled(
            kernel,
            self.name,
            self.elem,
            self.addr,
            self.dims,
            &[self.stride_bytes],
            self.box_dims,
            self.swizzle_128b,
            &format!("{self:?}"),
        )
    }
}

/// One 3-D tiled tensor map {inner, rows, batch}, as plain numbers: the batched operands of
/// the bf16 GEMM. The batch stride may be smaller than a matrix (entries interleaved by row,
/// e.g. per-head slices of one row).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TensorMap3d {
    /// Which map (for error messages), e.g. "tmap_a".
    pub name: &'static str,
    pub elem: TmaElem,
    pub addr: u64,
    /// {inner, rows, batch} extent in elements.
    pub dims: [u64; 3],
    /// Byte strides of dimensions 1 and 2 (dimension 0 is contiguous).
    pub stride_bytes: [u64; 2],
    /// {inner, rows, batch} box in elements.
    pub box_dims: [u32; 3],
    pub swizzle_128b: bool,
}

impl TensorMap3d {
    /// The driver's documented constraints on a tiled map, as [`TensorMap2d::check`].
    pub fn check(&self, kernel: &'static str) -> Result<()> {
        let fail = |what: String| {
            Err(CudaError::requirement(
                kernel,
                format!("{}: {what}", self.name),
            ))
        };
        // The first two dimensions are a 2-D map's; the batch adds its extent and stride.
        TensorMap2d {
            name: self.name,
            elem: self.elem,
            addr: self.addr,
            dims: [self.dims[0], self.dims[1]],
            stride_bytes: self.stride_bytes[0],
            box_dims: [self.box_dims[0], self.box_dims[1]],
            swizzle_128b: self.swizzle_128b,
        }
        .check(kernel)?;
        let (d, s, b) = (self.dims[2], self.stride_bytes[1], self.box_dims[2]);
        if d == 0 || d > (1u64 << 32) {
            return fail(format!("globalDim[2] = {d} must be in 1..=2^32"));
        }
        if s == 0 || s % 16 != 0 || s >= (1u64 << 40) {
            return fail(format!(
                "globalStrides[1] = {s} bytes must be a non-zero multiple of 16 and < 2^40"
            ));
        }
        if b == 0 || b > 256 {
            return fail(format!("boxDim[2] = {b} must be in 1..=256"));
        }
        Ok(())
    }

    /// Checks and encodes the map (a host-only driver call; needs libcuda, not a context).
    pub(crate) fn encode(&self, kernel: &'static str) -> Result<R1TensorMap> {
        self.check(kernel)?;
        encode_tiled(
            kernel,
            self.name,
            self.elem,
            self.addr,
            self.dims,
            &self.stride_bytes,
            self.box_dims,
            self.swizzle_128b,
            &format!("{self:?}"),
        )
    }
}

/// `cuTensorMapEncodeTiled` of a checked rank-`R` map (`strides`: R - 1 byte strides).
#[allow(clippy::too_many_arguments)]
fn encode_tiled<const R: usize>(
    kernel: &'static str,
    name: &str,
    elem: TmaElem,
    addr: u64,
    dims: [u64; R],
    strides: &[u64],
    box_dims: [u32; R],
    swizzle_128b: bool,
    shown: &str,
) -> Result<R1TensorMap> {
    assert_eq!(strides.len() + 1, R, "a rank-{R} map has {} strides", R - 1);
    let mut map = cu::CUtensorMap { opaque: [0; 16] };
    let elem_strides = [1u32; R];
    // SAFETY: every pointer refers to a live local of the documented length (rank R, R - 1
    // strides, asserted above); the driver only writes `map`.
    let r = unsafe {
        cu::cuTensorMapEncodeTiled(
            &mut map,
            elem.data_type(),
            R as u32,
            addr as *mut std::ffi::c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            box_dims.as_ptr(),
            elem_strides.as_ptr(),
            Interleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            if swizzle_128b {
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
            &format!("cuTensorMapEncodeTiled({kernel} {name}: {shown})"),
            e,
        )
    })?;
    Ok(R1TensorMap { opaque: map.opaque })
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

    #[test]
    fn rank3_checks_name_the_batch_rule() {
        let map = TensorMap3d {
            name: "tmap_b",
            elem: TmaElem::Bf16,
            addr: 0x1000,
            dims: [128, 512, 128],
            stride_bytes: [256, 1024 * 256],
            box_dims: [64, 128, 1],
            swizzle_128b: true,
        };
        map.check("k").unwrap();
        // Entries interleaved by row (batch stride below a matrix) are fine.
        TensorMap3d {
            stride_bytes: [24576 * 2, 384],
            ..map
        }
        .check("k")
        .unwrap();
        let e = |m: TensorMap3d| m.check("k").unwrap_err().to_string();
        assert!(e(TensorMap3d {
            stride_bytes: [256, 200],
            ..map
        })
        .contains("globalStrides[1] = 200"));
        assert!(e(TensorMap3d {
            stride_bytes: [256, 0],
            ..map
        })
        .contains("non-zero"));
        assert!(e(TensorMap3d {
            stride_bytes: [250, 1024],
            ..map
        })
        .contains("multiple of 16"));
        assert!(e(TensorMap3d {
            dims: [128, 512, 0],
            ..map
        })
        .contains("globalDim[2]"));
        // 64 bf16 = 128 bytes: the widest swizzled row.
        assert!(e(TensorMap3d {
            box_dims: [128, 128, 1],
            ..map
        })
        .contains("128-byte swizzle"));
    }
}
