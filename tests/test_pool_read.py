"""kernels/pool_read.py: attention over pool rows dequantised in their stored basis
(the Triton dequantise kernel under the interpreter) against attention over the rows
dequantised back to the original basis by the pure-torch reference.

Tolerances: fp32 attention 1e-4 (the rotation of q and of the output is exact up to
fp32 rounding); bf16 inputs 2e-2 on outputs of O(1).
"""

import pytest
import torch

from saw_sglang.kernels import reference as ref
from saw_sglang.kernels.calibration import KCalibration
from saw_sglang.kernels.format import Int4KVFormat
from saw_sglang.kernels.pool_read import (PoolReadWorkspace, attend_through_pool, rotate_blocks,
                                          stored_basis_query, unrotate_k_pays)


def _attend(q, k, v, sm_scale):
    """Plain (non-causal) GQA attention, fp32."""
    hq, hkv = q.shape[1], k.shape[1]
    k = k.float().repeat_interleave(hq // hkv, dim=1)
    v = v.float().repeat_interleave(hq // hkv, dim=1)
    p = torch.softmax(torch.einsum("nhd,thd->hnt", q.float(), k) * sm_scale, -1)
    return torch.einsum("hnt,thd->nhd", p, v).to(q.dtype)


@pytest.mark.parametrize("block", [16, 64, 128])
def test_rotate_blocks_is_the_reference_rotation_and_self_inverse(block):
    x = torch.randn(5, 3, 128)
    y = rotate_blocks(x, block)
    torch.testing.assert_close(y, ref.rotate(x, block), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rotate_blocks(y, block), x, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("d,g,hq,hkv,rot_v,page_rows", [
    (64, 64, 4, 2, False, 37),
    (64, 32, 6, 3, True, 19),
    (128, 128, 8, 2, True, 23),
    (128, 64, 4, 4, False, 41),
])
@pytest.mark.parametrize("calibrated", [False, True])
@pytest.mark.parametrize("unrotate_k", [False, True])
def test_attend_through_pool_matches_attention_over_original_basis(d, g, hq, hkv, rot_v, page_rows, calibrated,
                                                                   unrotate_k):
    gen = torch.Generator().manual_seed(d + g + hq + calibrated)
    fmt = Int4KVFormat(d, group_size=g, rotate_v=rot_v)
    rows = 64
    kd, ks = fmt.alloc(rows, hkv)
    vd, vs = fmt.alloc(rows, hkv)
    cal = None
    if calibrated:
        cal = KCalibration(2 * torch.randn(1, hkv, d, generator=gen),
                           torch.exp(0.3 * torch.randn(1, hkv, d, generator=gen)))
    k = torch.randn(rows, hkv, d, generator=gen)
    v = torch.randn(rows, hkv, d, generator=gen)
    ref.quantize_and_store_ref(k, v, torch.arange(rows), kd, ks, vd, vs, fmt,
                               k_affine=None if cal is None else cal.write_affine(0))
    slots = torch.randperm(rows - 1, generator=gen)[:page_rows] + 1  # scattered, slot 0 unused
    q = torch.randn(5, hq, d, generator=gen)
    sm = d ** -0.5
    ws = PoolReadWorkspace(page_rows + 3, hkv, d, torch.float32, "cpu")
    out = attend_through_pool(q, kd, ks, vd, vs, slots, fmt, lambda q3, kk, vv: _attend(q3, kk, vv, sm), ws,
                              k_scale=None if cal is None else cal.scale[0], unrotate_k=unrotate_k)
    k_true = ref.dequantize_ref(kd, ks, slots, fmt, fmt.k_rotated, torch.float32)
    if cal is not None:
        k_true = ref.uncalibrate(k_true, cal, 0)
    v_true = ref.dequantize_ref(vd, vs, slots, fmt, fmt.v_rotated, torch.float32)
    torch.testing.assert_close(out, _attend(q, k_true, v_true, sm), atol=1e-4, rtol=1e-4)


def test_attend_through_pool_bf16_and_repeated_slots():
    gen = torch.Generator().manual_seed(1)
    fmt = Int4KVFormat(64)
    kd, ks = fmt.alloc(16, 2)
    vd, vs = fmt.alloc(16, 2)
    ref.quantize_and_store_ref(torch.randn(16, 2, 64, generator=gen), torch.randn(16, 2, 64, generator=gen),
                               torch.arange(16), kd, ks, vd, vs, fmt)
    slots = torch.tensor([3, 3, 7, 1, 7, 9])
    q = torch.randn(4, 4, 64, generator=gen).bfloat16()
    ws = PoolReadWorkspace(8, 2, 64, torch.bfloat16, "cpu")
    out = attend_through_pool(q, kd, ks, vd, vs, slots, fmt, lambda q3, k, v: _attend(q3, k, v, 0.125), ws)
    want = _attend(q.float(), ref.dequantize_ref(kd, ks, slots, fmt, True, torch.float32),
                   ref.dequantize_ref(vd, vs, slots, fmt, False, torch.float32), 0.125)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), want, atol=2e-2, rtol=2e-2)


def test_workspace_bounds():
    fmt = Int4KVFormat(64)
    kd, ks = fmt.alloc(8, 1)
    ws = PoolReadWorkspace(4, 1, 64, torch.float32, "cpu")
    assert ws.fits(4) and not ws.fits(5) and not ws.fits(0)
    with pytest.raises(ValueError, match="exceed the through-pool workspace"):
        attend_through_pool(torch.zeros(1, 1, 64), kd, ks, kd, ks, torch.arange(5), fmt,
                            lambda *a: None, ws)
    # K and V rows of 8 heads x 128 in bf16: 4 KiB per token
    assert PoolReadWorkspace.rows_for(256 << 20, 8, 128) == 65536


def test_stored_basis_query_folds_the_scale_before_rotating():
    gen = torch.Generator().manual_seed(2)
    fmt = Int4KVFormat(64, block_size=32)
    q = torch.randn(3, 4, 64, generator=gen)
    scale = torch.exp(torch.randn(2, 64, generator=gen))
    got = stored_basis_query(q, fmt, scale)
    torch.testing.assert_close(got, ref.rotate(q * scale.repeat_interleave(2, 0), 32), atol=1e-5, rtol=1e-5)
    assert stored_basis_query(q, Int4KVFormat(64, rotation="none")) is q


def test_unrotate_k_pays_when_queries_outweigh_keys():
    """By size: q rows x query heads at least half of key rows x KV heads; only where a
    block lies inside a group (the tensor-core unrotate) and K is rotated at all."""
    fmt = Int4KVFormat(128)
    assert unrotate_k_pays(fmt, 8192, 32, 8192, 8)          # a prefill without a prefix
    assert unrotate_k_pays(fmt, 8192, 32, 16384, 8)         # 8k new over 8k cached
    assert not unrotate_k_pays(fmt, 2048, 32, 18432, 8)     # 2k over 16k (1.13x slower on an H100)
    assert not unrotate_k_pays(fmt, 128, 32, 65536, 8)      # a short suffix over a long prefix
    assert not unrotate_k_pays(Int4KVFormat(128, group_size=64), 8192, 32, 8192, 8)
    assert not unrotate_k_pays(Int4KVFormat(128, rotation="none"), 8192, 32, 8192, 8)


def test_unrotated_k_reaches_attend_in_the_original_basis(monkeypatch):
    """With the switch on and q heavier, attend gets q as it came and K un-rotated."""
    import saw_sglang.kernels.pool_read as pr
    fmt = Int4KVFormat(64)
    kd, ks = fmt.alloc(16, 1)
    vd, vs = fmt.alloc(16, 1)
    k = torch.randn(16, 1, 64)
    ref.quantize_and_store_ref(k, k, torch.arange(16), kd, ks, vd, vs, fmt)
    q = torch.randn(16, 4, 64)
    seen = {}

    def attend(q3, kk, vv):
        seen["q"], seen["k"] = q3, kk.clone()
        return q3
    ws = PoolReadWorkspace(16, 1, 64, torch.float32, "cpu")
    for on, same_q in ((True, True), (False, False)):
        monkeypatch.setattr(pr, "UNROTATE_K", on)
        attend_through_pool(q, kd, ks, vd, vs, torch.arange(16), fmt, attend, ws)
        assert torch.equal(seen["q"], q) == same_q
        want = ref.dequantize_ref(kd, ks, torch.arange(16), fmt, same_q, torch.float32)
        torch.testing.assert_close(seen["k"], want, atol=1e-5, rtol=1e-5)
