//! Device memory: [`DeviceBuffer<T>`], a typed array in device memory allocated on a
//! [`Device`]'s stream, for any plain-old-data `T` (`u8` for FP8 codes, `half::bf16`, `f32`).
//!
//! A buffer is either a whole allocation or a view of part of one ([`DeviceBuffer::view`]):
//! views share their allocation (kept alive while any view exists), so a persistent workspace
//! can be carved into per-step pieces without touching the allocator. Every allocation goes
//! through [`Device::alloc`], which counts it (and its free) for [`Device::allocations`].

use std::marker::PhantomData;
use std::sync::Arc;

use bytemuck::Pod;
use cudarc::driver::{result, CudaSlice, DevicePtr};

use super::device::{AllocCounters, Device};
use super::error::{alloc_error, CudaError, Result};

/// One device allocation; its drop frees it (ordered on the stream) and counts the free.
struct Allocation {
    /// Owns the memory (freed when dropped).
    _slice: CudaSlice<u8>,
    addr: u64,
    counters: Arc<AllocCounters>,
}

impl Drop for Allocation {
    fn drop(&mut self) {
        self.counters.count_free();
    }
}

/// `len` elements of `T` in device memory. A whole allocation is at least 256-byte aligned
/// (the driver's guarantee), so every such buffer satisfies the kernels' 16-byte alignment
/// rules; a view is aligned as its offset makes it.
pub struct DeviceBuffer<T> {
    mem: Arc<Allocation>,
    /// Byte offset of element 0 in the allocation.
    offset: usize,
    len: usize,
    _elem: PhantomData<T>,
}

impl<T> std::fmt::Debug for DeviceBuffer<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceBuffer")
            .field("len", &self.len)
            .field("addr", &format_args!("{:#x}", self.addr()))
            .field("elem", &std::any::type_name::<T>())
            .finish()
    }
}

impl<T> DeviceBuffer<T> {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn size_bytes(&self) -> usize {
        self.len * std::mem::size_of::<T>()
    }

    /// The device address (what the launch-parameter structs carry).
    pub fn addr(&self) -> u64 {
        self.mem.addr + self.offset as u64
    }

    /// Elements `start..start + len` of this buffer as a buffer of their own, sharing the
    /// allocation (no device call; the allocation lives while any view of it does). Writes
    /// through a view are writes to this buffer.
    pub fn view(&self, start: usize, len: usize) -> Result<DeviceBuffer<T>> {
        if start.checked_add(len).is_none_or(|end| end > self.len) {
            return Err(CudaError::OutOfBounds(format!(
                "view of elements {start}..{start}+{len} of a buffer of {}",
                self.len
            )));
        }
        Ok(DeviceBuffer {
            mem: Arc::clone(&self.mem),
            offset: self.offset + start * std::mem::size_of::<T>(),
            len,
            _elem: PhantomData,
        })
    }
}

impl Device {
    /// Allocates `len` elements with unspecified contents (whatever the memory held). Counted
    /// by [`Device::allocations`]; refused while the stream is being captured into a CUDA
    /// graph (a captured step must only use memory that outlives the graph).
    pub fn alloc<T: Pod>(&self, len: usize) -> Result<DeviceBuffer<T>> {
        let bytes = len
            .checked_mul(std::mem::size_of::<T>())
            .ok_or(CudaError::OutOfMemory { bytes: usize::MAX })?;
        if self.is_capturing() {
            return Err(CudaError::Capture(format!(
                "an allocation of {bytes} bytes was asked for while a CUDA graph was being \
                 captured (every buffer of a captured step must exist before the capture)"
            )));
        }
        // cuMemAlloc rejects 0 bytes; a tiny allocation keeps `addr()` valid and aligned.
        // SAFETY: the memory is uninitialized; `T: Pod` makes any contents a valid `T`.
        let slice = unsafe { self.stream().alloc::<u8>(bytes.max(16)) }
            .map_err(|e| alloc_error(bytes, e))?;
        // Event tracking is off on a Device's context, so the returned guard does nothing.
        let addr = {
            let (ptr, _guard) = slice.device_ptr(slice.stream());
            ptr
        };
        let counters = self.alloc_counters();
        counters.count_alloc();
        Ok(DeviceBuffer {
            mem: Arc::new(Allocation {
                _slice: slice,
                addr,
                counters,
            }),
            offset: 0,
            len,
            _elem: PhantomData,
        })
    }

    /// Allocates `len` zeroed elements.
    pub fn alloc_zeros<T: Pod>(&self, len: usize) -> Result<DeviceBuffer<T>> {
        let mut buf = self.alloc(len)?;
        self.memset(&mut buf, 0)?;
        Ok(buf)
    }

    /// Copies `data` into a new buffer.
    pub fn upload<T: Pod>(&self, data: &[T]) -> Result<DeviceBuffer<T>> {
        let mut buf = self.alloc(data.len())?;
        self.copy_to_device(data, &mut buf)?;
        Ok(buf)
    }

    /// Copies `data` into the start of `dst` (which must be at least as long).
    pub fn copy_to_device<T: Pod>(&self, data: &[T], dst: &mut DeviceBuffer<T>) -> Result<()> {
        if data.len() > dst.len {
            return Err(CudaError::OutOfBounds(format!(
                "copy of {} elements into a buffer of {}",
                data.len(),
                dst.len
            )));
        }
        if data.is_empty() {
            return Ok(());
        }
        self.not_capturing("a host-to-device copy")?;
        let bytes: &[u8] = bytemuck::cast_slice(data);
        self.bind()?;
        // SAFETY: `dst` holds at least `bytes.len()` bytes (checked above) of a live
        // allocation of this context; from pageable memory the call returns once `data` has
        // been staged, so it may be dropped or rewritten right after.
        unsafe { result::memcpy_htod_async(dst.addr(), bytes, self.stream().cu_stream()) }
            .map_err(|e| CudaError::driver("cuMemcpyHtoDAsync", e))
    }

    /// Copies the whole buffer back (waits for the stream: kernel faults surface here).
    pub fn download<T: Pod>(&self, src: &DeviceBuffer<T>) -> Result<Vec<T>> {
        self.download_prefix(src, src.len)
    }

    /// Copies the first `len` elements back (waits for the stream: kernel faults surface
    /// here); a buffer grown for an earlier, larger step costs only what is read.
    pub fn download_prefix<T: Pod>(&self, src: &DeviceBuffer<T>, len: usize) -> Result<Vec<T>> {
        if len > src.len {
            return Err(CudaError::OutOfBounds(format!(
                "download of {len} elements from a buffer of {}",
                src.len
            )));
        }
        self.not_capturing("a device-to-host copy")?;
        let mut out = vec![T::zeroed(); len];
        if !out.is_empty() {
            let bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut out);
            let n = bytes.len();
            self.bind()?;
            // SAFETY: `src` holds at least `n` bytes (checked above) of a live allocation of
            // this context; the stream is synchronized below before `out` is read.
            unsafe { result::memcpy_dtoh_async(bytes, src.addr(), self.stream().cu_stream()) }
                .map_err(|e| CudaError::driver("cuMemcpyDtoHAsync", e))?;
            self.count_downloaded(n);
        }
        self.synchronize()?;
        Ok(out)
    }

    /// Copies elements `src..src + len` of `buf` to `dst..dst + len` (asynchronously, on the
    /// stream); the ranges must not overlap.
    pub fn copy_within<T>(
        &self,
        buf: &mut DeviceBuffer<T>,
        src: usize,
        dst: usize,
        len: usize,
    ) -> Result<()> {
        let fits = |start: usize| start.checked_add(len).is_some_and(|end| end <= buf.len);
        if !fits(src) || !fits(dst) || src.abs_diff(dst) < len {
            return Err(CudaError::OutOfBounds(format!(
                "copy of {len} elements from {src} to {dst} within a buffer of {}",
                buf.len
            )));
        }
        if len == 0 {
            return Ok(());
        }
        let size = std::mem::size_of::<T>();
        self.bind()?;
        // SAFETY: both ranges lie inside `buf`'s allocation (checked above) and do not
        // overlap; the copy is ordered on the device's stream.
        unsafe {
            result::memcpy_dtod_async(
                buf.addr() + (dst * size) as u64,
                buf.addr() + (src * size) as u64,
                len * size,
                self.stream().cu_stream(),
            )
        }
        .map_err(|e| CudaError::driver("cuMemcpyDtoDAsync", e))
    }

    /// Sets every byte of `buf` to `byte` (asynchronously, on the stream).
    pub fn memset<T>(&self, buf: &mut DeviceBuffer<T>, byte: u8) -> Result<()> {
        self.memset_bytes(buf.addr(), buf.size_bytes(), byte)
    }

    pub(crate) fn memset_bytes(&self, addr: u64, bytes: usize, byte: u8) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: `addr..addr+bytes` lies in a live allocation of this context (callers pass a
        // DeviceBuffer's own range); the memset is ordered on the device's stream.
        unsafe { result::memset_d8_async(addr, byte, bytes, self.stream().cu_stream()) }
            .map_err(|e| CudaError::driver("cuMemsetD8Async", e))
    }
}
