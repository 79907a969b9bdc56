//! CUDA graphs over the device's stream: [`Device::capture`] records the kernels a closure
//! queues (cuStreamBeginCapture / cuStreamEndCapture) and instantiates them
//! (cuGraphInstantiate) as a [`CapturedGraph`], which [`CapturedGraph::launch`] replays
//! (cuGraphLaunch) with the same kernel arguments every time.
//!
//! What a captured closure may do: queue kernels ([`super::Prepared::launch`]), device-to-device
//! copies and memsets on this device's stream. While the capture runs, [`Device::alloc`], host
//! copies and synchronizations are refused with [`CudaError::Capture`] rather than breaking the
//! capture, so a step that is not capturable fails cleanly and can run without a graph. A graph
//! replays the addresses it was captured with: its owner must not launch it once any buffer
//! it names was freed or moved (grown); the CUDA backend drops its graphs when the device's
//! allocation count changes.

use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::CudaGraph;

use super::device::Device;
use super::error::{CudaError, Result};

/// One instantiated graph, replayed on the stream it was captured from.
pub struct CapturedGraph {
    graph: CudaGraph,
    dev: Device,
    /// Kernel launches recorded (for traces and tests).
    label: String,
}

// SAFETY: the graph and its executable are driver handles usable from any thread once the
// context is bound (every call here binds it); the driver asks that calls on one graph be
// serialized, which a single owner gives: `CapturedGraph` is not `Sync`, so it can be moved
// between threads but never used from two at once.
unsafe impl Send for CapturedGraph {}

impl std::fmt::Debug for CapturedGraph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CapturedGraph")
            .field("label", &self.label)
            .finish()
    }
}

/// Ends the capture if the closure returned early or panicked, so the stream never stays in
/// capture mode.
struct CaptureGuard<'a> {
    dev: &'a Device,
    active: bool,
}

impl CaptureGuard<'_> {
    fn end(&mut self) -> Result<Option<CudaGraph>> {
        self.active = false;
        self.dev.set_capturing(false);
        self.dev
            .stream()
            .end_capture(CUgraphInstantiate_flags(0))
            .map_err(|e| CudaError::driver("cuStreamEndCapture/cuGraphInstantiate", e))
    }
}

impl Drop for CaptureGuard<'_> {
    fn drop(&mut self) {
        if self.active {
            // The recorded work is discarded; the step is reported as failed by the caller.
            let _ = self.end();
        }
    }
}

impl Device {
    /// Records what `record` queues on this device's stream into a graph and instantiates it;
    /// nothing runs until [`CapturedGraph::launch`]. An error of `record` (or of the driver)
    /// ends the capture and discards what it recorded. `label` names the graph in traces.
    pub fn capture<E: From<CudaError>>(
        &self,
        label: impl Into<String>,
        record: impl FnOnce() -> Result<(), E>,
    ) -> Result<CapturedGraph, E> {
        let label = label.into();
        self.bind()?;
        // Relaxed: host-only driver calls a step makes while it records (tensor-map encoding,
        // context binding) stay legal; what would break the capture is refused above it.
        self.stream()
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
            .map_err(|e| CudaError::driver("cuStreamBeginCapture", e))?;
        self.set_capturing(true);
        let mut guard = CaptureGuard {
            dev: self,
            active: true,
        };
        record()?;
        let graph = guard
            .end()?
            .ok_or_else(|| CudaError::Capture(format!("capturing {label} recorded no graph")))?;
        Ok(CapturedGraph {
            graph,
            dev: self.clone(),
            label,
        })
    }
}

impl CapturedGraph {
    /// Queues one replay on the stream it was captured from. With `R1_CUDA_TRACE=1` the replay
    /// is written to stderr first, as kernel launches are.
    pub fn launch(&self) -> Result<()> {
        super::launch::trace(&format!("r1-cuda-trace: graph {}", self.label));
        self.dev.not_capturing("a graph replay")?;
        self.graph
            .launch()
            .map_err(|e| CudaError::driver(&format!("cuGraphLaunch({})", self.label), e))
    }

    /// Uploads the graph's resources so that its first launch costs what later ones do.
    pub fn upload(&self) -> Result<()> {
        self.graph
            .upload()
            .map_err(|e| CudaError::driver(&format!("cuGraphUpload({})", self.label), e))
    }

    pub fn label(&self) -> &str {
        &self.label
    }
}
