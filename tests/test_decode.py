"""INT4 split-KV decode attention (Triton, interpreter on CPU) vs the fp32 reference.

Tolerance: the kernel feeds fp16 operands to the dots (q rounded to fp16: rel. 2^-11;
p and p*scale_v rounded to fp16; with groups smaller than head_dim the dequantised K/V
are fp16 too) and accumulates in fp32. Against outputs of size ~0.3-1 that is a few 1e-3
at worst, so we require max |err| <= 2e-2 and relative Frobenius error <= 5e-3 vs the
fp32 reference over the same quantised cache (the quantisation error itself is common
to both and does not count). A wrong slot, nibble, scale or split merge gives errors
of order 1e-1..1.
"""

import pytest
import torch

from saw_sglang.kernels import reference as ref
from saw_sglang.kernels.decode import (DecodePlan, alloc_workspace, choose_num_splits, decode_attention,
                                       decode_impl, head_group, plan_splits)
from saw_sglang.kernels.testing import errors, make_case

MAX_ABS, MAX_REL = 2e-2, 5e-3


def check(case, sm_scale=None, logit_cap=0.0, splits=(1, 3), block_n=16, **kw):
    d = case["q"].shape[-1]
    sm_scale = sm_scale or ref.default_sm_scale(d)
    expect = ref.decode_attention_ref(sm_scale=sm_scale, logit_cap=logit_cap, **case)
    outs = []
    for s in splits:
        out = decode_attention(sm_scale=sm_scale, logit_cap=logit_cap, num_splits=s,
                               block_n=block_n, **case, **kw)
        assert out.dtype == case["q"].dtype and out.shape == case["q"].shape
        mx, rel = errors(out, expect)
        assert mx <= MAX_ABS and rel <= MAX_REL, (s, mx, rel)
        outs.append(out.float())
    for o in outs[1:]:  # several split counts give the same result
        assert (o - outs[0]).abs().max().item() <= 1e-2
    return outs[0]


@pytest.mark.parametrize("hq, hkv", [(4, 4), (8, 2), (8, 1)])
@pytest.mark.parametrize("d", [64, 128])
def test_gqa_ratios_and_head_dims(hq, hkv, d):
    check(make_case([37, 9], hq, hkv, d, rotation="none", seed=hq + d))


@pytest.mark.parametrize("rotation, rotate_v", [("none", False), ("hadamard", False), ("hadamard", True)])
@pytest.mark.parametrize("group", [None, 32])
def test_rotation_modes_and_group_sizes(rotation, rotate_v, group):
    check(make_case([45, 18], 8, 2, 64, group=group, rotation=rotation, rotate_v=rotate_v, seed=3))


def test_head_dim_128_group_32_rotated_kv():
    check(make_case([29, 50], 4, 1, 128, group=32, rotate_v=True, seed=5))


@pytest.mark.parametrize("page", [1, 16])
def test_page_sizes_ragged_batch_with_empty_request(page):
    case = make_case([70, 0, 17], 8, 2, 64, page=page, rotate_v=True, seed=7)
    out = check(case, splits=(1, 2, 5))
    assert out[1].abs().max().item() == 0.0  # kv_len 0 -> output 0


def test_repeated_slots():
    check(make_case([40, 33], 8, 2, 64, repeat=True, seed=11))


def test_small_hadamard_block():
    case = make_case([40], 4, 2, 64, seed=12)
    fmt = case["fmt"].__class__(head_dim=64, block_size=16, rotate_v=True)
    rows = case["k_data"].shape[0]
    g = torch.Generator().manual_seed(1)
    k, v = torch.randn(rows, 2, 64, generator=g), torch.randn(rows, 2, 64, generator=g)
    ref.quantize_and_store_ref(k, v, torch.arange(rows), case["k_data"], case["k_scales"],
                               case["v_data"], case["v_scales"], fmt)
    check({**case, "fmt": fmt})


@pytest.mark.parametrize("cap", [5.0, 30.0])
def test_logit_cap(cap):
    check(make_case([33, 12], 8, 2, 64, seed=13), sm_scale=0.3, logit_cap=cap)


def test_bf16_queries_workspace_and_out_buffer():
    case = make_case([24, 51], 8, 2, 64, dtype=torch.bfloat16, seed=17)
    ws = alloc_workspace(4, 8, 64, 8, "cpu")
    out = torch.full_like(case["q"], float("nan"))
    expect = ref.decode_attention_ref(sm_scale=0.125, **case)
    res = decode_attention(sm_scale=0.125, out=out, workspace=ws, num_splits=4, block_n=16, **case)
    assert res.data_ptr() == out.data_ptr()
    mx, rel = errors(out, expect)
    assert mx <= 3e-2 and rel <= 8e-3  # bf16 output rounding (2^-8) on top


def test_split_policy_is_host_only_and_bounded():
    # programs = batch x head groups; splits ~ waves x SMs / programs, capped
    assert choose_num_splits(2, 132, waves=2) == 132
    assert choose_num_splits(1, 132, waves=8, max_splits=64) == 64
    assert choose_num_splits(512, 132, waves=2) == 1
    assert choose_num_splits(32, 132, waves=2) == 9
    assert choose_num_splits(2, 132, max_kv_len=100, block_n=32, min_blocks=4) == 1
    assert choose_num_splits(2, 132, max_kv_len=32768, block_n=32, min_blocks=4) == 132
    assert all(1 <= choose_num_splits(b, 132) <= 256 for b in (1, 2, 3, 7, 64, 1000))


def test_head_groups_and_impl_choice():
    assert [head_group(h, 4) for h in (1, 2, 3, 8, 32, 6)] == [1, 2, 4, 4, 4, 2]
    # odd head counts: padded to a power of two (the extra warps masked), not one-warp programs
    assert [head_group(h, 4) for h in (3, 5, 7, 9)] == [4, 4, 4, 4]
    assert [head_group(h, 4, pad=False) for h in (3, 5, 6)] == [1, 1, 2]
    fmt = make_case([4], 8, 2, 64, seed=1)["fmt"]
    assert decode_impl("cpu", fmt, 4) == "triton"  # the tensor-core kernel needs CUDA
    # the policy counts programs: 4 KV-head warps per tensor-core program, one head per
    # portable program (so the tensor-core plan has 4x fewer programs to fill the GPU with)
    assert plan_splits(1, 8, fmt, "cpu", None, 32, "mma", waves=2) == choose_num_splits(2, 132, 2)
    assert plan_splits(1, 8, fmt, "cpu", None, 32, "triton", waves=2) == choose_num_splits(8, 132, 2)
    # a padded program (3 heads in 4 warps) counts as one; unpadded one-warp programs as 1/4
    assert plan_splits(4, 3, fmt, "cpu", None, 9, "mma", waves=2) == choose_num_splits(4, 132, 2)
    assert plan_splits(4, 3, fmt, "cpu", None, 9, "mma", waves=2, pad=False) == choose_num_splits(3, 132, 2)
    assert choose_num_splits(0.25, 132, waves=2, max_splits=4096) == 1056
    with pytest.raises(ValueError, match="unknown triton decode knob"):
        decode_attention(**make_case([8], 8, 2, 64, seed=1), sm_scale=0.1, stages=3)
    with pytest.raises(ValueError, match="impl"):
        decode_attention(**make_case([8], 8, 2, 64, seed=1), sm_scale=0.1, impl="cuda")


def test_decode_plan_runs_without_allocating():
    case = make_case([40, 0, 75], 8, 2, 64, seed=9)
    plan = DecodePlan(case["fmt"], 8, 2, "cpu", page_size=1)
    s = plan.plan(3, max_kv_len=75, num_splits=3)
    ws = plan.workspace
    assert s == 3 and ws.fits(3, 8, 64, 3)
    args = {k: case[k] for k in ("q", "k_data", "k_scales", "v_data", "v_scales", "kv_indptr",
                                 "kv_indices", "kv_lens")}
    out = plan.run(**args, sm_scale=0.125)
    assert plan.workspace is ws  # run() reuses the planned workspace
    expect = ref.decode_attention_ref(sm_scale=0.125, **case)
    mx, rel = errors(out, expect)
    assert mx <= MAX_ABS and rel <= MAX_REL
    assert plan.plan(2, num_splits=2) == 2 and plan.workspace is ws  # fits: kept


def test_bad_inputs_are_refused():
    case = make_case([8], 8, 2, 64, seed=1)
    with pytest.raises(ValueError, match="head_dim"):
        decode_attention(**{**case, "q": case["q"][..., :32]}, sm_scale=0.1)
    with pytest.raises(ValueError, match="workspace"):
        decode_attention(**case, sm_scale=0.1, num_splits=8, workspace=alloc_workspace(1, 8, 64, 4, "cpu"))
    small = make_case([8], 8, 2, 64, group=16, seed=1)  # a valid format the kernels do not read
    with pytest.raises(ValueError, match="groups of at least 32"):
        decode_attention(**small, sm_scale=0.1)


@pytest.mark.parametrize("page", [1, 16])
def test_without_prefetch(page):
    """The single-buffered loop (prefetch=False, fewer registers) computes the same."""
    case = make_case([70, 0, 33], 8, 2, 128, page=page, seed=11 + page)
    check(case, prefetch=False)


@pytest.mark.parametrize("block_h, page, rotation, cap", [
    (4, 1, "hadamard", 0.0), (8, 16, "none", 0.0), (16, 1, "hadamard", 20.0), (8, 1, "none", 5.0)])
def test_query_row_padding_and_prescaled_q(block_h, page, rotation, cap):
    """Query rows padded to 4/8/16 (the block_h knob), q pre-multiplied by the softmax
    scale on both q paths (rotated and plain) and with the soft-cap: same results."""
    case = make_case([37, 20], 8, 2, 128, page=page, rotation=rotation, seed=block_h + page)
    check(case, sm_scale=0.2 if cap else None, logit_cap=cap, splits=(1, 2), block_h=block_h)


# ---- INT8 q.k variant (qk_int8=True) --------------------------------------------------
# Against the reference with the same query rounding (reference.round_query_int8) the
# kernel differs only by fp16 p / p*scale_v operands and fp32 sums, as the fp16 path: the
# same MAX_ABS / MAX_REL hold. Against the exact reference the rounded query adds a
# score error (q^ - q).k with |q^ - q| <= amax|q| / 254 per channel: measured ~1% relative
# output error at these shapes, so the bound below is 3% (a wrong nibble plane, scale or
# step gives 30%+).
Q8_EXACT_REL, Q8_EXACT_ABS = 3e-2, 1.5e-1


@pytest.mark.parametrize("hq, hkv, d, page, rotation", [
    (4, 4, 64, 1, "hadamard"), (8, 2, 64, 16, "none"), (8, 1, 64, 1, "none"),
    (4, 4, 128, 16, "none"), (8, 2, 128, 1, "hadamard"), (8, 1, 128, 16, "hadamard")])
def test_qk_int8_matches_rounded_query_reference(hq, hkv, d, page, rotation):
    case = make_case([45, 0, 19], hq, hkv, d, page=page, rotation=rotation, seed=hq * d + page)
    sm = ref.default_sm_scale(d)
    expect = ref.decode_attention_ref(sm_scale=sm, q_int8=True, **case)
    exact = ref.decode_attention_ref(sm_scale=sm, **case)
    for s in (1, 3):
        out = decode_attention(sm_scale=sm, num_splits=s, block_n=16, qk_int8=True, **case)
        mx, rel = errors(out, expect)
        assert mx <= MAX_ABS and rel <= MAX_REL, (s, mx, rel)
        mx, rel = errors(out, exact)
        assert mx <= Q8_EXACT_ABS and rel <= Q8_EXACT_REL, (s, mx, rel)
        assert out[1].abs().max().item() == 0.0  # kv_len 0 -> output 0


def test_qk_int8_rounding_is_what_the_kernel_does():
    """The rounded-query reference is distinguishable from the exact one (so the test
    above checks the rounding, not only the attention), and the kernel sides with it."""
    case = make_case([64], 4, 1, 128, seed=21)
    sm = ref.default_sm_scale(128)
    out = decode_attention(sm_scale=sm, num_splits=1, block_n=32, qk_int8=True, **case)
    expect = ref.decode_attention_ref(sm_scale=sm, q_int8=True, **case)
    exact = ref.decode_attention_ref(sm_scale=sm, **case)
    assert errors(expect, exact)[1] > 10 * errors(out, expect)[1]


def test_qk_int8_with_logit_cap_and_block_h():
    case = make_case([37, 20], 8, 2, 128, seed=23)
    expect = ref.decode_attention_ref(sm_scale=0.2, logit_cap=10.0, q_int8=True, **case)
    out = decode_attention(sm_scale=0.2, logit_cap=10.0, num_splits=2, block_n=16, qk_int8=True,
                           block_h=16, **case)
    mx, rel = errors(out, expect)
    assert mx <= MAX_ABS and rel <= MAX_REL, (mx, rel)


def test_qk_int8_refuses_small_groups():
    case = make_case([8], 4, 1, 64, group=32, seed=2)
    with pytest.raises(ValueError, match="qk_int8"):
        decode_attention(**case, sm_scale=0.1, qk_int8=True)


def test_round_query_int8_reference():
    """Codes in [-127, 127], the largest |entry| of each row maps to 127, zero rows stay 0."""
    fmt = make_case([4], 2, 1, 64, seed=3)["fmt"]
    q = torch.randn(3, 2, 64, generator=torch.Generator().manual_seed(4))
    q[1, 0] = 0.0
    qr = ref.round_query_int8(q, fmt)
    x, xr = ref.rotate(q, 64), ref.rotate(qr, 64)  # K's (rotated) basis
    step = x.abs().amax(-1, keepdim=True) / 127
    codes = xr / torch.where(step > 0, step, torch.ones_like(step))
    assert (codes - codes.round()).abs().max() < 1e-3
    assert codes.abs().max() <= 127 + 1e-3
    assert torch.allclose(codes.abs().amax(-1)[step[..., 0] > 0], torch.tensor(127.0))
    assert (xr - x).abs().max() <= step.max() / 2 + 1e-6
    assert qr[1, 0].abs().max() == 0


@pytest.mark.parametrize("page, block_n", [(32, 16), (16, 32)])
def test_pages_larger_and_smaller_than_the_block(page, block_n):
    """Slot arithmetic: a block inside one page (page > block_n) and pages inside a
    block (block_n a multiple of the page: page index split as n0 // P + offs // P)."""
    check(make_case([70, 5], 4, 2, 64, page=page, seed=page + block_n), block_n=block_n, splits=(1, 2))


# ---- the pieces around the split kernels: q' preparation and the split merge ----------
@pytest.mark.parametrize("d, hq, rotation, cap", [(128, 32, "hadamard", 0.0), (64, 9, "hadamard", 0.0),
                                                  (256, 16, "none", 0.0), (64, 4, "none", 30.0)])
def test_prepare_query_planes_and_sums(d, hq, rotation, cap):
    """q' = (q . H) * sm_scale (* log2 e without a soft-cap) as fp16: the low plane, the high
    plane / 16 (exact), sum(q') and 1024 sum of the stored planes (what the kernel's biased
    K codes need, so it must match the stored fp16 values exactly)."""
    from saw_sglang.kernels.decode import prepare_query
    from saw_sglang.kernels.format import Int4KVFormat
    fmt = Int4KVFormat(d, rotation=rotation)
    q = torch.randn(3, hq, d, generator=torch.Generator().manual_seed(d + hq)).to(torch.bfloat16)
    qp = torch.full((3, hq, d), float("nan"), dtype=torch.float16)
    qs = torch.full((3, hq, 2), float("nan"))
    prepare_query(q, fmt, 0.1, cap, qp, qs)
    x = ref.rotate(q.float(), fmt.block_size) if fmt.k_rotated else q.float()
    x = x * (0.1 if cap else 0.1 * 1.4426950408889634)
    lo, hi16 = qp[..., : d // 2].float(), qp[..., d // 2 :].float()
    assert (lo - x[..., : d // 2]).abs().max() <= 2e-3 * x.abs().max()
    assert (hi16 * 16 - x[..., d // 2 :]).abs().max() <= 2e-3 * x.abs().max()
    assert torch.allclose(qs[..., 0], lo.sum(-1) + (hi16 * 16).sum(-1), rtol=1e-5, atol=1e-4)
    assert torch.allclose(qs[..., 1], 1024 * (lo.sum(-1) + hi16.sum(-1)), rtol=1e-5, atol=1e-2)


@pytest.mark.parametrize("d, rot_v", [(64, False), (128, True), (128, False)])
def test_merge_splits_by_log_sum_exp(d, rot_v):
    """Active splits (from kv_lens and the split policy) merged by their base-2 lse; empty
    requests give 0; with V rotated the result goes back to the original basis."""
    import math
    from saw_sglang.kernels.decode import DecodeWorkspace, merge_splits
    from saw_sglang.kernels.format import Int4KVFormat
    g = torch.Generator().manual_seed(d)
    bsz, hq, S = 3, 4, 40
    ws = DecodeWorkspace(torch.randn(bsz, hq, S, d, generator=g), torch.randn(bsz, hq, S, generator=g) * 3,
                         None, None)
    lens = torch.tensor([0, 64 * 4 * 5 + 3, 64 * 4 * 40], dtype=torch.int32)
    fmt = Int4KVFormat(d, rotate_v=rot_v)
    out = torch.full((bsz, hq, d), float("nan"))
    merge_splits(out, ws, lens, fmt, S, block_n=64, min_blocks=4)
    for b in range(bsz):
        L = int(lens[b])
        split = max(-(-(-(-L // S)) // 64), 4) * 64
        n = -(-L // split)
        want = torch.zeros(hq, d) if n == 0 else (
            torch.softmax(ws.mid_lse[b, :, :n] * math.log(2), -1)[..., None] * ws.mid_o[b, :, :n]).sum(1)
        if rot_v:
            want = ref.rotate(want, fmt.block_size)
        assert torch.allclose(out[b], want, atol=1e-5), (b, n)
