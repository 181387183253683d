"""Per-model K calibration: a fixed per-channel shift and scale applied to K before
the Hadamard rotation, exact in attention.

Per layer, KV head and channel c (original basis, K after RoPE), the cache stores

    k'_c = (k_c - mean_c) / scale_c            (then rotated and quantized as usual)

and the reader multiplies the query by the same scale, q'_c = q_c * scale_c, so

    q' . k' = q . k - q . mean

The second term is the same for every key a query attends to, so softmax (and the
attention output) is unchanged; only a log-sum-exp computed over cached keys alone
(the prefix half of an extend, merged with the fresh chunk's) must add back
`sm_scale * q . mean` (`lse_shift`). With a logit soft-cap the shift is not exact:
`for_logit_cap` drops the mean then. Why it helps: K has channels with a large
constant offset and channels of very different size; removing the offset and
balancing the channels against the queries (scale = (E k_c^2 / E q_c^2)^(1/4), the
least error of q . k for a white quantization error) shrinks every token's range.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FORMAT_VERSION = 1


@dataclass(frozen=True)
class KCalibration:
    mean: torch.Tensor  # [layers, kv_heads, head_dim] fp32
    scale: torch.Tensor  # [layers, kv_heads, head_dim] fp32, > 0
    source: str = ""  # what it was calibrated on (for the startup line)

    def __post_init__(self):
        if self.mean.shape != self.scale.shape or self.mean.dim() != 3:
            raise ValueError(f"calibration mean {tuple(self.mean.shape)} and scale "
                             f"{tuple(self.scale.shape)} must both be [layers, kv_heads, head_dim]")
        if not (torch.isfinite(self.mean).all() and torch.isfinite(self.scale).all()
                and (self.scale > 0).all()):
            raise ValueError("calibration mean must be finite and scale finite and > 0")

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.mean.shape)

    def write_affine(self, layer: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(mul, add) fp32 [kv_heads, head_dim] with k' = k * mul + add."""
        mul = 1.0 / self.scale[layer]
        add = -self.mean[layer] * mul
        return mul.to(device).contiguous(), add.to(device).contiguous()

    def read_side(self, layer: int, device=None):
        """(mean, scale) fp32 [kv_heads, head_dim] of a layer for the readers, each None
        when it is the identity (a zero mean, a unit scale): nothing to do for it."""
        mean, scale = self.mean[layer], self.scale[layer]
        return (None if not mean.any() else mean.to(device).contiguous(),
                None if bool((scale == 1).all()) else scale.to(device).contiguous())

    def heads(self, start: int, count: int) -> "KCalibration":
        """The KV heads [start, start + count) (one tensor-parallel rank's share)."""
        if start < 0 or start + count > self.shape[1]:
            raise ValueError(f"calibration has {self.shape[1]} KV heads, asked for {start}..{start + count}")
        return KCalibration(self.mean[:, start:start + count].contiguous(),
                            self.scale[:, start:start + count].contiguous(), self.source)

    def without_scale(self) -> "KCalibration":
        return KCalibration(self.mean, torch.ones_like(self.scale), self.source)

    def without_mean(self) -> "KCalibration":
        return KCalibration(torch.zeros_like(self.mean), self.scale, self.source)

    def for_logit_cap(self, logit_cap: float) -> "KCalibration":
        """The mean shift is exact only without a logit soft-cap."""
        return self.without_mean() if logit_cap and logit_cap > 0 else self

    def save(self, path) -> None:
        torch.save({"version": FORMAT_VERSION, "mean": self.mean.float().cpu(),
                    "scale": self.scale.float().cpu(), "source": self.source}, path)

    @classmethod
    def load(cls, path) -> "KCalibration":
        try:
            d = torch.load(path, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, ValueError) as e:
            raise ValueError(f"cannot read K calibration {path}: {e}") from None
        if not isinstance(d, dict) or d.get("version") != FORMAT_VERSION:
            raise ValueError(f"{path} is not a K calibration file of version {FORMAT_VERSION}; "
                             "make one with python -m saw_sglang.calibrate")
        return cls(d["mean"].float(), d["scale"].float(), str(d.get("source", "")))

    @classmethod
    def identity(cls, layers: int, kv_heads: int, head_dim: int) -> "KCalibration":
        z = torch.zeros(layers, kv_heads, head_dim)
        return cls(z, torch.ones_like(z), "identity")


def fold_query(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """q [..., Hq, D] -> q * scale for the layer's scale [Hkv, D] (each KV head's
    factors shared by its Hq / Hkv query heads), in q's dtype."""
    hq, hkv = q.shape[-2], scale.shape[0]
    s = scale.to(q.device).repeat_interleave(hq // hkv, dim=0)
    return (q.float() * s).to(q.dtype)


def lse_shift(q: torch.Tensor, mean: torch.Tensor, sm_scale: float) -> torch.Tensor:
    """sm_scale * q . mean [..., Hq] (natural log): add it to the log-sum-exp of an
    attention over calibrated cached keys alone before merging it with another part."""
    hq, hkv = q.shape[-2], mean.shape[0]
    m = mean.to(q.device).repeat_interleave(hq // hkv, dim=0)
    return sm_scale * (q.float() * m).sum(-1)
