"""Triton kernels that write the SAW-INT4 KV cache and read it back.

`quantize_and_store` is the per-layer cache write: one launch quantises K and V of
all tokens and heads of a layer and scatters the packed bytes and fp16 (scale, min)
pairs into the pool rows named by `loc`. `dequantize` reads slots back to BF16/FP16:
in their stored basis (the through-pool extend, kernels/pool_read.py) or rotated back
(fallbacks, debugging, tests). Both match `reference.py` (see tests/test_quantize.py
for the tolerances and why).

Rotation is exact +-1 arithmetic in registers, generated inside the kernel (no
allocation, no constant buffer): H_B = H_{B/K} (x) H_K, so one K-deep tensor-core dot
(K = DOT_K = 64) rotates the low index bits of each block and fp32 butterflies the
rest (B = 128: 64 MACs + 1 add per element instead of 128 MACs; see `_rotate_pm1`).
Blocks of 16 or fewer use one dot with a block-diagonal 16x16 matrix. Products of
fp16 values with +-1 are exact and accumulate in fp32; the 1/sqrt(B) factor and the
post-rotation clamp are folded into the per-group code arithmetic.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .format import CLAMP, SERVED_HEAD_DIMS as SUPPORTED_HEAD_DIMS, Int4KVFormat

# Depth of the rotation's tensor-core dot (H_B = H_{B/DOT_K} (x) H_DOT_K): each halving
# adds one fp32 butterfly per element, each doubling doubles the (cheap) tensor-core
# MACs and the H_DOT_K tile in shared memory (DOT_K^2 * 2 bytes).
DOT_K = 64
DEQUANT_BLOCK_T = 32  # tokens per dequantize program


@triton.jit
def _hadamard_pm1(W: tl.constexpr, B: tl.constexpr, dtype: tl.constexpr):
    """[W, W] block-diagonal unnormalised Sylvester Hadamard, blocks of size B <= W.
    H_B[i, j] = (-1)^popcount(i & j); indices are < 256, so three xor-folds give
    the parity."""
    i = tl.arange(0, W)[:, None]
    j = tl.arange(0, W)[None, :]
    a = (i % B) & (j % B)
    p = a ^ (a >> 4)
    p = p ^ (p >> 2)
    p = p ^ (p >> 1)
    sign = 1 - 2 * (p & 1)
    h = tl.where((i // B) == (j // B), sign, 0)
    return h.to(dtype)


@triton.jit
def _fwht(x, R: tl.constexpr, B: tl.constexpr):
    """Unnormalised Walsh-Hadamard transform of each row of x [R, B] (fp32, exact
    adds and subtracts): log2(B) radix-2 butterfly stages. Each stage pairs the lowest
    index bit and moves the result bit to the top, so after log2(B) stages the index
    bits are back in order."""
    for _ in tl.static_range(B.bit_length() - 1):
        a, b = tl.split(tl.reshape(x, (R, B // 2, 2)))
        x = tl.reshape(tl.permute(tl.join(a + b, a - b), (0, 2, 1)), (R, B))
    return x


@triton.jit
def _rotate_pm1(x, BT: tl.constexpr, D: tl.constexpr, B: tl.constexpr, W: tl.constexpr,
                DOT_K: tl.constexpr):
    """x [BT, D] fp32 (sanitised) -> x . H_B without the 1/sqrt(B) factor, in fp32.

    B <= 16: one tensor-core dot with the block-diagonal [16, 16] +-1 matrix.
    B > 16: H_B = H_{B/K} (x) H_K (Sylvester), K = min(DOT_K, B): a K-deep dot with
    H_K rotates the low log2(K) index bits of each block and fp32 butterflies the
    remaining log2(B/K) bits (K = B is the dense dot). The dot's rows are ordered
    (high bits, token, block) so that the high bits are the outermost M dimension of
    the accumulator, which the compiler keeps in registers: the butterflies are
    register-only (no layout change) when the tile has >= 16 blocks per warp.
    Exactness: the dot inputs are fp16 (sanitised values are fp16-exact up to the
    rounding of bf16 magnitudes below 2^-17 to the fp16 grid, <= 2^-25), +-1 products
    are exact, accumulation is fp32, the butterflies are fp32 adds."""
    if B <= 16:
        hm = _hadamard_pm1(W, B, tl.float16)
        y = tl.dot(tl.reshape(x.to(tl.float16), (BT * D // W, W)), hm, out_dtype=tl.float32)
        return tl.reshape(y, (BT, D))
    else:
        K: tl.constexpr = min(DOT_K, B)
        A: tl.constexpr = B // K
        N: tl.constexpr = BT * D // B  # blocks in the tile
        hk = _hadamard_pm1(K, K, tl.float16)
        xa = tl.permute(tl.reshape(x.to(tl.float16), (N, A, K)), (1, 0, 2))  # [A, N, K]
        y = tl.dot(tl.reshape(xa, (A * N, K)), hk, out_dtype=tl.float32)
        y = tl.reshape(tl.permute(tl.reshape(y, (A, N, K)), (1, 2, 0)), (N * K, A))
        y = _fwht(y, N * K, A)
        y = tl.permute(tl.reshape(y, (N, K, A)), (0, 2, 1))  # [N, A, K]
        return tl.reshape(y, (BT, D))


@triton.jit
def _sanitize(x, CLAMP_V: tl.constexpr):
    """reference.sanitize: NaN -> 0, +-inf / huge -> +-CLAMP."""
    x = tl.where(x != x, 0.0, x)
    return tl.minimum(tl.maximum(x, -CLAMP_V), CLAMP_V)


@triton.jit
def _lsq_pair(q, w, scale, mn, G: tl.constexpr):
    """reference._lsq on the codes q (int32, [BT, NG, G]) and the values in code
    units w = (x - min) / scale + 0.5 (fp32, the code arithmetic's own value): fit
    w = alpha q + beta by least squares, then scale' = alpha scale and
    min' = min + (beta - 0.5) scale. sum(q) and sum(q^2) (< 2^16 each for G <= 256)
    share one int32 reduction. fp32 results."""
    qq = tl.sum(q * (q << 16) + q, axis=2)  # sum(q^2) << 16 | sum(q)
    sq = (qq & 0xFFFF).to(tl.float32)
    sqq = (qq >> 16).to(tl.float32)
    qf = q.to(tl.float32)
    sw = tl.sum(w, axis=2)
    sqw = tl.sum(qf * w, axis=2)
    den = G * sqq - sq * sq  # exact integer in fp32
    ok = (den > 0) & (scale > 0)
    alpha = tl.math.div_rn(G * sqw - sq * sw, tl.where(ok, den, 1.0))
    beta = tl.math.div_rn(sw - alpha * sq, tl.full(sw.shape, G, tl.float32)) - 0.5
    fs = tl.minimum(tl.where(ok, alpha * scale, scale), 65504.0)
    fm = tl.minimum(tl.maximum(tl.where(ok, mn + beta * scale, mn), -65504.0), 65504.0)
    return tl.maximum(fs, 0.0), fm


@triton.jit
def _quantize_rows(
    src, stride_t, stride_h, loc_ptr, data_ptr, scale_ptr, mul_ptr, add_ptr,
    T, H, head, pid_t, nprog_t, inv_sqrt_b,
    D: tl.constexpr, G: tl.constexpr, B: tl.constexpr, W: tl.constexpr,
    BLOCK_T: tl.constexpr, ROTATE: tl.constexpr, CLAMP_V: tl.constexpr,
    DOT_K: tl.constexpr, STAGES: tl.constexpr, AFFINE: tl.constexpr, LSQ: tl.constexpr,
):
    NG: tl.constexpr = D // G
    HG: tl.constexpr = G // 2
    # element j of a group goes to the low nibble of byte j, element j + G/2 to the
    # high nibble: work on the two half-groups as separate [BLOCK_T, NG, G/2] tensors
    # (same layout, so packing is elementwise, no data exchange between threads)
    offs_lo = (tl.arange(0, NG) * G)[:, None] + tl.arange(0, HG)[None, :]
    offs_d = tl.arange(0, D)
    offs_b = tl.arange(0, D // 2)
    offs_s = tl.arange(0, 2 * NG)
    if AFFINE:  # this head's K calibration, k' = k * mul + add (fp32 [D])
        if ROTATE:
            a_mul = tl.load(mul_ptr + head * D + offs_d)[None, :]
            a_add = tl.load(add_ptr + head * D + offs_d)[None, :]
        else:
            a_mul_l = tl.load(mul_ptr + head * D + offs_lo)[None, :, :]
            a_add_l = tl.load(add_ptr + head * D + offs_lo)[None, :, :]
            a_mul_h = tl.load(mul_ptr + head * D + offs_lo + HG)[None, :, :]
            a_add_h = tl.load(add_ptr + head * D + offs_lo + HG)[None, :, :]
    num_tiles = tl.cdiv(T, BLOCK_T)
    for tile in tl.range(pid_t, num_tiles, nprog_t, num_stages=STAGES):
        offs_t = tile * BLOCK_T + tl.arange(0, BLOCK_T)
        mask_t = offs_t < T
        rows = src + offs_t.to(tl.int64)[:, None] * stride_t + head * stride_h
        if ROTATE:
            x = _sanitize(tl.load(rows + offs_d[None, :], mask=mask_t[:, None], other=0.0).to(tl.float32),
                          CLAMP_V)
            if AFFINE:
                x = tl.minimum(tl.maximum(x * a_mul + a_add, -CLAMP_V), CLAMP_V)
            y = _rotate_pm1(x, BLOCK_T, D, B, W, DOT_K)  # x . H_B * sqrt(B) (fp16 inputs)
            yg = tl.reshape(y, (BLOCK_T, NG, G))
            # reference: x' = clamp(y / sqrt(B)); scaling by a positive constant and
            # clamping are monotone, so max/min of x' = clamp(scaled max/min of y)
            hi = tl.max(yg, axis=2) * inv_sqrt_b
            lo = tl.min(yg, axis=2) * inv_sqrt_b
            hi = tl.minimum(tl.maximum(hi, -CLAMP_V), CLAMP_V)
            lo = tl.minimum(tl.maximum(lo, -CLAMP_V), CLAMP_V)
        else:
            p = rows[:, :, None] + offs_lo[None, :, :]
            m3 = mask_t[:, None, None]
            xl = _sanitize(tl.load(p, mask=m3, other=0.0).to(tl.float32), CLAMP_V)
            xh = _sanitize(tl.load(p + HG, mask=m3, other=0.0).to(tl.float32), CLAMP_V)
            if AFFINE:
                xl = tl.minimum(tl.maximum(xl * a_mul_l + a_add_l, -CLAMP_V), CLAMP_V)
                xh = tl.minimum(tl.maximum(xh * a_mul_h + a_add_h, -CLAMP_V), CLAMP_V)
            hi = tl.maximum(tl.max(xl, axis=2), tl.max(xh, axis=2))
            lo = tl.minimum(tl.min(xl, axis=2), tl.min(xh, axis=2))
        scale16 = tl.math.div_rn(hi - lo, tl.full(hi.shape, 15.0, tl.float32)).to(tl.float16)
        min16 = lo.to(tl.float16)
        # divide by the stored fp16 values so that dequantisation is exact to the code
        s = scale16.to(tl.float32)
        m = min16.to(tl.float32)[:, :, None]
        inv = tl.math.div_rn(tl.full(s.shape, 1.0, tl.float32), tl.where(s > 0, s, 1.0))
        inv = tl.where(s > 0, inv, 0.0)[:, :, None]
        if ROTATE:
            # one FMA per element: (y / sqrt(B) - min) / scale + 0.5 with the constants
            # folded per group (rounding differs from the reference's three steps by a
            # few ulps of w); the clamp of x' to +-CLAMP becomes a clamp of w to the
            # codes of +-CLAMP, merged with the 0..15 clamp (w is monotone in x')
            a = inv * inv_sqrt_b
            b = 0.5 - m * inv
            w_clo = (-CLAMP_V - m) * inv + 0.5  # the codes (unrounded) of -+CLAMP
            w_chi = (CLAMP_V - m) * inv + 0.5
            w_lo = tl.maximum(w_clo, 0.0)
            w_hi = tl.minimum(w_chi, 15.0)
            w = yg * a + b
            q = tl.minimum(tl.maximum(w, w_lo), w_hi).to(tl.int32)
            if LSQ:  # w unclamped: x' is clamped to +-CLAMP only for values that large
                fs, fm = _lsq_pair(q, tl.minimum(tl.maximum(w, w_clo), w_chi), s, min16.to(tl.float32), G)
                scale16, min16 = fs.to(tl.float16), fm.to(tl.float16)
            # split into half-groups after quantising: free where the half-group bit
            # is a register bit of the dot layout; where it is not (a half-group
            # spans Hadamard blocks, e.g. D=256 G=256 B=128) it moves codes only
            ql, qh = tl.split(tl.permute(tl.reshape(q, (BLOCK_T, NG, 2, HG)), (0, 1, 3, 2)))
            packed = ql | (qh << 4)  # [BLOCK_T, NG, G/2]
        else:
            # reference.quantize's floor((x - min) / scale + 0.5) clamped to 0..15: clamping
            # before the truncating conversion equals floor-then-clamp since w >= 0 then, one
            # float->int conversion per element instead of floor + conversion
            wl, wh = (xl - m) * inv + 0.5, (xh - m) * inv + 0.5
            cl = tl.minimum(tl.maximum(wl, 0.0), 15.0).to(tl.int32)
            ch = tl.minimum(tl.maximum(wh, 0.0), 15.0).to(tl.int32)
            packed = cl | (ch << 4)
            if LSQ:  # both half-groups in one [BT, NG, G] fit
                fs, fm = _lsq_pair(tl.join(cl, ch).reshape(BLOCK_T, NG, G), tl.join(wl, wh).reshape(BLOCK_T, NG, G),
                                   s, min16.to(tl.float32), G)
                scale16, min16 = fs.to(tl.float16), fm.to(tl.float16)
        packed = tl.reshape(packed, (BLOCK_T, D // 2)).to(tl.uint8)

        slot = tl.load(loc_ptr + offs_t, mask=mask_t, other=0).to(tl.int64)
        row = slot * H + head
        tl.store(data_ptr + row[:, None] * (D // 2) + offs_b[None, :], packed, mask=mask_t[:, None])
        # (scale, min) pairs side by side: one contiguous 4*NG-byte store per row
        sm = tl.reshape(tl.join(scale16, min16), (BLOCK_T, 2 * NG))
        tl.store(scale_ptr + row[:, None] * (NG * 2) + offs_s[None, :], sm, mask=mask_t[:, None])


@triton.jit(do_not_specialize=['T'])
def _quantize_kv_kernel(
    k_ptr, k_st, k_sh, v_ptr, v_st, v_sh, loc_ptr,
    kd_ptr, ks_ptr, vd_ptr, vs_ptr, kmul_ptr, kadd_ptr,
    T, H, inv_sqrt_b,
    D: tl.constexpr, G: tl.constexpr, B: tl.constexpr, W: tl.constexpr,
    BLOCK_T: tl.constexpr, ROT_K: tl.constexpr, ROT_V: tl.constexpr, CLAMP_V: tl.constexpr,
    DOT_K: tl.constexpr, STAGES: tl.constexpr, K_AFFINE: tl.constexpr, LSQ: tl.constexpr,
):
    # grid: (token-tile programs, kv heads, {K, V}); each program strides over tiles
    pid_t = tl.program_id(0)
    head = tl.program_id(1)
    nprog_t = tl.num_programs(0)
    if tl.program_id(2) == 0:
        _quantize_rows(k_ptr, k_st, k_sh, loc_ptr, kd_ptr, ks_ptr, kmul_ptr, kadd_ptr, T, H, head,
                       pid_t, nprog_t, inv_sqrt_b, D, G, B, W, BLOCK_T, ROT_K, CLAMP_V, DOT_K,
                       STAGES, K_AFFINE, LSQ)
    else:
        _quantize_rows(v_ptr, v_st, v_sh, loc_ptr, vd_ptr, vs_ptr, kmul_ptr, kadd_ptr, T, H, head,
                       pid_t, nprog_t, inv_sqrt_b, D, G, B, W, BLOCK_T, ROT_V, CLAMP_V, DOT_K,
                       STAGES, False, LSQ)


@triton.jit(do_not_specialize=['T'])
def _dequantize_kernel(
    data_ptr, scale_ptr, loc_ptr, out_ptr, o_st, o_sh,
    T, H, inv_sqrt_b,
    D: tl.constexpr, G: tl.constexpr, B: tl.constexpr, W: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """Rotated rows back to the original basis where groups are smaller than the Hadamard
    block (scales vary inside a block): fp32 FMA dots, slow; `_unrotate_kernel` serves
    the formats whose blocks lie inside groups."""
    NG: tl.constexpr = D // G
    pid_t = tl.program_id(0)
    head = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < T
    slot = tl.load(loc_ptr + offs_t, mask=mask_t, other=0).to(tl.int64)
    row = (slot * H + head)[:, None]
    e = tl.arange(0, D)
    g = e // G
    r = e % G
    byte_idx = g * (G // 2) + r % (G // 2)
    shift = (r // (G // 2)) * 4
    m2 = mask_t[:, None]
    packed = tl.load(data_ptr + row * (D // 2) + byte_idx[None, :], mask=m2, other=0)
    code = ((packed.to(tl.int32) >> shift[None, :]) & 15).to(tl.float32)
    sp = scale_ptr + row * (NG * 2) + (g * 2)[None, :]
    s = tl.load(sp, mask=m2, other=0.0).to(tl.float32)
    mn = tl.load(sp + 1, mask=m2, other=0.0).to(tl.float32)
    x = code * s + mn
    # fp32 FMA dot ("ieee"): dequantised values are not fp16-exact
    R: tl.constexpr = BLOCK_T * D // W
    if W <= 128:
        hm = _hadamard_pm1(W, B, tl.float32)
        y = tl.dot(tl.reshape(x, (R, W)), hm, input_precision="ieee")
    else:
        # H_W = H_2 (x) H_{W/2}: one butterfly, then two dots with H_{W/2} (an fp32
        # [256, 256] matrix would need 256 KiB of shared memory; the H200 has 227).
        HW: tl.constexpr = W // 2
        a, b = tl.split(tl.permute(tl.reshape(x, (R, 2, HW)), (0, 2, 1)))
        hm = _hadamard_pm1(HW, HW, tl.float32)
        ya = tl.dot(a + b, hm, input_precision="ieee")
        yb = tl.dot(a - b, hm, input_precision="ieee")
        y = tl.permute(tl.join(ya, yb), (0, 2, 1))
    x = tl.reshape(y, (BLOCK_T, D)) * inv_sqrt_b
    optrs = out_ptr + offs_t.to(tl.int64)[:, None] * o_st + head * o_sh + e[None, :]
    tl.store(optrs, x.to(out_ptr.dtype.element_ty), mask=m2)


@triton.jit(do_not_specialize=['T'])
def _unrotate_kernel(
    data_ptr, scale_ptr, loc_ptr, out_ptr, o_st, o_sh, T, H, inv_sqrt_b,
    D: tl.constexpr, G: tl.constexpr, B: tl.constexpr, W: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Rotated rows back to the original basis when each Hadamard block lies inside one
    group (G % B == 0, the default formats): a block shares one (scale, min), so
    x H = scale * (codes H) + min * (1 H), and 1 H_B is B at the block's first channel
    and 0 elsewhere. codes H runs on fp16 tensor cores and is exact (1024 + code and +-1
    are fp16-exact, the sums are integers below 2^18 accumulated in fp32), where
    `_dequantize_kernel` needs fp32 FMA dots because its input is already scaled.
    Programs loop over token tiles so that building H in registers is paid once."""
    NG: tl.constexpr = D // G
    HB: tl.constexpr = G // 2
    R: tl.constexpr = BLOCK_T * D // W
    HW: tl.constexpr = W if W <= 128 else W // 2
    # W = 256: H_W = H_2 (x) H_{W/2}, one exact butterfly on the codes and two half dots
    hm = _hadamard_pm1(HW, min(B, HW), tl.float16)
    head = tl.program_id(1)
    g = tl.arange(0, NG)[None, :, None]
    j = tl.arange(0, HB)[None, None, :]
    r = tl.arange(0, G)[None, None, :]
    for t0 in range(tl.program_id(0) * BLOCK_T, T, tl.num_programs(0) * BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        mask_t = offs_t < T
        slot = tl.load(loc_ptr + offs_t, mask=mask_t, other=0).to(tl.int64)
        row = (slot * H + head)[:, None, None]
        m3 = mask_t[:, None, None]
        packed = tl.load(data_ptr + row * (D // 2) + g * HB + j, mask=m3, other=0).to(tl.int32)
        # [tokens, groups, G/2] x (low, high) -> [tokens, D], channel g*G + half*G/2 + j
        # 1024 + code as fp16 by its bits (0x6400 | code): no int-to-float conversion
        lo = ((packed & 15) | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
        hi = ((packed >> 4) | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
        codes = tl.join(lo, hi)
        codes = tl.reshape(tl.permute(codes, (0, 1, 3, 2)), (BLOCK_T, D))
        if W <= 128:
            y = tl.dot(tl.reshape(codes, (R, W)), hm, out_dtype=tl.float32)
        else:
            a, b = tl.split(tl.permute(tl.reshape(codes, (R, 2, HW)), (0, 2, 1)))
            a, b = a - 1024.0, b - 1024.0  # (1024 + c) sums would leave fp16's exact range
            y = tl.permute(tl.join(tl.dot(a + b, hm, out_dtype=tl.float32),
                                   tl.dot(a - b, hm, out_dtype=tl.float32)), (0, 2, 1))
        y = tl.reshape(y, (BLOCK_T, NG, G))
        sp = scale_ptr + row * (NG * 2) + g * 2
        s = tl.load(sp, mask=m3, other=0.0).to(tl.float32)
        mn = tl.load(sp + 1, mask=m3, other=0.0).to(tl.float32)
        # (1024 + c) H = c H + 1024 (1 H): the offset lands on each block's first channel,
        # removed while y is still an exact integer
        first = r % B == 0
        if W <= 128:
            y = tl.where(first, y - 1024.0 * B, y)
        x = (y * s + tl.where(first, mn * B, 0.0)) * inv_sqrt_b
        optrs = out_ptr + offs_t.to(tl.int64)[:, None, None] * o_st + head * o_sh + g * G + r
        tl.store(optrs, x.to(out_ptr.dtype.element_ty), mask=m3)


@triton.jit(do_not_specialize=['T'])
def _unpack_kernel(
    data_ptr, scale_ptr, loc_ptr, out_ptr, o_st, o_sh, T, H,
    D: tl.constexpr, G: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Stored basis (no rotation): x = code * scale + min. The tile is [tokens, groups,
    G/2 bytes]: each byte's low nibble is channel j of its group and its high nibble
    channel G/2 + j, so the two halves are stored as two contiguous runs per group and
    each group's (scale, min) is loaded once, not per channel."""
    NG: tl.constexpr = D // G
    HB: tl.constexpr = G // 2
    pid_t = tl.program_id(0)
    head = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < T
    slot = tl.load(loc_ptr + offs_t, mask=mask_t, other=0).to(tl.int64)
    row = (slot * H + head)[:, None, None]
    g = tl.arange(0, NG)[None, :, None]
    j = tl.arange(0, HB)[None, None, :]
    m3 = mask_t[:, None, None]
    packed = tl.load(data_ptr + row * (D // 2) + g * HB + j, mask=m3, other=0).to(tl.int32)
    sp = scale_ptr + row * (NG * 2) + g * 2
    s = tl.load(sp, mask=m3, other=0.0).to(tl.float32)
    mn = tl.load(sp + 1, mask=m3, other=0.0).to(tl.float32)
    lo = (packed & 15).to(tl.float32) * s + mn
    hi = (packed >> 4).to(tl.float32) * s + mn
    optrs = out_ptr + offs_t.to(tl.int64)[:, None, None] * o_st + head * o_sh + g * G + j
    tl.store(optrs, lo.to(out_ptr.dtype.element_ty), mask=m3)
    tl.store(optrs + HB, hi.to(out_ptr.dtype.element_ty), mask=m3)


# ----------------------------------------------------------------------------------
# host side

_PROGRAMS = {}


def _target_programs(device: torch.device) -> int:
    """Programs worth launching at once: a few per SM (cached per device; no sync)."""
    key = (device.type, device.index)
    if key not in _PROGRAMS:
        if device.type == "cuda":
            _PROGRAMS[key] = 8 * torch.cuda.get_device_properties(device).multi_processor_count
        else:  # Triton interpreter: few, long-running programs are cheapest
            _PROGRAMS[key] = 8
    return _PROGRAMS[key]


def _check_fmt(fmt: Int4KVFormat, d: int) -> None:
    if fmt.head_dim != d:
        raise ValueError(f"tensor head_dim {d} != format head_dim {fmt.head_dim}")
    if d not in SUPPORTED_HEAD_DIMS:
        raise NotImplementedError(
            f"INT4 KV kernels support head_dim {SUPPORTED_HEAD_DIMS}, got {d}; "
            "use a BF16 KV cache for this model"
        )


def _consts(fmt: Int4KVFormat):
    b = fmt.block_size
    return dict(D=fmt.head_dim, G=fmt.group_size, B=b, W=max(b, 16)), 1.0 / math.sqrt(b)


def _block_t(d: int, b: int, rotated: bool, num_warps: int = 4) -> int:
    """~8K elements per tile (64 fp32 registers/thread at 4 warps). With the Kronecker
    rotation (b > 16) the tile must hold >= 16 * num_warps blocks, so that the high
    index bits land in registers of the dot accumulator (else layout shuffles)."""
    bt = max(16, 8192 // d)
    if rotated and b > 16:
        bt = max(bt, 16 * num_warps * b // d)
    return bt


def quantize_and_store(k, v, loc, k_data, k_scales, v_data, v_scales, fmt: Int4KVFormat,
                       k_affine=None):
    """Quantise k, v [T, H, D] (bf16/fp16; rows may be strided, last dim contiguous)
    and write them at slots loc [T] of the layer buffers (data [rows, H, D/2] uint8,
    scales [rows, H, D/G, 2] fp16). One launch; no allocation; no host sync; inputs
    are not modified. k_affine: the layer's K calibration (mul, add), contiguous fp32
    [H, D] on k's device (KCalibration.write_affine): K becomes k * mul + add first.
    fmt.scale_fit picks (scale, min) as reference.quantize does. With fmt.rotation == "none" the same kernel runs without the
    rotation (the fair baseline for timing the rotation). Repeated slots (padding)
    get one of the writers' values, possibly mixed; other slots are unaffected."""
    t, h, d = k.shape
    _check_fmt(fmt, d)
    if v.shape != k.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    if k.dtype not in (torch.bfloat16, torch.float16) or v.dtype != k.dtype:
        raise TypeError(f"k and v must both be bf16 or fp16, got {k.dtype}, {v.dtype}")
    if k.stride(2) != 1 or v.stride(2) != 1:
        raise ValueError("the last dim of k and v must be contiguous")
    if loc.dim() != 1 or loc.numel() != t or loc.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"loc must be int32/int64 of shape [{t}], got {loc.dtype} {tuple(loc.shape)}")
    for name, buf, shape, dt in (
        ("k_data", k_data, fmt.data_shape(k_data.shape[0], h), torch.uint8),
        ("v_data", v_data, fmt.data_shape(v_data.shape[0], h), torch.uint8),
        ("k_scales", k_scales, fmt.scale_shape(k_scales.shape[0], h), torch.float16),
        ("v_scales", v_scales, fmt.scale_shape(v_scales.shape[0], h), torch.float16),
    ):
        if tuple(buf.shape) != shape or buf.dtype != dt or not buf.is_contiguous():
            raise ValueError(f"{name} must be a contiguous {dt} tensor of shape {shape}, "
                             f"got {buf.dtype} {tuple(buf.shape)}")
    if k_affine is not None:
        for name, a in zip(("mul", "add"), k_affine):
            if a.shape != (h, d) or a.dtype != torch.float32 or not a.is_contiguous() or a.device != k.device:
                raise ValueError(f"k_affine {name} must be a contiguous fp32 [{h}, {d}] tensor on "
                                 f"{k.device}, got {a.dtype} {tuple(a.shape)} on {a.device}")
    if t == 0:
        return
    _launch_quantize(k, v, loc, k_data, k_scales, v_data, v_scales, fmt, k_affine=k_affine)


def _launch_quantize(k, v, loc, k_data, k_scales, v_data, v_scales, fmt, block_t=None,
                     num_warps=4, programs=None, stages=1, dot_k=DOT_K, k_affine=None):
    """The launch itself, with the tuning knobs exposed for dev/gpu/quantize_speed.py:
    token-tile size, warps, programs per launch, software-pipelining stages of the
    tile loop (1 = off) and the depth of the rotation's tensor-core dot (16..B; the
    rest of each Hadamard block is butterflies; dot_k >= B is one dense dot)."""
    t, h, d = k.shape
    c, inv_sqrt_b = _consts(fmt)
    bt = block_t or _block_t(d, fmt.block_size, fmt.k_rotated or fmt.v_rotated, num_warps)
    tiles = triton.cdiv(t, bt)
    grid_t = min(tiles, max(1, (programs or _target_programs(k.device)) // (2 * h)))
    kmul, kadd = k_affine if k_affine is not None else (k_scales, k_scales)  # unused then
    _quantize_kv_kernel[(grid_t, h, 2)](
        k, k.stride(0), k.stride(1), v, v.stride(0), v.stride(1), loc,
        k_data, k_scales, v_data, v_scales, kmul, kadd,
        t, h, inv_sqrt_b,
        BLOCK_T=bt, ROT_K=fmt.k_rotated, ROT_V=fmt.v_rotated, CLAMP_V=CLAMP,
        DOT_K=dot_k, STAGES=stages, K_AFFINE=k_affine is not None, LSQ=fmt.scale_fit == "lsq",
        num_warps=num_warps, **c,
    )


def unrotates_on_tensor_cores(fmt: Int4KVFormat) -> bool:
    """Whether `dequantize(..., rotated=True)` runs `_unrotate_kernel` (each Hadamard block
    inside one group) rather than the slow fp32-dot kernel."""
    return fmt.group_size % fmt.block_size == 0


def dequantize(data, scales, loc, fmt: Int4KVFormat, rotated: bool, dtype=torch.bfloat16, out=None):
    """Slots loc [T] of (data, scales) -> [T, H, D] in `dtype`: the inverse rotation is
    applied when `rotated` (original basis), else the values stay in their stored basis."""
    _check_fmt(fmt, data.shape[-1] * 2)
    t, h, d = loc.numel(), data.shape[1], fmt.head_dim
    if not (data.is_contiguous() and scales.is_contiguous()):
        raise ValueError("data and scales must be contiguous")
    if out is None:
        out = torch.empty((t, h, d), dtype=dtype, device=data.device)
    elif tuple(out.shape) != (t, h, d) or out.stride(2) != 1:
        raise ValueError(f"out must be [{t}, {h}, {d}] with a contiguous last dim")
    if t == 0:
        return out
    bt = DEQUANT_BLOCK_T
    if not rotated:
        _unpack_kernel[(triton.cdiv(t, bt), h)](
            data, scales, loc, out, out.stride(0), out.stride(1), t, h,
            D=fmt.head_dim, G=fmt.group_size, BLOCK_T=bt, num_warps=4,
        )
        return out
    c, inv_sqrt_b = _consts(fmt)
    if unrotates_on_tensor_cores(fmt):
        grid_t = min(triton.cdiv(t, bt), max(1, _target_programs(data.device) // h))
        _unrotate_kernel[(grid_t, h)](
            data, scales, loc, out, out.stride(0), out.stride(1), t, h, inv_sqrt_b,
            BLOCK_T=bt, num_warps=4, **c,
        )
        return out
    _dequantize_kernel[(triton.cdiv(t, bt), h)](
        data, scales, loc, out, out.stride(0), out.stride(1),
        t, h, inv_sqrt_b,
        BLOCK_T=bt, num_warps=4, **c,
    )
    return out


def without_rotation(fmt: Int4KVFormat) -> Int4KVFormat:
    """The same format with rotation off: the no-rotation baseline for benchmarks."""
    return Int4KVFormat(head_dim=fmt.head_dim, group_size=fmt.group_size, rotation="none",
                        block_size=fmt.block_size, rotate_k=fmt.rotate_k, rotate_v=fmt.rotate_v,
                        scale_fit=fmt.scale_fit)
