"""KV-cache modes: what one stored K or V vector becomes after a write and a read.

Every INT4 round trip is the project's own reference (kernels/reference.py
`quantize` + `dequantize_values`), so the tool measures exactly the format the
kernels implement. Modes are written as specs, e.g. `bf16`, `fp8_e4m3`,
`int4:rot=none`, `int4:b=32`, `int4:b=64:v`, `int4:g=32`, `int4:keep=0.1`, `int4:q8`,
`int4:clip=0.9`, `int4:clip=mse`, `int4:vclip=mse` (V only).

`q8` is not a cache format: it also rounds each query to int8 (per token and head,
symmetric, in the basis the decode kernel rotates q into), to measure what an INT8
q.k dot on integer tensor cores would cost (docs/decode.md). `clip` is a candidate
format change the kernels do not write yet: each group's range shrunk about its centre
(a factor, or `mse`: the least-squared-error factor per group, kernels/reference.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from saw_sglang.kernels import reference as ref
from saw_sglang.kernels.format import Int4KVFormat

CACHE_DTYPE = torch.bfloat16  # what an engine hands to the cache writer


@dataclass(frozen=True)
class KVMode:
    spec: str
    kind: str  # "bf16" | "fp8_e4m3" | "int4"
    fmt: Int4KVFormat | None = None
    keep_layers: frozenset[int] = field(default_factory=frozenset)  # stored in BF16
    q_int8: bool = False  # also round queries to int8 (simulates an INT8 q.k kernel)
    clip: object = 1.0  # range clipping candidate (reference.quantize); kernels write 1.0
    clip_v_only: bool = False  # the clip applies to V alone (K keeps its full range)

    # -- the round trip -------------------------------------------------------------
    def roundtrip(self, x: torch.Tensor, layer: int | None, is_key: bool) -> torch.Tensor:
        """x [..., D] (K after RoPE, or V) -> what attention reads back, in x.dtype."""
        x16 = x.to(CACHE_DTYPE)
        if self.kind == "bf16" or (layer is not None and layer in self.keep_layers):
            return x16.to(x.dtype)
        if self.kind == "fp8_e4m3":
            # SGLang's fp8 KV default: scale 1.0, plain cast to float8_e4m3fn and back.
            return x16.to(torch.float8_e4m3fn).to(x.dtype)
        rotated = self.fmt.k_rotated if is_key else self.fmt.v_rotated
        clip = 1.0 if (is_key and self.clip_v_only) else self.clip
        packed, scales = ref.quantize(x16, self.fmt, rotated, clip=clip)
        return ref.dequantize_values(packed, scales, self.fmt, rotated).to(x.dtype)

    def query(self, q: torch.Tensor, layer: int | None) -> torch.Tensor:
        """q [..., D] -> what the attention kernel multiplies with the keys."""
        if not self.q_int8 or (layer is not None and layer in self.keep_layers):
            return q
        rot = self.fmt.k_rotated
        x = ref.rotate(q, self.fmt.block_size) if rot else q.float()
        step = x.abs().amax(-1, keepdim=True).clamp_min(1e-30) / 127
        x = torch.round(x / step).clamp(-127, 127) * step
        return (ref.rotate(x, self.fmt.block_size) if rot else x).to(q.dtype)

    # -- sizes ----------------------------------------------------------------------
    def bytes_per_token(self, num_kv_heads: int, num_layers: int, head_dim: int) -> int:
        """K + V bytes of one token across all layers (kept layers count as BF16)."""
        kept = len([i for i in self.keep_layers if 0 <= i < num_layers])
        bf16_layer = 2 * num_kv_heads * head_dim * 2
        if self.kind == "bf16":
            return num_layers * bf16_layer
        if self.kind == "fp8_e4m3":
            per_layer = 2 * num_kv_heads * head_dim  # 1 byte per element
        else:
            per_layer = self.fmt.bytes_per_token(num_kv_heads, 1)
        return (num_layers - kept) * per_layer + kept * bf16_layer

    @property
    def label(self) -> str:
        if self.kind != "int4":
            base = self.kind
        else:
            f = self.fmt
            rot = "none" if f.rotation == "none" else f"had B{f.block_size} {'K+V' if f.rotate_v else 'K'}"
            base = f"int4 {rot} g{f.group_size}"
        if self.keep_layers and self.kind != "bf16":
            base += " keep " + ",".join(map(str, sorted(self.keep_layers)))
        if self.q_int8:
            base += " q8"
        if self.clip != 1.0:
            base += f" {'V ' if self.clip_v_only else ''}clip {self.clip}"
        return base


KINDS = ("bf16", "fp8_e4m3", "int4")
INT4_OPTIONS = "rot=none|hadamard, b=N, g=N, v, q8, clip=X|mse, vclip=X|mse, keep=I.J"


def _options(spec: str, keep_layers=()) -> tuple:
    """Parse a spec's syntax (no head_dim needed): raises ValueError naming the valid options."""
    kind, *opts = spec.strip().split(":")
    if kind not in KINDS:
        raise ValueError(f"mode {spec!r}: unknown KV mode {kind!r}; choose from bf16, fp8_e4m3, "
                         f"int4[:options] (int4 options: {INT4_OPTIONS})")
    kw: dict = {}
    keep = frozenset(keep_layers)
    q8 = False
    clip, v_only = 1.0, False
    for opt in opts:
        key, _, val = opt.partition("=")
        if key != "keep" and kind != "int4":
            raise ValueError(f"mode {spec!r}: only int4 takes option {opt!r} ({kind} takes keep=I.J)")
        try:
            if key == "keep":
                keep = frozenset(int(i) for i in val.split(".") if i != "")
            elif key == "rot" and val in ("none", "hadamard"):
                kw["rotation"] = val
            elif key == "b":
                kw["block_size"] = int(val)
            elif key == "g":
                kw["group_size"] = int(val)
            elif key == "v" and not val:
                kw["rotate_v"] = True
            elif key == "q8" and not val:
                q8 = True
            elif key in ("clip", "vclip"):
                clip = val if val == "mse" else float(val)
                v_only = key == "vclip"
            else:
                raise ValueError(opt)
        except ValueError:
            raise ValueError(f"mode {spec!r}: bad option {opt!r}; int4 takes {INT4_OPTIONS}") from None
    return kind, kw, keep, q8, clip, v_only


def check_spec(spec: str) -> None:
    """Refuse a malformed spec before any model loads (the head_dim checks come later)."""
    _options(spec)


def parse_mode(spec: str, head_dim: int, keep_layers=()) -> KVMode:
    """`kind[:opt...]`; int4 options: rot=none|hadamard, b=N (Hadamard block),
    g=N (group), v (rotate V too), keep=i.j (layers kept in BF16).
    `keep_layers` applies to every quantized mode that names no keep= itself."""
    kind, kw, keep, q8, clip, v_only = _options(spec, keep_layers)
    if kind in ("bf16", "fp8_e4m3"):
        return KVMode(spec, kind, None, frozenset() if kind == "bf16" else keep)
    if kw.get("rotation") == "none":
        kw.pop("block_size", None)  # no rotation: the block size is unused
    try:
        fmt = Int4KVFormat(head_dim=head_dim, **kw)
    except ValueError as e:
        raise ValueError(f"mode {spec!r}: {e}") from None
    return KVMode(spec, "int4", fmt, keep, q8, clip, v_only)


def default_specs(head_dim: int, quick: bool = False) -> list[str]:
    """The comparison the tool runs with no --modes: reference points, naive INT4,
    the project default, block sizes, K+V rotation, smaller groups, kept layers."""
    blocks = [b for b in (16, 32, 64, 128, 256) if b <= head_dim and head_dim % b == 0]
    default_b = min(128, head_dim)
    specs = ["bf16", "fp8_e4m3", "int4:rot=none", "int4"]
    if quick:
        return specs
    specs += [f"int4:b={b}" for b in blocks if b != default_b]
    specs += ["int4:v"]
    groups = [g for g in (64, 32) if g < head_dim]
    for g in groups:
        specs += [f"int4:rot=none:g={g}", f"int4:g={g}"]
    specs += ["int4:keep=0.1", "int4:q8"]
    return specs
