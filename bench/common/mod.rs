//! Shared harness of the GPU benches (criterion, `harness = false`).
//!
//! Each bench opens the device ([`open_device`]; without one it prints `skipped: no CUDA device (<reason>)` and exits 0),
//! times every shape with CUDA events around the launches and an L2 flush (a memset over
//! several times the L2 size) before each timed call, prints one summary line per shape
//! (median time, TFLOPS = flops / t, GB/s = bytes moved / t, and % of the H100 SXM limits, or
//! of the device-to-device copy bandwidth measured in the same run once
//! [`Harness::measure_copy_bandwidth`] has run) and, when `R1_BENCH_JSON` names a file, appends
//! one JSON object per line to it. Criterion then samples the same launches (GPU time, flush
//! excluded) for its statistics.
//!
//! Arguments are criterion's (`--bench` is what `cargo bench` passes; without it each shape
//! runs once as a smoke test). A positional FILTER selects shapes by substring, for the summary
//! and criterion alike. Environment: `R1_BENCH_ITERS` (timed calls per summary line, default
//! 50), `R1_BENCH_CRITERION=0` (summary lines only), `R1_BENCH_JSON` (JSON-lines path).
//!
//! The generator, test data and shapes shared with the GPU tests come from tests/gpu_support
//! (included here as [`gpu_support`]).
#![allow(dead_code)]

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::time::Duration;

use criterion::Criterion;
use r1_runtime::cuda::timing::{time_calls, L2Flush, Stats};
use r1_runtime::cuda::{Device, Result};
use serde_json::Value;

#[path = "../../tests/gpu_support/mod.rs"]
pub mod gpu_support;

/// H100 SXM dense FP8 tensor-core peak (TFLOPS) and HBM3 bandwidth (GB/s).
pub const H100_SXM_FP8_TFLOPS: f64 = 1979.0;
pub const H100_SXM_HBM_GBPS: f64 = 3350.0;
/// A device-to-device copy on H100 SXM moves about this much (read + write, GB/s).
pub const H100_SXM_COPY_GBPS: f64 = 3000.0;

/// The token counts benched (with `gpu_support::DEEPSEEK_NK`'s shapes).
pub const BENCH_M: [usize; 5] = [1, 16, 64, 128, 4096];

pub struct Harness<'d> {
    pub dev: &'d Device,
    pub flush: L2Flush,
    /// Criterion, unless `R1_BENCH_CRITERION=0` or not in bench mode.
    pub criterion: Option<Criterion>,
    /// `--bench` was passed (else: one call per shape, a smoke test).
    pub bench_mode: bool,
    pub iters: usize,
    filter: Option<String>,
    json: Option<(String, File)>,
    bench: &'static str,
    /// Device-to-device copy bandwidth (GB/s) measured in this run, once asked for.
    copy_gbps: Option<f64>,
}

/// Criterion's options that take a value (so their values are not mistaken for a filter).
const VALUE_OPTIONS: &[&str] = &[
    "--sample-size",
    "--warm-up-time",
    "--measurement-time",
    "--save-baseline",
    "--baseline",
    "--baseline-lenient",
    "--load-baseline",
    "--profile-time",
    "--format",
    "--output-format",
    "--plotting-backend",
    "--color",
    "-c",
    "--noise-threshold",
    "--confidence-level",
    "--significance-level",
    "--nresamples",
    "--logfile",
];

fn positional_filter(args: &[String]) -> Option<String> {
    let mut skip = false;
    for a in args.iter().skip(1) {
        if skip {
            skip = false;
        } else if VALUE_OPTIONS.contains(&a.as_str()) {
            skip = true;
        } else if !a.starts_with('-') {
            return Some(a.clone());
        }
    }
    None
}

/// Opens the device, or prints the skip line and returns None.
pub fn open_device() -> Option<Device> {
    match Device::open(0) {
        Ok(d) => Some(d),
        Err(e) => {
            println!("skipped: no CUDA device ({e})");
            if gpu_support::require_gpu() {
                eprintln!("R1_REQUIRE_GPU is set: failing instead of skipping");
                std::process::exit(1);
            }
            None
        }
    }
}

/// The harness over an open device.
pub fn start<'d>(dev: &'d Device, bench: &'static str) -> Harness<'d> {
    let args: Vec<String> = std::env::args().collect();
    let bench_mode = args.iter().any(|a| a == "--bench");
    let flush = match L2Flush::new(dev) {
        Ok(f) => f,
        Err(e) => panic!("{bench}: cannot allocate the L2 flush buffer: {e}"),
    };
    let use_criterion =
        bench_mode && std::env::var("R1_BENCH_CRITERION").map_or(true, |v| v != "0");
    let criterion = use_criterion.then(|| {
        Criterion::default()
            .sample_size(10)
            .warm_up_time(Duration::from_millis(300))
            .measurement_time(Duration::from_secs(1))
            .configure_from_args()
    });
    let iters = if bench_mode {
        std::env::var("R1_BENCH_ITERS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(50usize)
            .max(1)
    } else {
        1
    };
    let json = std::env::var("R1_BENCH_JSON").ok().map(|path| {
        let f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("R1_BENCH_JSON={path}: {e}"));
        (path, f)
    });
    let i = dev.info();
    println!(
        "{bench}: {} | sm_{}{} | {} SMs | SM clock {} MHz (max) | memory {} MHz x {} bit | L2 {} MiB \
         (flush {} MiB per timed call) | driver {} | {} timed calls per line | limits: H100 SXM \
         {H100_SXM_FP8_TFLOPS} FP8 TFLOPS, {H100_SXM_HBM_GBPS} GB/s",
        i.name,
        i.compute_capability.0,
        i.compute_capability.1,
        i.sm_count,
        i.sm_clock_khz / 1000,
        i.mem_clock_khz / 1000,
        i.mem_bus_width_bits,
        i.l2_bytes >> 20,
        flush.bytes() >> 20,
        i.driver_version,
        iters,
    );
    if !bench_mode {
        println!("{bench}: no --bench argument: one call per shape (smoke test), no timing claims");
    }
    Harness {
        dev,
        flush,
        criterion,
        bench_mode,
        iters,
        filter: positional_filter(&args),
        json,
        bench,
        copy_gbps: None,
    }
}

/// Device-to-device copy bandwidth, (read + write bytes) / time, of a 1 GiB copy (median of
/// five after two untimed): the practical ceiling of a memory-bound kernel on this device.
pub fn copy_bandwidth(dev: &Device) -> Result<f64> {
    let half = 1usize << 30;
    let mut buf = dev.alloc::<u8>(2 * half)?;
    let times = time_calls(dev, None, 7, || dev.copy_within(&mut buf, 0, half, half))?;
    Ok(2.0 * half as f64 / (Stats::of(&times[2..]).median_us * 1e-6) / 1e9)
}

/// One measured shape.
pub struct Measurement<'a> {
    /// Shape id, e.g. "m128_n7168_k16384".
    pub id: &'a str,
    pub kernel: &'a str,
    /// (name, value) pairs written to the JSON line (m, n, k, ...).
    pub dims: &'a [(&'a str, usize)],
    pub stats: Stats,
    /// Floating-point operations per call (0 for memory-bound kernels).
    pub flops: f64,
    /// Bytes read + written per call (counting each operand once).
    pub bytes: f64,
}

impl Harness<'_> {
    pub fn selected(&self, id: &str) -> bool {
        self.filter.as_deref().is_none_or(|f| id.contains(f))
    }

    /// Times `iters` calls of `launch` (L2 flushed before each) after 3 untimed ones.
    pub fn measure(&mut self, mut launch: impl FnMut() -> Result<()>) -> Result<Stats> {
        for _ in 0..if self.bench_mode { 3 } else { 0 } {
            launch()?;
        }
        let times = time_calls(self.dev, Some(&mut self.flush), self.iters, &mut launch)?;
        Ok(Stats::of(&times))
    }

    /// Measures [`copy_bandwidth`] (printed, and appended as a JSON line with id
    /// "copy_bandwidth"); every later line also reports its GB/s as a percentage of it.
    pub fn measure_copy_bandwidth(&mut self) -> Result<f64> {
        let gbps = copy_bandwidth(self.dev)?;
        self.copy_gbps = Some(gbps);
        println!(
            "{}: device-to-device copy {gbps:.0} GB/s (read + write, 1 GiB cuMemcpyDtoD)",
            self.bench
        );
        let line = serde_json::json!({
            "bench": self.bench,
            "id": "copy_bandwidth",
            "kind": "copy",
            "gpu": self.dev.info().name,
            "gbps": gbps,
        });
        self.json_line(&line);
        Ok(gbps)
    }

    /// Prints the summary line and appends the JSON line.
    pub fn report(&mut self, m: &Measurement<'_>) {
        self.report_with(m, &[]);
    }

    /// [`Harness::report`] with text fields (name, value) printed before the dimensions and
    /// written to the JSON line.
    pub fn report_with(&mut self, m: &Measurement<'_>, labels: &[(&str, &str)]) {
        let t = m.stats.median_us * 1e-6;
        let tflops = m.flops / t / 1e12;
        let gbps = m.bytes / t / 1e9;
        let dims: String = labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .chain(m.dims.iter().map(|(k, v)| format!("{k}={v:<6}")))
            .collect::<Vec<_>>()
            .join(" ");
        let copy = self.copy_gbps.map_or(String::new(), |c| {
            format!(" ({:5.1}% of copy {c:.0})", 100.0 * gbps / c)
        });
        let compute = if m.flops > 0.0 {
            format!(
                "{tflops:8.1} TFLOPS ({:5.1}% of {H100_SXM_FP8_TFLOPS})",
                100.0 * tflops / H100_SXM_FP8_TFLOPS
            )
        } else {
            String::new()
        };
        println!(
            "{} {dims} {:<20} median {:9.2} us (min {:9.2}) {compute} {gbps:8.1} GB/s ({:5.1}% of {H100_SXM_HBM_GBPS}){copy}",
            self.bench,
            m.kernel,
            m.stats.median_us,
            m.stats.min_us,
            100.0 * gbps / H100_SXM_HBM_GBPS
        );
        if self.json.is_some() {
            let i = self.dev.info();
            let mut obj = serde_json::json!({
                "bench": self.bench,
                "id": m.id,
                "kernel": m.kernel,
                "gpu": i.name,
                "sm_count": i.sm_count,
                "driver_version": i.driver_version,
                "bench_mode": self.bench_mode,
                "l2_flush_bytes": self.flush.bytes(),
                "iters": m.stats.n,
                "median_us": m.stats.median_us,
                "min_us": m.stats.min_us,
                "mean_us": m.stats.mean_us,
                "max_us": m.stats.max_us,
                "flops": m.flops,
                "bytes": m.bytes,
                "tflops": tflops,
                "gbps": gbps,
                "pct_h100_sxm_fp8_tflops": 100.0 * tflops / H100_SXM_FP8_TFLOPS,
                "pct_h100_sxm_hbm_gbps": 100.0 * gbps / H100_SXM_HBM_GBPS,
            });
            for (k, v) in m.dims {
                obj[*k] = serde_json::json!(v);
            }
            for (k, v) in labels {
                obj[*k] = serde_json::json!(v);
            }
            if let Some(c) = self.copy_gbps {
                obj["copy_gbps"] = serde_json::json!(c);
                obj["pct_copy"] = serde_json::json!(100.0 * gbps / c);
            }
            self.json_line(&obj);
        }
    }

    /// Appends `obj` to the `R1_BENCH_JSON` file, if one is named.
    pub fn json_line(&mut self, obj: &Value) {
        if let Some((path, f)) = &mut self.json {
            if let Err(e) = writeln!(f, "{obj}") {
                panic!("R1_BENCH_JSON={path}: {e}");
            }
        }
    }

    /// Criterion samples of `launch`: GPU time per call (events; L2 flushed before each call,
    /// outside the timed interval).
    pub fn criterion_bench(&mut self, id: &str, mut launch: impl FnMut() -> Result<()>) {
        let Some(c) = self.criterion.as_mut() else {
            return;
        };
        let (dev, flush) = (self.dev, &mut self.flush);
        c.bench_function(&format!("{}/{id}", self.bench), |b| {
            b.iter_custom(|iters| {
                let mut total_us = 0.0;
                let mut left = iters as usize;
                while left > 0 {
                    let chunk = left.min(1000);
                    let times = time_calls(dev, Some(&mut *flush), chunk, &mut launch)
                        .unwrap_or_else(|e| panic!("{id}: {e}"));
                    total_us += times.iter().sum::<f64>();
                    left -= chunk;
                }
                Duration::from_secs_f64(total_us * 1e-6)
            })
        });
    }

    pub fn finish(self) {
        if let Some(c) = self.criterion {
            c.final_summary();
        }
        if let Some((path, _)) = &self.json {
            println!("{}: JSON lines appended to {path}", self.bench);
        }
    }
}

pub fn fail(what: &str, e: impl std::fmt::Display) -> ! {
    panic!("{what}: {e}")
}
