"""INT4 split-KV (flash-decoding) attention over the packed paged pool: the public entry
points, the split policy and the workspace.

A call runs three kernels:
  1. decode_prep: q -> q' = (q . H_B) * sm_scale (* log2 e) as fp16 planes, with per-head
     sums (the tensor-core kernel folds the zero point and the code bias with them);
  2. the split kernel: decode_mma (Gluon, tensor cores, CUDA sm_80+, whole-head groups)
     or decode_triton (portable: the interpreter, smaller groups, INT8 q.k), each split
     writing its normalised partial output and log2-sum-exp;
  3. decode_merge: the splits of each query head merged by their log-sum-exp, and the
     output rotated back when V was rotated. One split (V not rotated) writes the
     output directly and skips it.
The split count is a host decision (batch, heads, SM count, optional max length), never
read from device data; the per-request split length comes from kv_lens in the kernels,
so a call with a workspace and a fixed split count is CUDA-graph capturable.
`DecodePlan` owns the split count and the workspace for a batch shape, as FlashInfer's
plan/run wrappers do.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import decode_triton
from .format import Int4KVFormat, served_problem
from .tiles import grid_dependency_sync, hadamard_signs, split_length

DEFAULT_NUM_SMS = 132
MAX_SPLITS = 256

# Tensor-core kernel (decode_mma) per head_dim, from the H200 A/B (docs/decode.md):
# tokens per block, async-copy stages, KV heads per program (one warp each), programs per
# SM the split policy aims at, the least number of blocks in a split, and the shared-
# memory swizzle (bytes per piece, phases) that keeps the fragment reads conflict-free.
MMA_CONFIGS: dict[int, dict] = {
    64: dict(block_n=64, stages=3, heads=4, waves=2, min_blocks=4, swizzle=(16, 1)),
    128: dict(block_n=32, stages=3, heads=4, waves=2.9, min_blocks=8, swizzle=(16, 4)),
    256: dict(block_n=32, stages=3, heads=4, waves=3, min_blocks=4, swizzle=(32, 4)),
}


@dataclass
class DecodeWorkspace:
    mid_o: torch.Tensor  # fp32 [B, Hq, S, D], split outputs (normalised, channel order)
    mid_lse: torch.Tensor  # fp32 [B, Hq, S], split log2-sum-exp
    q_prep: torch.Tensor  # fp16 [B, Hq, D], q' planes
    q_sums: torch.Tensor  # fp32 [B, Hq, 2], (sum q', 1024 bias) per head

    @property
    def max_splits(self) -> int:
        return self.mid_o.shape[2]

    def fits(self, batch, num_q_heads, head_dim, num_splits) -> bool:
        return (self.max_splits >= num_splits and self.mid_o.shape[0] >= batch
                and self.mid_o.shape[1] == num_q_heads and self.mid_o.shape[3] == head_dim)


def alloc_workspace(max_batch, num_q_heads, head_dim, max_splits=MAX_SPLITS, device="cuda"):
    f32 = dict(dtype=torch.float32, device=device)
    return DecodeWorkspace(
        torch.empty(max_batch, num_q_heads, max_splits, head_dim, **f32),
        torch.empty(max_batch, num_q_heads, max_splits, **f32),
        torch.empty(max_batch, num_q_heads, head_dim, dtype=torch.float16, device=device),
        torch.empty(max_batch, num_q_heads, 2, **f32),
    )


_SM_COUNT: dict = {}


def num_sms(device) -> int:
    device = torch.device(device)
    if device.type != "cuda":
        return DEFAULT_NUM_SMS
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _SM_COUNT:
        _SM_COUNT[key] = torch.cuda.get_device_properties(key).multi_processor_count
    return _SM_COUNT[key]


def choose_num_splits(programs, sms=DEFAULT_NUM_SMS, waves=2, max_kv_len=None, block_n=64,
                      min_blocks=2, max_splits=MAX_SPLITS) -> int:
    """Splits so that programs * splits ~ waves * SMs (programs = batch x head groups).
    Host-only inputs: a max length hint caps splits that would hold < min_blocks blocks."""
    s = math.ceil(waves * sms / max(programs, 1 / 16))
    if max_kv_len is not None:
        s = min(s, max(1, -(-int(max_kv_len) // (block_n * min_blocks))))
    return int(max(1, min(s, max_splits)))


def decode_impl(device, fmt: Int4KVFormat, gqa: int) -> str:
    """"mma" (tensor-core Gluon kernel: CUDA sm_80+, whole-head groups, head_dim 64/128/256,
    up to 16 query heads per KV head) or "triton" (everything else, the interpreter;
    SAW_INT4_DECODE_IMPL=triton forces it)."""
    device = torch.device(device)
    if (device.type == "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1"
            and os.environ.get("SAW_INT4_DECODE_IMPL", "") != "triton"
            and fmt.num_groups == 1 and fmt.head_dim in MMA_CONFIGS and gqa <= 16
            and torch.cuda.get_device_capability(device)[0] >= 8):
        return "mma"
    return "triton"


def head_group(num_kv_heads: int, most: int, pad: bool = True) -> int:
    """KV heads per tensor-core program (one warp each): the largest power of two <= most
    dividing num_kv_heads; their rows lie side by side in the pool, so a program's copy of
    one token is one contiguous run. pad: where only 1 divides (3, 5, 7 ... heads), the
    power of two >= num_kv_heads (up to most), the last program's extra warps masked off:
    one-warp programs hide too little latency."""
    g = 1
    while g * 2 <= most and num_kv_heads % (g * 2) == 0:
        g *= 2
    if pad and g == 1 and num_kv_heads > 1:
        g = min(most, triton.next_power_of_2(num_kv_heads))
    return g


MMA_KNOBS = ("block_n", "stages", "heads", "waves", "min_blocks", "maxnreg", "pdl", "pad")
# Programmatic dependent launch of the three kernels of a step (sm_90+): each next kernel's
# launch overlaps the previous one's run (tiles.grid_dependency_sync).
MMA_PDL = False  # H200 A/B (docs/decode.md): +1-6% at some shapes, -16-30% at others


def _pdl_launch(pdl: bool) -> dict:
    return {"launch_pdl": True} if pdl else {}


def _knobs(impl, fmt: Int4KVFormat, **override) -> dict:
    if impl == "mma":
        base, names = dict(MMA_CONFIGS[fmt.head_dim], pdl=MMA_PDL, pad=True), MMA_KNOBS
    elif impl == "triton":
        base, names = decode_triton.get_config(fmt.head_dim, fmt.group_size), decode_triton.KNOBS
    else:
        raise ValueError(f"decode impl must be 'mma' or 'triton', got {impl!r}")
    unknown = sorted(set(override) - set(names))
    if unknown:
        raise ValueError(f"unknown {impl} decode knob(s) {unknown}; known: {', '.join(names)}")
    base.update({k: v for k, v in override.items() if v is not None})
    return base


def plan_splits(batch, num_kv_heads, fmt: Int4KVFormat, device, max_kv_len=None, num_q_heads=None,
                impl=None, **override) -> int:
    """The split count decode_attention chooses for this batch with its default config:
    callers that preallocate (one workspace per step or per captured graph) use it so
    that the kernels never allocate."""
    gqa = (num_q_heads or num_kv_heads) // num_kv_heads
    impl = impl or decode_impl(device, fmt, gqa)
    cfg = _knobs(impl, fmt, **override)
    if impl == "mma":  # programs of fewer warps than the config's count as that fraction
        hg = head_group(num_kv_heads, cfg["heads"], cfg["pad"])
        programs = batch * -(-num_kv_heads // hg) * hg / cfg["heads"]
    else:
        programs = batch * num_kv_heads
    return choose_num_splits(programs, num_sms(device), cfg["waves"], max_kv_len, cfg["block_n"],
                             cfg.get("min_blocks", 2), MAX_SPLITS)


class DecodePlan:
    """plan() once per batch shape on the host, run() for every layer: the split count and
    the workspace live here, so run() allocates nothing and is CUDA-graph capturable."""

    def __init__(self, fmt: Int4KVFormat, num_q_heads, num_kv_heads, device, page_size=1):
        self.fmt, self.hq, self.hkv, self.device, self.page_size = fmt, num_q_heads, num_kv_heads, device, page_size
        self.num_splits = 1
        self.workspace: DecodeWorkspace | None = None

    def plan(self, batch, max_kv_len=None, num_splits=None) -> int:
        s = num_splits or plan_splits(batch, self.hkv, self.fmt, self.device, max_kv_len, self.hq)
        ws = self.workspace
        if ws is None or not ws.fits(batch, self.hq, self.fmt.head_dim, s):
            self.workspace = alloc_workspace(batch, self.hq, self.fmt.head_dim, s, self.device)
        self.num_splits = s
        return s

    def run(self, q, k_data, k_scales, v_data, v_scales, kv_indptr, kv_indices, kv_lens, sm_scale,
            logit_cap=0.0, out=None):
        return decode_attention(q, k_data, k_scales, v_data, v_scales, kv_indptr, kv_indices, kv_lens,
                                self.fmt, sm_scale, self.page_size, logit_cap, out, self.workspace,
                                self.num_splits)


# --------------------------------------------------------------------------------------
@triton.jit
def _decode_prep_kernel(
    q_ptr, qp_ptr, qs_ptr, qk_scale, inv_sqrt_bs,
    stride_qb, stride_qh, stride_pb, stride_ph, stride_sb, HQ,
    D: tl.constexpr, BLOCK_H: tl.constexpr, BS: tl.constexpr, LOG_BS: tl.constexpr,
    ROT_K: tl.constexpr, PDL: tl.constexpr,
):
    """q -> q' for decode_mma: (q . H_B) * qk_scale as fp16 planes (channels [0, D/2) and
    [D/2, D) / 16, the high nibble arriving as 16 n), sum(q') and 1024 sum(q' planes)."""
    grid_dependency_sync(PDL)
    b = tl.program_id(0)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = offs_h < HQ
    HALF: tl.constexpr = D // 2
    c_lo = tl.arange(0, HALF)
    c_hi = HALF + c_lo
    row = q_ptr + b * stride_qb + offs_h[:, None] * stride_qh
    if ROT_K:
        offs_d = tl.arange(0, D)
        x = tl.load(row + offs_d[None, :], mask=hmask[:, None], other=0.0).to(tl.float16)
        lo = tl.dot(x, hadamard_signs(offs_d, c_lo, BS, LOG_BS)) * (inv_sqrt_bs * qk_scale)
        hi = tl.dot(x, hadamard_signs(offs_d, c_hi, BS, LOG_BS)) * (inv_sqrt_bs * qk_scale)
    else:
        lo = tl.load(row + c_lo[None, :], mask=hmask[:, None], other=0.0).to(tl.float32) * qk_scale
        hi = tl.load(row + c_hi[None, :], mask=hmask[:, None], other=0.0).to(tl.float32) * qk_scale
    lo = lo.to(tl.float16)
    hi = hi.to(tl.float16)
    hi16 = hi * 0.0625  # exact: a power of two
    out = qp_ptr + b * stride_pb + offs_h[:, None] * stride_ph
    tl.store(out + c_lo[None, :], lo, mask=hmask[:, None])
    tl.store(out + c_hi[None, :], hi16, mask=hmask[:, None])
    sum_lo = tl.sum(lo.to(tl.float32), 1)
    sums = qs_ptr + b * stride_sb + offs_h * 2
    tl.store(sums, sum_lo + tl.sum(hi.to(tl.float32), 1), mask=hmask)
    tl.store(sums + 1, 1024.0 * (sum_lo + tl.sum(hi16.to(tl.float32), 1)), mask=hmask)


@triton.jit(do_not_specialize=['NUM_SPLITS', 'stride_ob', 'stride_oh', 'stride_mo_b', 'stride_mo_h', 'stride_mo_s', 'stride_ml_b', 'stride_ml_h'])
def _decode_merge_kernel(
    out_ptr, mid_o_ptr, mid_lse_ptr, lens_ptr, lse_ptr, inv_sqrt_bs,
    stride_ob, stride_oh, stride_mo_b, stride_mo_h, stride_mo_s, stride_ml_b, stride_ml_h, stride_lb,
    NUM_SPLITS, D: tl.constexpr, D_CHUNK: tl.constexpr, BLOCK_N: tl.constexpr,
    MIN_BLOCKS: tl.constexpr, S_CHUNK: tl.constexpr, BS: tl.constexpr, LOG_BS: tl.constexpr,
    ROT_V: tl.constexpr, PDL: tl.constexpr, LSE: tl.constexpr,
):
    """D_CHUNK channels of one query head of one request: the active splits' partial
    outputs merged by their log2-sum-exp, S_CHUNK splits per step (all of them in one step
    up to S_CHUNK); rotated back into the original basis when V was rotated (then
    D_CHUNK = D)."""
    grid_dependency_sync(PDL)
    h = tl.program_id(0)
    b = tl.program_id(1)
    c0 = tl.program_id(2) * D_CHUNK
    kv_len = tl.load(lens_ptr + b)
    n_act = tl.cdiv(kv_len, split_length(kv_len, NUM_SPLITS, BLOCK_N, MIN_BLOCKS))
    offs_s = tl.arange(0, S_CHUNK)
    offs_d = c0 + tl.arange(0, D_CHUNK)
    mo = mid_o_ptr + b * stride_mo_b + h * stride_mo_h
    ml = mid_lse_ptr + b * stride_ml_b + h * stride_ml_h
    m_i = tl.max(tl.full([S_CHUNK], float("-inf"), tl.float32), 0)
    l_i = tl.sum(tl.zeros([S_CHUNK], tl.float32), 0)
    acc = tl.zeros([D_CHUNK], dtype=tl.float32)
    for s0 in range(0, n_act, S_CHUNK):
        smask = s0 + offs_s < n_act
        lse = tl.load(ml + s0 + offs_s, mask=smask, other=float("-inf"))
        m_new = tl.maximum(m_i, tl.max(lse, 0))
        alpha = tl.exp2(m_i - m_new)
        w = tl.exp2(lse - m_new)
        o = tl.load(mo + (s0 + offs_s)[:, None] * stride_mo_s + offs_d[None, :], mask=smask[:, None], other=0.0)
        acc = acc * alpha + tl.sum(w[:, None] * o, 0)
        l_i = l_i * alpha + tl.sum(w, 0)
        m_i = m_new
    o = acc * tl.where(l_i > 0, 1.0 / tl.maximum(l_i, 1e-30), 0.0)
    if LSE:  # the head's log2-sum-exp (-inf without keys), for merging with other attention
        if c0 == 0:
            tl.store(lse_ptr + b * stride_lb + h, tl.where(l_i > 0, m_i + tl.log2(tl.maximum(l_i, 1e-30)),
                                                           float("-inf")))
    out = out_ptr + b * stride_ob + h * stride_oh
    if ROT_V:
        for cb in tl.static_range(D // 64):
            cols = cb * 64 + tl.arange(0, 64)
            sg = hadamard_signs(offs_d, cols, BS, LOG_BS).to(tl.float32)
            tl.store(out + cols, (tl.sum(o[:, None] * sg, 0) * inv_sqrt_bs).to(out_ptr.dtype.element_ty))
    else:
        tl.store(out + offs_d, o.to(out_ptr.dtype.element_ty))


# --------------------------------------------------------------------------------------
def _check(q, k_data, k_scales, v_data, v_scales, fmt: Int4KVFormat):
    if q.dim() != 3:
        raise ValueError(f"q must be [batch, q_heads, head_dim], got {tuple(q.shape)}")
    b, hq, d = q.shape
    if d != fmt.head_dim:
        raise ValueError(f"q head_dim {d} != format head_dim {fmt.head_dim}")
    hkv = k_data.shape[1]
    if hq % hkv:
        raise ValueError(f"q heads {hq} not a multiple of kv heads {hkv}")
    problem = served_problem(fmt)
    if problem:
        raise ValueError(f"decode_attention: {problem}")
    for name, t, shape in (("k_data", k_data, fmt.data_shape(k_data.shape[0], hkv)),
                           ("v_data", v_data, fmt.data_shape(v_data.shape[0], hkv)),
                           ("k_scales", k_scales, fmt.scale_shape(k_scales.shape[0], hkv)),
                           ("v_scales", v_scales, fmt.scale_shape(v_scales.shape[0], hkv))):
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
        if t.stride(-1) != 1 or (t.dim() == 4 and t.stride(-2) != 2):
            raise ValueError(f"{name} must be contiguous in its last dims")
    if q.stride(-1) != 1:
        raise ValueError("q must be contiguous in head_dim")
    return b, hq, hkv, d


def prepare_query(q, fmt: Int4KVFormat, sm_scale: float, logit_cap: float, q_prep, q_sums, pdl=False):
    """q [B, Hq, D] -> q_prep (fp16 q' planes) and q_sums (sum q', 1024 bias) in place."""
    bsz, hq, d = q.shape
    bs = fmt.block_size
    block_h = max(16, min(64, triton.next_power_of_2(hq)))
    qk_scale = sm_scale if logit_cap > 0 else sm_scale * 1.4426950408889634
    _decode_prep_kernel[(bsz, triton.cdiv(hq, block_h))](
        q, q_prep, q_sums, float(qk_scale), 1.0 / math.sqrt(bs),
        q.stride(0), q.stride(1), q_prep.stride(0), q_prep.stride(1), q_sums.stride(0), hq,
        D=d, BLOCK_H=block_h, BS=bs, LOG_BS=int(math.log2(bs)), ROT_K=fmt.k_rotated,
        PDL=pdl, num_warps=4, **_pdl_launch(pdl),
    )


def merge_splits(out, ws: DecodeWorkspace, kv_lens, fmt: Int4KVFormat, num_splits, block_n, min_blocks,
                 pdl=False, lse_out=None):
    """Splits -> out (and back into the original basis when V was rotated); lse_out [B, Hq]
    fp32, if given, gets each head's log2-sum-exp of its scaled scores."""
    bsz, hq, d = out.shape
    bs = fmt.block_size
    d_chunk = d if fmt.v_rotated else 32
    s_chunk = 32 if d_chunk == 32 else 16  # fixed: one compiled variant for any split count
    _decode_merge_kernel[(hq, bsz, d // d_chunk)](
        out, ws.mid_o, ws.mid_lse, kv_lens, ws.mid_lse if lse_out is None else lse_out, 1.0 / math.sqrt(bs),
        out.stride(0), out.stride(1), *ws.mid_o.stride()[:3], *ws.mid_lse.stride()[:2],
        0 if lse_out is None else lse_out.stride(0), num_splits,
        D=d, D_CHUNK=d_chunk, BLOCK_N=block_n, MIN_BLOCKS=min_blocks, S_CHUNK=s_chunk, BS=bs,
        LOG_BS=int(math.log2(bs)), ROT_V=fmt.v_rotated, PDL=pdl, LSE=lse_out is not None, num_warps=4,
        **_pdl_launch(pdl),
    )


def _split_mma(q, k_data, k_scales, v_data, v_scales, kv_indptr, kv_indices, kv_lens, fmt,
               sm_scale, page_size, logit_cap, out, ws, num_splits, cfg, direct):
    from .decode_mma import decode_split_kernel  # Gluon: imported where a GPU runs it

    bsz, hq, d = q.shape
    hkv = k_data.shape[1]
    gqa = hq // hkv
    hg = head_group(hkv, cfg["heads"], cfg["pad"])
    pdl = cfg["pdl"] and torch.cuda.get_device_capability(q.device)[0] >= 9
    prepare_query(q, fmt, sm_scale, logit_cap, ws.q_prep, ws.q_sums, pdl)
    # 32-bit byte offsets unless a buffer is too large for them
    off64 = max(k_data.numel(), v_data.numel(), k_scales.numel(), v_scales.numel()) >= 2**31
    decode_split_kernel[(triton.cdiv(hkv, hg), num_splits, bsz)](
        ws.q_prep, ws.q_sums, k_data, k_scales, v_data, v_scales, kv_indptr, kv_indices, kv_lens,
        out if direct else ws.mid_o, ws.mid_lse, float(logit_cap),
        ws.q_prep.stride(0), ws.q_prep.stride(1), ws.q_sums.stride(0),
        k_data.stride(0), k_data.stride(1), k_scales.stride(0), k_scales.stride(1),
        v_data.stride(0), v_data.stride(1), v_scales.stride(0), v_scales.stride(1),
        *((out.stride(0), out.stride(1), 0) if direct else ws.mid_o.stride()[:3]),
        *ws.mid_lse.stride()[:2], num_splits, hkv,
        HG=hg, GQA=gqa, NH=max(8, triton.next_power_of_2(gqa)), D=d, PAGE=int(page_size),
        BLOCK_N=cfg["block_n"], CAP=logit_cap > 0, OFF64=off64, MIN_BLOCKS=cfg["min_blocks"],
        STAGES=cfg["stages"], SWZ_VEC=cfg["swizzle"][0], SWZ_PHASES=cfg["swizzle"][1], DIRECT=direct,
        PDL=pdl, PAD=hkv % hg != 0, num_warps=hg, **_pdl_launch(pdl), **({"maxnreg": cfg["maxnreg"]} if cfg.get("maxnreg") else {}),
    )


def decode_attention(
    q, k_data, k_scales, v_data, v_scales, kv_indptr, kv_indices, kv_lens,
    fmt: Int4KVFormat, sm_scale: float, page_size: int = 1, logit_cap: float = 0.0,
    out=None, workspace: DecodeWorkspace | None = None, num_splits: int | None = None, *,
    max_kv_len: int | None = None, impl: str | None = None, qk_int8: bool = False,
    lse_out: torch.Tensor | None = None, **knobs,
):
    """INT4 paged decode attention. q [B, Hq, D] (original basis) -> out [B, Hq, D] q.dtype.

    kv_indices hold token slots (page_size 1) or page ids; kv_lens [B] int32 token counts.
    Graph-capturable when `workspace` and `num_splits` are given (nothing is allocated
    and nothing is read back). impl: "mma" / "triton" (default: decode_impl). Tuning
    knobs (block_n, waves, min_blocks, stages, heads, maxnreg for mma; block_n, num_warps,
    num_stages, waves, prefetch, block_h, asm for triton) default to the impl's config.

    qk_int8=True (triton impl, whole-head groups) rounds the rotated query to int8 per
    row (step = amax / 127) and computes q.k on the integer tensor cores: matches
    reference.decode_attention_ref(..., q_int8=True).

    lse_out [B, Hq] fp32 (optional) receives each head's log2-sum-exp of its scaled scores
    (sm_scale * q.k, soft-capped; -inf for an empty request), to merge with other attention."""
    bsz, hq, hkv, d = _check(q, k_data, k_scales, v_data, v_scales, fmt)
    if qk_int8 and fmt.num_groups != 1:
        raise ValueError(f"qk_int8 needs one group per head (group_size {fmt.group_size} != head_dim {d})")
    impl = impl or ("triton" if qk_int8 else decode_impl(q.device, fmt, hq // hkv))
    cfg = _knobs(impl, fmt, **knobs)
    if num_splits is None:
        num_splits = plan_splits(bsz, hkv, fmt, q.device, max_kv_len, hq, impl, **knobs)
        if workspace is not None:
            num_splits = min(num_splits, workspace.max_splits)
    num_splits = int(num_splits)
    if out is None:
        out = torch.empty_like(q)
    if bsz == 0:
        return out
    if workspace is None:
        workspace = alloc_workspace(bsz, hq, d, num_splits, q.device)
    if not workspace.fits(bsz, hq, d, num_splits):
        raise ValueError(f"workspace {tuple(workspace.mid_o.shape)} too small for batch {bsz}, "
                         f"{hq} heads, D {d}, {num_splits} splits")
    if lse_out is not None and (lse_out.shape != (bsz, hq) or lse_out.dtype != torch.float32
                                or lse_out.stride(1) != 1):
        raise ValueError(f"lse_out must be fp32 [{bsz}, {hq}] with unit head stride")
    if impl == "mma":
        direct = num_splits == 1 and not fmt.v_rotated and lse_out is None
        _split_mma(q, k_data, k_scales, v_data, v_scales, kv_indptr, kv_indices, kv_lens, fmt,
                   sm_scale, page_size, logit_cap, out, workspace, num_splits, cfg, direct)
        min_blocks, pdl = cfg["min_blocks"], cfg["pdl"]
    else:
        direct = num_splits == 1 and lse_out is None
        decode_triton.run_split(q, k_data, k_scales, v_data, v_scales, kv_indptr, kv_indices, kv_lens,
                                fmt, sm_scale, page_size, logit_cap, out, workspace, num_splits, cfg,
                                direct, qk_int8)
        min_blocks, pdl = 1, False
    if not direct:
        merge_splits(out, workspace, kv_lens, fmt, num_splits, cfg["block_n"], min_blocks, pdl, lse_out)
    return out
