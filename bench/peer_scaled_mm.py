#!/usr/bin/env python3
"""Peer for bench/fp8_gemm.rs: PyTorch's block-scaled FP8 GEMM on the same shapes.

Times torch's FP8 GEMM with DeepSeek's scaling recipe (activations 1x128 blocks, weights 128x128
blocks, f32 multipliers, bf16 output) for M in {1, 16, 64, 128, 4096} x DeepSeek-V3's six (N, K),
with the same method as the Rust bench: CUDA events around each call, L2 flushed (a write over
max(4 x L2, 64 MiB)) before each timed call, median of --iters calls after 3 warm-ups.
TFLOPS = 2MNK/t, GB/s = (A + B + scales + D bytes)/t, % of H100 SXM (1979 TFLOPS, 3350 GB/s).

Which torch path runs, per shape, is written into every JSON line ("kernel", "note"):
  1. torch.nn.functional.scaled_mm with ScalingType.BlockWise1x128 / BlockWise128x128
     (torch >= 2.10), else
  2. torch._scaled_mm with blockwise scale shapes (scale_a [M, K/128] outer-dim-major,
     scale_b [K/128, N/128]), else
  3. torch.matmul in bf16 (NOT the same computation: a fallback so the line still says what this
     GPU does with that shape; "kernel" is "torch_matmul_bf16" and "note" says why).
M is padded to a multiple of 4 for the blockwise paths (cuBLAS wants it); FLOPs and bytes are
counted for the unpadded M. For M <= 128 the blockwise result is checked against a float32
dequantized product ("check_max_rel_err").

Run by tools/gpu-suite on the GPU machine (never by cargo):
  python3 bench/peer_scaled_mm.py --json peer.jsonl [--iters 50] [--filter m128_]
"""

import argparse
import json
import math
import sys

from peer_timing import Timer

H100_SXM_FP8_TFLOPS = 1979.0
H100_SXM_HBM_GBPS = 3350.0
DEEPSEEK_NK = [(2112, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048)]
BENCH_M = [1, 16, 64, 128, 4096]
QB = 128


def blockwise_paths(torch, a, sa_cm, w, sw):
    """(name, callable) for the blockwise FP8 paths torch offers, most specific first: A fp8
    [M, K] with scales sa_cm [M, K/128] outer-dim-major, W fp8 [N, K] with scales sw
    [N/128, K/128]; bf16 out."""
    paths = []
    F = torch.nn.functional
    if hasattr(F, "scaled_mm") and hasattr(F, "ScalingType"):
        st = F.ScalingType
        paths.append((
            "torch_F_scaled_mm_blockwise",
            lambda: F.scaled_mm(a, w.t(), sa_cm, st.BlockWise1x128, sw.t(), st.BlockWise128x128,
                                output_dtype=torch.bfloat16),
        ))
    paths.append((
        "torch_scaled_mm_blockwise",
        lambda: torch._scaled_mm(a, w.t(), scale_a=sa_cm, scale_b=sw.t(), out_dtype=torch.bfloat16),
    ))
    return paths


def fp8_weight(torch, n, k, device):
    """Random FP8 codes [N, K] and 128x128 block scales [ceil(N/128), K/128]."""
    w = (torch.randn(n, k, device=device) * 64).clamp(-448, 448).to(torch.float8_e4m3fn)
    return w, torch.rand(math.ceil(n / QB), k // QB, device=device) * 9e-4 + 1e-4


def fp8_activations(torch, m, k, device):
    """Random FP8 codes with M padded to a multiple of 4 (cuBLAS wants it), their 1x128 scales
    [M_pad, K/128] and the same scales outer-dim-major (the SA layout, as blockwise_paths
    takes them)."""
    m_pad = (m + 3) // 4 * 4
    a = (torch.randn(m_pad, k, device=device) * 64).clamp(-448, 448).to(torch.float8_e4m3fn)
    sa = torch.rand(m_pad, k // QB, device=device) * 9e-3 + 1e-3
    return a, sa, sa.t().contiguous().t()


def first_blockwise_path(torch, a, sa, sa_cm, w, sw, check):
    """The first path of blockwise_paths that runs: (name, callable, failures of the paths
    before it, max |D - dequantized product| / max |product| when `check`, else None).
    name and callable are None when none runs."""
    failures = []
    for name, fn in blockwise_paths(torch, a, sa_cm, w, sw):
        try:
            d = fn()
            torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001 - report any refusal and try the next path
            failures.append(f"{name}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
            continue
        err = None
        if check:
            n, k = w.shape
            ref = (a.float() * sa.repeat_interleave(QB, 1)[:, :k]) @ (
                w.float() * sw.repeat_interleave(QB, 0)[:n].repeat_interleave(QB, 1)[:, :k]
            ).t()
            scale = ref.abs().max().clamp_min(1e-30)
            err = ((d.float() - ref).abs().max() / scale).item()
        return name, fn, failures, err
    return None, None, failures, None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="append JSON lines here")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--filter", default="", help="substring of the shape id (m{M}_n{N}_k{K})")
    args = ap.parse_args()

    try:
        import torch
    except ImportError as e:
        print(f"skipped: no torch ({e})")
        return 0
    if not torch.cuda.is_available():
        print("skipped: no CUDA device (torch.cuda.is_available() is False)")
        return 0

    dev = torch.device("cuda")
    timer = Timer(torch)
    props, flush = timer.props, timer.flush
    out = open(args.json, "a") if args.json else None
    print(f"peer_scaled_mm: {timer.describe()}")

    def timed(fn):
        return timer.time(fn, args.iters)

    status = 0
    for n, k in DEEPSEEK_NK:
        kb = k // QB
        nb = math.ceil(n / QB)
        w, sw = fp8_weight(torch, n, k, dev)
        for m in BENCH_M:
            sid = f"m{m}_n{n}_k{k}"
            if args.filter not in sid:
                continue
            a, sa, sa_cm = fp8_activations(torch, m, k, dev)
            m_pad = a.shape[0]
            note = ""
            kernel, fn, failures, err = first_blockwise_path(torch, a, sa, sa_cm, w, sw, m <= 128)
            if fn is None:
                a16, w16 = a[:m].to(torch.bfloat16), w.to(torch.bfloat16)
                kernel = "torch_matmul_bf16"
                note = "blockwise FP8 unsupported here, bf16 matmul timed instead (not the same op): " + " | ".join(failures)
                fn = lambda: torch.matmul(a16, w16.t())  # noqa: E731
            elif failures:
                note = "earlier paths refused: " + " | ".join(failures)
            med, mn, mean, mx = timed(fn)
            flops = 2.0 * m * n * k
            nbytes = m * k + n * k + 4 * (kb * m + nb * kb) + 2 * m * n
            t = med * 1e-6
            tflops, gbps = flops / t / 1e12, nbytes / t / 1e9
            line = (
                f"peer   m={m:<6} n={n:<6} k={k:<6} {kernel:<28} median {med:9.2f} us (min {mn:9.2f}) "
                f"{tflops:8.1f} TFLOPS ({100 * tflops / H100_SXM_FP8_TFLOPS:5.1f}% of {H100_SXM_FP8_TFLOPS}) "
                f"{gbps:8.1f} GB/s ({100 * gbps / H100_SXM_HBM_GBPS:5.1f}% of {H100_SXM_HBM_GBPS})"
            )
            if err is not None:
                line += f" check {err:.1e}"
            print(line + (f"  [{note}]" if note else ""), flush=True)
            if err is not None and err > 2e-2:
                print(f"peer: {sid}: {kernel} differs from the dequantized product by {err:.2e} of max|ref|")
                status = 1
            if out:
                out.write(json.dumps({
                    "bench": "peer_scaled_mm", "id": sid, "kernel": kernel, "note": note,
                    "gpu": props.name, "torch": torch.__version__, "m": m, "n": n, "k": k,
                    "m_padded": m_pad if kernel != "torch_matmul_bf16" else m,
                    "iters": args.iters, "l2_flush_bytes": flush.numel(),
                    "median_us": med, "min_us": mn, "mean_us": mean, "max_us": mx,
                    "flops": flops, "bytes": nbytes, "tflops": tflops, "gbps": gbps,
                    "pct_h100_sxm_fp8_tflops": 100 * tflops / H100_SXM_FP8_TFLOPS,
                    "pct_h100_sxm_hbm_gbps": 100 * gbps / H100_SXM_HBM_GBPS,
                    "check_max_rel_err": err,
                }) + "\n")
                out.flush()
    return status


if __name__ == "__main__":
    sys.exit(main())
