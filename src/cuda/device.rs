//! Presence check, context, stream and the embedded kernels.
//!
//! [`Device::probe`] answers "is there a usable CUDA device?" without loading anything but the
//! driver library (cudarc loads libcuda at run time, so the binary starts without it);
//! [`Device::open`] then checks the architecture (sm_90), that kernels were built, loads every
//! embedded kernel once into its `KernelTable` (src/cuda/launch.rs: shared-memory opt-ins and
//! register budgets), and creates the one stream all work of this [`Device`] runs on.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use cudarc::driver::sys::{self as cu, CUdevice_attribute as Attr, CUresult};
use cudarc::driver::{result, CudaContext, CudaStream, DriverError};

use super::error::{describe, CudaError, Result};
use super::launch::KernelTable;
use super::sys;

/// What the driver says about a device (read once at open).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    pub ordinal: usize,
    pub name: String,
    /// (major, minor); the kernels need (9, 0).
    pub compute_capability: (i32, i32),
    pub sm_count: usize,
    pub l2_bytes: usize,
    /// Largest dynamic + static shared memory one block may opt in to.
    pub max_smem_per_block_optin: usize,
    pub total_mem_bytes: usize,
    /// Peak SM clock (kHz) as the driver reports it (0 if it does not).
    pub sm_clock_khz: i32,
    /// Peak memory clock (kHz) and bus width (bits) (0 if not reported).
    pub mem_clock_khz: i32,
    pub mem_bus_width_bits: i32,
    /// e.g. 13000 for CUDA 13.0.
    pub driver_version: i32,
}

/// One CUDA device with the embedded kernels loaded and one stream. `Send + Sync`; every
/// launch, copy and allocation of this handle is ordered on its stream. Cloning is cheap:
/// clones share the context, stream and kernels (kernel handles such as [`super::ops::Mla`]
/// hold one), which the last clone dropped releases.
#[derive(Clone)]
pub struct Device {
    inner: Arc<Inner>,
}

struct Inner {
    info: DeviceInfo,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    kernels: KernelTable,
    /// Bytes copied device -> host so far ([`Device::bytes_downloaded`]).
    downloaded: AtomicU64,
    /// Allocations and frees so far ([`Device::allocations`]); buffers hold a clone so their
    /// drop can count the free.
    counters: Arc<AllocCounters>,
    /// The stream is being captured into a CUDA graph (src/cuda/graph.rs): allocations are
    /// refused.
    capturing: AtomicBool,
}

/// Device allocations made and freed through [`Device::alloc`] (views count as neither).
#[derive(Debug, Default)]
pub(crate) struct AllocCounters {
    allocs: AtomicU64,
    frees: AtomicU64,
}

impl AllocCounters {
    pub(crate) fn count_alloc(&self) {
        self.allocs.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_free(&self) {
        self.frees.fetch_add(1, Ordering::Relaxed);
    }
}

/// How many device allocations a [`Device`] has made and freed so far: a serving loop's
/// steady state should move neither.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AllocationCount {
    pub allocs: u64,
    pub frees: u64,
}

impl AllocationCount {
    /// Allocations alive now.
    pub fn live(&self) -> u64 {
        self.allocs.saturating_sub(self.frees)
    }
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("info", &self.inner.info)
            .finish()
    }
}

/// True when build.rs embedded the CUDA kernels (nvcc was found at build time).
pub fn kernels_built() -> bool {
    sys::KERNELS_BUILT
}

/// Runs driver calls, turning a panic inside cudarc (e.g. a symbol missing from an old
/// libcuda) into a typed error instead of unwinding through the caller.
fn guarded<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => {
            let msg = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            Err(CudaError::DriverPanic {
                call: what.to_string(),
                message: msg,
            })
        }
    }
}

fn attr(dev: cu::CUdevice, a: Attr) -> Result<i32> {
    unsafe { result::device::get_attribute(dev, a) }
        .map_err(|e| CudaError::driver(&format!("cuDeviceGetAttribute({a:?})"), e))
}

/// An attribute only reported for information (e.g. clocks, deprecated in CUDA 13): 0 when the
/// driver does not answer, so it can never make a usable device fail to open.
fn info_attr(dev: cu::CUdevice, a: Attr) -> i32 {
    unsafe { result::device::get_attribute(dev, a) }.unwrap_or(0)
}

fn init_error(e: DriverError, ordinal: usize) -> CudaError {
    match e.0 {
        CUresult::CUDA_ERROR_NO_DEVICE => CudaError::NoDevice { ordinal, count: 0 },
        CUresult::CUDA_ERROR_STUB_LIBRARY => CudaError::NoDriver(format!(
            "the libcuda that was loaded is the toolkit's stub, not the driver's ({})",
            describe(e)
        )),
        _ => CudaError::driver("cuInit", e),
    }
}

impl Device {
    /// Presence check: loads libcuda, initializes the driver and reads the device's properties.
    /// Loads no kernels and creates no context, so it is cheap and never panics.
    pub fn probe(ordinal: usize) -> Result<DeviceInfo> {
        // SAFETY: only tries dlopen on the usual libcuda names.
        if !unsafe { cu::is_culib_present() } {
            return Err(CudaError::NoDriver(
                "libcuda.so (the NVIDIA driver library) could not be loaded".into(),
            ));
        }
        guarded("CUDA driver", || {
            result::init().map_err(|e| init_error(e, ordinal))?;
            let count = result::device::get_count()
                .map_err(|e| CudaError::driver("cuDeviceGetCount", e))?;
            let count = usize::try_from(count).unwrap_or(0);
            if ordinal >= count {
                return Err(CudaError::NoDevice { ordinal, count });
            }
            let dev = result::device::get(ordinal as i32)
                .map_err(|e| CudaError::driver("cuDeviceGet", e))?;
            let name = result::device::get_name(dev)
                .map_err(|e| CudaError::driver("cuDeviceGetName", e))?;
            let total_mem_bytes = unsafe { result::device::total_mem(dev) }
                .map_err(|e| CudaError::driver("cuDeviceTotalMem", e))?;
            let mut driver_version = 0;
            // SAFETY: writes one int.
            unsafe { cu::cuDriverGetVersion(&mut driver_version) }
                .result()
                .map_err(|e| CudaError::driver("cuDriverGetVersion", e))?;
            let to_usize = |v: i32| usize::try_from(v).unwrap_or(0);
            Ok(DeviceInfo {
                ordinal,
                name,
                compute_capability: (
                    attr(dev, Attr::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
                    attr(dev, Attr::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
                ),
                sm_count: to_usize(attr(dev, Attr::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?),
                l2_bytes: to_usize(attr(dev, Attr::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)?),
                max_smem_per_block_optin: to_usize(attr(
                    dev,
                    Attr::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
                )?),
                total_mem_bytes,
                sm_clock_khz: info_attr(dev, Attr::CU_DEVICE_ATTRIBUTE_CLOCK_RATE),
                mem_clock_khz: info_attr(dev, Attr::CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE),
                mem_bus_width_bits: info_attr(
                    dev,
                    Attr::CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH,
                ),
                driver_version,
            })
        })
    }

    /// Opens device `ordinal`: presence check ([`Device::probe`]), sm_90 check, kernels built,
    /// context + stream, every embedded kernel loaded, shared-memory limits raised.
    pub fn open(ordinal: usize) -> Result<Device> {
        let info = Self::probe(ordinal)?;
        if info.compute_capability != (9, 0) {
            return Err(CudaError::WrongArch {
                found: info.compute_capability,
            });
        }
        if !sys::KERNELS_BUILT {
            return Err(CudaError::BuiltWithoutKernels);
        }
        guarded("opening the CUDA device", || Self::open_checked(info))
    }

    fn open_checked(info: DeviceInfo) -> Result<Device> {
        let ctx = CudaContext::new(info.ordinal)
            .map_err(|e| CudaError::driver("cuDevicePrimaryCtxRetain", e))?;
        // All work of a Device goes on its one stream, so stream order is the only ordering
        // needed; the per-buffer events cudarc would record are pure overhead here and must
        // be off for CUDA-graph capture anyway.
        // SAFETY: no CudaSlice of this context exists yet; every later one is used on `stream`.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx
            .new_stream()
            .map_err(|e| CudaError::driver("cuStreamCreate", e))?;

        let kernels = KernelTable::load(&ctx, &info)?;
        Ok(Device {
            inner: Arc::new(Inner {
                info,
                ctx,
                stream,
                kernels,
                downloaded: AtomicU64::new(0),
                counters: Arc::default(),
                capturing: AtomicBool::new(false),
            }),
        })
    }

    pub fn info(&self) -> &DeviceInfo {
        &self.inner.info
    }

    /// The stream every operation of this device is ordered on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.inner.stream
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.inner.ctx
    }

    /// Every embedded kernel, loaded with its kernel-table row applied.
    pub(crate) fn kernel_table(&self) -> &KernelTable {
        &self.inner.kernels
    }

    /// Bytes copied from this device to the host so far: what the steps of a serving loop
    /// cost the host link (a decode step should read back its new rows, not its history).
    pub fn bytes_downloaded(&self) -> u64 {
        self.inner.downloaded.load(Ordering::Relaxed)
    }

    pub(crate) fn count_downloaded(&self, bytes: usize) {
        self.inner
            .downloaded
            .fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// Device allocations made and freed through this device so far (every
    /// [`Device::alloc`], whichever clone made it).
    pub fn allocations(&self) -> AllocationCount {
        let c = &self.inner.counters;
        AllocationCount {
            allocs: c.allocs.load(Ordering::Relaxed),
            frees: c.frees.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn alloc_counters(&self) -> Arc<AllocCounters> {
        Arc::clone(&self.inner.counters)
    }

    /// Whether the stream is being captured into a CUDA graph.
    pub fn is_capturing(&self) -> bool {
        self.inner.capturing.load(Ordering::Relaxed)
    }

    pub(crate) fn set_capturing(&self, on: bool) {
        self.inner.capturing.store(on, Ordering::Relaxed);
    }

    /// Refuses `what` (a host copy or synchronization, which a capture cannot record) while
    /// the stream is being captured.
    pub(crate) fn not_capturing(&self, what: &str) -> Result<()> {
        if self.is_capturing() {
            return Err(CudaError::Capture(format!(
                "{what} was asked for while a CUDA graph was being captured (a captured step \
                 may only queue kernels and device-to-device work)"
            )));
        }
        Ok(())
    }

    /// Makes this device's context current on the calling thread (before raw driver calls).
    pub(crate) fn bind(&self) -> Result<()> {
        self.inner
            .ctx
            .bind_to_thread()
            .map_err(|e| CudaError::driver("cuCtxSetCurrent", e))
    }

    /// Waits for all work queued on the stream; asynchronous kernel faults surface here.
    pub fn synchronize(&self) -> Result<()> {
        self.not_capturing("a stream synchronization")?;
        self.inner
            .stream
            .synchronize()
            .map_err(|e| CudaError::driver("cuStreamSynchronize", e))
    }
}
