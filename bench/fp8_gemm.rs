//! FP8 block-scaled GEMM throughput: M in {1, 16, 64, 128, 4096} x DeepSeek-V3's six (N, K).
//!
//! `cargo bench --bench fp8_gemm [-- FILTER]`. Per shape: the kernel `GemmKernel::Auto` picks
//! (criterion samples it too) and, for M <= 128, the other wgmma variant for comparison (the
//! Auto threshold). TFLOPS = 2MNK / t; GB/s = (A + B + scales + D bytes) / t; % of H100 SXM
//! (1979 dense FP8 TFLOPS, 3.35 TB/s). L2 is flushed before every timed call. Without a GPU:
//! `skipped: no CUDA device (<reason>)`, exit 0. See bench/common/mod.rs for the environment.

mod common;

use common::gpu_support::{Rng, DEEPSEEK_NK};
use common::{fail, Measurement, BENCH_M};
use half::bf16;
use r1_runtime::cuda::{act_scale_m_pad, DeviceBuffer, Fp8GemmArgs, GemmKernel};

const QB: usize = 128;

fn main() {
    let Some(dev) = common::open_device() else {
        return;
    };
    let mut h = common::start(&dev, "fp8_gemm");
    let mut rng = Rng::new(0x5EED);
    for &(n, k) in &DEEPSEEK_NK {
        let ids: Vec<(usize, String)> = BENCH_M
            .iter()
            .map(|&m| (m, format!("m{m}_n{n}_k{k}")))
            .filter(|(_, id)| h.selected(id))
            .collect();
        if ids.is_empty() {
            continue;
        }
        let kb = k / QB;
        let b = dev
            .upload(&rng.fp8_codes(n * k))
            .unwrap_or_else(|e| fail("upload B", e));
        let sb = dev
            .upload(&rng.uniform(n.div_ceil(QB) * kb, 1e-4, 1e-3))
            .unwrap_or_else(|e| fail("upload sb", e));
        for (m, id) in ids {
            let m_pad = act_scale_m_pad(m);
            let a = dev
                .upload(&rng.fp8_codes(m * k))
                .unwrap_or_else(|e| fail("upload A", e));
            let sa = dev
                .upload(&rng.uniform(kb * m_pad, 1e-3, 1e-2))
                .unwrap_or_else(|e| fail("upload sa", e));
            let mut d: DeviceBuffer<bf16> = dev.alloc(m * n).unwrap_or_else(|e| fail("alloc D", e));
            let flops = 2.0 * (m * n * k) as f64;
            let bytes = (m * k + n * k + 4 * (kb * m + n.div_ceil(QB) * kb) + 2 * m * n) as f64;
            let mut kernels = vec![GemmKernel::Auto];
            if m <= 128 {
                kernels.extend([GemmKernel::Wgmma, GemmKernel::WgmmaM64]);
            }
            let mut auto_kernel = None;
            for kernel in kernels {
                let args = Fp8GemmArgs {
                    a: &a,
                    lda: k,
                    sa: &sa,
                    m_pad,
                    b: &b,
                    ldb: k,
                    sb: &sb,
                    d: &mut d,
                    ldd: n,
                    m,
                    n,
                    k,
                    split_k: None,
                    splits: None,
                };
                // Only the Auto kernel and the variant it did not pick are reported.
                if kernel != GemmKernel::Auto && Some(kernel) == auto_kernel {
                    continue;
                }
                let prep = dev
                    .prepare_fp8_gemm(args, kernel)
                    .unwrap_or_else(|e| fail(&id, e));
                let ran = prep.kernel();
                if kernel == GemmKernel::Auto {
                    auto_kernel = Some(ran);
                }
                let stats = h.measure(|| prep.launch()).unwrap_or_else(|e| fail(&id, e));
                h.report(&Measurement {
                    id: &id,
                    kernel: ran.name(),
                    dims: &[("m", m), ("n", n), ("k", k)],
                    stats,
                    flops,
                    bytes,
                });
                if kernel == GemmKernel::Auto {
                    h.criterion_bench(&id, || prep.launch());
                }
            }
        }
    }
    h.finish();
}
