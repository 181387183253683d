"""Compile every kernel variant a serving process can need before the first request.

Triton and Gluon compile a kernel on its first launch for each combination of
constexpr values and integer specialisations; the per-call integers (token counts,
split counts, workspace strides) are marked do_not_specialize in the kernels, so what
is left is one variant per format, head layout and page size, plus the decode kernel
with and without splits. `warm_up` launches each once on tiny inputs over pool slot 0
(SGLang's padding slot), so none of them compiles inside a request. `compiled_variants`
counts what the JIT caches hold (the compile counter of the GPU tests).
"""

from __future__ import annotations

import torch

from . import decode, decode_triton, pool_read, prefix, quantize
from .format import Int4KVFormat


def _jit_functions():
    fns = [decode._decode_prep_kernel, decode._decode_merge_kernel, decode_triton._decode_split_kernel,
           quantize._quantize_kv_kernel, quantize._dequantize_kernel, quantize._unpack_kernel,
           quantize._unrotate_kernel, prefix._prefix_attn_kernel]
    try:
        from . import decode_mma
        fns.append(decode_mma.decode_split_kernel)
    except ImportError:  # a Triton without Gluon: the portable kernel serves
        pass
    return fns


def compiled_variants() -> int:
    """Kernel variants compiled so far in this process, over all our kernels and devices
    (0 under the Triton interpreter, which compiles nothing)."""
    return sum(len(cache[0]) for fn in _jit_functions()
               for cache in getattr(fn, "device_caches", {}).values())


def warm_up(fmt: Int4KVFormat, num_q_heads: int, num_kv_heads: int, k_data, k_scales, v_data, v_scales,
            page_size: int = 1, dtype=torch.bfloat16, logit_cap: float = 0.0, k_affine=None):
    """Launch the write, dequantise, prefix and decode kernels once (rows of slot 0).
    k_affine: a K calibration's (mul, add) of one layer, when the server has one (its
    write is a variant of its own)."""
    dev = k_data.device
    d = fmt.head_dim
    x = torch.zeros(1, num_kv_heads, d, dtype=dtype, device=dev)
    slot0 = torch.zeros(1, dtype=torch.int64, device=dev)
    quantize.quantize_and_store(x, x, slot0, k_data, k_scales, v_data, v_scales, fmt, k_affine=k_affine)
    quantize.dequantize(k_data, k_scales, slot0, fmt, False, dtype)  # the through-pool extend's
    if pool_read.UNROTATE_K and fmt.k_rotated and quantize.unrotates_on_tensor_cores(fmt):
        quantize.dequantize(k_data, k_scales, slot0, fmt, True, dtype)  # ... for q-heavy batches
    q = torch.zeros(1, num_q_heads, d, dtype=dtype, device=dev)
    one = torch.ones(1, dtype=torch.int32, device=dev)
    indptr = torch.tensor([0, 1], dtype=torch.int32, device=dev)
    entries = torch.zeros(1, dtype=torch.int32, device=dev)  # slot or page 0
    sm_scale = d ** -0.5
    prefix.prefix_attention(q, indptr, k_data, k_scales, v_data, v_scales, indptr, entries, one, fmt,
                            sm_scale, page_size=page_size, logit_cap=logit_cap)
    for splits in (1, 2):  # the decode kernel writes the output itself at one split
        decode.decode_attention(q, k_data, k_scales, v_data, v_scales, indptr, entries, one, fmt, sm_scale,
                                page_size=page_size, logit_cap=logit_cap, num_splits=splits)
