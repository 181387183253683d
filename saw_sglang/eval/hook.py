"""Where the simulated cache sits: a transformers attention function that receives
(query, key, value) after RoPE, i.e. exactly what an engine writes to its KV cache,
round-trips key and value through the active mode, then runs the stock SDPA path.

Every position's K/V is round-tripped, the current token's own included: this is
what a decode step sees (all keys come from the cache)."""

from __future__ import annotations

from contextlib import contextmanager

from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .modes import KVMode

ATTN_NAME = "saw_kv_sim"
_active: list[KVMode | None] = [None]


def saw_kv_attention(module, query, key, value, attention_mask, **kwargs):
    mode = _active[0]
    if mode is not None:  # bf16 on a bf16 model is the identity (no copy)
        layer = getattr(module, "layer_idx", None)
        query = mode.query(query, layer)
        key = mode.roundtrip(key, layer, is_key=True)
        value = mode.roundtrip(value, layer, is_key=False)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def register() -> str:
    """Register the attention function and its (SDPA) mask builder; returns the name
    to pass as `attn_implementation`."""
    AttentionInterface.register(ATTN_NAME, saw_kv_attention)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)
    return ATTN_NAME


@contextmanager
def kv_mode(mode: KVMode | None):
    """Run the model with `mode` as its KV cache (None: untouched)."""
    prev, _active[0] = _active[0], mode
    try:
        yield
    finally:
        _active[0] = prev
