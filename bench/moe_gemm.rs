//! Grouped FP8 GEMM throughput (the MoE experts) and the whole MoE block at decode.
//!
//! `cargo bench --bench moe_gemm [-- FILTER]`. Shapes:
//! - contiguous (prefill), DeepGEMM's: 4 groups x 8192 rows and 8 x 4096, (N, K) in
//!   {(4096, 7168), (7168, 2048)}; ids `contig_g{G}_m{M}_n{N}_k{K}`.
//! - masked, DeepGEMM's: 1 x 1024, 2 x 512, 4 x 256 rows per group (every row valid), same
//!   (N, K); ids `masked_g{G}_m{M}_n{N}_k{K}`; the Auto kernel and the BLOCK_M 64 variant.
//! - decode: DeepSeek-V3's 256 experts, top-8, batch 1 / 32 / 128, random routing (mostly
//!   empty experts), masked rows = batch; gate+up (4096, 7168) and down (7168, 2048); ids
//!   `decode_b{B}_n{N}_k{K}`; masked m64 (Auto), masked BLOCK_M 128 and contiguous.
//! - the whole MoE block at decode (router logits, router, act_quant, plan, gather, both
//!   grouped GEMMs, SiLU*up+quant, the shared expert's GEMMs, unpermute): `moe_block_b{B}`.
//!
//! TFLOPS = 2 * (valid rows) * N * K / t. GB/s = bytes moved / t, counting A's valid rows, the
//! weights of the experts that received tokens (all of them for the prefill shapes), the
//! scales and D; for the block, every weight it reads. % of H100 SXM (1979 dense FP8 TFLOPS,
//! 3.35 TB/s). Targets: contiguous 4x8192 (4096, 7168) >= 1300 TFLOPS; masked 4x256
//! (7168, 2048) >= 2.0 TB/s; decode at batch 1: the active experts' weights at >= 2.5 TB/s.
//! Weight values: random for the prefill/masked shapes; the decode shapes' 256 experts
//! (11 GiB) are filled with a constant code (timing does not depend on values). L2 is flushed
//! before every timed call. Without a GPU: `skipped: no CUDA device (<reason>)`, exit 0.

mod common;

use common::gpu_support::{deepseek_router, route_ids, to_bf16, Rng};
use common::{fail, Harness, Measurement};
use half::bf16;
use r1_runtime::cuda::ops::{
    GroupedFp8Weight, GroupedGemmArgs, GroupedGemmKernel, MoeBlockConfig, MoeBlockWeights,
    MoeGemmPath, MoeGeometry, MoeLayout, MoeOps, MoePlanBuffers, MoeWorkspace, PermutedRows,
    PlanArgs,
};
use r1_runtime::cuda::{Device, DeviceBuffer};

const QB: usize = 128;
const PREFILL_NK: [(usize, usize); 2] = [(4096, 7168), (7168, 2048)];

fn main() {
    let Some(dev) = common::open_device() else {
        return;
    };
    let ops = MoeOps::new(&dev);
    let mut h = common::start(&dev, "moe_gemm");
    let mut rng = Rng::new(0x30E);

    for (groups, m) in [(4, 8192), (8, 4096)] {
        for (n, k) in PREFILL_NK {
            let id = format!("contig_g{groups}_m{m}_n{n}_k{k}");
            if h.selected(&id) {
                let ids: Vec<i32> = (0..groups * m).map(|i| (i / m) as i32).collect();
                let geom = MoeGeometry {
                    tokens: groups * m,
                    top_k: 1,
                    experts: groups,
                    layout: MoeLayout::Contiguous,
                };
                let mut p = Problem::new(&ops, &mut rng, geom, &ids, n, k);
                p.bench(&mut h, &ops, &id, &[GroupedGemmKernel::Auto], (groups, m));
            }
        }
    }
    for (groups, m) in [(1, 1024), (2, 512), (4, 256)] {
        for (n, k) in PREFILL_NK {
            let id = format!("masked_g{groups}_m{m}_n{n}_k{k}");
            if h.selected(&id) {
                let ids: Vec<i32> = (0..groups * m).map(|i| (i / m) as i32).collect();
                let geom = MoeGeometry {
                    tokens: groups * m,
                    top_k: 1,
                    experts: groups,
                    layout: MoeLayout::Masked {
                        max_tokens_per_expert: m,
                    },
                };
                let mut p = Problem::new(&ops, &mut rng, geom, &ids, n, k);
                let kernels = [GroupedGemmKernel::Auto, GroupedGemmKernel::MaskedWgmmaM64];
                p.bench(&mut h, &ops, &id, &kernels, (groups, m));
            }
        }
    }
    decode(&dev, &ops, &mut h, &mut rng);
    h.finish();
}

/// A grouped GEMM with its plan built on the device (untimed) and random operands.
struct Problem<'d> {
    geom: MoeGeometry,
    ids: DeviceBuffer<i32>,
    plan: MoePlanBuffers,
    a: PermutedRows,
    w: Option<GroupedFp8Weight>,
    d: DeviceBuffer<bf16>,
    /// Experts that received rows, and the valid rows.
    active: usize,
    rows: usize,
    dev: &'d Device,
    n: usize,
    k: usize,
}

impl<'d> Problem<'d> {
    fn new(
        ops: &'d MoeOps,
        rng: &mut Rng,
        geom: MoeGeometry,
        ids: &[i32],
        n: usize,
        k: usize,
    ) -> Self {
        let mut p = Problem::with_plan(ops, rng, geom, ids, n, k);
        let (e, kb) = (geom.experts, k / QB);
        let codes = rng.fp8_codes(e * n * k);
        let scales = rng.uniform(e * n.div_ceil(QB) * kb, 1e-4, 1e-3);
        p.w = Some(
            GroupedFp8Weight::upload(p.dev, &codes, &scales, e, n, k)
                .unwrap_or_else(|e| fail("upload weights", e)),
        );
        p
    }

    /// Plan, permuted A (random codes, scales) and D; no weights.
    fn with_plan(
        ops: &'d MoeOps,
        rng: &mut Rng,
        geom: MoeGeometry,
        ids: &[i32],
        n: usize,
        k: usize,
    ) -> Self {
        let dev = ops.device();
        let ids_d = dev.upload(ids).unwrap_or_else(|e| fail("upload ids", e));
        let mut plan = MoePlanBuffers::alloc(dev, geom).unwrap_or_else(|e| fail("alloc plan", e));
        let mut flags = ops.alloc_flags().unwrap_or_else(|e| fail("alloc flags", e));
        ops.prepare_plan(PlanArgs {
            tokens: geom.tokens,
            topk_ids: &ids_d,
            plan: &mut plan,
            flags: &mut flags,
        })
        .and_then(|p| p.launch())
        .unwrap_or_else(|e| fail("moe_plan", e));
        ops.read_flags(&flags)
            .and_then(|f| f.into_result())
            .unwrap_or_else(|e| fail("moe_plan flags", e));
        let mut a = PermutedRows::alloc(dev, &geom, k).unwrap_or_else(|e| fail("alloc A", e));
        let codes = rng.fp8_codes(a.rows * k);
        dev.copy_to_device(&codes, &mut a.q)
            .unwrap_or_else(|e| fail("upload A", e));
        let sa = rng.uniform(a.scales.len(), 1e-3, 1e-2);
        dev.copy_to_device(&sa, &mut a.scales)
            .unwrap_or_else(|e| fail("upload sa", e));
        let d = dev
            .alloc(geom.rows() * n)
            .unwrap_or_else(|e| fail("alloc D", e));
        let counts = dev
            .download(&plan.counts)
            .unwrap_or_else(|e| fail("counts", e));
        Problem {
            geom,
            ids: ids_d,
            plan,
            a,
            w: None,
            d,
            active: counts.iter().filter(|&&c| c > 0).count(),
            rows: ids.len(),
            dev,
            n,
            k,
        }
    }

    fn bench(
        &mut self,
        h: &mut Harness<'_>,
        ops: &MoeOps,
        id: &str,
        kernels: &[GroupedGemmKernel],
        gm: (usize, usize),
    ) {
        let w = self.w.take().expect("weights");
        self.bench_with(h, ops, id, kernels, &w, &[("groups", gm.0), ("m", gm.1)]);
    }

    fn bench_with(
        &mut self,
        h: &mut Harness<'_>,
        ops: &MoeOps,
        id: &str,
        kernels: &[GroupedGemmKernel],
        w: &GroupedFp8Weight,
        extra: &[(&str, usize)],
    ) {
        let (n, k) = (self.n, self.k);
        let kb = k / QB;
        let flops = 2.0 * (self.rows * n * k) as f64;
        let bytes = (self.rows * k
            + self.active * (n * k + 4 * n.div_ceil(QB) * kb)
            + 4 * self.rows * kb
            + 2 * self.rows * n) as f64;
        let mut dims: Vec<(&str, usize)> = extra.to_vec();
        dims.extend([
            ("n", n),
            ("k", k),
            ("experts", self.geom.experts),
            ("active_experts", self.active),
        ]);
        let mut auto = None;
        for &kernel in kernels {
            let prep = ops
                .prepare_grouped_gemm(
                    GroupedGemmArgs {
                        tokens: self.geom.tokens,
                        a: &self.a,
                        w,
                        topk_ids: &self.ids,
                        plan: &self.plan,
                        d: &mut self.d,
                        ldd: n,
                    },
                    kernel,
                )
                .unwrap_or_else(|e| fail(id, e));
            let ran = prep.kernel();
            if kernel != GroupedGemmKernel::Auto && Some(ran) == auto {
                continue;
            }
            if kernel == GroupedGemmKernel::Auto {
                auto = Some(ran);
            }
            let stats = h.measure(|| prep.launch()).unwrap_or_else(|e| fail(id, e));
            h.report(&Measurement {
                id,
                kernel: ran.name(),
                dims: &dims,
                stats,
                flops,
                bytes,
            });
            if kernel == GroupedGemmKernel::Auto {
                h.criterion_bench(id, || prep.launch());
            }
        }
    }
}

/// DeepSeek-V3's decode: 256 experts, top-8, batch 1 / 32 / 128.
fn decode(dev: &Device, ops: &MoeOps, h: &mut Harness<'_>, rng: &mut Rng) {
    let batches = [1usize, 32, 128];
    let wanted: Vec<usize> = batches
        .iter()
        .copied()
        .filter(|b| {
            PREFILL_NK
                .iter()
                .any(|(n, k)| h.selected(&format!("decode_b{b}_n{n}_k{k}")))
                || h.selected(&format!("moe_block_b{b}"))
        })
        .collect();
    if wanted.is_empty() {
        return;
    }
    let cfg = MoeBlockConfig {
        router: deepseek_router(),
        hidden: 7168,
        inter: 2048,
        shared_inter: 2048,
    };
    let weights = deepseek_weights(dev, &cfg, rng);
    let (e, top_k) = (cfg.router.experts, cfg.router.top_k);
    for &b in &wanted {
        // Random routing: each token 8 distinct experts.
        let ids = route_ids(rng, b, top_k, e, None);
        for (w, (n, k)) in [
            (&weights.gate_up, PREFILL_NK[0]),
            (&weights.down, PREFILL_NK[1]),
        ] {
            let id = format!("decode_b{b}_n{n}_k{k}");
            if !h.selected(&id) {
                continue;
            }
            let masked = MoeGeometry {
                tokens: b,
                top_k,
                experts: e,
                layout: MoeLayout::Masked {
                    max_tokens_per_expert: b,
                },
            };
            let mut p = Problem::with_plan(ops, rng, masked, &ids, n, k);
            let kernels = [GroupedGemmKernel::Auto, GroupedGemmKernel::MaskedWgmma];
            p.bench_with(h, ops, &id, &kernels, w, &[("batch", b)]);
            let contig = MoeGeometry {
                layout: MoeLayout::Contiguous,
                ..masked
            };
            let mut p = Problem::with_plan(ops, rng, contig, &ids, n, k);
            p.bench_with(
                h,
                ops,
                &format!("{id}_contig"),
                &[GroupedGemmKernel::ContigWgmma],
                w,
                &[("batch", b)],
            );
        }
        let id = format!("moe_block_b{b}");
        if h.selected(&id) {
            bench_block(dev, ops, h, &cfg, &weights, b, &id, rng);
        }
    }
}

/// 256 experts of DeepSeek-V3's size on the device: a constant FP8 code, random-ish scales;
/// the router weight random (so routing varies with x).
fn deepseek_weights(dev: &Device, cfg: &MoeBlockConfig, rng: &mut Rng) -> MoeBlockWeights {
    let (e, h, i, si) = (cfg.router.experts, cfg.hidden, cfg.inter, cfg.shared_inter);
    let grouped = |n: usize, k: usize, rng: &mut Rng| {
        let mut codes: DeviceBuffer<u8> = dev
            .alloc(e * n * k)
            .unwrap_or_else(|x| fail("alloc expert weights", x));
        dev.memset(&mut codes, 0x30)
            .unwrap_or_else(|x| fail("fill expert weights", x));
        let scales = dev
            .upload(&rng.uniform(e * n.div_ceil(QB) * k.div_ceil(QB), 1e-4, 1e-3))
            .unwrap_or_else(|x| fail("upload expert scales", x));
        GroupedFp8Weight {
            codes,
            scales,
            experts: e,
            n,
            k,
        }
    };
    let router = to_bf16(&rng.uniform(e * h, -0.05, 0.05));
    let dense = |n: usize, k: usize, rng: &mut Rng| {
        r1_runtime::cuda::Fp8Weight::upload(
            dev,
            &rng.fp8_codes(n * k),
            &rng.uniform(n.div_ceil(QB) * k.div_ceil(QB), 1e-4, 1e-3),
            n,
            k,
        )
        .unwrap_or_else(|x| fail("upload shared expert", x))
    };
    MoeBlockWeights {
        router: dev
            .upload(&router)
            .unwrap_or_else(|x| fail("upload router", x)),
        bias: Some(
            dev.upload(&vec![0f32; e])
                .unwrap_or_else(|x| fail("upload bias", x)),
        ),
        gate_up: grouped(2 * i, h, rng),
        down: grouped(h, i, rng),
        shared: Some((dense(2 * si, h, rng), dense(h, si, rng))),
    }
}

#[allow(clippy::too_many_arguments)]
fn bench_block(
    dev: &Device,
    ops: &MoeOps,
    h: &mut Harness<'_>,
    cfg: &MoeBlockConfig,
    w: &MoeBlockWeights,
    b: usize,
    id: &str,
    rng: &mut Rng,
) {
    let (hd, i, si, e, top_k) = (
        cfg.hidden,
        cfg.inter,
        cfg.shared_inter,
        cfg.router.experts,
        cfg.router.top_k,
    );
    let layout = MoeLayout::auto(b);
    let mut ws =
        MoeWorkspace::new(dev, *cfg, b, layout, MoeGemmPath::Fast).unwrap_or_else(|x| fail(id, x));
    let x = to_bf16(&rng.uniform(b * hd, -2.0, 2.0));
    let x = dev.upload(&x).unwrap_or_else(|x| fail("upload x", x));
    let mut out: DeviceBuffer<bf16> = dev.alloc(b * hd).unwrap_or_else(|x| fail("alloc out", x));
    ops.moe_forward(&mut ws, w, &x, b, &mut out)
        .unwrap_or_else(|x| fail(id, x));
    ws.take_errors(ops).unwrap_or_else(|x| fail(id, x));
    let ids = dev.download(&ws.topk_ids).unwrap_or_else(|x| fail(id, x));
    let mut active: Vec<i32> = ids[..b * top_k].to_vec();
    active.sort_unstable();
    active.dedup();
    let active = active.len();
    let expert_bytes = 3 * i * hd + 4 * (2 * i / QB * hd / QB + hd / QB * i / QB);
    let shared_bytes = 3 * si * hd;
    let bytes = (active * expert_bytes + shared_bytes + 2 * e * hd + 4 * b * hd) as f64;
    let flops = 2.0 * ((b * top_k) as f64 * (3 * i * hd) as f64 + (b * 3 * si * hd) as f64);
    let stats = h
        .measure(|| ops.moe_forward(&mut ws, w, &x, b, &mut out))
        .unwrap_or_else(|x| fail(id, x));
    h.report(&Measurement {
        id,
        kernel: "moe_block",
        dims: &[
            ("batch", b),
            ("experts", e),
            ("top_k", top_k),
            ("active_experts", active),
            ("masked", usize::from(layout != MoeLayout::Contiguous)),
        ],
        stats,
        flops,
        bytes,
    });
    println!(
        "moe_gemm {id}: workspace {} MiB; bytes counted: {active} active experts x {} MiB + shared + router",
        ws.bytes() >> 20,
        expert_bytes >> 20
    );
    h.criterion_bench(id, || ops.moe_forward(&mut ws, w, &x, b, &mut out));
}
