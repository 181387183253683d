"""Random INT4 pools and queries, and checks against the pure-torch reference: what the
tests (CPU and GPU), the benchmarks' development tools and the GPU probes build their
cases from (as `torch.testing` serves torch's own tests).

Prefix-attention tolerances. The reference dequantises the same codes and computes in
fp32; the kernel differs only by (a) the pre-scaled query rounded to fp16 for the
tensor-core dots (relative 2^-11 per element), (b) p * scale_v (and, for groups smaller
than head_dim, the dequantised k/v elements) rounded to fp16 (relative 2^-11), (c) the
normalised output rounded to fp16 before the inverse rotation when V is rotated
(relative 2^-11), and (d) the final cast of o to bf16 (relative 2^-9 half-ulp). Scores
are O(1..10) here, so (a)+(b) move lse by a few 1e-4 and o by ~1e-3 of its scale:
  o:   atol 6e-3, rtol 1.6e-2   (bf16 output: 2 ulp plus the fp16 operand error)
  lse: atol 3e-3                (fp32 state; fp16 operands only)
"""

from __future__ import annotations

import torch

from . import reference as ref
from .format import Int4KVFormat
from .prefix import prefix_attention


# ---------------------------------------------------------------- decode
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


# ---------------------------------------------------------------- prefix
O_TOL = dict(atol=6e-3, rtol=1.6e-2)
LSE_ATOL = 3e-3


def make_cache(fmt, hkv, prefix_lens, page, gen, spare_pages=7, device="cpu"):
    """Pool with the prefixes at scattered slots (a random permutation of a larger pool).
    Built on the CPU (seeded), then moved to `device`; dense_k/v stay on the CPU."""
    npages = [-(-n // page) for n in prefix_lens]
    pool_pages = sum(npages) + spare_pages
    perm = torch.randperm(pool_pages, generator=gen)
    kd, ks = fmt.alloc(pool_pages * page, hkv)
    vd, vs = fmt.alloc(pool_pages * page, hkv)
    indices, off = [], 0
    for n in npages:
        indices.append(perm[off : off + n])
        off += n
    kv_indices = torch.cat(indices).to(torch.int32)
    kv_indptr = torch.zeros(len(prefix_lens) + 1, dtype=torch.int32)
    kv_indptr[1:] = torch.tensor(npages).cumsum(0)
    kv_lens = torch.tensor(prefix_lens, dtype=torch.int32)
    dense_k, dense_v = [], []
    for b in range(len(prefix_lens)):
        slots = ref.token_slots(kv_indptr, kv_indices, kv_lens, b, page)
        k = torch.randn(len(slots), hkv, fmt.head_dim, generator=gen)
        k[..., 3] *= 6.0  # an outlier channel, as real keys have
        v = torch.randn(len(slots), hkv, fmt.head_dim, generator=gen)
        ref.quantize_and_store_ref(k, v, slots, kd, ks, vd, vs, fmt)
        dense_k.append(ref.dequantize_ref(kd, ks, slots, fmt, fmt.k_rotated, torch.float32))
        dense_v.append(ref.dequantize_ref(vd, vs, slots, fmt, fmt.v_rotated, torch.float32))
    cache = tuple(t.to(device) for t in (kd, ks, vd, vs, kv_indptr, kv_indices, kv_lens))
    return cache, dense_k, dense_v


def make_queries(q_lens, hq, d, gen, dtype=torch.bfloat16, device="cpu"):
    qo = torch.zeros(len(q_lens) + 1, dtype=torch.int32)
    qo[1:] = torch.tensor(q_lens).cumsum(0)
    q = torch.randn(int(qo[-1]), hq, d, generator=gen).to(dtype)
    return q.to(device), qo.to(device)


def check_prefix(q, qo, cache, fmt, page, cap=0.0, fn=None, **kw):
    """prefix_attention (or `fn`, the same contract) on `cache` (make_cache) against the
    fp32 reference, within O_TOL and LSE_ATOL, empty prefixes exactly (o = 0, lse = -inf);
    returns the kernel's (o, lse)."""
    kd, ks, vd, vs, kv_indptr, kv_indices, kv_lens = cache
    sm = ref.default_sm_scale(fmt.head_dim)
    o, lse = (fn or prefix_attention)(q, qo, kd, ks, vd, vs, kv_indptr, kv_indices, kv_lens,
                              fmt, sm, page_size=page, logit_cap=cap, **kw)
    ro, rlse = ref.prefix_attention_ref(q.float(), qo, kd, ks, vd, vs, kv_indptr, kv_indices,
                                        kv_lens, fmt, sm, page_size=page, logit_cap=cap)
    assert o.dtype == q.dtype and o.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:2]
    torch.testing.assert_close(o.float(), ro, **O_TOL)
    empty = torch.isinf(rlse)
    assert torch.equal(torch.isinf(lse), empty) and bool((lse[empty] < 0).all())
    assert bool((o[empty] == 0).all())
    torch.testing.assert_close(lse[~empty], rlse[~empty], atol=LSE_ATOL, rtol=0)
    return o, lse
