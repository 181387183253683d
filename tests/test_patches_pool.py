"""The INT4 pool: SGLang's own MHATokenToKVPool with our quant method, on CPU."""

import types

import pytest
import torch

from saw_sglang.patches import apply_all

apply_all()

from sglang.srt.layers.radix_attention import RadixAttention  # noqa: E402
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool  # noqa: E402
from sglang.srt.model_executor.pool_configurator import DefaultPoolConfigurator  # noqa: E402

from saw_sglang.config import SawConfig  # noqa: E402
from saw_sglang.kernels import reference as ref  # noqa: E402
from saw_sglang.kernels.format import Int4KVFormat  # noqa: E402
from saw_sglang.patches import kv_pool  # noqa: E402
from saw_sglang.patches._util import original  # noqa: E402
from saw_sglang.patches.quant_method import SawInt4KVCacheMethod  # noqa: E402


def make_pool(fmt, heads=2, layers=2, size=64, page_size=1):
    return MHATokenToKVPool(
        size=size, page_size=page_size, dtype=torch.uint8, head_num=heads,
        head_dim=fmt.head_dim, layer_num=layers, device="cpu", enable_memory_saver=False,
        quant_method=SawInt4KVCacheMethod(fmt),
    )


FMTS = [
    Int4KVFormat(head_dim=64),
    Int4KVFormat(head_dim=64, rotation="none"),
    Int4KVFormat(head_dim=128, group_size=32, block_size=64, rotate_v=True),
]


@pytest.mark.parametrize("fmt", FMTS, ids=lambda f: f.describe()[:40])
def test_set_kv_buffer_writes_and_reads_back(fmt):
    torch.manual_seed(0)
    heads, layers = 2, 2
    pool = make_pool(fmt, heads, layers)
    assert pool.quant_method.fmt is fmt and pool.is_quantized_kv_cache
    for layer_id in range(layers):
        layer = RadixAttention(num_heads=heads, head_dim=fmt.head_dim, scaling=0.1,
                               num_kv_heads=heads, layer_id=layer_id)
        t = 13
        k = torch.randn(t, heads, fmt.head_dim, dtype=torch.bfloat16)
        k[..., 5] *= 20  # an outlier channel
        v = torch.randn(t, heads, fmt.head_dim, dtype=torch.bfloat16)
        loc = torch.randperm(pool.size)[:t] + 1
        k0, v0 = k.clone(), v.clone()
        pool.set_kv_buffer(layer, loc, k, v)
        assert torch.equal(k, k0) and torch.equal(v, v0), "the write modified its inputs"

        kd, vd, ks, vs = pool.get_raw_kv_buffer(layer_id)
        assert kd.dtype == torch.uint8 and kd.shape == fmt.data_shape(pool.size + 1, heads)
        assert ks.dtype == torch.float16 and ks.shape == fmt.scale_shape(pool.size + 1, heads)
        # same bytes as the reference quantiser (codes may differ by one step at
        # rounding ties when the Triton kernel is the writer)
        want = [t_.clone() for t_ in (kd, ks, vd, vs)]
        ref.quantize_and_store_ref(k, v, loc, want[0], want[1], want[2], want[3], fmt)
        torch.testing.assert_close(ks[loc], want[1][loc], rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(vs[loc], want[3][loc], rtol=1e-3, atol=1e-3)
        codes = ref.unpack_codes(kd[loc], fmt).int() - ref.unpack_codes(want[0][loc], fmt).int()
        assert codes.abs().max() <= 1

        # read back: within INT4 step of the input (error bound: half a step per
        # group, rotation is orthonormal so the bound holds in norm)
        back_k, back_v = pool.quant_method.dequantize_prev_kv(kd[loc], ks[loc], vd[loc], vs[loc], layer_id)
        for x, y, d, s, rot in ((k, back_k, kd, ks, fmt.k_rotated), (v, back_v, vd, vs, fmt.v_rotated)):
            # the method's read equals the reference dequantisation of the same bytes
            want_y = ref.dequantize_ref(d, s, loc, fmt, rot, dtype=torch.float32)
            torch.testing.assert_close(y.float(), want_y, rtol=1e-2, atol=1e-2)
            # and is within one INT4 step per element of what was written (norm bound;
            # the rotation is orthonormal, so it holds in either basis)
            err = (y.float() - x.float()).norm(dim=-1)
            bound = s[loc][..., 0].float().amax(-1) * fmt.head_dim**0.5
            assert (err <= bound + 1e-2).all()


def test_hot_path_reads_never_dequantize():
    fmt = FMTS[0]
    pool = make_pool(fmt)
    assert not pool.quant_method.needs_plain_kv_dequant_read()
    assert not pool.quant_method.needs_dequant_workspace()
    kb, vb = pool.get_key_buffer(0), pool.get_value_buffer(0)
    assert kb.data_ptr() == pool.k_buffer[0].data_ptr()  # the packed buffer, no copy
    assert vb.dtype == torch.uint8


def test_slot_moves_and_size_include_scales():
    """move_kv_cache (EAGLE, radix moves) copies data and scale rows: run SGLang's own
    tiled slot-copy kernel (the GPU path) over the pool's pointer table."""
    from sglang.kernels.ops.kvcache.cache_move import copy_all_layer_kv_cache_tiled

    fmt = Int4KVFormat(head_dim=64, group_size=16)
    pool = make_pool(fmt, heads=2, layers=2, size=32)
    layer = RadixAttention(num_heads=2, head_dim=64, scaling=0.1, num_kv_heads=2, layer_id=1)
    src = torch.tensor([3, 4, 5])
    pool.set_kv_buffer(layer, src, torch.randn(3, 2, 64, dtype=torch.bfloat16),
                      torch.randn(3, 2, 64, dtype=torch.bfloat16))
    tgt = torch.tensor([20, 21, 22])
    assert len(pool._slot_move_pointer_buffers()) == 4 * 2  # k, v, k scales, v scales
    stride0 = int(pool.data_strides[0])
    assert int(pool.data_strides.max()) <= stride0  # tile span covers the scale rows
    tile = 128
    grid = (pool.data_ptrs.numel(), (stride0 + tile - 1) // tile)
    copy_all_layer_kv_cache_tiled[grid](
        pool.data_ptrs, pool.data_strides, tgt, src, 3, 4, BYTES_PER_TILE=tile
    )
    for buf in (pool.k_buffer, pool.v_buffer, pool.k_scale_buffer, pool.v_scale_buffer):
        assert torch.equal(buf[1][tgt], buf[1][src]) and buf[1][src].abs().sum() > 0
    rows = pool.size + pool.page_size
    k_bytes, v_bytes = pool.get_kv_size_bytes()
    assert k_bytes == v_bytes == 2 * rows * 2 * fmt.bytes_per_token_head  # 2 layers, 2 heads


@pytest.mark.parametrize("head_dim,heads,layers", [(128, 8, 36), (64, 3, 30)])
def test_cell_size_patched_and_ratio(head_dim, heads, layers, monkeypatch):
    """DefaultPoolConfigurator._compute_cell_size returns INT4 bytes per token."""
    from sglang.srt.model_executor import pool_configurator as pc

    monkeypatch.setattr(pc, "get_parallel", lambda: types.SimpleNamespace(attn_tp_size=1))
    import sglang.srt.runtime_context as rc

    monkeypatch.setattr(rc, "get_parallel", lambda: types.SimpleNamespace(attn_tp_size=1))
    mc = types.SimpleNamespace(
        head_dim=head_dim, v_head_dim=head_dim, hf_config=types.SimpleNamespace(architectures=["LlamaForCausalLM"]),
        get_num_kv_heads=lambda tp: heads,
    )

    def kvc(dtype_str, dtype):
        return types.SimpleNamespace(
            model_config=mc, kv_cache_dtype=dtype, kv_cache_dtype_str=dtype_str,
            server_args=types.SimpleNamespace(kv_cache_dtype=dtype_str,
                                              enable_dsa_cache_layer_split=False),
            use_mla_backend=False, is_draft_worker=False,
        )

    conf = object.__new__(DefaultPoolConfigurator)
    conf.kv_cache_dtype_str = "bf16"
    bf16 = conf._compute_cell_size(kvc("bf16", torch.bfloat16), layers)
    assert bf16 == original(DefaultPoolConfigurator._compute_cell_size)(
        conf, kvc("bf16", torch.bfloat16), layers) == 2 * layers * heads * head_dim * 2
    int4 = conf._compute_cell_size(kvc("int4", torch.uint8), layers)
    fmt = Int4KVFormat(head_dim=head_dim)
    assert int4 == fmt.bytes_per_token(heads, layers)
    if head_dim == 128:
        assert bf16 / int4 >= 3.7
    rep = kv_pool.capacity_report(fmt, heads, layers, tokens=1_000_000)
    assert rep["bf16_tokens_same_memory"] == 1_000_000 * int4 // bf16
    assert "B/token" in kv_pool.describe_report(rep)


def test_configurator_builds_int4_pool(tmp_path, monkeypatch):
    """KVCacheConfigurator._build_mha_kv_pool hands our quant method to the pool."""
    from sglang.srt.mem_cache import kv_cache_configurator as kc
    from sglang.srt.mem_cache.kv_cache_configurator import KVCacheConfigurator

    bag = types.SimpleNamespace(
        prefill_only_disable_kv_cache=False, attn_tp_size=1,
        features=types.SimpleNamespace(enable_memory_saver=False),
        enable_pdmux=False, speculative_algorithm=None,
    )
    for getter in ("get_schedule", "get_parallel", "get_exec", "get_disagg", "get_spec"):
        monkeypatch.setattr(kc, getter, lambda: bag)
    mc = types.SimpleNamespace(head_dim=64, v_head_dim=64, get_num_kv_heads=lambda tp: 3)
    kvc = types.SimpleNamespace(
        kv_cache_dtype=torch.uint8, kv_cache_dtype_str="int4", model_config=mc,
        server_args=types.SimpleNamespace(kv_cache_dtype="int4", saw_rotation="none",
                                          saw_group_size=32),
        pool_page_size=1, device="cpu", post_capture_kv_active=False,
        layer_info=types.SimpleNamespace(num_effective_layers=2, start_layer=0, end_layer=2),
    )
    build = KVCacheConfigurator._build_mha_kv_pool
    pool = build(kvc, max_total_num_tokens=40, mha_pool_class=MHATokenToKVPool)
    assert type(pool) is MHATokenToKVPool
    assert pool.quant_method.fmt == SawConfig(saw_rotation="none", saw_group_size=32).fmt(64)
    assert kv_pool.LAST_REPORT["max_total_num_tokens"] == 40
    # inert for other dtypes: no quant method
    kvc.kv_cache_dtype_str, kvc.kv_cache_dtype = "bf16", torch.bfloat16
    kvc.server_args.kv_cache_dtype = "bf16"
    plain = build(kvc, max_total_num_tokens=40, mha_pool_class=MHATokenToKVPool)
    assert not plain.is_quantized_kv_cache


def test_k_calibration_write_and_fallback_read():
    """A pool with a K calibration: each layer's K is written as (k - mean) / scale
    (that layer's factors, found by its buffer), V as without, and the fallback read
    undoes it; a pipeline stage's first buffer is model layer start_layer."""
    from saw_sglang.kernels.calibration import KCalibration

    fmt = Int4KVFormat(head_dim=64)
    g = torch.Generator().manual_seed(2)
    cal = KCalibration(torch.randn(4, 2, 64, generator=g) * 3, torch.rand(4, 2, 64, generator=g) + 0.5)
    pool = MHATokenToKVPool(size=32, page_size=1, dtype=torch.uint8, head_num=2, head_dim=64, layer_num=2,
                            device="cpu", enable_memory_saver=False,
                            quant_method=SawInt4KVCacheMethod(fmt, cal, start_layer=2))
    for layer_id in range(2):
        layer = RadixAttention(num_heads=2, head_dim=64, scaling=0.1, num_kv_heads=2, layer_id=layer_id)
        k = (torch.randn(9, 2, 64) * 4 + cal.mean[2 + layer_id]).bfloat16()
        v = torch.randn(9, 2, 64).bfloat16()
        loc = torch.randperm(32)[:9] + 1
        pool.set_kv_buffer(layer, loc, k, v)
        kd, vd, ks, vs = pool.get_raw_kv_buffer(layer_id)
        want = [t.clone() for t in (kd, ks, vd, vs)]
        ref.quantize_and_store_ref(k, v, loc, *want, fmt, k_affine=cal.write_affine(2 + layer_id))
        torch.testing.assert_close(ks[loc], want[1][loc], rtol=1e-3, atol=1e-3)
        assert torch.equal(vs[loc], want[3][loc]) and torch.equal(vd[loc], want[2][loc])
        back_k, _ = pool.quant_method.dequantize_prev_kv(kd[loc], ks[loc], vd[loc], vs[loc], layer_id)
        err = (back_k.float() - k.float()).norm(dim=-1)
        bound = (ks[loc][..., 0].float().amax(-1) * 64**0.5) * cal.scale[2 + layer_id].max()
        assert (err <= bound + 1e-2).all()
        # the readers' factors, by model layer
        mean, scale = pool.quant_method.read_calibration(2 + layer_id)
        assert torch.equal(mean, cal.mean[2 + layer_id]) and torch.equal(scale, cal.scale[2 + layer_id])
    assert pool.quant_method.read_calibration(0) == (None, None)  # not this stage's layer
    shift_only = SawInt4KVCacheMethod(fmt, cal.without_scale(), start_layer=2)
    MHATokenToKVPool(size=8, page_size=1, dtype=torch.uint8, head_num=2, head_dim=64, layer_num=2,
                     device="cpu", enable_memory_saver=False, quant_method=shift_only)
    mean, scale = shift_only.read_calibration(3)
    assert scale is None and torch.equal(mean, cal.mean[3])
    with pytest.raises(ValueError, match="does not fit this pool"):
        MHATokenToKVPool(size=8, page_size=1, dtype=torch.uint8, head_num=3, head_dim=64, layer_num=2,
                         device="cpu", enable_memory_saver=False, quant_method=SawInt4KVCacheMethod(fmt, cal))


def test_rank_heads_follow_sglang_layout():
    assert [kv_pool.rank_heads(8, 2, r) for r in range(2)] == [(0, 4), (4, 4)]
    assert [kv_pool.rank_heads(3, 6, r) for r in range(6)] == [(0, 1), (0, 1), (1, 1), (1, 1), (2, 1), (2, 1)]
    assert kv_pool.rank_heads(3, 1, 0) == (0, 3)


@pytest.mark.parametrize("cap", [0.0, 50.0])
def test_rank_calibration_slices_heads_and_drops_the_mean_under_a_soft_cap(tmp_path, monkeypatch, cap):
    """Each attention-TP rank gets its KV heads of the file; a model with an attention
    logit soft-cap keeps the scale (exact) but not the mean (not exact under tanh)."""
    from types import SimpleNamespace as NS

    import sglang.srt.runtime_context as rc

    from saw_sglang.kernels.calibration import KCalibration

    g = torch.Generator().manual_seed(4)
    cal = KCalibration(torch.randn(2, 4, 64, generator=g), torch.rand(2, 4, 64, generator=g) + 0.5)
    path = tmp_path / "k.pt"
    cal.save(path)
    mc = NS(get_total_num_kv_heads=lambda: 4, hf_text_config=NS(attn_logit_softcapping=cap or None))
    monkeypatch.setattr(rc, "get_parallel", lambda: NS(attn_tp_size=2, attn_tp_rank=1))
    got = kv_pool.rank_calibration(str(path), mc)
    assert torch.equal(got.scale, cal.scale[:, 2:4])
    assert torch.equal(got.mean, torch.zeros_like(cal.mean[:, 2:4]) if cap else cal.mean[:, 2:4])
