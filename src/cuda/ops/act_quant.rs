//! act_quant: bf16 [M, K] -> fp8 e4m3 [M, K] + f32 scales per row per 128 channels, in the SA
//! layout the GEMMs read (`sa[kb * m_pad + r]`). Numerics: cuda/params/common.h;
//! bit-identical to `numerics::act_quant` (tests/gpu_kernels.rs).

use cudarc::driver::LaunchConfig;
use half::bf16;

use super::{act_scale_m_pad, scales_from_sa, scales_to_sa, Checker, Region, QUANT_BLOCK};
use crate::cuda::error::Result;
use crate::cuda::launch::{KernelLaunch, Prepared};
use crate::cuda::sys::{self, R1ActQuantParams};
use crate::cuda::{Device, DeviceBuffer};
use crate::numerics::QuantizedRows;

const KERNEL: &str = "act_quant";

/// An act_quant call as plain numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ActQuantDesc {
    pub m: usize,
    pub k: usize,
    /// bf16 input, rows of stride `ldx` elements.
    pub x: Region,
    pub ldx: usize,
    /// fp8 output, rows of stride `ldq` bytes.
    pub q: Region,
    pub ldq: usize,
    /// f32 scales, SA layout `[k/128][m_pad]`.
    pub scales: Region,
    pub m_pad: usize,
}

impl ActQuantDesc {
    /// Every requirement of launch_params.h's act_quant, checked on the host.
    pub fn check(&self) -> Result<()> {
        let c = Checker { kernel: KERNEL };
        let (m, k) = (self.m, self.k);
        c.req(k % QUANT_BLOCK == 0, || {
            format!("K must be a multiple of 128 (K = {k})")
        })?;
        self.check_operands(&c)?;
        c.req(self.ldx % 8 == 0, || {
            format!(
                "ldx must be a multiple of 8 (16-byte rows; ldx = {})",
                self.ldx
            )
        })?;
        c.req(self.ldq % 16 == 0, || {
            format!(
                "ldq must be a multiple of 16 (16-byte rows; ldq = {})",
                self.ldq
            )
        })?;
        c.aligned("x", self.x, 16)?;
        c.aligned("q", self.q, 16)?;
        c.aligned("scales", self.scales, 16)?;
        let kb = k / QUANT_BLOCK;
        let blocks = (m * kb).div_ceil(sys::R1_ACT_QUANT_GROUPS_PER_BLOCK as usize);
        c.req(blocks <= i32::MAX as usize, || {
            format!("M * K/128 = {} groups exceed the grid limit", m * kb)
        })
    }

    /// What every act_quant kernel needs (this one and the small any-K kernel of
    /// `small_ops`): shapes, strides, the SA layout, buffer lengths.
    pub(crate) fn check_operands(&self, c: &Checker) -> Result<()> {
        let (m, k) = (self.m, self.k);
        c.req(m >= 1 && k >= 1, || {
            format!("M and K must be >= 1 (M = {m}, K = {k})")
        })?;
        c.fits_i32(&[
            ("M", m),
            ("K", k),
            ("ldx", self.ldx),
            ("ldq", self.ldq),
            ("m_pad", self.m_pad),
        ])?;
        c.req(self.ldx >= k && self.ldq >= k, || {
            format!(
                "ldx ({}) and ldq ({}) must be >= K ({k})",
                self.ldx, self.ldq
            )
        })?;
        c.sa_pad("m_pad", self.m_pad, m, "M")?;
        c.holds_matrix("x", self.x, m, k, self.ldx)?;
        c.holds_matrix("q", self.q, m, k, self.ldq)?;
        c.holds(
            "scales",
            self.scales,
            k.div_ceil(QUANT_BLOCK) * self.m_pad,
            "[ceil(K/128)][m_pad]",
        )
    }
}

impl KernelLaunch for ActQuantDesc {
    type Params = R1ActQuantParams;

    fn kernel(&self) -> &'static str {
        KERNEL
    }

    fn launch_config(&self) -> LaunchConfig {
        let groups = self.m * (self.k / QUANT_BLOCK);
        LaunchConfig {
            grid_dim: (
                groups.div_ceil(sys::R1_ACT_QUANT_GROUPS_PER_BLOCK as usize) as u32,
                1,
                1,
            ),
            block_dim: (sys::R1_ACT_QUANT_THREADS, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    fn params(&self) -> Result<R1ActQuantParams> {
        Ok(R1ActQuantParams {
            x: self.x.addr,
            q: self.q.addr,
            scales: self.scales.addr,
            m: self.m as i32,
            k: self.k as i32,
            ldx: self.ldx as i32,
            ldq: self.ldq as i32,
            m_pad: self.m_pad as i32,
            reserved: 0,
        })
    }
}

/// act_quant over caller-owned buffers.
pub struct ActQuantArgs<'a> {
    pub x: &'a DeviceBuffer<bf16>,
    pub ldx: usize,
    pub q: &'a mut DeviceBuffer<u8>,
    pub ldq: usize,
    pub scales: &'a mut DeviceBuffer<f32>,
    pub m_pad: usize,
    pub m: usize,
    pub k: usize,
}

impl ActQuantArgs<'_> {
    pub fn desc(&self) -> ActQuantDesc {
        ActQuantDesc {
            m: self.m,
            k: self.k,
            x: Region::from(self.x),
            ldx: self.ldx,
            q: Region::from(&*self.q),
            ldq: self.ldq,
            scales: Region::from(&*self.scales),
            m_pad: self.m_pad,
        }
    }
}

/// Activations quantized on the device: `q` row-major `[m][k]` (ldq = k), `scales` in the SA
/// layout `[ceil(k/128)][m_pad]`.
#[derive(Debug)]
pub struct QuantizedActivations {
    pub q: DeviceBuffer<u8>,
    pub scales: DeviceBuffer<f32>,
    pub m: usize,
    pub k: usize,
    pub m_pad: usize,
}

impl QuantizedActivations {
    /// Uploads CPU-quantized rows (any K: the reference GEMM takes ragged K), converting the
    /// scales from row-major to the SA layout.
    pub fn upload(dev: &Device, rows: &QuantizedRows) -> Result<Self> {
        let (m, k) = (rows.rows, rows.cols);
        let kb = k.div_ceil(QUANT_BLOCK);
        let m_pad = act_scale_m_pad(m);
        Ok(QuantizedActivations {
            q: dev.upload(&rows.codes)?,
            scales: dev.upload(&scales_to_sa(&rows.scales, m, kb, m_pad))?,
            m,
            k,
            m_pad,
        })
    }

    /// Back to the CPU reference's layout (row-major scales).
    pub fn download(&self, dev: &Device) -> Result<QuantizedRows> {
        let kb = self.k.div_ceil(QUANT_BLOCK);
        let codes = dev.download(&self.q)?;
        let sa = dev.download(&self.scales)?;
        Ok(QuantizedRows {
            rows: self.m,
            cols: self.k,
            codes: codes[..self.m * self.k].to_vec(),
            scales: scales_from_sa(&sa, self.m, kb, self.m_pad),
        })
    }
}

impl Device {
    /// Checks `args` and builds the launch (no work queued yet).
    pub fn prepare_act_quant<'a>(&'a self, args: ActQuantArgs<'a>) -> Result<Prepared<'a>> {
        let desc = args.desc();
        desc.check()?;
        Prepared::single(self, &desc)
    }

    /// act_quant into caller-owned buffers (queued on the stream).
    pub fn act_quant_into(&self, args: ActQuantArgs<'_>) -> Result<()> {
        self.prepare_act_quant(args)?.launch()
    }

    /// Quantizes a contiguous bf16 `[m, k]` (K a multiple of 128) into new buffers.
    pub fn act_quant(
        &self,
        x: &DeviceBuffer<bf16>,
        m: usize,
        k: usize,
    ) -> Result<QuantizedActivations> {
        let m_pad = act_scale_m_pad(m);
        // Check before allocating so a bad shape reports the rule, not an allocation failure.
        ActQuantDesc {
            m,
            k,
            x: Region::from(x),
            ldx: k,
            q: Region {
                addr: 0,
                len: m * k,
            },
            ldq: k,
            scales: Region {
                addr: 0,
                len: (k / QUANT_BLOCK) * m_pad,
            },
            m_pad,
        }
        .check()?;
        let mut q = self.alloc::<u8>(m * k)?;
        let mut scales = self.alloc::<f32>((k / QUANT_BLOCK) * m_pad)?;
        self.act_quant_into(ActQuantArgs {
            x,
            ldx: k,
            q: &mut q,
            ldq: k,
            scales: &mut scales,
            m_pad,
            m,
            k,
        })?;
        Ok(QuantizedActivations {
            q,
            scales,
            m,
            k,
            m_pad,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_checks_name_requirements() {
        let ok = ActQuantDesc {
            m: 5,
            k: 256,
            x: Region {
                addr: 0x1000,
                len: 5 * 256,
            },
            ldx: 256,
            q: Region {
                addr: 0x2000,
                len: 5 * 256,
            },
            ldq: 256,
            scales: Region {
                addr: 0x3000,
                len: 2 * 8,
            },
            m_pad: 8,
        };
        ok.check().unwrap();
        let msg = |d: ActQuantDesc| d.check().unwrap_err().to_string();
        assert!(
            msg(ActQuantDesc { k: 100, ..ok }).contains("act_quant: K must be a multiple of 128")
        );
        assert!(msg(ActQuantDesc {
            ldx: 260,
            x: Region {
                addr: 0x1000,
                len: 5 * 260
            },
            ..ok
        })
        .contains("ldx must be a multiple of 8"));
        assert!(msg(ActQuantDesc {
            ldq: 264,
            q: Region {
                addr: 0x2000,
                len: 5 * 264
            },
            ..ok
        })
        .contains("ldq must be a multiple of 16"));
        assert!(msg(ActQuantDesc { m_pad: 6, ..ok }).contains("multiple of 4"));
        assert!(msg(ActQuantDesc {
            scales: Region {
                addr: 0x3004,
                len: 16
            },
            ..ok
        })
        .contains("16-byte aligned"));
        assert!(msg(ActQuantDesc {
            scales: Region {
                addr: 0x3000,
                len: 15
            },
            ..ok
        })
        .contains("scales holds 15"));
    }
}
