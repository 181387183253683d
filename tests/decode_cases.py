"""Shared builders for the decode-attention tests (CPU and GPU)."""

from __future__ import annotations

import torch

from saw_sglang.kernels import reference as ref
from saw_sglang.kernels.format import Int4KVFormat


def make_case(lens, hq, hkv, d, group=None, page=1, rotation="hadamard", rotate_v=False,
              pool_extra=37, repeat=False, dtype=torch.float16, device="cpu", seed=0):
    """A random INT4 pool filled through the reference writer, scattered slots (a random
    permutation of a larger pool), and the decode inputs for requests of `lens` tokens."""
    g = torch.Generator(device=device).manual_seed(seed)
    fmt = Int4KVFormat(head_dim=d, group_size=group, rotation=rotation, rotate_v=rotate_v)
    pages = [-(-n // page) for n in lens]
    rows = (sum(pages) + pool_extra) * page
    k_data, k_scales = fmt.alloc(rows, hkv, device)
    v_data, v_scales = fmt.alloc(rows, hkv, device)
    # every row gets data, so stray reads of unused rows would show up as errors
    k = (torch.randn(rows, hkv, d, generator=g, device=device) * 2
         + torch.randn(1, hkv, d, generator=g, device=device))
    v = torch.randn(rows, hkv, d, generator=g, device=device)
    ref.quantize_and_store_ref(k, v, torch.arange(rows, device=device),
                               k_data, k_scales, v_data, v_scales, fmt)
    n_pages = rows // page
    perm = torch.randperm(n_pages - 1, generator=g, device=device) + 1  # page/slot 0 is padding
    entries, indptr, used = [], [0], 0
    for n, p in zip(lens, pages):
        if repeat and p > 1:
            e = perm[used : used + (p + 1) // 2].repeat(2)[:p]
        else:
            e = perm[used : used + p]
        used += p
        entries.append(e)
        indptr.append(indptr[-1] + p)
    kv_indices = torch.cat(entries).to(torch.int32).to(device) if entries else torch.zeros(0, dtype=torch.int32, device=device)
    kv_indptr = torch.tensor(indptr, dtype=torch.int32, device=device)
    kv_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    q = (torch.randn(len(lens), hq, d, generator=g, device=device) * 1.5).to(dtype)
    return dict(q=q, k_data=k_data, k_scales=k_scales, v_data=v_data, v_scales=v_scales,
                kv_indptr=kv_indptr, kv_indices=kv_indices, kv_lens=kv_lens, fmt=fmt,
                page_size=page)


def errors(out, expect):
    """(max abs error, relative Frobenius error) of out vs the fp32 reference."""
    o, e = out.float(), expect.float()
    return (o - e).abs().max().item(), ((o - e).norm() / e.norm().clamp_min(1e-12)).item()
