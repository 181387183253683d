"""A few new tokens per request over their cached INT4 prefix, through the decode kernels.

Every cached key precedes every new token, so the prefix part of an extend needs no
causal mask: it is decode attention with more query rows per KV head. The new tokens of
a request are cut into tiles of T = 16 // GQA tokens, and each tile becomes one decode
"request" whose query heads are the tile's (token, head) pairs of each KV head (T * GQA
<= 16 columns: the tensor-core kernel's widest). Each KV byte is then unpacked once per
tile instead of once per token, and the tiles of a request read the same rows (the
concurrent re-reads mostly hit L2). The decode merge also returns the log-sum-exp, so the
caller merges this with the chunk's own attention.

Worth it for short suffixes (the one-token recompute of a full radix hit, a short chat
turn, speculative verification): the work grows with tiles x prefix, where a BF16
prefill over a dequantised copy pays the copy once (kernels/pool_read.py).
"""

from __future__ import annotations

import math

import torch

from . import decode as dec
from .format import Int4KVFormat

LN2 = math.log(2.0)
MOST_COLUMNS = 16


def tokens_per_tile(gqa: int) -> int:
    return max(1, MOST_COLUMNS // gqa)


def prefix_attention(q, qo_indptr, k_data, k_scales, v_data, v_scales, kv_indptr,
                     kv_indices, kv_lens, fmt: Int4KVFormat, sm_scale: float, page_size: int = 1,
                     logit_cap: float = 0.0, max_q_len: int | None = None, max_kv_len: int | None = None):
    """q [N, Hq, D] (the new tokens, requests in qo_indptr order; original basis) over each
    request's cached prefix (kv_indptr / kv_indices / kv_lens as for decode_attention) ->
    (o [N, Hq, D] q.dtype, lse [N, Hq] fp32, natural log of the scaled scores' sum-exp;
    -inf and o = 0 where the prefix is empty); the same contract as kernels.prefix.

    max_q_len (the longest request's new tokens; None: N) and max_kv_len (the longest
    prefix, optional) come from the host: nothing is read back from the device."""
    n, hq, d = q.shape
    hkv = k_data.shape[1]
    if hq % hkv:
        raise ValueError(f"q heads {hq} not a multiple of kv heads {hkv}")
    gqa = hq // hkv
    t = tokens_per_tile(gqa)
    dev = q.device
    out = torch.zeros(n + 1, hq, d, dtype=q.dtype, device=dev)  # + a scratch row
    lse = torch.full((n + 1, hq), float("-inf"), dtype=torch.float32, device=dev)
    reqs = qo_indptr.shape[0] - 1
    if n == 0 or reqs == 0:
        return out[:n], lse[:n]
    # a bound on the tile count that the host knows: every request's tiles, at most
    most = min(reqs * -(-(max_q_len or n) // t), -(-n // t) + reqs)
    q_lens = (qo_indptr[1:] - qo_indptr[:-1]).long()
    tiles = (q_lens + t - 1) // t
    tile_end = torch.cumsum(tiles, 0)
    tid = torch.arange(most, device=dev)
    req = torch.searchsorted(tile_end, tid, right=True).clamp_(max=reqs - 1)
    live = tid < tile_end[-1]  # tiles past the last are idle (zero length)
    tok0 = qo_indptr[req].long() + (tid - (tile_end[req] - tiles[req])) * t
    tok = tok0[:, None] + torch.arange(t, device=dev)[None, :]  # [tiles, T]
    valid = (tok < qo_indptr[req + 1].long()[:, None]) & live[:, None]
    src = torch.where(valid, tok, tok0.clamp(0, n - 1)[:, None])  # spare columns repeat a real token
    qf = q[src.reshape(-1)].view(most, t, hkv, gqa, d).permute(0, 2, 1, 3, 4).reshape(most, hkv * t * gqa, d)
    lens = torch.where(live, kv_lens[req], 0).to(torch.int32)
    indptr = torch.cat([kv_indptr[req], kv_indptr[-1:]]).to(kv_indptr.dtype)
    of = torch.empty_like(qf)
    lf = torch.empty(most, hkv * t * gqa, dtype=torch.float32, device=dev)
    dec.decode_attention(qf, k_data, k_scales, v_data, v_scales, indptr, kv_indices, lens, fmt, sm_scale,
                         page_size, logit_cap, out=of, max_kv_len=max_kv_len, lse_out=lf)
    dest = torch.where(valid, tok, n).reshape(-1)  # spare columns land in the scratch row
    out.index_copy_(0, dest, of.view(most, hkv, t, gqa, d).permute(0, 2, 1, 3, 4).reshape(most * t, hq, d))
    lse.index_copy_(0, dest, lf.view(most, hkv, t, gqa).permute(0, 2, 1, 3).reshape(most * t, hq) * LN2)
    return out[:n], lse[:n]
