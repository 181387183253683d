"""Pad a Llama-style checkpoint's attention heads so that tensor parallelism can split them.

    python -m saw_sglang.tools.pad_heads SRC_DIR OUT_DIR --heads 12:4

SmolLM2-135M has 9 query / 3 KV heads, which two ranks cannot share. This writes a
copy with more heads that computes the same function:

  * GQA grouping is kept: with r = q/kv heads before and r' after (r' >= r), original
    query head i (KV head i // r, place i % r in its group) moves to j * r' + i % r, so
    under the new `head // r'` rule it still reads its original KV head j. The other
    slots of each group, and every slot of the new KV heads, are padding heads.
  * padding heads get finite q/k/v rows (copies of head 0 of the same layer) and zero
    o_proj input columns: their attention output is multiplied by zero, so logits are
    unchanged up to summation order.
  * config.json gets num_attention_heads, num_key_value_heads and an explicit head_dim
    (hidden_size / heads no longer gives it).

Works on every *.safetensors file in SRC_DIR (tensor names are unchanged, so a shard
index stays valid) and copies the other files. Needs torch and safetensors only.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys

import torch

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


def parse_heads(text: str) -> tuple[int, int]:
    q, _, kv = text.partition(":")
    try:
        hq, hkv = int(q), int(kv)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected Q:KV (e.g. 12:4), got {text!r}") from None
    if hq <= 0 or hkv <= 0 or hq % hkv:
        raise argparse.ArgumentTypeError(f"query heads {hq} must be a multiple of KV heads {hkv}")
    return hq, hkv


def head_maps(hq: int, hkv: int, new_hq: int, new_hkv: int) -> tuple[list[int], list[int]]:
    """For each new query / KV head, the original head it copies; -1 marks padding.

    Raises when the original grouping cannot be embedded in the new one."""
    if hq % hkv or new_hq % new_hkv:
        raise ValueError("query heads must be a multiple of KV heads")
    r, new_r = hq // hkv, new_hq // new_hkv
    if new_hkv < hkv or new_r < r:
        raise ValueError(
            f"cannot pad {hq}/{hkv} heads to {new_hq}/{new_hkv}: need at least as many KV "
            f"heads and at least {r} query heads per KV head")
    q_map = [-1] * new_hq
    for i in range(hq):
        q_map[(i // r) * new_r + i % r] = i
    kv_map = [j if j < hkv else -1 for j in range(new_hkv)]
    return q_map, kv_map


def _pick_rows(w: torch.Tensor, mapping: list[int], head_dim: int) -> torch.Tensor:
    """Rows (dim 0) regrouped per head; padding heads copy head 0."""
    heads = w.reshape(-1, head_dim, *w.shape[1:])
    idx = torch.tensor([max(m, 0) for m in mapping])
    return heads[idx].reshape(len(mapping) * head_dim, *w.shape[1:]).contiguous()


def _pick_cols(w: torch.Tensor, mapping: list[int], head_dim: int) -> torch.Tensor:
    """o_proj input columns regrouped per head; padding heads' columns are zero."""
    out = torch.zeros(w.shape[0], len(mapping) * head_dim, dtype=w.dtype)
    for new, old in enumerate(mapping):
        if old >= 0:
            out[:, new * head_dim:(new + 1) * head_dim] = w[:, old * head_dim:(old + 1) * head_dim]
    return out


def pad_state_dict(sd: dict, q_map: list[int], kv_map: list[int], head_dim: int) -> tuple[dict, int]:
    """Padded copy of a state dict; also returns how many attention tensors changed."""
    out, changed = {}, 0
    for name, w in sd.items():
        parts = name.split(".")
        proj = parts[-2] if len(parts) >= 2 else ""
        if proj in ATTN and "self_attn" in parts and parts[-1] in ("weight", "bias"):
            if proj == "q_proj":
                w = _pick_rows(w, q_map, head_dim)
            elif proj in ("k_proj", "v_proj"):
                w = _pick_rows(w, kv_map, head_dim)
            elif parts[-1] == "weight":  # o_proj bias is per hidden unit: unchanged
                w = _pick_cols(w, q_map, head_dim)
            changed += 1
        out[name] = w
    return out, changed


def padded_config(cfg: dict, new_hq: int, new_hkv: int) -> dict:
    cfg = dict(cfg)
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    cfg.update(num_attention_heads=new_hq, num_key_value_heads=new_hkv, head_dim=head_dim)
    return cfg


def pad_checkpoint(src: pathlib.Path, out: pathlib.Path, new_hq: int, new_hkv: int) -> dict:
    from safetensors.torch import load_file, save_file

    cfg = json.loads((src / "config.json").read_text())
    hq = cfg["num_attention_heads"]
    hkv = cfg.get("num_key_value_heads") or hq
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // hq
    q_map, kv_map = head_maps(hq, hkv, new_hq, new_hkv)
    shards = sorted(src.glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"no *.safetensors in {src}")
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name != "config.json":
            shutil.copy2(f, out / f.name)
    changed = 0
    for i, shard in enumerate(shards, 1):
        print(f"[{i}/{len(shards)}] {shard.name}", flush=True)
        sd, n = pad_state_dict(load_file(shard), q_map, kv_map, head_dim)
        save_file(sd, out / shard.name, metadata={"format": "pt"})
        changed += n
    if changed == 0:
        raise ValueError(f"no self_attn q/k/v/o_proj tensors found in {src}")
    (out / "config.json").write_text(json.dumps(padded_config(cfg, new_hq, new_hkv), indent=2) + "\n")
    if cfg["hidden_size"] % new_hq:  # SGLang reads head_dim; transformers 5 also checks this
        print(f"note: hidden_size {cfg['hidden_size']} is not a multiple of {new_hq} heads: "
              "transformers refuses to load this config (SGLang serves it)")
    return {"heads": f"{hq}/{hkv} -> {new_hq}/{new_hkv}", "head_dim": head_dim,
            "q_map": q_map, "kv_map": kv_map, "tensors_changed": changed}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m saw_sglang.tools.pad_heads", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", type=pathlib.Path, help="HF folder with config.json + safetensors")
    ap.add_argument("out", type=pathlib.Path)
    ap.add_argument("--heads", type=parse_heads, default=(12, 4), help="new Q:KV heads (12:4)")
    args = ap.parse_args(argv)
    info = pad_checkpoint(args.src, args.out, *args.heads)
    print(f"{args.out}: heads {info['heads']}, head_dim {info['head_dim']}, "
          f"{info['tensors_changed']} attention tensors padded")
    print(f"query heads <- original: {info['q_map']} (-1 = padding)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
