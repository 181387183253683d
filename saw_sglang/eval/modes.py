"""KV-cache modes in the simulation: what one stored K or V vector becomes after a
write and a read. The grammar is saw_sglang.kv_modes (the server's flags).

Every INT4 round trip is the project's own reference (kernels/reference.py
`quantize` + `dequantize_values`), so the tool measures exactly the format the
kernels write. A K calibration is applied as the server applies it: K shifted and
scaled per channel before the rotation; the simulation undoes it after the read,
which gives the same attention as folding the scale into q (the shift changes every
score of a query by the same amount: softmax ignores it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from saw_sglang.kernels import reference as ref
from saw_sglang.kernels.calibration import KCalibration
from saw_sglang.kernels.format import Int4KVFormat
from saw_sglang.kv_modes import ModeSpec, parse

CACHE_DTYPE = torch.bfloat16  # what an engine hands to the cache writer


@dataclass(frozen=True)
class KVMode:
    spec: ModeSpec
    fmt: Int4KVFormat | None = None
    calibration: KCalibration | None = None

    @property
    def name(self) -> str:
        return self.spec.text

    @property
    def kind(self) -> str:
        return self.spec.kind

    @property
    def keep_layers(self) -> tuple:
        return self.spec.sim_options.get("bf16-layers", ())

    @property
    def sink_tokens(self) -> int:
        return self.spec.sim_options.get("sink-tokens", 0)

    @property
    def q_int8(self) -> bool:
        return self.spec.sim_options.get("q8", False)

    # -- the round trip -------------------------------------------------------------
    def roundtrip(self, x: torch.Tensor, layer: int | None, is_key: bool) -> torch.Tensor:
        """x [B, H, S, D] (K after RoPE, or V) -> what attention reads back, in x.dtype."""
        x16 = x.to(CACHE_DTYPE)
        if self.kind == "bf16" or (layer is not None and layer in self.keep_layers):
            return x16.to(x.dtype)
        if self.kind == "fp8":
            # SGLang's fp8 KV default: scale 1.0, plain cast to float8_e4m3fn and back.
            return x16.to(torch.float8_e4m3fn).to(x.dtype)
        rotated = self.fmt.k_rotated if is_key else self.fmt.v_rotated
        cal = self.calibration if is_key and layer is not None else None
        affine = None
        if cal is not None:
            mul, add = cal.write_affine(layer, x.device)
            affine = (mul[:, None], add[:, None])  # [H, 1, D] against [B, H, S, D]
        packed, scales = ref.quantize(x16, self.fmt, rotated, affine=affine)
        y = ref.dequantize_values(packed, scales, self.fmt, rotated)
        if cal is not None:
            y = y * cal.scale[layer][:, None].to(y.device) + cal.mean[layer][:, None].to(y.device)
        if self.sink_tokens:
            y[..., : self.sink_tokens, :] = x16[..., : self.sink_tokens, :].float()
        return y.to(x.dtype)

    def query(self, q: torch.Tensor, layer: int | None) -> torch.Tensor:
        """q [..., D] -> what the attention kernel multiplies with the keys."""
        if not self.q_int8 or (layer is not None and layer in self.keep_layers):
            return q
        return ref.round_query_int8(q, self.fmt).to(q.dtype)

    # -- sizes ----------------------------------------------------------------------
    def bytes_per_token(self, num_kv_heads: int, num_layers: int, head_dim: int) -> int:
        """K + V bytes of one token across all layers (kept layers count as BF16;
        BF16 sink tokens are a constant per sequence, not per token)."""
        kept = len([i for i in self.keep_layers if 0 <= i < num_layers])
        bf16_layer = 2 * num_kv_heads * head_dim * 2
        if self.kind == "bf16":
            return num_layers * bf16_layer
        if self.kind == "fp8":
            per_layer = 2 * num_kv_heads * head_dim  # 1 byte per element
        else:
            per_layer = self.fmt.bytes_per_token(num_kv_heads, 1)
        return (num_layers - kept) * per_layer + kept * bf16_layer


def build(spec: ModeSpec | str, head_dim: int, calibrations=None) -> KVMode:
    """A ModeSpec -> KVMode for a model with this head_dim. `calibrations(source)`
    returns the KCalibration for calibration=auto or a FILE."""
    spec = parse(spec) if isinstance(spec, str) else spec
    if spec.kind != "int4":
        return KVMode(spec)
    cfg = spec.config
    try:
        fmt = cfg.fmt(head_dim)
    except ValueError as e:
        raise ValueError(f"mode {spec.text!r}: {e}") from None
    cal = None
    if cfg.saw_calibration:
        if calibrations is None:
            raise ValueError(f"mode {spec.text!r} needs a K calibration and none can be made here")
        cal = calibrations(cfg.saw_calibration)
        # calibration=auto holds both halves; what a server gets (and the default) is the mean
        parts = spec.sim_options.get("calibration-parts", "mean" if cfg.saw_calibration == "auto" else "as-is")
        if parts == "scale":
            cal = cal.without_mean()
        elif parts == "mean":
            cal = cal.without_scale()
    return KVMode(spec, fmt, cal)


def default_specs(head_dim: int, quick: bool = False) -> list[str]:
    """The comparison the tool runs with no --modes: the references, naive INT4, the
    server default, with a K calibration, and (not --quick) the levers that cost read
    work: K+V rotation and groups of 32 (see docs/eval.md)."""
    specs = ["bf16", "fp8", "int4:rotation=none:scale-fit=minmax", "int4", "int4:calibration=auto"]
    if quick:
        return specs
    g = min(32, head_dim)
    return specs + ["int4:rotate-v", "int4:rotate-v:calibration=auto", f"int4:group-size={g}",
                    f"int4:group-size={g}:calibration=auto"]
