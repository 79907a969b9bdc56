//! How kernels get onto the GPU, in one place: loading each embedded cubin once per device
//! (raising the dynamic shared-memory limits and checking the register budgets its kernels
//! need), queueing a launch ([`Device::launch`], traced with `R1_CUDA_TRACE=1`), and what the
//! driver says about every kernel ([`Device::kernel_attributes`]).

use std::io::Write as _;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::sys::CUfunction_attribute as FuncAttr;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, DeviceRepr, LaunchConfig, PushKernelArg,
};
use cudarc::nvrtc::Ptx;

use super::device::{Device, DeviceInfo};
use super::error::{CudaError, Result};
use super::sys;

/// Requirements of a kernel the driver must be told about, or checked, at load.
struct KernelNeeds {
    kernel: &'static str,
    /// Dynamic shared memory per block (> 48 KiB needs an opt-in before any launch).
    dynamic_smem: u32,
    /// Threads per block of a kernel that reallocates registers with setmaxnreg.
    realloc_threads: Option<u32>,
}

/// Every kernel with more than 48 KiB of dynamic shared memory or register reallocation
/// (cuda/launch_params.h documents both).
const NEEDS: &[KernelNeeds] = &[
    KernelNeeds {
        kernel: "fp8_gemm_wgmma",
        dynamic_smem: sys::R1_FP8_GEMM_SMEM_BYTES,
        realloc_threads: Some(sys::R1_FP8_GEMM_THREADS),
    },
    KernelNeeds {
        kernel: "fp8_gemm_wgmma_m64",
        dynamic_smem: sys::R1_FP8_GEMM_M64_SMEM_BYTES,
        realloc_threads: None,
    },
    KernelNeeds {
        kernel: "moe_gemm_contig_wgmma",
        dynamic_smem: sys::R1_MOE_GEMM_SMEM_BYTES,
        realloc_threads: Some(sys::R1_MOE_GEMM_THREADS),
    },
    KernelNeeds {
        kernel: "moe_gemm_masked_wgmma",
        dynamic_smem: sys::R1_MOE_GEMM_SMEM_BYTES,
        realloc_threads: Some(sys::R1_MOE_GEMM_THREADS),
    },
    KernelNeeds {
        kernel: "moe_gemm_masked_wgmma_m64",
        dynamic_smem: sys::R1_MOE_GEMM_M64_SMEM_BYTES,
        realloc_threads: None,
    },
    KernelNeeds {
        kernel: "mla_decode_wgmma",
        dynamic_smem: sys::R1_MLA_DECODE_SMEM_BYTES,
        realloc_threads: Some(sys::R1_MLA_DECODE_THREADS),
    },
];

/// Registers per thread a reallocating kernel of `threads` threads must be launched with:
/// the producer warpgroup (128 threads) gives back down to R1_REALLOC_PRODUCER_REGS, the
/// others take up to R1_REALLOC_CONSUMER_REGS, all from the register file fixed at launch.
pub(crate) fn realloc_registers_needed(threads: u32) -> u32 {
    let producer = 128 * sys::R1_REALLOC_PRODUCER_REGS;
    let consumers = (threads - 128) * sys::R1_REALLOC_CONSUMER_REGS;
    (producer + consumers).div_ceil(threads)
}

/// A reallocating kernel built with fewer registers than its budget would hang in
/// `setmaxnreg.inc`: refuse it instead.
pub(crate) fn check_register_budget(kernel: &str, registers: u32, threads: u32) -> Result<()> {
    let needed = realloc_registers_needed(threads);
    if registers < needed {
        return Err(CudaError::RegisterBudget {
            kernel: kernel.to_string(),
            registers,
            needed,
        });
    }
    Ok(())
}

/// The embedded cubins loaded into one context, each once, with their kernels' [`NEEDS`]
/// applied, so every handle to a kernel shares its raised limits.
pub(crate) struct Modules {
    ctx: Arc<CudaContext>,
    info: DeviceInfo,
    loaded: Mutex<Vec<(&'static str, Arc<CudaModule>)>>,
}

impl Modules {
    pub(crate) fn new(ctx: Arc<CudaContext>, info: DeviceInfo) -> Self {
        Modules {
            ctx,
            info,
            loaded: Mutex::new(Vec::new()),
        }
    }

    /// The module of `cuda/<stem>.cu`, loaded (`cuModuleLoadData`) and prepared on first use.
    /// Binds the context to the calling thread, so kernel lookups that follow work on any
    /// thread.
    pub(crate) fn get(&self, stem: &str) -> Result<Arc<CudaModule>> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| CudaError::driver("cuCtxSetCurrent", e))?;
        let mut loaded = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, m)) = loaded.iter().find(|(s, _)| *s == stem) {
            return Ok(m.clone());
        }
        let (stem, cubin) = sys::CUBINS
            .iter()
            .find(|(s, _)| *s == stem)
            .ok_or_else(|| CudaError::MissingCubin {
                stem: stem.to_string(),
            })?;
        let module = self
            .ctx
            .load_module(Ptx::from_binary(cubin.to_vec()))
            .map_err(|e| CudaError::driver(&format!("cuModuleLoadData({stem}.cubin)"), e))?;
        for (_, name, _) in sys::KERNELS.iter().filter(|(s, _, _)| s == stem) {
            if let Some(needs) = NEEDS.iter().find(|n| n.kernel == *name) {
                prepare(&self.info, &module, needs)?;
            }
        }
        loaded.push((stem, module.clone()));
        Ok(module)
    }
}

/// Kernel `name` of a loaded module (`cuModuleGetFunction`).
pub(crate) fn kernel(module: &Arc<CudaModule>, name: &str) -> Result<CudaFunction> {
    module
        .load_function(name)
        .map_err(|e| CudaError::driver(&format!("cuModuleGetFunction({name})"), e))
}

fn func_attr(func: &CudaFunction, name: &str, a: FuncAttr) -> Result<i32> {
    func.get_attribute(a)
        .map_err(|e| CudaError::driver(&format!("cuFuncGetAttribute({name}, {a:?})"), e))
}

/// Applies `needs` to its kernel in `module`: the register budget, then the shared-memory
/// opt-in (static + dynamic must fit what one block may opt in to).
fn prepare(info: &DeviceInfo, module: &Arc<CudaModule>, needs: &KernelNeeds) -> Result<()> {
    let name = needs.kernel;
    let func = kernel(module, name)?;
    if let Some(threads) = needs.realloc_threads {
        let regs = func_attr(&func, name, FuncAttr::CU_FUNC_ATTRIBUTE_NUM_REGS)?;
        check_register_budget(name, u32::try_from(regs).unwrap_or(0), threads)?;
    }
    let static_smem = func_attr(&func, name, FuncAttr::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES)?;
    let bytes = needs.dynamic_smem as usize;
    let total = bytes + usize::try_from(static_smem).unwrap_or(0);
    if total > info.max_smem_per_block_optin {
        return Err(CudaError::requirement(
            name,
            format!(
                "needs {bytes} bytes of dynamic + {static_smem} of static shared memory per \
                 block; {} allows {} in all",
                info.name, info.max_smem_per_block_optin
            ),
        ));
    }
    func.set_attribute(
        FuncAttr::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        needs.dynamic_smem as i32,
    )
    .map_err(|e| {
        CudaError::driver(
            &format!("cuFuncSetAttribute({name}, MAX_DYNAMIC_SHARED_SIZE_BYTES={bytes})"),
            e,
        )
    })
}

/// What the driver reports for one loaded kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelAttributes {
    /// The `cuda/<module>.cu` it comes from.
    pub module: &'static str,
    pub kernel: &'static str,
    pub registers: i32,
    /// Registers ptxas reported when the crate was built (the driver's count should match).
    pub registers_at_build: u32,
    pub static_smem_bytes: i32,
    /// The dynamic shared-memory limit in force (raised at load for kernels that need it).
    pub max_dynamic_smem_bytes: i32,
    pub local_bytes_per_thread: i32,
    pub max_threads_per_block: i32,
    /// Architecture the binary was built for (90 for sm_90a) and its PTX version.
    pub binary_version: i32,
    pub ptx_version: i32,
}

/// `R1_CUDA_TRACE` is set (non-empty, not "0"): read once.
fn trace_enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("R1_CUDA_TRACE").is_some_and(|v| !v.is_empty() && v != "0"))
}

/// The trace line of one launch (the GPU suite's runner reads the last one before a hang).
pub(crate) fn trace_line(kernel: &str, cfg: &LaunchConfig) -> String {
    let (g, b) = (cfg.grid_dim, cfg.block_dim);
    format!(
        "r1-cuda-trace: launch {kernel} grid={}x{}x{} block={}x{}x{} smem={}",
        g.0, g.1, g.2, b.0, b.1, b.2, cfg.shared_mem_bytes
    )
}

impl Device {
    /// Queues `func` (named `kernel` in errors and traces) with its one parameter struct on
    /// this device's stream. With `R1_CUDA_TRACE=1` the launch is first written to stderr
    /// (unbuffered, past any test harness's capture), so the last line before a hang names
    /// the kernel.
    ///
    /// # Safety
    /// `params` must be the parameter struct `func` takes, checked against the kernel's
    /// contract (cuda/launch_params.h) for buffers that outlive the launch.
    pub(crate) unsafe fn launch<P: DeviceRepr>(
        &self,
        func: &CudaFunction,
        kernel: &str,
        params: &P,
        cfg: LaunchConfig,
    ) -> Result<()> {
        if trace_enabled() {
            let _ = writeln!(std::io::stderr().lock(), "{}", trace_line(kernel, &cfg));
        }
        // SAFETY: the caller's contract above.
        unsafe { self.stream().launch_builder(func).arg(params).launch(cfg) }
            .map(|_| ())
            .map_err(|e| CudaError::driver(&format!("cuLaunchKernel({kernel})"), e))
    }

    /// Every embedded kernel as the driver sees it on this device (each module is loaded and
    /// prepared if it was not yet), in build order.
    pub fn kernel_attributes(&self) -> Result<Vec<KernelAttributes>> {
        sys::KERNELS
            .iter()
            .map(|&(module, name, registers_at_build)| {
                let func = kernel(&self.load_cubin(module)?, name)?;
                let a = |attr| func_attr(&func, name, attr);
                Ok(KernelAttributes {
                    module,
                    kernel: name,
                    registers: a(FuncAttr::CU_FUNC_ATTRIBUTE_NUM_REGS)?,
                    registers_at_build,
                    static_smem_bytes: a(FuncAttr::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES)?,
                    max_dynamic_smem_bytes: a(
                        FuncAttr::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    )?,
                    local_bytes_per_thread: a(FuncAttr::CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES)?,
                    max_threads_per_block: a(FuncAttr::CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK)?,
                    binary_version: a(FuncAttr::CU_FUNC_ATTRIBUTE_BINARY_VERSION)?,
                    ptx_version: a(FuncAttr::CU_FUNC_ATTRIBUTE_PTX_VERSION)?,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_384_thread_budget_is_168_registers() {
        assert_eq!(realloc_registers_needed(384), 168);
        assert!(check_register_budget("k", 168, 384).is_ok());
        let e = check_register_budget("k", 160, 384).unwrap_err();
        assert!(
            matches!(
                e,
                CudaError::RegisterBudget {
                    registers: 160,
                    needed: 168,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("k"), "{e}");
    }

    /// ptxas's own report (build.rs): every reallocating kernel was built with the registers
    /// its budget needs, so the load-time check cannot fire on these cubins.
    #[test]
    fn built_kernels_meet_their_register_budgets() {
        if !sys::KERNELS_BUILT {
            eprintln!("skipped: built without CUDA kernels");
            return;
        }
        for n in NEEDS {
            let (_, _, regs) = sys::KERNELS
                .iter()
                .find(|(_, k, _)| *k == n.kernel)
                .unwrap_or_else(|| panic!("{} is not among the built kernels", n.kernel));
            if let Some(threads) = n.realloc_threads {
                check_register_budget(n.kernel, *regs, threads).unwrap();
            }
        }
    }

    #[test]
    fn trace_line_names_kernel_grid_block_and_smem() {
        let cfg = LaunchConfig {
            grid_dim: (132, 2, 1),
            block_dim: (384, 1, 1),
            shared_mem_bytes: 230464,
        };
        assert_eq!(
            trace_line("mla_decode_wgmma", &cfg),
            "r1-cuda-trace: launch mla_decode_wgmma grid=132x2x1 block=384x1x1 smem=230464"
        );
    }
}
