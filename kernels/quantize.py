"""Triton kernels that write the SAW-INT4 KV cache and read it back.

`quantize_and_store` is the per-layer cache write: one launch quantises K and V of
all tokens and heads of a layer and scatters the packed bytes and fp16 (scale, min)
pairs into the pool rows named by `loc`. `dequantize` reads slots back to BF16/FP16
(fallbacks, debugging, tests). Both match `reference.py` (see tests/test_quantize.py
for the tolerances and why).

Rotation is done in registers as one tensor-core dot of the [rows, W] tile with an
exact +-1 Sylvester matrix (W = max(block, 16); blocks smaller than 16 become a
block-diagonal 16x16 matrix), generated inside the kernel from index parity, so the
call allocates nothing and needs no constant buffer. Products of fp16 values with
+-1 are exact and accumulate in fp32; the 1/sqrt(B) factor is applied afterwards.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .format import CLAMP, Int4KVFormat

SUPPORTED_HEAD_DIMS = (64, 128, 256)


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
def _quantize_rows(
    src, stride_t, stride_h, loc_ptr, data_ptr, scale_ptr,
    T, H, head, pid_t, nprog_t, inv_sqrt_b,
    D: tl.constexpr, G: tl.constexpr, B: tl.constexpr, W: tl.constexpr,
    BLOCK_T: tl.constexpr, ROTATE: tl.constexpr, CLAMP_V: tl.constexpr,
):
    NG: tl.constexpr = D // G
    offs_d = tl.arange(0, D)
    offs_b = tl.arange(0, D // 2)
    offs_g = tl.arange(0, NG)
    # nibble shift per half-group: element j -> low nibble, j + G/2 -> high nibble
    shift = (tl.arange(0, 2) * 4)[None, None, :, None]
    if ROTATE:
        hm = _hadamard_pm1(W, B, tl.float16)
    num_tiles = tl.cdiv(T, BLOCK_T)
    for tile in range(pid_t, num_tiles, nprog_t):
        offs_t = tile * BLOCK_T + tl.arange(0, BLOCK_T)
        mask_t = offs_t < T
        ptrs = src + offs_t.to(tl.int64)[:, None] * stride_t + head * stride_h + offs_d[None, :]
        x = tl.load(ptrs, mask=mask_t[:, None], other=0.0).to(tl.float32)
        # reference.sanitize: NaN -> 0, +-inf / huge -> +-CLAMP
        x = tl.where(x != x, 0.0, x)
        x = tl.minimum(tl.maximum(x, -CLAMP_V), CLAMP_V)
        if ROTATE:
            # Sanitised bf16/fp16 values are fp16-exact (|x| <= 30000), except bf16
            # magnitudes below 2^-17, which round to the fp16 grid (error <= 2^-25).
            xr = tl.reshape(x.to(tl.float16), (BLOCK_T * D // W, W))
            y = tl.dot(xr, hm, out_dtype=tl.float32)
            x = tl.reshape(y, (BLOCK_T, D)) * inv_sqrt_b
            x = tl.minimum(tl.maximum(x, -CLAMP_V), CLAMP_V)
        xg = tl.reshape(x, (BLOCK_T, NG, 2, G // 2))
        hi = tl.max(tl.max(xg, axis=3), axis=2)
        lo = tl.min(tl.min(xg, axis=3), axis=2)
        scale16 = tl.math.div_rn(hi - lo, tl.full(hi.shape, 15.0, tl.float32)).to(tl.float16)
        min16 = lo.to(tl.float16)
        # divide by the stored fp16 values so that dequantisation is exact to the code
        s = scale16.to(tl.float32)
        m = min16.to(tl.float32)
        inv = tl.math.div_rn(tl.full(s.shape, 1.0, tl.float32), tl.where(s > 0, s, 1.0))
        inv = tl.where(s > 0, inv, 0.0)
        q = tl.floor((xg - m[:, :, None, None]) * inv[:, :, None, None] + 0.5)
        q = tl.minimum(tl.maximum(q, 0.0), 15.0).to(tl.int32)
        packed = tl.sum(q << shift, axis=2)  # [BLOCK_T, NG, G/2]
        packed = tl.reshape(packed, (BLOCK_T, D // 2)).to(tl.uint8)

        slot = tl.load(loc_ptr + offs_t, mask=mask_t, other=0).to(tl.int64)
        row = slot * H + head
        tl.store(data_ptr + row[:, None] * (D // 2) + offs_b[None, :], packed, mask=mask_t[:, None])
        sp = scale_ptr + row[:, None] * (NG * 2) + offs_g[None, :] * 2
        tl.store(sp, scale16, mask=mask_t[:, None])
        tl.store(sp + 1, min16, mask=mask_t[:, None])


@triton.jit
def _quantize_kv_kernel(
    k_ptr, k_st, k_sh, v_ptr, v_st, v_sh, loc_ptr,
    kd_ptr, ks_ptr, vd_ptr, vs_ptr,
    T, H, inv_sqrt_b,
    D: tl.constexpr, G: tl.constexpr, B: tl.constexpr, W: tl.constexpr,
    BLOCK_T: tl.constexpr, ROT_K: tl.constexpr, ROT_V: tl.constexpr, CLAMP_V: tl.constexpr,
):
    # grid: (token-tile programs, kv heads, {K, V}); each program strides over tiles
    pid_t = tl.program_id(0)
    head = tl.program_id(1)
    nprog_t = tl.num_programs(0)
    if tl.program_id(2) == 0:
        _quantize_rows(k_ptr, k_st, k_sh, loc_ptr, kd_ptr, ks_ptr, T, H, head, pid_t, nprog_t,
                       inv_sqrt_b, D, G, B, W, BLOCK_T, ROT_K, CLAMP_V)
    else:
        _quantize_rows(v_ptr, v_st, v_sh, loc_ptr, vd_ptr, vs_ptr, T, H, head, pid_t, nprog_t,
                       inv_sqrt_b, D, G, B, W, BLOCK_T, ROT_V, CLAMP_V)


@triton.jit
def _dequantize_kernel(
    data_ptr, scale_ptr, loc_ptr, out_ptr, o_st, o_sh,
    T, H, inv_sqrt_b,
    D: tl.constexpr, G: tl.constexpr, B: tl.constexpr, W: tl.constexpr,
    BLOCK_T: tl.constexpr, ROTATE: tl.constexpr,
):
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
    if ROTATE:
        # fp32 FMA dot ("ieee"): dequantised values are not fp16-exact; this path is
        # for fallbacks and tests, not the hot loop.
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


def _block_t(d: int) -> int:
    return max(16, 8192 // d)  # ~8K elements per tile: 64 fp32 registers/thread at 4 warps


def quantize_and_store(k, v, loc, k_data, k_scales, v_data, v_scales, fmt: Int4KVFormat):
    """Quantise k, v [T, H, D] (bf16/fp16; rows may be strided, last dim contiguous)
    and write them at slots loc [T] of the layer buffers (data [rows, H, D/2] uint8,
    scales [rows, H, D/G, 2] fp16). One launch; no allocation; no host sync; inputs
    are not modified. With fmt.rotation == "none" the same kernel runs without the
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
    if t == 0:
        return
    _launch_quantize(k, v, loc, k_data, k_scales, v_data, v_scales, fmt)


def _launch_quantize(k, v, loc, k_data, k_scales, v_data, v_scales, fmt, block_t=None,
                     num_warps=4, programs=None):
    """The launch itself, with the tuning knobs exposed for tests/gpu/quantize_speed.py."""
    t, h, d = k.shape
    c, inv_sqrt_b = _consts(fmt)
    bt = block_t or _block_t(d)
    tiles = triton.cdiv(t, bt)
    grid_t = min(tiles, max(1, (programs or _target_programs(k.device)) // (2 * h)))
    _quantize_kv_kernel[(grid_t, h, 2)](
        k, k.stride(0), k.stride(1), v, v.stride(0), v.stride(1), loc,
        k_data, k_scales, v_data, v_scales,
        t, h, inv_sqrt_b,
        BLOCK_T=bt, ROT_K=fmt.k_rotated, ROT_V=fmt.v_rotated, CLAMP_V=CLAMP,
        num_warps=num_warps, **c,
    )


def dequantize(data, scales, loc, fmt: Int4KVFormat, rotated: bool, dtype=torch.bfloat16, out=None):
    """Slots loc [T] of (data, scales) -> [T, H, D] in `dtype`, in the original basis
    (the inverse rotation is applied when `rotated`)."""
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
    c, inv_sqrt_b = _consts(fmt)
    bt = 32
    _dequantize_kernel[(triton.cdiv(t, bt), h)](
        data, scales, loc, out, out.stride(0), out.stride(1),
        t, h, inv_sqrt_b,
        BLOCK_T=bt, ROTATE=bool(rotated),
        num_warps=4, **c,
    )
    return out


def without_rotation(fmt: Int4KVFormat) -> Int4KVFormat:
    """The same format with rotation off: the no-rotation baseline for benchmarks."""
    return Int4KVFormat(head_dim=fmt.head_dim, group_size=fmt.group_size, rotation="none",
                        block_size=fmt.block_size, rotate_k=fmt.rotate_k, rotate_v=fmt.rotate_v)
