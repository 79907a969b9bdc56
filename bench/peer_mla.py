#!/usr/bin/env python3
"""Peer for bench/mla_decode.rs: absorbed MLA decode in PyTorch on the same configurations.

The computation is the one mla_decode_wgmma does: per sequence b and head h, queries
q = [q_nope . W_UK (512) | q_pe (64)] (bf16, 576 wide) attend over the sequence's latent cache
[c_kv (512) | k_pe (64)] (bf16, one latent "head" shared by every query head), softmax with
DeepSeek-V3's scale, and the output is the latent [.., 512] (values = the cache's first 512
columns). s_q = 2 is causal: query i sees the keys up to position s_k - s_q + i.

The peer runs torch.nn.functional.scaled_dot_product_attention with enable_gqa (the one cache
head broadcast to every query head) over a contiguous padded cache [b, max s_k, 576] (no paging:
an advantage to the peer) with a boolean mask for causality and the padding of variable lengths
(a cost to the peer). Which SDPA backend torch picks is printed. Shapes, lengths and the
GB/s / TFLOPS formulas are bench/mla_decode.rs's:
  GB/s   = 2 * (b s_q h 576 + sum(s_k) 576 + b s_q h 512) / t
  TFLOPS = 2 * h * s_q * sum(s_k) * (576 + 512) / t
Timing: CUDA events around each call, L2 flushed before each timed call, median of --iters
calls after 3 warm-ups. Every shape's output is checked against a float32 computation on a
few sequences ("check_max_abs_err").

Run by tools/gpu-suite on the GPU machine:
  python3 bench/peer_mla.py --json peer.jsonl [--iters 30] [--filter h128_]
Without a GPU, `--self-check` verifies the harness itself on the CPU (small shapes, SDPA path
against an explicit softmax(QK^T)V per sequence) and exits.
"""

import argparse
import json
import math
import random

from peer_timing import Timer

BATCH = 128
HEADS = [128, 64, 16]
SK = [4096, 8192]
SQ = [1, 2]
KV_LORA = 512
ROPE = 64
WIDTH = KV_LORA + ROPE
SCALE = 0.1348725  # 192^-0.5 * (0.1 ln 40 + 1)^2
H100_SXM_BF16_TFLOPS = 989.0
H100_SXM_HBM_GBPS = 3350.0


def lengths(rng, batch, mean, s_q, varlen):
    """FlashMLA's draw: max(N(mean, mean / 2), s_q) for variable lengths."""
    if not varlen:
        return [mean] * batch
    return [max(int(rng.gauss(mean, mean / 2)), s_q) for _ in range(batch)]


def build(torch, kv_lens, heads, s_q, device, dtype, gen):
    """Queries [b, h, s_q, 576], padded cache [b, 1, max_k, 576] and the attention mask."""
    b, max_k = len(kv_lens), max(kv_lens)
    q = torch.randn(b, heads, s_q, WIDTH, generator=gen, device="cpu").to(device, dtype)
    cache = torch.randn(b, 1, max_k, WIDTH, generator=gen, device="cpu").to(device, dtype)
    lens = torch.tensor(kv_lens, device=device)
    key_pos = torch.arange(max_k, device=device)
    # Query i of sequence j sits at position lens[j] - s_q + i and sees keys up to it.
    q_pos = lens[:, None] - s_q + torch.arange(s_q, device=device)[None, :]
    mask = key_pos[None, None, :] <= q_pos[:, :, None]  # [b, s_q, max_k]
    return q, cache, mask[:, None, :, :]  # broadcast over heads


def attend(torch, q, cache, mask):
    return torch.nn.functional.scaled_dot_product_attention(
        q, cache, cache[..., :KV_LORA], attn_mask=mask, scale=SCALE, enable_gqa=True
    )


def reference(torch, q, cache, kv_lens, s_q, seqs):
    """float32 softmax(q k^T * scale) v, sequence by sequence, unpadded."""
    outs = []
    for j in seqs:
        k = cache[j, 0, : kv_lens[j]].float()
        scores = q[j].float() @ k.T * SCALE  # [h, s_q, s_k]
        for i in range(s_q):
            scores[:, i, kv_lens[j] - s_q + i + 1 :] = -math.inf
        outs.append(torch.softmax(scores, dim=-1) @ k[:, :KV_LORA])
    return outs


def check(torch, out, q, cache, kv_lens, s_q, seqs):
    ref = reference(torch, q, cache, kv_lens, s_q, seqs)
    return max((out[j].float() - r).abs().max().item() for j, r in zip(seqs, ref))


def self_check(torch):
    """The harness against the explicit reference on small CPU shapes (float32)."""
    gen = torch.Generator().manual_seed(1)
    rng = random.Random(2)
    worst = 0.0
    for s_q in SQ:
        for varlen in (False, True):
            kv = lengths(rng, 4, 70, s_q, varlen)
            q, cache, mask = build(torch, kv, 8, s_q, "cpu", torch.float32, gen)
            out = attend(torch, q, cache, mask)
            err = check(torch, out, q, cache, kv, s_q, range(len(kv)))
            print(f"self-check s_q={s_q} varlen={varlen} lens={kv}: max|err| {err:.2e}")
            worst = max(worst, err)
    ok = worst < 1e-4
    print(f"self-check {'passed' if ok else 'FAILED'} (max|err| {worst:.2e}, bound 1e-4)")
    return 0 if ok else 1


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="append JSON lines here")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--filter", default="", help="substring of the shape id (b128_h{h}_sq{s_q}_sk{s_k}_{fixed|var})")
    ap.add_argument("--self-check", action="store_true", help="check the harness on the CPU and exit")
    args = ap.parse_args()

    try:
        import torch
    except ImportError as e:
        print(f"skipped: no torch ({e})")
        return 0
    if args.self_check:
        return self_check(torch)
    if not torch.cuda.is_available():
        print("skipped: no CUDA device (torch.cuda.is_available() is False)")
        return 0

    dev = torch.device("cuda")
    timer = Timer(torch)
    out_file = open(args.json, "a") if args.json else None
    print(f"peer_mla: {timer.describe()}; SDPA over a padded cache with enable_gqa")

    rng = random.Random(0x31A)
    gen = torch.Generator().manual_seed(0x31A)
    for s_k in SK:
        for varlen in (False, True):
            kv = lengths(rng, BATCH, s_k, 2, varlen)
            total_k = sum(kv)
            for heads in HEADS:
                for s_q in SQ:
                    sid = f"b{BATCH}_h{heads}_sq{s_q}_sk{s_k}_{'var' if varlen else 'fixed'}"
                    if args.filter not in sid:
                        continue
                    q, cache, mask = build(torch, kv, heads, s_q, dev, torch.bfloat16, gen)
                    try:
                        out = attend(torch, q, cache, mask)
                        median, lo, _, hi = timer.time(lambda: attend(torch, q, cache, mask), args.iters)
                    except RuntimeError as e:  # e.g. out of memory for the padded layout
                        print(f"{sid}: peer failed: {e}")
                        continue
                    err = check(torch, out, q, cache, kv, s_q, [0, BATCH // 2, BATCH - 1])
                    rows = BATCH * s_q * heads
                    bytes_ = 2.0 * (rows * WIDTH + total_k * WIDTH + rows * KV_LORA)
                    flops = 2.0 * heads * s_q * total_k * (WIDTH + KV_LORA)
                    t = median * 1e-6
                    line = {
                        "bench": "peer_mla", "id": sid, "kernel": "torch_sdpa_gqa_padded",
                        "b": BATCH, "h": heads, "s_q": s_q, "s_k": s_k, "varlen": int(varlen),
                        "total_k": total_k, "median_us": median, "min_us": lo, "max_us": hi,
                        "tflops": flops / t / 1e12, "gbps": bytes_ / t / 1e9,
                        "pct_bf16_peak": 100 * flops / t / 1e12 / H100_SXM_BF16_TFLOPS,
                        "pct_hbm": 100 * bytes_ / t / 1e9 / H100_SXM_HBM_GBPS,
                        "check_max_abs_err": err,
                    }
                    print(
                        f"peer_mla {sid}: {median:9.1f} us  {line['gbps']:7.0f} GB/s  "
                        f"{line['tflops']:6.1f} TFLOPS  (check max|err| {err:.3e})"
                    )
                    if out_file:
                        out_file.write(json.dumps(line) + "\n")
                        out_file.flush()
                    del q, cache, mask, out
                    torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
