"""INT4 split-KV decode attention in Gluon (Triton's explicit-layout dialect): each
thread loads exactly the packed bytes its tensor-core fragments need.

One warp per program (kv head, split, batch); nothing crosses warps in the loop.

  scores  S^T[t, h] = K[t, :] . q'[h, :]   mma m16n8k16: M = 16 tokens, N = the query
                                            heads of the KV head (padded to 8), K = channels
  output  O^T[c, h] = V^T[c, :] . P'^T     M = 16 channels, N = heads, K = tokens

* K is the A operand with k_width 8: a thread's 8 consecutive channels are 8 consecutive
  bytes of the packed row (one 8-byte load); q' (the B operand) uses the same k order.
* V^T is the A operand: a thread needs the same channels of tokens 2t, 2t+1, 2t+8, 2t+9.
  Its channel rows are relabelled (row r <-> byte RPT * (r % 8) + r // 8, RPT = D / 16) so
  that they are RPT consecutive bytes of each of its tokens (one load per token); the
  store maps rows back to channels.
* Codes become fp16 by bits (the nibble OR'ed into the mantissa of 1024.0: 1024 + n and
  1024 + 16 n, see decode._ASM_PAIR), with the bias left in:
    - K: the accumulator starts at -q_bias (q_bias = 1024 sum(q'_lo + q'_hi / 16));
    - V: each block's P.V starts from zero and is added to the fp32 running output, and
      1024 * Z (Z = sum of the fp16 P' exactly as the tensor cores saw them) is removed at
      the end. Only one block's products ever share a tensor-core accumulation, so the
      large bias costs no accuracy (a long-split accumulation of biased codes, or a Z
      taken from the unrounded p, would cancel badly).
* The scale/min of a token fold into per-token scalars:
     s = s_k (q'.(1024 + n) - q_bias) + m_k sum(q')
     o = (sum_t P'_t (1024 + n_t) - 1024 Z + sum_t p_t m_v,t) / l,   P'_t = p_t s_v,t
* Full blocks run unmasked; only the last block of a split masks its tokens.

decode_prep (kernels/decode.py) supplies q' = (q . H_B) * sm_scale (* log2 e) as fp16, the
high half pre-divided by 16, with sum(q') and q_bias; every program writes its normalised
partial output and log2-sum-exp to the split workspace, merged by the reduce kernel.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy, mma_v2

# 4 packed bytes -> both code planes, bias kept (see decode._ASM_PAIR)
from .decode_triton import _ASM_PAIR_BIASED

# one 4-byte (scale, min) fp16 pair -> two fp32
_ASM_SCALE_MIN = gl.constexpr("""{
.reg .b16 lo, hi;
mov.b32 {lo, hi}, $2;
cvt.f32.f16 $0, lo;
cvt.f32.f16 $1, hi;
}""")


@gluon.jit
def _codes(c):
    """packed bytes -> (1024 + lo nibble, 1024 + 16 hi nibble) as fp16, exact."""
    return gl.inline_asm_elementwise(_ASM_PAIR_BIASED, "=r,=r,=r,=r,r", [c],
                                     dtype=(gl.float16, gl.float16), is_pure=True, pack=4)


@gluon.jit
def _scale_min(w):
    """int32 words holding (scale, min) fp16 pairs -> two fp32 tensors."""
    return gl.inline_asm_elementwise(_ASM_SCALE_MIN, "=r,=r,r", [w], dtype=(gl.float32, gl.float32),
                                     is_pure=True, pack=1)


@gluon.jit
def _grid_dependency_sync(PDL: gl.constexpr):
    """tiles.grid_dependency_sync in Gluon: wait for the q' prep kernel's writes, then let
    the merge kernel launch early (programmatic dependent launch; no-op without it)."""
    if PDL:
        gl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1)
        gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0", "=r", [], dtype=gl.int32,
                                  is_pure=False, pack=1)


@gluon.constexpr_function
def _log2(n):
    return n.bit_length() - 1


@gluon.constexpr_function
def _v_load_layout(hg, block_n, half):
    """[HG, BLOCK_N, HALF] bytes: warp w holds head w; a thread holds RPT consecutive bytes
    (its relabelled channel rows) of tokens 2t, 2t+1, 2t+8, 2t+9 (+16 per k step): the V^T
    A-operand lanes."""
    rpt = half // 8
    regs = [[0, 0, 1 << i] for i in range(_log2(rpt))] + [[0, 1, 0], [0, 8, 0]]
    regs += [[0, 16 << i, 0] for i in range(_log2(block_n // 16))]
    lanes = [[0, 2, 0], [0, 4, 0], [0, 0, rpt], [0, 0, 2 * rpt], [0, 0, 4 * rpt]]
    warps = [[1 << i, 0, 0] for i in range(_log2(hg))]
    return gl.DistributedLinearLayout(reg_bases=regs, lane_bases=lanes, warp_bases=warps, block_bases=[],
                                      shape=[hg, block_n, half])


@gluon.constexpr_function
def _copy_layout(hg, half):
    """[HG, BLOCK_N, HALF] bytes, 16 per thread (one 16-byte async copy); consecutive lanes
    take consecutive 16-byte pieces of a token's K (or V) row across the HG heads, which
    lie side by side in the pool: one contiguous HG * HALF-byte run per token."""
    c = half // 16
    th = min(hg, 32 // c)
    return gl.BlockedLayout([1, 1, 16], [th, 32 // (th * c), c], [1, hg, 1], [2, 0, 1])


@gluon.constexpr_function
def _words_layout(hg):
    """[HG, BLOCK_N] (scale, min) words, heads fastest (contiguous in the pool)."""
    th = min(hg, 32)
    return gl.BlockedLayout([1, 1], [th, 32 // th], [1, hg], [0, 1])


@gluon.jit
def _slots(indices_ptr, n0, offs, n_valid, PAGE: gl.constexpr, OFF64: gl.constexpr):
    """Slots of tokens n0 + offs; tokens past n_valid read slot 0 (a valid row)."""
    valid = offs < n_valid
    if PAGE == 1:
        slot = gl.load(indices_ptr + n0 + offs, mask=valid, other=0)
    else:
        t = n0 + offs
        slot = gl.load(indices_ptr + t // PAGE, mask=valid, other=0) * PAGE + t % PAGE
    if OFF64:
        slot = slot.to(gl.int64)
    return slot


@gluon.jit
def _issue_copies(sk, sv, sks, svs, slot_c, slot_s, kd_grp, vd_grp, ks_grp, vs_grp,
                  stride_kd_t, stride_kd_h, stride_vd_t, stride_vd_h, sks_t, svs_t, n_heads,
                  HG: gl.constexpr, HALF: gl.constexpr, PAD: gl.constexpr):
    """Async copies of one block (K rows, V rows, (scale, min) words of HG heads) into one
    stage, committed as one group. PAD: only the first n_heads heads are real; the copies
    of the others are masked off (zero-filled, nothing read)."""
    CPL: gl.constexpr = _copy_layout(HG, HALF)
    WL: gl.constexpr = _words_layout(HG)
    hh = gl.arange(0, HG, layout=gl.SliceLayout(1, gl.SliceLayout(2, CPL)))
    j = gl.arange(0, HALF, layout=gl.SliceLayout(0, gl.SliceLayout(1, CPL)))
    row_k = (slot_c * stride_kd_t)[None, :, None] + (hh * stride_kd_h)[:, None, None] + j[None, None, :]
    row_v = (slot_c * stride_vd_t)[None, :, None] + (hh * stride_vd_h)[:, None, None] + j[None, None, :]
    hw = gl.arange(0, HG, layout=gl.SliceLayout(1, WL))
    words_k = ks_grp + (slot_s * sks_t)[None, :] + hw[:, None]
    words_v = vs_grp + (slot_s * svs_t)[None, :] + hw[:, None]
    if PAD:
        mc = (hh < n_heads)[:, None, None]
        mw = (hw < n_heads)[:, None]
        async_copy.async_copy_global_to_shared(sk, kd_grp + row_k, mask=mc)
        async_copy.async_copy_global_to_shared(sv, vd_grp + row_v, mask=mc)
        async_copy.async_copy_global_to_shared(sks, words_k, mask=mw)
        async_copy.async_copy_global_to_shared(svs, words_v, mask=mw)
    else:
        async_copy.async_copy_global_to_shared(sk, kd_grp + row_k)
        async_copy.async_copy_global_to_shared(sv, vd_grp + row_v)
        async_copy.async_copy_global_to_shared(sks, words_k)
        async_copy.async_copy_global_to_shared(svs, words_v)
    async_copy.commit_group()


@gluon.jit
def _attend_block(kc, vc, kw, vw, q_lo, q_hi, s_init, sum_q, m_i, l_i, z_i, a_i, o_lo, o_hi,
                  n_valid, logit_cap, HG: gl.constexpr, HALF: gl.constexpr, RPT: gl.constexpr,
                  BLOCK_N: gl.constexpr, CAP: gl.constexpr):
    """One block: kc [HG, BLOCK_N, HALF] (K A-operand layout), vc (V load layout), kw / vw
    (scale, min) words [HG, BLOCK_N] -> the updated softmax state and output sums."""
    MMA: gl.constexpr = s_init.type.layout
    VA: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
    PB: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=2)
    k_s, k_m = _scale_min(kw)
    v_s, v_m = _scale_min(vw)

    # ---- scores (base 2) and the online softmax over the token axis (warp-local)
    k_lo, k_hi = _codes(kc)
    acc = mma_v2(k_lo, q_lo, s_init)
    acc = mma_v2(k_hi, q_hi, acc)
    s = acc * k_s[:, :, None] + sum_q[:, None, :] * k_m[:, :, None]
    if CAP:
        e = gl.exp2((-2.0 * 1.4426950408889634 / logit_cap) * s)
        s = logit_cap * (2.0 / (1.0 + e) - 1.0) * 1.4426950408889634
    offs_t = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, gl.SliceLayout(2, MMA)))
    s = gl.where((offs_t < n_valid)[None, :, None], s, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, 1))
    alpha = gl.exp2(m_i - m_new)
    p = gl.exp2(s - m_new[:, None, :])
    p16 = (p * v_s[:, :, None]).to(gl.float16)
    l_i = l_i * alpha + gl.sum(p, 1)
    z_i = z_i * alpha + gl.sum(p16.to(gl.float32), 1)
    a_i = a_i * alpha + gl.sum(p * v_m[:, :, None], 1)
    pv = gl.convert_layout(p16, PB)

    # ---- P.V over the relabelled channel rows, this block only, then into the fp32 sum
    vt = gl.permute(vc, [0, 2, 1])  # [HG, HALF, BLOCK_N], row j = byte j
    vt = gl.reshape(gl.permute(gl.reshape(vt, [HG, 8, RPT, BLOCK_N]), [0, 2, 1, 3]), [HG, HALF, BLOCK_N])
    v_lo, v_hi = _codes(gl.convert_layout(vt, VA))
    zero = gl.zeros([HG, HALF, s_init.shape[2]], gl.float32, layout=MMA)
    o_lo = o_lo * alpha[:, None, :] + mma_v2(v_lo, pv, zero)
    o_hi = o_hi * alpha[:, None, :] + mma_v2(v_hi, pv, zero)
    return m_new, l_i, z_i, a_i, o_lo, o_hi


@gluon.jit(do_not_specialize=['NUM_SPLITS', 'stride_mo_b', 'stride_mo_h', 'stride_mo_s', 'stride_ml_b', 'stride_ml_h'])
def decode_split_kernel(
    qp_ptr, qs_ptr, kd_ptr, ks_ptr, vd_ptr, vs_ptr, indptr_ptr, indices_ptr, lens_ptr,
    mid_o_ptr, mid_lse_ptr, logit_cap,
    stride_qb, stride_qh, stride_qsb,
    stride_kd_t, stride_kd_h, stride_ks_t, stride_ks_h,
    stride_vd_t, stride_vd_h, stride_vs_t, stride_vs_h,
    stride_mo_b, stride_mo_h, stride_mo_s, stride_ml_b, stride_ml_h,
    NUM_SPLITS, HKV,
    HG: gl.constexpr, GQA: gl.constexpr, NH: gl.constexpr, D: gl.constexpr, PAGE: gl.constexpr,
    BLOCK_N: gl.constexpr, CAP: gl.constexpr, OFF64: gl.constexpr, MIN_BLOCKS: gl.constexpr,
    STAGES: gl.constexpr, SWZ_VEC: gl.constexpr, SWZ_PHASES: gl.constexpr, DIRECT: gl.constexpr,
    PDL: gl.constexpr, PAD: gl.constexpr,
):
    """Grid (cdiv(KV heads, HG), splits, batch); HG warps, warp w serves KV head HG * pid0 + w
    (PAD: HG does not divide the HKV heads; the warps past the last head idle, masked).
    DIRECT (one split): mid_o_ptr is the output itself (q's dtype), no log-sum-exp.
    PDL: launched while the prep kernel runs; the first blocks' copies are issued before
    waiting for its q' (the pool was written before the prep kernel passed its own wait)."""
    HALF: gl.constexpr = D // 2
    RPT: gl.constexpr = HALF // 8
    MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[HG, 1, 1],
                                                  instr_shape=[1, 16, 8])
    KA: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=8)
    QB: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=8)
    VL: gl.constexpr = _v_load_layout(HG, BLOCK_N, HALF)
    CPL: gl.constexpr = _copy_layout(HG, HALF)
    WL: gl.constexpr = _words_layout(HG)
    ROW: gl.constexpr = gl.SliceLayout(2, MMA)  # [HG, BLOCK_N]
    COL: gl.constexpr = gl.SliceLayout(1, MMA)  # [HG, NH]
    # SWZ_VEC-byte pieces of row r XOR'ed with r % SWZ_PHASES, so that the K fragment reads
    # (8 rows x 32 bytes per half warp) hit distinct banks (D=128: 16 x 4, D=256: 32 x 4)
    KSH: gl.constexpr = gl.SwizzledSharedLayout(SWZ_VEC, 1, SWZ_PHASES, [2, 1, 0])
    WSH: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])

    grp = gl.program_id(0)
    sp = gl.program_id(1)
    b = gl.program_id(2)
    kv_len = gl.load(lens_ptr + b)
    split_len = gl.maximum(gl.cdiv(gl.cdiv(kv_len, NUM_SPLITS), BLOCK_N), MIN_BLOCKS) * BLOCK_N
    start = sp * split_len
    end = gl.minimum(start + split_len, kv_len)
    if start >= end and not DIRECT:  # (DIRECT: an empty request still writes its zeros)
        return

    indices = indices_ptr + gl.load(indptr_ptr + b).to(gl.int64)
    n_heads = HKV - grp * HG  # real KV heads of this program (>= HG unless PAD)
    kd_grp = kd_ptr + grp * HG * stride_kd_h
    vd_grp = vd_ptr + grp * HG * stride_vd_h
    ks_grp = (ks_ptr + grp * HG * stride_ks_h).to(gl.pointer_type(gl.int32), bitcast=True)
    vs_grp = (vs_ptr + grp * HG * stride_vs_h).to(gl.pointer_type(gl.int32), bitcast=True)
    sks_t = stride_ks_t // 2  # (scale, min) words
    svs_t = stride_vs_t // 2

    smem_k = gl.allocate_shared_memory(gl.uint8, [STAGES, HG, BLOCK_N, HALF], KSH)
    smem_v = gl.allocate_shared_memory(gl.uint8, [STAGES, HG, BLOCK_N, HALF], KSH)
    smem_kw = gl.allocate_shared_memory(gl.int32, [STAGES, HG, BLOCK_N], WSH)
    smem_vw = gl.allocate_shared_memory(gl.int32, [STAGES, HG, BLOCK_N], WSH)

    m_i = gl.full([HG, NH], float("-inf"), gl.float32, layout=COL)
    l_i = gl.zeros([HG, NH], gl.float32, layout=COL)
    z_i = gl.zeros([HG, NH], gl.float32, layout=COL)
    a_i = gl.zeros([HG, NH], gl.float32, layout=COL)
    o_lo = gl.zeros([HG, HALF, NH], gl.float32, layout=MMA)
    o_hi = gl.zeros([HG, HALF, NH], gl.float32, layout=MMA)

    offs_c = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, gl.SliceLayout(2, CPL)))
    offs_s = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, WL))
    # ---- pipeline: block i + STAGES - 1 is copied while block i is computed; the slots
    # of the block after that are loaded one iteration earlier still (their own latency)
    slot_c = _slots(indices, start, offs_c, end - start, PAGE, OFF64)
    slot_s = _slots(indices, start, offs_s, end - start, PAGE, OFF64)
    for pre in gl.static_range(STAGES - 1):
        n1 = start + (pre + 1) * BLOCK_N
        next_c = _slots(indices, n1, offs_c, end - n1, PAGE, OFF64)
        next_s = _slots(indices, n1, offs_s, end - n1, PAGE, OFF64)
        _issue_copies(smem_k.index(pre), smem_v.index(pre), smem_kw.index(pre), smem_vw.index(pre),
                      slot_c, slot_s, kd_grp, vd_grp, ks_grp, vs_grp, stride_kd_t, stride_kd_h,
                      stride_vd_t, stride_vd_h, sks_t, svs_t, n_heads, HG, HALF, PAD)
        slot_c = next_c
        slot_s = next_s
    _grid_dependency_sync(PDL)
    # ---- q' planes as the B operand [HG, HALF, NH], per-head sum(q') and bias
    hq0 = grp * HG * GQA
    q_w = gl.arange(0, HG, layout=gl.SliceLayout(1, gl.SliceLayout(2, QB)))
    q_c = gl.arange(0, HALF, layout=gl.SliceLayout(0, gl.SliceLayout(2, QB)))
    q_n = gl.arange(0, NH, layout=gl.SliceLayout(0, gl.SliceLayout(1, QB)))
    q_ptrs = (qp_ptr + b * stride_qb + (hq0 + q_w[:, None, None] * GQA + q_n[None, None, :]) * stride_qh
              + q_c[None, :, None])
    q_mask = (q_n < GQA)[None, None, :] & (q_w < n_heads)[:, None, None]
    q_lo = gl.load(q_ptrs, mask=q_mask, other=0.0)
    q_hi = gl.load(q_ptrs + HALF, mask=q_mask, other=0.0)
    c_w = gl.arange(0, HG, layout=gl.SliceLayout(1, COL))
    c_n = gl.arange(0, NH, layout=gl.SliceLayout(0, COL))
    heads = hq0 + c_w[:, None] * GQA + c_n[None, :]  # [HG, NH] query heads
    hmask = (c_n < GQA)[None, :] & (c_w < n_heads)[:, None]
    qs_ptrs = qs_ptr + b * stride_qsb + heads * 2
    sum_q = gl.load(qs_ptrs, mask=hmask, other=0.0)
    q_bias = gl.load(qs_ptrs + 1, mask=hmask, other=0.0)
    s_init = gl.zeros([HG, BLOCK_N, NH], gl.float32, layout=MMA) - q_bias[:, None, :]

    n_blocks = gl.cdiv(end - start, BLOCK_N)
    for i in range(n_blocks):
        n1 = start + (i + STAGES) * BLOCK_N
        next_c = _slots(indices, n1, offs_c, end - n1, PAGE, OFF64)
        next_s = _slots(indices, n1, offs_s, end - n1, PAGE, OFF64)
        st = (i + STAGES - 1) % STAGES
        _issue_copies(smem_k.index(st), smem_v.index(st), smem_kw.index(st), smem_vw.index(st),
                      slot_c, slot_s, kd_grp, vd_grp, ks_grp, vs_grp, stride_kd_t, stride_kd_h,
                      stride_vd_t, stride_vd_h, sks_t, svs_t, n_heads, HG, HALF, PAD)
        slot_c = next_c
        slot_s = next_s
        async_copy.wait_group(STAGES - 1)
        gl.thread_barrier()  # every thread's copies of block i have landed
        cur = i % STAGES
        kc = smem_k.index(cur).load(KA)
        vc = smem_v.index(cur).load(VL)
        kw = smem_kw.index(cur).load(ROW)
        vw = smem_vw.index(cur).load(ROW)
        gl.thread_barrier()  # the stage may be overwritten by the next iteration's copies
        m_i, l_i, z_i, a_i, o_lo, o_hi = _attend_block(
            kc, vc, kw, vw, q_lo, q_hi, s_init, sum_q, m_i, l_i, z_i, a_i, o_lo, o_hi,
            end - start - i * BLOCK_N, logit_cap, HG, HALF, RPT, BLOCK_N, CAP)
    async_copy.wait_group(0)

    # ---- normalised partial output (natural channel order) and log2-sum-exp
    inv_l = 1.0 / l_i
    o_lo = (o_lo + (a_i - 1024.0 * z_i)[:, None, :]) * inv_l[:, None, :]
    o_hi = (o_hi * 0.0625 + (a_i - 64.0 * z_i)[:, None, :]) * inv_l[:, None, :]
    o_w = gl.arange(0, HG, layout=gl.SliceLayout(1, gl.SliceLayout(2, MMA)))
    o_r = gl.arange(0, HALF, layout=gl.SliceLayout(0, gl.SliceLayout(2, MMA)))
    o_n = gl.arange(0, NH, layout=gl.SliceLayout(0, gl.SliceLayout(1, MMA)))
    chan = RPT * (o_r % 8) + o_r // 8
    mo = (mid_o_ptr + b * stride_mo_b + sp * stride_mo_s
          + (hq0 + o_w[:, None, None] * GQA + o_n[None, None, :]) * stride_mo_h + chan[None, :, None])
    omask = (o_n < GQA)[None, None, :] & (o_w < n_heads)[:, None, None]
    if DIRECT:
        o_lo = gl.where(l_i[:, None, :] > 0, o_lo, 0.0)
        o_hi = gl.where(l_i[:, None, :] > 0, o_hi, 0.0)
    dt = mid_o_ptr.dtype.element_ty
    gl.store(mo, o_lo.to(dt), mask=omask)
    gl.store(mo + HALF, o_hi.to(dt), mask=omask)
    if not DIRECT:
        gl.store(mid_lse_ptr + b * stride_ml_b + heads * stride_ml_h + sp, m_i + gl.log2(l_i), mask=hmask)
