"""Everything that touches SGLang internals: one module per target, version-guarded.

`apply_all()` applies every patch once per process (idempotent). Each patch is
inert unless the KV cache dtype is "int4". SGLang calls it in every process it
starts through the plugin entry point (saw_sglang.plugin:load).

Targets:
  quant_method       the INT4 KVCacheQuantMethod (buffers, write, fallback reads)
  server_args        --kv-cache-dtype int4, --saw-* flags, defaults, refusals
  kv_cache_dtype     configure_kv_cache_dtype("int4") -> uint8 storage
  pool_sizing        DefaultPoolConfigurator._compute_cell_size -> INT4 bytes/token
  kv_pool            KVCacheConfigurator builds MHATokenToKVPool(quant_method=ours)
  fused_kv_write     enable_fused_set_kv_buffer off for INT4 pools
  server_info        "saw_int4" capacity report in /get_server_info
  attention_flashinfer, attention_triton  INT4 attention backends (register())
"""

from __future__ import annotations

import importlib
import logging

logger = logging.getLogger(__name__)

PATCHES = (
    "quant_method",
    "server_args",
    "kv_cache_dtype",
    "pool_sizing",
    "kv_pool",
    "fused_kv_write",
    "server_info",
)
# Attention backends: optional modules exposing register().
BACKENDS = ("attention_flashinfer", "attention_triton")

_applied: list[str] | None = None


def _import_optional(name: str):
    full = f"{__name__}.{name}"
    try:
        return importlib.import_module(full)
    except ModuleNotFoundError as e:
        if e.name == full:  # the module itself is absent, not one of its imports
            return None
        raise


def apply_all() -> list[str]:
    """Apply every patch in this process (once); returns the names applied."""
    global _applied
    if _applied is not None:
        return list(_applied)
    from saw_sglang.version_guard import check_sglang_version

    check_sglang_version()
    done = []
    for name in PATCHES:
        importlib.import_module(f"{__name__}.{name}").apply()
        done.append(name)
    for name in BACKENDS:
        mod = _import_optional(name)
        if mod is not None and hasattr(mod, "register"):
            mod.register()
            done.append(name)
        else:
            logger.debug("saw-sglang: no %s module; INT4 backend not registered", name)
    _applied = done
    logger.debug("saw-sglang patches applied: %s", ", ".join(done))
    return list(done)


def applied() -> list[str]:
    return list(_applied or [])
