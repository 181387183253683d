"""INT4 prefix attention (Triton, interpreter on CPU) against the pure-torch reference
(tolerances: saw_sglang.kernels.testing)."""

import pytest
import torch

from saw_sglang.kernels import reference as ref
from saw_sglang.kernels.format import Int4KVFormat
from saw_sglang.kernels.prefix import LOG2E, from_flashinfer_lse, prefix_attention, to_flashinfer_lse
from saw_sglang.kernels.testing import LSE_ATOL, O_TOL, check_prefix, make_cache, make_queries

# (head_dim, group, Hadamard block, hq, hkv, rotation, rotate_v, page, cap)
CASES = [
    (64, 64, None, 4, 4, "none", False, 1, 0.0),        # GQA 1, naive INT4
    (64, 32, None, 8, 2, "hadamard", False, 16, 0.0),   # GQA 4, groups of 32, paged
    (128, 128, None, 8, 1, "hadamard", True, 1, 0.0),   # GQA 8, K+V rotated
    (128, 32, 32, 4, 1, "hadamard", True, 16, 0.0),     # groups of 32, 4 Hadamard blocks, K+V
    (64, 64, 16, 6, 2, "hadamard", False, 1, 2.0),      # GQA 3 (padded rows), soft-cap
    (128, 64, None, 2, 2, "hadamard", False, 16, 1.5),  # GQA 1, two groups, cap, paged
]


@pytest.mark.parametrize("d, g, blk, hq, hkv, rot, rot_v, page, cap", CASES)
def test_matches_reference(d, g, blk, hq, hkv, rot, rot_v, page, cap):
    gen = torch.Generator().manual_seed(1000 + d + g + hq + page)
    fmt = Int4KVFormat(head_dim=d, group_size=g, block_size=blk, rotation=rot, rotate_v=rot_v)
    # ragged: a request with one query, one with an empty prefix, lengths not tile multiples
    q_lens, prefix_lens = [5, 1, 3, 9], [37, 18, 0, 21]
    cache, _, _ = make_cache(fmt, hkv, prefix_lens, page, gen)
    q, qo = make_queries(q_lens, hq, d, gen)
    check_prefix(q, qo, cache, fmt, page, cap)


@pytest.mark.parametrize("rot_v, splits", [(False, 1), (True, 1), (True, 3)])
def test_host_rotation_matches_reference(rot_v, splits):
    """The head_dim-64 GPU path (q and o rotated by torch around an unrotated kernel),
    forced on the CPU: same reference, same tolerances; blocks of 16 and of 64."""
    for blk in (16, None):
        gen = torch.Generator().manual_seed(77 + splits + blk if blk else 78)
        fmt = Int4KVFormat(head_dim=64, group_size=32, block_size=blk, rotate_v=rot_v)
        cache, _, _ = make_cache(fmt, 3, [37, 18, 0, 21], 16, gen)
        q, qo = make_queries([5, 1, 3, 9], 9, 64, gen)
        check_prefix(q, qo, cache, fmt, 16, host_rotation=True, num_splits=splits)


def test_block_tiling_and_fp16_and_strided_q():
    """Several query blocks and KV tiles per request, a max_q_len from the host, fp16 q,
    and q as a strided view of a fused qkv tensor (as attention backends pass it)."""
    gen = torch.Generator().manual_seed(7)
    d, hq, hkv = 64, 4, 2
    fmt = Int4KVFormat(head_dim=d, rotate_v=True)
    q_lens, prefix_lens = [19, 2], [50, 33]
    cache, _, _ = make_cache(fmt, hkv, prefix_lens, 1, gen)
    qkv = torch.randn(sum(q_lens), hq + 2 * hkv, d, generator=gen).half()
    q = qkv[:, :hq]
    qo = torch.tensor([0, 19, 21], dtype=torch.int32)
    assert not q.is_contiguous()
    o, lse = check_prefix(q, qo, cache, fmt, 1, max_q_len=19, block_rows=16, block_n=16)
    o2, lse2 = prefix_attention(q.contiguous(), qo, *cache, fmt, d**-0.5, max_q_len=None,
                                block_rows=32, block_n=32)
    torch.testing.assert_close(o2.float(), o.float(), **O_TOL)
    torch.testing.assert_close(lse2, lse, atol=LSE_ATOL, rtol=0)


def test_empty_queries_and_empty_prefixes():
    gen = torch.Generator().manual_seed(3)
    d, hq, hkv = 64, 2, 1
    fmt = Int4KVFormat(head_dim=d)
    cache, _, _ = make_cache(fmt, hkv, [0, 0], 1, gen)
    sm = d**-0.5
    # no queries at all
    q, qo = make_queries([0, 0], hq, d, gen)
    o, lse = prefix_attention(q, qo, *cache, fmt, sm)
    assert o.shape == (0, hq, d) and lse.shape == (0, hq)
    # queries over empty prefixes: o = 0, lse = -inf, and a merge returns the other side
    q, qo = make_queries([3, 2], hq, d, gen)
    o, lse = prefix_attention(q, qo, *cache, fmt, sm)
    assert bool((o == 0).all()) and bool(torch.isneginf(lse).all())
    other = torch.randn(5, hq, d, generator=gen)
    other_lse = torch.randn(5, hq, generator=gen)
    mo, mlse = ref.attention_lse_merge(o, lse, other, other_lse)
    torch.testing.assert_close(mo, other)
    torch.testing.assert_close(mlse, other_lse)


@pytest.mark.parametrize("rot_v, page", [(False, 1), (True, 16)])
def test_merge_with_new_chunk_equals_full_attention(rot_v, page):
    """prefix (INT4, this kernel) merged with exact causal attention over the new chunk
    == attention over dequantised prefix + chunk in one pass."""
    gen = torch.Generator().manual_seed(11 + page)
    d, hq, hkv = 64, 8, 2
    fmt = Int4KVFormat(head_dim=d, group_size=32, rotate_v=rot_v)
    q_lens, prefix_lens = [6, 1, 4], [29, 40, 0]
    cache, dense_k, dense_v = make_cache(fmt, hkv, prefix_lens, page, gen)
    q, qo = make_queries(q_lens, hq, d, gen)
    sm = d**-0.5
    o_pre, lse_pre = prefix_attention(q, qo, *cache, fmt, sm, page_size=page)
    for b, n in enumerate(q_lens):
        a = int(qo[b])
        qb = q[a : a + n].float()
        k_new = torch.randn(n, hkv, d, generator=gen)
        v_new = torch.randn(n, hkv, d, generator=gen)
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        o_new, lse_new = ref._attend(qb, k_new, v_new, sm, 0.0, causal)
        o_m, lse_m = ref.attention_lse_merge(o_pre[a : a + n], lse_pre[a : a + n], o_new, lse_new)
        k_all = torch.cat([dense_k[b], k_new])
        v_all = torch.cat([dense_v[b], v_new])
        full_mask = torch.cat([torch.ones(n, prefix_lens[b], dtype=torch.bool), causal], 1)
        o_full, lse_full = ref._attend(qb, k_all, v_all, sm, 0.0, full_mask)
        torch.testing.assert_close(o_m, o_full, **O_TOL)
        torch.testing.assert_close(lse_m, lse_full, atol=LSE_ATOL, rtol=0)


def test_flashinfer_lse_convention():
    """FlashInfer keeps lse in base 2 and merges with exp2 (state m + log2 d). Our natural
    lse converted with to_flashinfer_lse must give the same merge under that rule."""
    gen = torch.Generator().manual_seed(5)
    o1, o2 = torch.randn(2, 4, 3, 8, generator=gen)
    l1, l2 = torch.randn(2, 4, 3, generator=gen) * 4
    l1[0, 0] = float("-inf")
    want_o, want_l = ref.attention_lse_merge(o1, l1, o2, l2)
    a, b = to_flashinfer_lse(l1), to_flashinfer_lse(l2)
    m = torch.maximum(a, b)
    wa, wb = torch.exp2(a - m), torch.exp2(b - m)
    got_o = (o1 * wa[..., None] + o2 * wb[..., None]) / (wa + wb)[..., None]
    got_l = m + torch.log2(wa + wb)
    torch.testing.assert_close(got_o, want_o)
    torch.testing.assert_close(from_flashinfer_lse(got_l), want_l)
    assert to_flashinfer_lse(torch.tensor(1.0)).item() == pytest.approx(LOG2E)


def test_bad_shapes_are_refused():
    fmt = Int4KVFormat(head_dim=64)
    kd, ks = fmt.alloc(4, 2)
    qo = torch.tensor([0, 1], dtype=torch.int32)
    z = torch.zeros(2, dtype=torch.int32)
    with pytest.raises(ValueError, match="head_dim"):
        prefix_attention(torch.zeros(1, 2, 128), qo, kd, ks, kd, ks, z, z, z[:1], fmt, 0.1)
    with pytest.raises(ValueError, match="multiple"):
        prefix_attention(torch.zeros(1, 3, 64), qo, kd, ks, kd, ks, z, z, z[:1], fmt, 0.1)
    small = Int4KVFormat(head_dim=64, group_size=16)
    with pytest.raises(ValueError, match="group size"):
        prefix_attention(torch.zeros(1, 2, 64), qo, kd, ks, kd, ks, z, z, z[:1], small, 0.1)


@pytest.mark.parametrize("splits, rot_v", [(3, False), (5, True)])
def test_split_kv_matches_reference(splits, rot_v):
    """Prefix slices merged by log-sum-exp; some slices are empty (short prefixes)."""
    gen = torch.Generator().manual_seed(20 + splits)
    d, hq, hkv = 64, 4, 2
    fmt = Int4KVFormat(head_dim=d, group_size=32, rotate_v=rot_v)
    q_lens, prefix_lens = [3, 1, 2], [70, 9, 0]
    cache, _, _ = make_cache(fmt, hkv, prefix_lens, 16, gen)
    q, qo = make_queries(q_lens, hq, d, gen)
    check_prefix(q, qo, cache, fmt, 16, num_splits=splits)
