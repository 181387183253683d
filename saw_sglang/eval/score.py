"""Teacher-forced scoring, kept per window so that the noise of the text sample can
be measured (bootstrap over windows, stats.py): NLL, KL to BF16, top-1 agreement."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .hook import kv_mode
from .modes import KVMode

REFERENCE = None  # the model's own BF16 attention: the hook leaves K/V untouched


@dataclass
class Tally:
    """Sums per window: nll (sum of -log p(target)), kl (sum of KL(P_bf16 || P_mode);
    NaN when no distribution is known), agree (argmax equal to BF16's), n (scored
    positions), agree_n (positions where agreement was measured)."""

    nll: list = field(default_factory=list)
    kl: list = field(default_factory=list)
    agree: list = field(default_factory=list)
    agree_n: list = field(default_factory=list)
    n: list = field(default_factory=list)

    def add(self, logp: torch.Tensor, targets: torch.Tensor, ref_logp: torch.Tensor | None):
        """One window: logp [N, V] log-probabilities at positions whose next tokens are targets [N]."""
        self.nll.append(-float(logp.gather(-1, targets[:, None]).sum()))
        self.n.append(targets.numel())
        if ref_logp is not None:
            self.kl.append(float((ref_logp.exp() * (ref_logp - logp)).sum()))
            self.agree.append(int((logp.argmax(-1) == ref_logp.argmax(-1)).sum()))
            self.agree_n.append(targets.numel())
        else:
            self.kl.append(float("nan"))
            self.agree.append(0)
            self.agree_n.append(0)

    def add_window(self, nll: float, n: int, agree: int = 0, agree_n: int = 0):
        self.nll.append(nll)
        self.n.append(n)
        self.kl.append(float("nan"))
        self.agree.append(agree)
        self.agree_n.append(agree_n)

    def metrics(self) -> dict:
        n, an = sum(self.n), sum(self.agree_n)
        return {
            "tokens": n,
            "nll": sum(self.nll) / n,
            "ppl": math.exp(sum(self.nll) / n),
            "kl": sum(self.kl) / an if an else float("nan"),
            "top1_agree": sum(self.agree) / an if an else float("nan"),
        }


@torch.no_grad()
def log_probs(model, ids: torch.Tensor, mode: KVMode | None, offset: int = 0) -> torch.Tensor:
    """ids [S] at positions offset.. -> fp32 log-probabilities [S-1, V] of the next token."""
    pos = torch.arange(offset, offset + ids.numel(), device=ids.device)[None]
    with kv_mode(mode):
        logits = model(ids[None], position_ids=pos).logits[0, :-1]
    return torch.log_softmax(logits.float(), -1)


def offsets(n_windows: int, ctx: int, context: int) -> list[int]:
    """Window start positions spread evenly over [0, context - ctx]: a server's keys sit
    anywhere in its context, and RoPE makes K depend on the absolute position (the
    BF16 result does not: only relative positions matter)."""
    span = max(0, context - ctx)
    return [span * i // max(1, n_windows - 1) for i in range(n_windows)]


def simulate(model, windows: list[list[int]], modes: list[KVMode], device, progress=None,
             context: int = 0) -> dict[str, Tally]:
    """Score every window under every mode; the model's own attention is the reference.
    Windows run at position offsets spread over [0, context) (0: all at 0)."""
    tallies = {m.name: Tally() for m in modes}
    starts = offsets(len(windows), max(len(w) for w in windows), context) if context else [0] * len(windows)
    for w, off in zip(windows, starts[::-1]):
        ids = torch.tensor(w, device=device)
        targets = ids[1:]
        ref_lp = log_probs(model, ids, REFERENCE, off)
        for m in modes:
            lp = ref_lp if m.kind == "bf16" else log_probs(model, ids, m, off)
            tallies[m.name].add(lp, targets, ref_lp)
            if progress is not None:
                progress.update(1)
    return tallies
