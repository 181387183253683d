"""`TritonAttnBackend.__init__`: take v_head_dim from the model, not the pool.

It reads `get_value_buffer(0).shape[-1]`, which for a packed INT4 pool is
head_dim / 2 bytes. The decode buffers sized from it (attn_logits) are allocated
later, so correcting the attribute after `__init__` is enough; this serves the
stock class and any subclass (the INT4 triton backend)."""

from __future__ import annotations

from sglang.srt.layers.attention.triton_backend import TritonAttnBackend

from ._util import wrap
from .fused_kv_write import is_int4_pool


def _init(orig):
    def __init__(self, model_runner, *args, **kwargs):
        orig(self, model_runner, *args, **kwargs)
        if is_int4_pool(model_runner.token_to_kv_pool) and self.swa_v_head_dim is None:
            self.v_head_dim = model_runner.model_config.v_head_dim

    return __init__


def apply() -> bool:
    return wrap(TritonAttnBackend, "__init__", _init)
