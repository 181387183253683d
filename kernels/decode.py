"""Split-KV (flash-decoding) attention over the packed INT4 paged pool.

Grid (kv head, split, batch), the kv head fastest: the programs of all KV heads of the
same tokens run together and share the DRAM rows and L2 sectors of those slots (the
fp16 scale/min of all heads of a slot sit in one 32 B sector). One program serves all
query heads of its KV head (the GQA group, padded to 16 rows for tl.dot), so every KV
byte is read once.

Arithmetic (no integer->float conversion instructions on the hot path):
  * a nibble n becomes fp16 by bits: (n | 0x6400) is the fp16 1024 + n, exact;
  * group_size == head_dim: the zero point folds into per-token scalars, so the exact
    codes n = (1024 + n) - 1024 go straight into the tensor-core dots:
        q.k   = s_k * (q . n) + m_k * sum(q)
        p @ v = (p s_v) @ n + sum_n p m_v   (the last term per row)
    (Folding the 1024 bias into the scalars too saves one fp16 subtract but cancels
    catastrophically in the V accumulator over long splits: measured 5% error at 8k.)
  * smaller groups: codes are dequantised in registers (fp16) and dotted directly.
Dots take fp16 operands and accumulate in fp32; the online softmax runs in fp32 with
exp2 (log2 e folded into the scale). q is rotated in the prologue (q . H_B) with a
+-1 matrix built from index parities (H_B[i, c] = (-1)^popcount(i & c) / sqrt(B) inside a
block), and the output is rotated back in the epilogue when V was rotated.

The split count is a host decision (batch, heads, SM count, optional max length), never
read from device data: the per-request split length comes from kv_lens in the kernel,
so a call with a workspace and a fixed num_splits is CUDA-graph capturable.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .format import Int4KVFormat
from .tiles import online_softmax_step, softcap_exp2

LOG2E = 1.4426950408889634
MAX_SPLITS = 64
DEFAULT_NUM_SMS = 132

# Tuning table keyed by (head_dim, group_size); "waves" = target programs per SM used by
# the split policy. Update from `python -m saw_sglang.bench.kernels --tune`.
DEFAULT_CONFIGS: dict[tuple[int, int], dict] = {
    (64, 64): dict(block_n=64, num_warps=4, num_stages=3, waves=8, prefetch=False),
    # H200, 32/8 heads, random slots (bench --tune-only, docs/gpu-runs.md run 5): best at
    # 64 x 8k (0.444 ms vs FlashInfer BF16 0.494); at 16 x 8k waves=2 was best (0.122 ms)
    # block_h: the query-head rows padded up to at least this (the MMA pads to 16 itself;
    # 8 instead of 16 halves the per-score softmax work, tools/sass: -12% loop instructions)
    (128, 128): dict(block_n=128, num_warps=4, num_stages=3, waves=8, prefetch=False, block_h=8),
    (256, 256): dict(block_n=32, num_warps=4, num_stages=3, waves=8, prefetch=False),
}
FALLBACK_CONFIG = dict(block_n=32, num_warps=4, num_stages=2, waves=8, prefetch=False)


def get_config(head_dim: int, group_size: int) -> dict:
    return dict(DEFAULT_CONFIGS.get((head_dim, group_size), FALLBACK_CONFIG))


@dataclass
class DecodeWorkspace:
    mid_o: torch.Tensor  # fp32 [B, Hq, S, D], split outputs (normalised, channel order)
    mid_lse: torch.Tensor  # fp32 [B, Hq, S], split log2-sum-exp
    q_prep: torch.Tensor | None = None  # fp16 [B, Hq, D], q' of the tensor-core kernel
    q_sums: torch.Tensor | None = None  # fp32 [B, Hq, 2], (sum q', 1024 bias) per head

    @property
    def max_splits(self) -> int:
        return self.mid_o.shape[2]


def alloc_workspace(max_batch, num_q_heads, head_dim, max_splits=MAX_SPLITS, device="cuda"):
    mid_o = torch.empty(max_batch, num_q_heads, max_splits, head_dim, dtype=torch.float32, device=device)
    mid_lse = torch.empty(max_batch, num_q_heads, max_splits, dtype=torch.float32, device=device)
    q_prep = torch.empty(max_batch, num_q_heads, head_dim, dtype=torch.float16, device=device)
    q_sums = torch.empty(max_batch, num_q_heads, 2, dtype=torch.float32, device=device)
    return DecodeWorkspace(mid_o, mid_lse, q_prep, q_sums)


_SM_COUNT: dict = {}


def num_sms(device) -> int:
    device = torch.device(device)
    if device.type != "cuda":
        return DEFAULT_NUM_SMS
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _SM_COUNT:
        _SM_COUNT[key] = torch.cuda.get_device_properties(key).multi_processor_count
    return _SM_COUNT[key]


def choose_num_splits(batch, num_kv_heads, sms=DEFAULT_NUM_SMS, waves=8, max_kv_len=None,
                      block_n=64, min_tiles_per_split=2, max_splits=MAX_SPLITS) -> int:
    """Splits so that batch * kv_heads * splits ~ waves * SMs programs. Host-only inputs
    (a max length hint only caps splits that would hold fewer than a few tiles)."""
    progs = max(1, batch * num_kv_heads)
    s = -(-waves * sms // progs)
    if max_kv_len is not None:
        s = min(s, max(1, -(-int(max_kv_len) // (block_n * min_tiles_per_split))))
    return int(max(1, min(s, max_splits)))


def plan_splits(batch, num_kv_heads, fmt: Int4KVFormat, device, max_kv_len=None) -> int:
    """The split count decode_attention would choose for this batch with its default
    config: callers that preallocate (one workspace per step or per captured graph)
    use it so that the kernel never allocates."""
    cfg = get_config(fmt.head_dim, fmt.group_size)
    return choose_num_splits(batch, num_kv_heads, num_sms(device), cfg["waves"], max_kv_len,
                             cfg["block_n"])


# --------------------------------------------------------------------------------------
@triton.jit
def _hadamard_signs(rows, cols, BS: tl.constexpr, LOG_BS: tl.constexpr):
    """+-1 (0 off the diagonal blocks) entries H_B[rows[:, None], cols[None, :]] * sqrt(B).
    The same signs as tiles.hadamard_signs, kept in this form because it is the one the
    H200 runs measured: tiles' form compiles to a different prologue (sm_90, D=128:
    2344 -> 2088 instructions; loop and registers unchanged). Switch after a GPU re-run."""
    same = (rows[:, None] // BS) == (cols[None, :] // BS)
    x = rows[:, None] & cols[None, :]
    par = tl.zeros_like(x)
    for k in tl.static_range(LOG_BS):
        par = par ^ (x >> k)
    par = par & 1
    return tl.where(same, 1 - 2 * par, 0).to(tl.float16)


@triton.jit
def _split_len(kv_len, NUM_SPLITS, BLOCK_N: tl.constexpr, MIN_BLOCKS: tl.constexpr = 1):
    """Tokens per split (a BLOCK_N multiple, at least MIN_BLOCKS blocks): the split and
    reduce kernels must agree (decode_mma.decode_split_kernel computes the same)."""
    return tl.maximum(tl.cdiv(tl.cdiv(kv_len, NUM_SPLITS), BLOCK_N), MIN_BLOCKS) * BLOCK_N


@triton.jit
def _store_out(o_ptrs_base, o_lo, o_hi, hmask, c_lo, c_hi,
               ROT_V: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr,
               BS: tl.constexpr, LOG_BS: tl.constexpr, CH: tl.constexpr, inv_sqrt_bs):
    """o (lo/hi halves, the stored basis) -> out in the original basis; o_ptrs_base [BLOCK_H]."""
    dt = o_ptrs_base.dtype.element_ty
    if ROT_V:
        offs_j = tl.arange(0, HALF)
        for cb in tl.static_range(D // CH):
            cols = cb * CH + tl.arange(0, CH)
            # out[:, c] = sum_j o_lo[:, j] H[c_lo(j), c] + o_hi[:, j] H[c_hi(j), c]
            s_lo = _hadamard_signs(c_lo, cols, BS, LOG_BS).to(tl.float32)
            s_hi = _hadamard_signs(c_hi, cols, BS, LOG_BS).to(tl.float32)
            r = tl.dot(o_lo, s_lo, input_precision="tf32")
            r = tl.dot(o_hi, s_hi, r, input_precision="tf32")
            tl.store(o_ptrs_base[:, None] + cols[None, :], (r * inv_sqrt_bs).to(dt), mask=hmask[:, None])
    else:
        tl.store(o_ptrs_base[:, None] + c_lo[None, :], o_lo.to(dt), mask=hmask[:, None])
        tl.store(o_ptrs_base[:, None] + c_hi[None, :], o_hi.to(dt), mask=hmask[:, None])


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
    PV_INT8: tl.constexpr,
):
    h = tl.program_id(0)
    sp = tl.program_id(1)
    b = tl.program_id(2)
    HALF: tl.constexpr = D // 2
    GH: tl.constexpr = GS // 2

    kv_len = tl.load(lens_ptr + b)
    split_len = _split_len(kv_len, NUM_SPLITS, BLOCK_N)
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
            qr_lo = tl.dot(qb, _hadamard_signs(rows, c_lo, BS, LOG_BS), qr_lo)
            qr_hi = tl.dot(qb, _hadamard_signs(rows, c_hi, BS, LOG_BS), qr_hi)
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
            if PV_INT8:
                # p * s_v as int8 on a per-block step (the block's largest V scale / 127),
                # V codes as int8; exact int32 dot, scaled into the fp32 accumulator
                pstep = tl.maximum(tl.max(v_s, 0), 1e-30) / 127.0
                p8 = tl.floor(p * (v_s / pstep)[None, :] + 0.5).to(tl.int8)
                v_lo8, v_hi8 = _code_planes_i8(vc, USE_ASM)
                pv_lo = tl.dot(p8, v_lo8, out_dtype=tl.int32)
                pv_hi = tl.dot(p8, v_hi8, out_dtype=tl.int32)
                acc_lo = acc_lo * alpha[:, None] + pstep * pv_lo.to(tl.float32)
                acc_hi = acc_hi * alpha[:, None] + (16.0 * pstep) * pv_hi.to(tl.float32)
            else:
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
                   ROT_V, D, HALF, BS, LOG_BS, CH, inv_sqrt_bs)
    else:
        inv_l = 1.0 / l_i
        o_lo = (acc_lo + rb[:, None]) * inv_l[:, None]
        o_hi = (acc_hi + rb[:, None]) * inv_l[:, None]
        mo = mid_o_ptr + b * stride_mo_b + qh * stride_mo_h + sp * stride_mo_s
        tl.store(mo[:, None] + c_lo[None, :], o_lo, mask=hmask[:, None])
        tl.store(mo[:, None] + c_hi[None, :], o_hi, mask=hmask[:, None])
        tl.store(mid_lse_ptr + b * stride_ml_b + qh * stride_ml_h + sp, m_i + tl.log2(l_i), mask=hmask)


@triton.jit
def _decode_reduce_kernel(
    out_ptr, mid_o_ptr, mid_lse_ptr, lens_ptr, inv_sqrt_bs,
    stride_ob, stride_oh, stride_mo_b, stride_mo_h, stride_mo_s, stride_ml_b, stride_ml_h,
    NUM_SPLITS,
    GQA: tl.constexpr, BLOCK_H: tl.constexpr, D: tl.constexpr, GS: tl.constexpr,
    BS: tl.constexpr, LOG_BS: tl.constexpr, CH: tl.constexpr, BLOCK_N: tl.constexpr,
    ROT_V: tl.constexpr, MIN_BLOCKS: tl.constexpr = 1,
):
    h = tl.program_id(0)
    b = tl.program_id(1)
    HALF: tl.constexpr = D // 2
    GH: tl.constexpr = GS // 2
    kv_len = tl.load(lens_ptr + b)
    split_len = _split_len(kv_len, NUM_SPLITS, BLOCK_N, MIN_BLOCKS)
    n_act = tl.cdiv(kv_len, tl.maximum(split_len, 1))

    offs_h = tl.arange(0, BLOCK_H)
    hmask = offs_h < GQA
    qh = h * GQA + offs_h
    offs_j = tl.arange(0, HALF)
    c_lo = (offs_j // GH) * GS + offs_j % GH
    c_hi = c_lo + GH

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc_lo = tl.zeros([BLOCK_H, HALF], dtype=tl.float32)
    acc_hi = tl.zeros([BLOCK_H, HALF], dtype=tl.float32)
    mo = mid_o_ptr + b * stride_mo_b + qh * stride_mo_h
    ml = mid_lse_ptr + b * stride_ml_b + qh * stride_ml_h
    for sp in range(0, n_act):
        lse = tl.load(ml + sp, mask=hmask, other=0.0)
        m_new = tl.maximum(m_i, lse)
        alpha = tl.exp2(m_i - m_new)
        w = tl.exp2(lse - m_new)
        o_lo = tl.load(mo[:, None] + sp * stride_mo_s + c_lo[None, :], mask=hmask[:, None], other=0.0)
        o_hi = tl.load(mo[:, None] + sp * stride_mo_s + c_hi[None, :], mask=hmask[:, None], other=0.0)
        acc_lo = acc_lo * alpha[:, None] + w[:, None] * o_lo
        acc_hi = acc_hi * alpha[:, None] + w[:, None] * o_hi
        l_i = l_i * alpha + w
        m_i = m_new
    inv_l = tl.where(l_i > 0, 1.0 / tl.maximum(l_i, 1e-30), 0.0)
    _store_out(out_ptr + b * stride_ob + qh * stride_oh, acc_lo * inv_l[:, None],
               acc_hi * inv_l[:, None], hmask, c_lo, c_hi, ROT_V, D, HALF, BS, LOG_BS, CH, inv_sqrt_bs)


@triton.jit
def _decode_prep_kernel(
    q_ptr, qp_ptr, qs_ptr, qk_scale, inv_sqrt_bs,
    stride_qb, stride_qh, stride_pb, stride_ph, stride_sb, HQ,
    D: tl.constexpr, BLOCK_H: tl.constexpr, BS: tl.constexpr, LOG_BS: tl.constexpr,
    ROT_K: tl.constexpr,
):
    """q -> q' for decode_mma: (q . H_B) * qk_scale as fp16 planes (channels [0, D/2) and
    [D/2, D) / 16, the high nibble arriving as 16 n), sum(q') and 1024 sum(q' planes)."""
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
        lo = tl.dot(x, _hadamard_signs(offs_d, c_lo, BS, LOG_BS)) * (inv_sqrt_bs * qk_scale)
        hi = tl.dot(x, _hadamard_signs(offs_d, c_hi, BS, LOG_BS)) * (inv_sqrt_bs * qk_scale)
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


@triton.jit
def _decode_merge_kernel(
    out_ptr, mid_o_ptr, mid_lse_ptr, lens_ptr, inv_sqrt_bs,
    stride_ob, stride_oh, stride_mo_b, stride_mo_h, stride_mo_s, stride_ml_b, stride_ml_h,
    NUM_SPLITS, D: tl.constexpr, D_CHUNK: tl.constexpr, BLOCK_N: tl.constexpr,
    MIN_BLOCKS: tl.constexpr, S_CHUNK: tl.constexpr, BS: tl.constexpr, LOG_BS: tl.constexpr,
    ROT_V: tl.constexpr,
):
    """D_CHUNK channels of one query head of one request: the active splits' partial
    outputs merged by their log2-sum-exp, S_CHUNK splits per step (all of them in one step
    up to S_CHUNK); rotated back into the original basis when V was rotated (then
    D_CHUNK = D)."""
    h = tl.program_id(0)
    b = tl.program_id(1)
    c0 = tl.program_id(2) * D_CHUNK
    kv_len = tl.load(lens_ptr + b)
    n_act = tl.cdiv(kv_len, _split_len(kv_len, NUM_SPLITS, BLOCK_N, MIN_BLOCKS))
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
    out = out_ptr + b * stride_ob + h * stride_oh
    if ROT_V:
        for cb in tl.static_range(D // 64):
            cols = cb * 64 + tl.arange(0, 64)
            sg = _hadamard_signs(offs_d, cols, BS, LOG_BS).to(tl.float32)
            tl.store(out + cols, (tl.sum(o[:, None] * sg, 0) * inv_sqrt_bs).to(out_ptr.dtype.element_ty))
    else:
        tl.store(out + offs_d, o.to(out_ptr.dtype.element_ty))


# --------------------------------------------------------------------------------------
def _use_asm(q) -> bool:
    """Inline PTX only on a real CUDA device (the Triton interpreter cannot run it);
    SAW_INT4_DECODE_ASM=0 selects the plain-Triton unpack (for comparisons)."""
    return (q.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1"
            and os.environ.get("SAW_INT4_DECODE_ASM", "1") != "0")


def _check(q, k_data, k_scales, v_data, v_scales, fmt: Int4KVFormat):
    if q.dim() != 3:
        raise ValueError(f"q must be [batch, q_heads, head_dim], got {tuple(q.shape)}")
    b, hq, d = q.shape
    if d != fmt.head_dim:
        raise ValueError(f"q head_dim {d} != format head_dim {fmt.head_dim}")
    hkv = k_data.shape[1]
    if hq % hkv:
        raise ValueError(f"q heads {hq} not a multiple of kv heads {hkv}")
    gs = fmt.group_size
    if d not in (64, 128, 256) or gs < 4 or gs & (gs - 1):
        raise ValueError(
            f"decode kernel supports head_dim 64/128/256 and power-of-two group sizes >= 4 "
            f"(got head_dim {d}, group {gs})")
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


# Tensor-core kernel (decode_mma, Gluon) per head_dim: tokens per block, 1-warp programs
# per SM the split policy aims at, and the least number of blocks a split holds.
MMA_CONFIGS: dict[int, dict] = {
    64: dict(block_n=64, waves=2, min_blocks=4, stages=3, swizzle=(16, 1), heads=4),
    128: dict(block_n=32, waves=2, min_blocks=4, stages=3, swizzle=(16, 4), heads=4),
    256: dict(block_n=32, waves=3, min_blocks=4, stages=3, swizzle=(32, 4), heads=4),
}
MMA_MAX_SPLITS = 256


def mma_supported(q, fmt: Int4KVFormat, gqa: int) -> bool:
    """The tensor-core kernel runs on CUDA sm_80+ (not the interpreter) for whole-head
    groups, head_dim 64/128/256 and up to 16 query heads per KV head."""
    return (q.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1"
            and os.environ.get("SAW_INT4_DECODE_IMPL", "") != "triton"
            and fmt.num_groups == 1 and fmt.head_dim in MMA_CONFIGS and gqa <= 16
            and torch.cuda.get_device_capability(q.device)[0] >= 8)


def head_group(num_kv_heads: int, most: int) -> int:
    """KV heads per program (one warp each): the largest power of two <= most dividing
    num_kv_heads. Their rows lie side by side in the pool, so a program's copies of one
    token are one contiguous run."""
    g = 1
    while g * 2 <= most and num_kv_heads % (g * 2) == 0:
        g *= 2
    return g


def plan_mma_splits(batch, num_kv_heads, head_dim, device, max_kv_len=None, waves=None) -> int:
    cfg = MMA_CONFIGS[head_dim]
    return choose_num_splits(batch, num_kv_heads, num_sms(device), waves or cfg["waves"], max_kv_len,
                             cfg["block_n"], cfg["min_blocks"], MMA_MAX_SPLITS)


def prepare_query(q, fmt: Int4KVFormat, sm_scale: float, logit_cap: float, q_prep, q_sums):
    """q [B, Hq, D] -> q_prep (fp16 q' planes) and q_sums (sum q', 1024 bias) in place."""
    bsz, hq, d = q.shape
    bs = fmt.block_size
    block_h = max(16, min(64, triton.next_power_of_2(hq)))
    qk_scale = sm_scale if logit_cap > 0 else sm_scale * 1.4426950408889634
    _decode_prep_kernel[(bsz, triton.cdiv(hq, block_h))](
        q, q_prep, q_sums, float(qk_scale), 1.0 / math.sqrt(bs),
        q.stride(0), q.stride(1), q_prep.stride(0), q_prep.stride(1), q_sums.stride(0), hq,
        D=d, BLOCK_H=block_h, BS=bs, LOG_BS=int(math.log2(bs)), ROT_K=fmt.k_rotated,
        num_warps=4,
    )


def _decode_mma(q, k_data, k_scales, v_data, v_scales, kv_indptr, kv_indices, kv_lens, fmt,
                sm_scale, page_size, logit_cap, out, workspace, num_splits, max_kv_len,
                block_n=None, waves=None, min_blocks=None, stages=None, heads=None, maxnreg=None):
    from .decode_mma import decode_split_kernel

    bsz, hq, d = q.shape
    hkv = k_data.shape[1]
    gqa = hq // hkv
    cfg = MMA_CONFIGS[d]
    block_n = block_n or cfg["block_n"]
    min_blocks = min_blocks or cfg["min_blocks"]
    stages = stages or cfg["stages"]
    hg = head_group(hkv, heads or cfg["heads"])
    if num_splits is None:
        num_splits = choose_num_splits(bsz, hkv // hg, num_sms(q.device), waves or cfg["waves"], max_kv_len,
                                       block_n, min_blocks,
                                       workspace.max_splits if workspace else MMA_MAX_SPLITS)
    num_splits = int(num_splits)
    if workspace is None:
        workspace = alloc_workspace(bsz, hq, d, num_splits, q.device)
    ws = workspace
    if (ws.max_splits < num_splits or ws.mid_o.shape[0] < bsz or ws.mid_o.shape[1] != hq
            or ws.mid_o.shape[3] != d or ws.q_prep is None):
        raise ValueError(f"workspace {tuple(ws.mid_o.shape)} too small for batch {bsz}, "
                         f"{hq} heads, D {d}, {num_splits} splits")
    prepare_query(q, fmt, sm_scale, logit_cap, ws.q_prep, ws.q_sums)
    # one split and V not rotated: the split kernel writes the output itself
    direct = num_splits == 1 and not fmt.v_rotated
    # 32-bit byte offsets unless a buffer is too large for them
    off64 = max(k_data.numel(), v_data.numel(), k_scales.numel(), v_scales.numel()) >= 2**31
    decode_split_kernel[(hkv // hg, num_splits, bsz)](
        ws.q_prep, ws.q_sums, k_data, k_scales, v_data, v_scales, kv_indptr, kv_indices, kv_lens,
        out if direct else ws.mid_o, ws.mid_lse, float(logit_cap),
        ws.q_prep.stride(0), ws.q_prep.stride(1), ws.q_sums.stride(0),
        k_data.stride(0), k_data.stride(1), k_scales.stride(0), k_scales.stride(1),
        v_data.stride(0), v_data.stride(1), v_scales.stride(0), v_scales.stride(1),
        *((out.stride(0), out.stride(1), 0) if direct else ws.mid_o.stride()[:3]),
        *ws.mid_lse.stride()[:2], num_splits,
        HG=hg, GQA=gqa, NH=max(8, triton.next_power_of_2(gqa)), D=d, PAGE=int(page_size), BLOCK_N=block_n,
        CAP=logit_cap > 0, OFF64=off64, MIN_BLOCKS=min_blocks, STAGES=stages,
        SWZ_VEC=cfg["swizzle"][0], SWZ_PHASES=cfg["swizzle"][1], DIRECT=direct, num_warps=hg,
        **({"maxnreg": maxnreg} if maxnreg else {}),
    )
    bs = fmt.block_size
    if direct:
        return out
    d_chunk = d if fmt.v_rotated else 32
    s_chunk = min(128, triton.next_power_of_2(num_splits)) if d_chunk == 32 else 16
    _decode_merge_kernel[(hq, bsz, d // d_chunk)](
        out, ws.mid_o, ws.mid_lse, kv_lens, 1.0 / math.sqrt(bs),
        out.stride(0), out.stride(1), *ws.mid_o.stride()[:3], *ws.mid_lse.stride()[:2], num_splits,
        D=d, D_CHUNK=d_chunk, BLOCK_N=block_n, MIN_BLOCKS=min_blocks, S_CHUNK=s_chunk, BS=bs,
        LOG_BS=int(math.log2(bs)), ROT_V=fmt.v_rotated, num_warps=4,
    )
    return out


def decode_attention(
    q, k_data, k_scales, v_data, v_scales, kv_indptr, kv_indices, kv_lens,
    fmt: Int4KVFormat, sm_scale: float, page_size: int = 1, logit_cap: float = 0.0,
    out=None, workspace: DecodeWorkspace | None = None, num_splits: int | None = None, *,
    max_kv_len: int | None = None, block_n: int | None = None, num_warps: int | None = None,
    num_stages: int | None = None, waves: int | None = None,
    prefetch: bool | None = None, asm: bool | None = None, block_h: int | None = None,
    qk_int8: bool = False, pv_int8: bool = False, impl: str | None = None, min_blocks: int | None = None,
    stages: int | None = None, heads: int | None = None, maxnreg: int | None = None,
):
    """INT4 paged decode attention. q [B, Hq, D] (original basis) -> out [B, Hq, D] q.dtype.

    kv_indices hold token slots (page_size 1) or page ids; kv_lens [B] int32 token counts.
    Graph-capturable when `workspace` and `num_splits` are given (nothing is allocated
    and nothing is read back). Tuning knobs default to DEFAULT_CONFIGS[(D, group)].

    qk_int8=True (whole-head groups only) rounds the rotated query to int8 per row
    (step = amax / 127) and computes q.k on the integer tensor cores: matches
    reference.decode_attention_ref(..., q_int8=True). pv_int8=True (experimental, whole-
    head groups) also runs P.V on the integer tensor cores: p * scale_v rounded to int8
    per block (step = the block's largest V scale / 127)."""
    bsz, hq, hkv, d = _check(q, k_data, k_scales, v_data, v_scales, fmt)
    if impl is None:
        impl = "mma" if not (qk_int8 or pv_int8) and mma_supported(q, fmt, hq // hkv) else "triton"
    if impl == "mma":
        if out is None:
            out = torch.empty_like(q)
        if bsz == 0:
            return out
        return _decode_mma(q, k_data, k_scales, v_data, v_scales, kv_indptr, kv_indices, kv_lens, fmt,
                           sm_scale, page_size, logit_cap, out, workspace, num_splits, max_kv_len,
                           block_n=block_n, waves=waves, min_blocks=min_blocks, stages=stages,
                           heads=heads, maxnreg=maxnreg)
    if (qk_int8 or pv_int8) and fmt.num_groups != 1:
        raise ValueError(f"qk_int8 / pv_int8 need one group per head (group_size {fmt.group_size} != head_dim {d})")
    cfg = get_config(d, fmt.group_size)
    block_n = block_n or cfg["block_n"]
    num_warps = num_warps or cfg["num_warps"]
    num_stages = num_stages or cfg["num_stages"]
    if num_splits is None:
        num_splits = choose_num_splits(bsz, hkv, num_sms(q.device), waves or cfg["waves"],
                                       max_kv_len, block_n,
                                       max_splits=workspace.max_splits if workspace else MAX_SPLITS)
    num_splits = int(num_splits)
    if out is None:
        out = torch.empty_like(q)
    if bsz == 0:
        return out
    gqa = hq // hkv
    block_h = max(block_h or cfg.get("block_h", 16), triton.next_power_of_2(gqa))
    bs = fmt.block_size
    ch = min(d, 64)
    direct = num_splits == 1
    if direct:
        mid_o = mid_lse = out  # unused
        smo = (0, 0, 0)
        sml = (0, 0)
    else:
        if workspace is None:
            workspace = alloc_workspace(bsz, hq, d, num_splits, q.device)
        if (workspace.max_splits < num_splits or workspace.mid_o.shape[0] < bsz
                or workspace.mid_o.shape[1] != hq or workspace.mid_o.shape[3] != d):
            raise ValueError(f"workspace {tuple(workspace.mid_o.shape)} too small for batch {bsz}, "
                             f"{hq} heads, D {d}, {num_splits} splits")
        mid_o, mid_lse = workspace.mid_o, workspace.mid_lse
        smo = mid_o.stride()[:3]
        sml = mid_lse.stride()[:2]
    common = dict(GQA=gqa, BLOCK_H=block_h, D=d, GS=fmt.group_size, BS=bs,
                  LOG_BS=int(math.log2(bs)), CH=ch, BLOCK_N=block_n)
    _decode_split_kernel[(hkv, num_splits, bsz)](
        q, k_data, k_scales, v_data, v_scales, kv_indptr, kv_indices, kv_lens,
        out, mid_o, mid_lse,
        float(sm_scale), float(logit_cap), 1.0 / math.sqrt(bs),
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_data.stride(0), k_data.stride(1), k_scales.stride(0), k_scales.stride(1),
        v_data.stride(0), v_data.stride(1), v_scales.stride(0), v_scales.stride(1),
        *smo, *sml, num_splits,
        NG=fmt.num_groups, PAGE=int(page_size), ROT_K=fmt.k_rotated, ROT_V=fmt.v_rotated,
        CAP=logit_cap > 0, DIRECT=direct, USE_ASM=_use_asm(q) if asm is None else asm,
        PREFETCH=cfg.get("prefetch", True) if prefetch is None else prefetch, QK_INT8=bool(qk_int8), PV_INT8=bool(pv_int8),
        num_warps=num_warps, num_stages=num_stages, **common,
    )
    if not direct:
        _decode_reduce_kernel[(hkv, bsz)](
            out, mid_o, mid_lse, kv_lens, 1.0 / math.sqrt(bs),
            out.stride(0), out.stride(1), *smo, *sml, num_splits,
            ROT_V=fmt.v_rotated, num_warps=4, num_stages=2, **common,
        )
    return out
