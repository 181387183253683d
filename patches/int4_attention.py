"""Shared logic of the INT4 variants of SGLang's `flashinfer` and `triton` attention
backends: registry wrapping, KV index building, and the decode / extend paths over
the packed pool. The backend modules only adapt SGLang's metadata to these functions.

Pool contract: SGLang's MHATokenToKVPool with our quant method;
`pool.get_raw_kv_buffer(layer_id)` -> (k_data, v_data, k_scales, v_scales) and
`pool.quant_method.fmt` is the Int4KVFormat. Writes go through `pool.set_kv_buffer`.

Our kernels take un-rotated q and return un-rotated outputs (the rotation lives
inside them), so q is passed as is, multiplied by the K calibration's scale when the
server has one (`--saw-calibration`; the mean needs no query change, only the prefix
log-sum-exp is shifted before a merge). An extend either reads prefix and chunk back
from the pool (`extend_through_pool`) or attends the chunk on its fresh BF16 k/v and
the cached prefix through the prefix kernel (`extend_forward`).
"""

from __future__ import annotations

import functools
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ._util import is_int4

logger = logging.getLogger(__name__)

LOG2E = 1.0 / math.log(2.0)  # natural-log lse -> FlashInfer's base-2 lse


# ---------------------------------------------------------------------------------
# Kernel hooks (lazy imports; tests on machines without the kernels patch these)
def decode_kernel():
    from saw_sglang.kernels.decode import decode_attention

    return decode_attention


def prefix_kernel():
    from saw_sglang.kernels.prefix import prefix_attention

    return prefix_attention


def decode_kernel_module():
    from saw_sglang.kernels import decode

    return decode


def dequantize_kernel():
    from saw_sglang.kernels.quantize import dequantize

    return dequantize


def warm_up_kernels(runner, pool, num_q_heads: int, num_kv_heads: int) -> None:
    """Compile our kernels for this model before the first request (see kernels.warmup):
    the server reports ready only after the backends are built."""
    from saw_sglang.kernels.warmup import compiled_variants, warm_up

    hf = getattr(getattr(runner, "model_config", None), "hf_config", None)
    caps = {0.0, float(getattr(hf, "attn_logit_softcapping", None) or 0.0)}
    k_data, v_data, k_scales, v_scales = pool.get_raw_kv_buffer(0)
    dtype = getattr(runner, "dtype", None)
    dtype = dtype if dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
    before = compiled_variants()
    t0 = time.perf_counter()
    k_affine = getattr(pool.quant_method, "k_affine", lambda buf: None)(k_data)
    for cap in sorted(caps):
        warm_up(pool_format(pool), num_q_heads, num_kv_heads, k_data, k_scales, v_data, v_scales,
                page_size=int(getattr(runner, "page_size", 1) or 1), dtype=dtype, logit_cap=cap,
                k_affine=k_affine)
    logger.info("INT4 KV: %d kernel variants compiled at startup in %.1f s",
                compiled_variants() - before, time.perf_counter() - t0)


# ---------------------------------------------------------------------------------
# Registry
def wrap_backend_factory(name: str, build_int4: Callable) -> Callable:
    """Replace ATTENTION_BACKENDS[name] with a factory that builds the INT4 variant for
    int4 runs and calls the original factory otherwise. Idempotent."""
    from sglang.srt.layers.attention import attention_registry as reg

    current = reg.ATTENTION_BACKENDS[name]
    if getattr(current, "_saw_int4_original", None) is not None:
        return current
    original = current

    def factory(runner):
        if is_int4(runner):
            return build_int4(runner)
        return original(runner)

    factory._saw_int4_original = original
    factory.__name__ = f"create_{name}_backend_saw_int4"
    factory.__doc__ = f"SGLang's {name!r} backend, or its INT4 variant for --kv-cache-dtype int4."
    reg.ATTENTION_BACKENDS[name] = factory
    return factory


# ---------------------------------------------------------------------------------
# Pool access
def pool_format(pool):
    qm = getattr(pool, "quant_method", None)
    fmt = getattr(qm, "fmt", None)
    if fmt is None:
        raise RuntimeError(
            "INT4 attention backend needs an INT4 KV pool (quant_method with .fmt); got "
            f"{type(pool).__name__} with quant method {type(qm).__name__}. "
            "Launch with --kv-cache-dtype int4 through saw_sglang."
        )
    return fmt


def check_layer(layer, fmt) -> None:
    """Refuse layer kinds the INT4 kernels do not implement, with a clear message."""
    if getattr(layer, "is_cross_attention", False):
        raise NotImplementedError("INT4 KV cache: cross-attention is not supported")
    sw = getattr(layer, "sliding_window_size", None)
    if sw is not None and sw > -1:
        raise NotImplementedError("INT4 KV cache: sliding-window attention is not supported")
    if layer.qk_head_dim != layer.v_head_dim or layer.head_dim != fmt.head_dim:
        raise NotImplementedError(
            f"INT4 KV cache needs equal q/k/v head dims matching the pool "
            f"(layer {layer.qk_head_dim}/{layer.v_head_dim}, pool {fmt.head_dim})"
        )
    method = getattr(layer, "logit_capping_method", "tanh")
    if layer.logit_cap and layer.logit_cap > 0 and method != "tanh":
        raise NotImplementedError(f"INT4 KV cache: logit capping {method!r} is not supported")


def refuse_mode(forward_mode) -> None:
    """Speculative decoding / dLLM modes are refused at startup by the launcher; this is
    the backstop if one reaches the backend anyway."""
    for name in ("is_target_verify", "is_draft_extend", "is_draft_extend_v2", "is_dllm_extend"):
        fn = getattr(forward_mode, name, None)
        if fn is not None and fn():
            raise NotImplementedError(
                f"INT4 KV cache does not support forward mode {forward_mode!r} "
                "(speculative decoding / dLLM); run without them or use a BF16/FP8 KV cache."
            )


def check_batch(forward_batch) -> None:
    """The backstop refusals of a batch's metadata, eager path."""
    refuse_mode(forward_batch.forward_mode)
    if forward_batch.spec_info is not None:
        raise NotImplementedError("INT4 KV cache does not support speculative decoding")


def check_graph_batch(forward_batch) -> None:
    """The same for a CUDA-graph batch: decode graphs only."""
    mode = forward_batch.forward_mode
    refuse_mode(mode)
    if not mode.is_decode_or_idle() or forward_batch.spec_info is not None:
        raise NotImplementedError(
            "INT4 KV cache captures decode CUDA graphs only; run with "
            "--disable-piecewise-cuda-graph and without prefill CUDA graphs."
        )


def has_prefix(forward_batch) -> bool:
    """Whether any request of an extend batch has a cached prefix (host lengths when known)."""
    lens_cpu = forward_batch.extend_prefix_lens_cpu
    return any(lens_cpu) if lens_cpu is not None else bool(forward_batch.extend_prefix_lens.any())


# ---------------------------------------------------------------------------------
# KV index building
@dataclass
class KVIndex:
    """Our kernels' view of a batch's cached tokens."""

    kv_indptr: torch.Tensor  # int32 [B + 1], into kv_indices
    kv_indices: torch.Tensor  # int32 token slots (page_size 1) or page ids
    kv_lens: torch.Tensor  # int32 [B] token counts
    page_size: int  # what the kernel must be told: 1 for token slots


def build_kv_index(
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    lens: torch.Tensor,
    page_size: int = 1,
    total: Optional[int] = None,
    indptr_out: Optional[torch.Tensor] = None,
    indices_out: Optional[torch.Tensor] = None,
    lens_out: Optional[torch.Tensor] = None,
) -> KVIndex:
    """kv_indptr / kv_indices / kv_lens from req_to_token.

    page_size 1: token slots. page_size P > 1: page ids, one entry per started page:
    SGLang's paged allocator puts token t of a request at req_to_token[r, t] =
    page * P + t % P, so page ids are req_to_token[r, j * P] // P.
    `total` (sum of entries, a host int) avoids a device sync; `*_out` buffers make the
    result land at fixed addresses (CUDA-graph replay)."""
    bs = req_pool_indices.shape[0]
    dev = req_to_token.device
    lens = lens[:bs].to(torch.int32)
    entries = lens if page_size == 1 else (lens + page_size - 1) // page_size
    indptr = indptr_out[: bs + 1] if indptr_out is not None else torch.empty(bs + 1, dtype=torch.int32, device=dev)
    indptr[:1].zero_()  # a fill kernel: `indptr[0] = 0` is a synchronous host copy
    torch.cumsum(entries, 0, out=indptr[1:])
    if total is None:
        total = int(indptr[-1].item())
    if page_size == 1 and bs and _triton_runs_on(dev):
        indices = indices_out if indices_out is not None else torch.empty(total, dtype=torch.int32, device=dev)
        _slot_index_kernel()[(bs,)](req_to_token, req_pool_indices, lens, indptr, None, indices,
                                    req_to_token.stride(0))
    else:
        src = _gather_entries(req_to_token, req_pool_indices, entries, indptr, page_size, total)
        if indices_out is not None:
            indices_out[:total].copy_(src)
            indices = indices_out
        else:
            indices = src.to(torch.int32)
    if lens_out is not None:
        lens_out[:bs].copy_(lens)
        lens = lens_out[:bs]
    return KVIndex(indptr, indices, lens, page_size)


def _gather_entries(req_to_token, req_pool_indices, entries, indptr, page_size, total):
    """Eager torch form of the index build (page ids, or slots where Triton cannot run)."""
    dev = req_to_token.device
    rows = torch.repeat_interleave(torch.arange(entries.shape[0], device=dev), entries, output_size=total)
    cols = torch.arange(total, device=dev, dtype=torch.int64) - indptr[:-1].long()[rows]
    src = req_to_token[req_pool_indices.long()[rows], cols * page_size]
    return torch.div(src, page_size, rounding_mode="floor") if page_size > 1 else src


def _triton_runs_on(device) -> bool:
    return torch.device(device).type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _slot_index_kernel():
    """SGLang's own token-slot index kernel, the one its FlashInfer decode path runs every
    step: one launch instead of ~20 eager ops (host time per call on an H200:
    55-61 us against 230-290 us; same indices)."""
    from sglang.kernels.ops.attention.utils import create_flashinfer_kv_indices_triton

    return create_flashinfer_kv_indices_triton


def host_total(lens_cpu, page_size: int = 1, lens_sum: Optional[int] = None) -> Optional[int]:
    """Number of kv_indices entries from host-side lengths (None: unknown, read back)."""
    if page_size == 1 and lens_sum is not None:
        return int(lens_sum)
    if lens_cpu is None:
        return None
    lens = [int(x) for x in (lens_cpu.tolist() if torch.is_tensor(lens_cpu) else lens_cpu)]
    return sum(-(-n // page_size) for n in lens)


def qo_indptr_from(extend_seq_lens: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    bs = extend_seq_lens.shape[0]
    qo = out[: bs + 1] if out is not None else torch.empty(bs + 1, dtype=torch.int32, device=extend_seq_lens.device)
    qo[:1].zero_()
    torch.cumsum(extend_seq_lens.to(qo.dtype), 0, out=qo[1:])
    return qo


# ---------------------------------------------------------------------------------
# Per-batch metadata, one kind for both backends
@dataclass
class Int4Meta:
    """What a batch's INT4 attention reads, shared by every layer.

    Decode: `kv`, the batch's cached tokens, with the split count and workspace planned for
    them (`max_kv_len`: the host-known longest request). Extend: `qo_indptr`, `max_q_len`,
    `has_prefix` and `prefix` (the cached prefixes' index when the prefix kernel reads them).
    An extend attended through the pool has `rows`, the token slots read back: FlashInfer's,
    each request's prefix then chunk in request order; Triton's, every prefix then the
    whole chunk, the first `prefix_rows` of them prefix rows, indexed by `ws_indices`
    (0..prefix_rows-1) for SGLang's extend kernel."""

    kv: Optional[KVIndex] = None
    workspace: object = None
    num_splits: Optional[int] = None
    max_kv_len: Optional[int] = None
    qo_indptr: Optional[torch.Tensor] = None
    max_q_len: Optional[int] = None
    has_prefix: bool = False
    prefix: Optional[KVIndex] = None
    rows: Optional[torch.Tensor] = None
    prefix_rows: int = 0
    ws_indices: Optional[torch.Tensor] = None
    swa_out_cache_loc: None = None  # read by SGLang code that inspects FlashInfer metadata


def eager_decode_meta(pool, kv: KVIndex, lens_cpu, num_q_heads, num_kv_heads, device) -> Int4Meta:
    """One eager decode step: the split count from host-known lengths and one workspace
    that every layer shares, so the kernels allocate nothing per layer."""
    max_len = int(lens_cpu.max()) if lens_cpu is not None and lens_cpu.numel() else None
    fmt = pool_format(pool)
    dec = decode_kernel_module()
    bs = kv.kv_lens.shape[0]
    s = dec.plan_splits(bs, num_kv_heads, fmt, device, max_len, num_q_heads)
    ws = dec.alloc_workspace(bs, num_q_heads, fmt.head_dim, s, device)
    return Int4Meta(kv=kv, max_kv_len=max_len, num_splits=s, workspace=ws)


# ---------------------------------------------------------------------------------
# Attention over the packed pool
def decode_forward(q, pool, layer, m: Int4Meta, out=None):
    """q [B, Hq*D] or [B, Hq, D] (un-rotated) -> [B, Hq*D] over the INT4 cache."""
    fmt = pool_format(pool)
    check_layer(layer, fmt)
    k_data, v_data, k_scales, v_scales = pool.get_raw_kv_buffer(layer.layer_id)
    # a calibrated K: q . k' = (q * scale) . (k - mean) / scale, and the mean moves every
    # score of a query alike (softmax ignores it)
    q3 = fold_query(q.reshape(-1, layer.tp_q_head_num, layer.head_dim), k_calibration(pool, layer)[1])
    o3 = None if out is None else out.view(-1, layer.tp_q_head_num, layer.head_dim)
    kwargs = {}
    if m.workspace is not None:
        kwargs["workspace"] = m.workspace
    if m.num_splits is not None:
        kwargs["num_splits"] = m.num_splits
    kv = m.kv
    o = decode_kernel()(
        q3, k_data, k_scales, v_data, v_scales, kv.kv_indptr, kv.kv_indices, kv.kv_lens,
        fmt, layer.scaling, page_size=kv.page_size, logit_cap=float(layer.logit_cap or 0.0),
        out=o3, max_kv_len=m.max_kv_len, **kwargs,
    )
    return o.reshape(-1, layer.tp_q_head_num * layer.head_dim)


# An extend whose cached prefix and new chunk together hold at most this many tokens is
# attended through the pool: the rows are dequantised (in their stored, rotated basis:
# kernels/pool_read.py) into a BF16 workspace allocated at startup and attended in one
# causal pass by the backend's own BF16 prefill, the chunk read back after its write, so
# a prompt attends the same quantised values whether its prefix was a radix-cache hit or
# was just computed. Larger batches use the prefix kernel and attend their chunk on the
# fresh k/v. The workspace is also capped in bytes (K + V rows in the model dtype).
DEQUANT_MAX_TOKENS = 65536
DEQUANT_WORKSPACE_MIB = 256


def pool_read_workspace(num_kv_heads: int, head_dim: int, dtype, device):
    """The through-pool workspace of one backend (None when the bound is 0)."""
    from saw_sglang.kernels.pool_read import PoolReadWorkspace

    rows = min(DEQUANT_MAX_TOKENS,
               PoolReadWorkspace.rows_for(DEQUANT_WORKSPACE_MIB << 20, num_kv_heads, head_dim, dtype))
    if rows <= 0:
        return None
    ws = PoolReadWorkspace(rows, num_kv_heads, head_dim, dtype, device)
    logger.info("INT4 KV: extends of up to %d prefix + chunk tokens attend through the pool "
                "(BF16 workspace %.0f MiB)", rows, 2 * ws.k.numel() * ws.k.element_size() / 2**20)
    return ws


def through_pool_fits(ws, total) -> bool:
    return ws is not None and total is not None and ws.fits(int(total))


def k_calibration(pool, layer):
    """(mean, scale) of the layer's K calibration on the pool's device, each None when it
    is the identity (no file, or a mean-only / scale-only file)."""
    read = getattr(pool.quant_method, "read_calibration", None)
    return read(layer.layer_id) if read is not None else (None, None)


def fold_query(q3, scale):
    """q [N, Hq, D] times the layer's K calibration scale (identity when None)."""
    if scale is None:
        return q3
    from saw_sglang.kernels.calibration import fold_query as fold

    return fold(q3, scale)


def attends_through_pool(m: Int4Meta, save_kv_cache: bool, encoder_only: bool) -> bool:
    """Whether this layer's extend reads its chunk back from the pool: planned (`m.rows`) and
    the chunk written. A chunk that is not written (encoder-only layers) attends its fresh
    k/v, which the plan allows only without a cached prefix."""
    if m.rows is None:
        return False
    if encoder_only or not save_kv_cache:
        if m.has_prefix:
            raise NotImplementedError(
                "INT4 KV cache: an extend over a cached prefix must write its chunk to the cache")
        return False
    return True


def extend_through_pool(q, pool, layer, slots: torch.Tensor, attend: Callable, workspace):
    """Extend attention over dequantised pool rows: attend(q3, k, v) -> o [N, Hq, D]."""
    from saw_sglang.kernels.pool_read import attend_through_pool

    fmt = pool_format(pool)
    check_layer(layer, fmt)
    hq, d = layer.tp_q_head_num, layer.head_dim
    k_data, v_data, k_scales, v_scales = pool.get_raw_kv_buffer(layer.layer_id)
    _, scale = k_calibration(pool, layer)
    o = attend_through_pool(q.reshape(-1, hq, d), k_data, k_scales, v_data, v_scales, slots, fmt,
                            attend, workspace, k_scale=scale, dequantize=dequantize_kernel())
    return o.reshape(-1, hq * d)


def prefix_forward(q3, qo_indptr, pool, layer, kv: KVIndex, max_q_len=None):
    """New queries over their cached INT4 prefixes -> (o q.dtype, lse natural log)."""
    fmt = pool_format(pool)
    k_data, v_data, k_scales, v_scales = pool.get_raw_kv_buffer(layer.layer_id)
    mean, scale = k_calibration(pool, layer)
    o, lse = prefix_kernel()(
        fold_query(q3, scale), qo_indptr, k_data, k_scales, v_data, v_scales, kv.kv_indptr,
        kv.kv_indices, kv.kv_lens, fmt, layer.scaling, page_size=kv.page_size,
        logit_cap=float(layer.logit_cap or 0.0), max_q_len=max_q_len,
    )
    if mean is not None:
        # scores over calibrated keys are short of sm_scale * q . mean: the lse is merged
        # with the fresh chunk's, which is not
        from saw_sglang.kernels.calibration import lse_shift

        lse = lse + lse_shift(q3, mean, layer.scaling)
    return o, lse


def extend_forward(
    q, k, v, pool, layer, qo_indptr, prefix: Optional[KVIndex],
    new_chunk: Callable, merge: Callable, lse_base2: bool, max_q_len=None,
):
    """Extend attention = causal attention of the new chunk over its fresh k/v, merged
    (log-sum-exp) with attention over the cached INT4 prefix.

    new_chunk(q3, k3, v3, need_lse) -> o or (o, lse) in the backend's lse base;
    merge(o1, lse1, o2, lse2) -> (o, lse) in that base (FlashInfer: base 2, Triton: e).
    `prefix` is None when no request of the batch has a cached prefix. Returns [N, Hq*D].
    The cache write (set_kv_buffer) is the caller's: it touches only the new slots."""
    fmt = pool_format(pool)
    check_layer(layer, fmt)
    hq, hkv, d = layer.tp_q_head_num, layer.tp_k_head_num, layer.head_dim
    q3 = q.reshape(-1, hq, d)
    k3 = k.reshape(-1, hkv, d)
    v3 = v.reshape(-1, hkv, d)
    if prefix is None:
        o = new_chunk(q3, k3, v3, False)
        return o.reshape(-1, hq * d)
    o1, s1 = new_chunk(q3, k3, v3, True)
    o2, s2 = prefix_forward(q3, qo_indptr, pool, layer, prefix, max_q_len)
    if lse_base2:
        s2 = s2 * LOG2E  # -inf (empty prefix) stays -inf: weight zero in the merge
    o, _ = merge(o1, s1, o2.to(o1.dtype), s2)
    return o.reshape(-1, hq * d)


# ---------------------------------------------------------------------------------
# Decode CUDA-graph state: preallocated index buffers and one shared split workspace
class DecodeGraphState:
    """Buffers for captured decode graphs. The index buffers are sized for the largest
    batch at the full context length; the split count is fixed per captured batch size
    (host decision), and all batch sizes share one flat split workspace (graphs replay
    one at a time on one stream)."""

    def __init__(self, max_bs, max_context_len, page_size, num_q_heads, num_kv_heads, fmt, device):
        self.page_size = page_size
        per_req = -(-max_context_len // page_size) if page_size > 1 else max_context_len
        self.kv_indptr = torch.zeros(max_bs + 1, dtype=torch.int32, device=device)
        self.kv_indices = torch.zeros(max_bs * per_req, dtype=torch.int32, device=device)
        self.kv_lens = torch.zeros(max_bs, dtype=torch.int32, device=device)
        self.num_q_heads, self.num_kv_heads, self.fmt = num_q_heads, num_kv_heads, fmt
        self.head_dim = fmt.head_dim
        self.device = device
        self.max_bs = max_bs
        self.splits: dict[int, int] = {}
        self.workspaces: dict[int, object] = {}
        self._flat = None

    def num_splits(self, bs: int) -> int:
        return decode_kernel_module().plan_splits(bs, self.num_kv_heads, self.fmt, self.device,
                                                  num_q_heads=self.num_q_heads)

    def prepare(self, bs: int):
        """Fix the split count and workspace of batch size `bs` (at capture)."""
        if bs in self.splits:
            return
        s = self.num_splits(bs)
        self.splits[bs] = s
        self.workspaces[bs] = self._workspace(bs, s)

    def _workspace(self, bs, s):
        Workspace = decode_kernel_module().DecodeWorkspace
        hq, d = self.num_q_heads, self.head_dim
        if self._flat is None:
            # One set of buffers for every batch size: the split part sized for the
            # largest bs * splits, the query part for the largest batch.
            rows = max(b * self.num_splits(b) for b in range(1, self.max_bs + 1))
            f32 = dict(dtype=torch.float32, device=self.device)
            self._flat = (torch.empty(rows * hq * d, **f32), torch.empty(rows * hq, **f32),
                          torch.empty(self.max_bs * hq * d, dtype=torch.float16, device=self.device),
                          torch.empty(self.max_bs * hq * 2, **f32))
        o, lse, qp, qs = self._flat
        n = bs * hq * s
        return Workspace(o[: n * d].view(bs, hq, s, d), lse[:n].view(bs, hq, s),
                         qp[: bs * hq * d].view(bs, hq, d), qs[: bs * hq * 2].view(bs, hq, 2))

    def fill(self, req_to_token, req_pool_indices, seq_lens, bs: int, total: Optional[int] = None) -> KVIndex:
        """Refresh the buffers in place for a batch padded to `bs` (outside the graph)."""
        return build_kv_index(
            req_to_token, req_pool_indices[:bs], seq_lens[:bs], self.page_size, total=total,
            indptr_out=self.kv_indptr, indices_out=self.kv_indices, lens_out=self.kv_lens,
        )

    def view(self, bs: int) -> KVIndex:
        return KVIndex(self.kv_indptr[: bs + 1], self.kv_indices, self.kv_lens[:bs], self.page_size)

    def meta(self, bs: int, kv: KVIndex) -> Int4Meta:
        """The metadata of a captured batch size (after prepare): its fixed split count and
        its workspace."""
        return Int4Meta(kv=kv, workspace=self.workspaces[bs], num_splits=self.splits[bs])
