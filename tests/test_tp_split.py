"""Tensor parallelism emulated on one CPU: each rank's INT4 pool holds its share of the
KV heads ([0, 2) and [2, 4) of a 4-KV-head layer under --tp 2) and its ranks' query heads
attend only those. Quantisation and the Hadamard rotation act per token and per head,
so the split must be exact: rank bytes equal the single-pool bytes of the same heads,
and the concatenated per-rank attention equals the single-pool attention."""

import types

import pytest
import torch

from saw_sglang.patches import apply_all

apply_all()

from sglang.srt.layers.radix_attention import RadixAttention  # noqa: E402
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool  # noqa: E402

from saw_sglang.kernels import reference as ref  # noqa: E402
from saw_sglang.kernels.format import Int4KVFormat  # noqa: E402
from saw_sglang.patches import kv_pool, pool_sizing  # noqa: E402
from saw_sglang.patches.quant_method import SawInt4KVCacheMethod  # noqa: E402

HQ, HKV, TP = 12, 4, 2  # SmolLM2 padded to 12/4 heads (saw_sglang.tools.pad_heads)
FMTS = [
    Int4KVFormat(head_dim=64),
    Int4KVFormat(head_dim=64, group_size=32, block_size=32, rotate_v=True),
    Int4KVFormat(head_dim=64, group_size=32, rotation="none"),
]
FMT_IDS = ["had-k", "had-kv-g32", "none-g32"]


def rank_heads(rank, total):
    n = total // TP
    return slice(rank * n, (rank + 1) * n)


def make_pool(fmt, heads, size):
    return MHATokenToKVPool(
        size=size, page_size=1, dtype=torch.uint8, head_num=heads, head_dim=fmt.head_dim,
        layer_num=1, device="cpu", enable_memory_saver=False, quant_method=SawInt4KVCacheMethod(fmt))


def filled_pools(fmt, tokens=40, seed=0):
    """One TP=1 pool (4 KV heads) and TP=2 rank pools (2 each), same K/V written through
    SGLang's set_kv_buffer (our quant method) at the same slots."""
    g = torch.Generator().manual_seed(seed)
    d = fmt.head_dim
    k = (torch.randn(tokens, HKV, d, generator=g) * 2 + torch.randn(1, HKV, d, generator=g)).bfloat16()
    k[..., 3] *= 15  # an outlier channel, as in real keys
    v = torch.randn(tokens, HKV, d, generator=g).bfloat16()
    loc = torch.randperm(tokens + 8, generator=g)[:tokens] + 1
    pools = []
    for heads, sl in [(HKV, slice(None))] + [(HKV // TP, rank_heads(r, HKV)) for r in range(TP)]:
        pool = make_pool(fmt, heads, tokens + 16)
        layer = RadixAttention(num_heads=HQ * heads // HKV, head_dim=d, scaling=d**-0.5,
                               num_kv_heads=heads, layer_id=0)
        pool.set_kv_buffer(layer, loc, k[:, sl], v[:, sl])  # a rank sees a strided head slice
        pools.append(pool.get_raw_kv_buffer(0))
    return pools[0], pools[1:], loc


def decode_inputs(loc, lens, hq, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    indptr = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
    perm = loc[torch.randperm(loc.numel(), generator=g)]
    indices = perm[: sum(lens)].to(torch.int32)
    q = (torch.randn(len(lens), hq, d, generator=g) * 1.5).to(dtype)
    return q, indptr, indices, torch.tensor(lens, dtype=torch.int32)


@pytest.mark.parametrize("fmt", FMTS, ids=FMT_IDS)
def test_rank_pools_hold_the_same_bytes(fmt):
    full, ranks, loc = filled_pools(fmt)
    for r, bufs in enumerate(ranks):
        sl = rank_heads(r, HKV)
        for whole, part in zip(full, bufs):  # k_data, v_data, k_scales, v_scales
            assert part.shape[1] == HKV // TP
            assert torch.equal(part[loc], whole[loc][:, sl])


def _split_decode(fn, full, ranks, q, indptr, indices, lens, fmt, **kw):
    kd, vd, ks, vs = full
    one = fn(q, kd, ks, vd, vs, indptr, indices, lens, fmt, fmt.head_dim**-0.5, **kw)
    parts = []
    for r, (rkd, rvd, rks, rvs) in enumerate(ranks):
        qr = q[:, rank_heads(r, HQ)]  # rank r's query heads: 3 per KV head, as with TP=1
        parts.append(fn(qr, rkd, rks, rvd, rvs, indptr, indices, lens, fmt, fmt.head_dim**-0.5, **kw))
    return one, torch.cat(parts, 1)


@pytest.mark.parametrize("fmt", FMTS, ids=FMT_IDS)
@pytest.mark.parametrize("lens,seed", [([7, 1, 23], 1), ([40], 2)])
def test_reference_decode_split_is_exact(fmt, lens, seed):
    full, ranks, loc = filled_pools(fmt, seed=seed)
    q, indptr, indices, kv_lens = decode_inputs(loc, lens, HQ, fmt.head_dim, torch.float32, seed)
    one, split = _split_decode(ref.decode_attention_ref, full, ranks, q, indptr, indices, kv_lens, fmt)
    assert one.abs().max() > 0.05
    assert torch.equal(split, one)


@pytest.mark.parametrize("fmt", FMTS[:2], ids=FMT_IDS[:2])
@pytest.mark.parametrize("num_splits", [1, 2])
def test_triton_decode_split_is_exact(fmt, num_splits):
    """The Triton decode kernel (interpreter on CPU): grid axis 0 is the KV head, so a
    rank runs a subset of the same programs; with the same split count the results are
    bitwise equal. (Under the default policy the split count depends on the per-rank
    head count, so TP=2 may differ from TP=1 by rounding only; see the next test.)"""
    from saw_sglang.kernels.decode import decode_attention

    full, ranks, loc = filled_pools(fmt, seed=3)
    q, indptr, indices, kv_lens = decode_inputs(loc, [9, 30], HQ, fmt.head_dim, torch.float16, 3)
    one, split = _split_decode(decode_attention, full, ranks, q, indptr, indices, kv_lens, fmt,
                               num_splits=num_splits)
    assert torch.equal(split, one)
    want = ref.decode_attention_ref(q.float(), full[0], full[2], full[1], full[3], indptr,
                                    indices, kv_lens, fmt, fmt.head_dim**-0.5)
    torch.testing.assert_close(split.float(), want, atol=2e-2, rtol=2e-2)


def test_triton_decode_default_splits_per_rank_match_reference():
    from saw_sglang.kernels.decode import decode_attention

    fmt = FMTS[0]
    full, ranks, loc = filled_pools(fmt, seed=4)
    q, indptr, indices, kv_lens = decode_inputs(loc, [33], HQ, fmt.head_dim, torch.float16, 4)
    _, split = _split_decode(decode_attention, full, ranks, q, indptr, indices, kv_lens, fmt, block_n=16)
    want = ref.decode_attention_ref(q.float(), full[0], full[2], full[1], full[3], indptr,
                                    indices, kv_lens, fmt, fmt.head_dim**-0.5)
    torch.testing.assert_close(split.float(), want, atol=2e-2, rtol=2e-2)


def test_triton_write_kernel_on_a_rank_slice():
    """The Triton writer on each rank's (strided) head slice writes the single-pool bytes."""
    from saw_sglang.kernels.quantize import quantize_and_store

    fmt = FMTS[0]
    g = torch.Generator().manual_seed(5)
    t, d = 6, fmt.head_dim
    k = torch.randn(t, HKV, d, generator=g).bfloat16()
    v = torch.randn(t, HKV, d, generator=g).bfloat16()
    loc = torch.tensor([3, 1, 7, 4, 9, 2])
    whole = [*fmt.alloc(12, HKV), *fmt.alloc(12, HKV)]
    quantize_and_store(k, v, loc, whole[0], whole[1], whole[2], whole[3], fmt)
    for r in range(TP):
        sl = rank_heads(r, HKV)
        part = [*fmt.alloc(12, HKV // TP), *fmt.alloc(12, HKV // TP)]
        quantize_and_store(k[:, sl], v[:, sl], loc, part[0], part[1], part[2], part[3], fmt)
        for w, p in zip(whole, part):
            assert torch.equal(p, w[:, sl])


def test_pool_sizing_counts_the_rank_heads(monkeypatch):
    """Bytes per token follow the rank's KV heads; the capacity ratio vs BF16 does not
    change with TP (both caches shrink by the same factor)."""
    import sglang.srt.runtime_context as rc

    fmt = Int4KVFormat(head_dim=64)
    mc = types.SimpleNamespace(head_dim=64, get_num_kv_heads=lambda tp: max(1, HKV // tp))
    kvc = types.SimpleNamespace(model_config=mc, server_args=types.SimpleNamespace(kv_cache_dtype="int4"))
    sizes = {}
    for tp in (1, 2):
        monkeypatch.setattr(rc, "get_parallel", lambda tp=tp: types.SimpleNamespace(attn_tp_size=tp))
        sizes[tp] = pool_sizing.int4_cell_size(kvc, 30)
    assert sizes[1] == fmt.bytes_per_token(HKV, 30) == 2 * sizes[2]
    r1, r2 = (kv_pool.capacity_report(fmt, h, 30, 1000) for h in (HKV, HKV // TP))
    assert r1["capacity_vs_bf16"] == r2["capacity_vs_bf16"] >= 3.5


def test_padded_config_splits_in_sglang(tmp_path):
    """SGLang's ModelConfig on the padded SmolLM2 config: 2 KV heads per rank at --tp 2
    (the original 3 KV heads cannot be split in two)."""
    from _saw_models import LLAMA, write
    from sglang.srt.configs.model_config import ModelConfig

    from saw_sglang.tools.pad_heads import padded_config

    mc = ModelConfig(write(tmp_path / "m", padded_config(LLAMA, HQ, HKV)))
    assert (mc.num_attention_heads, mc.head_dim) == (HQ, 64)
    assert [mc.get_num_kv_heads(tp) for tp in (1, 2)] == [HKV, HKV // TP]
    assert HQ % TP == 0 and LLAMA["num_attention_heads"] % TP and LLAMA["num_key_value_heads"] % TP
