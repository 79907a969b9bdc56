#!/usr/bin/env python3
"""Make small random-weight DeepSeek-V3/R1 checkpoints in the official layout, plus golden outputs.

The checkpoint directory looks like the official DeepSeek-V3 / R1-0528 one:

    config.json
    model-00001-of-00002.safetensors      (main-model tensors, first half)
    model-00002-of-00002.safetensors      (the rest; the MTP layer always lives in the last shard)
    model.safetensors.index.json          {"metadata": {"total_size": N}, "weight_map": {name: shard}}

Linear weights are float8_e4m3fn with a per-128x128-block `weight_scale_inv` (f32, a MULTIPLIER:
W = q * s); norms, embeddings, the router gate, eh_proj, lm_head and shared_head.head are bf16;
e_score_correction_bias is f32. The MTP layer is `model.layers.{num_hidden_layers}`.

Unless --no-reference is given, `reference.safetensors` is written beside it, computed by Hugging Face
transformers' DeepseekV3ForCausalLM in float32 (eager attention, eager experts) from the DEQUANTIZED
weights:

    tokens        I64 [T]            the prompt (tokens[0] = bos)
    logits        F32 [T, vocab]     model(tokens).logits[0]
    hidden_final  F32 [T, hidden]    final-normed hidden states (input of lm_head)
    mtp_logits    F32 [T-1, vocab]   MTP layer as vLLM/SGLang run it (row i predicts tokens[i+2])
    greedy        I64 [n]            greedy continuation, full recompute per step, stops after eos

Every output is also recomputed by an independent float64 implementation written from the design
brief (not from transformers) and the two must agree; routing decisions and argmax margins are
checked so that an f32 re-implementation cannot flip them. When a seed fails the margin checks the
next seed is tried (the seed actually used is stored in the metadata and printed).

Usage:
    python3 tools/make_test_checkpoint.py --all                       # regenerate committed fixtures
    python3 tools/make_test_checkpoint.py --preset r1-heads --out DIR [--seed N] [--no-reference]
    python3 tools/make_test_checkpoint.py --preset r1-heads --out DIR --no-reference \\
        --set hidden_size=2048 --set num_hidden_layers=4 --set n_routed_experts=64   # bench sizes

Dependencies: tools/requirements-fixtures.txt (torch, transformers, safetensors, numpy).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import zlib
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent

FP8_MAX = 448.0
BLOCK = 128

# A real DeepSeek-V3 / R1 config.json (minus auto_map, which points at remote-code files that
# these fixtures do not ship); presets override the dimensions.
BASE_CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "aux_loss_alpha": 0.001,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "ep_size": 1,
    "first_k_dense_replace": 3,
    "hidden_act": "silu",
    "hidden_size": 7168,
    "initializer_range": 0.02,
    "intermediate_size": 18432,
    "kv_lora_rank": 512,
    "max_position_embeddings": 163840,
    "model_type": "deepseek_v3",
    "moe_intermediate_size": 2048,
    "moe_layer_freq": 1,
    "n_group": 8,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "norm_topk_prob": True,
    "num_attention_heads": 128,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 61,
    "num_key_value_heads": 128,
    "num_nextn_predict_layers": 1,
    "pretraining_tp": 1,
    "q_lora_rank": 1536,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "quantization_config": {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
    },
    "rms_norm_eps": 1e-06,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "rope_theta": 10000,
    "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid",
    "seq_aux": True,
    "tie_word_embeddings": False,
    "topk_group": 4,
    "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16",
    "transformers_version": "4.46.3",
    "use_cache": True,
    "v_head_dim": 128,
    "vocab_size": 129280,
}

PRESETS = {
    # The real MLA head dims (kv_lora 512 + rope 64 = 576 rows: a partial 128-block).
    "r1-heads": {
        "config": {
            "vocab_size": 512,
            "hidden_size": 256,
            "intermediate_size": 384,
            "moe_intermediate_size": 128,
            "num_hidden_layers": 2,
            "first_k_dense_replace": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "q_lora_rank": 192,
            "kv_lora_rank": 512,
            "qk_nope_head_dim": 128,
            "qk_rope_head_dim": 64,
            "v_head_dim": 128,
            "n_routed_experts": 8,
            "n_shared_experts": 1,
            "num_experts_per_tok": 2,
            "n_group": 4,
            "topk_group": 2,
        },
        "prompt_len": 12,
        "max_new": 8,
        "seed": 1,
    },
    # Odd shapes: partial blocks in nearly every matrix.
    "small-odd": {
        "config": {
            "vocab_size": 300,
            "hidden_size": 128,
            "intermediate_size": 320,
            "moe_intermediate_size": 96,
            "num_hidden_layers": 3,
            "first_k_dense_replace": 1,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "q_lora_rank": 96,
            "kv_lora_rank": 64,
            "qk_nope_head_dim": 32,
            "qk_rope_head_dim": 16,
            "v_head_dim": 48,
            "n_routed_experts": 16,
            "n_shared_experts": 2,
            "num_experts_per_tok": 4,
            "n_group": 4,
            "topk_group": 2,
        },
        "prompt_len": 10,
        "max_new": 6,
        "seed": 1,
    },
}

# Fixtures regenerated by --all (committed; loaded by the Rust tests without Python).
ALL_FIXTURES = [("r1-heads", "tests/fixtures/r1-heads"), ("small-odd", "tests/fixtures/small-odd")]

# Weight statistics (std of the f32 values before quantization).
EMBED_STD = 1.0          # token embeddings
HEAD_GAIN = 2.0          # lm_head / shared_head.head std = HEAD_GAIN / sqrt(hidden): logits std ~2
NORM_STD = 0.1           # norm weights = 1 + NORM_STD * randn
BIAS_STD = 0.05          # e_score_correction_bias
# Other linear weights: std = 1 / sqrt(in_features), so RMS-normed inputs give unit-variance outputs.

# Margin checks (reject the seed and try the next one when violated).
LOGIT_MARGIN_REL = 1e-3  # top1 - top2 >= LOGIT_MARGIN_REL * max|logit| at every checked position
ROUTE_MARGIN = 1e-4      # gap at every group / expert top-k boundary of the router's choice scores
MAX_RESEED = 200


# --------------------------------------------------------------------------------------------
# tensor specs
# --------------------------------------------------------------------------------------------

def layer_specs(cfg: dict, L: int, moe: bool) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, kind) for one decoder block. kind: fp8 | norm | gate | bias."""
    H = cfg["hidden_size"]
    nh = cfg["num_attention_heads"]
    nope, rope, vd = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    qr, kvr = cfg["q_lora_rank"], cfg["kv_lora_rank"]
    p = f"model.layers.{L}."
    s = [
        (p + "input_layernorm.weight", (H,), "norm"),
        (p + "self_attn.q_a_proj.weight", (qr, H), "fp8"),
        (p + "self_attn.q_a_layernorm.weight", (qr,), "norm"),
        (p + "self_attn.q_b_proj.weight", (nh * (nope + rope), qr), "fp8"),
        (p + "self_attn.kv_a_proj_with_mqa.weight", (kvr + rope, H), "fp8"),
        (p + "self_attn.kv_a_layernorm.weight", (kvr,), "norm"),
        (p + "self_attn.kv_b_proj.weight", (nh * (nope + vd), kvr), "fp8"),
        (p + "self_attn.o_proj.weight", (H, nh * vd), "fp8"),
        (p + "post_attention_layernorm.weight", (H,), "norm"),
    ]
    if not moe:
        inter = cfg["intermediate_size"]
        s += [
            (p + "mlp.gate_proj.weight", (inter, H), "fp8"),
            (p + "mlp.up_proj.weight", (inter, H), "fp8"),
            (p + "mlp.down_proj.weight", (H, inter), "fp8"),
        ]
    else:
        E, mi = cfg["n_routed_experts"], cfg["moe_intermediate_size"]
        si = mi * cfg["n_shared_experts"]
        s += [
            (p + "mlp.gate.weight", (E, H), "gate"),
            (p + "mlp.gate.e_score_correction_bias", (E,), "bias"),
        ]
        for e in range(E):
            s += [
                (p + f"mlp.experts.{e}.gate_proj.weight", (mi, H), "fp8"),
                (p + f"mlp.experts.{e}.up_proj.weight", (mi, H), "fp8"),
                (p + f"mlp.experts.{e}.down_proj.weight", (H, mi), "fp8"),
            ]
        s += [
            (p + "mlp.shared_experts.gate_proj.weight", (si, H), "fp8"),
            (p + "mlp.shared_experts.up_proj.weight", (si, H), "fp8"),
            (p + "mlp.shared_experts.down_proj.weight", (H, si), "fp8"),
        ]
    return s


def is_moe_layer(cfg: dict, L: int) -> bool:
    return L >= cfg["first_k_dense_replace"] and L % cfg.get("moe_layer_freq", 1) == 0


def model_specs(cfg: dict) -> tuple[list, list]:
    """Main-model specs and MTP specs, in checkpoint order."""
    H, V, n = cfg["hidden_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    main = [("model.embed_tokens.weight", (V, H), "embed")]
    for L in range(n):
        main += layer_specs(cfg, L, is_moe_layer(cfg, L))
    main += [("model.norm.weight", (H,), "norm"), ("lm_head.weight", (V, H), "head")]
    mtp = []
    for k in range(cfg.get("num_nextn_predict_layers", 0)):
        L = n + k
        p = f"model.layers.{L}."
        mtp += [
            (p + "embed_tokens.weight", (V, H), "embed_shared"),  # identical to model.embed_tokens
            (p + "enorm.weight", (H,), "norm"),
            (p + "hnorm.weight", (H,), "norm"),
            (p + "eh_proj.weight", (H, 2 * H), "bf16_linear"),
        ]
        mtp += layer_specs(cfg, L, True)
        mtp += [
            (p + "shared_head.norm.weight", (H,), "norm"),
            (p + "shared_head.head.weight", (V, H), "head"),
        ]
    return main, mtp


def stored_bytes(shape, kind) -> list[int]:
    """Bytes of the stored tensors for one spec (weight, and scale for fp8)."""
    numel = math.prod(shape)
    if kind == "fp8":
        N, K = shape
        return [numel, 4 * math.ceil(N / BLOCK) * math.ceil(K / BLOCK)]
    if kind == "bias":
        return [4 * numel]
    return [2 * numel]


# --------------------------------------------------------------------------------------------
# weight generation and fp8 quantization
# --------------------------------------------------------------------------------------------

def tensor_rng(seed: int, name: str) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**62))
    return g


def make_value(seed: int, name: str, shape, kind: str, cfg: dict) -> torch.Tensor:
    """f32 values (before storage rounding)."""
    g = tensor_rng(seed, name)
    r = torch.randn(*shape, generator=g, dtype=torch.float32)
    if kind in ("embed", "embed_shared"):
        return r * EMBED_STD
    if kind == "head":
        return r * (HEAD_GAIN / math.sqrt(shape[1]))
    if kind == "norm":
        return 1.0 + NORM_STD * r
    if kind == "bias":
        return BIAS_STD * r
    if kind in ("fp8", "gate", "bf16_linear"):
        return r / math.sqrt(shape[1])
    raise ValueError(kind)


def quantize_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per 128x128 block: s = max(amax, 1e-12)/448, q = fp8_e4m3(w/s) (round to nearest even).

    Returns (q float8_e4m3fn [N, K], s f32 [ceil(N/128), ceil(K/128)]); W ~= q * s.
    """
    N, K = w.shape
    nb, kb = math.ceil(N / BLOCK), math.ceil(K / BLOCK)
    padded = torch.zeros(nb * BLOCK, kb * BLOCK, dtype=torch.float32)
    padded[:N, :K] = w
    blocks = padded.view(nb, BLOCK, kb, BLOCK)
    amax = blocks.abs().amax(dim=(1, 3))
    s = torch.clamp(amax, min=1e-12) / FP8_MAX
    s_full = s.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)[:N, :K]
    q = (w / s_full).to(torch.float8_e4m3fn)
    return q.contiguous(), s.contiguous()


def dequantize_fp8(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    N, K = q.shape
    s_full = s.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)[:N, :K]
    return q.to(torch.float32) * s_full


def build_tensor(seed: int, spec, cfg: dict, cache: dict) -> dict[str, torch.Tensor]:
    """Stored tensors for one spec: {name: tensor} (plus the scale for fp8)."""
    name, shape, kind = spec
    if kind == "embed_shared":
        key = "model.embed_tokens.weight"
        if key not in cache:
            cache[key] = make_value(seed, key, shape, "embed", cfg).to(torch.bfloat16)
        return {name: cache[key].clone()}
    v = make_value(seed, name, shape, kind, cfg)
    if kind == "fp8":
        q, s = quantize_fp8(v)
        return {name: q, name[: -len(".weight")] + ".weight_scale_inv": s}
    if kind == "bias":
        return {name: v.contiguous()}
    t = v.to(torch.bfloat16)
    if name == "model.embed_tokens.weight":
        cache[name] = t
    return {name: t}


def dequantized(stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """f32 view of the stored checkpoint: fp8 * scale, bf16 -> f32; scales dropped."""
    out = {}
    for name, t in stored.items():
        if name.endswith(".weight_scale_inv"):
            continue
        if t.dtype == torch.float8_e4m3fn:
            out[name] = dequantize_fp8(t, stored[name[: -len(".weight")] + ".weight_scale_inv"])
        else:
            out[name] = t.to(torch.float32)
    return out


# --------------------------------------------------------------------------------------------
# config handling
# --------------------------------------------------------------------------------------------

def parse_set(items: list[str]) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--set wants key=value, got {item!r}")
        k, v = item.split("=", 1)
        try:
            val = json.loads(v)
        except json.JSONDecodeError:
            val = v
        out[k.strip()] = val
    return out


def apply_overrides(cfg: dict, overrides: dict) -> dict:
    cfg = copy.deepcopy(cfg)
    for k, v in overrides.items():
        d = cfg
        parts = k.split(".")  # e.g. rope_scaling.factor=4
        for p in parts[:-1]:
            d = d.setdefault(p, {})
        d[parts[-1]] = v
    if "num_attention_heads" in overrides and "num_key_value_heads" not in overrides:
        cfg["num_key_value_heads"] = cfg["num_attention_heads"]
    return cfg


def check_config(cfg: dict) -> None:
    assert cfg["n_routed_experts"] % cfg["n_group"] == 0, "n_routed_experts % n_group != 0"
    assert cfg["topk_group"] <= cfg["n_group"]
    assert cfg["num_experts_per_tok"] <= cfg["topk_group"] * cfg["n_routed_experts"] // cfg["n_group"]
    assert cfg["n_routed_experts"] // cfg["n_group"] >= 2, "group score sums the top-2 of a group"
    assert cfg["num_key_value_heads"] == cfg["num_attention_heads"]
    assert cfg["qk_rope_head_dim"] % 2 == 0
    assert cfg.get("moe_layer_freq", 1) == 1


# --------------------------------------------------------------------------------------------
# writing the checkpoint
# --------------------------------------------------------------------------------------------

def assign_shards(main: list, mtp: list, n_shards: int) -> list[list]:
    """Split in checkpoint order into n_shards of roughly equal bytes; the MTP layer goes last."""
    sizes = [sum(stored_bytes(s[1], s[2])) for s in main + mtp]
    total = sum(sizes)
    shards: list[list] = [[] for _ in range(n_shards)]
    acc, idx = 0, 0
    for spec, sz in zip(main, sizes):
        while idx < n_shards - 1 and acc >= total * (idx + 1) / n_shards:
            idx += 1
        shards[idx].append(spec)
        acc += sz
    shards[-1].extend(mtp)
    return shards


def write_checkpoint(out: Path, cfg: dict, seed: int, n_shards: int, keep: bool):
    """Write config, shards and index. Returns the stored tensors when keep (else None)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    main, mtp = model_specs(cfg)
    shards = assign_shards(main, mtp, n_shards)
    weight_map, total, kept, cache = {}, 0, {}, {}
    for i, specs in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        tensors = {}
        for spec in specs:
            tensors.update(build_tensor(seed, spec, cfg, cache))
        for name, t in tensors.items():
            weight_map[name] = fname
            total += t.numel() * t.element_size()
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        os.chmod(out / fname, 0o644)
        print(f"  wrote {fname}: {len(tensors)} tensors", file=sys.stderr)
        if keep:
            kept.update(tensors)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return kept if keep else None


def canonicalize_metadata(path: Path) -> None:
    """Sort the __metadata__ keys in a safetensors header in place (safetensors writes them in hash
    order, so regenerated files would differ byte-wise for no reason)."""
    raw = bytearray(path.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8: 8 + n].decode())
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    body = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    body += b" " * (n - len(body))
    assert len(body) == n, "header grew"
    raw[8: 8 + n] = body
    path.write_bytes(bytes(raw))


def build_in_memory(cfg: dict, seed: int) -> dict[str, torch.Tensor]:
    main, mtp = model_specs(cfg)
    stored, cache = {}, {}
    for spec in main + mtp:
        stored.update(build_tensor(seed, spec, cfg, cache))
    return stored


# --------------------------------------------------------------------------------------------
# reference 1: Hugging Face transformers (what the golden tests compare against)
# --------------------------------------------------------------------------------------------

def hf_block_state_dict(W: dict, L: int, cfg: dict, fused: bool = True) -> dict[str, torch.Tensor]:
    """Decoder-block params of layer L in transformers' naming.

    transformers >= 5 fuses the routed experts into 3-D tensors (gate_up_proj [E, 2*I, H] = per expert
    cat(gate, up) along rows, down_proj [E, H, I]); 4.x keeps one module per expert (fused=False).
    """
    p = f"model.layers.{L}."
    mtp_only = ("embed_tokens.", "enorm.", "hnorm.", "eh_proj.", "shared_head.")
    sd = {}
    for name, t in W.items():
        if not name.startswith(p):
            continue
        rest = name[len(p):]
        if rest.startswith(mtp_only) or (fused and ".experts." in rest):
            continue
        sd[rest] = t
    if fused and (is_moe_layer(cfg, L) or L >= cfg["num_hidden_layers"]):
        E = cfg["n_routed_experts"]
        sd["mlp.experts.gate_up_proj"] = torch.stack([
            torch.cat([W[p + f"mlp.experts.{e}.gate_proj.weight"], W[p + f"mlp.experts.{e}.up_proj.weight"]], 0)
            for e in range(E)])
        sd["mlp.experts.down_proj"] = torch.stack([W[p + f"mlp.experts.{e}.down_proj.weight"] for e in range(E)])
    return sd


def hf_reference(cfg: dict, W: dict, tokens: torch.Tensor, max_new: int) -> dict:
    import transformers
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
    from transformers.masking_utils import create_causal_mask
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer, DeepseekV3RMSNorm

    hf_cfg = copy.deepcopy(cfg)
    hf_cfg.pop("quantization_config", None)
    config = DeepseekV3Config.from_dict(hf_cfg)
    try:
        model = DeepseekV3ForCausalLM._from_config(
            config, attn_implementation="eager", experts_implementation="eager", dtype=torch.float32)
        assert model.config._experts_implementation == "eager"
    except TypeError:  # transformers 4.x: no experts_implementation, per-expert modules
        model = DeepseekV3ForCausalLM._from_config(config, attn_implementation="eager", torch_dtype=torch.float32)
    model = model.to(torch.float32).eval()
    assert model.config._attn_implementation == "eager"
    fused = any(k.endswith("mlp.experts.gate_up_proj") for k in model.state_dict())

    n, H = cfg["num_hidden_layers"], cfg["hidden_size"]
    sd = {"model.embed_tokens.weight": W["model.embed_tokens.weight"],
          "model.norm.weight": W["model.norm.weight"],
          "lm_head.weight": W["lm_head.weight"]}
    for L in range(n):
        for k, v in hf_block_state_dict(W, L, cfg, fused).items():
            sd[f"model.layers.{L}.{k}"] = v
    # strict: every parameter and persistent buffer of the main model must come from the checkpoint
    missing, unexpected = model.load_state_dict(sd, strict=True)
    assert not missing and not unexpected
    n_params = sum(1 for _ in model.state_dict())
    assert n_params == len(sd), (n_params, len(sd))

    # MTP pieces
    L = n
    p = f"model.layers.{L}."
    blk = DeepseekV3DecoderLayer(model.config, layer_idx=L).to(torch.float32).eval()
    blk.load_state_dict(hf_block_state_dict(W, L, cfg, fused), strict=True)
    eps = cfg["rms_norm_eps"]
    norms = {}
    for nm in ("enorm", "hnorm", "shared_head.norm"):
        m = DeepseekV3RMSNorm(H, eps=eps)
        m.load_state_dict({"weight": W[p + nm + ".weight"]}, strict=True)
        norms[nm] = m.eval()
    eh = torch.nn.Linear(2 * H, H, bias=False)
    eh.load_state_dict({"weight": W[p + "eh_proj.weight"]}, strict=True)
    head = torch.nn.Linear(H, cfg["vocab_size"], bias=False)
    head.load_state_dict({"weight": W[p + "shared_head.head.weight"]}, strict=True)
    mtp_embed = W[p + "embed_tokens.weight"]

    with torch.no_grad():
        ids = tokens[None]
        out = model(input_ids=ids, output_hidden_states=True)
        logits = out.logits[0].float()
        base = model.model(input_ids=ids)
        hidden_final = base.last_hidden_state[0]
        # sanity: the last hidden_states entry is the final-normed state, and lm_head(it) == logits
        assert torch.equal(out.hidden_states[-1][0], hidden_final)
        assert torch.allclose(model.lm_head(hidden_final), logits, atol=0, rtol=0)

        # MTP, as vLLM/SGLang run it
        T = tokens.shape[0]
        e = mtp_embed[tokens[1:]].clone()
        e[0] = 0.0  # absolute position 0 is masked
        h = hidden_final[: T - 1]
        x = eh(torch.cat([norms["enorm"](e), norms["hnorm"](h)], dim=-1))[None]
        pos = torch.arange(T - 1)[None]
        mask = create_causal_mask(config=model.config, inputs_embeds=x, attention_mask=None,
                                  past_key_values=None, position_ids=pos)
        pe = model.model.rotary_emb(x, pos)
        y = blk(x, attention_mask=mask, position_ids=pos, position_embeddings=pe)
        if isinstance(y, tuple):
            y = y[0]
        mtp_logits = head(norms["shared_head.norm"](y[0]))

        # greedy, full recompute each step (no KV cache)
        seq = tokens.clone()
        greedy = []
        for _ in range(max_new):
            lg = model(input_ids=seq[None]).logits[0, -1]
            t = int(torch.argmax(lg))
            greedy.append(t)
            seq = torch.cat([seq, torch.tensor([t])])
            if t == cfg["eos_token_id"]:
                break

    return {
        "tokens": tokens.to(torch.int64),
        "logits": logits.contiguous(),
        "mtp_logits": mtp_logits.float().contiguous(),
        "greedy": torch.tensor(greedy, dtype=torch.int64),
        "hidden_final": hidden_final.float().contiguous(),
        "_versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }


# --------------------------------------------------------------------------------------------
# reference 2: independent float64 implementation from the design brief (cross-check + margins)
# --------------------------------------------------------------------------------------------

class Ref64:
    def __init__(self, cfg: dict, W: dict):
        self.cfg = cfg
        self.W = {k: v.to(torch.float64) for k, v in W.items()}
        self.route_margins: list[float] = []
        rs = cfg["rope_scaling"]
        dim, base = cfg["qk_rope_head_dim"], float(cfg["rope_theta"])
        factor, orig = float(rs["factor"]), rs["original_max_position_embeddings"]
        # YaRN exactly as DeepSeek's reference (f32 pow, truncated correction range)
        freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))

        def corr_dim(rot):
            return dim * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(base))

        low = max(math.floor(corr_dim(rs["beta_fast"])), 0)
        high = min(math.ceil(corr_dim(rs["beta_slow"])), dim - 1)
        if low == high:
            high += 0.001
        ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
        smooth = 1 - ramp
        self.inv_freq = (freqs / factor * (1 - smooth) + freqs * smooth).to(torch.float64)
        mscale = 0.1 * rs["mscale_all_dim"] * math.log(factor) + 1.0 if factor > 1 else 1.0
        self.scale = (cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]) ** -0.5 * mscale * mscale

    def rms(self, x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.cfg["rms_norm_eps"]))

    def rope(self, x, pos):  # x [..., T, rope] interleaved pairs (2j, 2j+1), angle pos * inv_freq[j]
        ang = pos[:, None].to(torch.float64) * self.inv_freq[None, :]
        c, s = torch.cos(ang), torch.sin(ang)
        x0, x1 = x[..., 0::2], x[..., 1::2]
        y = torch.empty_like(x)
        y[..., 0::2] = x0 * c - x1 * s
        y[..., 1::2] = x1 * c + x0 * s
        return y

    def attn(self, x, p, pos):
        cfg, W = self.cfg, self.W
        T = x.shape[0]
        nh, nope, rope, vd = (cfg["num_attention_heads"], cfg["qk_nope_head_dim"],
                              cfg["qk_rope_head_dim"], cfg["v_head_dim"])
        kvr = cfg["kv_lora_rank"]
        q = self.rms(x @ W[p + "self_attn.q_a_proj.weight"].T, W[p + "self_attn.q_a_layernorm.weight"])
        q = (q @ W[p + "self_attn.q_b_proj.weight"].T).view(T, nh, nope + rope).transpose(0, 1)
        q_nope, q_pe = q[..., :nope], self.rope(q[..., nope:], pos)
        kv = x @ W[p + "self_attn.kv_a_proj_with_mqa.weight"].T
        c_kv = self.rms(kv[:, :kvr], W[p + "self_attn.kv_a_layernorm.weight"])
        k_pe = self.rope(kv[:, kvr:], pos)  # [T, rope], shared by all heads
        kvb = (c_kv @ W[p + "self_attn.kv_b_proj.weight"].T).view(T, nh, nope + vd).transpose(0, 1)
        k_nope, v = kvb[..., :nope], kvb[..., nope:]
        sc = (q_nope @ k_nope.transpose(1, 2) + q_pe @ k_pe.T[None]) * self.scale
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        sc = sc.masked_fill(~causal, float("-inf"))
        o = torch.softmax(sc, dim=-1) @ v  # [nh, T, vd]
        return o.transpose(0, 1).reshape(T, nh * vd) @ W[p + "self_attn.o_proj.weight"].T

    def mlp(self, x, p):
        W = self.W
        g = x @ W[p + "gate_proj.weight"].T
        u = x @ W[p + "up_proj.weight"].T
        return (torch.nn.functional.silu(g) * u) @ W[p + "down_proj.weight"].T

    def moe(self, x, p):
        cfg, W = self.cfg, self.W
        E, k = cfg["n_routed_experts"], cfg["num_experts_per_tok"]
        ng, tg = cfg["n_group"], cfg["topk_group"]
        s = torch.sigmoid(x @ W[p + "mlp.gate.weight"].T)  # [T, E]
        choice = s + W[p + "mlp.gate.e_score_correction_bias"]
        out = torch.zeros_like(x)
        for t in range(x.shape[0]):
            gs = choice[t].view(ng, E // ng).topk(2, dim=-1).values.sum(-1)
            gsort = gs.sort(descending=True).values
            if tg < ng:
                self.route_margins.append(float(gsort[tg - 1] - gsort[tg]))
            keep = gs.topk(tg).indices
            mask = torch.zeros(ng, dtype=torch.bool)
            mask[keep] = True
            ch = choice[t].masked_fill(~mask.repeat_interleave(E // ng), float("-inf"))
            csort = ch.sort(descending=True).values
            if k < tg * (E // ng):
                self.route_margins.append(float(csort[k - 1] - csort[k]))
            idx = ch.topk(k).indices
            w = s[t, idx]
            if cfg["norm_topk_prob"]:
                w = w / w.sum()
            w = w * cfg["routed_scaling_factor"]
            for wi, e in zip(w, idx.tolist()):
                out[t] += wi * self.mlp(x[t: t + 1], p + f"mlp.experts.{e}.")[0]
        return out + self.mlp(x, p + "mlp.shared_experts.")

    def block(self, x, L, pos, moe):
        p = f"model.layers.{L}."
        x = x + self.attn(self.rms(x, self.W[p + "input_layernorm.weight"]), p, pos)
        h = self.rms(x, self.W[p + "post_attention_layernorm.weight"])
        return x + (self.moe(h, p) if moe else self.mlp(h, p + "mlp."))

    def forward(self, tokens):
        cfg, W = self.cfg, self.W
        pos = torch.arange(tokens.shape[0])
        x = W["model.embed_tokens.weight"][tokens]
        for L in range(cfg["num_hidden_layers"]):
            x = self.block(x, L, pos, is_moe_layer(cfg, L))
        h = self.rms(x, W["model.norm.weight"])
        return h @ W["lm_head.weight"].T, h

    def mtp(self, tokens, h):
        cfg, W = self.cfg, self.W
        L = cfg["num_hidden_layers"]
        p = f"model.layers.{L}."
        T = tokens.shape[0]
        e = W[p + "embed_tokens.weight"][tokens[1:]].clone()
        e[0] = 0.0
        x = torch.cat([self.rms(e, W[p + "enorm.weight"]), self.rms(h[: T - 1], W[p + "hnorm.weight"])], -1)
        x = x @ W[p + "eh_proj.weight"].T
        x = self.block(x, L, torch.arange(T - 1), True)
        return self.rms(x, W[p + "shared_head.norm.weight"]) @ W[p + "shared_head.head.weight"].T


def top2_margins(logits: torch.Tensor) -> torch.Tensor:
    t = logits.topk(2, dim=-1).values
    return t[..., 0] - t[..., 1]


def check_and_stats(cfg, W, ref, max_new) -> tuple[bool, dict, list[str]]:
    """Cross-check transformers against the float64 implementation; compute margins."""
    r64 = Ref64(cfg, W)
    tokens, greedy = ref["tokens"], ref["greedy"]
    with torch.no_grad():
        full = torch.cat([tokens, greedy[:-1]]) if len(greedy) > 0 else tokens
        lg64_full, h64_full = r64.forward(full)
        T = tokens.shape[0]
        lg64, h64 = lg64_full[:T], h64_full[:T]
        mtp64 = r64.mtp(tokens, h64)
    problems = []
    logits, mtp_logits = ref["logits"].double(), ref["mtp_logits"].double()
    d_logits = float((lg64 - logits).abs().max())
    d_mtp = float((mtp64 - mtp_logits).abs().max())
    d_hidden = float((h64 - ref["hidden_final"].double()).abs().max())
    scale = float(logits.abs().max())
    if d_logits > 1e-3 * scale or d_mtp > 1e-3 * float(mtp_logits.abs().max()):
        problems.append(f"f64 cross-check disagrees: logits {d_logits:.3g}, mtp {d_mtp:.3g}")
    # greedy tokens from the f64 model, at every generated position
    g64 = lg64_full[T - 1:].argmax(-1)[: len(greedy)]
    if not torch.equal(g64, greedy):
        problems.append(f"greedy differs from f64: {greedy.tolist()} vs {g64.tolist()}")
    lm = top2_margins(logits)
    mm = top2_margins(mtp_logits)
    gm = top2_margins(lg64_full[T - 1:][: len(greedy)])
    route_min = min(r64.route_margins) if r64.route_margins else float("inf")
    stats = {
        "max_abs_logit": scale,
        "logit_std": float(logits.std()),
        "min_margin_logits": float(lm.min()),
        "min_margin_mtp": float(mm.min()),
        "min_margin_greedy": float(gm.min()) if len(gm) else float("inf"),
        "min_route_margin": route_min,
        "n_route_decisions": len(r64.route_margins),
        "max_abs_mtp_logit": float(mtp_logits.abs().max()),
        "mtp_logit_std": float(mtp_logits.std()),
        "hf_vs_f64_max_abs_diff_logits": d_logits,
        "hf_vs_f64_max_abs_diff_mtp": d_mtp,
        "hf_vs_f64_max_abs_diff_hidden": d_hidden,
    }
    thr = LOGIT_MARGIN_REL * scale
    if stats["min_margin_logits"] < thr:
        problems.append(f"logit margin {stats['min_margin_logits']:.3g} < {thr:.3g}")
    if stats["min_margin_greedy"] < thr:
        problems.append(f"greedy margin {stats['min_margin_greedy']:.3g} < {thr:.3g}")
    mthr = LOGIT_MARGIN_REL * stats["max_abs_mtp_logit"]
    if stats["min_margin_mtp"] < mthr:
        problems.append(f"mtp margin {stats['min_margin_mtp']:.3g} < {mthr:.3g}")
    if route_min < ROUTE_MARGIN:
        problems.append(f"routing margin {route_min:.3g} < {ROUTE_MARGIN}")
    return not problems, stats, problems


# --------------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------------

def make_prompt(seed: int, cfg: dict, T: int) -> torch.Tensor:
    g = tensor_rng(seed, "prompt")
    toks = torch.randint(2, cfg["vocab_size"], (T,), generator=g, dtype=torch.int64)
    toks[0] = cfg["bos_token_id"]
    return toks


def generate(preset: str, out: Path, seed: int | None, overrides: dict, reference: bool,
             n_shards: int, prompt_len: int | None, max_new: int | None, reseed: bool) -> dict:
    pr = PRESETS[preset]
    cfg = apply_overrides(apply_overrides(BASE_CONFIG, pr["config"]), overrides)
    check_config(cfg)
    seed = pr["seed"] if seed is None else seed
    T = prompt_len or pr["prompt_len"]
    max_new = pr["max_new"] if max_new is None else max_new
    torch.manual_seed(seed)
    torch.set_num_threads(max(1, os.cpu_count() or 1))

    if not reference:
        print(f"[{preset}] writing {out} (seed {seed}, no reference)", file=sys.stderr)
        write_checkpoint(out, cfg, seed, n_shards, keep=False)
        return {"seed": seed}

    tried = []
    for attempt in range(MAX_RESEED if reseed else 1):
        s = seed + attempt
        stored = build_in_memory(cfg, s)
        W = dequantized(stored)
        tokens = make_prompt(s, cfg, T)
        ref = hf_reference(cfg, W, tokens, max_new)
        ok, stats, problems = check_and_stats(cfg, W, ref, max_new)
        if ok:
            break
        tried.append(s)
        print(f"[{preset}] seed {s} rejected: {'; '.join(problems)}", file=sys.stderr)
    else:
        raise SystemExit(f"[{preset}] no seed passed the checks (tried {tried})")

    print(f"[{preset}] writing {out} (seed {s})", file=sys.stderr)
    written = write_checkpoint(out, cfg, s, n_shards, keep=True)
    # the files hold exactly what the reference was computed from
    for k, v in stored.items():
        assert torch.equal(written[k].view(torch.uint8), v.view(torch.uint8)), k

    from safetensors.torch import save_file
    versions = ref.pop("_versions")
    meta = {
        "preset": preset,
        "seed": str(s),
        "torch": versions["torch"],
        "transformers": versions["transformers"],
        "generator": "tools/make_test_checkpoint.py",
        "reference": "transformers DeepseekV3ForCausalLM, float32, eager attention, eager experts, "
                     "dequantized weights",
        "mtp": "vLLM/SGLang convention: e_0 = 0, h = final-normed hidden, row i predicts tokens[i+2]",
        "overrides": json.dumps(overrides, sort_keys=True),
        "stats": json.dumps(stats),
    }
    save_file({k: v.contiguous() for k, v in ref.items()}, str(out / "reference.safetensors"), metadata=meta)
    canonicalize_metadata(out / "reference.safetensors")
    os.chmod(out / "reference.safetensors", 0o644)
    stats["seed"] = s
    stats["greedy"] = ref["greedy"].tolist()
    stats["tokens"] = ref["tokens"].tolist()
    return stats


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS))
    ap.add_argument("--out", type=Path)
    ap.add_argument("--all", action="store_true", help="regenerate every committed fixture under tests/fixtures")
    ap.add_argument("--seed", type=int, default=None, help="base seed (default: the preset's)")
    ap.add_argument("--no-reference", action="store_true", help="checkpoint only (no transformers run)")
    ap.add_argument("--no-reseed", action="store_true", help="fail instead of trying the next seed")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config.json field (JSON value; dotted keys reach into dicts)")
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=None)
    ap.add_argument("--max-new", type=int, default=None)
    a = ap.parse_args(argv)

    jobs = []
    if a.all:
        if a.preset or a.out or a.set or a.seed is not None:
            ap.error("--all takes no --preset/--out/--set/--seed")
        jobs = [(p, REPO / o, {}) for p, o in ALL_FIXTURES]
    else:
        if not a.preset or not a.out:
            ap.error("give --preset and --out, or --all")
        jobs = [(a.preset, a.out, parse_set(a.set))]

    for preset, out, ov in jobs:
        st = generate(preset, out, a.seed, ov, not a.no_reference, a.shards, a.prompt_len, a.max_new,
                      reseed=not a.no_reseed)
        print(json.dumps({"preset": preset, "out": str(out), **st}, indent=2))


if __name__ == "__main__":
    main()
