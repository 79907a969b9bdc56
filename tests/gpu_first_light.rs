//! First light: what the driver says about every kernel, then every kernel of the crate
//! launched once on a small valid shape through the public API, each launch followed by a
//! synchronize, so that a fault or a hang names its kernel.
//!
//! tools/gpu-suite runs this binary before the other GPU binaries, one test at a time, with a
//! watchdog and `--nocapture`: each launch prints `first-light: <kernels> ok (<ms> ms)` once it
//! has finished (with `R1_CUDA_TRACE=1` the launch layer also names each kernel as it is
//! queued). Results are only sanity-checked here (finite outputs, MoE error flags clear); the
//! other GPU tests compare every kernel with the CPU.
//!
//! Coverage: the kernels launched must be exactly `Device::kernel_attributes()` (ptxas's
//! inventory of every .cu under cuda/) minus the modules in [`NOT_LAUNCHED_HERE`], so a kernel added
//! without a first-light launch fails `first_light`.
//!
//! Without a usable device both tests print `skipped: no CUDA device (...)` and return (a
//! failure under `R1_REQUIRE_GPU`; the harness: tests/gpu_support).

mod gpu_support;

use std::collections::BTreeSet;
use std::time::Instant;

use bytemuck::Pod;
use half::bf16;

use r1_runtime::cuda::backend::{absorbed_kv_b, upload_rope};
use r1_runtime::cuda::ops::{
    CopyRowsDesc, GatherArgs, GemmBf16Desc, GroupedFp8Weight, GroupedGemmArgs, GroupedGemmKernel,
    MlaAbsorbDesc, MlaAbsorbQRopeDesc, MoeAccumDesc, MoeGeometry, MoeLayout, MoeOps,
    MoePlanBuffers, NormQuantDesc, PermutedRows, PlanArgs, QuantOut, RandomFill, RandomFillArgs,
    RouterArgs, RouterLogitsArgs, SiluMulQuantDesc, SiluQuantArgs, SmallOps, UnpermuteArgs,
};
use r1_runtime::cuda::{
    mla_schedule_host, ActQuantDesc, CudaError, Device, DeviceBuffer, Fp8GemmArgs, Fp8Weight,
    GemmKernel, Mla, MlaAttnArgs, MlaCache, MlaCacheWriteArgs, MlaKernel, MlaLayout, MlaQRopeArgs,
    MlaWorkspace, Prepared, QuantizedActivations, Region, SampleArgs, SampleRow, MLA_FAST_KV_LORA,
    MLA_FAST_ROPE, MLA_SCHED_FIXED_OVERHEAD,
};
use r1_runtime::numerics;
use r1_runtime::numerics::sampling::Draw;

use gpu_support::{deepseek_r1_config, deepseek_router, fp8_weights, gpu, to_bf16, Rng};

/// Modules whose kernels are not launched here: `probe` holds layout probes with tests of their
/// own.
const NOT_LAUNCHED_HERE: &[&str] = &["probe"];

// ------------------------------------------------------------------------------------------
// What the driver says
// ------------------------------------------------------------------------------------------

/// One row per kernel (registers, shared and local memory, architecture), then what must hold
/// for every kernel: the driver's register count is ptxas's, the binary is sm_90, nothing
/// spills to local memory, and static + dynamic shared memory fit the device's opt-in limit.
#[test]
fn kernel_attributes() {
    let Some(dev) = gpu("kernel_attributes") else {
        return;
    };
    let attrs = dev.kernel_attributes().unwrap();
    assert!(!attrs.is_empty(), "no kernels embedded");
    let optin = dev.info().max_smem_per_block_optin;
    println!(
        "{:<10} {:<26} {:>5} {:>5} {:>7} {:>8} {:>6} {:>7} {:>4} {:>4}",
        "module", "kernel", "regs", "ptxas", "static", "dynamic", "local", "threads", "sm", "ptx"
    );
    for a in &attrs {
        println!(
            "{:<10} {:<26} {:>5} {:>5} {:>7} {:>8} {:>6} {:>7} {:>4} {:>4}",
            a.module,
            a.kernel,
            a.registers,
            a.registers_at_build,
            a.static_smem_bytes,
            a.max_dynamic_smem_bytes,
            a.local_bytes_per_thread,
            a.max_threads_per_block,
            a.binary_version,
            a.ptx_version
        );
    }
    let mut broken = Vec::new();
    for a in &attrs {
        let k = a.kernel;
        if i64::from(a.registers) != i64::from(a.registers_at_build) {
            broken.push(format!(
                "{k}: the driver reports {} registers, ptxas built it with {}",
                a.registers, a.registers_at_build
            ));
        }
        if a.binary_version != 90 {
            broken.push(format!("{k}: binary version {}, not 90", a.binary_version));
        }
        if a.local_bytes_per_thread != 0 {
            broken.push(format!(
                "{k}: {} bytes of local memory per thread (spills)",
                a.local_bytes_per_thread
            ));
        }
        let smem = i64::from(a.static_smem_bytes) + i64::from(a.max_dynamic_smem_bytes);
        if smem > optin as i64 {
            broken.push(format!(
                "{k}: {} static + {} dynamic bytes of shared memory exceed the {optin} a block \
                 may opt in to",
                a.static_smem_bytes, a.max_dynamic_smem_bytes
            ));
        }
    }
    assert!(broken.is_empty(), "{}", broken.join("\n"));
}

// ------------------------------------------------------------------------------------------
// Launching one kernel at a time
// ------------------------------------------------------------------------------------------

/// Launches one call at a time and records which kernels ran.
struct FirstLight<'d> {
    dev: &'d Device,
    launched: BTreeSet<&'static str>,
}

impl FirstLight<'_> {
    /// Runs `launch` (which queues `kernels`, in order) on an idle stream, waits for it,
    /// prints `first-light: <kernels> ok (<ms> ms)` and records the kernels; panics naming them
    /// when the launch is refused or fails on the device.
    fn run<T>(
        &mut self,
        kernels: &[&'static str],
        launch: impl FnOnce() -> Result<T, CudaError>,
    ) -> T {
        let what = kernels.join(" + ");
        // Earlier uploads finish first, so a fault here is the kernels'.
        self.dev
            .synchronize()
            .unwrap_or_else(|e| panic!("first-light: before {what}: {e}"));
        let start = Instant::now();
        let out = launch().unwrap_or_else(|e| panic!("first-light: {what}: not launched: {e}"));
        self.dev
            .synchronize()
            .unwrap_or_else(|e| panic!("first-light: {what} failed on the device: {e}"));
        println!(
            "first-light: {what} ok ({:.3} ms)",
            start.elapsed().as_secs_f64() * 1e3
        );
        self.launched.extend(kernels);
        out
    }

    /// [`FirstLight::run`] of a prepared launch (consumed, so its borrows end here).
    fn light<K>(&mut self, prepared: Result<Prepared<'_, K>, CudaError>) {
        let p = prepared.unwrap_or_else(|e| panic!("first-light: not prepared: {e}"));
        self.run(&p.kernels(), || p.launch());
    }

    /// Cheap sanity of an output: every value finite.
    fn assert_finite<T: Pod>(&self, what: &str, buf: &DeviceBuffer<T>)
    where
        f32: From<T>,
    {
        let values = self.dev.download(buf).unwrap();
        if let Some((i, v)) = values
            .into_iter()
            .map(f32::from)
            .enumerate()
            .find(|(_, v)| !v.is_finite())
        {
            panic!("first-light: {what}[{i}] = {v}");
        }
    }
}

/// Every kernel once, then the coverage check against the driver's inventory.
#[test]
fn first_light() {
    let Some(dev) = gpu("first_light") else {
        return;
    };
    let mut fl = FirstLight {
        dev,
        launched: BTreeSet::new(),
    };
    let mut rng = Rng::new(1);
    light_dense(&mut fl, &mut rng);
    light_mla(&mut fl, &mut rng);
    light_moe(&mut fl, &mut rng);
    light_small_ops(&mut fl, &mut rng);
    light_sampling(&mut fl, &mut rng);
    light_random_fill(&mut fl);

    let inventory: BTreeSet<&'static str> = dev
        .kernel_attributes()
        .unwrap()
        .iter()
        .filter(|a| !NOT_LAUNCHED_HERE.contains(&a.module))
        .map(|a| a.kernel)
        .collect();
    let missing: Vec<_> = inventory.difference(&fl.launched).collect();
    let unknown: Vec<_> = fl.launched.difference(&inventory).collect();
    assert!(
        missing.is_empty() && unknown.is_empty(),
        "first-light coverage: no launch here for {missing:?}; launched but not in the \
         driver's inventory: {unknown:?}"
    );
}

// ------------------------------------------------------------------------------------------
// The kernels, module by module
// ------------------------------------------------------------------------------------------

/// act_quant, then the three dense FP8 GEMMs on its output (M = 70: a partial tile for both
/// block heights).
fn light_dense(fl: &mut FirstLight<'_>, rng: &mut Rng) {
    let dev = fl.dev;
    let (m, n, k) = (70, 256, 256);
    let x = dev
        .upload(&to_bf16(&rng.uniform(m * k, -2.0, 2.0)))
        .unwrap();
    let a = fl.run(&["act_quant"], || dev.act_quant(&x, m, k));
    let (codes, scales) = fp8_weights(rng, 1, n, k);
    let w = Fp8Weight::upload(dev, &codes, &scales, n, k).unwrap();
    for kernel in [
        GemmKernel::Wgmma,
        GemmKernel::WgmmaM64,
        GemmKernel::Reference,
    ] {
        let mut d = dev.alloc::<bf16>(m * n).unwrap();
        fl.light(dev.prepare_fp8_gemm(Fp8GemmArgs::new(&a, &w, &mut d), kernel));
        fl.assert_finite(kernel.name(), &d);
    }
}

/// The MLA kernels on a decode step of two sequences (65 and 130 cached positions, 2 new
/// tokens each, 16 heads): cache write, q RoPE, the reference attention, then the fast path
/// one kernel more at a time: decode alone (host schedule, one part), schedule + decode,
/// decode + combine (host schedule, keys split over three parts).
fn light_mla(fl: &mut FirstLight<'_>, rng: &mut Rng) {
    let dev = fl.dev;
    let mla = Mla::new(dev);
    let cfg = deepseek_r1_config();
    let (heads, kv_lora, rope) = (16, MLA_FAST_KV_LORA, MLA_FAST_ROPE);
    let width = kv_lora + rope;
    let layout = MlaLayout::decode(vec![vec![3, 1], vec![0, 4, 2]], vec![65, 130], 2);
    let batch = layout.upload(dev).unwrap();
    let tokens = layout.total_q();
    let mut cache = MlaCache::new(dev, 5, kv_lora, rope).unwrap();
    let old = to_bf16(&rng.uniform(cache.data.len(), -1.0, 1.0));
    dev.copy_to_device(&old, &mut cache.data).unwrap();
    let rope_table = upload_rope(dev, &cfg).unwrap();
    let kv = dev
        .upload(&to_bf16(&rng.uniform(tokens * width, -2.0, 2.0)))
        .unwrap();
    let norm_w = dev.upload(&to_bf16(&vec![1.0; kv_lora])).unwrap();
    fl.run(&["mla_cache_write"], || {
        mla.cache_write(MlaCacheWriteArgs {
            kv: &kv,
            ld_kv: width,
            norm_w: &norm_w,
            eps: cfg.rms_norm_eps,
            rope: &rope_table,
            batch: &batch,
            cache: &mut cache,
        })
    });
    let mut q = dev
        .upload(&to_bf16(&rng.uniform(tokens * heads * width, -1.0, 1.0)))
        .unwrap();
    fl.run(&["mla_q_rope"], || {
        mla.q_rope(MlaQRopeArgs {
            src: None,
            q: &mut q,
            heads,
            kv_lora,
            rope: &rope_table,
            batch: &batch,
        })
    });

    let rows = tokens * heads;
    let mut out = dev.alloc::<bf16>(rows * kv_lora).unwrap();
    let mut lse = dev.alloc::<f32>(rows).unwrap();
    let seqlens: Vec<i32> = layout.kv_lens.iter().map(|&l| l as i32).collect();
    // Workspaces of one part and of three (split keys: combine runs), each holding the host
    // mirror's schedule, so the fast path can run without mla_schedule.
    let mut workspaces = [1, 3].map(|parts| {
        let mut ws =
            MlaWorkspace::with_parts(dev, batch.batch, heads, batch.max_q_len, parts).unwrap();
        let schedule =
            mla_schedule_host(&seqlens, batch.bt_stride, parts, MLA_SCHED_FIXED_OVERHEAD);
        ws.upload_schedule(dev, &schedule).unwrap();
        ws
    });
    // (kernel, workspace, run mla_schedule first)
    let runs = [
        (MlaKernel::Reference, None, false),
        (MlaKernel::Wgmma, Some(0), false),
        (MlaKernel::Wgmma, Some(0), true),
        (MlaKernel::Wgmma, Some(1), false),
    ];
    for (kernel, workspace, schedule) in runs {
        let args = MlaAttnArgs {
            q: &q,
            heads,
            scale: cfg.softmax_scale(),
            cache: &cache,
            batch: &batch,
            out: &mut out,
            lse: &mut lse,
            workspace: workspace.map(|i| &mut workspaces[i]),
            schedule,
        };
        fl.light(mla.prepare_attention(args, kernel));
        fl.assert_finite(kernel.name(), &out);
        fl.assert_finite("lse", &lse);
    }
}

/// The MoE kernels on DeepSeek's router (256 experts, top-8) for 16 tokens: router logits and
/// routing on the device, whose ids feed moe_plan for both layouts; on each layout gather, the
/// grouped GEMMs that take it, SiLU + quant and the weighted sum back per token.
fn light_moe(fl: &mut FirstLight<'_>, rng: &mut Rng) {
    let dev = fl.dev;
    let ops = MoeOps::new(dev);
    let router = deepseek_router();
    let (experts, top_k) = (router.experts, router.top_k);
    let (tokens, hidden, inter) = (16, 256, 128);
    let x = rng.uniform(tokens * hidden, -1.0, 1.0);
    let x_dev = dev.upload(&to_bf16(&x)).unwrap();
    let router_w = dev
        .upload(&to_bf16(&rng.uniform(experts * hidden, -0.1, 0.1)))
        .unwrap();
    let mut logits = dev.alloc::<f32>(tokens * experts).unwrap();
    fl.light(ops.prepare_router_logits(RouterLogitsArgs {
        x: &x_dev,
        ldx: hidden,
        w: &router_w,
        logits: &mut logits,
        tokens,
        experts,
        hidden,
    }));
    let mut ids = dev.alloc::<i32>(tokens * top_k).unwrap();
    let mut weights = dev.alloc::<f32>(tokens * top_k).unwrap();
    let mut flags = ops.alloc_flags().unwrap();
    fl.light(ops.prepare_router(RouterArgs {
        cfg: router,
        tokens,
        logits: &logits,
        bias: None,
        topk_ids: &mut ids,
        topk_weights: &mut weights,
        flags: &mut flags,
    }));

    let xq = QuantizedActivations::upload(dev, &numerics::act_quant(&x, hidden)).unwrap();
    let (codes, scales) = fp8_weights(rng, experts, 2 * inter, hidden);
    let gate_up =
        GroupedFp8Weight::upload(dev, &codes, &scales, experts, 2 * inter, hidden).unwrap();
    let layouts = [
        (
            MoeLayout::Contiguous,
            [GroupedGemmKernel::ContigWgmma, GroupedGemmKernel::Reference],
        ),
        (
            MoeLayout::Masked {
                max_tokens_per_expert: tokens,
            },
            [
                GroupedGemmKernel::MaskedWgmma,
                GroupedGemmKernel::MaskedWgmmaM64,
            ],
        ),
    ];
    for (layout, kernels) in layouts {
        let geom = MoeGeometry {
            tokens,
            top_k,
            experts,
            layout,
        };
        let mut plan = MoePlanBuffers::alloc(dev, geom).unwrap();
        fl.light(ops.prepare_plan(PlanArgs {
            tokens,
            topk_ids: &ids,
            plan: &mut plan,
            flags: &mut flags,
        }));
        let mut rows = PermutedRows::alloc(dev, &geom, hidden).unwrap();
        fl.light(ops.prepare_gather(GatherArgs {
            tokens,
            x: &xq,
            plan: &plan,
            out: &mut rows,
        }));
        let mut gu = dev.alloc::<bf16>(geom.rows() * 2 * inter).unwrap();
        for kernel in kernels {
            let args = GroupedGemmArgs {
                tokens,
                a: &rows,
                w: &gate_up,
                topk_ids: &ids,
                plan: &plan,
                d: &mut gu,
                ldd: 2 * inter,
            };
            fl.light(ops.prepare_grouped_gemm(args, kernel));
        }
        let mut act = PermutedRows::alloc(dev, &geom, inter).unwrap();
        let m_pad = act.r_pad;
        fl.light(ops.prepare_silu_quant(SiluQuantArgs {
            rows: geom.rows(),
            items: tokens * top_k,
            rows_map: Some(&plan.dest_row),
            inter,
            gu: &gu,
            ldg: 2 * inter,
            up_offset: inter,
            q: &mut act.q,
            ldq: inter,
            scales: &mut act.scales,
            m_pad,
        }));
        let mut out = dev.alloc::<bf16>(tokens * 2 * inter).unwrap();
        fl.light(ops.prepare_unpermute(UnpermuteArgs {
            tokens,
            top_k,
            n: 2 * inter,
            y: &gu,
            ldy: 2 * inter,
            rows: geom.rows(),
            dest_row: &plan.dest_row,
            topk_ids: &ids,
            topk_weights: &weights,
            shared: None,
            out: &mut out,
            ldo: 2 * inter,
        }));
        fl.assert_finite(&format!("moe_unpermute ({layout:?})"), &out);
    }
    ops.read_flags(&flags).unwrap().into_result().unwrap();
}

/// The small ops on 4 rows of width 256; the MLA absorptions on 2 tokens x 2 heads of R1's
/// head dims.
fn light_small_ops(fl: &mut FirstLight<'_>, rng: &mut Rng) {
    let dev = fl.dev;
    let ops = SmallOps::new(dev);
    let (rows, width, vocab) = (4, 256, 64);
    let n = rows * width;
    let mut bf16_data = |len: usize| dev.upload(&to_bf16(&rng.uniform(len, -1.0, 1.0))).unwrap();
    let (a, b, table) = (bf16_data(n), bf16_data(n), bf16_data(vocab * width));
    let norm_w = bf16_data(width);
    let gemm_w = bf16_data(64 * width);
    let x_ragged = bf16_data(rows * 200);
    let (heads, nope, rope, v, kv_lora) = (2, 128, 64, 128, 512);
    let q_heads = bf16_data(2 * heads * (nope + rope));
    let o_lat = bf16_data(2 * heads * kv_lora);
    let y = bf16_data(n);
    let kv_b_proj = rng.uniform(heads * (nope + v) * kv_lora, -1.0, 1.0);
    let kv_b = dev
        .upload(&absorbed_kv_b(&kv_b_proj, heads, nope, v, kv_lora))
        .unwrap();

    let mut out = dev.alloc::<bf16>(n).unwrap();
    let ids = dev.upload(&[5i32, 0, 63, 17]).unwrap();
    fl.light(ops.prepare_embed(&table, vocab, &ids, &mut out, rows, width));
    fl.light(ops.prepare_rms_norm(&a, &norm_w, &mut out, rows, width, 1e-6));
    fl.light(ops.prepare_add(&a, &b, &mut out, n));
    fl.light(ops.prepare_silu_mul(&a, &b, &mut out, n));
    let wide = dev.upload(&vec![0.5f32; n]).unwrap();
    fl.light(ops.prepare_f32_to_bf16(&wide, &mut out, n));
    let row_map = dev.upload(&[3i32, 2, 1, 0]).unwrap();
    fl.light(ops.prepare_copy_rows(CopyRowsDesc {
        rows,
        cols: 128,
        src: Region::from(&a),
        lds: width,
        src_col: 128,
        src_rows: rows,
        dst: Region::from(&out),
        ldd: width,
        dst_col: 0,
        row_map: Some(Region::from(&row_map)),
    }));
    let positions = dev.upload(&[0i32, 1, 2, 0]).unwrap();
    fl.light(ops.prepare_zero_pos0(&mut out, &positions, rows, width));
    fl.assert_finite("small ops", &out);

    let gemm_out = dev.alloc::<f32>(rows * 64).unwrap();
    fl.light(ops.prepare_gemm_bf16(GemmBf16Desc {
        m: rows,
        n: 64,
        k: width,
        x: Region::from(&a),
        ldx: width,
        w: Region::from(&gemm_w),
        ldw: width,
        out: Region::from(&gemm_out),
        ldo: 64,
        out_f32: true,
    }));
    fl.assert_finite("small_gemm_bf16", &gemm_out);

    // act_quant for a K the vector kernel does not take (200: a ragged last group).
    let q = dev.alloc::<u8>(rows * 200).unwrap();
    let q_scales = dev.alloc::<f32>(2 * rows).unwrap();
    fl.light(ops.prepare_act_quant(ActQuantDesc {
        m: rows,
        k: 200,
        x: Region::from(&x_ragged),
        ldx: 200,
        q: Region::from(&q),
        ldq: 200,
        scales: Region::from(&q_scales),
        m_pad: rows,
    }));
    fl.assert_finite("small_act_quant scales", &q_scales);

    let absorb = |src: &DeviceBuffer<bf16>, dst| MlaAbsorbDesc {
        tokens: 2,
        heads,
        nope,
        rope,
        v,
        kv_lora,
        src: Region::from(src),
        kv_b: Region::from(&kv_b),
        dst,
    };
    let q_lat = dev.alloc::<bf16>(2 * heads * (kv_lora + rope)).unwrap();
    fl.light(ops.prepare_mla_absorb(absorb(&q_heads, Region::from(&q_lat)), true));
    let o = dev.alloc::<bf16>(2 * heads * v).unwrap();
    fl.light(ops.prepare_mla_absorb(absorb(&o_lat, Region::from(&o)), false));
    fl.assert_finite("small_mla_absorb_o", &o);

    // The decode path's fused kernels.
    let positions = dev.upload(&[7i32, 100_000]).unwrap();
    let inv_freq = dev.upload(&vec![0.01f32; rope / 2]).unwrap();
    fl.light(ops.prepare_mla_absorb_q_rope(MlaAbsorbQRopeDesc {
        absorb: absorb(&q_heads, Region::from(&q_lat)),
        positions: Region::from(&positions),
        inv_freq: Region::from(&inv_freq),
        attention_factor: 1.0,
    }));
    fl.assert_finite("small_mla_absorb_q_rope", &q_lat);
    let (sum, fused_q) = (dev.alloc::<bf16>(n).unwrap(), dev.alloc::<u8>(n).unwrap());
    let fused_scales = dev.alloc::<f32>(2 * rows).unwrap();
    let quant = QuantOut {
        q: Region::from(&fused_q),
        ldq: width,
        scales: Region::from(&fused_scales),
        m_pad: rows,
    };
    fl.light(ops.prepare_rms_norm_quant(NormQuantDesc {
        rows,
        width,
        eps: 1e-6,
        x: Region::from(&a),
        residual: Some((Region::from(&b), Region::from(&sum))),
        w: Region::from(&norm_w),
        out: Some(Region::from(&out)),
        quant: Some(quant),
    }));
    fl.assert_finite("small_rms_norm_quant scales", &fused_scales);
    fl.light(ops.prepare_silu_mul_quant(SiluMulQuantDesc {
        rows,
        width,
        gate: Region::from(&a),
        up: Region::from(&b),
        out: None,
        quant,
    }));
    fl.assert_finite("small_silu_mul_quant scales", &fused_scales);

    let acc = dev.alloc_zeros::<f32>(n).unwrap();
    let topk_ids = dev.upload(&[1i32, 0, 2, 1, 1, 3, 0, 2]).unwrap();
    let topk_weights = dev.upload(&[0.5f32; 8]).unwrap();
    fl.light(ops.prepare_moe_accum(MoeAccumDesc {
        tokens: rows,
        width,
        top_k: 2,
        expert: 1,
        y: Region::from(&y),
        acc: Region::from(&acc),
        topk_ids: Region::from(&topk_ids),
        topk_weights: Region::from(&topk_weights),
    }));
    fl.assert_finite("small_moe_accum", &acc);
}

/// sample_tokens: two rows of 1000 logits, drawn with top-k and top-p (every pass runs).
fn light_sampling(fl: &mut FirstLight<'_>, rng: &mut Rng) {
    let dev = fl.dev;
    let vocab = 1000;
    let logits = dev.upload(&rng.uniform(2 * vocab, -4.0, 4.0)).unwrap();
    let d = Draw {
        temperature: 0.8,
        top_k: 50,
        top_p: 0.9,
        seed: 1,
        counter: 2,
    };
    let rows = dev
        .upload(&[SampleRow::new(0, &d), SampleRow::new(1, &d)])
        .unwrap();
    let mut tokens = dev.alloc_zeros::<i32>(2).unwrap();
    fl.light(dev.prepare_sample(SampleArgs {
        logits: &logits,
        vocab,
        rows: &rows,
        n_rows: 2,
        tokens: &mut tokens,
    }));
    let got = dev.download(&tokens).unwrap();
    assert!(
        got.iter().all(|&t| (0..vocab as i32).contains(&t)),
        "first-light: sample_tokens drew {got:?}"
    );
}

/// The synthetic-weight fill (tests/gpu_synthetic.rs checks its stream bit for bit).
fn light_random_fill(fl: &mut FirstLight<'_>) {
    let dev = fl.dev;
    let mut out = dev.alloc::<bf16>(1000).unwrap();
    let fill = RandomFill {
        seed: 1,
        center: 0.0,
        spread: 1.0,
    };
    fl.light(dev.prepare_random_fill(RandomFillArgs {
        out: &mut out,
        range: 0..1000,
        fill,
    }));
    fl.assert_finite("random_fill out", &out);
}
