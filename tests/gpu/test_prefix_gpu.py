"""INT4 prefix attention on the GPU at real sizes, and the merge with FlashInfer states.
Same tolerances as tests/test_prefix.py (derived in saw_sglang.kernels.testing).

Run: python -m pytest -q -s -m gpu tests/gpu/test_prefix_gpu.py
(-s shows the timings; FlashInfer, when importable, adds the merge_state checks.)
"""

import json
import subprocess
import sys

import pytest
import torch

from saw_sglang.kernels import reference as ref
from saw_sglang.kernels.format import Int4KVFormat
from saw_sglang.kernels.prefix import prefix_attention, to_flashinfer_lse
from saw_sglang.kernels.testing import LSE_ATOL, O_TOL, check_prefix, make_cache, make_queries

pytestmark = pytest.mark.gpu
DEV = "cuda"
# 4 requests: long prefix + long chunk, one query, an empty prefix, odd sizes
Q_LENS = [512, 1, 300, 77]
PREFIX_LENS = [4096, 1000, 0, 2500]


def fmt_for(d, g, rot):
    return Int4KVFormat(head_dim=d, group_size=g, rotation="none" if rot == "none" else "hadamard",
                        rotate_v=rot == "kv")


@pytest.mark.parametrize("page", [1, 16])
@pytest.mark.parametrize("rot", ["none", "k", "kv"])
def test_real_sizes_d128(page, rot):
    gen = torch.Generator().manual_seed(page + len(rot))
    fmt = fmt_for(128, 128, rot)
    cache, _, _ = make_cache(fmt, 8, PREFIX_LENS, page, gen, spare_pages=300, device=DEV)
    q, qo = make_queries(Q_LENS, 32, 128, gen, device=DEV)
    check_prefix(q, qo, cache, fmt, page, max_q_len=max(Q_LENS))


@pytest.mark.parametrize("d, g, hq, hkv, rot, cap", [
    (64, 64, 9, 3, "k", 0.0),      # SmolLM2-135M shape (GQA 3)
    (64, 32, 9, 3, "kv", 0.0),     # faulted before the head_dim-64 workaround; the next two tell groups from V rotation
    (64, 32, 9, 3, "k", 0.0),
    (64, 64, 9, 3, "kv", 0.0),
    (128, 32, 32, 8, "kv", 0.0),
    (128, 64, 8, 8, "k", 30.0),    # GQA 1, soft-cap
    (256, 256, 16, 2, "k", 50.0),  # Gemma-like head_dim, GQA 8
    (256, 64, 8, 4, "kv", 0.0),
])
def test_head_dims_groups_gqa(d, g, hq, hkv, rot, cap):
    if g < d or (d == 64 and rot != "none"):
        # Rotated head_dim-64 cases faulted on the H200 before the host-rotation path
        # (docs/prefix.md): these run in a child process, so a fault fails that case
        # alone instead of poisoning every later test's CUDA context.
        r = subprocess.run([sys.executable, __file__, json.dumps([d, g, hq, hkv, rot, cap])],
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"child failed ({r.returncode}):\n{r.stdout[-3000:]}{r.stderr[-3000:]}"
        return
    _head_dims_case(d, g, hq, hkv, rot, cap)


def _head_dims_case(d, g, hq, hkv, rot, cap):
    gen = torch.Generator().manual_seed(d + g + hq)
    fmt = fmt_for(d, g, rot)
    cache, _, _ = make_cache(fmt, hkv, PREFIX_LENS, 16, gen, spare_pages=300, device=DEV)
    q, qo = make_queries(Q_LENS, hq, d, gen, device=DEV)
    check_prefix(q, qo, cache, fmt, 16, cap)


@pytest.mark.parametrize("rot", ["k", "kv"])
def test_split_kv_few_queries_long_prefix(rot):
    """Few query blocks over long prefixes: the automatic split count fills the GPU; the
    merged result matches the reference and the unsplit kernel. Prints both times."""
    from triton.testing import do_bench

    gen = torch.Generator().manual_seed(9)
    fmt = fmt_for(128, 128, rot)
    q_lens, prefix_lens = [16, 1, 40], [8000, 3000, 0]
    cache, _, _ = make_cache(fmt, 8, prefix_lens, 16, gen, spare_pages=50, device=DEV)
    q, qo = make_queries(q_lens, 32, 128, gen, device=DEV)
    o, lse = check_prefix(q, qo, cache, fmt, 16, max_q_len=40, max_kv_len=8000)
    o1, lse1 = prefix_attention(q, qo, *cache, fmt, 128**-0.5, page_size=16, num_splits=1)
    torch.testing.assert_close(o.float(), o1.float(), **O_TOL)
    torch.testing.assert_close(lse, lse1, atol=LSE_ATOL, rtol=0)
    ms_auto = do_bench(lambda: prefix_attention(q, qo, *cache, fmt, 128**-0.5, page_size=16,
                                                max_q_len=40, max_kv_len=8000))
    ms_one = do_bench(lambda: prefix_attention(q, qo, *cache, fmt, 128**-0.5, page_size=16,
                                               max_q_len=40, num_splits=1))
    print(f"\nfew queries over 8000/3000 prefix ({rot}): auto split {ms_auto:.3f} ms, "
          f"no split {ms_one:.3f} ms")


def test_empty_batch_and_empty_prefixes_on_gpu():
    gen = torch.Generator().manual_seed(1)
    fmt = fmt_for(128, 128, "k")
    cache, _, _ = make_cache(fmt, 8, [0, 0], 1, gen, device=DEV)
    q, qo = make_queries([0, 0], 32, 128, gen, device=DEV)
    o, lse = prefix_attention(q, qo, *cache, fmt, 0.1, max_q_len=0)
    assert o.shape == (0, 32, 128)
    q, qo = make_queries([4, 9], 32, 128, gen, device=DEV)
    o, lse = prefix_attention(q, qo, *cache, fmt, 0.1)
    assert bool((o == 0).all()) and bool(torch.isneginf(lse).all())


def test_merge_with_flashinfer_states():
    """Prefix (ours) + causal new chunk (FlashInfer's own prefill, base-2 lse) merged by
    flashinfer.merge_state == attention over dequantised prefix + chunk. Also pins the
    lse base: FlashInfer's returned lse == to_flashinfer_lse(natural lse)."""
    flashinfer = pytest.importorskip("flashinfer")
    gen = torch.Generator().manual_seed(2)
    d, hq, hkv, page = 128, 32, 8, 16
    fmt = fmt_for(d, d, "k")
    cache, dense_k, dense_v = make_cache(fmt, hkv, PREFIX_LENS, page, gen, spare_pages=300,
                                         device=DEV)
    q, qo = make_queries(Q_LENS, hq, d, gen, device=DEV)
    sm = d**-0.5
    o_pre, lse_pre = prefix_attention(q, qo, *cache, fmt, sm, page_size=page,
                                      max_q_len=max(Q_LENS))
    for b, n in enumerate(Q_LENS):
        a = int(qo[b])
        qb = q[a : a + n]
        k_new = torch.randn(n, hkv, d, generator=gen).to(DEV, torch.bfloat16)
        v_new = torch.randn(n, hkv, d, generator=gen).to(DEV, torch.bfloat16)
        o_new, lse_new2 = flashinfer.prefill.single_prefill_with_kv_cache_return_lse(
            qb, k_new, v_new, causal=True, sm_scale=sm)
        causal = torch.ones(n, n, dtype=torch.bool, device=DEV).tril()
        _, lse_new = ref._attend(qb.float(), k_new.float(), v_new.float(), sm, 0.0, causal)
        torch.testing.assert_close(lse_new2, to_flashinfer_lse(lse_new), atol=LSE_ATOL * 2, rtol=0)

        o_m, lse_m2 = flashinfer.merge_state(o_pre[a : a + n], to_flashinfer_lse(lse_pre[a : a + n]),
                                             o_new, lse_new2)
        k_all = torch.cat([dense_k[b].to(DEV), k_new.float()])
        v_all = torch.cat([dense_v[b].to(DEV), v_new.float()])
        mask = torch.cat([torch.ones(n, PREFIX_LENS[b], dtype=torch.bool, device=DEV), causal], 1)
        o_full, lse_full = ref._attend(qb.float(), k_all, v_all, sm, 0.0, mask)
        torch.testing.assert_close(o_m.float(), o_full, **O_TOL)
        torch.testing.assert_close(lse_m2, to_flashinfer_lse(lse_full), atol=LSE_ATOL * 2, rtol=0)


@pytest.mark.parametrize("d, hq, hkv", [(128, 32, 8), (64, 9, 3)])
def test_timing_and_sdpa_agreement(d, hq, hkv):
    """Prints kernel time (not asserted) next to torch SDPA over an already-dequantised
    BF16 prefix (the copy we avoid), and checks the two outputs agree. Tolerance: the
    SDPA side rounds k/v to bf16 (relative 2^-9), moving scores by ~1e-2 at most, and
    rounds the probabilities to bf16 before P.V (2^-9 of |v| <= ~4.5 per term): up to
    ~2e-2 on an output element (measured: 1 of 1.2M elements off by 0.0176)."""
    from triton.testing import do_bench

    gen = torch.Generator().manual_seed(3)
    fmt = fmt_for(d, d, "k")
    q_lens, prefix_lens = [512] * 4, [4096] * 4
    cache, dense_k, dense_v = make_cache(fmt, hkv, prefix_lens, 16, gen, spare_pages=8, device=DEV)
    q, qo = make_queries(q_lens, hq, d, gen, device=DEV)
    sm = d**-0.5
    ms = do_bench(lambda: prefix_attention(q, qo, *cache, fmt, sm, page_size=16, max_q_len=512))
    kv_bytes = 2 * sum(prefix_lens) * hkv * fmt.bytes_per_token_head
    flops = 4 * sum(n * p for n, p in zip(q_lens, prefix_lens)) * hq * d
    kb = torch.stack(dense_k).to(DEV, torch.bfloat16).transpose(1, 2)  # [B, Hkv, P, D]
    vb = torch.stack(dense_v).to(DEV, torch.bfloat16).transpose(1, 2)
    qs = q.view(4, 512, hq, d).transpose(1, 2)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    ms_ref = do_bench(lambda: sdpa(qs, kb, vb, scale=sm, enable_gqa=True))
    o, _ = prefix_attention(q, qo, *cache, fmt, sm, page_size=16, max_q_len=512)
    o_ref = sdpa(qs, kb, vb, scale=sm, enable_gqa=True).transpose(1, 2).reshape(q.shape)
    torch.testing.assert_close(o.float(), o_ref.float(), atol=2.5e-2, rtol=2e-2)
    print(f"\nprefix_attention d={d} {hq}/{hkv} heads, 4 x (512 q over 4096 INT4 prefix): "
          f"{ms:.3f} ms, {flops / ms / 1e9:.1f} TFLOP/s, {kv_bytes / ms / 1e6:.0f} GB/s INT4; "
          f"SDPA on a BF16 copy {ms_ref:.3f} ms")


if __name__ == "__main__":  # one case of test_head_dims_groups_gqa, in a child process
    _head_dims_case(*json.loads(sys.argv[1]))
    print("ok")
