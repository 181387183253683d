"""`configure_kv_cache_dtype`: map "int4" to the pool's storage dtype (uint8).

ModelRunner calls it through the module attribute and then keeps
`kv_cache_dtype_str = "int4"`, which the other patches key on."""

from __future__ import annotations

import torch

from sglang.srt.mem_cache import kv_cache_dtype as target

from ._util import is_int4, wrap

STORAGE_DTYPE = torch.uint8


def _configure(orig):
    def configure_kv_cache_dtype(*, server_args_kv_cache_dtype, **kwargs):
        if is_int4(server_args_kv_cache_dtype):
            return None, STORAGE_DTYPE
        return orig(server_args_kv_cache_dtype=server_args_kv_cache_dtype, **kwargs)

    return configure_kv_cache_dtype


def apply() -> bool:
    return wrap(target, "configure_kv_cache_dtype", _configure, kind="function")
