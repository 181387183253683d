"""Make a per-model K calibration (kernels/calibration.py) from the calibration text.

The model runs in BF16 over windows of the calibration text (never an evaluation
text) and the attention hook records, per layer, KV head and channel, the mean of
K and the mean squares of K and of the queries of that head's group. RoPE makes
K's mean depend on position, and a server's keys sit anywhere in its context, so
each window runs at a position offset spread evenly over [0, context): with RoPE
only relative positions matter, so the activations are those of the same text,
and the recorded K is what the cache sees at those positions. A shift that is
right on average over the whole context is what an exact, fixed shift can be.

    mean  = E[k]                              (over tokens and positions)
    scale = (E[k^2] / E[q^2]) ^ (1/4)         (geometric mean 1 per head)
"""

from __future__ import annotations

import torch

from saw_sglang.kernels.calibration import KCalibration

from . import text as texts
from .hook import kv_mode


class _Collector:
    """A KV 'mode' that changes nothing and accumulates q, k statistics."""

    def __init__(self, num_q_heads: int, num_kv_heads: int):
        self.g = num_q_heads // num_kv_heads
        self.stats: dict[int, list] = {}
        self._q = None

    def query(self, q, layer):
        self._q = q
        return q

    def roundtrip(self, x, layer, is_key):
        if is_key:
            k = x.float()  # [B, H, S, D]
            q = self._q.float()
            b, h, s, d = k.shape
            st = self.stats.setdefault(layer, [0.0, 0.0, 0.0, 0])
            st[0] = st[0] + k.sum((0, 2))
            st[1] = st[1] + (k * k).sum((0, 2))
            st[2] = st[2] + (q * q).reshape(b, h, self.g, s, d).sum((0, 2, 3)) / self.g
            st[3] += b * s
        return x


def context_of(model, cap: int = 32768) -> int:
    cfg = model.config.get_text_config()
    return min(int(getattr(cfg, "max_position_embeddings", 4096) or 4096), cap)


@torch.no_grad()
def calibrate(model, tokenizer, num_layers: int, num_q_heads: int, num_kv_heads: int,
              tokens: int = 4096, ctx: int = 256, context: int | None = None,
              device="cpu", progress=None) -> KCalibration:
    """-> KCalibration [layers, kv_heads, head_dim] from the bundled calibration text."""
    cal_text = texts.calibration_text()
    wins = texts.windows(tokenizer, cal_text.body, ctx, tokens)
    context = context or context_of(model)
    span = max(0, context - ctx)
    col = _Collector(num_q_heads, num_kv_heads)
    with kv_mode(col):
        for i, w in enumerate(wins):
            off = span * i // max(1, len(wins) - 1)
            ids = torch.tensor(w, device=device)[None]
            model(ids, position_ids=torch.arange(off, off + ids.shape[1], device=device)[None])
            if progress is not None:
                progress.update(1)
    missing = [i for i in range(num_layers) if i not in col.stats]
    if missing:
        raise RuntimeError(f"calibration saw no attention in layers {missing}: the model does not "
                           "route attention through the tool's hook")
    means, scales = [], []
    for i in range(num_layers):
        k1, k2, q2, n = col.stats[i]
        ek2, eq2 = k2 / n, (q2 / n).clamp_min(1e-12)
        s = (ek2.clamp_min(1e-12) / eq2).pow(0.25)
        s = s / s.log().mean(-1, keepdim=True).exp()  # geometric mean 1 per head
        means.append(k1 / n)
        scales.append(s)
    src = f"{cal_text.source}; {len(wins)} windows of {ctx} at offsets over [0, {context})"
    return KCalibration(torch.stack(means).cpu(), torch.stack(scales).cpu(), src)
