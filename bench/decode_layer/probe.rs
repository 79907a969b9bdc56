//! The bench's backend: the CUDA backend behind a thin layer that times each step (CUDA
//! events on the backend's own stream, after an L2 flush and a synchronization that stay
//! outside the interval) and can answer bookkeeping-only steps without running them.
//!
//! Bookkeeping-only steps ("skip" on) return zeros of the graph's output shapes and launch
//! nothing: the engine still reserves and un-shares cache pages for them exactly as for a real
//! step, so sequences get the positions and distinct pages a prefill would give them, while
//! the pages keep what the cache held (zeros from its allocation, or finite values of earlier
//! real steps). Attention kernels take the same time over any values; see the bench's docs.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::CudaEvent;
use r1_runtime::backend::{Backend, Precision, Readout, StepOutput};
use r1_runtime::cuda::timing::L2Flush;
use r1_runtime::cuda::{CudaBackend, CudaError, Device};
use r1_runtime::graph::{Graph, Plan};
use r1_runtime::kv_cache::Batch;
use r1_runtime::model::{HIDDEN_OUT, LOGITS};
use r1_runtime::{Error, Result};

/// What the bench and the backend share.
#[derive(Default)]
pub struct Control {
    /// Answer steps with zeros, running nothing (filling caches by bookkeeping).
    pub skip: AtomicBool,
    /// Flush L2 before each timed step (per-layer probes; off for whole-engine runs).
    pub flush: AtomicBool,
    /// Run decode and verification steps eagerly instead of replaying CUDA graphs.
    pub eager: AtomicBool,
    timing: Mutex<Timing>,
}

/// Step timings so far.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Timing {
    /// Steps the GPU ran.
    pub runs: u64,
    /// Sum over them of the CUDA-event time (start event to end event on the stream, gaps
    /// where the GPU waited for the host included) and of the host time of the backend's
    /// `run`, microseconds.
    pub gpu_us: f64,
    pub run_us: f64,
    /// The last step's.
    pub last_gpu_us: f64,
    pub last_run_us: f64,
}

impl Control {
    pub fn timing(&self) -> Timing {
        *self.timing.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn set_skip(&self, on: bool) {
        self.skip.store(on, Ordering::SeqCst);
    }

    pub fn set_flush(&self, on: bool) {
        self.flush.store(on, Ordering::SeqCst);
    }

    pub fn set_eager(&self, on: bool) {
        self.eager.store(on, Ordering::SeqCst);
    }
}

pub struct Probe {
    inner: CudaBackend,
    dev: Device,
    control: Arc<Control>,
    flush: L2Flush,
    start: CudaEvent,
    end: CudaEvent,
}

fn driver(call: &str) -> impl Fn(cudarc::driver::DriverError) -> Error + '_ {
    move |source| {
        Error::from(CudaError::Driver {
            call: call.to_string(),
            source,
        })
    }
}

impl Probe {
    pub fn new(inner: CudaBackend, control: Arc<Control>) -> Result<Self> {
        let dev = inner.device().clone();
        let event = || {
            dev.context()
                .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(driver("cuEventCreate"))
        };
        Ok(Probe {
            flush: L2Flush::new(&dev)?,
            start: event()?,
            end: event()?,
            dev,
            inner,
            control,
        })
    }
}

impl Backend for Probe {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn precision(&self) -> Precision {
        self.inner.precision()
    }

    fn run(
        &mut self,
        graph: &Graph,
        plan: &Plan,
        batch: &Batch,
        inputs: &[(&str, &[f32])],
        readout: &Readout<'_>,
    ) -> Result<StepOutput> {
        if self.control.skip.load(Ordering::SeqCst) {
            // Token 0 for every draw, zero logits and states: the shapes the engine checks.
            let width = |name: &str| graph.output(name).map_or(0, |b| graph.desc(b).width);
            let asked = readout.rows.iter().filter(|r| r.logits).count();
            return Ok(StepOutput {
                tokens: readout.rows.iter().map(|r| r.draw.map(|_| 0)).collect(),
                logits: vec![0.0; asked * width(LOGITS)],
                hidden: if readout.hidden {
                    vec![0.0; batch.tokens.len() * width(HIDDEN_OUT)]
                } else {
                    Vec::new()
                },
            });
        }
        self.inner
            .set_cuda_graphs(!self.control.eager.load(Ordering::SeqCst))?;
        if self.control.flush.load(Ordering::SeqCst) {
            self.flush.flush(&self.dev)?;
        }
        self.dev.synchronize()?;
        let stream = self.dev.stream();
        self.start.record(stream).map_err(driver("cuEventRecord"))?;
        let t0 = Instant::now();
        let out = self.inner.run(graph, plan, batch, inputs, readout)?;
        let run_us = t0.elapsed().as_secs_f64() * 1e6;
        self.end.record(stream).map_err(driver("cuEventRecord"))?;
        self.end
            .synchronize()
            .map_err(driver("cuEventSynchronize"))?;
        let gpu_us = f64::from(
            self.start
                .elapsed_ms(&self.end)
                .map_err(driver("cuEventElapsedTime"))?,
        ) * 1e3;
        let mut t = self
            .control
            .timing
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        t.runs += 1;
        t.gpu_us += gpu_us;
        t.run_us += run_us;
        t.last_gpu_us = gpu_us;
        t.last_run_us = run_us;
        Ok(out)
    }
}
