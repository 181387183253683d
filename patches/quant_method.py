"""SGLang KV quant method for SAW-INT4: the buffers, the write, fallback reads.

SGLang's own `MHATokenToKVPool` drives it (`quant_method=`), the same framework its
FP4 KV cache uses, so radix cache, chunked prefill, memory saver and slot moves
(which copy the scale buffers too) keep working. Per layer the pool holds
  k_buffer / v_buffer              uint8   [rows, H, D/2]   packed codes
  k_scale_buffer / v_scale_buffer  float16 [rows, H, NG, 2] (scale, min)
and `pool.get_raw_kv_buffer(layer)` hands all four to the INT4 attention backends.

No attention access rule is declared: `get_key_buffer` / `get_value_buffer`
return the packed bytes as they are (never a dequantised layer), and SGLang's
stock FlashInfer backend refuses the pool instead of misreading it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sglang.srt.layers.quantization.fp4_kv_cache_quant_method import (
    KV_CACHE_ATTENTION_ACCESS_REGISTRY,
    KVCacheQuantMethodBase,
)

from saw_sglang.kernels.calibration import KCalibration
from saw_sglang.kernels.format import Int4KVFormat

NAME = "saw_int4"


def is_int4_pool(pool) -> bool:
    """Whether a KV pool is ours (SGLang's pool with this quant method)."""
    return getattr(getattr(pool, "quant_method", None), "name", None) == NAME


def _load_kernels() -> tuple:
    """(quantize_and_store, dequantize): the Triton kernels, on every device (the CPU runs
    them under the Triton interpreter). Imported on first use, not when the plugin loads."""
    from saw_sglang.kernels import quantize as q

    return q.quantize_and_store, q.dequantize


class SawInt4KVCacheMethod(KVCacheQuantMethodBase):
    name = NAME

    def __init__(self, fmt: Int4KVFormat, calibration: KCalibration | None = None, start_layer: int = 0):
        """calibration: this rank's K calibration (all model layers, this rank's KV
        heads); start_layer: the model layer of the pool's first buffer (pipeline
        stages hold a slice of the layers)."""
        self.fmt = fmt
        self.calibration = calibration
        self.start_layer = start_layer
        self.SCALE_BLOCK_SIZE = fmt.group_size
        self._quantize_and_store = self._dequantize = None
        self._affine = {}  # k_buffer data_ptr -> (mul, add) of that layer
        self._read = {}  # model layer -> (mean, scale) for the readers, None where identity

    def k_affine(self, k_buffer):
        """The write-side K calibration of the layer owning k_buffer (None without)."""
        return self._affine.get(k_buffer.data_ptr()) if self.calibration is not None else None

    def read_calibration(self, layer_id: int):
        """(mean, scale) [H, D] fp32 of model layer `layer_id` for the attention readers,
        each None when it changes nothing (no calibration, or a mean- or scale-only one)."""
        return self._read.get(layer_id, (None, None))

    def _kernels(self):
        if self._quantize_and_store is None:
            self._quantize_and_store, self._dequantize = _load_kernels()

    def create_buffers(self, size, head_num, head_dim, layer_num, device) -> dict:
        if head_dim != self.fmt.head_dim:
            raise ValueError(
                f"INT4 KV format was built for head_dim {self.fmt.head_dim}, "
                f"the pool has {head_dim}"
            )
        self._kernels()  # fail at startup, not at the first write
        f = self.fmt
        new = lambda shape, dtype: [  # noqa: E731
            torch.zeros(shape, dtype=dtype, device=device) for _ in range(layer_num)
        ]
        k_buffers = new(f.data_shape(size, head_num), torch.uint8)
        if self.calibration is not None:
            cal = self.calibration
            if cal.shape[1:] != (head_num, head_dim) or self.start_layer + layer_num > cal.shape[0]:
                raise ValueError(
                    f"K calibration {cal.shape} does not fit this pool (layers "
                    f"{self.start_layer}..{self.start_layer + layer_num}, {head_num} KV heads, "
                    f"head_dim {head_dim})")
            # the write is per layer: key the layer's (mul, add) by its buffer
            self._affine = {buf.data_ptr(): cal.write_affine(self.start_layer + i, device)
                            for i, buf in enumerate(k_buffers)}
            self._read = {layer: cal.read_side(layer, device)
                          for layer in range(self.start_layer, self.start_layer + layer_num)}
        return {
            "k_buffer": k_buffers,
            "v_buffer": new(f.data_shape(size, head_num), torch.uint8),
            "k_scale_buffer": new(f.scale_shape(size, head_num), torch.float16),
            "v_scale_buffer": new(f.scale_shape(size, head_num), torch.float16),
            "dq_k_buffer": None,
            "dq_v_buffer": None,
            "store_dtype": torch.uint8,
        }

    def quantize_and_store(
        self, k_buffer, v_buffer, k_scale_buffer, v_scale_buffer, loc, cache_k, cache_v,
        k_scale=None, v_scale=None,
    ) -> None:
        # k_scale / v_scale are FP8 checkpoint scales: INT4 computes its own per
        # token-head scales from the BF16 values, so they are not used.
        self._kernels()
        h, d = k_buffer.shape[1], self.fmt.head_dim
        if cache_k.dim() != 3:  # [T, H*D] callers; [T, H, D] may keep a row stride
            cache_k, cache_v = cache_k.view(-1, h, d), cache_v.view(-1, h, d)
        self._quantize_and_store(
            cache_k, cache_v, loc,
            k_buffer, k_scale_buffer, v_buffer, v_scale_buffer, self.fmt,
            k_affine=self.k_affine(k_buffer),
        )

    # -- fallbacks (debugging, tests): never on the attention hot path ------------
    def dequantize_kv_tensor(
        self, fp4_tensor: Tensor, scales: Tensor, layer_id: int, dtype=None, *,
        is_value: bool = False,
    ) -> Tensor:
        """All rows of one packed K (or V with is_value=True) buffer -> [rows, H, D]
        (a calibrated K comes back as K: the calibration undone)."""
        self._kernels()
        loc = torch.arange(fp4_tensor.shape[0], device=fp4_tensor.device)
        rotated = self.fmt.v_rotated if is_value else self.fmt.k_rotated
        cal = None if is_value else self.calibration
        out = self._dequantize(
            fp4_tensor, scales, loc, self.fmt, rotated,
            dtype=torch.float32 if cal is not None else (dtype or torch.bfloat16),
        )
        if cal is not None:
            layer = self.start_layer + layer_id
            out = (out * cal.scale[layer].to(out.device) + cal.mean[layer].to(out.device))
            out = out.to(dtype or torch.bfloat16)
        return out

    def dequantize_prev_kv(self, k_fp4, k_scales, v_fp4, v_scales, layer_id):
        return (
            self.dequantize_kv_tensor(k_fp4, k_scales, layer_id),
            self.dequantize_kv_tensor(v_fp4, v_scales, layer_id, is_value=True),
        )

    def compute_cell_size(self, head_num, head_dim, num_layers, kv_size=None) -> int:
        """K + V bytes per token (packed data + fp16 scale/min), all layers."""
        return self.fmt.bytes_per_token(head_num, num_layers)


def apply() -> bool:
    """Declare the method to SGLang's access registry with no rules (see above)."""
    if NAME in KV_CACHE_ATTENTION_ACCESS_REGISTRY:
        return False
    KV_CACHE_ATTENTION_ACCESS_REGISTRY[NAME] = ()
    return True
