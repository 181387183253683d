"""SGLang plugin entry point (group `sglang.srt.plugins`).

SGLang calls `load()` in every process it starts (server, scheduler, Engine), so
the patches reach spawned workers. The patches are inert unless the KV cache
dtype is `int4`.
"""

from saw_sglang.version_guard import check_sglang_version


def load() -> None:
    check_sglang_version()
    from saw_sglang.patches import apply_all

    apply_all()
