"""GPU tests of the INT4 attention backends with the real kernels (no server).

Each backend (flashinfer, triton) is built on a minimal model runner around an INT4
pool stand-in (the pool contract only), and compared with stock FlashInfer BF16
attention run on the dequantised cache, plus decode CUDA-graph capture/replay against
eager. Needs a CUDA GPU, SGLang 0.5.17, flashinfer and saw_sglang's kernels.

Tolerance: 2e-2 absolute/relative on bf16 outputs of O(1) (two bf16 roundings and a
different accumulation order; INT4 error is excluded by comparing on the dequantised
cache).
"""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from test_backends import (  # noqa: E402  (shared CPU-test helpers)
    FakeInt4Pool, _batch, _radix, _runner, paged_req_to_token, parallel, server_args,
)

from saw_sglang.kernels.format import Int4KVFormat  # noqa: E402
from saw_sglang.patches import int4_attention as ia  # noqa: E402

pytestmark = pytest.mark.gpu
DEV = "cuda"
TOL = dict(atol=2e-2, rtol=2e-2)
_ = (parallel, server_args)  # fixtures


def _backend(name, runner):
    if name == "flashinfer":
        from saw_sglang.patches.attention_flashinfer import backend_class
    else:
        from saw_sglang.patches.attention_triton import backend_class
    return backend_class()(runner)


def _setup(gen, fmt, hq, hkv, prefix_lens, new_lens, page_size):
    d = fmt.head_dim
    lens = [p + n for p, n in zip(prefix_lens, new_lens)]
    r2t, rows = paged_req_to_token(lens, page_size, max(lens) + 1, gen)
    r2t = r2t.to(DEV)
    pool = FakeInt4Pool(rows, hkv, fmt)
    pool.bufs = [tuple(t.to(DEV) for t in b) for b in pool.bufs]
    layer = _radix(hq, hkv, d)
    for b, p in enumerate(prefix_lens):
        s = r2t[b + 1, :p].long()
        pool.set_kv_buffer(layer, s, torch.randn(p, hkv, d, generator=gen).to(DEV),
                           torch.randn(p, hkv, d, generator=gen).to(DEV))
    n = sum(new_lens)
    q = torch.randn(n, hq * d, generator=gen).to(DEV, torch.bfloat16)
    k = torch.randn(n, hkv * d, generator=gen).to(DEV, torch.bfloat16)
    v = torch.randn(n, hkv * d, generator=gen).to(DEV, torch.bfloat16)
    out_loc = torch.cat([r2t[i + 1, p:p + m] for i, (p, m) in enumerate(zip(prefix_lens, new_lens))]).long()
    return r2t, pool, layer, q, k, v, out_loc


def _flashinfer_bf16_ragged(q, k, v, qo, kvo, hq, hkv, d, scale):
    import flashinfer

    w = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(
        torch.empty(128 << 20, dtype=torch.uint8, device=DEV), "NHD")
    w.begin_forward(qo.int(), kvo.int(), hq, hkv, d, q_data_type=torch.bfloat16)
    return w.forward(q.view(-1, hq, d), k.view(-1, hkv, d), v.view(-1, hkv, d), causal=True, sm_scale=scale)


@pytest.mark.parametrize("name,page_size", [("flashinfer", 1), ("flashinfer", 16), ("triton", 1)])
def test_decode_matches_flashinfer_bf16(server_args, parallel, name, page_size):
    gen = torch.Generator().manual_seed(1)
    hq, hkv, d = 32, 8, 128
    fmt = Int4KVFormat(d)
    hist = [700, 1, 64, 1500, 33, 257, 8, 1024]
    r2t, pool, layer, q, k, v, out_loc = _setup(gen, fmt, hq, hkv, hist, [1] * len(hist), page_size)
    bs = len(hist)
    seq = torch.tensor(hist, device=DEV) + 1
    fb = _batch("DECODE", batch_size=bs, req_pool_indices=torch.arange(1, bs + 1, device=DEV),
                seq_lens=seq, seq_lens_cpu=seq.cpu(), seq_lens_sum=int(seq.sum()), out_cache_loc=out_loc)
    runner = _runner(pool, r2t, hq, hkv, d, page_size, r2t.shape[1], server_args)
    runner.device, runner.dtype = DEV, torch.bfloat16
    b = _backend(name, runner)
    b.init_forward_metadata(fb)
    out = b.forward_decode(q, k, v, layer, fb)
    # stock FlashInfer BF16 over the dequantised cache (current token included)
    kv = ia.build_kv_index(r2t, fb.req_pool_indices, seq, 1)
    kk, vv = pool.dequant(0, kv.kv_indices.long())
    want = _flashinfer_bf16_ragged(q, kk.bfloat16(), vv.bfloat16(),
                                   torch.arange(bs + 1, device=DEV), kv.kv_indptr, hq, hkv, d, layer.scaling)
    torch.testing.assert_close(out.view_as(want).float(), want.float(), **TOL)

    # CUDA graph: capture at this batch, replay after the lengths grow by one token
    b.init_cuda_graph_state(bs, bs)
    b.init_forward_metadata_out_graph(fb, in_capture=True)
    static_q = q.clone()
    b.forward_decode(static_q, k, v, layer, fb, save_kv_cache=False)  # warm-up / JIT
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static_out = b.forward_decode(static_q, k, v, layer, fb, save_kv_cache=False)
    seq2 = seq - 1  # replay over a shorter history (drops the current token)
    fb2 = _batch("DECODE", batch_size=bs, req_pool_indices=fb.req_pool_indices, seq_lens=seq2,
                 seq_lens_cpu=seq2.cpu(), seq_lens_sum=int(seq2.sum()), out_cache_loc=out_loc)
    b.init_forward_metadata_out_graph(fb2)
    static_q.copy_(torch.randn(q.shape, generator=gen).to(DEV, q.dtype))
    g.replay()
    b.init_forward_metadata(fb2)
    eager = b.forward_decode(static_q, k, v, layer, fb2, save_kv_cache=False)
    torch.testing.assert_close(static_out.float(), eager.float(), atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("through_pool", [True, False])
@pytest.mark.parametrize("name,page_size", [("flashinfer", 1), ("flashinfer", 16), ("triton", 1)])
def test_extend_matches_flashinfer_bf16(server_args, parallel, name, page_size, through_pool, monkeypatch):
    """Small batches attend prefix and chunk through the pool (the chunk read back after
    its write); with the bound at 0 the chunk attends its fresh k/v beside the INT4 prefix."""
    from saw_sglang.patches import int4_attention as ia
    monkeypatch.setattr(ia, "DEQUANT_MAX_TOKENS", 1 << 16 if through_pool else 0)
    gen = torch.Generator().manual_seed(2)
    hq, hkv, d = 32, 8, 128
    fmt = Int4KVFormat(d)
    prefix_lens, new_lens = [0, 300, 17, 1000], [64, 129, 7, 300]
    r2t, pool, layer, q, k, v, out_loc = _setup(gen, fmt, hq, hkv, prefix_lens, new_lens, page_size)
    bs = len(new_lens)
    seq = torch.tensor([p + n for p, n in zip(prefix_lens, new_lens)], device=DEV)
    fb = _batch("EXTEND", batch_size=bs, req_pool_indices=torch.arange(1, bs + 1, device=DEV),
                seq_lens=seq, seq_lens_cpu=seq.cpu(), seq_lens_sum=int(seq.sum()),
                extend_prefix_lens=torch.tensor(prefix_lens, device=DEV),
                extend_prefix_lens_cpu=list(prefix_lens),
                extend_seq_lens=torch.tensor(new_lens, device=DEV), extend_seq_lens_cpu=list(new_lens),
                extend_num_tokens=sum(new_lens), out_cache_loc=out_loc)
    runner = _runner(pool, r2t, hq, hkv, d, page_size, r2t.shape[1], server_args)
    runner.device, runner.dtype = DEV, torch.bfloat16
    b = _backend(name, runner)
    b.init_forward_metadata(fb)
    out = b.forward_extend(q, k, v, layer, fb)
    if through_pool:  # the chunk as later readers see it: dequantised from the pool
        chunk = torch.cat([r2t[i + 1, p:p + n].long() for i, (p, n) in enumerate(zip(prefix_lens, new_lens))])
        kc, vc = pool.dequant(0, chunk)
        k, v = kc.bfloat16().reshape(k.shape), vc.bfloat16().reshape(v.shape)
    # expected: stock FlashInfer BF16, causal (bottom-right aligned) over
    # [dequantised prefix ; chunk] per request
    ks, vs, kvo = [], [], [0]
    qo = [0]
    for i, (p, n) in enumerate(zip(prefix_lens, new_lens)):
        kp, vp = pool.dequant(0, r2t[i + 1, :p].long())
        a = qo[-1]
        ks.append(torch.cat([kp.bfloat16(), k.view(-1, hkv, d)[a:a + n]]))
        vs.append(torch.cat([vp.bfloat16(), v.view(-1, hkv, d)[a:a + n]]))
        qo.append(a + n)
        kvo.append(kvo[-1] + p + n)
    want = _flashinfer_bf16_ragged(q, torch.cat(ks), torch.cat(vs), torch.tensor(qo, device=DEV),
                                   torch.tensor(kvo, device=DEV), hq, hkv, d, layer.scaling)
    torch.testing.assert_close(out.view_as(want).float(), want.float(), **TOL)


@pytest.mark.parametrize("page_size", [1, 16])
def test_per_step_metadata_never_syncs_on_device(page_size):
    """The decode-graph refresh (every replay) and the extend qo_indptr make no device
    sync: torch's sync debug mode raises on any (run 8 found `indptr[0] = 0` doing one)."""
    gen = torch.Generator().manual_seed(page_size)
    lens = [300, 17, 1200, 64]
    r2t, _ = paged_req_to_token(lens, page_size, 1280, gen)
    r2t, req, lens_t = r2t.to(DEV), torch.tensor([1, 2, 3, 4], device=DEV), torch.tensor(lens, device=DEV)
    g = ia.DecodeGraphState(8, 1280, page_size, 32, 8, Int4KVFormat(head_dim=128), DEV)
    total = ia.host_total(lens, page_size)
    g.fill(r2t, req, lens_t, 4, total=total)  # first call: allocator warm-up outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        kv = g.fill(r2t, req, lens_t, 4, total=total)
        ia.qo_indptr_from(lens_t)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert int(kv.kv_indptr[4]) == total
