"""quantize_and_store / dequantize Triton kernels vs the torch references
(CPU: Triton interpreter, small shapes). Tolerances: see tests/quantize_checks.py."""

import math

import pytest
import torch
import triton
import triton.language as tl

from quantize_checks import (
    assert_slots_match,
    check_dequantize_same_bytes,
    check_round_trip,
    fused_kv,
    poisoned_buffers,
    run_and_compare,
)
from saw_sglang.kernels import reference as ref
from saw_sglang.kernels.format import Int4KVFormat
from saw_sglang.kernels.quantize import (
    _launch_quantize,
    _rotate_pm1,
    dequantize,
    quantize_and_store,
    without_rotation,
)

MODES = {  # name -> Int4KVFormat kwargs
    "none": dict(rotation="none"),
    "k": dict(rotation="hadamard"),
    "kv": dict(rotation="hadamard", rotate_v=True),
}


def _fmt(d, g, b, mode):
    return Int4KVFormat(head_dim=d, group_size=g, block_size=b, **MODES[mode])


@pytest.mark.parametrize("b, mode", [(None, "none"), (None, "k"), (None, "kv"), (16, "k"), (16, "kv")])
@pytest.mark.parametrize("d, g", [(64, 64), (64, 32), (128, 128), (128, 32)])
def test_matches_reference_scattered_strided(d, g, b, mode, device):
    fmt = _fmt(d, g, b, mode)
    gen = torch.Generator(device).manual_seed(hash((d, g, b, mode)) % 2**31)
    t, hq, hkv, rows = 150, 4, 2, 400  # 150 tokens: several tiles and a ragged one
    _, k, v = fused_kv(t, hq, hkv, d, torch.bfloat16, device, gen)
    loc = torch.randperm(rows, generator=gen, device=device)[:t]
    run_and_compare(k, v, loc, fmt, rows, exact=(mode == "none" and device == "cpu"), device=device)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("loc_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("b", [128, 4])
def test_dtypes_and_block_smaller_than_16(dtype, loc_dtype, b, device):
    fmt = Int4KVFormat(head_dim=128, group_size=64, block_size=b, rotate_v=True)
    t, rows = 37, 90
    k = torch.randn(t, 2, 128, device=device).to(dtype)
    v = (torch.randn(t, 2, 128, device=device) * 5 + 1).to(dtype)
    loc = torch.randperm(rows, device=device)[:t].to(loc_dtype)
    run_and_compare(k, v, loc, fmt, rows, exact=False, device=device)


@pytest.mark.parametrize("mode", ["none", "kv"])
def test_nonfinite_huge_and_constant_rows_give_finite_scales(mode, device):
    fmt = _fmt(64, 32, None, mode)
    t, h, rows = 12, 2, 20
    k = torch.randn(t, h, 64, device=device)
    k[0, 0, 3] = float("nan")
    k[1, 0, :] = float("nan")
    k[2, 1, 5] = float("inf")
    k[3, 0, 7] = float("-inf")
    k[4, 1, :] = float("inf")
    k[5, 0, 9] = 1e30
    k[5, 1, 9] = -1e30
    k[6, 0, :] = 2.5  # constant row
    k[7, 1, :] = 0.0  # all zero
    k[8, 0, :32] = 1e4
    k[8, 0, 32:] = -1e4
    k = k.bfloat16()  # bf16 keeps 1e30 finite; inf/nan stay
    v = k.flip(0).clone()
    loc = torch.randperm(rows, device=device)[:t]
    bufs = run_and_compare(k, v, loc, fmt, rows, exact=(mode == "none" and device == "cpu"),
                           device=device)
    for sc in (bufs[1], bufs[3]):
        assert torch.isfinite(sc[loc.long()].float()).all()
    # the constant row: (scale 0, min = value) without rotation
    if mode == "none":
        assert bufs[1][loc[6], 0, :, 0].eq(0).all() and bufs[1][loc[6], 0, :, 1].eq(2.5).all()
        assert bufs[0][loc[6], 0].eq(0).all()


def test_repeated_padding_slot_does_not_corrupt_other_slots(device):
    fmt = Int4KVFormat(head_dim=64, group_size=32, rotate_v=True)
    t, h, rows = 40, 2, 64
    k = torch.randn(t, h, 64, device=device).half()
    v = torch.randn(t, h, 64, device=device).half()
    loc = torch.randperm(rows - 1, device=device)[:t] + 1
    loc[::3] = 0  # dummy tokens all write the padding slot 0
    bufs = poisoned_buffers(fmt, rows, h, device)
    refs = [b.clone() for b in bufs]
    quantize_and_store(k, v, loc, *bufs, fmt)
    real = loc != 0
    ref.quantize_and_store_ref(k[real], v[real], loc[real], *refs, fmt)
    others = torch.ones(rows, dtype=torch.bool, device=device)
    others[0] = False
    slots = others.nonzero().squeeze(1)
    assert_slots_match(bufs[0:2], refs[0:2], fmt, slots, exact=False)
    assert_slots_match(bufs[2:4], refs[2:4], fmt, slots, exact=False)
    for sc in (bufs[1], bufs[3]):
        assert torch.isfinite(sc[0].float()).all() and not sc[0].eq(-1234.0).any()


@pytest.mark.parametrize("d, g, b", [(64, 64, 64), (128, 32, 128), (128, 128, 16), (64, 32, 8), (256, 64, 256),
                                     (128, 128, 128), (256, 256, 256), (256, 256, 128)])
@pytest.mark.parametrize("rotated", [False, True])
def test_dequantize_matches_reference_on_same_bytes(d, g, b, rotated, device):
    fmt = Int4KVFormat(head_dim=d, group_size=g, block_size=b)
    check_dequantize_same_bytes(fmt, rows=70, heads=3, t=45, rotated=rotated, device=device)


@pytest.mark.parametrize("d", [64, 128])
def test_unrotate_loops_over_more_tiles_than_programs(d, device):
    """The tensor-core unrotate runs a few programs per SM, each looping over token tiles:
    300 tokens are 10 tiles of 32 for 2 programs per head on CPU (8 programs / 3 heads)."""
    check_dequantize_same_bytes(Int4KVFormat(head_dim=d), rows=400, heads=3, t=300, rotated=True,
                                device=device)


@pytest.mark.parametrize("mode", ["none", "k", "kv"])
@pytest.mark.parametrize("d, g, b", [(64, 32, None), (128, 128, None), (128, 32, 16)])
def test_round_trip_matches_reference_values(d, g, b, mode, device):
    fmt = _fmt(d, g, b, mode)
    t, rows = 33, 50
    _, k, v = fused_kv(t, 2, 2, d, torch.bfloat16, device)
    loc = torch.randperm(rows, device=device)[:t]
    check_round_trip(k, v, loc, fmt, rows, device)


def test_empty_batch_is_a_no_op(device):
    fmt = Int4KVFormat(head_dim=64)
    bufs = poisoned_buffers(fmt, 4, 2, device)
    before = [b.clone() for b in bufs]
    x = torch.empty(0, 2, 64, dtype=torch.bfloat16, device=device)
    quantize_and_store(x, x, torch.empty(0, dtype=torch.int64, device=device), *bufs, fmt)
    assert all(torch.equal(a, b) for a, b in zip(bufs, before))
    assert dequantize(bufs[0], bufs[1], torch.empty(0, dtype=torch.int64), fmt, True).shape == (0, 2, 64)


def test_bad_inputs_are_refused_with_a_clear_error():
    fmt = Int4KVFormat(head_dim=64)
    bufs = fmt.alloc(8, 2) + fmt.alloc(8, 2)
    x = torch.randn(3, 2, 64, dtype=torch.bfloat16)
    loc = torch.arange(3)
    with pytest.raises(ValueError, match="head_dim"):
        quantize_and_store(x, x, loc, *bufs, Int4KVFormat(head_dim=128))
    with pytest.raises(NotImplementedError, match="head_dim"):
        f96 = Int4KVFormat(head_dim=96, block_size=32)
        y = torch.randn(3, 2, 96, dtype=torch.bfloat16)
        quantize_and_store(y, y, loc, *(f96.alloc(8, 2) + f96.alloc(8, 2)), f96)
    with pytest.raises(ValueError, match="contiguous"):
        quantize_and_store(x.transpose(1, 2).contiguous().transpose(1, 2), x, loc, *bufs, fmt)
    with pytest.raises(TypeError, match="bf16 or fp16"):
        quantize_and_store(x.float(), x.float(), loc, *bufs, fmt)
    with pytest.raises(ValueError, match="loc"):
        quantize_and_store(x, x, loc.float(), *bufs, fmt)
    with pytest.raises(ValueError, match="k_scales"):
        quantize_and_store(x, x, loc, bufs[0], bufs[1].float(), bufs[2], bufs[3], fmt)


def test_without_rotation_is_the_same_format_minus_the_rotation():
    fmt = Int4KVFormat(head_dim=128, group_size=32, block_size=64, rotate_v=True)
    base = without_rotation(fmt)
    assert base.rotation == "none" and not base.k_rotated and not base.v_rotated
    assert (base.head_dim, base.group_size, base.block_size) == (128, 32, 64)
    assert base.bytes_per_token_head == fmt.bytes_per_token_head


@triton.jit
def _rotate_tile_kernel(x_ptr, y_ptr, BT: tl.constexpr, D: tl.constexpr, B: tl.constexpr,
                        W: tl.constexpr, DOT_K: tl.constexpr):
    offs = tl.arange(0, BT)[:, None] * D + tl.arange(0, D)[None, :]
    tl.store(y_ptr + offs, _rotate_pm1(tl.load(x_ptr + offs), BT, D, B, W, DOT_K))


@pytest.mark.parametrize("dot_k", [16, 64, 256])
@pytest.mark.parametrize("d, b", [(128, 16), (128, 32), (128, 64), (128, 128), (256, 256),
                                  (256, 128), (64, 64), (64, 4)])
def test_rotation_tile_matches_reference_rotate(d, b, dot_k, device):
    """The in-kernel rotation alone (a dot_k-deep dot + butterflies; dot_k >= b: one
    dense dot) on fp16-exact values vs reference.rotate: equal to fp32
    summation-order rounding."""
    bt = max(16, 64 * b // d)  # the kernel's tile rule: >= 64 blocks per tile
    gen = torch.Generator(device).manual_seed(d * 1000 + b)
    x = (torch.randn(bt, d, generator=gen, device=device) * 4).half().float()
    x[0] = 3.0  # a constant row: one nonzero per block, exact zeros elsewhere
    x[1, : d // 2] = 30000.0  # the clamp value, exact in fp16
    y = torch.empty_like(x)
    _rotate_tile_kernel[(1,)](x, y, BT=bt, D=d, B=b, W=max(b, 16), DOT_K=dot_k)
    want = ref.rotate(x, b)
    mag = x.abs().amax(-1, keepdim=True)
    torch.testing.assert_close(y / math.sqrt(b), want, rtol=0, atol=4 * b * 2**-24 * mag.max().item())
    # +-1 sums of fp16 values are exact in fp32 for small-magnitude rows: the constant
    # row must come out as one value per block and exact zeros
    blocks = y[0].view(d // b, b)
    assert blocks[:, 0].eq(3.0 * b).all() and blocks[:, 1:].eq(0).all()


@pytest.mark.parametrize("d, g, b, dtype", [
    (128, 32, 32, torch.bfloat16), (128, 64, 64, torch.float16),
    (256, 256, 256, torch.bfloat16), (256, 64, 128, torch.float16),
])
def test_kron_rotation_block_sizes_match_reference(d, g, b, dtype, device):
    """End to end at block sizes beyond the defaults (K and V rotated)."""
    fmt = Int4KVFormat(head_dim=d, group_size=g, block_size=b, rotate_v=True)
    gen = torch.Generator(device).manual_seed(d + g + b)
    t, rows = 40, 100
    _, k, v = fused_kv(t, 2, 2, d, dtype, device, gen)
    loc = torch.randperm(rows, generator=gen, device=device)[:t]
    run_and_compare(k, v, loc, fmt, rows, exact=False, device=device)


@pytest.mark.parametrize("knobs", [dict(dot_k=128), dict(dot_k=16),
                                   dict(block_t=16, num_warps=8, programs=3, stages=2)])
def test_tuning_knobs_keep_the_result(knobs, device):
    """The launch knobs the speed sweep tries (dot depth, other tiles, warps, program
    counts, pipelining) write the same bytes as the default launch."""
    fmt = Int4KVFormat(head_dim=128, group_size=64, rotate_v=True)
    t, rows = 50, 80
    _, k, v = fused_kv(t, 4, 2, 128, torch.bfloat16, device)
    loc = torch.randperm(rows, device=device)[:t]
    bufs = fmt.alloc(rows, 2, device) + fmt.alloc(rows, 2, device)
    quantize_and_store(k, v, loc, *bufs, fmt)
    other = fmt.alloc(rows, 2, device) + fmt.alloc(rows, 2, device)
    _launch_quantize(k, v, loc, *other, fmt, **knobs)
    written = torch.zeros(rows, dtype=torch.bool, device=device)
    written[loc] = True
    for a, b_ in zip(bufs, other):
        assert torch.equal(a[~written], b_[~written])
    # the same arithmetic on CPU gives the same bytes; another dot depth sums in
    # another order (and GPU tiles may too): then the usual tolerance
    exact = device == "cpu" and "dot_k" not in knobs
    slots = written.nonzero().squeeze(1)
    assert_slots_match(other[0:2], bufs[0:2], fmt, slots, exact=exact)
    assert_slots_match(other[2:4], bufs[2:4], fmt, slots, exact=exact)


def _affine(h, d, device, seed):
    """A K calibration's (mul, add): per-channel scale around 1 and a shift."""
    g = torch.Generator(device).manual_seed(seed)
    mul = (torch.rand(h, d, generator=g, device=device) * 1.5 + 0.5).contiguous()
    add = (torch.randn(h, d, generator=g, device=device) * 2).contiguous()
    return mul, add


@pytest.mark.parametrize("fit", ["lsq", "minmax"])
@pytest.mark.parametrize("mode", ["none", "k", "kv"])
@pytest.mark.parametrize("d, g, b", [(64, 64, None), (64, 32, None), (128, 128, None), (256, 256, 128)])
def test_scale_fit_and_k_calibration_match_reference(d, g, b, mode, fit, device):
    fmt = Int4KVFormat(head_dim=d, group_size=g, block_size=b, scale_fit=fit, **MODES[mode])
    gen = torch.Generator(device).manual_seed(d + g + len(mode) + len(fit))
    t, h, rows = 70, 2, 160
    k = (torch.randn(t, h, d, generator=gen, device=device) * 3 + 2).bfloat16()
    v = torch.randn(t, h, d, generator=gen, device=device).bfloat16()
    loc = torch.randperm(rows, generator=gen, device=device)[:t]
    affine = _affine(h, d, device, d + g)
    bufs = poisoned_buffers(fmt, rows, h, device)
    refs = [x.clone() for x in bufs]
    quantize_and_store(k, v, loc, *bufs, fmt, k_affine=affine)
    ref.quantize_and_store_ref(k, v, loc, *refs, fmt, k_affine=affine)
    slots = loc.long()
    assert_slots_match(bufs[0:2], refs[0:2], fmt, slots, exact=False)
    assert_slots_match(bufs[2:4], refs[2:4], fmt, slots, exact=False)
    # the calibration is K's alone: V is written as without it
    plain = poisoned_buffers(fmt, rows, h, device)
    quantize_and_store(k, v, loc, *plain, fmt)
    assert torch.equal(plain[2], bufs[2]) and torch.equal(plain[3], bufs[3])
    assert not torch.equal(plain[1][slots], bufs[1][slots])


@pytest.mark.parametrize("rotated", [False, True])
def test_lsq_never_worse_than_minmax(rotated):
    """The least-squares pair for the min-max codes has at most the min-max pair's
    squared error (up to the fp16 rounding of the pair), and less on average. Per
    token-head: the rotation is orthonormal, so errors in the rotated groups sum to
    the error of the head in the original basis."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(300, 4, 64, generator=gen) * torch.linspace(0.2, 3, 64)
    x[:, :, 7] += 6  # an outlier channel
    errs = {}
    for fit in ("minmax", "lsq"):
        fmt = Int4KVFormat(64, group_size=32, scale_fit=fit)
        back = ref.dequantize_values(*ref.quantize(x, fmt, rotated), fmt, rotated)
        errs[fit] = ((back - x.float()) ** 2).sum(-1)
    scale = x.abs().amax(-1) * 2**-10  # fp16 rounding of the pair, per element
    assert (errs["lsq"] <= errs["minmax"] * 1.001 + 64 * scale**2).all()
    assert errs["lsq"].mean() < 0.97 * errs["minmax"].mean()


@pytest.mark.parametrize("mode", ["none", "k"])
def test_lsq_and_calibration_keep_nonfinite_and_constant_rows_finite(mode, device):
    fmt = Int4KVFormat(64, group_size=32, scale_fit="lsq", **MODES[mode])
    t, h, rows = 10, 2, 16
    k = torch.randn(t, h, 64, device=device)
    k[0, 0, 3], k[1, 0, :], k[2, 1, 5] = float("nan"), float("nan"), float("inf")
    k[3, 1, :], k[4, 0, 9], k[5, 0, :] = float("-inf"), 1e30, 2.5
    k[6, 1, :] = 0.0
    k = k.bfloat16()
    loc = torch.randperm(rows, device=device)[:t]
    for affine in (None, _affine(h, 64, device, 3)):
        bufs = run_and_compare(k, k.flip(0).clone(), loc, fmt, rows, exact=False, device=device)
        if affine is not None:
            bufs = poisoned_buffers(fmt, rows, h, device)
            quantize_and_store(k, k, loc, *bufs, fmt, k_affine=affine)
        for sc in (bufs[1], bufs[3]):
            assert torch.isfinite(sc[loc.long()].float()).all()
        if affine is None and mode == "none":  # constant row: (scale 0, min = value)
            assert bufs[1][loc[5], 0, :, 0].eq(0).all() and bufs[1][loc[5], 0, :, 1].eq(2.5).all()


def test_k_calibration_is_checked():
    fmt = Int4KVFormat(head_dim=64)
    bufs = fmt.alloc(8, 2) + fmt.alloc(8, 2)
    x = torch.randn(3, 2, 64, dtype=torch.bfloat16)
    mul, add = _affine(2, 64, "cpu", 0)
    with pytest.raises(ValueError, match="k_affine mul must be a contiguous fp32"):
        quantize_and_store(x, x, torch.arange(3), *bufs, fmt, k_affine=(mul.double(), add))
    with pytest.raises(ValueError, match="k_affine add"):
        quantize_and_store(x, x, torch.arange(3), *bufs, fmt, k_affine=(mul, add[:1]))
