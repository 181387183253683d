"""CPU tests of the INT4 attention backends (patches/attention_{flashinfer,triton}.py).

The real SGLang 0.5.17 classes are used: TritonAttnBackend runs its own Triton kernels
under the interpreter; FlashInferAttnBackend is built with torch stand-ins for the
FlashInfer wrappers (flashinfer is not installed on CPU), which return base-2 lse like
FlashInfer does. Our INT4 kernels are replaced by the pure-torch references.

Tolerances: fp32 split+merge vs full attention 1e-4; through SGLang's Triton kernels
(fp16 inputs, fp32 accumulation) 1e-2 absolute on outputs of O(1).
"""

import math
import types
from types import SimpleNamespace as NS

import pytest
import torch

from saw_sglang.kernels import reference as ref
from saw_sglang.kernels.format import Int4KVFormat
from saw_sglang.patches import int4_attention as ia

LN2 = math.log(2.0)


# ------------------------------------------------------------------------------
# helpers
class FakeInt4Pool:
    """Just the pool contract the backends use (the real pool is built elsewhere)."""

    def __init__(self, rows, heads, fmt, layers=1, calibration=None):
        """calibration: a KCalibration the write applies to K and the readers undo
        (`read_calibration`, as the real quant method offers it)."""
        self.calibration = calibration
        read = None if calibration is None else (lambda layer: calibration.read_side(layer))
        self.quant_method = NS(fmt=fmt, resolve_attention_access=lambda *a, **k: None,
                               read_calibration=read)
        self.bufs = []
        for _ in range(layers):
            kd, ks = fmt.alloc(rows, heads)
            vd, vs = fmt.alloc(rows, heads)
            self.bufs.append((kd, vd, ks, vs))
        self.fmt = fmt
        self.writes = 0

    def get_raw_kv_buffer(self, layer_id):
        return self.bufs[layer_id]

    def get_kv_cache_quant_method(self):
        return self.quant_method

    def set_kv_buffer(self, layer, loc, k, v, *args, **kwargs):
        loc = getattr(loc, "loc", loc)
        if loc.numel() == 0:
            return
        kd, vd, ks, vs = self.bufs[layer.layer_id]
        cal = self.calibration
        ref.quantize_and_store_ref(k.reshape(k.shape[0], -1, self.fmt.head_dim),
                                   v.reshape(v.shape[0], -1, self.fmt.head_dim),
                                   loc, kd, ks, vd, vs, self.fmt,
                                   k_affine=None if cal is None else cal.write_affine(layer.layer_id))
        self.writes += 1

    def get_value_buffer(self, layer_id):  # what a packed pool would report
        return self.bufs[layer_id][1]

    def dequant(self, layer_id, slots):
        """The K and V values a reader must see (a calibrated K with its calibration undone)."""
        kd, vd, ks, vs = self.bufs[layer_id]
        f = self.fmt
        k = ref.dequantize_ref(kd, ks, slots, f, f.k_rotated, torch.float32)
        if self.calibration is not None:
            k = ref.uncalibrate(k, self.calibration, layer_id)
        return k, ref.dequantize_ref(vd, vs, slots, f, f.v_rotated, torch.float32)


def torch_merge_state(o1, s1, o2, s2, base2: bool = False):
    """Reference merge of two partial attentions by their log-sum-exp (FlashInfer's and
    SGLang's Triton merge_state do this in serving). Either side may have lse -inf."""
    f = LN2 if base2 else 1.0
    a, b = s1.float() * f, s2.float() * f
    m = torch.maximum(a, b)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    wa, wb = torch.exp(a - m), torch.exp(b - m)
    den = wa + wb
    o = (o1.float() * wa.unsqueeze(-1) + o2.float() * wb.unsqueeze(-1)) / den.unsqueeze(-1)
    return o.to(o1.dtype), (m + torch.log(den)) / f


def _decode_ref(q, k_data, k_scales, v_data, v_scales, kv_indptr, kv_indices, kv_lens, fmt,
                sm_scale, page_size=1, logit_cap=0.0, out=None, workspace=None, num_splits=None,
                max_kv_len=None):
    o = ref.decode_attention_ref(q, k_data, k_scales, v_data, v_scales, kv_indptr, kv_indices,
                                 kv_lens, fmt, sm_scale, page_size, logit_cap)
    if out is not None:
        out.copy_(o)
        return out
    return o


@pytest.fixture
def ref_kernels(monkeypatch):
    calls = {"decode": 0, "prefix": 0, "dequant": 0}

    def deq(data, scales, loc, fmt, rotated, dtype=torch.bfloat16, out=None):
        calls["dequant"] += 1
        return ref.dequantize_ref(data, scales, loc, fmt, rotated, dtype, out=out)

    def dec(*a, **k):
        calls["decode"] += 1
        return _decode_ref(*a, **k)

    def pre(*a, max_q_len=None, **k):
        calls["prefix"] += 1
        return ref.prefix_attention_ref(*a, **k)

    from saw_sglang.kernels.decode import DecodeWorkspace, alloc_workspace

    # the real workspace; a split policy with few programs (the interpreter is slow)
    def plan_splits(bs, hkv, fmt, device, max_kv_len=None, num_q_heads=None):
        return max(1, 8 // (bs * hkv))

    fake_dec = types.SimpleNamespace(plan_splits=plan_splits, alloc_workspace=alloc_workspace,
                                     DecodeWorkspace=DecodeWorkspace)
    monkeypatch.setattr(ia, "decode_kernel", lambda: dec)
    monkeypatch.setattr(ia, "prefix_kernel", lambda: pre)
    monkeypatch.setattr(ia, "decode_kernel_module", lambda: fake_dec)
    monkeypatch.setattr(ia, "dequantize_kernel", lambda: deq)
    return calls


def paged_req_to_token(lens, page_size, max_len, gen):
    """req_to_token of a paged allocator: random distinct pages, t -> page*P + t%P."""
    n_pages = sum(-(-n // page_size) for n in lens) + 4
    perm = torch.randperm(n_pages, generator=gen) + 1  # page 0 reserved like SGLang's slot 0
    r2t = torch.zeros(len(lens) + 1, max_len, dtype=torch.int32)
    used = 0
    for r, n in enumerate(lens):
        for t in range(n):
            page = int(perm[used + t // page_size])
            r2t[r + 1, t] = page * page_size + t % page_size
        used += -(-n // page_size)
    return r2t, (n_pages + 2) * page_size


def causal_attend(q, k, v, qo, sm_scale, cap=0.0):
    """Per-request causal attention of new queries over their own new keys (natural lse)."""
    o = torch.zeros(q.shape, dtype=torch.float32)
    lse = torch.zeros(q.shape[:2], dtype=torch.float32)
    for b in range(qo.numel() - 1):
        a, e = int(qo[b]), int(qo[b + 1])
        n = e - a
        mask = torch.ones(n, n, dtype=torch.bool).tril()
        o[a:e], lse[a:e] = ref._attend(q[a:e].float(), k[a:e].float(), v[a:e].float(), sm_scale, cap, mask)
    return o, lse


def pool_reference(q, pool, layer_id, seq_slots_per_req, qo, sm_scale, cap=0.0):
    """Attention of each new query over its request's dequantised [prefix ; chunk] rows,
    causal (query i of n sees the prefix and chunk rows up to itself)."""
    out = torch.zeros(q.shape, dtype=torch.float32)
    for b, slots in enumerate(seq_slots_per_req):
        a, e = int(qo[b]), int(qo[b + 1])
        k, v = pool.dequant(layer_id, slots)
        n, total = e - a, len(slots)
        mask = torch.ones(n, total, dtype=torch.bool).tril(total - n)
        out[a:e], _ = ref._attend(q[a:e].float(), k, v, sm_scale, cap, mask)
    return out


def full_reference(q, k_new, v_new, pool, layer_id, slots_per_req, qo, sm_scale, cap=0.0):
    """Attention of each new query over [dequantised prefix ; causal fresh chunk]."""
    out = torch.zeros(q.shape, dtype=torch.float32)
    for b, slots in enumerate(slots_per_req):
        a, e = int(qo[b]), int(qo[b + 1])
        kp, vp = pool.dequant(layer_id, slots)
        k = torch.cat([kp, k_new[a:e].float()])
        v = torch.cat([vp, v_new[a:e].float()])
        p, n = len(slots), e - a
        mask = torch.ones(n, p + n, dtype=torch.bool)
        mask[:, p:] = torch.ones(n, n, dtype=torch.bool).tril()
        out[a:e], _ = ref._attend(q[a:e].float(), k, v, sm_scale, cap, mask)
    return out


# ------------------------------------------------------------------------------
# registry
@pytest.fixture
def clean_registry(monkeypatch):
    from sglang.srt.layers.attention import attention_registry as reg

    monkeypatch.setattr(reg, "ATTENTION_BACKENDS", dict(reg.ATTENTION_BACKENDS))
    return reg


@pytest.mark.parametrize("name", ["flashinfer", "triton"])
def test_registry_routes_int4_only(clean_registry, monkeypatch, name):
    from saw_sglang.patches import attention_flashinfer, attention_triton

    mod = {"flashinfer": attention_flashinfer, "triton": attention_triton}[name]
    reg = clean_registry
    original = reg.ATTENTION_BACKENDS[name]
    sentinel_orig = object()
    monkeypatch.setitem(reg.ATTENTION_BACKENDS, name, lambda runner: (sentinel_orig, runner))
    stock = reg.ATTENTION_BACKENDS[name]

    built = []

    class FakeInt4:
        def __init__(self, runner, **kw):
            built.append(runner)

    monkeypatch.setattr(mod, "backend_class", lambda: FakeInt4)
    f1 = mod.register()
    f2 = mod.register()
    assert f1 is f2 is reg.ATTENTION_BACKENDS[name], "register() must be idempotent"
    assert f1._saw_int4_original is stock

    mc = NS(is_encoder_decoder=False)
    bf16 = NS(kv_cache_dtype_str="auto", server_args=NS(kv_cache_dtype="auto"), model_config=mc)
    assert f1(bf16) == (sentinel_orig, bf16)
    assert not built
    for runner in (
        NS(kv_cache_dtype_str="int4", server_args=NS(kv_cache_dtype="auto"), model_config=mc),
        NS(server_args=NS(kv_cache_dtype="int4"), model_config=mc),
    ):
        assert isinstance(f1(runner), FakeInt4)
    assert len(built) == 2
    # The other backends are untouched.
    for other in ("torch_native", "fa3"):
        assert reg.ATTENTION_BACKENDS[other] is not f1
    del original


def test_register_wraps_the_real_original(clean_registry):
    from saw_sglang.patches import attention_flashinfer, attention_triton
    from sglang.srt.layers.attention import attention_registry as reg

    # the originals, also when an earlier test already applied the plugin in this process
    real = {n: getattr(reg.ATTENTION_BACKENDS[n], "_saw_int4_original", reg.ATTENTION_BACKENDS[n])
            for n in ("flashinfer", "triton")}
    attention_flashinfer.register()
    attention_triton.register()
    attention_triton.register()
    for n, f in real.items():
        assert reg.ATTENTION_BACKENDS[n] is not f
        assert reg.ATTENTION_BACKENDS[n]._saw_int4_original is f


# ------------------------------------------------------------------------------
# metadata
@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("with_buffers", [False, True])
@pytest.mark.parametrize("eager", [False, True])
def test_build_kv_index(page_size, with_buffers, eager, monkeypatch):
    """Token slots come from SGLang's index kernel where Triton runs (the interpreter
    here), page ids and the no-Triton case from the eager torch gather: both checked."""
    if eager:
        monkeypatch.setattr(ia, "_triton_runs_on", lambda device: False)
    gen = torch.Generator().manual_seed(page_size)
    lens = [37, 0, 16, 1, 70]
    r2t, _ = paged_req_to_token(lens, page_size, 96, gen)
    req = torch.tensor([1, 2, 3, 4, 5])
    order = torch.tensor([4, 0, 2, 1, 3])  # batch order differs from pool order
    req, lens_t = req[order], torch.tensor(lens)[order]
    kwargs = {}
    if with_buffers:
        kwargs = dict(indptr_out=torch.full((9,), -7, dtype=torch.int32),
                      indices_out=torch.full((400,), -7, dtype=torch.int32),
                      lens_out=torch.full((8,), -7, dtype=torch.int32))
    total = ia.host_total(lens_t.tolist(), page_size)
    for tot in (total, None):
        kv = ia.build_kv_index(r2t, req, lens_t, page_size, total=tot, **kwargs)
        assert kv.page_size == page_size
        assert kv.kv_indptr.dtype == kv.kv_lens.dtype == torch.int32
        assert int(kv.kv_indptr[-1]) == total
        for b in range(len(lens)):
            n = int(lens_t[b])
            assert int(kv.kv_lens[b]) == n
            slots = ref.token_slots(kv.kv_indptr, kv.kv_indices, kv.kv_lens, b, page_size)
            assert torch.equal(slots, r2t[int(req[b]), :n].long())


def test_qo_indptr_and_host_total():
    qo = ia.qo_indptr_from(torch.tensor([3, 0, 5]))
    assert qo.tolist() == [0, 3, 3, 8]
    assert ia.host_total([5, 16, 17], 16) == 1 + 1 + 2
    assert ia.host_total(None, 1, 42) == 42
    assert ia.host_total(None, 16, 42) is None


class HostSyncPatterns(torch.overrides.TorchFunctionMode):
    """Records the tensor operations that make a CUDA tensor wait for the device: reading
    a value back (item / tolist / int / bool / float) and writing a Python number into it
    (`t[0] = 0` is a synchronous host-to-device copy). On the CPU nothing syncs, so the
    patterns are what is checked; tests/gpu checks the real thing with torch's sync
    debug mode."""

    READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__int__, torch.Tensor.__bool__,
             torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.cpu, torch.Tensor.numpy}

    def __init__(self):
        super().__init__()
        self.found = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.READS:
            self.found.append(func.__name__)
        elif func is torch.Tensor.__setitem__ and not isinstance(args[2], torch.Tensor):
            self.found.append(f"__setitem__({args[2]!r})")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("page_size", [1, 16])
def test_per_step_metadata_never_syncs(page_size):
    """The decode-graph refresh runs before every replay; with SGLang's overlap scheduler
    a device sync there stalls the GPU each step (on an H200 `indptr[0] = 0` did, and the
    INT4 servers' GPUs idled ~1.8 ms per short-context step against 0.6 ms for FP8)."""
    gen = torch.Generator().manual_seed(7)
    lens = [37, 5, 16, 70]
    r2t, _ = paged_req_to_token(lens, page_size, 96, gen)
    req, lens_t = torch.tensor([1, 2, 3, 4]), torch.tensor(lens)
    fmt = Int4KVFormat(head_dim=64)
    g = ia.DecodeGraphState(8, 96, page_size, 4, 2, fmt, "cpu")
    total = ia.host_total(lens, page_size)
    with HostSyncPatterns() as mode:
        kv = g.fill(r2t, req, lens_t, 4, total=total)
        ia.qo_indptr_from(lens_t)
    assert mode.found == []
    assert int(kv.kv_indptr[4]) == total  # (after the mode: reading back here is fine)
    with HostSyncPatterns() as mode:  # the check itself can fail
        lens_t[0] = 1
        lens_t.tolist()
    assert mode.found == ["__setitem__(1)", "tolist"]


# ------------------------------------------------------------------------------
# extend split + merge logic
def _extend_case(gen, fmt, hq, hkv, prefix_lens, new_lens, dtype, page_size=1):
    d = fmt.head_dim
    lens = [p + n for p, n in zip(prefix_lens, new_lens)]
    r2t, rows = paged_req_to_token(lens, page_size, max(lens) + 1, gen)
    pool = FakeInt4Pool(rows, hkv, fmt)
    layer = NS(layer_id=0, tp_q_head_num=hq, tp_k_head_num=hkv, head_dim=d, qk_head_dim=d,
               v_head_dim=d, scaling=d ** -0.5, logit_cap=0.0, is_cross_attention=False,
               sliding_window_size=-1)
    slots = []
    for b, p in enumerate(prefix_lens):  # the cached prefixes
        s = r2t[b + 1, :p].long()
        pool.set_kv_buffer(layer, s, torch.randn(p, hkv, d, generator=gen) * 2,
                           torch.randn(p, hkv, d, generator=gen))
        slots.append(s)
    n = sum(new_lens)
    q = torch.randn(n, hq, d, generator=gen).to(dtype)
    k = torch.randn(n, hkv, d, generator=gen).to(dtype)
    v = torch.randn(n, hkv, d, generator=gen).to(dtype)
    qo = ia.qo_indptr_from(torch.tensor(new_lens))
    req = torch.arange(1, len(lens) + 1)
    prefix = ia.build_kv_index(r2t, req, torch.tensor(prefix_lens), page_size) if any(prefix_lens) else None
    return pool, layer, q, k, v, qo, prefix, slots


@pytest.mark.parametrize("base2", [False, True])
@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("hq,hkv,d,group,rot_v", [(4, 2, 64, None, False), (4, 1, 128, 32, True)])
def test_extend_split_merge_matches_full_attention(ref_kernels, base2, page_size, hq, hkv, d, group, rot_v):
    gen = torch.Generator().manual_seed(hq * d + page_size + base2)
    fmt = Int4KVFormat(d, group_size=group, rotate_v=rot_v)
    pool, layer, q, k, v, qo, prefix, slots = _extend_case(
        gen, fmt, hq, hkv, [13, 0, 40], [5, 7, 1], torch.float32, page_size)

    def new_chunk(q3, k3, v3, need_lse):
        o, lse = causal_attend(q3, k3, v3, qo, layer.scaling)
        if base2:
            lse = lse / LN2  # what FlashInfer's ragged wrapper returns
        return (o, lse) if need_lse else o

    merge = lambda o1, s1, o2, s2: torch_merge_state(o1, s1, o2, s2, base2=base2)
    out = ia.extend_forward(q, k, v, pool, layer, qo, prefix, new_chunk, merge, lse_base2=base2)
    want = full_reference(q, k, v, pool, 0, slots, qo, layer.scaling)
    assert out.shape == (q.shape[0], hq * d)
    torch.testing.assert_close(out.view_as(want), want, atol=1e-4, rtol=1e-4)
    assert ref_kernels["prefix"] == 1


def test_extend_without_prefix_skips_prefix_kernel(ref_kernels):
    gen = torch.Generator().manual_seed(3)
    fmt = Int4KVFormat(64)
    pool, layer, q, k, v, qo, prefix, slots = _extend_case(gen, fmt, 2, 2, [0, 0], [6, 3], torch.float32)
    assert prefix is None
    seen = []

    def new_chunk(q3, k3, v3, need_lse):
        seen.append(need_lse)
        return causal_attend(q3, k3, v3, qo, layer.scaling)[0]

    out = ia.extend_forward(q, k, v, pool, layer, qo, None, new_chunk, None, lse_base2=True)
    want = full_reference(q, k, v, pool, 0, slots, qo, layer.scaling)
    torch.testing.assert_close(out.view_as(want), want, atol=1e-5, rtol=1e-5)
    assert seen == [False] and ref_kernels["prefix"] == 0


def test_torch_merge_state_handles_empty_side():
    gen = torch.Generator().manual_seed(0)
    o1, o2 = torch.randn(3, 2, 8, generator=gen), torch.randn(3, 2, 8, generator=gen)
    s1 = torch.randn(3, 2, generator=gen)
    s2 = torch.full((3, 2), float("-inf"))
    for base2 in (False, True):
        o, s = torch_merge_state(o1, s1, o2, s2, base2)
        torch.testing.assert_close(o, o1)
        torch.testing.assert_close(s, s1)
    o, s = torch_merge_state(o1, s1, o2, s1.clone())
    torch.testing.assert_close(o, (o1 + o2) / 2)
    torch.testing.assert_close(s, s1 + math.log(2.0))


def test_layer_and_mode_refusals():
    fmt = Int4KVFormat(64)
    base = dict(layer_id=0, tp_q_head_num=2, tp_k_head_num=2, head_dim=64, qk_head_dim=64,
                v_head_dim=64, scaling=0.125, logit_cap=0.0, is_cross_attention=False,
                sliding_window_size=-1)
    ia.check_layer(NS(**base), fmt)
    for bad in (dict(is_cross_attention=True), dict(sliding_window_size=128),
                dict(v_head_dim=32), dict(logit_cap=30.0, logit_capping_method="other")):
        with pytest.raises(NotImplementedError):
            ia.check_layer(NS(**{**base, **bad}), fmt)
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    ia.refuse_mode(ForwardMode.DECODE)
    ia.refuse_mode(ForwardMode.EXTEND)
    with pytest.raises(NotImplementedError, match="speculative"):
        ia.refuse_mode(ForwardMode.TARGET_VERIFY)
    with pytest.raises(RuntimeError, match="INT4 KV pool"):
        ia.pool_format(NS(quant_method=NS()))


# ------------------------------------------------------------------------------
# real SGLang backend classes with a minimal model runner
def _runner(pool, r2t, hq, hkv, d, page_size, ctx, server_args):
    import transformers

    mc = NS(get_max_num_attention_heads=lambda: hq, get_num_kv_heads=lambda tp: hkv,
            v_head_dim=d, swa_v_head_dim=d, attention_arch=None, context_len=ctx,
            is_encoder_decoder=False, head_dim=d, num_attention_heads=hq, is_multimodal=False,
            hf_config=transformers.LlamaConfig(architectures=["LlamaForCausalLM"]),
            linear_attn_registry_result=None)
    from sglang.srt.configs.model_config import AttentionArch

    mc.attention_arch = AttentionArch.MHA
    req_pool = NS(req_to_token=r2t, size=r2t.shape[0])
    return NS(req_to_token_pool=req_pool, token_to_kv_pool=pool,
              token_to_kv_pool_allocator=NS(get_kvcache=lambda: pool), sliding_window_size=None,
              page_size=page_size, model_config=mc, device="cpu", gpu_id=0,
              server_args=server_args, is_draft_worker=False, kv_cache_dtype=torch.uint8,
              kv_cache_dtype_str="int4", dtype=torch.float16, init_new_workspace=False,
              use_mla_backend=False)


@pytest.fixture(scope="module")
def server_args():
    from sglang.srt.runtime_context import get_context
    from sglang.srt.server_args import ServerArgs

    sa = ServerArgs(model_path="dummy", attention_backend="triton")
    get_context().set_server_args(sa)
    return sa


@pytest.fixture
def parallel():
    from sglang.srt.runtime_context import get_parallel

    with get_parallel().override(attn_tp_size=1, attn_dcp_size=1, attn_dcp_rank=0, attn_cp_size=1, attn_cp_rank=0):
        yield


def _batch(mode, **kw):
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    fb = NS(forward_mode=getattr(ForwardMode, mode), spec_info=None, encoder_lens=None,
            positions=None, dcp_kv_mask=None)
    for k, v in kw.items():
        setattr(fb, k, v)
    return fb


def _radix(hq, hkv, d):
    from sglang.srt.layers.radix_attention import RadixAttention

    return RadixAttention(num_heads=hq, head_dim=d, scaling=d ** -0.5, num_kv_heads=hkv, layer_id=0)


def _decode_setup(gen, fmt, hq, hkv, lens, page_size, dtype, calibration=None):
    d = fmt.head_dim
    r2t, rows = paged_req_to_token([n + 1 for n in lens], page_size, max(lens) + 2, gen)
    pool = FakeInt4Pool(rows, hkv, fmt, calibration=calibration)
    layer = _radix(hq, hkv, d)
    for b, n in enumerate(lens):  # cached history
        s = r2t[b + 1, :n].long()
        pool.set_kv_buffer(layer, s, torch.randn(n, hkv, d, generator=gen), torch.randn(n, hkv, d, generator=gen))
    bs = len(lens)
    seq_lens = torch.tensor(lens) + 1
    out_loc = torch.stack([r2t[b + 1, lens[b]] for b in range(bs)]).long()
    q = torch.randn(bs, hq * d, generator=gen).to(dtype)
    k = torch.randn(bs, hkv * d, generator=gen).to(dtype)
    v = torch.randn(bs, hkv * d, generator=gen).to(dtype)
    fb = _batch("DECODE", batch_size=bs, req_pool_indices=torch.arange(1, bs + 1), seq_lens=seq_lens,
                seq_lens_cpu=seq_lens.clone(), seq_lens_sum=int(seq_lens.sum()), out_cache_loc=out_loc)
    return r2t, pool, layer, q, k, v, fb, seq_lens


def _expected_decode(pool, layer, q, r2t, seq_lens, fmt, hq, hkv):
    kd, vd, ks, vs = pool.get_raw_kv_buffer(0)
    bs = len(seq_lens)
    kv = ia.build_kv_index(r2t, torch.arange(1, bs + 1), seq_lens, 1)
    return ref.decode_attention_ref(q.view(bs, hq, -1), kd, ks, vd, vs, kv.kv_indptr, kv.kv_indices,
                                    kv.kv_lens, fmt, layer.scaling).view(bs, -1)


def test_triton_backend_init_reports_logical_head_dim(server_args, parallel):
    from saw_sglang.patches.attention_triton import backend_class

    fmt = Int4KVFormat(64)
    pool = FakeInt4Pool(32, 2, fmt)
    assert pool.get_value_buffer(0).shape[-1] == 32  # packed width: would mislead the parent
    r2t = torch.zeros(3, 16, dtype=torch.int32)
    b = backend_class()(_runner(pool, r2t, 4, 2, 64, 1, 16, server_args))
    assert b.v_head_dim == 64


@pytest.mark.parametrize("rot_v", [False, True])
def test_triton_backend_decode(server_args, parallel, ref_kernels, rot_v):
    from saw_sglang.patches.attention_triton import backend_class

    gen = torch.Generator().manual_seed(11 + rot_v)
    hq, hkv, d = 4, 2, 64
    fmt = Int4KVFormat(d, rotate_v=rot_v)
    r2t, pool, layer, q, k, v, fb, seq_lens = _decode_setup(gen, fmt, hq, hkv, [9, 1, 20], 1, torch.float16)
    b = backend_class()(_runner(pool, r2t, hq, hkv, d, 1, r2t.shape[1], server_args))
    b.init_forward_metadata(fb)
    out = b.forward_decode(q, k, v, layer, fb)
    want = _expected_decode(pool, layer, q, r2t, seq_lens, fmt, hq, hkv)
    assert pool.writes == 4 and ref_kernels["decode"] == 1
    assert out.shape == (3, hq * d) and out.dtype == q.dtype
    torch.testing.assert_close(out.float(), want.float(), atol=2e-3, rtol=2e-3)


def test_triton_backend_decode_graph_buffers(server_args, parallel, ref_kernels):
    from saw_sglang.patches.attention_triton import backend_class

    gen = torch.Generator().manual_seed(5)
    hq, hkv, d = 4, 2, 64
    fmt = Int4KVFormat(d)
    r2t, pool, layer, q, k, v, fb, seq_lens = _decode_setup(gen, fmt, hq, hkv, [3, 12], 1, torch.float16)
    b = backend_class()(_runner(pool, r2t, hq, hkv, d, 1, r2t.shape[1], server_args))
    b.init_cuda_graph_state(4, 4)
    b.init_forward_metadata_out_graph(fb, in_capture=True)
    kv = b.int4_meta.kv
    assert b.int4_meta.num_splits == 2  # 8 "SMs" // (bs 2 * 2 kv heads)
    assert tuple(b.int4_meta.workspace.mid_o.shape) == (2, hq, 2, d)
    assert kv.kv_lens.data_ptr() == b.int4_graph.kv_lens.data_ptr()
    assert kv.kv_indices.data_ptr() == b.cuda_graph_kv_indices.data_ptr()
    out = b.forward_decode(q, k, v, layer, fb)
    want = _expected_decode(pool, layer, q, r2t, seq_lens, fmt, hq, hkv)
    torch.testing.assert_close(out.float(), want.float(), atol=2e-3, rtol=2e-3)
    with pytest.raises(NotImplementedError, match="decode CUDA graphs only"):
        b.init_forward_metadata_out_graph(_batch("EXTEND", batch_size=1), in_capture=True)


def _extend_setup(gen, fmt, hq, hkv, prefix_lens, new_lens, page_size, dtype, calibration=None):
    """A pool holding random prefixes at paged slots, fresh q/k/v for the new tokens and
    the EXTEND batch that asks for them."""
    d = fmt.head_dim
    lens = [p + n for p, n in zip(prefix_lens, new_lens)]
    r2t, rows = paged_req_to_token(lens, page_size, max(lens) + 1, gen)
    pool = FakeInt4Pool(rows, hkv, fmt, calibration=calibration)
    layer = _radix(hq, hkv, d)
    slots = []
    for i, p in enumerate(prefix_lens):
        s = r2t[i + 1, :p].long()
        pool.set_kv_buffer(layer, s, torch.randn(p, hkv, d, generator=gen), torch.randn(p, hkv, d, generator=gen))
        slots.append(s)
    n = sum(new_lens)
    q, k, v = (torch.randn(n, h * d, generator=gen).to(dtype) for h in (hq, hkv, hkv))
    out_loc = torch.cat([r2t[i + 1, p:p + m] for i, (p, m) in enumerate(zip(prefix_lens, new_lens))]).long()
    seq = torch.tensor(lens)
    bs = len(lens)
    fb = _batch("EXTEND", batch_size=bs, req_pool_indices=torch.arange(1, bs + 1), seq_lens=seq,
                seq_lens_cpu=seq.clone(), seq_lens_sum=int(seq.sum()),
                extend_prefix_lens=torch.tensor(prefix_lens), extend_prefix_lens_cpu=list(prefix_lens),
                extend_seq_lens=torch.tensor(new_lens), extend_seq_lens_cpu=list(new_lens),
                extend_num_tokens=n, out_cache_loc=out_loc)
    return r2t, pool, layer, slots, q, k, v, out_loc, fb


def _expected_extend(through_pool, r2t, pool, layer, slots, q, k, v, prefix_lens, new_lens, hq, hkv, d):
    """Through the pool: every request's dequantised prefix and chunk; else the dequantised
    prefix and the fresh chunk."""
    n = sum(new_lens)
    qo = ia.qo_indptr_from(torch.tensor(new_lens))
    if through_pool:
        seq = [r2t[i + 1, : p + m].long() for i, (p, m) in enumerate(zip(prefix_lens, new_lens))]
        return pool_reference(q.view(n, hq, d), pool, 0, seq, qo, layer.scaling)
    return full_reference(q.view(n, hq, d), k.view(n, hkv, d), v.view(n, hkv, d), pool, 0, slots, qo,
                          layer.scaling)


@pytest.mark.parametrize("through_pool", [True, False])
@pytest.mark.parametrize("prefix_lens", [[6, 0], [0, 0]])
def test_triton_backend_extend(server_args, parallel, ref_kernels, prefix_lens, through_pool, monkeypatch):
    """Small batches attend prefix and chunk through the pool (the chunk's own quantised
    values, as a later radix hit would see them); above DEQUANT_MAX_TOKENS the chunk
    attends its fresh k/v and the prefix goes through the prefix kernel and a merge."""
    from saw_sglang.patches.attention_triton import backend_class

    monkeypatch.setattr(ia, "DEQUANT_MAX_TOKENS", 1 << 16 if through_pool else 0)
    gen = torch.Generator().manual_seed(sum(prefix_lens) + 1)
    hq, hkv, d, P = 4, 2, 64, 1
    fmt = Int4KVFormat(d)
    new_lens = [3, 4]
    r2t, pool, layer, slots, q, k, v, out_loc, fb = _extend_setup(gen, fmt, hq, hkv, prefix_lens, new_lens,
                                                                  P, torch.float16)
    n = sum(new_lens)
    b = backend_class()(_runner(pool, r2t, hq, hkv, d, P, r2t.shape[1], server_args))
    b.init_forward_metadata(fb)
    assert (b.int4_meta.prefix is None) == (not any(prefix_lens))
    assert (b.int4_meta.rows is not None) == through_pool
    out = b.forward_extend(q, k, v, layer, fb)
    want = _expected_extend(through_pool, r2t, pool, layer, slots, q, k, v, prefix_lens, new_lens, hq, hkv, d)
    torch.testing.assert_close(out.float().view_as(want), want, atol=1e-2, rtol=1e-2)
    assert ref_kernels["prefix"] == (1 if any(prefix_lens) and not through_pool else 0)
    assert ref_kernels["dequant"] == (2 if through_pool else 0)
    # the new chunk was written to the cache at its slots (one write per call)
    assert pool.writes == sum(1 for p in prefix_lens if p) + 1
    want_k = ref.dequantize_values(*ref.quantize(k.view(n, hkv, d), fmt, fmt.k_rotated), fmt, fmt.k_rotated)
    torch.testing.assert_close(pool.dequant(0, out_loc)[0], want_k)


# ------------------------------------------------------------------------------
# FlashInfer backend with torch stand-ins for the FlashInfer wrappers
class _FakeRagged:
    """BatchPrefillWithRaggedKVCacheWrapper stand-in: causal attention per request,
    base-2 lse like FlashInfer."""

    def __init__(self, *a, **k):
        self.qo = self.kv = None

    def begin_forward(self, qo_indptr, kv_indptr, hq, hkv, d, q_data_type=None, **k):
        self.qo, self.kv = qo_indptr.clone(), kv_indptr.clone()

    def forward_return_lse(self, q, k, v, causal=True, sm_scale=None, logits_soft_cap=0.0, **kw):
        assert causal
        if not torch.equal(self.qo, self.kv):  # kv longer than qo: bottom-right causal mask
            o = torch.zeros(q.shape, dtype=torch.float32)
            lse = torch.zeros(q.shape[:2], dtype=torch.float32)
            for b in range(self.qo.numel() - 1):
                qa, qe, ka, ke = int(self.qo[b]), int(self.qo[b + 1]), int(self.kv[b]), int(self.kv[b + 1])
                mask = torch.ones(qe - qa, ke - ka, dtype=torch.bool).tril((ke - ka) - (qe - qa))
                o[qa:qe], lse[qa:qe] = ref._attend(q[qa:qe].float(), k[ka:ke].float(), v[ka:ke].float(),
                                                   sm_scale, logits_soft_cap, mask)
        else:
            o, lse = causal_attend(q, k, v, self.qo, sm_scale, logits_soft_cap)
        return o.to(q.dtype), lse / LN2

    def forward(self, *a, **k):
        return self.forward_return_lse(*a, **k)[0]


class _Unused:
    def __init__(self, *a, **k):
        pass

    def __getattr__(self, name):
        raise AssertionError(f"FlashInfer paged wrapper used on the INT4 pool: {name}")


@pytest.fixture
def fake_flashinfer(monkeypatch):
    from sglang.srt.layers.attention import flashinfer_backend as fb_mod

    monkeypatch.setattr(fb_mod, "BatchPrefillWithRaggedKVCacheWrapper", _FakeRagged, raising=False)
    monkeypatch.setattr(fb_mod, "BatchPrefillWithPagedKVCacheWrapper", _Unused, raising=False)
    monkeypatch.setattr(fb_mod, "BatchDecodeWithPagedKVCacheWrapper", _Unused, raising=False)
    monkeypatch.setattr(fb_mod, "_safe_merge_state",
                        lambda o1, s1, o2, s2: torch_merge_state(o1, s1, o2, s2, base2=True),
                        raising=False)
    from sglang.srt.environ import envs

    old = envs.SGLANG_FLASHINFER_WORKSPACE_SIZE.get()
    envs.SGLANG_FLASHINFER_WORKSPACE_SIZE.set(1 << 16)
    yield fb_mod
    envs.SGLANG_FLASHINFER_WORKSPACE_SIZE.set(old)


@pytest.mark.parametrize("page_size", [1, 16])
def test_flashinfer_backend_decode(server_args, parallel, ref_kernels, fake_flashinfer, page_size):
    from saw_sglang.patches.attention_flashinfer import backend_class

    gen = torch.Generator().manual_seed(page_size)
    hq, hkv, d = 4, 2, 64
    fmt = Int4KVFormat(d)
    r2t, pool, layer, q, k, v, fb, seq_lens = _decode_setup(gen, fmt, hq, hkv, [9, 17, 1], page_size,
                                                            torch.float16)
    b = backend_class()(_runner(pool, r2t, hq, hkv, d, page_size, r2t.shape[1], server_args))
    b.init_forward_metadata(fb)
    assert b.forward_metadata.kv.page_size == page_size
    out = b.forward_decode(q, k, v, layer, fb)
    want = _expected_decode(pool, layer, q, r2t, seq_lens, fmt, hq, hkv)
    torch.testing.assert_close(out.float(), want.float(), atol=2e-3, rtol=2e-3)
    # graph path: same result from the preallocated buffers
    b.init_cuda_graph_state(4, 4)
    b.init_forward_metadata_out_graph(fb, in_capture=True)
    assert b.forward_metadata.kv.kv_indices.data_ptr() == b.int4_graph.kv_indices.data_ptr()
    out_g = b.forward_decode(q, k, v, layer, fb)
    torch.testing.assert_close(out_g.float(), want.float(), atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("through_pool", [True, False])
@pytest.mark.parametrize("page_size", [1, 16])
def test_flashinfer_backend_extend(server_args, parallel, ref_kernels, fake_flashinfer, page_size,
                                   through_pool, monkeypatch):
    from saw_sglang.patches.attention_flashinfer import backend_class

    monkeypatch.setattr(ia, "DEQUANT_MAX_TOKENS", 1 << 16 if through_pool else 0)
    gen = torch.Generator().manual_seed(7 + page_size)
    hq, hkv, d = 4, 2, 64
    fmt = Int4KVFormat(d)
    prefix_lens, new_lens = [0, 21, 5], [4, 3, 6]
    r2t, pool, layer, slots, q, k, v, out_loc, fb = _extend_setup(gen, fmt, hq, hkv, prefix_lens, new_lens,
                                                                  page_size, torch.float32)
    n = sum(new_lens)
    runner = _runner(pool, r2t, hq, hkv, d, page_size, r2t.shape[1], server_args)
    runner.dtype = torch.float32
    b = backend_class()(runner)
    b.init_forward_metadata(fb)
    assert (b.forward_metadata.rows is not None) == through_pool
    out = b.forward_extend(q, k, v, layer, fb)
    want = _expected_extend(through_pool, r2t, pool, layer, slots, q, k, v, prefix_lens, new_lens, hq, hkv, d)
    torch.testing.assert_close(out.view_as(want), want, atol=1e-4, rtol=1e-4)
    assert ref_kernels["prefix"] == (0 if through_pool else 1)
    with pytest.raises(NotImplementedError):
        b.init_forward_metadata(_batch("TARGET_VERIFY", batch_size=1))


# ------------------------------------------------------------------------------
# A K calibration (--saw-calibration): the readers undo it exactly
def _calibration(gen, hkv, d, parts):
    from saw_sglang.kernels.calibration import KCalibration

    mean = 2.0 * torch.randn(1, hkv, d, generator=gen)
    scale = torch.exp(0.3 * torch.randn(1, hkv, d, generator=gen))
    cal = KCalibration(mean, scale if "scale" in parts else torch.ones_like(scale))
    return cal if "mean" in parts else cal.without_mean()


@pytest.mark.parametrize("parts", ["mean", "scale", "mean+scale"])
@pytest.mark.parametrize("name", ["flashinfer", "triton"])
def test_calibrated_pool_decode(server_args, parallel, ref_kernels, fake_flashinfer, name, parts):
    """Decode over calibrated keys equals attention over the keys with the calibration
    undone: q is folded with the scale, the mean needs nothing."""
    import importlib

    backend_class = importlib.import_module(f"saw_sglang.patches.attention_{name}").backend_class
    gen = torch.Generator().manual_seed(len(parts) + len(name))
    hq, hkv, d = 4, 2, 64
    fmt = Int4KVFormat(d)
    cal = _calibration(gen, hkv, d, parts)
    r2t, pool, layer, q, k, v, fb, seq_lens = _decode_setup(gen, fmt, hq, hkv, [9, 17, 1], 1, torch.float32,
                                                            calibration=cal)
    runner = _runner(pool, r2t, hq, hkv, d, 1, r2t.shape[1], server_args)
    runner.dtype = torch.float32
    b = backend_class()(runner)
    b.init_forward_metadata(fb)
    out = b.forward_decode(q, k, v, layer, fb)
    qo = torch.arange(len(seq_lens) + 1)
    seq = [r2t[i + 1, : int(n)].long() for i, n in enumerate(seq_lens)]
    want = pool_reference(q.view(-1, hq, d), pool, 0, seq, qo, layer.scaling)
    torch.testing.assert_close(out.view_as(want), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("through_pool", [True, False])
@pytest.mark.parametrize("parts", ["mean", "mean+scale"])
@pytest.mark.parametrize("name", ["flashinfer", "triton"])
def test_calibrated_pool_extend(server_args, parallel, ref_kernels, fake_flashinfer, name, parts, through_pool,
                                monkeypatch):
    """Extend over a calibrated cache: through the pool (query folded and rotated to the
    stored basis) and through the prefix kernel (its lse shifted by q . mean before the
    merge with the chunk's own attention) both equal attention over the true keys."""
    import importlib

    backend_class = importlib.import_module(f"saw_sglang.patches.attention_{name}").backend_class
    monkeypatch.setattr(ia, "DEQUANT_MAX_TOKENS", 1 << 16 if through_pool else 0)
    gen = torch.Generator().manual_seed(3 * len(parts) + through_pool)
    hq, hkv, d = 4, 2, 64
    fmt = Int4KVFormat(d, rotate_v=through_pool)
    cal = _calibration(gen, hkv, d, parts)
    prefix_lens, new_lens = [7, 0, 12], [3, 4, 2]
    dtype = torch.float32 if name == "flashinfer" else torch.float16
    r2t, pool, layer, slots, q, k, v, out_loc, fb = _extend_setup(gen, fmt, hq, hkv, prefix_lens, new_lens, 1,
                                                                  dtype, calibration=cal)
    runner = _runner(pool, r2t, hq, hkv, d, 1, r2t.shape[1], server_args)
    runner.dtype = dtype
    b = backend_class()(runner)
    b.init_forward_metadata(fb)
    out = b.forward_extend(q, k, v, layer, fb)
    want = _expected_extend(through_pool, r2t, pool, layer, slots, q, k, v, prefix_lens, new_lens, hq, hkv, d)
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.float().view_as(want), want, atol=tol, rtol=tol)
    assert ref_kernels["prefix"] == (0 if through_pool else 1)
