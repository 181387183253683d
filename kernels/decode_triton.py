"""Portable INT4 split-KV decode attention in plain Triton: the path of the Triton
interpreter (CPU tests), of group sizes smaller than head_dim, and of the optional INT8
q.k (`qk_int8`). GPUs with tensor cores and whole-head groups run decode_mma instead.

Grid (kv head, split, batch), the kv head fastest. One program serves all query heads of
its KV head (the GQA group, padded for tl.dot), so every KV byte is read once.

Arithmetic (no integer->float conversion instructions on the hot path):
  * a nibble n becomes fp16 by bits: (n | 0x6400) is the fp16 1024 + n, exact;
  * group_size == head_dim: the zero point folds into per-token scalars:
        q.k   = s_k * (q . n) + m_k * sum(q)
        p @ v = (p s_v) @ n + sum_n p m_v   (the last term per row)
    K keeps the 1024 bias (removed by a per-row constant); V subtracts it in fp16 before
    its dot (left in, it would cancel in the accumulator over a long split);
  * smaller groups: codes are dequantised in registers (fp16) and dotted directly.
q is rotated in the prologue (q . H_B, signs from index parities), the output rotated back
when V was rotated. Splits write normalised partial outputs and log2-sum-exp; one split
writes the output directly.
"""

from __future__ import annotations

import math
import os

import triton
import triton.language as tl

from .tiles import hadamard_signs, online_softmax_step, softcap_exp2, split_length

# Tuning table keyed by (head_dim, group_size); "waves" = target programs per SM used by
# the split policy. Update from `python -m saw_sglang.bench.kernels --tune`.
DEFAULT_CONFIGS: dict[tuple[int, int], dict] = {
    (64, 64): dict(block_n=64, num_warps=4, num_stages=3, waves=8, prefetch=False),
    # H200, 32/8 heads, random slots (bench --tune-only, docs/gpu-runs.md, 2026-11-29): best at
    # 64 x 8k (0.444 ms vs FlashInfer BF16 0.494); at 16 x 8k waves=2 was best (0.122 ms)
    # block_h: the query-head rows padded up to at least this (the MMA pads to 16 itself;
    # 8 instead of 16 halves the per-score softmax work, dev/sass: -12% loop instructions)
    (128, 128): dict(block_n=128, num_warps=4, num_stages=3, waves=8, prefetch=False, block_h=8),
    (256, 256): dict(block_n=32, num_warps=4, num_stages=3, waves=8, prefetch=False),
}
KNOBS = ("block_n", "num_warps", "num_stages", "waves", "prefetch", "block_h", "asm")
FALLBACK_CONFIG = dict(block_n=32, num_warps=4, num_stages=2, waves=8, prefetch=False)

def get_config(head_dim: int, group_size: int) -> dict:
    return dict(DEFAULT_CONFIGS.get((head_dim, group_size), FALLBACK_CONFIG))



def _use_asm(q) -> bool:
    """Inline PTX only on a real CUDA device (the Triton interpreter cannot run it);
    SAW_INT4_DECODE_ASM=0 selects the plain-Triton unpack (for comparisons)."""
    return (q.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1"
            and os.environ.get("SAW_INT4_DECODE_ASM", "1") != "0")


# Nibbles -> exact fp16 codes n. On the GPU one inline-PTX block turns 4 packed bytes
# into 4 fp16 codes with 2 PRMT + 2 LOP3 + 2 HSUB2 (plus a shift for the high nibbles):
# the byte pair is spread into the two 16-bit halves, the nibble OR'ed into the mantissa
# of fp16 1024.0 (0x6400), and 1024 subtracted in fp16x2 - no int->float conversions.
# The interpreter (CPU tests) cannot run PTX and takes the plain-Triton path, bit-exact.
# Spreads the byte pair of packed word $IN into the two 16-bit lanes of t0 / t1.
_ASM_SPREAD = """.reg .b32 t0, t1, m, z;
mov.b32 m, 0x64006400;
mov.b32 z, 0;
prmt.b32 t0, $IN, z, 0x4140;
prmt.b32 t1, $IN, z, 0x4342;
"""
_ASM_CODES = "{\n" + _ASM_SPREAD.replace("$IN", "$2") + """SHIFT
lop3.b32 t0, t0, 0x000F000F, m, 0xEA;
lop3.b32 t1, t1, 0x000F000F, m, 0xEA;
sub.f16x2 $0, t0, m;
sub.f16x2 $1, t1, m;
}"""
_ASM_LO = tl.constexpr(_ASM_CODES.replace("SHIFT", ""))
_ASM_HI = tl.constexpr(_ASM_CODES.replace("SHIFT", "shr.b32 t0, t0, 4;\nshr.b32 t1, t1, 4;"))


# Whole-head groups take both planes from one PTX block: the byte pair spread into two
# 16-bit lanes (PRMT) serves the low plane (b & 0x0F | 0x6400 = 1024 + lo) and the high
# plane (b & 0xF0 | 0x6400 = 1024 + 16 hi, no shift: the 1/16 is folded into q or the
# output). SUB=False keeps the 1024 bias (folded into a per-row constant for K, whose
# per-token dot has no long accumulation); SUB=True removes it (V accumulates over the
# whole split, where the bias would cancel catastrophically).
_ASM_PAIR = "{\n" + _ASM_SPREAD.replace("$IN", "$4") + """lop3.b32 $0, t0, 0x000F000F, m, 0xEA;
lop3.b32 $1, t1, 0x000F000F, m, 0xEA;
lop3.b32 $2, t0, 0x00F000F0, m, 0xEA;
lop3.b32 $3, t1, 0x00F000F0, m, 0xEA;
SUB
}"""
_ASM_PAIR_BIASED = tl.constexpr(_ASM_PAIR.replace("SUB", ""))
_ASM_PAIR_EXACT = tl.constexpr(_ASM_PAIR.replace("SUB", "".join(
    f"sub.f16x2 ${i}, ${i}, m;\n" for i in range(4))))


@triton.jit
def _code_planes(c, SUB: tl.constexpr, USE_ASM: tl.constexpr):
    """bytes -> (low plane, 16 x high plane) as fp16; + 1024 on both unless SUB."""
    if USE_ASM:
        if SUB:
            asm: tl.constexpr = _ASM_PAIR_EXACT
        else:
            asm: tl.constexpr = _ASM_PAIR_BIASED
        return tl.inline_asm_elementwise(asm, "=r,=r,=r,=r,r", [c], dtype=(tl.float16, tl.float16),
                                         is_pure=True, pack=4)
    lo = ((c & 15).to(tl.uint16) | 0x6400).to(tl.float16, bitcast=True)
    hi = ((c & 240).to(tl.uint16) | 0x6400).to(tl.float16, bitcast=True)
    if SUB:
        lo = lo - 1024.0
        hi = hi - 1024.0
    return lo, hi


# INT8 q.k (qk_int8): the two nibble planes as int8 codes 0..15 for the integer tensor
# cores: the low plane is one AND per 4 codes, the high plane a shift and an AND.
_ASM_I8 = tl.constexpr("""{
.reg .b32 t;
and.b32 $0, $2, 0x0F0F0F0F;
shr.b32 t, $2, 4;
and.b32 $1, t, 0x0F0F0F0F;
}""")


@triton.jit
def _code_planes_i8(c, USE_ASM: tl.constexpr):
    """bytes -> (low plane, high plane) as int8 codes 0..15."""
    if USE_ASM:
        return tl.inline_asm_elementwise(_ASM_I8, "=r,=r,r", [c], dtype=(tl.int8, tl.int8),
                                         is_pure=True, pack=4)
    return (c & 15).to(tl.int8), (c >> 4).to(tl.int8)


@triton.jit
def _codes_lo(c, USE_ASM: tl.constexpr):
    """low nibble of each byte -> fp16 code 0..15"""
    if USE_ASM:
        return tl.inline_asm_elementwise(_ASM_LO, "=r,=r,r", [c], dtype=tl.float16,
                                         is_pure=True, pack=4)
    return ((c & 15).to(tl.uint16) | 0x6400).to(tl.float16, bitcast=True) - 1024.0


@triton.jit
def _codes_hi(c, USE_ASM: tl.constexpr):
    """high nibble of each byte -> fp16 code 0..15"""
    if USE_ASM:
        return tl.inline_asm_elementwise(_ASM_HI, "=r,=r,r", [c], dtype=tl.float16,
                                         is_pure=True, pack=4)
    return ((c >> 4).to(tl.uint16) | 0x6400).to(tl.float16, bitcast=True) - 1024.0


@triton.jit
def _block_slots(indices_ptr, req_base, n0, offs_n, end, PAGE: tl.constexpr, BLOCK_N: tl.constexpr):
    """Slots of tokens n0 + offs_n; tokens past `end` read slot 0 (page 0: always valid
    rows), so the data gathers need no mask."""
    nmask = offs_n < (end - n0)  # scalar bound and base: per-token int32 work only
    base = indices_ptr + req_base
    if PAGE == 1:
        return tl.load(base + n0 + offs_n, mask=nmask, other=0).to(tl.int64)
    # int32 slot arithmetic (slots < 2^31), widened once for the byte offsets
    if BLOCK_N % PAGE == 0:  # n0 is a multiple of the page: split t = n0 + offs_n
        page = tl.load(base + n0 // PAGE + offs_n // PAGE, mask=nmask, other=0)
        return (page * PAGE + (offs_n % PAGE)).to(tl.int64)
    t = n0 + offs_n
    page = tl.load(base + t // PAGE, mask=nmask, other=0)
    return (page * PAGE + (t % PAGE)).to(tl.int64)


@triton.jit
def _load_block(kd_head, ks_head, vd_head, vs_head, slot,
                stride_kd_t, stride_ks_t, stride_vd_t, stride_vs_t,
                HALF: tl.constexpr, NG: tl.constexpr, GH: tl.constexpr):
    """Packed K and V codes of a block of slots and their fp32 scale/min, K and V issued
    together (one memory latency for both)."""
    if NG == 1:
        offs_j = tl.arange(0, HALF)
        kc = tl.load(kd_head + slot[:, None] * stride_kd_t + offs_j[None, :])
        vc = tl.load(vd_head + slot[:, None] * stride_vd_t + offs_j[None, :])
        k_s = tl.load(ks_head + slot * stride_ks_t).to(tl.float32)
        k_m = tl.load(ks_head + slot * stride_ks_t + 1).to(tl.float32)
        v_s = tl.load(vs_head + slot * stride_vs_t).to(tl.float32)
        v_m = tl.load(vs_head + slot * stride_vs_t + 1).to(tl.float32)
    else:
        offs_g = tl.arange(0, NG)
        byte3 = offs_g[None, :, None] * GH + tl.arange(0, GH)[None, None, :]
        kc = tl.load(kd_head + slot[:, None, None] * stride_kd_t + byte3)
        vc = tl.load(vd_head + slot[:, None, None] * stride_vd_t + byte3)
        ksp = ks_head + slot[:, None] * stride_ks_t + offs_g[None, :] * 2
        vsp = vs_head + slot[:, None] * stride_vs_t + offs_g[None, :] * 2
        k_s = tl.load(ksp).to(tl.float32)[:, :, None]
        k_m = tl.load(ksp + 1).to(tl.float32)[:, :, None]
        v_s = tl.load(vsp).to(tl.float32)[:, :, None]
        v_m = tl.load(vsp + 1).to(tl.float32)[:, :, None]
    return kc, k_s, k_m, vc, v_s, v_m


@triton.jit
def _load_rows(d_head, s_head, slot, stride_d_t, stride_s_t,
               HALF: tl.constexpr, NG: tl.constexpr, GH: tl.constexpr):
    """Packed codes of one tensor (K or V) for a block of slots, and its fp32 scale/min."""
    if NG == 1:
        c = tl.load(d_head + slot[:, None] * stride_d_t + tl.arange(0, HALF)[None, :])
        # (scale, min) as one 4-byte load per token
        sc, mn = tl.split(tl.load(s_head + slot[:, None] * stride_s_t + tl.arange(0, 2)[None, :]))
        sc = sc.to(tl.float32)
        mn = mn.to(tl.float32)
    else:
        offs_g = tl.arange(0, NG)
        byte3 = offs_g[None, :, None] * GH + tl.arange(0, GH)[None, None, :]
        c = tl.load(d_head + slot[:, None, None] * stride_d_t + byte3)
        sp = s_head + slot[:, None] * stride_s_t + offs_g[None, :] * 2
        sc = tl.load(sp).to(tl.float32)[:, :, None]
        mn = tl.load(sp + 1).to(tl.float32)[:, :, None]
    return c, sc, mn


@triton.jit
def _store_out(o_ptrs_base, o_lo, o_hi, hmask, c_lo, c_hi,
               ROT_V: tl.constexpr, D: tl.constexpr,
               BS: tl.constexpr, LOG_BS: tl.constexpr, CH: tl.constexpr, inv_sqrt_bs):
    """o (lo/hi halves, the stored basis) -> out in the original basis; o_ptrs_base [BLOCK_H]."""
    dt = o_ptrs_base.dtype.element_ty
    if ROT_V:
        for cb in tl.static_range(D // CH):
            cols = cb * CH + tl.arange(0, CH)
            # out[:, c] = sum_j o_lo[:, j] H[c_lo(j), c] + o_hi[:, j] H[c_hi(j), c]
            s_lo = hadamard_signs(c_lo, cols, BS, LOG_BS).to(tl.float32)
            s_hi = hadamard_signs(c_hi, cols, BS, LOG_BS).to(tl.float32)
            r = tl.dot(o_lo, s_lo, input_precision="tf32")
            r = tl.dot(o_hi, s_hi, r, input_precision="tf32")
            tl.store(o_ptrs_base[:, None] + cols[None, :], (r * inv_sqrt_bs).to(dt), mask=hmask[:, None])
    else:
        tl.store(o_ptrs_base[:, None] + c_lo[None, :], o_lo.to(dt), mask=hmask[:, None])
        tl.store(o_ptrs_base[:, None] + c_hi[None, :], o_hi.to(dt), mask=hmask[:, None])


@triton.jit(do_not_specialize=['NUM_SPLITS', 'stride_mo_b', 'stride_mo_h', 'stride_mo_s', 'stride_ml_b', 'stride_ml_h'])
def _decode_split_kernel(
    q_ptr, kd_ptr, ks_ptr, vd_ptr, vs_ptr, indptr_ptr, indices_ptr, lens_ptr,
    out_ptr, mid_o_ptr, mid_lse_ptr,
    sm_scale, logit_cap, inv_sqrt_bs,
    stride_qb, stride_qh, stride_ob, stride_oh,
    stride_kd_t, stride_kd_h, stride_ks_t, stride_ks_h,
    stride_vd_t, stride_vd_h, stride_vs_t, stride_vs_h,
    stride_mo_b, stride_mo_h, stride_mo_s, stride_ml_b, stride_ml_h,
    NUM_SPLITS,
    GQA: tl.constexpr, BLOCK_H: tl.constexpr, D: tl.constexpr, GS: tl.constexpr,
    NG: tl.constexpr, BS: tl.constexpr, LOG_BS: tl.constexpr, CH: tl.constexpr,
    PAGE: tl.constexpr, BLOCK_N: tl.constexpr,
    ROT_K: tl.constexpr, ROT_V: tl.constexpr, CAP: tl.constexpr, DIRECT: tl.constexpr,
    USE_ASM: tl.constexpr, PREFETCH: tl.constexpr, QK_INT8: tl.constexpr,
):
    h = tl.program_id(0)
    sp = tl.program_id(1)
    b = tl.program_id(2)
    HALF: tl.constexpr = D // 2
    GH: tl.constexpr = GS // 2

    kv_len = tl.load(lens_ptr + b)
    split_len = split_length(kv_len, NUM_SPLITS, BLOCK_N, 1)
    start = sp * split_len
    end = tl.minimum(start + split_len, kv_len)
    if not DIRECT:
        if start >= end:
            return

    offs_h = tl.arange(0, BLOCK_H)
    hmask = offs_h < GQA
    qh = h * GQA + offs_h
    offs_j = tl.arange(0, HALF)
    c_lo = (offs_j // GH) * GS + offs_j % GH  # channel of the low nibble of byte j
    c_hi = c_lo + GH

    # ---- prologue: q (rotated into the K basis when K is rotated), fp16 lo/hi halves,
    # pre-multiplied by the softmax scale (and log2 e for exp2): the scores come out of
    # the dots ready for the softmax, no per-score multiply in the loop
    if CAP:
        qk_scale = sm_scale
    else:
        qk_scale = sm_scale * 1.4426950408889634
    q_row = q_ptr + b * stride_qb + qh * stride_qh
    if ROT_K:
        qr_lo = tl.zeros([BLOCK_H, HALF], dtype=tl.float32)
        qr_hi = tl.zeros([BLOCK_H, HALF], dtype=tl.float32)
        for cb in tl.static_range(D // CH):
            rows = cb * CH + tl.arange(0, CH)
            qb = tl.load(q_row[:, None] + rows[None, :], mask=hmask[:, None], other=0.0).to(tl.float16)
            qr_lo = tl.dot(qb, hadamard_signs(rows, c_lo, BS, LOG_BS), qr_lo)
            qr_hi = tl.dot(qb, hadamard_signs(rows, c_hi, BS, LOG_BS), qr_hi)
        qf_lo = qr_lo * (inv_sqrt_bs * qk_scale)
        qf_hi = qr_hi * (inv_sqrt_bs * qk_scale)
    else:
        qf_lo = tl.load(q_row[:, None] + c_lo[None, :], mask=hmask[:, None], other=0.0).to(tl.float32) * qk_scale
        qf_hi = tl.load(q_row[:, None] + c_hi[None, :], mask=hmask[:, None], other=0.0).to(tl.float32) * qk_scale
    if QK_INT8:
        # q (rotated, pre-scaled) -> int8 per row, symmetric: step = amax|q| / 127 over the
        # whole head. The scores are exactly those of the rounded query q^ = step q8:
        #   q^.k = step (s_k (q8 . n) + m_k sum(q8)),
        # sum from the rounded q8 (not the fp32 q): the rounding error is then (q^ - q).k,
        # centred like k, instead of picking up an extra m_k sum(q^ - q) term.
        amax = tl.maximum(tl.max(tl.abs(qf_lo), 1), tl.max(tl.abs(qf_hi), 1))
        step_q = tl.where(amax > 0, amax / 127.0, 1.0)
        q8_lo = tl.minimum(tl.maximum(tl.floor(qf_lo / step_q[:, None] + 0.5), -127.0), 127.0).to(tl.int8)
        q8_hi = tl.minimum(tl.maximum(tl.floor(qf_hi / step_q[:, None] + 0.5), -127.0), 127.0).to(tl.int8)
        sum_q8 = (tl.sum(q8_lo.to(tl.int32), 1) + tl.sum(q8_hi.to(tl.int32), 1)).to(tl.float32)
    else:
        q_lo = qf_lo.to(tl.float16)
        q_hi = qf_hi.to(tl.float16)
        sum_q = tl.sum(q_lo.to(tl.float32), 1) + tl.sum(q_hi.to(tl.float32), 1)
        # whole-head groups: the high plane arrives as 16 n and both planes carry +1024
        q_hi16 = q_hi * 0.0625  # exact (power of two)
        q_bias = 1024.0 * (tl.sum(q_lo.to(tl.float32), 1) + tl.sum(q_hi16.to(tl.float32), 1))

    req_base = tl.load(indptr_ptr + b).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    rb = tl.zeros([BLOCK_H], dtype=tl.float32)  # per-row sum_n p * min_v (whole-head groups)
    acc_lo = tl.zeros([BLOCK_H, HALF], dtype=tl.float32)
    acc_hi = tl.zeros([BLOCK_H, HALF], dtype=tl.float32)
    kd_head = kd_ptr + h * stride_kd_h
    vd_head = vd_ptr + h * stride_vd_h
    ks_head = ks_ptr + h * stride_ks_h
    vs_head = vs_ptr + h * stride_vs_h

    # Software pipeline by hand: the slots of block i+1 and the K/V bytes of block i+1
    # are requested before block i is computed, so each program keeps two blocks of
    # gathers in flight instead of serialising index load -> K load -> V load.
    slot = _block_slots(indices_ptr, req_base, start, offs_n, end, PAGE, BLOCK_N)
    kc, k_s, k_m, vc, v_s, v_m = _load_block(kd_head, ks_head, vd_head, vs_head, slot,
                                             stride_kd_t, stride_ks_t, stride_vd_t, stride_vs_t,
                                             HALF, NG, GH)
    slot = _block_slots(indices_ptr, req_base, start + BLOCK_N, offs_n, end, PAGE, BLOCK_N)
    for n0 in range(start, end, BLOCK_N):
        nmask = offs_n < (end - n0)  # scalar bound: no per-token 64-bit compare
        if PREFETCH:
            kc_n, k_s_n, k_m_n, vc_n, v_s_n, v_m_n = _load_block(
                kd_head, ks_head, vd_head, vs_head, slot,
                stride_kd_t, stride_ks_t, stride_vd_t, stride_vs_t, HALF, NG, GH)
            slot = _block_slots(indices_ptr, req_base, n0 + 2 * BLOCK_N, offs_n, end, PAGE, BLOCK_N)
        else:
            # single-buffered: K now, V after the softmax (fewer live registers; the
            # compiler's own pipelining (num_stages) still prefetches both)
            slot = _block_slots(indices_ptr, req_base, n0, offs_n, end, PAGE, BLOCK_N)
            kc, k_s, k_m = _load_rows(kd_head, ks_head, slot, stride_kd_t, stride_ks_t, HALF, NG, GH)

        # codes are exact small integers in fp16: (1024 + n) - 1024 (no int->float cvt)
        if QK_INT8:
            k_lo, k_hi = _code_planes_i8(kc, USE_ASM)  # int8 n
            qk = tl.dot(q8_lo, tl.trans(k_lo), out_dtype=tl.int32)  # exact
            qk = tl.dot(q8_hi, tl.trans(k_hi), qk, out_dtype=tl.int32)
            s = step_q[:, None] * (qk.to(tl.float32) * k_s[None, :] + sum_q8[:, None] * k_m[None, :])
        elif NG == 1:
            k_lo, k_hi = _code_planes(kc, False, USE_ASM)  # 1024 + n, 1024 + 16 n
            qk = tl.dot(q_lo, tl.trans(k_lo))
            qk = tl.dot(q_hi16, tl.trans(k_hi), qk)
            s = (qk - q_bias[:, None]) * k_s[None, :] + sum_q[:, None] * k_m[None, :]
        else:
            k_lo = tl.reshape(((_codes_lo(kc, USE_ASM)) * k_s + k_m).to(tl.float16), [BLOCK_N, HALF])
            k_hi = tl.reshape(((_codes_hi(kc, USE_ASM)) * k_s + k_m).to(tl.float16), [BLOCK_N, HALF])
            s = tl.dot(q_lo, tl.trans(k_lo))
            s = tl.dot(q_hi, tl.trans(k_hi), s)
        if CAP:
            s = softcap_exp2(s, logit_cap)
        s = tl.where(nmask[None, :], s, float("-inf"))
        p, alpha, m_i, l_i = online_softmax_step(s, m_i, l_i)

        if not PREFETCH:
            vc, v_s, v_m = _load_rows(vd_head, vs_head, slot, stride_vd_t, stride_vs_t, HALF, NG, GH)
        if NG == 1:
            ps = (p * v_s[None, :]).to(tl.float16)
            v_lo, v_hi = _code_planes(vc, True, USE_ASM)  # n, 16 n (exact)
            acc_lo = tl.dot(ps, v_lo, acc_lo * alpha[:, None])
            acc_hi = tl.dot(ps, v_hi, acc_hi * alpha[:, None])  # 16 x the high half
            rb = rb * alpha + tl.sum(p * v_m[None, :], 1)
        else:
            v_lo = tl.reshape(((_codes_lo(vc, USE_ASM)) * v_s + v_m).to(tl.float16), [BLOCK_N, HALF])
            v_hi = tl.reshape(((_codes_hi(vc, USE_ASM)) * v_s + v_m).to(tl.float16), [BLOCK_N, HALF])
            p16 = p.to(tl.float16)
            acc_lo = tl.dot(p16, v_lo, acc_lo * alpha[:, None])
            acc_hi = tl.dot(p16, v_hi, acc_hi * alpha[:, None])
        if PREFETCH:
            kc, k_s, k_m, vc, v_s, v_m = kc_n, k_s_n, k_m_n, vc_n, v_s_n, v_m_n

    if NG == 1:
        acc_hi = acc_hi * 0.0625
    if DIRECT:
        inv_l = tl.where(l_i > 0, 1.0 / tl.maximum(l_i, 1e-30), 0.0)
        o_lo = (acc_lo + rb[:, None]) * inv_l[:, None]
        o_hi = (acc_hi + rb[:, None]) * inv_l[:, None]
        _store_out(out_ptr + b * stride_ob + qh * stride_oh, o_lo, o_hi, hmask, c_lo, c_hi,
                   ROT_V, D, BS, LOG_BS, CH, inv_sqrt_bs)
    else:
        inv_l = 1.0 / l_i
        o_lo = (acc_lo + rb[:, None]) * inv_l[:, None]
        o_hi = (acc_hi + rb[:, None]) * inv_l[:, None]
        mo = mid_o_ptr + b * stride_mo_b + qh * stride_mo_h + sp * stride_mo_s
        tl.store(mo[:, None] + c_lo[None, :], o_lo, mask=hmask[:, None])
        tl.store(mo[:, None] + c_hi[None, :], o_hi, mask=hmask[:, None])
        tl.store(mid_lse_ptr + b * stride_ml_b + qh * stride_ml_h + sp, m_i + tl.log2(l_i), mask=hmask)


def run_split(q, k_data, k_scales, v_data, v_scales, kv_indptr, kv_indices, kv_lens, fmt,
              sm_scale, page_size, logit_cap, out, ws, num_splits, cfg, direct, qk_int8=False):
    """Launch the split kernel; `direct` (one split) writes `out`, else ws.mid_o / mid_lse."""
    bsz, hq, d = q.shape
    hkv = k_data.shape[1]
    gqa = hq // hkv
    block_h = max(cfg.get("block_h", 16), triton.next_power_of_2(gqa))
    bs = fmt.block_size
    if direct:
        mid_o = mid_lse = out  # unused
        smo, sml = (0, 0, 0), (0, 0)
    else:
        mid_o, mid_lse = ws.mid_o, ws.mid_lse
        smo, sml = mid_o.stride()[:3], mid_lse.stride()[:2]
    asm = cfg.get("asm")
    _decode_split_kernel[(hkv, num_splits, bsz)](
        q, k_data, k_scales, v_data, v_scales, kv_indptr, kv_indices, kv_lens,
        out, mid_o, mid_lse,
        float(sm_scale), float(logit_cap), 1.0 / math.sqrt(bs),
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_data.stride(0), k_data.stride(1), k_scales.stride(0), k_scales.stride(1),
        v_data.stride(0), v_data.stride(1), v_scales.stride(0), v_scales.stride(1),
        *smo, *sml, num_splits,
        GQA=gqa, BLOCK_H=block_h, D=d, GS=fmt.group_size, NG=fmt.num_groups, BS=bs,
        LOG_BS=int(math.log2(bs)), CH=min(d, 64), PAGE=int(page_size), BLOCK_N=cfg["block_n"],
        ROT_K=fmt.k_rotated, ROT_V=fmt.v_rotated, CAP=logit_cap > 0, DIRECT=direct,
        USE_ASM=_use_asm(q) if asm is None else asm, PREFETCH=bool(cfg.get("prefetch", False)),
        QK_INT8=bool(qk_int8), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
