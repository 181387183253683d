"""`saw_sglang.Engine`: SGLang's offline Engine, with the INT4 patches applied.

It takes every `sglang.Engine` keyword plus `kv_cache_dtype="int4"` and the
`saw_*` options of saw_sglang.config.SawConfig, e.g.
    Engine(model_path=..., kv_cache_dtype="int4", saw_rotation="none")
Its spawned workers get the patches through the plugin entry point.
"""

from __future__ import annotations

from saw_sglang.patches import apply_all

apply_all()

from sglang.srt.entrypoints.engine import Engine  # noqa: E402
from sglang.srt.server_args import ServerArgs  # noqa: E402


def server_args(**kwargs) -> ServerArgs:
    """The resolved ServerArgs an Engine with these kwargs runs with (no model load)."""
    return ServerArgs(**kwargs)


__all__ = ["Engine", "server_args"]
