"""New tokens over their cached INT4 prefix through the decode kernels (kernels/prefix_decode:
tiles of tokens packed into decode query heads), against the pure-torch reference with the
prefix tests' tolerances (saw_sglang.kernels.testing); the decode merge's log-sum-exp."""

import pytest
import torch

from saw_sglang.kernels import reference as ref
from saw_sglang.kernels.decode import decode_attention
from saw_sglang.kernels.format import Int4KVFormat
from saw_sglang.kernels.prefix_decode import prefix_attention, tokens_per_tile
from saw_sglang.kernels.testing import check_prefix, make_cache, make_case, make_queries

# (head_dim, group, hq, hkv, rotation, rotate_v, page, cap)
CASES = [
    (64, 64, 4, 4, "none", False, 1, 0.0),       # GQA 1: 16 tokens per tile
    (64, 64, 8, 2, "hadamard", False, 16, 0.0),  # GQA 4, paged
    (128, 128, 8, 1, "hadamard", True, 1, 0.0),  # GQA 8, K+V rotated
    (64, 64, 6, 2, "hadamard", False, 1, 2.0),   # GQA 3: 5 tokens (15 columns) per tile, soft-cap
    (64, 32, 32, 2, "hadamard", False, 16, 0.0),  # GQA 16: one token per tile, groups of 32
]


@pytest.mark.parametrize("d, g, hq, hkv, rot, rot_v, page, cap", CASES)
def test_matches_reference(d, g, hq, hkv, rot, rot_v, page, cap):
    gen = torch.Generator().manual_seed(3000 + d + g + hq + page)
    fmt = Int4KVFormat(head_dim=d, group_size=g, rotation=rot, rotate_v=rot_v)
    # ragged: one query, an empty prefix, no new tokens, lengths not tile multiples, a
    # request with more tokens than a tile
    q_lens, prefix_lens = [5, 1, 3, 0, 19], [37, 18, 0, 9, 21]
    cache, _, _ = make_cache(fmt, hkv, prefix_lens, page, gen)
    q, qo = make_queries(q_lens, hq, d, gen)
    check_prefix(q, qo, cache, fmt, page, cap, fn=prefix_attention, max_q_len=19)
    # no host hint: the tile count is bounded from N and the request count alone
    check_prefix(q, qo, cache, fmt, page, cap, fn=prefix_attention)


def test_strided_fp16_queries_and_empty_batch():
    gen = torch.Generator().manual_seed(11)
    fmt = Int4KVFormat(head_dim=64)
    cache, _, _ = make_cache(fmt, 2, [40, 7], 1, gen)
    qkv = torch.randn(9, 8 + 4, 64, generator=gen).half()
    q = qkv[:, :8]
    assert not q.is_contiguous()
    qo = torch.tensor([0, 6, 9], dtype=torch.int32)
    check_prefix(q, qo, cache, fmt, 1, fn=prefix_attention)
    o, lse = prefix_attention(q[:0], torch.zeros(3, dtype=torch.int32), *cache, fmt, 0.125)
    assert o.shape == (0, 8, 64) and lse.shape == (0, 8)


def test_tile_width():
    assert [tokens_per_tile(g) for g in (1, 3, 4, 8, 16, 32)] == [16, 5, 4, 2, 1, 1]


@pytest.mark.parametrize("splits", [1, 3])
def test_decode_returns_log2_sum_exp(splits):
    """decode_attention(lse_out=...) gives each head's log2-sum-exp of sm_scale * q.k (-inf
    for an empty request); one split then goes through the merge too."""
    case = make_case([30, 0, 65], 8, 2, 64, seed=21)
    sm = 0.125
    lse = torch.empty(3, 8)
    decode_attention(**case, sm_scale=sm, num_splits=splits, lse_out=lse)
    fmt = case["fmt"]
    for b, n in enumerate([30, 0, 65]):
        if n == 0:
            assert torch.isneginf(lse[b]).all()
            continue
        slots = ref.token_slots(case["kv_indptr"], case["kv_indices"], case["kv_lens"], b, 1)
        k = ref.dequantize_values(case["k_data"][slots], case["k_scales"][slots], fmt, fmt.k_rotated)
        s = torch.einsum("hd,thd->ht", case["q"][b].float(), k.repeat_interleave(4, dim=1)) * sm
        torch.testing.assert_close(lse[b], torch.logsumexp(s, -1) / 0.6931471805599453, atol=2e-3, rtol=0)
    with pytest.raises(ValueError, match="lse_out"):
        decode_attention(**case, sm_scale=sm, lse_out=torch.empty(3, 7))
