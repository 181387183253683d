"""`DefaultPoolConfigurator._compute_cell_size`: INT4 bytes per token.

SGLang divides the free KV memory by this figure; counting 4-bit data plus the
fp16 scale/min of every token-head lets the pool hold ~3.7x the BF16 tokens
(head_dim 128) at the same --mem-fraction-static."""

from __future__ import annotations

from sglang.srt.model_executor.pool_configurator import DefaultPoolConfigurator

from saw_sglang.config import served_format

from ._util import is_int4, wrap


def int4_cell_size(kvc, num_layers: int) -> int:
    from sglang.srt.runtime_context import get_parallel

    mc = kvc.model_config
    fmt = served_format(kvc.server_args, mc.head_dim)
    return fmt.bytes_per_token(mc.get_num_kv_heads(get_parallel().attn_tp_size), num_layers)


def _compute(orig):
    def _compute_cell_size(self, kvc, num_layers):
        if is_int4(kvc):
            return int4_cell_size(kvc, num_layers)
        return orig(self, kvc, num_layers)

    return _compute_cell_size


def apply() -> bool:
    return wrap(DefaultPoolConfigurator, "_compute_cell_size", _compute)
