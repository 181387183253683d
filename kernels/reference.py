"""Pure-torch references for every kernel (fp32 math). Slow and obviously correct:
tests compare the Triton kernels with these, and the CPU accuracy tool uses them."""

from __future__ import annotations

import math

import torch

from .format import CLAMP, Int4KVFormat, hadamard


def rotate(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """x . H_B over the last dim (block-diagonal normalised Hadamard). Self-inverse."""
    d = x.shape[-1]
    h = hadamard(block_size, torch.float32, x.device)
    y = x.float().reshape(*x.shape[:-1], d // block_size, block_size) @ h
    return y.reshape(x.shape)


def sanitize(x: torch.Tensor) -> torch.Tensor:
    """NaN -> 0, +-inf and huge values -> +-CLAMP: scales stay finite in fp16."""
    return torch.nan_to_num(x.float(), nan=0.0, posinf=CLAMP, neginf=-CLAMP).clamp(-CLAMP, CLAMP)


def quantize(x: torch.Tensor, fmt: Int4KVFormat, rotated: bool, fit: str | None = None,
             affine=None):
    """[..., H, D] float -> (packed uint8 [..., H, D/2], scales fp16 [..., H, NG, 2]).

    `fit` (default fmt.scale_fit) picks each group's (scale, min): "minmax" maps the
    group's min and max to codes 0 and 15; "lsq" keeps those codes and replaces
    (scale, min) by the least-squares fit of the values to them (never a larger
    squared error before the fp16 rounding; same stored format, same readers).
    `affine` = (mul, add) [H, D]: the values first become x * mul + add (a K
    calibration, kernels/calibration.py), clamped, and fp16-rounded when rotated
    (the kernel's rotation dot takes fp16)."""
    x = sanitize(x)
    if affine is not None:
        mul, add = (t.to(x.device, torch.float32) for t in affine)
        x = (x * mul + add).clamp(-CLAMP, CLAMP)
        if rotated:
            x = x.half().float()
    if rotated:
        x = rotate(x, fmt.block_size).clamp(-CLAMP, CLAMP)
    g = fmt.group_size
    xg = x.reshape(*x.shape[:-1], fmt.num_groups, g)
    q, scale, mn = fit_groups(xg, fit or fmt.scale_fit)
    packed = q[..., : g // 2] | (q[..., g // 2 :] << 4)
    packed = packed.reshape(*x.shape[:-1], fmt.head_dim // 2)
    return packed, torch.stack([scale, mn], -1)


def fit_groups(xg: torch.Tensor, fit: str):
    """xg [..., NG, G] fp32 -> (codes uint8, scale fp16, min fp16)."""
    lo, hi = xg.amin(-1), xg.amax(-1)
    scale, mn = ((hi - lo) / 15.0).half(), lo.half()
    # divide by the stored fp16 values so that dequantisation is exact to the code
    s, m = scale.float().unsqueeze(-1), mn.float().unsqueeze(-1)
    inv = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))
    qf = torch.floor((xg - m) * inv + 0.5).clamp(0, 15)
    if fit == "lsq":
        scale, mn = _lsq(xg, qf, scale, mn)
    elif fit != "minmax":
        raise ValueError(f"unknown scale fit {fit!r}")
    return qf.to(torch.uint8), scale, mn


def _lsq(xg, qf, scale, mn):
    """Least-squares (scale, min) of values xg against fixed codes qf, per group:
    scale = cov(q, x) / var(q), min = mean(x) - scale * mean(q), on x - min (no
    large common offset to cancel in fp32). Codes rise with the values, so cov >= 0
    and the scale stays >= 0; a group whose codes are all equal (constant) keeps its
    min-max pair. n * sum(q^2) - sum(q)^2 is an exact integer in fp32 (G <= 256)."""
    n = xg.shape[-1]
    m0 = mn.float()
    xc = xg - m0.unsqueeze(-1)
    sq, sqq = qf.sum(-1), (qf * qf).sum(-1)
    sx, sqx = xc.sum(-1), (qf * xc).sum(-1)
    den = n * sqq - sq * sq
    ok = den > 0
    fs = (n * sqx - sq * sx) / torch.where(ok, den, 1.0)
    fm = m0 + (sx - fs * sq) / n
    fs = torch.where(ok, fs, scale.float()).clamp(0, 65504)
    fm = torch.where(ok, fm, m0).clamp(-65504, 65504)
    return fs.half(), fm.half()


def uncalibrate(x: torch.Tensor, calibration, layer: int) -> torch.Tensor:
    """Values read back in the calibrated basis -> K: x * scale + mean."""
    return x * calibration.scale[layer].to(x.device) + calibration.mean[layer].to(x.device)


def unpack_codes(packed: torch.Tensor, fmt: Int4KVFormat) -> torch.Tensor:
    """packed uint8 [..., D/2] -> codes uint8 [..., D] in channel order."""
    g = fmt.group_size
    p = packed.reshape(*packed.shape[:-1], fmt.num_groups, g // 2)
    q = torch.cat([p & 0xF, p >> 4], -1)
    return q.reshape(*packed.shape[:-1], fmt.head_dim)


def dequantize_values(packed, scales, fmt: Int4KVFormat, rotated: bool, unrotate=True):
    """(packed, scales) -> fp32 values; back in the original basis when `unrotate`."""
    q = unpack_codes(packed, fmt).float()
    qg = q.reshape(*q.shape[:-1], fmt.num_groups, fmt.group_size)
    sc = scales.float()
    x = (qg * sc[..., 0:1] + sc[..., 1:2]).reshape(q.shape)
    if rotated and unrotate:
        x = rotate(x, fmt.block_size)
    return x


def quantize_and_store_ref(k, v, loc, k_data, k_scales, v_data, v_scales, fmt: Int4KVFormat,
                           k_affine=None):
    """Write quantized k, v [T, H, D] at slots loc [T] (last write wins on repeats);
    k_affine: the layer's K calibration (mul, add) [H, D]."""
    kd, ks = quantize(k, fmt, fmt.k_rotated, affine=k_affine)
    vd, vs = quantize(v, fmt, fmt.v_rotated)
    loc = loc.long()
    k_data[loc], k_scales[loc] = kd, ks
    v_data[loc], v_scales[loc] = vd, vs


def dequantize_ref(data, scales, loc, fmt: Int4KVFormat, rotated: bool, dtype=torch.bfloat16, out=None):
    """Slots -> [T, H, D] values in the original basis (un-rotated when `rotated`)."""
    loc = loc.long()
    x = dequantize_values(data[loc], scales[loc], fmt, rotated)
    return x.to(dtype) if out is None else out.copy_(x)


def token_slots(kv_indptr, kv_indices, kv_lens, b: int, page_size: int) -> torch.Tensor:
    """Slots of request b's tokens: kv_indices holds slots (page_size 1) or page ids."""
    n = int(kv_lens[b])
    entries = kv_indices[int(kv_indptr[b]) : int(kv_indptr[b + 1])].long()
    if page_size == 1:
        return entries[:n]
    t = torch.arange(n, device=entries.device)
    return entries[t // page_size] * page_size + t % page_size


def _attend(q, k, v, sm_scale, logit_cap, mask=None):
    """q [M, Hq, D], k/v [N, Hkv, D] fp32 -> (o [M, Hq, D], lse [M, Hq]) natural log."""
    hq, hkv = q.shape[1], k.shape[1]
    k = k.repeat_interleave(hq // hkv, dim=1)
    v = v.repeat_interleave(hq // hkv, dim=1)
    s = torch.einsum("mhd,nhd->hmn", q.float(), k) * sm_scale
    if logit_cap > 0:
        s = logit_cap * torch.tanh(s / logit_cap)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse.unsqueeze(-1)).nan_to_num(0.0)
    o = torch.einsum("hmn,nhd->mhd", p, v)
    return o, lse.transpose(0, 1)


def round_query_int8(q: torch.Tensor, fmt: Int4KVFormat) -> torch.Tensor:
    """q [..., D] -> the query an INT8 q.k kernel uses (fp32, original basis): rounded in
    K's basis, per row, symmetric: step = amax|q| / 127, codes floor(q / step + 0.5)."""
    x = rotate(q, fmt.block_size) if fmt.k_rotated else q.float()
    amax = x.abs().amax(-1, keepdim=True)
    step = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    x = torch.floor(x / step + 0.5).clamp(-127, 127) * step
    return rotate(x, fmt.block_size) if fmt.k_rotated else x


def decode_attention_ref(
    q, k_data, k_scales, v_data, v_scales, kv_indptr, kv_indices, kv_lens,
    fmt: Int4KVFormat, sm_scale: float, page_size: int = 1, logit_cap: float = 0.0,
    q_int8: bool = False,
):
    """q [B, Hq, D] (original basis) -> o [B, Hq, D] in q.dtype.
    A request with no tokens gets a zero output. q_int8: q rounded by round_query_int8
    first (the arithmetic of decode_attention(..., qk_int8=True))."""
    out = torch.zeros_like(q, dtype=torch.float32)
    for b in range(q.shape[0]):
        slots = token_slots(kv_indptr, kv_indices, kv_lens, b, page_size)
        if slots.numel() == 0:
            continue
        k = dequantize_values(k_data[slots], k_scales[slots], fmt, fmt.k_rotated)
        v = dequantize_values(v_data[slots], v_scales[slots], fmt, fmt.v_rotated)
        qb = round_query_int8(q[b : b + 1], fmt) if q_int8 else q[b : b + 1]
        o, _ = _attend(qb, k, v, sm_scale, logit_cap)
        out[b] = o[0]
    return out.to(q.dtype)


def prefix_attention_ref(
    q, qo_indptr, k_data, k_scales, v_data, v_scales, kv_indptr, kv_indices, kv_lens,
    fmt: Int4KVFormat, sm_scale: float, page_size: int = 1, logit_cap: float = 0.0,
):
    """Extend queries q [Nq, Hq, D] over their cached INT4 prefixes (every prefix token
    precedes every new query, so no mask). Returns (o [Nq, Hq, D] q.dtype,
    lse [Nq, Hq] fp32, natural log; -inf for an empty prefix, with o = 0)."""
    o = torch.zeros_like(q, dtype=torch.float32)
    lse = torch.full(q.shape[:2], float("-inf"), dtype=torch.float32, device=q.device)
    for b in range(qo_indptr.numel() - 1):
        a, e = int(qo_indptr[b]), int(qo_indptr[b + 1])
        slots = token_slots(kv_indptr, kv_indices, kv_lens, b, page_size)
        if slots.numel() == 0 or e == a:
            continue
        k = dequantize_values(k_data[slots], k_scales[slots], fmt, fmt.k_rotated)
        v = dequantize_values(v_data[slots], v_scales[slots], fmt, fmt.v_rotated)
        o[a:e], lse[a:e] = _attend(q[a:e], k, v, sm_scale, logit_cap)
    return o.to(q.dtype), lse


def attention_lse_merge(o1, lse1, o2, lse2):
    """Merge two partial attentions (natural-log lse), like flashinfer.merge_state."""
    m = torch.maximum(lse1, lse2)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w1, w2 = torch.exp(lse1 - m), torch.exp(lse2 - m)
    den = w1 + w2
    o = (o1.float() * w1.unsqueeze(-1) + o2.float() * w2.unsqueeze(-1)) / den.unsqueeze(-1)
    return o, m + torch.log(den)


def default_sm_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
