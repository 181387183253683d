"""Teacher-forced scoring: perplexity, KL to BF16 and top-1 agreement per mode."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .hook import kv_mode
from .modes import KVMode


@dataclass
class Tally:
    nll: float = 0.0  # sum of -log p(target)
    kl: float = 0.0  # sum of KL(P_bf16 || P_mode); nan when no distribution is known
    agree: int = 0  # positions whose argmax equals BF16's
    agree_n: int = 0  # positions where agreement was measured
    n: int = 0  # scored positions

    def add(self, logp: torch.Tensor, targets: torch.Tensor, ref_logp: torch.Tensor | None):
        """logp [N, V] log-probabilities at positions whose next tokens are targets [N]."""
        self.nll -= float(logp.gather(-1, targets[:, None]).sum())
        self.n += targets.numel()
        if ref_logp is not None:
            self.kl += float((ref_logp.exp() * (ref_logp - logp)).sum())
            self.agree += int((logp.argmax(-1) == ref_logp.argmax(-1)).sum())
            self.agree_n += targets.numel()

    def metrics(self) -> dict:
        return {
            "tokens": self.n,
            "nll": self.nll / self.n,
            "ppl": math.exp(self.nll / self.n),
            "kl": self.kl / self.agree_n if self.agree_n else float("nan"),
            "top1_agree": self.agree / self.agree_n if self.agree_n else float("nan"),
        }


@torch.no_grad()
def log_probs(model, ids: torch.Tensor, mode: KVMode) -> torch.Tensor:
    """ids [S] -> fp32 log-probabilities [S-1, V] of the next token at each position."""
    with kv_mode(mode):
        logits = model(ids[None]).logits[0, :-1]
    return torch.log_softmax(logits.float(), -1)


def simulate(model, windows: list[list[int]], modes: list[KVMode], device, progress=None) -> dict[str, Tally]:
    """Score every window under every mode; the BF16 mode is the reference."""
    ref = KVMode("bf16", "bf16")
    tallies = {m.spec: Tally() for m in modes}
    for w in windows:
        ids = torch.tensor(w, device=device)
        targets = ids[1:]
        ref_lp = log_probs(model, ids, ref)
        for m in modes:
            lp = ref_lp if m.kind == "bf16" else log_probs(model, ids, m)
            tallies[m.spec].add(lp, targets, ref_lp)
            if progress is not None:
                progress.update(1)
    return tallies
