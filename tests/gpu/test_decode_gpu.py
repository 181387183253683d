"""INT4 decode attention on the GPU at real sizes, and CUDA-graph capture + replay.
Same tolerances as tests/test_decode.py (see its docstring)."""

import pytest
import torch

from saw_sglang.kernels import reference as ref
from saw_sglang.kernels.decode import alloc_workspace, decode_attention
from saw_sglang.kernels.testing import errors, make_case

pytestmark = pytest.mark.gpu
MAX_ABS, MAX_REL = 2e-2, 5e-3


def run_check(case, splits=(None, 1, 7), logit_cap=0.0, **kw):
    """Every split count against the fp32 reference (decode_impl's choice by default)."""
    sm = ref.default_sm_scale(case["q"].shape[-1])
    expect = ref.decode_attention_ref(sm_scale=sm, logit_cap=logit_cap, **case)
    for s in splits:
        out = decode_attention(sm_scale=sm, logit_cap=logit_cap, num_splits=s, **case, **kw)
        mx, rel = errors(out, expect)
        tol = 2 if case["q"].dtype == torch.bfloat16 else 1
        assert mx <= MAX_ABS * tol and rel <= MAX_REL * tol, (s, mx, rel)


def ragged(b, ctx, seed):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, ctx + 1, (b,), generator=g).tolist()
    lens[0] = ctx
    if b > 2:
        lens[1] = 0
    return lens


@pytest.mark.parametrize("b, ctx", [(1, 8192), (16, 4096), (64, 2048)])
@pytest.mark.parametrize("page", [1, 16])
@pytest.mark.parametrize("rot", ["none", "k", "kv"])
def test_real_sizes_d128(b, ctx, page, rot):
    case = make_case(ragged(b, ctx, b + page), 32, 8, 128, page=page,
                     rotation="none" if rot == "none" else "hadamard", rotate_v=rot == "kv",
                     dtype=torch.bfloat16, device="cuda", seed=b)
    run_check(case)


@pytest.mark.parametrize("d, group, hq, hkv", [(64, 64, 9, 3), (64, 32, 16, 2), (256, 256, 16, 4),
                                               (128, 32, 32, 8), (128, 64, 8, 8)])
def test_head_dims_groups_gqa(d, group, hq, hkv):
    case = make_case(ragged(12, 3000, d), hq, hkv, d, group=group, rotate_v=True,
                     dtype=torch.float16, device="cuda", seed=d + group)
    run_check(case)


def test_logit_cap_and_tuning_knobs():
    case = make_case(ragged(8, 5000, 3), 32, 8, 128, dtype=torch.bfloat16, device="cuda", seed=3)
    run_check(case, logit_cap=30.0)
    for bn, nw, ns in [(32, 4, 2), (128, 8, 4), (64, 8, 3)]:
        run_check(case, splits=(4,), block_n=bn, num_warps=nw, num_stages=ns, impl="triton")
    for bh in (4, 8, 16):  # query rows padded to 4 / 8 / 16
        run_check(case, splits=(1, 4), block_h=bh, impl="triton")
        run_check(case, splits=(4,), logit_cap=30.0, block_h=bh, impl="triton")


# ---- the tensor-core kernel (decode_mma) at every head layout of the benchmark matrix --
@pytest.mark.parametrize("hq, hkv, d", [(32, 8, 128), (64, 8, 128), (32, 32, 128), (9, 3, 64), (16, 8, 256),
                                        (32, 2, 128), (16, 1, 64)])
@pytest.mark.parametrize("page", [1, 16])
@pytest.mark.parametrize("rot", ["none", "k", "kv"])
def test_mma_kernel_head_layouts(hq, hkv, d, page, rot):
    case = make_case(ragged(6, 3000, hq + d + page), hq, hkv, d, page=page,
                     rotation="none" if rot == "none" else "hadamard", rotate_v=rot == "kv",
                     dtype=torch.bfloat16, device="cuda", seed=hq + hkv + d)
    run_check(case, splits=(None, 1, 5), impl="mma")


@pytest.mark.parametrize("knobs", [dict(block_n=64), dict(block_n=16, stages=4), dict(heads=1), dict(heads=8),
                                   dict(stages=2, waves=1), dict(min_blocks=1)])
def test_mma_kernel_tuning_knobs_and_cap(knobs):
    case = make_case(ragged(8, 5000, 3) + [1, 65], 32, 8, 128, dtype=torch.bfloat16, device="cuda", seed=4)
    run_check(case, splits=(None, 1, 9), impl="mma", **knobs)
    run_check(case, splits=(None, 4), impl="mma", logit_cap=30.0, **knobs)


def test_mma_kernel_long_single_request_and_repeated_slots():
    case = make_case([40000], 32, 8, 128, dtype=torch.bfloat16, device="cuda", seed=8)
    run_check(case, splits=(None, 1, 64, 256), impl="mma")
    case = make_case([3000, 700, 0], 32, 8, 128, page=16, repeat=True, dtype=torch.bfloat16, device="cuda", seed=9)
    run_check(case, impl="mma")


def test_one_compiled_variant_per_layout():
    """After kernels.warmup.warm_up, decode of any batch size, length, split count and
    write/dequantise of any token count compile nothing more (the per-call integers are
    not specialised on)."""
    from saw_sglang.kernels import quantize
    from saw_sglang.kernels.warmup import compiled_variants, warm_up
    case = make_case([5], 32, 8, 128, dtype=torch.bfloat16, device="cuda", seed=10)
    kd, ks, vd, vs, fmt = case["k_data"], case["k_scales"], case["v_data"], case["v_scales"], case["fmt"]
    warm_up(fmt, 32, 8, kd, ks, vd, vs, page_size=1, dtype=torch.bfloat16)
    torch.cuda.synchronize()
    before = compiled_variants()
    for lens in ([1], [3, 17], [1000] * 16, [70] * 33, [4097, 1, 0]):
        c = make_case(lens, 32, 8, 128, dtype=torch.bfloat16, device="cuda", seed=len(lens))
        for s in (None, 1, 3, 16, 17):
            decode_attention(sm_scale=0.1, num_splits=s, **c)
        t = sum(lens) or 1
        x = torch.randn(t, 8, 128, device="cuda", dtype=torch.bfloat16)
        loc = torch.arange(t, device="cuda") + 1
        quantize.quantize_and_store(x, x, loc, c["k_data"], c["k_scales"], c["v_data"], c["v_scales"], c["fmt"])
        quantize.dequantize(c["k_data"], c["k_scales"], loc, c["fmt"], True)
    torch.cuda.synchronize()
    assert compiled_variants() == before


def test_cuda_graph_capture_and_replay_with_changing_inputs():
    b, hq, hkv, d, max_ctx, page = 16, 32, 8, 128, 4096, 16
    pool = make_case([max_ctx] * b, hq, hkv, d, page=page, rotate_v=True,
                     dtype=torch.bfloat16, device="cuda", seed=1)
    n_pages = pool["k_data"].shape[0] // page
    static = dict(pool)  # static q / indptr / indices / lens buffers, refilled before each replay
    static.update(q=pool["q"].clone(), kv_indptr=pool["kv_indptr"].clone(),
                  kv_indices=pool["kv_indices"].clone(), kv_lens=pool["kv_lens"].clone())
    ws = alloc_workspace(b, hq, d, 32, "cuda")
    out = torch.empty_like(static["q"])
    sm = ref.default_sm_scale(d)
    call = dict(sm_scale=sm, out=out, workspace=ws, num_splits=20, **static)
    decode_attention(**call)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        decode_attention(**call)
    g = torch.Generator().manual_seed(5)
    for step in range(4):
        lens = torch.randint(0, max_ctx + 1, (b,), generator=g)
        lens[step] = max_ctx
        pages = (lens + page - 1) // page
        indptr = torch.zeros(b + 1, dtype=torch.int32)
        indptr[1:] = torch.cumsum(pages, 0)
        idx = (torch.randperm(n_pages - 1, generator=g)[: int(indptr[-1])] + 1).to(torch.int32)
        static["kv_indices"].zero_()
        static["kv_indices"][: idx.numel()].copy_(idx)
        static["kv_indptr"].copy_(indptr)
        static["kv_lens"].copy_(lens.to(torch.int32))
        static["q"].copy_(torch.randn(b, hq, d, generator=g).to(torch.bfloat16))
        graph.replay()
        torch.cuda.synchronize()
        expect = ref.decode_attention_ref(**{**static, "sm_scale": sm})
        mx, rel = errors(out, expect)
        assert mx <= 2 * MAX_ABS and rel <= 2 * MAX_REL, (step, mx, rel)


@pytest.mark.parametrize("page", [1, 16])
@pytest.mark.parametrize("rot, hq, hkv", [("none", 32, 8), ("k", 32, 8), ("kv", 32, 32), ("k", 32, 4)])
def test_qk_int8_real_sizes(page, rot, hq, hkv):
    """qk_int8=True on the GPU (inline-PTX int8 unpack, IMMA) against the reference with
    the same query rounding (same tolerances as the fp16 path), and within the CPU
    test's bound (3% relative) of the exact reference."""
    case = make_case(ragged(16, 4096, 7 + page), hq, hkv, 128, page=page,
                     rotation="none" if rot == "none" else "hadamard", rotate_v=rot == "kv",
                     dtype=torch.bfloat16, device="cuda", seed=page)
    sm = ref.default_sm_scale(128)
    expect = ref.decode_attention_ref(sm_scale=sm, q_int8=True, **case)
    exact = ref.decode_attention_ref(sm_scale=sm, **case)
    for s in (None, 1, 7):
        out = decode_attention(sm_scale=sm, num_splits=s, qk_int8=True, **case)
        mx, rel = errors(out, expect)
        assert mx <= 2 * MAX_ABS and rel <= 2 * MAX_REL, (s, mx, rel)
        assert errors(out, exact)[1] <= 3e-2, s


@pytest.mark.parametrize("hq, hkv, d, page", [(32, 8, 128, 1), (32, 8, 128, 16), (9, 3, 64, 1), (16, 8, 256, 16),
                                             (64, 8, 128, 1)])
def test_prefix_through_decode_kernels(hq, hkv, d, page):
    """kernels.prefix_decode (new tokens packed into the tensor-core decode kernel's query
    heads) against the reference at real prefix lengths, lse included."""
    from saw_sglang.kernels.format import Int4KVFormat
    from saw_sglang.kernels.prefix_decode import prefix_attention
    from saw_sglang.kernels.testing import check_prefix, make_cache, make_queries
    gen = torch.Generator().manual_seed(hq + d + page)
    fmt = Int4KVFormat(head_dim=d)
    cache, _, _ = make_cache(fmt, hkv, [3000, 1, 0, 700], page, gen, device="cuda")
    q, qo = make_queries([1, 9, 4, 33], hq, d, gen, device="cuda")
    check_prefix(q, qo, cache, fmt, page, fn=prefix_attention, max_q_len=33, max_kv_len=3000)
