"""The format definition and the pure-torch references that every kernel is checked against."""

import pytest
import scipy.linalg
import torch

from saw_sglang.kernels.format import Int4KVFormat, block_hadamard, hadamard
from saw_sglang.kernels import reference as ref


@pytest.mark.parametrize("b", [1, 2, 16, 64, 128])
def test_hadamard_matches_scipy_and_is_orthogonal(b):
    h = hadamard(b, torch.float64)
    expect = torch.from_numpy(scipy.linalg.hadamard(b)).double() / b**0.5
    torch.testing.assert_close(h, expect)
    torch.testing.assert_close(h @ h, torch.eye(b, dtype=torch.float64))


def test_block_rotation_is_self_inverse_and_matches_block_diag():
    x = torch.randn(5, 3, 128)
    for b in (16, 64, 128):
        y = ref.rotate(x, b)
        torch.testing.assert_close(y, x @ block_hadamard(128, b), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ref.rotate(y, b), x, atol=1e-5, rtol=1e-5)


def test_bytes_per_token_d128_is_at_least_3_7x_smaller_than_bf16():
    fmt = Int4KVFormat(head_dim=128)
    assert fmt.bytes_per_token_head == 68
    assert fmt.compression_vs(2) >= 3.7
    assert fmt.bytes_per_token(num_kv_heads=8, num_layers=36) == 2 * 36 * 8 * 68


@pytest.mark.parametrize(
    "kwargs, msg",
    [
        (dict(head_dim=128, block_size=48), "power of two"),
        (dict(head_dim=64, block_size=128), "power of two dividing"),
        (dict(head_dim=128, group_size=48), "even divisor"),
        (dict(head_dim=128, rotation="random"), "rotation"),
    ],
)
def test_bad_formats_are_refused_with_a_fix(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        Int4KVFormat(**kwargs)


def test_served_formats_are_one_rule():
    """Which formats the attention kernels read: head_dim 64/128/256, groups >= 32 channels.
    The decode and prefix kernels and the server's refusals all ask served_problem."""
    from saw_sglang.kernels.format import served_problem

    for d in (64, 128, 256):
        assert served_problem(Int4KVFormat(head_dim=d)) is None
        assert served_problem(Int4KVFormat(head_dim=d, group_size=32)) is None
        assert "group size 16" in served_problem(Int4KVFormat(head_dim=d, group_size=16))
    assert "head_dim 96" in served_problem(Int4KVFormat(head_dim=96, block_size=32))
    assert "head_dim 32" in served_problem(Int4KVFormat(head_dim=32))


@pytest.mark.parametrize("d, g", [(64, 64), (128, 128), (128, 32)])
@pytest.mark.parametrize("rotated", [False, True])
def test_round_trip_error_is_within_half_a_step(d, g, rotated):
    fmt = Int4KVFormat(head_dim=d, group_size=g)
    x = torch.randn(7, 2, d)
    packed, scales = ref.quantize(x, fmt, rotated)
    assert packed.dtype == torch.uint8 and packed.shape == (7, 2, d // 2)
    assert scales.dtype == torch.float16 and scales.shape == (7, 2, d // g, 2)
    y = ref.dequantize_values(packed, scales, fmt, rotated, unrotate=False)
    xr = ref.rotate(x, fmt.block_size) if rotated else x
    step = scales[..., 0].float().repeat_interleave(g, -1)
    # half a step, plus fp16 rounding of min and scale (times up to 15 codes)
    tol = 0.5 * step + 16 * 1e-3 * xr.abs().amax(-1, keepdim=True)
    assert ((y - xr).abs() <= tol).all()


def test_packing_low_nibble_is_element_i_high_is_i_plus_half_group():
    fmt = Int4KVFormat(head_dim=8, group_size=8, rotation="none")
    x = torch.tensor([[0.0, 1, 2, 3, 4, 5, 6, 15]])  # min 0, max 15 -> codes = values
    packed, scales = ref.quantize(x, fmt, rotated=False)
    assert packed.tolist() == [[0 | (4 << 4), 1 | (5 << 4), 2 | (6 << 4), 3 | (15 << 4)]]
    assert scales[0, 0].tolist() == [1.0, 0.0]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), 1e30])
def test_non_finite_and_constant_rows_give_finite_scales(bad):
    fmt = Int4KVFormat(head_dim=64)
    x = torch.randn(4, 1, 64)
    x[0, 0, 3] = bad
    x[1] = 2.5  # constant row
    for rotated in (False, True):
        packed, scales = ref.quantize(x, fmt, rotated)
        assert torch.isfinite(scales.float()).all()
        y = ref.dequantize_values(packed, scales, fmt, rotated)
        assert torch.isfinite(y).all()
    y = ref.dequantize_values(*ref.quantize(x[1:2], fmt, False), fmt, False)
    torch.testing.assert_close(y, torch.full_like(y, 2.5))


def test_rotation_lowers_error_on_outlier_channel():
    torch.manual_seed(0)
    fmt = Int4KVFormat(head_dim=128)
    k = torch.randn(256, 4, 128)
    k[..., 7] *= 40.0  # a planted heavy channel, as in real K caches
    errs = {}
    for rotated in (False, True):
        y = ref.dequantize_values(*ref.quantize(k, fmt, rotated), fmt, rotated)
        errs[rotated] = ((y - k) ** 2).sum() / (k**2).sum()
    assert errs[True] < 0.5 * errs[False], errs


def test_decode_reference_equals_plain_attention_on_dequantized_cache():
    torch.manual_seed(1)
    fmt = Int4KVFormat(head_dim=64, rotate_v=True)
    rows, hkv, hq = 40, 2, 8
    kd, ks = fmt.alloc(rows, hkv)
    vd, vs = fmt.alloc(rows, hkv)
    loc = torch.randperm(rows)[:20]
    k, v = torch.randn(20, hkv, 64), torch.randn(20, hkv, 64)
    ref.quantize_and_store_ref(k, v, loc, kd, ks, vd, vs, fmt)
    kdq = ref.dequantize_ref(kd, ks, loc, fmt, True, torch.float32)
    vdq = ref.dequantize_ref(vd, vs, loc, fmt, True, torch.float32)
    q = torch.randn(2, hq, 64)
    indptr = torch.tensor([0, 12, 20])
    lens = torch.tensor([12, 8])
    o = ref.decode_attention_ref(q, kd, ks, vd, vs, indptr, loc, lens, fmt, 0.125)
    for b, (a, e) in enumerate([(0, 12), (12, 20)]):
        kk = kdq[a:e].repeat_interleave(4, 1)
        vv = vdq[a:e].repeat_interleave(4, 1)
        p = torch.softmax(torch.einsum("hd,nhd->hn", q[b], kk) * 0.125, -1)
        torch.testing.assert_close(o[b], torch.einsum("hn,nhd->hd", p, vv), atol=1e-5, rtol=1e-5)
    # the rotated-K error is small relative to the unquantised attention
    assert (kdq - k).norm() / k.norm() < 0.15


def test_prefix_reference_merges_with_new_chunk_to_full_attention():
    torch.manual_seed(2)
    fmt = Int4KVFormat(head_dim=64, rotation="none")
    k, v = torch.randn(10, 1, 64), torch.randn(10, 1, 64)
    kd, ks = fmt.alloc(16, 1)
    vd, vs = fmt.alloc(16, 1)
    loc = torch.arange(3, 9)  # 6 cached prefix tokens
    ref.quantize_and_store_ref(k[:6], v[:6], loc, kd, ks, vd, vs, fmt)
    q = torch.randn(4, 2, 64)  # 4 new tokens
    o1, l1 = ref.prefix_attention_ref(q, torch.tensor([0, 4]), kd, ks, vd, vs,
                                      torch.tensor([0, 6]), loc, torch.tensor([6]), fmt, 0.125)
    kdq = ref.dequantize_ref(kd, ks, loc, fmt, False, torch.float32)
    vdq = ref.dequantize_ref(vd, vs, loc, fmt, False, torch.float32)
    causal = torch.ones(4, 4).tril().bool().unsqueeze(0)
    o2, l2 = ref._attend(q, k[6:], v[6:], 0.125, 0.0, causal)
    o, _ = ref.attention_lse_merge(o1, l1, o2, l2)
    kk, vv = torch.cat([kdq, k[6:]]), torch.cat([vdq, v[6:]])
    full = torch.ones(4, 10).bool()
    full[:, 6:] = causal[0]
    expect, _ = ref._attend(q, kk, vv, 0.125, 0.0, full.unsqueeze(0))
    torch.testing.assert_close(o, expect, atol=1e-5, rtol=1e-5)


def test_least_squares_pair_never_worse_per_group():
    """reference.quantize's scale fit: "minmax" is the format's default; "lsq" keeps the
    min-max codes and refits (scale, min), so no group reconstructs worse (up to the
    fp16 rounding of the pair), and the sum is lower."""
    from saw_sglang.kernels import reference as ref
    from saw_sglang.kernels.format import Int4KVFormat

    g = torch.Generator().manual_seed(11)
    x = torch.randn(64, 4, 128, generator=g) * torch.rand(64, 4, 1, generator=g) * 3
    fmt = Int4KVFormat(head_dim=128, group_size=32)
    assert fmt.scale_fit == "minmax"
    base = ref.quantize(x, fmt, True)
    assert all(torch.equal(a, b) for a, b in zip(base, ref.quantize(x, fmt, True, fit="minmax")))

    def group_err(packed, scales):
        y = ref.dequantize_values(packed, scales, fmt, True, unrotate=False)
        xr = ref.rotate(x, fmt.block_size)
        return ((y - xr) ** 2).reshape(64, 4, fmt.num_groups, -1).sum(-1)

    lsq = ref.quantize(x, fmt, True, fit="lsq")
    assert torch.equal(lsq[0], base[0])  # same codes
    e1, el = group_err(*base), group_err(*lsq)
    mag = ref.rotate(x, fmt.block_size).abs().reshape(64, 4, fmt.num_groups, -1).amax(-1)
    assert (el <= e1 + 32 * (2**-10 * mag) ** 2).all() and el.sum() < 0.98 * e1.sum()
