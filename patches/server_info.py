"""`Scheduler.get_init_info`: add the INT4 capacity report under "saw_int4".

The scheduler's init info is merged into `/get_server_info` (and
`Engine.get_server_info()`), so clients can read the KV format, bytes per token and
token capacity vs BF16 there."""

from __future__ import annotations

from sglang.srt.managers.scheduler import Scheduler

from . import kv_pool
from ._util import wrap

KEY = "saw_int4"


def _init_info(orig):
    def get_init_info(self, *args, **kwargs):
        info = orig(self, *args, **kwargs)
        if kv_pool.LAST_REPORT is not None and isinstance(info, dict):
            info = {**info, KEY: dict(kv_pool.LAST_REPORT)}
        return info

    return get_init_info


def apply() -> bool:
    return wrap(Scheduler, "get_init_info", _init_info)
