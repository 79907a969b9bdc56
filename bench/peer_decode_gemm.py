#!/usr/bin/env python3
"""Peer for bench/decode_gemm.rs: PyTorch on every GEMM of DeepSeek-R1's decode step, at the
same M (1, 8, 32, 64) and TP (1, 8), with the same shapes, bytes and timing.

Shapes come from R1's config.json (tests/fixtures/deepseek-r1-config.json; the staged fixtures
under $R1_FIXTURES on the GPU machine; or --config) exactly as decode_gemm.rs derives them:
  FP8 (N x K): q_a, kv_a, q_b, o_proj, dense gate/up, dense down, shared gate/up, shared down;
    TP 8 keeps N/8 of q_b and the gate/up pairs, K/8 of o_proj and the downs, q_a/kv_a whole.
  bf16: lm_head (f32 out; TP 8: N/8), eh_proj (bf16 out, whole), the MLA absorption batched
    over the heads (128; TP 8: 16): absorb_q [M x 128] . [512 x 128]^T per head, A read
    through q's head stride (heads * 192 per row), and absorb_o [M x 512] . [128 x 512]^T.
What runs ("kernel" in every line):
  FP8: peer_scaled_mm's blockwise path (torch.nn.functional.scaled_mm with BlockWise1x128 /
    BlockWise128x128 where torch has it, else torch._scaled_mm with blockwise scale shapes;
    cuBLASLt either way), M padded to a multiple of 4, checked against the float32
    dequantized product ("check_max_rel_err").
  lm_head: torch.mm(a, w.t(), out_dtype=torch.float32) where torch takes out_dtype (one
    cuBLAS call, bf16 in, f32 out: "torch_mm_out_dtype_f32"), else torch.matmul in bf16 then
    .float() ("torch_matmul_bf16_then_float", a second pass over D).
  eh_proj: torch.matmul in bf16.
  absorption: torch.bmm over head-major strided views of the backend's buffers (q or o_lat,
    and the absorbed kv_b: W_UK^T [512][128] then W_UV [128][512] per head); torch writes a
    new contiguous [heads][M][N] output (it has no strided-output bmm), the same bytes.
GB/s = (weights + scales + A (+ scales) + D bytes) / median time, and % of the device-to-device
copy bandwidth measured at start in this run (peer_timing.Timer.copy_gbps, the Rust bench's
method). Timing: peer_timing (CUDA events, L2 flushed before each timed call, median of
--iters after 3 warm-ups).

Run by tools/gpu-suite's full run on the GPU machine:
  python3 bench/peer_decode_gemm.py --json peer.jsonl [--iters 50] [--filter q_b_tp8]
`--list` prints the shapes without torch or a GPU.
"""

import argparse
import itertools
import json
import os
import sys

from peer_scaled_mm import QB, first_blockwise_path, fp8_activations, fp8_weight
from peer_timing import Timer

DECODE_M = [1, 8, 32, 64]
TP = [1, 8]
CONFIG = "deepseek-r1-config.json"


def config_path():
    fixtures = os.environ.get("R1_FIXTURES")
    here = os.path.dirname(os.path.abspath(__file__))
    for d in ([fixtures] if fixtures else []) + [os.path.join(here, "..", "tests", "fixtures")]:
        if os.path.isfile(os.path.join(d, CONFIG)):
            return os.path.join(d, CONFIG)
    return None


def shard(kind, n, k, tp):
    """decode_gemm.rs's Shard: whole, column-parallel (N / tp) or row-parallel (K / tp)."""
    return {"whole": (n, k), "n": (n // tp, k), "k": (n, k // tp)}[kind]


def fp8_gemms(c):
    h = c["hidden_size"]
    q_head = c["qk_nope_head_dim"] + c["qk_rope_head_dim"]
    shared = c["moe_intermediate_size"] * c["n_shared_experts"]
    return [
        ("q_a", c["q_lora_rank"], h, "whole"),
        ("kv_a", c["kv_lora_rank"] + c["qk_rope_head_dim"], h, "whole"),
        ("q_b", c["num_attention_heads"] * q_head, c["q_lora_rank"], "n"),
        ("o_proj", h, c["num_attention_heads"] * c["v_head_dim"], "k"),
        ("dense_gate/up", c["intermediate_size"], h, "n"),
        ("dense_down", h, c["intermediate_size"], "k"),
        ("shared_gate/up", shared, h, "n"),
        ("shared_down", h, shared, "k"),
    ]


def points(c):
    """Every (gemm, tp, m, n, k, batch, kind) of decode_gemm.rs, in its order."""
    out = []
    for name, n0, k0, kind in fp8_gemms(c):
        for tp in TP:
            n, k = shard(kind, n0, k0, tp)
            out += [(name, tp, m, n, k, 1, "fp8") for m in DECODE_M]
    h = c["hidden_size"]
    nope, v, kv_lora = c["qk_nope_head_dim"], c["v_head_dim"], c["kv_lora_rank"]
    for name, n0, k0, kind, batch in [
        ("lm_head", c["vocab_size"], h, "n", None),
        ("eh_proj", h, 2 * h, "whole", None),
        ("absorb_q", kv_lora, nope, "whole", "heads"),
        ("absorb_o", v, kv_lora, "whole", "heads"),
    ]:
        for tp in TP:
            n, k = shard(kind, n0, k0, tp)
            b = c["num_attention_heads"] // tp if batch else 1
            out += [(name, tp, m, n, k, b, name) for m in DECODE_M]
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="append JSON lines here")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--filter", default="", help="substring of the id ({gemm}_tp{TP}_m{M})")
    ap.add_argument("--config", help=f"R1's config.json (default: {CONFIG} under $R1_FIXTURES or tests/fixtures)")
    ap.add_argument("--list", action="store_true", help="print the shapes and exit (no torch needed)")
    args = ap.parse_args()

    path = args.config or config_path()
    if not path:
        print(f"peer_decode_gemm: {CONFIG} not found under $R1_FIXTURES or tests/fixtures; pass --config", file=sys.stderr)
        return 2
    with open(path) as f:
        cfg = json.load(f)
    todo = [p for p in points(cfg) if args.filter in f"{p[0]}_tp{p[1]}_m{p[2]}"]
    if args.list:
        for name, tp, m, n, k, batch, _ in todo:
            print(f"{name}_tp{tp}_m{m} n={n} k={k} batch={batch}")
        return 0

    try:
        import torch
    except ImportError as e:
        print(f"skipped: no torch ({e})")
        return 0
    if not torch.cuda.is_available():
        print("skipped: no CUDA device (torch.cuda.is_available() is False)")
        return 0

    dev = torch.device("cuda")
    bf16 = torch.bfloat16
    timer = Timer(torch)
    copy_gbps = timer.copy_gbps()
    out = open(args.json, "a") if args.json else None
    print(f"peer_decode_gemm: {timer.describe()} | device-to-device copy {copy_gbps:.0f} GB/s")
    if out:
        out.write(json.dumps({"bench": "peer_decode_gemm", "id": "copy_bandwidth", "kind": "copy",
                              "gpu": timer.props.name, "gbps": copy_gbps}) + "\n")

    nope, rope, v = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    kv_lora = cfg["kv_lora_rank"]

    def weight(kind, n, k, heads):
        """One (gemm, tp)'s weight, shared by its M values."""
        if kind == "fp8":
            return fp8_weight(torch, n, k, dev)
        if kind in ("absorb_q", "absorb_o"):
            # The absorbed layout, per head: W_UK^T [kv_lora][nope], then W_UV [v][kv_lora].
            return torch.randn(heads, (nope + v) * kv_lora, device=dev, dtype=bf16) * 0.05
        return torch.randn(n, k, device=dev, dtype=bf16) * 0.05

    def call(kind, w, m, n, k, heads):
        """(kernel, callable, note, check error, padded M, bytes moved) of one point."""
        if kind == "fp8":
            (w, sw), (a, sa, sa_cm) = w, fp8_activations(torch, m, k, dev)
            kernel, fn, failures, err = first_blockwise_path(torch, a, sa, sa_cm, w, sw, True)
            note = ("no blockwise FP8 path: " if fn is None else "earlier paths refused: ") + " | ".join(failures)
            kb, nb = k // QB, -(-n // QB)
            nbytes = n * k + 4 * nb * kb + m * k + 4 * m * kb + 2 * m * n
            return kernel, fn, note if failures else "", err, a.shape[0], nbytes
        if kind in ("absorb_q", "absorb_o"):
            if kind == "absorb_q":  # q [m][heads][nope + rope]: its nope part, per head
                q = torch.randn(m, heads * (nope + rope), device=dev, dtype=bf16)
                a = q.view(m, heads, nope + rope)[:, :, :nope].transpose(0, 1)
                b = w[:, : kv_lora * nope].view(heads, kv_lora, nope)
            else:  # o_lat [m][heads][kv_lora]
                o_lat = torch.randn(m, heads * kv_lora, device=dev, dtype=bf16)
                a = o_lat.view(m, heads, kv_lora).transpose(0, 1)
                b = w[:, kv_lora * nope:].view(heads, v, kv_lora)
            nbytes = heads * (2 * n * k + 2 * m * k + 2 * m * n)
            return "torch_bmm_bf16", lambda: torch.bmm(a, b.transpose(1, 2)), "", None, m, nbytes
        a = torch.randn(m, k, device=dev, dtype=bf16)
        if kind == "eh_proj":
            return "torch_matmul_bf16", lambda: torch.matmul(a, w.t()), "", None, m, 2 * (n * k + m * k + m * n)
        nbytes = 2 * n * k + 2 * m * k + 4 * m * n
        try:
            torch.mm(a, w.t(), out_dtype=torch.float32)
            return "torch_mm_out_dtype_f32", lambda: torch.mm(a, w.t(), out_dtype=torch.float32), "", None, m, nbytes
        except (TypeError, RuntimeError) as e:
            note = f"torch.mm(out_dtype=float32) refused: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
            return "torch_matmul_bf16_then_float", lambda: torch.matmul(a, w.t()).float(), note, None, m, nbytes

    status = 0
    for _, group in itertools.groupby(todo, key=lambda p: p[:2]):
        group = list(group)
        _, _, _, n, k, batch, kind = group[0]
        w = weight(kind, n, k, batch)
        for name, tp, m, n, k, batch, kind in group:
            sid = f"{name}_tp{tp}_m{m}"
            kernel, fn, note, err, m_pad, nbytes = call(kind, w, m, n, k, batch)
            if fn is None:
                print(f"peer_decode_gemm: {sid}: {note}")
                status = 1
                continue
            med, mn, mean, mx = timer.time(fn, args.iters)
            gbps = nbytes / (med * 1e-6) / 1e9
            line = (
                f"peer_decode_gemm gemm={name} tp={tp} m={m:<3} n={n:<6} k={k:<6} batch={batch:<3} {kernel:<30} "
                f"median {med:9.2f} us (min {mn:9.2f}) {gbps:8.1f} GB/s ({100 * gbps / copy_gbps:5.1f}% of copy)"
            )
            if err is not None:
                line += f" check {err:.1e}"
            print(line + (f"  [{note}]" if note else ""), flush=True)
            if err is not None and err > 2e-2:
                print(f"peer_decode_gemm: {sid}: {kernel} differs from the dequantized product by {err:.2e} of max|ref|")
                status = 1
            if out:
                out.write(json.dumps({
                    "bench": "peer_decode_gemm", "id": sid, "gemm": name, "tp": tp, "m": m, "n": n, "k": k,
                    "batch": batch, "m_padded": m_pad, "kernel": kernel, "note": note,
                    "gpu": timer.props.name, "torch": torch.__version__, "iters": args.iters,
                    "l2_flush_bytes": timer.flush.numel(),
                    "median_us": med, "min_us": mn, "mean_us": mean, "max_us": mx,
                    "bytes": nbytes, "gbps": gbps, "copy_gbps": copy_gbps, "pct_copy": 100 * gbps / copy_gbps,
                    "check_max_rel_err": err,
                }) + "\n")
                out.flush()
    return status


if __name__ == "__main__":
    sys.exit(main())
