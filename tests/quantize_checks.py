"""Shared checks for the quantize/dequantize kernels (CPU interpreter and GPU tests).

Tolerances, and why:
  * The kernel rotates with a tensor-core dot (fp32 accumulation in another order than
    the torch reference), so a rotated value may differ by a few fp32 ulps. That can
    move fp16(scale) or fp16(min) by one fp16 ulp and a code by one at a rounding
    boundary. So: scales and mins within 1 fp16 ulp; in groups whose (scale, min) are
    equal, codes never off by more than 1 and >= 99% equal; a group whose min moved
    by an ulp (>= 99% must not) is compared by value: one step plus the moves.
    Without rotation on CPU the arithmetic is the reference's, op for op: bit-equal.
  * Where the reference's fp32 rotation leaves cancellation residue (a constant row
    rotates to one value and exact zeros; the kernel's +-1 sums are exact), values
    within B * 2^-23 of the token-head magnitude count as equal and the codes of such
    noise-only groups are not compared.
  * Dequantisation of the same bytes: within fp32 rounding (a B-term sum of values
    up to max|x|).
  * scale_fit "lsq": codes come from the min-max pair as above, the stored pair is a
    least-squares fit from group sums (another summation order than torch's). A
    fitted min near zero has tiny fp16 ulps, so the pair is compared against the
    group's magnitude too (within 2^-10 of it: one fp16 ulp of the largest value),
    and the codes by count (>= 99% equal, the rest within one step) and by value.
"""

from __future__ import annotations

import torch

from saw_sglang.kernels import reference as ref
from saw_sglang.kernels.format import Int4KVFormat
from saw_sglang.kernels.quantize import dequantize, quantize_and_store

POISON_BYTE = 0xA5
POISON_SCALE = -1234.0


def fused_kv(t, hq, hkv, d, dtype, device, gen=None):
    """k, v as non-contiguous views of a fused qkv [T, (Hq + 2 Hkv) * D] tensor."""
    qkv = torch.randn(t, (hq + 2 * hkv) * d, generator=gen, device=device).to(dtype)
    k = qkv[:, hq * d : (hq + hkv) * d].view(t, hkv, d)
    v = qkv[:, (hq + hkv) * d :].view(t, hkv, d)
    # (a single token's view is contiguous, and its row stride arbitrary, in torch)
    assert t == 1 or (k.stride(0) == (hq + 2 * hkv) * d and not k.is_contiguous())
    return qkv, k, v


def poisoned_buffers(fmt: Int4KVFormat, rows, heads, device):
    """(k_data, k_scales, v_data, v_scales) filled with recognisable junk."""
    out = []
    for _ in range(2):
        data, scales = fmt.alloc(rows, heads, device)
        data.fill_(POISON_BYTE)
        scales.fill_(POISON_SCALE)
        out += [data, scales]
    return out


def fp16_ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Number of fp16 values between a and b (0 = equal, 1 = neighbours)."""

    def ordered(x):
        i = x.contiguous().view(torch.int16).int()
        return torch.where(i < 0, -(i & 0x7FFF), i)

    return (ordered(a.half()) - ordered(b.half())).abs()


def assert_slots_match(got, want, fmt, slots, exact, min_equal=0.99):
    """got/want: (data, scales) of one tensor; compare the rows in `slots`."""
    gd, gs = got[0][slots], got[1][slots]
    wd, ws = want[0][slots], want[1][slots]
    assert torch.isfinite(gs.float()).all(), "non-finite scale/min written"
    gc, wc = ref.unpack_codes(gd, fmt).int(), ref.unpack_codes(wd, fmt).int()
    if exact:  # the reference's arithmetic op for op (lsq: up to the order of its sums)
        assert torch.equal(gd, wd), "packed codes differ from the reference"
        if fmt.scale_fit == "minmax":
            assert torch.equal(gs, ws), "scales differ from the reference"
            return
    # fp32 noise of a B-term rotation, relative to the token-head's magnitude: the
    # reference's cancellations (e.g. a constant row rotates to one value and exact
    # zeros) leave residues of this size, where the kernel's +-1 sums are exact.
    wsf, gsf = ws.float(), gs.float()
    mag = torch.maximum(wsf[..., 1].abs(), (wsf[..., 1] + 15 * wsf[..., 0]).abs()).amax(-1)
    noise = (fmt.block_size * 2**-23 * mag)[:, :, None]
    degenerate = 15 * wsf[..., 0] <= noise  # the reference quantised rounding noise
    assert (15 * gsf[..., 0][degenerate] <= noise.expand_as(degenerate)[degenerate]).all()
    ulps = fp16_ulp_distance(gs, ws)
    close = (ulps <= 1) | ((gsf - wsf).abs() <= noise[..., None])
    if fmt.scale_fit == "lsq":
        # codes come from the min-max pair: >= 99% equal; a group with a flipped code
        # has another least-squares pair, so it is compared by value
        assert (gc == wc).float().mean().item() >= min_equal, "codes differ from the reference"
        flipped = (gc != wc).reshape(*gc.shape[:-1], fmt.num_groups, -1).any(-1)
        gmag = torch.maximum(wsf[..., 1].abs(), (wsf[..., 1] + 15 * wsf[..., 0]).abs())
        close |= (gsf - wsf).abs() <= 2**-10 * gmag[..., None] + noise[..., None]
        bad = ~close.all(-1) & ~flipped & ~degenerate
        assert not bad.any(), f"fitted scale/min off by {(gsf - wsf).abs()[bad].max().item():.3g}"
        gv = ref.dequantize_values(gd, gs, fmt, rotated=False).reshape(*gc.shape[:-1], fmt.num_groups, -1)
        wv = ref.dequantize_values(wd, ws, fmt, rotated=False).reshape(gv.shape)
        d_s, d_m = (gsf - wsf).abs().unbind(-1)
        bound = d_m + 15 * d_s + torch.maximum(gsf[..., 0], wsf[..., 0])
        err = (gv - wv).abs().amax(-1)
        ok = (err <= 1.001 * bound + 1e-6) | degenerate
        assert ok.all(), f"a fitted group dequantises {err[~ok].max().item():.3g} off the reference"
        assert flipped.float().mean().item() <= 1 - min_equal, "too many groups with a flipped code"
        return
    assert close.all(), f"scale/min off by {int(ulps[~close].max())} fp16 ulps"
    # Where (scale, min) are equal the codes must agree to +-1; where one of them moved
    # by an ulp all codes of the group shift (a min of 2654 has an fp16 ulp of 2, which
    # may be many steps), so there compare the dequantised values instead.
    same = (gsf == wsf).all(-1) & ~degenerate
    moved = ~(gsf == wsf).all(-1) & ~degenerate
    n_groups = int((~degenerate).sum())
    assert int(same.sum()) >= min_equal * n_groups, f"{int(moved.sum())} of {n_groups} groups moved"
    keep = same.repeat_interleave(fmt.group_size, -1)
    full = (gc - wc).abs() * keep
    if full.max() > 1:
        i, h, e = (full > 1).nonzero()[0].tolist()
        g = e // fmt.group_size
        raise AssertionError(
            f"a code is off by {int(full.max())} at row {i} head {h} group {g}: kernel "
            f"scale/min {gs[i, h, g].tolist()} vs reference {ws[i, h, g].tolist()}")
    diff = (gc - wc).abs()[keep]
    frac = (diff == 0).float().mean().item() if diff.numel() else 1.0
    assert frac >= min_equal, f"only {frac:.4f} of codes equal the reference"
    if moved.any():
        gv = ref.dequantize_values(gd, gs, fmt, rotated=False).reshape(gc.shape[:-1] + (fmt.num_groups, -1))
        wv = ref.dequantize_values(wd, ws, fmt, rotated=False).reshape(gv.shape)
        d_s, d_m = (gsf - wsf).abs().unbind(-1)
        bound = d_m + 15 * d_s + torch.maximum(gsf[..., 0], wsf[..., 0])
        err = (gv - wv).abs().amax(-1)
        assert (err[moved] <= 1.001 * bound[moved] + 1e-6).all(), "a moved group dequantises too far off"


def run_and_compare(k, v, loc, fmt, rows, exact, device):
    """Quantise with the kernel and the reference into poisoned pools; check the
    written slots, the untouched slots and the inputs."""
    heads = k.shape[1]
    bufs = poisoned_buffers(fmt, rows, heads, device)
    refs = [b.clone() for b in bufs]
    k0, v0, loc0 = k.clone(), v.clone(), loc.clone()
    quantize_and_store(k, v, loc, *bufs, fmt)
    ref.quantize_and_store_ref(k, v, loc, *refs, fmt)
    same = lambda a, b: torch.equal(a.view(torch.int16), b.view(torch.int16))  # NaN-safe
    assert same(k, k0) and same(v, v0) and torch.equal(loc, loc0), "inputs modified"
    written = torch.zeros(rows, dtype=torch.bool, device=device)
    written[loc.long()] = True
    for i in range(4):  # untouched rows keep their poison, bit for bit
        assert torch.equal(bufs[i][~written], refs[i][~written]), "an untouched slot changed"
    slots = written.nonzero().squeeze(1)
    assert_slots_match(bufs[0:2], refs[0:2], fmt, slots, exact)
    assert_slots_match(bufs[2:4], refs[2:4], fmt, slots, exact)
    return bufs


def check_dequantize_same_bytes(fmt, rows, heads, t, rotated, device, gen=None):
    """Random bytes and scales -> kernel vs reference, fp32 and bf16 outputs."""
    data = torch.randint(0, 256, fmt.data_shape(rows, heads), dtype=torch.uint8, generator=gen,
                         device=device)
    scales = torch.empty(fmt.scale_shape(rows, heads), device=device)
    scales[..., 0] = torch.rand(scales.shape[:-1], generator=gen, device=device) * 0.5
    scales[..., 1] = torch.randn(scales.shape[:-1], generator=gen, device=device) * 3
    scales = scales.half()
    loc = torch.randperm(rows, generator=gen, device=device)[:t]
    got = dequantize(data, scales, loc, fmt, rotated, dtype=torch.float32)
    want = ref.dequantize_ref(data, scales, loc, fmt, rotated, dtype=torch.float32)
    # fp32 rounding: each output is a sum of <= B terms of magnitude <= max|value|
    mag = want.abs().amax().item() + 1e-6
    terms = fmt.block_size if rotated else 2
    torch.testing.assert_close(got, want, rtol=0, atol=4 * terms * 2**-24 * mag)
    got16 = dequantize(data, scales, loc, fmt, rotated)  # default bf16
    assert got16.dtype == torch.bfloat16 and got16.shape == want.shape
    # one bf16 rounding of nearly-equal fp32 values: at most one bf16 ulp apart
    torch.testing.assert_close(got16.float(), want, rtol=2**-7, atol=8 * terms * 2**-24 * mag)


def check_round_trip(k, v, loc, fmt, rows, device):
    """dequantize(quantize(x)) vs reference.dequantize_values(reference.quantize(x)).
    Codes may differ by one at a few rounding boundaries: the rotation is orthonormal,
    so per token-head the 2-norm of the difference is at most step * sqrt(flips)
    (+ fp32 rounding), and zero flips means equal to rounding."""
    heads = k.shape[1]
    bufs = poisoned_buffers(fmt, rows, heads, device)
    quantize_and_store(k, v, loc, *bufs, fmt)
    for x, data, scales, rot in ((k, bufs[0], bufs[1], fmt.k_rotated), (v, bufs[2], bufs[3], fmt.v_rotated)):
        got = dequantize(data, scales, loc, fmt, rot, dtype=torch.float32)
        rd, rs = ref.quantize(x, fmt, rot)
        want = ref.dequantize_values(rd, rs, fmt, rot)
        flips = (ref.unpack_codes(data[loc.long()], fmt).int() - ref.unpack_codes(rd, fmt).int()) != 0
        step = torch.maximum(scales[loc.long()][..., 0].float(), rs[..., 0].float()).amax(-1)
        # mins may differ by one fp16 ulp too (<= 2^-10 relative, on every element)
        mins = rs[..., 1].float().abs().amax(-1) * 2**-10 * x.shape[-1] ** 0.5
        bound = step * flips.sum(-1).float().sqrt() + mins + 1e-5 * want.abs().amax(-1) + 1e-6
        err = (got - want).norm(dim=-1)
        assert (err <= bound).all(), f"round trip off by {(err - bound).max().item():.3g} beyond bound"
        # and the round trip is a quantisation of x: within a step (+ fp16 min rounding)
        xr = ref.sanitize(x)
        slack = 2**-10 * xr.abs().amax(-1)  # fp16 rounding of min (constant rows: step 0)
        assert ((got - xr).abs().amax(-1) <= 1.01 * step * x.shape[-1] ** 0.5 + slack).all()
