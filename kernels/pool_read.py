"""Attention over INT4 pool rows read back as BF16: the through-pool extend.

A chunk whose prefix and own tokens are read back from the pool attends exactly the
values every later reader sees. The rows are dequantised *in the stored basis*: the
Hadamard rotation (and a K calibration) stay in the keys, and the query is brought to
that basis instead (q' = (q * scale) H_B, so q'.k' = q.k - q.mean: softmax ignores the
constant), unless the queries outweigh the keys (a prefill without a long prefix): then
K is un-rotated while it is unpacked and q stays as it is (`unrotate_k_pays`). With
rotated V the output comes back rotated (P V H = O H) and is rotated once.

`PoolReadWorkspace` holds the BF16 rows, allocated once at startup so that a step
never allocates them and an oversized batch is refused by size, not by an OOM.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import torch

from .format import Int4KVFormat, hadamard
from .quantize import dequantize, unrotates_on_tensor_cores


@functools.lru_cache(maxsize=None)
def _hadamard_on(block_size: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    return hadamard(block_size, dtype, device)


def rotate_blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """x . H_B over the last dim (block-diagonal normalised Hadamard, self-inverse), in
    x's dtype: one batched matmul with fp32 accumulation."""
    d = x.shape[-1]
    h = _hadamard_on(block_size, x.dtype, str(x.device))
    return (x.reshape(-1, d // block_size, block_size) @ h).reshape(x.shape)


def stored_basis_query(q: torch.Tensor, fmt: Int4KVFormat,
                       k_scale: Optional[torch.Tensor] = None, rotate: bool = True) -> torch.Tensor:
    """q [N, Hq, D] -> the query for keys read back in their stored basis: multiplied by
    the K calibration's scale [Hkv, D] if any, then rotated if K is (and `rotate`: not
    when the keys are un-rotated while they are read)."""
    if k_scale is not None:
        hq, hkv = q.shape[-2], k_scale.shape[0]
        q = (q.float() * k_scale.repeat_interleave(hq // hkv, dim=0)).to(q.dtype)
    return rotate_blocks(q, fmt.block_size) if fmt.k_rotated and rotate else q


# Rotating q moves 2 x its bytes (and is one more launch); un-rotating K while unpacking
# it (`_unrotate_kernel`: the codes rotated on tensor cores, for blocks inside groups)
# costs the unpack ~1.3-2.4x its time instead. Measured per layer on an H100 (32 query /
# 8 KV heads, dev/gpu/unrotate_ab.py; un-rotate K / (unpack + rotate q)): 32 x 256 new
# 0.30-0.46x, 8k new over 8k 0.45-0.63x, 2k over 16k 0.57 (D 64) / 1.13 (D 128) / 0.98
# (D 256), 32 new over 16k 1.5-2.1x. So K is un-rotated where the queries hold at least
# half the keys' elements.
UNROTATE_K = True


def unrotate_k_pays(fmt: Int4KVFormat, q_rows: int, num_q_heads: int, k_rows: int,
                    num_kv_heads: int) -> bool:
    """Whether to read K back in the original basis rather than rotate q."""
    return (UNROTATE_K and fmt.k_rotated and unrotates_on_tensor_cores(fmt)
            and 2 * q_rows * num_q_heads >= k_rows * num_kv_heads)


class PoolReadWorkspace:
    """BF16 (or FP16) K and V rows [max_rows, H, D] that extends dequantise into."""

    def __init__(self, max_rows: int, num_kv_heads: int, head_dim: int, dtype, device):
        self.max_rows = int(max_rows)
        self.k = torch.empty(self.max_rows, num_kv_heads, head_dim, dtype=dtype, device=device)
        self.v = torch.empty_like(self.k)

    @staticmethod
    def rows_for(budget_bytes: int, num_kv_heads: int, head_dim: int, dtype=torch.bfloat16) -> int:
        """How many rows (K and V) fit in `budget_bytes`."""
        per_row = 2 * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()
        return max(0, int(budget_bytes) // per_row)

    def fits(self, rows: int) -> bool:
        return 0 < rows <= self.max_rows


def attend_through_pool(q: torch.Tensor, k_data, k_scales, v_data, v_scales, slots: torch.Tensor,
                        fmt: Int4KVFormat, attend: Callable, workspace: PoolReadWorkspace,
                        k_scale: Optional[torch.Tensor] = None, dequantize=dequantize,
                        unrotate_k: Optional[bool] = None) -> torch.Tensor:
    """q [N, Hq, D] over the pool rows `slots` (in the order `attend` expects them):
    attend(q', k_rows, v_rows) -> o [N, Hq, D] is the caller's BF16 attention (causal,
    its own sm_scale and soft-cap); returns o in the original basis. k_scale: the
    layer's K calibration scale [Hkv, D] (its mean needs nothing here: every key
    attended carries it). unrotate_k: read K back un-rotated instead of rotating q;
    None decides by size (`unrotate_k_pays`)."""
    n = slots.numel()
    if n > workspace.max_rows:
        raise ValueError(f"{n} rows exceed the through-pool workspace ({workspace.max_rows})")
    if unrotate_k is None:
        unrotate_k = unrotate_k_pays(fmt, q.shape[0], q.shape[1], n, k_data.shape[1])
    k = dequantize(k_data, k_scales, slots, fmt, unrotate_k and fmt.k_rotated, out=workspace.k[:n])
    v = dequantize(v_data, v_scales, slots, fmt, False, out=workspace.v[:n])
    o = attend(stored_basis_query(q, fmt, k_scale, rotate=not unrotate_k), k, v)
    return rotate_blocks(o, fmt.block_size) if fmt.v_rotated else o
