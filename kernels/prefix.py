"""INT4 prefix attention for the extend/prefill phase.

The new (extend) queries of each request attend that request's cached INT4 prefix.
Every prefix token precedes every new query, so there is no mask; the caller merges
the result by log-sum-exp with its own attention over the new chunk (fresh BF16 k/v).

One program = one KV head x BLOCK_M query tokens of one request, with all GQA query
heads of that KV head stacked as rows (rows = tokens x heads), so each INT4 KV tile
is read once per query block and fed to tensor-core dots. KV tiles are dequantised
in registers only:

* codes -> fp16 by bits: (nibble | 0x6400) is the fp16 1024 + nibble, minus 1024;
* packed byte j of a group holds element j (low nibble) and j + G/2 (high nibble),
  so the low and high nibbles of a [tokens, D/2] tile are two half-width operands.
  The query is loaded (or rotated) straight into the matching two column sets, and
  the score is dot(q_lo, lo^T) + dot(q_hi, hi^T): no interleave, no shuffle;
* with one group per head the zero-point folds out of the dots:
  score = scale_k * (q . codes) + min_k * sum(q),  o += (p * scale_v) @ codes + p @ min_v;
  with smaller groups the tile is dequantised per element in fp16 (c * scale + min).

Rotation: q . H_B is a dot with an exact +-1 Sylvester matrix built from index bits
(H[i, j] = (-1)^popcount(i & j) inside a B-block), times 1/sqrt(B) in fp32; when V
was stored rotated, the output is rotated back the same way before the store.

Few query blocks over long prefixes (a short extend on a long cached context) would
leave most SMs idle: the prefix is then split into slices, each program writes an
fp32 partial (o, lse), and the slices are merged by log-sum-exp.

LSE: natural log, -inf (with o = 0) where the prefix is empty. FlashInfer's
`merge_state` / `return_lse` use base 2 (its state keeps m + log2(d) and merges with
exp2): convert with `to_flashinfer_lse` before mixing with FlashInfer states.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from .format import Int4KVFormat, block_hadamard
from .tiles import hadamard_signs, online_softmax_step, softcap_exp2

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


def to_flashinfer_lse(lse: torch.Tensor) -> torch.Tensor:
    """Our natural-log lse -> FlashInfer's base-2 lse (log2(sum exp2(s * log2 e))).
    -inf (empty prefix) stays -inf, which FlashInfer's merge weights as zero."""
    return lse * LOG2E


def from_flashinfer_lse(lse2: torch.Tensor) -> torch.Tensor:
    """FlashInfer's base-2 lse -> natural log."""
    return lse2 * LN2


@triton.jit
def _codes_f16(packed):
    """uint8 packed nibbles -> (low, high) codes as exact fp16 via the 1024 bit trick."""
    x = packed.to(tl.uint16)
    lo = ((x & 0xF) | 0x6400).to(tl.float16, bitcast=True) - 1024.0
    hi = ((x >> 4) | 0x6400).to(tl.float16, bitcast=True) - 1024.0
    return lo, hi


@triton.jit(do_not_specialize=['stride_qt', 'stride_os', 'stride_ot', 'stride_ls', 'stride_lt', 'num_splits'])
def _prefix_attn_kernel(
    Q, O, LSE,
    QO_INDPTR, KV_INDPTR, KV_INDICES, KV_LENS,
    KD, KS, VD, VS,
    stride_qt, stride_qh, stride_os, stride_ot, stride_oh, stride_ls, stride_lt, stride_lh,
    stride_kdr, stride_kdh, stride_ksr, stride_ksh, stride_ksg,
    stride_vdr, stride_vdh, stride_vsr, stride_vsh, stride_vsg,
    q_scale, o_scale, logit_cap, num_splits,
    GQA: tl.constexpr, GQA_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    D: tl.constexpr, G: tl.constexpr, NG: tl.constexpr, PAGE: tl.constexpr,
    ROT_K: tl.constexpr, ROT_V: tl.constexpr, B: tl.constexpr, LOG2B: tl.constexpr,
    KC: tl.constexpr, USE_CAP: tl.constexpr,
):
    kvh = tl.program_id(0)
    qb = tl.program_id(1)
    req = tl.program_id(2) // num_splits
    split = tl.program_id(2) % num_splits
    MR: tl.constexpr = BLOCK_M * GQA_PAD
    D2: tl.constexpr = D // 2
    G2: tl.constexpr = G // 2

    q_start = tl.load(QO_INDPTR + req)
    q_len = tl.load(QO_INDPTR + req + 1) - q_start
    tok0 = qb * BLOCK_M
    if tok0 >= q_len:
        return
    kv_len = tl.load(KV_LENS + req)
    # split-KV: this program takes a BLOCK_N-aligned slice of the prefix
    per_split = tl.cdiv(tl.cdiv(kv_len, num_splits), BLOCK_N) * BLOCK_N
    kv_lo = split * per_split
    kv_hi = tl.minimum(kv_lo + per_split, kv_len)
    kv_base = tl.load(KV_INDPTR + req).to(tl.int64)

    rows = tl.arange(0, MR)
    tok = tok0 + rows // GQA_PAD
    head = kvh * GQA + rows % GQA_PAD
    row_ok = (tok < q_len) & ((rows % GQA_PAD) < GQA)
    q_row = Q + (q_start + tok).to(tl.int64) * stride_qt + head * stride_qh

    # Column p of a half-width operand is element d_lo(p) (low nibble) or d_lo(p) + G/2.
    p = tl.arange(0, D2)
    d_lo = (p // G2) * G + p % G2
    d_hi = d_lo + G2

    # ---- prologue: q in the packed column order, rotated, pre-scaled, fp16 ----------
    if ROT_K:
        q_lo = tl.zeros([MR, D2], dtype=tl.float32)
        q_hi = tl.zeros([MR, D2], dtype=tl.float32)
        for kc in tl.static_range(D // KC):
            i = kc * KC + tl.arange(0, KC)
            qc = tl.load(q_row[:, None] + i[None, :], mask=row_ok[:, None], other=0.0)
            qc = qc.to(tl.float16)
            q_lo += tl.dot(qc, hadamard_signs(i, d_lo, B, LOG2B))
            q_hi += tl.dot(qc, hadamard_signs(i, d_hi, B, LOG2B))
    else:
        q_lo = tl.load(q_row[:, None] + d_lo[None, :], mask=row_ok[:, None], other=0.0)
        q_hi = tl.load(q_row[:, None] + d_hi[None, :], mask=row_ok[:, None], other=0.0)
    # q_scale = sm_scale (/ sqrt(B) when rotated) (* log2 e without soft-cap)
    q_lo = (q_lo.to(tl.float32) * q_scale).to(tl.float16)
    q_hi = (q_hi.to(tl.float32) * q_scale).to(tl.float16)
    if NG == 1:
        q_sum = tl.sum(q_lo.to(tl.float32), 1) + tl.sum(q_hi.to(tl.float32), 1)

    m_i = tl.full([MR], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([MR], dtype=tl.float32)
    acc_lo = tl.zeros([MR, D2], dtype=tl.float32)
    acc_hi = tl.zeros([MR, D2], dtype=tl.float32)
    acc_min = tl.zeros([MR], dtype=tl.float32)  # p @ min_v (NG == 1)

    for start in range(kv_lo, kv_hi, BLOCK_N):
        t = start + tl.arange(0, BLOCK_N)
        t_ok = t < kv_hi
        if PAGE == 1:
            slot = tl.load(KV_INDICES + kv_base + t, mask=t_ok, other=0).to(tl.int64)
        else:
            page = tl.load(KV_INDICES + kv_base + t // PAGE, mask=t_ok, other=0).to(tl.int64)
            slot = page * PAGE + t % PAGE

        # ---- K: [D/2, N] packed tile (transposed load), scores [MR, N] ----
        kp = tl.load(KD + slot[None, :] * stride_kdr + kvh * stride_kdh + p[:, None],
                     mask=t_ok[None, :], other=0)
        k_lo, k_hi = _codes_f16(kp)
        ks_ptr = KS + slot * stride_ksr + kvh * stride_ksh
        if NG == 1:
            k_s = tl.load(ks_ptr, mask=t_ok, other=0.0).to(tl.float32)
            k_m = tl.load(ks_ptr + 1, mask=t_ok, other=0.0).to(tl.float32)
            qk = tl.dot(q_lo, k_lo) + tl.dot(q_hi, k_hi)
            s = qk * k_s[None, :] + q_sum[:, None] * k_m[None, :]
        else:
            # per-column group scales gathered directly (repeats hit L1): no reshape
            sp = ks_ptr[None, :] + (p // G2)[:, None] * stride_ksg  # [D/2, N]
            k_s = tl.load(sp, mask=t_ok[None, :], other=0.0)
            k_m = tl.load(sp + 1, mask=t_ok[None, :], other=0.0)
            s = tl.dot(q_lo, k_lo * k_s + k_m) + tl.dot(q_hi, k_hi * k_s + k_m)
        if USE_CAP:
            s = softcap_exp2(s, logit_cap)
        s = tl.where(t_ok[None, :], s, float("-inf"))
        pr, alpha, m_i, l_i = online_softmax_step(s, m_i, l_i)  # base 2

        # ---- V: [N, D/2] packed tile ----
        vp = tl.load(VD + slot[:, None] * stride_vdr + kvh * stride_vdh + p[None, :],
                     mask=t_ok[:, None], other=0)
        v_lo, v_hi = _codes_f16(vp)
        vs_ptr = VS + slot * stride_vsr + kvh * stride_vsh
        acc_lo = acc_lo * alpha[:, None]
        acc_hi = acc_hi * alpha[:, None]
        if NG == 1:
            v_s = tl.load(vs_ptr, mask=t_ok, other=0.0).to(tl.float32)
            v_m = tl.load(vs_ptr + 1, mask=t_ok, other=0.0).to(tl.float32)
            ps = (pr * v_s[None, :]).to(tl.float16)
            acc_lo += tl.dot(ps, v_lo)
            acc_hi += tl.dot(ps, v_hi)
            acc_min = acc_min * alpha + tl.sum(pr * v_m[None, :], 1)
        else:
            sp = vs_ptr[:, None] + (p // G2)[None, :] * stride_vsg  # [N, D/2]
            v_s = tl.load(sp, mask=t_ok[:, None], other=0.0)
            v_m = tl.load(sp + 1, mask=t_ok[:, None], other=0.0)
            p16 = pr.to(tl.float16)
            acc_lo += tl.dot(p16, v_lo * v_s + v_m)
            acc_hi += tl.dot(p16, v_hi * v_s + v_m)

    # ---- epilogue: normalise, rotate V back, store o and lse ----
    has = l_i > 0.0
    inv_l = tl.where(has, 1.0 / tl.where(has, l_i, 1.0), 0.0)
    o_lo = (acc_lo + acc_min[:, None]) * inv_l[:, None]
    o_hi = (acc_hi + acc_min[:, None]) * inv_l[:, None]
    o_row = O + split * stride_os + (q_start + tok).to(tl.int64) * stride_ot + head * stride_oh
    if ROT_V:
        o_lo16 = o_lo.to(tl.float16)
        o_hi16 = o_hi.to(tl.float16)
        for oc in tl.static_range(D // KC):
            d = oc * KC + tl.arange(0, KC)
            oo = tl.dot(o_lo16, hadamard_signs(d_lo, d, B, LOG2B))
            oo += tl.dot(o_hi16, hadamard_signs(d_hi, d, B, LOG2B))
            oo = oo * o_scale
            tl.store(o_row[:, None] + d[None, :], oo.to(O.dtype.element_ty), mask=row_ok[:, None])
    else:
        tl.store(o_row[:, None] + d_lo[None, :], o_lo.to(O.dtype.element_ty), mask=row_ok[:, None])
        tl.store(o_row[:, None] + d_hi[None, :], o_hi.to(O.dtype.element_ty), mask=row_ok[:, None])
    lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) * 0.6931471805599453,
                   float("-inf"))
    lse_ptr = LSE + split * stride_ls + (q_start + tok).to(tl.int64) * stride_lt + head * stride_lh
    tl.store(lse_ptr, lse, mask=row_ok)


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def _launch_config(head_dim: int, gqa_pad: int, on_gpu: bool):
    """(rows per program, BLOCK_N, num_warps, num_stages). Rows = query tokens x GQA heads."""
    if not on_gpu:  # Triton interpreter: small tiles keep the CPU tests fast
        return max(16, gqa_pad), 16, 4, 1
    if head_dim >= 256:
        return 64, 32, 8, 2
    if head_dim >= 128:
        return 128, 64, 8, 2
    return 128, 64, 4, 2


def prefix_attention(
    q, qo_indptr, k_data, k_scales, v_data, v_scales, kv_indptr, kv_indices, kv_lens,
    fmt: Int4KVFormat, sm_scale: float, page_size: int = 1, logit_cap: float = 0.0,
    max_q_len: int | None = None, max_kv_len: int | None = None, num_splits: int | None = None,
    *, block_rows: int | None = None, block_n: int | None = None,
    num_warps: int | None = None, num_stages: int | None = None,
    host_rotation: bool | None = None,
):
    """Extend queries q [Nq, Hq, D] (original basis) over their cached INT4 prefixes.

    qo_indptr [B+1]: query rows of request b are qo_indptr[b]:qo_indptr[b+1].
    kv_indptr [B+1] / kv_indices: token slots (page_size 1) or page ids (page_size > 1:
    token t sits at slot kv_indices[kv_indptr[b] + t // P] * P + t % P); kv_lens [B]
    prefix token counts. max_q_len: the largest per-request query count if the caller
    knows it on the host (avoids a device sync); it must not be smaller than the truth.
    max_kv_len: optional host-known longest prefix, only used to size the split count.
    num_splits: split each prefix into this many slices (None: enough programs to fill
    the GPU when there are few query blocks); slices are merged by log-sum-exp.

    block_rows / block_n / num_warps / num_stages override the launch configuration
    (tuning and fault isolation; the defaults come from `_launch_config`).
    host_rotation: rotate q / o with torch around the kernel instead of inside it
    (None: only at head_dim 64 on the GPU, see the comment in the body).

    Returns (o [Nq, Hq, D] in q.dtype, lse [Nq, Hq] fp32, natural log); a request with
    an empty prefix gets o = 0 and lse = -inf, so a log-sum-exp merge returns the other
    side unchanged. Use `to_flashinfer_lse` before FlashInfer's merge_state.
    """
    nq, hq, d = q.shape
    if d != fmt.head_dim:
        raise ValueError(f"q head_dim {d} does not match the KV format's {fmt.head_dim}")
    hkv = k_data.shape[1]
    if hq % hkv:
        raise ValueError(f"query heads {hq} are not a multiple of KV heads {hkv}")
    if fmt.group_size < 32 or d not in (64, 128, 256):
        raise ValueError(
            f"prefix_attention supports head_dim 64/128/256 and group size >= 32, "
            f"got head_dim {d}, group {fmt.group_size}"
        )
    if q.stride(-1) != 1:
        q = q.contiguous()
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((nq, hq), dtype=torch.float32, device=q.device)
    batch = qo_indptr.numel() - 1
    if nq == 0 or batch <= 0:
        return o, lse
    if max_q_len is None:
        max_q_len = int((qo_indptr[1:] - qo_indptr[:-1]).max().item())
    if max_q_len <= 0:
        return o, lse

    gqa = hq // hkv
    gqa_pad = _next_pow2(gqa)
    rows, bn, warps, stages = _launch_config(d, gqa_pad, q.is_cuda)
    rows = max(block_rows or rows, gqa_pad, 16)
    bn = block_n or bn
    warps, stages = num_warps or warps, num_stages or stages
    block_m = rows // gqa_pad

    rot_k, rot_v = fmt.k_rotated, fmt.v_rotated
    b = fmt.block_size
    # On sm_90 (Triton 3.6) the in-register rotation at head_dim 64 gave wrong results
    # or illegal addresses (docs/gpu-runs.md, run 7; head_dim 128/256 and no rotation
    # were right): there torch rotates q before the kernel and o after it, in fp32.
    h_host = None
    if host_rotation is None:
        host_rotation = q.is_cuda and d == 64
    if host_rotation and (rot_k or rot_v):
        h_host = _device_hadamard(d, b, q.device)
        if rot_k:
            q = q.float() @ h_host
        o_v = o
        if rot_v:
            o = torch.empty(q.shape, dtype=torch.float32, device=q.device)
        rot_k = rot_v = False
    q_scale = sm_scale / math.sqrt(b) if rot_k else sm_scale
    use_cap = logit_cap > 0
    if not use_cap:
        q_scale *= LOG2E  # scores go straight into exp2
    n_qb = triton.cdiv(max_q_len, block_m)
    if num_splits is None:
        num_splits = _auto_splits(hkv * n_qb * batch, max_kv_len, q.device)
    num_splits = max(1, int(num_splits))
    if num_splits == 1:
        o_buf, lse_buf, s_o, s_l = o, lse, 0, 0
    else:
        o_buf = torch.empty((num_splits, nq, hq, d), dtype=torch.float32, device=q.device)
        lse_buf = torch.empty((num_splits, nq, hq), dtype=torch.float32, device=q.device)
        s_o, s_l = o_buf.stride(0), lse_buf.stride(0)
    grid = (hkv, n_qb, batch * num_splits)
    _prefix_attn_kernel[grid](
        q, o_buf, lse_buf, qo_indptr, kv_indptr, kv_indices, kv_lens,
        k_data, k_scales, v_data, v_scales,
        q.stride(0), q.stride(1), s_o, o.stride(0), o.stride(1), s_l, lse.stride(0), lse.stride(1),
        k_data.stride(0), k_data.stride(1), k_scales.stride(0), k_scales.stride(1), k_scales.stride(2),
        v_data.stride(0), v_data.stride(1), v_scales.stride(0), v_scales.stride(1), v_scales.stride(2),
        float(q_scale), 1.0 / math.sqrt(b), float(logit_cap), num_splits,
        GQA=gqa, GQA_PAD=gqa_pad, BLOCK_M=block_m, BLOCK_N=bn,
        D=d, G=fmt.group_size, NG=fmt.num_groups, PAGE=page_size,
        ROT_K=rot_k, ROT_V=rot_v, B=b, LOG2B=max(1, b.bit_length() - 1),
        KC=min(d, 64), USE_CAP=use_cap,
        num_warps=warps, num_stages=stages,
    )
    if num_splits > 1:
        _merge_splits(o_buf, lse_buf, o, lse)
    if h_host is not None and fmt.v_rotated:
        o_v.copy_(o @ h_host)  # normalised H_B is symmetric and orthogonal: H^-1 = H
        o = o_v
    return o, lse


def _merge_splits(o_buf, lse_buf, o, lse):
    """Log-sum-exp merge of the per-slice partial states (empty slices: lse -inf, o 0)."""
    m = lse_buf.amax(0)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w = torch.exp(lse_buf - m)
    den = w.sum(0)
    o.copy_((o_buf * w.unsqueeze(-1)).sum(0) / den.clamp_min(1e-30).unsqueeze(-1))
    lse.copy_(torch.where(den > 0, m + torch.log(den), torch.full_like(den, float("-inf"))))


@functools.lru_cache(maxsize=None)
def _device_hadamard(head_dim: int, block: int, device: torch.device) -> torch.Tensor:
    """fp32 H_B on the device, built once (not a host->device copy per layer and step)."""
    return block_hadamard(head_dim, block, torch.float32, device)


@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _auto_splits(programs: int, max_kv_len: int | None, device) -> int:
    """Few query blocks over long prefixes would leave most SMs idle: split the prefix
    (at most 16 slices, at least 512 prefix tokens each when max_kv_len is known)."""
    if device.type != "cuda":
        return 1
    sms = _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    if programs >= sms:
        return 1
    s = min(16, triton.cdiv(sms, programs))
    if max_kv_len is not None:
        s = min(s, max(1, triton.cdiv(max_kv_len, 512)))
    return s
