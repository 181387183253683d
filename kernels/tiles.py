"""Triton helpers shared by the decode and prefix attention kernels."""

import triton
import triton.language as tl

_LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def hadamard_signs(rows, cols, BS: tl.constexpr, LOG_BS: tl.constexpr):
    """+-1 (0 off the diagonal blocks) entries H_B[rows[:, None], cols[None, :]] * sqrt(B),
    as exact fp16: the Sylvester sign is the parity of the low log2(B) bits of rows & cols."""
    r = rows[:, None]
    c = cols[None, :]
    x = r & c & (BS - 1)
    par = tl.zeros_like(x)
    for k in tl.static_range(LOG_BS):
        par = par ^ ((x >> k) & 1)
    return tl.where((r // BS) == (c // BS), (1 - 2 * par).to(tl.float16), 0.0).to(tl.float16)


@triton.jit
def softcap_exp2(s, logit_cap):
    """cap * tanh(s / cap), times log2 e: soft-capped scores ready for exp2."""
    e = tl.exp2((-2.0 * _LOG2E / logit_cap) * s)
    return logit_cap * (2.0 / (1.0 + e) - 1.0) * _LOG2E


@triton.jit
def online_softmax_step(s, m_i, l_i):
    """One block of base-2 scores s [rows, N] into the running (max, sum):
    -> (p = exp2(s - new max), alpha to rescale the accumulator, new max, new sum)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def split_length(kv_len, NUM_SPLITS, BLOCK_N: tl.constexpr, MIN_BLOCKS: tl.constexpr):
    """Tokens per split of a request (a BLOCK_N multiple, at least MIN_BLOCKS blocks): the
    split kernels and the merge must agree (decode_mma computes the same in Gluon)."""
    return tl.maximum(tl.cdiv(tl.cdiv(kv_len, NUM_SPLITS), BLOCK_N), MIN_BLOCKS) * BLOCK_N


@triton.jit
def grid_dependency_sync(PDL: tl.constexpr):
    """With programmatic dependent launch (PDL, sm_90+): wait until the previous kernel's
    writes are visible, then let the next kernel's programs launch early (they wait the
    same way), so that launch latency overlaps this kernel's run. No-op without PDL."""
    if PDL:
        tl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=tl.int32, is_pure=False, pack=1)
        tl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0", "=r", [], dtype=tl.int32,
                                  is_pure=False, pack=1)
