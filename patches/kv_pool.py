"""`KVCacheConfigurator`: build SGLang's own MHATokenToKVPool with our INT4 quant
method, and report the format and token capacity once at startup."""

from __future__ import annotations

import logging

from sglang.srt.mem_cache.kv_cache_configurator import KVCacheConfigurator
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

from saw_sglang.config import SawConfig, served_format

from ._util import is_int4, wrap
from .quant_method import NAME, SawInt4KVCacheMethod

logger = logging.getLogger(__name__)

# The capacity report of the INT4 pool built in this process (for /get_server_info).
LAST_REPORT: dict | None = None


def capacity_report(fmt, head_num: int, layer_num: int, tokens: int, calibration=None) -> dict:
    """Bytes per token and token capacity vs a BF16 cache in the same memory."""
    bpt = fmt.bytes_per_token(head_num, layer_num)
    bf16_bpt = 2 * layer_num * head_num * fmt.head_dim * 2
    bf16_tokens = tokens * bpt // bf16_bpt
    return {
        "format": fmt.describe(),
        "scale_fit": fmt.scale_fit,
        "k_calibration": calibration,
        "rotation": fmt.rotation,
        "hadamard_block_size": fmt.block_size,
        "group_size": fmt.group_size,
        "rotate_v": fmt.rotate_v,
        "bytes_per_token": bpt,
        "bf16_bytes_per_token": bf16_bpt,
        "max_total_num_tokens": tokens,
        "bf16_tokens_same_memory": bf16_tokens,
        "capacity_vs_bf16": round(bf16_bpt / bpt, 3),
    }


def describe_report(r: dict) -> str:
    return (
        f"INT4 KV cache: {r['format']}"
        + (f", K calibration {r['k_calibration']}" if r.get("k_calibration") else "")
        + f"; {r['bytes_per_token']} B/token "
        f"(BF16 {r['bf16_bytes_per_token']} B/token); capacity "
        f"{r['max_total_num_tokens']} tokens vs {r['bf16_tokens_same_memory']} BF16 "
        f"tokens in the same memory ({r['capacity_vs_bf16']:.2f}x)"
    )


def _build_mha(orig):
    def _build_mha_kv_pool(self, *, max_total_num_tokens, mha_pool_class, quant_method=None):
        if not is_int4(self):
            return orig(
                self, max_total_num_tokens=max_total_num_tokens,
                mha_pool_class=mha_pool_class, quant_method=quant_method,
            )
        global LAST_REPORT
        cfg = SawConfig.from_object(self.server_args)
        fmt = served_format(cfg, self.model_config.head_dim)
        cal = rank_calibration(cfg.saw_calibration, self.model_config) if cfg.saw_calibration else None
        method = SawInt4KVCacheMethod(fmt, cal, getattr(getattr(self, "layer_info", None), "start_layer", 0))
        pool = orig(
            self, max_total_num_tokens=max_total_num_tokens,
            mha_pool_class=MHATokenToKVPool, quant_method=method,
        )
        LAST_REPORT = capacity_report(fmt, pool.head_num, pool.layer_num, max_total_num_tokens,
                                      cfg.saw_calibration)
        logger.info(describe_report(LAST_REPORT))
        return pool

    return _build_mha_kv_pool


def rank_heads(total: int, tp_size: int, tp_rank: int) -> tuple[int, int]:
    """(first KV head, count) held by attention-TP rank tp_rank: a contiguous share, or
    one replicated head when there are fewer KV heads than ranks (SGLang's layout)."""
    if total >= tp_size:
        local = total // tp_size
        return tp_rank * local, local
    return tp_rank // (tp_size // total), 1


def rank_calibration(path, model_config):
    """This rank's KV heads of the --saw-calibration file."""
    from sglang.srt.runtime_context import get_parallel

    from saw_sglang.kernels.calibration import KCalibration

    cal = KCalibration.load(path)
    text_config = getattr(model_config, "hf_text_config", None)
    cap = float(getattr(text_config, "attn_logit_softcapping", None) or 0.0)
    if cap > 0:
        logger.warning("--saw-calibration: the model has an attention logit soft-cap, under which "
                       "the K mean shift is not exact; its scale is kept, its mean is not")
        cal = cal.for_logit_cap(cap)
    par = get_parallel()
    start, count = rank_heads(model_config.get_total_num_kv_heads(), par.attn_tp_size, par.attn_tp_rank)
    return cal.heads(start, count)


def _build_any(orig):
    def _build_token_to_kv_pool(self, *args, **kwargs):
        pool = orig(self, *args, **kwargs)
        if is_int4(self) and getattr(pool.get_kv_cache_quant_method(), "name", None) != NAME:
            raise RuntimeError(
                f"--kv-cache-dtype int4: this model needs a {type(pool).__name__}, which "
                "has no INT4 support. Serve it with --kv-cache-dtype auto."
            )
        return pool

    return _build_token_to_kv_pool


def apply() -> bool:
    return any([
        wrap(KVCacheConfigurator, "_build_mha_kv_pool", _build_mha),
        wrap(KVCacheConfigurator, "_build_token_to_kv_pool", _build_any),
    ])
