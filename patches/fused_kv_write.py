"""`srt/models/utils.py: enable_fused_set_kv_buffer` off for INT4 pools.

Some models (qwen3_moe, gpt_oss, ...) let the RoPE kernel write BF16 K/V straight
into `get_key_buffer()` views; an INT4 pool must be written by its quant method."""

from __future__ import annotations

from sglang.srt.models import utils as target

from ._util import wrap
from .quant_method import is_int4_pool


def _enable(orig):
    def enable_fused_set_kv_buffer(forward_batch, *args, **kwargs):
        from sglang.srt.model_executor.forward_context import get_token_to_kv_pool

        if is_int4_pool(get_token_to_kv_pool()):
            return False
        return orig(forward_batch, *args, **kwargs)

    return enable_fused_set_kv_buffer


def apply() -> bool:
    return wrap(target, "enable_fused_set_kv_buffer", _enable, kind="function")
